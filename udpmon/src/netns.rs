//! Network namespace cookie -> inode. Cgroup hooks can name a socket's namespace only by its
//! cookie (`bpf_get_netns_cookie`), while operators know namespaces by inode (`ip netns`,
//! `/proc/PID/ns/net`); the kernel gives the cookie of the current namespace through
//! SO_NETNS_COOKIE, so visiting every namespace once builds the map.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

use crate::existing::{enter, network_namespaces};

/// SO_NETNS_COOKIE (since 5.14); not in every libc release yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A namespace created after the last scan is found by scanning again, at most this often.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct NetnsMap {
    by_cookie: HashMap<u64, u32>,
    last_scan: Option<Instant>,
}

impl NetnsMap {
    /// The inode of the namespace with this cookie, scanning the namespaces again when the
    /// cookie is new and the last scan is old enough.
    pub fn inode(&mut self, cookie: u64) -> Option<u32> {
        if let Some(&i) = self.by_cookie.get(&cookie) {
            return Some(i);
        }
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN_EVERY) {
            return None;
        }
        self.last_scan = Some(Instant::now());
        match scan() {
            Ok(found) => self.by_cookie.extend(found),
            Err(e) => log::debug!("netns scan: {e:#}"),
        }
        self.by_cookie.get(&cookie).copied()
    }
}

/// The cookie of the calling thread's network namespace.
fn current_cookie() -> io::Result<u64> {
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

/// cookie -> inode for every namespace on the host. On its own thread, because entering
/// namespaces changes the calling thread's.
fn scan() -> anyhow::Result<HashMap<u64, u32>> {
    let namespaces = network_namespaces()?;
    std::thread::Builder::new()
        .name("udpmon-netns".into())
        .spawn(move || {
            let mut current = None;
            namespaces
                .into_iter()
                .filter_map(|(inode, paths)| {
                    enter(inode, &paths, &mut current).ok()?;
                    let cookie = current_cookie().ok()?;
                    Some((cookie, u32::try_from(inode).ok()?))
                })
                .collect()
        })
        .context("spawning the netns scan thread")?
        .join()
        .map_err(|_| anyhow!("the netns scan thread panicked"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn own_namespace_resolves() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED own_namespace_resolves: needs root to enter namespaces");
            return;
        }
        let cookie = current_cookie().expect("SO_NETNS_COOKIE");
        let inode = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let mut map = NetnsMap::default();
        assert_eq!(map.inode(cookie), Some(inode as u32));
        // A cookie no namespace has: no answer, and no second scan within the second.
        assert_eq!(map.inode(u64::MAX), None);
    }
}
