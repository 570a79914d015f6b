//! Slow streams under `[batch] max_linger`: frames that hold less than a Kinesis PUT payload
//! unit when their linger is up wait on for more, so a slow gateway's records travel in a few
//! records of one unit each instead of a record a linger, and none waits past `max_linger`.

use crate::support::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 10 devices, 100 msg/s for 12 s, linger 200 ms, max_linger 4 s, one shard. Without
/// max_linger this run makes 12 Kinesis records (a frame each commit, about a second apart);
/// with it the first frame goes when it holds a unit's raw bytes (its route's ratio not yet
/// known), the next ones when their oldest record has waited 4 s (a unit of these records
/// would take about 40 s to fill), the last once the publishers stop: four or five records,
/// each within one PUT unit, and no message later than 4 s and the commit and call around
/// it.
#[test]
fn a_slow_streams_frames_wait_on_to_fill_a_put_unit_and_no_longer_than_max_linger() {
    let stream = "e2e-max-linger";
    let mut b = agent_behind_uplink(stream, "", "", |_, config| {
        config.replace(
            "linger = \"200ms\"",
            "linger = \"200ms\"\nmax_linger = \"4s\"",
        )
    });
    let (devices, per_device, spread) = (10u32, 120u32, Duration::from_secs(12));
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let acked =
        b.rt.block_on(publish_paced(b.mosquitto.port, devices, per_device, spread));
    assert_eq!(acked, u64::from(devices * per_device));
    let contents = wait_stream_complete(
        &b.rt,
        &b.client,
        stream,
        devices,
        per_device,
        Duration::from_secs(60),
    );
    assert_eq!(b.agent.stop().code(), Some(0));

    // Each message's wait, from when its publisher's pace sent it to its record's arrival.
    let interval_ms = spread.as_millis() as u64 / u64::from(per_device);
    let mut longest_ms = 0;
    for (m, &arrived) in contents.messages.iter().zip(&contents.arrivals_ms) {
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let published = start_ms + payload["seq"].as_u64().unwrap() * interval_ms;
        longest_ms = longest_ms.max(arrived.saturating_sub(published));
    }
    eprintln!(
        "{} messages in {} Kinesis records ({} bytes, {} PUT payload units), the longest wait {longest_ms} ms",
        contents.messages.len(),
        contents.kinesis_records,
        contents.kinesis_bytes,
        contents.put_units
    );
    assert!(
        contents.kinesis_records <= 6,
        "{} Kinesis records: frames did not wait on past their 200 ms linger",
        contents.kinesis_records
    );
    assert_eq!(
        contents.put_units, contents.kinesis_records as u64,
        "a frame that waited on takes at most one PUT payload unit"
    );
    assert!(
        longest_ms <= 6_500,
        "a message waited {longest_ms} ms: frames must go by max_linger (4 s) and the commit and call around it"
    );
}
