//! What consumers run on the far end: the Python decoder in `consumers/python` reads the
//! records the agent put in Kinesis exactly as `edgeship decode` does, line for line.

use crate::support::*;
use base64::Engine;
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Telemetry JSON from even devices, arbitrary bytes (not UTF-8) from odd ones.
fn mixed(d: u32, s: u32) -> Vec<u8> {
    if d % 2 == 0 {
        payload(d, s)
    } else {
        noise(d, s, 16 + (s as usize % 200))
    }
}

/// Publishes `mixed` payloads from `devices` devices and waits until the stream holds them all.
fn publish_mixed(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_kinesis::Client,
    port: u16,
    stream: &str,
    devices: u32,
    per_device: u32,
) -> StreamContents {
    rt.block_on(publish_with(
        port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        mixed,
        "",
    ));
    wait_stream_complete_with(rt, client, stream, Duration::from_secs(120), |t| {
        (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), mixed(d, s)))))
    })
}

/// 6 devices x 500 `mixed` messages through a route with `format`, to an agent that then
/// stops: what the stream holds.
fn through_a_route_in(format: &str, stream: &str) -> StreamContents {
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
        "partition_key = \"{topic[1]}\"\n",
        &format!("partition_key = \"{{topic[1]}}\"\nformat = \"{format}\"\n"),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let contents = publish_mixed(&rt, &client, mosquitto.port, stream, DEVICES, PER_DEVICE);
    assert_eq!(agent.stop().code(), Some(0));
    contents
}

const DEVICES: u32 = 6;
const PER_DEVICE: u32 = 500;

/// Runs a Python script of the test venv with `input` on its stdin; its stdout.
fn python_with_input(script: &str, input: &[u8]) -> String {
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running Python (scripts/test.sh installs its venv)");
    {
        use std::io::Write;
        // A failed write means Python ended early: its status and stderr say why, below.
        let _ = child.stdin.take().unwrap().write_all(input);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn python_decoder_reads_the_stream_like_edgeship_decode() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-consumers", 2);
    let mosquitto = Mosquitto::start(dir.path());
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            mosquitto.port,
            &kinesis.endpoint(),
            "e2e-consumers",
            "",
            "",
        ),
    );
    agent.wait_connected(1);
    let (devices, per_device) = (6, 500);
    let contents = publish_mixed(
        &rt,
        &client,
        mosquitto.port,
        "e2e-consumers",
        devices,
        per_device,
    );
    assert_eq!(agent.stop().code(), Some(0));

    // One base64 record per line: what a Lambda gets, and what both decoders take.
    let b64 = base64::engine::general_purpose::STANDARD;
    let lines: String = contents
        .raw_records
        .iter()
        .map(|r| b64.encode(r) + "\n")
        .collect();
    let input = dir.path().join("records.b64");
    std::fs::write(&input, lines).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let python = Command::new(python())
        .arg(format!("{root}/consumers/python/edgeship_decode.py"))
        .arg(&input)
        .output()
        .expect("running the Python decoder (scripts/test.sh installs its venv)");
    let rust = Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .arg("decode")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        rust.status.success(),
        "{}",
        String::from_utf8_lossy(&rust.stderr)
    );
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    let lines = rust.stdout.iter().filter(|b| **b == b'\n').count();
    assert_eq!(lines, contents.messages.len());
    assert!(lines >= (devices * per_device) as usize);
    assert!(
        python.stdout == rust.stdout,
        "the Python decoder's output differs from edgeship decode's"
    );
    eprintln!(
        "edgeship format: {lines} messages in {} Kinesis records of {} bytes, {} PUT payload units ({:.0} per million messages)",
        contents.kinesis_records,
        contents.kinesis_bytes,
        contents.put_units,
        contents.put_units as f64 * 1e6 / lines as f64
    );
}

const DEAGGREGATE: &str = r#"
import base64, json, sys
from aws_kinesis_agg.deaggregator import iter_deaggregate_records
# One Lambda-style Kinesis event record per input line: "<partition key> <base64 data>".
events = []
for n, line in enumerate(sys.stdin.read().splitlines()):
    key, data = line.split(" ", 1)
    events.append({"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": key,
                               "sequenceNumber": str(n), "data": data,
                               "approximateArrivalTimestamp": 0}})
for r in iter_deaggregate_records(events):
    k = r["kinesis"]
    data = k["data"].decode() if isinstance(k["data"], bytes) else k["data"]
    print(json.dumps({"key": k["partitionKey"], "data": data,
                      "aggregated": "subSequenceNumber" in k}))
"#;

/// A route with `format = "kpl"`: the records in the stream are KPL aggregates that the
/// deaggregator AWS publishes for Lambda consumers (`aws-kinesis-agg` on PyPI, not edgeship's
/// code) splits back into the device payloads, each once, with its partition key.
#[test]
fn kpl_records_are_read_by_the_aws_deaggregator() {
    let contents = through_a_route_in("kpl", "e2e-kpl");
    let (make, devices, per_device) = (mixed, DEVICES, PER_DEVICE);
    assert!(contents
        .raw_records
        .iter()
        .all(|r| r.starts_with(&edgeship::frame::kpl::MAGIC)));

    let b64 = base64::engine::general_purpose::STANDARD;
    let input: String = contents
        .raw_records
        .iter()
        .zip(&contents.partition_keys)
        .map(|(r, k)| format!("{k} {}\n", b64.encode(r)))
        .collect();
    let out = python_with_input(DEAGGREGATE, input.as_bytes());
    let mut got: std::collections::HashMap<(String, Vec<u8>), u32> = Default::default();
    let mut user_records = 0;
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v["aggregated"], true,
            "a record was not deaggregated: {line}"
        );
        let data = b64.decode(v["data"].as_str().unwrap()).unwrap();
        *got.entry((v["key"].as_str().unwrap().to_string(), data))
            .or_default() += 1;
        user_records += 1;
    }
    // Every payload once, under its device's partition key, and nothing else.
    assert_eq!(user_records, (devices * per_device) as usize);
    for d in 0..devices {
        for s in 0..per_device {
            let key = format!("dev-{d:03}");
            assert_eq!(
                got.get(&(key, make(d, s))),
                Some(&1),
                "device {d} message {s}"
            );
        }
    }
    assert!(
        contents.kinesis_records * 20 < user_records,
        "{} Kinesis records for {user_records} messages: not aggregated",
        contents.kinesis_records
    );
    let units_per_million = contents.put_units as f64 * 1e6 / user_records as f64;
    eprintln!(
        "kpl: {user_records} messages in {} Kinesis records of {} bytes, {} PUT payload units ({units_per_million:.0} per million messages)",
        contents.kinesis_records, contents.kinesis_bytes, contents.put_units
    );
}

/// Reads concatenated records the way Firehose and Redshift see them: one text, split at
/// newlines, each line parsed by Python's own JSON module. Prints the ids and how many lines.
const JSON_LINES: &str = r#"
import json, sys
text = sys.stdin.read()
ids = [json.loads(line)["id"] for line in text.split("\n") if line]
print(len(ids), len(set(ids)))
"#;

/// A route with `format = "ndjson"`: every Kinesis record is JSON lines, one per message, each
/// ending in a newline; JSON payloads are embedded as they are, others as base64. Read by
/// serde_json (in `read_stream`) and by Python's json module over the records concatenated.
#[test]
fn ndjson_records_are_json_lines_a_parser_reads_whole() {
    let contents = through_a_route_in("ndjson", "e2e-ndjson");
    let (devices, per_device) = (DEVICES, PER_DEVICE);
    assert!(contents
        .raw_records
        .iter()
        .all(|r| r.starts_with(b"{\"id\":")));

    // Every message once, byte for byte (read_stream decoded the lines).
    let tally = tally(&contents.messages);
    for d in 0..devices {
        for s in 0..per_device {
            assert_eq!(
                tally.get(&(topic_of(d), mixed(d, s))),
                Some(&1),
                "device {d} message {s}"
            );
        }
    }
    assert_eq!(contents.messages.len(), (devices * per_device) as usize);
    // JSON payloads are there as JSON, not as strings.
    let first_json = contents
        .raw_records
        .iter()
        .flat_map(|r| r.split(|b| *b == b'\n'))
        .find(|l| l.windows(11).any(|w| w == b"\"payload\":{"))
        .expect("a line with a JSON payload");
    let v: serde_json::Value = serde_json::from_slice(first_json).unwrap();
    assert!(v["payload"]["device"].is_string(), "{v}");

    let out = python_with_input(JSON_LINES, &contents.raw_records.concat());
    let n = (devices * per_device).to_string();
    assert_eq!(out.trim(), format!("{n} {n}"));
    let units_per_million = contents.put_units as f64 * 1e6 / contents.messages.len() as f64;
    eprintln!(
        "ndjson: {} messages in {} Kinesis records of {} bytes, {} PUT payload units ({units_per_million:.0} per million messages)",
        contents.messages.len(),
        contents.kinesis_records,
        contents.kinesis_bytes,
        contents.put_units
    );
}
