//! Per-datagram accounting: the only code on the hot path. It updates the flow's counters
//! and emits an event only on the first datagram of each direction.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
    },
};
use udpmon_common::{Counter, Event, EventKind, FlowKey, FlowStats, event::flags};

use crate::{
    maps::{FLOWS, OWNERS, Owner, SENDERS, TupleKey, count, emit, self_tgid},
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
    let first = match FLOWS.get_ptr_mut(key) {
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
                Ok(()) => true,
                // Another CPU created it between our lookup and insert.
                Err(_) => match FLOWS.get_ptr_mut(key) {
                    Some(st) => bump(st, dir, d.bytes, now),
                    None => {
                        count(Counter::FlowInsertFailed);
                        false
                    }
                },
            }
        }
    };
    if !first {
        return;
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
    emit(|ev| {
        ev.kind = match dir {
            Dir::Tx => EventKind::FirstTx,
            Dir::Rx => EventKind::FirstRx,
        } as u16;
        ev.family = d.family;
        ev.ts_ns = now;
        ev.cookie = d.cookie;
        ev.local = d.local;
        ev.remote = d.remote;
        ev.lport = d.lport;
        ev.rport = d.rport;
        ev.ret = d.bytes as i32;
        if d.sk != 0 {
            ev.netns = crate::kread::sock_netns(d.sk);
        }
        fill_identity(ev, in_task)
    });
}

/// Returns true when this datagram is the first of its direction.
#[inline(always)]
fn bump(st: *mut FlowStats, dir: Dir, bytes: u32, now: u64) -> bool {
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
        // The value returned by a fetching add needs BPF atomics v3 (5.12); a plain add
        // works from 5.8. Two CPUs may both see 0 and report "first" twice; the engine
        // treats the second as a repeat.
        let prev = core::ptr::read_volatile(n);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(b, bytes as u64);
        *last = now;
        prev == 0
    }
}

/// Fills pid, comm, uid and cgroup: from the current task when the hook runs in the
/// socket user's context, else from what was learned about the socket's owner. Returns
/// false for udpmon's own sockets.
#[inline(always)]
pub fn fill_identity(ev: &mut Event, in_task: bool) -> bool {
    if in_task {
        let owner = current_owner();
        if owner.tgid == self_tgid() {
            return false;
        }
        set_owner(ev, &owner);
        if ev.cookie != 0 && unsafe { OWNERS.get(ev.cookie) }.is_none() {
            let _ = OWNERS.insert(ev.cookie, owner, 0);
        }
        return true;
    }
    ev.flags |= flags::TASK_UNRELATED;
    // SAFETY: the value is copied out at once.
    if let Some(o) = unsafe { OWNERS.get(ev.cookie) } {
        if o.tgid == self_tgid() {
            return false;
        }
        let o = *o;
        set_owner(ev, &o);
        ev.flags &= !flags::TASK_UNRELATED;
    }
    true
}

#[inline(always)]
fn set_owner(ev: &mut Event, o: &Owner) {
    ev.tgid = o.tgid;
    ev.pid = o.pid;
    ev.uid = o.uid;
    ev.cgroup = o.cgroup;
    ev.comm = o.comm;
    // What the hook itself saw of the namespace wins over what is known of the owner.
    if ev.netns == 0 && ev.netns_cookie == 0 {
        ev.netns = o.netns;
        ev.netns_cookie = o.netns_cookie;
    }
}

#[inline(always)]
pub fn current_owner() -> Owner {
    let pid_tgid = bpf_get_current_pid_tgid();
    Owner {
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: bpf_get_current_uid_gid() as u32,
        netns: 0,
        // SAFETY: BPF helper without preconditions.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        netns_cookie: 0,
    }
}

/// Records the current task as the owner of `cookie` (process-context hooks).
#[inline(always)]
pub fn learn_owner(cookie: u64, netns_cookie: u64) -> Option<Owner> {
    let mut o = current_owner();
    if o.tgid == self_tgid() {
        return None;
    }
    o.netns_cookie = netns_cookie;
    let _ = OWNERS.insert(cookie, o, 0);
    Some(o)
}
