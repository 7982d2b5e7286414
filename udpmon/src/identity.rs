//! Who a socket belongs to: [`Identity`], and the [`Name`]s in it.
//!
//! Names are held inline: the kernel keeps at most 15 bytes of one (`TASK_COMM_LEN`), so
//! every event, owner and report carries its names without a heap allocation. The bytes are
//! the kernel's, whatever they are; they are read as UTF-8 where they are written out, and a
//! name that is not UTF-8 is decoded lossily there.
use std::{borrow::Cow, fmt};

/// Who: a process (and the thread that acted), with its user, cgroup and network namespace.
/// The one description of a socket's owner, in kernel events, in the engine and in reports.
/// All zero / empty when unknown (only softirq-side facts were seen for the socket, or no
/// socket exists).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    /// The thread's name.
    pub comm: Name,
    /// The process's name (its thread-group leader's), "" when unknown.
    pub process: Name,
    pub uid: u32,
    pub cgroup: u64,
    /// Network namespace inode.
    pub netns: u32,
}

impl Identity {
    pub fn is_known(&self) -> bool {
        self.tgid != 0 || !self.comm.is_empty()
    }
}

/// A process or thread name.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Name {
    len: u8,
    bytes: [u8; Name::MAX],
}

impl Name {
    pub const MAX: usize = 15;
    pub const EMPTY: Name = Name {
        len: 0,
        bytes: [0; Name::MAX],
    };

    /// The first [`Name::MAX`] bytes of `s` (a name is never longer in the kernel).
    pub fn new(s: &str) -> Self {
        Self::from_bytes(s.as_bytes())
    }

    /// A kernel `comm` field: up to its first NUL.
    pub fn from_comm(raw: &[u8; 16]) -> Self {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Self::from_bytes(&raw[..end])
    }

    /// The first [`Name::MAX`] bytes of `b`.
    pub fn from_bytes(b: &[u8]) -> Self {
        let len = b.len().min(Self::MAX);
        let mut bytes = [0; Self::MAX];
        bytes[..len].copy_from_slice(&b[..len]);
        Self {
            len: len as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The whole fixed-size array (zero past the name) and the name's length, for writers
    /// that copy a fixed size and cut.
    pub fn padded(&self) -> (&[u8; Name::MAX], usize) {
        (&self.bytes, usize::from(self.len))
    }

    /// The name as text: borrowed when it is UTF-8, as nearly every name is.
    pub fn to_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole name in one word, for hashing it at once rather than a byte at a time.
    pub fn word(&self) -> u128 {
        let mut w = [0u8; 16];
        w[0] = self.len;
        w[1..].copy_from_slice(&self.bytes);
        u128::from_ne_bytes(w)
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.to_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels_bytes_up_to_fifteen() {
        let mut raw = [0u8; 16];
        raw[..2].copy_from_slice(b"nc");
        assert_eq!(Name::from_comm(&raw), "nc");
        let full = *b"systemd-resolved";
        assert_eq!(Name::from_comm(&full), "systemd-resolve");
        assert_eq!(Name::new("systemd-resolved"), "systemd-resolve");
        assert!(Name::default().is_empty());
        // Not UTF-8: kept as is, decoded lossily when written out.
        let bad = Name::from_comm(b"a\xffb\0\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(bad.as_bytes(), b"a\xffb");
        assert_eq!(bad.to_str(), "a\u{fffd}b");
        assert_eq!(format!("{bad:?}"), "\"a\u{fffd}b\"");
        // In byte order, as text sorts, not by length.
        assert!(Name::new("b") > Name::new("abc"));
    }
}
