//! `[batch]`: how records are packed into frames and calls, and the largest message taken.

use super::raw::RawBatch;
use super::source::{ConfigError, Source};
use super::units::ByteSize;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BatchConfig {
    /// How long a partly filled frame may wait for more records before it is sent.
    pub(crate) linger: Duration,
    /// How long a frame that holds less than one billing unit of its destination (a Kinesis
    /// PUT payload unit) when its linger is up may wait on for more, in all. `linger`
    /// unless configured: no frame waits on.
    pub(crate) max_linger: Duration,
    /// Target uncompressed bytes per frame.
    pub(crate) frame_bytes: u64,
    /// Whether the config chose `frame_bytes` (else the default, which a shipper lowers to
    /// what one shard takes in a second).
    pub(crate) frame_bytes_set: bool,
    pub(crate) zstd_level: i32,
    /// Larger messages go to the dead-letter table (reason `oversize`).
    pub(crate) max_message_bytes: u64,
    /// Most bytes (frames and keys) in one destination call, below the destination's own limit
    /// (Kinesis: 5 MiB). Smaller calls hold less memory and match a shard's 1 MiB/s.
    pub(crate) max_call_bytes: u64,
}

/// The longest `max_linger`: longer is more likely a unit mistaken than a wish.
const MAX_LINGER: Duration = Duration::from_secs(3600);

pub(super) fn batch(raw: RawBatch, src: &Source) -> Result<BatchConfig, ConfigError> {
    let zstd_level = match raw.zstd_level {
        Some(level) => {
            let span = level.span();
            let level = level.into_inner();
            if !(1..=19).contains(&level) {
                return Err(src.error_at(
                    Some(span),
                    "batch.zstd_level",
                    format!("{level} is outside 1..=19"),
                ));
            }
            level
        }
        None => 3,
    };
    let linger = raw.linger.map_or(Duration::from_secs(1), |d| d.0);
    let max_linger = raw.max_linger.map(|d| d.0);
    if max_linger.is_some_and(|m| m < linger) {
        return Err(src.error_at(None, "batch.max_linger", "must be at least linger"));
    }
    if max_linger.is_some_and(|m| m > MAX_LINGER) {
        return Err(src.error_at(
            None,
            "batch.max_linger",
            "must be at most 1h (records wait in the spool this long)",
        ));
    }
    let batch = BatchConfig {
        linger,
        max_linger: max_linger.unwrap_or(linger),
        frame_bytes: raw.frame_bytes.unwrap_or(ByteSize(1 << 20)).bytes(),
        frame_bytes_set: raw.frame_bytes.is_some(),
        zstd_level,
        max_message_bytes: raw.max_message_bytes.unwrap_or(ByteSize(256 << 10)).bytes(),
        max_call_bytes: raw.max_call_bytes.unwrap_or(ByteSize(1 << 20)).bytes(),
    };
    if !(64 << 10..=5 << 20).contains(&batch.max_call_bytes) {
        return Err(src.error_at(
            None,
            "batch.max_call_bytes",
            "must be between 64KiB and 5MiB (the PutRecords limit)",
        ));
    }
    if batch.frame_bytes < (64 << 10) || batch.frame_bytes > (64 << 20) {
        return Err(src.error_at(None, "batch.frame_bytes", "must be between 64KiB and 64MiB"));
    }
    // Each route's destination must also leave RECORD_ROOM above it (checked per route).
    if batch.max_message_bytes == 0 || batch.max_message_bytes > (9 << 20) {
        return Err(src.error_at(
            None,
            "batch.max_message_bytes",
            "must be between 1B and 9MiB (a message must fit in one Kinesis record, 10MiB at most)",
        ));
    }

    Ok(batch)
}
