//! Kubernetes names from the CRI runtime service (containerd's CRI plugin, CRI-O,
//! cri-dockerd): the API kubelet and crictl use, over the runtime's unix socket. It knows
//! every container kubelet made by the same id the cgroup path gives, and says which pod
//! it is in, whatever the runtime's state directories are and wherever they are (a
//! DaemonSet needs one socket mounted rather than each runtime's state tree).
//!
//! gRPC comes from tonic and the wire format from prost. The messages are declared here, by
//! the field numbers of `runtime.v1` (k8s.io/cri-api `api.proto`), and only with the fields
//! udpmon reads: prost skips the rest. Generated bindings (the `k8s-cri` crate) run `protoc`
//! at build time, which every machine that builds udpmon would then need, for three calls;
//! the system test drives containerd with them, and a unit test checks these declarations
//! against them.
use std::{
    collections::HashMap,
    error::Error as _,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tonic::{
    client::Grpc,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint, Uri},
};

use super::{Container, Runtime};

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

/// `ListContainersRequest` and `ListPodSandboxRequest` without their filter (field 1):
/// every container, every pod.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListAll {}

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
pub(super) struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

/// `runtime.v1.PodSandbox`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
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

/// A lookup's whole budget, over every socket: containers' events are held until it ends.
pub const BUDGET: Duration = Duration::from_secs(2);
/// After a runtime service failed to answer, how long it is not asked again, so that a hung
/// runtime does not hold every new container's events for the whole budget.
const QUIET: Duration = Duration::from_secs(60);

/// containerd (also k3s's) and CRI-O, at their default places.
pub const DEFAULT_SOCKETS: [&str; 3] = [
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/crio/crio.sock",
];

/// How a socket fared when last asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Answered,
    /// Failed; not asked again before this.
    Failing(Instant),
    /// Nothing to ask there for this run: no runtime service behind it (Docker's own
    /// containerd, whose CRI plugin is disabled), or not ours to connect to.
    Ignored,
}

/// The runtime service sockets to ask, and how each fared.
#[derive(Debug)]
pub struct Cri {
    sockets: Vec<PathBuf>,
    standing: Mutex<HashMap<PathBuf, Standing>>,
}

impl Cri {
    pub fn new(sockets: Vec<PathBuf>) -> Self {
        Self {
            sockets,
            standing: Mutex::new(HashMap::new()),
        }
    }

    /// The names the runtime services know for `ids`. Blocking, for at most [`BUDGET`]; ids
    /// that no service knows are left out, and so is everything when no socket is there.
    /// Must not be called from within an async runtime: the agent's is single-threaded, so
    /// a lookup off its thread could not drive its IO, and each lookup runs its own.
    pub fn ask(&self, ids: &[String]) -> HashMap<String, Container> {
        let mut found = HashMap::new();
        if ids.is_empty() {
            return found;
        }
        let sockets: Vec<PathBuf> = {
            let standing = self.standing.lock().expect("not poisoned");
            let now = Instant::now();
            self.sockets
                .iter()
                .filter(|s| match standing.get(*s) {
                    Some(Standing::Ignored) => false,
                    Some(Standing::Failing(until)) => *until <= now,
                    _ => true,
                })
                .filter(|s| s.exists())
                .cloned()
                .collect()
        };
        if sockets.is_empty() {
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
        rt.block_on(async {
            let deadline = Instant::now() + BUDGET;
            for socket in &sockets {
                // A socket left unasked because another used up the budget has not failed.
                if ids.iter().all(|id| found.contains_key(id)) || Instant::now() >= deadline {
                    break;
                }
                let asked = tokio::time::timeout_at(deadline, names(socket, ids, &mut found))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Other(format!("no answer within {BUDGET:?}")))
                    });
                self.fared(socket, asked);
            }
        });
        found
    }

    /// Notes how `socket` fared, saying so when that changed.
    fn fared(&self, socket: &Path, asked: Result<(), Failure>) {
        let mut standing = self.standing.lock().expect("not poisoned");
        let was = standing.get(socket).copied();
        let shown = socket.display();
        let now = match asked {
            Ok(()) => {
                if matches!(was, Some(Standing::Failing(_))) {
                    log::info!("the CRI runtime service at {shown} answers again");
                }
                Standing::Answered
            }
            Err(Failure::Ignored(why)) => {
                log::info!("{shown}: {why}; not asked for Kubernetes names");
                Standing::Ignored
            }
            Err(Failure::Other(e)) => {
                let msg = format!(
                    "asking the CRI runtime service at {shown}: {e}; Kubernetes names come \
                     from the runtimes' state files where they are readable (asking again in \
                     {}s)",
                    QUIET.as_secs()
                );
                if matches!(was, Some(Standing::Failing(_))) {
                    log::debug!("{msg}");
                } else {
                    log::warn!("{msg}");
                }
                Standing::Failing(Instant::now() + QUIET)
            }
        };
        standing.insert(socket.to_owned(), now);
    }
}

/// Why a runtime service gave no names.
enum Failure {
    /// Nothing to ask there for the rest of the run, and why.
    Ignored(&'static str),
    Other(String),
}

/// An error with its causes, which is where tonic says what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The kind of the system error under a connection's failure, however deep tonic wraps it.
fn io_kind(e: &tonic::transport::Error) -> Option<io::ErrorKind> {
    let mut cause = e.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
}

/// Asks the service at `socket` for every container and pod it has, adding those of `ids`
/// to `found`: two calls whatever the number of ids.
async fn names(
    socket: &Path,
    ids: &[String],
    found: &mut HashMap<String, Container>,
) -> Result<(), Failure> {
    let channel = connect(socket).await.map_err(|e| {
        if io_kind(&e) == Some(io::ErrorKind::PermissionDenied) {
            // The packaged service's user may not connect to a socket that only root may.
            Failure::Ignored("permission denied (connecting needs write access to the socket)")
        } else {
            Failure::Other(chain(&e))
        }
    })?;
    let mut grpc = Grpc::new(channel);
    let version: VersionResponse = match call(
        &mut grpc,
        VERSION,
        VersionRequest {
            version: "v1".into(),
        },
    )
    .await
    {
        Err(e) if e.code() == tonic::Code::Unimplemented => {
            return Err(Failure::Ignored(
                "no CRI runtime service (runtime.v1) there",
            ));
        }
        other => other.map_err(|e| Failure::Other(status(VERSION, &e)))?,
    };
    let runtime = match version.runtime_name.as_str() {
        "containerd" => Runtime::Containerd,
        "cri-o" => Runtime::CriO,
        "docker" => Runtime::Docker,
        other => return Err(Failure::Other(format!("an unknown runtime, {other:?}"))),
    };
    let containers: ListContainersResponse =
        list(&mut grpc, "/runtime.v1.RuntimeService/ListContainers").await?;
    let pods: ListPodSandboxResponse =
        list(&mut grpc, "/runtime.v1.RuntimeService/ListPodSandbox").await?;
    let pods: HashMap<String, PodSandboxMetadata> = pods
        .items
        .into_iter()
        .filter_map(|p| Some((p.id, p.metadata?)))
        .collect();
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    for c in containers.containers {
        if !ids.contains(&c.id) {
            continue;
        }
        let pod = pods.get(&c.pod_sandbox_id);
        let named = Container {
            id: c.id.clone(),
            runtime: Some(runtime),
            name: c.metadata.and_then(|m| some(&m.name)),
            pod: pod.and_then(|p| some(&p.name)),
            namespace: pod.and_then(|p| some(&p.namespace)),
            pod_uid: pod.and_then(|p| some(&p.uid)),
        };
        found.insert(c.id, named);
    }
    Ok(())
}

const VERSION: &str = "/runtime.v1.RuntimeService/Version";

/// Every item of a `List*` method.
async fn list<Resp>(grpc: &mut Grpc<Channel>, method: &'static str) -> Result<Resp, Failure>
where
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    call(grpc, method, ListAll {})
        .await
        .map_err(|e| Failure::Other(status(method, &e)))
}

fn status(method: &str, e: &tonic::Status) -> String {
    format!("{method}: {:?}: {}", e.code(), e.message())
}

/// A gRPC channel to the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the API and unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

async fn call<Req, Resp>(
    grpc: &mut Grpc<Channel>,
    method: &'static str,
    req: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(chain(&e)))?;
    grpc.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(method),
        tonic_prost::ProstCodec::<Req, Resp>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
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
        let list: cri_v1::ListContainersRequest = recode(&ListAll {});
        assert_eq!(list.filter, None);
        let pods: cri_v1::ListPodSandboxRequest = recode(&ListAll {});
        assert_eq!(pods.filter, None);
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
        let pods: ListPodSandboxResponse = recode(&cri_v1::ListPodSandboxResponse {
            items: vec![cri_v1::PodSandbox {
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
                annotations: [("a".into(), "b".into())].into(),
                runtime_handler: "runc".into(),
            }],
        });
        assert_eq!(
            pods.items,
            vec![PodSandbox {
                id: "p1".into(),
                metadata: Some(PodSandboxMetadata {
                    name: "web-0".into(),
                    uid: "u-1".into(),
                    namespace: "shop".into(),
                }),
            }]
        );
        let v: VersionResponse = recode(&cri_v1::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "cri-o".into(),
            runtime_version: "1.30".into(),
            runtime_api_version: "v1".into(),
        });
        assert_eq!(v.runtime_name, "cri-o");
    }

    /// What refused a connection is found under tonic's wrapping (permission denied is told
    /// apart from a runtime that fails this way).
    #[test]
    fn a_refused_connection_says_why() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(connect(Path::new("/nonexistent/udpmon-cri.sock")))
            .unwrap_err();
        assert_eq!(io_kind(&e), Some(io::ErrorKind::NotFound));
        assert!(chain(&e).contains("No such file"), "{}", chain(&e));
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
        assert!(matches!(
            cri.standing.lock().unwrap().get(&path),
            Some(Standing::Failing(_))
        ));
        let began = Instant::now();
        assert!(cri.ask(&ids).is_empty());
        assert!(
            began.elapsed() < BUDGET,
            "asked again during the quiet period"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
