//! The systemd journal: `--journal` sends one entry per report, and udpmon's own diagnostics
//! go there natively when its standard error is a journal stream (`JOURNAL_STREAM`, as under a
//! systemd unit).
//!
//! An entry's MESSAGE is the text line; its fields are the JSON keys, so that there is one
//! schema: each key upper-cased, with `-` as `_`, nested keys joined by `_`, prefixed
//! `UDPMON_` (`event` -> `UDPMON_EVENT`, `icmp.verdict` -> `UDPMON_ICMP_VERDICT`,
//! `stats.tx_bytes` -> `UDPMON_STATS_TX_BYTES`); null values are left out. The prefix keeps
//! them apart from the journal's own fields (`ERRNO`, for one, is numeric there).
//!
//! Priorities make problems stand out, with the same split as the collector configurations
//! in packaging/collectors: warning (4) for an ICMP error the application never learns of
//! (`discarded`), a silent peer, an application error and datagrams to a closed port; notice
//! (5) for the ICMP errors the application is told of; info (6) for the rest of a flow's life
//! and the summaries (their problems were printed, or counted, on their own).
use log::{Level, Record};
use serde_json::Value;
use systemd_journal_logger::JournalLog;

use crate::{
    decode::Verdict,
    engine::{Detail, Report, ReportKind},
    output::Unwritten,
    report::{ClockOffset, JsonFormat, TextFormat},
};

const DEST: &str = "the journal";

pub struct Journal {
    log: JournalLog,
    text: TextFormat,
    json: JsonFormat,
    pub unwritten: Unwritten,
}

impl Journal {
    /// Connects to journald, with a first entry that says where udpmon's events are; an error
    /// when journald cannot be reached.
    pub fn connect(clock: ClockOffset) -> std::io::Result<Self> {
        let log = JournalLog::new()?.with_syslog_identifier("udpmon".into());
        log.journal_send(
            &Record::builder()
                .level(Level::Info)
                .target("udpmon")
                .args(format_args!(
                    "udpmon: events follow as journal entries with UDPMON_* fields"
                ))
                .build(),
        )?;
        Ok(Self {
            log,
            text: TextFormat::local(clock),
            json: JsonFormat::new(clock),
            unwritten: Unwritten::default(),
        })
    }

    pub fn set_clock(&mut self, clock: ClockOffset) {
        self.text.set_clock(clock);
        self.json.set_clock(clock);
    }

    pub fn send(&mut self, r: &Report) {
        let fields = fields(&self.json.format(r));
        let message = self.text.format(r);
        let sent = self.log.journal_send(
            &Record::builder()
                .level(level(r))
                .target("udpmon")
                .args(format_args!("{message}"))
                .key_values(&fields)
                .build(),
        );
        match sent {
            Ok(()) => self.unwritten.written(DEST),
            Err(e) => self.unwritten.lost(DEST, &e, 1),
        }
    }
}

/// The level whose journal priority the report gets (systemd-journal-logger maps Warn to
/// warning, Info to notice, Debug to info).
pub fn level(r: &Report) -> Level {
    match (&r.kind, &r.detail) {
        (ReportKind::Unreachable, Detail::Unreachable(u)) if u.verdict == Verdict::Discarded => {
            Level::Warn
        }
        (ReportKind::Silent | ReportKind::AppError | ReportKind::Refused, _) => Level::Warn,
        (ReportKind::Unreachable, _) => Level::Info,
        _ => Level::Debug,
    }
}

/// A JSON line's keys as journal fields (see the module's documentation).
pub fn fields(json: &str) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(24);
    if let Ok(v) = serde_json::from_str::<Value>(json) {
        flatten("UDPMON", &v, &mut out);
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Null => {}
        Value::Object(m) => {
            for (k, v) in m {
                let key = format!("{prefix}_{}", k.to_ascii_uppercase().replace('-', "_"));
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.into(), s.clone())),
        // Numbers and booleans as JSON writes them.
        other => out.push((prefix.into(), other.to_string())),
    }
}

/// Sends udpmon's diagnostics to the journal natively when standard error is connected to it;
/// whether it did.
pub fn diagnostics_to_journal(level: log::LevelFilter) -> bool {
    if !systemd_journal_logger::connected_to_journal() {
        return false;
    }
    let Ok(log) = JournalLog::new() else {
        return false;
    };
    if log
        .with_syslog_identifier("udpmon".into())
        .install()
        .is_err()
    {
        return false;
    }
    log::set_max_level(level);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys_become_prefixed_upper_case_fields() {
        let line = r#"{"event":"unreachable","pid":7,"comm":"nc","icmp":{"type":3,"errno":"ECONNREFUSED","fatal":true,"verdict":"discarded"},"last_owner":null,"app-x":1}"#;
        assert_eq!(
            fields(line),
            [
                ("UDPMON_EVENT", "unreachable"),
                ("UDPMON_PID", "7"),
                ("UDPMON_COMM", "nc"),
                ("UDPMON_ICMP_TYPE", "3"),
                ("UDPMON_ICMP_ERRNO", "ECONNREFUSED"),
                ("UDPMON_ICMP_FATAL", "true"),
                ("UDPMON_ICMP_VERDICT", "discarded"),
                ("UDPMON_APP_X", "1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
