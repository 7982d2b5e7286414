//! Who holds a socket, as the kernel side remembers it (the `OWNERS` map: cookie -> owner).
//! Userspace writes it too, for the sockets its startup scan found.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub netns: u32,
    pub cgroup: u64,
    pub comm: [u8; 16],
    /// Where only the netns cookie is known (cgroup hooks): see `Event::netns_cookie`.
    pub netns_cookie: u64,
    /// When udpmon learned that this process holds the socket (CLOCK_BOOTTIME): an exit of
    /// its tgid before then is an earlier process's with the same number.
    pub since_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Owner>() == 56);

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding (checked above), every bit pattern is valid.
unsafe impl aya::Pod for Owner {}
