//! Writes the man page (`udpmon.8`) and the bash, zsh and fish completions (`udpmon.bash`,
//! `_udpmon`, `udpmon.fish`) for the Debian package into OUTDIR: `cargo xtask deb` runs
//! `cargo run --release -p udpmon --example assets -- OUTDIR`.
//!
//! Both come from the real command line (`udpmon::cli::Cli`), so a new flag shows up in them
//! without anyone touching this file. An example rather than code in the binary: the
//! generators stay dev-dependencies and udpmon does not grow.
//!
//! The man page adds what `--help` does not say: the event kinds (from
//! `engine::ReportKind`, with a description per kind that the compiler insists on), the JSON
//! keys (the schema documented at the top of `src/report/json.rs`, taken from there verbatim),
//! the capabilities (`privileges::CAPABILITIES`), signals, files and exit codes.
use std::{env, fs, path::PathBuf, process::ExitCode};

use clap::CommandFactory as _;
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{Inline, Roff, bold, italic, roman};
use udpmon::{cli::Cli, engine::ReportKind, privileges::CAPABILITIES};

/// The schema's documentation: the module comment of the JSON formatter.
const JSON_RS: &str = include_str!("../src/report/json.rs");

fn main() -> ExitCode {
    let Some(out) = env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: assets OUTDIR");
        return ExitCode::from(2);
    };
    match write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("assets: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(out: &std::path::Path) -> Result<(), String> {
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let mut page = Vec::new();
    man_page(&mut page).map_err(|e| format!("rendering the man page: {e}"))?;
    let path = out.join("udpmon.8");
    fs::write(&path, page).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("{}", path.display());
    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "udpmon", out)
            .map_err(|e| format!("writing the {shell} completions: {e}"))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn man_page(w: &mut Vec<u8>) -> std::io::Result<()> {
    let cmd = Cli::command();
    let after_help = cmd.get_after_help().map(|h| h.to_string());
    let man = Man::new(cmd).section("8").manual("System Administration");
    // clap_mangen's own sections, except its "EXTRA" rendering of the after-help text, which
    // comes out below as EXAMPLES, preformatted as --help shows it.
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;

    let mut r = Roff::new();
    events(&mut r);
    json_output(&mut r);
    privileges(&mut r);
    signals(&mut r);
    exit_status(&mut r);
    files(&mut r);
    examples(&mut r, after_help.as_deref().unwrap_or_default());
    see_also(&mut r);
    r.to_writer(w)?;
    man.render_version_section(w)
}

/// What each kind means to the operator. A match, so that a new kind does not compile until it
/// is described here.
fn describe(kind: ReportKind) -> &'static str {
    match kind {
        ReportKind::Connect => {
            "The local side starts talking to a peer: connect(), or the first datagram sent to it."
        }
        ReportKind::Accept => "A peer starts talking to a local socket: its first datagram.",
        ReportKind::Establish => {
            "The flow carries traffic both ways for the first time; says how long the first answer took."
        }
        ReportKind::Unreachable => {
            "An ICMP error says the peer is gone, and whether the kernel told the application: notified (the next send or receive fails), queued (on the socket's error queue), discarded (the application will never know), or no-socket."
        }
        ReportKind::Silent => {
            "A peer has not answered for --silent-after while the local side keeps sending, without any error: scope flow (one established flow went quiet) or scope peer (a program's queries to one remote address:port over many fresh sockets, as a resolver sends them, go unanswered; also when it never answered)."
        }
        ReportKind::Resumed => "A silent or unreachable peer is heard from again.",
        ReportKind::AppError => {
            "The application itself got an error from a send or receive call (ECONNREFUSED, EHOSTUNREACH, ...)."
        }
        ReportKind::Close => {
            "The flow ended (socket closed, idle for --idle-timeout, evicted, disconnected or reconnected), with its duration and counters."
        }
        ReportKind::Refused => {
            "A peer keeps sending to a local port nobody listens on any more; names the port's last owner."
        }
        ReportKind::Summary => {
            "Once per --summary-interval: scope socket for a busy socket (more than --summary-threshold new flows in an interval), whose flows' CONNECT, ACCEPT, ESTABLISH and CLOSE it counts instead of printing them, with its problems (the first --summary-problems per kind printed, the rest folded); scope peer for a peer whose flows keep drawing the same ICMP error, whose UNREACHABLE after the first it counts. --no-summary prints every line instead."
        }
    }
}

fn events(r: &mut Roff) {
    r.control("SH", ["EVENTS"]);
    r.text([roman(
        "One line per event. Text output shows the upper-case label in its EVENT column; JSON \
         output and --events use the lower-case name.",
    )]);
    for kind in ReportKind::ALL {
        r.control("TP", []);
        r.text([
            bold(kind.label()),
            roman(" ("),
            bold(kind.name()),
            roman(")"),
        ]);
        r.text([roman(describe(kind))]);
    }
}

/// The JSON section from the `//!` comment of src/report/json.rs: paragraphs and `- ` list
/// items (continued on indented lines), with `code` in bold.
fn json_output(r: &mut Roff) {
    r.control("SH", ["JSON OUTPUT"]);
    r.text([roman("With --format json:")]);
    let doc: Vec<&str> = JSON_RS
        .lines()
        .map_while(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    // Paragraphs and list items, each joined into one string.
    let mut blocks: Vec<(bool, String)> = Vec::new();
    for line in doc {
        if line.trim().is_empty() {
            blocks.push((false, String::new()));
        } else if let Some(item) = line.strip_prefix("- ") {
            blocks.push((true, item.to_owned()));
        } else if let Some(last) = blocks.last_mut().filter(|b| !b.1.is_empty()) {
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else {
            blocks.push((false, line.trim().to_owned()));
        }
    }
    for kind in ReportKind::ALL {
        assert!(
            blocks
                .iter()
                .any(|(_, b)| b.contains(&format!("`{}`", kind.name()))),
            "src/report/json.rs does not document the event kind {}",
            kind.name()
        );
    }
    for (item, text) in blocks.into_iter().filter(|b| !b.1.is_empty()) {
        if item {
            r.control("IP", ["\\(bu", "2"]);
        } else {
            r.control("PP", []);
        }
        r.text(code_spans(&text));
    }
}

/// `code` in bold, the rest roman.
fn code_spans(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(i, s)| if i % 2 == 1 { bold(s) } else { roman(s) })
        .collect()
}

fn privileges(r: &mut Roff) {
    r.control("SH", ["PRIVILEGES"]);
    r.text([roman(
        "udpmon runs as root, or as any user with these capabilities (the set udpmon.service \
         grants), with which nothing degrades: ",
    )]);
    r.text([bold(CAPABILITIES.join(" ")), roman(".")]);
    r.text([roman(format!(
        "{} are the minimum: without CAP_SYS_ADMIN udpmon cannot enter other network namespaces \
         (and some kernels refuse the kprobe strategy), without CAP_SYS_PTRACE and \
         CAP_DAC_READ_SEARCH it cannot read other users' processes, so sockets that predate it \
         lose their owner or namespace; it says so in one warning line at startup. Kernels \
         before 5.11 also need CAP_SYS_RESOURCE, or RLIMIT_MEMLOCK already unlimited, for the \
         BPF maps. Without the minimum, BTF (/sys/kernel/btf/vmlinux) or a cgroup v2 mount, \
         udpmon says what is missing in one line and exits with status 1, with nothing attached.",
        CAPABILITIES[..3].join(" + ")
    ))]);
}

fn signals(r: &mut Roff) {
    r.control("SH", ["SIGNALS"]);
    for (sig, what) in [
        (
            "SIGINT, SIGTERM",
            "Detach every kernel program, print what the ring buffer still holds and the \
             health summary, exit 0.",
        ),
        (
            "SIGHUP",
            "Reopen the --output file (for logrotate; `systemctl reload udpmon` sends it).",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(sig)]);
        r.text([roman(what)]);
    }
    r.control("PP", []);
    r.text([roman(
        "A closed standard output (udpmon | head) ends udpmon cleanly too; the events it could \
         no longer print are counted in the summary.",
    )]);
}

fn exit_status(r: &mut Roff) {
    r.control("SH", ["EXIT STATUS"]);
    for (code, what) in [
        (
            "0",
            "Stopped by SIGINT or SIGTERM, or its standard output was closed.",
        ),
        (
            "1",
            "A missing privilege, kernel feature (BTF, cgroup v2, a hook strategy forced with \
             --hooks) or another error; one line on standard error says which.",
        ),
        ("2", "A bad command line; one line names the flag."),
    ] {
        r.control("TP", []);
        r.text([bold(code)]);
        r.text([roman(what)]);
    }
}

fn files(r: &mut Roff) {
    r.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/default/udpmon",
            "The service's flags: UDPMON_ARGS=\"...\" (the package's default writes JSON lines \
             to /var/log/udpmon/udpmon.jsonl).",
        ),
        (
            "/usr/lib/systemd/system/udpmon.service",
            "The systemd unit: user udpmon, the capabilities above and nothing else, a read-only \
             file system but for /var/log/udpmon. Change it with a drop-in (systemctl edit \
             udpmon), e.g. ReadWritePaths= for an --output elsewhere.",
        ),
        (
            "/var/log/udpmon/",
            "Event files (mode 0640, group udpmon: add a log shipper's user to the group).",
        ),
        (
            "/etc/logrotate.d/udpmon",
            "Rotates /var/log/udpmon/*.jsonl daily, and sends SIGHUP to the service.",
        ),
        (
            "/sys/kernel/btf/vmlinux",
            "The running kernel's BTF, from which udpmon takes structure offsets and picks \
             program variants.",
        ),
    ] {
        r.control("TP", []);
        r.text([italic(path)]);
        r.text([roman(what)]);
    }
}

/// The after-help of `--help`: its notes as a paragraph, its examples as --help shows them,
/// then how the packaged service is run.
fn examples(r: &mut Roff, after_help: &str) {
    let (notes, cli_examples) = after_help
        .split_once("Examples:")
        .unwrap_or(("", after_help));
    r.control("SH", ["EXAMPLES"]);
    if !notes.trim().is_empty() {
        r.text([roman(notes.trim())]);
    }
    r.control("PP", []);
    r.control("nf", []);
    for line in cli_examples.lines().filter(|l| !l.trim().is_empty()) {
        r.text([roman(line)]);
    }
    r.control("fi", []);
    r.control("PP", []);
    r.text([roman("The packaged service:")]);
    r.control("PP", []);
    r.control("nf", []);
    for line in [
        "  sudoedit /etc/default/udpmon                 set UDPMON_ARGS",
        "  sudo systemctl restart udpmon",
        "  journalctl -u udpmon                         udpmon's own diagnostics",
        "  tail -f /var/log/udpmon/udpmon.jsonl         the events (package default)",
    ] {
        r.text([roman(line)]);
    }
    r.control("fi", []);
}

fn see_also(r: &mut Roff) {
    r.control("SH", ["SEE ALSO"]);
    let pages = [
        ("systemctl", "1"),
        ("journalctl", "1"),
        ("systemd.exec", "5"),
        ("capabilities", "7"),
        ("logrotate", "8"),
        ("bpftool", "8"),
    ];
    let mut inl = Vec::new();
    for (i, (name, sec)) in pages.iter().enumerate() {
        inl.push(bold(*name));
        inl.push(roman(format!(
            "({sec}){}",
            if i + 1 < pages.len() { ", " } else { "" }
        )));
    }
    r.text(inl);
}
