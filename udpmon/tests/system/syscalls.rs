//! Issue 3, point 8: every UDP syscall variant, each checked field by field.
//!
//! send/sendto/sendmsg/sendmmsg and recv/recvfrom/recvmsg/recvmmsg, on connected and
//! unconnected sockets. Each flow is a fresh client socket (client namespace) talking to its
//! own server socket and port (server namespace), so that its events are told apart by
//! socket cookie and remote address. Every datagram has a payload size no other datagram of
//! the scenario has: a CLOSE's byte counts show which datagrams were counted, and a
//! CONNECT's or ACCEPT's `bytes` which one opened the flow.
//!
//! | flow | client sends | server receives | server replies | client receives |
//! |---|---|---|---|---|
//! | 0 | connected, send | connected, recv | send | recv |
//! | 1 | sendto | recvfrom | sendto | recvfrom |
//! | 2 | sendmsg, msg_name set | recvmsg | sendmsg, msg_name set | recvmsg |
//! | 3 | connected, sendmsg, msg_name NULL | recvfrom | sendmsg, msg_name set | connected, recvmsg |
//! | 4 | sendmmsg, msg_name set | recvmmsg | sendmmsg, msg_name set | recvmmsg |
//! | 5 | connected, sendmmsg, msg_name NULL | connected, recvmmsg | connected, sendmmsg | connected, recvmmsg |
//!
//! A "connected" server connect()s to the client's address before the first datagram, so
//! its flow opens with CONNECT (via connect) rather than ACCEPT.
use std::net::{SocketAddr, UdpSocket};

use serde_json::Value;

use crate::{
    harness::{
        CLIENT4, CLIENT6, Outcome, SERVER4, SERVER6, Strategy, TwoHosts, Udpmon, deadline, is, s,
        udp_socket_in,
    },
    peers::my_comm,
    util::{
        Who, addr, assert_close, assert_connect, assert_event, assert_send_connect, assert_story,
        local_of, of_flow, recvmmsg, recvmsg, sendmmsg, sendmsg,
    },
};

/// How a socket sends.
#[derive(Clone, Copy, Debug)]
enum Tx {
    /// send(2), one call per datagram (connected socket).
    Send,
    /// sendto(2), one call per datagram.
    SendTo,
    /// sendmsg(2), one call per datagram; msg_name set unless the socket is connected.
    SendMsg,
    /// sendmmsg(2), every datagram in one call; msg_name set unless the socket is connected.
    SendMmsg,
}

/// How a socket receives.
#[derive(Clone, Copy, Debug)]
enum Rx {
    /// recv(2) (connected socket).
    Recv,
    RecvFrom,
    RecvMsg,
    RecvMmsg,
}

struct Spec {
    client_connected: bool,
    client_tx: Tx,
    server_connected: bool,
    server_rx: Rx,
    server_tx: Tx,
    client_rx: Rx,
    /// Payload sizes of the client's datagrams, then of the server's replies.
    req: &'static [usize],
    rsp: &'static [usize],
}

const SPECS: &[Spec] = &[
    Spec {
        client_connected: true,
        client_tx: Tx::Send,
        server_connected: true,
        server_rx: Rx::Recv,
        server_tx: Tx::Send,
        client_rx: Rx::Recv,
        req: &[101],
        rsp: &[201],
    },
    Spec {
        client_connected: false,
        client_tx: Tx::SendTo,
        server_connected: false,
        server_rx: Rx::RecvFrom,
        server_tx: Tx::SendTo,
        client_rx: Rx::RecvFrom,
        req: &[102, 112],
        rsp: &[202],
    },
    Spec {
        client_connected: false,
        client_tx: Tx::SendMsg,
        server_connected: false,
        server_rx: Rx::RecvMsg,
        server_tx: Tx::SendMsg,
        client_rx: Rx::RecvMsg,
        req: &[103],
        rsp: &[203, 213],
    },
    Spec {
        client_connected: true,
        client_tx: Tx::SendMsg,
        server_connected: false,
        server_rx: Rx::RecvFrom,
        server_tx: Tx::SendMsg,
        client_rx: Rx::RecvMsg,
        req: &[104, 114],
        rsp: &[204],
    },
    Spec {
        client_connected: false,
        client_tx: Tx::SendMmsg,
        server_connected: false,
        server_rx: Rx::RecvMmsg,
        server_tx: Tx::SendMmsg,
        client_rx: Rx::RecvMmsg,
        req: &[105, 115, 125],
        rsp: &[205, 215],
    },
    Spec {
        client_connected: true,
        client_tx: Tx::SendMmsg,
        server_connected: true,
        server_rx: Rx::RecvMmsg,
        server_tx: Tx::SendMmsg,
        client_rx: Rx::RecvMmsg,
        req: &[106, 116],
        rsp: &[206, 216, 226],
    },
];

impl Spec {
    fn describe(&self) -> String {
        let c = |b: bool| if b { "connected " } else { "" };
        format!(
            "{}{:?} -> {}{:?}, {:?} -> {:?}",
            c(self.client_connected),
            self.client_tx,
            c(self.server_connected),
            self.server_rx,
            self.server_tx,
            self.client_rx
        )
    }
}

/// One payload per size, each filled with its own byte.
fn payloads(sizes: &[usize], fill: u8) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| vec![fill + i as u8; n])
        .collect()
}

/// Sends every payload the given way, to `to` or (None) to the connected peer.
fn transmit(sock: &UdpSocket, how: Tx, msgs: &[Vec<u8>], to: Option<SocketAddr>) {
    match how {
        Tx::Send => {
            assert!(to.is_none(), "send(2) needs a connected socket");
            for m in msgs {
                assert_eq!(sock.send(m).unwrap(), m.len());
            }
        }
        Tx::SendTo => {
            let to = to.expect("sendto(2) here is for unconnected sockets");
            for m in msgs {
                assert_eq!(sock.send_to(m, to).unwrap(), m.len());
            }
        }
        Tx::SendMsg => {
            for m in msgs {
                assert_eq!(sendmsg(sock, m, to), m.len());
            }
        }
        Tx::SendMmsg => {
            sendmmsg(sock, msgs, to);
        }
    }
}

/// Receives `n` datagrams the given way; returns them with their senders.
fn receive(sock: &UdpSocket, how: Rx, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let got: Vec<(Vec<u8>, Option<SocketAddr>)> = match how {
        Rx::Recv => (0..n)
            .map(|_| {
                let len = sock.recv(&mut buf).expect("recv");
                (buf[..len].to_vec(), Some(sock.peer_addr().unwrap()))
            })
            .collect(),
        Rx::RecvFrom => (0..n)
            .map(|_| {
                let (len, from) = sock.recv_from(&mut buf).expect("recvfrom");
                (buf[..len].to_vec(), Some(from))
            })
            .collect(),
        Rx::RecvMsg => (0..n).map(|_| recvmsg(sock)).collect(),
        Rx::RecvMmsg => {
            let got = recvmmsg(sock, n);
            // recvmmsg() leaves the socket without a read timeout.
            sock.set_read_timeout(Some(deadline(10))).unwrap();
            got
        }
    };
    got.into_iter()
        .map(|(p, from)| (p, from.expect("the sender's address")))
        .collect()
}

/// Asserts that `got` came from `from` and holds exactly the datagrams of `sent`.
fn assert_delivered(what: &str, got: &[(Vec<u8>, SocketAddr)], sent: &[Vec<u8>], from: &str) {
    for (_, f) in got {
        assert_eq!(f.to_string(), from, "{what}: sender");
    }
    let mut payloads: Vec<&Vec<u8>> = got.iter().map(|(p, _)| p).collect();
    payloads.sort();
    let mut want: Vec<&Vec<u8>> = sent.iter().collect();
    want.sort();
    assert!(payloads == want, "{what}: the datagrams sent, each once");
}

/// One flow's sockets, addresses and the events that opened it.
struct Flow {
    what: String,
    client: Option<UdpSocket>,
    server: Option<UdpSocket>,
    client_local: String,
    server_local: String,
    client_cookie: Value,
    server_cookie: Value,
    /// The server's first event kind: `connect` or `accept`.
    server_open: &'static str,
    tx: (u64, u64),
    rx: (u64, u64),
}

fn counts(msgs: &[Vec<u8>]) -> (u64, u64) {
    (msgs.len() as u64, msgs.iter().map(|m| m.len() as u64).sum())
}

/// Asserts the fields every event of the scenario has beyond assert_event's.
fn assert_common(v: &Value, family: &str) {
    assert_eq!(s(v, "family"), family, "family of {v}");
    // SAFETY: getuid has no preconditions.
    assert_eq!(v["uid"], unsafe { libc::getuid() }, "uid of {v}");
    assert!(v["cookie"].as_u64().is_some_and(|c| c > 0), "cookie of {v}");
}

pub fn syscalls(st: Strategy, v6: bool) -> Outcome {
    let (cip, sip, family) = if v6 {
        (CLIENT6, SERVER6, "ipv6")
    } else {
        (CLIENT4, SERVER4, "ipv4")
    };
    let h = TwoHosts::new(if v6 { "y6" } else { "y4" });
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    let comm = my_comm();
    let (cli, srv) = Who::test_process(&h, &comm);
    let me = cli.pid;

    let mut flows = Vec::new();
    for (i, spec) in SPECS.iter().enumerate() {
        let what = format!("flow {i} ({})", spec.describe());
        let server_local = addr(sip, 7900 + i as u16);
        let ssock = udp_socket_in(&h.server, &server_local);
        let csock = udp_socket_in(&h.client, &addr(cip, 0));
        for sock in [&ssock, &csock] {
            sock.set_read_timeout(Some(deadline(10))).unwrap();
        }
        let client_local = local_of(&csock);
        let (server_addr, client_addr): (SocketAddr, SocketAddr) =
            (server_local.parse().unwrap(), client_local.parse().unwrap());
        if spec.server_connected {
            ssock.connect(client_addr).unwrap();
        }
        if spec.client_connected {
            csock.connect(server_addr).unwrap();
        }
        let client_to = (!spec.client_connected).then_some(server_addr);
        let server_to = (!spec.server_connected).then_some(client_addr);

        // The exchange, checked at the application too.
        let req = payloads(spec.req, b'a');
        let rsp = payloads(spec.rsp, b'A');
        transmit(&csock, spec.client_tx, &req, client_to);
        let got = receive(&ssock, spec.server_rx, req.len());
        assert_delivered(&format!("{what}: server"), &got, &req, &client_local);
        let first_rx = got[0].0.len();
        transmit(&ssock, spec.server_tx, &rsp, server_to);
        let got = receive(&csock, spec.client_rx, rsp.len());
        assert_delivered(&format!("{what}: client"), &got, &rsp, &server_local);

        // The client's flow: CONNECT, then ESTABLISH at the first reply.
        let c = u.wait_for(&format!("{what}: client connect"), |v| {
            is(v, "connect")
                && v["pid"] == me
                && v["netns"] == cli.netns
                && s(v, "remote") == server_local
        });
        if spec.client_connected {
            assert_connect(st, &c, &cli, &client_local, &server_local);
        } else {
            assert_send_connect(&c, &cli, &client_local, &server_local);
            assert_eq!(c["bytes"], req[0].len(), "{what}: first datagram of {c}");
        }
        assert_common(&c, family);
        let ck = c["cookie"].clone();
        let est = u.wait_for(&format!("{what}: client establish"), |v| {
            is(v, "establish") && of_flow(v, &ck, &server_local)
        });
        assert_event(&est, "establish", &cli, &client_local, &server_local);
        assert_common(&est, family);
        assert!(est["reply_after_ms"].is_u64(), "{what}: {est}");

        // The server's flow: CONNECT (connected before the first datagram) or ACCEPT.
        let (sc, server_open) = if spec.server_connected {
            let sc = u.wait_for(&format!("{what}: server connect"), |v| {
                is(v, "connect")
                    && v["pid"] == me
                    && v["netns"] == srv.netns
                    && s(v, "remote") == client_local
            });
            assert_connect(st, &sc, &srv, &server_local, &client_local);
            (sc, "connect")
        } else {
            let a = u.wait_for(&format!("{what}: server accept"), |v| {
                is(v, "accept") && s(v, "local") == server_local && s(v, "remote") == client_local
            });
            assert_event(&a, "accept", &srv, &server_local, &client_local);
            assert_eq!(a["via"], "recv", "{what}: {a}");
            assert_eq!(a["bytes"], first_rx, "{what}: first datagram of {a}");
            (a, "accept")
        };
        assert_common(&sc, family);
        let sck = sc["cookie"].clone();
        assert_ne!(sck, ck, "{what}: two sockets, two cookies");
        let est = u.wait_for(&format!("{what}: server establish"), |v| {
            is(v, "establish") && of_flow(v, &sck, &client_local)
        });
        assert_event(&est, "establish", &srv, &server_local, &client_local);
        assert_common(&est, family);

        flows.push(Flow {
            what,
            client: Some(csock),
            server: Some(ssock),
            client_local,
            server_local,
            client_cookie: ck,
            server_cookie: sck,
            server_open,
            tx: counts(&req),
            rx: counts(&rsp),
        });
    }
    let mut cookies: Vec<&Value> = flows
        .iter()
        .flat_map(|f| [&f.client_cookie, &f.server_cookie])
        .collect();
    cookies.sort_by_key(|c| c.as_u64());
    cookies.dedup();
    assert_eq!(cookies.len(), 2 * flows.len(), "one cookie per socket");

    // Close every socket: each flow's CLOSE counts exactly its own datagrams.
    for f in &mut flows {
        drop(f.client.take());
        drop(f.server.take());
    }
    for f in &flows {
        let what = &f.what;
        let (ck, sck) = (&f.client_cookie, &f.server_cookie);
        let (cl, sl) = (&f.client_local, &f.server_local);
        // Each side's CLOSE: its own tx is the other side's rx.
        for (side, who, cookie, local, remote, tx, rx) in [
            ("client", &cli, ck, cl, sl, f.tx, f.rx),
            ("server", &srv, sck, sl, cl, f.rx, f.tx),
        ] {
            let c = u.wait_for(&format!("{what}: {side} close"), |v| {
                is(v, "close") && of_flow(v, cookie, remote)
            });
            assert_event(&c, "close", who, local, remote);
            assert_common(&c, family);
            assert_close(&c, "closed", tx, rx);
            assert_eq!(c["stats"]["icmp_errors"], 0, "{what}: {c}");
            assert_eq!(c["stats"]["app_errors"], 0, "{what}: {c}");
        }
    }
    for f in &flows {
        assert_story(
            &mut u,
            &format!("{}: client", f.what),
            &f.client_cookie,
            &f.server_local,
            &["connect", "establish", "close"],
        );
        assert_story(
            &mut u,
            &format!("{}: server", f.what),
            &f.server_cookie,
            &f.client_local,
            &[f.server_open, "establish", "close"],
        );
    }
    // Nothing else about these sockets: no flow to another address.
    for f in &flows {
        for (ck, remote) in [
            (&f.client_cookie, &f.server_local),
            (&f.server_cookie, &f.client_local),
        ] {
            let stray = u.all(|v| &v["cookie"] == ck && s(v, "remote") != remote);
            assert!(
                stray.is_empty(),
                "{}: events of cookie {ck} for another peer: {stray:?}",
                f.what
            );
        }
    }
    Outcome::Pass
}
