//! One JSON object per line. The schema is stable; keys are only ever added.
//!
//! Every line has:
//! - `ts`: wall-clock time, RFC 3339 UTC with nanoseconds (`2026-11-27T23:41:00.123456789Z`)
//! - `event`: `connect`, `accept`, `establish`, `unreachable`, `silent`, `resumed`,
//!   `app-error`, `close` or `refused`
//! - `pid` (process id), `tid` (thread id), `comm` (the thread's name), `process` (the
//!   process's name, its main thread's), `uid`, `cgroup` (v2 id), `netns` (inode),
//!   `cookie` (socket cookie): 0 / "" when unknown or when no socket is involved
//! - `family`: `ipv4` or `ipv6`; `local`, `remote`: `addr:port`, IPv6 as `[addr]:port`
//! - `container`: null outside containers, else {`id` (the runtime's full id, 64 hex
//!   digits), `runtime` (`docker`, `containerd`, `cri-o`, `podman`, or null when the cgroup
//!   layout does not say and no runtime's state names the id), `name`, `pod`, `namespace`,
//!   `pod_uid` (Kubernetes; each null when unknown)}
//!
//! and, by event:
//! - connect, accept: `via` (`connect`, `send`, `recv`), `bytes` (first datagram's payload;
//!   null for connect())
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
use std::fmt::Write as _;

use serde_json::{Map, Value, json};
use time::macros::format_description;

use super::{ClockOffset, family_name, ms, verdict_name};
use crate::{
    container::Container,
    engine::{
        CloseStats, Detail, Op, Owner, Report, Scope, Trouble, Unanswered, UnreachableInfo, Via,
        rules::errno_name,
    },
};

pub struct JsonFormat {
    clock: ClockOffset,
}

/// `v` as JSON that is also safe on a terminal: JSON itself requires escaping only C0
/// control characters, so DEL and the C1 controls (U+0080..U+009F, which some terminals obey
/// as escape sequences) are escaped too. They can only come from process names.
fn to_json(v: &(impl serde::Serialize + ?Sized)) -> String {
    let mut buf = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, TerminalSafe);
    if v.serialize(&mut ser).is_err() {
        return "null".into();
    }
    // serde_json writes UTF-8 only.
    String::from_utf8(buf).unwrap_or_else(|_| "null".into())
}

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

impl JsonFormat {
    pub fn new(clock: ClockOffset) -> Self {
        Self { clock }
    }

    /// The wall clock was stepped (or drifted): the new boot-to-wall offset.
    pub fn set_clock(&mut self, clock: ClockOffset) {
        self.clock = clock;
    }

    pub fn format(&self, r: &Report) -> String {
        // The fields every line has are written directly: building them as a
        // `serde_json::Value` map first cost an allocation or two per field, on the path
        // that must keep up with bursts of new flows. Addresses and names need no escaping;
        // `comm` (any bytes) goes through serde_json.
        let mut out = String::with_capacity(384);
        let comm = to_json(&r.comm);
        let process = to_json(&r.process);
        let _ = write!(
            out,
            r#"{{"ts":"{}","event":"{}","pid":{},"tid":{},"comm":{comm},"process":{process},"uid":{},"cgroup":{},"netns":{},"cookie":{},"family":"{}","local":"{}","remote":"{}""#,
            self.ts(r.ts_ns),
            r.kind.name(),
            r.tgid,
            r.pid,
            r.uid,
            r.cgroup,
            r.netns,
            r.cookie,
            family_name(r.family),
            r.local,
            r.remote,
        );
        let _ = write!(out, r#","container":{}"#, container(r.container.as_deref()));
        let mut m = Map::new();
        self.detail(&r.detail, &mut m);
        for (k, v) in &m {
            let _ = write!(out, ",{}:{}", to_json(k), to_json(v));
        }
        out.push('}');
        out
    }

    fn ts(&self, boot_ns: u64) -> String {
        self.clock
            .wall(boot_ns)
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
            ))
            .unwrap_or_default()
    }

    /// A kernel timestamp that may be "never" (0).
    fn ts_or_null(&self, boot_ns: u64) -> Value {
        match boot_ns {
            0 => Value::Null,
            t => self.ts(t).into(),
        }
    }

    fn detail(&self, d: &Detail, m: &mut Map<String, Value>) {
        let mut put = |k: &str, v: Value| {
            m.insert(k.into(), v);
        };
        match d {
            Detail::Opened { via, bytes } => {
                let via = match via {
                    Via::Connect => "connect",
                    Via::Send => "send",
                    Via::Recv => "recv",
                };
                put("via", via.into());
                put("bytes", (*bytes).into());
            }
            Detail::Established { reply_after_ns } => {
                put("reply_after_ms", ms(*reply_after_ns).into());
            }
            Detail::Unreachable(u) => {
                put("icmp", icmp(u));
                if u.verdict == crate::decode::Verdict::NoSocket {
                    put("last_owner", owner(u.last_owner.as_ref()));
                }
            }
            Detail::Silent { no_reply_ns, sends } => {
                put("scope", Scope::Flow.name().into());
                put("no_reply_ms", ms(*no_reply_ns).into());
                put("sends", (*sends).into());
            }
            Detail::Resumed { after, quiet_ns } => {
                let after = match after {
                    Trouble::Silent => "silent",
                    Trouble::Unreachable => "unreachable",
                };
                put("scope", Scope::Flow.name().into());
                put("after", after.into());
                put("quiet_ms", ms(*quiet_ns).into());
            }
            Detail::PeerSilent {
                no_reply_ns,
                unanswered,
            } => {
                put("scope", Scope::Peer.name().into());
                put("no_reply_ms", ms(*no_reply_ns).into());
                self.unanswered(unanswered, &mut put);
            }
            Detail::PeerResumed {
                quiet_ns,
                unanswered,
            } => {
                put("scope", Scope::Peer.name().into());
                put("after", "silent".into());
                put("quiet_ms", ms(*quiet_ns).into());
                self.unanswered(unanswered, &mut put);
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
                put("op", op.into());
                put("errno", errno_name(*errno).into());
                put("after_unreachable_ms", after_unreachable_ns.map(ms).into());
            }
            Detail::Closed { reason, stats } => {
                put("reason", reason.name().into());
                put("stats", self.stats(stats));
            }
            Detail::Refused { last_owner } => put("last_owner", owner(last_owner.as_ref())),
        }
    }

    fn unanswered(&self, u: &Unanswered, put: &mut impl FnMut(&str, Value)) {
        put("sends", u.sends.into());
        put("flows", u.flows.into());
        put("unanswered_ms", ms(u.for_ns).into());
        put(
            "last_answer",
            u.last_answer_ns.map_or(Value::Null, |t| self.ts(t).into()),
        );
        put("never_answered", u.last_answer_ns.is_none().into());
    }

    fn stats(&self, s: &CloseStats) -> Value {
        json!({
            "duration_ms": ms(s.duration_ns),
            "tx_datagrams": s.tx_datagrams,
            "tx_bytes": s.tx_bytes,
            "rx_datagrams": s.rx_datagrams,
            "rx_bytes": s.rx_bytes,
            "last_tx": self.ts_or_null(s.last_tx_ns),
            "last_rx": self.ts_or_null(s.last_rx_ns),
            "icmp_errors": s.icmp_errors,
            "app_errors": s.app_errors,
            "preexisting": s.preexisting,
        })
    }
}

fn icmp(u: &UnreachableInfo) -> Value {
    json!({
        "type": u.ty,
        "code": u.code,
        "from": u.from.to_string(),
        "errno": u.errno.map(errno_name),
        "fatal": u.fatal,
        "verdict": verdict_name(u.verdict),
    })
}

fn owner(o: Option<&Owner>) -> Value {
    match o {
        Some(o) if o.is_known() => {
            json!({ "pid": o.tgid, "comm": o.comm, "process": o.process, "uid": o.uid })
        }
        _ => Value::Null,
    }
}

fn container(c: Option<&Container>) -> String {
    match c {
        None => "null".into(),
        Some(c) => to_json(&json!({
            "id": c.id,
            "runtime": c.runtime.map(|r| r.name()),
            "name": c.name,
            "pod": c.pod,
            "namespace": c.namespace,
            "pod_uid": c.pod_uid,
        })),
    }
}
