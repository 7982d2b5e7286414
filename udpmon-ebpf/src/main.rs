//! udpmon's kernel programs. Entry points only: each one forwards to the module that does
//! the work, so a hook can be found here and its logic in the module named after its job.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic_xadd: the only non-fetching atomic add")]

mod datagram;
mod flow;
mod kread;
mod lifecycle;
mod maps;
mod packet;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};

use crate::flow::Dir;

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
    lifecycle::on_connect(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn udp_connect6(ctx: SockAddrContext) -> i32 {
    lifecycle::on_connect(ctx.sock_addr);
    1
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
