//! Issue 12, point 3: a dual-stack (AF_INET6) socket talking to an IPv4 peer through a
//! v4-mapped address is one flow per peer, named by the IPv4 address, whether the event comes
//! from a packet (the ICMP error) or from the socket itself (the failed receive, the close).
use std::{io::ErrorKind, net::UdpSocket};

use crate::{
    harness::{Outcome, Strategy, Udpmon, is, s},
    util::of_flow,
};

pub fn v4_mapped(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    // A port nobody listens on: the kernel answers with ICMP port unreachable.
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let peer = closed.to_string();
    let sock = UdpSocket::bind("[::]:0").unwrap();
    sock.connect(format!("[::ffff:127.0.0.1]:{}", closed.port()))
        .unwrap();
    sock.send(b"x").unwrap();
    let un = u.wait_for("the unreachable", |v| {
        is(v, "unreachable") && s(v, "remote") == peer
    });
    assert_eq!(s(&un["icmp"], "verdict"), "notified", "{un}");
    assert_eq!(un["family"], "ipv4", "{un}");
    let cookie = un["cookie"].clone();
    // The error the kernel set on the socket is what the next call returns.
    let mut buf = [0u8; 8];
    let err = sock.recv(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let app_errors = if u.without_app_errors() {
        0
    } else {
        let e = u.wait_for("the app-error", |v| {
            is(v, "app-error") && v["cookie"] == cookie
        });
        assert_eq!(s(&e, "remote"), peer, "{e}");
        assert_eq!(e["family"], "ipv4", "{e}");
        1
    };
    drop(sock);
    let close = u.wait_for("the close", |v| {
        is(v, "close") && of_flow(v, &cookie, &peer)
    });
    assert_eq!(close["stats"]["icmp_errors"], 1, "{close}");
    assert_eq!(close["stats"]["app_errors"], app_errors, "{close}");
    let mine = u.all(|v| v["cookie"] == cookie);
    let mapped: Vec<_> = mine
        .iter()
        .filter(|v| s(v, "remote").contains("::ffff:"))
        .collect();
    assert!(
        mapped.is_empty(),
        "v4-mapped addresses in the output: {mapped:?}"
    );
    let closes = mine.iter().filter(|v| is(v, "close")).count();
    assert_eq!(closes, 1, "one flow, one close: {mine:#?}");
    Outcome::Pass
}
