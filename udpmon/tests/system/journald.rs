//! `--journal` against a real systemd-journald (the one Debian's systemd package ships),
//! started by the test in a mount namespace of its own so that its sockets and files are
//! private; entries are read back with `journalctl -o json`.
use std::{
    net::UdpSocket,
    path::Path,
    process::{Child, Command, Stdio},
    time::Instant,
};

use serde_json::Value;

use crate::{
    behaviour::once,
    harness::{Outcome, Strategy, Udpmon, deadline, is, need_tools, s, udpmon_bin, wait_until},
};

const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// systemd-journald in a private mount namespace, killed on drop.
struct Journald(Child);

impl Journald {
    fn start() -> Journald {
        // tmpfs over every place journald keeps sockets and files: nothing of the host's
        // journal is read or written.
        let script = "set -e
            mkdir -p /run/systemd/journal /run/log/journal
            for d in /run/systemd/journal /run/log/journal /var/log/journal; do
                [ -d $d ] && mount -t tmpfs tmpfs $d
            done
            exec \"$0\"";
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                JOURNALD,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting systemd-journald");
        let j = Journald(child);
        let socket = format!("/proc/{}/root/run/systemd/journal/socket", j.0.id());
        wait_until("systemd-journald's socket", 20, || {
            Path::new(&socket).exists()
        });
        j
    }

    /// A command run in journald's mount namespace.
    fn enter(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--mount=/proc/{}/ns/mnt", self.0.id()),
            "--".into(),
        ]
    }

    /// Every entry with this identifier, as journalctl prints them.
    fn entries_of(&self, ident: &str) -> Vec<Value> {
        let mut cmd = self.enter();
        cmd.extend(["journalctl", "-o", "json", "--no-pager"].map(String::from));
        cmd.push(format!("SYSLOG_IDENTIFIER={ident}"));
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .output()
            .expect("running journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journalctl: {e}: {l}")))
            .collect()
    }

    /// Every entry udpmon sent natively.
    fn entries(&self) -> Vec<Value> {
        self.entries_of("udpmon")
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn field<'a>(e: &'a Value, k: &str) -> &'a str {
    e[k].as_str().unwrap_or("")
}

/// The journal entry of a JSON event: same kind, socket and peer.
fn entry_of<'a>(entries: &'a [Value], v: &Value) -> Option<&'a Value> {
    entries.iter().find(|e| {
        field(e, "UDPMON_EVENT") == s(v, "event")
            && field(e, "UDPMON_LOCAL") == s(v, "local")
            && field(e, "UDPMON_REMOTE") == s(v, "remote")
            && field(e, "UDPMON_COOKIE").parse::<u64>().ok() == v["cookie"].as_u64()
    })
}

/// One entry per event, with the text line as MESSAGE, the JSON keys as UDPMON_* fields and
/// a priority that puts an ICMP error the application never learns of above the rest.
pub fn journal_entries(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    if let Err(o) = need_tools(&["unshare", "nsenter", "journalctl", "systemd-cat"]) {
        return o;
    }
    if !Path::new(JOURNALD).exists() {
        return Outcome::Skip(format!("{JOURNALD} is not installed"));
    }
    let j = Journald::start();
    let dir = std::env::temp_dir().join(format!("udpmon-journal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("events.jsonl");
    let u = Udpmon::start_under(&j.enter(), st, &["--journal", "-o", json.to_str().unwrap()])
        .expect("udpmon starts with --journal");
    // An unconnected socket without IP_RECVERR sends to a closed port: its ICMP error is
    // discarded. A second pair talks both ways.
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let lone = UdpSocket::bind("127.0.0.1:0").unwrap();
    lone.send_to(b"anyone?", ("127.0.0.1", closed_port))
        .unwrap();
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.send_to(b"ping", b.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 8];
    let (_, from) = b.recv_from(&mut buf).unwrap();
    b.send_to(b"pong", from).unwrap();
    a.recv_from(&mut buf).unwrap();
    let lone_addr = lone.local_addr().unwrap().to_string();
    let a_addr = a.local_addr().unwrap().to_string();
    let events = || -> Vec<Value> {
        std::fs::read_to_string(&json)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    wait_until(
        "the unreachable and the establish in the JSON output",
        20,
        || {
            let ev = events();
            ev.iter()
                .any(|v| is(v, "unreachable") && s(v, "local") == lone_addr)
                && ev
                    .iter()
                    .any(|v| is(v, "establish") && s(v, "local") == a_addr)
        },
    );
    let (status, _) = u.stop();
    assert!(status.success(), "exit status: {status}");
    let printed = events();
    // journald may still be storing the last datagrams: wait for every event to be there.
    let end = Instant::now() + deadline(20);
    let entries = loop {
        let entries = j.entries();
        let missing: Vec<&Value> = printed
            .iter()
            .filter(|v| entry_of(&entries, v).is_none())
            .collect();
        if missing.is_empty() {
            break entries;
        }
        assert!(
            Instant::now() < end,
            "{} of {} events have no journal entry, e.g. {}; entries: {entries:?}",
            missing.len(),
            printed.len(),
            missing[0]
        );
    };
    let me = std::process::id().to_string();
    for v in &printed {
        let e = entry_of(&entries, v).expect("checked above");
        assert_eq!(field(e, "_TRANSPORT"), "journal", "{e}");
        let kind = s(v, "event").to_uppercase();
        assert!(field(e, "MESSAGE").contains(&kind), "MESSAGE: {e}");
        assert_eq!(field(e, "UDPMON_FAMILY"), s(v, "family"), "{e}");
        if v["pid"] == std::process::id() {
            assert_eq!(field(e, "UDPMON_PID"), me, "{e}");
            assert_eq!(field(e, "UDPMON_PROCESS"), s(v, "process"), "{e}");
        }
    }
    let unreachable = printed
        .iter()
        .find(|v| is(v, "unreachable") && s(v, "local") == lone_addr)
        .expect("waited for above");
    let e = entry_of(&entries, unreachable).unwrap();
    assert_eq!(field(e, "UDPMON_ICMP_VERDICT"), "discarded", "{e}");
    assert_eq!(field(e, "UDPMON_ICMP_ERRNO"), "ECONNREFUSED", "{e}");
    assert_eq!(
        field(e, "PRIORITY"),
        "4",
        "a discarded ICMP error is a warning: {e}"
    );
    let connect = printed
        .iter()
        .find(|v| is(v, "connect") && s(v, "local") == lone_addr)
        .expect("a connect before the unreachable");
    let e = entry_of(&entries, connect).unwrap();
    assert_eq!(field(e, "PRIORITY"), "6", "a connect is info: {e}");
    assert_eq!(field(e, "UDPMON_VIA"), "send", "{e}");

    // Diagnostics: with standard error on a journal stream (JOURNAL_STREAM naming it, as
    // systemd sets it for a unit), udpmon's own log lines are native journal entries.
    let mut cmd = j.enter();
    cmd.extend(
        [
            "systemd-cat",
            "-t",
            "udpmon-stream",
            "sh",
            "-c",
            "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec \"$0\" \"$@\"",
        ]
        .map(String::from),
    );
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .arg(udpmon_bin())
        .args(["--hooks", st.name(), "-o", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting udpmon on a journal stream");
    let native = |entries: &[Value]| {
        entries
            .iter()
            .find(|e| {
                field(e, "MESSAGE").contains("hook strategy")
                    && field(e, "_PID") == child_pid(&child)
            })
            .cloned()
    };
    wait_until("udpmon's diagnostics in the journal", 20, || {
        native(&j.entries()).is_some()
    });
    let e = native(&j.entries()).expect("waited for above");
    assert_eq!(
        field(&e, "_TRANSPORT"),
        "journal",
        "native, not the stream: {e}"
    );
    assert_eq!(
        field(&e, "PRIORITY"),
        "5",
        "info diagnostics are notices: {e}"
    );
    // Ready (the signal handlers in place) once it says so, on the stream.
    wait_until("udpmon to say it is watching", 20, || {
        j.entries_of("udpmon-stream").iter().any(|e| {
            field(e, "MESSAGE").contains("watching UDP sockets")
                && field(e, "_PID") == child_pid(&child)
        })
    });
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status: {status}");
    let _ = std::fs::remove_dir_all(&dir);
    Outcome::Pass
}

fn child_pid(c: &Child) -> String {
    c.id().to_string()
}
