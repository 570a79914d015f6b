//! Test 6: bad input gets a clear answer. Malformed config files are refused with file, line
//! and field; an oversize message is dead-lettered, a non-UTF-8 payload is delivered byte for
//! byte, a topic no route takes is counted, and the agent keeps going.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

fn validate(dir: &std::path::Path, name: &str, text: &str) -> (i32, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .args(["config", "validate"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"gateway_id = "gw"
[[broker]]
host = "127.0.0.1"
[[route]]
name = "telemetry"
topics = ["devices/+/telemetry"]
destination = "stream"
[destination.stream]
type = "kinesis"
stream = "s"
"#;

#[test]
fn malformed_configs_are_refused_with_file_line_and_field() {
    let dir = tempdir();
    let (code, err) = validate(dir.path(), "good.toml", GOOD);
    assert_eq!(code, 0, "{err}");

    let cases = [
        (
            "unknown-field.toml",
            GOOD.replace("host = ", "hots = \"x\"\nhost = "),
            ":3:1:",
            "hots",
        ),
        (
            "bad-unit.toml",
            format!("{GOOD}[spool]\nmax_bytes = \"ten\"\n"),
            ":12:13:",
            "max_bytes",
        ),
        (
            "unknown-destination.toml",
            GOOD.replace("destination = \"stream\"", "destination = \"nowhere\""),
            ":7:15:",
            "nowhere",
        ),
        (
            "syntax.toml",
            GOOD.replace("name = \"telemetry\"", "name = \"telemetry"),
            ":5:",
            "name",
        ),
        (
            "bad-policy.toml",
            format!("{GOOD}[spool]\nfull_policy = \"shrug\"\n"),
            ":12:15:",
            "full_policy",
        ),
        (
            "no-routes.toml",
            GOOD.split("[[route]]").next().unwrap().to_string(),
            "",
            "route",
        ),
    ];
    for (name, text, location, field) in cases {
        let (code, err) = validate(dir.path(), name, &text);
        assert_eq!(code, 2, "{name} should be refused: {err}");
        let file = dir.path().join(name).display().to_string();
        assert!(
            err.contains(&format!("{file}{location}")),
            "{name}: no file:line:col in {err:?}"
        );
        assert!(
            err.contains(field),
            "{name}: field {field} not named in {err:?}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{name}: one clear line, got {err:?}"
        );
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .args(["config", "validate", "/nonexistent/edgeship.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("/nonexistent/edgeship.toml: cannot read config file"));
}

#[test]
fn oversize_binary_and_unrouted_messages_get_counted_outcomes() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-bad-input", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        "e2e-bad-input",
        "",
        "subscribe = [\"devices/#\", \"other/#\"]",
    )
    .replace("[batch]\n", "[batch]\nmax_message_bytes = \"4KiB\"\n");
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);

    let binary: Vec<u8> = vec![0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28, b'\n', 0x00];
    let oversize = vec![b'x'; 8 * 1024];
    rt.block_on(async {
        let mut opts =
            rumqttc::MqttOptions::new("bad-input-publisher", "127.0.0.1", mosquitto.port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (c, mut events) = rumqttc::AsyncClient::new(opts, 16);
        c.publish(
            "devices/dev-000/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            oversize.clone(),
        )
        .await
        .unwrap();
        c.publish(
            "devices/dev-001/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            binary.clone(),
        )
        .await
        .unwrap();
        c.publish(
            "other/thing",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"unrouted".to_vec(),
        )
        .await
        .unwrap();
        c.publish(
            "devices/dev-002/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{\"ok\":true}".to_vec(),
        )
        .await
        .unwrap();
        let mut acks = 0;
        while acks < 4 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                events.poll().await.unwrap()
            {
                acks += 1;
            }
        }
    });
    let acc = wait_for(
        "four messages accounted for",
        Duration::from_secs(60),
        || {
            agent
                .accounting()
                .filter(|a| a.received == 4 && a.pending == 0 && a.delivered == 2)
        },
    );
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped_by_reason.get("oversize"), Some(&1), "{acc:?}");
    assert_eq!(acc.dropped_by_reason.get("no_route"), Some(&1), "{acc:?}");
    assert_eq!(acc.dead_letters, 1, "{acc:?}");

    let contents = rt.block_on(read_stream(&client, "e2e-bad-input"));
    let got: Vec<(String, Vec<u8>)> = contents
        .messages
        .iter()
        .map(|m| (m.topic.clone(), m.payload.clone()))
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.contains(&("devices/dev-001/telemetry".into(), binary)),
        "binary payload not delivered byte for byte"
    );
    assert!(got.contains(&(
        "devices/dev-002/telemetry".into(),
        b"{\"ok\":true}".to_vec()
    )));

    let log = agent.log();
    assert!(
        log.contains("dead-lettered") && log.contains("no route matches"),
        "{log}"
    );
    assert!(!log.contains("xxxxxxxx"), "a payload reached the log");

    let spool = agent.spool_path.clone();
    let status = || {
        Command::new(env!("CARGO_BIN_EXE_edgeship"))
            .args(["status", "--spool"])
            .arg(&spool)
            .output()
            .unwrap()
    };
    // The running agent keeps its spool file to itself, and the reader is told why.
    let held = status();
    let told = String::from_utf8_lossy(&held.stderr);
    assert!(!held.status.success(), "{told}");
    assert!(
        told.contains("a running agent holds the spool file"),
        "{told}"
    );
    assert_eq!(agent.stop().code(), Some(0));
    let read = status();
    let text = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success(), "{text}");
    assert!(
        text.contains("oversize") && text.contains("no_route") && text.contains("holds"),
        "{text}"
    );
}

/// A spool file corrupted while the agent is down: it is moved aside, the new spool's record
/// ids go on above every id issued before (they used to start again at 1, and the folder
/// destination overwrote the frames of the first records), and the accounting goes on with the
/// lost file's counters.
#[test]
fn a_corrupt_spool_is_replaced_without_reusing_ids() {
    let dir = tempdir();
    let mosquitto = Mosquitto::start(dir.path());
    let frames = dir.path().join("frames");
    let config = agent_config(dir.path(), mosquitto.port, "http://127.0.0.1:9", "s", "", "")
        .replace(
            "type = \"kinesis\"\nstream = \"s\"\nregion = \"us-east-1\"\nendpoint = \"http://127.0.0.1:9\"",
            &format!("type = \"directory\"\npath = \"{}\"", frames.display()),
        );
    let rt = runtime();
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(publish(mosquitto.port, 2, 10, Default::default()));
    wait_for("20 records in the folder", Duration::from_secs(30), || {
        agent
            .accounting()
            .filter(|a| a.delivered == 20 && a.pending == 0)
    });
    assert_eq!(agent.stop().code(), Some(0));
    let spool = dir.path().join("spool.db");
    std::fs::write(&spool, vec![0x42; 8192]).unwrap();
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", spool.display()));
    }
    agent.spawn();
    agent.wait_connected(1);
    rt.block_on(publish_with(
        mosquitto.port,
        1,
        5,
        Default::default(),
        |d, s| payload(d, s + 100),
        "again-",
    ));
    wait_for("5 more in the folder", Duration::from_secs(30), || {
        agent
            .accounting()
            .filter(|a| a.delivered >= 5 && a.pending == 0)
    });
    assert!(agent.log().contains("moved it aside"), "{}", agent.log());
    let mut ids = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&frames).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "eshp") {
            let f = edgeship::frame::decode_frame(&std::fs::read(&path).unwrap()).unwrap();
            for r in f.records {
                *ids.entry(r.seq).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(ids.len(), 25, "every message keeps its own id: {ids:?}");
    assert!(ids.values().all(|&n| n == 1), "an id was reused: {ids:?}");
    assert_eq!(agent.stop().code(), Some(0));
}

/// A spool file damaged while the agent is down (pages in the middle of its blocks
/// overwritten, as a failing SD card does): the check at start finds it, every record that
/// reads back is shipped byte for byte, the rest are counted dropped `corrupt`, and the
/// accounting balances. The whole file used to be set aside with all 1,200 records in it.
#[test]
fn a_spool_damaged_between_runs_ships_what_reads_back_and_counts_the_rest() {
    let stream = "e2e-damaged-spool";
    let Behind {
        dir,
        rt,
        client,
        uplink,
        mosquitto,
        mut agent,
    } = agent_behind_uplink(stream, "", "", |_, config| config);
    uplink.cut();
    let noisy = |d: u32, s: u32| noise(d, s, 2_000);
    rt.block_on(publish_with(
        mosquitto.port,
        4,
        300,
        Default::default(),
        noisy,
        "d-",
    ));
    wait_for("1,200 records spooled", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| a.received == 1_200 && a.pending == 1_200)
    });
    assert_eq!(agent.stop().code(), Some(0));
    let spool = dir.path().join("spool.db");
    let wal = std::path::PathBuf::from(format!("{}-wal", spool.display()));
    assert!(
        std::fs::metadata(&wal).map_or(0, |m| m.len()) == 0,
        "the log was checkpointed into the file at stop"
    );
    // 32 KiB of garbage in the middle of the blocks, whatever the file's page size.
    let len = std::fs::metadata(&spool).unwrap().len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&spool)
            .unwrap();
        f.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
        f.write_all(&vec![0xa5; 8 * 4096]).unwrap();
    }
    uplink.restore();
    agent.spawn();
    let acc = wait_for("the spool to drain", Duration::from_secs(90), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    let corrupt = acc.dropped_by_reason.get("corrupt").copied().unwrap_or(0);
    assert!(corrupt > 0 && corrupt < 1_200, "{acc:?}");
    assert_eq!(acc.received, 1_200, "{acc:?}");
    assert_eq!(acc.delivered + corrupt, 1_200, "{acc:?}");
    assert!(acc.balances(), "{acc:?}");
    let expected: std::collections::HashSet<(String, Vec<u8>)> = (0..4)
        .flat_map(|d| (0..300).map(move |q| (topic_of(d), noisy(d, q))))
        .collect();
    let contents = rt.block_on(read_stream(&client, stream));
    let shipped = tally(&contents.messages);
    for (message, n) in &shipped {
        assert!(expected.contains(message), "a record no one published");
        assert_eq!(*n, 1, "a record shipped twice");
    }
    assert_eq!(shipped.len() as u64, acc.delivered);
    let log = agent.log();
    assert!(log.contains("spool file was corrupt"), "{log}");
    assert_eq!(agent.stop().code(), Some(0));
}
