//! Criterion benchmarks of the per-message hot paths, reported as throughput (messages and
//! bytes): frame encoding at several zstd levels and batch sizes, spool append + commit at
//! several group sizes, the batcher's planning, and partition-key to shard mapping.
//!
//! `cargo bench --bench hot_paths` (add `-- frame` etc. to pick one group).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgeship::config::SyncLevel;
use edgeship::frame;
use edgeship::ship::batcher::Batcher;
use edgeship::sink::kinesis::shard::{even_ranges, ShardMap};
use edgeship::spool::store::{NewRecord, Store};
use edgeship::spool::BlockMeta;
use std::hint::black_box;
use std::time::Duration;

/// ~200 bytes of telemetry JSON, varied like a real device's.
fn telemetry(device: u32, seq: u32) -> String {
    format!(
        r#"{{"device":"dev-{device:03}","seq":{seq},"ts":{},"temp_c":{:.2},"humidity_pct":{:.1},"pressure_kpa":{:.2},"vibration_mm_s":{:.3},"battery_v":3.61,"status":"ok","fw":"2.4.1"}}"#,
        1_764_000_000_000u64 + u64::from(seq) * 10,
        20.0 + f64::from(seq % 100) * 0.05,
        40.0 + f64::from(device % 30),
        101.0 + f64::from(seq % 7) * 0.1,
        f64::from(seq % 13) * 0.011
    )
}

/// A version 2 body (what the spool keeps: a key per record) of `n` messages of 50 devices.
fn body_of(n: u32) -> (Vec<u8>, u64) {
    let mut body = Vec::new();
    let mut payload = 0;
    for i in 0..n {
        let p = telemetry(i % 50, i);
        payload += p.len() as u64;
        frame::encode_record_v2(
            &mut body,
            u64::from(i),
            1_764_000_000_000 + u64::from(i),
            &format!("dev-{:03}", i % 50),
            &format!("devices/dev-{:03}/telemetry", i % 50),
            p.as_bytes(),
        );
    }
    (body, payload)
}

/// Frames as the agent makes them from spooled bodies: version 3 (index and payload
/// sections), and version 2 (the body as it is) for comparison.
fn encode(
    version: u8,
    n: u32,
    body: &[u8],
    columns: &mut frame::ColumnBody,
    compressor: &mut zstd::bulk::Compressor<'static>,
) -> Vec<u8> {
    if version == frame::VERSION_3 {
        columns.clear();
        columns
            .push_body(body, n, frame::VERSION_2, "")
            .expect("a version 2 body");
        frame::encode_frame_v3("gw", columns, Some(compressor)).unwrap()
    } else {
        frame::encode_frame_in(version, "gw", n, body, Some(compressor)).unwrap()
    }
}

fn frame_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    let mut columns = frame::ColumnBody::default();
    for records in [100u32, 1_000, 10_000] {
        let (body, payload) = body_of(records);
        for (version, level) in [(3, 1), (3, 3), (3, 9), (2, 3)] {
            g.throughput(Throughput::Elements(u64::from(records)));
            let mut compressor = frame::frame_compressor(level).unwrap();
            let size = encode(version, records, &body, &mut columns, &mut compressor).len();
            g.bench_with_input(
                BenchmarkId::new(
                    format!("v{version} zstd{level}"),
                    format!(
                        "{records} msgs, {:.3} of payload",
                        size as f64 / payload as f64
                    ),
                ),
                &records,
                |b, &n| {
                    b.iter(|| encode(version, n, black_box(&body), &mut columns, &mut compressor))
                },
            );
        }
    }
    let (body, payload) = body_of(10_000);
    let mut compressor = frame::frame_compressor(3).unwrap();
    for version in [3, 2] {
        let encoded = encode(version, 10_000, &body, &mut columns, &mut compressor);
        g.throughput(Throughput::Bytes(payload));
        g.bench_function(
            format!("decode v{version} zstd3 10000 msgs (payload bytes)"),
            |b| b.iter(|| frame::decode_frame(black_box(&encoded)).unwrap()),
        );
    }
    g.finish();
}

fn spool_append_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("spool_append_commit");
    g.measurement_time(Duration::from_secs(4));
    let payloads: Vec<String> = (0..1_000).map(|i| telemetry(i % 50, i)).collect();
    let topic = "devices/dev-007/telemetry";
    for (sync, name) in [(SyncLevel::Normal, "normal"), (SyncLevel::Full, "full")] {
        for group in [1usize, 100, 1_000] {
            let dir = tempfile::tempdir().unwrap();
            let (mut store, _) = Store::open(&dir.path().join("spool.db"), sync).unwrap();
            let mut buf = Vec::new();
            let bytes: usize = payloads[..group].iter().map(String::len).sum();
            g.throughput(Throughput::Elements(group as u64));
            g.bench_function(
                BenchmarkId::new(
                    format!("sync={name}"),
                    format!("{group} msgs/commit ({bytes} B)"),
                ),
                |b| {
                    b.iter(|| {
                        store.begin().unwrap();
                        let records: Vec<NewRecord<'_>> = payloads[..group]
                            .iter()
                            .map(|p| NewRecord {
                                ts_ms: 1_764_000_000_000,
                                key: "gw",
                                topic,
                                payload: p.as_bytes(),
                            })
                            .collect();
                        let meta = store
                            .append_block("telemetry", "gw", &records, &mut buf)
                            .unwrap();
                        store.deliver_block("", meta.id).unwrap();
                        store.commit().unwrap();
                    })
                },
            );
        }
    }
    g.finish();
}

fn batching(c: &mut Criterion) {
    let mut g = c.benchmark_group("batcher");
    let blocks: Vec<BlockMeta> = (0..10_000)
        .map(|i| BlockMeta {
            id: i,
            route: "telemetry".into(),
            key: format!("dev-{:03}", i % 50),
            version: 2,
            records: 10,
            raw_bytes: 2_300,
            stored_bytes: 300,
            created_ms: 1_764_000_000_000 + i as u64,
        })
        .collect();
    g.throughput(Throughput::Elements(blocks.len() as u64));
    g.bench_function("plan 10000 blocks over 50 keys", |b| {
        b.iter(|| {
            let mut batcher = Batcher::new(2 << 20, Duration::from_secs(1));
            let t0 = std::time::Instant::now();
            let mut frames = 0;
            for block in &blocks {
                batcher.push(block.clone(), t0, 0);
                while batcher.take_ready().is_some() {
                    frames += 1;
                }
            }
            batcher.close_due(t0, true);
            while batcher.take_ready().is_some() {
                frames += 1;
            }
            black_box(frames)
        })
    });
    g.finish();
}

fn shard_mapping(c: &mut Criterion) {
    let mut g = c.benchmark_group("shard_map");
    let keys: Vec<String> = (0..1_000)
        .map(|i| format!("gateway-{i:05}/dev-{:03}", i % 50))
        .collect();
    for shards in [4u32, 64, 1_024] {
        let ranges = even_ranges(shards);
        let map = ShardMap::new(
            ranges
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
        )
        .unwrap();
        g.throughput(Throughput::Elements(keys.len() as u64));
        g.bench_function(
            BenchmarkId::new("md5 + lookup", format!("{shards} shards")),
            |b| b.iter(|| keys.iter().filter_map(|k| map.shard_for(k)).count()),
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    frame_encoding,
    spool_append_commit,
    batching,
    shard_mapping
);
criterion_main!(benches);
