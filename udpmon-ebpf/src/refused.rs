//! The mirror of the seed's server side: datagrams that reach a local port with no socket
//! (the kernel answers them with ICMP port unreachable, rate limits permitting).
use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use udpmon_common::{Counter, EventKind, event::flags};

use crate::{
    icmp::{Kmem, skb_l3, skb_netns},
    maps::{NO_SOCKET_SEEN, SOFTIRQ, TupleKey, count, emit, offsets, scratch_event},
    packet::{IPPROTO_UDP, l3, udp},
};

/// A peer that keeps sending is reported at most once a second per tuple; the suppressed
/// ones are counted.
const REPORT_EVERY_NS: u64 = 1_000_000_000;

/// tp_btf kfree_skb: `reason` is `enum skb_drop_reason` (resolved from BTF by userspace).
#[inline(always)]
pub fn on_drop(skb: u64, reason: u32) {
    if reason != offsets().drop_reason_no_socket {
        return;
    }
    let b = Kmem(skb_l3(skb));
    let Some(ip) = l3(&b, 0) else { return };
    if ip.proto != IPPROTO_UDP {
        return;
    }
    let Some((sport, dport, bytes)) = udp(&b, ip.l4_off) else {
        return;
    };
    // SAFETY: BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let tk = TupleKey {
        remote: ip.saddr,
        lport: dport,
        rport: sport,
        family: ip.family,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(last) = unsafe { NO_SOCKET_SEEN.get(tk) }
        && now.saturating_sub(*last) < REPORT_EVERY_NS
    {
        count(Counter::NoSocketSuppressed);
        return;
    }
    let _ = NO_SOCKET_SEEN.insert(tk, now, 0);
    let Some(ev) = scratch_event(SOFTIRQ) else {
        return;
    };
    ev.kind = EventKind::NoSocket as u16;
    ev.family = ip.family;
    ev.flags = flags::TASK_UNRELATED;
    ev.ts_ns = now;
    ev.netns = skb_netns(skb);
    ev.local = ip.daddr;
    ev.remote = ip.saddr;
    ev.lport = dport;
    ev.rport = sport;
    ev.ret = bytes as i32;
    emit(ev);
}
