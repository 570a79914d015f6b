//! The budget in the shapes gateways run: one table of the figures DESIGN.md section 3 names,
//! one row per shape of traffic, measured against real Mosquitto, the real Kinesis emulator and
//! the agent as a separate process, all on loopback.
//!
//! ```text
//! cargo bench --bench shapes                      # full run: every shape below
//! cargo bench --bench shapes -- --quick           # a smoke test of every shape, rough figures
//! cargo bench --bench shapes -- --format kpl      # the route's frames in the KPL format
//! cargo bench --bench shapes -- --only 3.1.1      # the shapes whose name holds "3.1.1"
//! cargo bench --bench shapes -- --skip "10000 devices, saturating" --messages 200000
//! cargo bench --bench shapes -- --only "20 msg/s" --spool 'commit_max_wait = "5s"'
//! cargo bench --bench shapes -- --only "1000 msg/s" --broker 'set_tcp_nodelay true'
//! cargo bench --bench shapes -- --only "20 msg/s" --batch 'linger = "10s"'
//! cargo bench --bench shapes -- --destinations 2  # the route feeds a second stream too
//! cargo bench --bench shapes -- --shards 4        # streams of 4 shards (default 1)
//! cargo bench --bench shapes -- --s3 30s           # ... and an S3 bucket (moto), objects
//!                                                  # closing at 30 s or 64 MiB of records
//! cargo bench --bench shapes -- --firehose         # ... and a Firehose delivery stream (moto)
//! cargo bench --bench shapes -- --kafka            # ... and a Kafka topic (tansu, 4 partitions)
//! cargo bench --bench shapes -- --kafka --alone    # the topic instead of the stream: the
//!                                                  # agent's figures are Kafka's own
//! ```
//!
//! A shape is the agent's MQTT protocol, its route's partition key (`{gateway}`, or
//! `{topic[1]}` so each device's records keep their order on one shard), how many devices
//! publish (10,000 devices are 10,000 topics over at most 50 connections) and the offered rate
//! (as fast as the broker takes it, 1,000 msg/s, 20 msg/s; at a fixed rate the connections
//! publish in turn, spread over time, not in bursts). Every payload is telemetry JSON of
//! about 200 bytes whose values change with every message. Just before and just after each
//! saturating shape the broker's rate to a do-nothing QoS 1 subscriber of its protocol, taking
//! the same traffic, is measured, and the shape's end-to-end rate is given as a share of the
//! two's mean (the broker routes 10,000 topics slower than 100, and on a shared machine its
//! rate drifts over minutes: both are printed). At a fixed rate such a
//! subscriber takes the same messages beside the agent, on a thread of its own, and the
//! agent's CPU per message is given beside that subscriber's: at a low rate most of a
//! message's cost is waking up for it, which the machine sets.
//!
//! Per shape: a fresh agent and stream (one shard, or `--shards`), every message published, the
//! agent left to ship until Kinesis accepted them all; the stream is then read back and every
//! message found (the program fails if one is missing). Two rates are reported: ingest (every
//! message stored in the spool, so acked) and end to end (every message accepted by Kinesis);
//! a shard takes 1 MiB/s, so with one shard a fast machine's end-to-end rate is the shard's.
//! Where the machine went is printed per shape too: the cores each process kept busy, the
//! cores idle, waiting on the disk and taken by the host, and how much of the time the spool
//! spent committing (a slow commit fills the intake's window and the broker waits).
//! With `--alone` the route feeds only the Kafka topic or the Firehose delivery stream and the
//! stream's columns are empty: the delivery stream's objects are read back (every message
//! found once); the topic is checked by its end offsets and the records the agent saw
//! accepted (tansu reads 200,000 records back slower than the run). It asserts nothing about
//! speed.

// The JSON report is one `json!` literal, nested deeper than the macro's default limit.
#![recursion_limit = "256"]

#[path = "../tests/e2e/support.rs"]
mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

/// Publishing connections at most: devices beyond are topics shared over them.
const MAX_CONNECTIONS: u32 = 50;

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyBy {
    Gateway,
    Device,
}

#[derive(Clone, Copy)]
struct Shape {
    protocol: &'static str,
    key: KeyBy,
    devices: u32,
    /// Messages per second offered, or `None` for as fast as the broker takes them.
    rate: Option<u32>,
}

impl Shape {
    fn name(&self) -> String {
        format!(
            "{} {} key, {} devices, {}",
            match self.protocol {
                "5" => "MQTT 5",
                _ => "MQTT 3.1.1",
            },
            match self.key {
                KeyBy::Gateway => "{gateway}",
                KeyBy::Device => "device",
            },
            self.devices,
            match self.rate {
                None => "saturating".to_string(),
                Some(r) => format!("{r} msg/s"),
            }
        )
    }
}

/// The matrix the issue of record asks for: both protocols saturating with either key, the
/// per-device key with 100 and 10,000 devices, and the low rates.
fn matrix() -> Vec<Shape> {
    let s = |protocol, key, devices, rate| Shape {
        protocol,
        key,
        devices,
        rate,
    };
    use KeyBy::*;
    vec![
        s("5", Gateway, 100, None),
        s("3.1.1", Gateway, 100, None),
        s("5", Device, 100, None),
        s("3.1.1", Device, 100, None),
        s("5", Device, 10_000, None),
        s("3.1.1", Device, 10_000, None),
        s("3.1.1", Gateway, 100, Some(1_000)),
        s("3.1.1", Device, 100, Some(1_000)),
        s("3.1.1", Device, 10_000, Some(1_000)),
        s("3.1.1", Gateway, 100, Some(20)),
        s("3.1.1", Device, 100, Some(20)),
        s("3.1.1", Device, 10_000, Some(20)),
    ]
}

struct Args {
    quick: bool,
    /// Messages per saturating shape.
    messages: u64,
    /// Seconds per fixed-rate shape.
    seconds: u64,
    format: String,
    only: Option<String>,
    skip: Option<String>,
    json: Option<PathBuf>,
    /// Settings added to the agent's `[spool]` (`--spool 'commit_max_wait = "2s"'`).
    spool: Vec<String>,
    /// Lines added to the broker's configuration (`--broker 'set_tcp_nodelay true'`).
    broker: Vec<String>,
    /// Settings added to the agent's `[batch]` (`--batch 'linger = "10s"'`).
    batch: Vec<String>,
    /// 2: the route also feeds a second stream (one copy in the spool, two cursors); every
    /// message is looked for in both.
    destinations: u32,
    /// The route also feeds an S3 bucket (moto) whose objects close at this age (or at the
    /// default 64 MiB of records); S3 figures are reported.
    s3_age: Option<String>,
    /// The route also feeds a Firehose delivery stream (moto, into a bucket it serves);
    /// Firehose figures are reported.
    firehose: bool,
    /// The route also feeds a Kafka topic of 4 partitions (tansu, through a counting proxy);
    /// Kafka figures are reported.
    kafka: bool,
    /// The route feeds only the destination `--kafka` or `--firehose` adds, not the stream:
    /// end to end, CPU, disk and RSS are that destination's own.
    alone: bool,
    /// Shards of each shape's stream. One shard takes 1 MiB/s, which the saturating shapes
    /// exceed on a fast machine: with more, the end-to-end rate of a per-device key is the
    /// agent's and not the shard's (a `{gateway}` key stays on one shard whatever the count).
    shards: i32,
}

fn parse_args() -> Args {
    let mut a = Args {
        quick: false,
        messages: 1_000_000,
        seconds: 60,
        format: "edgeship".into(),
        only: None,
        skip: None,
        json: None,
        spool: Vec::new(),
        broker: Vec::new(),
        batch: Vec::new(),
        destinations: 1,
        s3_age: None,
        firehose: false,
        kafka: false,
        alone: false,
        shards: 1,
    };
    let mut explicit = (false, false);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--messages" => {
                a.messages = value("--messages").parse().expect("--messages N");
                explicit.0 = true;
            }
            "--seconds" => {
                a.seconds = value("--seconds").parse().expect("--seconds N");
                explicit.1 = true;
            }
            "--format" => a.format = value("--format"),
            "--only" => a.only = Some(value("--only")),
            "--skip" => a.skip = Some(value("--skip")),
            "--json" => a.json = Some(PathBuf::from(value("--json"))),
            "--spool" => a.spool.push(value("--spool")),
            "--broker" => a.broker.push(value("--broker")),
            "--batch" => a.batch.push(value("--batch")),
            "--destinations" => {
                a.destinations = value("--destinations")
                    .parse()
                    .ok()
                    .filter(|n| (1..=2).contains(n))
                    .expect("--destinations 1 or 2")
            }
            "--s3" => a.s3_age = Some(value("--s3")),
            "--firehose" => a.firehose = true,
            "--kafka" => a.kafka = true,
            "--alone" => a.alone = true,
            "--shards" => {
                a.shards = value("--shards")
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .expect("--shards N (1 or more)")
            }
            // cargo bench passes --bench; ignore harness flags.
            _ => {}
        }
    }
    assert!(
        !a.alone || (a.kafka != a.firehose && a.s3_age.is_none() && a.destinations == 1),
        "--alone goes with one of --kafka or --firehose, and no other destination"
    );
    if a.quick {
        if !explicit.0 {
            a.messages = 20_000;
        }
        if !explicit.1 {
            a.seconds = 3;
        }
    }
    a
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// About 200 bytes of telemetry JSON whose readings change with every message (a hash of the
/// device and the message number), stamped with its publish time.
fn fresh_payload(device: u32, seq: u32) -> Vec<u8> {
    let mut x = (u64::from(device) << 32 | u64::from(seq)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = |range: u64| {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 32;
        x % range
    };
    format!(
        r#"{{"device":"dev-{device:05}","seq":{seq},"temp_c":{}.{:02},"humidity_pct":{}.{},"pressure_kpa":{}.{:02},"vibration_mm_s":0.{:03},"battery_v":3.{:02},"status":"ok","fw":"2.4.1","pub_ms":{}}}"#,
        15 + next(15),
        next(100),
        30 + next(40),
        next(10),
        99 + next(4),
        next(100),
        next(1000),
        next(100),
        now_ms()
    )
    .into_bytes()
}

/// (device, seq, publish time) of a payload `fresh_payload` made.
fn parse_payload(payload: &[u8]) -> Option<(u32, u32, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let field = |name: &str| -> Option<&str> {
        let at = text.find(name)? + name.len();
        let rest = &text[at..];
        Some(&rest[..rest.find([',', '}', '"'])?])
    };
    Some((
        field("\"device\":\"dev-")?.parse().ok()?,
        field("\"seq\":")?.parse().ok()?,
        field("\"pub_ms\":")?.parse().ok()?,
    ))
}

/// Publishes `total` messages at QoS 1 for `devices` devices (topic `devices/dev-NNNNN/
/// telemetry`) over at most [`MAX_CONNECTIONS`] connections, round robin over each
/// connection's devices, at `rate` messages/s together or as fast as the broker takes them.
/// Returns, once the broker acked every one, the payload bytes published.
async fn publish_shape(
    port: u16,
    devices: u32,
    total: u64,
    rate: Option<u32>,
    prefix: String,
) -> u64 {
    let connections = devices.min(MAX_CONNECTIONS);
    // At a fixed rate each connection publishes once per `period`, connection c at c /
    // connections of the way into it, so the messages arrive spread over time the way many
    // devices' readings do, not in one burst per period.
    let start = tokio::time::Instant::now();
    let period = rate.map(|r| Duration::from_secs_f64(f64::from(connections) / f64::from(r)));
    let mut tasks = Vec::new();
    for c in 0..connections {
        // Connection c publishes for devices c, c + connections, ...; messages i = c + k *
        // connections of the whole run.
        let mine = (total + u64::from(connections - 1 - c)) / u64::from(connections);
        let own_devices: Vec<u32> = (c..devices).step_by(connections as usize).collect();
        let client_id = format!("{prefix}{c:02}-{}", std::process::id());
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(100);
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 200);
            let sender = tokio::spawn(async move {
                let mut tick = period.map(|p| {
                    let phase = p.mul_f64(f64::from(c) / f64::from(connections));
                    let mut t = tokio::time::interval_at(start + phase, p);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
                let mut bytes = 0u64;
                for k in 0..mine {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    let device = own_devices[(k % own_devices.len() as u64) as usize];
                    let seq = (k / own_devices.len() as u64) as u32;
                    let payload = fresh_payload(device, seq);
                    bytes += payload.len() as u64;
                    client
                        .publish(
                            format!("devices/dev-{device:05}/telemetry"),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            payload,
                        )
                        .await
                        .unwrap();
                }
                (client, bytes)
            });
            let deadline = Instant::now() + Duration::from_secs(3600);
            let mut acked = 0;
            while acked < mine {
                assert!(
                    Instant::now() < deadline,
                    "connection {c}: {acked} of {mine} acked"
                );
                match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(e)) => panic!("publisher {c}: {e}"),
                }
            }
            let (client, bytes) = sender.await.unwrap();
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while events.poll().await.is_ok() {}
            })
            .await;
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    bytes
}

/// The broker's rate to a do-nothing QoS 1 subscriber speaking `protocol`, for `total`
/// messages from `devices` devices published as a saturating shape publishes them: the broker
/// routes 10,000 topics slower than 100, and a shape is read against what the broker does for
/// the same traffic.
fn baseline(
    rt: &tokio::runtime::Runtime,
    port: u16,
    protocol: &str,
    devices: u32,
    total: u64,
) -> f64 {
    let subscriber = rt.block_on(do_nothing_subscriber(port, protocol, total));
    let start = Instant::now();
    rt.block_on(publish_shape(
        port,
        devices,
        total,
        None,
        format!("base{}-{devices}-", protocol.replace('.', "")),
    ));
    rt.block_on(subscriber).unwrap();
    total as f64 / start.elapsed().as_secs_f64()
}

/// The CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A do-nothing QoS 1 subscriber speaking `protocol` on a thread of its own (a one-thread
/// runtime), subscribed when this returns; the thread ends once it has taken `total` messages
/// and yields the CPU time it spent from its subscription on. At a fixed rate a message's cost
/// is mostly waking up to read and ack it, which this machine sets more than any agent: the
/// figure the agent's CPU per message is read against, measured on the same messages.
fn reference_subscriber(
    port: u16,
    protocol: &'static str,
    total: u64,
) -> std::thread::JoinHandle<f64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let subscriber = rt.block_on(do_nothing_subscriber(port, protocol, total));
        let before = thread_cpu_s();
        ready_tx.send(()).unwrap();
        rt.block_on(subscriber).unwrap();
        thread_cpu_s() - before
    });
    ready_rx
        .recv()
        .expect("the reference subscriber subscribed");
    thread
}

/// The figures of one shape.
struct Figures {
    messages: u64,
    msgs_per_s: f64,
    /// The broker's rate to a do-nothing subscriber of the same protocol and devices just
    /// before the shape and just after it (saturating).
    baseline: Option<(f64, f64)>,
    /// Messages stored in the spool per second, from the first publish to the last stored.
    ingest_per_s: f64,
    cpu_us_per_msg: f64,
    /// At a fixed rate, the CPU per message of a do-nothing QoS 1 subscriber of the same
    /// protocol taking the same messages beside the agent (see `reference_subscriber`).
    reference_us_per_msg: Option<f64>,
    disk_per_payload: f64,
    /// The stream's figures (`None` with `--alone`: the route did not feed it).
    stream: Option<StreamFigures>,
    peak_rss_mib: f64,
    cores: Cores,
    s3: Option<S3Figures>,
    firehose: Option<FirehoseFigures>,
    kafka: Option<KafkaFigures>,
}

impl Figures {
    /// `rate` over the mean of the two baseline rates (saturating).
    fn share(&self, rate: f64) -> Option<f64> {
        self.baseline
            .map(|(before, after)| rate / ((before + after) / 2.0))
    }
}

/// What the stream received, and when.
struct StreamFigures {
    kinesis_per_payload: f64,
    put_units_per_million: f64,
    kinesis_records: usize,
    /// Publish to accepted by Kinesis (the record's arrival time).
    accepted_p50_ms: u64,
    accepted_p99_ms: u64,
}

/// The objects a Firehose delivery stream wrote to its bucket.
struct FirehoseRead {
    /// Every JSON line's payload, in the objects' order.
    payloads: Vec<Vec<u8>>,
    /// The objects' bytes: the records as sent.
    sent: u64,
}

/// Fetches delivery stream `hose`'s objects into `folder` and takes each line's payload.
fn read_firehose(s3: &S3Server, hose: &str, folder: &std::path::Path) -> FirehoseRead {
    let listed = s3_tool(&[&s3.endpoint(), "fetch", hose, folder.to_str().unwrap()]);
    let keys: Vec<String> = serde_json::from_value(listed["keys"].clone()).unwrap();
    let mut read = FirehoseRead {
        payloads: Vec::new(),
        sent: 0,
    };
    for key in &keys {
        let data = std::fs::read(folder.join(key)).unwrap();
        read.sent += data.len() as u64;
        for line in std::str::from_utf8(&data).expect("JSON lines").lines() {
            let at = line.find(",\"payload\":").expect("JSON payloads") + 11;
            read.payloads
                .push(line.as_bytes()[at..line.len() - 1].to_vec());
        }
    }
    read
}

/// Where the machine went while the agent ran, from the first publish until Kinesis accepted
/// the last message: the cores each process kept busy (CPU seconds over wall seconds), the
/// cores left idle, and the time the spool spent committing.
struct Cores {
    agent: f64,
    broker: f64,
    emulator: f64,
    /// This program: the publishers and its polling of the spool's accounting (without the
    /// do-nothing subscriber it runs beside the agent at a fixed rate).
    program: f64,
    /// The whole machine (`/proc/stat`): cores idle, idle waiting on the disk, and taken by
    /// the host for others (steal).
    idle: f64,
    iowait: f64,
    steal: f64,
    /// Of the wall time, the share the spool spent committing, and commits that took more
    /// than 131 ms (2^17 us, an exported bound): while one lasts the intake's window fills
    /// and the broker waits for acks.
    committing: f64,
    slow_commits: u64,
}

/// The whole machine's idle, iowait and steal time since boot, in seconds.
fn machine_idle_s() -> [f64; 3] {
    let ticks = machine_cpu_ticks();
    [ticks[3], ticks[4], ticks[7]].map(|t| t as f64 / 100.0)
}

/// The spool's commit time so far (seconds) and how many commits took longer than 2^17 us
/// (131 ms, one of the bounds the agent exports).
fn commit_time(scrape: &Scrape) -> (f64, u64) {
    const SLOW_S: f64 = (1u64 << 17) as f64 / 1e6;
    let name = "edgeship_spool_commit_duration_seconds";
    let buckets = format!("{name}_bucket");
    let quick = scrape
        .samples
        .iter()
        .find(|(n, labels, _)| {
            *n == buckets
                && labels
                    .iter()
                    .any(|(k, v)| k == "le" && v.parse::<f64>() == Ok(SLOW_S))
        })
        .map(|(_, _, v)| *v)
        .expect("a commit duration bucket at 2^17 us");
    let all = scrape.sum(&format!("{name}_count"), &[]);
    (
        scrape.sum(&format!("{name}_sum"), &[]),
        (all - quick) as u64,
    )
}

/// The Kafka destination's figures.
struct KafkaFigures {
    /// Bytes the agent sent to the brokers (produce requests, metadata, all) over payload bytes.
    bytes_per_payload: f64,
    /// Produce requests per million messages.
    requests_per_million: f64,
    /// Records in the topic beyond one per message (resends).
    repeats: u64,
}

/// The Kafka broker every shape's topic is on, behind a proxy that counts what the agent sends.
struct KafkaSide {
    tansu: Tansu,
    link: Uplink,
}

/// The Firehose destination's figures.
struct FirehoseFigures {
    /// Record bytes sent (before base64) over payload bytes.
    bytes_per_payload: f64,
    /// Firehose records, and `PutRecordBatch` calls, per million messages.
    records_per_million: f64,
    calls_per_million: f64,
    /// Average record size: Firehose bills each record in 5 KB steps.
    record_bytes: f64,
}

/// The S3 destination's figures.
struct S3Figures {
    objects: usize,
    /// Object bytes (compressed) over payload bytes.
    bytes_per_payload: f64,
    /// S3 requests (PUT, multipart calls) per million messages.
    requests_per_million: f64,
    /// Records spooled per 64 MiB (the default object size): with the rate, how many
    /// objects an hour fill by size.
    records_per_default_object: f64,
}

/// `config` with its route also feeding destination `name` (whose section the caller adds).
fn also_to(config: &str, name: &str) -> String {
    config
        .replace("destination = \"stream\"", "destinations = [\"stream\"]")
        .replace(
            "destinations = [\"stream\"",
            &format!("destinations = [\"stream\", \"{name}\""),
        )
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[allow(clippy::too_many_arguments)]
fn run_shape(
    rt: &tokio::runtime::Runtime,
    index: usize,
    shape: Shape,
    args: &Args,
    dir: &std::path::Path,
    broker_port: u16,
    broker_pid: u32,
    s3: Option<&S3Server>,
    kafka: Option<&KafkaSide>,
) -> Figures {
    let kinesis = kinesis();
    let client = rt.block_on(kinesis_client(&kinesis.endpoint()));
    let total = match shape.rate {
        None => args.messages,
        Some(r) => u64::from(r) * args.seconds,
    }
    .max(u64::from(shape.devices.min(MAX_CONNECTIONS)));
    let stream = format!("shapes-{}-{index}", std::process::id());
    rt.block_on(create_stream(&client, &stream, args.shards));
    let gateway = format!("gw-shape-{index}");
    let agent_dir = dir.join(format!("shape-{index}"));
    std::fs::create_dir_all(&agent_dir).unwrap();
    let key = match shape.key {
        KeyBy::Gateway => "{gateway}",
        KeyBy::Device => "{topic[1]}",
    };
    let mut spool_settings = "max_bytes = \"2GiB\"".to_string();
    for setting in &args.spool {
        spool_settings += "\n";
        spool_settings += setting;
    }
    let copy = format!("{stream}-copy");
    let mut config = agent_config(
        &agent_dir,
        broker_port,
        &kinesis.endpoint(),
        &stream,
        &spool_settings,
        &format!("protocol = \"{}\"\nmax_unacked = 1000", shape.protocol),
    )
    .replace(
        "gateway_id = \"gw-test\"",
        &format!("gateway_id = \"{gateway}\""),
    )
    .replace("keep_alive = \"5s\"", "keep_alive = \"30s\"")
    // The shipped default linger, unless `--batch` sets one.
    .replace(
        "linger = \"200ms\"\n",
        &args
            .batch
            .iter()
            .map(|b| format!("{b}\n"))
            .collect::<String>(),
    )
    .replace(
        "partition_key = \"{topic[1]}\"",
        &format!("partition_key = \"{key}\"\nformat = \"{}\"", args.format),
    );
    if args.destinations == 2 {
        rt.block_on(create_stream(&client, &copy, args.shards));
        config = config.replace(
            "destination = \"stream\"",
            "destinations = [\"stream\", \"copy\"]",
        );
        config += &format!(
            "[destination.copy]\ntype = \"kinesis\"\nstream = \"{copy}\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\n",
            kinesis.endpoint()
        );
    }
    let bucket = format!("lake-{index}");
    let hose = format!("hose-{index}");
    if let (Some(s3), true) = (s3, args.firehose) {
        s3_tool(&[&s3.endpoint(), "mkbucket", &hose]);
        s3_tool(&[&s3.endpoint(), "mkfirehose", &hose, &hose]);
        config = also_to(&config, "hose")
            + &format!(
            "[destination.hose]\ntype = \"firehose\"\ndelivery_stream = \"{hose}\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\n",
            s3.endpoint()
        );
    }
    if let (Some(s3), Some(age)) = (s3, &args.s3_age) {
        s3_tool(&[&s3.endpoint(), "mkbucket", &bucket]);
        config = also_to(&config, "lake")
            + &format!(
            "[destination.lake]\ntype = \"s3\"\nbucket = \"{bucket}\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\npath_style = true\nprefix = \"shapes\"\nmax_object_age = \"{age}\"\n",
            s3.endpoint()
        );
    }
    let topic = format!("shapes-{index}");
    if let Some(k) = kafka {
        k.tansu.create_topic(&topic, 4);
        config = also_to(&config, "events")
            + &format!(
            "[destination.events]\ntype = \"kafka\"\nbrokers = [\"127.0.0.1:{}\"]\ntopic = \"{topic}\"\n",
            k.link.port
        );
    }
    if args.alone {
        config = config.replace("destinations = [\"stream\", ", "destinations = [");
    }
    let kafka_before = kafka.map(|k| {
        (
            k.link
                .upstream_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            k.link
                .kafka_produce_requests
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    let mut agent = Agent::start(&agent_dir, &config);
    agent.wait_connected(1);
    // Until a destination has learned its shards, commits store a block per device (see
    // spool/placement.rs) and the first frames go out one device each: measure from after.
    if !args.alone {
        wait_for(
            "the agent to learn its streams' shards",
            Duration::from_secs(60),
            || {
                (agent.log().matches("learned the stream's shards").count()
                    >= args.destinations as usize)
                    .then_some(())
            },
        );
    }
    let pid = agent.pid().unwrap();
    // The machine's other busy processes: what the agent's rate is measured against. The
    // emulator is the one the route feeds.
    let emulator_pid = match (args.alone, kafka, s3) {
        (true, Some(k), _) => k.tansu.pid().expect("tansu runs"),
        (true, None, Some(s3)) => s3.pid(),
        _ => kinesis.pid(),
    };
    let others = [broker_pid, emulator_pid, std::process::id()];
    let others_before = others.map(|p| proc_stats(p).cpu_s);
    let before = proc_stats(pid);
    // The agent's own CPU time (getrusage: microseconds, exited threads included), where
    // /proc's counts whole 10 ms ticks: at 20 msg/s a tick is 16.7 us per message of a
    // 30 s shape.
    let scrape_before = agent.scrape();
    let cpu_before = scrape_before.sum("process_cpu_seconds_total", &[]);
    let commits_before = commit_time(&scrape_before);
    let machine_before = machine_idle_s();
    let reference = shape
        .rate
        .map(|_| reference_subscriber(broker_port, shape.protocol, total));
    let start = Instant::now();
    let publisher = rt.spawn(publish_shape(
        broker_port,
        shape.devices,
        total,
        shape.rate,
        format!("shape{index}-"),
    ));
    // Ingest: every message stored in the spool (and so acked); the shipping may trail it.
    // Read from a copy of the spool every 200 ms: asking the agent (`/status`) would take it
    // more CPU than its messages at low rates.
    let mut ingested = None;
    wait_every(
        "the agent to deliver every message",
        Duration::from_secs(3600),
        Duration::from_millis(200),
        || {
            let a = agent.accounting_from_copy()?;
            if ingested.is_none() && a.received >= total {
                ingested = Some(start.elapsed().as_secs_f64());
            }
            (a.delivered >= total).then_some(())
        },
    );
    let elapsed = start.elapsed().as_secs_f64();
    let after = proc_stats(pid);
    let machine_after = machine_idle_s();
    let scrape_after = agent.scrape();
    let agent_cpu_s = scrape_after.sum("process_cpu_seconds_total", &[]) - cpu_before;
    let commits_after = commit_time(&scrape_after);
    let ingest_per_s = total as f64 / ingested.unwrap_or(elapsed);
    let others_after = others.map(|p| proc_stats(p).cpu_s);
    // It has taken every message by now, or does in a moment (the broker sent it each one
    // the agent took).
    let reference_cpu_s = reference.map(|r| r.join().expect("the reference subscriber"));
    let [broker_cpu, emulator_cpu, program_cpu] =
        std::array::from_fn(|i| (others_after[i] - others_before[i]) / elapsed);
    let cores = Cores {
        agent: agent_cpu_s / elapsed,
        broker: broker_cpu,
        emulator: emulator_cpu,
        // The do-nothing subscriber's thread runs in this program: its time is its own
        // table's, not the publishers'.
        program: (program_cpu - reference_cpu_s.unwrap_or(0.0) / elapsed).max(0.0),
        idle: (machine_after[0] - machine_before[0]) / elapsed,
        iowait: (machine_after[1] - machine_before[1]) / elapsed,
        steal: (machine_after[2] - machine_before[2]) / elapsed,
        committing: (commits_after.0 - commits_before.0) / elapsed,
        slow_commits: commits_after.1 - commits_before.1,
    };
    let published = rt.block_on(publisher).unwrap();
    let scrape = agent.scrape();
    assert_eq!(agent.stop().code(), Some(0), "the agent stopped cleanly");
    rt.block_on(forget_session(broker_port, &format!("edgeship-{gateway}")));

    // Every message the route's destination of record holds, once: the stream, or with
    // `--alone` the topic or the delivery stream's objects.
    let hose_folder = agent_dir.join("firehose");
    let hose_read = s3
        .filter(|_| args.firehose)
        .map(|s3| read_firehose(s3, &hose, &hose_folder));
    let mut seen = HashSet::new();
    let mut latencies = Vec::new();
    let mut payload_bytes = 0u64;
    let back = if args.alone {
        match &hose_read {
            Some(h) => {
                for payload in &h.payloads {
                    let (device, seq, _) = parse_payload(payload).unwrap_or_else(|| {
                        panic!("a payload the program did not publish: {payload:?}")
                    });
                    if seen.insert((device, seq)) {
                        payload_bytes += payload.len() as u64;
                    }
                }
            }
            // Reading 200,000 records back from tansu takes longer than the run (its SQLite
            // storage), so the topic is checked by its end offsets and the records the agent
            // saw accepted (below), and the payload is what was published.
            None => payload_bytes = published,
        }
        None
    } else {
        let back = rt.block_on(read_stream(&client, &stream));
        latencies.reserve(back.messages.len());
        for (m, arrived) in back.messages.iter().zip(&back.arrivals_ms) {
            let (device, seq, pub_ms) = parse_payload(&m.payload)
                .unwrap_or_else(|| panic!("a payload the program did not publish: {m:?}"));
            if seen.insert((device, seq)) {
                payload_bytes += m.payload.len() as u64;
                latencies.push(arrived.saturating_sub(pub_ms));
            }
        }
        Some(back)
    };
    if !(args.alone && args.kafka) {
        assert_eq!(
            seen.len() as u64,
            total,
            "{}: messages missing from the {}",
            shape.name(),
            if args.alone { "destination" } else { "stream" }
        );
    }
    if args.destinations == 2 {
        let copied = rt.block_on(read_stream(&client, &copy));
        let found: HashSet<(u32, u32)> = copied
            .messages
            .iter()
            .filter_map(|m| parse_payload(&m.payload).map(|(d, s, _)| (d, s)))
            .collect();
        assert_eq!(found, seen, "{}: the second stream differs", shape.name());
    }
    latencies.sort_unstable();
    let msgs_per_s = total as f64 / elapsed;
    let payload = payload_bytes as f64;
    let firehose = hose_read.map(|read| {
        let found: HashSet<(u32, u32)> = read
            .payloads
            .iter()
            .map(|p| {
                let (d, s, _) = parse_payload(p).expect("a payload the program published");
                (d, s)
            })
            .collect();
        assert_eq!(
            found,
            seen,
            "{}: Firehose differs from the stream",
            shape.name()
        );
        let hose_label = [("destination", "hose")];
        let records = scrape.sum("edgeship_destination_records_accepted_total", &hose_label);
        let entries = scrape.sum(
            "edgeship_destination_entries_total",
            &[("destination", "hose"), ("outcome", "accepted")],
        );
        assert_eq!(records as u64, total, "every message accepted by Firehose");
        FirehoseFigures {
            bytes_per_payload: read.sent as f64 / payload,
            records_per_million: entries * 1e6 / total as f64,
            calls_per_million: scrape.sum("edgeship_destination_calls_total", &hose_label) * 1e6
                / total as f64,
            record_bytes: read.sent as f64 / entries.max(1.0),
        }
    });
    let kafka = kafka.zip(kafka_before).map(|(k, (bytes, requests))| {
        let held = kafka_tool(&[&format!("127.0.0.1:{}", k.tansu.port), "offsets", &topic])
            .as_u64()
            .unwrap();
        let accepted = scrape.sum(
            "edgeship_destination_records_accepted_total",
            &[("destination", "events")],
        );
        assert_eq!(accepted as u64, total, "every message accepted by Kafka");
        assert!(
            held >= total,
            "{}: the topic holds {held} of {total}",
            shape.name()
        );
        let sent = k
            .link
            .upstream_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            - bytes;
        let produced = k
            .link
            .kafka_produce_requests
            .load(std::sync::atomic::Ordering::Relaxed)
            - requests;
        KafkaFigures {
            bytes_per_payload: sent as f64 / payload,
            requests_per_million: produced as f64 * 1e6 / total as f64,
            repeats: held - total,
        }
    });
    let s3 = s3.filter(|_| args.s3_age.is_some()).map(|s3| {
        let folder = agent_dir.join("objects");
        let listed = s3_tool(&[&s3.endpoint(), "fetch", &bucket, folder.to_str().unwrap()]);
        let keys: Vec<String> = serde_json::from_value(listed["keys"].clone()).unwrap();
        let mut object_bytes = 0u64;
        let mut found = HashSet::new();
        for key in &keys {
            let data = std::fs::read(folder.join(key)).unwrap();
            object_bytes += data.len() as u64;
            let mut text = String::new();
            std::io::Read::read_to_string(
                &mut zstd::stream::read::Decoder::new(&data[..]).unwrap(),
                &mut text,
            )
            .unwrap();
            for line in text.lines() {
                let at = line.find(",\"payload\":").expect("JSON payloads") + 11;
                let (d, s, _) = parse_payload(&line.as_bytes()[at..line.len() - 1])
                    .expect("a payload the program published");
                found.insert((d, s));
            }
        }
        assert_eq!(
            found,
            seen,
            "{}: the bucket differs from the stream",
            shape.name()
        );
        let raw_per_record = scrape.sum("edgeship_spool_appended_bytes_total", &[]) / total as f64;
        S3Figures {
            objects: keys.len(),
            bytes_per_payload: object_bytes as f64 / payload,
            requests_per_million: scrape.sum(
                "edgeship_destination_calls_total",
                &[("destination", "lake")],
            ) * 1e6
                / total as f64,
            records_per_default_object: (64u64 << 20) as f64 / raw_per_record,
        }
    });
    Figures {
        messages: total,
        msgs_per_s,
        // Set once the baseline after the shape is measured.
        baseline: None,
        ingest_per_s,
        cpu_us_per_msg: agent_cpu_s * 1e6 / total as f64,
        reference_us_per_msg: reference_cpu_s.map(|s| s * 1e6 / total as f64),
        disk_per_payload: (after.write_bytes - before.write_bytes) as f64 / payload,
        stream: back.map(|back| StreamFigures {
            kinesis_per_payload: back.kinesis_bytes as f64 / payload,
            put_units_per_million: back.put_units as f64 * 1e6 / total as f64,
            kinesis_records: back.kinesis_records,
            accepted_p50_ms: percentile(&latencies, 0.5),
            accepted_p99_ms: percentile(&latencies, 0.99),
        }),
        peak_rss_mib: after.hwm_kib as f64 / 1024.0,
        cores,
        s3,
        firehose,
        kafka,
    }
}

fn main() {
    let args = parse_args();
    let shapes: Vec<Shape> = matrix()
        .into_iter()
        .filter(|s| {
            args.only
                .as_ref()
                .is_none_or(|o| s.name().contains(o.as_str()))
        })
        .filter(|s| {
            args.skip
                .as_ref()
                .is_none_or(|o| !s.name().contains(o.as_str()))
        })
        .collect();
    assert!(!shapes.is_empty(), "no shape matches --only");
    let rt = runtime();
    let dir = tempdir();
    eprintln!(
        "edgeship shapes: {} shapes, {} messages per saturating shape, {} s per fixed-rate shape, format {}{}{}",
        shapes.len(),
        args.messages,
        args.seconds,
        args.format,
        args.spool
            .iter()
            .map(|s| format!(", spool {s}"))
            .chain(args.broker.iter().map(|b| format!(", broker {b}")))
            .chain(args.batch.iter().map(|b| format!(", batch {b}")))
            .collect::<String>(),
        if args.quick { ", quick" } else { "" }
    );
    let mut broker_settings = "max_inflight_messages 1000\n".to_string();
    for line in &args.broker {
        broker_settings += line;
        broker_settings += "\n";
    }
    let mosquitto = Mosquitto::start_with(dir.path(), &broker_settings);
    let s3 = (args.s3_age.is_some() || args.firehose).then(|| S3Server::moto(dir.path()));
    let kafka = args.kafka.then(|| {
        let mut tansu = Tansu::start(dir.path());
        let link = Uplink::start(tansu.port);
        // Clients are sent to the proxy for every connection after the first.
        tansu.advertised = Some(link.port);
        tansu.restart();
        KafkaSide { tansu, link }
    });

    // Each saturating shape is read against the broker's rate to a do-nothing subscriber of
    // its protocol and devices taking the same traffic just before it and just after it: on a
    // shared machine that rate drifts over minutes (28,000-41,000 msg/s within an hour here),
    // and one baseline taken at the start read a later shape against another minute's broker.
    let baseline_of = |shape: &Shape, when: &str| {
        eprintln!(
            "  baseline {when}: do-nothing MQTT {} subscriber, {} devices ...",
            shape.protocol, shape.devices
        );
        baseline(
            &rt,
            mosquitto.port,
            shape.protocol,
            shape.devices,
            args.messages,
        )
    };
    let mut results = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let before = shape.rate.is_none().then(|| baseline_of(shape, "before"));
        eprintln!("  {} ...", shape.name());
        let mut f = run_shape(
            &rt,
            i,
            *shape,
            &args,
            dir.path(),
            mosquitto.port,
            mosquitto.pid().expect("the broker runs"),
            s3.as_ref(),
            kafka.as_ref(),
        );
        if let Some(before) = before {
            f.baseline = Some((before, baseline_of(shape, "after")));
        }
        results.push((*shape, f));
    }

    println!();
    println!(
        "edgeship shapes: QoS 1, ~200 B telemetry JSON with fresh values, format {}, kinesis-mock, {} shard{}, batch settings: {}{}",
        args.format,
        args.shards,
        if args.shards == 1 { "" } else { "s" },
        if args.batch.is_empty() {
            "default".to_string()
        } else {
            args.batch.join(", ")
        },
        if args.destinations == 2 {
            "; the route feeds two streams (Kinesis figures: the first)"
        } else {
            ""
        }
    );
    for (shape, f) in &results {
        if let Some((before, after)) = f.baseline {
            println!(
                "broker -> do-nothing MQTT {} QoS 1 subscriber, {} devices, before / after {}: {before:.0} / {after:.0} msg/s",
                shape.protocol,
                shape.devices,
                shape.name()
            );
        }
    }
    println!(
        "{:<52} {:>9} {:>15} {:>15} {:>7} {:>6} {:>8} {:>9} {:>6} {:>15}",
        "shape",
        "messages",
        "ingest",
        "end to end",
        "CPU us",
        "disk",
        "kinesis",
        "PUT u/1M",
        "RSS",
        "accepted p50/99"
    );
    println!(
        "{:<52} {:>9} {:>15} {:>15} {:>7} {:>6} {:>8} {:>9} {:>6} {:>15}",
        "", "", "msg/s (share)", "msg/s (share)", "/msg", "/pay", "/pay", "", "MiB", "ms"
    );
    println!("{}", "-".repeat(156));
    for (shape, f) in &results {
        let share = |rate: f64, ratio: Option<f64>| match ratio {
            Some(r) => format!("{rate:.0} ({r:.2})"),
            None => format!("{rate:.0}"),
        };
        // With `--alone` the stream's columns are empty.
        let (kinesis, units, accepted) = match &f.stream {
            Some(k) => (
                format!("{:.3}", k.kinesis_per_payload),
                format!("{:.0}", k.put_units_per_million),
                format!("{} / {}", k.accepted_p50_ms, k.accepted_p99_ms),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<52} {:>9} {:>15} {:>15} {:>7.1} {:>6.3} {:>8} {:>9} {:>6.1} {:>15}",
            shape.name(),
            f.messages,
            share(f.ingest_per_s, f.share(f.ingest_per_s)),
            share(f.msgs_per_s, f.share(f.msgs_per_s)),
            f.cpu_us_per_msg,
            f.disk_per_payload,
            kinesis,
            units,
            f.peak_rss_mib,
            accepted
        );
    }
    println!(
        "{:<52} {:>9} {:>15} {:>15} {:>7} {:>6} {:>8} {:>9} {:>6}",
        "budget (issue 18)", "", "", ">= 0.90", "<= 10", "<= 0.5", "<= 0.15", "<= 1000", "<= 32"
    );
    let machine = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (emulator, feeds) = match (args.alone, args.kafka) {
        (false, _) => ("kinesis-mock", "the route also feeds the stream"),
        (true, true) => ("tansu", "the route feeds it alone"),
        (true, false) => ("moto", "the route feeds it alone"),
    };
    println!();
    println!(
        "Cores kept busy from the first publish to the last message accepted ({machine} on this machine; broker: Mosquitto, emulator: {emulator}, publishers: this program):"
    );
    println!(
        "(idle, iowait: the machine's cores idle, and idle waiting on the disk; steal: taken by the host; committing: share of the time the spool spent in commits; slow: commits over 131 ms)"
    );
    println!(
        "{:<52} {:>7} {:>7} {:>9} {:>11} {:>7} {:>6} {:>7} {:>6} {:>11} {:>5}",
        "shape",
        "agent",
        "broker",
        "emulator",
        "publishers",
        "total",
        "idle",
        "iowait",
        "steal",
        "committing",
        "slow"
    );
    for (shape, f) in &results {
        let c = &f.cores;
        println!(
            "{:<52} {:>7.2} {:>7.2} {:>9.2} {:>11.2} {:>7.2} {:>6.2} {:>7.2} {:>6.2} {:>11.2} {:>5}",
            shape.name(),
            c.agent,
            c.broker,
            c.emulator,
            c.program,
            c.agent + c.broker + c.emulator + c.program,
            c.idle,
            c.iowait,
            c.steal,
            c.committing,
            c.slow_commits
        );
    }
    if results
        .iter()
        .any(|(_, f)| f.reference_us_per_msg.is_some())
    {
        println!();
        println!(
            "CPU per message at fixed rates, the agent against a do-nothing QoS 1 subscriber of the same protocol taking the same messages beside it (one thread; it reads and acks each message, nothing else):"
        );
        println!(
            "{:<52} {:>11} {:>11} {:>7}",
            "shape", "agent us", "do-nothing", "ratio"
        );
        for (shape, f) in &results {
            let Some(reference) = f.reference_us_per_msg else {
                continue;
            };
            println!(
                "{:<52} {:>11.1} {:>11.1} {:>7.2}",
                shape.name(),
                f.cpu_us_per_msg,
                reference,
                f.cpu_us_per_msg / reference
            );
        }
    }
    if let Some(age) = &args.s3_age {
        println!();
        println!("S3 (moto; objects close at {age} or 64 MiB of records; the route also feeds the stream):");
        println!(
            "{:<52} {:>8} {:>10} {:>12} {:>18}",
            "shape", "objects", "bytes/pay", "requests/1M", "objects/h by size"
        );
        for (shape, f) in &results {
            let Some(s3) = &f.s3 else { continue };
            // At this shape's rate (or 1,000 msg/s for a saturating one), how many 64 MiB
            // objects an hour fills; at least 4 (the default 15-minute age).
            let rate = f64::from(shape.rate.unwrap_or(1_000));
            let per_hour = (3600.0 * rate / s3.records_per_default_object).max(4.0);
            println!(
                "{:<52} {:>8} {:>10.3} {:>12.1} {:>18.1}",
                shape.name(),
                s3.objects,
                s3.bytes_per_payload,
                s3.requests_per_million,
                per_hour
            );
        }
    }

    if args.firehose {
        println!();
        println!("Firehose (moto; {feeds}):");
        println!(
            "{:<52} {:>10} {:>12} {:>10} {:>12}",
            "shape", "bytes/pay", "records/1M", "calls/1M", "B/record"
        );
        for (shape, f) in &results {
            let Some(h) = &f.firehose else { continue };
            println!(
                "{:<52} {:>10.3} {:>12.1} {:>10.1} {:>12.0}",
                shape.name(),
                h.bytes_per_payload,
                h.records_per_million,
                h.calls_per_million,
                h.record_bytes
            );
        }
    }

    if args.kafka {
        println!();
        println!("Kafka (tansu, 4 partitions; {feeds}):");
        println!(
            "{:<52} {:>10} {:>14} {:>8}",
            "shape", "bytes/pay", "requests/1M", "repeats"
        );
        for (shape, f) in &results {
            let Some(k) = &f.kafka else { continue };
            println!(
                "{:<52} {:>10.3} {:>14.1} {:>8}",
                shape.name(),
                k.bytes_per_payload,
                k.requests_per_million,
                k.repeats
            );
        }
    }

    let json = serde_json::json!({
        "format": args.format,
        "kafka": args.kafka,
        "firehose": args.firehose,
        "alone": args.alone,
        "destinations": args.destinations,
        "s3_max_object_age": args.s3_age,
        "spool_settings": args.spool,
        "batch_settings": args.batch,
        "broker_settings": args.broker,
        "quick": args.quick,
        "shards": args.shards,
        "shapes": results.iter().map(|(s, f)| serde_json::json!({
            "name": s.name(),
            "protocol": s.protocol,
            "key": match s.key { KeyBy::Gateway => "gateway", KeyBy::Device => "device" },
            "devices": s.devices,
            "rate": s.rate,
            "messages": f.messages,
            "msgs_per_s": f.msgs_per_s,
            "baseline_msgs_per_s": f.baseline.map(|(before, after)| serde_json::json!({
                "before": before,
                "after": after,
            })),
            "ratio_to_baseline": f.share(f.msgs_per_s),
            "ingest_msgs_per_s": f.ingest_per_s,
            "ingest_ratio_to_baseline": f.share(f.ingest_per_s),
            "cpu_us_per_message": f.cpu_us_per_msg,
            "reference_subscriber_cpu_us_per_message": f.reference_us_per_msg,
            "disk_write_bytes_per_payload_byte": f.disk_per_payload,
            "kinesis_bytes_per_payload_byte": f.stream.as_ref().map(|k| k.kinesis_per_payload),
            "put_units_per_million": f.stream.as_ref().map(|k| k.put_units_per_million),
            "kinesis_records": f.stream.as_ref().map(|k| k.kinesis_records),
            "peak_rss_mib": f.peak_rss_mib,
            "publish_to_accepted_ms": f.stream.as_ref().map(|k| serde_json::json!({
                "p50": k.accepted_p50_ms,
                "p99": k.accepted_p99_ms,
            })),
            "cores_busy": {
                "agent": f.cores.agent,
                "broker": f.cores.broker,
                "emulator": f.cores.emulator,
                "publishers": f.cores.program,
            },
            "machine_cores": {
                "idle": f.cores.idle,
                "iowait": f.cores.iowait,
                "steal": f.cores.steal,
            },
            "spool_committing_share": f.cores.committing,
            "commits_over_131ms": f.cores.slow_commits,
            "s3": f.s3.as_ref().map(|s3| serde_json::json!({
                "objects": s3.objects,
                "object_bytes_per_payload_byte": s3.bytes_per_payload,
                "requests_per_million": s3.requests_per_million,
                "records_per_64mib_object": s3.records_per_default_object,
            })),
            "kafka": f.kafka.as_ref().map(|k| serde_json::json!({
                "bytes_per_payload_byte": k.bytes_per_payload,
                "produce_requests_per_million": k.requests_per_million,
                "repeated_records": k.repeats,
            })),
            "firehose": f.firehose.as_ref().map(|h| serde_json::json!({
                "bytes_per_payload_byte": h.bytes_per_payload,
                "records_per_million": h.records_per_million,
                "calls_per_million": h.calls_per_million,
                "bytes_per_record": h.record_bytes,
            })),
        })).collect::<Vec<_>>(),
    });
    let path = args.json.unwrap_or_else(|| {
        PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
            .join("edgeship-shapes.json")
    });
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nJSON: {}", path.display());
}
