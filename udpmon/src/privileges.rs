//! udpmon needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN (loading tracing programs,
//! attaching cgroup hooks). Checked first, so that a missing privilege is one clear line and
//! nothing gets attached.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

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
