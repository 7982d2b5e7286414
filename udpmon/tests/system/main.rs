//! System scenarios: the real udpmon binary, real programs, real traffic between network
//! namespaces. Run as root by `cargo xtask test` on the host and inside each VM kernel.
//!
//! Every scenario runs once per hook strategy. A strategy the tier requires
//! (`harness::must_attach`) that does not attach FAILS its scenarios; one it does not require,
//! or a tool that is missing, makes the scenario SKIPPED with the reason. A scenario that
//! failed while udpmon reported losing records runs once more (`harness::Inconclusive`). The
//! last line has libtest's shape so that runners can collect it:
//! `test result: ok. N passed; M failed; K skipped`.
mod behaviour;
mod busy;
mod containers;
mod cri;
mod dns;
mod dualstack;
mod firewall;
mod forwarder;
mod harness;
mod holders;
mod journald;
mod kill;
mod logfiles;
mod lost;
mod metrics;
mod peers;
mod relay;
mod scenarios;
mod sleep;
mod syscalls;
mod util;

use std::{panic, process::ExitCode, time::Instant};

use harness::{Inconclusive, Outcome, Strategy};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(("--role", role)) = args.split_first().map(|(a, r)| (a.as_str(), r)) {
        holders::role(role);
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if args.iter().any(|a| a == "--list") {
        for s in scenarios::ALL {
            for st in Strategy::ALL {
                println!("{}::{}: test", s.name, st.name());
            }
        }
        return ExitCode::SUCCESS;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED all system scenarios: they need root (network namespaces, BPF)");
        println!(
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; {} skipped",
            scenarios::ALL.len() * 3
        );
        return ExitCode::SUCCESS;
    }
    let tier = harness::tier();
    println!(
        "system scenarios, tier {tier}, kernel {}",
        harness::kernel_release()
    );
    let (mut passed, mut failed, mut skipped, mut filtered) = (0, 0, 0, 0);
    let started = Instant::now();
    for st in Strategy::ALL {
        let avail = harness::strategy_available(st);
        for s in scenarios::ALL {
            let name = format!("{}::{}", s.name, st.name());
            if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
                filtered += 1;
                continue;
            }
            match &avail {
                Err(why) if harness::verifier_refused(why) => {
                    println!("test {name} ... FAILED ({why})");
                    failed += 1;
                    continue;
                }
                Err(why) if harness::must_attach(st) => {
                    println!("test {name} ... FAILED (tier {tier} requires it: {why})");
                    failed += 1;
                    continue;
                }
                Err(why) => {
                    println!("test {name} ... SKIPPED ({why})");
                    skipped += 1;
                    continue;
                }
                Ok(()) => {}
            }
            let t = Instant::now();
            harness::take_lost();
            let mut res = panic::catch_unwind(|| (s.run)(st));
            // Once, and only for what udpmon itself said it lost (see `Inconclusive`).
            let lost = harness::take_lost();
            let why = match res.as_ref().err() {
                Some(e) if let Some(i) = e.downcast_ref::<Inconclusive>() => Some(i.0.clone()),
                Some(e) if let Some(lost) = lost => Some(format!(
                    "{}; udpmon said: {lost}",
                    panic_message(e.as_ref())
                )),
                _ => None,
            };
            if let Some(why) = why {
                println!("running {name} again (inconclusive): {why}");
                res = match panic::catch_unwind(|| (s.run)(st)) {
                    // The first run got far enough to fail: a skip now is not a verdict.
                    Ok(Outcome::Skip(skip)) => Err(Box::new(format!(
                        "{why}; and the second run skipped: {skip}"
                    ))
                        as Box<dyn std::any::Any + Send>),
                    second => second,
                };
            }
            let secs = t.elapsed().as_secs_f64();
            match res {
                Ok(Outcome::Pass) => {
                    println!("test {name} ... ok ({secs:.1}s)");
                    passed += 1;
                }
                Ok(Outcome::Skip(why)) => {
                    println!("test {name} ... SKIPPED ({why})");
                    skipped += 1;
                }
                Err(e) => {
                    let msg = panic_message(e.as_ref());
                    println!("test {name} ... FAILED ({secs:.1}s): {msg}");
                    failed += 1;
                }
            }
        }
    }
    let status = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "test result: {status}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out; {skipped} skipped; finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| e.downcast_ref::<Inconclusive>().map(|i| i.0.clone()))
        .unwrap_or_default()
}
