//! Kubernetes names from the CRI runtime service (containerd's CRI plugin, CRI-O,
//! cri-dockerd): the API kubelet and crictl use, over the runtime's unix socket. It knows
//! every container kubelet made by the same id the cgroup path gives, and says which pod
//! it is in, whatever the runtime's state directories are and wherever they are (a
//! DaemonSet needs one socket mounted rather than each runtime's state tree).
//!
//! gRPC comes from tonic and the wire format from prost. The messages are declared here, by
//! the field numbers of `runtime.v1` (k8s.io/cri-api `api.proto`), and only with the fields
//! udpmon reads: prost skips the rest. Generated bindings (the `k8s-cri` crate) would need
//! `protoc` on every machine that builds udpmon for three calls; the system test uses them,
//! and a unit test checks these declarations against them.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use tonic::{
    client::Grpc,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint, Uri},
};

use super::Runtime;

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct VersionResponse {
    #[prost(string, tag = "2")]
    pub runtime_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListContainersRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<ContainerFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ContainerFilter {
    #[prost(string, tag = "1")]
    pub id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListContainersResponse {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<CriContainer>,
}

/// `runtime.v1.Container`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct CriContainer {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<ContainerMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PodSandboxStatus {
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
}

/// What the runtime service says of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub runtime: Runtime,
    pub name: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub pod_uid: Option<String>,
}

/// A lookup's whole budget: containers' events are held until it ends.
const BUDGET: Duration = Duration::from_secs(2);
/// After a runtime service failed to answer, how long it is not asked again, so that a hung
/// runtime does not hold every new container's events for the whole budget.
const QUIET: Duration = Duration::from_secs(60);

/// The runtime service sockets to ask, and when each may be asked again after a failure.
#[derive(Debug)]
pub struct Cri {
    sockets: Vec<PathBuf>,
    quiet_until: Mutex<HashMap<PathBuf, Instant>>,
}

/// containerd (also k3s's) and CRI-O, at their default places.
pub const DEFAULT_SOCKETS: [&str; 3] = [
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/crio/crio.sock",
];

impl Cri {
    pub fn new(sockets: Vec<PathBuf>) -> Self {
        Self {
            sockets,
            quiet_until: Mutex::new(HashMap::new()),
        }
    }

    /// The names each runtime service knows for `ids`. Blocking (at most [`BUDGET`]); ids
    /// that no service knows are left out, and so is everything when no socket is there.
    pub fn ask(&self, ids: &[String]) -> HashMap<String, Named> {
        let now = Instant::now();
        let sockets: Vec<&PathBuf> = {
            let quiet = self.quiet_until.lock().expect("not poisoned");
            self.sockets
                .iter()
                .filter(|s| quiet.get(*s).is_none_or(|t| *t <= now) && s.exists())
                .collect()
        };
        let mut found = HashMap::new();
        if ids.is_empty() || sockets.is_empty() {
            return found;
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log::warn!("asking the CRI runtime service: {e}");
                return found;
            }
        };
        for socket in sockets {
            let left: Vec<&String> = ids.iter().filter(|id| !found.contains_key(*id)).collect();
            if left.is_empty() {
                break;
            }
            let asked = rt.block_on(async {
                tokio::time::timeout(BUDGET, names(socket, &left, &mut found)).await
            });
            let failed = match asked {
                Ok(Ok(())) => None,
                Ok(Err(Failure::NoService)) => {
                    // Docker's own containerd has the CRI plugin disabled: nothing to ask
                    // there for this run, and nothing worth a warning.
                    log::debug!(
                        "{}: no CRI runtime service behind this socket",
                        socket.display()
                    );
                    self.quiet_until
                        .lock()
                        .expect("not poisoned")
                        .insert(socket.clone(), now + Duration::from_secs(365 * 86400));
                    None
                }
                Ok(Err(Failure::Other(e))) => Some(e),
                Err(_) => Some(format!("no answer within {BUDGET:?}")),
            };
            if let Some(e) = failed {
                static WARNED: AtomicBool = AtomicBool::new(false);
                let msg = format!(
                    "asking the CRI runtime service at {}: {e}; Kubernetes names come from the \
                     runtimes' state files where they are readable (asking again in {}s)",
                    socket.display(),
                    QUIET.as_secs()
                );
                if WARNED.swap(true, Ordering::Relaxed) {
                    log::debug!("{msg}");
                } else {
                    log::warn!("{msg}");
                }
                self.quiet_until
                    .lock()
                    .expect("not poisoned")
                    .insert(socket.clone(), now + QUIET);
            }
        }
        found
    }
}

/// Why a runtime service gave no names.
enum Failure {
    /// The socket answers gRPC but has no `runtime.v1.RuntimeService`.
    NoService,
    Other(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Self::Other(e)
    }
}

/// Asks the service at `socket` for each of `ids`, adding what it knows to `found`.
async fn names(
    socket: &Path,
    ids: &[&String],
    found: &mut HashMap<String, Named>,
) -> Result<(), Failure> {
    let mut grpc = Grpc::new(connect(socket).await.map_err(|e| format!("{e:?}"))?);
    let version: VersionResponse = call(
        &mut grpc,
        "/runtime.v1.RuntimeService/Version",
        VersionRequest {
            version: "v1".into(),
        },
    )
    .await?;
    let runtime = match version.runtime_name.as_str() {
        "containerd" => Runtime::Containerd,
        "cri-o" => Runtime::CriO,
        "docker" => Runtime::Docker,
        other => return Err(format!("an unknown runtime, {other:?}").into()),
    };
    let mut pods: HashMap<String, Option<PodSandboxMetadata>> = HashMap::new();
    for id in ids {
        let list: ListContainersResponse = call(
            &mut grpc,
            "/runtime.v1.RuntimeService/ListContainers",
            ListContainersRequest {
                filter: Some(ContainerFilter { id: id.to_string() }),
            },
        )
        .await?;
        // The filter may match by prefix: only the container with this very id counts.
        let Some(c) = list.containers.into_iter().find(|c| &c.id == *id) else {
            continue;
        };
        let pod = match pods.get(&c.pod_sandbox_id) {
            Some(p) => p.clone(),
            None => {
                let status: PodSandboxStatusResponse = call(
                    &mut grpc,
                    "/runtime.v1.RuntimeService/PodSandboxStatus",
                    PodSandboxStatusRequest {
                        pod_sandbox_id: c.pod_sandbox_id.clone(),
                    },
                )
                .await?;
                let p = status.status.and_then(|s| s.metadata);
                pods.insert(c.pod_sandbox_id.clone(), p.clone());
                p
            }
        };
        let some = |s: String| (!s.is_empty()).then_some(s);
        let (pod, namespace, pod_uid) = match pod {
            Some(p) => (some(p.name), some(p.namespace), some(p.uid)),
            None => (None, None, None),
        };
        found.insert(
            id.to_string(),
            Named {
                runtime,
                name: c.metadata.and_then(|m| some(m.name)),
                pod,
                namespace,
                pod_uid,
            },
        );
    }
    Ok(())
}

async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    // The URI is required by the API and unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(BUDGET)
        .timeout(BUDGET)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}

async fn call<Req, Resp>(
    grpc: &mut Grpc<Channel>,
    method: &'static str,
    req: Req,
) -> Result<Resp, Failure>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready().await.map_err(|e| format!("{method}: {e}"))?;
    grpc.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(method),
        tonic_prost::ProstCodec::<Req, Resp>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
    .map_err(|e| match e.code() {
        tonic::Code::Unimplemented => Failure::NoService,
        _ => Failure::Other(format!("{method}: {}", e.message())),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use k8s_cri::v1 as cri_v1;

    use super::*;

    /// Encoded as one message type, decoded as another.
    fn recode<A: prost::Message, B: prost::Message + Default>(a: &A) -> B {
        B::decode(a.encode_to_vec().as_slice()).expect("decodes")
    }

    #[test]
    fn requests_are_what_the_generated_bindings_read() {
        let list: cri_v1::ListContainersRequest = recode(&ListContainersRequest {
            filter: Some(ContainerFilter { id: "abc".into() }),
        });
        assert_eq!(list.filter.expect("a filter").id, "abc");
        let pod: cri_v1::PodSandboxStatusRequest = recode(&PodSandboxStatusRequest {
            pod_sandbox_id: "p1".into(),
        });
        assert_eq!(pod.pod_sandbox_id, "p1");
        assert!(!pod.verbose);
        let v: cri_v1::VersionRequest = recode(&VersionRequest {
            version: "v1".into(),
        });
        assert_eq!(v.version, "v1");
    }

    #[test]
    fn answers_are_read_from_what_the_generated_bindings_write() {
        let full = cri_v1::ListContainersResponse {
            containers: vec![cri_v1::Container {
                id: "c1".into(),
                pod_sandbox_id: "p1".into(),
                metadata: Some(cri_v1::ContainerMetadata {
                    name: "resolver".into(),
                    attempt: 3,
                }),
                image: Some(cri_v1::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                image_ref: "sha256:00".into(),
                state: cri_v1::ContainerState::ContainerRunning as i32,
                created_at: 42,
                labels: [("io.kubernetes.pod.name".into(), "other".into())].into(),
                annotations: [("a".into(), "b".into())].into(),
                image_id: "i".into(),
            }],
        };
        let list: ListContainersResponse = recode(&full);
        assert_eq!(
            list.containers,
            vec![CriContainer {
                id: "c1".into(),
                pod_sandbox_id: "p1".into(),
                metadata: Some(ContainerMetadata {
                    name: "resolver".into()
                }),
            }]
        );
        let status: PodSandboxStatusResponse = recode(&cri_v1::PodSandboxStatusResponse {
            status: Some(cri_v1::PodSandboxStatus {
                id: "p1".into(),
                metadata: Some(cri_v1::PodSandboxMetadata {
                    name: "web-0".into(),
                    uid: "u-1".into(),
                    namespace: "shop".into(),
                    attempt: 1,
                }),
                state: cri_v1::PodSandboxState::SandboxReady as i32,
                created_at: 7,
                labels: [("x".into(), "y".into())].into(),
                ..Default::default()
            }),
            info: [("info".into(), "{}".into())].into(),
            ..Default::default()
        });
        assert_eq!(
            status.status.and_then(|s| s.metadata),
            Some(PodSandboxMetadata {
                name: "web-0".into(),
                uid: "u-1".into(),
                namespace: "shop".into(),
            })
        );
        let v: VersionResponse = recode(&cri_v1::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "cri-o".into(),
            runtime_version: "1.30".into(),
            runtime_api_version: "v1".into(),
        });
        assert_eq!(v.runtime_name, "cri-o");
    }

    /// A socket where something that is not a runtime service listens: no names, and it is
    /// not asked again until the quiet period ends (a hung runtime must not hold every new
    /// container's events).
    #[test]
    fn a_socket_that_does_not_answer_is_left_alone_for_a_while() {
        let dir = std::env::temp_dir().join(format!("udpmon-cri-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cri.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Accepts and hangs up at once: not HTTP/2.
        let server = std::thread::spawn(move || {
            for c in listener.incoming().take(1) {
                drop(c);
            }
        });
        let cri = Cri::new(vec![path.clone()]);
        let ids = vec!["f".repeat(64)];
        assert!(cri.ask(&ids).is_empty());
        server.join().unwrap();
        assert!(cri.quiet_until.lock().unwrap().contains_key(&path));
        let began = Instant::now();
        assert!(cri.ask(&ids).is_empty());
        assert!(
            began.elapsed() < BUDGET,
            "asked again during the quiet period"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
