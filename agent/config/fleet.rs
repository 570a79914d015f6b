//! `[fleet]`: the fleet config push this gateway takes (keys, groups, topics), and the text
//! form of the Ed25519 public keys it pins.

use super::broker::BrokerConfig;
use super::raw;
use super::source::{ConfigError, Source};
use super::spool::SpoolConfig;
use base64::Engine;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The fleet config push: signed documents on MQTT topics (and an optional local file) that
/// replace the routes, destinations, batching and spool limits while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleetConfig {
    /// Ed25519 public keys whose signatures are accepted; more than one during a rotation.
    pub(crate) keys: Vec<[u8; 32]>,
    /// Groups this gateway belongs to; each has its own config topic.
    pub(crate) groups: Vec<String>,
    /// Config topics are `{prefix}/config/gateway/{gateway_id}` and
    /// `{prefix}/config/group/{group}`; status goes to `{prefix}/status/{gateway_id}`.
    pub(crate) topic_prefix: String,
    /// Which `[[broker]]`'s connection settings the fleet channel uses.
    pub(crate) broker: String,
    /// The fleet channel's own MQTT client id (it is a second connection).
    pub(crate) client_id: String,
    /// A signed document read at start and on SIGHUP.
    pub(crate) file: Option<PathBuf>,
    /// Where the last known good document and the versions seen are kept.
    pub(crate) state_dir: PathBuf,
    /// How long an applied config has to show working connections before it is rolled back.
    pub(crate) health_timeout: Duration,
    /// How often the status document is published besides on every change.
    pub(crate) status_interval: Duration,
    /// Also take documents from an AWS IoT named shadow (desired) and report to it.
    pub(crate) shadow: Option<ShadowConfig>,
}

/// An AWS IoT Device Shadow carrying the fleet document: `state.desired.edgeship` holds the
/// signed envelope; the agent reports the applied one and its status under `state.reported`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShadowConfig {
    pub(crate) thing_name: String,
    pub(crate) name: String,
}

/// How a public key is written: `ed25519:<base64 of its 32 bytes>`.
pub(crate) const PUBLIC_PREFIX: &str = "ed25519:";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Text that is not an Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("`{0}` is not a public key: expected {PUBLIC_PREFIX}<base64>")]
    Prefix(String),
    #[error("public key `{text}`: not base64 ({why})")]
    Base64 { text: String, why: String },
    #[error("public key `{text}`: {len} bytes, an Ed25519 key has 32")]
    Length { text: String, len: usize },
}

/// `ed25519:<base64 of 32 bytes>` to the key's bytes.
pub(crate) fn parse_public_key(text: &str) -> Result<[u8; 32], KeyError> {
    let b64 = text
        .strip_prefix(PUBLIC_PREFIX)
        .ok_or_else(|| KeyError::Prefix(text.to_string()))?;
    let bytes = B64.decode(b64.trim()).map_err(|e| KeyError::Base64 {
        text: text.to_string(),
        why: e.to_string(),
    })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length {
        text: text.to_string(),
        len: bytes.len(),
    })
}

pub(crate) fn public_key_text(key: &[u8; 32]) -> String {
    format!("{PUBLIC_PREFIX}{}", B64.encode(key))
}

/// A topic level made of this text stays one level and matches no wildcard.
fn is_topic_level(text: &str) -> bool {
    !text.is_empty() && !text.contains(['/', '+', '#', '\0'])
}

pub(super) fn fleet(
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
            parse_public_key(&k)
                .map_err(|e| src.error_at(Some(keys_span.clone()), "fleet.keys", e))?,
        );
    }
    if keys.is_empty() {
        return Err(src.error_at(
            Some(keys_span),
            "fleet.keys",
            "list at least one public key (edgeship fleet keygen prints one)",
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
            "must be at least 1s",
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
                        "thing_name and name must be single topic levels (no '/', '+', '#')",
                    ));
                }
                Some(shadow)
            }
            None => None,
        },
    })
}
