//! `cargo xtask bench`: what an operator pays for running udpmon, as one table. Every
//! throughput figure is a difference or ratio against a baseline measured in the same run,
//! repeated (median and min..max), with the configurations alternated to spread drift.
//!
//! Steps: (1) hot path: UDP send flood and ping-pong, loopback and veth between two network
//! namespaces, 64 and 1400 bytes, and TCP traffic udpmon must not slow down (request/response
//! over both paths, a bulk stream over loopback), with nothing attached, udpmon attached, and
//! a bpftrace script doing the same per-datagram accounting; then udpmon's program time per
//! UDP datagram and per TCP segment from the kernel's bpf_stats; (2) event pipeline: a ramp
//! of new flows per second, ring-buffer drops from udpmon's exit summary and its CPU use;
//! (3) engine: events per second on one core and resident memory per tracked flow and per
//! remembered peer (`udpmon/benches/engine.rs`), the whole agent path from ring-buffer records
//! to JSON lines (`udpmon/benches/pipeline.rs`), and the kernel FLOWS map entry size;
//! (4) startup: spawn to first event, peak RSS.
//! `--smoke` runs every step once with tiny durations, asserting nothing about the numbers
//! but failing if a step fails (a tier of `cargo xtask test`). `--against BIN` adds another
//! udpmon binary (an older build) to the hot path and per-program steps, in the same rotation,
//! so that a before/after comparison comes from one run. `--vm KERNEL` runs the hot path per
//! hook strategy in qemu VMs instead (see `in_vm`), where fentry and kprobes exist.
mod in_vm;
mod load;
mod tools;

use std::{
    fmt::Write as _,
    path::{Path as FsPath, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use load::{Path, Shape, Veth};
use tools::{Bpftrace, Udpmon};

use crate::{bootstrap, build};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Tiny durations and one repetition of every step: checks that the bench runs.
    #[arg(long)]
    smoke: bool,
    /// Repetitions of every hot-path measurement (default 5; 1 with --smoke).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per hot-path measurement (default 2; 0.2 with --smoke).
    #[arg(long)]
    secs: Option<f64>,
    /// Instead of the host bench: the hot-path step in a qemu VM on this kernel (6.1, 6.12,
    /// 7.x), nothing attached versus udpmon on each hook strategy (fentry, kprobe,
    /// tracepoint); ratios only, since the VM runs under software emulation. Repeatable.
    /// Defaults there: 3 repetitions of 0.5 s (--reps and --secs override them).
    #[arg(long = "vm", value_name = "KERNEL")]
    vm: Vec<String>,
    /// With --vm: run the guest on the host's real time instead of qemu's instruction
    /// counter (the default), so that the figures weigh instructions as TCG runs them, but
    /// move with whatever else the host runs.
    #[arg(long, requires = "vm")]
    vm_realtime: bool,
    /// Another udpmon binary (say, built from an older commit) to measure as the extra
    /// configuration "udpmon (against)" in the hot-path, per-program and new-flow ramp
    /// steps, side by side with this tree's in the same run.
    #[arg(long, value_name = "PATH", conflicts_with = "vm")]
    against: Option<PathBuf>,
}

pub use in_vm::{GuestArgs, guest};

/// Hook strategies this bench can run on the host: only what the host kernel allows.
const HOST_STRATEGY: &str = "tracepoint";

struct Plan {
    smoke: bool,
    reps: usize,
    dur: Duration,
    ramp: Vec<u64>,
    ramp_reps: usize,
    ramp_dur: Duration,
    engine_events: usize,
    rss_flows: Vec<usize>,
    startup_reps: usize,
}

impl Plan {
    fn new(a: &BenchArgs) -> Self {
        let s = a.smoke;
        let reps = a.reps.unwrap_or(if s { 1 } else { 5 }).max(1);
        let secs = a
            .secs
            .unwrap_or(if s { 0.2 } else { 2.0 })
            .clamp(0.05, 60.0);
        Plan {
            smoke: s,
            reps,
            dur: Duration::from_secs_f64(secs),
            ramp: if s {
                vec![10_000]
            } else {
                vec![10_000, 30_000, 100_000, 150_000, 300_000]
            },
            ramp_reps: if s { 1 } else { 3 },
            ramp_dur: Duration::from_secs_f64(if s { 0.3 } else { 2.0 }),
            engine_events: if s { 20_000 } else { 2_000_000 },
            rss_flows: if s {
                vec![10_000]
            } else {
                vec![10_000, 100_000, 1_000_000]
            },
            startup_reps: if s { 1 } else { 5 },
        }
    }
}

/// `cargo xtask bench --smoke`, for the test tier.
pub fn smoke() -> anyhow::Result<()> {
    run(&BenchArgs {
        smoke: true,
        reps: None,
        secs: None,
        vm: Vec::new(),
        vm_realtime: false,
        against: None,
    })
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !args.vm.is_empty() {
        return in_vm::run(args);
    }
    if !bootstrap::is_root() {
        bail!("the bench attaches eBPF programs and creates network namespaces: run it as root");
    }
    // Checked before the build, which takes minutes.
    let against = args
        .against
        .as_deref()
        .map(|p| std::fs::canonicalize(p).with_context(|| format!("--against {}", p.display())))
        .transpose()?;
    let plan = Plan::new(args);
    let path = bootstrap::build_env()?;
    // protoc: the benches build the dev-dependencies, the CRI bindings among them.
    bootstrap::apt(&["bpftrace", "bpftool", "iproute2", "protobuf-compiler"])?;
    let bins = Bins {
        udpmon: build::release()?,
        against,
    };
    let engine_bin = bench_binary(&path, "engine")?;
    let pipeline_bin = bench_binary(&path, "pipeline")?;
    let tmp = TempDir::new()?;

    let hot = hot_path(&plan, &bins, &tmp)?;
    let progs = prog_costs(&plan, &bins, &tmp)?;
    let pipe = pipeline(&plan, &bins)?;
    let eng = engine(&plan, &engine_bin, &pipeline_bin)?;
    let start = startup(&plan, &bins.udpmon, &tmp)?;

    print!("{}", table(&plan, &bins, &hot, &progs, &pipe, &eng, &start));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Statistics

/// Median and range of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn spread(v: &[f64]) -> Spread {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            n: 0,
        };
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Spread {
        median,
        min: s[0],
        max: s[n - 1],
        n,
    }
}

/// "123 [98..150]" with the unit after the median.
fn fmt_spread(s: Spread, digits: usize, unit: &str) -> String {
    if s.n <= 1 {
        format!("{:.*}{unit}", digits, s.median)
    } else {
        format!(
            "{:.*}{unit} [{:.*}..{:.*}]",
            digits, s.median, digits, s.min, digits, s.max
        )
    }
}

/// `s` with every figure divided by `by` (> 0).
fn div(s: Spread, by: f64) -> Spread {
    Spread {
        median: s.median / by,
        min: s.min / by,
        max: s.max / by,
        n: s.n,
    }
}

/// f(baseline, with) per repetition, each paired with the same repetition's baseline.
fn paired(base: &[f64], with: &[f64], f: impl Fn(f64, f64) -> f64) -> Spread {
    spread(
        &base
            .iter()
            .zip(with)
            .map(|(b, w)| f(*b, *w))
            .collect::<Vec<_>>(),
    )
}

fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

// ---------------------------------------------------------------------------------------
// Step 1: hot path

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Nothing,
    Udpmon,
    /// The `--against` binary.
    Against,
    Bpftrace,
}

/// The udpmon binaries under test: this tree's, and `--against`'s if given.
struct Bins {
    udpmon: PathBuf,
    against: Option<PathBuf>,
}

impl Bins {
    /// The hot-path configurations, in table order (the baseline first).
    fn tools(&self) -> Vec<Tool> {
        let mut t = vec![Tool::Nothing, Tool::Udpmon];
        if self.against.is_some() {
            t.push(Tool::Against);
        }
        t.push(Tool::Bpftrace);
        t
    }

    /// (tool, binary) of every udpmon under test.
    fn udpmons(&self) -> Vec<(Tool, &FsPath)> {
        let mut u = vec![(Tool::Udpmon, self.udpmon.as_path())];
        u.extend(self.against.as_deref().map(|b| (Tool::Against, b)));
        u
    }
}

/// Indices into the paths of [`hot_paths`].
const LOOPBACK: usize = 0;
const VETH: usize = 1;

#[derive(Clone, Copy)]
struct Workload {
    path: usize,
    shape: Shape,
    size: usize,
}

impl Workload {
    fn label(&self, paths: &[Path]) -> String {
        let size = if self.size >= 1024 && self.size.is_multiple_of(1024) {
            format!("{} KiB", self.size / 1024)
        } else {
            format!("{} B", self.size)
        };
        format!("{} {} {size}", paths[self.path].name(), self.shape.name())
    }

    /// Datagrams per operation (a round trip is two); None for TCP, whose cost is not
    /// counted per packet in the hot-path rows but as the rate kept.
    fn datagrams(&self) -> Option<f64> {
        match self.shape {
            Shape::Flood => Some(1.0),
            Shape::PingPong => Some(2.0),
            Shape::TcpRr | Shape::TcpStream => None,
        }
    }

    /// (what the baseline's CPU is given per, the rate's unit).
    fn units(&self) -> (&'static str, &'static str) {
        match self.shape {
            Shape::Flood => ("datagram", "dgram/s"),
            Shape::PingPong => ("datagram", "round trips/s"),
            Shape::TcpRr => ("round trip", "round trips/s"),
            Shape::TcpStream => ("write", "writes/s"),
        }
    }
}

struct HotRow {
    work: Workload,
    label: String,
    /// Wall-clock ops/s per repetition, per configuration (index as [`Hot::tools`]).
    rates: Vec<Vec<f64>>,
    /// CPU ns per op per repetition, per configuration.
    cpu: Vec<Vec<f64>>,
}

struct Hot {
    tools: Vec<Tool>,
    rows: Vec<HotRow>,
    /// Ring-buffer drops summed over each configuration's runs.
    drops: Vec<u64>,
}

impl Hot {
    fn col(&self, tool: Tool) -> Option<usize> {
        self.tools.iter().position(|t| *t == tool)
    }

    fn row(&self, path: usize, shape: Shape, size: usize) -> Option<&HotRow> {
        self.rows
            .iter()
            .find(|r| (r.work.path, r.work.shape, r.work.size) == (path, shape, size))
    }
}

/// The hot-path workloads: UDP flood and ping-pong over loopback and veth, 64 and 1400
/// bytes; then TCP, whose cost udpmon must keep near nothing: request/response over both
/// paths and a bulk stream of 64 KiB writes over loopback. New rows go last, so that the
/// row indices of the in-VM data stay those of older runs.
fn workloads() -> Vec<Workload> {
    let mut work = Vec::new();
    for path in [LOOPBACK, VETH] {
        for shape in [Shape::Flood, Shape::PingPong] {
            for size in [64, 1400] {
                work.push(Workload { path, shape, size });
            }
        }
    }
    for path in [LOOPBACK, VETH] {
        work.push(Workload {
            path,
            shape: Shape::TcpRr,
            size: 64,
        });
    }
    work.push(Workload {
        path: LOOPBACK,
        shape: Shape::TcpStream,
        size: 64 << 10,
    });
    work
}

/// Loopback and a fresh veth pair between two network namespaces.
fn hot_paths() -> anyhow::Result<[Path; 2]> {
    let veth = Veth::create().context("creating the veth namespaces")?;
    Ok([Path::Loopback, Path::Veth(veth)])
}

/// One empty row per workload, with room for `configs` configurations.
fn hot_rows(work: &[Workload], paths: &[Path], configs: usize) -> Vec<HotRow> {
    work.iter()
        .map(|w| HotRow {
            work: *w,
            label: w.label(paths),
            rates: vec![Vec::new(); configs],
            cpu: vec![Vec::new(); configs],
        })
        .collect()
}

/// Runs every workload once under whatever is attached now; each result goes to `sink`
/// (row index, measurement).
fn measure_workloads(
    paths: &[Path],
    work: &[Workload],
    dur: Duration,
    what: &str,
    mut sink: impl FnMut(usize, load::Measured),
) -> anyhow::Result<()> {
    for (i, w) in work.iter().enumerate() {
        let r = load::measure(&paths[w.path], &w.shape, w.size, dur)
            .with_context(|| format!("{} with {what}", w.label(paths)))?;
        sink(i, r);
    }
    Ok(())
}

fn hot_path(plan: &Plan, bins: &Bins, tmp: &TempDir) -> anyhow::Result<Hot> {
    println!(
        "\n[bench] hot path: {} repetition(s) of {:?} per measurement",
        plan.reps, plan.dur
    );
    let paths = hot_paths()?;
    let work = workloads();
    let tools = bins.tools();
    let mut rows = hot_rows(&work, &paths, tools.len());
    let mut drops = vec![0; tools.len()];
    for rep in 0..plan.reps {
        // Rotate the order of the configurations every repetition to spread drift.
        for k in 0..tools.len() {
            let ti = (k + rep) % tools.len();
            let tool = tools[ti];
            let attached = attach(tool, bins, tmp)?;
            measure_workloads(&paths, &work, plan.dur, tool_name(tool), |i, r| {
                rows[i].rates[ti].push(r.rate);
                rows[i].cpu[ti].push(r.cpu_ns);
            })?;
            drops[ti] += detach(attached)?;
            println!(
                "[bench]   repetition {}/{}: {} done",
                rep + 1,
                plan.reps,
                tool_name(tool)
            );
        }
    }
    Ok(Hot { tools, rows, drops })
}

fn tool_name(t: Tool) -> &'static str {
    match t {
        Tool::Nothing => "nothing attached",
        Tool::Udpmon => "udpmon (tracepoint)",
        Tool::Against => "udpmon (against)",
        Tool::Bpftrace => "bpftrace",
    }
}

enum Attached {
    Nothing,
    Udpmon(Udpmon),
    Bpftrace(Bpftrace),
}

fn start_udpmon(bin: &FsPath, out: &FsPath) -> anyhow::Result<Udpmon> {
    let mut u = Udpmon::spawn(bin, HOST_STRATEGY, out)?;
    u.wait_ready(Duration::from_secs(60))
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(u)
}

fn attach(tool: Tool, bins: &Bins, tmp: &TempDir) -> anyhow::Result<Attached> {
    let bin = match tool {
        Tool::Nothing => return Ok(Attached::Nothing),
        Tool::Bpftrace => return Ok(Attached::Bpftrace(Bpftrace::start(&tmp.file("acct.bt"))?)),
        Tool::Udpmon => &bins.udpmon,
        Tool::Against => bins.against.as_ref().context("no --against binary")?,
    };
    Ok(Attached::Udpmon(start_udpmon(bin, &tmp.file("hot.jsonl"))?))
}

/// Stops the tool; returns udpmon's ring-buffer drops.
fn detach(a: Attached) -> anyhow::Result<u64> {
    match a {
        Attached::Nothing => Ok(0),
        Attached::Udpmon(u) => {
            let s = u.stop()?;
            Ok(s.get("ring-buffer drops").copied().unwrap_or(0))
        }
        Attached::Bpftrace(b) => b.stop().map(|()| 0),
    }
}

/// Per repetition, against that repetition's baseline, for a UDP row of `datagrams` per
/// operation: CPU ns added per datagram, the throughput a CPU-bound workload loses for it
/// (1 - cpu_base / cpu_with), and the wall-clock throughput lost (which also moves with
/// whatever else the machine runs).
fn overhead(row: &HotRow, ti: usize, datagrams: f64) -> (Spread, Spread, Spread) {
    let base = &row.cpu[0];
    (
        paired(base, &row.cpu[ti], |b, w| (w - b) / datagrams),
        paired(base, &row.cpu[ti], |b, w| (1.0 - b / w) * 100.0),
        paired(&row.rates[0], &row.rates[ti], |b, w| (1.0 - w / b) * 100.0),
    )
}

/// Per repetition, against that repetition's baseline: the rate kept, %, CPU-bound
/// (cpu_base / cpu_with) and wall clock (rate_with / rate_base).
fn kept(row: &HotRow, ti: usize) -> (Spread, Spread) {
    (
        paired(&row.cpu[0], &row.cpu[ti], |b, w| b / w * 100.0),
        paired(&row.rates[0], &row.rates[ti], |b, w| w / b * 100.0),
    )
}

/// Where udpmon's hot-path cost goes, from separate runs with the kernel's per-program
/// statistics on (they add their own clock reads, so never during the measured runs):
/// (program, runs per unit, ns per run), busiest first, and the total program ns per unit
/// (a UDP datagram or a TCP segment).
struct ProgCost {
    progs: Vec<(String, f64, f64)>,
    total_ns: f64,
}

/// One udpmon binary's program costs.
struct BinCost {
    tool: Tool,
    /// During a loopback 64-byte UDP flood, per datagram.
    udp: ProgCost,
    /// During a loopback 64-byte TCP request/response, per segment.
    tcp: ProgCost,
}

impl BinCost {
    fn of(&self, tcp: bool) -> &ProgCost {
        if tcp { &self.tcp } else { &self.udp }
    }
}

/// Per udpmon binary under test.
struct ProgCosts(Vec<BinCost>);

impl ProgCosts {
    fn of(&self, tool: Tool) -> Option<&BinCost> {
        self.0.iter().find(|c| c.tool == tool)
    }

    /// What bpf_stats charges a program run that does nothing: its two clock reads around
    /// the run (sched_clock; far from free in a VM whose sched_clock is kvm-clock). Taken as
    /// the cheapest run seen during the TCP request/response, where every program that runs
    /// at least once per segment only checks that the packet or call is not UDP's.
    fn floor_ns(&self) -> Option<f64> {
        self.0
            .iter()
            .flat_map(|c| c.tcp.progs.iter())
            .filter(|(_, per, _)| *per >= 0.5)
            .map(|(_, _, ns)| *ns)
            .min_by(f64::total_cmp)
    }
}

impl ProgCost {
    /// Program runs per unit (datagram, segment), over the listed programs.
    fn runs(&self) -> f64 {
        self.progs.iter().map(|(_, per, _)| per).sum()
    }
}

fn prog_costs(plan: &Plan, bins: &Bins, tmp: &TempDir) -> anyhow::Result<ProgCosts> {
    println!("\n[bench] udpmon per-program cost (kernel.bpf_stats_enabled, separate runs)");
    let udpmons = bins.udpmons();
    let mut udp = Vec::new();
    for (_, bin) in &udpmons {
        let cost = prog_run(bin, tmp, "the UDP flood", || {
            let start = Instant::now();
            let rate = load::measure(&Path::Loopback, &Shape::Flood, 64, plan.dur)?.rate;
            Ok(rate * start.elapsed().as_secs_f64().min(plan.dur.as_secs_f64()))
        })?;
        // Unlike TCP, where none running would be the ideal.
        if cost.total_ns == 0.0 {
            bail!("no udpmon program ran during the UDP flood (bpf_stats)");
        }
        udp.push(cost);
    }
    let mut tcp = Vec::new();
    // The binaries in the other order, to spread drift between them.
    for (_, bin) in udpmons.iter().rev() {
        tcp.push(prog_run(bin, tmp, "the TCP request/response", || {
            // Loopback: every segment sent is also received, in the namespace whose counter
            // this reads.
            let segs = load::tcp_out_segs()?;
            load::measure(&Path::Loopback, &Shape::TcpRr, 64, plan.dur)?;
            Ok(load::tcp_out_segs()?.saturating_sub(segs) as f64)
        })?);
    }
    tcp.reverse();
    Ok(ProgCosts(
        udpmons
            .iter()
            .zip(udp.into_iter().zip(tcp))
            .map(|((tool, _), (udp, tcp))| BinCost {
                tool: *tool,
                udp,
                tcp,
            })
            .collect(),
    ))
}

/// Runs `bin` with the kernel's per-program statistics on during `work`, which returns how
/// many units (datagrams, segments) it carried.
fn prog_run(
    bin: &FsPath,
    tmp: &TempDir,
    what: &str,
    work: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<ProgCost> {
    const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(KNOB).context("reading bpf_stats_enabled")?;
    let u = start_udpmon(bin, &tmp.file("stats.jsonl"))?;
    std::fs::write(KNOB, "1").context("enabling bpf_stats")?;
    let res = (|| {
        let units = work()?;
        let stats = tools::prog_stats(u.pid())?;
        anyhow::Ok((units, stats))
    })();
    let _ = std::fs::write(KNOB, before.trim());
    u.stop()?;
    let (units, stats) = res.with_context(|| format!("{what} with bpf_stats"))?;
    let per_unit = |runs: u64| runs as f64 / units.max(1.0);
    Ok(ProgCost {
        // Every program counts in the total; the list leaves out the ones that hardly ran.
        total_ns: stats
            .iter()
            .map(|(_, _, ns)| *ns as f64 / units.max(1.0))
            .sum(),
        progs: stats
            .iter()
            .map(|(name, runs, ns)| {
                (
                    name.clone(),
                    per_unit(*runs),
                    *ns as f64 / (*runs).max(1) as f64,
                )
            })
            .filter(|(_, per, _)| *per >= 0.01)
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------
// Step 2: event pipeline

struct RampStep {
    target: u64,
    base_rate: Vec<f64>,
    udpmon: RampRuns,
    /// `--against`'s runs, alternated with this tree's.
    against: Option<RampRuns>,
}

/// One udpmon binary's runs of a ramp step.
#[derive(Default)]
struct RampRuns {
    rate: Vec<f64>,
    cpu_pct: Vec<f64>,
    drops: u64,
    events: Vec<f64>,
}

impl RampRuns {
    fn run(&mut self, bin: &FsPath, target: u64, dur: Duration) -> anyhow::Result<()> {
        // The output goes to /dev/null: this measures the agent, not the disk.
        let mut u = Udpmon::spawn(bin, HOST_STRATEGY, FsPath::new("/dev/null"))?;
        u.wait_ready(Duration::from_secs(60))?;
        let cpu0 = u.cpu_secs()?;
        let t0 = Instant::now();
        let (_, rate) = load::new_flows(target, dur)?;
        let load_secs = t0.elapsed().as_secs_f64();
        thread::sleep(Duration::from_millis(500));
        let cpu = u.cpu_secs()? - cpu0;
        let s = u.stop()?;
        self.rate.push(rate);
        self.cpu_pct.push(cpu / load_secs * 100.0);
        self.drops += s.get("ring-buffer drops").copied().unwrap_or(0);
        self.events
            .push(s.get("events read").copied().unwrap_or(0) as f64);
        Ok(())
    }
}

fn pipeline(plan: &Plan, bins: &Bins) -> anyhow::Result<Vec<RampStep>> {
    println!(
        "\n[bench] event pipeline: new flows/s ramp {:?}, {} repetition(s) of {:?}",
        plan.ramp, plan.ramp_reps, plan.ramp_dur
    );
    let mut steps = Vec::new();
    for &target in &plan.ramp {
        let mut st = RampStep {
            target,
            base_rate: Vec::new(),
            udpmon: RampRuns::default(),
            against: bins.against.as_ref().map(|_| RampRuns::default()),
        };
        for rep in 0..plan.ramp_reps {
            let (_, base) = load::new_flows(target, plan.ramp_dur)?;
            st.base_rate.push(base);
            // Which binary goes first alternates, as in the hot path.
            let this_first = rep % 2 == 0;
            if this_first {
                st.udpmon.run(&bins.udpmon, target, plan.ramp_dur)?;
            }
            if let (Some(runs), Some(bin)) = (&mut st.against, &bins.against) {
                runs.run(bin, target, plan.ramp_dur)?;
            }
            if !this_first {
                st.udpmon.run(&bins.udpmon, target, plan.ramp_dur)?;
            }
        }
        println!(
            "[bench]   {target}/s: achieved {} , drops {}{}",
            si(spread(&st.udpmon.rate).median),
            st.udpmon.drops,
            st.against.as_ref().map_or(String::new(), |a| format!(
                "; against: achieved {}, drops {}",
                si(spread(&a.rate).median),
                a.drops
            )),
        );
        steps.push(st);
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------
// Step 3: engine

struct Engine {
    rate: Spread,
    /// The whole agent path (`udpmon/benches/pipeline.rs`): records/s, JSON lines and text
    /// lines (the default output).
    path_rate: Spread,
    text_path_rate: Spread,
    /// (flows, bytes per flow with one flow per socket, with 64 flows per socket).
    rss: Vec<(usize, f64, f64)>,
    /// (peers, bytes per peer remembered across flows, none with a live flow).
    peers_rss: Vec<(usize, f64)>,
    /// (flows, the time of one tick in ms while every flow sleeps, the time of the tick that
    /// found them all awake and put them to sleep in ms).
    ticks: Vec<(usize, Spread, f64)>,
}

/// Builds `udpmon/benches/NAME.rs`; returns its executable.
fn bench_binary(path: &str, name: &str) -> anyhow::Result<PathBuf> {
    println!("[build] cargo bench -p udpmon --bench {name} --no-run");
    let out = build::cargo(path)
        .args([
            "bench",
            "-p",
            "udpmon",
            "--bench",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("building the {name} bench"))?;
    if !out.status.success() {
        bail!("building the {name} bench failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("no executable for the {name} bench in cargo's output"))
}

/// Runs the engine bench binary in one of its machine-readable modes; returns its lines as
/// (key, value).
fn engine_mode(bin: &FsPath, args: &[String]) -> anyhow::Result<Vec<(String, f64)>> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

fn engine(plan: &Plan, bin: &FsPath, pipeline_bin: &FsPath) -> anyhow::Result<Engine> {
    println!(
        "\n[bench] engine: events/s on one core, resident memory per flow and per peer; \
         the whole agent path: records/s on one core"
    );
    let reps = plan.reps.max(3).min(if plan.smoke { 1 } else { 5 });
    let rate = |bin: &FsPath, extra: &[&str]| -> anyhow::Result<Spread> {
        let mut args = vec![
            "--udpmon-rate".into(),
            reps.to_string(),
            plan.engine_events.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let lines = engine_mode(bin, &args)?;
        let rates: Vec<f64> = lines
            .iter()
            .filter(|(k, _)| k == "events_per_sec")
            .map(|(_, v)| *v)
            .collect();
        if rates.is_empty() {
            bail!("{} printed no events_per_sec", bin.display());
        }
        Ok(spread(&rates))
    };
    let engine_rate = rate(bin, &[])?;
    let path_rate = rate(pipeline_bin, &[])?;
    let text_path_rate = rate(pipeline_bin, &["text"])?;
    let mut rss = Vec::new();
    for &n in &plan.rss_flows {
        let mut per = [0.0; 2];
        for (i, peers) in [1, 64].into_iter().enumerate() {
            let l = engine_mode(
                bin,
                &["--udpmon-rss".into(), n.to_string(), peers.to_string()],
            )?;
            let get = |k: &str| {
                l.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| *v)
                    .with_context(|| format!("the engine bench printed no {k}"))
            };
            let tracked = get("flows_tracked")?;
            if tracked < n as f64 {
                bail!("the engine held {tracked} flows, expected {n}");
            }
            per[i] = (get("rss_after_bytes")? - get("rss_before_bytes")?) / tracked;
        }
        rss.push((n, per[0], per[1]));
    }
    let mut peers_rss = Vec::new();
    for &n in &plan.rss_flows {
        let l = engine_mode(bin, &["--udpmon-rss-peers".into(), n.to_string()])?;
        let get = |k: &str| {
            l.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| *v)
                .with_context(|| format!("the engine bench printed no {k}"))
        };
        let tracked = get("peers_tracked")?;
        if tracked < n as f64 {
            bail!("the engine held {tracked} peers, expected {n}");
        }
        peers_rss.push((
            n,
            (get("rss_after_bytes")? - get("rss_before_bytes")?) / tracked,
        ));
    }
    let mut ticks = Vec::new();
    for &n in &plan.rss_flows {
        let l = engine_mode(
            bin,
            &["--udpmon-tick".into(), n.to_string(), reps.to_string()],
        )?;
        let ms: Vec<f64> = l
            .iter()
            .filter(|(k, _)| k == "tick_ns")
            .map(|(_, v)| v / 1e6)
            .collect();
        if ms.is_empty() {
            bail!("{} printed no tick_ns", bin.display());
        }
        let first = l
            .iter()
            .find(|(k, _)| k == "first_tick_ns")
            .map(|(_, v)| v / 1e6)
            .with_context(|| format!("{} printed no first_tick_ns", bin.display()))?;
        ticks.push((n, spread(&ms), first));
    }
    Ok(Engine {
        rate: engine_rate,
        path_rate,
        text_path_rate,
        rss,
        peers_rss,
        ticks,
    })
}

// ---------------------------------------------------------------------------------------
// Step 4: startup (and the kernel map, while udpmon runs)

struct Startup {
    ready: Spread,
    first_event: Spread,
    hwm: Spread,
    /// (key, value, max entries, memlock bytes) of the FLOWS map.
    flows_map: Option<(u64, u64, u64, u64)>,
    flows_map_err: Option<String>,
}

fn startup(plan: &Plan, bin: &FsPath, tmp: &TempDir) -> anyhow::Result<Startup> {
    println!("\n[bench] startup: spawn to first event, peak RSS");
    let (mut ready, mut first, mut hwm) = (Vec::new(), Vec::new(), Vec::new());
    let mut flows_map = None;
    let mut flows_map_err = None;
    let sink = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let port = sink.local_addr()?.port();
    let needle = format!(":{port}\"");
    for rep in 0..plan.startup_reps {
        let out = tmp.file(&format!("startup{rep}.jsonl"));
        let mut u = Udpmon::spawn(bin, HOST_STRATEGY, &out)?;
        let spawned = u.spawned;
        let found = load::poke_until(port, Duration::from_secs(60), || {
            Ok(std::fs::read_to_string(&out).is_ok_and(|s| s.contains(&needle)))
        })?;
        if found.is_none() {
            bail!("no event for 127.0.0.1:{port} within 60 s of starting udpmon");
        }
        first.push(spawned.elapsed().as_secs_f64() * 1e3);
        let at = u.wait_ready(Duration::from_secs(5))?;
        ready.push(at.duration_since(spawned).as_secs_f64() * 1e3);
        hwm.push(u.status_bytes("VmHWM")? as f64 / (1 << 20) as f64);
        if rep == 0 {
            match tools::flows_map(u.pid()) {
                Ok(m) => flows_map = Some(m),
                Err(e) => flows_map_err = Some(format!("{e:#}")),
            }
        }
        u.stop()?;
    }
    drop(sink);
    Ok(Startup {
        ready: spread(&ready),
        first_event: spread(&first),
        hwm: spread(&hwm),
        flows_map,
        flows_map_err,
    })
}

// ---------------------------------------------------------------------------------------
// The table

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}

/// "yes" or "NO", unless a spread is wider than `range`: repetitions that disagree by more
/// than twice the margin a target leaves cannot tell a pass from a fail.
fn verdict(ok: bool, spreads: &[Spread], range: f64) -> &'static str {
    if spreads.iter().any(|s| s.n > 1 && s.max - s.min > range) {
        "inconclusive (repetitions spread wider than twice the target's margin)"
    } else {
        yes_no(ok)
    }
}

/// The table's text. Every row has a cell for "udpmon (against)", the fourth, written only
/// with --against so that the table without it is as it always was.
struct Table {
    text: String,
    against: bool,
}

impl Table {
    fn row(&mut self, cells: [&str; 7]) {
        self.text.push('|');
        for (i, c) in cells.iter().enumerate() {
            if i != 3 || self.against {
                let _ = write!(self.text, " {c} |");
            }
        }
        self.text.push('\n');
    }
}

/// The target rows, each after the figures it judges. They judge this tree's udpmon; the
/// against column is there to compare.
fn targets(tb: &mut Table, hot: &Hot, progs: &ProgCosts) {
    for (name, tcp, limit) in [
        (
            "program time per UDP datagram (bpf_stats, loopback flood 64 B)",
            false,
            150.0,
        ),
        (
            "program time per TCP segment (bpf_stats, loopback tcp rr 64 B)",
            true,
            30.0,
        ),
    ] {
        let ns = |tool: Tool| progs.of(tool).map(|c| c.of(tcp).total_ns);
        let floor = progs.floor_ns();
        let show = |tool: Tool| {
            let Some(c) = progs.of(tool).map(|c| c.of(tcp)) else {
                return "-".to_string();
            };
            match floor {
                Some(f) => format!(
                    "{:.0} ns ({:.0} ns net of {:.1} runs x {f:.0} ns, the bpf_stats floor)",
                    c.total_ns,
                    c.total_ns - c.runs() * f,
                    c.runs()
                ),
                None => format!("{:.0} ns", c.total_ns),
            }
        };
        tb.row([
            name,
            "-",
            &show(Tool::Udpmon),
            &show(Tool::Against),
            "-",
            &format!("<= {limit:.0} ns"),
            yes_no(ns(Tool::Udpmon).is_some_and(|v| v <= limit)),
        ]);
    }
    // (name, rows, shown as the rate lost rather than kept, least rate kept %).
    let kept_targets = [
        (
            "TCP rr loopback / veth: rate kept (CPU-bound)",
            vec![(LOOPBACK, Shape::TcpRr, 64), (VETH, Shape::TcpRr, 64)],
            false,
            98.0,
        ),
        (
            "UDP ping-pong loopback 64 B / 1400 B: rate kept (CPU-bound)",
            vec![
                (LOOPBACK, Shape::PingPong, 64),
                (LOOPBACK, Shape::PingPong, 1400),
            ],
            false,
            90.0,
        ),
        (
            "loopback flood 64 B throughput loss (CPU-bound)",
            vec![(LOOPBACK, Shape::Flood, 64)],
            true,
            90.0,
        ),
    ];
    for (name, which, lost, least) in kept_targets {
        let rows: Vec<&HotRow> = which
            .iter()
            .filter_map(|(p, s, z)| hot.row(*p, *s, *z))
            .collect();
        let kept_of = |tool: Tool| -> Option<Vec<Spread>> {
            let ti = hot.col(tool)?;
            Some(rows.iter().map(|r| kept(r, ti).0).collect())
        };
        let fig = |tool: Tool| {
            kept_of(tool).map_or("-".to_string(), |v| {
                v.iter()
                    .map(|k| {
                        let k = if lost {
                            Spread {
                                median: 100.0 - k.median,
                                min: 100.0 - k.max,
                                max: 100.0 - k.min,
                                n: k.n,
                            }
                        } else {
                            *k
                        };
                        fmt_spread(k, 1, " %")
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
        };
        let ours = kept_of(Tool::Udpmon).unwrap_or_default();
        let ok = !ours.is_empty() && ours.iter().all(|k| k.median >= least);
        tb.row([
            name,
            "-",
            &fig(Tool::Udpmon),
            &fig(Tool::Against),
            &fig(Tool::Bpftrace),
            &if lost {
                format!("<= {:.0} %", 100.0 - least)
            } else {
                format!(">= {least:.0} %")
            },
            verdict(ok, &ours, 2.0 * (100.0 - least)),
        ]);
    }
}

fn table(
    plan: &Plan,
    bins: &Bins,
    hot: &Hot,
    progs: &ProgCosts,
    pipe: &[RampStep],
    eng: &Engine,
    st: &Startup,
) -> String {
    let mut t = String::new();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        t,
        "\nudpmon bench{}: {cores} cores, kernel {kernel}, hook strategy {HOST_STRATEGY} \
         (the only one this kernel allows), {} repetition(s) x {:?} per hot-path figure, \
         median [min..max], configurations alternated; load average at the end: {}{}",
        if plan.smoke {
            " (SMOKE: numbers meaningless)"
        } else {
            ""
        },
        plan.reps,
        plan.dur,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        bins.against.as_ref().map_or(String::new(), |b| format!(
            "; \"udpmon (against)\" is {}",
            b.display()
        )),
    );
    let _ = writeln!(t);
    let mut tb = Table {
        text: t,
        against: bins.against.is_some(),
    };
    tb.row([
        "measure",
        "baseline (nothing attached)",
        &format!("udpmon, {HOST_STRATEGY}"),
        &format!("udpmon (against), {HOST_STRATEGY}"),
        "bpftrace peer (tracepoints)",
        "target",
        "met",
    ]);
    let columns = if tb.against { 7 } else { 6 };
    let _ = writeln!(tb.text, "|{}", "---|".repeat(columns));
    for row in &hot.rows {
        let (per, unit) = row.work.units();
        let datagrams = row.work.datagrams();
        let cell = |tool: Tool| {
            let Some(ti) = hot.col(tool) else {
                return "-".to_string();
            };
            match datagrams {
                Some(d) => {
                    let (ns, lost, wall) = overhead(row, ti, d);
                    format!(
                        "{} CPU added per datagram; {} throughput lost (CPU-bound); wall clock: {} lost",
                        fmt_spread(ns, 0, " ns"),
                        fmt_spread(lost, 1, " %"),
                        fmt_spread(wall, 1, " %")
                    )
                }
                None => {
                    let (cpu, wall) = kept(row, ti);
                    format!(
                        "{} rate kept (CPU-bound); wall clock: {} kept",
                        fmt_spread(cpu, 1, " %"),
                        fmt_spread(wall, 1, " %")
                    )
                }
            }
        };
        tb.row([
            &format!("hot path: {}", row.label),
            &format!(
                "{} CPU per {per}; {} {unit} wall clock",
                fmt_spread(div(spread(&row.cpu[0]), datagrams.unwrap_or(1.0)), 0, " ns"),
                fmt_spread(div(spread(&row.rates[0]), 1e3), 0, "k"),
            ),
            &cell(Tool::Udpmon),
            &cell(Tool::Against),
            &cell(Tool::Bpftrace),
            "-",
            "-",
        ]);
    }
    let drops = |tool: Tool| hot.col(tool).map(|ti| hot.drops[ti]);
    let show = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    tb.row([
        "hot path: udpmon ring-buffer drops, all runs",
        "-",
        &show(drops(Tool::Udpmon)),
        &show(drops(Tool::Against)),
        "-",
        "0",
        yes_no(drops(Tool::Udpmon) == Some(0)),
    ]);
    let breakdown = |tool: Tool, tcp: bool, per: &str| {
        let Some(c) = progs.of(tool) else {
            return "-".to_string();
        };
        let c = c.of(tcp);
        let list = c
            .progs
            .iter()
            .map(|(n, r, ns)| format!("{n} {r:.2}x{ns:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{:.0} ns of program time per {per}: {}",
            c.total_ns,
            if list.is_empty() { "none ran" } else { &list }
        )
    };
    tb.row([
        "hot path: where udpmon's cost goes (bpf_stats, loopback flood 64 B, separate run; \
         program: runs per datagram x ns per run)",
        "-",
        &breakdown(Tool::Udpmon, false, "datagram"),
        &breakdown(Tool::Against, false, "datagram"),
        "-",
        "-",
        "-",
    ]);
    tb.row([
        "hot path: where udpmon's cost goes on TCP (bpf_stats, loopback tcp rr 64 B, separate \
         run; segments counted by the kernel's Tcp: OutSegs; program: runs per segment x ns \
         per run)",
        "-",
        &breakdown(Tool::Udpmon, true, "segment"),
        &breakdown(Tool::Against, true, "segment"),
        "-",
        "-",
        "-",
    ]);
    targets(&mut tb, hot, progs);
    // A step counts at the rate it achieved: past the generator's own limit, offering more
    // is not reaching more.
    let best_zero = |runs: &dyn Fn(&RampStep) -> Option<&RampRuns>| {
        let mut best: Option<f64> = None;
        for r in pipe.iter().map_while(runs) {
            if r.drops != 0 {
                break;
            }
            best = Some(best.unwrap_or(0.0).max(spread(&r.rate).median));
        }
        best
    };
    let ramp_cell = |r: &RampRuns| {
        format!(
            "achieves {}/s; ring-buffer drops {} (sum over {} runs); events read {}; udpmon CPU \
             {} of one core",
            si(spread(&r.rate).median),
            r.drops,
            r.rate.len(),
            si(spread(&r.events).median),
            fmt_spread(spread(&r.cpu_pct), 1, " %"),
        )
    };
    for s in pipe {
        let rate = spread(&s.udpmon.rate);
        let (target, met) = if s.target == 150_000 {
            (
                "0 drops, at >= 95 % of the offered rate",
                yes_no(s.udpmon.drops == 0 && rate.median >= 0.95 * s.target as f64),
            )
        } else {
            ("-", "-")
        };
        tb.row([
            &format!("new flows at {}/s offered", si(s.target as f64)),
            &format!("generator achieves {}/s", si(spread(&s.base_rate).median)),
            &ramp_cell(&s.udpmon),
            &s.against.as_ref().map_or("-".to_string(), ramp_cell),
            "-",
            target,
            met,
        ]);
    }
    let zero = |b: Option<f64>| b.map_or("none".to_string(), |r| format!("{}/s", si(r)));
    let ours = best_zero(&|s| Some(&s.udpmon));
    tb.row([
        &format!(
            "highest new-flow rate achieved with zero ring-buffer drops (ramp {} offered)",
            plan.ramp
                .iter()
                .map(|r| si(*r as f64))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "-",
        &zero(ours),
        &if bins.against.is_some() {
            zero(best_zero(&|s| s.against.as_ref()))
        } else {
            "-".to_string()
        },
        "-",
        ">= 150k/s",
        yes_no(ours.is_some_and(|r| r >= 0.95 * 150_000.0)),
    ]);
    tb.row([
        "engine: events/s on one core (FirstTx, FirstRx, Close; 4 peers per socket, 1000 \
         sockets live)",
        "-",
        &fmt_spread(div(eng.rate, 1e6), 2, "M"),
        "-",
        "-",
        ">= 5M",
        yes_no(eng.rate.median >= 5e6),
    ]);
    tb.row([
        "agent path: ring-buffer records -> decode -> engine -> JSON lines -> /dev/null, \
         records/s on one core (the engine's workload as kernel records)",
        "-",
        &fmt_spread(div(eng.path_rate, 1e6), 2, "M"),
        "-",
        "-",
        ">= 3M",
        yes_no(eng.path_rate.median >= 3e6),
    ]);
    tb.row([
        "agent path with text lines (the default output) instead of JSON, records/s on one core",
        "-",
        &fmt_spread(div(eng.text_path_rate, 1e6), 2, "M"),
        "-",
        "-",
        "-",
        "-",
    ]);
    for (n, one, many) in &eng.rss {
        tb.row([
            &format!(
                "engine: resident memory per tracked flow at {} flows (RSS growth / flows)",
                si(*n as f64)
            ),
            "-",
            &format!("{one:.0} B (1 flow per socket); {many:.0} B (64 flows per socket)"),
            "-",
            "-",
            "<= 128 B",
            yes_no(*one <= 128.0 && *many <= 128.0),
        ]);
    }
    for (n, ms, first) in &eng.ticks {
        tb.row([
            &format!(
                "engine: one tick (SILENT, RESUMED, idle checks; once a second) at {} flows, \
                 4 per socket, none due (the tick that found them all awake and put them to \
                 sleep: {first:.1} ms)",
                si(*n as f64)
            ),
            "-",
            &fmt_spread(*ms, 2, " ms"),
            "-",
            "-",
            if *n >= 1_000_000 { "<= 2 ms" } else { "-" },
            if *n >= 1_000_000 {
                yes_no(ms.median <= 2.0)
            } else {
                "-"
            },
        ]);
    }
    for (n, per) in &eng.peers_rss {
        tb.row([
            &format!(
                "engine: resident memory per remembered peer at {} peers (RSS growth / peers; \
                 peer-scope SILENT, bounded by --max-flows)",
                si(*n as f64)
            ),
            "-",
            &format!("{per:.0} B"),
            "-",
            "-",
            "-",
            "-",
        ]);
    }
    match (&st.flows_map, &st.flows_map_err) {
        (Some((k, v, max, memlock)), _) => tb.row([
            "kernel FLOWS map per entry (LRU hash, preallocated: memlock / max_entries)",
            "-",
            &format!(
                "{:.0} B (key {k} B + value {v} B + overhead); {max} entries = {:.1} MiB",
                *memlock as f64 / (*max).max(1) as f64,
                *memlock as f64 / f64::from(1 << 20)
            ),
            "-",
            "-",
            "-",
            "-",
        ]),
        (None, err) => tb.row([
            "kernel FLOWS map per entry",
            "-",
            &format!("not measured: {}", err.as_deref().unwrap_or("unknown")),
            "-",
            "-",
            "-",
            "-",
        ]),
    }
    for (what, figure) in [
        (
            "startup: spawn to attached (\"watching\" line)",
            fmt_spread(st.ready, 0, " ms"),
        ),
        (
            "startup: spawn to first event (a datagram every 2 ms)",
            fmt_spread(st.first_event, 0, " ms"),
        ),
        ("startup: peak RSS (VmHWM)", fmt_spread(st.hwm, 1, " MiB")),
        (
            "fentry vs kprobe vs tracepoint ratios",
            "not measured here: this kernel refuses trampolines and has no kprobes; `cargo \
             xtask bench --vm 6.12` measures them in a VM under qemu TCG (software CPU \
             emulation), as ratios only"
                .to_string(),
        ),
    ] {
        tb.row([what, "-", &figure, "-", "-", "-", "-"]);
    }
    tb.text
}

// ---------------------------------------------------------------------------------------

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let d = std::env::temp_dir().join(format!("udpmon-bench-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
