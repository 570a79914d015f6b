//! The status document: what `edgeship status` shows and `/status` serves. Built from a
//! running agent's live figures, or from the spool file when the agent is stopped; rendered as
//! text for people and as JSON for scripts.
//!
//! Formatting and a small loopback HTTP GET; this module never changes the agent's state.

use crate::live::Live;
use crate::spool::Accounting;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    pub(crate) source: StatusSource,
    pub(crate) agent_version: String,
    pub(crate) gateway_id: Option<String>,
    pub(crate) config_version: Option<u64>,
    pub(crate) uptime_seconds: Option<u64>,
    pub(crate) ready: Option<bool>,
    pub(crate) checks: Vec<Check>,
    pub(crate) spool: SpoolStatus,
    pub(crate) brokers: Vec<BrokerStatus>,
    pub(crate) destinations: Vec<DestinationStatus>,
    /// The fleet config push's report, when `[fleet]` is configured.
    #[serde(default)]
    pub fleet: Option<crate::live::FleetReport>,
    /// Routes whose records no destination ships (route and destination removed).
    #[serde(default)]
    pub(crate) orphaned_routes: Vec<OrphanedRoute>,
}

/// Where a status document comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StatusSource {
    /// The running agent.
    Agent,
    /// The spool file (the agent is stopped).
    Spool,
}

/// Records the spool holds for a route that no destination ships.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OrphanedRoute {
    pub(crate) route: String,
    pub(crate) records: u64,
    pub(crate) bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpoolStatus {
    pub(crate) path: String,
    pub(crate) accounting: Accounting,
    pub(crate) balances: bool,
    pub(crate) oldest_pending_age_seconds: Option<f64>,
    pub(crate) file_bytes: Option<u64>,
    pub(crate) disk_free_bytes: Option<u64>,
    pub(crate) max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BrokerStatus {
    pub(crate) name: String,
    pub(crate) connected: bool,
    pub(crate) connections: u64,
    pub(crate) connection_errors: u64,
    pub(crate) messages: u64,
    pub(crate) unacked: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DestinationStatus {
    pub(crate) name: String,
    pub(crate) records_accepted: u64,
    pub(crate) entries_accepted: u64,
    pub(crate) entries_throttled: u64,
    pub(crate) entries_failed: u64,
    pub(crate) failing: bool,
    pub(crate) last_success_age_seconds: Option<f64>,
    pub(crate) last_error: Option<String>,
}

impl StatusDoc {
    pub(crate) fn from_live(live: &Live, checks: Vec<Check>) -> StatusDoc {
        let committed = live.spool.stats().committed();
        let accounting = committed.accounting();
        let config = live.config();
        let path = &config.spool.path;
        let now = crate::clock::now_ms();
        StatusDoc {
            source: StatusSource::Agent,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            fleet: live.fleet_report(),
            orphaned_routes: live
                .orphaned()
                .into_iter()
                .map(|(route, records, bytes)| OrphanedRoute {
                    route,
                    records,
                    bytes,
                })
                .collect(),
            gateway_id: Some(config.gateway_id.clone()),
            config_version: Some(live.config_version.load(Relaxed)),
            uptime_seconds: live.started.elapsed().ok().map(|d| d.as_secs()),
            ready: Some(checks.iter().all(|c| c.ok)),
            checks,
            spool: SpoolStatus {
                path: path.display().to_string(),
                balances: accounting.balances(),
                accounting,
                oldest_pending_age_seconds: committed
                    .oldest_pending_ms
                    .map(|ms| now.saturating_sub(ms) as f64 / 1000.0),
                file_bytes: crate::process::spool_file_bytes(path),
                disk_free_bytes: crate::process::disk_free_bytes(path),
                max_bytes: Some(config.spool.max_bytes),
            },
            brokers: live
                .sources
                .iter()
                .map(|(name, s)| BrokerStatus {
                    name: name.clone(),
                    connected: s.connected.load(Relaxed),
                    connections: s.connects.load(Relaxed),
                    connection_errors: s.connection_errors.load(Relaxed),
                    messages: s.messages.load(Relaxed),
                    unacked: s.unacked.load(Relaxed),
                })
                .collect(),
            destinations: live
                .shippers()
                .iter()
                .map(|(name, s)| {
                    let last = s.last_success_ms.load(Relaxed);
                    let throttled = s.entries_throttled.load(Relaxed);
                    DestinationStatus {
                        name: name.clone(),
                        records_accepted: s.records_accepted.load(Relaxed),
                        entries_accepted: s.entries_accepted.load(Relaxed),
                        entries_throttled: throttled,
                        entries_failed: s.entries_failed.load(Relaxed).saturating_sub(throttled),
                        failing: s.failing.load(Relaxed),
                        last_success_age_seconds: (last > 0)
                            .then(|| now.saturating_sub(last) as f64 / 1000.0),
                        last_error: s.last_error(),
                    }
                })
                .collect(),
        }
    }

    /// The document of a stopped agent: only what the spool file holds.
    pub fn from_spool(path: &Path, accounting: Accounting) -> StatusDoc {
        StatusDoc {
            source: StatusSource::Spool,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            gateway_id: None,
            config_version: None,
            uptime_seconds: None,
            ready: None,
            checks: Vec::new(),
            spool: SpoolStatus {
                path: path.display().to_string(),
                balances: accounting.balances(),
                accounting,
                oldest_pending_age_seconds: None,
                file_bytes: crate::process::spool_file_bytes(path),
                disk_free_bytes: crate::process::disk_free_bytes(path),
                max_bytes: None,
            },
            brokers: Vec::new(),
            destinations: Vec::new(),
            fleet: None,
            orphaned_routes: Vec::new(),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The text `edgeship status` prints.
pub fn render(doc: &StatusDoc) -> String {
    let mut s = String::new();
    let acc = &doc.spool.accounting;
    match doc.source {
        StatusSource::Agent => {
            let _ = writeln!(
                s,
                "edgeship {}  gateway {}  up {}s  config version {}  {}",
                doc.agent_version,
                doc.gateway_id.as_deref().unwrap_or("?"),
                doc.uptime_seconds.unwrap_or(0),
                doc.config_version.unwrap_or(0),
                if doc.ready == Some(true) {
                    "READY"
                } else {
                    "NOT READY"
                }
            );
        }
        StatusSource::Spool => {
            let _ = writeln!(s, "agent not running (figures read from the spool file)");
        }
    }
    for o in &doc.orphaned_routes {
        let _ = writeln!(
            s,
            "orphaned   route {}: {} records ({}) that no destination ships; add the route back, or remove them with `edgeship spool drop-route {}` (agent stopped)",
            o.route,
            o.records,
            mib(o.bytes),
            o.route
        );
    }
    if let Some(f) = &doc.fleet {
        let _ = writeln!(
            s,
            "fleet      applied version {} ({})  {}{}",
            f.applied_version,
            f.applied_target.as_deref().unwrap_or("local file"),
            f.state,
            f.pending_version
                .map(|v| format!("  applying version {v}"))
                .unwrap_or_default()
        );
        if let Some(e) = &f.last_error {
            let v = f
                .last_error_version
                .map(|v| format!("version {v}: "))
                .unwrap_or_default();
            let _ = writeln!(s, "           last error: {v}{e}");
        }
    }
    for c in &doc.checks {
        let _ = writeln!(
            s,
            "  [{}] {:<24} {}",
            if c.ok { "ok" } else { "!!" },
            c.name,
            c.detail
        );
    }
    let _ = writeln!(s, "spool      {}", doc.spool.path);
    let _ = writeln!(s, "received   {}", acc.received);
    let _ = writeln!(s, "delivered  {}", acc.delivered);
    let _ = writeln!(s, "dropped    {}", acc.dropped);
    for (reason, n) in &acc.dropped_by_reason {
        let _ = writeln!(s, "  {reason:<16} {n}");
    }
    let _ = write!(
        s,
        "pending    {} ({} bytes spooled",
        acc.pending, acc.pending_bytes
    );
    if let Some(age) = doc.spool.oldest_pending_age_seconds {
        let _ = write!(s, ", oldest {age:.1}s");
    }
    let _ = writeln!(s, ")");
    let mut disk = Vec::new();
    if let Some(b) = doc.spool.file_bytes {
        disk.push(format!("file {}", mib(b)));
    }
    if let Some(b) = doc.spool.max_bytes {
        disk.push(format!("cap {}", mib(b)));
    }
    if let Some(b) = doc.spool.disk_free_bytes {
        disk.push(format!("disk free {}", mib(b)));
    }
    if !disk.is_empty() {
        let _ = writeln!(s, "disk       {}", disk.join(", "));
    }
    let _ = writeln!(
        s,
        "dead letters {}   quarantined blocks {}",
        acc.dead_letters, acc.quarantined_blocks
    );
    let _ = writeln!(
        s,
        "balance    received = delivered + dropped + pending: {}",
        if doc.spool.balances {
            "holds"
        } else {
            "DOES NOT HOLD"
        }
    );
    for (pair, t) in &acc.destinations {
        let (route, dest) = pair.split_once('/').unwrap_or((pair, ""));
        let _ = writeln!(
            s,
            "route      {route} -> {dest}  received {}  delivered {}  dropped {}  pending {}{}",
            t.received,
            t.delivered,
            t.dropped,
            t.pending,
            if t.balances() {
                ""
            } else {
                "  DOES NOT BALANCE"
            }
        );
    }
    for b in &doc.brokers {
        let _ = writeln!(
            s,
            "broker     {:<12} {}  connections {}  errors {}  messages {}  unacked {}",
            b.name,
            if b.connected { "connected" } else { "DOWN" },
            b.connections,
            b.connection_errors,
            b.messages,
            b.unacked
        );
    }
    for d in &doc.destinations {
        let _ = write!(
            s,
            "destination {:<11} {}  records {}  entries ok {} throttled {} failed {}",
            d.name,
            if d.failing { "FAILING" } else { "ok" },
            d.records_accepted,
            d.entries_accepted,
            d.entries_throttled,
            d.entries_failed
        );
        if let Some(age) = d.last_success_age_seconds {
            let _ = write!(s, "  last success {age:.1}s ago");
        }
        let _ = writeln!(s);
        if let (true, Some(e)) = (d.failing, &d.last_error) {
            let _ = writeln!(s, "            last error: {e}");
        }
    }
    s
}

/// Why the running agent's status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP {status}: {text}")]
    Status { status: u16, text: String },
    #[error("cannot read the status document: {0}")]
    Document(#[from] serde_json::Error),
}

/// The status document of the agent listening at `addr`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<StatusDoc, FetchError> {
    let get = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(FetchError::Connect)?;
        Ok::<_, FetchError>(
            crate::http::get(stream, &addr.to_string(), "/status", &[], 64 << 20).await?,
        )
    };
    let answer = tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| FetchError::Timeout(timeout))??;
    if answer.status != 200 {
        return Err(FetchError::Status {
            status: answer.status,
            text: answer.text(200).trim().to_string(),
        });
    }
    Ok(serde_json::from_slice(&answer.body)?)
}
