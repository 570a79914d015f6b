//! The shipper: one task per destination that turns spooled blocks into frames, sends them,
//! and tells the spool what was accepted.
//!
//! Loop: lease block metadata -> plan frames ([`Batcher`]) -> read bodies and encode frames
//! (zstd, on a blocking thread) -> pack calls within the destination's limits, taking only
//! entries whose shard may write now ([`Pacer`]) -> send -> accepted entries' blocks are
//! reported delivered; entries a shard refused go back to the front of the queue and that shard
//! alone backs off (other shards go on); a whole failed call backs the destination off.
//! Backoffs are exponential with jitter.
//! A hot shard slows only its own records: it may hold at most half the queue of encoded
//! frames (at least one frame), plans of other shards pass its waiting ones, and frames added
//! while a paced shard waits are sent at once.
//! What it holds in memory is bounded, however large the backlog: plans of at most
//! [`MAX_PLANNED_BLOCKS`] blocks (metadata), and encoded frames up to two calls' worth, or
//! with shards twice that (at least two of the largest records).
//!
//! It must never report a block delivered that its destination did not accept, and never
//! resend an entry that was accepted.

use crate::batcher::{entry_cost, Batcher, CallLimits, FramePlan};
use crate::config::BatchConfig;
use crate::config::FrameFormat;
use crate::frame;
use crate::logging::Repeated;
use crate::pacing::{Pacer, ShardLimits};
use crate::sink::{is_throttle, Entry, Sink};
use crate::spool::SpoolHandle;
use crate::uplink::Uplink;
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Distinct error codes kept per destination; further codes are counted as `other`, so a
/// misbehaving endpoint cannot grow the metrics without bound.
const MAX_ERROR_CODES: usize = 32;

/// Most spooled blocks planned into frames at once. Plans are metadata (about 100 bytes a
/// block); the cap bounds them when a paced shard's plans wait for room while others' are
/// leased past them.
const MAX_PLANNED_BLOCKS: usize = 4096;

/// Live figures of one destination.
#[derive(Debug, Default)]
pub struct ShipperStats {
    pub calls: AtomicU64,
    pub call_failures: AtomicU64,
    pub entries_accepted: AtomicU64,
    pub entries_failed: AtomicU64,
    /// Entries (frames) that failed because the destination throttled them, per entry or as
    /// part of a whole call refused for throttling.
    pub entries_throttled: AtomicU64,
    /// Entries sent again after a failure.
    pub entries_retried: AtomicU64,
    pub records_accepted: AtomicU64,
    /// Frame bytes the destination accepted (what the uplink carried, once).
    pub bytes_accepted: AtomicU64,
    /// Uncompressed record bytes inside accepted frames.
    pub raw_bytes_accepted: AtomicU64,
    /// From a record's receipt to its destination accepting it.
    pub end_to_end_latency: crate::metrics::Histogram,
    /// Encoded frame bytes held in memory, waiting to be sent or resent.
    pub queued_bytes: AtomicU64,
    /// True from a failed call (or entry) until a call succeeds entirely.
    pub failing: AtomicBool,
    /// Unix ms of the last call whose entries were all accepted; 0 before the first.
    pub last_success_ms: AtomicU64,
    /// Failures by error code (entries and whole calls), at most [`MAX_ERROR_CODES`] codes.
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Per shard (destinations with shards), keyed by shard id.
    pub shards: Mutex<BTreeMap<Arc<str>, ShardCounters>>,
    /// The last failure, for status.
    pub last_error: Mutex<Option<String>>,
    /// The uplink's measured rate to this destination, bytes per second; 0 until measured.
    pub uplink_rate: AtomicU64,
    /// The record size limit the destination itself enforces, learned from a refusal, when
    /// it is below the configured `max_record_bytes`; 0 until then.
    pub learned_record_limit: AtomicU64,
}

/// What one shard of a destination did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounters {
    pub entries_accepted: u64,
    pub entries_throttled: u64,
    /// Failed for another reason than throttling.
    pub entries_failed: u64,
    pub records_accepted: u64,
    pub bytes_accepted: u64,
}

impl ShipperStats {
    fn count_error(&self, code: &str, n: u64) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let key = if errors.contains_key(code) || errors.len() < MAX_ERROR_CODES {
            code
        } else {
            "other"
        };
        *errors.entry(key.to_string()).or_insert(0) += n;
    }

    fn set_last_error(&self, text: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn shards(&self) -> BTreeMap<Arc<str>, ShardCounters> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An encoded frame waiting to be sent or resent.
struct Pending {
    entry: Entry,
    block_ids: Vec<i64>,
    /// (receipt time in Unix ms, records) of each block, for the end-to-end latency.
    ages: Vec<(u64, u32)>,
    /// The shard its key maps to, when the destination has shards and knows them.
    shard: Option<Arc<str>>,
    records: u64,
    raw_bytes: u64,
    attempts: u32,
    /// How it was encoded, to encode its blocks again (smaller) if the destination refuses
    /// the record as too large.
    format: FrameFormat,
}

pub struct Shipper {
    pub name: String,
    pub sink: Arc<Sink>,
    pub spool: SpoolHandle,
    /// Routes whose records this destination receives.
    pub routes: Arc<[String]>,
    /// Those of them whose frames use the KPL aggregated format.
    pub kpl_routes: Arc<[String]>,
    pub gateway: Arc<str>,
    pub batch: BatchConfig,
    pub max_record_bytes: u64,
    /// Encoded frames held in memory (waiting or being resent) stop growing past this; such
    /// frames' blocks are safe from `drop_oldest`, so it stays well under the spool's cap.
    pub max_queued_bytes: usize,
    /// Per-shard write limits to pace to (`None`: no shard limits, backoff only).
    pub shard_limits: Option<ShardLimits>,
    pub stats: Arc<ShipperStats>,
}

/// What one attempt to send a call came to.
enum Sent {
    /// Every entry accepted.
    AllAccepted,
    /// The call went through; some entries were refused and wait for their shard's backoff.
    Partly,
    /// The call failed as a whole: the destination backs off.
    Failed,
    /// No queued entry may go before this time (its shard is paced or backing off).
    NothingReady(Instant),
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling to `max`.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .base
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt += 1;
        let half = d / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shipper {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut limits = self.sink.call_limits();
        limits.max_bytes = limits.max_bytes.min(self.batch.max_call_bytes as usize);
        let mut batcher = Batcher::new(self.batch.frame_bytes, self.batch.linger);
        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut cursor = 0i64;
        let mut commits = self.spool.commits();
        let mut retry_at: Option<Instant> = None;
        // `retry_at` is only the earliest time a queued shard may write again (not a backoff
        // after a failed call).
        let mut paced = false;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut pacer = Pacer::new(self.shard_limits);
        let mut uplink = Uplink::new();
        let mut failing = Repeated::new(Duration::from_secs(60));
        let mut exhausted = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let queued_bytes: usize = queue.iter().map(|p| p.entry.data.len()).sum();
            self.stats
                .queued_bytes
                .store(queued_bytes as u64, Ordering::Relaxed);
            // Encoded frames held: about two calls' worth. With shards, each shard may hold
            // half of that (at least one frame), and all together up to twice it (at least
            // two of the largest records), so a hot shard, paced or throttled, never keeps the
            // others' frames from being built and sent.
            let queue_cap = self.max_queued_bytes.min(2 * limits.max_bytes);
            let hard_cap = 2 * queue_cap.max(self.record_limit());
            let mut per_shard: BTreeMap<Arc<str>, usize> = BTreeMap::new();
            for p in &queue {
                if let Some(s) = &p.shard {
                    *per_shard.entry(s.clone()).or_default() += p.entry.data.len();
                }
            }
            // A plan's frame is estimated from its raw size and the compression seen so far.
            let ratio = {
                let raw = self.stats.raw_bytes_accepted.load(Ordering::Relaxed);
                let sent = self.stats.bytes_accepted.load(Ordering::Relaxed);
                if raw == 0 {
                    1.0
                } else {
                    (sent as f64 / raw as f64).clamp(0.01, 1.5)
                }
            };
            let has_room = |per_shard: &BTreeMap<Arc<str>, usize>,
                            queued: usize,
                            plan: &FramePlan| {
                match self.sink.shard_for(&plan.key) {
                    Some(s) => {
                        let held = per_shard.get(&s).copied().unwrap_or(0);
                        let frame = (plan.raw_bytes as f64 * ratio) as usize;
                        held == 0 || held + frame <= queue_cap / 2
                    }
                    None => queued < queue_cap,
                }
            };
            // Lease while little is planned for shards with room (and the plans' metadata
            // stays small); `exhausted` means the last lease found nothing new.
            let want_more = batcher
                .planned_raw_bytes_where(|p| has_room(&per_shard, queued_bytes, p))
                < 4 * self.batch.frame_bytes
                && batcher.planned_blocks() < MAX_PLANNED_BLOCKS;
            if !exhausted && want_more && queued_bytes < hard_cap {
                match self.spool.lease(self.routes.clone(), cursor, 1024).await {
                    Ok(blocks) => {
                        exhausted = blocks.is_empty();
                        for b in blocks {
                            cursor = cursor.max(b.id);
                            batcher.push(b);
                        }
                    }
                    Err(e) => {
                        tracing::error!(destination = %self.name, error = %e, "shipper stops: spool unavailable");
                        break;
                    }
                }
            }
            batcher.close_due(now_ms(), false);
            let mut queued_bytes = queued_bytes;
            while queued_bytes < hard_cap {
                let Some(plan) =
                    batcher.take_ready_where(|p| has_room(&per_shard, queued_bytes, p))
                else {
                    break;
                };
                match self.encode(plan).await {
                    Ok(frames) => {
                        for p in &frames {
                            if let Some(s) = &p.shard {
                                *per_shard.entry(s.clone()).or_default() += p.entry.data.len();
                            }
                        }
                        queued_bytes += frames.iter().map(|p| p.entry.data.len()).sum::<usize>();
                        queue.extend(frames);
                        // Waiting only for a paced shard: the new frames may go now.
                        if paced {
                            retry_at = None;
                        }
                    }
                    Err(e) => {
                        tracing::error!(destination = %self.name, error = %e, "shipper stops: cannot build frames");
                        return self.give_back(&mut batcher, queue);
                    }
                }
            }
            if !queue.is_empty() && retry_at.is_none_or(|t| t <= Instant::now()) {
                retry_at = None;
                paced = false;
                match self
                    .send_one_call(&mut queue, limits, &mut pacer, &mut uplink, &mut failing)
                    .await
                {
                    Sent::AllAccepted | Sent::Partly => backoff.reset(),
                    Sent::Failed => retry_at = Some(Instant::now() + backoff.next_delay()),
                    Sent::NothingReady(at) => {
                        retry_at = Some(at);
                        paced = true;
                    }
                }
                continue;
            }
            // More to lease and room to hold it: go round again. Without room (frames waiting
            // for a retry fill the queue) fall through and wait, never spin.
            if !exhausted && want_more && queued_bytes < hard_cap {
                continue;
            }
            // Nothing to do now: wait for new records, a frame's linger, a retry, or stop.
            let due = batcher
                .next_due_ms()
                .map(|ms| Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms())));
            let wake = [due, retry_at].into_iter().flatten().min();
            tokio::select! {
                // Each branch is cancel-safe: a watch change or a timer; nothing is consumed.
                changed = commits.changed() => {
                    if changed.is_err() { break; }
                    exhausted = false;
                }
                _ = async { match wake { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {}
                _ = stop.changed() => {}
            }
        }
        self.give_back(&mut batcher, queue);
    }

    fn give_back(&self, batcher: &mut Batcher, queue: VecDeque<Pending>) {
        let mut ids = batcher.drain_block_ids();
        ids.extend(queue.into_iter().flat_map(|p| p.block_ids));
        let _ = self.spool.release(ids);
    }

    /// Sends one call of the queued entries whose shards may write now, oldest first, within
    /// the call limits; the others keep their place in the queue.
    async fn send_one_call(
        &self,
        queue: &mut VecDeque<Pending>,
        limits: CallLimits,
        pacer: &mut Pacer,
        uplink: &mut Uplink,
        failing: &mut Repeated,
    ) -> Sent {
        let now = Instant::now();
        // Calls shrink to what the uplink carries in a few seconds.
        let limits = CallLimits {
            max_bytes: uplink.call_bytes(limits.max_bytes),
            ..limits
        };
        let (mut picked, mut bytes) = (Vec::new(), 0usize);
        let mut earliest: Option<Instant> = None;
        for (i, p) in queue.iter().enumerate() {
            if picked.len() >= limits.max_entries {
                break;
            }
            let cost = entry_cost(p.entry.data.len(), p.entry.key.len());
            if !picked.is_empty() && bytes + cost > limits.max_bytes {
                continue;
            }
            let shard_bytes = p.entry.data.len() + p.entry.key.len();
            if pacer.try_take(p.shard.as_ref(), shard_bytes, now) {
                picked.push(i);
                bytes += cost;
            } else {
                let at = pacer.ready_at(p.shard.as_ref(), shard_bytes, now);
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        if picked.is_empty() {
            return Sent::NothingReady(earliest.unwrap_or(now + Duration::from_millis(50)));
        }
        // One pass: picked entries into the call, the rest keep their order in the queue.
        let mut call = Vec::with_capacity(picked.len());
        let mut next = picked.into_iter().peekable();
        let rest: VecDeque<Pending> = std::mem::take(queue)
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| {
                if next.peek() == Some(&i) {
                    next.next();
                    call.push(p);
                    None
                } else {
                    Some(p)
                }
            })
            .collect();
        *queue = rest;
        let entries: Vec<&Entry> = call.iter().map(|p| &p.entry).collect();
        let stats = &self.stats;
        stats.calls.fetch_add(1, Ordering::Relaxed);
        let retried = call.iter().filter(|p| p.attempts > 0).count() as u64;
        stats.entries_retried.fetch_add(retried, Ordering::Relaxed);
        let timeout = uplink.timeout(bytes);
        let started = Instant::now();
        let result = self.sink.put(&entries, timeout).await;
        match &result {
            Err(e) if e.code == "Timeout" => uplink.timed_out(bytes, started.elapsed()),
            _ => uplink.answered(bytes, started.elapsed()),
        }
        if let Some(rate) = uplink.rate() {
            stats.uplink_rate.store(rate as u64, Ordering::Relaxed);
        }
        match result {
            Ok(outcomes) => {
                let now = now_ms();
                let mut delivered = Vec::new();
                let mut failed = Vec::new();
                let mut refused_size = Vec::new();
                let mut first_failure = None;
                let mut per_shard: BTreeMap<Arc<str>, ShardCounters> = BTreeMap::new();
                for (pending, outcome) in call.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(accepted) => {
                            pacer.accepted(pending.shard.as_ref(), Instant::now());
                            let bytes = pending.entry.data.len() as u64;
                            stats.entries_accepted.fetch_add(1, Ordering::Relaxed);
                            stats
                                .records_accepted
                                .fetch_add(pending.records, Ordering::Relaxed);
                            stats.bytes_accepted.fetch_add(bytes, Ordering::Relaxed);
                            stats
                                .raw_bytes_accepted
                                .fetch_add(pending.raw_bytes, Ordering::Relaxed);
                            for &(received_ms, records) in &pending.ages {
                                stats.end_to_end_latency.record_n(
                                    Duration::from_millis(now.saturating_sub(received_ms)),
                                    u64::from(records),
                                );
                            }
                            if let Some(shard) = accepted.shard {
                                let c = per_shard.entry(shard).or_default();
                                c.entries_accepted += 1;
                                c.records_accepted += pending.records;
                                c.bytes_accepted += bytes;
                            }
                            delivered.extend(pending.block_ids);
                        }
                        Err(f) => {
                            pacer.refused(pending.shard.as_ref(), Instant::now());
                            let throttled = is_throttle(&f.code);
                            stats.entries_failed.fetch_add(1, Ordering::Relaxed);
                            if throttled {
                                stats.entries_throttled.fetch_add(1, Ordering::Relaxed);
                            }
                            stats.count_error(&f.code, 1);
                            if let Some(shard) = f.shard.clone() {
                                let c = per_shard.entry(shard).or_default();
                                if throttled {
                                    c.entries_throttled += 1;
                                } else {
                                    c.entries_failed += 1;
                                }
                            }
                            let size = pending.entry.data.len() + pending.entry.key.len();
                            let too_large = crate::sink::record_size_limit(&f.code, &f.message)
                                .filter(|&limit| (size as u64) > limit);
                            first_failure.get_or_insert(f);
                            let pending = Pending {
                                attempts: pending.attempts + 1,
                                ..pending
                            };
                            match too_large {
                                Some(limit) => refused_size.push((pending, limit)),
                                None => failed.push(pending),
                            }
                        }
                    }
                }
                self.add_shard_counts(per_shard);
                if !delivered.is_empty() && self.spool.delivered(delivered).is_err() {
                    tracing::error!(destination = %self.name, "spool stopped before deliveries were recorded; they will be resent");
                }
                let all_ok = failed.is_empty();
                if let Some(f) = first_failure {
                    stats.failing.store(true, Ordering::Relaxed);
                    stats.set_last_error(format!("{}: {}", f.code, f.message));
                    if let Some(repeats) = failing.should_log() {
                        tracing::warn!(destination = %self.name, failed = failed.len(), code = %f.code, message = %f.message, repeats, "entries not accepted; resending only those");
                    }
                } else {
                    stats.failing.store(false, Ordering::Relaxed);
                    stats.last_success_ms.store(now, Ordering::Relaxed);
                    failing.recovered(|n| tracing::info!(destination = %self.name, after_failures = n, "destination accepts again"));
                }
                // Records the destination refused as too large: learn its limit, encode their
                // blocks again in smaller records, and send those first.
                let mut again = Vec::new();
                for (p, limit) in refused_size {
                    let learned = &self.stats.learned_record_limit;
                    let before = learned.load(Ordering::Relaxed);
                    if before == 0 || limit < before {
                        learned.store(limit, Ordering::Relaxed);
                        tracing::warn!(destination = %self.name, limit_bytes = limit, configured_bytes = self.max_record_bytes, "the destination refuses records over {limit} bytes, less than max_record_bytes; frames are encoded to fit from now on (set max_record_bytes to match)");
                    }
                    let ids = p.block_ids.clone();
                    match self.reencode(p).await {
                        Ok(parts) => again.extend(parts),
                        Err(e) => {
                            tracing::error!(destination = %self.name, error = %e, "cannot encode a refused frame again; its records stay spooled for the next start");
                            let _ = self.spool.release(ids);
                        }
                    }
                }
                for p in again.into_iter().rev() {
                    queue.push_front(p);
                }
                for p in failed.into_iter().rev() {
                    queue.push_front(p);
                }
                if all_ok {
                    Sent::AllAccepted
                } else {
                    Sent::Partly
                }
            }
            Err(e) => {
                let n = call.len() as u64;
                let throttled = is_throttle(&e.code);
                stats.call_failures.fetch_add(1, Ordering::Relaxed);
                stats.entries_failed.fetch_add(n, Ordering::Relaxed);
                stats.count_error(&e.code, n);
                stats.failing.store(true, Ordering::Relaxed);
                stats.set_last_error(e.message.clone());
                let mut per_shard: BTreeMap<Arc<str>, ShardCounters> = BTreeMap::new();
                for p in &call {
                    if let Some(shard) = self.sink.shard_for(&p.entry.key) {
                        let c = per_shard.entry(shard).or_default();
                        if throttled {
                            c.entries_throttled += 1;
                        } else {
                            c.entries_failed += 1;
                        }
                    }
                }
                if throttled {
                    stats.entries_throttled.fetch_add(n, Ordering::Relaxed);
                }
                self.add_shard_counts(per_shard);
                if let Some(repeats) = failing.should_log() {
                    if e.retryable {
                        tracing::warn!(error = %e, repeats, "call failed; records stay spooled and will be resent");
                    } else {
                        tracing::error!(error = %e, repeats, "call refused; check the destination's configuration; records stay spooled");
                    }
                }
                for p in call.into_iter().rev() {
                    queue.push_front(Pending {
                        attempts: p.attempts + 1,
                        ..p
                    });
                }
                Sent::Failed
            }
        }
    }

    fn add_shard_counts(&self, per_shard: BTreeMap<Arc<str>, ShardCounters>) {
        if per_shard.is_empty() {
            return;
        }
        let mut shards = self.stats.shards.lock().unwrap_or_else(|p| p.into_inner());
        for (id, c) in per_shard {
            let t = shards.entry(id).or_default();
            t.entries_accepted += c.entries_accepted;
            t.entries_throttled += c.entries_throttled;
            t.entries_failed += c.entries_failed;
            t.records_accepted += c.records_accepted;
            t.bytes_accepted += c.bytes_accepted;
        }
    }

    /// Reads a plan's blocks and encodes them as one frame, or as several if the compressed
    /// frame does not fit the destination's record limit.
    async fn encode(&self, plan: FramePlan) -> Result<Vec<Pending>, String> {
        let bodies = self.spool.read(plan.block_ids()).await?;
        let format = if self.kpl_routes.contains(&plan.route) {
            FrameFormat::Kpl
        } else {
            FrameFormat::Edgeship
        };
        self.encode_bodies(bodies, plan.key.clone(), format).await
    }

    /// Encodes again, within the (lowered) record limit, the blocks of an entry the
    /// destination refused as too large.
    async fn reencode(&self, refused: Pending) -> Result<Vec<Pending>, String> {
        let bodies = self.spool.read(refused.block_ids).await?;
        let mut out = self
            .encode_bodies(bodies, refused.entry.key, refused.format)
            .await?;
        for p in &mut out {
            p.attempts = refused.attempts;
        }
        Ok(out)
    }

    /// The record size limit in force: the configured one, or the destination's own if it
    /// states a lower one or a refusal showed one.
    fn record_limit(&self) -> usize {
        let mut limit = self.max_record_bytes;
        if let Some(stated) = self.sink.max_record_bytes() {
            limit = limit.min(stated);
        }
        match self.stats.learned_record_limit.load(Ordering::Relaxed) {
            0 => limit as usize,
            refused => limit.min(refused) as usize,
        }
    }

    async fn encode_bodies(
        &self,
        bodies: Vec<(crate::spool::BlockMeta, Vec<u8>)>,
        key: String,
        format: FrameFormat,
    ) -> Result<Vec<Pending>, String> {
        let gateway = self.gateway.clone();
        let level = self.batch.zstd_level;
        let limit = self.record_limit();
        let shard = self.sink.shard_for(&key);
        tokio::task::spawn_blocking(move || {
            let mut encoder = FrameEncoder::new(format, level)?;
            let mut out = Vec::new();
            encode_fitting(&gateway, &key, &bodies, limit, &mut encoder, &mut out)?;
            for p in &mut out {
                p.shard = shard.clone();
                p.format = format;
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Encodes `bodies` (block metadata and uncompressed bodies) into frames of at most `limit`
/// bytes including the key, halving the block list until each fits.
/// How a frame's records become one destination record.
pub enum FrameEncoder {
    /// edgeship's own frame (FORMAT.md), zstd-compressed.
    Edgeship(zstd::bulk::Compressor<'static>),
    /// The KPL aggregated record (uncompressed), for KCL and Lambda deaggregation.
    Kpl,
}

impl FrameEncoder {
    pub fn new(format: FrameFormat, zstd_level: i32) -> Result<FrameEncoder, String> {
        Ok(match format {
            FrameFormat::Edgeship => FrameEncoder::Edgeship(
                frame::frame_compressor(zstd_level).map_err(|e| e.to_string())?,
            ),
            FrameFormat::Kpl => FrameEncoder::Kpl,
        })
    }

    fn encode(
        &mut self,
        gateway: &str,
        key: &str,
        records: u64,
        raw: &[u8],
    ) -> Result<Vec<u8>, String> {
        match self {
            FrameEncoder::Edgeship(compressor) => {
                frame::encode_frame(gateway, records as u32, raw, Some(compressor))
                    .map_err(|e| e.to_string())
            }
            FrameEncoder::Kpl => {
                let records =
                    frame::decode_records(raw, records as u32).map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                let (partition_key, hash_key) = crate::sink::split_key(key);
                crate::kpl::encode(gateway, partition_key, hash_key, &records, &mut out);
                Ok(out)
            }
        }
    }
}

fn encode_fitting(
    gateway: &str,
    key: &str,
    bodies: &[(crate::spool::BlockMeta, Vec<u8>)],
    limit: usize,
    encoder: &mut FrameEncoder,
    out: &mut Vec<Pending>,
) -> Result<(), String> {
    if bodies.is_empty() {
        return Ok(());
    }
    let records: u64 = bodies.iter().map(|(m, _)| u64::from(m.records)).sum();
    let mut raw = Vec::with_capacity(bodies.iter().map(|(_, b)| b.len()).sum());
    for (_, body) in bodies {
        raw.extend_from_slice(body);
    }
    let data = encoder.encode(gateway, key, records, &raw)?;
    if data.len() + key.len() <= limit || bodies.len() == 1 {
        if data.len() + key.len() > limit {
            // Cannot happen with the configured limits (a block is far below any record
            // limit); refuse loudly rather than send a record the destination must reject.
            return Err(format!(
                "a single spool block encodes to {} bytes, over the {limit}-byte record limit",
                data.len()
            ));
        }
        out.push(Pending {
            entry: Entry {
                data,
                key: key.to_string(),
                first_seq: bodies[0].0.id,
            },
            block_ids: bodies.iter().map(|(m, _)| m.id).collect(),
            ages: bodies
                .iter()
                .map(|(m, _)| (m.created_ms, m.records))
                .collect(),
            shard: None,
            records,
            raw_bytes: raw.len() as u64,
            attempts: 0,
            format: FrameFormat::Edgeship,
        });
        return Ok(());
    }
    let (left, right) = bodies.split_at(bodies.len() / 2);
    encode_fitting(gateway, key, left, limit, encoder, out)?;
    encode_fitting(gateway, key, right, limit, encoder, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::BlockMeta;

    fn body(seq: u64, n: usize, payload_len: usize, noisy: bool) -> (BlockMeta, Vec<u8>) {
        let mut b = Vec::new();
        let mut x = seq.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        for i in 0..n {
            let payload: Vec<u8> = (0..payload_len)
                .map(|j| {
                    if noisy {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    } else {
                        b"{\"temp\":21.5}"[j % 13]
                    }
                })
                .collect();
            frame::encode_record(&mut b, seq + i as u64, 1, "t", &payload);
        }
        let meta = BlockMeta {
            id: seq as i64,
            route: "r".into(),
            key: "k".into(),
            records: n as u32,
            raw_bytes: b.len() as u32,
            stored_bytes: 0,
            created_ms: 1,
        };
        (meta, b)
    }

    #[test]
    fn frames_are_split_until_each_fits_the_record_limit() {
        let bodies: Vec<_> = (0..8).map(|i| body(i * 100, 100, 1000, true)).collect();
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        let mut out = Vec::new();
        encode_fitting("gw", "k", &bodies, 256 << 10, &mut c, &mut out).unwrap();
        assert!(
            out.len() >= 4,
            "800 KB of noise needs at least 4 frames of 256 KiB"
        );
        assert!(out.iter().all(|p| p.entry.data.len() < 256 << 10));
        let mut seqs: Vec<u64> = out
            .iter()
            .flat_map(|p| {
                frame::decode_frame(&p.entry.data)
                    .unwrap()
                    .records
                    .into_iter()
                    .map(|r| r.seq)
            })
            .collect();
        seqs.sort();
        assert_eq!(seqs, (0..800).collect::<Vec<_>>());
    }

    #[test]
    fn compressible_blocks_share_one_frame() {
        let bodies: Vec<_> = (0..8).map(|i| body(i * 100, 100, 200, false)).collect();
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        let mut out = Vec::new();
        encode_fitting("gw", "k", &bodies, 1 << 20, &mut c, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].records, 800);
        assert_eq!(out[0].block_ids.len(), 8);
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert!(b.next_delay() >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
