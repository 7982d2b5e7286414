//! Which callers of the skb-free tracepoints can be freeing an ICMP error
//! (`IcmpFreeCallers`), from /proc/kallsyms. Three whitespace-separated fields a line (a
//! module's symbols a fourth): no crate needed to read them.
use std::io::{BufRead, BufReader, Read};

use udpmon_common::IcmpFreeCallers;

/// The callers whose ranges are looked up, in `IcmpFreeCallers::ranges` order: the two ICMP
/// handlers, then the return trampolines a tracer puts in place of the caller's address
/// while it watches a free return (kretprobes before rethook took them over in 5.19 on x86,
/// rethook, the function-graph tracer). Any may be missing but the handlers.
const CALLERS: [&[&str]; IcmpFreeCallers::RANGES] = [
    &["icmp_rcv"],
    &["icmpv6_rcv"],
    &["__kretprobe_trampoline", "kretprobe_trampoline"],
    &["arch_rethook_trampoline"],
    &["return_to_handler"],
];

/// Functions whose compiler-made parts (`name.part.0`, `.cold`, `.isra.0`) would move the
/// free or the tracepoint call to an address the ranges do not cover: then every caller
/// counts. GCC split kfree_skb_reason that way until 6.1 (`__fix_address`).
const UNSPLIT: [&str; 6] = [
    "icmp_rcv",
    "icmpv6_rcv",
    "consume_skb",
    "kfree_skb",
    "kfree_skb_reason",
    "sk_skb_reason_drop",
];

/// This kernel's callers, or the reason they cannot be trusted (addresses hidden by
/// `kptr_restrict` without CAP_SYSLOG, a handler missing, a split function): the programs
/// then look at every freed skb, as slower but correct.
pub fn icmp_free_callers() -> Result<IcmpFreeCallers, String> {
    let f = std::fs::File::open("/proc/kallsyms").map_err(|e| format!("/proc/kallsyms: {e}"))?;
    parse(f)
}

/// A function's range ends where the next symbol above its start begins. /proc/kallsyms
/// lists the kernel's own symbols in address order but a module's in its own, so every
/// address is compared rather than taking the next line.
///
/// Read as bytes: the file has a line per kernel symbol (hundreds of thousands), and this
/// runs at every start, beside the BTF parse.
fn parse(r: impl Read) -> Result<IcmpFreeCallers, String> {
    let mut addrs = Vec::with_capacity(1 << 18);
    let mut start = [None; IcmpFreeCallers::RANGES];
    let (mut stext, mut etext) = (None, None);
    let mut line = Vec::with_capacity(256);
    let mut r = BufReader::with_capacity(1 << 16, r);
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("/proc/kallsyms: {e}")),
        }
        // `<address> <kind> <name>[\t[<module>]]`
        let mut f = line
            .split(u8::is_ascii_whitespace)
            .filter(|f| !f.is_empty());
        let (Some(addr), Some(_kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some(addr) = str::from_utf8(addr)
            .ok()
            .and_then(|a| u64::from_str_radix(a, 16).ok())
        else {
            continue;
        };
        addrs.push(addr);
        if let Some(i) = CALLERS
            .iter()
            .position(|names| names.iter().any(|n| n.as_bytes() == name))
        {
            start[i].get_or_insert(addr);
        }
        match name {
            b"_stext" => stext = Some(addr),
            b"_etext" => etext = Some(addr),
            _ => {}
        }
        if let Some(dot) = name.iter().position(|&b| b == b'.')
            && let Some(base) = UNSPLIT.iter().find(|u| u.as_bytes() == &name[..dot])
        {
            let name = String::from_utf8_lossy(name);
            return Err(format!("{name} in /proc/kallsyms: a split {base}"));
        }
    }
    let (Some(stext), Some(etext)) = (stext, etext) else {
        return Err("no _stext/_etext in /proc/kallsyms".into());
    };
    if stext == 0 {
        return Err("/proc/kallsyms hides addresses (kptr_restrict)".into());
    }
    let mut ranges = [[0; 2]; IcmpFreeCallers::RANGES];
    for (i, s) in start.iter().enumerate() {
        let Some(s) = *s else {
            if i < 2 {
                return Err(format!("{} is not in /proc/kallsyms", CALLERS[i][0]));
            }
            continue;
        };
        let end = addrs.iter().copied().filter(|&a| a > s).min();
        ranges[i] = [
            s,
            end.ok_or_else(|| format!("no symbol follows {}", CALLERS[i][0]))?,
        ];
    }
    Ok(IcmpFreeCallers {
        text: [stext, etext],
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
ffffffff81000000 T _stext
ffffffff81000100 T __kretprobe_trampoline
ffffffff81000180 T kretprobe_trampoline_handler
ffffffff820a6540 T __pfx_icmp_rcv
ffffffff820a6550 T icmp_rcv
ffffffff820a68f0 T __pfx_icmp_err
ffffffff82258780 T _etext
ffffffffc0100000 t icmpv6_rcv\t[ipv6]
ffffffffc0100400 t ip6_input\t[ipv6]
ffffffffc0100200 t icmpv6_err\t[ipv6]
";

    #[test]
    fn callers_end_at_the_next_symbol_above() {
        let c = parse(TEXT.as_bytes()).unwrap();
        assert_eq!(c.text, [0xffffffff81000000, 0xffffffff82258780]);
        assert_eq!(c.ranges[0], [0xffffffff820a6550, 0xffffffff820a68f0]);
        assert_eq!(c.ranges[1], [0xffffffffc0100000, 0xffffffffc0100200]);
        assert_eq!(c.ranges[2], [0xffffffff81000100, 0xffffffff81000180]);
        assert_eq!((c.ranges[3], c.ranges[4]), ([0, 0], [0, 0]));
        // The handlers and a kretprobe's trampoline count; the rest of the text does not;
        // outside it (a module, a BPF trampoline) everything does.
        for yes in [
            0xffffffff820a6600,
            0xffffffff81000100,
            0xffffffffc0100010,
            0xffffffffa0000000,
        ] {
            assert!(c.may_free_icmp(yes), "{yes:x}");
        }
        for no in [
            0xffffffff820a68f0,
            0xffffffff820a654f,
            0xffffffff81000180,
            0xffffffff81000000,
        ] {
            assert!(!c.may_free_icmp(no), "{no:x}");
        }
    }

    #[test]
    fn hidden_missing_or_split_is_unknown() {
        let hidden: String = TEXT
            .lines()
            .map(|l| format!("0000000000000000{}\n", &l[16..]))
            .collect();
        assert!(
            parse(hidden.as_bytes())
                .unwrap_err()
                .contains("kptr_restrict")
        );
        let missing = TEXT.replace("icmpv6_rcv", "icmpv6_other");
        assert!(
            parse(missing.as_bytes())
                .unwrap_err()
                .contains("icmpv6_rcv")
        );
        let split = format!("{TEXT}ffffffff81500000 t kfree_skb_reason.part.0\n");
        assert!(
            parse(split.as_bytes())
                .unwrap_err()
                .contains("split kfree_skb_reason")
        );
        // Other functions' parts are fine.
        let other = format!("{TEXT}ffffffff81500000 t tcp_v4_rcv.cold\n");
        assert!(parse(other.as_bytes()).is_ok());
        let u = IcmpFreeCallers::UNKNOWN;
        assert!(u.may_free_icmp(0) && u.may_free_icmp(0xffffffff820a6600));
    }

    /// Root sees the addresses whatever kptr_restrict says (below 2).
    #[test]
    fn this_kernel() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("\n*** SKIPPED: not root, /proc/kallsyms may hide addresses ***\n");
            return;
        }
        match icmp_free_callers() {
            Ok(c) => {
                assert!(
                    c.text[0] < c.text[1] && c.ranges[0][0] < c.ranges[0][1],
                    "{c:x?}"
                );
                assert!(c.may_free_icmp(c.ranges[0][0]) && !c.may_free_icmp(c.text[0]));
            }
            // A kernel that splits the free functions: correct, only slower.
            Err(e) => assert!(e.contains("split"), "{e}"),
        }
    }
}
