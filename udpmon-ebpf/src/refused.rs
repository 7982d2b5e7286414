//! The mirror of the seed's server side: datagrams that reach a local port with no socket
//! (the kernel answers them with ICMP port unreachable, rate limits permitting).
use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use udpmon_common::{Counter, EventKind, event::flags};

use crate::{
    icmp::{Kmem, skb_l3, skb_netns},
    maps::{NO_SOCKET_BUDGET, NO_SOCKET_SEEN, TupleKey, count, emit, off},
    packet::{IPPROTO_UDP, l3, udp},
};

/// A peer that keeps sending is reported at most once a second per tuple; the suppressed
/// ones are counted.
const REPORT_EVERY_NS: u64 = 1_000_000_000;
/// And at most this many tuples a second per CPU: a flood from random sources or to random
/// ports must not fill the ring buffer and push out every other event.
const REPORTS_PER_SEC_PER_CPU: u64 = 256;

/// tp_btf kfree_skb: `reason` is `enum skb_drop_reason` (resolved from BTF by userspace).
#[inline(always)]
pub fn on_drop(skb: u64, reason: u32) {
    if reason != off!(drop_reason_no_socket) {
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
        local: ip.daddr,
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
    if !within_budget(now) {
        count(Counter::NoSocketSuppressed);
        return;
    }
    let _ = NO_SOCKET_SEEN.insert(tk, now, 0);
    emit(|ev| {
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
        true
    });
}

/// Takes one report from this CPU's budget for the current second.
#[inline(always)]
fn within_budget(now: u64) -> bool {
    let Some(b) = NO_SOCKET_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot; the kernel never runs a tracing program nested in itself on one
    // CPU (it skips the inner run and counts a recursion miss).
    let b = unsafe { &mut *b };
    if now.saturating_sub(b.window_ns) >= 1_000_000_000 {
        b.window_ns = now;
        b.used = 0;
    }
    b.used += 1;
    b.used <= REPORTS_PER_SEC_PER_CPU
}
