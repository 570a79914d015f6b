//! Destinations: where finished frames go, and what each said about every one of them.
//!
//! A sink takes a call's worth of entries and answers per entry: accepted, or failed with a
//! code. It never retries on its own (the shipper decides what to resend, so accepted entries
//! are never sent twice by the agent) and never touches the spool.

pub mod directory;
pub mod kinesis;

use crate::batcher::{CallLimits, KINESIS_CALL};
use crate::config::DestinationConfig;

/// One destination record: a frame and its partition key.
#[derive(Debug, Clone)]
pub struct Entry {
    pub data: Vec<u8>,
    pub key: String,
    /// Name of the first record's id, for logs and file names.
    pub first_seq: i64,
}

/// Why one entry of a call was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFailure {
    pub code: String,
    pub message: String,
}

/// A whole call failed; nothing in it was accepted.
#[derive(Debug, thiserror::Error)]
#[error("{destination}: {message}")]
pub struct SinkError {
    pub destination: String,
    pub message: String,
    /// Worth retrying (network, throttling, 5xx) or a configuration problem (no such stream,
    /// access denied), which is retried too but logged as an error.
    pub retryable: bool,
}

pub enum Sink {
    Kinesis(kinesis::KinesisSink),
    Directory(directory::DirectorySink),
}

impl Sink {
    pub async fn connect(name: &str, config: &DestinationConfig) -> Result<Sink, SinkError> {
        Ok(match config {
            DestinationConfig::Kinesis(k) => {
                Sink::Kinesis(kinesis::KinesisSink::connect(name, k).await)
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

    /// Sends entries; the result has one outcome per entry, in order.
    pub async fn put(
        &self,
        entries: &[&Entry],
    ) -> Result<Vec<Result<(), EntryFailure>>, SinkError> {
        match self {
            Sink::Kinesis(k) => k.put(entries).await,
            Sink::Directory(d) => d.put(entries).await,
        }
    }
}
