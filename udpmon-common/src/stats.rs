//! Per-CPU health counters (the `HEALTH` map): every in-kernel loss is counted here.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A ring-buffer reservation failed: an event was lost.
    RingbufFull = 0,
    /// The flow map refused an insert.
    FlowInsertFailed = 1,
    /// A kernel read (`bpf_probe_read_kernel`) failed.
    ReadFailed = 2,
    /// Events submitted to the ring buffer.
    EventsSent = 3,
    /// A NO_SOCKET datagram was not reported because its tuple was reported less than a
    /// second ago (rate limit, not a loss: the counter shows how many).
    NoSocketSuppressed = 4,
    /// A datagram was sent on a socket whose cookie the kernel never generated (the
    /// fentry/kprobe send hook can only read the cached one): it was not counted.
    NoCookie = 5,
}

/// Number of slots in the `HEALTH` per-CPU array.
pub const COUNTERS: u32 = 8;

impl Counter {
    pub const ALL: [Counter; 6] = [
        Counter::RingbufFull,
        Counter::FlowInsertFailed,
        Counter::ReadFailed,
        Counter::EventsSent,
        Counter::NoSocketSuppressed,
        Counter::NoCookie,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::RingbufFull => "ringbuf_full",
            Counter::FlowInsertFailed => "flow_insert_failed",
            Counter::ReadFailed => "kernel_read_failed",
            Counter::EventsSent => "events_sent",
            Counter::NoSocketSuppressed => "no_socket_suppressed",
            Counter::NoCookie => "no_cookie",
        }
    }
}
