//! One JSON object per line. The schema is stable; keys are only ever added.
//!
//! Every line has:
//! - `ts`: wall-clock time, RFC 3339 UTC with nanoseconds (`2026-11-27T23:41:00.123456789Z`)
//! - `event`: `connect`, `accept`, `establish`, `unreachable`, `silent`, `resumed`,
//!   `app-error`, `close`, `refused` or `summary`
//! - `pid` (process id), `tid` (thread id), `comm` (the thread's name), `process` (the
//!   process's name, its main thread's), `uid`, `cgroup` (v2 id), `netns` (inode),
//!   `cookie` (socket cookie): 0 / "" when unknown or when no socket is involved; the owner
//!   is the process holding the socket when the event happened, unknown (pid 0) when the
//!   last one known exited and no other has used the socket since
//! - `family`: `ipv4` or `ipv6`; `local`, `remote`: `addr:port`, IPv6 as `[addr]:port`
//! - `container`: null outside containers, else {`id` (the runtime's full id, 64 hex
//!   digits), `runtime` (`docker`, `containerd`, `cri-o`, `podman`, or null when the cgroup
//!   layout does not say and no runtime's state names the id), `name`, `pod`, `namespace`,
//!   `pod_uid` (Kubernetes; each null when unknown)}; for refused and a `no-socket`
//!   unreachable, the container of their `last_owner`
//!
//! and, by event:
//! - connect, accept: `via` (`connect`, `send`, `recv`), `bytes` (first datagram's payload;
//!   null for connect(); when the first datagram's record was lost, the payload of the one
//!   that reported the flow, and `ts` its time)
//! - establish: `reply_after_ms` (first datagram one way to first the other way)
//! - unreachable: `icmp` {`type`, `code`, `from`, `errno` (name or null), `fatal` (bool or
//!   null), `verdict` (`notified`, `queued`, `discarded`, `no-socket`)}; with verdict
//!   `no-socket` also `last_owner` (see refused)
//! - silent: `scope` (`flow` or `peer`), `no_reply_ms` (since the peer was last heard;
//!   at scope peer, since udpmon first saw the peer when it never answered), `sends`
//!   (datagrams sent to it since its last datagram, a lower bound)
//! - resumed: `scope` (`flow` or `peer`), `after` (`silent`, `unreachable`; always
//!   `silent` at scope peer), `quiet_ms` (since the peer was last heard)
//! - silent and resumed with scope `peer` (one program's flows to one remote address:port,
//!   across sockets: a resolver's fresh socket per query): `pid`, `tid`, `comm`, `process`,
//!   `uid`, `cgroup` are those of its most recent flow, `cookie` is 0, `local` is the flows'
//!   local address with port 0 when they used several ports (the address `0.0.0.0` or `::`
//!   when several addresses, or none known yet); also `flows` and `sends` (the flows that
//!   sent to the peer since its last answer and heard nothing back, and the datagrams they
//!   sent, a lower bound; for resumed, up to the answer), `unanswered_ms` (since the first
//!   of those datagrams), `last_answer` (RFC 3339 time of the peer's last answer before
//!   them, or null) and `never_answered` (true when the peer has not answered since udpmon
//!   first saw it)
//! - app-error: `op` (`send`, `recv`), `errno` (name), `after_unreachable_ms` (time since the
//!   flow's ICMP error, or null)
//! - close: `reason` (`closed`, `idle`, `evicted`, `disconnected`, `reconnected`), `stats`
//!   {`duration_ms`, `tx_datagrams`, `tx_bytes`, `rx_datagrams`, `rx_bytes`, `last_tx`,
//!   `last_rx` (RFC 3339 or null), `icmp_errors`, `app_errors`, `preexisting` (the flow
//!   predates udpmon: counts and duration are lower bounds)}
//! - refused: `last_owner` {`pid`, `comm`, `process`, `uid`} of the last process seen on the local
//!   port, or null
//! - summary: `scope` (`socket` or `peer`), `interval_ms` (the time it covers: since the
//!   previous summary, or since the socket became busy or the peer's error first came),
//!   `problems` {`unreachable` {`notified`, `queued`, `discarded`, `no_socket`: UNREACHABLE
//!   events by verdict; `no_socket` only at scope peer}, `silent`, `app_error`} (problem events, printed or not), `folded`
//!   {`unreachable`, `silent`, `app_error`, `resumed`} (events not printed: counted here only)
//! - summary with scope `socket` (a busy socket: one that opened more than
//!   `--summary-threshold` flows in one interval; owner keys, `cookie` and `local` are the
//!   socket's, `remote` is `0.0.0.0:0` or `[::]:0`): counts of the flows it summarises,
//!   those opened once it was busy, whose CONNECT/ACCEPT, ESTABLISH and CLOSE are not
//!   printed: `new_flows` (opened in the interval), `accepted` (of them, opened by the
//!   peer's datagram), `connected` (of them, opened by connect() or a datagram sent; the
//!   rest were first seen through an ICMP error), `established` (saw traffic both ways in the interval), `closed`
//!   (closed in the interval, for any reason), `never_established` (of them, without ever
//!   traffic both ways), `open` (still open at its end: the previous summary's `open` +
//!   `new_flows` - `closed`). Each summarised flow is counted once in `new_flows` and once
//!   in `closed`. Problems beyond `--summary-problems` lines per kind per interval are
//!   folded; a RESUMED is folded when the SILENT or UNREACHABLE it ends was.
//! - summary with scope `peer` (one program's flows to one remote address:port, keys as for
//!   silent with scope peer): while its flows keep drawing the same ICMP error, only the
//!   first UNREACHABLE of the run is printed; `icmp` (as for unreachable, that first
//!   error's) and the run's UNREACHABLE events in the interval, printed or not, in
//!   `problems.unreachable`, those not printed in `folded.unreachable` (every other count 0)
use std::{
    cell::{Cell, RefCell},
    io::Write as _,
};

use time::OffsetDateTime;

use super::{
    ClockOffset, family_name, ms, verdict_name,
    write::{self, digits},
};
use crate::{
    container::Container,
    engine::{
        CloseStats, Detail, Folded, Identity, Name, Op, Problems, Report, Scope, Trouble,
        Unanswered, UnreachableInfo, Via, rules::errno_name,
    },
};

pub struct JsonFormat {
    clock: ClockOffset,
    /// The last wall-clock second written and its `YYYY-MM-DDTHH:MM:SS`: reports come in
    /// bursts within a second, and the calendar is the costly part of a stamp.
    second: Cell<Option<(i128, [u8; 19])>>,
    /// The last owner written and its keys' text (see [`JsonFormat::who`]).
    who: RefCell<Option<(Identity, Vec<u8>)>>,
}

/// serde_json's escaping, also safe on a terminal: JSON itself requires escaping only C0
/// control characters, so DEL and the C1 controls (U+0080..U+009F, which some terminals obey
/// as escape sequences) are escaped too. They can only come from process names.
struct TerminalSafe;

impl serde_json::ser::Formatter for TerminalSafe {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(i) = rest.find(|c: char| c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c))
        {
            w.write_all(&rest.as_bytes()[..i])?;
            let c = rest[i..].chars().next().expect("found above");
            write!(w, "\\u{:04x}", u32::from(c))?;
            rest = &rest[i + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
}

/// A JSON object written straight into the line: building a `serde_json::Value` first cost
/// an allocation per field and a third of the agent's time at a hundred thousand events a
/// second. Keys are literals that need no escaping; string values go through serde_json's
/// escaping (with [`TerminalSafe`]). Writes into a Vec cannot fail.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, empty: true }
    }

    /// `,"k":` (no comma first in the object). Keys are literals of at most 27 bytes: the
    /// line grows by a fixed 32 commas (the first is the separator, when one is due), the rest
    /// is written in place and the line cut to length: one capacity check for the four pieces.
    #[inline(always)]
    fn key(&mut self, k: &str) -> &mut Vec<u8> {
        debug_assert!(k.len() <= 27, "key {k} too long");
        let comma = usize::from(!std::mem::take(&mut self.empty));
        let at = self.out.len();
        self.out.extend_from_slice(&[b','; 32]);
        let b = &mut self.out[at + comma..at + 32];
        b[0] = b'"';
        b[1..1 + k.len()].copy_from_slice(k.as_bytes());
        b[1 + k.len()..3 + k.len()].copy_from_slice(b"\":");
        self.out.truncate(at + comma + 3 + k.len());
        self.out
    }

    #[inline(always)]
    fn num(&mut self, k: &str, v: impl Into<u64>) -> &mut Self {
        write::decimal(self.key(k), v.into());
        self
    }

    /// A string from the kernel or a runtime (names): escaped. Printable ASCII without `"`
    /// and `\\`, as names nearly always are, needs nothing and is copied as it is.
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        let out = self.key(k);
        if plain(v.as_bytes()) {
            quoted(out, v.as_bytes());
        } else {
            let mut ser = serde_json::Serializer::with_formatter(out, TerminalSafe);
            let _ = serde::Serialize::serialize(v, &mut ser);
        }
        self
    }

    /// A process name: its bytes as they are when plain (no UTF-8 check needed), else as
    /// [`Obj::str`] writes its lossy text.
    #[inline(always)]
    fn comm(&mut self, k: &str, v: &Name) -> &mut Self {
        let (bytes, len) = v.padded();
        // Every byte of the fixed-size array at once, the padding passing: no loop exit per
        // byte, and one fixed-size copy below.
        let plain = bytes
            .iter()
            .enumerate()
            .fold(true, |ok, (i, &c)| ok & (i >= len || plain_byte(c)));
        if !plain {
            return self.str(k, &v.to_str());
        }
        let out = self.key(k);
        out.push(b'"');
        let at = out.len();
        out.extend_from_slice(bytes);
        out.truncate(at + len);
        out.push(b'"');
        self
    }

    /// One of this program's own names (an event kind, a reason): nothing to escape.
    #[inline(always)]
    fn name(&mut self, k: &str, v: &'static str) -> &mut Self {
        let out = self.key(k);
        out.push(b'"');
        out.extend_from_slice(v.as_bytes());
        out.push(b'"');
        self
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.str(k, v),
            None => self.null(k),
        }
    }

    /// A value whose text needs no escaping (addresses, names from this file), quoted.
    fn display(&mut self, k: &str, v: impl std::fmt::Display) -> &mut Self {
        let out = self.key(k);
        let _ = write!(out, "\"{v}\"");
        self
    }

    /// `"a.b.c.d:port"` or `"[v6]:port"`.
    #[inline(always)]
    fn addr(&mut self, k: &str, a: std::net::SocketAddr) -> &mut Self {
        let out = self.key(k);
        out.push(b'"');
        write::addr(out, a);
        out.push(b'"');
        self
    }

    #[inline(always)]
    fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k)
            .extend_from_slice(if v { b"true" } else { b"false" });
        self
    }

    #[inline(always)]
    fn null(&mut self, k: &str) -> &mut Self {
        self.key(k).extend_from_slice(b"null");
        self
    }

    #[inline(always)]
    fn obj(&mut self, k: &str) -> Obj<'_> {
        Obj::open(self.key(k))
    }

    #[inline(always)]
    fn close(&mut self) {
        self.out.push(b'}');
    }
}

impl JsonFormat {
    pub fn new(clock: ClockOffset) -> Self {
        Self {
            clock,
            second: Cell::new(None),
            who: RefCell::new(None),
        }
    }

    /// The wall clock was stepped (or drifted): the new boot-to-wall offset.
    pub fn set_clock(&mut self, clock: ClockOffset) {
        self.clock = clock;
    }

    pub fn format(&self, r: &Report) -> String {
        let mut out = Vec::with_capacity(640);
        self.write(r, &mut out);
        // Everything written is UTF-8: literals, digits and serde_json's escaped strings.
        String::from_utf8(out).unwrap_or_default()
    }

    /// The line of `r`, appended to `out` (the output's own buffer).
    pub fn write(&self, r: &Report, out: &mut Vec<u8>) {
        let mut o = Obj::open(out);
        self.ts(o.key("ts"), r.ts_ns);
        o.name("event", r.kind.name());
        self.who(&mut o, &r.who);
        o.num("cookie", r.cookie)
            .name("family", family_name(r.family))
            .addr("local", r.local)
            .addr("remote", r.remote);
        match r.container.as_deref() {
            Some(c) => container(o.obj("container"), c),
            None => {
                o.null("container");
            }
        }
        self.detail(&r.detail, &mut o);
        o.close();
    }

    /// `"pid"` to `"netns"`. They are the same for every report of one thread's sockets,
    /// which at a busy server is nearly every report: the last owner's text is kept and
    /// copied when the next report has the same owner.
    fn who(&self, o: &mut Obj<'_>, who: &Identity) {
        let mut last = self.who.borrow_mut();
        if let Some((id, text)) = &*last
            && id == who
        {
            o.out.extend_from_slice(text);
            return;
        }
        let at = o.out.len();
        o.num("pid", who.tgid)
            .num("tid", who.pid)
            .comm("comm", &who.comm)
            .comm("process", &who.process)
            .num("uid", who.uid)
            .num("cgroup", who.cgroup)
            .num("netns", who.netns);
        let written = &o.out[at..];
        match &mut *last {
            Some((id, text)) => {
                *id = *who;
                text.clear();
                text.extend_from_slice(written);
            }
            None => *last = Some((*who, written.to_vec())),
        }
    }

    /// RFC 3339 UTC with nanoseconds, quoted: `"2026-11-27T23:41:00.123456789Z"`.
    fn ts(&self, out: &mut Vec<u8>, boot_ns: u64) {
        let (secs, nanos) = write::split_ns(i128::from(boot_ns) + self.clock.0);
        out.push(b'"');
        match self.second.get() {
            Some((s, prefix)) if s == secs => {
                out.extend_from_slice(&prefix);
                out.push(b'.');
                digits(out, nanos, 9);
            }
            _ => {
                let t: OffsetDateTime = self.clock.wall(boot_ns);
                let at = out.len();
                digits(out, t.year().max(0) as u32, 4);
                out.push(b'-');
                digits(out, u8::from(t.month()) as u32, 2);
                out.push(b'-');
                digits(out, t.day() as u32, 2);
                out.push(b'T');
                digits(out, t.hour() as u32, 2);
                out.push(b':');
                digits(out, t.minute() as u32, 2);
                out.push(b':');
                digits(out, t.second() as u32, 2);
                // A time `time` cannot represent shows as the epoch: not cached.
                if i128::from(t.unix_timestamp()) == secs
                    && let Ok(prefix) = out[at..].try_into()
                {
                    self.second.set(Some((secs, prefix)));
                }
                out.push(b'.');
                digits(out, t.nanosecond(), 9);
            }
        }
        out.extend_from_slice(b"Z\"");
    }

    /// A kernel timestamp that may be "never" (0).
    fn ts_or_null(&self, o: &mut Obj<'_>, k: &str, boot_ns: u64) {
        match boot_ns {
            0 => {
                o.null(k);
            }
            t => self.ts(o.key(k), t),
        }
    }

    fn detail(&self, d: &Detail, o: &mut Obj<'_>) {
        match d {
            Detail::Opened { via, bytes } => {
                let via = match via {
                    Via::Connect => "connect",
                    Via::Send => "send",
                    Via::Recv => "recv",
                };
                o.name("via", via);
                match bytes {
                    Some(b) => o.num("bytes", *b),
                    None => o.null("bytes"),
                };
            }
            Detail::Established { reply_after_ns } => {
                o.num("reply_after_ms", ms(*reply_after_ns));
            }
            Detail::Unreachable(u) => {
                icmp(o.obj("icmp"), u);
                if u.verdict == crate::decode::Verdict::NoSocket {
                    owner(o, "last_owner", u.last_owner.as_ref());
                }
            }
            Detail::Silent { no_reply_ns, sends } => {
                o.name("scope", Scope::Flow.name())
                    .num("no_reply_ms", ms(*no_reply_ns))
                    .num("sends", *sends);
            }
            Detail::Resumed { after, quiet_ns } => {
                let after = match after {
                    Trouble::Silent => "silent",
                    Trouble::Unreachable => "unreachable",
                };
                o.name("scope", Scope::Flow.name())
                    .name("after", after)
                    .num("quiet_ms", ms(*quiet_ns));
            }
            Detail::PeerSilent {
                no_reply_ns,
                unanswered,
            } => {
                o.name("scope", Scope::Peer.name())
                    .num("no_reply_ms", ms(*no_reply_ns));
                self.unanswered(unanswered, o);
            }
            Detail::PeerResumed {
                quiet_ns,
                unanswered,
            } => {
                o.name("scope", Scope::Peer.name())
                    .name("after", "silent")
                    .num("quiet_ms", ms(*quiet_ns));
                self.unanswered(unanswered, o);
            }
            Detail::AppError {
                op,
                errno,
                after_unreachable_ns,
            } => {
                let op = match op {
                    Op::Send => "send",
                    Op::Recv => "recv",
                };
                o.name("op", op).str("errno", &errno_name(*errno));
                match after_unreachable_ns {
                    Some(t) => o.num("after_unreachable_ms", ms(*t)),
                    None => o.null("after_unreachable_ms"),
                };
            }
            Detail::Closed { reason, stats } => {
                o.name("reason", reason.name());
                self.stats(o.obj("stats"), stats);
            }
            Detail::Refused { last_owner } => owner(o, "last_owner", last_owner.as_ref()),
            Detail::SocketSummary(s) => {
                o.name("scope", Scope::Socket.name())
                    .num("interval_ms", ms(s.interval_ns))
                    .num("new_flows", s.new_flows)
                    .num("accepted", s.accepted)
                    .num("connected", s.connected)
                    .num("established", s.established)
                    .num("closed", s.closed)
                    .num("never_established", s.never_established)
                    .num("open", s.open);
                problems(o.obj("problems"), &s.problems);
                folded(o.obj("folded"), &s.folded);
            }
            Detail::PeerSummary(s) => {
                o.name("scope", Scope::Peer.name())
                    .num("interval_ms", ms(s.interval_ns));
                icmp(o.obj("icmp"), &s.icmp);
                let mut p = Problems::default();
                p.unreachable.add(s.icmp.verdict, s.unreachable);
                problems(o.obj("problems"), &p);
                let f = Folded {
                    unreachable: s.folded,
                    ..Folded::default()
                };
                folded(o.obj("folded"), &f);
            }
        }
    }

    fn unanswered(&self, u: &Unanswered, o: &mut Obj<'_>) {
        o.num("sends", u.sends)
            .num("flows", u.flows)
            .num("unanswered_ms", ms(u.for_ns));
        match u.last_answer_ns {
            Some(t) => self.ts(o.key("last_answer"), t),
            None => {
                o.null("last_answer");
            }
        }
        o.bool("never_answered", u.last_answer_ns.is_none());
    }

    fn stats(&self, mut o: Obj<'_>, s: &CloseStats) {
        o.num("duration_ms", ms(s.duration_ns))
            .num("tx_datagrams", s.tx_datagrams)
            .num("tx_bytes", s.tx_bytes)
            .num("rx_datagrams", s.rx_datagrams)
            .num("rx_bytes", s.rx_bytes);
        self.ts_or_null(&mut o, "last_tx", s.last_tx_ns);
        self.ts_or_null(&mut o, "last_rx", s.last_rx_ns);
        o.num("icmp_errors", s.icmp_errors)
            .num("app_errors", s.app_errors)
            .bool("preexisting", s.preexisting)
            .close();
    }
}

/// Nothing in `b` to escape, in JSON or on a terminal: printable ASCII without `"` and `\\`.
fn plain(b: &[u8]) -> bool {
    b.iter().all(|&c| plain_byte(c))
}

#[inline(always)]
fn plain_byte(c: u8) -> bool {
    (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\'
}

#[inline(always)]
fn quoted(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(b);
    out.push(b'"');
}

fn icmp(mut o: Obj<'_>, u: &UnreachableInfo) {
    o.num("type", u.ty)
        .num("code", u.code)
        .display("from", u.from)
        .opt_str("errno", u.errno.map(errno_name).as_deref());
    match u.fatal {
        Some(f) => o.bool("fatal", f),
        None => o.null("fatal"),
    };
    o.name("verdict", verdict_name(u.verdict)).close();
}

fn problems(mut o: Obj<'_>, p: &Problems) {
    let u = &p.unreachable;
    o.obj("unreachable")
        .num("notified", u.notified)
        .num("queued", u.queued)
        .num("discarded", u.discarded)
        .num("no_socket", u.no_socket)
        .close();
    o.num("silent", p.silent)
        .num("app_error", p.app_error)
        .close();
}

fn folded(mut o: Obj<'_>, f: &Folded) {
    o.num("unreachable", f.unreachable)
        .num("silent", f.silent)
        .num("app_error", f.app_error)
        .num("resumed", f.resumed)
        .close();
}

fn owner(o: &mut Obj<'_>, k: &str, who: Option<&Identity>) {
    match who {
        Some(w) if w.is_known() => {
            o.obj(k)
                .num("pid", w.tgid)
                .comm("comm", &w.comm)
                .comm("process", &w.process)
                .num("uid", w.uid)
                .close();
        }
        _ => {
            o.null(k);
        }
    }
}

fn container(mut o: Obj<'_>, c: &Container) {
    o.str("id", &c.id)
        .opt_str("runtime", c.runtime.map(|r| r.name()))
        .opt_str("name", c.name.as_deref())
        .opt_str("pod", c.pod.as_deref())
        .opt_str("namespace", c.namespace.as_deref())
        .opt_str("pod_uid", c.pod_uid.as_deref())
        .close();
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn addresses_and_stamps_as_display_and_time_write_them() {
        // Quoted; the digits themselves are `write.rs`'s (tested there).
        for a in ["10.0.20.3:53", "[fd00::1]:54321"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            Obj::open(&mut out).addr("a", a).close();
            assert_eq!(String::from_utf8(out).unwrap(), format!(r#"{{"a":"{a}"}}"#));
        }
        // Names: the plain ones copied, the others escaped as serde_json (and DEL) would.
        for raw in [
            &b""[..],
            b"a",
            b"exactly15bytes!",
            b"longer than fifteen bytes",
            b"say \"hi\"",
            b"back\\slash",
            b"\x1b[31mred\n",
            b"del\x7f",
            b"bad\xffutf8",
        ] {
            let name = Name::from_bytes(raw);
            let mut out = Vec::new();
            Obj::open(&mut out).comm("c", &name).close();
            let mut want = Vec::new();
            Obj::open(&mut want).str("c", &name.to_str()).close();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        let mut out = Vec::new();
        Obj::open(&mut out)
            .comm("c", &Name::from_bytes(b"a\"b\x7f"))
            .close();
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"c":"a\"b\u007f"}"#);
        let j = JsonFormat::new(ClockOffset(0));
        // In order, so that the cached second is used and left: within one second, across
        // one, and far apart.
        for ns in [
            0,
            1,
            999_999_999,
            1_000_000_000,
            1_764_979_200_123_456_789,
            1_764_979_200_999_999_999,
            1_764_979_201_000_000_000,
            4_102_444_799_999_999_999,
        ] {
            let mut out = Vec::new();
            j.ts(&mut out, ns);
            let want = ClockOffset(0)
                .wall(ns)
                .format(time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
                ))
                .unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{want}\""));
        }
    }
}
