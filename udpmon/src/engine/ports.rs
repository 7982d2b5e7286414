//! Who is, or was last, on a local port: the sockets that may have sent the datagram an
//! untold ICMP error quotes, and the process to name for an error or a datagram (REFUSED) that
//! found no socket.
//!
//! The open sockets on a port form a list through their records, most recently named first,
//! from one table entry per port: a socket joins, moves or leaves in constant time however
//! many share the port (a server's connected socket per client, a reuseport group), and a
//! lookup walks only that port's sockets. A socket that leaves its port (closes, is forgotten,
//! or is disconnected from its autobound port) leaves its owner there, for a later error.
use std::sync::Arc;

use hashbrown::{HashMap, hash_map::Entry};

use super::{Engine, Identity, Socket, owners::Held};

#[derive(Default)]
pub(super) struct Ports {
    /// Port -> the open socket on it named last (the head of its list), in any namespace.
    heads: HashMap<u16, u64>,
    /// (netns, port) -> the owner of the last socket that left it, and when.
    left: HashMap<(u32, u16), (Arc<Held>, u64)>,
}

impl Ports {
    /// `owner`'s socket left (netns, port) at `ts_ns`: it is named there until another is,
    /// unless a socket left that port later already.
    fn left(&mut self, netns: u32, port: u16, owner: Arc<Held>, ts_ns: u64) {
        match self.left.get_mut(&(netns, port)) {
            Some(e) if e.1 > ts_ns => {}
            Some(e) => *e = (owner, ts_ns),
            None => {
                self.left.insert((netns, port), (owner, ts_ns));
            }
        }
    }

    /// Forgets the ports left longest ago beyond `cap`, down to three quarters of it, so that
    /// a table at the bound is not sorted every tick.
    pub fn trim(&mut self, cap: usize) {
        if self.left.len() <= cap {
            return;
        }
        let mut by_age: Vec<_> = self.left.iter().map(|(k, (_, t))| (*t, *k)).collect();
        by_age.sort_unstable();
        let excess = self.left.len() - cap * 3 / 4;
        for (_, k) in by_age.into_iter().take(excess) {
            self.left.remove(&k);
        }
    }
}

impl Engine {
    /// The open sockets on `port` in any namespace, most recently named first.
    pub(super) fn on_port(&self, port: u16) -> impl Iterator<Item = (u64, &Socket)> {
        let mut next = self.ports.heads.get(&port).copied().unwrap_or(0);
        std::iter::from_fn(move || {
            let cookie = std::mem::replace(&mut next, 0);
            let s = self.sockets.get(&cookie).filter(|_| cookie != 0)?;
            next = s.port_next;
            Some((cookie, s))
        })
    }

    /// The socket's record has a new local port, where its old one was `old_port` (0: none).
    pub(super) fn port_changed(&mut self, cookie: u64, old_port: u16, ts_ns: u64) {
        self.vacate(cookie, old_port, ts_ns);
        match self.sockets.get(&cookie).map(|s| s.local.port()) {
            Some(0) | None => {}
            Some(port) => self.link(cookie, port),
        }
    }

    /// An event named the socket, which is on its port's list but not at its head: it moves
    /// there.
    pub(super) fn named_on_port(&mut self, cookie: u64) {
        let Some(port) = self.sockets.get(&cookie).map(|s| s.local.port()) else {
            return;
        };
        self.unlink(cookie, port);
        self.link(cookie, port);
    }

    /// The socket leaves `port` (0: none) at `ts_ns`, where its owner is named from then on
    /// until another is.
    pub(super) fn vacate(&mut self, cookie: u64, port: u16, ts_ns: u64) {
        if port == 0 {
            return;
        }
        self.unlink(cookie, port);
        if let Some(s) = self.sockets.get(&cookie)
            && let Some(owner) = &s.owner
        {
            self.ports.left(s.netns, port, owner.clone(), ts_ns);
        }
    }

    /// The process last seen on (netns, port): its open socket named last, unless a socket
    /// left the port after that one's last activity.
    pub(super) fn last_owner(&self, netns: u32, port: u16) -> Option<Identity> {
        let open = self
            .on_port(port)
            .filter(|(_, s)| s.netns == netns)
            .find_map(|(_, s)| Some((s.owner.as_ref()?, s.seen_ns)));
        let owner = match (open, self.ports.left.get(&(netns, port))) {
            (Some((o, seen)), Some((_, left))) if seen >= *left => o,
            (_, Some((o, _))) | (Some((o, _)), None) => o,
            (None, None) => return None,
        };
        // In the port's namespace, which the owner may have been learned outside of.
        Some(Identity {
            netns,
            ..*owner.learned()
        })
    }

    /// Puts the socket at the head of `port`'s list.
    fn link(&mut self, cookie: u64, port: u16) {
        let head = self.ports.heads.insert(port, cookie).unwrap_or(0);
        if head != 0
            && let Some(h) = self.sockets.get_mut(&head)
        {
            h.port_prev = cookie;
        }
        if let Some(s) = self.sockets.get_mut(&cookie) {
            s.port_prev = 0;
            s.port_next = head;
        }
    }

    /// Takes the socket off `port`'s list.
    fn unlink(&mut self, cookie: u64, port: u16) {
        let Some((prev, next)) = self.sockets.get_mut(&cookie).map(|s| {
            let links = (s.port_prev, s.port_next);
            (s.port_prev, s.port_next) = (0, 0);
            links
        }) else {
            return;
        };
        if prev != 0 {
            if let Some(p) = self.sockets.get_mut(&prev) {
                p.port_next = next;
            }
        } else if let Entry::Occupied(mut head) = self.ports.heads.entry(port)
            && *head.get() == cookie
        {
            if next == 0 {
                head.remove();
            } else {
                head.insert(next);
            }
        }
        if next != 0
            && let Some(n) = self.sockets.get_mut(&next)
        {
            n.port_prev = prev;
        }
    }
}

#[cfg(test)]
impl Engine {
    /// Every socket with a port is on that port's list once, with its neighbours' links
    /// agreeing, and no other socket is on any list.
    pub(super) fn check_ports(&self) -> Result<(), String> {
        let mut listed = 0;
        for &port in self.ports.heads.keys() {
            let mut prev = 0;
            for (cookie, s) in self.on_port(port) {
                if s.local.port() != port || s.port_prev != prev {
                    return Err(format!("socket {cookie} misplaced on port {port}: {s:?}"));
                }
                prev = cookie;
                listed += 1;
                if listed > self.sockets.len() {
                    return Err(format!("port {port}'s list loops"));
                }
            }
            if prev == 0 {
                return Err(format!("port {port} has an empty list"));
            }
        }
        let with_port = self
            .sockets
            .iter()
            .filter(|(_, s)| s.local.port() != 0)
            .count();
        if listed != with_port {
            return Err(format!("{listed} sockets listed, {with_port} have a port"));
        }
        Ok(())
    }
}
