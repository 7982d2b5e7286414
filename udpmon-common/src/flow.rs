//! The in-kernel flow table: per-datagram accounting stays here, userspace reads it on demand.

/// A flow: one socket talking to one remote address:port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub cookie: u64,
    pub remote: [u8; 16],
    pub rport: u16,
    pub family: u16,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 32);

/// Counters of a flow. Updated with atomic adds on the hot path; times are
/// `bpf_ktime_get_boot_ns()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub first_ns: u64,
    pub last_tx_ns: u64,
    pub last_rx_ns: u64,
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    /// 1 while the ring buffer had no room for the first-datagram record of that direction:
    /// the next datagram that way sends it again, so that a flow is not left unknown to
    /// userspace for its whole life by one full ring. One word per direction, so that each
    /// is a plain store that cannot undo the other's.
    pub tx_first_lost: u32,
    pub rx_first_lost: u32,
}

const _: () = assert!(core::mem::size_of::<FlowStats>() == 64);

/// A flow quiet for longer than this (no datagram either way) that moves again is reported
/// with a [`Wake`](crate::EventKind::Wake) record. Userspace lets a flow sleep (stops reading
/// its counters every tick) only once it has been quiet for [`SLEEP_NS`], longer than this by
/// more than a read takes, so that no datagram after its last read can go unreported.
pub const WAKE_NS: u64 = 1_000_000_000;

/// See [`WAKE_NS`].
pub const SLEEP_NS: u64 = 2 * WAKE_NS;

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding (checked above), every bit pattern is valid.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FlowStats {}
