//! What the engine hands to the formatters: one [`Report`] per operator-facing event.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

pub use crate::identity::{Identity, Name};
use crate::{
    container::Container,
    decode::{Family, Verdict},
};

/// The operator-facing event kinds (PRODUCT.md, "Flows and events").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReportKind {
    Connect,
    Accept,
    Establish,
    Unreachable,
    Silent,
    Resumed,
    AppError,
    Close,
    Refused,
    Summary,
}

impl ReportKind {
    pub const ALL: [ReportKind; 10] = [
        Self::Connect,
        Self::Accept,
        Self::Establish,
        Self::Unreachable,
        Self::Silent,
        Self::Resumed,
        Self::AppError,
        Self::Close,
        Self::Refused,
        Self::Summary,
    ];

    /// The lower-case name used by `--events` and the JSON `event` key.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Accept => "accept",
            Self::Establish => "establish",
            Self::Unreachable => "unreachable",
            Self::Silent => "silent",
            Self::Resumed => "resumed",
            Self::AppError => "app-error",
            Self::Close => "close",
            Self::Refused => "refused",
            Self::Summary => "summary",
        }
    }

    /// The upper-case label of the text output.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Accept => "ACCEPT",
            Self::Establish => "ESTABLISH",
            Self::Unreachable => "UNREACHABLE",
            Self::Silent => "SILENT",
            Self::Resumed => "RESUMED",
            Self::AppError => "APP-ERROR",
            Self::Close => "CLOSE",
            Self::Refused => "REFUSED",
            Self::Summary => "SUMMARY",
        }
    }
}

impl fmt::Display for ReportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct UnknownKind(pub String);

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown event kind '{}'", self.0)
    }
}

impl std::error::Error for UnknownKind {}

impl FromStr for ReportKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// How a flow was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `connect()`, before any datagram.
    Connect,
    /// The first datagram sent to the peer.
    Send,
    /// The first datagram received from the peer.
    Recv,
}

/// Which call failed for an APP-ERROR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Send,
    Recv,
}

/// The trouble a RESUMED flow recovered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trouble {
    Silent,
    Unreachable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The socket was released.
    Closed,
    /// No traffic for the idle timeout.
    Idle,
    /// The flow table was full and this flow was the least recently active.
    Evicted,
    /// `connect(AF_UNSPEC)` dissolved the socket's association with the peer.
    Disconnected,
    /// The socket was connected to another peer.
    Reconnected,
}

impl CloseReason {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle",
            Self::Evicted => "evicted",
            Self::Disconnected => "disconnected",
            Self::Reconnected => "reconnected",
        }
    }
}

/// A flow's totals when it ends. Counts are the kernel's per-flow counters where they
/// could be read, else what the transition events showed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseStats {
    pub duration_ns: u64,
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    /// CLOCK_BOOTTIME of the last datagram each way, 0 for none.
    pub last_tx_ns: u64,
    pub last_rx_ns: u64,
    /// ICMP errors received for the flow (each one, including unreported repeats).
    pub icmp_errors: u64,
    /// Failed send/recv calls (each one, including unreported repeats).
    pub app_errors: u64,
    /// The flow existed before udpmon started: the duration and counts are lower bounds.
    pub preexisting: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreachableInfo {
    pub ty: u8,
    pub code: u8,
    /// The errno the kernel set, or the one it maps this ICMP to; `None` for messages that
    /// are never an error for a UDP socket.
    pub errno: Option<i32>,
    /// Whether a connected socket hears about the error without IP_RECVERR.
    pub fatal: Option<bool>,
    /// The ICMP sender (a router for host/net errors, the peer for port unreachable).
    pub from: IpAddr,
    pub verdict: Verdict,
    /// The socket was connected to this peer.
    pub connected: bool,
    /// For [`Verdict::NoSocket`]: the last process seen on the local port, if known.
    pub last_owner: Option<Identity>,
}

/// What a peer left unanswered since its last answer (peer-scope SILENT and RESUMED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unanswered {
    /// Flows (sockets) that sent to the peer and heard nothing back.
    pub flows: u64,
    /// Datagrams they sent (a lower bound: counters are sampled about once a second).
    pub sends: u64,
    /// Time since the first of those datagrams (until the report).
    pub for_ns: u64,
    /// CLOCK_BOOTTIME of the peer's last answer before them; `None`: the peer has not
    /// answered since udpmon first saw it.
    pub last_answer_ns: Option<u64>,
}

/// Whether a SILENT or RESUMED is about one flow or about a peer across flows; a SUMMARY is
/// about one socket's flows or about a peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Flow,
    Peer,
    Socket,
}

impl Scope {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Flow => "flow",
            Self::Peer => "peer",
            Self::Socket => "socket",
        }
    }
}

/// UNREACHABLE events by the kernel's verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByVerdict {
    pub notified: u64,
    pub queued: u64,
    pub discarded: u64,
    /// Only ever at scope peer: a socket's flows have their socket.
    pub no_socket: u64,
}

impl ByVerdict {
    pub fn total(&self) -> u64 {
        self.notified + self.queued + self.discarded + self.no_socket
    }

    pub fn add(&mut self, v: Verdict, n: u64) {
        match v {
            Verdict::Notified => self.notified += n,
            Verdict::Queued => self.queued += n,
            Verdict::Discarded => self.discarded += n,
            Verdict::NoSocket => self.no_socket += n,
        }
    }
}

/// The problem reports of a busy socket's summarised flows in one interval, whether printed
/// or folded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Problems {
    pub unreachable: ByVerdict,
    pub silent: u64,
    pub app_error: u64,
}

/// The reports of a busy socket's summarised flows that were counted instead of printed,
/// by kind, besides the openings, establishments and closes that are always counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Problems beyond the per-socket rate limit.
    pub unreachable: u64,
    pub silent: u64,
    pub app_error: u64,
    /// The end of a trouble whose SILENT or UNREACHABLE was folded: it goes with it.
    pub resumed: u64,
}

/// SUMMARY with scope socket: what the summarised flows of a busy socket did in one interval
/// (see the engine's `summary` module). Every summarised flow is counted in `new_flows` of one
/// summary and in `closed` of one summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketSummary {
    /// The time this summary covers: since the previous one, or since the socket became busy.
    pub interval_ns: u64,
    /// Flows opened (their CONNECT or ACCEPT not printed).
    pub new_flows: u64,
    /// Of them, opened by the peer's datagram (ACCEPT).
    pub accepted: u64,
    /// Of them, opened by connect() or a datagram sent (CONNECT); the rest were first seen
    /// through an ICMP error.
    pub connected: u64,
    /// Summarised flows that saw traffic both ways (their ESTABLISH not printed).
    pub established: u64,
    /// Summarised flows closed (their CLOSE not printed), whatever the reason.
    pub closed: u64,
    /// Of them, those that never saw traffic both ways.
    pub never_established: u64,
    /// Summarised flows still open at the end of the interval.
    pub open: u64,
    pub problems: Problems,
    pub folded: Folded,
}

/// SUMMARY with scope peer: a peer whose flows keep drawing the same ICMP error, while its
/// UNREACHABLE lines are folded (see `peer.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSummary {
    /// The time this summary covers: since the previous one, or since the run's first
    /// error.
    pub interval_ns: u64,
    /// The run's error, as its first (printed) UNREACHABLE showed it.
    pub icmp: UnreachableInfo,
    /// Flows of the peer that drew the error in the interval (one UNREACHABLE each, printed
    /// or folded).
    pub unreachable: u64,
    /// Of them, the UNREACHABLE lines not printed.
    pub folded: u64,
}

/// Kind-specific facts of a report. Durations are nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    /// CONNECT and ACCEPT. `bytes` is the first datagram's payload, `None` for connect().
    Opened {
        via: Via,
        bytes: Option<u32>,
    },
    /// ESTABLISH: time between the first datagram one way and the first the other way.
    Established {
        reply_after_ns: u64,
    },
    Unreachable(UnreachableInfo),
    /// SILENT: how long since the peer was last heard, and the sends since then (a lower
    /// bound: the kernel counters are sampled about once a second).
    Silent {
        no_reply_ns: u64,
        sends: u64,
    },
    /// RESUMED: how long the peer had not been heard.
    Resumed {
        after: Trouble,
        quiet_ns: u64,
    },
    /// SILENT with scope peer: none of the datagrams one program sent to the peer over
    /// several flows was answered. `no_reply_ns` is the time since the peer's last answer, or
    /// since udpmon first saw the peer when it never answered.
    PeerSilent {
        no_reply_ns: u64,
        unanswered: Unanswered,
    },
    /// RESUMED with scope peer, after a peer-scope SILENT: how long the peer had not been
    /// heard (since its last answer, or since udpmon first saw it), and what went unanswered.
    PeerResumed {
        quiet_ns: u64,
        unanswered: Unanswered,
    },
    /// APP-ERROR, with the time since the flow's ICMP error when the flow is unreachable
    /// (the application noticed the error that long after it arrived).
    AppError {
        op: Op,
        errno: i32,
        after_unreachable_ns: Option<u64>,
    },
    Closed {
        reason: CloseReason,
        stats: CloseStats,
    },
    /// REFUSED: the last process seen on the local port, if known.
    Refused {
        last_owner: Option<Identity>,
    },
    /// SUMMARY with scope socket (boxed: far larger than the other details, and rare).
    SocketSummary(Box<SocketSummary>),
    /// SUMMARY with scope peer.
    PeerSummary(Box<PeerSummary>),
}

/// One operator-facing event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    /// CLOCK_BOOTTIME nanoseconds; the formatters convert to wall-clock time.
    pub ts_ns: u64,
    /// Socket cookie, 0 when no socket is involved (REFUSED, ICMP for a closed socket).
    pub cookie: u64,
    /// The socket's owner, in the socket's network namespace.
    pub who: Identity,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub detail: Detail,
    /// The container of `cgroup`, None outside containers. The engine knows only cgroup ids:
    /// the agent fills this in from what it resolved.
    pub container: Option<Arc<Container>>,
}

impl Report {
    pub(super) fn new(
        kind: ReportKind,
        ts_ns: u64,
        cookie: u64,
        // The owner's own netns is that of its socket when it was learned; a socket moved
        // since is reported in its current one.
        (owner, netns): (&Identity, u32),
        family: Family,
        (local, remote): (SocketAddr, SocketAddr),
        detail: Detail,
    ) -> Self {
        Self {
            kind,
            ts_ns,
            cookie,
            who: Identity { netns, ..*owner },
            family,
            local,
            remote,
            detail,
            container: None,
        }
    }

    /// The scope of a SILENT, RESUMED or SUMMARY; `None` for the other kinds.
    pub fn scope(&self) -> Option<Scope> {
        match self.detail {
            Detail::Silent { .. } | Detail::Resumed { .. } => Some(Scope::Flow),
            Detail::PeerSilent { .. } | Detail::PeerResumed { .. } | Detail::PeerSummary(_) => {
                Some(Scope::Peer)
            }
            Detail::SocketSummary(_) => Some(Scope::Socket),
            _ => None,
        }
    }

    /// The last owner named by REFUSED and by an ICMP error for a closed socket.
    pub fn last_owner(&self) -> Option<&Identity> {
        match &self.detail {
            Detail::Refused { last_owner } => last_owner.as_ref(),
            Detail::Unreachable(u) => u.last_owner.as_ref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in ReportKind::ALL {
            assert_eq!(k.name().parse::<ReportKind>(), Ok(k));
            assert_eq!(k.label().to_ascii_lowercase(), k.name());
        }
        assert_eq!("APP-ERROR".parse::<ReportKind>(), Ok(ReportKind::AppError));
        assert!("established".parse::<ReportKind>().is_err());
    }
}
