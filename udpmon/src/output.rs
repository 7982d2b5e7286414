//! The line output: standard output or `-o FILE`, one report per line.
//!
//! Lines are buffered and written once per batch of reports. A write that fails for lack of
//! space (a full disk, a quota, a file-size limit) does not end udpmon: the lines that could
//! not be written are counted and dropped, the file is cut back to its last whole line so that
//! no half line is left for a reader to choke on, and the next batch tries again, so writing
//! resumes by itself once there is room. `-o FILE` is reopened on SIGHUP, which is how
//! logrotate (and an operator) moves the file away.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use log::{info, warn};

/// More than this much buffered is written at once, even in the middle of a batch.
const FLUSH_AT: usize = 256 * 1024;

pub struct Output {
    file: File,
    /// None for standard output: nothing to reopen.
    path: Option<PathBuf>,
    /// For diagnostics: the path, or "standard output".
    name: String,
    buf: Vec<u8>,
    pub unwritten: Unwritten,
}

/// Events a destination could not take: counted, warned about once per episode of failures,
/// and the end of the episode noted.
#[derive(Default)]
pub struct Unwritten {
    /// Since startup.
    pub total: u64,
    /// In the current episode (0: writing works).
    episode: u64,
}

impl Unwritten {
    pub fn lost(&mut self, dest: &str, err: &dyn std::fmt::Display, events: u64) {
        if self.episode == 0 {
            warn!("{dest}: {err}: events are counted and dropped until it takes them again");
        }
        self.episode += events;
        self.total += events;
    }

    pub fn written(&mut self, dest: &str) {
        if self.episode > 0 {
            info!(
                "{dest}: writing again; {} events could not be written",
                self.episode
            );
            self.episode = 0;
        }
    }
}

impl Output {
    /// Standard output, written through its own descriptor.
    pub fn stdout() -> io::Result<Self> {
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Self::new(File::from(fd), None))
    }

    /// `path`, appended to (created if missing).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self::new(open_append(path)?, Some(path.to_path_buf())))
    }

    fn new(file: File, path: Option<PathBuf>) -> Self {
        let name = match &path {
            Some(p) => p.display().to_string(),
            None => "standard output".into(),
        };
        Self {
            file,
            path,
            name,
            buf: Vec::with_capacity(64 * 1024),
            unwritten: Unwritten::default(),
        }
    }

    /// Queues one line (without its newline). Errors are those of [`Output::flush`].
    pub fn line(&mut self, line: &str) -> io::Result<()> {
        self.line_with(|buf| buf.extend_from_slice(line.as_bytes()))
    }

    /// A line that `write` appends to the queue itself, with no copy of its own.
    pub fn line_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        write(&mut self.buf);
        self.buf.push(b'\n');
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is queued. Lack of space is counted, not returned; other errors (a closed
    /// pipe among them) are returned, with the queue dropped.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        let err = loop {
            if done == buf.len() {
                break None;
            }
            match self.file.write(&buf[done..]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        let Some(err) = err else {
            self.unwritten.written(&self.name);
            return Ok(());
        };
        if !no_room(&err) {
            return Err(err);
        }
        // Keep the whole lines that made it; the rest of the batch is lost, and counted.
        let kept = buf[..done]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        // The half line is cut off again: the file is appended to by udpmon alone, so it ends
        // with what this write put there (regular files only: a pipe or terminal cannot be
        // cut, and does not run out of space). Its length is asked only now, not at every
        // batch.
        if kept < done
            && let Ok(m) = self.file.metadata()
            && m.is_file()
        {
            let _ = self
                .file
                .set_len(m.len().saturating_sub((done - kept) as u64));
        }
        let lost = buf[kept..].iter().filter(|&&b| b == b'\n').count() as u64;
        self.unwritten.lost(&self.name, &err, lost);
        Ok(())
    }

    /// SIGHUP: writes what is queued to the old file, then opens the path anew. If it cannot
    /// be opened, writing goes on to the old file.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.flush()?;
        let Some(path) = &self.path else {
            info!("SIGHUP: writing to standard output, nothing to reopen");
            return Ok(());
        };
        match open_append(path) {
            Ok(f) => {
                self.file = f;
                info!("SIGHUP: reopened {}", path.display());
            }
            Err(e) => warn!(
                "SIGHUP: reopening {}: {e}; still writing to the file it had open",
                path.display()
            ),
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Errors that mean "no room now, maybe later".
fn no_room(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    ) || e.kind() == io::ErrorKind::WriteZero
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("udpmon-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("events.jsonl")
    }

    #[test]
    fn lines_are_appended_and_reopen_follows_the_path() {
        let path = temp("reopen");
        std::fs::write(&path, "old\n").unwrap();
        let mut o = Output::open(&path).unwrap();
        o.line("a").unwrap();
        o.flush().unwrap();
        let moved = path.with_extension("1");
        std::fs::rename(&path, &moved).unwrap();
        o.line("b").unwrap();
        o.reopen().unwrap();
        o.line("c").unwrap();
        o.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "old\na\nb\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "c\n");
        assert_eq!(o.unwritten.total, 0);
    }

    /// /dev/full fails every write with ENOSPC, like a full disk.
    #[test]
    fn no_room_is_counted_not_fatal() {
        let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
            eprintln!("SKIPPED: no /dev/full");
            return;
        };
        let mut o = Output::new(full, None);
        for l in ["one", "two", "three"] {
            o.line(l).unwrap();
        }
        o.flush().unwrap();
        o.line("four").unwrap();
        o.flush().unwrap();
        assert_eq!(o.unwritten.total, 4);
    }

    #[test]
    fn other_errors_are_returned() {
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: pipe() fills both fds on success, checked below.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            use std::os::fd::FromRawFd as _;
            // SAFETY: both fds were just created and are owned by nobody else.
            unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
        };
        drop(r);
        let mut o = Output::new(w, None);
        o.line("x").unwrap();
        // SIGPIPE is ignored by the Rust runtime, so the write fails with EPIPE.
        let e = o.flush().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
