//! What the kernel counts about udpmon's own programs and links: runs it skipped, which are
//! events or counts lost. aya's info types keep these fields private, so the bpf() commands
//! are made here.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_prog_info};

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is valid for every command made here and outlives the call; any pointer
    // it carries points to memory the caller keeps alive across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as i32,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_OBJ_GET_INFO_BY_FD. A kernel older than `T` fills only the fields it knows and
/// leaves the rest zero.
fn obj_info<T: Copy>(fd: BorrowedFd<'_>) -> io::Result<T> {
    // SAFETY: both are plain C structs (T is one of the bpf_*_info types) for which all-zero
    // is valid.
    let (mut info, mut attr): (T, bpf_attr) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // The `info` member of the union is the one the kernel reads for this command.
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = &raw mut info as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Runs of a program the kernel skipped because it was already running on that CPU (a
/// tracing program reached again from inside itself, e.g. through an interrupt). Kernels
/// before 5.12 do not count them (0).
pub fn prog_recursion_misses(prog: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(obj_info::<bpf_prog_info>(prog)?.recursion_misses)
}

/// A kprobe or kretprobe link, held by an fd of udpmon's own (opened by id: aya's link type
/// does not lend its fd), so that its kernel counters can be read. The probe stays attached
/// while this fd is open.
pub struct KprobeLink(OwnedFd);

impl KprobeLink {
    pub fn open(link_id: u32) -> io::Result<Self> {
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.__bindgen_anon_6.__bindgen_anon_1.link_id = link_id;
        let fd = bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr)?;
        // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Hits the probe could not serve: a kprobe re-entered on its CPU, or a kretprobe whose
    /// instances were all in use (more threads inside the function than it has instances).
    /// Kernels before 6.7 do not report it (0).
    pub fn missed(&self) -> io::Result<u64> {
        let info: bpf_link_info = obj_info(self.0.as_fd())?;
        // SAFETY: a kprobe link is a perf_event link; the kernel fills this member for it.
        Ok(unsafe {
            info.__bindgen_anon_1
                .perf_event
                .__bindgen_anon_1
                .kprobe
                .missed
        })
    }
}
