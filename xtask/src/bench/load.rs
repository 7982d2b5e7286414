//! The load generator: a one-way UDP send flood, a UDP request/response ping-pong, their TCP
//! counterparts (request/response and a bulk stream, traffic udpmon must leave alone) and a
//! new-flow ramp, each between two sockets on loopback or across a veth pair between two
//! network namespaces. Plain `send()` per datagram, as applications do. Every loop is bounded
//! in time and in count.
use std::{
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::run;

/// Where the two sockets live.
pub enum Path {
    Loopback,
    Veth(Veth),
}

impl Path {
    pub fn name(&self) -> &'static str {
        match self {
            Path::Loopback => "loopback",
            Path::Veth(_) => "veth netns",
        }
    }

    /// (sender namespace, receiver namespace, receiver address).
    fn ends(&self) -> (Option<PathBuf>, Option<PathBuf>, Ipv4Addr) {
        match self {
            Path::Loopback => (None, None, Ipv4Addr::LOCALHOST),
            Path::Veth(v) => (Some(v.ns_path(0)), Some(v.ns_path(1)), Veth::ADDRS[1]),
        }
    }
}

/// Two network namespaces joined by a veth pair; deleted on drop.
pub struct Veth {
    names: [String; 2],
}

impl Veth {
    const ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 199, 0, 1), Ipv4Addr::new(10, 199, 0, 2)];

    pub fn create() -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let v = Veth {
            names: [format!("udpmonbench-a{id}"), format!("udpmonbench-b{id}")],
        };
        for n in &v.names {
            // A leftover from a killed run would make `ip netns add` fail.
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            run(Command::new("ip").args(["netns", "add", n]))?;
        }
        let (a, b) = (format!("umb{id}a"), format!("umb{id}b"));
        let ip = |ns: &str, args: &[&str]| run(Command::new("ip").args(["-n", ns]).args(args));
        run(Command::new("ip").args([
            "link",
            "add",
            &a,
            "netns",
            &v.names[0],
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &v.names[1],
        ]))?;
        for (i, dev) in [&a, &b].into_iter().enumerate() {
            let ns = &v.names[i];
            ip(
                ns,
                &["addr", "add", &format!("{}/24", Self::ADDRS[i]), "dev", dev],
            )?;
            ip(ns, &["link", "set", dev, "up"])?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        Ok(v)
    }

    fn ns_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.names[i])
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Moves the calling thread into a network namespace (threads keep theirs; a fresh thread is
/// used for every run) and onto one CPU.
fn enter(ns: Option<&PathBuf>, cpu: usize) -> anyhow::Result<()> {
    if let Some(ns) = ns {
        let f = File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        // SAFETY: a valid namespace fd; affects the calling thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering {}", ns.display()));
        }
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let cpus = usize::try_from(libc::sysconf(libc::_SC_NPROCESSORS_ONLN)).unwrap_or(1);
        libc::CPU_SET(cpu % cpus.max(1), &mut set);
        // Pinning is a noise reducer only: a refusal (cpuset) is not an error.
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
    Ok(())
}

/// Upper bound on operations in one run, whatever the duration.
const MAX_OPS: u64 = 200_000_000;

/// How long a TCP connection may make no progress before the run fails: a stuck
/// connection, not a slow one.
const TCP_STALL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Flood,
    PingPong,
    TcpRr,
    TcpStream,
}

impl Shape {
    pub fn name(&self) -> &'static str {
        match self {
            Shape::Flood => "flood",
            Shape::PingPong => "ping-pong",
            Shape::TcpRr => "tcp rr",
            Shape::TcpStream => "tcp stream",
        }
    }
}

/// One run of a workload. An operation is a datagram sent (flood), a round trip (ping-pong,
/// tcp rr) or one write of the chunk (tcp stream).
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// Operations per second of wall-clock time.
    pub rate: f64,
    /// CPU time per operation (ns): the sender's (flood), both threads' (the others). This
    /// kernel has no IRQ time accounting, so the softirq work a thread triggers (loopback and
    /// veth deliver the packet in the sender's softirq, with the ingress hooks) is charged to
    /// it; unlike the wall-clock rate, this does not move when other processes take the CPUs.
    pub cpu_ns: f64,
}

impl Measured {
    fn per_op(ops: u64, secs: f64, cpu_ns: u64) -> Self {
        Measured {
            rate: ops as f64 / secs,
            cpu_ns: cpu_ns as f64 / ops as f64,
        }
    }
}

/// CPU time of the calling thread, ns.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Runs one workload for `dur`; `size` is the datagram, request or chunk size.
pub fn measure(path: &Path, shape: &Shape, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    match shape {
        Shape::Flood => flood(path, size, dur),
        Shape::PingPong => ping_pong(path, size, dur),
        Shape::TcpRr => tcp_rr(path, size, dur),
        Shape::TcpStream => tcp_stream(path, size, dur),
    }
}

/// Runs the two ends of a workload over `path`, each on a fresh thread since an entered
/// namespace sticks to its thread: `listen` then `serve` on CPU 1 in the receiver's
/// namespace, and `client` on CPU 0 in the sender's, given the address `listen` bound.
/// `serve` gets a flag set once the client has returned and a deadline past which it must
/// return whatever happens. Returns (client's result, server's result).
fn two_ends<L, C: Send, S: Send>(
    path: &Path,
    dur: Duration,
    listen: impl FnOnce(Ipv4Addr) -> anyhow::Result<(L, SocketAddr)> + Send,
    serve: impl FnOnce(L, &AtomicBool, Instant) -> anyhow::Result<S> + Send,
    client: impl FnOnce(SocketAddr) -> anyhow::Result<C> + Send,
) -> anyhow::Result<(C, S)> {
    let (cl_ns, sv_ns, addr) = path.ends();
    let stop = AtomicBool::new(false);
    let (addr_tx, addr_rx) = mpsc::channel();
    thread::scope(|s| {
        let server = s.spawn(|| {
            let l = match enter(sv_ns.as_ref(), 1).and_then(|()| listen(addr)) {
                Ok((l, at)) => {
                    addr_tx.send(Ok(at))?;
                    l
                }
                Err(e) => {
                    // Tells the client at once rather than after its wait for the address.
                    addr_tx.send(Err(format!("{e:#}")))?;
                    return Err(e);
                }
            };
            serve(l, &stop, Instant::now() + dur + Duration::from_secs(10))
        });
        let res = (|| {
            let to: SocketAddr = addr_rx
                .recv_timeout(Duration::from_secs(5))
                .context("server did not start")?
                .map_err(anyhow::Error::msg)?;
            s.spawn(move || {
                enter(cl_ns.as_ref(), 0)?;
                client(to)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
        })();
        stop.store(true, Ordering::Relaxed);
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
        Ok((res?, served?))
    })
}

/// A UDP socket on `addr`, port chosen by the kernel; the timeout lets its reader poll
/// the stop flag.
fn udp_listen(addr: Ipv4Addr) -> anyhow::Result<(UdpSocket, SocketAddr)> {
    let s = UdpSocket::bind(SocketAddrV4::new(addr, 0)).context("binding the receiver")?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let at = s.local_addr()?;
    Ok((s, at))
}

/// Sender pinned to CPU 0 and receiver to CPU 1; an operation is a successful send(). On
/// loopback and veth the kernel delivers the datagram to the receiving socket in the
/// sender's softirq, so both directions' hooks run on the sender's CPU time, which is what
/// `cpu_ns` counts. The receiver only drains: its share moves with how many datagrams it
/// finds room for (a full buffer drops them cheaply), which is not the cost being measured.
fn flood(path: &Path, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    let ((sent, secs, tx_cpu), got) = two_ends(
        path,
        dur,
        udp_listen,
        |sock, stop, deadline| {
            let mut buf = vec![0u8; 2048];
            let mut got = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if sock.recv(&mut buf).is_ok() {
                    got += 1;
                }
            }
            Ok(got)
        },
        |to| {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.connect(to)?;
            let buf = vec![0x5au8; size];
            let cpu0 = thread_cpu_ns();
            let start = Instant::now();
            let mut sent = 0u64;
            let mut n = 0u64;
            loop {
                if sock.send(&buf).is_ok() {
                    sent += 1;
                }
                n += 1;
                if n.is_multiple_of(256) && (start.elapsed() >= dur || n >= MAX_OPS) {
                    break;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            Ok((sent, secs, thread_cpu_ns() - cpu0))
        },
    )?;
    if sent == 0 || got == 0 {
        bail!("flood over {}: sent {sent}, received {got}", path.name());
    }
    Ok(Measured::per_op(sent, secs, tx_cpu))
}

/// Client on CPU 0 sends a datagram and waits for the echo from the server on CPU 1; the
/// rate is round trips per second (two datagrams each).
fn ping_pong(path: &Path, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    let ((trips, secs, cl_cpu), sv_cpu) = two_ends(
        path,
        dur,
        udp_listen,
        |sock, stop, deadline| {
            let mut buf = vec![0u8; 2048];
            let cpu0 = thread_cpu_ns();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
            Ok(thread_cpu_ns() - cpu0)
        },
        |to| {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.connect(to)?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let buf = vec![0x5au8; size];
            let mut back = vec![0u8; 2048];
            let cpu0 = thread_cpu_ns();
            let start = Instant::now();
            let mut trips = 0u64;
            let mut n = 0u64;
            while start.elapsed() < dur && n < MAX_OPS {
                n += 1;
                if sock.send(&buf).is_err() {
                    continue;
                }
                match sock.recv(&mut back) {
                    Ok(_) => trips += 1,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("ping-pong receive"),
                }
            }
            let secs = start.elapsed().as_secs_f64();
            Ok((trips, secs, thread_cpu_ns() - cpu0))
        },
    )?;
    if trips == 0 {
        bail!("ping-pong over {}: no round trip completed", path.name());
    }
    Ok(Measured::per_op(trips, secs, cl_cpu + sv_cpu))
}

/// A TCP listener on `addr`, port chosen by the kernel. Non-blocking, so that the server
/// can give up on a client that never connects.
fn tcp_listen(addr: Ipv4Addr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(SocketAddrV4::new(addr, 0)).context("binding the listener")?;
    l.set_nonblocking(true)?;
    let at = l.local_addr()?;
    Ok((l, at))
}

/// The client's end of a TCP workload: connected, Nagle off (a request is sent at once, as
/// request/response applications set it), bounded waits.
fn tcp_connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, TCP_STALL)
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TCP_STALL))?;
    s.set_write_timeout(Some(TCP_STALL))?;
    Ok(s)
}

/// The server's end of a TCP workload: accepts one connection, then hands every read to
/// `f` until the client closes it (which it does on returning, error or not), or at the
/// latest until `deadline`. Returns the server's CPU time from the accept on, ns.
fn tcp_serve(
    l: TcpListener,
    stop: &AtomicBool,
    deadline: Instant,
    mut f: impl FnMut(&mut TcpStream, &[u8]) -> std::io::Result<()>,
) -> anyhow::Result<u64> {
    let mut sock = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    bail!("no client connected");
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting the client"),
        }
    };
    sock.set_nonblocking(false)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    sock.set_write_timeout(Some(TCP_STALL))?;
    let mut buf = vec![0u8; 64 << 10];
    let cpu0 = thread_cpu_ns();
    while Instant::now() < deadline {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => f(&mut sock, &buf[..n]).context("serving the client")?,
            // A client gone without closing: the flag is the only way out before the deadline.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            Err(e) => return Err(e).context("reading from the client"),
        }
    }
    Ok(thread_cpu_ns() - cpu0)
}

/// TCP request/response, as `ping_pong` over one connection: the client on CPU 0 writes
/// `size` bytes and reads exactly `size` back, echoed by the server on CPU 1; an operation
/// is a round trip, and `cpu_ns` counts both threads.
fn tcp_rr(path: &Path, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    let ((trips, secs, cl_cpu), sv_cpu) = two_ends(
        path,
        dur,
        tcp_listen,
        |l, stop, deadline| tcp_serve(l, stop, deadline, |s, data| s.write_all(data)),
        |to| {
            let mut sock = tcp_connect(to)?;
            let buf = vec![0x5au8; size];
            let mut back = vec![0u8; size];
            let cpu0 = thread_cpu_ns();
            let start = Instant::now();
            let mut trips = 0u64;
            while start.elapsed() < dur && trips < MAX_OPS {
                sock.write_all(&buf)
                    .context("tcp rr: sending the request")?;
                sock.read_exact(&mut back)
                    .context("tcp rr: reading the echo")?;
                trips += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            Ok((trips, secs, thread_cpu_ns() - cpu0))
        },
    )?;
    if trips == 0 {
        bail!("tcp rr over {}: no round trip completed", path.name());
    }
    Ok(Measured::per_op(trips, secs, cl_cpu + sv_cpu))
}

/// TCP bulk transfer: the client on CPU 0 writes `size`-byte chunks as fast as the
/// connection takes them, the server on CPU 1 reads and discards; an operation is one
/// chunk written, and `cpu_ns` counts both threads, the receiver's until it has read the
/// last byte (what is still in flight when the client's clock stops is part of its writes).
fn tcp_stream(path: &Path, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    let ((writes, secs, tx_cpu), (got, rx_cpu)) = two_ends(
        path,
        dur,
        tcp_listen,
        |l, stop, deadline| {
            let mut got = 0u64;
            let cpu = tcp_serve(l, stop, deadline, |_, data| {
                got += data.len() as u64;
                Ok(())
            })?;
            Ok((got, cpu))
        },
        |to| {
            let mut sock = tcp_connect(to)?;
            let buf = vec![0x5au8; size];
            let cpu0 = thread_cpu_ns();
            let start = Instant::now();
            let mut writes = 0u64;
            while start.elapsed() < dur && writes < MAX_OPS {
                sock.write_all(&buf).context("tcp stream: writing")?;
                writes += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            Ok((writes, secs, thread_cpu_ns() - cpu0))
        },
    )?;
    let sent = writes * size as u64;
    if writes == 0 || got != sent {
        bail!(
            "tcp stream over {}: sent {sent} bytes, received {got}",
            path.name()
        );
    }
    Ok(Measured::per_op(writes, secs, tx_cpu + rx_cpu))
}

/// The kernel's count of TCP segments sent in the calling thread's network namespace
/// (`Tcp: OutSegs` of its /proc/net/snmp).
pub fn tcp_out_segs() -> anyhow::Result<u64> {
    const SNMP: &str = "/proc/thread-self/net/snmp";
    let snmp = std::fs::read_to_string(SNMP).with_context(|| format!("reading {SNMP}"))?;
    // A "Tcp:" line of field names, then a "Tcp:" line of values.
    let mut tcp = snmp.lines().filter_map(|l| l.strip_prefix("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    names
        .zip(values)
        .and_then(|(n, v)| {
            n.split_whitespace()
                .zip(v.split_whitespace())
                .find(|(name, _)| *name == "OutSegs")
        })
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no Tcp: OutSegs in {SNMP}"))
}

/// Opens new flows at `rate` per second for `dur`, as issue 11 states the workload: each a
/// fresh socket that sends one 32-byte datagram to a sink on 127.0.0.1 and closes (so the
/// kernel reports a first datagram and a close, and the sink a new peer, per flow: each
/// socket is bound to an address of its own, 127.1.0.0 upwards, since ephemeral ports
/// repeat after some 28000 sockets). Paced in half-millisecond steps. Returns (flows opened,
/// achieved flows per second): above what the generator can do on this machine, the
/// achieved rate says where its own limit is.
///
/// The sink is drained by polling, as a busy server's socket is: a receiver blocked in
/// recv() is woken once per datagram, and those wakeups are paid by the sending thread (a C
/// equivalent of this generator opened 111-127k flows/s with a blocked receiver, 170-215k
/// with a polling one, on two cores).
pub fn new_flows(rate: u64, dur: Duration) -> anyhow::Result<(u64, f64)> {
    let total = ((rate as f64 * dur.as_secs_f64()) as u64).clamp(1, 16_000_000);
    let stop = AtomicBool::new(false);
    let sink = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding the sink")?;
    sink.set_nonblocking(true)?;
    // Room for several polls' worth of datagrams at the top of the ramp. Best effort: a
    // datagram the sink drops was still seen by udpmon on its way in.
    let room: libc::c_int = 16 << 20;
    // SAFETY: a valid socket and an int option of the size given.
    unsafe {
        libc::setsockopt(
            sink.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const room).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let port = sink.local_addr()?.port();
    thread::scope(|s| {
        let drain = s.spawn(|| {
            enter(None, 1)?;
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + dur * 3 + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                while sink.recv(&mut buf).is_ok() {}
                thread::sleep(Duration::from_micros(200));
            }
            anyhow::Ok(())
        });
        let res = thread::scope(|s2| {
            s2.spawn(|| -> anyhow::Result<(u64, f64)> {
                enter(None, 0)?;
                let buf = [0x5au8; 32];
                let base = u32::from(Ipv4Addr::new(127, 1, 0, 0));
                let start = Instant::now();
                let hard_stop = dur * 3 + Duration::from_secs(1);
                let mut sent = 0u64;
                while sent < total && start.elapsed() < hard_stop {
                    let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
                    if sent >= due {
                        thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    while sent < due {
                        let from = Ipv4Addr::from(base + u32::try_from(sent).unwrap_or(0));
                        let sent_one = UdpSocket::bind((from, 0))
                            .and_then(|sock| sock.send_to(&buf, (Ipv4Addr::LOCALHOST, port)));
                        if sent_one.is_ok() {
                            sent += 1;
                        } else {
                            // A transient ENOBUFS (or no file descriptor): try again later.
                            break;
                        }
                    }
                }
                Ok((sent, start.elapsed().as_secs_f64()))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("new-flow sender panicked"))?
        });
        stop.store(true, Ordering::Relaxed);
        drain
            .join()
            .map_err(|_| anyhow::anyhow!("drain thread panicked"))??;
        let (sent, secs) = res?;
        if sent == 0 {
            bail!("new-flow ramp: nothing sent");
        }
        Ok((sent, sent as f64 / secs))
    })
}

/// Sends a datagram from a fresh socket to 127.0.0.1:`port` every 2 ms until `done()` says
/// so or `limit` passes; returns how long it took.
pub fn poke_until(
    port: u16,
    limit: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Option<Duration>> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let _ = s.send_to(b"udpmon-bench", (Ipv4Addr::LOCALHOST, port));
        if done()? {
            return Ok(Some(start.elapsed()));
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(None)
}
