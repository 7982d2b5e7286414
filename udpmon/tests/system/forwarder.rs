//! Issue 15: a DNS forwarder whose upstream vanishes. dnsmasq forwards each query from a
//! fresh socket and port, so each of its flows to the upstream carries one query: when the
//! upstream stops answering, no flow is established and only a peer-scope SILENT can say so.
//!
//! The forwarder (dnsmasq on 10.200.0.1:5300, no cache) and dig share the client namespace;
//! the upstream, a second dnsmasq answering for test.example on 10.200.0.2:5353, has the
//! server namespace, where nftables drops or rejects.
//!
//! - `forwarder_upstream_dropped`: answered queries, then the upstream's namespace drops all
//!   input: SILENT with scope peer, naming dnsmasq and the upstream; the drop goes and a query
//!   is answered: RESUMED with scope peer. Never a flow-scope SILENT for those flows.
//! - `forwarder_upstream_rejects`: the upstream rejects with ICMP port unreachable:
//!   UNREACHABLE, and no SILENT for the upstream, though as many queries go out for longer
//!   than `--silent-after`. The errors are one run for the peer (issue 15, item 3): its
//!   first UNREACHABLE printed, the next ones counted in SUMMARY lines with scope peer; with
//!   `--no-summary`, one UNREACHABLE per query.
use std::{
    net::UdpSocket,
    process::Child,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    harness::{
        CLIENT4, Outcome, SERVER4, Strategy, TwoHosts, Udpmon, deadline, in_netns, is, need_tools,
        s, spawn_in, wait_until,
    },
    util::{addr, nft, output_of, sigterm, wait_until_bound},
};

const FWD_PORT: u16 = 5300;
const UP_PORT: u16 = 5353;
/// `--silent-after` of these scenarios, in seconds.
const SILENT_AFTER: u64 = 2;

fn dnsmasq(netns: &str, port: u16, extra: &[&str]) -> Child {
    let port_arg = format!("--port={port}");
    let mut args = vec![
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &port_arg,
        "--user=root",
        "--pid-file=",
    ];
    args.extend_from_slice(extra);
    let c = spawn_in(netns, "dnsmasq", &args);
    wait_until_bound(netns, port, false);
    c
}

struct Dns {
    h: TwoHosts,
    upstream: Child,
    forwarder: Child,
    /// Queries so far, for names the forwarder has never asked (it caches nothing anyway).
    queries: u32,
}

impl Dns {
    fn start(tag: &str) -> Dns {
        let h = TwoHosts::new(tag);
        let up_listen = format!("--listen-address={SERVER4}");
        let upstream = dnsmasq(
            &h.server,
            UP_PORT,
            &[&up_listen, "--address=/test.example/10.9.9.9"],
        );
        let fwd_listen = format!("--listen-address={CLIENT4}");
        let server = format!("--server={SERVER4}#{UP_PORT}");
        let forwarder = dnsmasq(
            &h.client,
            FWD_PORT,
            &[&fwd_listen, &server, "--cache-size=0"],
        );
        Dns {
            h,
            upstream,
            forwarder,
            queries: 0,
        }
    }

    fn forwarder_pid(&self) -> u64 {
        u64::from(self.forwarder.id())
    }

    /// One dig through the forwarder, waiting `secs` for the answer; whether it got it.
    fn query(&mut self, secs: u32) -> bool {
        self.queries += 1;
        let name = format!("q{}.test.example", self.queries);
        let server = format!("@{CLIENT4}");
        let port = FWD_PORT.to_string();
        let time = format!("+time={secs}");
        let mut c = spawn_in(
            &self.h.client,
            "dig",
            &[
                &server, "-p", &port, &name, "A", "+tries=1", &time, "+short",
            ],
        );
        wait_until("dig to finish", 20, || c.try_wait().unwrap().is_some());
        let ok = c.try_wait().unwrap().unwrap().success();
        let out = output_of(c);
        ok && out.trim() == "10.9.9.9"
    }

    fn stop(mut self) {
        sigterm(&mut self.forwarder);
        sigterm(&mut self.upstream);
    }
}

impl Drop for Dns {
    /// A failed scenario must not leave its daemons running (the namespaces go next).
    fn drop(&mut self) {
        for c in [&mut self.forwarder, &mut self.upstream] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn upstream() -> String {
    addr(SERVER4, UP_PORT)
}

/// A SILENT or RESUMED about the forwarder's upstream, of either scope.
fn about_upstream(v: &Value, event: &str, fwd: u64) -> bool {
    is(v, event) && v["pid"] == fwd && s(v, "remote") == upstream()
}

fn peer_scope(v: &Value) -> bool {
    v["scope"] == "peer"
}

/// Answered queries first: the forwarder's flows to the upstream are established.
fn answered_queries(dns: &mut Dns, u: &mut Udpmon) {
    for _ in 0..3 {
        assert!(dns.query(5), "a query answered through the forwarder");
    }
    let fwd = dns.forwarder_pid();
    let est = u.wait_for("the forwarder's establish", |v| {
        is(v, "establish") && v["pid"] == fwd && s(v, "remote") == upstream()
    });
    assert_eq!(s(&est, "process"), "dnsmasq", "{est}");
    assert!(
        s(&est, "local").starts_with(&format!("{CLIENT4}:")),
        "{est}"
    );
}

pub fn upstream_dropped(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["dnsmasq", "dig", "nft", "ip"]) {
        return o;
    }
    let silent_after = format!("{SILENT_AFTER}s");
    let mut u = Udpmon::start(st, &["--silent-after", &silent_after]).expect("udpmon starts");
    let mut dns = Dns::start("fw");
    let fwd = dns.forwarder_pid();
    let client_ns = TwoHosts::netns_inode(&dns.h.client);
    answered_queries(&mut dns, &mut u);

    // The upstream's namespace drops everything: no answer, no ICMP.
    nft(
        &dns.h.server,
        "table inet udpmon_fwd_drop {\n  chain input {\n    type filter hook input priority 0; policy drop;\n  }\n}\n",
    );
    let dropped_at = Instant::now();
    let end = Instant::now() + deadline(30);
    let silent = loop {
        assert!(!dns.query(1), "a query answered through the drop");
        if let Some(v) = u
            .all(|v| about_upstream(v, "silent", fwd))
            .into_iter()
            .next()
        {
            break v;
        }
        assert!(
            Instant::now() < end,
            "no SILENT for the upstream within {:?}; udpmon printed:\n{}",
            deadline(30),
            u.dump()
        );
    };
    assert!(peer_scope(&silent), "scope: {silent}");
    assert_eq!(s(&silent, "process"), "dnsmasq", "{silent}");
    assert_eq!(silent["netns"], client_ns, "{silent}");
    assert_eq!(silent["cookie"], 0, "{silent}");
    // A fresh port per query: the local address without one.
    assert_eq!(s(&silent, "local"), addr(CLIENT4, 0), "{silent}");
    let flows = silent["flows"].as_u64().unwrap();
    let sends = silent["sends"].as_u64().unwrap();
    assert!(flows >= 2 && sends >= flows, "{silent}");
    assert!(
        u64::from(dns.queries) - 3 >= flows,
        "{flows} unanswered flows from {} queries through the drop: {silent}",
        dns.queries - 3
    );
    assert_eq!(silent["never_answered"], false, "{silent}");
    assert!(silent["last_answer"].is_string(), "{silent}");
    let unanswered = silent["unanswered_ms"].as_u64().unwrap();
    assert!(
        unanswered >= SILENT_AFTER * 1000
            && unanswered <= dropped_at.elapsed().as_millis() as u64 + 1000,
        "unanswered_ms {unanswered}: {silent}"
    );
    assert!(
        silent["no_reply_ms"].as_u64().unwrap() >= unanswered,
        "{silent}"
    );

    // The drop goes: the next query is answered.
    nft(&dns.h.server, "delete table inet udpmon_fwd_drop\n");
    let end = Instant::now() + deadline(20);
    while !dns.query(2) {
        assert!(Instant::now() < end, "no answer after the drop went");
    }
    let resumed = u.wait_for("the upstream's resumed", |v| {
        about_upstream(v, "resumed", fwd)
    });
    assert!(peer_scope(&resumed), "scope: {resumed}");
    assert_eq!(resumed["after"], "silent", "{resumed}");
    // The same answer, formatted at another tick: the boot-to-wall offset is re-read every
    // tick, and its two clock reads drift by microseconds (more in an emulated VM).
    let at = |v: &Value| -> jiff::Timestamp {
        s(v, "last_answer")
            .parse()
            .unwrap_or_else(|e| panic!("last_answer: {e}: {v}"))
    };
    let drift = at(&resumed).duration_since(at(&silent)).abs();
    assert!(
        drift < jiff::SignedDuration::from_millis(5),
        "last_answer moved by {drift:?}: {resumed} after {silent}"
    );
    assert!(
        resumed["flows"].as_u64().unwrap() >= flows,
        "{resumed} after {silent}"
    );
    assert!(
        resumed["quiet_ms"].as_u64().unwrap() >= unanswered,
        "{resumed}"
    );

    // One report per silence, at peer scope only; the RESUMED after the SILENT.
    let reports = u.all(|v| {
        (is(v, "silent") || is(v, "resumed")) && s(v, "remote") == upstream() && v["pid"] == fwd
    });
    let story: Vec<(&str, &str)> = reports
        .iter()
        .map(|v| (s(v, "event"), s(v, "scope")))
        .collect();
    assert_eq!(
        story,
        [("silent", "peer"), ("resumed", "peer")],
        "{}",
        u.dump()
    );
    dns.stop();
    Outcome::Pass
}

/// A datagram from this test process, and its CONNECT awaited: udpmon has read everything
/// that happened before it.
fn caught_up(u: &mut Udpmon, netns: &str) {
    let sock = in_netns(netns, move || UdpSocket::bind(addr(CLIENT4, 0)).unwrap());
    let local = sock.local_addr().unwrap().to_string();
    sock.send_to(b"marker", addr(SERVER4, 9)).unwrap();
    u.wait_for("the marker's connect", |v| {
        is(v, "connect") && s(v, "local") == local
    });
}

pub fn upstream_rejects(st: Strategy, summary: bool) -> Outcome {
    if let Err(o) = need_tools(&["dnsmasq", "dig", "nft", "ip"]) {
        return o;
    }
    let silent_after = format!("{SILENT_AFTER}s");
    let mut args = vec!["--silent-after", &silent_after];
    args.extend(if summary {
        ["--summary-interval", "2s"].as_slice()
    } else {
        ["--no-summary"].as_slice()
    });
    let mut u = Udpmon::start(st, &args).expect("udpmon starts");
    let mut dns = Dns::start(if summary { "fr" } else { "fn" });
    let fwd = dns.forwarder_pid();
    answered_queries(&mut dns, &mut u);

    nft(
        &dns.h.server,
        &format!(
            "table ip udpmon_fwd_reject {{\n  chain input {{\n    type filter hook input priority 0;\n    udp dport {UP_PORT} reject with icmp type port-unreachable\n  }}\n}}\n"
        ),
    );
    // The forwarder's own flow, or (its socket gone by then) the port's last owner.
    let refused = |v: &Value| {
        is(v, "unreachable")
            && s(v, "remote") == upstream()
            && (v["pid"] == fwd || v["last_owner"]["pid"] == fwd)
    };
    // The forwarder's summary of the errors it drew from the upstream after the first.
    let folded = |v: &Value| {
        is(v, "summary") && v["scope"] == "peer" && s(v, "remote") == upstream() && v["pid"] == fwd
    };
    // Queries keep going out for longer than --silent-after (plus a tick) after the first
    // error: the SILENT rule would have fired on them by then, were errors a silence. With
    // the summaries, until one of them counted at least two folded errors.
    let window = Duration::from_secs(SILENT_AFTER + 2);
    let mut first_error: Option<Instant> = None;
    let end = Instant::now() + deadline(30);
    loop {
        assert!(!dns.query(1), "a query answered through the reject");
        if first_error.is_none() && !u.all(refused).is_empty() {
            first_error = Some(Instant::now());
        }
        let enough = if summary {
            u.all(folded)
                .iter()
                .map(|v| v["folded"]["unreachable"].as_u64().unwrap_or(0))
                .sum::<u64>()
                >= 2
        } else {
            u.all(refused).len() >= 3
        };
        if first_error.is_some_and(|t| t.elapsed() >= window) && enough {
            break;
        }
        assert!(
            Instant::now() < end,
            "not enough UNREACHABLE (or summaries of them) for the upstream within {:?}; udpmon printed:\n{}",
            deadline(30),
            u.dump()
        );
    }
    caught_up(&mut u, &dns.h.client);
    let un = u.all(refused);
    if summary {
        // One run: its first error printed at once, the rest counted.
        assert_eq!(un.len(), 1, "{}", u.dump());
        let sums = u.all(folded);
        for v in &sums {
            assert_eq!(v["cookie"], 0, "{v}");
            assert_eq!(s(v, "process"), "dnsmasq", "{v}");
            assert_eq!(v["icmp"]["type"], 3, "{v}");
            assert_eq!(v["icmp"]["code"], 3, "{v}");
            let p = &v["problems"]["unreachable"];
            let all: u64 = ["notified", "queued", "discarded", "no_socket"]
                .iter()
                .map(|k| p[k].as_u64().unwrap())
                .sum();
            let f = v["folded"]["unreachable"].as_u64().unwrap();
            assert!(f >= 1 && f <= all, "{v}");
            // The run's verdict is the first error's.
            let verdict = s(&v["icmp"], "verdict").replace('-', "_");
            assert_eq!(p[verdict.as_str()].as_u64(), Some(all), "{v}");
        }
        // Every query after the first drew an error: printed once, counted after.
        let counted: u64 = sums
            .iter()
            .map(|v| v["folded"]["unreachable"].as_u64().unwrap())
            .sum();
        assert!(
            counted < u64::from(dns.queries) - 3,
            "{counted} folded from {} rejected queries",
            dns.queries - 3
        );
    } else {
        assert!(un.len() >= 3, "{}", u.dump());
        assert!(u.all(|v| is(v, "summary")).is_empty(), "{}", u.dump());
    }
    let first = &un[0];
    assert_eq!(first["icmp"]["type"], 3, "{first}");
    assert_eq!(first["icmp"]["code"], 3, "{first}");
    assert_eq!(first["icmp"]["from"], SERVER4, "{first}");
    assert_eq!(first["icmp"]["errno"], "ECONNREFUSED", "{first}");
    let silences = u.all(|v| (is(v, "silent") || is(v, "resumed")) && s(v, "remote") == upstream());
    assert!(
        silences.is_empty(),
        "ICMP errors are not a silence: {silences:?}"
    );
    dns.stop();
    Outcome::Pass
}
