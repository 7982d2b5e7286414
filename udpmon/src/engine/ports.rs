//! Who is, or was last, on a local port: the sockets that may have sent the datagram an
//! untold ICMP error quotes, and the process to name for an error or a datagram (REFUSED) that
//! found no socket.
//!
//! Open sockets are found by their port through an index of their cookies (their records,
//! with owner and namespace, are the engine's `sockets`); a socket that leaves a port
//! (closes, is forgotten, or is disconnected from its autobound port) leaves its owner there.
//! A table entry per open socket that held its owner again, and one per flow by port and
//! peer, cost a seventh of the engine's memory at one flow per socket.
use std::{hash::BuildHasher, sync::Arc};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use super::owners::Held;

#[derive(Default)]
pub(super) struct Ports {
    /// Cookies of open sockets with a known port, hashed by that port. Hashes of several
    /// ports can collide: a candidate is a socket on the port only if its record says so.
    open: HashTable<u64>,
    hasher: DefaultHashBuilder,
    /// (netns, port) -> the owner of the last socket that left it, and when.
    left: HashMap<(u32, u16), (Arc<Held>, u64)>,
}

impl Ports {
    /// Adds an open socket on `port`; `port_of` gives the port of any socket indexed (this
    /// one's included), for the table to place its entries when it grows.
    pub fn add(&mut self, port: u16, cookie: u64, port_of: impl Fn(u64) -> u16) {
        let hasher = &self.hasher;
        self.open
            .insert_unique(hasher.hash_one(port), cookie, |&c| {
                hasher.hash_one(port_of(c))
            });
    }

    /// Removes an open socket from `port`, the port it was added on.
    pub fn remove(&mut self, port: u16, cookie: u64) {
        if let Ok(e) = self
            .open
            .find_entry(self.hasher.hash_one(port), |&c| c == cookie)
        {
            e.remove();
        }
    }

    /// The cookies of the open sockets on `port`, and of some others whose port shares its
    /// hash.
    pub fn candidates(&self, port: u16) -> impl Iterator<Item = u64> + '_ {
        self.open.iter_hash(self.hasher.hash_one(port)).copied()
    }

    /// `owner`'s socket left (netns, port) at `ts_ns`: it is named there until another is,
    /// unless a socket left that port later already.
    pub fn left(&mut self, netns: u32, port: u16, owner: Arc<Held>, ts_ns: u64) {
        match self.left.get_mut(&(netns, port)) {
            Some(e) if e.1 > ts_ns => {}
            Some(e) => *e = (owner, ts_ns),
            None => {
                self.left.insert((netns, port), (owner, ts_ns));
            }
        }
    }

    /// The owner of the last socket that left (netns, port), and when it left.
    pub fn last_left(&self, netns: u32, port: u16) -> Option<(&Arc<Held>, u64)> {
        self.left.get(&(netns, port)).map(|(o, t)| (o, *t))
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
