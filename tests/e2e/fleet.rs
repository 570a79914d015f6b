//! Fleet config push, end to end: signed documents published (retained) on Mosquitto with the
//! `edgeship fleet` tools, applied live by running agents that ship to kinesis-mock; refusals,
//! rollback, restarts and groups, each checked by what arrives in the streams and by the
//! status documents.

use crate::support::*;
use edgeship::fleet::document::{self, Body};
use edgeship::live::FleetReport as Report;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An operator's signing key and the `edgeship fleet` commands, run as a person would.
struct Operator {
    dir: PathBuf,
    key: PathBuf,
    public: String,
    broker_port: u16,
}

fn edgeship() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeship"))
}

impl Operator {
    fn new(dir: &Path, name: &str, broker_port: u16) -> Operator {
        let key = dir.join(format!("{name}.key"));
        let out = edgeship()
            .args(["fleet", "keygen", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(public.starts_with("ed25519:"), "{public}");
        assert_eq!(
            std::fs::read_to_string(format!("{}.pub", key.display()))
                .unwrap()
                .trim(),
            public
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key must be 0600");
        Operator {
            dir: dir.to_path_buf(),
            key,
            public,
            broker_port,
        }
    }

    /// `edgeship fleet sign` of `config` (checked by the tool first); the document's path.
    fn sign(&self, config: &str, target: &str, version: u64) -> PathBuf {
        let input = self.dir.join(format!("fleet-v{version}.toml"));
        std::fs::write(&input, config).unwrap();
        let out_path = self.dir.join(format!("fleet-v{version}.json"));
        let out = edgeship()
            .args(["fleet", "sign"])
            .arg(&input)
            .arg("--key")
            .arg(&self.key)
            .args([
                "--target",
                target,
                "--version",
                &version.to_string(),
                "--out",
            ])
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out_path
    }

    /// Signs with the library directly: for documents the tool would refuse to sign.
    fn sign_unchecked(&self, config: &str, target: &str, version: u64) -> PathBuf {
        self.sign_at(config, target, version, 0, None)
    }

    /// Signs with the library directly, issued at `issued_at`, refused after `not_after`.
    fn sign_at(
        &self,
        config: &str,
        target: &str,
        version: u64,
        issued_at: u64,
        not_after: Option<u64>,
    ) -> PathBuf {
        let key = document::read_private_key(&self.key).unwrap();
        let doc = document::sign(
            &Body {
                version,
                target: target.parse().unwrap(),
                issued_at,
                not_after,
                config: config.into(),
            },
            &key,
        );
        let path = self.dir.join(format!(
            "fleet-raw-v{version}-{}.json",
            target.replace(':', "-")
        ));
        std::fs::write(&path, doc).unwrap();
        path
    }

    /// `edgeship fleet push DOC --target T`: published, retained.
    fn push(&self, doc: &Path, target: &str) {
        let out = edgeship()
            .args(["fleet", "push"])
            .arg(doc)
            .args(["--target", target, "--broker"])
            .arg(format!("127.0.0.1:{}", self.broker_port))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("(retained)"), "{said}");
    }

    /// `edgeship fleet status --json`: the reports of the gateways that answered.
    fn status(&self) -> std::collections::BTreeMap<String, Report> {
        let out = edgeship()
            .args(["fleet", "status", "--json", "--wait", "1s", "--broker"])
            .arg(format!("127.0.0.1:{}", self.broker_port))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Publishes `bytes` retained on `topic`, as someone replaying a document would.
fn publish_retained(port: u16, topic: &str, bytes: Vec<u8>) {
    runtime().block_on(async {
        let opts = rumqttc::MqttOptions::new("replayer", "127.0.0.1", port);
        let (c, mut events) = rumqttc::AsyncClient::new(opts, 10);
        c.publish(topic, rumqttc::QoS::AtLeastOnce, true, bytes)
            .await
            .unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                events.poll().await.unwrap()
            {
                break;
            }
        }
    });
}

/// The agent's own view of the fleet channel (`/status`).
fn report(agent: &Agent) -> Option<Report> {
    let (code, body) = agent.get("/status")?;
    if code != 200 {
        return None;
    }
    let doc: edgeship::status::StatusDoc = serde_json::from_str(&body).ok()?;
    doc.fleet
}

/// Waits until the agent's report satisfies `check`.
fn wait_report(agent: &Agent, what: &str, check: impl Fn(&Report) -> bool) -> Report {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = report(agent);
        if let Some(r) = r.as_ref().filter(|r| check(r)) {
            return r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; the last report: {r:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Publishes `payload(device, 0..)` on the device's topic, about 1,000 a second, until `stop`;
/// returns how many were published (all acked).
async fn publish_until(port: u16, device: u32, stop: Arc<AtomicBool>) -> u32 {
    let opts = rumqttc::MqttOptions::new(format!("steady-{device}"), "127.0.0.1", port);
    let (c, mut events) = rumqttc::AsyncClient::new(opts, 100);
    let sender = tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            c.publish(
                topic_of(device),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload(device, n),
            )
            .await
            .unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        n
    });
    let mut acked = 0;
    let mut sent = None;
    let mut sender = Some(sender);
    loop {
        if let Some(total) = sent {
            if acked >= total {
                return total;
            }
        }
        tokio::select! {
            e = events.poll() => {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e.unwrap() {
                    acked += 1;
                }
            }
            n = async { sender.as_mut().unwrap().await }, if sender.is_some() => {
                sent = Some(n.unwrap());
                sender = None;
            }
        }
    }
}

/// The `[fleet]` section pinning `keys`, keeping its state in `dir`. The health timeout is
/// 15 s: a good document's probe must pass even while the emulator answers slowly under the
/// other e2e tests' load (5 s was seen to roll back a healthy version in CI); a dead endpoint
/// still fails at once and is retried until the deadline, so the rollback test waits 15 s.
fn fleet_section(dir: &Path, keys: &[&str], extra: &str) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "\n[fleet]\nkeys = [{}]\nstate_dir = \"{}\"\nhealth_timeout = \"15s\"\nstatus_interval = \"1s\"\n{extra}\n",
        keys.join(", "),
        dir.join("fleet-state").display()
    )
}

/// A fleet document: the base's telemetry route to `stream`, plus `more`.
fn document_text(endpoint: &str, stream: &str, linger: &str, more: &str) -> String {
    format!(
        r#"[batch]
linger = "{linger}"

[[route]]
name = "telemetry"
topics = ["devices/+/telemetry"]
destination = "stream"
partition_key = "{{topic[1]}}"

[destination.stream]
type = "kinesis"
stream = "{stream}"
region = "us-east-1"
endpoint = "{endpoint}"
{more}"#
    )
}

/// A route `alerts` on `alerts/+` to its own stream, as a document's extra text.
fn alerts_route(endpoint: &str, stream: &str, key: &str) -> String {
    format!(
        r#"
[[route]]
name = "alerts"
topics = ["alerts/+"]
destination = "alerts"
partition_key = "{key}"

[destination.alerts]
type = "kinesis"
stream = "{stream}"
region = "us-east-1"
endpoint = "{endpoint}"
"#
    )
}

/// Asserts the stream holds exactly `n` messages `payload(device, 0..n)` on `topic`, once each.
fn assert_exactly(contents: &StreamContents, topic: &str, device: u32, n: u32) {
    let t = tally(&contents.messages);
    for s in 0..n {
        assert_eq!(
            t.get(&(topic.to_string(), payload(device, s))).copied(),
            Some(1),
            "message {s} on {topic} must be in the stream exactly once"
        );
    }
    assert_eq!(
        contents
            .messages
            .iter()
            .filter(|m| m.topic == topic)
            .count(),
        n as usize
    );
}

/// A push that adds a route, applied while devices publish steadily on the old route and with a
/// batch change that replaces the old route's shipper: the new topic's messages reach the new
/// stream, the old stream holds every old message exactly once, after a restart the agent runs
/// the pushed config, and a later version removes the route again (unsubscribed).
#[test]
fn a_pushed_route_flows_to_its_new_stream_and_the_old_route_loses_nothing() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("fleet-old", 1);
    rt.block_on(create_stream(&client, "fleet-new", 1));
    let mosquitto = Mosquitto::start(dir.path());
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let base = agent_config(dir.path(), mosquitto.port, &endpoint, "fleet-old", "", "")
        + &fleet_section(dir.path(), &[&op.public], "");
    let mut agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    let r = wait_report(&agent, "the fleet report", |r| r.state == "running");
    assert_eq!(r.applied_version, 0);

    // Devices publish steadily before, during and after the apply.
    let devices = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..devices)
        .map(|d| rt.spawn(publish_until(mosquitto.port, d, stop.clone())))
        .collect();
    wait_for("messages flowing", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| a.received >= 2_000)
            .map(|_| ())
    });
    let doc = op.sign(
        &document_text(
            &endpoint,
            "fleet-old",
            "100ms",
            &alerts_route(&endpoint, "fleet-new", "{topic[1]}"),
        ),
        "gateway:gw-test",
        5,
    );
    op.push(&doc, "gateway:gw-test");
    let r = wait_report(&agent, "version 5 applied", |r| r.state == "applied");
    assert_eq!(r.applied_version, 5);
    assert_eq!(r.applied_target.as_deref(), Some("gateway:gw-test"));
    let at_apply = agent.accounting().unwrap().received;
    rt.block_on(publish_on(
        mosquitto.port,
        "alerts/dev-900".into(),
        900,
        500,
    ));
    wait_for(
        "more messages after the apply",
        Duration::from_secs(60),
        || {
            agent
                .accounting()
                .filter(|a| a.received >= at_apply + 2_000)
                .map(|_| ())
        },
    );
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<u32> = publishers
        .into_iter()
        .map(|p| rt.block_on(p).unwrap())
        .collect();
    let total: u32 = sent.iter().sum();
    eprintln!(
        "published {total} telemetry messages; {at_apply} had arrived when version 5 was applied"
    );

    let old = wait_stream_complete_with(&rt, &client, "fleet-old", Duration::from_secs(120), |t| {
        t.len() >= total as usize
    });
    for (d, n) in sent.iter().enumerate() {
        assert_exactly(&old, &topic_of(d as u32), d as u32, *n);
    }
    assert_eq!(
        old.messages.len(),
        total as usize,
        "the apply must not send anything twice"
    );
    let new = wait_stream_complete_with(&rt, &client, "fleet-new", Duration::from_secs(60), |t| {
        t.len() >= 500
    });
    assert_exactly(&new, "alerts/dev-900", 900, 500);
    assert_eq!(new.messages.len(), 500);
    assert!(agent
        .log()
        .contains("subscriptions changed with the config"));

    // The retained status document says the same.
    let all = op.status();
    assert_eq!(all["gw-test"].applied_version, 5, "{all:?}");
    assert_eq!(all["gw-test"].state, "applied");

    // A restart starts with the pushed config: alerts still flow.
    assert_eq!(agent.stop().code(), Some(0));
    agent.spawn();
    agent.wait_connected(2);
    let r = wait_report(&agent, "the report after the restart", |r| {
        r.applied_version == 5
    });
    assert_eq!(r.state, "running");
    assert!(agent
        .log()
        .contains("starting with the last known good fleet config"));
    rt.block_on(publish_on(
        mosquitto.port,
        "alerts/dev-901".into(),
        901,
        100,
    ));
    let new = wait_stream_complete_with(&rt, &client, "fleet-new", Duration::from_secs(60), |t| {
        t.len() >= 600
    });
    assert_exactly(&new, "alerts/dev-901", 901, 100);

    // Version 6 removes the alerts route and raises the spool cap: the agent unsubscribes (new
    // alerts are not even delivered to it), the spool takes the new cap, the session stays up.
    let doc = op.sign(
        &format!(
            "{}\n[spool]\nmax_bytes = \"256MiB\"\n",
            document_text(&endpoint, "fleet-old", "100ms", "")
        ),
        "gateway:gw-test",
        6,
    );
    op.push(&doc, "gateway:gw-test");
    wait_report(&agent, "version 6 applied", |r| {
        r.applied_version == 6 && r.state == "applied"
    });
    assert!(agent.log().contains(r#"removed=["alerts/+"]"#));
    assert!(agent.log().contains("spool limits changed"));
    rt.block_on(publish_on(mosquitto.port, "alerts/dev-902".into(), 902, 50));
    // A marker on the telemetry route, published after the alerts.
    rt.block_on(publish_on(mosquitto.port, topic_of(99), 99, 10));
    let old = wait_stream_complete_with(&rt, &client, "fleet-old", Duration::from_secs(60), |t| {
        (0..10).all(|s| t.contains_key(&(topic_of(99), payload(99, s))))
    });
    assert_exactly(&old, &topic_of(99), 99, 10);
    assert!(old.messages.iter().all(|m| !m.topic.starts_with("alerts/")));
    let new = rt.block_on(read_stream(&client, "fleet-new"));
    assert_eq!(new.messages.len(), 600, "no alert after version 6");
    let m = agent.scrape();
    assert_eq!(m.count("edgeship_spool_max_bytes", &[]), 256 << 20);
    assert_eq!(
        m.count("edgeship_records_dropped_total", &[("reason", "no_route")]),
        0,
        "unsubscribed: the broker sends no alerts at all"
    );
    assert_eq!(
        m.count("edgeship_mqtt_connections_total", &[("broker", "test")]),
        1,
        "the data session stayed up through the apply"
    );
    let acc = agent.accounting().unwrap();
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
}

/// Documents with a bad signature, for another target, an old version, an unknown field or an
/// invalid value are refused and reported (agent /status and the retained status document),
/// and the running config stays; a signed file is read at start and again on SIGHUP; during a
/// key rotation (two keys pinned) documents signed by either key apply.
#[test]
fn refused_documents_leave_the_running_config_and_say_why() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("fleet-refuse", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let intruder = Operator::new(dir.path(), "intruder", mosquitto.port);
    let retiring = Operator::new(dir.path(), "retiring", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let good = |linger: &str| document_text(&endpoint, "fleet-refuse", linger, "");
    // Version 10 comes from the local file at start.
    let file = dir.path().join("fleet.json");
    std::fs::copy(op.sign(&good("300ms"), "gateway:gw-test", 10), &file).unwrap();
    let base = agent_config(
        dir.path(),
        mosquitto.port,
        &endpoint,
        "fleet-refuse",
        "",
        "",
    ) + &fleet_section(
        dir.path(),
        &[&retiring.public, &op.public],
        &format!("file = \"{}\"", file.display()),
    );
    let mut agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    wait_report(&agent, "version 10 from the file", |r| {
        r.applied_version == 10 && r.state == "applied"
    });

    let gw = "gateway:gw-test";
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "bad signature",
            intruder.sign(&good("400ms"), gw, 11),
            "bad signature: no pinned fleet key signed this document",
        ),
        (
            "signed for another target",
            op.sign_unchecked(&good("400ms"), "group:elsewhere", 12),
            "is signed for group:elsewhere but arrived for gateway:gw-test",
        ),
        (
            "old version",
            op.sign(&good("400ms"), gw, 9),
            "version 9 (gateway:gw-test) is older than version 10 already seen",
        ),
        (
            "unknown field",
            op.sign_unchecked(
                &format!("{}\n[[broker]]\nhost = \"evil.example\"\n", good("400ms")),
                gw,
                13,
            ),
            "version 13 is invalid: fleet config v13 (gateway:gw-test):16:3: field `broker`: unknown field `broker`",
        ),
        (
            "invalid value",
            op.sign_unchecked(&good("400ms").replace("[batch]\n", "[batch]\nzstd_level = 40\n"), gw, 14),
            "version 14 is invalid: fleet config v14 (gateway:gw-test):2:14: field `batch.zstd_level`: 40 is outside 1..=19",
        ),
    ];
    for (i, (what, doc, expected)) in cases.iter().enumerate() {
        if what.contains("another target") {
            // The push tool refuses this; a replay publishes it anyway.
            publish_retained(
                mosquitto.port,
                "edgeship/config/gateway/gw-test",
                std::fs::read(doc).unwrap(),
            );
        } else {
            op.push(doc, gw);
        }
        let r = wait_report(&agent, what, |r| {
            r.last_error
                .as_deref()
                .is_some_and(|e| e.contains(expected))
        });
        assert_eq!(r.state, "refused", "{what}: {r:?}");
        assert_eq!(
            r.applied_version, 10,
            "{what}: the running config must stay"
        );
        // The same report is retained on the status topic.
        let all = op.status();
        let published = &all["gw-test"];
        assert!(
            published
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(expected)),
            "{what}: {published:?}"
        );
        assert!(agent.log().contains("fleet config refused"), "{what}");
        // Data still flows under the running config.
        let n = 50;
        let device = 700 + i as u32;
        rt.block_on(publish_on(mosquitto.port, topic_of(device), device, n));
        let contents =
            wait_stream_complete_with(&rt, &client, "fleet-refuse", Duration::from_secs(60), |t| {
                (0..n).all(|s| t.contains_key(&(topic_of(device), payload(device, s))))
            });
        assert_exactly(&contents, &topic_of(device), device, n);
    }
    // The tool refuses to sign what a gateway would refuse, naming the line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        good("1s").replace("[batch]\n", "[batch]\nzstd_level = 40\n"),
    )
    .unwrap();
    let out = edgeship()
        .args(["fleet", "sign"])
        .arg(&bad)
        .arg("--key")
        .arg(&op.key)
        .args(["--target", gw])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("bad.toml:2:14: field `batch.zstd_level`"),
        "{said}"
    );
    // A document that only fits a gateway's own file: checked against it with --base.
    let partial = dir.path().join("partial.toml");
    std::fs::write(
        &partial,
        "[[route]]\nname = \"more\"\ntopics = [\"more/+\"]\ndestination = \"stream\"\n",
    )
    .unwrap();
    let sign_partial = |base: Option<&Path>| {
        let mut c = edgeship();
        c.args(["fleet", "sign"])
            .arg(&partial)
            .arg("--key")
            .arg(&op.key)
            .args(["--target", gw]);
        if let Some(b) = base {
            c.arg("--base").arg(b);
        }
        c.output().unwrap()
    };
    let out = sign_partial(None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("names destination `stream`, which is not defined"),
        "{out:?}"
    );
    let out = sign_partial(Some(&agent.config_path));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"signature\""));

    // SIGHUP reads the file again: version 15 applies.
    std::fs::copy(op.sign(&good("150ms"), gw, 15), &file).unwrap();
    signal(agent.pid().unwrap(), "HUP");
    let r = wait_report(&agent, "version 15 from the file", |r| {
        r.applied_version == 15
    });
    assert_eq!(r.state, "applied");
    let m = agent.scrape();
    assert_eq!(
        m.sum("edgeship_fleet_documents_total", &[("outcome", "refused")]),
        5.0
    );
    assert_eq!(
        m.sum("edgeship_fleet_documents_total", &[("outcome", "applied")]),
        2.0
    );
    assert_eq!(m.sum("edgeship_config_version", &[]), 15.0);
    // The other pinned key (the one being retired) still signs valid documents.
    op.push(&retiring.sign(&good("250ms"), gw, 16), gw);
    let r = wait_report(&agent, "version 16 signed by the second pinned key", |r| {
        r.applied_version == 16
    });
    assert_eq!(r.state, "applied");
    let acc = agent.accounting().unwrap();
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(agent.stop().code(), Some(0));
}

/// A push whose destination cannot be reached is applied, fails its health check, is rolled
/// back and reported; records spooled meanwhile reach the stream once; a restart starts with
/// the last known good version, not the rolled-back one.
#[test]
fn an_unreachable_destination_is_rolled_back_and_a_restart_keeps_the_last_good() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("fleet-rollback", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let base = agent_config(
        dir.path(),
        mosquitto.port,
        &endpoint,
        "fleet-rollback",
        "",
        "",
    ) + &fleet_section(dir.path(), &[&op.public], "");
    let mut agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    let gw = "gateway:gw-test";
    op.push(
        &op.sign(
            &document_text(&endpoint, "fleet-rollback", "250ms", ""),
            gw,
            20,
        ),
        gw,
    );
    wait_report(&agent, "version 20 applied", |r| r.applied_version == 20);

    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", free_port());
    op.push(
        &op.sign(&document_text(&dead, "fleet-rollback", "250ms", ""), gw, 21),
        gw,
    );
    wait_report(&agent, "version 21 being applied", |r| {
        r.pending_version == Some(21)
    });
    // Published while version 21 runs: spooled, shipped after the rollback.
    rt.block_on(publish_on(mosquitto.port, topic_of(1), 1, 200));
    let r = wait_report(&agent, "version 21 rolled back", |r| {
        r.state == "rolled_back"
    });
    assert_eq!(r.applied_version, 20);
    assert_eq!(r.last_error_version, Some(21));
    let why = r.last_error.unwrap();
    assert!(
        why.contains("version 21 failed its health check")
            && why.contains("destination stream")
            && why.contains("rolled back to version 20"),
        "{why}"
    );
    rt.block_on(publish_on(mosquitto.port, topic_of(2), 2, 200));
    let contents = wait_stream_complete_with(
        &rt,
        &client,
        "fleet-rollback",
        Duration::from_secs(90),
        |t| t.len() >= 400,
    );
    assert_exactly(&contents, &topic_of(1), 1, 200);
    assert_exactly(&contents, &topic_of(2), 2, 200);
    let all = op.status();
    assert_eq!(all["gw-test"].state, "rolled_back", "{all:?}");
    let m = agent.scrape();
    assert_eq!(
        m.sum(
            "edgeship_fleet_documents_total",
            &[("outcome", "rolled_back")]
        ),
        1.0
    );
    assert_eq!(m.sum("edgeship_config_version", &[]), 20.0);

    // Restart: version 20 again; the retained 21 is not tried a second time.
    assert_eq!(agent.stop().code(), Some(0));
    agent.spawn();
    agent.wait_connected(2);
    let r = wait_report(&agent, "the report after the restart", |r| {
        r.applied_version == 20
    });
    assert_eq!(r.last_error_version, Some(21), "the failure is remembered");
    rt.block_on(publish_on(mosquitto.port, topic_of(3), 3, 100));
    let contents = wait_stream_complete_with(
        &rt,
        &client,
        "fleet-rollback",
        Duration::from_secs(60),
        |t| t.len() >= 500,
    );
    assert_exactly(&contents, &topic_of(3), 3, 100);
    assert_eq!(
        agent.log().matches("applying fleet config").count(),
        2,
        "version 21 must not be applied again after the restart"
    );
}

/// Three agents at once: a group push reaches the two in the group and not the third; a
/// gateway's own document wins over a newer group document.
/// Someone who may publish on the gateway's topic replays an old signed document: it is
/// refused and does not stand in the way of the group's next document (before, it was kept as
/// the gateway's own and every group push after it was ignored without a word). An expired
/// document is refused. With both fleet state files unreadable, an old document is refused and
/// one signed after the agent noticed is applied.
#[test]
fn replayed_expired_and_stateless_documents_cannot_freeze_or_roll_back_a_gateway() {
    let Rig {
        dir,
        rt: _rt,
        client: _client,
        kinesis,
    } = rig("fleet-replay", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let doc = |linger: &str| document_text(&endpoint, "fleet-replay", linger, "");
    let base = agent_config(
        dir.path(),
        mosquitto.port,
        &endpoint,
        "fleet-replay",
        "",
        "",
    ) + &fleet_section(dir.path(), &[&op.public], "groups = [\"plant\"]");
    let mut agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    wait_report(&agent, "the fleet report", |r| r.state == "running");
    let gw = "gateway:gw-test";

    op.push(&op.sign(&doc("210ms"), "group:plant", 20), "group:plant");
    wait_report(&agent, "group version 20", |r| r.applied_version == 20);
    // The replay: an authentic but old document on the gateway's own topic.
    publish_retained(
        mosquitto.port,
        "edgeship/config/gateway/gw-test",
        std::fs::read(op.sign(&doc("220ms"), gw, 5)).unwrap(),
    );
    let r = wait_report(&agent, "the replay refused", |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("version 5 (gateway:gw-test) is older than version 20"))
    });
    assert_eq!(r.state, "refused");
    assert_eq!(r.applied_version, 20);
    op.push(&op.sign(&doc("230ms"), "group:plant", 21), "group:plant");
    let r = wait_report(&agent, "group version 21 despite the replay", |r| {
        r.applied_version == 21
    });
    assert_eq!(r.state, "applied");

    // Expired: refused, the running version stays.
    let now = edgeship::clock::now_secs();
    op.push(
        &op.sign_at(&doc("240ms"), "group:plant", 22, now - 100, Some(now - 50)),
        "group:plant",
    );
    let r = wait_report(&agent, "the expired document refused", |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("version 22 (group:plant) expired"))
    });
    assert_eq!(r.applied_version, 21);

    // Both state files damaged while the agent is down.
    assert_eq!(agent.stop().code(), Some(0));
    let state_dir = dir.path().join("fleet-state");
    for name in ["fleet-state.json", "fleet-state.json.prev"] {
        std::fs::write(state_dir.join(name), "{ torn").unwrap();
    }
    agent.spawn();
    agent.wait_connected(1);
    // The replayed gateway document and the expired group one are still retained on their
    // topics: both refused again (without the state, the replay for being issued before it
    // was found lost); the agent runs its local file meanwhile.
    let r = wait_report(&agent, "the retained documents refused again", |r| {
        r.refused_total >= 2
    });
    assert_eq!(r.applied_version, 0, "{r:?}");
    assert!(
        agent
            .log()
            .contains("version 5 (gateway:gw-test) was issued at"),
        "the replay is refused for its age"
    );
    assert!(agent
        .log()
        .contains("before the fleet state was found unreadable"));
    let fresh = edgeship::clock::now_secs() + 1;
    op.push(
        &op.sign_at(&doc("250ms"), "group:plant", 3, fresh, None),
        "group:plant",
    );
    let r = wait_report(&agent, "a fresh document applied", |r| {
        r.applied_version == 3
    });
    assert_eq!(r.state, "applied");
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_group_push_reaches_every_gateway_of_the_group() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("fleet-group-base", 1);
    rt.block_on(create_stream(&client, "fleet-group-alerts", 1));
    let mosquitto = Mosquitto::start(dir.path());
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let mut agents = Vec::new();
    for (gw, group) in [("gw-a", "plant"), ("gw-b", "plant"), ("gw-c", "other")] {
        let sub = dir.path().join(gw);
        std::fs::create_dir_all(&sub).unwrap();
        let base =
            agent_config(&sub, mosquitto.port, &endpoint, "fleet-group-base", "", "").replace(
                "gateway_id = \"gw-test\"",
                &format!("gateway_id = \"{gw}\""),
            ) + &fleet_section(&sub, &[&op.public], &format!("groups = [\"{group}\"]"));
        let agent = Agent::start(&sub, &base);
        agents.push((gw, agent));
    }
    for (_, a) in &agents {
        a.wait_connected(1);
        wait_report(a, "the fleet report", |r| r.state == "running");
    }
    let group_doc = |version, linger| {
        op.sign(
            &document_text(
                &endpoint,
                "fleet-group-base",
                linger,
                &alerts_route(&endpoint, "fleet-group-alerts", "{gateway}"),
            ),
            "group:plant",
            version,
        )
    };
    op.push(&group_doc(30, "150ms"), "group:plant");
    for (gw, a) in &agents[..2] {
        let r = wait_report(a, "group version 30", |r| r.applied_version == 30);
        assert_eq!(r.applied_target.as_deref(), Some("group:plant"), "{gw}");
    }
    // Both gateways of the group take the new route; gw-c has no such route.
    rt.block_on(publish_on(mosquitto.port, "alerts/dev-5".into(), 5, 100));
    let alerts = wait_stream_complete_with(
        &rt,
        &client,
        "fleet-group-alerts",
        Duration::from_secs(60),
        |t| t.values().sum::<u32>() >= 200,
    );
    let mut by_gateway = std::collections::BTreeMap::<String, u32>::new();
    for (_, key) in &alerts.placed {
        *by_gateway.entry(key.clone()).or_default() += 1;
    }
    assert_eq!(
        by_gateway,
        [("gw-a".to_string(), 100), ("gw-b".to_string(), 100)].into(),
        "each gateway of the group ships every alert once; gw-c none"
    );
    assert_eq!(report(&agents[2].1).unwrap().applied_version, 0);

    // gw-b's own document wins over a newer group document.
    op.push(
        &op.sign(
            &document_text(&endpoint, "fleet-group-base", "120ms", ""),
            "gateway:gw-b",
            31,
        ),
        "gateway:gw-b",
    );
    wait_report(&agents[1].1, "gw-b's own version 31", |r| {
        r.applied_version == 31
    });
    op.push(&group_doc(32, "110ms"), "group:plant");
    wait_report(&agents[0].1, "gw-a on group version 32", |r| {
        r.applied_version == 32
    });
    let all = wait_for("three status documents", Duration::from_secs(30), || {
        let all = op.status();
        (all.len() == 3 && all["gw-a"].applied_version == 32).then_some(all)
    });
    assert_eq!(all["gw-b"].applied_version, 31, "{all:?}");
    assert_eq!(all["gw-c"].applied_version, 0, "{all:?}");
    assert!(agents[1]
        .1
        .log()
        .contains("group config not applied: this gateway's own config wins"));
    // Clearing gw-b's own document: it follows the group again from its next version.
    let out = edgeship()
        .args([
            "fleet",
            "push",
            "--clear",
            "--target",
            "gateway:gw-b",
            "--broker",
        ])
        .arg(format!("127.0.0.1:{}", mosquitto.port))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    op.push(&group_doc(33, "130ms"), "group:plant");
    for (gw, a) in &agents[..2] {
        let r = wait_report(a, "group version 33", |r| r.applied_version == 33);
        assert_eq!(r.applied_target.as_deref(), Some("group:plant"), "{gw}");
    }
    for (_, a) in &mut agents {
        assert_eq!(a.stop().code(), Some(0));
    }
}

/// A named shadow on the broker, behaving as AWS IoT documents it: an update merges its
/// `desired` and `reported` keys (null deletes), is answered on `update/accepted`, and when
/// desired and reported then differ the difference goes out on `update/delta`; `get` is
/// answered on `get/accepted` with the whole state.
struct ShadowService {
    state: Arc<std::sync::Mutex<(serde_json::Value, serde_json::Value)>>,
    base: String,
    port: u16,
    _rt: tokio::runtime::Runtime,
}

fn merge(into: &mut serde_json::Value, from: Option<&serde_json::Value>) {
    let (Some(into), Some(from)) = (into.as_object_mut(), from.and_then(|f| f.as_object())) else {
        return;
    };
    for (k, v) in from {
        if v.is_null() {
            into.remove(k);
        } else {
            into.insert(k.clone(), v.clone());
        }
    }
}

impl ShadowService {
    fn start(port: u16, thing: &str, name: &str) -> ShadowService {
        let base = format!("$aws/things/{thing}/shadow/name/{name}");
        let state = Arc::new(std::sync::Mutex::new((
            serde_json::json!({}),
            serde_json::json!({}),
        )));
        let rt = runtime();
        let (b, s) = (base.clone(), state.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let opts = rumqttc::MqttOptions::new("shadow-service", "127.0.0.1", port);
            let (c, mut events) = rumqttc::AsyncClient::new(opts, 100);
            c.subscribe(format!("{b}/update"), rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            c.subscribe(format!("{b}/get"), rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            let mut version = 0u64;
            let mut subacks = 0;
            loop {
                let p = match events.poll().await.unwrap() {
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        subacks += 1;
                        if subacks == 2 {
                            let _ = ready_tx.send(());
                        }
                        continue;
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => p,
                    _ => continue,
                };
                let full = |(desired, reported): &(serde_json::Value, serde_json::Value)| {
                    let delta: serde_json::Map<_, _> = desired
                        .as_object()
                        .unwrap()
                        .iter()
                        .filter(|(k, v)| reported.get(k.as_str()) != Some(v))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    (desired.clone(), reported.clone(), delta)
                };
                if p.topic == format!("{b}/update") {
                    let request: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    version += 1;
                    let (_, _, delta) = {
                        let mut st = s.lock().unwrap();
                        merge(&mut st.0, request["state"].get("desired"));
                        merge(&mut st.1, request["state"].get("reported"));
                        full(&st)
                    };
                    let accepted =
                        serde_json::json!({"state": request["state"], "version": version});
                    c.publish(
                        format!("{b}/update/accepted"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        accepted.to_string(),
                    )
                    .await
                    .unwrap();
                    if !delta.is_empty() {
                        let d = serde_json::json!({"state": delta, "version": version});
                        c.publish(
                            format!("{b}/update/delta"),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            d.to_string(),
                        )
                        .await
                        .unwrap();
                    }
                } else if p.topic == format!("{b}/get") {
                    let (desired, reported, delta) = full(&s.lock().unwrap());
                    let doc = serde_json::json!({
                        "state": {"desired": desired, "reported": reported, "delta": delta},
                        "version": version,
                    });
                    c.publish(
                        format!("{b}/get/accepted"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        doc.to_string(),
                    )
                    .await
                    .unwrap();
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the shadow service subscribed");
        ShadowService {
            state,
            base,
            port,
            _rt: rt,
        }
    }

    /// What an operator's `aws iot-data update-thing-shadow` would send: the document as
    /// `state.desired.edgeship`.
    fn desire(&self, document: &Path) {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(document).unwrap()).unwrap();
        let update = serde_json::json!({"state": {"desired": {"edgeship": doc}}});
        runtime().block_on(async {
            let opts = rumqttc::MqttOptions::new("operator-shadow", "127.0.0.1", self.port);
            let (c, mut events) = rumqttc::AsyncClient::new(opts, 10);
            c.publish(
                format!("{}/update", self.base),
                rumqttc::QoS::AtLeastOnce,
                false,
                update.to_string(),
            )
            .await
            .unwrap();
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                    events.poll().await.unwrap()
                {
                    break;
                }
            }
        });
    }

    /// (desired, reported) as the service holds them.
    fn state(&self) -> (serde_json::Value, serde_json::Value) {
        self.state.lock().unwrap().clone()
    }
}

/// The same documents through an AWS IoT named shadow: desired -> applied -> reported (the
/// delta clears); a document with a bad signature stays desired, is not applied, and the
/// reported status says why.
#[test]
fn a_named_device_shadow_delivers_the_document_and_gets_it_reported() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("fleet-shadow-base", 1);
    rt.block_on(create_stream(&client, "fleet-shadow-alerts", 1));
    let mosquitto = Mosquitto::start(dir.path());
    let shadow = ShadowService::start(mosquitto.port, "gw-test", "edgeship");
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let base = agent_config(
        dir.path(),
        mosquitto.port,
        &endpoint,
        "fleet-shadow-base",
        "",
        "",
    ) + &fleet_section(
        dir.path(),
        &[&op.public],
        "[fleet.shadow]\nname = \"edgeship\"",
    );
    let agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    wait_report(&agent, "the fleet report", |r| r.state == "running");

    let doc = op.sign(
        &document_text(
            &endpoint,
            "fleet-shadow-base",
            "200ms",
            &alerts_route(&endpoint, "fleet-shadow-alerts", "{topic[1]}"),
        ),
        "gateway:gw-test",
        40,
    );
    shadow.desire(&doc);
    let r = wait_report(&agent, "version 40 from the shadow", |r| {
        r.applied_version == 40
    });
    assert_eq!(r.state, "applied");
    let (desired, reported) = wait_for(
        "the shadow to report version 40",
        Duration::from_secs(30),
        || {
            let (d, r) = shadow.state();
            (r["edgeship_status"]["applied_version"] == 40).then_some((d, r))
        },
    );
    assert_eq!(
        reported["edgeship"], desired["edgeship"],
        "reported must equal desired once applied (the delta clears)"
    );
    rt.block_on(publish_on(mosquitto.port, "alerts/dev-7".into(), 7, 100));
    let alerts = wait_stream_complete_with(
        &rt,
        &client,
        "fleet-shadow-alerts",
        Duration::from_secs(60),
        |t| t.len() >= 100,
    );
    assert_exactly(&alerts, "alerts/dev-7", 7, 100);

    // A document signed by a key the gateway does not pin stays desired, never reported.
    let intruder = Operator::new(dir.path(), "intruder", mosquitto.port);
    shadow.desire(&intruder.sign(
        &document_text(&endpoint, "fleet-shadow-base", "300ms", ""),
        "gateway:gw-test",
        41,
    ));
    let (desired, reported) = wait_for(
        "the shadow to report the refusal",
        Duration::from_secs(30),
        || {
            let (d, r) = shadow.state();
            (r["edgeship_status"]["state"] == "refused").then_some((d, r))
        },
    );
    assert_ne!(reported["edgeship"], desired["edgeship"]);
    assert!(reported["edgeship_status"]["last_error"]
        .as_str()
        .unwrap()
        .contains("bad signature"));
    assert_eq!(reported["edgeship_status"]["applied_version"], 40);
    assert_eq!(report(&agent).unwrap().applied_version, 40);
}

/// A push that gives the running route a second destination while devices publish: the new
/// stream gets the records received from the apply on, none from before, and the first stream
/// keeps getting every message once; each destination's terms balance.
#[test]
fn a_pushed_second_destination_takes_the_records_after_the_apply() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("fleet-fan-first", 1);
    rt.block_on(create_stream(&client, "fleet-fan-second", 1));
    let mosquitto = Mosquitto::start(dir.path());
    let op = Operator::new(dir.path(), "fleet", mosquitto.port);
    let endpoint = kinesis.endpoint();
    let base = agent_config(
        dir.path(),
        mosquitto.port,
        &endpoint,
        "fleet-fan-first",
        "",
        "",
    ) + &fleet_section(dir.path(), &[&op.public], "");
    let mut agent = Agent::start(dir.path(), &base);
    agent.wait_connected(1);
    wait_report(&agent, "the fleet report", |r| r.state == "running");

    let devices = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..devices)
        .map(|d| rt.spawn(publish_until(mosquitto.port, d, stop.clone())))
        .collect();
    wait_for("messages flowing", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| a.received >= 2_000)
            .map(|_| ())
    });
    let second = format!(
        r#"
[destination.second]
type = "kinesis"
stream = "fleet-fan-second"
region = "us-east-1"
endpoint = "{endpoint}"
"#
    );
    let text = document_text(&endpoint, "fleet-fan-first", "100ms", &second).replace(
        "destination = \"stream\"",
        "destinations = [\"stream\", \"second\"]",
    );
    let doc = op.sign(&text, "gateway:gw-test", 5);
    op.push(&doc, "gateway:gw-test");
    wait_report(&agent, "version 5 applied", |r| r.state == "applied");
    let at_apply = agent.accounting().unwrap().received;
    wait_for("more after the apply", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| a.received >= at_apply + 2_000)
            .map(|_| ())
    });
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<u32> = publishers
        .into_iter()
        .map(|p| rt.block_on(p).unwrap())
        .collect();
    let total: u32 = sent.iter().sum();
    let first = wait_stream_complete_with(
        &rt,
        &client,
        "fleet-fan-first",
        Duration::from_secs(120),
        |t| t.len() >= total as usize,
    );
    for (d, n) in sent.iter().enumerate() {
        assert_exactly(&first, &topic_of(d as u32), d as u32, *n);
    }
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    let taken = acc.destinations["telemetry/second"].clone();
    assert_eq!(
        (taken.delivered, taken.dropped, taken.pending),
        (taken.received, 0, 0)
    );
    let second = wait_stream_complete_with(
        &rt,
        &client,
        "fleet-fan-second",
        Duration::from_secs(60),
        |t| t.len() >= taken.received as usize,
    );
    // The second stream holds exactly the first stream's records from its first id on.
    let since = second.messages.iter().map(|m| m.seq).min().unwrap();
    let mut after: Vec<u64> = first
        .messages
        .iter()
        .map(|m| m.seq)
        .filter(|s| *s >= since)
        .collect();
    let mut got: Vec<u64> = second.messages.iter().map(|m| m.seq).collect();
    after.sort_unstable();
    got.sort_unstable();
    assert_eq!(
        got, after,
        "the second stream: every record from the apply on, once"
    );
    let before = first.messages.iter().filter(|m| m.seq < since).count() as u64;
    assert!(
        before >= 2_000 && before <= at_apply,
        "{before} records from before the apply (received by then: {at_apply})"
    );
    assert_eq!(taken.received, got.len() as u64);
    assert_eq!(agent.stop().code(), Some(0));
}
