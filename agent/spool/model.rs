//! The spool file against a model: random sequences of appends, leases, deliveries, failed
//! sends, `drop_oldest` evictions, corrupt blocks, splits, dead letters and reopenings, each
//! checked after every step against a plain in-memory model of what must be there. One route
//! feeds two destinations, each with its own deliveries and dead letters.
//!
//! At every step: `received = delivered + dropped + pending`, each term equal to the model's,
//! for the routes and for each (route, destination) pair;
//! every pending record readable with its payload; a record is delivered at most once and
//! never lost; ids only grow, across reopenings too. Failures proptest finds are kept in
//! `proptest-regressions/spool/model.txt` and replayed first.

use super::store::{BlockMeta, NewRecord, Store};
use crate::config::SyncLevel;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` records of route `r` (0 or 1) in one commit.
    Append { r: u8, n: u8 },
    /// Lease everything each destination owes and compare with the model.
    Lease,
    /// Destination `d` accepted the `i`-th pending block (modulo their number).
    Deliver { i: u8, d: u8 },
    /// A send failed: nothing changes.
    Fail,
    /// `drop_oldest` evicts the oldest block not in flight; the `i`-th is in flight.
    DropOldest { in_flight: u8 },
    /// The `i`-th pending block's data is damaged, then read: quarantined.
    Corrupt { i: u8 },
    /// The `i`-th pending block is split in halves.
    Split { i: u8 },
    /// Destination `d` cannot ship the `i`-th pending block: dropped for it, and its records
    /// become dead letters when no other destination owes it.
    DeadLetter { i: u8, d: u8 },
    /// The spool is closed and opened again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..2, 1u8..6).prop_map(|(r, n)| Op::Append { r, n }),
        1 => Just(Op::Lease),
        4 => (any::<u8>(), 0u8..2).prop_map(|(i, d)| Op::Deliver { i, d }),
        1 => Just(Op::Fail),
        1 => any::<u8>().prop_map(|in_flight| Op::DropOldest { in_flight }),
        1 => any::<u8>().prop_map(|i| Op::Corrupt { i }),
        1 => any::<u8>().prop_map(|i| Op::Split { i }),
        1 => (any::<u8>(), 0u8..2).prop_map(|(i, d)| Op::DeadLetter { i, d }),
        1 => Just(Op::Reopen),
    ]
}

/// Route `r0` feeds destinations `a` and `b`, route `r1` only `a`.
const DESTS: [&str; 2] = ["a", "b"];

fn dests_of(route: &str) -> Vec<&'static str> {
    if route == "r0" {
        DESTS.to_vec()
    } else {
        vec!["a"]
    }
}

/// A pending block: its route, records (each its seq and payload), the destinations that
/// still owe it, and the first reason one of them dropped it for.
#[derive(Clone)]
struct ModelBlock {
    route: String,
    records: Vec<(u64, Vec<u8>)>,
    owed: Vec<&'static str>,
    dropped: Option<&'static str>,
}

/// A (route, destination) pair's received, delivered and dropped.
type PairTerms = (u64, u64, u64);

/// What must be in the spool: pending blocks by id.
#[derive(Default)]
struct Model {
    blocks: BTreeMap<i64, ModelBlock>,
    received: u64,
    delivered: u64,
    dropped: BTreeMap<&'static str, u64>,
    pairs: BTreeMap<String, PairTerms>,
    /// (destination, seq) pairs accepted.
    delivered_seqs: HashSet<(&'static str, u64)>,
    highest_seq: u64,
}

impl Model {
    fn pending(&self) -> u64 {
        self.blocks.values().map(|b| b.records.len() as u64).sum()
    }

    fn nth(&self, i: u8) -> Option<i64> {
        let n = self.blocks.len();
        (n > 0).then(|| {
            *self
                .blocks
                .keys()
                .nth(usize::from(i) % n)
                .expect("in range")
        })
    }

    fn pair(&mut self, route: &str, dest: &str) -> &mut PairTerms {
        self.pairs.entry(format!("{route}/{dest}")).or_default()
    }

    /// The block leaves for every destination (evicted, corrupt).
    fn drop_block(&mut self, id: i64, reason: &'static str) {
        let b = self.blocks.remove(&id).expect("model block");
        let n = b.records.len() as u64;
        for d in &b.owed {
            self.pair(&b.route, d).2 += n;
        }
        *self.dropped.entry(reason).or_default() += n;
    }

    /// Destination `dest` is done with block `id` (accepted, or dropped for `reason`).
    fn settle(&mut self, id: i64, dest: &'static str, reason: Option<&'static str>) {
        let mut b = self.blocks.remove(&id).expect("model block");
        let n = b.records.len() as u64;
        b.owed.retain(|d| *d != dest);
        match reason {
            None => {
                self.pair(&b.route, dest).1 += n;
                for (seq, _) in &b.records {
                    assert!(
                        self.delivered_seqs.insert((dest, *seq)),
                        "seq {seq} delivered twice to {dest}"
                    );
                }
            }
            Some(_) => self.pair(&b.route, dest).2 += n,
        }
        b.dropped = b.dropped.or(reason);
        if b.owed.is_empty() {
            match b.dropped {
                Some(r) => *self.dropped.entry(r).or_default() += n,
                None => self.delivered += n,
            }
        } else {
            self.blocks.insert(id, b);
        }
    }
}

fn check(store: &Store, model: &Model) {
    let acc = store.accounting().unwrap();
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.received, model.received, "received");
    assert_eq!(acc.delivered, model.delivered, "delivered");
    assert_eq!(acc.pending, model.pending(), "pending");
    for (reason, n) in &model.dropped {
        assert_eq!(acc.dropped_by_reason.get(*reason), Some(n), "{reason}");
    }
    assert_eq!(acc.dropped, model.dropped.values().sum::<u64>(), "dropped");
    for (pair, (received, delivered, dropped)) in &model.pairs {
        let (route, dest) = pair.split_once('/').unwrap();
        let pending: u64 = model
            .blocks
            .values()
            .filter(|b| b.route == route && b.owed.contains(&dest))
            .map(|b| b.records.len() as u64)
            .sum();
        let t = acc.destinations.get(pair).cloned().unwrap_or_default();
        assert_eq!(
            (t.received, t.delivered, t.dropped, t.pending),
            (*received, *delivered, *dropped, pending),
            "{pair}"
        );
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let (mut store, _) = Store::open(&path, SyncLevel::Off).unwrap();
    store.begin().unwrap();
    let routes = ["r0", "r1"]
        .map(|r| {
            let dests = dests_of(r).into_iter().map(String::from).collect();
            (r.to_string(), (dests, "edgeship".to_string()))
        })
        .into();
    store.record_routes(&routes).unwrap();
    store.commit().unwrap();
    let mut model = Model::default();
    let mut body = Vec::new();
    let mut counter = 0u32;
    let cap = super::store::DeadLetterCap {
        records: 1_000,
        bytes: 1 << 20,
    };
    for op in ops {
        match op {
            Op::Append { r, n } => {
                let route = format!("r{r}");
                let payloads: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        counter += 1;
                        counter.to_le_bytes().to_vec()
                    })
                    .collect();
                let recs: Vec<NewRecord<'_>> = payloads
                    .iter()
                    .map(|p| NewRecord {
                        ts_ms: 1,
                        key: "k",
                        topic: "t",
                        payload: p,
                    })
                    .collect();
                store.begin().unwrap();
                let meta = store.append_block(&route, "k", &recs, &mut body).unwrap();
                store.commit().unwrap();
                let first = meta.id as u64;
                assert!(first > model.highest_seq, "id {first} reused");
                model.highest_seq = first + u64::from(n) - 1;
                model.received += u64::from(n);
                for d in dests_of(&route) {
                    model.pair(&route, d).0 += u64::from(n);
                }
                let records = payloads
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| (first + i as u64, p))
                    .collect();
                let owed = dests_of(&route);
                model.blocks.insert(
                    meta.id,
                    ModelBlock {
                        route,
                        records,
                        owed,
                        dropped: None,
                    },
                );
            }
            Op::Lease => {
                let routes = vec!["r0".to_string(), "r1".to_string()];
                for d in DESTS {
                    let listed: Vec<i64> = store
                        .list_blocks(d, 0, &routes, 10_000, |_| false)
                        .unwrap()
                        .iter()
                        .map(|m: &BlockMeta| m.id)
                        .collect();
                    let owed: Vec<i64> = model
                        .blocks
                        .iter()
                        .filter(|(_, b)| b.owed.contains(&d))
                        .map(|(id, _)| *id)
                        .collect();
                    assert_eq!(listed, owed, "{d}");
                }
            }
            Op::Deliver { i, d } => {
                if let Some(id) = model.nth(i) {
                    let dest = DESTS[usize::from(d)];
                    store.begin().unwrap();
                    let settled = store.deliver_block(dest, id).unwrap();
                    store.commit().unwrap();
                    let b = &model.blocks[&id];
                    if b.owed.contains(&dest) {
                        assert_eq!(settled.map(|s| s.records as usize), Some(b.records.len()));
                        model.settle(id, dest, None);
                    } else {
                        assert_eq!(settled, None, "{dest} does not owe block {id}");
                    }
                    // Reported delivered again (a late duplicate report): nothing changes.
                    store.begin().unwrap();
                    assert_eq!(store.deliver_block(dest, id).unwrap(), None);
                    store.commit().unwrap();
                }
            }
            Op::Fail => {}
            Op::DropOldest { in_flight } => {
                let skip: HashSet<i64> = model.nth(in_flight).into_iter().collect();
                store.begin().unwrap();
                let evicted = store.evict_oldest(|id| skip.contains(&id)).unwrap();
                store.commit().unwrap();
                let expected = model.blocks.keys().copied().find(|id| !skip.contains(id));
                match (evicted, expected) {
                    (Some((got, removed)), Some(id)) => {
                        assert_eq!(got, id);
                        assert_eq!(removed.owing, model.blocks[&id].owed);
                        model.drop_block(id, "spool_full")
                    }
                    (None, None) => {}
                    other => panic!("eviction {other:?}"),
                }
            }
            Op::Corrupt { i } => {
                if let Some(id) = model.nth(i) {
                    store.damage_block_for_test(id);
                    assert!(store.read_block(id).is_err());
                    model.drop_block(id, "corrupt");
                }
            }
            Op::Split { i } => {
                if let Some(id) = model.nth(i) {
                    let parts = store.split_block(id, &mut body).unwrap();
                    let b = model.blocks.remove(&id).unwrap();
                    let mut left = b.records.as_slice();
                    for p in &parts {
                        let (mine, rest) = left.split_at(p.records as usize);
                        assert_eq!(p.id as u64, mine[0].0, "a part starts at its first seq");
                        let part = ModelBlock {
                            records: mine.to_vec(),
                            ..b.clone()
                        };
                        model.blocks.insert(p.id, part);
                        left = rest;
                    }
                    assert!(left.is_empty(), "every record in a part");
                }
            }
            Op::DeadLetter { i, d } => {
                if let Some(id) = model.nth(i) {
                    let dest = DESTS[usize::from(d)];
                    let settled = store.dead_letter_block(dest, id, cap).unwrap();
                    if model.blocks[&id].owed.contains(&dest) {
                        assert!(settled.is_some());
                        model.settle(id, dest, Some("unshippable"));
                    } else {
                        assert_eq!(settled, None, "{dest} does not owe block {id}");
                    }
                }
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(&path, SyncLevel::Off).unwrap().0;
            }
        }
        check(&store, &model);
        // Every pending record is there, byte for byte.
        for (id, b) in &model.blocks {
            let (meta, raw) = store.read_block(*id).unwrap().expect("pending block");
            let got = crate::frame::decode_records_in(&raw, meta.records, meta.version).unwrap();
            let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|r| (r.seq, r.payload)).collect();
            assert_eq!(got, b.records, "block {id}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "proptest-regressions/spool/model.txt"
            )
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_spool_matches_its_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
