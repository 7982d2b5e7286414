//! ICMP errors: which flow they are about, and whether the application was told. The same
//! two tracepoints serve every strategy, and neither does more than a check for ordinary
//! traffic:
//! 1. tp_btf inet_sk_error_report fires only when the kernel sets sk_err or queues the error
//!    on a socket (KERNEL.md §3), inside the UDP error handler: `on_error_report` keeps what
//!    it says in a per-CPU slot;
//! 2. the ICMP skb is freed (consume_skb, or kfree_skb) as soon as icmp_rcv/icmpv6_rcv are
//!    done with it, on the same CPU: `on_skb_freed` recognises it, parses the datagram it
//!    quotes and reports the error with the slot's verdict if the slot is about that
//!    datagram's socket, else as told to no socket, with no cookie: userspace finds the
//!    flow among those it tracks (the error was discarded) or finds none (no socket). One
//!    skb is handled at a time from report to free, so two errors in one NAPI batch cannot
//!    take each other's verdict.
//!
//! The kernel drops an error it found a socket for but did not tell (a socket without
//! IP_RECVERR that is unconnected, or connected and the error not fatal) without saying
//! which socket: a map from each flow's addresses to its socket, filled at every first send,
//! would say, but its insert was half the egress program's time per new flow, and userspace
//! knows every flow it tracks by those addresses.
use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use udpmon_common::{
    EventKind,
    event::{flags, verdict},
};

use crate::{
    kread::{Kernel, read},
    maps::{ERROR_REPORT, ErrorReport, emit, field, off},
    owner::fill_identity,
    packet::{Bytes, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, l3, udp},
};

/// A report and the free of the ICMP skb it is about happen in one softirq on one CPU,
/// microseconds apart on bare metal, but a virtual CPU can be descheduled in between for
/// milliseconds (seen under qemu). The slot is emptied whenever an ICMP error about a UDP
/// datagram is freed, so a stale report can only come from a cause other than an ICMP (`ss -K`
/// aborting a socket) and only matter for an error the kernel then discards on that same
/// local port within this window.
const REPORT_VALID_NS: u64 = 100_000_000;

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
    let head: u64 = read(skb, off!(skb_head));
    let nh: u16 = read(skb, off!(skb_network_header));
    head + nh as u64
}

/// The netns inode of the device an skb arrived on.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let dev: u64 = read(skb, off!(skb_dev));
    if dev == 0 {
        return 0;
    }
    let net: u64 = read(dev, off!(dev_nd_net));
    if net == 0 {
        return 0;
    }
    read(net, off!(net_ns_inum))
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

/// tp_btf consume_skb and kfree_skb: the skbs icmp_rcv and icmpv6_rcv free, where the
/// tracepoint says who frees (`ICMP_FREE_CALLERS`), else every skb the kernel frees, on every
/// strategy: each packet a NIC transmits, and the received skbs a socket frees on another CPU
/// than the one they arrived on. So plain loads rule out all but ICMP errors before any
/// helper call: an ICMP skb belongs to no socket, still has its route, and its data starts
/// right after the 8-byte ICMP header (icmp_rcv and icmpv6_rcv pull it, leaving `data` at the
/// quoted datagram). Transmitted skbs have a socket or an L2 header at `data`; deferred
/// received ones have had their route dropped.
#[inline(always)]
pub fn on_skb_freed(skb: u64) {
    let sk: u64 = field(skb, off!(skb_sk));
    let dst: u64 = field(skb, off!(skb_refdst));
    if sk != 0 || dst == 0 {
        return;
    }
    let head: u64 = field(skb, off!(skb_head));
    let data: u64 = field(skb, off!(skb_data));
    let th: u16 = field(skb, off!(skb_transport_header));
    if data != head + th as u64 + 8 {
        return;
    }
    let nh: u16 = field(skb, off!(skb_network_header));
    let Some(outer) = l3(&Kmem(head + nh as u64), 0) else {
        return;
    };
    if outer.proto != IPPROTO_ICMP && outer.proto != IPPROTO_ICMPV6 {
        return;
    }
    let mut icmp = [0u8; 2];
    if Kmem(head + th as u64).copy(0, &mut icmp).is_none() || !is_error(outer.proto, icmp[0]) {
        return;
    }
    let b = Kmem(data);
    let Some(inner) = l3(&b, 0) else {
        return;
    };
    if inner.proto != IPPROTO_UDP {
        return;
    }
    let Some((sport, dport, _)) = udp(&b, inner.l4_off) else {
        return;
    };
    // SAFETY: BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let report = take_report(sport, now);
    emit(|ev| {
        ev.kind = EventKind::Icmp as u16;
        ev.family = inner.family;
        ev.ts_ns = now;
        ev.netns = skb_netns(skb);
        // The quoted datagram is one we sent: its source is us, its destination the peer.
        ev.local = inner.saddr;
        ev.remote = inner.daddr;
        ev.lport = sport;
        ev.rport = dport;
        ev.icmp_type = icmp[0];
        ev.icmp_code = icmp[1];
        ev.icmp_from = outer.saddr;
        if let Some(r) = report {
            ev.cookie = r.cookie;
            ev.verdict = r.verdict;
            ev.icmp_errno = r.errno;
            ev.flags |= r.flags;
        }
        if ev.verdict == 0 {
            ev.verdict = if ev.cookie != 0 {
                verdict::DISCARDED
            } else {
                verdict::NO_SOCKET
            };
        }
        fill_identity(ev, false)
    });
}

/// The report this CPU's slot holds about local port `lport`, if recent; the slot is emptied
/// either way, since the ICMP now being freed is the one any recent report was about.
#[inline(always)]
fn take_report(lport: u16, now: u64) -> Option<ErrorReport> {
    let slot = ERROR_REPORT.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, written and read only in this softirq on this CPU.
    let slot = unsafe { &mut *slot };
    let r = *slot;
    slot.ts_ns = 0;
    let fresh = r.ts_ns != 0 && now.saturating_sub(r.ts_ns) < REPORT_VALID_NS;
    (fresh && r.lport == lport).then_some(r)
}

/// tp_btf inet_sk_error_report: the kernel told (or queued for) a socket. Fires twice for
/// an IP_RECVERR socket: first for the queued error (sk_err still 0), then with sk_err set.
/// Before 5.14 there is no such tracepoint, and the fentry and kprobe strategies hook
/// `sock_def_error_report` instead, which is what the kernel calls at the same points for
/// every UDP socket but in-kernel ones; `cookie` gives the socket's cookie.
#[inline(always)]
pub fn on_error_report<K: Kernel>(sk: u64, cookie: impl FnOnce() -> u64) {
    let proto: u16 = K::get(sk, off!(sk_protocol));
    if proto != IPPROTO_UDP as u16 {
        return;
    }
    let Some(slot) = ERROR_REPORT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, see `take_report`.
    let slot = unsafe { &mut *slot };
    // SAFETY: BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let cookie = cookie();
    let qlen: u32 = K::get(sk, off!(sk_error_queue_qlen));
    let err: i32 = K::get(sk, off!(sk_err));
    let state: u8 = K::get(sk, off!(skc_state));
    let again = slot.ts_ns != 0 && slot.cookie == cookie;
    let mut r = if again {
        *slot
    } else {
        ErrorReport {
            ts_ns: 0,
            cookie,
            lport: K::get(sk, off!(skc_num)),
            verdict: 0,
            _pad: [0; 5],
            errno: 0,
            flags: 0,
        }
    };
    r.ts_ns = now;
    if qlen > 0 {
        r.verdict = verdict::QUEUED;
        r.flags |= flags::RECVERR;
    } else if err != 0 && r.verdict != verdict::QUEUED {
        r.verdict = verdict::NOTIFIED;
    }
    if err != 0 {
        r.errno = err as u32;
    }
    if state == 1 {
        r.flags |= flags::CONNECTED;
    }
    *slot = r;
}
