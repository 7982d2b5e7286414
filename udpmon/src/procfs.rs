//! The /proc scan: which process holds a socket, and what it is called.
use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::ffi::OsStrExt,
    path::Path,
    time::{Duration, Instant},
};

use crate::identity::Name;

/// Numeric /proc entries, ascending, so that the first owner found is the lowest pid.
pub(crate) fn pids() -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The inode of a `socket:[INODE]` fd link target.
fn parse_socket_link(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Socket inode -> lowest pid holding a descriptor for it, for the inodes in `wanted`.
/// Socket inodes come from the one sockfs, so they are unique across namespaces.
pub fn socket_owners(wanted: &HashSet<u64>) -> HashMap<u64, u32> {
    let mut owners = HashMap::new();
    for pid in pids() {
        if owners.len() == wanted.len() {
            break;
        }
        // Processes exit and fds close while we look: whatever cannot be read is skipped.
        for entry in fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            if let Some(inode) = parse_socket_link(target.as_os_str().as_bytes())
                && wanted.contains(&inode)
            {
                owners.entry(inode).or_insert(pid);
            }
        }
    }
    owners
}

pub fn comm_of(pid: u32) -> Name {
    fs::read(Path::new("/proc").join(pid.to_string()).join("comm"))
        .map(|c| Name::from_bytes(c.strip_suffix(b"\n").unwrap_or(&c)))
        .unwrap_or_default()
}

/// Process names by process id. The kernel's records name the thread that ran the hook; a
/// process's name is its main thread's, which a record names itself when that thread ran it
/// and /proc/PID/comm gives otherwise. Read again after a while, so that a renamed process or
/// a reused pid is not named after what it was.
#[derive(Default)]
pub struct ProcessNames {
    /// hashbrown's hasher, as the engine's tables: one lookup per record, and SipHash was
    /// a twentieth of the agent's time.
    names: hashbrown::HashMap<u32, (Name, Instant)>,
    /// Processes that exited since the last tick.
    exited: Vec<u32>,
}

impl ProcessNames {
    const FRESH_FOR: Duration = Duration::from_secs(10);
    const MAX: usize = 65536;

    /// The name of process `tgid`, given that its thread `pid` is called `comm`: "" when the
    /// process is unknown (0) or already gone.
    pub fn name(&mut self, tgid: u32, pid: u32, comm: Name) -> Name {
        if tgid == 0 {
            return Name::default();
        }
        let known = self.names.get(&tgid);
        if pid == tgid {
            // The main thread names the process itself: remembered for its other threads,
            // without a clock read or a table write when nothing changed.
            if known.is_some_and(|(n, _)| *n == comm) {
                return comm;
            }
            return self.remember(tgid, comm);
        }
        let now = Instant::now();
        match known {
            Some((n, at)) if now.duration_since(*at) < Self::FRESH_FOR => *n,
            _ => self.remember(tgid, comm_of(tgid)),
        }
    }

    /// Process `tgid` exited: its name is forgotten at the next tick, once the records its
    /// exit still causes (its sockets' closes, named after it) are through, so that its
    /// number, when another process gets it, is not named after it.
    pub fn exited(&mut self, tgid: u32) {
        self.exited.push(tgid);
    }

    pub fn tick(&mut self) {
        for tgid in self.exited.drain(..) {
            self.names.remove(&tgid);
        }
    }

    fn remember(&mut self, tgid: u32, name: Name) -> Name {
        let now = Instant::now();
        if self.names.len() >= Self::MAX {
            self.names.clear();
        }
        self.names.insert(tgid, (name, now));
        name
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsRawFd, os::unix::fs::MetadataExt};

    use super::*;

    #[test]
    fn parses_socket_links() {
        assert_eq!(parse_socket_link(b"socket:[123]"), Some(123));
        assert_eq!(parse_socket_link(b"socket:[4294967296]"), Some(1 << 32));
        for bad in [
            &b"socket:[]"[..],
            b"socket:[12a]",
            b"socket:[123",
            b"socket:[+1]",
            b"pipe:[123]",
            b"/dev/null",
            b"anon_inode:[eventfd]",
        ] {
            assert_eq!(
                parse_socket_link(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn names_a_process_after_its_main_thread() {
        let me = std::process::id();
        let main_name = comm_of(me);
        assert!(!main_name.is_empty());
        let mut names = ProcessNames::default();
        // Another thread of this process, with its own name: the process keeps its name.
        assert_eq!(names.name(me, me + 1_000_000, "worker-7".into()), main_name);
        // The main thread's record names the process itself.
        assert_eq!(names.name(me, me, "renamed".into()), "renamed");
        assert_eq!(names.name(me, me + 1_000_000, "worker-7".into()), "renamed");
        // Unknown, and gone.
        assert_eq!(names.name(0, 0, "swapper/0".into()), "");
        assert_eq!(names.name(u32::MAX - 1, 1, "x".into()), "");
        // Exited: named until the next tick, then read anew (here: gone, no name).
        let dead = u32::MAX - 2;
        assert_eq!(names.name(dead, dead, "dead".into()), "dead");
        names.exited(dead);
        assert_eq!(names.name(dead, dead + 1, "worker".into()), "dead");
        names.tick();
        assert_eq!(names.name(dead, dead + 1, "worker".into()), "");
    }

    #[test]
    fn finds_its_own_socket_owner() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = fs::metadata(format!("/proc/self/fd/{}", sock.as_raw_fd()))
            .unwrap()
            .ino();
        let owners = socket_owners(&HashSet::from([inode]));
        assert_eq!(owners.get(&inode), Some(&std::process::id()));
    }
}
