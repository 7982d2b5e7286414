use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::IpAddr,
};

use super::*;
use crate::decode::{Icmp, KernelEvent};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

fn none(_: &FlowId) -> Option<Counters> {
    None
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `nc`, tgid 100, as [`ev`] names it.
fn nc() -> Identity {
    ev(Fact::Close, 0).who
}

/// An event from `nc` (tgid 100) on socket 7, 10.0.0.1:5000 <-> 10.0.0.2:53.
fn ev(fact: Fact, ts_ns: u64) -> KernelEvent {
    KernelEvent {
        fact,
        ts_ns,
        cookie: 7,
        family: Family::V4,
        local: addr("10.0.0.1:5000"),
        remote: addr("10.0.0.2:53"),
        task_unrelated: false,
        connected: false,
        recverr: false,
        who: Identity {
            tgid: 100,
            pid: 101,
            comm: "nc".into(),
            process: "nc".into(),
            uid: 1000,
            cgroup: 25,
            netns: 4026531833,
        },
    }
}

fn icmp(ty: u8, code: u8, errno: Option<i32>, verdict: Verdict) -> Fact {
    Fact::Icmp(Icmp {
        ty,
        code,
        errno,
        from: "10.0.0.2".parse().unwrap(),
        verdict,
    })
}

fn flow7() -> FlowId {
    FlowId {
        cookie: 7,
        remote: addr("10.0.0.2:53"),
    }
}

fn kinds(r: &[Report]) -> Vec<ReportKind> {
    r.iter().map(|r| r.kind).collect()
}

fn engine() -> Engine {
    Engine::new(EngineConfig::default())
}

/// [`Engine::on_event`] as the tests use it: an event's reports.
trait OneEvent {
    fn on(&mut self, ev: &KernelEvent, counters: CountersFn<'_>) -> Vec<Report>;
}

impl OneEvent for Engine {
    fn on(&mut self, ev: &KernelEvent, counters: CountersFn<'_>) -> Vec<Report> {
        let mut out = Vec::new();
        self.on_event(ev, counters, &mut out);
        out
    }
}

/// Feeds events (without kernel counters) and returns every report.
fn run(e: &mut Engine, evs: &[KernelEvent]) -> Vec<Report> {
    evs.iter().flat_map(|x| e.on(x, &none)).collect()
}

fn close_stats(r: &Report) -> (CloseReason, CloseStats) {
    match &r.detail {
        Detail::Closed { reason, stats } => (*reason, *stats),
        d => panic!("not a close: {d:?}"),
    }
}

#[test]
fn first_send_connects_and_the_reply_establishes() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 3 }, S),
            ev(Fact::FirstRx { bytes: 4 }, S + 20 * MS),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Connect, ReportKind::Establish]);
    assert_eq!(
        r[0].detail,
        Detail::Opened {
            via: Via::Send,
            bytes: Some(3)
        }
    );
    assert_eq!(
        r[1].detail,
        Detail::Established {
            reply_after_ns: 20 * MS
        }
    );
    let first = &r[0];
    assert_eq!(
        (
            first.cookie,
            first.who.tgid,
            first.who.pid,
            &*first.who.comm.to_str()
        ),
        (7, 100, 101, "nc")
    );
    assert_eq!(
        (first.who.uid, first.who.cgroup, first.who.netns),
        (1000, 25, 4026531833)
    );
    assert_eq!(
        (first.local, first.remote, first.family),
        (addr("10.0.0.1:5000"), addr("10.0.0.2:53"), Family::V4)
    );
    assert_eq!(e.flows_of(7), [flow7()]);
}

#[test]
fn first_receive_accepts_and_the_answer_establishes() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstRx { bytes: 3 }, S),
            ev(Fact::FirstTx { bytes: 4 }, 2 * S),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Accept, ReportKind::Establish]);
    assert_eq!(
        r[0].detail,
        Detail::Opened {
            via: Via::Recv,
            bytes: Some(3)
        }
    );
}

#[test]
fn repeated_first_datagrams_change_nothing() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 3 }, S),
            ev(Fact::FirstTx { bytes: 3 }, S + 1),
            ev(Fact::FirstTx { bytes: 3 }, S + 2),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Connect]);
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstRx { bytes: 1 }, 2 * S),
            ev(Fact::FirstRx { bytes: 1 }, 2 * S + 1),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Establish]);
}

#[test]
fn each_peer_of_an_unconnected_socket_is_its_own_flow() {
    let mut e = engine();
    let other = KernelEvent {
        remote: addr("[fd00::9]:4000"),
        family: Family::V6,
        ..ev(Fact::FirstRx { bytes: 1 }, 2 * S)
    };
    let r = run(&mut e, &[ev(Fact::FirstRx { bytes: 1 }, S), other]);
    assert_eq!(kinds(&r), [ReportKind::Accept, ReportKind::Accept]);
    assert_eq!(r[1].family, Family::V6);
    assert_eq!(e.flows_of(7).len(), 2);
    assert_eq!(e.stats().flows_tracked, 2);
}

#[test]
fn connect_opens_the_flow_before_any_datagram() {
    let mut e = engine();
    let r = run(&mut e, &[ev(Fact::Connect, S)]);
    assert_eq!(kinds(&r), [ReportKind::Connect]);
    assert_eq!(
        r[0].detail,
        Detail::Opened {
            via: Via::Connect,
            bytes: None
        }
    );
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 3 }, 2 * S),
            ev(Fact::FirstRx { bytes: 4 }, 3 * S),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Establish]);
    assert_eq!(r[0].detail, Detail::Established { reply_after_ns: S });
}

#[test]
fn connect_does_not_establish_without_traffic_both_ways() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[ev(Fact::Connect, S), ev(Fact::FirstRx { bytes: 4 }, 2 * S)],
    );
    assert_eq!(kinds(&r), [ReportKind::Connect]);
}

#[test]
fn reconnecting_closes_the_old_flow_and_opens_the_new_one() {
    let mut e = engine();
    run(
        &mut e,
        &[ev(Fact::Connect, S), ev(Fact::FirstTx { bytes: 3 }, 2 * S)],
    );
    let again = run(&mut e, &[ev(Fact::Connect, 3 * S)]);
    assert!(again.is_empty(), "connect to the same peer: {again:?}");
    let other = KernelEvent {
        remote: addr("10.0.0.3:53"),
        ..ev(Fact::Connect, 4 * S)
    };
    let r = run(&mut e, &[other]);
    assert_eq!(kinds(&r), [ReportKind::Close, ReportKind::Connect]);
    assert_eq!(r[0].remote, addr("10.0.0.2:53"));
    let (reason, stats) = close_stats(&r[0]);
    assert_eq!(reason, CloseReason::Reconnected);
    assert_eq!(
        (stats.duration_ns, stats.tx_datagrams, stats.tx_bytes),
        (3 * S, 1, 3)
    );
    assert_eq!(r[1].remote, addr("10.0.0.3:53"));
    assert_eq!(
        e.flows_of(7),
        [FlowId {
            cookie: 7,
            remote: addr("10.0.0.3:53")
        }]
    );
}

#[test]
fn disconnect_closes_the_connected_flow_only() {
    let mut e = engine();
    let peer2 = KernelEvent {
        remote: addr("10.0.0.9:99"),
        ..ev(Fact::FirstRx { bytes: 1 }, S)
    };
    run(&mut e, &[peer2, ev(Fact::Connect, 2 * S)]);
    let disconnect = KernelEvent {
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::Connect, 3 * S)
    };
    let r = run(&mut e, std::slice::from_ref(&disconnect));
    assert_eq!(kinds(&r), [ReportKind::Close]);
    assert_eq!(r[0].remote, addr("10.0.0.2:53"));
    assert_eq!(close_stats(&r[0]).0, CloseReason::Disconnected);
    // Or a datagram sent to that peer later would add to the kernel entry, reported by no
    // record: the flow would never reopen.
    assert_eq!(e.to_forget(), [flow7()], "its kernel entry goes");
    assert_eq!(e.flows_of(7).len(), 1);
    assert!(run(&mut e, &[disconnect]).is_empty());
}

#[test]
fn a_connected_flag_lets_a_disconnect_close_a_flow_opened_by_traffic() {
    let mut e = engine();
    let tx = KernelEvent {
        connected: true,
        ..ev(Fact::FirstTx { bytes: 1 }, S)
    };
    let disconnect = KernelEvent {
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::Connect, 2 * S)
    };
    let r = run(&mut e, &[tx, disconnect]);
    assert_eq!(kinds(&r), [ReportKind::Connect, ReportKind::Close]);
}

#[test]
fn icmp_reports_unreachable_with_the_kernels_verdict() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 3 }, S),
            ev(icmp(3, 3, Some(111), Verdict::Discarded), 2 * S),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Connect, ReportKind::Unreachable]);
    assert_eq!(
        r[1].detail,
        Detail::Unreachable(UnreachableInfo {
            ty: 3,
            code: 3,
            errno: Some(111),
            fatal: Some(true),
            from: "10.0.0.2".parse().unwrap(),
            verdict: Verdict::Discarded,
            connected: false,
            last_owner: None,
        })
    );
}

#[test]
fn icmp_without_errno_gets_the_kernels_mapping() {
    let mut e = engine();
    let r = run(&mut e, &[ev(icmp(3, 1, None, Verdict::Discarded), S)]);
    let Detail::Unreachable(u) = &r[0].detail else {
        panic!("{r:?}")
    };
    assert_eq!((u.errno, u.fatal), (Some(libc::EHOSTUNREACH), Some(false)));
    let v6 = KernelEvent {
        family: Family::V6,
        remote: addr("[fd00::2]:53"),
        ..ev(icmp(1, 1, None, Verdict::Queued), S)
    };
    let r = run(&mut e, &[v6]);
    let Detail::Unreachable(u) = &r[0].detail else {
        panic!("{r:?}")
    };
    assert_eq!((u.errno, u.fatal), (Some(libc::EACCES), Some(true)));
}

#[test]
fn icmp_on_an_unknown_flow_creates_it_without_a_connect() {
    let mut e = engine();
    let r = run(&mut e, &[ev(icmp(3, 3, Some(111), Verdict::Notified), S)]);
    assert_eq!(kinds(&r), [ReportKind::Unreachable]);
    assert_eq!(e.flows_of(7), [flow7()]);
    let r = run(&mut e, &[ev(Fact::Close, 2 * S)]);
    assert_eq!(kinds(&r), [ReportKind::Close]);
    assert_eq!(close_stats(&r[0]).1.icmp_errors, 1);
    assert_eq!(
        e.to_forget(),
        [flow7()],
        "its kernel entry goes with the socket"
    );
}

#[test]
fn repeated_icmp_is_counted_not_reported() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 3 }, S),
            ev(icmp(3, 3, Some(111), Verdict::Discarded), 2 * S),
            ev(icmp(3, 3, Some(111), Verdict::Discarded), 3 * S),
            ev(icmp(3, 3, Some(111), Verdict::Discarded), 4 * S),
            ev(icmp(3, 1, None, Verdict::Discarded), 5 * S),
            ev(Fact::Close, 6 * S),
        ],
    );
    assert_eq!(
        kinds(&r),
        [
            ReportKind::Connect,
            ReportKind::Unreachable,
            ReportKind::Unreachable,
            ReportKind::Close
        ]
    );
    assert_eq!(close_stats(&r[3]).1.icmp_errors, 4);
}

/// An ICMP error the kernel told no socket of, as its record has it: no cookie, softirq.
fn untold_icmp(netns: u32, local: &str, ts_ns: u64) -> KernelEvent {
    let e = ev(icmp(3, 3, None, Verdict::NoSocket), ts_ns);
    KernelEvent {
        cookie: 0,
        task_unrelated: true,
        local: addr(local),
        who: Identity {
            tgid: 0,
            pid: 0,
            comm: "swapper/1".into(),
            netns,
            ..e.who
        },
        ..e
    }
}

#[test]
fn icmp_for_a_closed_socket_names_the_ports_last_owner() {
    let mut e = engine();
    run(
        &mut e,
        &[ev(Fact::FirstTx { bytes: 3 }, S), ev(Fact::Close, 2 * S)],
    );
    let r = run(&mut e, &[untold_icmp(nc().netns, "10.0.0.1:5000", 3 * S)]);
    assert_eq!(kinds(&r), [ReportKind::Unreachable]);
    assert_eq!(
        (r[0].cookie, r[0].who.tgid, &*r[0].who.comm.to_str()),
        (0, 0, "")
    );
    assert_eq!(r[0].who.netns, 4026531833);
    let Detail::Unreachable(u) = &r[0].detail else {
        panic!("{r:?}")
    };
    assert_eq!(u.verdict, Verdict::NoSocket);
    assert_eq!(u.errno, Some(libc::ECONNREFUSED));
    let owner = u.last_owner.as_ref().expect("last owner");
    assert_eq!((owner.tgid, &*owner.comm.to_str()), (100, "nc"));
    assert!(e.flows().is_empty(), "no flow for a socket that is gone");
}

#[test]
fn an_untold_icmp_error_is_the_discarded_error_of_the_flow_that_sent_the_datagram() {
    let mut e = engine();
    let (here, there) = (4026531833, 4026532000);
    // Socket 7 here, and socket 9 in another namespace with the same addresses and peer:
    // a container's twin, newer, so that the largest cookie alone would name it.
    let twin = KernelEvent {
        cookie: 9,
        who: Identity {
            netns: there,
            ..nc()
        },
        ..ev(Fact::FirstTx { bytes: 3 }, S)
    };
    run(&mut e, &[ev(Fact::FirstTx { bytes: 3 }, S), twin]);
    let r = run(&mut e, &[untold_icmp(here, "10.0.0.1:5000", 2 * S)]);
    assert_eq!(kinds(&r), [ReportKind::Unreachable]);
    assert_eq!(r[0].cookie, 7, "{r:?}");
    assert_eq!((r[0].who.tgid, r[0].who.netns), (100, here), "{r:?}");
    let Detail::Unreachable(u) = &r[0].detail else {
        panic!("{r:?}")
    };
    assert_eq!(u.verdict, Verdict::Discarded);
    let r = run(&mut e, &[untold_icmp(there, "10.0.0.1:5000", 3 * S)]);
    assert_eq!(r[0].cookie, 9, "{r:?}");
    // Another local address on the same port: not a datagram either socket sent.
    let r = run(&mut e, &[untold_icmp(here, "10.0.0.3:5000", 4 * S)]);
    assert_eq!(r[0].cookie, 0, "{r:?}");
    let Detail::Unreachable(u) = &r[0].detail else {
        panic!("{r:?}")
    };
    assert_eq!(u.verdict, Verdict::NoSocket);
    let r = run(&mut e, &[ev(Fact::Close, 5 * S)]);
    assert_eq!(close_stats(&r[0]).1.icmp_errors, 1, "{r:?}");
    // A socket whose namespace no hook named: the error's own namespace has no other.
    let unnamed = KernelEvent {
        cookie: 11,
        who: Identity { netns: 0, ..nc() },
        ..ev(Fact::FirstTx { bytes: 3 }, 6 * S)
    };
    run(&mut e, &[unnamed]);
    // Another code, so that socket 9's flow reports again.
    let host_unreachable = KernelEvent {
        fact: icmp(3, 1, None, Verdict::NoSocket),
        ..untold_icmp(there, "10.0.0.1:5000", 7 * S)
    };
    let r = run(&mut e, &[host_unreachable]);
    assert_eq!(r[0].cookie, 9, "the namespace's own socket first: {r:?}");
    let r = run(&mut e, &[untold_icmp(here, "10.0.0.1:5000", 8 * S)]);
    assert_eq!(r[0].cookie, 11, "{r:?}");
}

#[test]
fn an_untold_icmp_error_finds_a_flow_by_the_local_port_it_has_now() {
    let mut e = engine();
    // Learned by connect() before the socket had a port; its first datagram gives it one.
    let connect = KernelEvent {
        local: addr("0.0.0.0:0"),
        connected: true,
        ..ev(Fact::Connect, S)
    };
    run(&mut e, &[connect, ev(Fact::FirstTx { bytes: 3 }, 2 * S)]);
    let r = run(&mut e, &[untold_icmp(nc().netns, "10.0.0.1:5000", 3 * S)]);
    assert_eq!(
        (r[0].cookie, r[0].local),
        (7, addr("10.0.0.1:5000")),
        "{r:?}"
    );
}

#[test]
fn app_error_lands_on_the_connected_flow() {
    let mut e = engine();
    // A connected socket's send carries no address: the flow is the connected one.
    let send_err = KernelEvent {
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::SendError { errno: 111 }, 3 * S)
    };
    let r = run(
        &mut e,
        &[
            ev(Fact::Connect, S),
            ev(icmp(3, 3, Some(111), Verdict::Notified), 2 * S),
            send_err.clone(),
        ],
    );
    assert_eq!(
        kinds(&r),
        [
            ReportKind::Connect,
            ReportKind::Unreachable,
            ReportKind::AppError
        ]
    );
    assert_eq!(r[2].remote, addr("10.0.0.2:53"));
    assert_eq!(
        r[2].detail,
        Detail::AppError {
            op: Op::Send,
            errno: 111,
            after_unreachable_ns: Some(S)
        }
    );
    let Detail::Unreachable(u) = &r[1].detail else {
        panic!()
    };
    assert!(u.connected);
    // The same failure again is counted, not reported; a different one is reported.
    let recv_err = KernelEvent {
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::RecvError { errno: 113 }, 5 * S)
    };
    let r = run(&mut e, &[send_err, recv_err, ev(Fact::Close, 6 * S)]);
    assert_eq!(kinds(&r), [ReportKind::AppError, ReportKind::Close]);
    assert_eq!(close_stats(&r[1]).1.app_errors, 3);
}

#[test]
fn eagain_and_interrupted_calls_are_not_errors() {
    let mut e = engine();
    run(&mut e, &[ev(Fact::Connect, S)]);
    for errno in [libc::EAGAIN, libc::EINTR, 512] {
        let r = run(&mut e, &[ev(Fact::RecvError { errno }, 2 * S)]);
        assert!(r.is_empty(), "{errno}: {r:?}");
    }
}

#[test]
fn app_error_without_a_flow_is_reported_by_address() {
    let mut e = engine();
    let denied = ev(Fact::SendError { errno: libc::EPERM }, S);
    let r = run(&mut e, &[denied.clone(), denied]);
    assert_eq!(kinds(&r), [ReportKind::AppError]);
    assert_eq!(
        (r[0].local, r[0].remote),
        (addr("10.0.0.1:5000"), addr("10.0.0.2:53"))
    );
    assert!(e.flows().is_empty(), "a refused send opens no flow");
}

#[test]
fn close_reports_every_flow_with_kernel_counters() {
    let mut e = engine();
    let b = KernelEvent {
        remote: addr("10.0.0.3:53"),
        ..ev(Fact::FirstRx { bytes: 5 }, 2 * S)
    };
    run(&mut e, &[ev(Fact::FirstTx { bytes: 3 }, S), b]);
    let kernel = |id: &FlowId| {
        (id == &flow7()).then_some(Counters {
            tx_datagrams: 2,
            tx_bytes: 7,
            rx_datagrams: 1,
            rx_bytes: 4,
            first_ns: S,
            last_tx_ns: 3 * S,
            last_rx_ns: 2 * S,
        })
    };
    let r = e.on(&ev(Fact::Close, 4 * S + 200 * MS), &kernel);
    assert_eq!(kinds(&r), [ReportKind::Close, ReportKind::Close]);
    let (reason, stats) = close_stats(&r[0]);
    assert_eq!(reason, CloseReason::Closed);
    assert_eq!(
        stats,
        CloseStats {
            duration_ns: 3 * S + 200 * MS,
            tx_datagrams: 2,
            tx_bytes: 7,
            rx_datagrams: 1,
            rx_bytes: 4,
            last_tx_ns: 3 * S,
            last_rx_ns: 2 * S,
            icmp_errors: 0,
            app_errors: 0,
            preexisting: false,
        }
    );
    // No kernel entry: the counts the events showed.
    let (_, stats) = close_stats(&r[1]);
    assert_eq!(
        (stats.rx_datagrams, stats.rx_bytes, stats.tx_datagrams),
        (1, 5, 0)
    );
    assert!(e.flows().is_empty());
    assert_eq!(e.stats().sockets_tracked, 0);
    assert_eq!(e.stats().flows_closed, 2);
}

/// Two dumps of the open sockets in a row close those the engine knew before each began and
/// neither found: their Close record was lost. Nothing else: a socket one dump skipped is
/// still open if the next finds it, or if an event named it in between.
#[test]
fn dumps_close_the_sockets_whose_close_was_lost() {
    let mut e = engine();
    let netns = nc().netns;
    let other = netns + 1;
    // Socket 7 (a flow, then its close lost), 8 (from before udpmon, flowless, close lost),
    // 9 (open; both dumps skip it, but it is named in between), 10 (named only after the
    // first dump began), 11 (in another namespace, close lost; the second dump of its
    // namespace fails).
    let on = |cookie, fact, ts, ns| KernelEvent {
        cookie,
        who: Identity { netns: ns, ..nc() },
        ..ev(fact, ts)
    };
    run(
        &mut e,
        &[
            on(7, Fact::FirstTx { bytes: 3 }, S, netns),
            on(8, Fact::Existing, S, netns),
            on(9, Fact::FirstTx { bytes: 3 }, S, netns),
            on(10, Fact::FirstTx { bytes: 3 }, 5 * S, netns),
            on(11, Fact::FirstTx { bytes: 3 }, S, other),
        ],
    );
    assert_eq!(e.stats().sockets_tracked, 5);
    let dump = |ns, since_ns, open: &[u64]| OpenSockets {
        netns: ns,
        since_ns,
        cookies: open.iter().copied().collect(),
    };
    let mut out = Vec::new();
    let first = [dump(netns, 4 * S, &[]), dump(other, 4 * S, &[])];
    assert_eq!(
        e.lost_closes(&first, 6 * S, &none, &mut out),
        (0, 4),
        "one dump closes nothing"
    );
    assert!(out.is_empty());
    run(&mut e, &[on(9, Fact::Holder, 6 * S, netns)]);
    let second = [dump(netns, 7 * S, &[10])];
    assert_eq!(
        e.lost_closes(&second, 8 * S, &none, &mut out),
        (2, 1),
        "7 and 8 closed; 9 missed again, but named since the first miss: a suspect anew"
    );
    assert_eq!(kinds(&out), [ReportKind::Close]);
    assert_eq!(out[0].cookie, 7);
    let (reason, stats) = close_stats(&out[0]);
    assert_eq!(reason, CloseReason::Closed);
    assert_eq!(
        stats.duration_ns,
        7 * S,
        "closed by the time it was found gone"
    );
    assert_eq!(e.to_forget(), [flow7()], "its kernel entry goes too");
    assert_eq!(e.stats().sockets_tracked, 3);
    // 9 found at last; 11's namespace dumped again, still without it.
    out.clear();
    let third = [dump(netns, 9 * S, &[9, 10]), dump(other, 9 * S, &[])];
    assert_eq!(e.lost_closes(&third, 10 * S, &none, &mut out), (1, 0));
    assert_eq!(out.iter().map(|r| r.cookie).collect::<Vec<_>>(), [11]);
    let mut left: Vec<u64> = e.flows().iter().map(|f| f.cookie).collect();
    left.sort_unstable();
    assert_eq!(left, [9, 10]);
    assert_eq!(e.stats().closes_recovered, 3);
    // The lost record, should it come after all, closes nothing twice.
    assert!(run(&mut e, &[ev(Fact::Close, 11 * S)]).is_empty());
}

#[test]
fn refused_is_rate_limited_and_names_the_last_owner() {
    let mut e = engine();
    let no_socket = |ts| KernelEvent {
        cookie: 0,
        task_unrelated: true,
        local: addr("10.0.0.1:5000"),
        remote: addr("10.0.0.2:53"),
        who: Identity {
            comm: "ksoftirqd/0".into(),
            ..ev(Fact::NoSocket, ts).who
        },
        ..ev(Fact::NoSocket, ts)
    };
    let r = run(&mut e, &[no_socket(S)]);
    assert_eq!(
        r[0].detail,
        Detail::Refused { last_owner: None },
        "nothing known about the port yet"
    );
    run(
        &mut e,
        &[
            ev(Fact::FirstRx { bytes: 3 }, 2 * S),
            ev(Fact::Close, 3 * S),
        ],
    );
    let idle = ns(e.config().idle_timeout);
    let r = run(
        &mut e,
        &[
            no_socket(4 * S),
            no_socket(S + idle - 1),
            no_socket(S + idle),
            no_socket(S + idle + 1),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Refused]);
    assert_eq!(r[0].ts_ns, S + idle);
    assert_eq!(
        (r[0].cookie, r[0].who.tgid, &*r[0].who.comm.to_str()),
        (0, 0, "")
    );
    let owner = r[0].last_owner().expect("last owner");
    assert_eq!((owner.tgid, &*owner.comm.to_str()), (100, "nc"));
    assert_eq!(e.stats().refused_suppressed, 3);
}

/// A flood of distinct sources fills the table (the flow bound) and the rest is suppressed
/// until a tick forgets the tuples reported longer than the idle timeout ago; a tuple
/// reported again since stays.
#[test]
fn refused_tuples_are_forgotten_after_the_idle_timeout() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 3,
        ..EngineConfig::default()
    });
    let idle = ns(e.config().idle_timeout);
    let from = |n: u8, ts| KernelEvent {
        cookie: 0,
        task_unrelated: true,
        local: addr("10.0.0.1:5000"),
        remote: SocketAddr::new(IpAddr::from([10, 0, 0, n]), 53),
        ..ev(Fact::NoSocket, ts)
    };
    let refused =
        |e: &mut Engine, n, ts| kinds(&e.on(&from(n, ts), &none)) == [ReportKind::Refused];
    assert!(refused(&mut e, 2, S));
    assert!(refused(&mut e, 3, 2 * S));
    assert!(refused(&mut e, 4, 3 * S));
    assert!(!refused(&mut e, 5, 3 * S), "the table is full");
    // .2 again after the idle timeout: reported, its time renewed.
    assert!(refused(&mut e, 2, S + idle));
    e.on_tick(2 * S + idle, &none);
    // .3 is forgotten (room for .5), .2 and .4 are not.
    assert!(refused(&mut e, 5, 2 * S + idle));
    assert!(!refused(&mut e, 6, 2 * S + idle), "full again");
    assert!(!refused(&mut e, 2, 2 * S + idle), "renewed at S + idle");
    e.on_tick(3 * S + idle, &none);
    assert!(refused(&mut e, 6, 3 * S + idle));
    e.on_tick(4 * S + 2 * idle, &none);
    for n in [7, 8, 9] {
        assert!(refused(&mut e, n, 4 * S + 2 * idle), "all forgotten: {n}");
    }
    assert_eq!(e.stats().refused_suppressed, 3);
}

#[test]
fn a_ports_last_owner_is_the_socket_that_used_it_last() {
    // Two programs' sockets on one port (SO_REUSEPORT), taking turns, then one closing.
    let mut e = engine();
    let dig = |fact, ts| KernelEvent {
        cookie: 8,
        who: Identity {
            tgid: 200,
            pid: 200,
            comm: "dig".into(),
            process: "dig".into(),
            ..nc()
        },
        ..ev(fact, ts)
    };
    let mut port = 4000;
    let mut last_owner = |e: &mut Engine, ts| {
        port += 1;
        let refused = KernelEvent {
            cookie: 0,
            task_unrelated: true,
            remote: SocketAddr::new(addr("10.0.0.9:0").ip(), port),
            ..ev(Fact::NoSocket, ts)
        };
        let r = e.on(&refused, &none);
        r[0].last_owner().map(|o| (o.tgid, o.comm))
    };
    let nc = Some((100, Name::new("nc")));
    let dig_owner = Some((200, Name::new("dig")));
    run(&mut e, &[ev(Fact::FirstTx { bytes: 1 }, S)]);
    assert_eq!(last_owner(&mut e, S + 1), nc);
    run(&mut e, &[dig(Fact::FirstTx { bytes: 1 }, 2 * S)]);
    assert_eq!(last_owner(&mut e, 2 * S + 1), dig_owner);
    run(&mut e, &[ev(Fact::FirstRx { bytes: 1 }, 3 * S)]);
    assert_eq!(
        last_owner(&mut e, 3 * S + 1),
        nc,
        "nc's socket took the port back"
    );
    run(&mut e, &[dig(Fact::FirstRx { bytes: 1 }, 4 * S)]);
    assert_eq!(last_owner(&mut e, 4 * S + 1), dig_owner);
    run(&mut e, &[ev(Fact::Close, 5 * S)]);
    assert_eq!(last_owner(&mut e, 5 * S + 1), nc, "the closing socket's");
    let again = KernelEvent {
        remote: addr("10.0.0.3:53"),
        ..dig(Fact::FirstTx { bytes: 1 }, 6 * S)
    };
    run(&mut e, &[again]);
    assert_eq!(last_owner(&mut e, 6 * S + 1), dig_owner);
}

/// A socket that leaves its port without a close (a disconnect releases an autobound port; a
/// socket quiet for long enough is forgotten) is named there as of then, until another is.
#[test]
fn a_port_left_without_a_close_names_the_socket_that_left_it() {
    let mut e = engine();
    let refused_owner = |e: &mut Engine, port: u16, ts| {
        let refused = KernelEvent {
            cookie: 0,
            task_unrelated: true,
            local: SocketAddr::new(addr("10.0.0.1:0").ip(), port),
            remote: SocketAddr::new(addr("10.0.0.9:0").ip(), u16::try_from(ts / S).unwrap()),
            ..ev(Fact::NoSocket, ts)
        };
        let r = e.on(&refused, &none);
        r[0].last_owner().map(|o| o.tgid)
    };
    let dig = |fact, port, ts| KernelEvent {
        cookie: 8,
        local: SocketAddr::new(addr("10.0.0.1:0").ip(), port),
        who: Identity {
            tgid: 200,
            pid: 200,
            ..nc()
        },
        ..ev(fact, ts)
    };
    let disconnect = KernelEvent {
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::Connect, 2 * S)
    };
    run(&mut e, &[ev(Fact::Connect, S), disconnect]);
    assert_eq!(e.stats().sockets_tracked, 1, "still open, without a port");
    assert_eq!(refused_owner(&mut e, 5000, 3 * S), Some(100));
    // Another socket takes the port.
    run(&mut e, &[dig(Fact::FirstTx { bytes: 1 }, 5000, 4 * S)]);
    assert_eq!(refused_owner(&mut e, 5000, 5 * S), Some(200));
    // Both go quiet, their flows expire, and in the end they are forgotten: the port names
    // the one seen there last, as of its last event.
    let idle = ns(e.config().idle_timeout);
    e.on_tick(4 * S + idle, &none);
    e.on_tick(4 * S + 2 * idle, &none);
    assert_eq!(e.stats().sockets_tracked, 0, "both forgotten");
    assert_eq!(refused_owner(&mut e, 5000, 6 * S + 2 * idle), Some(200));
    assert_eq!(refused_owner(&mut e, 6000, 7 * S + 2 * idle), None);
}

#[test]
fn existing_sockets_are_learned_silently() {
    let mut e = engine();
    let existing = KernelEvent {
        connected: true,
        task_unrelated: true,
        who: Identity {
            tgid: 0,
            pid: 0,
            comm: Name::EMPTY,
            ..ev(Fact::Existing, S).who
        },
        ..ev(Fact::Existing, S)
    };
    assert!(run(&mut e, &[existing]).is_empty());
    assert_eq!(e.flows_of(7), [flow7()]);
    // Its first datagrams after startup neither reopen it nor skip the establish.
    let r = run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 1 }, 2 * S),
            ev(Fact::FirstRx { bytes: 1 }, 3 * S),
            ev(Fact::Close, 4 * S),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Establish, ReportKind::Close]);
    assert!(close_stats(&r[1]).1.preexisting);
    // An unconnected socket has no flow until it talks.
    let server = KernelEvent {
        cookie: 8,
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::Existing, S)
    };
    assert!(run(&mut e, &[server]).is_empty());
    assert!(e.flows_of(8).is_empty());
    assert_eq!(e.stats().sockets_tracked, 1);
}

#[test]
fn softirq_facts_use_the_sockets_learned_owner() {
    let mut e = engine();
    let softirq = |fact, ts| KernelEvent {
        task_unrelated: true,
        who: Identity {
            tgid: 0,
            pid: 0,
            comm: "swapper/3".into(),
            uid: 0,
            cgroup: 1,
            ..nc()
        },
        ..ev(fact, ts)
    };
    run(&mut e, &[ev(Fact::FirstTx { bytes: 1 }, S)]);
    let r = run(&mut e, &[softirq(Fact::FirstRx { bytes: 2 }, 2 * S)]);
    assert_eq!(
        (
            r[0].who.tgid,
            &*r[0].who.comm.to_str(),
            r[0].who.uid,
            r[0].who.cgroup
        ),
        (100, "nc", 1000, 25)
    );
    // A socket only ever seen from softirq has no known owner: nothing is made up.
    let stranger = KernelEvent {
        cookie: 9,
        ..softirq(Fact::FirstRx { bytes: 2 }, 3 * S)
    };
    let r = run(&mut e, &[stranger]);
    assert_eq!(
        (
            r[0].who.tgid,
            &*r[0].who.comm.to_str(),
            r[0].who.uid,
            r[0].who.cgroup
        ),
        (0, "", 0, 0)
    );
    assert_eq!(r[0].who.netns, 4026531833);
}

#[test]
fn zero_cookie_and_addressless_events_are_ignored() {
    let mut e = engine();
    let r = run(
        &mut e,
        &[
            KernelEvent {
                cookie: 0,
                ..ev(Fact::FirstTx { bytes: 1 }, S)
            },
            KernelEvent {
                remote: addr("0.0.0.0:0"),
                ..ev(Fact::FirstRx { bytes: 1 }, S)
            },
        ],
    );
    assert!(r.is_empty());
    assert_eq!(e.stats().events_ignored, 2);
}

/// A kernel flow map the tests can change between ticks, and the [`Fact::Wake`] records it
/// makes as the kernel does: for a datagram on an entry after more than `WAKE_NS` without
/// any, unless it is its direction's first (the kernel's record is then a first datagram's,
/// which a test feeds itself, as it does for a new entry's).
#[derive(Default)]
struct Kernel(RefCell<HashMap<FlowId, Counters>>, RefCell<Vec<FlowId>>);

impl Kernel {
    fn count(&self, id: FlowId, ts: u64, tx: u64, rx: u64) {
        let mut m = self.0.borrow_mut();
        let c = m.entry(id).or_default();
        if c.first_ns == 0 {
            c.first_ns = ts;
        }
        let again = if tx > 0 {
            c.tx_datagrams > 0
        } else {
            c.rx_datagrams > 0
        };
        if again && ts.saturating_sub(c.last_ns()) > udpmon_common::WAKE_NS {
            self.1.borrow_mut().push(id);
        }
        c.tx_datagrams += tx;
        c.tx_bytes += 10 * tx;
        c.rx_datagrams += rx;
        c.rx_bytes += 10 * rx;
        if tx > 0 {
            c.last_tx_ns = ts;
        } else {
            c.last_rx_ns = ts;
        }
    }

    fn send(&self, id: FlowId, ts: u64, n: u64) {
        self.count(id, ts, n, 0);
    }

    fn recv(&self, id: FlowId, ts: u64) {
        self.count(id, ts, 0, 1);
    }

    fn get(&self, id: &FlowId) -> Option<Counters> {
        self.0.borrow().get(id).copied()
    }

    /// The wake records since the last call, as each engine would read them from the ring.
    fn wake(&self, engines: &mut [&mut Engine]) {
        for id in self.1.borrow_mut().drain(..) {
            let w = KernelEvent {
                cookie: id.cookie,
                remote: id.remote,
                ..ev(Fact::Wake, 0)
            };
            for e in engines.iter_mut() {
                assert!(e.on(&w, &none).is_empty());
            }
        }
    }

    /// A tick of `e` after it read the records so far.
    fn tick(&self, e: &mut Engine, now: u64) -> Vec<Report> {
        self.wake(&mut [e]);
        e.on_tick(now, &|id| self.get(id))
    }
}

/// An established flow: sent at 1 s, answered at 1.1 s.
fn established(e: &mut Engine, k: &Kernel) {
    k.send(flow7(), S, 1);
    k.recv(flow7(), S + 100 * MS);
    let r = run(
        e,
        &[
            ev(Fact::FirstTx { bytes: 10 }, S),
            ev(Fact::FirstRx { bytes: 10 }, S + 100 * MS),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Connect, ReportKind::Establish]);
}

#[test]
fn silent_needs_sends_after_the_last_reply_for_long_enough() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    let reply = S + 100 * MS;
    assert!(k.tick(&mut e, 2 * S).is_empty());
    // Quiet both ways: not silent, only idle.
    assert!(k.tick(&mut e, reply + 11 * S).is_empty());
    // One send is not enough.
    k.send(flow7(), reply + 12 * S, 1);
    assert!(k.tick(&mut e, reply + 13 * S).is_empty());
    k.send(flow7(), reply + 13 * S, 1);
    let r = k.tick(&mut e, reply + 14 * S);
    assert_eq!(kinds(&r), [ReportKind::Silent]);
    assert_eq!(r[0].ts_ns, reply + 14 * S);
    assert_eq!(
        r[0].detail,
        Detail::Silent {
            no_reply_ns: 14 * S,
            sends: 2
        }
    );
    // Reported once per silence.
    k.send(flow7(), reply + 15 * S, 5);
    assert!(k.tick(&mut e, reply + 16 * S).is_empty());
}

#[test]
fn silent_waits_for_silent_after() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    let reply = S + 100 * MS;
    assert!(k.tick(&mut e, 2 * S).is_empty());
    k.send(flow7(), 3 * S, 5);
    assert!(k.tick(&mut e, reply + 10 * S - 1).is_empty());
    assert_eq!(kinds(&k.tick(&mut e, reply + 10 * S)), [ReportKind::Silent]);
}

#[test]
fn never_silent_before_established() {
    let mut e = engine();
    let k = Kernel::default();
    k.send(flow7(), S, 1);
    run(&mut e, &[ev(Fact::FirstTx { bytes: 10 }, S)]);
    k.send(flow7(), 5 * S, 10);
    assert!(k.tick(&mut e, 20 * S).is_empty());
}

#[test]
fn resumed_after_silent_carries_the_time_of_the_reply() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    k.tick(&mut e, 2 * S);
    k.send(flow7(), 5 * S, 3);
    assert_eq!(kinds(&k.tick(&mut e, 12 * S)), [ReportKind::Silent]);
    k.recv(flow7(), 13 * S + 500 * MS);
    let r = k.tick(&mut e, 14 * S);
    assert_eq!(kinds(&r), [ReportKind::Resumed]);
    assert_eq!(r[0].ts_ns, 13 * S + 500 * MS);
    assert_eq!(
        r[0].detail,
        Detail::Resumed {
            after: Trouble::Silent,
            quiet_ns: 12 * S + 400 * MS
        }
    );
    // Silent again later, from the new reply on.
    k.send(flow7(), 20 * S, 2);
    assert_eq!(kinds(&k.tick(&mut e, 24 * S)), [ReportKind::Silent]);
}

#[test]
fn resumed_after_unreachable() {
    let mut e = engine();
    let k = Kernel::default();
    let get = |id: &FlowId| k.get(id);
    established(&mut e, &k);
    k.tick(&mut e, 2 * S);
    let r = e.on(&ev(icmp(3, 3, Some(111), Verdict::Notified), 3 * S), &get);
    assert_eq!(kinds(&r), [ReportKind::Unreachable]);
    // A reply from before the ICMP does not count.
    assert!(k.tick(&mut e, 4 * S).is_empty());
    k.recv(flow7(), 5 * S);
    let r = k.tick(&mut e, 6 * S);
    assert_eq!(kinds(&r), [ReportKind::Resumed]);
    assert_eq!(
        r[0].detail,
        Detail::Resumed {
            after: Trouble::Unreachable,
            quiet_ns: 5 * S - (S + 100 * MS)
        }
    );
}

#[test]
fn a_first_reply_after_unreachable_is_the_establish() {
    let mut e = engine();
    let k = Kernel::default();
    let get = |id: &FlowId| k.get(id);
    k.send(flow7(), S, 1);
    run(
        &mut e,
        &[
            ev(Fact::FirstTx { bytes: 10 }, S),
            ev(icmp(3, 1, None, Verdict::Discarded), 2 * S),
        ],
    );
    k.recv(flow7(), 3 * S);
    assert!(
        k.tick(&mut e, 3 * S + 1).is_empty(),
        "no RESUMED before the peer was ever heard"
    );
    let r = e.on(&ev(Fact::FirstRx { bytes: 10 }, 3 * S), &get);
    assert_eq!(kinds(&r), [ReportKind::Establish]);
    assert!(k.tick(&mut e, 4 * S).is_empty());
}

#[test]
fn idle_flows_expire() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    k.send(flow7(), 50 * S, 1);
    let idle = ns(e.config().idle_timeout);
    assert!(k.tick(&mut e, 50 * S + idle - 1).is_empty());
    let reads = Cell::new(0);
    k.wake(&mut [&mut e]);
    let r = e.on_tick(50 * S + idle, &|id| {
        reads.set(reads.get() + 1);
        k.get(id)
    });
    assert_eq!(reads.get(), 1, "the expiring flow's counters are read once");
    assert_eq!(kinds(&r), [ReportKind::Close]);
    let (reason, stats) = close_stats(&r[0]);
    assert_eq!(reason, CloseReason::Idle);
    assert_eq!((stats.tx_datagrams, stats.rx_datagrams), (2, 1));
    assert_eq!(stats.duration_ns, 50 * S + idle - S);
    assert!(e.flows().is_empty());
    // The socket itself is forgotten one idle period after it was last named.
    assert_eq!(e.stats().sockets_tracked, 1);
    k.tick(&mut e, 2 * idle + 50 * S);
    assert_eq!(e.stats().sockets_tracked, 0);
}

/// A socket named by an event but never given a flow is forgotten one idle period after it
/// was last named; a socket that closed leaves nothing behind for the ticks to look at.
#[test]
fn flowless_sockets_are_forgotten_and_closed_ones_leave_nothing() {
    let mut e = engine();
    let idle = ns(e.config().idle_timeout);
    run(&mut e, &[ev(Fact::SendError { errno: 111 }, S)]);
    assert!(e.flows().is_empty());
    run(&mut e, &[ev(Fact::Holder, 10 * S)]);
    assert_eq!(e.stats().sockets_tracked, 1);
    e.on_tick(S + idle, &none);
    assert_eq!(e.stats().sockets_tracked, 1, "named again at 10 s");
    e.on_tick(10 * S + idle, &none);
    assert_eq!(e.stats().sockets_tracked, 0);
    // A resolver's sockets: one query each, then closed.
    for cookie in 1..=100 {
        let at = 20 * S + cookie;
        let query = KernelEvent {
            cookie,
            ..ev(Fact::FirstTx { bytes: 30 }, at)
        };
        let close = KernelEvent {
            cookie,
            ..ev(Fact::Close, at)
        };
        run(&mut e, &[query, close]);
    }
    assert_eq!(e.stats().sockets_tracked, 0);
    assert!(e.flowless.is_empty());
}

#[test]
fn a_quiet_flow_from_before_udpmon_expires_without_a_report() {
    let mut e = engine();
    let existing = |cookie, ts| KernelEvent {
        cookie,
        connected: true,
        ..ev(Fact::Existing, ts)
    };
    run(&mut e, &[existing(7, S), existing(8, S)]);
    let traffic = KernelEvent {
        cookie: 8,
        ..ev(Fact::FirstTx { bytes: 1 }, 2 * S)
    };
    assert!(run(&mut e, &[traffic]).is_empty());
    let idle = ns(e.config().idle_timeout);
    let r = e.on_tick(2 * S + idle, &none);
    assert_eq!(kinds(&r), [ReportKind::Close]);
    assert_eq!(r[0].cookie, 8, "the flow that carried traffic");
    assert!(e.flows().is_empty());
    assert_eq!(e.stats().flows_closed, 2);
}

#[test]
fn a_connected_flow_without_traffic_expires_too() {
    let mut e = engine();
    run(&mut e, &[ev(Fact::Connect, S)]);
    let idle = ns(e.config().idle_timeout);
    let r = e.on_tick(S + idle, &none);
    assert_eq!(kinds(&r), [ReportKind::Close]);
}

#[test]
fn a_full_table_evicts_the_least_recently_active_flow() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 2,
        ..EngineConfig::default()
    });
    let peer = |n: u8, ts| KernelEvent {
        remote: SocketAddr::new(IpAddr::from([10, 0, 0, n]), 53),
        ..ev(Fact::FirstRx { bytes: 1 }, ts)
    };
    run(&mut e, &[peer(2, S), peer(3, 2 * S)]);
    // Activity on .2 makes .3 the least recently active.
    run(
        &mut e,
        &[KernelEvent {
            remote: addr("10.0.0.2:53"),
            ..ev(Fact::FirstTx { bytes: 1 }, 3 * S)
        }],
    );
    let r = run(&mut e, &[peer(4, 4 * S)]);
    assert_eq!(kinds(&r), [ReportKind::Close, ReportKind::Accept]);
    assert_eq!(r[0].remote, addr("10.0.0.3:53"));
    assert_eq!(close_stats(&r[0]).0, CloseReason::Evicted);
    let st = e.stats();
    assert_eq!((st.flows_tracked, st.flows_evicted), (2, 1));
}

/// The seed experiment, laptop side: `nc -u -p 54321 server 12345`, "hi", "ack" comes back,
/// the server is killed, "hello..?" draws a port unreachable.
#[test]
fn seed_laptop_side() {
    let laptop = |fact, ts| KernelEvent {
        cookie: 41,
        local: addr("192.168.1.4:54321"),
        remote: addr("35.190.176.201:12345"),
        connected: true,
        who: Identity {
            tgid: 41383,
            pid: 41383,
            ..nc()
        },
        ..ev(fact, ts)
    };
    let mut e = engine();
    let icmp_ev = KernelEvent {
        task_unrelated: true,
        who: Identity {
            tgid: 0,
            pid: 0,
            comm: "swapper/0".into(),
            ..laptop(
                Fact::Icmp(Icmp {
                    ty: 3,
                    code: 3,
                    errno: Some(111),
                    from: "35.190.176.201".parse().unwrap(),
                    verdict: Verdict::Notified,
                }),
                30 * S,
            )
            .who
        },
        ..laptop(
            Fact::Icmp(Icmp {
                ty: 3,
                code: 3,
                errno: Some(111),
                from: "35.190.176.201".parse().unwrap(),
                verdict: Verdict::Notified,
            }),
            30 * S,
        )
    };
    let r = run(
        &mut e,
        &[
            laptop(Fact::Connect, S),
            laptop(Fact::FirstTx { bytes: 3 }, 5 * S),
            laptop(Fact::FirstRx { bytes: 4 }, 10 * S),
            icmp_ev,
        ],
    );
    assert_eq!(
        kinds(&r),
        [
            ReportKind::Connect,
            ReportKind::Establish,
            ReportKind::Unreachable
        ]
    );
    assert!(r.iter().all(|r| r.who.tgid == 41383 && r.who.comm == "nc"));
    assert!(r.iter().all(|r| r.remote == addr("35.190.176.201:12345")));
    let Detail::Unreachable(u) = &r[2].detail else {
        panic!("{r:?}")
    };
    assert_eq!(u.verdict, Verdict::Notified);
    assert_eq!(
        u.errno.map(rules::errno_name).as_deref(),
        Some("ECONNREFUSED")
    );
    assert_eq!(u.from, "35.190.176.201".parse::<IpAddr>().unwrap());
    assert!(u.connected);
}

/// The seed experiment, server side: `nc -u -l 0.0.0.0 12345` gets "hi", answers "ack", is
/// killed, and the laptop's "hello..?" arrives at a port without a socket.
#[test]
fn seed_server_side() {
    let server = |fact, ts| KernelEvent {
        cookie: 19,
        local: addr("10.142.0.2:12345"),
        remote: addr("51.6.191.203:54321"),
        who: Identity {
            tgid: 19075,
            pid: 19075,
            ..nc()
        },
        ..ev(fact, ts)
    };
    let mut e = engine();
    let no_socket = KernelEvent {
        cookie: 0,
        task_unrelated: true,
        who: Identity {
            tgid: 0,
            pid: 0,
            comm: "swapper/0".into(),
            ..server(Fact::NoSocket, 40 * S).who
        },
        ..server(Fact::NoSocket, 40 * S)
    };
    let r = run(
        &mut e,
        &[
            server(Fact::FirstRx { bytes: 3 }, 5 * S),
            server(Fact::FirstTx { bytes: 4 }, 10 * S),
            server(Fact::Close, 20 * S),
            no_socket,
        ],
    );
    assert_eq!(
        kinds(&r),
        [
            ReportKind::Accept,
            ReportKind::Establish,
            ReportKind::Close,
            ReportKind::Refused
        ]
    );
    let (reason, stats) = close_stats(&r[2]);
    assert_eq!(reason, CloseReason::Closed);
    assert_eq!(
        (
            stats.rx_datagrams,
            stats.rx_bytes,
            stats.tx_datagrams,
            stats.tx_bytes
        ),
        (1, 3, 1, 4)
    );
    assert_eq!(stats.duration_ns, 15 * S);
    assert_eq!(r[3].local, addr("10.142.0.2:12345"));
    assert_eq!(r[3].remote, addr("51.6.191.203:54321"));
    let owner = r[3].last_owner().expect("last owner");
    assert_eq!((owner.tgid, &*owner.comm.to_str()), (19075, "nc"));
}

mod props {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    /// One step of a random history. Traffic goes through a simulated kernel that, like the
    /// real one, reports only a flow's first datagram each way.
    #[derive(Clone, Debug)]
    enum Step {
        Traffic {
            cookie: u64,
            peer: u8,
            tx: bool,
        },
        Connect {
            cookie: u64,
            peer: Option<u8>,
        },
        Icmp {
            cookie: u64,
            peer: u8,
            code: u8,
            verdict: u8,
        },
        AppError {
            cookie: u64,
            errno: i32,
        },
        Close {
            cookie: u64,
        },
        Existing {
            cookie: u64,
            peer: Option<u8>,
        },
        NoSocket {
            peer: u8,
        },
        /// The holder (tgid 100) exits, or execs.
        Exit,
        Exec,
        Tick,
        /// The kernel's LRU map drops a flow's entry (no record): its next datagram makes a
        /// new one, reported as a first datagram.
        Drop {
            cookie: u64,
            peer: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let cookie = 1..5u64;
        let peer = 0..4u8;
        prop_oneof![
            6 => (cookie.clone(), peer.clone(), any::<bool>())
                .prop_map(|(cookie, peer, tx)| Step::Traffic { cookie, peer, tx }),
            2 => (cookie.clone(), prop::option::of(peer.clone()))
                .prop_map(|(cookie, peer)| Step::Connect { cookie, peer }),
            2 => (cookie.clone(), peer.clone(), 0..4u8, 1..5u8)
                .prop_map(|(cookie, peer, code, verdict)| Step::Icmp { cookie, peer, code, verdict }),
            1 => (cookie.clone(), prop::sample::select(vec![11, 111, 1, 113]))
                .prop_map(|(cookie, errno)| Step::AppError { cookie, errno }),
            1 => cookie.clone().prop_map(|cookie| Step::Close { cookie }),
            1 => (cookie, prop::option::of(peer.clone()))
                .prop_map(|(cookie, peer)| Step::Existing { cookie, peer }),
            1 => peer.prop_map(|peer| Step::NoSocket { peer }),
            1 => prop_oneof![Just(Step::Exit), Just(Step::Exec)],
            3 => Just(Step::Tick),
            1 => (1..5u64, 0..4u8).prop_map(|(cookie, peer)| Step::Drop { cookie, peer }),
        ]
    }

    /// Mostly traffic and ticks, in gaps around the times that matter to a sleeping flow (the
    /// kernel's wake after a second, a flow's sleep after two, SILENT after three), on a few
    /// sockets to few peers so that flows share a peer.
    fn traffic_step() -> impl Strategy<Value = Step> {
        let cookie = 1..3u64;
        let peer = 0..2u8;
        // Sends more often than answers, for silences.
        let tx = prop::sample::select(vec![true, true, false]);
        prop_oneof![
            8 => (cookie.clone(), peer.clone(), tx)
                .prop_map(|(cookie, peer, tx)| Step::Traffic { cookie, peer, tx }),
            6 => Just(Step::Tick),
            1 => (cookie.clone(), peer.clone()).prop_map(|(cookie, peer)| Step::Drop { cookie, peer }),
            1 => (cookie.clone(), peer, 0..4u8, 1..4u8)
                .prop_map(|(cookie, peer, code, verdict)| Step::Icmp { cookie, peer, code, verdict }),
            1 => cookie.prop_map(|cookie| Step::Close { cookie }),
        ]
    }

    fn remote(peer: u8) -> SocketAddr {
        match peer {
            3 => addr("[fd00::3]:53"),
            p => SocketAddr::new(IpAddr::from([10, 0, 0, p]), 53),
        }
    }

    fn family(a: &SocketAddr) -> Family {
        if a.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn kev(fact: Fact, ts: u64, cookie: u64, remote: SocketAddr) -> KernelEvent {
        KernelEvent {
            cookie,
            remote,
            family: family(&remote),
            ..ev(fact, ts)
        }
    }

    /// What the reports say, checked against what was fed in.
    #[derive(Default)]
    struct Checker {
        /// Flows reported opened (CONNECT/ACCEPT) and not yet closed.
        open: HashSet<FlowId>,
        /// Directions fed to the engine per flow since it was last reported closed.
        seen: HashMap<FlowId, (bool, bool)>,
        established: HashSet<FlowId>,
        evictions: u64,
        /// Summed over the SUMMARY reports: new flows, closed flows.
        summarised: (u64, u64),
        /// The last SUMMARY's `open`, by socket.
        summary_open: HashMap<u64, u64>,
    }

    impl Checker {
        fn fed(&mut self, id: FlowId, tx: bool) {
            let s = self.seen.entry(id).or_default();
            if tx { s.0 = true } else { s.1 = true }
        }

        fn check(&mut self, reports: &[Report], e: &Engine) -> Result<(), TestCaseError> {
            if let Err(why) = e.check_ports() {
                prop_assert!(false, "{why}");
            }
            for r in reports {
                let id = FlowId {
                    cookie: r.cookie,
                    remote: r.remote,
                };
                match r.kind {
                    ReportKind::Connect | ReportKind::Accept => {
                        prop_assert!(self.open.insert(id), "opened twice: {r:?}");
                    }
                    ReportKind::Establish => {
                        let (tx, rx) = self.seen.get(&id).copied().unwrap_or_default();
                        prop_assert!(tx && rx, "established without traffic both ways: {r:?}");
                        prop_assert!(self.established.insert(id), "established twice: {r:?}");
                    }
                    ReportKind::Summary => {
                        let Detail::SocketSummary(s) = &r.detail else {
                            continue;
                        };
                        let before = self.summary_open.get(&r.cookie).copied().unwrap_or(0);
                        prop_assert_eq!(s.open, before + s.new_flows - s.closed, "{:?}", r);
                        self.summary_open.insert(r.cookie, s.open);
                        self.summarised.0 += s.new_flows;
                        self.summarised.1 += s.closed;
                    }
                    ReportKind::Close => {
                        self.open.remove(&id);
                        self.seen.remove(&id);
                        self.established.remove(&id);
                        if matches!(
                            r.detail,
                            Detail::Closed {
                                reason: CloseReason::Evicted,
                                ..
                            }
                        ) {
                            self.evictions += 1;
                        }
                    }
                    _ => {}
                }
            }
            let live: HashSet<FlowId> = e.flows().into_iter().collect();
            prop_assert!(
                self.open.is_subset(&live),
                "reported open but neither closed nor live: {:?}",
                self.open.difference(&live).collect::<Vec<_>>()
            );
            prop_assert!(live.len() <= e.config().max_flows);
            if let Err(why) = e.check_peers() {
                return Err(TestCaseError::fail(why));
            }
            prop_assert_eq!(e.stats().flows_tracked, live.len());
            // A summarised flow's eviction is counted, not reported.
            if e.config().summary.is_some() {
                prop_assert!(self.evictions <= e.stats().flows_evicted);
            } else {
                prop_assert_eq!(e.stats().flows_evicted, self.evictions);
            }
            // Each summarised flow is counted once opened and once closed, and a flow whose
            // opening was printed is not summarised.
            let (summarised_live, _, new, closed) = e.summary_census(&flow7());
            let (opened, gone) = (self.summarised.0 + new, self.summarised.1 + closed);
            prop_assert_eq!(opened, e.stats().flows_summarised);
            prop_assert_eq!(opened - gone, summarised_live);
            for id in &self.open {
                prop_assert!(!e.summary_census(id).1, "{:?} printed and summarised", id);
            }
            Ok(())
        }
    }

    /// Two engines fed alike: one whose flows sleep between ticks, one whose every tick
    /// looks at every flow. Whatever the history, they report the same.
    struct Twins {
        e: Engine,
        sleepless: Engine,
    }

    impl Twins {
        fn new(cfg: EngineConfig) -> Self {
            let mut sleepless = Engine::new(cfg.clone());
            sleepless.sleepless = true;
            Self {
                e: Engine::new(cfg),
                sleepless,
            }
        }

        fn tick(&mut self, now: u64, counters: CountersFn<'_>) -> Vec<Report> {
            let r = self.e.on_tick(now, counters);
            assert_eq!(r, self.sleepless.on_tick(now, counters), "tick at {now}");
            r
        }
    }

    impl OneEvent for Twins {
        fn on(&mut self, ev: &KernelEvent, counters: CountersFn<'_>) -> Vec<Report> {
            let r = self.e.on(ev, counters);
            assert_eq!(r, self.sleepless.on(ev, counters), "{ev:?}");
            r
        }
    }

    fn simulate(
        steps: &[(Step, u64)],
        max_flows: usize,
        summary: Option<SummaryConfig>,
    ) -> Result<(), TestCaseError> {
        let mut e = Twins::new(EngineConfig {
            silent_after: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(20),
            max_flows,
            summary,
            ..EngineConfig::default()
        });
        let kernel = Kernel::default();
        let mut chk = Checker::default();
        let mut ts = S;
        for (step, dt) in steps {
            // Mostly forward, sometimes slightly backwards (events from other CPUs).
            ts = (ts + dt).saturating_sub(if dt % 7 == 0 { 2 * MS } else { 0 });
            let get = |id: &FlowId| kernel.get(id);
            let reports = match *step {
                Step::Traffic { cookie, peer, tx } => {
                    let id = FlowId {
                        cookie,
                        remote: remote(peer),
                    };
                    let first = kernel.get(&id).is_none_or(|c| {
                        if tx {
                            c.tx_datagrams == 0
                        } else {
                            c.rx_datagrams == 0
                        }
                    });
                    if tx {
                        kernel.send(id, ts, 1);
                    } else {
                        kernel.recv(id, ts);
                    }
                    if first {
                        chk.fed(id, tx);
                        let fact = if tx {
                            Fact::FirstTx { bytes: 10 }
                        } else {
                            Fact::FirstRx { bytes: 10 }
                        };
                        e.on(&kev(fact, ts, cookie, id.remote), &get)
                    } else {
                        Vec::new()
                    }
                }
                Step::Connect { cookie, peer } => {
                    let r = peer.map_or(addr("0.0.0.0:0"), remote);
                    e.on(&kev(Fact::Connect, ts, cookie, r), &get)
                }
                Step::Icmp {
                    cookie,
                    peer,
                    code,
                    verdict,
                } => {
                    let verdict = match verdict {
                        1 => Verdict::Notified,
                        2 => Verdict::Queued,
                        3 => Verdict::Discarded,
                        _ => Verdict::NoSocket,
                    };
                    let cookie = if verdict == Verdict::NoSocket {
                        0
                    } else {
                        cookie
                    };
                    e.on(
                        &kev(icmp(3, code, None, verdict), ts, cookie, remote(peer)),
                        &get,
                    )
                }
                Step::AppError { cookie, errno } => {
                    let fact = Fact::SendError { errno };
                    e.on(&kev(fact, ts, cookie, addr("0.0.0.0:0")), &get)
                }
                Step::Close { cookie } => {
                    let r = e.on(&kev(Fact::Close, ts, cookie, addr("0.0.0.0:0")), &get);
                    kernel.0.borrow_mut().retain(|id, _| id.cookie != cookie);
                    r
                }
                Step::Existing { cookie, peer } => {
                    let ev = KernelEvent {
                        connected: peer.is_some(),
                        task_unrelated: true,
                        ..kev(
                            Fact::Existing,
                            ts,
                            cookie,
                            peer.map_or(addr("0.0.0.0:0"), remote),
                        )
                    };
                    e.on(&ev, &get)
                }
                Step::NoSocket { peer } => e.on(&kev(Fact::NoSocket, ts, 0, remote(peer)), &get),
                Step::Exit => e.on(&exit(100, ts), &get),
                Step::Drop { cookie, peer } => {
                    let id = FlowId {
                        cookie,
                        remote: remote(peer),
                    };
                    kernel.0.borrow_mut().remove(&id);
                    Vec::new()
                }
                Step::Exec => e.on(&ev(Fact::Exec, ts), &get),
                Step::Tick => {
                    kernel.wake(&mut [&mut e.e, &mut e.sleepless]);
                    e.tick(ts, &get)
                }
            };
            chk.check(&reports, &e.e)?;
            prop_assert_eq!(e.e.to_forget(), e.sleepless.to_forget());
            prop_assert_eq!(e.e.stats(), e.sleepless.stats());
            // What the caller does after a close, so that the flow's next
            // datagram is reported as new; each one reported closed, or summarised.
            for id in e.e.to_forget() {
                kernel.0.borrow_mut().remove(id);
            }
            for r in &reports {
                if let Detail::Closed { .. } = r.detail {
                    let id = FlowId {
                        cookie: r.cookie,
                        remote: r.remote,
                    };
                    prop_assert!(e.e.to_forget().contains(&id), "{:?} kept in the kernel", r);
                }
            }
        }
        // Every socket closes, and the intervals end: every summarised flow was reported
        // closed.
        for cookie in 1..5 {
            ts += MS;
            let r = e.on(&kev(Fact::Close, ts, cookie, addr("0.0.0.0:0")), &none);
            chk.check(&r, &e.e)?;
        }
        for _ in 0..3 {
            ts += 30 * S;
            let r = e.tick(ts, &none);
            chk.check(&r, &e.e)?;
        }
        prop_assert_eq!(chk.summarised.0, chk.summarised.1);
        prop_assert_eq!(chk.summarised.0, e.e.stats().flows_summarised);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_histories_keep_the_invariants(
            steps in prop::collection::vec((step(), 0..4 * S), 1..200),
            max_flows in 1..12usize,
        ) {
            simulate(&steps, max_flows, None)?;
        }

        /// Histories of traffic and ticks: flows that sleep between ticks report exactly what
        /// flows looked at by every tick do (`Twins`).
        #[test]
        fn sleeping_flows_miss_nothing(
            steps in prop::collection::vec((traffic_step(), 0..2000 * MS), 1..300),
        ) {
            simulate(&steps, 64, None)?;
        }

        /// The same histories on sockets that become busy after a flow or two, with
        /// intervals of a few steps and few problem lines: every invariant holds, and the
        /// summaries' counts add up to the flows the engine opened and closed.
        #[test]
        fn random_histories_add_up_in_summaries(
            steps in prop::collection::vec((step(), 0..4 * S), 1..600),
            max_flows in 1..12usize,
            threshold in 1..3u32,
            problem_lines in 0..2u32,
        ) {
            let summary = SummaryConfig {
                threshold,
                interval: Duration::from_secs(5),
                problem_lines,
            };
            simulate(&steps, max_flows, Some(summary))?;
        }
    }
}

/// The kernel's LRU map dropped a live flow's entry and its next datagram made a new one:
/// the CLOSE still counts what both entries saw, and the renewal is counted as a loss.
#[test]
fn a_kernel_entry_recreated_under_pressure_keeps_its_counts() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    k.send(flow7(), 2 * S, 3);
    let read = |id: &FlowId| k.get(id);
    e.on_tick(2 * S, &read);
    k.0.borrow_mut().remove(&flow7());
    k.send(flow7(), 3 * S, 2);
    e.on_tick(3 * S, &read);
    assert_eq!(e.stats().kernel_entries_renewed, 1);
    let r = e.on(&ev(Fact::Close, 4 * S), &read);
    let (reason, st) = close_stats(r.last().unwrap());
    assert_eq!(reason, CloseReason::Closed);
    assert_eq!((st.tx_datagrams, st.tx_bytes), (6, 60));
    assert_eq!((st.rx_datagrams, st.rx_bytes), (1, 10));
    assert_eq!(st.last_tx_ns, 3 * S);
    assert_eq!(e.stats().kernel_entries_renewed, 1);
}

/// A flow whose wake record was lost sleeps on, until a read of every flow finds that its
/// counters moved.
#[test]
fn a_bulk_read_wakes_a_flow_whose_wake_was_lost() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    k.tick(&mut e, 2 * S);
    k.tick(&mut e, 4 * S);
    assert_eq!(e.due(5 * S), 0, "asleep");
    k.send(flow7(), 5 * S, 3);
    k.1.borrow_mut().clear();
    assert_eq!(e.due(6 * S), 0, "no wake came");
    e.absorb(&flow7(), &k.get(&flow7()).unwrap());
    assert_eq!(e.due(7 * S), 1);
    let r = e.on_tick(7 * S, &none);
    assert!(r.is_empty());
    assert_eq!(kinds(&k.tick(&mut e, 15 * S)), [ReportKind::Silent]);
}

/// Issue 12: a server that predates udpmon and stays quiet past `--idle-timeout` still has
/// its owner when its next new peer arrives (the first datagram is seen in softirq, where the
/// running task is not the owner).
#[test]
fn a_quiet_server_from_before_udpmon_keeps_its_owner() {
    let mut e = engine();
    let server = KernelEvent {
        cookie: 8,
        local: addr("10.0.0.1:53"),
        remote: addr("0.0.0.0:0"),
        ..ev(Fact::Existing, S)
    };
    run(&mut e, &[server]);
    let idle = ns(e.config().idle_timeout);
    for t in 1..=3 {
        e.on_tick(S + t * idle, &none);
    }
    assert_eq!(e.stats().sockets_tracked, 1, "kept while open");
    let from_softirq = KernelEvent {
        cookie: 8,
        local: addr("10.0.0.1:53"),
        remote: addr("10.0.0.9:4000"),
        task_unrelated: true,
        who: Identity {
            tgid: 0,
            pid: 0,
            comm: "swapper/0".into(),
            ..ev(Fact::FirstRx { bytes: 30 }, S + 4 * idle).who
        },
        ..ev(Fact::FirstRx { bytes: 30 }, S + 4 * idle)
    };
    let r = run(&mut e, &[from_softirq]);
    assert_eq!(kinds(&r), [ReportKind::Accept]);
    assert_eq!((r[0].who.tgid, &*r[0].who.comm.to_str()), (100, "nc"));
    // Closed: forgotten.
    let close = KernelEvent {
        cookie: 8,
        ..ev(Fact::Close, S + 5 * idle)
    };
    run(&mut e, &[close]);
    e.on_tick(S + 7 * idle, &none);
    assert_eq!(e.stats().sockets_tracked, 0);
}

// Peers across flows (peer.rs): a forwarder, dnsmasq (tgid 300) in netns 7, asks its upstream
// 10.0.0.9:53 from a fresh socket (cookie) and port per query.

const UPSTREAM: &str = "10.0.0.9:53";

/// dnsmasq, tgid 300, as [`fwd`] names it.
fn forwarder() -> Identity {
    fwd(Fact::Close, 0, 0).who
}

fn fwd(fact: Fact, ts: u64, cookie: u64) -> KernelEvent {
    KernelEvent {
        cookie,
        local: SocketAddr::new(IpAddr::from([10, 0, 0, 1]), 40000 + cookie as u16),
        remote: addr(UPSTREAM),
        who: Identity {
            tgid: 300,
            pid: 300,
            comm: "dnsmasq".into(),
            process: "dnsmasq".into(),
            netns: 7,
            ..nc()
        },
        ..ev(fact, ts)
    }
}

/// Events and ticks, fed in time order (events before a tick at the same time).
#[derive(Default)]
struct Timeline(Vec<(u64, Option<KernelEvent>)>);

impl Timeline {
    fn at(&mut self, ts: u64, e: KernelEvent) {
        self.0.push((ts, Some(e)));
    }

    /// One query from a fresh socket: sent at `ts`, answered `answer` later if at all, the
    /// socket closed `close` after the send.
    fn query(&mut self, cookie: u64, ts: u64, answer: Option<u64>, close: u64) {
        self.at(ts, fwd(Fact::FirstTx { bytes: 40 }, ts, cookie));
        if let Some(a) = answer {
            self.at(ts + a, fwd(Fact::FirstRx { bytes: 90 }, ts + a, cookie));
        }
        self.at(ts + close, fwd(Fact::Close, ts + close, cookie));
    }

    /// Ticks at every whole second from `from` to `to` seconds.
    fn ticks(&mut self, from: u64, to: u64) {
        for t in from..=to {
            self.0.push((t * S, None));
        }
    }

    fn run(mut self, e: &mut Engine) -> Vec<Report> {
        self.0.sort_by_key(|(ts, ev)| (*ts, ev.is_none()));
        let mut out = Vec::new();
        for (ts, ev) in self.0 {
            out.extend(match ev {
                Some(ev) => e.on(&ev, &none),
                None => e.on_tick(ts, &none),
            });
            e.check_peers().unwrap();
        }
        out
    }
}

fn of_scope(r: &[Report], scope: Scope) -> Vec<&Report> {
    r.iter().filter(|r| r.scope() == Some(scope)).collect()
}

/// Issue 15: answers, then silence over many fresh flows: one SILENT for the peer, naming
/// the forwarder, then RESUMED when an answer comes.
#[test]
fn a_resolvers_upstream_goes_silent_across_fresh_flows() {
    let mut e = engine();
    let mut tl = Timeline::default();
    for i in 0..5 {
        tl.query(100 + i, (1 + i) * S, Some(5 * MS), 10 * MS);
    }
    // Dropped from 6 s on: dnsmasq gives each query up after 3 s.
    for i in 5..20 {
        tl.query(100 + i, (1 + i) * S, None, 3 * S);
    }
    tl.query(120, 21 * S + 500 * MS, Some(5 * MS), 10 * MS);
    tl.ticks(1, 25);
    let r = tl.run(&mut e);

    assert!(of_scope(&r, Scope::Flow).is_empty(), "no flow-level SILENT");
    let peer = of_scope(&r, Scope::Peer);
    assert_eq!(
        kinds(&peer.iter().copied().cloned().collect::<Vec<_>>()),
        [ReportKind::Silent, ReportKind::Resumed]
    );
    let (silent, resumed) = (peer[0], peer[1]);
    let last_answer = 5 * S + 5 * MS;
    // The first unanswered query left at 6 s: silent from the tick at 16 s.
    assert_eq!(silent.ts_ns, 16 * S);
    assert_eq!(
        silent.detail,
        Detail::PeerSilent {
            no_reply_ns: 16 * S - last_answer,
            unanswered: Unanswered {
                flows: 11,
                sends: 11,
                for_ns: 10 * S,
                last_answer_ns: Some(last_answer),
            },
        }
    );
    assert_eq!(
        (
            silent.who.tgid,
            &*silent.who.process.to_str(),
            &*silent.who.comm.to_str(),
            silent.who.netns
        ),
        (300, "dnsmasq", "dnsmasq", 7)
    );
    // Many sockets: no one cookie, and the local address without a port.
    assert_eq!(silent.cookie, 0);
    assert_eq!(
        (silent.local, silent.remote),
        (addr("10.0.0.1:0"), addr(UPSTREAM))
    );
    let answer = 21 * S + 505 * MS;
    assert_eq!(resumed.ts_ns, answer);
    assert_eq!(
        resumed.detail,
        Detail::PeerResumed {
            quiet_ns: answer - last_answer,
            unanswered: Unanswered {
                flows: 15,
                sends: 15,
                for_ns: answer - 6 * S,
                last_answer_ns: Some(last_answer),
            },
        }
    );
    assert_eq!((resumed.remote, resumed.who.tgid), (addr(UPSTREAM), 300));
    assert_eq!(e.stats().peers_tracked, 1);
}

#[test]
fn a_peer_that_never_answered_is_reported_so() {
    let mut e = engine();
    let mut tl = Timeline::default();
    for i in 0..6 {
        tl.query(100 + i, (1 + i) * S, None, 2 * S);
    }
    tl.query(110, 12 * S + 500 * MS, Some(MS), 10 * MS);
    tl.ticks(1, 14);
    let r = tl.run(&mut e);
    let peer = of_scope(&r, Scope::Peer);
    assert_eq!(peer.len(), 2, "{peer:?}");
    assert_eq!(peer[0].ts_ns, 11 * S);
    assert_eq!(
        peer[0].detail,
        Detail::PeerSilent {
            no_reply_ns: 10 * S,
            unanswered: Unanswered {
                flows: 6,
                sends: 6,
                for_ns: 10 * S,
                last_answer_ns: None,
            },
        }
    );
    assert_eq!(
        peer[1].detail,
        Detail::PeerResumed {
            quiet_ns: 11 * S + 501 * MS,
            unanswered: Unanswered {
                flows: 6,
                sends: 6,
                for_ns: 11 * S + 501 * MS,
                last_answer_ns: None,
            },
        }
    );
}

/// Queries that draw ICMP errors, on the socket or after it closed, are UNREACHABLE, not a
/// silence; once the errors stop and the queries go unanswered, the silence counts from then.
#[test]
fn icmp_errors_are_not_a_silence() {
    let mut e = engine();
    let mut tl = Timeline::default();
    for i in 0..2 {
        tl.query(100 + i, (1 + i) * S, Some(5 * MS), 10 * MS);
    }
    for i in 2..20 {
        let (cookie, ts) = (100 + i, (1 + i) * S);
        let refused = icmp(3, 3, Some(111), Verdict::Discarded);
        if i % 2 == 0 {
            tl.query(cookie, ts, None, 10 * MS);
            tl.at(ts + MS, fwd(refused, ts + MS, cookie));
        } else {
            // The socket is gone when the error arrives: found through the port's last owner.
            tl.query(cookie, ts, None, MS / 2);
            let gone = KernelEvent {
                cookie: 0,
                task_unrelated: true,
                ..fwd(icmp(3, 3, Some(111), Verdict::NoSocket), ts + MS, cookie)
            };
            tl.at(ts + MS, gone);
        }
    }
    for i in 20..40 {
        tl.query(100 + i, (1 + i) * S, None, 2 * S);
    }
    tl.ticks(1, 40);
    let r = tl.run(&mut e);
    let unreachable = r
        .iter()
        .filter(|r| r.kind == ReportKind::Unreachable)
        .count();
    assert_eq!(unreachable, 18);
    let silent: Vec<_> = r.iter().filter(|r| r.kind == ReportKind::Silent).collect();
    assert_eq!(silent.len(), 1, "{silent:?}");
    // The errors stopped after the query of 20 s: silent from the first query after them.
    assert_eq!(silent[0].ts_ns, 31 * S);
    let Detail::PeerSilent { unanswered, .. } = silent[0].detail else {
        panic!("{:?}", silent[0]);
    };
    assert_eq!((unanswered.flows, unanswered.sends), (11, 11));
    assert_eq!(unanswered.last_answer_ns, Some(2 * S + 5 * MS));
}

/// dnsmasq's connected socket to the upstream (cookie 50), established, on the kernel map.
fn long_flow() -> FlowId {
    FlowId {
        cookie: 50,
        remote: addr(UPSTREAM),
    }
}

fn establish_long_flow(e: &mut Engine, k: &Kernel) {
    k.send(long_flow(), S, 1);
    k.recv(long_flow(), S + 100 * MS);
    let get = |id: &FlowId| k.get(id);
    for (fact, ts) in [
        (Fact::FirstTx { bytes: 40 }, S),
        (Fact::FirstRx { bytes: 90 }, S + 100 * MS),
    ] {
        e.on(&fwd(fact, ts, 50), &get);
    }
}

/// The flow-level SILENT of a long-lived flow comes first: the peer does not report the same
/// silence again, though its fresh flows go unanswered too, nor its end.
#[test]
fn a_flow_level_silent_holds_back_the_peer_level_one() {
    let mut e = engine();
    let k = Kernel::default();
    establish_long_flow(&mut e, &k);
    let mut r = Vec::new();
    for t in 2..=22 {
        let get = |id: &FlowId| k.get(id);
        if t < 20 {
            k.send(long_flow(), t * S, 1);
        }
        if (8..12).contains(&t) {
            let fresh = 200 + t;
            r.extend(e.on(&fwd(Fact::FirstTx { bytes: 40 }, t * S, fresh), &get));
            r.extend(e.on(&fwd(Fact::Close, t * S + 2 * S / 3, fresh), &get));
        }
        if t == 20 {
            k.recv(long_flow(), 20 * S);
        }
        r.extend(k.tick(&mut e, t * S + S / 2));
        e.check_peers().unwrap();
    }
    let silences: Vec<_> = r
        .iter()
        .filter(|r| matches!(r.kind, ReportKind::Silent | ReportKind::Resumed))
        .collect();
    assert_eq!(silences.len(), 2, "{silences:?}");
    assert_eq!(
        (silences[0].kind, silences[0].scope()),
        (ReportKind::Silent, Some(Scope::Flow))
    );
    assert_eq!(silences[0].cookie, 50);
    assert_eq!(silences[0].ts_ns, 11 * S + S / 2);
    assert_eq!(
        (silences[1].kind, silences[1].scope()),
        (ReportKind::Resumed, Some(Scope::Flow))
    );
}

/// The peer notices first: the long-lived flow's own SILENT, due later, is not reported while
/// the peer's stands. The peer answers on a fresh flow (RESUMED, peer scope) but the long
/// flow still hears nothing: from then on its silence is its own, reported at flow scope.
#[test]
fn a_peer_level_silent_holds_back_the_flow_level_one() {
    let mut e = engine();
    let k = Kernel::default();
    establish_long_flow(&mut e, &k);
    let mut r = Vec::new();
    for t in 2..=18 {
        let get = |id: &FlowId| k.get(id);
        if t == 2 || t == 13 {
            k.send(long_flow(), t * S + S / 5, 1);
        }
        if t == 2 || t == 3 {
            r.extend(e.on(&fwd(Fact::FirstTx { bytes: 40 }, t * S, 200 + t), &get));
        }
        if t == 15 {
            for (fact, ts) in [
                (Fact::FirstTx { bytes: 40 }, 15 * S),
                (Fact::FirstRx { bytes: 90 }, 15 * S + S / 10),
            ] {
                r.extend(e.on(&fwd(fact, ts, 215), &get));
            }
        }
        if t == 17 {
            k.recv(long_flow(), 17 * S);
        }
        r.extend(k.tick(&mut e, t * S + S / 2));
        e.check_peers().unwrap();
    }
    let silences: Vec<_> = r
        .iter()
        .filter(|r| matches!(r.kind, ReportKind::Silent | ReportKind::Resumed))
        .map(|r| (r.kind, r.scope().unwrap(), r.ts_ns))
        .collect();
    assert_eq!(
        silences,
        [
            (ReportKind::Silent, Scope::Peer, 12 * S + S / 2),
            (ReportKind::Resumed, Scope::Peer, 15 * S + S / 10),
            (ReportKind::Silent, Scope::Flow, 15 * S + S / 2),
            (ReportKind::Resumed, Scope::Flow, 17 * S),
        ]
    );
    let Detail::PeerSilent { unanswered, .. } = &r
        .iter()
        .find(|r| r.scope() == Some(Scope::Peer))
        .unwrap()
        .detail
    else {
        panic!("not a peer SILENT");
    };
    // The two fresh flows and the long one (one datagram since its last answer).
    assert_eq!((unanswered.flows, unanswered.sends), (3, 3));
}

/// Workers of one program count as one client; another program, another namespace, or a
/// peer that spoke first do not add to its flows.
#[test]
fn peers_group_by_namespace_program_and_remote() {
    let mut e = engine();
    let mut tl = Timeline::default();
    let worker = |tgid: u32, fact, ts, cookie| KernelEvent {
        who: Identity {
            tgid,
            pid: tgid,
            ..forwarder()
        },
        ..fwd(fact, ts, cookie)
    };
    tl.at(S, worker(300, Fact::FirstTx { bytes: 40 }, S, 1));
    tl.at(2 * S, worker(301, Fact::FirstTx { bytes: 40 }, 2 * S, 2));
    let other = |fact, ts, cookie, process: &str, netns| KernelEvent {
        who: Identity {
            tgid: 400,
            pid: 400,
            comm: process.into(),
            process: process.into(),
            netns,
            ..forwarder()
        },
        ..fwd(fact, ts, cookie)
    };
    tl.at(S, other(Fact::FirstTx { bytes: 40 }, S, 3, "unbound", 7));
    tl.at(
        2 * S,
        other(Fact::FirstTx { bytes: 40 }, 2 * S, 4, "dnsmasq", 8),
    );
    // A peer that spoke first to two sockets of a server, answered, never heard again.
    for cookie in [5, 6] {
        let client = |fact, ts| KernelEvent {
            remote: addr("10.0.0.5:4000"),
            ..other(fact, ts, cookie, "server", 7)
        };
        tl.at(S, client(Fact::FirstRx { bytes: 40 }, S));
        tl.at(S + MS, client(Fact::FirstTx { bytes: 40 }, S + MS));
    }
    tl.ticks(1, 15);
    let r = tl.run(&mut e);
    let silent: Vec<_> = r.iter().filter(|r| r.kind == ReportKind::Silent).collect();
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0].ts_ns, 11 * S);
    // Named after the most recent worker.
    assert_eq!(
        (silent[0].who.tgid, silent[0].who.netns, silent[0].remote),
        (301, 7, addr(UPSTREAM))
    );
    let Detail::PeerSilent { unanswered, .. } = &silent[0].detail else {
        panic!("{:?}", silent[0]);
    };
    assert_eq!((unanswered.flows, unanswered.sends), (2, 2));
    assert_eq!(
        e.stats().peers_tracked,
        3,
        "the server's client is no peer of it"
    );
}

/// Peers are an LRU of at most --max-flows; those with live flows stay, the others go
/// least recently used first, counted. A peer that comes back starts afresh.
#[test]
fn peer_evictions_are_counted() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 2,
        ..EngineConfig::default()
    });
    let mut tl = Timeline::default();
    let to = |fact, ts, cookie, remote: &str| KernelEvent {
        remote: addr(remote),
        ..fwd(fact, ts, cookie)
    };
    // Answered, then idle: 10.0.0.9 and 10.0.0.8.
    for (i, remote) in [UPSTREAM, "10.0.0.8:53"].into_iter().enumerate() {
        let (cookie, ts) = (1 + i as u64, (1 + i as u64) * S);
        tl.at(ts, to(Fact::FirstTx { bytes: 40 }, ts, cookie, remote));
        tl.at(
            ts + MS,
            to(Fact::FirstRx { bytes: 90 }, ts + MS, cookie, remote),
        );
        tl.at(ts + 2 * MS, to(Fact::Close, ts + 2 * MS, cookie, remote));
    }
    // A third peer, its flow left open: 10.0.0.9 (idle longest) makes room.
    tl.at(
        3 * S,
        to(Fact::FirstTx { bytes: 40 }, 3 * S, 3, "10.0.0.7:53"),
    );
    // 10.0.0.9 again, unanswered now: 10.0.0.8 makes room; its answer was forgotten.
    for (cookie, ts) in [(4, 4 * S), (5, 5 * S)] {
        tl.query(cookie, ts, None, S / 2);
    }
    tl.ticks(1, 15);
    let r = tl.run(&mut e);
    let st = e.stats();
    assert_eq!((st.peers_tracked, st.peers_evicted), (2, 2));
    let silent: Vec<_> = r.iter().filter(|r| r.kind == ReportKind::Silent).collect();
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0].remote, addr(UPSTREAM));
    let Detail::PeerSilent { unanswered, .. } = &silent[0].detail else {
        panic!("{:?}", silent[0]);
    };
    assert_eq!(unanswered.last_answer_ns, None);
}

/// Discovery to a multicast group (SSDP from a fresh socket each time): answers come from the
/// responders' own addresses, so the group is no peer that could fall silent.
#[test]
fn multicast_and_broadcast_destinations_are_no_peers() {
    let mut e = engine();
    let mut tl = Timeline::default();
    for (i, group) in [
        "239.255.255.250:1900",
        "255.255.255.255:67",
        "[ff02::fb]:5353",
    ]
    .into_iter()
    .enumerate()
    {
        for q in 0..3 {
            let (cookie, ts) = (10 * i as u64 + q + 1, (1 + q) * S);
            let to = |fact, ts| KernelEvent {
                remote: addr(group),
                family: if group.starts_with('[') {
                    Family::V6
                } else {
                    Family::V4
                },
                ..fwd(fact, ts, cookie)
            };
            tl.at(ts, to(Fact::FirstTx { bytes: 100 }, ts));
            tl.at(ts + S / 2, to(Fact::Close, ts + S / 2));
        }
    }
    tl.ticks(1, 20);
    let r = tl.run(&mut e);
    assert!(r.iter().all(|r| r.kind != ReportKind::Silent), "{r:?}");
    assert_eq!(e.stats().peers_tracked, 0);
}

// Busy-socket summaries (summary.rs): dnsmasq (tgid 300) serves on socket 50, 10.0.0.1:53,
// to clients 10.0.1.1 from many ports.

const SERVER: u64 = 50;

fn client(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 0, 1, 1]), port)
}

fn srv(fact: Fact, ts: u64, port: u16) -> KernelEvent {
    KernelEvent {
        cookie: SERVER,
        local: addr("10.0.0.1:53"),
        remote: client(port),
        who: Identity {
            tgid: 300,
            pid: 300,
            comm: "dnsmasq".into(),
            process: "dnsmasq".into(),
            ..nc()
        },
        ..ev(fact, ts)
    }
}

/// Summaries every 10 s, idle timeout 20 s.
fn summarising(threshold: u32, problem_lines: u32) -> Engine {
    Engine::new(EngineConfig {
        idle_timeout: Duration::from_secs(20),
        summary: Some(SummaryConfig {
            threshold,
            interval: Duration::from_secs(10),
            problem_lines,
        }),
        ..EngineConfig::default()
    })
}

/// One query from `port` at `ts`, and its answer 1 ms later.
fn served(tl: &mut Timeline, ts: u64, port: u16) {
    tl.at(ts, srv(Fact::FirstRx { bytes: 40 }, ts, port));
    tl.at(ts + MS, srv(Fact::FirstTx { bytes: 90 }, ts + MS, port));
}

fn socket_summaries(r: &[Report]) -> Vec<(u64, SocketSummary)> {
    r.iter()
        .filter_map(|r| match &r.detail {
            Detail::SocketSummary(s) => Some((r.ts_ns, **s)),
            _ => None,
        })
        .collect()
}

fn count(r: &[Report], kind: ReportKind) -> usize {
    r.iter().filter(|r| r.kind == kind).count()
}

/// Issue 11, item 6: past the threshold, a socket's new flows are counted in one SUMMARY per
/// interval; the flows opened before keep their lines, from ACCEPT to CLOSE; the socket
/// stays busy while intervals cross the threshold, and its summarised flows are reported
/// until the last has closed.
#[test]
fn a_busy_socket_is_summarised_per_interval() {
    let mut e = summarising(3, 5);
    let mut tl = Timeline::default();
    // The first tick (1 s) starts the intervals: they end at 11 s, 21 s, 31 s...
    for i in 0..10 {
        served(&mut tl, 2 * S + i * 100 * MS, 1000 + i as u16);
    }
    for i in 0..5 {
        served(&mut tl, 12 * S + i * 100 * MS, 2000 + i as u16);
    }
    // Still busy in the third interval (the second crossed the threshold), which opens one
    // flow: no longer busy in the fourth.
    served(&mut tl, 25 * S, 2500);
    served(&mut tl, 35 * S, 3000);
    tl.ticks(1, 80);
    let r = tl.run(&mut e);
    let printed = |kind, port| {
        r.iter()
            .filter(|r| r.kind == kind && r.remote == client(port))
            .count()
    };
    for port in [1000, 1001, 1002, 3000] {
        assert_eq!(printed(ReportKind::Accept, port), 1, "{port}: {r:#?}");
        assert_eq!(printed(ReportKind::Establish, port), 1, "{port}");
        assert_eq!(printed(ReportKind::Close, port), 1, "{port}");
    }
    for port in (1003..1010).chain(2000..2005).chain([2500]) {
        assert_eq!(printed(ReportKind::Accept, port), 0, "{port}");
        assert_eq!(printed(ReportKind::Close, port), 0, "{port}");
    }
    assert_eq!(count(&r, ReportKind::Accept), 4);
    let sums = socket_summaries(&r);
    let at: Vec<u64> = sums.iter().map(|(ts, _)| ts / S).collect();
    // 11 s and 21 s busy, 31 s its last busy interval; then the summarised flows expire
    // 20 s after their answers (at 2-3 s, 12-13 s and 25 s) in the intervals ending 31 s,
    // 41 s and 51 s.
    assert_eq!(at, [11, 21, 31, 41, 51], "{sums:#?}");
    let (_, first) = &sums[0];
    assert_eq!(
        (
            first.new_flows,
            first.accepted,
            first.established,
            first.open
        ),
        (7, 7, 7, 7)
    );
    assert_eq!(
        first.interval_ns,
        11 * S - (2 * S + 300 * MS),
        "since it became busy"
    );
    assert_eq!((sums[1].1.new_flows, sums[1].1.open), (5, 12));
    assert_eq!(sums[1].1.interval_ns, 10 * S);
    let total = |f: fn(&SocketSummary) -> u64| sums.iter().map(|(_, s)| f(s)).sum::<u64>();
    assert_eq!(total(|s| s.new_flows), 13);
    assert_eq!(total(|s| s.closed), 13);
    assert_eq!(total(|s| s.never_established), 0);
    assert_eq!(sums.last().unwrap().1.open, 0);
    let r0 = r.iter().find(|r| r.kind == ReportKind::Summary).unwrap();
    assert_eq!(
        (
            r0.cookie,
            r0.who.tgid,
            &*r0.who.process.to_str(),
            r0.local,
            r0.remote
        ),
        (
            SERVER,
            300,
            "dnsmasq",
            addr("10.0.0.1:53"),
            addr("0.0.0.0:0")
        )
    );
    assert_eq!(r0.scope(), Some(Scope::Socket));
    assert_eq!(
        e.stats().flows_opened,
        e.stats().flows_closed,
        "all expired"
    );
}

/// A busy socket's problems are printed up to the per-kind limit, the rest counted; the
/// RESUMED of a folded UNREACHABLE is folded with it.
#[test]
fn a_busy_sockets_problems_are_rate_limited() {
    let mut e = summarising(1, 2);
    let k = Kernel::default();
    let get = |id: &FlowId| k.get(id);
    k.tick(&mut e, S);
    let mut r = Vec::new();
    let unreachable = srv(icmp(3, 3, Some(111), Verdict::Discarded), 0, 0);
    for i in 0..6u16 {
        let ts = 2 * S + u64::from(i) * MS;
        let id = FlowId {
            cookie: SERVER,
            remote: client(4000 + i),
        };
        k.recv(id, ts);
        r.extend(e.on(&srv(Fact::FirstRx { bytes: 40 }, ts, 4000 + i), &get));
        r.extend(e.on(&srv(Fact::FirstTx { bytes: 90 }, ts, 4000 + i), &get));
        k.send(id, ts, 1);
        let err = KernelEvent {
            ts_ns: ts + MS / 2,
            remote: client(4000 + i),
            ..unreachable.clone()
        };
        r.extend(e.on(&err, &get));
    }
    // The first flow's error was printed (not summarised), then two of the five summarised
    // ones'.
    assert_eq!(count(&r, ReportKind::Unreachable), 3, "{r:#?}");
    // The last flow's peer speaks again: its UNREACHABLE was folded, so is the RESUMED.
    let last = FlowId {
        cookie: SERVER,
        remote: client(4005),
    };
    k.recv(last, 3 * S);
    // And the first summarised flow's, whose UNREACHABLE was printed: its RESUMED too.
    let shown = FlowId {
        cookie: SERVER,
        remote: client(4001),
    };
    k.recv(shown, 3 * S);
    r.extend(k.tick(&mut e, 4 * S));
    let resumed: Vec<_> = r.iter().filter(|r| r.kind == ReportKind::Resumed).collect();
    assert_eq!(resumed.len(), 1, "{resumed:#?}");
    assert_eq!(resumed[0].remote, client(4001));
    r.extend(k.tick(&mut e, 11 * S));
    let sums = socket_summaries(&r);
    assert_eq!(sums.len(), 1, "{r:#?}");
    let s = sums[0].1;
    assert_eq!(s.new_flows, 5);
    assert_eq!(
        s.problems.unreachable,
        ByVerdict {
            discarded: 5,
            ..ByVerdict::default()
        }
    );
    assert_eq!(
        s.folded,
        Folded {
            unreachable: 3,
            resumed: 1,
            ..Folded::default()
        }
    );
}

/// A busy socket's close ends its summaries at once, with its flows' closes; with
/// `--no-summary` every flow has its lines.
#[test]
fn a_busy_sockets_close_reports_its_last_summary() {
    for summary in [true, false] {
        let mut e = summarising(2, 5);
        if !summary {
            e.cfg.summary = None;
        }
        let mut tl = Timeline::default();
        for i in 0..5 {
            served(&mut tl, 2 * S + i * MS, 5000 + i as u16);
        }
        tl.at(3 * S, srv(Fact::Close, 3 * S, 0));
        tl.ticks(1, 30);
        let r = tl.run(&mut e);
        let sums = socket_summaries(&r);
        if summary {
            assert_eq!(kinds(&r[..2]), [ReportKind::Accept, ReportKind::Establish]);
            assert_eq!(count(&r, ReportKind::Accept), 2);
            assert_eq!(count(&r, ReportKind::Close), 2);
            assert_eq!(sums.len(), 1, "{r:#?}");
            assert_eq!(sums[0].0, 3 * S);
            assert_eq!((sums[0].1.new_flows, sums[0].1.closed), (3, 3));
            assert_eq!(sums[0].1.open, 0);
        } else {
            assert_eq!(count(&r, ReportKind::Accept), 5);
            assert_eq!(count(&r, ReportKind::Close), 5);
            assert!(sums.is_empty());
        }
    }
}

/// Closes the server socket at `ts`: its reports, and how many flows' counters were read.
fn close_server_counting_reads(e: &mut Engine, ts: u64) -> (Vec<Report>, u32) {
    let reads = Cell::new(0);
    let counting = |_: &FlowId| {
        reads.set(reads.get() + 1);
        None
    };
    let r = e.on(&srv(Fact::Close, ts, 0), &counting);
    (r, reads.get())
}

/// A busy server's summarised clients are counted, not reported: their closes read no
/// counters (a system call each), while those of the flows reported line by line do.
#[test]
fn summarised_flows_close_without_reading_counters() {
    let mut e = summarising(2, 5);
    e.on_tick(S, &none);
    for i in 0..5u16 {
        let ts = 2 * S + u64::from(i) * MS;
        e.on(&srv(Fact::FirstRx { bytes: 40 }, ts, 5000 + i), &none);
        e.on(&srv(Fact::FirstTx { bytes: 90 }, ts + MS, 5000 + i), &none);
    }
    assert_eq!(e.stats().flows_summarised, 3);
    let (r, reads) = close_server_counting_reads(&mut e, 3 * S);
    assert_eq!(count(&r, ReportKind::Close), 2, "{r:#?}");
    assert_eq!(reads, 2, "only the reported flows' counters are read");
    let sums = socket_summaries(&r);
    assert_eq!((sums[0].1.new_flows, sums[0].1.closed), (3, 3));
    assert_eq!(e.to_forget().len(), 5, "every kernel entry goes");
}

/// A busy socket that opens its flows itself (a client of many servers): each flow has a
/// peer, which takes what the flow sent and heard since it last took them, so even a
/// summarised flow's close reads its counters.
#[test]
fn summarised_flows_with_a_peer_read_their_counters_at_close() {
    let mut e = summarising(2, 5);
    e.on_tick(S, &none);
    for i in 0..5u16 {
        e.on(
            &srv(
                Fact::FirstTx { bytes: 40 },
                2 * S + u64::from(i) * MS,
                5000 + i,
            ),
            &none,
        );
    }
    assert_eq!(e.stats().flows_summarised, 3);
    let (r, reads) = close_server_counting_reads(&mut e, 3 * S);
    assert_eq!(
        reads, 5,
        "every flow with a peer has its counters read: {r:#?}"
    );
    let sums = socket_summaries(&r);
    assert_eq!((sums[0].1.new_flows, sums[0].1.closed), (3, 3));
}

// Issue 15, item 3: a peer whose fresh flows keep drawing the same ICMP error.

fn peer_summaries(r: &[Report]) -> Vec<(u64, PeerSummary)> {
    r.iter()
        .filter_map(|r| match &r.detail {
            Detail::PeerSummary(s) => Some((r.ts_ns, PeerSummary::clone(s))),
            _ => None,
        })
        .collect()
}

/// A query from a fresh socket at `ts` whose upstream rejects it 1 ms later; its socket
/// closes 2 ms after the send (`close_first`: before the error comes back).
fn rejected(tl: &mut Timeline, cookie: u64, ts: u64, close_first: bool) {
    let err = icmp(3, 3, None, Verdict::Discarded);
    tl.at(ts, fwd(Fact::FirstTx { bytes: 40 }, ts, cookie));
    let close = if close_first {
        ts + MS / 2
    } else {
        ts + 2 * MS
    };
    tl.at(close, fwd(Fact::Close, close, cookie));
    let at = ts + MS;
    let error = if close_first {
        KernelEvent {
            cookie: 0,
            fact: icmp(3, 3, None, Verdict::NoSocket),
            ..fwd(err.clone(), at, cookie)
        }
    } else {
        fwd(err, at, cookie)
    };
    tl.at(at, error);
}

/// The first UNREACHABLE of a run of errors is printed at once, the next ones (flows with
/// their socket, or whose socket is gone) are counted in one SUMMARY with scope peer per
/// interval; an answer ends the run, so the next error is printed again.
#[test]
fn a_peers_repeated_unreachable_is_folded() {
    let mut e = engine();
    let mut tl = Timeline::default();
    for i in 0..8 {
        rejected(&mut tl, 100 + i, (2 + i) * S, false);
    }
    // Intervals end at 11 s, 21 s (the first tick is at 1 s).
    for i in 0..4 {
        rejected(&mut tl, 200 + i, 12 * S + i * S, false);
    }
    tl.query(300, 17 * S, Some(MS), 2 * MS);
    rejected(&mut tl, 400, 18 * S, false);
    tl.ticks(1, 25);
    let r = tl.run(&mut e);
    let printed: Vec<u64> = r
        .iter()
        .filter(|r| r.kind == ReportKind::Unreachable)
        .map(|r| r.ts_ns / S)
        .collect();
    assert_eq!(printed, [2, 18], "{r:#?}");
    let sums = peer_summaries(&r);
    let at: Vec<u64> = sums.iter().map(|(ts, _)| *ts).collect();
    // The first interval; then the answer ends the run with what it folded so far.
    assert_eq!(at, [11 * S, 17 * S + MS], "{sums:#?}");
    let (_, first) = &sums[0];
    assert_eq!((first.unreachable, first.folded), (8, 7));
    assert_eq!(
        first.interval_ns,
        11 * S - (2 * S + MS),
        "since the first error"
    );
    assert_eq!(
        (first.icmp.ty, first.icmp.code, first.icmp.verdict),
        (3, 3, Verdict::Discarded)
    );
    assert_eq!((sums[1].1.unreachable, sums[1].1.folded), (4, 4));
    let s = r.iter().find(|r| r.kind == ReportKind::Summary).unwrap();
    assert_eq!(s.scope(), Some(Scope::Peer));
    assert_eq!(
        (s.cookie, s.who.tgid, &*s.who.process.to_str(), s.remote),
        (0, 300, "dnsmasq", addr(UPSTREAM))
    );
    // Nothing lost: printed and folded are every error.
    let folded: u64 = sums.iter().map(|(_, s)| s.folded).sum();
    assert_eq!(printed.len() as u64 + folded, 13);
    assert_eq!(e.peers.runs(), 1, "the last error's run");

    // Without summaries, every error has its line.
    let mut e = Engine::new(EngineConfig {
        summary: None,
        ..EngineConfig::default()
    });
    let mut tl = Timeline::default();
    for i in 0..8 {
        rejected(&mut tl, 100 + i, (2 + i) * S, false);
    }
    tl.ticks(1, 25);
    let r = tl.run(&mut e);
    assert_eq!(count(&r, ReportKind::Unreachable), 8);
    assert_eq!(count(&r, ReportKind::Summary), 0);
}

/// Errors for sockets already closed fold the same way, through the port's last owner; an
/// error of another kind starts a new run, printed; a run ends after the idle timeout
/// without errors.
#[test]
fn a_peers_run_of_errors_changes_with_the_error_and_ends_when_quiet() {
    let mut e = summarising(100, 5);
    let mut tl = Timeline::default();
    for i in 0..3 {
        rejected(&mut tl, 100 + i, (2 + i) * S, true);
    }
    let host = 5 * S + 500 * MS;
    tl.at(host, fwd(Fact::FirstTx { bytes: 40 }, host, 150));
    tl.at(
        host + MS,
        fwd(icmp(3, 1, None, Verdict::Discarded), host + MS, 150),
    );
    for i in 0..2 {
        rejected(&mut tl, 200 + i, (6 + i) * S, false);
    }
    // 20 s idle timeout: the run of the error at 7 s is over at the end of the
    // interval at 31 s; a new error after it is printed.
    rejected(&mut tl, 300, 33 * S, false);
    tl.ticks(1, 45);
    let r = tl.run(&mut e);
    let printed: Vec<(u64, u8, Verdict)> = r
        .iter()
        .filter_map(|r| match &r.detail {
            Detail::Unreachable(u) => Some((r.ts_ns / S, u.code, u.verdict)),
            _ => None,
        })
        .collect();
    assert_eq!(
        printed,
        [
            (2, 3, Verdict::NoSocket),
            (5, 1, Verdict::Discarded),
            (6, 3, Verdict::Discarded),
            (33, 3, Verdict::Discarded),
        ],
        "{r:#?}"
    );
    let sums = peer_summaries(&r);
    let got: Vec<(u64, u64, u64, Verdict)> = sums
        .iter()
        .map(|(ts, s)| (*ts, s.unreachable, s.folded, s.icmp.verdict))
        .collect();
    // The no-socket run ends with the host unreachable (its summary then); the
    // discarded one at the interval's end.
    assert_eq!(
        got,
        [
            (host + MS, 3, 2, Verdict::NoSocket),
            (11 * S, 2, 1, Verdict::Discarded)
        ]
    );
}

/// Ticks that jitter around the grid of the first one end every interval on time, not a
/// tick late.
#[test]
fn summary_intervals_keep_to_the_first_ticks_grid() {
    let mut e = summarising(1, 5);
    let k = Kernel::default();
    let get = |id: &FlowId| k.get(id);
    k.tick(&mut e, S + 7 * MS);
    let mut at = Vec::new();
    for t in 2..=41u64 {
        // Three flows each second keep the socket busy.
        for p in 0..3 {
            let ts = t * S + 100 * MS + p * MS;
            e.on(
                &srv(Fact::FirstRx { bytes: 40 }, ts, (t * 10 + p) as u16),
                &get,
            );
        }
        // Ticks a few milliseconds either side of the first one's grid: those that end the
        // intervals come early.
        let jitter = if t % 2 == 0 { 9 * MS } else { 3 * MS };
        let r = k.tick(&mut e, t * S + jitter);
        at.extend(socket_summaries(&r).iter().map(|(ts, _)| ts / S));
    }
    assert_eq!(at, [11, 21, 31, 41]);
}

/// A client socket that sends to many peers is busy the same way: its CONNECTs are counted as
/// `connected`, and its flows' closes with the socket.
#[test]
fn a_busy_client_socket_counts_its_connects() {
    let mut e = summarising(2, 5);
    e.on_tick(S, &none);
    let mut r = Vec::new();
    for p in 0..5u8 {
        let to = KernelEvent {
            remote: SocketAddr::new(IpAddr::from([10, 0, 2, p]), 123),
            ..ev(Fact::FirstTx { bytes: 48 }, 2 * S + u64::from(p) * MS)
        };
        r.extend(e.on(&to, &none));
    }
    r.extend(e.on(&ev(Fact::Close, 3 * S), &none));
    assert_eq!(count(&r, ReportKind::Connect), 2, "{r:#?}");
    assert_eq!(count(&r, ReportKind::Close), 2);
    let sums = socket_summaries(&r);
    assert_eq!(sums.len(), 1);
    let s = sums[0].1;
    assert_eq!(
        (
            s.new_flows,
            s.connected,
            s.accepted,
            s.closed,
            s.never_established
        ),
        (3, 3, 0, 3, 3)
    );
    assert_eq!(e.stats().flows_summarised, 3);
}

/// A peer forgotten to make room takes its run's counts with it only after they are
/// reported: in a summary up to its eviction, at the next interval's end.
#[test]
fn an_evicted_peers_folded_errors_are_still_reported() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 2,
        ..EngineConfig::default()
    });
    let mut tl = Timeline::default();
    for i in 0..3 {
        rejected(&mut tl, 100 + i, (2 + i) * S, false);
    }
    // Two other upstreams: the first peer, flowless and least recently used, makes room.
    for (i, other) in ["10.0.0.8:53", "10.0.0.7:53"].into_iter().enumerate() {
        let (cookie, ts) = (200 + i as u64, 6 * S + i as u64 * S);
        let to = |fact, ts| KernelEvent {
            remote: addr(other),
            ..fwd(fact, ts, cookie)
        };
        tl.at(ts, to(Fact::FirstTx { bytes: 40 }, ts));
        tl.at(ts + MS, to(Fact::FirstRx { bytes: 90 }, ts + MS));
        tl.at(ts + 2 * MS, to(Fact::Close, ts + 2 * MS));
    }
    tl.ticks(1, 12);
    let r = tl.run(&mut e);
    assert_eq!(e.stats().peers_evicted, 1, "{r:#?}");
    let sums = peer_summaries(&r);
    assert_eq!(sums.len(), 1, "{r:#?}");
    let (ts, s) = &sums[0];
    // The second other upstream's flow evicted it.
    assert_eq!((*ts, s.unreachable, s.folded), (7 * S, 3, 2));
    assert_eq!(s.interval_ns, 7 * S - (2 * S + MS));
    let summary = r.iter().find(|r| r.kind == ReportKind::Summary).unwrap();
    assert_eq!(summary.remote, addr(UPSTREAM));
    assert_eq!(count(&r, ReportKind::Unreachable), 1);
}

/// At exit, what a busy socket counted since the last interval's end is reported, not lost.
#[test]
fn finish_reports_the_summaries_in_the_making() {
    let mut e = summarising(3, 5);
    let mut tl = Timeline::default();
    for i in 0..6 {
        served(&mut tl, 2 * S + i * 100 * MS, 1000 + i as u16);
    }
    // The first tick starts the intervals; none ends before the exit at 5 s.
    tl.ticks(1, 4);
    let r = tl.run(&mut e);
    assert!(socket_summaries(&r).is_empty(), "{r:#?}");
    let last = e.finish(5 * S);
    let sums = socket_summaries(&last);
    assert_eq!(sums.len(), 1, "{last:#?}");
    let (ts, s) = &sums[0];
    assert_eq!(*ts, 5 * S);
    assert_eq!(
        (s.new_flows, s.accepted, s.established, s.open),
        (3, 3, 3, 3)
    );
    // Without summaries there is nothing to finish.
    let mut plain = Engine::new(EngineConfig {
        summary: None,
        ..EngineConfig::default()
    });
    assert!(plain.finish(5 * S).is_empty());
}

/// Process `tgid`'s exit, as the kernel tells it: no socket.
fn exit(tgid: u32, ts: u64) -> KernelEvent {
    KernelEvent {
        cookie: 0,
        who: Identity {
            tgid,
            ..Identity::default()
        },
        ..ev(Fact::Exit, ts)
    }
}

fn who(r: &Report) -> (u32, u32, Name, Name, u32, u64) {
    let w = &r.who;
    (w.tgid, w.pid, w.comm, w.process, w.uid, w.cgroup)
}

const NO_ONE: Name = Name::EMPTY;

fn name(s: &str) -> Name {
    Name::new(s)
}

/// Issue 12: the socket's holder exited (a daemon's parent, a descriptor's sender); nothing
/// of the socket's says who holds it now, so what the engine reports on its own timer names
/// no one rather than a pid the system may give to another process. The next event of the
/// socket names its holder again.
#[test]
fn timer_reports_name_no_one_once_the_holder_exited() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    assert!(k.tick(&mut e, 2 * S).is_empty());
    assert!(run(&mut e, &[exit(100, 2 * S)]).is_empty());
    k.send(flow7(), 3 * S, 2);
    let r = k.tick(&mut e, 14 * S);
    assert_eq!(kinds(&r), [ReportKind::Silent]);
    // Its cgroup is kept, as the kernel keeps it: the new holder is, as a rule, its child.
    assert_eq!(who(&r[0]), (0, 0, NO_ONE, NO_ONE, 0, 25));
    assert_eq!(r[0].who.netns, 4026531833);
    // The child's first call names it.
    let child = KernelEvent {
        who: Identity {
            tgid: 200,
            pid: 200,
            ..ev(Fact::Holder, 15 * S).who
        },
        ..ev(Fact::Holder, 15 * S)
    };
    assert!(run(&mut e, &[child]).is_empty());
    let r = k.tick(&mut e, 130 * S);
    assert_eq!(kinds(&r), [ReportKind::Close]);
    assert_eq!(who(&r[0]), (200, 200, name("nc"), name("nc"), 1000, 25));
}

/// A holder that closes its socket on its way out (the kernel closes an exiting process's
/// files after it has told of the exit) is named by that close.
#[test]
fn a_close_by_the_exiting_holder_names_it() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    let r = run(&mut e, &[exit(100, 2 * S), ev(Fact::Close, 2 * S)]);
    assert_eq!(kinds(&r), [ReportKind::Close]);
    assert_eq!(who(&r[0]), (100, 101, name("nc"), name("nc"), 1000, 25));
}

/// A holder that exec'd another program is named after it.
#[test]
fn timer_reports_name_the_program_a_holder_execd() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    assert!(k.tick(&mut e, 2 * S).is_empty());
    let exec = KernelEvent {
        cookie: 0,
        who: Identity {
            pid: 100,
            comm: "socat".into(),
            process: "socat".into(),
            uid: 0,
            ..ev(Fact::Exec, 2 * S).who
        },
        ..ev(Fact::Exec, 2 * S)
    };
    assert!(run(&mut e, &[exec]).is_empty());
    k.send(flow7(), 3 * S, 2);
    let r = k.tick(&mut e, 14 * S);
    assert_eq!(kinds(&r), [ReportKind::Silent]);
    assert_eq!(who(&r[0]), (100, 100, name("socat"), name("socat"), 0, 25));
    // ... and then exited.
    assert!(run(&mut e, &[exit(100, 15 * S)]).is_empty());
    let r = k.tick(&mut e, 130 * S);
    assert_eq!(kinds(&r), [ReportKind::Close]);
    assert_eq!(who(&r[0]), (0, 0, NO_ONE, NO_ONE, 0, 25));
}

/// The exited process's number, given to a new process, names the new one's sockets; the
/// old sockets still name no one.
#[test]
fn a_reused_pid_names_only_the_new_process() {
    let mut e = engine();
    let k = Kernel::default();
    established(&mut e, &k);
    assert!(k.tick(&mut e, 2 * S).is_empty());
    let other = FlowId {
        cookie: 8,
        remote: addr("10.0.0.3:53"),
    };
    let reborn = |fact, ts| KernelEvent {
        cookie: 8,
        remote: other.remote,
        ..ev(fact, ts)
    };
    k.send(other, 3 * S, 1);
    k.recv(other, 3 * S + MS);
    let r = run(
        &mut e,
        &[
            exit(100, 2 * S),
            reborn(Fact::FirstTx { bytes: 1 }, 3 * S),
            reborn(Fact::FirstRx { bytes: 1 }, 3 * S + MS),
        ],
    );
    assert_eq!(kinds(&r), [ReportKind::Connect, ReportKind::Establish]);
    assert_eq!(who(&r[0]).0, 100);
    assert!(k.tick(&mut e, 4 * S).is_empty());
    k.send(flow7(), 4 * S, 2);
    k.send(other, 4 * S, 2);
    let r = k.tick(&mut e, 15 * S);
    assert_eq!(kinds(&r), [ReportKind::Silent, ReportKind::Silent]);
    let by_cookie = |c: u64| r.iter().find(|r| r.cookie == c).map(who).unwrap();
    assert_eq!(by_cookie(7), (0, 0, NO_ONE, NO_ONE, 0, 25));
    assert_eq!(by_cookie(8), (100, 101, name("nc"), name("nc"), 1000, 25));
}

/// A peer across the flows of short-lived programs (`dig` per query) is named after its
/// most recent flow's process; once that one exited, after its program only.
#[test]
fn a_peers_report_names_no_exited_pid() {
    let mut e = engine();
    let mut tl = Timeline::default();
    for i in 0..6 {
        let ts = (1 + i) * S;
        let dig = |fact, ts| KernelEvent {
            who: Identity {
                tgid: 500 + i as u32,
                pid: 500 + i as u32,
                comm: "dig".into(),
                process: "dig".into(),
                ..forwarder()
            },
            ..fwd(fact, ts, 100 + i)
        };
        tl.at(ts, dig(Fact::FirstTx { bytes: 40 }, ts));
        // As the kernel tells it: the exit, then the close of the exiting process's socket.
        tl.at(ts + 2 * S, exit(500 + i as u32, ts + 2 * S));
        tl.at(ts + 2 * S, dig(Fact::Close, ts + 2 * S));
    }
    tl.ticks(1, 12);
    let r = tl.run(&mut e);
    let peer = of_scope(&r, Scope::Peer);
    assert_eq!(
        kinds(&peer.iter().copied().cloned().collect::<Vec<_>>()),
        [ReportKind::Silent]
    );
    assert_eq!(who(peer[0]), (0, 0, NO_ONE, name("dig"), 0, 25));
}

/// The agent reads the kernel map in bulk before a tick and folds each flow's counters in
/// (`Engine::absorb`), then ticks without counters: the reports and counts are those of a
/// tick that asks for each flow's counters itself (a silence, its end, a kernel entry
/// recreated under pressure, an idle close).
#[test]
fn counters_absorbed_before_a_tick_are_that_ticks() {
    let k = Kernel::default();
    let mut asks = engine();
    let mut absorbs = engine();
    established(&mut asks, &k);
    // The same events, without counting the datagrams in the kernel map twice.
    run(
        &mut absorbs,
        &[
            ev(Fact::FirstTx { bytes: 10 }, S),
            ev(Fact::FirstRx { bytes: 10 }, S + 100 * MS),
        ],
    );
    let read = |id: &FlowId| k.get(id);
    let tick = |asks: &mut Engine, absorbs: &mut Engine, now: u64| {
        k.wake(&mut [&mut *asks, &mut *absorbs]);
        let asked = asks.on_tick(now, &read);
        for (id, c) in k.0.borrow().iter() {
            absorbs.absorb(id, c);
        }
        let absorbed = absorbs.on_tick(now, &none);
        assert_eq!(asked, absorbed, "tick at {now}");
        asked
    };
    tick(&mut asks, &mut absorbs, 2 * S);
    k.send(flow7(), 3 * S, 4);
    let r = tick(&mut asks, &mut absorbs, 12 * S);
    assert_eq!(kinds(&r), [ReportKind::Silent]);
    // The kernel's LRU map drops the entry; the next datagrams make a new one, with the
    // records of first datagrams (repeats, to the engine), not wakes.
    k.0.borrow_mut().remove(&flow7());
    k.send(flow7(), 13 * S, 1);
    k.recv(flow7(), 13 * S + 5 * MS);
    for e in [&mut asks, &mut absorbs] {
        run(
            e,
            &[
                ev(Fact::FirstTx { bytes: 10 }, 13 * S),
                ev(Fact::FirstRx { bytes: 10 }, 13 * S + 5 * MS),
            ],
        );
    }
    let r = tick(&mut asks, &mut absorbs, 14 * S);
    assert_eq!(kinds(&r), [ReportKind::Resumed]);
    assert_eq!(asks.stats().kernel_entries_renewed, 1);
    assert_eq!(absorbs.stats().kernel_entries_renewed, 1);
    let closed = tick(&mut asks, &mut absorbs, 14 * S + 200 * S);
    assert_eq!(kinds(&closed), [ReportKind::Close]);
    assert_eq!(close_stats(&closed[0]).1.tx_datagrams, 6);
}
