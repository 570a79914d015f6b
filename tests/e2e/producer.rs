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
    let s = agent.scrape();
    // Each message under one id. A call whose answer did not come in time (a loaded emulator)
    // may have been taken all the same: its records are sent again under their ids, which is
    // at least once; without such a call every message is there exactly once.
    let ids: std::collections::HashSet<u64> = contents.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        ids.len() as u64,
        total,
        "a message under two ids, or missing"
    );
    let unanswered = s.count(
        "edgeship_destination_errors_total",
        &[("destination", "stream"), ("code", "Timeout")],
    );
    let again = contents.messages.len() as u64 - total;
    if unanswered == 0 {
        assert_eq!(again, 0, "a message arrived twice");
    } else {
        assert!(
            again <= unanswered * 5_000,
            "{again} messages twice after {unanswered} calls without an answer"
        );
    }
    let tally = proxy.tally();
    assert_eq!(tally.len(), 4, "every shard took records: {tally:?}");
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

/// One device floods its shard (1 MB, with the agent pacing each shard to 64 KiB/s: about 16 s
/// of sending) while three devices on the other shards send a little: their messages arrive
/// within seconds, long before the hot shard's backlog is through. The send queue is kept
/// small (calls of 64 KiB, so 128 KiB queued) and the hot shard's frames may hold only half of
/// it, and the others' plans pass the hot shard's waiting ones, so the hot shard cannot keep
/// the others' frames from being built. (Without that, they waited 12 s here.)
#[test]
fn a_hot_shard_slows_only_its_own_records() {
    let stream = "e2e-hot-shard";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 4);
    let mosquitto = Mosquitto::start(dir.path());
    let ranges = rt.block_on(shard_ranges(&client, stream));
    let map = rt.block_on(shard_map(&client, stream));
    let shard_of = |d: u32| map.shard_for(&format!("dev-{d:03}")).unwrap().to_string();
    let hot = 0u32;
    let mut cold: Vec<u32> = Vec::new();
    for d in 1..200 {
        let s = shard_of(d);
        if s != shard_of(hot) && cold.iter().all(|&c| shard_of(c) != s) {
            cold.push(d);
        }
    }
    assert_eq!(cold.len(), 3, "three devices on the three other shards");
    let proxy = KinesisProxy::start(kinesis.port, &ranges, Some(SHARD_LIMITS));
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &proxy.endpoint(),
        stream,
        "",
        "",
    )
    .replace(
        "linger = \"200ms\"",
        "linger = \"200ms\"\nframe_bytes = \"64KiB\"\nmax_call_bytes = \"64KiB\"",
    ) + "shard_write_bytes_per_sec = \"64KiB\"\n";
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    agent.wait_shards_learned();

    let (hot_count, size) = (500u32, 2000usize);
    let hot_payload = move |_d: u32, s: u32| noise(hot, s, size);
    // Only the hot device publishes first: device 0 of a one-device publisher is `hot`.
    rt.block_on(publish_with(
        mosquitto.port,
        1,
        hot_count,
        Arc::new(AtomicU64::new(0)),
        hot_payload,
        "hot-",
    ));
    wait_for("the hot backlog spooled", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| a.received >= u64::from(hot_count))
    });
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let per_cold = 100u32;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for &d in &cold {
            tasks.push(tokio::spawn(publish_on(
                mosquitto.port,
                topic_of(d),
                d,
                per_cold,
            )));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(60), |t| {
        cold.iter()
            .all(|&d| (0..per_cold).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
    });
    let hot_topic = topic_of(hot);
    let hot_arrived = contents
        .messages
        .iter()
        .filter(|m| m.topic == hot_topic)
        .count();
    let cold_last_ms = contents
        .messages
        .iter()
        .zip(&contents.arrivals_ms)
        .filter(|(m, _)| m.topic != hot_topic)
        .map(|(_, &at)| at)
        .max()
        .unwrap();
    let cold_latency = cold_last_ms.saturating_sub(t0);
    eprintln!(
        "hot shard: {hot_arrived} of {hot_count} messages through when the cold devices' {} had all arrived, the last {cold_latency} ms after they were published",
        cold.len() as u32 * per_cold
    );
    assert!(
        hot_arrived < hot_count as usize,
        "the hot backlog was through before the test measured the others"
    );
    assert!(
        cold_latency < 3_000,
        "the other shards' messages waited {cold_latency} ms behind the hot shard"
    );
    // And the hot shard's backlog still arrives, each message once.
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(90), |t| {
        (0..hot_count).all(|s| t.contains_key(&(hot_topic.clone(), noise(hot, s, size))))
    });
    let t = tally(&contents.messages);
    assert_eq!(t.len() as u32, hot_count + cold.len() as u32 * per_cold);
    assert!(t.values().all(|&n| n == 1), "a message arrived twice");
}

/// An on-demand stream whose record size limit was raised to 10 MiB: the agent reads the limit
/// from the stream (DescribeStreamSummary), sends records over 1 MiB and none over 10 MiB,
/// and a message over `max_message_bytes` is dead-lettered and counted.
#[test]
fn an_on_demand_stream_with_10_mib_records_takes_large_frames() {
    let stream = "e2e-large-records";
    let dir = tempdir();
    let rt = runtime();
    let kinesis = kinesis();
    let client = rt.block_on(kinesis_client(&kinesis.endpoint()));
    rt.block_on(async {
        client
            .create_stream()
            .stream_name(stream)
            .stream_mode_details(
                aws_sdk_kinesis::types::StreamModeDetails::builder()
                    .stream_mode(aws_sdk_kinesis::types::StreamMode::OnDemand)
                    .build()
                    .unwrap(),
            )
            .max_record_size_in_kib(10240)
            .send()
            .await
            .expect("CreateStream (on-demand, 10 MiB records)");
        wait_active(&client, stream).await;
    });
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
        "linger = \"2s\"\nframe_bytes = \"16MiB\"\nmax_call_bytes = \"5MiB\"\nmax_message_bytes = \"4MiB\"",
    )
    .replace(
        "region = \"us-east-1\"",
        "region = \"us-east-1\"\nmax_record_bytes = \"10MiB\"",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    wait_for(
        "the agent to read the stream's record limit",
        Duration::from_secs(30),
        || {
            agent
                .log()
                .lines()
                .any(|l| {
                    l.contains("learned the stream's record size limit")
                        && l.contains("max_record_bytes=10485760")
                })
                .then_some(())
        },
    );
    // Device 0: six incompressible 3 MB messages; device 1: small telemetry; device 2: one
    // 5 MB message (over max_message_bytes) and then small ones.
    let make = |d: u32, s: u32| match (d, s) {
        (0, _) => noise(0, s, 3_000_000),
        (2, 0) => noise(2, 0, 5_000_000),
        _ => payload(d, s),
    };
    rt.block_on(publish_with(
        mosquitto.port,
        3,
        6,
        Arc::new(AtomicU64::new(0)),
        make,
        "",
    ));
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(120), |t| {
        (0..3).all(|d| {
            (0..6)
                .filter(|&s| (d, s) != (2, 0))
                .all(|s| t.contains_key(&(topic_of(d), make(d, s))))
        })
    });
    let t = tally(&contents.messages);
    assert_eq!(t.len(), 17, "the 5 MB message must not be in the stream");
    assert!(t.values().all(|&n| n == 1), "a message arrived twice");
    let largest = contents.raw_records.iter().map(Vec::len).max().unwrap();
    assert!(
        largest > 1 << 20 && largest <= 10 << 20,
        "largest record {largest} bytes: the raised limit was not used, or passed"
    );
    let m = agent.scrape();
    assert_eq!(
        m.count(
            "edgeship_records_dropped_total",
            &[("route", "telemetry"), ("reason", "oversize")]
        ),
        1
    );
    assert_eq!(m.count("edgeship_spool_dead_letters", &[]), 1);
    eprintln!(
        "10 MiB stream: {} records, largest {largest} bytes",
        contents.raw_records.len()
    );
}

/// Explicit hash keys: one route keeps the gateway as partition key but spreads its records
/// over the shards by device (`explicit_hash_key = "{topic[1]}"`); another pins its KPL
/// records to the shard holding hash key 0. Every message lands on the shard its hash key
/// names, under the partition key its route names.
#[test]
fn explicit_hash_keys_choose_the_shard() {
    let stream = "e2e-explicit-hash";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 4);
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
        "partition_key = \"{topic[1]}\"",
        "partition_key = \"{gateway}\"\nexplicit_hash_key = \"{topic[1]}\"\n\
         [[route]]\nname = \"alarms\"\ntopics = [\"devices/+/alarm\"]\ndestination = \"stream\"\n\
         partition_key = \"{topic[1]}\"\nexplicit_hash_key = \"0\"\nformat = \"kpl\"",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    agent.wait_shards_learned();
    let (devices, per_device) = (16, 50);
    rt.block_on(async {
        let telemetry = tokio::spawn(publish(
            mosquitto.port,
            devices,
            per_device,
            Arc::new(AtomicU64::new(0)),
        ));
        let mut alarms = Vec::new();
        for d in 0..4 {
            alarms.push(tokio::spawn(publish_on(
                mosquitto.port,
                format!("devices/dev-{d:03}/alarm"),
                d,
                10,
            )));
        }
        telemetry.await.unwrap();
        for a in alarms {
            a.await.unwrap();
        }
    });
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(60), |t| {
        (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
            && (0..4).all(|d| {
                (0..10)
                    .all(|s| t.contains_key(&(format!("devices/dev-{d:03}/alarm"), payload(d, s))))
            })
    });
    let map = rt.block_on(shard_map(&client, stream));
    let first_shard = map.shard_id_for_hash(0).unwrap().to_string();
    let mut shards_used = std::collections::BTreeSet::new();
    assert_eq!(
        contents.messages.len(),
        (devices * per_device + 40) as usize
    );
    for (m, (shard, key)) in contents.messages.iter().zip(&contents.placed) {
        let device = m.topic.split('/').nth(1).unwrap();
        if m.topic.ends_with("/alarm") {
            assert_eq!(key, device, "alarms keep the device as partition key");
            assert_eq!(shard, &first_shard, "alarms are pinned to hash key 0");
        } else {
            assert_eq!(
                key, "gw-test",
                "telemetry keeps the gateway as partition key"
            );
            let expected = map
                .shard_id_for_hash(edgeship::key::hash_key(device))
                .unwrap();
            assert_eq!(shard.as_str(), &*expected, "{device} on the wrong shard");
            shards_used.insert(shard.clone());
        }
    }
    assert_eq!(
        shards_used.len(),
        4,
        "one gateway's records spread over every shard"
    );
    // The KPL aggregates carry the explicit hash key for the KCL's shard filter.
    for raw in &contents.raw_records {
        if raw.starts_with(&edgeship::frame::kpl::MAGIC) {
            for u in edgeship::frame::kpl::decode(raw).unwrap() {
                assert_eq!(u.explicit_hash_key.as_deref(), Some("0"));
            }
        }
    }
}

/// How many times the stream held each (topic, payload).
type Tally = std::collections::HashMap<(String, Vec<u8>), u32>;

/// Cuts the uplink, publishes `per_device` messages of `size` bytes of noise from each of
/// `devices` devices, waits until the agent has spooled them, restores the uplink and waits
/// until the stream holds every message and the agent its answers; the stream's contents,
/// their tally (every message counted) and the agent's metrics then.
fn backlog_after_an_outage(
    (rt, client, stream): (&tokio::runtime::Runtime, &aws_sdk_kinesis::Client, &str),
    (agent, uplink, port): (&Agent, &Uplink, u16),
    (devices, per_device, size): (u32, u32, usize),
    timeout: Duration,
) -> (StreamContents, Tally, Scrape) {
    let total = u64::from(devices * per_device);
    uplink.cut();
    rt.block_on(publish_with(
        port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        move |d, s| noise(d, s, size),
        "",
    ));
    wait_for("the backlog spooled", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.received >= total)
    });
    uplink.restore();
    let contents = wait_stream_complete_with(rt, client, stream, timeout, |t| {
        (0..devices)
            .all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), noise(d, s, size)))))
    });
    let t = tally(&contents.messages);
    assert_eq!(t.len() as u64, total);
    // The stream may hold a record before the agent has its answer; what matters is that the
    // agent got its answers, and its spool is free.
    wait_for("the agent's calls answered", timeout, || {
        agent
            .accounting()
            .filter(|a| a.delivered >= total && a.pending == 0)
    });
    let m = agent.scrape();
    assert!(m.balances());
    (contents, t, m)
}

/// A backlog of 4.8 MB of 200-byte incompressible payloads on a `format = "kpl"` route, sent
/// after an outage. A KPL record is larger than the spooled records it carries (each payload
/// gains its tags: about 1.3 times at this size), so a frame planned at the shard's 1 MiB a second would not fit one 1 MiB record: it
/// would be encoded whole, found too large and encoded again in halves. The route's first
/// encoding teaches the agent how much its records grow, and its frames are planned to fit
/// from then on: at most one frame is split (`split_frames_total`), where before every full
/// frame was encoded twice. Every message arrives once, each device's in order.
#[test]
fn a_kpl_backlog_is_planned_in_frames_that_fit_one_record() {
    let stream = "e2e-kpl-backlog";
    let Behind {
        dir: _dir,
        rt,
        client,
        uplink,
        mosquitto,
        agent,
    } = agent_behind_uplink(stream, "", "", |_, config| {
        config.replace(
            "partition_key = \"{topic[1]}\"\n",
            "partition_key = \"{topic[1]}\"\nformat = \"kpl\"\n",
        )
    });
    let (devices, per_device, size) = (8u32, 2_500u32, 200usize);
    let total = u64::from(devices * per_device);
    let (contents, t, m) = backlog_after_an_outage(
        (&rt, &client, stream),
        (&agent, &uplink, mosquitto.port),
        (devices, per_device, size),
        Duration::from_secs(120),
    );
    assert!(t.values().all(|n| *n == 1), "every message once");
    // One shard: the stream's order is the order the agent sent; each device's in sequence.
    let seq: std::collections::HashMap<Vec<u8>, u32> = (0..devices)
        .flat_map(|d| (0..per_device).map(move |s| (noise(d, s, size), s)))
        .collect();
    let mut next = vec![0u32; devices as usize];
    for m in &contents.messages {
        let d: usize = m.topic[12..15].parse().unwrap();
        assert_eq!(seq[&m.payload], next[d], "device {d} out of order");
        next[d] += 1;
    }
    assert!(contents
        .raw_records
        .iter()
        .all(|r| r.starts_with(&edgeship::frame::kpl::MAGIC) && r.len() < 1 << 20));
    let split = m.count(
        "edgeship_destination_split_frames_total",
        &[("destination", "stream")],
    );
    eprintln!(
        "kpl backlog: {total} messages of {size} bytes in {} Kinesis records, {split} frames split",
        contents.raw_records.len()
    );
    assert!(
        split <= 1,
        "{split} frames encoded whole and again in parts"
    );
}

/// A cellular uplink of 128 kbit/s (16,000 bytes a second each way, the proxy paces every
/// byte) after an outage: a backlog of 576 KB of incompressible payloads, about 48 s on that
/// link as one call, more than any fixed attempt timeout of 30 s allows. The agent measures
/// the link with a small first call, sends calls the link carries in seconds with timeouts
/// that follow their size, and every message arrives once.
#[test]
fn a_128_kbit_uplink_carries_every_message() {
    let stream = "e2e-slow-uplink";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let mosquitto = Mosquitto::start(dir.path());
    let uplink = Uplink::start_limited(kinesis.port, 16_000);
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &uplink.endpoint(),
        stream,
        "",
        "",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device, size) = (6u32, 4u32, 24_000usize);
    let (contents, _, m) = backlog_after_an_outage(
        (&rt, &client, stream),
        (&agent, &uplink, mosquitto.port),
        (devices, per_device, size),
        Duration::from_secs(240),
    );
    let rate = m.count(
        "edgeship_destination_uplink_bytes_per_second",
        &[("destination", "stream")],
    );
    assert!(rate > 0, "the uplink's rate was measured");
    eprintln!(
        "128 kbit/s uplink: {} messages in {} records, measured {rate} bytes/s, {} calls timed out",
        contents.messages.len(),
        contents.raw_records.len(),
        m.count(
            "edgeship_destination_errors_total",
            &[("destination", "stream"), ("code", "Timeout")]
        )
    );
}

/// A message the stream cannot take however it is encoded (2 MB of noise for a 1 MiB stream,
/// while the agent's config allows 5 MiB messages and 10 MiB records): it is dead-lettered and
/// counted `unshippable`, the messages before and after it arrive, and shipping never stops.
/// Before, the shipper task ended on it and nothing started it again.
#[test]
fn a_message_the_stream_cannot_take_is_dead_lettered_and_the_rest_arrive() {
    let stream = "e2e-unshippable";
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
        "linger = \"200ms\"\nmax_message_bytes = \"5MiB\"",
    )
    .replace(
        "region = \"us-east-1\"",
        "region = \"us-east-1\"\nmax_record_bytes = \"10MiB\"",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let big = |d: u32, s: u32| (d, s) == (0, 2);
    let make = move |d: u32, s: u32| {
        if big(d, s) {
            noise(d, s, 2_000_000)
        } else {
            payload(d, s)
        }
    };
    rt.block_on(publish_with(
        mosquitto.port,
        2,
        5,
        Arc::new(AtomicU64::new(0)),
        make,
        "",
    ));
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(120), |t| {
        (0..2).all(|d| {
            (0..5)
                .filter(|&s| !big(d, s))
                .all(|s| t.contains_key(&(topic_of(d), make(d, s))))
        })
    });
    let t = tally(&contents.messages);
    assert_eq!(t.len(), 9, "the 2 MB message must not be in the stream");
    let acc = wait_for("the spool to settle", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert_eq!(
        acc.dropped_by_reason.get("unshippable"),
        Some(&1),
        "{acc:?}"
    );
    assert_eq!(acc.dead_letters, 1);
    assert!(acc.balances(), "{acc:?}");
    let m = agent.scrape();
    assert_eq!(
        m.count(
            "edgeship_records_dropped_total",
            &[("route", "telemetry"), ("reason", "unshippable")]
        ),
        1
    );
    assert_eq!(
        m.count(
            "edgeship_destination_restarts_total",
            &[("destination", "stream")]
        ),
        0,
        "dead-lettering is not a failure"
    );
    let (code, body) = agent.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
}
