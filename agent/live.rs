//! The running agent's shared state: handles to the live figures of every part (the spool,
//! each broker session, each destination), the config in force, and the fleet channel's
//! report. The pipeline publishes it; the admin endpoint, the status document and the fleet
//! controller read it.
//!
//! It only holds and hands out; it never starts, stops or changes anything.

use crate::config::Config;
use crate::ship::stats::ShipperStats;
use crate::sink::Sink;
use crate::source::mqtt::SourceStats;
use crate::spool::SpoolHandle;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

/// Handles to the live figures of a running pipeline, for progress lines, metrics and status.
#[derive(Clone)]
pub(crate) struct Live {
    pub(crate) spool: SpoolHandle,
    pub(crate) sources: Vec<(String, Arc<SourceStats>)>,
    /// The config and destinations in use; replaced by a config change.
    current: Arc<RwLock<Current>>,
    /// Version of the applied config document; 0 for the local file.
    pub(crate) config_version: Arc<AtomicU64>,
    pub(crate) started: std::time::SystemTime,
    /// The AWS IoT credentials provider's figures, when it is the credentials source.
    pub(crate) iot_credentials: Option<Arc<crate::aws::iot_credentials::CredentialStats>>,
    /// The fleet channel's report (applied and pending versions, last error), when it runs.
    pub(crate) fleet: Arc<Mutex<Option<FleetReport>>>,
}

/// One destination as the live figures see it.
#[derive(Clone)]
pub(crate) struct Destination {
    pub(crate) name: String,
    pub(crate) stats: Arc<ShipperStats>,
    pub(crate) sink: Arc<Sink>,
}

struct Current {
    config: Arc<Config>,
    destinations: Vec<Destination>,
    /// Routes some destination ships (the config's and the retired ones it drains).
    shipped_routes: Vec<String>,
}

impl Live {
    pub(crate) fn new(
        config: &Config,
        spool: SpoolHandle,
        sources: Vec<(String, Arc<SourceStats>)>,
        iot_credentials: Option<Arc<crate::aws::iot_credentials::CredentialStats>>,
    ) -> Live {
        Live {
            spool,
            sources,
            current: Arc::new(RwLock::new(Current {
                config: Arc::new(config.clone()),
                destinations: Vec::new(),
                shipped_routes: Vec::new(),
            })),
            config_version: Arc::default(),
            started: std::time::SystemTime::now(),
            iot_credentials,
            fleet: Arc::default(),
        }
    }

    /// Publishes the config, destinations and shipped routes now in force.
    pub(crate) fn set_current(
        &self,
        config: &Config,
        destinations: Vec<Destination>,
        shipped_routes: Vec<String>,
    ) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        current.config = Arc::new(config.clone());
        current.destinations = destinations;
        current.shipped_routes = shipped_routes;
    }

    /// Routes the spool holds records of that no destination ships (their route and its
    /// destination were removed): (route, records, stored bytes). They wait for an operator
    /// (`edgeship spool drop-route`), or for the route to come back.
    pub fn orphaned(&self) -> Vec<(String, u64, u64)> {
        let shipped = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .shipped_routes
            .clone();
        self.spool
            .stats()
            .committed()
            .pending
            .into_iter()
            .filter(|(route, (records, _))| *records > 0 && !shipped.contains(route))
            .map(|(route, (records, bytes))| (route, records, bytes))
            .collect()
    }

    /// The config the pipeline runs with now.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
    }

    /// The destinations shipping now, by name.
    pub(crate) fn shippers(&self) -> Vec<(String, Arc<ShipperStats>)> {
        self.destinations()
            .into_iter()
            .map(|d| (d.name, d.stats))
            .collect()
    }

    pub(crate) fn destinations(&self) -> Vec<Destination> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .destinations
            .clone()
    }

    /// A copy of the fleet channel's report, when it runs.
    pub(crate) fn fleet_report(&self) -> Option<FleetReport> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The status document: published retained on `{prefix}/status/{gateway}`, shown by
/// `edgeship status` and collected by `edgeship fleet status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    pub(crate) gateway: String,
    pub(crate) agent_version: String,
    pub(crate) groups: Vec<String>,
    /// Version running now (0: the local file alone) and what it was signed for.
    pub applied_version: u64,
    pub applied_target: Option<String>,
    /// A version being applied and health-checked right now.
    pub pending_version: Option<u64>,
    /// The last thing that happened.
    pub state: FleetState,
    pub last_error: Option<String>,
    pub last_error_version: Option<u64>,
    pub(crate) spool_pending_records: u64,
    pub(crate) spool_pending_bytes: u64,
    /// Unix seconds.
    pub(crate) updated_at: u64,
    /// Documents applied, refused and rolled back since the agent started.
    #[serde(default)]
    pub applied_total: u64,
    #[serde(default)]
    pub refused_total: u64,
    #[serde(default)]
    pub rolled_back_total: u64,
}

/// What the fleet channel did last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetState {
    /// Running the config it started with; no document handled yet.
    #[default]
    Running,
    /// A document is being applied and health-checked.
    Applying,
    /// The last document was applied and passed its health check.
    Applied,
    /// The last document was refused (signature, target, version, or an invalid config).
    Refused,
    /// The last document failed its health check; the last known good config runs again.
    RolledBack,
}

impl FleetState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FleetState::Running => "running",
            FleetState::Applying => "applying",
            FleetState::Applied => "applied",
            FleetState::Refused => "refused",
            FleetState::RolledBack => "rolled_back",
        }
    }
}

impl std::fmt::Display for FleetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for FleetState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}
