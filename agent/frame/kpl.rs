//! The Kinesis Producer Library's aggregated record format, for routes with `format = "kpl"`:
//! one Kinesis record carries many user records, and the KCL, the Lambda deaggregation modules
//! (`aws-kinesis-agg` for Python, Node.js, Java) and Firehose's deaggregation read them as the
//! device payloads they are.
//!
//! Layout: the magic `F3 89 9A C2`, a protobuf `AggregatedRecord`, and the MD5 of the protobuf
//! bytes. The protobuf is written by hand (three small messages):
//!
//! ```text
//! AggregatedRecord { repeated string partition_key_table = 1;
//!                    repeated string explicit_hash_key_table = 2;
//!                    repeated Record records = 3; }
//! Record           { required uint64 partition_key_index = 1;
//!                    optional uint64 explicit_hash_key_index = 2;
//!                    required bytes data = 3;
//!                    repeated Tag tags = 4; }
//! Tag              { required string key = 1; optional string value = 2; }
//! ```
//!
//! Each user record has its own partition key (and explicit hash key, if its route sets one):
//! an aggregate holds the records of one shard, of many keys, and the KCL's shard filter after
//! a reshard judges each by its own. The
//! data is the MQTT payload unchanged; the record id (`<gateway>:<seq>`), topic and receipt time
//! travel as tags `id`, `topic`, `ts_ms`, for consumers that read them.
//!
//! This module only encodes and decodes bytes; it never compresses (the format has no
//! compression: PUT payload units are those of the raw payloads).

use crate::frame::Record;

pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// A length-delimited field: tag, length, bytes.
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn bytes_field_len(field: u32, len: usize) -> usize {
    varint_len(u64::from(field << 3 | 2)) + varint_len(len as u64) + len
}

fn tag_len(key: &str, value: &str) -> usize {
    bytes_field_len(1, key.len()) + bytes_field_len(2, value.len())
}

/// Encodes `records` as an aggregated record into `out` (cleared first). Each user record
/// has its own key (a record's spooled key, see [`crate::key`]) when it carries one, else
/// `partition_key` and `explicit_hash_key` (the frame's): the KCL filters user records by
/// their own key after a reshard, so each must be the one its route gave it.
pub(crate) fn encode(
    gateway: &str,
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    records: &[Record],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    let start = out.len();
    // The key tables, in order of first use, and each record's indexes into them.
    let mut pks: Vec<&str> = Vec::new();
    let mut hks: Vec<&str> = Vec::new();
    let mut pk_index: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut hk_index: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut indexes: Vec<(u64, Option<u64>)> = Vec::with_capacity(records.len());
    for r in records {
        let (pk, hk) = if r.key.is_empty() {
            (partition_key, explicit_hash_key)
        } else {
            crate::key::split(&r.key)
        };
        let p = *pk_index.entry(pk).or_insert_with(|| {
            pks.push(pk);
            pks.len() as u64 - 1
        });
        let h = hk.map(|hk| {
            *hk_index.entry(hk).or_insert_with(|| {
                hks.push(hk);
                hks.len() as u64 - 1
            })
        });
        indexes.push((p, h));
    }
    for pk in &pks {
        bytes_field(out, 1, pk.as_bytes());
    }
    for hk in &hks {
        bytes_field(out, 2, hk.as_bytes());
    }
    let mut id = String::new();
    let mut ts = String::new();
    let mut index_bytes = Vec::with_capacity(24);
    for (r, (p, h)) in records.iter().zip(indexes) {
        use std::fmt::Write;
        id.clear();
        let _ = write!(id, "{gateway}:{}", r.seq);
        ts.clear();
        let _ = write!(ts, "{}", r.ts_ms);
        let tags = [
            ("id", id.as_str()),
            ("topic", r.topic.as_str()),
            ("ts_ms", ts.as_str()),
        ];
        // Key indexes: partition key (field 1), explicit hash key (field 2) if any.
        index_bytes.clear();
        varint(&mut index_bytes, 1 << 3);
        varint(&mut index_bytes, p);
        if let Some(h) = h {
            varint(&mut index_bytes, 2 << 3);
            varint(&mut index_bytes, h);
        }
        // Record: key indexes (varints), data (field 3), tags (field 4).
        let mut len = index_bytes.len() + bytes_field_len(3, r.payload.len());
        for (k, v) in tags {
            len += bytes_field_len(4, tag_len(k, v));
        }
        varint(out, u64::from(3u32 << 3 | 2));
        varint(out, len as u64);
        out.extend_from_slice(&index_bytes);
        bytes_field(out, 3, &r.payload);
        for (k, v) in tags {
            varint(out, u64::from(4u32 << 3 | 2));
            varint(out, tag_len(k, v) as u64);
            bytes_field(out, 1, k.as_bytes());
            bytes_field(out, 2, v.as_bytes());
        }
    }
    let digest = md5::compute(&out[start..]);
    out.extend_from_slice(&digest.0);
}

/// One user record read back from an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
    pub tags: Vec<(String, String)>,
}

/// Why bytes are not a KPL aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KPL aggregate: {0}")]
pub struct KplError(&'static str);

fn read_varint(data: &[u8], at: &mut usize) -> Result<u64, KplError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*at).ok_or(KplError("truncated varint"))?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(KplError("varint longer than 10 bytes"))
}

/// One protobuf field: its number, its varint value (or length), its bytes (if delimited).
type Field<'a> = (u32, u64, &'a [u8]);

/// Walks the fields of one protobuf message.
fn fields(data: &[u8]) -> Result<Vec<Field<'_>>, KplError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let key = read_varint(data, &mut at)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => out.push((field, read_varint(data, &mut at)?, &data[0..0])),
            2 => {
                let len = read_varint(data, &mut at)? as usize;
                let end = at.checked_add(len).filter(|e| *e <= data.len());
                let end = end.ok_or(KplError("length-delimited field runs past the end"))?;
                out.push((field, len as u64, &data[at..end]));
                at = end;
            }
            _ => return Err(KplError("unexpected protobuf wire type")),
        }
    }
    Ok(out)
}

fn utf8(b: &[u8]) -> Result<String, KplError> {
    String::from_utf8(b.to_vec()).map_err(|_| KplError("string field is not UTF-8"))
}

/// Reads an aggregate (checking the magic and the MD5); for tests and `edgeship decode`.
pub fn decode(data: &[u8]) -> Result<Vec<UserRecord>, KplError> {
    let body = data
        .strip_prefix(&MAGIC)
        .ok_or(KplError("not a KPL aggregate (magic)"))?;
    if body.len() < 16 {
        return Err(KplError("too short for its MD5"));
    }
    let (message, digest) = body.split_at(body.len() - 16);
    if md5::compute(message).0 != digest {
        return Err(KplError("MD5 does not match"));
    }
    let mut keys = Vec::new();
    let mut hash_keys = Vec::new();
    let mut records = Vec::new();
    for (field, _, bytes) in fields(message)? {
        match field {
            1 => keys.push(utf8(bytes)?),
            2 => hash_keys.push(utf8(bytes)?),
            3 => records.push(bytes),
            _ => {}
        }
    }
    records
        .into_iter()
        .map(|r| {
            let mut key_index = None;
            let mut hash_index = None;
            let mut data = None;
            let mut tags = Vec::new();
            for (field, value, bytes) in fields(r)? {
                match field {
                    1 => key_index = Some(value as usize),
                    2 => hash_index = Some(value as usize),
                    3 => data = Some(bytes.to_vec()),
                    4 => {
                        let mut tag = (String::new(), String::new());
                        for (f, _, b) in fields(bytes)? {
                            match f {
                                1 => tag.0 = utf8(b)?,
                                2 => tag.1 = utf8(b)?,
                                _ => {}
                            }
                        }
                        tags.push(tag);
                    }
                    _ => {}
                }
            }
            let index = key_index.ok_or(KplError("user record without partition_key_index"))?;
            Ok(UserRecord {
                partition_key: keys
                    .get(index)
                    .ok_or(KplError("partition key index out of range"))?
                    .clone(),
                explicit_hash_key: match hash_index {
                    Some(i) => Some(
                        hash_keys
                            .get(i)
                            .ok_or(KplError("explicit hash key index out of range"))?
                            .clone(),
                    ),
                    None => None,
                },
                data: data.ok_or(KplError("user record without data"))?,
                tags,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, payload: &[u8]) -> Record {
        Record {
            seq,
            ts_ms: 1_700_000_000_000 + seq,
            key: String::new(),
            topic: format!("devices/d{seq}/telemetry"),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn aggregates_round_trip_with_tags() {
        let big = vec![0xabu8; 300];
        let records = vec![record(1, b"{\"t\":1}"), record(2, &[]), record(300, &big)];
        let mut out = Vec::new();
        encode("gw-1", "key-7", None, &records, &mut out);
        assert_eq!(&out[..4], &MAGIC);
        let back = decode(&out).unwrap();
        assert_eq!(back.len(), 3);
        encode("gw-1", "key-7", Some("42"), &records, &mut out);
        let hashed = decode(&out).unwrap();
        assert!(hashed
            .iter()
            .all(|u| u.explicit_hash_key.as_deref() == Some("42") && u.partition_key == "key-7"));
        for (r, u) in records.iter().zip(&back) {
            assert_eq!(u.partition_key, "key-7");
            assert_eq!(u.explicit_hash_key, None);
            assert_eq!(u.data, r.payload);
            assert_eq!(
                u.tags,
                vec![
                    ("id".to_string(), format!("gw-1:{}", r.seq)),
                    ("topic".to_string(), r.topic.clone()),
                    ("ts_ms".to_string(), r.ts_ms.to_string()),
                ]
            );
        }
    }

    #[test]
    fn a_damaged_aggregate_is_refused() {
        let mut out = Vec::new();
        encode("gw", "k", None, &[record(1, b"x")], &mut out);
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(decode(&out[..out.len() - 1]).is_err());
    }
}
