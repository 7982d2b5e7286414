//! Errors the application itself received from send/recv: proof that it noticed.
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns};
use udpmon_common::{
    Event, EventKind,
    event::{AF_INET, AF_INET6, flags},
};

use crate::{
    flow::fill_identity,
    kread::{read, read_buf},
    maps::{emit, offsets},
    packet::IPPROTO_UDP,
};

const EAGAIN: i32 = 11;
const MSG_ERRQUEUE: u32 = 0x2000;

/// `ret` is the syscall-level result; `kind` SendError or RecvError.
#[inline(always)]
pub fn on_result(sk: u64, ret: i32, msg_flags: u32, kind: EventKind) {
    // Success, and the non-blocking "nothing yet", are the normal case.
    if ret >= 0 || ret == -EAGAIN || msg_flags & MSG_ERRQUEUE != 0 {
        return;
    }
    let o = offsets();
    let proto: u16 = read(sk, o.sk_protocol);
    if proto != IPPROTO_UDP as u16 {
        return;
    }
    let mut ev = Event::zeroed();
    ev.kind = kind as u16;
    ev.ret = ret;
    // SAFETY: BPF helpers; `sk` is the hook's socket pointer.
    ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    ev.cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
    fill_sock_tuple(&mut ev, sk);
    if !fill_identity(&mut ev, true) {
        return;
    }
    emit(&ev);
}

/// Addresses, state and netns of a socket, from `struct sock`.
#[inline(always)]
pub fn fill_sock_tuple(ev: &mut Event, sk: u64) {
    let o = offsets();
    let family: u16 = read(sk, o.skc_family);
    ev.lport = read(sk, o.skc_num);
    ev.rport = u16::from_be(read(sk, o.skc_dport));
    let state: u8 = read(sk, o.skc_state);
    if state == 1 {
        ev.flags |= flags::CONNECTED;
    }
    if family == AF_INET6 {
        ev.family = AF_INET6;
        read_buf(sk, o.skc_v6_rcv_saddr, &mut ev.local);
        read_buf(sk, o.skc_v6_daddr, &mut ev.remote);
    } else {
        ev.family = AF_INET;
        read_buf(sk, o.skc_rcv_saddr, &mut ev.local[..4]);
        read_buf(sk, o.skc_daddr, &mut ev.remote[..4]);
    }
    let net: u64 = read(sk, o.skc_net);
    if net != 0 {
        ev.netns = read(net, o.net_ns_inum);
    }
}
