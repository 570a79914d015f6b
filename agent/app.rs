//! The running agent as a whole (`edgeship run`): starts the pipeline, then the admin
//! endpoint and the fleet controller beside it, and stops them when the pipeline stops.
//!
//! The only place the parts are wired together; no part starts another's server. It decides
//! nothing about data: that is the pipeline's and its stages'.

use crate::fleet::{self, Base};
use crate::live::Live;
use crate::pipeline::{self, PipelineError};
use crate::spool::Accounting;
use std::future::Future;

/// Serves the admin endpoint at the config's `[admin] listen`, if any. A failure to bind is
/// logged and the agent runs on without it (shipping matters more than being watched).
pub(crate) async fn serve_admin(live: &Live) -> Option<tokio::task::JoinHandle<()>> {
    let addr = live.config().admin.listen?;
    match crate::admin::serve(addr, live.clone()).await {
        Ok((bound, task)) => {
            tracing::info!(address = %bound, "admin endpoint listening (/metrics /healthz /readyz /status)");
            Some(task)
        }
        Err(e) => {
            tracing::error!(address = %addr, error = %e, "cannot open the admin endpoint; running without /metrics and /readyz (set [admin] listen to a free address)");
            None
        }
    }
}

/// Runs the agent from its local config file until `shutdown` resolves: the last known good
/// fleet document over it when there is one, the admin endpoint, and the fleet channel when
/// `[fleet]` is configured.
pub async fn run(
    base: Base,
    shutdown: impl Future<Output = ()>,
) -> Result<Accounting, PipelineError> {
    let start = fleet::startup(&base);
    let pipeline = pipeline::start(start.0.clone()).await?;
    let live = pipeline.live();
    let admin = serve_admin(&live).await;
    let (control, side) = if base.config.fleet.is_some() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (Some(rx), tokio::spawn(fleet::run(base, start, live, tx)))
    } else {
        // `systemctl reload` sends SIGHUP; without a fleet section it must not end the
        // process (the default action).
        (None, tokio::spawn(ignore_hangups()))
    };
    let result = pipeline.run(control, shutdown).await;
    side.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    result
}

async fn ignore_hangups() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(mut hup) = signal(SignalKind::hangup()) {
        while hup.recv().await.is_some() {
            tracing::warn!("SIGHUP ignored: there is no [fleet] section, so nothing to reload");
        }
    }
}
