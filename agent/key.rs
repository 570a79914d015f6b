//! A record's key as the spool keeps it: the partition key its route rendered, and the
//! explicit hash key when the route sets one, in one string (`"<partition key>\0<decimal hash
//! key>"`; MQTT topics and config templates cannot hold NUL).
//!
//! Also the one hash every part agrees on: Kinesis maps a partition key to a shard by the MD5
//! of its bytes read as a 128-bit big-endian integer. Pure functions over strings.

/// Separates a spooled key's partition key from its explicit hash key.
const HASH_KEY_SEPARATOR: char = '\0';

/// The hash key Kinesis derives from a partition key.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(md5::compute(partition_key.as_bytes()).0)
}

/// The explicit hash key a rendered template stands for: a decimal as written, else the MD5
/// of the text (as Kinesis hashes partition keys).
pub(crate) fn hash_key_of(rendered: &str) -> u128 {
    rendered
        .parse::<u128>()
        .unwrap_or_else(|_| hash_key(rendered))
}

/// The spooled key of a partition key and an optional explicit hash key.
pub(crate) fn spooled(mut partition_key: String, explicit_hash_key: Option<u128>) -> String {
    if let Some(hash) = explicit_hash_key {
        partition_key.push(HASH_KEY_SEPARATOR);
        partition_key.push_str(&hash.to_string());
    }
    partition_key
}

/// (partition key, explicit hash key) of a spooled key.
pub fn split(key: &str) -> (&str, Option<&str>) {
    match key.split_once(HASH_KEY_SEPARATOR) {
        Some((pk, hk)) => (pk, Some(hk)),
        None => (key, None),
    }
}

/// The hash key that places a spooled key: its explicit hash key if it has one, else the MD5
/// of its partition key.
pub(crate) fn placement(key: &str) -> Option<u128> {
    match split(key) {
        (_, Some(hash)) => hash.parse().ok(),
        (pk, None) => Some(hash_key(pk)),
    }
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
    fn spooled_keys_split_back() {
        let k = spooled("gw".into(), Some(42));
        assert_eq!(split(&k), ("gw", Some("42")));
        assert_eq!(placement(&k), Some(42));
        assert_eq!(split("dev-1"), ("dev-1", None));
        assert_eq!(placement("dev-1"), Some(hash_key("dev-1")));
        assert_eq!(hash_key_of("7"), 7);
        assert_eq!(hash_key_of("a7"), hash_key("a7"));
    }
}
