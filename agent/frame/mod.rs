//! The edgeship frame: many records of one route packed into one destination record.
//!
//! FORMAT.md at the repository root is the byte-for-byte specification; this module is its
//! reference implementation and must stay in step with it. Layout:
//!
//! ```text
//! magic "ESHP" | version u8 (1 or 2) | flags u8 | gateway_len u8 | gateway (UTF-8)
//!   | record_count u32 LE | body_len u32 LE | body
//! body (after zstd, if flag bit 0 is set) = record_count times, version 1:
//!   seq varint | ts_ms varint | topic_len varint | topic | payload_len varint | payload
//! version 2 adds each record's partition key after ts_ms:
//!   seq varint | ts_ms varint | key_len varint | key | topic_len varint | topic | ...
//! version 3 (what agents write) keeps version 2's fields in two sections, each its own zstd
//! frame when compressed:
//!   index_len u32 LE | index_stored_len u32 LE | index | payloads
//!   index = record_count times: seq delta | ts_ms delta (zigzag varints) | key_len | key
//!           | topic_len | topic | payload_len
//!   payloads = every payload back to back, in record order
//! ```
//!
//! Version 1 holds the records of one partition key (the Kinesis record's); version 2 lets
//! one frame carry many keys bound for one shard, each record keeping its own. Version 3 is
//! version 2 laid out for the compressor: ids and times as small deltas, payloads side by
//! side (telemetry compresses to about a fifth less, FORMAT.md says how much).
//!
//! Decoding never trusts a length: every size is checked against the input and against
//! [`MAX_BODY_BYTES`] before anything is allocated, and corrupt input is an error, never a panic.
//! This module does no I/O. Its children: [`kpl`], the Kinesis Producer Library's aggregated
//! record; [`ndjson`], the JSON line of one message; [`messages`], the records as spooled, for
//! destinations that send each message apart; and [`encoder`], the one place records become
//! destination records in any of the formats.

pub(crate) mod encoder;
pub mod kpl;
pub(crate) mod messages;
pub(crate) mod ndjson;

use std::fmt;

pub(crate) const MAGIC: &[u8; 4] = b"ESHP";
/// Frames of one partition key; records without their own key.
pub const VERSION_1: u8 = 1;
/// Frames whose records each carry their partition key.
pub const VERSION_2: u8 = 2;
/// Version 2's records in two sections: an index (ids and times as deltas, keys, topics,
/// payload lengths), then the payloads side by side.
pub const VERSION_3: u8 = 3;
/// A version 3 body's bytes before its sections: the index's length and its stored length.
const V3_PREFIX_BYTES: usize = 8;
/// Flag bit 0: the body is one zstd frame (with content checksum).
pub(crate) const FLAG_ZSTD: u8 = 0b0000_0001;
/// Largest uncompressed body a decoder accepts (a 10 MiB Kinesis record at a very high ratio).
pub(crate) const MAX_BODY_BYTES: usize = 256 << 20;
/// Largest topic or payload a decoder accepts: above any message the agent takes (9 MiB).
pub const MAX_FIELD_BYTES: usize = 16 << 20;
/// Most records [`decode_frame`] collects into memory; [`read_frame`] streams any number.
pub const MAX_COLLECTED_RECORDS: u32 = 1 << 20;
/// A compressed body may claim at most this many times its own size (and 1 MiB whatever
/// its size): memory follows what the input can hold, not what its header says. Real frames
/// stay far below (telemetry: 10 to 50 times).
pub const MAX_EXPANSION: usize = 4096;

/// The largest body a compressed input of `compressed` bytes may claim.
fn max_body_for(compressed: usize) -> usize {
    compressed
        .saturating_mul(MAX_EXPANSION)
        .clamp(1 << 20, MAX_BODY_BYTES)
}
/// Header bytes before the gateway id and after it.
pub(crate) const FIXED_HEADER_BYTES: usize = 4 + 1 + 1 + 1 + 4 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not an edgeship frame (magic bytes missing)")]
    BadMagic,
    #[error("frame version {0} is not supported (this build reads versions 1, 2 and 3)")]
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
    /// Its partition key as the spool keeps it (see [`crate::key`]); empty in a version 1
    /// body, where the frame's (or block's) one key stands for every record.
    pub key: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("seq", &self.seq)
            .field("ts_ms", &self.ts_ms)
            .field("key", &self.key)
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

/// Appends `v` as a LEB128 varint (7 bits a byte, low first).
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Reads a varint of [`put_varint`] at `pos`, moving `pos` past it.
pub(crate) fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, FrameError> {
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

/// Appends one record to an uncompressed version 2 body: as [`encode_record`], with the
/// record's partition key after its time.
pub fn encode_record_v2(
    body: &mut Vec<u8>,
    seq: u64,
    ts_ms: u64,
    key: &str,
    topic: &str,
    payload: &[u8],
) {
    put_varint(body, seq);
    put_varint(body, ts_ms);
    put_varint(body, key.len() as u64);
    body.extend_from_slice(key.as_bytes());
    put_varint(body, topic.len() as u64);
    body.extend_from_slice(topic.as_bytes());
    put_varint(body, payload.len() as u64);
    body.extend_from_slice(payload);
}

/// Appends one record in the body encoding of `version`.
pub fn encode_record_in(body: &mut Vec<u8>, version: u8, r: &Record) {
    match version {
        VERSION_1 => encode_record(body, r.seq, r.ts_ms, &r.topic, &r.payload),
        _ => encode_record_v2(body, r.seq, r.ts_ms, &r.key, &r.topic, &r.payload),
    }
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

/// Parses `count` records from an uncompressed body of `version`; the body must end exactly
/// after them.
pub(crate) fn decode_records_in(
    body: &[u8],
    count: u32,
    version: u8,
) -> Result<Vec<Record>, FrameError> {
    fits(body, count)?;
    // Sized by what the input holds, never by a count from it.
    let mut records = Vec::with_capacity((count as usize).min(body.len() / 4 + 1).min(4096));
    walk_records(body, count, version, |r| {
        records.push(Record {
            seq: r.seq,
            ts_ms: r.ts_ms,
            key: r.key.to_string(),
            topic: r.topic.to_string(),
            payload: r.payload.to_vec(),
        })
    })?;
    Ok(records)
}

/// Checks that an uncompressed body of `version` holds exactly `count` well-formed records,
/// with the errors [`decode_records_in`] gives, without copying any of them.
pub(crate) fn check_records_in(body: &[u8], count: u32, version: u8) -> Result<(), FrameError> {
    fits(body, count)?;
    walk_records(body, count, version, |_| {})
}

/// Each record takes at least 4 bytes, so a count larger than that is corrupt before any
/// allocation is sized from it.
fn fits(body: &[u8], count: u32) -> Result<(), FrameError> {
    if count as usize > body.len() / 4 + 1 {
        return Err(FrameError::Corrupt(format!(
            "{count} records cannot fit in {} bytes",
            body.len()
        )));
    }
    Ok(())
}

/// A record of a body, borrowed from it.
struct RecordRef<'a> {
    seq: u64,
    ts_ms: u64,
    /// Empty in a version 1 body.
    key: &'a str,
    topic: &'a str,
    payload: &'a [u8],
}

/// Hands each of the `count` records of an uncompressed body of `version` to `each`, in
/// order; the body must end exactly after them.
fn walk_records<'a>(
    body: &'a [u8],
    count: u32,
    version: u8,
    mut each: impl FnMut(RecordRef<'a>),
) -> Result<(), FrameError> {
    let mut pos = 0;
    for _ in 0..count {
        let seq = get_varint(body, &mut pos)?;
        let ts_ms = get_varint(body, &mut pos)?;
        let key = if version == VERSION_1 {
            ""
        } else {
            text_at(body, &mut pos, "key")?
        };
        let topic = text_at(body, &mut pos, "topic")?;
        let payload = take(body, &mut pos)?;
        each(RecordRef {
            seq,
            ts_ms,
            key,
            topic,
            payload,
        });
    }
    ends_at(body.len(), pos, "record")
}

/// A length-prefixed UTF-8 field at `pos`.
fn text_at<'a>(body: &'a [u8], pos: &mut usize, what: &str) -> Result<&'a str, FrameError> {
    std::str::from_utf8(take(body, pos)?)
        .map_err(|_| FrameError::Corrupt(format!("{what} is not UTF-8")))
}

/// A section of `len` bytes whose entries ended at `pos` must end there.
fn ends_at(len: usize, pos: usize, after: &str) -> Result<(), FrameError> {
    match len - pos {
        0 => Ok(()),
        left => Err(FrameError::Corrupt(format!(
            "{left} bytes after the last {after}"
        ))),
    }
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

/// A signed value (as two's complement bits) folded so small magnitudes make short varints.
pub(crate) fn zigzag(delta: u64) -> u64 {
    let d = delta as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

pub(crate) fn unzigzag(z: u64) -> u64 {
    ((z >> 1) as i64 ^ -((z & 1) as i64)) as u64
}

/// A version 3 body being built: the index section and the payload section.
#[derive(Debug, Default, Clone)]
pub struct ColumnBody {
    index: Vec<u8>,
    payloads: Vec<u8>,
    records: u32,
    prev_seq: u64,
    prev_ts: u64,
}

impl ColumnBody {
    pub fn clear(&mut self) {
        self.index.clear();
        self.payloads.clear();
        self.records = 0;
        self.prev_seq = 0;
        self.prev_ts = 0;
    }

    pub fn records(&self) -> u32 {
        self.records
    }

    /// Bytes its two sections' buffers hold without growing.
    pub fn capacity(&self) -> usize {
        self.index.capacity() + self.payloads.capacity()
    }

    /// Uncompressed bytes of both sections (the frame header's `body_len`).
    pub fn len(&self) -> usize {
        self.index.len() + self.payloads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Appends one record. Deltas wrap, so any sequence of ids and times encodes.
    pub fn push(&mut self, seq: u64, ts_ms: u64, key: &[u8], topic: &[u8], payload: &[u8]) {
        put_varint(&mut self.index, zigzag(seq.wrapping_sub(self.prev_seq)));
        put_varint(&mut self.index, zigzag(ts_ms.wrapping_sub(self.prev_ts)));
        put_varint(&mut self.index, key.len() as u64);
        self.index.extend_from_slice(key);
        put_varint(&mut self.index, topic.len() as u64);
        self.index.extend_from_slice(topic);
        put_varint(&mut self.index, payload.len() as u64);
        self.payloads.extend_from_slice(payload);
        self.prev_seq = seq;
        self.prev_ts = ts_ms;
        self.records += 1;
    }

    /// Appends the `count` records of an uncompressed body of `version` (1: every record
    /// gets `key`; 2: each keeps its own), without copying them into [`Record`]s first.
    pub fn push_body(
        &mut self,
        body: &[u8],
        count: u32,
        version: u8,
        key: &str,
    ) -> Result<(), FrameError> {
        let mut pos = 0;
        for _ in 0..count {
            let seq = get_varint(body, &mut pos)?;
            let ts_ms = get_varint(body, &mut pos)?;
            let own_key = match version {
                VERSION_1 => key.as_bytes(),
                _ => take(body, &mut pos)?,
            };
            let topic = take(body, &mut pos)?;
            let payload = take(body, &mut pos)?;
            self.push(seq, ts_ms, own_key, topic, payload);
        }
        ends_at(body.len(), pos, "record")
    }
}

/// Parses a version 3 body's sections, uncompressed, into `count` records; each section must
/// end exactly after them.
fn decode_columns(index: &[u8], payloads: &[u8], count: u32) -> Result<Vec<Record>, FrameError> {
    // An index entry takes at least 5 bytes: a count beyond that is corrupt before anything
    // is sized from it.
    if count as usize > index.len() / 5 + 1 {
        return Err(FrameError::Corrupt(format!(
            "{count} records cannot fit in an index of {} bytes",
            index.len()
        )));
    }
    let mut records = Vec::with_capacity((count as usize).min(4096));
    let (mut pos, mut at) = (0, 0);
    let (mut seq, mut ts_ms) = (0u64, 0u64);
    for _ in 0..count {
        seq = seq.wrapping_add(unzigzag(get_varint(index, &mut pos)?));
        ts_ms = ts_ms.wrapping_add(unzigzag(get_varint(index, &mut pos)?));
        let key = text_at(index, &mut pos, "key")?.to_string();
        let topic = text_at(index, &mut pos, "topic")?.to_string();
        let len = usize::try_from(get_varint(index, &mut pos)?)
            .ok()
            .filter(|len| *len <= payloads.len() - at)
            .ok_or(FrameError::Truncated("payload beyond the payload section"))?;
        records.push(Record {
            payload: payloads[at..at + len].to_vec(),
            seq,
            ts_ms,
            key,
            topic,
        });
        at += len;
    }
    ends_at(index.len(), pos, "index entry")?;
    ends_at(payloads.len(), at, "payload")?;
    Ok(records)
}

/// A frame's header, with room reserved for a body of `body_len` bytes (a quarter of them
/// when it is to be compressed).
fn header(
    version: u8,
    compressed: bool,
    gateway: &str,
    count: u32,
    body_len: usize,
) -> Result<Vec<u8>, FrameError> {
    if gateway.len() > 255 {
        return Err(FrameError::GatewayTooLong);
    }
    if body_len > MAX_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(body_len));
    }
    let room = if compressed { body_len / 4 } else { body_len };
    let mut out = Vec::with_capacity(FIXED_HEADER_BYTES + gateway.len() + V3_PREFIX_BYTES + room);
    out.extend_from_slice(MAGIC);
    out.push(version);
    out.push(if compressed { FLAG_ZSTD } else { 0 });
    out.push(gateway.len() as u8);
    out.extend_from_slice(gateway.as_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    Ok(out)
}

/// Wraps a version 3 body into a frame, each section compressed on its own with
/// `compressor` (or stored as it is with `None`).
pub fn encode_frame_v3(
    gateway: &str,
    body: &ColumnBody,
    compressor: Option<&mut zstd::bulk::Compressor<'_>>,
) -> Result<Vec<u8>, FrameError> {
    let mut out = header(
        VERSION_3,
        compressor.is_some(),
        gateway,
        body.records,
        body.len(),
    )?;
    out.extend_from_slice(&(body.index.len() as u32).to_le_bytes());
    match compressor {
        Some(c) => {
            let zstd = |e: std::io::Error| FrameError::Zstd(e.to_string());
            let index = c.compress(&body.index).map_err(zstd)?;
            out.extend_from_slice(&(index.len() as u32).to_le_bytes());
            out.extend_from_slice(&index);
            let payloads = c.compress(&body.payloads).map_err(zstd)?;
            out.extend_from_slice(&payloads);
        }
        None => {
            out.extend_from_slice(&(body.index.len() as u32).to_le_bytes());
            out.extend_from_slice(&body.index);
            out.extend_from_slice(&body.payloads);
        }
    }
    Ok(out)
}

/// Wraps an uncompressed version 1 body of `count` records into a frame. `compressor` is
/// reused across frames (its context is the expensive part); pass `None` for an uncompressed
/// frame.
pub fn encode_frame(
    gateway: &str,
    count: u32,
    body: &[u8],
    compressor: Option<&mut zstd::bulk::Compressor<'_>>,
) -> Result<Vec<u8>, FrameError> {
    encode_frame_in(VERSION_1, gateway, count, body, compressor)
}

/// Wraps an uncompressed body of `version` holding `count` records into a frame.
pub fn encode_frame_in(
    version: u8,
    gateway: &str,
    count: u32,
    body: &[u8],
    compressor: Option<&mut zstd::bulk::Compressor<'_>>,
) -> Result<Vec<u8>, FrameError> {
    let mut out = header(version, compressor.is_some(), gateway, count, body.len())?;
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
/// more than that. With [`decompress_exact_with`], the only zstd decoding entry point in the
/// agent.
pub(crate) fn decompress_exact(data: &[u8], expected_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| FrameError::Zstd(e.to_string()))?;
    decompress_exact_with(&mut d, data, expected_len)
}

/// [`decompress_exact`] with a context its caller keeps (one per call costs its set-up).
pub(crate) fn decompress_exact_with(
    d: &mut zstd::bulk::Decompressor<'static>,
    data: &[u8],
    expected_len: usize,
) -> Result<Vec<u8>, FrameError> {
    if expected_len > MAX_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(expected_len));
    }
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

/// A frame's header, read by [`read_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1: one partition key for the frame; 2: a key per record; 3: version 2 in sections.
    pub version: u8,
    pub gateway: String,
    pub records: u32,
    pub body_len: usize,
    pub compressed: bool,
}

/// Where a frame's body (or one section of it) comes from: the input itself, or a zstd
/// stream over it.
enum Source<'a> {
    Plain(&'a [u8]),
    Zstd(Box<zstd::stream::read::Decoder<'a, std::io::BufReader<&'a [u8]>>>),
}

impl<'a> Source<'a> {
    fn over(stored: &'a [u8], compressed: bool) -> Result<Source<'a>, FrameError> {
        Ok(if compressed {
            Source::Zstd(Box::new(
                zstd::stream::read::Decoder::with_buffer(std::io::BufReader::new(stored))
                    .map_err(|e| FrameError::Zstd(e.to_string()))?,
            ))
        } else {
            Source::Plain(stored)
        })
    }
}

impl std::io::Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Plain(r) => r.read(buf),
            Source::Zstd(d) => d.read(buf),
        }
    }
}

/// One stream of body bytes and how many of them are still to come.
struct Stream<'a> {
    source: Source<'a>,
    left: usize,
}

impl Stream<'_> {
    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), FrameError> {
        if buf.len() > self.left {
            return Err(FrameError::Truncated(what));
        }
        use std::io::Read;
        self.source.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated(what),
            _ => FrameError::Zstd(e.to_string()),
        })?;
        self.left -= buf.len();
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, FrameError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8; 1];
            self.exact(&mut b, "varint")?;
            v |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FrameError::Corrupt("varint longer than 10 bytes".into()))
    }

    /// `len` bytes of a field, checked against what is left and [`MAX_FIELD_BYTES`].
    fn bytes(&mut self, len: u64, what: &'static str) -> Result<Vec<u8>, FrameError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.left)
            .ok_or(FrameError::Truncated("field length beyond the body"))?;
        if len > MAX_FIELD_BYTES {
            return Err(FrameError::Corrupt(format!(
                "a {what} of {len} bytes is over the {MAX_FIELD_BYTES}-byte limit"
            )));
        }
        // Grown as the bytes arrive, never reserved from the claimed length alone.
        let mut out = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            self.exact(&mut chunk[..n], what)?;
            out.extend_from_slice(&chunk[..n]);
            left -= n;
        }
        Ok(out)
    }

    fn field(&mut self, what: &'static str) -> Result<Vec<u8>, FrameError> {
        let len = self.varint()?;
        self.bytes(len, what)
    }

    fn text(&mut self, what: &'static str) -> Result<String, FrameError> {
        String::from_utf8(self.field(what)?)
            .map_err(|_| FrameError::Corrupt(format!("{what} is not UTF-8")))
    }

    /// After the last record: every byte the header announced was read, and the stream ends
    /// there (a zstd stream's checksum verified).
    fn finish(&mut self, after: &str) -> Result<(), FrameError> {
        if self.left != 0 {
            return Err(FrameError::Corrupt(format!(
                "{} bytes after the last {after}",
                self.left
            )));
        }
        use std::io::Read;
        let mut extra = [0u8; 1];
        match self.source.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(FrameError::Corrupt(
                "the body is longer than its header says".into(),
            )),
            Err(e) => Err(FrameError::Zstd(e.to_string())),
        }
    }
}

/// A frame's records, decoded one at a time: memory stays within one record (at most
/// [`MAX_FIELD_BYTES`] per field) whatever the header claims, and a field is only allocated
/// as its bytes actually arrive.
pub struct Records<'a> {
    /// The body (versions 1 and 2) or the index section (version 3).
    body: Stream<'a>,
    /// Version 3's payload section, read alongside its index.
    payloads: Option<Stream<'a>>,
    version: u8,
    /// Records still to come, as the header says.
    left: u32,
    /// Version 3: the previous record's id and time, which the deltas add to.
    seq: u64,
    ts_ms: u64,
    done: bool,
}

impl Records<'_> {
    fn record(&mut self) -> Result<Record, FrameError> {
        let seq = self.body.varint()?;
        let ts_ms = self.body.varint()?;
        let (seq, ts_ms) = match self.version {
            VERSION_3 => {
                self.seq = self.seq.wrapping_add(unzigzag(seq));
                self.ts_ms = self.ts_ms.wrapping_add(unzigzag(ts_ms));
                (self.seq, self.ts_ms)
            }
            _ => (seq, ts_ms),
        };
        let key = match self.version {
            VERSION_1 => String::new(),
            _ => self.body.text("key")?,
        };
        let topic = self.body.text("topic")?;
        let payload = match &mut self.payloads {
            Some(payloads) => {
                let len = self.body.varint()?;
                payloads.bytes(len, "payload")?
            }
            None => self.body.field("payload")?,
        };
        Ok(Record {
            seq,
            ts_ms,
            key,
            topic,
            payload,
        })
    }

    fn finish(&mut self) -> Result<(), FrameError> {
        match &mut self.payloads {
            Some(payloads) => {
                self.body.finish("index entry")?;
                payloads.finish("payload")
            }
            None => self.body.finish("record"),
        }
    }
}

impl Iterator for Records<'_> {
    type Item = Result<Record, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.left == 0 {
            // Once, after the last record.
            self.done = true;
            return self.finish().err().map(Err);
        }
        self.left -= 1;
        let item = self.record();
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }
}

/// A version 3 body's two sections as stored, and the index's uncompressed length.
struct Sections<'a> {
    index_len: usize,
    index: &'a [u8],
    payloads: &'a [u8],
}

fn sections(rest: &[u8], body_len: usize, compressed: bool) -> Result<Sections<'_>, FrameError> {
    let prefix = rest
        .get(..V3_PREFIX_BYTES)
        .ok_or(FrameError::Truncated("section lengths"))?;
    let index_len = u32::from_le_bytes(prefix[..4].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes")) as usize;
    if index_len > body_len {
        return Err(FrameError::Corrupt(format!(
            "an index of {index_len} bytes in a body of {body_len}"
        )));
    }
    if !compressed && stored != index_len {
        return Err(FrameError::Corrupt(format!(
            "an uncompressed index stored in {stored} bytes, {index_len} long"
        )));
    }
    let rest = &rest[V3_PREFIX_BYTES..];
    if stored > rest.len() {
        return Err(FrameError::Truncated("index section"));
    }
    let (index, payloads) = rest.split_at(stored);
    if !compressed && payloads.len() != body_len - index_len {
        return Err(FrameError::Truncated("payload section"));
    }
    Ok(Sections {
        index_len,
        index,
        payloads,
    })
}

/// Reads a frame's header and returns its records as an iterator that decodes (and
/// decompresses) them one at a time, checking every length as it goes.
pub fn read_frame(data: &[u8]) -> Result<(Header, Records<'_>), FrameError> {
    let (header, rest) = read_header(data)?;
    let (body, payloads) = if header.version == VERSION_3 {
        let s = sections(rest, header.body_len, header.compressed)?;
        (
            Stream {
                source: Source::over(s.index, header.compressed)?,
                left: s.index_len,
            },
            Some(Stream {
                source: Source::over(s.payloads, header.compressed)?,
                left: header.body_len - s.index_len,
            }),
        )
    } else {
        if !header.compressed && rest.len() != header.body_len {
            return Err(FrameError::Truncated("body"));
        }
        (
            Stream {
                source: Source::over(rest, header.compressed)?,
                left: header.body_len,
            },
            None,
        )
    };
    let records = Records {
        body,
        payloads,
        version: header.version,
        left: header.records,
        seq: 0,
        ts_ms: 0,
        done: false,
    };
    Ok((header, records))
}

/// Checks a frame's header; returns it and the bytes after it.
fn read_header(data: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    if data.len() < 4 || &data[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if data.len() < 7 {
        return Err(FrameError::Truncated("header"));
    }
    let version = data[4];
    if !(VERSION_1..=VERSION_3).contains(&version) {
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
    if body_len > MAX_BODY_BYTES {
        return Err(FrameError::BodyTooLarge(body_len));
    }
    let rest = &data[pos..];
    let compressed = flags & FLAG_ZSTD != 0;
    if compressed && body_len > max_body_for(rest.len()) {
        return Err(FrameError::Corrupt(format!(
            "a body of {body_len} bytes cannot come from {} compressed bytes (at most {MAX_EXPANSION} times as many)",
            rest.len()
        )));
    }
    Ok((
        Header {
            version,
            gateway,
            records: count,
            body_len,
            compressed,
        },
        rest,
    ))
}

/// Decodes a whole frame into memory, checking every length and the whole body (its zstd
/// checksum) before returning any record; at most [`MAX_COLLECTED_RECORDS`] records (use
/// [`read_frame`] to stream more).
pub fn decode_frame(data: &[u8]) -> Result<Frame, FrameError> {
    let (header, body) = read_header(data)?;
    if header.records > MAX_COLLECTED_RECORDS {
        return Err(FrameError::Corrupt(format!(
            "{} records is more than {MAX_COLLECTED_RECORDS} to hold at once; read it as a stream",
            header.records
        )));
    }
    let records = if header.version == VERSION_3 {
        let s = sections(body, header.body_len, header.compressed)?;
        if header.compressed {
            decode_columns(
                &decompress_exact(s.index, s.index_len)?,
                &decompress_exact(s.payloads, header.body_len - s.index_len)?,
                header.records,
            )?
        } else {
            decode_columns(s.index, s.payloads, header.records)?
        }
    } else if header.compressed {
        decode_records_in(
            &decompress_exact(body, header.body_len)?,
            header.records,
            header.version,
        )?
    } else {
        if body.len() != header.body_len {
            return Err(FrameError::Truncated("body"));
        }
        decode_records_in(body, header.records, header.version)?
    };
    Ok(Frame {
        gateway: header.gateway,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                seq: 1_000 + i,
                ts_ms: 1_764_000_000_000 + i,
                key: String::new(),
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
                key: String::new(),
                topic: String::new(),
                payload: vec![],
            },
            Record {
                seq: u64::MAX,
                ts_ms: u64::MAX,
                key: String::new(),
                topic: "t".into(),
                payload: vec![0xff, 0x00, 0xfe],
            },
        ];
        let body = body_of(&records);
        let bytes = encode_frame("g", 2, &body, Some(&mut frame_compressor(1).unwrap())).unwrap();
        assert_eq!(decode_frame(&bytes).unwrap().records, records);
    }

    /// A frame of `body_len` zero bytes (empty records with seq 0) claiming `count` records.
    fn zeros_frame(body_len: usize, count: u32) -> Vec<u8> {
        use std::io::Write;
        let mut z = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        z.include_checksum(true).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(zeros.len());
            z.write_all(&zeros[..n]).unwrap();
            left -= n;
        }
        let compressed = z.finish().unwrap();
        let mut data = Vec::new();
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&[VERSION_1, FLAG_ZSTD, 2]);
        data.extend_from_slice(b"gw");
        data.extend_from_slice(&count.to_le_bytes());
        data.extend_from_slice(&(body_len as u32).to_le_bytes());
        data.extend_from_slice(&compressed);
        data
    }

    /// 8 KB of zstd that claims 64 million empty records (256 MiB of body): holding them
    /// took gigabytes. Refused at the header, by both decoders, before anything is allocated.
    #[test]
    fn a_decompression_bomb_is_refused_by_what_the_input_can_hold() {
        let data = zeros_frame(256 << 20, 64 << 20);
        assert!(data.len() < 64 << 10, "{}", data.len());
        for e in [
            decode_frame(&data).unwrap_err(),
            read_frame(&data).err().unwrap(),
        ] {
            assert!(e.to_string().contains("cannot come from"), "{e}");
        }
        let too_many = decode_frame(&zeros_frame(4, MAX_COLLECTED_RECORDS + 1)).unwrap_err();
        assert!(
            too_many.to_string().contains("read it as a stream"),
            "{too_many}"
        );
    }

    /// Within bounds, the streaming decoder holds one record at a time.
    #[test]
    fn records_stream_one_at_a_time() {
        let data = zeros_frame(1 << 20, (1 << 20) / 4);
        let (header, records) = read_frame(&data).unwrap();
        assert_eq!(header.records, 1 << 18);
        let mut n = 0;
        for r in records {
            let r = r.unwrap();
            assert!(r.seq == 0 && r.topic.is_empty() && r.payload.is_empty());
            n += 1;
        }
        assert_eq!(n, 1 << 18);
        assert_eq!(decode_frame(&data).unwrap().records.len(), 1 << 18);
    }

    /// A field that claims more than any message can be is refused before its bytes are read.
    #[test]
    fn a_field_claiming_more_than_any_message_is_refused() {
        let mut body = Vec::new();
        put_varint(&mut body, 1);
        put_varint(&mut body, 2);
        put_varint(&mut body, 0);
        put_varint(&mut body, (MAX_FIELD_BYTES + 1) as u64);
        body.resize(body.len() + 64, b'x');
        let mut data = Vec::new();
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&[VERSION_1, 0, 0]);
        data.extend_from_slice(&1u32.to_le_bytes());
        data.extend_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&body);
        assert!(decode_frame(&data).is_err());
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

    /// The spool checks a block's body without decoding it into records: the check and the
    /// decoder agree on every body, sound or damaged, of both versions.
    #[test]
    fn checking_a_body_agrees_with_decoding_it() {
        let v1 = body_of(&sample(20));
        let mut v2 = Vec::new();
        for (i, r) in sample(20).iter().enumerate() {
            let key = format!("gw\u{0}d{}", i % 3);
            encode_record_v2(&mut v2, r.seq, r.ts_ms, &key, &r.topic, &r.payload);
        }
        let mut bodies = 0;
        for (body, version) in [(v1, VERSION_1), (v2, VERSION_2)] {
            let mut damaged = vec![body.clone()];
            damaged.extend((0..body.len()).map(|cut| body[..cut].to_vec()));
            damaged.extend((0..body.len()).map(|i| {
                let mut bad = body.clone();
                bad[i] ^= 0xc5;
                bad
            }));
            for b in &damaged {
                for count in [0, 19, 20, 21, u32::MAX] {
                    let decoded = decode_records_in(b, count, version).map(drop);
                    assert_eq!(check_records_in(b, count, version), decoded);
                    bodies += usize::from(decoded.is_err());
                }
            }
            assert_eq!(check_records_in(&body, 20, version), Ok(()));
        }
        // Most of them were refused: the check is not vacuous.
        assert!(bodies > 1_000, "{bodies}");
    }

    /// Version 2: many keys in one frame, each record keeping its own, through both decoders.
    #[test]
    fn version_2_frames_carry_a_key_per_record() {
        let records: Vec<Record> = sample(300)
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                r.key = format!("d{}", i % 11);
                r
            })
            .collect();
        let mut body = Vec::new();
        for r in &records {
            encode_record_in(&mut body, VERSION_2, r);
        }
        let mut c = frame_compressor(3).unwrap();
        for compressor in [Some(&mut c), None] {
            let bytes = encode_frame_in(VERSION_2, "gw-2", 300, &body, compressor).unwrap();
            assert_eq!(decode_frame(&bytes).unwrap().records, records);
            let (header, streamed) = read_frame(&bytes).unwrap();
            assert_eq!((header.version, header.records), (VERSION_2, 300));
            let streamed: Vec<Record> = streamed.map(Result::unwrap).collect();
            assert_eq!(streamed, records);
        }
        // The same body read as version 1 is not mistaken for records.
        let as_v1 = encode_frame("gw", 300, &body, None).unwrap();
        assert!(decode_frame(&as_v1).is_err());
        // Every truncation is refused; every byte flip is an error or a clean decode.
        let good = encode_frame_in(VERSION_2, "gw", 300, &body, Some(&mut c)).unwrap();
        for cut in 0..good.len() {
            assert!(decode_frame(&good[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            let _ = decode_frame(&bad);
        }
    }

    fn keyed(n: u64) -> Vec<Record> {
        sample(n)
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                r.key = format!("d{}", i % 11);
                r
            })
            .collect()
    }

    fn columns_of(records: &[Record]) -> ColumnBody {
        let mut body = ColumnBody::default();
        for r in records {
            body.push(
                r.seq,
                r.ts_ms,
                r.key.as_bytes(),
                r.topic.as_bytes(),
                &r.payload,
            );
        }
        body
    }

    /// Version 3: version 2's records in sections, through both decoders, compressed or not;
    /// ids and times that go down or wrap come back as they were.
    #[test]
    fn version_3_frames_round_trip_through_both_decoders() {
        let mut records = keyed(300);
        records[7].seq = 3;
        records[8].ts_ms = 0;
        records[9].seq = u64::MAX;
        records[10].ts_ms = u64::MAX;
        records[11].payload.clear();
        records[12].topic.clear();
        records[12].key.clear();
        let body = columns_of(&records);
        let mut c = frame_compressor(3).unwrap();
        for compressor in [Some(&mut c), None] {
            let bytes = encode_frame_v3("gw-3", &body, compressor).unwrap();
            let frame = decode_frame(&bytes).unwrap();
            assert_eq!(frame.gateway, "gw-3");
            assert_eq!(frame.records, records);
            let (header, streamed) = read_frame(&bytes).unwrap();
            assert_eq!((header.version, header.records), (VERSION_3, 300));
            let streamed: Vec<Record> = streamed.map(Result::unwrap).collect();
            assert_eq!(streamed, records);
        }
        // Built from a version 2 body, or from a version 1 body and its key: the same frames.
        let mut v2 = Vec::new();
        for r in &records {
            encode_record_in(&mut v2, VERSION_2, r);
        }
        let mut from_v2 = ColumnBody::default();
        from_v2.push_body(&v2, 300, VERSION_2, "ignored").unwrap();
        assert_eq!(
            encode_frame_v3("gw-3", &from_v2, None).unwrap(),
            encode_frame_v3("gw-3", &body, None).unwrap()
        );
        let one_key: Vec<Record> = sample(20)
            .into_iter()
            .map(|mut r| {
                r.key = "k".into();
                r
            })
            .collect();
        let mut from_v1 = ColumnBody::default();
        from_v1
            .push_body(&body_of(&one_key), 20, VERSION_1, "k")
            .unwrap();
        let bytes = encode_frame_v3("gw", &from_v1, None).unwrap();
        assert_eq!(decode_frame(&bytes).unwrap().records, one_key);
        assert!(from_v1
            .push_body(&body_of(&one_key), 19, VERSION_1, "k")
            .is_err());
    }

    /// Telemetry whose readings change with every message: version 3 stores it in less than
    /// version 2 does (the reason it exists).
    #[test]
    fn version_3_compresses_telemetry_better_than_version_2() {
        let records: Vec<Record> = (0..4000u64)
            .map(|i| {
                let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
                Record {
                    seq: 1_000_000 + i,
                    ts_ms: 1_764_000_000_000 + i / 3,
                    key: format!("dev-{:03}", i % 100),
                    topic: format!("tele/dev-{:03}/state", i % 100),
                    payload: format!(
                        r#"{{"seq":{i},"temp_c":{}.{:02},"humidity":{}.{},"status":"ok"}}"#,
                        15 + x % 15,
                        (x >> 8) % 100,
                        30 + (x >> 16) % 40,
                        (x >> 24) % 10
                    )
                    .into_bytes(),
                }
            })
            .collect();
        let mut v2 = Vec::new();
        for r in &records {
            encode_record_in(&mut v2, VERSION_2, r);
        }
        let mut c = frame_compressor(3).unwrap();
        let old = encode_frame_in(VERSION_2, "gw", 4000, &v2, Some(&mut c)).unwrap();
        let new = encode_frame_v3("gw", &columns_of(&records), Some(&mut c)).unwrap();
        assert_eq!(decode_frame(&new).unwrap().records, records);
        assert!(
            new.len() * 10 < old.len() * 9,
            "version 3 {} bytes, version 2 {}",
            new.len(),
            old.len()
        );
    }

    /// Every truncation of a version 3 frame is refused by both decoders; every byte flip is
    /// an error or a clean decode, never a panic; lying section lengths are caught.
    #[test]
    fn version_3_frames_refuse_damage() {
        let records = keyed(40);
        let body = columns_of(&records);
        let mut c = frame_compressor(3).unwrap();
        for good in [
            encode_frame_v3("gw", &body, Some(&mut c)).unwrap(),
            encode_frame_v3("gw", &body, None).unwrap(),
        ] {
            for cut in 0..good.len() {
                assert!(decode_frame(&good[..cut]).is_err(), "truncated at {cut}");
                let streamed = read_frame(&good[..cut])
                    .map(|(_, rs)| rs.collect::<Result<Vec<_>, _>>())
                    .and_then(|r| r);
                assert!(streamed.is_err(), "streamed, truncated at {cut}");
            }
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x5a;
                let collected = decode_frame(&bad);
                let streamed = read_frame(&bad)
                    .map(|(_, rs)| rs.collect::<Result<Vec<_>, _>>())
                    .and_then(|r| r);
                // Both decoders agree on whether a frame is good.
                assert_eq!(collected.is_ok(), streamed.is_ok(), "flip at {i}");
            }
            // The index claiming the whole body, or more than there is.
            let at = FIXED_HEADER_BYTES + 2;
            for lie in [body.len() as u32, body.len() as u32 + 1, u32::MAX] {
                let mut bad = good.clone();
                bad[at..at + 4].copy_from_slice(&lie.to_le_bytes());
                assert!(decode_frame(&bad).is_err(), "index_len {lie}");
                let mut bad = good.clone();
                bad[at + 4..at + 8].copy_from_slice(&lie.to_le_bytes());
                assert!(decode_frame(&bad).is_err(), "stored {lie}");
            }
        }
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

    /// The documented record (seq 5, ts 9, key "d1", "a/b", "{}") in `bytes`.
    fn is_the_keyed_example(bytes: &[u8]) {
        let f = super::decode_frame(bytes).unwrap();
        assert_eq!(f.gateway, "gw");
        let r = &f.records[0];
        assert_eq!((r.seq, r.ts_ms, r.key.as_str()), (5, 9, "d1"));
        assert_eq!(
            (r.topic.as_str(), r.payload.as_slice()),
            ("a/b", &b"{}"[..])
        );
    }

    /// The version 2 example in FORMAT.md, byte for byte.
    #[test]
    fn the_documented_version_2_example_decodes() {
        let bytes = [
            0x45, 0x53, 0x48, 0x50, 0x02, 0x00, 0x02, 0x67, 0x77, 0x01, 0x00, 0x00, 0x00, 0x0c,
            0x00, 0x00, 0x00, 0x05, 0x09, 0x02, 0x64, 0x31, 0x03, 0x61, 0x2f, 0x62, 0x02, 0x7b,
            0x7d,
        ];
        is_the_keyed_example(&bytes);
        let mut body = Vec::new();
        super::encode_record_v2(&mut body, 5, 9, "d1", "a/b", b"{}");
        assert_eq!(
            super::encode_frame_in(super::VERSION_2, "gw", 1, &body, None).unwrap(),
            bytes
        );
    }

    /// The version 3 example in FORMAT.md, byte for byte.
    #[test]
    fn the_documented_version_3_example_decodes() {
        let bytes = [
            0x45, 0x53, 0x48, 0x50, 0x03, 0x00, 0x02, 0x67, 0x77, 0x01, 0x00, 0x00, 0x00, 0x0c,
            0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x0a, 0x12, 0x02,
            0x64, 0x31, 0x03, 0x61, 0x2f, 0x62, 0x02, 0x7b, 0x7d,
        ];
        is_the_keyed_example(&bytes);
        let mut body = super::ColumnBody::default();
        body.push(5, 9, b"d1", b"a/b", b"{}");
        assert_eq!(super::encode_frame_v3("gw", &body, None).unwrap(), bytes);
    }
}
