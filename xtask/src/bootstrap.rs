//! Installs whatever building and testing udpmon needs, idempotently, one progress line per
//! step. A second run finds everything present and takes about a second.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{cmd_ok, run};

/// Debian packages the test tiers use (tools the scenarios drive, and the VM tier's qemu).
pub const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "netcat-openbsd",
    "socat",
    "nftables",
    "dnsmasq-base",
    "dnsutils",
    // prometheus and promtool, for the metrics scenario, which runs its own server on a free
    // loopback port (the postinst starts the packaged service only where PID 1 is systemd).
    "prometheus",
    "bpftool",
    "bpftrace",
    "qemu-system-x86",
    "busybox-static",
    // The zone files the time-zone scenario repoints TZ between.
    "tzdata",
    "cpio",
    "kmod",
    "xz-utils",
    "zstd",
    // The package tier: cargo-deb's dependency and architecture lookups (dpkg-shlibdeps,
    // dpkg-architecture) and strip; then what it checks the installed package with.
    "dpkg-dev",
    "binutils",
    "adduser",
    "systemd",
    "man-db",
    "bash-completion",
    "zsh",
    "fish",
    "logrotate",
    "strace",
    // The image tier: podman builds udpmon's image and runs it; runc because crun refuses
    // hybrid cgroup layouts like this machine's.
    "podman",
    "runc",
    // The CRI scenario: containerd's CRI plugin runs a pod as kubelet would; and protoc for
    // the generated CRI bindings the scenario drives it with (a dev-dependency).
    "containerd",
    "protobuf-compiler",
];

/// Where downloads and builds are cached (bpf-linker, VM kernels): $UDPMON_CACHE or
/// ~/.cache/udpmon.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("UDPMON_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/udpmon")
}

fn step(msg: &str) {
    println!("[bootstrap] {msg}");
}

/// The nightly toolchain and its rust-src: the eBPF crate is built with `-Z build-std=core`.
pub fn nightly() -> anyhow::Result<()> {
    if !cmd_ok(Command::new("rustc").args(["+nightly", "--version"])) {
        step("installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        step("nightly rust-src: present");
    } else {
        step("nightly rust-src: installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The static target for binaries dropped into the VMs.
pub fn musl_target() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == "x86_64-unknown-linux-musl")
    {
        step("x86_64-unknown-linux-musl target: present");
    } else {
        step("x86_64-unknown-linux-musl target: installing");
        run(Command::new("rustup").args(["target", "add", "x86_64-unknown-linux-musl"]))?;
    }
    Ok(())
}

/// bpf-linker built against the nightly toolchain's own libLLVM (no system LLVM of the
/// right version exists here; see shared/TOOLCHAIN.md). Cached per libLLVM file, so a new
/// nightly gets a matching linker. Returns the directory to put first on PATH.
pub fn bpf_linker() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly")?;
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let libdir = sysroot.join("lib");
    let llvm = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" -> feature "llvm-22"
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prefix = cache_dir().join("bpf-linker").join(&llvm);
    let bin = prefix.join("bin");
    if bin.join("bpf-linker").exists() {
        step(&format!("bpf-linker (against {llvm}): cached"));
        return Ok(bin);
    }
    step(&format!(
        "bpf-linker: building against {llvm} (about a minute)"
    ));
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&llvm), &link)?;
    }
    run(Command::new("cargo")
        .args(["install", "--locked", "--root"])
        .arg(&prefix)
        .args([
            "bpf-linker",
            "--version",
            "=0.13.0",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    Ok(bin)
}

/// The cargo-deb release `cargo xtask deb` uses: pinned, like bpf-linker, so that a new
/// release cannot change the package under us.
const CARGO_DEB: &str = "3.8.0";

/// cargo-deb, built once into the cache; returns the directory to put on PATH (`cargo deb`).
pub fn cargo_deb() -> anyhow::Result<PathBuf> {
    let prefix = cache_dir().join("cargo-deb").join(CARGO_DEB);
    let bin = prefix.join("bin");
    if bin.join("cargo-deb").exists() {
        step(&format!("cargo-deb {CARGO_DEB}: cached"));
        return Ok(bin);
    }
    step(&format!("cargo-deb {CARGO_DEB}: building (a few minutes)"));
    run(Command::new("cargo")
        .args(["install", "--locked", "--root"])
        .arg(&prefix)
        .args(["cargo-deb", "--version"])
        .arg(format!("={CARGO_DEB}")))?;
    Ok(bin)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the missing Debian packages among `pkgs`.
pub fn apt(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step(&format!("Debian packages ({}): present", pkgs.len()));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing ({}); run as root to install them",
            missing.join(" ")
        );
    }
    step(&format!(
        "Debian packages: installing {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Everything the build needs; returns the PATH to give cargo.
pub fn build_env() -> anyhow::Result<String> {
    nightly()?;
    let linker = bpf_linker()?;
    Ok(path_with(&linker))
}

pub fn path_with(dir: &Path) -> String {
    let old = env::var("PATH").unwrap_or_default();
    format!("{}:{old}", dir.display())
}
