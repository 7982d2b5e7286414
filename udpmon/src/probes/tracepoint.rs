//! The strategy for kernels that refuse trampolines and kprobes (this project's own hosts):
//! cgroup hooks on the cgroup-v2 root for datagrams and socket lifecycle, BTF tracepoints for
//! ICMP errors, their verdict, drops and application errors.
use aya::programs::CgroupSkbAttachType;

use super::{Hook, Target, shared_hooks};

pub fn hooks() -> Vec<Hook> {
    let mut hooks = vec![
        Hook::required("udp_egress", Target::CgroupSkb(CgroupSkbAttachType::Egress)),
        Hook::required(
            "udp_ingress",
            Target::CgroupSkb(CgroupSkbAttachType::Ingress),
        ),
        Hook::required("udp_sock_release", Target::CgroupSock),
        Hook::required("udp_connect4", Target::CgroupSockAddr),
        Hook::required("udp_connect6", Target::CgroupSockAddr),
        Hook::required("icmp_receive", Target::TpBtf("netif_receive_skb")),
        // The end of an ICMP's handling is its skb being freed: consumed, or dropped (the
        // kfree_skb hook shared with the other strategies).
        Hook::required("icmp_consumed", Target::TpBtf("consume_skb")),
        Hook::optional(
            "udp_send_result",
            Target::TpBtf("sock_send_length"),
            "failed sends are not reported as APP-ERROR (kernel < 6.3)",
        ),
        Hook::optional(
            "udp_recv_result",
            Target::TpBtf("sock_recv_length"),
            "failed receives are not reported as APP-ERROR (kernel < 6.3)",
        ),
    ];
    hooks.extend(shared_hooks(false));
    hooks
}
