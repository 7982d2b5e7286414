//! Issue 5, scenarios 3 and 4: nftables in the server namespace.
//!
//! - `silent_drop`: a firewall starts dropping everything; the peer vanishes without an ICMP
//!   (SILENT), then the rule goes and the peer answers again (RESUMED).
//! - `reject_admin`: a firewall rejects with "administratively prohibited" (IPv4 3/13 ->
//!   EHOSTUNREACH, IPv6 1/1 -> EACCES, both fatal): the connected client is told
//!   (UNREACHABLE verdict notified, then APP-ERROR at its next call); once the rule goes the
//!   peer answers again (RESUMED).
use std::{
    io::ErrorKind,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::{
    harness::{
        CLIENT4, CLIENT6, Outcome, SERVER4, SERVER6, Strategy, TwoHosts, Udpmon, deadline, is,
        need_tools, s, udp_socket_in,
    },
    peers::my_comm,
    util::{
        Who, addr, assert_close, assert_connect, assert_event, assert_icmp, assert_story, local_of,
        nft, of_flow,
    },
};

/// Echoes every datagram until stopped; counts what it received and sent.
struct Echo {
    stop: Arc<AtomicBool>,
    rx: Arc<AtomicU64>,
    tx: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start(sock: UdpSocket) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let rx = Arc::new(AtomicU64::new(0));
        let tx = Arc::new(AtomicU64::new(0));
        let (st, r, t) = (stop.clone(), rx.clone(), tx.clone());
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::SeqCst) {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        sock.send_to(&buf[..n], from).unwrap();
                        t.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("echo server: {e}"),
                }
            }
            // The socket closes here, when the thread ends.
        });
        Echo {
            stop,
            rx,
            tx,
            thread: Some(thread),
        }
    }

    /// Stops the server (its socket closes); returns (received, sent).
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.rx.load(Ordering::SeqCst),
            self.tx.load(Ordering::SeqCst),
        )
    }
}

/// A connected client sending "ping" every 100 ms and reading the echoes, until stopped.
struct Pinger {
    stop: Arc<AtomicBool>,
    tx: Arc<AtomicU64>,
    rx: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Pinger {
    fn start(sock: UdpSocket) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let rx = Arc::new(AtomicU64::new(0));
        let tx = Arc::new(AtomicU64::new(0));
        let (st, r, t) = (stop.clone(), rx.clone(), tx.clone());
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::SeqCst) {
                sock.send(b"ping").unwrap();
                t.fetch_add(1, Ordering::SeqCst);
                // Read the answers for up to 100 ms.
                loop {
                    match sock.recv(&mut buf) {
                        Ok(_) => {
                            r.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            break;
                        }
                        Err(e) => panic!("pinger: {e}"),
                    }
                }
            }
            // A last datagram; its echo comes after every echo still in flight, so once it
            // is here the counts are final and no echo can hit a closed socket.
            sock.send(b"last").unwrap();
            t.fetch_add(1, Ordering::SeqCst);
            sock.set_read_timeout(Some(deadline(10))).unwrap();
            loop {
                let n = sock.recv(&mut buf).expect("the echo of the last datagram");
                r.fetch_add(1, Ordering::SeqCst);
                if &buf[..n] == b"last" {
                    break;
                }
            }
        });
        Pinger {
            stop,
            tx,
            rx,
            thread: Some(thread),
        }
    }

    /// Stops the client (its socket closes); returns (sent, received).
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.tx.load(Ordering::SeqCst),
            self.rx.load(Ordering::SeqCst),
        )
    }
}

/// The CONNECT of the test's connected client, found by pid and peer only: the tracepoint
/// strategy's CONNECT has no local address (see the issue-5 report).
pub fn wait_connect(u: &mut Udpmon, pid: u64, remote: &str) -> Value {
    u.wait_for("client connect", |v| {
        is(v, "connect") && v["pid"] == pid && s(v, "remote") == remote && v["via"] == "connect"
    })
}

pub fn silent_drop(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["nft", "ip"]) {
        return o;
    }
    let h = TwoHosts::new("sd");
    let mut u = Udpmon::start(st, &["--silent-after", "1s", "--silent-min-sends", "2"])
        .expect("udpmon starts");
    let comm = my_comm();
    let (cli, srv) = Who::test_process(&h, &comm);
    let me = cli.pid;
    let server = addr(SERVER4, 7300);
    let ssock = udp_socket_in(&h.server, &server);
    let csock = udp_socket_in(&h.client, &addr(CLIENT4, 0));
    csock.connect(&server).unwrap();
    let local = local_of(&csock);
    let c = wait_connect(&mut u, me, &server);
    let ck = c["cookie"].clone();
    let echo = Echo::start(ssock);
    let pinger = Pinger::start(csock);

    let est = u.wait_for("client establish", |v| {
        is(v, "establish") && of_flow(v, &ck, &server)
    });
    // Threads the test spawned have the test's command name too.
    assert_event(&est, "establish", &cli, &local, &server);
    let acc = u.wait_for("server accept", |v| {
        is(v, "accept") && s(v, "local") == server && s(v, "remote") == local
    });
    let sck = acc["cookie"].clone();
    u.wait_for("server establish", |v| {
        is(v, "establish") && of_flow(v, &sck, &local)
    });

    // The firewall starts dropping everything: no ICMP, the peer just vanishes.
    nft(
        &h.server,
        "table inet udpmon_drop {\n  chain input {\n    type filter hook input priority 0; policy drop;\n  }\n}\n",
    );
    let quiet_from = echo.rx.load(Ordering::SeqCst);
    let silent = u.wait_for("client silent", |v| {
        is(v, "silent") && of_flow(v, &ck, &server)
    });
    assert_event(&silent, "silent", &cli, &local, &server);
    assert!(
        silent["no_reply_ms"].as_u64().unwrap() >= 1000,
        "SILENT before --silent-after: {silent}"
    );
    assert!(
        silent["sends"].as_u64().unwrap() >= 2,
        "SILENT before --silent-min-sends: {silent}"
    );
    // The server really heard nothing (at most one datagram that was in flight).
    assert!(echo.rx.load(Ordering::SeqCst) <= quiet_from + 1);

    // The rule goes; the peer answers again.
    nft(&h.server, "delete table inet udpmon_drop\n");
    let resumed = u.wait_for("client resumed", |v| {
        is(v, "resumed") && of_flow(v, &ck, &server)
    });
    assert_event(&resumed, "resumed", &cli, &local, &server);
    assert_eq!(resumed["after"], "silent", "{resumed}");
    assert!(
        resumed["quiet_ms"].as_u64().unwrap() >= 1000,
        "the peer was quiet at least --silent-after: {resumed}"
    );

    let (ctx, crx) = pinger.stop();
    let cclose = u.wait_for("client close", |v| {
        is(v, "close") && of_flow(v, &ck, &server)
    });
    let (srx, stx) = echo.stop();
    let sclose = u.wait_for("server close", |v| {
        is(v, "close") && of_flow(v, &sck, &local)
    });
    assert_event(&cclose, "close", &cli, &local, &server);
    assert_close(&cclose, "closed", (ctx, 4 * ctx), (crx, 4 * crx));
    assert_eq!(cclose["stats"]["icmp_errors"], 0, "{cclose}");
    assert_event(&sclose, "close", &srv, &server, &local);
    assert_close(&sclose, "closed", (stx, 4 * stx), (srx, 4 * srx));
    assert!(
        ctx > srx,
        "the firewall dropped some pings: sent {ctx}, heard {srx}"
    );

    assert_story(
        &mut u,
        "client",
        &ck,
        &server,
        &["connect", "establish", "silent", "resumed", "close"],
    );
    assert_story(
        &mut u,
        "server",
        &sck,
        &local,
        &["accept", "establish", "close"],
    );
    assert_connect(st, &c, &cli, &local, &server);
    Outcome::Pass
}

pub fn reject_admin(st: Strategy, v6: bool) -> Outcome {
    if let Err(o) = need_tools(&["nft", "ip"]) {
        return o;
    }
    let (cip, sip) = if v6 {
        (CLIENT6, SERVER6)
    } else {
        (CLIENT4, SERVER4)
    };
    let h = TwoHosts::new(if v6 { "r6" } else { "r4" });
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let comm = my_comm();
    let (cli, srv) = Who::test_process(&h, &comm);
    let me = cli.pid;
    let server = addr(sip, 7600);
    let ssock = udp_socket_in(&h.server, &server);
    let csock = udp_socket_in(&h.client, &addr(cip, 0));
    csock.connect(&server).unwrap();
    csock
        .set_read_timeout(Some(crate::harness::deadline(5)))
        .unwrap();
    let local = local_of(&csock);
    let mut buf = [0u8; 64];

    // One exchange: the flow is established.
    csock.send(b"one").unwrap();
    let (n, from) = ssock.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from.to_string()), (&b"one"[..], local.clone()));
    ssock.send_to(b"two", from).unwrap();
    assert_eq!(csock.recv(&mut buf).unwrap(), 3);
    let c = wait_connect(&mut u, me, &server);
    let ck = c["cookie"].clone();
    u.wait_for("client establish", |v| {
        is(v, "establish") && of_flow(v, &ck, &server)
    });
    let acc = u.wait_for("server accept", |v| {
        is(v, "accept") && s(v, "local") == server && s(v, "remote") == local
    });
    assert_event(&acc, "accept", &srv, &server, &local);
    let sck = acc["cookie"].clone();

    // The firewall rejects: administratively prohibited.
    let rule = if v6 {
        "table ip6 udpmon_reject {\n  chain input {\n    type filter hook input priority 0;\n    udp dport 7600 reject with icmpv6 type admin-prohibited\n  }\n}\n"
    } else {
        "table ip udpmon_reject {\n  chain input {\n    type filter hook input priority 0;\n    udp dport 7600 reject with icmp type admin-prohibited\n  }\n}\n"
    };
    nft(&h.server, rule);
    csock.send(b"three").unwrap();
    let un = u.wait_for("client unreachable", |v| {
        is(v, "unreachable") && of_flow(v, &ck, &server)
    });
    assert_event(&un, "unreachable", &cli, &local, &server);
    let (ty, code, errno, kerr) = if v6 {
        (1, 1, "EACCES", libc::EACCES)
    } else {
        (3, 13, "EHOSTUNREACH", libc::EHOSTUNREACH)
    };
    assert_icmp(&un, ty, code, sip, errno, "notified");
    assert_eq!(un["icmp"]["fatal"], true, "{un}");
    // Notified: the application's next call fails with that errno.
    let e = csock.recv(&mut buf).expect_err("recv after the reject");
    assert_eq!(e.raw_os_error(), Some(kerr), "{e}");
    let app_errors = !u.without_app_errors();
    if app_errors {
        let ae = u.wait_for("client app-error", |v| {
            is(v, "app-error") && of_flow(v, &ck, &server)
        });
        assert_event(&ae, "app-error", &cli, &local, &server);
        assert_eq!(ae["errno"], errno, "{ae}");
        assert_eq!(ae["op"], "recv", "{ae}");
        assert!(ae["after_unreachable_ms"].is_u64(), "{ae}");
    }

    // The rule goes; the peer answers again.
    nft(
        &h.server,
        &format!(
            "delete table {} udpmon_reject\n",
            if v6 { "ip6" } else { "ip" }
        ),
    );
    csock.send(b"four").unwrap();
    let (n, from) = ssock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"four");
    ssock.send_to(b"five", from).unwrap();
    assert_eq!(csock.recv(&mut buf).unwrap(), 4);
    let resumed = u.wait_for("client resumed", |v| {
        is(v, "resumed") && of_flow(v, &ck, &server)
    });
    assert_event(&resumed, "resumed", &cli, &local, &server);
    assert_eq!(resumed["after"], "unreachable", "{resumed}");

    drop(csock);
    drop(ssock);
    let cclose = u.wait_for("client close", |v| {
        is(v, "close") && of_flow(v, &ck, &server)
    });
    assert_close(&cclose, "closed", (3, 12), (2, 7));
    assert_eq!(cclose["stats"]["icmp_errors"], 1, "{cclose}");
    assert_eq!(
        cclose["stats"]["app_errors"],
        u64::from(app_errors),
        "{cclose}"
    );
    let sclose = u.wait_for("server close", |v| {
        is(v, "close") && of_flow(v, &sck, &local)
    });
    assert_close(&sclose, "closed", (2, 7), (2, 7));

    assert_story(
        &mut u,
        "client",
        &ck,
        &server,
        if app_errors {
            &[
                "connect",
                "establish",
                "unreachable",
                "app-error",
                "resumed",
                "close",
            ]
        } else {
            &["connect", "establish", "unreachable", "resumed", "close"]
        },
    );
    assert_story(
        &mut u,
        "server",
        &sck,
        &local,
        &["accept", "establish", "close"],
    );
    // A reject is not a closed port: nothing may claim the server's port had no socket.
    let refused = u.all(|v| is(v, "refused") && s(v, "local") == server);
    assert!(
        refused.is_empty(),
        "REFUSED for a firewall reject: {refused:?}"
    );
    assert_connect(st, &c, &cli, &local, &server);
    Outcome::Pass
}
