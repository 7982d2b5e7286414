//! Maps and globals shared by every program.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use udpmon_common::{
    COUNTERS, Counter, Event, FlowKey, FlowStats, IcmpFreeCallers, Offsets, Owner,
};

/// Transitions only. 4 MiB holds ~29000 events: a second and more of new flows at 20k/s
/// while userspace is busy with its once-a-second pass over every flow.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES as u32, 0);

const RING_BYTES: u64 = 4 << 20;

/// A record as the ring holds it: its 8-byte header, and the event rounded up to 8 bytes.
const RECORD_BYTES: u64 = 8 + size_of::<Event>().next_multiple_of(8) as u64;

/// 1 while userspace waits for the ring to wake it, 0 while it reads the ring on a short
/// timer (see [`emit`]).
#[map]
pub static READER_WAITS: Array<u32> = Array::with_max_entries(1, 0);

/// Per-flow counters. Size is set by userspace from `--max-flows`.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(65536, 0);

/// Who owns a socket (cookie -> owner), learned in process context so that softirq-side
/// events (receive, ICMP) can name the process. Sized as FLOWS by userspace.
#[map]
pub static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(65536, 0);

/// Processes that hold or held a socket in OWNERS (tgid -> 1): only their exits and execs
/// are recorded, so that the churn of the host's other processes cannot push a holder's out
/// of PROCESSES. Sized as FLOWS by userspace.
#[map]
pub static HOLDERS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);

/// What became of those processes (tgid -> exit, exec), for telling whether an owner in
/// OWNERS is still what it was learned as: see owner.rs. Sized as FLOWS by userspace.
#[map]
pub static PROCESSES: LruHashMap<u32, ProcessChange> = LruHashMap::with_max_entries(65536, 0);

/// Counts holders' exits: a per-CPU note (HOLDER_SEEN) taken before the last one is stale.
#[map]
pub static HOLDER_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU, the socket (its address; its cookie where the hook has none) and process of the
/// last send or receive call checked against OWNERS (see owner.rs).
#[map]
pub static HOLDER_SEEN: PerCpuArray<HolderSeen> = PerCpuArray::with_max_entries(1, 0);

/// Last time a datagram to a closed local port was reported, per tuple (rate limit).
#[map]
pub static NO_SOCKET_SEEN: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// Per-CPU budget of closed-port reports (see refused.rs).
#[map]
pub static NO_SOCKET_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// What the kernel last told a UDP socket on this CPU (tp_btf inet_sk_error_report), for
/// the ICMP error being handled there: its skb is freed right after, on the same CPU, and
/// that is where the error is reported (see icmp.rs).
#[map]
pub static ERROR_REPORT: PerCpuArray<ErrorReport> = PerCpuArray::with_max_entries(1, 0);

/// Kernel field offsets from BTF, set at load time and read one field at a time with `off!`.
#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets::zeroed();

/// udpmon's own tgid: its sockets are never reported.
#[unsafe(no_mangle)]
pub static SELF_TGID: u32 = 0;

/// `udpmon_common::offsets::helpers` bits, set at load time: test one with [`has_helper`]
/// before calling a helper that not every kernel lets tracing programs call.
#[unsafe(no_mangle)]
pub static HELPERS: u32 = 0;

/// Which free callers can be freeing an ICMP error, set at load time: see
/// [`IcmpFreeCallers`].
#[unsafe(no_mangle)]
pub static ICMP_FREE_CALLERS: IcmpFreeCallers = IcmpFreeCallers::UNKNOWN;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessChange {
    /// When its last thread exited, 0 while it runs (CLOCK_BOOTTIME).
    pub exit_ns: u64,
    /// When it last exec'd, and the name it took then.
    pub exec_ns: u64,
    pub comm: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct HolderSeen {
    pub sk: u64,
    pub tgid: u32,
    pub _pad: u32,
    pub epoch: u64,
}

/// Both ends of a datagram, for REFUSED's rate limit per tuple (two namespaces that use the
/// same addresses share a slot: it limits reports, it names no socket).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TupleKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub family: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Budget {
    pub window_ns: u64,
    pub used: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ErrorReport {
    /// When it was made; a report older than an ICMP's handling is not about that ICMP.
    pub ts_ns: u64,
    pub cookie: u64,
    pub lport: u16,
    pub verdict: u8,
    pub _pad: [u8; 5],
    /// `sk_err` (positive errno), 0 while only queued.
    pub errno: u32,
    /// `Event::flags` bits learned from the socket (CONNECTED, RECVERR).
    pub flags: u32,
}

#[inline(always)]
pub fn self_tgid() -> u32 {
    // SAFETY: as for `offsets`.
    unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

/// Whether this kernel has the helper `bit` stands for. The global is frozen, so the verifier
/// knows the answer and prunes the other branch, helper call included.
#[inline(always)]
pub fn has_helper(bit: u32) -> bool {
    // SAFETY: a read-only global set at load time, as `OFFSETS`.
    unsafe { core::ptr::read_volatile(&HELPERS) & bit != 0 }
}

/// Whether a free at `location` (the skb-free tracepoints' caller address) can be an ICMP
/// error's.
#[inline(always)]
pub fn may_free_icmp(location: u64) -> bool {
    // SAFETY: a read-only global set at load time, as `OFFSETS`.
    unsafe { core::ptr::read_volatile(&ICMP_FREE_CALLERS) }.may_free_icmp(location)
}

/// Adds one to a health counter. Atomic although per-CPU: a softirq program can interrupt a
/// process-context one on the same CPU between its load and its store.
#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = HEALTH.get_ptr_mut(c as u32) {
        // SAFETY: a valid per-CPU map value for this program run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
    }
}

/// Builds an event in place in the ring buffer: `fill` gets a zeroed record and returns
/// whether to send it (false discards it, e.g. for udpmon's own sockets). Each program run
/// owns its reservation, so programs that interrupt each other on a CPU cannot mix their
/// events, and nothing is copied. False when the ring had no room (counted).
#[inline(always)]
pub fn emit(fill: impl FnOnce(&mut Event) -> bool) -> bool {
    let sent = try_emit(fill);
    if !sent {
        count(Counter::RingbufFull);
    }
    sent
}

/// [`emit`], for a record whose loss was already counted: a full ring is not looked at
/// twice, nor counted.
#[inline(always)]
pub fn try_emit(fill: impl FnOnce(&mut Event) -> bool) -> bool {
    // The ring's fill before this record, read without its lock: checked first so that a
    // full ring costs no reservation, and reused for the wakeup.
    let before = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if before + RECORD_BYTES > RING_BYTES {
        return false;
    }
    let Some(mut rec) = EVENTS.reserve::<Event>(0) else {
        return false;
    };
    // Zeroed a word at a time: `Event::zeroed()` would be a call to a byte-at-a-time memset.
    let words = rec.as_mut_ptr() as *mut u64;
    for i in 0..size_of::<Event>() / 8 {
        // SAFETY: within the reserved record, which is 8-byte aligned.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was just written, and all-zero is a valid Event.
    if fill(unsafe { rec.assume_init_mut() }) {
        rec.submit(wakeup(before));
        count(Counter::EventsSent);
    } else {
        rec.discard(BPF_RB_NO_WAKEUP as u64);
    }
    true
}

/// The record that fills the ring past this wakes its reader even while it reads on a timer:
/// an eighth of the ring, which fills that far in milliseconds only under a burst.
const WAKE_AT_BYTES: u64 = RING_BYTES / 8;

/// While the reader waits, records wake it only until the ring holds this much: it is on
/// its way then, or stopped, and a wakeup per record would be the cost this saves.
const WAKE_WAITING_BYTES: u64 = 64 << 10;

/// How a record is submitted into a ring that held `before` bytes: waking userspace only
/// when it waits for the ring, or when this record fills it past an eighth. The kernel's
/// default wakes it whenever it had read everything before, so a reader that keeps up is
/// woken for nearly every record: an IRQ-work interrupt on the producer's CPU and a wakeup
/// of the reader each, where reading on a timer takes a batch. One wakeup is enough: the
/// reader reads until the ring is empty before it looks for another.
#[inline(always)]
fn wakeup(before: u64) -> u64 {
    // SAFETY: an array value, valid for the program run.
    let waits = READER_WAITS
        .get_ptr(0)
        .is_some_and(|w| unsafe { core::ptr::read_volatile(w) } != 0);
    let crosses = before < WAKE_AT_BYTES && before + RECORD_BYTES >= WAKE_AT_BYTES;
    if waits && before < WAKE_WAITING_BYTES || crosses {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// A field of a BTF-typed kernel pointer (tp_btf and fentry arguments, and pointers loaded
/// from them) with a plain load: the verifier checks it against the kernel's BTF and makes a
/// faulting load read zero, so no helper is called. `off` must be a verifier-known constant:
/// an `off!` field of the read-only `OFFSETS`. kprobes must use `kread::read` instead.
#[inline(always)]
pub fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: see above; the load is checked by the verifier, not by Rust.
    unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
}

/// One field of `OFFSETS`, as a single load from the frozen read-only map, which the
/// verifier then knows as a constant (what `field` needs).
macro_rules! off {
    ($f:ident) => {
        // SAFETY: a read-only global set at load time; volatile keeps the compiler from
        // folding its zeroed initial value.
        unsafe { core::ptr::read_volatile(&raw const $crate::maps::OFFSETS.$f) }
    };
}
pub(crate) use off;
