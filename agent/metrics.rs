//! Latency histograms the agent keeps about itself: fixed log-scale buckets of atomics, so
//! recording is a few instructions on any thread and memory never grows. Percentiles are read
//! from the buckets (upper bound of the bucket that holds the rank), good to within one bucket
//! (about 19%).
//!
//! This module only counts; it never logs, blocks, or allocates on the recording path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets grow by 2^(1/4); bucket 0 is below 1 us, the last one is open-ended (above ~68 s).
const BUCKETS: usize = 4 * 26 + 2;

#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us == 0 {
        return 0;
    }
    // 4 buckets per power of two: index from log2 with two fractional bits.
    let log2 = 63 - us.leading_zeros() as usize;
    let frac = if log2 >= 2 {
        ((us >> (log2 - 2)) & 0b11) as usize
    } else {
        (us << (2 - log2)) as usize & 0b11
    };
    (1 + log2 * 4 + frac).min(BUCKETS - 1)
}

fn upper_bound_us(bucket: usize) -> u64 {
    if bucket == 0 {
        return 1;
    }
    let b = bucket - 1;
    let (log2, frac) = (b / 4, b % 4);
    // Smallest value of the next bucket.
    let base = 1u64 << log2;
    let step = (base / 4).max(1);
    base + step * (frac as u64 + 1)
}

/// A percentile summary, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
    pub(crate) mean_us: u64,
}

/// Cumulative counts at the exported bucket bounds, for a Prometheus histogram.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cumulative {
    /// (upper bound in seconds, observations below it), ascending; `+Inf` is `count`.
    pub(crate) buckets: Vec<(f64, u64)>,
    pub(crate) count: u64,
    pub(crate) sum_seconds: f64,
}

/// Exported bounds are 2^k microseconds for k in this range (16 us to about 67 s): each is an
/// exact boundary of the fine buckets, so the exported counts are exact, not interpolated.
const EXPORTED_POWERS: std::ops::RangeInclusive<usize> = 4..=26;

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `n` observations of the same value (e.g. the records of one block).
    pub(crate) fn record_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[bucket_of(us)].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_us
            .fetch_add(us.saturating_mul(n), Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Counts below each exported bound (values are whole microseconds, so "below 2^k us" is
    /// "at most 2^k - 1 us").
    pub(crate) fn cumulative(&self) -> Cumulative {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let mut buckets = Vec::with_capacity(EXPORTED_POWERS.clone().count());
        let mut running = 0u64;
        let mut next = 0usize;
        for k in EXPORTED_POWERS {
            // Values below 2^k us fill fine buckets 0..=4k.
            while next <= 4 * k {
                running += counts[next];
                next += 1;
            }
            buckets.push(((1u64 << k) as f64 / 1e6, running));
        }
        let count = counts.iter().sum();
        Cumulative {
            buckets,
            count,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    pub(crate) fn summary(&self) -> Summary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let max = self.max_us.load(Ordering::Relaxed);
        let at = |q: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper_bound_us(i).min(max);
                }
            }
            max
        };
        Summary {
            count: total,
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: max,
            mean_us: self
                .sum_us
                .load(Ordering::Relaxed)
                .checked_div(total)
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for us in [
            0u64, 1, 2, 3, 4, 5, 7, 8, 100, 1_000, 12_345, 1_000_000, 60_000_000,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "bucket of {us} went down");
            assert!(
                upper_bound_us(b) > us || b == BUCKETS - 1,
                "{us} above its bucket's bound"
            );
            last = b;
        }
    }

    #[test]
    fn exported_buckets_are_exact_and_cumulative() {
        let h = Histogram::default();
        // 15 us, 16 us (the first bound is "below 16 us"), 1 ms, 100 s.
        for us in [15u64, 16, 1_000, 100_000_000] {
            h.record(Duration::from_micros(us));
        }
        h.record_n(Duration::from_micros(31), 3);
        let c = h.cumulative();
        assert_eq!(c.count, 7);
        assert_eq!(c.buckets[0], (16e-6, 1));
        assert_eq!(c.buckets[1], (32e-6, 5));
        let at_1024us = c.buckets.iter().find(|(le, _)| *le == 1024e-6).unwrap();
        assert_eq!(at_1024us.1, 6);
        assert_eq!(
            c.buckets.last().unwrap().1,
            6,
            "100 s is above the last bound"
        );
        assert!(c
            .buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!(
            (c.sum_seconds - 100.001124).abs() < 1e-9,
            "{}",
            c.sum_seconds
        );
    }

    #[test]
    fn percentiles_land_within_a_bucket() {
        let h = Histogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((50_000..=60_000).contains(&s.p50_us), "{s:?}");
        assert!((99_000..=100_000).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 100_000);
    }
}
