//! udpmon's kernel programs. Entry points only: each one forwards to the module that does
//! the work, so a hook can be found here and its logic in the module named after its job.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_xadd: the only non-fetching atomic add"
)]

mod apperr;
mod datagram;
mod flow;
mod icmp;
mod kprobes;
mod kread;
mod lifecycle;
mod maps;
mod packet;
mod refused;
mod sock;
mod trampoline;

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{BtfTracePointContext, SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use udpmon_common::EventKind;

use crate::{apperr::cookie_of, flow::Dir};

/// Every datagram a socket sends (tracepoint strategy).
#[cgroup_skb]
pub fn udp_egress(ctx: SkBuffContext) -> i32 {
    datagram::on_skb(&ctx, Dir::Tx);
    1
}

/// Every datagram a socket receives, at enqueue time (tracepoint strategy).
#[cgroup_skb]
pub fn udp_ingress(ctx: SkBuffContext) -> i32 {
    datagram::on_skb(&ctx, Dir::Rx);
    1
}

#[cgroup_sock(sock_create)]
pub fn udp_sock_create(ctx: SockContext) -> i32 {
    lifecycle::on_create(ctx.sock);
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

/// `void netif_receive_skb(struct sk_buff *skb)` tracepoint, every kernel >= 5.5 (tp_btf):
/// `skb->network_header` is the received L3 header. Tracepoint strategy's ICMP parser.
#[btf_tracepoint(function = "netif_receive_skb")]
pub fn icmp_receive(ctx: BtfTracePointContext) -> i32 {
    icmp::on_receive(ctx.arg::<u64>(0));
    0
}

/// `void inet_sk_error_report(const struct sock *sk)` tracepoint, >= 5.14: fired by
/// sk_error_report() when an error is set or queued on an AF_INET/AF_INET6 socket.
#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn icmp_error_report(ctx: BtfTracePointContext) -> i32 {
    // Diagnostics for `udpmon -vv`; with the level global at 0 the verifier prunes them.
    debug!(&ctx, "inet_sk_error_report");
    icmp::on_error_report(ctx.arg::<u64>(0));
    0
}

/// `consume_skb(struct sk_buff *skb[, void *location])` tracepoint: the end of a
/// successfully handled ICMP (location was added in 6.3; only arg 0 is read).
#[btf_tracepoint(function = "consume_skb")]
pub fn icmp_consumed(ctx: BtfTracePointContext) -> i32 {
    icmp::on_skb_freed(ctx.arg::<u64>(0));
    0
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason[, struct sock
/// *rx_sk])`: reason since 5.17, rx_sk since 6.12; args 0 and 2 are read.
#[btf_tracepoint(function = "kfree_skb")]
pub fn skb_dropped(ctx: BtfTracePointContext) -> i32 {
    let skb = ctx.arg::<u64>(0);
    icmp::on_skb_freed(skb);
    refused::on_drop(skb, ctx.arg::<u32>(2));
    0
}

/// `sock_send_length(struct sock *sk, int ret, int flags)` tracepoint, >= 6.3.
#[btf_tracepoint(function = "sock_send_length")]
pub fn udp_send_result(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    apperr::on_result(
        sk,
        ctx.arg(1),
        ctx.arg(2),
        EventKind::SendError,
        cookie_of(sk),
    );
    0
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)` tracepoint, >= 6.3.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn udp_recv_result(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    apperr::on_result(
        sk,
        ctx.arg(1),
        ctx.arg(2),
        EventKind::RecvError,
        cookie_of(sk),
    );
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this never runs.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
