//! The running agent: feeds the ring buffer's records to the [`Pipeline`], reads the
//! kernel's flow map for it, runs the namespace scans and container lookups it asks for off
//! the event loop, and ticks once a second for the engine's timers and the health counters.
use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use log::warn;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use udpmon_common::{FlowKey, FlowStats};

use crate::{
    clock,
    container::{self, Ask},
    engine::{Counters, Engine, FlowId, OpenSockets},
    existing,
    filter::Filter,
    flowmap::{Batches, Removals},
    health::{self, Warner},
    netns::{self, NetnsMap},
    pipeline::{FlowCounters, Pipeline},
    probes::{Probes, map},
    report::ClockOffset,
    sinks::Sinks,
};

/// Ring-buffer records handled per turn of the event loop: a few milliseconds of work, so
/// that a full ring cannot hold up ticks, signals or output for long.
const DRAIN_BATCH: usize = 4096;

/// While records flow, the ring is read this often, and the kernel does not wake udpmon for
/// each record (see udpmon-ebpf's `emit`); after `IDLE_POLLS` reads in a row that found
/// nothing, udpmon waits for the kernel to wake it instead, so that a quiet host, or one
/// with a record now and then, costs no 10 ms timer.
const POLL: Duration = Duration::from_millis(10);
const IDLE_POLLS: u32 = 5;

enum Drained {
    /// The ring was empty.
    Nothing,
    /// Read to the end.
    Empty,
    /// The batch ended with records still in the ring.
    More,
}

/// A scan of the network namespaces, off the event loop: cookie -> inode.
type NetnsScan = tokio::task::JoinHandle<anyhow::Result<HashMap<u64, u32>>>;

/// Cgroups being resolved to containers, off the event loop.
type ContainerLookup = tokio::task::JoinHandle<HashMap<u64, Option<container::Container>>>;

/// A dump of the open sockets, off the event loop, and how long it took.
type SocketDump = tokio::task::JoinHandle<(anyhow::Result<Vec<OpenSockets>>, Duration)>;

/// Why the agent stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Signal,
    /// The reader of our output went away (`udpmon | head`): not an error.
    OutputClosed,
}

/// The kernel's flow map, as the pipeline reads it.
pub struct KernelFlows {
    map: BpfHashMap<MapData, FlowKey, FlowStats>,
    /// The same map, for batch reads and deletes (aya has no batch API).
    fd: OwnedFd,
    /// The tick's bulk reads of every flow's counters; None once batch reads failed.
    batches: Option<Batches>,
    /// Kernel entries of flows that ended, deleted together once the reports are written.
    removals: Removals,
}

impl FlowCounters for KernelFlows {
    fn now(&self, id: &FlowId) -> Option<Counters> {
        self.map.get(&FlowKey::from(id), 0).ok().map(Counters::from)
    }

    /// On failure falls back, for good, to one lookup per flow.
    fn read_all(&mut self, each: &mut dyn FnMut(&FlowId, &Counters)) -> bool {
        let Some(batches) = &mut self.batches else {
            return false;
        };
        let read = batches.read(self.fd.as_fd(), |k, v| {
            if let Some(id) = FlowId::of_key(k) {
                each(&id, &Counters::from(*v));
            }
        });
        match read {
            Ok(()) => true,
            Err(e) => {
                warn!("batch reads of the flow map failed ({e}): reading flows one by one");
                self.batches = None;
                false
            }
        }
    }

    fn forget(&mut self, id: &FlowId) {
        self.removals.push(FlowKey::from(id));
    }

    fn flush(&mut self) {
        if let Err(e) = self.removals.flush(self.fd.as_fd()) {
            log::debug!("deleting ended flows from the kernel map: {e}");
        }
    }
}

/// How udpmon learns that the ring has records: reading it every [`POLL`], or waiting for the
/// kernel to wake it, as the programs are told through the map READER_WAITS.
struct Reader {
    waits: Array<MapData, u32>,
    waiting: bool,
    /// False once READER_WAITS could not be written.
    can_wait: bool,
    /// Reads of the ring in a row that found nothing.
    empty: u32,
}

impl Reader {
    /// Tells the programs whether udpmon waits for their wakeup. If the map cannot be
    /// written, udpmon reads the ring on the timer from then on, which needs no wakeup.
    fn wait(&mut self, waiting: bool) {
        self.empty = 0;
        if !self.can_wait {
            return;
        }
        if let Err(e) = self.waits.set(0, u32::from(waiting), 0) {
            warn!("writing map READER_WAITS: {e}; reading the ring every {POLL:?} from now on");
            self.can_wait = false;
            self.waiting = false;
            return;
        }
        self.waiting = waiting;
    }
}

pub struct Agent {
    probes: Probes,
    pipeline: Pipeline<KernelFlows>,
    healthmap: PerCpuArray<MapData, u64>,
    reader: Reader,
    /// Forward the programs' aya-log records (udpmon -vv).
    pub kernel_log: bool,
    warner: Warner,
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
        let reader = Reader {
            waits: Array::try_from(take(map::READER_WAITS)?)?,
            waiting: false,
            can_wait: true,
            empty: 0,
        };
        let kernel = KernelFlows {
            map: flows,
            fd: flows_fd,
            batches: Some(Batches::default()),
            removals: Removals::default(),
        };
        Ok(Self {
            probes,
            pipeline: Pipeline::new(kernel, engine, namespaces, filter, sinks),
            healthmap,
            reader,
            kernel_log: false,
            warner: Warner::new(Duration::from_secs(10)),
        })
    }

    /// See [`Pipeline::set_cri_sockets`].
    pub fn set_cri_sockets(&mut self, sockets: Vec<std::path::PathBuf>) {
        self.pipeline.set_cri_sockets(sockets);
    }

    /// See [`Pipeline::resolve_containers`].
    pub fn resolve_containers(&mut self, asks: Vec<Ask>) {
        self.pipeline.resolve_containers(asks);
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
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.pipeline.sinks.start()?;
        // A scan of the network namespaces in progress, and the cookies it was started for.
        let mut scan: Option<(NetnsScan, HashSet<u64>)> = None;
        // A container lookup in progress, and the cgroups it was started for.
        let mut lookup: Option<(ContainerLookup, Vec<u64>)> = None;
        // A dump of the open sockets in progress, for closes that lost records carried.
        let mut dump: Option<SocketDump> = None;
        let stop = loop {
            let p = &mut self.pipeline;
            if dump.is_none() && p.wants_open_sockets(clock::boot_ns()) {
                dump = Some(tokio::task::spawn_blocking(|| {
                    let start = Instant::now();
                    (existing::open_sockets(), start.elapsed())
                }));
            }
            if scan.is_none() {
                let asked = p.netns_asks();
                if !asked.is_empty() {
                    scan = Some((tokio::task::spawn_blocking(netns::scan), asked));
                }
            }
            if lookup.is_none() {
                let asked = p.container_asks();
                if !asked.is_empty() {
                    let ids = asked.iter().map(|a| a.cgroup).collect();
                    let (mount, roots) = p.container_roots();
                    let task = tokio::task::spawn_blocking(move || {
                        container::resolve(mount.as_deref(), &roots, asked)
                    });
                    lookup = Some((task, ids));
                }
            }
            let step = tokio::select! {
                found = async { (&mut lookup.as_mut().expect("guarded").0).await }, if lookup.is_some() => {
                    let (_, asked) = lookup.take().expect("guarded");
                    let found = found.unwrap_or_else(|e| {
                        warn!("resolving containers: {e}");
                        asked.into_iter().map(|c| (c, None)).collect()
                    });
                    self.pipeline.containers_found(found)
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
                    self.pipeline.netns_found(found, &asked)
                }
                found = async { dump.as_mut().expect("guarded").await }, if dump.is_some() => {
                    dump = None;
                    let (found, took) =
                        found.unwrap_or_else(|e| (Err(anyhow!("{e}")), Duration::ZERO));
                    self.pipeline.open_sockets_found(found, took, clock::boot_ns());
                    Ok(())
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    // Woken: records flow again, read them on the timer.
                    if self.reader.waiting {
                        self.reader.wait(false);
                    }
                    // A bounded batch, so that ticks, signals and output are served while
                    // producers keep the ring full. Readiness is cleared only once the ring is
                    // empty (or a wakeup is lost); until then this branch stays ready and
                    // `select!` picks among the ready branches at random.
                    match self.drain(guard.get_inner_mut(), DRAIN_BATCH) {
                        Ok(Drained::Nothing | Drained::Empty) => {
                            guard.clear_ready();
                            Ok(())
                        }
                        Ok(Drained::More) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                _ = poll.tick(), if !self.reader.waiting => {
                    match self.drain(ring.get_mut(), DRAIN_BATCH) {
                        Ok(Drained::Nothing) => {
                            self.reader.empty += 1;
                            if self.reader.empty < IDLE_POLLS || !self.reader.can_wait {
                                Ok(())
                            } else {
                                // A record submitted as the programs learn that udpmon waits
                                // may have gone without a wakeup: one more read after.
                                self.reader.wait(true);
                                self.drain(ring.get_mut(), DRAIN_BATCH).map(|d| {
                                    if !matches!(d, Drained::Nothing) {
                                        self.reader.wait(false);
                                    }
                                })
                            }
                        }
                        r => r.map(drop),
                    }
                }
                _ = tick.tick() => {
                    // Text times are in the system's zone, which jiff would keep for five
                    // minutes: read anew (TZ, /etc/localtime) when next asked.
                    jiff::tz::reset_system_time_zone_cache();
                    let offset = ClockOffset(clock::wall_minus_boot_ns());
                    self.pipeline.sinks.set_clock(offset);
                    // A dump of the open sockets waits for the ring to be read past its start,
                    // which a ring gone quiet shows only when looked at. And a record that went
                    // without a wakeup as udpmon began to wait for one waits no longer.
                    let looked = if self.pipeline.holds_open_sockets() || self.reader.waiting {
                        self.drain(ring.get_mut(), DRAIN_BATCH).map(drop)
                    } else {
                        Ok(())
                    };
                    let r = looked.and_then(|()| self.pipeline.tick(clock::boot_ns()));
                    self.check_health();
                    r
                }
                guard = async { klog.as_mut().expect("guarded").readable_mut().await }, if klog.is_some() => {
                    let mut guard = guard?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                    Ok(())
                }
                _ = sighup.recv() => self.pipeline.sinks.reopen(),
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
                .and_then(|_| self.pipeline.release_pending(true))
                .and_then(|()| self.pipeline.finish(clock::boot_ns()))
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
    /// reports. An empty ring tells the pipeline how far it has read.
    fn drain(&mut self, rb: &mut RingBuf<MapData>, limit: usize) -> io::Result<Drained> {
        let mut reports = Vec::new();
        let mut left = limit;
        let drained = loop {
            if left == 0 {
                break Drained::More;
            }
            let Some(item) = rb.next() else {
                self.pipeline.ring_empty(clock::boot_ns());
                break if left == limit {
                    Drained::Nothing
                } else {
                    Drained::Empty
                };
            };
            // Whichever branch reads records, they flow: the timer goes on.
            self.reader.empty = 0;
            left -= 1;
            self.pipeline.record(&item, &mut reports);
        };
        self.pipeline.emit(&mut reports)?;
        Ok(drained)
    }

    /// Records nobody will read: the output is gone.
    fn count_unread(&mut self, rb: &mut RingBuf<MapData>) {
        let held = self.pipeline.drop_pending() as u64;
        let health = &mut self.pipeline.health;
        health.unread_at_exit += held;
        while rb.next().is_some() {
            health.unread_at_exit += 1;
        }
    }

    fn check_health(&mut self) {
        let p = &mut self.pipeline;
        if let Err(e) = health::read_kernel(&self.healthmap, &mut p.health) {
            warn!("reading the kernel health counters: {e}");
        }
        let es = p.engine.stats();
        p.health.flows_evicted = es.flows_evicted;
        p.health.kernel_entries_renewed = es.kernel_entries_renewed;
        p.health.flows_tracked = es.flows_tracked as u64;
        p.health.peers_evicted = es.peers_evicted;
        p.health.closes_recovered = es.closes_recovered;
        let misses = self.probes.misses();
        p.health.recursion_misses = misses.recursion;
        p.health.kprobe_misses = misses.kprobe;
        p.health.close_misses = misses.closes;
        p.health.unwritten = p.sinks.unwritten();
        if let Some(msg) = self.warner.check(Instant::now(), &p.health) {
            warn!("events lost: {msg}");
        }
        if let Some(m) = &p.sinks.metrics {
            m.set_health(&p.health);
        }
    }

    /// Final health, read once more from the kernel.
    pub fn summary(&mut self) -> String {
        self.check_health();
        self.pipeline.health.summary()
    }
}
