use super::*;

const ID: &str = "b5f1cf47c8456f6bb60a712d6626615cf3717f91fa1efe47deb111363830450a";
const ID2: &str = "4063941ea171b5f1ca0f23c8462576a551c35e5d6b0b1e99d199a1df2e599f93";
const UID: &str = "0b7a3f9e-2c4d-4e1f-9a8b-7c6d5e4f3a2b";

fn parsed(path: &str) -> Option<(String, Option<Runtime>, Option<String>)> {
    parse_path(path).map(|c| (c.id, c.runtime, c.pod_uid))
}

#[test]
fn cgroup_layouts_of_each_runtime() {
    let uid_ = UID.replace('-', "_");
    let with = |rt, uid: Option<&str>| Some((ID.to_owned(), rt, uid.map(str::to_owned)));
    for (path, want) in [
        // Docker: systemd driver, cgroupfs driver.
        (
            format!("/system.slice/docker-{ID}.scope"),
            with(Some(Runtime::Docker), None),
        ),
        (format!("/docker/{ID}"), with(Some(Runtime::Docker), None)),
        // Podman: systemd (root, rootless, and --systemd's nested `container`), cgroupfs as
        // podman 4.3 on Debian 12 makes it.
        (
            format!("/machine.slice/libpod-{ID}.scope"),
            with(Some(Runtime::Podman), None),
        ),
        (
            format!("/machine.slice/libpod-{ID}.scope/container"),
            with(Some(Runtime::Podman), None),
        ),
        (
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            with(Some(Runtime::Podman), None),
        ),
        (
            format!("/libpod_parent/libpod-{ID}"),
            with(Some(Runtime::Podman), None),
        ),
        (
            format!("/libpod_parent/{ID}"),
            with(Some(Runtime::Podman), None),
        ),
        // Kubernetes, systemd driver: burstable, besteffort, guaranteed (no QoS slice).
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
            ),
            with(Some(Runtime::Containerd), Some(UID)),
        ),
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"
            ),
            with(Some(Runtime::CriO), Some(UID)),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
            with(Some(Runtime::CriO), Some(UID)),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/docker-{ID}.scope"),
            with(Some(Runtime::Docker), Some(UID)),
        ),
        // Kubernetes, cgroupfs driver: the runtime is not in the path.
        (
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            with(None, Some(UID)),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            with(None, Some(UID)),
        ),
        (format!("/kubepods/pod{UID}/{ID}"), with(None, Some(UID))),
        // Seen from inside a cgroup namespace.
        (
            format!("/../../kubepods/burstable/pod{UID}/{ID}"),
            with(None, Some(UID)),
        ),
        // Docker in Docker: the innermost container.
        (
            format!("/docker/{ID2}/docker/{ID}"),
            with(Some(Runtime::Docker), None),
        ),
    ] {
        assert_eq!(parsed(&path), want, "{path}");
    }
}

#[test]
fn host_cgroups_and_runtime_helpers_are_no_container() {
    for path in [
        "/".to_owned(),
        String::new(),
        "/init.scope".into(),
        "/system.slice/ssh.service".into(),
        "/system.slice/docker.service".into(),
        "/user.slice/user-1000.slice/session-3.scope".into(),
        "/kubepods.slice/kubepods-burstable.slice".into(),
        format!("/kubepods/burstable/pod{UID}"),
        // The monitors: they run outside the container they watch.
        format!("/machine.slice/libpod-conmon-{ID}.scope"),
        format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID}.scope",
            UID.replace('-', "_")
        ),
        // Not a full id.
        "/system.slice/docker-b5f1cf47c845.scope".into(),
        format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
        format!("/docker/{ID}x"),
    ] {
        assert_eq!(parsed(&path), None, "{path}");
    }
}

#[test]
fn v2_paths_and_mounts() {
    // A hybrid host (cgroup v1 controllers beside the v2 hierarchy).
    let proc_cgroup = format!(
        "9:name=systemd:/libpod_parent/libpod-{ID}\n1:cpu:/libpod_parent/libpod-{ID}\n0::/libpod_parent/libpod-{ID}\n"
    );
    assert_eq!(
        v2_path(&proc_cgroup),
        Some(&*format!("/libpod_parent/libpod-{ID}"))
    );
    assert_eq!(v2_path("0::/\n"), Some("/"));
    assert_eq!(v2_path("1:name=systemd:/x\n"), None);
    let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
    assert_eq!(
        v2_mount(hybrid),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
    assert_eq!(v2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
    assert_eq!(
        v2_mount("40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw\n"),
        None
    );
}

/// A throwaway directory with the runtimes' state files, removed on drop.
struct Roots {
    dir: PathBuf,
    roots: StateRoots,
}

impl Roots {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("udpmon-container-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let roots = StateRoots {
            docker: dir.join("docker"),
            storage: dir.join("storage"),
            crio_run: dir.join("crio"),
            containerd_tasks: dir.join("containerd"),
            cri: super::cri::Cri::new(vec![dir.join("cri.sock")]),
            home_of: test_home,
        };
        Self { dir, roots }
    }

    fn put(&self, path: &Path, json: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, json).unwrap();
    }
}

impl Drop for Roots {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(homes());
    }
}

/// Users' homes in tests: one directory per uid under this process's temp directory.
fn test_home(uid: u32) -> Option<PathBuf> {
    Some(homes().join(uid.to_string()))
}

fn homes() -> PathBuf {
    std::env::temp_dir().join(format!("udpmon-homes-{}", std::process::id()))
}

/// What a CRI runtime service says of a container overrides the path's guess of the runtime
/// and the state files' names; the pod uid the cgroup path gave stays.
#[test]
fn the_cri_names_kubelets_containers() {
    let r = Roots::new("cri");
    let named = Container {
        id: ID.into(),
        runtime: Some(Runtime::CriO),
        name: Some("dns".into()),
        pod: Some("resolver-0".into()),
        namespace: Some("infra".into()),
        pod_uid: Some("from-the-cri".into()),
    };
    let mut state = State {
        roots: &r.roots,
        storage_names: HashMap::new(),
        cri: [(ID.to_owned(), named)].into(),
    };
    let mut c = parse_path(&format!("/kubepods/besteffort/pod{UID}/{ID}")).unwrap();
    state.describe(&mut c, None);
    assert_eq!(
        c,
        Container {
            id: ID.into(),
            runtime: Some(Runtime::CriO),
            name: Some("dns".into()),
            pod: Some("resolver-0".into()),
            namespace: Some("infra".into()),
            pod_uid: Some(UID.into()),
        }
    );
    // A container the service does not know is named from the files, as before.
    let mut other = parse_path(&format!("/kubepods/besteffort/pod{UID}/{ID2}")).unwrap();
    state.describe(&mut other, None);
    assert_eq!((other.runtime, other.name), (None, None));
}

/// Rootless Podman: the container's cgroup is under its user's systemd manager, and its name
/// in that user's containers-storage, not the system's.
#[test]
fn rootless_podman_names_from_the_users_storage() {
    let r = Roots::new("rootless");
    let home = test_home(1000).unwrap();
    let storage = home.join(".local/share/containers/storage/overlay-containers");
    fs::create_dir_all(&storage).unwrap();
    fs::write(
        storage.join("containers.json"),
        format!(r#"[{{"id":"{ID}","names":["rootless-web"]}}]"#),
    )
    .unwrap();
    let path = format!(
        "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
    );
    let c = one(&r.roots, &path).unwrap();
    assert_eq!(
        (c.runtime, c.name.as_deref(), c.id.as_str()),
        (Some(Runtime::Podman), Some("rootless-web"), ID)
    );
    // Another user's container of the same id is not this user's.
    let other = one(&r.roots, &path.replace("1000", "1001")).unwrap();
    assert_eq!(other.name, None);
}

#[test]
fn users_of_cgroup_paths() {
    assert_eq!(
        user_of("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-x.scope"),
        Some(1000)
    );
    assert_eq!(user_of("/system.slice/docker-x.scope"), None);
    assert_eq!(user_of("/user.slice/user@x.service"), None);
    // Root's own manager: uid 0, whose storage is the system's.
    assert_eq!(
        user_of("/user.slice/user-0.slice/user@0.service/a"),
        Some(0)
    );
}

fn one(roots: &StateRoots, path: &str) -> Option<Container> {
    let asked = vec![Ask {
        cgroup: 7,
        path: Some(path.to_owned()),
    }];
    resolve(None, roots, asked)
        .remove(&7)
        .expect("every asked cgroup is answered")
}

#[test]
fn names_from_each_runtimes_state() {
    let r = Roots::new("names");
    let s = &r.roots;
    r.put(
        &s.docker.join(format!("containers/{ID}/config.v2.json")),
        r#"{"ID":"x","Name":"/web-1","Config":{"Labels":{"maintainer":"me"}}}"#,
    );
    r.put(
        &s.storage.join("overlay-containers/containers.json"),
        &format!(
            r#"[{{"id":"{ID2}","names":["other"]}},{{"id":"{ID}","names":["udpmon-test","alias"],"metadata":"{{}}"}}]"#
        ),
    );
    r.put(
        &s.containerd_tasks.join(format!("k8s.io/{ID}/config.json")),
        &format!(
            r#"{{"annotations":{{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.container-name":"coredns","io.kubernetes.cri.sandbox-name":"coredns-5d78c9869d-abcde","io.kubernetes.cri.sandbox-namespace":"kube-system","io.kubernetes.cri.sandbox-uid":"{UID}"}}}}"#
        ),
    );
    r.put(
        &s.crio_run.join(format!("overlay-containers/{ID}/userdata/config.json")),
        &format!(
            r#"{{"annotations":{{"io.kubernetes.container.name":"dns","io.kubernetes.pod.name":"resolver-0","io.kubernetes.pod.namespace":"infra","io.kubernetes.pod.uid":"{UID}"}}}}"#
        ),
    );
    let docker = one(s, &format!("/system.slice/docker-{ID}.scope")).unwrap();
    assert_eq!(
        (
            docker.runtime,
            docker.name.as_deref(),
            docker.pod.as_deref()
        ),
        (Some(Runtime::Docker), Some("web-1"), None)
    );
    let podman = one(s, &format!("/libpod_parent/libpod-{ID}")).unwrap();
    assert_eq!(
        (podman.runtime, podman.name.as_deref(), podman.id.as_str()),
        (Some(Runtime::Podman), Some("udpmon-test"), ID)
    );
    let uid_ = UID.replace('-', "_");
    let containerd = one(
        s,
        &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
    )
    .unwrap();
    assert_eq!(
        containerd,
        Container {
            id: ID.into(),
            runtime: Some(Runtime::Containerd),
            name: Some("coredns".into()),
            pod: Some("coredns-5d78c9869d-abcde".into()),
            namespace: Some("kube-system".into()),
            pod_uid: Some(UID.into()),
        }
    );
    let crio = one(
        s,
        &format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
    )
    .unwrap();
    assert_eq!(
        (
            crio.runtime,
            crio.name.as_deref(),
            crio.pod.as_deref(),
            crio.namespace.as_deref()
        ),
        (
            Some(Runtime::CriO),
            Some("dns"),
            Some("resolver-0"),
            Some("infra")
        )
    );
    // The cgroupfs layout does not say which runtime: the one whose state has the id.
    let cgroupfs = one(s, &format!("/kubepods/burstable/pod{UID}/{ID}")).unwrap();
    assert_eq!(
        (
            cgroupfs.runtime,
            cgroupfs.name.as_deref(),
            cgroupfs.pod_uid.as_deref()
        ),
        (Some(Runtime::Containerd), Some("coredns"), Some(UID))
    );
}

#[test]
fn a_container_without_state_keeps_what_its_path_says() {
    let r = Roots::new("gone");
    let gone = one(&r.roots, &format!("/kubepods/besteffort/pod{UID}/{ID}")).unwrap();
    assert_eq!(
        gone,
        Container {
            id: ID.into(),
            pod_uid: Some(UID.into()),
            ..Container::default()
        }
    );
    let podman = one(&r.roots, &format!("/machine.slice/libpod-{ID}.scope")).unwrap();
    assert_eq!((podman.runtime, podman.name), (Some(Runtime::Podman), None));
    assert_eq!(one(&r.roots, "/system.slice/cron.service"), None);
}

#[test]
fn cgroups_are_found_by_id_when_no_path_is_known() {
    let Some(mount) = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| v2_mount(&m))
    else {
        eprintln!("SKIPPED cgroups_are_found_by_id_when_no_path_is_known: no cgroup v2 mount");
        return;
    };
    let own = v2_path(&fs::read_to_string("/proc/self/cgroup").unwrap())
        .unwrap()
        .to_owned();
    let ino = fs::metadata(mount.join(own.trim_start_matches('/')))
        .unwrap()
        .ino();
    let r = Roots::new("walk");
    // Another cgroup that exists, to give as a wrong path. A fresh machine's v2 tree may have
    // no child of the root yet: then one of our own, removed at the end.
    let made = mount.join(format!("udpmon-test-{}", std::process::id()));
    let mut removed_at_end = None;
    let other = if own != "/" {
        Some("/".to_owned())
    } else if let Some(child) = fs::read_dir(&mount)
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir())
    {
        Some(format!("/{}", child.file_name().to_string_lossy()))
    } else if fs::create_dir(&made).is_ok() {
        removed_at_end = Some(RemoveDir(made.clone()));
        Some(format!("/{}", made.file_name().unwrap().to_string_lossy()))
    } else {
        eprintln!(
            "SKIPPED (part) cgroups_are_found_by_id_when_no_path_is_known: no child cgroup of {} and none can be made: the wrong-path case is not checked",
            mount.display()
        );
        None
    };
    // Found by walking the tree; and a wrong path is not believed.
    for path in std::iter::once(None).chain(other.map(Some)) {
        let found = resolve(
            Some(&mount),
            &r.roots,
            vec![Ask {
                cgroup: ino,
                path: path.clone(),
            }],
        );
        assert_eq!(found.len(), 1, "{path:?}");
        assert_eq!(found[&ino], parse_path(&own), "{path:?}: own cgroup {own}");
    }
    // An id no cgroup has: answered, as no container.
    let found = resolve(
        Some(&mount),
        &r.roots,
        vec![Ask {
            cgroup: 1,
            path: None,
        }],
    );
    assert_eq!(found.get(&1), Some(&None));
    drop(removed_at_end);
}

/// An empty directory (a cgroup a test made) removed when the test ends, passed or not.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn the_map_keeps_recently_used_entries_within_its_bound() {
    let mut m = ContainerMap::new(8);
    assert_eq!(m.lookup(1), Lookup::Unknown);
    let c = Container {
        id: ID.into(),
        runtime: Some(Runtime::Podman),
        ..Container::default()
    };
    m.learn(HashMap::from([(1, Some(c.clone())), (2, None)]));
    assert_eq!(m.lookup(1), Lookup::Known(Some(Arc::new(c.clone()))));
    assert_eq!(m.lookup(2), Lookup::Known(None));
    for cg in 3..=8 {
        m.learn(HashMap::from([(cg, None)]));
    }
    // Cgroup 1 is used again: of the nine, the least recently used go.
    assert!(matches!(m.lookup(1), Lookup::Known(Some(_))));
    m.learn(HashMap::from([(9, None)]));
    assert!(m.len() <= 8 && m.len() >= 6, "{}", m.len());
    assert!(matches!(m.lookup(1), Lookup::Known(Some(_))));
    assert!(matches!(m.lookup(9), Lookup::Known(None)));
    assert_eq!(m.lookup(2), Lookup::Unknown);
}
