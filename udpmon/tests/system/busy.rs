//! Issue 11, item 6: a busy DNS server stays readable. A real dnsmasq (server namespace,
//! 10.200.0.2:5353) takes a burst of queries, each from a fresh socket on a port of its own
//! in the client namespace, where nftables rejects dnsmasq's answers to a range of those
//! ports with ICMP port unreachable: dnsmasq's socket draws one UNREACHABLE per rejected
//! answer, a problem source that does not depend on timing.
//!
//! - `busy_dns_server`: udpmon (`--summary-interval 2s`, the default threshold of 100) prints
//!   the first flows' lines, then SUMMARY lines for dnsmasq's socket, a few of the rejected
//!   answers' UNREACHABLE lines and counts for the rest; over all of them, the printed ACCEPTs
//!   and the summaries' `new_flows` add up to the queries sent, as do the closes once dnsmasq
//!   exits, short only by what udpmon's exit summary says it lost.
//! - the same with `--no-summary`: every ACCEPT is printed, and no SUMMARY.
use std::{
    collections::BTreeSet,
    net::UdpSocket,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    dns::{PORT, dnsmasq},
    harness::{
        CLIENT4, Outcome, SERVER4, Strategy, TwoHosts, Udpmon, deadline, in_netns, is, need_tools,
        s, wait_until,
    },
    util::{addr, losses, nft, sigterm},
};

/// Queries in the burst, each from its own client port, from FIRST_PORT on.
const QUERIES: u16 = 3000;
const FIRST_PORT: u16 = 20000;
/// dnsmasq's answers to these client ports are rejected: late enough in the burst that
/// dnsmasq's socket is busy by then.
const REJECTED: std::ops::Range<u16> = 21000..21040;
/// `--summary-problems`: the default.
const PROBLEM_LINES: u64 = 5;

/// An A query for test.example, with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    // Recursion desired; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["test", "example"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One query from each client port in `ports`, from a fresh socket: the ones not rejected
/// wait for their answer. Returns how many were answered.
fn burst(h: &TwoHosts, ports: std::ops::Range<u16>) -> usize {
    let server = addr(SERVER4, PORT);
    let limit = deadline(120);
    in_netns(&h.client, move || {
        let end = Instant::now() + limit;
        let mut answered = 0;
        for port in ports {
            assert!(
                Instant::now() < end,
                "the burst took longer than {limit:?} (at port {port})"
            );
            let sock = UdpSocket::bind(addr(CLIENT4, port)).expect("bind a client port");
            let id = port;
            sock.send_to(&query(id), &server).expect("send a query");
            if REJECTED.contains(&port) {
                continue;
            }
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf).expect("an answer from dnsmasq");
            // The same id, a response (QR), no error (RCODE 0).
            assert!(n >= 12, "short answer of {n} bytes");
            assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), id);
            assert!(buf[2] & 0x80 != 0 && buf[3] & 0x0f == 0, "{:?}", &buf[..4]);
            answered += 1;
        }
        answered
    })
}

/// Whether `v` is about dnsmasq's socket (pid `pid`), as its own flows or its summary.
fn of_dnsmasq(v: &Value, pid: u64) -> bool {
    v["pid"] == pid && s(v, "local") == addr(SERVER4, PORT)
}

fn client_port(v: &Value) -> u16 {
    s(v, "remote")
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

fn n(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no count {path:?} in {v}"))
}

pub fn busy_dns_server(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["dnsmasq", "nft", "ip"]) {
        return o;
    }
    let h = TwoHosts::new("bz");
    nft(
        &h.client,
        &format!(
            "table ip udpmon_busy {{\n  chain input {{\n    type filter hook input priority 0;\n    udp sport {PORT} udp dport {}-{} reject with icmp type port-unreachable\n  }}\n}}\n",
            REJECTED.start,
            REJECTED.end - 1
        ),
    );
    let mut u = Udpmon::start(st, &["--comm", "dnsmasq", "--summary-interval", "2s"])
        .expect("udpmon starts");
    let mut dm = dnsmasq(&h);
    let pid = u64::from(dm.id());
    let sent = FIRST_PORT..FIRST_PORT + QUERIES;
    assert_eq!(burst(&h, sent.clone()), sent.len() - REJECTED.len());
    // An interval ends within 2 s of the burst: its summary, while dnsmasq still runs.
    let periodic = u.wait_for("a summary of dnsmasq's socket", |v| {
        is(v, "summary") && of_dnsmasq(v, pid)
    });
    assert_eq!(periodic["scope"], "socket", "{periodic}");
    assert_eq!(s(&periodic, "remote"), "0.0.0.0:0", "{periodic}");
    assert_eq!(s(&periodic, "process"), "dnsmasq", "{periodic}");
    assert_ne!(periodic["cookie"], 0, "{periodic}");
    // dnsmasq exits: its socket's close ends its flows and reports its last summary.
    sigterm(&mut dm);
    let last = u.wait_for("dnsmasq's last summary", |v| {
        is(v, "summary") && of_dnsmasq(v, pid) && v["open"] == 0
    });
    assert_eq!(last["cookie"], periodic["cookie"], "one socket: {last}");
    let (status, stderr, events) = u.interrupt();
    assert!(status.success(), "udpmon after SIGINT: {status}");
    let lost = losses(&stderr);
    let ours: Vec<&Value> = events.iter().filter(|v| of_dnsmasq(v, pid)).collect();
    let lines =
        |kind: &str| -> Vec<&Value> { ours.iter().copied().filter(|v| is(v, kind)).collect() };
    let summaries = lines("summary");
    for v in &summaries {
        eprintln!("  {v}");
    }
    let total = |path: &[&str]| -> u64 { summaries.iter().map(|v| n(v, path)).sum() };

    // Every query opened one flow: printed (the first ones) or counted, never both.
    let accepted: BTreeSet<u16> = lines("accept").iter().map(|v| client_port(v)).collect();
    assert_eq!(
        accepted.len(),
        lines("accept").len(),
        "a flow accepted twice"
    );
    assert!(
        accepted.iter().all(|p| sent.contains(p)),
        "an ACCEPT from a port that sent nothing: {accepted:?}"
    );
    // A flow whose query's record was lost opens on dnsmasq's answer: a CONNECT.
    let connects = lines("connect").len() as u64;
    assert!(connects <= lost, "{connects} CONNECTs, udpmon lost {lost}");
    assert!(
        accepted.len() as u64 + connects >= 100,
        "the first 100 flows of an interval are printed: {} ACCEPTs, {connects} CONNECTs",
        accepted.len()
    );
    let opened = accepted.len() as u64 + connects + total(&["new_flows"]);
    let queries = u64::from(QUERIES);
    let missing = queries.saturating_sub(opened);
    assert!(opened <= queries, "{opened} flows from {queries} queries");
    assert!(
        missing <= lost,
        "{missing} of {queries} queries neither printed nor counted, while udpmon says it lost {lost}: {stderr:?}"
    );
    assert_eq!(
        total(&["accepted"]) + total(&["connected"]),
        total(&["new_flows"]),
        "each summarised flow opened one way or the other"
    );
    assert!(
        total(&["connected"]) <= lost,
        "{} summarised flows opened by an answer, udpmon lost {lost}",
        total(&["connected"])
    );
    // dnsmasq answered every query, and every flow closed with its socket.
    let closed = lines("close").len() as u64 + total(&["closed"]);
    assert_eq!(closed, opened, "every flow opened is closed once");
    assert_eq!(
        lines("close").len() as u64,
        accepted.len() as u64 + connects,
        "each printed opening has its CLOSE"
    );
    let established = lines("establish").len() as u64 + total(&["established"]);
    assert!(
        established <= opened && opened - established <= lost,
        "{established} of {opened} flows established (every query was answered), udpmon lost {lost}"
    );
    // A flow whose answer's record was lost closes as never established.
    let never = total(&["never_established"]);
    assert!(
        never <= lost,
        "{never} flows never established, udpmon lost {lost}"
    );
    // The open count carries from one summary to the next, down to 0 at the close.
    let mut open = 0;
    for v in &summaries {
        assert_eq!(v["scope"], "socket", "{v}");
        open = open + n(v, &["new_flows"]) - n(v, &["closed"]);
        assert_eq!(n(v, &["open"]), open, "{v}");
    }
    assert_eq!(open, 0);
    assert!(summaries.len() >= 2, "a periodic summary and the last one");

    // The rejected answers: each one problem, a few printed one by one, the rest folded.
    let unreachable = lines("unreachable");
    assert!(
        !unreachable.is_empty(),
        "no UNREACHABLE printed for dnsmasq"
    );
    for v in &unreachable {
        assert!(REJECTED.contains(&client_port(v)), "{v}");
        assert_eq!(v["icmp"]["type"], 3, "{v}");
        assert_eq!(v["icmp"]["code"], 3, "{v}");
        assert_eq!(v["icmp"]["from"], CLIENT4, "{v}");
    }
    let problems: u64 = ["notified", "queued", "discarded"]
        .iter()
        .map(|k| total(&["problems", "unreachable", k]))
        .sum();
    let folded = total(&["folded", "unreachable"]);
    let rejected = REJECTED.len() as u64;
    assert!(
        rejected.saturating_sub(problems) <= lost,
        "{problems} of {rejected} rejected answers counted, udpmon lost {lost}"
    );
    assert!(
        problems <= rejected,
        "{problems} problems from {rejected} rejected answers"
    );
    assert_eq!(
        unreachable.len() as u64,
        problems - folded,
        "printed UNREACHABLE = problems - folded"
    );
    assert!(folded > 0, "{problems} problems, none folded");
    assert!(
        unreachable.len() as u64 <= PROBLEM_LINES * summaries.len() as u64,
        "{} UNREACHABLE lines in {} intervals",
        unreachable.len(),
        summaries.len()
    );
    for v in &summaries {
        let printed = n(v, &["problems", "unreachable", "discarded"])
            + n(v, &["problems", "unreachable", "notified"])
            + n(v, &["problems", "unreachable", "queued"])
            - n(v, &["folded", "unreachable"]);
        assert!(printed <= PROBLEM_LINES, "{v}");
    }
    Outcome::Pass
}

/// `--no-summary`: every flow of the busy socket has its ACCEPT.
pub fn busy_dns_server_no_summary(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["dnsmasq", "ip"]) {
        return o;
    }
    let h = TwoHosts::new("bn");
    let mut u = Udpmon::start(st, &["--comm", "dnsmasq", "--no-summary"]).expect("udpmon starts");
    let mut dm = dnsmasq(&h);
    let pid = u64::from(dm.id());
    let sent = FIRST_PORT..FIRST_PORT + 300;
    assert_eq!(burst(&h, sent.clone()), sent.len());
    let want: BTreeSet<u16> = sent.collect();
    // Every ACCEPT comes, unless udpmon lost its record, which it then says at exit: wait
    // for all of them, or until they stop coming.
    let mut ports = BTreeSet::new();
    let mut progress = Instant::now();
    while ports != want && progress.elapsed() < deadline(5) {
        let now: BTreeSet<u16> = u
            .all(|v| is(v, "accept") && of_dnsmasq(v, pid))
            .iter()
            .map(client_port)
            .collect();
        if now.len() > ports.len() {
            progress = Instant::now();
        }
        ports = now;
    }
    assert!(
        ports.is_subset(&want),
        "ACCEPTs from ports that sent nothing"
    );
    sigterm(&mut dm);
    // A flow whose query's record was lost opened on the answer: it closes all the same.
    wait_until("dnsmasq's closes", 30, || {
        u.all(|v| is(v, "close") && of_dnsmasq(v, pid)).len() >= ports.len()
    });
    let summaries = u.all(|v| is(v, "summary"));
    assert!(summaries.is_empty(), "--no-summary: {summaries:?}");
    let (status, stderr) = u.stop();
    assert!(status.success(), "udpmon after SIGTERM: {status}");
    let lost = losses(&stderr);
    let missing = (want.len() - ports.len()) as u64;
    assert!(
        missing <= lost,
        "{missing} of {} ACCEPTs missing, while udpmon says it lost {lost}: {stderr:?}",
        want.len()
    );
    Outcome::Pass
}
