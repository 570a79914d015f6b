//! Which Kinesis shard a key lands on: its hash key (the explicit one, or the MD5 of the
//! partition key, see [`crate::key`]) falls in exactly one open shard's hash-key range (as
//! ListShards reports them, decimal strings). Pure lookup; learning and refreshing the ranges
//! belongs to the Kinesis sink.

use crate::key::hash_key;

/// Shard ranges that cannot be a stream's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardMapError {
    #[error("shard {id}: hash key `{key}` is not a 128-bit integer")]
    BadHashKey { id: String, key: String },
    #[error("shard {id}: its range starts after it ends")]
    Reversed { id: String },
    #[error("shard hash-key ranges overlap")]
    Overlap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// (starting hash key, ending hash key inclusive, shard id), sorted by start, disjoint.
    ranges: Vec<(u128, u128, std::sync::Arc<str>)>,
    /// The starting hash keys alone, for the spool's placement.
    starts: std::sync::Arc<[u128]>,
}

impl ShardMap {
    /// Builds the map from open shards' (id, starting hash key, ending hash key).
    pub fn new<'a>(
        shards: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Result<ShardMap, ShardMapError> {
        let mut ranges = Vec::new();
        for (id, start, end) in shards {
            let parse = |s: &str| {
                s.parse::<u128>().map_err(|_| ShardMapError::BadHashKey {
                    id: id.to_string(),
                    key: s.to_string(),
                })
            };
            let (start, end) = (parse(start)?, parse(end)?);
            if start > end {
                return Err(ShardMapError::Reversed { id: id.to_string() });
            }
            ranges.push((start, end, std::sync::Arc::from(id)));
        }
        ranges.sort_by_key(|r| r.0);
        if ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return Err(ShardMapError::Overlap);
        }
        let starts = ranges.iter().map(|r| r.0).collect();
        Ok(ShardMap { ranges, starts })
    }

    /// The open shards' starting hash keys, sorted (the same `Arc` for the map's life).
    pub(crate) fn starts(&self) -> std::sync::Arc<[u128]> {
        self.starts.clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The shard holding `hash`, if any open shard covers it.
    pub(crate) fn shard_for_hash(&self, hash: u128) -> Option<&str> {
        let i = self.ranges.partition_point(|r| r.0 <= hash);
        let (_, end, id) = self.ranges.get(i.checked_sub(1)?)?;
        (hash <= *end).then_some(id.as_ref())
    }

    pub fn shard_for(&self, partition_key: &str) -> Option<&str> {
        self.shard_for_hash(hash_key(partition_key))
    }

    /// The shard of a spooled key: its explicit hash key if it has one, else the MD5 of its
    /// partition key.
    pub(crate) fn shard_id_for_spooled(&self, key: &str) -> Option<std::sync::Arc<str>> {
        self.shard_id_for_hash(crate::key::placement(key)?)
    }

    pub fn shard_id_for_hash(&self, hash: u128) -> Option<std::sync::Arc<str>> {
        let i = self.ranges.partition_point(|r| r.0 <= hash);
        let (_, end, id) = self.ranges.get(i.checked_sub(1)?)?;
        (hash <= *end).then(|| id.clone())
    }
}

/// `n` equal ranges over the whole hash-key space, as a stream created with `n` shards has.
pub fn even_ranges(n: u32) -> Vec<(String, String, String)> {
    let step = u128::MAX / u128::from(n.max(1));
    (0..n)
        .map(|i| {
            let start = step * u128::from(i);
            let end = if i + 1 == n {
                u128::MAX
            } else {
                step * u128::from(i + 1) - 1
            };
            (
                format!("shardId-{i:012}"),
                start.to_string(),
                end.to_string(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_the_shard_whose_range_holds_them() {
        let ranges = even_ranges(4);
        let map = ShardMap::new(
            ranges
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
        )
        .unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!(map.shard_for_hash(0), Some("shardId-000000000000"));
        assert_eq!(map.shard_for_hash(u128::MAX), Some("shardId-000000000003"));
        assert_eq!(
            map.shard_for_hash(u128::MAX / 4),
            Some("shardId-000000000001")
        );
        assert_eq!(
            map.shard_for_hash(u128::MAX / 4 - 1),
            Some("shardId-000000000000")
        );
        // "" hashes to 0xd41d..., in the last quarter.
        assert_eq!(map.shard_for(""), Some("shardId-000000000003"));
    }

    #[test]
    fn gaps_and_overlaps_are_handled() {
        let map = ShardMap::new([("a", "0", "9"), ("b", "20", "29")]).unwrap();
        assert_eq!(map.shard_for_hash(15), None);
        assert_eq!(map.shard_for_hash(29), Some("b"));
        assert_eq!(map.shard_for_hash(30), None);
        assert!(ShardMap::new([("a", "0", "10"), ("b", "10", "20")]).is_err());
        assert!(ShardMap::new([("a", "x", "10")]).is_err());
    }
}
