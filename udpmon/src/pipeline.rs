//! What becomes of a ring-buffer record: decode -> process name, network namespace and
//! container -> engine -> filter -> sinks. The kernel's flow counters come through
//! [`FlowCounters`], so the whole path runs without a kernel too: `benches/pipeline.rs`
//! measures it on generated records. The agent (`agent.rs`) feeds it from the ring buffer
//! and runs the scans and lookups it asks for.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use crate::{
    container::{self, ContainerMap, StateRoots},
    decode::{self, Fact, KernelEvent},
    engine::{Counters, Engine, FlowId, OpenSockets, Report},
    filter::Filter,
    health::Health,
    netns::{Lookup, NetnsMap},
    procfs::ProcessNames,
    sinks::Sinks,
};

/// Cgroups whose container is remembered: entries outlive their containers, so that a
/// container's last events still name it, and a cgroup costs a few hundred bytes.
const CONTAINERS_MAX: usize = 16384;

/// The kernel's per-flow counters, as the pipeline uses them.
pub trait FlowCounters {
    /// A flow's counters now, for an event about it; None when the kernel holds none.
    fn now(&self, id: &FlowId) -> Option<Counters>;
    /// Before a tick that looks at most flows: every flow's counters, read in bulk, to
    /// `each`. False when the kernel cannot read in bulk: the tick asks [`now`](Self::now)
    /// for each flow it looks at instead, as it does when it looks at few.
    fn read_all(&mut self, each: &mut dyn FnMut(&FlowId, &Counters)) -> bool;
    /// The flow ended: its kernel entry is deleted at the next [`flush`](Self::flush), so
    /// that new traffic opens it afresh, with events.
    fn forget(&mut self, id: &FlowId);
    fn flush(&mut self);
}

pub struct Pipeline<K> {
    pub kernel: K,
    pub engine: Engine,
    pub filter: Filter,
    pub sinks: Sinks,
    pub health: Health,
    netns: NetnsMap,
    /// Events held back, in order, until a scan names a namespace that one of them is in
    /// (with every event after it, so that the engine sees them in order), with the
    /// namespace cookie of each.
    pending: VecDeque<(KernelEvent, u64)>,
    /// Namespace cookies waiting for the next scan.
    unknown_netns: HashSet<u64>,
    processes: ProcessNames,
    containers: ContainerMap,
    /// Cgroup ids waiting for the next container lookup; events are held for them like for
    /// namespaces.
    unknown_cgroups: HashSet<u64>,
    /// The cgroup path of each unresolved cgroup id, read from /proc/PID/cgroup as soon as
    /// an event of it is decoded: a short-lived process may be gone by the time the lookup
    /// runs (None: it already was).
    cgroup_paths: HashMap<u64, Option<String>>,
    /// The cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
    cgroup_mount: Option<PathBuf>,
    state_roots: Arc<StateRoots>,
    /// `health.ringbuf_full` when the last read of every flow made up for lost wake records.
    ring_losses_seen: u64,
    last_full_read_ns: u64,
    /// `health.close_losses()` when the last dump of the open sockets that came in was
    /// asked for (see [`Pipeline::wants_open_sockets`]), and when the running one was.
    losses_dumped: u64,
    losses_asked: u64,
    /// A dump is running.
    dumping: bool,
    /// The last dump missed sockets: the next one decides, as soon as `share_until_ns`.
    dump_again: bool,
    /// Until then, dumps would take more than their share of the time; until
    /// `period_until_ns`, losses ask for no dump.
    share_until_ns: u64,
    period_until_ns: u64,
    /// A dump waiting for the records from before it to be read.
    open_sockets: Vec<OpenSockets>,
    /// The ring's records are read up to this time: the newest record's, or when the ring
    /// was last found empty.
    read_up_to_ns: u64,
}

/// The shortest time between two reads of every flow made for lost records.
const FULL_READ_PERIOD_NS: u64 = 5_000_000_000;

/// The shortest time between two dumps of the open sockets asked for by lost records, and
/// the most of the time dumps may take (a tenth: a dump that took 2 s waits 20 s).
const DUMP_PERIOD: Duration = Duration::from_secs(10);
const DUMP_SHARE: u32 = 10;

impl<K: FlowCounters> Pipeline<K> {
    pub fn new(
        kernel: K,
        engine: Engine,
        namespaces: NetnsMap,
        filter: Filter,
        sinks: Sinks,
    ) -> Self {
        Self {
            kernel,
            engine,
            filter,
            sinks,
            health: Health::default(),
            netns: namespaces,
            pending: VecDeque::new(),
            unknown_netns: HashSet::new(),
            processes: ProcessNames::default(),
            containers: ContainerMap::new(CONTAINERS_MAX),
            unknown_cgroups: HashSet::new(),
            cgroup_paths: HashMap::new(),
            cgroup_mount: std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|m| container::v2_mount(&m)),
            state_roots: Arc::new(StateRoots::default()),
            ring_losses_seen: 0,
            last_full_read_ns: 0,
            losses_dumped: 0,
            losses_asked: 0,
            dumping: false,
            dump_again: false,
            share_until_ns: 0,
            period_until_ns: 0,
            open_sockets: Vec::new(),
            read_up_to_ns: 0,
        }
    }

    /// Asks these CRI runtime service sockets for Kubernetes names instead of the default ones.
    pub fn set_cri_sockets(&mut self, sockets: Vec<PathBuf>) {
        self.state_roots = Arc::new(StateRoots {
            cri: container::cri::Cri::new(sockets),
            ..StateRoots::default()
        });
    }

    /// Resolves these cgroups' containers now, blocking: those of the sockets found at
    /// startup, so that their first reports already name their containers.
    pub fn resolve_containers(&mut self, asks: Vec<container::Ask>) {
        if asks.is_empty() {
            return;
        }
        let found = container::resolve(self.cgroup_mount.as_deref(), &self.state_roots, asks);
        self.containers.learn(found);
    }

    /// One ring-buffer record: decoded and, unless a namespace or container it needs is
    /// not known yet, processed, its reports added to `reports`.
    pub fn record(&mut self, bytes: &[u8], reports: &mut Vec<Report>) {
        self.health.events_read += 1;
        match decode::raw(bytes).and_then(|raw| Ok((decode::decode_event(&raw)?, raw.netns_cookie)))
        {
            Ok((mut ev, netns_cookie)) => {
                self.read_up_to_ns = self.read_up_to_ns.max(ev.ts_ns);
                if ev.fact == Fact::Wake {
                    // Names no one and waits for nothing: it only tells the next tick which
                    // flow to look at (a flow held back behind a scan wakes when it opens).
                    let kernel = &self.kernel;
                    self.engine.on_event(&ev, &|id| kernel.now(id), reports);
                    return;
                }
                // The engine takes a record's identity only from the task that ran the
                // hook; a softirq record is named after its socket's owner.
                if ev.fact == Fact::Exit {
                    self.processes.exited(ev.who.tgid);
                } else if !ev.task_unrelated {
                    ev.who.process = self.processes.name(ev.who.tgid, ev.who.pid, ev.who.comm);
                    self.note_cgroup(&ev);
                }
                // Nearly always: nothing held, nothing to wait for. Otherwise it waits behind
                // the held ones: only a scan or a lookup (`*_found`) can release them.
                if self.pending.is_empty() && self.ready(&mut ev, netns_cookie, false) {
                    self.process(ev, reports);
                } else {
                    // The flow's next looks must not wait for it: it may be a first datagram
                    // (of a recreated kernel entry, or an answer), which no wake record repeats.
                    self.engine.wake(&FlowId {
                        cookie: ev.cookie,
                        remote: ev.remote,
                    });
                    self.pending.push_back((ev, netns_cookie));
                }
            }
            Err(e) => {
                self.health.decode_errors += 1;
                log::debug!("undecodable event: {e}");
            }
        }
    }

    /// The namespace cookies held events wait for, for a scan to look up.
    pub fn netns_asks(&mut self) -> HashSet<u64> {
        std::mem::take(&mut self.unknown_netns)
    }

    /// What a scan for `asked` found: the events it releases are processed and written.
    pub fn netns_found(
        &mut self,
        found: HashMap<u64, u32>,
        asked: &HashSet<u64>,
    ) -> io::Result<()> {
        self.netns.learn(found, asked);
        self.release_pending(false)
    }

    /// The cgroups reports or held events need a container for, for a lookup.
    pub fn container_asks(&mut self) -> Vec<container::Ask> {
        std::mem::take(&mut self.unknown_cgroups)
            .into_iter()
            .map(|cgroup| container::Ask {
                cgroup,
                path: self.cgroup_paths.remove(&cgroup).flatten(),
            })
            .collect()
    }

    /// What a lookup found: the events it releases are processed and written.
    pub fn containers_found(
        &mut self,
        found: HashMap<u64, Option<container::Container>>,
    ) -> io::Result<()> {
        self.containers.learn(found);
        let containers = &self.containers;
        self.cgroup_paths.retain(|c, _| !containers.knows(*c));
        self.release_pending(false)
    }

    /// Where a lookup resolves cgroups: the cgroup v2 mount and the runtimes' state.
    pub fn container_roots(&self) -> (Option<PathBuf>, Arc<StateRoots>) {
        (self.cgroup_mount.clone(), Arc::clone(&self.state_roots))
    }

    /// The path of a cgroup not resolved yet, while its process is surely alive: read from
    /// procfs, in memory, as the process names are.
    fn note_cgroup(&mut self, ev: &KernelEvent) {
        if ev.who.cgroup == 0
            || self.containers.knows(ev.who.cgroup)
            || self.cgroup_paths.contains_key(&ev.who.cgroup)
        {
            return;
        }
        let path = std::fs::read_to_string(format!("/proc/{}/cgroup", ev.who.tgid))
            .ok()
            .and_then(|c| container::v2_path(&c).map(str::to_owned));
        self.cgroup_paths.insert(ev.who.cgroup, path);
    }

    /// Whether `ev` can go to the engine now: its namespace resolved (filled in here) and its
    /// container known. If not, what it waits for is queued for the next scan or lookup;
    /// `force`, at exit, lets everything through.
    fn ready(&mut self, ev: &mut KernelEvent, netns_cookie: u64, force: bool) -> bool {
        if ev.who.netns == 0 && netns_cookie != 0 {
            match self.netns.lookup(netns_cookie) {
                Lookup::Inode(i) => ev.who.netns = i,
                Lookup::Unresolvable => {}
                Lookup::Unknown if force => {}
                Lookup::Unknown => {
                    self.unknown_netns.insert(netns_cookie);
                    return false;
                }
            }
        }
        // Held until its container is known, so that every report of the socket names
        // it (the engine takes the owner's cgroup only from such events).
        if !force
            && !ev.task_unrelated
            && ev.who.cgroup != 0
            && !self.containers.knows(ev.who.cgroup)
        {
            self.unknown_cgroups.insert(ev.who.cgroup);
            return false;
        }
        true
    }

    /// Processes held events in order, up to the first that must wait (see [`Self::ready`]).
    fn process_pending(&mut self, force: bool, reports: &mut Vec<Report>) {
        while let Some((mut ev, cookie)) = self.pending.pop_front() {
            if !self.ready(&mut ev, cookie, force) {
                self.pending.push_front((ev, cookie));
                return;
            }
            self.process(ev, reports);
        }
    }

    /// One event through the engine.
    fn process(&mut self, ev: KernelEvent, reports: &mut Vec<Report>) {
        let kernel = &self.kernel;
        self.engine.on_event(&ev, &|id| kernel.now(id), reports);
        for id in self.engine.to_forget() {
            self.kernel.forget(id);
        }
    }

    /// After a scan or a lookup (or at exit, `force`): the held events that can now be
    /// processed.
    pub fn release_pending(&mut self, force: bool) -> io::Result<()> {
        let mut reports = Vec::new();
        self.process_pending(force, &mut reports);
        self.emit(&mut reports)
    }

    /// The ring held nothing more at CLOCK_BOOTTIME `now`.
    pub fn ring_empty(&mut self, now: u64) {
        self.read_up_to_ns = self.read_up_to_ns.max(now);
    }

    /// Whether to dump the open sockets now, for the closes that records lost since the
    /// last dump may have carried (see [`Engine::lost_closes`]); once it is asked for, the
    /// caller runs [`existing::open_sockets`](crate::existing::open_sockets) off the event
    /// loop and hands the result to [`Pipeline::open_sockets_found`].
    pub fn wants_open_sockets(&mut self, now: u64) -> bool {
        if self.dumping || !self.open_sockets.is_empty() || now < self.share_until_ns {
            return false;
        }
        let lost = self.health.close_losses();
        let wanted = self.dump_again || lost > self.losses_dumped && now >= self.period_until_ns;
        if wanted {
            self.losses_asked = lost;
            self.dumping = true;
        }
        wanted
    }

    /// A dump of the open sockets is waiting for the ring to be read past its start.
    pub fn holds_open_sockets(&self) -> bool {
        !self.open_sockets.is_empty()
    }

    /// A dump of the open sockets, which took `took`: applied at the first tick by which
    /// the records from before it are read, so that a close still in the ring is not taken
    /// for a lost one.
    pub fn open_sockets_found(
        &mut self,
        found: anyhow::Result<Vec<OpenSockets>>,
        took: Duration,
        now: u64,
    ) {
        let after =
            |d: Duration| now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.dumping = false;
        self.share_until_ns = after(took.saturating_mul(DUMP_SHARE));
        self.period_until_ns = after(DUMP_PERIOD);
        match found {
            Ok(dumps) => {
                self.losses_dumped = self.losses_asked;
                self.dump_again = false;
                self.open_sockets = dumps;
            }
            // Asked for again, no sooner than a period from now.
            Err(e) => {
                self.share_until_ns = self.share_until_ns.max(self.period_until_ns);
                log::warn!("looking for closes the lost records carried: {e:#}");
            }
        }
    }

    /// Closes the sockets dumps did not find, once the records from before the last one are
    /// read and processed (none held back for a scan or a lookup).
    fn close_lost(&mut self, now: u64, reports: &mut Vec<Report>) {
        let read = self.read_up_to_ns;
        if self.open_sockets.iter().any(|d| d.since_ns > read) || !self.pending.is_empty() {
            return;
        }
        let dumps = std::mem::take(&mut self.open_sockets);
        let kernel = &self.kernel;
        let (closed, suspects) =
            self.engine
                .lost_closes(&dumps, now, &|id| kernel.now(id), reports);
        self.dump_again = suspects > 0;
        for id in self.engine.to_forget() {
            self.kernel.forget(id);
        }
        if closed > 0 {
            log::warn!(
                "closes lost with the records: {closed} sockets found gone by a dump of the \
                 open sockets, their flows reported closed now"
            );
        }
    }

    /// The engine's timers, at CLOCK_BOOTTIME `now`.
    pub fn tick(&mut self, now: u64) -> io::Result<()> {
        self.processes.tick();
        let engine = &mut self.engine;
        // The ring lost records, wake records among them maybe: a read of every flow wakes
        // those that moved (at most every few seconds, for it costs a third of a
        // microsecond per flow).
        let lost = self.health.ringbuf_full > self.ring_losses_seen
            && now.saturating_sub(self.last_full_read_ns) >= FULL_READ_PERIOD_NS;
        let mut bulk = lost && self.kernel.read_all(&mut |id, c| engine.absorb(id, c));
        if bulk {
            self.ring_losses_seen = self.health.ringbuf_full;
            self.last_full_read_ns = now;
        }
        // One lookup per flow the tick looks at, unless that is most of them.
        let due = engine.due(now);
        bulk = bulk
            || due.saturating_mul(3) > engine.stats().flows_tracked
                && self.kernel.read_all(&mut |id, c| engine.absorb(id, c));
        let kernel = &self.kernel;
        let mut reports = if bulk {
            self.engine.on_tick(now, &|_| None)
        } else {
            self.engine.on_tick(now, &|id| kernel.now(id))
        };
        for id in self.engine.to_forget() {
            self.kernel.forget(id);
        }
        if self.holds_open_sockets() {
            self.close_lost(now, &mut reports);
        }
        self.emit(&mut reports)
    }

    /// At exit, after the last records: the summaries in the making (see `Engine::finish`).
    pub fn finish(&mut self, now: u64) -> io::Result<()> {
        let mut reports = self.engine.finish(now);
        self.emit(&mut reports)
    }

    /// Held events nobody will see (the output is gone), for the exit summary.
    pub fn drop_pending(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    /// Names each report's container, then writes those the filter passes.
    pub fn emit(&mut self, reports: &mut [Report]) -> io::Result<()> {
        for r in reports {
            // A report of no socket (REFUSED, an ICMP error no socket matched) is of the
            // container whose process held the port last.
            let cgroup = match r.who.cgroup {
                0 => r.last_owner().map_or(0, |o| o.cgroup),
                c => c,
            };
            if cgroup != 0 {
                match self.containers.lookup(cgroup) {
                    container::Lookup::Known(c) => r.container = c,
                    // Forgotten to make room: for the next reports.
                    container::Lookup::Unknown => {
                        self.unknown_cgroups.insert(cgroup);
                    }
                }
            }
            if self.filter.matches(r) {
                self.sinks.report(r)?;
            }
        }
        self.kernel.flush();
        self.sinks.flush()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use udpmon_common::{Event, EventKind, event::AF_INET};

    use super::*;
    use crate::{
        cli::Cli,
        container::Container,
        engine::{EngineConfig, ReportKind},
        report::{ClockOffset, Formatter, JsonFormat},
    };

    /// No kernel entries; what was forgotten, in order, and how often it was read.
    #[derive(Default)]
    struct Kernel {
        forgotten: Vec<FlowId>,
        lookups: std::cell::Cell<usize>,
        bulk_reads: usize,
    }

    impl FlowCounters for Kernel {
        fn now(&self, _: &FlowId) -> Option<Counters> {
            self.lookups.set(self.lookups.get() + 1);
            None
        }
        fn read_all(&mut self, _: &mut dyn FnMut(&FlowId, &Counters)) -> bool {
            self.bulk_reads += 1;
            true
        }
        fn forget(&mut self, id: &FlowId) {
            self.forgotten.push(*id);
        }
        fn flush(&mut self) {}
    }

    fn pipeline() -> Pipeline<Kernel> {
        let cli = Cli::parse_from(["udpmon", "--format", "json"]);
        let sinks = Sinks {
            clock: ClockOffset(0),
            formatter: Formatter::Json(JsonFormat::new(ClockOffset(0))),
            out: None,
            header: false,
            journal: None,
            metrics: None,
        };
        let engine = Engine::new(EngineConfig::default());
        Pipeline::new(
            Kernel::default(),
            engine,
            NetnsMap::default(),
            Filter::from(&cli),
            sinks,
        )
    }

    /// A first datagram sent by socket `cookie` to 10.0.0.2:53, from a hook that knew only
    /// its namespace's cookie.
    fn first_tx(cookie: u64, netns_cookie: u64) -> Vec<u8> {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::FirstTx as u16;
        ev.family = AF_INET;
        ev.ts_ns = 1_000_000_000 + cookie;
        ev.cookie = cookie;
        ev.tgid = 4242;
        ev.pid = 4242;
        ev.comm[..3].copy_from_slice(b"dig");
        ev.local[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.lport = 40000 + cookie as u16;
        ev.remote[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.rport = 53;
        ev.ret = 40;
        ev.netns_cookie = netns_cookie;
        // SAFETY: Event is repr(C) without padding (checked in udpmon-common).
        unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn events_wait_in_order_for_their_namespace() {
        let mut p = pipeline();
        let mut reports = Vec::new();
        p.netns
            .learn(HashMap::from([(7, 4026531840)]), &HashSet::new());
        // Known namespace: straight through.
        p.record(&first_tx(1, 7), &mut reports);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].who.netns, 4026531840);
        // Unknown: held and asked for, and the next one, of a known namespace, waits behind it.
        p.record(&first_tx(2, 8), &mut reports);
        p.record(&first_tx(3, 7), &mut reports);
        assert_eq!(reports.len(), 1);
        // The scan finds it: both, in order, with their namespaces.
        let asked = p.netns_asks();
        assert_eq!(asked, HashSet::from([8]));
        p.netns.learn(HashMap::from([(8, 4026532000)]), &asked);
        let mut later = Vec::new();
        p.process_pending(false, &mut later);
        let got: Vec<(u64, u32)> = later.iter().map(|r| (r.cookie, r.who.netns)).collect();
        assert_eq!(got, [(2, 4026532000), (3, 4026531840)]);
        assert!(later.iter().all(|r| r.kind == ReportKind::Connect));
        // A namespace gone before the scan: its events go out without one, and are not held
        // again.
        p.record(&first_tx(4, 9), &mut reports);
        let asked = p.netns_asks();
        p.netns.learn(HashMap::new(), &asked);
        let mut last = Vec::new();
        p.process_pending(false, &mut last);
        p.record(&first_tx(5, 9), &mut last);
        let got: Vec<(u64, u32)> = last.iter().map(|r| (r.cookie, r.who.netns)).collect();
        assert_eq!(got, [(4, 0), (5, 0)]);
        assert_eq!(p.drop_pending(), 0);
        assert_eq!(p.health.events_read, 5);
    }

    #[test]
    fn undecodable_records_are_counted_and_closed_flows_forgotten() {
        let mut p = pipeline();
        let mut reports = Vec::new();
        p.record(&[0u8; 7], &mut reports);
        assert_eq!(p.health.decode_errors, 1);
        p.record(&first_tx(1, 0), &mut reports);
        let mut close = Event::zeroed();
        close.kind = EventKind::Close as u16;
        close.cookie = 1;
        close.tgid = 4242;
        close.pid = 4242;
        // SAFETY: as in `first_tx`.
        let close = unsafe {
            std::slice::from_raw_parts((&raw const close).cast::<u8>(), size_of::<Event>())
        };
        p.record(close, &mut reports);
        assert!(reports.iter().any(|r| r.kind == ReportKind::Close));
        let remote = "10.0.0.2:53".parse().unwrap();
        assert_eq!(p.kernel.forgotten, [FlowId { cookie: 1, remote }]);
    }

    /// A tick reads the counters of the flows it looks at, one by one, or all at once when
    /// that is most of them; none of flows that sleep, until the kernel says one woke.
    #[test]
    fn ticks_read_only_the_flows_that_are_due() {
        const S: u64 = 1_000_000_000;
        let mut p = pipeline();
        let mut reports = Vec::new();
        for cookie in 1..=4 {
            p.record(&first_tx(cookie, 0), &mut reports);
        }
        let reads = |p: &Pipeline<Kernel>| (p.kernel.bulk_reads, p.kernel.lookups.get());
        // Every flow is awake: the whole map, once.
        p.tick(2 * S).unwrap();
        assert_eq!(reads(&p), (1, 0));
        // Quiet for long enough: they fall asleep at this tick.
        p.tick(4 * S).unwrap();
        assert_eq!(reads(&p), (2, 0));
        p.tick(5 * S).unwrap();
        assert_eq!(reads(&p), (2, 0));
        let mut wake = first_tx(3, 0);
        wake[std::mem::offset_of!(Event, kind)..][..2]
            .copy_from_slice(&(EventKind::Wake as u16).to_ne_bytes());
        p.record(&wake, &mut reports);
        p.tick(6 * S).unwrap();
        assert_eq!(reads(&p), (2, 1));
        assert_eq!(reports.len(), 4, "the wake record reports nothing");
    }

    /// A record held back behind a namespace scan still wakes its flow: a first datagram
    /// (an answer, a recreated kernel entry) has no wake record to repeat it. And when the
    /// ring lost records, the next tick reads every flow, whatever is due.
    #[test]
    fn held_records_and_lost_ones_wake_flows() {
        const S: u64 = 1_000_000_000;
        let mut p = pipeline();
        let mut reports = Vec::new();
        p.record(&first_tx(1, 0), &mut reports);
        p.tick(2 * S).unwrap();
        p.tick(4 * S).unwrap();
        assert_eq!(p.engine.due(5 * S), 0, "asleep");
        let mut answer = first_tx(1, 8);
        answer[std::mem::offset_of!(Event, kind)..][..2]
            .copy_from_slice(&(EventKind::FirstRx as u16).to_ne_bytes());
        p.record(&answer, &mut reports);
        assert_eq!(p.netns_asks(), HashSet::from([8]), "held for its namespace");
        assert_eq!(p.engine.due(6 * S), 1);
        p.tick(6 * S).unwrap();
        let reads = p.kernel.bulk_reads;
        p.tick(20 * S).unwrap();
        assert_eq!(p.kernel.bulk_reads, reads, "nothing due");
        p.health.ringbuf_full = 3;
        p.tick(21 * S).unwrap();
        assert_eq!(p.kernel.bulk_reads, reads + 1, "records were lost");
        p.tick(22 * S).unwrap();
        assert_eq!(p.kernel.bulk_reads, reads + 1, "no more since");
    }

    /// Lost records ask for a dump of the open sockets, one at a time and one per period; a
    /// dump waits until the records from before it are read; a socket it did not find asks
    /// for another dump, as soon as the dumps' share of the time allows, and is closed when
    /// that one does not find it either (its flows forgotten in the kernel).
    #[test]
    fn lost_records_look_for_lost_closes() {
        const S: u64 = 1_000_000_000;
        let mut p = pipeline();
        let netns = 4026531840;
        p.netns.learn(HashMap::from([(7, netns)]), &HashSet::new());
        let mut reports = Vec::new();
        p.record(&first_tx(1, 7), &mut reports);
        assert!(!p.wants_open_sockets(2 * S), "nothing lost");
        p.health.recursion_misses = 5;
        p.health.kprobe_misses = 2;
        assert!(
            !p.wants_open_sockets(2 * S),
            "skipped runs of programs that see no close"
        );
        p.health.ringbuf_full = 1;
        assert!(p.wants_open_sockets(2 * S));
        assert!(!p.wants_open_sockets(3 * S), "one at a time");
        let dump = |since_ns| {
            Ok(vec![OpenSockets {
                netns,
                since_ns,
                cookies: HashSet::new(),
            }])
        };
        let took = Duration::from_millis(100);
        p.open_sockets_found(dump(4 * S), took, 5 * S);
        p.tick(6 * S).unwrap();
        assert!(
            p.holds_open_sockets(),
            "records from before the dump may be in the ring"
        );
        p.ring_empty(6 * S);
        p.tick(7 * S).unwrap();
        assert!(!p.holds_open_sockets());
        assert_eq!(
            p.engine.stats().closes_recovered,
            0,
            "one dump closes nothing"
        );
        assert!(p.wants_open_sockets(7 * S), "a second dump at once");
        p.open_sockets_found(dump(8 * S), took, 9 * S);
        p.ring_empty(9 * S);
        p.tick(10 * S).unwrap();
        assert_eq!(p.engine.stats().closes_recovered, 1);
        let remote = "10.0.0.2:53".parse().unwrap();
        assert_eq!(p.kernel.forgotten, [FlowId { cookie: 1, remote }]);
        assert!(!p.wants_open_sockets(11 * S), "nothing lost since");
        p.health.decode_errors = 1;
        assert!(
            !p.wants_open_sockets(18 * S),
            "10 s between dumps for losses"
        );
        assert!(p.wants_open_sockets(19 * S));
        p.open_sockets_found(
            Err(anyhow::anyhow!("no sock_diag")),
            Duration::from_secs(2),
            20 * S,
        );
        assert!(
            !p.wants_open_sockets(39 * S),
            "nor more than a tenth of the time"
        );
        assert!(
            p.wants_open_sockets(40 * S),
            "a failed dump is asked for again"
        );
        let failed = Err(anyhow::anyhow!("no sock_diag"));
        p.open_sockets_found(failed, Duration::ZERO, 41 * S);
        assert!(!p.wants_open_sockets(50 * S), "a failure waits a period");
        assert!(p.wants_open_sockets(51 * S));
        p.open_sockets_found(dump(52 * S), took, 52 * S);
        p.ring_empty(53 * S);
        p.tick(53 * S).unwrap();
        assert!(!p.wants_open_sockets(70 * S), "nothing lost since");
        p.health.close_misses = 1;
        assert!(
            p.wants_open_sockets(70 * S),
            "a skipped run of a program that sees closes"
        );
    }

    /// Idle flows are forgotten in the kernel, whether their CLOSE was printed or, on a busy
    /// socket, counted in a summary: else their next datagram would not open them again.
    #[test]
    fn expired_flows_are_forgotten_printed_or_summarised() {
        let mut p = pipeline();
        p.engine = Engine::new(EngineConfig {
            summary: Some(crate::engine::SummaryConfig {
                threshold: 1,
                ..Default::default()
            }),
            ..EngineConfig::default()
        });
        p.tick(500_000_000).unwrap();
        let mut reports = Vec::new();
        for remote in [2, 3, 4] {
            let mut ev = first_tx(1, 0);
            // The same socket to three peers: the second and third flows are summarised.
            ev[std::mem::offset_of!(Event, remote) + 3] = remote;
            p.record(&ev, &mut reports);
        }
        assert_eq!(
            reports
                .iter()
                .filter(|r| r.kind == ReportKind::Connect)
                .count(),
            1
        );
        p.tick(1_000 * 1_000_000_000).unwrap();
        let mut forgotten: Vec<u8> = p
            .kernel
            .forgotten
            .iter()
            .map(|id| match id.remote.ip() {
                std::net::IpAddr::V4(a) => a.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect();
        forgotten.sort_unstable();
        assert_eq!(forgotten, [2, 3, 4]);
    }

    /// A REFUSED names the container of the port's last owner: the port was the container's.
    #[test]
    fn a_refused_names_the_last_owners_container() {
        let mut p = pipeline();
        let podman = Container {
            id: "3f".repeat(32),
            runtime: Some(container::Runtime::Podman),
            name: Some("web".into()),
            pod: None,
            namespace: None,
            pod_uid: None,
        };
        p.containers.learn(HashMap::from([(77, Some(podman))]));
        let raw = |ev: &Event| {
            // SAFETY: as in `first_tx`.
            unsafe { std::slice::from_raw_parts((&raw const *ev).cast::<u8>(), size_of::<Event>()) }
                .to_vec()
        };
        let mut opened = first_tx(1, 0);
        opened[std::mem::offset_of!(Event, cgroup)..][..8].copy_from_slice(&77u64.to_ne_bytes());
        let mut close = Event::zeroed();
        close.kind = EventKind::Close as u16;
        close.cookie = 1;
        close.tgid = 4242;
        close.pid = 4242;
        close.cgroup = 77;
        close.ts_ns = 2_000_000_000;
        let mut refused = Event::zeroed();
        refused.kind = EventKind::NoSocket as u16;
        refused.family = AF_INET;
        refused.ts_ns = 3_000_000_000;
        refused.local[..4].copy_from_slice(&[10, 0, 0, 1]);
        refused.lport = 40001;
        refused.remote[..4].copy_from_slice(&[10, 0, 0, 2]);
        refused.rport = 53;
        refused.flags = udpmon_common::event::flags::TASK_UNRELATED;
        let mut reports = Vec::new();
        for ev in [opened, raw(&close), raw(&refused)] {
            p.record(&ev, &mut reports);
        }
        let r = reports.iter_mut().find(|r| r.kind == ReportKind::Refused);
        let r = r.expect("a REFUSED");
        assert_eq!(r.last_owner().map(|o| o.cgroup), Some(77));
        p.emit(std::slice::from_mut(r)).unwrap();
        let c = r.container.as_deref().expect("the last owner's container");
        assert_eq!(c.name.as_deref(), Some("web"));
    }
}
