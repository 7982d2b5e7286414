//! udpmon's kernel programs. Entry points only, each forwarding to the module that does the
//! work: a strategy's own hooks are in the file named after it (`fentry.rs`, `kprobe.rs`,
//! `tracepoint.rs`, as `udpmon/src/probes/`), the hooks every strategy shares are here.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_xadd: the only non-fetching atomic add"
)]

mod apperr;
mod datagram;
mod fentry;
mod flow;
mod icmp;
mod kprobe;
mod kread;
mod lifecycle;
mod maps;
mod owner;
mod packet;
mod refused;
mod sock;
mod tracepoint;

use apperr::cookie_of;
use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_sock},
    programs::{BtfTracePointContext, SockContext},
};
use aya_log_ebpf::debug;
use kread::Btf;
use maps::may_free_icmp;

/// Every strategy: records the exit of each process, so that a socket's holder that exited
/// is not named after its pid may have been reused (see owner.rs).
#[btf_tracepoint(function = "sched_process_exit")]
pub fn task_exit(ctx: BtfTracePointContext) -> i32 {
    owner::on_exit(ctx.arg::<u64>(0));
    0
}

/// Every strategy: records each exec, so that a socket's holder is named after the program
/// it runs now.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn task_exec(_ctx: BtfTracePointContext) -> i32 {
    owner::on_exec();
    0
}

/// Every strategy: names the owner of each new socket and makes the kernel generate its
/// cookie.
#[cgroup_sock(sock_create)]
pub fn udp_sock_create(ctx: SockContext) -> i32 {
    lifecycle::on_create(ctx.sock);
    1
}

/// `void inet_sk_error_report(const struct sock *sk)` tracepoint, >= 5.14: fired by
/// sk_error_report() when an error is set or queued on an AF_INET/AF_INET6 socket.
#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn icmp_error_report(ctx: BtfTracePointContext) -> i32 {
    // Diagnostics for `udpmon -vv`; with the level global at 0 the verifier prunes them.
    debug!(&ctx, "inet_sk_error_report");
    let sk = ctx.arg::<u64>(0);
    icmp::on_error_report::<Btf>(sk, || cookie_of(sk));
    0
}

/// `consume_skb(struct sk_buff *skb, void *location)` tracepoint (>= 6.3): the end of a
/// successfully handled ICMP error, among every other skb the host frees. `location` rules
/// out all but the ICMP handlers' frees before the skb is touched (see `IcmpFreeCallers`).
#[btf_tracepoint(function = "consume_skb")]
pub fn skb_consumed(ctx: BtfTracePointContext) -> i32 {
    if may_free_icmp(ctx.arg::<u64>(1)) {
        icmp::on_skb_freed(ctx.arg::<u64>(0));
    }
    0
}

/// `consume_skb(struct sk_buff *skb)` before 6.3, which had no `location`: the skb's own
/// fields tell (see `icmp::on_skb_freed`).
#[btf_tracepoint(function = "consume_skb")]
pub fn skb_consumed_no_location(ctx: BtfTracePointContext) -> i32 {
    icmp::on_skb_freed(ctx.arg::<u64>(0));
    0
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason[, struct sock
/// *rx_sk])`: reason since 5.17, rx_sk since 6.12; args 0 to 2 are read.
#[btf_tracepoint(function = "kfree_skb")]
pub fn skb_dropped(ctx: BtfTracePointContext) -> i32 {
    let skb = ctx.arg::<u64>(0);
    refused::on_drop(skb, ctx.arg::<u32>(2));
    if may_free_icmp(ctx.arg::<u64>(1)) {
        icmp::on_skb_freed(skb);
    }
    0
}

/// `kfree_skb(struct sk_buff *skb, void *location)` before 5.17: no drop reason, so ICMP
/// errors only (icmpv6_rcv frees every error it handled this way there, too).
#[btf_tracepoint(function = "kfree_skb")]
pub fn skb_dropped_no_reason(ctx: BtfTracePointContext) -> i32 {
    if may_free_icmp(ctx.arg::<u64>(1)) {
        icmp::on_skb_freed(ctx.arg::<u64>(0));
    }
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
