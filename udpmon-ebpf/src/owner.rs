//! Who holds a socket: the process events name.
//!
//! Hooks that run in the socket user's context (connect, send and receive calls, close) see
//! the holder itself; the others (receive and ICMP handling in softirq) name what OWNERS
//! remembers. A socket changes hands without any hook seeing it: a daemon forks and its
//! parent exits (the classic double fork after bind), a descriptor is passed over a unix
//! socket, a socket outlives the program that exec'd into another. So OWNERS follows the
//! holder:
//! - every send and receive call checks that its caller is the remembered holder and takes
//!   its place when not ([`note_holder`]); a per-CPU note of the last socket and process
//!   checked keeps the common case (one process talking on one socket) to one comparison.
//!   A holder's exit makes every note stale: the processes that share its socket (a
//!   daemon's pre-forked workers, a passed descriptor's sender) take its place at their next
//!   call instead of being skipped by their notes. Where a kernel has no hook on those
//!   calls, each datagram sent and each receive call that asks for the sender does it
//!   ([`note_user`]);
//! - a process that receives a socket's descriptor (SCM_RIGHTS, pidfd_getfd) holds it from
//!   then on, where the strategy can hook that ([`on_file_received`]: fentry, kprobe);
//! - the exit of a holder is recorded ([`on_exit`]; only processes that held a socket, so
//!   that the churn of short-lived others cannot crowd it out), and a remembered holder that
//!   exited after udpmon learned it is no name at all: the event says the owner is unknown
//!   (`OWNER_GONE`) rather than name a pid the system may already have given to another
//!   process. Its cgroup is kept: the socket's new holder is, as a rule, its child;
//! - so is each exec ([`on_exec`]), with the name the process took: a remembered holder that
//!   exec'd since is named after the program it runs now;
//! - a take-over seen by no event of its own (a send or receive call, a received descriptor)
//!   is told to userspace with a `Holder` record, and so are a holder's exit and exec (`Exit`,
//!   `Exec`), for the reports userspace makes on its own timer.
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
};
use udpmon_common::{Event, EventKind, Owner, event::flags};

use crate::{
    kread::{Kernel, read, read_buf, sock_netns},
    maps::{
        HOLDER_EPOCH, HOLDER_SEEN, HOLDERS, OWNERS, PROCESSES, ProcessChange, emit, field, off,
        self_tgid,
    },
    packet::IPPROTO_UDP,
};

const SOCK_DGRAM: u16 = 2;

/// Fills pid, comm, uid and cgroup: from the current task when the hook runs in the
/// socket user's context, else from what was learned about the socket's holder. Returns
/// false for udpmon's own sockets.
#[inline(always)]
pub fn fill_identity(ev: &mut Event, in_task: bool) -> bool {
    if in_task {
        let owner = current_owner();
        if owner.tgid == self_tgid() {
            return false;
        }
        set_owner(ev, &owner);
        // The event itself tells userspace.
        if ev.cookie != 0 {
            remember(ev.cookie, owner.tgid, || owner, || 0);
        }
        return true;
    }
    ev.flags |= flags::TASK_UNRELATED;
    // Read in place, not copied: these programs are within a few bytes of the 512-byte stack
    // limit on some kernels. An entry replaced meanwhile on another CPU can at worst give this
    // one event another holder's fields (the LRU map reuses freed entries at once).
    // SAFETY: the map value stays valid for the program run.
    if let Some(o) = unsafe { OWNERS.get(ev.cookie) } {
        if o.tgid == self_tgid() {
            return false;
        }
        ev.flags &= !flags::TASK_UNRELATED;
        // SAFETY: as above.
        let change = unsafe { PROCESSES.get(o.tgid) };
        match change {
            Some(c) if c.exit_ns >= o.since_ns => {
                ev.flags |= flags::OWNER_GONE;
                ev.cgroup = o.cgroup;
                set_netns(ev, o);
            }
            Some(c) if c.exec_ns >= o.since_ns => {
                set_owner(ev, o);
                ev.comm = c.comm;
            }
            _ => set_owner(ev, o),
        }
    }
    true
}

/// Records the current task as the holder of `cookie` (socket creation).
#[inline(always)]
pub fn learn_owner(cookie: u64, netns_cookie: u64) {
    let mut o = current_owner();
    if o.tgid == self_tgid() {
        return;
    }
    o.netns_cookie = netns_cookie;
    let _ = OWNERS.insert(cookie, o, 0);
    holds(o.tgid);
}

/// A send or receive call on `sk` (any protocol where `check_udp`), in its caller's
/// context: makes the caller the socket's remembered holder. `cookie` is called only when
/// the caller is not the one last checked on this CPU.
#[inline(always)]
pub fn note_holder<K: Kernel>(sk: u64, check_udp: bool, cookie: impl FnOnce() -> u64) {
    // First, as the cheapest way out for the TCP calls that make up most of a host's (a
    // plain load where `K` is `Btf`).
    if check_udp && K::get::<u16>(sk, off!(sk_protocol)) != IPPROTO_UDP as u16 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if noted(sk, tgid) {
        return;
    }
    // Raw sockets of protocol UDP pass the first check.
    if tgid == self_tgid() || check_udp && K::get::<u16>(sk, off!(sk_type)) != SOCK_DGRAM {
        return;
    }
    let cookie = cookie();
    if cookie != 0 && remember(cookie, tgid, current_owner, || sock_netns(sk)) {
        tell_holder(cookie);
    }
}

/// Whether this CPU's note says that `key` (a socket's address, or its cookie where a hook
/// has no address) was last checked for `tgid`, with no holder's exit since; notes them if
/// not, so that one process talking on one socket costs one comparison per call.
#[inline(always)]
fn noted(key: u64, tgid: u32) -> bool {
    let epoch = HOLDER_EPOCH.get(0).copied().unwrap_or(0);
    let Some(seen) = HOLDER_SEEN.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU value valid for this program run. A program interrupting this one on
    // the CPU can only make the note stale, which costs a lookup. The note can outlive its
    // socket: a new socket at the same address passed to the same process, with no other
    // call on this CPU nor a holder's exit in between, would wait for one of those.
    unsafe {
        if (*seen).sk == key && (*seen).tgid == tgid && (*seen).epoch == epoch {
            return true;
        }
        (*seen).sk = key;
        (*seen).tgid = tgid;
        (*seen).epoch = epoch;
    }
    false
}

/// The current task uses the socket `cookie`: a datagram it sends (cgroup_skb egress, which
/// runs in the sender's system call) or a receive call that passes an address buffer (the
/// cgroup recvmsg hooks: every receive call but recv(), read() and recvfrom() without an
/// address). Where no send and receive calls are hooked (the tracepoint strategy before
/// 6.3, without `sock_send_length`/`sock_recv_length`), the user takes the remembered
/// holder's place as [`note_holder`] would. cgroup_skb programs are not offered the current
/// task's helpers there, so its identity is read from the task (the recvmsg hooks could call
/// them, but one way serves both). Only a socket udpmon knows a holder of is followed: a
/// kernel socket's datagrams (a tunnel's) go out in whatever task the softirq interrupted.
#[inline(always)]
pub fn note_user(cookie: u64) {
    // SAFETY: BPF helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let tgid: u32 = read(task, off!(task_tgid));
    if noted(cookie, tgid) {
        return;
    }
    const PF_KTHREAD: u32 = 0x0020_0000;
    if tgid == 0 || tgid == self_tgid() || read::<u32>(task, off!(task_flags)) & PF_KTHREAD != 0 {
        return;
    }
    // SAFETY: the map value stays valid for the program run.
    let Some(known) = (unsafe { OWNERS.get(cookie) }) else {
        // Not noted after all: the startup scan may yet give the socket an owner.
        if let Some(seen) = HOLDER_SEEN.get_ptr_mut(0) {
            // SAFETY: as in `noted`.
            unsafe { (*seen).sk = 0 };
        }
        return;
    };
    if known.tgid == tgid {
        return;
    }
    let holder = task_owner(task, tgid);
    remember(cookie, tgid, || holder, || 0);
    emit(|ev| {
        ev.kind = EventKind::Holder as u16;
        ev.cookie = cookie;
        ev.ts_ns = holder.since_ns;
        set_owner(ev, &holder);
        true
    });
}

/// What `current_owner` gives, read from `task` (the current one) field by field.
#[inline(always)]
fn task_owner(task: u64, tgid: u32) -> Owner {
    let mut comm = [0u8; 16];
    read_buf(task, off!(task_comm), &mut comm);
    let cred: u64 = read(task, off!(task_cred));
    let css_set: u64 = read(task, off!(task_cgroups));
    let cgroup: u64 = read(css_set, off!(css_set_dfl_cgrp));
    let kn: u64 = read(cgroup, off!(cgroup_kn));
    Owner {
        tgid,
        pid: read(task, off!(task_pid)),
        uid: read(cred, off!(cred_uid)),
        netns: 0,
        cgroup: read(kn, off!(kernfs_node_id)),
        comm,
        netns_cookie: 0,
        // SAFETY: BPF helper without preconditions.
        since_ns: unsafe { bpf_ktime_get_boot_ns() },
    }
}

/// A descriptor received by the current process (`security_file_receive(struct file *)`:
/// SCM_RIGHTS, pidfd_getfd), in its context: if it is a UDP socket, the receiver holds it
/// now, before it ever uses it.
#[inline(always)]
pub fn on_file_received<K: Kernel>(file: u64) {
    const S_IFMT: u16 = 0o170000;
    const S_IFSOCK: u16 = 0o140000;
    let inode: u64 = K::get(file, off!(file_inode));
    if inode == 0 || K::get::<u16>(inode, off!(inode_mode)) & S_IFMT != S_IFSOCK {
        return;
    }
    // `private_data` is untyped: what follows it is read, not loaded.
    let socket: u64 = K::get(file, off!(file_private_data));
    let sk: u64 = read(socket, off!(socket_sk));
    if sk == 0
        || read::<u16>(sk, off!(sk_protocol)) != IPPROTO_UDP as u16
        || read::<u16>(sk, off!(sk_type)) != SOCK_DGRAM
    {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let cookie: u64 = read(sk, off!(skc_cookie));
    if tgid != self_tgid()
        && cookie != 0
        && remember(cookie, tgid, current_owner, || sock_netns(sk))
    {
        tell_holder(cookie);
    }
}

/// Tells userspace that the current task holds `cookie` now, for the reports it makes
/// without a kernel event (its timers: idle CLOSE, SILENT, SUMMARY).
#[inline(always)]
fn tell_holder(cookie: u64) {
    emit(|ev| {
        ev.kind = EventKind::Holder as u16;
        ev.cookie = cookie;
        // SAFETY: BPF helper without preconditions.
        ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
        fill_identity(ev, true)
    });
}

/// Makes the current task (`tgid`; `holder` describes it) the remembered holder of `cookie`
/// unless it already is; whether it took another process's place. A known socket keeps the
/// namespace it was learned in; one new to OWNERS (older than udpmon, or dropped by the LRU)
/// gets `netns`.
#[inline(always)]
fn remember(
    cookie: u64,
    tgid: u32,
    holder: impl FnOnce() -> Owner,
    netns: impl FnOnce() -> u32,
) -> bool {
    // SAFETY: the map value stays valid for the program run.
    let known = unsafe { OWNERS.get(cookie) };
    if known.is_some_and(|o| o.tgid == tgid) {
        return false;
    }
    let took_over = known.is_some();
    let mut h = holder();
    match known {
        Some(o) => {
            h.netns = o.netns;
            h.netns_cookie = o.netns_cookie;
        }
        None => h.netns = netns(),
    }
    let _ = OWNERS.insert(cookie, h, 0);
    holds(tgid);
    took_over
}

/// Marks `tgid` as a process whose exit and execs matter.
#[inline(always)]
fn holds(tgid: u32) {
    // SAFETY: only the presence is read.
    if unsafe { HOLDERS.get(tgid) }.is_none() {
        let _ = HOLDERS.insert(tgid, 1, 0);
    }
}

/// `sched_process_exit(struct task_struct *p)`, in the exiting thread's context, after it
/// left its thread group's count of live threads and before its files are closed: the last
/// thread out of a holder records its process's exit.
#[inline(always)]
pub fn on_exit(task: u64) {
    let signal: u64 = field(task, off!(task_signal));
    if signal == 0 || field::<i32>(signal, off!(signal_live)) != 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only the presence is read.
    if unsafe { HOLDERS.get(tgid) }.is_none() {
        return;
    }
    let _ = HOLDERS.remove(tgid);
    // SAFETY: BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    match PROCESSES.get_ptr_mut(tgid) {
        // SAFETY: a map value valid for this program run.
        Some(c) => unsafe { (*c).exit_ns = now },
        None => {
            let c = ProcessChange {
                exit_ns: now,
                exec_ns: 0,
                comm: [0; 16],
            };
            let _ = PROCESSES.insert(tgid, c, 0);
        }
    }
    if let Some(e) = HOLDER_EPOCH.get_ptr_mut(0) {
        // SAFETY: a map value valid for this program run; a lost increment between two
        // exits at once still moves the epoch.
        unsafe { *e += 1 };
    }
    emit(|ev| {
        ev.kind = EventKind::Exit as u16;
        ev.ts_ns = now;
        ev.tgid = tgid;
        true
    });
}

/// `sched_process_exec`, in a holder's context once it runs the new program (whose name
/// `comm` already is). An earlier process's exit under the same tgid is kept: an owner
/// learned before it is that process's, and gone.
#[inline(always)]
pub fn on_exec() {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only the presence is read.
    if unsafe { HOLDERS.get(tgid) }.is_none() {
        return;
    }
    // SAFETY: BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    match PROCESSES.get_ptr_mut(tgid) {
        // SAFETY: a map value valid for this program run.
        Some(c) => unsafe {
            (*c).exec_ns = now;
            (*c).comm = comm;
        },
        None => {
            let c = ProcessChange {
                exit_ns: 0,
                exec_ns: now,
                comm,
            };
            let _ = PROCESSES.insert(tgid, c, 0);
        }
    }
    emit(|ev| {
        ev.kind = EventKind::Exec as u16;
        ev.ts_ns = now;
        set_owner(ev, &current_owner());
        true
    });
}

#[inline(always)]
fn set_owner(ev: &mut Event, o: &Owner) {
    ev.tgid = o.tgid;
    ev.pid = o.pid;
    ev.uid = o.uid;
    ev.cgroup = o.cgroup;
    ev.comm = o.comm;
    set_netns(ev, o);
}

/// What the hook itself saw of the namespace wins over what is known of the owner.
#[inline(always)]
fn set_netns(ev: &mut Event, o: &Owner) {
    if ev.netns == 0 && ev.netns_cookie == 0 {
        ev.netns = o.netns;
        ev.netns_cookie = o.netns_cookie;
    }
}

#[inline(always)]
fn current_owner() -> Owner {
    let pid_tgid = bpf_get_current_pid_tgid();
    Owner {
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: bpf_get_current_uid_gid() as u32,
        netns: 0,
        // SAFETY: BPF helpers without preconditions.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        netns_cookie: 0,
        since_ns: unsafe { bpf_ktime_get_boot_ns() },
    }
}
