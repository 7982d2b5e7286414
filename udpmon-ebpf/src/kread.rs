//! Reads of kernel memory at offsets taken from the running kernel's BTF (see `OFFSETS`).
//!
//! Code shared by the fentry and the kprobe strategies reads structures through [`Kernel`]:
//! fentry's pointers are BTF-typed, so a field is one plain load ([`Btf`]); a kprobe's are
//! raw, so each read is a bpf_probe_read_kernel call ([`Probe`]).
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use udpmon_common::Counter;

use crate::maps::{count, off};

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

/// `sk->__sk_common.skc_net.net->ns.inum`.
#[inline(always)]
pub fn sock_netns(sk: u64) -> u32 {
    let net: u64 = read(sk, off!(skc_net));
    if net == 0 {
        return 0;
    }
    read(net, off!(net_ns_inum))
}

/// How a hook reads fields of kernel structures. `off` must be an `off!` offset: [`Btf`]
/// needs it to be a verifier-known constant.
pub trait Kernel {
    fn get<T: Copy + Default>(base: u64, off: u32) -> T;

    /// An address field (`__be32`, or `struct in6_addr` when `v6`) as `Event` holds it.
    #[inline(always)]
    fn addr(base: u64, off: u32, v6: bool) -> [u8; 16] {
        // Word loads: each lands on a member the verifier knows (in6_addr.s6_addr32[i]).
        let w = if v6 {
            [
                Self::get::<u32>(base, off),
                Self::get::<u32>(base, off + 4),
                Self::get::<u32>(base, off + 8),
                Self::get::<u32>(base, off + 12),
            ]
        } else {
            [Self::get::<u32>(base, off), 0, 0, 0]
        };
        crate::packet::addr_bytes(w)
    }
}

/// BTF-typed pointers (fentry/fexit and tp_btf arguments, and pointers loaded from them).
pub struct Btf;

impl Kernel for Btf {
    #[inline(always)]
    fn get<T: Copy + Default>(base: u64, off: u32) -> T {
        crate::maps::field(base, off)
    }
}

/// Raw pointers (kprobes).
pub struct Probe;

impl Kernel for Probe {
    #[inline(always)]
    fn get<T: Copy + Default>(base: u64, off: u32) -> T {
        read(base, off)
    }
}
