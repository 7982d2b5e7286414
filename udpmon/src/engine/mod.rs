//! The lifecycle engine: decoded kernel facts in, operator-facing reports out.
//!
//! Pure: no kernel, no I/O, no clock. Time comes from the events (`ts_ns`) and from the
//! caller's ticks, both CLOCK_BOOTTIME nanoseconds; kernel counters come through a callback.
//!
//! Rules that PRODUCT.md leaves open, decided here:
//! - `Existing` (a socket present at startup) is learned silently: its identity, and for a
//!   connected socket its flow, marked pre-existing, so that later events on it have context.
//!   No CONNECT is invented for a flow whose opening was not seen, and a startup burst of
//!   lines for every socket on the host would bury the events that matter.
//! - A flow first seen through an ICMP error (its opening datagram predates udpmon or its
//!   event was lost) is likewise created without a CONNECT.
//! - Reports are transitions: a repeated UNREACHABLE (same type, code, verdict while the
//!   flow is still unreachable) and a repeated APP-ERROR (same errno, nothing else reported
//!   on the flow in between) are counted in the flow's CLOSE stats but not reported again.
//! - RESUMED ends SILENT or UNREACHABLE when the peer's last datagram is newer than the
//!   trouble, and only for a peer that had been heard before; a first reply to an
//!   unreachable flow is its ESTABLISH.
//! - After a flow's close the caller should delete its kernel entry: the kernel reports only
//!   a flow's first datagram each way, so otherwise new traffic on that flow (after an
//!   expiry, an eviction, a disconnect) would never reopen it, and its socket's close should
//!   free the entry. [`Engine::to_forget`] names them, whether their CLOSE was reported or
//!   counted in a summary.
//! - SILENT and RESUMED also have a peer scope, across the flows one program opens to one
//!   peer (a resolver's fresh socket per query); its rules, and how the two scopes share a
//!   silence, are in `peer.rs`.
//! - A busy socket's flows are summarised (SUMMARY with scope socket) rather than reported
//!   line by line; its rules are in `summary.rs`.
mod cookies;
mod flow;
mod owners;
mod peer;
mod ports;
mod report;
pub mod rules;
mod summary;

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use cookies::CookieMap;
use flow::{Addr, Flow, FlowRef, FlowTable, State, low32};
pub use flow::{Counters, FlowId};
use hashbrown::{HashMap, hash_map::Entry};
use owners::{Held, Owners, UNKNOWN};
use peer::{PeerKey, PeerTable};
use ports::Ports;
pub use report::{
    ByVerdict, CloseReason, CloseStats, Detail, Folded, Identity, Name, Op, PeerSummary, Problems,
    Report, ReportKind, Scope, SocketSummary, Trouble, Unanswered, UnreachableInfo, Via,
};
use summary::Busy;
pub use summary::SummaryConfig;

use udpmon_common::SLEEP_NS;

use crate::decode::{Fact, Family, Icmp, KernelEvent, Verdict};

/// The kernel counters of a flow, read on demand (`None`: the kernel has no entry).
pub type CountersFn<'a> = &'a dyn Fn(&FlowId) -> Option<Counters>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// An established flow whose peer has not answered for this long is SILENT.
    pub silent_after: Duration,
    /// ... provided at least this many datagrams were sent since the peer's last one.
    pub silent_min_sends: u64,
    /// A flow without traffic for this long is closed with reason `idle`; also the period of
    /// the REFUSED rate limit.
    pub idle_timeout: Duration,
    /// Most flows tracked at once (values below 1 count as 1); also the most peers
    /// remembered across flows (peer-scope SILENT).
    pub max_flows: usize,
    /// Busy-socket summaries and the folding of a peer's repeated UNREACHABLE; `None`
    /// (`--no-summary`): every line.
    pub summary: Option<SummaryConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            silent_after: Duration::from_secs(10),
            silent_min_sends: 2,
            idle_timeout: Duration::from_secs(120),
            max_flows: 65536,
            summary: Some(SummaryConfig::default()),
        }
    }
}

/// Health of the engine's own bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub flows_tracked: usize,
    pub sockets_tracked: usize,
    pub flows_opened: u64,
    pub flows_closed: u64,
    /// Flows closed to make room (`--max-flows`); each also got a CLOSE with reason evicted.
    pub flows_evicted: u64,
    /// REFUSED reports held back by the per-tuple rate limit or a full rate-limit table.
    pub refused_suppressed: u64,
    /// Events that named no usable flow (no cookie, or no remote on an unconnected socket).
    pub events_ignored: u64,
    /// Live flows whose kernel entry the kernel's LRU map dropped and a later datagram
    /// recreated: the counts between the last read and the drop are lost.
    pub kernel_entries_renewed: u64,
    /// Peers remembered across flows (at most `max_flows`).
    pub peers_tracked: usize,
    /// Peers forgotten to make room (`--max-flows`), least recently used first: their last
    /// answer and any silence in progress are lost, so a peer-scope SILENT may come late
    /// or say "never answered".
    pub peers_evicted: u64,
    /// Flows of busy sockets counted in a SUMMARY instead of reported line by line (of
    /// `flows_opened`).
    pub flows_summarised: u64,
    /// Sockets closed by [`Engine::lost_closes`]: their Close record was lost.
    pub closes_recovered: u64,
}

/// The UDP sockets open in one network namespace, as a dump of it (sock_diag) found them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenSockets {
    /// The namespace's inode, as [`Identity::netns`] names it.
    pub netns: u32,
    /// CLOCK_BOOTTIME just before the dump: a socket named since may be too new for it.
    pub since_ns: u64,
    pub cookies: HashSet<u64>,
}

/// What the engine knows about a socket. One per socket, and as many as flows when each
/// socket has one flow (a resolver's), so it is kept small: the owner is shared (see
/// [`Owners`]) and addresses are compact.
#[derive(Debug)]
struct Socket {
    owner: Option<Arc<Held>>,
    /// Last time any event named the socket, for forgetting flowless sockets.
    seen_ns: u64,
    netns: u32,
    /// Best known local address; unspecified until seen.
    local: Addr,
    /// The peer the socket is connected to, when known.
    connected: Option<Addr>,
    /// Learned at startup (sock_diag and /proc): kept until it closes, however quiet, since
    /// nothing else would name its owner again (no hook saw it being created).
    preexisting: bool,
    /// New flows are summarised (see `summary.rs`).
    summarised: bool,
    /// Flows opened in the current summary interval.
    new_flows: u32,
    /// In `Engine::flowless`, once.
    listed: bool,
    /// Neighbours in the list of open sockets on its local port, most recently named first
    /// (cookies; 0: none): see `ports.rs`.
    port_prev: u64,
    port_next: u64,
}

/// A REFUSED datagram's (netns, local, remote): reported once per idle timeout.
type RefusedKey = (u32, SocketAddr, SocketAddr);

pub struct Engine {
    cfg: EngineConfig,
    flows: FlowTable,
    sockets: CookieMap<Socket>,
    owners: Owners,
    /// [`UNKNOWN`], for a peer to share.
    unknown: Arc<Held>,
    /// The last APP-ERROR reported for a call not tied to a tracked flow (errno, remote),
    /// by socket: rare, so not a field of every socket.
    last_app_error: HashMap<u64, (i32, SocketAddr)>,
    /// Open sockets by local port, and who left each port last.
    ports: Ports,
    /// (netns, local, remote) -> time of the last REFUSED report.
    refused_at: HashMap<RefusedKey, u64>,
    /// (report time, key) of every REFUSED report: the tick forgets a key when its latest
    /// report is older than the idle timeout, instead of walking the table. An entry whose
    /// key was reported again since is stale and skipped.
    refused_expiry: BinaryHeap<Reverse<(u64, RefusedKey)>>,
    peers: PeerTable,
    /// Summaries in the making, of busy sockets and of those whose summarised flows are not
    /// all closed yet, in cookie order (the order their summaries are reported in).
    busy: BTreeMap<u64, Busy>,
    /// When the current summary interval ends (0: at the first tick, which starts it).
    interval_end_ns: u64,
    /// The flows the last call closed whose kernel entries must go (see
    /// [`Engine::to_forget`]).
    to_forget: Vec<FlowId>,
    /// A closing socket's flows, in order (kept for its room).
    closing: Vec<FlowId>,
    /// Sockets a dump of the open sockets did not find, with when that dump began (see
    /// [`Engine::lost_closes`]).
    suspects: HashMap<u64, u64>,
    /// (when it may be forgotten, cookie) of sockets that were without flows: the tick's
    /// `forget` looks at them then, rather than at every socket every tick. Sockets that
    /// close are not listed (their entries would stay for the idle timeout).
    flowless: BinaryHeap<Reverse<(u64, u64)>>,
    /// The flows the tick at `due_at` looks at, taken by [`Engine::due`].
    due: Vec<FlowRef>,
    due_at: Option<u64>,
    stats: EngineStats,
    /// Every tick looks at every flow, as before flows could sleep: for the tests that hold
    /// the two alike.
    #[cfg(test)]
    sleepless: bool,
}

/// A socket's owner as reports name it: in the socket's current namespace. A function of
/// the sockets alone, so that a report can borrow it while a flow is borrowed mutably.
fn owner_of(sockets: &CookieMap<Socket>, cookie: u64) -> (&Identity, u32) {
    match sockets.get(&cookie) {
        Some(s) => (s.owner.as_deref().map_or(&UNKNOWN, Held::now), s.netns),
        None => (&UNKNOWN, 0),
    }
}

fn unspecified(a: &SocketAddr) -> bool {
    a.ip().is_unspecified() && a.port() == 0
}

/// How early a tick may come relative to the grid of the first one (see `end_interval`).
const TICK_JITTER_NS: u64 = 100_000_000;

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn family_of(a: &SocketAddr) -> Family {
    if a.is_ipv4() { Family::V4 } else { Family::V6 }
}

/// The address of no particular peer, for the reports about many.
fn anywhere(family: Family) -> SocketAddr {
    let ip = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Whether `seen` is a more precise local address than the one known, on `port`: a new port
/// replaces the old one (a disconnect can re-bind), and a specific address replaces a
/// wildcard one on the same port. Only the port is asked for, so that the known address
/// need not be unpacked when it stays.
fn refines_local(port: u16, seen: &SocketAddr) -> bool {
    seen.port() != 0 && (seen.port() != port || !seen.ip().is_unspecified())
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        let max_flows = cfg.max_flows.max(1);
        Self {
            cfg: EngineConfig { max_flows, ..cfg },
            flows: FlowTable::default(),
            sockets: CookieMap::default(),
            owners: Owners::default(),
            unknown: Arc::new(Held::new(UNKNOWN)),
            last_app_error: HashMap::new(),
            ports: Ports::default(),
            refused_at: HashMap::new(),
            refused_expiry: BinaryHeap::new(),
            // Peers with live flows are never evicted, so at least one peer per flow.
            peers: PeerTable::new(max_flows),
            busy: BTreeMap::new(),
            interval_end_ns: 0,
            to_forget: Vec::new(),
            closing: Vec::new(),
            suspects: HashMap::new(),
            flowless: BinaryHeap::new(),
            due: Vec::new(),
            due_at: None,
            #[cfg(test)]
            sleepless: false,
            stats: EngineStats::default(),
        }
    }

    #[cfg(test)]
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            flows_tracked: self.flows.len(),
            sockets_tracked: self.sockets.len(),
            peers_tracked: self.peers.len(),
            peers_evicted: self.peers.evicted(),
            ..self.stats
        }
    }

    /// The flows of a socket, in id order.
    #[cfg(test)]
    pub fn flows_of(&self, cookie: u64) -> Vec<FlowId> {
        let mut ids = Vec::new();
        self.flows.of_cookie(cookie, &mut ids);
        ids
    }

    /// The flows the last [`Engine::on_event`] or [`Engine::on_tick`] closed, whose kernel
    /// entries the caller should delete.
    /// Held only until the next call, so that a caller that does not care holds nothing.
    pub fn to_forget(&self) -> &[FlowId] {
        &self.to_forget
    }

    /// Closes, at `now_ns`, the sockets that two dumps in a row did not find in their
    /// namespace although the engine knew them before each began: their Close record was
    /// lost (a full ring, a program run the kernel skipped), and without this their flows
    /// would end as idle, or, for sockets from before udpmon started, never. One dump is not
    /// enough: the kernel resumes a dump by counting sockets, so a socket closing meanwhile
    /// can make it skip another that is still open; the same socket skipped twice is not a
    /// race, as long as nothing named the socket in between. Sockets named since a dump
    /// began may be too new for it, and those of namespaces not dumped are left alone (what
    /// an earlier dump found stands). Returns how many were closed, and how many this dump
    /// alone missed (for the next one to decide).
    pub fn lost_closes(
        &mut self,
        dumps: &[OpenSockets],
        now_ns: u64,
        counters: CountersFn<'_>,
        out: &mut Vec<Report>,
    ) -> (usize, usize) {
        self.to_forget.clear();
        let by_netns: HashMap<u32, &OpenSockets> = dumps.iter().map(|d| (d.netns, d)).collect();
        let (mut gone, mut suspects, mut new) = (Vec::new(), HashMap::new(), 0);
        for (cookie, s) in self.sockets.iter() {
            let earlier = self.suspects.get(&cookie).copied();
            let Some(d) = by_netns.get(&s.netns) else {
                if let Some(since) = earlier {
                    suspects.insert(cookie, since);
                }
                continue;
            };
            if s.seen_ns >= d.since_ns || d.cookies.contains(&cookie) {
                continue;
            }
            match earlier {
                Some(since) if s.seen_ns < since => gone.push(cookie),
                _ => {
                    suspects.insert(cookie, d.since_ns);
                    new += 1;
                }
            }
        }
        self.suspects = suspects;
        for &cookie in &gone {
            self.close_socket(cookie, now_ns, counters, out);
        }
        self.stats.closes_recovered += gone.len() as u64;
        (gone.len(), new)
    }

    #[cfg(test)]
    /// Every tracked flow, in id order.
    pub fn flows(&self) -> Vec<FlowId> {
        self.flows.ids()
    }

    #[cfg(test)]
    /// Summarised flows live, whether `id` is one, and the new and closed flows counted in
    /// summaries not reported yet.
    pub fn summary_census(&self, id: &FlowId) -> (u64, bool, u64, u64) {
        let live = self
            .flows
            .ids()
            .iter()
            .filter(|i| self.flow(i).is_some_and(|f| f.summarised))
            .count() as u64;
        let (new, closed) = self.busy.values().fold((0, 0), |(n, c), b| {
            (n + b.counts.new_flows, c + b.counts.closed)
        });
        let is = self.flow(id).is_some_and(|f| f.summarised);
        (live, is, new, closed)
    }

    #[cfg(test)]
    fn flow(&self, id: &FlowId) -> Option<&Flow> {
        self.flows.get(self.flows.find(id)?)
    }

    #[cfg(test)]
    /// Checks the peers' bookkeeping against the flows: each peer counts exactly its live
    /// flows and those in a reported flow-level SILENT, no peer in a reported SILENT has
    /// such a flow (one report per silence), and the table keeps to its cap.
    pub fn check_peers(&self) -> Result<(), String> {
        let census = self.peers.census();
        let mut seen = vec![(0u32, 0u32); census.len()];
        for id in self.flows.ids() {
            let Some(f) = self.flow(&id) else {
                continue;
            };
            if f.peer.is_linked() {
                let s = seen
                    .get_mut(f.peer.idx as usize)
                    .ok_or_else(|| format!("{id:?} tied to a missing peer {}", f.peer.idx))?;
                s.0 += 1;
                s.1 += u32::from(f.silence_reported());
            }
        }
        for (i, (&(flows, silent, reported), &counted)) in census.iter().zip(&seen).enumerate() {
            if (flows, silent) != counted {
                return Err(format!(
                    "peer {i} counts {flows} flows, {silent} silent; the flows say {counted:?}"
                ));
            }
            if reported && silent > 0 {
                return Err(format!(
                    "peer {i} reported SILENT while a flow of it did too"
                ));
            }
        }
        if self.peers.len() > self.peers.cap() {
            return Err(format!(
                "{} peers, cap {}",
                self.peers.len(),
                self.peers.cap()
            ));
        }
        Ok(())
    }

    /// Processes one kernel fact, adding its reports to `out` (the caller's, reused: most
    /// events make none or one). `counters` is consulted for the flows this event closes
    /// (a socket's close, a disconnect, an eviction), so the caller must keep the kernel's
    /// entries until this returns.
    pub fn on_event(&mut self, ev: &KernelEvent, counters: CountersFn<'_>, out: &mut Vec<Report>) {
        self.to_forget.clear();
        if ev.fact == Fact::Wake {
            // Nothing about its owner: only which flow the next tick must look at.
            self.wake(&FlowId {
                cookie: ev.cookie,
                remote: ev.remote,
            });
            return;
        }
        let told;
        let ev = match self.untold(ev) {
            Some(e) => {
                told = e;
                &told
            }
            None => ev,
        };
        let socketless = match &ev.fact {
            Fact::NoSocket | Fact::Exit | Fact::Exec => true,
            Fact::Icmp(icmp) => icmp.verdict == Verdict::NoSocket || ev.cookie == 0,
            _ => false,
        };
        let mut created = false;
        if !socketless {
            if ev.cookie == 0 {
                self.stats.events_ignored += 1;
                return;
            }
            created = self.learn(ev);
        }
        match &ev.fact {
            Fact::NoSocket => self.refused(ev, out),
            Fact::Icmp(icmp) if socketless => self.unreachable_without_socket(ev, icmp, out),
            Fact::Icmp(icmp) => self.unreachable(ev, icmp, counters, out),
            Fact::FirstTx { bytes } => self.first_datagram(ev, Via::Send, *bytes, counters, out),
            Fact::FirstRx { bytes } => self.first_datagram(ev, Via::Recv, *bytes, counters, out),
            Fact::Connect => self.connect(ev, counters, out),
            Fact::SendError { errno } => self.app_error(ev, Op::Send, *errno, out),
            Fact::RecvError { errno } => self.app_error(ev, Op::Recv, *errno, out),
            Fact::Close => self.close_socket(ev.cookie, ev.ts_ns, counters, out),
            Fact::Existing => self.existing(ev, counters, out),
            // Learned above: what the socket's next reports, timer-made ones included, name.
            Fact::Holder => {}
            Fact::Exit => self.owners.exited(ev.who.tgid),
            Fact::Exec => self.owners.execd(&ev.who),
            Fact::Wake => unreachable!("handled above"),
        }
        // Most new sockets have a flow by now; those without are forgotten in time.
        if created && !self.flows.has_cookie(ev.cookie) {
            self.list_flowless(ev.cookie);
        }
    }

    /// Lists a socket without flows for `forget`, if it is still there.
    fn list_flowless(&mut self, cookie: u64) {
        if let Some(s) = self.sockets.get_mut(&cookie)
            && !s.listed
        {
            s.listed = true;
            let until = s.seen_ns.saturating_add(ns(self.cfg.idle_timeout));
            self.flowless.push(Reverse((until, cookie)));
        }
    }

    /// The next tick looks at this flow, if the engine tracks it: the kernel said it moves,
    /// or an event about it is held back before it reaches [`Engine::on_event`].
    pub fn wake(&mut self, id: &FlowId) {
        if let Some(r) = self.flows.find(id) {
            self.flows.wake(r);
        }
    }

    /// Folds in a flow's kernel counters read in bulk before a tick (which then needs no
    /// counters of its own); a flow the engine does not track is passed over. A sleeping
    /// flow whose counters moved wakes: its wake record may have been lost.
    pub fn absorb(&mut self, id: &FlowId, c: &Counters) {
        let Some(r) = self.flows.find(id) else {
            return;
        };
        let Some(flow) = self.flows.get_mut(r) else {
            return;
        };
        if flow.absorb(c) {
            self.stats.kernel_entries_renewed += 1;
        }
        if c.last_ns() > self.flows.last_seen(r) {
            self.flows.wake(r);
        }
    }

    /// How many flows the next tick, at `now_ns`, will look at: for the caller to choose
    /// between reading their counters one by one and reading the whole kernel map.
    pub fn due(&mut self, now_ns: u64) -> usize {
        if self.due_at != Some(now_ns) {
            self.due_at = Some(now_ns);
            let taken = self.flows.take_due(now_ns);
            if self.due.is_empty() {
                self.due = taken;
            } else {
                // Those taken for another time and not looked at yet stay taken.
                self.due.extend(taken);
                self.due.sort_unstable();
                self.due.dedup();
            }
        }
        self.due.len()
    }

    /// Periodic work, about once a second: SILENT, RESUMED and idle expiry from the kernel
    /// counters, and forgetting what is no longer needed. It looks only at the flows that are
    /// awake or whose sleep ended (see [`Engine::next_look`]).
    pub fn on_tick(&mut self, now_ns: u64, counters: CountersFn<'_>) -> Vec<Report> {
        let mut out = Vec::new();
        self.to_forget.clear();
        self.due(now_ns);
        self.due_at = None;
        // In the table's order: the reports of one tick share its time. A tick opens no
        // flow, so the slots stay put; those it frees are passed over.
        for r in std::mem::take(&mut self.due) {
            self.tick_flow(r, now_ns, counters, &mut out);
            if self.flows.get_mut(r).is_some() {
                let until = self.next_look(r, now_ns);
                self.flows.sleep(r, until);
            }
        }
        // After every flow told its peer what it sent and heard.
        self.peers.tick(
            now_ns,
            ns(self.cfg.silent_after),
            self.cfg.silent_min_sends,
            &mut out,
        );
        self.end_interval(now_ns, &mut out);
        self.forget(now_ns);
        out
    }

    /// When a tick must look at a flow again, having just looked at it at `now` (`None`:
    /// at every tick). A flow quiet for [`SLEEP_NS`] can sleep: any datagram now wakes it
    /// (the kernel's [`Fact::Wake`], or the event of a new kernel entry), and so does any
    /// event about it, so until then only time can change what a tick finds: its idle
    /// expiry, and its SILENT once its peer has been quiet long enough.
    fn next_look(&self, r: FlowRef, now: u64) -> Option<u64> {
        let last = self.flows.last_seen(r);
        let flow = self.flows.get(r)?;
        #[cfg(test)]
        if self.sleepless {
            return None;
        }
        if now.saturating_sub(last) < SLEEP_NS {
            return None;
        }
        if matches!(
            flow.state(),
            State::Silent {
                reported: false,
                ..
            }
        ) {
            // Covered by its peer's silence, which another flow's answer can end.
            return None;
        }
        let silent = flow.silent_at(ns(self.cfg.silent_after), self.cfg.silent_min_sends);
        let idle = last.saturating_add(ns(self.cfg.idle_timeout));
        Some(silent.map_or(idle, |at| at.min(idle)))
    }

    /// At a summary interval's end: a SUMMARY for each busy socket, and each socket's count
    /// of new flows starts again.
    fn end_interval(&mut self, now: u64, out: &mut Vec<Report>) {
        let Some(cfg) = &self.cfg.summary else {
            return;
        };
        let interval = ns(cfg.interval).max(1);
        if self.interval_end_ns == 0 {
            self.interval_end_ns = now.saturating_add(interval);
            return;
        }
        // Ticks jitter around the second on which the first one came: one just short of the
        // interval's end ends it, rather than the next, a second later.
        if now.saturating_add(TICK_JITTER_NS) < self.interval_end_ns {
            return;
        }
        // On the grid the first tick set, unless ticks stopped for longer than an interval.
        self.interval_end_ns = self.interval_end_ns.saturating_add(interval);
        if self.interval_end_ns <= now {
            self.interval_end_ns = now.saturating_add(interval);
        }
        self.report_interval(now, out);
    }

    /// At exit: what the summaries in the making have counted so far, so that nothing folded
    /// or counted since the last interval's end is lost.
    pub fn finish(&mut self, now_ns: u64) -> Vec<Report> {
        let mut out = Vec::new();
        if self.cfg.summary.is_some() {
            self.report_interval(now_ns, &mut out);
        }
        out
    }

    /// The SUMMARY of each busy socket and peer run, and each socket's count of new flows
    /// starts again.
    fn report_interval(&mut self, now: u64, out: &mut Vec<Report>) {
        let Some(cfg) = &self.cfg.summary else {
            return;
        };
        let threshold = cfg.threshold;
        self.peers.end_interval(now, ns(self.cfg.idle_timeout), out);
        for sock in self.sockets.values_mut() {
            // Busy for the next interval only if this one crossed the threshold again.
            sock.summarised &= sock.new_flows > threshold;
            sock.new_flows = 0;
        }
        let sockets = &self.sockets;
        self.busy.retain(|&cookie, b| {
            let worth = b.worth_reporting();
            b.busy = sockets.get(&cookie).is_some_and(|s| s.summarised);
            if worth {
                out.push(summary_report(sockets, cookie, b, now));
            }
            b.busy || b.live > 0
        });
    }

    fn tick_flow(&mut self, r: FlowRef, now: u64, counters: CountersFn<'_>, out: &mut Vec<Report>) {
        let id = self.flows.id(r);
        let Some(flow) = self.flows.get_mut(r) else {
            return;
        };
        if let Some(c) = counters(&id)
            && flow.absorb(&c)
        {
            self.stats.kernel_entries_renewed += 1;
        }
        let c = flow.counters;
        if low32(c.rx_datagrams) != flow.rx_seen {
            flow.rx_seen = low32(c.rx_datagrams);
            flow.tx_at_rx = low32(
                c.tx_datagrams
                    .saturating_sub(u64::from(c.last_tx_ns > c.last_rx_ns)),
            );
        }
        if flow.peer.is_linked() {
            let local = flow.local();
            self.peers
                .sync(&mut flow.peer, &c, local, flow.opened_ns, out);
        }
        let resumed = match flow.state() {
            State::Silent {
                last_rx_ns,
                reported,
            } if c.last_rx_ns > last_rx_ns => Some((Trouble::Silent, last_rx_ns, reported)),
            State::Unreachable {
                since_ns,
                last_rx_ns,
                ..
            } if c.last_rx_ns > since_ns && flow.has_first(false) => {
                Some((Trouble::Unreachable, last_rx_ns, true))
            }
            _ => None,
        };
        if let Some((after, before_ns, reported)) = resumed {
            if flow.silence_reported() {
                self.peers.flow_silence_ended(&flow.peer);
            }
            flow.set_state(State::Active);
            let quiet_ns = c.last_rx_ns.saturating_sub(before_ns);
            // A silence reported at peer scope ends with the peer's RESUMED, not the flow's.
            if reported {
                self.flow_report(
                    r,
                    ReportKind::Resumed,
                    c.last_rx_ns,
                    Detail::Resumed { after, quiet_ns },
                    out,
                );
            }
        }
        self.flows.heard(r, c.last_ns());
        if now.saturating_sub(self.flows.last_seen(r)) >= ns(self.cfg.idle_timeout) {
            // Its counters were read just above: reading them again would be a second system
            // call for each flow that expires.
            self.close_flow(&id, CloseReason::Idle, now, &|_| None, out);
            return;
        }
        let Some(flow) = self.flows.get_mut(r) else {
            return;
        };
        if matches!(
            flow.state(),
            State::Silent {
                reported: false,
                ..
            }
        ) && !self.peers.reported_silent(&flow.peer)
        {
            // Its peer's silence (which covered this flow's) ended, but this flow still hears
            // nothing: its own silence from now on.
            flow.set_state(State::Active);
        }
        if flow
            .silent_at(ns(self.cfg.silent_after), self.cfg.silent_min_sends)
            .is_some_and(|at| now >= at)
        {
            let sends = flow.unanswered();
            let no_reply_ns = now.saturating_sub(c.last_rx_ns);
            let reported = !flow.peer.is_linked() || self.peers.flow_goes_silent(&flow.peer);
            flow.set_state(State::Silent {
                last_rx_ns: c.last_rx_ns,
                reported,
            });
            if reported {
                self.flow_report(
                    r,
                    ReportKind::Silent,
                    now,
                    Detail::Silent { no_reply_ns, sends },
                    out,
                );
            }
        }
    }

    /// Drops sockets without flows that nothing has named for the idle timeout, expired
    /// REFUSED rate-limit entries, and the ports left longest ago beyond the flow bound.
    fn forget(&mut self, now: u64) {
        let idle = ns(self.cfg.idle_timeout);
        while let Some(&Reverse((at, cookie))) = self.flowless.peek()
            && at <= now
        {
            self.flowless.pop();
            let Some(s) = self.sockets.get_mut(&cookie) else {
                continue;
            };
            s.listed = false;
            // A socket with flows is listed again when its last one goes.
            if s.preexisting || self.flows.has_cookie(cookie) {
                continue;
            }
            let until = s.seen_ns.saturating_add(idle);
            if until <= now {
                // Named on its port as of when it was last active, as if it had closed then.
                let seen_ns = s.seen_ns;
                self.drop_socket(cookie, seen_ns);
            } else {
                s.listed = true;
                self.flowless.push(Reverse((until, cookie)));
            }
        }
        while let Some(Reverse((at, key))) = self.refused_expiry.peek()
            && now.saturating_sub(*at) >= idle
        {
            if self.refused_at.get(key) == Some(at) {
                self.refused_at.remove(key);
            }
            self.refused_expiry.pop();
        }
        self.ports.trim(self.cfg.max_flows);
        self.owners.purge();
    }

    /// Updates what is known about the event's socket: owner, netns, local address, peer.
    /// Returns whether the socket is new.
    fn learn(&mut self, ev: &KernelEvent) -> bool {
        let mut created = false;
        let sock = self.sockets.get_or_insert_with(ev.cookie, || {
            created = true;
            Socket {
                owner: None,
                seen_ns: ev.ts_ns,
                netns: 0,
                local: Addr::new(SocketAddr::new(ev.local.ip(), 0)),
                connected: None,
                preexisting: false,
                summarised: false,
                new_flows: 0,
                listed: false,
                port_prev: 0,
                port_next: 0,
            }
        });
        sock.seen_ns = sock.seen_ns.max(ev.ts_ns);
        sock.preexisting |= ev.fact == Fact::Existing;
        if ev.who.netns != 0 {
            sock.netns = ev.who.netns;
        }
        let old_port = sock.local.port();
        if refines_local(old_port, &ev.local) {
            sock.local = Addr::new(ev.local);
        }
        if !ev.task_unrelated {
            // As the socket's namespace knows it (a hook may not have seen it).
            let who = Identity {
                netns: sock.netns,
                ..ev.who
            };
            if !sock.owner.as_ref().is_some_and(|o| o.is(&who)) {
                sock.owner = Some(self.owners.of(&who));
            }
        }
        // A Connect fact's address is what the socket is being connected *to*; the other
        // facts report the state the socket was in (the flag is only ever set when known).
        if ev.connected && ev.fact != Fact::Connect && !unspecified(&ev.remote) {
            sock.connected = Some(Addr::new(ev.remote));
        }
        if sock.local.port() != old_port {
            self.port_changed(ev.cookie, old_port, ev.ts_ns);
        } else if sock.port_prev != 0 && sock.owner.is_some() {
            self.named_on_port(ev.cookie);
        }
        created
    }

    /// The event's peer; for a connected socket whose hook could not see the address, the
    /// peer it is connected to.
    fn remote_of(&self, ev: &KernelEvent) -> Option<SocketAddr> {
        if !unspecified(&ev.remote) {
            return Some(ev.remote);
        }
        self.sockets
            .get(&ev.cookie)
            .and_then(|s| s.connected.map(Addr::get))
    }

    fn local_of(&self, ev: &KernelEvent) -> SocketAddr {
        match self.sockets.get(&ev.cookie) {
            Some(s) if !refines_local(s.local.get().port(), &ev.local) => s.local.get(),
            _ => ev.local,
        }
    }

    fn flow_report(
        &mut self,
        r: FlowRef,
        kind: ReportKind,
        ts_ns: u64,
        detail: Detail,
        out: &mut Vec<Report>,
    ) {
        let id = self.flows.id(r);
        let Some(flow) = self.flows.get_mut(r) else {
            return;
        };
        flow.reported = true;
        if kind != ReportKind::AppError {
            flow.set_last_app_errno(None);
        }
        if flow.summarised
            && let Some(b) = self.busy.get_mut(&id.cookie)
        {
            let limit = self.cfg.summary.as_ref().map_or(0, |c| c.problem_lines);
            if !b.report(kind, &detail, &mut flow.muted, limit) {
                return;
            }
        }
        out.push(Report::new(
            kind,
            ts_ns,
            id.cookie,
            owner_of(&self.sockets, id.cookie),
            flow.family,
            (flow.local(), id.remote),
            detail,
        ));
    }

    /// Ties a flow the local side opened to its peer across flows (see `peer.rs`).
    fn join_peer(&mut self, r: FlowRef, ts_ns: u64) {
        let id = self.flows.id(r);
        if !peer::can_answer(&id.remote) {
            return;
        }
        let (owner, netns) = match self.sockets.get(&id.cookie) {
            Some(s) => (s.owner.as_ref().unwrap_or(&self.unknown), s.netns),
            None => (&self.unknown, 0),
        };
        let Some(flow) = self.flows.get_mut(r) else {
            return;
        };
        flow.peer = self
            .peers
            .attach(owner, (netns, id.remote), flow.family, flow.local(), ts_ns);
    }

    /// Tells a flow's peer what the flow's counters show now.
    fn sync_peer(&mut self, r: FlowRef, out: &mut Vec<Report>) {
        if let Some(flow) = self.flows.get_mut(r)
            && flow.peer.is_linked()
        {
            let c = flow.counters;
            let local = flow.local();
            self.peers
                .sync(&mut flow.peer, &c, local, flow.opened_ns, out);
        }
    }

    /// Adds a flow, evicting the least recently active one when the table is full.
    fn open_flow(
        &mut self,
        id: FlowId,
        mut flow: Flow,
        ts_ns: u64,
        counters: CountersFn<'_>,
        out: &mut Vec<Report>,
    ) -> FlowRef {
        while self.flows.len() >= self.cfg.max_flows {
            let Some(victim) = self.flows.least_active() else {
                break;
            };
            self.close_flow(&victim, CloseReason::Evicted, ts_ns, counters, out);
            self.stats.flows_evicted += 1;
        }
        flow.summarised = !flow.preexisting && self.count_new_flow(id.cookie, flow.family, ts_ns);
        self.stats.flows_opened += 1;
        self.flows.insert(id, flow, ts_ns)
    }

    /// A new flow of a socket: counted for the busy-socket rule; whether it is summarised.
    fn count_new_flow(&mut self, cookie: u64, family: Family, ts_ns: u64) -> bool {
        let Some(cfg) = &self.cfg.summary else {
            return false;
        };
        let Some(sock) = self.sockets.get_mut(&cookie) else {
            return false;
        };
        sock.new_flows = sock.new_flows.saturating_add(1);
        if !sock.summarised {
            if sock.new_flows <= cfg.threshold {
                return false;
            }
            sock.summarised = true;
        }
        let b = self.busy.entry(cookie).or_insert_with(|| {
            Busy::new(
                sock.owner.clone().unwrap_or_else(|| self.unknown.clone()),
                sock.netns,
                family,
                sock.local.get(),
                ts_ns,
            )
        });
        b.busy = true;
        b.opened();
        self.stats.flows_summarised += 1;
        true
    }

    fn close_flow(
        &mut self,
        id: &FlowId,
        reason: CloseReason,
        ts_ns: u64,
        counters: CountersFn<'_>,
        out: &mut Vec<Report>,
    ) {
        let Some(mut flow) = self.flows.remove(id) else {
            return;
        };
        // A closing socket's flows go with it.
        if reason != CloseReason::Closed && !self.flows.has_cookie(id.cookie) {
            self.list_flowless(id.cookie);
        }
        self.to_forget.push(*id);
        // A summarised flow's close is one count in its socket's summary. Unless its peer
        // takes what it sent or heard, its counters would be read for nothing: a system
        // call for each client of a busy server.
        let summed = flow.summarised && self.busy.contains_key(&id.cookie);
        if (!summed || flow.peer.is_linked())
            && let Some(c) = counters(id)
            && flow.absorb(&c)
        {
            self.stats.kernel_entries_renewed += 1;
        }
        if flow.peer.is_linked() {
            // What the flow sent or heard since the last tick still counts for its peer.
            let c = flow.counters;
            let local = flow.local();
            self.peers
                .sync(&mut flow.peer, &c, local, flow.opened_ns, out);
            self.peers.detach(&flow.peer, flow.silence_reported());
        }
        self.stats.flows_closed += 1;
        if summed && let Some(b) = self.busy.get_mut(&id.cookie) {
            b.closed(flow.established);
            if let Some(sock) = self.sockets.get_mut(&id.cookie) {
                sock.seen_ns = sock.seen_ns.max(ts_ns);
            }
            return;
        }
        let c = flow.counters;
        if reason == CloseReason::Idle
            && !flow.reported
            && c.tx_datagrams == 0
            && c.rx_datagrams == 0
        {
            // A flow learned at startup (or from an ICMP error) that never showed anything:
            // its expiry would be a line about nothing, once for every quiet socket.
            return;
        }
        // The socket outlives its flows: keep what is known about it for another idle period.
        if let Some(sock) = self.sockets.get_mut(&id.cookie) {
            sock.seen_ns = sock.seen_ns.max(ts_ns);
        }
        // Nothing above changes a socket's owner or namespace.
        let who = owner_of(&self.sockets, id.cookie);
        let started = match c.first_ns {
            0 => flow.opened_ns,
            first => first.min(flow.opened_ns),
        };
        let stats = CloseStats {
            duration_ns: ts_ns.saturating_sub(started),
            tx_datagrams: c.tx_datagrams,
            tx_bytes: c.tx_bytes,
            rx_datagrams: c.rx_datagrams,
            rx_bytes: c.rx_bytes,
            last_tx_ns: c.last_tx_ns,
            last_rx_ns: c.last_rx_ns,
            icmp_errors: flow.icmp_errors(),
            app_errors: flow.app_errors(),
            preexisting: flow.preexisting,
        };
        out.push(Report::new(
            ReportKind::Close,
            ts_ns,
            id.cookie,
            who,
            flow.family,
            (flow.local(), id.remote),
            Detail::Closed { reason, stats },
        ));
    }

    /// FirstTx / FirstRx: opens the flow (CONNECT / ACCEPT) or, once both directions have
    /// been seen, establishes it.
    fn first_datagram(
        &mut self,
        ev: &KernelEvent,
        via: Via,
        bytes: u32,
        counters: CountersFn<'_>,
        out: &mut Vec<Report>,
    ) {
        let Some(remote) = self.remote_of(ev) else {
            self.stats.events_ignored += 1;
            return;
        };
        let id = FlowId {
            cookie: ev.cookie,
            remote,
        };
        let local = self.local_of(ev);
        let seen = Counters {
            first_ns: ev.ts_ns,
            ..if via == Via::Send {
                Counters {
                    tx_datagrams: 1,
                    tx_bytes: u64::from(bytes),
                    last_tx_ns: ev.ts_ns,
                    ..Counters::default()
                }
            } else {
                Counters {
                    rx_datagrams: 1,
                    rx_bytes: u64::from(bytes),
                    last_rx_ns: ev.ts_ns,
                    ..Counters::default()
                }
            }
        };
        let found = self.flows.find(&id);
        if let Some(r) = found
            && self
                .flows
                .get(r)
                .is_some_and(|f| refines_local(f.local().port(), &local))
        {
            self.flows.set_local(r, local);
        }
        let Some((r, flow)) = found.and_then(|r| Some((r, self.flows.get_mut(r)?))) else {
            let mut flow = Flow::new(local, ev.family, ev.ts_ns);
            flow.counters = seen;
            // The kernel created the flow's entry with this datagram, at this time.
            flow.kernel_first_ns = ev.ts_ns;
            flow.set_first(via == Via::Send, ev.ts_ns);
            let r = self.open_flow(id, flow, ev.ts_ns, counters, out);
            let kind = if via == Via::Send {
                ReportKind::Connect
            } else {
                ReportKind::Accept
            };
            let detail = Detail::Opened {
                via,
                bytes: Some(bytes),
            };
            self.flow_report(r, kind, ev.ts_ns, detail, out);
            // A peer that spoke first is a client of ours: only our own flows count for it.
            if via == Via::Send {
                self.join_peer(r, ev.ts_ns);
                self.sync_peer(r, out);
            }
            return;
        };
        if flow.kernel_first_ns == 0 && !flow.has_first(true) && !flow.has_first(false) {
            // A flow opened by connect() or learned at startup: this datagram made its entry.
            flow.kernel_first_ns = ev.ts_ns;
        }
        if flow.has_first(via == Via::Send) {
            // The kernel can report a direction's first datagram twice (two CPUs racing), and
            // again for a flow whose entry its LRU map dropped: then this record, not a wake,
            // says that the flow moves.
            self.flows.wake(r);
            return;
        }
        let reply_after_ns = flow.set_first(via == Via::Send, ev.ts_ns);
        flow.counters.merge(&seen);
        if via == Via::Recv {
            // The peer answers: whatever the trouble was, it is over. A peer heard before
            // gets a RESUMED from the counters; a first answer is this ESTABLISH.
            if flow.silence_reported() {
                self.peers.flow_silence_ended(&flow.peer);
            }
            flow.set_state(State::Active);
        }
        if flow.peer.is_linked() {
            let c = flow.counters;
            let local = flow.local();
            self.peers
                .sync(&mut flow.peer, &c, local, flow.opened_ns, out);
        }
        let established = reply_after_ns.filter(|_| !flow.established);
        flow.established |= established.is_some();
        self.flows.seen(r, ev.ts_ns);
        if let Some(reply_after_ns) = established {
            let detail = Detail::Established { reply_after_ns };
            self.flow_report(r, ReportKind::Establish, ev.ts_ns, detail, out);
        }
    }

    /// connect(): opens the flow at once (CONNECT before any datagram); to another peer it
    /// first closes the old flow; to AF_UNSPEC it dissolves the association.
    fn connect(&mut self, ev: &KernelEvent, counters: CountersFn<'_>, out: &mut Vec<Report>) {
        let Some(sock) = self.sockets.get_mut(&ev.cookie) else {
            return;
        };
        let old = sock.connected.map(Addr::get);
        if unspecified(&ev.remote) {
            sock.connected = None;
            // An autobound port is released by a disconnect; the next send binds a new one.
            let port = sock.local.port();
            sock.local = Addr::new(SocketAddr::new(sock.local.get().ip(), 0));
            self.port_changed(ev.cookie, port, ev.ts_ns);
            if let Some(old) = old {
                let id = FlowId {
                    cookie: ev.cookie,
                    remote: old,
                };
                self.close_flow(&id, CloseReason::Disconnected, ev.ts_ns, counters, out);
            }
            return;
        }
        if old == Some(ev.remote) {
            return;
        }
        sock.connected = Some(Addr::new(ev.remote));
        if let Some(old) = old {
            let id = FlowId {
                cookie: ev.cookie,
                remote: old,
            };
            self.close_flow(&id, CloseReason::Reconnected, ev.ts_ns, counters, out);
        }
        let id = FlowId {
            cookie: ev.cookie,
            remote: ev.remote,
        };
        if let Some(r) = self.flows.find(&id) {
            // An unconnected socket that already talked to this peer: same flow.
            self.flows.seen(r, ev.ts_ns);
            return;
        }
        let flow = Flow::new(self.local_of(ev), family_of(&ev.remote), ev.ts_ns);
        let r = self.open_flow(id, flow, ev.ts_ns, counters, out);
        let detail = Detail::Opened {
            via: Via::Connect,
            bytes: None,
        };
        self.flow_report(r, ReportKind::Connect, ev.ts_ns, detail, out);
        self.join_peer(r, ev.ts_ns);
    }

    fn existing(&mut self, ev: &KernelEvent, counters: CountersFn<'_>, out: &mut Vec<Report>) {
        if !ev.connected || unspecified(&ev.remote) {
            return;
        }
        let id = FlowId {
            cookie: ev.cookie,
            remote: ev.remote,
        };
        if self.flows.find(&id).is_some() {
            return;
        }
        let mut flow = Flow::new(self.local_of(ev), ev.family, ev.ts_ns);
        flow.preexisting = true;
        let r = self.open_flow(id, flow, ev.ts_ns, counters, out);
        // A connected socket is, as a rule, a client: its peer is one it asked.
        self.join_peer(r, ev.ts_ns);
    }

    fn icmp_info(&self, ev: &KernelEvent, icmp: &Icmp, connected: bool) -> UnreachableInfo {
        let table = rules::icmp_errno(ev.family, icmp.ty, icmp.code);
        UnreachableInfo {
            ty: icmp.ty,
            code: icmp.code,
            errno: icmp.errno.or(table.map(|(e, _)| e)),
            fatal: table.map(|(_, f)| f),
            from: icmp.from,
            verdict: icmp.verdict,
            connected,
            last_owner: None,
        }
    }

    fn unreachable(
        &mut self,
        ev: &KernelEvent,
        icmp: &Icmp,
        counters: CountersFn<'_>,
        out: &mut Vec<Report>,
    ) {
        let Some(remote) = self.remote_of(ev) else {
            self.stats.events_ignored += 1;
            return;
        };
        let id = FlowId {
            cookie: ev.cookie,
            remote,
        };
        let r = match self.flows.find(&id) {
            Some(r) => r,
            None => {
                let flow = Flow::new(self.local_of(ev), ev.family, ev.ts_ns);
                let r = self.open_flow(id, flow, ev.ts_ns, counters, out);
                // An error came back, so the local side sent to the peer.
                self.join_peer(r, ev.ts_ns);
                r
            }
        };
        let connected = ev.connected
            || self
                .sockets
                .get(&ev.cookie)
                .is_some_and(|s| s.connected == Some(Addr::new(remote)));
        let info = self.icmp_info(ev, icmp, connected);
        self.flows.seen(r, ev.ts_ns);
        let Some(flow) = self.flows.get_mut(r) else {
            return;
        };
        flow.count_icmp_error();
        // Every error, repeated or not, shows the peer is not silent.
        if flow.peer.is_linked() {
            self.peers.icmp(flow.peer.idx, ev.ts_ns);
        }
        let key = (icmp.ty, icmp.code, icmp.verdict);
        if matches!(flow.state(), State::Unreachable { icmp: seen, .. } if seen == key) {
            return;
        }
        if flow.silence_reported() {
            self.peers.flow_silence_ended(&flow.peer);
        }
        flow.set_state(State::Unreachable {
            since_ns: ev.ts_ns,
            icmp: key,
            last_rx_ns: flow.counters.last_rx_ns,
        });
        // A summarised flow's problems are rate-limited by its socket instead.
        if self.cfg.summary.is_some()
            && flow.peer.is_linked()
            && !flow.summarised
            && !self.peers.unreachable(
                flow.peer.idx,
                &info,
                ev.ts_ns,
                ns(self.cfg.idle_timeout),
                out,
            )
        {
            // Folded into the peer's run of errors: the flow saw its transition all the same.
            flow.reported = true;
            flow.set_last_app_errno(None);
            return;
        }
        self.flow_report(
            r,
            ReportKind::Unreachable,
            ev.ts_ns,
            Detail::Unreachable(info),
            out,
        );
    }

    /// `ev` as about the tracked flow it is about, if it is an ICMP error that the kernel
    /// told no socket of (no cookie): a tracked flow that sent the datagram it quotes (same
    /// namespace, local port and address, and peer) means that the kernel found that flow's
    /// socket and discarded the error; none, that no socket matched (the socket is gone).
    /// Of sockets that sent alike (a reuseport group), the newest (largest cookie) is named:
    /// which one the kernel found is not known.
    fn untold(&self, ev: &KernelEvent) -> Option<KernelEvent> {
        let Fact::Icmp(icmp) = &ev.fact else {
            return None;
        };
        if ev.cookie != 0 {
            return None;
        }
        // A socket whose namespace is not known (no hook named it) is a candidate only when
        // none in the error's namespace sent alike.
        let (_, cookie) = self
            .on_port(ev.local.port())
            .filter_map(|(cookie, s)| {
                let netns_known = s.netns == ev.who.netns;
                if !netns_known && s.netns != 0 && ev.who.netns != 0 {
                    return None;
                }
                let r = self.flows.find(&FlowId {
                    cookie,
                    remote: ev.remote,
                })?;
                let ip = self.flows.get(r)?.local().ip();
                (ip == ev.local.ip() || ip.is_unspecified()).then_some((netns_known, cookie))
            })
            .max()?;
        Some(KernelEvent {
            cookie,
            fact: Fact::Icmp(Icmp {
                verdict: Verdict::Discarded,
                ..icmp.clone()
            }),
            ..ev.clone()
        })
    }

    /// An ICMP error about a datagram whose socket is gone: reported by addresses, naming
    /// the last process seen on the local port.
    fn unreachable_without_socket(&mut self, ev: &KernelEvent, icmp: &Icmp, out: &mut Vec<Report>) {
        let mut info = self.icmp_info(ev, icmp, false);
        info.last_owner = self.last_owner(ev.who.netns, ev.local.port());
        // A resolver's socket is often gone when the error for its query comes back.
        let peer = info
            .last_owner
            .as_ref()
            .and_then(|o| self.peers.find(&PeerKey::new(o, ev.who.netns, ev.remote)));
        if let Some(idx) = peer {
            self.peers.icmp(idx, ev.ts_ns);
            if self.cfg.summary.is_some()
                && !self
                    .peers
                    .unreachable(idx, &info, ev.ts_ns, ns(self.cfg.idle_timeout), out)
            {
                return;
            }
        }
        out.push(Report::new(
            ReportKind::Unreachable,
            ev.ts_ns,
            ev.cookie,
            (&UNKNOWN, ev.who.netns),
            ev.family,
            (ev.local, ev.remote),
            Detail::Unreachable(info),
        ));
    }

    fn app_error(&mut self, ev: &KernelEvent, op: Op, errno: i32, out: &mut Vec<Report>) {
        if !rules::is_flow_error(errno) {
            return;
        }
        let remote = self.remote_of(ev);
        let id = remote.map(|remote| FlowId {
            cookie: ev.cookie,
            remote,
        });
        if let Some(r) = id.and_then(|id| self.flows.find(&id)) {
            self.flows.seen(r, ev.ts_ns);
            let Some(flow) = self.flows.get_mut(r) else {
                return;
            };
            flow.count_app_error();
            if flow.last_app_errno() == Some(errno) {
                return;
            }
            flow.set_last_app_errno(Some(errno));
            let after_unreachable_ns = match flow.state() {
                State::Unreachable { since_ns, .. } => Some(ev.ts_ns.saturating_sub(since_ns)),
                _ => None,
            };
            let detail = Detail::AppError {
                op,
                errno,
                after_unreachable_ns,
            };
            self.flow_report(r, ReportKind::AppError, ev.ts_ns, detail, out);
            return;
        }
        // A call that is not about a tracked flow: a sendto() refused before any datagram
        // left (EPERM from a firewall, EMSGSIZE), or a recv on an unconnected socket.
        let remote = remote.unwrap_or(ev.remote);
        let local = self.local_of(ev);
        if !self.sockets.contains_key(&ev.cookie) {
            return;
        }
        match self.last_app_error.entry(ev.cookie) {
            Entry::Occupied(e) if *e.get() == (errno, remote) => return,
            Entry::Occupied(mut e) => {
                e.insert((errno, remote));
            }
            Entry::Vacant(e) => {
                e.insert((errno, remote));
            }
        }
        out.push(Report::new(
            ReportKind::AppError,
            ev.ts_ns,
            ev.cookie,
            owner_of(&self.sockets, ev.cookie),
            ev.family,
            (local, remote),
            Detail::AppError {
                op,
                errno,
                after_unreachable_ns: None,
            },
        ));
    }

    fn close_socket(
        &mut self,
        cookie: u64,
        ts_ns: u64,
        counters: CountersFn<'_>,
        out: &mut Vec<Report>,
    ) {
        let mut ids = std::mem::take(&mut self.closing);
        self.flows.of_cookie(cookie, &mut ids);
        for id in &ids {
            self.close_flow(id, CloseReason::Closed, ts_ns, counters, out);
        }
        self.closing = ids;
        if let Some(mut b) = self.busy.remove(&cookie)
            && b.worth_reporting()
        {
            out.push(summary_report(&self.sockets, cookie, &mut b, ts_ns));
        }
        self.drop_socket(cookie, ts_ns);
    }

    /// Forgets a socket that closed or went quiet, its port naming it as of `ts_ns`.
    fn drop_socket(&mut self, cookie: u64, ts_ns: u64) {
        let Some(port) = self.sockets.get(&cookie).map(|s| s.local.port()) else {
            return;
        };
        self.vacate(cookie, port, ts_ns);
        self.sockets.remove(&cookie);
        self.last_app_error.remove(&cookie);
    }

    /// A peer sending to a local port without a socket: one REFUSED per (local, remote) per
    /// idle timeout.
    fn refused(&mut self, ev: &KernelEvent, out: &mut Vec<Report>) {
        let key = (ev.who.netns, ev.local, ev.remote);
        let idle = ns(self.cfg.idle_timeout);
        let suppressed = match self.refused_at.get(&key) {
            Some(at) => ev.ts_ns.saturating_sub(*at) < idle,
            // A flood of distinct sources must not grow the table without bound; past the
            // flow bound, further tuples are counted, not reported, until entries expire at
            // a tick.
            None => self.refused_at.len() >= self.cfg.max_flows,
        };
        if suppressed {
            self.stats.refused_suppressed += 1;
            return;
        }
        self.refused_at.insert(key, ev.ts_ns);
        self.refused_expiry.push(Reverse((ev.ts_ns, key)));
        let last_owner = self.last_owner(ev.who.netns, ev.local.port());
        out.push(Report::new(
            ReportKind::Refused,
            ev.ts_ns,
            0,
            (&UNKNOWN, ev.who.netns),
            ev.family,
            (ev.local, ev.remote),
            Detail::Refused { last_owner },
        ));
    }
}

/// The SUMMARY of a busy socket, ending its interval at `now`: named after the socket's
/// owner as it is now (or, once the socket is gone, its last owner as it is now).
fn summary_report(sockets: &CookieMap<Socket>, cookie: u64, b: &mut Busy, now: u64) -> Report {
    if let Some(s) = sockets.get(&cookie) {
        if let Some(o) = &s.owner {
            b.owner = o.clone();
        }
        b.netns = s.netns;
        if s.local.get().port() != 0 {
            b.local = s.local.get();
        }
    }
    let detail = Detail::SocketSummary(Box::new(b.take(now)));
    Report::new(
        ReportKind::Summary,
        now,
        cookie,
        (b.owner.now(), b.netns),
        b.family,
        (b.local, anywhere(b.family)),
        detail,
    )
}

#[cfg(test)]
mod tests;
