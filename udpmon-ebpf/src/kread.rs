//! Reads of kernel memory at offsets taken from the running kernel's BTF (see `OFFSETS`).
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use udpmon_common::Counter;

use crate::maps::count;

/// Reads a `T` at `base + off`; counts and returns zero on failure so callers stay simple.
#[inline(always)]
pub fn read<T: Copy + Default>(base: u64, off: u32) -> T {
    // SAFETY: bpf_probe_read_kernel validates the address.
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) } {
        Ok(v) => v,
        Err(_) => {
            count(Counter::ReadFailed);
            T::default()
        }
    }
}

#[inline(always)]
pub fn read_buf(base: u64, off: u32, dst: &mut [u8]) {
    // SAFETY: as above.
    if unsafe { bpf_probe_read_kernel_buf((base + off as u64) as *const u8, dst) }.is_err() {
        count(Counter::ReadFailed);
    }
}

/// Like `read_buf`, but reports failure instead of counting it (packet parsing probes
/// addresses that may legitimately be out of the linear area).
#[inline(always)]
pub fn try_read_buf(addr: u64, dst: &mut [u8]) -> Option<()> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel_buf(addr as *const u8, dst) }.ok()
}
