//! Test harness: real Mosquitto and the real Kinesis emulator on free loopback ports, each
//! with its own temp folder; the agent as a separate process; simulated devices; and a reader
//! that pulls every record back out of the stream and decodes it.
//!
//! Everything is stopped when its guard drops. Waits poll a condition with a deadline; none
//! guesses with a fixed sleep.

#![allow(dead_code)]

use aws_sdk_kinesis::types::ShardIteratorType;
use edgeship::frame;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on, for a server a test starts (and may restart on it).
///
/// Ports come from the ten thousand just below the kernel's ephemeral range, each handed out
/// once per process. A port the kernel chooses (a `bind` to port 0, or the local end of an
/// outgoing connection) lies in that range, so while a test keeps a server down nothing else
/// takes its port. (A kernel-chosen port could be taken: the restarted server then failed to
/// bind while another test's server answered there, and the agent talked to that server; or
/// an agent reconnecting to the dead port could draw it as its own local port and connect to
/// itself.) Each candidate is tried with a bind, so a port another program holds is skipped.
/// Each process starts at its own offset in the range (from its pid), so the test binary and
/// a bench program run beside it seldom try the same ports first.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<(u16, u16, std::sync::atomic::AtomicU32)> = OnceLock::new();
    let (low, size, next) = NEXT.get_or_init(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let low = ephemeral_low.saturating_sub(10_000).max(1024);
        let start = std::process::id() % 997 * 10;
        (
            low,
            ephemeral_low - low,
            std::sync::atomic::AtomicU32::new(start),
        )
    });
    for _ in 0..*size {
        let port = low + (next.fetch_add(1, Ordering::Relaxed) % u32::from(*size)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{}", low + size);
}

#[cfg(test)]
#[test]
fn free_ports_lie_below_the_kernels_range_and_are_handed_out_once() {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let chosen: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let kernels = TcpListener::bind("127.0.0.1:0").unwrap();
    let kernels = kernels.local_addr().unwrap().port();
    assert!(kernels >= ephemeral_low, "the kernel chose {kernels}");
    for p in &chosen {
        assert!(*p < ephemeral_low, "{p} is in the kernel's range");
    }
    let distinct: std::collections::BTreeSet<u16> = chosen.iter().copied().collect();
    assert_eq!(distinct.len(), chosen.len(), "a port was handed out twice");
}

/// Polls `check` until it returns `Some`, or panics with `what` and the last state after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_every(what, timeout, Duration::from_millis(50), check)
}

/// [`wait_for`], checking every `every`.
pub fn wait_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

pub fn wait_port(port: u16, timeout: Duration, what: &str) {
    wait_for(what, timeout, || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------
// Mosquitto

pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_with(dir, "")
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it with `extra` appended to its config (more listeners, TLS).
    pub fn start_with(dir: &Path, extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            dir: dir.join("mosquitto"),
            child: None,
        };
        std::fs::create_dir_all(m.dir.join("data")).unwrap();
        // Defaults a test's `extra` may override, key by key.
        let data = m.dir.join("data");
        let defaults = [
            ("persistence", "true".to_string()),
            ("persistence_location", format!("{}/", data.display())),
            ("autosave_interval", "1".into()),
            ("max_inflight_messages", "1000".into()),
            ("max_queued_messages", "0".into()),
            ("max_queued_bytes", "0".into()),
        ];
        let mut conf = format!("listener {} 127.0.0.1\nallow_anonymous true\n", m.port);
        for (key, value) in defaults {
            if !extra
                .lines()
                .any(|l| l.split_whitespace().next() == Some(key))
            {
                conf.push_str(&format!("{key} {value}\n"));
            }
        }
        conf.push_str("log_dest stderr\nlog_type error\nlog_type warning\n");
        conf.push_str(extra);
        std::fs::write(m.dir.join("mosquitto.conf"), conf).unwrap();
        // Run as root, mosquitto drops to user `mosquitto`: its persistence folder must be theirs.
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "mosquitto:", m.dir.join("data").to_str().unwrap()])
                .status();
        }
        m.spawn();
        m
    }

    /// The folder of its config and log: a test may put an ACL file here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGHUP: it reads its ACL and password files again.
    pub fn reload(&self) {
        signal(self.child.as_ref().expect("mosquitto running").id(), "HUP");
    }

    /// Starts it again after [`Mosquitto::stop`], on the same port.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is not installed (apt-get install mosquitto)");
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10), "mosquitto to listen");
    }

    /// Graceful stop (SIGTERM: mosquitto saves its persistence file) and start on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

// ---------------------------------------------------------------------------------------
// Kinesis emulator (kinesis-mock), one per test binary, each test with its own stream.

pub struct KinesisMock {
    pub port: u16,
    child: Mutex<Child>,
}

impl KinesisMock {
    /// The emulator's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }
}

pub fn kinesis() -> &'static KinesisMock {
    static MOCK: OnceLock<KinesisMock> = OnceLock::new();
    MOCK.get_or_init(|| {
        let main_js = std::env::var("EDGESHIP_KINESIS_MOCK")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                repo_root().join("tests/support/node_modules/kinesis-local/main.js")
            });
        assert!(
            main_js.exists(),
            "{} missing: run `npm install --prefix tests/support`",
            main_js.display()
        );
        let package = main_js.parent().unwrap();
        let port = free_port();
        let log_dir =
            std::env::temp_dir().join(format!("edgeship-kinesis-mock-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = std::fs::File::create(log_dir.join("kinesis-mock.log")).unwrap();
        let child = Command::new("node")
            .arg("-r")
            .arg(repo_root().join("tests/support/kinesis-loopback.js"))
            .arg(&main_js)
            .current_dir(&log_dir)
            // It exits with this process and removes `log_dir` then (kinesis-loopback.js).
            .env("EDGESHIP_PARENT_PID", std::process::id().to_string())
            .env("EDGESHIP_OWN_DIR", &log_dir)
            .env("KINESIS_MOCK_PLAIN_PORT", port.to_string())
            .env("KINESIS_MOCK_TLS_PORT", free_port().to_string())
            .env("KINESIS_MOCK_CERT_PATH", package.join("server.json"))
            .env("CREATE_STREAM_DURATION", "0ms")
            // One emulator serves every test's streams; its default account limit is 50 shards.
            .env("SHARD_LIMIT", "1000")
            .env("LOG_LEVEL", "WARN")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the Kinesis emulator (node)");
        wait_port(
            port,
            Duration::from_secs(60),
            "the Kinesis emulator to listen",
        );
        KinesisMock {
            port,
            child: Mutex::new(child),
        }
    })
}

impl KinesisMock {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn test_credentials() {
    // Safe: set before any thread reads them, and identical in every test.
    static SET: OnceLock<()> = OnceLock::new();
    SET.get_or_init(|| unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIAEDGESHIPTEST");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "edgeship-test-secret");
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}

/// What most end-to-end tests start from: their own temp folder and runtime, and a client of
/// the shared emulator with a fresh stream of `shards` shards named `stream`.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub client: aws_sdk_kinesis::Client,
    pub kinesis: &'static KinesisMock,
}

/// An agent shipping to a one-shard stream through an [`Uplink`] the test can cut, with its
/// own broker; connected, its shards learned. `edit` changes the config before the start
/// (`[spool]` and `[[broker]]` additions come first).
///
/// Fields drop in order: the agent (whose drop shows its log of a failed test) before the
/// temp folder holding that log.
pub struct Behind {
    pub agent: Agent,
    pub rt: tokio::runtime::Runtime,
    pub client: aws_sdk_kinesis::Client,
    pub uplink: Uplink,
    pub mosquitto: Mosquitto,
    pub dir: tempfile::TempDir,
}

pub fn agent_behind_uplink(
    stream: &str,
    spool: &str,
    broker: &str,
    edit: impl FnOnce(&std::path::Path, String) -> String,
) -> Behind {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let uplink = Uplink::start(kinesis.port);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &uplink.endpoint(),
        stream,
        spool,
        broker,
    );
    let agent = Agent::start(dir.path(), &edit(dir.path(), config));
    agent.wait_connected(1);
    agent.wait_shards_learned();
    Behind {
        dir,
        rt,
        client,
        uplink,
        mosquitto,
        agent,
    }
}

pub fn rig(stream: &str, shards: i32) -> Rig {
    let dir = tempdir();
    let rt = runtime();
    let kinesis = kinesis();
    let client = rt.block_on(kinesis_client(&kinesis.endpoint()));
    rt.block_on(create_stream(&client, stream, shards));
    Rig {
        dir,
        rt,
        client,
        kinesis,
    }
}

pub async fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    test_credentials();
    let sdk = edgeship::aws::sdk_config(Some("us-east-1"), Some(endpoint), None).await;
    aws_sdk_kinesis::Client::new(&sdk)
}

pub async fn create_stream(client: &aws_sdk_kinesis::Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .expect("CreateStream");
    wait_active(client, name).await;
}

/// Polls until the stream is ACTIVE.
pub async fn wait_active(client: &aws_sdk_kinesis::Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .expect("DescribeStreamSummary");
        let status = d
            .stream_description_summary()
            .map(|s| s.stream_status().as_str().to_string());
        if status.as_deref() == Some("ACTIVE") {
            return;
        }
        assert!(Instant::now() < deadline, "stream {name} not ACTIVE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record in the stream so far, decoded: payloads in stream order, plus raw counts.
#[derive(Default, Debug)]
pub struct StreamContents {
    pub kinesis_records: usize,
    pub kinesis_bytes: usize,
    /// PUT payload units: each record (data + key) counts in 25 KiB chunks, rounded up.
    pub put_units: u64,
    pub messages: Vec<frame::Record>,
    /// For each message, its Kinesis record's ApproximateArrivalTimestamp (unix ms).
    pub arrivals_ms: Vec<u64>,
    pub partition_keys: Vec<String>,
    /// Per shard id: (messages, frame bytes without keys).
    pub per_shard: std::collections::BTreeMap<String, (u64, u64)>,
    /// Every record's data as it came out of the stream.
    pub raw_records: Vec<Vec<u8>>,
    /// For each message: the shard id that held it, and its own partition key (the one its
    /// route gave it: carried per record in keyed frames, versions 2 and 3, and in KPL
    /// aggregates, else the Kinesis record's).
    pub placed: Vec<(String, String)>,
}

pub async fn read_stream(client: &aws_sdk_kinesis::Client, name: &str) -> StreamContents {
    let mut out = StreamContents::default();
    let shards = client
        .list_shards()
        .stream_name(name)
        .send()
        .await
        .expect("ListShards");
    for shard in shards.shards() {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(name)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("GetShardIterator")
            .shard_iterator()
            .map(str::to_string);
        while let Some(it) = iterator {
            let page = client
                .get_records()
                .shard_iterator(it)
                .limit(1000)
                .send()
                .await
                .expect("GetRecords");
            for r in page.records() {
                let data = r.data().as_ref();
                out.kinesis_records += 1;
                let key = r.partition_key().unwrap_or_default();
                let size = data.len() + key.len();
                out.kinesis_bytes += size;
                out.put_units += (size as u64).div_ceil(25 * 1024);
                out.partition_keys.push(key.to_string());
                let arrived = r
                    .approximate_arrival_timestamp()
                    .and_then(|t| t.to_millis().ok())
                    .unwrap_or(0) as u64;
                let f = if data.starts_with(&edgeship::frame::kpl::MAGIC) {
                    kpl_as_frame(data)
                } else if data.starts_with(b"{") {
                    ndjson_as_frame(data, key)
                } else {
                    frame::decode_frame(data).expect("every record in the stream is a valid frame")
                };
                out.arrivals_ms
                    .extend(std::iter::repeat_n(arrived, f.records.len()));
                out.placed.extend(f.records.iter().map(|r| {
                    let own = if r.key.is_empty() {
                        key
                    } else {
                        edgeship::key::split(&r.key).0
                    };
                    (shard.shard_id().to_string(), own.to_string())
                }));
                let per = out
                    .per_shard
                    .entry(shard.shard_id().to_string())
                    .or_default();
                per.0 += f.records.len() as u64;
                per.1 += data.len() as u64;
                out.raw_records.push(data.to_vec());
                out.messages.extend(f.records);
            }
            // Only an empty page is the end. The emulator counts MillisBehindLatest from the
            // last record a page returns and cuts a page at 10 MB, so a page cut inside the
            // records of the newest PutRecords call (one arrival time) reads 0 with more to
            // come: taking that for the end lost the last 2,260 messages of a 1,000,000-message
            // run once.
            if page.records().is_empty() {
                break;
            }
            iterator = page.next_shard_iterator().map(str::to_string);
        }
    }
    out
}

/// A KPL aggregate read with edgeship's own decoder, as the frame it was built from (the id,
/// topic and receipt time travel as tags).
/// A record of a route with `format = "ndjson"`, read with serde_json (not edgeship's code):
/// JSON lines, each ending in a newline, whose `payload` is the message when it is JSON (its
/// exact bytes: the test payloads have no whitespace to drop) or else `payload_base64`.
/// The lines carry no partition key; the Kinesis record's, `key`, stands for them.
pub fn ndjson_as_frame(data: &[u8], key: &str) -> frame::Frame {
    use base64::Engine;
    let text = std::str::from_utf8(data).expect("an ndjson record is UTF-8");
    assert!(text.ends_with('\n'), "an ndjson record ends its last line");
    let mut gateway = String::new();
    let records = text
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            let id = v["id"].as_str().expect("id");
            let (gw, seq) = id.rsplit_once(':').expect("id is <gateway>:<seq>");
            assert_eq!(v["gateway"], gw);
            gateway = gw.to_string();
            let payload = match v.get("payload_base64") {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64.as_str().expect("payload_base64 is a string"))
                    .expect("payload_base64 is base64"),
                None => {
                    // The payload is the line's last member: its text runs to the final '}'.
                    let at = line
                        .find(",\"payload\":")
                        .expect("payload or payload_base64");
                    let raw = &line[at + ",\"payload\":".len()..line.len() - 1];
                    let parsed: serde_json::Value = serde_json::from_str(raw).expect("payload");
                    assert_eq!(parsed, v["payload"]);
                    raw.as_bytes().to_vec()
                }
            };
            frame::Record {
                seq: seq.parse().expect("seq"),
                ts_ms: v["ts_ms"].as_u64().expect("ts_ms"),
                key: key.to_string(),
                topic: v["topic"].as_str().expect("topic").to_string(),
                payload,
            }
        })
        .collect();
    frame::Frame { gateway, records }
}

fn kpl_as_frame(data: &[u8]) -> frame::Frame {
    let users =
        edgeship::frame::kpl::decode(data).expect("every KPL record in the stream is valid");
    let tag = |u: &edgeship::frame::kpl::UserRecord, k: &str| {
        u.tags
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("user record without tag {k}"))
    };
    let mut gateway = String::new();
    let records = users
        .iter()
        .map(|u| {
            let id = tag(u, "id");
            let (gw, seq) = id.rsplit_once(':').expect("id is <gateway>:<seq>");
            gateway = gw.to_string();
            frame::Record {
                seq: seq.parse().expect("seq"),
                ts_ms: tag(u, "ts_ms").parse().expect("ts_ms"),
                key: match &u.explicit_hash_key {
                    Some(h) => format!("{}\0{h}", u.partition_key),
                    None => u.partition_key.clone(),
                },
                topic: tag(u, "topic"),
                payload: u.data.clone(),
            }
        })
        .collect();
    frame::Frame { gateway, records }
}

// ---------------------------------------------------------------------------------------
// A TCP forwarder in front of the emulator that can be cut, to play an uplink outage.

pub struct Uplink {
    pub port: u16,
    down: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    /// While set, what the client sends is read and thrown away (the connection stays up).
    muted: Arc<AtomicBool>,
    /// Bytes the clients sent through it, and the Kafka produce requests among them.
    pub upstream_bytes: Arc<AtomicU64>,
    pub kafka_produce_requests: Arc<AtomicU64>,
    /// Connections forwarded so far, and those of them the client's side has ended.
    pub connections: Arc<AtomicU64>,
    pub closed: Arc<AtomicU64>,
}

/// Follows the Kafka request frames (a 4-byte length, then the request, whose first two
/// bytes are its API key) of one connection's client side, counting produce requests (key 0).
#[derive(Default)]
struct KafkaFrames {
    /// Bytes of the current frame's length prefix and API key read so far.
    head: Vec<u8>,
    /// Bytes of the current frame's body still to come after its head.
    left: usize,
}

impl KafkaFrames {
    fn feed(&mut self, mut data: &[u8], produce: &AtomicU64) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (6 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.head.len() == 6 {
                let len = u32::from_be_bytes(self.head[..4].try_into().unwrap()) as usize;
                if self.head[4..6] == [0, 0] {
                    produce.fetch_add(1, Ordering::Relaxed);
                }
                self.left = len.saturating_sub(2);
                self.head.clear();
            }
        }
    }
}

/// Paces the bytes of one direction of a [`Uplink`] to a rate, over all its connections.
struct Pace {
    bytes_per_sec: f64,
    /// When the link is free to carry the next byte.
    free_at: Mutex<std::time::Instant>,
}

impl Pace {
    /// Waits until `n` more bytes may pass.
    fn take(&self, n: usize) {
        let done = {
            let mut free = self.free_at.lock().unwrap();
            let start = (*free).max(std::time::Instant::now());
            *free = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
            *free
        };
        std::thread::sleep(done.saturating_duration_since(std::time::Instant::now()));
    }
}

impl Uplink {
    pub fn start(target: u16) -> Uplink {
        Uplink::start_paced(target, None)
    }

    /// A link that carries at most `bytes_per_sec` each way (a cellular uplink).
    pub fn start_limited(target: u16, bytes_per_sec: u32) -> Uplink {
        Uplink::start_paced(target, Some(f64::from(bytes_per_sec)))
    }

    fn start_paced(target: u16, rate: Option<f64>) -> Uplink {
        let paces: [Option<Arc<Pace>>; 2] = std::array::from_fn(|_| {
            rate.map(|bytes_per_sec| {
                Arc::new(Pace {
                    bytes_per_sec,
                    free_at: Mutex::new(std::time::Instant::now()),
                })
            })
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let muted = Arc::new(AtomicBool::new(false));
        let (d, g, m) = (down.clone(), generation.clone(), muted.clone());
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let kafka_produce_requests = Arc::new(AtomicU64::new(0));
        let (sent, produce) = (upstream_bytes.clone(), kafka_produce_requests.clone());
        let connections = Arc::new(AtomicU64::new(0));
        let forwarded = connections.clone();
        let closed = Arc::new(AtomicU64::new(0));
        let ended = closed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                forwarded.fetch_add(1, Ordering::SeqCst);
                let born = g.load(Ordering::SeqCst);
                for (((mut from, mut to), pace), upstream) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ]
                .into_iter()
                .zip(paces.clone())
                .zip([true, false])
                {
                    let (g, d, m) = (g.clone(), d.clone(), m.clone());
                    let (sent, produce) = (sent.clone(), produce.clone());
                    let ended = upstream.then(|| ended.clone());
                    std::thread::spawn(move || {
                        let mut frames = KafkaFrames::default();
                        from.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        // Paced links move small chunks, so the rate holds within a second.
                        let mut buf = vec![0u8; if pace.is_some() { 1024 } else { 64 * 1024 }];
                        loop {
                            if d.load(Ordering::SeqCst) || g.load(Ordering::SeqCst) != born {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if let Some(p) = &pace {
                                        p.take(n);
                                    }
                                    if upstream && m.load(Ordering::SeqCst) {
                                        continue;
                                    }
                                    if upstream {
                                        sent.fetch_add(n as u64, Ordering::Relaxed);
                                        frames.feed(&buf[..n], &produce);
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        if let Some(ended) = ended {
                            ended.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            }
        });
        Uplink {
            port,
            down,
            generation,
            muted,
            upstream_bytes,
            kafka_produce_requests,
            connections,
            closed,
        }
    }

    /// Throws away what clients send (`true`) until called with `false`; what the server
    /// sends still arrives.
    pub fn mute_upstream(&self, on: bool) {
        self.muted.store(on, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every open connection and refuses new ones until [`Uplink::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------
// The agent, as a separate process.

pub struct Agent {
    pub config_path: PathBuf,
    pub spool_path: PathBuf,
    pub log_path: PathBuf,
    /// Where its admin endpoint listens (a free port, added to configs that set none).
    pub admin: std::net::SocketAddr,
    /// The program (and its first arguments) that `run --config FILE` follows.
    program: Vec<std::ffi::OsString>,
    /// Environment changes for the agent process: set, or removed (`None`).
    pub env: Vec<(String, Option<String>)>,
    child: Option<Child>,
}

/// Config text for one agent: one broker, one route `devices/+/telemetry` to one stream.
pub fn agent_config(
    dir: &Path,
    broker_port: u16,
    endpoint: &str,
    stream: &str,
    extra_spool: &str,
    extra_broker: &str,
) -> String {
    format!(
        r#"gateway_id = "gw-test"
shutdown_timeout = "5s"
[spool]
path = "{spool}"
{extra_spool}
[batch]
linger = "200ms"
[[broker]]
name = "test"
host = "127.0.0.1"
port = {broker_port}
keep_alive = "5s"
{extra_broker}
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
"#,
        spool = dir.join("spool.db").display()
    )
}

/// The agent binary the tests run: this build, or `EDGESHIP_AGENT_BIN`.
fn agent_program() -> Vec<std::ffi::OsString> {
    vec![std::env::var_os("EDGESHIP_AGENT_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_edgeship").into())]
}

impl Agent {
    pub fn start(dir: &Path, config: &str) -> Agent {
        // EDGESHIP_AGENT_BIN runs another build of the agent (the `dist` profile for the load
        // program, an ARM build under qemu for cross/e2e.sh) under the same harness.
        Agent::start_at(
            &dir.join("edgeship.toml"),
            config,
            &dir.join("agent.log"),
            agent_program(),
        )
    }

    /// Writes `config` to `config_path` (keeping the file's owner and mode if it exists) and
    /// starts `program run --config config_path`, its log in `log_path`.
    pub fn start_at(
        config_path: &Path,
        config: &str,
        log_path: &Path,
        program: Vec<std::ffi::OsString>,
    ) -> Agent {
        let mut a = Agent::prepare(config_path, config, log_path, program);
        a.spawn();
        a
    }

    /// Writes the config and returns the agent, not started.
    fn prepare(
        config_path: &Path,
        config: &str,
        log_path: &Path,
        program: Vec<std::ffi::OsString>,
    ) -> Agent {
        let config_path = config_path.to_path_buf();
        let config = if config.contains("[admin]") {
            config.to_string()
        } else {
            format!(
                "{config}\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
                free_port()
            )
        };
        std::fs::write(&config_path, &config).unwrap();
        let parsed =
            edgeship::config::Config::parse(&config, "test").expect("test config is valid");
        Agent {
            config_path,
            spool_path: parsed.spool.path,
            log_path: log_path.to_path_buf(),
            admin: parsed
                .admin
                .listen
                .unwrap_or_else(|| "127.0.0.1:9".parse().unwrap()),
            program,
            env: Vec::new(),
            child: None,
        }
    }

    /// Like [`Agent::start`], with environment variables set (`Some`) or removed (`None`).
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, Option<&str>)]) -> Agent {
        let mut a = Agent::prepare(
            &dir.join("edgeship.toml"),
            config,
            &dir.join("agent.log"),
            agent_program(),
        );
        a.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        test_credentials();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut command = Command::new(&self.program[0]);
        command
            .args(&self.program[1..])
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("EDGESHIP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            match v {
                Some(v) => command.env(k, v),
                None => command.env_remove(k),
            };
        }
        let child = command.spawn().expect("starting the agent");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        signal(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "agent did not exit within 20 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GETs a path from the admin endpoint: (HTTP status, body); `None` if it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    }

    /// Waits until the Kinesis sink has listed the stream's shards (throttled entries are
    /// attributed to shards with that map).
    pub fn wait_shards_learned(&self) {
        wait_for(
            "the agent to learn the shards",
            Duration::from_secs(30),
            || {
                self.log()
                    .contains("learned the stream's shards")
                    .then_some(())
            },
        );
    }

    /// One `/metrics` scrape, parsed.
    pub fn scrape(&self) -> Scrape {
        let (status, body) = wait_for(
            "the admin endpoint to answer",
            Duration::from_secs(20),
            || self.get("/metrics"),
        );
        assert_eq!(status, 200, "{body}");
        Scrape::parse(&body)
    }

    /// The spool's accounting: asked of the running agent (`/status`), which keeps its spool
    /// file to itself while it runs; read from the file once its process has exited. `None`
    /// while a live agent does not answer (starting or stopping): its file is held, and
    /// reading it would only wait out SQLite's busy timeout (1 s) to be refused.
    pub fn accounting(&self) -> Option<edgeship::spool::Accounting> {
        if let Some(child) = &self.child {
            let asked = self.get("/status").and_then(|(_, body)| {
                let mut doc: serde_json::Value = serde_json::from_str(&body).ok()?;
                serde_json::from_value(doc["spool"]["accounting"].take()).ok()
            });
            if asked.is_some() || process_lives(child.id()) {
                return asked;
            }
        }
        edgeship::spool::store::read_accounting_at(&self.spool_path).ok()
    }

    /// A copy of the spool's file and its write-ahead log (`spool.db` in the folder
    /// returned), for reading it while the agent runs (it keeps the file to itself): what its
    /// commits had written when the copy was taken. A checkpoint between the two copies can
    /// make one that reads an older state or none: callers poll.
    fn copy_spool(&self) -> Option<tempfile::TempDir> {
        let dir = tempdir();
        let copy = dir.path().join("spool.db");
        std::fs::copy(&self.spool_path, &copy).ok()?;
        let wal = |p: &Path| PathBuf::from(format!("{}-wal", p.display()));
        match std::fs::copy(wal(&self.spool_path), wal(&copy)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => None,
            _ => Some(dir),
        }
    }

    /// A copy of the spool (see `copy_spool`) open for reading its tables; the copy lives as
    /// long as the folder returned.
    pub fn spool_copy(&self) -> Option<(tempfile::TempDir, rusqlite::Connection)> {
        let dir = self.copy_spool()?;
        let conn = rusqlite::Connection::open(dir.path().join("spool.db")).ok()?;
        Some((dir, conn))
    }

    /// The accounting of a copy of the spool (see `copy_spool`): costs the agent nothing,
    /// where each `/status` request takes it about 0.3 ms of CPU (polled every 50 ms at 20
    /// msg/s, the shapes program measured 406.7 us per message against 22.0). For the load
    /// programs, which measure the agent's CPU; the reader pays for the copy, so for spools
    /// of a few MiB.
    pub fn accounting_from_copy(&self) -> Option<edgeship::spool::Accounting> {
        let dir = self.copy_spool()?;
        edgeship::spool::store::read_accounting_at(&dir.path().join("spool.db")).ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the agent's MQTT session is up (it logs "connected") `times` times, and
    /// its subscriptions are granted: a message published before that has no subscriber.
    pub fn wait_connected(&self, times: usize) {
        wait_for(
            "the agent to connect to the broker",
            Duration::from_secs(30),
            || (self.log().matches(" connected").count() >= times).then_some(()),
        );
        wait_for(
            "the broker to grant the agent's subscriptions",
            Duration::from_secs(30),
            || (self.log().matches(" subscribed").count() >= times).then_some(()),
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temp folder goes with the test: show what the agent said before it does.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of the agent's log ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("--- its spool: {:?}", self.accounting());
            if let Some((_, metrics)) = self.get("/metrics") {
                eprintln!("--- its /metrics (no histograms) ---");
                for line in metrics.lines().filter(|l| {
                    !l.starts_with('#') && !l.contains("_bucket") && !l.starts_with("process_")
                }) {
                    eprintln!("{line}");
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Simulated devices.

/// The payload device `device` sends as its `seq`-th message: telemetry JSON of ~200 bytes,
/// unique per (device, seq).
pub fn payload(device: u32, seq: u32) -> Vec<u8> {
    format!(
        r#"{{"device":"dev-{device:03}","seq":{seq},"temp_c":{:.2},"humidity_pct":{:.1},"pressure_kpa":{:.2},"vibration_mm_s":{:.3},"battery_v":3.61,"status":"ok","fw":"2.4.1","site":"plant-7"}}"#,
        20.0 + (seq % 100) as f64 * 0.05,
        40.0 + (device % 30) as f64,
        101.0 + (seq % 7) as f64 * 0.1,
        (seq % 13) as f64 * 0.011
    )
    .into_bytes()
}

/// Publishes `per_device` messages from each of `devices` clients at QoS 1 to
/// `devices/dev-NNN/telemetry`, as fast as the broker takes them. Returns once every publish
/// is acked by the broker. `acked` counts broker acks as they arrive.
pub async fn publish(port: u16, devices: u32, per_device: u32, acked: Arc<AtomicU64>) {
    publish_with(port, devices, per_device, acked, payload, "").await
}

pub async fn publish_with(
    port: u16,
    devices: u32,
    per_device: u32,
    acked: Arc<AtomicU64>,
    make: impl Fn(u32, u32) -> Vec<u8> + Send + Sync + Clone + 'static,
    client_prefix: &str,
) {
    let mut tasks = Vec::new();
    for d in 0..devices {
        let acked = acked.clone();
        let make = make.clone();
        let client_id = format!("{client_prefix}dev-{d:03}-{}", std::process::id());
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(100)
                .set_max_packet_size(16 << 20, 16 << 20);
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 200);
            let topic = format!("devices/dev-{d:03}/telemetry");
            let sender = tokio::spawn(async move {
                for s in 0..per_device {
                    client
                        .publish(&topic, rumqttc::QoS::AtLeastOnce, false, make(d, s))
                        .await
                        .unwrap();
                }
                client
            });
            let deadline = Instant::now() + Duration::from_secs(300);
            await_pubacks(&mut events, d, per_device, deadline, &acked).await;
            let client = sender.await.unwrap();
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while events.poll().await.is_ok() {}
            })
            .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Publishes `payload(device, 0..n)` on `topic`, QoS 1, all acked.
pub async fn publish_on(port: u16, topic: String, device: u32, n: u32) {
    let client_id = format!("pub-{device}-{}", topic.replace('/', "-"));
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (c, mut events) = rumqttc::AsyncClient::new(opts, 1000);
    tokio::spawn(async move {
        for s in 0..n {
            c.publish(
                topic.clone(),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload(device, s),
            )
            .await
            .unwrap();
        }
    });
    let mut acked = 0;
    while acked < n {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = events.poll().await.unwrap() {
            acked += 1;
        }
    }
}

/// Counts each (topic, payload) among decoded messages.
pub fn tally(messages: &[frame::Record]) -> HashMap<(String, Vec<u8>), u32> {
    let mut m = HashMap::new();
    for r in messages {
        *m.entry((r.topic.clone(), r.payload.clone())).or_insert(0) += 1;
    }
    m
}

/// Asserts that the stream holds exactly the messages devices 0..devices sent (seq
/// 0..per_device), each at least once; returns the number of duplicates.
pub fn assert_all_delivered(messages: &[frame::Record], devices: u32, per_device: u32) -> u64 {
    let t = tally(messages);
    let mut missing = Vec::new();
    let mut duplicates = 0u64;
    for d in 0..devices {
        for s in 0..per_device {
            let key = (format!("devices/dev-{d:03}/telemetry"), payload(d, s));
            match t.get(&key) {
                None => missing.push((d, s)),
                Some(n) => duplicates += u64::from(n - 1),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} messages missing from the stream (first: {:?})",
        missing.len(),
        devices * per_device,
        &missing[..missing.len().min(5)]
    );
    let expected = u64::from(devices * per_device);
    assert_eq!(
        t.len() as u64,
        expected,
        "the stream holds messages nobody published"
    );
    duplicates
}

/// A one-thread runtime of its own and a listener on a free loopback port, for the test
/// servers (Kinesis proxy, credentials endpoint) that run beside the agent.
pub fn background_listener() -> (tokio::runtime::Runtime, tokio::net::TcpListener, u16) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    (runtime, listener, port)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("edgeship-e2e-")
        .tempdir()
        .unwrap()
}

/// The topic device `d` publishes on.
pub fn topic_of(d: u32) -> String {
    format!("devices/dev-{d:03}/telemetry")
}

/// Polls the stream until it holds every message of devices 0..devices x 0..per_device.
pub fn wait_stream_complete(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    devices: u32,
    per_device: u32,
    timeout: Duration,
) -> StreamContents {
    let contents = wait_stream_complete_with(rt, client, stream, timeout, |t| {
        (0..devices).all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), payload(d, s)))))
    });
    assert_all_delivered(&contents.messages, devices, per_device);
    contents
}

/// Polls the stream until `complete` holds for the tally of its messages.
pub fn wait_stream_complete_with(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    timeout: Duration,
    complete: impl Fn(&HashMap<(String, Vec<u8>), u32>) -> bool,
) -> StreamContents {
    let deadline = Instant::now() + timeout;
    loop {
        let contents = rt.block_on(read_stream(client, stream));
        if complete(&tally(&contents.messages)) {
            return contents;
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} incomplete after {timeout:?}: {} messages in it",
            contents.messages.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Deterministic incompressible bytes for (device, seq).
pub fn noise(device: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut x = (u64::from(device) << 32 | u64::from(seq)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading the agent's /metrics.

/// A parsed scrape: every sample by name and labels. Parsing is strict about the sample
/// syntax; the exposition format itself is checked by real parsers in the tests.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

/// (metric name, labels, value).
pub type Sample = (String, Vec<(String, String)>, f64);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("labels end with }");
                    let mut labels = Vec::new();
                    let mut chars = rest.chars().peekable();
                    while chars.peek().is_some() {
                        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                        assert_eq!(chars.next(), Some('"'), "{line}");
                        let mut value = String::new();
                        while let Some(c) = chars.next() {
                            match c {
                                '\\' => match chars.next() {
                                    Some('n') => value.push('\n'),
                                    Some(other) => value.push(other),
                                    None => panic!("{line}"),
                                },
                                '"' => break,
                                c => value.push(c),
                            }
                        }
                        labels.push((key, value));
                        if chars.peek() == Some(&',') {
                            chars.next();
                        }
                    }
                    (name.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// Sum of the samples of `name` whose labels include all of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Like [`Scrape::sum`] for counts, which must be whole numbers.
    pub fn count(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        let v = self.sum(name, filter);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name} {filter:?} = {v}");
        v as u64
    }

    /// Values of one label across the samples of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, labels, _)| {
                labels
                    .iter()
                    .find(|(k, _)| k == label)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// received = delivered + dropped + pending, in this scrape (one consistent snapshot).
    pub fn balances(&self) -> bool {
        self.count("edgeship_records_received_total", &[])
            == self.count("edgeship_records_delivered_total", &[])
                + self.count("edgeship_records_dropped_total", &[])
                + self.count("edgeship_records_pending", &[])
    }
}

/// The stream's open shards as the agent maps keys to them.
pub async fn shard_map(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> edgeship::sink::kinesis::shard::ShardMap {
    let ranges = shard_ranges(client, stream).await;
    edgeship::sink::kinesis::shard::ShardMap::new(
        ranges
            .iter()
            .map(|(id, a, b)| (id.as_str(), a.as_str(), b.as_str())),
    )
    .expect("the stream's shard ranges")
}

/// The stream's open shards as (id, starting hash key, ending hash key), from the emulator.
pub async fn shard_ranges(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Vec<(String, String, String)> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    shards
        .shards()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().expect("hash key range");
            (
                s.shard_id().to_string(),
                r.starting_hash_key().to_string(),
                r.ending_hash_key().to_string(),
            )
        })
        .collect()
}

/// The Python interpreter with the test tools (prometheus-client, zstandard) installed by
/// scripts/test.sh; `EDGESHIP_PYTHON` overrides.
pub fn python() -> PathBuf {
    std::env::var_os("EDGESHIP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/support/.venv/bin/python3"))
}

/// `promtool`, extracted from Debian's prometheus package by scripts/test.sh;
/// `EDGESHIP_PROMTOOL` overrides.
pub fn promtool() -> PathBuf {
    std::env::var_os("EDGESHIP_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/support/bin/promtool"))
}

/// Drives a publisher's event loop until the broker has acked `n` of its messages (each
/// counted in `acked`), failing at `deadline`.
async fn await_pubacks(
    events: &mut rumqttc::EventLoop,
    device: u32,
    n: u32,
    deadline: Instant,
    acked: &AtomicU64,
) {
    await_acks(
        events,
        device,
        n,
        deadline,
        acked,
        rumqttc::QoS::AtLeastOnce,
    )
    .await
}

/// Waits for `n` PUBACKs (QoS 1) or PUBCOMPs (QoS 2) on `events`.
pub async fn await_acks(
    events: &mut rumqttc::EventLoop,
    device: u32,
    n: u32,
    deadline: Instant,
    acked: &AtomicU64,
    qos: rumqttc::QoS,
) {
    let mut mine = 0;
    while mine < n {
        assert!(
            Instant::now() < deadline,
            "device {device}: only {mine} of {n} acked"
        );
        match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))))
                if qos == rumqttc::QoS::AtLeastOnce =>
            {
                mine += 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_))))
                if qos == rumqttc::QoS::ExactlyOnce =>
            {
                mine += 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) | Err(_) => {}
            // The broker may restart under a test: rumqttc reconnects and resends.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Each of `devices` devices publishes `per_device` messages, QoS 1, spread evenly over
/// `spread`; returns how many the broker acked (all of them, or the test fails).
pub async fn publish_paced(port: u16, devices: u32, per_device: u32, spread: Duration) -> u64 {
    publish_paced_at(port, devices, per_device, spread, rumqttc::QoS::AtLeastOnce).await
}

/// [`publish_paced`] at QoS 1 or 2 (each message complete when PUBACK or PUBCOMP came).
pub async fn publish_paced_at(
    port: u16,
    devices: u32,
    per_device: u32,
    spread: Duration,
    qos: rumqttc::QoS,
) -> u64 {
    publish_paced_with(port, devices, per_device, spread, qos, payload).await
}

/// [`publish_paced_at`] with the payloads of `make(device, seq)`.
pub async fn publish_paced_with(
    port: u16,
    devices: u32,
    per_device: u32,
    spread: Duration,
    qos: rumqttc::QoS,
    make: fn(u32, u32) -> Vec<u8>,
) -> u64 {
    let acked = Arc::new(AtomicU64::new(0));
    let interval = spread / per_device.max(1);
    let mut tasks = Vec::new();
    for d in 0..devices {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(format!("storm-{d}"), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(100);
            let (c, mut events) = rumqttc::AsyncClient::new(opts, 1000);
            let sender = tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                for s in 0..per_device {
                    tick.tick().await;
                    c.publish(topic_of(d), qos, false, make(d, s))
                        .await
                        .unwrap();
                }
                c
            });
            let deadline = Instant::now() + spread + Duration::from_secs(300);
            await_acks(&mut events, d, per_device, deadline, &acked, qos).await;
            let c = sender.await.unwrap();
            let _ = c.disconnect().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    acked.load(Ordering::Relaxed)
}

/// What /proc says about a process.
#[derive(Default, Clone, Copy)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub cpu_s: f64,
    pub write_bytes: u64,
}

/// The whole machine's CPU time since boot by kind, in the kernel's ticks (USER_HZ, 100 a
/// second): `/proc/stat`'s first line, user, nice, system, idle, iowait, irq, softirq, steal.
pub fn machine_cpu_ticks() -> [u64; 8] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut ticks = [0u64; 8];
    let fields = stat.lines().next().unwrap_or("").split_whitespace().skip(1);
    for (t, v) in ticks.iter_mut().zip(fields) {
        *t = v.parse().unwrap_or(0);
    }
    ticks
}

/// Whether process `pid` runs: it exists and is not a zombie (exited, not yet waited for).
fn process_lives(pid: u32) -> bool {
    // The state is the first field after "pid (comm)".
    !matches!(
        stat_fields(pid).first().map(String::as_str),
        Some("Z" | "X") | None
    )
}

/// The fields of `/proc/PID/stat` after "pid (comm)" (none if the process is gone).
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_comm.split_whitespace().map(str::to_string).collect()
}

pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fields = stat_fields(pid);
    // utime and stime are fields 14 and 15 of stat; after "pid (comm)" they are at 11 and 12.
    let ticks: u64 = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let write_bytes = io
        .lines()
        .find(|l| l.starts_with("write_bytes:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProcStats {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_s: ticks as f64 / 100.0,
        write_bytes,
    }
}

/// Ends the broker's persistent session of `client_id`: a clean-session connect replaces it.
pub async fn forget_session(port: u16, client_id: &str) {
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(true);
    let (c, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    loop {
        match ev.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("forgetting the session of {client_id}: {e}"),
        }
    }
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

/// A QoS 1 subscriber to `devices/+/telemetry` speaking `protocol` ("5" or "3.1.1") that does
/// nothing with what it receives: the broker's own rate, the baseline the load programs compare
/// the agent with. Returns once it is subscribed; the task ends after `total` messages.
pub async fn do_nothing_subscriber(
    port: u16,
    protocol: &str,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let subscriber = if protocol == "5" {
        tokio::spawn(async move {
            use rumqttc::v5::mqttbytes::v5::Packet;
            let mut opts = rumqttc::v5::MqttOptions::new(
                format!("baseline-5-{}", std::process::id()),
                "127.0.0.1",
                port,
            );
            opts.set_keep_alive(Duration::from_secs(30))
                .set_max_packet_size(Some(1 << 20));
            let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 1000);
            client
                .subscribe(
                    "devices/+/telemetry",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                )
                .await
                .unwrap();
            let mut ready = Some(ready_tx);
            let mut received = 0u64;
            loop {
                match events.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(_))) => {
                        received += 1;
                        if received >= total {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("baseline subscriber (MQTT 5): {e}"),
                }
            }
            let _ = client.disconnect().await;
        })
    } else {
        tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(
                format!("baseline-311-{}", std::process::id()),
                "127.0.0.1",
                port,
            );
            opts.set_keep_alive(Duration::from_secs(30))
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 1000);
            client
                .subscribe("devices/+/telemetry", rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            let mut ready = Some(ready_tx);
            let mut received = 0u64;
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                        received += 1;
                        if received >= total {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("baseline subscriber (MQTT 3.1.1): {e}"),
                }
            }
            let _ = client.disconnect().await;
        })
    };
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("the baseline subscriber subscribed in time")
        .expect("the baseline subscriber subscribed");
    subscriber
}

// ---------------------------------------------------------------------------------------
// S3 servers

/// An S3 server on a free port, stopped on drop.
pub struct S3Server {
    pub port: u16,
    child: Child,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// moto's server (PyPI `moto[server]`, in the tests' venv).
    pub fn moto(dir: &Path) -> S3Server {
        let port = free_port();
        let bin = python().with_file_name("moto_server");
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/test.sh installs it)", bin.display()));
        wait_port(port, Duration::from_secs(60), "moto_server");
        S3Server { port, child }
    }

    /// s3s-fs (crates.io), serving a folder, with the tests' credentials.
    pub fn s3s_fs(dir: &Path) -> S3Server {
        let port = free_port();
        let bin = std::env::var_os("EDGESHIP_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("s3s-fs"));
        let root = dir.join("s3s-root");
        std::fs::create_dir_all(&root).unwrap();
        let log = std::fs::File::create(dir.join("s3s-fs.log")).unwrap();
        let child = Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                "AKIAEDGESHIPTEST",
                "--secret-key",
                "edgeship-test-secret",
            ])
            .arg(&root)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/test.sh builds it and sets EDGESHIP_S3S_FS)",
                    bin.display()
                )
            });
        wait_port(port, Duration::from_secs(60), "s3s-fs");
        S3Server { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Runs `s3_tool.py` with these arguments; its JSON answer.
pub fn s3_tool(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(repo_root().join("tests/support/s3_tool.py"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("s3_tool.py");
    assert!(out.status.success(), "s3_tool.py {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("s3_tool.py prints JSON")
}

/// A tansu broker on a free port, its SQLite database in the test's folder.
pub struct Tansu {
    pub port: u16,
    /// The port it tells clients to connect to (a TLS proxy's in front of it), if not its own.
    pub advertised: Option<u16>,
    dir: PathBuf,
    pub authentication: bool,
    child: Option<Child>,
}

fn tansu_program() -> PathBuf {
    std::env::var_os("EDGESHIP_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tansu"))
}

impl Tansu {
    pub fn start(dir: &Path) -> Tansu {
        let dir = dir.join("tansu");
        std::fs::create_dir_all(&dir).unwrap();
        let mut t = Tansu {
            port: free_port(),
            advertised: None,
            dir,
            authentication: false,
            child: None,
        };
        t.spawn();
        t
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let mut cmd = Command::new(tansu_program());
        cmd.current_dir(&self.dir)
            .arg("broker")
            .args(["--listener-url", &self.url()])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port)),
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .arg("--silent")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.authentication {
            cmd.arg("--authentication");
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/test.sh builds it and sets EDGESHIP_TANSU)",
                tansu_program().display()
            )
        });
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(60), "tansu");
    }

    /// Kills it (as a crash would) and starts it again on the same port and database.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs tansu's own command line against it.
    fn cli(&self, args: &[&str]) {
        let out = Command::new(tansu_program())
            .current_dir(&self.dir)
            .args(args)
            .args(["--broker", &self.url()])
            .output()
            .expect("tansu");
        assert!(
            out.status.success(),
            "tansu {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        self.cli(&[
            "topic",
            "create",
            topic,
            "--partitions",
            &partitions.to_string(),
        ]);
    }

    /// A SCRAM-SHA-512 user, then authentication required from the next start on.
    pub fn require_scram_user(&mut self, user: &str, password: &str) {
        self.cli(&["user", "create", user, password, "--mechanism", "scram512"]);
        self.authentication = true;
        self.restart();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One record read back.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: u32,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: std::collections::BTreeMap<String, String>,
    pub timestamp: u64,
}

pub fn kafka_tool(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(repo_root().join("tests/support/kafka_tool.py"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("kafka_tool.py");
    assert!(out.status.success(), "kafka_tool.py {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("kafka_tool.py prints JSON")
}

/// Every record of `topic`, and its partition count.
pub fn kafka_consume(bootstrap: &str, topic: &str, options: &[&str]) -> (Vec<Consumed>, u32) {
    let mut args = vec![bootstrap, "consume", topic];
    args.extend_from_slice(options);
    let answer = kafka_tool(&args);
    let records = answer["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Consumed {
            partition: r["partition"].as_u64().unwrap() as u32,
            key: r["key"].as_str().unwrap_or_default().to_string(),
            value: base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                r["value_b64"].as_str().unwrap(),
            )
            .unwrap(),
            headers: r["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            timestamp: r["timestamp"].as_u64().unwrap(),
        })
        .collect();
    (records, answer["partitions"].as_u64().unwrap() as u32)
}

/// The partitions kafka-python's default partitioner gives each key.
pub fn partitions_of(
    keys: &std::collections::BTreeSet<String>,
    partitions: u32,
) -> std::collections::BTreeMap<String, u32> {
    keys.iter()
        .map(|k| {
            let p = kafka_tool(&["-", "partition", k, &partitions.to_string()]);
            (k.clone(), p.as_u64().unwrap() as u32)
        })
        .collect()
}

/// The stream reader against a page the emulator cuts inside one PutRecords call's records:
/// the emulator counts MillisBehindLatest from a page's last record, so that page reads 0
/// with records still to come, and a reader that took such a page for the end of the shard
/// missed the rest. 13 frames of about 1 MB in calls of 3, 5 and 5: a page of at most 10 MB
/// ends inside the third call.
#[cfg(test)]
#[test]
fn the_stream_reader_reads_past_a_page_cut_inside_the_newest_call() {
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::PutRecordsRequestEntry;
    let rt = runtime();
    let client = rt.block_on(kinesis_client(&kinesis().endpoint()));
    let name = "e2e-reader-pages";
    rt.block_on(create_stream(&client, name, 1));
    let frames: Vec<Vec<u8>> = (0..13u64)
        .map(|i| {
            let payload: Vec<u8> = (0..999_000u64).map(|b| (b * 7 + i * 13) as u8).collect();
            let mut body = Vec::new();
            frame::encode_record(&mut body, i, 1_700_000_000_000 + i, "pages/one", &payload);
            frame::encode_frame("gw-pages", 1, &body, None).unwrap()
        })
        .collect();
    rt.block_on(async {
        for call in [&frames[..3], &frames[3..8], &frames[8..]] {
            let entries = call.iter().map(|f| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(f.clone()))
                    .partition_key("k")
                    .build()
                    .unwrap()
            });
            let answer = client
                .put_records()
                .stream_name(name)
                .set_records(Some(entries.collect()))
                .send()
                .await
                .expect("PutRecords");
            assert_eq!(answer.failed_record_count(), Some(0));
        }
    });
    // The condition the reader must survive: the first page is cut short with 0 behind.
    let first = rt.block_on(async {
        let shard = client.list_shards().stream_name(name).send().await.unwrap();
        let iterator = client
            .get_shard_iterator()
            .stream_name(name)
            .shard_id(shard.shards()[0].shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap();
        client
            .get_records()
            .shard_iterator(iterator.shard_iterator().unwrap())
            .limit(1000)
            .send()
            .await
            .unwrap()
    });
    assert!(
        first.records().len() > 8 && first.records().len() < frames.len(),
        "the emulator's first page holds {} of {} records, not a cut inside the third call",
        first.records().len(),
        frames.len()
    );
    assert_eq!(first.millis_behind_latest(), Some(0));
    eprintln!(
        "the emulator's first page: {} of {} records, 0 ms behind",
        first.records().len(),
        frames.len()
    );

    let contents = rt.block_on(read_stream(&client, name));
    assert_eq!(
        contents.raw_records.len(),
        frames.len(),
        "records read back"
    );
    assert!(
        contents.raw_records == frames,
        "every record, in order, byte for byte"
    );
    assert_eq!(contents.messages.len(), frames.len());
    let seqs: Vec<u64> = contents.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (0..13).collect::<Vec<u64>>());
}
