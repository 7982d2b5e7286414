//! The command line.
use std::{path::PathBuf, time::Duration};

use clap::{
    ArgAction, Parser, ValueEnum,
    builder::{PossibleValuesParser, TypedValueParser as _},
};

use crate::{
    engine::{EngineConfig, ReportKind, SummaryConfig},
    filter::{ContainerSel, Peer, PodSel},
};

/// Watch every UDP socket on this host and report how each UDP flow lives and dies:
/// who opened it, when the peer first answered, when an ICMP error said the peer is gone
/// (and whether the application was told), when a peer went quiet, and when it closed.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "udpmon",
    version,
    after_help = "Filters of different kinds must all match; repeated values of one filter \
                  match any.\n\n\
                  Examples:\n  \
                  udpmon                                    every UDP flow on the host\n  \
                  udpmon --comm nc --events unreachable,app-error\n  \
                  udpmon --peer 10.0.0.0/8:53 --format json --output /var/log/udpmon.jsonl\n  \
                  udpmon -6 --peer '[fd00::/64]:443' --silent-after 3s"
)]
pub struct Cli {
    /// Only sockets of these processes (process ids; repeat the flag or separate with commas).
    /// Also matches the last owner named by REFUSED.
    #[arg(
        long,
        value_name = "PID",
        value_delimiter = ',',
        help_heading = "Filters"
    )]
    pub pid: Vec<u32>,

    /// Only events whose process or thread has this name (as in /proc/PID/comm and
    /// /proc/PID/task/TID/comm, at most 15 bytes; longer names are cut to 15). Repeatable.
    #[arg(
        long,
        value_name = "NAME",
        value_delimiter = ',',
        help_heading = "Filters"
    )]
    pub comm: Vec<String>,

    /// Only flows with this local or remote port. Repeatable.
    #[arg(
        long,
        value_name = "PORT",
        value_delimiter = ',',
        help_heading = "Filters"
    )]
    pub port: Vec<u16>,

    /// Only flows whose remote end is this address or prefix, optionally with a port:
    /// 10.0.0.2, 10.0.0.0/8, 10.0.0.0/8:53, fd00::1, fd00::/64, [fd00::1]:53,
    /// [fd00::/64]:53. Repeatable.
    #[arg(long, value_name = "ADDR|CIDR[:PORT]", help_heading = "Filters")]
    pub peer: Vec<Peer>,

    /// Only sockets in this network namespace (the inode number of /proc/PID/ns/net, as
    /// shown by `ls -Li`). Repeatable.
    #[arg(long, value_name = "INODE", help_heading = "Filters")]
    pub netns: Vec<u32>,

    /// Only sockets of processes in this cgroup (v2 cgroup id: the inode number of its
    /// directory under /sys/fs/cgroup). Repeatable.
    #[arg(long, value_name = "ID", help_heading = "Filters")]
    pub cgroup: Vec<u64>,

    /// Only sockets of processes in this container: its full id, an id prefix of at least 12
    /// hex digits (as `docker ps` and `podman ps` show it), or its name (Docker, Podman; the
    /// container's name within its pod on Kubernetes). Repeatable.
    #[arg(long, value_name = "ID|NAME", help_heading = "Filters")]
    pub container: Vec<ContainerSel>,

    /// Only sockets of processes in this Kubernetes pod: NAME or NAMESPACE/NAME (known where
    /// the runtime's state names it: containerd, CRI-O, Docker with cri-dockerd).
    /// Repeatable.
    #[arg(long, value_name = "[NAMESPACE/]NAME", help_heading = "Filters")]
    pub pod: Vec<PodSel>,

    /// Only IPv4 flows.
    #[arg(
        short = '4',
        long = "ipv4",
        conflicts_with = "ipv6",
        help_heading = "Filters"
    )]
    pub ipv4: bool,

    /// Only IPv6 flows.
    #[arg(short = '6', long = "ipv6", help_heading = "Filters")]
    pub ipv6: bool,

    /// Only these event kinds (comma-separated or repeated).
    #[arg(
        long,
        value_name = "KIND,...",
        value_delimiter = ',',
        value_parser = PossibleValuesParser::new(ReportKind::ALL.map(ReportKind::name))
            .try_map(|s| s.parse::<ReportKind>()),
        help_heading = "Filters"
    )]
    pub events: Vec<ReportKind>,

    /// Report an established flow as SILENT when the peer has not answered for this long
    /// while the local side keeps sending; and a peer (one program's flows to one
    /// address:port, such as a resolver's fresh socket per query) when none of its flows, at
    /// least two, heard back for this long (durations: 500ms, 10s, 2m, 1h).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_duration,
        help_heading = "Timing"
    )]
    pub silent_after: Duration,

    /// SILENT also needs at least this many datagrams sent since the peer's last one (over
    /// all its flows, for a peer).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        value_parser = clap::value_parser!(u64).range(1..),
        help_heading = "Timing"
    )]
    pub silent_min_sends: u64,

    /// Close a flow (reason "idle") after this long without traffic either way. Also the
    /// period of the REFUSED rate limit (one report per local/remote pair).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "120s",
        value_parser = parse_duration,
        help_heading = "Timing"
    )]
    pub idle_timeout: Duration,

    /// Track at most this many flows; beyond it the least recently active flow is closed
    /// (reason "evicted") and counted. Also sizes the kernel maps (about 500 B of kernel
    /// memory per flow), and bounds the peers remembered across flows for peer-scope
    /// SILENT (the least recently used one without live flows is forgotten, and counted).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 65536,
        value_parser = parse_max_flows,
        help_heading = "Timing"
    )]
    pub max_flows: usize,

    /// A socket that opens more than this many flows within one --summary-interval (a
    /// server with many clients) is busy: its new flows' ACCEPT, CONNECT, ESTABLISH and
    /// CLOSE lines give way to one SUMMARY per interval that counts them; its problems are
    /// still printed, up to --summary-problems lines per kind per interval, the rest
    /// counted. A peer whose flows keep drawing the same ICMP error gets its first
    /// UNREACHABLE printed and the next ones counted in a SUMMARY (scope peer).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = "Summaries"
    )]
    pub summary_threshold: u32,

    /// The period of the SUMMARY lines (durations as for --silent-after).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_duration,
        help_heading = "Summaries"
    )]
    pub summary_interval: Duration,

    /// Problem lines (UNREACHABLE, SILENT, APP-ERROR) printed per kind per busy socket per
    /// summary interval; 0 prints none, the SUMMARY counts them all.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        help_heading = "Summaries"
    )]
    pub summary_problems: u32,

    /// No summaries: every flow's lines, every UNREACHABLE.
    #[arg(long, help_heading = "Summaries")]
    pub no_summary: bool,

    /// Kernel hook set. auto tries fentry, then kprobe, then tracepoint and uses the first
    /// that loads; the others force one (and fail if it cannot load).
    #[arg(long, value_enum, default_value_t = Hooks::Auto)]
    pub hooks: Hooks,

    /// Output format: aligned text lines for people, or one JSON object per line for log
    /// shippers.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write events to this file instead of standard output (appended to; reopened on
    /// SIGHUP, for logrotate). When the disk is full, events are counted and dropped until
    /// there is room again.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Send events to the systemd journal, one entry each: MESSAGE is the text line, the
    /// fields are the JSON keys as UDPMON_EVENT, UDPMON_PID, UDPMON_ICMP_VERDICT, ...;
    /// problems get a higher priority. Instead of standard output, or as well as --output.
    #[arg(long)]
    pub journal: bool,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics: events reported (those the
    /// filters pass) by kind, UNREACHABLE by verdict, losses by cause, flows tracked, the
    /// hook strategy. E.g. 127.0.0.1:9776 or [::1]:9776; port 0 takes a free one, logged at
    /// startup. Off by default; a non-loopback address is served too, with a warning.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Ask the CRI runtime service listening on this unix socket (containerd, CRI-O) for the
    /// names of the Kubernetes containers and pods events come from. Repeatable; default: the
    /// ones of /run/containerd/containerd.sock, /run/k3s/containerd/containerd.sock and
    /// /run/crio/crio.sock that exist. Where none answers, names come from the runtimes' state
    /// files.
    #[arg(long, value_name = "PATH")]
    pub cri_socket: Vec<PathBuf>,

    /// More diagnostics on standard error: -v debug, -vv trace (default: info).
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Hooks {
    Fentry,
    Kprobe,
    Tracepoint,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

impl Cli {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            silent_after: self.silent_after,
            silent_min_sends: self.silent_min_sends,
            idle_timeout: self.idle_timeout,
            max_flows: self.max_flows,
            summary: (!self.no_summary).then_some(SummaryConfig {
                threshold: self.summary_threshold,
                interval: self.summary_interval,
                problem_lines: self.summary_problems,
            }),
        }
    }

    pub fn log_level(&self) -> log::LevelFilter {
        match self.verbose {
            0 => log::LevelFilter::Info,
            1 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}

/// `500ms`, `10s`, `1.5s`, `2m`, `1h`; strictly positive.
fn parse_duration(s: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "expected a number and a unit: ms, s, m or h (e.g. 500ms, 10s, 2m)";
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or(EXPECTED)?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| EXPECTED)?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(EXPECTED.into()),
    };
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be greater than 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_max_flows(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("udpmon").chain(args.iter().copied()))
    }

    pub(crate) fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = ok(&[]);
        assert_eq!(c.silent_after, Duration::from_secs(10));
        assert_eq!(c.silent_min_sends, 2);
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.max_flows, 65536);
        assert_eq!((c.hooks, c.format), (Hooks::Auto, Format::Text));
        assert_eq!((c.output, c.verbose), (None, 0));
        assert_eq!(c.metrics, None);
        assert_eq!(ok(&[]).engine_config(), EngineConfig::default());
    }

    #[test]
    fn summary_knobs() {
        let c = ok(&[
            "--summary-threshold",
            "20",
            "--summary-interval",
            "2s",
            "--summary-problems",
            "0",
        ]);
        assert_eq!(
            c.engine_config().summary,
            Some(SummaryConfig {
                threshold: 20,
                interval: Duration::from_secs(2),
                problem_lines: 0,
            })
        );
        assert_eq!(ok(&["--no-summary"]).engine_config().summary, None);
    }

    #[test]
    fn good_values() {
        let c = ok(&[
            "--pid",
            "1,2",
            "--pid",
            "3",
            "--comm",
            "nc",
            "--port",
            "53,123",
            "--peer",
            "10.0.0.0/8:53",
            "--peer",
            "[fd00::/64]:443",
            "--netns",
            "4026531833",
            "--cgroup",
            "25",
            "--container",
            "b5f1cf47c845",
            "--container",
            "web_1.x-y",
            "--pod",
            "kube-system/coredns-5d78c9869d-abcde",
            "-4",
            "--events",
            "connect,app-error",
            "--events",
            "refused",
            "--silent-after",
            "500ms",
            "--silent-min-sends",
            "5",
            "--idle-timeout",
            "2m",
            "--max-flows",
            "10",
            "--hooks",
            "tracepoint",
            "--format",
            "json",
            "-o",
            "/tmp/x.jsonl",
            "--metrics",
            "127.0.0.1:9776",
            "-vv",
        ]);
        assert_eq!(c.pid, [1, 2, 3]);
        assert_eq!(c.port, [53, 123]);
        assert_eq!(c.container.len(), 2);
        assert_eq!(
            c.pod,
            [PodSel {
                namespace: Some("kube-system".into()),
                name: "coredns-5d78c9869d-abcde".into()
            }]
        );
        assert_eq!(c.peer.len(), 2);
        assert!(c.ipv4 && !c.ipv6);
        assert_eq!(
            c.events,
            [
                ReportKind::Connect,
                ReportKind::AppError,
                ReportKind::Refused
            ]
        );
        assert_eq!(c.silent_after, Duration::from_millis(500));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!((c.silent_min_sends, c.max_flows), (5, 10));
        assert_eq!((c.hooks, c.format), (Hooks::Tracepoint, Format::Json));
        assert_eq!(c.output, Some(PathBuf::from("/tmp/x.jsonl")));
        assert_eq!(c.metrics, Some("127.0.0.1:9776".parse().unwrap()));
        assert_eq!(
            ok(&["--metrics", "[::1]:0"]).metrics,
            Some("[::1]:0".parse().unwrap())
        );
        assert_eq!(c.log_level(), log::LevelFilter::Trace);
        assert_eq!(ok(&["-6", "-v"]).log_level(), log::LevelFilter::Debug);
    }

    #[test]
    fn durations() {
        for (s, d) in [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["10", "s", "10x", "-1s", "0s", "1e3s", "", "1.2.3s", "10 s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_name_their_flag_and_exit_2() {
        for (args, flag) in [
            (&["--pid", "x"][..], "--pid"),
            (&["--port", "70000"], "--port"),
            (&["--peer", "10.0.0.0/33"], "--peer"),
            (&["--peer", "[fd00::1"], "--peer"),
            (&["--peer", "[fd00::1]53"], "--peer"),
            (&["--peer", "10.0.0.1:x"], "--peer"),
            (&["--peer", "fd00::/129"], "--peer"),
            (&["--peer", "example.com"], "--peer"),
            (&["--netns", "x"], "--netns"),
            (&["--cgroup=-1"], "--cgroup"),
            (&["--container", ""], "--container"),
            (&["--container", "web 1"], "--container"),
            (&["--container", "/web"], "--container"),
            (&["--pod", ""], "--pod"),
            (&["--pod", "Coredns"], "--pod"),
            (&["--pod", "kube-system/"], "--pod"),
            (&["--pod", "a/b/c"], "--pod"),
            (&["--pod", "kube.system/x"], "--pod"),
            (&["--events", "connect,bogus"], "--events"),
            (&["--silent-after", "10"], "--silent-after"),
            (&["--silent-after", "0s"], "--silent-after"),
            (&["--silent-min-sends", "0"], "--silent-min-sends"),
            (&["--idle-timeout", "soon"], "--idle-timeout"),
            (&["--max-flows", "0"], "--max-flows"),
            (&["--max-flows=-5"], "--max-flows"),
            (&["--summary-threshold", "0"], "--summary-threshold"),
            (&["--summary-interval", "10"], "--summary-interval"),
            (&["--summary-problems=-1"], "--summary-problems"),
            (&["--idle-timeout=-1s"], "--idle-timeout"),
            (&["--hooks", "uprobe"], "--hooks"),
            (&["--format", "xml"], "--format"),
            (&["--metrics", "localhost:9776"], "--metrics"),
            (&["--metrics", "127.0.0.1"], "--metrics"),
            (&["-4", "-6"], "--ipv4"),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} should fail"));
            let msg = e.to_string();
            assert!(msg.contains(flag), "{args:?}: {msg}");
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert_ne!(e.kind(), ErrorKind::DisplayHelp);
        }
    }

    #[test]
    fn help_explains_every_flag() {
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--pid",
            "--comm",
            "--port",
            "--peer",
            "--netns",
            "--cgroup",
            "--container",
            "--pod",
            "--ipv4",
            "--ipv6",
            "--events",
            "--silent-after",
            "--silent-min-sends",
            "--idle-timeout",
            "--max-flows",
            "--summary-threshold",
            "--summary-interval",
            "--summary-problems",
            "--no-summary",
            "--hooks",
            "--format",
            "--output",
            "--journal",
            "--metrics",
            "--verbose",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(arg.get_help().is_some(), "--{id} has no help text");
            }
        }
    }
}
