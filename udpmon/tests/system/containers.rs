//! Issue 14, item 3: a real container. Debian's podman runs an image built `FROM scratch`
//! with busybox-static (no registry), with runc and the cgroupfs manager (crun refuses this
//! host's hybrid cgroups, and the default RLIMIT_NOFILE/RLIMIT_NPROC requests are refused,
//! hence the explicit `--ulimit`s), and without a network (its own namespace, loopback only).
//! busybox `nslookup` asks 127.0.0.1:53 where nothing listens: every event of its socket
//! must name the container by podman's full id and name, with the container's network
//! namespace; a second udpmon with `--container NAME` prints that socket and nothing from
//! outside the container.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

use crate::{
    behaviour::once,
    harness::{Outcome, Strategy, Udpmon, in_netns_at, is, need_tools, refused_expected, s},
};

/// podman as the test needs it on hosts like this one (see the module comment).
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--cgroup-manager", "cgroupfs", "--runtime", "runc"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running podman {args:?}: {e}"))
}

pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What the scenario made, removed however it ends.
struct Made {
    dir: PathBuf,
    image: String,
    container: String,
}

impl Made {
    /// The busybox image, built under `tag` (also the container's name), or why this host
    /// cannot run the scenario.
    fn image(tag: String) -> Result<Self, Outcome> {
        need_tools(&["podman", "runc"])?;
        let Some(busybox) = static_busybox() else {
            return Err(Outcome::Skip(
                "no static busybox (package busybox-static)".into(),
            ));
        };
        let made = Made {
            dir: std::env::temp_dir().join(&tag),
            image: format!("localhost/{tag}:latest"),
            container: tag,
        };
        build_image(&made.dir, &busybox, &made.image, "");
        Ok(made)
    }

    /// `podman VERB... --name CONTAINER <isolation> IMAGE /bin/busybox ARGS...` (see the
    /// module comment for the isolation this host needs); returns what podman printed (the
    /// container's id).
    fn podman(&self, verb: &[&str], busybox_args: &[&str]) -> String {
        let isolation = [
            "--name",
            &self.container,
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &self.image,
            "/bin/busybox",
        ];
        podman_ok(&[verb, &isolation[..], busybox_args].concat())
    }

    /// The running container's main process and its network namespace inode.
    fn process(&self) -> (String, u64) {
        let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.container]);
        let netns = fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap_or_else(|e| panic!("the container's process {pid}: {e}"))
            .ino();
        (pid, netns)
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.container]);
        let _ = podman(&["rmi", "--force", &self.image]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A statically linked busybox: the image has no libc.
pub fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| fs::read(p).is_ok_and(|elf| is_static(&elf)))
}

/// A 64-bit little-endian ELF file without a program interpreter (PT_INTERP).
fn is_static(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let num = |at: usize, len: usize| {
        elf.get(at..at + len)
            .map(|b| b.iter().rev().fold(0usize, |n, x| n << 8 | usize::from(*x)))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (num(0x20, 8), num(0x36, 2), num(0x38, 2))
    else {
        return false;
    };
    elf.starts_with(b"\x7fELF\x02\x01")
        && (0..phnum)
            .all(|i| num(phoff + i * phentsize, 4).is_some_and(|t| t != PT_INTERP as usize))
}

pub fn podman_container(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    let made = match Made::image(format!("udpmon-test-{}", std::process::id())) {
        Ok(m) => m,
        Err(o) => return o,
    };

    let mut all = Udpmon::start(st, &[]).expect("udpmon starts");
    let mut only = Udpmon::start(st, &["--container", &made.container]).expect("udpmon starts");
    let id = made.podman(
        &["create"],
        &[
            "sh",
            "-c",
            // The container stays up until the test removes it, so that its namespace is
            // there to be resolved; the query fails at once (ECONNREFUSED).
            "/bin/busybox nslookup example.invalid 127.0.0.1; exec /bin/busybox sleep 600",
        ],
    );
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "podman create printed {id:?}"
    );
    podman_ok(&["start", &made.container]);
    let (_, netns) = made.process();

    let query =
        |v: &Value| is(v, "close") && v["netns"] == netns && s(v, "remote") == "127.0.0.1:53";
    let close = all.wait_for("CLOSE of the container's query socket", query);
    let cookie = close["cookie"].clone();
    let mut story = all.all(|v| v["cookie"] == cookie);
    let kinds: Vec<&str> = story.iter().map(|v| s(v, "event")).collect();
    assert!(
        kinds.contains(&"connect") && kinds.contains(&"unreachable"),
        "the query's socket: {kinds:?}\n{}",
        all.dump()
    );
    // The query's port, closed: a datagram to it, sent from inside the container's namespace,
    // is a REFUSED of the container (its last owner's), though no process of it is involved.
    let refused = refused_expected().then(|| refused_in(&mut all, &made, &close, netns));
    story.extend(refused.clone());
    for v in &story {
        let c = &v["container"];
        assert_eq!(c["id"], id.as_str(), "{v}");
        assert_eq!(c["name"], made.container.as_str(), "{v}");
        assert_eq!(c["runtime"], "podman", "{v}");
        assert!(c["pod"].is_null() && c["pod_uid"].is_null(), "{v}");
        assert_eq!(v["netns"], netns, "{v}");
    }

    // The filtered udpmon: the same socket, and only the container's events.
    only.wait_for("CLOSE of the query socket through --container", |v| {
        v["cookie"] == cookie && is(v, "close")
    });
    if let Some(refused) = &refused {
        only.wait_for("the REFUSED through --container", |v| {
            is(v, "refused") && v["local"] == refused["local"]
        });
    }
    let filtered = only.all(|_| true);
    let strangers: Vec<&Value> = filtered
        .iter()
        .filter(|v| v["container"]["id"] != id.as_str())
        .collect();
    assert!(
        strangers.is_empty(),
        "--container let through: {strangers:?}"
    );
    Outcome::Pass
}

/// A datagram to the closed port of `close` (a CLOSE of the container's), from inside the
/// container's namespace: its REFUSED, whose last owner is `close`'s process.
fn refused_in(u: &mut Udpmon, made: &Made, close: &Value, netns: u64) -> Value {
    let port = |v: &Value| s(v, "local").rsplit(':').next().unwrap_or("").to_owned();
    let query_port = port(close);
    let pid = made.process().0;
    let to = format!("127.0.0.1:{query_port}");
    in_netns_at(format!("/proc/{pid}/ns/net"), move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.send_to(b"late", &to).expect("send");
    });
    let refused = u.wait_for("the REFUSED at the query's closed port", |v| {
        is(v, "refused") && v["netns"] == netns && port(v) == query_port
    });
    assert_eq!(refused["last_owner"]["pid"], close["pid"], "{refused}");
    refused
}

/// Issue 14: a socket the container opened before udpmon started is named as part of it
/// too. busybox syslogd forwards to a remote host over UDP and opens that socket for the
/// first line it forwards (a `logger` line in the container); once the socket exists,
/// udpmon starts, and a second line makes syslogd send again on it, to 127.0.0.1:5514 where
/// nothing listens. Sent from the existing socket, the datagram reaches udpmon's hooks with no
/// creator on record (the tracepoint strategy's cgroup_skb hook cannot ask who is running):
/// the container can only come from the holder found at startup.
pub fn podman_preexisting(st: Strategy) -> Outcome {
    let tag = format!("udpmon-test-pre-{}-{}", st.name(), std::process::id());
    let made = match Made::image(tag) {
        Ok(m) => m,
        Err(o) => return o,
    };
    let id = made.podman(
        &["run", "--detach"],
        &["syslogd", "-n", "-R", "127.0.0.1:5514"],
    );
    let (pid, netns) = made.process();
    let log = |line: &str| {
        podman_ok(&["exec", &made.container, "/bin/busybox", "logger", line]);
    };
    log("before udpmon");
    // syslogd's socket, in the container's namespace: a line past the header.
    crate::harness::wait_until("syslogd's UDP socket", 30, || {
        fs::read_to_string(format!("/proc/{pid}/net/udp")).is_ok_and(|t| t.lines().count() > 1)
    });
    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    log("after udpmon");
    let sent =
        |v: &Value| v["netns"] == netns && s(v, "remote") == "127.0.0.1:5514" && is(v, "connect");
    let connect = u.wait_for("syslogd's send on the socket it opened before udpmon", sent);
    let cookie = connect["cookie"].clone();
    let c = &connect["container"];
    assert_eq!(c["id"], id.as_str(), "{connect}\n{}", u.dump());
    assert_eq!(c["name"], made.container.as_str(), "{connect}");
    assert_eq!(c["runtime"], "podman", "{connect}");
    assert_eq!(
        connect["pid"].as_u64(),
        pid.parse::<u64>().ok(),
        "{connect}"
    );
    // And the ICMP error that comes back for it.
    let icmp = u.wait_for("the port unreachable for syslogd's datagram", |v| {
        v["cookie"] == cookie && is(v, "unreachable")
    });
    assert_eq!(icmp["container"]["id"], id.as_str(), "{icmp}");
    Outcome::Pass
}

/// `FROM scratch` with busybox as its only file, and the Containerfile lines `more`.
pub fn build_image(dir: &Path, busybox: &Path, image: &str, more: &str) {
    fs::create_dir_all(dir).expect("temp dir");
    fs::copy(busybox, dir.join("busybox")).expect("copying busybox");
    fs::write(
        dir.join("Containerfile"),
        format!("FROM scratch\nCOPY busybox /bin/busybox\n{more}"),
    )
    .expect("writing the Containerfile");
    podman_ok(&[
        "build",
        "--quiet",
        "--tag",
        image,
        &dir.display().to_string(),
    ]);
}
