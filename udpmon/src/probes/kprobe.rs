//! The kprobe strategy, for kernels that refuse BPF trampolines: the same functions as the
//! fentry strategy through kprobe/kretprobe pairs (arguments stashed per thread at entry).
//! Failed send and receive calls come from the `sock_send_length` / `sock_recv_length`
//! tracepoints where the kernel has them (>= 6.3), as in the tracepoint strategy: one
//! program run per call instead of a kprobe, a kretprobe and a stash update per datagram.
use super::{
    Hook, Strategy, Target, call_result_hooks, has_call_result_tracepoints, program,
    recv_flags_arg, shared_hooks,
};
use crate::btf::KernelBtf;

pub fn hooks(btf: &KernelBtf) -> Vec<Hook> {
    let mut hooks = vec![
        Hook::required(program::UDP_SEND_SKB_KP, Target::KProbe("udp_send_skb")),
        Hook::required(
            program::UDP_V6_SEND_SKB_KP,
            Target::KProbe("udp_v6_send_skb"),
        ),
        Hook::required(
            program::UDP_ENQUEUE_KP,
            Target::KProbe("__udp_enqueue_schedule_skb"),
        ),
        Hook::required(
            program::UDP_CONNECT_KP,
            Target::KProbe("__ip4_datagram_connect"),
        ),
        Hook::required(
            program::UDP_CONNECT_KP,
            Target::KProbe("__ip6_datagram_connect"),
        ),
        Hook::required(
            program::UDP_CONNECT_KRP,
            Target::KProbe("__ip4_datagram_connect"),
        ),
        Hook::required(
            program::UDP_CONNECT_KRP,
            Target::KProbe("__ip6_datagram_connect"),
        ),
        Hook::required(program::UDP_DESTROY_KP, Target::KProbe("udp_destroy_sock")),
        Hook::required(
            program::UDP_DESTROY_KP,
            Target::KProbe("udpv6_destroy_sock"),
        ),
        Hook::optional(
            program::UDP_DISCONNECT_KP,
            Target::KProbe("__udp_disconnect"),
            "connect(AF_UNSPEC) is seen only at the next datagram",
        ),
        Hook::optional(
            program::FILE_RECEIVE_KP,
            Target::KProbe("security_file_receive"),
            super::fentry::PASSED_LATE,
        ),
    ];
    if has_call_result_tracepoints(btf) {
        hooks.extend(call_result_hooks());
    } else {
        let recv = match recv_flags_arg(btf) {
            4 => program::UDP_RECVMSG_KP_F4,
            _ => program::UDP_RECVMSG_KP_F3,
        };
        hooks.extend([
            Hook::required(program::UDP_SENDMSG_KP, Target::KProbe("udp_sendmsg")),
            Hook::required(program::UDP_SENDMSG_KRP, Target::KProbe("udp_sendmsg")),
            Hook::required(program::UDPV6_SENDMSG_KP, Target::KProbe("udpv6_sendmsg")),
            Hook::required(program::UDPV6_SENDMSG_KRP, Target::KProbe("udpv6_sendmsg")),
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
                program::UDP_RECVMSG_KRP,
                Target::KProbe("udp_recvmsg"),
                "failed IPv4 receives are not reported as APP-ERROR",
            ),
            Hook::optional(
                program::UDP_RECVMSG_KRP,
                Target::KProbe("udpv6_recvmsg"),
                "failed IPv6 receives are not reported as APP-ERROR",
            ),
        ]);
    }
    hooks.extend(shared_hooks(btf, Strategy::Kprobe));
    hooks
}
