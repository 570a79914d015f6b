//! Sources: where messages come from. Today MQTT ([`mqtt`]); each source decides a message's
//! [`Disposition`](crate::spool::Disposition) with the [`Router`](router::Router) and hands it
//! to the spool, acking only once the spool says it is committed.

mod codec;
pub(crate) mod mqtt;
pub mod router;
mod session;

use router::Router;
use std::sync::Arc;

/// What a source follows while it runs: how to route, and which filters to subscribe to.
/// Replaced as a whole when the config changes.
pub(crate) struct SourcePlan {
    pub(crate) router: Arc<Router>,
    pub(crate) filters: Vec<(String, u8)>,
}
