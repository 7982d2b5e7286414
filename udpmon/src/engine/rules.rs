//! Kernel knowledge the engine needs: errno names and what an ICMP error turns into.
//!
//! The ICMP tables mirror `__udp4_lib_err` / `icmp_err_convert[]` and `__udp6_lib_err` /
//! `icmpv6_err_convert()` (KERNEL.md section 3); they are only used when the kernel hook could
//! not read the errno itself.
use std::borrow::Cow;

use crate::decode::Family;

/// Errno values as named in `errno(3)`. Only those a UDP socket can plausibly see.
const ERRNO_NAMES: &[(i32, &str)] = &[
    (libc::EPERM, "EPERM"),
    (libc::ENOENT, "ENOENT"),
    (libc::EINTR, "EINTR"),
    (libc::EIO, "EIO"),
    (libc::EBADF, "EBADF"),
    (libc::EAGAIN, "EAGAIN"),
    (libc::ENOMEM, "ENOMEM"),
    (libc::EACCES, "EACCES"),
    (libc::EFAULT, "EFAULT"),
    (libc::EINVAL, "EINVAL"),
    (libc::EPIPE, "EPIPE"),
    (libc::ENONET, "ENONET"),
    (libc::EPROTO, "EPROTO"),
    (libc::ENOTSOCK, "ENOTSOCK"),
    (libc::EDESTADDRREQ, "EDESTADDRREQ"),
    (libc::EMSGSIZE, "EMSGSIZE"),
    (libc::EPROTOTYPE, "EPROTOTYPE"),
    (libc::ENOPROTOOPT, "ENOPROTOOPT"),
    (libc::EOPNOTSUPP, "EOPNOTSUPP"),
    (libc::EAFNOSUPPORT, "EAFNOSUPPORT"),
    (libc::EADDRINUSE, "EADDRINUSE"),
    (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
    (libc::ENETDOWN, "ENETDOWN"),
    (libc::ENETUNREACH, "ENETUNREACH"),
    (libc::ENETRESET, "ENETRESET"),
    (libc::ECONNABORTED, "ECONNABORTED"),
    (libc::ECONNRESET, "ECONNRESET"),
    (libc::ENOBUFS, "ENOBUFS"),
    (libc::EISCONN, "EISCONN"),
    (libc::ENOTCONN, "ENOTCONN"),
    (libc::ETIMEDOUT, "ETIMEDOUT"),
    (libc::ECONNREFUSED, "ECONNREFUSED"),
    (libc::EHOSTDOWN, "EHOSTDOWN"),
    (libc::EHOSTUNREACH, "EHOSTUNREACH"),
];

/// The symbolic name of a (positive) errno, or `errno N` for one outside the table.
pub fn errno_name(errno: i32) -> Cow<'static, str> {
    ERRNO_NAMES.iter().find(|(n, _)| *n == errno).map_or_else(
        || Cow::Owned(format!("errno {errno}")),
        |(_, s)| Cow::Borrowed(*s),
    )
}

/// Kernel-internal restart codes (include/linux/errno.h). The socket tracepoints see them
/// when a signal interrupts a blocking call; the syscall layer restarts the call or turns
/// them into EINTR, so the application never sees them.
const ERESTARTSYS: i32 = 512;
const ERESTART_RESTARTBLOCK: i32 = 516;

/// Whether a failed send/recv says something about the flow. EAGAIN only means "nothing to
/// read / buffer full" on a non-blocking socket, and an interrupted call (EINTR, the
/// kernel's restart codes) is about the process, not the peer: reporting them would flood
/// the output with non-events.
pub fn is_flow_error(errno: i32) -> bool {
    // EWOULDBLOCK is EAGAIN on Linux.
    let benign = matches!(errno, libc::EAGAIN | libc::EINTR)
        || (ERESTARTSYS..=ERESTART_RESTARTBLOCK).contains(&errno);
    errno > 0 && !benign
}

/// The errno the kernel sets for an ICMP error about a UDP datagram, and whether the error
/// is fatal ("hard": a connected socket hears about it even without IP_RECVERR). `None` for
/// messages that never reach a UDP socket as an error (redirects, source quench, fragment
/// reassembly time-outs, unknown codes).
///
/// "Fragmentation needed" / "packet too big" are fatal only under the default path-MTU
/// discovery setting; a socket with `IP_PMTUDISC_DONT` ignores them. The default is assumed.
pub fn icmp_errno(family: Family, ty: u8, code: u8) -> Option<(i32, bool)> {
    match family {
        Family::V4 => icmp4_errno(ty, code),
        Family::V6 => icmp6_errno(ty, code),
    }
}

fn icmp4_errno(ty: u8, code: u8) -> Option<(i32, bool)> {
    const DEST_UNREACH: u8 = 3;
    const TIME_EXCEEDED: u8 = 11;
    const PARAMETER_PROBLEM: u8 = 12;
    Some(match (ty, code) {
        (DEST_UNREACH, 0) => (libc::ENETUNREACH, false),
        (DEST_UNREACH, 1) => (libc::EHOSTUNREACH, false),
        (DEST_UNREACH, 2) => (libc::ENOPROTOOPT, true),
        (DEST_UNREACH, 3) => (libc::ECONNREFUSED, true),
        (DEST_UNREACH, 4) => (libc::EMSGSIZE, true),
        (DEST_UNREACH, 5) => (libc::EOPNOTSUPP, false),
        (DEST_UNREACH, 6) => (libc::ENETUNREACH, true),
        (DEST_UNREACH, 7) => (libc::EHOSTDOWN, true),
        (DEST_UNREACH, 8) => (libc::ENONET, true),
        (DEST_UNREACH, 9) => (libc::ENETUNREACH, true),
        (DEST_UNREACH, 10) => (libc::EHOSTUNREACH, true),
        (DEST_UNREACH, 11) => (libc::ENETUNREACH, false),
        (DEST_UNREACH, 12) => (libc::EHOSTUNREACH, false),
        (DEST_UNREACH, 13..=15) => (libc::EHOSTUNREACH, true),
        // Code 1 (fragment reassembly) is dropped by icmp_unreach before UDP sees it.
        (TIME_EXCEEDED, 0) => (libc::EHOSTUNREACH, false),
        (PARAMETER_PROBLEM, _) => (libc::EPROTO, true),
        _ => return None,
    })
}

fn icmp6_errno(ty: u8, code: u8) -> Option<(i32, bool)> {
    const DEST_UNREACH: u8 = 1;
    const PKT_TOOBIG: u8 = 2;
    const TIME_EXCEED: u8 = 3;
    const PARAMPROB: u8 = 4;
    Some(match (ty, code) {
        (DEST_UNREACH, 0) => (libc::ENETUNREACH, false),
        (DEST_UNREACH, 1) => (libc::EACCES, true),
        (DEST_UNREACH, 2 | 3) => (libc::EHOSTUNREACH, false),
        (DEST_UNREACH, 4) => (libc::ECONNREFUSED, true),
        (DEST_UNREACH, 5 | 6) => (libc::EACCES, true),
        (DEST_UNREACH, _) => (libc::EPROTO, true),
        (PKT_TOOBIG, _) => (libc::EMSGSIZE, true),
        (TIME_EXCEED, _) => (libc::EHOSTUNREACH, false),
        (PARAMPROB, _) => (libc::EPROTO, true),
        // icmpv6_err_convert's default for the remaining error types (< 128); informational
        // messages (>= 128, redirects included) are never errors.
        (0..128, _) => (libc::EPROTO, false),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_and_unknown_errnos() {
        assert_eq!(errno_name(111), "ECONNREFUSED");
        assert_eq!(errno_name(113), "EHOSTUNREACH");
        assert_eq!(errno_name(4242), "errno 4242");
    }

    #[test]
    fn benign_errnos_are_not_flow_errors() {
        for e in [
            libc::EAGAIN,
            libc::EWOULDBLOCK,
            libc::EINTR,
            512,
            513,
            514,
            516,
            0,
        ] {
            assert!(!is_flow_error(e), "{e}");
        }
        for e in [
            libc::ECONNREFUSED,
            libc::EPERM,
            libc::EMSGSIZE,
            libc::ENOBUFS,
        ] {
            assert!(is_flow_error(e), "{e}");
        }
    }

    #[test]
    fn icmp4_table() {
        let v4 = |t, c| icmp_errno(Family::V4, t, c);
        assert_eq!(v4(3, 3), Some((libc::ECONNREFUSED, true)));
        assert_eq!(v4(3, 1), Some((libc::EHOSTUNREACH, false)));
        assert_eq!(v4(3, 0), Some((libc::ENETUNREACH, false)));
        assert_eq!(v4(3, 2), Some((libc::ENOPROTOOPT, true)));
        assert_eq!(v4(3, 7), Some((libc::EHOSTDOWN, true)));
        assert_eq!(v4(3, 8), Some((libc::ENONET, true)));
        assert_eq!(v4(3, 13), Some((libc::EHOSTUNREACH, true)));
        assert_eq!(v4(3, 16), None);
        assert_eq!(v4(11, 0), Some((libc::EHOSTUNREACH, false)));
        assert_eq!(v4(11, 1), None);
        assert_eq!(v4(12, 0), Some((libc::EPROTO, true)));
        assert_eq!(v4(4, 0), None);
        assert_eq!(v4(5, 1), None);
    }

    #[test]
    fn icmp6_table() {
        let v6 = |t, c| icmp_errno(Family::V6, t, c);
        assert_eq!(v6(1, 4), Some((libc::ECONNREFUSED, true)));
        assert_eq!(v6(1, 1), Some((libc::EACCES, true)));
        assert_eq!(v6(1, 3), Some((libc::EHOSTUNREACH, false)));
        assert_eq!(v6(1, 0), Some((libc::ENETUNREACH, false)));
        assert_eq!(v6(1, 9), Some((libc::EPROTO, true)));
        assert_eq!(v6(2, 0), Some((libc::EMSGSIZE, true)));
        assert_eq!(v6(3, 0), Some((libc::EHOSTUNREACH, false)));
        assert_eq!(v6(4, 1), Some((libc::EPROTO, true)));
        assert_eq!(v6(137, 0), None);
        assert_eq!(v6(128, 0), None);
    }
}
