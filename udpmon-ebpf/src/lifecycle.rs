//! Socket lifecycle from the cgroup hooks: create, connect, release.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
};
use udpmon_common::{
    EventKind,
    event::{AF_INET, AF_INET6},
};

use crate::{
    maps::{OWNERS, emit},
    owner::{fill_identity, learn_owner},
    packet::IPPROTO_UDP,
};

/// cgroup/sock_create: remember who created each UDP socket.
#[inline(always)]
pub fn on_create(sk: *mut bpf_sock) {
    // SAFETY: the context pointer is valid for the program run.
    let proto = unsafe { (*sk).protocol };
    if proto != IPPROTO_UDP as u32 {
        return;
    }
    // SAFETY: helpers on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
    let netns = unsafe { bpf_get_netns_cookie(sk as *mut _) };
    learn_owner(cookie, netns);
}

/// cgroup/connect4 and connect6: runs before the connect completes, in the caller's context.
/// `V6`: the verifier lets only connect6 programs read `user_ip6`, so each family gets its
/// own instance.
#[inline(always)]
pub fn on_connect<const V6: bool>(ctx: *mut bpf_sock_addr) {
    // SAFETY: the context pointer is valid for the program run.
    let a = unsafe { &*ctx };
    if a.protocol != IPPROTO_UDP as u32 {
        return;
    }
    emit(|ev| {
        ev.kind = EventKind::Connect as u16;
        // SAFETY: BPF helpers on the program's own context.
        ev.cookie = unsafe { bpf_get_socket_cookie(ctx as *mut _) };
        ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
        ev.netns_cookie = unsafe { bpf_get_netns_cookie(ctx as *mut _) };
        if V6 {
            ev.family = AF_INET6;
            for i in 0..4 {
                ev.remote[i * 4..i * 4 + 4].copy_from_slice(&a.user_ip6[i].to_ne_bytes());
            }
            if ev.remote[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
                // A v4-mapped peer of a dual-stack socket: reported as IPv4, as on the wire.
                ev.family = AF_INET;
                ev.remote.copy_within(12..16, 0);
                ev.remote[4..].fill(0);
            }
        } else {
            ev.family = AF_INET;
            ev.remote[..4].copy_from_slice(&a.user_ip4.to_ne_bytes());
        }
        ev.rport = u16::from_be(a.user_port as u16);
        // The local address as bound so far: an unbound socket gets its port (and any socket its
        // source address) only inside connect(), after this hook; the engine learns them from
        // the socket's next event.
        // SAFETY: `sk` is the context's socket, which the kernel guarantees to be set.
        let sk = unsafe { &*a.__bindgen_anon_1.sk };
        ev.lport = sk.src_port as u16;
        if V6 {
            for i in 0..4 {
                ev.local[i * 4..i * 4 + 4].copy_from_slice(&sk.src_ip6[i].to_ne_bytes());
            }
            if ev.family == AF_INET {
                ev.local.copy_within(12..16, 0);
                ev.local[4..].fill(0);
            }
        } else {
            ev.local[..4].copy_from_slice(&sk.src_ip4.to_ne_bytes());
        }
        fill_identity(ev, true)
    });
}

/// cgroup/sock_release: the last close of a UDP socket's file.
#[inline(always)]
pub fn on_release(sk: *mut bpf_sock) {
    // SAFETY: the context pointer is valid for the program run.
    let (proto, family) = unsafe { ((*sk).protocol, (*sk).family) };
    if proto != IPPROTO_UDP as u32 {
        return;
    }
    // SAFETY: BPF helpers on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
    emit(|ev| {
        ev.kind = EventKind::Close as u16;
        ev.family = family as u16;
        ev.cookie = cookie;
        // SAFETY: BPF helper without preconditions.
        ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
        fill_identity(ev, true)
    });
    let _ = OWNERS.remove(cookie);
}
