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
        CloseReason, CloseStats, Detail, Identity, Name, Op, PeerSummary, Report, SocketSummary,
        Trouble, Unanswered, UnreachableInfo, Via, rules::errno_name,
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
            container_note(Words(out).s(" "), c);
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
fn container_note(w: &mut Words<'_>, c: &Container) {
    w.s("[").s(c.runtime.map_or("container", |r| r.name()));
    // The pod's namespace only with the pod.
    let names = [
        c.namespace.as_deref().filter(|_| c.pod.is_some()),
        c.pod.as_deref(),
        c.name.as_deref(),
    ];
    let mut sep = ":";
    for name in names.into_iter().flatten() {
        w.s(sep).d(Escaped(name));
        sep = "/";
    }
    w.s(" ").s(c.short_id()).s("]");
}

/// A report's words, written straight into the line: through the `fmt` machinery they were
/// a quarter of a text line's cost.
struct Words<'a>(&'a mut Vec<u8>);

impl Words<'_> {
    fn s(&mut self, s: &str) -> &mut Self {
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    fn n(&mut self, v: impl Into<u64>) -> &mut Self {
        write::decimal(self.0, v.into());
        self
    }

    /// Anything else: addresses, escaped names.
    fn d(&mut self, v: impl fmt::Display) -> &mut Self {
        // Writes into a Vec cannot fail.
        let _ = write!(self.0, "{v}");
        self
    }

    /// Short human durations: microseconds below 1 ms (replies on a LAN), whole
    /// milliseconds below 1 s, else seconds with one decimal.
    fn duration(&mut self, ns: u64) -> &mut Self {
        match ns {
            0..1_000_000 => self.n(ns / 1_000).s("us"),
            1_000_000..1_000_000_000 => self.n(ns / 1_000_000).s("ms"),
            _ => self.d(format_args!("{:.1}s", ns as f64 / 1e9)),
        }
    }

    fn plural(&mut self, n: u64, what: &str) -> &mut Self {
        self.n(n).s(" ").s(what);
        if n != 1 {
            self.s("s");
        }
        self
    }

    /// "N what" for each nonzero count, separated by ", ".
    fn counts(&mut self, counts: &[(u64, &str)]) -> &mut Self {
        let mut sep = "";
        for &(n, what) in counts.iter().filter(|(n, _)| *n > 0) {
            self.s(sep).n(n).s(" ").s(what);
            sep = ", ";
        }
        self
    }
}

/// The report's own words.
fn detail(r: &Report, out: &mut Vec<u8>) {
    let w = &mut Words(out);
    match &r.detail {
        Detail::Opened {
            via: Via::Connect, ..
        } => {
            w.s("connect(): flow opened, nothing sent yet");
        }
        Detail::Opened { via, bytes } => {
            w.s(if *via == Via::Send {
                "first datagram sent"
            } else {
                "first datagram from a new peer"
            });
            if let Some(b) = bytes {
                w.s(": ").n(*b).s(" B");
            }
        }
        Detail::Established { reply_after_ns } => {
            w.s("traffic both ways, first answer after ")
                .duration(*reply_after_ns);
        }
        Detail::Unreachable(u) => unreachable(w, r.family, r.local.port(), u),
        Detail::Silent { no_reply_ns, sends } => {
            w.s("no reply for ")
                .duration(*no_reply_ns)
                .s(" after ")
                .plural(*sends, "send")
                .s(", no ICMP");
        }
        Detail::Resumed {
            after: Trouble::Silent,
            quiet_ns,
        } => {
            w.s("peer answered again after ")
                .duration(*quiet_ns)
                .s(" of silence");
        }
        Detail::Resumed {
            after: Trouble::Unreachable,
            quiet_ns,
        } => {
            w.s("peer answered again after ")
                .duration(*quiet_ns)
                .s(", despite the ICMP error");
        }
        Detail::PeerSilent {
            no_reply_ns,
            unanswered: u,
        } => {
            w.s("peer unanswered: ");
            unanswered_sends(w, u)
                .s(" over ")
                .duration(u.for_ns)
                .s(", no ICMP; ")
                .s(match u.last_answer_ns {
                    Some(_) => "last answer ",
                    None => "never answered since first seen ",
                })
                .duration(*no_reply_ns)
                .s(" ago");
        }
        Detail::PeerResumed {
            quiet_ns,
            unanswered: u,
        } => {
            w.s("peer answered ")
                .s(if u.last_answer_ns.is_some() {
                    "again"
                } else {
                    "for the first time"
                })
                .s(" after ")
                .duration(*quiet_ns)
                .s("; ");
            unanswered_sends(w, u).s(" had gone unanswered");
        }
        Detail::AppError {
            op,
            errno,
            after_unreachable_ns,
        } => {
            w.s(if *op == Op::Send { "send" } else { "recv" })
                .s(" failed with ")
                .s(&errno_name(*errno));
            if let Some(after) = after_unreachable_ns {
                w.s(": the application noticed the ICMP error ")
                    .duration(*after)
                    .s(" later");
            }
        }
        Detail::Closed { reason, stats } => closed(w, *reason, stats),
        Detail::Refused { last_owner } => {
            w.s("datagram to closed port ").n(r.local.port());
            owner_note(w, last_owner.as_ref());
        }
        Detail::SocketSummary(s) => socket_summary(w, s),
        Detail::PeerSummary(s) => peer_summary(w, r.family, s),
    }
}

/// "busy socket, 10.0s: 4210 new flows (4210 accepted), 4200 established, 4190 closed (10
/// never established), 20 open; problems: 12 unreachable (12 discarded); folded: 7
/// unreachable". Zero problem and folded counts are left out.
fn socket_summary(w: &mut Words<'_>, s: &SocketSummary) {
    w.s("busy socket, ")
        .duration(s.interval_ns)
        .s(": ")
        .plural(s.new_flows, "new flow");
    if s.accepted > 0 || s.connected > 0 {
        w.s(" (")
            .counts(&[(s.accepted, "accepted"), (s.connected, "connected")])
            .s(")");
    }
    w.s(", ")
        .n(s.established)
        .s(" established, ")
        .n(s.closed)
        .s(" closed (")
        .n(s.never_established)
        .s(" never established), ")
        .n(s.open)
        .s(" open");
    let p = &s.problems;
    let u = &p.unreachable;
    if u.total() > 0 || p.silent > 0 || p.app_error > 0 {
        w.s("; problems: ");
        let mut sep = "";
        if u.total() > 0 {
            w.n(u.total())
                .s(" unreachable (")
                .counts(&[
                    (u.notified, "notified"),
                    (u.queued, "queued"),
                    (u.discarded, "discarded"),
                    (u.no_socket, "no socket"),
                ])
                .s(")");
            sep = ", ";
        }
        if p.silent > 0 {
            w.s(sep).n(p.silent).s(" silent");
            sep = ", ";
        }
        if p.app_error > 0 {
            w.s(sep).plural(p.app_error, "app error");
        }
    }
    let f = &s.folded;
    let folded = [
        (f.unreachable, "unreachable"),
        (f.silent, "silent"),
        (f.app_error, "app-error"),
        (f.resumed, "resumed"),
    ];
    if folded.iter().any(|(n, _)| *n > 0) {
        w.s("; folded: ").counts(&folded);
    }
}

/// "9.5s: 41 flows drew ICMP port unreachable from 10.0.0.9 (discarded); 40 UNREACHABLE
/// lines folded".
fn peer_summary(w: &mut Words<'_>, family: Family, s: &PeerSummary) {
    let u = &s.icmp;
    w.duration(s.interval_ns)
        .s(": ")
        .plural(s.unreachable, "flow")
        .s(" drew ")
        .s(&icmp_name(family, u.ty, u.code))
        .s(" from ")
        .d(u.from)
        .s(" (")
        .s(verdict_name(u.verdict))
        .s("); ")
        .plural(s.folded, "UNREACHABLE line")
        .s(" folded");
}

fn unreachable(w: &mut Words<'_>, family: Family, local_port: u16, u: &UnreachableInfo) {
    w.s(&icmp_name(family, u.ty, u.code)).s(" from ").d(u.from);
    let errno = u.errno.map(errno_name);
    match u.verdict {
        Verdict::Notified => {
            w.s("; next send/recv fails");
            if let Some(e) = errno {
                w.s(" with ").s(&e);
            }
        }
        Verdict::Queued => {
            w.s(" queued on the error queue (IP_RECVERR)");
            if let Some(e) = errno {
                w.s(": ").s(&e);
            }
        }
        Verdict::Discarded if u.connected => {
            w.s(" discarded: not fatal to a connected socket without IP_RECVERR, the application cannot know");
        }
        Verdict::Discarded => {
            w.s(" discarded: unconnected socket without IP_RECVERR, the application cannot know");
        }
        Verdict::NoSocket => {
            w.s(": no socket on local port ")
                .n(local_port)
                .s(" any more");
            owner_note(w, u.last_owner.as_ref());
        }
    }
}

/// " (last owner: NAME pid N)", or nothing when the owner is unknown.
fn owner_note(w: &mut Words<'_>, owner: Option<&Identity>) {
    if let Some(o) = owner
        && o.is_known()
    {
        w.s(" (last owner: ")
            .d(Escaped(&process_name(&o.process, &o.comm)))
            .s(" pid ")
            .n(o.tgid)
            .s(")");
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

fn closed(w: &mut Words<'_>, reason: CloseReason, s: &CloseStats) {
    w.s(match reason {
        CloseReason::Closed => "closed",
        CloseReason::Idle => "expired idle",
        CloseReason::Evicted => "evicted (flow table full)",
        CloseReason::Disconnected => "disconnected",
        CloseReason::Reconnected => "reconnected to another peer",
    })
    .s(" after ")
    .s(if s.preexisting { ">" } else { "" })
    .duration(s.duration_ns)
    .s(": tx ")
    .plural(s.tx_datagrams, "dgram")
    .s("/")
    .n(s.tx_bytes)
    .s(" B, rx ")
    .plural(s.rx_datagrams, "dgram")
    .s("/")
    .n(s.rx_bytes)
    .s(" B");
    if s.icmp_errors > 0 {
        w.s(", ").plural(s.icmp_errors, "ICMP error");
    }
    if s.app_errors > 0 {
        w.s(", ").plural(s.app_errors, "app error");
    }
}

/// "15 dgrams from 15 sockets": a peer's flows all have the same remote end, so each is a
/// socket of its own.
fn unanswered_sends<'w, 'a>(w: &'w mut Words<'a>, u: &Unanswered) -> &'w mut Words<'a> {
    w.plural(u.sends, "dgram")
        .s(" from ")
        .plural(u.flows, "socket")
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

    fn words(put: impl FnOnce(&mut Words<'_>)) -> String {
        let mut out = Vec::new();
        put(&mut Words(&mut out));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(
            words(|w| {
                w.duration(42_000);
            }),
            "42us"
        );
        assert_eq!(
            words(|w| {
                w.duration(120_000_000);
            }),
            "120ms"
        );
        assert_eq!(
            words(|w| {
                w.duration(3_240_000_000);
            }),
            "3.2s"
        );
        assert_eq!(
            words(|w| {
                w.duration(125_000_000_000);
            }),
            "125.0s"
        );
    }

    #[test]
    fn icmp_names() {
        assert_eq!(icmp_name(Family::V4, 3, 3), "ICMP port unreachable");
        assert_eq!(icmp_name(Family::V6, 1, 4), "ICMPv6 port unreachable");
        assert_eq!(icmp_name(Family::V4, 3, 42), "ICMP type 3 code 42");
    }
}
