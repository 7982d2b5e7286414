//! udpmon's container image (`cargo xtask image`, deploy/Containerfile) and the `image` test
//! tier: the image run under podman the way deploy/daemonset.yaml runs it on a node. The podman
//! command is derived from the manifest (capabilities, host PID namespace, network, mounts,
//! user, seccomp, read-only root, limits, arguments): a manifest field the translation does not
//! know fails the tier instead of being left out, so the manifest and the test cannot drift
//! apart. A second container, FROM scratch with busybox-static, sends a datagram to a closed
//! port; udpmon's JSON lines must report it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize as _;
use serde_json::Value;

use crate::{bootstrap, build, running::Running, util::run};

const CONTAINERFILE: &str = "deploy/Containerfile";
const MANIFEST: &str = "deploy/daemonset.yaml";
const REPOSITORY: &str = "localhost/udpmon";
/// The sender's image, built from busybox-static (bootstrap installs it).
const SENDER_IMAGE: &str = "localhost/udpmon-test-busybox:latest";
const BUSYBOX: &str = "/bin/busybox";
/// udpmon's one-line warning when a capability it wants is missing (privileges.rs).
const BLIND: &str = "udpmon does not see";
const CONTAINER: &str = "udpmon-image-test";

/// The tag `cargo xtask image` gives the image: the crate's version.
pub fn tag() -> anyhow::Result<String> {
    let manifest = build::workspace_root().join("udpmon/Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let version = package_version(&text).context("no version in udpmon/Cargo.toml")?;
    Ok(format!("{REPOSITORY}:{version}"))
}

fn package_version(cargo_toml: &str) -> Option<String> {
    cargo_toml
        .split("\n[")
        .find(|s| s.starts_with("package]") || s.starts_with("[package]"))?
        .lines()
        .find_map(|l| l.trim().strip_prefix("version"))
        .and_then(|v| v.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

fn have_podman() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// podman, with what this machine needs: where PID 1 is not systemd, cgroupfs instead of
/// the systemd cgroup manager; runc, because crun refuses hybrid cgroup layouts.
fn podman() -> Command {
    let mut c = Command::new("podman");
    if !Path::new("/run/systemd/system").exists() {
        c.args(["--cgroup-manager", "cgroupfs"]);
    }
    if Path::new("/usr/bin/runc").exists() || Path::new("/usr/sbin/runc").exists() {
        c.args(["--runtime", "runc"]);
    }
    c
}

/// A fresh build context holding only `files`, so that podman does not read the workspace.
fn context(name: &str, files: &[(&Path, &str)]) -> anyhow::Result<PathBuf> {
    let dir = build::workspace_root().join("target").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    for (src, dst) in files {
        fs::copy(src, dir.join(dst))
            .with_context(|| format!("copying {} into {}", src.display(), dir.display()))?;
    }
    Ok(dir)
}

/// `cargo xtask image`: the static udpmon, then the image; returns its tag. FROM scratch and
/// `--pull=never`: nothing comes from a registry.
pub fn build() -> anyhow::Result<String> {
    let path = bootstrap::build_env()?;
    bootstrap::musl_target()?;
    let bin = build::musl_udpmon(&path)?;
    ensure!(
        have_podman(),
        "podman is not installed (`cargo xtask bootstrap` installs it)"
    );
    let tag = tag()?;
    let ctx = context("image", &[(&bin, "udpmon")])?;
    let version = tag.rsplit(':').next().unwrap_or_default().to_owned();
    println!("[image] podman build {tag}");
    run(podman()
        .args(["build", "--pull=never", "-f"])
        .arg(build::workspace_root().join(CONTAINERFILE))
        .args(["-t", &tag])
        .arg(format!(
            "--label=org.opencontainers.image.version={version}"
        ))
        .args([
            "--label=org.opencontainers.image.title=udpmon",
            "--label=org.opencontainers.image.licenses=MIT OR Apache-2.0",
        ])
        .arg(&ctx))?;
    Ok(tag)
}

/// The documents of deploy/daemonset.yaml.
fn manifest_docs(text: &str) -> anyhow::Result<Vec<Value>> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).context("parsing the manifest"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("{MANIFEST}: no {kind}"))
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// Fails on a key `known` does not list: it may change how the container runs, and the test
/// would silently not reproduce it.
fn only_known(what: &str, v: &Value, known: &[&str]) -> anyhow::Result<()> {
    let unknown: Vec<&str> = keys(v).into_iter().filter(|k| !known.contains(k)).collect();
    ensure!(
        unknown.is_empty(),
        "{MANIFEST}: {what} has {unknown:?}, which the image tier does not translate to podman \
         (xtask/src/image.rs, podman_args)"
    );
    Ok(())
}

/// A Kubernetes quantity as podman reads it (binary suffixes only, as the manifest uses).
fn memory(q: &str) -> anyhow::Result<String> {
    for (k8s, podman) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = q.strip_suffix(k8s) {
            return Ok(format!("{n}{podman}"));
        }
    }
    bail!("memory quantity {q:?}: only Ki, Mi and Gi are translated")
}

fn cpus(q: &str) -> anyhow::Result<String> {
    Ok(match q.strip_suffix('m') {
        Some(milli) => format!("{:.3}", milli.parse::<f64>()? / 1000.0),
        None => q.parse::<f64>()?.to_string(),
    })
}

fn str_of<'a>(v: &'a Value, what: &str) -> anyhow::Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{MANIFEST}: {what} is not a string: {v}"))
}

/// What the manifest's one container needs from the host and the runtime, as `podman run`
/// arguments (before the image), the image, and the arguments after it.
#[derive(Debug)]
struct Run {
    opts: Vec<String>,
    image: String,
    args: Vec<String>,
    /// `DirectoryOrCreate` hostPaths, which the kubelet makes (empty) where they are missing
    /// and podman would refuse to bind.
    make_dirs: Vec<PathBuf>,
}

fn podman_args(manifest: &str) -> anyhow::Result<Run> {
    let docs = manifest_docs(manifest)?;
    let ds = find(&docs, "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    // Scheduling, identity and lifetime: they do not change how the container runs on a node.
    const IGNORED_POD: &[&str] = &[
        "serviceAccountName",
        "automountServiceAccountToken",
        "tolerations",
        "nodeSelector",
        "affinity",
        "priorityClassName",
        "terminationGracePeriodSeconds",
    ];
    let translated_pod = ["hostPID", "hostNetwork", "containers", "volumes"];
    only_known(
        "the pod spec",
        pod,
        &[IGNORED_POD, &translated_pod[..]].concat(),
    )?;
    let containers = pod["containers"]
        .as_array()
        .with_context(|| format!("{MANIFEST}: no containers"))?;
    ensure!(containers.len() == 1, "{MANIFEST}: one container expected");
    let c = &containers[0];
    only_known(
        "the container",
        c,
        &[
            "name",
            "image",
            "imagePullPolicy",
            "command",
            "args",
            "securityContext",
            "resources",
            "volumeMounts",
        ],
    )?;

    let mut opts = Vec::new();
    // A host-PID pod's /proc is the host's, which is what --pid=host gives.
    if pod["hostPID"] == true {
        opts.push("--pid=host".to_owned());
    }
    // Without hostNetwork a pod has a network namespace of its own; what is in it does not
    // matter to udpmon, and "none" adds nothing to the host's firewall.
    opts.push(if pod["hostNetwork"] == true {
        "--network=host".to_owned()
    } else {
        "--network=none".to_owned()
    });

    let sc = &c["securityContext"];
    only_known(
        "the securityContext",
        sc,
        &[
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "capabilities",
            "seccompProfile",
        ],
    )?;
    if sc["privileged"] == true {
        opts.push("--privileged".to_owned());
    }
    match (sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()) {
        (Some(u), Some(g)) => opts.push(format!("--user={u}:{g}")),
        (Some(u), None) => opts.push(format!("--user={u}")),
        _ => {}
    }
    if sc["allowPrivilegeEscalation"] == false {
        opts.push("--security-opt=no-new-privileges".to_owned());
    }
    if sc["readOnlyRootFilesystem"] == true {
        // Kubernetes mounts no tmpfs on /tmp or /run of a read-only root; podman would.
        opts.extend([
            "--read-only".to_owned(),
            "--read-only-tmpfs=false".to_owned(),
        ]);
    }
    let caps = &sc["capabilities"];
    only_known("capabilities", caps, &["drop", "add"])?;
    for (key, flag) in [("drop", "--cap-drop"), ("add", "--cap-add")] {
        for cap in caps[key].as_array().into_iter().flatten() {
            let cap = str_of(cap, "a capability")?;
            let cap = if cap == "ALL" {
                "all".to_owned()
            } else {
                format!("CAP_{cap}")
            };
            opts.push(format!("{flag}={cap}"));
        }
    }
    match sc["seccompProfile"]["type"].as_str() {
        // podman's default profile is the runtime default.
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => opts.push("--security-opt=seccomp=unconfined".to_owned()),
        Some(other) => bail!("{MANIFEST}: seccompProfile {other} is not translated"),
    }

    let res = &c["resources"];
    only_known("resources", res, &["requests", "limits"])?;
    only_known("resources.limits", &res["limits"], &["cpu", "memory"])?;
    if let Some(m) = res["limits"]["memory"].as_str() {
        opts.push(format!("--memory={}", memory(m)?));
    }
    if let Some(q) = &res["limits"]["cpu"].as_str() {
        opts.push(format!("--cpus={}", cpus(q)?));
    }

    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let mut make_dirs = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        only_known(
            "a volumeMount",
            m,
            &["name", "mountPath", "readOnly", "recursiveReadOnly"],
        )?;
        let name = str_of(&m["name"], "a volumeMount's name")?;
        let v = volumes
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("{MANIFEST}: no volume {name}"))?;
        only_known("a volume", v, &["name", "hostPath"])?;
        let host = str_of(&v["hostPath"]["path"], "a hostPath")?;
        match v["hostPath"]["type"].as_str() {
            // The kubelet refuses to start the pod when the directory is missing.
            Some("Directory") => ensure!(
                Path::new(host).is_dir(),
                "{MANIFEST}: hostPath {host} is not a directory on this machine"
            ),
            Some("DirectoryOrCreate") => make_dirs.push(PathBuf::from(host)),
            other => {
                bail!("{MANIFEST}: hostPath {host}: type {other:?} is not one the image tier knows")
            }
        }
        // IfPossible: read-only all the way down where the node's runtime can do it (a
        // runtime's directory holds its containers' root filesystems), the top mount only
        // where it cannot, which is what podman 4 does with `ro`.
        ensure!(
            m["recursiveReadOnly"].is_null() || m["recursiveReadOnly"] == "IfPossible",
            "{MANIFEST}: recursiveReadOnly {} is not translated",
            m["recursiveReadOnly"]
        );
        let target = str_of(&m["mountPath"], "a mountPath")?;
        // `-v` binds recursively, as the CRI runtimes bind a hostPath; `ro` applies to the top
        // mount only, as readOnly does without recursiveReadOnly.
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        opts.push(format!("--volume={host}:{target}{ro}"));
    }
    if let Some(cmd) = c["command"].as_array() {
        opts.push(format!("--entrypoint={}", Value::Array(cmd.clone())));
    }
    let image = str_of(&c["image"], "the image")?.to_owned();
    let args = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| str_of(a, "an argument").map(str::to_owned))
        .collect::<anyhow::Result<_>>()?;
    Ok(Run {
        opts,
        image,
        args,
        make_dirs,
    })
}

/// Explicit `--ulimit` values: podman's default RLIMIT_NOFILE and RLIMIT_NPROC requests
/// exceed the hard limits here, and without CAP_SYS_RESOURCE runc may not raise them. This
/// process's own limits, RLIMIT_NPROC at most pid_max (runc's init was refused anything above
/// it here).
fn ulimits() -> Vec<String> {
    let pid_max: libc::rlim_t = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    [
        ("nofile", libc::RLIMIT_NOFILE, libc::RLIM_INFINITY),
        ("nproc", libc::RLIMIT_NPROC, pid_max),
    ]
    .into_iter()
    .filter_map(|(name, res, cap)| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        (unsafe { libc::getrlimit(res, &mut l) } == 0).then(|| {
            let v = |x: libc::rlim_t| match x.min(cap) {
                libc::RLIM_INFINITY => "-1".to_owned(),
                x => x.to_string(),
            };
            format!("--ulimit={name}={}:{}", v(l.rlim_cur), v(l.rlim_max))
        })
    })
    .collect()
}

/// The tiny sender image: busybox-static alone, FROM scratch.
fn build_sender() -> anyhow::Result<()> {
    ensure!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing (busybox-static; bootstrap installs it)"
    );
    let dir = context("image-sender", &[(Path::new(BUSYBOX), "busybox")])?;
    fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n",
    )?;
    run(podman()
        .args(["build", "--pull=never", "-q", "-t", SENDER_IMAGE])
        .arg(&dir)
        .stdout(Stdio::null()))
}

/// udpmon's container, removed whatever happens.
struct Container;

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", CONTAINER]).output();
    }
}

/// A port nothing listens on in the sender's fresh network namespace; different per run so
/// that a stale line cannot match.
fn closed_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    20000 + ((nanos ^ std::process::id()) % 40000) as u16
}

/// Runs the image tier's checks; returns its summary lines. Needs root and podman.
pub fn check() -> anyhow::Result<Vec<String>> {
    let root = build::workspace_root();
    let manifest = fs::read_to_string(root.join(MANIFEST))?;
    let spec = podman_args(&manifest)?;
    let tag = build()?;
    ensure!(
        spec.image == tag,
        "{MANIFEST} runs {}, but `cargo xtask image` builds {tag}",
        spec.image
    );
    build_sender()?;
    for dir in &spec.make_dirs {
        fs::create_dir_all(dir).with_context(|| format!("making hostPath {}", dir.display()))?;
    }

    let _ = podman().args(["rm", "-f", "-t", "0", CONTAINER]).output();
    let _container = Container;
    let mut cmd = podman();
    cmd.args(["run", "--rm", "--name", CONTAINER])
        .args(ulimits())
        .args(&spec.opts)
        .arg(&spec.image)
        .args(&spec.args);
    println!("[image] {cmd:?}");
    let mut u = Running::spawn(&mut cmd, false, true)?;
    u.ready().context("udpmon's container")?;
    ensure!(
        !u.stderr.iter().any(|l| l.contains(BLIND)),
        "udpmon lacks capabilities in its container: {}",
        u.said()
    );

    let port = closed_port();
    let remote = format!("127.0.0.1:{port}");
    // busybox nslookup sends one query from a connected socket to its server, here a port
    // where nothing listens (Debian's busybox nc has no -u).
    let sent = podman()
        .args(["run", "--rm", "--network=none"])
        .args(ulimits())
        .args([SENDER_IMAGE, "nslookup", "udpmon-image-test", &remote])
        .stdin(Stdio::null())
        .output()
        .context("running the sender container")?;
    // nslookup fails, the port being closed; 125 to 127 are podman's and the runtime's.
    ensure!(
        !matches!(sent.status.code(), Some(125..=127) | None),
        "the sender container did not run ({}): {}",
        sent.status,
        String::from_utf8_lossy(&sent.stderr)
    );

    let host_netns = fs::metadata("/proc/self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    let end = Instant::now() + Duration::from_secs(30);
    let (connect, unreachable) = loop {
        let events: Vec<Value> = u
            .stdout
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &Value| v["remote"] == remote.as_str())
            .collect();
        let connect = events.iter().find(|v| v["event"] == "connect").cloned();
        let unreachable = connect.as_ref().and_then(|c| {
            events
                .iter()
                .find(|v| v["event"] == "unreachable" && v["cookie"] == c["cookie"])
                .cloned()
        });
        if let (Some(c), Some(r)) = (connect, unreachable) {
            break (c, r);
        }
        ensure!(
            Instant::now() < end,
            "no connect and unreachable events to {remote} within 30 s; stdout: {} / stderr: {}",
            u.stdout.join(" / "),
            u.said()
        );
        u.poll(Duration::from_millis(100));
    };
    let memory = podman()
        .args([
            "stats",
            "--no-stream",
            "--format",
            "{{.MemUsage}}",
            CONTAINER,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // SIGTERM through podman, as the kubelet stops a pod; udpmon must exit 0.
    let _ = podman().args(["kill", "--signal=TERM", CONTAINER]).output();
    let status = u.wait("SIGTERM")?;
    ensure!(status.success(), "exit status {status}: {}", u.said());

    ensure!(
        connect["comm"] == "busybox" && connect["process"] == "busybox",
        "the connect event does not name busybox: {connect}"
    );
    // The tracepoint strategy may not know the netns yet at connect; by the ICMP error it does.
    let netns = unreachable["netns"].as_u64().unwrap_or(0);
    ensure!(
        netns != 0 && netns != host_netns,
        "the unreachable event's netns {netns} is not the sender container's: {unreachable}"
    );
    ensure!(
        unreachable["icmp"]["errno"] == "ECONNREFUSED",
        "the unreachable event is not a port unreachable: {unreachable}"
    );
    // Standard output is the node's container log: a log collector parses every line.
    if let Some(bad) = u
        .stdout
        .iter()
        .find(|l| serde_json::from_str::<Value>(l).is_err())
    {
        bail!("udpmon's standard output has a line that is not JSON: {bad}");
    }
    println!("[image] {connect}");
    println!("[image] {unreachable}");
    Ok(vec![format!(
        "{tag}: the manifest's podman run reported busybox's query to {remote} from another \
         container (connect, unreachable); {} JSON lines; memory in use: {memory}",
        u.stdout.len()
    )])
}

/// Whether the tier can run here, or why not.
pub fn runnable() -> Result<(), String> {
    if !have_podman() {
        return Err("podman is not installed (`cargo xtask bootstrap` installs it)".into());
    }
    if !bootstrap::is_root() {
        return Err(
            "needs root: rootless podman cannot grant CAP_BPF; run `sudo cargo xtask test`".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST_TEXT: &str = include_str!("../../deploy/daemonset.yaml");
    const UNIT_TEXT: &str = include_str!("../../packaging/udpmon.service");
    const CARGO_TEXT: &str = include_str!("../../udpmon/Cargo.toml");

    /// The manifest is whole, translates to podman, grants exactly the unit's capabilities
    /// (README "Requirements") after dropping all, and runs the image `cargo xtask image` tags.
    #[test]
    fn manifest_matches_the_unit_and_the_image() {
        let docs = manifest_docs(MANIFEST_TEXT).unwrap();
        for kind in ["Namespace", "ServiceAccount", "DaemonSet"] {
            let d = find(&docs, kind).unwrap();
            assert_eq!(d["metadata"]["name"], "udpmon", "{kind}");
        }
        let ds = find(&docs, "DaemonSet").unwrap();
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(
            ds["spec"]["selector"]["matchLabels"],
            ds["spec"]["template"]["metadata"]["labels"]
        );
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["tolerations"][0]["operator"], "Exists");
        let sc = &pod["containers"][0]["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let mut granted: Vec<String> = sc["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("CAP_{}", c.as_str().unwrap()))
            .collect();
        let mut unit: Vec<String> = UNIT_TEXT
            .lines()
            .find_map(|l| l.strip_prefix("AmbientCapabilities="))
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        granted.sort();
        unit.sort();
        assert_eq!(granted, unit);

        let run = podman_args(MANIFEST_TEXT).unwrap();
        let version = package_version(CARGO_TEXT).unwrap();
        assert_eq!(run.image, format!("{REPOSITORY}:{version}"));
        assert_eq!(run.args, ["--format", "json"]);
        for opt in [
            "--pid=host",
            "--network=none",
            "--cap-drop=all",
            "--cap-add=CAP_BPF",
            "--read-only",
            "--security-opt=no-new-privileges",
            "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
            "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--volume=/run/containerd:/run/containerd:ro",
            "--volume=/run/crio:/run/crio:ro",
            "--memory=256m",
        ] {
            assert!(run.opts.iter().any(|o| o == opt), "{opt} not in {run:?}");
        }
        assert_eq!(
            run.make_dirs,
            [PathBuf::from("/run/containerd"), PathBuf::from("/run/crio")]
        );
    }

    #[test]
    fn an_untranslated_field_fails() {
        let m = MANIFEST_TEXT.replace(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: true\n            procMount: Unmasked",
        );
        let e = podman_args(&m).unwrap_err().to_string();
        assert!(e.contains("procMount"), "{e}");
    }

    #[test]
    fn quantities() {
        assert_eq!(memory("256Mi").unwrap(), "256m");
        assert!(memory("256M").is_err());
        assert_eq!(cpus("500m").unwrap(), "0.500");
        assert_eq!(cpus("1").unwrap(), "1");
    }
}
