//! Amazon Data Firehose as a destination, against moto's server (which delivers a delivery
//! stream's records to a bucket it also serves): the records are read back from the bucket
//! with boto3 and parsed as JSON lines with serde_json, not with edgeship's code.

use crate::support::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Half the devices send telemetry JSON, half binary (`payload_base64` in the lines).
fn mixed(d: u32, s: u32) -> Vec<u8> {
    if d % 2 == 0 {
        payload(d, s)
    } else {
        noise(d, s, 16 + (s as usize % 200))
    }
}

/// The messages published during the outage (none equal to a [`mixed`] one).
fn later(d: u32, s: u32) -> Vec<u8> {
    payload(d, 10_000 + s)
}

/// The agent's config with route `telemetry` (per-device keys) feeding only the Firehose
/// destination `hose`.
fn hose_config(dir: &Path, broker: u16, endpoint: &str, delivery_stream: &str) -> String {
    agent_config(dir, broker, "http://127.0.0.1:9", "unused", "", "")
        .replace("destination = \"stream\"", "destination = \"hose\"")
        + &format!(
            r#"[destination.hose]
type = "firehose"
delivery_stream = "{delivery_stream}"
region = "us-east-1"
endpoint = "{endpoint}"
"#
        )
}

/// The delivery stream's objects in `bucket`, each parsed as JSON lines; also the size of
/// the largest object (one `PutRecordBatch` call's records, concatenated).
fn delivered(s3: &S3Server, bucket: &str, folder: &Path) -> (Vec<edgeship::frame::Record>, usize) {
    let _ = std::fs::remove_dir_all(folder);
    std::fs::create_dir_all(folder).unwrap();
    let answer = s3_tool(&[&s3.endpoint(), "fetch", bucket, folder.to_str().unwrap()]);
    let mut records = Vec::new();
    let mut largest = 0;
    for key in answer["keys"].as_array().unwrap() {
        let data = std::fs::read(folder.join(key.as_str().unwrap())).unwrap();
        largest = largest.max(data.len());
        records.extend(ndjson_as_frame(&data, "").records);
    }
    (records, largest)
}

/// How often each (topic, payload) arrived.
fn tally(records: &[edgeship::frame::Record]) -> BTreeMap<(String, Vec<u8>), u32> {
    let mut tally = BTreeMap::new();
    for r in records {
        *tally
            .entry((r.topic.clone(), r.payload.clone()))
            .or_default() += 1;
    }
    tally
}

/// The destination's figures in `/status`.
fn hose_status(agent: &Agent) -> Option<serde_json::Value> {
    let (_, body) = agent.get("/status")?;
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    doc["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == "hose")
        .cloned()
}

/// 20,000 messages of 100 devices (per-device keys, half of them binary) through a Firehose
/// delivery stream into moto's bucket: every message arrives once, byte for byte, as a JSON
/// line; records gather many devices' lines (Firehose bills per 5 KB record); no call
/// carries over 4 MiB. The link to Firehose is then cut while 5,000 more are published:
/// they wait in the spool and all arrive when it is back.
#[test]
fn firehose_takes_json_lines_of_every_message_and_an_outage_loses_none() {
    let dir = tempdir();
    let rt = runtime();
    let moto = S3Server::moto(dir.path());
    s3_tool(&[&moto.endpoint(), "mkbucket", "hose-lake"]);
    s3_tool(&[
        &moto.endpoint(),
        "mkfirehose",
        "telemetry-hose",
        "hose-lake",
    ]);
    let link = Uplink::start(moto.port);
    let mosquitto = Mosquitto::start(dir.path());
    let config = hose_config(
        dir.path(),
        mosquitto.port,
        &link.endpoint(),
        "telemetry-hose",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device) = (100, 200);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        mixed,
        "",
    ));
    let acc = wait_for(
        "Firehose to take every message",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| a.pending == 0 && a.received == 20_000)
        },
    );
    assert_eq!((acc.delivered, acc.dropped), (20_000, 0), "{acc:?}");

    // The link cut: the next 5,000 wait in the spool, status says why, then all go.
    link.cut();
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        50,
        Arc::new(AtomicU64::new(0)),
        later,
        "b-",
    ));
    let during = wait_for(
        "the outage to show in status",
        Duration::from_secs(60),
        || {
            let s = hose_status(&agent)?;
            let acc = agent.accounting()?;
            (s["failing"] == true && acc.received == 25_000).then_some((s, acc))
        },
    );
    assert!(
        during.1.pending >= 5_000,
        "spooled meanwhile: {:?}",
        during.1
    );
    link.restore();
    let acc = wait_for(
        "the backlog to drain after the outage",
        Duration::from_secs(120),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (25_000, 0), "{acc:?}");

    let (records, largest) = delivered(&moto, "hose-lake", &dir.path().join("fetched"));
    let tally = tally(&records);
    for d in 0..devices {
        for s in 0..per_device {
            assert_eq!(
                tally.get(&(topic_of(d), mixed(d, s))),
                Some(&1),
                "device {d} message {s}"
            );
        }
        for s in 0..50 {
            assert_eq!(
                tally.get(&(topic_of(d), later(d, s))),
                Some(&1),
                "device {d} message {s} (b)"
            );
        }
    }
    assert_eq!(records.len(), 25_000);
    assert!(
        largest <= 4 << 20,
        "a call carried {largest} bytes, over Firehose's 4 MiB"
    );
    let status = hose_status(&agent).expect("status");
    let firehose_records = status["entries_accepted"].as_u64().unwrap();
    assert_eq!(status["records_accepted"], 25_000);
    assert!(
        firehose_records * 20 <= 25_000,
        "{firehose_records} Firehose records for 25,000 messages: records gather many"
    );
    eprintln!(
        "firehose: 25,000 messages in {firehose_records} Firehose records; largest call {largest} bytes"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// A delivery stream that does not exist: status names Firehose's answer, every record stays
/// spooled, and all arrive once the stream is created.
#[test]
fn a_missing_delivery_stream_is_named_in_status_and_nothing_is_lost() {
    let dir = tempdir();
    let rt = runtime();
    let moto = S3Server::moto(dir.path());
    s3_tool(&[&moto.endpoint(), "mkbucket", "late-lake"]);
    let mosquitto = Mosquitto::start(dir.path());
    let config = hose_config(dir.path(), mosquitto.port, &moto.endpoint(), "not-yet");
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(publish(
        mosquitto.port,
        10,
        100,
        Arc::new(AtomicU64::new(0)),
    ));
    let status = wait_for(
        "status to name the missing delivery stream",
        Duration::from_secs(60),
        || {
            let s = hose_status(&agent)?;
            s["last_error"]
                .as_str()?
                .contains("ResourceNotFoundException")
                .then_some(s)
        },
    );
    let acc = agent.accounting().expect("accounting");
    assert_eq!((acc.pending, acc.dropped), (1_000, 0), "{status}\n{acc:?}");

    s3_tool(&[&moto.endpoint(), "mkfirehose", "not-yet", "late-lake"]);
    let acc = wait_for(
        "the delivery stream to take the backlog",
        Duration::from_secs(120),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (1_000, 0), "{acc:?}");
    let (records, _) = delivered(&moto, "late-lake", &dir.path().join("fetched"));
    let tally = tally(&records);
    for d in 0..10 {
        for s in 0..100 {
            assert_eq!(
                tally.get(&(topic_of(d), payload(d, s))),
                Some(&1),
                "device {d} message {s}"
            );
        }
    }
    assert_eq!(agent.stop().code(), Some(0));
}
