//! Socket-level hooks of the fentry and kprobe strategies (udp_send_skb, __udp_enqueue_schedule_skb,
//! udp_recvmsg, connect, disconnect, destroy). Each takes raw kernel pointers so that the
//! fentry and the kprobe entry points can share it.
use core::mem::MaybeUninit;

use aya_ebpf::helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel_buf};
use udpmon_common::{
    Counter, EventKind,
    event::{AF_INET, AF_INET6},
};

use crate::{
    apperr::{self, sock_tuple},
    flow::{Datagram, Dir, on_datagram},
    icmp::Kmem,
    kread::{Kernel, Probe, read},
    maps::{OWNERS, count, emit, off},
    owner::{fill_identity, note_holder},
    packet::{Bytes, HDR_WORDS, IPPROTO_UDP, UdpHeaders, addr_bytes, ip_proto, udp, udp_words},
};

#[inline(always)]
fn is_udp<K: Kernel>(sk: u64) -> bool {
    let proto: u16 = K::get(sk, off!(sk_protocol));
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
pub fn on_send_skb<K: Kernel>(skb: u64, fl: u64, v6: bool) {
    let sk: u64 = K::get(skb, off!(skb_sk));
    if sk == 0 || !is_udp::<K>(sk) {
        return;
    }
    let cookie: u64 = K::get(sk, off!(skc_cookie));
    if cookie == 0 {
        count(Counter::NoCookie);
        return;
    }
    note_holder::<K>(sk, false, || cookie);
    let r = K::route(fl, v6);
    // As the kernel computes it there: skb->len minus the transport offset, minus the header.
    let len: u32 = K::get(skb, off!(skb_len));
    let (head, data) = K::head_data(skb);
    let th: u16 = K::get(skb, off!(skb_transport_header));
    let l4_off = (head + th as u64).wrapping_sub(data) as u32;
    let d = Datagram {
        cookie,
        family: if v6 { AF_INET6 } else { AF_INET },
        local: r.saddr,
        remote: r.daddr,
        lport: u16::from_be(r.sport),
        rport: u16::from_be(r.dport),
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
pub fn on_send_result(sk: u64, ret: i32, v6_entry: bool, cookie: impl FnOnce() -> u64) {
    if ret >= 0 {
        return;
    }
    let family: u16 = read(sk, off!(skc_family));
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
pub fn on_enqueue<K: Kernel>(sk: u64, skb: u64, cookie: u64) {
    if !is_udp::<K>(sk) {
        return;
    }
    let head: u64 = K::get(skb, off!(skb_head));
    let nh: u16 = K::get(skb, off!(skb_network_header));
    // Both headers in one read: the skb's head buffer always extends past them, so the words
    // an IPv4 header leaves unused are read too, and ignored.
    let mut h = MaybeUninit::<[u32; HDR_WORDS]>::uninit();
    // SAFETY: `h` has room for HDR_WORDS words; the helper validates the kernel address.
    let rc = unsafe {
        bpf_probe_read_kernel_buf(
            (head + nh as u64) as *const u8,
            core::slice::from_raw_parts_mut(h.as_mut_ptr() as *mut u8, HDR_WORDS * 4),
        )
    };
    if rc.is_err() {
        return;
    }
    let w = h.as_ptr() as *const u32;
    // SAFETY: the helper filled every word.
    let word = |i: usize| unsafe { w.add(i).read() };
    let (version, proto, ihl) = ip_proto(word);
    if proto != IPPROTO_UDP || (version != 4 && version != 6) {
        return;
    }
    let u = if version == 6 || ihl == 20 {
        udp_words(word, version == 6)
    } else {
        // IPv4 options: the UDP header is further on.
        let Some((sport, dport, bytes)) = udp(&Kmem(head + nh as u64), ihl) else {
            return;
        };
        UdpHeaders {
            family: AF_INET,
            saddr: addr_bytes([word(3), 0, 0, 0]),
            daddr: addr_bytes([word(4), 0, 0, 0]),
            sport,
            dport,
            bytes,
        }
    };
    let d = Datagram::from_headers(&u, Dir::Rx, cookie, sk);
    on_datagram(&d, Dir::Rx, false);
}

/// __ip4_datagram_connect/__ip6_datagram_connect(sk, uaddr, addr_len): a connect() that
/// reached UDP (AF_UNSPEC disconnects go to `on_disconnect` instead).
#[inline(always)]
pub fn on_connect(sk: u64, uaddr: u64, cookie: u64) {
    if !is_udp::<Probe>(sk) {
        return;
    }
    let Some((family, remote, rport)) = sockaddr(uaddr) else {
        return;
    };
    emit(|ev| {
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
        fill_identity(ev, true)
    });
}

/// __udp_disconnect(sk, flags): connect(AF_UNSPEC), also reached from udp_abort.
#[inline(always)]
pub fn on_disconnect(sk: u64, cookie: u64) {
    if !is_udp::<Probe>(sk) {
        return;
    }
    emit(|ev| {
        ev.kind = EventKind::Connect as u16;
        // SAFETY: BPF helper without preconditions.
        ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
        ev.cookie = cookie;
        sock_tuple(sk).fill(ev);
        // Family 0 and no remote: the decoder's "disconnect".
        ev.family = 0;
        ev.remote = [0; 16];
        ev.rport = 0;
        fill_identity(ev, true)
    });
}

/// udp_destroy_sock/udpv6_destroy_sock(sk): called once per UDP socket, at close.
#[inline(always)]
pub fn on_destroy(sk: u64, cookie: u64) {
    if !is_udp::<Probe>(sk) {
        return;
    }
    emit(|ev| {
        ev.kind = EventKind::Close as u16;
        // SAFETY: BPF helper without preconditions.
        ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
        ev.cookie = cookie;
        sock_tuple(sk).fill(ev);
        fill_identity(ev, true)
    });
    let _ = OWNERS.remove(cookie);
}
