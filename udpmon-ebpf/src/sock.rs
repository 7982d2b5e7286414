//! Socket-level hooks of the trampoline and kprobe strategies (udp_sendmsg, __udp_enqueue_schedule_skb,
//! udp_recvmsg, connect, disconnect, destroy). Each takes raw kernel pointers so that the
//! fentry and the kprobe entry points can share it.
use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use udpmon_common::{
    Counter, EventKind,
    event::{AF_INET, AF_INET6},
};

use crate::{
    apperr::{self, sock_tuple},
    flow::{Datagram, Dir, fill_identity, on_datagram},
    icmp::Kmem,
    kread::{read, read_buf},
    maps::{OWNERS, TASK, count, emit, offsets, scratch_event},
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

/// udp_send_skb/udp_v6_send_skb(skb, flow, cork): one datagram handed to IP, in the
/// sender's context and before it can reach the peer, so a reply can never be counted
/// ahead of it (at udp_sendmsg's exit it could: the peer may answer while the sender is
/// still inside the call). The flow carries the route's source address, the real local
/// address even for a socket bound to the wildcard. Corked sends (MSG_MORE, UDP_CORK) pass
/// here once per datagram, not once per call. The cookie is the socket's cached one: the
/// socket pointer here is read, not typed, and udpmon makes the kernel generate every UDP
/// socket's cookie (cgroup sock_create, and sock_diag for the sockets that already exist).
#[inline(always)]
pub fn on_send_skb(skb: u64, fl: u64, v6: bool) {
    let o = offsets();
    let sk: u64 = read(skb, o.skb_sk);
    if sk == 0 || !is_udp(sk) {
        return;
    }
    let cookie = apperr::cached_cookie(sk);
    if cookie == 0 {
        count(Counter::NoCookie);
        return;
    }
    let (mut local, mut remote) = ([0u8; 16], [0u8; 16]);
    let (family, ports_off) = if v6 {
        read_buf(fl, o.fl6_saddr, &mut local);
        read_buf(fl, o.fl6_daddr, &mut remote);
        (AF_INET6, o.fl6_ports)
    } else {
        read_buf(fl, o.fl4_saddr, &mut local[..4]);
        read_buf(fl, o.fl4_daddr, &mut remote[..4]);
        (AF_INET, o.fl4_ports)
    };
    let ports: [u8; 4] = read(fl, ports_off);
    // As the kernel computes it there: skb->len minus the transport offset, minus the header.
    let len: u32 = read(skb, o.skb_len);
    let data: u64 = read(skb, o.skb_data);
    let head: u64 = read(skb, o.skb_head);
    let th: u16 = read(skb, o.skb_transport_header);
    let l4_off = (head + th as u64).wrapping_sub(data) as u32;
    let d = Datagram {
        cookie,
        family,
        local,
        remote,
        lport: u16::from_be_bytes([ports[2], ports[3]]),
        rport: u16::from_be_bytes([ports[0], ports[1]]),
        bytes: len.saturating_sub(l4_off).saturating_sub(UDP_HDR),
        sk,
    };
    on_datagram(&d, Dir::Tx, true);
}

const UDP_HDR: u32 = 8;

/// After udp_sendmsg/udpv6_sendmsg returned `ret` on `sk`: only failures matter here (the
/// datagram itself is counted at udp_send_skb). `v6_entry`: the hook is on udpv6_sendmsg;
/// udp_sendmsg entered from there (a v4-mapped destination) is skipped so that one failure
/// is reported once.
#[inline(always)]
pub fn on_send_result(sk: u64, ret: i32, v6_entry: bool, cookie: u64) {
    if ret >= 0 {
        return;
    }
    let family: u16 = read(sk, offsets().skc_family);
    if !v6_entry && family == AF_INET6 {
        return;
    }
    apperr::on_result(sk, ret, 0, EventKind::SendError, cookie);
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
