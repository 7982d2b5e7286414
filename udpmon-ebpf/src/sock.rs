//! Socket-level hooks of the trampoline and kprobe strategies (udp_sendmsg, __udp_enqueue_schedule_skb,
//! udp_recvmsg, connect, disconnect, destroy). Each takes raw kernel pointers so that the
//! fentry and the kprobe entry points can share it.
use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use udpmon_common::{
    EventKind,
    event::{AF_INET, AF_INET6},
};

use crate::{
    apperr::{self, sock_tuple},
    flow::{Datagram, Dir, fill_identity, on_datagram},
    icmp::Kmem,
    kread::read,
    maps::{OWNERS, TASK, emit, offsets, scratch_event},
    packet::{Bytes, IPPROTO_UDP, l3, udp},
};

#[inline(always)]
fn is_udp(sk: u64) -> bool {
    let proto: u16 = read(sk, offsets().sk_protocol);
    proto == IPPROTO_UDP as u16
}

/// A `struct sockaddr_in`/`sockaddr_in6` in kernel memory -> (family, addr, port). A
/// v4-mapped IPv6 address is reported as IPv4, as it is on the wire.
#[inline(always)]
fn sockaddr(addr: u64) -> Option<(u16, [u8; 16], u16)> {
    let mut sa = [0u8; 24];
    Kmem(addr).copy(0, &mut sa[..8])?;
    let family = u16::from_ne_bytes([sa[0], sa[1]]);
    let port = u16::from_be_bytes([sa[2], sa[3]]);
    let mut ip = [0u8; 16];
    match family {
        AF_INET => {
            ip[..4].copy_from_slice(&sa[4..8]);
            Some((AF_INET, ip, port))
        }
        AF_INET6 => {
            Kmem(addr).copy(0, &mut sa)?;
            if sa[8..18] == [0; 10] && sa[18] == 0xff && sa[19] == 0xff {
                ip[..4].copy_from_slice(&sa[20..24]);
                Some((AF_INET, ip, port))
            } else {
                ip.copy_from_slice(&sa[8..24]);
                Some((AF_INET6, ip, port))
            }
        }
        _ => None,
    }
}

/// After udp_sendmsg/udpv6_sendmsg returned `ret` for `msg` on `sk`.
/// `v6_entry`: the hook is on udpv6_sendmsg; udp_sendmsg entered from there (a v4-mapped
/// destination) is skipped so that the datagram is counted once.
#[inline(always)]
pub fn on_sendmsg(sk: u64, msg: u64, ret: i32, v6_entry: bool, cookie: u64) {
    if !is_udp(sk) {
        return;
    }
    let o = offsets();
    let family: u16 = read(sk, o.skc_family);
    if !v6_entry && family == AF_INET6 {
        return;
    }
    if ret < 0 {
        apperr::on_result(sk, ret, 0, EventKind::SendError, cookie);
        return;
    }
    let t = sock_tuple(sk);
    let name: u64 = read(msg, o.msghdr_msg_name);
    let (fam, remote, rport) = match if name != 0 { sockaddr(name) } else { None } {
        Some(a) => a,
        None => (t.family, t.remote, t.rport),
    };
    let mut local = t.local;
    if fam == AF_INET && t.family == AF_INET6 {
        // Dual-stack socket: its v6 local address is v4-mapped.
        local = [0; 16];
        local[..4].copy_from_slice(&t.local[12..16]);
    }
    let d = Datagram {
        cookie,
        family: fam,
        local,
        remote,
        lport: t.lport,
        rport,
        bytes: ret as u32,
        sk,
    };
    on_datagram(&d, Dir::Tx, true);
}

/// __udp_enqueue_schedule_skb(sk, skb): a datagram queued to a socket, in softirq, before
/// the receive-buffer check: the point where the kernel, and the tracepoint strategy's
/// cgroup_skb ingress, count it as received. (Counting when the application reads it
/// instead would reorder the seed's server: `nc -l` peeks, connect()s, then reads.)
#[inline(always)]
pub fn on_enqueue(sk: u64, skb: u64, cookie: u64) {
    if !is_udp(sk) {
        return;
    }
    let o = offsets();
    let head: u64 = read(skb, o.skb_head);
    let nh: u16 = read(skb, o.skb_network_header);
    let b = Kmem(head + nh as u64);
    let Some(ip) = l3(&b, 0) else { return };
    if ip.proto != IPPROTO_UDP {
        return;
    }
    let Some((sport, dport, bytes)) = udp(&b, ip.l4_off) else {
        return;
    };
    let d = Datagram {
        cookie,
        family: ip.family,
        local: ip.daddr,
        remote: ip.saddr,
        lport: dport,
        rport: sport,
        bytes,
        sk,
    };
    on_datagram(&d, Dir::Rx, false);
}

/// __ip4_datagram_connect/__ip6_datagram_connect(sk, uaddr, addr_len): a connect() that
/// reached UDP (AF_UNSPEC disconnects go to `on_disconnect` instead).
#[inline(always)]
pub fn on_connect(sk: u64, uaddr: u64, cookie: u64) {
    if !is_udp(sk) {
        return;
    }
    let Some((family, remote, rport)) = sockaddr(uaddr) else {
        return;
    };
    let Some(ev) = scratch_event(TASK) else {
        return;
    };
    ev.kind = EventKind::Connect as u16;
    // SAFETY: BPF helper without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    ev.cookie = cookie;
    sock_tuple(sk).fill(ev);
    ev.family = family;
    ev.remote = remote;
    ev.rport = rport;
    if family == AF_INET && ev.local[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        let l = ev.local;
        ev.local = [0; 16];
        ev.local[..4].copy_from_slice(&l[12..16]);
    }
    if fill_identity(ev, true) {
        emit(ev);
    }
}

/// __udp_disconnect(sk, flags): connect(AF_UNSPEC), also reached from udp_abort.
#[inline(always)]
pub fn on_disconnect(sk: u64, cookie: u64) {
    if !is_udp(sk) {
        return;
    }
    let Some(ev) = scratch_event(TASK) else {
        return;
    };
    ev.kind = EventKind::Connect as u16;
    // SAFETY: BPF helper without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    ev.cookie = cookie;
    sock_tuple(sk).fill(ev);
    // Family 0 and no remote: the decoder's "disconnect".
    ev.family = 0;
    ev.remote = [0; 16];
    ev.rport = 0;
    if fill_identity(ev, true) {
        emit(ev);
    }
}

/// udp_destroy_sock/udpv6_destroy_sock(sk): called once per UDP socket, at close.
#[inline(always)]
pub fn on_destroy(sk: u64, cookie: u64) {
    if !is_udp(sk) {
        return;
    }
    let Some(ev) = scratch_event(TASK) else {
        return;
    };
    ev.kind = EventKind::Close as u16;
    // SAFETY: BPF helper without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    ev.cookie = cookie;
    sock_tuple(sk).fill(ev);
    if fill_identity(ev, true) {
        let _ = OWNERS.remove(cookie);
        emit(ev);
    }
}
