//! What consumers run on the far end: the Python decoder in `consumers/python` reads the
//! records the agent put in Kinesis exactly as `edgeship decode` does, line for line.

use crate::support::*;
use base64::Engine;
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

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
    // Telemetry JSON from some devices, arbitrary bytes (not UTF-8) from others.
    let make = |d: u32, s: u32| {
        if d % 2 == 0 {
            payload(d, s)
        } else {
            noise(d, s, 64 + (s as usize % 200))
        }
    };
    let (devices, per_device) = (6, 500);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        make,
        "",
    ));
    let contents = wait_stream_complete_with(
        &rt,
        &client,
        "e2e-consumers",
        Duration::from_secs(120),
        |t| {
            (0..devices)
                .all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), make(d, s)))))
        },
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
}
