//! Numbers, addresses and times written straight into a line's bytes, for both formats.
//! A copy of an exact, unknown length is a call to `memcpy`, and `Display` goes through the
//! formatting machinery: at a hundred thousand lines a second each costs more than the
//! digits themselves. So each helper grows the line by a fixed size, writes its digits in
//! place and cuts the line to length. Digits built in a stack buffer and then copied cost
//! more: the wide load of bytes just stored one or two at a time cannot be forwarded from
//! the stores and waits for them (a third of the JSON writer's time, by `perf annotate`).
use std::{io::Write as _, net::SocketAddr};

/// How many digits `v` has in decimal.
#[inline(always)]
pub(super) fn width(v: u64) -> usize {
    v.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// `v` in decimal.
#[inline(always)]
pub(super) fn decimal(out: &mut Vec<u8>, v: u64) {
    let len = width(v);
    let at = out.len();
    out.extend_from_slice(&[0u8; 20]); // u64::MAX has 20 digits
    fill_digits(&mut out[at..at + 20], v, len);
    out.truncate(at + len);
}

/// `n` in decimal, zero-padded to `width` digits (the low `width` digits of a wider one).
#[inline(always)]
pub(super) fn digits(out: &mut Vec<u8>, n: u32, width: usize) {
    let at = out.len();
    out.extend_from_slice(&[0u8; 10]);
    fill_digits(&mut out[at..at + 10], u64::from(n), width);
    out.truncate(at + width);
}

/// `a.b.c.d:port` or `[v6]:port`, as `Display` writes them. IPv4 from a table of octets.
#[inline(always)]
pub(super) fn addr(out: &mut Vec<u8>, a: SocketAddr) {
    let SocketAddr::V4(a) = a else {
        let _ = write!(out, "{a}");
        return;
    };
    // `255.255.255.255:` is 16 bytes, each octet written as 3 whatever its length; the
    // port's 5 digits follow.
    let at = out.len();
    out.extend_from_slice(&[0u8; 24]);
    let b = &mut out[at..at + 24];
    let mut n = 0;
    for (i, o) in a.ip().octets().into_iter().enumerate() {
        let [len, digits @ ..] = OCTETS[usize::from(o)];
        b[n..n + 3].copy_from_slice(&digits);
        n += usize::from(len);
        b[n] = if i < 3 { b'.' } else { b':' };
        n += 1;
    }
    let port = u64::from(a.port());
    let len = width(port);
    fill_digits(&mut b[n..n + 5], port, len);
    out.truncate(at + n + len);
}

/// Nanoseconds since the epoch as whole seconds (floored) and the nanoseconds past them.
/// i128 division is a library call: u64 whenever the time fits (until 2554).
pub(super) fn split_ns(wall: i128) -> (i128, u32) {
    match u64::try_from(wall) {
        Ok(w) => (i128::from(w / 1_000_000_000), (w % 1_000_000_000) as u32),
        Err(_) => (
            wall.div_euclid(1_000_000_000),
            wall.rem_euclid(1_000_000_000) as u32,
        ),
    }
}

/// The low `len` digits of `v` into `b[..len]`, two at a time from the right.
#[inline(always)]
fn fill_digits(b: &mut [u8], mut v: u64, len: usize) {
    let mut i = len;
    while i >= 2 {
        let p = (v % 100) as usize * 2;
        v /= 100;
        i -= 2;
        b[i..i + 2].copy_from_slice(&PAIRS[p..p + 2]);
    }
    if i == 1 {
        b[0] = b'0' + (v % 10) as u8;
    }
}

const fn digit(n: usize) -> u8 {
    b'0' + (n % 10) as u8
}

/// "00" to "99".
static PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = digit(i / 10);
        t[2 * i + 1] = digit(i);
        i += 1;
    }
    t
};

/// Each octet's decimal digits, after their count.
static OCTETS: [[u8; 4]; 256] = {
    let mut t = [[0u8; 4]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = match i {
            100.. => [3, digit(i / 100), digit(i / 10), digit(i)],
            10.. => [2, digit(i / 10), digit(i), 0],
            _ => [1, digit(i), 0, 0],
        };
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_addresses_and_times_as_display_writes_them() {
        for v in [
            0,
            7,
            9,
            10,
            99,
            100,
            101,
            4026531840,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            decimal(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
        for (n, width, want) in [
            (5, 2, "05"),
            (59, 2, "59"),
            (7, 3, "007"),
            (1, 9, "000000001"),
            (999_999_999, 9, "999999999"),
            (123, 3, "123"),
            (2026, 4, "2026"),
            (12345, 4, "2345"),
        ] {
            let mut out = Vec::new();
            digits(&mut out, n, width);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.20.3:53",
            "1.10.100.0:10",
            "9.99.199.200:100",
            "127.0.0.1:1000",
            "10.0.0.1:12345",
            "100.64.0.255:99",
            "[::ffff:1.2.3.4]:9",
            "[fd00::1]:54321",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            addr(&mut out, a);
            assert_eq!(String::from_utf8(out).unwrap(), a.to_string());
        }
        for ns in [
            0i128,
            1,
            999_999_999,
            1_000_000_000,
            -1,
            -1_000_000_001,
            i128::MAX,
        ] {
            let (s, n) = split_ns(ns);
            assert_eq!(
                (s, i128::from(n)),
                (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
            );
        }
    }
}
