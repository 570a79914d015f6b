//! The config file exactly as written: serde structs that mirror the TOML, with unknown fields
//! rejected and spans kept where a later check needs to point at a line.
//!
//! Nothing here decides whether a config makes sense; `config::validate` does that and turns
//! these structs into the typed [`super::Config`]. Keep defaults out of this module too.

use super::units::{ByteSize, HumanDuration};
use crate::frame::encoder::FrameFormat;
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) gateway_id: Option<Spanned<String>>,
    pub(crate) shutdown_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(crate) spool: RawSpool,
    #[serde(default)]
    pub(crate) batch: RawBatch,
    #[serde(default)]
    pub(crate) broker: Vec<RawBroker>,
    #[serde(default)]
    pub(crate) route: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) destination: BTreeMap<String, Spanned<RawDestination>>,
    #[serde(default)]
    pub(crate) admin: RawAdmin,
    #[serde(default)]
    pub(crate) aws: RawAws,
    pub(crate) fleet: Option<Spanned<RawFleet>>,
}

/// `[fleet]`: where signed config documents come from (local file only).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    /// Public keys allowed to sign config documents, `ed25519:<base64>`.
    pub(crate) keys: Spanned<Vec<String>>,
    pub(crate) groups: Option<Vec<String>>,
    pub(crate) topic_prefix: Option<Spanned<String>>,
    pub(crate) broker: Option<Spanned<String>>,
    pub(crate) client_id: Option<String>,
    pub(crate) file: Option<String>,
    pub(crate) state_dir: Option<String>,
    pub(crate) health_timeout: Option<HumanDuration>,
    pub(crate) status_interval: Option<HumanDuration>,
    pub(crate) shadow: Option<RawShadow>,
}

/// `[fleet.shadow]`: the same documents through an AWS IoT named shadow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShadow {
    pub(crate) name: Option<String>,
    pub(crate) thing_name: Option<String>,
}

/// What a fleet config document may set: the sections it names replace the local file's.
/// Brokers, identity, credentials, the admin endpoint, the spool's file and the fleet keys stay
/// local, so a pushed document can neither cut the gateway off nor change who may sign.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPushed {
    pub(crate) shutdown_timeout: Option<HumanDuration>,
    pub(crate) spool: Option<RawSpoolLimits>,
    pub(crate) batch: Option<RawBatch>,
    pub(crate) route: Option<Vec<RawRoute>>,
    pub(crate) destination: Option<BTreeMap<String, Spanned<RawDestination>>>,
}

/// The spool settings a fleet document may change (not its file or sync level).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpoolLimits {
    pub(crate) max_bytes: Option<ByteSize>,
    pub(crate) full_policy: Option<FullPolicy>,
    pub(crate) max_dead_letters: Option<u64>,
    pub(crate) commit_interval: Option<HumanDuration>,
    pub(crate) commit_max_wait: Option<HumanDuration>,
}

/// `[aws]`: how the agent gets AWS credentials (the standard chain unless a source is named).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAws {
    pub(crate) iot_credentials: Option<Spanned<RawIotCredentials>>,
}

/// `[aws.iot_credentials]`: the AWS IoT credentials provider (device certificate + role alias).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIotCredentials {
    pub(crate) endpoint: String,
    pub(crate) role_alias: String,
    pub(crate) thing_name: Option<String>,
    pub(crate) cert: String,
    pub(crate) key: String,
    pub(crate) ca_file: Option<String>,
}

/// `[broker.tls]`: TLS to the broker; its presence turns TLS on.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) ca_file: Option<String>,
    pub(crate) client_cert: Option<String>,
    pub(crate) client_key: Option<String>,
    pub(crate) alpn: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpool {
    pub(crate) path: Option<String>,
    pub(crate) max_bytes: Option<ByteSize>,
    pub(crate) full_policy: Option<FullPolicy>,
    pub(crate) sync: Option<SyncLevel>,
    pub(crate) max_dead_letters: Option<u64>,
    pub(crate) commit_interval: Option<HumanDuration>,
    pub(crate) commit_max_wait: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Stop reading and stop acking; the broker's persistent session keeps the rest.
    Block,
    /// Evict the oldest spooled records (counted as dropped, reason `spool_full`).
    DropOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncLevel {
    /// No fsync: survives a process crash only if the OS keeps running. Fastest, least wear.
    Off,
    /// WAL fsynced at checkpoints: survives a process crash (kill -9), may lose the last
    /// commits on power loss.
    Normal,
    /// Every commit is fsynced: survives power loss.
    Full,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBatch {
    pub(crate) linger: Option<HumanDuration>,
    pub(crate) max_linger: Option<HumanDuration>,
    pub(crate) frame_bytes: Option<ByteSize>,
    pub(crate) zstd_level: Option<Spanned<i32>>,
    pub(crate) max_message_bytes: Option<ByteSize>,
    pub(crate) max_call_bytes: Option<ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub(crate) name: Option<String>,
    pub(crate) host: Spanned<String>,
    pub(crate) port: Option<u16>,
    pub(crate) protocol: Option<MqttProtocol>,
    pub(crate) client_id: Option<Spanned<String>>,
    pub(crate) keep_alive: Option<HumanDuration>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) max_unacked: Option<Spanned<u32>>,
    pub(crate) max_packet_bytes: Option<ByteSize>,
    /// Topic filters to subscribe to instead of the routes' filters (e.g. "#" to see, and
    /// count, what no route takes).
    pub(crate) subscribe: Option<Spanned<Vec<String>>>,
    pub(crate) tls: Option<Spanned<RawTls>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) name: Spanned<String>,
    pub(crate) topics: Spanned<Vec<String>>,
    pub(crate) destination: Option<Spanned<String>>,
    pub(crate) destinations: Option<Spanned<Vec<String>>>,
    pub(crate) partition_key: Option<Spanned<String>>,
    pub(crate) explicit_hash_key: Option<Spanned<String>>,
    pub(crate) qos: Option<Spanned<u8>>,
    pub(crate) format: Option<FrameFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum RawDestination {
    Kinesis {
        stream: String,
        region: Option<String>,
        endpoint: Option<String>,
        max_record_bytes: Option<ByteSize>,
        shard_write_bytes_per_sec: Option<ByteSize>,
        shard_write_records_per_sec: Option<u32>,
    },
    Directory {
        path: String,
    },
    S3 {
        bucket: String,
        prefix: Option<String>,
        region: Option<String>,
        endpoint: Option<String>,
        path_style: Option<bool>,
        key_template: Option<String>,
        format: Option<String>,
        compression: Option<String>,
        compression_level: Option<i32>,
        max_object_bytes: Option<ByteSize>,
        max_object_age: Option<HumanDuration>,
        part_bytes: Option<ByteSize>,
        upload_windows: Option<Vec<String>>,
        sse_kms_key_id: Option<String>,
    },
    Firehose {
        delivery_stream: String,
        region: Option<String>,
        endpoint: Option<String>,
        max_record_bytes: Option<ByteSize>,
    },
    Kafka {
        brokers: Vec<String>,
        topic: String,
        records: Option<String>,
        message_max_bytes: Option<ByteSize>,
        tls: Option<RawTls>,
        sasl: Option<RawKafkaSasl>,
        create_topic: Option<RawCreateTopic>,
    },
}

/// `[destination.NAME.create_topic]` of a Kafka destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCreateTopic {
    pub(crate) partitions: i64,
    pub(crate) replication_factor: i64,
}

/// `[destination.NAME.sasl]` of a Kafka destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKafkaSasl {
    pub(crate) mechanism: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) reauthenticate_every: Option<HumanDuration>,
}
