//! The running agent: kernel ring buffer -> decoder -> engine -> filter -> output, plus a
//! one-second tick for the engine's timers and the health counters.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use log::warn;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use udpmon_common::{FlowKey, FlowStats};

use crate::{
    clock,
    container::{self, Ask, ContainerMap, StateRoots},
    decode::{self, Fact, KernelEvent},
    engine::{CloseReason, Counters, Detail, Engine, FlowId, Report},
    filter::Filter,
    flowmap::{Removals, Snapshot},
    health::{self, Health, Warner},
    netns::{self, Lookup, NetnsMap},
    probes::{Probes, map},
    procfs::ProcessNames,
    report::ClockOffset,
    sinks::Sinks,
};

/// Ring-buffer records handled per turn of the event loop: a few milliseconds of work, so
/// that a full ring cannot hold up ticks, signals or output for long.
const DRAIN_BATCH: usize = 4096;

enum Drained {
    Empty,
    /// The batch ended with records still in the ring.
    More,
}

/// A scan of the network namespaces, off the event loop: cookie -> inode.
type NetnsScan = tokio::task::JoinHandle<anyhow::Result<HashMap<u64, u32>>>;

/// Cgroups being resolved to containers, off the event loop.
type ContainerLookup = tokio::task::JoinHandle<HashMap<u64, Option<container::Container>>>;

/// Cgroups whose container is remembered: entries outlive their containers, so that a
/// container's last events still name it, and a cgroup costs a few hundred bytes.
const CONTAINERS_MAX: usize = 16384;

/// Why the agent stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Signal,
    /// The reader of our output went away (`udpmon | head`): not an error.
    OutputClosed,
}

pub struct Agent {
    probes: Probes,
    flows: BpfHashMap<MapData, FlowKey, FlowStats>,
    /// The same map, for batch reads (aya has no batch API).
    flows_fd: OwnedFd,
    /// The tick's bulk read of every flow's counters; None once batch reads failed.
    snapshot: Option<Snapshot>,
    /// Kernel entries of flows that ended, deleted together once the reports are written.
    removals: Removals,
    healthmap: PerCpuArray<MapData, u64>,
    engine: Engine,
    filter: Filter,
    sinks: Sinks,
    /// Forward the programs' aya-log records (udpmon -vv).
    pub kernel_log: bool,
    health: Health,
    warner: Warner,
    netns: NetnsMap,
    /// Events held back, in order, until a scan names a namespace that one of them is in
    /// (with every event after it, so that the engine sees them in order), with the
    /// namespace cookie of each.
    pending: VecDeque<(KernelEvent, u64)>,
    /// Namespace cookies waiting for the next scan.
    unknown: HashSet<u64>,
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
}

impl Agent {
    pub fn new(
        mut probes: Probes,
        engine: Engine,
        // The namespaces known at startup; the agent scans for later ones itself.
        namespaces: NetnsMap,
        filter: Filter,
        sinks: Sinks,
    ) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            probes
                .ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let flows = take(map::FLOWS)?;
        let flows_fd = match &flows {
            Map::LruHashMap(m) => m.fd().as_fd().try_clone_to_owned()?,
            _ => return Err(anyhow!("map FLOWS is not an LRU hash map")),
        };
        let flows = BpfHashMap::try_from(flows)?;
        let healthmap = PerCpuArray::try_from(take(map::HEALTH)?)?;
        Ok(Self {
            flows,
            flows_fd,
            snapshot: Some(Snapshot::default()),
            removals: Removals::default(),
            healthmap,
            probes,
            engine,
            filter,
            sinks,
            kernel_log: false,
            health: Health::default(),
            warner: Warner::new(Duration::from_secs(10)),
            netns: namespaces,
            pending: VecDeque::new(),
            unknown: HashSet::new(),
            processes: ProcessNames::default(),
            containers: ContainerMap::new(CONTAINERS_MAX),
            unknown_cgroups: HashSet::new(),
            cgroup_paths: HashMap::new(),
            cgroup_mount: std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|m| container::v2_mount(&m)),
            state_roots: Arc::new(StateRoots::default()),
        })
    }

    pub async fn run(&mut self) -> anyhow::Result<Stop> {
        let ring = self
            .probes
            .ebpf
            .take_map(map::EVENTS)
            .ok_or_else(|| anyhow!("EVENTS map missing"))?;
        let ring = RingBuf::try_from(ring)?;
        // SAFETY: the ring buffer's fd is owned by the value moved into the AsyncFd, so it
        // stays open and unchanged for the AsyncFd's whole life.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow!("polling the ring buffer: {e}"))?;
        // Kernel-side aya-log records (only with -vv: otherwise the programs carry none).
        let mut klog = if self.kernel_log {
            match aya_log::EbpfLogger::init(&mut self.probes.ebpf) {
                // SAFETY: the logger owns its fd for the AsyncFd's whole life.
                Ok(l) => unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }.ok(),
                Err(e) => {
                    warn!("kernel logs unavailable: {e}");
                    None
                }
            }
        } else {
            None
        };
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        // Only now: a SIGINT from here on detaches cleanly (before, it would kill udpmon).
        let ready = format!("watching UDP sockets (hooks: {})", self.probes.strategy);
        eprintln!("udpmon: {ready}");
        // Type=notify: the unit is started once events flow. Outside systemd, a no-op.
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&ready),
            ],
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.sinks.start()?;
        // A scan of the network namespaces in progress, and the cookies it was started for.
        let mut scan: Option<(NetnsScan, HashSet<u64>)> = None;
        // A container lookup in progress, and the cgroups it was started for.
        let mut lookup: Option<(ContainerLookup, Vec<u64>)> = None;
        let stop = loop {
            if scan.is_none() && !self.unknown.is_empty() {
                let asked = std::mem::take(&mut self.unknown);
                scan = Some((tokio::task::spawn_blocking(netns::scan), asked));
            }
            if lookup.is_none() && !self.unknown_cgroups.is_empty() {
                let asked: Vec<Ask> = std::mem::take(&mut self.unknown_cgroups)
                    .into_iter()
                    .map(|cgroup| Ask {
                        cgroup,
                        path: self.cgroup_paths.remove(&cgroup).flatten(),
                    })
                    .collect();
                let ids = asked.iter().map(|a| a.cgroup).collect();
                let mount = self.cgroup_mount.clone();
                let roots = Arc::clone(&self.state_roots);
                let task = tokio::task::spawn_blocking(move || {
                    container::resolve(mount.as_deref(), &roots, asked)
                });
                lookup = Some((task, ids));
            }
            let step = tokio::select! {
                found = async { (&mut lookup.as_mut().expect("guarded").0).await }, if lookup.is_some() => {
                    let (_, asked) = lookup.take().expect("guarded");
                    let found = found.unwrap_or_else(|e| {
                        warn!("resolving containers: {e}");
                        asked.into_iter().map(|c| (c, None)).collect()
                    });
                    self.containers.learn(found);
                    let containers = &self.containers;
                    self.cgroup_paths.retain(|c, _| !containers.knows(*c));
                    self.release_pending(false)
                }
                found = async { (&mut scan.as_mut().expect("guarded").0).await }, if scan.is_some() => {
                    let (_, asked) = scan.take().expect("guarded");
                    let found = match found {
                        Ok(Ok(found)) => found,
                        Ok(Err(e)) => {
                            warn!("scanning network namespaces: {e:#}");
                            HashMap::new()
                        }
                        Err(e) => {
                            warn!("scanning network namespaces: {e}");
                            HashMap::new()
                        }
                    };
                    self.netns.learn(found, &asked);
                    self.release_pending(false)
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    // A bounded batch, so that ticks, signals and output are served while
                    // producers keep the ring full. Readiness is cleared only once the ring is
                    // empty (or a wakeup is lost); until then this branch stays ready and
                    // `select!` picks among the ready branches at random.
                    match self.drain(guard.get_inner_mut(), DRAIN_BATCH) {
                        Ok(Drained::Empty) => {
                            guard.clear_ready();
                            Ok(())
                        }
                        Ok(Drained::More) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                _ = tick.tick() => {
                    let offset = ClockOffset(clock::wall_minus_boot_ns());
                    self.sinks.set_clock(offset);
                    let now = clock::boot_ns();
                    self.read_snapshot();
                    let mut reports = match &self.snapshot {
                        Some(snap) => {
                            let read = |id: &FlowId| {
                                snap.entries.get(&FlowKey::from(id)).copied().map(Counters::from)
                            };
                            self.engine.on_tick(now, &read)
                        }
                        None => {
                            let flows = &self.flows;
                            let read = |id: &FlowId| read_counters(flows, id);
                            self.engine.on_tick(now, &read)
                        }
                    };
                    let r = self.emit(&mut reports);
                    self.check_health();
                    r
                }
                guard = async { klog.as_mut().expect("guarded").readable_mut().await }, if klog.is_some() => {
                    let mut guard = guard?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                    Ok(())
                }
                _ = sighup.recv() => self.sinks.reopen(),
                _ = sigint.recv() => break Stop::Signal,
                _ = sigterm.recv() => break Stop::Signal,
            };
            match step {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break Stop::OutputClosed,
                Err(e) => return Err(anyhow::Error::new(e).context("writing events")),
            }
        };
        // Nothing more can arrive once the programs are detached: what the ring holds now is
        // the rest, printed (or, with no reader left, counted) before the summary.
        self.probes.detach();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let rb = ring.get_mut();
        match stop {
            Stop::Signal => match self
                .drain(rb, usize::MAX)
                .and_then(|_| self.release_pending(true))
            {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.count_unread(rb),
                r => {
                    r.map_err(|e| anyhow::Error::new(e).context("writing events"))?;
                }
            },
            Stop::OutputClosed => self.count_unread(rb),
        }
        Ok(stop)
    }

    /// Decodes and processes up to `limit` records from the ring buffer, then writes the
    /// reports.
    fn drain(&mut self, rb: &mut RingBuf<MapData>, limit: usize) -> io::Result<Drained> {
        let mut reports = Vec::new();
        let mut left = limit;
        let drained = loop {
            if left == 0 {
                break Drained::More;
            }
            let Some(item) = rb.next() else {
                break Drained::Empty;
            };
            left -= 1;
            self.health.events_read += 1;
            match decode::raw(&item)
                .and_then(|raw| Ok((decode::decode_event(&raw)?, raw.netns_cookie)))
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
            self.process_pending(false, &mut reports);
        };
        self.emit(&mut reports)?;
        Ok(drained)
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
    fn process_pending(&mut self, force: bool, reports: &mut Vec<crate::engine::Report>) {
        while let Some((ev, cookie)) = self.pending.front_mut() {
            if ev.netns == 0 && *cookie != 0 {
                match self.netns.lookup(*cookie) {
                    Lookup::Inode(i) => ev.netns = i,
                    Lookup::Unresolvable => {}
                    Lookup::Unknown if force => {}
                    Lookup::Unknown => {
                        self.unknown.insert(*cookie);
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
            let flows = &self.flows;
            let read = |id: &FlowId| read_counters(flows, id);
            reports.extend(self.engine.on_event(&ev, &read));
            // The socket is gone: so are its kernel flow entries.
            for id in &closing {
                self.removals.push(FlowKey::from(id));
            }
        }
    }

    /// After a scan (or at exit, `force`): the held events that can now be processed.
    fn release_pending(&mut self, force: bool) -> io::Result<()> {
        let mut reports = Vec::new();
        self.process_pending(force, &mut reports);
        self.emit(&mut reports)
    }

    /// Records nobody will read: the output is gone.
    fn count_unread(&mut self, rb: &mut RingBuf<MapData>) {
        self.health.unread_at_exit += self.pending.len() as u64;
        self.pending.clear();
        while rb.next().is_some() {
            self.health.unread_at_exit += 1;
        }
    }

    /// Refreshes the snapshot; on failure falls back, for good, to one lookup per flow.
    fn read_snapshot(&mut self) {
        if let Some(snap) = &mut self.snapshot
            && let Err(e) = snap.read(self.flows_fd.as_fd())
        {
            warn!("batch reads of the flow map failed ({e}): reading flows one by one");
            self.snapshot = None;
        }
    }

    fn emit(&mut self, reports: &mut [Report]) -> io::Result<()> {
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
                // Without its kernel entry, new traffic reopens the flow with fresh events.
                self.removals.push(FlowKey::from(&FlowId {
                    cookie: r.cookie,
                    remote: r.remote,
                }));
            }
            if self.filter.matches(r) {
                self.sinks.report(r)?;
            }
        }
        if let Err(e) = self.removals.flush(self.flows_fd.as_fd()) {
            log::debug!("deleting ended flows from the kernel map: {e}");
        }
        self.sinks.flush()
    }

    fn check_health(&mut self) {
        if let Err(e) = health::read_kernel(&self.healthmap, &mut self.health) {
            warn!("reading the kernel health counters: {e}");
        }
        let es = self.engine.stats();
        self.health.flows_evicted = es.flows_evicted;
        self.health.kernel_entries_renewed = es.kernel_entries_renewed;
        self.health.flows_tracked = es.flows_tracked as u64;
        self.health.peers_evicted = es.peers_evicted;
        self.health.recursion_misses = self.probes.recursion_misses();
        self.health.kprobe_misses = self.probes.kprobe_misses();
        self.health.unwritten = self.sinks.unwritten();
        if let Some(msg) = self.warner.check(Instant::now(), &self.health) {
            warn!("events lost: {msg}");
        }
        if let Some(m) = &self.sinks.metrics {
            m.set_health(&self.health);
        }
    }

    /// Final health, read once more from the kernel.
    pub fn summary(&mut self) -> String {
        self.check_health();
        self.health.summary()
    }
}

fn read_counters(flows: &BpfHashMap<MapData, FlowKey, FlowStats>, id: &FlowId) -> Option<Counters> {
    flows.get(&FlowKey::from(id), 0).ok().map(Counters::from)
}
