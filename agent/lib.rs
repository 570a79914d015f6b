//! edgeship: a durable MQTT-to-AWS ingestion agent for edge gateways.
//!
//! The data path, one module per stage: [`source`] (MQTT sessions, the router; ack after
//! commit) -> [`spool`] (SQLite, group commit) -> [`ship`] (one shipper per destination:
//! planning, pacing, the sans-I/O state and its driver) -> [`frame`] (the one place records
//! are encoded) -> [`sink`] (one module per destination behind one interface).
//!
//! Around it: [`config`] (the TOML schema, checked into each part's settings), [`pipeline`]
//! (wires the stages and changes them live), [`live`] (the running agent's shared figures),
//! [`admin`] (/metrics, /readyz, /status), [`status`] (the status document), [`fleet`]
//! (signed config documents applied live), [`app`] (starts all of them: the `run` command).
//! Plumbing shared below them: [`topic`], [`key`], [`tls`], [`aws`], [`backoff`], [`clock`],
//! [`logging`], [`metrics`], [`http`], [`process`].

pub(crate) mod admin;
pub mod app;
pub mod aws;
pub(crate) mod backoff;
pub mod clock;
pub mod config;
pub mod decode;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fleet;
pub mod frame;
pub(crate) mod http;
pub mod key;
pub mod live;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub(crate) mod process;
pub mod ship;
pub mod sink;
pub mod source;
pub mod spool;
pub mod status;
pub mod tls;
pub(crate) mod topic;
