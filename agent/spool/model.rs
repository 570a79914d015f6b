//! The spool file against a model: random sequences of appends, leases, deliveries, failed
//! sends, `drop_oldest` evictions, corrupt blocks, splits, dead letters and reopenings, each
//! checked after every step against a plain in-memory model of what must be there.
//!
//! At every step: `received = delivered + dropped + pending`, each term equal to the model's;
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
    /// Lease everything and compare with the model.
    Lease,
    /// The destination accepted the `i`-th pending block (modulo their number).
    Deliver { i: u8 },
    /// A send failed: nothing changes.
    Fail,
    /// `drop_oldest` evicts the oldest block not in flight; the `i`-th is in flight.
    DropOldest { in_flight: u8 },
    /// The `i`-th pending block's data is damaged, then read: quarantined.
    Corrupt { i: u8 },
    /// The `i`-th pending block is split in halves.
    Split { i: u8 },
    /// The `i`-th pending block cannot be shipped: its records become dead letters.
    DeadLetter { i: u8 },
    /// The spool is closed and opened again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..2, 1u8..6).prop_map(|(r, n)| Op::Append { r, n }),
        1 => Just(Op::Lease),
        3 => any::<u8>().prop_map(|i| Op::Deliver { i }),
        1 => Just(Op::Fail),
        1 => any::<u8>().prop_map(|in_flight| Op::DropOldest { in_flight }),
        1 => any::<u8>().prop_map(|i| Op::Corrupt { i }),
        1 => any::<u8>().prop_map(|i| Op::Split { i }),
        1 => any::<u8>().prop_map(|i| Op::DeadLetter { i }),
        1 => Just(Op::Reopen),
    ]
}

/// A block's route and records (each its seq and payload).
type ModelBlock = (String, Vec<(u64, Vec<u8>)>);

/// What must be in the spool: pending blocks by id.
#[derive(Default)]
struct Model {
    blocks: BTreeMap<i64, ModelBlock>,
    received: u64,
    delivered: u64,
    dropped: BTreeMap<&'static str, u64>,
    delivered_seqs: HashSet<u64>,
    highest_seq: u64,
}

impl Model {
    fn pending(&self) -> u64 {
        self.blocks.values().map(|(_, r)| r.len() as u64).sum()
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

    fn drop_block(&mut self, id: i64, reason: &'static str) {
        let (_, records) = self.blocks.remove(&id).expect("model block");
        *self.dropped.entry(reason).or_default() += records.len() as u64;
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
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let (mut store, _) = Store::open(&path, SyncLevel::Off).unwrap();
    let mut model = Model::default();
    let mut body = Vec::new();
    let mut counter = 0u32;
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
                let records = payloads
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| (first + i as u64, p))
                    .collect();
                model.blocks.insert(meta.id, (route, records));
            }
            Op::Lease => {
                let routes = vec!["r0".to_string(), "r1".to_string()];
                let listed: Vec<i64> = store
                    .list_blocks("", 0, &routes, 10_000, |_| false)
                    .unwrap()
                    .iter()
                    .map(|m: &BlockMeta| m.id)
                    .collect();
                assert_eq!(listed, model.blocks.keys().copied().collect::<Vec<_>>());
            }
            Op::Deliver { i } => {
                if let Some(id) = model.nth(i) {
                    store.begin().unwrap();
                    let removed = store.deliver_block("", id).unwrap();
                    store.commit().unwrap();
                    let (_, records) = model.blocks.remove(&id).unwrap();
                    assert_eq!(removed.map(|r| r.records as usize), Some(records.len()));
                    for (seq, _) in records {
                        assert!(
                            model.delivered_seqs.insert(seq),
                            "seq {seq} delivered twice"
                        );
                        model.delivered += 1;
                    }
                    // Reported delivered again (a late duplicate report): nothing changes.
                    store.begin().unwrap();
                    assert_eq!(store.deliver_block("", id).unwrap(), None);
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
                    (Some(_), Some(id)) => model.drop_block(id, "spool_full"),
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
                    let (route, records) = model.blocks.remove(&id).unwrap();
                    let mut left = records.as_slice();
                    for p in &parts {
                        let (mine, rest) = left.split_at(p.records as usize);
                        assert_eq!(p.id as u64, mine[0].0, "a part starts at its first seq");
                        model.blocks.insert(p.id, (route.clone(), mine.to_vec()));
                        left = rest;
                    }
                    assert!(left.is_empty(), "every record in a part");
                }
            }
            Op::DeadLetter { i } => {
                if let Some(id) = model.nth(i) {
                    store
                        .dead_letter_block(
                            "",
                            id,
                            super::store::DeadLetterCap {
                                records: 1_000,
                                bytes: 1 << 20,
                            },
                        )
                        .unwrap();
                    model.drop_block(id, "unshippable");
                }
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(&path, SyncLevel::Off).unwrap().0;
            }
        }
        check(&store, &model);
        // Every pending record is there, byte for byte.
        for (id, (_, records)) in &model.blocks {
            let (meta, raw) = store.read_block(*id).unwrap().expect("pending block");
            let got = crate::frame::decode_records_in(&raw, meta.records, meta.version).unwrap();
            let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|r| (r.seq, r.payload)).collect();
            assert_eq!(&got, records, "block {id}");
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
