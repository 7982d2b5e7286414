//! Where the ICMP receive handlers lie in kernel text (`IcmpRcvText`), from /proc/kallsyms.
//! Three whitespace-separated fields a line: no crate needed to read them.
use std::io::{BufRead, BufReader, Read};

use udpmon_common::IcmpRcvText;

/// The ranges of `icmp_rcv` and `icmpv6_rcv` in the running kernel, or
/// [`IcmpRcvText::UNKNOWN`] with the reason when they cannot be known (addresses hidden by
/// `kptr_restrict` without CAP_SYSLOG, a symbol missing): the programs then look at every
/// freed skb, as slower but correct.
pub fn icmp_rcv_text() -> Result<IcmpRcvText, String> {
    let f = std::fs::File::open("/proc/kallsyms").map_err(|e| format!("/proc/kallsyms: {e}"))?;
    parse(f)
}

/// A function's range ends where the next symbol above its start begins. /proc/kallsyms
/// lists the kernel's own symbols in address order but a module's in its own, so every
/// address is compared rather than taking the next line.
fn parse(r: impl Read) -> Result<IcmpRcvText, String> {
    const NAMES: [&str; 2] = ["icmp_rcv", "icmpv6_rcv"];
    let mut addrs = Vec::with_capacity(1 << 18);
    let mut start = [None; 2];
    let mut line = String::new();
    let mut r = BufReader::with_capacity(1 << 16, r);
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("/proc/kallsyms: {e}")),
        }
        let mut f = line.split_ascii_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        addrs.push(addr);
        // Module symbols carry a fourth field, `[module]`; ipv6 may be one.
        if let Some(i) = NAMES.iter().position(|n| *n == name) {
            start[i].get_or_insert(addr);
        }
    }
    let range = |i: usize| -> Result<[u64; 2], String> {
        let s = start[i].ok_or_else(|| format!("{} is not in /proc/kallsyms", NAMES[i]))?;
        if s == 0 {
            return Err("/proc/kallsyms hides addresses (kptr_restrict)".into());
        }
        let end = addrs.iter().copied().filter(|&a| a > s).min();
        end.map(|e| [s, e])
            .ok_or_else(|| format!("no symbol follows {} in /proc/kallsyms", NAMES[i]))
    };
    Ok(IcmpRcvText {
        v4: range(0)?,
        v6: range(1)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_end_at_the_next_symbol_above() {
        let text = "\
ffffffff820a6540 T __pfx_icmp_rcv
ffffffff820a6550 T icmp_rcv
ffffffff820a68f0 T __pfx_icmp_err
ffffffffc0100000 t icmpv6_rcv\t[ipv6]
ffffffffc0100400 t ip6_input\t[ipv6]
ffffffffc0100200 t icmpv6_err\t[ipv6]
";
        let t = parse(text.as_bytes()).unwrap();
        assert_eq!(t.v4, [0xffffffff820a6550, 0xffffffff820a68f0]);
        assert_eq!(t.v6, [0xffffffffc0100000, 0xffffffffc0100200]);
        assert!(t.contains(0xffffffff820a6600) && t.contains(0xffffffffc01001ff));
        assert!(!t.contains(0xffffffff820a68f0) && !t.contains(0xffffffff820a654f));
    }

    #[test]
    fn hidden_or_missing_addresses_are_unknown() {
        let hidden = "0000000000000000 T icmp_rcv\n0000000000000000 t icmpv6_rcv\n";
        assert!(
            parse(hidden.as_bytes())
                .unwrap_err()
                .contains("kptr_restrict")
        );
        let missing = "ffffffff820a6550 T icmp_rcv\nffffffff820a68f0 T icmp_err\n";
        assert!(
            parse(missing.as_bytes())
                .unwrap_err()
                .contains("icmpv6_rcv")
        );
        assert!(IcmpRcvText::UNKNOWN.contains(0) && IcmpRcvText::UNKNOWN.contains(u64::MAX - 1));
    }

    /// Root sees the addresses whatever kptr_restrict says (below 2).
    #[test]
    fn this_kernel() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("\n*** SKIPPED: not root, /proc/kallsyms may hide addresses ***\n");
            return;
        }
        let t = icmp_rcv_text().unwrap();
        assert!(t.v4[0] < t.v4[1] && t.v6[0] < t.v6[1], "{t:x?}");
    }
}
