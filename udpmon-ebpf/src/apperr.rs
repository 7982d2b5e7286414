//! Errors the application itself received from send/recv: proof that it noticed.
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns};
use udpmon_common::{
    Event, EventKind,
    event::{AF_INET, AF_INET6, flags},
    offsets::helpers,
};

use crate::{
    kread::{read, read_buf, sock_netns},
    maps::{emit, has_helper, off},
    owner::fill_identity,
    packet::IPPROTO_UDP,
};

/// Cookie of a socket from a BTF-typed pointer (fentry, fexit, tp_btf). Kernels before 5.12
/// do not let these programs call the helper: there, the cached cookie, as for kprobes.
#[inline(always)]
pub fn cookie_of(sk: u64) -> u64 {
    if !has_helper(helpers::SOCKET_COOKIE) {
        return cached_cookie(sk);
    }
    // SAFETY: callers pass the hook's trusted `struct sock *`.
    unsafe { bpf_get_socket_cookie(sk as *mut _) }
}

/// Cookie of a socket from an untyped pointer (kprobes cannot call the helper): the cached
/// `skc_cookie`, which udpmon's own hooks make the kernel generate (0 if never generated).
#[inline(always)]
pub fn cached_cookie(sk: u64) -> u64 {
    read(sk, off!(skc_cookie))
}

const EAGAIN: i32 = 11;
const MSG_ERRQUEUE: u32 = 0x2000;

/// `ret` is the syscall-level result; `kind` SendError or RecvError. `cookie` is called only
/// for a failure on a UDP socket.
#[inline(always)]
pub fn on_result(sk: u64, ret: i32, msg_flags: u32, kind: EventKind, cookie: impl FnOnce() -> u64) {
    // Success, and the non-blocking "nothing yet", are the normal case.
    if ret >= 0 || ret == -EAGAIN || msg_flags & MSG_ERRQUEUE != 0 {
        return;
    }
    let proto: u16 = read(sk, off!(sk_protocol));
    if proto != IPPROTO_UDP as u16 {
        return;
    }
    let cookie = cookie();
    emit(|ev| {
        ev.kind = kind as u16;
        ev.ret = ret;
        // SAFETY: BPF helper without preconditions.
        ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
        ev.cookie = cookie;
        sock_tuple(sk).fill(ev);
        fill_identity(ev, true)
    });
}

/// What `struct sock` says about a socket's addresses.
pub struct SockTuple {
    pub family: u16,
    pub connected: bool,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub netns: u32,
}

impl SockTuple {
    #[inline(always)]
    pub fn fill(&self, ev: &mut Event) {
        ev.family = self.family;
        ev.local = self.local;
        ev.remote = self.remote;
        ev.lport = self.lport;
        ev.rport = self.rport;
        ev.netns = self.netns;
        if self.connected {
            ev.flags |= flags::CONNECTED;
        }
    }
}

/// Addresses, state and netns of a socket, from `struct sock`.
#[inline(always)]
pub fn sock_tuple(sk: u64) -> SockTuple {
    let family: u16 = read(sk, off!(skc_family));
    let state: u8 = read(sk, off!(skc_state));
    let mut t = SockTuple {
        family: AF_INET,
        connected: state == 1,
        local: [0; 16],
        remote: [0; 16],
        lport: read(sk, off!(skc_num)),
        rport: u16::from_be(read(sk, off!(skc_dport))),
        netns: 0,
    };
    if family == AF_INET6 {
        t.family = AF_INET6;
        read_buf(sk, off!(skc_v6_rcv_saddr), &mut t.local);
        read_buf(sk, off!(skc_v6_daddr), &mut t.remote);
    } else {
        read_buf(sk, off!(skc_rcv_saddr), &mut t.local[..4]);
        read_buf(sk, off!(skc_daddr), &mut t.remote[..4]);
    }
    t.netns = sock_netns(sk);
    t
}
