//! A minimal writer for the "newc" cpio format the kernel unpacks as initramfs.
//!
//! Written here rather than piped through cpio(1) because the archive needs a
//! /dev/console device node (without it /init starts with no stdio), and making one on
//! disk would need mknod privileges and a staging tree.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

pub(super) enum Data {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

enum Kind {
    Dir,
    File(Data),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

struct Entry {
    mode: u32,
    kind: Kind,
}

/// Entries keyed by path without a leading slash. The map's order puts every directory
/// before its contents, which the kernel requires (it does not create parents).
#[derive(Default)]
pub(super) struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub(super) fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            self.entries
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Entry {
                    mode: 0o755,
                    kind: Kind::Dir,
                });
            parent = dir.parent();
        }
        self.entries.insert(path.to_string(), entry);
    }

    pub(super) fn dir(&mut self, path: &str) {
        self.insert(
            path,
            Entry {
                mode: 0o755,
                kind: Kind::Dir,
            },
        );
    }

    pub(super) fn file(&mut self, path: &str, mode: u32, data: Data) {
        self.insert(
            path,
            Entry {
                mode,
                kind: Kind::File(data),
            },
        );
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Entry {
                mode: 0o777,
                kind: Kind::Symlink(target.to_string()),
            },
        );
    }

    pub(super) fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.insert(
            path,
            Entry {
                mode,
                kind: Kind::CharDev { major, minor },
            },
        );
    }

    pub(super) fn write(&self, out: &Path) -> Result<()> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::new(file);
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            write_entry(&mut w, ino, path, entry)
                .with_context(|| format!("adding {path} to {}", out.display()))?;
        }
        header(&mut w, 0, 0, 0, 0, (0, 0), "TRAILER!!!")?;
        w.flush()?;
        Ok(())
    }
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

fn write_entry(w: &mut impl Write, ino: u32, path: &str, entry: &Entry) -> Result<()> {
    match &entry.kind {
        Kind::Dir => header(w, ino, S_IFDIR | entry.mode, 2, 0, (0, 0), path)?,
        Kind::CharDev { major, minor } => {
            header(w, ino, S_IFCHR | entry.mode, 1, 0, (*major, *minor), path)?;
        }
        Kind::Symlink(target) => {
            header(w, ino, S_IFLNK | entry.mode, 1, target.len(), (0, 0), path)?;
            body(w, &mut target.as_bytes(), target.len())?;
        }
        Kind::File(Data::Bytes(bytes)) => {
            header(w, ino, S_IFREG | entry.mode, 1, bytes.len(), (0, 0), path)?;
            body(w, &mut bytes.as_slice(), bytes.len())?;
        }
        Kind::File(Data::Host(src)) => {
            // Opening follows symlinks on purpose: shared libraries are often symlinks
            // on the host, and the initramfs gets their contents under the linked name.
            let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
            let len = usize::try_from(f.metadata()?.len())?;
            header(w, ino, S_IFREG | entry.mode, 1, len, (0, 0), path)?;
            body(w, &mut f, len)?;
        }
    }
    Ok(())
}

fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    (rdev_major, rdev_minor): (u32, u32),
    name: &str,
) -> Result<()> {
    let namesize = name.len() + 1;
    let size = u32::try_from(size).context("file too large for cpio")?;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + namesize)?;
    Ok(())
}

fn body(w: &mut impl Write, r: impl io::Read, len: usize) -> Result<()> {
    let copied = io::copy(&mut r.take(len as u64), w)?;
    anyhow::ensure!(
        copied == len as u64,
        "size changed while copying ({copied} != {len})"
    );
    pad(w, len)
}

fn pad(w: &mut impl Write, len: usize) -> Result<()> {
    let n = (4 - len % 4) % 4;
    w.write_all(&[0; 3][..n])?;
    Ok(())
}
