//! The running agent: wires sources, the spool and one shipper per destination, and shuts them
//! down from the front.
//!
//! Shutdown order: stop the sources (no more reading; committed messages get their acks),
//! stop the shippers (in-flight calls finish or are abandoned at the deadline; their blocks
//! stay spooled), then let the spool thread make its final commit. Nothing that was acked is
//! lost at any step, because acked means committed.

use crate::config::Config;
use crate::shipper::{Shipper, ShipperStats};
use crate::sink::Sink;
use crate::source::mqtt::{self, SourceStats};
use crate::source::Router;
use crate::spool::{self, Accounting, SpoolHandle};
use anyhow::Context;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Handles to the live figures of a running pipeline, for progress lines, metrics and status.
#[derive(Clone)]
pub struct Live {
    pub spool: SpoolHandle,
    pub sources: Vec<(String, Arc<SourceStats>)>,
    pub shippers: Vec<(String, Arc<ShipperStats>)>,
    /// The config the pipeline runs with.
    pub config: Arc<Config>,
    /// Version of the applied config document; 0 for the local file.
    pub config_version: Arc<std::sync::atomic::AtomicU64>,
    pub started: std::time::SystemTime,
    /// The AWS IoT credentials provider's figures, when it is the credentials source.
    pub iot_credentials: Option<Arc<crate::aws::iot_credentials::CredentialStats>>,
}

/// Union of the routes' topic filters with the highest QoS asked for each.
pub fn subscriptions(config: &Config) -> Vec<(String, u8)> {
    let mut filters: BTreeMap<String, u8> = BTreeMap::new();
    for r in &config.routes {
        for f in &r.filters {
            let q = filters.entry(f.as_str().to_string()).or_insert(0);
            *q = (*q).max(r.qos);
        }
    }
    filters.into_iter().collect()
}

/// Runs until `shutdown` resolves, then stops in order within `config.shutdown_timeout`.
/// `on_start` receives the live handles once everything is running.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(Live),
) -> anyhow::Result<Accounting> {
    // TLS files first: a bad certificate or key stops the start before anything is opened.
    let broker_tls = crate::tls::broker_configs(&config)?;
    let credentials = crate::aws::credentials(&config.aws)?;
    let (spool, spool_thread) = spool::start(&config.spool).context("opening the spool")?;
    let gateway: Arc<str> = config.gateway_id.as_str().into();

    let (stop_ship_tx, stop_ship) = watch::channel(false);
    let mut shippers = Vec::new();
    let mut shipper_stats = Vec::new();
    for (name, dest) in &config.destinations {
        let routes: Vec<String> = config
            .routes
            .iter()
            .filter(|r| &r.destination == name)
            .map(|r| r.name.clone())
            .collect();
        let kpl_routes: Vec<String> = config
            .routes
            .iter()
            .filter(|r| &r.destination == name && r.format == crate::config::FrameFormat::Kpl)
            .map(|r| r.name.clone())
            .collect();
        if routes.is_empty() {
            continue;
        }
        let sink = Sink::connect(name, dest, credentials.provider.clone()).await?;
        let stats = Arc::new(ShipperStats::default());
        shipper_stats.push((name.clone(), stats.clone()));
        let shipper = Shipper {
            name: name.clone(),
            sink,
            spool: spool.clone(),
            routes: routes.into(),
            kpl_routes: kpl_routes.into(),
            gateway: gateway.clone(),
            batch: config.batch.clone(),
            max_record_bytes: dest.max_record_bytes(),
            max_queued_bytes: (config.spool.max_bytes / 4) as usize,
            shard_limits: match dest {
                crate::config::DestinationConfig::Kinesis(k) => Some(k.shard_limits),
                crate::config::DestinationConfig::Directory { .. } => None,
            },
            stats,
        };
        shippers.push(tokio::spawn(shipper.run(stop_ship.clone())));
    }

    let (stop_src_tx, stop_src) = watch::channel(false);
    let router = Arc::new(Router::new(&config));
    let route_filters = subscriptions(&config);
    let mut sources = Vec::new();
    let mut source_stats = Vec::new();
    for (broker, tls) in config.brokers.iter().zip(broker_tls) {
        let stats = Arc::new(SourceStats::default());
        source_stats.push((broker.name.clone(), stats.clone()));
        let filters = match &broker.subscribe {
            Some(list) => list.iter().map(|f| (f.as_str().to_string(), 1)).collect(),
            None => route_filters.clone(),
        };
        sources.push(tokio::spawn(mqtt::run(
            broker.clone(),
            tls,
            filters,
            router.clone(),
            spool.clone(),
            stats,
            stop_src.clone(),
        )));
    }
    let live = Live {
        spool: spool.clone(),
        sources: source_stats.clone(),
        shippers: shipper_stats,
        config: Arc::new(config.clone()),
        config_version: Arc::default(),
        started: std::time::SystemTime::now(),
        iot_credentials: credentials.iot_stats.clone(),
    };
    let admin = match config.admin.listen {
        Some(addr) => match crate::admin::serve(addr, live.clone()).await {
            Ok((bound, task)) => {
                tracing::info!(address = %bound, "admin endpoint listening (/metrics /healthz /readyz /status)");
                Some(task)
            }
            Err(e) => {
                // Shipping matters more than being watched: run on, loudly.
                tracing::error!(address = %addr, error = %e, "cannot open the admin endpoint; running without /metrics and /readyz (set [admin] listen to a free address)");
                None
            }
        },
        None => None,
    };
    tracing::info!(
        gateway = %config.gateway_id,
        brokers = config.brokers.len(),
        routes = config.routes.len(),
        destinations = shippers.len(),
        spool = %config.spool.path.display(),
        "edgeship running"
    );
    on_start(live);

    shutdown.await;
    let started = Instant::now();
    let deadline = config.shutdown_timeout;
    tracing::info!(timeout = ?deadline, "shutting down: stopping sources");
    let _ = stop_src_tx.send(true);
    for s in sources {
        let left = deadline.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, s).await.is_err() {
            tracing::warn!("a source did not stop in time");
        }
    }
    for (name, stats) in &source_stats {
        let ack = stats.ack_latency.summary();
        tracing::info!(
            broker = %name,
            messages = stats.messages.load(std::sync::atomic::Ordering::Relaxed),
            acks = ack.count,
            ack_p50_us = ack.p50_us,
            ack_p99_us = ack.p99_us,
            ack_max_us = ack.max_us,
            max_unacked = stats.max_unacked_seen.load(std::sync::atomic::Ordering::Relaxed),
            "source stopped"
        );
    }
    let _ = stop_ship_tx.send(true);
    for s in shippers {
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        if tokio::time::timeout(left, s).await.is_err() {
            tracing::warn!("a shipper did not finish its call in time; its records stay spooled");
        }
    }
    if let Some(task) = admin {
        task.abort();
    }
    spool.close();
    drop(spool);
    let accounting = tokio::task::spawn_blocking(move || spool_thread.join())
        .await
        .context("joining the spool thread")?
        .map_err(|_| anyhow::anyhow!("the spool thread panicked"))?
        .context("final spool commit")?;
    tracing::info!(
        received = accounting.received,
        delivered = accounting.delivered,
        dropped = accounting.dropped,
        pending = accounting.pending,
        balanced = accounting.balances(),
        "stopped"
    );
    Ok(accounting)
}
