//! Issue 5, scenario 1: one unconnected socket talking to several peers with sendto (the
//! statsd / DNS-client pattern). One peer closes its socket; the next datagram to it draws an
//! ICMP port unreachable that only that peer's flow reports. Without IP_RECVERR the kernel
//! drops the error (verdict `discarded`: an unconnected socket is never told); with
//! IP_RECVERR / IPV6_RECVERR it is queued on the error queue (verdict `queued`).
use std::net::{SocketAddr, UdpSocket};

use crate::{
    harness::{
        CLIENT4, CLIENT6, Outcome, SERVER4, SERVER6, Strategy, TwoHosts, Udpmon, is, s,
        udp_socket_in,
    },
    util::{
        Who, addr, assert_close, assert_event, assert_icmp, assert_story, exit_count, exit_summary,
        local_of, of_flow, read_errqueue, set_recverr,
    },
};

/// This thread's command name, as the kernel (and so udpmon) sees it.
pub fn my_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim()
        .to_string()
}

fn exchange(sender: &UdpSocket, peer: &UdpSocket, msg: &str, reply: &str) {
    let to = peer.local_addr().unwrap();
    sender.send_to(msg.as_bytes(), to).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], msg.as_bytes());
    assert_eq!(from, sender.local_addr().unwrap());
    peer.send_to(reply.as_bytes(), from).unwrap();
    let (n, from) = sender.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (reply.as_bytes(), to));
}

pub fn peers(st: Strategy, v6: bool, recverr: bool) -> Outcome {
    let (cip, sip) = if v6 {
        (CLIENT6, SERVER6)
    } else {
        (CLIENT4, SERVER4)
    };
    let tag = match (v6, recverr) {
        (false, false) => "p4",
        (false, true) => "q4",
        (true, false) => "p6",
        (true, true) => "q6",
    };
    let h = TwoHosts::new(tag);
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let comm = my_comm();
    let (cli, srv) = Who::test_process(&h, &comm);
    let me = cli.pid;

    let mut peers: Vec<Option<UdpSocket>> = (1..=3)
        .map(|i| Some(udp_socket_in(&h.server, &addr(sip, 7100 + i))))
        .collect();
    let remotes: Vec<String> = (1..=3).map(|i| addr(sip, 7100 + i)).collect();
    let sender = udp_socket_in(&h.client, &addr(cip, 0));
    if recverr {
        set_recverr(&sender);
    }
    let local = local_of(&sender);

    // Round 1: every peer hears from the sender and answers.
    for (i, p) in peers.iter().enumerate() {
        let p = p.as_ref().unwrap();
        exchange(&sender, p, &format!("hello {i}"), &format!("ack {i}"));
    }
    let mut sender_cookie = None;
    let mut peer_cookies = Vec::new();
    for r in &remotes {
        let c = u.wait_for("sender connect", |v| {
            is(v, "connect") && s(v, "local") == local && s(v, "remote") == r
        });
        assert_event(&c, "connect", &cli, &local, r);
        assert_eq!(c["via"], "send", "{c}");
        assert_eq!(c["bytes"], 7, "{c}");
        assert_eq!(c["family"], if v6 { "ipv6" } else { "ipv4" }, "{c}");
        // One socket, one cookie, three flows.
        let ck = sender_cookie.get_or_insert_with(|| c["cookie"].clone());
        assert_eq!(&c["cookie"], ck, "one socket, one cookie: {c}");
        let ck = ck.clone();
        u.wait_for("sender establish", |v| {
            is(v, "establish") && of_flow(v, &ck, r)
        });
        let a = u.wait_for("peer accept", |v| {
            is(v, "accept") && s(v, "local") == r && s(v, "remote") == local
        });
        assert_event(&a, "accept", &srv, r, &local);
        assert_eq!(a["via"], "recv", "{a}");
        let pc = a["cookie"].clone();
        u.wait_for("peer establish", |v| {
            is(v, "establish") && of_flow(v, &pc, &local)
        });
        peer_cookies.push(pc);
    }
    let sender_cookie = sender_cookie.unwrap();

    // Peer 2 goes away.
    drop(peers[1].take());
    let pc2 = peer_cookies[1].clone();
    let close2 = u.wait_for("closed peer's close", |v| {
        is(v, "close") && of_flow(v, &pc2, &local)
    });
    assert_close(&close2, "closed", (1, 5), (1, 7));

    // The next datagram to it draws an ICMP port unreachable.
    let dead: SocketAddr = remotes[1].parse().unwrap();
    sender.send_to(b"again 1", dead).unwrap();
    let un = u.wait_for("unreachable", |v| {
        is(v, "unreachable") && of_flow(v, &sender_cookie, &remotes[1])
    });
    assert_event(&un, "unreachable", &cli, &local, &remotes[1]);
    let (ty, code) = if v6 { (1, 4) } else { (3, 3) };
    let verdict = if recverr { "queued" } else { "discarded" };
    assert_icmp(&un, ty, code, sip, "ECONNREFUSED", verdict);
    if recverr {
        // The application can read it from the error queue: what udpmon said it could.
        let q = read_errqueue(&sender);
        assert_eq!(q.errno, libc::ECONNREFUSED as u32, "{q:?}");
        assert_eq!(q.origin, if v6 { 3 } else { 2 }, "{q:?}");
        assert_eq!((q.ty, q.code), (ty, code), "{q:?}");
        assert_eq!(q.dest, Some(dead), "{q:?}");
        assert_eq!(q.offender, Some(sip.parse().unwrap()), "{q:?}");
    }
    if !u.without_refused() {
        let refused = u.wait_for("server-side refused", |v| {
            is(v, "refused") && s(v, "local") == remotes[1] && s(v, "remote") == local
        });
        assert_eq!(refused["last_owner"]["pid"], me, "{refused}");
        assert_eq!(refused["netns"], srv.netns, "{refused}");
    }

    // Round 2: the live peers still answer; their flows know nothing of the error.
    for (i, p) in peers.iter().enumerate() {
        if let Some(p) = p {
            exchange(&sender, p, &format!("again {i}"), &format!("ack2 {i}"));
        }
    }
    drop(sender);
    let mut closes = Vec::new();
    for r in &remotes {
        let c = u.wait_for("sender close", |v| {
            is(v, "close") && of_flow(v, &sender_cookie, r)
        });
        assert_event(&c, "close", &cli, &local, r);
        closes.push(c);
    }
    assert_close(&closes[0], "closed", (2, 14), (2, 11));
    assert_close(&closes[1], "closed", (2, 14), (1, 5));
    assert_close(&closes[2], "closed", (2, 14), (2, 11));
    assert_eq!(closes[1]["stats"]["icmp_errors"], 1, "{}", closes[1]);
    assert_eq!(closes[0]["stats"]["icmp_errors"], 0, "{}", closes[0]);
    assert_eq!(closes[2]["stats"]["icmp_errors"], 0, "{}", closes[2]);
    drop(peers);
    for (i, pc) in peer_cookies.iter().enumerate() {
        u.wait_for("peer close", |v| is(v, "close") && of_flow(v, pc, &local));
        if i != 1 {
            let c = u.all(|v| is(v, "close") && of_flow(v, pc, &local));
            assert_close(&c[0], "closed", (2, 11), (2, 14));
        }
    }

    let full = ["connect", "establish", "close"];
    assert_story(&mut u, "sender->peer0", &sender_cookie, &remotes[0], &full);
    assert_story(
        &mut u,
        "sender->peer1 (closed)",
        &sender_cookie,
        &remotes[1],
        &["connect", "establish", "unreachable", "close"],
    );
    assert_story(&mut u, "sender->peer2", &sender_cookie, &remotes[2], &full);
    for (i, pc) in peer_cookies.iter().enumerate() {
        assert_story(
            &mut u,
            &format!("peer{i}"),
            pc,
            &local,
            &["accept", "establish", "close"],
        );
    }
    Outcome::Pass
}

/// Issue 10: the kernel does not say which socket an ICMP error it dropped was about; udpmon
/// finds the flow that sent the quoted datagram, and must tell apart two sockets on the same
/// local port in two network namespaces (containers) talking to the same closed peer port.
/// Socket A's second error must not go to socket B, the newer one, whose first datagram
/// came last.
pub fn same_port_two_netns(st: Strategy) -> Outcome {
    let h = TwoHosts::new("sp");
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let dead: SocketAddr = addr(SERVER4, 9).parse().unwrap();
    let (la, lb) = (addr(CLIENT4, 7300), addr(SERVER4, 7300));
    let a = udp_socket_in(&h.client, &la);
    let b = udp_socket_in(&h.server, &lb);
    let unreachable_of = |u: &mut Udpmon, who: &str, local: &str| {
        u.wait_for(who, |v| is(v, "unreachable") && s(v, "local") == local)
    };
    a.send_to(b"a1", dead).unwrap();
    let ua = unreachable_of(&mut u, "A's unreachable", &la);
    b.send_to(b"b1", dead).unwrap();
    let ub = unreachable_of(&mut u, "B's unreachable", &lb);
    let (ca, cb) = (ua["cookie"].clone(), ub["cookie"].clone());
    assert_ne!(ca, cb, "two sockets: {ua} {ub}");
    for v in [&ua, &ub] {
        assert_eq!(v["icmp"]["verdict"], "discarded", "{v}");
    }
    // A repeated error about A's flow, which the engine counts on the flow without a line of
    // its own. A datagram to another closed port then draws an error that does get a line,
    // and comes back after the first.
    a.send_to(b"a2", dead).unwrap();
    let sentinel = addr(SERVER4, 10);
    a.send_to(b"a3", sentinel.parse::<SocketAddr>().unwrap())
        .unwrap();
    u.wait_for("A's sentinel unreachable", |v| {
        is(v, "unreachable") && s(v, "local") == la && s(v, "remote") == sentinel
    });
    let rs = dead.to_string();
    drop((a, b));
    let close_a = u.wait_for("A's close", |v| is(v, "close") && of_flow(v, &ca, &rs));
    let close_b = u.wait_for("B's close", |v| is(v, "close") && of_flow(v, &cb, &rs));
    assert_eq!(
        close_a["stats"]["icmp_errors"], 2,
        "A had two errors: {close_a}"
    );
    assert_eq!(
        close_b["stats"]["icmp_errors"], 1,
        "B had one error: {close_b}"
    );
    Outcome::Pass
}

/// Issue 10: datagrams from ever-new source ports to a closed port (a scan, or a flood with
/// random sources) are each a new tuple for REFUSED's per-tuple limit; the per-CPU budget
/// keeps them from filling the ring buffer, and counts what it held back.
pub fn refused_flood(st: Strategy) -> Outcome {
    const SENT: usize = 2000;
    const BUDGET_PER_CPU: usize = 256;
    let h = TwoHosts::new("rf");
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    if u.without_refused() {
        return Outcome::Skip(format!(
            "kernel {} has no kfree_skb drop reason (5.17): no REFUSED to rate-limit",
            crate::harness::kernel_release()
        ));
    }
    let closed: SocketAddr = addr(SERVER4, 7400).parse().unwrap();
    let flood = std::time::Instant::now();
    let sent = crate::harness::in_netns(&h.client, move || {
        (0..SENT)
            .filter(|_| {
                let sock = UdpSocket::bind("10.200.0.1:0").unwrap();
                sock.send_to(b"scan", closed).is_ok()
            })
            .count()
    });
    assert_eq!(sent, SENT);
    let seconds = flood.elapsed().as_secs() as usize;
    // Each send returned after the server's kernel dropped the datagram (veth delivers in
    // the sender's softirq), so every drop is counted by now.
    u.wait_for("a refused", |v| {
        is(v, "refused") && s(v, "local") == closed.to_string()
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (status, stderr) = u.stop();
    assert!(
        status.success(),
        "udpmon after SIGTERM: {status}; {stderr:?}"
    );
    let summary = exit_summary(&stderr);
    let limited = exit_count(summary, "closed-port reports rate-limited ") as usize;
    // Each CPU's budget is renewed every second: one per second the flood took, and one
    // more for the second it started in.
    let budgets = BUDGET_PER_CPU * cpus * (seconds + 2);
    assert!(
        limited >= SENT.saturating_sub(budgets),
        "{limited} of {SENT} closed-port datagrams rate-limited in {seconds} s on {cpus} CPUs: \
         {summary}"
    );
    assert!(limited > 0, "nothing rate-limited: {summary}");
    Outcome::Pass
}
