//! sock_diag: every UDP socket of one network namespace (the namespace of the thread that
//! opens the netlink socket), from NETLINK_SOCK_DIAG dumps.
use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::decode::Family;

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
pub const TCP_ESTABLISHED: u8 = 1;

/// Large enough for any dump datagram: the kernel sizes them after the reader's buffer, up to
/// 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// sock_diag answers from memory; a silent kernel means something is badly wrong.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A NETLINK_SOCK_DIAG socket, bound to the namespace of the thread that opened it.
pub struct SockDiag {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

impl SockDiag {
    pub fn open() -> anyhow::Result<Self> {
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
            // `as _`: time_t is deprecated on musl (it is to become 64-bit there).
            tv_sec: RECV_TIMEOUT.as_secs() as _,
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
    pub fn dump(&mut self, family: u8) -> anyhow::Result<Vec<DiagSocket>> {
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
pub struct DiagSocket {
    pub family: Family,
    /// TCP state numbering: TCP_ESTABLISHED when connected, TCP_CLOSE otherwise.
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's socket cookie, the value `bpf_get_socket_cookie` returns.
    pub cookie: u64,
    pub uid: u32,
    /// sockfs inode, for the `socket:[INODE]` links in /proc/PID/fd.
    pub inode: u32,
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

#[cfg(test)]
mod tests {
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
}
