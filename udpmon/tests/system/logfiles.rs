//! `-o FILE` as a production log: reopened on SIGHUP (logrotate), and a full disk that
//! udpmon outlives, counting what it could not write.
use std::{
    ffi::CString,
    fs,
    io::Write as _,
    net::UdpSocket,
    path::{Path, PathBuf},
    time::Instant,
};

use serde_json::Value;

use crate::{
    behaviour::once,
    harness::{Outcome, Strategy, Udpmon, deadline, is, s, wait_until},
    util::{exit_count, exit_summary},
};

/// `n` new loopback flows, one datagram each: a CONNECT per sender. Their local addresses.
fn flows(n: usize) -> Vec<String> {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    (0..n)
        .map(|_| {
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send_to(b"log", rx.local_addr().unwrap()).unwrap();
            tx.local_addr().unwrap().to_string()
        })
        .collect()
}

/// Every whole line of the file, each of which must be a JSON object. While udpmon runs,
/// the last line may be in the middle of being written (or, on a full disk, cut off again);
/// once it has stopped (`done`), the file must end with a whole line.
fn read_lines(path: &Path, done: bool) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    assert!(
        !done || whole.len() == text.len(),
        "{} ends in the middle of a line",
        path.display()
    );
    whole
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

fn has_connects(path: &Path, locals: &[String]) -> bool {
    let seen = read_lines(path, false);
    locals
        .iter()
        .all(|l| seen.iter().any(|v| is(v, "connect") && s(v, "local") == l))
}

fn has_any_connect(path: &Path, locals: &[String]) -> bool {
    let seen = read_lines(path, false);
    locals
        .iter()
        .any(|l| seen.iter().any(|v| is(v, "connect") && s(v, "local") == l))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("udpmon-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// logrotate's way: move the file away, SIGHUP, and the next events go to a new file at
/// the old path; the moved file keeps what came before. On standard output SIGHUP changes
/// nothing (and does not end udpmon, as it would by default).
pub fn sighup_reopens(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    let dir = temp_dir("sighup");
    let path = dir.join("events.jsonl");
    let rotated = dir.join("events.jsonl.1");
    let mut u = Udpmon::start(st, &["-o", path.to_str().unwrap()]).expect("udpmon starts");
    let before = flows(5);
    wait_until("the first flows in the file", 20, || {
        has_connects(&path, &before)
    });
    fs::rename(&path, &rotated).unwrap();
    u.kill(libc::SIGHUP);
    u.wait_for_stderr("reopen note", |l| l.contains("SIGHUP: reopened"));
    let after = flows(5);
    wait_until("the later flows in the new file", 20, || {
        has_connects(&path, &after)
    });
    assert!(
        !has_any_connect(&path, &before),
        "old events in the new file"
    );
    assert!(
        !has_any_connect(&rotated, &after),
        "new events in the rotated file"
    );
    assert!(has_connects(&rotated, &before));
    let (status, _) = u.stop();
    read_lines(&rotated, true);
    read_lines(&path, true);
    assert!(status.success(), "exit status: {status}");

    let mut u = Udpmon::start(st, &[]).expect("udpmon starts");
    u.kill(libc::SIGHUP);
    u.wait_for_stderr("SIGHUP note", |l| l.contains("nothing to reopen"));
    let after = flows(3);
    for l in &after {
        u.wait_for("a connect after SIGHUP", |v| {
            is(v, "connect") && s(v, "local") == l
        });
    }
    assert!(u.running(), "udpmon ended on SIGHUP");
    let (status, _) = u.stop();
    assert!(status.success(), "exit status: {status}");
    let _ = fs::remove_dir_all(&dir);
    Outcome::Pass
}

/// A small tmpfs, unmounted (and its directory removed) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        let c = |s: &str| CString::new(s).unwrap();
        let target = c(dir.to_str().unwrap());
        let opts = c(&format!("size={size}"));
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let r = unsafe {
            libc::mount(
                c("tmpfs").as_ptr(),
                target.as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting a tmpfs on {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; MNT_DETACH so that an open file cannot keep it mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes until the file system is full.
fn fill(path: &Path) {
    let mut f = fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// The disk holding `-o FILE` fills up: udpmon warns, counts the events it cannot write,
/// keeps monitoring, and writes again once there is room. The file never holds a half line.
pub fn full_disk(st: Strategy) -> Outcome {
    if let Err(o) = once(st) {
        return o;
    }
    let fs_ = Tmpfs::mount(temp_dir("full"), "256k");
    let path = fs_.0.join("events.jsonl");
    let mut u = Udpmon::start(st, &["-o", path.to_str().unwrap()]).expect("udpmon starts");
    let first = flows(5);
    wait_until("the first flows in the file", 20, || {
        has_connects(&path, &first)
    });
    let filler = fs_.0.join("filler");
    fill(&filler);
    // Flows until one of them cannot be written: the file's last page may still take a few.
    let mut lost = Vec::new();
    let end = Instant::now() + deadline(20);
    let warning = loop {
        lost.extend(flows(20));
        // Reads what udpmon wrote meanwhile (stderr among it).
        u.all(|_| false);
        if let Some(w) = u
            .stderr
            .iter()
            .find(|l| l.contains("events are counted and dropped"))
        {
            break w.clone();
        }
        assert!(
            Instant::now() < end,
            "no warning about the full disk: {:?}",
            u.stderr
        );
    };
    assert!(warning.contains("No space left"), "{warning}");
    assert!(u.running(), "udpmon ended when the disk filled up");
    fs::remove_file(&filler).unwrap();
    let later = flows(5);
    wait_until("the flows after space came back, in the file", 20, || {
        has_connects(&path, &later)
    });
    u.wait_for_stderr("a note that writing resumed", |l| {
        l.contains("writing again")
    });
    let (status, stderr) = u.stop();
    assert!(status.success(), "exit status: {status}");
    let summary = exit_summary(&stderr);
    let unwritten = exit_count(summary, "events not written ");
    assert!(unwritten > 0, "{summary}");
    // Each lost flow's CONNECT is either in the file or among those counted.
    let missing = lost
        .iter()
        .filter(|l| !has_any_connect(&path, std::slice::from_ref(l)))
        .count() as u64;
    assert!(
        missing <= unwritten,
        "{missing} CONNECTs missing from the file, only {unwritten} events counted as unwritten"
    );
    read_lines(&path, true);
    Outcome::Pass
}
