//! `[[route]]`: which topics go to which destination, under which key, in which format.

use super::batch::BatchConfig;
use super::destination::max_record_bytes;
use super::raw::RawRoute;
use super::source::{ConfigError, Source};
use crate::frame::encoder::FrameFormat;
use crate::sink::DestinationConfig;
use crate::topic::{KeyTemplate, TopicFilter};
use std::collections::BTreeMap;

/// What a record needs beyond its message: its topic (MQTT allows 65,535 bytes) and the
/// frame's own bytes.
const RECORD_ROOM: u64 = 65 << 10;

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub(crate) name: String,
    pub(crate) filters: Vec<TopicFilter>,
    /// Where its records go: each destination takes every record (one copy in the spool,
    /// a cursor per destination). The first groups them into blocks by its shards.
    pub(crate) destinations: Vec<String>,
    pub(crate) partition_key: KeyTemplate,
    /// Chooses the shard instead of the partition key's MD5: a 128-bit decimal as written,
    /// or the MD5 of what the template renders (e.g. spread one gateway's records over the
    /// shards by device while the partition key stays the gateway).
    pub(crate) explicit_hash_key: Option<KeyTemplate>,
    pub(crate) qos: u8,
    pub(crate) format: FrameFormat,
}

pub(super) fn routes(
    raw: Vec<RawRoute>,
    destinations: &BTreeMap<String, DestinationConfig>,
    batch: &BatchConfig,
    src: &Source,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    for route in raw {
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
        let (dest_span, names, field) = match (route.destination, route.destinations) {
            (Some(one), None) => {
                let span = one.span();
                (span, vec![one.into_inner()], "route.destination")
            }
            (None, Some(list)) => {
                let span = list.span();
                (span, list.into_inner(), "route.destinations")
            }
            (Some(one), Some(_)) => {
                return Err(src.error_at(
                    Some(one.span()),
                    "route.destination",
                    format!("route `{name}` sets both `destination` and `destinations`; use one"),
                ))
            }
            (None, None) => {
                return Err(src.error_at(
                    Some(name_span),
                    "route.destination",
                    format!("route `{name}` has no `destination` (or `destinations = [...]`)"),
                ))
            }
        };
        if names.is_empty() {
            return Err(src.error_at(
                Some(dest_span),
                field,
                format!("route `{name}` names no destination"),
            ));
        }
        let mut dests = Vec::new();
        for (i, destination) in names.iter().enumerate() {
            if names[..i].contains(destination) {
                return Err(src.error_at(
                    Some(dest_span.clone()),
                    field,
                    format!("route `{name}` names destination `{destination}` twice"),
                ));
            }
            let Some(dest) = destinations.get(destination) else {
                let known: Vec<&str> = destinations.keys().map(String::as_str).collect();
                return Err(src.error_at(
                    Some(dest_span.clone()),
                    field,
                    format!("route `{name}` names destination `{destination}`, which is not defined (defined: {known:?})"),
                ));
            };
            dests.push((destination.clone(), dest));
        }
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
                        "must not contain NUL",
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
        for (destination, dest) in &dests {
            if batch.max_message_bytes + RECORD_ROOM > max_record_bytes(dest) {
                return Err(src.error_at(
                    Some(dest_span.clone()),
                    "batch.max_message_bytes",
                    format!(
                        "must leave 65KiB of room (topic and framing) under destination `{destination}`'s max_record_bytes"
                    ),
                ));
            }
        }
        routes.push(RouteConfig {
            name,
            filters,
            destinations: dests.into_iter().map(|(d, _)| d).collect(),
            partition_key,
            explicit_hash_key,
            qos,
            format: route.format.unwrap_or_default(),
        });
    }
    if routes.is_empty() {
        return Err(src.error_at(None, "route", "at least one [[route]] is needed"));
    }

    Ok(routes)
}
