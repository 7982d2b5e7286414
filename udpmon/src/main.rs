//! udpmon: watches every UDP socket on the host and reports each UDP flow's life. The parts
//! live in the library (src/lib.rs); this is the command line around them.

use std::{
    collections::HashSet,
    io::{self, IsTerminal as _},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser as _;
use log::info;

use udpmon::{
    agent::{Agent, Stop},
    cli::{Cli, Format, Hooks},
    clock, engine,
    engine::Engine,
    existing,
    filter::Filter,
    journal::{self, Journal},
    metrics,
    netns::{self, NetnsMap},
    output::Output,
    privileges, probes,
    probes::{LoadOptions, Strategy},
    report::{ClockOffset, Formatter, JsonFormat, TextFormat},
    sinks::Sinks,
};

fn main() -> ExitCode {
    // clap exits with code 2 and a one-line error naming the flag on bad usage.
    let cli = Cli::parse();
    if !journal::diagnostics_to_journal(cli.log_level()) {
        env_logger::Builder::new()
            .filter_level(cli.log_level())
            .format_target(false)
            .parse_default_env()
            .init();
    }
    if let Err(msg) = privileges::check() {
        eprintln!("udpmon: {msg}");
        return ExitCode::from(1);
    }
    if let Some(line) = privileges::own_blind_spots() {
        log::warn!("{line}");
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udpmon: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let clock = ClockOffset(clock::wall_minus_boot_ns());
    let formatter = match cli.format {
        Format::Text => Formatter::Text(TextFormat::local(clock)),
        Format::Json => Formatter::Json(JsonFormat::new(clock)),
    };
    let (out, terminal) = match &cli.output {
        Some(path) => {
            let out = Output::open(path)
                .with_context(|| format!("opening --output {}", path.display()))?;
            (Some(out), false)
        }
        None if cli.journal => (None, false),
        None => (
            Some(Output::stdout().context("standard output")?),
            io::stdout().is_terminal(),
        ),
    };
    let journal = match cli.journal {
        true => Some(
            Journal::connect(clock)
                .context("--journal: sending to systemd-journald (/run/systemd/journal/socket)")?,
        ),
        false => None,
    };
    // Before anything is attached: a taken port is a one-line error with nothing to undo.
    let metrics_listener = cli.metrics.map(metrics::bind).transpose()?;
    let strategy = match cli.hooks {
        Hooks::Auto => None,
        Hooks::Fentry => Some(Strategy::Fentry),
        Hooks::Kprobe => Some(Strategy::Kprobe),
        Hooks::Tracepoint => Some(Strategy::Tracepoint),
    };
    let mut probes = probes::load(
        strategy,
        &LoadOptions {
            max_flows: u32::try_from(cli.max_flows).unwrap_or(u32::MAX),
            self_tgid: std::process::id(),
            kernel_log: cli.verbose >= 2,
        },
    )?;
    let mut engine = Engine::new(cli.engine_config());
    // After the hooks are attached, so no socket falls between the snapshot and the events.
    // The same walk of every namespace names them, for the events to come.
    let mut namespaces = NetnsMap::default();
    let mut existing_cgroups = Vec::new();
    let scan_began = clock::boot_ns();
    match existing::existing_sockets() {
        Ok(found) => {
            info!("{}", found.stats);
            if let Err(e) = probes.remember_owners(&found.events, scan_began) {
                log::warn!(
                    "sockets found at startup stay named after the holder the scan found, \
                     even once it exits ({e:#})"
                );
            }
            let none = |_: &engine::FlowId| None;
            // Learned silently: no reports.
            let mut reports = Vec::new();
            for ev in &found.events {
                engine.on_event(ev, &none, &mut reports);
            }
            namespaces.learn(found.netns_cookies, &HashSet::new());
            existing_cgroups = found.cgroups;
        }
        Err(e) => {
            log::warn!("existing sockets not learned: {e:#}");
            match netns::scan() {
                Ok(found) => namespaces.learn(found, &HashSet::new()),
                Err(e) => log::warn!("network namespaces not resolved: {e:#}"),
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let served = match metrics_listener {
        Some(l) => Some(metrics::start(&rt, l, probes.strategy)?),
        None => None,
    };
    let sinks = Sinks {
        clock,
        formatter,
        out,
        header: terminal,
        journal,
        metrics: served,
    };
    let mut agent = Agent::new(probes, engine, namespaces, Filter::from(cli), sinks)?;
    agent.kernel_log = cli.verbose >= 2;
    if !cli.cri_socket.is_empty() {
        for s in cli.cri_socket.iter().filter(|s| !s.exists()) {
            log::warn!(
                "--cri-socket {}: nothing there yet (asked again at each new container)",
                s.display()
            );
        }
        agent.set_cri_sockets(cli.cri_socket.clone());
    }
    agent.resolve_containers(existing_cgroups);
    let stop = rt.block_on(agent.run())?;
    let summary = agent.summary();
    match stop {
        Stop::Signal => eprintln!("udpmon: stopped; {summary}"),
        Stop::OutputClosed => eprintln!("udpmon: output closed; {summary}"),
    }
    Ok(())
}
