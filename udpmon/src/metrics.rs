//! Prometheus metrics (`--metrics ADDR:PORT`): what udpmon reported and what it lost, served
//! at `/metrics`.
//!
//! Families (no per-peer, per-process or per-port label: their number is fixed):
//! - `udpmon_events_total{event}`: the events udpmon reported, by kind, with the JSON `event`
//!   names (`connect`, ..., `app-error`, `close`, `refused`). Only those that passed the
//!   filters (`--pid`, `--events`, ...): what udpmon reported, whether or not its output
//!   could take it (what it could not is `udpmon_events_lost_total{reason="unwritten"}`).
//! - `udpmon_events_folded_total{event}`: the events udpmon counted in a SUMMARY instead of
//!   printing them (busy sockets, a peer's repeated UNREACHABLE), by kind, as the summaries
//!   that passed the filters count them: with `udpmon_events_total`, every event. They are
//!   counted when their summary is reported, at the end of its interval.
//! - `udpmon_unreachable_total{verdict}`: the UNREACHABLE events among them, by the JSON
//!   `icmp.verdict` (`notified`, `queued`, `discarded`, `no-socket`).
//! - `udpmon_events_lost_total{reason}`: every loss the health warnings name, one series each
//!   ([`Health::losses`]), plus kernel read failures.
//! - `udpmon_events_read_total`: ring-buffer records read from the kernel.
//! - `udpmon_flows_tracked`: flows the engine tracks now.
//! - `udpmon_closes_recovered_total`: sockets whose close a lost record carried, found gone
//!   by dumps of the open sockets and reported closed then.
//! - `udpmon_build_info{version,strategy}` = 1: the hook strategy in use (`fentry`, `kprobe`,
//!   `tracepoint`).
//!
//! The health counters are totals the agent reads once a second, so they are exported as they
//! were last read, through a collector, rather than as counters incremented a second time.
//!
//! HTTP: hyper 1 (HTTP/1.1 only) on the agent's own current-thread tokio runtime, so scrapes
//! need no thread or runtime of their own; axum or a threaded server would bring a router or
//! threads that one path does not need.
use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, prometheus_text,
        text as openmetrics_text,
    },
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, info::Info,
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    decode::Verdict,
    engine::{Detail, Report, ReportKind},
    health::Health,
    probes::Strategy,
    report::verdict_name,
};

/// Scrapes served at once; further connections wait in the listen backlog, so that a
/// misbehaving client cannot take the agent's memory or time.
const MAX_CONNECTIONS: usize = 8;

/// A client that sends no complete request within this time is disconnected, idle
/// keep-alive connections included, so that it does not hold a connection slot forever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

/// The metrics, shared by the agent (which updates them) and the HTTP server (which encodes
/// them). Clones share the same values.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    events: Family<EventLabel, Counter>,
    folded: Family<EventLabel, Counter>,
    unreachable: Family<VerdictLabel, Counter>,
    health: Arc<Mutex<Health>>,
}

impl Metrics {
    pub fn new(strategy: Strategy) -> Self {
        let events = Family::<EventLabel, Counter>::default();
        let folded = Family::<EventLabel, Counter>::default();
        let unreachable = Family::<VerdictLabel, Counter>::default();
        // Every series exists from the start, at 0: a rate() over a series that appears only
        // with its first event misses that event.
        for k in ReportKind::ALL {
            events.get_or_create_owned(&EventLabel { event: k.name() });
        }
        for k in FOLDABLE {
            folded.get_or_create_owned(&EventLabel { event: k.name() });
        }
        for v in VERDICTS {
            unreachable.get_or_create_owned(&VerdictLabel {
                verdict: verdict_name(v),
            });
        }
        let health = Arc::new(Mutex::new(Health::default()));
        let mut registry = Registry::with_prefix("udpmon");
        registry.register(
            "events",
            "Events udpmon reported (those that passed its filters), by kind",
            events.clone(),
        );
        registry.register(
            "events_folded",
            "Events udpmon counted in a summary instead of printing them, by kind",
            folded.clone(),
        );
        registry.register(
            "unreachable",
            "UNREACHABLE events udpmon reported, by what the kernel did with the ICMP error",
            unreachable.clone(),
        );
        registry.register(
            "build",
            "udpmon's version and the kernel hook strategy in use",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                ("strategy", strategy.name()),
            ]),
        );
        registry.register_collector(Box::new(HealthCollector(health.clone())));
        Self {
            registry: Arc::new(registry),
            events,
            folded,
            unreachable,
            health,
        }
    }

    /// Counts an event that udpmon reports.
    pub fn report(&self, r: &Report) {
        self.events
            .get_or_create(&EventLabel {
                event: r.kind.name(),
            })
            .inc();
        let folded = |kind: ReportKind, n: u64| {
            self.folded
                .get_or_create(&EventLabel { event: kind.name() })
                .inc_by(n);
        };
        match &r.detail {
            Detail::Unreachable(u) => {
                self.unreachable
                    .get_or_create(&VerdictLabel {
                        verdict: verdict_name(u.verdict),
                    })
                    .inc();
            }
            Detail::SocketSummary(s) => {
                folded(ReportKind::Connect, s.connected);
                folded(ReportKind::Accept, s.accepted);
                folded(ReportKind::Establish, s.established);
                folded(ReportKind::Close, s.closed);
                folded(ReportKind::Unreachable, s.folded.unreachable);
                folded(ReportKind::Silent, s.folded.silent);
                folded(ReportKind::AppError, s.folded.app_error);
                folded(ReportKind::Resumed, s.folded.resumed);
            }
            Detail::PeerSummary(s) => folded(ReportKind::Unreachable, s.folded),
            _ => {}
        }
    }

    /// The health counters as the agent last read them (totals).
    pub fn set_health(&self, h: &Health) {
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = *h;
    }

    /// The exposition: OpenMetrics, or the Prometheus text format 0.0.4 (which
    /// `promtool check metrics` and older scrapers read).
    pub fn encode(&self, openmetrics: bool) -> Result<String, fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            openmetrics_text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}

/// The kinds a SUMMARY can count instead of printing.
const FOLDABLE: [ReportKind; 8] = [
    ReportKind::Connect,
    ReportKind::Accept,
    ReportKind::Establish,
    ReportKind::Unreachable,
    ReportKind::Silent,
    ReportKind::Resumed,
    ReportKind::AppError,
    ReportKind::Close,
];

const VERDICTS: [Verdict; 4] = [
    Verdict::Notified,
    Verdict::Queued,
    Verdict::Discarded,
    Verdict::NoSocket,
];

/// The `reason` labels and values of `udpmon_events_lost_total`: every loss the health
/// warnings name, and kernel read failures.
fn losses(h: &Health) -> impl Iterator<Item = (&'static str, u64)> {
    h.losses()
        .into_iter()
        .map(|l| (l.reason, l.count))
        .chain([("kernel_read_failed", h.kernel_read_failed)])
}

#[derive(Debug)]
struct HealthCollector(Arc<Mutex<Health>>);

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let h = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lost = encoder.encode_descriptor(
            "events_lost",
            "Events, or counts of traffic, udpmon lost, by cause (those its health warnings \
             name, and kernel read failures).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in losses(&h) {
            ConstCounter::new(n).encode(lost.encode_family(&[("reason", reason)])?)?;
        }
        let read = ConstCounter::new(h.events_read);
        read.encode(encoder.encode_descriptor(
            "events_read",
            "Records udpmon read from the kernel's ring buffer.",
            None,
            read.metric_type(),
        )?)?;
        let tracked = ConstGauge::new(h.flows_tracked);
        tracked.encode(encoder.encode_descriptor(
            "flows_tracked",
            "UDP flows udpmon tracks now.",
            None,
            tracked.metric_type(),
        )?)?;
        let recovered = ConstCounter::new(h.closes_recovered);
        recovered.encode(encoder.encode_descriptor(
            "closes_recovered",
            "Sockets whose close a lost record carried, found gone by dumps of the open \
             sockets and reported closed then.",
            None,
            recovered.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Binds the metrics address: at startup, before anything is attached, so that a taken port
/// is a one-line error with nothing to undo.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    if !addr.ip().to_canonical().is_loopback() {
        log::warn!(
            "--metrics {addr} is not a loopback address: whoever can reach it can read udpmon's \
             metrics"
        );
    }
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--metrics {addr}"))?;
    Ok(listener)
}

/// Serves `/metrics` on `listener` from the current runtime, for as long as it runs.
pub fn start(
    rt: &tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    strategy: Strategy,
) -> anyhow::Result<Metrics> {
    let listener = {
        let _rt = rt.enter();
        TcpListener::from_std(listener).context("--metrics: registering the listener")?
    };
    // The actual address: with port 0 the kernel chose it.
    let addr = listener.local_addr().context("--metrics")?;
    log::info!("metrics at http://{addr}/metrics");
    let metrics = Metrics::new(strategy);
    rt.spawn(serve(listener, metrics.clone()));
    Ok(metrics)
}

async fn serve(listener: TcpListener, metrics: Metrics) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, for one: retrying at once would spin.
                log::debug!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn({
                let metrics = metrics.clone();
                move |req| {
                    let resp = respond(&metrics, &req);
                    async move { Ok::<_, Infallible>(resp) }
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("metrics: connection: {e}");
            }
            drop(slot);
        });
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "udpmon serves /metrics only\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let openmetrics = wants_openmetrics(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    match metrics.encode(openmetrics) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(if openmetrics {
                    OPENMETRICS_CONTENT_TYPE
                } else {
                    prometheus_text::CONTENT_TYPE
                }),
            );
            r
        }
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
    }
}

/// Whether an Accept header admits OpenMetrics (Prometheus asks for it first); anything else
/// gets the Prometheus text format, which every scraper and `promtool` reads.
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{
        decode::Family as AddrFamily,
        engine::{Identity, UnreachableInfo},
        report::{ClockOffset, JsonFormat},
    };

    fn report(kind: ReportKind, detail: Detail) -> Report {
        Report {
            kind,
            ts_ns: 1,
            cookie: 7,
            family: AddrFamily::V4,
            local: "10.0.0.1:54321".parse().unwrap(),
            remote: "10.0.0.2:12345".parse().unwrap(),
            detail,
            container: None,
            who: Identity {
                pid: 42,
                tgid: 42,
                comm: "nc".into(),
                process: "nc".into(),
                uid: 0,
                cgroup: 1,
                netns: 4026531833,
            },
        }
    }

    fn unreachable(verdict: Verdict) -> Report {
        report(
            ReportKind::Unreachable,
            Detail::Unreachable(UnreachableInfo {
                ty: 3,
                code: 3,
                errno: Some(111),
                fatal: Some(true),
                from: "10.0.0.2".parse().unwrap(),
                verdict,
                connected: true,
                last_owner: None,
            }),
        )
    }

    /// The sample lines (name and labels -> value) of an exposition.
    fn samples(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').expect("name value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn value(text: &str, series: &str) -> Option<String> {
        samples(text)
            .into_iter()
            .find(|(k, _)| k == series)
            .map(|(_, v)| v)
    }

    #[test]
    fn every_family_is_named_by_the_rules_in_both_formats() {
        let m = Metrics::new(Strategy::Kprobe);
        for openmetrics in [false, true] {
            let text = m.encode(openmetrics).unwrap();
            let types: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .collect();
            let want: &[&str] = if openmetrics {
                &[
                    "udpmon_events counter",
                    "udpmon_events_folded counter",
                    "udpmon_unreachable counter",
                    "udpmon_build info",
                    "udpmon_events_lost counter",
                    "udpmon_events_read counter",
                    "udpmon_flows_tracked gauge",
                    "udpmon_closes_recovered counter",
                ]
            } else {
                // The 0.0.4 format names a counter's family with its _total suffix.
                &[
                    "udpmon_events_total counter",
                    "udpmon_events_folded_total counter",
                    "udpmon_unreachable_total counter",
                    "udpmon_build_info gauge",
                    "udpmon_events_lost_total counter",
                    "udpmon_events_read_total counter",
                    "udpmon_flows_tracked gauge",
                    "udpmon_closes_recovered_total counter",
                ]
            };
            assert_eq!(types, want, "{text}");
            assert_eq!(text.ends_with("# EOF\n"), openmetrics, "{text}");
            for (series, _) in samples(&text) {
                let name = series.split('{').next().unwrap();
                assert!(
                    name.starts_with("udpmon_")
                        && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{series}"
                );
                let counter = !matches!(name, "udpmon_flows_tracked" | "udpmon_build_info");
                assert_eq!(name.ends_with("_total"), counter, "{series}");
            }
            assert_eq!(
                value(
                    &text,
                    &format!(
                        "udpmon_build_info{{version=\"{}\",strategy=\"kprobe\"}}",
                        env!("CARGO_PKG_VERSION")
                    )
                )
                .as_deref(),
                Some("1"),
                "{text}"
            );
        }
    }

    #[test]
    fn every_kind_and_verdict_is_a_series_from_the_start() {
        let text = Metrics::new(Strategy::Tracepoint).encode(false).unwrap();
        for k in ReportKind::ALL {
            let series = format!("udpmon_events_total{{event=\"{}\"}}", k.name());
            assert_eq!(value(&text, &series).as_deref(), Some("0"), "{text}");
        }
        for v in ["notified", "queued", "discarded", "no-socket"] {
            let series = format!("udpmon_unreachable_total{{verdict=\"{v}\"}}");
            assert_eq!(value(&text, &series).as_deref(), Some("0"), "{text}");
        }
        for k in FOLDABLE {
            let series = format!("udpmon_events_folded_total{{event=\"{}\"}}", k.name());
            assert_eq!(value(&text, &series).as_deref(), Some("0"), "{text}");
        }
        assert_eq!(
            samples(&text)
                .iter()
                .filter(|(k, _)| k.starts_with("udpmon_events_lost_total{reason="))
                .count(),
            losses(&Health::default()).count(),
            "{text}"
        );
    }

    /// The labels are the JSON output's names, counted per report.
    #[test]
    fn reports_are_counted_under_their_json_names() {
        let m = Metrics::new(Strategy::Tracepoint);
        let json = JsonFormat::new(ClockOffset(0));
        let connect = report(
            ReportKind::Connect,
            Detail::Opened {
                via: crate::engine::Via::Connect,
                bytes: None,
            },
        );
        m.report(&connect);
        m.report(&connect);
        for (i, v) in VERDICTS.into_iter().enumerate() {
            let r = unreachable(v);
            for _ in 0..=i {
                m.report(&r);
            }
            let line: Value = serde_json::from_str(&json.format(&r)).unwrap();
            let text = m.encode(false).unwrap();
            let series = format!(
                "udpmon_unreachable_total{{verdict={}}}",
                line["icmp"]["verdict"]
            );
            assert_eq!(value(&text, &series), Some((i + 1).to_string()), "{text}");
        }
        let text = m.encode(false).unwrap();
        let line: Value = serde_json::from_str(&json.format(&connect)).unwrap();
        let series = format!("udpmon_events_total{{event={}}}", line["event"]);
        assert_eq!(value(&text, &series).as_deref(), Some("2"), "{text}");
        assert_eq!(
            value(&text, "udpmon_events_total{event=\"unreachable\"}").as_deref(),
            Some("10"),
            "{text}"
        );
        assert_eq!(
            value(&text, "udpmon_events_total{event=\"app-error\"}").as_deref(),
            Some("0"),
            "{text}"
        );
    }

    /// A SUMMARY counts as one `summary` event, and what it folded under the folded kinds.
    #[test]
    fn summaries_count_what_they_folded() {
        let m = Metrics::new(Strategy::Tracepoint);
        let summary = report(
            ReportKind::Summary,
            Detail::SocketSummary(Box::new(crate::engine::SocketSummary {
                interval_ns: 10_000_000_000,
                new_flows: 50,
                accepted: 40,
                connected: 9,
                established: 30,
                closed: 20,
                never_established: 5,
                open: 30,
                problems: crate::engine::Problems::default(),
                folded: crate::engine::Folded {
                    unreachable: 3,
                    resumed: 1,
                    ..crate::engine::Folded::default()
                },
            })),
        );
        m.report(&summary);
        m.report(&summary);
        let text = m.encode(false).unwrap();
        for (series, want) in [
            ("udpmon_events_total{event=\"summary\"}", "2"),
            ("udpmon_events_total{event=\"accept\"}", "0"),
            ("udpmon_events_folded_total{event=\"accept\"}", "80"),
            ("udpmon_events_folded_total{event=\"connect\"}", "18"),
            ("udpmon_events_folded_total{event=\"establish\"}", "60"),
            ("udpmon_events_folded_total{event=\"close\"}", "40"),
            ("udpmon_events_folded_total{event=\"unreachable\"}", "6"),
            ("udpmon_events_folded_total{event=\"resumed\"}", "2"),
            ("udpmon_events_folded_total{event=\"silent\"}", "0"),
        ] {
            assert_eq!(
                value(&text, series).as_deref(),
                Some(want),
                "{series}: {text}"
            );
        }
    }

    /// Every counter the health warnings name is a `reason`, with its value: a Health written
    /// out field by field (a new field does not compile here until it is placed), each with
    /// its own value, so that a reason reading the wrong field shows.
    #[test]
    fn every_health_loss_is_a_reason() {
        let h = Health {
            ringbuf_full: 101,
            flow_insert_failed: 102,
            kernel_read_failed: 103,
            events_sent: 1,
            no_socket_suppressed: 104,
            no_cookie: 105,
            events_read: 2,
            decode_errors: 106,
            flows_evicted: 107,
            kernel_entries_renewed: 108,
            flows_tracked: 3,
            recursion_misses: 109,
            kprobe_misses: 110,
            // A part of the two above, not a loss of its own.
            close_misses: 5,
            unread_at_exit: 111,
            unwritten: 112,
            peers_evicted: 113,
            closes_recovered: 4,
        };
        let mut exported: Vec<u64> = losses(&h).map(|(_, n)| n).collect();
        exported.sort();
        assert_eq!(exported, (101..=113).collect::<Vec<u64>>());
        let m = Metrics::new(Strategy::Tracepoint);
        m.set_health(&h);
        let text = m.encode(false).unwrap();
        for (reason, n) in losses(&h) {
            assert!(
                reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{reason}"
            );
            let series = format!("udpmon_events_lost_total{{reason=\"{reason}\"}}");
            assert_eq!(value(&text, &series), Some(n.to_string()), "{text}");
        }
        assert_eq!(
            value(&text, "udpmon_events_read_total").as_deref(),
            Some("2")
        );
        assert_eq!(value(&text, "udpmon_flows_tracked").as_deref(), Some("3"));
        assert_eq!(
            value(&text, "udpmon_closes_recovered_total").as_deref(),
            Some("4")
        );
    }

    #[test]
    fn openmetrics_only_when_the_client_accepts_it() {
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics(
            "Application/OpenMetrics-Text; version=1.0.0"
        ));
        for no in [
            "",
            "*/*",
            "text/plain;version=0.0.4",
            "application/openmetrics-text;q=0",
            "text/html, application/openmetrics-text ; q=0.0",
        ] {
            assert!(!wants_openmetrics(no), "{no}");
        }
    }
}
