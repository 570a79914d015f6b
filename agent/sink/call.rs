//! What the shipper and every destination say to each other: the entries of a call, the
//! destination's limits, and what became of each entry, classified so the shipper decides
//! without knowing any service's error codes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// One destination record: an encoded frame and its (spooled) key.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) data: Vec<u8>,
    pub(crate) key: String,
    /// The first record's sequence number, for logs and file names.
    pub(crate) first_seq: i64,
}

/// Limits of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallLimits {
    pub(crate) max_entries: usize,
    /// Sum of data and key bytes per call.
    pub(crate) max_bytes: usize,
    /// Calls' worth of encoded entries the shipper keeps ready. Two where entries are
    /// compressed frames, so a full call is ready however the frames fall; one where they
    /// hold messages as received (Kafka, Firehose), megabytes that would otherwise wait in
    /// memory uncompressed.
    pub(crate) queued_calls: usize,
}

/// The shard starts of a destination whose records each keep their own key (S3 objects,
/// Firehose, Kafka with a record per message): one bucket, so the spool stores one block per
/// route and commit however many keys it holds.
pub(crate) fn one_bucket() -> Arc<[u128]> {
    Arc::from([0u128])
}

/// Size an entry counts against a call's byte limit (and a shard's byte rate).
pub(crate) fn entry_cost(entry: &Entry) -> usize {
    entry.data.len() + entry.key.len()
}

/// Write limits of one shard, for destinations with shards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ShardLimits {
    pub(crate) records_per_sec: f64,
    pub(crate) bytes_per_sec: f64,
}

/// Why an entry or a call was not accepted, as far as the shipper cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// Too fast for the shard or the destination: resent after that shard's backoff.
    Throttled,
    /// The destination could not take it now (network, server error): resent after a backoff.
    Transient,
    /// No answer within the call's timeout: the link is slower than measured. Resent.
    TimedOut,
    /// The record is over the size the destination takes (`limit` bytes, data and key):
    /// its records are encoded again in smaller records.
    TooLarge { limit: u64 },
    /// Refused for a reason only an operator fixes (no such stream, access denied, a bad
    /// request): logged as an error, resent with backoff in case it is fixed.
    Refused,
}

/// What a destination said about one entry it did not accept, or about a whole call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    /// Short and bounded, for metrics labels: the service's error code, `Timeout`, `Connect`.
    pub(crate) code: String,
    /// A sentence for people (logs, status); never a Debug dump, never a secret.
    pub(crate) message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    pub(crate) fn new(
        kind: FailureKind,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Failure {
        Failure {
            kind,
            code: code.into(),
            message: message.into(),
        }
    }
}

/// What the destination said about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Accepted; `shard` is where it landed, when the destination has shards.
    Accepted { shard: Option<Arc<str>> },
    /// Not accepted; `shard` is the one it was meant for, if known.
    Failed {
        failure: Failure,
        shard: Option<Arc<str>>,
    },
}

/// A whole call failed; nothing in it was accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{destination}: {}", failure.message)]
pub struct SinkError {
    pub(crate) destination: String,
    pub(crate) failure: Failure,
}

/// A destination: where encoded records go, and what it said about each of them.
///
/// A new destination implements this in its own folder under `sink/`, adds its variant to
/// [`Sink`](super::Sink) and its config section, and nothing else. It must:
/// - answer every entry of a call, in order, or fail the whole call;
/// - report an entry accepted only when it is durable at the other end (a folder: the file
///   and its directory synced; a service: its acknowledgement), because the spool deletes
///   what is accepted;
/// - classify every failure by [`FailureKind`], so no service code leaks into the shipper;
/// - never retry on its own (the shipper decides what is resent, so nothing accepted is sent
///   twice by the agent), never touch the spool, never log a secret.
pub(crate) trait Destination: Send + Sync {
    /// Most entries and bytes in one call.
    fn call_limits(&self) -> CallLimits;

    /// Largest record (data and key) it takes now: its configured limit, lowered by what the
    /// destination itself states once known.
    fn max_record_bytes(&self) -> u64;

    /// Per-shard write limits to pace to; `None` for destinations without shards.
    fn shard_limits(&self) -> Option<ShardLimits> {
        None
    }

    /// The bytes (data and key) a record is billed in, when each record costs at least that
    /// much however small (Kinesis: a PUT payload unit): a frame under it that waits longer,
    /// up to `[batch] max_linger`, costs no more. `None`: records cost by size alone.
    fn billing_unit_bytes(&self) -> Option<u64> {
        None
    }

    /// The shard a spooled key goes to, when the destination has shards and knows them.
    fn shard_for(&self, _key: &str) -> Option<Arc<str>> {
        None
    }

    /// The starting hash keys of its open shards, sorted, once known: records of many keys
    /// bound for one shard then share blocks and frames. The same `Arc` while they do not
    /// change. `None` for destinations without shards.
    fn shard_starts(&self) -> Option<Arc<[u128]>> {
        None
    }

    /// Sends one call; the result has one outcome per entry, in order. A call without an
    /// answer within `timeout` fails as [`FailureKind::TimedOut`].
    fn put(
        &self,
        entries: &[&Entry],
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Outcome>, SinkError>> + Send;

    /// Whether the destination answers now (a read-only call), for health checks; why not,
    /// when it does not.
    fn probe(&self) -> impl Future<Output = Result<(), Failure>> + Send;
}
