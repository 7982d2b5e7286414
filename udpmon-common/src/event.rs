//! The record the kernel programs push through the ring buffer.
//!
//! The ring buffer carries transitions only (a new flow, the first datagram each way, ICMP
//! errors, application errors, connect, close); per-datagram counters stay in the kernel's
//! flow map. One flat record for every kind keeps the decoder trivial; unused fields are zero.

/// Kernel-level facts. The lifecycle engine turns them into operator-facing events.
///
/// Values are explicit and never reused, because old recordings must keep decoding.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// First datagram sent on a flow (flow = socket cookie + remote address:port).
    FirstTx = 1,
    /// First datagram received on a flow.
    FirstRx = 2,
    /// `connect()` on a UDP socket; `remote` is the address asked for (family 0 = AF_UNSPEC).
    Connect = 3,
    /// An ICMP/ICMPv6 error about a datagram one of our sockets sent.
    Icmp = 4,
    /// send/sendto/sendmsg returned a negative errno (in `ret`).
    SendError = 5,
    /// recv/recvfrom/recvmsg returned a negative errno (in `ret`).
    RecvError = 6,
    /// The socket was released (last close of its file).
    Close = 7,
    /// A datagram arrived for a local port with no socket: this host answers with ICMP.
    NoSocket = 8,
    /// A socket that existed before udpmon started (from iter/udp).
    Existing = 9,
    /// Another process took the socket over (a send or receive call, a received descriptor):
    /// the owner fields are the new holder's; no address.
    Holder = 10,
    /// A process that held a socket exited (its last thread): `tgid` only, no socket.
    Exit = 11,
    /// A process that held a socket exec'd: its identity as it is now (`comm` is the new
    /// program's), no socket.
    Exec = 12,
    /// A datagram, sent or received, on a flow that had none for more than
    /// [`WAKE_NS`](crate::WAKE_NS): its addresses, `cookie` and `ts_ns` only.
    /// Userspace reads the counters only of flows that are due or awake (see the engine's
    /// tick), so this is how it learns that a quiet flow moves again.
    Wake = 13,
}

impl EventKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::FirstTx,
            2 => Self::FirstRx,
            3 => Self::Connect,
            4 => Self::Icmp,
            5 => Self::SendError,
            6 => Self::RecvError,
            7 => Self::Close,
            8 => Self::NoSocket,
            9 => Self::Existing,
            10 => Self::Holder,
            11 => Self::Exit,
            12 => Self::Exec,
            13 => Self::Wake,
            _ => return None,
        })
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What became of an ICMP error (the `verdict` field of [`Event`] for [`EventKind::Icmp`]).
pub mod verdict {
    /// `sk_err` was set: the application's next send/recv fails with the errno.
    pub const NOTIFIED: u8 = 1;
    /// Queued on the socket's error queue (IP_RECVERR / IPV6_RECVERR).
    pub const QUEUED: u8 = 2;
    /// A socket matched, but the kernel dropped the error: the application cannot know.
    pub const DISCARDED: u8 = 3;
    /// No socket was told of the error (cookie 0): userspace tells an error whose socket it
    /// tracks, which the kernel discarded, from one no local socket matched.
    pub const NO_SOCKET: u8 = 4;
}

/// `Event::flags` bits.
pub mod flags {
    /// The socket is connected (`skc_state == TCP_ESTABLISHED`).
    pub const CONNECTED: u32 = 1 << 0;
    /// The socket has IP_RECVERR / IPV6_RECVERR set.
    pub const RECVERR: u32 = 1 << 1;
    /// `pid`/`comm` belong to the task that ran the hook, not necessarily the socket's owner
    /// (softirq context: ICMP handling, receive on the wire side).
    pub const TASK_UNRELATED: u32 = 1 << 2;
    /// The remote address could not be seen by this hook strategy (e.g. a receive without
    /// an address); `remote` is zero.
    pub const REMOTE_UNKNOWN: u32 = 1 << 3;
    /// The last process known to hold the socket has exited while the socket lives on in
    /// another (a daemon's fork, a passed descriptor) that has not used it since: the owner
    /// is unknown. `pid`, `comm` and `uid` are zero; `cgroup` is the exited owner's.
    pub const OWNER_GONE: u32 = 1 << 4;
}

/// One ring-buffer record. Addresses are in network byte order, IPv4 in the first 4 bytes;
/// ports are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u16,
    /// AF_INET or AF_INET6 (of the addresses below, not necessarily of the socket).
    pub family: u16,
    pub flags: u32,
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME, so suspend does not skew it.
    pub ts_ns: u64,
    /// Socket cookie, 0 when no socket is involved.
    pub cookie: u64,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    /// Network namespace inode (`/proc/PID/ns/net`).
    pub netns: u32,
    pub cgroup: u64,
    pub comm: [u8; 16],
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    /// Bytes for datagrams, negative errno for errors, 0 otherwise.
    pub ret: i32,
    /// ICMP type and code, errno the kernel maps them to (positive), [`verdict`].
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub verdict: u8,
    pub _pad: u8,
    pub icmp_errno: u32,
    /// The ICMP sender (outer source address), family as `family`.
    pub icmp_from: [u8; 16],
    /// Network namespace cookie, where the hook cannot read the inode (cgroup hooks);
    /// userspace maps it to the inode. 0 when `netns` is set or unknown.
    pub netns_cookie: u64,
}

const _: () = assert!(core::mem::size_of::<Event>() == 136);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            family: 0,
            flags: 0,
            ts_ns: 0,
            cookie: 0,
            tgid: 0,
            pid: 0,
            uid: 0,
            netns: 0,
            cgroup: 0,
            comm: [0; 16],
            local: [0; 16],
            remote: [0; 16],
            lport: 0,
            rport: 0,
            ret: 0,
            icmp_type: 0,
            icmp_code: 0,
            verdict: 0,
            _pad: 0,
            icmp_errno: 0,
            icmp_from: [0; 16],
            netns_cookie: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding (checked above), every bit pattern is valid.
unsafe impl aya::Pod for Event {}
