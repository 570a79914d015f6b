//! Kafka as a destination, against tansu (a Kafka-compatible broker, crates.io) on
//! 127.0.0.1 with its SQLite storage, so a restarted broker keeps what it acknowledged:
//! the topic is read back with kafka-python (`tests/support/kafka_tool.py`), not with
//! edgeship's code, and every message is found by its id header, byte for byte, on the
//! partition the Java client's partitioner gives its key.

use crate::pki::{Ca, Use, Validity};
use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// stunnel4 (Debian) terminating TLS in front of a local port, with a server certificate.
struct Stunnel {
    port: u16,
    child: Child,
}

impl Stunnel {
    fn start(dir: &Path, port: u16, cert: &Path, key: &Path, to: u16) -> Stunnel {
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\noutput = {log}\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{to}\ncert = {cert}\nkey = {key}\n",
                log = dir.join("stunnel.log").display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .or_else(|_| Command::new("stunnel").arg(&conf).spawn())
            .expect("stunnel4 (apt: stunnel4; scripts/test.sh installs it)");
        wait_port(port, Duration::from_secs(30), "stunnel");
        Stunnel { port, child }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Half the devices send telemetry JSON, half binary.
fn mixed(d: u32, s: u32) -> Vec<u8> {
    if d % 2 == 0 {
        payload(d, s)
    } else {
        noise(d, s, 16 + (s as usize % 300))
    }
}

/// 2,000 mixed messages of 20 devices, paced over 8 s; how many were acked.
async fn paced_2000(port: u16) -> u64 {
    publish_paced_with(
        port,
        20,
        100,
        Duration::from_secs(8),
        rumqttc::QoS::AtLeastOnce,
        mixed,
    )
    .await
}

/// [`paced_2000`]'s messages are all in the topic, each once (see [`check_topic`]).
fn all_2000_found(records: &[Consumed], partitions: u32) {
    let expected: BTreeMap<(String, Vec<u8>), ()> = published(20, 100, mixed)
        .into_iter()
        .map(|m| (m, ()))
        .collect();
    assert_eq!(check_topic(records, partitions, &expected), 2_000);
}

fn later(d: u32, s: u32) -> Vec<u8> {
    payload(d, 10_000 + s)
}

/// The agent's config with route `telemetry` (per-device keys) feeding only Kafka
/// destination `events`; `extra` is more of its section (tls, sasl).
fn kafka_config(dir: &Path, broker: u16, bootstrap: &str, topic: &str, extra: &str) -> String {
    agent_config(dir, broker, "http://127.0.0.1:9", "unused", "", "")
        .replace("destination = \"stream\"", "destination = \"events\"")
        + &format!(
            r#"[destination.events]
type = "kafka"
brokers = ["{bootstrap}"]
topic = "{topic}"
{extra}
"#
        )
}

/// tansu (with the topic created first when it has a partition count), Mosquitto, and an
/// agent feeding the topic with `extra` in its destination's section, connected; and the
/// bootstrap address.
fn start_with_topic(
    dir: &Path,
    (topic, partitions): (&str, Option<u32>),
    extra: &str,
) -> (Tansu, Mosquitto, String, Agent) {
    let tansu = Tansu::start(dir);
    if let Some(n) = partitions {
        tansu.create_topic(topic, n);
    }
    let mosquitto = Mosquitto::start(dir);
    let bootstrap = format!("127.0.0.1:{}", tansu.port);
    let config = kafka_config(dir, mosquitto.port, &bootstrap, topic, extra);
    let agent = Agent::start(dir, &config);
    agent.wait_connected(1);
    (tansu, mosquitto, bootstrap, agent)
}

fn events_status(agent: &Agent) -> Option<serde_json::Value> {
    let (_, body) = agent.get("/status")?;
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    doc["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == "events")
        .cloned()
}

/// What the topic holds, checked against what was published: every message once by id
/// (a resend after a broker crash may repeat an id, never with other contents), byte for
/// byte, keyed by its device, on its key's partition, its time in the headers and the
/// record's timestamp, and each device's messages in order on its partition.
fn check_topic(
    records: &[Consumed],
    partitions: u32,
    published: &BTreeMap<(String, Vec<u8>), ()>,
) -> usize {
    let mut by_id: BTreeMap<String, &Consumed> = BTreeMap::new();
    for r in records {
        let id = r.headers.get("id").expect("every record has an id header");
        if let Some(seen) = by_id.get(id) {
            assert_eq!(
                (&seen.value, &seen.headers),
                (&r.value, &r.headers),
                "id {id} twice with other contents"
            );
        }
        by_id.insert(id.clone(), r);
    }
    let keys: BTreeSet<String> = records.iter().map(|r| r.key.clone()).collect();
    let placed = partitions_of(&keys, partitions);
    let mut found = BTreeSet::new();
    for r in by_id.values() {
        let topic = &r.headers["topic"];
        assert!(
            published.contains_key(&(topic.clone(), r.value.clone())),
            "a record nobody published on {topic}"
        );
        assert_eq!(
            Some(r.key.as_str()),
            topic.split('/').nth(1),
            "keyed by its device"
        );
        assert_eq!(r.partition, placed[&r.key], "on its key's partition");
        assert_eq!(r.headers["ts_ms"].parse::<u64>().unwrap(), r.timestamp);
        assert!(r.headers["id"].starts_with("gw-test:"));
        found.insert((topic.clone(), r.value.clone()));
    }
    assert_eq!(
        found.len(),
        published.len(),
        "every message is in the topic"
    );
    // Per key, ids (the spool's order) only rise along a partition, but for resends.
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for r in records {
        let id = r.headers["id"].as_str();
        let seq: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
        if !seen.insert(id) {
            continue;
        }
        let prev = last.insert(r.key.as_str(), seq).unwrap_or(0);
        assert!(
            seq > prev,
            "device {} out of order: {seq} after {prev}",
            r.key
        );
    }
    by_id.len()
}

/// Publishes `per_device` messages of each of `devices` devices and waits until the agent
/// delivered every one, none dropped.
fn publish_and_deliver(
    rt: &tokio::runtime::Runtime,
    agent: &Agent,
    port: u16,
    (devices, per_device): (u32, u32),
    make: fn(u32, u32) -> Vec<u8>,
) {
    rt.block_on(publish_with(
        port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        make,
        "",
    ));
    all_delivered(agent, u64::from(devices * per_device));
}

/// Waits until the agent received `total` messages and delivered every one, none dropped.
fn all_delivered(agent: &Agent, total: u64) {
    let acc = wait_for(
        "Kafka to take every message",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| a.pending == 0 && a.received == total)
        },
    );
    assert_eq!((acc.delivered, acc.dropped), (total, 0), "{acc:?}");
}

fn published(
    devices: u32,
    per_device: u32,
    make: fn(u32, u32) -> Vec<u8>,
) -> Vec<(String, Vec<u8>)> {
    (0..devices)
        .flat_map(|d| (0..per_device).map(move |s| (topic_of(d), make(d, s))))
        .collect()
}

/// 4,000 messages of 40 devices, half binary, into a topic of 4 partitions: one Kafka record
/// per message, found by kafka-python byte for byte. Then 1,000 more flow for five seconds
/// and the broker is killed while the agent sends them (status says why the rest wait); when
/// it is back every one of them arrives, and nothing is lost or reordered per device (a
/// batch the broker stored but could not acknowledge may come twice, under the same ids).
/// (Volumes are small because tansu's SQLite storage reads a topic back slowly.)
#[test]
fn kafka_gets_one_record_per_message_and_a_broker_restart_loses_none() {
    let dir = tempdir();
    let rt = runtime();
    let mut tansu = Tansu::start(dir.path());
    tansu.create_topic("telemetry", 4);
    let mosquitto = Mosquitto::start(dir.path());
    let bootstrap = format!("127.0.0.1:{}", tansu.port);
    let config = kafka_config(dir.path(), mosquitto.port, &bootstrap, "telemetry", "");
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device) = (40, 100);
    publish_and_deliver(&rt, &agent, mosquitto.port, (devices, per_device), mixed);

    let port = mosquitto.port;
    let flowing = rt.spawn(publish_paced_with(
        port,
        devices,
        25,
        Duration::from_secs(5),
        rumqttc::QoS::AtLeastOnce,
        later,
    ));
    let accepted = |agent: &Agent| events_status(agent)?["records_accepted"].as_u64();
    let at_kill = wait_for(
        "the next messages to start arriving",
        Duration::from_secs(60),
        || accepted(&agent).filter(|&n| n > 4_000),
    );
    tansu.kill();
    let during = wait_for(
        "the broker's absence to show in status",
        Duration::from_secs(60),
        || {
            let s = events_status(&agent)?;
            let acc = agent.accounting()?;
            (s["failing"] == true && acc.received == 5_000).then_some((s, acc))
        },
    );
    assert_eq!(rt.block_on(flowing).unwrap(), 1_000);
    assert!(
        at_kill < 5_000 && during.1.pending > 0,
        "killed during traffic: {at_kill} accepted then, {:?} after",
        during.1
    );
    tansu.restart();
    let acc = wait_for(
        "the backlog to drain after the broker is back",
        Duration::from_secs(120),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (5_000, 0), "{acc:?}");

    let (records, partitions) = kafka_consume(&bootstrap, "telemetry", &[]);
    assert_eq!(partitions, 4);
    let mut expected: BTreeMap<(String, Vec<u8>), ()> = BTreeMap::new();
    for m in published(devices, per_device, mixed)
        .into_iter()
        .chain(published(devices, 25, later))
    {
        expected.insert(m, ());
    }
    assert_eq!(expected.len(), 5_000);
    let ids = check_topic(&records, partitions, &expected);
    assert_eq!(ids, 5_000);
    let used: BTreeSet<u32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(used.len(), 4, "40 devices spread over every partition");
    let status = events_status(&agent).expect("status");
    assert_eq!(status["records_accepted"], 5_000);
    eprintln!(
        "kafka: 5,000 messages as {} Kafka records ({} calls)",
        records.len(),
        status["calls"]
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// SASL/SCRAM-SHA-512 over TLS (stunnel in front of tansu, a test CA): the agent
/// authenticates and every message arrives; read back through the same TLS and SASL. While
/// the messages flow, the connections are closed under the agent four times, as MSK closes a
/// connection whose authenticated session has ended: each time the agent connects and
/// authenticates again, and nothing is lost.
#[test]
fn kafka_over_tls_with_scram_takes_every_message_across_closed_sessions() {
    let dir = tempdir();
    let rt = runtime();
    let mut tansu = Tansu::start(dir.path());
    tansu.create_topic("secure", 2);
    // Clients are told to connect through the cuttable link in front of the TLS port.
    let tls_port = free_port();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.issue(
        dir.path(),
        "kafka",
        "127.0.0.1",
        Use::Server,
        Validity::Current,
    );
    let tls = Stunnel::start(dir.path(), tls_port, &server.cert, &server.key, tansu.port);
    let link = Uplink::start(tls.port);
    tansu.advertised = Some(link.port);
    tansu.require_scram_user("gateway", "gateway-secret");
    let mosquitto = Mosquitto::start(dir.path());
    let bootstrap = format!("127.0.0.1:{}", link.port);
    let extra = format!(
        r#"[destination.events.tls]
ca_file = "{ca}"
[destination.events.sasl]
mechanism = "scram-sha-512"
username = "gateway"
password = "gateway-secret"
"#,
        ca = ca.file.display()
    );
    let config = kafka_config(dir.path(), mosquitto.port, &bootstrap, "secure", &extra);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let flowing = rt.spawn(paced_2000(mosquitto.port));
    for at in [300, 700, 1_100, 1_500] {
        wait_for(
            &format!("{at} records accepted"),
            Duration::from_secs(60),
            || {
                events_status(&agent)?["records_accepted"]
                    .as_u64()
                    .filter(|&n| n >= at)
            },
        );
        let before = link.connections.load(std::sync::atomic::Ordering::SeqCst);
        link.cut();
        link.restore();
        wait_for(
            "the agent to connect again",
            Duration::from_secs(60),
            || (link.connections.load(std::sync::atomic::Ordering::SeqCst) > before).then_some(()),
        );
    }
    assert_eq!(rt.block_on(flowing).unwrap(), 2_000);
    all_delivered(&agent, 2_000);
    let (records, partitions) = kafka_consume(
        &bootstrap,
        "secure",
        &[
            "--sasl",
            "SCRAM-SHA-512",
            "gateway",
            "gateway-secret",
            "--ca",
            ca.file.to_str().unwrap(),
        ],
    );
    all_2000_found(&records, partitions);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Sessions renewed by the agent before the brokers end them (the client has no KIP-368
/// re-authentication of a live connection; MSK IAM sessions end with their token): with
/// SASL/SCRAM and `reauthenticate_every = "1s"`, while paced messages flow for 8 s the agent
/// drops its connections between calls and connects and authenticates again, again and
/// again; the old connections are closed, no call fails, and every message arrives once.
#[test]
fn kafka_sessions_are_renewed_between_calls_before_they_end() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempdir();
    let rt = runtime();
    let mut tansu = Tansu::start(dir.path());
    tansu.create_topic("renewed", 2);
    let link = Uplink::start(tansu.port);
    tansu.advertised = Some(link.port);
    tansu.require_scram_user("gateway", "gateway-secret");
    let mosquitto = Mosquitto::start(dir.path());
    let bootstrap = format!("127.0.0.1:{}", link.port);
    let extra = r#"[destination.events.sasl]
mechanism = "scram-sha-512"
username = "gateway"
password = "gateway-secret"
reauthenticate_every = "1s"
"#;
    let config = kafka_config(dir.path(), mosquitto.port, &bootstrap, "renewed", extra);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let flowing = rt.spawn(paced_2000(mosquitto.port));
    assert_eq!(rt.block_on(flowing).unwrap(), 2_000);
    all_delivered(&agent, 2_000);
    let renewals = agent.log().matches("renewing the Kafka sessions").count();
    assert!(
        renewals >= 2,
        "{renewals} renewals in 8 s of calls with reauthenticate_every = 1s"
    );
    // Each renewal connected (and authenticated: tansu requires it) again; what the old
    // client held is closed, not left open beside the new one: at the end at most one
    // client's connections are open (one for metadata, one per partition, and a spare).
    let made = link.connections.load(SeqCst);
    assert!(
        made > renewals as u64,
        "{made} connections for {renewals} renewals"
    );
    let open = wait_for(
        "the old sessions' connections to close",
        Duration::from_secs(30),
        || {
            let open = link.connections.load(SeqCst) - link.closed.load(SeqCst);
            (open <= 4).then_some(open)
        },
    );
    assert!(
        open >= 1,
        "{open} open: the agent's current session stays open"
    );
    eprintln!("{renewals} renewals, {made} connections made, {open} open at the end");
    let s = agent.scrape();
    let events = [("destination", "events")];
    assert_eq!(
        s.count("edgeship_destination_call_errors_total", &events),
        0
    );
    assert_eq!(
        s.count("edgeship_destination_retried_entries_total", &events),
        0
    );
    let (records, partitions) = kafka_consume(
        &bootstrap,
        "renewed",
        &["--sasl", "SCRAM-SHA-512", "gateway", "gateway-secret"],
    );
    all_2000_found(&records, partitions);
    assert_eq!(agent.stop().code(), Some(0));
}

/// A wrong password and a topic that does not exist: status names each, nothing is
/// delivered or lost, and once the topic exists every message arrives.
#[test]
fn kafka_refusals_are_named_and_lose_nothing() {
    let dir = tempdir();
    let rt = runtime();
    let mut tansu = Tansu::start(dir.path());
    tansu.require_scram_user("gateway", "gateway-secret");
    let mosquitto = Mosquitto::start(dir.path());
    let bootstrap = format!("127.0.0.1:{}", tansu.port);
    let sasl = |password: &str| {
        format!(
            "[destination.events.sasl]\nmechanism = \"scram-sha-512\"\nusername = \"gateway\"\npassword = \"{password}\"\n"
        )
    };
    // A wrong password: refused, said in status.
    let config = kafka_config(
        dir.path(),
        mosquitto.port,
        &bootstrap,
        "later",
        &sasl("wrong"),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(publish_with(
        mosquitto.port,
        10,
        50,
        Arc::new(AtomicU64::new(0)),
        payload,
        "",
    ));
    let s = wait_for(
        "the refused password in status",
        Duration::from_secs(60),
        || {
            events_status(&agent).filter(|s| {
                s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("SASL authentication failed"))
            })
        },
    );
    assert_eq!(s["records_accepted"], 0, "{s}");
    assert_eq!(agent.stop().code(), Some(0));

    // The right password, a topic that does not exist yet.
    let config = kafka_config(
        dir.path(),
        mosquitto.port,
        &bootstrap,
        "later",
        &sasl("gateway-secret"),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let s = wait_for(
        "the missing topic in status",
        Duration::from_secs(60),
        || {
            events_status(&agent).filter(|s| {
                s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("topic `later` does not exist"))
            })
        },
    );
    assert_eq!(s["records_accepted"], 0, "{s}");
    let acc = agent.accounting().unwrap();
    assert_eq!((acc.received, acc.pending, acc.dropped), (500, 500, 0));

    // Created by hand (tansu's command line needs no password before authentication is
    // on, so a broker of its own with the same database creates it).
    tansu.authentication = false;
    tansu.restart();
    tansu.create_topic("later", 3);
    tansu.authentication = true;
    tansu.restart();
    let acc = wait_for(
        "every message once the topic exists",
        Duration::from_secs(120),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (500, 0), "{acc:?}");
    let (records, partitions) = kafka_consume(
        &bootstrap,
        "later",
        &["--sasl", "SCRAM-SHA-512", "gateway", "gateway-secret"],
    );
    let expected: BTreeMap<(String, Vec<u8>), ()> = published(10, 50, payload)
        .into_iter()
        .map(|m| (m, ()))
        .collect();
    assert_eq!(check_topic(&records, partitions, &expected), 500);
    assert_eq!(agent.stop().code(), Some(0));
}

/// A message over what the brokers take never reaches them: the config refuses an intake
/// limit (`batch.max_message_bytes`, 256 KiB) that `message_max_bytes` cannot carry, so a
/// larger message is dead-lettered when it arrives and counted; the small ones around it
/// arrive.
#[test]
fn a_message_over_message_max_bytes_is_counted_and_the_rest_arrive() {
    let dir = tempdir();
    let rt = runtime();
    let (_tansu, mosquitto, bootstrap, mut agent) = start_with_topic(
        dir.path(),
        ("small", Some(1)),
        "message_max_bytes = \"512KiB\"",
    );
    let big = |d: u32, s: u32| {
        if s == 5 {
            noise(d, s, 300_000)
        } else {
            payload(d, s)
        }
    };
    rt.block_on(publish_with(
        mosquitto.port,
        1,
        10,
        Arc::new(AtomicU64::new(0)),
        big,
        "",
    ));
    let acc = wait_for("the small ones through", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| a.pending == 0 && a.received == 10)
    });
    assert_eq!((acc.delivered, acc.dropped), (9, 1), "{acc:?}");
    let (records, partitions) = kafka_consume(&bootstrap, "small", &[]);
    let expected: BTreeMap<(String, Vec<u8>), ()> = (0..10)
        .filter(|s| *s != 5)
        .map(|s| ((topic_of(0), payload(0, s)), ()))
        .collect();
    assert_eq!(check_topic(&records, partitions, &expected), 9);
    assert_eq!(agent.stop().code(), Some(0));
}

/// With `create_topic`, a topic the cluster lacks is created by the agent with the
/// configured partitions, and every message arrives on its key's partition.
#[test]
fn a_missing_topic_is_created_when_the_config_says_so() {
    let dir = tempdir();
    let rt = runtime();
    let (_tansu, mosquitto, bootstrap, mut agent) = start_with_topic(
        dir.path(),
        ("made-here", None),
        "[destination.events.create_topic]\npartitions = 3\nreplication_factor = 1\n",
    );
    publish_and_deliver(&rt, &agent, mosquitto.port, (12, 25), payload);
    let (records, partitions) = kafka_consume(&bootstrap, "made-here", &[]);
    assert_eq!(partitions, 3, "created with the configured partitions");
    let expected: BTreeMap<(String, Vec<u8>), ()> = published(12, 25, payload)
        .into_iter()
        .map(|m| (m, ()))
        .collect();
    assert_eq!(check_topic(&records, partitions, &expected), 300);
    let used: BTreeSet<u32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(used.len(), 3, "12 devices spread over every partition");
    assert!(agent.log().contains("created the topic"));
    assert_eq!(agent.stop().code(), Some(0));
}

/// 300 devices, each its own partition key, 10 messages each, while the broker is down: the
/// spool holds them in a few blocks (each message a Kafka record with its own key, so all
/// keys share one bucket), not one block or more per device, which made the spool's writes
/// and compression depend on the number of devices. When the broker is back every message
/// arrives once, keyed by its device, on its key's partition, in order.
#[test]
fn many_devices_share_spool_blocks_on_a_kafka_route() {
    let dir = tempdir();
    let rt = runtime();
    let mut tansu = Tansu::start(dir.path());
    tansu.create_topic("telemetry", 4);
    tansu.kill();
    let mosquitto = Mosquitto::start(dir.path());
    let bootstrap = format!("127.0.0.1:{}", tansu.port);
    let config = kafka_config(dir.path(), mosquitto.port, &bootstrap, "telemetry", "");
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device) = (300, 10);
    let total = u64::from(devices * per_device);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        payload,
        "",
    ));
    wait_for(
        "every message to be spooled",
        Duration::from_secs(60),
        || agent.accounting().filter(|a| a.received == total),
    );
    let (_copy, spool) = agent.spool_copy().expect("a copy of the spool");
    let (blocks, records): (u64, u64) = spool
        .query_row("SELECT COUNT(*), SUM(records) FROM blocks", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    eprintln!("{records} messages of {devices} devices waiting in {blocks} blocks");
    assert_eq!(records, total, "every message waits in the spool");
    assert!(
        blocks * 3 < u64::from(devices),
        "{blocks} blocks for {devices} devices: the spool stores a block per key"
    );

    tansu.restart();
    all_delivered(&agent, total);
    let (records, partitions) = kafka_consume(&bootstrap, "telemetry", &[]);
    let mut expected: BTreeMap<(String, Vec<u8>), ()> = BTreeMap::new();
    for m in published(devices, per_device, payload) {
        expected.insert(m, ());
    }
    assert_eq!(check_topic(&records, partitions, &expected), total as usize);
    assert_eq!(agent.stop().code(), Some(0));
}
