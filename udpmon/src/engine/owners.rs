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

use super::{Name, Owner};
use crate::decode::KernelEvent;

/// An owner as sockets, ports and peers share it.
#[derive(Debug)]
pub(super) struct Held {
    /// As an event named it.
    learned: Owner,
    /// Set once its process exits or execs.
    next: OnceLock<Arc<Held>>,
}

impl Held {
    pub fn new(owner: Owner) -> Self {
        Self {
            learned: owner,
            next: OnceLock::new(),
        }
    }

    /// Who holds the socket now, as far as the engine knows: what the reports it makes on
    /// its own name.
    pub fn now(&self) -> &Owner {
        let mut h = self;
        while let Some(n) = h.next.get() {
            h = n;
        }
        &h.learned
    }

    /// As an event named it, before any exit or exec: the port's last owner that a REFUSED
    /// names is the one that closed it, and has usually exited since.
    pub fn learned(&self) -> &Owner {
        &self.learned
    }

    /// Whether an event naming `who` names this owner, still alive as it was.
    pub fn is(&self, who: &OwnerOf<'_>) -> bool {
        self.next.get().is_none() && who.is(&self.learned)
    }
}

/// Who an event names as its socket's owner, before it is interned.
pub(super) struct OwnerOf<'a> {
    pub ev: &'a KernelEvent,
    pub netns: u32,
}

impl OwnerOf<'_> {
    fn is(&self, o: &Owner) -> bool {
        let e = self.ev;
        (e.tgid, e.pid, e.uid, e.cgroup, self.netns) == (o.tgid, o.pid, o.uid, o.cgroup, o.netns)
            && e.comm == o.comm
            && e.process == o.process
    }

    fn owner(&self) -> Owner {
        let e = self.ev;
        Owner {
            tgid: e.tgid,
            pid: e.pid,
            comm: e.comm,
            process: e.process,
            uid: e.uid,
            cgroup: e.cgroup,
            netns: self.netns,
        }
    }
}

/// The live owners, by process id: a program's sockets share one, and the events of a
/// socket, which nearly always name the owner it already has, cost a comparison instead of
/// two string copies. A process has few (its threads, the namespaces its sockets are in).
/// Owners that nothing names any more are dropped at each tick.
#[derive(Default)]
pub(super) struct Owners {
    by_tgid: HashMap<u32, Vec<Arc<Held>>>,
}

impl Owners {
    /// The owner an event names.
    pub fn of(&mut self, who: &OwnerOf<'_>) -> Arc<Held> {
        let list = self.by_tgid.entry(who.ev.tgid).or_default();
        if let Some(h) = list.iter().find(|h| h.is(who)) {
            return h.clone();
        }
        let h = Arc::new(Held::new(who.owner()));
        list.push(h.clone());
        h
    }

    /// `owner` (as learned) in another namespace.
    pub fn renamed(&mut self, owner: &Arc<Held>, netns: u32) -> Arc<Held> {
        if owner.learned.netns == netns {
            return owner.clone();
        }
        self.intern(Owner {
            netns,
            ..owner.learned
        })
    }

    /// Process `tgid` exited: its owners are unknown from now on.
    pub fn exited(&mut self, tgid: u32) {
        self.succeed(tgid, |o| Owner {
            tgid: 0,
            pid: 0,
            comm: Name::default(),
            process: Name::default(),
            uid: 0,
            ..*o
        });
    }

    /// Process `ev.tgid` exec'd: its owners are named as `ev` names it from now on.
    pub fn execd(&mut self, ev: &KernelEvent) {
        self.succeed(ev.tgid, |o| OwnerOf { ev, netns: o.netns }.owner());
    }

    fn succeed(&mut self, tgid: u32, next: impl Fn(&Owner) -> Owner) {
        // Owner 0 is no process: the unknown ones.
        if tgid == 0 {
            return;
        }
        let Some(old) = self.by_tgid.remove(&tgid) else {
            return;
        };
        for h in old {
            let n = self.intern(next(&h.learned));
            // Only here, and `h` has just left the table: it has no successor yet.
            let _ = h.next.set(n);
        }
    }

    fn intern(&mut self, o: Owner) -> Arc<Held> {
        let list = self.by_tgid.entry(o.tgid).or_default();
        if let Some(h) = list.iter().find(|h| h.learned == o) {
            return h.clone();
        }
        let h = Arc::new(Held::new(o));
        list.push(h.clone());
        h
    }

    pub fn purge(&mut self) {
        self.by_tgid.retain(|_, list| {
            list.retain(|h| Arc::strong_count(h) > 1);
            !list.is_empty()
        });
    }
}

/// The owner of an unknown socket.
pub(super) static UNKNOWN: Owner = Owner {
    tgid: 0,
    pid: 0,
    comm: Name::EMPTY,
    process: Name::EMPTY,
    uid: 0,
    cgroup: 0,
    netns: 0,
};
