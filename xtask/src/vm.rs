//! VM test tier: the test binary runs as the only program of a busybox initramfs booted
//! under qemu on Debian cloud kernels, because the host kernel refuses the fentry and
//! kprobe programs that production kernels allow (see ../shared/TOOLCHAIN.md).
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

/// The VM matrix `cargo xtask test` runs: Debian's 6.1 and 6.12 (bookworm), and the newest
/// from unstable.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "7.x"];

/// A kernel unpacked in the cache, ready to boot.
#[derive(Debug, Clone)]
pub struct VmKernel {
    /// Series name as requested: "6.1", "6.12" or "7.x".
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
/// Series: "6.1" and "6.12" from the host's bookworm / bookworm-security lists, "7.x" from
/// unstable through a private apt configuration under the cache dir (/etc/apt is never
/// touched). Host tools (kmod for depmod) are installed with apt-get when missing.
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
    let work = host::target_dir().join("vm").join(&kernel.name);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let initrd = work.join("initrd.cpio");
    let log = work.join("console.log");

    let init = initramfs::Init {
        tier: format!("vm-{}", kernel.name),
        test_args: test_args.to_vec(),
    };
    initramfs::build(kernel, udpmon_bin, test_bin, &init, &initrd)
        .with_context(|| format!("building the initramfs for {}", kernel.name))?;

    let outcome = qemu::boot(kernel, &initrd, &log, timeout)?;
    Ok(VmRun {
        kernel: kernel.name.clone(),
        passed: outcome.rc == Some(0),
        summary: outcome.summary,
        log,
    })
}
