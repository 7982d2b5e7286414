//! Flows and the table that holds them.
//!
//! Memory: the table is sized for `--max-flows` (65536 by default, millions on a busy
//! resolver), so a flow is held in one slab slot with its id in compact form, found through
//! a hash table of bare slot numbers; a socket's flows are a list through their slots, and
//! the order by activity that eviction needs is kept only once the table is full (see
//! [`Oldest`]). Fields that most flows never use (error counts, a recreated kernel entry's
//! counts) live in a box of their own.
//!
//! Ticks: a flow is either awake, looked at by every tick, or asleep until a time by which
//! nothing can have happened to it unless the kernel said so (see [`FlowTable::sleep`]).
use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap},
    hash::{BuildHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use hashbrown::{DefaultHashBuilder, HashTable, hash_table};
use udpmon_common::{
    FlowKey, FlowStats,
    event::{AF_INET, AF_INET6},
};

use super::peer::PeerLink;
use crate::decode::{Family, Verdict};
/// A flow: one socket talking to one remote address:port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub cookie: u64,
    pub remote: SocketAddr,
}

impl FlowId {
    /// The smallest `SocketAddr` in `Ord` order (V4 sorts before V6, then address, port):
    /// the start of a cookie's range in the table.
    const MIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
}

/// The kernel keys its flow map the same way; the caller uses this to read counters.
impl From<&FlowId> for FlowKey {
    fn from(id: &FlowId) -> Self {
        let (remote, family) = match id.remote.ip() {
            IpAddr::V4(a) => {
                let mut r = [0; 16];
                r[..4].copy_from_slice(&a.octets());
                (r, AF_INET)
            }
            IpAddr::V6(a) => (a.octets(), AF_INET6),
        };
        FlowKey {
            cookie: id.cookie,
            remote,
            rport: id.remote.port(),
            family,
            _pad: 0,
        }
    }
}

impl FlowId {
    /// The flow a kernel map key is of; None for a family udpmon does not key flows by.
    pub fn of_key(k: &FlowKey) -> Option<Self> {
        let ip = match k.family {
            AF_INET => IpAddr::V4(Ipv4Addr::new(
                k.remote[0],
                k.remote[1],
                k.remote[2],
                k.remote[3],
            )),
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(k.remote)),
            _ => return None,
        };
        Some(Self {
            cookie: k.cookie,
            remote: SocketAddr::new(ip, k.rport),
        })
    }
}

/// A flow's kernel-side counters. Times are CLOCK_BOOTTIME nanoseconds, 0 for "never".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    pub first_ns: u64,
    pub last_tx_ns: u64,
    pub last_rx_ns: u64,
}

impl From<FlowStats> for Counters {
    fn from(s: FlowStats) -> Self {
        Self {
            tx_datagrams: s.tx_datagrams,
            tx_bytes: s.tx_bytes,
            rx_datagrams: s.rx_datagrams,
            rx_bytes: s.rx_bytes,
            first_ns: s.first_ns,
            last_tx_ns: s.last_tx_ns,
            last_rx_ns: s.last_rx_ns,
        }
    }
}

impl Counters {
    /// Folds in another view of the same flow. Counters only grow, so the larger value is
    /// the newer one; this keeps event-derived knowledge when the kernel's LRU map has
    /// already dropped the entry, and never lets a stale read move a flow backwards.
    pub fn merge(&mut self, o: &Counters) {
        self.tx_datagrams = self.tx_datagrams.max(o.tx_datagrams);
        self.tx_bytes = self.tx_bytes.max(o.tx_bytes);
        self.rx_datagrams = self.rx_datagrams.max(o.rx_datagrams);
        self.rx_bytes = self.rx_bytes.max(o.rx_bytes);
        self.first_ns = match (self.first_ns, o.first_ns) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_tx_ns = self.last_tx_ns.max(o.last_tx_ns);
        self.last_rx_ns = self.last_rx_ns.max(o.last_rx_ns);
    }

    pub fn last_ns(&self) -> u64 {
        self.last_tx_ns.max(self.last_rx_ns)
    }

    /// `self` continued by a later kernel entry of the same flow: volumes add up.
    fn then(&self, later: &Counters) -> Counters {
        Counters {
            tx_datagrams: self.tx_datagrams + later.tx_datagrams,
            tx_bytes: self.tx_bytes + later.tx_bytes,
            rx_datagrams: self.rx_datagrams + later.rx_datagrams,
            rx_bytes: self.rx_bytes + later.rx_bytes,
            first_ns: self.first_ns,
            last_tx_ns: self.last_tx_ns.max(later.last_tx_ns),
            last_rx_ns: self.last_rx_ns.max(later.last_rx_ns),
        }
    }
}

/// The low 32 bits of a count that only grows, for differences of less than 2^32.
pub(super) fn low32(n: u64) -> u32 {
    n as u32
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Active,
    /// Silent; `last_rx_ns` is the peer's last datagram before the silence. `reported`:
    /// SILENT was reported for this flow, rather than for its peer (see `peer.rs`), so its
    /// end is this flow's RESUMED.
    Silent {
        last_rx_ns: u64,
        reported: bool,
    },
    /// UNREACHABLE was reported at `since_ns` for this ICMP; `last_rx_ns` as above.
    Unreachable {
        since_ns: u64,
        icmp: (u8, u8, Verdict),
        last_rx_ns: u64,
    },
}

/// A socket address in 19 bytes rather than `SocketAddr`'s 32. An IPv6 address's flow label
/// and scope id are not kept: the kernel's records carry neither (`decode` builds every
/// address with `SocketAddr::new`, which sets both to 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Addr {
    ip: [u8; 16],
    port: [u8; 2],
    v6: bool,
}

impl Addr {
    pub fn new(a: SocketAddr) -> Self {
        let (ip, v6) = match a.ip() {
            IpAddr::V4(v4) => {
                let mut ip = [0; 16];
                ip[..4].copy_from_slice(&v4.octets());
                (ip, false)
            }
            IpAddr::V6(v6) => (v6.octets(), true),
        };
        Self {
            ip,
            port: a.port().to_ne_bytes(),
            v6,
        }
    }

    pub fn get(self) -> SocketAddr {
        let ip = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.ip))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.ip[0], self.ip[1], self.ip[2], self.ip[3],
            ))
        };
        SocketAddr::new(ip, u16::from_ne_bytes(self.port))
    }

    pub fn port(self) -> u16 {
        u16::from_ne_bytes(self.port)
    }
}

impl Hash for Addr {
    // Three word-sized writes rather than a byte slice's length and bytes.
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u128(u128::from_ne_bytes(self.ip));
        h.write_u32(u32::from(u16::from_ne_bytes(self.port)) | u32::from(self.v6) << 16);
    }
}

/// What few flows need: kept out of [`Flow`] so that the others do not pay for it.
#[derive(Clone, Debug, Default)]
struct Rare {
    icmp_errors: u64,
    app_errors: u64,
    last_app_errno: Option<i32>,
    earlier: Option<Counters>,
    /// [`State::Unreachable`]'s `since_ns` and `icmp`, while the flow is in that state.
    unreachable: Option<(u64, (u8, u8, Verdict))>,
}

/// [`State`]'s variant, stored in [`Flow`] without its payload: `last_rx_ns` is
/// [`Flow::trouble_rx_ns`], and an unreachable flow's ICMP and time are in [`Rare`], which
/// such a flow has for its ICMP error count anyway: 9 bytes of every flow instead of a
/// `State`'s 24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateKind {
    Active,
    Silent,
    SilentReported,
    Unreachable,
}

#[derive(Clone, Debug)]
pub(super) struct Flow {
    pub counters: Counters,
    /// Its peer across flows, for flows the local side opened.
    pub peer: PeerLink,
    pub opened_ns: u64,
    /// The rx count (its [`low32`]: only a change is looked for) at the last tick that saw
    /// it change, and the tx count then minus the sends that certainly followed that
    /// receive, whose difference to the tx count is "sends since the last reply", a lower
    /// bound ([`Flow::unanswered`]).
    pub rx_seen: u32,
    /// [`low32`], as `credited_tx` in [`PeerLink`]: the difference is exact while fewer than
    /// 2^32 sends follow the last reply, and SILENT comes long before that.
    pub tx_at_rx: u32,
    /// When the kernel entry whose counters were last read was created (0: none read yet).
    pub kernel_first_ns: u64,
    /// The flow's first datagram in either direction, valid when `has_first_tx` or
    /// `has_first_rx`: the other direction's first one only ever needs the time between the
    /// two ([`Flow::set_first`]).
    first_datagram_ns: u64,
    /// `last_rx_ns` of the [`State`] (0 while active).
    trouble_rx_ns: u64,
    /// Error counts, the last APP-ERROR's errno, and what earlier kernel entries of this
    /// flow counted (the kernel's LRU map can drop a live flow's entry under pressure, and
    /// the next datagram starts a new one from zero).
    rare: Option<Box<Rare>>,
    local: Addr,
    pub family: Family,
    state: StateKind,
    has_first_tx: bool,
    has_first_rx: bool,
    /// Learned from a socket that existed before udpmon started.
    pub preexisting: bool,
    pub established: bool,
    /// Some report named this flow.
    pub reported: bool,
    /// Counted in its socket's summaries rather than reported line by line (`summary.rs`).
    pub summarised: bool,
    /// Summarised, and its last SILENT or UNREACHABLE was folded: so is the RESUMED.
    pub muted: bool,
}

// One per tracked flow: growth here is memory per flow (`cargo xtask bench`'s rss rows).
const _: () = assert!(size_of::<Flow>() <= 152);

impl Flow {
    pub fn new(local: SocketAddr, family: Family, ts_ns: u64) -> Self {
        Self {
            counters: Counters::default(),
            peer: PeerLink::NONE,
            opened_ns: ts_ns,
            rx_seen: 0,
            tx_at_rx: 0,
            kernel_first_ns: 0,
            first_datagram_ns: 0,
            trouble_rx_ns: 0,
            rare: None,
            local: Addr::new(local),
            family,
            state: StateKind::Active,
            has_first_tx: false,
            has_first_rx: false,
            preexisting: false,
            established: false,
            reported: false,
            summarised: false,
            muted: false,
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.local.get()
    }

    /// Whether the flow's first datagram was seen: sent (`tx`) or received.
    pub fn has_first(&self, tx: bool) -> bool {
        if tx {
            self.has_first_tx
        } else {
            self.has_first_rx
        }
    }

    /// Notes the flow's first datagram sent (`tx`) or received, at `ts_ns`. Returns the time
    /// between the first datagrams of the two directions once both are known: how long the
    /// reply took.
    pub fn set_first(&mut self, tx: bool, ts_ns: u64) -> Option<u64> {
        let other = self.has_first(!tx);
        let reply_after = other.then(|| ts_ns.abs_diff(self.first_datagram_ns));
        if !other {
            self.first_datagram_ns = ts_ns;
        }
        if tx {
            self.has_first_tx = true;
        } else {
            self.has_first_rx = true;
        }
        reply_after
    }

    pub fn state(&self) -> State {
        let last_rx_ns = self.trouble_rx_ns;
        match self.state {
            StateKind::Active => State::Active,
            StateKind::Silent | StateKind::SilentReported => State::Silent {
                last_rx_ns,
                reported: self.state == StateKind::SilentReported,
            },
            StateKind::Unreachable => {
                let (since_ns, icmp) = self
                    .rare
                    .as_ref()
                    .and_then(|r| r.unreachable)
                    .expect("an unreachable flow keeps its ICMP in `rare`");
                State::Unreachable {
                    since_ns,
                    icmp,
                    last_rx_ns,
                }
            }
        }
    }

    pub fn set_state(&mut self, state: State) {
        let (kind, last_rx_ns, unreachable) = match state {
            State::Active => (StateKind::Active, 0, None),
            State::Silent {
                last_rx_ns,
                reported,
            } => {
                let kind = if reported {
                    StateKind::SilentReported
                } else {
                    StateKind::Silent
                };
                (kind, last_rx_ns, None)
            }
            State::Unreachable {
                since_ns,
                icmp,
                last_rx_ns,
            } => (StateKind::Unreachable, last_rx_ns, Some((since_ns, icmp))),
        };
        if unreachable.is_some() || self.state == StateKind::Unreachable {
            self.rare_mut().unreachable = unreachable;
        }
        self.state = kind;
        self.trouble_rx_ns = last_rx_ns;
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    pub fn icmp_errors(&self) -> u64 {
        self.rare.as_ref().map_or(0, |r| r.icmp_errors)
    }

    pub fn app_errors(&self) -> u64 {
        self.rare.as_ref().map_or(0, |r| r.app_errors)
    }

    pub fn count_icmp_error(&mut self) {
        self.rare_mut().icmp_errors += 1;
    }

    pub fn count_app_error(&mut self) {
        self.rare_mut().app_errors += 1;
    }

    /// The errno of the last APP-ERROR reported, cleared by any other report on the flow:
    /// an application that fails the same way on every call gets one line, not one per call.
    pub fn last_app_errno(&self) -> Option<i32> {
        self.rare.as_ref().and_then(|r| r.last_app_errno)
    }

    pub fn set_last_app_errno(&mut self, errno: Option<i32>) {
        match (&mut self.rare, errno) {
            (None, None) => {}
            (Some(r), e) => r.last_app_errno = e,
            (None, e) => self.rare_mut().last_app_errno = e,
        }
    }

    /// In a flow-level SILENT that was reported.
    pub fn silence_reported(&self) -> bool {
        self.state == StateKind::SilentReported
    }

    /// Datagrams sent since the peer's last one (a lower bound, see `tx_at_rx`).
    pub fn unanswered(&self) -> u64 {
        u64::from(low32(self.counters.tx_datagrams).wrapping_sub(self.tx_at_rx))
    }

    /// When the flow-level SILENT rule fires unless new traffic comes first: for an active,
    /// established flow that sent `min_sends` or more since its peer's last datagram,
    /// `silent_after_ns` after that datagram. The tick applies it; a sleeping flow is due then.
    pub fn silent_at(&self, silent_after_ns: u64, min_sends: u64) -> Option<u64> {
        let c = &self.counters;
        (self.state == StateKind::Active
            && self.established
            && c.last_tx_ns > c.last_rx_ns
            && self.unanswered() >= min_sends)
            .then(|| c.last_rx_ns.saturating_add(silent_after_ns))
    }

    /// Folds in a read of the flow's kernel entry. Returns true when that entry is newer than
    /// the one read before (the kernel dropped and recreated it): what the old one counted is
    /// kept, and only what it counted after the previous read is lost.
    pub fn absorb(&mut self, c: &Counters) -> bool {
        let renewed = self.kernel_first_ns != 0 && c.first_ns > self.kernel_first_ns;
        if renewed {
            let counters = self.counters;
            self.rare_mut().earlier = Some(counters);
        }
        if c.first_ns != 0 {
            self.kernel_first_ns = self.kernel_first_ns.max(c.first_ns);
        }
        let total = match self.rare.as_ref().and_then(|r| r.earlier.as_ref()) {
            Some(e) => e.then(c),
            None => *c,
        };
        self.counters.merge(&total);
        renewed
    }
}

/// Sentinel slot number: none.
const NIL: u32 = u32::MAX;

/// [`Slot::due`] of a flow on the awake list.
const AWAKE: u64 = 0;
/// [`Slot::due`] of a flow a tick is looking at.
const CHECKING: u64 = u64::MAX;

/// Where a flow is in its [`FlowTable`]: looked up once per event and handed to each step
/// that needs the flow (open, report, join its peer, tell the peer), where a lookup by id
/// per step cost more than the steps. Valid until the flow is removed: `get_mut` checks that
/// a flow is still there (not which one), the other accessors only in debug builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct FlowRef(u32);

struct Slot {
    cookie: u64,
    remote: Addr,
    /// Last activity, for idle expiry and eviction.
    at: u64,
    /// When the next tick must look at the flow: [`AWAKE`] (every tick), [`CHECKING`] (this
    /// tick, which took it off the awake list), or a time it sleeps until (in `timers`).
    due: u64,
    /// Neighbours in the list of the socket's flows; on a free slot, `next` is the next free.
    prev: u32,
    next: u32,
    /// `None` on a free slot.
    flow: Option<Flow>,
}

impl Slot {
    fn id(&self) -> FlowId {
        FlowId {
            cookie: self.cookie,
            remote: self.remote.get(),
        }
    }
}

/// The flows with the oldest activity, kept only once something had to be evicted: a
/// `BTreeSet` of every flow by activity costs more than the rest of a flow's bookkeeping,
/// while the least active is wanted only when the table is full.
///
/// Every live flow whose (activity, id) is below `below` (`None`: every flow) has an entry
/// in `entries` with its current activity; entries whose flow is gone or has moved on are
/// stale and skipped. So the first valid entry is the least active flow of all, and when
/// none is left a scan of the table takes the next oldest part.
struct Oldest {
    below: Option<(u64, FlowId)>,
    entries: BTreeSet<(u64, FlowId)>,
}

/// Flows by id, with a list of each socket's flows and, once the table was full, the order
/// by last activity for eviction.
pub(super) struct FlowTable {
    slots: Vec<Slot>,
    free: u32,
    len: usize,
    /// Slot numbers, hashed by flow id.
    index: HashTable<u32>,
    /// The first slot of each socket's list, hashed by cookie.
    heads: HashTable<u32>,
    hasher: DefaultHashBuilder,
    oldest: Option<Oldest>,
    /// Slots of awake flows (and of flows that left the list since: their `due` says so).
    awake: Vec<u32>,
    /// (due, slot) of sleeping flows; an entry whose slot's `due` differs is stale.
    timers: BinaryHeap<Reverse<(u64, u32)>>,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: NIL,
            len: 0,
            index: HashTable::new(),
            heads: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            oldest: None,
            awake: Vec::new(),
            timers: BinaryHeap::new(),
        }
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            cookie: 0,
            remote: Addr::new(FlowId::MIN_ADDR),
            at: 0,
            due: CHECKING,
            prev: NIL,
            next: NIL,
            flow: None,
        }
    }
}

fn hash_id(h: &DefaultHashBuilder, cookie: u64, remote: &Addr) -> u64 {
    h.hash_one((cookie, remote))
}

fn hash_cookie(h: &DefaultHashBuilder, cookie: u64) -> u64 {
    h.hash_one(cookie)
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn find(&self, id: &FlowId) -> Option<FlowRef> {
        let remote = Addr::new(id.remote);
        let slots = &self.slots;
        self.index
            .find(hash_id(&self.hasher, id.cookie, &remote), |&i| {
                let s = &slots[i as usize];
                s.cookie == id.cookie && s.remote == remote
            })
            .map(|&i| FlowRef(i))
    }

    pub fn get(&self, r: FlowRef) -> Option<&Flow> {
        self.slots.get(r.0 as usize)?.flow.as_ref()
    }

    pub fn get_mut(&mut self, r: FlowRef) -> Option<&mut Flow> {
        self.slots.get_mut(r.0 as usize)?.flow.as_mut()
    }

    pub fn id(&self, r: FlowRef) -> FlowId {
        let s = &self.slots[r.0 as usize];
        debug_assert!(s.flow.is_some(), "a FlowRef to a freed slot");
        s.id()
    }

    /// Keeps `oldest` true to its rule for a flow whose activity became `at`.
    fn note_activity(&mut self, at: u64, id: &FlowId) {
        let Some(o) = &mut self.oldest else {
            return;
        };
        let key = (at, *id);
        if o.below.is_none_or(|b| key < b) {
            o.entries.insert(key);
            // Stale entries of flows touched again and again while still among the oldest:
            // past this, a fresh scan is cheaper than the set.
            if o.entries.len() > 2 * self.len + 64 {
                self.oldest = None;
            }
        }
    }

    /// Adds a flow, or replaces the one with its id.
    pub fn insert(&mut self, id: FlowId, flow: Flow, ts_ns: u64) -> FlowRef {
        let remote = Addr::new(id.remote);
        let (slots, hasher) = (&mut self.slots, &self.hasher);
        // One probe for both the lookup and the insertion.
        let entry = self.index.entry(
            hash_id(hasher, id.cookie, &remote),
            |&i| {
                let s = &slots[i as usize];
                s.cookie == id.cookie && s.remote == remote
            },
            |&j| {
                let s = &slots[j as usize];
                hash_id(hasher, s.cookie, &s.remote)
            },
        );
        let vacant = match entry {
            hash_table::Entry::Occupied(e) => {
                let i = *e.get();
                let s = &mut self.slots[i as usize];
                s.flow = Some(flow);
                s.at = ts_ns;
                self.note_activity(ts_ns, &id);
                self.wake(FlowRef(i));
                return FlowRef(i);
            }
            hash_table::Entry::Vacant(e) => e,
        };
        let i = if self.free == NIL {
            slots.push(Slot::default());
            u32::try_from(slots.len() - 1).expect("fewer than 2^32 flows")
        } else {
            let i = self.free;
            self.free = slots[i as usize].next;
            i
        };
        vacant.insert(i);
        let hc = hash_cookie(hasher, id.cookie);
        let head = self
            .heads
            .find_mut(hc, |&h| slots[h as usize].cookie == id.cookie);
        let next = match head {
            Some(h) => {
                let old = *h;
                *h = i;
                slots[old as usize].prev = i;
                old
            }
            None => {
                self.heads
                    .insert_unique(hc, i, |&h| hash_cookie(hasher, slots[h as usize].cookie));
                NIL
            }
        };
        slots[i as usize] = Slot {
            cookie: id.cookie,
            remote,
            at: ts_ns,
            due: CHECKING,
            prev: NIL,
            next,
            flow: Some(flow),
        };
        self.len += 1;
        self.note_activity(ts_ns, &id);
        self.wake(FlowRef(i));
        FlowRef(i)
    }

    pub fn remove(&mut self, id: &FlowId) -> Option<Flow> {
        let remote = Addr::new(id.remote);
        let (slots, hasher) = (&mut self.slots, &self.hasher);
        let entry = self
            .index
            .find_entry(hash_id(hasher, id.cookie, &remote), |&i| {
                let s = &slots[i as usize];
                s.cookie == id.cookie && s.remote == remote
            })
            .ok()?;
        let (i, _) = entry.remove();
        let (prev, next) = {
            let s = &slots[i as usize];
            (s.prev, s.next)
        };
        if prev == NIL {
            let hc = hash_cookie(hasher, id.cookie);
            if next == NIL {
                if let Ok(e) = self.heads.find_entry(hc, |&h| h == i) {
                    e.remove();
                }
            } else if let Some(h) = self.heads.find_mut(hc, |&h| h == i) {
                *h = next;
            }
        } else {
            slots[prev as usize].next = next;
        }
        if next != NIL {
            slots[next as usize].prev = prev;
        }
        let s = &mut slots[i as usize];
        let flow = s.flow.take();
        // Whatever list or timer still names the slot passes it over.
        s.due = CHECKING;
        s.prev = NIL;
        s.next = self.free;
        self.free = i;
        self.len -= 1;
        flow
    }

    pub fn set_local(&mut self, r: FlowRef, local: SocketAddr) {
        if let Some(f) = &mut self.slots[r.0 as usize].flow {
            f.local = Addr::new(local);
        }
    }

    /// Records activity that an event reported at `ts_ns`, and wakes the flow.
    pub fn seen(&mut self, r: FlowRef, ts_ns: u64) {
        self.heard(r, ts_ns);
        self.wake(r);
    }

    /// Records activity at `ts_ns` (a tick's read of the counters); activity never moves
    /// backwards (events can arrive slightly out of order across CPUs).
    pub fn heard(&mut self, r: FlowRef, ts_ns: u64) {
        let s = &mut self.slots[r.0 as usize];
        debug_assert!(s.flow.is_some(), "a FlowRef to a freed slot");
        if ts_ns > s.at {
            s.at = ts_ns;
            // The id is wanted only by the order for eviction, once the table was full.
            if self.oldest.is_some() {
                let id = s.id();
                self.note_activity(ts_ns, &id);
            }
        }
    }

    /// The next ticks look at the flow, until one puts it to [`sleep`](Self::sleep).
    pub fn wake(&mut self, r: FlowRef) {
        let s = &mut self.slots[r.0 as usize];
        if s.due != AWAKE {
            s.due = AWAKE;
            self.awake.push(r.0);
        }
    }

    /// Ticks pass the flow over until `until` (or until it wakes): the caller knows that
    /// nothing it looks for can happen to the flow before then unless the kernel reports
    /// activity, which wakes it. `None`: it stays awake.
    pub fn sleep(&mut self, r: FlowRef, until: Option<u64>) {
        let Some(until) = until else {
            return self.wake(r);
        };
        let until = until.clamp(AWAKE + 1, CHECKING - 1);
        let s = &mut self.slots[r.0 as usize];
        if s.due == until {
            return;
        }
        s.due = until;
        self.timers.push(Reverse((until, r.0)));
        // Stale entries (flows that woke, moved on or went) past this: one pass over the
        // table rebuilds the heap, so a push costs O(1) amortised and the heap stays within
        // twice the flows.
        if self.timers.len() > 2 * self.len + 1024 {
            let slots = &self.slots;
            let live = (0..slots.len() as u32).filter_map(|i| {
                let s = &slots[i as usize];
                (s.flow.is_some() && s.due != AWAKE && s.due != CHECKING)
                    .then_some(Reverse((s.due, i)))
            });
            self.timers = live.collect();
        }
    }

    /// The flows a tick at `now` must look at, in slot order (the order of a walk over the
    /// table, which reports followed before flows could sleep): the awake ones and those
    /// whose sleep ended. Each is marked as being looked at: the tick wakes or sleeps it.
    pub fn take_due(&mut self, now: u64) -> Vec<FlowRef> {
        let mut due = std::mem::take(&mut self.awake);
        due.retain(|&i| self.slots[i as usize].due == AWAKE);
        while let Some(&Reverse((at, i))) = self.timers.peek()
            && at <= now
        {
            self.timers.pop();
            if self.slots[i as usize].due == at {
                due.push(i);
            }
        }
        due.sort_unstable();
        due.dedup();
        for &i in &due {
            self.slots[i as usize].due = CHECKING;
        }
        due.into_iter().map(FlowRef).collect()
    }

    pub fn last_seen(&self, r: FlowRef) -> u64 {
        let s = &self.slots[r.0 as usize];
        debug_assert!(s.flow.is_some(), "a FlowRef to a freed slot");
        s.at
    }

    #[cfg(test)]
    pub fn touch(&mut self, id: &FlowId, ts_ns: u64) {
        if let Some(r) = self.find(id) {
            self.seen(r, ts_ns);
        }
    }

    #[cfg(test)]
    pub fn last_activity(&self, id: &FlowId) -> Option<u64> {
        self.find(id).map(|r| self.last_seen(r))
    }

    /// The flow with the oldest activity (the smallest id among equals).
    pub fn least_active(&mut self) -> Option<FlowId> {
        loop {
            if let Some(o) = &mut self.oldest {
                while let Some(&(at, id)) = o.entries.first() {
                    let live = self.index.find(
                        hash_id(&self.hasher, id.cookie, &Addr::new(id.remote)),
                        |&i| {
                            let s = &self.slots[i as usize];
                            s.cookie == id.cookie && s.remote == Addr::new(id.remote)
                        },
                    );
                    if live.is_some_and(|&i| self.slots[i as usize].at == at) {
                        return Some(id);
                    }
                    o.entries.pop_first();
                }
            }
            if self.len == 0 {
                self.oldest = None;
                return None;
            }
            // An eighth of the table per scan: evicting one flow at a time costs a pass over
            // the table only every `len / 8` evictions. Slot numbers rather than ids while
            // choosing: a third of the room, at a million flows 16 MB instead of 48.
            let slots = &self.slots;
            let key = |i: u32| {
                let s = &slots[i as usize];
                (s.at, s.id())
            };
            let mut live: Vec<u32> = (0..slots.len() as u32)
                .filter(|&i| slots[i as usize].flow.is_some())
                .collect();
            let take = (live.len() / 8).max(1);
            let below = if take < live.len() {
                live.select_nth_unstable_by(take, |&a, &b| key(a).cmp(&key(b)));
                let b = key(live[take]);
                live.truncate(take);
                Some(b)
            } else {
                None
            };
            let entries = live.into_iter().map(key).collect();
            self.oldest = Some(Oldest { below, entries });
        }
    }

    /// Every flow, in id order.
    #[cfg(test)]
    pub fn ids(&self) -> Vec<FlowId> {
        let live = self.slots.iter().filter(|s| s.flow.is_some());
        let mut ids: Vec<FlowId> = live.map(Slot::id).collect();
        ids.sort_unstable();
        ids
    }

    /// A socket's flows, in id order, into `ids` (cleared first).
    pub fn of_cookie(&self, cookie: u64, ids: &mut Vec<FlowId>) {
        ids.clear();
        let slots = &self.slots;
        let mut i = self
            .heads
            .find(hash_cookie(&self.hasher, cookie), |&h| {
                slots[h as usize].cookie == cookie
            })
            .copied()
            .unwrap_or(NIL);
        while i != NIL {
            let s = &slots[i as usize];
            ids.push(s.id());
            i = s.next;
        }
        ids.sort_unstable();
    }

    pub fn has_cookie(&self, cookie: u64) -> bool {
        let slots = &self.slots;
        self.heads
            .find(hash_cookie(&self.hasher, cookie), |&h| {
                slots[h as usize].cookie == cookie
            })
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cookie: u64, remote: &str) -> FlowId {
        FlowId {
            cookie,
            remote: remote.parse().unwrap(),
        }
    }

    /// Kernel map keys and flow ids name the same flows, both ways.
    #[test]
    fn kernel_keys_and_flow_ids_round_trip() {
        for remote in ["10.1.2.3:53", "[fd00::1:2]:4433", "0.0.0.0:0"] {
            let f = id(77, remote);
            assert_eq!(FlowId::of_key(&FlowKey::from(&f)), Some(f));
        }
        let mut k = FlowKey::from(&id(1, "10.1.2.3:53"));
        k.family = 0;
        assert_eq!(FlowId::of_key(&k), None);
    }

    #[test]
    fn table_indexes_by_cookie_and_activity() {
        let mut t = FlowTable::default();
        let l: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        for (i, fid) in [
            id(7, "[fd00::1]:53"),
            id(7, "0.0.0.0:0"),
            id(7, "10.0.0.2:53"),
            id(8, "10.0.0.2:53"),
            id(6, "255.255.255.255:65535"),
        ]
        .into_iter()
        .enumerate()
        {
            t.insert(fid, Flow::new(l, Family::V4, i as u64), i as u64);
        }
        let mut ids = vec![id(1, "1.1.1.1:1")];
        t.of_cookie(7, &mut ids);
        assert_eq!(
            ids,
            vec![
                id(7, "0.0.0.0:0"),
                id(7, "10.0.0.2:53"),
                id(7, "[fd00::1]:53")
            ]
        );
        assert!(t.has_cookie(6) && !t.has_cookie(9));
        assert_eq!(t.least_active(), Some(id(7, "[fd00::1]:53")));
        t.touch(&id(7, "[fd00::1]:53"), 10);
        t.touch(&id(7, "0.0.0.0:0"), 0);
        assert_eq!(t.least_active(), Some(id(7, "0.0.0.0:0")));
        assert_eq!(t.last_activity(&id(7, "[fd00::1]:53")), Some(10));
        t.remove(&id(7, "0.0.0.0:0"));
        assert_eq!(t.least_active(), Some(id(7, "10.0.0.2:53")));
        assert_eq!(t.len(), 4);
    }

    mod least_active {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Clone, Debug)]
        enum Op {
            Insert(u64, u8, u64, u16),
            Touch(u64, u8, u64),
            SetPort(u64, u8, u16),
            Remove(u64, u8),
            Evict,
        }

        fn op() -> impl Strategy<Value = Op> {
            let (cookie, peer, ts) = (1..6u64, 0..6u8, 0..40u64);
            prop_oneof![
                3 => (cookie.clone(), peer.clone(), ts.clone(), 0..3u16)
                    .prop_map(|(c, p, t, l)| Op::Insert(c, p, t, l)),
                4 => (cookie.clone(), peer.clone(), ts).prop_map(|(c, p, t)| Op::Touch(c, p, t)),
                1 => (cookie.clone(), peer.clone(), 0..3u16)
                    .prop_map(|(c, p, l)| Op::SetPort(c, p, l)),
                1 => (cookie, peer).prop_map(|(c, p)| Op::Remove(c, p)),
                3 => Just(Op::Evict),
            ]
        }

        fn fid(cookie: u64, peer: u8) -> FlowId {
            let remote = match peer {
                5 => "[fd00::5]:53".parse().unwrap(),
                p => SocketAddr::new(IpAddr::from([10, 0, 0, p]), 53),
            };
            FlowId { cookie, remote }
        }

        proptest! {
            /// The lazily kept order by activity (and the socket lists, and the flows' local
            /// ports) against plain maps.
            #[test]
            fn matches_a_full_ordering(ops in prop::collection::vec(op(), 1..300)) {
                let mut t = FlowTable::default();
                let mut model: BTreeMap<FlowId, u64> = BTreeMap::new();
                let mut ports: BTreeMap<FlowId, u16> = BTreeMap::new();
                let l = |port| SocketAddr::new(IpAddr::from([10, 0, 0, 1]), port);
                for op in ops {
                    match op {
                        Op::Insert(c, p, ts, port) => {
                            t.insert(fid(c, p), Flow::new(l(port), Family::V4, ts), ts);
                            model.insert(fid(c, p), ts);
                            ports.insert(fid(c, p), port);
                        }
                        Op::SetPort(c, p, port) => {
                            if let Some(r) = t.find(&fid(c, p)) {
                                t.set_local(r, l(port));
                                ports.insert(fid(c, p), port);
                            }
                        }
                        Op::Touch(c, p, ts) => {
                            t.touch(&fid(c, p), ts);
                            if let Some(at) = model.get_mut(&fid(c, p)) {
                                *at = (*at).max(ts);
                            }
                        }
                        Op::Remove(c, p) => {
                            let gone = t.remove(&fid(c, p)).is_some();
                            prop_assert_eq!(gone, model.remove(&fid(c, p)).is_some());
                            ports.remove(&fid(c, p));
                        }
                        Op::Evict => {
                            let want = model.iter().map(|(id, at)| (*at, *id)).min();
                            prop_assert_eq!(t.least_active(), want.map(|(_, id)| id));
                            if let Some((_, id)) = want {
                                t.remove(&id);
                                model.remove(&id);
                                ports.remove(&id);
                            }
                        }
                    }
                    prop_assert_eq!(t.len(), model.len());
                    prop_assert_eq!(t.ids(), model.keys().copied().collect::<Vec<_>>());
                    for c in 1..6 {
                        let of: Vec<_> = model.keys().filter(|id| id.cookie == c).copied().collect();
                        prop_assert_eq!(t.has_cookie(c), !of.is_empty());
                        let mut ids = Vec::new();
                        t.of_cookie(c, &mut ids);
                        prop_assert_eq!(ids, of);
                    }
                    for (id, at) in &model {
                        prop_assert_eq!(t.last_activity(id), Some(*at));
                    }
                    for (id, port) in &ports {
                        let local = t.find(id).and_then(|r| t.get(r)).map(|f| f.local().port());
                        prop_assert_eq!(local, Some(*port));
                    }
                }
            }
        }
    }

    #[test]
    fn counters_merge_keeps_the_newest_view() {
        let mut a = Counters {
            tx_datagrams: 1,
            tx_bytes: 3,
            first_ns: 100,
            last_tx_ns: 100,
            ..Counters::default()
        };
        a.merge(&Counters {
            tx_datagrams: 4,
            tx_bytes: 20,
            rx_datagrams: 1,
            rx_bytes: 4,
            first_ns: 90,
            last_tx_ns: 400,
            last_rx_ns: 300,
        });
        a.merge(&Counters::default());
        assert_eq!(
            a,
            Counters {
                tx_datagrams: 4,
                tx_bytes: 20,
                rx_datagrams: 1,
                rx_bytes: 4,
                first_ns: 90,
                last_tx_ns: 400,
                last_rx_ns: 300,
            }
        );
        assert_eq!(a.last_ns(), 400);
    }

    #[test]
    fn a_recreated_kernel_entry_adds_to_what_the_old_one_counted() {
        let mut f = Flow::new("10.0.0.1:53".parse().unwrap(), Family::V4, 100);
        let old = Counters {
            tx_datagrams: 5,
            tx_bytes: 50,
            rx_datagrams: 4,
            rx_bytes: 40,
            first_ns: 100,
            last_tx_ns: 500,
            last_rx_ns: 450,
        };
        assert!(!f.absorb(&old));
        // The same entry read again, grown: no renewal, the newest view wins.
        let grown = Counters {
            tx_datagrams: 6,
            tx_bytes: 60,
            last_tx_ns: 600,
            ..old
        };
        assert!(!f.absorb(&grown));
        assert_eq!(f.counters, grown);
        // Evicted by the kernel, then recreated by the next datagram at 900.
        let new = Counters {
            tx_datagrams: 1,
            tx_bytes: 10,
            rx_datagrams: 0,
            rx_bytes: 0,
            first_ns: 900,
            last_tx_ns: 900,
            last_rx_ns: 0,
        };
        assert!(f.absorb(&new));
        let expect = Counters {
            tx_datagrams: 7,
            tx_bytes: 70,
            rx_datagrams: 4,
            rx_bytes: 40,
            first_ns: 100,
            last_tx_ns: 900,
            last_rx_ns: 450,
        };
        assert_eq!(f.counters, expect);
        // Later reads of the new entry keep adding to the old one's totals, once.
        let newer = Counters {
            tx_datagrams: 2,
            tx_bytes: 20,
            rx_datagrams: 1,
            rx_bytes: 8,
            last_tx_ns: 950,
            last_rx_ns: 960,
            ..new
        };
        assert!(!f.absorb(&newer));
        assert_eq!(
            f.counters,
            Counters {
                tx_datagrams: 8,
                tx_bytes: 80,
                rx_datagrams: 5,
                rx_bytes: 48,
                last_tx_ns: 950,
                last_rx_ns: 960,
                ..expect
            }
        );
    }

    #[test]
    fn flow_key_matches_the_kernel_layout() {
        let k = FlowKey::from(&id(42, "10.200.0.2:12345"));
        assert_eq!((k.cookie, k.rport, k.family), (42, 12345, AF_INET));
        assert_eq!(k.remote[..4], [10, 200, 0, 2]);
        assert!(k.remote[4..].iter().all(|&b| b == 0));
        let k = FlowKey::from(&id(1, "[fd00:200::2]:7000"));
        assert_eq!(k.family, AF_INET6);
        assert_eq!(k.remote[0..2], [0xfd, 0]);
        assert_eq!(k.remote[15], 2);
    }
}
