//! `[destination.NAME]`: where routes ship, each checked against its service's own limits
//! (which the destination's module states).

use super::raw::RawDestination;
use super::source::{ConfigError, Source};
use crate::sink::call::ShardLimits;
use crate::sink::directory::{self, DirectoryConfig};
use crate::sink::kinesis::{self, KinesisConfig};
use crate::sink::DestinationConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use toml::Spanned;

/// Largest single record (data and key) a destination takes, as configured.
pub(crate) fn max_record_bytes(destination: &DestinationConfig) -> u64 {
    match destination {
        DestinationConfig::Kinesis(k) => k.max_record_bytes,
        DestinationConfig::Directory(_) => directory::MAX_RECORD_BYTES,
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
            RawDestination::Directory { path } => DestinationConfig::Directory(DirectoryConfig {
                path: PathBuf::from(path),
            }),
        };
        destinations.insert(name, dest);
    }

    Ok(destinations)
}
