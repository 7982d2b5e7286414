//! A flow that goes quiet sleeps: udpmon's ticks stop reading its counters until its idle
//! expiry, and only the kernel's wake record (a datagram after more than a second of quiet)
//! tells udpmon that it moves again. This scenario makes each of its transitions happen
//! after such a quiet: the client sends again to a peer that no longer answers (SILENT),
//! then the peer answers again (RESUMED). With `--idle-timeout 60s`, a wake that did not
//! come would leave both unreported for a minute, past every wait here.
use std::{thread, time::Duration};

use crate::{
    firewall::wait_connect,
    harness::{CLIENT4, Outcome, SERVER4, Strategy, TwoHosts, Udpmon, is, udp_socket_in},
    peers::my_comm,
    util::{Who, addr, assert_event, assert_story, local_of, of_flow},
};

/// Long enough for a tick to find the flow quiet for two seconds (ticks come once a second)
/// and put it to sleep. The quiet itself is what the scenario is about, not a wait for
/// something else.
const QUIET: Duration = Duration::from_millis(3500);

pub fn wakes_after_quiet(st: Strategy) -> Outcome {
    let h = TwoHosts::new("zz");
    let mut u = Udpmon::start(
        st,
        &[
            "--silent-after",
            "1s",
            "--silent-min-sends",
            "2",
            "--idle-timeout",
            "60s",
        ],
    )
    .expect("udpmon starts");
    let comm = my_comm();
    let (cli, _) = Who::test_process(&h, &comm);
    let server = addr(SERVER4, 7400);
    let ssock = udp_socket_in(&h.server, &server);
    let csock = udp_socket_in(&h.client, &addr(CLIENT4, 0));
    csock.connect(&server).unwrap();
    let local = local_of(&csock);
    ssock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];

    csock.send(b"hello").unwrap();
    let (_, from) = ssock
        .recv_from(&mut buf)
        .expect("the server hears the client");
    ssock.send_to(b"hi", from).unwrap();
    let ck = wait_connect(&mut u, cli.pid, &server)["cookie"].clone();
    let est = u.wait_for("client establish", |v| {
        is(v, "establish") && of_flow(v, &ck, &server)
    });
    assert_event(&est, "establish", &cli, &local, &server);

    // Quiet both ways; then the client sends and the server no longer answers.
    thread::sleep(QUIET);
    for _ in 0..3 {
        csock.send(b"anyone?").unwrap();
        ssock
            .recv_from(&mut buf)
            .expect("the server hears the client");
        thread::sleep(Duration::from_millis(200));
    }
    let silent = u.wait_for("client silent", |v| {
        is(v, "silent") && of_flow(v, &ck, &server)
    });
    assert_event(&silent, "silent", &cli, &local, &server);
    assert!(
        silent["sends"].as_u64().unwrap() >= 2,
        "SILENT before --silent-min-sends: {silent}"
    );

    // Quiet again; then the server answers after all.
    thread::sleep(QUIET);
    ssock.send_to(b"late", from).unwrap();
    csock.recv(&mut buf).expect("the client hears the server");
    let resumed = u.wait_for("client resumed", |v| {
        is(v, "resumed") && of_flow(v, &ck, &server)
    });
    assert_event(&resumed, "resumed", &cli, &local, &server);
    assert_eq!(resumed["after"], "silent", "{resumed}");
    assert!(
        resumed["quiet_ms"].as_u64().unwrap() >= 3000,
        "the peer was quiet for the whole pause and the unanswered sends: {resumed}"
    );

    drop(csock);
    u.wait_for("client close", |v| {
        is(v, "close") && of_flow(v, &ck, &server)
    });
    assert_story(
        &mut u,
        "client",
        &ck,
        &server,
        &["connect", "establish", "silent", "resumed", "close"],
    );
    Outcome::Pass
}
