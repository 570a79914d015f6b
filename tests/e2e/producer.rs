//! The Kinesis producer against a stream that enforces its limits: per-shard pacing under a
//! sustained overload, throttled entries counted and resent, nothing lost or sent twice.

use crate::kinesis_proxy::{KinesisProxy, Limits};
use crate::support::*;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A backlog of 8 MB of incompressible payloads (40 devices) built while the uplink is down,
/// then drained into a 4-shard stream whose shards each take [`SHARD_LIMITS`] (the proxy
/// enforces them): whatever the proxy throttles is counted per shard exactly and resent, every
/// message arrives once. Prints each shard's rate during the drain and the agent's peak RSS.
fn drain_backlog_into_four_limited_shards(stream: &str, agent_paces_to: Option<&str>) {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 4);
    let mosquitto = Mosquitto::start(dir.path());
    let shards = rt.block_on(shard_ranges(&client, stream));
    let uplink = Uplink::start(kinesis.port);
    let proxy = KinesisProxy::start(uplink.port, &shards, Some(SHARD_LIMITS));
    let mut config = agent_config(
        dir.path(),
        mosquitto.port,
        &proxy.endpoint(),
        stream,
        "",
        "",
    );
    if let Some(rate) = agent_paces_to {
        config.push_str(&format!("shard_write_bytes_per_sec = \"{rate}\"\n"));
    }
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    agent.wait_shards_learned();

    let (devices, per_device, size) = (40u32, 200u32, 1024usize);
    let total = u64::from(devices * per_device);
    // The backlog builds while the uplink is down (shard discovery already happened).
    uplink.cut();
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        move |d, s| noise(d, s, size),
        "",
    ));
    wait_for("the backlog spooled", Duration::from_secs(120), || {
        agent.accounting().filter(|a| a.received >= total)
    });
    let pid = agent.pid().unwrap();
    let mut peak_rss = rss_bytes(pid).unwrap_or(0);
    let started = Instant::now();
    uplink.restore();
    let drained = wait_for("every record accepted", Duration::from_secs(180), || {
        peak_rss = peak_rss.max(rss_bytes(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
        let a = agent.accounting()?;
        (a.delivered >= total && a.pending == 0).then(|| started.elapsed())
    });
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(60), |t| {
        (0..devices)
            .all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), noise(d, s, size)))))
    });
    assert_eq!(
        contents.messages.len() as u64,
        total,
        "a message arrived twice"
    );
    let tally = proxy.tally();
    assert_eq!(tally.len(), 4, "every shard took records: {tally:?}");
    let s = agent.scrape();
    assert!(s.balances());
    let mut throttled = 0;
    for (shard, t) in &tally {
        throttled += t.throttled_entries;
        assert_eq!(
            s.count(
                "edgeship_kinesis_shard_entries_failed_total",
                &[("shard", shard.as_str()), ("kind", "throttled")]
            ),
            t.throttled_entries,
            "{shard}"
        );
        assert_eq!(
            s.count(
                "edgeship_kinesis_shard_entries_accepted_total",
                &[("shard", shard.as_str())]
            ),
            t.forwarded_entries,
            "{shard}"
        );
    }
    let accepted: u64 = tally.values().map(|t| t.forwarded_entries).sum();
    if agent_paces_to.is_some() {
        // Paced to the shards' own limit, the agent is throttled only at the edges of bursts.
        assert!(
            throttled * 4 < accepted,
            "paced, yet {throttled} throttled for {accepted} accepted"
        );
    } else {
        assert!(throttled > 0, "the shards' limits never bit: {tally:?}");
    }
    let secs = drained.as_secs_f64();
    eprintln!(
        "{stream}: a backlog of {total} messages ({} MB) drained into 4 shards of {} KiB/s in {secs:.1} s (agent paces to {}); throttled entries {throttled}; agent peak RSS {:.1} MiB",
        total * size as u64 / 1_000_000,
        SHARD_LIMITS.bytes_per_sec / 1024.0,
        agent_paces_to.unwrap_or("1MiB, the default"),
        peak_rss as f64 / (1 << 20) as f64
    );
    for (shard, t) in &tally {
        let (messages, _) = contents.per_shard.get(shard).copied().unwrap_or_default();
        eprintln!(
            "  {shard}: {messages} messages in {} Kinesis records, {:.1} records/s, {:.0} KiB/s, {} throttled",
            t.forwarded_entries,
            t.forwarded_entries as f64 / secs,
            t.forwarded_bytes as f64 / secs / 1024.0,
            t.throttled_entries
        );
    }
    assert_eq!(agent.stop().code(), Some(0));
}

/// The shards' byte limit is a quarter of Kinesis' 1 MiB/s: the emulator behind the proxy
/// saturates a core at about 2 MB/s of PutRecords, so four real-size shards could not be
/// driven to their limit here.
const SHARD_LIMITS: Limits = Limits {
    records_per_sec: 1000.0,
    bytes_per_sec: 256.0 * 1024.0,
};

/// The agent knows the shards' limit: it paces each shard near it and is rarely throttled.
#[test]
fn paced_shards_drain_near_their_limit() {
    drain_backlog_into_four_limited_shards("e2e-pacing-known", Some("256KiB"));
}

/// The agent assumes Kinesis' 1 MiB/s, four times what the shards take: it is throttled, backs
/// each shard off alone, resends only the throttled entries, and still drains everything.
#[test]
fn a_sustained_overload_is_throttled_counted_and_resent() {
    drain_backlog_into_four_limited_shards("e2e-pacing-overload", None);
}

/// The agent is told records may be 4 MiB, the stream (kinesis-mock, as a stream without the
/// raised limit) refuses records over 1 MiB entry by entry: the agent learns the limit from
/// the refusal, encodes those frames' blocks again in records that fit, and every message
/// arrives once.
#[test]
fn records_the_stream_refuses_as_too_large_are_encoded_again_to_fit() {
    let stream = "e2e-record-limit";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        stream,
        "",
        "",
    )
    .replace(
        "linger = \"200ms\"",
        "linger = \"3s\"\nframe_bytes = \"4MiB\"\nmax_call_bytes = \"5MiB\"",
    )
    .replace(
        "region = \"us-east-1\"",
        "region = \"us-east-1\"\nmax_record_bytes = \"4MiB\"",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    // 2 devices x 40 incompressible messages of 100 kB: 4 MB per partition key.
    let (devices, per_device) = (2, 40);
    let make = |d: u32, s: u32| noise(d, s, 100_000);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        make,
        "",
    ));
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(90), |t| {
        (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), make(d, s)))))
    });
    let t = tally(&contents.messages);
    assert_eq!(t.len() as u32, devices * per_device);
    assert!(t.values().all(|&n| n == 1), "a message arrived twice");
    let largest = contents.raw_records.iter().map(Vec::len).max().unwrap();
    assert!(largest <= 1 << 20, "a {largest}-byte record got in");

    let m = agent.scrape();
    assert!(
        m.sum(
            "edgeship_destination_errors_total",
            &[("code", "InvalidArgumentException")]
        ) >= 1.0,
        "the stream never refused a record: the test did not test the refusal"
    );
    assert_eq!(
        m.sum("edgeship_destination_learned_record_limit_bytes", &[]),
        1_048_576.0
    );
    assert!(agent
        .log()
        .contains("the destination refuses records over 1048576 bytes"));
}

/// UpdateShardCount (2 -> 4) on the emulator while messages flow: the parent shards close, the
/// agent learns the children and sends to them, and every message arrives exactly once.
#[test]
fn a_reshard_mid_run_loses_and_repeats_nothing() {
    let stream = "e2e-reshard";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 2);
    let mosquitto = Mosquitto::start(dir.path());
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            mosquitto.port,
            &kinesis.endpoint(),
            stream,
            "",
            "",
        ),
    );
    agent.wait_connected(1);
    agent.wait_shards_learned();
    let devices = 16;
    let port = mosquitto.port;
    let wave = move |n: u32| async move {
        let make = move |d: u32, s: u32| payload(d, n * 1000 + s);
        let prefix = format!("wave{n}-");
        publish_with(
            port,
            devices,
            400,
            Arc::new(AtomicU64::new(0)),
            make,
            &prefix,
        )
        .await
    };
    rt.block_on(wave(0));
    // Reshard while the second wave is being published and shipped.
    rt.block_on(async {
        let publishing = tokio::spawn(wave(1));
        client
            .update_shard_count()
            .stream_name(stream)
            .target_shard_count(4)
            .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
            .send()
            .await
            .expect("UpdateShardCount");
        publishing.await.unwrap();
    });
    let children: Vec<String> = rt
        .block_on(shard_ranges(&client, stream))
        .into_iter()
        .map(|(id, _, _)| id)
        .filter(|id| id.as_str() > "shardId-000000000001")
        .collect();
    assert_eq!(children.len(), 4, "{children:?}");
    wait_for(
        "the agent to learn the new shards",
        Duration::from_secs(60),
        || {
            agent
                .log()
                .lines()
                .any(|l| l.contains("learned the stream's shards") && l.contains("open_shards=4"))
                .then_some(())
        },
    );
    rt.block_on(wave(2));
    let expected = |d: u32, s: u32| payload(d, (s / 400) * 1000 + s % 400);
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(90), |t| {
        (0..devices).all(|d| (0..1200).all(|s| t.contains_key(&(topic_of(d), expected(d, s)))))
    });
    let t = tally(&contents.messages);
    assert_eq!(t.len() as u32, devices * 1200, "messages nobody published");
    assert!(t.values().all(|&n| n == 1), "a message arrived twice");
    // The last wave went to the children only, and the agent counts them per shard.
    let m = agent.scrape();
    for child in &children {
        let in_stream = contents.per_shard.get(child).map_or(0, |s| s.0);
        let counted = m.sum("edgeship_kinesis_shard_records_total", &[("shard", child)]);
        assert_eq!(counted, in_stream as f64, "shard {child}");
    }
    let to_children: u64 = children
        .iter()
        .map(|c| contents.per_shard.get(c).map_or(0, |s| s.0))
        .sum();
    assert!(
        to_children >= u64::from(devices) * 400,
        "{:?}",
        contents.per_shard
    );
}
