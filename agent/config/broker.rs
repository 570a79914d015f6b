//! `[[broker]]`: the MQTT brokers the agent subscribes to, and their TLS.

use super::batch::BatchConfig;
use super::raw::{self, MqttProtocol, RawBroker};
use super::source::{ConfigError, Source};
use crate::tls::TlsConfig;
use crate::topic::TopicFilter;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone)]
pub struct BrokerConfig {
    pub(crate) name: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) protocol: MqttProtocol,
    pub(crate) client_id: String,
    pub(crate) keep_alive: Duration,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// Messages received but not yet committed; reading pauses past this.
    pub(crate) max_unacked: u32,
    /// Largest MQTT packet accepted from the broker.
    pub(crate) max_packet_bytes: u64,
    /// Explicit subscriptions (QoS 1); `None` subscribes to the routes' filters.
    pub(crate) subscribe: Option<Vec<TopicFilter>>,
    /// `Some` connects over TLS.
    pub(crate) tls: Option<TlsConfig>,
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

pub(super) fn brokers(
    raw: Vec<RawBroker>,
    gateway_id: &str,
    batch: &BatchConfig,
    src: &Source,
) -> Result<Vec<BrokerConfig>, ConfigError> {
    let mut brokers = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let name = b.name.unwrap_or_else(|| format!("broker{i}"));
        let host_span = b.host.span();
        let host = b.host.into_inner();
        if host.is_empty() {
            return Err(src.error_at(Some(host_span), "broker.host", "must not be empty"));
        }
        let client_id = b
            .client_id
            .map(|c| c.into_inner())
            .unwrap_or_else(|| "edgeship-{gateway}".to_string())
            .replace("{gateway}", gateway_id);
        let max_unacked = match b.max_unacked {
            Some(m) if *m.get_ref() == 0 => {
                return Err(src.error_at(
                    Some(m.span()),
                    "broker.max_unacked",
                    "must be at least 1",
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
                "must be at least batch.max_message_bytes, so oversize messages can be dead-lettered",
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
                        "must not be empty (leave it out to subscribe to the routes' filters)",
                    ));
                }
                Some(filters)
            }
            None => None,
        };
        let tls = match b.tls {
            Some(t) => {
                let span = t.span();
                Some(tls(
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
        return Err(src.error_at(None, "broker", "at least one [[broker]] is needed"));
    }

    Ok(brokers)
}

pub(super) fn tls(
    raw: raw::RawTls,
    src: &Source,
    span: Range<usize>,
    what: &str,
) -> Result<TlsConfig, ConfigError> {
    if raw.client_cert.is_some() != raw.client_key.is_some() {
        return Err(src.error_at(
            Some(span),
            what,
            "client_cert and client_key go together: set both or neither",
        ));
    }
    let alpn = raw.alpn.unwrap_or_default();
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(src.error_at(
            Some(span),
            what,
            "each alpn protocol name has 1 to 255 bytes",
        ));
    }
    Ok(TlsConfig {
        ca_file: raw.ca_file.map(PathBuf::from),
        client_cert: raw.client_cert.map(PathBuf::from),
        client_key: raw.client_key.map(PathBuf::from),
        alpn,
    })
}
