//! How udpmon behaves as a program: privileges, bad flags, signals, a closed stdout.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::UdpSocket,
    os::unix::{fs::symlink, process::CommandExt as _},
    path::Path,
    process::{Child, ChildStderr, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    harness::{
        Outcome, Strategy, TwoHosts, Udpmon, deadline, is, must_attach, need_tools, s,
        udp_socket_in, udpmon_bin, wait_until,
    },
    util::exit_summary,
};

/// These do not depend on the hook strategy: they run once, with tracepoint, or on a kernel
/// that lacks it, the first strategy the tier requires.
pub fn once(st: Strategy) -> Result<(), Outcome> {
    // Tracepoint where the tier requires it (everywhere but a kernel that lacks it, 5.10).
    let with = if must_attach(Strategy::Tracepoint) {
        Strategy::Tracepoint
    } else {
        *Strategy::ALL
            .iter()
            .find(|&&s| must_attach(s))
            .unwrap_or(&st)
    };
    if st == with {
        Ok(())
    } else {
        Err(Outcome::Skip(format!(
            "strategy-independent; runs once, with --hooks {}",
            with.name()
        )))
    }
}

/// Not root and without capabilities: one line naming what is missing, exit code 1, nothing
/// attached (the check comes before any BPF call).
pub fn unprivileged(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    // Switching from root to another uid clears the effective capabilities.
    let out = Command::new(udpmon_bin())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running udpmon as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.contains("run as root") && stderr.contains("CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    Outcome::Pass
}

/// A bad value: one line naming the flag, exit code 2.
pub fn bad_flag(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    for (args, flag) in [
        (&["--max-flows", "0"][..], "--max-flows"),
        (&["--silent-after", "soon"][..], "--silent-after"),
        (&["--hooks", "uprobe"][..], "--hooks"),
        (&["--peer", "10.0.0.0/33"][..], "--peer"),
    ] {
        let out = Command::new(udpmon_bin())
            .args(args)
            .output()
            .expect("running udpmon");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    Outcome::Pass
}

/// SIGINT detaches, prints what the ring buffer still holds, then the health summary on
/// stderr, and exits 0: datagrams sent right before the signal are still reported.
pub fn sigint(st: Strategy) -> Outcome {
    let u = Udpmon::start(st, &[]).expect("udpmon starts");
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let senders: Vec<UdpSocket> = (0..200)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    // One first datagram (a CONNECT each) from every sender, the signal right behind them.
    for tx in &senders {
        tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
    }
    let ports: Vec<String> = senders
        .iter()
        .map(|tx| tx.local_addr().unwrap().to_string())
        .collect();
    let (status, stderr, seen) = u.interrupt();
    assert!(status.success(), "exit status after SIGINT: {status}");
    let summary = exit_summary(&stderr);
    assert!(summary.contains("ring-buffer drops 0"), "{summary}");
    assert!(summary.contains("decode errors 0"), "{summary}");
    assert!(
        summary.contains("events left unread at exit 0"),
        "{summary}"
    );
    let printed = |local: &str| {
        seen.iter()
            .any(|v| is(v, "connect") && s(v, "local") == local)
    };
    let missing: Vec<&String> = ports.iter().filter(|p| !printed(p)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} CONNECTs missing after SIGINT, e.g. {:?}",
        missing.len(),
        ports.len(),
        missing.first()
    );
    Outcome::Pass
}

/// Reads a spawned udpmon's stderr (piped) until it says it is watching; the rest of it.
fn until_watching(child: &mut Child) -> BufReader<ChildStderr> {
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr piped"));
    let end = Instant::now() + deadline(60);
    let mut line = String::new();
    while !line.contains("watching UDP sockets") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "udpmon exited early"
        );
        assert!(Instant::now() < end, "udpmon not ready");
    }
    stderr
}

/// `udpmon | head -1`: when the reader goes away udpmon ends cleanly (exit 0, a note on
/// stderr), instead of dying of SIGPIPE or looping on write errors.
pub fn closed_stdout(st: Strategy) -> Outcome {
    let mut child = Command::new(udpmon_bin())
        .args(["--format", "json", "--hooks", st.name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning udpmon");
    let stderr = until_watching(&mut child);
    // Loopback traffic until one event line arrives; then the reader leaves.
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with('{'), "{first}");
    drop(out);
    // Each datagram to a new port is a new flow, so udpmon has lines to write.
    let mut port = 20000;
    wait_until("udpmon to exit after its stdout closed", 20, || {
        port += 1;
        let _ = tx.send_to(b"x", ("127.0.0.1", port));
        child.try_wait().unwrap().is_some()
    });
    let status = child.wait().unwrap();
    let rest: Vec<String> = stderr.lines().map_while(Result::ok).collect();
    assert!(status.success(), "exit status: {status}; stderr: {rest:?}");
    assert!(
        rest.iter().any(|l| l.starts_with("udpmon: output closed;")),
        "{rest:?}"
    );
    Outcome::Pass
}

/// Text times follow a change of the system's time zone within seconds, not when the
/// time-zone library's cache would expire (five minutes): TZ names a file that the test
/// repoints from UTC to UTC+5, as `timedatectl set-timezone` repoints /etc/localtime.
pub fn zone_change(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    let zoneinfo = Path::new("/usr/share/zoneinfo");
    let (utc, plus5) = (zoneinfo.join("UTC"), zoneinfo.join("Etc/GMT-5"));
    if !utc.exists() || !plus5.exists() {
        return Outcome::Skip("no tzdata: /usr/share/zoneinfo/{UTC,Etc/GMT-5} missing".into());
    }
    let dir = std::env::temp_dir().join(format!("udpmon-tz-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let zone = dir.join("localtime");
    symlink(&utc, &zone).unwrap();
    let mut child = Stopped(
        Command::new(udpmon_bin())
            .args(["--format", "text", "--hooks", st.name()])
            .env("TZ", &zone)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning udpmon"),
    );
    let child = &mut child.0;
    let _stderr = until_watching(child);
    let (tx, lines) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    // The offset from UTC, in whole minutes, of the time on the first line about a datagram
    // sent now from a new port.
    let offset_now = || -> i64 {
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = from.local_addr().unwrap().to_string();
        from.send_to(b"x", sink.local_addr().unwrap()).unwrap();
        let utc = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let line = loop {
            let l = lines
                .recv_timeout(deadline(10))
                .expect("a line about the datagram");
            if l.contains(&me) {
                break l;
            }
        };
        let hms: Vec<i64> = line[..8].split(':').map(|n| n.parse().unwrap()).collect();
        let [h, m, s] = hms[..] else {
            panic!("no HH:MM:SS at the start of {line:?}")
        };
        let diff = (h * 3600 + m * 60 + s - utc % 86_400 + 43_200).rem_euclid(86_400) - 43_200;
        (diff + 30).div_euclid(60) * 60
    };
    assert_eq!(offset_now(), 0, "times in UTC first");
    let next = dir.join("next");
    symlink(&plus5, &next).unwrap();
    fs::rename(&next, &zone).unwrap();
    wait_until("the times to be UTC+5", 10, || offset_now() == 5 * 3600);
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    let _ = fs::remove_dir_all(&dir);
    Outcome::Pass
}

/// A child that is killed when the test ends early, so that a failed scenario leaves no
/// udpmon attached for the ones after it.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `setpriv` running udpmon as nobody with exactly these capabilities (ambient, so that they
/// survive the change of user and the exec).
fn as_nobody_with(caps: &[&str]) -> Vec<String> {
    let list = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv".to_string(),
        "--reuid=65534".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
    ]
    .to_vec()
}

/// The systemd unit of the Debian package, compiled in: in the VMs the repository is absent.
const UNIT: &str = include_str!("../../../packaging/udpmon.service");

/// The capabilities a `Key=` of the unit grants, over all its lines.
fn unit_capabilities(key: &str) -> Vec<&'static str> {
    let caps: Vec<&str> = UNIT
        .lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        caps.iter().all(|c| c.starts_with("CAP_")),
        "packaging/udpmon.service: {key}= must be a plain list of CAP_ names: {caps:?}"
    );
    caps
}

/// Issue 12, point 5, and issue 13, point 3: as an unprivileged user with exactly the
/// capability set of the systemd unit (its `AmbientCapabilities=`, which must be its
/// `CapabilityBoundingSet=` and the set the README names, `udpmon::privileges::CAPABILITIES`),
/// udpmon sees what root sees: the owner and the network namespace of a socket that predates
/// it, held by another user (root) in a namespace of its own. With only the three capabilities
/// it needs to attach, it starts and says in one line, at the default log level, what it will
/// not see.
pub fn capabilities(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["setpriv"]) {
        return o;
    }
    let full = unit_capabilities("AmbientCapabilities");
    let sorted = |v: &[&'static str]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    assert_eq!(
        sorted(&full),
        sorted(&unit_capabilities("CapabilityBoundingSet")),
        "packaging/udpmon.service: ambient and bounding capabilities differ"
    );
    assert_eq!(
        sorted(&full),
        sorted(&udpmon::privileges::CAPABILITIES),
        "packaging/udpmon.service grants another set than udpmon documents"
    );
    // And its LimitMEMLOCK=infinity, without which kernels before 5.11 (they charge BPF maps to
    // RLIMIT_MEMLOCK) would want CAP_SYS_RESOURCE as well: set here, inherited through setpriv.
    assert!(
        UNIT.lines().any(|l| l.trim() == "LimitMEMLOCK=infinity"),
        "packaging/udpmon.service: LimitMEMLOCK=infinity is gone"
    );
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct it is given. Best effort: root without
    // CAP_SYS_RESOURCE (this project's hosts) cannot, and udpmon then says why if it must.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let h = TwoHosts::new("cp");
    let pre = udp_socket_in(&h.server, "10.200.0.2:7300");
    let mut u = Udpmon::start_under(&as_nobody_with(&full), st, &[]).expect("udpmon starts");
    let blind: Vec<&String> = u
        .stderr
        .iter()
        .filter(|l| l.contains("does not see"))
        .collect();
    assert!(blind.is_empty(), "with {full:?}: {blind:?}");
    let cli = udp_socket_in(&h.client, "10.200.0.1:7301");
    cli.send_to(b"caps", "10.200.0.2:7300").unwrap();
    let mut buf = [0u8; 8];
    pre.recv_from(&mut buf).unwrap();
    let a = u.wait_for("the accept on the socket that predates udpmon", |v| {
        is(v, "accept") && s(v, "local") == "10.200.0.2:7300" && s(v, "remote") == "10.200.0.1:7301"
    });
    assert_eq!(a["pid"], std::process::id(), "its owner: {a}");
    assert_eq!(a["cgroup"], own_cgroup(), "its owner's cgroup: {a}");
    assert_eq!(
        a["netns"],
        TwoHosts::netns_inode(&h.server),
        "its namespace: {a}"
    );
    let (status, _) = u.stop();
    assert!(status.success(), "exit status: {status}");
    // The minimum is that of the tracepoint strategy, which every kernel has: kprobes go
    // through perf_event_open, which some kernels (7.2) grant only with CAP_SYS_ADMIN.
    if st != Strategy::Tracepoint {
        return Outcome::Pass;
    }
    let minimum = &udpmon::privileges::CAPABILITIES[..3];
    let u = Udpmon::start_under(&as_nobody_with(minimum), st, &[])
        .expect("udpmon starts with the three capabilities it cannot do without");
    let blind: Vec<&String> = u
        .stderr
        .iter()
        .filter(|l| l.contains("does not see"))
        .collect();
    assert_eq!(blind.len(), 1, "one line: {:?}", u.stderr);
    assert!(
        blind[0].contains("WARN") && blind[0].contains("CAP_SYS_ADMIN"),
        "{}",
        blind[0]
    );
    Outcome::Pass
}

/// This process's cgroup v2 id (the inode of its directory), 0 without a cgroup v2 mount.
fn own_cgroup() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(mount) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
    }) else {
        return 0;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    std::fs::metadata(format!("{mount}{path}"))
        .unwrap_or_else(|e| panic!("{mount}{path}: {e}"))
        .ino()
}

/// `Type=notify`: READY=1 (with a STATUS naming the hooks) once the programs are attached and
/// events flow, STOPPING=1 on the way out, on the socket systemd names in NOTIFY_SOCKET.
pub fn notify_ready(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    use std::os::unix::net::UnixDatagram;
    let path = std::env::temp_dir().join(format!("udpmon-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(deadline(20))).unwrap();
    let wrapper = vec![
        "env".to_string(),
        format!("NOTIFY_SOCKET={}", path.display()),
    ];
    let u = Udpmon::start_under(&wrapper, st, &[]).expect("udpmon starts");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a READY=1 datagram");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    let status = format!("STATUS=watching UDP sockets (hooks: {})", st.name());
    assert!(msg.lines().any(|l| l == status), "{msg}");
    let (status, _) = u.stop();
    assert!(status.success(), "exit status: {status}");
    let n = sock.recv(&mut buf).expect("a STOPPING=1 datagram");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let _ = std::fs::remove_file(&path);
    Outcome::Pass
}
