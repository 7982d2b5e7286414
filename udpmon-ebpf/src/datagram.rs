//! Datagram hooks of the tracepoint/cgroup strategy: cgroup_skb egress and ingress on the
//! cgroup-v2 root see every datagram a UDP socket sends or receives, with both addresses
//! and the socket cookie, on every kernel since 4.10.
use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_skb_load_bytes},
    programs::SkBuffContext,
};

use crate::{
    flow::{Datagram, Dir, on_datagram},
    packet::{Bytes, IPPROTO_UDP, l3, udp},
};

struct Skb<'a>(&'a SkBuffContext);

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn copy(&self, off: u32, dst: &mut [u8]) -> Option<()> {
        // Direct packet access when the bytes are in the linear area (the common case, and
        // no helper call: this runs for every datagram); the helper otherwise.
        // SAFETY: the context's skb; data/data_end are the verifier-checked packet bounds.
        let (data, end) = unsafe {
            (
                (*self.0.skb.skb).data as usize,
                (*self.0.skb.skb).data_end as usize,
            )
        };
        let start = data + (off as usize & 0xff);
        if start + dst.len() <= end {
            for (i, b) in dst.iter_mut().enumerate() {
                // SAFETY: within [data, data_end), checked above.
                *b = unsafe { *((start + i) as *const u8) };
            }
            return Some(());
        }
        // The helper directly, with the constant length: aya's `load_bytes` clamps the
        // length to what is left of the packet, which the verifier sees as possibly zero.
        // SAFETY: `dst` is valid for `dst.len()` bytes; the helper checks the skb bounds.
        let rc = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const _,
                off,
                dst.as_mut_ptr() as *mut _,
                dst.len() as u32,
            )
        };
        (rc == 0).then_some(())
    }
}

/// cgroup_skb: offset 0 is the IP header. `in_task`: egress of a UDP datagram runs in the
/// sender's syscall (or a kernel worker for corked sends); ingress runs in softirq.
#[inline(always)]
pub fn on_skb(ctx: &SkBuffContext, dir: Dir) {
    let b = Skb(ctx);
    let Some(ip) = l3(&b, 0) else { return };
    if ip.proto != IPPROTO_UDP {
        return;
    }
    let Some((sport, dport, bytes)) = udp(&b, ip.l4_off) else {
        return;
    };
    // SAFETY: the helper accepts the program's own skb context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let d = match dir {
        Dir::Tx => Datagram {
            cookie,
            family: ip.family,
            local: ip.saddr,
            remote: ip.daddr,
            lport: sport,
            rport: dport,
            bytes,
            sk: 0,
        },
        Dir::Rx => Datagram {
            cookie,
            family: ip.family,
            local: ip.daddr,
            remote: ip.saddr,
            lport: dport,
            rport: sport,
            bytes,
            sk: 0,
        },
    };
    on_datagram(&d, dir, false);
}
