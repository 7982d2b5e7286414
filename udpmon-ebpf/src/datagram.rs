//! Datagram hooks of the tracepoint/cgroup strategy: cgroup_skb egress and ingress on the
//! cgroup-v2 root see every datagram a UDP socket sends or receives, with both addresses
//! and the socket cookie, on every kernel since 4.10.
//!
//! They also see every packet of every other protocol on the host (each TCP segment, both
//! ways), so the protocol is decided from the packet's own bytes before any helper call or
//! map access, and a UDP datagram's headers are then copied once into aligned words: byte
//! arrays here cost a byte-at-a-time memset and copy loop each in BPF.
use core::mem::MaybeUninit;

use crate::{
    flow::{Datagram, Dir, on_datagram},
    packet::{HDR_WORDS, IPPROTO_UDP, udp_words},
};
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_socket_cookie, bpf_skb_load_bytes},
    programs::SkBuffContext,
};

/// IPv4 header without options and UDP header.
const HDRS4: u32 = 28;

/// cgroup_skb: offset 0 is the IP header. Egress of a UDP datagram runs in the sender's
/// syscall (or a kernel worker for corked sends); ingress runs in softirq. `sent_by` gets a
/// UDP datagram's socket cookie before the datagram is counted.
#[inline(always)]
pub fn on_skb(ctx: &SkBuffContext, dir: Dir, sent_by: impl FnOnce(u64)) {
    let skb = ctx.skb.skb;
    // SAFETY: the context's skb; data/data_end are the verifier-checked packet bounds.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // The version and protocol bytes are linear for every packet cgroup_skb sees.
    if data + 10 > end {
        return;
    }
    // SAFETY: within [data, data_end), checked above.
    let (vihl, proto4, proto6) = unsafe {
        (
            *(data as *const u8),
            *((data + 9) as *const u8),
            *((data + 6) as *const u8),
        )
    };
    let v6 = match vihl >> 4 {
        4 if proto4 == IPPROTO_UDP => false,
        6 if proto6 == IPPROTO_UDP => true,
        _ => return,
    };
    // A block, so that the raw words' stack room is free again for the flow's (the verifier
    // allows 5.10's egress program just that much).
    let u = {
        // Words, not bytes, and left uninitialised for the helper to fill: zeroing it would
        // be a call to a byte-at-a-time memset.
        let mut h = MaybeUninit::<[u32; HDR_WORDS]>::uninit();
        let w = h.as_mut_ptr() as *mut u32;
        let ihl = (vihl & 0x0f) as u32 * 4;
        let loaded = if v6 {
            load(skb, 0, w, HDR_WORDS as u32 * 4)
        } else if ihl == 20 {
            load(skb, 0, w, HDRS4)
        } else {
            // IPv4 options: the UDP header goes where it would be without them.
            // SAFETY: word 5 of 12.
            load(skb, 0, w, 20) && load(skb, ihl, unsafe { w.add(5) }, 8)
        };
        if !loaded {
            return;
        }
        // SAFETY: only words the helper wrote are read (IPv4: 0..7, IPv6: 0..12).
        udp_words(|i| unsafe { w.add(i).read() }, v6)
    };
    // SAFETY: the helper accepts the program's own skb context.
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut _) };
    sent_by(cookie);
    let d = Datagram::from_headers(&u, dir, cookie, 0);
    on_datagram(&d, dir, false);
}

/// `len` bytes of the packet at `off` into `dst`.
#[inline(always)]
fn load(skb: *mut __sk_buff, off: u32, dst: *mut u32, len: u32) -> bool {
    // SAFETY: callers pass room for `len` bytes; the helper checks the skb bounds.
    unsafe { bpf_skb_load_bytes(skb as *const _, off, dst as *mut _, len) == 0 }
}
