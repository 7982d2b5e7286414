//! Ring-buffer records -> typed events. The only place that knows the raw layout.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::identity::{Identity, Name};
use udpmon_common::{
    Event, EventKind,
    event::{AF_INET, AF_INET6, flags, verdict},
};

/// IP family of a flow's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// What the kernel did with an ICMP error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `sk_err` set: the application's next call fails.
    Notified,
    /// Queued on the socket's error queue (IP_RECVERR).
    Queued,
    /// A socket matched, but the error was dropped: the application cannot know.
    Discarded,
    /// No socket matched the datagram the ICMP is about. In a kernel record: no socket was
    /// told, which the engine tells from [`Verdict::Discarded`] by the flows it tracks.
    NoSocket,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    /// ICMP (v4) or ICMPv6 type and code; which one follows from the event's family.
    pub ty: u8,
    pub code: u8,
    /// The errno the kernel reported (`sk_err`), when it reported one.
    pub errno: Option<i32>,
    /// The ICMP sender.
    pub from: IpAddr,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// First datagram sent on the flow; payload bytes.
    FirstTx {
        bytes: u32,
    },
    /// First datagram received on the flow; payload bytes.
    FirstRx {
        bytes: u32,
    },
    /// connect() to `remote`; `remote` unspecified (0.0.0.0:0) for AF_UNSPEC (disconnect).
    Connect,
    Icmp(Icmp),
    /// A send call failed with this (positive) errno.
    SendError {
        errno: i32,
    },
    /// A receive call failed with this (positive) errno.
    RecvError {
        errno: i32,
    },
    /// The socket was released.
    Close,
    /// A datagram from `remote` reached local port `local` where no socket listens.
    NoSocket,
    /// A socket that existed when udpmon started.
    Existing,
    /// Another process took the socket over: the event's owner is its holder from now on.
    Holder,
    /// Process `tgid`, which held a socket, exited. No socket.
    Exit,
    /// Process `tgid`, which held a socket, exec'd: the event names it as it is now. No socket.
    Exec,
    /// A flow quiet for a while sent or received a datagram again. No owner.
    Wake,
}

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    pub fact: Fact,
    /// CLOCK_BOOTTIME nanoseconds.
    pub ts_ns: u64,
    /// Socket cookie; 0 when no socket is involved (NoSocket, ICMP without a socket).
    pub cookie: u64,
    /// Who ran the hook (or, where the kernel side knows it, the socket's holder): its
    /// process name is not in the kernel's record, the agent fills it in
    /// (`procfs::ProcessNames`; "" when unknown). `netns` is the socket's, 0 when the hook
    /// could not see it.
    pub who: Identity,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// pid/comm are whatever task ran the hook (softirq), not the socket's owner.
    pub task_unrelated: bool,
    /// The socket was connected when the hook ran (where the strategy can tell).
    pub connected: bool,
    /// The socket has IP_RECVERR/IPV6_RECVERR (where the strategy can tell).
    pub recverr: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is not `size_of::<Event>()` bytes long.
    Size(usize),
    UnknownKind(u16),
    UnknownFamily(u16),
    UnknownVerdict(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Size(n) => write!(f, "record of {n} bytes, expected {}", size_of::<Event>()),
            Self::UnknownKind(k) => write!(f, "unknown event kind {k}"),
            Self::UnknownFamily(k) => write!(f, "unknown address family {k}"),
            Self::UnknownVerdict(k) => write!(f, "unknown ICMP verdict {k}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn ip(family: Family, raw: &[u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(*raw)),
    }
}

/// A dual-stack (AF_INET6) socket that talks to an IPv4 peer through a v4-mapped address
/// (`::ffff:a.b.c.d`) as the IPv4 socket it is on the wire: the datagram hooks see IPv4
/// packets, so the flow is keyed by the IPv4 address, and what is read from the socket
/// itself (errors, close, sockets that existed at startup) must name the same flow.
pub fn unmap_v4(
    family: Family,
    local: SocketAddr,
    remote: SocketAddr,
) -> (Family, SocketAddr, SocketAddr) {
    let (IpAddr::V6(l), IpAddr::V6(r)) = (local.ip(), remote.ip()) else {
        return (family, local, remote);
    };
    let v4 = |a: Ipv6Addr| match a.to_ipv4_mapped() {
        Some(v4) => Some(v4),
        None if a.is_unspecified() => Some(Ipv4Addr::UNSPECIFIED),
        None => None,
    };
    // The peer decides; an unconnected socket bound to a v4-mapped address is IPv4 too.
    let mapped =
        r.to_ipv4_mapped().is_some() || (r.is_unspecified() && l.to_ipv4_mapped().is_some());
    match (mapped, v4(l), v4(r)) {
        (true, Some(l4), Some(r4)) => (
            Family::V4,
            SocketAddr::new(IpAddr::V4(l4), local.port()),
            SocketAddr::new(IpAddr::V4(r4), remote.port()),
        ),
        _ => (family, local, remote),
    }
}

/// The record as the kernel wrote it (for the fields the typed event leaves out, such as the
/// netns cookie that userspace resolves).
pub fn raw(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length is checked, Event is Pod; read_unaligned copes with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

pub fn decode_event(ev: &Event) -> Result<KernelEvent, DecodeError> {
    let kind = EventKind::from_u16(ev.kind).ok_or(DecodeError::UnknownKind(ev.kind))?;
    let family = match ev.family {
        AF_INET => Family::V4,
        AF_INET6 => Family::V6,
        // A disconnect (connect with AF_UNSPEC) carries no address, nor do a take-over and
        // a holder's exit or exec.
        0 if matches!(
            kind,
            EventKind::Connect
                | EventKind::Close
                | EventKind::Holder
                | EventKind::Exit
                | EventKind::Exec
        ) =>
        {
            Family::V4
        }
        f => return Err(DecodeError::UnknownFamily(f)),
    };
    let errno = (-ev.ret).max(0);
    let fact = match kind {
        EventKind::FirstTx => Fact::FirstTx {
            bytes: ev.ret.max(0) as u32,
        },
        EventKind::FirstRx => Fact::FirstRx {
            bytes: ev.ret.max(0) as u32,
        },
        EventKind::Connect => Fact::Connect,
        EventKind::Icmp => Fact::Icmp(Icmp {
            ty: ev.icmp_type,
            code: ev.icmp_code,
            errno: (ev.icmp_errno != 0).then_some(ev.icmp_errno as i32),
            from: ip(family, &ev.icmp_from),
            verdict: match ev.verdict {
                verdict::NOTIFIED => Verdict::Notified,
                verdict::QUEUED => Verdict::Queued,
                verdict::DISCARDED => Verdict::Discarded,
                verdict::NO_SOCKET => Verdict::NoSocket,
                v => return Err(DecodeError::UnknownVerdict(v)),
            },
        }),
        EventKind::SendError => Fact::SendError { errno },
        EventKind::RecvError => Fact::RecvError { errno },
        EventKind::Close => Fact::Close,
        EventKind::NoSocket => Fact::NoSocket,
        EventKind::Existing => Fact::Existing,
        EventKind::Holder => Fact::Holder,
        EventKind::Exit => Fact::Exit,
        EventKind::Exec => Fact::Exec,
        EventKind::Wake => Fact::Wake,
    };
    let (family, local, remote) = unmap_v4(
        family,
        SocketAddr::new(ip(family, &ev.local), ev.lport),
        SocketAddr::new(ip(family, &ev.remote), ev.rport),
    );
    Ok(KernelEvent {
        fact,
        ts_ns: ev.ts_ns,
        cookie: ev.cookie,
        who: Identity {
            tgid: ev.tgid,
            pid: ev.pid,
            comm: Name::from_comm(&ev.comm),
            process: Name::EMPTY,
            uid: ev.uid,
            cgroup: ev.cgroup,
            netns: ev.netns,
        },
        family,
        local,
        remote,
        task_unrelated: ev.flags & flags::TASK_UNRELATED != 0,
        connected: ev.flags & flags::CONNECTED != 0,
        recverr: ev.flags & flags::RECVERR != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
        decode_event(&raw(bytes)?)
    }

    fn bytes(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) without padding.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn decodes_an_icmp_record() {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::Icmp as u16;
        ev.family = AF_INET;
        ev.cookie = 4097;
        ev.tgid = 42;
        ev.pid = 43;
        ev.comm[..2].copy_from_slice(b"nc");
        ev.local[..4].copy_from_slice(&[10, 200, 0, 1]);
        ev.remote[..4].copy_from_slice(&[10, 200, 0, 2]);
        ev.lport = 54321;
        ev.rport = 12345;
        ev.icmp_type = 3;
        ev.icmp_code = 3;
        ev.icmp_errno = 111;
        ev.verdict = verdict::NOTIFIED;
        ev.icmp_from[..4].copy_from_slice(&[10, 200, 0, 2]);
        ev.flags = flags::CONNECTED;
        let d = decode(&bytes(&ev)).unwrap();
        assert_eq!(d.who.comm, "nc");
        assert_eq!(d.local, "10.200.0.1:54321".parse().unwrap());
        assert_eq!(d.remote, "10.200.0.2:12345".parse().unwrap());
        assert!(d.connected && !d.recverr && !d.task_unrelated);
        assert_eq!(
            d.fact,
            Fact::Icmp(Icmp {
                ty: 3,
                code: 3,
                errno: Some(111),
                from: "10.200.0.2".parse().unwrap(),
                verdict: Verdict::Notified
            })
        );
    }

    #[test]
    fn decodes_v6_addresses_and_errors() {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::SendError as u16;
        ev.family = AF_INET6;
        ev.remote = "fd00:200::2".parse::<Ipv6Addr>().unwrap().octets();
        ev.rport = 7000;
        ev.ret = -111;
        let d = decode(&bytes(&ev)).unwrap();
        assert_eq!(d.remote, "[fd00:200::2]:7000".parse().unwrap());
        assert_eq!(d.fact, Fact::SendError { errno: 111 });
    }

    /// A wake names its flow as the flow's first-datagram record did, v4-mapped or not.
    #[test]
    fn decodes_a_wake_as_its_flow() {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::Wake as u16;
        ev.family = AF_INET6;
        ev.cookie = 9;
        ev.local = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        ev.lport = 5000;
        ev.remote = "::ffff:10.0.0.2".parse::<Ipv6Addr>().unwrap().octets();
        ev.rport = 53;
        let d = decode(&bytes(&ev)).unwrap();
        assert_eq!(d.fact, Fact::Wake);
        assert_eq!((d.cookie, d.family), (9, Family::V4));
        assert_eq!(d.remote, "10.0.0.2:53".parse().unwrap());
    }

    #[test]
    fn v4_mapped_addresses_are_ipv4() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let un = |l: &str, r: &str| unmap_v4(Family::V6, a(l), a(r));
        // Connected to a v4-mapped peer, bound to the wildcard or to a mapped address.
        assert_eq!(
            un("[::]:5000", "[::ffff:127.0.0.1]:9"),
            (Family::V4, a("0.0.0.0:5000"), a("127.0.0.1:9"))
        );
        assert_eq!(
            un("[::ffff:10.0.0.1]:5000", "[::ffff:10.0.0.2]:53"),
            (Family::V4, a("10.0.0.1:5000"), a("10.0.0.2:53"))
        );
        // Unconnected, bound to a mapped address.
        assert_eq!(
            un("[::ffff:10.0.0.1]:5000", "[::]:0"),
            (Family::V4, a("10.0.0.1:5000"), a("0.0.0.0:0"))
        );
        // Real IPv6 stays IPv6, the wildcard on both sides too.
        for (l, r) in [("[fd00::1]:5000", "[fd00::2]:53"), ("[::]:5000", "[::]:0")] {
            assert_eq!(un(l, r), (Family::V6, a(l), a(r)));
        }
        // A record with a v4-mapped peer decodes as IPv4.
        let mut ev = Event::zeroed();
        ev.kind = EventKind::RecvError as u16;
        ev.family = AF_INET6;
        ev.remote = "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        ev.rport = 9;
        ev.ret = -111;
        let d = decode(&bytes(&ev)).unwrap();
        assert_eq!((d.family, d.remote), (Family::V4, a("127.0.0.1:9")));
        assert_eq!(d.local, a("0.0.0.0:0"));
    }

    /// A take-over, an exit and an exec carry no address (family 0) and no socket but the
    /// take-over's.
    #[test]
    fn decodes_holder_records_without_addresses() {
        for (kind, fact) in [
            (EventKind::Holder, Fact::Holder),
            (EventKind::Exit, Fact::Exit),
            (EventKind::Exec, Fact::Exec),
        ] {
            let mut ev = Event::zeroed();
            ev.kind = kind as u16;
            ev.tgid = 77;
            ev.pid = 77;
            ev.comm[..4].copy_from_slice(b"sh-2");
            let d = decode(&bytes(&ev)).unwrap();
            assert_eq!(d.fact, fact);
            assert_eq!((d.who.tgid, d.who.comm), (77, Name::new("sh-2")));
        }
        // Other kinds must say where they happened.
        let mut ev = Event::zeroed();
        ev.kind = EventKind::FirstTx as u16;
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::UnknownFamily(0)));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0; 3]), Err(DecodeError::Size(3)));
        let mut ev = Event::zeroed();
        ev.kind = 999;
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::UnknownKind(999)));
        ev.kind = EventKind::FirstTx as u16;
        ev.family = 1;
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::UnknownFamily(1)));
    }
}
