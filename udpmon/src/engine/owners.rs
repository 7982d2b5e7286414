//! Socket owners as the engine keeps them: each held once, however many sockets, ports and
//! peers name it, and followed through its process's exit and exec.
//!
//! A socket's owner is what the last event of the socket's own said. The kernel tells when a
//! process that held a socket exits or execs (`Fact::Exit`, `Fact::Exec`), with nothing of
//! the socket's: its next event names the holder as it is, but a report the engine makes on
//! its own timer (SILENT, idle CLOSE, SUMMARY) must not name a pid the system may already
//! have given to another process. So an owner keeps who took its place ([`Held::now`]): the
//! same process under its new program after an exec, an unknown owner after an exit (as the
//! kernel names one, `OWNER_GONE`: no pid nor names, the cgroup and namespace kept).
use std::sync::{Arc, OnceLock};

use hashbrown::HashMap;

use super::{Identity, Name};

/// An owner as sockets, ports and peers share it.
#[derive(Debug)]
pub(super) struct Held {
    /// As an event named it.
    learned: Identity,
    /// Set once its process exits or execs.
    next: OnceLock<Arc<Held>>,
}

impl Held {
    pub fn new(owner: Identity) -> Self {
        Self {
            learned: owner,
            next: OnceLock::new(),
        }
    }

    /// Who holds the socket now, as far as the engine knows: what the reports it makes on
    /// its own name.
    pub fn now(&self) -> &Identity {
        let mut h = self;
        while let Some(n) = h.next.get() {
            h = n;
        }
        &h.learned
    }

    /// As an event named it, before any exit or exec: the port's last owner that a REFUSED
    /// (or an ICMP error no socket matched) names is the one that closed it, and has
    /// usually exited since.
    pub fn learned(&self) -> &Identity {
        &self.learned
    }

    /// Whether an event naming `who` names this owner, still alive as it was.
    pub fn is(&self, who: &Identity) -> bool {
        self.next.get().is_none() && self.learned == *who
    }
}

/// The live owners, by process id: a program's sockets share one, so that its exit or exec
/// reaches all of them at once (see [`Held`]). A process has few (its threads, the
/// namespaces its sockets are in). Owners that nothing names any more are dropped at each
/// tick.
#[derive(Default)]
pub(super) struct Owners {
    by_tgid: HashMap<u32, Vec<Arc<Held>>>,
}

impl Owners {
    /// The owner `who` is, held once. The lists hold only owners that nothing took the place
    /// of (see [`Owners::succeed`]).
    pub fn of(&mut self, who: &Identity) -> Arc<Held> {
        let list = self.by_tgid.entry(who.tgid).or_default();
        if let Some(h) = list.iter().find(|h| h.is(who)) {
            return h.clone();
        }
        let h = Arc::new(Held::new(*who));
        list.push(h.clone());
        h
    }

    /// Process `tgid` exited: its owners are unknown from now on.
    pub fn exited(&mut self, tgid: u32) {
        self.succeed(tgid, |o| Identity {
            cgroup: o.cgroup,
            netns: o.netns,
            ..UNKNOWN
        });
    }

    /// Process `now.tgid` exec'd: its owners are named as `now` from then on.
    pub fn execd(&mut self, now: &Identity) {
        self.succeed(now.tgid, |o| Identity {
            netns: o.netns,
            ..*now
        });
    }

    fn succeed(&mut self, tgid: u32, next: impl Fn(&Identity) -> Identity) {
        // Process 0 is no process: the unknown owners.
        if tgid == 0 {
            return;
        }
        let Some(old) = self.by_tgid.remove(&tgid) else {
            return;
        };
        for h in old {
            let n = self.of(&next(&h.learned));
            // Only here, and `h` has just left the table: it has no successor yet.
            let _ = h.next.set(n);
        }
    }

    pub fn purge(&mut self) {
        self.by_tgid.retain(|_, list| {
            list.retain(|h| Arc::strong_count(h) > 1);
            !list.is_empty()
        });
    }
}

/// The owner of an unknown socket.
pub(super) static UNKNOWN: Identity = Identity {
    tgid: 0,
    pid: 0,
    comm: Name::EMPTY,
    process: Name::EMPTY,
    uid: 0,
    cgroup: 0,
    netns: 0,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn nc(tgid: u32) -> Identity {
        Identity {
            tgid,
            pid: tgid,
            comm: "nc".into(),
            process: "nc".into(),
            uid: 1000,
            cgroup: 25,
            netns: 7,
        }
    }

    #[test]
    fn an_owner_follows_its_process_through_exec_and_exit() {
        let mut o = Owners::default();
        let held = o.of(&nc(100));
        // Held once.
        assert!(Arc::ptr_eq(&held, &o.of(&nc(100))));
        let socat = Identity {
            comm: "socat".into(),
            process: "socat".into(),
            uid: 0,
            ..nc(100)
        };
        o.execd(&socat);
        assert_eq!(*held.now(), socat);
        assert_eq!(*held.learned(), nc(100));
        o.exited(100);
        let gone = Identity {
            cgroup: 25,
            netns: 7,
            ..UNKNOWN
        };
        assert_eq!(*held.now(), gone);
        // The same number, another process: a new owner, not the exited one's.
        let again = o.of(&nc(100));
        assert!(!Arc::ptr_eq(&again, &held));
        assert_eq!(*again.now(), nc(100));
        assert_eq!(*held.now(), gone);
        // Only what something still names is kept.
        drop(again);
        o.purge();
        assert!(!o.by_tgid.contains_key(&100));
        assert!(o.by_tgid.contains_key(&0), "the successor `held` leads to");
        drop(held);
        o.purge();
        assert!(o.by_tgid.is_empty());
    }
}
