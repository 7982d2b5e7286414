//! Developer tasks: `cargo xtask run -- [UDPMON ARGS]`, `cargo xtask test`, `cargo xtask
//! bootstrap`, `cargo xtask build`, `cargo xtask lint`, `cargo xtask deb`, `cargo xtask
//! image`. Each installs what it needs first.
mod bench;
mod bootstrap;
mod build;
mod deb;
mod image;
mod package;
mod running;
mod test;
mod util;
mod vm;

use std::process::{Command, ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "udpmon developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (toolchain parts, bpf-linker, Debian
    /// packages, VM kernels).
    Bootstrap,
    /// Build udpmon (release) with its eBPF object embedded.
    Build,
    /// Build the Debian package, target/debian/udpmon_VERSION_ARCH.deb (binary, systemd unit,
    /// /etc/default/udpmon, logrotate rule, man page, bash/zsh/fish completions).
    Deb,
    /// Build udpmon's container image with podman, localhost/udpmon:VERSION: the static (musl)
    /// binary FROM scratch (deploy/Containerfile); deploy/daemonset.yaml runs it.
    Image,
    /// Build udpmon and run it as root with the given arguments.
    Run {
        /// Arguments for udpmon (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test tier: lint, unit, host integration (root), the Debian package (root), VM
    /// matrix.
    Test(test::TestArgs),
    /// cargo fmt --check and clippy -D warnings for the userspace and the eBPF crates.
    Lint,
    /// Measure what running udpmon costs (hot path, event pipeline, engine, startup): one
    /// table against baselines from the same run. `--smoke`: every step once, tiny durations.
    /// `--vm KERNEL`: the hot path per hook strategy in a VM instead (ratios only).
    Bench(bench::BenchArgs),
    /// Inside a bench VM (`cargo xtask bench --vm`): the hot-path measurements, as console
    /// marker lines.
    #[command(hide = true)]
    BenchGuest(bench::GuestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bootstrap => bootstrap_all(),
        Cmd::Build => build::release().map(|_| ()),
        Cmd::Deb => deb::build().map(|_| ()),
        Cmd::Image => image::build().map(|tag| println!("[image] built {tag}")),
        Cmd::Run { args } => run(&args),
        Cmd::Test(t) => test::run(&t),
        Cmd::Lint => build::lint(),
        Cmd::Bench(b) => bench::run(&b),
        Cmd::BenchGuest(g) => bench::guest(&g),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bootstrap_all() -> anyhow::Result<()> {
    bootstrap::build_env()?;
    bootstrap::musl_target()?;
    bootstrap::cargo_deb()?;
    bootstrap::apt(bootstrap::TEST_PACKAGES)?;
    vm::ensure_kernels(vm::DEFAULT_KERNELS)?;
    Ok(())
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let bin = build::release()?;
    let mut cmd = if bootstrap::is_root() {
        Command::new(&bin)
    } else {
        // udpmon needs root (or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN).
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    let status = cmd
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}
