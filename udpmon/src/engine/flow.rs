//! Flows and the table that holds them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use udpmon_common::{
    FlowKey, FlowStats,
    event::{AF_INET, AF_INET6},
};

use super::peer::PeerLink;
use crate::decode::{Family, Verdict};

/// A flow: one socket talking to one remote address:port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub cookie: u64,
    pub remote: SocketAddr,
}

impl FlowId {
    /// The smallest `SocketAddr` in `Ord` order (V4 sorts before V6, then address, port):
    /// the start of a cookie's range in the table.
    const MIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
}

/// The kernel keys its flow map the same way; the caller uses this to read counters.
impl From<&FlowId> for FlowKey {
    fn from(id: &FlowId) -> Self {
        let (remote, family) = match id.remote.ip() {
            IpAddr::V4(a) => {
                let mut r = [0; 16];
                r[..4].copy_from_slice(&a.octets());
                (r, AF_INET)
            }
            IpAddr::V6(a) => (a.octets(), AF_INET6),
        };
        FlowKey {
            cookie: id.cookie,
            remote,
            rport: id.remote.port(),
            family,
            _pad: 0,
        }
    }
}

/// A flow's kernel-side counters. Times are CLOCK_BOOTTIME nanoseconds, 0 for "never".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    pub first_ns: u64,
    pub last_tx_ns: u64,
    pub last_rx_ns: u64,
}

impl From<FlowStats> for Counters {
    fn from(s: FlowStats) -> Self {
        Self {
            tx_datagrams: s.tx_datagrams,
            tx_bytes: s.tx_bytes,
            rx_datagrams: s.rx_datagrams,
            rx_bytes: s.rx_bytes,
            first_ns: s.first_ns,
            last_tx_ns: s.last_tx_ns,
            last_rx_ns: s.last_rx_ns,
        }
    }
}

impl Counters {
    /// Folds in another view of the same flow. Counters only grow, so the larger value is
    /// the newer one; this keeps event-derived knowledge when the kernel's LRU map has
    /// already dropped the entry, and never lets a stale read move a flow backwards.
    pub fn merge(&mut self, o: &Counters) {
        self.tx_datagrams = self.tx_datagrams.max(o.tx_datagrams);
        self.tx_bytes = self.tx_bytes.max(o.tx_bytes);
        self.rx_datagrams = self.rx_datagrams.max(o.rx_datagrams);
        self.rx_bytes = self.rx_bytes.max(o.rx_bytes);
        self.first_ns = match (self.first_ns, o.first_ns) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_tx_ns = self.last_tx_ns.max(o.last_tx_ns);
        self.last_rx_ns = self.last_rx_ns.max(o.last_rx_ns);
    }

    pub fn last_ns(&self) -> u64 {
        self.last_tx_ns.max(self.last_rx_ns)
    }

    /// `self` continued by a later kernel entry of the same flow: volumes add up.
    fn then(&self, later: &Counters) -> Counters {
        Counters {
            tx_datagrams: self.tx_datagrams + later.tx_datagrams,
            tx_bytes: self.tx_bytes + later.tx_bytes,
            rx_datagrams: self.rx_datagrams + later.rx_datagrams,
            rx_bytes: self.rx_bytes + later.rx_bytes,
            first_ns: self.first_ns,
            last_tx_ns: self.last_tx_ns.max(later.last_tx_ns),
            last_rx_ns: self.last_rx_ns.max(later.last_rx_ns),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Active,
    /// Silent; `last_rx_ns` is the peer's last datagram before the silence. `reported`:
    /// SILENT was reported for this flow, rather than for its peer (see `peer.rs`), so its
    /// end is this flow's RESUMED.
    Silent {
        last_rx_ns: u64,
        reported: bool,
    },
    /// UNREACHABLE was reported at `since_ns` for this ICMP; `last_rx_ns` as above.
    Unreachable {
        since_ns: u64,
        icmp: (u8, u8, Verdict),
        last_rx_ns: u64,
    },
}

#[derive(Clone, Debug)]
pub(super) struct Flow {
    pub local: SocketAddr,
    pub family: Family,
    pub opened_ns: u64,
    /// Learned from a socket that existed before udpmon started.
    pub preexisting: bool,
    pub first_tx_ns: Option<u64>,
    pub first_rx_ns: Option<u64>,
    pub established: bool,
    pub state: State,
    pub counters: Counters,
    /// The rx count at the last tick that saw it change, and the tx count then minus the
    /// sends that certainly followed that receive: "sends since the last reply" is
    /// `counters.tx_datagrams - tx_at_rx`, a lower bound.
    pub rx_seen: u64,
    pub tx_at_rx: u64,
    pub icmp_errors: u64,
    pub app_errors: u64,
    /// The errno of the last APP-ERROR reported, cleared by any other report on the flow:
    /// an application that fails the same way on every call gets one line, not one per call.
    pub last_app_errno: Option<i32>,
    /// Some report named this flow.
    pub reported: bool,
    /// When the kernel entry whose counters were last read was created (0: none read yet).
    pub kernel_first_ns: u64,
    /// What earlier kernel entries of this flow counted: the kernel's LRU map can drop a live
    /// flow's entry under pressure, and the next datagram starts a new one from zero. Boxed:
    /// rare, and every flow pays for the field.
    pub earlier: Option<Box<Counters>>,
    /// Its peer across flows, for flows the local side opened.
    pub peer: PeerLink,
}

impl Flow {
    pub fn new(local: SocketAddr, family: Family, ts_ns: u64) -> Self {
        Self {
            local,
            family,
            opened_ns: ts_ns,
            preexisting: false,
            first_tx_ns: None,
            first_rx_ns: None,
            established: false,
            state: State::Active,
            counters: Counters::default(),
            rx_seen: 0,
            tx_at_rx: 0,
            icmp_errors: 0,
            app_errors: 0,
            last_app_errno: None,
            reported: false,
            kernel_first_ns: 0,
            earlier: None,
            peer: PeerLink::NONE,
        }
    }

    /// In a flow-level SILENT that was reported.
    pub fn silence_reported(&self) -> bool {
        matches!(self.state, State::Silent { reported: true, .. })
    }

    /// Folds in a read of the flow's kernel entry. Returns true when that entry is newer than
    /// the one read before (the kernel dropped and recreated it): what the old one counted is
    /// kept, and only what it counted after the previous read is lost.
    pub fn absorb(&mut self, c: &Counters) -> bool {
        let renewed = self.kernel_first_ns != 0 && c.first_ns > self.kernel_first_ns;
        if renewed {
            self.earlier = Some(Box::new(self.counters));
        }
        if c.first_ns != 0 {
            self.kernel_first_ns = self.kernel_first_ns.max(c.first_ns);
        }
        let total = match &self.earlier {
            Some(e) => e.then(c),
            None => *c,
        };
        self.counters.merge(&total);
        renewed
    }
}

/// Flows by id, with an index by last activity for eviction.
#[derive(Default)]
pub(super) struct FlowTable {
    flows: BTreeMap<FlowId, (u64, Flow)>,
    by_activity: BTreeSet<(u64, FlowId)>,
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    #[cfg(test)]
    pub fn get(&self, id: &FlowId) -> Option<&Flow> {
        self.flows.get(id).map(|(_, f)| f)
    }

    pub fn get_mut(&mut self, id: &FlowId) -> Option<&mut Flow> {
        self.flows.get_mut(id).map(|(_, f)| f)
    }

    pub fn contains(&self, id: &FlowId) -> bool {
        self.flows.contains_key(id)
    }

    pub fn insert(&mut self, id: FlowId, flow: Flow, ts_ns: u64) {
        if let Some((old, _)) = self.flows.insert(id, (ts_ns, flow)) {
            self.by_activity.remove(&(old, id));
        }
        self.by_activity.insert((ts_ns, id));
    }

    pub fn remove(&mut self, id: &FlowId) -> Option<Flow> {
        let (at, flow) = self.flows.remove(id)?;
        self.by_activity.remove(&(at, *id));
        Some(flow)
    }

    /// Records activity at `ts_ns`; activity never moves backwards (events can arrive
    /// slightly out of order across CPUs).
    pub fn touch(&mut self, id: &FlowId, ts_ns: u64) {
        if let Some((at, _)) = self.flows.get_mut(id)
            && ts_ns > *at
        {
            self.by_activity.remove(&(*at, *id));
            *at = ts_ns;
            self.by_activity.insert((ts_ns, *id));
        }
    }

    pub fn last_activity(&self, id: &FlowId) -> Option<u64> {
        self.flows.get(id).map(|(at, _)| *at)
    }

    pub fn least_active(&self) -> Option<FlowId> {
        self.by_activity.first().map(|(_, id)| *id)
    }

    pub fn ids(&self) -> Vec<FlowId> {
        self.flows.keys().copied().collect()
    }

    pub fn of_cookie(&self, cookie: u64) -> Vec<FlowId> {
        let start = FlowId {
            cookie,
            remote: FlowId::MIN_ADDR,
        };
        self.flows
            .range(start..)
            .map(|(id, _)| *id)
            .take_while(|id| id.cookie == cookie)
            .collect()
    }

    pub fn has_cookie(&self, cookie: u64) -> bool {
        let start = FlowId {
            cookie,
            remote: FlowId::MIN_ADDR,
        };
        self.flows
            .range(start..)
            .next()
            .is_some_and(|(id, _)| id.cookie == cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cookie: u64, remote: &str) -> FlowId {
        FlowId {
            cookie,
            remote: remote.parse().unwrap(),
        }
    }

    #[test]
    fn table_indexes_by_cookie_and_activity() {
        let mut t = FlowTable::default();
        let l: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        for (i, fid) in [
            id(7, "[fd00::1]:53"),
            id(7, "0.0.0.0:0"),
            id(7, "10.0.0.2:53"),
            id(8, "10.0.0.2:53"),
            id(6, "255.255.255.255:65535"),
        ]
        .into_iter()
        .enumerate()
        {
            t.insert(fid, Flow::new(l, Family::V4, i as u64), i as u64);
        }
        assert_eq!(
            t.of_cookie(7),
            vec![
                id(7, "0.0.0.0:0"),
                id(7, "10.0.0.2:53"),
                id(7, "[fd00::1]:53")
            ]
        );
        assert!(t.has_cookie(6) && !t.has_cookie(9));
        assert_eq!(t.least_active(), Some(id(7, "[fd00::1]:53")));
        t.touch(&id(7, "[fd00::1]:53"), 10);
        t.touch(&id(7, "0.0.0.0:0"), 0);
        assert_eq!(t.least_active(), Some(id(7, "0.0.0.0:0")));
        assert_eq!(t.last_activity(&id(7, "[fd00::1]:53")), Some(10));
        t.remove(&id(7, "0.0.0.0:0"));
        assert_eq!(t.least_active(), Some(id(7, "10.0.0.2:53")));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn counters_merge_keeps_the_newest_view() {
        let mut a = Counters {
            tx_datagrams: 1,
            tx_bytes: 3,
            first_ns: 100,
            last_tx_ns: 100,
            ..Counters::default()
        };
        a.merge(&Counters {
            tx_datagrams: 4,
            tx_bytes: 20,
            rx_datagrams: 1,
            rx_bytes: 4,
            first_ns: 90,
            last_tx_ns: 400,
            last_rx_ns: 300,
        });
        a.merge(&Counters::default());
        assert_eq!(
            a,
            Counters {
                tx_datagrams: 4,
                tx_bytes: 20,
                rx_datagrams: 1,
                rx_bytes: 4,
                first_ns: 90,
                last_tx_ns: 400,
                last_rx_ns: 300,
            }
        );
        assert_eq!(a.last_ns(), 400);
    }

    #[test]
    fn a_recreated_kernel_entry_adds_to_what_the_old_one_counted() {
        let mut f = Flow::new("10.0.0.1:53".parse().unwrap(), Family::V4, 100);
        let old = Counters {
            tx_datagrams: 5,
            tx_bytes: 50,
            rx_datagrams: 4,
            rx_bytes: 40,
            first_ns: 100,
            last_tx_ns: 500,
            last_rx_ns: 450,
        };
        assert!(!f.absorb(&old));
        // The same entry read again, grown: no renewal, the newest view wins.
        let grown = Counters {
            tx_datagrams: 6,
            tx_bytes: 60,
            last_tx_ns: 600,
            ..old
        };
        assert!(!f.absorb(&grown));
        assert_eq!(f.counters, grown);
        // Evicted by the kernel, then recreated by the next datagram at 900.
        let new = Counters {
            tx_datagrams: 1,
            tx_bytes: 10,
            rx_datagrams: 0,
            rx_bytes: 0,
            first_ns: 900,
            last_tx_ns: 900,
            last_rx_ns: 0,
        };
        assert!(f.absorb(&new));
        let expect = Counters {
            tx_datagrams: 7,
            tx_bytes: 70,
            rx_datagrams: 4,
            rx_bytes: 40,
            first_ns: 100,
            last_tx_ns: 900,
            last_rx_ns: 450,
        };
        assert_eq!(f.counters, expect);
        // Later reads of the new entry keep adding to the old one's totals, once.
        let newer = Counters {
            tx_datagrams: 2,
            tx_bytes: 20,
            rx_datagrams: 1,
            rx_bytes: 8,
            last_tx_ns: 950,
            last_rx_ns: 960,
            ..new
        };
        assert!(!f.absorb(&newer));
        assert_eq!(
            f.counters,
            Counters {
                tx_datagrams: 8,
                tx_bytes: 80,
                rx_datagrams: 5,
                rx_bytes: 48,
                last_tx_ns: 950,
                last_rx_ns: 960,
                ..expect
            }
        );
    }

    #[test]
    fn flow_key_matches_the_kernel_layout() {
        let k = FlowKey::from(&id(42, "10.200.0.2:12345"));
        assert_eq!((k.cookie, k.rport, k.family), (42, 12345, AF_INET));
        assert_eq!(k.remote[..4], [10, 200, 0, 2]);
        assert!(k.remote[4..].iter().all(|&b| b == 0));
        let k = FlowKey::from(&id(1, "[fd00:200::2]:7000"));
        assert_eq!(k.family, AF_INET6);
        assert_eq!(k.remote[0..2], [0xfd, 0]);
        assert_eq!(k.remote[15], 2);
    }
}
