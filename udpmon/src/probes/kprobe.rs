//! The kprobe strategy, for kernels that refuse BPF trampolines: the same functions as the
//! fentry strategy through kprobe/kretprobe pairs (arguments stashed per thread at entry).
use super::{Hook, Target, recv_flags_arg, shared_hooks};
use crate::btf::KernelBtf;

pub fn hooks(btf: &KernelBtf) -> Vec<Hook> {
    let recv = match recv_flags_arg(btf) {
        4 => "udp_recvmsg_kp_f4",
        _ => "udp_recvmsg_kp_f3",
    };
    let mut hooks = vec![
        Hook::required("udp_sendmsg_kp", Target::KProbe("udp_sendmsg")),
        Hook::required("udp_sendmsg_krp", Target::KProbe("udp_sendmsg")),
        Hook::required("udpv6_sendmsg_kp", Target::KProbe("udpv6_sendmsg")),
        Hook::required("udpv6_sendmsg_krp", Target::KProbe("udpv6_sendmsg")),
        Hook::required("udp_send_skb_kp", Target::KProbe("udp_send_skb")),
        Hook::required("udp_v6_send_skb_kp", Target::KProbe("udp_v6_send_skb")),
        Hook::required(
            "udp_enqueue_kp",
            Target::KProbe("__udp_enqueue_schedule_skb"),
        ),
        Hook::required("icmp_rcv_kp", Target::KProbe("icmp_rcv")),
        Hook::required("icmp_rcv_kp", Target::KProbe("icmpv6_rcv")),
        Hook::required("icmp_rcv_krp", Target::KProbe("icmp_rcv")),
        Hook::required("icmp_rcv_krp", Target::KProbe("icmpv6_rcv")),
        Hook::required("udp_connect_kp", Target::KProbe("__ip4_datagram_connect")),
        Hook::required("udp_connect_kp", Target::KProbe("__ip6_datagram_connect")),
        Hook::required("udp_connect_krp", Target::KProbe("__ip4_datagram_connect")),
        Hook::required("udp_connect_krp", Target::KProbe("__ip6_datagram_connect")),
        Hook::required("udp_destroy_kp", Target::KProbe("udp_destroy_sock")),
        Hook::required("udp_destroy_kp", Target::KProbe("udpv6_destroy_sock")),
        Hook::optional(
            "udp_disconnect_kp",
            Target::KProbe("__udp_disconnect"),
            "connect(AF_UNSPEC) is seen only at the next datagram",
        ),
        Hook::optional(
            recv,
            Target::KProbe("udp_recvmsg"),
            "failed IPv4 receives are not reported as APP-ERROR",
        ),
        Hook::optional(
            recv,
            Target::KProbe("udpv6_recvmsg"),
            "failed IPv6 receives are not reported as APP-ERROR",
        ),
        Hook::optional(
            "udp_recvmsg_krp",
            Target::KProbe("udp_recvmsg"),
            "failed IPv4 receives are not reported as APP-ERROR",
        ),
        Hook::optional(
            "udp_recvmsg_krp",
            Target::KProbe("udpv6_recvmsg"),
            "failed IPv6 receives are not reported as APP-ERROR",
        ),
    ];
    hooks.extend(shared_hooks(true));
    hooks
}
