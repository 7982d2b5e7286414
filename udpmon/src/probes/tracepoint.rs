//! The strategy for kernels that refuse trampolines and kprobes (this project's own hosts):
//! cgroup hooks on the cgroup-v2 root for datagrams and socket lifecycle, BTF tracepoints for
//! ICMP errors, their verdict, drops and application errors.
use aya::programs::CgroupSkbAttachType;

use super::{
    Hook, Strategy, Target, call_result_hooks, has_call_result_tracepoints, program, shared_hooks,
};
use crate::btf::KernelBtf;

pub fn hooks(btf: &KernelBtf) -> Vec<Hook> {
    // Without sock_send_length/sock_recv_length (< 6.3), a socket's new holder shows in egress
    // and in the recvmsg hooks (owner.rs in the eBPF crate).
    let calls_hooked = has_call_result_tracepoints(btf);
    let egress = if calls_hooked {
        program::UDP_EGRESS
    } else {
        program::UDP_EGRESS_USER
    };
    let mut hooks = vec![
        Hook::required(egress, Target::CgroupSkb(CgroupSkbAttachType::Egress)),
        Hook::required(
            program::UDP_INGRESS,
            Target::CgroupSkb(CgroupSkbAttachType::Ingress),
        ),
        Hook::required(program::UDP_SOCK_RELEASE, Target::CgroupSock),
        Hook::required(program::UDP_CONNECT4, Target::CgroupSockAddr),
        Hook::required(program::UDP_CONNECT6, Target::CgroupSockAddr),
    ];
    if !calls_hooked {
        for recvmsg in [program::UDP_RECVMSG4_USER, program::UDP_RECVMSG6_USER] {
            hooks.push(Hook::optional(
                recvmsg,
                Target::CgroupSockAddr,
                "a socket's new holder that only receives is named after the previous one",
            ));
        }
    }
    hooks.extend(call_result_hooks());
    hooks.extend(shared_hooks(btf, Strategy::Tracepoint));
    hooks
}
