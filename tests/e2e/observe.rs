//! What operators see: `/metrics` adds up and names every outcome, `/readyz` follows the
//! broker, the spool and the destination, `edgeship status` reads the running agent, and real
//! exposition-format parsers (promtool, prometheus-client) accept every scrape.

use crate::kinesis_proxy::{Fault, KinesisProxy, Limits};
use crate::support::*;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Publishes single QoS 1 messages and waits for the broker's acks.
fn publish_each(rt: &tokio::runtime::Runtime, port: u16, messages: &[(&str, Vec<u8>)]) {
    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new("observe-publisher", "127.0.0.1", port);
        opts.set_max_packet_size(4 << 20, 4 << 20);
        let (c, mut events) = rumqttc::AsyncClient::new(opts, 64);
        for (topic, payload) in messages {
            c.publish(*topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < messages.len() {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                tokio::time::timeout(Duration::from_secs(10), events.poll())
                    .await
                    .expect("broker acks")
                    .expect("broker connection")
            {
                acked += 1;
            }
        }
    });
}

/// Runs a real exposition-format checker over `text`; panics with its output if it refuses.
fn check_with(program: &std::path::Path, args: &[&str], text: &str) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); scripts/test.sh installs it",
                program.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} refused the scrape:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const PYTHON_PARSER: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
families = list(text_string_to_metric_families(sys.stdin.read()))
assert families, "no metric family parsed"
print(len(families), "families,", sum(len(f.samples) for f in families), "samples")
"#;

fn status_of(agent: &Agent, json: bool) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeship"));
    cmd.arg("status").arg("--config").arg(&agent.config_path);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Every message is accounted for in /metrics while it flows and after: the equation holds in
/// every scrape, delivered and per-shard figures match what the stream holds, drops are
/// counted by reason, and real parsers accept the text. `edgeship status` reads the running
/// agent, then the spool once it stopped.
#[test]
fn metrics_account_for_every_message_and_parse() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-metrics", 2);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        "e2e-metrics",
        "",
        "subscribe = [\"devices/#\"]\nusername = \"edgeship\"\npassword = \"pw-never-shown\"",
    )
    .replace("[batch]\n", "[batch]\nmax_message_bytes = \"4KiB\"\n");
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);

    let (devices, per_device) = (10, 1_000);
    let total = u64::from(devices * per_device);
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = rt.spawn(publish(mosquitto.port, devices, per_device, acked.clone()));
    publish_each(
        &rt,
        mosquitto.port,
        &[
            ("devices/dev-000/status", b"unrouted 1".to_vec()),
            ("devices/dev-001/status", b"unrouted 2".to_vec()),
            ("devices/dev-002/telemetry", vec![b'x'; 8 * 1024]),
        ],
    );
    // Scrape while messages flow: each scrape is one consistent snapshot.
    let mut scrapes = 0;
    let mut last_received = 0;
    while !publisher.is_finished() || scrapes < 3 {
        let s = agent.scrape();
        assert!(s.balances(), "equation broken mid-run:\n{}", s.text);
        let received = s.count("edgeship_records_received_total", &[]);
        assert!(received >= last_received, "received went down");
        last_received = received;
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.block_on(publisher).unwrap();
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-metrics",
        devices,
        per_device,
        Duration::from_secs(120),
    );
    let s = wait_for(
        "every record delivered in /metrics",
        Duration::from_secs(30),
        || {
            let s = agent.scrape();
            (s.count("edgeship_records_pending", &[]) == 0
                && s.count("edgeship_records_delivered_total", &[]) >= total)
                .then_some(s)
        },
    );
    let telemetry = [("route", "telemetry"), ("destination", "stream")];
    assert!(s.balances(), "{}", s.text);
    assert_eq!(
        s.count("edgeship_records_received_total", &telemetry),
        total + 1
    );
    assert_eq!(
        s.count("edgeship_records_received_total", &[("route", "")]),
        2
    );
    assert_eq!(
        s.count("edgeship_records_delivered_total", &telemetry),
        total
    );
    assert_eq!(
        s.count(
            "edgeship_records_dropped_total",
            &[("route", ""), ("reason", "no_route")]
        ),
        2
    );
    assert_eq!(
        s.count(
            "edgeship_records_dropped_total",
            &[("route", "telemetry"), ("reason", "oversize")]
        ),
        1
    );
    assert_eq!(s.count("edgeship_spool_dead_letters", &[]), 1);
    // What the destination accepted is what the stream holds, shard by shard.
    let dest = [("destination", "stream")];
    assert_eq!(
        s.count("edgeship_destination_records_accepted_total", &dest),
        contents.messages.len() as u64
    );
    assert_eq!(
        s.count(
            "edgeship_destination_entries_total",
            &[("destination", "stream"), ("outcome", "accepted")]
        ),
        contents.kinesis_records as u64
    );
    let stream_bytes: u64 = contents.per_shard.values().map(|p| p.1).sum();
    assert_eq!(
        s.count("edgeship_destination_sent_bytes_total", &dest),
        stream_bytes
    );
    assert_eq!(
        s.label_values("edgeship_kinesis_shard_records_total", "shard"),
        contents.per_shard.keys().cloned().collect::<Vec<_>>()
    );
    for (shard, (messages, bytes)) in &contents.per_shard {
        let l = [("shard", shard.as_str())];
        assert_eq!(
            s.count("edgeship_kinesis_shard_records_total", &l),
            *messages,
            "{shard}"
        );
        assert_eq!(
            s.count("edgeship_kinesis_shard_sent_bytes_total", &l),
            *bytes,
            "{shard}"
        );
    }
    let ratio = s.sum("edgeship_destination_compression_ratio", &dest);
    assert!(ratio > 0.0 && ratio < 0.5, "compression ratio {ratio}");
    assert_eq!(
        s.count("edgeship_end_to_end_latency_seconds_count", &dest),
        contents.messages.len() as u64
    );
    assert!(s.count("edgeship_mqtt_ack_latency_seconds_count", &[]) >= total + 3);
    assert!(s.count("edgeship_mqtt_messages_received_total", &[]) >= total + 3);
    assert_eq!(s.count("edgeship_mqtt_connected", &[("broker", "test")]), 1);
    assert_eq!(
        s.count("edgeship_mqtt_subscriptions", &[("broker", "test")]),
        1
    );
    assert!(s.count("edgeship_spool_commits_total", &[]) > 0);
    // The shipper leased what was committed to ship it.
    assert!(s.count("edgeship_spool_leases_total", &[]) > 0);
    assert!(s.sum("process_resident_memory_bytes", &[]) > 1e6);
    assert!(s.sum("process_open_fds", &[]) >= 5.0);
    // No device or topic ever becomes a label; no secret or payload reaches any output.
    assert!(!s.text.contains("dev-0"), "a device id leaked into a label");
    let status_json = agent.get("/status").unwrap().1;
    for (what, text) in [
        ("metrics", &s.text),
        ("status", &status_json),
        ("log", &agent.log()),
    ] {
        assert!(
            !text.contains("pw-never-shown"),
            "the broker password is in the {what}"
        );
        assert!(!text.contains("xxxxxxxx"), "a payload is in the {what}");
        assert!(!text.contains("temp_c"), "a payload is in the {what}");
    }

    check_with(&promtool(), &["check", "metrics"], &s.text);
    check_with(&python(), &["-c", PYTHON_PARSER], &s.text);

    assert_eq!(agent.get("/healthz").unwrap(), (200, "ok\n".to_string()));
    let (code, body) = agent.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ready\n") && body.contains("ok   broker test"),
        "{body}"
    );
    assert_eq!(agent.get("/nope").unwrap().0, 404);

    let (text, _) = status_of(&agent, false);
    assert!(
        text.contains("READY") && text.contains(&format!("delivered  {total}")),
        "{text}"
    );
    let (json, _) = status_of(&agent, true);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["source"], "agent");
    assert_eq!(doc["spool"]["accounting"]["delivered"], total);
    assert_eq!(doc["brokers"][0]["connected"], true);

    assert_eq!(agent.stop().code(), Some(0));
    let (text, err) = status_of(&agent, false);
    assert!(err.contains("no answer from the agent"), "{err}");
    assert!(
        text.contains("agent not running") && text.contains(&format!("delivered  {total}")),
        "{text}"
    );
}

/// A broker restart, an uplink outage and whole-call faults each show in the right counters,
/// and /readyz fails while (and only while) they matter; nothing is lost.
#[test]
fn outages_and_faults_show_in_metrics_and_readiness() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-outage-metrics", 1);
    let mut mosquitto = Mosquitto::start(dir.path());
    let uplink = Uplink::start(kinesis.port);
    let shards = rt.block_on(shard_ranges(&client, "e2e-outage-metrics"));
    let proxy = KinesisProxy::start(uplink.port, &shards, None);
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &proxy.endpoint(),
        "e2e-outage-metrics",
        "max_bytes = \"1MiB\"",
        "",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    wait_for("ready", Duration::from_secs(20), || {
        (agent.get("/readyz")?.0 == 200).then_some(())
    });

    // Broker down: not ready, naming the broker; back: a reconnect is counted.
    mosquitto.stop();
    let body = wait_for(
        "/readyz to fail on the broker",
        Duration::from_secs(30),
        || {
            agent
                .get("/readyz")
                .filter(|(code, body)| *code == 503 && body.contains("FAIL broker test"))
                .map(|(_, body)| body)
        },
    );
    assert!(body.contains("ok   spool"), "{body}");
    assert_eq!(agent.scrape().count("edgeship_mqtt_connected", &[]), 0);
    mosquitto.spawn();
    let s = wait_for("a counted reconnect", Duration::from_secs(60), || {
        let s = agent.scrape();
        (s.count("edgeship_mqtt_reconnects_total", &[("broker", "test")]) >= 1
            && s.count("edgeship_mqtt_connected", &[]) == 1)
            .then_some(s)
    });
    assert!(s.count("edgeship_mqtt_connection_errors_total", &[]) >= 1);
    wait_for("ready again", Duration::from_secs(20), || {
        (agent.get("/readyz")?.0 == 200).then_some(())
    });

    // Uplink cut with a backlog past half the spool cap: failing, then not ready.
    uplink.cut();
    let acked = Arc::new(AtomicU64::new(0));
    let (devices, per_device) = (4, 200);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        acked,
        |d, s| noise(d, s, 1024),
        "",
    ));
    let body = wait_for(
        "/readyz to fail on the destination",
        Duration::from_secs(60),
        || {
            agent
                .get("/readyz")
                .filter(|(code, body)| *code == 503 && body.contains("FAIL destination stream"))
                .map(|(_, body)| body)
        },
    );
    assert!(body.contains("ok   broker test"), "{body}");
    let s = agent.scrape();
    assert_eq!(s.count("edgeship_destination_failing", &[]), 1);
    assert!(s.count("edgeship_destination_call_errors_total", &[]) >= 1);
    assert!(
        s.count("edgeship_destination_errors_total", &[]) >= 1,
        "{}",
        s.text
    );
    assert!(s.count("edgeship_spool_pending_bytes", &[]) > 512 << 10);
    assert!(s.balances());
    // Failures repeat; the log does not: the first, then at most one line a minute.
    let calls_failed_before = wait_for("four failed calls", Duration::from_secs(30), || {
        let n = agent
            .scrape()
            .count("edgeship_destination_call_errors_total", &[]);
        (n >= 4).then_some(n)
    });
    let failure_lines = agent.log().matches("call failed").count();
    assert!(
        failure_lines <= 2,
        "{calls_failed_before} failed calls, {failure_lines} log lines"
    );

    // Whole-call faults while the uplink comes back: each one counted under its code.
    proxy.inject(&[Fault::LimitExceeded, Fault::InternalFailure, Fault::Reset]);
    uplink.restore();
    let contents = wait_stream_complete_with(
        &rt,
        &client,
        "e2e-outage-metrics",
        Duration::from_secs(120),
        |t| {
            (0..devices)
                .all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), noise(d, s, 1024)))))
        },
    );
    assert_eq!(proxy.faults_answered(), 3);
    assert_eq!(
        contents.messages.len() as u64,
        u64::from(devices * per_device),
        "duplicates"
    );
    let s = wait_for(
        "the backlog drained in /metrics",
        Duration::from_secs(30),
        || {
            let s = agent.scrape();
            (s.count("edgeship_records_pending", &[]) == 0).then_some(s)
        },
    );
    assert!(s.balances());
    assert_eq!(
        s.count("edgeship_records_delivered_total", &[]),
        u64::from(devices * per_device)
    );
    assert!(s.count("edgeship_destination_call_errors_total", &[]) >= calls_failed_before + 3);
    for code in ["LimitExceededException", "InternalFailure"] {
        assert!(
            s.count("edgeship_destination_errors_total", &[("code", code)]) >= 1,
            "{code} not counted:\n{}",
            s.text
        );
    }
    // LimitExceeded refuses a whole call for throttling: its entries count as throttled.
    assert!(
        s.count(
            "edgeship_destination_entries_total",
            &[("outcome", "throttled")]
        ) >= 1
    );
    assert!(s.count("edgeship_destination_retried_entries_total", &[]) >= 1);
    assert_eq!(s.count("edgeship_destination_failing", &[]), 0);
    wait_for("ready after the outage", Duration::from_secs(20), || {
        (agent.get("/readyz")?.0 == 200).then_some(())
    });
    check_with(&promtool(), &["check", "metrics"], &s.text);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Per-shard throttling, as a provisioned stream answers it: the agent's throttled counts per
/// shard equal what the limit-enforcing proxy refused, count for count; throttled entries are
/// resent until accepted, and accepted entries arrive exactly once.
#[test]
fn throttled_entries_are_counted_per_shard_and_resent() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-throttle", 2);
    let mosquitto = Mosquitto::start(dir.path());
    let shards = rt.block_on(shard_ranges(&client, "e2e-throttle"));
    // Two entries a second per shard (a real shard takes 1,000) and a small fraction of its
    // byte rate, so a short run is throttled for seconds; frames are kept small (64 KiB
    // before compression) so each fits a shard's second, about 20 a shard. By bytes alone a
    // shard's ~34 KB were throttled only if they came within about half a second, which a
    // busy machine did not always do ("the limits never bit"); by entries, only 20 spread
    // over more than 9 s go untouched.
    let proxy = KinesisProxy::start(
        kinesis.port,
        &shards,
        Some(Limits {
            records_per_sec: 2.0,
            bytes_per_sec: 24.0 * 1024.0,
        }),
    );
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &proxy.endpoint(),
        "e2e-throttle",
        "",
        "",
    )
    .replace("[batch]\n", "[batch]\nframe_bytes = \"64KiB\"\n");
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    // Throttled entries are attributed to shards with the map the agent learns at start.
    agent.wait_shards_learned();

    let (devices, per_device) = (10, 1_000);
    let acked = Arc::new(AtomicU64::new(0));
    rt.block_on(publish(mosquitto.port, devices, per_device, acked));
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-throttle",
        devices,
        per_device,
        // Under two entries a second the agent's backoff takes about a minute here.
        Duration::from_secs(300),
    );
    assert_eq!(
        contents.messages.len() as u64,
        u64::from(devices * per_device),
        "an accepted entry was sent twice"
    );
    let tally = proxy.tally();
    let forwarded: u64 = tally.values().map(|t| t.forwarded_entries).sum();
    assert_eq!(contents.kinesis_records as u64, forwarded);
    let throttled: u64 = tally.values().map(|t| t.throttled_entries).sum();
    assert!(throttled > 0, "the limits never bit: {tally:?}");

    let s = wait_for("deliveries recorded", Duration::from_secs(30), || {
        let s = agent.scrape();
        (s.count("edgeship_records_pending", &[]) == 0).then_some(s)
    });
    assert!(s.balances());
    for (shard, t) in &tally {
        let l = [("shard", shard.as_str()), ("kind", "throttled")];
        assert_eq!(
            s.count("edgeship_kinesis_shard_entries_failed_total", &l),
            t.throttled_entries,
            "throttled entries of {shard}"
        );
        assert_eq!(
            s.count(
                "edgeship_kinesis_shard_entries_accepted_total",
                &[("shard", shard.as_str())]
            ),
            t.forwarded_entries,
            "accepted entries of {shard}"
        );
    }
    assert_eq!(
        s.count(
            "edgeship_destination_entries_total",
            &[("outcome", "throttled")]
        ),
        throttled
    );
    assert_eq!(
        s.count(
            "edgeship_destination_errors_total",
            &[("code", "ProvisionedThroughputExceededException")]
        ),
        throttled
    );
    assert!(s.count("edgeship_destination_retried_entries_total", &[]) >= throttled);
    eprintln!(
        "throttling: {throttled} entries throttled and resent, {forwarded} accepted; per shard {tally:?}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// An admin address that is already taken: the agent says so in its log and ships anyway
/// (being watched matters less than shipping).
#[test]
fn a_taken_admin_address_does_not_stop_shipping() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-admin-taken", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "{}\n[admin]\nlisten = \"{}\"\n",
        agent_config(
            dir.path(),
            mosquitto.port,
            &kinesis.endpoint(),
            "e2e-admin-taken",
            "",
            "",
        ),
        taken.local_addr().unwrap()
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device) = (2, 200);
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
    ));
    wait_stream_complete(
        &rt,
        &client,
        "e2e-admin-taken",
        devices,
        per_device,
        Duration::from_secs(60),
    );
    assert!(
        agent.log().contains("cannot open the admin endpoint"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.stop().code(), Some(0));
}
