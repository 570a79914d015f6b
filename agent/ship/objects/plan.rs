//! Which blocks make an object, and when an object closes: the decisions of the object
//! shipper, with no I/O and no clock of its own (times are passed in).
//!
//! Blocks come in id order. Each route has at most one open object; a block joins its
//! route's open object unless that would make it straddle a UTC hour or pass
//! `max_object_bytes` (records as spooled, uncompressed), in which case the open object
//! closes first. An open object also closes once its first record is `max_object_age` old,
//! and once its hour is over. A block never holds records of two hours (the spool cuts them
//! at the hour), so an object's records all belong to its hour.
//!
//! An object is a run of one route's blocks, `first_block..=last_block` by id: what the spool
//! records before its upload starts, so the upload can be repeated with the same records.

use crate::sink::s3::layout::hour_start;
use crate::spool::BlockMeta;
use std::collections::{BTreeMap, VecDeque};

const HOUR_MS: u64 = 3_600_000;

/// After its hour ends, an open object waits this long for blocks of the hour still being
/// committed before it closes.
pub(crate) const HOUR_GRACE_MS: u64 = 10_000;

/// One object, closed: its records are fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    pub(crate) route: String,
    pub(crate) hour_ms: u64,
    pub(crate) first_block: i64,
    pub(crate) last_block: i64,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) records: u64,
    pub(crate) raw_bytes: u64,
    /// Receive time of its first record.
    pub(crate) opened_ms: u64,
}

/// Objects being gathered and closed, per route.
pub(crate) struct Planner {
    max_bytes: u64,
    max_age_ms: u64,
    open: BTreeMap<String, Planned>,
    closed: VecDeque<Planned>,
}

impl Planner {
    pub(crate) fn new(max_bytes: u64, max_age_ms: u64) -> Planner {
        Planner {
            max_bytes,
            max_age_ms,
            open: BTreeMap::new(),
            closed: VecDeque::new(),
        }
    }

    /// Adds the next block (blocks come in id order).
    pub(crate) fn add(&mut self, b: &BlockMeta) {
        let hour_ms = hour_start(b.created_ms);
        let raw = u64::from(b.raw_bytes);
        let last_seq = b.id as u64 + u64::from(b.records).saturating_sub(1);
        if let Some(o) = self.open.get(&b.route) {
            if o.hour_ms != hour_ms || o.raw_bytes + raw > self.max_bytes {
                self.close(&b.route.clone());
            }
        }
        let o = self.open.entry(b.route.clone()).or_insert_with(|| Planned {
            route: b.route.clone(),
            hour_ms,
            first_block: b.id,
            last_block: b.id,
            first_seq: b.id as u64,
            last_seq,
            records: 0,
            raw_bytes: 0,
            opened_ms: b.created_ms,
        });
        o.last_block = b.id;
        o.last_seq = last_seq;
        o.records += u64::from(b.records);
        o.raw_bytes += raw;
        if o.raw_bytes >= self.max_bytes {
            self.close(&b.route.clone());
        }
    }

    fn close(&mut self, route: &str) {
        if let Some(o) = self.open.remove(route) {
            self.closed.push_back(o);
        }
    }

    /// When an open object is due to close: its age limit or its hour's end.
    fn due_at(&self, o: &Planned) -> u64 {
        (o.opened_ms + self.max_age_ms).min(o.hour_ms + HOUR_MS + HOUR_GRACE_MS)
    }

    /// Closes the open objects that are due at `now_ms`.
    pub(crate) fn close_due(&mut self, now_ms: u64) {
        let due: Vec<String> = self
            .open
            .values()
            .filter(|o| self.due_at(o) <= now_ms)
            .map(|o| o.route.clone())
            .collect();
        for route in due {
            self.close(&route);
        }
    }

    /// Closes every open object (the shipper is told to upload what it has).
    #[cfg(test)]
    pub(crate) fn close_all(&mut self) {
        let routes: Vec<String> = self.open.keys().cloned().collect();
        for r in routes {
            self.close(&r);
        }
    }

    /// The earliest time an open object closes, if any is open.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.open.values().map(|o| self.due_at(o)).min()
    }

    /// The next closed object, oldest first.
    pub(crate) fn pop(&mut self) -> Option<Planned> {
        self.closed.pop_front()
    }

    pub(crate) fn has_closed(&self) -> bool {
        !self.closed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: i64, route: &str, created_ms: u64, records: u32, raw_bytes: u32) -> BlockMeta {
        BlockMeta {
            id,
            route: route.into(),
            key: "k".into(),
            version: 2,
            records,
            raw_bytes,
            stored_bytes: raw_bytes / 10,
            created_ms,
        }
    }

    const H: u64 = 3_600_000 * 490_000;

    #[test]
    fn an_object_never_straddles_an_hour_and_closes_at_its_size() {
        let mut p = Planner::new(1000, 15 * 60_000);
        p.add(&block(1, "r", H + 10, 10, 400));
        p.add(&block(11, "r", H + 20, 10, 400));
        assert!(!p.has_closed());
        // The third would pass 1000 bytes: the first two close.
        p.add(&block(21, "r", H + 30, 10, 400));
        let a = p.pop().unwrap();
        assert_eq!(
            (
                a.first_block,
                a.last_block,
                a.first_seq,
                a.last_seq,
                a.records
            ),
            (1, 11, 1, 20, 20)
        );
        // A block of the next hour closes the open one whatever its size.
        p.add(&block(31, "r", H + HOUR_MS, 5, 10));
        let b = p.pop().unwrap();
        assert_eq!((b.first_block, b.last_block, b.hour_ms), (21, 21, H));
        assert_eq!(p.pop(), None);
        // A block alone over the size closes at once, as its own object.
        p.add(&block(36, "r", H + HOUR_MS + 1, 50, 5000));
        let c = p.pop().unwrap();
        assert_eq!((c.first_block, c.last_block), (31, 31));
        let d = p.pop().unwrap();
        assert_eq!((d.first_block, d.last_block, d.last_seq), (36, 36, 85));
    }

    #[test]
    fn routes_gather_apart_and_close_at_their_age_or_their_hour_end() {
        let mut p = Planner::new(1 << 20, 15 * 60_000);
        p.add(&block(1, "a", H + 1000, 1, 10));
        p.add(&block(2, "b", H + 50 * 60_000, 1, 10));
        p.add(&block(3, "a", H + 2000, 1, 10));
        assert_eq!(p.next_due(), Some(H + 1000 + 15 * 60_000));
        p.close_due(H + 1000 + 15 * 60_000 - 1);
        assert!(!p.has_closed());
        p.close_due(H + 1000 + 15 * 60_000);
        let a = p.pop().unwrap();
        assert_eq!((a.route.as_str(), a.first_block, a.last_block), ("a", 1, 3));
        // b opened at minute 50: its hour ends first.
        assert_eq!(p.next_due(), Some(H + HOUR_MS + HOUR_GRACE_MS));
        p.close_due(H + HOUR_MS + HOUR_GRACE_MS);
        assert_eq!(p.pop().unwrap().route, "b");
        assert_eq!(p.next_due(), None);
        p.add(&block(4, "a", H + HOUR_MS + 5, 1, 10));
        p.close_all();
        assert_eq!(p.pop().unwrap().first_block, 4);
    }
}
