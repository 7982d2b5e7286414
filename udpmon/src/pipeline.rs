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
};

use crate::{
    container::{self, ContainerMap, StateRoots},
    decode::{self, Fact, KernelEvent},
    engine::{CloseReason, Counters, Detail, Engine, FlowId, Report},
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
    /// Before a tick, which looks at every flow: read them all at once.
    fn refresh(&mut self);
    /// A flow's counters as of the last [`refresh`](Self::refresh).
    fn at_tick(&self, id: &FlowId) -> Option<Counters>;
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
    pub netns: NetnsMap,
    /// Events held back, in order, until a scan names a namespace that one of them is in
    /// (with every event after it, so that the engine sees them in order), with the
    /// namespace cookie of each.
    pending: VecDeque<(KernelEvent, u64)>,
    /// Namespace cookies waiting for the next scan.
    pub unknown_netns: HashSet<u64>,
    processes: ProcessNames,
    pub containers: ContainerMap,
    /// Cgroup ids waiting for the next container lookup; events are held for them like for
    /// namespaces.
    pub unknown_cgroups: HashSet<u64>,
    /// The cgroup path of each unresolved cgroup id, read from /proc/PID/cgroup as soon as
    /// an event of it is decoded: a short-lived process may be gone by the time the lookup
    /// runs (None: it already was).
    pub cgroup_paths: HashMap<u64, Option<String>>,
    /// The cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
    pub cgroup_mount: Option<PathBuf>,
    pub state_roots: Arc<StateRoots>,
}

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
        }
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
                // The engine takes a record's identity only from the task that ran the
                // hook; a softirq record is named after its socket's owner.
                if !ev.task_unrelated {
                    ev.process = self.processes.name(ev.tgid, ev.pid, &ev.comm);
                    self.note_cgroup(&ev);
                }
                self.pending.push_back((ev, netns_cookie));
            }
            Err(e) => {
                self.health.decode_errors += 1;
                log::debug!("undecodable event: {e}");
            }
        }
        self.process_pending(false, reports);
    }

    /// The path of a cgroup not resolved yet, while its process is surely alive: read from
    /// procfs, in memory, as the process names are.
    fn note_cgroup(&mut self, ev: &KernelEvent) {
        if ev.cgroup == 0
            || self.containers.knows(ev.cgroup)
            || self.cgroup_paths.contains_key(&ev.cgroup)
        {
            return;
        }
        let path = std::fs::read_to_string(format!("/proc/{}/cgroup", ev.tgid))
            .ok()
            .and_then(|c| container::v2_path(&c).map(str::to_owned));
        self.cgroup_paths.insert(ev.cgroup, path);
    }

    /// Processes held events in order, up to the first whose namespace no scan has seen yet
    /// (its cookie is then queued for the next scan); `force`, at exit, processes them all.
    fn process_pending(&mut self, force: bool, reports: &mut Vec<Report>) {
        while let Some((ev, cookie)) = self.pending.front_mut() {
            if ev.netns == 0 && *cookie != 0 {
                match self.netns.lookup(*cookie) {
                    Lookup::Inode(i) => ev.netns = i,
                    Lookup::Unresolvable => {}
                    Lookup::Unknown if force => {}
                    Lookup::Unknown => {
                        self.unknown_netns.insert(*cookie);
                        return;
                    }
                }
            }
            // Held until its container is known, so that every report of the socket names
            // it (the engine takes the owner's cgroup only from such events).
            if !force && !ev.task_unrelated && ev.cgroup != 0 && !self.containers.knows(ev.cgroup) {
                self.unknown_cgroups.insert(ev.cgroup);
                return;
            }
            let (ev, _) = self.pending.pop_front().expect("front exists");
            let closing = match ev.fact {
                Fact::Close => self.engine.flows_of(ev.cookie),
                _ => Vec::new(),
            };
            let kernel = &self.kernel;
            reports.extend(self.engine.on_event(&ev, &|id| kernel.now(id)));
            // The socket is gone: so are its kernel flow entries.
            for id in &closing {
                self.kernel.forget(id);
            }
        }
    }

    /// After a scan or a lookup (or at exit, `force`): the held events that can now be
    /// processed.
    pub fn release_pending(&mut self, force: bool) -> io::Result<()> {
        let mut reports = Vec::new();
        self.process_pending(force, &mut reports);
        self.emit(&mut reports)
    }

    /// The engine's timers, at CLOCK_BOOTTIME `now`.
    pub fn tick(&mut self, now: u64) -> io::Result<()> {
        self.kernel.refresh();
        let kernel = &self.kernel;
        let mut reports = self.engine.on_tick(now, &|id| kernel.at_tick(id));
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
            if r.cgroup != 0 {
                match self.containers.lookup(r.cgroup) {
                    container::Lookup::Known(c) => r.container = c,
                    // Forgotten to make room (or a socket from before udpmon started): for
                    // the next reports.
                    container::Lookup::Unknown => {
                        self.unknown_cgroups.insert(r.cgroup);
                    }
                }
            }
            if let Detail::Closed {
                reason: CloseReason::Idle | CloseReason::Evicted,
                ..
            } = r.detail
            {
                self.kernel.forget(&FlowId {
                    cookie: r.cookie,
                    remote: r.remote,
                });
            }
            if self.filter.matches(r) {
                self.sinks.report(r)?;
            }
        }
        self.kernel.flush();
        self.sinks.flush()
    }
}
