//! The trampoline strategy: fentry/fexit on the UDP functions themselves (typed arguments,
//! the return value at exit), plus the two BTF tracepoints every strategy shares.
use super::{Hook, Strategy, Target, program, recv_flags_arg, shared_hooks};
use crate::btf::KernelBtf;

/// What a kernel without a hook on received descriptors costs.
pub const PASSED_LATE: &str = "a socket passed to another process (SCM_RIGHTS) is named after \
                                its sender until the receiver sends or receives on it";

pub fn hooks(btf: &KernelBtf) -> Vec<Hook> {
    // udp_recvmsg lost `noblock` in 5.19, which moved `flags`: pick the matching variant.
    let (recv4, recv6) = match recv_flags_arg(btf) {
        4 => (program::UDP_RECVMSG_EXIT_F4, program::UDPV6_RECVMSG_EXIT_F4),
        _ => (program::UDP_RECVMSG_EXIT_F3, program::UDPV6_RECVMSG_EXIT_F3),
    };
    let mut hooks = vec![
        Hook::required(program::UDP_SENDMSG_EXIT, Target::FExit("udp_sendmsg")),
        Hook::required(program::UDPV6_SENDMSG_EXIT, Target::FExit("udpv6_sendmsg")),
        Hook::required(program::UDP_SEND_SKB_ENTRY, Target::FEntry("udp_send_skb")),
        Hook::required(
            program::UDP_V6_SEND_SKB_ENTRY,
            Target::FEntry("udp_v6_send_skb"),
        ),
        Hook::required(
            program::UDP_ENQUEUE_ENTRY,
            Target::FEntry("__udp_enqueue_schedule_skb"),
        ),
        Hook::required(
            program::UDP_CONNECT4_EXIT,
            Target::FExit("__ip4_datagram_connect"),
        ),
        Hook::required(
            program::UDP_CONNECT6_EXIT,
            Target::FExit("__ip6_datagram_connect"),
        ),
        Hook::required(
            program::UDP_DESTROY_ENTRY,
            Target::FEntry("udp_destroy_sock"),
        ),
        Hook::required(
            program::UDPV6_DESTROY_ENTRY,
            Target::FEntry("udpv6_destroy_sock"),
        ),
        Hook::optional(
            program::UDP_DISCONNECT_ENTRY,
            Target::FEntry("__udp_disconnect"),
            "connect(AF_UNSPEC) is seen only at the next datagram",
        ),
        Hook::optional(
            program::FILE_RECEIVE_ENTRY,
            Target::FEntry("security_file_receive"),
            PASSED_LATE,
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
    hooks.extend(shared_hooks(btf, Strategy::Fentry));
    hooks
}
