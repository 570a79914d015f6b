//! Shipping: one task per destination that turns spooled blocks into destination records,
//! sends them, and tells the spool what was accepted.
//!
//! The decisions live in [`state::ShipState`], which does no I/O: what to lease, how blocks
//! are planned into frames ([`batcher`]), which frames make a call, per-shard pacing
//! ([`pacing`]), call sizes and timeouts from the measured uplink ([`uplink`]), what each
//! outcome does to the queue, backoff. [`Shipper`] is the driver: it only performs the
//! actions (lease and read blocks from the spool, encode on a blocking thread, send through
//! the destination) and reports their results back. Figures go to [`stats::ShipperStats`].
//!
//! What it holds in memory is bounded, however large the backlog: plans of at most a few
//! thousand blocks (metadata), and encoded frames up to two calls' worth, or with shards
//! twice that (at least two of the largest records).
//!
//! It must never report a block delivered that its destination did not accept, and never
//! resend an entry that was accepted. On stop it gives every block it holds back to the
//! spool, so a shipper started after it (a config change) sends them.

pub mod batcher;
pub(crate) mod objects;
pub(crate) mod pacing;
pub(crate) mod state;
pub(crate) mod stats;
pub(crate) mod uplink;

use crate::backoff::Backoff;
use crate::config::BatchConfig;
use crate::frame::encoder::{Body, EncodeError, FrameEncoder, FrameFormat};
use crate::sink::call::Destination;
use crate::sink::Sink;
use crate::spool::placement::Placement;
use crate::spool::{BlockMeta, SpoolHandle};
use state::{Action, Job, Pending, Settings, ShipState};
use stats::ShipperStats;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a destination's shipper is built from besides the destination: a change in any of it
/// means a new shipper.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ShipperSpec {
    /// Routes whose records this destination receives.
    pub(crate) routes: Vec<String>,
    /// Those of them that this destination is the first of: it says how their records are
    /// grouped into blocks (its shards).
    pub(crate) placed_routes: Vec<String>,
    /// Those of them whose records are not in the default format, and theirs.
    pub(crate) route_formats: Vec<(String, FrameFormat)>,
    pub(crate) batch: BatchConfig,
    /// Encoded frames held in memory stop growing past this.
    pub(crate) max_queued_bytes: usize,
}

/// How often a shipper whose destination has not told its shards yet looks again.
const PLACEMENT_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error("reading blocks from the spool: {0}")]
    Spool(crate::spool::SpoolError),
    /// One block does not fit the record limit on its own.
    #[error("block {id} encodes to {bytes} bytes on its own, over the {limit}-byte record limit")]
    BlockTooLarge { id: i64, bytes: usize, limit: usize },
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("the encoding thread: {0}")]
    Thread(#[from] tokio::task::JoinError),
}

/// Runs a destination's shipping (`run`) until `stop` turns true; a run that ends on its own
/// (an error it cannot ship past, a panic) is started again after a backoff, with the
/// figures showing it.
pub(crate) async fn supervise<F, Fut>(
    name: &str,
    stats: &ShipperStats,
    stop: watch::Receiver<bool>,
    run: F,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut stop_wait = stop.clone();
    loop {
        stats.shipping.store(true, Ordering::Relaxed);
        let ended = tokio::spawn(run(stop.clone())).await;
        stats.shipping.store(false, Ordering::Relaxed);
        if *stop.borrow() {
            return;
        }
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay();
        match ended {
            Ok(()) => {
                tracing::error!(destination = %name, retry_in_ms = delay.as_millis() as u64, "shipping stopped on its own; starting it again")
            }
            Err(e) => {
                tracing::error!(destination = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "shipping panicked; starting it again")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_wait.changed() => return,
        }
    }
}

/// The driver of one destination's shipping.
#[derive(Clone)]
pub(crate) struct Shipper {
    sink: Arc<Sink>,
    spool: SpoolHandle,
    /// The destination's name: the spool keeps what it owes under it.
    dest: Arc<str>,
    routes: Arc<[String]>,
    placed_routes: Arc<[String]>,
    gateway: Arc<str>,
    zstd_level: i32,
    /// The last encoder used while the stream was slow, kept for the next job: setting up a
    /// zstd context (allocating and clearing its tables, page faults included) was 3.4% of
    /// the agent's CPU at 1,000 msg/s, a frame a second.
    encoder: Arc<std::sync::Mutex<Option<FrameEncoder>>>,
    settings: Settings,
    stats: Arc<ShipperStats>,
}

impl Shipper {
    pub(crate) fn new(
        name: &str,
        sink: Arc<Sink>,
        spool: SpoolHandle,
        gateway: Arc<str>,
        spec: &ShipperSpec,
        stats: Arc<ShipperStats>,
    ) -> Shipper {
        let mut call = sink.call_limits();
        call.max_bytes = call.max_bytes.min(spec.batch.max_call_bytes as usize);
        // By default a frame holds at most what its shard takes in a second (raw bytes;
        // encoded it is no larger for incompressible payloads), so paced shards send evenly.
        let frame_bytes = match sink.shard_limits() {
            Some(l) if !spec.batch.frame_bytes_set => spec
                .batch
                .frame_bytes
                .min((l.bytes_per_sec as u64).max(64 << 10)),
            _ => spec.batch.frame_bytes,
        };
        let settings = Settings {
            name: name.to_string(),
            frame_bytes,
            linger: spec.batch.linger,
            max_linger: spec.batch.max_linger,
            billing_unit: sink.billing_unit_bytes(),
            call,
            max_queued_bytes: spec.max_queued_bytes,
            shard_limits: sink.shard_limits(),
            route_formats: spec.route_formats.clone().into(),
        };
        Shipper {
            sink,
            spool,
            dest: name.into(),
            routes: spec.routes.clone().into(),
            placed_routes: spec.placed_routes.clone().into(),
            gateway,
            zstd_level: spec.batch.zstd_level,
            encoder: Arc::default(),
            settings,
            stats,
        }
    }

    /// Ships until `stop` turns true; a run that stops on its own (an error it cannot ship
    /// past, a panic) is started again after a backoff, with the figures showing it.
    pub(crate) async fn supervise(self, stop: watch::Receiver<bool>) {
        let (name, stats) = (self.settings.name.clone(), self.stats.clone());
        supervise(&name, &stats, stop, move |stop| self.clone().run(stop)).await
    }

    /// Ships until `stop` turns true, then gives back what it holds.
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let name = self.settings.name.clone();
        let mut state = ShipState::new(self.settings.clone(), self.stats.clone());
        let mut commits = self.spool.commits();
        let mut seen = commits.borrow().count;
        let mut placed: Option<Arc<[u128]>> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            self.place(&mut placed);
            // Commits made while a call was out or while leases waited: each counts at its
            // own time, so the intake is quiet only when none came for a while.
            let c = *commits.borrow_and_update();
            if c.count != seen {
                state.new_records(c.count - seen, c.last);
                seen = c.count;
            }
            state.set_slow(self.spool.slow_stream());
            match state.next(Instant::now(), &*self.sink) {
                Action::Lease {
                    after,
                    limit,
                    commit_before,
                } => {
                    let (dest, routes) = (self.dest.clone(), self.routes.clone());
                    let leased = match commit_before {
                        Some(due) => {
                            let spool = &self.spool;
                            spool
                                .lease_after_commit(dest, routes, after, limit, due)
                                .await
                        }
                        None => self.spool.lease(dest, routes, after, limit).await,
                    };
                    match leased {
                        Ok(blocks) => state.leased(
                            blocks,
                            limit,
                            &*self.sink,
                            Instant::now(),
                            crate::clock::now_ms(),
                        ),
                        Err(e) => {
                            tracing::error!(destination = %name, error = %e, "shipper stops: spool unavailable");
                            break;
                        }
                    }
                }
                Action::Encode(job) => match self.encode(&job).await {
                    Ok(frames) => state.encoded(&job, frames),
                    Err(ShipError::BlockTooLarge { id, bytes, limit }) => {
                        // One block that does not fit on its own: split it in the spool, or
                        // dead-letter its one record; the rest of the job is planned again.
                        let body = job
                            .blocks
                            .iter()
                            .position(|b| b.id == id)
                            .expect("the block is the job's");
                        let block = &job.blocks[body];
                        let replaced = if block.records > 1 {
                            self.spool.split(self.dest.clone(), block.id).await
                        } else {
                            self.spool.unshippable(self.dest.clone(), block.id).await.map(|gone| {
                                tracing::error!(destination = %name, block = block.id, bytes, limit, route = ?gone.map(|g| g.0), "a record is larger than the destination takes however it is encoded; moved to the dead letters (counted as dropped: unshippable)");
                                Vec::new()
                            })
                        };
                        match replaced {
                            Ok(parts) => state.job_failed(
                                job,
                                body,
                                parts,
                                &*self.sink,
                                Instant::now(),
                                crate::clock::now_ms(),
                            ),
                            Err(e) => {
                                tracing::error!(destination = %name, error = %e, "shipper stops: spool unavailable");
                                let _ = self.spool.release(self.dest.clone(), job.block_ids());
                                break;
                            }
                        }
                    }
                    Err(ShipError::Spool(e)) => {
                        tracing::error!(destination = %name, error = %e, "shipper stops: spool unavailable");
                        let _ = self.spool.release(self.dest.clone(), job.block_ids());
                        break;
                    }
                    Err(e) => {
                        tracing::error!(destination = %name, error = %e, "cannot build records of these blocks; shipping stops and starts again");
                        let _ = self.spool.release(self.dest.clone(), job.block_ids());
                        break;
                    }
                },
                Action::Send(call) => {
                    let started = Instant::now();
                    let result = self.sink.put(&call.entries(), call.timeout).await;
                    let elapsed = started.elapsed();
                    let delivered = state.answered(
                        call,
                        result,
                        elapsed,
                        Instant::now(),
                        crate::clock::now_ms(),
                    );
                    if !delivered.is_empty()
                        && self.spool.delivered(self.dest.clone(), delivered).is_err()
                    {
                        tracing::error!(destination = %name, "spool stopped before deliveries were recorded; they will be resent");
                    }
                }
                Action::Wait { until } => {
                    // Until the destination's shards are learned, look again soon: the
                    // commits after that store one block per shard.
                    let until = match (&placed, self.settings.shard_limits) {
                        (None, Some(_)) => {
                            let soon = Instant::now() + PLACEMENT_POLL;
                            Some(until.map_or(soon, |u| u.min(soon)))
                        }
                        _ => until,
                    };
                    // A slow stream's commits, while its frames linger, wait to be leased
                    // (`until` is no later than that; see `ShipState::leases_wait_until`):
                    // no wakeup for each.
                    let deferred = state.leases_wait_until(Instant::now()).is_some();
                    tokio::select! {
                        // Each branch is cancel-safe: a watch change or a timer. The change
                        // is taken at the loop's top.
                        changed = commits.changed(), if !deferred => {
                            if changed.is_err() { break; }
                        }
                        _ = async {
                            match until {
                                Some(t) => tokio::time::sleep_until(t.into()).await,
                                None => std::future::pending().await,
                            }
                        } => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        let _ = self.spool.release(self.dest.clone(), state.give_back());
    }

    /// Tells the spool where this destination's routes' records go, when the destination's
    /// shards are learned or change: from then on each commit stores one block per shard.
    fn place(&self, placed: &mut Option<Arc<[u128]>>) {
        let starts = self.sink.shard_starts();
        let same = match (&starts, &*placed) {
            (Some(a), Some(b)) => a[..] == b[..],
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let placement = starts.clone().map(|starts| Placement {
            label: self.gateway.to_string(),
            starts,
        });
        self.spool
            .placements()
            .set(&self.placed_routes, placement.as_ref());
        *placed = starts;
    }

    /// Reads a job's blocks and encodes them, on a blocking thread, as records of at most the
    /// job's limit.
    async fn encode(&self, job: &Job) -> Result<Vec<Pending>, ShipError> {
        let bodies = self
            .spool
            .read(self.dest.clone(), job.block_ids())
            .await
            .map_err(ShipError::Spool)?;
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        let gateway = self.gateway.clone();
        let level = self.zstd_level;
        let shard = self.sink.shard_for(&job.key);
        let job = job.clone();
        let kept = self.encoder.clone();
        // Kept only while the stream is slow: a busy stream's large frames repay their
        // context's set-up, and a large frame's context is large to hold (at level 3, zstd's
        // tables for a source over 256 KiB alone are 768 KiB).
        let keep = self.spool.slow_stream();
        tokio::task::spawn_blocking(move || {
            let reused = kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .filter(|e| e.format() == job.format);
            let mut encoder = match reused {
                Some(e) => e,
                None => FrameEncoder::new(job.format, level)?,
            };
            let pieces: Vec<Body<'_>> = bodies
                .iter()
                .map(|(m, b)| Body {
                    records: m.records,
                    bytes: b,
                    version: m.version,
                    key: &m.key,
                })
                .collect();
            let encoded = match encoder.encode_fitting(&gateway, &job.key, &pieces, job.limit) {
                Err(EncodeError::TooLarge {
                    body, bytes, limit, ..
                }) => {
                    return Err(ShipError::BlockTooLarge {
                        id: bodies[body].0.id,
                        bytes,
                        limit,
                    })
                }
                other => other?,
            };
            if keep {
                encoder.idle();
                *kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(encoder);
            }
            let metas: Vec<BlockMeta> = bodies.into_iter().map(|(m, _)| m).collect();
            Ok(state::frames(&job, &metas, encoded, shard))
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FullPolicy, SpoolConfig, SyncLevel};
    use crate::sink::directory::{DirectoryConfig, DirectorySink};
    use crate::spool::{AfterCommit, Disposition, Incoming};

    /// A spool with these commit settings and a shipper of its route "r" to a directory
    /// (`out`), lingering a second: (spool, its thread, out, stop, the shipper's task).
    #[allow(clippy::type_complexity)]
    fn slow_shipper(
        dir: &std::path::Path,
        commit_interval: Duration,
        commit_max_wait: Duration,
    ) -> (
        SpoolHandle,
        std::thread::JoinHandle<Result<crate::spool::Accounting, crate::spool::SpoolError>>,
        std::path::PathBuf,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let (spool, thread) = crate::spool::start(&SpoolConfig {
            path: dir.join("spool.db"),
            max_bytes: 1 << 30,
            full_policy: FullPolicy::Block,
            sync: SyncLevel::Off,
            max_dead_letters: 10,
            commit_interval,
            commit_max_wait,
        })
        .unwrap();
        let out = dir.join("out");
        let sink = DirectorySink::open("files", &DirectoryConfig { path: out.clone() }).unwrap();
        let spec = ShipperSpec {
            routes: vec!["r".into()],
            placed_routes: vec!["r".into()],
            route_formats: Vec::new(),
            batch: BatchConfig {
                linger: Duration::from_secs(1),
                max_linger: Duration::from_secs(1),
                frame_bytes: 1 << 20,
                frame_bytes_set: true,
                zstd_level: 3,
                max_message_bytes: 1 << 20,
                max_call_bytes: 1 << 20,
            },
            max_queued_bytes: 8 << 20,
        };
        let shipper = Shipper::new(
            "files",
            Arc::new(Sink::Directory(sink)),
            spool.clone(),
            "gw".into(),
            &spec,
            Arc::default(),
        );
        let (stop, stopped) = watch::channel(false);
        let shipping = tokio::spawn(shipper.run(stopped));
        (spool, thread, out, stop, shipping)
    }

    /// Message `i` of a test's stream: payload `m{i}`, over ten device keys.
    fn message(i: u64) -> Incoming {
        Incoming {
            topic: "t".into(),
            payload: bytes::Bytes::from(format!("m{i}")),
            ts_ms: crate::clock::now_ms(),
            disposition: Disposition::Record {
                route: "r".into(),
                key: format!("dev-{}", i % 10),
            },
            after_commit: AfterCommit::default(),
            receipt: None,
        }
    }

    /// Asserts that `payloads` are the messages `m0` to `m{sent - 1}`, each once.
    fn each_message_once(mut payloads: Vec<Vec<u8>>, sent: u64) {
        payloads.sort();
        let mut expected: Vec<Vec<u8>> = (0..sent).map(|i| format!("m{i}").into_bytes()).collect();
        expected.sort();
        assert_eq!(payloads, expected, "each message once");
    }

    /// Polls until the spool counts `sent` records delivered (at most 20 s).
    async fn delivered_all(spool: &SpoolHandle, sent: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while spool.accounting().await.unwrap().delivered < sent {
            assert!(Instant::now() < deadline, "every message delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A slow stream committed every 10 ms (as a source with a small window asks) while its
    /// frame lingers: the shipper leases when the frame is due, not after each commit (a
    /// lease wakes the spool thread and the shipper), and everything still arrives.
    #[tokio::test]
    async fn a_slow_streams_commits_wait_to_be_leased_while_its_frame_lingers() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, thread, out, stop, shipping) =
            slow_shipper(dir.path(), Duration::from_millis(2), Duration::from_secs(1));
        // A message every 2 ms for 1.6 s, a commit asked for every fifth; leases counted
        // over the last second.
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let started = Instant::now();
        let mut counted = None;
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_millis(1600) {
            tick.tick().await;
            if counted.is_none() && started.elapsed() >= Duration::from_millis(600) {
                counted = Some((spool.leases(), spool.commits().borrow().count));
            }
            spool.append(message(sent)).unwrap();
            sent += 1;
            if sent % 5 == 0 {
                spool.flush().unwrap();
            }
        }
        let (leases_before, commits_before) = counted.unwrap();
        let leases = spool.leases() - leases_before;
        let commits = spool.commits().borrow().count - commits_before;
        assert!(spool.slow_stream(), "a message every 2 ms is a slow stream");
        assert!(commits >= 20, "{commits} commits in a second");
        // A frame a linger (1 s): a lease when it is due and one for the first commit after
        // it went, not one for each of the hundred commits, nor one every 100 ms.
        assert!(
            leases <= 6,
            "{leases} leases in a second for {commits} commits"
        );
        // Everything arrives (the last frame after its linger).
        delivered_all(&spool, sent).await;
        stop.send(true).unwrap();
        shipping.await.unwrap();
        let mut payloads = Vec::new();
        for file in std::fs::read_dir(&out).unwrap() {
            let frame = crate::frame::decode_frame(&std::fs::read(file.unwrap().path()).unwrap());
            payloads.extend(frame.unwrap().records.into_iter().map(|r| r.payload));
        }
        each_message_once(payloads, sent);
        drop(spool);
        assert!(thread.join().unwrap().unwrap().balances());
    }

    /// A slow stream committed every 300 ms while its frames linger a second: when a frame is
    /// due its lease commits what the spool gathers first, so the frame takes every record
    /// appended by then and the next frame's oldest record came after it: frames start a
    /// linger apart. Leased without that commit, the records of the last 0-300 ms before a
    /// frame went waited in the spool's group, and the next frame, lingering from the oldest
    /// of them, went 0.7-1 s after it.
    #[tokio::test]
    async fn a_slow_streams_frames_go_a_linger_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, thread, out, stop, shipping) = slow_shipper(
            dir.path(),
            Duration::from_millis(10),
            Duration::from_millis(300),
        );
        // A message every 5 ms for 4.5 s over 10 keys: four frames of each due, then the rest.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_millis(4500) {
            tick.tick().await;
            spool.append(message(sent)).unwrap();
            sent += 1;
        }
        assert!(spool.slow_stream(), "a message every 5 ms is a slow stream");
        delivered_all(&spool, sent).await;
        stop.send(true).unwrap();
        shipping.await.unwrap();
        // Each frame's records, in the order the messages were sent.
        let mut frames: Vec<Vec<crate::frame::Record>> = std::fs::read_dir(&out)
            .unwrap()
            .map(|f| {
                let bytes = std::fs::read(f.unwrap().path()).unwrap();
                let mut records = crate::frame::decode_frame(&bytes).unwrap().records;
                records.sort_by_key(|r| r.ts_ms);
                records
            })
            .collect();
        frames.sort_by_key(|f| f[0].ts_ms);
        // Frames are planned by key here (a directory has no shards): each key's in turn.
        let t0 = frames[0][0].ts_ms;
        for key in 0..10 {
            let key = format!("dev-{key}");
            let firsts: Vec<u64> = frames
                .iter()
                .filter(|f| f[0].key == key)
                .map(|f| f[0].ts_ms - t0)
                .collect();
            assert!(firsts.len() >= 5, "{key}: frames starting at {firsts:?} ms");
            for pair in firsts.windows(2) {
                assert!(
                    pair[1] - pair[0] >= 975,
                    "{key}: frames starting at {firsts:?} ms: records read within a frame's linger went in it"
                );
            }
        }
        let payloads: Vec<Vec<u8>> = frames.into_iter().flatten().map(|r| r.payload).collect();
        each_message_once(payloads, sent);
        drop(spool);
        assert!(thread.join().unwrap().unwrap().balances());
    }
}
