//! Output formats for [`Report`]s: aligned text lines for people, JSON lines for log shippers.
//!
//! Formatting is pure: the wall-clock time of a report is its CLOCK_BOOTTIME stamp plus a
//! [`ClockOffset`] the caller measures (at startup, then at every tick, so that a step of the
//! wall clock shows in the next lines).
mod json;
mod text;
mod write;

pub use json::JsonFormat;
pub use text::TextFormat;
use time::OffsetDateTime;

use crate::{
    decode::{Family, Verdict},
    engine::Report,
};

/// Wall-clock time minus CLOCK_BOOTTIME, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockOffset(pub i128);

impl ClockOffset {
    /// The wall-clock (UTC) time of a CLOCK_BOOTTIME stamp. A time outside what `time` can
    /// represent (a nonsensical offset) shows as the Unix epoch rather than failing a line.
    pub fn wall(self, boot_ns: u64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(boot_ns) + self.0)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// The output format chosen on the command line.
pub enum Formatter {
    Text(TextFormat),
    Json(JsonFormat),
}

impl Formatter {
    /// A line to print before the first report (column titles), if the format has one.
    pub fn header(&self) -> Option<String> {
        match self {
            Self::Text(t) => Some(t.header()),
            Self::Json(_) => None,
        }
    }

    pub fn set_clock(&mut self, clock: ClockOffset) {
        match self {
            Self::Text(t) => t.set_clock(clock),
            Self::Json(j) => j.set_clock(clock),
        }
    }

    /// One report as one line, without the newline, appended to `out`.
    pub fn write(&self, r: &Report, out: &mut Vec<u8>) {
        match self {
            Self::Text(t) => t.write(r, out),
            Self::Json(j) => j.write(r, out),
        }
    }

    /// One report as one line, without the newline.
    pub fn format(&self, r: &Report) -> String {
        match self {
            Self::Text(t) => t.format(r),
            Self::Json(j) => j.format(r),
        }
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// The JSON `icmp.verdict` names (also the metrics' `verdict` labels).
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Notified => "notified",
        Verdict::Queued => "queued",
        Verdict::Discarded => "discarded",
        Verdict::NoSocket => "no-socket",
    }
}

/// Whole milliseconds, for the JSON `*_ms` fields.
fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

#[cfg(test)]
mod tests;
