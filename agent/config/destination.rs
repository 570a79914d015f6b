//! `[destination.NAME]`: where routes ship, each checked against its service's own limits
//! (which the destination's module states).

use super::raw::RawDestination;
use super::source::{ConfigError, Source};
use crate::sink::call::ShardLimits;
use crate::sink::directory::{self, DirectoryConfig};
use crate::sink::firehose::{self, FirehoseConfig};
use crate::sink::kafka::{self, CreateTopic, KafkaConfig, KafkaRecords, KafkaSasl};
use crate::sink::kinesis::{self, KinesisConfig};
use crate::sink::s3::{
    self, layout::KeyTemplate, Compression, ObjectFormat, S3Config, UploadWindow,
};
use crate::sink::DestinationConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// Largest single record (data and key) a destination takes, as configured.
pub(crate) fn max_record_bytes(destination: &DestinationConfig) -> u64 {
    match destination {
        DestinationConfig::Kinesis(k) => k.max_record_bytes,
        DestinationConfig::Directory(_) => directory::MAX_RECORD_BYTES,
        // A record larger than an object's window still makes one object of its own.
        DestinationConfig::S3(_) => u64::MAX,
        DestinationConfig::Firehose(f) => f.max_record_bytes,
        DestinationConfig::Kafka(k) => k.max_record_bytes(),
    }
}

/// An error in field `field` of destination `name`, at the section's place in the file.
fn field_error(
    src: &Source,
    span: &std::ops::Range<usize>,
    name: &str,
    field: &str,
    why: &str,
) -> ConfigError {
    src.error_at(
        Some(span.clone()),
        &format!("destination.{name}.{field}"),
        why,
    )
}

/// An endpoint override is an http(s) URL.
fn check_endpoint(
    endpoint: Option<&str>,
    name: &str,
    span: std::ops::Range<usize>,
    src: &Source,
) -> Result<(), ConfigError> {
    match endpoint {
        Some(ep) if !(ep.starts_with("http://") || ep.starts_with("https://")) => Err(src
            .error_at(
                Some(span),
                &format!("destination.{name}.endpoint"),
                format!("`{ep}` must start with http:// or https://"),
            )),
        _ => Ok(()),
    }
}

pub(super) fn destinations(
    raw: BTreeMap<String, Spanned<RawDestination>>,
    src: &Source,
) -> Result<BTreeMap<String, DestinationConfig>, ConfigError> {
    let mut destinations = BTreeMap::new();
    for (name, dest) in raw {
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
                let defaults = kinesis::limits::SHARD;
                let shard_limits = ShardLimits {
                    records_per_sec: shard_write_records_per_sec
                        .map_or(defaults.records_per_sec, f64::from),
                    bytes_per_sec: shard_write_bytes_per_sec
                        .map_or(defaults.bytes_per_sec, |b| b.bytes() as f64),
                };
                if shard_limits.records_per_sec < 1.0 || shard_limits.bytes_per_sec < 1024.0 {
                    return Err(src.error_at(
                        Some(span),
                        &format!("destination.{name}.shard_write_bytes_per_sec"),
                        "shard write limits must be at least 1 record and 1KiB per second",
                    ));
                }
                let max_record_bytes =
                    max_record_bytes.map_or(kinesis::limits::MAX_RECORD_BYTES, |b| b.bytes());
                if !(64 << 10..=kinesis::limits::MAX_RECORD_BYTES_RAISED)
                    .contains(&max_record_bytes)
                {
                    return Err(src.error_at(
                        Some(span),
                        &format!("destination.{name}.max_record_bytes"),
                        "must be between 64KiB and 10MiB (the Kinesis maximum)",
                    ));
                }
                if stream.is_empty() || stream.len() > 128 {
                    return Err(src.error_at(
                        Some(span),
                        &format!("destination.{name}.stream"),
                        "a Kinesis stream name has 1 to 128 characters",
                    ));
                }
                check_endpoint(endpoint.as_deref(), &name, span.clone(), src)?;
                DestinationConfig::Kinesis(KinesisConfig {
                    stream,
                    region,
                    endpoint,
                    max_record_bytes,
                    shard_limits,
                })
            }
            RawDestination::Directory { path } => DestinationConfig::Directory(DirectoryConfig {
                path: PathBuf::from(path),
            }),
            RawDestination::S3 {
                bucket,
                prefix,
                region,
                endpoint,
                path_style,
                key_template,
                format,
                compression,
                compression_level,
                max_object_bytes,
                max_object_age,
                part_bytes,
                upload_windows,
                sse_kms_key_id,
            } => {
                let at = |field: &str, why: String| {
                    src.error_at(
                        Some(span.clone()),
                        &format!("destination.{name}.{field}"),
                        why,
                    )
                };
                // Bucket names: 3-63 lower-case letters, digits, dots and hyphens.
                let bucket_ok = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                    });
                if !bucket_ok {
                    return Err(at(
                        "bucket",
                        format!("`{bucket}` is not an S3 bucket name (3 to 63 lower-case letters, digits, dots, hyphens)"),
                    ));
                }
                if let Some(ep) = &endpoint {
                    if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                        return Err(at(
                            "endpoint",
                            format!("`{ep}` must start with http:// or https://"),
                        ));
                    }
                }
                let key_template = KeyTemplate::parse(
                    key_template
                        .as_deref()
                        .unwrap_or(s3::layout::DEFAULT_TEMPLATE),
                )
                .map_err(|why| at("key_template", why))?;
                let format =
                    match format.as_deref().unwrap_or("ndjson") {
                        "ndjson" => ObjectFormat::Ndjson,
                        "parquet" if cfg!(feature = "parquet") => ObjectFormat::Parquet,
                        "parquet" => return Err(at(
                            "format",
                            "this build has no Parquet (cargo feature `parquet`); use \"ndjson\""
                                .into(),
                        )),
                        other => {
                            return Err(at(
                                "format",
                                format!("`{other}` is not one of ndjson, parquet"),
                            ))
                        }
                    };
                if format == ObjectFormat::Parquet
                    && compression.as_deref().is_some_and(|c| c != "zstd")
                {
                    return Err(at(
                        "compression",
                        "Parquet objects are compressed with zstd, inside".into(),
                    ));
                }
                let compression = match compression.as_deref().unwrap_or("zstd") {
                    "zstd" => Compression::Zstd,
                    "gzip" => Compression::Gzip,
                    other => {
                        return Err(at(
                            "compression",
                            format!("`{other}` is not one of zstd, gzip"),
                        ))
                    }
                };
                let compression_level = compression_level.unwrap_or(match compression {
                    Compression::Zstd => 3,
                    Compression::Gzip => 6,
                });
                let levels = match compression {
                    Compression::Zstd => 1..=19,
                    Compression::Gzip => 1..=9,
                };
                if !levels.contains(&compression_level) {
                    return Err(at(
                        "compression_level",
                        format!("must be within {levels:?} for this compression"),
                    ));
                }
                let max_object_bytes = max_object_bytes.map_or(64 << 20, |b| b.bytes());
                let part_bytes = part_bytes.map_or(s3::MIN_PART_BYTES, |b| b.bytes());
                if part_bytes < s3::MIN_PART_BYTES {
                    return Err(at(
                        "part_bytes",
                        "must be at least 5MiB (S3's smallest part)".into(),
                    ));
                }
                if !(1 << 10..=4 << 30).contains(&max_object_bytes) {
                    return Err(at(
                        "max_object_bytes",
                        "must be between 1KiB and 4GiB".into(),
                    ));
                }
                // Even incompressible payloads (written as base64, 4/3 and the line's fields)
                // stay within S3's 10,000 parts.
                if max_object_bytes * 2 > part_bytes * s3::MAX_PARTS {
                    return Err(at(
                        "part_bytes",
                        "too small for max_object_bytes: an object could need more than 10,000 parts".into(),
                    ));
                }
                let max_object_age = max_object_age.map_or(Duration::from_secs(15 * 60), |d| d.0);
                if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&max_object_age) {
                    return Err(at(
                        "max_object_age",
                        "must be between 1s and 1h (objects close at the hour anyway)".into(),
                    ));
                }
                let mut windows = Vec::new();
                for w in upload_windows.unwrap_or_default() {
                    windows.push(UploadWindow::parse(&w).ok_or_else(|| {
                        at(
                            "upload_windows",
                            format!("`{w}` is not a local time span HH:MM-HH:MM"),
                        )
                    })?);
                }
                DestinationConfig::S3(S3Config {
                    bucket,
                    prefix: prefix.unwrap_or_default().trim_matches('/').to_string(),
                    region,
                    endpoint,
                    path_style: path_style.unwrap_or(false),
                    key_template,
                    format,
                    compression,
                    compression_level,
                    max_object_bytes,
                    max_object_age,
                    part_bytes,
                    upload_windows: windows,
                    sse_kms_key_id,
                })
            }
            RawDestination::Firehose {
                delivery_stream,
                region,
                endpoint,
                max_record_bytes,
            } => {
                let at = |field: &str, why: &str| field_error(src, &span, &name, field, why);
                // Delivery stream names: 1-64 letters, digits, underscores, hyphens, dots.
                let named = (1..=64).contains(&delivery_stream.len())
                    && delivery_stream
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                if !named {
                    return Err(at(
                        "delivery_stream",
                        "a Firehose delivery stream name has 1 to 64 letters, digits, `_`, `-`, `.`",
                    ));
                }
                let max_record_bytes =
                    max_record_bytes.map_or(firehose::MAX_RECORD_BYTES, |b| b.bytes());
                if !(64 << 10..=firehose::MAX_RECORD_BYTES).contains(&max_record_bytes) {
                    return Err(at(
                        "max_record_bytes",
                        "must be between 64KiB and 1000KiB (the Firehose maximum)",
                    ));
                }
                check_endpoint(endpoint.as_deref(), &name, span.clone(), src)?;
                DestinationConfig::Firehose(FirehoseConfig {
                    delivery_stream,
                    region,
                    endpoint,
                    max_record_bytes,
                })
            }
            RawDestination::Kafka {
                brokers,
                topic,
                records,
                message_max_bytes,
                tls,
                sasl,
                create_topic,
            } => {
                let at = |field: &str, why: &str| field_error(src, &span, &name, field, why);
                let address = |b: &String| {
                    b.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    })
                };
                if brokers.is_empty() || !brokers.iter().all(address) {
                    return Err(at(
                        "brokers",
                        "list the bootstrap brokers as \"host:port\" (at least one)",
                    ));
                }
                // Kafka topic names: 1-249 letters, digits, `.`, `_`, `-`.
                let named = (1..=249).contains(&topic.len())
                    && topic != "."
                    && topic != ".."
                    && topic
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !named {
                    return Err(at(
                        "topic",
                        "a Kafka topic name has 1 to 249 letters, digits, `.`, `_`, `-`",
                    ));
                }
                let records = match records.as_deref() {
                    None | Some("message") => KafkaRecords::Message,
                    Some("frame") => KafkaRecords::Frame,
                    Some(other) => {
                        return Err(at(
                            "records",
                            &format!("`{other}` is not one of \"message\" (one Kafka record per message) or \"frame\" (one per frame)"),
                        ))
                    }
                };
                let message_max_bytes =
                    message_max_bytes.map_or(kafka::DEFAULT_MESSAGE_MAX_BYTES, |b| b.bytes());
                if !(64 << 10..=256 << 20).contains(&message_max_bytes) {
                    return Err(at(
                        "message_max_bytes",
                        "must be between 64KiB and 256MiB (the brokers' message.max.bytes)",
                    ));
                }
                let tls = match tls {
                    Some(t) => Some(super::broker::tls(
                        t,
                        src,
                        span.clone(),
                        &format!("destination.{name}.tls"),
                    )?),
                    None => None,
                };
                let reauthenticate_every = sasl
                    .as_ref()
                    .and_then(|s| s.reauthenticate_every.as_ref())
                    .map(|d| d.0);
                if reauthenticate_every.is_some_and(|d| d < Duration::from_secs(1)) {
                    return Err(at(
                        "sasl.reauthenticate_every",
                        "must be at least 1s (set it below the brokers' connections.max.reauth.ms)",
                    ));
                }
                let sasl = match sasl {
                    None => None,
                    Some(s) => {
                        let mechanism = s.mechanism.to_ascii_lowercase();
                        let user = |s: &super::raw::RawKafkaSasl| match (&s.username, &s.password) {
                            (Some(u), Some(p)) if !u.is_empty() => Ok((u.clone(), p.clone())),
                            _ => Err(at(
                                "sasl",
                                &format!("mechanism `{mechanism}` needs `username` and `password`"),
                            )),
                        };
                        Some(match mechanism.as_str() {
                            "plain" => {
                                let (username, password) = user(&s)?;
                                KafkaSasl::Plain { username, password }
                            }
                            "scram-sha-256" => {
                                let (username, password) = user(&s)?;
                                KafkaSasl::ScramSha256 { username, password }
                            }
                            "scram-sha-512" => {
                                let (username, password) = user(&s)?;
                                KafkaSasl::ScramSha512 { username, password }
                            }
                            "aws-msk-iam" => {
                                if s.username.is_some() || s.password.is_some() {
                                    return Err(at(
                                        "sasl",
                                        "aws-msk-iam signs with the agent's AWS credentials: remove `username` and `password`",
                                    ));
                                }
                                if tls.is_none() {
                                    return Err(at(
                                        "tls",
                                        "aws-msk-iam needs TLS (MSK's IAM listener, port 9098): add a `tls` section",
                                    ));
                                }
                                KafkaSasl::AwsMskIam { region: s.region }
                            }
                            other => {
                                return Err(at(
                                    "sasl.mechanism",
                                    &format!("`{other}` is not one of plain, scram-sha-256, scram-sha-512, aws-msk-iam"),
                                ))
                            }
                        })
                    }
                };
                let create_topic = match create_topic {
                    None => None,
                    Some(c) => {
                        if !(1..=100_000).contains(&c.partitions) {
                            return Err(at(
                                "create_topic.partitions",
                                "must be between 1 and 100000",
                            ));
                        }
                        if !(1..=i64::from(i16::MAX)).contains(&c.replication_factor) {
                            return Err(at(
                                "create_topic.replication_factor",
                                "must be at least 1 and at most the cluster's brokers (3 on most MSK clusters)",
                            ));
                        }
                        Some(CreateTopic {
                            partitions: c.partitions as i32,
                            replication_factor: c.replication_factor as i16,
                        })
                    }
                };
                DestinationConfig::Kafka(KafkaConfig {
                    brokers,
                    topic,
                    records,
                    message_max_bytes,
                    tls,
                    sasl,
                    reauthenticate_every,
                    create_topic,
                })
            }
        };
        destinations.insert(name, dest);
    }

    Ok(destinations)
}
