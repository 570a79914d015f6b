//! Per-device partition keys at scale: records of many keys bound for one shard share the
//! spool's blocks and the stream's records (keyed frames, version 3), each keeping its own key,
//! its shard and its order.

use crate::support::*;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// 300 devices, each its own partition key (`{topic[1]}`), 20 messages each, into a 4-shard
/// stream: every message arrives once, carrying its device's key, on the shard that key maps
/// to, each device's messages in order on it; and they travel in a few dozen Kinesis records,
/// not one or more per device (one frame held one key before: 300 devices made at least 300).
#[test]
fn many_keys_share_frames_per_shard_and_keep_their_order() {
    let stream = "e2e-many-keys";
    let Rig {
        dir, rt, client, ..
    } = rig(stream, 4);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis().endpoint(),
        stream,
        "",
        "",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    agent.wait_shards_learned();
    let (devices, per_device) = (300u32, 20u32);
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
    ));
    let contents = wait_stream_complete(
        &rt,
        &client,
        stream,
        devices,
        per_device,
        Duration::from_secs(120),
    );
    assert_eq!(agent.stop().code(), Some(0));

    let total = (devices * per_device) as usize;
    assert_eq!(contents.messages.len(), total, "every message once");
    let map = rt.block_on(shard_map(&client, stream));
    // Per device: the seqs of its payloads in the order its shard holds them.
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for (m, (shard, key)) in contents.messages.iter().zip(&contents.placed) {
        let device = m.topic.split('/').nth(1).unwrap();
        assert_eq!(
            key, device,
            "{}: the record keeps its device's key",
            m.topic
        );
        assert_eq!(m.key, device, "the frame carries the key per record");
        assert_eq!(
            Some(shard.as_str()),
            map.shard_for(device),
            "{device} on the shard its key maps to"
        );
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        order
            .entry(device.to_string())
            .or_default()
            .push(payload["seq"].as_u64().unwrap());
    }
    assert_eq!(order.len(), devices as usize);
    for (device, seqs) in &order {
        assert_eq!(
            seqs,
            &(0..u64::from(per_device)).collect::<Vec<_>>(),
            "{device}'s messages out of order on their shard"
        );
    }
    assert!(
        contents
            .raw_records
            .iter()
            .all(|r| r.starts_with(b"ESHP\x03")),
        "keyed frames of version 3"
    );
    eprintln!(
        "{total} messages of {devices} keys in {} Kinesis records ({} PUT payload units)",
        contents.kinesis_records, contents.put_units
    );
    assert!(
        contents.kinesis_records * 3 < devices as usize,
        "{} Kinesis records for {devices} keys: frames do not pack keys",
        contents.kinesis_records
    );
}
