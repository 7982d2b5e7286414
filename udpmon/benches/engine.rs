//! Lifecycle-engine benchmarks: events per second on one core, and memory per tracked flow
//! and per remembered peer.
//!
//! `cargo bench -p udpmon --bench engine` runs the divan benchmarks. `cargo xtask bench`
//! runs the same binary in machine-readable modes (one `key value` line per figure):
//! - `engine --udpmon-rate REPS EVENTS`: events/s of the realistic workload, one line per
//!   repetition (`events_per_sec N`).
//! - `engine --udpmon-rss FLOWS PEERS_PER_SOCKET`: resident memory before and after the
//!   engine holds FLOWS flows (`rss_before_bytes`, `rss_after_bytes`, `flows_tracked`,
//!   `peers_tracked`: each flow goes to a remote of its own, so each also holds a peer).
//! - `engine --udpmon-rss-peers PEERS`: the same for PEERS peers remembered across flows,
//!   none of them with a live flow (`peers_tracked`).
//! - `engine --udpmon-tick FLOWS REPS`: the time of a tick over FLOWS flows, one line per
//!   tick (`tick_ns N`), and `flows_tracked`.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use udpmon::{
    decode::{Fact, Family, KernelEvent},
    engine::{Counters, Engine, EngineConfig, FlowId, Identity},
};

/// Sockets open at once in the realistic workload.
const LIVE_SOCKETS: usize = 1000;
/// Peers per socket in the realistic workload (a mix of a resolver and its upstreams).
const PEERS: usize = 4;

fn event(fact: Fact, ts_ns: u64, cookie: u64, local_port: u16, remote: SocketAddr) -> KernelEvent {
    KernelEvent {
        fact,
        ts_ns,
        cookie,
        family: Family::V4,
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), local_port),
        remote,
        task_unrelated: false,
        connected: false,
        recverr: false,
        who: Identity {
            tgid: 4242,
            pid: 4242,
            comm: "bench-client".into(),
            process: "bench-client".into(),
            uid: 1000,
            cgroup: 1,
            netns: 4026531840 + (cookie / 60_000) as u32,
        },
    }
}

fn peer(socket: usize, p: usize) -> SocketAddr {
    let n = (socket * PEERS + p) as u32;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + n)), 53)
}

/// The realistic sequence for `sockets` sockets: each sends to PEERS peers (FirstTx, a
/// CONNECT each), hears back from them (FirstRx, an ESTABLISH each) and closes (one CLOSE per
/// flow), with about LIVE_SOCKETS sockets open at any time.
pub fn workload(sockets: usize) -> Vec<KernelEvent> {
    let mut out = Vec::with_capacity(sockets * (2 * PEERS + 1));
    let mut ts = 1_000_000_000u64;
    let port = |s: usize| 1024 + (s % 60_000) as u16;
    for step in 0..sockets + LIVE_SOCKETS {
        ts += 1_000;
        if step < sockets {
            for p in 0..PEERS {
                let fact = Fact::FirstTx { bytes: 40 };
                out.push(event(fact, ts, step as u64 + 1, port(step), peer(step, p)));
            }
        }
        if let Some(s) = step.checked_sub(LIVE_SOCKETS / 2).filter(|s| *s < sockets) {
            for p in 0..PEERS {
                let fact = Fact::FirstRx { bytes: 120 };
                out.push(event(fact, ts, s as u64 + 1, port(s), peer(s, p)));
            }
        }
        if let Some(s) = step.checked_sub(LIVE_SOCKETS).filter(|s| *s < sockets) {
            let unspec = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
            out.push(event(Fact::Close, ts, s as u64 + 1, port(s), unspec));
        }
    }
    out
}

fn config(max_flows: usize) -> EngineConfig {
    EngineConfig {
        max_flows,
        ..EngineConfig::default()
    }
}

/// Kernel counters as the agent would read them for a closing flow.
fn counters(_: &FlowId) -> Option<Counters> {
    Some(Counters {
        tx_datagrams: 3,
        tx_bytes: 120,
        rx_datagrams: 3,
        rx_bytes: 360,
        first_ns: 1,
        last_tx_ns: 2,
        last_rx_ns: 3,
    })
}

/// Feeds every event to a fresh engine; returns the number of reports.
fn run(events: &[KernelEvent]) -> usize {
    run_with(events, 65536)
}

fn run_with(events: &[KernelEvent], max_flows: usize) -> usize {
    let mut engine = Engine::new(config(max_flows));
    let mut reports = 0;
    // Reused, as the agent reuses its buffer.
    let mut out = Vec::new();
    for ev in events {
        engine.on_event(ev, &counters, &mut out);
        reports += black_box(&mut out).len();
        out.clear();
    }
    reports
}

#[divan::bench(args = [1_000, 25_000])]
fn lifecycle(bencher: divan::Bencher, sockets: usize) {
    let events = workload(sockets);
    bencher
        .counter(divan::counter::ItemsCount::new(events.len()))
        .bench_local(|| run(&events));
}

/// The realistic workload through a table a quarter the size of its ~4000 live flows:
/// nearly every new flow evicts the least active one.
#[divan::bench(args = [25_000])]
fn lifecycle_evicting(bencher: divan::Bencher, sockets: usize) {
    let events = workload(sockets);
    bencher
        .counter(divan::counter::ItemsCount::new(events.len()))
        .bench_local(|| run_with(&events, 1000));
}

/// The periodic tick over a table of held flows (SILENT / idle checks).
#[divan::bench(args = [10_000])]
fn tick(bencher: divan::Bencher, flows: usize) {
    let mut engine = Engine::new(config(flows * 2));
    for ev in workload(flows / PEERS)
        .iter()
        .filter(|e| e.fact != Fact::Close)
    {
        engine.on_event(ev, &counters, &mut Vec::new());
    }
    let mut now = 2_000_000_000u64;
    bencher
        .counter(divan::counter::ItemsCount::new(flows))
        .bench_local(|| {
            now += 1_000_000_000;
            black_box(engine.on_tick(now, &counters))
        });
}

fn rate(reps: usize, events: usize) {
    let evs = workload(events.div_ceil(2 * PEERS + 1).max(1));
    run(&evs); // warm-up
    for _ in 0..reps {
        let start = Instant::now();
        let reports = run(&evs);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        black_box(reports);
        println!("events_per_sec {:.0}", evs.len() as f64 / secs);
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm has a resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Resident memory growth while an engine holds `flows` flows, `peers` per socket, after
/// a tick put them all to sleep (so that their timers count too).
fn rss(flows: usize, peers: usize) {
    let before = rss_bytes();
    let mut engine = holding(flows, peers);
    black_box(engine.on_tick(asleep_at(flows), &counters));
    let after = rss_bytes();
    println!("rss_before_bytes {before}");
    println!("rss_after_bytes {after}");
    println!("flows_tracked {}", engine.stats().flows_tracked);
    println!("sockets_tracked {}", engine.stats().sockets_tracked);
    println!("peers_tracked {}", engine.stats().peers_tracked);
    black_box(engine);
}

/// When the flows of [`holding`] (last active at 1 s + their number in ns) have been quiet
/// for long enough to sleep.
fn asleep_at(flows: usize) -> u64 {
    1_000_000_000 + flows as u64 + udpmon_common::SLEEP_NS
}

/// What a tick costs an engine that holds `flows` flows, 4 per socket, none due for
/// anything: one line per tick (`tick_ns`), after a first one (`first_tick_ns`), which finds
/// every flow quiet for long enough to sleep and puts it to sleep.
fn tick_time(flows: usize, reps: usize) {
    let mut engine = holding(flows, PEERS);
    let mut now = asleep_at(flows);
    for i in 0..=reps {
        let start = Instant::now();
        black_box(engine.on_tick(now, &counters));
        let ns = start.elapsed().as_nanos();
        if i > 0 {
            println!("tick_ns {ns}");
        } else {
            println!("first_tick_ns {ns}");
        }
        now += 1_000_000_000;
    }
    println!("flows_tracked {}", engine.stats().flows_tracked);
}

/// An engine holding `flows` flows, `peers` per socket, each opened by its first datagram.
/// Events are made one at a time and dropped, so only the engine's own memory grows.
fn holding(flows: usize, peers: usize) -> Engine {
    let peers = peers.max(1);
    let mut engine = Engine::new(EngineConfig {
        idle_timeout: Duration::from_secs(3600),
        ..config(flows + 1)
    });
    for i in 0..flows {
        let socket = i / peers;
        let n = u32::try_from(i).expect("fewer than 2^32 flows");
        let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 53);
        let port = 1024 + (socket % 60_000) as u16;
        let ev = event(
            Fact::FirstTx { bytes: 40 },
            1_000_000_000 + i as u64,
            socket as u64 + 1,
            port,
            remote,
        );
        engine.on_event(&ev, &counters, &mut Vec::new());
    }
    engine
}

/// Resident memory growth while an engine remembers `peers` peers (a query to each from a
/// socket of its own, then closed): what a peer costs once its flows are gone.
fn rss_peers(peers: usize) {
    let mut engine = Engine::new(EngineConfig {
        idle_timeout: Duration::from_secs(3600),
        ..config(peers + 1)
    });
    let before = rss_bytes();
    for i in 0..peers {
        let n = u32::try_from(i).expect("fewer than 2^32 peers");
        let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 53);
        let cookie = i as u64 + 1;
        let ts = 1_000_000_000 + 2 * i as u64;
        // One local port for every socket, so that the closed ports' last owners (another
        // table) do not grow with the peers.
        let sent = event(Fact::FirstTx { bytes: 40 }, ts, cookie, 5353, remote);
        engine.on_event(&sent, &counters, &mut Vec::new());
        let unspec = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let closed = event(Fact::Close, ts + 1, cookie, 5353, unspec);
        engine.on_event(&closed, &counters, &mut Vec::new());
    }
    let after = rss_bytes();
    println!("rss_before_bytes {before}");
    println!("rss_after_bytes {after}");
    println!("flows_tracked {}", engine.stats().flows_tracked);
    println!("peers_tracked {}", engine.stats().peers_tracked);
    black_box(engine);
}

pub enum Step {
    Event(KernelEvent),
    Tick(u64),
}

/// A forwarder's traffic: every query from a fresh socket (FirstTx, FirstRx unless the
/// upstream missed it, Close) to one of 4 upstreams, 1 in 8 unanswered, with a tick every
/// 1000 queries; peer state across flows is what it exercises.
pub fn resolver_workload(queries: usize) -> Vec<Step> {
    let mut out = Vec::with_capacity(queries * 3 + queries / 1000 + 1);
    let unspec = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    for q in 0..queries {
        let ts = 1_000_000_000 + 1_000_000 * q as u64;
        let cookie = q as u64 + 1;
        let port = 1024 + (q % 60_000) as u16;
        let upstream = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 0, (q % 4) as u8)), 53);
        let sent = event(Fact::FirstTx { bytes: 40 }, ts, cookie, port, upstream);
        out.push(Step::Event(sent));
        if q % 8 != 0 {
            let fact = Fact::FirstRx { bytes: 120 };
            out.push(Step::Event(event(
                fact,
                ts + 50_000,
                cookie,
                port,
                upstream,
            )));
        }
        out.push(Step::Event(event(
            Fact::Close,
            ts + 100_000,
            cookie,
            port,
            unspec,
        )));
        if q % 1000 == 999 {
            out.push(Step::Tick(ts + 200_000));
        }
    }
    out
}

#[divan::bench(args = [25_000])]
fn peers_resolver(bencher: divan::Bencher, queries: usize) {
    let events = resolver_workload(queries);
    let none = |_: &FlowId| None;
    bencher
        .counter(divan::counter::ItemsCount::new(events.len()))
        .bench_local(|| {
            let mut engine = Engine::new(config(65536));
            let mut reports = 0;
            let mut out = Vec::new();
            for step in &events {
                match step {
                    Step::Event(ev) => engine.on_event(ev, &none, &mut out),
                    Step::Tick(now) => out = engine.on_tick(*now, &none),
                }
                reports += out.len();
                out.clear();
            }
            black_box(reports)
        });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} must be a number: {args:?}"))
    };
    match args.get(1).map(String::as_str) {
        Some("--udpmon-rate") => rate(num(2), num(3)),
        Some("--udpmon-rss") => rss(num(2), num(3)),
        Some("--udpmon-rss-peers") => rss_peers(num(2)),
        Some("--udpmon-tick") => tick_time(num(2), num(3)),
        _ => divan::main(),
    }
}
