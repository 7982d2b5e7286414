//! ICMP errors: which flow they are about, and whether the application was told.
//!
//! All three steps run synchronously on one CPU in the ICMP's softirq, so a per-CPU slot
//! carries the error from one hook to the next:
//! 1. `begin` when the ICMP error is parsed (tp_btf netif_receive_skb in the tracepoint
//!    strategy, entry of icmp_rcv/icmpv6_rcv with trampolines or kprobes);
//! 2. `on_error_report` from tp_btf inet_sk_error_report, which fires only when the kernel
//!    sets sk_err or queues the error (KERNEL.md §3): that gives the socket and the verdict;
//! 3. `finish` when the ICMP skb is freed (tracepoint strategy) or icmp_rcv/icmpv6_rcv
//!    return (the UDP error handler, which ties the error to its socket, runs inside them).
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns};
use udpmon_common::{
    Event, EventKind,
    event::{AF_INET, flags, verdict},
};

use crate::{
    flow::fill_identity,
    kread::read,
    maps::{PENDING_ICMP, PendingIcmp, SENDERS, TupleKey, emit, offsets},
    packet::{Bytes, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, l3, udp},
};

/// Kernel memory from a base address, read with bpf_probe_read_kernel.
pub struct Kmem(pub u64);

impl Bytes for Kmem {
    #[inline(always)]
    fn copy(&self, off: u32, dst: &mut [u8]) -> Option<()> {
        crate::kread::try_read_buf(self.0 + off as u64, dst)
    }
}

/// `skb->head + skb->network_header`: the L3 header, valid from receive to free.
#[inline(always)]
pub fn skb_l3(skb: u64) -> u64 {
    let o = offsets();
    let head: u64 = read(skb, o.skb_head);
    let nh: u16 = read(skb, o.skb_network_header);
    head + nh as u64
}

/// The netns inode of the device an skb arrived on.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let o = offsets();
    let dev: u64 = read(skb, o.skb_dev);
    if dev == 0 {
        return 0;
    }
    let net: u64 = read(dev, o.dev_nd_net);
    if net == 0 {
        return 0;
    }
    read(net, o.net_ns_inum)
}

/// Is this ICMP type an error that carries the offending datagram?
#[inline(always)]
fn is_error(proto: u8, ty: u8) -> bool {
    if proto == IPPROTO_ICMP {
        ty == 3 || ty == 11 || ty == 12
    } else {
        (1..=4).contains(&ty)
    }
}

/// Tracepoint strategy (tp_btf netif_receive_skb): every received packet. At this
/// tracepoint `skb->data` is the L3 header: one read instead of head + offset.
#[inline(always)]
pub fn on_receive(skb: u64) {
    on_packet(skb, &Kmem(read(skb, offsets().skb_data)));
}

/// Trampoline/kprobe strategies: entry of icmp_rcv/icmpv6_rcv, where `skb->data` is
/// already past the IP header, so the L3 header is found from `network_header`.
#[inline(always)]
pub fn on_icmp_rcv(skb: u64) {
    on_packet(skb, &Kmem(skb_l3(skb)));
}

/// Starts tracking a packet (its L3 header at `b`) if it is an ICMP error about a UDP
/// datagram.
#[inline(always)]
fn on_packet(skb: u64, b: &Kmem) {
    // This can run for every packet the host receives: look at the protocol byte alone
    // before parsing anything (IPv4: byte 9; IPv6: next header, byte 6).
    let mut h = [0u8; 10];
    if b.copy(0, &mut h).is_none() {
        return;
    }
    let proto = match h[0] >> 4 {
        4 => h[9],
        6 => h[6],
        _ => return,
    };
    if proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6 {
        return;
    }
    let Some(outer) = l3(b, 0) else { return };
    if outer.proto != IPPROTO_ICMP && outer.proto != IPPROTO_ICMPV6 {
        return;
    }
    let mut icmp = [0u8; 2];
    if b.copy(outer.l4_off, &mut icmp).is_none() || !is_error(outer.proto, icmp[0]) {
        return;
    }
    // The offending datagram follows the 8-byte ICMP header.
    begin(
        skb,
        b,
        outer.l4_off + 8,
        icmp[0],
        icmp[1],
        &outer.saddr,
        skb_netns(skb),
    );
}

#[inline(always)]
fn begin<B: Bytes>(skb: u64, b: &B, inner_off: u32, ty: u8, code: u8, from: &[u8; 16], netns: u32) {
    let Some(inner) = l3(b, inner_off) else {
        return;
    };
    if inner.proto != IPPROTO_UDP {
        return;
    }
    let Some((sport, dport, _)) = udp(b, inner.l4_off) else {
        return;
    };
    let Some(slot) = PENDING_ICMP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot; softirq processing on this CPU is not re-entered.
    let slot = unsafe { &mut *slot };
    if slot.skb != 0 {
        flush(slot);
    }
    let mut ev = Event::zeroed();
    ev.kind = EventKind::Icmp as u16;
    ev.family = inner.family;
    // SAFETY: BPF helper without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    ev.netns = netns;
    // The inner datagram is one we sent: its source is us, its destination the peer.
    ev.local = inner.saddr;
    ev.remote = inner.daddr;
    ev.lport = sport;
    ev.rport = dport;
    ev.icmp_type = ty;
    ev.icmp_code = code;
    ev.icmp_from = *from;
    let tk = TupleKey {
        remote: inner.daddr,
        lport: sport,
        rport: dport,
        family: inner.family,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(c) = unsafe { SENDERS.get(tk) } {
        ev.cookie = *c;
    }
    *slot = PendingIcmp { skb, event: ev };
}

/// tp_btf inet_sk_error_report: the kernel told (or queued for) the socket.
#[inline(always)]
pub fn on_error_report(sk: u64) {
    let Some(slot) = PENDING_ICMP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, see `begin`.
    let slot = unsafe { &mut *slot };
    if slot.skb == 0 {
        // Not an ICMP we parsed (e.g. `ss -K` aborting a socket).
        return;
    }
    let o = offsets();
    let lport: u16 = read(sk, o.skc_num);
    if lport != slot.event.lport {
        return;
    }
    let qlen: u32 = read(sk, o.sk_error_queue_qlen);
    let err: i32 = read(sk, o.sk_err);
    let state: u8 = read(sk, o.skc_state);
    let ev = &mut slot.event;
    // SAFETY: `sk` is the tracepoint's trusted socket pointer.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
    // With IP_RECVERR the report fires twice: first for the queued error (sk_err still 0),
    // then with sk_err set.
    if qlen > 0 {
        ev.verdict = verdict::QUEUED;
        ev.flags |= flags::RECVERR;
    } else if err != 0 && ev.verdict != verdict::QUEUED {
        ev.verdict = verdict::NOTIFIED;
    }
    if err != 0 {
        ev.icmp_errno = err as u32;
    }
    if state == 1 {
        ev.flags |= flags::CONNECTED;
    }
}

/// End of the ICMP's processing: emit it with its verdict.
#[inline(always)]
pub fn on_skb_freed(skb: u64) {
    let Some(slot) = PENDING_ICMP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, see `begin`.
    let slot = unsafe { &mut *slot };
    if slot.skb != 0 && slot.skb == skb {
        flush(slot);
    }
}

/// kretprobe of icmp_rcv/icmpv6_rcv: no skb at return, but the slot can only hold this call's error.
#[inline(always)]
pub fn on_handler_done() {
    let Some(slot) = PENDING_ICMP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, see `begin`.
    let slot = unsafe { &mut *slot };
    if slot.skb != 0 {
        flush(slot);
    }
}

#[inline(always)]
fn flush(slot: &mut PendingIcmp) {
    slot.skb = 0;
    let ev = &mut slot.event;
    if ev.verdict == 0 {
        ev.verdict = if ev.cookie != 0 {
            verdict::DISCARDED
        } else {
            verdict::NO_SOCKET
        };
    }
    if ev.family == 0 {
        ev.family = AF_INET;
    }
    if !fill_identity(ev, false) {
        return;
    }
    emit(ev);
}
