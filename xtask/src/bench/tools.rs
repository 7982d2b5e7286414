//! The processes under test: udpmon itself and the bpftrace peer baseline.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A running udpmon, its stderr collected line by line.
pub struct Udpmon {
    child: Child,
    pub spawned: Instant,
    ready: mpsc::Receiver<Instant>,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

pub const READY_LINE: &str = "udpmon: watching UDP sockets";

impl Udpmon {
    pub fn spawn(bin: &Path, hooks: &str, output: &Path) -> anyhow::Result<Self> {
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .args(["--format", "json", "--hooks", hooks, "--output"])
            .arg(output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let err = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, ready) = mpsc::channel();
        let lines = stderr.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let at = Instant::now();
                let ready = line.starts_with(READY_LINE);
                // Stored before the signal, so whoever waited for it finds the line.
                lines.lock().expect("stderr lock").push(line);
                if ready {
                    let _ = tx.send(at);
                }
            }
        });
        Ok(Self {
            child,
            spawned,
            ready,
            stderr,
            reader: Some(reader),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything udpmon printed on stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// The "watching UDP sockets (hooks: ...)" line, once printed.
    pub fn ready_line(&self) -> Option<String> {
        self.stderr
            .lock()
            .expect("stderr lock")
            .iter()
            .find(|l| l.starts_with(READY_LINE))
            .cloned()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }

    /// Waits for the "watching" line; returns when it was printed.
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<Instant> {
        match self.ready.recv_timeout(limit) {
            Ok(at) => Ok(at),
            Err(_) => {
                let status = self.child.try_wait()?;
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "udpmon did not attach within {limit:?} (exit: {status:?}); stderr:\n{}",
                    self.stderr_text()
                )
            }
        }
    }

    /// utime + stime so far, in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        proc_cpu_secs(self.pid())
    }

    /// A field of /proc/PID/status in bytes (VmHWM, VmRSS).
    pub fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no {field} in /proc/{}/status", self.pid()))
    }

    /// SIGTERM, wait for a clean exit, and return the counters of its exit summary.
    pub fn stop(mut self) -> anyhow::Result<HashMap<String, u64>> {
        signal(self.pid(), libc::SIGTERM);
        let status = wait_bounded(&mut self.child, Duration::from_secs(30))?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let text = self.stderr_text();
        if !status.success() {
            bail!("udpmon exited with {status}; stderr:\n{text}");
        }
        let line = text
            .lines()
            .find(|l| l.starts_with("udpmon: stopped;"))
            .with_context(|| format!("no exit summary on udpmon's stderr:\n{text}"))?;
        Ok(parse_summary(line))
    }
}

impl Drop for Udpmon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// "udpmon: stopped; events read 15, ring-buffer drops 0, ..." -> {"events read": 15, ...}.
pub fn parse_summary(line: &str) -> HashMap<String, u64> {
    let body = line.split_once(';').map_or(line, |(_, b)| b);
    body.split(',')
        .filter_map(|part| {
            let (name, n) = part.trim().rsplit_once(' ')?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .collect()
}

pub fn proc_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: signalling our own child by its id.
        unsafe { libc::kill(pid, sig) };
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not exit within {limit:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The bpftrace peer baseline: per-datagram accounting of datagrams and bytes per socket and
/// peer on the tracepoints bpftrace 0.17 can use here. Egress at `net:net_dev_queue`, keyed
/// by (socket, destination address, destination port); ingress at `net:netif_receive_skb`,
/// where no socket is known yet, keyed by the 4-tuple. Both parse the IPv4 and UDP headers
/// from the skb and update two hash maps (count, bytes), like udpmon's cgroup_skb egress and
/// ingress programs update one flow entry.
pub const BPFTRACE_SCRIPT: &str = r#"
tracepoint:net:net_dev_queue
{
  $skb = (struct sk_buff *)args->skbaddr;
  $ip = (struct iphdr *)($skb->head + $skb->network_header);
  if ($skb->protocol == 0x0008 && $ip->protocol == 17) {
    $udp = (struct udphdr *)($skb->head + $skb->transport_header);
    @tx[$skb->sk, $ip->daddr, $udp->dest] = count();
    @tx_bytes[$skb->sk, $ip->daddr, $udp->dest] = sum($skb->len);
  }
}
tracepoint:net:netif_receive_skb
{
  $skb = (struct sk_buff *)args->skbaddr;
  $ip = (struct iphdr *)$skb->data;
  if ($skb->protocol == 0x0008 && $ip->protocol == 17) {
    $udp = (struct udphdr *)($skb->data + $ip->ihl * 4);
    @rx[$ip->saddr, $udp->source, $ip->daddr, $udp->dest] = count();
    @rx_bytes[$ip->saddr, $udp->source, $ip->daddr, $udp->dest] = sum($skb->len);
  }
}
interval:ms:100 /@ready == 0/ { @ready = 1; printf("udpmon-bench: ready\n"); }
END { clear(@ready); clear(@tx); clear(@tx_bytes); clear(@rx); clear(@rx_bytes); }
"#;

pub struct Bpftrace {
    child: Child,
    reader: Option<thread::JoinHandle<()>>,
    output: Arc<Mutex<Vec<String>>>,
}

impl Bpftrace {
    /// Starts the script and waits until its probes are attached (its first printf is read
    /// only once bpftrace has attached every probe and entered its event loop).
    pub fn start(script_path: &Path) -> anyhow::Result<Self> {
        ensure_tracefs()?;
        std::fs::write(script_path, BPFTRACE_SCRIPT)?;
        let mut child = Command::new("bpftrace")
            .arg(script_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning bpftrace")?;
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, ready) = mpsc::channel();
        let lines = output.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("udpmon-bench: ready") {
                    let _ = tx.send(());
                }
                lines.lock().expect("bpftrace lock").push(line);
            }
        });
        let err_lines = output.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                err_lines.lock().expect("bpftrace lock").push(line);
            }
        });
        let mut me = Self {
            child,
            reader: Some(reader),
            output,
        };
        if ready.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = me.child.kill();
            let _ = me.child.wait();
            bail!(
                "bpftrace did not attach within 60 s:\n{}",
                me.output.lock().expect("bpftrace lock").join("\n")
            );
        }
        Ok(me)
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        signal(self.child.id(), libc::SIGINT);
        let status = wait_bounded(&mut self.child, Duration::from_secs(30))?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if !status.success() {
            bail!(
                "bpftrace exited with {status}:\n{}",
                self.output.lock().expect("bpftrace lock").join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// bpftrace reads tracepoint formats from tracefs, which this machine does not mount.
fn ensure_tracefs() -> anyhow::Result<()> {
    let dir = PathBuf::from("/sys/kernel/tracing");
    if dir.join("events").exists() {
        return Ok(());
    }
    crate::util::run(
        Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(&dir),
    )
    .context("mounting tracefs for bpftrace")
}

/// The ids of the BPF objects (`map_id` or `prog_id`) that process `pid` holds fds of.
fn bpf_ids(pid: u32, kind: &str) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(':'))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    Ok(ids)
}

fn bpftool_show(what: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {what} show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Run counts and run time of the programs process `pid` holds (kernel.bpf_stats_enabled
/// must be on): (name, runs, total ns), busiest first.
pub fn prog_stats(pid: u32) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let ids = bpf_ids(pid, "prog_id")?;
    let mut v: Vec<(String, u64, u64)> = bpftool_show("prog")?
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                p["run_cnt"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            )
        })
        .filter(|(_, runs, _)| *runs > 0)
        .collect();
    v.sort_by_key(|(_, _, ns)| std::cmp::Reverse(*ns));
    Ok(v)
}

/// The kernel FLOWS map of process `pid` (its map ids come from the fdinfo of its fds) as
/// bpftool shows it: (key bytes, value bytes, max entries, memlock bytes).
pub fn flows_map(pid: u32) -> anyhow::Result<(u64, u64, u64, u64)> {
    let ids = bpf_ids(pid, "map_id")?;
    let maps = bpftool_show("map")?;
    let m = maps
        .iter()
        .find(|m| m["name"] == "FLOWS" && m["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .with_context(|| format!("process {pid} holds no map named FLOWS"))?;
    let n = |k: &str| {
        m[k].as_u64()
            .with_context(|| format!("FLOWS map has no {k}"))
    };
    Ok((
        n("bytes_key")?,
        n("bytes_value")?,
        n("max_entries")?,
        n("bytes_memlock")?,
    ))
}
