//! Boots a kernel and initramfs under qemu, streams the serial console, enforces the
//! timeout.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{VmKernel, host};

pub(super) struct Outcome {
    /// The exit code /init reported, if it got that far.
    pub rc: Option<i32>,
    pub summary: Vec<String>,
}

const MARKER: &str = "UDPMON-VM-";
const RESULT_MARKER: &str = "UDPMON-VM-RESULT rc=";
/// Machine-readable lines (bench measurements): collected and logged, not echoed.
const DATA_MARKER: &str = "UDPMON-VM-DATA ";
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// How to run the VM.
pub(super) struct Machine<'a> {
    /// The whole run; qemu is killed after it.
    pub timeout: Duration,
    /// Killed earlier when /init has not said `UDPMON-VM-BOOTED` by then.
    pub boot_timeout: Option<Duration>,
    /// Appended to the kernel command line.
    pub kernel_args: &'a str,
    /// Appended to qemu's command line.
    pub extra_args: &'a [String],
    /// Virtual CPUs.
    pub cpus: u32,
}

pub(super) fn boot(
    kernel: &VmKernel,
    initrd: &Path,
    log_path: &Path,
    machine: &Machine<'_>,
) -> Result<Outcome> {
    let timeout = machine.timeout;
    host::ensure_packages(&["qemu-system-x86"])?;
    let mut cmd = Command::new("qemu-system-x86_64");
    let cpus = machine.cpus.to_string();
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", &cpus, "-m", "2048"])
        .args(["-nographic", "-no-reboot"])
        // No network device: the tests build their own veth pairs and need no way out.
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {}", machine.kernel_args).trim_end())
        .args(machine.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(log, "$ {}", host::describe(&cmd))?;
    println!(
        "vm {}: booting {} (timeout {}s, log {})",
        kernel.name,
        kernel.release,
        timeout.as_secs(),
        log_path.display()
    );

    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        forward_lines(child.stdout.take().context("qemu stdout")?, "", tx.clone()),
        forward_lines(child.stderr.take().context("qemu stderr")?, "qemu: ", tx),
    ];

    let mut deadline = start + timeout;
    let full_deadline = deadline;
    if let Some(b) = machine.boot_timeout {
        deadline = deadline.min(start + b);
    }
    let mut booted = false;
    let mut rc = None;
    let mut summary = Vec::new();
    let mut timed_out = false;
    loop {
        // Checked up front as well: a guest printing without pause would otherwise
        // never let recv_timeout time out.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        writeln!(log, "{line}")?;
        if line.trim().is_empty() {
            continue;
        }
        let marker = line.find(MARKER).map(|i| &line[i..]);
        if !marker.is_some_and(|m| m.starts_with(DATA_MARKER)) {
            println!("[vm {}] {line}", kernel.name);
        }
        if let Some(marker) = marker {
            if marker.starts_with("UDPMON-VM-BOOTED") {
                booted = true;
                deadline = full_deadline;
                println!(
                    "vm {}: booted after {:.1}s",
                    kernel.name,
                    start.elapsed().as_secs_f64()
                );
            }
            if let Some(code) = marker.strip_prefix(RESULT_MARKER) {
                rc = code.trim().parse().ok();
                // Only poweroff is left; do not wait the whole timeout if it hangs.
                deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
            }
            summary.push(marker.to_string());
        } else if let Some(i) = line.find("test result:") {
            summary.push(line[i..].to_string());
        }
    }

    if timed_out {
        // SIGKILL: qemu has nothing worth flushing, and a wedged guest must not keep
        // the run waiting.
        let _ = child.kill();
        let note = if rc.is_some() {
            "UDPMON-VM-TIMEOUT the guest did not power off".to_string()
        } else if !booted && let Some(b) = machine.boot_timeout {
            format!(
                "UDPMON-VM-TIMEOUT the guest did not boot within {}s",
                b.as_secs()
            )
        } else {
            format!("UDPMON-VM-TIMEOUT after {}s", timeout.as_secs())
        };
        writeln!(log, "{note}")?;
        summary.push(note);
    }
    let status = child.wait().context("waiting for qemu")?;
    for reader in readers {
        let _ = reader.join();
    }
    if rc.is_none() && !timed_out {
        let note = format!("UDPMON-VM-NO-RESULT qemu exited ({status}) before the tests finished");
        writeln!(log, "{note}")?;
        summary.push(note);
    }
    println!(
        "vm {}: {} after {:.1}s",
        kernel.name,
        match rc {
            Some(code) => format!("tests exited with {code}"),
            None => "no test result".to_string(),
        },
        start.elapsed().as_secs_f64()
    );
    Ok(Outcome { rc, summary })
}

fn forward_lines(
    stream: impl Read + Send + 'static,
    prefix: &'static str,
    tx: mpsc::Sender<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        // Bytes, not read_line: the console can carry invalid UTF-8 (a test printing
        // binary, a garbled boot), which must not end the stream.
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = strip_control(&String::from_utf8_lossy(&buf));
            buf.clear();
            if tx.send(format!("{prefix}{line}")).is_err() {
                break;
            }
        }
    })
}

/// Drops ANSI escape sequences and control characters: the serial console is a tty, so
/// the guest may colour its output, and it ends lines with "\r\n".
fn strip_control(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates up to a final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip_control;

    #[test]
    fn strips_colours_and_carriage_returns() {
        assert_eq!(
            strip_control("test result: \x1b[32mok\x1b[0m. 1 passed\r\n"),
            "test result: ok. 1 passed"
        );
        assert_eq!(strip_control("\x1bcSeaBIOS"), "SeaBIOS");
    }
}
