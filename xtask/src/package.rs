//! The `package` test tier: installs target/debian/udpmon_*.deb on this machine and checks it
//! the way an operator would meet it: the files, the user, `man udpmon`, the completions in
//! bash, zsh and fish, `systemd-analyze verify`, the installed binary (also under strace,
//! against the unit's SystemCallFilter=), the service's own configuration run as its user with
//! the unit's capabilities (this machine's PID 1 is not systemd, so the unit itself cannot
//! start here), the logrotate rule, then `dpkg --purge` and what is left.
//!
//! One `test package::NAME ... ok|FAILED|SKIPPED` line per check and a libtest-style summary
//! line. Without zsh, fish or strace their checks are SKIPPED with the reason; the other tools
//! (man-db, systemd-analyze, setpriv, logrotate) are what the package is for, and their
//! absence fails. Bootstrap installs them all.
use std::{
    collections::BTreeSet,
    fs,
    net::UdpSocket,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::running::Running;

const UNIT: &str = "/usr/lib/systemd/system/udpmon.service";
const DEFAULTS: &str = "/etc/default/udpmon";
const LOGROTATE: &str = "/etc/logrotate.d/udpmon";
const LOG_DIR: &str = "/var/log/udpmon";
const BIN: &str = "/usr/bin/udpmon";

enum Outcome {
    Pass,
    Skip(String),
}

#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
    skipped: u32,
}

impl Tally {
    fn check(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<Outcome>) -> bool {
        let t = Instant::now();
        let res = f();
        let secs = t.elapsed().as_secs_f64();
        match res {
            Ok(Outcome::Pass) => {
                println!("test package::{name} ... ok ({secs:.1}s)");
                self.passed += 1;
                true
            }
            Ok(Outcome::Skip(why)) => {
                println!("test package::{name} ... SKIPPED ({why})");
                self.skipped += 1;
                true
            }
            Err(e) => {
                println!("test package::{name} ... FAILED ({secs:.1}s): {e:#}");
                self.failed += 1;
                false
            }
        }
    }

    fn summary(&self, started: Instant) -> String {
        format!(
            "test result: {}. {} passed; {} failed; 0 ignored; 0 measured; 0 filtered out; {} skipped; finished in {:.1}s",
            if self.failed == 0 { "ok" } else { "FAILED" },
            self.passed,
            self.failed,
            self.skipped,
            started.elapsed().as_secs_f64()
        )
    }
}

/// Installs `deb`, checks it, purges it. Needs root. Returns the summary line.
pub fn check(deb: &Path) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    let mut t = Tally::default();
    let scratch = std::env::temp_dir().join(format!("udpmon-package-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;

    let installed = t.check("install", || install(deb));
    let mut files = Vec::new();
    if installed {
        t.check("contents", || {
            files = package_files()?;
            contents(&files)
        });
        t.check("user_and_log_dir", user_and_log_dir);
        t.check("man_page", man_page);
        t.check("bash_completion", bash_completion);
        t.check("zsh_completion", zsh_completion);
        t.check("fish_completion", || fish_completion(&scratch));
        t.check("systemd_analyze_verify", verify_unit);
        t.check("version", version);
        t.check("short_run", short_run);
        t.check("syscall_filter", || syscall_filter(&scratch));
        t.check("service_configuration_and_logrotate", || {
            service_configuration(&scratch)
        });
    }
    // Also after a failed installation: dpkg may have left it half-configured.
    t.check("purge", || purge(installed, &files));
    let _ = fs::remove_dir_all(&scratch);

    let summary = t.summary(started);
    println!("{summary}");
    if t.failed > 0 {
        bail!("{summary}");
    }
    Ok(vec![summary])
}

fn output(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    cmd.output().with_context(|| format!("spawning {cmd:?}"))
}

/// Runs `cmd`; fails with its output unless it succeeds. Returns standard output.
fn ok_stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "udpmon"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty() && o.stdout != b"not-installed")
}

fn install(deb: &Path) -> anyhow::Result<Outcome> {
    // Left over from an interrupted run.
    if package_installed() {
        println!("    purging the udpmon package left installed by an earlier run");
        ok_stdout(Command::new("dpkg").args(["--purge", "udpmon"]))?;
    }
    // dpkg would silently take over a binary someone installed by hand, and the purge would
    // then delete it.
    if Path::new(BIN).exists() {
        bail!("{BIN} exists and belongs to no package; move it away to run this tier");
    }
    ok_stdout(Command::new("dpkg").arg("-i").arg(deb))?;
    Ok(Outcome::Pass)
}

fn package_files() -> anyhow::Result<Vec<PathBuf>> {
    Ok(ok_stdout(Command::new("dpkg").args(["-L", "udpmon"]))?
        .lines()
        .map(PathBuf::from)
        .filter(|p| !p.is_dir())
        .collect())
}

fn contents(files: &[PathBuf]) -> anyhow::Result<Outcome> {
    for want in [
        BIN,
        UNIT,
        DEFAULTS,
        LOGROTATE,
        "/usr/share/man/man8/udpmon.8.gz",
        "/usr/share/bash-completion/completions/udpmon",
        "/usr/share/zsh/vendor-completions/_udpmon",
        "/usr/share/fish/vendor_completions.d/udpmon.fish",
    ] {
        ensure!(
            files.iter().any(|f| f == Path::new(want)),
            "{want} is not in the package: {files:?}"
        );
        ensure!(Path::new(want).is_file(), "{want} was not installed");
    }
    let conffiles =
        ok_stdout(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "udpmon"]))?;
    for conf in [DEFAULTS, LOGROTATE] {
        ensure!(
            conffiles
                .lines()
                .any(|l| l.split_whitespace().next() == Some(conf)),
            "{conf} is not a conffile: {conffiles}"
        );
    }
    // The postinst enabled the unit, as dh_installsystemd would (symlink only: no systemd).
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/udpmon.service");
    ensure!(wants.is_symlink(), "{} missing", wants.display());
    Ok(Outcome::Pass)
}

fn user_and_log_dir() -> anyhow::Result<Outcome> {
    let pw = ok_stdout(Command::new("getent").args(["passwd", "udpmon"]))?;
    let f: Vec<&str> = pw.trim().split(':').collect();
    ensure!(f.len() == 7, "getent passwd udpmon: {pw}");
    let uid: u32 = f[2].parse()?;
    ensure!(uid < 1000, "udpmon is not a system user: {pw}");
    ensure!(f[6].ends_with("nologin"), "udpmon has a login shell: {pw}");
    let gid: u32 = ok_stdout(Command::new("getent").args(["group", "udpmon"]))?
        .split(':')
        .nth(2)
        .context("getent group udpmon")?
        .parse()?;
    let m = fs::metadata(LOG_DIR).with_context(|| format!("{LOG_DIR} not created"))?;
    ensure!(
        m.uid() == uid && m.gid() == gid && m.mode() & 0o7777 == 0o750,
        "{LOG_DIR}: uid {} gid {} mode {:o}, want udpmon:udpmon 0750",
        m.uid(),
        m.gid(),
        m.mode() & 0o7777
    );
    Ok(Outcome::Pass)
}

fn man_page() -> anyhow::Result<Outcome> {
    if !have("man") {
        bail!("man is not installed (bootstrap installs man-db)");
    }
    let path = ok_stdout(Command::new("man").args(["-w", "udpmon"]))?;
    ensure!(
        path.trim() == "/usr/share/man/man8/udpmon.8.gz",
        "man -w udpmon: {path}"
    );
    let out = output(
        Command::new("man")
            .args(["--warnings", "8", "udpmon"])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8"),
    )?;
    let page = String::from_utf8_lossy(&out.stdout);
    let warnings = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "man udpmon: {}: {warnings}",
        out.status
    );
    ensure!(
        warnings.trim().is_empty(),
        "groff warnings rendering the page: {warnings}"
    );
    for want in [
        "udpmon(8)",
        "SYNOPSIS",
        "--max-flows",
        "EVENTS",
        "UNREACHABLE (unreachable)",
        "APP-ERROR (app-error)",
        "JSON OUTPUT",
        "reply_after_ms",
        "verdict",
        "PRIVILEGES",
        "CAP_DAC_READ_SEARCH",
        "SIGNALS",
        "SIGHUP",
        "EXIT STATUS",
        "FILES",
        "/etc/default/udpmon",
    ] {
        ensure!(page.contains(want), "the rendered page lacks {want:?}");
    }
    Ok(Outcome::Pass)
}

fn bash_completion() -> anyhow::Result<Outcome> {
    // Through bash-completion's own loader, which finds the file by the command's name, then
    // a real completion of `udpmon --hooks <TAB>`.
    let loader = "/usr/share/bash-completion/bash_completion";
    let script = if Path::new(loader).exists() {
        format!("source {loader}; __load_completion udpmon || exit 3;")
    } else {
        println!("    bash-completion is not installed: sourcing the file directly");
        "source /usr/share/bash-completion/completions/udpmon || exit 3;".into()
    };
    let out = ok_stdout(Command::new("bash").arg("-c").arg(format!(
        "{script} complete -p udpmon; \
         COMP_WORDS=(udpmon --hooks ''); COMP_CWORD=2; COMP_LINE='udpmon --hooks '; \
         COMP_POINT=${{#COMP_LINE}}; _udpmon udpmon '' --hooks; echo \"${{COMPREPLY[*]}}\""
    )))?;
    ensure!(
        out.contains("-F _udpmon udpmon"),
        "complete -p udpmon: {out}"
    );
    ensure!(
        out.lines()
            .last()
            .unwrap_or_default()
            .split(' ')
            .collect::<BTreeSet<_>>()
            == BTreeSet::from(["fentry", "kprobe", "tracepoint", "auto"]),
        "udpmon --hooks <TAB> offered: {out}"
    );
    Ok(Outcome::Pass)
}

fn zsh_completion() -> anyhow::Result<Outcome> {
    if !have("zsh") {
        return Ok(Outcome::Skip("zsh is not installed".into()));
    }
    // compinit maps the command to its function from the default fpath (vendor-completions);
    // autoload +X parses the function.
    let out = ok_stdout(Command::new("zsh").args([
        "-fc",
        "autoload -U compinit && compinit -u -D && print -r -- ${_comps[udpmon]} \
         && autoload +X _udpmon && whence -w _udpmon",
    ]))?;
    ensure!(
        out == "_udpmon\n_udpmon: function\n",
        "zsh did not load _udpmon: {out}"
    );
    Ok(Outcome::Pass)
}

fn fish_completion(scratch: &Path) -> anyhow::Result<Outcome> {
    if !have("fish") {
        return Ok(Outcome::Skip("fish is not installed".into()));
    }
    // Not --no-config: that also skips the system config that sets fish_complete_path. An
    // empty config home keeps the developer's own config out.
    let home = scratch.join("fish-config");
    fs::create_dir_all(&home)?;
    let out = ok_stdout(
        Command::new("fish")
            .args([
                "-c",
                "complete -C'udpmon --max-fl'; complete -C'udpmon --format '",
            ])
            .env("XDG_CONFIG_HOME", &home),
    )?;
    ensure!(
        out.lines().any(|l| l.starts_with("--max-flows\t")),
        "udpmon --max-fl<TAB>: {out}"
    );
    ensure!(
        out.lines().any(|l| l == "json") && out.lines().any(|l| l == "text"),
        "udpmon --format <TAB>: {out}"
    );
    Ok(Outcome::Pass)
}

fn verify_unit() -> anyhow::Result<Outcome> {
    if !have("systemd-analyze") {
        bail!("systemd-analyze is not installed (bootstrap installs systemd)");
    }
    // verify exits 0 after mere warnings (an unknown key, a bad value: "ignoring"), so any
    // output at all fails. It also checks that ExecStart= exists and that man udpmon(8) opens.
    let out = output(Command::new("systemd-analyze").args(["verify", UNIT]))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {}: {said}",
        out.status
    );
    // For the log: how exposed the service is by systemd's own measure.
    if let Ok(out) = output(Command::new("systemd-analyze").args([
        "security",
        "--offline=true",
        "--no-pager",
        UNIT,
    ])) && let Some(l) = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("Overall exposure"))
    {
        println!("    {}", l.trim_start_matches(['→', ' ']));
    }
    Ok(Outcome::Pass)
}

fn version() -> anyhow::Result<Outcome> {
    let out = ok_stdout(Command::new(BIN).arg("--version"))?;
    let want = format!("udpmon {}", env!("CARGO_PKG_VERSION"));
    ensure!(
        out.trim() == want,
        "{BIN} --version: {out:?}, want {want:?}"
    );
    Ok(Outcome::Pass)
}

/// The installed binary, as root, with the strategy every kernel has: attached, then SIGINT
/// ends it with status 0.
fn short_run() -> anyhow::Result<Outcome> {
    let mut r = Running::spawn(
        Command::new(BIN).args(["--hooks", "tracepoint"]),
        false,
        false,
    )?;
    r.ready()?;
    let status = r.stop(libc::SIGINT)?;
    ensure!(status.success(), "exit status {status}: {}", r.said());
    Ok(Outcome::Pass)
}

/// The unit's `Key=` values, every line of that key.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

/// The system calls a `SystemCallFilter=` group or name stands for, as systemd itself lists
/// them.
fn expand_syscalls(item: &str, out: &mut BTreeSet<String>) -> anyhow::Result<()> {
    if !item.starts_with('@') {
        out.insert(item.to_owned());
        return Ok(());
    }
    let listing = ok_stdout(Command::new("systemd-analyze").args(["syscall-filter", item]))?;
    // The group's name, then "# description" lines, then its members (names or groups).
    for name in listing
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        expand_syscalls(name, out)?;
    }
    Ok(())
}

/// udpmon under strace, with the hook strategy chosen as the service would (auto: every
/// strategy this kernel refuses is tried first) and an event written to a file: every system
/// call it makes must be one the unit's SystemCallFilter= allows. The unit sets
/// SystemCallErrorNumber=EPERM, so a call left out would not kill udpmon but quietly fail,
/// and this machine cannot run the unit to see it.
fn syscall_filter(scratch: &Path) -> anyhow::Result<Outcome> {
    if !have("strace") {
        return Ok(Outcome::Skip(
            "strace is not installed (bootstrap installs it)".into(),
        ));
    }
    let unit = fs::read_to_string(UNIT)?;
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for value in unit_values(&unit, "SystemCallFilter") {
        let (deny, list) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value.as_str()),
        };
        for item in list.split_whitespace() {
            expand_syscalls(item, if deny { &mut denied } else { &mut allowed })?;
        }
    }
    if allowed.is_empty() {
        return Ok(Outcome::Skip(
            "the unit has no SystemCallFilter= allow list".into(),
        ));
    }
    let log = scratch.join("strace.txt");
    let events = scratch.join("strace.jsonl");
    // Its own process group: SIGINT to the group reaches udpmon; strace, started with
    // `-o FILE PROG`, blocks it and stays to write the summary.
    let mut r = Running::spawn(
        Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&log)
            .args([BIN, "--format", "json", "--output"])
            .arg(&events),
        true,
        false,
    )?;
    let res = r
        .ready()
        .and_then(|()| wait_for_event(&events, send_one()?));
    if let Err(e) = res {
        r.kill();
        return Err(e);
    }
    let status = r.stop(libc::SIGINT)?;
    ensure!(status.success(), "exit status {status}: {}", r.said());
    // strace -c: a table whose last column is the system call, between dashed lines.
    let table = fs::read_to_string(&log)?;
    let used: BTreeSet<&str> = table
        .lines()
        .filter(|l| !l.starts_with('-') && !l.contains("% time"))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| *s != "total")
        .collect();
    ensure!(used.contains("bpf"), "no bpf calls in the trace: {table}");
    let refused: Vec<&&str> = used
        .iter()
        .filter(|s| !allowed.contains(**s) || denied.contains(**s))
        .collect();
    ensure!(
        refused.is_empty(),
        "udpmon made system calls the unit's SystemCallFilter= refuses: {refused:?}"
    );
    println!("    {} distinct system calls, all allowed", used.len());
    Ok(Outcome::Pass)
}

/// One datagram from a new socket to the discard port; returns the socket's port.
fn send_one() -> anyhow::Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.send_to(b"package", "127.0.0.1:9")?;
    Ok(s.local_addr()?.port())
}

/// Waits until a JSON line in `file` has the local port `port`.
fn wait_for_event(file: &Path, port: u16) -> anyhow::Result<serde_json::Value> {
    let local = format!("127.0.0.1:{port}");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = fs::read_to_string(file) {
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l)
                    .with_context(|| format!("{}: not JSON: {l}", file.display()))?;
                if v["local"] == local.as_str() {
                    return Ok(v);
                }
            }
        }
        if Instant::now() > end {
            bail!("no event from {local} in {} within 20 s", file.display());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last `UDPMON_ARGS="..."` of the defaults file, split into words as systemd splits an
/// unbraced `$UDPMON_ARGS`.
fn default_args(text: &str) -> anyhow::Result<Vec<String>> {
    let value = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("UDPMON_ARGS="))
        .with_context(|| format!("no UDPMON_ARGS in {DEFAULTS}"))?;
    Ok(value
        .trim_matches('"')
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// The `--output` of udpmon's arguments.
fn output_file(args: &[String]) -> anyhow::Result<PathBuf> {
    args.windows(2)
        .find(|w| w[0] == "--output" || w[0] == "-o")
        .map(|w| PathBuf::from(&w[1]))
        .with_context(|| format!("{DEFAULTS}: no --output in {args:?}"))
}

/// The service's own configuration, run as the unit would run it where PID 1 is systemd: user
/// udpmon, the unit's ambient capabilities and umask, the flags from /etc/default/udpmon. Its
/// event file must appear in /var/log/udpmon, owned by udpmon and readable by the group only;
/// then the logrotate rule rotates it and, after the SIGHUP that the rule's postrotate sends
/// through systemd, udpmon writes to a new file.
fn service_configuration(scratch: &Path) -> anyhow::Result<Outcome> {
    for tool in ["setpriv", "logrotate"] {
        if !have(tool) {
            bail!("{tool} is not installed (bootstrap installs it)");
        }
    }
    let unit = fs::read_to_string(UNIT)?;
    let caps = unit_values(&unit, "AmbientCapabilities").join(" ");
    ensure!(!caps.is_empty(), "no AmbientCapabilities= in {UNIT}");
    let caps = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let umask = unit_values(&unit, "UMask")
        .pop()
        .unwrap_or_else(|| "0022".into());
    let args = default_args(&fs::read_to_string(DEFAULTS)?)?;
    let file = output_file(&args)?;
    ensure!(
        file.parent() == Some(Path::new(LOG_DIR)),
        "{DEFAULTS} writes to {}, outside {LOG_DIR}, which the unit leaves read-only",
        file.display()
    );
    // Only this test's lines, and a first file udpmon creates itself, as on a fresh install.
    let _ = fs::remove_file(&file);

    // sh sets the unit's umask, then exec: udpmon keeps the pid we signal.
    let mut r = Running::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$@\""))
            .arg("sh")
            .args([
                "setpriv",
                "--reuid=udpmon",
                "--regid=udpmon",
                "--init-groups",
                &format!("--inh-caps={caps}"),
                &format!("--ambient-caps={caps}"),
                BIN,
            ])
            .args(&args)
            .current_dir("/"),
        false,
        false,
    )?;
    let res = (|| -> anyhow::Result<()> {
        r.ready()?;
        let blind: Vec<&String> = r
            .stderr
            .iter()
            .filter(|l| l.contains("does not see"))
            .collect();
        ensure!(
            blind.is_empty(),
            "blind spots with the unit's capabilities: {blind:?}"
        );
        let ev = wait_for_event(&file, send_one()?)?;
        let m = fs::metadata(&file)?;
        let pw = ok_stdout(Command::new("id").args(["-u", "udpmon"]))?;
        ensure!(
            m.uid().to_string() == pw.trim() && m.mode() & 0o777 == 0o640,
            "{}: uid {} mode {:o}, want udpmon's, 0640",
            file.display(),
            m.uid(),
            m.mode() & 0o777
        );
        println!("    event in {}: {ev}", file.display());

        let state = scratch.join("logrotate.state");
        let out = output(
            Command::new("logrotate")
                .args(["--force", "--verbose", "--state"])
                .arg(&state)
                .arg(LOGROTATE),
        )?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && !said.contains("error"),
            "logrotate {LOGROTATE}: {}: {said}",
            out.status
        );
        let rotated = PathBuf::from(format!("{}.1", file.display()));
        ensure!(
            rotated.is_file() && !file.exists(),
            "logrotate did not rotate {}: {said}",
            file.display()
        );
        // What `systemctl kill --signal=HUP udpmon.service` does in the rule's postrotate.
        r.signal(libc::SIGHUP)?;
        // The reopen creates the file; a datagram sent before that may rightly be reported
        // in the old one.
        let end = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            ensure!(
                Instant::now() < end,
                "no new {} within 20 s of SIGHUP: {}",
                file.display(),
                r.said()
            );
            thread::sleep(Duration::from_millis(50));
        }
        wait_for_event(&file, send_one()?).with_context(|| {
            format!(
                "after logrotate and SIGHUP, udpmon did not write to the new file: {}",
                r.said()
            )
        })?;
        Ok(())
    })();
    if let Err(e) = res {
        r.kill();
        return Err(e);
    }
    let status = r.stop(libc::SIGINT)?;
    ensure!(status.success(), "exit status {status}: {}", r.said());
    Ok(Outcome::Pass)
}

fn purge(installed: bool, files: &[PathBuf]) -> anyhow::Result<Outcome> {
    if !package_installed() {
        if installed {
            bail!("the package is gone before dpkg --purge");
        }
        return Ok(Outcome::Skip("the package was not installed".into()));
    }
    ok_stdout(Command::new("dpkg").args(["--purge", "udpmon"]))?;
    ensure!(
        !package_installed(),
        "dpkg still knows udpmon after --purge"
    );
    let mut left: Vec<PathBuf> = files.iter().filter(|f| f.exists()).cloned().collect();
    for p in [
        LOG_DIR,
        "/etc/systemd/system/multi-user.target.wants/udpmon.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/udpmon.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/udpmon.service",
        "/var/lib/systemd/deb-systemd-helper-masked/udpmon.service",
    ] {
        if Path::new(p).symlink_metadata().is_ok() {
            left.push(p.into());
        }
    }
    ensure!(left.is_empty(), "left after dpkg --purge: {left:?}");
    // Kept on purpose (postrm): a system user is not removed, Debian practice.
    if Command::new("getent")
        .args(["passwd", "udpmon"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("    the udpmon system user and group remain, as the postrm intends");
    }
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT_TEXT: &str = include_str!("../../packaging/udpmon.service");
    const DEFAULTS_TEXT: &str = include_str!("../../packaging/default");
    const LOGROTATE_TEXT: &str = include_str!("../../packaging/logrotate");

    /// The packaging files name the same places: the default --output is in the directory the
    /// unit makes writable, and the logrotate rule covers it. (The package tier checks the
    /// same on an installed package, as root; this runs anywhere.)
    #[test]
    fn packaging_files_agree() {
        let logs = unit_values(UNIT_TEXT, "LogsDirectory");
        assert_eq!(logs, ["udpmon"], "LogsDirectory=");
        assert_eq!(Path::new(LOG_DIR), Path::new("/var/log").join(&logs[0]));
        let file = output_file(&default_args(DEFAULTS_TEXT).unwrap()).unwrap();
        assert_eq!(
            file.parent(),
            Some(Path::new(LOG_DIR)),
            "{}",
            file.display()
        );
        let pattern = LOGROTATE_TEXT
            .lines()
            .find_map(|l| l.strip_suffix(" {"))
            .expect("a logrotate stanza");
        let (dir, ext) = pattern.split_once("/*").expect("a glob in {pattern}");
        assert!(
            file.parent() == Some(Path::new(dir)) && file.to_string_lossy().ends_with(ext),
            "{pattern} does not rotate {}",
            file.display()
        );
        assert!(
            unit_values(UNIT_TEXT, "ExecStart")
                .iter()
                .any(|v| v.ends_with(" $UDPMON_ARGS")),
            "ExecStart= does not take the defaults file's flags"
        );
    }

    #[test]
    fn the_last_udpmon_args_wins() {
        let args = default_args(
            "UDPMON_ARGS=\"-4\"\n#UDPMON_ARGS=\"-6\"\nUDPMON_ARGS=\"--format json -o /x\"\n",
        )
        .unwrap();
        assert_eq!(args, ["--format", "json", "-o", "/x"]);
        assert_eq!(output_file(&args).unwrap(), Path::new("/x"));
    }
}
