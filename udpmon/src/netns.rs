//! Network namespace cookie -> inode. Cgroup hooks can name a socket's namespace only by its
//! cookie (`bpf_get_netns_cookie`), while operators know namespaces by inode (`ip netns`,
//! `/proc/PID/ns/net`); the kernel gives the cookie of the current namespace through
//! SO_NETNS_COOKIE, so visiting every namespace once builds the map.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
};

use anyhow::{Context as _, anyhow};

use crate::procfs::pids;

/// Bind mounts of named namespaces: `ip netns add`, and Docker's, which lives elsewhere.
const NAMED_NETNS_DIRS: [&str; 2] = ["/run/netns", "/run/docker/netns"];
/// A namespace shared by thousands of processes needs only a few fallbacks for when its first
/// processes exit mid-scan.
const PATHS_PER_NETNS: usize = 4;

/// SO_NETNS_COOKIE (since 5.14); not in every libc release yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookies that no scan could resolve (their namespace was gone by then) are remembered, up
/// to this many, so that they do not cause a scan each.
const UNRESOLVABLE_MAX: usize = 4096;

/// What is known of a namespace cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Inode(u32),
    /// A scan made after the cookie was first seen did not find it.
    Unresolvable,
    /// Not seen by any scan yet: a namespace created since the last one.
    Unknown,
}

/// The cookie -> inode map, filled by [`scan`]s that the caller runs off its event loop.
#[derive(Default)]
pub struct NetnsMap {
    /// hashbrown's hasher: looked up for records whose hook did not see the namespace.
    by_cookie: hashbrown::HashMap<u64, u32>,
    unresolvable: hashbrown::HashSet<u64>,
}

impl NetnsMap {
    pub fn lookup(&self, cookie: u64) -> Lookup {
        match self.by_cookie.get(&cookie) {
            Some(&i) => Lookup::Inode(i),
            None if self.unresolvable.contains(&cookie) => Lookup::Unresolvable,
            None => Lookup::Unknown,
        }
    }

    /// Takes a scan's findings; the cookies `asked` for before it started that it did not
    /// find belong to namespaces that no longer exist.
    pub fn learn(&mut self, found: HashMap<u64, u32>, asked: &HashSet<u64>) {
        self.by_cookie.extend(found);
        if self.unresolvable.len() + asked.len() > UNRESOLVABLE_MAX {
            self.unresolvable.clear();
        }
        for c in asked {
            if !self.by_cookie.contains_key(c) {
                self.unresolvable.insert(*c);
            }
        }
    }
}

/// Network namespace inode -> paths that open it. Threads are looked at too: a thread may have
/// `setns()`ed or `unshare()`d away from its process, and its sockets with it.
pub(crate) fn network_namespaces() -> anyhow::Result<BTreeMap<u64, Vec<PathBuf>>> {
    // A stale /run/netns entry whose mount is gone is a plain tmpfs file: accept only nsfs.
    let nsfs = fs::metadata("/proc/self/ns/net")
        .context("/proc/self/ns/net")?
        .dev();
    let mut found: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut add = |path: PathBuf| {
        // Entries vanish while we scan; such a path just does not count.
        let Ok(meta) = fs::metadata(&path) else {
            return;
        };
        if meta.dev() != nsfs {
            return;
        }
        let paths = found.entry(meta.ino()).or_default();
        if paths.len() < PATHS_PER_NETNS {
            paths.push(path);
        }
    };
    // Named namespaces first: bind mounts outlive any process.
    for dir in NAMED_NETNS_DIRS {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            add(entry.path());
        }
    }
    for pid in pids() {
        add(PathBuf::from(format!("/proc/{pid}/ns/net")));
        for task in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            // The leader's is /proc/PID/ns/net, already added.
            if tid != pid {
                add(task.path().join("ns/net"));
            }
        }
    }
    Ok(found)
}

/// Moves the calling thread into network namespace `inode`, through the first path that still
/// leads to it (a pid may have been reused for a process elsewhere).
fn enter(inode: u64, paths: &[PathBuf], current: &mut Option<u64>) -> anyhow::Result<()> {
    if *current == Some(inode) {
        return Ok(());
    }
    let file = paths
        .iter()
        .filter_map(|p| fs::File::open(p).ok())
        .find(|f| f.metadata().is_ok_and(|m| m.ino() == inode))
        .ok_or_else(|| anyhow!("vanished"))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    *current = Some(inode);
    Ok(())
}

/// The cookie of the calling thread's network namespace.
pub(crate) fn current_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned right away. An AF_UNIX socket, so
    // that udpmon's own UDP hooks do not see it.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid descriptor and out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Runs `f` inside each of `namespaces` in turn, on a thread of its own (entering a namespace
/// changes the calling thread's, and only its): each namespace's inode with what `f` returned
/// there, or why it could not be entered.
pub(crate) fn in_each<T: Send + 'static>(
    namespaces: BTreeMap<u64, Vec<PathBuf>>,
    f: impl Fn() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<Vec<(u64, anyhow::Result<T>)>> {
    std::thread::Builder::new()
        .name("udpmon-netns".into())
        .spawn(move || {
            // Entering our own namespace needs no setns(), which also spares us CAP_SYS_ADMIN
            // there.
            let mut current = fs::metadata("/proc/thread-self/ns/net")
                .map(|m| m.ino())
                .ok();
            namespaces
                .into_iter()
                .map(|(inode, paths)| {
                    (inode, enter(inode, &paths, &mut current).and_then(|()| f()))
                })
                .collect()
        })
        .context("spawning the namespace scan thread")?
        .join()
        .map_err(|_| anyhow!("the namespace scan thread panicked"))
}

/// cookie -> inode for every namespace on the host. Blocking: callers with an event loop run
/// it elsewhere.
pub fn scan() -> anyhow::Result<HashMap<u64, u32>> {
    Ok(in_each(network_namespaces()?, || Ok(current_cookie()?))?
        .into_iter()
        .filter_map(|(inode, cookie)| Some((cookie.ok()?, u32::try_from(inode).ok()?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn enumerates_its_own_namespace() {
        let namespaces = network_namespaces().unwrap();
        assert!(namespaces.contains_key(&std::fs::metadata("/proc/self/ns/net").unwrap().ino()));
    }

    #[test]
    fn own_namespace_resolves() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED own_namespace_resolves: needs root to enter namespaces");
            return;
        }
        let cookie = current_cookie().expect("SO_NETNS_COOKIE");
        let inode = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let found = scan().expect("scan");
        assert_eq!(found.get(&cookie), Some(&(inode as u32)));
    }

    #[test]
    fn a_scan_resolves_what_was_asked_or_marks_it_gone() {
        let mut m = NetnsMap::default();
        assert_eq!(m.lookup(7), Lookup::Unknown);
        // 7 and 8 were asked for; the scan found 7 and 9 (a namespace nobody asked about yet).
        m.learn(
            HashMap::from([(7, 4026531840), (9, 4026532001)]),
            &HashSet::from([7, 8]),
        );
        assert_eq!(m.lookup(7), Lookup::Inode(4026531840));
        assert_eq!(m.lookup(8), Lookup::Unresolvable);
        assert_eq!(m.lookup(9), Lookup::Inode(4026532001));
        // A cookie first seen while that scan ran is not given up on.
        assert_eq!(m.lookup(10), Lookup::Unknown);
    }
}
