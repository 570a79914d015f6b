//! The core contract, end to end: every published message reaches the stream; kills,
//! outages, restarts and a full spool lose nothing; bad input gets a clear, counted outcome.

use crate::support::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Test 1: 100,000 QoS 1 messages from 50 devices arrive in the stream, payload for payload.
#[test]
fn hundred_thousand_messages_arrive_payload_for_payload() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-volume", 2);
    let mosquitto = Mosquitto::start(dir.path());
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            mosquitto.port,
            &kinesis.endpoint(),
            "e2e-volume",
            "",
            "",
        ),
    );
    agent.wait_connected(1);

    let (devices, per_device) = (50, 2_000);
    let total = u64::from(devices * per_device);
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    rt.block_on(publish(mosquitto.port, devices, per_device, acked.clone()));
    let published_in = started.elapsed();
    let acc = wait_for(
        "every message delivered to Kinesis",
        Duration::from_secs(240),
        || {
            agent
                .accounting()
                .filter(|a| a.delivered >= total && a.pending == 0)
        },
    );
    let end_to_end = started.elapsed();
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");

    let contents = rt.block_on(read_stream(&client, "e2e-volume"));
    let duplicates = assert_all_delivered(&contents.messages, devices, per_device);
    // Every record carries its stable id: sequence numbers are unique per gateway.
    let mut seqs: Vec<u64> = contents.messages.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        contents.messages.len(),
        "a sequence number appears twice"
    );
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

/// Test 2: kill -9 three times during a 100,000-message run; every message ends up in the
/// stream and the accounting balances.
#[test]
fn kill_nine_three_times_loses_nothing() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-kill", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        "e2e-kill",
        "",
        "",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);

    let (devices, per_device) = (50, 2_000);
    let total = u64::from(devices * per_device);
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = rt.spawn(publish(mosquitto.port, devices, per_device, acked.clone()));
    for (kill, threshold) in [20_000u64, 45_000, 70_000].into_iter().enumerate() {
        wait_for(
            "the agent to receive more messages",
            Duration::from_secs(120),
            || {
                agent
                    .accounting()
                    .filter(|a| a.received >= threshold)
                    .map(|_| ())
            },
        );
        agent.kill();
        agent.spawn();
        agent.wait_connected(kill + 2);
    }
    rt.block_on(publisher).unwrap();
    assert_eq!(acked.load(Ordering::Relaxed), total);
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-kill",
        devices,
        per_device,
        Duration::from_secs(240),
    );
    let duplicates = assert_all_delivered(&contents.messages, devices, per_device);
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
    assert!(acc.received >= total, "{acc:?}");
    eprintln!("test 2: 3 x kill -9, {total} published, {} received (redelivered after kills), {duplicates} duplicates in the stream", acc.received);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Test 3: the Kinesis endpoint goes away; the backlog grows in the spool, then drains fully.
#[test]
fn uplink_outage_grows_the_backlog_then_drains() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-outage", 1);
    let uplink = Uplink::start(kinesis.port);
    let mosquitto = Mosquitto::start(dir.path());
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            mosquitto.port,
            &uplink.endpoint(),
            "e2e-outage",
            "",
            "",
        ),
    );
    agent.wait_connected(1);

    // Some traffic while the uplink works.
    rt.block_on(publish(
        mosquitto.port,
        10,
        100,
        Arc::new(AtomicU64::new(0)),
    ));
    wait_for("the first 1,000 delivered", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.delivered >= 1_000)
    });

    uplink.cut();
    let acked = Arc::new(AtomicU64::new(0));
    rt.block_on(publish_with(
        mosquitto.port,
        10,
        1_000,
        acked,
        |d, s| payload(d, s + 100),
        "b-",
    ));
    let first = wait_for("11,000 spooled", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.received >= 11_000)
    });
    assert!(
        first.pending >= 9_000,
        "the backlog should hold what arrived during the outage: {first:?}"
    );
    rt.block_on(publish_with(
        mosquitto.port,
        10,
        1_000,
        Arc::new(AtomicU64::new(0)),
        |d, s| payload(d, s + 1_100),
        "c-",
    ));
    let grown = wait_for("21,000 spooled", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.received >= 21_000)
    });
    assert!(
        grown.pending > first.pending,
        "backlog did not grow: {first:?} -> {grown:?}"
    );
    assert!(
        grown.delivered < 11_000,
        "nothing can be delivered during the outage: {grown:?}"
    );
    wait_for(
        "the agent to log the failing calls",
        Duration::from_secs(30),
        || agent.log().contains("records stay spooled").then_some(()),
    );

    uplink.restore();
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-outage",
        10,
        2_100,
        Duration::from_secs(180),
    );
    assert_all_delivered(&contents.messages, 10, 2_100);
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Test 4: Mosquitto restarts mid-run; the agent reconnects to its persistent session and
/// nothing is lost.
#[test]
fn broker_restart_mid_run_loses_nothing() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-broker-restart", 1);
    let mut mosquitto = Mosquitto::start(dir.path());
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            mosquitto.port,
            &kinesis.endpoint(),
            "e2e-broker-restart",
            "",
            "",
        ),
    );
    agent.wait_connected(1);

    rt.block_on(publish(
        mosquitto.port,
        20,
        500,
        Arc::new(AtomicU64::new(0)),
    ));
    mosquitto.restart();
    agent.wait_connected(2);
    rt.block_on(publish_with(
        mosquitto.port,
        20,
        500,
        Arc::new(AtomicU64::new(0)),
        |d, s| payload(d, s + 500),
        "after-",
    ));
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-broker-restart",
        20,
        1_000,
        Duration::from_secs(180),
    );
    assert_all_delivered(&contents.messages, 20, 1_000);
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(agent.stop().code(), Some(0));
}

fn noisy_payload(d: u32, s: u32) -> Vec<u8> {
    noise(d, s, 1_000)
}

/// An agent with a 1 MiB spool and the given full policy, its uplink cut, and 3,000
/// incompressible 1 KB messages (three times the cap) published to its broker.
fn fill_a_small_spool(stream: &str, policy: &str, extra_broker: &str, extra_batch: &str) -> Behind {
    let behind = agent_behind_uplink(
        stream,
        &format!("max_bytes = \"1MiB\"\nfull_policy = \"{policy}\""),
        extra_broker,
        |_, config| config.replace("[batch]\n", &format!("[batch]\n{extra_batch}")),
    );
    behind.uplink.cut();
    behind.rt.block_on(publish_with(
        behind.mosquitto.port,
        3,
        1_000,
        Arc::new(AtomicU64::new(0)),
        noisy_payload,
        "n-",
    ));
    behind
}

/// Test 5a: a full spool with policy `block` stops acking; once the sink returns, every
/// message arrives and nothing was dropped.
#[test]
fn full_spool_with_block_policy_loses_nothing() {
    let Behind {
        dir: _dir,
        rt,
        client,
        uplink,
        mosquitto: _m,
        mut agent,
    } = fill_a_small_spool("e2e-full-block", "block", "max_unacked = 100", "");
    let full = wait_for(
        "the spool to reach its cap",
        Duration::from_secs(60),
        || agent.accounting().filter(|a| a.pending_bytes >= 1 << 20),
    );
    // Blocked: for as long as the uplink is down, the agent takes no more than the cap allows.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let a = agent.accounting().unwrap();
        assert!(
            a.received < 1_300,
            "the agent kept reading past a full spool: {a:?}"
        );
        assert_eq!(a.dropped, 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    uplink.restore();
    let acc = wait_for("all 3,000 delivered", Duration::from_secs(180), || {
        agent
            .accounting()
            .filter(|a| a.delivered >= 3_000 && a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
    let contents = rt.block_on(read_stream(&client, "e2e-full-block"));
    let t = tally(&contents.messages);
    for d in 0..3 {
        for s in 0..1_000 {
            assert!(
                t.contains_key(&(format!("devices/dev-{d:03}/telemetry"), noisy_payload(d, s))),
                "missing {d}/{s}"
            );
        }
    }
    eprintln!(
        "test 5a: spool capped at {} bytes; {} received in total; all 3000 delivered",
        full.pending_bytes, acc.received
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// Test 5b: a full spool with policy `drop_oldest` evicts and counts; the equation holds and
/// the stream holds exactly what was not dropped.
#[test]
fn full_spool_with_drop_oldest_counts_every_drop() {
    // Small frames, so what is in flight is a small part of the tiny spool.
    let Behind {
        dir: _dir,
        rt,
        client,
        uplink,
        mosquitto: _m,
        mut agent,
    } = fill_a_small_spool(
        "e2e-full-drop",
        "drop_oldest",
        "",
        "frame_bytes = \"64KiB\"\n",
    );
    let during = wait_for("all 3,000 received", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.received >= 3_000)
    });
    let dropped = during
        .dropped_by_reason
        .get("spool_full")
        .copied()
        .unwrap_or(0);
    assert!(
        dropped >= 1_000,
        "a 1 MiB spool cannot hold 3 MB: {during:?}"
    );
    assert!(during.balances(), "{during:?}");

    uplink.restore();
    let acc = wait_for("the spool to drain", Duration::from_secs(180), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.received, 3_000, "{acc:?}");
    let contents = rt.block_on(read_stream(&client, "e2e-full-drop"));
    let t = tally(&contents.messages);
    assert_eq!(
        t.len() as u64,
        acc.delivered,
        "the stream holds exactly the delivered messages"
    );
    assert_eq!(acc.delivered + acc.dropped, 3_000);
    for (topic, payload) in t.keys() {
        let d: u32 = topic[12..15].parse().unwrap();
        assert!(
            (0..1_000).any(|s| noisy_payload(d, s) == *payload),
            "unknown message in the stream"
        );
    }
    // /metrics names the same drops under their reason.
    let s = agent.scrape();
    assert!(s.balances(), "{}", s.text);
    assert_eq!(
        s.count(
            "edgeship_records_dropped_total",
            &[("reason", "spool_full")]
        ),
        acc.dropped
    );
    assert_eq!(
        s.count("edgeship_records_delivered_total", &[]),
        acc.delivered
    );
    eprintln!(
        "test 5b: 3000 received, {} delivered, {} dropped (spool_full)",
        acc.delivered, acc.dropped
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// One agent, two brokers: one speaking MQTT 3.1.1, one MQTT 5. Both sessions are persistent:
/// what is published while the agent is down (killed) arrives after it restarts.
#[test]
fn two_brokers_mqtt_311_and_5_keep_their_sessions() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-two-brokers", 1);
    let v311 = Mosquitto::start(&dir.path().join("a"));
    let v5 = Mosquitto::start(&dir.path().join("b"));
    let config = agent_config(dir.path(), v311.port, &kinesis.endpoint(), "e2e-two-brokers", "", "protocol = \"3.1.1\"").replace(
        "[[route]]",
        &format!("[[broker]]\nname = \"v5\"\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"5\"\nkeep_alive = \"5s\"\n\n[[route]]", v5.port),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(2);

    // Devices 0..10 on the 3.1.1 broker, 10..20 on the MQTT 5 broker.
    let on = |port, first: u32, seq_offset: u32, prefix: &'static str| {
        publish_with(
            port,
            10,
            200,
            Arc::new(AtomicU64::new(0)),
            move |d, s| payload(d + first, s + seq_offset),
            prefix,
        )
    };
    rt.block_on(async { tokio::join!(on(v311.port, 0, 0, "a1-"), on(v5.port, 10, 0, "b1-")) });
    agent.kill();
    // Published while the agent is down: each broker keeps it in the agent's session.
    rt.block_on(async { tokio::join!(on(v311.port, 0, 200, "a2-"), on(v5.port, 10, 200, "b2-")) });
    agent.spawn();

    let contents = wait_stream_complete_with(
        &rt,
        &client,
        "e2e-two-brokers",
        Duration::from_secs(120),
        |t| {
            (0..20u32)
                .all(|d| (0..400u32).all(|s| t.contains_key(&(topic_of(d % 10), payload(d, s)))))
        },
    );
    let t = tally(&contents.messages);
    assert_eq!(
        t.len(),
        20 * 400,
        "only the published messages are in the stream"
    );
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(agent.stop().code(), Some(0));
}

/// Records of a route renamed while the agent was down still reach the destination they were
/// routed to (before, they stayed spooled for good while status said READY); records whose
/// route and destination are both gone are reported (readiness, status, metrics) and removed
/// by an operator with `edgeship spool drop-route`, counted as dropped.
#[test]
fn records_of_a_renamed_or_removed_route_are_shipped_or_reported() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-renamed-route", 1);
    let uplink = Uplink::start(kinesis.port);
    let mosquitto = Mosquitto::start(dir.path());
    let base = agent_config(
        dir.path(),
        mosquitto.port,
        &uplink.endpoint(),
        "e2e-renamed-route",
        "",
        "",
    );
    let mut agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    agent.wait_shards_learned();
    uplink.cut();
    rt.block_on(publish(mosquitto.port, 1, 10, Arc::new(AtomicU64::new(0))));
    wait_for("10 spooled", Duration::from_secs(30), || {
        agent.accounting().filter(|a| a.pending == 10)
    });
    assert_eq!(agent.stop().code(), Some(0));

    // Renamed while down; the uplink is back.
    uplink.restore();
    let renamed = base.replace("name = \"telemetry\"", "name = \"t2\"");
    let mut agent = Agent::start(dir.path(), &renamed);
    agent.wait_connected(1);
    rt.block_on(publish_with(
        mosquitto.port,
        1,
        5,
        Arc::new(AtomicU64::new(0)),
        |d, s| payload(d, s + 10),
        "again-",
    ));
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-renamed-route",
        1,
        15,
        Duration::from_secs(60),
    );
    assert_all_delivered(&contents.messages, 1, 15);
    wait_for("the spool to drain", Duration::from_secs(30), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(agent
        .log()
        .contains("shipped to the destination they were routed to"));

    // Now 5 records of `t2` while Kinesis is unreachable, then a config with neither the
    // route nor its destination.
    uplink.cut();
    rt.block_on(publish_with(
        mosquitto.port,
        1,
        5,
        Arc::new(AtomicU64::new(0)),
        |d, s| payload(d, s + 20),
        "third-",
    ));
    wait_for("5 spooled", Duration::from_secs(30), || {
        agent.accounting().filter(|a| a.pending == 5)
    });
    assert_eq!(agent.stop().code(), Some(0));
    let frames = dir.path().join("frames");
    let elsewhere = renamed
        .replace("name = \"t2\"", "name = \"t3\"")
        .replace("destination = \"stream\"", "destination = \"local\"")
        .replace("[destination.stream]", "[destination.local]")
        .replace(
            &format!(
                "type = \"kinesis\"\nstream = \"e2e-renamed-route\"\nregion = \"us-east-1\"\nendpoint = \"{}\"",
                uplink.endpoint()
            ),
            &format!("type = \"directory\"\npath = \"{}\"", frames.display()),
        );
    let mut agent = Agent::start(dir.path(), &elsewhere);
    agent.wait_connected(1);
    let (code, body) = wait_for(
        "readiness to report the orphans",
        Duration::from_secs(30),
        || agent.get("/readyz").filter(|(c, _)| *c == 503),
    );
    assert_eq!(code, 503);
    assert!(
        body.contains("route t2") && body.contains("5 records"),
        "{body}"
    );
    assert!(body.contains("edgeship spool drop-route t2"), "{body}");
    assert_eq!(
        agent
            .scrape()
            .count("edgeship_records_orphaned", &[("route", "t2")]),
        5
    );
    assert_eq!(agent.stop().code(), Some(0));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .args(["spool", "drop-route", "t2", "--config"])
        .arg(dir.path().join("edgeship.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 5 records of route t2"));
    let acc = agent.accounting().unwrap();
    assert_eq!(acc.dropped_by_reason.get("removed"), Some(&5), "{acc:?}");
    assert_eq!(acc.pending, 0);
    assert!(acc.balances(), "{acc:?}");
    agent.spawn();
    agent.wait_connected(1);
    wait_for("ready again", Duration::from_secs(30), || {
        agent.get("/readyz").filter(|(c, _)| *c == 200)
    });
    assert_eq!(agent.stop().code(), Some(0));
}
