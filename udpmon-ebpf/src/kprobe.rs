//! Entry points of the kprobe strategy, for kernels that refuse trampolines. kprobes see raw
//! registers, so arguments needed at return are stashed per thread at entry, and cookies are
//! read from `skc_cookie` (the cookie helper needs a BTF-typed pointer). Same prototypes as
//! in `fentry.rs`.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use udpmon_common::EventKind;

use crate::{
    apperr::{self, cached_cookie},
    kread::Probe,
    owner, sock,
};

/// Which function a stash entry belongs to: udpv6_sendmsg calls udp_sendmsg on the same
/// thread, so the key must tell them apart.
const SEND4: u64 = 1;
const SEND6: u64 = 2;
const RECV: u64 = 3;
const CONNECT: u64 = 4;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct StashKey {
    pid_tgid: u64,
    func: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stash {
    sk: u64,
    msg: u64,
    flags: u64,
}

/// LRU: a return that never comes (a thread killed mid-call) cannot leak entries.
#[map]
static STASH: LruHashMap<StashKey, Stash> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn key(func: u64) -> StashKey {
    StashKey {
        pid_tgid: bpf_get_current_pid_tgid(),
        func,
    }
}

#[inline(always)]
fn stash(func: u64, s: Stash) {
    let _ = STASH.insert(key(func), s, 0);
}

#[inline(always)]
fn unstash(func: u64) -> Option<Stash> {
    let k = key(func);
    // SAFETY: the value is copied out before the entry is removed.
    let s = unsafe { STASH.get(k) }.copied();
    let _ = STASH.remove(k);
    s
}

#[kprobe]
pub fn udp_sendmsg_kp(ctx: ProbeContext) -> u32 {
    stash(
        SEND4,
        Stash {
            sk: ctx.arg(0).unwrap_or(0),
            msg: 0,
            flags: 0,
        },
    );
    0
}

/// Success, the common case, returns before the stash is looked up: the entry probe's next
/// call on this thread overwrites the entry left behind.
#[kretprobe]
pub fn udp_sendmsg_krp(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<i32>();
    if ret < 0
        && let Some(s) = unstash(SEND4)
    {
        sock::on_send_result(s.sk, ret, false, || cached_cookie(s.sk));
    }
    0
}

#[kprobe]
pub fn udpv6_sendmsg_kp(ctx: ProbeContext) -> u32 {
    stash(
        SEND6,
        Stash {
            sk: ctx.arg(0).unwrap_or(0),
            msg: 0,
            flags: 0,
        },
    );
    0
}

#[kretprobe]
pub fn udpv6_sendmsg_krp(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<i32>();
    if ret < 0
        && let Some(s) = unstash(SEND6)
    {
        sock::on_send_result(s.sk, ret, true, || cached_cookie(s.sk));
    }
    0
}

/// udp_send_skb and udp_v6_send_skb (see fentry.rs): entry only.
#[kprobe]
pub fn udp_send_skb_kp(ctx: ProbeContext) -> u32 {
    sock::on_send_skb::<Probe>(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), false);
    0
}

#[kprobe]
pub fn udp_v6_send_skb_kp(ctx: ProbeContext) -> u32 {
    sock::on_send_skb::<Probe>(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), true);
    0
}

#[kprobe]
pub fn udp_enqueue_kp(ctx: ProbeContext) -> u32 {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    sock::on_enqueue::<Probe>(sk, ctx.arg(1).unwrap_or(0), cached_cookie(sk));
    0
}

/// Attached to both udp_recvmsg and udpv6_recvmsg: they never nest. `flags` is argument 3
/// from 5.19 on and 4 before (after `noblock`); userspace picks the variant from BTF, as for
/// fentry (one program reading either register would be a ctx access the verifier refuses).
macro_rules! recvmsg_entry {
    ($name:ident, $flags:literal) => {
        #[kprobe]
        pub fn $name(ctx: ProbeContext) -> u32 {
            let sk: u64 = ctx.arg(0).unwrap_or(0);
            owner::note_holder::<Probe>(sk, false, || cached_cookie(sk));
            stash(
                RECV,
                Stash {
                    sk,
                    msg: 0,
                    flags: ctx.arg($flags).unwrap_or(0),
                },
            );
            0
        }
    };
}
recvmsg_entry!(udp_recvmsg_kp_f3, 3);
recvmsg_entry!(udp_recvmsg_kp_f4, 4);

/// As for sends: success never touches the stash.
#[kretprobe]
pub fn udp_recvmsg_krp(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<i32>();
    if ret < 0
        && let Some(s) = unstash(RECV)
    {
        apperr::on_result(s.sk, ret, s.flags as u32, EventKind::RecvError, || {
            cached_cookie(s.sk)
        });
    }
    0
}

/// security_file_receive (see fentry.rs).
#[kprobe]
pub fn file_receive_kp(ctx: ProbeContext) -> u32 {
    owner::on_file_received::<Probe>(ctx.arg(0).unwrap_or(0));
    0
}

/// __ip4_datagram_connect and __ip6_datagram_connect (never nested): reported at return,
/// once the source address is chosen, and only when the connect succeeded.
#[kprobe]
pub fn udp_connect_kp(ctx: ProbeContext) -> u32 {
    stash(
        CONNECT,
        Stash {
            sk: ctx.arg(0).unwrap_or(0),
            msg: ctx.arg(1).unwrap_or(0),
            flags: 0,
        },
    );
    0
}

#[kretprobe]
pub fn udp_connect_krp(ctx: RetProbeContext) -> u32 {
    if let Some(s) = unstash(CONNECT)
        && ctx.ret::<i32>() == 0
    {
        sock::on_connect(s.sk, s.msg, cached_cookie(s.sk));
    }
    0
}

#[kprobe]
pub fn udp_disconnect_kp(ctx: ProbeContext) -> u32 {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    sock::on_disconnect(sk, cached_cookie(sk));
    0
}

/// udp_destroy_sock and udpv6_destroy_sock.
#[kprobe]
pub fn udp_destroy_kp(ctx: ProbeContext) -> u32 {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    sock::on_destroy(sk, cached_cookie(sk));
    0
}

/// sock_def_error_report, where the inet_sk_error_report tracepoint is missing (< 5.14): see
/// `icmp::on_error_report`.
#[kprobe]
pub fn sock_error_report_kp(ctx: ProbeContext) -> u32 {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    crate::icmp::on_error_report::<Probe>(sk, || cached_cookie(sk));
    0
}
