//! Issue 12, point 1: every event names the process that holds the socket when it happens,
//! and "unknown" (pid 0) where udpmon cannot know, never a pid that no longer holds it.
//!
//! The programs that hand sockets over are this test binary itself, run again with `--role`
//! (see [`role`]): a daemon that binds, forks and lets its parent exit, and two processes
//! that pass a socket over a unix socket (SCM_RIGHTS). The VM tiers have no Python or Perl,
//! and forking inside the multi-threaded test runner would be unsafe.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::UdpSocket,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, RawFd},
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram},
        unix::process::CommandExt as _,
    },
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use serde_json::Value;

use crate::harness::{Outcome, Strategy, Udpmon, deadline, is, passes_followed, s};

/// A helper program started with `--role`, driven a line at a time.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn start(args: &[&str]) -> Helper {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .arg("--role")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the helper starts");
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Helper {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line, which must start with `word`; the number after it.
    fn expect(&mut self, word: &str) -> u64 {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the helper");
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some(word), "the helper said {line:?}");
        parts.next().and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// The next line, which must be `word` and two numbers.
    fn expect2(&mut self, word: &str) -> (u64, u16) {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the helper");
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [w, a, b] if *w == word => (a.parse().expect("a number"), b.parse().expect("a port")),
            _ => panic!("the helper said {line:?}, not {word} and two numbers"),
        }
    }

    /// Tells the helper (or, after a fork, its child) to do `what`; waits until it has.
    fn tell(&mut self, what: &str) {
        writeln!(self.stdin, "{what}").expect("writing to the helper");
        self.expect("done");
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peer() -> (UdpSocket, String) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(deadline(10))).unwrap();
    let addr = peer.local_addr().unwrap().to_string();
    (peer, addr)
}

/// Receives one datagram on `peer`: its payload and sender.
fn receive(peer: &UdpSocket) -> (String, std::net::SocketAddr) {
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).expect("the datagram arrives");
    (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
}

fn pid(v: &Value) -> u64 {
    v["pid"].as_u64().unwrap_or(u64::MAX)
}

/// The classic daemon: bind and connect, fork, parent exits, the child keeps the socket.
/// After the parent's exit and before the child uses the socket, udpmon cannot know who holds
/// it: unknown. Once the child sends, the child.
pub fn double_fork(st: Strategy) -> Outcome {
    let fast = ["--silent-after", "1s", "--silent-min-sends", "1"];
    let mut u = Udpmon::start(st, &fast).expect("udpmon starts");
    let (peer, peer_addr) = peer();
    let mut d = Helper::start(&["daemon", &peer_addr, "exit"]);
    let parent = d.expect("parent");
    let child = d.expect("child");
    assert!(d.child.wait().expect("the parent exits").success());
    let (hello, local) = receive(&peer);
    assert_eq!(hello, "hello");
    let connect = u.wait_for("the parent's connect", |v| {
        is(v, "connect") && s(v, "remote") == peer_addr && pid(v) == parent
    });
    let cookie = connect["cookie"].clone();
    // The parent has exited: the peer's answer is heard by a socket nobody used since.
    peer.send_to(b"answer", local).unwrap();
    let est = u.wait_for("the establish", |v| {
        is(v, "establish") && v["cookie"] == cookie
    });
    assert_eq!(pid(&est), 0, "the exited parent is no owner: {est}");
    assert_eq!((s(&est, "comm"), s(&est, "process")), ("", ""), "{est}");
    d.tell("send");
    assert_eq!(receive(&peer).0, "x");
    // Unanswered: a SILENT, made on udpmon's own timer from what it was told of the holder.
    let silent = u.wait_for("the silent", |v| is(v, "silent") && v["cookie"] == cookie);
    assert_eq!(pid(&silent), child, "{silent}");
    drop(peer);
    // Port unreachable, in softirq: named after what udpmon knows of the holder.
    d.tell("send");
    let un = u.wait_for("the unreachable", |v| {
        is(v, "unreachable") && v["cookie"] == cookie
    });
    assert_eq!(pid(&un), child, "{un}");
    d.tell("exit");
    let close = u.wait_for("the close", |v| is(v, "close") && v["cookie"] == cookie);
    assert_eq!(pid(&close), child, "the close runs in the child: {close}");
    no_stale(&mut u, &cookie, parent, &connect);
    Outcome::Pass
}

/// The daemon's parent exits and its child holds the socket without using it: nothing of the
/// socket's own tells who holds it, so the flow's idle CLOSE, which udpmon makes on its own
/// timer, names no one rather than the exited parent.
pub fn exit_then_idle(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &["--idle-timeout", "2s"]).expect("udpmon starts");
    let (peer, peer_addr) = peer();
    let mut d = Helper::start(&["daemon", &peer_addr, "exit"]);
    let parent = d.expect("parent");
    d.expect("child");
    assert!(d.child.wait().expect("the parent exits").success());
    assert_eq!(receive(&peer).0, "hello");
    let connect = u.wait_for("the parent's connect", |v| {
        is(v, "connect") && s(v, "remote") == peer_addr && pid(v) == parent
    });
    let cookie = connect["cookie"].clone();
    let close = u.wait_for("the idle close", |v| {
        is(v, "close") && v["cookie"] == cookie
    });
    assert_eq!(s(&close, "reason"), "idle", "{close}");
    assert_eq!(
        pid(&close),
        0,
        "the exited parent {parent} is no owner: {close}"
    );
    assert_eq!(
        (s(&close, "comm"), s(&close, "process")),
        ("", ""),
        "{close}"
    );
    assert_eq!(
        close["cgroup"], connect["cgroup"],
        "the cgroup is kept: {close}"
    );
    d.tell("exit");
    Outcome::Pass
}

/// A socket older than udpmon, held by a daemon's parent and child: the startup scan names
/// one of them (the parent: the scan keeps the first holder in /proc's order), and once that
/// one exits, events name the child or nobody, never the exited parent.
pub fn preexisting(st: Strategy) -> Outcome {
    let (peer, peer_addr) = peer();
    let mut d = Helper::start(&["daemon", &peer_addr, "linger"]);
    let parent = d.expect("parent");
    let child = d.expect("child");
    let (hello, local) = receive(&peer);
    assert_eq!(hello, "hello");
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // A new peer, heard in softirq: named after what udpmon knows of the holder.
    let (other, other_addr) = self::peer();
    other.send_to(b"hi", local).unwrap();
    let heard = u.wait_for("the new peer's accept", |v| {
        is(v, "accept") && s(v, "remote") == other_addr && s(v, "local") == local.to_string()
    });
    assert!(
        pid(&heard) == 0 || pid(&heard) == child,
        "the exited parent {parent} is no owner: {heard}"
    );
    let cookie = heard["cookie"].clone();
    // The tracepoint strategy notes the holder as the call returns: after what a loopback
    // send's own ICMP error reports, so one send first.
    d.tell("send");
    assert_eq!(receive(&peer).0, "x");
    drop(peer);
    d.tell("send");
    let un = u.wait_for("the unreachable", |v| {
        is(v, "unreachable") && v["cookie"] == cookie
    });
    assert_eq!(pid(&un), child, "{un}");
    no_stale(&mut u, &cookie, parent, &heard);
    Outcome::Pass
}

/// A socket handed over: the giver binds, connects to a fresh peer and sends "hello", passes
/// the socket to the taker over a unix socket and closes its descriptor (`close`) or keeps it
/// (`keep`); udpmon has printed the giver's CONNECT.
struct Passed {
    taker: Helper,
    taker_pid: u64,
    giver: Helper,
    giver_pid: u64,
    peer: UdpSocket,
    /// The socket's local address, as the peer saw it.
    local: std::net::SocketAddr,
    connect: Value,
    cookie: Value,
}

impl Passed {
    fn new(u: &mut Udpmon, st: Strategy, tag: &str, mode: &str) -> Passed {
        let (peer, peer_addr) = peer();
        let name = format!("udpmon-test-{tag}-{}-{}", std::process::id(), st.name());
        let mut taker = Helper::start(&["take", &name]);
        let taker_pid = taker.expect("ready");
        let mut giver = Helper::start(&["give", &peer_addr, &name, mode]);
        let giver_pid = giver.expect("passed");
        taker.expect("got");
        let (hello, local) = receive(&peer);
        assert_eq!(hello, "hello");
        let connect = u.wait_for("the giver's connect", |v| {
            is(v, "connect") && s(v, "remote") == peer_addr && pid(v) == giver_pid
        });
        let cookie = connect["cookie"].clone();
        Passed {
            taker,
            taker_pid,
            giver,
            giver_pid,
            peer,
            local,
            connect,
            cookie,
        }
    }
}

/// A socket passed over a unix socket and closed by its sender: events name the receiver
/// from the moment it receives it (where the strategy hooks that), else from its first use.
pub fn fd_passing(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let Passed {
        mut taker,
        taker_pid,
        mut giver,
        giver_pid,
        peer,
        local,
        connect,
        cookie,
    } = Passed::new(&mut u, st, "pass", "close");
    // Passed, not used yet: heard in softirq.
    peer.send_to(b"answer", local).unwrap();
    let est = u.wait_for("the establish", |v| {
        is(v, "establish") && v["cookie"] == cookie
    });
    let expected = if passes_followed(st) {
        taker_pid
    } else {
        giver_pid
    };
    assert_eq!(pid(&est), expected, "{est}");
    taker.tell("send");
    assert_eq!(receive(&peer).0, "x");
    drop(peer);
    taker.tell("send");
    let un = u.wait_for("the unreachable", |v| {
        is(v, "unreachable") && v["cookie"] == cookie
    });
    assert_eq!(pid(&un), taker_pid, "{un}");
    giver.tell("exit");
    assert!(giver.child.wait().expect("the giver exits").success());
    taker.tell("exit");
    let close = u.wait_for("the close", |v| is(v, "close") && v["cookie"] == cookie);
    assert_eq!(
        pid(&close),
        taker_pid,
        "the close runs in the taker: {close}"
    );
    let handed_over = if passes_followed(st) { &connect } else { &est };
    no_stale(&mut u, &cookie, giver_pid, handed_over);
    Outcome::Pass
}

/// A socket passed over a unix socket and closed by its sender, whose receiver only ever
/// receives: once it has received (recvfrom), what udpmon reports on its own timer (the idle
/// CLOSE) names the receiver, on every strategy: where none hooks the receive call itself
/// (the tracepoint strategy before 6.3), the cgroup recvmsg hook does.
pub fn passed_receiver(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &["--idle-timeout", "2s"]).expect("udpmon starts");
    let Passed {
        mut taker,
        taker_pid,
        peer,
        local,
        cookie,
        ..
    } = Passed::new(&mut u, st, "recv", "close");
    writeln!(taker.stdin, "recv").expect("writing to the taker");
    peer.send_to(b"answer", local).unwrap();
    taker.expect("done");
    // The flow that heard the answer (on a slow machine an earlier one may have expired
    // before the answer came).
    let close = u.wait_for("the idle close", |v| {
        is(v, "close") && v["cookie"] == cookie && v["stats"]["rx_datagrams"].as_u64() >= Some(1)
    });
    assert_eq!(s(&close, "reason"), "idle", "{close}");
    assert_eq!(pid(&close), taker_pid, "the receiver holds it: {close}");
    Outcome::Pass
}

/// A process that execs another program keeps its sockets: the reports udpmon makes on its
/// own timer and the events from softirq name the program it runs now, not the one that
/// opened the socket.
pub fn exec(st: Strategy) -> Outcome {
    // The flow's idle CLOSE comes before any event of the socket's after the exec.
    let mut u = Udpmon::start(st, &["--idle-timeout", "2s"]).expect("udpmon starts");
    let (peer, peer_addr) = peer();
    // exec sets the process's name from the file name it was given: a link to this binary.
    let dir = std::env::temp_dir().join(format!("udpmon-exec-{}-{}", std::process::id(), st));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("renamed-holder");
    std::os::unix::fs::symlink(std::env::current_exe().unwrap(), &link).unwrap();
    let mut h = Helper::start(&["exec", &peer_addr, link.to_str().unwrap()]);
    let before = h.expect("before");
    assert_eq!(h.expect("execd"), before, "exec keeps the pid");
    let (hello, local) = receive(&peer);
    assert_eq!(hello, "hello");
    let connect = u.wait_for("the connect", |v| {
        is(v, "connect") && s(v, "remote") == peer_addr && pid(v) == before
    });
    assert_ne!(s(&connect, "process"), "renamed-holder", "{connect}");
    let cookie = connect["cookie"].clone();
    let idle = u.wait_for("the idle close", |v| {
        is(v, "close") && v["cookie"] == cookie
    });
    assert_eq!(s(&idle, "reason"), "idle", "{idle}");
    let renamed = |v: &Value| {
        assert_eq!(pid(v), before, "{v}");
        assert_eq!(
            (s(v, "comm"), s(v, "process")),
            ("renamed-holder", "renamed-holder"),
            "{v}"
        );
    };
    renamed(&idle);
    // The answer opens the flow anew, heard in softirq.
    peer.send_to(b"answer", local).unwrap();
    let heard = u.wait_for("the answer", |v| {
        v["cookie"] == cookie && s(v, "ts") > s(&idle, "ts")
    });
    renamed(&heard);
    h.tell("exit");
    let _ = std::fs::remove_dir_all(&dir);
    Outcome::Pass
}

/// systemd's socket activation: a manager binds the socket and keeps it; the service it
/// starts (fork, exec) gets it as descriptor 3 and answers. A peer's first datagram, heard in
/// softirq, names one of the two (which one depends on whether the strategy hooked the
/// service's waiting receive call before the datagram came); from the answer on, every event
/// names the service, under its own program's name.
pub fn socket_activation(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let dir = std::env::temp_dir().join(format!("udpmon-act-{}-{}", std::process::id(), st));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("activated-srv");
    std::os::unix::fs::symlink(std::env::current_exe().unwrap(), &link).unwrap();
    let mut h = Helper::start(&["activate", link.to_str().unwrap()]);
    let (manager, port) = h.expect2("manager");
    let service = h.expect("activated");
    let server = format!("127.0.0.1:{port}");
    let (client, client_addr) = peer();
    client.send_to(b"q", &server).unwrap();
    assert_eq!(
        receive(&client).0,
        service.to_string(),
        "the service answers"
    );
    let accept = u.wait_for("the accept", |v| {
        is(v, "accept") && s(v, "local") == server && s(v, "remote") == client_addr
    });
    assert!(
        [manager, service].contains(&pid(&accept)),
        "the manager {manager} or the service {service}: {accept}"
    );
    let cookie = accept["cookie"].clone();
    let est = u.wait_for("the establish", |v| {
        is(v, "establish") && v["cookie"] == cookie
    });
    assert_eq!(pid(&est), service, "{est}");
    assert_eq!(s(&est, "process"), "activated-srv", "{est}");
    // A second peer is heard by a socket whose holder udpmon now knows.
    let (other, other_addr) = peer();
    other.send_to(b"q", &server).unwrap();
    assert_eq!(receive(&other).0, service.to_string());
    let accept2 = u.wait_for("the second accept", |v| {
        is(v, "accept") && v["cookie"] == cookie && s(v, "remote") == other_addr
    });
    assert_eq!(pid(&accept2), service, "{accept2}");
    no_stale(&mut u, &cookie, manager, &est);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
    Outcome::Pass
}

/// An SO_REUSEPORT group: two processes each bind the same port; every peer's events name the
/// process whose socket the kernel gave it to (the one that answered it), never the other.
pub fn reuseport_group(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let mut a = Helper::start(&["reuseport", "0"]);
    let (pid_a, port) = a.expect2("bound");
    let mut b = Helper::start(&["reuseport", &port.to_string()]);
    let (pid_b, port_b) = b.expect2("bound");
    assert_eq!(port_b, port);
    let server = format!("127.0.0.1:{port}");
    // Fresh client ports until both members have answered (the kernel spreads peers by a
    // hash of their addresses), within a bound.
    let mut answered = Vec::new();
    for _ in 0..64 {
        let (client, client_addr) = peer();
        client.send_to(b"q", &server).unwrap();
        let by: u64 = receive(&client).0.parse().expect("a pid");
        answered.push((client_addr, by));
        if [pid_a, pid_b]
            .iter()
            .all(|p| answered.iter().any(|(_, by)| by == p))
        {
            break;
        }
    }
    assert!(
        [pid_a, pid_b]
            .iter()
            .all(|p| answered.iter().any(|(_, by)| by == p)),
        "both members answered some of the {} peers: {answered:?}",
        answered.len()
    );
    for (client, by) in &answered {
        let accept = u.wait_for("a member's accept", |v| {
            is(v, "accept") && s(v, "local") == server && s(v, "remote") == client
        });
        assert_eq!(pid(&accept), *by, "{client} was answered by {by}: {accept}");
        let est = u.wait_for("a member's establish", |v| {
            is(v, "establish") && v["cookie"] == accept["cookie"] && s(v, "remote") == client
        });
        assert_eq!(pid(&est), *by, "{est}");
    }
    Outcome::Pass
}

/// A socket that two processes use (a passed descriptor the sender keeps; pre-forked workers
/// alike): when the one udpmon last saw take it exits, the other is named again from its
/// next call, though it called before and was not seen to take the socket over then.
pub fn shared(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    // The giver calls from CPU 0 only, everything else here from CPU 1: its note there stays
    // the one it took before the hand-over (where the machine has two CPUs).
    let _pinned = Pinned::to(1);
    let Passed {
        mut taker,
        mut giver,
        giver_pid,
        peer,
        cookie,
        ..
    } = Passed::new(&mut u, st, "shared", "keep");
    taker.tell("send");
    assert_eq!(receive(&peer).0, "x");
    taker.tell("exit");
    assert!(taker.child.wait().expect("the taker exits").success());
    giver.tell("send");
    assert_eq!(receive(&peer).0, "x");
    drop(peer);
    giver.tell("send");
    let un = u.wait_for("the unreachable", |v| {
        is(v, "unreachable") && v["cookie"] == cookie
    });
    assert_eq!(pid(&un), giver_pid, "the giver still holds it: {un}");
    Outcome::Pass
}

/// The test thread kept on one CPU while it lives, then free again.
struct Pinned(libc::cpu_set_t);

impl Pinned {
    fn to(cpu: usize) -> Pinned {
        // SAFETY: sched_getaffinity fills the set it is given.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut old) };
        pin_to_cpu(cpu);
        Pinned(old)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the set read before.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// No event of the socket after `first` names `stale`.
fn no_stale(u: &mut Udpmon, cookie: &Value, stale: u64, first: &Value) {
    let events = u.all(|v| v["cookie"] == *cookie);
    let after = events.iter().skip_while(|v| *v != first).skip(1);
    let named: Vec<_> = after.filter(|v| pid(v) == stale).collect();
    assert!(
        named.is_empty(),
        "events name pid {stale}, which no longer holds the socket: {named:#?}"
    );
}

/// The helper programs (`--role NAME ARGS...`); each reports on stdout, a line at a time.
/// - `daemon PEER exit|linger`: binds, connects to PEER and sends "hello"; says `parent PID`,
///   forks; the child says `child PID` and serves commands; the parent exits. With `linger`
///   the socket is not connected (sends go to PEER by address) and the parent waits to be
///   killed.
/// - `take NAME`: binds the abstract unix socket NAME, says `ready PID`, receives a socket
///   over it, says `got` and serves commands.
/// - `give PEER NAME close|keep`: binds, connects to PEER, sends "hello", passes the socket
///   to NAME, closes its own descriptor or keeps it, says `passed PID` and serves commands
///   (`send` only when it kept the socket).
/// - `exec PEER PATH`: binds, connects to PEER, sends "hello", says `before PID` and execs
///   PATH (this binary) as `execd FD`, which says `execd PID` and serves commands.
/// - `activate PATH`: systemd's socket activation: binds a server socket, says
///   `manager PID PORT`, forks and keeps the socket until its child ends; the child execs
///   PATH (this binary) as
///   `activated` with the socket as descriptor 3 (LISTEN_FDS, LISTEN_PID), which answers every
///   datagram with its pid, says `activated PID` and serves commands.
/// - `reuseport PORT`: binds 127.0.0.1:PORT with SO_REUSEPORT, answers every datagram with
///   its pid, says `bound PID PORT` and serves commands.
///
/// Commands, a line each on stdin: `send` (one datagram "x"), `recv` (one datagram, with
/// recvfrom), `exit`; each answered `done`.
pub fn role(args: &[String]) -> ! {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["daemon", peer, mode @ ("exit" | "linger")] => {
            let linger = *mode == "linger";
            let (sock, to) = if linger {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                sock.send_to(b"hello", peer).unwrap();
                (sock, Some(*peer))
            } else {
                (connected(peer), None)
            };
            say(&format!("parent {}", std::process::id()));
            // SAFETY: this process is single-threaded; both sides go on with plain syscalls.
            match unsafe { libc::fork() } {
                0 => {
                    say(&format!("child {}", std::process::id()));
                    serve(Some(sock), to)
                }
                n if n > 0 && linger => loop {
                    // SAFETY: waits for a signal; the test kills this process.
                    unsafe { libc::pause() };
                },
                n if n > 0 => std::process::exit(0),
                _ => panic!("fork: {}", std::io::Error::last_os_error()),
            }
        }
        ["take", name] => {
            pin_to_cpu(1);
            let addr = UnixAddr::from_abstract_name(name).unwrap();
            let unix = UnixDatagram::bind_addr(&addr).expect("binding the unix socket");
            say(&format!("ready {}", std::process::id()));
            let fd = receive_fd(unix.as_raw_fd());
            // SAFETY: the kernel just installed this descriptor for us.
            let sock = unsafe { UdpSocket::from_raw_fd(fd) };
            say("got");
            serve(Some(sock), None)
        }
        ["give", peer, name, mode @ ("close" | "keep")] => {
            if *mode == "keep" {
                pin_to_cpu(0);
            }
            let sock = connected(peer);
            let addr = UnixAddr::from_abstract_name(name).unwrap();
            let unix = UnixDatagram::unbound().unwrap();
            unix.connect_addr(&addr).expect("connecting to the taker");
            send_fd(unix.as_raw_fd(), sock.as_raw_fd());
            let sock = (*mode == "keep").then_some(sock);
            say(&format!("passed {}", std::process::id()));
            serve(sock, None)
        }
        ["exec", peer, path] => {
            let sock = connected(peer);
            let fd = sock.into_raw_fd();
            // SAFETY: fcntl on a descriptor we own; the flag is the only change.
            assert_eq!(
                unsafe { libc::fcntl(fd, libc::F_SETFD, 0) },
                0,
                "clearing FD_CLOEXEC"
            );
            say(&format!("before {}", std::process::id()));
            let err = Command::new(path)
                .args(["--role", "execd", &fd.to_string()])
                .exec();
            panic!("exec {path}: {err}");
        }
        ["execd", fd] => {
            // SAFETY: the descriptor was left open across exec for us.
            let sock = unsafe { UdpSocket::from_raw_fd(fd.parse().expect("a descriptor")) };
            say(&format!("execd {}", std::process::id()));
            serve(Some(sock), None)
        }
        ["activate", path] => {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = sock.local_addr().unwrap().port();
            say(&format!("manager {} {port}", std::process::id()));
            // SAFETY: this process is single-threaded; the child only sets up and execs.
            match unsafe { libc::fork() } {
                0 => {
                    // sd_listen_fds(3): the first passed socket is descriptor 3, open across
                    // exec, announced by LISTEN_FDS and LISTEN_PID.
                    let fd = sock.into_raw_fd();
                    // SAFETY: descriptors this process owns; dup2 leaves the copy open across
                    // exec, and fcntl does the same where the socket is already 3.
                    let rc = unsafe {
                        if fd == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, 3)
                        }
                    };
                    assert!(rc >= 0, "passing the socket as 3");
                    let err = Command::new(path)
                        .args(["--role", "activated"])
                        .env("LISTEN_FDS", "1")
                        .env("LISTEN_PID", std::process::id().to_string())
                        .exec();
                    panic!("exec {path}: {err}");
                }
                // The manager keeps its descriptor, as systemd keeps a listening socket, until
                // the service ends (so a service that fails to start ends the helper's output
                // too).
                n if n > 0 => {
                    let mut status = 0;
                    // SAFETY: waits for our own child.
                    unsafe { libc::waitpid(n, &mut status, 0) };
                    std::process::exit(0)
                }
                _ => panic!("fork: {}", std::io::Error::last_os_error()),
            }
        }
        ["activated"] => {
            let me = std::process::id().to_string();
            assert_eq!(std::env::var("LISTEN_PID").as_deref(), Ok(me.as_str()));
            assert_eq!(std::env::var("LISTEN_FDS").as_deref(), Ok("1"));
            // SAFETY: descriptor 3 was passed to this program (above).
            let sock = unsafe { UdpSocket::from_raw_fd(3) };
            echo(&sock);
            say(&format!("activated {me}"));
            serve(None, None)
        }
        ["reuseport", port] => {
            let sock = reuseport(port.parse().expect("a port"));
            echo(&sock);
            let port = sock.local_addr().unwrap().port();
            say(&format!("bound {} {port}", std::process::id()));
            serve(None, None)
        }
        _ => panic!("unknown role {args:?}"),
    }
}

/// Answers every datagram `sock` receives with this process's pid, on a thread of its own.
fn echo(sock: &UdpSocket) {
    let sock = sock.try_clone().expect("a second descriptor");
    std::thread::spawn(move || {
        let me = std::process::id().to_string();
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(me.as_bytes(), from);
        }
    });
}

/// A socket bound to 127.0.0.1:`port` with SO_REUSEPORT (0: a port of the kernel's choice).
fn reuseport(port: u16) -> UdpSocket {
    // SAFETY: plain socket calls on a descriptor this function owns until it returns it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_REUSEPORT: {}", std::io::Error::last_os_error());
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let rc = libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        UdpSocket::from_raw_fd(fd)
    }
}

fn connected(peer: &str) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(peer).unwrap();
    sock.send(b"hello").unwrap();
    sock
}

/// One line to the test; a test that has gone away (failed) ends the helper.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

/// `to`: where an unconnected socket sends.
fn serve(sock: Option<UdpSocket>, to: Option<&str>) -> ! {
    for line in std::io::stdin().lines() {
        match line.as_deref() {
            Ok("send") => {
                let sock = sock.as_ref().expect("a socket to send on");
                // A refused send (the peer's ICMP error, reported on this call) still counts.
                let _ = match to {
                    Some(to) => sock.send_to(b"x", to),
                    None => sock.send(b"x"),
                };
                say("done");
            }
            Ok("recv") => {
                let sock = sock.as_ref().expect("a socket to receive on");
                let mut buf = [0u8; 64];
                // recvfrom, asking for the sender: what a server calls.
                sock.recv_from(&mut buf).expect("a datagram");
                say("done");
            }
            Ok("exit") | Err(_) => break,
            Ok(other) => panic!("unknown command {other:?}"),
        }
    }
    say("done");
    std::process::exit(0)
}

/// Keeps the calling thread on one CPU (the last one where there are fewer), so that what
/// udpmon notes per CPU is not shuffled by the scheduler.
fn pin_to_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu.min(cpus - 1), &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs `call` with a message of one byte and room for one descriptor (SCM_RIGHTS), as
/// sendmsg and recvmsg take it.
fn with_fd_message<T>(call: impl FnOnce(&mut libc::msghdr) -> T) -> T {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    call(&mut msg)
}

/// Sends `fd` over the connected unix socket `unix` (SCM_RIGHTS).
fn send_fd(unix: RawFd, fd: RawFd) {
    let rc = with_fd_message(|msg| {
        // SAFETY: the control buffer has room for one header and one descriptor; msg points
        // at live buffers.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fd);
            libc::sendmsg(unix, msg, 0)
        }
    });
    assert_eq!(rc, 1, "sendmsg: {}", std::io::Error::last_os_error());
}

/// Receives one descriptor over `unix` (SCM_RIGHTS).
fn receive_fd(unix: RawFd) -> RawFd {
    with_fd_message(|msg| {
        // SAFETY: msg points at live buffers.
        let rc = unsafe { libc::recvmsg(unix, msg, 0) };
        assert_eq!(rc, 1, "recvmsg: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel filled the control buffer; the first header is the descriptor's.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(msg);
            assert!(
                !c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS,
                "no descriptor came"
            );
            libc::CMSG_DATA(c).cast::<RawFd>().read_unaligned()
        }
    })
}
