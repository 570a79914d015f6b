//! Destinations: where encoded records go, and what each said about every one of them.
//!
//! [`call`] is the vocabulary between the shipper and a destination (entries, limits,
//! classified outcomes) and the [`Destination`] trait every destination implements; each
//! destination lives in its own module: [`kinesis`] (Kinesis Data Streams), [`firehose`]
//! (Amazon Data Firehose), [`kafka`] (Apache Kafka and Amazon MSK), [`s3`] (objects in a bucket, shipped by `ship::objects`) and
//! [`directory`] (a local folder); [`signed`] is the SigV4 client the hand-written AWS ones
//! share. [`Sink`] is the set of them behind the one interface.
//!
//! To add a destination: a folder here that implements [`Destination`] (its limits, its
//! sending, its classification of outcomes), a variant in [`Sink`] and
//! [`DestinationConfig`], its section in `config/`, and its documentation. A destination never
//! retries on its own, never touches the spool, and never reports an entry accepted before it
//! is durable at the other end.

pub(crate) mod call;
pub(crate) mod directory;
pub(crate) mod firehose;
pub mod kafka;
pub mod kinesis;
pub(crate) mod s3;
pub(crate) mod signed;

use aws_credential_types::provider::SharedCredentialsProvider;
use call::{CallLimits, Destination, Entry, Outcome, ShardLimits, SinkError};
use directory::{DirectoryConfig, DirectorySink};
use firehose::{FirehoseConfig, FirehoseSink};
use kafka::{KafkaConfig, KafkaSink};
use kinesis::{KinesisConfig, KinesisSink};
use s3::{S3Config, S3Sink};
use std::sync::Arc;
use std::time::Duration;

/// A `[destination.NAME]` section, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum DestinationConfig {
    Kinesis(KinesisConfig),
    Directory(DirectoryConfig),
    S3(S3Config),
    Firehose(FirehoseConfig),
    Kafka(KafkaConfig),
}

impl DestinationConfig {
    /// The record format the destination takes whatever its routes say: Firehose parses what
    /// it is given, so its records are always JSON lines; Kafka's are its own choice.
    pub(crate) fn required_format(&self) -> Option<crate::frame::encoder::FrameFormat> {
        match self {
            DestinationConfig::Firehose(_) => Some(crate::frame::encoder::FrameFormat::Ndjson),
            DestinationConfig::Kafka(k) => k.format(),
            _ => None,
        }
    }

    /// The kind of destination, for metric labels and messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            DestinationConfig::Kinesis(_) => "kinesis",
            DestinationConfig::Directory(_) => "directory",
            DestinationConfig::S3(_) => "s3",
            DestinationConfig::Firehose(_) => "firehose",
            DestinationConfig::Kafka(_) => "kafka",
        }
    }
}

/// Every destination, behind one interface.
pub(crate) enum Sink {
    Kinesis(KinesisSink),
    Directory(DirectorySink),
    /// Objects, not records: shipped by `ship::objects`, never by a stream shipper.
    S3(Box<S3Sink>),
    Firehose(Box<FirehoseSink>),
    Kafka(Box<KafkaSink>),
}

impl Sink {
    /// Opens the destination a config section names (Kinesis: starts learning its shards).
    pub(crate) async fn connect(
        name: &str,
        config: &DestinationConfig,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<Sink, SinkError> {
        Ok(match config {
            DestinationConfig::Kinesis(k) => {
                Sink::Kinesis(KinesisSink::connect(name, k, credentials).await)
            }
            DestinationConfig::Directory(d) => Sink::Directory(DirectorySink::open(name, d)?),
            DestinationConfig::S3(s) => {
                Sink::S3(Box::new(S3Sink::connect(name, s, credentials).await?))
            }
            DestinationConfig::Firehose(f) => {
                Sink::Firehose(Box::new(FirehoseSink::connect(name, f, credentials).await?))
            }
            DestinationConfig::Kafka(k) => {
                Sink::Kafka(Box::new(KafkaSink::connect(name, k, credentials).await?))
            }
        })
    }
}

impl Destination for Sink {
    fn call_limits(&self) -> CallLimits {
        match self {
            Sink::Kinesis(k) => k.call_limits(),
            Sink::Directory(d) => d.call_limits(),
            Sink::S3(s) => s.call_limits(),
            Sink::Firehose(f) => f.call_limits(),
            Sink::Kafka(k) => k.call_limits(),
        }
    }

    fn max_record_bytes(&self) -> u64 {
        match self {
            Sink::Kinesis(k) => k.max_record_bytes(),
            Sink::Directory(d) => d.max_record_bytes(),
            Sink::S3(s) => s.max_record_bytes(),
            Sink::Firehose(f) => f.max_record_bytes(),
            Sink::Kafka(k) => k.max_record_bytes(),
        }
    }

    fn shard_limits(&self) -> Option<ShardLimits> {
        match self {
            Sink::Kinesis(k) => k.shard_limits(),
            Sink::Directory(d) => d.shard_limits(),
            Sink::S3(s) => s.shard_limits(),
            Sink::Firehose(f) => f.shard_limits(),
            Sink::Kafka(k) => k.shard_limits(),
        }
    }

    fn billing_unit_bytes(&self) -> Option<u64> {
        match self {
            Sink::Kinesis(k) => k.billing_unit_bytes(),
            Sink::Directory(d) => d.billing_unit_bytes(),
            Sink::S3(s) => s.billing_unit_bytes(),
            Sink::Firehose(f) => f.billing_unit_bytes(),
            Sink::Kafka(k) => k.billing_unit_bytes(),
        }
    }

    fn shard_for(&self, key: &str) -> Option<Arc<str>> {
        match self {
            Sink::Kinesis(k) => k.shard_for(key),
            Sink::Directory(d) => d.shard_for(key),
            Sink::S3(s) => s.shard_for(key),
            Sink::Firehose(f) => f.shard_for(key),
            Sink::Kafka(k) => k.shard_for(key),
        }
    }

    fn shard_starts(&self) -> Option<Arc<[u128]>> {
        match self {
            Sink::Kinesis(k) => k.shard_starts(),
            Sink::Directory(d) => d.shard_starts(),
            Sink::S3(s) => s.shard_starts(),
            Sink::Firehose(f) => f.shard_starts(),
            Sink::Kafka(k) => k.shard_starts(),
        }
    }

    async fn put(&self, entries: &[&Entry], timeout: Duration) -> Result<Vec<Outcome>, SinkError> {
        match self {
            Sink::Kinesis(k) => k.put(entries, timeout).await,
            Sink::Directory(d) => d.put(entries, timeout).await,
            Sink::S3(s) => s.put(entries, timeout).await,
            Sink::Firehose(f) => f.put(entries, timeout).await,
            Sink::Kafka(k) => k.put(entries, timeout).await,
        }
    }

    async fn probe(&self) -> Result<(), call::Failure> {
        match self {
            Sink::Kinesis(k) => k.probe().await,
            Sink::Directory(d) => d.probe().await,
            Sink::S3(s) => s.probe().await,
            Sink::Firehose(f) => f.probe().await,
            Sink::Kafka(k) => k.probe().await,
        }
    }
}
