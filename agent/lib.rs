//! edgeship: a durable MQTT-to-AWS ingestion agent for edge gateways.
//!
//! Data path: [`source`] (MQTT, manual acks) -> [`spool`] (SQLite, group commit; ack after
//! commit) -> [`shipper`] ([`batcher`] plans, [`frame`] encodes) -> [`sink`] (Kinesis, a local
//! folder). [`pipeline`] wires them and shuts them down in order; [`config`] loads and checks
//! the TOML; [`route`] matches topics and renders partition keys; [`tls`] and [`aws`] hold
//! what connections to the broker and to AWS share (certificates, credentials); [`fleet`]
//! takes signed config documents from the fleet and applies them live.

pub mod admin;
pub mod aws;
pub mod batcher;
pub mod config;
pub mod decode;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fleet;
pub mod frame;
pub mod kpl;
pub mod logging;
pub mod metrics;
pub mod pacing;
pub mod pipeline;
pub mod route;
pub mod shard;
pub mod shipper;
pub mod sink;
pub mod source;
pub mod spool;
pub mod status;
pub mod tls;
pub mod uplink;
