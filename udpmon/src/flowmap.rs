//! The kernel's per-flow counters (the `FLOWS` map), read in bulk once per tick.
//!
//! The tick looks at every tracked flow. One lookup syscall per flow cost ~5 us each with
//! the engine's work, so 65536 flows stalled the agent for about a third of a second every
//! second, long enough for a 1 MiB ring buffer to overflow at 20k new flows per second.
//! `BPF_MAP_LOOKUP_BATCH` (5.6+, hash and LRU hash maps) copies thousands of entries per call,
//! and each batch goes to the engine as it comes ([`Batches::read`]): a copy of the whole map
//! kept for the tick cost as much memory per flow as a third of the engine's own.
//! Entries of flows that ended are deleted the same way, a batch at a time ([`Removals`]):
//! at a hundred thousand new flows a second, a syscall per flow was a tenth of the agent's
//! time.
use std::{
    io, mem,
    os::fd::{AsRawFd, BorrowedFd},
};

use udpmon_common::{FlowKey, FlowStats};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per call. A hash bucket is never split across calls, and the kernel answers
/// ENOSPC if one holds more than this: with 4096 that cannot happen.
const BATCH: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The bpf(2) syscall with `attr` as its `union bpf_attr`.
///
/// # Safety
/// `attr` must be the layout `cmd` takes, and every pointer in it valid for what the kernel
/// reads and writes there.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: the caller's contract.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, mem::size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Reusable buffers for [`Batches::read`]: the map's entries pass through them a batch at a
/// time.
pub struct Batches {
    keys: Vec<FlowKey>,
    values: Vec<FlowStats>,
}

impl Default for Batches {
    fn default() -> Self {
        let key = FlowKey {
            cookie: 0,
            remote: [0; 16],
            rport: 0,
            family: 0,
            _pad: 0,
        };
        Self {
            keys: vec![key; BATCH],
            values: vec![FlowStats::default(); BATCH],
        }
    }
}

impl Batches {
    /// Calls `each` with every entry of the map.
    pub fn read(
        &mut self,
        map: BorrowedFd<'_>,
        mut each: impl FnMut(&FlowKey, &FlowStats),
    ) -> io::Result<()> {
        // The batch token of a hash map is a u32 bucket index; u64 storage holds it.
        let (mut token_in, mut token_out) = (0u64, 0u64);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &raw const token_in as u64 },
                out_batch: &raw mut token_out as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: map.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the kernel writes at most `count` keys and values into buffers of
            // BATCH elements whose layouts are the map's key and value (repr(C), shared with
            // the eBPF side), one token into `token_out`, and `count` back into `attr`.
            let err = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
            // The end of the map comes with its last entries, if any.
            let end = match err {
                None => false,
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                // Other failures may leave `count` as it was sent: the buffers then hold
                // the previous call's entries, no reading of now.
                Some(e) => return Err(e),
            };
            let n = (attr.count as usize).min(BATCH);
            for (k, v) in self.keys[..n].iter().zip(&self.values[..n]) {
                each(k, v);
            }
            if end {
                return Ok(());
            }
            token_in = token_out;
            first = false;
        }
    }
}

/// Keys of ended flows, deleted from the map together by [`Removals::flush`].
#[derive(Default)]
pub struct Removals {
    keys: Vec<FlowKey>,
    /// Batch deletes failed once (not for a missing key): one syscall per key from then on.
    one_by_one: bool,
}

impl Removals {
    pub fn push(&mut self, key: FlowKey) {
        self.keys.push(key);
    }

    /// Deletes every pushed key that the map still holds. A key already gone (the kernel's
    /// LRU took it, or the flow never had an entry) is skipped: a batch delete stops at it.
    pub fn flush(&mut self, map: BorrowedFd<'_>) -> io::Result<()> {
        let mut done = 0;
        let mut res = Ok(());
        while done < self.keys.len() {
            let rest = &self.keys[done..];
            if self.one_by_one {
                // map_fd (u32, padded), key
                let mut attr = [map.as_raw_fd() as u64, &raw const rest[0] as u64];
                // SAFETY: the kernel reads one key of the map's layout at `key`.
                let err = unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.err();
                if let Some(e) = err.filter(|e| e.raw_os_error() != Some(libc::ENOENT)) {
                    res = Err(e);
                }
                done += 1;
                continue;
            }
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count: rest.len().min(u32::MAX as usize) as u32,
                map_fd: map.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the kernel reads `count` keys of the map's layout from `keys` and
            // writes back in `count` how many it deleted.
            let e = unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) }.err();
            let deleted = (attr.count as usize).min(rest.len());
            done += deleted;
            if e.is_none() && deleted == rest.len() {
                continue;
            }
            match e {
                // The key after the deleted ones is not in the map.
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
                // Anything else (a kernel without batch deletes, or one that stopped short):
                // the rest one by one, which says which key fails.
                e => {
                    self.one_by_one = true;
                    log::debug!("batch deletes from the flow map stopped ({e:?}): one by one");
                }
            }
        }
        self.keys.clear();
        res
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    fn lru_map(max: u32) -> io::Result<OwnedFd> {
        // map_type, key_size, value_size, max_entries, map_flags
        let mut attr = [
            BPF_MAP_TYPE_LRU_HASH,
            mem::size_of::<FlowKey>() as u32,
            mem::size_of::<FlowStats>() as u32,
            max,
            0,
        ];
        // SAFETY: map_type, key_size, value_size, max_entries, map_flags: no pointers.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
        // SAFETY: a fresh descriptor the kernel just returned to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// A map of `max` entries, or None (said loudly) where this process may not make one.
    fn map_or_skip(max: u32) -> Option<OwnedFd> {
        lru_map(max)
            .inspect_err(|e| {
                eprintln!("\n*** SKIPPED: cannot create a BPF map ({e}): needs root ***\n")
            })
            .ok()
    }

    fn update(map: &OwnedFd, k: &FlowKey, v: &FlowStats) -> io::Result<()> {
        // map_fd (u32, padded), key, value, flags
        let mut attr = [
            map.as_raw_fd() as u64,
            k as *const FlowKey as u64,
            v as *const FlowStats as u64,
            0,
        ];
        // SAFETY: the key and value point at live values of the map's layouts.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }

    /// The whole map, as the tick's reads see it.
    fn read_all(
        batches: &mut Batches,
        map: &OwnedFd,
    ) -> std::collections::HashMap<FlowKey, FlowStats> {
        let mut all = std::collections::HashMap::new();
        batches
            .read(map.as_fd(), |k, v| {
                all.insert(*k, *v);
            })
            .unwrap();
        all
    }

    fn key(i: u64) -> FlowKey {
        let mut remote = [0; 16];
        remote[..8].copy_from_slice(&i.to_be_bytes());
        FlowKey {
            cookie: i / 7,
            remote,
            rport: i as u16,
            family: 2,
            _pad: 0,
        }
    }

    #[test]
    fn removals_delete_present_keys_and_skip_missing_ones() {
        let Some(map) = map_or_skip(1024) else {
            return;
        };
        for i in 0..100 {
            update(&map, &key(i), &FlowStats::default()).unwrap();
        }
        let mut r = Removals::default();
        // Missing keys first, in the middle and last.
        r.push(key(1000));
        for i in (0..60).step_by(2) {
            r.push(key(i));
            if i % 10 == 0 {
                r.push(key(2000 + i));
            }
        }
        r.push(key(3000));
        r.flush(map.as_fd()).unwrap();
        assert!(r.keys.is_empty() && !r.one_by_one);
        let mut batches = Batches::default();
        let entries = read_all(&mut batches, &map);
        let left: std::collections::BTreeSet<u64> = (0..100)
            .filter(|i| entries.contains_key(&key(*i)))
            .collect();
        let want = (0..100).filter(|i| *i >= 60 || i % 2 == 1).collect();
        assert_eq!(left, want);
        // The one-by-one fallback does the same.
        r.one_by_one = true;
        r.push(key(1000));
        r.push(key(61));
        r.push(key(63));
        r.flush(map.as_fd()).unwrap();
        let entries = read_all(&mut batches, &map);
        assert!(!entries.contains_key(&key(61)) && !entries.contains_key(&key(63)));
        assert_eq!(entries.len(), want.len() - 2);
    }

    /// A failed read hands nothing on, though the buffers still hold an earlier read's
    /// entries.
    #[test]
    fn a_failed_read_gives_no_entries() {
        let Some(map) = map_or_skip(64) else {
            return;
        };
        for i in 0..10 {
            update(&map, &key(i), &FlowStats::default()).unwrap();
        }
        let mut batches = Batches::default();
        assert_eq!(read_all(&mut batches, &map).len(), 10);
        // Not a map: the kernel refuses it before writing anything back.
        let not_a_map = std::fs::File::open("/dev/null").unwrap();
        let mut handed = 0;
        assert!(batches.read(not_a_map.as_fd(), |_, _| handed += 1).is_err());
        assert_eq!(handed, 0);
    }

    #[test]
    fn batches_read_every_entry() {
        // More entries than one batch, so the continuation token is exercised too.
        let n = (BATCH + BATCH / 2) as u64;
        let Some(map) = map_or_skip(2 * n as u32) else {
            return;
        };
        let mut batches = Batches::default();
        assert!(read_all(&mut batches, &map).is_empty());
        for i in 0..n {
            let v = FlowStats {
                tx_datagrams: i,
                rx_bytes: 3 * i,
                ..FlowStats::default()
            };
            update(&map, &key(i), &v).unwrap();
        }
        let entries = read_all(&mut batches, &map);
        assert_eq!(entries.len(), n as usize);
        for i in 0..n {
            let v = entries[&key(i)];
            assert_eq!((v.tx_datagrams, v.rx_bytes), (i, 3 * i));
        }
    }
}
