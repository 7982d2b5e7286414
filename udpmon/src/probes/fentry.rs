//! The trampoline strategy: fentry/fexit on the UDP functions themselves (typed arguments,
//! the return value at exit), plus the two BTF tracepoints every strategy shares.
use super::{Hook, Target, recv_flags_arg, shared_hooks};
use crate::btf::KernelBtf;

pub fn hooks(btf: &KernelBtf) -> Vec<Hook> {
    // udp_recvmsg lost `noblock` in 5.19, which moved `flags`: pick the matching variant.
    let (recv4, recv6) = match recv_flags_arg(btf) {
        4 => ("udp_recvmsg_exit_f4", "udpv6_recvmsg_exit_f4"),
        _ => ("udp_recvmsg_exit_f3", "udpv6_recvmsg_exit_f3"),
    };
    let mut hooks = vec![
        Hook::required("udp_sendmsg_exit", Target::FExit("udp_sendmsg")),
        Hook::required("udpv6_sendmsg_exit", Target::FExit("udpv6_sendmsg")),
        Hook::required("udp_send_skb_entry", Target::FEntry("udp_send_skb")),
        Hook::required("udp_v6_send_skb_entry", Target::FEntry("udp_v6_send_skb")),
        Hook::required(
            "udp_enqueue_entry",
            Target::FEntry("__udp_enqueue_schedule_skb"),
        ),
        Hook::required("icmp_rcv_entry", Target::FEntry("icmp_rcv")),
        Hook::required("icmp_rcv_exit", Target::FExit("icmp_rcv")),
        Hook::required("icmpv6_rcv_entry", Target::FEntry("icmpv6_rcv")),
        Hook::required("icmpv6_rcv_exit", Target::FExit("icmpv6_rcv")),
        Hook::required("udp_connect4_exit", Target::FExit("__ip4_datagram_connect")),
        Hook::required("udp_connect6_exit", Target::FExit("__ip6_datagram_connect")),
        Hook::required("udp_destroy_entry", Target::FEntry("udp_destroy_sock")),
        Hook::required("udpv6_destroy_entry", Target::FEntry("udpv6_destroy_sock")),
        Hook::optional(
            "udp_disconnect_entry",
            Target::FEntry("__udp_disconnect"),
            "connect(AF_UNSPEC) is seen only at the next datagram",
        ),
        Hook::optional(
            recv4,
            Target::FExit("udp_recvmsg"),
            "failed IPv4 receives are not reported as APP-ERROR",
        ),
        Hook::optional(
            recv6,
            Target::FExit("udpv6_recvmsg"),
            "failed IPv6 receives are not reported as APP-ERROR",
        ),
    ];
    hooks.extend(shared_hooks(true));
    hooks
}
