//! Configuration: load a TOML file, check it, and hand out a typed [`Config`].
//!
//! Two stages, so that every mistake is reported once, precisely: [`raw`] mirrors the file
//! (unknown fields are errors, units parsed by [`units`]), then [`validate`] checks meaning
//! (names that must exist, ranges, templates) and fills in defaults. Every error names the file,
//! the line and the field. This module never opens sockets or the spool, and never logs a
//! secret: [`BrokerConfig`]'s `Debug` hides the password.

pub mod raw;
pub mod units;

use crate::route::{KeyTemplate, TopicFilter};
pub use raw::{FrameFormat, FullPolicy, MqttProtocol, SyncLevel};
use raw::{RawConfig, RawDestination, RawPushed};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use units::ByteSize;

/// The commented default config, also shipped as `/etc/edgeship/edgeship.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/edgeship.toml");

/// Kinesis limits (AWS documented quotas) that bound what the batcher builds.
pub const KINESIS_MAX_RECORD_BYTES: u64 = 1 << 20;
pub const KINESIS_MAX_RECORD_BYTES_RAISED: u64 = 10 << 20;
/// What a record needs beyond its message: its topic (MQTT allows 65,535 bytes) and the
/// frame's own bytes.
const RECORD_ROOM: u64 = 65 << 10;

#[derive(Debug, Clone)]
pub struct Config {
    /// Stable identity of this gateway; part of every record id.
    pub gateway_id: String,
    /// How long a SIGTERM may take: stop reading, commit, finish in-flight calls.
    pub shutdown_timeout: Duration,
    pub spool: SpoolConfig,
    pub batch: BatchConfig,
    pub brokers: Vec<BrokerConfig>,
    pub routes: Vec<RouteConfig>,
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub admin: AdminConfig,
    pub aws: AwsConfig,
    /// `None`: no fleet config push; the local file is the whole config.
    pub fleet: Option<FleetConfig>,
}

/// The fleet config push: signed documents on MQTT topics (and an optional local file) that
/// replace the routes, destinations, batching and spool limits while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// Ed25519 public keys whose signatures are accepted; more than one during a rotation.
    pub keys: Vec<[u8; 32]>,
    /// Groups this gateway belongs to; each has its own config topic.
    pub groups: Vec<String>,
    /// Config topics are `{prefix}/config/gateway/{gateway_id}` and
    /// `{prefix}/config/group/{group}`; status goes to `{prefix}/status/{gateway_id}`.
    pub topic_prefix: String,
    /// Which `[[broker]]`'s connection settings the fleet channel uses.
    pub broker: String,
    /// The fleet channel's own MQTT client id (it is a second connection).
    pub client_id: String,
    /// A signed document read at start and on SIGHUP.
    pub file: Option<PathBuf>,
    /// Where the last known good document and the versions seen are kept.
    pub state_dir: PathBuf,
    /// How long an applied config has to show working connections before it is rolled back.
    pub health_timeout: Duration,
    /// How often the status document is published besides on every change.
    pub status_interval: Duration,
    /// Also take documents from an AWS IoT named shadow (desired) and report to it.
    pub shadow: Option<ShadowConfig>,
}

/// An AWS IoT Device Shadow carrying the fleet document: `state.desired.edgeship` holds the
/// signed envelope; the agent reports the applied one and its status under `state.reported`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowConfig {
    pub thing_name: String,
    pub name: String,
}

/// Where AWS credentials come from: the standard chain (environment, profile, container,
/// IMDS) unless `iot_credentials` is set.
#[derive(Debug, Clone, Default)]
pub struct AwsConfig {
    pub iot_credentials: Option<IotCredentialsConfig>,
}

/// The AWS IoT credentials provider: temporary credentials for a role alias, fetched over
/// mutual TLS with the device's certificate.
#[derive(Debug, Clone)]
pub struct IotCredentialsConfig {
    /// `https://host[:port]`: the account's credentials endpoint
    /// (`aws iot describe-endpoint --endpoint-type iot:CredentialProvider`).
    pub endpoint: String,
    pub role_alias: String,
    /// Sent as `x-amzn-iot-thingname`; the thing the certificate is attached to.
    pub thing_name: String,
    /// Certificate and key (required), CA bundle for the endpoint.
    pub tls: TlsConfig,
}

/// TLS client settings: PEM files, read when the agent starts (and by `config validate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificates that may sign the server's certificate; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// ALPN protocol names to offer (AWS IoT Core on port 443: `x-amzn-mqtt-ca`).
    pub alpn: Vec<String>,
}

/// The local HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `None` when the config says `listen = "off"`.
    pub listen: Option<std::net::SocketAddr>,
}

/// Where the admin endpoint listens unless the config says otherwise: loopback only, since it
/// has no authentication.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9710";

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    pub path: PathBuf,
    /// Cap on spooled (compressed) record bytes; past it `full_policy` applies.
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    pub sync: SyncLevel,
    /// Dead letters kept for inspection; the oldest are evicted past this count.
    pub max_dead_letters: u64,
    /// How long received messages may gather before one commit. Longer means fewer, larger
    /// writes (less disk wear) and later acks; throughput per broker is at most its inflight
    /// window divided by this.
    pub commit_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// How long a partly filled frame may wait for more records before it is sent.
    pub linger: Duration,
    /// Target uncompressed bytes per frame.
    pub frame_bytes: u64,
    pub zstd_level: i32,
    /// Larger messages go to the dead-letter table (reason `oversize`).
    pub max_message_bytes: u64,
    /// Most bytes (frames and keys) in one destination call, below the destination's own limit
    /// (Kinesis: 5 MiB). Smaller calls hold less memory and match a shard's 1 MiB/s.
    pub max_call_bytes: u64,
}

#[derive(Clone)]
pub struct BrokerConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub protocol: MqttProtocol,
    pub client_id: String,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Messages received but not yet committed; reading pauses past this.
    pub max_unacked: u32,
    /// Largest MQTT packet accepted from the broker.
    pub max_packet_bytes: u64,
    /// Explicit subscriptions (QoS 1); `None` subscribes to the routes' filters.
    pub subscribe: Option<Vec<TopicFilter>>,
    /// `Some` connects over TLS.
    pub tls: Option<TlsConfig>,
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("protocol", &self.protocol)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub filters: Vec<TopicFilter>,
    pub destination: String,
    pub partition_key: KeyTemplate,
    /// Chooses the shard instead of the partition key's MD5: a 128-bit decimal as written,
    /// or the MD5 of what the template renders (e.g. spread one gateway's records over the
    /// shards by device while the partition key stays the gateway).
    pub explicit_hash_key: Option<KeyTemplate>,
    pub qos: u8,
    pub format: FrameFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DestinationConfig {
    Kinesis(KinesisConfig),
    Directory { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
pub struct KinesisConfig {
    pub stream: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub max_record_bytes: u64,
    /// What the shipper paces each shard to (Kinesis: 1 MiB/s and 1,000 records/s).
    pub shard_limits: crate::pacing::ShardLimits,
}

impl DestinationConfig {
    /// Largest single record (frame + partition key) this destination takes.
    pub fn max_record_bytes(&self) -> u64 {
        match self {
            DestinationConfig::Kinesis(k) => k.max_record_bytes,
            DestinationConfig::Directory { .. } => KINESIS_MAX_RECORD_BYTES,
        }
    }
}

/// A config that could not be loaded: which file, where in it, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}{location}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// ":LINE:COLUMN" (1-based) when the mistake has a place in the file, else empty.
    pub location: String,
    pub message: String,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            location: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let source = Source::new(text, file);
        let raw: RawConfig = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        validate(raw, &source)
    }

    /// The local file with a fleet document's sections in place of its own: `route`,
    /// `destination`, `batch` and `shutdown_timeout` replace the local ones when present,
    /// `[spool]` replaces the local limits (the file and sync level stay). Errors in those
    /// sections name the document (`pushed_name`) and its line; the rest, the local file.
    pub fn parse_layered(
        base_text: &str,
        base_file: &str,
        pushed_text: &str,
        pushed_name: &str,
    ) -> Result<Config, ConfigError> {
        let base = Source::new(base_text, base_file);
        let mut raw: RawConfig = toml::from_str(base_text).map_err(|e| base.toml_error(&e))?;
        let pushed_src = Source::new(pushed_text, pushed_name);
        let pushed: RawPushed = toml::from_str(pushed_text).map_err(|e| {
            let mut err = pushed_src.toml_error(&e);
            if err.message.contains("unknown field") {
                err.message.push_str(
                    " (a fleet document sets route, destination, batch, spool limits and shutdown_timeout; brokers, gateway_id, admin, aws, fleet and the spool's path and sync stay in the local file)",
                );
            }
            err
        })?;
        let mut sections = Vec::new();
        if let Some(routes) = pushed.route {
            raw.route = routes;
            sections.push("route");
        }
        if let Some(destinations) = pushed.destination {
            raw.destination = destinations;
            sections.push("destination");
        }
        if let Some(batch) = pushed.batch {
            raw.batch = batch;
            sections.push("batch");
        }
        if let Some(limits) = pushed.spool {
            raw.spool.max_bytes = limits.max_bytes;
            raw.spool.full_policy = limits.full_policy;
            raw.spool.max_dead_letters = limits.max_dead_letters;
            raw.spool.commit_interval = limits.commit_interval;
            sections.push("spool");
        }
        if let Some(t) = pushed.shutdown_timeout {
            raw.shutdown_timeout = Some(t);
        }
        let source = Source {
            overlay: Some((pushed_text, pushed_name, sections)),
            ..base
        };
        validate(raw, &source)
    }

    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }
}

struct Source<'a> {
    text: &'a str,
    file: &'a str,
    /// A fleet document layered over `text`, and the top-level sections it supplied: errors
    /// in those sections point into it.
    overlay: Option<(&'a str, &'a str, Vec<&'static str>)>,
}

impl<'a> Source<'a> {
    fn new(text: &'a str, file: &'a str) -> Source<'a> {
        Source {
            text,
            file,
            overlay: None,
        }
    }

    /// The text and name a field's section came from.
    fn origin(&self, field: &str) -> (&'a str, &'a str) {
        let section = field.split(['.', ' ']).next().unwrap_or("");
        match &self.overlay {
            Some((text, file, sections)) if sections.contains(&section) => (text, file),
            _ => (self.text, self.file),
        }
    }

    fn line_col(text: &str, offset: usize) -> (usize, usize) {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    fn error_at(&self, span: Option<Range<usize>>, field: &str, message: String) -> ConfigError {
        let (text, file) = self.origin(field);
        let location = span
            .map(|s| {
                let (line, col) = Source::line_col(text, s.start);
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        let message = if field.is_empty() {
            message
        } else {
            format!("field `{field}`: {message}")
        };
        ConfigError {
            file: file.to_string(),
            location,
            message,
        }
    }

    /// Turns a TOML/serde error into one line naming the field found at its position.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let field = span
            .as_ref()
            .and_then(|s| {
                let line_start = self.text[..s.start.min(self.text.len())]
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                let line = self.text[line_start..].lines().next().unwrap_or("");
                let line = line.trim();
                if line.starts_with('[') {
                    Some(
                        line.trim_matches(|c| c == '[' || c == ']')
                            .trim()
                            .to_string(),
                    )
                } else {
                    line.split_once('=').map(|(k, _)| k.trim().to_string())
                }
            })
            .unwrap_or_default();
        let message = e.message().trim().replace('\n', " ");
        self.error_at(span, &field, message)
    }
}

fn validate(raw: RawConfig, src: &Source) -> Result<Config, ConfigError> {
    let gateway_id = match raw.gateway_id {
        Some(id) => {
            let span = id.span();
            let id = id.into_inner();
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(src.error_at(
                    Some(span),
                    "gateway_id",
                    format!("`{id}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'"),
                ));
            }
            id
        }
        None => default_gateway_id(),
    };

    let spool = SpoolConfig {
        path: PathBuf::from(
            raw.spool
                .path
                .unwrap_or_else(|| "/var/lib/edgeship/spool.db".into()),
        ),
        max_bytes: raw.spool.max_bytes.unwrap_or(ByteSize(512 << 20)).bytes(),
        full_policy: raw.spool.full_policy.unwrap_or(FullPolicy::Block),
        sync: raw.spool.sync.unwrap_or(SyncLevel::Normal),
        max_dead_letters: raw.spool.max_dead_letters.unwrap_or(10_000),
        commit_interval: raw
            .spool
            .commit_interval
            .map_or(Duration::from_millis(10), |d| d.0),
    };
    if spool.commit_interval > Duration::from_secs(1) {
        return Err(src.error_at(
            None,
            "spool.commit_interval",
            "must be at most 1s (acks wait this long)".into(),
        ));
    }
    if spool.max_bytes < (1 << 20) {
        return Err(src.error_at(None, "spool.max_bytes", "must be at least 1MiB".into()));
    }

    let zstd_level = match raw.batch.zstd_level {
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
    let batch = BatchConfig {
        linger: raw.batch.linger.map_or(Duration::from_secs(1), |d| d.0),
        frame_bytes: raw.batch.frame_bytes.unwrap_or(ByteSize(1 << 20)).bytes(),
        zstd_level,
        max_message_bytes: raw
            .batch
            .max_message_bytes
            .unwrap_or(ByteSize(256 << 10))
            .bytes(),
        max_call_bytes: raw
            .batch
            .max_call_bytes
            .unwrap_or(ByteSize(1 << 20))
            .bytes(),
    };
    if !(64 << 10..=5 << 20).contains(&batch.max_call_bytes) {
        return Err(src.error_at(
            None,
            "batch.max_call_bytes",
            "must be between 64KiB and 5MiB (the PutRecords limit)".into(),
        ));
    }
    if batch.frame_bytes < (64 << 10) || batch.frame_bytes > (64 << 20) {
        return Err(src.error_at(
            None,
            "batch.frame_bytes",
            "must be between 64KiB and 64MiB".into(),
        ));
    }
    // Each route's destination must also leave RECORD_ROOM above it (checked per route).
    if batch.max_message_bytes == 0 || batch.max_message_bytes > (9 << 20) {
        return Err(src.error_at(
            None,
            "batch.max_message_bytes",
            "must be between 1B and 9MiB (a message must fit in one Kinesis record, 10MiB at most)"
                .into(),
        ));
    }

    let mut destinations = BTreeMap::new();
    for (name, dest) in raw.destination {
        let span = dest.span();
        let dest = match dest.into_inner() {
            RawDestination::Kinesis {
                stream,
                region,
                endpoint,
                max_record_bytes,
                shard_write_bytes_per_sec,
                shard_write_records_per_sec,
            } => {
                let defaults = crate::pacing::ShardLimits::KINESIS;
                let shard_limits = crate::pacing::ShardLimits {
                    records_per_sec: shard_write_records_per_sec
                        .map_or(defaults.records_per_sec, f64::from),
                    bytes_per_sec: shard_write_bytes_per_sec
                        .map_or(defaults.bytes_per_sec, |b| b.bytes() as f64),
                };
                if shard_limits.records_per_sec < 1.0 || shard_limits.bytes_per_sec < 1024.0 {
                    return Err(src.error_at(
                        Some(span),
                        &format!("destination.{name}.shard_write_bytes_per_sec"),
                        "shard write limits must be at least 1 record and 1KiB per second".into(),
                    ));
                }
                let max_record_bytes =
                    max_record_bytes.map_or(KINESIS_MAX_RECORD_BYTES, |b| b.bytes());
                if !(64 << 10..=KINESIS_MAX_RECORD_BYTES_RAISED).contains(&max_record_bytes) {
                    return Err(src.error_at(
                        Some(span),
                        &format!("destination.{name}.max_record_bytes"),
                        "must be between 64KiB and 10MiB (the Kinesis maximum)".into(),
                    ));
                }
                if stream.is_empty() || stream.len() > 128 {
                    return Err(src.error_at(
                        Some(span),
                        &format!("destination.{name}.stream"),
                        "a Kinesis stream name has 1 to 128 characters".into(),
                    ));
                }
                if let Some(ep) = &endpoint {
                    if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                        return Err(src.error_at(
                            Some(span),
                            &format!("destination.{name}.endpoint"),
                            format!("`{ep}` must start with http:// or https://"),
                        ));
                    }
                }
                DestinationConfig::Kinesis(KinesisConfig {
                    stream,
                    region,
                    endpoint,
                    max_record_bytes,
                    shard_limits,
                })
            }
            RawDestination::Directory { path } => DestinationConfig::Directory {
                path: PathBuf::from(path),
            },
        };
        destinations.insert(name, dest);
    }

    let mut routes: Vec<RouteConfig> = Vec::new();
    for route in raw.route {
        let name_span = route.name.span();
        let name = route.name.into_inner();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(src.error_at(
                Some(name_span),
                "route.name",
                format!("`{name}` must be letters, digits, '-' or '_'"),
            ));
        }
        if routes.iter().any(|r| r.name == name) {
            return Err(src.error_at(
                Some(name_span),
                "route.name",
                format!("route `{name}` is defined twice"),
            ));
        }
        let dest_span = route.destination.span();
        let destination = route.destination.into_inner();
        let Some(dest) = destinations.get(&destination) else {
            let known: Vec<&str> = destinations.keys().map(String::as_str).collect();
            return Err(src.error_at(
                Some(dest_span),
                "route.destination",
                format!("route `{name}` names destination `{destination}`, which is not defined (defined: {known:?})"),
            ));
        };
        let topics_span = route.topics.span();
        let topics = route.topics.into_inner();
        if topics.is_empty() {
            return Err(src.error_at(
                Some(topics_span),
                "route.topics",
                format!("route `{name}` has no topic filter"),
            ));
        }
        let mut filters = Vec::new();
        for t in topics {
            filters.push(
                TopicFilter::parse(&t)
                    .map_err(|e| src.error_at(Some(topics_span.clone()), "route.topics", e))?,
            );
        }
        let partition_key = match route.partition_key {
            Some(t) => {
                let span = t.span();
                KeyTemplate::parse(&t.into_inner())
                    .map_err(|e| src.error_at(Some(span), "route.partition_key", e))?
            }
            None => KeyTemplate::parse("{gateway}").expect("default template parses"),
        };
        let explicit_hash_key = match route.explicit_hash_key {
            Some(t) => {
                let span = t.span();
                let text = t.into_inner();
                if text.contains('\0') {
                    return Err(src.error_at(
                        Some(span),
                        "route.explicit_hash_key",
                        "must not contain NUL".into(),
                    ));
                }
                let digits = !text.is_empty() && text.chars().all(|c| c.is_ascii_digit());
                if digits && text.parse::<u128>().is_err() {
                    return Err(src.error_at(
                        Some(span),
                        "route.explicit_hash_key",
                        format!("`{text}` is over the largest hash key, 2^128 - 1"),
                    ));
                }
                Some(
                    KeyTemplate::parse(&text)
                        .map_err(|e| src.error_at(Some(span), "route.explicit_hash_key", e))?,
                )
            }
            None => None,
        };
        let qos = match route.qos {
            Some(q) => {
                let span = q.span();
                let q = q.into_inner();
                if q > 2 {
                    return Err(src.error_at(
                        Some(span),
                        "route.qos",
                        format!("{q} is not an MQTT QoS (0, 1 or 2)"),
                    ));
                }
                q
            }
            None => 1,
        };
        // Room for the record's topic (MQTT allows 64KiB) and the frame's own bytes.
        if batch.max_message_bytes + RECORD_ROOM > dest.max_record_bytes() {
            return Err(src.error_at(
                Some(dest_span),
                "batch.max_message_bytes",
                format!(
                    "must leave 65KiB of room (topic and framing) under destination `{destination}`'s max_record_bytes"
                ),
            ));
        }
        routes.push(RouteConfig {
            name,
            filters,
            destination,
            partition_key,
            explicit_hash_key,
            qos,
            format: route.format.unwrap_or_default(),
        });
    }
    if routes.is_empty() {
        return Err(src.error_at(None, "route", "at least one [[route]] is needed".into()));
    }

    let mut brokers = Vec::new();
    for (i, b) in raw.broker.into_iter().enumerate() {
        let name = b.name.unwrap_or_else(|| format!("broker{i}"));
        let host_span = b.host.span();
        let host = b.host.into_inner();
        if host.is_empty() {
            return Err(src.error_at(Some(host_span), "broker.host", "must not be empty".into()));
        }
        let client_id = b
            .client_id
            .map(|c| c.into_inner())
            .unwrap_or_else(|| "edgeship-{gateway}".to_string())
            .replace("{gateway}", &gateway_id);
        let max_unacked = match b.max_unacked {
            Some(m) if *m.get_ref() == 0 => {
                return Err(src.error_at(
                    Some(m.span()),
                    "broker.max_unacked",
                    "must be at least 1".into(),
                ))
            }
            Some(m) => m.into_inner(),
            None => 1000,
        };
        let max_packet_bytes = b.max_packet_bytes.map_or(16 << 20, |s| s.bytes());
        if max_packet_bytes < batch.max_message_bytes {
            return Err(src.error_at(
                None,
                "broker.max_packet_bytes",
                "must be at least batch.max_message_bytes, so oversize messages can be dead-lettered".into(),
            ));
        }
        let subscribe = match b.subscribe {
            Some(list) => {
                let span = list.span();
                let mut filters = Vec::new();
                for f in list.into_inner() {
                    filters
                        .push(TopicFilter::parse(&f).map_err(|e| {
                            src.error_at(Some(span.clone()), "broker.subscribe", e)
                        })?);
                }
                if filters.is_empty() {
                    return Err(src.error_at(
                        Some(span),
                        "broker.subscribe",
                        "must not be empty (leave it out to subscribe to the routes' filters)"
                            .into(),
                    ));
                }
                Some(filters)
            }
            None => None,
        };
        let tls = match b.tls {
            Some(t) => {
                let span = t.span();
                Some(tls_config(
                    t.into_inner(),
                    src,
                    span,
                    &format!("broker `{name}` tls"),
                )?)
            }
            None => None,
        };
        brokers.push(BrokerConfig {
            subscribe,
            port: b.port.unwrap_or(if tls.is_some() { 8883 } else { 1883 }),
            tls,
            name,
            host,
            protocol: b.protocol.unwrap_or(MqttProtocol::V311),
            client_id,
            keep_alive: b.keep_alive.map_or(Duration::from_secs(30), |d| d.0),
            username: b.username,
            password: b.password,
            max_unacked,
            max_packet_bytes,
        });
    }
    if brokers.is_empty() {
        return Err(src.error_at(None, "broker", "at least one [[broker]] is needed".into()));
    }

    let admin = match raw.admin.listen {
        Some(l) if l.get_ref() == "off" => AdminConfig { listen: None },
        Some(l) => {
            let span = l.span();
            let text = l.into_inner();
            let addr = text.parse::<std::net::SocketAddr>().map_err(|_| {
                src.error_at(
                    Some(span),
                    "admin.listen",
                    format!("`{text}` is not an IP:port address (or \"off\")"),
                )
            })?;
            AdminConfig { listen: Some(addr) }
        }
        None => AdminConfig {
            listen: Some(
                DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("default address parses"),
            ),
        },
    };

    let aws = AwsConfig {
        iot_credentials: match raw.aws.iot_credentials {
            Some(iot) => Some(iot_credentials(iot, &gateway_id, src)?),
            None => None,
        },
    };

    let fleet = match raw.fleet {
        Some(f) => Some(fleet_config(f, &gateway_id, &brokers, &spool, src)?),
        None => None,
    };

    Ok(Config {
        fleet,
        aws,
        gateway_id,
        shutdown_timeout: raw
            .shutdown_timeout
            .map_or(Duration::from_secs(10), |d| d.0),
        spool,
        batch,
        brokers,
        routes,
        destinations,
        admin,
    })
}

/// A topic level made of this text stays one level and matches no wildcard.
fn is_topic_level(text: &str) -> bool {
    !text.is_empty() && !text.contains(['/', '+', '#', '\0'])
}

fn fleet_config(
    raw: toml::Spanned<raw::RawFleet>,
    gateway_id: &str,
    brokers: &[BrokerConfig],
    spool: &SpoolConfig,
    src: &Source,
) -> Result<FleetConfig, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let keys_span = raw.keys.span();
    let mut keys = Vec::new();
    for k in raw.keys.into_inner() {
        keys.push(
            crate::fleet::document::parse_public_key(&k)
                .map_err(|e| src.error_at(Some(keys_span.clone()), "fleet.keys", e))?,
        );
    }
    if keys.is_empty() {
        return Err(src.error_at(
            Some(keys_span),
            "fleet.keys",
            "list at least one public key (edgeship fleet keygen prints one)".into(),
        ));
    }
    let groups = raw.groups.unwrap_or_default();
    if let Some(g) = groups.iter().find(|g| !is_topic_level(g)) {
        return Err(src.error_at(
            Some(span.clone()),
            "fleet.groups",
            format!("`{g}` must be a non-empty topic level (no '/', '+', '#')"),
        ));
    }
    let topic_prefix = match raw.topic_prefix {
        Some(p) => {
            let text = p.get_ref().trim_end_matches('/').to_string();
            if text.is_empty() || text.contains(['+', '#', '\0']) {
                return Err(src.error_at(
                    Some(p.span()),
                    "fleet.topic_prefix",
                    format!("`{}` must be a topic without wildcards", p.get_ref()),
                ));
            }
            text
        }
        None => "edgeship".into(),
    };
    let broker = match raw.broker {
        Some(b) => {
            if !brokers.iter().any(|x| &x.name == b.get_ref()) {
                let known: Vec<&str> = brokers.iter().map(|x| x.name.as_str()).collect();
                return Err(src.error_at(
                    Some(b.span()),
                    "fleet.broker",
                    format!(
                        "no [[broker]] is named `{}` (defined: {known:?})",
                        b.get_ref()
                    ),
                ));
            }
            b.into_inner()
        }
        None => brokers[0].name.clone(),
    };
    let base_client = &brokers
        .iter()
        .find(|b| b.name == broker)
        .expect("checked above")
        .client_id;
    let state_dir = match raw.state_dir {
        Some(d) => PathBuf::from(d),
        None => spool
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    let health_timeout = raw.health_timeout.map_or(Duration::from_secs(30), |d| d.0);
    if health_timeout < Duration::from_secs(1) {
        return Err(src.error_at(
            Some(span.clone()),
            "fleet.health_timeout",
            "must be at least 1s".into(),
        ));
    }
    Ok(FleetConfig {
        keys,
        groups,
        topic_prefix,
        client_id: raw
            .client_id
            .map(|c| c.replace("{gateway}", gateway_id))
            .unwrap_or_else(|| format!("{base_client}-fleet")),
        broker,
        file: raw.file.map(PathBuf::from),
        state_dir,
        health_timeout,
        status_interval: raw.status_interval.map_or(Duration::from_secs(60), |d| d.0),
        shadow: match raw.shadow {
            Some(sh) => {
                let shadow = ShadowConfig {
                    thing_name: sh.thing_name.unwrap_or_else(|| gateway_id.to_string()),
                    name: sh.name.unwrap_or_else(|| "edgeship".into()),
                };
                if !is_topic_level(&shadow.thing_name) || !is_topic_level(&shadow.name) {
                    return Err(src.error_at(
                        Some(span),
                        "fleet.shadow",
                        "thing_name and name must be single topic levels (no '/', '+', '#')".into(),
                    ));
                }
                Some(shadow)
            }
            None => None,
        },
    })
}

fn default_gateway_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(64)
        .collect();
    if id.is_empty() {
        "gateway".into()
    } else {
        id
    }
}

fn tls_config(
    raw: raw::RawTls,
    src: &Source,
    span: Range<usize>,
    what: &str,
) -> Result<TlsConfig, ConfigError> {
    if raw.client_cert.is_some() != raw.client_key.is_some() {
        return Err(src.error_at(
            Some(span),
            what,
            "client_cert and client_key go together: set both or neither".into(),
        ));
    }
    let alpn = raw.alpn.unwrap_or_default();
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(src.error_at(
            Some(span),
            what,
            "each alpn protocol name has 1 to 255 bytes".into(),
        ));
    }
    Ok(TlsConfig {
        ca_file: raw.ca_file.map(PathBuf::from),
        client_cert: raw.client_cert.map(PathBuf::from),
        client_key: raw.client_key.map(PathBuf::from),
        alpn,
    })
}

fn iot_credentials(
    raw: toml::Spanned<raw::RawIotCredentials>,
    gateway_id: &str,
    src: &Source,
) -> Result<IotCredentialsConfig, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let field = "aws.iot_credentials";
    let endpoint = if raw.endpoint.starts_with("https://") {
        raw.endpoint.trim_end_matches('/').to_string()
    } else if raw.endpoint.contains("://") {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.endpoint"),
            format!("`{}` must be a host name or an https:// URL", raw.endpoint),
        ));
    } else {
        format!("https://{}", raw.endpoint.trim_end_matches('/'))
    };
    if endpoint.len() <= "https://".len() {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.endpoint"),
            "must not be empty".into(),
        ));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:=@,+".contains(c))
    };
    if !name_ok(&raw.role_alias) {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.role_alias"),
            format!("`{}` is not a role alias name", raw.role_alias),
        ));
    }
    let thing_name = raw.thing_name.unwrap_or_else(|| gateway_id.to_string());
    if !name_ok(&thing_name) {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.thing_name"),
            format!("`{thing_name}` is not a thing name"),
        ));
    }
    Ok(IotCredentialsConfig {
        endpoint,
        role_alias: raw.role_alias,
        thing_name,
        tls: TlsConfig {
            ca_file: raw.ca_file.map(PathBuf::from),
            client_cert: Some(PathBuf::from(raw.cert)),
            client_key: Some(PathBuf::from(raw.key)),
            alpn: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
gateway_id = "gw-1"
[[broker]]
host = "127.0.0.1"
[[route]]
name = "telemetry"
topics = ["devices/+/telemetry"]
destination = "main"
partition_key = "{topic[1]}"
[destination.main]
type = "kinesis"
stream = "s"
"#;

    #[test]
    fn embedded_default_config_is_valid() {
        Config::parse(DEFAULT_CONFIG, "default").expect("default config validates");
    }

    const BASE: &str = r#"
gateway_id = "gw"
[spool]
path = "/var/lib/x/spool.db"
max_bytes = "64MiB"
[[broker]]
name = "b"
host = "h"
[[route]]
name = "t"
topics = ["devices/+/telemetry"]
destination = "d"
[destination.d]
type = "directory"
path = "/tmp/x"
[fleet]
keys = ["ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
groups = ["plant"]
"#;

    #[test]
    fn a_fleet_document_replaces_its_sections_and_keeps_the_local_ones() {
        let pushed = r#"
[spool]
max_bytes = "128MiB"
[[route]]
name = "alerts"
topics = ["alerts/#"]
destination = "k"
[destination.k]
type = "kinesis"
stream = "s"
"#;
        let c = Config::parse_layered(BASE, "local.toml", pushed, "doc v3").unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].name, "alerts");
        assert!(c.destinations.contains_key("k") && !c.destinations.contains_key("d"));
        assert_eq!(c.spool.max_bytes, 128 << 20);
        assert_eq!(c.spool.path, PathBuf::from("/var/lib/x/spool.db"));
        assert_eq!(c.gateway_id, "gw");
        let fleet = c.fleet.unwrap();
        assert_eq!(fleet.state_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(fleet.client_id, "edgeship-gw-fleet");
        assert_eq!(fleet.groups, ["plant"]);
        // Without a [batch] in the document, the local one stays.
        assert_eq!(c.batch, Config::parse(BASE, "b").unwrap().batch);
    }

    #[test]
    fn fleet_document_errors_name_the_document_and_its_line() {
        let e = Config::parse_layered(BASE, "local.toml", "[spool]\npath = \"/x\"\n", "doc v3")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("doc v3:2:1: field `path`: unknown field `path`"),
            "{e}"
        );
        assert!(e.contains("stay in the local file"), "{e}");
        let e = Config::parse_layered(
            BASE,
            "local.toml",
            "[[route]]\nname = \"r\"\ntopics = [\"a\"]\ndestination = \"nowhere\"\n",
            "doc v4",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("doc v4:4:15: field `route.destination`"),
            "{e}"
        );
        let e = Config::parse(&BASE.replace("AAAA=", "AA="), "local.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("local.toml:17:8: field `fleet.keys`"), "{e}");
        let e = Config::parse(&format!("{BASE}broker = \"nope\"\n"), "local.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[broker]] is named `nope`"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "m.toml").unwrap();
        assert_eq!(c.gateway_id, "gw-1");
        assert_eq!(c.brokers[0].port, 1883);
        assert_eq!(c.brokers[0].client_id, "edgeship-gw-1");
        assert_eq!(c.routes[0].qos, 1);
        assert_eq!(c.spool.full_policy, FullPolicy::Block);
    }

    #[test]
    fn tls_and_iot_credentials_sections_parse_and_check_pairs() {
        let text = MINIMAL.replace(
            "[[broker]]\n",
            "[[broker]]\ntls = { ca_file = \"/etc/edgeship/ca.pem\", alpn = [\"x-amzn-mqtt-ca\"] }\n",
        ) + "[aws.iot_credentials]\nendpoint = \"c1.credentials.iot.eu-west-1.amazonaws.com\"\n\
               role_alias = \"edgeship\"\ncert = \"/etc/edgeship/gw.crt\"\nkey = \"/etc/edgeship/gw.key\"\n";
        let c = Config::parse(&text, "m.toml").unwrap();
        let b = &c.brokers[0];
        assert_eq!(b.port, 8883, "TLS without a port means 8883");
        assert_eq!(b.tls.as_ref().unwrap().alpn, vec!["x-amzn-mqtt-ca"]);
        let iot = c.aws.iot_credentials.unwrap();
        assert_eq!(
            iot.endpoint,
            "https://c1.credentials.iot.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            iot.thing_name, "gw-1",
            "the thing name defaults to the gateway id"
        );
        let half = MINIMAL.replace(
            "[[broker]]\n",
            "[[broker]]\ntls = { client_cert = \"/etc/edgeship/gw.crt\" }\n",
        );
        let e = Config::parse(&half, "m.toml").unwrap_err().to_string();
        assert!(e.contains("client_cert and client_key go together"), "{e}");
        let http = text.replace("endpoint = \"c1.", "endpoint = \"http://c1.");
        let e = Config::parse(&http, "m.toml").unwrap_err().to_string();
        assert!(e.contains("must be a host name or an https:// URL"), "{e}");
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = MINIMAL.replace("[[broker]]\n", "[[broker]]\nhots = \"x\"\n");
        let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.starts_with("m.toml:4:"), "{e}");
        assert!(e.contains("hots"), "{e}");
    }

    #[test]
    fn bad_unit_names_line_and_field() {
        let text = format!("{MINIMAL}[spool]\nmax_bytes = \"12 parsecs\"\n");
        let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.contains("m.toml:14:13:"), "{e}");
        assert!(e.contains("field `max_bytes`"), "{e}");
        assert!(e.contains("unknown size unit"), "{e}");
    }

    #[test]
    fn unknown_destination_is_refused_with_its_line() {
        let text = MINIMAL.replace("destination = \"main\"", "destination = \"nope\"");
        let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.contains("m.toml:8:"), "{e}");
        assert!(e.contains("`nope`"), "{e}");
    }

    #[test]
    fn password_is_not_in_debug_output() {
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"",
            "host = \"h\"\npassword = \"hunter2\"",
        );
        let c = Config::parse(&text, "m.toml").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
