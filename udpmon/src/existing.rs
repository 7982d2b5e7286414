//! UDP sockets that exist before udpmon starts. The hooks meet such a socket only when it next
//! does something, often in softirq context where the running task is not its owner; learning
//! every socket up front gives long-lived sockets the right process and addresses from their
//! first event.
//!
//! sock_diag only dumps the caller's network namespace, so a dedicated thread `setns()`es into
//! each namespace in turn (see `netns`): network namespaces are per thread, the rest of the
//! process stays put. The sockets' owners come from the /proc scan (`procfs`).
//!
//! The same dumps, later, find the sockets whose Close record the ring lost
//! ([`open_sockets`]).
use std::{
    collections::{HashMap, HashSet},
    fmt,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};

use crate::{
    container::{self, Ask},
    decode::{self, Fact, KernelEvent},
    engine::OpenSockets,
    identity::{Identity, Name},
    netns::{self, network_namespaces},
    procfs::{comm_of, socket_owners},
    sock_diag::{DiagSocket, SockDiag, TCP_ESTABLISHED},
};

/// One line's worth of what the scan found, for the startup log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExistingStats {
    /// Namespaces whose sockets were dumped.
    pub netns_scanned: usize,
    /// Namespaces that could not be entered or dumped (vanished, or refused).
    pub netns_failed: usize,
    /// UDP sockets found, IPv4 and IPv6.
    pub sockets: usize,
    /// Sockets no process holds a descriptor for (kernel sockets, or closed mid-scan).
    pub without_process: usize,
    pub elapsed: Duration,
}

impl fmt::Display for ExistingStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} existing UDP sockets in {} network namespaces ({} without a process",
            self.sockets, self.netns_scanned, self.without_process
        )?;
        if self.netns_failed > 0 {
            write!(f, ", {} namespaces unreadable", self.netns_failed)?;
        }
        write!(f, "), scanned in {} ms", self.elapsed.as_millis())
    }
}

/// The sockets open at startup, and the namespaces they were found in.
pub struct Existing {
    /// One `Fact::Existing` event per UDP socket in every network namespace on the host.
    pub events: Vec<KernelEvent>,
    pub stats: ExistingStats,
    /// Namespace cookie -> inode, for every namespace dumped.
    pub netns_cookies: HashMap<u64, u32>,
    /// The owners' cgroups, with their paths, for the container lookup.
    pub cgroups: Vec<Ask>,
}

/// Every UDP socket open now, in every network namespace on the host, with its owner.
pub fn existing_sockets() -> anyhow::Result<Existing> {
    let start = Instant::now();
    let (dumps, failed) = dump_namespaces(|sockets| sockets)?;
    let mut stats = ExistingStats {
        netns_scanned: dumps.len(),
        netns_failed: failed,
        ..ExistingStats::default()
    };
    let mut netns_cookies = HashMap::new();
    let mut found = Vec::new();
    for (inode, d) in dumps {
        if let (Some(cookie), Ok(inode)) = (d.cookie, u32::try_from(inode)) {
            netns_cookies.insert(cookie, inode);
        }
        found.extend(d.sockets.into_iter().map(|s| (inode, d.ts_ns, s)));
    }

    // After the dumps, not before: every socket still open then is in some fd table now.
    let wanted: HashSet<u64> = found.iter().map(|(_, _, s)| u64::from(s.inode)).collect();
    let owners = socket_owners(&wanted);
    let mut comms: HashMap<u32, Name> = HashMap::new();
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| container::v2_mount(&m));
    // tgid -> (cgroup id, path): the hooks give every socket created while udpmon runs its
    // creator's cgroup; one from before gets its holder's, so that it is named as part of its
    // container like the others.
    let mut cgroups: HashMap<u32, Option<(u64, String)>> = HashMap::new();
    let events: Vec<KernelEvent> = found
        .into_iter()
        .map(|(netns, ts_ns, s)| {
            let tgid = owners.get(&u64::from(s.inode)).copied().unwrap_or(0);
            let comm = if tgid == 0 {
                Name::default()
            } else {
                *comms.entry(tgid).or_insert_with(|| comm_of(tgid))
            };
            let cgroup = match (tgid, &mount) {
                (0, _) | (_, None) => None,
                (_, Some(m)) => cgroups
                    .entry(tgid)
                    .or_insert_with(|| container::cgroup_of(m, tgid))
                    .as_ref(),
            };
            let (family, local, remote) = decode::unmap_v4(s.family, s.local, s.remote);
            KernelEvent {
                fact: Fact::Existing,
                ts_ns,
                cookie: s.cookie,
                who: Identity {
                    tgid,
                    pid: tgid,
                    // /proc/PID/comm of the process is its leader's name.
                    process: comm,
                    comm,
                    uid: s.uid,
                    cgroup: cgroup.map_or(0, |(id, _)| *id),
                    // nsfs inode numbers are 32-bit (`ns_common.inum`), as the hooks report them.
                    netns: netns as u32,
                },
                family,
                local,
                remote,
                task_unrelated: false,
                connected: s.state == TCP_ESTABLISHED,
                recverr: false,
            }
        })
        .collect();
    stats.sockets = events.len();
    stats.without_process = events.iter().filter(|e| e.who.tgid == 0).count();
    stats.elapsed = start.elapsed();
    let mut seen = HashSet::new();
    let cgroups = cgroups
        .into_values()
        .flatten()
        .filter(|(id, _)| seen.insert(*id))
        .map(|(cgroup, path)| Ask {
            cgroup,
            path: Some(path),
        })
        .collect();
    Ok(Existing {
        cgroups,
        events,
        stats,
        netns_cookies,
    })
}

/// The UDP sockets open now in every network namespace that could be dumped, for
/// [`Engine::lost_closes`](crate::engine::Engine::lost_closes). Blocking: callers with an
/// event loop run it elsewhere.
pub fn open_sockets() -> anyhow::Result<Vec<OpenSockets>> {
    // Only the cookies are kept, namespace by namespace: a host may hold millions of sockets.
    let (dumps, _) = dump_namespaces(|sockets| sockets.iter().map(|s| s.cookie).collect())?;
    Ok(dumps
        .into_iter()
        .map(|(inode, d)| OpenSockets {
            // nsfs inode numbers are 32-bit (`ns_common.inum`), as the hooks report them.
            netns: inode as u32,
            since_ns: d.ts_ns,
            cookies: d.sockets,
        })
        .collect())
}

/// What one namespace held when it was dumped: its sockets, or what was kept of them.
struct NetnsDump<T> {
    /// CLOCK_BOOTTIME just before the dump. Earlier than anything the hooks can report about a
    /// socket in the dump after it, so an Existing never lands after that socket's Close.
    ts_ns: u64,
    /// The namespace's cookie, for naming the namespaces of later events (`netns`).
    cookie: Option<u64>,
    sockets: T,
}

/// Each namespace's dump, by inode.
type Dumps<T> = Vec<(u64, NetnsDump<T>)>;

/// The UDP sockets of every network namespace by inode, `keep` taking what is wanted of each
/// namespace's in the scan thread; and how many namespaces could not be dumped (vanished
/// since they were listed, or refused: their sockets are not in the result).
fn dump_namespaces<T: Send + 'static>(
    keep: fn(Vec<DiagSocket>) -> T,
) -> anyhow::Result<(Dumps<T>, usize)> {
    let namespaces = network_namespaces().context("enumerating network namespaces")?;
    let dumps = netns::in_each(namespaces, move || {
        let ts_ns = crate::clock::boot_ns();
        let mut diag = SockDiag::open()?;
        let mut sockets = diag.dump(libc::AF_INET as u8).context("IPv4")?;
        sockets.extend(diag.dump(libc::AF_INET6 as u8).context("IPv6")?);
        Ok(NetnsDump {
            ts_ns,
            cookie: netns::current_cookie().ok(),
            sockets: keep(sockets),
        })
    })?;
    let (mut ok, mut failed, mut first_error) = (Vec::new(), 0, None);
    for (inode, dump) in dumps {
        match dump {
            Ok(d) => ok.push((inode, d)),
            Err(e) => {
                log::debug!("network namespace {inode}: {e:#}");
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if ok.is_empty() {
        // Every namespace failing means sock_diag itself is unusable (no udp_diag, no
        // privileges), which the caller must hear about rather than see zero sockets.
        return Err(first_error
            .unwrap_or_else(|| anyhow!("no network namespace found"))
            .context("dumping UDP sockets"));
    }
    Ok((ok, failed))
}

#[cfg(test)]
mod tests {
    use std::{
        fs, io,
        net::UdpSocket,
        os::{fd::AsRawFd, unix::fs::MetadataExt},
        sync::mpsc,
    };

    use super::*;
    use crate::decode::Family;

    fn so_cookie(sock: &UdpSocket) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: the out-pointer is a u64 of the size given.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    fn inode_of(path: &str) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    fn needs_root() -> bool {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("\n*** SKIPPED: needs root ***\n");
            return false;
        }
        true
    }

    #[test]
    fn existing_sockets_finds_a_connected_socket() {
        if !needs_root() {
            return;
        }
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect("127.0.0.1:9").unwrap();
        let local = sock.local_addr().unwrap();
        let Existing {
            events,
            stats,
            netns_cookies,
            cgroups,
        } = existing_sockets().unwrap();
        println!("{stats}");
        let ev = events
            .iter()
            .find(|e| e.local == local && e.remote == "127.0.0.1:9".parse().unwrap())
            .unwrap_or_else(|| panic!("{local} not among {events:#?}"));
        assert_eq!(ev.fact, Fact::Existing);
        assert_eq!(ev.family, Family::V4);
        assert!(ev.connected && !ev.recverr && !ev.task_unrelated);
        assert_eq!(ev.who.tgid, std::process::id());
        assert_eq!(ev.who.pid, ev.who.tgid);
        assert!(!ev.who.comm.is_empty());
        assert_eq!(ev.who.uid, 0);
        assert_eq!(u64::from(ev.who.netns), inode_of("/proc/self/ns/net"));
        assert_ne!(ev.cookie, 0);
        assert_eq!(ev.cookie, so_cookie(&sock));
        assert!(ev.ts_ns > 0 && ev.ts_ns <= crate::clock::boot_ns());
        assert!(stats.netns_scanned >= 1 && stats.sockets >= 1);
        // The dump also named its namespace's cookie, for the events to come.
        let own = netns::current_cookie().unwrap();
        assert_eq!(netns_cookies.get(&own).copied(), Some(ev.who.netns));
        // Its holder's cgroup, where cgroup v2 is mounted, and that cgroup among those whose
        // containers are to be resolved.
        let mount = fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| container::v2_mount(&m));
        match mount {
            Some(m) => {
                let own = fs::read_to_string("/proc/self/cgroup").unwrap();
                let path = container::v2_path(&own).unwrap();
                let id = inode_of(m.join(path.trim_start_matches('/')).to_str().unwrap());
                assert_eq!(ev.who.cgroup, id);
                let ask = cgroups.iter().find(|a| a.cgroup == id).expect("asked");
                assert_eq!(ask.path.as_deref(), Some(path));
            }
            None => assert_eq!(ev.who.cgroup, 0),
        }
    }

    #[test]
    fn open_sockets_lists_an_open_socket_and_not_a_closed_one() {
        if !needs_root() {
            return;
        }
        let open = UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (open_cookie, closed_cookie) = (so_cookie(&open), so_cookie(&closed));
        drop(closed);
        let before = crate::clock::boot_ns();
        let dumps = open_sockets().unwrap();
        let own = inode_of("/proc/self/ns/net");
        let d = dumps
            .iter()
            .find(|d| u64::from(d.netns) == own)
            .expect("its own namespace dumped");
        assert!(d.cookies.contains(&open_cookie));
        assert!(!d.cookies.contains(&closed_cookie));
        assert!(before <= d.since_ns && d.since_ns <= crate::clock::boot_ns());
        drop(open);
    }

    #[test]
    fn existing_sockets_looks_into_other_namespaces() {
        if !needs_root() {
            return;
        }
        let (found_tx, found_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        // Only this thread moves: the namespace is reachable through its task entry alone.
        let thread = std::thread::spawn(move || {
            // SAFETY: plain syscall; affects this thread only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let sock = UdpSocket::bind("[::]:0").unwrap();
            let netns = inode_of("/proc/thread-self/ns/net");
            found_tx
                .send((so_cookie(&sock), sock.local_addr().unwrap(), netns))
                .unwrap();
            done_rx.recv().ok();
        });
        let (cookie, local, netns) = found_rx.recv().unwrap();
        assert_ne!(netns, inode_of("/proc/self/ns/net"));
        let events = existing_sockets().unwrap().events;
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        let ev = events
            .iter()
            .find(|e| e.cookie == cookie)
            .unwrap_or_else(|| panic!("cookie {cookie} not among {events:#?}"));
        assert_eq!(u64::from(ev.who.netns), netns);
        assert_eq!(ev.local, local);
        assert_eq!(ev.family, Family::V6);
        assert_eq!(ev.remote, "[::]:0".parse().unwrap());
        assert!(!ev.connected);
        assert_eq!(ev.who.tgid, std::process::id());
    }
}
