//! Entry points of the tracepoint strategy, for kernels that refuse trampolines and kprobes:
//! cgroup hooks on the cgroup-v2 root for datagrams and the socket lifecycle, BTF
//! tracepoints for application errors (with the hooks in main.rs that every strategy shares).
use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{btf_tracepoint, cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{BtfTracePointContext, SkBuffContext, SockAddrContext, SockContext},
};
use udpmon_common::EventKind;

use crate::{apperr, apperr::cookie_of, datagram, flow::Dir, kread::Btf, lifecycle, owner};

/// Every datagram a socket sends (tracepoint strategy).
#[cgroup_skb]
pub fn udp_egress(ctx: SkBuffContext) -> i32 {
    datagram::on_skb(&ctx, Dir::Tx, |_| {});
    1
}

/// As `udp_egress`, where the kernel has no `sock_send_length` (< 6.3): each datagram also
/// tells who sends on the socket (owner.rs).
#[cgroup_skb]
pub fn udp_egress_user(ctx: SkBuffContext) -> i32 {
    datagram::on_skb(&ctx, Dir::Tx, owner::note_user);
    1
}

/// Where the kernel has no `sock_recv_length` (< 6.3): a receive call that passes an address
/// buffer (recvmsg, recvmmsg, recvfrom with an address: all but recv() and read()) tells who
/// receives on the socket. Runs as the call returns; must return 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn udp_recvmsg4_user(ctx: SockAddrContext) -> i32 {
    // SAFETY: the helper accepts the program's own context.
    owner::note_user(unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) });
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn udp_recvmsg6_user(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    owner::note_user(unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) });
    1
}

/// Every datagram a socket receives, at enqueue time (tracepoint strategy).
#[cgroup_skb]
pub fn udp_ingress(ctx: SkBuffContext) -> i32 {
    datagram::on_skb(&ctx, Dir::Rx, |_| {});
    1
}

#[cgroup_sock(sock_release)]
pub fn udp_sock_release(ctx: SockContext) -> i32 {
    lifecycle::on_release(ctx.sock);
    1
}

/// Must return 1: 0 would refuse the application's connect().
#[cgroup_sock_addr(connect4)]
pub fn udp_connect4(ctx: SockAddrContext) -> i32 {
    lifecycle::on_connect::<false>(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn udp_connect6(ctx: SockAddrContext) -> i32 {
    lifecycle::on_connect::<true>(ctx.sock_addr);
    1
}

/// `sock_send_length(struct sock *sk, int ret, int flags)` tracepoint, >= 6.3: every
/// sendmsg of every socket on the host, in the caller's context: who holds the socket (see
/// owner.rs), then failures.
#[btf_tracepoint(function = "sock_send_length")]
pub fn udp_send_result(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    owner::note_holder::<Btf>(sk, true, || cookie_of(sk));
    let ret: i32 = ctx.arg(1);
    if ret < 0 {
        apperr::on_result(sk, ret, ctx.arg(2), EventKind::SendError, || cookie_of(sk));
    }
    0
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)` tracepoint, >= 6.3: as above,
/// for every recvmsg.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn udp_recv_result(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    owner::note_holder::<Btf>(sk, true, || cookie_of(sk));
    let ret: i32 = ctx.arg(1);
    if ret < 0 {
        apperr::on_result(sk, ret, ctx.arg(2), EventKind::RecvError, || cookie_of(sk));
    }
    0
}
