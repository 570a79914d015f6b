//! Kinesis Data Streams quotas (AWS documented), the one place they are written down. The
//! config checks its Kinesis settings against them, the shipper builds and paces within them.

use crate::sink::call::{CallLimits, ShardLimits};

/// PutRecords: at most 500 entries and 5 MiB (data and partition keys) per call.
pub(crate) const CALL: CallLimits = CallLimits {
    max_entries: 500,
    max_bytes: 5 << 20,
    queued_calls: 2,
};

/// A record (data and partition key) is at most 1 MiB, unless the stream was raised.
pub(crate) const MAX_RECORD_BYTES: u64 = 1 << 20;

/// The largest a stream's record limit can be raised to (`MaxRecordSizeInKiB`).
pub(crate) const MAX_RECORD_BYTES_RAISED: u64 = 10 << 20;

/// Each shard, provisioned and on-demand alike, takes 1,000 records and 1 MiB a second.
pub(crate) const SHARD: ShardLimits = ShardLimits {
    records_per_sec: 1000.0,
    bytes_per_sec: 1_048_576.0,
};

/// A PUT payload unit, what a record is billed in: 25 KB chunks of its data and key, so a
/// record of 200 bytes costs as much as one of 25,000.
pub(crate) const PUT_UNIT_BYTES: u64 = 25_000;

/// A partition key is 1 to 256 Unicode characters.
pub(crate) const MAX_PARTITION_KEY_CHARS: usize = 256;
