//! The running agent: wires sources, the spool and one shipper per destination, changes them
//! when a new config is applied, and shuts them down from the front.
//!
//! Shutdown order: stop the sources (no more reading; committed messages get their acks),
//! stop the shippers (in-flight calls finish or are abandoned at the deadline; their blocks
//! stay spooled), then let the spool thread make its final commit. Nothing that was acked is
//! lost at any step, because acked means committed.
//!
//! A config change ([`Control::Apply`]) keeps the broker sessions and the spool: the sources
//! get a new router and subscription list (added filters subscribed, removed ones
//! unsubscribed), the spool new limits, and a destination whose settings or routes changed
//! gets a new shipper after the old one finished its call and gave its unsent blocks back to
//! the spool, so nothing is lost or sent twice. Brokers, credentials and the spool's file are
//! not changed live (they are local settings). Which configs to apply is decided elsewhere
//! ([`crate::fleet`]); this module only applies them.

use crate::config::{Config, DestinationConfig, FrameFormat};
use crate::shipper::{Shipper, ShipperStats};
use crate::sink::Sink;
use crate::source::mqtt::{self, SourceStats};
use crate::source::{Router, SourcePlan};
use crate::spool::{self, Accounting, SpoolHandle, SpoolLimits};
use anyhow::Context;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Handles to the live figures of a running pipeline, for progress lines, metrics and status.
#[derive(Clone)]
pub struct Live {
    pub spool: SpoolHandle,
    pub sources: Vec<(String, Arc<SourceStats>)>,
    /// The config and destinations in use; replaced by a config change.
    current: Arc<RwLock<Current>>,
    /// Version of the applied config document; 0 for the local file.
    pub config_version: Arc<std::sync::atomic::AtomicU64>,
    pub started: std::time::SystemTime,
    /// The AWS IoT credentials provider's figures, when it is the credentials source.
    pub iot_credentials: Option<Arc<crate::aws::iot_credentials::CredentialStats>>,
    /// The fleet channel's report (applied and pending versions, last error), when it runs.
    pub fleet: Arc<std::sync::Mutex<Option<crate::fleet::Report>>>,
}

/// One destination as the live figures see it.
#[derive(Clone)]
pub struct Destination {
    pub name: String,
    pub stats: Arc<ShipperStats>,
    pub sink: Arc<Sink>,
}

struct Current {
    config: Arc<Config>,
    destinations: Vec<Destination>,
}

impl Live {
    /// The config the pipeline runs with now.
    pub fn config(&self) -> Arc<Config> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
    }

    /// The destinations shipping now, by name.
    pub fn shippers(&self) -> Vec<(String, Arc<ShipperStats>)> {
        self.destinations()
            .into_iter()
            .map(|d| (d.name, d.stats))
            .collect()
    }

    pub fn destinations(&self) -> Vec<Destination> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .destinations
            .clone()
    }
}

/// A request to the running pipeline.
pub enum Control {
    /// Run with this config from now on; the reply comes once it is in place (or says why
    /// it could not be, with the previous config still running).
    Apply {
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), String>>,
    },
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

/// Everything one destination's shipper is built from: a change in any of it means a new
/// shipper.
#[derive(Debug, Clone, PartialEq)]
struct ShipperSpec {
    destination: DestinationConfig,
    routes: Vec<String>,
    kpl_routes: Vec<String>,
    batch: crate::config::BatchConfig,
    max_queued_bytes: usize,
}

struct RunningShipper {
    spec: ShipperSpec,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    destination: Destination,
}

/// A shipper whose destination is open but which does not run yet: two shippers of one
/// destination must never run at once (both would send the same blocks).
struct ReadyShipper {
    spec: ShipperSpec,
    shipper: Shipper,
    destination: Destination,
}

impl ReadyShipper {
    fn spawn(self) -> RunningShipper {
        let (stop, stop_rx) = watch::channel(false);
        RunningShipper {
            spec: self.spec,
            stop,
            task: tokio::spawn(self.shipper.run(stop_rx)),
            destination: self.destination,
        }
    }
}

/// How the pipeline steers one source: its fixed `subscribe` list (if the broker has one,
/// routes do not change what it subscribes to) and the plan it follows.
struct SourceControl {
    fixed: Option<Vec<(String, u8)>>,
    plan: watch::Sender<Arc<SourcePlan>>,
}

struct Running {
    config: Config,
    spool: SpoolHandle,
    credentials: crate::aws::Credentials,
    gateway: Arc<str>,
    shippers: BTreeMap<String, RunningShipper>,
    /// Stats outlive a shipper replaced by a config change, so counters do not restart.
    stats: BTreeMap<String, Arc<ShipperStats>>,
    /// Routes a config change removed, with the destination (and format) that still ships
    /// what they spooled, if that destination is still configured.
    retired: BTreeMap<String, (String, FrameFormat)>,
    plans: Vec<SourceControl>,
    current: Arc<RwLock<Current>>,
}

impl Running {
    /// The shippers the config calls for: one per destination with routes (its own and the
    /// retired ones it drains).
    fn specs(&self, config: &Config) -> BTreeMap<String, ShipperSpec> {
        let mut specs = BTreeMap::new();
        for (name, dest) in &config.destinations {
            let mut routes: Vec<String> = config
                .routes
                .iter()
                .filter(|r| &r.destination == name)
                .map(|r| r.name.clone())
                .collect();
            let mut kpl_routes: Vec<String> = config
                .routes
                .iter()
                .filter(|r| &r.destination == name && r.format == FrameFormat::Kpl)
                .map(|r| r.name.clone())
                .collect();
            for (route, (dest, format)) in &self.retired {
                if dest == name {
                    routes.push(route.clone());
                    if *format == FrameFormat::Kpl {
                        kpl_routes.push(route.clone());
                    }
                }
            }
            if routes.is_empty() {
                continue;
            }
            specs.insert(
                name.clone(),
                ShipperSpec {
                    destination: dest.clone(),
                    routes,
                    kpl_routes,
                    batch: config.batch.clone(),
                    max_queued_bytes: (config.spool.max_bytes / 4) as usize,
                },
            );
        }
        specs
    }

    /// Opens the destination and builds its shipper, without starting it.
    async fn prepare_shipper(
        &mut self,
        name: &str,
        spec: ShipperSpec,
    ) -> Result<ReadyShipper, String> {
        let sink = Sink::connect(name, &spec.destination, self.credentials.provider.clone())
            .await
            .map_err(|e| e.to_string())?;
        let sink = Arc::new(sink);
        let stats = self.stats.entry(name.to_string()).or_default().clone();
        let shipper = Shipper {
            name: name.to_string(),
            sink: sink.clone(),
            spool: self.spool.clone(),
            routes: spec.routes.clone().into(),
            kpl_routes: spec.kpl_routes.clone().into(),
            gateway: self.gateway.clone(),
            batch: spec.batch.clone(),
            max_record_bytes: spec.destination.max_record_bytes(),
            max_queued_bytes: spec.max_queued_bytes,
            shard_limits: match &spec.destination {
                DestinationConfig::Kinesis(k) => Some(k.shard_limits),
                DestinationConfig::Directory { .. } => None,
            },
            stats: stats.clone(),
        };
        Ok(ReadyShipper {
            spec,
            shipper,
            destination: Destination {
                name: name.to_string(),
                stats,
                sink,
            },
        })
    }

    fn publish_current(&self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        current.config = Arc::new(self.config.clone());
        current.destinations = self
            .shippers
            .values()
            .map(|s| s.destination.clone())
            .collect();
    }

    /// Moves the running pipeline to `config`. On error the previous config keeps running
    /// unchanged (a new destination that cannot be opened is found before anything stops).
    async fn apply(&mut self, config: Config) -> Result<(), String> {
        // Routes that disappear keep shipping what they spooled to the destination of the
        // same name, if the new config still has it; a route named again is live again.
        for r in &self.config.routes {
            if config.route(&r.name).is_none() {
                self.retired
                    .insert(r.name.clone(), (r.destination.clone(), r.format));
            }
        }
        self.retired.retain(|route, (dest, _)| {
            config.route(route).is_none() && config.destinations.contains_key(dest)
        });
        let specs = self.specs(&config);
        // Open the changed and new destinations first: a failure leaves everything as it was.
        let mut started = BTreeMap::new();
        for (name, spec) in &specs {
            if self.shippers.get(name).is_some_and(|s| &s.spec == spec) {
                continue;
            }
            let ready = self
                .prepare_shipper(name, spec.clone())
                .await
                .map_err(|e| format!("destination `{name}`: {e}"))?;
            started.insert(name.clone(), ready);
        }
        // The router first, then subscriptions: a message on a new filter always finds its
        // route.
        let router = Arc::new(Router::new(&config));
        let route_filters = subscriptions(&config);
        for SourceControl { fixed, plan } in &self.plans {
            let filters = fixed.clone().unwrap_or_else(|| route_filters.clone());
            plan.send_replace(Arc::new(SourcePlan {
                router: router.clone(),
                filters,
            }));
        }
        let limits = SpoolLimits::of(&config.spool);
        if limits != SpoolLimits::of(&self.config.spool) {
            self.spool.set_limits(limits)?;
        }
        // Replaced and removed shippers finish their call and give unsent blocks back.
        let old: Vec<String> = self
            .shippers
            .keys()
            .filter(|n| !specs.contains_key(*n) || started.contains_key(*n))
            .cloned()
            .collect();
        for name in old {
            if let Some(s) = self.shippers.remove(&name) {
                let _ = s.stop.send(true);
                let _ = s.task.await;
                tracing::info!(destination = %name, "shipper stopped for the config change");
            }
        }
        for (name, s) in started {
            tracing::info!(destination = %name, routes = ?s.spec.routes, "shipper started for the config change");
            self.shippers.insert(name, s.spawn());
        }
        self.stats.retain(|n, _| specs.contains_key(n));
        self.config = config;
        self.publish_current();
        Ok(())
    }
}

/// Runs until `shutdown` resolves, then stops in order within `config.shutdown_timeout`.
/// `on_start` receives the live handles once everything is running; `control` (if given)
/// carries config changes.
pub async fn run(
    config: Config,
    control: Option<mpsc::Receiver<Control>>,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(Live),
) -> anyhow::Result<Accounting> {
    // TLS files first: a bad certificate or key stops the start before anything is opened.
    let broker_tls = crate::tls::broker_configs(&config)?;
    let credentials = crate::aws::credentials(&config.aws)?;
    let (spool, spool_thread) = spool::start(&config.spool).context("opening the spool")?;
    let gateway: Arc<str> = config.gateway_id.as_str().into();
    let current = Arc::new(RwLock::new(Current {
        config: Arc::new(config.clone()),
        destinations: Vec::new(),
    }));
    let mut running = Running {
        config: config.clone(),
        spool: spool.clone(),
        credentials: credentials.clone(),
        gateway,
        shippers: BTreeMap::new(),
        stats: BTreeMap::new(),
        retired: BTreeMap::new(),
        plans: Vec::new(),
        current: current.clone(),
    };
    for (name, spec) in running.specs(&config) {
        let s = running
            .prepare_shipper(&name, spec)
            .await
            .map_err(|e| anyhow::anyhow!("destination `{name}`: {e}"))?;
        running.shippers.insert(name, s.spawn());
    }
    running.publish_current();

    let (stop_src_tx, stop_src) = watch::channel(false);
    let router = Arc::new(Router::new(&config));
    let route_filters = subscriptions(&config);
    let mut sources = Vec::new();
    let mut source_stats = Vec::new();
    for (broker, tls) in config.brokers.iter().zip(broker_tls) {
        let stats = Arc::new(SourceStats::default());
        source_stats.push((broker.name.clone(), stats.clone()));
        let fixed: Option<Vec<(String, u8)>> = broker
            .subscribe
            .as_ref()
            .map(|list| list.iter().map(|f| (f.as_str().to_string(), 1)).collect());
        let (plan_tx, plan_rx) = watch::channel(Arc::new(SourcePlan {
            router: router.clone(),
            filters: fixed.clone().unwrap_or_else(|| route_filters.clone()),
        }));
        running.plans.push(SourceControl {
            fixed,
            plan: plan_tx,
        });
        sources.push(tokio::spawn(mqtt::run(
            broker.clone(),
            tls,
            plan_rx,
            spool.clone(),
            stats,
            stop_src.clone(),
        )));
    }
    let live = Live {
        spool: spool.clone(),
        sources: source_stats.clone(),
        current,
        config_version: Arc::default(),
        started: std::time::SystemTime::now(),
        iot_credentials: credentials.iot_stats.clone(),
        fleet: Arc::default(),
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
        destinations = running.shippers.len(),
        spool = %config.spool.path.display(),
        "edgeship running"
    );
    on_start(live);

    let mut control = control;
    tokio::pin!(shutdown);
    loop {
        let request = tokio::select! {
            _ = &mut shutdown => break,
            c = async {
                match control.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => c,
        };
        match request {
            Some(Control::Apply { config, reply }) => {
                let result = running.apply(*config).await;
                let _ = reply.send(result);
            }
            // The fleet channel is gone; run on with what is applied.
            None => control = None,
        }
    }

    let started = Instant::now();
    let deadline = running.config.shutdown_timeout;
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
    for s in running.shippers.values() {
        let _ = s.stop.send(true);
    }
    for (_, s) in std::mem::take(&mut running.shippers) {
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        if tokio::time::timeout(left, s.task).await.is_err() {
            tracing::warn!("a shipper did not finish its call in time; its records stay spooled");
        }
    }
    if let Some(task) = admin {
        task.abort();
    }
    drop(running);
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
