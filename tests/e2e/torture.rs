//! The kill storm: the agent is killed with SIGKILL at random moments (up 0.2 to 2 s, down up
//! to 0.5 s) while devices publish QoS 1 messages at a steady rate; afterwards every message
//! the broker acked to its publisher is in the stream (none missing; duplicates, allowed by
//! at-least-once, are counted), nothing was dropped, and the accounting balances.
//!
//! CI runs a short storm (25 kills); `scripts/torture.sh` runs the long one (200 kills,
//! 300,000 messages) and prints its figures.

use crate::support::*;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a storm did and found.
#[derive(Debug)]
struct Storm {
    kills: u32,
    published: u64,
    received: u64,
    missing: u64,
    duplicates: u64,
    seconds: f64,
}

fn kill_storm(stream: &str, devices: u32, per_device: u32, kills: u32) -> Storm {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 2);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        stream,
        "",
        "",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let started = Instant::now();
    // The publishers spread their messages over about the storm's length.
    let spread = Duration::from_millis(1_350) * kills;
    let publishing = Arc::new(AtomicBool::new(true));
    let published = {
        let publishing = publishing.clone();
        let port = mosquitto.port;
        std::thread::spawn(move || {
            let n = runtime().block_on(publish_paced(port, devices, per_device, spread));
            publishing.store(false, Ordering::Relaxed);
            n
        })
    };
    let mut rng = rand::thread_rng();
    let mut done = 0;
    while done < kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..=2_000)));
        agent.kill();
        done += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..=500)));
        agent.spawn();
    }
    let published = published.join().unwrap();
    assert!(!publishing.load(Ordering::Relaxed));
    let total = u64::from(devices) * u64::from(per_device);
    assert_eq!(published, total, "every publish acked by the broker");
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(300), |t| {
        (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
    });
    let duplicates = assert_all_delivered(&contents.messages, devices, per_device);
    let acc = wait_for("the spool to drain", Duration::from_secs(120), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "nothing may be dropped: {acc:?}");
    assert_eq!(agent.stop().code(), Some(0));
    Storm {
        kills,
        published,
        received: acc.received,
        missing: 0,
        duplicates,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn report(s: &Storm) {
    eprintln!(
        "kill storm: {} kills, {} messages published and acked, {} received by the agent (redeliveries included), {} missing, {} duplicates in the stream, {:.0} s",
        s.kills, s.published, s.received, s.missing, s.duplicates, s.seconds
    );
}

#[test]
fn a_kill_storm_loses_nothing() {
    let s = kill_storm("e2e-kill-storm", 20, 1_500, 25);
    report(&s);
}

/// `scripts/torture.sh`: 200 kills and 300,000 messages by default
/// (`EDGESHIP_TORTURE_KILLS`, `EDGESHIP_TORTURE_MESSAGES`).
#[test]
#[ignore = "minutes long: scripts/torture.sh runs it"]
fn a_long_kill_storm_loses_nothing() {
    let env = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let kills = env("EDGESHIP_TORTURE_KILLS", 200);
    let messages = env("EDGESHIP_TORTURE_MESSAGES", 300_000);
    let devices = 50;
    let s = kill_storm("e2e-long-kill-storm", devices, messages / devices, kills);
    report(&s);
}

/// QoS 2 under a kill storm: devices publish exactly-once messages, the route subscribes at
/// QoS 2, and the agent is killed 12 times; after each restart the broker resends PUBLISHes
/// and PUBRELs of the session it kept (a PUBREL the client does not know used to cost the
/// connection, forever). Every message is in the stream and the spool received each once.
/// (The moment a crash makes a duplicate is rare here; `intake.rs` makes it happen for 100
/// messages at once.)
#[test]
fn a_kill_storm_spools_each_qos2_message_once() {
    let stream = "e2e-kill-storm-qos2";
    let (devices, per_device, kills) = (10, 600, 12);
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 2);
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
        "partition_key = \"{topic[1]}\"\nqos = 2",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let spread = Duration::from_millis(1_350) * kills;
    let published = {
        let port = mosquitto.port;
        std::thread::spawn(move || {
            runtime().block_on(publish_paced_at(
                port,
                devices,
                per_device,
                spread,
                rumqttc::QoS::ExactlyOnce,
            ))
        })
    };
    let mut rng = rand::thread_rng();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..=2_000)));
        agent.kill();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..=500)));
        agent.spawn();
    }
    let total = u64::from(devices * per_device);
    assert_eq!(published.join().unwrap(), total, "every PUBCOMP came");
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(300), |t| {
        (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
    });
    let in_stream = assert_all_delivered(&contents.messages, devices, per_device);
    let acc = wait_for("the spool to drain", Duration::from_secs(120), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    let s = agent.scrape();
    eprintln!(
        "QoS 2 kill storm: {kills} kills, {total} messages, {} spooled, {} sent again by the broker and answered without spooling (this run), {in_stream} duplicates in the stream (resent calls)",
        acc.received,
        s.sum("edgeship_mqtt_qos2_duplicates_total", &[])
    );
    assert_eq!(
        acc.received, total,
        "each QoS 2 message spooled once: {acc:?}"
    );
    assert!(acc.balances() && acc.dropped == 0, "{acc:?}");
}
