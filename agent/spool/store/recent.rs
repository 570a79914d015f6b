//! The bodies of the blocks this process appended last, kept uncompressed so that reading a
//! block back soon after writing it (a shipper's frame, usually within a linger of the
//! write) takes neither the blob from the file nor a zstd decompression.
//!
//! A kept body only answers for a block whose row still says what it said when the body was
//! kept (the store's block meta: route, key, records, raw and stored bytes, time, version):
//! the store reads the row on every read, so a block that was deleted, split under the same
//! id or written again after a rollback is read from the file. It holds at most its byte
//! cap, dropping the oldest block first. It does not keep a body larger than a quarter of the
//! cap, nor one queued behind more undelivered blocks than the cap holds (a backlog, or a
//! saturated stream's second of frames): the shipper would come to it after the cap dropped
//! it, so keeping it would cost a copy and memory for nothing.
//!
//! It is never the only copy of anything: every body in it is in the spool file (committed,
//! or in the transaction being built, which a rollback clears from here too), so losing it
//! loses nothing.

use std::collections::BTreeMap;

/// Kept bodies, each with `M`, the description of its block's row it answers for.
pub(super) struct RecentBodies<M> {
    /// By block id; ids only grow, so the first is the oldest.
    blocks: BTreeMap<i64, (M, Vec<u8>)>,
    bytes: usize,
    cap: usize,
}

impl<M: PartialEq> RecentBodies<M> {
    pub(super) fn new(cap: usize) -> RecentBodies<M> {
        RecentBodies {
            blocks: BTreeMap::new(),
            bytes: 0,
            cap,
        }
    }

    /// Keeps the uncompressed body of block `id`, just appended as `meta` behind `queued`
    /// bytes (uncompressed) of its route's blocks not yet delivered.
    pub(super) fn remember(&mut self, id: i64, meta: M, body: &[u8], queued: u64) {
        if body.len() > self.cap / 4 || queued.saturating_add(body.len() as u64) > self.cap as u64 {
            return;
        }
        self.forget(id);
        while self.bytes + body.len() > self.cap {
            match self.blocks.pop_first() {
                Some((_, (_, old))) => self.bytes -= old.len(),
                None => break,
            }
        }
        self.bytes += body.len();
        self.blocks.insert(id, (meta, body.to_vec()));
    }

    /// Whether a body of block `id` is kept (the store then reads the block's row alone).
    pub(super) fn holds(&self, id: i64) -> bool {
        self.blocks.contains_key(&id)
    }

    /// The kept body of block `id` if its row reads `meta`, handed over (a later read of it
    /// goes to the file); `None`, and the body dropped, when the row says anything else.
    pub(super) fn take(&mut self, id: i64, meta: &M) -> Option<Vec<u8>> {
        let (kept, body) = self.blocks.remove(&id)?;
        self.bytes -= body.len();
        (kept == *meta).then_some(body)
    }

    pub(super) fn forget(&mut self, id: i64) {
        if let Some((_, body)) = self.blocks.remove(&id) {
            self.bytes -= body.len();
        }
    }

    pub(super) fn clear(&mut self) {
        self.blocks.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's description: its records and raw bytes.
    type Meta = (u32, u32);

    #[test]
    fn a_body_answers_only_for_the_row_it_was_kept_with() {
        let mut recent = RecentBodies::<Meta>::new(1_000);
        recent.remember(1, (2, 100), &[1; 100], 0);
        recent.remember(3, (2, 100), &[3; 100], 100);
        assert_eq!(recent.take(1, &(2, 100)), Some(vec![1; 100]));
        // Handed over once.
        assert!(!recent.holds(1));
        assert_eq!(recent.take(1, &(2, 100)), None);
        // The same id with other records (a split, a rollback's rewrite): not this body.
        assert_eq!(recent.take(3, &(1, 100)), None);
        assert!(!recent.holds(3));
        assert_eq!(recent.bytes(), 0);
    }

    #[test]
    fn it_holds_its_cap_dropping_the_oldest_first() {
        let mut recent = RecentBodies::<Meta>::new(1_000);
        for id in 0..10 {
            recent.remember(id, (1, 200), &[id as u8; 200], 0);
        }
        assert_eq!(recent.bytes(), 1_000);
        assert!((0..5).all(|id| !recent.holds(id)));
        assert!((5..10).all(|id| recent.holds(id)));
        // Over a quarter of the cap: not kept, and nothing dropped for it.
        recent.remember(10, (1, 251), &[0; 251], 0);
        assert!(!recent.holds(10) && recent.holds(5));
        // Behind more than the cap holds: the shipper would not read it before it went.
        recent.remember(11, (1, 200), &[0; 200], 801);
        assert!(!recent.holds(11) && recent.holds(5));
        recent.remember(11, (1, 200), &[0; 200], 800);
        assert!(recent.holds(11) && !recent.holds(5));
        recent.forget(9);
        assert_eq!(recent.bytes(), 800);
        recent.clear();
        assert_eq!(recent.bytes(), 0);
        assert!(!recent.holds(6));
    }
}
