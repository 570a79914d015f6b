//! Fleet config push: signed, versioned config documents applied while the agent runs, with a
//! health check, rollback to the last known good config, and a status document.
//!
//! Documents arrive as retained messages on this gateway's topic and its groups' topics
//! ([`channel`]), or from a local file (read at start and on SIGHUP). Policy, in order:
//! 1. the signature must verify against a key pinned in the local `[fleet] keys`
//!    ([`document`]), and the document must be signed for the topic it came on;
//! 2. the gateway's own document wins over its groups' (among groups the highest version);
//! 3. its version must be newer than any authentic document seen before ([`state`]), so an old
//!    document replayed is refused; the one already running is ignored quietly;
//! 4. it is layered over the local file and validated fully ([`Config::parse_layered`]);
//! 5. the pipeline applies it live ([`crate::pipeline::Control`]);
//! 6. within `health_timeout` every broker must be connected and every destination answer;
//!    otherwise the last known good config is applied again (rolled back).
//!
//! Only a document that passed its health check becomes the last known good one, persisted
//! and used at the next start. Every outcome is published in the status document and logged.
//! This module never applies a document whose signature it has not checked, and never
//! changes the local file.

pub(crate) mod channel;
pub mod document;
pub(crate) mod error;
pub(crate) mod policy;
pub(crate) mod state;
pub mod tools;

use crate::config::{Config, ConfigError, FleetConfig};
use crate::live::{FleetReport, FleetState, Live};
use crate::pipeline::Control;
use document::{Target, Verified};
use error::FleetError;
use policy::{Decision, Policy};
use state::State;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The local config file as read at start: the base every fleet document is layered over.
#[derive(Debug, Clone)]
pub struct Base {
    pub(crate) file: PathBuf,
    pub(crate) text: String,
    pub(crate) config: Config,
}

impl Base {
    pub fn load(path: &Path) -> Result<Base, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            location: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        let config = Config::parse(&text, &path.display().to_string())?;
        Ok(Base {
            file: path.to_path_buf(),
            text,
            config,
        })
    }

    /// A verified document's config over this file.
    fn layer(&self, doc: &Verified) -> Result<Config, ConfigError> {
        Config::parse_layered(
            &self.text,
            &self.file.display().to_string(),
            &doc.body.config,
            &format!("fleet config v{} ({})", doc.body.version, doc.body.target),
        )
    }
}

/// Whether `target` addresses this gateway.
fn addresses(fleet: &FleetConfig, gateway: &str, target: &Target) -> bool {
    match target {
        Target::Gateway(g) => g == gateway,
        Target::Group(g) => fleet.groups.contains(g),
    }
}

/// What the agent starts with: the last known good document over the local file when there
/// is one (and it still verifies and validates), else the local file alone; with its version.
pub(crate) fn startup(base: &Base) -> (Config, u64, Option<Verified>) {
    let Some(fleet) = &base.config.fleet else {
        return (base.config.clone(), 0, None);
    };
    let state = match State::load(&fleet.state_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "fleet state unreadable; starting with the local config file alone");
            return (base.config.clone(), 0, None);
        }
    };
    let Some(envelope) = &state.good else {
        return (base.config.clone(), 0, None);
    };
    let verified = match document::verify(envelope.as_bytes(), &fleet.keys) {
        Ok(v) if addresses(fleet, &base.config.gateway_id, &v.body.target) => v,
        Ok(v) => {
            tracing::error!(target = %v.body.target, "the last known good fleet config is not addressed to this gateway (gateway_id or groups changed); starting with the local config file alone");
            return (base.config.clone(), 0, None);
        }
        Err(e) => {
            tracing::error!(error = %e, "the last known good fleet config does not verify with the pinned keys; starting with the local config file alone");
            return (base.config.clone(), 0, None);
        }
    };
    match base.layer(&verified) {
        Ok(config) => {
            tracing::info!(version = verified.body.version, target = %verified.body.target, "starting with the last known good fleet config");
            (config, verified.body.version, Some(verified))
        }
        Err(e) => {
            tracing::error!(error = %e, "the last known good fleet config no longer fits the local file; starting with the local config file alone");
            (base.config.clone(), 0, None)
        }
    }
}

/// Why a document was not (or no longer) applied, for the status and the log.
enum Outcome {
    Applied,
    /// Nothing to do: already running, or already tried.
    Ignored,
    /// Not applied; the version when the document was authentic.
    Refused(Option<u64>, String),
    RolledBack(String),
}

struct Controller {
    fleet: FleetConfig,
    base: Base,
    gateway: String,
    state: State,
    /// Which document should run.
    policy: Policy,
    /// What runs now and is known good, to return to after a failed health check.
    good_config: Config,
    live: Live,
    control: mpsc::Sender<Control>,
    report: FleetReport,
    /// The fleet channel's client and this gateway's topics.
    client: rumqttc::AsyncClient,
    topics: channel::Topics,
}

impl Controller {
    /// Refreshes the report's figures, hands it to `/status`, and publishes it (retained);
    /// also to the shadow unless this is only the periodic refresh (each shadow update costs
    /// the operator messages).
    fn publish_report(&mut self) {
        self.publish_report_to(true);
    }

    fn publish_report_to(&mut self, shadow: bool) {
        let s = self.live.spool.stats();
        self.report.spool_pending_records = s.pending_records.load(Relaxed);
        self.report.spool_pending_bytes = s.pending_bytes.load(Relaxed);
        self.report.updated_at = crate::clock::now_secs();
        *self.live.fleet.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.report.clone());
        let json = serde_json::to_vec(&self.report).expect("report serialises");
        if let Err(e) =
            self.client
                .try_publish(&self.topics.status, rumqttc::QoS::AtLeastOnce, true, json)
        {
            tracing::debug!(error = %e, "fleet status not queued (the next one repeats it)");
        }
        if let Some(sh) = self.topics.shadow.as_ref().filter(|_| shadow) {
            // Reported = the document running now: equal to desired once it applied, so the
            // shadow's delta clears; a refused one leaves the delta, with the reason beside it.
            let applied = self
                .state
                .good
                .as_deref()
                .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                .unwrap_or(serde_json::Value::Null);
            let update = serde_json::json!({
                "state": { "reported": {
                    channel::SHADOW_KEY: applied,
                    channel::SHADOW_STATUS_KEY: self.report,
                } }
            });
            let _ = self.client.try_publish(
                &sh.update,
                rumqttc::QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&update).expect("update serialises"),
            );
        }
    }

    fn record_error(&mut self, version: Option<u64>, why: &str) {
        self.report.last_error = Some(why.to_string());
        self.report.last_error_version = version;
        if version.is_some() {
            self.state.last_error = Some(why.to_string());
            self.state.last_error_version = version;
            self.save_state();
        }
    }

    fn save_state(&self) {
        if let Err(e) = self.state.save(&self.fleet.state_dir) {
            tracing::error!(error = %e, "cannot persist the fleet state; a restart may not know the last good config");
        }
    }

    /// A message on a config topic (or the local file's document, with its own target).
    async fn on_document(&mut self, target: Target, payload: &[u8]) -> Outcome {
        let decision = if payload.is_empty() {
            tracing::info!(%target, "fleet config cleared on its topic");
            self.policy.on_cleared(&target)
        } else {
            let doc = document::verify(payload, &self.fleet.keys);
            self.policy
                .on_document(&target, doc, crate::clock::now_secs())
        };
        match decision {
            Decision::Ignore => Outcome::Ignored,
            Decision::Refuse(version, why) => Outcome::Refused(version, why),
            Decision::Apply(doc) => self.consider(*doc).await,
        }
    }

    /// Applies a document the policy chose, checks health, rolls back if it fails.
    async fn consider(&mut self, doc: Verified) -> Outcome {
        let v = doc.body.version;
        self.state.highest_seen = self.policy.highest_seen();
        self.save_state();
        let config = match self.base.layer(&doc) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(Some(v), format!("version {v} is invalid: {e}")),
        };
        self.report.state = FleetState::Applying;
        self.report.pending_version = Some(v);
        self.publish_report();
        tracing::info!(version = v, target = %doc.body.target, "applying fleet config");
        if let Err(e) = self.apply(config.clone()).await {
            self.report.pending_version = None;
            return Outcome::Refused(Some(v), format!("version {v} could not be applied: {e}"));
        }
        let health = healthy(&self.live, self.fleet.health_timeout).await;
        self.report.pending_version = None;
        match health {
            Ok(()) => {
                self.state.good = Some(doc.envelope.clone());
                self.state.good_version = v;
                self.policy.applied(v);
                self.save_state();
                self.good_config = config;
                self.live.config_version.store(v, Relaxed);
                self.report.applied_version = v;
                self.report.applied_target = Some(doc.body.target.to_string());
                Outcome::Applied
            }
            Err(why) => {
                let back = self.state.good_version;
                let rollback = self.apply(self.good_config.clone()).await;
                let mut text = format!(
                    "version {v} failed its health check within {:?}: {why}; rolled back to version {back}",
                    self.fleet.health_timeout
                );
                if let Err(e) = rollback {
                    text.push_str(&format!(" (the rollback itself failed: {e})"));
                }
                Outcome::RolledBack(text)
            }
        }
    }

    async fn apply(&self, config: Config) -> Result<(), FleetError> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control::Apply {
                config: Box::new(config),
                reply,
            })
            .await
            .map_err(|_| FleetError::PipelineStopped)?;
        Ok(answer.await.map_err(|_| FleetError::PipelineStopped)??)
    }

    fn conclude(&mut self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Ignored => return false,
            Outcome::Applied => {
                self.report.applied_total += 1;
                self.report.state = FleetState::Applied;
                tracing::info!(
                    version = self.report.applied_version,
                    "fleet config applied and healthy"
                );
            }
            Outcome::Refused(version, why) => {
                tracing::error!(reason = %why, "fleet config refused; the running config is unchanged");
                self.report.refused_total += 1;
                self.report.state = FleetState::Refused;
                self.record_error(version, &why);
            }
            Outcome::RolledBack(why) => {
                tracing::error!(reason = %why, "fleet config rolled back");
                self.report.rolled_back_total += 1;
                self.report.state = FleetState::RolledBack;
                self.record_error(Some(self.state.highest_seen), &why);
            }
        }
        true
    }
}

/// Polls until every broker is connected with the subscriptions the config asks for granted,
/// and every destination answers; or the deadline.
pub(crate) async fn healthy(live: &Live, timeout: Duration) -> Result<(), FleetError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut failures = Vec::new();
        for (name, s) in &live.sources {
            if !s.connected.load(Relaxed) {
                failures.push(format!("broker {name} is not connected"));
            } else if !s.subscriptions_settled() {
                failures.push(format!(
                    "broker {name} has not answered the new subscriptions"
                ));
            }
        }
        for d in live.destinations() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(
                left.max(Duration::from_millis(100)),
                crate::sink::call::Destination::probe(&*d.sink),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("destination {}: {e}", d.name)),
                Err(_) => failures.push(format!("destination {}: no answer in time", d.name)),
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(FleetError::Unhealthy(failures));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads the local document file (`[fleet] file`).
fn read_file(path: &Path) -> Result<(Target, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Its target comes from inside; the signature is checked before anything is trusted.
    let target = serde_json::from_slice::<document::Envelope>(&bytes)
        .ok()
        .and_then(|env| serde_json::from_str::<document::Body>(&env.body).ok())
        .map(|b| b.target)
        .ok_or_else(|| format!("{}: not a signed config document", path.display()))?;
    Ok((target, bytes))
}

/// Runs the fleet channel until the pipeline stops: receives documents, applies them through
/// `control`, publishes the status. `running` is the config and document the agent started
/// with (see [`startup`]).
pub(crate) async fn run(
    base: Base,
    running: (Config, u64, Option<Verified>),
    live: Live,
    control: mpsc::Sender<Control>,
) {
    let Some(fleet) = base.config.fleet.clone() else {
        return;
    };
    let gateway = base.config.gateway_id.clone();
    let (state, issued_after) = match State::load(&fleet.state_dir) {
        Ok(state) => (state, None),
        Err(e) => {
            // Without the highest version seen, an old signed document could be replayed:
            // from now on only documents issued after this moment are taken.
            let now = crate::clock::now_secs();
            tracing::error!(error = %e, "fleet state unreadable: only fleet documents signed from now on are taken (replay protection)");
            (
                State {
                    last_error: Some(format!(
                        "the fleet state was unreadable ({e}); documents issued before {now} (Unix seconds) are refused"
                    )),
                    ..State::default()
                },
                Some(now),
            )
        }
    };
    let (good_config, version, doc) = running;
    live.config_version.store(version, Relaxed);
    let broker = base
        .config
        .brokers
        .iter()
        .position(|b| b.name == fleet.broker)
        .expect("validated: the fleet broker exists");
    let tls = match base.config.broker_tls() {
        Ok(mut list) => list.swap_remove(broker),
        Err(e) => {
            tracing::error!(error = %e, "fleet channel: TLS files unusable; no fleet channel");
            return;
        }
    };
    let (client, mut events, topics) =
        channel::start(&base.config.brokers[broker], tls, &fleet, &gateway);
    let policy = Policy::new(
        &gateway,
        &fleet.groups,
        version,
        state.highest_seen,
        issued_after,
    );
    let mut c = Controller {
        report: FleetReport {
            gateway: gateway.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            groups: fleet.groups.clone(),
            applied_version: version,
            applied_target: doc.as_ref().map(|d| d.body.target.to_string()),
            state: FleetState::Running,
            last_error: state.last_error.clone(),
            last_error_version: state.last_error_version,
            ..FleetReport::default()
        },
        state: State {
            good_version: version,
            ..state
        },
        fleet: fleet.clone(),
        base,
        gateway,
        policy,
        good_config,
        live,
        control,
        client,
        topics,
    };
    c.publish_report();
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; the fleet file is read at start only");
            None
        }
    };
    let mut read_file_now = fleet.file.is_some();
    let mut tick = tokio::time::interval(fleet.status_interval);
    loop {
        if std::mem::take(&mut read_file_now) {
            if let Some(path) = &fleet.file {
                let outcome = match read_file(path) {
                    Ok((target, bytes)) if addresses(&fleet, &c.gateway, &target) => {
                        c.on_document(target, &bytes).await
                    }
                    Ok((target, _)) => Outcome::Refused(
                        None,
                        format!(
                            "{}: signed for {target}, which is not this gateway or one of its groups",
                            path.display()
                        ),
                    ),
                    Err(e) => Outcome::Refused(None, e),
                };
                if c.conclude(outcome) {
                    c.publish_report();
                }
            }
        }
        tokio::select! {
            event = events.recv() => match event {
                Some(channel::Event::Connected) => c.publish_report(),
                Some(channel::Event::Document { target, payload }) => {
                    let outcome = c.on_document(target, &payload).await;
                    if c.conclude(outcome) {
                        c.publish_report();
                    }
                }
                None => break,
            },
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                if fleet.file.is_some() {
                    tracing::info!("SIGHUP: reading the fleet config file again");
                    read_file_now = true;
                } else {
                    tracing::warn!("SIGHUP ignored: [fleet] names no file");
                }
            }
            _ = tick.tick() => c.publish_report_to(false),
            _ = c.control.closed() => break,
        }
    }
}
