//! Building blocks of the scenarios: network namespaces, udpmon as a child process with its
//! JSON events, real programs, and waiting for conditions with deadlines.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::UdpSocket,
    os::fd::AsRawFd as _,
    panic,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub enum Outcome {
    Pass,
    Skip(String),
}

/// Whether a health warning of udpmon's says it lost kernel records (a record the scenario
/// waits for may be among them), as opposed to what it folds by design (rate limits).
fn lost_records(stderr_line: &str) -> bool {
    stderr_line.contains("events lost:")
        && [
            "ring-buffer drops",
            "decode errors",
            "flow-map insert failures",
            "program runs skipped by the kernel",
            "kprobe hits missed",
        ]
        .iter()
        .any(|cause| stderr_line.contains(cause))
}

/// A scenario that cannot be judged: an event it waits for never came, and udpmon reported
/// meanwhile that it lost records (the kernel skipped program runs, the ring was full). The
/// event may be one of those, so the runner runs the scenario once more, and the second run
/// is judged in full. Raised with `panic_any` from [`Udpmon::wait_for`]. Any other failure of
/// a run in which udpmon said it lost records ([`take_lost`]) is rerun the same way: a lost
/// connect() record makes the first datagram the CONNECT, a lost close leaves a CLOSE to the
/// dump of open sockets.
pub struct Inconclusive(pub String);

/// How long, in host seconds (see [`deadline`]), [`Udpmon::wait_for`] still waits once udpmon
/// has reported lost records. The slowest passing scenario's whole run is under 20 VM seconds.
const LOSS_GRACE: u64 = 5;

/// The hook strategies, and their `--hooks` names, as udpmon itself defines them.
pub use udpmon::probes::Strategy;

pub struct Scenario {
    pub name: &'static str,
    pub run: fn(Strategy) -> Outcome,
}

/// Software-emulated VMs are an order of magnitude slower than the host.
pub fn slow() -> u32 {
    if std::env::var("UDPMON_TIER").is_ok_and(|t| t.starts_with("vm")) {
        10
    } else {
        1
    }
}

pub fn deadline(secs: u64) -> Duration {
    Duration::from_secs(secs * slow() as u64)
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub fn udpmon_bin() -> PathBuf {
    std::env::var_os("UDPMON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_udpmon")))
}

/// The tier these scenarios run on: `host`, or `vm-<kernel series>`.
pub fn tier() -> String {
    std::env::var("UDPMON_TIER").unwrap_or_else(|_| "host".into())
}

/// `(major, minor)` of the running kernel.
fn kernel_version() -> (u32, u32) {
    let r = kernel_release();
    let mut nums = r
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

/// Which strategies must attach on each tier (issue 12, point 8). This machine's kernel (the
/// host tier) refuses fentry programs and has no kprobes, so only tracepoint is required
/// there (the others run when a host allows them); every VM kernel of the matrix has all
/// three but what [`VM_LACKS`] lists. A required strategy that does not attach fails its
/// scenarios.
pub fn must_attach(st: Strategy) -> bool {
    if tier().starts_with("vm-") {
        !VM_LACKS.iter().any(|&(t, s, _)| t == tier() && s == st)
    } else {
        st == Strategy::Tracepoint
    }
}

/// The strategies a VM kernel of the matrix truly lacks, and why (udpmon refuses them there).
const VM_LACKS: &[(&str, Strategy, &str)] = &[(
    "vm-5.10",
    Strategy::Tracepoint,
    "no inet_sk_error_report tracepoint before 5.14, its only source of ICMP verdicts",
)];

/// Whether failed sends and receives are reported (APP-ERROR) with this strategy on this
/// kernel: the tracepoint strategy takes them from sock_send_length / sock_recv_length,
/// which kernels before 6.3 lack; fexit and kretprobe see them everywhere.
pub fn app_errors_expected(st: Strategy) -> bool {
    st != Strategy::Tracepoint || kernel_version() >= (6, 3)
}

/// Whether a process that receives a socket over a unix socket is named from then on, before
/// it uses it: fentry and kprobe hook `security_file_receive`; the tracepoint strategy has no
/// such hook.
pub fn passes_followed(st: Strategy) -> bool {
    st != Strategy::Tracepoint
}

/// Whether datagrams to closed local ports are reported (REFUSED): they are told apart by
/// kfree_skb's drop reason, which kernels before 5.17 lack.
pub fn refused_expected() -> bool {
    kernel_version() >= (5, 17)
}

/// Whether udpmon's message `l` says the kernel's verifier refused one of its programs.
pub fn verifier_refused(l: &str) -> bool {
    l.contains("refused by the kernel's verifier")
}

/// Whether udpmon can attach this strategy here: start it and see.
pub fn strategy_available(st: Strategy) -> Result<(), String> {
    match Udpmon::start(st, &[]) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "strategy {} unavailable on {}: {e}",
            st.name(),
            kernel_release()
        )),
    }
}

/// Skips the scenario unless every tool is on PATH.
pub fn need_tools(tools: &[&str]) -> Result<(), Outcome> {
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).exists()))
            .unwrap_or(false);
        if !found {
            return Err(Outcome::Skip(format!("{t} is not installed")));
        }
    }
    Ok(())
}

/// udpmon running with `--format json`; its events arrive on a channel.
pub struct Udpmon {
    child: Child,
    strategy: Strategy,
    rx: mpsc::Receiver<Line>,
    pub seen: Vec<Value>,
    pub stderr: Vec<String>,
}

enum Line {
    Out(String),
    Err(String),
}

impl Udpmon {
    /// Starts udpmon and waits until it says it is attached (or exits).
    pub fn start(st: Strategy, extra: &[&str]) -> Result<Udpmon, String> {
        Self::start_under(&[], st, extra)
    }

    /// As [`Udpmon::start`], through a wrapper command (`setpriv ...`) that runs udpmon.
    pub fn start_under(wrapper: &[String], st: Strategy, extra: &[&str]) -> Result<Udpmon, String> {
        // What a failed scenario's udpmon owed is not this one's.
        SHORT.set(0);
        let bin = udpmon_bin();
        let mut cmd = match wrapper.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .args(["--format", "json", "--hooks", st.name()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(Line::Out(l)).is_err() {
                    break;
                }
            }
        });
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(Line::Err(l)).is_err() {
                    break;
                }
            }
        });
        let mut u = Udpmon {
            child,
            strategy: st,
            rx,
            seen: Vec::new(),
            stderr: Vec::new(),
        };
        let end = Instant::now() + deadline(60);
        loop {
            if u.stderr.iter().any(|l| l.contains("watching UDP sockets")) {
                // An optional hook only warns when it does not load, which is right for a
                // kernel that lacks it, but a program the verifier refuses is a regression
                // that would otherwise show only as a missing event somewhere.
                if let Some(l) = u.stderr.iter().find(|l| verifier_refused(l)) {
                    return Err(format!("udpmon attached, but {l}"));
                }
                return Ok(u);
            }
            if let Ok(Some(status)) = u.child.try_wait() {
                u.drain(Duration::from_millis(200));
                return Err(format!(
                    "udpmon exited ({status}): {}",
                    u.stderr.join(" / ")
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "udpmon not ready after {:?}: {}",
                    deadline(60),
                    u.stderr.join(" / ")
                ));
            }
            u.drain(Duration::from_millis(100));
        }
    }

    fn take(&mut self, line: Line) {
        match line {
            Line::Out(l) => match serde_json::from_str::<Value>(&l) {
                Ok(v) => self.seen.push(v),
                Err(e) => panic!("udpmon printed a line that is not JSON ({e}): {l}"),
            },
            Line::Err(l) => self.take_stderr(l),
        }
    }

    /// Asserts nothing: it also serves a failed scenario while it unwinds, where a panic
    /// aborts the whole run.
    fn take_stderr(&mut self, l: String) {
        let _ = writeln!(std::io::stderr(), "  [udpmon] {l}");
        let lost = lost_records(&l)
            || (l.contains("udpmon: stopped;")
                && crate::util::summary_losses(&l).is_some_and(|n| n > 0));
        if lost {
            LOST.with_borrow_mut(|first| _ = first.get_or_insert_with(|| l.clone()));
        }
        self.stderr.push(l);
    }

    /// After a failure: udpmon's stderr until it has exited and both pipes ended, or `end`.
    /// Its events are not looked at, nor is anything asserted (see [`Self::take_stderr`]).
    fn drain_after_failure(&mut self, end: Instant) {
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(Line::Err(l)) => self.take_stderr(l),
                Ok(Line::Out(_)) => {}
                // Both pipes ended, or the time is up.
                Err(_) => return,
            }
        }
    }

    fn drain(&mut self, wait: Duration) {
        let end = Instant::now() + wait;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(_) => break,
            }
        }
    }

    /// Waits until an event matching `pred` has been printed; returns it.
    ///
    /// Once udpmon has said it lost records, the wait is cut to [`LOSS_GRACE`]: the event may
    /// be among them, and the scenario is then rerun (see [`Inconclusive`]) instead of waiting
    /// out the whole deadline for a record that is gone.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        let mut end = start + deadline(20);
        let mut lost: Option<String> = None;
        loop {
            if let Some(v) = self.seen.iter().find(|v| pred(v)) {
                return v.clone();
            }
            if lost.is_none() {
                lost = self.stderr.iter().find(|l| lost_records(l)).cloned();
                if lost.is_some() {
                    end = end.min(Instant::now() + deadline(LOSS_GRACE));
                }
            }
            if Instant::now() > end {
                let missing = format!("no {what} event within {:?}", start.elapsed());
                if let Some(lost) = lost {
                    panic::panic_any(Inconclusive(format!(
                        "{missing}, and udpmon reported {lost:?}"
                    )));
                }
                panic!("{missing}; udpmon printed:\n{}", self.dump());
            }
            self.drain(Duration::from_millis(100));
        }
    }

    /// Whether this kernel cannot give udpmon APP-ERROR with its strategy (from the tier
    /// table, [`app_errors_expected`]); scenarios then expect exactly that absence. udpmon must
    /// have said so at startup, and only then.
    pub fn without_app_errors(&self) -> bool {
        let without = !app_errors_expected(self.strategy);
        let said = self
            .stderr
            .iter()
            .any(|l| l.contains("not reported as APP-ERROR"));
        assert_eq!(
            said,
            without,
            "udpmon's startup warnings disagree with what kernel {} offers the {} strategy: {:?}",
            kernel_release(),
            self.strategy.name(),
            self.stderr
        );
        without
    }

    /// Whether this kernel cannot give udpmon REFUSED (from the tier table,
    /// [`refused_expected`]); as for [`Self::without_app_errors`], udpmon must have said so at
    /// startup, and only then.
    pub fn without_refused(&self) -> bool {
        let without = !refused_expected();
        let said = self
            .stderr
            .iter()
            .any(|l| l.contains("(REFUSED) are not reported"));
        assert_eq!(
            said,
            without,
            "udpmon's startup warnings disagree with what kernel {} offers: {:?}",
            kernel_release(),
            self.stderr
        );
        without
    }

    /// Waits until udpmon has written a line matching `pred` on stderr; returns it.
    pub fn wait_for_stderr(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.stderr_within(deadline(20), pred).unwrap_or_else(|| {
            panic!(
                "udpmon wrote no {what} on stderr within {:?}: {:?}",
                deadline(20),
                self.stderr
            )
        })
    }

    /// The first line udpmon wrote on stderr matching `pred`, waited for up to `wait`.
    pub fn stderr_within(&mut self, wait: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + wait;
        loop {
            if let Some(l) = self.stderr.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() >= end {
                return None;
            }
            self.drain(Duration::from_millis(100));
        }
    }

    /// Sends a signal and returns at once (udpmon is expected to go on).
    pub fn kill(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Whether udpmon is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// All events so far that match `pred`, in output order.
    pub fn all(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.drain(Duration::from_millis(50));
        self.seen.iter().filter(|v| pred(v)).cloned().collect()
    }

    pub fn dump(&self) -> String {
        self.seen
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM, then the exit status and the rest of the output.
    pub fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = self.signal(libc::SIGTERM);
        (status, self.stderr.clone())
    }

    /// SIGINT (^C), then the exit status, stderr and every event printed, to the last.
    pub fn interrupt(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<Value>) {
        let status = self.signal(libc::SIGINT);
        (status, self.stderr.clone(), std::mem::take(&mut self.seen))
    }

    fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let end = Instant::now() + deadline(20);
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            assert!(
                Instant::now() < end,
                "udpmon did not exit after signal {sig}"
            );
            self.drain(Duration::from_millis(50));
        };
        self.drain_to_end();
        self.settle();
        status
    }

    /// After udpmon's exit summary: the CLOSE counts asserted short must be covered by what
    /// it reported lost.
    fn settle(&mut self) {
        let short = SHORT.take();
        if short > 0 {
            let lost = crate::util::losses(&self.stderr);
            assert!(
                short <= lost,
                "CLOSE counts short of {short} datagram(s), but udpmon reported only {lost} lost: {:?}",
                self.stderr
            );
        }
    }

    /// After udpmon exited: everything it wrote, up to the end of both pipes (a fixed wait
    /// can end before a slow VM has delivered the last lines, the exit summary among them).
    fn drain_to_end(&mut self) {
        let end = Instant::now() + deadline(20);
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        panic!(
            "udpmon's output did not end within {:?} of its exit",
            deadline(20)
        );
    }
}

thread_local! {
    /// Datagrams the CLOSEs asserted so far were short of (`util::assert_close`), which the
    /// running udpmon must have reported lost by its exit.
    static SHORT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The first thing a udpmon of the scenario running said about records it lost: a
    /// warning, or an exit summary with losses in it.
    static LOST: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// What udpmon said it lost during the scenario run since the last call, if anything; see
/// [`Inconclusive`] for why the runner asks.
pub fn take_lost() -> Option<String> {
    LOST.take()
}

/// Counts asserted short by `short` datagrams: the running udpmon owes a loss report.
pub fn owe_short(short: u64) {
    SHORT.set(SHORT.get() + short);
}

impl Drop for Udpmon {
    fn drop(&mut self) {
        // Short counts are settled against the exit summary, so udpmon must print it.
        if SHORT.get() > 0 && !std::thread::panicking() {
            if self.running() {
                self.signal(libc::SIGINT);
            } else {
                self.drain_to_end();
                self.settle();
            }
            return;
        }
        // A failed scenario: udpmon's exit summary tells the runner whether it lost records
        // (`take_lost`).
        if std::thread::panicking() {
            if self.running() {
                // SAFETY: kill on our own child's pid.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            }
            self.drain_after_failure(Instant::now() + deadline(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two network namespaces ("client" and "server") joined by a veth pair:
/// 10.200.0.1/24 + fd00:200::1/64 and 10.200.0.2/24 + fd00:200::2/64. ICMP rate limits are
/// off on both sides (KERNEL.md §7) so that every error the tests provoke is sent.
pub struct TwoHosts {
    pub client: String,
    pub server: String,
}

pub const CLIENT4: &str = "10.200.0.1";
pub const SERVER4: &str = "10.200.0.2";
pub const CLIENT6: &str = "fd00:200::1";
pub const SERVER6: &str = "fd00:200::2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TwoHosts {
    pub fn new(tag: &str) -> TwoHosts {
        let id = std::process::id();
        let h = TwoHosts {
            client: format!("um{tag}{id}c"),
            server: format!("um{tag}{id}s"),
        };
        let (c, s) = (h.client.as_str(), h.server.as_str());
        ip(&["netns", "add", c]);
        ip(&["netns", "add", s]);
        ip(&[
            "link", "add", "vc", "netns", c, "type", "veth", "peer", "name", "vs", "netns", s,
        ]);
        ip(&["-n", c, "addr", "add", "10.200.0.1/24", "dev", "vc"]);
        ip(&["-n", s, "addr", "add", "10.200.0.2/24", "dev", "vs"]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            "fd00:200::1/64",
            "dev",
            "vc",
            "nodad",
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            "fd00:200::2/64",
            "dev",
            "vs",
            "nodad",
        ]);
        for (n, dev) in [(c, "vc"), (s, "vs")] {
            ip(&["-n", n, "link", "set", "lo", "up"]);
            ip(&["-n", n, "link", "set", dev, "up"]);
            in_netns(n, || {
                for (k, v) in [
                    ("net/ipv4/icmp_ratelimit", "0"),
                    ("net/ipv4/icmp_ratemask", "0"),
                    ("net/ipv6/icmp/ratelimit", "0"),
                ] {
                    fs::write(format!("/proc/sys/{k}"), v).expect("setting ICMP rate limits");
                }
            });
        }
        h
    }

    pub fn netns_inode(name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(format!("/run/netns/{name}"))
            .expect("netns file")
            .ino()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for n in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a thread that has joined network namespace `name`. Sockets created there stay
/// in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    in_netns_at(format!("/run/netns/{name}"), f)
}

/// [`in_netns`], for the namespace at `path` (`/proc/PID/ns/net`).
pub fn in_netns_at<T: Send + 'static>(path: String, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only, with a valid fd.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A UDP socket created in a namespace.
pub fn udp_socket_in(netns: &str, bind: &str) -> UdpSocket {
    let bind = bind.to_string();
    in_netns(netns, move || UdpSocket::bind(&bind).expect("bind"))
}

/// A program started with `ip netns exec`, so that its pid and comm are its own.
pub fn spawn_in(netns: &str, prog: &str, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", netns, prog])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {prog}: {e}"))
}

/// Waits for a condition, polling, up to `secs` (scaled for slow VMs).
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads one line from a child's stdout, with a deadline.
pub fn read_line(child: &mut Child, secs: u64) -> String {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut l = String::new();
        let _ = r.read_line(&mut l);
        let _ = tx.send((l, r.into_inner()));
    });
    let (line, out) = rx
        .recv_timeout(deadline(secs))
        .expect("no line from the child in time");
    child.stdout = Some(out);
    line
}

/// Field accessors for udpmon's JSON events.
pub fn is(v: &Value, event: &str) -> bool {
    v["event"] == event
}
pub fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}
