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
