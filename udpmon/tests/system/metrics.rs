//! Issue 13, item 1: `--metrics`, scraped by a real Prometheus server (Debian's `prometheus`
//! package) on loopback. Traffic in network namespaces causes every event kind; the values
//! Prometheus scraped, read back through its query API, must equal what udpmon printed, kind
//! by kind and verdict by verdict. `promtool check metrics` must accept a raw scrape.
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use udpmon::engine::ReportKind;

use crate::{
    harness::{
        CLIENT4, Outcome, SERVER4, Strategy, TwoHosts, Udpmon, deadline, in_netns, is, need_tools,
        s, udp_socket_in, udpmon_bin,
    },
    util::{addr, local_of, of_flow},
};

/// The JSON `icmp.verdict` values (README, "What it prints").
const VERDICTS: [&str; 4] = ["notified", "queued", "discarded", "no-socket"];

/// Plain HTTP to loopback, never through a proxy named in the environment; a status other
/// than 200 is an answer to report, not an error.
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(deadline(10)))
        .build()
        .into()
}

/// GET `url`: status, Content-Type and body.
fn get(url: &str, accept: Option<&str>) -> Result<(u16, String, String), String> {
    let mut req = http().get(url);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))?;
    Ok((resp.status().as_u16(), ctype, body))
}

/// A free TCP port on loopback, for a program that takes a port rather than reporting the one
/// it got (Prometheus); [`Prometheus::start`] retries if another process takes it first.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A Prometheus server of its own: temporary configuration and storage, a loopback port,
/// scraping one target every second.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("udpmon-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating Prometheus's directory");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
                 - job_name: udpmon\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("writing prometheus.yml");
        let log_path = dir.join("prometheus.log");
        for _ in 0..3 {
            let url = format!("http://127.0.0.1:{}", free_port());
            let log = fs::File::create(&log_path).expect("prometheus.log");
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={}", &url["http://".len()..]))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawning prometheus");
            let mut p = Prometheus {
                child,
                dir: dir.clone(),
                url,
            };
            let end = Instant::now() + deadline(60);
            loop {
                if matches!(get(&format!("{}/-/ready", p.url), None), Ok((200, _, _))) {
                    return p;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("address already in use") {
                        break;
                    }
                    panic!("prometheus exited ({status}):\n{log}");
                }
                assert!(
                    Instant::now() < end,
                    "prometheus not ready within {:?}:\n{}",
                    deadline(60),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus found its port taken three times");
    }

    /// `query`'s instant vector: each series' labels and value.
    fn query(&self, query: &str) -> Vec<(Value, u64)> {
        let resp = http()
            .get(format!("{}/api/v1/query", self.url))
            .query("query", query)
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .unwrap_or_else(|e| panic!("querying Prometheus for {query}: {e}"));
        let v: Value = serde_json::from_str(&resp).expect("Prometheus answers JSON");
        assert_eq!(v["status"], "success", "{query}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{query}: {v}"))
            .iter()
            .map(|r| {
                let n = r["value"][1].as_str().expect("a sample value");
                let n: f64 = n.parse().expect("a number");
                (r["metric"].clone(), n as u64)
            })
            .collect()
    }

    /// `query`'s series by the value of one label.
    fn by(&self, query: &str, label: &str) -> BTreeMap<String, u64> {
        self.query(query)
            .into_iter()
            .map(|(m, n)| (s(&m, label).to_string(), n))
            .collect()
    }

    /// How the scrape of udpmon went, for failure messages.
    fn targets(&self) -> String {
        get(&format!("{}/api/v1/targets", self.url), None)
            .map(|(_, _, body)| body)
            .unwrap_or_else(|e| e)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What udpmon printed so far: events by kind (every kind, 0 for none) and UNREACHABLE
/// events by verdict.
fn printed(u: &mut Udpmon) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut kinds: BTreeMap<String, u64> = ReportKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), 0))
        .collect();
    let mut verdicts: BTreeMap<String, u64> = VERDICTS.iter().map(|v| (v.to_string(), 0)).collect();
    for v in u.all(|_| true) {
        *kinds.entry(s(&v, "event").to_string()).or_default() += 1;
        if let Some(verdict) = v["icmp"]["verdict"].as_str() {
            *verdicts.entry(verdict.to_string()).or_default() += 1;
        }
    }
    (kinds, verdicts)
}

/// What the printed SUMMARY lines folded, by the kind of the lines they stand for (the
/// `udpmon_events_folded_total` labels).
fn folded_printed(u: &mut Udpmon) -> BTreeMap<String, u64> {
    let mut folded: BTreeMap<String, u64> = BTreeMap::new();
    for v in u.all(|v| is(v, "summary")) {
        let mut add = |kind: &str, n: &Value| {
            *folded.entry(kind.to_string()).or_default() += n.as_u64().unwrap_or(0);
        };
        add("connect", &v["connected"]);
        add("accept", &v["accepted"]);
        add("establish", &v["established"]);
        add("close", &v["closed"]);
        add("unreachable", &v["folded"]["unreachable"]);
        add("silent", &v["folded"]["silent"]);
        add("app-error", &v["folded"]["app_error"]);
        add("resumed", &v["folded"]["resumed"]);
    }
    folded
}

/// A socket that hears from more than the summary threshold (100) of client ports at once:
/// a SUMMARY once the interval ends, awaited on `u` itself (it is found on udpmon's tick).
fn busy_socket(u: &mut Udpmon) {
    let h = TwoHosts::new("mb");
    let server = addr(SERVER4, 7900);
    let ssock = udp_socket_in(&h.server, &server);
    in_netns(&h.client, {
        let server = server.clone();
        move || {
            // Over twice the threshold: however an interval's end splits the burst, one side
            // of it crosses the threshold.
            for _ in 0..250 {
                let c = std::net::UdpSocket::bind(addr(CLIENT4, 0)).unwrap();
                c.send_to(b"hello", &server).unwrap();
            }
        }
    });
    u.wait_for("the busy socket's summary", |v| {
        is(v, "summary") && s(v, "local") == server && v["new_flows"].as_u64() > Some(0)
    });
    // Its close reports what its summarised flows did since.
    drop(ssock);
    u.wait_for("the busy socket's last summary", |v| {
        is(v, "summary") && s(v, "local") == server && v["open"] == 0
    });
}

/// A flow that goes SILENT and then RESUMED, awaited on `u` itself: both are found on
/// udpmon's one-second tick, so another udpmon's timing (that of the scenarios reused below,
/// which wait on their own udpmon) cannot be relied on for them.
fn silent_then_resumed(u: &mut Udpmon) {
    let h = TwoHosts::new("mx");
    let server = addr(SERVER4, 7800);
    let ssock = udp_socket_in(&h.server, &server);
    let csock = udp_socket_in(&h.client, &addr(CLIENT4, 0));
    csock.connect(&server).unwrap();
    ssock.set_read_timeout(Some(deadline(5))).unwrap();
    csock.set_read_timeout(Some(deadline(5))).unwrap();
    let local = local_of(&csock);
    let mut buf = [0u8; 16];
    let answer = |buf: &mut [u8]| {
        let (_, from) = ssock.recv_from(buf).unwrap();
        ssock.send_to(b"pong", from).unwrap();
    };
    csock.send(b"ping").unwrap();
    answer(&mut buf);
    csock.recv(&mut buf).unwrap();
    let est = u.wait_for("the client's establish", |v| {
        is(v, "establish") && s(v, "local") == local && s(v, "remote") == server
    });
    let ck = est["cookie"].clone();
    // The server stops answering; the client keeps sending until udpmon calls the peer
    // silent (after --silent-after 1s and 2 sends).
    let end = Instant::now() + deadline(20);
    while u
        .all(|v| is(v, "silent") && of_flow(v, &ck, &server))
        .is_empty()
    {
        assert!(
            Instant::now() < end,
            "no SILENT; udpmon printed:\n{}",
            u.dump()
        );
        csock.send(b"ping").unwrap();
    }
    // It answers again.
    csock.send(b"ping").unwrap();
    answer(&mut buf);
    u.wait_for("the client's resumed", |v| {
        is(v, "resumed") && of_flow(v, &ck, &server)
    });
}

/// The `ADDR:PORT` udpmon said it serves metrics at.
fn served_at(u: &Udpmon) -> String {
    u.stderr
        .iter()
        .find_map(|l| l.split("metrics at http://").nth(1))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("udpmon did not log its metrics address: {:?}", u.stderr))
        .to_string()
}

pub fn prometheus(st: Strategy) -> Outcome {
    if let Err(Outcome::Skip(why)) = need_tools(&["prometheus", "promtool"]) {
        return Outcome::Skip(format!(
            "{why}: the metrics scenario needs Debian's prometheus package (`cargo xtask \
             bootstrap` installs it)"
        ));
    }
    if let Err(o) = need_tools(&["nc", "nft", "ip", "nsenter"]) {
        return o;
    }
    // Port 0: udpmon takes a free port and logs it, so no other process can take it first.
    let mut u = Udpmon::start(
        st,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--silent-after",
            "1s",
            "--summary-interval",
            "1s",
        ],
    )
    .expect("udpmon starts");
    let target = served_at(&u);
    assert!(target.starts_with("127.0.0.1:"), "{target}");
    let prom = Prometheus::start(&target);

    // Every event kind. These scenarios check their own udpmon's events as they go, and what
    // they cause is reported from the ring buffer as it happens, so this udpmon sees it too:
    // CONNECT, ACCEPT, ESTABLISH, CLOSE, UNREACHABLE (notified) and REFUSED from the seed;
    // APP-ERROR from a reject; the queued and discarded verdicts from unconnected senders;
    // SUMMARY from a socket with many clients.
    silent_then_resumed(&mut u);
    busy_socket(&mut u);
    for (name, run) in [
        (
            "seed_ipv4",
            (|st| crate::scenarios::seed(st, false)) as fn(Strategy) -> Outcome,
        ),
        ("nft_reject_admin_ipv4", |st| {
            crate::firewall::reject_admin(st, false)
        }),
        ("peers_queued_ipv4", |st| {
            crate::peers::peers(st, false, true)
        }),
        ("peers_discarded_ipv4", |st| {
            crate::peers::peers(st, false, false)
        }),
    ] {
        if let Outcome::Skip(why) = run(st) {
            return Outcome::Skip(format!("{name}, the traffic it needs, skipped: {why}"));
        }
    }

    // The traffic is over; what is still on its way (the last CLOSEs) reaches both the output
    // and the next scrape.
    let end = Instant::now() + deadline(30);
    let (kinds, verdicts, folded) = loop {
        let (kinds, verdicts) = printed(&mut u);
        let folded = folded_printed(&mut u);
        let scraped_kinds = prom.by("udpmon_events_total", "event");
        let scraped_verdicts = prom.by("udpmon_unreachable_total", "verdict");
        let scraped_folded = prom.by("udpmon_events_folded_total", "event");
        if scraped_kinds == kinds && scraped_verdicts == verdicts && scraped_folded == folded {
            break (kinds, verdicts, folded);
        }
        assert!(
            Instant::now() < end,
            "Prometheus's values did not come to match udpmon's output within {:?}:\n\
             printed {kinds:?}\nscraped {scraped_kinds:?}\nprinted {verdicts:?}\n\
             scraped {scraped_verdicts:?}\nprinted summaries {folded:?}\n\
             scraped {scraped_folded:?}\ntargets: {}",
            deadline(30),
            prom.targets()
        );
        // A scrape a second: poll a few times per scrape.
        thread::sleep(Duration::from_millis(250));
    };
    let without_app_errors = u.without_app_errors();
    for (kind, n) in &kinds {
        if kind == "app-error" && without_app_errors {
            assert_eq!(*n, 0, "udpmon said it cannot report APP-ERROR here");
            continue;
        }
        assert!(
            *n > 0,
            "no {kind} event, so its count was not checked: {kinds:?}"
        );
    }
    for v in ["notified", "queued", "discarded"] {
        assert!(verdicts[v] > 0, "no {v} UNREACHABLE: {verdicts:?}");
    }
    // The busy socket's flows past the threshold (up to 50, fewer when an interval ends
    // during its burst): accepted, then closed with it.
    assert!(
        folded["accept"] > 0 && folded["close"] == folded["accept"],
        "{folded:?}"
    );

    // The build and the hook strategy in use.
    let info = prom.query("udpmon_build_info");
    assert_eq!(info.len(), 1, "{info:?}");
    let (labels, n) = &info[0];
    assert_eq!(*n, 1, "{info:?}");
    assert_eq!(labels["strategy"], st.name(), "{info:?}");
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"), "{info:?}");
    // Prometheus asked for OpenMetrics and got it: only that format has an info type (whose
    // family drops the _info suffix).
    let meta = get(
        &format!("{}/api/v1/metadata?metric=udpmon_build", prom.url),
        None,
    )
    .expect("Prometheus's metadata API");
    let meta: Value = serde_json::from_str(&meta.2).expect("JSON");
    assert_eq!(meta["data"]["udpmon_build"][0]["type"], "info", "{meta}");

    // One loss family, a series per cause: those udpmon's health line knows.
    let lost = prom.by("udpmon_events_lost_total", "reason");
    let reasons: Vec<&str> = udpmon::health::Health::default()
        .losses()
        .iter()
        .map(|l| l.reason)
        .chain(["kernel_read_failed"])
        .collect();
    assert_eq!(
        lost.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut r = reasons.clone();
            r.sort();
            r
        },
        "{lost:?}"
    );
    assert!(
        prom.query("udpmon_events_read_total")
            .first()
            .is_some_and(|(_, n)| *n > 0),
        "no records read"
    );
    assert_eq!(prom.query("udpmon_flows_tracked").len(), 1);

    // A raw scrape, as promtool and scrapers without OpenMetrics get it, passes promtool's lint.
    let (status, ctype, body) =
        get(&format!("http://{target}/metrics"), None).expect("scraping udpmon");
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics ({}): {}{}\non:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A taken port: one line, exit code 1, before anything is attached.
    let out = Command::new(udpmon_bin())
        .args(["--hooks", st.name(), "--metrics", &target])
        .output()
        .expect("running a second udpmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.starts_with(&format!("udpmon: --metrics {target}: cannot listen")),
        "{stderr}"
    );

    let (status, _) = u.stop();
    assert!(status.success(), "udpmon exit status: {status}");

    // Not loopback: a warning, and served all the same. On a veth address in namespaces of
    // the test's own (nsenter leaves /sys, and with it the cgroup mount, as it is).
    let h = TwoHosts::new("mw");
    let u = Udpmon::start_under(
        &["nsenter".into(), format!("--net=/run/netns/{}", h.server)],
        st,
        &["--metrics", &addr(SERVER4, 0)],
    )
    .expect("udpmon starts in the server namespace");
    assert!(
        u.stderr
            .iter()
            .any(|l| l.contains("WARN") && l.contains("is not a loopback address")),
        "{:?}",
        u.stderr
    );
    let target = served_at(&u);
    assert!(target.starts_with(SERVER4), "{target}");
    let url = format!("http://{target}/metrics");
    let (status, _, body) =
        in_netns(&h.client, move || get(&url, None)).expect("scraping udpmon across the veth");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("udpmon_build_info{"), "{body}");
    let (status, _) = u.stop();
    assert!(status.success(), "udpmon exit status: {status}");
    Outcome::Pass
}
