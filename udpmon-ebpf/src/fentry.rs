//! Entry points of the fentry/fexit strategy. Prototypes (`match-proto` lines) are the
//! kernel's, and the version range each was checked for; variants are picked by userspace
//! from the running kernel's BTF.
use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};

use crate::{apperr, apperr::cookie_of, kread::Btf, maps::has_helper, owner, sock};
use udpmon_common::{EventKind, offsets::helpers};

/// The return value of a function of `nargs` arguments: from bpf_get_func_ret where the kernel
/// has it (5.17), whatever the arity; before that, from the slot the trampoline puts it in,
/// after the arguments (the arity is that of the prototype the program was written for).
#[inline(always)]
fn ret(ctx: &FExitContext, nargs: usize) -> Result<i32, i32> {
    if has_helper(helpers::FUNC_RET) {
        ctx.ret()
    } else {
        Ok(ctx.arg(nargs))
    }
}

/// Failed sends (APP-ERROR); the datagrams themselves are counted at udp_send_skb.
/// match-proto:v5.8:net/ipv4/udp.c:int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
/// match-proto:v7.2:net/ipv4/udp.c:int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
#[fexit(function = "udp_sendmsg")]
pub fn udp_sendmsg_exit(ctx: FExitContext) -> i32 {
    let ret = ret(&ctx, 3).unwrap_or(0);
    if ret < 0 {
        let sk = ctx.arg::<u64>(0);
        sock::on_send_result(sk, ret, false, || cookie_of(sk));
    }
    0
}

/// match-proto:v5.8:net/ipv6/udp.c:int udpv6_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
/// match-proto:v7.2:net/ipv6/udp.c:int udpv6_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
#[fexit(function = "udpv6_sendmsg")]
pub fn udpv6_sendmsg_exit(ctx: FExitContext) -> i32 {
    let ret = ret(&ctx, 3).unwrap_or(0);
    if ret < 0 {
        let sk = ctx.arg::<u64>(0);
        sock::on_send_result(sk, ret, true, || cookie_of(sk));
    }
    0
}

/// Static, but out of line (a BTF FUNC) in Debian's 6.1, 6.12 and 7.2 builds and on 6.18: it
/// has two callers, udp_sendmsg and udp_push_pending_frames. Where a build inlined it, the
/// attach fails and the strategy is not used.
/// match-proto:v6.1:net/ipv4/udp.c:static int udp_send_skb(struct sk_buff *skb, struct flowi4 *fl4, struct inet_cork *cork)
/// match-proto:v7.2:net/ipv4/udp.c:static int udp_send_skb(struct sk_buff *skb, struct flowi4 *fl4, struct inet_cork *cork)
#[fentry(function = "udp_send_skb")]
pub fn udp_send_skb_entry(ctx: FEntryContext) -> i32 {
    sock::on_send_skb::<Btf>(ctx.arg(0), ctx.arg(1), false);
    0
}

/// match-proto:v6.1:net/ipv6/udp.c:static int udp_v6_send_skb(struct sk_buff *skb, struct flowi6 *fl6, struct inet_cork *cork)
/// match-proto:v7.2:net/ipv6/udp.c:static int udp_v6_send_skb(struct sk_buff *skb, struct flowi6 *fl6, struct inet_cork *cork)
#[fentry(function = "udp_v6_send_skb")]
pub fn udp_v6_send_skb_entry(ctx: FEntryContext) -> i32 {
    sock::on_send_skb::<Btf>(ctx.arg(0), ctx.arg(1), true);
    0
}

/// match-proto:v4.11:net/ipv4/udp.c:int __udp_enqueue_schedule_skb(struct sock *sk, struct sk_buff *skb)
/// match-proto:v7.2:net/ipv4/udp.c:int __udp_enqueue_schedule_skb(struct sock *sk, struct sk_buff *skb)
/// Exported (IPv6 calls it too), so never inlined away.
#[fentry(function = "__udp_enqueue_schedule_skb")]
pub fn udp_enqueue_entry(ctx: FEntryContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    sock::on_enqueue::<Btf>(sk, ctx.arg(1), cookie_of(sk));
    0
}

/// The return value of the 6-argument udp_recvmsg/udpv6_recvmsg (before 5.19).
#[inline(always)]
fn ret_of_6(ctx: &FExitContext) -> Result<i32, i32> {
    ret(ctx, 6)
}

/// Receive errors. `flags` moved when `noblock` was removed (5.19), so two variants:
/// match-proto:v5.8:net/ipv4/udp.c:int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int noblock, int flags, int *addr_len)
/// match-proto:v6.12:net/ipv4/udp.c:int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len)
/// match-proto:v6.18:net/ipv4/udp.c:int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags)
/// (udpv6_recvmsg has the same history.) The `flags`-at-3 variants run on >= 5.19 only, where
/// the return value comes from bpf_get_func_ret, so its position does not matter; the
/// `flags`-at-4 ones are for the one 6-argument prototype.
macro_rules! recvmsg_exit {
    ($name:ident, $func:literal, $flags:literal, $ret:expr) => {
        #[fexit(function = $func)]
        pub fn $name(ctx: FExitContext) -> i32 {
            let sk = ctx.arg::<u64>(0);
            owner::note_holder::<Btf>(sk, false, || cookie_of(sk));
            let ret: i32 = $ret(&ctx).unwrap_or(0);
            apperr::on_result(sk, ret, ctx.arg($flags), EventKind::RecvError, || {
                cookie_of(sk)
            });
            0
        }
    };
}
recvmsg_exit!(udp_recvmsg_exit_f3, "udp_recvmsg", 3, FExitContext::ret);
recvmsg_exit!(udp_recvmsg_exit_f4, "udp_recvmsg", 4, ret_of_6);
recvmsg_exit!(udpv6_recvmsg_exit_f3, "udpv6_recvmsg", 3, FExitContext::ret);
recvmsg_exit!(udpv6_recvmsg_exit_f4, "udpv6_recvmsg", 4, ret_of_6);

/// Every descriptor a process receives (see owner.rs).
/// match-proto:v5.8:security/security.c:int security_file_receive(struct file *file)
/// match-proto:v7.2:security/security.c:int security_file_receive(struct file *file)
#[fentry(function = "security_file_receive")]
pub fn file_receive_entry(ctx: FEntryContext) -> i32 {
    owner::on_file_received::<Btf>(ctx.arg(0));
    0
}

/// match-proto:v5.8:net/ipv4/datagram.c:int __ip4_datagram_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)
/// (7.x: `struct sockaddr_unsized *uaddr`, same layout.) At exit the route has chosen the
/// source address, so CONNECT names the full local address.
#[fexit(function = "__ip4_datagram_connect")]
pub fn udp_connect4_exit(ctx: FExitContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    if ret(&ctx, 3).unwrap_or(-1) == 0 {
        sock::on_connect(sk, ctx.arg(1), cookie_of(sk));
    }
    0
}

/// match-proto:v5.8:net/ipv6/datagram.c:int __ip6_datagram_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)
#[fexit(function = "__ip6_datagram_connect")]
pub fn udp_connect6_exit(ctx: FExitContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    if ret(&ctx, 3).unwrap_or(-1) == 0 {
        sock::on_connect(sk, ctx.arg(1), cookie_of(sk));
    }
    0
}

/// match-proto:v5.8:net/ipv4/udp.c:int __udp_disconnect(struct sock *sk, int flags)
#[fentry(function = "__udp_disconnect")]
pub fn udp_disconnect_entry(ctx: FEntryContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    sock::on_disconnect(sk, cookie_of(sk));
    0
}

/// match-proto:v5.8:net/ipv4/udp.c:void udp_destroy_sock(struct sock *sk)
#[fentry(function = "udp_destroy_sock")]
pub fn udp_destroy_entry(ctx: FEntryContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    sock::on_destroy(sk, cookie_of(sk));
    0
}

/// match-proto:v5.8:net/ipv6/udp.c:void udpv6_destroy_sock(struct sock *sk)
/// Dual-stack AF_INET6 sockets call only this one.
#[fentry(function = "udpv6_destroy_sock")]
pub fn udpv6_destroy_entry(ctx: FEntryContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    sock::on_destroy(sk, cookie_of(sk));
    0
}

/// Where the inet_sk_error_report tracepoint is missing (< 5.14): see `icmp::on_error_report`.
/// match-proto:v5.8:net/core/sock.c:static void sock_def_error_report(struct sock *sk)
/// match-proto:v7.2:net/core/sock.c:static void sock_def_error_report(struct sock *sk)
#[fentry(function = "sock_def_error_report")]
pub fn sock_error_report_entry(ctx: FEntryContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    crate::icmp::on_error_report::<Btf>(sk, || cookie_of(sk));
    0
}
