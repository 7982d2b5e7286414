//! Peers across flows: SILENT and RESUMED with scope `peer`.
//!
//! Resolvers and forwarders (dnsmasq, unbound, systemd-resolved, glibc's stub resolver) send
//! each query from a fresh socket and port, so each flow carries one datagram: when their
//! upstream vanishes, no flow is ever established and no flow-level SILENT can fire. The
//! silence shows only across the flows, so the engine keeps per-peer state as well.
//!
//! Rules (decided here; the README and `report/json.rs` describe the output):
//! - A peer is one remote address:port as seen by one program in one network namespace:
//!   key (netns, program name, remote). The program name is the process's (its main
//!   thread's), or the thread's when the process's is unknown. Keyed by name rather than by
//!   pid so that a pool of workers or forks of one daemon, and the short-lived processes of
//!   a script that each resolve through glibc (a new pid per query), count as one client of
//!   their shared upstream: by pid they would rarely reach two flows. The price: unrelated
//!   programs of one name in one namespace talking to one peer count as one client; since an
//!   answer to any of them ends the silence, merging can hide a silence, never invent one.
//! - Only flows the local side opened take part: first datagram sent, connect(), a connected
//!   socket found at startup, a flow first seen through an ICMP error. A peer that spoke
//!   first is a client of ours; our answers to it are not questions it owes a reply to.
//! - Multicast and broadcast destinations are no peers: the answers to a discovery (SSDP,
//!   mDNS, DHCP) come from the responders' own addresses, never from the group's.
//! - An episode is what a peer left unanswered since its last answer: the flows that sent to
//!   it and the datagrams they sent. A send counts as soon as it is seen (the first datagram
//!   of a flow is an event; later ones come from the counters read at each tick, and at
//!   CLOSE), so a resolver's query is unanswered so far without waiting for its socket to
//!   close. Counts are lower bounds: sends that may have preceded the answer are not counted.
//! - SILENT (scope peer) when an episode has at least two flows and `--silent-min-sends`
//!   datagrams, the first of them at least `--silent-after` old, and no ICMP error came for
//!   the peer since. Measured from the first unanswered datagram rather than from the last
//!   answer: a resolver queried rarely must have had `--silent-after` to answer. A peer that
//!   never answered since udpmon first saw it is reported the same way, marked so.
//! - Any datagram from the peer on any of these flows ends the episode; after a peer-scope
//!   SILENT it is a peer-scope RESUMED. An ICMP error for the peer (on a flow, or for a
//!   socket already closed, through the port's last owner) ends the episode too, without a
//!   RESUMED: the flow's UNREACHABLE says what happened, and a peer that answers with errors
//!   is not silent.
//! - One report per silence: a peer whose flow is in a reported flow-level SILENT does not
//!   report its own SILENT (the flow already said it, and the peer's RESUMED would only repeat
//!   the flow's); a flow whose peer is in a reported peer-level SILENT does not report its
//!   SILENT nor, later, its RESUMED. Whichever scope notices first reports. When a peer's
//!   silence ends but one of its flows still hears nothing, that flow's silence is its own
//!   from then on and may be reported at flow scope.
//! - UNREACHABLE folded per peer (issue 15, item 3; only with the summaries on): a resolver
//!   whose upstream rejects every query draws one ICMP error per query, each on a fresh flow,
//!   so per-flow deduplication cannot help. A run (the "episode"; here that word
//!   names a silence) is a series of errors of one type, code and verdict for the peer: its
//!   first UNREACHABLE is printed at once, the next ones are counted, and every summary
//!   interval in which some were counted ends with a SUMMARY with scope peer. The run ends
//!   when the peer answers, when an error of another kind comes (whose UNREACHABLE is
//!   printed, starting the next run), or after the idle timeout without an error. A flow
//!   its busy socket summarises is rate-limited there instead (`summary.rs`). Runs are held
//!   for at most `--max-flows` peers at once; beyond that, errors are printed as they come.
//! - Memory: at most `--max-flows` peers. Peers with live flows are never evicted (there are
//!   at most `--max-flows` of those, so a flowless one is always there to evict when the table
//!   is full); among the others the least recently used goes, and is counted. An evicted
//!   peer that comes back starts afresh, as never answered.
use std::{
    hash::{BuildHasher, Hash, Hasher},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use super::{
    anywhere,
    flow::{Addr, Counters, low32},
    owners::Held,
    report::{
        Detail, Identity, Name, PeerSummary, Report, ReportKind, Unanswered, UnreachableInfo,
    },
};
use crate::decode::{Family, Verdict};

/// Whether datagrams from `remote` can answer what was sent to it (see the module's rules).
pub(super) fn can_answer(remote: &SocketAddr) -> bool {
    match remote.ip() {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !a.is_multicast(),
    }
}

/// Who a peer is (see the module's rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PeerKey {
    program: Name,
    at: PeerAddr,
}

/// A peer's key but its program: what the table keeps of a key, since the program is its
/// owner's (every flow that joins a peer has an owner of that program).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerAddr {
    netns: u32,
    /// As bytes: a `SocketAddr` would make it half as large again.
    ip: [u8; 16],
    port: u16,
    v6: bool,
}

impl Hash for PeerKey {
    // Word-sized writes: the derived hash feeds the name and the address byte by byte, and
    // hashing was the largest cost of a new flow's peer lookup.
    fn hash<H: Hasher>(&self, h: &mut H) {
        let a = &self.at;
        h.write_u128(self.program.word());
        h.write_u128(u128::from_ne_bytes(a.ip));
        h.write_u64(u64::from(a.netns) << 32 | u64::from(a.port) << 8 | u64::from(a.v6));
    }
}

/// The program a peer is keyed by: the process's name, or the thread's when that is unknown.
fn program(owner: &Identity) -> Name {
    if owner.process.is_empty() {
        owner.comm
    } else {
        owner.process
    }
}

impl PeerKey {
    pub fn new(owner: &Identity, netns: u32, remote: SocketAddr) -> Self {
        let (ip, v6) = match remote.ip() {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), false),
            IpAddr::V6(a) => (a.octets(), true),
        };
        Self {
            program: program(owner),
            at: PeerAddr {
                netns,
                ip,
                port: remote.port(),
                v6,
            },
        }
    }

    /// The key of the peer in `slot`, whose address is `at`.
    fn of(at: PeerAddr, slot: &Slot) -> Self {
        Self {
            program: program(slot.peer.owner.learned()),
            at,
        }
    }

    #[cfg(test)]
    fn remote(&self) -> SocketAddr {
        self.at.remote()
    }
}

impl PeerAddr {
    fn remote(&self) -> SocketAddr {
        let a = Ipv6Addr::from(self.ip);
        let ip = match a.to_ipv4_mapped() {
            Some(v4) if !self.v6 => IpAddr::V4(v4),
            _ => IpAddr::V6(a),
        };
        SocketAddr::new(ip, self.port)
    }
}

/// A flow's tie to its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PeerLink {
    /// Slot in the peer table; [`PeerLink::NONE`] for flows that take no part.
    pub idx: u32,
    /// The peer's episode in which this flow's sends were last counted (0: never).
    pub epoch: u32,
    /// The flow's datagrams sent that the peer has already been told about, modulo 2^32:
    /// only the difference to the flow's count is wanted, and a flow cannot send 2^32
    /// datagrams between two looks at it (a second apart while it sends).
    pub credited_tx: u32,
    /// Of those, the ones counted as unanswered in `epoch`: taken back when this flow
    /// brings the answer.
    pub counted: u32,
}

impl PeerLink {
    pub const NONE: PeerLink = PeerLink {
        idx: NIL,
        epoch: 0,
        credited_tx: 0,
        counted: 0,
    };

    pub fn is_linked(&self) -> bool {
        self.idx != NIL
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Silence {
    None,
    /// SILENT was reported with scope peer.
    Reported,
    /// Silent, but one of its flows had already reported it at flow scope.
    Covered,
}

#[derive(Debug)]
struct Peer {
    /// The process of its most recent flow (its netns is the key's, not this one's).
    owner: Arc<Held>,
    family: Family,
    /// The flows' local address (`None` until one is known): the port becomes 0 once they
    /// used several ports, the address the wildcard once they used several addresses.
    local: Option<Addr>,
    /// When udpmon first saw a flow to it.
    first_seen_ns: u64,
    /// The peer's last datagram on any of its flows (0: none seen).
    last_answer_ns: u64,
    /// The last ICMP error for it (0: none).
    last_icmp_ns: u64,
    /// Bumped whenever an episode ends, so that flows count anew.
    epoch: u32,
    unanswered_flows: u32,
    unanswered_sends: u64,
    /// When the first unanswered datagram was sent (a late bound; 0: none).
    unanswered_since_ns: u64,
    silence: Silence,
    /// Its flows in a reported flow-level SILENT.
    silent_flows: u32,
    /// Its live flows.
    flows: u32,
    /// Its slot is in [`PeerTable::candidates`]. The slot's, not the peer's: a new peer in
    /// a reused slot inherits it with the slot's entry, so that no slot is listed twice.
    listed: bool,
}

// One per remembered peer, and per flow when each flow has a peer of its own.
const _: () = assert!(size_of::<Peer>() <= 88);

/// Sentinel index: no slot.
const NIL: u32 = u32::MAX;

struct Slot {
    peer: Peer,
    /// Neighbours in the list of peers without live flows, least recently used first.
    prev: u32,
    next: u32,
}

/// The slots' keys, and a hash table of slot numbers over them: each key is held once, and
/// a table entry is 4 bytes instead of a key's copy. A key's program is its slot's owner's,
/// so the methods that compare or hash keys take the slots.
struct PeerIndex {
    /// By slot.
    addrs: Vec<PeerAddr>,
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl PeerIndex {
    fn new() -> Self {
        Self {
            addrs: Vec::new(),
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    /// The hash [`PeerIndex::get`] and [`PeerIndex::insert`] take: a new peer is looked up
    /// and then filed, and its key hashed once for both.
    fn hash(&self, key: &PeerKey) -> u64 {
        self.hasher.hash_one(key)
    }

    fn get(&self, key: &PeerKey, hash: u64, slots: &[Slot]) -> Option<u32> {
        let addrs = &self.addrs;
        self.table
            .find(hash, |&i| {
                addrs[i as usize] == key.at
                    && program(slots[i as usize].peer.owner.learned()) == key.program
            })
            .copied()
    }

    /// Files `key` (whose hash is `hash`) under slot `i`, the next slot or one whose key was
    /// removed, whose peer is already the key's.
    fn insert(&mut self, key: PeerKey, hash: u64, i: u32, slots: &[Slot]) {
        let (addrs, hasher) = (&mut self.addrs, &self.hasher);
        match addrs.get_mut(i as usize) {
            Some(a) => *a = key.at,
            None => addrs.push(key.at),
        }
        self.table.insert_unique(hash, i, |&j| {
            hasher.hash_one(PeerKey::of(addrs[j as usize], &slots[j as usize]))
        });
    }

    /// Unfiles slot `i`, whose peer is still the key's (its address stays until the slot is
    /// reused).
    fn remove(&mut self, i: u32, slots: &[Slot]) {
        let key = PeerKey::of(self.addrs[i as usize], &slots[i as usize]);
        if let Ok(e) = self
            .table
            .find_entry(self.hasher.hash_one(key), |&j| j == i)
        {
            e.remove();
        }
    }
}

/// A peer's run of one ICMP error (see the module's rules).
#[derive(Debug)]
struct ErrorRun {
    /// The first error, as its UNREACHABLE showed it.
    first: UnreachableInfo,
    /// Start of the current summary interval (the first error, or the last summary).
    since_ns: u64,
    last_ns: u64,
    /// UNREACHABLE events in the interval, printed or not, and those not printed.
    unreachable: u64,
    folded: u64,
}

impl ErrorRun {
    fn kind(&self) -> (u8, u8, Verdict) {
        (self.first.ty, self.first.code, self.first.verdict)
    }
}

/// The peers, bounded: a slab indexed by key, with an intrusive LRU list of the flowless.
pub(super) struct PeerTable {
    index: PeerIndex,
    slots: Vec<Slot>,
    idle_head: u32,
    idle_tail: u32,
    cap: usize,
    evicted: u64,
    /// Error runs, by slot: few peers have one.
    runs: HashMap<u32, ErrorRun>,
    /// Summaries of runs whose peer was evicted, for the next interval's end.
    orphans: Vec<Report>,
    /// The slots whose peer may meet the SILENT rule at some tick (see
    /// [`Peer::may_go_silent`]), each at most once (its `listed`): `tick` looks at these
    /// only, not at every peer.
    candidates: Vec<u32>,
}

impl Peer {
    fn new(owner: Arc<Held>, family: Family, ts_ns: u64) -> Self {
        Self {
            owner,
            family,
            local: None,
            first_seen_ns: ts_ns,
            last_answer_ns: 0,
            last_icmp_ns: 0,
            epoch: 1,
            unanswered_flows: 0,
            unanswered_sends: 0,
            unanswered_since_ns: 0,
            silence: Silence::None,
            silent_flows: 0,
            flows: 1,
            listed: false,
        }
    }

    /// Whether the SILENT rule may fire for it at some tick: `min_sends` and the time are
    /// the tick's. Only `sync` makes this true, and nothing but the episode's end or a
    /// silence makes it false again.
    fn may_go_silent(&self) -> bool {
        self.silence == Silence::None && self.unanswered_flows >= 2 && self.unanswered_sends > 0
    }

    /// Folds in a flow's local address (see `local`).
    fn merge_local(&mut self, seen: SocketAddr) {
        // A connect() seen before the socket was bound says nothing yet.
        if seen.ip().is_unspecified() {
            return;
        }
        let Some(cur) = &mut self.local else {
            self.local = Some(Addr::new(seen));
            return;
        };
        let seen_packed = Addr::new(seen);
        if *cur == seen_packed {
            return;
        }
        let mut merged = cur.get();
        if merged.port() != seen.port() {
            merged.set_port(0);
        }
        if merged.ip() != seen.ip() {
            merged.set_ip(anywhere(self.family).ip());
        }
        *cur = Addr::new(merged);
    }

    fn unanswered(&self, now: u64) -> Unanswered {
        Unanswered {
            flows: self.unanswered_flows.into(),
            sends: self.unanswered_sends,
            for_ns: match self.unanswered_since_ns {
                0 => 0,
                since => now.saturating_sub(since),
            },
            last_answer_ns: (self.last_answer_ns != 0).then_some(self.last_answer_ns),
        }
    }

    /// Ends the episode (an answer or an ICMP error).
    fn end_episode(&mut self) {
        self.epoch = self.epoch.wrapping_add(1).max(1);
        self.unanswered_flows = 0;
        self.unanswered_sends = 0;
        self.unanswered_since_ns = 0;
        self.silence = Silence::None;
    }

    /// Since when the peer has not been heard: its last answer, or its first sighting.
    fn heard_ns(&self) -> u64 {
        match self.last_answer_ns {
            0 => self.first_seen_ns,
            t => t,
        }
    }

    /// The SUMMARY of a run's interval, ending it at `now`; none when it folded nothing
    /// (its errors were printed).
    fn run_summary(&self, at: &PeerAddr, e: &mut ErrorRun, now: u64) -> Option<Report> {
        let folded = std::mem::take(&mut e.folded);
        let unreachable = std::mem::take(&mut e.unreachable);
        let since = std::mem::replace(&mut e.since_ns, now);
        if folded == 0 {
            return None;
        }
        let detail = Detail::PeerSummary(Box::new(PeerSummary {
            interval_ns: now.saturating_sub(since),
            icmp: e.first.clone(),
            unreachable,
            folded,
        }));
        Some(self.report(at, ReportKind::Summary, now, detail))
    }

    fn report(&self, at: &PeerAddr, kind: ReportKind, ts_ns: u64, detail: Detail) -> Report {
        let o = self.owner.now();
        // A process that has exited since is no pid, but the peer is still its program's.
        let owner = Identity {
            process: if o.tgid == 0 {
                program(self.owner.learned())
            } else {
                o.process
            },
            netns: at.netns,
            ..*o
        };
        // No one socket: the flows each had their own.
        Report::new(
            kind,
            ts_ns,
            0,
            (&owner, at.netns),
            self.family,
            (
                self.local.map_or_else(|| anywhere(self.family), Addr::get),
                at.remote(),
            ),
            detail,
        )
    }
}

impl PeerTable {
    pub fn new(cap: usize) -> Self {
        Self {
            index: PeerIndex::new(),
            slots: Vec::new(),
            idle_head: NIL,
            idle_tail: NIL,
            cap: cap.max(1),
            evicted: 0,
            runs: HashMap::new(),
            orphans: Vec::new(),
            candidates: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Peers dropped to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.idle_head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.idle_tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        let s = &mut self.slots[i as usize];
        s.prev = NIL;
        s.next = NIL;
    }

    fn push_idle(&mut self, i: u32) {
        let tail = self.idle_tail;
        {
            let s = &mut self.slots[i as usize];
            s.prev = tail;
            s.next = NIL;
        }
        match tail {
            NIL => self.idle_head = i,
            t => self.slots[t as usize].next = i,
        }
        self.idle_tail = i;
    }

    /// Ties a new flow to its peer, creating the peer (and evicting the least recently used
    /// flowless one when full). The peer is named after this, its most recent, flow's owner.
    pub fn attach(
        &mut self,
        owner: &Arc<Held>,
        (netns, remote): (u32, SocketAddr),
        family: Family,
        local: SocketAddr,
        ts_ns: u64,
    ) -> PeerLink {
        // As learned, as the last owner of a closed port is (an ICMP error after the socket
        // closed finds its peer by that one).
        let key = PeerKey::new(owner.learned(), netns, remote);
        let hash = self.index.hash(&key);
        let idx = if let Some(i) = self.index.get(&key, hash, &self.slots) {
            if self.slots[i as usize].peer.flows == 0 {
                self.unlink(i);
            }
            let p = &mut self.slots[i as usize].peer;
            p.flows += 1;
            p.owner = Arc::clone(owner);
            i
        } else {
            let peer = Peer::new(Arc::clone(owner), family, ts_ns);
            let i = if self.slots.len() < self.cap {
                self.slots.push(Slot {
                    peer,
                    prev: NIL,
                    next: NIL,
                });
                (self.slots.len() - 1) as u32
            } else {
                let victim = self.idle_head;
                if victim == NIL {
                    // Cannot happen while the cap is at least --max-flows (see the module's
                    // rules); the flow then simply takes no part.
                    return PeerLink::NONE;
                }
                self.unlink(victim);
                if let Some(mut e) = self.runs.remove(&victim) {
                    let s = &self.slots[victim as usize];
                    let at = &self.index.addrs[victim as usize];
                    // Covering the run up to now, reported at the interval's end.
                    if let Some(r) = s.peer.run_summary(at, &mut e, ts_ns) {
                        self.orphans.push(r);
                    }
                }
                self.index.remove(victim, &self.slots);
                // The slot's entry in `candidates` stays: `tick` drops it unless the new
                // peer qualifies by then.
                let listed = self.slots[victim as usize].peer.listed;
                self.slots[victim as usize].peer = Peer { listed, ..peer };
                self.evicted += 1;
                victim
            };
            self.index.insert(key, hash, i, &self.slots);
            i
        };
        self.slots[idx as usize].peer.merge_local(local);
        PeerLink {
            idx,
            epoch: 0,
            credited_tx: 0,
            counted: 0,
        }
    }

    /// A flow ends: its peer loses a live flow (and a flow-level SILENT, if it had one).
    pub fn detach(&mut self, link: &PeerLink, flow_silence_reported: bool) {
        let Some(s) = self.slots.get_mut(link.idx as usize) else {
            return;
        };
        let p = &mut s.peer;
        p.flows = p.flows.saturating_sub(1);
        if flow_silence_reported {
            p.silent_flows = p.silent_flows.saturating_sub(1);
        }
        if p.flows == 0 {
            self.push_idle(link.idx);
        }
    }

    /// Tells the peer what a flow's counters show now: answers (which end the episode, with
    /// a RESUMED after a peer-scope SILENT) and datagrams sent since the last call.
    pub fn sync(
        &mut self,
        link: &mut PeerLink,
        c: &Counters,
        local: SocketAddr,
        opened_ns: u64,
        out: &mut Vec<Report>,
    ) {
        let Some(s) = self.slots.get_mut(link.idx as usize) else {
            return;
        };
        let p = &mut s.peer;
        p.merge_local(local);
        if c.rx_datagrams > 0 && c.last_rx_ns > p.last_answer_ns {
            let at = c.last_rx_ns;
            if link.epoch == p.epoch {
                // What this flow sent was answered.
                p.unanswered_flows = p.unanswered_flows.saturating_sub(1);
                p.unanswered_sends = p.unanswered_sends.saturating_sub(link.counted.into());
            }
            let unanswered = p.unanswered(at);
            let quiet_ns = at.saturating_sub(p.heard_ns());
            let reported = p.silence == Silence::Reported;
            p.last_answer_ns = at;
            p.end_episode();
            if !self.runs.is_empty()
                && let Some(mut e) = self.runs.remove(&link.idx)
            {
                // The peer answers: its run of errors is over.
                let addr = &self.index.addrs[link.idx as usize];
                out.extend(p.run_summary(addr, &mut e, at));
            }
            if reported {
                let detail = Detail::PeerResumed {
                    quiet_ns,
                    unanswered,
                };
                let addr = &self.index.addrs[link.idx as usize];
                out.push(p.report(addr, ReportKind::Resumed, at, detail));
            }
        }
        let sent = low32(c.tx_datagrams);
        let new = sent.wrapping_sub(link.credited_tx);
        if new == 0 {
            return;
        }
        link.credited_tx = sent;
        let answered_or_refused = p.last_answer_ns.max(p.last_icmp_ns);
        if c.last_tx_ns <= answered_or_refused {
            // Every one of them went out before the last answer or error.
            return;
        }
        let counted = if link.epoch == p.epoch {
            new
        } else {
            link.epoch = p.epoch;
            link.counted = 0;
            p.unanswered_flows = p.unanswered_flows.saturating_add(1);
            // Sends of a flow older than the episode may have preceded its start: only the
            // last one surely did not.
            if opened_ns > answered_or_refused {
                new
            } else {
                1
            }
        };
        if p.unanswered_sends == 0 {
            p.unanswered_since_ns = c.last_tx_ns;
        }
        p.unanswered_sends += u64::from(counted);
        link.counted = link.counted.saturating_add(counted);
        if !p.listed && p.may_go_silent() {
            p.listed = true;
            self.candidates.push(link.idx);
        }
    }

    /// An ICMP error for the peer: whatever silence there was is an error instead. Every
    /// error for a peer passes here (its UNREACHABLE, when there is one, then through
    /// [`PeerTable::unreachable`]).
    pub fn icmp(&mut self, idx: u32, ts_ns: u64) {
        if let Some(s) = self.slots.get_mut(idx as usize) {
            s.peer.last_icmp_ns = s.peer.last_icmp_ns.max(ts_ns);
            s.peer.end_episode();
        }
    }

    /// The peer's slot, if it is remembered.
    pub fn find(&self, key: &PeerKey) -> Option<u32> {
        self.index.get(key, self.index.hash(key), &self.slots)
    }

    /// A new UNREACHABLE for the peer (one per flow and error; see the module's rules):
    /// whether it is printed, or counted in its run.
    pub fn unreachable(
        &mut self,
        idx: u32,
        info: &UnreachableInfo,
        ts_ns: u64,
        idle_ns: u64,
        out: &mut Vec<Report>,
    ) -> bool {
        let Some(s) = self.slots.get(idx as usize) else {
            return true;
        };
        let kind = (info.ty, info.code, info.verdict);
        let same = self.runs.get_mut(&idx).map(|e| {
            let same = e.kind() == kind && ts_ns.saturating_sub(e.last_ns) < idle_ns;
            if same {
                e.last_ns = e.last_ns.max(ts_ns);
                e.unreachable += 1;
                e.folded += 1;
            }
            same
        });
        match same {
            Some(true) => return false,
            // Another error, or one after a long quiet: a new run.
            Some(false) => {
                if let Some(mut old) = self.runs.remove(&idx) {
                    let at = &self.index.addrs[idx as usize];
                    out.extend(s.peer.run_summary(at, &mut old, ts_ns));
                }
            }
            None => {}
        }
        if self.runs.len() < self.cap {
            self.runs.insert(
                idx,
                ErrorRun {
                    first: info.clone(),
                    since_ns: ts_ns,
                    last_ns: ts_ns,
                    unreachable: 1,
                    folded: 0,
                },
            );
        }
        true
    }

    /// At a summary interval's end: a SUMMARY for each peer whose run folded errors in it,
    /// and the end of the runs without an error for `idle_ns`.
    pub fn end_interval(&mut self, now: u64, idle_ns: u64, out: &mut Vec<Report>) {
        let mut reports = std::mem::take(&mut self.orphans);
        let (slots, addrs) = (&self.slots, &self.index.addrs);
        self.runs.retain(|&idx, e| {
            let p = &slots[idx as usize].peer;
            reports.extend(p.run_summary(&addrs[idx as usize], e, now));
            now.saturating_sub(e.last_ns) < idle_ns
        });
        // A stable order, whatever the table's.
        reports.sort_by(|a, b| {
            (a.who.netns, &a.who.process, a.remote).cmp(&(b.who.netns, &b.who.process, b.remote))
        });
        out.extend(reports);
    }

    #[cfg(test)]
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// A flow of this peer meets the flow-level SILENT rule: whether it reports it (not when
    /// the peer already did at peer scope).
    pub fn flow_goes_silent(&mut self, link: &PeerLink) -> bool {
        let Some(s) = self.slots.get_mut(link.idx as usize) else {
            return true;
        };
        if s.peer.silence == Silence::Reported {
            return false;
        }
        s.peer.silent_flows += 1;
        true
    }

    /// A flow's reported flow-level SILENT ended (RESUMED, or an ICMP error).
    pub fn flow_silence_ended(&mut self, link: &PeerLink) {
        if let Some(s) = self.slots.get_mut(link.idx as usize) {
            s.peer.silent_flows = s.peer.silent_flows.saturating_sub(1);
        }
    }

    /// Whether the peer is in a SILENT reported at peer scope.
    pub fn reported_silent(&self, link: &PeerLink) -> bool {
        self.slots
            .get(link.idx as usize)
            .is_some_and(|s| s.peer.silence == Silence::Reported)
    }

    /// The peer-scope SILENT rule, for every peer that may meet it.
    pub fn tick(&mut self, now: u64, silent_after_ns: u64, min_sends: u64, out: &mut Vec<Report>) {
        let (slots, addrs) = (&mut self.slots, &self.index.addrs);
        // Slot order, as a walk of every slot would report them.
        self.candidates.sort_unstable();
        self.candidates.retain(|&i| {
            let p = &mut slots[i as usize].peer;
            if !p.may_go_silent() {
                p.listed = false;
                return false;
            }
            if p.unanswered_sends < min_sends
                || p.unanswered_since_ns == 0
                || now.saturating_sub(p.unanswered_since_ns) < silent_after_ns
            {
                return true;
            }
            p.listed = false;
            if p.silent_flows > 0 {
                p.silence = Silence::Covered;
                return false;
            }
            p.silence = Silence::Reported;
            let detail = Detail::PeerSilent {
                no_reply_ns: now.saturating_sub(p.heard_ns()),
                unanswered: p.unanswered(now),
            };
            out.push(p.report(&addrs[i as usize], ReportKind::Silent, now, detail));
            false
        });
    }

    #[cfg(test)]
    /// Live flows and flows in a reported flow-level SILENT, per peer slot; and whether the
    /// peer is in a SILENT reported at peer scope.
    pub fn census(&self) -> Vec<(u32, u32, bool)> {
        self.slots
            .iter()
            .map(|s| {
                let p = &s.peer;
                (p.flows, p.silent_flows, p.silence == Silence::Reported)
            })
            .collect()
    }

    #[cfg(test)]
    pub fn cap(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(process: &str) -> Arc<Held> {
        Arc::new(Held::new(owner(process)))
    }

    fn owner(process: &str) -> Identity {
        Identity {
            tgid: 10,
            pid: 11,
            comm: process.into(),
            process: process.into(),
            uid: 0,
            cgroup: 1,
            netns: 5,
        }
    }

    fn remote(n: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::from([10, 0, 0, n]), 53)
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::from([10, 0, 0, 1]), port)
    }

    #[test]
    fn a_peer_is_its_process_or_else_its_threads() {
        let k = PeerKey::new(
            &Identity {
                process: Name::EMPTY,
                ..owner("isc-net-0000")
            },
            5,
            local(53),
        );
        assert_eq!(k.program, "isc-net-0000");
        for remote in ["10.0.0.9:53", "[fd00::9]:53", "[::ffff:10.0.0.9]:53"] {
            let a: SocketAddr = remote.parse().unwrap();
            assert_eq!(PeerKey::new(&owner("dig"), 5, a).remote(), a);
        }
        assert_ne!(
            PeerKey::new(&owner("dig"), 5, "10.0.0.9:53".parse().unwrap()),
            PeerKey::new(&owner("dig"), 5, "[::ffff:10.0.0.9]:53".parse().unwrap())
        );
    }

    #[test]
    fn local_keeps_the_address_and_drops_a_varying_port() {
        let mut t = PeerTable::new(4);
        let a = t.attach(&held("dnsmasq"), (5, remote(9)), Family::V4, local(4000), 1);
        let p = |t: &PeerTable| t.slots[a.idx as usize].peer.local.map(Addr::get);
        assert_eq!(p(&t), Some(local(4000)));
        t.attach(&held("dnsmasq"), (5, remote(9)), Family::V4, local(4000), 2);
        assert_eq!(p(&t), Some(local(4000)), "one socket address, kept");
        t.attach(&held("dnsmasq"), (5, remote(9)), Family::V4, local(4001), 3);
        assert_eq!(p(&t), Some(local(0)));
        let other = SocketAddr::new(IpAddr::from([10, 0, 1, 1]), 4002);
        t.attach(&held("dnsmasq"), (5, remote(9)), Family::V4, other, 4);
        assert_eq!(p(&t), Some(anywhere(Family::V4)));
        // An address not known yet (a connect() seen before the bind) changes nothing.
        let wild = anywhere(Family::V4);
        let b = t.attach(&held("dnsmasq"), (5, remote(8)), Family::V4, wild, 5);
        assert_eq!(t.slots[b.idx as usize].peer.local, None);
        t.attach(&held("dnsmasq"), (5, remote(8)), Family::V4, local(5000), 6);
        assert_eq!(
            t.slots[b.idx as usize].peer.local.map(Addr::get),
            Some(local(5000))
        );
        // IPv6, and an IPv4 address seen v4-mapped on a dual-stack socket.
        let v6 = |ip: &str, port| SocketAddr::new(ip.parse().unwrap(), port);
        let c = t.attach(&held("d"), (5, remote(7)), Family::V6, v6("fd00::1", 53), 7);
        let p = |t: &PeerTable| t.slots[c.idx as usize].peer.local.map(Addr::get);
        assert_eq!(p(&t), Some(v6("fd00::1", 53)));
        t.attach(&held("d"), (5, remote(7)), Family::V6, v6("fd00::1", 54), 8);
        assert_eq!(p(&t), Some(v6("fd00::1", 0)));
        t.attach(
            &held("d"),
            (5, remote(7)),
            Family::V6,
            v6("::ffff:10.0.0.1", 54),
            9,
        );
        assert_eq!(p(&t), Some(anywhere(Family::V6)));
    }

    /// The sends a flow credited to its peer are kept as their low 32 bits: a count that
    /// crosses 2^32 between two looks still adds what it sent.
    #[test]
    fn sends_are_credited_across_2_pow_32() {
        let mut t = PeerTable::new(4);
        let start = u64::from(u32::MAX) - 1;
        let mut l = flow(&mut t, 1, start, 10);
        let idx = l.idx as usize;
        let p = |t: &PeerTable| t.slots[idx].peer.unanswered_sends;
        let before = p(&t);
        let mut out = Vec::new();
        t.sync(&mut l, &sent(start + 5, 20), local(4000), 10, &mut out);
        assert_eq!(p(&t), before + 5);
        assert_eq!(l.counted, u32::MAX, "saturated, not wrapped");
    }

    #[test]
    fn only_flowless_peers_are_evicted_least_recently_used_first() {
        let mut t = PeerTable::new(3);
        let a = t.attach(&held("a"), (5, remote(1)), Family::V4, local(1), 1);
        let b = t.attach(&held("b"), (5, remote(2)), Family::V4, local(2), 2);
        let c = t.attach(&held("c"), (5, remote(3)), Family::V4, local(3), 3);
        t.detach(&b, false);
        t.detach(&a, false);
        // Full: the new peer takes b's slot (flowless longest), not c's (live).
        let d = t.attach(&held("d"), (5, remote(4)), Family::V4, local(4), 4);
        assert_eq!((d.idx, t.evicted(), t.len()), (b.idx, 1, 3));
        assert_eq!(t.find(&PeerKey::new(&owner("b"), 5, remote(2))), None);
        // a comes back: the same peer, no eviction.
        let a2 = t.attach(&held("a"), (5, remote(1)), Family::V4, local(1), 5);
        assert_eq!((a2.idx, t.evicted()), (a.idx, 1));
        // Every peer has a live flow: the next one takes no part rather than evicting one.
        let e = t.attach(&held("e"), (5, remote(5)), Family::V4, local(5), 6);
        assert!(!e.is_linked());
        assert_eq!((t.evicted(), t.len()), (1, 3));
        t.detach(&c, false);
        let e = t.attach(&held("e"), (5, remote(5)), Family::V4, local(5), 7);
        assert_eq!((e.idx, t.evicted()), (c.idx, 2));
    }

    fn sent(n: u64, at: u64) -> Counters {
        Counters {
            tx_datagrams: n,
            first_ns: at,
            last_tx_ns: at,
            ..Counters::default()
        }
    }

    /// A flow to peer `n` that sent `sends` datagrams at `at`, told to the table.
    fn flow(t: &mut PeerTable, n: u8, sends: u64, at: u64) -> PeerLink {
        let mut out = Vec::new();
        let mut l = t.attach(
            &held("dnsmasq"),
            (5, remote(n)),
            Family::V4,
            local(4000),
            at,
        );
        t.sync(&mut l, &sent(sends, at), local(4000), at, &mut out);
        assert!(out.is_empty());
        l
    }

    fn listed(t: &PeerTable) -> Vec<u32> {
        let mut v = t.candidates.clone();
        v.sort_unstable();
        v
    }

    #[test]
    fn tick_visits_candidates_only_and_reports_in_slot_order() {
        let mut t = PeerTable::new(8);
        let lone = flow(&mut t, 1, 5, 10);
        let a = flow(&mut t, 2, 1, 10);
        let b = flow(&mut t, 3, 1, 10);
        flow(&mut t, 3, 1, 11);
        assert_eq!(t.candidates, [b.idx], "one flow makes no candidate");
        flow(&mut t, 2, 1, 12);
        flow(&mut t, 3, 1, 13);
        assert_eq!(
            t.candidates,
            [b.idx, a.idx],
            "listed once, in the order they qualified"
        );
        let mut out = Vec::new();
        t.tick(50, 100, 2, &mut out);
        assert!(out.is_empty());
        assert_eq!(
            t.candidates,
            [a.idx, b.idx],
            "still waiting for silent_after"
        );
        t.tick(200, 100, 2, &mut out);
        let remotes: Vec<_> = out.iter().map(|r| (r.kind, r.remote)).collect();
        assert_eq!(
            remotes,
            [
                (ReportKind::Silent, remote(2)),
                (ReportKind::Silent, remote(3))
            ]
        );
        assert!(
            t.candidates.is_empty(),
            "reported: nothing left to wait for"
        );
        assert!(!t.slots[lone.idx as usize].peer.listed);
        // A silent peer's further flows do not list it again.
        flow(&mut t, 2, 1, 300);
        assert!(t.candidates.is_empty());
    }

    #[test]
    fn an_ended_episode_drops_the_candidate() {
        let mut t = PeerTable::new(8);
        let mut out = Vec::new();
        let mut a = flow(&mut t, 2, 1, 10);
        flow(&mut t, 2, 1, 11);
        assert_eq!(listed(&t), [a.idx]);
        // An answer ends the episode: the next tick drops the entry.
        let answer = Counters {
            rx_datagrams: 1,
            last_rx_ns: 20,
            ..sent(1, 10)
        };
        t.sync(&mut a, &answer, local(4000), 10, &mut out);
        t.tick(30, 100, 2, &mut out);
        assert!(out.is_empty());
        assert!(t.candidates.is_empty());
        assert!(!t.slots[a.idx as usize].peer.listed);
        // A new episode lists it again; an ICMP error ends that one too.
        flow(&mut t, 2, 1, 40);
        flow(&mut t, 2, 1, 41);
        assert_eq!(listed(&t), [a.idx]);
        t.icmp(a.idx, 42);
        t.tick(500, 100, 2, &mut out);
        assert!(out.is_empty());
        assert!(t.candidates.is_empty());
    }

    #[test]
    fn a_reused_slot_is_listed_once_and_judged_by_its_new_peer() {
        let mut t = PeerTable::new(2);
        let mut out = Vec::new();
        let a1 = flow(&mut t, 1, 1, 10);
        let a2 = flow(&mut t, 1, 1, 11);
        t.detach(&a1, false);
        t.detach(&a2, false);
        flow(&mut t, 2, 1, 12);
        // A flowless candidate is evicted: its slot's entry stays, for the new peer.
        let c1 = flow(&mut t, 3, 1, 20);
        assert_eq!((c1.idx, t.evicted()), (a1.idx, 1));
        assert_eq!(listed(&t), [c1.idx]);
        flow(&mut t, 3, 1, 21);
        assert_eq!(listed(&t), [c1.idx], "not listed twice");
        t.tick(200, 100, 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].remote, remote(3));
        assert!(t.candidates.is_empty());
        // A new peer that does not qualify: the inherited entry goes at the next tick.
        let mut t = PeerTable::new(1);
        let a1 = flow(&mut t, 1, 1, 10);
        flow(&mut t, 1, 1, 11);
        t.detach(&a1, false);
        t.detach(&a1, false);
        let b = flow(&mut t, 2, 1, 12);
        assert_eq!(listed(&t), [b.idx]);
        t.tick(200, 100, 1, &mut out);
        assert_eq!(out.len(), 1, "nothing new");
        assert!(t.candidates.is_empty());
        assert!(!t.slots[b.idx as usize].peer.listed);
    }

    /// Random attaches, sends, answers, errors, closes and evictions: every peer that may go
    /// silent is listed, once, and a tick reports what a walk of every slot would, in order.
    #[test]
    fn candidates_match_a_walk_of_every_slot() {
        let mut t = PeerTable::new(4);
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut flows: Vec<(PeerLink, Counters, u64)> = Vec::new();
        let (mut now, mut out, mut reported) = (1, Vec::new(), 0);
        for _ in 0..20_000 {
            now += 1 + next(3);
            match next(10) {
                0..=1 if flows.len() < 4 => {
                    let l = t.attach(
                        &held("d"),
                        (5, remote(next(6) as u8)),
                        Family::V4,
                        local(1),
                        now,
                    );
                    if l.is_linked() {
                        flows.push((l, Counters::default(), now));
                    }
                }
                2..=4 if !flows.is_empty() => {
                    let f = next(flows.len() as u64) as usize;
                    let (l, c, opened) = &mut flows[f];
                    c.tx_datagrams += 1 + next(2);
                    c.last_tx_ns = now;
                    t.sync(l, c, local(1), *opened, &mut out);
                }
                5 if !flows.is_empty() => {
                    let f = next(flows.len() as u64) as usize;
                    let (l, c, opened) = &mut flows[f];
                    c.rx_datagrams += 1;
                    c.last_rx_ns = now;
                    t.sync(l, c, local(1), *opened, &mut out);
                }
                6 if !t.slots.is_empty() => t.icmp(next(t.slots.len() as u64) as u32, now),
                7 if !flows.is_empty() => {
                    let (l, ..) = flows.swap_remove(next(flows.len() as u64) as usize);
                    t.detach(&l, false);
                }
                _ => {
                    let mut seen = vec![false; t.slots.len()];
                    for &i in &t.candidates {
                        assert!(
                            !std::mem::replace(&mut seen[i as usize], true),
                            "listed twice"
                        );
                    }
                    for (i, s) in t.slots.iter().enumerate() {
                        assert_eq!(s.peer.listed, seen[i]);
                        assert!(!s.peer.may_go_silent() || s.peer.listed);
                    }
                    let (after, min_sends) = (5 + next(10), 1 + next(3));
                    let want: Vec<_> = (t.slots.iter().zip(&t.index.addrs))
                        .filter(|(s, _)| {
                            let p = &s.peer;
                            p.silence == Silence::None
                                && p.unanswered_flows >= 2
                                && p.unanswered_sends >= min_sends
                                && p.unanswered_since_ns != 0
                                && now.saturating_sub(p.unanswered_since_ns) >= after
                        })
                        .map(|(_, k)| k.remote())
                        .collect();
                    out.clear();
                    t.tick(now, after, min_sends, &mut out);
                    let got: Vec<_> = out.iter().map(|r| r.remote).collect();
                    assert_eq!(got, want);
                    reported += got.len();
                    out.clear();
                }
            }
        }
        assert!(
            reported > 50 && t.evicted() > 50,
            "{reported} {}",
            t.evicted()
        );
    }
}
