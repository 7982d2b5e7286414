//! Per-datagram accounting: the only code on the hot path. It updates the flow's counters
//! and emits an event only on the first datagram of each direction (again on the next one
//! when the ring had no room for it) and when a quiet flow moves again.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_boot_ns};
use udpmon_common::{
    Counter, Event, EventKind, FIRST_RX_LOST, FIRST_TX_LOST, FlowKey, FlowStats, WAKE_NS,
};

use crate::{
    maps::{FLOWS, SENDERS, TupleKey, count, emit},
    owner::fill_identity,
    packet::UdpHeaders,
};

/// A datagram seen on the wire side of a socket. Addresses as in [`Event`].
pub struct Datagram {
    pub cookie: u64,
    pub family: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub bytes: u32,
    /// The socket, where the hook has a typed pointer to it (0 for cgroup hooks): its
    /// netns is read only when an event is emitted, off the per-datagram path.
    pub sk: u64,
}

impl Datagram {
    /// The datagram whose headers are `h`, as the socket that sends it (`Tx`: its source is
    /// local) or receives it (`Rx`) sees it.
    #[inline(always)]
    pub fn from_headers(h: &UdpHeaders, dir: Dir, cookie: u64, sk: u64) -> Self {
        let (local, remote, lport, rport) = match dir {
            Dir::Tx => (h.saddr, h.daddr, h.sport, h.dport),
            Dir::Rx => (h.daddr, h.saddr, h.dport, h.sport),
        };
        Datagram {
            cookie,
            family: h.family,
            local,
            remote,
            lport,
            rport,
            bytes: h.bytes,
            sk,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Tx,
    Rx,
}

#[inline(always)]
pub fn on_datagram(d: &Datagram, dir: Dir, in_task: bool) {
    let key = FlowKey {
        cookie: d.cookie,
        remote: d.remote,
        rport: d.rport,
        family: d.family,
        _pad: 0,
    };
    // SAFETY: BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let lost_bit = match dir {
        Dir::Tx => FIRST_TX_LOST,
        Dir::Rx => FIRST_RX_LOST,
    };
    let seen = match FLOWS.get_ptr_mut(key) {
        Some(st) => bump(st, dir, d.bytes, now, lost_bit),
        None => {
            let mut st = FlowStats {
                first_ns: now,
                ..FlowStats::default()
            };
            match dir {
                Dir::Tx => {
                    st.tx_datagrams = 1;
                    st.tx_bytes = d.bytes as u64;
                    st.last_tx_ns = now;
                }
                Dir::Rx => {
                    st.rx_datagrams = 1;
                    st.rx_bytes = d.bytes as u64;
                    st.last_rx_ns = now;
                }
            }
            match FLOWS.insert(key, st, BPF_NOEXIST as u64) {
                Ok(()) => Seen::First,
                // Another CPU created it between our lookup and insert.
                Err(_) => match FLOWS.get_ptr_mut(key) {
                    Some(st) => bump(st, dir, d.bytes, now, lost_bit),
                    None => {
                        count(Counter::FlowInsertFailed);
                        Seen::Again
                    }
                },
            }
        }
    };
    match seen {
        Seen::Again => return,
        Seen::Woke => {
            // Both addresses, as the first datagram's record has them, so that userspace
            // names the flow alike (a v4-mapped pair is unmapped only as a pair). A lost one
            // needs no retry: userspace reads every flow's counters after a loss.
            emit(|ev| {
                fill_flow(ev, EventKind::Wake, d, now);
                true
            });
            return;
        }
        Seen::First | Seen::Retry => {}
    }
    if dir == Dir::Tx {
        let tk = TupleKey {
            local: d.local,
            remote: d.remote,
            lport: d.lport,
            rport: d.rport,
            family: d.family,
            _pad: 0,
        };
        let _ = SENDERS.insert(tk, d.cookie, 0);
    }
    let sent = emit(|ev| {
        let kind = match dir {
            Dir::Tx => EventKind::FirstTx,
            Dir::Rx => EventKind::FirstRx,
        };
        fill_flow(ev, kind, d, now);
        ev.ret = d.bytes as i32;
        if d.sk != 0 {
            ev.netns = crate::kread::sock_netns(d.sk);
        }
        fill_identity(ev, in_task)
    });
    if sent == (seen == Seen::Retry)
        && let Some(st) = FLOWS.get_ptr_mut(key)
    {
        // SAFETY: a map value valid for this program run. Not atomic (an atomic OR needs
        // 5.12): the other direction's update racing this one on another CPU can undo it,
        // costing that flow one repeated first record, or its retry.
        unsafe {
            if sent {
                (*st).first_lost &= !lost_bit;
            } else {
                (*st).first_lost |= lost_bit;
            }
        }
    }
}

/// A record of kind `kind` about datagram `d`'s flow, at `now`.
#[inline(always)]
fn fill_flow(ev: &mut Event, kind: EventKind, d: &Datagram, now: u64) {
    ev.kind = kind as u16;
    ev.family = d.family;
    ev.ts_ns = now;
    ev.cookie = d.cookie;
    ev.local = d.local;
    ev.remote = d.remote;
    ev.lport = d.lport;
    ev.rport = d.rport;
}

/// What a datagram was to its flow's userspace reader.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The first of its direction.
    First,
    /// The first of its direction whose record was lost (`FlowStats::first_lost`).
    Retry,
    /// The first after more than `WAKE_NS` without any.
    Woke,
    Again,
}

#[inline(always)]
fn bump(st: *mut FlowStats, dir: Dir, bytes: u32, now: u64, lost_bit: u64) -> Seen {
    // SAFETY: `st` points into a map value that stays valid for this program run; the
    // counters are only ever updated atomically.
    unsafe {
        let (n, b, last) = match dir {
            Dir::Tx => (
                &raw mut (*st).tx_datagrams,
                &raw mut (*st).tx_bytes,
                &raw mut (*st).last_tx_ns,
            ),
            Dir::Rx => (
                &raw mut (*st).rx_datagrams,
                &raw mut (*st).rx_bytes,
                &raw mut (*st).last_rx_ns,
            ),
        };
        // Both directions' times: userspace sleeps a flow on the later of the two.
        let quiet_since = (*st).last_tx_ns.max((*st).last_rx_ns);
        // The value returned by a fetching add needs BPF atomics v3 (5.12); a plain add
        // works from 5.8. Two CPUs may both see 0 and report "first" twice; the engine
        // treats the second as a repeat.
        let prev = core::ptr::read_volatile(n);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(b, bytes as u64);
        *last = now;
        if prev == 0 {
            Seen::First
        } else if (*st).first_lost & lost_bit != 0 {
            Seen::Retry
        } else if now.saturating_sub(quiet_since) > WAKE_NS {
            Seen::Woke
        } else {
            Seen::Again
        }
    }
}
