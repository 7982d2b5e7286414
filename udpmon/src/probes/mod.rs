//! Loading and attaching the kernel programs. Three strategies produce the same events; the
//! first one that loads and attaches wins (`--hooks auto`), or one is forced.
//!
//! Each strategy is a table of hooks (data, in its own file); this module walks a table,
//! loads and attaches every hook, and reports what a missing optional hook costs.
mod fentry;
mod kallsyms;
mod kprobe;
mod stats;
mod tracepoint;

/// The names of the embedded object's programs, maps and globals (see udpmon/build.rs).
mod names {
    include!(concat!(env!("OUT_DIR"), "/ebpf_names.rs"));
}
pub use names::{global, map, program};

use std::{fmt, fs, os::fd::AsFd, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, FEntry, FExit, KProbe, Program, ProgramError, links::FdLink,
    },
};
use log::{info, warn};
use udpmon_common::{IcmpFreeCallers, Offsets, Owner};

/// The eBPF object built by udpmon/build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udpmon"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// fentry/fexit (BPF trampolines): typed arguments, lowest overhead.
    Fentry,
    /// kprobe/kretprobe: where trampolines are refused.
    Kprobe,
    /// tracepoints (tp_btf) and cgroup hooks: locked-down kernels that refuse both.
    Tracepoint,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Fentry, Strategy::Kprobe, Strategy::Tracepoint];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Fentry => "fentry",
            Strategy::Kprobe => "kprobe",
            Strategy::Tracepoint => "tracepoint",
        }
    }

    fn hooks(self, btf: &crate::btf::KernelBtf) -> Vec<Hook> {
        match self {
            Strategy::Fentry => fentry::hooks(btf),
            Strategy::Kprobe => kprobe::hooks(btf),
            Strategy::Tracepoint => tracepoint::hooks(btf),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    CgroupSkb(CgroupSkbAttachType),
    CgroupSock,
    CgroupSockAddr,
    TpBtf(&'static str),
    FEntry(&'static str),
    FExit(&'static str),
    /// kprobe or kretprobe (the program's section says which).
    KProbe(&'static str),
}

/// One program of a strategy.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub program: &'static str,
    pub target: Target,
    /// `None`: the strategy cannot work without it. `Some(loss)`: what the output lacks
    /// when the kernel refuses it.
    pub optional: Option<&'static str>,
    /// Why this kernel cannot have it, known from its BTF: not tried, and reported (or, if
    /// required, failing the strategy) as if the kernel had refused it.
    pub absent: Option<&'static str>,
}

impl Hook {
    pub const fn required(program: &'static str, target: Target) -> Self {
        Self {
            program,
            target,
            optional: None,
            absent: None,
        }
    }
    pub const fn optional(program: &'static str, target: Target, loss: &'static str) -> Self {
        Self {
            program,
            target,
            optional: Some(loss),
            absent: None,
        }
    }
    pub const fn absent(self, why: &'static str) -> Self {
        Self {
            absent: Some(why),
            ..self
        }
    }
}

/// Hooks every strategy uses: BTF tracepoints and a cgroup hook, which need no trampoline.
/// The fentry and kprobe strategies count sent datagrams at udp_send_skb, where only the
/// socket's cached cookie can be read, so the hook that makes the kernel generate it for
/// every new socket is required there, not optional.
fn shared_hooks(btf: &crate::btf::KernelBtf, strategy: Strategy) -> Vec<Hook> {
    // Names the owner of each new socket, for the events that run in softirq (receive,
    // ICMP), and makes the kernel generate the socket's cookie.
    let create = if strategy == Strategy::Tracepoint {
        Hook::optional(
            program::UDP_SOCK_CREATE,
            Target::CgroupSock,
            "sockets that only receive are named after the first process that sends on them",
        )
    } else {
        Hook::required(program::UDP_SOCK_CREATE, Target::CgroupSock)
    };
    const VERDICTS: &str = "ICMP verdicts cannot tell notified from discarded";
    // Before 5.14 (no tracepoint), what the kernel calls at the same points for UDP sockets;
    // the tracepoint strategy has no other source, and does not run without it.
    let report = match strategy {
        _ if btf.has_tracepoint("inet_sk_error_report") => Hook::optional(
            program::ICMP_ERROR_REPORT,
            Target::TpBtf("inet_sk_error_report"),
            VERDICTS,
        ),
        Strategy::Fentry => Hook::optional(
            program::SOCK_ERROR_REPORT_ENTRY,
            Target::FEntry("sock_def_error_report"),
            VERDICTS,
        ),
        Strategy::Kprobe => Hook::optional(
            program::SOCK_ERROR_REPORT_KP,
            Target::KProbe("sock_def_error_report"),
            VERDICTS,
        ),
        Strategy::Tracepoint => Hook::required(
            program::ICMP_ERROR_REPORT,
            Target::TpBtf("inet_sk_error_report"),
        )
        .absent(
            "kernels before 5.14 have no inet_sk_error_report tracepoint, this \
                     strategy's only way to tell whether the application was told of an ICMP \
                     error",
        ),
    };
    const REFUSED: &str = "datagrams to closed local ports (REFUSED) are not reported";
    // kfree_skb gained its drop reason in 5.17, with `enum skb_drop_reason`.
    let drops = if btf
        .enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET")
        .is_ok()
    {
        vec![Hook::optional(
            program::SKB_DROPPED,
            Target::TpBtf("kfree_skb"),
            REFUSED,
        )]
    } else {
        vec![
            Hook::optional(
                program::SKB_DROPPED_NO_REASON,
                Target::TpBtf("kfree_skb"),
                "ICMPv6 errors, and ICMP errors the kernel drops, are not reported",
            ),
            Hook::optional(program::SKB_DROPPED, Target::TpBtf("kfree_skb"), REFUSED)
                .absent("the kfree_skb tracepoint has no drop reason before 5.17"),
        ]
    };
    // consume_skb gained `location` in 6.3.
    let consumed = if btf.tracepoint_args("consume_skb") >= Some(2) {
        program::SKB_CONSUMED
    } else {
        program::SKB_CONSUMED_NO_LOCATION
    };
    let mut hooks = vec![
        create,
        // Process exits, so that a socket whose holder exited while another process keeps it
        // (a daemon's fork, a passed descriptor) names no stale pid, and execs, so that it
        // names the program now running.
        Hook::optional(
            program::TASK_EXIT,
            Target::TpBtf("sched_process_exit"),
            "a socket kept by another process after its owner exits is named after the \
             exited owner until the new holder uses it",
        ),
        Hook::optional(
            program::TASK_EXEC,
            Target::TpBtf("sched_process_exec"),
            "a socket whose owner exec'd another program is named after the old program in \
             events from softirq (received datagrams, ICMP errors)",
        ),
        // ICMP errors are recognised when their skb is freed, after the kernel handled them
        // (consumed, or dropped: kfree_skb below); see udpmon-ebpf/src/icmp.rs.
        Hook::required(consumed, Target::TpBtf("consume_skb")),
        report,
    ];
    hooks.extend(drops);
    hooks
}

/// The `HELPERS` global: helpers this kernel lets tracing programs call (see
/// `udpmon_common::offsets::helpers`), from its BTF.
fn tracing_helpers(btf: &crate::btf::KernelBtf) -> u32 {
    let mut bits = 0;
    if btf
        .enum_value("bpf_func_id", "BPF_FUNC_get_func_ret")
        .is_ok()
    {
        bits |= udpmon_common::offsets::helpers::FUNC_RET;
    }
    // The tracing programs' variant of the cookie helper (5.12).
    if btf.has_func("bpf_get_socket_ptr_cookie") {
        bits |= udpmon_common::offsets::helpers::SOCKET_COOKIE;
    }
    bits
}

/// Failed send and receive calls from the `sock_send_length` / `sock_recv_length`
/// tracepoints (>= 6.3): one program run per call, for every socket on the host.
fn call_result_hooks() -> [Hook; 2] {
    [
        Hook::optional(
            program::UDP_SEND_RESULT,
            Target::TpBtf("sock_send_length"),
            "failed sends are not reported as APP-ERROR (kernel < 6.3)",
        ),
        Hook::optional(
            program::UDP_RECV_RESULT,
            Target::TpBtf("sock_recv_length"),
            "failed receives are not reported as APP-ERROR, and recv(), read() or recvfrom() \
             without an address name no new holder of their socket (kernel < 6.3)",
        ),
    ]
}

fn has_call_result_tracepoints(btf: &crate::btf::KernelBtf) -> bool {
    btf.has_tracepoint("sock_send_length") && btf.has_tracepoint("sock_recv_length")
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, often 8 MiB or less: the flow map
/// alone needs more at the default --max-flows. Later kernels charge the memory cgroup and
/// ignore the limit, so a failure here only matters there, where map creation fails with
/// EPERM: what to say then, if anything.
fn raise_memlock(btf: &crate::btf::KernelBtf) -> Option<String> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return None;
    }
    let err = std::io::Error::last_os_error();
    log::debug!("raising RLIMIT_MEMLOCK: {err}");
    // bpf_ktime_get_coarse_ns came with memory-cgroup accounting (5.11), as libbpf tests.
    if btf
        .enum_value("bpf_func_id", "BPF_FUNC_ktime_get_coarse_ns")
        .is_ok()
    {
        return None;
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) };
    Some(format!(
        "RLIMIT_MEMLOCK is {} KiB and cannot be raised ({err}), and kernels before 5.11 \
         charge BPF maps to it: run udpmon with CAP_SYS_RESOURCE or a higher limit \
         (systemd: LimitMEMLOCK=infinity)",
        cur.rlim_cur / 1024
    ))
}

/// Index of `flags` in udp_recvmsg's prototype: 3 from 5.19 on, 4 before (after `noblock`).
fn recv_flags_arg(btf: &crate::btf::KernelBtf) -> u32 {
    btf.func_params("udp_recvmsg")
        .ok()
        .and_then(|p| p.iter().position(|n| n == "flags"))
        .map_or(3, |i| i as u32)
}

/// The programs that see a socket's close where a run can be skipped (trampolines and
/// kprobes; the tracepoint strategy's cgroup `sock_release` never is): their misses, unlike
/// the others', may have lost a close, which dumps of the open sockets then look for.
const CLOSE_PROGRAMS: [&str; 3] = [
    program::UDP_DESTROY_ENTRY,
    program::UDPV6_DESTROY_ENTRY,
    program::UDP_DESTROY_KP,
];

/// Program runs the kernel skipped or could not serve: each is an event or a count lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Misses {
    /// Runs skipped because the program was already running on that CPU, summed over
    /// udpmon's programs.
    pub recursion: u64,
    /// kprobe hits the kernel could not serve (see `KprobeLink::missed`).
    pub kprobe: u64,
    /// Of both, those of the [`CLOSE_PROGRAMS`].
    pub closes: u64,
}

/// The loaded, attached programs. Dropping it detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    pub strategy: Strategy,
    /// What this kernel could not give, one line per missing optional hook.
    pub degraded: Vec<String>,
    /// The kprobe strategy's links and their programs, held here so that their misses can
    /// be read.
    kprobe_links: Vec<(&'static str, stats::KprobeLink)>,
    /// The misses read last, when the programs were detached.
    final_misses: Option<Misses>,
}

impl Probes {
    pub fn misses(&self) -> Misses {
        if let Some(m) = self.final_misses {
            return m;
        }
        let mut m = Misses::default();
        for (name, prog) in self.ebpf.programs() {
            let Some(n) = prog
                .fd()
                .ok()
                .and_then(|fd| stats::prog_recursion_misses(fd.as_fd()).ok())
            else {
                continue;
            };
            m.recursion += n;
            if CLOSE_PROGRAMS.contains(&name) {
                m.closes += n;
            }
        }
        for (name, link) in &self.kprobe_links {
            let n = link.missed().unwrap_or(0);
            m.kprobe += n;
            if CLOSE_PROGRAMS.contains(name) {
                m.closes += n;
            }
        }
        m
    }

    /// Gives the kernel side the holders of the sockets the startup scan found (`since_ns`:
    /// when the scan began), so that their events name them from the first, and name nobody
    /// once the holder exits while another process keeps the socket. Holders the hooks
    /// learned meanwhile are newer and stay. Returns how many processes were given.
    pub fn remember_owners(
        &mut self,
        sockets: &[crate::decode::KernelEvent],
        since_ns: u64,
    ) -> anyhow::Result<usize> {
        // BPF_NOEXIST (uapi/linux/bpf.h).
        const NO_EXIST: u64 = 1;
        let map = self.ebpf.map_mut(map::OWNERS).context("map OWNERS")?;
        let mut owners: aya::maps::HashMap<_, u64, Owner> = aya::maps::HashMap::try_from(map)?;
        let mut given = std::collections::HashSet::new();
        for ev in sockets.iter().filter(|e| e.who.tgid != 0 && e.cookie != 0) {
            let mut comm = [0u8; 16];
            let name = ev.who.comm.as_bytes();
            comm[..name.len()].copy_from_slice(name);
            let owner = Owner {
                tgid: ev.who.tgid,
                pid: ev.who.pid,
                uid: ev.who.uid,
                netns: ev.who.netns,
                cgroup: ev.who.cgroup,
                comm,
                netns_cookie: 0,
                since_ns,
            };
            match owners.insert(ev.cookie, owner, NO_EXIST) {
                Ok(()) => {
                    given.insert(ev.who.tgid);
                }
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).context("writing map OWNERS"),
            }
        }
        // Their exits and execs matter now (see udpmon-ebpf/src/owner.rs).
        let map = self.ebpf.map_mut(map::HOLDERS).context("map HOLDERS")?;
        let mut holders: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(map)?;
        for &tgid in &given {
            holders.insert(tgid, 1, 0).context("writing map HOLDERS")?;
        }
        Ok(given.len())
    }

    /// Detaches every program, so that nothing more reaches the maps: what the ring buffer
    /// holds then is all there will be. The maps stay readable.
    pub fn detach(&mut self) {
        self.final_misses = Some(self.misses());
        self.kprobe_links.clear();
        for (name, prog) in self.ebpf.programs_mut() {
            // The other strategies' programs were never loaded.
            if prog.fd().is_err() {
                continue;
            }
            let res = match prog {
                Program::CgroupSkb(p) => p.unload(),
                Program::CgroupSock(p) => p.unload(),
                Program::CgroupSockAddr(p) => p.unload(),
                Program::BtfTracePoint(p) => p.unload(),
                Program::FEntry(p) => p.unload(),
                Program::FExit(p) => p.unload(),
                Program::KProbe(p) => p.unload(),
                _ => Ok(()),
            };
            if let Err(e) = res {
                warn!("detaching {name}: {e}");
            }
        }
    }
}

/// Kernel flow-map entries for `max_flows` engine flows: a quarter more, at least 1024.
fn kernel_flow_entries(max_flows: u32) -> u32 {
    max_flows.saturating_add(max_flows / 4).max(1024)
}

pub struct LoadOptions {
    pub max_flows: u32,
    pub self_tgid: u32,
    pub kernel_log: bool,
}

/// Tries `choice` (or every strategy in order for `None`) and returns the first that works.
pub fn load(choice: Option<Strategy>, opts: &LoadOptions) -> anyhow::Result<Probes> {
    // Reading /proc/kallsyms takes tens of milliseconds of kernel time: beside the BTF parse.
    let icmp_free = std::thread::spawn(kallsyms::icmp_free_callers);
    let kbtf = crate::btf::KernelBtf::from_sys_fs()
        .context("reading kernel BTF (/sys/kernel/btf/vmlinux); udpmon needs a kernel built with CONFIG_DEBUG_INFO_BTF")?;
    let memlock = raise_memlock(&kbtf);
    let btf = Btf::from_sys_fs().context("parsing kernel BTF")?;
    let offsets =
        crate::btf::resolve_offsets(&kbtf).context("resolving kernel struct offsets from BTF")?;
    let icmp_free = icmp_free
        .join()
        .unwrap_or_else(|_| Err("reading /proc/kallsyms panicked".into()))
        .unwrap_or_else(|e| {
            info!(
                "which frees can be an ICMP error's is unknown ({e}): every freed skb is examined"
            );
            IcmpFreeCallers::UNKNOWN
        });
    let order: Vec<Strategy> = match choice {
        Some(s) => vec![s],
        None => Strategy::ALL.to_vec(),
    };
    let mut failures = Vec::new();
    for strategy in order {
        match load_strategy(
            strategy,
            &kbtf,
            &btf,
            &offsets,
            &icmp_free,
            opts,
            memlock.as_deref(),
        ) {
            Ok(p) => {
                info!("hook strategy: {strategy}");
                for d in &p.degraded {
                    warn!("{strategy}: {d}");
                }
                return Ok(p);
            }
            Err(e) => {
                if choice.is_none() {
                    info!("hook strategy {strategy} unavailable: {e:#}");
                }
                failures.push(format!("{strategy}: {e:#}"));
            }
        }
    }
    bail!(
        "no hook strategy could be attached:\n  {}",
        failures.join("\n  ")
    )
}

fn load_strategy(
    strategy: Strategy,
    kbtf: &crate::btf::KernelBtf,
    btf: &Btf,
    offsets: &Offsets,
    icmp_free: &IcmpFreeCallers,
    opts: &LoadOptions,
    memlock: Option<&str>,
) -> anyhow::Result<Probes> {
    // aya-log statements are pruned by the verifier when the level global says "off".
    let log_level: u8 = if opts.kernel_log { 5 } else { 0 };
    // The kernel's flow map gets headroom over the engine's `--max-flows` table: an LRU map
    // evicts before it is full (free entries wait in per-CPU lists), and the engine, not the
    // kernel, must be the one that drops a flow, with a CLOSE. The side maps hold one entry per
    // live socket or process holding one at most: `--max-flows` bounds them.
    let flows = kernel_flow_entries(opts.max_flows);
    let side = opts.max_flows.max(1024);
    let helpers = tracing_helpers(kbtf);
    let mut ebpf = EbpfLoader::new()
        .btf(Some(btf))
        .override_global(global::OFFSETS, offsets, true)
        .override_global(global::SELF_TGID, &opts.self_tgid, true)
        .override_global(global::HELPERS, &helpers, true)
        .override_global(global::ICMP_FREE_CALLERS, icmp_free, true)
        .override_global(aya_log::LEVEL, &log_level, false)
        .map_max_entries(map::FLOWS, flows)
        .map_max_entries(map::OWNERS, side)
        .map_max_entries(map::PROCESSES, side)
        .map_max_entries(map::HOLDERS, side)
        .load(EBPF_OBJECT)
        .with_context(|| match memlock {
            Some(why) => format!("loading the eBPF object ({why})"),
            None => "loading the eBPF object".to_string(),
        })?;
    let mut degraded = Vec::new();
    let mut kprobe_links = Vec::new();
    let mut cgroup: Option<fs::File> = None;
    for hook in strategy.hooks(kbtf) {
        let res = match hook.target {
            _ if let Some(why) = hook.absent => Err(anyhow!("{why}")),
            // A clearer reason than the loader's when a kernel renamed or inlined a function.
            Target::FEntry(f) | Target::FExit(f) | Target::KProbe(f) if !kbtf.has_func(f) => {
                Err(anyhow!("kernel function {f} is not in this kernel's BTF"))
            }
            _ => attach(&mut ebpf, btf, &hook, &mut cgroup, &mut kprobe_links),
        };
        match (res, hook.optional) {
            (Ok(()), _) => {}
            (Err(e), None) => {
                return Err(e.context(format!(
                    "required hook {} ({:?})",
                    hook.program, hook.target
                )));
            }
            (Err(e), Some(loss)) => {
                degraded.push(format!(
                    "{} ({:?}) unavailable, {loss}: {e:#}",
                    hook.program, hook.target
                ));
            }
        }
    }
    Ok(Probes {
        ebpf,
        strategy,
        degraded,
        kprobe_links,
        final_misses: None,
    })
}

fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    hook: &Hook,
    cgroup: &mut Option<fs::File>,
    kprobe_links: &mut Vec<(&'static str, stats::KprobeLink)>,
) -> anyhow::Result<()> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    // One program may serve several targets (icmp_rcv and icmpv6_rcv): load it once.
    let loaded = prog.fd().is_ok();
    let verifier = |e: ProgramError| -> anyhow::Error {
        match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                // The verdict is at the end of the log; all of it is at debug level.
                log::debug!("{} verifier log:\n{verifier_log}", hook.program);
                let log = verifier_log.to_string();
                let log = log.trim_matches(|c: char| c.is_whitespace() || c == '\0');
                if log.is_empty() && io_error.raw_os_error() == Some(libc::EPERM) {
                    // Refused before the verifier ran: a policy (lockdown) forbids this
                    // program type, as locked-down kernels do for trampolines.
                    return anyhow!(
                        "the kernel refuses this program type (EPERM before verification)"
                    );
                }
                if log.is_empty() {
                    return anyhow!("the kernel refused to load it ({io_error}), saying nothing");
                }
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(6)..].join("\n    ");
                // Worded for the system tests too: a program the kernel's verifier refuses
                // is udpmon's bug, and they fail on it even where the hook is optional.
                anyhow!("refused by the kernel's verifier ({io_error}); its log ends:\n    {tail}")
            }
            e => e.into(),
        }
    };
    match hook.target {
        Target::CgroupSkb(kind) => {
            let p: &mut CgroupSkb = prog.try_into()?;
            if !loaded {
                p.load().map_err(verifier)?;
            }
            p.attach(cgroup_root(cgroup)?.as_fd(), kind, CgroupAttachMode::Single)?;
        }
        Target::CgroupSock => {
            let p: &mut CgroupSock = prog.try_into()?;
            if !loaded {
                p.load().map_err(verifier)?;
            }
            p.attach(cgroup_root(cgroup)?.as_fd(), CgroupAttachMode::Single)?;
        }
        Target::CgroupSockAddr => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            if !loaded {
                p.load().map_err(verifier)?;
            }
            p.attach(cgroup_root(cgroup)?.as_fd(), CgroupAttachMode::Single)?;
        }
        Target::TpBtf(tp) => {
            let p: &mut BtfTracePoint = prog.try_into()?;
            if !loaded {
                p.load(tp, btf).map_err(verifier)?;
            }
            p.attach()?;
        }
        Target::FEntry(f) => {
            let p: &mut FEntry = prog.try_into()?;
            if !loaded {
                p.load(f, btf).map_err(verifier)?;
            }
            p.attach()?;
        }
        Target::FExit(f) => {
            let p: &mut FExit = prog.try_into()?;
            if !loaded {
                p.load(f, btf).map_err(verifier)?;
            }
            p.attach()?;
        }
        Target::KProbe(f) => {
            let p: &mut KProbe = prog.try_into()?;
            if !loaded {
                p.load().map_err(verifier)?;
            }
            let id = p.attach(f, 0)?;
            // Where the kernel makes kprobes bpf_links (>= 5.15), udpmon holds the link itself
            // to read its miss count; before that, aya keeps its perf-event attachment.
            if aya::features().bpf_perf_link() {
                let link = FdLink::try_from(p.take_link(id)?)?;
                kprobe_links.push((hook.program, stats::KprobeLink::open(link.info()?.id())?));
            }
        }
    }
    Ok(())
}

/// The cgroup-v2 root: cgroup hooks attached there see every socket on the host. Attached
/// as bpf_links (every kernel >= 5.7 does), which coexist with other programs on the same
/// cgroup; the link API rejects the legacy ALLOW_MULTI flag, hence `Single` (flags 0).
fn cgroup_root(cache: &mut Option<fs::File>) -> anyhow::Result<&fs::File> {
    if cache.is_none() {
        let path = cgroup2_mount()?;
        let f = fs::File::open(&path)
            .with_context(|| format!("opening the cgroup-v2 root {}", path.display()))?;
        *cache = Some(f);
    }
    Ok(cache.as_ref().expect("set above"))
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        // The shortest mount point is the root of the hierarchy when it is mounted twice.
        .min_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| {
            anyhow!("no cgroup2 filesystem is mounted; the tracepoint strategy needs one")
        })
}
