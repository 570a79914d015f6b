//! The running data path: starts the sources, the spool and one shipper per destination,
//! changes them when a new config is applied, and shuts them down from the front.
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
//! the spool, so nothing is lost or sent twice ([`plan`] decides which). Brokers, credentials
//! and the spool's file are not changed live (they are local settings). Which configs to
//! apply is decided elsewhere (the fleet controller); this module only applies them. It does
//! not serve the admin endpoint either: whoever starts it does ([`crate::app`]).

pub(crate) mod plan;

use crate::config::Config;
use crate::live::{Destination, Live};
use crate::ship::objects::ObjectShipper;
use crate::ship::stats::ShipperStats;
use crate::ship::Shipper;
use crate::sink::call::SinkError;
use crate::sink::Sink;
use crate::source::mqtt::{self, SourceStats};
use crate::source::router::Router;
use crate::source::SourcePlan;
use crate::spool::{self, Accounting, SpoolError, SpoolHandle, SpoolLimits};
use plan::{Retired, Spec};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("opening the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("destination `{name}`: {error}")]
    Destination { name: String, error: SinkError },
    #[error("the spool thread {0}")]
    SpoolThread(&'static str),
    #[error("final spool commit: {0}")]
    FinalCommit(SpoolError),
}

/// A request to the running pipeline.
pub(crate) enum Control {
    /// Run with this config from now on; the reply comes once it is in place (or says why
    /// it could not be, with the previous config still running).
    Apply {
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), PipelineError>>,
    },
}

/// Union of the routes' topic filters with the highest QoS asked for each.
pub(crate) fn subscriptions(config: &Config) -> Vec<(String, u8)> {
    let mut filters: BTreeMap<String, u8> = BTreeMap::new();
    for r in &config.routes {
        for f in &r.filters {
            let q = filters.entry(f.as_str().to_string()).or_insert(0);
            *q = (*q).max(r.qos);
        }
    }
    filters.into_iter().collect()
}

struct RunningShipper {
    spec: Spec,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    destination: Destination,
}

/// A shipper whose destination is open but which does not run yet: two shippers of one
/// destination must never run at once (both would send the same blocks).
struct ReadyShipper {
    spec: Spec,
    shipper: Runner,
    destination: Destination,
}

/// What ships to a destination: records in calls (streams, folders), or objects (S3).
enum Runner {
    Stream(Shipper),
    Objects(ObjectShipper),
}

impl ReadyShipper {
    fn spawn(self) -> RunningShipper {
        let (stop, stop_rx) = watch::channel(false);
        RunningShipper {
            spec: self.spec,
            stop,
            task: match self.shipper {
                Runner::Stream(s) => tokio::spawn(s.supervise(stop_rx)),
                Runner::Objects(o) => tokio::spawn(o.supervise(stop_rx)),
            },
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

impl SourceControl {
    fn plan(&self, router: &Arc<Router>, route_filters: &[(String, u8)]) -> Arc<SourcePlan> {
        Arc::new(SourcePlan {
            router: router.clone(),
            filters: self.fixed.clone().unwrap_or_else(|| route_filters.to_vec()),
        })
    }
}

/// The running pipeline, between [`start`] and the end of [`Pipeline::run`].
pub(crate) struct Pipeline {
    config: Config,
    spool: SpoolHandle,
    spool_thread: std::thread::JoinHandle<Result<Accounting, SpoolError>>,
    credentials: crate::aws::Credentials,
    gateway: Arc<str>,
    shippers: BTreeMap<String, RunningShipper>,
    /// Stats outlive a shipper replaced by a config change, so counters do not restart.
    stats: BTreeMap<String, Arc<ShipperStats>>,
    retired: Retired,
    controls: Vec<SourceControl>,
    sources: Vec<tokio::task::JoinHandle<()>>,
    stop_sources: watch::Sender<bool>,
    live: Live,
}

/// Opens everything `config` names (TLS files first, then the spool and the destinations)
/// and starts the sources and shippers.
pub(crate) async fn start(config: Config) -> Result<Pipeline, PipelineError> {
    // TLS files first: a bad certificate or key stops the start before anything is opened.
    let broker_tls = config.broker_tls()?;
    let credentials = crate::aws::credentials(&config.aws)?;
    let (spool, spool_thread) = spool::start(&config.spool)?;
    let router = Arc::new(Router::new(&config));
    let route_filters = subscriptions(&config);
    let (stop_sources, stop_rx) = watch::channel(false);
    let mut controls = Vec::new();
    let mut sources = Vec::new();
    let mut source_stats = Vec::new();
    for (broker, tls) in config.brokers.iter().zip(broker_tls) {
        let stats = Arc::new(SourceStats::default());
        source_stats.push((broker.name.clone(), stats.clone()));
        let fixed: Option<Vec<(String, u8)>> = broker
            .subscribe
            .as_ref()
            .map(|list| list.iter().map(|f| (f.as_str().to_string(), 1)).collect());
        let control = SourceControl {
            fixed,
            plan: watch::Sender::new(Arc::new(SourcePlan {
                router: router.clone(),
                filters: Vec::new(),
            })),
        };
        control
            .plan
            .send_replace(control.plan(&router, &route_filters));
        let plan_rx = control.plan.subscribe();
        controls.push(control);
        sources.push((broker.clone(), tls, plan_rx, stats));
    }
    let live = Live::new(
        &config,
        spool.clone(),
        source_stats,
        credentials.iot_stats.clone(),
    );
    // Records of routes this config no longer has (renamed or removed while the agent was
    // down) still go to the destination the spool recorded for them, if it is configured.
    let retired = {
        let committed = spool.stats().committed();
        let pending = committed
            .pending
            .iter()
            .filter(|(_, (records, _))| *records > 0)
            .map(|(route, _)| route);
        plan::retired_at_start(&config, pending, &committed.routes)
    };
    for (route, (dest, _)) in &retired {
        tracing::warn!(%route, destinations = ?dest, "the spool holds records of a route the config no longer has; they are shipped to the destination they were routed to");
    }
    let mut pipeline = Pipeline {
        gateway: config.gateway_id.as_str().into(),
        config,
        spool: spool.clone(),
        spool_thread,
        credentials,
        shippers: BTreeMap::new(),
        stats: BTreeMap::new(),
        retired,
        controls,
        sources: Vec::new(),
        stop_sources,
        live,
    };
    // Destinations before sources: nothing is read before every destination is open.
    for (name, spec) in plan::specs(&pipeline.config, &pipeline.retired) {
        let s = pipeline.prepare_shipper(&name, spec).await?;
        pipeline.shippers.insert(name, s.spawn());
    }
    pipeline.publish_current();
    for (broker, tls, plan_rx, stats) in sources {
        pipeline.sources.push(tokio::spawn(mqtt::run(
            broker,
            tls,
            plan_rx,
            spool.clone(),
            stats,
            stop_rx.clone(),
        )));
    }
    tracing::info!(
        gateway = %pipeline.config.gateway_id,
        brokers = pipeline.config.brokers.len(),
        routes = pipeline.config.routes.len(),
        destinations = pipeline.shippers.len(),
        spool = %pipeline.config.spool.path.display(),
        "edgeship running"
    );
    Ok(pipeline)
}

impl Pipeline {
    /// Handles to the live figures.
    pub(crate) fn live(&self) -> Live {
        self.live.clone()
    }

    /// Opens the destination and builds its shipper, without starting it.
    async fn prepare_shipper(
        &mut self,
        name: &str,
        spec: Spec,
    ) -> Result<ReadyShipper, PipelineError> {
        let sink = Sink::connect(name, &spec.destination, self.credentials.provider.clone())
            .await
            .map_err(|error| PipelineError::Destination {
                name: name.to_string(),
                error,
            })?;
        let sink = Arc::new(sink);
        let stats = self.stats.entry(name.to_string()).or_default().clone();
        let shipper = match &*sink {
            Sink::S3(_) => Runner::Objects(ObjectShipper::new(
                name,
                sink.clone(),
                self.spool.clone(),
                self.gateway.clone(),
                &spec.shipper,
                stats.clone(),
            )),
            _ => Runner::Stream(Shipper::new(
                name,
                sink.clone(),
                self.spool.clone(),
                self.gateway.clone(),
                &spec.shipper,
                stats.clone(),
            )),
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
        self.live.set_current(
            &self.config,
            self.shippers
                .values()
                .map(|s| s.destination.clone())
                .collect(),
            self.shippers
                .values()
                .flat_map(|s| s.spec.shipper.routes.iter().cloned())
                .collect(),
        );
        if self
            .spool
            .set_routes(plan::route_map(&self.config, &self.retired))
            .is_err()
        {
            tracing::error!("the spool has stopped; routes not recorded");
        }
    }

    /// Moves the running pipeline to `config`. On error the previous config keeps running
    /// unchanged (a new destination that cannot be opened is found before anything stops).
    async fn apply(&mut self, config: Config) -> Result<(), PipelineError> {
        let mut retired = self.retired.clone();
        plan::retire(&self.config, &config, &mut retired);
        let wanted = plan::specs(&config, &retired);
        let running: BTreeMap<String, Spec> = self
            .shippers
            .iter()
            .map(|(n, s)| (n.clone(), s.spec.clone()))
            .collect();
        let changes = plan::changes(&running, &wanted);
        // Open the changed and new destinations first: a failure leaves everything as it was.
        let mut started = BTreeMap::new();
        for name in &changes.start {
            let ready = self.prepare_shipper(name, wanted[name].clone()).await?;
            started.insert(name.clone(), ready);
        }
        self.retired = retired;
        // The router first, then subscriptions: a message on a new filter always finds its
        // route.
        let router = Arc::new(Router::new(&config));
        let route_filters = subscriptions(&config);
        for control in &self.controls {
            control
                .plan
                .send_replace(control.plan(&router, &route_filters));
        }
        let limits = SpoolLimits::of(&config.spool);
        if limits != SpoolLimits::of(&self.config.spool) && self.spool.set_limits(limits).is_err() {
            return Err(PipelineError::SpoolThread("has stopped"));
        }
        // Replaced and removed shippers finish their call and give unsent blocks back.
        for name in changes.stop {
            if let Some(s) = self.shippers.remove(&name) {
                let _ = s.stop.send(true);
                let _ = s.task.await;
                tracing::info!(destination = %name, "shipper stopped for the config change");
            }
        }
        for (name, s) in started {
            tracing::info!(destination = %name, routes = ?s.spec.shipper.routes, "shipper started for the config change");
            self.shippers.insert(name, s.spawn());
        }
        self.stats.retain(|n, _| wanted.contains_key(n));
        self.config = config;
        self.publish_current();
        Ok(())
    }

    /// Runs until `shutdown` resolves, taking config changes from `control` (if given), then
    /// stops in order within `shutdown_timeout`. Returns the accounting as finally committed.
    pub(crate) async fn run(
        mut self,
        control: Option<mpsc::Receiver<Control>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Accounting, PipelineError> {
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
                    let result = self.apply(*config).await;
                    let _ = reply.send(result);
                }
                // The fleet channel is gone; run on with what is applied.
                None => control = None,
            }
        }
        self.stop().await
    }

    async fn stop(mut self) -> Result<Accounting, PipelineError> {
        let started = Instant::now();
        let deadline = self.config.shutdown_timeout;
        tracing::info!(timeout = ?deadline, "shutting down: stopping sources");
        let _ = self.stop_sources.send(true);
        for s in std::mem::take(&mut self.sources) {
            let left = deadline.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, s).await.is_err() {
                tracing::warn!("a source did not stop in time");
            }
        }
        for (name, stats) in &self.live.sources {
            let ack = stats.ack_latency.summary();
            tracing::info!(
                broker = %name,
                messages = stats.messages.load(std::sync::atomic::Ordering::Relaxed),
                acks = ack.count,
                ack_p50_us = ack.p50_us,
                ack_p99_us = ack.p99_us,
                ack_max_us = ack.max_us,
                max_unacked = stats.max_unacked_seen.load(std::sync::atomic::Ordering::Relaxed),
                max_write_backlog_bytes = stats.max_write_backlog.load(std::sync::atomic::Ordering::Relaxed),
                "source stopped"
            );
        }
        for s in self.shippers.values() {
            let _ = s.stop.send(true);
        }
        for (_, s) in std::mem::take(&mut self.shippers) {
            let left = deadline
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(100));
            if tokio::time::timeout(left, s.task).await.is_err() {
                tracing::warn!(
                    "a shipper did not finish its call in time; its records stay spooled"
                );
            }
        }
        let Pipeline {
            spool,
            spool_thread,
            live,
            ..
        } = self;
        drop(live);
        spool.close();
        drop(spool);
        let accounting = tokio::task::spawn_blocking(move || spool_thread.join())
            .await
            .map_err(|_| PipelineError::SpoolThread("could not be joined"))?
            .map_err(|_| PipelineError::SpoolThread("panicked"))?
            .map_err(PipelineError::FinalCommit)?;
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
}
