//! VM test tier: the test binary runs as the only program of a busybox initramfs booted
//! under qemu on Debian cloud kernels, because the host kernel refuses the fentry and
//! kprobe programs that production kernels allow (see ../shared/TOOLCHAIN.md). The bench
//! (`cargo xtask bench --vm`) boots the same VMs with a static xtask as that program
//! ([`run_program_in_vm`]).
//!
//! qemu runs with TCG (software emulation): KVM aborts or hangs on these machines.
//!
//! What a test finds in the VM: root, no network beyond lo (build veth pairs and
//! netns), proc/sys/devtmpfs/tracefs/debugfs/bpffs/cgroup2 mounted, veth and the nftables
//! reject modules loaded, `ip nc socat nft dig dnsmasq` from the host (each left out with
//! a warning when the host lacks it), /bin/sh = dash, and busybox for everything else.
//! Busybox runs its own applets in preference to PATH when it execs (`xargs`, `nsenter`,
//! `setsid`, `chroot`...), so through those, name tools by path: `/bin/ip`, `/bin/nc`.

mod cpio;
mod host;
mod initramfs;
mod kernels;
mod qemu;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// The VM matrix `cargo xtask test` runs: Debian's 5.10 (bullseye), 6.1 and 6.12 (bookworm),
/// and the newest from unstable.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "7.x"];

/// A kernel unpacked in the cache, ready to boot.
#[derive(Debug, Clone)]
pub struct VmKernel {
    /// Series name as requested: "5.10", "6.1", "6.12" or "7.x".
    pub name: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package, with a `modules.dep` made by depmod.
    pub modules_dir: PathBuf,
    /// `uname -r` inside the VM, e.g. "6.1.0-56-cloud-amd64".
    pub release: String,
}

/// The outcome of one boot.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// Series name of the kernel that ran.
    pub kernel: String,
    /// The result marker was seen with rc=0 before the timeout.
    pub passed: bool,
    /// The libtest "test result:" lines and the `UDPMON-VM-*` marker lines, in order.
    pub summary: Vec<String>,
    /// The whole serial console (and qemu's own stderr).
    pub log: PathBuf,
}

/// Downloads (apt-get download) and unpacks (dpkg-deb -x) the newest Debian cloud kernel
/// of each requested series into `$UDPMON_CACHE/kernels` (default
/// `~/.cache/udpmon/kernels`), reusing what is already there.
///
/// Series: "6.1" and "6.12" from the host's bookworm / bookworm-security lists, "5.10" from
/// bullseye and bullseye-security and "7.x" from unstable through private apt configurations
/// under the cache dir (/etc/apt is never touched). Host tools (kmod for depmod) are installed with apt-get when missing.
pub fn ensure_kernels(series: &[&str]) -> Result<Vec<VmKernel>> {
    let dir = host::cache_root()?.join("kernels");
    series
        .iter()
        .map(|name| kernels::ensure(&dir, name).with_context(|| format!("kernel series {name}")))
        .collect()
}

/// Builds an initramfs around `test_bin` and `udpmon_bin` (static binaries; dynamic ones
/// get their libraries too) for `kernel`, boots it, runs
/// `UDPMON_BIN=/bin/udpmon /bin/udpmon-tests --test-threads=1 <test_args>` with
/// `UDPMON_TIER=vm-<kernel>` and powers off. qemu is killed after `timeout`.
///
/// The console goes to `<target>/vm/<kernel>/console.log` and is echoed to stdout
/// prefixed with `[vm <kernel>] `.
pub fn run_in_vm(
    kernel: &VmKernel,
    udpmon_bin: &Path,
    test_bin: &Path,
    test_args: &[String],
    timeout: Duration,
) -> Result<VmRun> {
    let mut args = vec!["--test-threads=1".to_string()];
    args.extend(test_args.iter().cloned());
    run_program_in_vm(
        kernel,
        udpmon_bin,
        &GuestProgram {
            work_dir: "vm",
            tier: format!("vm-{}", kernel.name),
            program: test_bin.to_path_buf(),
            name: "udpmon-tests".into(),
            args,
            late_cpus: false,
            // One: with two, a VM now and then broke while one vCPU ran kernel text that the
            // other was live-patching (a tracepoint's static key flipped as udpmon attached or
            // detached while a namespace was torn down): an int3 Oops in consume_skb on 7.x
            // (stop 18), a netns-teardown kworker in a two-minute soft lockup on 6.1 (stop
            // 19). Never seen on the host's real CPUs; taken for multi-threaded TCG's
            // cross-modifying code. Two CPUs are the host tier's and the bench's to exercise.
            cpus: 1,
            boot_timeout: None,
            qemu_args: Vec::new(),
        },
        timeout,
    )
}

/// What a VM's /init runs (the system tests, or the bench's guest) and how the VM boots.
pub struct GuestProgram {
    /// Directory under the target dir for the initramfs and console log:
    /// `<target>/<work_dir>/<kernel>/`.
    pub work_dir: &'static str,
    /// `UDPMON_TIER` in its environment.
    pub tier: String,
    /// A static binary on the host, copied to `/bin/<name>`.
    pub program: PathBuf,
    pub name: String,
    pub args: Vec<String>,
    /// Boot on one CPU (`maxcpus=1`) and bring the others online from /init: under qemu's
    /// icount (single-threaded TCG), 6.1 hangs bringing up a second CPU at boot
    /// ("x86: Booting SMP configuration:") but not when the CPU is hot-plugged later.
    pub late_cpus: bool,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Give up early when the kernel has not started /init by then (a kernel that hangs
    /// on this qemu configuration).
    pub boot_timeout: Option<Duration>,
    /// Added to qemu's command line.
    pub qemu_args: Vec<String>,
}

/// Like [`run_in_vm`] with any program as the VM's only job: /init runs
/// `UDPMON_BIN=/bin/udpmon /bin/<name> <args>`, then reports its exit code in the
/// `UDPMON-VM-RESULT` marker and powers off. Console lines carrying a `UDPMON-VM-` marker
/// come back in [`VmRun::summary`]; `UDPMON-VM-DATA` lines are collected and logged but not
/// echoed.
pub fn run_program_in_vm(
    kernel: &VmKernel,
    udpmon_bin: &Path,
    guest: &GuestProgram,
    timeout: Duration,
) -> Result<VmRun> {
    let work = host::target_dir().join(guest.work_dir).join(&kernel.name);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let initrd = work.join("initrd.cpio");
    let log = work.join("console.log");

    let init = initramfs::Init {
        tier: guest.tier.clone(),
        program: guest.program.clone(),
        program_name: guest.name.clone(),
        args: guest.args.clone(),
        online_cpus: guest.late_cpus,
    };
    initramfs::build(kernel, udpmon_bin, &init, &initrd)
        .with_context(|| format!("building the initramfs for {}", kernel.name))?;

    let outcome = qemu::boot(
        kernel,
        &initrd,
        &log,
        &qemu::Machine {
            timeout,
            boot_timeout: guest.boot_timeout,
            kernel_args: if guest.late_cpus { "maxcpus=1" } else { "" },
            extra_args: &guest.qemu_args,
            cpus: guest.cpus,
        },
    )?;
    Ok(VmRun {
        kernel: kernel.name.clone(),
        passed: outcome.rc == Some(0),
        summary: outcome.summary,
        log,
    })
}
