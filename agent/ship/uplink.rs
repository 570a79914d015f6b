//! How fast the uplink to a destination carries calls, measured from the calls themselves, and
//! what that means for the next call: how large it may be and how long it may take.
//!
//! A gateway's uplink may be fibre or a cellular link of a few kilobits a second, and an
//! endpoint may be slow to answer a large call. A fixed attempt timeout fails a call that
//! simply needs longer, and the same call is then resent forever. Here every call's timeout
//! follows its size at the measured rate (with room to spare), and calls shrink to what the
//! link carries in a few seconds, so a slow link still moves data and a timed-out call costs
//! little.
//!
//! Pure bookkeeping: the caller passes sizes and durations. It never sends, sleeps or reads
//! the clock.

use std::time::Duration;

/// What a call is allowed before its first byte of answer, whatever its size: connection set
/// up, signing, the endpoint's own work.
const BASE_TIMEOUT: Duration = Duration::from_secs(10);
/// A call may take this many times what its size needs at the measured rate.
const TIMEOUT_FACTOR: f64 = 4.0;
/// Longest attempt: past it a call is failed and its entries resent, whatever the link.
const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Rate assumed before anything was measured: 64 kbit/s, below most cellular links.
const ASSUMED_RATE: f64 = 8_000.0;
/// Slowest rate the estimate goes down to (8 kbit/s).
const MIN_RATE: f64 = 1_000.0;
/// A call should take about this long at the measured rate.
const CALL_DURATION: f64 = 5.0;
/// Calls before the first measurement are at most this large (a slow link is found by a
/// small call, not a call of several MiB).
const FIRST_CALL_BYTES: usize = 256 << 10;
/// Calls never shrink below this (one entry always goes, whatever its size).
const MIN_CALL_BYTES: usize = 64 << 10;
/// A call measures the link only when it is large or slow enough that latency does not
/// dominate its duration.
const MEASURE_MIN_BYTES: usize = 64 << 10;
const MEASURE_MIN_TIME: Duration = Duration::from_millis(250);

/// The measured uplink rate of one destination.
#[derive(Debug, Clone, Default)]
pub(crate) struct Uplink {
    /// Bytes per second, a moving average of measured calls; `None` before the first.
    rate: Option<f64>,
}

impl Uplink {
    pub(crate) fn new() -> Uplink {
        Uplink::default()
    }

    /// The measured rate in bytes per second, if any call measured it yet.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Largest call (bytes) to send now, at most `max`: what the link carries in a few
    /// seconds.
    pub(crate) fn call_bytes(&self, max: usize) -> usize {
        let fit = match self.rate {
            None => FIRST_CALL_BYTES,
            Some(rate) => ((rate * CALL_DURATION) as usize).max(MIN_CALL_BYTES),
        };
        fit.min(max)
    }

    /// How long a call of `bytes` may take before it is given up.
    pub(crate) fn timeout(&self, bytes: usize) -> Duration {
        // A measured fast link earns short timeouts, a slow one long ones.
        let rate = self.rate.unwrap_or(ASSUMED_RATE);
        let transfer = Duration::from_secs_f64(TIMEOUT_FACTOR * bytes as f64 / rate);
        (BASE_TIMEOUT + transfer).min(MAX_TIMEOUT)
    }

    /// A call of `bytes` was answered after `elapsed`.
    pub(crate) fn answered(&mut self, bytes: usize, elapsed: Duration) {
        if bytes < MEASURE_MIN_BYTES && elapsed < MEASURE_MIN_TIME {
            return;
        }
        let sample = (bytes as f64 / elapsed.as_secs_f64().max(1e-3)).max(MIN_RATE);
        self.rate = Some(match self.rate {
            None => sample,
            Some(r) => 0.7 * r + 0.3 * sample,
        });
    }

    /// A call of `bytes` got no answer within `elapsed` (its timeout): the link carries less
    /// than that, so the estimate drops below it and the next call is smaller and may take
    /// longer.
    pub(crate) fn timed_out(&mut self, bytes: usize, elapsed: Duration) {
        let bound = bytes as f64 / elapsed.as_secs_f64().max(1e-3);
        let current = self.rate.unwrap_or(ASSUMED_RATE);
        self.rate = Some((current.min(bound) / 2.0).max(MIN_RATE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_calls_are_small_with_a_timeout_for_a_slow_link() {
        let u = Uplink::new();
        assert_eq!(u.call_bytes(5 << 20), 256 << 10);
        assert_eq!(u.call_bytes(1000), 1000);
        // 256 KiB at the assumed 8 KB/s, four times over, plus the base.
        let t = u.timeout(256 << 10);
        assert!(
            t > Duration::from_secs(120) && t < Duration::from_secs(150),
            "{t:?}"
        );
    }

    #[test]
    fn a_fast_link_gets_full_calls_and_short_timeouts() {
        let mut u = Uplink::new();
        u.answered(5 << 20, Duration::from_millis(500)); // 10 MiB/s
        assert_eq!(u.call_bytes(5 << 20), 5 << 20);
        assert!(u.timeout(5 << 20) < Duration::from_secs(13));
    }

    #[test]
    fn a_slow_link_gets_small_calls_that_finish_in_time() {
        let mut u = Uplink::new();
        // 128 kbit/s: 16,000 bytes a second.
        u.answered(
            256 << 10,
            Duration::from_secs_f64((256 << 10) as f64 / 16_000.0),
        );
        let call = u.call_bytes(5 << 20);
        assert!((64_000..=100_000).contains(&call), "{call}");
        let needed = Duration::from_secs_f64(call as f64 / 16_000.0);
        assert!(u.timeout(call) > needed * 3, "room to spare");
        // A 1 MiB entry (it cannot be split) still gets the time it needs.
        assert!(u.timeout(1 << 20) > Duration::from_secs_f64((1 << 20) as f64 / 16_000.0));
    }

    #[test]
    fn a_timeout_shrinks_the_next_call_and_lengthens_its_timeout() {
        let mut u = Uplink::new();
        u.answered(5 << 20, Duration::from_millis(500));
        let before = (u.call_bytes(5 << 20), u.timeout(1 << 20));
        // The endpoint slowed down: a 5 MiB call got no answer in 12 s.
        u.timed_out(5 << 20, Duration::from_secs(12));
        assert!(u.call_bytes(5 << 20) < before.0);
        assert!(u.timeout(1 << 20) > before.1);
        for _ in 0..50 {
            u.timed_out(64 << 10, Duration::from_secs(600));
        }
        assert_eq!(u.rate(), Some(MIN_RATE), "the estimate has a floor");
        assert!(u.timeout(5 << 20) <= MAX_TIMEOUT);
    }

    #[test]
    fn small_quick_calls_do_not_measure_the_link() {
        let mut u = Uplink::new();
        u.answered(2_000, Duration::from_millis(40));
        assert_eq!(u.rate(), None);
        u.answered(2_000, Duration::from_millis(400));
        assert_eq!(u.rate(), Some(5_000.0));
    }
}
