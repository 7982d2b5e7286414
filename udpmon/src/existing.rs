//! UDP sockets that exist before udpmon starts. The hooks meet such a socket only when it next
//! does something, often in softirq context where the running task is not its owner; learning
//! every socket up front gives long-lived sockets the right process and addresses from their
//! first event.
//!
//! sock_diag only dumps the caller's network namespace, so a dedicated thread `setns()`es into
//! each namespace in turn: network namespaces are per thread, the rest of the process stays put.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};

use crate::decode::{self, Fact, Family, KernelEvent};

// linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h. Message types are u16 on the wire
// while libc spells them as c_int (and lacks some), hence our own copies.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, `inet_diag_sockid` (48).
const INET_DIAG_REQ_V2_LEN: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, `inet_diag_sockid` (48), expires,
/// rqueue, wqueue, uid, inode.
const INET_DIAG_MSG_LEN: usize = 72;
/// UDP reuses the TCP state names; a connected UDP socket is "established".
const TCP_ESTABLISHED: u8 = 1;

/// Bind mounts of named namespaces: `ip netns add`, and Docker's, which lives elsewhere.
const NAMED_NETNS_DIRS: [&str; 2] = ["/run/netns", "/run/docker/netns"];
/// A namespace shared by thousands of processes needs only a few fallbacks for when its first
/// processes exit mid-scan.
const PATHS_PER_NETNS: usize = 4;
/// Large enough for any dump datagram: the kernel sizes them after the reader's buffer, up to
/// 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// sock_diag answers from memory; a silent kernel means something is badly wrong.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

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

#[cfg(test)]
/// One `Fact::Existing` event per UDP socket in every network namespace on the host.
pub fn existing_sockets() -> anyhow::Result<Vec<KernelEvent>> {
    existing_sockets_with_stats().map(|(events, _)| events)
}

/// [`existing_sockets`], plus a summary for the log.
pub fn existing_sockets_with_stats() -> anyhow::Result<(Vec<KernelEvent>, ExistingStats)> {
    let start = Instant::now();
    let namespaces = network_namespaces().context("enumerating network namespaces")?;
    let scans = dump_namespaces(namespaces)?;

    let mut stats = ExistingStats::default();
    let mut first_error = None;
    let mut found = Vec::new();
    for scan in scans {
        match scan.result {
            Ok(sockets) => {
                stats.netns_scanned += 1;
                found.extend(sockets.into_iter().map(|s| (scan.inode, scan.ts_ns, s)));
            }
            Err(e) => {
                log::debug!("network namespace {}: {e:#}", scan.inode);
                stats.netns_failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if stats.netns_scanned == 0 {
        // Every namespace failing means sock_diag itself is unusable (no udp_diag, no
        // privileges), which the caller must hear about rather than see zero sockets.
        return Err(first_error
            .unwrap_or_else(|| anyhow!("no network namespace found"))
            .context("dumping UDP sockets"));
    }

    // After the dumps, not before: every socket still open then is in some fd table now.
    let wanted: HashSet<u64> = found.iter().map(|(_, _, s)| u64::from(s.inode)).collect();
    let owners = socket_owners(&wanted);
    let mut comms: HashMap<u32, String> = HashMap::new();
    let events: Vec<KernelEvent> = found
        .into_iter()
        .map(|(netns, ts_ns, s)| {
            let tgid = owners.get(&u64::from(s.inode)).copied().unwrap_or(0);
            let comm = if tgid == 0 {
                String::new()
            } else {
                comms.entry(tgid).or_insert_with(|| comm_of(tgid)).clone()
            };
            let (family, local, remote) = decode::unmap_v4(s.family, s.local, s.remote);
            KernelEvent {
                fact: Fact::Existing,
                ts_ns,
                cookie: s.cookie,
                tgid,
                pid: tgid,
                comm,
                uid: s.uid,
                cgroup: 0,
                // nsfs inode numbers are 32-bit (`ns_common.inum`), as the hooks report them.
                netns: netns as u32,
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
    stats.without_process = events.iter().filter(|e| e.tgid == 0).count();
    stats.elapsed = start.elapsed();
    Ok((events, stats))
}

/// Numeric /proc entries, ascending, so that the first owner found is the lowest pid.
fn pids() -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// Network namespace inode -> paths that open it. Threads are looked at too: a thread may have
/// `setns()`ed or `unshare()`d away from its process, and its sockets with it.
pub(crate) fn network_namespaces() -> anyhow::Result<BTreeMap<u64, Vec<PathBuf>>> {
    // A stale /run/netns entry whose mount is gone is a plain tmpfs file: accept only nsfs.
    let nsfs = fs::metadata("/proc/self/ns/net")
        .context("/proc/self/ns/net")?
        .dev();
    let mut found: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut add = |path: PathBuf| {
        // Entries vanish while we scan; such a path just does not count.
        let Ok(meta) = fs::metadata(&path) else {
            return;
        };
        if meta.dev() != nsfs {
            return;
        }
        let paths = found.entry(meta.ino()).or_default();
        if paths.len() < PATHS_PER_NETNS {
            paths.push(path);
        }
    };
    // Named namespaces first: bind mounts outlive any process.
    for dir in NAMED_NETNS_DIRS {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            add(entry.path());
        }
    }
    for pid in pids() {
        add(PathBuf::from(format!("/proc/{pid}/ns/net")));
        for task in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            // The leader's is /proc/PID/ns/net, already added.
            if tid != pid {
                add(task.path().join("ns/net"));
            }
        }
    }
    Ok(found)
}

struct NetnsScan {
    inode: u64,
    /// CLOCK_BOOTTIME just before the dump. Earlier than anything the hooks can report about a
    /// socket in the dump after it, so an Existing never lands after that socket's Close.
    ts_ns: u64,
    result: anyhow::Result<Vec<DiagSocket>>,
}

fn dump_namespaces(namespaces: BTreeMap<u64, Vec<PathBuf>>) -> anyhow::Result<Vec<NetnsScan>> {
    std::thread::Builder::new()
        .name("udpmon-netns".into())
        .spawn(move || {
            // Entering our own namespace needs no setns(), which also spares us CAP_SYS_ADMIN
            // there.
            let mut current = fs::metadata("/proc/thread-self/ns/net")
                .map(|m| m.ino())
                .ok();
            namespaces
                .into_iter()
                .map(|(inode, paths)| {
                    let mut ts_ns = 0;
                    let result = enter(inode, &paths, &mut current).and_then(|()| {
                        ts_ns = crate::clock::boot_ns();
                        let mut diag = SockDiag::open()?;
                        let mut sockets = diag.dump(libc::AF_INET as u8).context("IPv4")?;
                        sockets.extend(diag.dump(libc::AF_INET6 as u8).context("IPv6")?);
                        Ok(sockets)
                    });
                    NetnsScan {
                        inode,
                        ts_ns,
                        result,
                    }
                })
                .collect()
        })
        .context("spawning the namespace scan thread")?
        .join()
        .map_err(|_| anyhow!("the namespace scan thread panicked"))
}

/// Moves the calling thread into network namespace `inode`, through the first path that still
/// leads to it (a pid may have been reused for a process elsewhere).
pub(crate) fn enter(
    inode: u64,
    paths: &[PathBuf],
    current: &mut Option<u64>,
) -> anyhow::Result<()> {
    if *current == Some(inode) {
        return Ok(());
    }
    let file = paths
        .iter()
        .filter_map(|p| fs::File::open(p).ok())
        .find(|f| f.metadata().is_ok_and(|m| m.ino() == inode))
        .ok_or_else(|| anyhow!("vanished"))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    *current = Some(inode);
    Ok(())
}

/// A NETLINK_SOCK_DIAG socket, bound to the namespace of the thread that opened it.
struct SockDiag {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

impl SockDiag {
    fn open() -> anyhow::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("NETLINK_SOCK_DIAG socket");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        Ok(Self {
            fd,
            buf: vec![0; RECV_BUF],
            seq: 0,
        })
    }

    /// Every UDP socket of `family` in this socket's namespace.
    fn dump(&mut self, family: u8) -> anyhow::Result<Vec<DiagSocket>> {
        self.seq += 1;
        let req = dump_request(family, self.seq);
        // SAFETY: sockaddr_nl is plain data; all-zero is valid (kernel, no groups).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: buffer and address are valid for the lengths given.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err).context("sending the dump request");
            }
        }
        let mut sockets = Vec::new();
        loop {
            // MSG_TRUNC makes netlink return the datagram's real length, so that a cut-off
            // reply is detected instead of parsed.
            // SAFETY: the buffer is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).context("receiving the dump");
            }
            let n = n as usize;
            if n == 0 {
                bail!("sock_diag closed the dump without NLMSG_DONE");
            }
            if n > self.buf.len() {
                bail!(
                    "sock_diag reply of {n} bytes exceeds the {} byte buffer",
                    self.buf.len()
                );
            }
            let parsed = parse_diag(&self.buf[..n])?;
            sockets.extend(parsed.sockets);
            if parsed.done {
                return Ok(sockets);
            }
        }
    }
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for all UDP sockets of `family`, in any state.
fn dump_request(family: u8, seq: u32) -> [u8; NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN] {
    let mut req = [0; NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: addressed to the kernel.
    let body = &mut req[NLMSG_HDRLEN..];
    body[0] = family;
    body[1] = libc::IPPROTO_UDP as u8;
    // idiag_ext 0: the base message has all we need. idiag_states: all of them, since an
    // unconnected UDP socket is TCP_CLOSE and a connected one TCP_ESTABLISHED.
    body[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // The zeroed inet_diag_sockid matches every socket.
    req
}

/// One socket from a sock_diag dump.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiagSocket {
    family: Family,
    /// TCP state numbering: TCP_ESTABLISHED when connected, TCP_CLOSE otherwise.
    state: u8,
    local: SocketAddr,
    remote: SocketAddr,
    /// The kernel's socket cookie, the value `bpf_get_socket_cookie` returns.
    cookie: u64,
    uid: u32,
    /// sockfs inode, for the `socket:[INODE]` links in /proc/PID/fd.
    inode: u32,
}

/// The sockets of one dump datagram, and whether it ended the dump.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    sockets: Vec<DiagSocket>,
    done: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum DiagError {
    /// A message runs past the datagram, or is shorter than its type requires.
    Truncated {
        offset: usize,
    },
    /// The kernel refused or aborted the dump with this (positive) errno.
    Kernel(i32),
    UnknownFamily(u8),
}

impl fmt::Display for DiagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { offset } => write!(f, "truncated netlink message at byte {offset}"),
            Self::Kernel(errno) => write!(f, "sock_diag: {}", io::Error::from_raw_os_error(*errno)),
            Self::UnknownFamily(family) => write!(f, "socket of unknown family {family}"),
        }
    }
}

impl std::error::Error for DiagError {}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses one datagram of netlink messages from a sock_diag dump.
fn parse_diag(buf: &[u8]) -> Result<Parsed, DiagError> {
    let mut parsed = Parsed::default();
    let mut offset = 0;
    while offset < buf.len() {
        let msg = &buf[offset..];
        if msg.len() < NLMSG_HDRLEN {
            return Err(DiagError::Truncated { offset });
        }
        let len = ne_u32(msg, 0) as usize;
        if len < NLMSG_HDRLEN || len > msg.len() {
            return Err(DiagError::Truncated { offset });
        }
        let payload = &msg[NLMSG_HDRLEN..len];
        match ne_u16(msg, 4) {
            SOCK_DIAG_BY_FAMILY => parsed
                .sockets
                .push(parse_diag_msg(payload).ok_or(DiagError::Truncated { offset })??),
            NLMSG_DONE => {
                // A dump that fails midway reports the errno here.
                if payload.len() >= 4 {
                    let errno = ne_u32(payload, 0) as i32;
                    if errno < 0 {
                        return Err(DiagError::Kernel(-errno));
                    }
                }
                parsed.done = true;
                return Ok(parsed);
            }
            NLMSG_ERROR => {
                if payload.len() < 4 {
                    return Err(DiagError::Truncated { offset });
                }
                let errno = ne_u32(payload, 0) as i32;
                if errno < 0 {
                    return Err(DiagError::Kernel(-errno));
                }
                // Error 0 is an acknowledgement, which ends the exchange as well.
                parsed.done = true;
                return Ok(parsed);
            }
            // NLMSG_NOOP and anything newer carry no sockets.
            _ => {}
        }
        offset += len.next_multiple_of(4);
    }
    Ok(parsed)
}

/// `None` when the payload is too short for an `inet_diag_msg`.
fn parse_diag_msg(m: &[u8]) -> Option<Result<DiagSocket, DiagError>> {
    if m.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let family = match i32::from(m[0]) {
        libc::AF_INET => Family::V4,
        libc::AF_INET6 => Family::V6,
        _ => return Some(Err(DiagError::UnknownFamily(m[0]))),
    };
    // Ports and addresses are in network order, the rest in host order.
    let addr = |at: usize| -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(m[at], m[at + 1], m[at + 2], m[at + 3])),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&m[at..at + 16]).expect("16 bytes"),
            )),
        }
    };
    let port = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]);
    Some(Ok(DiagSocket {
        family,
        state: m[1],
        local: SocketAddr::new(addr(8), port(4)),
        remote: SocketAddr::new(addr(24), port(6)),
        cookie: u64::from(ne_u32(m, 44)) | u64::from(ne_u32(m, 48)) << 32,
        uid: ne_u32(m, 64),
        inode: ne_u32(m, 68),
    }))
}

/// The inode of a `socket:[INODE]` fd link target.
fn parse_socket_link(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Socket inode -> lowest pid holding a descriptor for it, for the inodes in `wanted`.
/// Socket inodes come from the one sockfs, so they are unique across namespaces.
fn socket_owners(wanted: &HashSet<u64>) -> HashMap<u64, u32> {
    let mut owners = HashMap::new();
    for pid in pids() {
        if owners.len() == wanted.len() {
            break;
        }
        // Processes exit and fds close while we look: whatever cannot be read is skipped.
        for entry in fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            if let Some(inode) = parse_socket_link(target.as_os_str().as_bytes())
                && wanted.contains(&inode)
            {
                owners.entry(inode).or_insert(pid);
            }
        }
    }
    owners
}

fn comm_of(pid: u32) -> String {
    fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        .map(|c| c.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsRawFd, sync::mpsc};

    use super::*;

    fn nlmsg(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI, as in a real dump
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn diag_msg(sock: &DiagSocket) -> Vec<u8> {
        let mut m = vec![0u8; INET_DIAG_MSG_LEN];
        m[0] = match sock.family {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        };
        m[1] = sock.state;
        m[4..6].copy_from_slice(&sock.local.port().to_be_bytes());
        m[6..8].copy_from_slice(&sock.remote.port().to_be_bytes());
        for (at, ip) in [(8, sock.local.ip()), (24, sock.remote.ip())] {
            match ip {
                IpAddr::V4(a) => m[at..at + 4].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => m[at..at + 16].copy_from_slice(&a.octets()),
            }
        }
        m[44..48].copy_from_slice(&(sock.cookie as u32).to_ne_bytes());
        m[48..52].copy_from_slice(&((sock.cookie >> 32) as u32).to_ne_bytes());
        m[64..68].copy_from_slice(&sock.uid.to_ne_bytes());
        m[68..72].copy_from_slice(&sock.inode.to_ne_bytes());
        // The kernel appends attributes (INET_DIAG_SHUTDOWN, ...) that must be skipped.
        m.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]);
        m
    }

    fn v4_connected() -> DiagSocket {
        DiagSocket {
            family: Family::V4,
            state: TCP_ESTABLISHED,
            local: "10.200.0.1:54321".parse().unwrap(),
            remote: "10.200.0.2:53".parse().unwrap(),
            cookie: 0x1234_5678_9abc_def0,
            uid: 1000,
            inode: 424242,
        }
    }

    fn v6_unconnected() -> DiagSocket {
        DiagSocket {
            family: Family::V6,
            state: 7, // TCP_CLOSE
            local: "[fd00:200::1]:5353".parse().unwrap(),
            remote: "[::]:0".parse().unwrap(),
            cookie: 4097,
            uid: 0,
            inode: 7,
        }
    }

    fn errno_payload(errno: i32) -> Vec<u8> {
        // nlmsgerr: the error, then the offending request's header.
        let mut p = errno.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; NLMSG_HDRLEN]);
        p
    }

    #[test]
    fn parses_a_dump() {
        let mut buf = nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(&v4_connected()));
        buf.extend(nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(&v6_unconnected())));
        let parsed = parse_diag(&buf).unwrap();
        assert_eq!(parsed.sockets, [v4_connected(), v6_unconnected()]);
        assert!(!parsed.done, "no NLMSG_DONE yet: more datagrams follow");

        buf.extend(nlmsg(NLMSG_DONE, &0i32.to_ne_bytes()));
        let parsed = parse_diag(&buf).unwrap();
        assert_eq!(parsed.sockets.len(), 2);
        assert!(parsed.done);
        assert_eq!(
            parse_diag(&nlmsg(NLMSG_DONE, &[])).unwrap(),
            Parsed {
                sockets: vec![],
                done: true
            }
        );
    }

    #[test]
    fn skips_messages_without_sockets() {
        let mut buf = nlmsg(1, &[]); // NLMSG_NOOP
        buf.extend(nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(&v4_connected())));
        assert_eq!(parse_diag(&buf).unwrap().sockets, [v4_connected()]);
    }

    #[test]
    fn reports_kernel_errors() {
        let buf = nlmsg(NLMSG_ERROR, &errno_payload(-libc::ENOENT));
        assert_eq!(parse_diag(&buf), Err(DiagError::Kernel(libc::ENOENT)));
        let buf = nlmsg(NLMSG_DONE, &(-libc::EINTR).to_ne_bytes());
        assert_eq!(parse_diag(&buf), Err(DiagError::Kernel(libc::EINTR)));
        // An acknowledgement is not an error.
        assert!(
            parse_diag(&nlmsg(NLMSG_ERROR, &errno_payload(0)))
                .unwrap()
                .done
        );
        assert_eq!(
            parse_diag(&nlmsg(NLMSG_ERROR, &[0; 2])),
            Err(DiagError::Truncated { offset: 0 })
        );
    }

    #[test]
    fn rejects_truncated_messages() {
        let whole = nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(&v4_connected()));
        let mut buf = nlmsg(NLMSG_DONE - 2, &[]); // NOOP, 16 bytes
        buf.extend_from_slice(&whole[..whole.len() - 12]);
        assert_eq!(parse_diag(&buf), Err(DiagError::Truncated { offset: 16 }));
        assert_eq!(
            parse_diag(&whole[..10]),
            Err(DiagError::Truncated { offset: 0 })
        );
        // A header that claims less than an inet_diag_msg.
        let short = nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(&v4_connected())[..40]);
        assert_eq!(parse_diag(&short), Err(DiagError::Truncated { offset: 0 }));
        // A length below the header's own size would loop forever if accepted.
        let mut zero = nlmsg(NLMSG_DONE, &[]);
        zero[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_diag(&zero), Err(DiagError::Truncated { offset: 0 }));
    }

    #[test]
    fn rejects_unknown_families() {
        let mut m = diag_msg(&v4_connected());
        m[0] = 1; // AF_UNIX
        assert_eq!(
            parse_diag(&nlmsg(SOCK_DIAG_BY_FAMILY, &m)),
            Err(DiagError::UnknownFamily(1))
        );
    }

    #[test]
    fn builds_the_dump_request() {
        let req = dump_request(libc::AF_INET6 as u8, 3);
        assert_eq!(ne_u32(&req, 0) as usize, req.len());
        assert_eq!(ne_u16(&req, 4), SOCK_DIAG_BY_FAMILY);
        assert_eq!(ne_u16(&req, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(ne_u32(&req, 8), 3);
        assert_eq!(
            &req[16..20],
            &[libc::AF_INET6 as u8, libc::IPPROTO_UDP as u8, 0, 0]
        );
        assert_eq!(ne_u32(&req, 20), u32::MAX);
        assert!(req[24..].iter().all(|&b| b == 0));
    }

    #[test]
    fn parses_socket_links() {
        assert_eq!(parse_socket_link(b"socket:[123]"), Some(123));
        assert_eq!(parse_socket_link(b"socket:[4294967296]"), Some(1 << 32));
        for bad in [
            &b"socket:[]"[..],
            b"socket:[12a]",
            b"socket:[123",
            b"socket:[+1]",
            b"pipe:[123]",
            b"/dev/null",
            b"anon_inode:[eventfd]",
        ] {
            assert_eq!(
                parse_socket_link(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

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

    #[test]
    fn finds_its_own_socket_owner() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = fs::metadata(format!("/proc/self/fd/{}", sock.as_raw_fd()))
            .unwrap()
            .ino();
        let owners = socket_owners(&HashSet::from([inode]));
        assert_eq!(owners.get(&inode), Some(&std::process::id()));
    }

    #[test]
    fn enumerates_its_own_namespace() {
        let namespaces = network_namespaces().unwrap();
        assert!(namespaces.contains_key(&inode_of("/proc/self/ns/net")));
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
        let (events, stats) = existing_sockets_with_stats().unwrap();
        println!("{stats}");
        let ev = events
            .iter()
            .find(|e| e.local == local && e.remote == "127.0.0.1:9".parse().unwrap())
            .unwrap_or_else(|| panic!("{local} not among {events:#?}"));
        assert_eq!(ev.fact, Fact::Existing);
        assert_eq!(ev.family, Family::V4);
        assert!(ev.connected && !ev.recverr && !ev.task_unrelated);
        assert_eq!(ev.tgid, std::process::id());
        assert_eq!(ev.pid, ev.tgid);
        assert!(!ev.comm.is_empty());
        assert_eq!(ev.uid, 0);
        assert_eq!(u64::from(ev.netns), inode_of("/proc/self/ns/net"));
        assert_ne!(ev.cookie, 0);
        assert_eq!(ev.cookie, so_cookie(&sock));
        assert!(ev.ts_ns > 0 && ev.ts_ns <= crate::clock::boot_ns());
        assert!(stats.netns_scanned >= 1 && stats.sockets >= 1);
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
        let events = existing_sockets().unwrap();
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        let ev = events
            .iter()
            .find(|e| e.cookie == cookie)
            .unwrap_or_else(|| panic!("cookie {cookie} not among {events:#?}"));
        assert_eq!(u64::from(ev.netns), netns);
        assert_eq!(ev.local, local);
        assert_eq!(ev.family, Family::V6);
        assert_eq!(ev.remote, "[::]:0".parse().unwrap());
        assert!(!ev.connected);
        assert_eq!(ev.tgid, std::process::id());
    }
}
