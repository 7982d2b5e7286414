//! Types shared by the kernel programs (`udpmon-ebpf`) and the userspace agent (`udpmon`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, because the same
//! bytes are written by BPF code and read back by userspace. Size checks at the bottom of each
//! module catch a layout change at compile time on both sides.
#![no_std]

pub mod event;
pub mod flow;
pub mod offsets;
pub mod owner;
pub mod stats;

pub use event::{Event, EventKind};
pub use flow::{FlowKey, FlowStats, SLEEP_NS, WAKE_NS};
pub use offsets::{IcmpFreeCallers, Offsets};
pub use owner::Owner;
pub use stats::{COUNTERS, Counter};
