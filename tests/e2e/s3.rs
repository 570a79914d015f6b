//! The batch path: a route feeding a Kinesis stream and an S3 bucket from one spool. Objects
//! are read back with clients that are not edgeship's (boto3, DuckDB) from real S3 servers on
//! 127.0.0.1: moto's, and s3s-fs (stricter: it enforces the 5 MiB minimum part).

use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// The agent's config: route `telemetry` to the Kinesis stream `stream` and the bucket
/// destination `lake` (`lake` holds the rest of its section).
fn config_with_lake(dir: &Path, broker: u16, kinesis: &str, stream: &str, lake: &str) -> String {
    agent_config(dir, broker, kinesis, stream, "", "").replace(
        "destination = \"stream\"",
        "destinations = [\"stream\", \"lake\"]",
    ) + &format!(
        r#"[destination.lake]
type = "s3"
region = "us-east-1"
path_style = true
prefix = "telemetry"
{lake}
"#
    )
}

/// The agent's config with route `telemetry` feeding only the bucket destination `lake`.
fn lake_only_config(dir: &Path, broker: u16, lake: &str) -> String {
    config_with_lake(dir, broker, &kinesis().endpoint(), "unused", lake).replace(
        "destinations = [\"stream\", \"lake\"]",
        "destination = \"lake\"",
    )
}

/// One object fetched back.
struct Object {
    key: String,
    first_seq: u64,
    last_seq: u64,
    /// (id, topic, payload text, ts_ms) of each line.
    lines: Vec<(String, String, Vec<u8>, u64)>,
}

/// Downloads every object of `bucket` to `folder` and parses it (zstd JSON lines).
fn fetch(endpoint: &str, bucket: &str, folder: &Path) -> Vec<Object> {
    let _ = std::fs::remove_dir_all(folder);
    std::fs::create_dir_all(folder).unwrap();
    let answer = s3_tool(&[endpoint, "fetch", bucket, folder.to_str().unwrap()]);
    let mut objects = Vec::new();
    for key in answer["keys"].as_array().unwrap() {
        let key = key.as_str().unwrap().to_string();
        let data = std::fs::read(folder.join(&key)).unwrap();
        let mut text = String::new();
        // telemetry/dt=YYYY-MM-DD/hr=HH/gw-test-FIRST-LAST.ndjson.zst (or .ndjson.gz)
        let name = key.rsplit('/').next().unwrap();
        let seqs = if let Some(seqs) = name.strip_suffix(".ndjson.gz") {
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&data[..]), &mut text)
                .unwrap();
            seqs
        } else {
            std::io::Read::read_to_string(
                &mut zstd::stream::read::Decoder::new(&data[..]).unwrap(),
                &mut text,
            )
            .unwrap();
            name.strip_suffix(".ndjson.zst")
                .unwrap_or_else(|| panic!("unexpected key {key}"))
        };
        let seqs = seqs
            .strip_prefix("gw-test-")
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        let (first, last) = seqs.split_once('-').unwrap();
        let (first_seq, last_seq) = (first.parse().unwrap(), last.parse().unwrap());
        let mut lines = Vec::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            // The payload is the line's last field, as the agent wrote it (JSON as it came),
            // or the bytes of `payload_base64`.
            let payload = match line.find(",\"payload\":") {
                Some(at) => line.as_bytes()[at + 11..line.len() - 1].to_vec(),
                None => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(v["payload_base64"].as_str().expect("a payload"))
                        .unwrap()
                }
            };
            lines.push((
                v["id"].as_str().unwrap().to_string(),
                v["topic"].as_str().unwrap().to_string(),
                payload,
                v["ts_ms"].as_u64().unwrap(),
            ));
        }
        objects.push(Object {
            key,
            first_seq,
            last_seq,
            lines,
        });
    }
    objects
}

/// Checks the objects: keys name their hour and first/last sequence numbers, no object
/// straddles an hour, no record is in two objects; returns the tally of (topic, payload)
/// and the lines per `dt/hr`.
/// How often each (topic, payload) is in the objects.
type Tally = BTreeMap<(String, Vec<u8>), u32>;

fn check_objects(objects: &[Object]) -> (Tally, BTreeMap<String, u64>) {
    let mut tally = BTreeMap::new();
    let mut ids = BTreeSet::new();
    let mut by_hour = BTreeMap::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for o in objects {
        assert!(!o.lines.is_empty(), "{} is empty", o.key);
        let seqs: Vec<u64> = o
            .lines
            .iter()
            .map(|(id, ..)| id.strip_prefix("gw-test:").unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            (seqs[0], *seqs.last().unwrap()),
            (o.first_seq, o.last_seq),
            "{}: the key names its first and last record",
            o.key
        );
        ranges.push((o.first_seq, o.last_seq));
        let hour = |ts: u64| {
            let secs = (ts / 1000) as i64;
            let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            (days, rest / 3600)
        };
        let h0 = hour(o.lines[0].3);
        for (id, topic, payload, ts) in &o.lines {
            assert_eq!(hour(*ts), h0, "{} straddles an hour at {id}", o.key);
            assert!(ids.insert(id.clone()), "{id} is in two objects");
            *tally.entry((topic.clone(), payload.clone())).or_insert(0) += 1;
        }
        let dt_hr: Vec<&str> = o.key.split('/').skip(1).take(2).collect();
        let part = format!(
            "{}/{}",
            dt_hr[0].trim_start_matches("dt="),
            dt_hr[1].trim_start_matches("hr=")
        );
        *by_hour.entry(part).or_insert(0) += o.lines.len() as u64;
    }
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(
            w[0].1 < w[1].0,
            "objects overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    (tally, by_hour)
}

/// Every message of `devices` x `per_device` is in the tally exactly once.
fn assert_each_once(tally: &Tally, devices: u32, per_device: u32) {
    for d in 0..devices {
        for s in 0..per_device {
            assert_eq!(
                tally.get(&(topic_of(d), payload(d, s))),
                Some(&1),
                "device {d} message {s} is in the objects once"
            );
        }
    }
}

fn lake(acc: &edgeship::spool::Accounting) -> edgeship::spool::store::Terms {
    acc.destinations
        .get("telemetry/lake")
        .cloned()
        .unwrap_or_default()
}

/// 200,000 messages through one route into a Kinesis stream and an S3 bucket (moto): every
/// message is in the stream and in exactly one object; keys are Hive partitions of the
/// receive hour named by their first and last record; DuckDB reads the downloaded objects
/// with `hive_partitioning` and counts the same rows per hour.
#[test]
fn a_route_feeds_kinesis_and_s3_and_duckdb_reads_every_record_back() {
    let Rig {
        dir, rt, client, ..
    } = rig("e2e-s3-stream", 1);
    let s3 = S3Server::moto(dir.path());
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    let mosquitto = Mosquitto::start(dir.path());
    let config = config_with_lake(
        dir.path(),
        mosquitto.port,
        &kinesis().endpoint(),
        "e2e-s3-stream",
        &format!(
            "bucket = \"lake\"\nendpoint = \"{}\"\nmax_object_bytes = \"8MiB\"\nmax_object_age = \"5s\"",
            s3.endpoint()
        ),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device) = (100, 2_000);
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
    ));
    let stream = wait_stream_complete(
        &rt,
        &client,
        "e2e-s3-stream",
        devices,
        per_device,
        Duration::from_secs(300),
    );
    let acc = wait_for(
        "the lake to take every record",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| lake(a).delivered >= 200_000 && a.pending == 0)
        },
    );
    assert!(acc.balances(), "{acc:?}");
    assert_eq!((acc.received, acc.dropped), (200_000, 0), "{acc:?}");

    let folder = dir.path().join("fetched");
    let objects = fetch(&s3.endpoint(), "lake", &folder);
    let uploads = s3_tool(&[&s3.endpoint(), "uploads", "lake"]);
    assert_eq!(
        uploads["uploads"],
        serde_json::json!([]),
        "no multipart upload left"
    );
    let (tally, by_hour) = check_objects(&objects);
    assert_each_once(&tally, devices, per_device);
    assert_eq!(tally.values().sum::<u32>(), 200_000);
    // 200,000 messages of ~230 bytes make ~46 MB spooled: objects of 8 MiB or 5 s, not
    // thousands of small ones.
    assert!(
        (6..=60).contains(&objects.len()),
        "{} objects",
        objects.len()
    );

    let counted = s3_tool(&["-", "duckdb", folder.to_str().unwrap(), "**/*.ndjson.zst"]);
    assert_eq!(counted["rows"], 200_000, "{counted}");
    assert_eq!(counted["ids"], 200_000, "{counted}");
    let duck: BTreeMap<String, u64> = serde_json::from_value(counted["by_hour"].clone()).unwrap();
    assert_eq!(duck, by_hour, "DuckDB's rows per dt/hr partition");
    eprintln!(
        "s3: {} objects, {} records, by hour {by_hour:?}; stream {} messages",
        objects.len(),
        tally.values().sum::<u32>(),
        stream.messages.len()
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// A multipart upload cut by kill -9 (s3s-fs, which refuses parts under 5 MiB, behind a slow
/// link): after the restart the upload resumes under the key fixed before it began, the
/// object is whole, no record is missing or in two objects, and no upload is left open. The
/// S3 link is then cut while Kinesis goes on taking every record; the bucket drains after.
#[test]
fn a_multipart_upload_cut_by_kill_9_resumes_and_s3_down_does_not_hold_back_kinesis() {
    let Rig {
        dir, rt, client, ..
    } = rig("e2e-s3-kill", 1);
    let s3 = S3Server::s3s_fs(dir.path());
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    // 2 MB/s: a 5 MiB part takes over two seconds.
    let link = Uplink::start_limited(s3.port, 2_000_000);
    let mosquitto = Mosquitto::start(dir.path());
    let config = config_with_lake(
        dir.path(),
        mosquitto.port,
        &kinesis().endpoint(),
        "e2e-s3-kill",
        &format!(
            "bucket = \"lake\"\nendpoint = \"{}\"\nmax_object_bytes = \"24MiB\"\nmax_object_age = \"3s\"\npart_bytes = \"5MiB\"",
            link.endpoint()
        ),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    // Incompressible payloads (noise, written as base64): 20 devices x 1,000 x 1 KiB make
    // objects of several parts.
    let (devices, per_device) = (20, 1_000);
    let noisy = |d: u32, s: u32| noise(d, s, 1024);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        noisy,
        "",
    ));
    let (key, parts) = wait_for(
        "a multipart upload with a part uploaded",
        Duration::from_secs(120),
        || {
            let (key, upload_id, parts) = recorded_upload(&agent)?;
            (upload_id.is_some() && parts >= 1).then_some((key, parts))
        },
    );
    agent.kill();
    let cut = agent.accounting().expect("accounting");
    assert!(lake(&cut).pending > 0, "the kill cut an upload: {cut:?}");
    agent.spawn();
    agent.wait_connected(2);
    let acc = wait_for(
        "the lake to take every record",
        Duration::from_secs(180),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
    let log = agent.log();
    assert!(
        log.contains("resuming the upload of an object"),
        "the restarted agent resumed the recorded upload"
    );
    // Encoded again from the same records, the uploaded parts matched: not sent twice.
    assert!(
        !log.contains("records changed since its upload began"),
        "the resumed upload started over: {log}"
    );

    // S3 down: Kinesis takes the next 5,000 meanwhile, the bucket's backlog waits.
    link.cut();
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        250,
        Arc::new(AtomicU64::new(0)),
        payload,
        "b-",
    ));
    let stream =
        wait_stream_complete_with(&rt, &client, "e2e-s3-kill", Duration::from_secs(180), |t| {
            (0..devices).all(|d| (0..250).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
        });
    let during = agent.accounting().expect("accounting");
    assert!(
        lake(&during).pending >= 5_000,
        "the bucket's backlog is spooled while S3 is down: {during:?}"
    );
    link.restore();
    let acc = wait_for("the lake to drain", Duration::from_secs(180), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");

    let objects = fetch(&s3.endpoint(), "lake", &dir.path().join("fetched"));
    let (tally, _) = check_objects(&objects);
    assert!(
        objects.iter().any(|o| o.key == key),
        "the object cut by the kill is under the key fixed before its upload, {key}"
    );
    // At least once: what the kill cut before its ack may come twice (the broker's
    // redelivery); every message is there.
    for d in 0..devices {
        for s in 0..per_device {
            assert!(
                tally.contains_key(&(topic_of(d), noisy(d, s))),
                "device {d} message {s}"
            );
        }
        for s in 0..250 {
            assert!(
                tally.contains_key(&(topic_of(d), payload(d, s))),
                "device {d} message {s} (b)"
            );
        }
    }
    let twice = tally.values().filter(|n| **n > 1).count();
    assert!(twice < 1_000, "{twice} messages twice");
    // No part left behind: the resumed upload completed (or the first was aborted).
    let left: Vec<String> = std::fs::read_dir(dir.path().join("s3s-root"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".upload_id-") && n.contains(".part-"))
        .collect();
    assert!(left.is_empty(), "parts of unfinished uploads: {left:?}");
    eprintln!(
        "s3 kill: {} objects; {} parts were uploaded at the kill; stream {} messages",
        objects.len(),
        parts,
        stream.messages.len()
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// The S3 upload the agent recorded in its spool: its key, its upload id (once S3 gave one)
/// and how many parts it recorded.
fn recorded_upload(agent: &Agent) -> Option<(String, Option<String>, usize)> {
    let (_copy, conn) = agent.spool_copy()?;
    conn.query_row(
        "SELECT key, upload_id, parts FROM uploads WHERE destination = 'lake'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?.lines().count())),
    )
    .ok()
}

/// An agent killed (-9) in the middle of a multipart upload to moto, with what it recorded.
struct CutUpload {
    agent: Agent,
    mosquitto: Mosquitto,
    s3: S3Server,
    /// The 2 MB/s link between the agent and moto (kept open for the restarted agent).
    link: Uplink,
    key: String,
    upload_id: String,
}

/// The incompressible messages [`cut_upload`] publishes: 20 devices x 1,000 x 1 KiB.
const CUT_DEVICES: u32 = 20;
const CUT_PER_DEVICE: u32 = 1_000;
fn cut_noise(d: u32, s: u32) -> Vec<u8> {
    noise(d, s, 1024)
}

/// Starts an agent feeding only the bucket `lake` on moto through a 2 MB/s link, publishes
/// [`cut_noise`] messages (objects of several 5 MiB parts) and kills it with -9 once its
/// upload has a part recorded.
fn cut_upload(dir: &Path, rt: &tokio::runtime::Runtime) -> CutUpload {
    let s3 = S3Server::moto(dir);
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    let link = Uplink::start_limited(s3.port, 2_000_000);
    let mosquitto = Mosquitto::start(dir);
    let config = lake_only_config(
        dir,
        mosquitto.port,
        &format!(
            "bucket = \"lake\"\nendpoint = \"{}\"\nmax_object_bytes = \"24MiB\"\nmax_object_age = \"3s\"\npart_bytes = \"5MiB\"",
            link.endpoint()
        ),
    );
    let mut agent = Agent::start(dir, &config);
    agent.wait_connected(1);
    rt.block_on(publish_with(
        mosquitto.port,
        CUT_DEVICES,
        CUT_PER_DEVICE,
        Arc::new(AtomicU64::new(0)),
        cut_noise,
        "",
    ));
    let (key, upload_id) = wait_for(
        "a multipart upload with a part uploaded",
        Duration::from_secs(120),
        || {
            let (key, upload_id, parts) = recorded_upload(&agent)?;
            (parts >= 1).then_some((key, upload_id?))
        },
    );
    agent.kill();
    CutUpload {
        agent,
        mosquitto,
        s3,
        link,
        key,
        upload_id,
    }
}

/// Incomplete multipart uploads left in `bucket`.
fn open_uploads(s3: &S3Server, bucket: &str) -> serde_json::Value {
    s3_tool(&[&s3.endpoint(), "uploads", bucket])["uploads"].clone()
}

/// How many of the [`cut_noise`] messages are in the tally (each counted once).
fn cut_noise_found(tally: &Tally) -> u64 {
    let mut found = 0;
    for d in 0..CUT_DEVICES {
        for s in 0..CUT_PER_DEVICE {
            found += u64::from(tally.contains_key(&(topic_of(d), cut_noise(d, s))));
        }
    }
    found
}

/// The multipart upload recorded in the spool was aborted while the agent was down (as a
/// bucket's lifecycle rule does): the restarted agent finds S3 no longer knows it (moto
/// answers its parts with HTTP 500, not `NoSuchUpload`: the agent asks `ListParts`), uploads
/// the object again under the same key, and every message arrives; no upload is left open.
#[test]
fn an_upload_s3_forgot_while_the_agent_was_down_starts_again_under_its_key() {
    let dir = tempdir();
    let rt = runtime();
    let CutUpload {
        mut agent,
        mosquitto: _mosquitto,
        s3,
        link: _link,
        key,
        upload_id,
    } = cut_upload(dir.path(), &rt);
    s3_tool(&[&s3.endpoint(), "abort", "lake", &key, &upload_id]);
    agent.spawn();
    agent.wait_connected(2);
    let acc = wait_for(
        "the lake to take every record",
        Duration::from_secs(180),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
    let log = agent.log();
    assert!(
        log.contains("S3 no longer knows the multipart upload")
            && log.contains("records changed since its upload began"),
        "the resumed upload found S3 had forgotten it and started again"
    );
    let objects = fetch(&s3.endpoint(), "lake", &dir.path().join("fetched"));
    let (tally, _) = check_objects(&objects);
    assert!(
        objects.iter().any(|o| o.key == key),
        "the object is under the key fixed before its first upload, {key}"
    );
    assert_eq!(
        cut_noise_found(&tally),
        u64::from(CUT_DEVICES * CUT_PER_DEVICE),
        "every message is in the bucket"
    );
    assert_eq!(open_uploads(&s3, "lake"), serde_json::json!([]));
    assert_eq!(agent.stop().code(), Some(0));
}

/// The blocks of a recorded upload evicted from a full spool (`drop_oldest`) while the
/// restarted agent waited for its upload window: the object is encoded again from the
/// records left, its old upload aborted, and it goes up under the same key; the evicted
/// records are counted dropped, the rest arrive, no upload is left open.
#[test]
fn a_recorded_upload_whose_records_were_evicted_starts_again_under_its_key() {
    let dir = tempdir();
    let rt = runtime();
    let CutUpload {
        mut agent,
        mosquitto,
        s3,
        link: _link,
        key,
        ..
    } = cut_upload(dir.path(), &rt);
    // Restarted with a spool capped below its backlog and a window opening in a minute or
    // two: the object waits, and new records evict its first blocks meanwhile.
    let (minute, second) = local_now();
    let start = (minute + 1 + u32::from(second > 40)) % 1440;
    let end = (start + 60) % 1440;
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    );
    let config = std::fs::read_to_string(&agent.config_path)
        .unwrap()
        .replace(
            "[spool]\n",
            "[spool]\nmax_bytes = \"8MiB\"\nfull_policy = \"drop_oldest\"\n",
        )
        .replace(
            "prefix = \"telemetry\"\n",
            &format!("prefix = \"telemetry\"\nupload_windows = [\"{window}\"]\n"),
        );
    std::fs::write(&agent.config_path, config).unwrap();
    agent.spawn();
    agent.wait_connected(2);
    rt.block_on(publish_with(
        mosquitto.port,
        CUT_DEVICES,
        100,
        Arc::new(AtomicU64::new(0)),
        payload,
        "b-",
    ));
    let during = wait_for(
        "records evicted from the full spool",
        Duration::from_secs(60),
        || agent.accounting().filter(|a| lake(a).dropped > 0),
    );
    let acc = wait_for(
        "the window to open and the lake to take the rest",
        Duration::from_secs(240),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert!(acc.balances(), "{acc:?}");
    let (m, _) = local_now();
    assert!((m + 1440 - start) % 1440 <= 60, "uploaded inside {window}");
    assert!(
        agent
            .log()
            .contains("records changed since its upload began"),
        "the resumed upload found its records changed and started again"
    );
    let mut objects = fetch(&s3.endpoint(), "lake", &dir.path().join("fetched"));
    // The cut object keeps its key; what is left of it lies within the range the key names,
    // its first records evicted.
    let cut = objects
        .iter_mut()
        .find(|o| o.key == key)
        .unwrap_or_else(|| panic!("the object is under the key fixed before, {key}"));
    let seq = |id: &str| -> u64 { id.rsplit(':').next().unwrap().parse().unwrap() };
    let (first, last) = (seq(&cut.lines[0].0), seq(&cut.lines.last().unwrap().0));
    assert!(
        cut.first_seq < first && last <= cut.last_seq,
        "{key} holds {first}..={last}, after its evicted first records"
    );
    (cut.first_seq, cut.last_seq) = (first, last);
    let (tally, _) = check_objects(&objects);
    assert_each_once(&tally, CUT_DEVICES, 100);
    let dropped = lake(&acc).dropped;
    assert!(dropped >= lake(&during).dropped && dropped > 0, "{acc:?}");
    assert!(
        cut_noise_found(&tally) + dropped >= u64::from(CUT_DEVICES * CUT_PER_DEVICE),
        "every message not counted dropped is in the bucket: {} found, {dropped} dropped",
        cut_noise_found(&tally)
    );
    assert_eq!(open_uploads(&s3, "lake"), serde_json::json!([]));
    assert_eq!(agent.stop().code(), Some(0));
}

/// A bucket that does not exist: the agent says so (status names the bucket's error), keeps
/// every record spooled, and uploads them all once the bucket is there.
#[test]
fn a_missing_bucket_is_named_in_status_and_nothing_is_lost() {
    let dir = tempdir();
    let rt = runtime();
    let s3 = S3Server::moto(dir.path());
    let mosquitto = Mosquitto::start(dir.path());
    let config = lake_only_config(
        dir.path(),
        mosquitto.port,
        &format!(
            "bucket = \"not-yet\"\nendpoint = \"{}\"\nmax_object_age = \"1s\"",
            s3.endpoint()
        ),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(publish(
        mosquitto.port,
        10,
        100,
        Arc::new(AtomicU64::new(0)),
    ));
    let status = wait_for(
        "status to name the missing bucket",
        Duration::from_secs(60),
        || {
            let (_, body) = agent.get("/status")?;
            body.contains("NoSuchBucket").then_some(body)
        },
    );
    let acc = agent.accounting().expect("accounting");
    assert_eq!((acc.pending, acc.dropped), (1_000, 0), "{status}\n{acc:?}");

    s3_tool(&[&s3.endpoint(), "mkbucket", "not-yet"]);
    let acc = wait_for(
        "the bucket to take the backlog",
        Duration::from_secs(120),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (1_000, 0), "{acc:?}");
    let objects = fetch(&s3.endpoint(), "not-yet", &dir.path().join("fetched"));
    let (tally, _) = check_objects(&objects);
    assert_each_once(&tally, 10, 100);
    assert_eq!(agent.stop().code(), Some(0));
}

/// `format = "parquet"` (cargo feature `parquet`): objects pyarrow reads as one dataset with
/// hive partitioning, every message in it once.
#[cfg(feature = "parquet")]
#[test]
fn parquet_objects_are_read_back_by_pyarrow_with_every_record() {
    let dir = tempdir();
    let rt = runtime();
    let s3 = S3Server::moto(dir.path());
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    let mosquitto = Mosquitto::start(dir.path());
    let config = lake_only_config(dir.path(), mosquitto.port, &format!(
            "bucket = \"lake\"\nendpoint = \"{}\"\nformat = \"parquet\"\nmax_object_bytes = \"2MiB\"\nmax_object_age = \"3s\"",
            s3.endpoint()
        ));
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let (devices, per_device) = (20, 1_000);
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
    ));
    let acc = wait_for(
        "the lake to take every record",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| a.pending == 0 && a.received >= 20_000)
        },
    );
    assert_eq!((acc.delivered, acc.dropped), (20_000, 0), "{acc:?}");
    let folder = dir.path().join("fetched");
    std::fs::create_dir_all(&folder).unwrap();
    let listed = s3_tool(&[&s3.endpoint(), "fetch", "lake", folder.to_str().unwrap()]);
    let keys: Vec<String> = serde_json::from_value(listed["keys"].clone()).unwrap();
    assert!(keys.len() > 1, "objects of 2 MiB of records: {keys:?}");
    for key in &keys {
        assert!(
            key.starts_with("telemetry/dt=") && key.contains("/hr=") && key.ends_with(".parquet"),
            "{key}"
        );
    }
    let read = s3_tool(&["-", "parquet", folder.join("telemetry").to_str().unwrap()]);
    assert_eq!(
        (read["rows"].as_u64(), read["ids"].as_u64()),
        (Some(20_000), Some(20_000))
    );
    let mut tally: Tally = BTreeMap::new();
    for r in read["records"].as_array().unwrap() {
        let topic = r[0].as_str().unwrap().to_string();
        let payload = r[1].as_str().unwrap().as_bytes().to_vec();
        *tally.entry((topic, payload)).or_insert(0) += 1;
    }
    assert_each_once(&tally, devices, per_device);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Credentials the bucket refuses (s3s-fs with another secret): status says S3's answer, the
/// records stay spooled; with the right credentials after a restart they all arrive.
#[test]
fn refused_credentials_are_named_in_status_and_nothing_is_lost() {
    let dir = tempdir();
    let rt = runtime();
    let s3 = S3Server::s3s_fs(dir.path());
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    let mosquitto = Mosquitto::start(dir.path());
    let config = lake_only_config(
        dir.path(),
        mosquitto.port,
        &format!(
            "bucket = \"lake\"\nendpoint = \"{}\"\nmax_object_age = \"1s\"",
            s3.endpoint()
        ),
    );
    let mut agent = Agent::start_with_env(
        dir.path(),
        &config,
        &[("AWS_SECRET_ACCESS_KEY", Some("not-the-secret"))],
    );
    agent.wait_connected(1);
    rt.block_on(publish(mosquitto.port, 10, 50, Arc::new(AtomicU64::new(0))));
    let status = wait_for(
        "status to say S3 refused the request",
        Duration::from_secs(60),
        || {
            let (_, body) = agent.get("/status")?;
            (body.contains("SignatureDoesNotMatch") || body.contains("AccessDenied"))
                .then_some(body)
        },
    );
    let acc = agent.accounting().expect("accounting");
    assert_eq!((acc.pending, acc.dropped), (500, 0), "{status}\n{acc:?}");
    assert_eq!(agent.stop().code(), Some(0));

    agent.env.clear();
    agent.spawn();
    let acc = wait_for(
        "the bucket to take the backlog",
        Duration::from_secs(120),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (500, 0), "{acc:?}");
    let objects = fetch(&s3.endpoint(), "lake", &dir.path().join("fetched"));
    let (tally, _) = check_objects(&objects);
    assert_each_once(&tally, 10, 50);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Local time now: (minutes after midnight, seconds into the minute).
fn local_now() -> (u32, u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    assert!(!unsafe { libc::localtime_r(&now, &mut tm) }.is_null());
    ((tm.tm_hour * 60 + tm.tm_min) as u32, tm.tm_sec as u32)
}

/// `upload_windows` that opens a minute or two from now: objects close and wait in the spool
/// (nothing in the bucket) until the window opens, then all go up.
#[test]
fn outside_the_upload_windows_objects_wait_in_the_spool() {
    let dir = tempdir();
    let rt = runtime();
    let s3 = S3Server::moto(dir.path());
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    let mosquitto = Mosquitto::start(dir.path());
    let (minute, second) = local_now();
    // The next minute, or the one after if this one is nearly over (time to publish first).
    let start = (minute + 1 + u32::from(second > 40)) % 1440;
    let end = (start + 60) % 1440;
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    );
    let config = lake_only_config(dir.path(), mosquitto.port, &format!(
            "bucket = \"lake\"\nendpoint = \"{}\"\nmax_object_age = \"1s\"\nupload_windows = [\"{window}\"]",
            s3.endpoint()
        ));
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(publish(mosquitto.port, 10, 50, Arc::new(AtomicU64::new(0))));
    wait_for(
        "an object to wait for its window",
        Duration::from_secs(60),
        || {
            agent
                .log()
                .contains("outside the upload windows")
                .then_some(())
        },
    );
    let listed = s3_tool(&[
        &s3.endpoint(),
        "fetch",
        "lake",
        dir.path().join("early").to_str().unwrap(),
    ]);
    assert_eq!(
        listed["keys"],
        serde_json::json!([]),
        "nothing uploaded before {window}"
    );
    assert_eq!(agent.accounting().expect("accounting").pending, 500);
    let acc = wait_for(
        "the window to open and the objects to go up",
        Duration::from_secs(180),
        || agent.accounting().filter(|a| a.pending == 0),
    );
    assert_eq!((acc.delivered, acc.dropped), (500, 0), "{acc:?}");
    let (m, _) = local_now();
    assert!((m + 1440 - start) % 1440 <= 60, "uploaded inside {window}");
    let objects = fetch(&s3.endpoint(), "lake", &dir.path().join("fetched"));
    let (tally, _) = check_objects(&objects);
    assert_each_once(&tally, 10, 50);
    assert_eq!(agent.stop().code(), Some(0));
}

/// `compression = "gzip"` with SSE-KMS (moto): `.ndjson.gz` objects that gzip readers
/// decode to every line, each stored encrypted with the configured KMS key.
#[test]
fn gzip_objects_with_an_sse_kms_key() {
    let dir = tempdir();
    let rt = runtime();
    let s3 = S3Server::moto(dir.path());
    s3_tool(&[&s3.endpoint(), "mkbucket", "lake"]);
    let mosquitto = Mosquitto::start(dir.path());
    let lake = format!(
        "bucket = \"lake\"\nendpoint = \"{}\"\ncompression = \"gzip\"\nsse_kms_key_id = \"alias/telemetry\"\nmax_object_bytes = \"64KiB\"\nmax_object_age = \"2s\"",
        s3.endpoint()
    );
    let config = lake_only_config(dir.path(), mosquitto.port, &lake);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(publish(
        mosquitto.port,
        10,
        200,
        Arc::new(AtomicU64::new(0)),
    ));
    let acc = wait_for(
        "the bucket to take every record",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| a.pending == 0 && a.received >= 2_000)
        },
    );
    assert_eq!((acc.delivered, acc.dropped), (2_000, 0), "{acc:?}");
    let objects = fetch(&s3.endpoint(), "lake", &dir.path().join("fetched"));
    assert!(objects.len() > 1, "objects of 64 KiB of records");
    assert!(objects.iter().all(|o| o.key.ends_with(".ndjson.gz")));
    let (tally, _) = check_objects(&objects);
    assert_each_once(&tally, 10, 200);
    let heads = s3_tool(&[&s3.endpoint(), "heads", "lake"]);
    for o in &objects {
        assert_eq!(
            heads[&o.key],
            serde_json::json!({"sse": "aws:kms", "kms_key": "alias/telemetry", "type": "application/x-ndjson"}),
            "{}",
            o.key
        );
    }
    assert_eq!(agent.stop().code(), Some(0));
}
