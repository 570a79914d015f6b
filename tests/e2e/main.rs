//! End-to-end tests: the agent binary between a real Mosquitto and the real Kinesis emulator,
//! all on 127.0.0.1. See `support.rs` for the harness.

mod iot_credentials_server;
mod kinesis_proxy;
mod lossy_disk;
mod pki;
mod support;

mod bad_input;
mod consumers;
mod destinations;
mod disk;
mod firehose;
mod fleet;
mod intake;
mod kafka;
mod keys;
mod lingering;
mod memory;
mod observe;
mod package;
mod pipeline;
mod power;
mod producer;
mod s3;
mod security;
mod torture;
