//! The edgeship frame: many records of one route packed into one destination record.
//!
//! FORMAT.md at the repository root is the byte-for-byte specification; this module is its
//! reference implementation and must stay in step with it. Layout, version 1:
//!
//! ```text
//! magic "ESHP" | version u8 = 1 | flags u8 | gateway_len u8 | gateway (UTF-8)
//!   | record_count u32 LE | body_len u32 LE | body
//! body (after zstd, if flag bit 0 is set) = record_count times:
//!   seq varint | ts_ms varint | topic_len varint | topic | payload_len varint | payload
//! ```
//!
//! Decoding never trusts a length: every size is checked against the input and against
//! [`MAX_BODY_BYTES`] before anything is allocated, and corrupt input is an error, never a panic.
//! This module does no I/O. Its children: [`kpl`], the Kinesis Producer Library's aggregated
//! record, and [`encoder`], the one place records become destination records in either
//! format.

pub(crate) mod encoder;
pub mod kpl;

use std::fmt;

pub(crate) const MAGIC: &[u8; 4] = b"ESHP";
pub(crate) const VERSION: u8 = 1;
/// Flag bit 0: the body is one zstd frame (with content checksum).
pub(crate) const FLAG_ZSTD: u8 = 0b0000_0001;
/// Largest uncompressed body a decoder accepts (a 10 MiB Kinesis record at a very high ratio).
pub(crate) const MAX_BODY_BYTES: usize = 256 << 20;
/// Header bytes before the gateway id and after it.
pub(crate) const FIXED_HEADER_BYTES: usize = 4 + 1 + 1 + 1 + 4 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not an edgeship frame (magic bytes missing)")]
    BadMagic,
    #[error("frame version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("frame is truncated: {0}")]
    Truncated(&'static str),
    #[error("frame body of {0} bytes exceeds the {MAX_BODY_BYTES}-byte limit")]
    BodyTooLarge(usize),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("frame body is corrupt: {0}")]
    Corrupt(String),
    #[error("gateway id longer than 255 bytes")]
    GatewayTooLong,
}

/// One record as it travels: the stable id is `gateway:seq`.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub ts_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("seq", &self.seq)
            .field("ts_ms", &self.ts_ms)
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub gateway: String,
    pub records: Vec<Record>,
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, FrameError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(FrameError::Truncated("varint"))?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(FrameError::Corrupt("varint longer than 10 bytes".into()))
}

/// Appends one record to an uncompressed body (also the spool's block encoding).
pub fn encode_record(body: &mut Vec<u8>, seq: u64, ts_ms: u64, topic: &str, payload: &[u8]) {
    put_varint(body, seq);
    put_varint(body, ts_ms);
    put_varint(body, topic.len() as u64);
    body.extend_from_slice(topic.as_bytes());
    put_varint(body, payload.len() as u64);
    body.extend_from_slice(payload);
}

/// Bytes `encode_record` adds for a record, for size accounting without encoding.
pub(crate) fn encoded_record_len(
    seq: u64,
    ts_ms: u64,
    topic_len: usize,
    payload_len: usize,
) -> usize {
    fn vlen(v: u64) -> usize {
        (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
    }
    vlen(seq)
        + vlen(ts_ms)
        + vlen(topic_len as u64)
        + topic_len
        + vlen(payload_len as u64)
        + payload_len
}

/// Parses `count` records from an uncompressed body; the body must end exactly after them.
pub(crate) fn decode_records(body: &[u8], count: u32) -> Result<Vec<Record>, FrameError> {
    // Each record takes at least 4 bytes, so a count larger than that is corrupt before any
    // allocation is sized from it.
    if count as usize > body.len() / 4 + 1 {
        return Err(FrameError::Corrupt(format!(
            "{count} records cannot fit in {} bytes",
            body.len()
        )));
    }
    let mut records = Vec::with_capacity(count as usize);
    let mut pos = 0;
    for _ in 0..count {
        let seq = get_varint(body, &mut pos)?;
        let ts_ms = get_varint(body, &mut pos)?;
        let topic = take(body, &mut pos)?;
        let topic = std::str::from_utf8(topic)
            .map_err(|_| FrameError::Corrupt("topic is not UTF-8".into()))?
            .to_string();
        let payload = take(body, &mut pos)?.to_vec();
        records.push(Record {
            seq,
            ts_ms,
            topic,
            payload,
        });
    }
    if pos != body.len() {
        return Err(FrameError::Corrupt(format!(
            "{} bytes after the last record",
            body.len() - pos
        )));
    }
    Ok(records)
}

fn take<'a>(body: &'a [u8], pos: &mut usize) -> Result<&'a [u8], FrameError> {
    let len = get_varint(body, pos)?;
    let end = pos
        .checked_add(usize::try_from(len).map_err(|_| FrameError::Truncated("field"))?)
        .filter(|end| *end <= body.len())
        .ok_or(FrameError::Truncated("field length beyond the body"))?;
    let slice = &body[*pos..end];
    *pos = end;
    Ok(slice)
}

/// Wraps an uncompressed body of `count` records into a frame. `compressor` is reused across
/// frames (its context is the expensive part); pass `None` for an uncompressed frame.
pub fn encode_frame(
    gateway: &str,
    count: u32,
    body: &[u8],
    compressor: Option<&mut zstd::bulk::Compressor<'_>>,
) -> Result<Vec<u8>, FrameError> {
    if gateway.len() > 255 {
        return Err(FrameError::GatewayTooLong);
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(FIXED_HEADER_BYTES + gateway.len() + body.len() / 4 + 64);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(if compressor.is_some() { FLAG_ZSTD } else { 0 });
    out.push(gateway.len() as u8);
    out.extend_from_slice(gateway.as_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    match compressor {
        Some(c) => {
            let compressed = c
                .compress(body)
                .map_err(|e| FrameError::Zstd(e.to_string()))?;
            out.extend_from_slice(&compressed);
        }
        None => out.extend_from_slice(body),
    }
    Ok(out)
}

/// A zstd compressor set up the way frames need it (content checksum on).
pub fn frame_compressor(level: i32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.include_checksum(true)?;
    Ok(c)
}

/// Decompresses a zstd frame whose content is exactly `expected_len` bytes, never allocating
/// more than that. The only zstd decoding entry point in the agent.
pub(crate) fn decompress_exact(data: &[u8], expected_len: usize) -> Result<Vec<u8>, FrameError> {
    if expected_len > MAX_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(expected_len));
    }
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| FrameError::Zstd(e.to_string()))?;
    let out = d
        .decompress(data, expected_len)
        .map_err(|e| FrameError::Zstd(e.to_string()))?;
    if out.len() != expected_len {
        return Err(FrameError::Corrupt(format!(
            "body decompressed to {} bytes, header says {expected_len}",
            out.len()
        )));
    }
    Ok(out)
}

/// Decodes a whole frame, checking every length.
pub fn decode_frame(data: &[u8]) -> Result<Frame, FrameError> {
    if data.len() < 4 || &data[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if data.len() < 7 {
        return Err(FrameError::Truncated("header"));
    }
    let version = data[4];
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let flags = data[5];
    if flags & !FLAG_ZSTD != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let gw_len = data[6] as usize;
    let mut pos = 7;
    let gateway = data
        .get(pos..pos + gw_len)
        .ok_or(FrameError::Truncated("gateway id"))?;
    let gateway = std::str::from_utf8(gateway)
        .map_err(|_| FrameError::Corrupt("gateway id is not UTF-8".into()))?
        .to_string();
    pos += gw_len;
    let fixed = data
        .get(pos..pos + 8)
        .ok_or(FrameError::Truncated("counts"))?;
    let count = u32::from_le_bytes(fixed[..4].try_into().expect("4 bytes"));
    let body_len = u32::from_le_bytes(fixed[4..].try_into().expect("4 bytes")) as usize;
    pos += 8;
    let rest = &data[pos..];
    let records = if flags & FLAG_ZSTD != 0 {
        let body = decompress_exact(rest, body_len)?;
        decode_records(&body, count)?
    } else {
        if rest.len() != body_len {
            return Err(FrameError::Truncated("body"));
        }
        decode_records(rest, count)?
    };
    Ok(Frame { gateway, records })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                seq: 1_000 + i,
                ts_ms: 1_764_000_000_000 + i,
                topic: format!("devices/d{}/telemetry", i % 7),
                payload: format!("{{\"t\":{i},\"v\":21.5}}").into_bytes(),
            })
            .collect()
    }

    fn body_of(records: &[Record]) -> Vec<u8> {
        let mut body = Vec::new();
        for r in records {
            encode_record(&mut body, r.seq, r.ts_ms, &r.topic, &r.payload);
            assert_eq!(
                encoded_record_len(r.seq, r.ts_ms, r.topic.len(), r.payload.len()),
                {
                    let mut one = Vec::new();
                    encode_record(&mut one, r.seq, r.ts_ms, &r.topic, &r.payload);
                    one.len()
                }
            );
        }
        body
    }

    #[test]
    fn round_trip_compressed_and_plain() {
        let records = sample(500);
        let body = body_of(&records);
        let mut c = frame_compressor(3).unwrap();
        for compressor in [Some(&mut c), None] {
            let bytes = encode_frame("gw-1", 500, &body, compressor).unwrap();
            let frame = decode_frame(&bytes).unwrap();
            assert_eq!(frame.gateway, "gw-1");
            assert_eq!(frame.records, records);
        }
    }

    #[test]
    fn binary_and_empty_payloads_survive() {
        let records = vec![
            Record {
                seq: 0,
                ts_ms: 0,
                topic: String::new(),
                payload: vec![],
            },
            Record {
                seq: u64::MAX,
                ts_ms: u64::MAX,
                topic: "t".into(),
                payload: vec![0xff, 0x00, 0xfe],
            },
        ];
        let body = body_of(&records);
        let bytes = encode_frame("g", 2, &body, Some(&mut frame_compressor(1).unwrap())).unwrap();
        assert_eq!(decode_frame(&bytes).unwrap().records, records);
    }

    #[test]
    fn corrupt_input_is_refused_without_panicking() {
        let body = body_of(&sample(50));
        let good = encode_frame("gw", 50, &body, Some(&mut frame_compressor(3).unwrap())).unwrap();
        assert_eq!(decode_frame(b"nope"), Err(FrameError::BadMagic));
        // Every truncation and every single-byte flip is an error or a clean decode, never a panic.
        for cut in 0..good.len() {
            assert!(
                decode_frame(&good[..cut]).is_err(),
                "truncated at {cut} decoded"
            );
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            let _ = decode_frame(&bad);
        }
        // A body flip is caught by the zstd checksum.
        let mut bad = good.clone();
        let last = bad.len() - 6;
        bad[last] ^= 1;
        assert!(decode_frame(&bad).is_err());
        // A lying count or length cannot make the decoder allocate.
        let mut huge = good.clone();
        let len_at = FIXED_HEADER_BYTES - 4 + 2;
        huge[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&huge),
            Err(FrameError::BodyTooLarge(_))
        ));
        let mut version = good;
        version[4] = 9;
        assert_eq!(
            decode_frame(&version),
            Err(FrameError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn varints_use_the_full_range() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
    }
}

#[cfg(test)]
mod format_doc {
    /// The worked example in FORMAT.md, byte for byte.
    #[test]
    fn the_documented_example_decodes() {
        let bytes = [
            0x45, 0x53, 0x48, 0x50, 0x01, 0x00, 0x02, 0x67, 0x77, 0x01, 0x00, 0x00, 0x00, 0x09,
            0x00, 0x00, 0x00, 0x05, 0x09, 0x03, 0x61, 0x2f, 0x62, 0x02, 0x7b, 0x7d,
        ];
        let f = super::decode_frame(&bytes).unwrap();
        assert_eq!(f.gateway, "gw");
        assert_eq!(f.records.len(), 1);
        assert_eq!((f.records[0].seq, f.records[0].ts_ms), (5, 9));
        assert_eq!(f.records[0].topic, "a/b");
        assert_eq!(f.records[0].payload, b"{}");
        let mut body = Vec::new();
        super::encode_record(&mut body, 5, 9, "a/b", b"{}");
        assert_eq!(super::encode_frame("gw", 1, &body, None).unwrap(), bytes);
    }
}
