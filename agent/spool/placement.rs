//! Where a commit's records go as blocks: one block per route and *bucket*, however many
//! partition keys the records carry, so disk writes and compression do not depend on the
//! number of devices.
//!
//! A bucket is one shard of the route's destination as last learned: the records whose key
//! (its explicit hash key, or the MD5 of its partition key) falls in that shard's hash-key
//! range. The block's key places it with an explicit hash key, the shard's starting hash key,
//! and names the gateway as its partition key; each record keeps its own key in the block's
//! version 2 body, and frames built from such blocks carry them (FORMAT.md, version 2).
//! Destinations whose records each keep their own key (S3 objects, Firehose, Kafka with a
//! record per message) tell one bucket. A route whose destination has told no placement
//! (shards not learned yet, a directory, Kafka frames) stores one block per partition key,
//! as before buckets.
//!
//! Shippers set the placement of their routes; the spool thread reads it once per commit. No
//! I/O, no clock.

use foldhash::HashMap;
use std::sync::{Arc, RwLock};

/// The buckets of one route: its destination's open shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The block key's partition key (Kinesis requires one; the explicit hash key places).
    pub(crate) label: String,
    /// Starting hash keys of the open shards, sorted, the first 0 when they cover the space.
    pub(crate) starts: Arc<[u128]>,
}

impl Placement {
    /// The starting hash key of the bucket holding `hash`.
    fn bucket(&self, hash: u128) -> u128 {
        let i = self.starts.partition_point(|s| *s <= hash);
        // Below the first start (shards that do not cover the space): the first bucket.
        self.starts[i.saturating_sub(1)]
    }

    /// The key of the block that holds records of spooled key `key`, or `None` when the key
    /// does not say where it goes (an explicit hash key that is not a number).
    fn block_key(&self, key: &str) -> Option<String> {
        // One bucket holds every partition key: no MD5 to take (a stream of one shard).
        let hash = if self.starts.len() == 1 && crate::key::split(key).1.is_none() {
            self.starts[0]
        } else {
            crate::key::placement(key)?
        };
        Some(crate::key::spooled(
            self.label.clone(),
            Some(self.bucket(hash)),
        ))
    }
}

/// The placement of each route, shared by the shippers (writers) and the spool thread.
#[derive(Debug, Default)]
pub(crate) struct Placements {
    routes: RwLock<HashMap<String, Placement>>,
}

impl Placements {
    /// Sets (or, with `None`, clears) the placement of `routes`.
    pub(crate) fn set(&self, routes: &[String], placement: Option<&Placement>) {
        let mut map = self.routes.write().unwrap_or_else(|p| p.into_inner());
        for route in routes {
            match placement {
                Some(p) if !p.starts.is_empty() => {
                    map.insert(route.clone(), p.clone());
                }
                _ => {
                    map.remove(route);
                }
            }
        }
    }

    /// What a commit uses: the placements as they are now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            routes: self
                .routes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// The placements one commit groups its records by.
pub(crate) struct Snapshot {
    routes: HashMap<String, Placement>,
}

impl Snapshot {
    /// The key of the block a record of `route` with spooled key `key` goes in: its bucket's,
    /// or its own when the route has no placement.
    pub(crate) fn block_key(&self, route: &str, key: &str) -> String {
        self.routes
            .get(route)
            .and_then(|p| p.block_key(key))
            .unwrap_or_else(|| key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key;

    fn placement(shards: u128) -> Placement {
        let step = u128::MAX / shards;
        Placement {
            label: "gw".into(),
            starts: (0..shards).map(|i| i * step).collect(),
        }
    }

    #[test]
    fn keys_of_one_shard_share_a_block_and_keys_of_others_do_not() {
        let placements = Placements::default();
        placements.set(&["r".to_string()], Some(&placement(4)));
        let snap = placements.snapshot();
        let step = u128::MAX / 4;
        let mut blocks = std::collections::HashSet::new();
        for d in 0..1000 {
            let k = format!("dev-{d}");
            let block_key = snap.block_key("r", &k);
            let (label, hash) = key::split(&block_key);
            assert_eq!(label, "gw");
            // The start of the quarter of the hash space the key's MD5 falls in.
            let expected = (key::hash_key(&k) / step).min(3) * step;
            assert_eq!(hash, Some(expected.to_string().as_str()), "{k}");
            blocks.insert(block_key);
        }
        assert_eq!(blocks.len(), 4, "1,000 keys over 4 shards: 4 blocks");
    }

    #[test]
    fn one_shard_holds_every_key_and_a_key_that_does_not_say_where_keeps_its_own() {
        let placements = Placements::default();
        placements.set(&["r".to_string()], Some(&placement(1)));
        let snap = placements.snapshot();
        for k in ["dev-1", "dev-2", "", "a/b"] {
            assert_eq!(snap.block_key("r", k), "gw\u{0}0", "{k:?}");
        }
        let explicit = key::spooled("dev-1".into(), Some(u128::MAX));
        assert_eq!(snap.block_key("r", &explicit), "gw\u{0}0");
        let unplaceable = "dev-1\u{0}not-a-number";
        assert_eq!(snap.block_key("r", unplaceable), unplaceable);
    }

    #[test]
    fn a_route_without_placement_keeps_a_block_per_key() {
        let placements = Placements::default();
        placements.set(&["r".to_string()], Some(&placement(2)));
        placements.set(&["r".to_string()], None);
        let snap = placements.snapshot();
        assert_eq!(snap.block_key("r", "dev-1"), "dev-1");
        assert_eq!(snap.block_key("other", "dev-1"), "dev-1");
    }

    #[test]
    fn an_explicit_hash_key_places_its_record() {
        let placements = Placements::default();
        placements.set(&["r".to_string()], Some(&placement(2)));
        let snap = placements.snapshot();
        let high = key::spooled("dev-1".into(), Some(u128::MAX - 5));
        let low = key::spooled("dev-1".into(), Some(5));
        assert_eq!(
            key::split(&snap.block_key("r", &high)).1,
            Some((u128::MAX / 2).to_string().as_str())
        );
        assert_eq!(key::split(&snap.block_key("r", &low)).1, Some("0"));
    }
}
