//! The config file exactly as written: serde structs that mirror the TOML, with unknown fields
//! rejected and spans kept where a later check needs to point at a line.
//!
//! Nothing here decides whether a config makes sense; `config::validate` does that and turns
//! these structs into the typed [`super::Config`]. Keep defaults out of this module too.

use super::units::{ByteSize, HumanDuration};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway_id: Option<Spanned<String>>,
    pub shutdown_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub spool: RawSpool,
    #[serde(default)]
    pub batch: RawBatch,
    #[serde(default)]
    pub broker: Vec<RawBroker>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    #[serde(default)]
    pub destination: BTreeMap<String, Spanned<RawDestination>>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub aws: RawAws,
    pub fleet: Option<Spanned<RawFleet>>,
}

/// `[fleet]`: where signed config documents come from (local file only).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// Public keys allowed to sign config documents, `ed25519:<base64>`.
    pub keys: Spanned<Vec<String>>,
    pub groups: Option<Vec<String>>,
    pub topic_prefix: Option<Spanned<String>>,
    pub broker: Option<Spanned<String>>,
    pub client_id: Option<String>,
    pub file: Option<String>,
    pub state_dir: Option<String>,
    pub health_timeout: Option<HumanDuration>,
    pub status_interval: Option<HumanDuration>,
    pub shadow: Option<RawShadow>,
}

/// `[fleet.shadow]`: the same documents through an AWS IoT named shadow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    pub name: Option<String>,
    pub thing_name: Option<String>,
}

/// What a fleet config document may set: the sections it names replace the local file's.
/// Brokers, identity, credentials, the admin endpoint, the spool's file and the fleet keys stay
/// local, so a pushed document can neither cut the gateway off nor change who may sign.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPushed {
    pub shutdown_timeout: Option<HumanDuration>,
    pub spool: Option<RawSpoolLimits>,
    pub batch: Option<RawBatch>,
    pub route: Option<Vec<RawRoute>>,
    pub destination: Option<BTreeMap<String, Spanned<RawDestination>>>,
}

/// The spool settings a fleet document may change (not its file or sync level).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpoolLimits {
    pub max_bytes: Option<ByteSize>,
    pub full_policy: Option<FullPolicy>,
    pub max_dead_letters: Option<u64>,
    pub commit_interval: Option<HumanDuration>,
}

/// `[aws]`: how the agent gets AWS credentials (the standard chain unless a source is named).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub iot_credentials: Option<Spanned<RawIotCredentials>>,
}

/// `[aws.iot_credentials]`: the AWS IoT credentials provider (device certificate + role alias).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIotCredentials {
    pub endpoint: String,
    pub role_alias: String,
    pub thing_name: Option<String>,
    pub cert: String,
    pub key: String,
    pub ca_file: Option<String>,
}

/// `[broker.tls]`: TLS to the broker; its presence turns TLS on.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub alpn: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    pub path: Option<String>,
    pub max_bytes: Option<ByteSize>,
    pub full_policy: Option<FullPolicy>,
    pub sync: Option<SyncLevel>,
    pub max_dead_letters: Option<u64>,
    pub commit_interval: Option<HumanDuration>,
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
pub struct RawBatch {
    pub linger: Option<HumanDuration>,
    pub frame_bytes: Option<ByteSize>,
    pub zstd_level: Option<Spanned<i32>>,
    pub max_message_bytes: Option<ByteSize>,
    pub max_call_bytes: Option<ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub name: Option<String>,
    pub host: Spanned<String>,
    pub port: Option<u16>,
    pub protocol: Option<MqttProtocol>,
    pub client_id: Option<Spanned<String>>,
    pub keep_alive: Option<HumanDuration>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub max_unacked: Option<Spanned<u32>>,
    pub max_packet_bytes: Option<ByteSize>,
    /// Topic filters to subscribe to instead of the routes' filters (e.g. "#" to see, and
    /// count, what no route takes).
    pub subscribe: Option<Spanned<Vec<String>>>,
    pub tls: Option<Spanned<RawTls>>,
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
pub struct RawRoute {
    pub name: Spanned<String>,
    pub topics: Spanned<Vec<String>>,
    pub destination: Spanned<String>,
    pub partition_key: Option<Spanned<String>>,
    pub explicit_hash_key: Option<Spanned<String>>,
    pub qos: Option<Spanned<u8>>,
    pub format: Option<FrameFormat>,
}

/// How a route's records are packed into destination records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameFormat {
    /// edgeship's frame (FORMAT.md): zstd-compressed, every record's id, topic and time.
    #[default]
    Edgeship,
    /// The Kinesis Producer Library's aggregated record: payloads as they are, readable by
    /// the KCL and the Lambda deaggregation modules; not compressed.
    Kpl,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawDestination {
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
}
