//! The operator's side of the fleet push: make a signing key, sign a config document, publish
//! it (retained) for a gateway or a group, and collect the gateways' status documents.
//!
//! These run on the operator's machine, not on gateways; they never need the agent running.

use super::channel::{config_topic, status_topic};
use super::document::{self, Body, Target};
use super::error::FleetError;
use crate::live::FleetReport as Report;
use crate::tls::TlsConfig;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to reach the broker the gateways' fleet channels use.
#[derive(Debug, Clone)]
pub struct BrokerArgs {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `Some` connects over TLS.
    pub(crate) tls: Option<TlsConfig>,
}

impl BrokerArgs {
    /// `host`, `host:port` or `[v6]:port`; the port defaults to 1883 (8883 with TLS).
    pub fn parse(address: &str, tls: Option<TlsConfig>) -> Result<BrokerArgs, FleetError> {
        let default_port = if tls.is_some() { 8883 } else { 1883 };
        let (host, port) = match address.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.contains(']') => (
                h.trim_matches(|c| c == '[' || c == ']').to_string(),
                p.parse::<u16>().map_err(|_| {
                    FleetError::Refused(format!("`{address}`: `{p}` is not a port"))
                })?,
            ),
            _ => (address.to_string(), default_port),
        };
        Ok(BrokerArgs {
            host,
            port,
            username: None,
            password: None,
            tls,
        })
    }

    fn options(&self, client_id: &str) -> Result<rumqttc::MqttOptions, FleetError> {
        let tls = match &self.tls {
            Some(t) => Some(crate::tls::client_config(t)?),
            None => None,
        };
        let login = self
            .username
            .as_deref()
            .map(|u| (u, self.password.as_deref().unwrap_or_default()));
        Ok(super::channel::options(
            client_id,
            (&self.host, self.port),
            Duration::from_secs(30),
            login,
            tls,
        ))
    }
}

impl BrokerArgs {
    fn error(&self, why: impl ToString) -> FleetError {
        FleetError::Broker {
            address: format!("{}:{}", self.host, self.port),
            why: why.to_string(),
        }
    }
}

fn client_id(what: &str) -> String {
    format!("edgeship-fleet-{what}-{}", std::process::id())
}

/// Writes a new private key to `out` (mode 0600, never over an existing file) and its public
/// key to `out.pub`; returns the public key's text for `[fleet] keys`.
pub fn keygen(out: &Path) -> Result<String, FleetError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (private, public) = document::generate_key()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|source| FleetError::Write {
            path: out.to_path_buf(),
            source,
        })?;
    f.write_all(private.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| FleetError::Write {
            path: out.to_path_buf(),
            source,
        })?;
    let public_file = PathBuf::from(format!("{}.pub", out.display()));
    std::fs::write(&public_file, format!("{public}\n")).map_err(|source| FleetError::Write {
        path: public_file.clone(),
        source,
    })?;
    Ok(public)
}

/// A minimal local file to check a document against when the operator gives none: one broker,
/// and a route and destination that a document without its own replace.
const CHECK_BASE: &str = r#"
[[broker]]
host = "localhost"
[[route]]
name = "edgeship-check"
topics = ["edgeship-check"]
destination = "edgeship-check"
[destination.edgeship-check]
type = "directory"
path = "/nonexistent"
"#;

/// Signs a config file for `target`: checks it as a gateway would (over `base`, a gateway's
/// local file, when given), then returns the envelope's text.
pub fn sign(
    config: &Path,
    key: &Path,
    target: Target,
    version: Option<u64>,
    base: Option<&Path>,
    expires_in: Option<Duration>,
) -> Result<(String, u64), FleetError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let text = read(config)?;
    let (base_text, base_name) = match base {
        Some(b) => (read(b)?, b.display().to_string()),
        None => (CHECK_BASE.to_string(), "(no --base)".to_string()),
    };
    crate::config::Config::parse_layered(
        &base_text,
        &base_name,
        &text,
        &config.display().to_string(),
    )?;
    let key = document::read_private_key(key)?;
    let now = crate::clock::now_secs();
    let version = version.unwrap_or(now);
    if version == 0 {
        return Err(FleetError::Refused(
            "version 0 is the local file's; use 1 or more".into(),
        ));
    }
    let body = Body {
        version,
        target,
        issued_at: now,
        not_after: expires_in.map(|d| now + d.as_secs()),
        config: text,
    };
    Ok((document::sign(&body, &key), version))
}

/// Publishes `payload` retained on `topic` with QoS 1 and waits for the broker's PUBACK.
async fn publish_retained(
    broker: &BrokerArgs,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), FleetError> {
    use rumqttc::{Event, Packet};
    let (client, mut events) = rumqttc::AsyncClient::new(broker.options(&client_id("push"))?, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
        .await
        .map_err(|e| broker.error(e))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => return Err(broker.error(format!("no PUBACK in {timeout:?}"))),
            Ok(Err(e)) => return Err(broker.error(e)),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Publishes a signed document on its target's topic (`expect`, if given, must be that
/// target); returns the topic and version.
pub async fn push(
    doc: &Path,
    expect: Option<&Target>,
    broker: &BrokerArgs,
    prefix: &str,
) -> Result<(String, u64), FleetError> {
    let bytes = std::fs::read(doc).map_err(|source| FleetError::Read {
        path: doc.to_path_buf(),
        source,
    })?;
    let env: document::Envelope = serde_json::from_slice(&bytes)
        .map_err(|e| FleetError::invalid(doc, format!("not a signed config document ({e})")))?;
    let body: Body = serde_json::from_str(&env.body)
        .map_err(|e| FleetError::invalid(doc, format!("unreadable body ({e})")))?;
    if let Some(t) = expect {
        if *t != body.target {
            return Err(FleetError::Refused(format!(
                "{} is signed for {}, not {t}; gateways would refuse it (sign it again with --target {t})",
                doc.display(),
                body.target
            )));
        }
    }
    let topic = config_topic(prefix, &body.target);
    publish_retained(broker, &topic, bytes, Duration::from_secs(10)).await?;
    Ok((topic, body.version))
}

/// Removes the retained document of `target` (gateways then fall back to their groups').
pub async fn clear(
    target: &Target,
    broker: &BrokerArgs,
    prefix: &str,
) -> Result<String, FleetError> {
    let topic = config_topic(prefix, target);
    publish_retained(broker, &topic, Vec::new(), Duration::from_secs(10)).await?;
    Ok(topic)
}

/// Collects the status documents published under `prefix` for `wait` after subscribing.
pub async fn collect_status(
    broker: &BrokerArgs,
    prefix: &str,
    wait: Duration,
) -> Result<BTreeMap<String, Report>, FleetError> {
    use rumqttc::{Event, Packet};
    let (client, mut events) = rumqttc::AsyncClient::new(broker.options(&client_id("status"))?, 10);
    client
        .subscribe(status_topic(prefix, "+"), rumqttc::QoS::AtLeastOnce)
        .await
        .map_err(|e| broker.error(e))?;
    let mut reports = BTreeMap::new();
    let connect_deadline = Instant::now() + Duration::from_secs(10);
    let mut until: Option<tokio::time::Instant> = None;
    loop {
        let deadline = until.unwrap_or_else(|| connect_deadline.into());
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) if until.is_some() => break,
            Err(_) => return Err(broker.error("no answer in 10s")),
            Ok(Err(e)) => return Err(broker.error(e)),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                until = Some(tokio::time::Instant::now() + wait);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let gateway = p.topic.rsplit('/').next().unwrap_or("").to_string();
                match serde_json::from_slice::<Report>(&p.payload) {
                    Ok(r) => {
                        reports.insert(gateway, r);
                    }
                    Err(e) if !p.payload.is_empty() => {
                        eprintln!(
                            "edgeship fleet status: {}: unreadable status ({e})",
                            p.topic
                        )
                    }
                    Err(_) => {}
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(reports)
}

/// One line per gateway.
pub fn render_status(reports: &BTreeMap<String, Report>, now: u64) -> String {
    let mut out = format!(
        "{:<24} {:>12} {:>12} {:<12} {:>10} {:>8}  {}\n",
        "GATEWAY", "VERSION", "PENDING", "STATE", "BACKLOG", "AGE", "LAST ERROR"
    );
    for (gw, r) in reports {
        let error = r
            .last_error
            .as_deref()
            .map(|e| {
                let v = r
                    .last_error_version
                    .map(|v| format!("v{v}: "))
                    .unwrap_or_default();
                format!("{v}{e}")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<24} {:>12} {:>12} {:<12} {:>10} {:>7}s  {}\n",
            gw,
            r.applied_version,
            r.pending_version
                .map(|v| v.to_string())
                .unwrap_or("-".into()),
            r.state,
            r.spool_pending_records,
            now.saturating_sub(r.updated_at),
            error
        ));
    }
    out.push_str(&format!("{} gateway(s) answered\n", reports.len()));
    out
}
