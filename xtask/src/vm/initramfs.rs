//! The VM's whole userland: busybox, udpmon and the program /init runs (the system-test
//! binary, or xtask for the bench), a few host network tools with their shared libraries,
//! the kernel modules the tests need, and /init.

use std::{
    collections::{BTreeSet, HashMap},
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{
    VmKernel,
    cpio::{Archive, Data},
    host,
};

/// What /init runs: `/bin/<program_name> <args>`, with `UDPMON_BIN=/bin/udpmon` and
/// `UDPMON_TIER=<tier>` in its environment; its exit code becomes the result marker.
pub(super) struct Init {
    /// `UDPMON_TIER` for the tests, e.g. "vm-6.12".
    pub tier: String,
    /// Host path of the program, copied to `/bin/<program_name>`.
    pub program: PathBuf,
    /// Its name in the VM's /bin, e.g. "udpmon-tests".
    pub program_name: String,
    pub args: Vec<String>,
    /// Bring every CPU the kernel left offline (booted with `maxcpus=1`) online first.
    pub online_cpus: bool,
}

/// Modules for veth pairs, nftables reject rules and the sock_diag dump of UDP sockets
/// (udpmon learns the sockets open at its start from it). The cloud kernels build all of them
/// as modules, and nothing in the VM would autoload them: there is no modprobe config
/// and no module tree beyond these files.
const MODULES: &[&str] = &[
    "veth",
    "nf_tables",
    "nft_reject",
    "nft_reject_inet",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    // `reject` in `table ip` / `table ip6` (not only `table inet`) needs these; without
    // them nft fails with ENOENT.
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "inet_diag",
    "udp_diag",
];

/// A host program copied into the VM's /bin.
struct Tool {
    name: &'static str,
    package: &'static str,
    /// Other names in /bin for it (they win over busybox applets of that name).
    aliases: &'static [&'static str],
}

/// Real implementations of what the scenarios drive; busybox's `ip` and `nc` lack veth,
/// netns and UDP options the tests use.
const TOOLS: &[Tool] = &[
    // Debian's busybox-static sh runs its own applets in preference to PATH, so `ip` or
    // `nc` in a shell command would silently be busybox's. dash, Debian's /bin/sh,
    // does not.
    Tool {
        name: "dash",
        package: "dash",
        aliases: &["sh"],
    },
    // Same trap through busybox's exec: `timeout 5 nc ...` would run busybox nc.
    Tool {
        name: "timeout",
        package: "coreutils",
        aliases: &[],
    },
    Tool {
        name: "env",
        package: "coreutils",
        aliases: &[],
    },
    Tool {
        name: "ip",
        package: "iproute2",
        aliases: &[],
    },
    Tool {
        name: "nc.openbsd",
        package: "netcat-openbsd",
        aliases: &["nc"],
    },
    Tool {
        name: "socat",
        package: "socat",
        aliases: &[],
    },
    Tool {
        name: "nft",
        package: "nftables",
        aliases: &[],
    },
    Tool {
        name: "dig",
        package: "bind9-dnsutils",
        aliases: &[],
    },
    // Runs udpmon as an unprivileged user with a chosen capability set.
    Tool {
        name: "setpriv",
        package: "util-linux",
        aliases: &[],
    },
    // dnsmasq-base is the binary alone; the dnsmasq package would also start a DNS
    // server on the host.
    Tool {
        name: "dnsmasq",
        package: "dnsmasq-base",
        aliases: &[],
    },
];

pub(super) fn build(kernel: &VmKernel, udpmon_bin: &Path, init: &Init, out: &Path) -> Result<()> {
    let mut a = Archive::default();
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "etc"] {
        a.dir(dir);
    }
    // The kernel opens /dev/console for /init's stdio before anything is mounted.
    a.char_dev("dev/console", 0o600, 5, 1);
    // Scripts and tests call tools by their Debian paths as well as by name.
    a.symlink("sbin", "bin");
    a.symlink("usr/bin", "../bin");
    a.symlink("usr/sbin", "../bin");
    a.symlink("var/run", "../run");
    a.symlink("var/tmp", "../tmp");

    add_program(&mut a, udpmon_bin, "bin/udpmon")?;
    add_program(&mut a, &init.program, &format!("bin/{}", init.program_name))?;

    host::want_packages(&TOOLS.iter().map(|t| t.package).collect::<Vec<_>>());
    for tool in TOOLS {
        let added = host::find_program(tool.name)
            .with_context(|| format!("{} (package {}) is not installed", tool.name, tool.package))
            .and_then(|path| add_program(&mut a, &path, &format!("bin/{}", tool.name)));
        match added {
            Ok(()) => {
                for alias in tool.aliases {
                    a.symlink(&format!("bin/{alias}"), tool.name);
                }
            }
            Err(e) => println!(
                "vm {}: warning: leaving {} out: {e:#}",
                kernel.name, tool.name
            ),
        }
    }
    add_busybox(&mut a)?;
    add_etc(&mut a);

    let insmods = add_modules(&mut a, kernel)?;
    a.file(
        "init",
        0o755,
        Data::Bytes(init_script(init, &insmods).into_bytes()),
    );
    a.write(out)
}

/// Copies `src` to `dest` with every shared library it needs (and the dynamic loader) at
/// the paths ldd reports, which are the loader's default search paths.
fn add_program(a: &mut Archive, src: &Path, dest: &str) -> Result<()> {
    anyhow::ensure!(src.is_file(), "{} does not exist", src.display());
    for lib in shared_libraries(src)? {
        let name = lib.to_string_lossy().into_owned();
        if !a.contains(&name) {
            a.file(&name, 0o755, Data::Host(lib));
        }
    }
    a.file(dest, 0o755, Data::Host(src.to_path_buf()));
    Ok(())
}

fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd fails on static binaries that are not PIE; that is the good case here.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs = Vec::new();
    for line in stdout.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                if rest.trim_start().starts_with("not found") {
                    bail!(
                        "{} needs {} which is missing",
                        program.display(),
                        name.trim()
                    );
                }
                rest
            }
            None => line,
        };
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn add_busybox(a: &mut Archive) -> Result<()> {
    host::ensure_packages(&["busybox-static"])?;
    let busybox = host::find_program("busybox").context("busybox not found")?;
    // /init runs before anything could provide shared libraries for it.
    anyhow::ensure!(
        shared_libraries(&busybox)?.is_empty(),
        "{} is not the static busybox",
        busybox.display()
    );
    let applets = host::output(Command::new(&busybox).arg("--list"))?;
    a.file("bin/busybox", 0o755, Data::Host(busybox));
    for applet in applets.lines().map(str::trim).filter(|s| !s.is_empty()) {
        let path = format!("bin/{applet}");
        if !a.contains(&path) {
            a.symlink(&path, "busybox");
        }
    }
    Ok(())
}

fn add_etc(a: &mut Archive) {
    // dnsmasq drops privileges to one of these users and fails when it cannot find it.
    let files: [(&str, &str); 5] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\n\
             dnsmasq:x:100:65534:dnsmasq:/nonexistent:/bin/false\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/resolv.conf", "nameserver 127.0.0.1\n"),
        ("etc/hostname", "udpmon-vm\n"),
    ];
    for (path, text) in files {
        a.file(path, 0o644, Data::Bytes(text.as_bytes().to_vec()));
    }
    // Port and protocol names for socat, nc and nft, when the host has them (netbase).
    for name in ["protocols", "services"] {
        let src = Path::new("/etc").join(name);
        if src.is_file() {
            a.file(&format!("etc/{name}"), 0o644, Data::Host(src));
        }
    }
}

/// Adds [`MODULES`] and their dependencies, uncompressed (busybox insmod cannot read
/// .ko.xz), and returns their VM paths in load order.
fn add_modules(a: &mut Archive, kernel: &VmKernel) -> Result<Vec<String>> {
    let dir = &kernel.modules_dir;
    let dep_file = dir.join("modules.dep");
    if !dep_file.is_file() {
        // The unpacked tree lives at <root>/lib/modules/<release>.
        let root = dir
            .ancestors()
            .nth(3)
            .context("modules dir is not <root>/lib/modules/<release>")?;
        host::ensure_packages(&["kmod"])?;
        host::output(
            Command::new(host::find_program("depmod").context("depmod not found")?)
                .arg("-b")
                .arg(root)
                .arg(&kernel.release),
        )?;
    }
    let dep_text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let deps = parse_modules_dep(&dep_text);
    let by_name: HashMap<String, &str> = deps.keys().map(|p| (module_name(p), *p)).collect();
    let builtin: BTreeSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    let mut order = Vec::new();
    for name in MODULES {
        let name = name.replace('-', "_");
        if let Some(path) = by_name.get(&name) {
            visit(path, &deps, &mut order);
        } else if builtin.contains(&name) {
            println!(
                "vm {}: warning: module {name} is built into {}; nothing to load",
                kernel.name, kernel.release
            );
        } else {
            println!(
                "vm {}: warning: module {name} does not exist in {}",
                kernel.name, kernel.release
            );
        }
    }

    let mut insmods = Vec::new();
    for rel in order {
        let bytes = decompress(&dir.join(rel))?;
        let dest = format!("/lib/modules/{}/{}.ko", kernel.release, module_name(rel));
        a.file(&dest, 0o644, Data::Bytes(bytes));
        insmods.push(dest);
    }
    Ok(insmods)
}

/// `modules.dep` lines are "kernel/a.ko.xz: kernel/b.ko.xz kernel/c.ko.xz".
fn parse_modules_dep(text: &str) -> HashMap<&str, Vec<&str>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module.trim(), deps.split_whitespace().collect()))
        .collect()
}

/// Depth first, so every module comes after everything it needs, whatever order
/// depmod listed them in.
fn visit<'a>(path: &'a str, deps: &HashMap<&'a str, Vec<&'a str>>, order: &mut Vec<&'a str>) {
    if order.contains(&path) {
        return;
    }
    for dep in deps.get(path).into_iter().flatten() {
        visit(dep, deps, order);
    }
    order.push(path);
}

/// "kernel/net/netfilter/nft_reject-inet.ko.xz" -> "nft_reject_inet", the name the
/// kernel uses (it treats '-' and '_' alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let (package, program) = match ext {
        "ko" => return fs::read(path).with_context(|| format!("reading {}", path.display())),
        "xz" => ("xz-utils", "xz"),
        "zst" => ("zstd", "zstd"),
        "gz" => ("gzip", "gzip"),
        _ => bail!("unknown module compression: {}", path.display()),
    };
    host::ensure_packages(&[package])?;
    host::output_bytes(Command::new(program).arg("-dc").arg(path))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// /init's lines that bring the offline CPUs online.
const ONLINE_CPUS: &str = r#"for c in /sys/devices/system/cpu/cpu[0-9]*/online; do
    [ "$(cat "$c")" = 1 ] || echo 1 > "$c" || warn "onlining $c failed"
done
"#;

fn init_script(init: &Init, insmods: &[String]) -> String {
    let mut env_vars = vec![
        "UDPMON_BIN=/bin/udpmon".to_string(),
        format!("UDPMON_TIER={}", sh_quote(&init.tier)),
        "RUST_BACKTRACE=1".to_string(),
    ];
    if let Ok(log) = env::var("RUST_LOG") {
        env_vars.push(format!("RUST_LOG={}", sh_quote(&log)));
    }
    let args: Vec<String> = init.args.iter().map(|a| sh_quote(a)).collect();
    let insmods: Vec<String> = insmods.iter().map(|m| sh_quote(m)).collect();
    format!(
        r#"#!/bin/sh
# Generated by xtask (vm): the whole userland of a udpmon VM run.
export PATH=/bin HOME=/root
warn() {{ echo "UDPMON-VM-WARN $*"; }}
mnt() {{ mkdir -p "$3"; mount -t "$1" "$2" "$3" || warn "mounting $1 on $3 failed"; }}
mnt proc proc /proc
mnt sysfs sysfs /sys
mnt devtmpfs devtmpfs /dev
mnt devpts devpts /dev/pts
mnt tmpfs tmpfs /dev/shm
mnt tmpfs tmpfs /run
mkdir -p /run/netns
mnt tracefs tracefs /sys/kernel/tracing
mnt debugfs debugfs /sys/kernel/debug
mnt bpf bpf /sys/fs/bpf
mnt cgroup2 cgroup2 /sys/fs/cgroup
hostname udpmon-vm
for m in {insmods}; do
    insmod "$m" || warn "insmod $m failed"
done
ip link set lo up || warn "lo is down"
{online}echo "UDPMON-VM-BOOTED release=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /tmp
{env_vars} /bin/{program} {args}
rc=$?
if [ "$rc" != 0 ]; then
    echo "--- dmesg tail ---"
    dmesg | tail -n 40
fi
echo "UDPMON-VM-RESULT rc=$rc"
sync
poweroff -f
"#,
        insmods = insmods.join(" "),
        env_vars = env_vars.join(" "),
        program = init.program_name,
        online = if init.online_cpus { ONLINE_CPUS } else { "" },
        args = args.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first() {
        let deps = parse_modules_dep(
            "kernel/net/nft_reject_inet.ko.xz: kernel/net/nf_reject_ipv4.ko.xz kernel/net/nft_reject.ko.xz kernel/net/nf_tables.ko.xz\n\
             kernel/net/nft_reject.ko.xz: kernel/net/nf_tables.ko.xz\n\
             kernel/net/nf_tables.ko.xz:\n\
             kernel/net/nf_reject_ipv4.ko.xz:\n",
        );
        let mut order = Vec::new();
        visit("kernel/net/nft_reject_inet.ko.xz", &deps, &mut order);
        let names: Vec<_> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "nf_reject_ipv4",
                "nf_tables",
                "nft_reject",
                "nft_reject_inet"
            ]
        );
    }

    #[test]
    fn init_runs_the_given_program() {
        let init = Init {
            tier: "vm-6.12".into(),
            program: PathBuf::from("/host/udpmon-tests"),
            program_name: "udpmon-tests".into(),
            args: vec!["--test-threads=1".into(), "it's".into()],
            online_cpus: false,
        };
        let script = init_script(&init, &["/lib/modules/r/veth.ko".into()]);
        assert!(script.contains("UDPMON_TIER='vm-6.12'"), "{script}");
        assert!(
            script.contains(r"/bin/udpmon-tests '--test-threads=1' 'it'\''s'"),
            "{script}"
        );
        assert!(
            script.contains("for m in '/lib/modules/r/veth.ko'; do"),
            "{script}"
        );
        assert!(
            script.contains("echo \"UDPMON-VM-RESULT rc=$rc\""),
            "{script}"
        );
        assert!(!script.contains("/sys/devices/system/cpu"), "{script}");
        let late = init_script(
            &Init {
                online_cpus: true,
                ..init
            },
            &[],
        );
        assert!(
            late.contains(&format!("{ONLINE_CPUS}echo \"UDPMON-VM-BOOTED")),
            "{late}"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
