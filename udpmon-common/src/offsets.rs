//! Kernel struct field offsets, resolved by userspace from the running kernel's BTF and handed
//! to the programs as a read-only global. Rust eBPF has no CO-RE, so nothing here may be a
//! constant for one kernel.

/// Byte offsets of the fields the programs read. `u32::MAX` would mean "absent"; userspace
/// refuses to load a strategy whose required offsets are missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    // struct sock / struct sock_common
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `sk->__sk_common.skc_net.net`
    pub skc_net: u32,
    pub sk_protocol: u32,
    pub sk_type: u32,
    pub sk_err: u32,
    /// `sk->sk_error_queue.qlen`
    pub sk_error_queue_qlen: u32,
    /// `sk->sk_uid.val`
    pub sk_uid: u32,
    /// `struct net.ns.inum`
    pub net_ns_inum: u32,
    // struct sk_buff
    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_len: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    pub skb_dev: u32,
    /// `struct net_device.nd_net.net`
    pub dev_nd_net: u32,
    /// `enum skb_drop_reason` value of `SKB_DROP_REASON_NO_SOCKET`.
    pub drop_reason_no_socket: u32,
    /// `sk->__sk_common.skc_cookie` (kprobes cannot call the cookie helper).
    pub skc_cookie: u32,
    /// `struct sk_buff.sk`
    pub skb_sk: u32,
    /// `struct sk_buff._skb_refdst`: the route, still attached to an ICMP skb when it is
    /// freed, dropped from a socket's received skbs before theirs are.
    pub skb_refdst: u32,
    // struct flowi4 / flowi6: the addresses udp_send_skb/udp_v6_send_skb send with (the
    // route's source address, even for a socket bound to the wildcard). `ports` is
    // `uli.ports`: dport, then sport.
    pub fl4_saddr: u32,
    pub fl4_daddr: u32,
    pub fl4_ports: u32,
    pub fl6_saddr: u32,
    pub fl6_daddr: u32,
    pub fl6_ports: u32,
    /// `struct task_struct.signal` and `struct signal_struct.live.counter`: at a thread's
    /// exit, whether it was the last of its process (see holder.rs).
    pub task_signal: u32,
    pub signal_live: u32,
    /// `struct file.f_inode`, `struct inode.i_mode`, `struct file.private_data` (a socket's
    /// `struct socket`) and `struct socket.sk`: a descriptor received by a process (see
    /// owner.rs).
    pub file_inode: u32,
    pub inode_mode: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// The current task's identity as the helpers give it (tgid, pid, `flags` for
    /// `PF_KTHREAD`, `comm`, `cred->uid.val`, `cgroups->dfl_cgrp->kn->id`), read where those
    /// helpers are not offered: cgroup_skb egress naming a datagram's sender (see owner.rs).
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_flags: u32,
    pub task_comm: u32,
    pub task_cred: u32,
    pub cred_uid: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
}

const _: () = assert!(core::mem::size_of::<Offsets>() == 49 * 4);

impl Offsets {
    pub const fn zeroed() -> Self {
        Self {
            skc_daddr: 0,
            skc_rcv_saddr: 0,
            skc_dport: 0,
            skc_num: 0,
            skc_family: 0,
            skc_state: 0,
            skc_v6_daddr: 0,
            skc_v6_rcv_saddr: 0,
            skc_net: 0,
            sk_protocol: 0,
            sk_type: 0,
            sk_err: 0,
            sk_error_queue_qlen: 0,
            sk_uid: 0,
            net_ns_inum: 0,
            skb_head: 0,
            skb_data: 0,
            skb_len: 0,
            skb_network_header: 0,
            skb_transport_header: 0,
            skb_protocol: 0,
            skb_dev: 0,
            dev_nd_net: 0,
            drop_reason_no_socket: 0,
            skc_cookie: 0,
            skb_sk: 0,
            skb_refdst: 0,
            fl4_saddr: 0,
            fl4_daddr: 0,
            fl4_ports: 0,
            fl6_saddr: 0,
            fl6_daddr: 0,
            fl6_ports: 0,
            task_signal: 0,
            signal_live: 0,
            file_inode: 0,
            inode_mode: 0,
            file_private_data: 0,
            socket_sk: 0,
            task_tgid: 0,
            task_pid: 0,
            task_flags: 0,
            task_comm: 0,
            task_cred: 0,
            cred_uid: 0,
            task_cgroups: 0,
            css_set_dfl_cgrp: 0,
            cgroup_kn: 0,
            kernfs_node_id: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C) of u32 only, no padding.
unsafe impl aya::Pod for Offsets {}

/// Bits of the read-only global `HELPERS`: helpers the running kernel lets tracing programs
/// (fentry, fexit, tp_btf) call, found by userspace in its BTF. A program tests the bit before
/// the call; the verifier knows the frozen global's value and never visits the branch not
/// taken, so a helper the kernel lacks does not fail the load.
pub mod helpers {
    /// `bpf_get_func_ret` (5.17): an fexit program's return value whatever the arity.
    pub const FUNC_RET: u32 = 1 << 0;
    /// `bpf_get_socket_cookie` on a BTF-typed `struct sock *` (5.12).
    pub const SOCKET_COOKIE: u32 = 1 << 1;
}

/// The read-only global `ICMP_FREE_CALLERS`: which callers of the skb-free tracepoints
/// (their `location` argument, the freeing call's return address) can be freeing an ICMP
/// error, so that a program passes over every other skb without touching it (a cache-cold
/// skb otherwise costs the first load). Set from /proc/kallsyms: the kernel's own text
/// `[start, end)`, inside which only `icmp_rcv`, `icmpv6_rcv` and the return trampolines
/// that stand in for a caller while another tool traces the free on its way out (kretprobe,
/// rethook, function-graph) count; a caller outside it (a module, a BPF trampoline) always
/// counts. With the text unknown every caller counts and every skb is looked at.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpFreeCallers {
    pub text: [u64; 2],
    /// `[start, end)` each; `[0, 0]` for a symbol this kernel lacks.
    pub ranges: [[u64; 2]; IcmpFreeCallers::RANGES],
}

impl IcmpFreeCallers {
    pub const RANGES: usize = 5;

    /// Every caller counts.
    pub const UNKNOWN: Self = Self {
        text: [0, 0],
        ranges: [[0, 0]; Self::RANGES],
    };

    #[inline(always)]
    pub fn may_free_icmp(&self, location: u64) -> bool {
        if location < self.text[0] || location >= self.text[1] {
            return true;
        }
        let mut i = 0;
        while i < Self::RANGES {
            if location >= self.ranges[i][0] && location < self.ranges[i][1] {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C) of u64 only, no padding.
unsafe impl aya::Pod for IcmpFreeCallers {}
