//! Which reports to print: the filters the command line describes (`--pid`, `--comm`,
//! `--port`, `--peer`, `--netns`, `--cgroup`, `--container`, `--pod`, `-4`/`-6`, `--events`).
use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use crate::{
    cli::Cli,
    container::Container,
    decode::Family,
    engine::{Report, ReportKind},
    identity::Name,
};

/// A `--peer` value: an address prefix and an optional port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub net: IpAddr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cidr, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or("missing ']' after a bracketed address")?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("expected ':PORT' after ']'")?),
            };
            (inner, port)
        } else if s.matches(':').count() >= 2 {
            // An IPv6 address; a port needs brackets.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((a, p)) => (a, Some(p)),
                None => (s, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| format!("invalid port '{p}'")))
            .transpose()?;
        let (addr, prefix) = match cidr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (cidr, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("invalid IP address '{addr}'"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("invalid prefix length '/{p}' (0 to {max})")),
            },
        };
        Ok(Self { net, prefix, port })
    }
}

impl Peer {
    pub fn matches(&self, a: &SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != a.port()) {
            return false;
        }
        // A dual-stack socket talking to an IPv4 peer sees it as ::ffff:a.b.c.d.
        let ip = match a.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let same_prefix = |a: u128, b: u128, bits: u8| {
            let shift = u32::from(bits - self.prefix);
            self.prefix == 0 || (a ^ b) >> shift == 0
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(x)) => {
                same_prefix(u32::from(n).into(), u32::from(x).into(), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(x)) => same_prefix(n.into(), x.into(), 128),
            _ => false,
        }
    }
}

/// The characters Docker and Podman allow in a container name; ids are hex, a subset.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// A `--container` value: the full id, a prefix of it of at least 12 hex digits (what
/// `docker ps` and `podman ps` show), or the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSel(String);

/// Shorter hex prefixes are too likely to name several containers.
const MIN_ID_PREFIX: usize = 12;

impl FromStr for ContainerSel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(
                "expected a container id, an id prefix of 12 or more hex digits, or a name".into(),
            );
        }
        if let Some(c) = s.chars().find(|c| !name_char(*c)) {
            return Err(format!(
                "'{}' cannot be in a container id or name (letters, digits, '_', '.', '-')",
                c.escape_default()
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl ContainerSel {
    pub fn matches(&self, c: &Container) -> bool {
        let s = &self.0;
        let hex = s.len() >= MIN_ID_PREFIX && s.chars().all(|c| c.is_ascii_hexdigit());
        c.name.as_deref() == Some(s) || (hex && c.id.starts_with(&s.to_ascii_lowercase()))
    }
}

/// A `--pod` value: `NAME` or `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSel {
    pub namespace: Option<String>,
    pub name: String,
}

impl FromStr for PodSel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Kubernetes names: lower-case DNS names (RFC 1123), a namespace without dots.
        let valid = |n: &str, dots: bool| {
            !n.is_empty()
                && n.len() <= 253
                && n.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.')
                })
                && !n.starts_with(['-', '.'])
                && !n.ends_with(['-', '.'])
        };
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, s),
        };
        if namespace.is_some_and(|ns| !valid(ns, false)) || !valid(name, true) {
            return Err(
                "expected a Kubernetes pod name, or NAMESPACE/NAME (lower-case letters, digits, '-', '.')"
                    .into(),
            );
        }
        Ok(Self {
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        })
    }
}

impl PodSel {
    pub fn matches(&self, c: &Container) -> bool {
        c.pod.as_deref() == Some(&*self.name)
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| c.namespace.as_ref() == Some(ns))
    }
}

/// Which reports to print: `None` (no flag) passes every report without a look at it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter(Option<Rules>);

/// The filter's flags. Empty lists mean "no constraint".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rules {
    pids: Vec<u32>,
    comms: Vec<Name>,
    ports: Vec<u16>,
    peers: Vec<Peer>,
    netns: Vec<u32>,
    cgroups: Vec<u64>,
    containers: Vec<ContainerSel>,
    pods: Vec<PodSel>,
    family: Option<Family>,
    events: Vec<ReportKind>,
}

impl From<&Cli> for Filter {
    fn from(cli: &Cli) -> Self {
        // Cut as the kernel cuts a name, to its first 15 bytes.
        let comms = cli.comm.iter().map(|c| Name::new(c)).collect();
        let family = match (cli.ipv4, cli.ipv6) {
            (true, false) => Some(Family::V4),
            (false, true) => Some(Family::V6),
            _ => None,
        };
        let rules = Rules {
            pids: cli.pid.clone(),
            comms,
            ports: cli.port.clone(),
            peers: cli.peer.clone(),
            netns: cli.netns.clone(),
            cgroups: cli.cgroup.clone(),
            containers: cli.container.clone(),
            pods: cli.pod.clone(),
            family,
            events: cli.events.clone(),
        };
        Self((rules != Rules::default()).then_some(rules))
    }
}

fn any_of<T>(allowed: &[T], is: impl FnMut(&T) -> bool) -> bool {
    allowed.is_empty() || allowed.iter().any(is)
}

impl Filter {
    pub fn matches(&self, r: &Report) -> bool {
        self.0.as_ref().is_none_or(|rules| rules.matches(r))
    }
}

impl Rules {
    fn matches(&self, r: &Report) -> bool {
        // REFUSED and ICMP errors for closed sockets have no process of their own; the
        // process and cgroup filters apply to the last owner they name (and the container
        // ones to its container, which the report carries).
        let owner = r.last_owner();
        any_of(&self.events, |k| *k == r.kind)
            && self.family.is_none_or(|f| f == r.family)
            && any_of(&self.pids, |p| {
                *p == r.who.tgid || owner.is_some_and(|o| o.tgid == *p)
            })
            // The thread's name or the process's: `--comm dig` finds dig's `isc-net-0000`.
            && any_of(&self.comms, |c| {
                r.who.comm == *c
                    || r.who.process == *c
                    || owner.is_some_and(|o| o.comm == *c || o.process == *c)
            })
            && any_of(&self.ports, |p| {
                *p == r.local.port() || *p == r.remote.port()
            })
            && any_of(&self.peers, |p| p.matches(&r.remote))
            && any_of(&self.netns, |n| *n == r.who.netns)
            && any_of(&self.cgroups, |c| {
                *c == r.who.cgroup || owner.is_some_and(|o| o.cgroup == *c)
            })
            && any_of(&self.containers, |s| {
                r.container.as_deref().is_some_and(|c| s.matches(c))
            })
            && any_of(&self.pods, |p| {
                r.container.as_deref().is_some_and(|c| p.matches(c))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::tests::ok,
        engine::{Detail, Identity, Via},
    };

    fn peer(s: &str) -> Peer {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn peers_parse() {
        let v4: IpAddr = "10.0.0.2".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        for (s, net, prefix, port) in [
            ("10.0.0.2", v4, 32, None),
            ("10.0.0.2:53", v4, 32, Some(53)),
            ("10.0.0.2/8", v4, 8, None),
            ("10.0.0.2/8:53", v4, 8, Some(53)),
            ("fd00::1", v6, 128, None),
            ("fd00::1/64", v6, 64, None),
            ("[fd00::1]", v6, 128, None),
            ("[fd00::1]:53", v6, 128, Some(53)),
            ("[fd00::1/64]:53", v6, 64, Some(53)),
        ] {
            assert_eq!(peer(s), Peer { net, prefix, port }, "{s}");
        }
    }

    #[test]
    fn peer_matching() {
        let p = peer("10.0.0.0/8");
        assert!(p.matches(&sa("10.200.0.2:1")));
        assert!(!p.matches(&sa("11.0.0.1:1")));
        assert!(!p.matches(&sa("[fd00::1]:1")));
        assert!(p.matches(&sa("[::ffff:10.1.2.3]:1")), "v4-mapped");
        assert!(peer("0.0.0.0/0").matches(&sa("1.2.3.4:5")));
        assert!(!peer("0.0.0.0/0").matches(&sa("[::1]:5")));
        assert!(peer("10.0.0.2").matches(&sa("10.0.0.2:9")));
        assert!(!peer("10.0.0.2").matches(&sa("10.0.0.3:9")));
        let p = peer("10.0.0.0/8:53");
        assert!(p.matches(&sa("10.9.9.9:53")));
        assert!(!p.matches(&sa("10.9.9.9:54")));
        let p = peer("[fd00::/64]:443");
        assert!(p.matches(&sa("[fd00::abcd]:443")));
        assert!(p.matches(&sa("[fd00:0:0:0:ffff::1]:443")));
        assert!(!p.matches(&sa("[fd00:0:0:1::1]:443")));
        assert!(!p.matches(&sa("[fd00::abcd]:80")));
        assert!(!p.matches(&sa("10.0.0.1:443")));
        assert!(peer("::/0").matches(&sa("[2001:db8::1]:1")));
        assert!(peer("fd00::/7").matches(&sa("[fdff::1]:1")));
        assert!(!peer("fd00::/8").matches(&sa("[fc00::1]:1")));
    }

    fn report(kind: ReportKind) -> Report {
        Report {
            kind,
            ts_ns: 0,
            cookie: 1,
            family: Family::V4,
            local: sa("10.0.0.1:53"),
            remote: sa("10.0.0.2:40000"),
            detail: Detail::Opened {
                via: Via::Recv,
                bytes: Some(1),
            },
            container: None,
            who: Identity {
                pid: 11,
                tgid: 10,
                comm: "dnsmasq".into(),
                process: "dnsmasq".into(),
                uid: 0,
                cgroup: 25,
                netns: 4026531833,
            },
        }
    }

    fn filter(args: &[&str]) -> Filter {
        Filter::from(&ok(args))
    }

    #[test]
    fn no_flags_no_constraint() {
        assert_eq!(filter(&[]), Filter::default());
    }

    #[test]
    fn filter_matching() {
        let r = report(ReportKind::Accept);
        let yes = |args: &[&str]| assert!(filter(args).matches(&r), "{args:?}");
        let no = |args: &[&str]| assert!(!filter(args).matches(&r), "{args:?}");
        yes(&[]);
        yes(&["--pid", "1,10"]);
        no(&["--pid", "11"]);
        yes(&["--comm", "dnsmasq"]);
        no(&["--comm", "dns"]);
        yes(&["--port", "53"]);
        yes(&["--port", "40000"]);
        no(&["--port", "54"]);
        yes(&["--peer", "10.0.0.0/24"]);
        yes(&["--peer", "10.0.0.2:40000"]);
        no(&["--peer", "10.0.0.2:53"]);
        no(&["--peer", "10.0.0.1"]);
        yes(&["--peer", "192.168.0.0/16", "--peer", "10.0.0.2"]);
        yes(&["--netns", "4026531833"]);
        no(&["--netns", "1"]);
        yes(&["--cgroup", "25"]);
        no(&["--cgroup", "26"]);
        yes(&["-4"]);
        no(&["-6"]);
        yes(&["--events", "accept,close"]);
        no(&["--events", "connect"]);
        yes(&["--pid", "10", "--port", "53", "--events", "accept"]);
        no(&["--pid", "10", "--port", "54"]);
    }

    const ID: &str = "b5f1cf47c8456f6bb60a712d6626615cf3717f91fa1efe47deb111363830450a";

    fn in_container(name: &str, pod: Option<(&str, &str)>) -> Report {
        Report {
            container: Some(std::sync::Arc::new(Container {
                id: ID.into(),
                runtime: None,
                name: Some(name.into()),
                pod: pod.map(|p| p.1.into()),
                namespace: pod.map(|p| p.0.into()),
                pod_uid: None,
            })),
            ..report(ReportKind::Accept)
        }
    }

    #[test]
    fn container_and_pod_filters() {
        let podman = in_container("udpmon-test", None);
        let k8s = in_container("coredns", Some(("kube-system", "coredns-5d78c9869d-abcde")));
        let host = report(ReportKind::Accept);
        let yes = |args: &[&str], r: &Report| assert!(filter(args).matches(r), "{args:?}");
        let no = |args: &[&str], r: &Report| assert!(!filter(args).matches(r), "{args:?}");
        for by in [
            ID,
            &ID[..12],
            &ID[..20],
            &ID.to_uppercase()[..12],
            "udpmon-test",
        ] {
            yes(&["--container", by], &podman);
            no(&["--container", by], &host);
        }
        // Too short a prefix, another id, another name, a prefix of the name.
        for other in [&ID[..11], &ID[1..13], "udpmon", "coredns"] {
            no(&["--container", other], &podman);
        }
        yes(
            &["--container", "nope", "--container", "udpmon-test"],
            &podman,
        );
        yes(&["--container", "coredns"], &k8s);
        yes(&["--pod", "coredns-5d78c9869d-abcde"], &k8s);
        yes(&["--pod", "kube-system/coredns-5d78c9869d-abcde"], &k8s);
        no(&["--pod", "default/coredns-5d78c9869d-abcde"], &k8s);
        no(&["--pod", "coredns"], &k8s);
        no(&["--pod", "coredns-5d78c9869d-abcde"], &podman);
        no(&["--pod", "coredns-5d78c9869d-abcde"], &host);
        yes(
            &[
                "--container",
                "coredns",
                "--pod",
                "coredns-5d78c9869d-abcde",
            ],
            &k8s,
        );
        no(
            &[
                "--container",
                "udpmon-test",
                "--pod",
                "coredns-5d78c9869d-abcde",
            ],
            &k8s,
        );
    }

    #[test]
    fn comm_filters_compare_what_the_kernel_keeps() {
        let r = Report {
            who: Identity {
                comm: "systemd-resolve".into(),
                process: "systemd-resolve".into(),
                ..report(ReportKind::Accept).who
            },
            ..report(ReportKind::Accept)
        };
        assert!(filter(&["--comm", "systemd-resolved"]).matches(&r));
        assert!(filter(&["--comm", "systemd-resolve"]).matches(&r));
        assert!(!filter(&["--comm", "systemd"]).matches(&r));
    }

    /// Issue 12: dig sends from its thread `isc-net-0000`; `--comm dig` finds it by the
    /// process's name, `--comm isc-net-0000` by the thread's.
    #[test]
    fn comm_filters_match_the_thread_or_the_process() {
        let r = Report {
            who: Identity {
                comm: "isc-net-0000".into(),
                process: "dig".into(),
                ..report(ReportKind::Connect).who
            },
            ..report(ReportKind::Connect)
        };
        assert!(filter(&["--comm", "dig"]).matches(&r));
        assert!(filter(&["--comm", "isc-net-0000"]).matches(&r));
        assert!(!filter(&["--comm", "dnsmasq"]).matches(&r));
        let refused = Report {
            detail: Detail::Refused {
                last_owner: Some(Identity {
                    tgid: 123,
                    comm: "isc-net-0000".into(),
                    process: "dig".into(),
                    ..Identity::default()
                }),
            },
            who: Identity {
                tgid: 0,
                comm: Name::EMPTY,
                process: Name::EMPTY,
                ..report(ReportKind::Refused).who
            },
            ..report(ReportKind::Refused)
        };
        assert!(filter(&["--comm", "dig"]).matches(&refused));
    }

    #[test]
    fn filter_matches_v6_peers_and_family() {
        let r = Report {
            family: Family::V6,
            local: sa("[fd00::1]:5000"),
            remote: sa("[fd00:200::2]:7000"),
            ..report(ReportKind::Connect)
        };
        assert!(filter(&["-6", "--peer", "fd00:200::/32"]).matches(&r));
        assert!(filter(&["--peer", "[fd00:200::/32]:7000"]).matches(&r));
        assert!(!filter(&["--peer", "[fd00:200::/32]:7001"]).matches(&r));
        assert!(!filter(&["--peer", "fd00:300::/32"]).matches(&r));
        assert!(!filter(&["-4"]).matches(&r));
    }

    #[test]
    fn process_filters_follow_the_last_owner_of_a_closed_port() {
        let r = Report {
            detail: Detail::Refused {
                last_owner: Some(Identity {
                    tgid: 123,
                    comm: "nc".into(),
                    cgroup: 77,
                    ..Identity::default()
                }),
            },
            who: Identity {
                tgid: 0,
                pid: 0,
                comm: Name::EMPTY,
                process: Name::EMPTY,
                cgroup: 0,
                ..report(ReportKind::Refused).who
            },
            ..report(ReportKind::Refused)
        };
        assert!(filter(&["--pid", "123"]).matches(&r));
        assert!(filter(&["--comm", "nc"]).matches(&r));
        assert!(filter(&["--cgroup", "77"]).matches(&r));
        assert!(!filter(&["--pid", "10"]).matches(&r));
        assert!(!filter(&["--comm", "dnsmasq"]).matches(&r));
        assert!(!filter(&["--cgroup", "78"]).matches(&r));
    }
}
