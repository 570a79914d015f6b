//! The end-to-end load program: real Mosquitto, the real Kinesis emulator and the agent as a
//! separate process, all on loopback; prints one table of the figures the performance budget
//! (DESIGN.md section 3) names, and writes them as JSON for comparing runs.
//!
//! ```text
//! cargo bench --bench load                   # full run: 1,000,000 messages, 500 MB backlog
//! cargo bench --bench load -- --quick        # under a minute: a smoke test, figures are rough
//! cargo bench --bench load -- --messages 200000 --devices 50 --backlog-mb 100 --json out.json
//! cargo bench --bench load -- --format kpl   # the route's frames in the KPL aggregated format
//! cargo bench --bench load -- --protocol 3.1.1 --window 4000   # MQTT 3.1.1, a wider window
//! cargo bench --bench load -- --rounds 5     # five baseline + throughput rounds, not three
//! ```
//!
//! Scenarios, each measured in the same run:
//! 1. baseline: the broker delivering N QoS 1 messages to a do-nothing subscriber;
//! 2. throughput: the same N messages through the agent until Kinesis accepted them all;
//!    1 and 2 run back to back in rounds (`--rounds`, 3 in a full run), and the table takes
//!    the round with the median share: a small machine's broker rate moves by a third from
//!    one minute to the next, so one baseline against one throughput run measures the machine;
//! 3. half load: the agent fed at half the rate it reached, for ack latency;
//! 4. ingest alone: the same N messages into an agent whose Kinesis endpoint is cut, so the
//!    emulator sits idle and the broker, the publishers and the agent share the machine as they
//!    do in the baseline;
//! 5. backlog: the Kinesis endpoint cut while a backlog builds, then restored and drained.
//!
//! The CPU each process took in the baseline and the throughput phase is in the table: on a
//! small machine the emulator competes with the broker for the same cores.
//!
//! It asserts nothing about speed; it fails only if messages go missing.

#[path = "../tests/e2e/support.rs"]
mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

struct Args {
    quick: bool,
    messages: u64,
    devices: u32,
    backlog_mb: u64,
    json: Option<PathBuf>,
    /// MQTT protocol of the agent's session: "3.1.1" or "5".
    protocol: String,
    /// Frame format of the route: "edgeship", "kpl" or "ndjson".
    format: String,
    /// The agent's `max_unacked`, and the broker's inflight limit per client (both 1,000 by
    /// default): the window the broker and the agent keep between them.
    window: u32,
    /// Rounds of baseline + throughput (3 in a full run, 1 with --quick): the table reports the
    /// median round's shares.
    rounds: u32,
}

fn parse_args() -> Args {
    let mut a = Args {
        quick: false,
        messages: 1_000_000,
        devices: 50,
        backlog_mb: 500,
        json: None,
        protocol: "5".into(),
        format: "edgeship".into(),
        window: 1_000,
        rounds: 0,
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
            "--devices" => a.devices = value("--devices").parse().expect("--devices N"),
            "--backlog-mb" => {
                a.backlog_mb = value("--backlog-mb").parse().expect("--backlog-mb N");
                explicit.1 = true;
            }
            "--json" => a.json = Some(PathBuf::from(value("--json"))),
            "--protocol" => a.protocol = value("--protocol"),
            "--format" => a.format = value("--format"),
            "--window" => a.window = value("--window").parse().expect("--window N"),
            "--rounds" => a.rounds = value("--rounds").parse().expect("--rounds N"),
            // cargo bench passes --bench; ignore harness flags.
            _ => {}
        }
    }
    if a.rounds == 0 {
        a.rounds = if a.quick { 1 } else { 3 };
    }
    if a.quick {
        if !explicit.0 {
            a.messages = 50_000;
        }
        if !explicit.1 {
            a.backlog_mb = 10;
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

/// ~200 bytes of telemetry JSON carrying its publish time.
fn timed_payload(device: u32, seq: u32) -> Vec<u8> {
    let mut p = payload(device, seq);
    let tail = format!(",\"pub_ms\":{}}}", now_ms());
    p.pop();
    p.extend_from_slice(tail.as_bytes());
    p
}

fn pub_ms(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let at = text.find("\"pub_ms\":")? + 9;
    text[at..].trim_end_matches('}').parse().ok()
}

/// Busy and total CPU ticks of the whole machine since boot (/proc/stat), for its load.
fn machine_ticks() -> (u64, u64) {
    let ticks = machine_cpu_ticks();
    let total: u64 = ticks.iter().sum();
    // idle and iowait are the fourth and fifth.
    (total - ticks[3] - ticks[4], total)
}

/// CPU seconds a set of processes and the machine spent over one phase.
struct PhaseCpu {
    at: Instant,
    procs: Vec<(&'static str, u32, f64)>,
    machine: (u64, u64),
}

impl PhaseCpu {
    fn start(procs: &[(&'static str, u32)]) -> PhaseCpu {
        PhaseCpu {
            at: Instant::now(),
            procs: procs
                .iter()
                .map(|&(name, pid)| (name, pid, proc_stats(pid).cpu_s))
                .collect(),
            machine: machine_ticks(),
        }
    }

    /// "broker 0.93, publishers 0.88, ... of 2 cores busy": cores each took on average.
    fn summary(&self) -> (String, Vec<(&'static str, f64)>) {
        let secs = self.at.elapsed().as_secs_f64();
        let cores: Vec<(&'static str, f64)> = self
            .procs
            .iter()
            .map(|&(name, pid, before)| (name, (proc_stats(pid).cpu_s - before) / secs))
            .collect();
        let (busy, total) = machine_ticks();
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        let machine =
            (busy - self.machine.0) as f64 / (total - self.machine.1).max(1) as f64 * ncpu as f64;
        let mut text: Vec<String> = cores
            .iter()
            .map(|(name, c)| format!("{name} {c:.2}"))
            .collect();
        text.push(format!("machine {machine:.2} of {ncpu}"));
        let mut all = cores;
        all.push(("machine", machine));
        (text.join(", "), all)
    }
}

/// Peak RSS of `pid` while `until` is false, sampled every 50 ms on a thread.
fn rss_sampler(pid: u32) -> (Arc<AtomicU64>, Arc<std::sync::atomic::AtomicBool>) {
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, s) = (peak.clone(), stop.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            p.fetch_max(proc_stats(pid).rss_kib, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (peak, stop)
}

fn cores_json(cores: &[(&str, f64)]) -> serde_json::Value {
    serde_json::Value::Object(
        cores
            .iter()
            .map(|(name, c)| (name.to_string(), serde_json::json!(c)))
            .collect(),
    )
}

fn percentiles(mut v: Vec<u64>) -> (u64, u64, u64) {
    if v.is_empty() {
        return (0, 0, 0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99), *v.last().unwrap())
}

/// Shows what the agent warned about in a phase (slow spool turns, reconnects): the first
/// lines, and how many there were.
fn print_warnings(phase: &str, log: &str) {
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if warnings.is_empty() {
        return;
    }
    eprintln!(
        "  {phase}: the agent logged {} warnings or errors:",
        warnings.len()
    );
    for line in warnings.iter().take(12) {
        eprintln!("    {line}");
    }
}

/// Ack-latency figures the agent logs when its source stops.
fn ack_latency_from_log(log: &str) -> (u64, u64, u64, u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("source stopped"))
        .unwrap_or("");
    let get = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| {
                kv.strip_prefix(&format!("{k}="))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    (
        get("ack_p50_us"),
        get("ack_p99_us"),
        get("ack_max_us"),
        get("max_unacked"),
        get("max_write_backlog_bytes"),
    )
}

/// Publishes `per_device` messages from each of `devices` clients at QoS 1, `total_rate`
/// messages/s together; returns when all were handed to the broker.
async fn publish_paced(
    port: u16,
    devices: u32,
    per_device: u32,
    total_rate: f64,
    make: fn(u32, u32) -> Vec<u8>,
    prefix: &'static str,
) {
    let interval = Duration::from_secs_f64(f64::from(devices) / total_rate.max(0.1));
    let mut tasks = Vec::new();
    for d in 0..devices {
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(format!("{prefix}{d}"), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30));
            let (c, mut ev) = rumqttc::AsyncClient::new(opts, 100);
            // rumqttc reconnects (and resends what is unacked) when polled again after an error.
            let pump = tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
            let mut tick = tokio::time::interval(interval);
            for s in 0..per_device {
                tick.tick().await;
                c.publish(topic_of(d), rumqttc::QoS::AtLeastOnce, false, make(d, s))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = c.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The broker's rate to a do-nothing MQTT 3.1.1 QoS 1 subscriber (the same subscriber in every
/// run, whichever protocol the agent speaks, so runs compare).
fn baseline(rt: &tokio::runtime::Runtime, port: u16, devices: u32, per_device: u32) -> f64 {
    let total = u64::from(devices) * u64::from(per_device);
    let subscriber = rt.block_on(do_nothing_subscriber(port, "3.1.1", total));
    let start = Instant::now();
    rt.block_on(publish_with(
        port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        timed_payload,
        "base-",
    ));
    rt.block_on(subscriber).unwrap();
    total as f64 / start.elapsed().as_secs_f64()
}

/// What every round shares.
struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    args: &'a Args,
    kinesis: &'a KinesisMock,
    client: &'a aws_sdk_kinesis::Client,
    mosquitto: &'a Mosquitto,
    dir: &'a std::path::Path,
    per_device: u32,
    total: u64,
}

type Cores = (String, Vec<(&'static str, f64)>);

/// One round: the broker's rate to a do-nothing subscriber, then the same messages through a
/// fresh agent until Kinesis accepted them all, back to back, so that the share compares the
/// two under the same conditions (this machine's broker rate moves by a third between minutes).
struct Round {
    baseline_rate: f64,
    baseline_cpu: Cores,
    ingest_rate: f64,
    agent_rate: f64,
    cpu: Cores,
    /// The agent's CPU seconds, disk writes and peak RSS over the run.
    cpu_s: f64,
    write_bytes: u64,
    hwm_kib: u64,
    full_ack: (u64, u64, u64, u64, u64),
    /// Publish to accepted by Kinesis, ms: p50, p99, max.
    accept: (u64, u64, u64),
    received: u64,
    kinesis_records: usize,
    kinesis_bytes: usize,
    put_units: u64,
    payload_bytes: u64,
    dir: PathBuf,
    config: String,
    client_id: String,
}

impl Round {
    fn ingest_share(&self) -> f64 {
        self.ingest_rate / self.baseline_rate
    }

    fn e2e_share(&self) -> f64 {
        self.agent_rate / self.baseline_rate
    }
}

fn round(ctx: &Ctx, r: u32) -> Round {
    let (rt, args, total) = (ctx.rt, ctx.args, ctx.total);
    let me = std::process::id();
    let broker_pid = ctx.mosquitto.pid().unwrap();
    let port = ctx.mosquitto.port;
    eprintln!(
        "  round {} of {}: baseline, do-nothing subscriber ...",
        r + 1,
        args.rounds
    );
    let cpu = PhaseCpu::start(&[("broker", broker_pid), ("publishers+subscriber", me)]);
    let baseline_rate = baseline(rt, port, args.devices, ctx.per_device);
    let baseline_cpu = cpu.summary();

    eprintln!(
        "  round {} of {}: through the agent to Kinesis ...",
        r + 1,
        args.rounds
    );
    let stream = format!("load-throughput-{r}");
    let gateway = format!("gw-throughput-{r}");
    rt.block_on(create_stream(ctx.client, &stream, 1));
    let dir = ctx.dir.join(format!("throughput-{r}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = agent_config(
        &dir,
        port,
        &ctx.kinesis.endpoint(),
        &stream,
        "max_bytes = \"2GiB\"",
        &format!(
            "protocol = \"{}\"\nmax_unacked = {}",
            args.protocol, args.window
        ),
    )
    .replace(
        "gateway_id = \"gw-test\"",
        &format!("gateway_id = \"{gateway}\""),
    )
    .replace("keep_alive = \"5s\"", "keep_alive = \"30s\"")
    .replace(
        "partition_key = \"{topic[1]}\"",
        &format!(
            "partition_key = \"{{gateway}}\"\nformat = \"{}\"",
            args.format
        ),
    )
    .replace("linger = \"200ms\"", "linger = \"1s\"");
    let mut agent = Agent::start(&dir, &config);
    agent.wait_connected(1);
    let pid = agent.pid().unwrap();
    let before = proc_stats(pid);
    let phase_cpu = PhaseCpu::start(&[
        ("broker", broker_pid),
        ("publishers", me),
        ("emulator", ctx.kinesis.pid()),
        ("agent", pid),
    ]);
    let start = Instant::now();
    let publisher = rt.spawn(publish_with(
        port,
        args.devices,
        ctx.per_device,
        Arc::new(AtomicU64::new(0)),
        timed_payload,
        "tp-",
    ));
    let mut spooled_at = None;
    // Read from a copy of the spool every 200 ms: asking the agent (`/status`) costs it CPU
    // this program measures.
    let acc = wait_every(
        "the agent to deliver every message",
        Duration::from_secs(1800),
        Duration::from_millis(200),
        || {
            let a = agent.accounting_from_copy()?;
            if a.received >= total && spooled_at.is_none() {
                spooled_at = Some(start.elapsed().as_secs_f64());
            }
            (a.delivered >= total).then_some(a)
        },
    );
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = phase_cpu.summary();
    rt.block_on(publisher).unwrap();
    let after = proc_stats(pid);
    assert_eq!(agent.stop().code(), Some(0));
    let full_ack = ack_latency_from_log(&agent.log());
    print_warnings("throughput", &agent.log());
    let back = rt.block_on(read_stream(ctx.client, &stream));
    assert!(
        back.messages.len() as u64 >= total,
        "messages missing: {} of {total}",
        back.messages.len()
    );
    let accept_latency_ms: Vec<u64> = back
        .messages
        .iter()
        .zip(&back.arrivals_ms)
        .filter_map(|(m, arrived)| pub_ms(&m.payload).map(|p| arrived.saturating_sub(p)))
        .collect();
    // Its persistent session would otherwise queue every later message for a client that
    // never returns (the half-load run starts it again).
    let client_id = format!("edgeship-{gateway}");
    rt.block_on(forget_session(port, &client_id));
    let round = Round {
        baseline_rate,
        baseline_cpu,
        ingest_rate: total as f64 / spooled_at.unwrap_or(elapsed),
        agent_rate: total as f64 / elapsed,
        cpu,
        cpu_s: after.cpu_s - before.cpu_s,
        write_bytes: after.write_bytes - before.write_bytes,
        hwm_kib: after.hwm_kib,
        full_ack,
        accept: percentiles(accept_latency_ms),
        received: acc.received,
        kinesis_records: back.kinesis_records,
        kinesis_bytes: back.kinesis_bytes,
        put_units: back.put_units,
        payload_bytes: back.messages.iter().map(|m| m.payload.len() as u64).sum(),
        dir,
        config,
        client_id,
    };
    eprintln!(
        "  round {} of {}: baseline {:.0} msg/s, ingest {:.0}%, end to end {:.0}%",
        r + 1,
        args.rounds,
        baseline_rate,
        100.0 * round.ingest_share(),
        100.0 * round.e2e_share()
    );
    round
}

fn main() {
    let args = parse_args();
    let per_device = (args.messages / u64::from(args.devices)) as u32;
    let total = u64::from(per_device) * u64::from(args.devices);
    let rt = runtime();
    let dir = tempdir();
    eprintln!(
        "edgeship load: {total} messages from {} devices (QoS 1){}",
        args.devices,
        if args.quick { ", quick" } else { "" }
    );
    let kinesis = kinesis();
    let client = rt.block_on(kinesis_client(&kinesis.endpoint()));
    let mosquitto = Mosquitto::start_with(
        dir.path(),
        &format!("max_inflight_messages {}\n", args.window),
    );

    // 1-2. Rounds of the baseline and the throughput run, back to back.
    let broker_pid = mosquitto.pid().unwrap();
    let ctx = Ctx {
        rt: &rt,
        args: &args,
        kinesis,
        client: &client,
        mosquitto: &mosquitto,
        dir: dir.path(),
        per_device,
        total,
    };
    let mut rounds: Vec<Round> = (0..args.rounds).map(|r| round(&ctx, r)).collect();
    // The round whose end-to-end share is the median gives the table its rates, bytes and CPU;
    // peaks (RSS, ack latency, unacked) are the worst of all rounds.
    rounds.sort_by(|a, b| a.e2e_share().total_cmp(&b.e2e_share()));
    let median = &rounds[rounds.len() / 2];
    let shares = |f: fn(&Round) -> f64| {
        let mut v: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.0}", 100.0 * f(r)))
            .collect();
        v.sort_by_key(|x| x.parse::<u32>().unwrap_or(0));
        v.join(" / ")
    };
    let ingest_shares = shares(Round::ingest_share).replace(" / ", ", ");
    let e2e_shares = shares(Round::e2e_share).replace(" / ", ", ");
    let baselines = rounds
        .iter()
        .map(|r| format!("{:.0}", r.baseline_rate))
        .collect::<Vec<_>>()
        .join(" / ");
    let worst_ack = rounds
        .iter()
        .map(|r| r.full_ack)
        .max_by_key(|a| (a.1, a.2))
        .unwrap();
    let full_ack = (
        worst_ack.0,
        worst_ack.1,
        worst_ack.2,
        rounds.iter().map(|r| r.full_ack.3).max().unwrap(),
        rounds.iter().map(|r| r.full_ack.4).max().unwrap(),
    );
    let hwm_kib = rounds.iter().map(|r| r.hwm_kib).max().unwrap();
    let baseline_rate = median.baseline_rate;
    let ingest_rate = median.ingest_rate;
    let agent_rate = median.agent_rate;
    let (baseline_cpu, baseline_cpu_json) = median.baseline_cpu.clone();
    let (throughput_cpu, throughput_cpu_json) = median.cpu.clone();
    let (acc_p50, acc_p99, acc_max) = median.accept;
    let payload_bytes = median.payload_bytes;
    let me = std::process::id();

    // 3. Half load: ack latency when the agent is not saturated.
    let half_rate = agent_rate / 2.0;
    let half_secs = if args.quick { 3.0 } else { 10.0 };
    eprintln!("  half load: {half_rate:.0} msg/s for {half_secs} s ...");
    let mut agent = Agent::start(&median.dir, &median.config);
    // Its second start in that folder (one log): its session was forgotten, so it subscribes
    // again, and what is published before the broker granted that would have no subscriber.
    agent.wait_connected(2);
    let per_device_rate = half_rate / f64::from(args.devices);
    let half_per_device = (per_device_rate * half_secs).max(1.0) as u32;
    let half_total = u64::from(half_per_device) * u64::from(args.devices);
    rt.block_on(publish_paced(
        mosquitto.port,
        args.devices,
        half_per_device,
        half_rate,
        |d, s| timed_payload(d, s + 10_000_000),
        "half-",
    ));
    wait_every(
        "the half-load messages to be spooled",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            agent
                .accounting_from_copy()
                .filter(|a| a.received >= total + half_total)
        },
    );
    assert_eq!(agent.stop().code(), Some(0));
    let half_ack = ack_latency_from_log(&agent.log());
    print_warnings("half load", &agent.log());
    // The throughput agent's persistent session would otherwise keep queueing every message
    // published below for a client that never returns (millions of them: the broker's memory
    // and CPU, not the agent under test, would set the pace).
    rt.block_on(forget_session(mosquitto.port, &median.client_id));

    // 4. Ingest alone: the same messages with the Kinesis endpoint cut.
    eprintln!("  ingest alone: {total} messages with the Kinesis endpoint cut ...");
    let ingest_uplink = Uplink::start(kinesis.port);
    ingest_uplink.cut();
    let ingest_dir = dir.path().join("ingest");
    std::fs::create_dir_all(&ingest_dir).unwrap();
    let config = agent_config(
        &ingest_dir,
        mosquitto.port,
        &ingest_uplink.endpoint(),
        "load-ingest",
        "max_bytes = \"4GiB\"",
        &format!(
            "protocol = \"{}\"\nmax_unacked = {}",
            args.protocol, args.window
        ),
    )
    .replace("gateway_id = \"gw-test\"", "gateway_id = \"gw-ingest\"")
    .replace("keep_alive = \"5s\"", "keep_alive = \"30s\"")
    .replace(
        "partition_key = \"{topic[1]}\"",
        &format!(
            "partition_key = \"{{gateway}}\"\nformat = \"{}\"",
            args.format
        ),
    );
    let mut agent = Agent::start(&ingest_dir, &config);
    agent.wait_connected(1);
    let pid = agent.pid().unwrap();
    let ingest_before = proc_stats(pid);
    let cpu = PhaseCpu::start(&[("broker", broker_pid), ("publishers", me), ("agent", pid)]);
    let start = Instant::now();
    let publisher = rt.spawn(publish_with(
        mosquitto.port,
        args.devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
        timed_payload,
        "in-",
    ));
    wait_every(
        "the agent to spool every message",
        Duration::from_secs(1800),
        Duration::from_millis(200),
        || agent.accounting_from_copy().filter(|a| a.received >= total),
    );
    let alone_rate = total as f64 / start.elapsed().as_secs_f64();
    let (alone_cpu, alone_cpu_json) = cpu.summary();
    let alone_agent_cpu = proc_stats(pid).cpu_s - ingest_before.cpu_s;
    rt.block_on(publisher).unwrap();
    assert_eq!(agent.stop().code(), Some(0));
    let alone_ack = ack_latency_from_log(&agent.log());
    print_warnings("ingest alone", &agent.log());
    rt.block_on(forget_session(mosquitto.port, "edgeship-gw-ingest"));
    drop(ingest_uplink);

    // 5. Backlog: build it with the uplink cut, then drain.
    let backlog_msgs = (args.backlog_mb * 1_000_000 / 200).max(u64::from(args.devices));
    let backlog_per_device = (backlog_msgs / u64::from(args.devices)) as u32;
    let backlog_total = u64::from(backlog_per_device) * u64::from(args.devices);
    eprintln!(
        "  backlog: {backlog_total} messages with the Kinesis endpoint cut, then drained ..."
    );
    rt.block_on(create_stream(&client, "load-backlog", 1));
    let uplink = Uplink::start(kinesis.port);
    let backlog_dir = dir.path().join("backlog");
    std::fs::create_dir_all(&backlog_dir).unwrap();
    let config = agent_config(
        &backlog_dir,
        mosquitto.port,
        &uplink.endpoint(),
        "load-backlog",
        "max_bytes = \"4GiB\"",
        &format!(
            "protocol = \"{}\"\nmax_unacked = {}",
            args.protocol, args.window
        ),
    )
    .replace("gateway_id = \"gw-test\"", "gateway_id = \"gw-backlog\"")
    .replace("keep_alive = \"5s\"", "keep_alive = \"30s\"")
    .replace(
        "partition_key = \"{topic[1]}\"",
        "partition_key = \"{gateway}\"",
    );
    let mut agent = Agent::start(&backlog_dir, &config);
    agent.wait_connected(1);
    uplink.cut();
    let pid = agent.pid().unwrap();
    let (build_peak, build_stop) = rss_sampler(pid);
    let build_start = Instant::now();
    // Published at three quarters of the rate the agent sustained above, so the backlog grows
    // in the agent's spool (the uplink is cut), not in the broker's queue for the agent.
    rt.block_on(publish_paced(
        mosquitto.port,
        args.devices,
        backlog_per_device,
        0.75 * agent_rate,
        payload,
        "bl-",
    ));
    let built = wait_for(
        "the backlog to be spooled",
        Duration::from_secs(3600),
        || agent.accounting().filter(|a| a.received >= backlog_total),
    );
    let build_secs = build_start.elapsed().as_secs_f64();
    build_stop.store(true, Ordering::Relaxed);
    let (drain_peak, drain_stop) = rss_sampler(pid);
    let drain_start = Instant::now();
    uplink.restore();
    wait_for("the backlog to drain", Duration::from_secs(3600), || {
        agent
            .accounting()
            .filter(|a| a.pending == 0 && a.delivered >= backlog_total)
    });
    let drain_secs = drain_start.elapsed().as_secs_f64();
    drain_stop.store(true, Ordering::Relaxed);
    assert_eq!(agent.stop().code(), Some(0));

    // The table.
    let payload_bytes = payload_bytes as f64;
    let cpu = median.cpu_s;
    let rows: Vec<(&str, String, &str)> = vec![
        (
            "broker -> do-nothing QoS 1 subscriber",
            format!("{baseline_rate:.0} msg/s"),
            "",
        ),
        (
            "rounds: baselines, msg/s",
            baselines.clone(),
            "",
        ),
        (
            "rounds: ingest / end to end shares, %",
            format!("{ingest_shares} / {e2e_shares} (lowest to highest)"),
            "",
        ),
        (
            "edgeship ingest (committed to the spool)",
            format!(
                "{ingest_rate:.0} msg/s = {:.0}% of baseline",
                100.0 * ingest_rate / baseline_rate
            ),
            "",
        ),
        (
            "edgeship ingest alone (Kinesis endpoint cut)",
            format!(
                "{alone_rate:.0} msg/s = {:.0}% of baseline",
                100.0 * alone_rate / baseline_rate
            ),
            "",
        ),
        (
            "edgeship end to end (accepted by Kinesis)",
            format!(
                "{agent_rate:.0} msg/s = {:.0}% of baseline",
                100.0 * agent_rate / baseline_rate
            ),
            ">= 90% of baseline",
        ),
        (
            "Kinesis PUT payload units per 1M messages",
            format!("{:.0}", median.put_units as f64 * 1e6 / total as f64),
            "<= 1,000",
        ),
        (
            "bytes sent to Kinesis / payload bytes",
            format!("{:.3}", median.kinesis_bytes as f64 / payload_bytes),
            "<= 0.15",
        ),
        (
            "spool disk writes / payload bytes",
            format!(
                "{:.3}",
                median.write_bytes as f64 / payload_bytes
            ),
            "<= 1.0",
        ),
        (
            "agent CPU per message",
            format!("{:.1} us ({cpu:.2} s)", cpu * 1e6 / total as f64),
            "<= 20 us",
        ),
        (
            "agent peak RSS, throughput run",
            format!("{:.1} MiB", hwm_kib as f64 / 1024.0),
            "",
        ),
        (
            "ack latency p50 / p99 / max, full load",
            format!(
                "{:.1} / {:.1} / {:.1} ms (most unacked at once: {}; acks waiting for the socket, most: {} KiB)",
                full_ack.0 as f64 / 1e3,
                full_ack.1 as f64 / 1e3,
                full_ack.2 as f64 / 1e3,
                full_ack.3,
                full_ack.4 / 1024
            ),
            "",
        ),
        (
            "ack latency p50 / p99 / max, ingest alone",
            format!(
                "{:.1} / {:.1} / {:.1} ms (most unacked at once: {}; acks waiting for the socket, most: {} KiB)",
                alone_ack.0 as f64 / 1e3,
                alone_ack.1 as f64 / 1e3,
                alone_ack.2 as f64 / 1e3,
                alone_ack.3,
                alone_ack.4 / 1024
            ),
            "",
        ),
        (
            "agent CPU per message, ingest alone",
            format!("{:.1} us", alone_agent_cpu * 1e6 / total as f64),
            "",
        ),
        ("cores busy, baseline", baseline_cpu.clone(), ""),
        ("cores busy, throughput", throughput_cpu.clone(), ""),
        ("cores busy, ingest alone", alone_cpu.clone(), ""),
        (
            "ack latency p50 / p99 / max, half load",
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                half_ack.0 as f64 / 1e3,
                half_ack.1 as f64 / 1e3,
                half_ack.2 as f64 / 1e3
            ),
            "p99 <= 50 ms",
        ),
        (
            "publish -> accepted p50 / p99 / max",
            format!("{acc_p50} / {acc_p99} / {acc_max} ms"),
            "",
        ),
        (
            "messages the agent received / published",
            format!(
                "{} / {total} (redelivered duplicates: {})",
                median.received,
                median.received.saturating_sub(total)
            ),
            "",
        ),
        (
            "backlog built",
            format!(
                "{backlog_total} msgs, {:.0} MB payload, {:.1} MB spooled, {:.0} s",
                backlog_total as f64 * 200.0 / 1e6,
                built.pending_bytes as f64 / 1e6,
                build_secs
            ),
            "",
        ),
        (
            "agent peak RSS while the backlog builds",
            format!(
                "{:.1} MiB",
                build_peak.load(Ordering::Relaxed) as f64 / 1024.0
            ),
            "<= 32 MiB",
        ),
        (
            "agent peak RSS while it drains",
            format!(
                "{:.1} MiB",
                drain_peak.load(Ordering::Relaxed) as f64 / 1024.0
            ),
            "<= 32 MiB",
        ),
        (
            "backlog drain rate",
            format!(
                "{:.0} msg/s ({drain_secs:.1} s)",
                backlog_total as f64 / drain_secs
            ),
            "",
        ),
    ];
    println!();
    println!(
        "edgeship load: {total} messages x {} devices, QoS 1, MQTT {}, format {}, window {} (max_unacked, broker inflight), sync=normal, kinesis-mock, 1 shard",
        args.devices, args.protocol, args.format, args.window
    );
    println!(
        "rates, shares, CPU and bytes: the round of {} whose end-to-end share is the median; peak RSS and ack latency at full load: the worst round",
        args.rounds
    );
    println!("{:<44} {:<48} budget", "figure", "measured");
    println!("{}", "-".repeat(110));
    for (name, value, budget) in &rows {
        println!("{name:<44} {value:<48} {budget}");
    }
    let json = serde_json::json!({
        "messages": total,
        "devices": args.devices,
        "quick": args.quick,
        "baseline_msgs_per_s": baseline_rate,
        "edgeship_msgs_per_s": agent_rate,
        "rounds": rounds.iter().map(|r| serde_json::json!({
            "baseline_msgs_per_s": r.baseline_rate,
            "ingest_ratio_to_baseline": r.ingest_share(),
            "ratio_to_baseline": r.e2e_share(),
            "cpu_us_per_message": r.cpu_s * 1e6 / total as f64,
            "peak_rss_mib": r.hwm_kib as f64 / 1024.0,
        })).collect::<Vec<_>>(),
        "edgeship_ingest_msgs_per_s": ingest_rate,
        "edgeship_ingest_alone_msgs_per_s": alone_rate,
        "ingest_alone_ratio_to_baseline": alone_rate / baseline_rate,
        "ack_latency_ingest_alone_us": {"p50": alone_ack.0, "p99": alone_ack.1, "max": alone_ack.2, "max_unacked": alone_ack.3, "max_write_backlog_bytes": alone_ack.4},
        "cpu_us_per_message_ingest_alone": alone_agent_cpu * 1e6 / total as f64,
        "cores_busy": {
            "baseline": cores_json(&baseline_cpu_json),
            "throughput": cores_json(&throughput_cpu_json),
            "ingest_alone": cores_json(&alone_cpu_json),
        },
        "agent_received": median.received,
        "protocol": args.protocol,
        "window": args.window,
        "format": args.format,
        "ratio_to_baseline": agent_rate / baseline_rate,
        "kinesis_records": median.kinesis_records,
        "put_units_per_million": median.put_units as f64 * 1e6 / total as f64,
        "kinesis_bytes_per_payload_byte": median.kinesis_bytes as f64 / payload_bytes,
        "disk_write_bytes_per_payload_byte": median.write_bytes as f64 / payload_bytes,
        "cpu_us_per_message": cpu * 1e6 / total as f64,
        "peak_rss_mib_throughput": hwm_kib as f64 / 1024.0,
        "ack_latency_full_load_us": {"p50": full_ack.0, "p99": full_ack.1, "max": full_ack.2, "max_unacked": full_ack.3, "max_write_backlog_bytes": full_ack.4},
        "ack_latency_half_load_us": {"p50": half_ack.0, "p99": half_ack.1, "max": half_ack.2},
        "publish_to_accepted_ms": {"p50": acc_p50, "p99": acc_p99, "max": acc_max},
        "backlog_messages": backlog_total,
        "backlog_spooled_bytes": built.pending_bytes,
        "backlog_build_seconds": build_secs,
        "backlog_peak_rss_mib_build": build_peak.load(Ordering::Relaxed) as f64 / 1024.0,
        "backlog_peak_rss_mib_drain": drain_peak.load(Ordering::Relaxed) as f64 / 1024.0,
        "backlog_drain_msgs_per_s": backlog_total as f64 / drain_secs,
    });
    let path = args.json.unwrap_or_else(|| {
        PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
            .join("edgeship-load.json")
    });
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nJSON: {}", path.display());
}
