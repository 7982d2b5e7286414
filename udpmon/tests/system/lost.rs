//! When the ring loses records, a socket's close may be among them: udpmon then dumps the
//! open sockets (sock_diag) and closes the ones it knew that are gone, rather than leaving
//! their flows to end as idle minutes later (or never, for sockets from before it started).
//!
//! The scenario makes the ring lose records for sure: udpmon is stopped (SIGSTOP) while
//! sockets each send one datagram and close, until the ring (4 MiB, 144 bytes a record,
//! two records a socket) has long been full; then a socket whose CONNECT udpmon had already
//! printed closes, and udpmon goes on (SIGCONT). Every flow whose CONNECT it printed must
//! get its CLOSE, reason closed, well before the idle timeout could have closed any; and
//! the sockets still open (one that sent before the stop, and the sink) none. A socket that
//! sent its first datagram into the full ring has its flow reported by its next one.
use std::{
    collections::HashSet,
    net::UdpSocket,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    behaviour::once,
    harness::{Outcome, Strategy, Udpmon, deadline, is, s},
    util::{cookie_of, exit_count, exit_summary, local_of},
};

/// Sockets of the burst: about three times what fills the ring.
const BURST: usize = 45_000;

pub fn lost_closes_recovered(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    let mut u = Udpmon::start(st, &["--idle-timeout", "10m"]).expect("udpmon starts");
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = sink.local_addr().unwrap();
    let to_s = to.to_string();
    let connected = |u: &mut Udpmon, what, sock: &UdpSocket| {
        sock.connect(to).unwrap();
        sock.send(b"before").unwrap();
        let local = local_of(sock);
        u.wait_for(what, |v| is(v, "connect") && s(v, "local") == local)["cookie"].clone()
    };
    let witness = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ck = connected(&mut u, "the witness's connect", &witness);
    let stays = UdpSocket::bind("127.0.0.1:0").unwrap();
    let stays_ck = connected(&mut u, "the open socket's connect", &stays);
    let sink_ck = u.wait_for("the sink's accept", |v| {
        is(v, "accept") && s(v, "local") == to_s
    })["cookie"]
        .clone();

    u.kill(libc::SIGSTOP);
    let start = Instant::now();
    let mut sent = 0;
    // Not scaled for slow VMs: a ring that a burst this long does not fill is a skip.
    while sent < BURST && start.elapsed() < Duration::from_secs(20) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.send_to(b"x", to).unwrap();
        sent += 1;
    }
    // Its first datagram's records (CONNECT here, ACCEPT at the sink) find the ring full.
    let late = UdpSocket::bind("127.0.0.1:0").unwrap();
    late.send_to(b"late", to).unwrap();
    let late_ck = cookie_of(&late);
    drop(witness);
    u.kill(libc::SIGCONT);

    let Some(lost) = u.stderr_within(deadline(20), |l| {
        l.contains("events lost:") && l.contains("ring-buffer drops")
    }) else {
        return Outcome::Skip(format!(
            "{sent} sockets in {:?} did not fill udpmon's ring: nothing was lost to recover",
            start.elapsed()
        ));
    };
    eprintln!("  {sent} sockets in {:?}; udpmon: {lost}", start.elapsed());
    u.wait_for_stderr("closes found by a dump", |l| {
        l.contains("sockets found gone by a dump")
    });

    // A flow whose first record was lost is reported at its next datagram, and nothing else
    // would report it. (The sink's side of it is in the sink's summary: the burst made it a
    // busy socket.)
    let end = Instant::now() + deadline(30);
    let late_connects = |u: &mut Udpmon| {
        u.all(|v| is(v, "connect") && v["cookie"] == late_ck && s(v, "remote") == to_s)
    };
    while late_connects(&mut u).is_empty() {
        assert!(
            Instant::now() < end,
            "the flow whose first record was lost got no CONNECT within {:?}",
            deadline(30)
        );
        late.send_to(b"late", to).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(late);

    // Every flow that was reported open is reported closed.
    let end = Instant::now() + deadline(30);
    let (opened, closes) = loop {
        let events = u.all(|v| {
            (is(v, "connect") || is(v, "close")) && s(v, "remote") == to_s
                || is(v, "close") && v["cookie"] == sink_ck
        });
        let opened: HashSet<(String, String)> = events
            .iter()
            .filter(|v| is(v, "connect") && v["cookie"] != stays_ck)
            .map(flow)
            .collect();
        let closes: Vec<&Value> = events.iter().filter(|v| is(v, "close")).collect();
        let closed: HashSet<(String, String)> = closes.iter().map(|v| flow(v)).collect();
        let unclosed = opened.difference(&closed).count();
        if unclosed == 0 {
            let closes: Vec<Value> = closes.into_iter().cloned().collect();
            break (opened, closes);
        }
        assert!(
            Instant::now() < end,
            "{unclosed} of {} flows reported open got no CLOSE within {:?}",
            opened.len(),
            deadline(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(opened.len() > 1, "the burst's flows were reported too");
    // Its datagrams after the one reported did not report it again.
    assert_eq!(
        late_connects(&mut u).len(),
        1,
        "the late flow's CONNECT, once"
    );
    for c in &closes {
        assert_eq!(s(c, "reason"), "closed", "{c}");
    }
    assert!(
        closes.iter().any(|c| c["cookie"] == ck),
        "the witness's CLOSE"
    );
    let wrong: Vec<&Value> = closes
        .iter()
        .filter(|c| c["cookie"] == stays_ck || c["cookie"] == sink_ck)
        .collect();
    assert!(wrong.is_empty(), "open sockets reported closed: {wrong:?}");
    drop(stays);
    let (_, stderr) = u.stop();
    let recovered = exit_count(
        exit_summary(&stderr),
        "closes recovered after lost records ",
    );
    assert!(recovered >= 1, "the exit summary counts them: {stderr:?}");
    Outcome::Pass
}

/// A flow, as its events name it: cookie and peer.
fn flow(v: &Value) -> (String, String) {
    (v["cookie"].to_string(), s(v, "remote").to_string())
}
