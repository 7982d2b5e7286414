//! The agent's whole path on one core: ring-buffer records (the kernel's `Event` bytes) ->
//! decode -> process names -> engine -> filter -> JSON lines written to /dev/null. The
//! flow counters come from a stand-in for the kernel map; what the kernel does is measured
//! by the hot-path and ramp steps of `cargo xtask bench`.
//!
//! `cargo bench -p udpmon --bench pipeline` runs the divan benchmark. `cargo xtask bench`
//! runs `pipeline --udpmon-rate REPS EVENTS [text]`: records/s, one `events_per_sec N` line
//! per repetition; with `text`, text lines (the default output) instead of JSON.
use std::{path::Path, time::Instant};

use clap::Parser as _;
use udpmon::{
    cli::Cli,
    engine::{Counters, Engine, EngineConfig, FlowId},
    filter::Filter,
    netns::NetnsMap,
    output::Output,
    pipeline::{FlowCounters, Pipeline},
    report::{ClockOffset, Formatter, JsonFormat, TextFormat},
    sinks::Sinks,
};
use udpmon_common::{Event, EventKind, event::AF_INET};

/// Sockets open at once, and peers per socket: as in `benches/engine.rs`.
const LIVE_SOCKETS: usize = 1000;
const PEERS: usize = 4;

/// Every flow has sent and heard a few datagrams.
struct Kernel;

impl FlowCounters for Kernel {
    fn now(&self, _: &FlowId) -> Option<Counters> {
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
    fn read_all(&mut self, _: &mut dyn FnMut(&FlowId, &Counters)) -> bool {
        false
    }
    fn forget(&mut self, _: &FlowId) {}
    fn flush(&mut self) {}
}

fn record(kind: EventKind, ts_ns: u64, socket: usize, peer: Option<usize>) -> Vec<u8> {
    let mut ev = Event::zeroed();
    ev.kind = kind as u16;
    ev.family = AF_INET;
    ev.ts_ns = ts_ns;
    ev.cookie = socket as u64 + 1;
    // This process, so that its name is the comm and no /proc read is needed.
    ev.tgid = std::process::id();
    ev.pid = ev.tgid;
    ev.uid = 1000;
    ev.netns = 4026531840;
    ev.comm[..12].copy_from_slice(b"bench-client");
    ev.local[..4].copy_from_slice(&[10, 0, 0, 1]);
    ev.lport = 1024 + (socket % 60_000) as u16;
    match peer {
        Some(p) => {
            let n = (0x0a01_0000 + (socket * PEERS + p) as u32).to_be_bytes();
            ev.remote[..4].copy_from_slice(&n);
            ev.rport = 53;
            ev.ret = if kind == EventKind::FirstTx { 40 } else { 120 };
        }
        None => ev.family = 0,
    }
    // SAFETY: Event is repr(C) without padding (checked in udpmon-common).
    let bytes =
        unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<Event>()) };
    bytes.to_vec()
}

/// The engine bench's workload as records: each socket sends to PEERS peers, hears back
/// from each and closes, with about LIVE_SOCKETS sockets open at any time.
fn workload(sockets: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(sockets * (2 * PEERS + 1));
    let mut ts = 1_000_000_000u64;
    for step in 0..sockets + LIVE_SOCKETS {
        ts += 1_000;
        if step < sockets {
            for p in 0..PEERS {
                out.push(record(EventKind::FirstTx, ts, step, Some(p)));
            }
        }
        if let Some(s) = step.checked_sub(LIVE_SOCKETS / 2).filter(|s| *s < sockets) {
            for p in 0..PEERS {
                out.push(record(EventKind::FirstRx, ts, s, Some(p)));
            }
        }
        if let Some(s) = step.checked_sub(LIVE_SOCKETS).filter(|s| *s < sockets) {
            out.push(record(EventKind::Close, ts, s, None));
        }
    }
    out
}

fn pipeline(text: bool) -> Pipeline<Kernel> {
    let cli = Cli::parse_from(["udpmon", "--format", "json"]);
    let clock = ClockOffset(1_700_000_000_000_000_000);
    let sinks = Sinks {
        clock,
        formatter: if text {
            Formatter::Text(TextFormat::with_offset(clock, time::UtcOffset::UTC))
        } else {
            Formatter::Json(JsonFormat::new(clock))
        },
        out: Some(Output::open(Path::new("/dev/null")).expect("opening /dev/null")),
        header: false,
        journal: None,
        metrics: None,
    };
    let engine = Engine::new(EngineConfig {
        max_flows: 65536,
        ..EngineConfig::default()
    });
    Pipeline::new(
        Kernel,
        engine,
        NetnsMap::default(),
        Filter::from(&cli),
        sinks,
    )
}

/// Feeds every record to a fresh pipeline in batches, as the agent drains the ring; returns
/// the records read.
fn run(records: &[Vec<u8>], text: bool) -> u64 {
    let mut p = pipeline(text);
    let mut reports = Vec::new();
    for batch in records.chunks(4096) {
        for r in batch {
            p.record(r, &mut reports);
        }
        p.emit(&mut reports).expect("writing to /dev/null");
        reports.clear();
    }
    p.health.events_read
}

#[divan::bench(args = [25_000])]
fn records_to_json(bencher: divan::Bencher, sockets: usize) {
    let records = workload(sockets);
    bencher
        .counter(divan::counter::ItemsCount::new(records.len()))
        .bench_local(|| run(&records, false));
}

fn rate(reps: usize, events: usize, text: bool) {
    let records = workload(events.div_ceil(2 * PEERS + 1).max(1));
    run(&records, text); // warm-up
    for _ in 0..reps {
        let start = Instant::now();
        let read = run(&records, text);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        assert_eq!(read, records.len() as u64);
        println!("events_per_sec {:.0}", records.len() as f64 / secs);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} must be a number: {args:?}"))
    };
    match args.get(1).map(String::as_str) {
        Some("--udpmon-rate") => rate(num(2), num(3), args.get(4).is_some_and(|a| a == "text")),
        _ => divan::main(),
    }
}
