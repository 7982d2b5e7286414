//! Issue 5, scenario 6: processes killed with SIGKILL while their sockets are open. The
//! kernel closes the sockets while tearing the process down; the CLOSE must still name the
//! process (pid and comm) that owned them, not the test or a kernel thread.
use std::io::Write as _;

use crate::{
    firewall::wait_connect,
    harness::{
        CLIENT4, Outcome, SERVER4, Strategy, TwoHosts, Udpmon, is, need_tools, read_line, s,
        spawn_in,
    },
    util::{
        Who, addr, assert_close, assert_connect, assert_event, assert_story, of_flow, sigkill,
        wait_until_bound,
    },
};

pub fn sigkill_nc(st: Strategy) -> Outcome {
    if let Err(o) = need_tools(&["nc", "ip"]) {
        return o;
    }
    let h = TwoHosts::new("kl");
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let server = addr(SERVER4, 7800);
    let client = addr(CLIENT4, 47800);

    // nc -u -l 10.200.0.2 7800 / nc -u -p 47800 10.200.0.2 7800
    let mut srv = spawn_in(&h.server, "nc", &["-u", "-l", SERVER4, "7800"]);
    wait_until_bound(&h.server, 7800, false);
    let mut cli = spawn_in(&h.client, "nc", &["-u", "-p", "47800", SERVER4, "7800"]);
    let cw = Who {
        pid: cli.id() as u64,
        comm: "nc",
        netns: TwoHosts::netns_inode(&h.client),
    };
    let sw = Who {
        pid: srv.id() as u64,
        comm: "nc",
        netns: TwoHosts::netns_inode(&h.server),
    };
    let c = wait_connect(&mut u, cw.pid, &server);
    let ck = c["cookie"].clone();
    cli.stdin.as_mut().unwrap().write_all(b"hi\n").unwrap();
    assert_eq!(read_line(&mut srv, 10), "hi\n");
    srv.stdin.as_mut().unwrap().write_all(b"ack\n").unwrap();
    assert_eq!(read_line(&mut cli, 10), "ack\n");
    let acc = u.wait_for("server accept", |v| {
        is(v, "accept") && s(v, "local") == server && s(v, "remote") == client
    });
    assert_event(&acc, "accept", &sw, &server, &client);
    let sck = acc["cookie"].clone();
    let est = u.wait_for("client establish", |v| {
        is(v, "establish") && of_flow(v, &ck, &server)
    });
    assert_event(&est, "establish", &cw, &client, &server);
    u.wait_for("server establish", |v| {
        is(v, "establish") && of_flow(v, &sck, &client)
    });

    // SIGKILL both, the client first.
    sigkill(&mut cli);
    let cclose = u.wait_for("client close", |v| {
        is(v, "close") && of_flow(v, &ck, &server)
    });
    assert_event(&cclose, "close", &cw, &client, &server);
    assert_close(&cclose, "closed", (1, 3), (1, 4));
    sigkill(&mut srv);
    let sclose = u.wait_for("server close", |v| {
        is(v, "close") && of_flow(v, &sck, &client)
    });
    assert_event(&sclose, "close", &sw, &server, &client);
    assert_close(&sclose, "closed", (1, 4), (1, 3));

    assert_story(
        &mut u,
        "client nc",
        &ck,
        &server,
        &["connect", "establish", "close"],
    );
    assert_story(
        &mut u,
        "server nc",
        &sck,
        &client,
        &["accept", "establish", "close"],
    );
    assert_connect(st, &c, &cw, &client, &server);
    Outcome::Pass
}
