//! Batching: which spooled blocks travel together in one frame.
//!
//! Pure bookkeeping over block metadata: no data, no I/O, no clock of its own (callers pass
//! the time), so every limit is unit-tested. A frame holds whole blocks of one (route, group):
//! the group is the shard the blocks go to when the caller knows it (blocks of many keys, and
//! of buckets, share frames; one open frame per shard keeps each key's order), else the
//! block's own key. It closes when the next block would pass the raw-size target or when its
//! oldest record has waited `linger`, unless it holds less than its route's fill (15/16 of
//! the raw bytes that encode to one billing unit of the destination, a Kinesis PUT payload
//! unit, as far as the route's frames have shown): then it waits on for more, until it fills
//! or its oldest record has waited `max_linger` (which is `linger` unless configured longer,
//! so by default no frame waits on); a block that would take such a frame past one unit
//! starts the next frame instead, so a frame that waited on costs one unit. A record's
//! age is read from the wall clock once, when its block is planned; from then on lingering
//! runs on the monotonic clock, so a clock step (NTP, a gateway that learns the date late)
//! never holds a frame back by more than `max_linger`.
//! Which frames make a call is the shipper's state's business (`ship::state`).

use crate::frame::encoder::PLANNED_FILL;
use crate::spool::BlockMeta;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Blocks planned into one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePlan {
    pub(crate) route: String,
    /// What its blocks share: their shard, or their key.
    pub(crate) group: String,
    /// Its first block's key: every block of the frame goes where this key places it.
    pub(crate) key: String,
    pub(crate) blocks: Vec<BlockMeta>,
    pub(crate) raw_bytes: u64,
    pub(crate) records: u64,
    /// When the frame's oldest record has waited `linger`.
    pub(crate) due: Instant,
    /// When it has waited `max_linger`: a frame under its route's fill closes then.
    deadline: Instant,
}

/// When a frame's oldest record has waited `linger` and `max_linger`.
#[derive(Debug, Clone, Copy)]
struct Times {
    due: Instant,
    deadline: Instant,
}

impl FramePlan {
    fn new(block: BlockMeta, group: String, at: Times) -> FramePlan {
        FramePlan {
            route: block.route.clone(),
            group,
            key: block.key.clone(),
            raw_bytes: u64::from(block.raw_bytes),
            records: u64::from(block.records),
            due: at.due,
            deadline: at.deadline,
            blocks: vec![block],
        }
    }

    fn add(&mut self, block: BlockMeta, at: Times) {
        self.raw_bytes += u64::from(block.raw_bytes);
        self.records += u64::from(block.records);
        self.due = self.due.min(at.due);
        self.deadline = self.deadline.min(at.deadline);
        self.blocks.push(block);
    }

    fn times(&self) -> Times {
        Times {
            due: self.due,
            deadline: self.deadline,
        }
    }

    /// When it closes unless it fills its raw-size target first: at `due` once it holds
    /// `fill` raw bytes, else at `deadline`.
    fn closes_at(&self, fill: u64) -> Instant {
        if self.raw_bytes >= fill {
            self.due
        } else {
            self.deadline
        }
    }

    #[cfg(test)]
    fn block_ids(&self) -> Vec<i64> {
        self.blocks.iter().map(|b| b.id).collect()
    }
}

/// `blocks` (of one route and group, in order) planned as frames of at most `target` raw
/// bytes each (a block larger than that on its own is a frame of one), all closing at `at`.
fn plan_runs(blocks: Vec<BlockMeta>, group: &str, at: Times, target: u64) -> Vec<FramePlan> {
    let mut runs: Vec<FramePlan> = Vec::new();
    for block in blocks {
        match runs.last_mut() {
            Some(run) if run.raw_bytes + u64::from(block.raw_bytes) <= target => run.add(block, at),
            _ => runs.push(FramePlan::new(block, group.to_string(), at)),
        }
    }
    runs
}

/// A route's own value in a list of a few routes' (`None`: the default applies).
pub(super) fn of_route<T: Copy>(values: &[(String, T)], route: &str) -> Option<T> {
    values.iter().find(|(r, _)| r == route).map(|(_, v)| *v)
}

pub struct Batcher {
    target_raw_bytes: u64,
    /// Routes whose frames are planned smaller than `target_raw_bytes`: their records encode
    /// larger than raw (see [`Batcher::set_target`]).
    route_targets: Vec<(String, u64)>,
    linger: Duration,
    /// How long a frame under its route's fill may wait in all (at least `linger`).
    max_linger: Duration,
    /// Raw bytes that encode to one billing unit, for routes without their own (see
    /// [`Batcher::set_unit`]); 0: no frame waits on.
    unit_raw_bytes: u64,
    route_units: Vec<(String, u64)>,
    /// Frames still filling; one per (route, key) seen recently. Few: routes x keys in flight.
    open: Vec<FramePlan>,
    ready: VecDeque<FramePlan>,
}

impl Batcher {
    pub fn new(target_raw_bytes: u64, linger: Duration) -> Batcher {
        Batcher {
            target_raw_bytes,
            route_targets: Vec::new(),
            linger,
            max_linger: linger,
            unit_raw_bytes: 0,
            route_units: Vec::new(),
            open: Vec::new(),
            ready: VecDeque::new(),
        }
    }

    /// Lets a frame that holds less than its fill when its linger is up wait on for more,
    /// until its oldest record has waited `max_linger` (no longer than `linger` is taken as
    /// `linger`: no frame waits on). `unit_raw_bytes`: the raw bytes that encode to one
    /// billing unit, until a route's own are set.
    pub(crate) fn lingering(mut self, max_linger: Duration, unit_raw_bytes: u64) -> Batcher {
        self.max_linger = max_linger.max(self.linger);
        self.unit_raw_bytes = unit_raw_bytes;
        self
    }

    /// The raw bytes that encode to one billing unit on a route.
    pub(super) fn unit(&self, route: &str) -> u64 {
        of_route(&self.route_units, route).unwrap_or(self.unit_raw_bytes)
    }

    /// What a route's frame holds at least to go at its linger: [`PLANNED_FILL`] of a unit
    /// (encodings vary a little with the records they hold).
    fn fill(&self, route: &str) -> u64 {
        (self.unit(route) as f64 * PLANNED_FILL) as u64
    }

    /// A frame waiting on past its linger for more records, at `now` (never without a
    /// `max_linger` longer than the linger: a frame then takes what is leased with it).
    fn waits_on(&self, frame: &FramePlan, now: Instant) -> bool {
        self.max_linger > self.linger
            && frame.due <= now
            && frame.raw_bytes < self.fill(&frame.route)
    }

    /// A route's records encode to one billing unit at `raw_bytes` from now on (by the
    /// encoded size per raw byte its frames have shown).
    pub(crate) fn set_unit(&mut self, route: &str, raw_bytes: u64) {
        match self.route_units.iter_mut().find(|(r, _)| r == route) {
            Some((_, u)) => *u = raw_bytes,
            None => self.route_units.push((route.to_string(), raw_bytes)),
        }
    }

    /// The raw-size target of a route's frames.
    fn target(&self, route: &str) -> u64 {
        of_route(&self.route_targets, route).unwrap_or(self.target_raw_bytes)
    }

    /// Plans `route`'s frames at `target` raw bytes, or at the batcher's own target if that
    /// is smaller, from now on; if a frame of it already planned is larger, the blocks planned
    /// for it are planned again at that target, group by group in their order (a key's
    /// records keep theirs). For a route whose
    /// records encode larger than raw (KPL, JSON lines, incompressible payloads in frames),
    /// a frame planned at the shard's rate would not fit one record: it would be encoded
    /// whole, found too large and encoded again in parts.
    pub(crate) fn set_target(&mut self, route: &str, target: u64) {
        let target = target.min(self.target_raw_bytes).max(1);
        match self.route_targets.iter_mut().find(|(r, _)| r == route) {
            Some((_, t)) if *t == target => return,
            Some((_, t)) => *t = target,
            None => self.route_targets.push((route.to_string(), target)),
        }
        if !self
            .open
            .iter()
            .chain(&self.ready)
            .any(|f| f.route == route && f.raw_bytes > target)
        {
            return;
        }
        // Each group's planned blocks, ready frames' first (they are older), then its open
        // frame's, planned again at the target where the group's first ready frame was.
        let mut groups: Vec<(String, Vec<BlockMeta>, Times, bool)> = Vec::new();
        let mut gather =
            |f: FramePlan, open: bool| match groups.iter_mut().find(|(g, ..)| *g == f.group) {
                Some((_, blocks, at, was_open)) => {
                    at.due = at.due.min(f.due);
                    at.deadline = at.deadline.min(f.deadline);
                    blocks.extend(f.blocks);
                    *was_open |= open;
                }
                None => {
                    let at = f.times();
                    groups.push((f.group, f.blocks, at, open))
                }
            };
        let mut kept = VecDeque::with_capacity(self.ready.len());
        let mut order = Vec::new();
        for f in std::mem::take(&mut self.ready) {
            if f.route == route {
                if !order.contains(&f.group) {
                    order.push(f.group.clone());
                    kept.push_back(None);
                }
                gather(f, false);
            } else {
                kept.push_back(Some(f));
            }
        }
        let (open, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|f| f.route == route);
        self.open = others;
        for f in open {
            gather(f, true);
        }
        let mut planned: Vec<_> = groups
            .into_iter()
            .map(|(group, blocks, at, open)| {
                let mut runs = plan_runs(blocks, &group, at, target);
                // The last run of a group that had an open frame stays open unless full.
                let last = if open && runs.last().is_some_and(|r| r.raw_bytes < target) {
                    runs.pop()
                } else {
                    None
                };
                (group, runs, last)
            })
            .collect();
        for slot in kept {
            match slot {
                Some(f) => self.ready.push_back(f),
                None => {
                    let group = order.remove(0);
                    let i = planned
                        .iter()
                        .position(|(g, ..)| *g == group)
                        .expect("gathered");
                    let (_, runs, last) = planned.swap_remove(i);
                    self.ready.extend(runs);
                    self.open.extend(last);
                }
            }
        }
        // Groups with only an open frame.
        for (_, runs, last) in planned {
            self.ready.extend(runs);
            self.open.extend(last);
        }
    }

    /// Adds a block to the frame of its (route, key).
    pub fn push(&mut self, block: BlockMeta, now: Instant, now_ms: u64) {
        let group = block.key.clone();
        self.push_in(block, group, now, now_ms);
    }

    /// Adds a block to its (route, group) frame, closing that frame first if the block would
    /// push it past the target. `now` and `now_ms` are the same moment on the monotonic and
    /// the wall clock.
    pub fn push_in(&mut self, block: BlockMeta, group: String, now: Instant, now_ms: u64) {
        // A record from the future (the clock stepped back) counts as new.
        let age = Duration::from_millis(now_ms.saturating_sub(block.created_ms));
        let at = Times {
            due: now + self.linger.saturating_sub(age),
            deadline: now + self.max_linger.saturating_sub(age),
        };
        let target = self.target(&block.route);
        match self
            .open
            .iter()
            .position(|f| f.route == block.route && f.group == group)
        {
            Some(i)
                if self.open[i].raw_bytes + u64::from(block.raw_bytes) > target
                    || (self.waits_on(&self.open[i], now)
                        && self.open[i].raw_bytes + u64::from(block.raw_bytes)
                            > self.unit(&block.route)) =>
            {
                let full = self.open.swap_remove(i);
                self.ready.push_back(full);
                self.open.push(FramePlan::new(block, group, at));
            }
            Some(i) => self.open[i].add(block, at),
            None => self.open.push(FramePlan::new(block, group, at)),
        }
        if let Some(i) = self
            .open
            .iter()
            .position(|f| f.raw_bytes >= self.target(&f.route))
        {
            let full = self.open.swap_remove(i);
            self.ready.push_back(full);
        }
    }

    /// Closes frames whose oldest record has waited `linger`, those under their route's fill
    /// once it has waited `max_linger` (all of them when `flush`).
    pub fn close_due(&mut self, now: Instant, flush: bool) {
        self.close_where(|b, f| flush || f.closes_at(b.fill(&f.route)) <= now);
    }

    /// Closes frames whose oldest record has waited `linger`, filled or not: nothing more is
    /// coming soon to fill them.
    pub(crate) fn close_lingered(&mut self, now: Instant) {
        self.close_where(|_, f| f.due <= now);
    }

    fn close_where(&mut self, close: impl Fn(&Batcher, &FramePlan) -> bool) {
        let mut i = 0;
        while i < self.open.len() {
            if close(self, &self.open[i]) {
                let f = self.open.swap_remove(i);
                self.ready.push_back(f);
            } else {
                i += 1;
            }
        }
    }

    /// When the next open frame closes, if any (see [`Batcher::close_due`]).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.open
            .iter()
            .map(|f| f.closes_at(self.fill(&f.route)))
            .min()
    }

    /// When the next open frame's oldest record has waited `linger`, filled or not.
    pub(crate) fn next_linger(&self) -> Option<Instant> {
        self.open.iter().map(|f| f.due).min()
    }

    /// Whether an open frame holds at least `raw_bytes`.
    pub(crate) fn has_open_of(&self, raw_bytes: u64) -> bool {
        self.open.iter().any(|f| f.raw_bytes >= raw_bytes)
    }

    /// Closes the open frames that hold at least `raw_bytes`, before their linger.
    pub(crate) fn close_open_of(&mut self, raw_bytes: u64) {
        self.close_where(|_, f| f.raw_bytes >= raw_bytes);
    }

    pub fn take_ready(&mut self) -> Option<FramePlan> {
        self.ready.pop_front()
    }

    /// The oldest ready frame that `ok` accepts (for example: whose shard has room), leaving
    /// the others in their order. A frame never passes an older one of its (route, group)
    /// that `ok` refused, even if it is smaller: their keys' records would go out of order.
    pub(crate) fn take_ready_where(
        &mut self,
        mut ok: impl FnMut(&FramePlan) -> bool,
    ) -> Option<FramePlan> {
        let mut waiting: Vec<(&str, &str)> = Vec::new();
        let i = self.ready.iter().position(|f| {
            if waiting.contains(&(f.route.as_str(), f.group.as_str())) {
                return false;
            }
            let taken = ok(f);
            if !taken {
                waiting.push((&f.route, &f.group));
            }
            taken
        })?;
        self.ready.remove(i)
    }

    /// Raw bytes planned but not yet taken.
    #[cfg(test)]
    fn planned_raw_bytes(&self) -> u64 {
        self.planned_raw_bytes_where(|_| true)
    }

    /// Raw bytes planned but not yet taken, of frames `ok` accepts.
    pub(crate) fn planned_raw_bytes_where(&self, mut ok: impl FnMut(&FramePlan) -> bool) -> u64 {
        self.open
            .iter()
            .chain(self.ready.iter())
            .filter(|f| ok(f))
            .map(|f| f.raw_bytes)
            .sum()
    }

    /// Blocks planned but not yet taken: what the plans hold in memory is about 100 bytes
    /// each.
    pub(crate) fn planned_blocks(&self) -> usize {
        self.open
            .iter()
            .chain(self.ready.iter())
            .map(|f| f.blocks.len())
            .sum()
    }

    #[cfg(test)]
    fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Every block id still held, for giving leases back.
    pub(crate) fn drain_block_ids(&mut self) -> Vec<i64> {
        let ids = self
            .open
            .iter()
            .chain(self.ready.iter())
            .flat_map(|f| f.blocks.iter().map(|b| b.id))
            .collect();
        self.open.clear();
        self.ready.clear();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: i64, key: &str, raw: u32, created: u64) -> BlockMeta {
        BlockMeta {
            id,
            route: "r".into(),
            key: key.into(),
            version: crate::frame::VERSION_2,
            records: raw / 100,
            raw_bytes: raw,
            stored_bytes: raw / 10,
            created_ms: created,
        }
    }

    #[test]
    fn frames_close_at_the_size_target_per_key() {
        let t0 = Instant::now();
        let mut b = Batcher::new(1000, Duration::from_secs(1));
        b.push(block(1, "a", 400, 0), t0, 0);
        b.push(block(2, "b", 400, 0), t0, 0);
        b.push(block(3, "a", 400, 0), t0, 0);
        assert!(!b.has_ready());
        b.push(block(4, "a", 400, 0), t0, 0); // would make 1200 > 1000: frame [1,3] closes
        let f = b.take_ready().unwrap();
        assert_eq!(f.block_ids(), vec![1, 3]);
        assert_eq!(f.raw_bytes, 800);
        assert!(b.take_ready().is_none());
        b.push(block(5, "c", 1000, 0), t0, 0); // exactly the target: ready at once
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![5]);
    }

    #[test]
    fn frames_of_a_key_without_room_wait_while_others_pass() {
        let t0 = Instant::now();
        let mut b = Batcher::new(1000, Duration::from_secs(1));
        for (id, key) in [(1, "hot"), (2, "hot"), (3, "hot"), (4, "cold")] {
            b.push(block(id, key, 1000, 0), t0, 0);
        }
        assert_eq!(b.planned_blocks(), 4);
        assert_eq!(b.planned_raw_bytes_where(|f| f.key != "hot"), 1000);
        let f = b.take_ready_where(|f| f.key != "hot").unwrap();
        assert_eq!(f.block_ids(), vec![4]);
        assert!(b.take_ready_where(|f| f.key != "hot").is_none());
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![1], "order kept");
        assert_eq!(b.planned_blocks(), 2);
        // A smaller frame of the same key, closed later, that would have room does not pass
        // the older one that has none.
        b.push(block(5, "hot", 100, 0), t0, 0);
        b.close_due(t0, true);
        assert!(b.take_ready_where(|f| f.raw_bytes < 1000).is_none());
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![2]);
    }

    #[test]
    fn frames_close_after_linger() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(1_000_000, ms(500));
        // Records 200 ms and 0 ms old when planned (wall clock 1,200).
        b.push(block(1, "a", 100, 1_000), t0, 1_200);
        b.push(block(2, "b", 100, 1_200), t0, 1_200);
        assert_eq!(b.next_due(), Some(t0 + ms(300)));
        b.close_due(t0 + ms(299), false);
        assert!(!b.has_ready());
        b.close_due(t0 + ms(300), false);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![1]);
        assert!(b.take_ready().is_none());
        b.close_due(t0 + ms(300), true);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![2]);
        assert_eq!(b.planned_raw_bytes(), 0);
    }

    /// With a `max_linger`, a frame under its route's fill when its linger is up waits on:
    /// it closes once a block fills it (at once, its linger being up), or when its oldest
    /// record has waited `max_linger`, or, when the intake is quiet, as soon as its linger is
    /// up. A frame that filled within its linger goes at its linger as before.
    #[test]
    fn a_frame_under_its_fill_waits_on_until_it_fills_or_its_max_linger() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // A unit of 1,000 raw bytes: frames fill at 937.
        let mut b = Batcher::new(1_000_000, s(1)).lingering(s(60), 1_000);
        b.push(block(1, "a", 400, 1_000), t0, 1_000);
        assert_eq!(b.next_linger(), Some(t0 + s(1)));
        assert_eq!(b.next_due(), Some(t0 + s(60)), "under its fill");
        b.close_due(t0 + s(5), false);
        assert!(!b.has_ready());
        // Filled 10 s in: due since its linger, so it closes at once.
        b.push(block(2, "a", 550, 11_000), t0 + s(10), 11_000);
        assert_eq!(b.next_due(), Some(t0 + s(1)));
        b.close_due(t0 + s(10), false);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![1, 2]);
        // Never filled: it goes when its oldest record has waited a minute.
        b.push(block(3, "a", 100, 20_000), t0 + s(20), 20_000);
        b.push(block(4, "a", 100, 50_000), t0 + s(50), 50_000);
        b.close_due(t0 + s(79), false);
        assert!(!b.has_ready());
        b.close_due(t0 + s(80), false);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![3, 4]);
        // Filled within its linger: it goes at its linger, not sooner.
        b.push(block(5, "a", 1_500, 90_000), t0 + s(90), 90_000);
        assert_eq!(b.next_due(), Some(t0 + s(91)));
        // A route of its own unit (what encodes to one by its records' ratio).
        let mut other = block(6, "a", 1_500, 90_000);
        other.route = "s".into();
        b.set_unit("s", 2_000);
        b.push(other, t0 + s(90), 90_000);
        b.close_due(t0 + s(91), false);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![5]);
        assert!(b.take_ready().is_none(), "route s waits on");
        // Quiet: frames past their linger go, filled or not; younger ones stay.
        b.push(block(7, "a", 100, 95_000), t0 + s(95), 95_000);
        b.close_lingered(t0 + s(92));
        let f = b.take_ready().unwrap();
        assert_eq!((f.route.as_str(), f.block_ids()), ("s", vec![6]));
        assert!(b.take_ready().is_none());
        assert_eq!(b.next_linger(), Some(t0 + s(96)));
        b.close_due(t0 + s(96), true);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![7]);
    }

    /// A block that would take a frame waiting on past one unit starts the next frame: the
    /// frame that waited goes at once, at most a unit. Within its linger a frame takes what
    /// comes, up to its size target, as without a `max_linger`.
    #[test]
    fn a_frame_waiting_on_never_takes_a_block_past_one_unit() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Batcher::new(1_000_000, s(1)).lingering(s(60), 1_000);
        b.push(block(1, "a", 800, 0), t0, 0);
        b.push(block(2, "a", 300, 2_000), t0 + s(2), 2_000);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![1]);
        assert!(b.take_ready().is_none(), "block 2 starts the next frame");
        let half = Duration::from_millis(2_500);
        b.push(block(3, "a", 900, 2_500), t0 + half, 2_500);
        b.push(block(4, "a", 900, 2_500), t0 + half, 2_500);
        assert!(
            b.take_ready().is_none(),
            "within its linger it takes what comes"
        );
        b.close_due(t0 + s(3), false);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![2, 3, 4]);
    }

    /// Without a `max_linger` (or one no longer than `linger`), frames close at their linger
    /// however little they hold.
    #[test]
    fn without_a_max_linger_no_frame_waits_on() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for mut b in [
            Batcher::new(1_000_000, s(1)),
            Batcher::new(1_000_000, s(1)).lingering(s(1), 1_000),
            Batcher::new(1_000_000, s(2)).lingering(s(1), 1_000),
        ] {
            b.push(block(1, "a", 100, 0), t0, 0);
            let linger = b.next_linger();
            assert_eq!(b.next_due(), linger);
            // A block leased with a due frame joins it, even past a unit.
            b.push(block(2, "a", 2_000, 0), linger.unwrap(), 5_000);
            b.close_due(linger.unwrap(), false);
            assert_eq!(b.take_ready().unwrap().block_ids(), vec![1, 2]);
        }
    }

    #[test]
    fn a_clock_step_never_holds_a_frame_past_its_linger() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(1_000_000, ms(500));
        // The wall clock stepped back an hour: the record looks like it is from the future.
        b.push(block(1, "a", 100, 10_000_000), t0, 10_000_000 - 3_600_000);
        assert_eq!(b.next_due(), Some(t0 + ms(500)), "at most linger");
        // Stepped forward: an old record's frame is due at once.
        b.push(block(2, "b", 100, 1_000), t0, 1_000 + 3_600_000);
        b.close_due(t0, false);
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![2]);
    }

    #[test]
    fn a_smaller_route_target_cuts_planned_frames_in_order_and_plans_new_ones_at_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(1000, Duration::from_secs(1));
        // Route "r": a full frame [1,2,3,4] ready, [5,6,7] open; route "s" untouched.
        for id in 1..=7 {
            b.push(block(id, "a", 250, 0), t0, 0);
        }
        let mut other = block(8, "a", 250, 0);
        other.route = "s".into();
        b.push(other, t0, 0);
        b.set_target("r", 500);
        let mut taken = Vec::new();
        while let Some(f) = b.take_ready() {
            assert!(f.raw_bytes <= 500, "{:?}", f.block_ids());
            taken.push(f.block_ids());
        }
        // The ready frame in two runs; the open frame's first run ready, its last still open.
        assert_eq!(taken, vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
        b.close_due(t0, true);
        let mut rest: Vec<_> = std::iter::from_fn(|| b.take_ready())
            .map(|f| (f.route.clone(), f.block_ids()))
            .collect();
        rest.sort();
        assert_eq!(rest, vec![("r".into(), vec![7]), ("s".into(), vec![8])]);
        // New blocks of "r" close at 500; "s" keeps 1000.
        for id in 9..=11 {
            b.push(block(id, "a", 250, 0), t0, 0);
        }
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![9, 10]);
        for id in 12..=15 {
            let mut s = block(id, "a", 250, 0);
            s.route = "s".into();
            b.push(s, t0, 0);
        }
        assert_eq!(b.take_ready().unwrap().block_ids(), vec![12, 13, 14, 15]);
        // A block larger than the target on its own stays a frame of one.
        b.set_target("r", 100);
        b.push(block(16, "a", 250, 0), t0, 0);
        let cut: Vec<_> = std::iter::from_fn(|| b.take_ready())
            .map(|f| f.block_ids())
            .collect();
        assert_eq!(cut, vec![vec![11], vec![16]]);
    }
}
