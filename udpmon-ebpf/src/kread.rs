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

    /// A route's (`struct flowi4`, or `flowi6` when `v6`) source and destination addresses,
    /// as `Event` holds them, and its ports, in network order.
    #[inline(always)]
    fn route(fl: u64, v6: bool) -> Route {
        route_by_field::<Self>(fl, v6)
    }

    /// `skb->head` and `skb->data`.
    #[inline(always)]
    fn head_data(skb: u64) -> (u64, u64) {
        (
            Self::get(skb, off!(skb_head)),
            Self::get(skb, off!(skb_data)),
        )
    }
}

/// What [`Kernel::route`] returns.
pub struct Route {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn route_by_field<K: Kernel + ?Sized>(fl: u64, v6: bool) -> Route {
    let (s, d, ports) = if v6 {
        (off!(fl6_saddr), off!(fl6_daddr), off!(fl6_ports))
    } else {
        (off!(fl4_saddr), off!(fl4_daddr), off!(fl4_ports))
    };
    // `ports` is `fl_ip_dport` then `fl_ip_sport`, each a member of its own.
    Route {
        saddr: K::addr(fl, s, v6),
        daddr: K::addr(fl, d, v6),
        dport: K::get(fl, ports),
        sport: K::get(fl, ports + 2),
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

/// Where the kernel lays fields out next to each other, one `bpf_probe_read_kernel` reads
/// them together: each read is a helper call, most of a kprobe program's own cost per
/// datagram. The layouts are checked on the offsets, which the verifier knows as constants
/// (so it follows only the branch that applies); another layout is read a field at a time.
impl Kernel for Probe {
    #[inline(always)]
    fn get<T: Copy + Default>(base: u64, off: u32) -> T {
        read(base, off)
    }

    #[inline(always)]
    fn route(fl: u64, v6: bool) -> Route {
        if v6 {
            // daddr, saddr, flowlabel, then the ports.
            let d = off!(fl6_daddr);
            if off!(fl6_saddr) == d + 16 && off!(fl6_ports) == d + 36 {
                let mut b = [0u8; 40];
                read_buf(fl, d, &mut b);
                let mut r = Route {
                    saddr: [0; 16],
                    daddr: [0; 16],
                    dport: u16::from_ne_bytes([b[36], b[37]]),
                    sport: u16::from_ne_bytes([b[38], b[39]]),
                };
                r.daddr.copy_from_slice(&b[..16]);
                r.saddr.copy_from_slice(&b[16..32]);
                return r;
            }
        } else {
            // saddr, daddr, then the ports.
            let s = off!(fl4_saddr);
            if off!(fl4_daddr) == s + 4 && off!(fl4_ports) == s + 8 {
                let mut b = [0u8; 12];
                read_buf(fl, s, &mut b);
                let mut r = Route {
                    saddr: [0; 16],
                    daddr: [0; 16],
                    dport: u16::from_ne_bytes([b[8], b[9]]),
                    sport: u16::from_ne_bytes([b[10], b[11]]),
                };
                r.saddr[..4].copy_from_slice(&b[..4]);
                r.daddr[..4].copy_from_slice(&b[4..8]);
                return r;
            }
        }
        route_by_field::<Self>(fl, v6)
    }

    #[inline(always)]
    fn head_data(skb: u64) -> (u64, u64) {
        let (head, data) = (off!(skb_head), off!(skb_data));
        if data == head + 8 {
            let [head, data]: [u64; 2] = read(skb, head);
            return (head, data);
        }
        (read(skb, head), read(skb, data))
    }
}
