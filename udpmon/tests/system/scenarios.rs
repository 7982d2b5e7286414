//! The scenarios. Each asserts the fields of the events, not only that events came.
use std::io::Write as _;

use serde_json::Value;

use crate::{
    harness::{
        CLIENT4, CLIENT6, Outcome, SERVER4, SERVER6, Scenario, Strategy, TwoHosts, Udpmon, is,
        need_tools, read_line, s, spawn_in, udp_socket_in, wait_until,
    },
    util::{addr, wait_until_bound},
};

pub const ALL: &[Scenario] = &[
    Scenario {
        name: "smoke",
        run: smoke,
    },
    Scenario {
        name: "seed_ipv4",
        run: |st| seed(st, false),
    },
    Scenario {
        name: "seed_ipv6",
        run: |st| seed(st, true),
    },
    // Issue 5: real-world UDP patterns.
    Scenario {
        name: "peers_discarded_ipv4",
        run: |st| crate::peers::peers(st, false, false),
    },
    Scenario {
        name: "peers_queued_ipv4",
        run: |st| crate::peers::peers(st, false, true),
    },
    Scenario {
        name: "peers_discarded_ipv6",
        run: |st| crate::peers::peers(st, true, false),
    },
    Scenario {
        name: "peers_queued_ipv6",
        run: |st| crate::peers::peers(st, true, true),
    },
    Scenario {
        name: "peers_same_port_two_netns",
        run: crate::peers::same_port_two_netns,
    },
    Scenario {
        name: "refused_flood_rate_limited",
        run: crate::peers::refused_flood,
    },
    Scenario {
        name: "dns_dnsmasq_dig",
        run: crate::dns::dns,
    },
    Scenario {
        name: "silent_nft_drop",
        run: crate::firewall::silent_drop,
    },
    // Issue 11: ticks skip sleeping flows; the kernel's wake record brings them back.
    Scenario {
        name: "wakes_after_quiet",
        run: crate::sleep::wakes_after_quiet,
    },
    // A close the ring lost is found by a dump of the open sockets.
    Scenario {
        name: "lost_closes_recovered",
        run: crate::lost::lost_closes_recovered,
    },
    Scenario {
        name: "nft_reject_admin_ipv4",
        run: |st| crate::firewall::reject_admin(st, false),
    },
    Scenario {
        name: "nft_reject_admin_ipv6",
        run: |st| crate::firewall::reject_admin(st, true),
    },
    // Issue 15: a resolver's upstream, silent across fresh sockets (peer scope).
    Scenario {
        name: "forwarder_upstream_dropped",
        run: crate::forwarder::upstream_dropped,
    },
    Scenario {
        name: "forwarder_upstream_rejects",
        run: |st| crate::forwarder::upstream_rejects(st, true),
    },
    Scenario {
        name: "forwarder_upstream_rejects_no_summary",
        run: |st| crate::forwarder::upstream_rejects(st, false),
    },
    // Issue 11, item 6: a busy socket's flows in summaries.
    Scenario {
        name: "busy_dns_server",
        run: crate::busy::busy_dns_server,
    },
    Scenario {
        name: "busy_dns_server_no_summary",
        run: crate::busy::busy_dns_server_no_summary,
    },
    Scenario {
        name: "socat_relay_burst",
        run: crate::relay::socat_relay,
    },
    Scenario {
        name: "disconnect_reconnect",
        run: crate::relay::reconnect,
    },
    Scenario {
        name: "reconnect_back",
        run: crate::relay::reconnect_back,
    },
    // Issue 3, point 8: every send and receive syscall variant.
    Scenario {
        name: "syscalls_ipv4",
        run: |st| crate::syscalls::syscalls(st, false),
    },
    Scenario {
        name: "syscalls_ipv6",
        run: |st| crate::syscalls::syscalls(st, true),
    },
    Scenario {
        name: "netns_after_start",
        run: netns_after_start,
    },
    Scenario {
        name: "thread_and_process_names",
        run: thread_and_process_names,
    },
    // Issue 12, point 1: the process that holds the socket now.
    Scenario {
        name: "holder_double_fork",
        run: crate::holders::double_fork,
    },
    Scenario {
        name: "holder_fd_passing",
        run: crate::holders::fd_passing,
    },
    Scenario {
        name: "holder_passed_receiver",
        run: crate::holders::passed_receiver,
    },
    Scenario {
        name: "holder_shared",
        run: crate::holders::shared,
    },
    Scenario {
        name: "holder_exit_then_idle",
        run: crate::holders::exit_then_idle,
    },
    Scenario {
        name: "holder_preexisting",
        run: crate::holders::preexisting,
    },
    Scenario {
        name: "holder_exec",
        run: crate::holders::exec,
    },
    Scenario {
        name: "holder_socket_activation",
        run: crate::holders::socket_activation,
    },
    Scenario {
        name: "holder_reuseport_group",
        run: crate::holders::reuseport_group,
    },
    Scenario {
        name: "dualstack_v4_mapped",
        run: crate::dualstack::v4_mapped,
    },
    Scenario {
        name: "sigkill_nc",
        run: crate::kill::sigkill_nc,
    },
    Scenario {
        name: "unprivileged",
        run: crate::behaviour::unprivileged,
    },
    Scenario {
        name: "capabilities",
        run: crate::behaviour::capabilities,
    },
    Scenario {
        name: "bad_flag",
        run: crate::behaviour::bad_flag,
    },
    Scenario {
        name: "sigint",
        run: crate::behaviour::sigint,
    },
    Scenario {
        name: "closed_stdout",
        run: crate::behaviour::closed_stdout,
    },
    Scenario {
        name: "zone_change",
        run: crate::behaviour::zone_change,
    },
    // Issue 13: udpmon as a production log writer.
    Scenario {
        name: "sighup_reopens_output",
        run: crate::logfiles::sighup_reopens,
    },
    Scenario {
        name: "full_disk",
        run: crate::logfiles::full_disk,
    },
    Scenario {
        name: "notify_ready",
        run: crate::behaviour::notify_ready,
    },
    Scenario {
        name: "journal_entries",
        run: crate::journald::journal_entries,
    },
    // Issue 13, item 1: --metrics, scraped by a real Prometheus.
    Scenario {
        name: "metrics_prometheus",
        run: crate::metrics::prometheus,
    },
    // Issue 14, item 3: events of a process in a real podman container name it.
    Scenario {
        name: "podman_container",
        run: crate::containers::podman_container,
    },
    // Issue 14: and so are those of a socket it opened before udpmon started.
    Scenario {
        name: "podman_preexisting",
        run: crate::containers::podman_preexisting,
    },
    // Issue 14, item 1: Kubernetes names from a real containerd's CRI runtime service.
    Scenario {
        name: "cri_containerd",
        run: crate::cri::cri_containerd,
    },
];

/// Issue 12, point 1 (names): a program that sends from a thread with its own name (dig's
/// `isc-net-0000`) is named by both: `comm` the thread, `process` the program, and
/// `--comm PROGRAM` finds it.
fn thread_and_process_names(st: Strategy) -> Outcome {
    let process = std::fs::read_to_string("/proc/self/comm").unwrap();
    let process = process.trim_end().to_string();
    let mut u = Udpmon::start(st, &["--comm", &process]).expect("udpmon starts");
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = rx.local_addr().unwrap();
    let local = std::thread::Builder::new()
        .name("isc-net-0000".into())
        .spawn(move || {
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send_to(b"names", to).unwrap();
            tx.local_addr().unwrap().to_string()
        })
        .unwrap()
        .join()
        .unwrap();
    let c = u.wait_for("the named thread's connect", |v| {
        is(v, "connect") && s(v, "local") == local
    });
    assert_eq!(s(&c, "comm"), "isc-net-0000", "{c}");
    assert_eq!(s(&c, "process"), process, "{c}");
    assert_eq!(c["pid"], std::process::id(), "{c}");
    Outcome::Pass
}

/// Issue 12, point 4: network namespaces created after udpmon started are named in the first
/// events of their sockets, the second pair too, although its namespaces appear right after
/// the first pair made udpmon look.
fn netns_after_start(st: Strategy) -> Outcome {
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    for (tag, cport) in [("na", 7101), ("nb", 7102)] {
        let h = TwoHosts::new(tag);
        let srv = udp_socket_in(&h.server, "10.200.0.2:7000");
        let cli = udp_socket_in(&h.client, &addr(CLIENT4, cport));
        cli.send_to(b"ns", "10.200.0.2:7000").unwrap();
        let mut buf = [0u8; 8];
        srv.recv_from(&mut buf).unwrap();
        let local = addr(CLIENT4, cport);
        let c = u.wait_for("connect", |v| {
            is(v, "connect") && s(v, "local") == local && s(v, "remote") == "10.200.0.2:7000"
        });
        assert_eq!(c["netns"], TwoHosts::netns_inode(&h.client), "{tag}: {c}");
        let a = u.wait_for("accept", |v| {
            is(v, "accept") && s(v, "local") == "10.200.0.2:7000" && s(v, "remote") == local
        });
        assert_eq!(a["netns"], TwoHosts::netns_inode(&h.server), "{tag}: {a}");
    }
    Outcome::Pass
}

/// The pipeline end to end: a program attached, one datagram sent, its events out of the
/// ring buffer and through the engine into udpmon's JSON output.
fn smoke(st: Strategy) -> Outcome {
    let h = TwoHosts::new("sm");
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let srv = udp_socket_in(&h.server, "10.200.0.2:7000");
    let cli = udp_socket_in(&h.client, "10.200.0.1:0");
    let cport = cli.local_addr().unwrap().port();
    cli.send_to(b"smoke", "10.200.0.2:7000").unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = srv.recv_from(&mut buf).unwrap();
    assert_eq!((n, from.port()), (5, cport));

    let me = std::process::id() as u64;
    let local = addr(CLIENT4, cport);
    let c = u.wait_for("connect", |v| {
        is(v, "connect") && s(v, "local") == local && s(v, "remote") == "10.200.0.2:7000"
    });
    assert_eq!(c["pid"], me, "{c}");
    assert_eq!(c["family"], "ipv4");
    assert_eq!(c["netns"], TwoHosts::netns_inode(&h.client), "{c}");
    assert!(c["cookie"].as_u64().unwrap() > 0, "{c}");
    let a = u.wait_for("accept", |v| {
        is(v, "accept") && s(v, "local") == "10.200.0.2:7000" && s(v, "remote") == local
    });
    assert_eq!(a["pid"], me, "{a}");
    assert_eq!(a["netns"], TwoHosts::netns_inode(&h.server), "{a}");
    assert_ne!(a["cookie"], c["cookie"]);
    let (status, _) = u.stop();
    assert!(
        status.success(),
        "udpmon exit status after SIGTERM: {status}"
    );
    Outcome::Pass
}

/// shared/seed/udp-connections-with-netcat.md, both hosts, with Debian's netcat-openbsd.
pub fn seed(st: Strategy, v6: bool) -> Outcome {
    if let Err(o) = need_tools(&["nc", "ip"]) {
        return o;
    }
    let (cip, sip) = if v6 {
        (CLIENT6, SERVER6)
    } else {
        (CLIENT4, SERVER4)
    };
    let h = TwoHosts::new(if v6 { "s6" } else { "s4" });
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let srv_local = addr(sip, 12345);
    let cli_local = addr(cip, 54321);

    // jim@remote:~$ nc -u -l 0.0.0.0 12345
    let mut server = spawn_in(&h.server, "nc", &["-u", "-l", sip, "12345"]);
    // Wait for the server's socket rather than sleeping.
    wait_until_bound(&h.server, 12345, v6);
    // jim@local:~$ nc -u -p 54321 <server> 12345
    let mut client = spawn_in(&h.client, "nc", &["-u", "-p", "54321", sip, "12345"]);
    let (cpid, spid) = (client.id() as u64, server.id() as u64);

    // CONNECT comes from nc's connect(), before any packet.
    let c = u.wait_for("client connect", |v| {
        is(v, "connect") && v["pid"] == cpid && s(v, "remote") == srv_local
    });
    assert_eq!(s(&c, "comm"), "nc");
    assert!(
        !u.all(|v| v["pid"] == spid).iter().any(|v| is(v, "accept")),
        "the server must not know of the client before the first datagram"
    );

    client.stdin.as_mut().unwrap().write_all(b"hi\n").unwrap();
    assert_eq!(read_line(&mut server, 10), "hi\n");
    let acc = u.wait_for("server accept", |v| {
        is(v, "accept") && v["pid"] == spid && s(v, "remote") == cli_local
    });
    assert_eq!(s(&acc, "local"), srv_local);
    assert_eq!(s(&acc, "comm"), "nc");

    server.stdin.as_mut().unwrap().write_all(b"ack\n").unwrap();
    assert_eq!(read_line(&mut client, 10), "ack\n");
    let est_c = u.wait_for("client establish", |v| {
        is(v, "establish") && v["pid"] == cpid && s(v, "remote") == srv_local
    });
    let est_s = u.wait_for("server establish", |v| {
        is(v, "establish") && v["pid"] == spid && s(v, "remote") == cli_local
    });
    assert_eq!(est_c["cookie"], c["cookie"]);
    assert_eq!(est_s["cookie"], acc["cookie"]);

    // ^C on the server.
    server.kill().unwrap();
    server.wait().unwrap();
    let close = u.wait_for("server close", |v| {
        is(v, "close") && v["cookie"] == acc["cookie"]
    });
    assert_eq!(close["pid"], spid, "{close}");
    assert_eq!(close["stats"]["rx_datagrams"], 1, "{close}");
    assert_eq!(close["stats"]["tx_datagrams"], 1, "{close}");
    assert_eq!(close["stats"]["rx_bytes"], 3, "{close}");
    assert_eq!(close["stats"]["tx_bytes"], 4, "{close}");

    // "hello..?" to the dead server: ICMP port unreachable, delivered to the connected nc.
    client
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello..?\n")
        .unwrap();
    let un = u.wait_for("client unreachable", |v| {
        is(v, "unreachable") && v["cookie"] == c["cookie"]
    });
    let icmp = &un["icmp"];
    let (ty, code) = if v6 { (1, 4) } else { (3, 3) };
    assert_eq!(
        (icmp["type"].clone(), icmp["code"].clone()),
        (Value::from(ty), Value::from(code)),
        "{un}"
    );
    assert_eq!(icmp["verdict"], "notified", "{un}");
    assert_eq!(icmp["errno"], "ECONNREFUSED", "{un}");
    assert_eq!(icmp["from"], sip, "{un}");
    assert_eq!(s(&un, "local"), cli_local);
    assert_eq!(s(&un, "remote"), srv_local);

    if !u.without_refused() {
        let refused = u.wait_for("server-side refused", |v| {
            is(v, "refused") && s(v, "local") == srv_local && s(v, "remote") == cli_local
        });
        assert_eq!(
            refused["netns"],
            TwoHosts::netns_inode(&h.server),
            "{refused}"
        );
    }

    // nc learns of the error at its next call and exits.
    wait_until("client nc to exit", 10, || {
        client.try_wait().unwrap().is_some()
    });

    // The client's story, in order.
    let story: Vec<String> = u
        .all(|v| v["cookie"] == c["cookie"])
        .iter()
        .map(|v| s(v, "event").to_string())
        .filter(|e| e != "app-error" && e != "close")
        .collect();
    assert_eq!(
        story,
        ["connect", "establish", "unreachable"],
        "{}",
        u.dump()
    );
    let server_story: Vec<String> = u
        .all(|v| v["cookie"] == acc["cookie"])
        .iter()
        .map(|v| s(v, "event").to_string())
        .collect();
    assert_eq!(
        server_story,
        ["accept", "establish", "close"],
        "{}",
        u.dump()
    );
    Outcome::Pass
}
