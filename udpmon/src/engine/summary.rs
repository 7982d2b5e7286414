//! Busy-socket summaries: SUMMARY with scope `socket` (issue 11, item 6).
//!
//! A server with many peers (a DNS server, a syslog collector) opens a flow per client
//! address:port; one line per ACCEPT, ESTABLISH and CLOSE of each would bury everything else.
//!
//! Rules (decided here; the README and `report/json.rs` describe the output):
//! - Intervals are the engine's: they start at its first tick and end at the first tick at
//!   or after `--summary-interval` later (ticks are about a second apart; one up to 100 ms
//!   early counts, as ticks jitter), so every busy socket's summary covers the same stretch
//!   of time, measured on the events' clock. An event that waited for its namespace or
//!   container to be resolved counts in the interval in which it is processed.
//! - A socket that opens more than `--summary-threshold` flows within one interval is busy
//!   from its next flow on. Whether a flow is summarised is decided once, when it opens, so
//!   that a flow whose opening was printed has its CLOSE printed too, and one whose opening
//!   was counted has its close counted: flows opened before the socket became busy keep
//!   their lines. Flows learned at startup are neither counted nor summarised.
//! - A summarised flow's CONNECT or ACCEPT, ESTABLISH and CLOSE (whatever the reason:
//!   idle, evicted, the socket's close; the count does not say which) are counted, not
//!   printed.
//! - Its problems (UNREACHABLE, SILENT, APP-ERROR) are counted and printed up to
//!   `--summary-problems` lines per kind per socket per interval; the rest are folded and
//!   counted as such. A RESUMED ends the trouble its SILENT or UNREACHABLE reported, so it
//!   is folded when that report was. REFUSED names no socket (nothing listens on its port),
//!   so it is in no socket's summary; its own rate limit applies.
//! - At each interval's end, one SUMMARY per busy socket with what its summarised flows did
//!   in the interval. A socket stays busy while its intervals open more than the threshold;
//!   after one that opens no more, it is no longer busy: its next flows are printed. Its
//!   summarised flows still open then are reported in further summaries (only in intervals
//!   in which something of them is counted) until the last has closed. A socket's close
//!   ends its summaries with one at once.
//! - Counts add up: each summarised flow is counted once in `new_flows` and once in
//!   `closed`, and `open` is the previous summary's `open` plus `new_flows` minus `closed`.
//! - Names: what issue 11 calls new peers, answered and never answered are `new_flows`,
//!   `established` and `never_established`, since a peer is already something else here (one
//!   program's flows to one remote, `peer.rs`) and ESTABLISH is the event they stand for.
//! - Memory: a socket holds its count of new flows and whether it is busy (five bytes that
//!   fit its padding); the counts of a summary live in a side table of busy sockets only.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{
    owners::Held,
    report::{Detail, ReportKind, SocketSummary},
};
use crate::decode::Family;

/// The knobs of the busy-socket summaries and of the peer-scope folding of UNREACHABLE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummaryConfig {
    /// A socket that opens more flows than this within one interval is busy.
    pub threshold: u32,
    pub interval: Duration,
    /// Problem lines printed per kind per busy socket per interval.
    pub problem_lines: u32,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        Self {
            threshold: 100,
            interval: Duration::from_secs(10),
            problem_lines: 5,
        }
    }
}

/// A busy socket's summary in the making, and what it needs to be reported once the socket
/// is gone.
#[derive(Debug)]
pub(super) struct Busy {
    pub owner: Arc<Held>,
    pub netns: u32,
    pub family: Family,
    pub local: SocketAddr,
    /// Start of the summary's interval.
    pub since_ns: u64,
    /// New flows are summarised (else only the ones still open are).
    pub busy: bool,
    /// Summarised flows open.
    pub live: u64,
    pub counts: SocketSummary,
    /// Problem lines printed in this interval: UNREACHABLE, SILENT, APP-ERROR.
    printed: [u32; 3],
}

impl Busy {
    pub fn new(owner: Arc<Held>, netns: u32, family: Family, local: SocketAddr, ts: u64) -> Self {
        Self {
            owner,
            netns,
            family,
            local,
            since_ns: ts,
            busy: true,
            live: 0,
            counts: SocketSummary::default(),
            printed: [0; 3],
        }
    }

    pub fn opened(&mut self) {
        self.counts.new_flows += 1;
        self.live += 1;
    }

    pub fn closed(&mut self, established: bool) {
        self.counts.closed += 1;
        self.counts.never_established += u64::from(!established);
        self.live = self.live.saturating_sub(1);
    }

    /// A report on one of the summarised flows: counted; whether it is printed. `muted`
    /// is the flow's: its last SILENT or UNREACHABLE was folded.
    pub fn report(
        &mut self,
        kind: ReportKind,
        detail: &Detail,
        muted: &mut bool,
        limit: u32,
    ) -> bool {
        let c = &mut self.counts;
        let slot = match kind {
            ReportKind::Accept => {
                c.accepted += 1;
                return false;
            }
            ReportKind::Connect => {
                c.connected += 1;
                return false;
            }
            ReportKind::Establish => {
                c.established += 1;
                return false;
            }
            ReportKind::Resumed => {
                let folded = std::mem::take(muted);
                c.folded.resumed += u64::from(folded);
                return !folded;
            }
            ReportKind::Unreachable => {
                if let Detail::Unreachable(u) = detail {
                    c.problems.unreachable.add(u.verdict, 1);
                }
                0
            }
            ReportKind::Silent => {
                c.problems.silent += 1;
                1
            }
            ReportKind::AppError => {
                c.problems.app_error += 1;
                2
            }
            ReportKind::Close | ReportKind::Refused | ReportKind::Summary => return true,
        };
        let print = self.printed[slot] < limit;
        if print {
            self.printed[slot] += 1;
        } else {
            let f = &mut c.folded;
            *[&mut f.unreachable, &mut f.silent, &mut f.app_error][slot] += 1;
        }
        if kind != ReportKind::AppError {
            *muted = !print;
        }
        print
    }

    /// Whether the interval's summary has anything to say: the socket was busy in it, or
    /// one of its summarised flows did something.
    pub fn worth_reporting(&self) -> bool {
        self.busy
            || SocketSummary {
                interval_ns: 0,
                open: 0,
                ..self.counts
            } != SocketSummary::default()
    }

    /// The interval's counts, ending it at `now`.
    pub fn take(&mut self, now: u64) -> SocketSummary {
        let s = SocketSummary {
            interval_ns: now.saturating_sub(self.since_ns),
            open: self.live,
            ..self.counts
        };
        self.counts = SocketSummary::default();
        self.printed = [0; 3];
        self.since_ns = now;
        s
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::engine::{Folded, Identity, Op, Problems, Trouble};

    fn busy() -> Busy {
        let local: SocketAddr = "10.0.0.1:53".parse().unwrap();
        Busy::new(
            Arc::new(Held::new(Identity::default())),
            1,
            Family::V4,
            local,
            0,
        )
    }

    /// Per kind, `limit` lines an interval; an APP-ERROR leaves the pairing of SILENT and
    /// RESUMED alone; a RESUMED goes the way of the trouble it ends; a new interval prints
    /// again.
    #[test]
    fn problems_are_printed_up_to_the_limit_per_kind_and_interval() {
        let mut b = busy();
        let mut muted = false;
        let silent = Detail::Silent {
            no_reply_ns: 1,
            sends: 2,
        };
        let app = Detail::AppError {
            op: Op::Send,
            errno: 111,
            after_unreachable_ns: None,
        };
        let resumed = Detail::Resumed {
            after: Trouble::Silent,
            quiet_ns: 1,
        };
        let report = |b: &mut Busy, kind, d: &Detail, muted: &mut bool| b.report(kind, d, muted, 1);
        assert!(report(&mut b, ReportKind::Silent, &silent, &mut muted));
        assert!(!muted);
        assert!(!report(&mut b, ReportKind::Silent, &silent, &mut muted));
        assert!(muted, "a folded SILENT");
        assert!(report(&mut b, ReportKind::AppError, &app, &mut muted));
        assert!(!report(&mut b, ReportKind::AppError, &app, &mut muted));
        assert!(muted, "APP-ERROR does not end the trouble");
        assert!(!report(&mut b, ReportKind::Resumed, &resumed, &mut muted));
        assert!(!muted);
        assert!(report(&mut b, ReportKind::Resumed, &resumed, &mut muted));
        let s = b.take(10);
        assert_eq!(
            (s.problems, s.folded, s.interval_ns),
            (
                Problems {
                    silent: 2,
                    app_error: 2,
                    ..Problems::default()
                },
                Folded {
                    silent: 1,
                    app_error: 1,
                    resumed: 1,
                    ..Folded::default()
                },
                10
            )
        );
        assert!(
            report(&mut b, ReportKind::Silent, &silent, &mut muted),
            "a new interval"
        );
        assert_eq!(b.take(20).interval_ns, 10);
    }
}
