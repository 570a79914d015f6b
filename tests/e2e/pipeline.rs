//! The core contract, end to end: every published message reaches the stream; kills,
//! outages, restarts and a full spool lose nothing; bad input gets a clear, counted outcome.

use crate::support::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Test 1: 100,000 QoS 1 messages from 50 devices arrive in the stream, payload for payload.
#[test]
fn hundred_thousand_messages_arrive_payload_for_payload() {
    let dir = tempdir();
    let rt = runtime();
    let kinesis = kinesis();
    let client = rt.block_on(kinesis_client(&kinesis.endpoint()));
    rt.block_on(create_stream(&client, "e2e-volume", 2));
    let mosquitto = Mosquitto::start(dir.path());
    let mut agent = Agent::start(dir.path(), &agent_config(dir.path(), mosquitto.port, &kinesis.endpoint(), "e2e-volume", "", ""));
    agent.wait_connected(1);

    let (devices, per_device) = (50, 2_000);
    let total = u64::from(devices * per_device);
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    rt.block_on(publish(mosquitto.port, devices, per_device, acked.clone()));
    let published_in = started.elapsed();
    let acc = wait_for("every message delivered to Kinesis", Duration::from_secs(240), || {
        agent.accounting().filter(|a| a.delivered >= total && a.pending == 0)
    });
    let end_to_end = started.elapsed();
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");

    let contents = rt.block_on(read_stream(&client, "e2e-volume"));
    let duplicates = assert_all_delivered(&contents.messages, devices, per_device);
    // Every record carries its stable id: sequence numbers are unique per gateway.
    let mut seqs: Vec<u64> = contents.messages.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), contents.messages.len(), "a sequence number appears twice");
    let payload_bytes: usize = contents.messages.iter().map(|m| m.payload.len()).sum();
    eprintln!(
        "test 1: {total} messages published in {:.2}s, all in Kinesis after {:.2}s ({:.0} msg/s end to end); \
         {} Kinesis records, {} bytes for {} payload bytes ({:.3}); duplicates {duplicates}",
        published_in.as_secs_f64(),
        end_to_end.as_secs_f64(),
        total as f64 / end_to_end.as_secs_f64(),
        contents.kinesis_records,
        contents.kinesis_bytes,
        payload_bytes,
        contents.kinesis_bytes as f64 / payload_bytes as f64
    );
    assert_eq!(agent.stop().code(), Some(0));
    assert!(agent.log().contains("balanced=true"), "{}", agent.log());
}
