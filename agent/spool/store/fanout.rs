//! One copy on flash, several destinations: which destinations still owe each block, and
//! what leaves the spool when.
//!
//! # Layout
//! - `fanout (route, destination, since)`: the destinations of each route, and the first
//!   record id each one takes. A destination added to a route takes the records received
//!   after the change (`since` is the next sequence number then); the destinations a route
//!   had from its start, or when this table was added to an older spool, take everything
//!   (`since` 0).
//! - `taken (block, destination, dropped)`: a destination that is done with a block that
//!   others still owe (accepted it, or dropped it with the reason in `dropped`). A block
//!   owed by one destination has no row here: its owner's delivery deletes it.
//!
//! A block is owed by the destinations of its route whose `since` is at or below its id and
//! that have no `taken` row for it; it is deleted when none owe it. At the route level it
//! then counts as delivered when every destination that owed it accepted it, else as dropped
//! with the first reason one of them had. Each (route, destination) pair keeps its own
//! `received`, `delivered` and `dropped_<reason>` in `counters` under the route name
//! `<route>/<destination>` (route names cannot hold `/`), in the same rows the route's own
//! terms live in, so a commit writes no more pages for them; for each pair
//! `received = delivered + dropped + pending`.
//!
//! A route whose destinations were never recorded (unit tests that store blocks directly)
//! has one unnamed destination: any delivery deletes its blocks, as before destinations had
//! cursors.
//!
//! Changing a route's destinations: one destination replaced by another takes its backlog
//! along (the old one counts it dropped `removed`, the new one received); otherwise a
//! destination added takes records from then on, and one removed gives up what it still
//! owed (counted dropped `removed` for it; blocks nobody else owes leave).
//!
//! Nothing here decides what to send; it only keeps what was decided, in the caller's open
//! transaction.

use super::{
    pair_row, BlockMeta, Counter, DropReason, Outcome, Removed, Settled, SpoolError, Store,
    PAIR_PENDING,
};
use rusqlite::{params, OptionalExtension};

impl Store {
    /// Reads the `fanout` table.
    pub(super) fn load_fanout(&mut self) -> Result<(), SpoolError> {
        let rows: Vec<(String, String, i64)> = self
            .conn
            .prepare_cached(
                "SELECT route, destination, since FROM fanout ORDER BY route, since, destination",
            )
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        self.fanout.clear();
        for (route, dest, since) in rows {
            self.fanout.entry(route).or_default().push((dest, since));
        }
        Ok(())
    }

    /// Gives routes recorded before the `fanout` table existed their destination, taking
    /// everything spooled; its pair's `received` starts at what is pending, so its terms
    /// balance from here on. In the open transaction.
    pub(super) fn adopt_recorded_routes(&mut self) -> Result<(), SpoolError> {
        let orphans: Vec<(String, String, i64)> = self
            .conn
            .prepare(
                "SELECT r.route, r.destination,
                        (SELECT COALESCE(SUM(records), 0) FROM blocks b WHERE b.route = r.route)
                 FROM routes r WHERE NOT EXISTS (SELECT 1 FROM fanout f WHERE f.route = r.route)",
            )
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        for (route, dest, pending) in orphans {
            self.conn
                .execute(
                    "INSERT INTO fanout (route, destination, since) VALUES (?1, ?2, 0)",
                    params![route, dest],
                )
                .map_err(|e| self.err(e))?;
            self.count(
                &pair_row(&route, &dest),
                Counter::Received,
                pending.max(0) as u64,
            );
        }
        Ok(())
    }

    /// The destinations block `id` of `route` was stored for (empty: a route whose
    /// destinations were never recorded).
    pub(crate) fn bound_for(&self, route: &str, id: i64) -> Vec<&str> {
        self.fanout.get(route).map_or_else(Vec::new, |dests| {
            dests
                .iter()
                .filter(|(_, since)| *since <= id)
                .map(|(d, _)| d.as_str())
                .collect()
        })
    }

    /// The destinations done with block `id`, with the drop reason of those that dropped it.
    fn taken(&self, id: i64) -> Result<Vec<(String, Option<DropReason>)>, SpoolError> {
        let rows: Vec<(String, Option<String>)> = self
            .conn
            .prepare_cached("SELECT destination, dropped FROM taken WHERE block = ?1")
            .and_then(|mut s| s.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(d, reason)| (d, reason.and_then(|r| DropReason::parse(&r))))
            .collect())
    }

    /// Whether `dest` still owes the block `meta` (leasing: cheap for a route with one
    /// destination).
    pub(crate) fn owes(&self, dest: &str, meta: &BlockMeta) -> Result<bool, SpoolError> {
        let bound = self.bound_for(&meta.route, meta.id);
        if bound.is_empty() {
            return Ok(true);
        }
        if !bound.contains(&dest) {
            return Ok(false);
        }
        if bound.len() == 1 {
            return Ok(true);
        }
        let done: Option<i64> = self
            .conn
            .prepare_cached("SELECT 1 FROM taken WHERE block = ?1 AND destination = ?2")
            .and_then(|mut s| s.query_row(params![meta.id, dest], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        Ok(done.is_none())
    }

    /// The destinations that still owe block `id` of `route`.
    pub(crate) fn owing(&self, route: &str, id: i64) -> Result<Vec<String>, SpoolError> {
        let bound = self.bound_for(route, id);
        if bound.len() <= 1 {
            return Ok(bound.into_iter().map(str::to_string).collect());
        }
        let taken = self.taken(id)?;
        Ok(bound
            .into_iter()
            .filter(|d| !taken.iter().any(|(t, _)| t == d))
            .map(str::to_string)
            .collect())
    }

    fn block_size(&self, id: i64) -> Result<Option<(String, u32, u64)>, SpoolError> {
        self.conn
            .prepare_cached("SELECT route, records, LENGTH(data) FROM blocks WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// Deletes block `id`, and its `taken` rows when its route has several destinations
    /// (`shared`; a block owed by one destination never has any).
    fn delete_block_rows(&mut self, id: i64, shared: bool) -> Result<(), SpoolError> {
        self.conn
            .prepare_cached("DELETE FROM blocks WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map_err(|e| self.err(e))?;
        if !shared {
            return Ok(());
        }
        self.conn
            .prepare_cached("DELETE FROM taken WHERE block = ?1")
            .and_then(|mut s| s.execute([id]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// `dest` is done with block `id` (`outcome`), in the open transaction: counted for the
    /// pair; the block leaves when no other destination owes it. `None` when the block is
    /// gone or `dest` did not owe it.
    pub(crate) fn settle(
        &mut self,
        dest: &str,
        id: i64,
        outcome: Outcome,
    ) -> Result<Option<Settled>, SpoolError> {
        let Some((route, records, bytes)) = self.block_size(id)? else {
            return Ok(None);
        };
        let bound: Vec<String> = self
            .bound_for(&route, id)
            .into_iter()
            .map(str::to_string)
            .collect();
        if bound.is_empty() {
            self.delete_block_rows(id, false)?;
            self.sub_pending(&route, u64::from(records), bytes);
            self.count(&route, outcome.counter(), u64::from(records));
            return Ok(Some(Settled {
                route,
                records,
                left: Some(outcome.counter()),
            }));
        }
        if !bound.iter().any(|d| d == dest) {
            return Ok(None);
        }
        let taken = if bound.len() > 1 {
            self.taken(id)?
        } else {
            Vec::new()
        };
        if taken.iter().any(|(d, _)| d == dest) {
            return Ok(None);
        }
        self.count(
            &pair_row(&route, dest),
            outcome.counter(),
            u64::from(records),
        );
        self.sub_pair_pending(&route, dest, u64::from(records), bytes);
        let still_owed = bound
            .iter()
            .any(|d| d != dest && !taken.iter().any(|(t, _)| t == d));
        if still_owed {
            let dropped = match outcome {
                Outcome::Accepted => None,
                Outcome::Dropped(reason) => Some(reason.as_str()),
            };
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO taken (block, destination, dropped) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut s| s.execute(params![id, dest, dropped]))
                .map_err(|e| self.err(e))?;
            return Ok(Some(Settled {
                route,
                records,
                left: None,
            }));
        }
        let first_drop = taken
            .iter()
            .find_map(|(_, reason)| *reason)
            .map(Counter::Dropped);
        let counter = first_drop.unwrap_or(outcome.counter());
        self.delete_block_rows(id, bound.len() > 1)?;
        self.sub_pending(&route, u64::from(records), bytes);
        self.count(&route, counter, u64::from(records));
        Ok(Some(Settled {
            route,
            records,
            left: Some(counter),
        }))
    }

    /// Removes block `id` for every destination, counted dropped `reason` for the route and
    /// for each destination that still owed it, in the open transaction.
    pub(crate) fn remove_for_all(
        &mut self,
        id: i64,
        reason: DropReason,
    ) -> Result<Option<Removed>, SpoolError> {
        let Some((route, records, bytes)) = self.block_size(id)? else {
            return Ok(None);
        };
        let shared = self.bound_for(&route, id).len() > 1;
        let owing = self.owing(&route, id)?;
        for d in &owing {
            self.count(
                &pair_row(&route, d),
                Counter::Dropped(reason),
                u64::from(records),
            );
            self.sub_pair_pending(&route, d, u64::from(records), bytes);
        }
        self.delete_block_rows(id, shared)?;
        self.sub_pending(&route, u64::from(records), bytes);
        self.count(&route, Counter::Dropped(reason), u64::from(records));
        Ok(Some(Removed {
            route,
            records,
            owing,
        }))
    }

    /// Counts a record stored for `route` with id `id` as received by each destination it is
    /// bound for, and pending there.
    pub(super) fn bind_new(&mut self, route: &str, id: i64, records: u64, bytes: u64) {
        let bound: Vec<String> = self
            .bound_for(route, id)
            .into_iter()
            .map(str::to_string)
            .collect();
        for d in bound {
            self.count(&pair_row(route, &d), Counter::Received, records);
            self.add_pair_pending(route, &d, records, bytes);
        }
    }

    /// A message of `route` dropped before it became a record: received and dropped for each
    /// destination the next record would be bound for.
    pub(super) fn drop_for_pairs(&mut self, route: &str, reason: DropReason) {
        let next = self.next_seq as i64;
        let bound: Vec<String> = self
            .bound_for(route, next)
            .into_iter()
            .map(str::to_string)
            .collect();
        for d in bound {
            let row = pair_row(route, &d);
            self.count(&row, Counter::Received, 1);
            self.count(&row, Counter::Dropped(reason), 1);
        }
    }

    /// Replaces block `old` by `halves` (a split): the destinations that owed it owe them, and
    /// those done with it are done with them.
    pub(super) fn rebind_split(
        &mut self,
        old: &BlockMeta,
        halves: &[BlockMeta],
    ) -> Result<(), SpoolError> {
        let owing = self.owing(&old.route, old.id)?;
        for d in &owing {
            self.sub_pair_pending(
                &old.route,
                d,
                u64::from(old.records),
                u64::from(old.stored_bytes),
            );
            for h in halves {
                self.add_pair_pending(
                    &old.route,
                    d,
                    u64::from(h.records),
                    u64::from(h.stored_bytes),
                );
            }
        }
        for h in halves.iter().filter(|h| h.id != old.id) {
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO taken (block, destination, dropped)
                     SELECT ?2, destination, dropped FROM taken WHERE block = ?1",
                )
                .and_then(|mut s| s.execute(params![old.id, h.id]))
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Sets the destinations of `route` (see the module doc for what a change does), in the
    /// open transaction. Returns whether anything changed.
    pub(crate) fn record_fanout(
        &mut self,
        route: &str,
        destinations: &[String],
    ) -> Result<bool, SpoolError> {
        let old = self.fanout.get(route).cloned().unwrap_or_default();
        let same =
            old.len() == destinations.len() && old.iter().all(|(d, _)| destinations.contains(d));
        if same {
            return Ok(false);
        }
        let insert = |store: &Store, dest: &str, since: i64| {
            store
                .conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO fanout (route, destination, since) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut s| s.execute(params![route, dest, since]))
                .map(drop)
                .map_err(|e| store.err(e))
        };
        if old.is_empty() {
            for d in destinations {
                insert(self, d, 0)?;
            }
        } else if old.len() == 1 && destinations.len() == 1 {
            // Replaced: the backlog goes along.
            let (from, since) = &old[0];
            let to = &destinations[0];
            let moved = self.pending_of_route(route)?;
            self.pair_pending.remove(&(route.to_string(), from.clone()));
            self.count(
                &pair_row(route, from),
                Counter::Dropped(DropReason::Removed),
                moved.0,
            );
            self.count(&pair_row(route, to), Counter::Received, moved.0);
            self.add_pair_pending(route, to, moved.0, moved.1);
            self.conn
                .execute(
                    "DELETE FROM fanout WHERE route = ?1 AND destination = ?2",
                    params![route, from],
                )
                .map_err(|e| self.err(e))?;
            insert(self, to, *since)?;
        } else {
            let next = self.next_seq as i64;
            for d in destinations {
                if !old.iter().any(|(o, _)| o == d) {
                    insert(self, d, next)?;
                }
            }
            self.load_fanout()?;
            for (d, since) in &old {
                if !destinations.contains(d) {
                    self.release(route, d, *since)?;
                }
            }
        }
        self.load_fanout()?;
        Ok(true)
    }

    fn pending_of_route(&self, route: &str) -> Result<(u64, u64), SpoolError> {
        self.conn
            .prepare_cached(
                "SELECT COALESCE(SUM(records), 0), COALESCE(SUM(LENGTH(data)), 0) FROM blocks WHERE route = ?1",
            )
            .and_then(|mut s| {
                s.query_row([route], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
            })
            .map_err(|e| self.err(e))
    }

    /// Takes `dest` off `route`: what it still owed is dropped `removed` for it; blocks no
    /// destination owes any more leave.
    fn release(&mut self, route: &str, dest: &str, since: i64) -> Result<(), SpoolError> {
        self.conn
            .execute(
                "DELETE FROM fanout WHERE route = ?1 AND destination = ?2",
                params![route, dest],
            )
            .map_err(|e| self.err(e))?;
        if let Some(dests) = self.fanout.get_mut(route) {
            dests.retain(|(d, _)| d != dest);
        }
        let blocks: Vec<(i64, u32, u64)> = self
            .conn
            .prepare("SELECT id, records, LENGTH(data) FROM blocks WHERE route = ?1 AND id >= ?2 ORDER BY id")
            .and_then(|mut s| {
                s.query_map(params![route, since], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })?
                .collect()
            })
            .map_err(|e| self.err(e))?;
        for (id, records, bytes) in blocks {
            let taken = self.taken(id)?;
            let had_taken = taken.iter().any(|(d, _)| d == dest);
            if had_taken {
                self.conn
                    .execute(
                        "DELETE FROM taken WHERE block = ?1 AND destination = ?2",
                        params![id, dest],
                    )
                    .map_err(|e| self.err(e))?;
                continue;
            }
            self.count(
                &pair_row(route, dest),
                Counter::Dropped(DropReason::Removed),
                u64::from(records),
            );
            let bound: Vec<String> = self
                .bound_for(route, id)
                .into_iter()
                .map(str::to_string)
                .collect();
            let still_owed = bound.iter().any(|d| !taken.iter().any(|(t, _)| t == d));
            if still_owed {
                continue;
            }
            let counter = if taken.is_empty() {
                Counter::Dropped(DropReason::Removed)
            } else {
                taken
                    .iter()
                    .find_map(|(_, r)| *r)
                    .map_or(Counter::Delivered, Counter::Dropped)
            };
            self.delete_block_rows(id, true)?;
            self.sub_pending(route, u64::from(records), bytes);
            self.count(route, counter, u64::from(records));
        }
        self.pair_pending
            .remove(&(route.to_string(), dest.to_string()));
        Ok(())
    }

    /// Pending records and bytes per (route, destination), from the file.
    pub(super) fn reload_pair_pending(&mut self) -> Result<(), SpoolError> {
        let rows: Vec<(String, String, i64, i64)> = self
            .conn
            .prepare(PAIR_PENDING)
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        self.pair_pending.clear();
        for (route, dest, records, bytes) in rows {
            self.pair_pending
                .insert((route, dest), (records.max(0) as u64, bytes.max(0) as u64));
        }
        Ok(())
    }

    fn add_pair_pending(&mut self, route: &str, dest: &str, records: u64, bytes: u64) {
        let p = self
            .pair_pending
            .entry((route.to_string(), dest.to_string()))
            .or_default();
        p.0 += records;
        p.1 += bytes;
    }

    fn sub_pair_pending(&mut self, route: &str, dest: &str, records: u64, bytes: u64) {
        if let Some(p) = self
            .pair_pending
            .get_mut(&(route.to_string(), dest.to_string()))
        {
            p.0 = p.0.saturating_sub(records);
            p.1 = p.1.saturating_sub(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Accounting, NewRecord, Store};
    use super::*;
    use crate::config::SyncLevel;
    use std::collections::BTreeMap;

    fn rec(payload: &[u8]) -> NewRecord<'_> {
        NewRecord {
            ts_ms: 1,
            key: "k",
            topic: "t",
            payload,
        }
    }

    fn routes(dests: &[&str]) -> BTreeMap<String, (Vec<String>, String)> {
        BTreeMap::from([(
            "r".to_string(),
            (
                dests.iter().map(|d| d.to_string()).collect(),
                "edgeship".to_string(),
            ),
        )])
    }

    /// Stores `n` one-record blocks of route `r`; returns their ids.
    fn append(s: &mut Store, n: usize) -> Vec<i64> {
        let mut body = Vec::new();
        s.begin().unwrap();
        let ids = (0..n)
            .map(|i| {
                s.append_block("r", "k", &[rec(format!("m{i}").as_bytes())], &mut body)
                    .unwrap()
                    .id
            })
            .collect();
        s.commit().unwrap();
        ids
    }

    fn set(s: &mut Store, dests: &[&str]) {
        s.begin().unwrap();
        s.record_routes(&routes(dests)).unwrap();
        s.commit().unwrap();
    }

    fn deliver(s: &mut Store, dest: &str, ids: &[i64]) -> Vec<Option<Settled>> {
        s.begin().unwrap();
        let out = ids
            .iter()
            .map(|id| s.deliver_block(dest, *id).unwrap())
            .collect();
        s.commit().unwrap();
        out
    }

    fn listed(s: &Store, dest: &str) -> Vec<i64> {
        s.list_blocks(dest, 0, &["r".to_string()], 1_000, |_| false)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect()
    }

    fn terms(acc: &Accounting, dest: &str) -> (u64, u64, u64, u64) {
        let t = acc
            .destinations
            .get(&format!("r/{dest}"))
            .cloned()
            .unwrap_or_default();
        (t.received, t.delivered, t.dropped, t.pending)
    }

    /// The committed figures and the file's agree, and both balance.
    fn checked(s: &Store) -> Accounting {
        let file = s.accounting().unwrap();
        let mut mem = s.committed.lock().unwrap().accounting();
        mem.dead_letters = file.dead_letters;
        assert_eq!(mem, file, "published figures = the file's");
        assert!(file.balances(), "{file:?}");
        file
    }

    #[test]
    fn a_block_stays_until_every_destination_took_it_and_each_keeps_its_own_terms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        set(&mut s, &["a", "b"]);
        let ids = append(&mut s, 3);
        assert_eq!(listed(&s, "a"), ids);
        assert_eq!(listed(&s, "b"), ids);
        assert_eq!(listed(&s, "c"), Vec::<i64>::new(), "not a destination of r");

        let first = deliver(&mut s, "a", &ids[..2]);
        assert!(
            first.iter().all(|d| d.as_ref().unwrap().left.is_none()),
            "b still owes them"
        );
        assert_eq!(
            deliver(&mut s, "a", &ids[..1]),
            vec![None],
            "a reported twice: nothing"
        );
        assert_eq!(listed(&s, "a"), ids[2..]);
        assert_eq!(listed(&s, "b"), ids);
        let acc = checked(&s);
        assert_eq!(
            (acc.received, acc.delivered, acc.pending),
            (3, 0, 3),
            "stored once"
        );
        assert_eq!(terms(&acc, "a"), (3, 2, 0, 1));
        assert_eq!(terms(&acc, "b"), (3, 0, 0, 3));

        // A restart keeps both cursors.
        drop(s);
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        assert_eq!(listed(&s, "a"), ids[2..]);
        assert_eq!(listed(&s, "b"), ids);
        let left = deliver(&mut s, "b", &ids);
        assert_eq!(
            left.iter()
                .map(|d| d.as_ref().unwrap().left)
                .collect::<Vec<_>>(),
            [Some(Counter::Delivered), Some(Counter::Delivered), None]
        );
        deliver(&mut s, "a", &ids[2..]);
        let acc = checked(&s);
        assert_eq!((acc.received, acc.delivered, acc.pending), (3, 3, 0));
        assert_eq!(terms(&acc, "a"), (3, 3, 0, 0));
        assert_eq!(terms(&acc, "b"), (3, 3, 0, 0));
        let taken: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM taken", [], |r| r.get(0))
            .unwrap();
        assert_eq!(taken, 0, "nothing left behind");
    }

    #[test]
    fn an_added_destination_takes_what_comes_after_and_a_removed_one_gives_up_its_claims() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("spool.db"), SyncLevel::Normal).unwrap();
        set(&mut s, &["a"]);
        let before = append(&mut s, 2);
        set(&mut s, &["a", "b"]);
        let after = append(&mut s, 2);
        assert_eq!(listed(&s, "a"), [before.clone(), after.clone()].concat());
        assert_eq!(
            listed(&s, "b"),
            after,
            "only records received after it was added"
        );
        let acc = checked(&s);
        assert_eq!(terms(&acc, "a"), (4, 0, 0, 4));
        assert_eq!(terms(&acc, "b"), (2, 0, 0, 2));

        // a takes everything: its old blocks leave, the new ones wait for b.
        deliver(&mut s, "a", &[before.clone(), after.clone()].concat());
        let acc = checked(&s);
        assert_eq!((acc.delivered, acc.pending), (2, 2));
        // a removed: nothing changes for b; a's claims (none left) released.
        set(&mut s, &["b"]);
        let acc = checked(&s);
        assert_eq!(listed(&s, "b"), after);
        assert_eq!(terms(&acc, "b"), (2, 0, 0, 2));
        // b removed with c in: b's backlog is dropped `removed` for b and, as nobody else
        // owes it, for the route; c takes only new records.
        set(&mut s, &["b", "c"]);
        set(&mut s, &["c"]);
        let acc = checked(&s);
        assert_eq!(terms(&acc, "b"), (2, 0, 2, 0));
        assert_eq!(acc.pending, 0);
        assert_eq!(acc.dropped_by_reason["removed"], 2);
        assert_eq!(listed(&s, "c"), Vec::<i64>::new());
    }

    #[test]
    fn a_destination_replaced_by_another_hands_over_its_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("spool.db"), SyncLevel::Normal).unwrap();
        set(&mut s, &["a"]);
        let ids = append(&mut s, 3);
        deliver(&mut s, "a", &ids[..1]);
        set(&mut s, &["b"]);
        assert_eq!(listed(&s, "b"), ids[1..]);
        assert_eq!(listed(&s, "a"), Vec::<i64>::new());
        let acc = checked(&s);
        assert_eq!(terms(&acc, "a"), (3, 1, 2, 0));
        assert_eq!(terms(&acc, "b"), (2, 0, 0, 2));
    }

    #[test]
    fn eviction_and_unshippable_records_are_counted_for_each_destination_that_owed_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("spool.db"), SyncLevel::Normal).unwrap();
        set(&mut s, &["a", "b"]);
        let ids = append(&mut s, 3);
        deliver(&mut s, "a", &ids[..1]);
        s.begin().unwrap();
        let (id, removed) = s.evict_oldest(|_| false).unwrap().unwrap();
        s.commit().unwrap();
        assert_eq!((id, removed.owing), (ids[0], vec!["b".to_string()]));
        let cap = super::super::DeadLetterCap {
            records: 10,
            bytes: 1 << 20,
        };
        // a cannot take the second block: dropped for a only, b still owes it, and it is
        // no dead letter while b may take it.
        let settled = s.dead_letter_block("a", ids[1], cap).unwrap().unwrap();
        assert_eq!(settled.left, None);
        assert_eq!(listed(&s, "b"), ids[1..]);
        assert_eq!(s.accounting().unwrap().dead_letters, 0);
        let left = deliver(&mut s, "b", &ids[1..2]);
        assert_eq!(
            left[0].as_ref().unwrap().left,
            Some(Counter::Dropped(DropReason::Unshippable)),
            "for the route a record one destination could not take is not delivered"
        );
        // Neither can take the third: the last one to give up moves it to the dead letters.
        s.dead_letter_block("a", ids[2], cap).unwrap();
        s.dead_letter_block("b", ids[2], cap).unwrap();
        let acc = checked(&s);
        assert_eq!(acc.dead_letters, 1);
        assert_eq!(terms(&acc, "a"), (3, 1, 2, 0));
        assert_eq!(terms(&acc, "b"), (3, 1, 2, 0));
        assert_eq!(acc.dropped_by_reason["spool_full"], 1);
        assert_eq!(acc.dropped_by_reason["unshippable"], 2);
        assert_eq!((acc.received, acc.pending), (3, 0));
    }

    #[test]
    fn a_split_block_stays_owed_by_the_destinations_that_owed_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("spool.db"), SyncLevel::Normal).unwrap();
        set(&mut s, &["a", "b"]);
        let mut body = Vec::new();
        s.begin().unwrap();
        let big = s
            .append_block(
                "r",
                "k",
                &[rec(b"1"), rec(b"2"), rec(b"3"), rec(b"4")],
                &mut body,
            )
            .unwrap();
        s.commit().unwrap();
        deliver(&mut s, "a", &[big.id]);
        let halves = s.split_block(big.id, &mut body).unwrap();
        assert_eq!(halves.len(), 2);
        assert_eq!(
            listed(&s, "a"),
            Vec::<i64>::new(),
            "a took both halves already"
        );
        assert_eq!(
            listed(&s, "b"),
            halves.iter().map(|h| h.id).collect::<Vec<_>>()
        );
        deliver(&mut s, "b", &[halves[0].id, halves[1].id]);
        let acc = checked(&s);
        assert_eq!((acc.received, acc.delivered, acc.pending), (4, 4, 0));
        assert_eq!(terms(&acc, "b"), (4, 4, 0, 0));
    }

    #[test]
    fn a_rebuilt_file_keeps_each_destinations_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("spool.db"), SyncLevel::Normal).unwrap();
        set(&mut s, &["a"]);
        let old = append(&mut s, 2);
        set(&mut s, &["a", "b"]);
        let new = append(&mut s, 2);
        deliver(&mut s, "b", &new[..1]);
        let report = s.rebuild().unwrap();
        assert_eq!(report.salvaged_blocks, 4);
        assert_eq!(listed(&s, "a"), [old, new.clone()].concat());
        assert_eq!(listed(&s, "b"), new[1..]);
        let acc = checked(&s);
        assert_eq!(terms(&acc, "a"), (4, 0, 0, 4));
        assert_eq!(terms(&acc, "b"), (2, 1, 0, 1));
    }

    #[test]
    fn a_spool_from_before_cursors_gives_its_routes_their_recorded_destination() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let ids = {
            let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
            let ids = append(&mut s, 2);
            s.conn
                .execute_batch(
                    "INSERT INTO routes (route, destination, format) VALUES ('r', 'a', 'edgeship');
                     DROP TABLE fanout; DROP TABLE taken;",
                )
                .unwrap();
            ids
        };
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        let acc = checked(&s);
        assert_eq!(
            terms(&acc, "a"),
            (2, 0, 0, 2),
            "its backlog is a's from the upgrade on"
        );
        assert_eq!(listed(&s, "a"), ids);
        assert_eq!(listed(&s, "b"), Vec::<i64>::new());
        deliver(&mut s, "a", &ids);
        let acc = checked(&s);
        assert_eq!((acc.delivered, acc.pending), (2, 0));
    }
}
