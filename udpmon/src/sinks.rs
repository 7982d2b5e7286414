//! Where reports go: the line output (text or JSON, standard output or `-o FILE`), the
//! systemd journal, and the Prometheus counters; any of them may be absent.
use std::io;

use crate::{
    engine::Report,
    journal::Journal,
    metrics::Metrics,
    output::Output,
    report::{ClockOffset, Formatter},
};

/// How far a newly measured boot-to-wall offset may be from the one in use before the
/// formatters take it. Its two clock reads jitter by microseconds (more in a VM), and an offset
/// that followed them would print one kernel timestamp (a `last_answer`, a `last_rx`) two ways
/// at two ticks; a step of the wall clock is far larger, and NTP's slewing needs minutes to
/// build up this much.
const CLOCK_SLACK_NS: i128 = 1_000_000;

pub struct Sinks {
    /// The boot-to-wall offset the formatters use.
    pub clock: ClockOffset,
    pub formatter: Formatter,
    /// Standard output or `-o FILE`; None with `--journal` alone.
    pub out: Option<Output>,
    /// Print the column titles first (text on a terminal).
    pub header: bool,
    pub journal: Option<Journal>,
    pub metrics: Option<Metrics>,
}

impl Sinks {
    /// The column titles, if the format has them and the output wants them.
    pub fn start(&mut self) -> io::Result<()> {
        if let Some(h) = self.formatter.header().filter(|_| self.header)
            && let Some(out) = &mut self.out
        {
            out.line(&h)?;
            out.flush()?;
        }
        Ok(())
    }

    /// One report that passed the filters. Metrics count it even if no output takes it.
    pub fn report(&mut self, r: &Report) -> io::Result<()> {
        if let Some(m) = &self.metrics {
            m.report(r);
        }
        if let Some(out) = &mut self.out {
            out.line_with(|buf| self.formatter.write(r, buf))?;
        }
        if let Some(j) = &mut self.journal {
            j.send(r);
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }

    /// SIGHUP: `-o FILE` is opened anew.
    pub fn reopen(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.reopen(),
            None => Ok(()),
        }
    }

    /// The boot-to-wall offset measured now: taken if the wall clock was stepped or has
    /// drifted by more than [`CLOCK_SLACK_NS`].
    pub fn set_clock(&mut self, clock: ClockOffset) {
        if (clock.0 - self.clock.0).abs() <= CLOCK_SLACK_NS {
            return;
        }
        self.clock = clock;
        self.formatter.set_clock(clock);
        if let Some(j) = &mut self.journal {
            j.set_clock(clock);
        }
    }

    /// Events the output or the journal could not take, since startup.
    pub fn unwritten(&self) -> u64 {
        self.out.as_ref().map_or(0, |o| o.unwritten.total)
            + self.journal.as_ref().map_or(0, |j| j.unwritten.total)
    }
}
