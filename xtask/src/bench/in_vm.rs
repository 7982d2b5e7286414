//! `cargo xtask bench --vm <KERNEL>`: the hot-path step in qemu VMs, where the kernels allow
//! every hook strategy (fentry, kprobe, tracepoint) unlike the host's.
//!
//! The host builds udpmon and xtask itself as static (musl) binaries and boots each kernel
//! with an initramfs whose /init runs `xtask bench-guest`: the same workloads and load
//! generator as the host bench ([`super::load`]), with nothing attached (the baseline) and
//! with udpmon on each strategy, configurations alternated every repetition. The guest
//! prints every measurement as a `UDPMON-VM-DATA` console line and everything else (plan,
//! udpmon's attach line, a strategy's failure, drops) as `UDPMON-VM-BENCH`; the host pairs
//! each measurement with the same repetition's baseline and prints ratios only: qemu runs
//! with TCG (software CPU emulation) here, which distorts absolute times.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path as FsPath, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    BenchArgs, Spread, TempDir, fmt_spread, hot_paths, load, measure_workloads, spread,
    tools::Udpmon, workloads,
};
use crate::{bootstrap, build, vm};

/// The configurations, in order: the baseline, then udpmon on each strategy.
const CONFIGS: [&str; 4] = ["none", "fentry", "kprobe", "tracepoint"];
/// The strategy the others are compared with: the one every kernel since 4.x allows.
const REFERENCE: &str = "tracepoint";

const DATA: &str = "UDPMON-VM-DATA ";
const INFO: &str = "UDPMON-VM-BENCH ";

/// The guest's clock runs on qemu's instruction counter (single-threaded TCG): a guest
/// nanosecond is 2^2 = 4 guest instructions, and idle time jumps to the next timer. Every
/// time the guest measures is then a count of the instructions it executed, whatever else
/// the host runs; with the host's real time instead, the other processes of a shared
/// machine move each figure by tens of percent. `shift=2` (a 250 MIPS guest) keeps the
/// run a few minutes long while a 0.5 s measurement still spans tens of thousands of
/// datagrams.
const ICOUNT: [&str; 2] = ["-icount", "shift=2,sleep=off"];

/// Defaults in the VM: TCG runs everything tens of times slower, and udpmon's start (BTF
/// parsing, verification of every program) takes seconds per configuration.
const VM_REPS: usize = 3;
const VM_SECS: f64 = 0.5;

/// `xtask bench-guest`: runs inside the VM (hidden from `--help`).
#[derive(clap::Args)]
pub struct GuestArgs {
    /// Repetitions of every measurement.
    #[arg(long, default_value_t = VM_REPS)]
    reps: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = VM_SECS)]
    secs: f64,
    /// The udpmon binary (default: $UDPMON_BIN, else /bin/udpmon).
    #[arg(long)]
    udpmon: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------
// Guest side

fn emit(prefix: &str, v: &Value) {
    // One line each: println! holds the stdout lock for the whole line.
    println!("{prefix}{v}");
}

/// udpmon's failure as it printed it: its last `udpmon: ` line and the indented lines that
/// continue it (the per-strategy reasons).
fn error_line(stderr: &[String]) -> Option<String> {
    let start = stderr.iter().rposition(|l| l.starts_with("udpmon: "))?;
    let mut parts = vec![stderr[start].trim().to_string()];
    parts.extend(
        stderr[start + 1..]
            .iter()
            .take_while(|l| l.starts_with(' '))
            .map(|l| l.trim().to_string()),
    );
    Some(parts.join(" "))
}

/// Starts udpmon on `strategy` and waits for its "watching" line; on failure, the line
/// udpmon gave as its reason.
fn start_udpmon(bin: &FsPath, strategy: &str, out: &FsPath) -> Result<Udpmon, String> {
    let mut u = Udpmon::spawn(bin, strategy, out).map_err(|e| format!("{e:#}"))?;
    if let Err(e) = u.wait_ready(Duration::from_secs(300)) {
        return Err(error_line(&u.stderr_lines()).unwrap_or_else(|| format!("{e:#}")));
    }
    let ready = u.ready_line().unwrap_or_default();
    let want = format!("(hooks: {strategy})");
    if !ready.contains(&want) {
        return Err(format!("asked for {strategy}, udpmon said: {ready}"));
    }
    Ok(u)
}

/// The smallest step the thread CPU clock moves by (a jiffies-based scheduler clock moves
/// by whole ticks), over at most 100 ms of spinning.
fn cpu_clock_step() -> u64 {
    let start = Instant::now();
    let mut best = u64::MAX;
    let mut last = load::thread_cpu_ns();
    while start.elapsed() < Duration::from_millis(100) {
        let now = load::thread_cpu_ns();
        if now != last {
            best = best.min(now - last);
            last = now;
        }
    }
    best
}

pub fn guest(a: &GuestArgs) -> anyhow::Result<()> {
    let reps = a.reps.max(1);
    let dur = Duration::from_secs_f64(a.secs.clamp(0.05, 60.0));
    let bin = a.udpmon.clone().unwrap_or_else(|| {
        std::env::var_os("UDPMON_BIN").map_or_else(|| PathBuf::from("/bin/udpmon"), PathBuf::from)
    });
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    emit(
        INFO,
        &json!({"kind": "plan", "reps": reps, "secs": dur.as_secs_f64(),
                "release": release.trim(), "cpus": cpus, "clocksource": clocksource.trim(),
                "cpu_clock_step_ns": cpu_clock_step()}),
    );
    let tmp = TempDir::new()?;
    let paths = hot_paths()?;
    let work = workloads();
    // Warm-up, not reported: the first runs after boot pay for first-time allocations
    // (socket buffers, slabs, page tables), which would land on whichever configuration
    // comes first.
    measure_workloads(&paths, &work, dur / 2, "nothing (warm-up)", |_, _| {})?;
    let started = Instant::now();
    let mut unavailable = [false; CONFIGS.len()];
    let mut reported = [false; CONFIGS.len()];
    for rep in 0..reps {
        // Rotate the order of the configurations every repetition to spread drift.
        for k in 0..CONFIGS.len() {
            let ci = (k + rep) % CONFIGS.len();
            let config = CONFIGS[ci];
            if unavailable[ci] {
                continue;
            }
            let udpmon = if config == "none" {
                None
            } else {
                match start_udpmon(&bin, config, &tmp.file(&format!("{config}.jsonl"))) {
                    Ok(u) => {
                        if !reported[ci] {
                            reported[ci] = true;
                            let notes: Vec<String> = u
                                .stderr_lines()
                                .into_iter()
                                .filter(|l| l.contains("WARN"))
                                .collect();
                            emit(
                                INFO,
                                &json!({"kind": "attached", "config": config,
                                        "line": u.ready_line().unwrap_or_default(),
                                        "warnings": notes}),
                            );
                        }
                        Some(u)
                    }
                    Err(line) => {
                        unavailable[ci] = true;
                        emit(
                            INFO,
                            &json!({"kind": "unavailable", "config": config, "error": line}),
                        );
                        continue;
                    }
                }
            };
            measure_workloads(&paths, &work, dur, config, |row, m| {
                emit(
                    DATA,
                    &json!({"rep": rep, "config": config, "row": row,
                            "label": work[row].label(&paths), "rate": m.rate, "cpu": m.cpu_ns}),
                );
            })?;
            if let Some(u) = udpmon {
                let s = u
                    .stop()
                    .with_context(|| format!("stopping udpmon ({config})"))?;
                let drops = s.get("ring-buffer drops").copied().unwrap_or(0);
                emit(
                    INFO,
                    &json!({"kind": "drops", "config": config, "rep": rep, "drops": drops}),
                );
            }
            println!(
                "[bench-guest] repetition {}/{reps}: {config} done ({:.0}s)",
                rep + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Host side

/// What one VM reported.
#[derive(Default, Debug)]
struct VmResult {
    release: String,
    clocksource: String,
    cpu_clock_step_ns: u64,
    cpus: u64,
    reps: u64,
    secs: f64,
    /// Workload labels by row index.
    labels: BTreeMap<u64, String>,
    /// (row, config, rep) -> (ops/s, CPU ns per op).
    m: BTreeMap<(u64, String, u64), (f64, f64)>,
    attached: BTreeMap<String, String>,
    warnings: BTreeMap<String, Vec<String>>,
    unavailable: BTreeMap<String, String>,
    drops: BTreeMap<String, u64>,
    /// Marker lines that did not parse (a kernel message in the middle of a line).
    garbled: usize,
}

fn parse(summary: &[String]) -> VmResult {
    let mut r = VmResult::default();
    for line in summary {
        let (json, is_data) = if let Some(j) = line.strip_prefix(DATA) {
            (j, true)
        } else if let Some(j) = line.strip_prefix(INFO) {
            (j, false)
        } else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            r.garbled += 1;
            continue;
        };
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let n = |k: &str| v[k].as_u64().unwrap_or_default();
        if is_data {
            let (Some(rate), Some(cpu)) = (v["rate"].as_f64(), v["cpu"].as_f64()) else {
                r.garbled += 1;
                continue;
            };
            r.labels.insert(n("row"), s("label"));
            r.m.insert((n("row"), s("config"), n("rep")), (rate, cpu));
            continue;
        }
        match v["kind"].as_str() {
            Some("plan") => {
                r.release = s("release");
                r.clocksource = s("clocksource");
                r.cpu_clock_step_ns = n("cpu_clock_step_ns");
                r.cpus = n("cpus");
                r.reps = n("reps");
                r.secs = v["secs"].as_f64().unwrap_or_default();
            }
            Some("attached") => {
                r.attached.insert(s("config"), s("line"));
                let w: Vec<String> = v["warnings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|w| w.as_str().map(String::from))
                    .collect();
                if !w.is_empty() {
                    r.warnings.insert(s("config"), w);
                }
            }
            Some("unavailable") => {
                r.unavailable.insert(s("config"), s("error"));
            }
            Some("drops") => {
                *r.drops.entry(s("config")).or_default() += n("drops");
            }
            _ => r.garbled += 1,
        }
    }
    r
}

impl VmResult {
    /// Per repetition where every named configuration was measured on `row`: f(values).
    fn paired(&self, row: u64, configs: &[&str], f: impl Fn(&[(f64, f64)]) -> f64) -> Spread {
        let v: Vec<f64> = (0..self.reps)
            .filter_map(|rep| {
                let vals: Option<Vec<(f64, f64)>> = configs
                    .iter()
                    .map(|c| self.m.get(&(row, (*c).to_string(), rep)).copied())
                    .collect();
                vals.map(|v| f(&v))
            })
            .collect();
        spread(&v)
    }

    /// Throughput retained against the baseline, % (CPU-bound: baseline CPU per op / CPU
    /// per op with the strategy), and wall clock (ops/s with / ops/s without).
    fn retained(&self, row: u64, config: &str) -> (Spread, Spread) {
        (
            self.paired(row, &["none", config], |v| v[0].1 / v[1].1 * 100.0),
            self.paired(row, &["none", config], |v| v[1].0 / v[0].0 * 100.0),
        )
    }

    /// Against the reference strategy: added CPU per op of `config` / added CPU per op of
    /// the reference (undefined when the reference added nothing measurable), and CPU-bound
    /// throughput of `config` relative to the reference, %.
    fn vs_reference(&self, row: u64, config: &str) -> (Spread, Spread) {
        (
            self.paired(row, &["none", config, REFERENCE], |v| {
                let (base, with, reference) = (v[0].1, v[1].1, v[2].1);
                if reference > base {
                    (with - base) / (reference - base)
                } else {
                    f64::NAN
                }
            }),
            self.paired(row, &[config, REFERENCE], |v| v[1].1 / v[0].1 * 100.0),
        )
    }
}

/// The per-kernel table: ratios only, no absolute figure from the VM.
fn table(kernel: &str, r: &VmResult, guest_secs: f64, realtime: bool) -> String {
    let mut t = String::new();
    let strategies = &CONFIGS[1..];
    let _ = writeln!(
        t,
        "\nudpmon VM bench, kernel {kernel} ({}), qemu TCG software emulation, {} vCPUs, {}: \
         ratios only (emulation distorts absolute times); {} repetition(s) x {:.2} s per \
         figure, each paired with the same repetition's baseline (nothing attached), \
         configurations alternated; median [min..max]; VM run {guest_secs:.0} s; guest \
         clocksource {}, thread CPU clock step {}",
        if r.release.is_empty() {
            "release unknown"
        } else {
            &r.release
        },
        r.cpus,
        if realtime {
            "guest clock = host real time (the host's load moves every figure)".to_string()
        } else {
            format!(
                "guest clock = instruction counter ({}: times are instruction counts, \
                 independent of the host's load; ratios weigh every instruction alike, \
                 unlike a real CPU's caches, traps and atomics)",
                ICOUNT.join(" ")
            )
        },
        r.reps,
        r.secs,
        r.clocksource,
        if r.cpu_clock_step_ns == 0 || r.cpu_clock_step_ns == u64::MAX {
            "unknown".to_string()
        } else if r.cpu_clock_step_ns >= 1_000_000 {
            format!("{} ms (tick-based)", r.cpu_clock_step_ns / 1_000_000)
        } else {
            format!("{} ns", r.cpu_clock_step_ns)
        },
    );
    for s in strategies {
        if let Some(line) = r.attached.get(*s) {
            let _ = writeln!(t, "  {s}: attached: {line}");
            for w in r.warnings.get(*s).into_iter().flatten() {
                let _ = writeln!(t, "    {w}");
            }
        }
        if let Some(err) = r.unavailable.get(*s) {
            let _ = writeln!(
                t,
                "  {s}: UNAVAILABLE{}: {err}",
                if r.attached.contains_key(*s) {
                    " in a later repetition (left out from then on)"
                } else {
                    ""
                }
            );
        }
        if !r.attached.contains_key(*s) && !r.unavailable.contains_key(*s) {
            let _ = writeln!(t, "  {s}: not reported (the VM run ended early?)");
        }
    }
    let _ = writeln!(
        t,
        "\nStrategy columns: throughput retained vs the baseline, CPU-bound (baseline CPU per \
         operation / CPU per operation with udpmon; the sender's CPU time includes the \
         softirq delivery), then wall clock. \"vs {REFERENCE}\": udpmon's added CPU per \
         operation on that strategy / on {REFERENCE} (< 1 = cheaper), then CPU-bound \
         throughput relative to {REFERENCE}.\n"
    );
    let others: Vec<&str> = strategies
        .iter()
        .copied()
        .filter(|s| *s != REFERENCE)
        .collect();
    let mut head = String::from("| workload |");
    for s in strategies {
        let _ = write!(head, " {s} |");
    }
    for s in &others {
        let _ = write!(head, " {s} vs {REFERENCE} |");
    }
    let _ = writeln!(t, "{head}");
    let _ = writeln!(t, "|---|{}", "---|".repeat(strategies.len() + others.len()));
    let measured = |s: &str| r.m.keys().any(|(_, c, _)| c == s);
    for (row, label) in &r.labels {
        let mut line = format!("| {label} |");
        for s in strategies {
            if measured(s) {
                let (cpu, wall) = r.retained(*row, s);
                let _ = write!(
                    line,
                    " {}; wall {} |",
                    fmt_spread(cpu, 1, " %"),
                    fmt_spread(wall, 1, " %")
                );
            } else {
                line.push_str(" unavailable |");
            }
        }
        for s in &others {
            if measured(s) && measured(REFERENCE) {
                let (added, thr) = r.vs_reference(*row, s);
                let _ = write!(
                    line,
                    " added CPU {}; throughput {} |",
                    fmt_spread(added, 2, "x"),
                    fmt_spread(thr, 1, " %")
                );
            } else {
                line.push_str(" - |");
            }
        }
        let _ = writeln!(t, "{line}");
    }
    let mut drops = String::from("| udpmon ring-buffer drops, all runs |");
    for s in strategies {
        match r.drops.get(*s) {
            Some(n) => {
                let _ = write!(drops, " {n} |");
            }
            None => drops.push_str(" - |"),
        }
    }
    drops.push_str(&" - |".repeat(others.len()));
    let _ = writeln!(t, "{drops}");
    if r.garbled > 0 {
        let _ = writeln!(
            t,
            "\n({} marker line(s) from the VM did not parse and were left out)",
            r.garbled
        );
    }
    t
}

/// `cargo xtask bench --vm K [--vm K2 ...]`: one VM per kernel, one table each.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let reps = args
        .reps
        .unwrap_or(if args.smoke { 1 } else { VM_REPS })
        .max(1);
    let secs = args
        .secs
        .unwrap_or(if args.smoke { 0.2 } else { VM_SECS })
        .clamp(0.05, 60.0);
    let path = bootstrap::build_env()?;
    bootstrap::musl_target()?;
    let series: Vec<&str> = args.vm.iter().map(String::as_str).collect();
    let kernels = vm::ensure_kernels(&series)?;
    let (udpmon, xtask) = build::musl_bench_binaries(&path)?;
    // Boot, plus per configuration and repetition: udpmon's start and the workloads (each
    // with its sockets, threads and namespace switches), generously for TCG.
    let per_config = 90.0 + workloads().len() as f64 * (secs + 15.0);
    let timeout = Duration::from_secs_f64(240.0 + reps as f64 * CONFIGS.len() as f64 * per_config);
    let mut tables = Vec::new();
    let mut failed = Vec::new();
    for k in &kernels {
        println!(
            "\n[bench] VM {}: hot path, {reps} repetition(s) x {secs} s, configurations {}; \
             guest clock: {}",
            k.name,
            CONFIGS.join(", "),
            if args.vm_realtime {
                "host real time".to_string()
            } else {
                ICOUNT.join(" ")
            }
        );
        let start = Instant::now();
        let guest = vm::GuestProgram {
            work_dir: "vm-bench",
            tier: format!("vm-bench-{}", k.name),
            program: xtask.clone(),
            name: "xtask".into(),
            cpus: 2,
            args: vec![
                "bench-guest".into(),
                "--reps".into(),
                reps.to_string(),
                "--secs".into(),
                secs.to_string(),
            ],
            // The workloads pin their two threads to two CPUs (on one, a flood's receiver
            // falls behind and the datagrams take the cheaper full-buffer path); under
            // icount, 6.1 only gets its second CPU by hot-plug.
            late_cpus: !args.vm_realtime,
            boot_timeout: Some(Duration::from_secs(300)),
            qemu_args: if args.vm_realtime {
                Vec::new()
            } else {
                ICOUNT.iter().map(|a| (*a).to_string()).collect()
            },
        };
        let run = vm::run_program_in_vm(k, &udpmon, &guest, timeout)
            .with_context(|| format!("kernel {}", k.name))?;
        let secs_taken = start.elapsed().as_secs_f64();
        let res = parse(&run.summary);
        let mut t = if res.m.is_empty() {
            format!(
                "\nudpmon VM bench, kernel {}: no measurement came back ({secs_taken:.0} s)\n",
                k.name
            )
        } else {
            table(&k.name, &res, secs_taken, args.vm_realtime)
        };
        if !run.passed {
            let why: Vec<&String> = run
                .summary
                .iter()
                .filter(|l| !l.starts_with(DATA) && !l.starts_with(INFO))
                .collect();
            let _ = writeln!(
                t,
                "\nTHE VM RUN FAILED (whatever is above is partial): {}; serial log: {}",
                why.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" | "),
                run.log.display()
            );
            failed.push(k.name.clone());
        }
        print!("{t}");
        tables.push(t);
    }
    if tables.len() > 1 {
        println!("\n================ udpmon VM bench: all kernels ================");
        for t in &tables {
            print!("{t}");
        }
    }
    if !failed.is_empty() {
        bail!("the VM bench failed on {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rep: u64, config: &str, row: u64, rate: f64, cpu: f64) -> String {
        format!(
            "{DATA}{}",
            json!({"rep": rep, "config": config, "row": row, "label": "loopback flood 64 B",
                   "rate": rate, "cpu": cpu})
        )
    }

    #[test]
    fn ratios_pair_each_repetition_with_its_baseline() {
        let mut lines = vec![
            format!(
                "{INFO}{}",
                json!({"kind": "plan", "reps": 2, "secs": 0.5, "release": "6.12.1", "cpus": 2})
            ),
            format!(
                "{INFO}{}",
                json!({"kind": "attached", "config": "fentry",
                       "line": "udpmon: watching UDP sockets (hooks: fentry)", "warnings": []})
            ),
            format!(
                "{INFO}{}",
                json!({"kind": "unavailable", "config": "kprobe",
                       "error": "udpmon: no hook strategy could be attached: kprobe: nope"})
            ),
            format!(
                "{INFO}{}",
                json!({"kind": "drops", "config": "fentry", "rep": 0, "drops": 3})
            ),
            "UDPMON-VM-DATA {\"rep\": 1, garbled".to_string(),
            "UDPMON-VM-RESULT rc=0".to_string(),
        ];
        // rep 0: baseline 1000 ns/op; rep 1: 2000 ns/op (drift), the strategies scale with it.
        for (rep, k) in [(0, 1.0), (1, 2.0)] {
            lines.push(data(rep, "none", 0, 1000.0 / k, 1000.0 * k));
            lines.push(data(rep, "fentry", 0, 800.0 / k, 1100.0 * k));
            lines.push(data(rep, "tracepoint", 0, 500.0 / k, 1200.0 * k));
        }
        let r = parse(&lines);
        assert_eq!((r.reps, r.cpus, r.garbled), (2, 2, 1));
        let (cpu, wall) = r.retained(0, "fentry");
        assert_eq!(cpu.n, 2);
        assert!((cpu.median - 100.0 / 1.1).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.max - cpu.min).abs() < 1e-9, "drift cancels: {cpu:?}");
        assert!((wall.median - 80.0).abs() < 1e-9, "{wall:?}");
        let (added, thr) = r.vs_reference(0, "fentry");
        assert!((added.median - 0.5).abs() < 1e-9, "{added:?}");
        assert!((thr.median - 120.0 / 1.1).abs() < 1e-9, "{thr:?}");

        let t = table("6.12", &r, 100.0, false);
        assert!(
            t.contains("kprobe: UNAVAILABLE: udpmon: no hook strategy"),
            "{t}"
        );
        assert!(t.contains("fentry: attached: udpmon: watching UDP sockets (hooks: fentry)"));
        assert!(
            t.contains("| loopback flood 64 B | 90.9 % [90.9..90.9]; wall 80.0 %"),
            "{t}"
        );
        assert!(t.contains("added CPU 0.50x"), "{t}");
        assert!(
            t.contains("| udpmon ring-buffer drops, all runs | 3 | - | - | - |"),
            "{t}"
        );
        // No absolute figure from the VM: the rates and CPU times above never show up.
        assert!(!t.contains("1000") && !t.contains(" ns"), "{t}");
    }

    #[test]
    fn failure_line_keeps_the_per_strategy_reasons() {
        let stderr = [
            "[2026-11-28T00:00:00Z INFO ] something".to_string(),
            "udpmon: no hook strategy could be attached:".to_string(),
            "  kprobe: kernel function udp_sendmsg is not in this kernel's BTF".to_string(),
        ];
        assert_eq!(
            error_line(&stderr).as_deref(),
            Some(
                "udpmon: no hook strategy could be attached: kprobe: kernel function \
                 udp_sendmsg is not in this kernel's BTF"
            )
        );
        assert_eq!(error_line(&[]), None);
    }
}
