//! Which container a cgroup belongs to. Events carry the socket owner's cgroup v2 id; the
//! runtimes name their containers' cgroups after the container id (`docker-<id>.scope`,
//! `/docker/<id>`, `libpod-<id>`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `/kubepods/<qos>/pod<uid>/<id>`), so the cgroup's path gives the id, the runtime and the
//! pod uid, and the runtime's own state files give the names.
//!
//! The path of a cgroup id is read from `/proc/PID/cgroup` of the process that ran the hook
//! (by the agent, as soon as it decodes the event: the process may be gone a moment later),
//! checked against the id (the directory's inode), and otherwise found by walking the cgroup
//! v2 tree. Where a CRI runtime service's socket is there, it names the containers kubelet
//! made ([`cri`]), before the runtimes' files are read. All of it happens in [`resolve`],
//! which is blocking: the agent runs it off its event loop and keeps the results in a
//! [`ContainerMap`].
use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::Value;

pub mod cri;

/// The container runtimes whose cgroup layouts and state files udpmon knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
}

impl Runtime {
    /// The JSON `container.runtime` names.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Podman => "podman",
        }
    }
}

/// A container, as far as its cgroup path and its runtime's state tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    /// The runtime's full id: 64 lower-case hex digits.
    pub id: String,
    /// None for a layout several runtimes share (Kubernetes' cgroupfs one) when no runtime's
    /// state names the id.
    pub runtime: Option<Runtime>,
    pub name: Option<String>,
    /// Kubernetes: the pod's name, namespace and uid.
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub pod_uid: Option<String>,
}

impl Container {
    /// The first 12 digits of the id, as `docker ps` and `podman ps` show it.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A Kubernetes pod uid: a UUID (systemd slices spell its dashes as underscores).
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let shape = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    shape.then_some(uid)
}

/// The pod uid of a kubelet cgroup component: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_component(c: &str) -> Option<String> {
    if let Some(rest) = c.strip_prefix("kubepods")
        && let Some(slice) = rest.strip_suffix(".slice")
    {
        return pod_uid(&slice[slice.find("pod")? + 3..]);
    }
    pod_uid(c.strip_prefix("pod")?)
}

/// The container a cgroup path (as in `/proc/PID/cgroup`, `0::` line) belongs to: the
/// innermost component that names one, with its runtime when the layout says which, and the
/// pod uid when a kubelet made the path. None for the host's own cgroups and for a runtime's
/// helper processes (conmon) that are not in the container.
pub fn parse_path(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let kubelet = parts.iter().any(|c| c.starts_with("kubepods"));
    let pod_uid = kubelet
        .then(|| parts.iter().find_map(|c| pod_component(c)))
        .flatten();
    for (i, part) in parts.iter().enumerate().rev() {
        let unit = part.strip_suffix(".scope").unwrap_or(part);
        let prefixed = [
            ("docker-", Runtime::Docker),
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("libpod-", Runtime::Podman),
        ]
        .into_iter()
        .find_map(|(prefix, rt)| Some((unit.strip_prefix(prefix)?, Some(rt))));
        let (id, runtime) = match prefixed {
            Some(found) => found,
            // Docker's and Kubernetes' cgroupfs layouts name the directory by the bare id;
            // under a kubelet pod it may be any CRI runtime's.
            None if is_id(part) => {
                let runtime = match i.checked_sub(1).map(|p| parts[p]) {
                    Some("docker") => Some(Runtime::Docker),
                    Some("libpod_parent") => Some(Runtime::Podman),
                    _ => None,
                };
                (*part, runtime)
            }
            None => continue,
        };
        // `libpod-conmon-<id>`, `crio-conmon-<id>`: the monitor, outside the container.
        if !is_id(id) {
            continue;
        }
        return Some(Container {
            id: id.to_owned(),
            runtime,
            pod_uid,
            ..Container::default()
        });
    }
    None
}

/// The cgroup v2 path in the contents of a `/proc/PID/cgroup` (its `0::` line).
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

/// The cgroup v2 id (its directory's inode under `mount`) and path of process `tgid`, if it
/// still runs.
pub fn cgroup_of(mount: &Path, tgid: u32) -> Option<(u64, String)> {
    let c = fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
    let path = v2_path(&c)?;
    let ino = fs::metadata(mount.join(path.trim_start_matches('/')))
        .ok()?
        .ino();
    Some((ino, path.to_owned()))
}

/// Where the cgroup v2 hierarchy is mounted, from the contents of a `/proc/self/mountinfo`:
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (mount, fs) = l.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // The fields: id, parent, dev, root, mount point; octal escapes for spaces.
        let point = mount.split_whitespace().nth(4)?;
        Some(PathBuf::from(point.replace("\\040", " ")))
    })
}

/// Where the runtimes keep the state that names containers, and where their CRI runtime
/// services listen (host paths by default).
#[derive(Debug)]
pub struct StateRoots {
    /// Docker's `containers/<id>/config.v2.json`.
    pub docker: PathBuf,
    /// containers-storage (podman, CRI-O): `<driver>-containers/containers.json`.
    pub storage: PathBuf,
    /// CRI-O's running containers: `overlay-containers/<id>/userdata/config.json`.
    pub crio_run: PathBuf,
    /// containerd's task bundles: `<namespace>/<id>/config.json`.
    pub containerd_tasks: PathBuf,
    /// The CRI runtime services to ask for Kubernetes names.
    pub cri: cri::Cri,
    /// A user's home directory, where rootless Podman keeps its containers-storage.
    pub home_of: fn(u32) -> Option<PathBuf>,
}

impl Default for StateRoots {
    fn default() -> Self {
        Self {
            docker: "/var/lib/docker".into(),
            storage: "/var/lib/containers/storage".into(),
            crio_run: "/run/containers/storage".into(),
            containerd_tasks: "/run/containerd/io.containerd.runtime.v2.task".into(),
            cri: cri::Cri::new(cri::DEFAULT_SOCKETS.iter().map(PathBuf::from).collect()),
            home_of,
        }
    }
}

/// The home directory of `uid`, from the system's user database (NSS: /etc/passwd, LDAP...).
fn home_of(uid: u32) -> Option<PathBuf> {
    use std::{ffi::CStr, os::unix::ffi::OsStrExt as _};
    let mut buf = vec![0 as libc::c_char; 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    loop {
        let mut found = std::ptr::null_mut();
        // SAFETY: every pointer is to a live value of the right type, `buf` with its length.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            // An entry longer than the buffer (long GECOS fields, LDAP).
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            0 if !found.is_null() && !pw.pw_dir.is_null() => break,
            _ => return None,
        }
    }
    // SAFETY: getpwuid_r succeeded: pw_dir is a NUL-terminated string inside `buf`.
    let dir = unsafe { CStr::from_ptr(pw.pw_dir) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
}

/// The uid whose systemd user manager a cgroup path is under (`.../user@1000.service/...`):
/// where rootless Podman's containers live.
fn user_of(path: &str) -> Option<u32> {
    path.split('/').find_map(|c| {
        c.strip_prefix("user@")?
            .strip_suffix(".service")?
            .parse()
            .ok()
    })
}

/// Kubernetes names from a container's annotations (containerd's CRI plugin, CRI-O) or
/// labels (Docker with cri-dockerd): (container, pod, namespace, pod uid).
fn kubernetes_names(labels: &serde_json::Map<String, Value>) -> [Option<String>; 4] {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k)?.as_str().filter(|s| !s.is_empty()))
            .map(str::to_owned)
    };
    [
        get(&[
            "io.kubernetes.cri.container-name",
            "io.kubernetes.container.name",
        ]),
        get(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
        get(&[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ]),
        get(&["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"]),
    ]
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The runtimes' state, read at most once per [`resolve`]: containers-storage keeps every
/// container in one file.
struct State<'a> {
    roots: &'a StateRoots,
    /// containers-storage id -> first name, by storage directory (the system's, and a rootless
    /// Podman user's).
    storage_names: HashMap<PathBuf, HashMap<String, String>>,
    /// What the CRI runtime services said of this lookup's containers, by id.
    cri: HashMap<String, Container>,
}

impl State<'_> {
    fn storage_names(&mut self, storage: PathBuf) -> &HashMap<String, String> {
        self.storage_names
            .entry(storage)
            .or_insert_with_key(|storage| {
                let mut names = HashMap::new();
                // One file per storage driver: overlay-containers, vfs-containers, ...
                for dir in fs::read_dir(storage).into_iter().flatten().flatten() {
                    if !dir.file_name().to_string_lossy().ends_with("-containers") {
                        continue;
                    }
                    let Some(Value::Array(all)) = read_json(&dir.path().join("containers.json"))
                    else {
                        continue;
                    };
                    for c in all {
                        if let (Some(id), Some(name)) = (c["id"].as_str(), c["names"][0].as_str()) {
                            names.insert(id.to_owned(), name.to_owned());
                        }
                    }
                }
                names
            })
    }

    fn docker(&self, c: &mut Container) -> bool {
        let path = self
            .roots
            .docker
            .join("containers")
            .join(&c.id)
            .join("config.v2.json");
        let Some(v) = read_json(&path) else {
            return false;
        };
        c.name = v["Name"]
            .as_str()
            .map(|n| n.trim_start_matches('/').to_owned());
        if let Some(labels) = v["Config"]["Labels"].as_object() {
            self.kubernetes(c, labels);
        }
        true
    }

    /// containerd's and CRI-O's OCI bundles carry the Kubernetes names as annotations.
    fn bundle(&self, c: &mut Container, runtime: Runtime) -> bool {
        let config = match runtime {
            Runtime::CriO => Some(
                self.roots
                    .crio_run
                    .join("overlay-containers")
                    .join(&c.id)
                    .join("userdata/config.json"),
            ),
            _ => fs::read_dir(&self.roots.containerd_tasks)
                .into_iter()
                .flatten()
                .flatten()
                .map(|ns| ns.path().join(&c.id).join("config.json"))
                .find(|p| p.exists()),
        };
        let Some(v) = config.and_then(|p| read_json(&p)) else {
            return false;
        };
        // Podman writes the same kind of bundle; only CRI-O's says which pod.
        if runtime == Runtime::CriO && v["annotations"]["io.kubernetes.pod.name"].is_null() {
            return false;
        }
        if let Some(a) = v["annotations"].as_object() {
            self.kubernetes(c, a);
        }
        true
    }

    fn kubernetes(&self, c: &mut Container, labels: &serde_json::Map<String, Value>) {
        let [name, pod, namespace, uid] = kubernetes_names(labels);
        c.name = name.or(c.name.take());
        c.pod = pod;
        c.namespace = namespace;
        c.pod_uid = c.pod_uid.take().or(uid);
    }

    /// The system's containers-storage, then, for a container of a user's systemd manager
    /// (rootless Podman), that user's (`~/.local/share/containers/storage`).
    fn podman(&mut self, c: &mut Container, user: Option<u32>) -> bool {
        let user_storage = user
            .filter(|uid| *uid != 0)
            .and_then(self.roots.home_of)
            .map(|home| home.join(".local/share/containers/storage"));
        for storage in [Some(self.roots.storage.clone()), user_storage]
            .into_iter()
            .flatten()
        {
            if let Some(name) = self.storage_names(storage).get(&c.id) {
                c.name = Some(name.clone());
                return true;
            }
        }
        false
    }

    /// Fills in the names; for a layout that does not say which runtime, the runtime whose
    /// service or state knows the id. `user`: the uid whose systemd manager the cgroup is under.
    fn describe(&mut self, c: &mut Container, user: Option<u32>) {
        if let Some(named) = self.cri.get(&c.id) {
            let path_uid = c.pod_uid.take();
            *c = named.clone();
            c.pod_uid = path_uid.or(c.pod_uid.take());
            return;
        }
        let order = match c.runtime {
            Some(rt) => vec![rt],
            None => vec![
                Runtime::Containerd,
                Runtime::CriO,
                Runtime::Docker,
                Runtime::Podman,
            ],
        };
        for rt in order {
            let found = match rt {
                Runtime::Docker => self.docker(c),
                Runtime::Containerd | Runtime::CriO => self.bundle(c, rt),
                Runtime::Podman => self.podman(c, user),
            };
            if found {
                c.runtime = Some(rt);
                return;
            }
        }
    }
}

/// A cgroup to resolve: its id, and the path `/proc/PID/cgroup` gave for it when the event
/// was decoded, if the process was still there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub cgroup: u64,
    pub path: Option<String>,
}

/// Directory depth searched for a cgroup id: kubelet's deepest layout is 5 levels.
const WALK_DEPTH: usize = 8;

/// The path (relative to the mount, with a leading `/`) of the cgroup directory with inode
/// `ids`, for each of `ids` found under `mount`.
fn walk(mount: &Path, ids: &HashSet<u64>) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    if let Ok(root) = fs::metadata(mount)
        && ids.contains(&root.ino())
    {
        found.insert(root.ino(), "/".to_owned());
    }
    let mut stack = vec![(mount.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        if found.len() == ids.len() {
            break;
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            // Directories only: cgroupfs files are not cgroups.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            let path = entry.path();
            if ids.contains(&meta.ino())
                && let Ok(rel) = path.strip_prefix(mount)
            {
                found.insert(meta.ino(), format!("/{}", rel.display()));
            }
            if depth + 1 < WALK_DEPTH {
                stack.push((path, depth + 1));
            }
        }
    }
    found
}

/// The container of each asked cgroup (None: not a container's). Blocking: it reads cgroupfs
/// and the runtimes' files.
pub fn resolve(
    mount: Option<&Path>,
    roots: &StateRoots,
    asked: Vec<Ask>,
) -> HashMap<u64, Option<Container>> {
    let mut paths = HashMap::new();
    let mut lost = HashSet::new();
    for a in asked {
        // The process might have moved since the hook ran: a path counts when its directory
        // has the cgroup's id, or when it is gone already (so is its container).
        let checked = a.path.filter(|p| match mount {
            Some(m) => match fs::metadata(m.join(p.trim_start_matches('/'))) {
                Ok(meta) => meta.ino() == a.cgroup,
                Err(_) => true,
            },
            None => true,
        });
        match checked {
            Some(p) => {
                paths.insert(a.cgroup, p);
            }
            None => {
                lost.insert(a.cgroup);
            }
        }
    }
    if let Some(m) = mount
        && !lost.is_empty()
    {
        paths.extend(walk(m, &lost));
    }
    let mut out: HashMap<u64, Option<Container>> = lost.into_iter().map(|c| (c, None)).collect();
    let parsed: Vec<(u64, Option<Container>, Option<u32>)> = paths
        .into_iter()
        .map(|(cgroup, path)| (cgroup, parse_path(&path), user_of(&path)))
        .collect();
    // One question per lookup, for the containers kubelet made (those under a pod's cgroup).
    let cri_ids: Vec<String> = parsed
        .iter()
        .filter_map(|(_, c, _)| c.as_ref())
        .filter(|c| c.pod_uid.is_some())
        .map(|c| c.id.clone())
        .collect();
    let mut state = State {
        roots,
        storage_names: HashMap::new(),
        cri: roots.cri.ask(&cri_ids),
    };
    for (cgroup, container, user) in parsed {
        let container = container.map(|mut c| {
            state.describe(&mut c, user);
            c
        });
        out.insert(cgroup, container);
    }
    out
}

/// What is known of a cgroup id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Resolved: its container, or None for a cgroup outside containers.
    Known(Option<Arc<Container>>),
    /// Not resolved yet.
    Unknown,
}

/// Containers by cgroup id, filled by [`resolve`]. An entry stays after its container is
/// gone, so that the container's remaining events (a CLOSE at idle timeout, a SILENT) still
/// name it; past `max` entries the least recently used ones are forgotten.
pub struct ContainerMap {
    /// hashbrown's hasher: looked up for most records and reports.
    entries: hashbrown::HashMap<u64, (Option<Arc<Container>>, u64)>,
    /// Bumped on every use: the entries' recency.
    uses: u64,
    max: usize,
}

impl ContainerMap {
    pub fn new(max: usize) -> Self {
        Self {
            entries: hashbrown::HashMap::new(),
            uses: 0,
            max: max.max(1),
        }
    }

    pub fn lookup(&mut self, cgroup: u64) -> Lookup {
        self.uses += 1;
        match self.entries.get_mut(&cgroup) {
            Some((c, used)) => {
                *used = self.uses;
                Lookup::Known(c.clone())
            }
            None => Lookup::Unknown,
        }
    }

    /// Whether the cgroup is resolved, without counting as a use.
    pub fn knows(&self, cgroup: u64) -> bool {
        self.entries.contains_key(&cgroup)
    }

    pub fn learn(&mut self, found: HashMap<u64, Option<Container>>) {
        for (cgroup, c) in found {
            self.uses += 1;
            self.entries.insert(cgroup, (c.map(Arc::new), self.uses));
        }
        if self.entries.len() > self.max {
            // A quarter at a time, so that a full map is not sorted on every new cgroup.
            let mut by_use: Vec<u64> = self.entries.values().map(|(_, u)| *u).collect();
            by_use.sort_unstable();
            let keep_from = by_use[(self.entries.len() - self.max * 3 / 4).min(by_use.len() - 1)];
            self.entries.retain(|_, (_, u)| *u >= keep_from);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests;
