//! Kernel event times (`CLOCK_BOOTTIME`) to wall-clock times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};

/// The offset between boot time and wall time, taken once at start.
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    wall_minus_boot_ns: i128,
}

fn nanos(clock: ClockId) -> i128 {
    clock_gettime(clock).map_or(0, |t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
}

impl BootClock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        Self { wall_minus_boot_ns: nanos(ClockId::CLOCK_REALTIME) - nanos(ClockId::CLOCK_BOOTTIME) }
    }

    /// The wall time of a boot-time stamp.
    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        let wall = (i128::from(boot_ns) + self.wall_minus_boot_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(wall as u64)
    }
}
