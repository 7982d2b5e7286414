//! Maps and globals shared by every program.
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use udpmon_common::{COUNTERS, Counter, FlowKey, FlowStats, Offsets};

/// Transitions only. 4 MiB holds ~29000 events: a second and more of new flows at 20k/s
/// while userspace is busy with its once-a-second pass over every flow.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-flow counters. Size is set by userspace from `--max-flows`.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(65536, 0);

/// Who owns a socket (cookie -> owner), learned in process context so that softirq-side
/// events (receive, ICMP) can name the process.
#[map]
pub static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(65536, 0);

/// (local port, remote address, remote port, family) -> cookie of the socket that sent there,
/// to tie an ICMP error to a socket when the kernel itself drops the error.
#[map]
pub static SENDERS: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Last time a datagram to a closed local port was reported, per tuple (rate limit).
#[map]
pub static NO_SOCKET_SEEN: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(4096, 0);

#[map]
pub static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// An ICMP error being processed on this CPU (between the ICMP receive and the end of its
/// handling), so that the error report in between can set the verdict.
#[map]
pub static PENDING_ICMP: PerCpuArray<PendingIcmp> = PerCpuArray::with_max_entries(1, 0);

/// Room to build an event: the BPF stack (512 bytes) cannot hold several.
#[map]
pub static SCRATCH: PerCpuArray<udpmon_common::Event> = PerCpuArray::with_max_entries(2, 0);

/// Scratch slot of programs that run in process context (send, connect, close, errors).
pub const TASK: u32 = 0;
/// Scratch slot of programs that run in softirq (receive, drops). A softirq can interrupt a
/// process-context program on the same CPU mid-event (tracing and cgroup programs run with
/// migration, not bottom halves, disabled), so the two must not share a slot.
pub const SOFTIRQ: u32 = 1;

/// A zeroed per-CPU event to fill, in the slot of the calling context.
#[inline(always)]
pub fn scratch_event(slot: u32) -> Option<&'static mut udpmon_common::Event> {
    let p = SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: per-CPU slot of this context; programs of one context do not nest.
    let ev = unsafe { &mut *p };
    *ev = udpmon_common::Event::zeroed();
    Some(ev)
}

#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets::zeroed();

/// udpmon's own tgid: its sockets are never reported.
#[unsafe(no_mangle)]
pub static SELF_TGID: u32 = 0;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Owner {
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub netns: u32,
    pub cgroup: u64,
    pub comm: [u8; 16],
    /// Where only the netns cookie is known (cgroup hooks): see `Event::netns_cookie`.
    pub netns_cookie: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TupleKey {
    pub remote: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub family: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingIcmp {
    /// The ICMP skb, to recognise the end of its processing; 0 = slot empty.
    pub skb: u64,
    pub event: udpmon_common::Event,
}

#[inline(always)]
pub fn offsets() -> Offsets {
    // SAFETY: a read-only global set at load time; volatile stops the compiler from folding
    // the zeroed initial value into the code.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub fn self_tgid() -> u32 {
    // SAFETY: as for `offsets`.
    unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = HEALTH.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Sends `ev` to userspace, counting the loss if the ring buffer is full.
#[inline(always)]
pub fn emit(ev: &udpmon_common::Event) {
    match EVENTS.output::<udpmon_common::Event>(ev, 0) {
        Ok(()) => count(Counter::EventsSent),
        Err(_) => count(Counter::RingbufFull),
    }
}
