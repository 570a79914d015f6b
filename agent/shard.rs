//! Which Kinesis shard a partition key lands on: the MD5 of the key, read as a 128-bit
//! unsigned big-endian integer, falls in exactly one open shard's hash-key range (as
//! ListShards reports them, decimal strings). Pure lookup; learning and refreshing the ranges
//! belongs to the Kinesis sink.

/// The hash key Kinesis derives from a partition key.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(md5::compute(partition_key.as_bytes()).0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// (starting hash key, ending hash key inclusive, shard id), sorted by start, disjoint.
    ranges: Vec<(u128, u128, std::sync::Arc<str>)>,
}

impl ShardMap {
    /// Builds the map from open shards' (id, starting hash key, ending hash key).
    pub fn new<'a>(
        shards: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Result<ShardMap, String> {
        let mut ranges = Vec::new();
        for (id, start, end) in shards {
            let parse = |s: &str| {
                s.parse::<u128>()
                    .map_err(|_| format!("shard {id}: hash key `{s}` is not a 128-bit integer"))
            };
            let (start, end) = (parse(start)?, parse(end)?);
            if start > end {
                return Err(format!("shard {id}: range starts after it ends"));
            }
            ranges.push((start, end, std::sync::Arc::from(id)));
        }
        ranges.sort_by_key(|r| r.0);
        if ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return Err("shard hash-key ranges overlap".into());
        }
        Ok(ShardMap { ranges })
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The shard holding `hash`, if any open shard covers it.
    pub fn shard_for_hash(&self, hash: u128) -> Option<&str> {
        let i = self.ranges.partition_point(|r| r.0 <= hash);
        let (_, end, id) = self.ranges.get(i.checked_sub(1)?)?;
        (hash <= *end).then_some(id.as_ref())
    }

    pub fn shard_for(&self, partition_key: &str) -> Option<&str> {
        self.shard_for_hash(hash_key(partition_key))
    }

    /// The shard id for a partition key, shared (for metric labels and outcomes).
    pub fn shard_id_for(&self, partition_key: &str) -> Option<std::sync::Arc<str>> {
        self.shard_id_for_hash(hash_key(partition_key))
    }

    /// The shard of a spooled key: its explicit hash key if it has one, else the MD5 of its
    /// partition key.
    pub fn shard_id_for_spooled(&self, key: &str) -> Option<std::sync::Arc<str>> {
        match crate::sink::split_key(key) {
            (_, Some(hash)) => self.shard_id_for_hash(hash.parse().ok()?),
            (pk, None) => self.shard_id_for(pk),
        }
    }

    pub fn shard_id_for_hash(&self, hash: u128) -> Option<std::sync::Arc<str>> {
        let i = self.ranges.partition_point(|r| r.0 <= hash);
        let (_, end, id) = self.ranges.get(i.checked_sub(1)?)?;
        (hash <= *end).then(|| id.clone())
    }

    /// True if `shard_id` is one of the open shards this map was built from.
    pub fn contains(&self, shard_id: &str) -> bool {
        self.ranges.iter().any(|(_, _, id)| id.as_ref() == shard_id)
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
    fn md5_hash_key_matches_the_reference() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }

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
