//! Health: in-kernel loss counters (per CPU, summed here) and userspace ones. Reported when
//! they change (at most every few seconds) and in the summary at exit: never silently lost.
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray};
use udpmon_common::Counter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub ringbuf_full: u64,
    pub flow_insert_failed: u64,
    pub kernel_read_failed: u64,
    pub events_sent: u64,
    pub no_socket_suppressed: u64,
    pub no_cookie: u64,
    pub events_read: u64,
    pub decode_errors: u64,
    pub flows_evicted: u64,
    /// Live flows whose kernel entry was dropped by the kernel's LRU and recreated.
    pub kernel_entries_renewed: u64,
    pub flows_tracked: u64,
    /// Program runs the kernel skipped (recursion), summed over udpmon's programs.
    pub recursion_misses: u64,
    /// kprobe hits the kernel could not serve (kretprobe instances exhausted, re-entry).
    pub kprobe_misses: u64,
    /// Of those two, the misses of the programs that see sockets close: not a loss of its
    /// own, what tells whether a close may have been lost (`close_losses`).
    pub close_misses: u64,
    /// Ring-buffer records still there at exit when the output was already closed.
    pub unread_at_exit: u64,
    /// Events the output (a full disk) or the journal did not take.
    pub unwritten: u64,
    /// Peers whose state the engine dropped at its cap (their silences start afresh).
    pub peers_evicted: u64,
    /// Sockets whose close a lost record carried, found gone by dumps of the open sockets
    /// and closed then (not a loss: what made up for one).
    pub closes_recovered: u64,
}

/// One loss counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    /// snake_case, for metric labels.
    pub reason: &'static str,
    /// For people.
    pub name: &'static str,
    pub count: u64,
}

impl Health {
    /// The losses that may have carried a socket's close: records the ring never delivered
    /// or delivered unreadable (any could have been one), and skipped runs of the programs
    /// that see closes.
    pub fn close_losses(&self) -> u64 {
        self.ringbuf_full + self.decode_errors + self.close_misses
    }

    /// The counters whose growth means something was lost: what the warnings and the
    /// summary name, and the `reason` labels of `udpmon_events_lost_total`.
    pub fn losses(&self) -> [Loss; 12] {
        let l = |reason, name, count| Loss {
            reason,
            name,
            count,
        };
        [
            l("ringbuf_full", "ring-buffer drops", self.ringbuf_full),
            l("decode_error", "decode errors", self.decode_errors),
            l(
                "flow_insert_failed",
                "kernel flow-map insert failures",
                self.flow_insert_failed,
            ),
            l(
                "flow_evicted",
                "flows evicted (--max-flows)",
                self.flows_evicted,
            ),
            l(
                "kernel_flow_dropped",
                "live flows dropped by the kernel's flow map (counts since the last read)",
                self.kernel_entries_renewed,
            ),
            l(
                "no_socket_cookie",
                "datagrams sent on sockets without a cookie",
                self.no_cookie,
            ),
            l(
                "refused_rate_limited",
                "closed-port reports rate-limited",
                self.no_socket_suppressed,
            ),
            l(
                "recursion_miss",
                "program runs skipped by the kernel (recursion)",
                self.recursion_misses,
            ),
            l(
                "kprobe_miss",
                "kprobe hits missed by the kernel",
                self.kprobe_misses,
            ),
            l(
                "unread_at_exit",
                "events left unread at exit (output closed)",
                self.unread_at_exit,
            ),
            l(
                "unwritten",
                "events not written (output full or journal unreachable)",
                self.unwritten,
            ),
            l(
                "peer_evicted",
                "peers forgotten (--max-flows)",
                self.peers_evicted,
            ),
        ]
    }

    /// One line naming every loss that grew since `before`, or None.
    pub fn growth(&self, before: &Health) -> Option<String> {
        let parts: Vec<String> = self
            .losses()
            .iter()
            .zip(before.losses())
            .filter(|(now, then)| now.count > then.count)
            .map(|(now, then)| {
                format!(
                    "{} +{} (total {})",
                    now.name,
                    now.count - then.count,
                    now.count
                )
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    pub fn summary(&self) -> String {
        format!(
            "events read {}, ring-buffer drops {}, decode errors {}, flows tracked {}, flows evicted {}, live flows dropped by the kernel map {}, kernel read failures {}, flow-map insert failures {}, uncounted sends (no socket cookie) {}, program runs skipped (recursion) {}, kprobe misses {}, closed-port reports rate-limited {}, events left unread at exit {}, events not written {}, peers evicted {}, closes recovered after lost records {}",
            self.events_read,
            self.ringbuf_full,
            self.decode_errors,
            self.flows_tracked,
            self.flows_evicted,
            self.kernel_entries_renewed,
            self.kernel_read_failed,
            self.flow_insert_failed,
            self.no_cookie,
            self.recursion_misses,
            self.kprobe_misses,
            self.no_socket_suppressed,
            self.unread_at_exit,
            self.unwritten,
            self.peers_evicted,
            self.closes_recovered
        )
    }
}

/// Reads the kernel side of the counters.
pub fn read_kernel(
    map: &PerCpuArray<MapData, u64>,
    h: &mut Health,
) -> Result<(), aya::maps::MapError> {
    let sum = |c: Counter| -> Result<u64, aya::maps::MapError> {
        Ok(map.get(&(c as u32), 0)?.iter().sum())
    };
    h.ringbuf_full = sum(Counter::RingbufFull)?;
    h.flow_insert_failed = sum(Counter::FlowInsertFailed)?;
    h.kernel_read_failed = sum(Counter::ReadFailed)?;
    h.events_sent = sum(Counter::EventsSent)?;
    h.no_socket_suppressed = sum(Counter::NoSocketSuppressed)?;
    h.no_cookie = sum(Counter::NoCookie)?;
    Ok(())
}

/// Rate limit for health warnings.
pub struct Warner {
    last: Option<Instant>,
    reported: Health,
    every: Duration,
}

impl Warner {
    pub fn new(every: Duration) -> Self {
        Self {
            last: None,
            reported: Health::default(),
            every,
        }
    }

    /// A warning to print now, if losses grew and the last one is old enough.
    pub fn check(&mut self, now: Instant, h: &Health) -> Option<String> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        let msg = h.growth(&self.reported)?;
        self.last = Some(now);
        self.reported = *h;
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_names_what_was_lost() {
        let a = Health::default();
        let b = Health {
            ringbuf_full: 3,
            events_read: 10,
            ..a
        };
        assert_eq!(b.growth(&a).unwrap(), "ring-buffer drops +3 (total 3)");
        assert_eq!(b.growth(&b), None);
    }

    #[test]
    fn warnings_are_rate_limited_but_not_lost() {
        let mut w = Warner::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let h1 = Health {
            decode_errors: 1,
            ..Health::default()
        };
        assert!(w.check(t0, &h1).is_some());
        let h2 = Health {
            decode_errors: 4,
            ..h1
        };
        assert_eq!(w.check(t0 + Duration::from_secs(1), &h2), None);
        assert_eq!(
            w.check(t0 + Duration::from_secs(6), &h2).unwrap(),
            "decode errors +3 (total 4)"
        );
    }
}
