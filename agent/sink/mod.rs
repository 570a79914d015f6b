//! Destinations: where finished frames go, and what each said about every one of them.
//!
//! A sink takes a call's worth of entries and answers per entry: accepted, or failed with a
//! code. It never retries on its own (the shipper decides what to resend, so accepted entries
//! are never sent twice by the agent) and never touches the spool.

pub mod directory;
pub mod kinesis;

use crate::batcher::{CallLimits, KINESIS_CALL};
use crate::config::DestinationConfig;
use std::sync::Arc;

/// One destination record: a frame and its partition key.
#[derive(Debug, Clone)]
pub struct Entry {
    pub data: Vec<u8>,
    pub key: String,
    /// Name of the first record's id, for logs and file names.
    pub first_seq: i64,
}

/// One entry was accepted; `shard` is where it landed, when the destination has shards.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    pub shard: Option<Arc<str>>,
}

/// Why one entry of a call was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFailure {
    pub code: String,
    pub message: String,
    /// The shard the entry was meant for, if known.
    pub shard: Option<Arc<str>>,
}

/// What the destination said about one entry.
pub type Outcome = Result<Accepted, EntryFailure>;

/// Error codes that mean "too fast, slow down" rather than "broken".
pub fn is_throttle(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "ThrottlingException"
            | "KMSThrottlingException"
    )
}

/// A whole call failed; nothing in it was accepted.
#[derive(Debug, thiserror::Error)]
#[error("{destination}: {message}")]
pub struct SinkError {
    pub destination: String,
    /// Short, bounded code for metrics: the service's error code, `Timeout`, `Connect`, ...
    pub code: String,
    pub message: String,
    /// Worth retrying (network, throttling, 5xx) or a configuration problem (no such stream,
    /// access denied), which is retried too but logged as an error.
    pub retryable: bool,
}

/// Separates a spooled key's partition key from its explicit hash key (routes with
/// `explicit_hash_key` spool `"<partition key>\0<decimal hash key>"`; MQTT topics and config
/// templates cannot hold NUL).
pub const HASH_KEY_SEPARATOR: char = '\0';

/// (partition key, explicit hash key) of a spooled key.
pub fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once(HASH_KEY_SEPARATOR) {
        Some((pk, hk)) => (pk, Some(hk)),
        None => (key, None),
    }
}

/// The record size limit a refusal names, if it refuses a record for its size: kinesis-mock
/// and streams with a raised limit answer the entry with `InvalidArgumentException` "Record
/// data size N exceeds the stream's max record size of M bytes"; request validation answers
/// `ValidationException` "... data ... length less than or equal to M".
pub fn record_size_limit(code: &str, message: &str) -> Option<u64> {
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &message[message.find(marker)? + marker.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    match code {
        "InvalidArgumentException" => number_after("max record size of"),
        "ValidationException" if message.contains("data") => {
            number_after("length less than or equal to")
        }
        _ => None,
    }
}

pub enum Sink {
    Kinesis(kinesis::KinesisSink),
    Directory(directory::DirectorySink),
}

impl Sink {
    pub async fn connect(
        name: &str,
        config: &DestinationConfig,
        credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    ) -> Result<Sink, SinkError> {
        Ok(match config {
            DestinationConfig::Kinesis(k) => {
                Sink::Kinesis(kinesis::KinesisSink::connect(name, k, credentials).await)
            }
            DestinationConfig::Directory { path } => {
                Sink::Directory(directory::DirectorySink::open(name, path)?)
            }
        })
    }

    pub fn call_limits(&self) -> CallLimits {
        match self {
            Sink::Kinesis(_) => KINESIS_CALL,
            Sink::Directory(_) => CallLimits {
                max_entries: 64,
                max_bytes: 64 << 20,
            },
        }
    }

    /// Sends entries; the result has one outcome per entry, in order. A call with no answer
    /// within `timeout` fails with the code `Timeout`.
    pub async fn put(
        &self,
        entries: &[&Entry],
        timeout: std::time::Duration,
    ) -> Result<Vec<Outcome>, SinkError> {
        match self {
            Sink::Kinesis(k) => k.put(entries, timeout).await,
            Sink::Directory(d) => d.put(entries).await,
        }
    }

    /// Whether the destination answers now (a read-only call), for the health check after a
    /// config change.
    pub async fn probe(&self) -> Result<(), String> {
        match self {
            Sink::Kinesis(k) => k.probe().await,
            Sink::Directory(d) => d.probe().await,
        }
    }

    /// The kind of destination, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Kinesis(_) => "kinesis",
            Sink::Directory(_) => "directory",
        }
    }

    /// The record size limit the destination states for itself, once known.
    pub fn max_record_bytes(&self) -> Option<u64> {
        match self {
            Sink::Kinesis(k) => k.max_record_bytes(),
            Sink::Directory(_) => None,
        }
    }

    /// Where an entry with this partition key would go (a shard id), if the destination has
    /// shards and knows them; used to attribute a whole failed call.
    pub fn shard_for(&self, key: &str) -> Option<Arc<str>> {
        match self {
            Sink::Kinesis(k) => k.shard_for(key),
            Sink::Directory(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::record_size_limit;

    #[test]
    fn size_refusals_name_their_limit() {
        assert_eq!(
            record_size_limit(
                "InvalidArgumentException",
                "Record data size 1048586 exceeds the stream's max record size of 1048576 bytes"
            ),
            Some(1_048_576)
        );
        assert_eq!(
            record_size_limit(
                "ValidationException",
                "1 validation error detected: Value at 'records.1.member.data' failed to satisfy constraint: Member must have length less than or equal to 1048576"
            ),
            Some(1_048_576)
        );
        assert_eq!(
            record_size_limit("InvalidArgumentException", "Stream s not found"),
            None
        );
        assert_eq!(
            record_size_limit(
                "ProvisionedThroughputExceededException",
                "max record size of 5"
            ),
            None
        );
    }
}
