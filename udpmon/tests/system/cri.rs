//! Issue 14, item 1: Kubernetes names from the CRI runtime service. A containerd of the test's
//! own (Debian's, its CRI plugin, runc, the native snapshotter; its state, runc's and its
//! socket in a temp dir: only the shim's sockets go to /run/containerd/s, which the shim
//! does not let one move)
//! is driven through the CRI exactly as kubelet drives it: a pod sandbox `shop/web-0` with a
//! pod uid and kubelet's cgroupfs parent, and in it a container `resolver` from the busybox
//! image built `FROM scratch`. The pod shares the host's network (a pod network needs CNI
//! plugins, which have no part in naming); its busybox `nslookup` asks 127.0.0.1:53 where
//! nothing listens. udpmon is pointed at that containerd's socket only: the state files it
//! could otherwise read are not where it looks, so the names can only come from the CRI.
//! Every event of the query's socket must carry the container's id, `containerd`, the
//! container's name and the pod's name, namespace and uid; a second udpmon with `--pod`
//! prints that socket and nothing from outside the pod.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_cri::v1::{self as cri, runtime_service_client::RuntimeServiceClient};
use serde_json::Value;
use tonic::transport::Channel;

use crate::{
    behaviour::once,
    containers::{build_image, podman, podman_ok, static_busybox},
    harness::{Outcome, Strategy, Udpmon, is, need_tools, s, wait_until},
};

const POD: &str = "web-0";
const NAMESPACE: &str = "shop";
const CONTAINER: &str = "resolver";

/// The test's containerd, stopped with what it ran however the scenario ends.
struct Containerd {
    dir: PathBuf,
    daemon: Option<Child>,
    image: String,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
    sandbox: Option<String>,
    /// The pod's cgroup (kubelet's cgroupfs layout), which runc leaves behind.
    pod_cgroup: Option<String>,
}

impl Containerd {
    fn socket(dir: &Path) -> PathBuf {
        dir.join("containerd.sock")
    }

    /// containerd with the CRI plugin, its sandbox ("pause") image the busybox image,
    /// imported from podman; answering on its socket.
    fn start(tag: &str) -> Result<Self, Outcome> {
        need_tools(&["containerd", "ctr", "podman", "runc"])?;
        let Some(busybox) = static_busybox() else {
            return Err(Outcome::Skip(
                "no static busybox (package busybox-static)".into(),
            ));
        };
        let dir = std::env::temp_dir().join(tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        // Made before anything that can fail, so that its Drop cleans up whatever was made.
        let mut me = Self {
            dir,
            daemon: None,
            image: format!("localhost/{tag}:latest"),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            client: None,
            sandbox: None,
            pod_cgroup: None,
        };
        // A sandbox container runs its image's command for the pod's lifetime.
        build_image(
            &me.dir.join("image"),
            &busybox,
            &me.image,
            "ENTRYPOINT [\"/bin/busybox\", \"sleep\", \"3600\"]\n",
        );
        let archive = me.dir.join("image.tar");
        podman_ok(&[
            "save",
            "--format",
            "docker-archive",
            "--output",
            &archive.display().to_string(),
            &me.image,
        ]);
        let (d, image) = (me.dir.display(), &me.image);
        // restrict_oom_score_adj: a sandbox asks for -998, which this machine's root may not
        // set; no CNI directories exist, and a pod on the host's network needs none.
        fs::write(
            me.dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
"#
            ),
        )
        .expect("writing containerd's config");
        me.daemon = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(me.dir.join("config.toml"))
                .stdout(Stdio::null())
                .stderr(fs::File::create(me.dir.join("containerd.log")).expect("log file"))
                .spawn()
                .expect("starting containerd"),
        );
        let socket = Self::socket(&me.dir);
        wait_until("containerd's socket", 30, || socket.exists());
        let client = me.rt.block_on(async {
            let ch = udpmon::container::cri::connect(&socket)
                .await
                .expect("connecting to containerd");
            RuntimeServiceClient::new(ch)
        });
        me.client = Some(client);
        let status = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .args(["--snapshotter", "native"])
            .arg(&archive)
            .output()
            .expect("running ctr");
        assert!(
            status.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        Ok(me)
    }

    fn client(&mut self) -> RuntimeServiceClient<Channel> {
        self.client.clone().expect("connected")
    }

    /// The pod sandbox and, in it, the container running `script`; returns the container's id.
    fn run_pod(&mut self, pod_uid: &str, script: &str) -> String {
        let mut c = self.client();
        let sandbox_config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: POD.into(),
                uid: pod_uid.into(),
                namespace: NAMESPACE.into(),
                attempt: 0,
            }),
            log_directory: self.dir.join("logs").display().to_string(),
            labels: kubelet_labels(pod_uid),
            linux: Some(cri::LinuxPodSandboxConfig {
                // kubelet's cgroupfs layout for a BestEffort pod.
                cgroup_parent: format!("/kubepods/besteffort/pod{pod_uid}"),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container_config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: CONTAINER.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: vec!["/bin/busybox".into()],
            args: vec!["sh".into(), "-c".into(), script.into()],
            log_path: format!("{CONTAINER}.log"),
            labels: kubelet_labels(pod_uid),
            ..Default::default()
        };
        let sandbox = self.rt.block_on(async {
            c.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
        });
        let sandbox = sandbox.unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log()));
        self.sandbox = Some(sandbox.clone());
        self.pod_cgroup = Some(format!("kubepods/besteffort/pod{pod_uid}"));
        let id = self.rt.block_on(async {
            let id = c
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox,
                    config: Some(container_config),
                    sandbox_config: Some(sandbox_config),
                })
                .await?
                .into_inner()
                .container_id;
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
            Ok::<_, tonic::Status>(id)
        });
        id.unwrap_or_else(|e| panic!("CreateContainer/StartContainer: {e}\n{}", self.log()))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

/// The labels kubelet puts on a pod's sandbox and containers (udpmon does not read them: the
/// names come from the sandbox's metadata).
fn kubelet_labels(pod_uid: &str) -> HashMap<String, String> {
    [
        ("io.kubernetes.pod.name", POD),
        ("io.kubernetes.pod.namespace", NAMESPACE),
        ("io.kubernetes.pod.uid", pod_uid),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // The sandbox's removal stops its containers and their shims; then the daemon.
        if let (Some(mut c), Some(sandbox)) = (self.client.clone(), self.sandbox.take()) {
            self.rt.block_on(async {
                let wait = Duration::from_secs(30);
                let _ = tokio::time::timeout(
                    wait,
                    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: sandbox.clone(),
                    }),
                )
                .await;
                let _ = tokio::time::timeout(
                    wait,
                    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: sandbox,
                    }),
                )
                .await;
            });
        }
        self.client = None;
        if let Some(pod) = &self.pod_cgroup {
            // What the removal left running, if it did not finish: every process of the pod.
            for h in hierarchies() {
                let procs = h.join(pod).join("cgroup.procs");
                for pid in fs::read_to_string(&procs).unwrap_or_default().lines() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        if let Some(mut d) = self.daemon.take() {
            // SIGTERM, so that containerd closes its shims' connections and its database.
            let _ = Command::new("kill").arg(d.id().to_string()).status();
            let stopped = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                d.try_wait().is_ok_and(|s| s.is_some())
            });
            if !stopped {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        if let Some(pod) = &self.pod_cgroup {
            // runc removes the containers' cgroups but not the pod's, nor kubelet's parents:
            // the deepest first, each only if empty.
            for h in hierarchies() {
                for dir in [pod.as_str(), "kubepods/besteffort", "kubepods"] {
                    let _ = fs::remove_dir(h.join(dir));
                }
            }
        }
        // The shims' socket directory, if nothing else uses it.
        let _ = fs::remove_dir("/run/containerd/s");
        let _ = fs::remove_dir("/run/containerd");
        let _ = podman(&["rmi", "--force", &self.image]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Every mounted cgroup hierarchy (v1 controllers, the v2 tree, systemd's).
fn hierarchies() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (point, fs) = (f.nth(1)?, f.next()?);
            matches!(fs, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

pub fn cri_containerd(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    let tag = format!("udpmon-cri-{}", std::process::id());
    let mut ctd = match Containerd::start(&tag) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let socket = Containerd::socket(&ctd.dir).display().to_string();
    let pod_uid = format!("0badc0de-0000-4000-8000-{:012x}", std::process::id());
    let mut all = Udpmon::start(st, &["--cri-socket", &socket]).expect("udpmon starts");
    let mut only = Udpmon::start(
        st,
        &[
            "--cri-socket",
            &socket,
            "--pod",
            &format!("{NAMESPACE}/{POD}"),
        ],
    )
    .expect("udpmon starts");
    // The container stays up until the test removes the pod, so that its cgroup is there to
    // be resolved; the query fails at once (ECONNREFUSED).
    let id = ctd.run_pod(
        &pod_uid,
        "/bin/busybox nslookup example.invalid 127.0.0.1; exec /bin/busybox sleep 600",
    );
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "CreateContainer gave {id:?}"
    );
    let query = |v: &Value| {
        is(v, "close") && v["container"]["id"] == id.as_str() && s(v, "remote") == "127.0.0.1:53"
    };
    let close = all.wait_for("CLOSE of the pod's query socket", query);
    let cookie = close["cookie"].clone();
    let story = all.all(|v| v["cookie"] == cookie);
    let kinds: Vec<&str> = story.iter().map(|v| s(v, "event")).collect();
    assert!(
        kinds.contains(&"connect") && kinds.contains(&"unreachable"),
        "the query's socket: {kinds:?}\n{}",
        all.dump()
    );
    for v in &story {
        let c = &v["container"];
        assert_eq!(c["id"], id.as_str(), "{v}");
        assert_eq!(c["runtime"], "containerd", "{v}");
        assert_eq!(c["name"], CONTAINER, "{v}");
        assert_eq!(c["pod"], POD, "{v}");
        assert_eq!(c["namespace"], NAMESPACE, "{v}");
        assert_eq!(c["pod_uid"], pod_uid.as_str(), "{v}");
    }

    only.wait_for("CLOSE of the query socket through --pod", |v| {
        v["cookie"] == cookie && is(v, "close")
    });
    let strangers: Vec<Value> = only.all(|v| v["container"]["pod"] != POD);
    assert!(strangers.is_empty(), "--pod let through: {strangers:?}");
    Outcome::Pass
}
