//! Per-datagram accounting: the only code on the hot path. It updates the flow's counters
//! and emits an event only on the first datagram of each direction (again on the next one
//! when the ring had no room for it) and when a quiet flow moves again.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_boot_ns};
use udpmon_common::{Counter, Event, EventKind, FlowKey, FlowStats, WAKE_NS};

use crate::{
    maps::{FLOWS, count, emit, try_emit},
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
    let seen = match FLOWS.get_ptr_mut(key) {
        Some(st) => bump(st, dir, d.bytes, now),
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
                    Some(st) => bump(st, dir, d.bytes, now),
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
    let fill = |ev: &mut Event| {
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
    };
    let lost = match seen {
        Seen::First => !emit(fill),
        // The loss was counted when the first record was: a retry that finds the ring still
        // full is not another one.
        _ => !try_emit(fill),
    };
    let flag = match (seen, lost) {
        (Seen::First, true) => 1,
        (Seen::Retry, false) => 0,
        _ => return,
    };
    if let Some(st) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a map value valid for this program run; only this direction's word.
        unsafe { *first_lost(st, dir) = flag };
    }
}

/// `dir`'s flag in `st`: whether its first record is still to be sent.
#[inline(always)]
fn first_lost(st: *mut FlowStats, dir: Dir) -> *mut u32 {
    // SAFETY: the address of a field of the map value the caller holds; nothing is read.
    unsafe {
        match dir {
            Dir::Tx => &raw mut (*st).tx_first_lost,
            Dir::Rx => &raw mut (*st).rx_first_lost,
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
    /// A later one of a direction whose first record found the ring full
    /// (`FlowStats::tx_first_lost`): it sends that record now.
    Retry,
    /// The first after more than `WAKE_NS` without any.
    Woke,
    Again,
}

#[inline(always)]
fn bump(st: *mut FlowStats, dir: Dir, bytes: u32, now: u64) -> Seen {
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
        } else if *first_lost(st, dir) != 0 {
            Seen::Retry
        } else if now.saturating_sub(quiet_since) > WAKE_NS {
            Seen::Woke
        } else {
            Seen::Again
        }
    }
}
