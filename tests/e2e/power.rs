//! Power cuts with `sync = "full"`: the spool and a folder destination on a disk that forgets
//! every write not yet fsynced ([`LossyDisk`]); the agent is killed and the power cut at random
//! moments while devices publish QoS 1 messages. Afterwards every message the broker acked to
//! its publisher is in the folder (the broker redelivers what the agent had not acked, so
//! nothing acked may be missing), a last cut after the spool drained takes no frame away
//! (the folder destination syncs each frame and the folder before it reports it accepted),
//! nothing was dropped and the accounting balances. Each cut also forgets a canary file that
//! nobody synced, and the test checks that it did, so the cuts are seen to bite.
//!
//! Needs root and `/dev/fuse` (CI has both); without them the test says so and passes.
//! CI cuts 50 times; `scripts/torture.sh` cuts 200 times
//! (`EDGESHIP_TORTURE_CUTS`).

use crate::lossy_disk::LossyDisk;
use crate::support::*;
use edgeship::frame;
use rand::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

/// Every record in the folder's frames (the `.eshp` files: a frame being written has another
/// name until it is whole).
fn records_in(folder: &Path) -> Vec<frame::Record> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "eshp") {
            let bytes = std::fs::read(&path).unwrap();
            let f = frame::decode_frame(&bytes)
                .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
            out.extend(f.records);
        }
    }
    out
}

fn all_in(records: &[frame::Record], devices: u32, per_device: u32) -> bool {
    let t = tally(records);
    (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
}

fn power_cuts(cuts: u32, devices: u32, per_device: u32) {
    if !LossyDisk::available() {
        eprintln!("skipped: a power cut needs a FUSE mount (root and /dev/fuse; CI has both)");
        return;
    }
    let dir = tempdir();
    let mosquitto = Mosquitto::start(dir.path());
    let mut disk = LossyDisk::mount(&dir.path().join("disk"));
    let folder = disk.path().join("frames");
    let config = agent_config(
        disk.path(),
        mosquitto.port,
        "http://127.0.0.1:9",
        "s",
        "sync = \"full\"",
        "",
    )
    .replace(
        "type = \"kinesis\"\nstream = \"s\"\nregion = \"us-east-1\"\nendpoint = \"http://127.0.0.1:9\"",
        &format!("type = \"directory\"\npath = \"{}\"", folder.display()),
    );
    assert!(config.contains("type = \"directory\""));
    let started = Instant::now();
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let spread = Duration::from_millis(900) * cuts;
    let port = mosquitto.port;
    let publisher = std::thread::spawn(move || {
        runtime().block_on(publish_paced(port, devices, per_device, spread))
    });
    // Each cut also takes a write nobody synced, a canary beside the spool, and the disk
    // must forget it: that shows the cuts bite whether or not the agent had writes in flight
    // (with `sync = "full"` it seldom has: the spool syncs each commit, and the log's index
    // lives in its memory, not in a file).
    let canary = disk.path().join("canary");
    let mut rng = rand::thread_rng();
    for _ in 0..cuts {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..=1_500)));
        agent.kill();
        std::fs::write(&canary, b"never synced").unwrap();
        disk.cut();
        assert_eq!(
            std::fs::read(&canary).unwrap(),
            b"",
            "the cut kept a write that was never synced"
        );
        agent.spawn();
    }
    let published = publisher.join().unwrap();
    let total = u64::from(devices) * u64::from(per_device);
    assert_eq!(published, total, "every publish acked by the broker");
    // Until every message is there, or the agent has held nothing for 10 s (then the
    // assertion below names what is missing).
    let mut idle_since: Option<Instant> = None;
    wait_for(
        "every message in the folder",
        Duration::from_secs(300),
        || {
            if all_in(&records_in(&folder), devices, per_device) {
                return Some(());
            }
            let idle = agent.accounting().is_some_and(|a| a.pending == 0);
            let since = *idle_since.get_or_insert_with(Instant::now);
            if !idle {
                idle_since = None;
            }
            (idle && since.elapsed() > Duration::from_secs(10)).then_some(())
        },
    );
    let acc = wait_for("the spool to drain", Duration::from_secs(120), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    // One more cut once everything was accepted: no frame may go with it.
    agent.kill();
    disk.cut();
    let records = records_in(&folder);
    let duplicates = assert_all_delivered(&records, devices, per_device);
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "nothing may be dropped: {acc:?}");
    let stats = disk.stats();
    eprintln!(
        "power cuts: {} cuts, {total} messages published and acked, {} received by the agent (redeliveries included), 0 missing, {duplicates} duplicates in the folder, {} files rolled back, {} unsynced bytes lost ({} of them the canaries), {} fsyncs, {:.0} s",
        stats.cuts,
        acc.received,
        stats.files_rolled_back,
        stats.bytes_lost,
        u64::from(cuts) * b"never synced".len() as u64,
        stats.fsyncs,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn power_cuts_under_sync_full_lose_no_acked_message() {
    power_cuts(50, 10, 500);
}

/// `scripts/torture.sh`: 200 cuts by default (`EDGESHIP_TORTURE_CUTS`).
#[test]
#[ignore = "minutes long: scripts/torture.sh runs it"]
fn many_power_cuts_lose_no_acked_message() {
    let cuts = std::env::var("EDGESHIP_TORTURE_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    power_cuts(cuts, 20, 50 * cuts);
}
