//! `cargo xtask test`: every tier, then one summary line per tier. A tier that cannot run
//! here says why and counts as skipped, never as passed; any failed tier fails the run.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{bootstrap, build, deb, package, vm};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the VM matrix.
    #[arg(long)]
    no_vm: bool,
    /// Run the VM tier on these kernels only (5.10, 6.1, 6.12, 7.x); repeatable.
    #[arg(long = "vm", value_name = "KERNEL")]
    vms: Vec<String>,
    /// Run only this tier (repeatable); the others are listed as skipped.
    #[arg(
        long = "tier",
        value_name = "TIER",
        value_parser = ["lint", "unit", "host", "package", "image", "bench-smoke", "vm"]
    )]
    tiers: Vec<String>,
    /// Extra arguments for the test harness (a test-name filter, --nocapture, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    filter: Vec<String>,
}

enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

struct Tier {
    name: String,
    outcome: Outcome,
    /// libtest "test result:" lines, as printed by the runner.
    results: Vec<String>,
    secs: f64,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let path = bootstrap::build_env()?;
    let selected = |tier: &str| args.tiers.is_empty() || args.tiers.iter().any(|t| t == tier);
    let unselected = |tier: &str| Tier {
        name: tier.into(),
        outcome: Outcome::Skipped(format!("not among --tier {}", args.tiers.join(" "))),
        results: Vec::new(),
        secs: 0.0,
    };
    let want_vm = !args.no_vm && selected("vm");
    bootstrap::apt(bootstrap::TEST_PACKAGES)?;
    if want_vm {
        bootstrap::musl_target()?;
    }
    let mut tiers = Vec::new();

    tiers.push(if selected("lint") {
        timed("lint", || build::lint_with(&path).map(|()| Vec::new()))
    } else {
        unselected("lint")
    });
    tiers.push(if selected("unit") {
        timed("unit", || {
            libtest(build::cargo(&path).args([
                "test",
                "-p",
                "udpmon",
                "--lib",
                "--bins",
                "-p",
                "udpmon-common",
                "-p",
                "xtask",
            ]))
        })
    } else {
        unselected("unit")
    });
    tiers.push(if selected("host") {
        host_tier(&path, &args.filter)
    } else {
        unselected("host")
    });
    tiers.push(if selected("package") {
        package_tier()
    } else {
        unselected("package")
    });
    tiers.push(if selected("image") {
        image_tier()
    } else {
        unselected("image")
    });
    tiers.push(if selected("bench-smoke") {
        bench_smoke_tier()
    } else {
        unselected("bench-smoke")
    });
    if want_vm {
        let series: Vec<&str> = if args.vms.is_empty() {
            vm::DEFAULT_KERNELS.to_vec()
        } else {
            args.vms.iter().map(String::as_str).collect()
        };
        tiers.extend(vm_tiers(&path, &series, &args.filter));
    } else if args.no_vm {
        tiers.push(Tier {
            name: "vm".into(),
            outcome: Outcome::Skipped("--no-vm given".into()),
            results: Vec::new(),
            secs: 0.0,
        });
    } else {
        tiers.push(unselected("vm"));
    }

    println!("\n================ udpmon test summary ================");
    let mut failed = 0;
    for t in &tiers {
        let verdict = match &t.outcome {
            Outcome::Passed => "PASSED".to_string(),
            Outcome::Failed(why) => {
                failed += 1;
                format!("FAILED ({why})")
            }
            Outcome::Skipped(why) => format!("SKIPPED ({why})"),
        };
        println!("tier {:<12} {verdict}  [{:.0}s]", t.name, t.secs);
        for r in &t.results {
            println!("    {r}");
        }
    }
    println!("=====================================================");
    if failed > 0 {
        bail!("{failed} tier(s) failed");
    }
    Ok(())
}

fn timed(name: &str, f: impl FnOnce() -> anyhow::Result<Vec<String>>) -> Tier {
    println!("\n=== tier {name} ===");
    let start = Instant::now();
    let (outcome, results) = match f() {
        Ok(r) => (Outcome::Passed, r),
        Err(e) => (Outcome::Failed(format!("{e:#}")), Vec::new()),
    };
    Tier {
        name: name.into(),
        outcome,
        results,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Runs a libtest-based command, echoing its output and collecting the summary lines.
fn libtest(cmd: &mut Command) -> anyhow::Result<Vec<String>> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut results = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if line.starts_with("test result:") {
            results.push(line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{status}; {}", results.join(" | "));
    }
    Ok(results)
}

fn host_tier(path: &str, filter: &[String]) -> Tier {
    if !bootstrap::is_root() {
        return Tier {
            name: "host".into(),
            outcome: Outcome::Skipped("needs root: run `sudo cargo xtask test`".into()),
            results: Vec::new(),
            secs: 0.0,
        };
    }
    timed("host", || {
        libtest(
            build::cargo(path)
                .args([
                    "test",
                    "--release",
                    "-p",
                    "udpmon",
                    "--test",
                    "system",
                    "--",
                ])
                .args(["--test-threads=1"])
                .args(filter)
                .env("UDPMON_TIER", "host"),
        )
    })
}

/// The Debian package, built (a failure fails the tier, root or not), then installed, checked
/// and purged (xtask/src/package.rs; root only).
fn package_tier() -> Tier {
    let mut t = timed("package", || {
        deb::build().map(|deb| vec![deb.display().to_string()])
    });
    if !matches!(t.outcome, Outcome::Passed) {
        return t;
    }
    let deb = std::path::PathBuf::from(t.results.remove(0));
    if !bootstrap::is_root() {
        t.outcome = Outcome::Skipped(format!(
            "built {}; installing it needs root: run `sudo cargo xtask test`",
            deb.display()
        ));
        return t;
    }
    let start = Instant::now();
    match package::check(&deb) {
        Ok(results) => t.results = results,
        Err(e) => t.outcome = Outcome::Failed(format!("{e:#}")),
    }
    t.secs += start.elapsed().as_secs_f64();
    t
}

/// udpmon's container image, built and run under podman as deploy/daemonset.yaml runs it
/// (xtask/src/image.rs). Without podman or root it is skipped with the reason; an image that
/// cannot be built, or a udpmon that does not start in it, fails.
fn image_tier() -> Tier {
    if let Err(why) = crate::image::runnable() {
        println!("\n=== tier image ===\nSKIPPED: {why}");
        return Tier {
            name: "image".into(),
            outcome: Outcome::Skipped(why),
            results: Vec::new(),
            secs: 0.0,
        };
    }
    timed("image", crate::image::check)
}

/// `cargo xtask bench --smoke`: every bench step once, numbers not checked.
fn bench_smoke_tier() -> Tier {
    if !bootstrap::is_root() {
        return Tier {
            name: "bench-smoke".into(),
            outcome: Outcome::Skipped("needs root: run `sudo cargo xtask test`".into()),
            results: Vec::new(),
            secs: 0.0,
        };
    }
    timed("bench-smoke", || crate::bench::smoke().map(|()| Vec::new()))
}

fn vm_tiers(path: &str, series: &[&str], filter: &[String]) -> Vec<Tier> {
    let prep = (|| -> anyhow::Result<_> {
        let kernels = vm::ensure_kernels(series)?;
        let bins = build::musl_binaries(path)?;
        Ok((kernels, bins))
    })();
    let (kernels, (udpmon_bin, test_bin)) = match prep {
        Ok(p) => p,
        Err(e) => {
            return vec![Tier {
                name: "vm".into(),
                outcome: Outcome::Failed(format!("preparing the VMs: {e:#}")),
                results: Vec::new(),
                secs: 0.0,
            }];
        }
    };
    let mut args = vec!["--test-threads=1".to_string()];
    args.extend(filter.iter().cloned());
    kernels
        .iter()
        .map(|k| {
            timed(&format!("vm-{}", k.name), || {
                let r = vm::run_in_vm(k, &udpmon_bin, &test_bin, &args, Duration::from_secs(1500))?;
                if r.passed {
                    Ok(r.summary)
                } else {
                    bail!(
                        "kernel {}: {}; serial log: {}",
                        r.kernel,
                        r.summary.join(" | "),
                        r.log.display()
                    )
                }
            })
        })
        .collect()
}
