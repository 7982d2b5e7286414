//! A udpmon (or a wrapper running it) as a child of a test tier: its output read line by line
//! on threads, its "attached" line waited for, and its exit after a signal.
use std::{
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// What udpmon prints on standard error once its programs are attached.
pub const READY: &str = "watching UDP sockets";

pub struct Running {
    child: Child,
    /// Signals go to the child's process group (strace and the udpmon it traces).
    group: bool,
    out: Option<mpsc::Receiver<String>>,
    err: mpsc::Receiver<String>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// Lines from a child's stream, read on a thread (which ends at EOF, after the exit).
fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    /// Spawns `cmd` with standard error read; standard output too with `stdout`, else
    /// discarded. `group`: in a process group of its own, which signals then reach whole.
    pub fn spawn(cmd: &mut Command, group: bool, stdout: bool) -> anyhow::Result<Running> {
        if group {
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let out = child.stdout.take().map(lines);
        let err = lines(child.stderr.take().expect("piped"));
        Ok(Running {
            child,
            group,
            out,
            err,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }

    /// Takes what has arrived, waiting up to `wait` for a line of standard output (or of
    /// standard error, when standard output is not read).
    pub fn poll(&mut self, wait: Duration) {
        self.stderr.extend(self.err.try_iter());
        let first = match &self.out {
            Some(out) => out.recv_timeout(wait).ok().map(|l| self.stdout.push(l)),
            None => self
                .err
                .recv_timeout(wait)
                .ok()
                .map(|l| self.stderr.push(l)),
        };
        if first.is_some()
            && let Some(out) = &self.out
        {
            self.stdout.extend(out.try_iter());
        }
    }

    /// Waits for udpmon's "watching UDP sockets" line.
    pub fn ready(&mut self) -> anyhow::Result<()> {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if self.stderr.iter().any(|l| l.contains(READY)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                self.drain();
                bail!("exited ({status}) before attaching: {}", self.said());
            }
            if Instant::now() > end {
                self.kill();
                bail!("no {READY:?} within 60 s: {}", self.said());
            }
            if let Ok(l) = self.err.recv_timeout(Duration::from_millis(100)) {
                self.stderr.push(l);
            }
        }
    }

    /// Sends `sig` and waits for the exit.
    pub fn stop(&mut self, sig: i32) -> anyhow::Result<ExitStatus> {
        self.signal(sig)?;
        self.wait(&format!("signal {sig}"))
    }

    /// Waits up to 30 s for the exit that `cause` asked for, then reads the rest of the output.
    pub fn wait(&mut self, cause: &str) -> anyhow::Result<ExitStatus> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.drain();
                return Ok(status);
            }
            if Instant::now() > end {
                self.kill();
                bail!("still running 30 s after {cause}: {}", self.said());
            }
            self.poll(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let pid = self.child.id() as i32;
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(target, sig) } != 0 {
            bail!("kill({target}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL, to the whole group if it has one: a tracee outlives a killed strace.
    pub fn kill(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }

    /// The rest of both streams, after the exit.
    fn drain(&mut self) {
        while let Ok(l) = self.err.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(l);
        }
        if let Some(out) = &self.out {
            while let Ok(l) = out.recv_timeout(Duration::from_secs(2)) {
                self.stdout.push(l);
            }
        }
    }

    /// Standard error, on one line, for messages.
    pub fn said(&self) -> String {
        self.stderr.join(" / ")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}
