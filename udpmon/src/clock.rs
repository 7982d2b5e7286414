//! The kernel stamps events with CLOCK_BOOTTIME; output needs wall-clock time. The offset
//! between the two is measured at startup and again at every tick (the wall clock can be
//! stepped) and handed to the (pure) formatters.

fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_BOOTTIME now, in the kernel's event time base.
pub fn boot_ns() -> u64 {
    now_ns(libc::CLOCK_BOOTTIME)
}

/// Wall-clock minus boot time, in nanoseconds.
pub fn wall_minus_boot_ns() -> i128 {
    let boot = boot_ns();
    let wall = now_ns(libc::CLOCK_REALTIME);
    wall as i128 - boot as i128
}
