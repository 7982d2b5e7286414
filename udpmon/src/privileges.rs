//! udpmon needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN (loading tracing programs,
//! attaching cgroup hooks). Checked first, so that a missing privilege is one clear line and
//! nothing gets attached. Three more let it see everything ([`CAPABILITIES`]); without them it
//! runs and says once what it will not see.

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capability set with which nothing degrades, as capabilities(7) names them. Kernels
/// before 5.11 also need CAP_SYS_RESOURCE, to raise RLIMIT_MEMLOCK for the maps.
pub const CAPABILITIES: [&str; 6] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_NET_ADMIN",
    "CAP_SYS_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_DAC_READ_SEARCH",
];

/// What each optional capability gives, for the one line that says what is missing.
const SEES: [(u32, &str, &str); 3] = [
    (
        CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "other network namespaces (their sockets that predate udpmon, and on the tracepoint strategy the netns of their events)",
    ),
    (
        CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE",
        "the processes of other users (owners of sockets that predate udpmon, namespaces only they hold)",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "CAP_DAC_READ_SEARCH",
        "the open files of other users' processes (owners of sockets that predate udpmon)",
    ),
];

/// Parses the effective capability set from /proc/self/status text.
fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// What is missing, as a sentence, or None when udpmon may proceed.
pub fn missing(status: &str) -> Option<String> {
    let caps = effective_caps(status).unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    // CAP_SYS_ADMIN covers BPF and perf on every kernel (and is all there was before 5.8).
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        return None;
    }
    let lacking: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, n)| n)
    .collect();
    if lacking.is_empty() {
        return None;
    }
    Some(format!(
        "insufficient privileges: run as root, or grant CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN (missing: {})",
        lacking.join(", ")
    ))
}

/// One line naming what udpmon will not see with these capabilities, or None with all of
/// them.
pub fn blind_spots(status: &str) -> Option<String> {
    let caps = effective_caps(status).unwrap_or(0);
    let lacking: Vec<_> = SEES
        .iter()
        .filter(|(c, _, _)| caps & (1u64 << c) == 0)
        .collect();
    if lacking.is_empty() {
        return None;
    }
    let names: Vec<&str> = lacking.iter().map(|(_, n, _)| *n).collect();
    let what: Vec<&str> = lacking.iter().map(|(_, _, w)| *w).collect();
    Some(format!(
        "without {} udpmon does not see {}",
        names.join(", "),
        what.join("; ")
    ))
}

/// [`blind_spots`] of the running process.
pub fn own_blind_spots() -> Option<String> {
    blind_spots(&std::fs::read_to_string("/proc/self/status").ok()?)
}

pub fn check() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    missing(&status).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert_eq!(missing("Name:\tx\nCapEff:\t000001ffffffffff\n"), None);
    }

    #[test]
    fn the_three_capabilities_suffice() {
        let caps = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert_eq!(missing(&format!("CapEff:\t{caps:016x}\n")), None);
    }

    #[test]
    fn the_full_set_sees_everything_and_the_minimum_says_what_it_misses() {
        let bit = |name: &str| match name {
            "CAP_BPF" => CAP_BPF,
            "CAP_PERFMON" => CAP_PERFMON,
            "CAP_NET_ADMIN" => CAP_NET_ADMIN,
            "CAP_SYS_ADMIN" => CAP_SYS_ADMIN,
            "CAP_SYS_PTRACE" => CAP_SYS_PTRACE,
            "CAP_DAC_READ_SEARCH" => CAP_DAC_READ_SEARCH,
            n => panic!("unknown capability {n}"),
        };
        let full: u64 = CAPABILITIES.iter().map(|n| 1u64 << bit(n)).sum();
        let status = format!("CapEff:\t{full:016x}\n");
        assert_eq!((missing(&status), blind_spots(&status)), (None, None));
        let minimum = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        let line = blind_spots(&format!("CapEff:\t{minimum:016x}\n")).unwrap();
        assert!(
            line.starts_with("without CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH udpmon does not see other network namespaces"),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1);
        assert_eq!(blind_spots("CapEff:\t000001ffffffffff\n"), None);
    }

    #[test]
    fn an_unprivileged_user_is_told_what_is_missing() {
        let m = missing("CapEff:\t0000000000000000\n").unwrap();
        assert!(m.contains("run as root"), "{m}");
        assert!(
            m.contains("missing: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
            "{m}"
        );
        let only_bpf = 1u64 << CAP_BPF;
        let m = missing(&format!("CapEff:\t{only_bpf:016x}\n")).unwrap();
        assert!(m.contains("missing: CAP_PERFMON, CAP_NET_ADMIN"), "{m}");
    }
}
