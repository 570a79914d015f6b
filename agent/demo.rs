//! `edgeship demo`: the whole agent on one machine with nothing installed and no cloud account.
//!
//! Starts an embedded MQTT broker (rumqttd) on a free loopback port, simulated devices that
//! publish realistic telemetry at QoS 1, and the real pipeline (spool, frames) into a local
//! folder destination. It prints a live progress line, then decodes every frame it wrote and
//! checks that each published message arrived: the demo is also a smoke test.

use crate::config::Config;
use crate::frame;
use crate::pipeline;
use anyhow::{bail, Context};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Simulated devices, each its own MQTT client.
    #[arg(long, default_value_t = 20)]
    pub(crate) devices: u32,
    /// Messages per second per device.
    #[arg(long, default_value_t = 50)]
    pub(crate) rate: u32,
    /// How long the devices publish.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Folder for the spool and the frames (default: a new folder under /tmp).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, crate::config::units::UnitError> {
    crate::config::units::HumanDuration::parse(s).map(|d| d.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_broker(port: u16) -> anyhow::Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "demo"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 500
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text).context("embedded broker config")?;
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("embedded broker stopped: {e}");
            }
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the embedded broker did not start listening on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn demo_config(dir: &Path, port: u16) -> String {
    format!(
        r#"
gateway_id = "demo-gw"
shutdown_timeout = "5s"
[spool]
path = "{spool}"
[batch]
linger = "500ms"
[[broker]]
name = "embedded"
host = "127.0.0.1"
port = {port}
[[route]]
name = "telemetry"
topics = ["devices/+/telemetry"]
destination = "local"
partition_key = "{{topic[1]}}"
[destination.local]
type = "directory"
path = "{frames}"
"#,
        spool = dir.join("spool.db").display(),
        frames = dir.join("frames").display(),
    )
}

/// One realistic telemetry message (about 200 bytes of JSON).
pub(crate) fn telemetry(device: &str, seq: u64, ts_ms: u64) -> String {
    let phase = (seq as f64) / 30.0;
    format!(
        r#"{{"device":"{device}","seq":{seq},"ts":{ts_ms},"temp_c":{:.2},"humidity_pct":{:.1},"pressure_kpa":{:.2},"vibration_mm_s":{:.3},"battery_v":{:.2},"status":"ok","fw":"2.4.1"}}"#,
        21.0 + 3.0 * phase.sin(),
        45.0 + 10.0 * (phase / 3.0).cos(),
        101.3 + 0.4 * (phase / 7.0).sin(),
        1.2 + 0.3 * (phase * 5.0).sin().abs(),
        3.6 - (seq as f64) * 1e-6,
    )
}

async fn device(
    port: u16,
    id: u32,
    rate: u32,
    until: Instant,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let name = format!("sensor-{id:03}");
    let mut opts = rumqttc::MqttOptions::new(format!("demo-{name}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 256);
    let topic = format!("devices/{name}/telemetry");
    let mut publisher = Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
        let mut seq = 0u64;
        while Instant::now() < until {
            tick.tick().await;
            let ts = crate::clock::now_ms();
            client
                .publish(
                    &topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    telemetry(&name, seq, ts),
                )
                .await?;
            seq += 1;
        }
        anyhow::Ok((client, seq))
    }));
    let mut done: Option<(rumqttc::AsyncClient, u64)> = None;
    let mut mine = 0u64;
    loop {
        if publisher.as_ref().is_some_and(|p| p.is_finished()) {
            done = Some(publisher.take().expect("checked above").await??);
            if mine == done.as_ref().map_or(0, |d| d.1) {
                break;
            }
        }
        let event = tokio::time::timeout(Duration::from_millis(100), events.poll()).await;
        match event {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                mine += 1;
                acked.fetch_add(1, Ordering::Relaxed);
                if done.as_ref().is_some_and(|d| d.1 == mine) {
                    break;
                }
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => bail!("device {id}: {e}"),
        }
    }
    if let Some((client, _)) = done {
        let _ = client.disconnect().await;
    }
    Ok(mine)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("edgeship-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = free_port()?;
    start_broker(port)?;
    let config = Config::parse(&demo_config(&dir, port), "demo config")?;
    println!(
        "edgeship demo: embedded broker on 127.0.0.1:{port}, {} devices x {} msg/s for {:?}\n  spool  {}\n  frames {}",
        args.devices,
        args.rate,
        args.duration,
        config.spool.path.display(),
        dir.join("frames").display()
    );
    if let Some(admin) = config.admin.listen {
        println!("  while it runs: curl http://{admin}/metrics   (or /readyz, /status)");
    }

    let pipeline = pipeline::start(config).await?;
    let live = pipeline.live();
    let admin = crate::app::serve_admin(&live).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pipeline = tokio::spawn(pipeline.run(None, async {
        let _ = stop_rx.await;
    }));
    // Wait for the agent's session so no early message is published before it subscribed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live
        .sources
        .iter()
        .all(|(_, s)| s.connected.load(Ordering::Relaxed))
    {
        if Instant::now() > deadline {
            bail!("the agent did not connect to the embedded broker");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let until = started + args.duration;
    let acked = Arc::new(AtomicU64::new(0));
    let devices: Vec<_> = (0..args.devices)
        .map(|id| tokio::spawn(device(port, id, args.rate, until, acked.clone())))
        .collect();

    let stats = live.spool.stats().clone();
    let ship = live.shippers()[0].1.clone();
    let mut last = (Instant::now(), 0u64);
    let mut stderr = std::io::stderr();
    let tty = std::io::IsTerminal::is_terminal(&stderr);
    let drain_deadline = until + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let published = acked.load(Ordering::Relaxed);
        let received = stats.received.load(Ordering::Relaxed);
        let delivered = stats.delivered.load(Ordering::Relaxed);
        let pending = stats.pending_records.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (received - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, received);
        let raw = ship.raw_bytes_accepted.load(Ordering::Relaxed);
        let sent = ship.bytes_accepted.load(Ordering::Relaxed);
        let ratio = if raw > 0 {
            sent as f64 / raw as f64
        } else {
            0.0
        };
        let (start, end) = if tty { ("\r", "   ") } else { ("", "\n") };
        let _ = write!(
            stderr,
            "{start}{:>5.1}s  published {published:>7}  spooled {received:>7}  delivered {delivered:>7}  backlog {pending:>6}  {rate:>7.0} msg/s  compressed to {:>5.1}%{end}",
            started.elapsed().as_secs_f64(),
            ratio * 100.0
        );
        let _ = stderr.flush();
        let publishing = devices.iter().any(|d| !d.is_finished());
        if !publishing && delivered >= published && received >= published {
            break;
        }
        if now > drain_deadline {
            eprintln!();
            bail!("the backlog did not drain within 60 s of the last publish");
        }
    }
    if tty {
        eprintln!();
    }
    let mut published = 0;
    for d in devices {
        published += d.await??;
    }
    let _ = stop_tx.send(());
    let accounting = pipeline.await??;
    if let Some(admin) = admin {
        admin.abort();
    }

    // Verify: decode every frame written and compare with what the devices published.
    let mut ids = HashSet::new();
    let mut frames = 0;
    let mut frame_bytes = 0u64;
    let mut payload_bytes = 0u64;
    for entry in std::fs::read_dir(dir.join("frames"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "eshp") {
            let data = std::fs::read(&path)?;
            frame_bytes += data.len() as u64;
            let f = frame::decode_frame(&data)
                .with_context(|| format!("decoding {}", path.display()))?;
            frames += 1;
            for r in f.records {
                payload_bytes += r.payload.len() as u64;
                ids.insert(r.seq);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("summary");
    println!("  published (acked by broker)  {published}");
    println!("  received by agent            {}", accounting.received);
    println!("  delivered                    {}", accounting.delivered);
    println!("  dropped                      {}", accounting.dropped);
    println!("  pending                      {}", accounting.pending);
    println!(
        "  unique records in frames     {} in {frames} frames",
        ids.len()
    );
    println!(
        "  payload {payload_bytes} B -> frames {frame_bytes} B ({:.1}% of payload)",
        100.0 * frame_bytes as f64 / payload_bytes.max(1) as f64
    );
    println!(
        "  throughput                   {:.0} msg/s over {elapsed:.1}s",
        accounting.received as f64 / elapsed
    );
    println!(
        "  decode a frame:  edgeship decode {}/frames/<file>.eshp | head",
        dir.display()
    );
    if ids.len() as u64 != published || !accounting.balances() {
        bail!(
            "records missing: published {published}, found {} in frames",
            ids.len()
        );
    }
    println!("every published message arrived; accounting balances");
    Ok(())
}
