//! Per-shard pacing for destinations with shards (Kinesis): each shard takes at most its write
//! limits (records/s and bytes/s, one second of burst), and a shard that throttles or fails
//! entries waits out its own backoff, so a hot shard slows only its own records and a
//! throttled stream sees no retry storm.
//!
//! Pure bookkeeping: the caller passes the clock, so every rule is unit-tested. Entries whose
//! shard is not known yet share one pseudo-shard (`""`), paced by backoff only. This module
//! never sends, sleeps or allocates per entry beyond the first sight of a shard.

use crate::backoff::Backoff;
use crate::sink::call::ShardLimits;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Shard {
    records: f64,
    bytes: f64,
    refilled: Instant,
    backoff: Backoff,
    blocked_until: Option<Instant>,
}

pub(crate) struct Pacer {
    limits: Option<ShardLimits>,
    shards: HashMap<Arc<str>, Shard>,
    unknown: Arc<str>,
}

impl Pacer {
    /// `limits` of `None` paces by backoff only (destinations without shard limits).
    pub(crate) fn new(limits: Option<ShardLimits>) -> Pacer {
        Pacer {
            limits,
            shards: HashMap::new(),
            unknown: Arc::from(""),
        }
    }

    fn shard(&mut self, id: Option<&Arc<str>>, now: Instant) -> &mut Shard {
        let id = id.unwrap_or(&self.unknown);
        let (records, bytes) = self
            .limits
            .map_or((0.0, 0.0), |l| (l.records_per_sec, l.bytes_per_sec));
        let limits = self.limits;
        let s = self.shards.entry(id.clone()).or_insert_with(|| Shard {
            records,
            bytes,
            refilled: now,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            blocked_until: None,
        });
        if let Some(l) = limits {
            let dt = now.saturating_duration_since(s.refilled).as_secs_f64();
            s.records = (s.records + dt * l.records_per_sec).min(l.records_per_sec);
            s.bytes = (s.bytes + dt * l.bytes_per_sec).min(l.bytes_per_sec);
        }
        s.refilled = now;
        s
    }

    /// Takes the shard's allowance for one entry of `bytes` if it may be sent now. An entry
    /// larger than a second's allowance goes when the bucket is full, and leaves it in debt.
    pub(crate) fn try_take(
        &mut self,
        shard: Option<&Arc<str>>,
        bytes: usize,
        now: Instant,
    ) -> bool {
        let limits = self.limits;
        let s = self.shard(shard, now);
        if s.blocked_until.is_some_and(|t| t > now) {
            return false;
        }
        let Some(l) = limits else { return true };
        let bytes = bytes as f64;
        let fits = s.records >= 1.0 && (s.bytes >= bytes || s.bytes >= l.bytes_per_sec);
        if fits {
            s.records -= 1.0;
            s.bytes -= bytes;
        }
        fits
    }

    /// When an entry of `bytes` for `shard` could go, if nothing else takes the allowance.
    pub(crate) fn ready_at(
        &mut self,
        shard: Option<&Arc<str>>,
        bytes: usize,
        now: Instant,
    ) -> Instant {
        let limits = self.limits;
        let s = self.shard(shard, now);
        let mut at = s.blocked_until.filter(|t| *t > now).unwrap_or(now);
        if let Some(l) = limits {
            let need_bytes = (bytes as f64).min(l.bytes_per_sec) - s.bytes;
            let need_records = 1.0 - s.records;
            let wait = (need_bytes / l.bytes_per_sec)
                .max(need_records / l.records_per_sec)
                .max(0.0);
            at = at.max(now + Duration::from_secs_f64(wait));
        }
        at
    }

    /// The shard refused an entry (throttled, or failed it): it waits out a growing backoff
    /// with jitter, and its allowance starts again from empty.
    pub(crate) fn refused(&mut self, shard: Option<&Arc<str>>, now: Instant) {
        let s = self.shard(shard, now);
        let delay = s.backoff.next_delay();
        s.blocked_until = Some(now + delay);
        s.records = s.records.min(0.0);
        s.bytes = s.bytes.min(0.0);
    }

    /// The shard accepted an entry: its backoff starts over.
    pub(crate) fn accepted(&mut self, shard: Option<&Arc<str>>, now: Instant) {
        let s = self.shard(shard, now);
        s.backoff.reset();
        s.blocked_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Option<Arc<str>> {
        Some(Arc::from(s))
    }

    #[test]
    fn a_shard_takes_a_second_of_burst_then_its_rate() {
        let mut p = Pacer::new(Some(ShardLimits {
            records_per_sec: 10.0,
            bytes_per_sec: 1000.0,
        }));
        let t0 = Instant::now();
        let a = id("a");
        let sent = (0..100).filter(|_| p.try_take(a.as_ref(), 1, t0)).count();
        assert_eq!(sent, 10, "records/s bounds the burst");
        assert!(!p.try_take(a.as_ref(), 1, t0));
        let at = p.ready_at(a.as_ref(), 1, t0);
        assert!((at - t0) >= Duration::from_millis(99) && (at - t0) <= Duration::from_millis(101));
        assert!(p.try_take(a.as_ref(), 1, t0 + Duration::from_millis(100)));
        // Bytes bound it too; another shard has its own allowance.
        let b = id("b");
        assert!(p.try_take(b.as_ref(), 600, t0));
        assert!(!p.try_take(b.as_ref(), 600, t0));
        assert!(p.try_take(b.as_ref(), 400, t0));
    }

    #[test]
    fn an_entry_over_a_seconds_allowance_goes_when_the_bucket_is_full() {
        let mut p = Pacer::new(Some(ShardLimits {
            records_per_sec: 10.0,
            bytes_per_sec: 1000.0,
        }));
        let t0 = Instant::now();
        let a = id("a");
        assert!(
            p.try_take(a.as_ref(), 5000, t0),
            "a full bucket lets a large entry go"
        );
        assert!(
            !p.try_take(a.as_ref(), 1, t0 + Duration::from_secs(1)),
            "and pays it back"
        );
        assert!(p.try_take(a.as_ref(), 1, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn a_refusing_shard_backs_off_alone_and_recovers() {
        let mut p = Pacer::new(Some(crate::sink::kinesis::limits::SHARD));
        let t0 = Instant::now();
        let (hot, cold) = (id("hot"), id("cold"));
        p.refused(hot.as_ref(), t0);
        assert!(!p.try_take(hot.as_ref(), 100, t0));
        assert!(
            p.try_take(cold.as_ref(), 100, t0),
            "other shards are not slowed"
        );
        let first = p.ready_at(hot.as_ref(), 100, t0) - t0;
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(101));
        let mut t = t0;
        for _ in 0..10 {
            p.refused(hot.as_ref(), t);
            t = p.ready_at(hot.as_ref(), 100, t);
        }
        let long = p.ready_at(hot.as_ref(), 100, t);
        p.refused(hot.as_ref(), t);
        assert!(p.ready_at(hot.as_ref(), 100, t) - t <= Duration::from_secs(10));
        assert!(long >= t);
        p.accepted(hot.as_ref(), t);
        let again = t + Duration::from_secs(1);
        assert!(
            p.try_take(hot.as_ref(), 100, again),
            "full speed once accepted"
        );
    }

    #[test]
    fn without_limits_only_backoff_paces() {
        let mut p = Pacer::new(None);
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| p.try_take(None, 1 << 20, t0)));
        p.refused(None, t0);
        assert!(!p.try_take(None, 1, t0));
        assert!(p.try_take(None, 1, t0 + Duration::from_secs(1)));
    }
}
