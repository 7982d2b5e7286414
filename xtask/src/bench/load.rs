//! The load generator: a one-way send flood, a request/response ping-pong and a new-flow
//! ramp, each between two sockets on loopback or across a veth pair between two network
//! namespaces. Plain `send()` per datagram, as applications do. Every loop is bounded in time
//! and in count.
use std::{
    fs::File,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
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

/// Upper bound on datagrams in one run, whatever the duration.
const MAX_DATAGRAMS: u64 = 200_000_000;

pub enum Shape {
    Flood,
    PingPong,
}

impl Shape {
    pub fn name(&self) -> &'static str {
        match self {
            Shape::Flood => "flood",
            Shape::PingPong => "ping-pong",
        }
    }
}

/// One run of a workload. An operation is a datagram sent (flood) or a round trip
/// (ping-pong).
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// Operations per second of wall-clock time.
    pub rate: f64,
    /// CPU time per operation (ns): the sender's (flood), both threads' (ping-pong). This kernel has no IRQ time accounting,
    /// so the softirq work a thread triggers (loopback and veth deliver the datagram in the
    /// sender's softirq, with the ingress hooks) is charged to it; unlike the wall-clock rate,
    /// this does not move when other processes take the CPUs.
    pub cpu_ns: f64,
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

/// Runs one workload for `dur`.
pub fn measure(path: &Path, shape: &Shape, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    match shape {
        Shape::Flood => flood(path, size, dur),
        Shape::PingPong => ping_pong(path, size, dur),
    }
}

/// A receiving socket in `ns`, on `addr`, port chosen by the kernel.
fn bind_in(ns: Option<&PathBuf>, cpu: usize, addr: Ipv4Addr) -> anyhow::Result<UdpSocket> {
    enter(ns, cpu)?;
    let s = UdpSocket::bind(SocketAddrV4::new(addr, 0)).context("binding the receiver")?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(s)
}

/// Sender pinned to CPU 0 and receiver to CPU 1; an operation is a successful send(). On
/// loopback and veth the kernel delivers the datagram to the receiving socket in the
/// sender's softirq, so both directions' hooks run on the sender's CPU time, which is what
/// `cpu_ns` counts. The receiver only drains: its share moves with how many datagrams it
/// finds room for (a full buffer drops them cheaply), which is not the cost being measured.
fn flood(path: &Path, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    let (tx_ns, rx_ns, addr) = path.ends();
    let stop = AtomicBool::new(false);
    let (port_tx, port_rx) = mpsc::channel();
    thread::scope(|s| {
        let receiver = s.spawn(|| -> anyhow::Result<(u64, u64)> {
            let sock = bind_in(rx_ns.as_ref(), 1, addr);
            let sock = match sock {
                Ok(sock) => {
                    port_tx.send(Ok(sock.local_addr()?))?;
                    sock
                }
                Err(e) => {
                    port_tx.send(Err(format!("{e:#}")))?;
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; 2048];
            let mut got = 0;
            let cpu0 = thread_cpu_ns();
            let deadline = Instant::now() + dur + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if sock.recv(&mut buf).is_ok() {
                    got += 1;
                }
            }
            Ok((got, thread_cpu_ns() - cpu0))
        });
        let sent = (|| -> anyhow::Result<(u64, f64, u64)> {
            let to: SocketAddr = port_rx
                .recv_timeout(Duration::from_secs(5))
                .context("receiver did not start")?
                .map_err(anyhow::Error::msg)?;
            thread::scope(|s2| {
                s2.spawn(|| -> anyhow::Result<(u64, f64, u64)> {
                    enter(tx_ns.as_ref(), 0)?;
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
                        if n.is_multiple_of(256) && (start.elapsed() >= dur || n >= MAX_DATAGRAMS) {
                            break;
                        }
                    }
                    let secs = start.elapsed().as_secs_f64();
                    Ok((sent, secs, thread_cpu_ns() - cpu0))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
            })
        })();
        stop.store(true, Ordering::Relaxed);
        let got = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
        let (sent, secs, tx_cpu) = sent?;
        let (got, _rx_cpu) = got?;
        if sent == 0 || got == 0 {
            bail!("flood over {}: sent {sent}, received {got}", path.name());
        }
        Ok(Measured {
            rate: sent as f64 / secs,
            cpu_ns: tx_cpu as f64 / sent as f64,
        })
    })
}

/// Client on CPU 0 sends a datagram and waits for the echo from the server on CPU 1; the
/// rate is round trips per second (two datagrams each).
fn ping_pong(path: &Path, size: usize, dur: Duration) -> anyhow::Result<Measured> {
    let (cl_ns, sv_ns, addr) = path.ends();
    let stop = AtomicBool::new(false);
    let (port_tx, port_rx) = mpsc::channel();
    thread::scope(|s| {
        let server = s.spawn(|| -> anyhow::Result<u64> {
            let sock = match bind_in(sv_ns.as_ref(), 1, addr) {
                Ok(sock) => {
                    port_tx.send(Ok(sock.local_addr()?))?;
                    sock
                }
                Err(e) => {
                    port_tx.send(Err(format!("{e:#}")))?;
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; 2048];
            let cpu0 = thread_cpu_ns();
            let deadline = Instant::now() + dur + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
            Ok(thread_cpu_ns() - cpu0)
        });
        let res = (|| -> anyhow::Result<(u64, f64, u64)> {
            let to: SocketAddr = port_rx
                .recv_timeout(Duration::from_secs(5))
                .context("server did not start")?
                .map_err(anyhow::Error::msg)?;
            thread::scope(|s2| {
                s2.spawn(|| -> anyhow::Result<(u64, f64, u64)> {
                    enter(cl_ns.as_ref(), 0)?;
                    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    sock.connect(to)?;
                    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
                    let buf = vec![0x5au8; size];
                    let mut back = vec![0u8; 2048];
                    let cpu0 = thread_cpu_ns();
                    let start = Instant::now();
                    let mut trips = 0u64;
                    let mut n = 0u64;
                    while start.elapsed() < dur && n < MAX_DATAGRAMS {
                        n += 1;
                        if sock.send(&buf).is_err() {
                            continue;
                        }
                        match sock.recv(&mut back) {
                            Ok(_) => trips += 1,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(e) => return Err(e).context("ping-pong receive"),
                        }
                    }
                    let secs = start.elapsed().as_secs_f64();
                    Ok((trips, secs, thread_cpu_ns() - cpu0))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            })
        })();
        stop.store(true, Ordering::Relaxed);
        let sv_cpu = server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        let (trips, secs, cl_cpu) = res?;
        if trips == 0 {
            bail!("ping-pong over {}: no round trip completed", path.name());
        }
        Ok(Measured {
            rate: trips as f64 / secs,
            cpu_ns: (cl_cpu + sv_cpu) as f64 / trips as f64,
        })
    })
}

/// Opens new flows at `rate` per second for `dur`: one unconnected socket sends one 32-byte
/// datagram to each of `rate * dur` distinct loopback addresses (127.1.0.0 upwards, all on
/// one port where a socket bound to 0.0.0.0 drains them, so no ICMP is drawn). Paced every
/// millisecond. Returns (flows opened, achieved flows per second).
pub fn new_flows(rate: u64, dur: Duration) -> anyhow::Result<(u64, f64)> {
    let total = ((rate as f64 * dur.as_secs_f64()) as u64).clamp(1, 16_000_000);
    let stop = AtomicBool::new(false);
    let sink = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding the sink")?;
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let port = sink.local_addr()?.port();
    thread::scope(|s| {
        let drain = s.spawn(|| {
            enter(None, 1)?;
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + dur + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = sink.recv(&mut buf);
            }
            anyhow::Ok(())
        });
        let res = thread::scope(|s2| {
            s2.spawn(|| -> anyhow::Result<(u64, f64)> {
                enter(None, 0)?;
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
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
                        let to = Ipv4Addr::from(base + u32::try_from(sent).unwrap_or(0));
                        if sock.send_to(&buf, (to, port)).is_ok() {
                            sent += 1;
                        } else {
                            // A transient ENOBUFS: try the same address again later.
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
