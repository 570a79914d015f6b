//! The shipper's decisions, with no I/O: given leased blocks, the clock, and what the
//! destination answered, it says what to lease, what to encode, what to send and when, and
//! what goes back to the spool. The driver ([`super::Shipper`]) only performs the
//! [`Action`]s and reports their results.
//!
//! Rules, each unit-tested below:
//! - Blocks are planned into frames per (route, key) ([`Batcher`]); encoded frames wait in a
//!   queue of about two calls' worth. With shards, one shard may hold at most half of that
//!   (at least one frame), and all together up to twice it (at least two of the largest
//!   records), so a hot shard, paced or throttled, never keeps the others' frames from being
//!   built and sent; plans of other shards pass its waiting ones.
//! - A call takes queued frames oldest first within the destination's call limits and what
//!   the uplink carries in a few seconds ([`Uplink`]), only those whose shard may write now
//!   ([`Pacer`]); the others keep their place, and no frame passes an older one of its shard
//!   (of its key, without shards) that was left, so each key's records land in order.
//! - Accepted entries' blocks are reported delivered. Entries a shard refused go back to the
//!   front of the queue and that shard alone backs off; a whole failed call backs the
//!   destination off. An entry refused as too large has its blocks encoded again under the
//!   limit the refusal named.
//! - The shipper waits either for a backoff after a failed call, or for a paced shard's next
//!   allowance ([`Hold`]); frames added while it waits for a paced shard go at once.
//! - A route whose records encode larger than the record limit takes at the planned size
//!   (an uncompressed format at one shard's second of raw records) has its frames planned
//!   smaller from its first frame's encoding on ([`ShipState::encoded`]), so frames are not
//!   encoded whole and again in parts; each frame so split is counted.
//! - A frame closes when full or after its linger, or, if it holds at least
//!   [`QUIET_FRAME_BYTES`], once the spool has committed nothing for a while (the longer of
//!   [`QUIET`] and [`QUIET_GAPS`] times the stream's cadence between commits, see
//!   [`cadence`]) and everything committed is planned.
//! - With `max_linger` and a destination billed in units (Kinesis: a PUT payload unit), a
//!   frame that holds less than a unit when its linger is up waits on ([`Batcher`]): its
//!   commits are leased as they come, the lease that fills it commits first as below, and it
//!   goes by `max_linger`, or once the intake is quiet. A route's unit in raw bytes follows
//!   what its last frame encoded to.
//! - While a slow stream's frames linger, its commits wait to be leased until the first
//!   frame is due or the intake would count as quiet ([`ShipState::leases_wait_until`]),
//!   and the driver does not wake for them; commits count at the times the spool made them.
//!   When a slow stream's frame is due, the lease that fills it asks the spool to commit
//!   what it is gathering first if that began by the due time, so the frame takes every
//!   record read by then and the next frame's linger starts after it: frames go a linger
//!   apart, not up to a commit gap sooner (at 1,000 msg/s they went every 0.7-1.1 s, a PUT
//!   unit each).
//!
//! It must never report a block delivered that its destination did not accept, and never
//! resend an entry that was accepted.

use super::batcher::{of_route, Batcher, FramePlan};
use super::pacing::Pacer;
use super::stats::{ShardCounters, ShipperStats};
use super::uplink::Uplink;
use crate::backoff::Backoff;
use crate::frame::encoder::{FrameFormat, PLANNED_FILL};
use crate::logging::Repeated;
use crate::sink::call::{
    entry_cost, CallLimits, Destination, Entry, FailureKind, Outcome, ShardLimits, SinkError,
};
use crate::spool::BlockMeta;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most spooled blocks planned into frames at once. Plans are metadata (about 100 bytes a
/// block); the cap bounds them when a paced shard's plans wait for room while others' are
/// leased past them.
const MAX_PLANNED_BLOCKS: usize = 4096;
/// Blocks asked for in one lease.
const LEASE_BLOCKS: usize = 1024;
/// No commit for this long, with everything committed planned: the intake is quiet (a burst
/// ended, or the publishers stopped). Commits come every `commit_interval` (10 ms) while
/// messages flow fast.
const QUIET: Duration = Duration::from_millis(100);
/// A slower stream's commits come further apart (the spool gathers a few pages' worth, e.g.
/// every 300 ms at 1,000 msg/s): it is quiet only after this many times its cadence (see
/// [`cadence`]), so a steady stream's frames still fill for their linger.
const QUIET_GAPS: u32 = 4;
/// A frame at least this large goes once the intake is quiet rather than after its linger:
/// the tail of a burst reaches the destination 100 ms after the burst, not a linger (1 s by
/// default) after it. Smaller frames, as at low rates, still wait to fill.
const QUIET_FRAME_BYTES: u64 = 64 << 10;

/// What the decisions need to know of the destination now: it learns its shards and its own
/// record limit while it runs.
pub(crate) trait View {
    fn shard_for(&self, key: &str) -> Option<Arc<str>>;
    fn max_record_bytes(&self) -> u64;
}

impl<D: Destination> View for D {
    fn shard_for(&self, key: &str) -> Option<Arc<str>> {
        Destination::shard_for(self, key)
    }
    fn max_record_bytes(&self) -> u64 {
        Destination::max_record_bytes(self)
    }
}

/// What a route's billing unit's raw bytes are estimated by (see
/// [`ShipState::estimate_unit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitBy {
    /// The spool's blocks planned so far: their raw and stored bytes.
    Spool { raw: u64, stored: u64 },
    /// The route's last frame of at least half a unit (see [`ShipState::encoded`]).
    Frames,
}

/// A shipper's fixed settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The destination's name, for logs.
    pub(crate) name: String,
    /// Target uncompressed bytes per frame, and how long a frame may wait for more.
    pub(crate) frame_bytes: u64,
    pub(crate) linger: Duration,
    /// How long in all a frame under one billing unit may wait (at least `linger`).
    pub(crate) max_linger: Duration,
    /// The destination's billing unit (see `Destination::billing_unit_bytes`).
    pub(crate) billing_unit: Option<u64>,
    /// The destination's call limits, its byte limit lowered to the configured call size.
    pub(crate) call: CallLimits,
    /// Encoded frames held in memory stop growing past this; such frames' blocks are safe
    /// from `drop_oldest`, so it stays well under the spool's cap.
    pub(crate) max_queued_bytes: usize,
    pub(crate) shard_limits: Option<ShardLimits>,
    /// Routes whose records are not in the default format, and theirs.
    pub(crate) route_formats: Arc<[(String, FrameFormat)]>,
}

/// An encoded frame waiting to be sent or resent.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) entry: Entry,
    /// The spooled blocks it holds (their receipt times give the end-to-end latency).
    pub(crate) blocks: Vec<BlockMeta>,
    /// The shard its key maps to, when the destination has shards and knows them.
    pub(crate) shard: Option<Arc<str>>,
    pub(crate) records: u64,
    pub(crate) raw_bytes: u64,
    pub(crate) attempts: u32,
    /// How it was encoded, to encode its blocks again (smaller) if it is refused as too large.
    pub(crate) format: FrameFormat,
}

impl Pending {
    fn cost(&self) -> usize {
        entry_cost(&self.entry)
    }

    pub(crate) fn block_ids(&self) -> Vec<i64> {
        self.blocks.iter().map(|b| b.id).collect()
    }
}

/// Blocks to read from the spool and encode.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    pub(crate) key: String,
    pub(crate) format: FrameFormat,
    pub(crate) blocks: Vec<BlockMeta>,
    /// Largest record to build (data and key).
    pub(crate) limit: usize,
    /// Failed attempts of the frame these blocks were in before (a refused frame's).
    pub(crate) attempts: u32,
    /// Frames of a refused frame go to the front of the queue, where it was.
    pub(crate) front: bool,
}

impl Job {
    pub(crate) fn block_ids(&self) -> Vec<i64> {
        self.blocks.iter().map(|b| b.id).collect()
    }
}

/// A call to send.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) entries: Vec<Pending>,
    /// Give up on an answer after this long.
    pub(crate) timeout: Duration,
    bytes: usize,
}

impl Call {
    pub(crate) fn entries(&self) -> Vec<&Entry> {
        self.entries.iter().map(|p| &p.entry).collect()
    }
}

/// What the shipper should do next.
#[derive(Debug)]
pub(crate) enum Action {
    /// Lease block metadata after block id `after`; report with [`ShipState::leased`].
    /// With `commit_before`, the spool first commits the appends it is gathering if the
    /// first of them came by then (a slow stream's frame due then takes them).
    Lease {
        after: i64,
        limit: usize,
        commit_before: Option<Instant>,
    },
    /// Read and encode; report with [`ShipState::encoded`].
    Encode(Job),
    /// Send; report with [`ShipState::answered`].
    Send(Call),
    /// Nothing to do until `until` (if any), new records in the spool, or a stop.
    Wait { until: Option<Instant> },
}

/// Why nothing is sent before a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Send when there is something to send.
    None,
    /// A whole call failed: the destination waits out its backoff.
    Backoff(Instant),
    /// Every queued frame's shard is paced (or backing off) until then; new frames may go
    /// at once.
    Paced(Instant),
}

pub(crate) struct ShipState {
    settings: Settings,
    batcher: Batcher,
    queue: VecDeque<Pending>,
    /// Refused frames' blocks to encode again, first.
    refused: VecDeque<Job>,
    pacer: Pacer,
    uplink: Uplink,
    backoff: Backoff,
    hold: Hold,
    /// Highest block id leased so far.
    cursor: i64,
    /// The last lease found nothing new (until the spool commits more).
    exhausted: bool,
    /// When a commit of the spool was last seen.
    last_commit: Option<Instant>,
    /// The stream's cadence between commits (see [`cadence`]; none before the second).
    commit_gap: Option<Duration>,
    /// Whether blocks were last planned by shard (the destination's shards known).
    grouped_by_shard: bool,
    /// The spool calls the stream slow (see [`ShipState::leases_wait_until`]).
    slow: bool,
    /// The due time of the frame whose lease last asked the spool to commit first (see
    /// [`ShipState::next`]).
    committed_for: Option<Instant>,
    /// Per route, encoded bytes (with the key) per raw byte of its frames (see
    /// [`expansion`]): what its frames are planned by and estimated at.
    expansion: Vec<(String, f64)>,
    /// Per route of the compressed format, what its billing unit's raw bytes are estimated
    /// by (see [`ShipState::estimate_unit`]).
    unit_by: Vec<(String, UnitBy)>,
    failing: Repeated,
    stats: Arc<ShipperStats>,
}

impl ShipState {
    pub(crate) fn new(settings: Settings, stats: Arc<ShipperStats>) -> ShipState {
        ShipState {
            batcher: Batcher::new(settings.frame_bytes, settings.linger).lingering(
                settings.max_linger,
                // Before a route's first frame its records count as large as raw.
                settings.billing_unit.unwrap_or(0),
            ),
            pacer: Pacer::new(settings.shard_limits),
            settings,
            queue: VecDeque::new(),
            refused: VecDeque::new(),
            uplink: Uplink::new(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            hold: Hold::None,
            cursor: 0,
            exhausted: false,
            last_commit: None,
            commit_gap: None,
            grouped_by_shard: false,
            slow: false,
            committed_for: None,
            expansion: Vec::new(),
            unit_by: Vec::new(),
            failing: Repeated::new(Duration::from_secs(60)),
            stats,
        }
    }

    #[cfg(test)]
    fn hold(&self) -> Hold {
        self.hold
    }

    fn queued_bytes(&self) -> usize {
        self.queue.iter().map(|p| p.entry.data.len()).sum()
    }

    /// The record size limit in force: the destination's, or lower if a refusal showed one.
    fn record_limit(&self, view: &dyn View) -> usize {
        let limit = view.max_record_bytes();
        match self.stats.learned_record_limit.load(Ordering::Relaxed) {
            0 => limit as usize,
            refused => limit.min(refused) as usize,
        }
    }

    /// The next thing to do.
    pub(crate) fn next(&mut self, now: Instant, view: &dyn View) -> Action {
        if let Some(job) = self.refused.pop_front() {
            return Action::Encode(job);
        }
        let queued = self.queued_bytes();
        self.stats
            .queued_bytes
            .store(queued as u64, Ordering::Relaxed);
        let record_limit = self.record_limit(view);
        let queue_cap = self
            .settings
            .max_queued_bytes
            .min(self.settings.call.queued_calls.max(1) * self.settings.call.max_bytes);
        let hard_cap = 2 * queue_cap.max(record_limit);
        let mut per_shard: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        for p in &self.queue {
            if let Some(s) = &p.shard {
                *per_shard.entry(s.clone()).or_default() += p.entry.data.len();
            }
        }
        // A plan's frame is estimated from its raw size and what its route's frames encoded
        // to so far (as large as raw before the first).
        let expansion = &self.expansion;
        let has_room = |plan: &FramePlan| match view.shard_for(&plan.key) {
            Some(s) => {
                let held = per_shard.get(&s).copied().unwrap_or(0);
                let frame = (plan.raw_bytes as f64 * expansion_of(expansion, &plan.route)) as usize;
                held == 0 || held + frame <= queue_cap / 2
            }
            None => queued < queue_cap,
        };
        // Lease while little is planned for shards with room (and the plans' metadata stays
        // small).
        let want_more = self.batcher.planned_raw_bytes_where(has_room)
            < 4 * self.settings.frame_bytes
            && self.batcher.planned_blocks() < MAX_PLANNED_BLOCKS;
        let deferred = self.leases_wait_until(now);
        // A slow stream's frame is due: what the spool gathers goes in it if its first
        // record was read by the due time (records read later start the next frame anyway),
        // even when everything committed was leased. Once a frame: frames due by an eighth
        // of the linger after it (other shards', or it again after its lease) take what
        // that commit took (they miss a few ms of records, not a commit gap's).
        let commit_before = self.batcher.next_due().filter(|d| {
            self.slow
                && *d <= now
                && self
                    .committed_for
                    .is_none_or(|c| *d > c + self.settings.linger / 8)
        });
        if (!self.exhausted || commit_before.is_some())
            && deferred.is_none()
            && want_more
            && queued < hard_cap
        {
            if commit_before.is_some() {
                self.committed_for = commit_before;
            }
            return Action::Lease {
                after: self.cursor,
                limit: LEASE_BLOCKS,
                commit_before,
            };
        }
        self.batcher.close_due(now, false);
        if self.quiet_at().is_some_and(|at| now >= at) {
            self.batcher.close_open_of(QUIET_FRAME_BYTES);
            self.batcher.close_lingered(now);
        }
        if queued < hard_cap {
            if let Some(plan) = self.batcher.take_ready_where(has_room) {
                return Action::Encode(self.job(plan, record_limit));
            }
        }
        let held_until = match self.hold {
            Hold::None => None,
            Hold::Backoff(t) | Hold::Paced(t) => Some(t).filter(|t| *t > now),
        };
        if !self.queue.is_empty() && held_until.is_none() {
            match self.pick_call(now) {
                Ok(call) => {
                    self.hold = Hold::None;
                    return Action::Send(call);
                }
                Err(at) => self.hold = Hold::Paced(at),
            }
        }
        let quiet = self
            .quiet_at()
            .filter(|_| self.batcher.has_open_of(QUIET_FRAME_BYTES));
        // A frame waiting on past its linger for more records goes once the intake is quiet.
        let lingered = self
            .quiet_at()
            .zip(self.batcher.next_linger())
            .map(|(quiet, linger)| quiet.max(linger));
        let due = [self.batcher.next_due(), quiet, lingered]
            .into_iter()
            .flatten()
            .min();
        let hold = match self.hold {
            Hold::None => None,
            Hold::Backoff(t) | Hold::Paced(t) => Some(t),
        }
        .filter(|_| !self.queue.is_empty());
        Action::Wait {
            until: [due, hold, deferred].into_iter().flatten().min(),
        }
    }

    fn job(&self, plan: FramePlan, limit: usize) -> Job {
        let format = self.format_of(&plan.route);
        Job {
            blocks: plan.blocks,
            key: plan.key,
            format,
            limit,
            attempts: 0,
            front: false,
        }
    }

    /// The spool made `commits` more commits with records, the last at `last`: lease again.
    pub(crate) fn new_records(&mut self, commits: u64, last: Instant) {
        self.exhausted = false;
        if let (Some(before), Ok(n @ 1..)) = (self.last_commit, u32::try_from(commits)) {
            let gap = last.saturating_duration_since(before) / n;
            self.commit_gap = Some(cadence(self.commit_gap, gap));
        }
        self.last_commit = Some(last);
    }

    /// Whether the spool calls the stream slow (see `SpoolHandle::slow_stream`), as the
    /// driver last saw it.
    pub(crate) fn set_slow(&mut self, slow: bool) {
        self.slow = slow;
    }

    /// Until when a slow stream's commits wait to be leased (`None`: lease them now, and
    /// the driver wakes for each commit): while a frame lingers, until the first frame is
    /// due or the intake would count as quiet (as [`ShipState::quiet_at`] would say had
    /// each commit been leased), whichever comes first. A lease is a round trip to the
    /// spool's thread, which wakes it and the shipper, and a slow stream commits several
    /// times a linger (about every 300 ms at 1,000 msg/s) where one lease before its frame
    /// goes plans the same blocks into it. No record waits past its linger: a block leased
    /// late still lingers from its creation, and blocks committed after a frame opened are
    /// due no sooner than it. What can go later is a frame that would have filled before its
    /// linger, which only a stream near the spool's slow limit (its commit target in a commit
    /// interval, 1.6 MB/s) fills, and then it goes at its linger. The first commit after a
    /// stream's frames went is leased at once, and so are a busy stream's, from when the
    /// driver next looks (at the latest when this wait ends).
    pub(crate) fn leases_wait_until(&self, now: Instant) -> Option<Instant> {
        if !self.slow {
            return None;
        }
        // A frame waiting on past its linger learns it filled from the next lease.
        let due = self.batcher.next_linger()?;
        Some(due.min(self.quiet_after_last_commit()?)).filter(|t| *t > now)
    }

    /// When the intake counts as quiet: everything committed is planned and no commit came
    /// for [`QUIET`], or [`QUIET_GAPS`] times the stream's cadence if that is longer, since
    /// the last one seen. Then a frame of [`QUIET_FRAME_BYTES`] or more goes without
    /// waiting out its linger, since nothing more is coming soon to fill it. Never before
    /// the second commit: one commit tells nothing of the stream's cadence.
    fn quiet_at(&self) -> Option<Instant> {
        self.quiet_after_last_commit().filter(|_| self.exhausted)
    }

    /// [`QUIET`], or [`QUIET_GAPS`] times the stream's cadence if that is longer, after the
    /// last commit seen (none before the second commit).
    fn quiet_after_last_commit(&self) -> Option<Instant> {
        Some(self.last_commit? + QUIET.max(self.commit_gap? * QUIET_GAPS))
    }

    /// What a lease of at most `asked` blocks returned. Fewer than asked is everything the
    /// spool had committed then (it lists until it finds `asked` or runs out): nothing to
    /// lease until it commits again, so no second lease goes out only to come back empty (a
    /// round trip to the spool's thread, two wakeups, per commit).
    pub(crate) fn leased(
        &mut self,
        blocks: Vec<BlockMeta>,
        asked: usize,
        view: &dyn View,
        now: Instant,
        now_ms: u64,
    ) {
        self.exhausted = blocks.len() < asked;
        for b in blocks {
            self.cursor = self.cursor.max(b.id);
            self.plan(b, view, now, now_ms);
        }
    }

    /// Plans a block into the frame of the shard it goes to (of many keys), or of its key
    /// while the destination's shards are not known. When they become known, the frames
    /// planned by key close first: every frame of a shard is then younger than them, and a
    /// key's records keep their order.
    fn plan(&mut self, block: BlockMeta, view: &dyn View, now: Instant, now_ms: u64) {
        let group = match view.shard_for(&block.key) {
            Some(shard) => {
                if !self.grouped_by_shard {
                    self.batcher.close_due(now, true);
                    self.grouped_by_shard = true;
                }
                format!("\u{1}{shard}")
            }
            None => {
                self.grouped_by_shard = false;
                block.key.clone()
            }
        };
        self.estimate_unit(&block);
        self.batcher.push_in(block, group, now, now_ms);
    }

    /// Until a route's frames show their own ratio, the raw bytes of one billing unit by the
    /// spool's ratio of stored to raw bytes, for routes in edgeship's compressed format: its
    /// frames compress the same records with more of them in one context, at least as well
    /// (at 20 msg/s the spool's blocks of about 100 telemetry messages stored 0.115 of
    /// their raw bytes, frames of about 1,000 encoded to 0.107). Before, a `max_linger`
    /// stream's first frame went early (3 messages, the intake quiet at the start; or at a
    /// unit of raw bytes, about 120) and its ratio set the next one's unit: frames of 3,
    /// 216, 1,023 and 1,105 messages at 20 msg/s, where now they hold 3, 926 and 1,130
    /// (one 120 s run each). The other formats are not compressed: their unit is a unit of
    /// raw bytes until a frame shows their ratio.
    fn estimate_unit(&mut self, block: &BlockMeta) {
        let Some(unit) = self.settings.billing_unit else {
            return;
        };
        if block.stored_bytes == 0 || self.format_of(&block.route) != FrameFormat::Edgeship {
            return;
        }
        let by = match self.unit_by.iter_mut().find(|(r, _)| *r == block.route) {
            Some((_, by)) => by,
            None => {
                let by = UnitBy::Spool { raw: 0, stored: 0 };
                self.unit_by.push((block.route.clone(), by));
                &mut self.unit_by.last_mut().expect("just pushed").1
            }
        };
        let UnitBy::Spool { raw, stored } = by else {
            return;
        };
        *raw += u64::from(block.raw_bytes);
        *stored += u64::from(block.stored_bytes);
        // Never below a unit: records stored larger than raw encode no larger than raw.
        let unit_raw = (unit as f64 * *raw as f64 / *stored as f64).max(unit as f64);
        self.batcher.set_unit(&block.route, unit_raw as u64);
    }

    /// The format a route's frames are encoded in.
    fn format_of(&self, route: &str) -> FrameFormat {
        self.settings
            .route_formats
            .iter()
            .find(|(r, _)| r == route)
            .map_or(FrameFormat::Edgeship, |(_, format)| *format)
    }

    /// A job's frames, encoded (blocks gone from the spool meanwhile are left out). More than
    /// one frame means the job was encoded whole, found too large and encoded again in parts
    /// (counted); the route's frames are planned to fill [`PLANNED_FILL`] of the record limit,
    /// by what its records are seen to encode to.
    pub(crate) fn encoded(&mut self, job: &Job, frames: Vec<Pending>) {
        if frames.len() > 1 {
            self.stats.frames_split.fetch_add(1, Ordering::Relaxed);
        }
        let raw: u64 = frames.iter().map(|p| p.raw_bytes).sum();
        let sent: usize = frames
            .iter()
            .map(|p| p.entry.data.len() + job.key.len())
            .sum();
        if let (Some(block), 1..) = (job.blocks.first(), raw) {
            let seen = sent as f64 / raw as f64;
            let route = &block.route;
            let ratio = match self.expansion.iter_mut().find(|(r, _)| r == route) {
                Some((_, e)) => {
                    *e = expansion(*e, seen);
                    *e
                }
                None => {
                    self.expansion.push((route.clone(), seen));
                    seen
                }
            };
            let target = job.limit as f64 * PLANNED_FILL / ratio;
            self.batcher.set_target(route, target as u64);
            // A unit's raw bytes by this frame's ratio, not the cautious one above (which
            // falls by a quarter of the difference a frame: at 20 msg/s, frames of a minute,
            // it took several minutes to come down). A frame that waited on is at least as
            // large as the last and compresses as well; one that does not costs a unit more.
            //
            // A frame of less than half the raw bytes the spool's ratio puts in a unit (one
            // that went early, the intake quiet at its start: 3 messages) compresses worse
            // than a full one: while only such frames were seen, the spool's ratio stands.
            if let Some(unit) = self.settings.billing_unit {
                let by = self.unit_by.iter_mut().find(|(r, _)| r == route);
                let estimated = matches!(by, Some((_, UnitBy::Spool { .. })));
                if !estimated || raw * 2 >= self.batcher.unit(route) {
                    self.batcher.set_unit(route, (unit as f64 / seen) as u64);
                    if let Some((_, by)) = by {
                        *by = UnitBy::Frames;
                    }
                }
            }
        }
        if job.front {
            for p in frames.into_iter().rev() {
                self.queue.push_front(p);
            }
        } else {
            self.queue.extend(frames);
        }
        // Waiting only for a paced shard: the new frames may go now.
        if matches!(self.hold, Hold::Paced(_)) {
            self.hold = Hold::None;
        }
    }

    /// A job could not be encoded because its block at `failed` does not fit the record limit
    /// on its own: that block is replaced by `replacement` (its halves, or nothing when it was
    /// dead-lettered), and the job's other blocks are planned again.
    pub(crate) fn job_failed(
        &mut self,
        job: Job,
        failed: usize,
        replacement: Vec<BlockMeta>,
        view: &dyn View,
        now: Instant,
        now_ms: u64,
    ) {
        let others = job
            .blocks
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != failed)
            .map(|(_, b)| b);
        for b in replacement.into_iter().chain(others) {
            self.plan(b, view, now, now_ms);
        }
    }

    /// Queued frames whose shards may write now, oldest first, within the call limits and
    /// what the uplink carries in a few seconds; or, if none may, when the first could.
    fn pick_call(&mut self, now: Instant) -> Result<Call, Instant> {
        let max_bytes = self.uplink.call_bytes(self.settings.call.max_bytes);
        let (mut picked, mut bytes) = (Vec::new(), 0usize);
        let mut earliest: Option<Instant> = None;
        // Shards (keys, without shards) with a frame left behind: their later frames stay
        // behind it, however small, or their keys' records would land out of order.
        let mut left: Vec<&str> = Vec::new();
        for (i, p) in self.queue.iter().enumerate() {
            if picked.len() >= self.settings.call.max_entries {
                break;
            }
            let order = p.shard.as_deref().unwrap_or(&p.entry.key);
            if left.contains(&order) {
                continue;
            }
            let cost = p.cost();
            if !picked.is_empty() && bytes + cost > max_bytes {
                left.push(order);
                continue;
            }
            if self.pacer.try_take(p.shard.as_ref(), cost, now) {
                picked.push(i);
                bytes += cost;
            } else {
                left.push(order);
                let at = self.pacer.ready_at(p.shard.as_ref(), cost, now);
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        if picked.is_empty() {
            return Err(earliest.unwrap_or(now + Duration::from_millis(50)));
        }
        // One pass: picked entries into the call, the rest keep their order in the queue.
        let mut entries = Vec::with_capacity(picked.len());
        let mut next = picked.into_iter().peekable();
        let rest: VecDeque<Pending> = std::mem::take(&mut self.queue)
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| {
                if next.peek() == Some(&i) {
                    next.next();
                    entries.push(p);
                    None
                } else {
                    Some(p)
                }
            })
            .collect();
        self.queue = rest;
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let retried = entries.iter().filter(|p| p.attempts > 0).count() as u64;
        self.stats
            .entries_retried
            .fetch_add(retried, Ordering::Relaxed);
        Ok(Call {
            entries,
            timeout: self.uplink.timeout(bytes),
            bytes,
        })
    }

    /// What the destination answered to a call (after `elapsed`). Returns the blocks now
    /// delivered, for the spool.
    pub(crate) fn answered(
        &mut self,
        call: Call,
        result: Result<Vec<crate::sink::call::Outcome>, SinkError>,
        elapsed: Duration,
        now: Instant,
        now_ms: u64,
    ) -> Vec<i64> {
        match &result {
            Err(e) if e.failure.kind == FailureKind::TimedOut => {
                self.uplink.timed_out(call.bytes, elapsed)
            }
            _ => self.uplink.answered(call.bytes, elapsed),
        }
        if let Some(rate) = self.uplink.rate() {
            self.stats.uplink_rate.store(rate as u64, Ordering::Relaxed);
        }
        match result {
            Ok(outcomes) if outcomes.len() == call.entries.len() => {
                self.backoff.reset();
                self.entries_answered(call, outcomes, now, now_ms)
            }
            Ok(outcomes) => {
                let e = SinkError {
                    destination: self.settings.name.clone(),
                    failure: crate::sink::call::Failure::new(
                        FailureKind::Transient,
                        "ResultCountMismatch",
                        format!(
                            "{} outcomes for a call of {} entries",
                            outcomes.len(),
                            call.entries.len()
                        ),
                    ),
                };
                self.call_failed(call, e, now);
                Vec::new()
            }
            Err(e) => {
                self.call_failed(call, e, now);
                Vec::new()
            }
        }
    }

    fn entries_answered(
        &mut self,
        call: Call,
        outcomes: Vec<Outcome>,
        now: Instant,
        now_ms: u64,
    ) -> Vec<i64> {
        let stats = self.stats.clone();
        let mut delivered = Vec::new();
        let mut failed = Vec::new();
        let mut first_failure = None;
        let mut per_shard: BTreeMap<Arc<str>, ShardCounters> = BTreeMap::new();
        for (pending, outcome) in call.entries.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Accepted { shard } => {
                    self.pacer.accepted(pending.shard.as_ref(), now);
                    let bytes = pending.entry.data.len() as u64;
                    stats.entries_accepted.fetch_add(1, Ordering::Relaxed);
                    stats
                        .records_accepted
                        .fetch_add(pending.records, Ordering::Relaxed);
                    stats.bytes_accepted.fetch_add(bytes, Ordering::Relaxed);
                    stats
                        .raw_bytes_accepted
                        .fetch_add(pending.raw_bytes, Ordering::Relaxed);
                    for b in &pending.blocks {
                        stats.end_to_end_latency.record_n(
                            Duration::from_millis(now_ms.saturating_sub(b.created_ms)),
                            u64::from(b.records),
                        );
                    }
                    if let Some(shard) = shard {
                        let c = per_shard.entry(shard).or_default();
                        c.entries_accepted += 1;
                        c.records_accepted += pending.records;
                        c.bytes_accepted += bytes;
                    }
                    delivered.extend(pending.block_ids());
                }
                Outcome::Failed { failure, shard } => {
                    self.pacer.refused(pending.shard.as_ref(), now);
                    let throttled = failure.kind == FailureKind::Throttled;
                    stats.entries_failed.fetch_add(1, Ordering::Relaxed);
                    if throttled {
                        stats.entries_throttled.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.count_error(&failure.code, 1);
                    if let Some(shard) = shard {
                        let c = per_shard.entry(shard).or_default();
                        if throttled {
                            c.entries_throttled += 1;
                        } else {
                            c.entries_failed += 1;
                        }
                    }
                    let pending = Pending {
                        attempts: pending.attempts + 1,
                        ..pending
                    };
                    match failure.kind {
                        FailureKind::TooLarge { limit } if pending.cost() as u64 > limit => {
                            self.learn_record_limit(limit);
                            self.refused.push_back(Job {
                                key: pending.entry.key,
                                format: pending.format,
                                blocks: pending.blocks,
                                limit: limit as usize,
                                attempts: pending.attempts,
                                front: true,
                            });
                        }
                        _ => failed.push(pending),
                    }
                    first_failure.get_or_insert(failure);
                }
            }
        }
        stats.add_shard_counts(per_shard);
        match first_failure {
            Some(f) => {
                stats.failing.store(true, Ordering::Relaxed);
                stats.set_last_error(format!("{}: {}", f.code, f.message));
                if let Some(repeats) = self.failing.should_log() {
                    tracing::warn!(destination = %self.settings.name, failed = failed.len(), code = %f.code, message = %f.message, repeats, "entries not accepted; resending only those");
                }
            }
            None => {
                stats.failing.store(false, Ordering::Relaxed);
                stats.last_success_ms.store(now_ms, Ordering::Relaxed);
                let name = &self.settings.name;
                self.failing.recovered(|n| tracing::info!(destination = %name, after_failures = n, "destination accepts again"));
            }
        }
        for p in failed.into_iter().rev() {
            self.queue.push_front(p);
        }
        delivered
    }

    /// A refusal named a record limit below the one in force: frames are built under it from
    /// now on.
    fn learn_record_limit(&mut self, limit: u64) {
        let learned = &self.stats.learned_record_limit;
        let before = learned.load(Ordering::Relaxed);
        if before == 0 || limit < before {
            learned.store(limit, Ordering::Relaxed);
            tracing::warn!(destination = %self.settings.name, limit_bytes = limit, "the destination refuses records over {limit} bytes, less than max_record_bytes; frames are encoded to fit from now on (set max_record_bytes to match)");
        }
    }

    fn call_failed(&mut self, call: Call, e: SinkError, now: Instant) {
        let stats = &self.stats;
        let n = call.entries.len() as u64;
        let throttled = e.failure.kind == FailureKind::Throttled;
        stats.call_failures.fetch_add(1, Ordering::Relaxed);
        stats.entries_failed.fetch_add(n, Ordering::Relaxed);
        stats.count_error(&e.failure.code, n);
        stats.failing.store(true, Ordering::Relaxed);
        stats.set_last_error(e.failure.message.clone());
        if throttled {
            stats.entries_throttled.fetch_add(n, Ordering::Relaxed);
        }
        let mut per_shard: BTreeMap<Arc<str>, ShardCounters> = BTreeMap::new();
        for p in &call.entries {
            if let Some(shard) = &p.shard {
                let c = per_shard.entry(shard.clone()).or_default();
                if throttled {
                    c.entries_throttled += 1;
                } else {
                    c.entries_failed += 1;
                }
            }
        }
        stats.add_shard_counts(per_shard);
        if let Some(repeats) = self.failing.should_log() {
            if e.failure.kind == FailureKind::Refused {
                tracing::error!(error = %e, repeats, "call refused; check the destination's configuration; records stay spooled");
            } else {
                tracing::warn!(error = %e, repeats, "call failed; records stay spooled and will be resent");
            }
        }
        for p in call.entries.into_iter().rev() {
            self.queue.push_front(Pending {
                attempts: p.attempts + 1,
                ..p
            });
        }
        self.hold = Hold::Backoff(now + self.backoff.next_delay());
    }

    /// Every block held (planned, queued, or to be encoded again), for giving the leases
    /// back when the shipper stops.
    pub(crate) fn give_back(mut self) -> Vec<i64> {
        let mut ids = self.batcher.drain_block_ids();
        ids.extend(self.queue.drain(..).flat_map(|p| p.block_ids()));
        ids.extend(self.refused.drain(..).flat_map(|j| j.block_ids()));
        ids
    }
}

/// Turns a job's encoded records into queued frames: which blocks each holds. `blocks` are
/// those of the job's blocks the spool still had, in order.
pub(crate) fn frames(
    job: &Job,
    blocks: &[BlockMeta],
    encoded: Vec<crate::frame::encoder::Encoded>,
    shard: Option<Arc<str>>,
) -> Vec<Pending> {
    encoded
        .into_iter()
        .map(|e| {
            let held = &blocks[e.bodies.clone()];
            Pending {
                entry: Entry {
                    data: e.data,
                    key: job.key.clone(),
                    first_seq: held[0].id,
                },
                blocks: held.to_vec(),
                shard: shard.clone(),
                records: e.records,
                raw_bytes: e.raw_bytes,
                attempts: job.attempts,
                format: job.format,
            }
        })
        .collect()
}

/// A route's encoded bytes per raw byte so far; 1 before its first frame.
fn expansion_of(expansion: &[(String, f64)], route: &str) -> f64 {
    of_route(expansion, route).unwrap_or(1.0)
}

/// A route's encoded bytes per raw byte after one more frame's `seen`: a larger ratio counts
/// at once (a frame planned by the old one may not fit), a smaller one lowers it by a quarter
/// of the difference, so one frame of unusually compressible records does not make the next
/// frames too large.
fn expansion(before: f64, seen: f64) -> f64 {
    if seen >= before {
        seen
    } else {
        before * 0.75 + seen * 0.25
    }
}

/// The stream's cadence between commits after one more `gap`: a longer gap raises it at once,
/// a shorter one lowers it by a quarter at most. A slow stream's commits need not come
/// evenly: a paced read that fills the spool's commit target at once ends its group at the
/// commit interval, while the next group gathers until a pause of several paces, so two
/// commits may come 60 ms apart and the next 300 ms later. Judged by the last gap alone, that
/// 300 ms passed for the end of a burst and frames went early (41-45 Kinesis records in 30 s
/// at 1,000 msg/s instead of 32-33). A burst's own commits bring it down within a dozen.
fn cadence(before: Option<Duration>, gap: Duration) -> Duration {
    before.map_or(gap, |c| gap.max(c * 3 / 4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::call::Failure;

    /// A destination with two shards: keys starting with `a` go to shard A, others to B;
    /// `unknown` keys have no shard yet.
    struct TwoShards {
        record_limit: u64,
    }

    impl View for TwoShards {
        fn shard_for(&self, key: &str) -> Option<Arc<str>> {
            match key.chars().next() {
                Some('a') => Some(Arc::from("A")),
                Some('u') => None,
                _ => Some(Arc::from("B")),
            }
        }
        fn max_record_bytes(&self) -> u64 {
            self.record_limit
        }
    }

    const VIEW: TwoShards = TwoShards {
        record_limit: 1 << 20,
    };

    fn settings(shard_limits: Option<ShardLimits>) -> Settings {
        Settings {
            name: "d".into(),
            frame_bytes: 10_000,
            linger: Duration::from_millis(100),
            max_linger: Duration::from_millis(100),
            billing_unit: None,
            call: CallLimits {
                max_entries: 500,
                max_bytes: 5 << 20,
                queued_calls: 2,
            },
            max_queued_bytes: 64 << 20,
            shard_limits,
            route_formats: Arc::from(Vec::new()),
        }
    }

    fn state(shard_limits: Option<ShardLimits>) -> ShipState {
        ShipState::new(settings(shard_limits), Arc::default())
    }

    fn block(id: i64, key: &str, raw: u32) -> BlockMeta {
        BlockMeta {
            id,
            route: "r".into(),
            key: key.into(),
            version: crate::frame::VERSION_2,
            records: 10,
            raw_bytes: raw,
            stored_bytes: raw / 4,
            created_ms: 1_000,
        }
    }

    fn frame(job: &Job, bytes: usize, view: &dyn View) -> Vec<Pending> {
        vec![Pending {
            entry: Entry {
                data: vec![0; bytes],
                key: job.key.clone(),
                first_seq: job.blocks[0].id,
            },
            blocks: job.blocks.clone(),
            shard: view.shard_for(&job.key),
            records: 10 * job.blocks.len() as u64,
            raw_bytes: job.blocks.iter().map(|b| u64::from(b.raw_bytes)).sum(),
            attempts: job.attempts,
            format: job.format,
        }]
    }

    /// Runs the state until it sends a call or waits, answering leases with `blocks` once
    /// and encoding every job as one frame of `frame_bytes`.
    fn until_send(
        s: &mut ShipState,
        blocks: &mut Option<Vec<BlockMeta>>,
        frame_bytes: usize,
        now: Instant,
        now_ms: u64,
    ) -> Action {
        for _ in 0..1000 {
            match s.next(now, &VIEW) {
                Action::Lease { limit, .. } => {
                    s.leased(blocks.take().unwrap_or_default(), limit, &VIEW, now, now_ms)
                }
                Action::Encode(job) => {
                    let f = frame(&job, frame_bytes, &VIEW);
                    s.encoded(&job, f);
                }
                other => return other,
            }
        }
        panic!("the state never settles");
    }

    fn accepted(n: usize) -> Vec<Outcome> {
        vec![Outcome::Accepted { shard: None }; n]
    }

    /// Encodes a job as [`FrameEncoder::encode_fitting`](crate::frame::encoder) does, with
    /// records `ratio` times their raw size: whole, and again in halves while a piece is over
    /// the job's limit (as the encoder cuts blocks of equal size, which these tests use).
    fn encode_like(job: &Job, blocks: &[BlockMeta], ratio: f64, out: &mut Vec<Pending>) {
        let raw: u64 = blocks.iter().map(|b| u64::from(b.raw_bytes)).sum();
        let bytes = (raw as f64 * ratio) as usize;
        if bytes + job.key.len() > job.limit && blocks.len() > 1 {
            let (left, right) = blocks.split_at(blocks.len() / 2);
            encode_like(job, left, ratio, out);
            encode_like(job, right, ratio, out);
            return;
        }
        out.push(Pending {
            entry: Entry {
                data: vec![0; bytes],
                key: job.key.clone(),
                first_seq: blocks[0].id,
            },
            blocks: blocks.to_vec(),
            shard: None,
            records: blocks.iter().map(|b| u64::from(b.records)).sum(),
            raw_bytes: raw,
            attempts: job.attempts,
            format: job.format,
        });
    }

    /// KPL records are about 1.3 times the spooled records they carry: a backlog planned at
    /// a 1 MiB frame for a 1 MiB record limit has its first frame encoded whole and again in
    /// halves (counted), and every later frame, the ones already planned included, is
    /// planned to fit and encoded once. Every block is encoded once in the end, in order.
    #[test]
    fn a_route_whose_records_grow_when_encoded_has_its_frames_planned_to_fit() {
        let mut settings = settings(None);
        settings.frame_bytes = 1 << 20;
        let stats = Arc::new(ShipperStats::default());
        let mut s = ShipState::new(settings, stats.clone());
        let now = Instant::now();
        let mut blocks: Vec<BlockMeta> = (1..=96).map(|id| block(id, "a", 64 << 10)).collect();
        let mut lease = Some(std::mem::take(&mut blocks));
        let mut sent = Vec::new();
        let mut jobs = 0;
        for _ in 0..1000 {
            match s.next(now, &VIEW) {
                Action::Lease { limit, .. } => {
                    s.leased(lease.take().unwrap_or_default(), limit, &VIEW, now, 1_000)
                }
                Action::Encode(job) => {
                    jobs += 1;
                    let mut out = Vec::new();
                    encode_like(&job, &job.blocks, 1.3, &mut out);
                    s.encoded(&job, out);
                }
                Action::Send(call) => {
                    for p in &call.entries {
                        assert!(p.cost() <= (1 << 20) + 64, "{} bytes", p.entry.data.len());
                    }
                    let n = call.entries.len();
                    sent.extend(s.answered(
                        call,
                        Ok(accepted(n)),
                        Duration::from_millis(5),
                        now,
                        1_000,
                    ));
                }
                Action::Wait { .. } if sent.len() == 96 => break,
                Action::Wait { .. } => s.batcher.close_due(now, true),
            }
        }
        assert_eq!(
            sent,
            (1..=96).collect::<Vec<i64>>(),
            "every block once, in order"
        );
        assert_eq!(
            stats.frames_split.load(Ordering::Relaxed),
            1,
            "only the first frame split"
        );
        // The first frame's 16 blocks in halves; then the 80 planned after them are planned
        // again at 15/16 MiB encoded, 11 blocks a frame (720,896 raw bytes, 937,165 encoded).
        assert_eq!(jobs, 9);
    }

    /// A call of at most 5 MiB: shard A's second 3 MB frame does not fit beside its first, so
    /// A's small third frame waits behind it (it would fit, but its keys' records would land
    /// before the second's); shard B's frame, after them in the queue, goes.
    #[test]
    fn a_frame_left_out_of_a_call_is_not_passed_by_a_later_one_of_its_shard() {
        let mut s = state(None);
        s.uplink.answered(4 << 20, Duration::from_millis(10));
        for (id, key, bytes) in [
            (1, "a1", 3_000_000),
            (2, "a2", 3_000_000),
            (3, "a3", 1_000),
            (4, "b", 1_000),
        ] {
            let job = Job {
                key: key.into(),
                format: FrameFormat::Edgeship,
                blocks: vec![block(id, key, 100)],
                limit: 1 << 20,
                attempts: 0,
                front: false,
            };
            s.queue.extend(frame(&job, bytes, &VIEW));
        }
        let firsts = |c: &Call| {
            c.entries
                .iter()
                .map(|p| p.block_ids()[0])
                .collect::<Vec<_>>()
        };
        let call = s.pick_call(Instant::now()).expect("a call");
        assert_eq!(firsts(&call), vec![1, 4]);
        let call = s.pick_call(Instant::now()).expect("a call");
        assert_eq!(firsts(&call), vec![2, 3]);
    }

    /// Firehose's limits hold in the calls the shipper assembles: 500 records of 1 KB go in
    /// one call and no more; records of 9 KB stop at 4 MiB (465 of them), not at 500.
    #[test]
    fn calls_to_firehose_keep_its_record_and_byte_limits() {
        let mut settings = settings(None);
        settings.call = crate::sink::firehose::CALL;
        for (bytes, most) in [(1_000, 500), (9_000, (4 << 20) / 9_005)] {
            let mut s = ShipState::new(settings.clone(), Arc::default());
            // A fast link measured: calls are sized by the destination's limits alone.
            s.uplink.answered(4 << 20, Duration::from_millis(10));
            for id in 0..1_200 {
                let job = Job {
                    key: "dev-1".into(),
                    format: FrameFormat::Ndjson,
                    blocks: vec![block(id, "dev-1", 100)],
                    limit: 1 << 20,
                    attempts: 0,
                    front: false,
                };
                s.queue.extend(frame(&job, bytes, &VIEW));
            }
            let mut sent = 0;
            while sent < 1_200 {
                let call = s.pick_call(Instant::now()).expect("a call");
                let n = call.entries.len();
                let total: usize = call.entries.iter().map(|p| p.cost()).sum();
                assert!(n <= 500 && total <= 4 << 20, "{n} records, {total} bytes");
                assert_eq!(n, most.min(1_200 - sent), "{bytes}-byte records");
                sent += n;
            }
        }
    }

    #[test]
    fn full_frames_go_at_once_and_partial_ones_after_linger() {
        let mut s = state(None);
        let t0 = Instant::now();
        // Key a: two blocks fill a frame; key b: a small one waits for its linger.
        let mut blocks = Some(vec![
            block(1, "a", 6_000),
            block(2, "a", 6_000),
            block(3, "b", 100),
        ]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!("the full frame is sent");
        };
        assert_eq!(call.entries.len(), 1);
        assert_eq!(call.entries[0].block_ids(), vec![1]);
        let delivered = s.answered(call, Ok(accepted(1)), Duration::from_millis(5), t0, 1_000);
        assert_eq!(delivered, vec![1]);
        // Nothing else is due before the linger of block 2's and 3's frames.
        match until_send(&mut s, &mut None, 500, t0, 1_000) {
            Action::Wait { until } => {
                assert_eq!(until, Some(t0 + Duration::from_millis(100)))
            }
            other => panic!("{other:?}"),
        }
        let later = t0 + Duration::from_millis(100);
        let Action::Send(call) = until_send(&mut s, &mut None, 500, later, 1_100) else {
            panic!("lingered frames are sent");
        };
        let mut ids: Vec<i64> = call.entries.iter().flat_map(|p| p.block_ids()).collect();
        ids.sort();
        assert_eq!(ids, vec![2, 3]);
    }

    /// Frames of up to 1 MiB lingering for a second.
    fn lingering_a_second() -> ShipState {
        let mut settings = settings(None);
        settings.frame_bytes = 1 << 20;
        settings.linger = Duration::from_secs(1);
        ShipState::new(settings, Arc::default())
    }

    /// What the shipper waits for, or a panic if it does anything else.
    fn waits_until(action: Action) -> Option<Instant> {
        match action {
            Action::Wait { until } => until,
            other => panic!("expected a wait: {other:?}"),
        }
    }

    /// A frame of `QUIET_FRAME_BYTES` or more goes once no commit came for `QUIET` (the
    /// tail of a burst), not after its linger; a smaller one still waits out its linger.
    #[test]
    fn a_large_frame_goes_when_the_intake_is_quiet_and_a_small_one_lingers() {
        let ms = Duration::from_millis;
        let (mut s, t0) = (lingering_a_second(), Instant::now());
        // Commits 10 ms apart, as while messages flow.
        s.new_records(1, t0 - Duration::from_millis(10));
        s.new_records(1, t0);
        // Shard A: 100 KiB planned, far from full; shard B: 1 KiB.
        let mut blocks = Some(vec![block(1, "a", 100 << 10), block(2, "b", 1 << 10)]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 500, t0, 1_000)),
            Some(t0 + QUIET)
        );
        // A commit 20 ms later (nothing in it for this destination): quiet counts from it.
        s.new_records(1, t0 + ms(20));
        assert_eq!(
            waits_until(until_send(&mut s, &mut None, 500, t0 + ms(119), 1_119)),
            Some(t0 + ms(20) + QUIET)
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 500, t0 + ms(120), 1_120) else {
            panic!("the large frame goes when the intake is quiet");
        };
        assert_eq!(call.entries.len(), 1);
        assert_eq!(call.entries[0].block_ids(), vec![1]);
        s.answered(call, Ok(accepted(1)), ms(5), t0 + ms(120), 1_120);
        // The small one waits for its linger.
        assert_eq!(
            waits_until(until_send(&mut s, &mut None, 500, t0 + ms(120), 1_120)),
            Some(t0 + Duration::from_secs(1))
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 500, t0 + ms(1_000), 2_000) else {
            panic!("after its linger");
        };
        assert_eq!(call.entries[0].block_ids(), vec![2]);
    }

    /// A slow, steady stream commits every 300 ms: a gap of that length is its cadence, not
    /// quiet, so its frame fills for its linger; once a burst's commits bring the cadence
    /// down, four of its gaps without a commit are quiet.
    #[test]
    fn a_slow_streams_commit_gaps_are_not_quiet() {
        let ms = Duration::from_millis;
        let (mut s, t0) = (lingering_a_second(), Instant::now());
        for (i, at) in [0u64, 300, 600, 900].into_iter().enumerate() {
            s.new_records(1, t0 + ms(at));
            let id = i as i64 + 1;
            let mut blocks = Some(vec![block(id, "a", 70 << 10)]);
            // The frame waits for its linger (1 s after it opened with the first commit).
            match until_send(&mut s, &mut blocks, 500, t0 + ms(at), 1_000 + at) {
                Action::Wait { until } => assert_eq!(until, Some(t0 + ms(1_000)), "at {at} ms"),
                other => panic!("a frame closed between a steady stream's commits: {other:?}"),
            }
        }
        let Action::Send(call) = until_send(&mut s, &mut None, 500, t0 + ms(1_000), 2_000) else {
            panic!("after its linger");
        };
        assert_eq!(call.entries[0].block_ids(), vec![1, 2, 3, 4]);
        s.answered(call, Ok(accepted(1)), ms(5), t0 + ms(1_000), 2_000);
        // A burst: commits 50 ms apart, seven of them before the cadence (300 ms, lowered by
        // a quarter at most per commit) is down to 50 ms; then none: quiet after four of that
        // gap, before the linger.
        s.new_records(1, t0 + ms(1_200));
        for k in 1..=7 {
            s.new_records(1, t0 + ms(1_200 + 50 * k));
        }
        let mut last = block(5, "a", 70 << 10);
        last.created_ms = 2_550;
        let mut blocks = Some(vec![last]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 500, t0 + ms(1_550), 2_550)),
            Some(t0 + ms(1_550 + 4 * 50))
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 500, t0 + ms(1_750), 2_750) else {
            panic!("the frame goes when the intake is quiet");
        };
        assert_eq!(call.entries[0].block_ids(), vec![5]);
    }

    /// A lease that comes back with fewer blocks than it asked for holds everything the
    /// spool had committed: the next lease waits for the next commit, so a commit costs one
    /// lease, not a second that only comes back empty. A full lease asks again at once.
    #[test]
    fn a_commit_is_leased_once_unless_the_lease_came_back_full() {
        let (mut s, t0) = (lingering_a_second(), Instant::now());
        s.new_records(1, t0);
        let Action::Lease { after, limit, .. } = s.next(t0, &VIEW) else {
            panic!("a commit is leased");
        };
        assert_eq!(after, 0);
        s.leased(vec![block(1, "a", 1 << 10)], limit, &VIEW, t0, 1_000);
        assert!(
            matches!(s.next(t0, &VIEW), Action::Wait { .. }),
            "a short lease took everything committed"
        );
        // A full lease: there may be more.
        s.new_records(1, t0 + Duration::from_millis(10));
        let Action::Lease { after, limit, .. } = s.next(t0, &VIEW) else {
            panic!("the next commit is leased");
        };
        assert_eq!(after, 1);
        s.leased(
            vec![block(2, "a", 1 << 10), block(3, "b", 1 << 10)],
            2,
            &VIEW,
            t0,
            1_010,
        );
        assert!(limit > 2);
        let Action::Lease { after, .. } = s.next(t0, &VIEW) else {
            panic!("a full lease is followed by another");
        };
        assert_eq!(after, 3);
        s.leased(Vec::new(), limit, &VIEW, t0, 1_010);
        assert!(matches!(s.next(t0, &VIEW), Action::Wait { .. }));
    }

    /// A slow stream's commits need not come evenly (a read that fills the commit target at
    /// once commits at the interval, the next group gathers until a pause): one short gap
    /// among long ones is not a burst, so the long gap after it is not quiet and the frame
    /// fills for its linger. Judged by the last gap alone it would have gone 240 ms after it.
    #[test]
    fn one_short_gap_between_a_slow_streams_commits_is_not_a_burst() {
        let ms = Duration::from_millis;
        let (mut s, t0) = (lingering_a_second(), Instant::now());
        s.new_records(1, t0);
        s.new_records(1, t0 + ms(300));
        s.new_records(1, t0 + ms(360));
        let mut blocks = Some(vec![block(1, "a", 70 << 10)]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 500, t0 + ms(360), 1_360)),
            Some(t0 + ms(1_000)),
            "the cadence is 225 ms: quiet only 900 ms after the last commit, past the linger"
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 500, t0 + ms(1_000), 2_000) else {
            panic!("after its linger");
        };
        assert_eq!(call.entries[0].block_ids(), vec![1]);
    }

    /// When a slow stream's frame is due, its lease asks the spool to commit what it gathers
    /// first, even with everything committed leased, so the frame takes every record read
    /// by then; frames of other shards due within an eighth of the linger after it go without
    /// another; a busy stream's frames never ask.
    #[test]
    fn a_slow_streams_due_frame_is_leased_after_a_commit() {
        let ms = Duration::from_millis;
        let (mut s, t0) = (lingering_a_second(), Instant::now());
        let created = |id, key, at_ms| BlockMeta {
            created_ms: at_ms,
            ..block(id, key, 1_000)
        };
        s.set_slow(true);
        s.new_records(1, t0);
        let mut blocks = Some(vec![created(1, "a", 1_000), created(2, "b", 1_050)]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 500, t0 + ms(200), 1_200)),
            Some(t0 + ms(1_000))
        );
        // "a" is due: a lease after a commit, which brings a block of it.
        let Action::Lease {
            limit,
            commit_before,
            ..
        } = s.next(t0 + ms(1_000), &VIEW)
        else {
            panic!("a due frame is leased for");
        };
        assert_eq!(
            commit_before,
            Some(t0 + ms(1_000)),
            "what gathered since then"
        );
        s.leased(
            vec![created(4, "a", 1_900)],
            limit,
            &VIEW,
            t0 + ms(1_000),
            2_000,
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 500, t0 + ms(1_000), 2_000) else {
            panic!("the due frame goes");
        };
        let sent: Vec<i64> = call.entries.iter().flat_map(|e| e.block_ids()).collect();
        assert_eq!(sent, vec![1, 4]);
        let entries = call.entries.len();
        s.answered(call, Ok(accepted(entries)), ms(5), t0 + ms(1_000), 2_000);
        // "b", 50 ms later: no second commit.
        let mut untouched = Some(Vec::new());
        let Action::Send(call) = until_send(&mut s, &mut untouched, 500, t0 + ms(1_050), 2_050)
        else {
            panic!("the next due frame goes");
        };
        assert!(
            untouched.is_some(),
            "no lease within an eighth of the linger"
        );
        assert_eq!(call.entries[0].block_ids(), vec![2]);
        s.answered(call, Ok(accepted(1)), ms(5), t0 + ms(1_050), 2_050);
        // Another of "b", due 200 ms after the commit: another.
        s.new_records(1, t0 + ms(1_100));
        let mut blocks = Some(vec![created(5, "b", 1_200)]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 500, t0 + ms(1_100), 2_100)),
            Some(t0 + ms(1_200))
        );
        assert!(matches!(
            s.next(t0 + ms(1_200), &VIEW),
            Action::Lease {
                commit_before: Some(_),
                ..
            }
        ));
        // A busy stream's due frame goes with what was leased.
        let mut s = lingering_a_second();
        s.new_records(1, t0);
        let mut blocks = Some(vec![created(1, "a", 1_000)]);
        until_send(&mut s, &mut blocks, 500, t0, 1_000);
        let mut untouched = Some(Vec::new());
        let Action::Send(call) = until_send(&mut s, &mut untouched, 500, t0 + ms(1_000), 2_000)
        else {
            panic!("the due frame goes");
        };
        assert!(
            untouched.is_some(),
            "a busy stream's frame is not leased for"
        );
        assert_eq!(call.entries[0].block_ids(), vec![1]);
    }

    /// With no linger a slow stream's frame is due as soon as it is planned: its lease asks
    /// for a commit once and the frame goes, rather than a lease after a lease while it stays
    /// due.
    #[test]
    fn a_frame_due_when_planned_is_leased_for_once() {
        let mut settings = settings(None);
        settings.linger = Duration::ZERO;
        let (mut s, t0) = (ShipState::new(settings, Arc::default()), Instant::now());
        s.set_slow(true);
        s.new_records(1, t0);
        let Action::Lease {
            limit,
            commit_before: None,
            ..
        } = s.next(t0, &VIEW)
        else {
            panic!("the commit is leased");
        };
        s.leased(vec![block(1, "a", 1_000)], limit, &VIEW, t0, 1_000);
        let Action::Lease {
            limit,
            commit_before: Some(_),
            ..
        } = s.next(t0, &VIEW)
        else {
            panic!("the due frame is leased for");
        };
        s.leased(Vec::new(), limit, &VIEW, t0, 1_000);
        let mut untouched = Some(Vec::new());
        let Action::Send(call) = until_send(&mut s, &mut untouched, 500, t0, 1_000) else {
            panic!("the frame goes");
        };
        assert!(untouched.is_some(), "leased for once");
        assert_eq!(call.entries[0].block_ids(), vec![1]);
    }

    /// A slow stream's commits wait to be leased while its frame lingers: no lease (a round
    /// trip to the spool's thread) per commit, one when the frame is due, which still takes
    /// every block committed by then; and one when the intake would count as quiet, so a
    /// large frame goes then as if each commit had been leased. A busy stream's commits, and
    /// the first after a frame went, are leased at once.
    #[test]
    fn a_slow_streams_commits_wait_to_be_leased_until_its_frame_is_due_or_the_intake_quiet() {
        let ms = Duration::from_millis;
        let (mut s, t0) = (lingering_a_second(), Instant::now());
        let created = |id, at_ms, raw| BlockMeta {
            created_ms: at_ms,
            ..block(id, "a", raw)
        };
        s.set_slow(true);
        // The first commit: nothing lingers, so it is leased; its frame is due in a second.
        s.new_records(1, t0);
        let mut blocks = Some(vec![created(1, 1_000, 1_000)]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 500, t0, 1_000)),
            Some(t0 + ms(1_000))
        );
        // Commits every 300 ms: none leased (`next` would lease before anything else).
        for at in [300, 600, 900] {
            s.new_records(1, t0 + ms(at));
            assert_eq!(
                waits_until(s.next(t0 + ms(at), &VIEW)),
                Some(t0 + ms(1_000)),
                "at {at} ms"
            );
            assert_eq!(s.leases_wait_until(t0 + ms(at)), Some(t0 + ms(1_000)));
        }
        s.set_slow(false);
        assert!(
            matches!(s.next(t0 + ms(900), &VIEW), Action::Lease { .. }),
            "a busy stream's commits are leased at once"
        );
        s.set_slow(true);
        // Due: one lease takes the three commits' blocks into the frame, which goes.
        let mut blocks = Some(vec![
            created(2, 1_300, 1_000),
            created(3, 1_600, 1_000),
            created(4, 1_900, 1_000),
        ]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0 + ms(1_000), 2_000) else {
            panic!("the frame goes when due");
        };
        assert_eq!(call.entries[0].block_ids(), vec![1, 2, 3, 4]);
        s.answered(call, Ok(accepted(1)), ms(5), t0 + ms(1_000), 2_000);
        // The next commit opens a frame of 70 KiB: leased at once.
        s.new_records(1, t0 + ms(1_200));
        let mut blocks = Some(vec![created(5, 2_200, 70 << 10)]);
        assert!(matches!(
            s.next(t0 + ms(1_200), &VIEW),
            Action::Lease { .. }
        ));
        until_send(&mut s, &mut blocks, 500, t0 + ms(1_200), 2_200);
        // Two more 50 ms apart: the cadence falls from 300 ms by a quarter a commit (to
        // 168.75 ms), so the intake would be quiet 675 ms after the last one, before the
        // frame is due (2,200 ms): its commits are leased then, and it goes.
        s.new_records(1, t0 + ms(1_250));
        s.new_records(1, t0 + ms(1_300));
        let quiet = t0 + ms(1_300) + Duration::from_micros(168_750) * 4;
        assert_eq!(waits_until(s.next(t0 + ms(1_300), &VIEW)), Some(quiet));
        let mut blocks = Some(vec![created(6, 2_250, 1_000), created(7, 2_300, 1_000)]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, quiet, 2_975) else {
            panic!("the large frame goes when the intake is quiet");
        };
        assert_eq!(call.entries[0].block_ids(), vec![5, 6, 7]);
    }

    /// A linger of 1 s, a `max_linger` of 60 s, units of 25,000 bytes.
    fn waiting_on() -> Settings {
        let mut settings = settings(None);
        settings.frame_bytes = 1 << 20;
        settings.linger = Duration::from_secs(1);
        settings.max_linger = Duration::from_secs(60);
        settings.billing_unit = Some(25_000);
        settings
    }

    /// With a `max_linger` and a destination billed in units, a slow stream's frame that
    /// holds less than one unit when its linger is up waits on: its commits are leased as
    /// they come, and the lease that fills it commits what the spool gathers first, then it
    /// goes. Its encoding teaches the route's fill (records encoding to a tenth of their raw
    /// size fill a unit at ten times its bytes), and once the intake is quiet a frame past
    /// its linger goes however little it holds.
    #[test]
    fn a_slow_streams_frame_under_a_billing_unit_waits_on_until_it_fills() {
        let ms = Duration::from_millis;
        let settings = waiting_on();
        let (mut s, t0) = (ShipState::new(settings, Arc::default()), Instant::now());
        // Stored as large as raw (see the next test for the spool's ratio).
        let created = |id, at_ms, raw| BlockMeta {
            created_ms: at_ms,
            stored_bytes: raw,
            ..block(id, "a", raw)
        };
        s.set_slow(true);
        s.new_records(1, t0);
        // Before any frame of the route is encoded its records count by what the spool
        // stored them in, as large as raw here: it fills at 15/16 of 25,000 bytes.
        let mut blocks = Some(vec![created(1, 1_000, 10_000)]);
        assert_eq!(
            waits_until(until_send(&mut s, &mut blocks, 1_000, t0, 1_000)),
            Some(t0 + ms(60_000))
        );
        // A commit within the linger waits for it to be leased.
        s.new_records(1, t0 + ms(300));
        assert_eq!(
            waits_until(s.next(t0 + ms(300), &VIEW)),
            Some(t0 + ms(1_000))
        );
        // Its linger is up, the frame under a unit: leased, and it waits on, until the intake
        // would be quiet (four commit gaps after the last commit) at the latest.
        let mut blocks = Some(vec![created(2, 1_300, 10_000)]);
        assert_eq!(
            waits_until(until_send(
                &mut s,
                &mut blocks,
                1_000,
                t0 + ms(1_000),
                2_000
            )),
            Some(t0 + ms(300 + 4 * 300))
        );
        // The next commit fills it (24,000 of the 25,000 bytes of a unit): that lease commits
        // what the spool gathers, and it goes.
        s.new_records(1, t0 + ms(1_200));
        let Action::Lease { commit_before, .. } = s.next(t0 + ms(1_200), &VIEW) else {
            panic!("a commit after the linger is leased at once");
        };
        assert_eq!(commit_before, None);
        s.leased(
            vec![created(3, 2_200, 4_000)],
            LEASE_BLOCKS,
            &VIEW,
            t0 + ms(1_200),
            2_200,
        );
        let Action::Lease { commit_before, .. } = s.next(t0 + ms(1_200), &VIEW) else {
            panic!("the filled frame first takes what the spool gathers");
        };
        assert_eq!(commit_before, Some(t0 + ms(1_000)));
        s.leased(
            vec![created(4, 2_250, 1_000)],
            LEASE_BLOCKS,
            &VIEW,
            t0 + ms(1_250),
            2_250,
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 1_000, t0 + ms(1_250), 2_250) else {
            panic!("the filled frame goes");
        };
        assert_eq!(call.entries[0].block_ids(), vec![1, 2, 3, 4]);
        s.answered(call, Ok(accepted(1)), ms(5), t0 + ms(1_250), 2_250);
        // Encoded at about a tenth of raw: the route now fills at about ten times the bytes,
        // so 40,000 raw bytes wait on past their linger.
        s.set_slow(false);
        for (i, at) in [1_500u64, 1_800, 2_100, 2_400].into_iter().enumerate() {
            s.new_records(1, t0 + ms(at));
            let mut blocks = Some(vec![created(5 + i as i64, 1_000 + at, 10_000)]);
            assert!(matches!(
                until_send(&mut s, &mut blocks, 1_000, t0 + ms(at), 1_000 + at),
                Action::Wait { .. }
            ));
        }
        assert!(matches!(
            until_send(&mut s, &mut None, 1_000, t0 + ms(2_600), 3_600),
            Action::Wait { .. }
        ));
        // No commit for four gaps after the last: quiet, and the lingering frame goes.
        let quiet = t0 + ms(2_400 + 4 * 300);
        assert_eq!(
            waits_until(until_send(&mut s, &mut None, 1_000, t0 + ms(2_600), 3_600)),
            Some(quiet)
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 1_000, quiet, 4_600) else {
            panic!("a frame past its linger goes once the intake is quiet");
        };
        assert_eq!(call.entries[0].block_ids(), vec![5, 6, 7, 8]);
    }

    /// Before a route's first frame, a billing unit's raw bytes are estimated by the spool's
    /// ratio of stored to raw bytes (a quarter here, as `block` stores them), for the
    /// compressed format: a frame of 30,000 raw bytes is under the fill (15/16 of 100,000)
    /// and waits on past its linger; in the KPL format, not compressed, it is over it (15/16
    /// of 25,000) and goes at its linger. A frame of at least half a unit then shows the
    /// route's own ratio, which replaces the estimate; a smaller one does not.
    #[test]
    fn a_routes_first_frame_is_planned_by_the_spools_ratio() {
        let ms = Duration::from_millis;
        for (format, waits) in [(FrameFormat::Edgeship, 60_000), (FrameFormat::Kpl, 1_000)] {
            let mut settings = waiting_on();
            settings.route_formats = Arc::from(vec![("r".to_string(), format)]);
            let (mut s, t0) = (ShipState::new(settings, Arc::default()), Instant::now());
            s.set_slow(true);
            s.new_records(1, t0);
            let mut blocks = Some(vec![block(1, "a", 30_000)]);
            assert_eq!(
                waits_until(until_send(&mut s, &mut blocks, 1_000, t0, 1_000)),
                Some(t0 + ms(waits)),
                "{format:?}"
            );
        }
        // A frame of less than half a unit by the spool's ratio (here closed at a small
        // target) leaves the estimate: 2,000 raw bytes that encoded to 1,000 do not make a
        // unit 50,000 raw bytes.
        let mut small = settings(None);
        small.frame_bytes = 2_000;
        small.billing_unit = Some(25_000);
        let mut s = ShipState::new(small, Arc::default());
        let mut blocks = Some(vec![block(1, "a", 2_000)]);
        let Action::Send(_) = until_send(&mut s, &mut blocks, 1_000, Instant::now(), 1_000) else {
            panic!("a frame at its target goes at once");
        };
        assert_eq!(s.batcher.unit("r"), 100_000);
        assert_eq!(
            s.unit_by,
            vec![(
                "r".to_string(),
                UnitBy::Spool {
                    raw: 2_000,
                    stored: 500
                }
            )]
        );
        // Encoded, a frame of at least half a unit shows its own ratio, which counts from then
        // on, not the spool's: 100,000 raw bytes encoded to 250, so a unit is about
        // 10,000,000 raw.
        let settings = waiting_on();
        let (mut s, t0) = (ShipState::new(settings, Arc::default()), Instant::now());
        // Over the fill by the spool's ratio (93,750): it goes at its linger.
        let mut blocks = Some(vec![block(1, "a", 100_000)]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 250, t0 + ms(1_000), 2_000) else {
            panic!("a frame over the fill goes at its linger");
        };
        s.answered(call, Ok(accepted(1)), ms(5), t0 + ms(1_000), 2_000);
        assert_eq!(s.unit_by, vec![("r".to_string(), UnitBy::Frames)]);
        s.set_slow(true);
        s.new_records(1, t0 + ms(1_000));
        let mut blocks = Some(vec![BlockMeta {
            created_ms: 2_000,
            ..block(2, "a", 400_000)
        }]);
        assert!(matches!(
            until_send(&mut s, &mut blocks, 250, t0 + ms(1_000), 2_000),
            Action::Wait { .. }
        ));
        // Its linger up, the intake not quiet: 400,000 raw bytes are under the route's fill
        // and wait on (by the spool's ratio they were over it: 15/16 of 100,000).
        s.new_records(1, t0 + ms(1_900));
        assert!(matches!(
            until_send(&mut s, &mut None, 250, t0 + ms(2_000), 3_000),
            Action::Wait { .. }
        ));
    }

    /// Blocks of different keys bound for one shard share a frame; a frame planned by key
    /// (its shard not known then) closes before any frame is planned by shard, so it goes
    /// first and each key keeps its order.
    #[test]
    fn keys_of_one_shard_share_frames_and_frames_planned_by_key_go_first() {
        let mut s = state(None);
        let t0 = Instant::now();
        // "u1" has no shard yet: planned by its key; then keys of shards A and B.
        let mut blocks = Some(vec![
            block(1, "u1", 100),
            block(2, "a1", 100),
            block(3, "a2", 100),
            block(4, "b1", 100),
        ]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!("the frame planned by key is closed and sent");
        };
        assert_eq!(call.entries.len(), 1);
        assert_eq!(call.entries[0].block_ids(), vec![1]);
        s.answered(call, Ok(accepted(1)), Duration::from_millis(5), t0, 1_000);
        let later = t0 + Duration::from_millis(100);
        let Action::Send(call) = until_send(&mut s, &mut None, 500, later, 1_100) else {
            panic!("the shards' frames go after their linger");
        };
        let mut frames: Vec<Vec<i64>> = call.entries.iter().map(|p| p.block_ids()).collect();
        frames.sort();
        assert_eq!(frames, vec![vec![2, 3], vec![4]], "one frame per shard");
    }

    #[test]
    fn a_partial_failure_resends_only_the_failed_entry_first() {
        let mut s = state(None);
        let t0 = Instant::now();
        let mut blocks = Some(vec![block(1, "a", 20_000), block(2, "b", 20_000)]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!()
        };
        assert_eq!(call.entries.len(), 2);
        let outcomes = vec![
            Outcome::Accepted {
                shard: Some(Arc::from("A")),
            },
            Outcome::Failed {
                failure: Failure::new(FailureKind::Transient, "InternalFailure", "try again"),
                shard: Some(Arc::from("B")),
            },
        ];
        let delivered = s.answered(call, Ok(outcomes), Duration::from_millis(5), t0, 1_000);
        assert_eq!(
            delivered,
            vec![1],
            "only the accepted entry's block is delivered"
        );
        assert_eq!(s.stats.entries_failed.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.errors()["InternalFailure"], 1);
        // Shard B backs off alone (about 100 ms); then its entry is the one resent.
        let later = t0 + Duration::from_millis(150);
        let Action::Send(again) = until_send(&mut s, &mut None, 500, later, 1_150) else {
            panic!()
        };
        assert_eq!(again.entries.len(), 1);
        assert_eq!(again.entries[0].block_ids(), vec![2]);
        assert_eq!(again.entries[0].attempts, 1);
        s.answered(
            again,
            Ok(accepted(1)),
            Duration::from_millis(5),
            later,
            1_150,
        );
        assert_eq!(s.stats.entries_retried.load(Ordering::Relaxed), 1);
        assert!(!s.stats.failing.load(Ordering::Relaxed));
    }

    #[test]
    fn a_throttled_shard_waits_while_the_other_goes_on() {
        let mut s = state(Some(ShardLimits {
            records_per_sec: 1000.0,
            bytes_per_sec: 1_000_000.0,
        }));
        let t0 = Instant::now();
        let mut blocks = Some(vec![block(1, "a", 20_000), block(2, "b", 20_000)]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!()
        };
        let throttled = Outcome::Failed {
            failure: Failure::new(
                FailureKind::Throttled,
                "ProvisionedThroughputExceededException",
                "slow down",
            ),
            shard: Some(Arc::from("A")),
        };
        s.answered(
            call,
            Ok(vec![
                throttled,
                Outcome::Accepted {
                    shard: Some(Arc::from("B")),
                },
            ]),
            Duration::from_millis(5),
            t0,
            1_000,
        );
        assert_eq!(s.stats.entries_throttled.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.shards()[&Arc::from("A")].entries_throttled, 1);
        // Shard A's frame waits for its backoff: the state waits, paced, not busy.
        let Action::Wait { until: Some(at) } = until_send(&mut s, &mut None, 500, t0, 1_000) else {
            panic!("shard A is held")
        };
        assert!(matches!(s.hold(), Hold::Paced(_)));
        assert!(at > t0 && at <= t0 + Duration::from_millis(101));
        // A new frame for shard B goes at once, passing shard A's.
        s.new_records(1, t0);
        let mut more = Some(vec![block(3, "b", 20_000)]);
        let Action::Send(call) = until_send(&mut s, &mut more, 500, t0, 1_000) else {
            panic!("shard B is not held back by shard A")
        };
        assert_eq!(call.entries.len(), 1);
        assert_eq!(call.entries[0].block_ids(), vec![3]);
    }

    #[test]
    fn pacing_holds_a_shard_to_its_write_limit() {
        let mut s = state(Some(ShardLimits {
            records_per_sec: 2.0,
            bytes_per_sec: 1_000_000.0,
        }));
        let t0 = Instant::now();
        let mut blocks = Some((1..=3).map(|i| block(i, "a", 20_000)).collect());
        // One frame per block (each fills a frame): two records a second go, the third waits.
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!()
        };
        assert_eq!(call.entries.len(), 2);
        s.answered(call, Ok(accepted(2)), Duration::from_millis(5), t0, 1_000);
        let Action::Wait { until: Some(at) } = until_send(&mut s, &mut None, 500, t0, 1_000) else {
            panic!("the third waits for the shard's allowance")
        };
        let wait = at - t0;
        assert!(
            wait >= Duration::from_millis(450) && wait <= Duration::from_millis(501),
            "{wait:?}"
        );
        let Action::Send(call) = until_send(&mut s, &mut None, 500, at, 1_500) else {
            panic!()
        };
        assert_eq!(call.entries[0].block_ids(), vec![3]);
    }

    #[test]
    fn a_failed_call_backs_the_destination_off_and_keeps_the_order() {
        let mut s = state(None);
        let t0 = Instant::now();
        let mut blocks = Some(vec![block(1, "a", 20_000), block(2, "b", 20_000)]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!()
        };
        let e = SinkError {
            destination: "d".into(),
            failure: Failure::new(
                FailureKind::Transient,
                "Connect",
                "cannot connect to x: refused",
            ),
        };
        assert!(s
            .answered(call, Err(e), Duration::from_millis(5), t0, 1_000)
            .is_empty());
        assert_eq!(s.stats.call_failures.load(Ordering::Relaxed), 1);
        assert_eq!(
            s.stats.last_error().as_deref(),
            Some("cannot connect to x: refused")
        );
        let Hold::Backoff(until) = s.hold() else {
            panic!("{:?}", s.hold())
        };
        assert!(
            until >= t0 + Duration::from_millis(100) && until <= t0 + Duration::from_millis(200)
        );
        assert!(matches!(
            until_send(&mut s, &mut None, 500, t0, 1_000),
            Action::Wait { until: Some(t) } if t == until
        ));
        let Action::Send(call) = until_send(&mut s, &mut None, 500, until, 1_200) else {
            panic!()
        };
        let ids: Vec<i64> = call.entries.iter().flat_map(|p| p.block_ids()).collect();
        assert_eq!(ids, vec![1, 2], "resent in their order");
    }

    #[test]
    fn a_record_refused_as_too_large_is_encoded_again_under_the_named_limit() {
        let mut s = state(None);
        let t0 = Instant::now();
        let mut blocks = Some(vec![
            block(1, "a", 4_000),
            block(2, "a", 4_000),
            block(3, "a", 4_000),
        ]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 700_000, t0, 1_000) else {
            panic!()
        };
        assert_eq!(call.entries[0].block_ids(), vec![1, 2]);
        let refused = Outcome::Failed {
            failure: Failure::new(
                FailureKind::TooLarge { limit: 500_000 },
                "InvalidArgumentException",
                "over 500000",
            ),
            shard: None,
        };
        s.answered(call, Ok(vec![refused]), Duration::from_millis(5), t0, 1_000);
        assert_eq!(
            s.stats.learned_record_limit.load(Ordering::Relaxed),
            500_000
        );
        // Its blocks come back as a job under the named limit, to go first.
        match s.next(t0, &VIEW) {
            Action::Encode(job) => {
                assert_eq!(job.block_ids(), vec![1, 2]);
                assert_eq!(job.limit, 500_000);
                assert!(job.front);
                assert_eq!(job.attempts, 1);
            }
            other => panic!("{other:?}"),
        }
        // Later frames are built under it too.
        assert_eq!(s.record_limit(&VIEW), 500_000);
    }

    #[test]
    fn calls_shrink_to_the_measured_uplink() {
        let mut s = state(None);
        let t0 = Instant::now();
        // 20 frames of 100 KB: the first call takes at most 256 KiB.
        let mut blocks = Some(
            (1..=20)
                .map(|i| block(i, &format!("k{i}"), 20_000))
                .collect(),
        );
        let Action::Send(call) = until_send(&mut s, &mut blocks, 100_000, t0, 1_000) else {
            panic!()
        };
        assert_eq!(call.entries.len(), 2, "256 KiB holds two frames of 100 KB");
        // It took 20 s: a 10 KB/s link. The next call is what 5 s carry, at least 64 KiB.
        s.answered(call, Ok(accepted(2)), Duration::from_secs(20), t0, 1_000);
        let Action::Send(call) = until_send(&mut s, &mut None, 100_000, t0, 1_000) else {
            panic!()
        };
        assert_eq!(call.entries.len(), 1);
        assert!(call.timeout > Duration::from_secs(40), "{:?}", call.timeout);
    }

    #[test]
    fn stopping_gives_back_every_block_held() {
        let mut s = state(None);
        let t0 = Instant::now();
        let mut blocks = Some(vec![block(1, "a", 20_000), block(2, "b", 100)]);
        let Action::Send(call) = until_send(&mut s, &mut blocks, 500, t0, 1_000) else {
            panic!()
        };
        // The call failed; block 2 is still planned (lingering).
        let e = SinkError {
            destination: "d".into(),
            failure: Failure::new(FailureKind::TimedOut, "Timeout", "no answer"),
        };
        s.answered(call, Err(e), Duration::from_secs(10), t0, 1_000);
        let mut ids = s.give_back();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }
}
