//! A destination's live figures: what the shipper counted, read by metrics and status.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

/// Distinct error codes kept per destination; further codes are counted as `other`, so a
/// misbehaving endpoint cannot grow the metrics without bound.
const MAX_ERROR_CODES: usize = 32;

/// Distinct shards counted per destination; a stream resharded many times, or an endpoint
/// that answers with made-up shard ids, has the rest counted under [`OTHER_SHARDS`].
const MAX_SHARDS: usize = 256;
pub(crate) const OTHER_SHARDS: &str = "other";

/// Live figures of one destination.
#[derive(Debug, Default)]
pub(crate) struct ShipperStats {
    pub(crate) calls: AtomicU64,
    pub(crate) call_failures: AtomicU64,
    pub(crate) entries_accepted: AtomicU64,
    pub(crate) entries_failed: AtomicU64,
    /// Entries (frames) that failed because the destination throttled them, per entry or as
    /// part of a whole call refused for throttling.
    pub(crate) entries_throttled: AtomicU64,
    /// Entries sent again after a failure.
    pub(crate) entries_retried: AtomicU64,
    pub(crate) records_accepted: AtomicU64,
    /// Frame bytes the destination accepted (what the uplink carried, once).
    pub(crate) bytes_accepted: AtomicU64,
    /// Uncompressed record bytes inside accepted frames.
    pub(crate) raw_bytes_accepted: AtomicU64,
    /// From a record's receipt to its destination accepting it.
    pub(crate) end_to_end_latency: crate::metrics::Histogram,
    /// Encoded frame bytes held in memory, waiting to be sent or resent.
    pub(crate) queued_bytes: AtomicU64,
    /// True while the shipper runs; false while it restarts after stopping on its own.
    pub(crate) shipping: AtomicBool,
    /// Times the shipper stopped on its own (an error it cannot ship past) and was started
    /// again.
    pub(crate) restarts: AtomicU64,
    /// True from a failed call (or entry) until a call succeeds entirely.
    pub(crate) failing: AtomicBool,
    /// Unix ms of the last call whose entries were all accepted; 0 before the first.
    pub(crate) last_success_ms: AtomicU64,
    /// Failures by error code (entries and whole calls), at most [`MAX_ERROR_CODES`] codes.
    pub(crate) errors: Mutex<BTreeMap<String, u64>>,
    /// Per shard (destinations with shards), keyed by shard id.
    pub(crate) shards: Mutex<BTreeMap<Arc<str>, ShardCounters>>,
    /// The last failure, for status.
    pub(crate) last_error: Mutex<Option<String>>,
    /// The uplink's measured rate to this destination, bytes per second; 0 until measured.
    pub(crate) uplink_rate: AtomicU64,
    /// The record size limit the destination itself enforces, learned from a refusal, when
    /// it is below the configured `max_record_bytes`; 0 until then.
    pub(crate) learned_record_limit: AtomicU64,
    /// Frames whose encoding was larger than one record, so they were encoded again in parts
    /// (work done twice; a route's frames are planned smaller once one is seen).
    pub(crate) frames_split: AtomicU64,
}

/// What one shard of a destination did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ShardCounters {
    pub(crate) entries_accepted: u64,
    pub(crate) entries_throttled: u64,
    /// Failed for another reason than throttling.
    pub(crate) entries_failed: u64,
    pub(crate) records_accepted: u64,
    pub(crate) bytes_accepted: u64,
}

impl ShipperStats {
    pub(super) fn count_error(&self, code: &str, n: u64) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let key = if errors.contains_key(code) || errors.len() < MAX_ERROR_CODES {
            code
        } else {
            "other"
        };
        *errors.entry(key.to_string()).or_insert(0) += n;
    }

    pub(super) fn set_last_error(&self, text: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    }

    pub(crate) fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn shards(&self) -> BTreeMap<Arc<str>, ShardCounters> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds what one call did per shard.
    pub(super) fn add_shard_counts(&self, per_shard: BTreeMap<Arc<str>, ShardCounters>) {
        if per_shard.is_empty() {
            return;
        }
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        for (id, c) in per_shard {
            // A misbehaving endpoint cannot grow the metrics without bound either.
            let key = if shards.contains_key(&id) || shards.len() < MAX_SHARDS {
                id
            } else {
                Arc::from(OTHER_SHARDS)
            };
            let t = shards.entry(key).or_default();
            t.entries_accepted += c.entries_accepted;
            t.entries_throttled += c.entries_throttled;
            t.entries_failed += c.entries_failed;
            t.records_accepted += c.records_accepted;
            t.bytes_accepted += c.bytes_accepted;
        }
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
