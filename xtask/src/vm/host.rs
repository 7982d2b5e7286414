//! Host-side plumbing: where things are cached, running commands, installing Debian
//! packages on a fresh machine.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// `$UDPMON_CACHE`, else `~/.cache/udpmon`: the same root that holds bpf-linker.
pub(super) fn cache_root() -> Result<PathBuf> {
    Ok(crate::bootstrap::cache_dir())
}

/// Cargo's target dir of this workspace, so VM logs sit next to the binaries they tested.
pub(super) fn target_dir() -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("target")
}

pub(super) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` quietly and returns its stdout; stderr is only shown on failure.
pub(super) fn output(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(cmd)?).into_owned())
}

pub(super) fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn missing_packages(pkgs: &[&str]) -> Vec<String> {
    // dpkg-query exits non-zero when one of the names is unknown but still lists the
    // others, so only its stdout matters.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(pkgs)
        .stderr(Stdio::null())
        .output();
    let listed = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    pkgs.iter()
        .filter(|pkg| {
            !listed.lines().any(|line| {
                let mut f = line.split_whitespace();
                f.next() == Some(**pkg) && f.next().is_some_and(|s| s.starts_with("ii"))
            })
        })
        .map(|pkg| (*pkg).to_string())
        .collect()
}

/// Quiet unless it fails: qemu alone is hundreds of lines of dpkg progress.
fn apt_install(pkgs: &[String]) -> Result<()> {
    let install = || {
        output(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(pkgs),
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    // A fresh machine often has no package lists yet, or stale ones.
    println!("vm: apt-get install failed; running apt-get update and retrying");
    output(Command::new("apt-get").args(["update", "-q"]))?;
    install().map(drop)
}

/// Installs the Debian packages that are not installed yet.
pub(super) fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing = missing_packages(pkgs);
    if missing.is_empty() {
        return Ok(());
    }
    println!("vm: installing {}", missing.join(" "));
    apt_install(&missing).with_context(|| format!("installing {}", missing.join(" ")))
}

/// Like [`ensure_packages`] for things the VM can do without: a failure is a warning.
pub(super) fn want_packages(pkgs: &[&str]) {
    if let Err(e) = ensure_packages(pkgs) {
        println!("vm: warning: {e:#}");
    }
}

/// Finds a program from a Debian package: the system directories come before PATH, so a
/// same-named program in ~/.cargo/bin or a pyenv shim cannot stand in for it, and the
/// sbin directories count even when PATH lacks them.
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .map(PathBuf::from)
        .into_iter()
        .chain(env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
