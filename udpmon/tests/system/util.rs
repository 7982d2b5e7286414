//! Helpers shared by the issue-5 scenarios: addresses, flow stories out of udpmon's events,
//! nftables in a namespace, and the socket calls std does not offer (IP_RECVERR and the error
//! queue, sendmmsg/recvmmsg, connect(AF_UNSPEC)).
use std::{
    io::{self, Write as _},
    mem,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{Strategy, TwoHosts, Udpmon, deadline, s, wait_until};

/// `ip:port` as udpmon prints it (IPv6 in brackets).
pub fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// A socket's local address as udpmon prints it.
pub fn local_of(sock: &UdpSocket) -> String {
    sock.local_addr().expect("local_addr").to_string()
}

/// A socket's cookie (SO_COOKIE), as udpmon prints it: what names a socket when its port
/// may have been another's a moment ago.
pub fn cookie_of(sock: &UdpSocket) -> u64 {
    let mut cookie = 0u64;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call and have the sizes passed.
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

/// Whether a UDP port is bound in a namespace (its udp table lists it).
fn udp_port_bound(netns: &str, port: u16, v6: bool) -> bool {
    let table = if v6 {
        "/proc/net/udp6"
    } else {
        "/proc/net/udp"
    };
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", table])
        .output()
        .expect("reading the udp table");
    String::from_utf8_lossy(&out.stdout).contains(&format!(":{port:04X} "))
}

/// Waits until a UDP port is bound in a namespace.
pub fn wait_until_bound(netns: &str, port: u16, v6: bool) {
    wait_until(
        &format!("UDP port {port} to be bound in {netns}"),
        10,
        || udp_port_bound(netns, port, v6),
    );
}

/// Waits until a UDP port is no longer bound in a namespace.
pub fn wait_until_unbound(netns: &str, port: u16, v6: bool) {
    wait_until(
        &format!("UDP port {port} to be released in {netns}"),
        10,
        || !udp_port_bound(netns, port, v6),
    );
}

/// Whether an event belongs to the flow (socket cookie, remote `addr:port`).
pub fn of_flow(v: &Value, cookie: &Value, remote: &str) -> bool {
    &v["cookie"] == cookie && s(v, "remote") == remote
}

/// The event kinds of a flow so far, in output order.
pub fn story(u: &mut Udpmon, cookie: &Value, remote: &str) -> Vec<String> {
    u.all(|v| of_flow(v, cookie, remote))
        .iter()
        .map(|v| s(v, "event").to_string())
        .collect()
}

/// Asserts a flow's story (its event kinds, in order), with udpmon's output on failure.
pub fn assert_story(u: &mut Udpmon, who: &str, cookie: &Value, remote: &str, want: &[&str]) {
    let got = story(u, cookie, remote);
    assert_eq!(
        got,
        want,
        "{who}: events of flow cookie {cookie} -> {remote}; udpmon printed:\n{}",
        u.dump()
    );
}

/// Who an event should name: process id, command name (of the thread) and netns inode.
#[derive(Clone, Debug)]
pub struct Who<'a> {
    pub pid: u64,
    pub comm: &'a str,
    pub netns: u64,
}

impl<'a> Who<'a> {
    /// This test process (named `comm`) as seen in the client and in the server namespace.
    pub fn test_process(h: &TwoHosts, comm: &'a str) -> (Who<'a>, Who<'a>) {
        let cli = Who {
            pid: std::process::id() as u64,
            comm,
            netns: TwoHosts::netns_inode(&h.client),
        };
        let srv = Who {
            netns: TwoHosts::netns_inode(&h.server),
            ..cli.clone()
        };
        (cli, srv)
    }
}

/// Asserts the identity fields of an event: kind, pid, comm, netns, local and remote address.
pub fn assert_event(v: &Value, event: &str, who: &Who, local: &str, remote: &str) {
    assert_eq!(s(v, "event"), event, "{v}");
    assert_eq!(v["pid"], who.pid, "pid of {v}");
    assert_eq!(s(v, "comm"), who.comm, "comm of {v}");
    assert_eq!(v["netns"], who.netns, "netns of {v}");
    assert_eq!(s(v, "local"), local, "local address of {v}");
    assert_eq!(s(v, "remote"), remote, "remote address of {v}");
}

/// Asserts the CONNECT that a socket's first datagram produced: every strategy sees the
/// datagram's own addresses, so an unconnected socket bound to the wildcard shows the source
/// address the route chose.
pub fn assert_send_connect(c: &Value, who: &Who, local: &str, remote: &str) {
    assert_eq!(c["via"], "send", "{c}");
    assert_event(c, "connect", who, local, remote);
}

/// Asserts the CONNECT that connect() produced: it names its flow (netns, local address) like
/// the flow's later events do. The tracepoint strategy's cgroup connect hook runs before
/// connect() picks the source address and, for a socket not bound to a port, the port: there
/// the local address is what was bound before the call (after connect(AF_UNSPEC) even the
/// previous port), as the README documents, and only the later events carry the real one.
pub fn assert_connect(st: Strategy, c: &Value, who: &Who, local: &str, remote: &str) {
    assert_eq!(c["via"], "connect", "{c}");
    assert_eq!(c["bytes"], Value::Null, "{c}");
    assert_eq!(s(c, "remote"), remote, "remote address of {c}");
    assert_eq!(c["netns"], who.netns, "netns of {c}");
    if st == Strategy::Tracepoint {
        let seen: SocketAddr = s(c, "local").parse().expect("local address");
        let want: SocketAddr = local.parse().expect("local address");
        assert!(
            seen.ip() == want.ip() || seen.ip().is_unspecified(),
            "CONNECT local {seen} is neither {want} nor a wildcard: {c}"
        );
        let mut c = c.clone();
        c["local"] = Value::from(local);
        assert_event(&c, "connect", who, local, remote);
        return;
    }
    assert_event(c, "connect", who, local, remote);
}

/// Asserts an UNREACHABLE's ICMP part.
pub fn assert_icmp(v: &Value, ty: u8, code: u8, from: &str, errno: &str, verdict: &str) {
    let i = &v["icmp"];
    assert_eq!(i["type"], ty, "ICMP type of {v}");
    assert_eq!(i["code"], code, "ICMP code of {v}");
    assert_eq!(i["from"], from, "ICMP sender of {v}");
    assert_eq!(i["errno"], errno, "errno of {v}");
    assert_eq!(i["verdict"], verdict, "verdict of {v}");
}

/// udpmon's exit summary line (`udpmon: stopped; ...`) among its stderr lines.
pub fn exit_summary(stderr: &[String]) -> &str {
    stderr
        .iter()
        .find(|l| l.contains("udpmon: stopped;"))
        .unwrap_or_else(|| panic!("no exit summary in {stderr:?}"))
}

/// The count after `label` in udpmon's exit summary.
pub fn exit_count(summary: &str, label: &str) -> u64 {
    try_exit_count(summary, label).unwrap_or_else(|| panic!("no '{label}' count in {summary}"))
}

fn try_exit_count(summary: &str, label: &str) -> Option<u64> {
    let rest = summary.split(label).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// What udpmon says it lost, from its exit summary: records the kernel could not queue or
/// udpmon not decode or map, and events it could not write.
pub fn losses(stderr: &[String]) -> u64 {
    let summary = exit_summary(stderr);
    summary_losses(summary).unwrap_or_else(|| panic!("loss counts missing from {summary}"))
}

/// As [`losses`], from the summary line itself; `None` when a count is missing from it.
pub fn summary_losses(summary: &str) -> Option<u64> {
    [
        "ring-buffer drops ",
        "decode errors ",
        "flow-map insert failures ",
        "program runs skipped (recursion) ",
        "kprobe misses ",
        "events not written ",
    ]
    .iter()
    .map(|l| try_exit_count(summary, l))
    .sum()
}

/// Asserts a CLOSE's reason and datagram/byte counts. Counts short of these (fewer
/// datagrams, none more) are left for the running udpmon to answer for: they pass only if it
/// says at exit that it lost at least as many (`Udpmon` checks, see `harness::owe_short`). A
/// kernel can skip a program run, and udpmon counts and reports each skip: on a preemptible
/// kernel (7.x, `PREEMPT_LAZY`) a tracing program preempted on the one-CPU VM is "recursion"
/// to the next task that reaches the same hook.
pub fn assert_close(v: &Value, reason: &str, tx: (u64, u64), rx: (u64, u64)) {
    let (got, want) = close_counts(v, reason, tx, rx);
    if got == want {
        return;
    }
    let (d_tx, b_tx, d_rx, b_rx) = got;
    if d_tx <= tx.0 && b_tx <= tx.1 && d_rx <= rx.0 && b_rx <= rx.1 {
        let short = (tx.0 - d_tx) + (rx.0 - d_rx);
        if short > 0 {
            eprintln!(
                "  CLOSE short of {short} datagram(s), to be covered by udpmon's reported losses at its exit: {v}"
            );
            crate::harness::owe_short(short);
            return;
        }
    }
    assert_eq!(
        got, want,
        "(tx datagrams, tx bytes, rx datagrams, rx bytes) of {v}"
    );
}

type Counts = (u64, u64, u64, u64);

/// A CLOSE's (tx datagrams, tx bytes, rx datagrams, rx bytes), and those wanted; asserts the
/// event and its reason.
fn close_counts(v: &Value, reason: &str, tx: (u64, u64), rx: (u64, u64)) -> (Counts, Counts) {
    assert_eq!(s(v, "event"), "close", "{v}");
    assert_eq!(s(v, "reason"), reason, "close reason of {v}");
    let st = &v["stats"];
    let count = |k: &str| st[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    (
        (
            count("tx_datagrams"),
            count("tx_bytes"),
            count("rx_datagrams"),
            count("rx_bytes"),
        ),
        (tx.0, tx.1, rx.0, rx.1),
    )
}

/// Loads an nftables ruleset (`nft -f -`) in a namespace.
pub fn nft(netns: &str, ruleset: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning nft");
    c.stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f - in {netns} failed: {}\nruleset:\n{ruleset}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGKILL to a child, reaped.
pub fn sigkill(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaping the child");
}

/// SIGTERM to a child, reaped within a deadline.
pub fn sigterm(child: &mut Child) {
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_until("the child to exit after SIGTERM", 10, || {
        child.try_wait().unwrap().is_some()
    });
}

/// The child's stdout and stderr once it has exited.
pub fn output_of(child: Child) -> String {
    let out = child.wait_with_output().expect("child output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn setsockopt_int(sock: &UdpSocket, level: i32, name: i32, val: i32) {
    // SAFETY: a valid fd and a pointer to an int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&val as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// IP_RECVERR (IPv4) or IPV6_RECVERR (IPv6) on.
pub fn set_recverr(sock: &UdpSocket) {
    if sock.local_addr().unwrap().is_ipv6() {
        setsockopt_int(sock, libc::SOL_IPV6, libc::IPV6_RECVERR, 1);
    } else {
        setsockopt_int(sock, libc::SOL_IP, libc::IP_RECVERR, 1);
    }
}

/// One error from a socket's error queue (MSG_ERRQUEUE).
#[derive(Debug, PartialEq, Eq)]
pub struct QueuedError {
    pub errno: u32,
    pub origin: u8,
    pub ty: u8,
    pub code: u8,
    /// The original destination (msg_name).
    pub dest: Option<SocketAddr>,
    /// SO_EE_OFFENDER: the ICMP sender.
    pub offender: Option<IpAddr>,
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::new(
                IpAddr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

fn std_to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_be_bytes(a.ip().octets()).to_be();
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Reads one error from the error queue, waiting for one up to a deadline.
pub fn read_errqueue(sock: &UdpSocket) -> QueuedError {
    let fd = sock.as_raw_fd();
    let end = Instant::now() + deadline(10);
    loop {
        let mut data = [0u8; 512];
        let mut ctrl = [0u64; 64];
        // SAFETY: zeroed plain C structs.
        let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: zeroed plain C struct, filled in below.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&ctrl) as _;
        // SAFETY: msg points at live buffers of the stated sizes.
        let rc = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::EAGAIN),
                "recvmsg(MSG_ERRQUEUE): {e}"
            );
            assert!(
                Instant::now() < end,
                "no error on the error queue within {:?}",
                deadline(10)
            );
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // SAFETY: msg was filled by the kernel; CMSG_* walk its control buffer.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let (lvl, ty) = ((*c).cmsg_level, (*c).cmsg_type);
                if (lvl == libc::SOL_IP && ty == libc::IP_RECVERR)
                    || (lvl == libc::SOL_IPV6 && ty == libc::IPV6_RECVERR)
                {
                    let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                    let ee_v = std::ptr::read_unaligned(ee);
                    // SO_EE_OFFENDER: the sockaddr right after the extended error.
                    let off_ptr = ee.add(1) as *const u8;
                    let mut off: libc::sockaddr_storage = mem::zeroed();
                    let avail = (*c).cmsg_len as usize
                        - (off_ptr as usize - c as usize).min((*c).cmsg_len as usize);
                    std::ptr::copy_nonoverlapping(
                        off_ptr,
                        (&mut off as *mut libc::sockaddr_storage).cast::<u8>(),
                        avail.min(mem::size_of::<libc::sockaddr_storage>()),
                    );
                    return QueuedError {
                        errno: ee_v.ee_errno,
                        origin: ee_v.ee_origin,
                        ty: ee_v.ee_type,
                        code: ee_v.ee_code,
                        dest: sockaddr_to_std(&name),
                        offender: sockaddr_to_std(&off).map(|a| a.ip()),
                    };
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        panic!("an error-queue message without an IP_RECVERR/IPV6_RECVERR cmsg");
    }
}

/// connect(AF_UNSPEC): dissolves the socket's association with its peer.
pub fn disconnect(sock: &UdpSocket) {
    // SAFETY: all-zero is a valid sockaddr.
    let mut sa: libc::sockaddr = unsafe { mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: a valid fd and sockaddr.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &sa,
            mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect(AF_UNSPEC): {}", io::Error::last_os_error());
}

/// Sends every message with sendmmsg(2) (to `to`, or to the connected peer); loops on
/// partial sends. Returns the number of sendmmsg calls.
pub fn sendmmsg(sock: &UdpSocket, msgs: &[Vec<u8>], to: Option<SocketAddr>) -> usize {
    let (mut name, namelen) = match to {
        Some(a) => {
            let (ss, len) = std_to_sockaddr(&a);
            (Some(ss), len)
        }
        None => (None, 0),
    };
    let mut iovs: Vec<libc::iovec> = msgs
        .iter()
        .map(|m| libc::iovec {
            iov_base: m.as_ptr() as *mut libc::c_void,
            iov_len: m.len(),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: zeroed plain C struct, filled in below.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(n) = name.as_mut() {
                h.msg_hdr.msg_name = (n as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = namelen;
            }
            h
        })
        .collect();
    let (mut sent, mut calls) = (0, 0);
    while sent < hdrs.len() {
        // SAFETY: the headers point at live iovecs, buffers and address.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs[sent..].as_mut_ptr(),
                (hdrs.len() - sent) as u32,
                0,
            )
        };
        assert!(rc > 0, "sendmmsg: {}", io::Error::last_os_error());
        sent += rc as usize;
        calls += 1;
    }
    calls
}

/// Receives `want` datagrams with recvmmsg(2) (MSG_WAITFORONE), within a deadline. Returns
/// the payloads and their senders.
pub fn recvmmsg(sock: &UdpSocket, want: usize) -> Vec<(Vec<u8>, Option<SocketAddr>)> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + deadline(10);
    let mut got = Vec::new();
    while got.len() < want {
        let n = want - got.len();
        let mut bufs = vec![[0u8; 2048]; n];
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { mem::zeroed() }; n];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(names.iter_mut())
            .map(|(iov, name)| {
                // SAFETY: zeroed plain C struct, filled in below.
                let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as _;
                h
            })
            .collect();
        // SAFETY: the headers point at live iovecs and buffers.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_WAITFORONE as _, // glibc takes c_int, musl c_uint
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            assert!(
                matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)),
                "recvmmsg: {e}"
            );
            assert!(
                Instant::now() < end,
                "recvmmsg: {} of {want} datagrams within {:?}",
                got.len(),
                deadline(10)
            );
            continue;
        }
        for i in 0..rc as usize {
            let len = hdrs[i].msg_len as usize;
            got.push((bufs[i][..len].to_vec(), sockaddr_to_std(&names[i])));
        }
    }
    sock.set_read_timeout(None).unwrap();
    got
}

/// Sends one datagram with sendmsg(2): to `to` (msg_name set), or with msg_name NULL to the
/// connected peer. Returns the bytes sent.
pub fn sendmsg(sock: &UdpSocket, payload: &[u8], to: Option<SocketAddr>) -> usize {
    let mut name = to.as_ref().map(std_to_sockaddr);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: zeroed plain C struct, filled in below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    if let Some((ss, len)) = name.as_mut() {
        msg.msg_name = (ss as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = *len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: msg points at a live iovec, buffer and address.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    assert!(rc >= 0, "sendmsg: {}", io::Error::last_os_error());
    rc as usize
}

/// Receives one datagram with recvmsg(2), blocking up to a deadline (SO_RCVTIMEO, restored
/// afterwards). Returns the payload and its sender (msg_name).
pub fn recvmsg(sock: &UdpSocket) -> (Vec<u8>, Option<SocketAddr>) {
    let old = sock.read_timeout().unwrap();
    sock.set_read_timeout(Some(deadline(10))).unwrap();
    let mut data = [0u8; 2048];
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: zeroed plain C struct, filled in below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: msg points at live buffers of the stated sizes.
    let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    let err = io::Error::last_os_error();
    sock.set_read_timeout(old).unwrap();
    assert!(rc >= 0, "recvmsg (deadline {:?}): {err}", deadline(10));
    assert_eq!(msg.msg_flags & libc::MSG_TRUNC, 0, "recvmsg: truncated");
    let from = if msg.msg_namelen > 0 {
        sockaddr_to_std(&name)
    } else {
        None
    };
    (data[..rc as usize].to_vec(), from)
}
