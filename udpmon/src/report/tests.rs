use serde_json::Value;
use time::UtcOffset;

use super::*;
use crate::container::{Container, Runtime};
use crate::engine::{
    ByVerdict, CloseReason, CloseStats, Detail, Folded, Identity, Name, Op, PeerSummary, Problems,
    ReportKind, Scope, SocketSummary, Trouble, Unanswered, UnreachableInfo, Via,
};

const S: u64 = 1_000_000_000;
/// Boot time 1000 s is 2026-11-27T23:41:00Z.
const CLOCK: ClockOffset = ClockOffset((1_795_822_860 - 1000) * S as i128);
const AT: u64 = 1000 * S + 123_456_789;

fn laptop(kind: ReportKind, detail: Detail) -> Report {
    Report {
        kind,
        ts_ns: AT,
        cookie: 4097,
        family: Family::V4,
        local: "192.168.1.4:54321".parse().unwrap(),
        remote: "35.190.176.201:12345".parse().unwrap(),
        detail,
        container: None,
        who: laptop_nc(),
    }
}

fn laptop_nc() -> Identity {
    Identity {
        pid: 41384,
        tgid: 41383,
        comm: "nc".into(),
        process: "nc".into(),
        uid: 1000,
        cgroup: 25,
        netns: 4026531833,
    }
}

fn unreachable(verdict: Verdict, connected: bool) -> Report {
    laptop(
        ReportKind::Unreachable,
        Detail::Unreachable(UnreachableInfo {
            ty: 3,
            code: 3,
            errno: Some(111),
            fatal: Some(true),
            from: "10.0.0.2".parse().unwrap(),
            verdict,
            connected,
            last_owner: None,
        }),
    )
}

fn nc_owner() -> Identity {
    Identity {
        tgid: 123,
        pid: 123,
        comm: "nc".into(),
        process: "nc".into(),
        uid: 1000,
        cgroup: 25,
        netns: 4026531833,
    }
}

fn refused(last_owner: Option<Identity>) -> Report {
    Report {
        cookie: 0,
        local: "10.142.0.2:12345".parse().unwrap(),
        remote: "51.6.191.203:54321".parse().unwrap(),
        who: Identity {
            pid: 0,
            tgid: 0,
            comm: Name::EMPTY,
            process: Name::EMPTY,
            uid: 0,
            cgroup: 0,
            ..laptop_nc()
        },
        ..laptop(ReportKind::Refused, Detail::Refused { last_owner })
    }
}

/// dnsmasq's upstream, silent across its fresh sockets: scope peer, no one cookie, the local
/// address without a port. `last_answer` None: it never answered.
fn peer_silence(kind: ReportKind, last_answer: Option<u64>) -> Report {
    let unanswered = Unanswered {
        flows: 15,
        sends: 16,
        for_ns: 15 * S,
        last_answer_ns: last_answer,
    };
    let detail = match kind {
        ReportKind::Silent => Detail::PeerSilent {
            no_reply_ns: 20_100_000_000,
            unanswered,
        },
        _ => Detail::PeerResumed {
            quiet_ns: 21 * S,
            unanswered,
        },
    };
    Report {
        cookie: 0,
        local: "10.200.0.1:0".parse().unwrap(),
        remote: "10.200.0.2:53".parse().unwrap(),
        who: Identity {
            comm: "dnsmasq".into(),
            process: "dnsmasq".into(),
            ..laptop_nc()
        },
        ..laptop(kind, detail)
    }
}

fn close(reason: CloseReason) -> Report {
    laptop(
        ReportKind::Close,
        Detail::Closed {
            reason,
            stats: CloseStats {
                duration_ns: 3_200_000_000,
                tx_datagrams: 2,
                tx_bytes: 7,
                rx_datagrams: 1,
                rx_bytes: 4,
                last_tx_ns: AT - S,
                last_rx_ns: 0,
                icmp_errors: 0,
                app_errors: 0,
                preexisting: false,
            },
        },
    )
}

/// A busy DNS server's summary.
fn socket_summary(problems: Problems, folded: Folded) -> Report {
    Report {
        cookie: 8193,
        local: "10.200.0.1:53".parse().unwrap(),
        remote: "0.0.0.0:0".parse().unwrap(),
        who: Identity {
            tgid: 300,
            pid: 300,
            comm: "dnsmasq".into(),
            process: "dnsmasq".into(),
            ..laptop_nc()
        },
        ..laptop(
            ReportKind::Summary,
            Detail::SocketSummary(Box::new(SocketSummary {
                interval_ns: 10 * S,
                new_flows: 4210,
                accepted: 4210,
                connected: 0,
                established: 4200,
                closed: 4190,
                never_established: 10,
                open: 20,
                problems,
                folded,
            })),
        )
    }
}

fn peer_summary() -> Report {
    let Detail::Unreachable(icmp) = unreachable(Verdict::Discarded, false).detail else {
        unreachable!()
    };
    Report {
        cookie: 0,
        local: "10.200.0.1:0".parse().unwrap(),
        remote: "10.200.0.2:53".parse().unwrap(),
        who: Identity {
            comm: "dnsmasq".into(),
            process: "dnsmasq".into(),
            ..laptop_nc()
        },
        ..laptop(
            ReportKind::Summary,
            Detail::PeerSummary(Box::new(PeerSummary {
                interval_ns: 9_500_000_000,
                icmp,
                unreachable: 41,
                folded: 40,
            })),
        )
    }
}

/// One report of every kind (and every detail shape).
fn every_kind() -> Vec<Report> {
    vec![
        laptop(
            ReportKind::Connect,
            Detail::Opened {
                via: Via::Connect,
                bytes: None,
            },
        ),
        laptop(
            ReportKind::Connect,
            Detail::Opened {
                via: Via::Send,
                bytes: Some(3),
            },
        ),
        laptop(
            ReportKind::Accept,
            Detail::Opened {
                via: Via::Recv,
                bytes: Some(3),
            },
        ),
        laptop(
            ReportKind::Establish,
            Detail::Established {
                reply_after_ns: 12_000_000,
            },
        ),
        unreachable(Verdict::Notified, true),
        unreachable(Verdict::Queued, false),
        unreachable(Verdict::Discarded, false),
        Report {
            cookie: 0,
            ..laptop(
                ReportKind::Unreachable,
                Detail::Unreachable(UnreachableInfo {
                    ty: 3,
                    code: 3,
                    errno: None,
                    fatal: None,
                    from: "10.0.0.2".parse().unwrap(),
                    verdict: Verdict::NoSocket,
                    connected: false,
                    last_owner: Some(nc_owner()),
                }),
            )
        },
        laptop(
            ReportKind::Silent,
            Detail::Silent {
                no_reply_ns: 10_200_000_000,
                sends: 5,
            },
        ),
        peer_silence(ReportKind::Silent, Some(AT - 20_100_000_000)),
        peer_silence(ReportKind::Silent, None),
        laptop(
            ReportKind::Resumed,
            Detail::Resumed {
                after: Trouble::Unreachable,
                quiet_ns: 4 * S,
            },
        ),
        peer_silence(ReportKind::Resumed, Some(AT - 21 * S)),
        peer_silence(ReportKind::Resumed, None),
        laptop(
            ReportKind::AppError,
            Detail::AppError {
                op: Op::Recv,
                errno: 111,
                after_unreachable_ns: Some(S / 2),
            },
        ),
        laptop(
            ReportKind::AppError,
            Detail::AppError {
                op: Op::Send,
                errno: 1,
                after_unreachable_ns: None,
            },
        ),
        close(CloseReason::Closed),
        close(CloseReason::Evicted),
        refused(Some(nc_owner())),
        refused(None),
        socket_summary(Problems::default(), Folded::default()),
        socket_summary(
            Problems {
                unreachable: ByVerdict {
                    discarded: 12,
                    notified: 1,
                    ..ByVerdict::default()
                },
                silent: 0,
                app_error: 2,
            },
            Folded {
                unreachable: 8,
                resumed: 1,
                ..Folded::default()
            },
        ),
        peer_summary(),
    ]
}

fn text() -> TextFormat {
    TextFormat::with_offset(CLOCK, UtcOffset::from_hms(1, 0, 0).unwrap())
}

#[test]
fn text_lines() {
    let t = text();
    assert_eq!(
        t.header(),
        "TIME             PID PROCESS         LOCAL                 REMOTE                EVENT       DETAIL"
    );
    assert_eq!(
        t.format(&unreachable(Verdict::Notified, true)),
        "00:41:00.123   41383 nc              192.168.1.4:54321     35.190.176.201:12345  UNREACHABLE ICMP port unreachable from 10.0.0.2; next send/recv fails with ECONNREFUSED"
    );
    assert_eq!(
        t.format(&close(CloseReason::Closed)),
        "00:41:00.123   41383 nc              192.168.1.4:54321     35.190.176.201:12345  CLOSE       closed after 3.2s: tx 2 dgrams/7 B, rx 1 dgram/4 B"
    );
    assert_eq!(
        t.format(&refused(Some(nc_owner()))),
        "00:41:00.123       - -               10.142.0.2:12345      51.6.191.203:54321    REFUSED     datagram to closed port 12345 (last owner: nc pid 123)"
    );
    assert_eq!(
        t.format(&peer_silence(ReportKind::Silent, Some(AT - 20_100_000_000))),
        "00:41:00.123   41383 dnsmasq         10.200.0.1:0          10.200.0.2:53         SILENT      peer unanswered: 16 dgrams from 15 sockets over 15.0s, no ICMP; last answer 20.1s ago"
    );
    let v6 = Report {
        family: Family::V6,
        local: "[fd00::1]:54321".parse().unwrap(),
        remote: "[fd00::2]:53".parse().unwrap(),
        ..laptop(
            ReportKind::AppError,
            Detail::AppError {
                op: Op::Send,
                errno: 111,
                after_unreachable_ns: Some(52_000_000),
            },
        )
    };
    assert_eq!(
        t.format(&v6),
        "00:41:00.123   41383 nc              [fd00::1]:54321       [fd00::2]:53          APP-ERROR   send failed with ECONNREFUSED: the application noticed the ICMP error 52ms later"
    );
}

#[test]
fn text_details() {
    let details: Vec<String> = every_kind()
        .iter()
        .map(|r| {
            let line = text().format(r);
            line.split_once(r.kind.label()).unwrap().1.trim().to_owned()
        })
        .collect();
    assert_eq!(
        details,
        [
            "connect(): flow opened, nothing sent yet",
            "first datagram sent: 3 B",
            "first datagram from a new peer: 3 B",
            "traffic both ways, first answer after 12ms",
            "ICMP port unreachable from 10.0.0.2; next send/recv fails with ECONNREFUSED",
            "ICMP port unreachable from 10.0.0.2 queued on the error queue (IP_RECVERR): ECONNREFUSED",
            "ICMP port unreachable from 10.0.0.2 discarded: unconnected socket without IP_RECVERR, the application cannot know",
            "ICMP port unreachable from 10.0.0.2: no socket on local port 54321 any more (last owner: nc pid 123)",
            "no reply for 10.2s after 5 sends, no ICMP",
            "peer unanswered: 16 dgrams from 15 sockets over 15.0s, no ICMP; last answer 20.1s ago",
            "peer unanswered: 16 dgrams from 15 sockets over 15.0s, no ICMP; never answered since first seen 20.1s ago",
            "peer answered again after 4.0s, despite the ICMP error",
            "peer answered again after 21.0s; 16 dgrams from 15 sockets had gone unanswered",
            "peer answered for the first time after 21.0s; 16 dgrams from 15 sockets had gone unanswered",
            "recv failed with ECONNREFUSED: the application noticed the ICMP error 500ms later",
            "send failed with EPERM",
            "closed after 3.2s: tx 2 dgrams/7 B, rx 1 dgram/4 B",
            "evicted (flow table full) after 3.2s: tx 2 dgrams/7 B, rx 1 dgram/4 B",
            "datagram to closed port 12345 (last owner: nc pid 123)",
            "datagram to closed port 12345",
            "busy socket, 10.0s: 4210 new flows (4210 accepted), 4200 established, 4190 closed (10 never established), 20 open",
            "busy socket, 10.0s: 4210 new flows (4210 accepted), 4200 established, 4190 closed (10 never established), 20 open; problems: 13 unreachable (1 notified, 12 discarded), 2 app errors; folded: 8 unreachable, 1 resumed",
            "9.5s: 41 flows drew ICMP port unreachable from 10.0.0.2 (discarded); 40 UNREACHABLE lines folded",
        ]
    );
    let discarded = text().format(&unreachable(Verdict::Discarded, true));
    assert!(
        discarded.ends_with("discarded: not fatal to a connected socket without IP_RECVERR, the application cannot know"),
        "{discarded}"
    );
}

#[test]
fn text_counts_errors_and_marks_preexisting_flows() {
    let mut r = close(CloseReason::Idle);
    if let Detail::Closed { stats, .. } = &mut r.detail {
        stats.icmp_errors = 3;
        stats.app_errors = 1;
        stats.preexisting = true;
    }
    assert!(
        text().format(&r).ends_with(
            "expired idle after >3.2s: tx 2 dgrams/7 B, rx 1 dgram/4 B, 3 ICMP errors, 1 app error"
        ),
        "{}",
        text().format(&r)
    );
}

#[test]
fn text_in_utc_when_the_local_offset_is_unknown() {
    let t = TextFormat::utc_fallback(CLOCK);
    assert!(t.is_utc_fallback());
    assert!(
        t.header().starts_with("TIME(UTC)        PID PROCESS"),
        "{}",
        t.header()
    );
    assert!(
        t.format(&close(CloseReason::Closed))
            .starts_with("23:41:00.123 ")
    );
}

#[test]
fn json_lines() {
    let j = JsonFormat::new(CLOCK);
    assert_eq!(
        j.format(&unreachable(Verdict::Notified, true)),
        concat!(
            r#"{"ts":"2026-11-27T23:41:00.123456789Z","event":"unreachable","pid":41383,"tid":41384,"#,
            r#""comm":"nc","process":"nc","uid":1000,"cgroup":25,"netns":4026531833,"cookie":4097,"family":"ipv4","#,
            r#""local":"192.168.1.4:54321","remote":"35.190.176.201:12345","container":null,"#,
            r#""icmp":{"type":3,"code":3,"from":"10.0.0.2","errno":"ECONNREFUSED","fatal":true,"verdict":"notified"}}"#
        )
    );
    assert_eq!(
        j.format(&close(CloseReason::Closed)),
        concat!(
            r#"{"ts":"2026-11-27T23:41:00.123456789Z","event":"close","pid":41383,"tid":41384,"#,
            r#""comm":"nc","process":"nc","uid":1000,"cgroup":25,"netns":4026531833,"cookie":4097,"family":"ipv4","#,
            r#""local":"192.168.1.4:54321","remote":"35.190.176.201:12345","container":null,"reason":"closed","#,
            r#""stats":{"duration_ms":3200,"tx_datagrams":2,"tx_bytes":7,"rx_datagrams":1,"rx_bytes":4,"#,
            r#""last_tx":"2026-11-27T23:40:59.123456789Z","last_rx":null,"icmp_errors":0,"app_errors":0,"#,
            r#""preexisting":false}}"#
        )
    );
    assert_eq!(
        j.format(&peer_silence(ReportKind::Silent, Some(AT - 20_100_000_000))),
        concat!(
            r#"{"ts":"2026-11-27T23:41:00.123456789Z","event":"silent","pid":41383,"tid":41384,"#,
            r#""comm":"dnsmasq","process":"dnsmasq","uid":1000,"cgroup":25,"netns":4026531833,"cookie":0,"#,
            r#""family":"ipv4","local":"10.200.0.1:0","remote":"10.200.0.2:53","container":null,"scope":"peer","#,
            r#""no_reply_ms":20100,"sends":16,"flows":15,"unanswered_ms":15000,"#,
            r#""last_answer":"2026-11-27T23:40:40.023456789Z","never_answered":false}"#
        )
    );
    let flow_silent = laptop(
        ReportKind::Silent,
        Detail::Silent {
            no_reply_ns: 10_200_000_000,
            sends: 5,
        },
    );
    assert!(
        j.format(&flow_silent)
            .ends_with(r#""scope":"flow","no_reply_ms":10200,"sends":5}"#),
        "{}",
        j.format(&flow_silent)
    );
    let v6 = Report {
        family: Family::V6,
        local: "[fd00::1]:54321".parse().unwrap(),
        remote: "[fd00::2]:53".parse().unwrap(),
        ..refused(None)
    };
    assert_eq!(
        j.format(&v6),
        concat!(
            r#"{"ts":"2026-11-27T23:41:00.123456789Z","event":"refused","pid":0,"tid":0,"comm":"","process":"","#,
            r#""uid":0,"cgroup":0,"netns":4026531833,"cookie":0,"family":"ipv6","#,
            r#""local":"[fd00::1]:54321","remote":"[fd00::2]:53","container":null,"last_owner":null}"#
        )
    );
}

#[derive(Clone, Copy, Debug)]
enum Ty {
    Str,
    Uint,
    Bool,
    Obj,
}

fn has(v: &Value, key: &str, ty: Ty, nullable: bool) {
    let x = v
        .get(key)
        .unwrap_or_else(|| panic!("missing key {key} in {v}"));
    let ok = match ty {
        _ if nullable && x.is_null() => true,
        Ty::Str => x.is_string(),
        Ty::Uint => x.is_u64(),
        Ty::Bool => x.is_boolean(),
        Ty::Obj => x.is_object(),
    };
    assert!(ok, "{key} is not {ty:?} (nullable {nullable}) in {v}");
}

fn one_of(v: &Value, key: &str, allowed: &[&str]) {
    let s = v[key].as_str().unwrap_or_default();
    assert!(
        allowed.contains(&s),
        "{key}={s:?} not one of {allowed:?} in {v}"
    );
}

fn owner_schema(v: &Value) {
    if !v["last_owner"].is_null() {
        let o = &v["last_owner"];
        has(o, "pid", Ty::Uint, false);
        has(o, "comm", Ty::Str, false);
        has(o, "process", Ty::Str, false);
        has(o, "uid", Ty::Uint, false);
    }
}

/// The keys of a peer-scope SILENT or RESUMED, besides `sends`.
fn peer_schema(v: &Value) {
    assert_eq!(v["cookie"], 0, "{v}");
    has(v, "flows", Ty::Uint, false);
    has(v, "unanswered_ms", Ty::Uint, false);
    has(v, "last_answer", Ty::Str, true);
    has(v, "never_answered", Ty::Bool, false);
    assert_eq!(
        v["never_answered"].as_bool(),
        Some(v["last_answer"].is_null()),
        "{v}"
    );
}

const CONTAINER_ID: &str = "b5f1cf47c8456f6bb60a712d6626615cf3717f91fa1efe47deb111363830450a";

fn podman_container() -> std::sync::Arc<Container> {
    std::sync::Arc::new(Container {
        id: CONTAINER_ID.into(),
        runtime: Some(Runtime::Podman),
        name: Some("udpmon-test".into()),
        ..Container::default()
    })
}

fn pod_container() -> std::sync::Arc<Container> {
    std::sync::Arc::new(Container {
        id: CONTAINER_ID.into(),
        runtime: Some(Runtime::Containerd),
        name: Some("coredns".into()),
        pod: Some("coredns-5d78c9869d-abcde".into()),
        namespace: Some("kube-system".into()),
        pod_uid: Some("0b7a3f9e-2c4d-4e1f-9a8b-7c6d5e4f3a2b".into()),
    })
}

/// `container`: null, or an object with every key, each a string or null.
fn container_schema(v: &Value, r: &Report) {
    let c = v
        .get("container")
        .unwrap_or_else(|| panic!("missing container in {v}"));
    let Some(want) = &r.container else {
        assert!(c.is_null(), "{v}");
        return;
    };
    has(c, "id", Ty::Str, false);
    assert_eq!(c["id"], want.id.as_str());
    one_of(c, "runtime", &["docker", "containerd", "cri-o", "podman"]);
    for key in ["name", "pod", "namespace", "pod_uid"] {
        has(c, key, Ty::Str, true);
    }
    assert_eq!(c.as_object().unwrap().len(), 6, "{c}");
}

#[test]
fn containers_in_json_text_and_journal() {
    let j = JsonFormat::new(CLOCK);
    let podman = Report {
        container: Some(podman_container()),
        ..close(CloseReason::Closed)
    };
    assert!(
        j.format(&podman).contains(&format!(
            r#""remote":"35.190.176.201:12345","container":{{"id":"{CONTAINER_ID}","runtime":"podman","name":"udpmon-test","pod":null,"namespace":null,"pod_uid":null}},"reason""#
        )),
        "{}",
        j.format(&podman)
    );
    let pod = Report {
        container: Some(pod_container()),
        ..close(CloseReason::Closed)
    };
    let fields = crate::journal::fields(&j.format(&pod));
    for (k, v) in [
        ("UDPMON_CONTAINER_ID", CONTAINER_ID),
        ("UDPMON_CONTAINER_RUNTIME", "containerd"),
        ("UDPMON_CONTAINER_NAME", "coredns"),
        ("UDPMON_CONTAINER_POD", "coredns-5d78c9869d-abcde"),
        ("UDPMON_CONTAINER_NAMESPACE", "kube-system"),
        (
            "UDPMON_CONTAINER_POD_UID",
            "0b7a3f9e-2c4d-4e1f-9a8b-7c6d5e4f3a2b",
        ),
    ] {
        assert!(
            fields.contains(&(k.into(), v.into())),
            "{k}={v} not in {fields:?}"
        );
    }
    // Null keys are left out of the journal.
    let podman_fields = crate::journal::fields(&j.format(&podman));
    assert!(
        !podman_fields
            .iter()
            .any(|(k, _)| k == "UDPMON_CONTAINER_POD")
    );
    let t = text();
    let plain = t.format(&close(CloseReason::Closed));
    assert_eq!(
        t.format(&podman),
        format!("{plain} [podman:udpmon-test b5f1cf47c845]")
    );
    assert_eq!(
        t.format(&pod),
        format!("{plain} [containerd:kube-system/coredns-5d78c9869d-abcde/coredns b5f1cf47c845]")
    );
    let unnamed = Report {
        container: Some(std::sync::Arc::new(Container {
            id: CONTAINER_ID.into(),
            name: Some(HOSTILE.into()),
            ..Container::default()
        })),
        ..close(CloseReason::Closed)
    };
    assert_eq!(
        t.format(&unnamed),
        format!("{plain} [container:{HOSTILE_ESCAPED} b5f1cf47c845]")
    );
    // A pod's namespace shows only with the pod; nothing at all without names.
    for (pod, namespace, name, note) in [
        (Some("web-1"), None, None, "[containerd:web-1 b5f1cf47c845]"),
        (
            None,
            Some("default"),
            Some("app"),
            "[containerd:app b5f1cf47c845]",
        ),
        (None, None, None, "[containerd b5f1cf47c845]"),
    ] {
        let r = Report {
            container: Some(std::sync::Arc::new(Container {
                id: CONTAINER_ID.into(),
                runtime: Some(Runtime::Containerd),
                pod: pod.map(Into::into),
                namespace: namespace.map(Into::into),
                name: name.map(Into::into),
                ..Container::default()
            })),
            ..close(CloseReason::Closed)
        };
        assert_eq!(t.format(&r), format!("{plain} {note}"));
    }
}

#[test]
fn json_schema_of_every_kind() {
    let j = JsonFormat::new(CLOCK);
    let reports = every_kind();
    let mut seen: Vec<ReportKind> = reports.iter().map(|r| r.kind).collect();
    seen.dedup();
    assert_eq!(seen, ReportKind::ALL, "the fixture covers every kind");
    // Each kind outside containers, in a container with only what podman's state tells, and
    // in a Kubernetes pod.
    let with_containers = reports.iter().flat_map(|r| {
        [None, Some(podman_container()), Some(pod_container())].map(|container| Report {
            container,
            ..r.clone()
        })
    });
    for r in &with_containers.collect::<Vec<_>>() {
        let line = j.format(r);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        container_schema(&v, r);
        for key in ["ts", "comm", "process", "family", "local", "remote"] {
            has(&v, key, Ty::Str, false);
        }
        for key in ["pid", "tid", "uid", "cgroup", "netns", "cookie"] {
            has(&v, key, Ty::Uint, false);
        }
        assert_eq!(v["event"], r.kind.name());
        let ts = v["ts"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-27T23:41:00.123456789Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        one_of(&v, "family", &["ipv4", "ipv6"]);
        for key in ["local", "remote"] {
            let a = v[key].as_str().unwrap();
            assert!(a.parse::<std::net::SocketAddr>().is_ok(), "{key}={a}");
        }
        match r.kind {
            ReportKind::Connect | ReportKind::Accept => {
                one_of(&v, "via", &["connect", "send", "recv"]);
                has(&v, "bytes", Ty::Uint, true);
            }
            ReportKind::Establish => has(&v, "reply_after_ms", Ty::Uint, false),
            ReportKind::Unreachable => {
                has(&v, "icmp", Ty::Obj, false);
                let i = &v["icmp"];
                has(i, "type", Ty::Uint, false);
                has(i, "code", Ty::Uint, false);
                has(i, "from", Ty::Str, false);
                has(i, "errno", Ty::Str, true);
                has(i, "fatal", Ty::Bool, true);
                one_of(
                    i,
                    "verdict",
                    &["notified", "queued", "discarded", "no-socket"],
                );
                if i["verdict"] == "no-socket" {
                    has(&v, "last_owner", Ty::Obj, true);
                    owner_schema(&v);
                }
            }
            ReportKind::Silent => {
                one_of(&v, "scope", &["flow", "peer"]);
                assert_eq!(v["scope"], r.scope().map(Scope::name).unwrap());
                has(&v, "no_reply_ms", Ty::Uint, false);
                has(&v, "sends", Ty::Uint, false);
                if v["scope"] == "peer" {
                    peer_schema(&v);
                }
            }
            ReportKind::Resumed => {
                one_of(&v, "scope", &["flow", "peer"]);
                assert_eq!(v["scope"], r.scope().map(Scope::name).unwrap());
                one_of(&v, "after", &["silent", "unreachable"]);
                has(&v, "quiet_ms", Ty::Uint, false);
                if v["scope"] == "peer" {
                    assert_eq!(v["after"], "silent", "{v}");
                    has(&v, "sends", Ty::Uint, false);
                    peer_schema(&v);
                }
            }
            ReportKind::AppError => {
                one_of(&v, "op", &["send", "recv"]);
                has(&v, "errno", Ty::Str, false);
                assert!(v["errno"].as_str().unwrap().starts_with('E'), "{v}");
                has(&v, "after_unreachable_ms", Ty::Uint, true);
            }
            ReportKind::Close => {
                one_of(
                    &v,
                    "reason",
                    &["closed", "idle", "evicted", "disconnected", "reconnected"],
                );
                has(&v, "stats", Ty::Obj, false);
                let s = &v["stats"];
                for key in [
                    "duration_ms",
                    "tx_datagrams",
                    "tx_bytes",
                    "rx_datagrams",
                    "rx_bytes",
                    "icmp_errors",
                    "app_errors",
                ] {
                    has(s, key, Ty::Uint, false);
                }
                has(s, "last_tx", Ty::Str, true);
                has(s, "last_rx", Ty::Str, true);
                has(s, "preexisting", Ty::Bool, false);
            }
            ReportKind::Refused => {
                has(&v, "last_owner", Ty::Obj, true);
                owner_schema(&v);
            }
            ReportKind::Summary => summary_schema(&v, r),
        }
    }
}

/// The keys of a SUMMARY, and how its counts relate.
fn summary_schema(v: &Value, r: &Report) {
    one_of(v, "scope", &["socket", "peer"]);
    assert_eq!(v["scope"], r.scope().map(Scope::name).unwrap());
    has(v, "interval_ms", Ty::Uint, false);
    has(v, "problems", Ty::Obj, false);
    let p = &v["problems"];
    has(p, "unreachable", Ty::Obj, false);
    for key in ["notified", "queued", "discarded", "no_socket"] {
        has(&p["unreachable"], key, Ty::Uint, false);
    }
    for key in ["silent", "app_error"] {
        has(p, key, Ty::Uint, false);
    }
    has(v, "folded", Ty::Obj, false);
    let f = &v["folded"];
    for key in ["unreachable", "silent", "app_error", "resumed"] {
        has(f, key, Ty::Uint, false);
    }
    let unreachable: u64 = ["notified", "queued", "discarded", "no_socket"]
        .iter()
        .map(|k| p["unreachable"][k].as_u64().unwrap())
        .sum();
    assert!(f["unreachable"].as_u64().unwrap() <= unreachable, "{v}");
    if v["scope"] == "socket" {
        assert_ne!(v["cookie"], 0, "{v}");
        assert_eq!(p["unreachable"]["no_socket"], 0, "{v}");
        for key in [
            "new_flows",
            "accepted",
            "connected",
            "established",
            "closed",
            "never_established",
            "open",
        ] {
            has(v, key, Ty::Uint, false);
        }
        let n = |k: &str| v[k].as_u64().unwrap();
        assert!(n("accepted") + n("connected") <= n("new_flows"), "{v}");
        assert!(n("never_established") <= n("closed"), "{v}");
    } else {
        assert_eq!(v["cookie"], 0, "{v}");
        has(v, "icmp", Ty::Obj, false);
        one_of(
            &v["icmp"],
            "verdict",
            &["notified", "queued", "discarded", "no-socket"],
        );
        assert_eq!(p["silent"], 0, "{v}");
        assert_eq!(p["app_error"], 0, "{v}");
    }
}

#[test]
fn formatter_dispatches() {
    let r = close(CloseReason::Closed);
    let t = Formatter::Text(text());
    let j = Formatter::Json(JsonFormat::new(CLOCK));
    assert_eq!(t.header(), Some(text().header()));
    assert_eq!(t.format(&r), text().format(&r));
    assert_eq!(j.header(), None);
    assert!(j.format(&r).starts_with(r#"{"ts":"#));
}

/// One formatter writing reports of several owners in turn (it keeps the last owner's text)
/// writes each as a fresh one does: every field of the owner counts.
#[test]
fn json_lines_of_changing_owners() {
    let base = close(CloseReason::Closed);
    let mut owners = vec![base.who, nc_owner(), hostile_owner(), Identity::default()];
    for change in 0..7 {
        let mut w = base.who;
        match change {
            0 => w.tgid += 1,
            1 => w.pid += 1,
            2 => w.comm = "nd".into(),
            3 => w.process = "nc2".into(),
            4 => w.uid += 1,
            5 => w.cgroup += 1,
            _ => w.netns += 1,
        }
        owners.push(w);
    }
    let j = JsonFormat::new(CLOCK);
    for (i, w) in owners.iter().chain(owners.iter().rev()).enumerate() {
        let r = Report {
            who: *w,
            ..base.clone()
        };
        assert_eq!(
            j.format(&r),
            JsonFormat::new(CLOCK).format(&r),
            "owner {i}: {w:?}"
        );
    }
}

#[test]
fn wall_clock_is_boot_time_plus_offset() {
    assert_eq!(CLOCK.wall(1000 * S).unix_timestamp(), 1_795_822_860);
    assert_eq!(
        ClockOffset(i128::MAX).wall(0),
        time::OffsetDateTime::UNIX_EPOCH
    );
}

#[test]
fn json_escapes_any_comm() {
    let j = JsonFormat::new(CLOCK);
    let mut r = close(CloseReason::Closed);
    r.who.comm = "a\"b\\c\td\u{1}é".into();
    let v: Value = serde_json::from_str(&j.format(&r)).unwrap();
    assert_eq!(v["comm"], &*r.who.comm.to_str());
}

/// Everything a process can put in its name (15 bytes, as the kernel keeps) to attack a
/// terminal or a log: a CSI sequence (clear the screen), a newline forging a second line, a
/// carriage return overwriting the first, tab, backslash, DEL, the C1 CSI, and BEL.
const HOSTILE: &str = "\u{1b}[2J\nF\rL\t\\\u{7f}\u{9b}\u{7}";
const HOSTILE_ESCAPED: &str = r"\x1b[2J\nF\rL\t\\\x7f\x9b\x07";
const _: () = assert!(HOSTILE.len() <= Name::MAX);

fn hostile_owner() -> Identity {
    Identity {
        comm: HOSTILE.into(),
        process: HOSTILE.into(),
        ..nc_owner()
    }
}

/// The report's own comm and a last owner's comm, in the column and in the details.
fn hostile_reports() -> Vec<Report> {
    let mut no_socket = unreachable(Verdict::NoSocket, false);
    if let Detail::Unreachable(u) = &mut no_socket.detail {
        u.last_owner = Some(hostile_owner());
    }
    vec![
        Report {
            who: Identity {
                comm: HOSTILE.into(),
                process: HOSTILE.into(),
                ..close(CloseReason::Closed).who
            },
            ..close(CloseReason::Closed)
        },
        Report {
            who: Identity {
                comm: HOSTILE.into(),
                process: HOSTILE.into(),
                ..no_socket.who
            },
            ..no_socket
        },
        refused(Some(hostile_owner())),
    ]
}

#[test]
fn text_escapes_hostile_names() {
    let t = text();
    for r in hostile_reports() {
        let line = t.format(&r);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert_eq!(line.lines().count(), 1, "{line:?}");
        assert!(line.contains(HOSTILE_ESCAPED), "{line:?}");
    }
    let [column, owner_in_detail, refused]: [Report; 3] = hostile_reports().try_into().unwrap();
    assert_eq!(
        t.format(&column),
        format!(
            "00:41:00.123   41383 {HOSTILE_ESCAPED} 192.168.1.4:54321     35.190.176.201:12345  CLOSE       closed after 3.2s: tx 2 dgrams/7 B, rx 1 dgram/4 B"
        )
    );
    assert!(
        t.format(&owner_in_detail)
            .ends_with(&format!("(last owner: {HOSTILE_ESCAPED} pid 123)"))
    );
    assert!(
        t.format(&refused)
            .ends_with(&format!("(last owner: {HOSTILE_ESCAPED} pid 123)"))
    );
}

#[test]
fn text_escapes_without_breaking_columns() {
    let t = text();
    let plain = t.format(&close(CloseReason::Closed));
    for (comm, shown) in [
        ("a\tb", r"a\tb           "),
        ("\\", r"\\             "),
        // What the decoder makes of a comm that is not UTF-8 (lossy decoding).
        (
            &*String::from_utf8_lossy(b"\xffx\x1b"),
            "\u{fffd}x\\x1b         ",
        ),
    ] {
        let line = t.format(&Report {
            who: Identity {
                comm: comm.into(),
                process: comm.into(),
                ..close(CloseReason::Closed).who
            },
            ..close(CloseReason::Closed)
        });
        assert_eq!(line, plain.replacen("nc             ", shown, 1));
    }
}

#[test]
fn text_prints_ordinary_names_unchanged() {
    let t = text();
    for name in [
        "nc",
        "isc-net-0000",
        "Web Content",
        "systemd-resolve",
        "café",
    ] {
        let r = Report {
            who: Identity {
                comm: name.into(),
                process: name.into(),
                ..close(CloseReason::Closed).who
            },
            ..close(CloseReason::Closed)
        };
        assert!(
            t.format(&r).starts_with(&format!(
                "00:41:00.123   41383 {name:<15} 192.168.1.4:54321 "
            )),
            "{}",
            t.format(&r)
        );
        let owner = Identity {
            comm: name.into(),
            process: name.into(),
            ..nc_owner()
        };
        assert!(
            t.format(&refused(Some(owner)))
                .ends_with(&format!("(last owner: {name} pid 123)"))
        );
    }
}

#[test]
fn json_round_trips_hostile_names() {
    let j = JsonFormat::new(CLOCK);
    for r in hostile_reports() {
        let line = j.format(&r);
        // JSON must escape C0 (newline, ESC, ...); DEL and C1 are escaped too, for terminals.
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert_eq!(line.lines().count(), 1, "{line:?}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["comm"], &*r.who.comm.to_str());
        assert_eq!(v["process"], &*r.who.process.to_str());
        let owner = match &r.detail {
            Detail::Refused { last_owner } => last_owner.as_ref(),
            Detail::Unreachable(u) => u.last_owner.as_ref(),
            _ => None,
        };
        if let Some(o) = owner {
            assert_eq!(v["last_owner"]["comm"], &*o.comm.to_str(), "{line}");
        }
    }
}

/// Issue 12, point 7: local times follow the zone's rules at each report's own time (a
/// daylight-saving change shows in the next line), and a stepped wall clock in the next line.
#[test]
fn text_follows_daylight_saving_and_clock_steps() {
    // Central European Time, as a POSIX TZ string: no time-zone database needed.
    let cet = jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
    let mut t = TextFormat::with_zone(CLOCK, cet);
    // AT is 2026-11-27T23:41:00.123Z: winter, UTC+1.
    let r = close(CloseReason::Closed);
    assert!(
        t.format(&r).starts_with("00:41:00.123 "),
        "{}",
        t.format(&r)
    );
    // 180 days later is late May: summer, UTC+2.
    let mut summer = close(CloseReason::Closed);
    summer.ts_ns = AT + 180 * 86_400 * S;
    assert!(
        t.format(&summer).starts_with("01:41:00.123 "),
        "{}",
        t.format(&summer)
    );
    // The wall clock is stepped back an hour: the same report reads an hour earlier.
    t.set_clock(ClockOffset(CLOCK.0 - 3600 * S as i128));
    assert!(
        t.format(&r).starts_with("23:41:00.123 "),
        "{}",
        t.format(&r)
    );
    let mut j = JsonFormat::new(CLOCK);
    j.set_clock(ClockOffset(CLOCK.0 - 3600 * S as i128));
    let v: Value = serde_json::from_str(&j.format(&r)).unwrap();
    assert_eq!(v["ts"], "2026-11-27T22:41:00.123456789Z");
}

/// `--journal`: every kind's JSON keys become valid journal field names, and problems get
/// the higher priorities.
#[test]
fn journal_fields_and_priorities_of_every_kind() {
    use log::Level;

    use crate::journal::{fields, level};
    let json = JsonFormat::new(CLOCK);
    for r in every_kind() {
        let f = fields(&json.format(&r));
        assert!(
            f.contains(&("UDPMON_EVENT".into(), r.kind.name().into())),
            "{f:?}"
        );
        for (k, _) in &f {
            assert!(k.len() <= 64 && k.starts_with("UDPMON_"), "{k}");
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{k}"
            );
        }
        let want = match (&r.kind, &r.detail) {
            (ReportKind::Unreachable, Detail::Unreachable(u))
                if u.verdict == Verdict::Discarded =>
            {
                Level::Warn
            }
            (ReportKind::Silent | ReportKind::AppError | ReportKind::Refused, _) => Level::Warn,
            (ReportKind::Unreachable, _) => Level::Info,
            _ => Level::Debug,
        };
        assert_eq!(level(&r), want, "{:?}", r.kind);
    }
    let discarded = unreachable(Verdict::Discarded, false);
    assert!(level(&discarded) < level(&unreachable(Verdict::Notified, true)));
    let f = fields(&json.format(&discarded));
    assert!(f.contains(&("UDPMON_ICMP_VERDICT".into(), "discarded".into())));
    assert!(f.contains(&("UDPMON_ICMP_ERRNO".into(), "ECONNREFUSED".into())));
}
