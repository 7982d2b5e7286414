//! Issue 5, scenario 2: a real DNS server (dnsmasq) and client (dig).
//!
//! dig opens a new connected UDP socket for every run, so after dnsmasq is restarted the next
//! query is a NEW flow (CONNECT/ESTABLISH on a new cookie), not a RESUMED of the flow that
//! drew the port unreachable: that flow was closed when its dig exited.
//!
//! Known failure on the tracepoint strategy (kept, not papered over): the CONNECT that the
//! cgroup connect4 hook reports for dig's connect() has `netns` 0 (the eBPF `set_owner`
//! overwrites the netns cookie that `on_connect` had just read) and `local` `0.0.0.0:0`
//! (the hook runs before connect() binds the socket), while every later event of the same
//! flow says `10.200.0.1:<port>` in the client namespace. Those checks come last, so that
//! everything else is verified before them.
use std::process::Child;

use serde_json::Value;

use crate::{
    harness::{CLIENT4, Outcome, SERVER4, Strategy, TwoHosts, Udpmon, is, need_tools, s, spawn_in},
    util::{
        Who, addr, assert_close, assert_connect, assert_event, assert_icmp, assert_story, of_flow,
        output_of, sigterm, wait_until_bound, wait_until_unbound,
    },
};

pub const PORT: u16 = 5353;

/// dnsmasq answering for `test.example` on the server side's PORT.
pub fn dnsmasq(h: &TwoHosts) -> Child {
    let listen = format!("--listen-address={SERVER4}");
    let port = format!("--port={PORT}");
    let c = spawn_in(
        &h.server,
        "dnsmasq",
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            &listen,
            "--bind-interfaces",
            &port,
            "--address=/test.example/10.9.9.9",
            "--user=root",
            "--pid-file=",
        ],
    );
    wait_until_bound(&h.server, PORT, false);
    c
}

/// Runs one `dig` query to completion; its pid, exit status and output.
fn dig(h: &TwoHosts) -> (u64, i32, String) {
    let port = PORT.to_string();
    let server = format!("@{SERVER4}");
    let mut c = spawn_in(
        &h.client,
        "dig",
        &[
            &server,
            "-p",
            &port,
            "test.example",
            "A",
            "+tries=1",
            "+time=2",
            "+short",
        ],
    );
    let pid = c.id() as u64;
    crate::harness::wait_until("dig to finish", 20, || c.try_wait().unwrap().is_some());
    let code = c.try_wait().unwrap().unwrap().code().unwrap_or(-1);
    (pid, code, output_of(c))
}

/// dig's flow to the server: its CONNECT (from connect(), before the query leaves).
fn dig_connect(u: &mut Udpmon, pid: u64, server: &str) -> Value {
    u.wait_for("dig's connect", |v| {
        is(v, "connect") && v["pid"] == pid && s(v, "remote") == server
    })
}

pub fn dns(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["dnsmasq", "dig", "ip"]) {
        return o;
    }
    let h = TwoHosts::new("dn");
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let server = addr(SERVER4, PORT);
    let (cli_ns, srv_ns) = (
        TwoHosts::netns_inode(&h.client),
        TwoHosts::netns_inode(&h.server),
    );

    // 1. A query answered.
    let mut dm = dnsmasq(&h);
    let dm_pid = dm.id() as u64;
    let dm_who = Who {
        pid: dm_pid,
        comm: "dnsmasq",
        netns: srv_ns,
    };
    let (pid1, rc, out) = dig(&h);
    assert_eq!((rc, out.trim()), (0, "10.9.9.9"), "dig output: {out}");
    let c1 = dig_connect(&mut u, pid1, &server);
    // dig (BIND 9) does its UDP on a network-manager thread: udpmon names the thread.
    let dig_comm = s(&c1, "comm").to_string();
    assert!(
        dig_comm == "dig" || dig_comm.starts_with("isc-"),
        "comm of dig's thread: {c1}"
    );
    let ck1 = c1["cookie"].clone();
    let est1 = u.wait_for("dig's establish", |v| {
        is(v, "establish") && of_flow(v, &ck1, &server)
    });
    // The flow's local address: dig's socket is bound by its connect().
    let local1 = s(&est1, "local").to_string();
    assert!(local1.starts_with(&format!("{CLIENT4}:")), "{est1}");
    let dig1 = Who {
        pid: pid1,
        comm: &dig_comm,
        netns: cli_ns,
    };
    assert_event(&est1, "establish", &dig1, &local1, &server);
    let close1 = u.wait_for("dig's close", |v| {
        is(v, "close") && of_flow(v, &ck1, &server)
    });
    assert_event(&close1, "close", &dig1, &local1, &server);
    assert_eq!(close1["stats"]["tx_datagrams"], 1, "{close1}");
    assert_eq!(close1["stats"]["rx_datagrams"], 1, "{close1}");
    let acc = u.wait_for("dnsmasq's accept", |v| {
        is(v, "accept") && s(v, "local") == server && s(v, "remote") == local1
    });
    assert_event(&acc, "accept", &dm_who, &server, &local1);
    let dm_ck = acc["cookie"].clone();
    let est = u.wait_for("dnsmasq's establish", |v| {
        is(v, "establish") && of_flow(v, &dm_ck, &local1)
    });
    assert_event(&est, "establish", &dm_who, &server, &local1);

    // 2. dnsmasq stopped: the next query draws a port unreachable, and dig is told.
    sigterm(&mut dm);
    wait_until_unbound(&h.server, PORT, false);
    let dm_close = u.wait_for("dnsmasq's close", |v| {
        is(v, "close") && of_flow(v, &dm_ck, &local1)
    });
    assert_event(&dm_close, "close", &dm_who, &server, &local1);
    let q_bytes = close1["stats"]["tx_bytes"].as_u64().unwrap();
    let a_bytes = close1["stats"]["rx_bytes"].as_u64().unwrap();
    assert_close(&dm_close, "closed", (1, a_bytes), (1, q_bytes));

    let (pid2, rc, out) = dig(&h);
    assert_eq!(rc, 9, "dig exit status with the server gone: {out}");
    assert!(out.contains("connection refused"), "dig output: {out}");
    let c2 = dig_connect(&mut u, pid2, &server);
    let ck2 = c2["cookie"].clone();
    assert_ne!(ck2, ck1, "a new dig, a new socket");
    let un = u.wait_for("dig's unreachable", |v| {
        is(v, "unreachable") && of_flow(v, &ck2, &server)
    });
    let local2 = s(&un, "local").to_string();
    assert!(local2.starts_with(&format!("{CLIENT4}:")), "{un}");
    let dig2 = Who {
        pid: pid2,
        ..dig1.clone()
    };
    assert_event(&un, "unreachable", &dig2, &local2, &server);
    assert_icmp(&un, 3, 3, SERVER4, "ECONNREFUSED", "notified");
    let app_errors = !u.without_app_errors();
    if app_errors {
        let ae = u.wait_for("dig's app-error", |v| {
            is(v, "app-error") && of_flow(v, &ck2, &server)
        });
        assert_event(&ae, "app-error", &dig2, &local2, &server);
        assert_eq!(ae["errno"], "ECONNREFUSED", "{ae}");
    }
    let close2 = u.wait_for("dig's close", |v| {
        is(v, "close") && of_flow(v, &ck2, &server)
    });
    assert_event(&close2, "close", &dig2, &local2, &server);
    assert_eq!(close2["stats"]["icmp_errors"], 1, "{close2}");
    assert_eq!(close2["stats"]["rx_datagrams"], 0, "{close2}");
    if !u.without_refused() {
        let refused = u.wait_for("server-side refused", |v| {
            is(v, "refused") && s(v, "local") == server && s(v, "remote") == local2
        });
        assert_eq!(refused["last_owner"]["pid"], dm_pid, "{refused}");
        assert_eq!(refused["last_owner"]["comm"], "dnsmasq", "{refused}");
    }

    // 3. dnsmasq restarted: the next dig is a new flow on a new socket, not a RESUMED.
    let mut dm2_child = dnsmasq(&h);
    let dm2 = Who {
        pid: dm2_child.id() as u64,
        ..dm_who.clone()
    };
    let (pid3, rc, out) = dig(&h);
    assert_eq!((rc, out.trim()), (0, "10.9.9.9"), "dig output: {out}");
    let c3 = dig_connect(&mut u, pid3, &server);
    let ck3 = c3["cookie"].clone();
    assert_ne!(ck3, ck2);
    let est3 = u.wait_for("dig's establish", |v| {
        is(v, "establish") && of_flow(v, &ck3, &server)
    });
    let local3 = s(&est3, "local").to_string();
    let dig3 = Who {
        pid: pid3,
        ..dig1.clone()
    };
    assert_event(&est3, "establish", &dig3, &local3, &server);
    u.wait_for("dig's close", |v| {
        is(v, "close") && of_flow(v, &ck3, &server)
    });
    let acc2 = u.wait_for("restarted dnsmasq's accept", |v| {
        is(v, "accept") && s(v, "local") == server && s(v, "remote") == local3
    });
    assert_event(&acc2, "accept", &dm2, &server, &local3);
    let dm2_ck = acc2["cookie"].clone();
    assert_ne!(dm2_ck, dm_ck);
    u.wait_for("restarted dnsmasq's establish", |v| {
        is(v, "establish") && of_flow(v, &dm2_ck, &local3)
    });
    sigterm(&mut dm2_child);
    u.wait_for("restarted dnsmasq's close", |v| {
        is(v, "close") && of_flow(v, &dm2_ck, &local3)
    });

    assert_story(
        &mut u,
        "dig 1",
        &ck1,
        &server,
        &["connect", "establish", "close"],
    );
    assert_story(
        &mut u,
        "dig 2 (server stopped)",
        &ck2,
        &server,
        if app_errors {
            &["connect", "unreachable", "app-error", "close"]
        } else {
            &["connect", "unreachable", "close"]
        },
    );
    assert_story(
        &mut u,
        "dig 3",
        &ck3,
        &server,
        &["connect", "establish", "close"],
    );
    assert_story(
        &mut u,
        "dnsmasq",
        &dm_ck,
        &local1,
        &["accept", "establish", "close"],
    );
    assert_story(
        &mut u,
        "restarted dnsmasq",
        &dm2_ck,
        &local3,
        &["accept", "establish", "close"],
    );
    // Last, because it fails on the tracepoint strategy (see the report of issue 5): the
    // CONNECT from dig's connect() must name the flow like every later event does.
    for (c, local, dig) in [
        (&c1, &local1, &dig1),
        (&c2, &local2, &dig2),
        (&c3, &local3, &dig3),
    ] {
        assert_connect(st, c, dig, local, &server);
    }
    Outcome::Pass
}
