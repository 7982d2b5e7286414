//! A map by socket cookie, for the engine's one record per socket.
//!
//! A resolver opens a socket per query, so there can be as many sockets as flows: a
//! `HashMap<u64, Socket>` at a million entries spends twice the entry's size per socket
//! (the table doubles past 7/8 full). Here the entries sit densely in a `Vec`, and the hash
//! table holds only their positions (4 bytes each); a removal moves the last entry into
//! the hole.
use std::{cell::Cell, hash::BuildHasher};

use hashbrown::{DefaultHashBuilder, HashTable};

pub(super) struct CookieMap<V> {
    entries: Vec<(u64, V)>,
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// The position [`CookieMap::find`] found last: one event asks for its socket several
    /// times (to learn from it, for the local address, the owner of each report, the peer).
    /// Checked against the entry, so never stale.
    last: Cell<u32>,
}

impl<V> Default for CookieMap<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            last: Cell::new(0),
        }
    }
}

impl<V> CookieMap<V> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[inline]
    fn find(&self, cookie: u64) -> Option<usize> {
        let last = self.last.get() as usize;
        if self.entries.get(last).is_some_and(|e| e.0 == cookie) {
            return Some(last);
        }
        self.look_up(cookie)
    }

    /// [`CookieMap::find`] past the position found last: kept out of line, so that the
    /// check before it is inlined into each caller.
    #[inline(never)]
    fn look_up(&self, cookie: u64) -> Option<usize> {
        let entries = &self.entries;
        let i = *self.table.find(self.hasher.hash_one(cookie), |&i| {
            entries[i as usize].0 == cookie
        })?;
        self.last.set(i);
        Some(i as usize)
    }

    pub fn get(&self, cookie: &u64) -> Option<&V> {
        self.find(*cookie).map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, cookie: &u64) -> Option<&mut V> {
        self.find(*cookie).map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key(&self, cookie: &u64) -> bool {
        self.find(*cookie).is_some()
    }

    pub fn get_or_insert_with(&mut self, cookie: u64, new: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(cookie) {
            Some(i) => i,
            None => {
                let i = self.entries.len();
                let pos = u32::try_from(i).expect("fewer than 2^32 sockets");
                self.entries.push((cookie, new()));
                let (entries, hasher) = (&self.entries, &self.hasher);
                self.table
                    .insert_unique(hasher.hash_one(cookie), pos, |&j| {
                        hasher.hash_one(entries[j as usize].0)
                    });
                self.last.set(pos);
                i
            }
        };
        &mut self.entries[i].1
    }

    pub fn remove(&mut self, cookie: &u64) -> Option<V> {
        let i = self.find(*cookie)?;
        Some(self.remove_at(i))
    }

    fn remove_at(&mut self, i: usize) -> V {
        let hasher = &self.hasher;
        let cookie = self.entries[i].0;
        if let Ok(e) = self
            .table
            .find_entry(hasher.hash_one(cookie), |&j| j as usize == i)
        {
            e.remove();
        }
        let last = self.entries.len() - 1;
        if i != last {
            let moved = self.entries[last].0;
            if let Some(p) = self
                .table
                .find_mut(hasher.hash_one(moved), |&j| j as usize == last)
            {
                *p = i as u32;
            }
        }
        self.entries.swap_remove(i).1
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.entries.iter().map(|(c, v)| (*c, v))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn behaves_as_a_hash_map(ops in prop::collection::vec((0..3u8, 0..24u64), 1..300)) {
            let mut m = CookieMap::default();
            let mut model = HashMap::new();
            for (op, cookie) in ops {
                match op {
                    0 => {
                        *m.get_or_insert_with(cookie, || 0) += 1;
                        *model.entry(cookie).or_insert(0) += 1;
                    }
                    1 => prop_assert_eq!(m.remove(&cookie), model.remove(&cookie)),
                    _ => {
                        m.values_mut().for_each(|v| *v += 1);
                        model.values_mut().for_each(|v| *v += 1);
                    }
                }
                prop_assert_eq!(m.len(), model.len());
                for c in 0..24 {
                    prop_assert_eq!(m.get(&c), model.get(&c));
                    prop_assert_eq!(m.contains_key(&c), model.contains_key(&c));
                }
            }
        }
    }
}
