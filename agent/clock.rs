//! The wall clock, read one way everywhere: milliseconds or seconds since the Unix epoch.
//!
//! Wall-clock time stamps records and reports; it may step (NTP, a gateway without a
//! real-time clock that learns the date late). Anything that waits or measures a duration
//! uses `std::time::Instant` (or tokio's) instead, never these.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock reads before it).
pub(crate) fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Whole seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Seconds since the Unix epoch, with the milliseconds as a fraction (for metrics).
pub(crate) fn now_secs_f64() -> f64 {
    now_ms() as f64 / 1000.0
}

/// A wall-clock time as milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
