//! One aligned, plain-English line per report, in the spirit of `tcplife` / `tcpstates`.
use std::{
    borrow::Cow,
    cell::Cell,
    fmt::{self, Write as _},
    io::Write as _,
};

use time::UtcOffset;

use super::{ClockOffset, verdict_name, write};
use crate::{
    container::Container,
    decode::{Family, Verdict},
    engine::{
        CloseReason, CloseStats, Detail, Folded, Identity, Name, Op, PeerSummary, Problems, Report,
        SocketSummary, Trouble, Unanswered, UnreachableInfo, Via, rules::errno_name,
    },
};

/// Widest IPv4 `addr:port` ("255.255.255.255:65535"); IPv6 addresses overflow the column.
const ADDR_WIDTH: usize = 21;
/// A process or thread name is at most 15 bytes (TASK_COMM_LEN - 1).
const COMM_WIDTH: usize = 15;

pub struct TextFormat {
    clock: ClockOffset,
    zone: Zone,
    /// The local time zone could not be determined: times are UTC, and the header says so.
    utc_fallback: bool,
    /// The last wall-clock second written and its local `HH:MM:SS`: reports come in bursts
    /// within a second, and the zone's offset and the calendar are the costly part of a time.
    /// Offsets change on whole seconds, so the cache is never behind a daylight-saving change.
    second: Cell<Option<(i128, [u8; 8])>>,
}

/// Where the offset from UTC of a report's local time comes from.
enum Zone {
    Fixed(UtcOffset),
    /// A zone's rules (daylight saving time included), applied to each report's own time.
    Rules(jiff::tz::TimeZone),
    /// The system's zone, which the agent has jiff read anew at each tick.
    System,
}

impl TextFormat {
    /// Times in the given offset from UTC.
    pub fn with_offset(clock: ClockOffset, offset: UtcOffset) -> Self {
        Self {
            clock,
            zone: Zone::Fixed(offset),
            utc_fallback: false,
            second: Cell::new(None),
        }
    }

    /// Times in a time zone, with its daylight-saving rules.
    pub fn with_zone(clock: ClockOffset, zone: jiff::tz::TimeZone) -> Self {
        Self {
            clock,
            zone: Zone::Rules(zone),
            utc_fallback: false,
            second: Cell::new(None),
        }
    }

    /// Times in the system's time zone, its rules applied to each report's second (a change of
    /// daylight saving time shows at once; a change of the zone itself once the agent's tick
    /// has jiff read it anew), or in UTC, labelled in the header, when the system has none.
    pub fn local(clock: ClockOffset) -> Self {
        match jiff::tz::TimeZone::try_system() {
            Ok(_) => Self {
                clock,
                zone: Zone::System,
                utc_fallback: false,
                second: Cell::new(None),
            },
            Err(_) => Self::utc_fallback(clock),
        }
    }

    pub(super) fn utc_fallback(clock: ClockOffset) -> Self {
        Self {
            utc_fallback: true,
            ..Self::with_offset(clock, UtcOffset::UTC)
        }
    }

    /// The wall clock was stepped (or drifted): the new boot-to-wall offset.
    pub fn set_clock(&mut self, clock: ClockOffset) {
        self.clock = clock;
    }

    fn offset_at(&self, wall: time::OffsetDateTime) -> UtcOffset {
        let of_zone = |tz: &jiff::tz::TimeZone| {
            let at = jiff::Timestamp::from_second(wall.unix_timestamp())
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            UtcOffset::from_whole_seconds(tz.to_offset(at).seconds()).unwrap_or(UtcOffset::UTC)
        };
        match &self.zone {
            Zone::Fixed(o) => *o,
            Zone::Rules(tz) => of_zone(tz),
            Zone::System => of_zone(&jiff::tz::TimeZone::system()),
        }
    }

    #[cfg(test)]
    /// True when times are UTC because the local offset was unavailable.
    pub fn is_utc_fallback(&self) -> bool {
        self.utc_fallback
    }

    pub fn header(&self) -> String {
        let time = if self.utc_fallback {
            "TIME(UTC)"
        } else {
            "TIME"
        };
        format!(
            "{time:<12} {:>7} {:<COMM_WIDTH$} {:<ADDR_WIDTH$} {:<ADDR_WIDTH$} {:<11} DETAIL",
            "PID", "PROCESS", "LOCAL", "REMOTE", "EVENT"
        )
    }

    pub fn format(&self, r: &Report) -> String {
        let mut out = Vec::with_capacity(160);
        self.write(r, &mut out);
        // Everything written is UTF-8: literals, digits, addresses and escaped names.
        String::from_utf8(out).unwrap_or_default()
    }

    /// The line of `r`, appended to `out` (the output's own buffer). The columns go straight
    /// into the line: `format!` with a `String` per column made a text line cost nearly three
    /// times a JSON line.
    pub fn write(&self, r: &Report, out: &mut Vec<u8>) {
        self.time(out, r.ts_ns);
        out.push(b' ');
        // Right-aligned: the spaces go first, as many as the value's width leaves.
        match r.who.tgid {
            0 => out.extend_from_slice(b"      -"),
            p => {
                let p = u64::from(p);
                out.resize(out.len() + 7usize.saturating_sub(write::width(p)), b' ');
                write::decimal(out, p);
            }
        }
        out.push(b' ');
        let name = process_name(&r.who.process, &r.who.comm);
        if name
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            padded(out, COMM_WIDTH, |out| {
                out.extend_from_slice(name.as_bytes());
            });
        } else {
            // Escapes, and widths counted in characters.
            let _ = std::io::Write::write_fmt(out, format_args!("{:<COMM_WIDTH$}", Escaped(&name)));
        }
        for a in [r.local, r.remote] {
            out.push(b' ');
            padded(out, ADDR_WIDTH, |out| write::addr(out, a));
        }
        out.push(b' ');
        padded(out, 11, |out| {
            out.extend_from_slice(r.kind.label().as_bytes());
        });
        out.push(b' ');
        detail(r, out);
        if let Some(c) = &r.container {
            out.push(b' ');
            out.extend_from_slice(container_note(c).as_bytes());
        }
    }

    /// `HH:MM:SS.mmm`, local time.
    fn time(&self, out: &mut Vec<u8>, boot_ns: u64) {
        let (secs, nanos) = write::split_ns(i128::from(boot_ns) + self.clock.0);
        match self.second.get() {
            Some((s, hms)) if s == secs => {
                out.extend_from_slice(&hms);
                out.push(b'.');
                write::digits(out, nanos / 1_000_000, 3);
            }
            _ => {
                let wall = self.clock.wall(boot_ns);
                let t = wall.to_offset(self.offset_at(wall));
                let at = out.len();
                write::digits(out, u32::from(t.hour()), 2);
                out.push(b':');
                write::digits(out, u32::from(t.minute()), 2);
                out.push(b':');
                write::digits(out, u32::from(t.second()), 2);
                // A time `time` cannot represent shows as the epoch: not cached.
                if i128::from(wall.unix_timestamp()) == secs
                    && let Ok(hms) = out[at..].try_into()
                {
                    self.second.set(Some((secs, hms)));
                }
                out.push(b'.');
                write::digits(out, u32::from(t.millisecond()), 3);
            }
        }
    }
}

/// What `put` writes, left-aligned: padded with spaces to `width` bytes (ASCII only: bytes
/// are columns).
#[inline(always)]
fn padded(out: &mut Vec<u8>, width: usize, put: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    put(out);
    let fill = width.saturating_sub(out.len() - at);
    if fill > 0 {
        out.resize(out.len() + fill, b' ');
    }
}

/// `[podman:udpmon-test b5f1cf47c845]`, `[containerd:kube-system/coredns-5d78c9869d-abcde/coredns
/// 3f2a1b0c9d8e]`: at the end of the line, where its length disturbs no column. Names come from
/// the runtimes' files, so they are escaped like process names.
fn container_note(c: &Container) -> String {
    let mut s = String::from("[");
    s.push_str(c.runtime.map_or("container", |r| r.name()));
    let pod = match (&c.namespace, &c.pod) {
        (Some(ns), Some(pod)) => Some(format!("{ns}/{pod}")),
        (None, Some(pod)) => Some(pod.clone()),
        _ => None,
    };
    let names: Vec<&str> = pod.iter().chain(&c.name).map(String::as_str).collect();
    if !names.is_empty() {
        let _ = write!(s, ":{}", Escaped(&names.join("/")));
    }
    let _ = write!(s, " {}]", c.short_id());
    s
}

/// The report's own words, written into the line (most reports: no allocation).
fn detail(r: &Report, out: &mut Vec<u8>) {
    // Writes into a Vec cannot fail.
    let _ = match &r.detail {
        Detail::Opened {
            via: Via::Connect, ..
        } => out.write_all(b"connect(): flow opened, nothing sent yet"),
        Detail::Opened { via, bytes } => {
            let dir = if *via == Via::Send {
                "first datagram sent"
            } else {
                "first datagram from a new peer"
            };
            match bytes {
                Some(b) => write!(out, "{dir}: {b} B"),
                None => out.write_all(dir.as_bytes()),
            }
        }
        Detail::Established { reply_after_ns } => write!(
            out,
            "traffic both ways, first answer after {}",
            duration(*reply_after_ns)
        ),
        Detail::Unreachable(u) => unreachable(out, r.family, r.local.port(), u),
        Detail::Silent { no_reply_ns, sends } => write!(
            out,
            "no reply for {} after {}, no ICMP",
            duration(*no_reply_ns),
            plural(*sends, "send")
        ),
        Detail::Resumed {
            after: Trouble::Silent,
            quiet_ns,
        } => write!(
            out,
            "peer answered again after {} of silence",
            duration(*quiet_ns)
        ),
        Detail::Resumed {
            after: Trouble::Unreachable,
            quiet_ns,
        } => write!(
            out,
            "peer answered again after {}, despite the ICMP error",
            duration(*quiet_ns)
        ),
        Detail::PeerSilent {
            no_reply_ns,
            unanswered: u,
        } => {
            let heard = match u.last_answer_ns {
                Some(_) => "last answer",
                None => "never answered since first seen",
            };
            write!(
                out,
                "peer unanswered: {} over {}, no ICMP; {heard} {} ago",
                unanswered_sends(u),
                duration(u.for_ns),
                duration(*no_reply_ns)
            )
        }
        Detail::PeerResumed {
            quiet_ns,
            unanswered: u,
        } => {
            let again = if u.last_answer_ns.is_some() {
                "again"
            } else {
                "for the first time"
            };
            write!(
                out,
                "peer answered {again} after {}; {} had gone unanswered",
                duration(*quiet_ns),
                unanswered_sends(u)
            )
        }
        Detail::AppError {
            op,
            errno,
            after_unreachable_ns,
        } => {
            let call = if *op == Op::Send { "send" } else { "recv" };
            let _ = write!(out, "{call} failed with {}", errno_name(*errno));
            match after_unreachable_ns {
                Some(after) => write!(
                    out,
                    ": the application noticed the ICMP error {} later",
                    duration(*after)
                ),
                None => Ok(()),
            }
        }
        Detail::Closed { reason, stats } => closed(out, *reason, stats),
        Detail::Refused { last_owner } => write!(
            out,
            "datagram to closed port {}{}",
            r.local.port(),
            OwnerNote(last_owner.as_ref())
        ),
        Detail::SocketSummary(s) => out.write_all(socket_summary(s).as_bytes()),
        Detail::PeerSummary(s) => out.write_all(peer_summary(r.family, s).as_bytes()),
    };
}

/// "busy socket, 10.0s: 4210 new flows (4210 accepted), 4200 established, 4190 closed (10
/// never established), 20 open; problems: 12 unreachable (12 discarded); folded: 7
/// unreachable". Zero problem and folded counts are left out.
fn socket_summary(s: &SocketSummary) -> String {
    let how: Vec<String> = [(s.accepted, "accepted"), (s.connected, "connected")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, how)| format!("{n} {how}"))
        .collect();
    let how = if how.is_empty() {
        String::new()
    } else {
        format!(" ({})", how.join(", "))
    };
    let mut out = format!(
        "busy socket, {}: {}{how}, {} established, {} closed ({} never established), {} open",
        duration(s.interval_ns),
        plural(s.new_flows, "new flow"),
        s.established,
        s.closed,
        s.never_established,
        s.open
    );
    let p = problems(&s.problems);
    if !p.is_empty() {
        let _ = write!(out, "; problems: {p}");
    }
    let f = folded(&s.folded);
    if !f.is_empty() {
        let _ = write!(out, "; folded: {f}");
    }
    out
}

fn problems(p: &Problems) -> String {
    let mut parts = Vec::new();
    let u = &p.unreachable;
    if u.total() > 0 {
        let verdicts: Vec<String> = [
            (u.notified, "notified"),
            (u.queued, "queued"),
            (u.discarded, "discarded"),
            (u.no_socket, "no socket"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
        parts.push(format!(
            "{} unreachable ({})",
            u.total(),
            verdicts.join(", ")
        ));
    }
    if p.silent > 0 {
        parts.push(format!("{} silent", p.silent));
    }
    if p.app_error > 0 {
        parts.push(plural(p.app_error, "app error").to_string());
    }
    parts.join(", ")
}

fn folded(f: &Folded) -> String {
    [
        (f.unreachable, "unreachable"),
        (f.silent, "silent"),
        (f.app_error, "app-error"),
        (f.resumed, "resumed"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, k)| format!("{n} {k}"))
    .collect::<Vec<_>>()
    .join(", ")
}

/// "9.5s: 41 flows drew ICMP port unreachable from 10.0.0.9 (discarded); 40 UNREACHABLE
/// lines folded".
fn peer_summary(family: Family, s: &PeerSummary) -> String {
    let u = &s.icmp;
    format!(
        "{}: {} drew {} from {} ({}); {} folded",
        duration(s.interval_ns),
        plural(s.unreachable, "flow"),
        icmp_name(family, u.ty, u.code),
        u.from,
        verdict_name(u.verdict),
        plural(s.folded, "UNREACHABLE line")
    )
}

fn unreachable(
    out: &mut Vec<u8>,
    family: Family,
    local_port: u16,
    u: &UnreachableInfo,
) -> std::io::Result<()> {
    write!(out, "{} from {}", icmp_name(family, u.ty, u.code), u.from)?;
    let errno = u.errno.map(errno_name);
    match u.verdict {
        Verdict::Notified => match errno {
            Some(e) => write!(out, "; next send/recv fails with {e}"),
            None => write!(out, "; next send/recv fails"),
        },
        Verdict::Queued => match errno {
            Some(e) => write!(out, " queued on the error queue (IP_RECVERR): {e}"),
            None => write!(out, " queued on the error queue (IP_RECVERR)"),
        },
        Verdict::Discarded if u.connected => write!(
            out,
            " discarded: not fatal to a connected socket without IP_RECVERR, the application cannot know"
        ),
        Verdict::Discarded => write!(
            out,
            " discarded: unconnected socket without IP_RECVERR, the application cannot know"
        ),
        Verdict::NoSocket => write!(
            out,
            ": no socket on local port {local_port} any more{}",
            OwnerNote(u.last_owner.as_ref())
        ),
    }
}

/// " (last owner: NAME pid N)", or nothing when the owner is unknown.
struct OwnerNote<'a>(Option<&'a Identity>);

impl fmt::Display for OwnerNote<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(o) if o.is_known() => write!(
                f,
                " (last owner: {} pid {})",
                Escaped(&process_name(&o.process, &o.comm)),
                o.tgid
            ),
            _ => Ok(()),
        }
    }
}

/// The process's name; its thread's where the process's is unknown (it exited before udpmon
/// could read it), and "-" where neither is.
fn process_name<'a>(process: &'a Name, comm: &'a Name) -> Cow<'a, str> {
    match (process.is_empty(), comm.is_empty()) {
        (true, true) => Cow::Borrowed("-"),
        (true, false) => comm.to_str(),
        (false, _) => process.to_str(),
    }
}

/// A process-supplied string (a `comm`) as it may appear on an operator's terminal. Any
/// process can name itself (prctl(PR_SET_NAME)) with escape sequences that would restyle or
/// rewrite the terminal, or with a newline that would forge a whole report line. So every
/// control character (C0, DEL, C1) is shown as a visible escape and the backslash is doubled:
/// the line stays one printable line, and a name that merely looks like an escape reads back
/// differently from the real thing. The decoder has already replaced invalid UTF-8 with
/// U+FFFD, which is printable.
///
/// Width and alignment count the escaped characters, so a name that needed escaping overflows
/// its column like any other long value rather than being cut.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s.chars().any(|c| c == '\\' || c.is_control()) {
            return f.pad(s);
        }
        let mut width = CharCount(0);
        for c in s.chars() {
            write_escaped(&mut width, c)?;
        }
        let fill = f.width().unwrap_or(0).saturating_sub(width.0);
        let (before, after) = match f.align() {
            Some(fmt::Alignment::Right) => (fill, 0),
            Some(fmt::Alignment::Center) => (fill / 2, fill - fill / 2),
            Some(fmt::Alignment::Left) | None => (0, fill),
        };
        let pad = f.fill();
        for _ in 0..before {
            f.write_char(pad)?;
        }
        for c in s.chars() {
            write_escaped(f, c)?;
        }
        for _ in 0..after {
            f.write_char(pad)?;
        }
        Ok(())
    }
}

fn write_escaped(w: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '\\' => w.write_str("\\\\"),
        '\n' => w.write_str("\\n"),
        '\r' => w.write_str("\\r"),
        '\t' => w.write_str("\\t"),
        // Control characters (Unicode category Cc) all lie below U+00A0: two hex digits.
        c if c.is_control() => write!(w, "\\x{:02x}", u32::from(c)),
        c => w.write_char(c),
    }
}

/// Measures escaped text without building it, so padding costs no allocation.
struct CharCount(usize);

impl fmt::Write for CharCount {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.chars().count();
        Ok(())
    }
}

fn closed(out: &mut Vec<u8>, reason: CloseReason, s: &CloseStats) -> std::io::Result<()> {
    let what = match reason {
        CloseReason::Closed => "closed",
        CloseReason::Idle => "expired idle",
        CloseReason::Evicted => "evicted (flow table full)",
        CloseReason::Disconnected => "disconnected",
        CloseReason::Reconnected => "reconnected to another peer",
    };
    let more = if s.preexisting { ">" } else { "" };
    write!(
        out,
        "{what} after {more}{}: tx {}/{} B, rx {}/{} B",
        duration(s.duration_ns),
        plural(s.tx_datagrams, "dgram"),
        s.tx_bytes,
        plural(s.rx_datagrams, "dgram"),
        s.rx_bytes
    )?;
    if s.icmp_errors > 0 {
        write!(out, ", {}", plural(s.icmp_errors, "ICMP error"))?;
    }
    if s.app_errors > 0 {
        write!(out, ", {}", plural(s.app_errors, "app error"))?;
    }
    Ok(())
}

/// "15 dgrams from 15 sockets": a peer's flows all have the same remote end, so each is a
/// socket of its own.
fn unanswered_sends(u: &Unanswered) -> impl fmt::Display {
    fmt::from_fn(move |f| {
        write!(
            f,
            "{} from {}",
            plural(u.sends, "dgram"),
            plural(u.flows, "socket")
        )
    })
}

fn plural(n: u64, what: &str) -> impl fmt::Display {
    fmt::from_fn(move |f| {
        if n == 1 {
            write!(f, "1 {what}")
        } else {
            write!(f, "{n} {what}s")
        }
    })
}

/// Short human durations: microseconds below 1 ms (replies on a LAN), whole milliseconds
/// below 1 s, else seconds with one decimal.
fn duration(ns: u64) -> impl fmt::Display {
    fmt::from_fn(move |f| match ns {
        0..1_000_000 => write!(f, "{}us", ns / 1_000),
        1_000_000..1_000_000_000 => write!(f, "{}ms", ns / 1_000_000),
        _ => write!(f, "{:.1}s", ns as f64 / 1e9),
    })
}

/// The ICMP message in words (RFC 792 / RFC 4443 names).
fn icmp_name(family: Family, ty: u8, code: u8) -> String {
    let name = match family {
        Family::V4 => match (ty, code) {
            (3, 0) => "net unreachable",
            (3, 1) => "host unreachable",
            (3, 2) => "protocol unreachable",
            (3, 3) => "port unreachable",
            (3, 4) => "fragmentation needed",
            (3, 5) => "source route failed",
            (3, 6) => "destination net unknown",
            (3, 7) => "destination host unknown",
            (3, 8) => "source host isolated",
            (3, 9) => "net administratively prohibited",
            (3, 10) => "host administratively prohibited",
            (3, 11) => "net unreachable for TOS",
            (3, 12) => "host unreachable for TOS",
            (3, 13) => "communication administratively prohibited",
            (3, 14) => "host precedence violation",
            (3, 15) => "precedence cutoff",
            (4, _) => "source quench",
            (5, _) => "redirect",
            (11, _) => "time exceeded",
            (12, _) => "parameter problem",
            _ => "",
        },
        Family::V6 => match (ty, code) {
            (1, 0) => "no route to destination",
            (1, 1) => "communication administratively prohibited",
            (1, 2) => "beyond scope of source address",
            (1, 3) => "address unreachable",
            (1, 4) => "port unreachable",
            (1, 5) => "source address failed policy",
            (1, 6) => "reject route to destination",
            (2, _) => "packet too big",
            (3, _) => "time exceeded",
            (4, _) => "parameter problem",
            _ => "",
        },
    };
    let proto = match family {
        Family::V4 => "ICMP",
        Family::V6 => "ICMPv6",
    };
    if name.is_empty() {
        format!("{proto} type {ty} code {code}")
    } else {
        format!("{proto} {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(42_000).to_string(), "42us");
        assert_eq!(duration(120_000_000).to_string(), "120ms");
        assert_eq!(duration(3_240_000_000).to_string(), "3.2s");
        assert_eq!(duration(125_000_000_000).to_string(), "125.0s");
    }

    #[test]
    fn icmp_names() {
        assert_eq!(icmp_name(Family::V4, 3, 3), "ICMP port unreachable");
        assert_eq!(icmp_name(Family::V6, 1, 4), "ICMPv6 port unreachable");
        assert_eq!(icmp_name(Family::V4, 3, 42), "ICMP type 3 code 42");
    }
}
