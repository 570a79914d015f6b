//! The one place records become destination records: a run of record bodies (each the
//! uncompressed record encoding of FORMAT.md, with its record count and body version) is
//! encoded in a route's format, split until every piece fits the destination's record limit.
//! Bodies of version 2 (a key per record) make frames of version 3 (version 2's records laid
//! out in sections, FORMAT.md); a run that mixes versions (a spool written by an older agent)
//! has its version 1 bodies rewritten with the run's key.
//!
//! It knows nothing of spool blocks or destinations: callers pass bodies and a limit, and get
//! back each encoded record with the range of bodies it holds. No I/O; CPU-bound (zstd), so
//! async callers run it on a blocking thread.

use super::{
    decode_records_in, encode_frame_in, encode_frame_v3, encode_record_in, frame_compressor,
    ColumnBody, FrameError, VERSION_1, VERSION_2,
};
use super::{kpl, messages, ndjson};
use serde::Deserialize;

/// How a route's records are packed into destination records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FrameFormat {
    /// edgeship's frame (FORMAT.md): zstd-compressed, every record's id, topic and time.
    #[default]
    Edgeship,
    /// The Kinesis Producer Library's aggregated record: payloads as they are, readable by
    /// the KCL and the Lambda deaggregation modules; not compressed.
    Kpl,
    /// Newline-delimited JSON, one line per message ([`ndjson`]): what Redshift streaming
    /// ingestion and Firehose parse; not compressed.
    Ndjson,
    /// Each message apart, as spooled ([`messages`]): for destinations that send one record
    /// per message (Kafka) and compress on their own. Never a route's `format`: only a
    /// destination asks for it.
    #[serde(skip)]
    Messages,
}

impl FrameFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FrameFormat::Edgeship => "edgeship",
            FrameFormat::Kpl => "kpl",
            FrameFormat::Ndjson => "ndjson",
            FrameFormat::Messages => "messages",
        }
    }

    pub fn parse(text: &str) -> Option<FrameFormat> {
        [FrameFormat::Edgeship, FrameFormat::Kpl, FrameFormat::Ndjson]
            .into_iter()
            .find(|f| f.as_str() == text)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
    #[error("records {first_seq}..: one run of records encodes to {bytes} bytes, over the {limit}-byte record limit")]
    TooLarge {
        /// Which of the bodies passed in.
        body: usize,
        first_seq: u64,
        bytes: usize,
        limit: usize,
    },
}

/// An uncompressed body of `records` records, as the spool keeps them.
pub(crate) struct Body<'a> {
    pub(crate) records: u32,
    pub(crate) bytes: &'a [u8],
    /// Its encoding: [`VERSION_1`] (records of one key, `key`) or [`VERSION_2`].
    pub(crate) version: u8,
    /// The key of its block (a version 1 body's records all have it).
    pub(crate) key: &'a str,
}

/// One destination record and which bodies (a range of the input) it holds.
pub(crate) struct Encoded {
    pub(crate) data: Vec<u8>,
    pub(crate) bodies: std::ops::Range<usize>,
    pub(crate) records: u64,
    pub(crate) raw_bytes: u64,
}

/// Encodes records in one format; holds the compressor context between frames (its set-up is
/// the expensive part).
pub(crate) enum FrameEncoder {
    /// edgeship's own frame (FORMAT.md), zstd-compressed; the sections of the last frame
    /// are kept for their memory.
    Edgeship(zstd::bulk::Compressor<'static>, Box<ColumnBody>),
    /// The KPL aggregated record (uncompressed), for KCL and Lambda deaggregation.
    Kpl,
    /// JSON lines (uncompressed), for Redshift and Firehose.
    Ndjson,
    /// The records as spooled, for one record per message at the destination.
    Messages,
}

impl FrameEncoder {
    pub(crate) fn new(format: FrameFormat, zstd_level: i32) -> Result<FrameEncoder, EncodeError> {
        Ok(match format {
            FrameFormat::Edgeship => {
                FrameEncoder::Edgeship(frame_compressor(zstd_level)?, Box::default())
            }
            FrameFormat::Kpl => FrameEncoder::Kpl,
            FrameFormat::Ndjson => FrameEncoder::Ndjson,
            FrameFormat::Messages => FrameEncoder::Messages,
        })
    }

    /// Readies the encoder to be kept for the next job: the compressor context stays, and
    /// so do the last frame's section buffers when they are no larger than
    /// [`KEPT_SECTION_BYTES`] (a slow stream's frames then reuse them instead of growing
    /// fresh ones a frame at a time; a saturated stream's frames of up to 1 MiB compressed,
    /// several MiB raw, are not held between jobs).
    pub(crate) fn idle(&mut self) {
        if let FrameEncoder::Edgeship(_, columns) = self {
            if columns.capacity() > KEPT_SECTION_BYTES {
                **columns = Default::default();
            } else {
                columns.clear();
            }
        }
    }

    /// The format it encodes.
    pub(crate) fn format(&self) -> FrameFormat {
        match self {
            FrameEncoder::Edgeship(..) => FrameFormat::Edgeship,
            FrameEncoder::Kpl => FrameFormat::Kpl,
            FrameEncoder::Ndjson => FrameFormat::Ndjson,
            FrameEncoder::Messages => FrameFormat::Messages,
        }
    }

    /// One destination record of `records` records whose bodies (of `version`) are
    /// concatenated in `raw`.
    fn encode(
        &mut self,
        gateway: &str,
        key: &str,
        records: u64,
        raw: &[u8],
        version: u8,
    ) -> Result<Vec<u8>, EncodeError> {
        match self {
            FrameEncoder::Edgeship(compressor, columns) if version == VERSION_2 => {
                frame_of_v2_bodies(compressor, columns, gateway, key, [(raw, records as u32)])
            }
            FrameEncoder::Edgeship(compressor, _) => Ok(encode_frame_in(
                version,
                gateway,
                records as u32,
                raw,
                Some(compressor),
            )?),
            FrameEncoder::Kpl => {
                let records = decode_records_in(raw, records as u32, version)?;
                let mut out = Vec::new();
                let (partition_key, hash_key) = crate::key::split(key);
                kpl::encode(gateway, partition_key, hash_key, &records, &mut out);
                Ok(out)
            }
            FrameEncoder::Ndjson => {
                let records = decode_records_in(raw, records as u32, version)?;
                let framing: usize = records.iter().map(|r| r.topic.len() + 96).sum();
                let mut out = Vec::with_capacity(raw.len() + framing);
                for r in &records {
                    ndjson::write_line(&mut out, gateway, r.seq, &r.topic, r.ts_ms, &r.payload);
                }
                Ok(out)
            }
            FrameEncoder::Messages => {
                let mut out = Vec::new();
                messages::encode(gateway, records as u32, version, raw, &mut out);
                Ok(out)
            }
        }
    }

    /// Encodes `bodies` (records of one key) into records of at most `limit` bytes including
    /// the key, cutting the run of bodies by their bytes until each fits. A single body that
    /// does not fit is an error naming its first record.
    pub(crate) fn encode_fitting(
        &mut self,
        gateway: &str,
        key: &str,
        bodies: &[Body<'_>],
        limit: usize,
    ) -> Result<Vec<Encoded>, EncodeError> {
        let mut out = Vec::new();
        self.fit(gateway, key, bodies, 0, limit, &mut out)?;
        Ok(out)
    }

    fn fit(
        &mut self,
        gateway: &str,
        key: &str,
        bodies: &[Body<'_>],
        offset: usize,
        limit: usize,
        out: &mut Vec<Encoded>,
    ) -> Result<(), EncodeError> {
        if bodies.is_empty() {
            return Ok(());
        }
        let records: u64 = bodies.iter().map(|b| u64::from(b.records)).sum();
        let version = bodies.iter().map(|b| b.version).max().unwrap_or(VERSION_1);
        let raw_bytes = bodies.iter().map(|b| b.bytes.len()).sum::<usize>() as u64;
        let data = match self {
            // Version 2 bodies go into a frame's sections as they are, not copied into one
            // run first.
            FrameEncoder::Edgeship(compressor, columns)
                if bodies.iter().all(|b| b.version == VERSION_2) =>
            {
                let bodies = bodies.iter().map(|b| (b.bytes, b.records));
                frame_of_v2_bodies(compressor, columns, gateway, key, bodies)?
            }
            _ => {
                let mut raw = Vec::with_capacity(raw_bytes as usize);
                for b in bodies {
                    if b.version == version {
                        raw.extend_from_slice(b.bytes);
                    } else {
                        // A version 1 body among version 2 ones: its records are of its
                        // block's key.
                        for mut r in decode_records_in(b.bytes, b.records, b.version)? {
                            r.key = b.key.to_string();
                            encode_record_in(&mut raw, VERSION_2, &r);
                        }
                    }
                }
                self.encode(gateway, key, records, &raw, version)?
            }
        };
        if data.len() + key.len() <= limit {
            out.push(Encoded {
                data,
                bodies: offset..offset + bodies.len(),
                records,
                raw_bytes,
            });
            return Ok(());
        }
        if bodies.len() == 1 {
            let first_seq = decode_records_in(bodies[0].bytes, bodies[0].records, version)
                .ok()
                .and_then(|r| r.first().map(|r| r.seq))
                .unwrap_or(0);
            return Err(EncodeError::TooLarge {
                body: offset,
                first_seq,
                bytes: data.len() + key.len(),
                limit,
            });
        }
        // As many runs as this encoding's size says it needs, each of about equal bytes and
        // planned to fill `PLANNED_FILL` of the limit (halving by count left one half too
        // large when the bodies differ in size, and encoded it a third time). A run that
        // still does not fit is cut again.
        let room = ((limit.saturating_sub(key.len()) as f64 * PLANNED_FILL) as u64).max(1);
        let needed = (data.len() as u64).div_ceil(room).max(2) as usize;
        // A record too large is of no further use: the runs do not hold it alongside
        // theirs (with uncompressed formats, each level's is as large as the frame).
        drop(data);
        let mut start = 0;
        for end in even_runs(bodies, needed) {
            self.fit(
                gateway,
                key,
                &bodies[start..end],
                offset + start,
                limit,
                out,
            )?;
            start = end;
        }
        Ok(())
    }
}

/// A frame of version 3 holding version 2 bodies (each its bytes and record count), every
/// body pushed into the frame's sections as it is.
fn frame_of_v2_bodies<'a>(
    compressor: &mut zstd::bulk::Compressor<'static>,
    columns: &mut ColumnBody,
    gateway: &str,
    key: &str,
    bodies: impl IntoIterator<Item = (&'a [u8], u32)>,
) -> Result<Vec<u8>, EncodeError> {
    columns.clear();
    for (bytes, records) in bodies {
        columns.push_body(bytes, records, VERSION_2, key)?;
    }
    Ok(encode_frame_v3(gateway, columns, Some(compressor))?)
}

/// Section buffers an idle encoder keeps (index and payloads together): a frame of one 25 KiB
/// PUT unit holds about 200 KB of telemetry before compression.
const KEPT_SECTION_BYTES: usize = 512 << 10;

/// What share of the record limit a frame is planned to fill by what its records are seen to
/// encode to (the shipper's plan of a route's frames, and the runs a frame too large is cut
/// into): encodings vary a little with the records they hold.
pub(crate) const PLANNED_FILL: f64 = 15.0 / 16.0;

/// Where to cut `bodies` into `runs` runs of about equal bytes, in order: each run's end
/// index, the last being `bodies.len()`. Each cut is the body boundary nearest its share of
/// the bytes; of two bodies or more there are at least two runs (halving by count when there
/// are no bytes to share), never an empty one.
fn even_runs(bodies: &[Body<'_>], runs: usize) -> Vec<usize> {
    debug_assert!(bodies.len() > 1, "one body is not cut");
    let mut prefix = Vec::with_capacity(bodies.len() + 1);
    prefix.push(0usize);
    for b in bodies {
        prefix.push(prefix.last().copied().unwrap_or(0) + b.bytes.len());
    }
    let total = prefix.last().copied().unwrap_or(0);
    let mut ends: Vec<usize> = (1..runs)
        .map(|k| {
            let goal = total * k / runs;
            // The first boundary at or past the goal, or the one before it if nearer.
            let at = prefix.partition_point(|&p| p < goal).min(bodies.len());
            if at > 0 && goal - prefix[at - 1] < prefix[at] - goal {
                at - 1
            } else {
                at
            }
        })
        .filter(|&end| end > 0 && end < bodies.len())
        .collect();
    ends.dedup();
    if ends.is_empty() {
        ends.push(bodies.len() / 2);
    }
    ends.push(bodies.len());
    ends
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_record};

    fn body(seq: u64, n: usize, payload_len: usize, noisy: bool) -> (u32, Vec<u8>) {
        let mut b = Vec::new();
        let mut x = seq.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        for i in 0..n {
            let payload: Vec<u8> = (0..payload_len)
                .map(|j| {
                    if noisy {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    } else {
                        b"{\"temp\":21.5}"[j % 13]
                    }
                })
                .collect();
            encode_record(&mut b, seq + i as u64, 1, "t", &payload);
        }
        (n as u32, b)
    }

    fn bodies(raw: &[(u32, Vec<u8>)]) -> Vec<Body<'_>> {
        raw.iter()
            .map(|(records, bytes)| Body {
                records: *records,
                bytes,
                version: VERSION_1,
                key: "k",
            })
            .collect()
    }

    #[test]
    fn frames_are_split_until_each_fits_the_record_limit() {
        let raw: Vec<_> = (0..8).map(|i| body(i * 100, 100, 1000, true)).collect();
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        let out = c
            .encode_fitting("gw", "k", &bodies(&raw), 256 << 10)
            .unwrap();
        assert!(
            out.len() >= 4,
            "800 KB of noise needs at least 4 frames of 256 KiB"
        );
        assert!(out.iter().all(|p| p.data.len() < 256 << 10));
        // The ranges cover every body once, in order.
        let covered: Vec<usize> = out.iter().flat_map(|p| p.bodies.clone()).collect();
        assert_eq!(covered, (0..8).collect::<Vec<_>>());
        let mut seqs: Vec<u64> = out
            .iter()
            .flat_map(|p| {
                decode_frame(&p.data)
                    .unwrap()
                    .records
                    .into_iter()
                    .map(|r| r.seq)
            })
            .collect();
        seqs.sort();
        assert_eq!(seqs, (0..800).collect::<Vec<_>>());
    }

    #[test]
    fn compressible_bodies_share_one_frame() {
        let raw: Vec<_> = (0..8).map(|i| body(i * 100, 100, 200, false)).collect();
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        let out = c.encode_fitting("gw", "k", &bodies(&raw), 1 << 20).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].records, 800);
        assert_eq!(out[0].bodies, 0..8);
    }

    /// A run of version 2 bodies (many keys) makes a version 3 frame; a version 1 body among
    /// them (an older spool) gets the run's key.
    #[test]
    fn version_2_bodies_make_version_3_frames_with_every_key() {
        let mut v2 = Vec::new();
        for i in 0..10u64 {
            crate::frame::encode_record_v2(&mut v2, i, 1, &format!("dev-{i}"), "t", b"{}");
        }
        let (n1, v1) = body(10, 5, 20, false);
        let bodies = vec![
            Body {
                records: 10,
                bytes: &v2,
                version: VERSION_2,
                key: "gw\u{0}0",
            },
            Body {
                records: n1,
                bytes: &v1,
                version: VERSION_1,
                key: "gw\u{0}0",
            },
        ];
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        let out = c
            .encode_fitting("gw", "gw\u{0}0", &bodies, 1 << 20)
            .unwrap();
        assert_eq!(out.len(), 1);
        let (header, _) = crate::frame::read_frame(&out[0].data).unwrap();
        assert_eq!(header.version, crate::frame::VERSION_3);
        let keys: Vec<String> = decode_frame(&out[0].data)
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.key)
            .collect();
        let mut expected: Vec<String> = (0..10).map(|i| format!("dev-{i}")).collect();
        expected.extend(std::iter::repeat_n("gw\u{0}0".to_string(), 5));
        assert_eq!(keys, expected);
        // The same run in the KPL format: each user record with its own partition key.
        let mut k = FrameEncoder::new(FrameFormat::Kpl, 3).unwrap();
        let out = k
            .encode_fitting("gw", "gw\u{0}0", &bodies, 1 << 20)
            .unwrap();
        let users = crate::frame::kpl::decode(&out[0].data).unwrap();
        let pks: Vec<&str> = users.iter().map(|u| u.partition_key.as_str()).collect();
        assert_eq!(&pks[..3], ["dev-0", "dev-1", "dev-2"]);
        assert_eq!(pks[10], "gw");
        assert_eq!(users[10].explicit_hash_key.as_deref(), Some("0"));
        assert_eq!(users[0].explicit_hash_key, None);
    }

    /// An encoder kept between jobs (its compressor context reused, its sections freed)
    /// makes byte for byte the frames a new one makes.
    #[test]
    fn a_kept_encoder_makes_the_frames_a_new_one_makes() {
        let run = |from: u64, n: u64| {
            let mut v2 = Vec::new();
            for i in from..from + n {
                let payload = format!("{{\"t\":{},\"seq\":{i}}}", 20 + i % 7);
                let key = format!("dev-{}", i % 5);
                crate::frame::encode_record_v2(&mut v2, i, i, &key, "t", payload.as_bytes());
            }
            v2
        };
        let (large, small) = (run(0, 2_000), run(2_000, 10));
        fn bodies(bytes: &[u8], records: u32) -> Body<'_> {
            Body {
                records,
                bytes,
                version: VERSION_2,
                key: "gw\u{0}0",
            }
        }
        fn encode(c: &mut FrameEncoder, body: Body<'_>) -> Vec<u8> {
            let out = c
                .encode_fitting("gw", "gw\u{0}0", &[body], 1 << 20)
                .unwrap();
            assert_eq!(out.len(), 1);
            out.into_iter().next().unwrap().data
        }
        let fresh = |body: Body<'_>| {
            let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
            encode(&mut c, body)
        };
        let mut kept = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        assert_eq!(kept.format(), FrameFormat::Edgeship);
        let first = encode(&mut kept, bodies(&large, 2_000));
        kept.idle();
        let second = encode(&mut kept, bodies(&small, 10));
        kept.idle();
        let third = encode(&mut kept, bodies(&large, 2_000));
        assert_eq!(first, fresh(bodies(&large, 2_000)));
        assert_eq!(second, fresh(bodies(&small, 10)));
        assert_eq!(third, first);
        let seqs: Vec<u64> = decode_frame(&second)
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (2_000..2_010).collect::<Vec<_>>());
    }

    /// An idle encoder keeps a slow stream's section buffers for the next frame, and drops
    /// those of a frame larger than it keeps.
    #[test]
    fn an_idle_encoder_keeps_small_sections_only() {
        let run = |n: u64| {
            let mut v2 = Vec::new();
            for i in 0..n {
                let payload = format!("{{\"t\":{},\"pad\":\"{:0>180}\"}}", 20 + i % 7, i);
                let key = format!("dev-{}", i % 5);
                crate::frame::encode_record_v2(&mut v2, i, i, &key, "t", payload.as_bytes());
            }
            (n as u32, v2)
        };
        fn body((records, bytes): &(u32, Vec<u8>)) -> [Body<'_>; 1] {
            [Body {
                records: *records,
                bytes,
                version: VERSION_2,
                key: "gw\u{0}0",
            }]
        }
        let (small, large) = (run(100), run(4_000));
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 1).unwrap();
        let capacity = |c: &FrameEncoder| match c {
            FrameEncoder::Edgeship(_, columns) => columns.capacity(),
            _ => unreachable!(),
        };
        c.encode_fitting("gw", "gw\u{0}0", &body(&small), 1 << 20)
            .unwrap();
        c.idle();
        let kept = capacity(&c);
        assert!(kept >= 100 * 190, "{kept}");
        c.encode_fitting("gw", "gw\u{0}0", &body(&large), 1 << 20)
            .unwrap();
        assert!(capacity(&c) > KEPT_SECTION_BYTES);
        c.idle();
        assert_eq!(capacity(&c), 0);
    }

    /// A frame too large is cut by its bodies' bytes into as many runs as its encoding
    /// needs: one large body and seven small ones (673 KB of noise, a 512 KiB limit) make
    /// two frames, the large body's and the rest. Halving by count made three, encoding the
    /// first half whole before cutting it again.
    #[test]
    fn a_frame_too_large_is_cut_by_bytes_not_by_count() {
        let mut raw = vec![body(0, 450, 1000, true)];
        raw.extend((0..7).map(|i| body(450 + i * 30, 30, 1000, true)));
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        let out = c
            .encode_fitting("gw", "k", &bodies(&raw), 512 << 10)
            .unwrap();
        let runs: Vec<_> = out.iter().map(|p| p.bodies.clone()).collect();
        assert_eq!(runs, vec![0..1, 1..8]);
        assert!(out.iter().all(|p| p.data.len() + "k".len() <= 512 << 10));
        let seqs: Vec<u64> = out
            .iter()
            .flat_map(|p| decode_frame(&p.data).unwrap().records)
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (0..660).collect::<Vec<_>>());
    }

    #[test]
    fn runs_are_cut_at_the_boundaries_nearest_equal_shares() {
        let sized =
            |sizes: &[usize]| -> Vec<Vec<u8>> { sizes.iter().map(|&n| vec![0; n]).collect() };
        let of = |bytes: &[Vec<u8>]| -> Vec<usize> {
            let bodies: Vec<Body<'_>> = bytes
                .iter()
                .map(|b| Body {
                    records: 1,
                    bytes: b,
                    version: VERSION_1,
                    key: "k",
                })
                .collect();
            even_runs(&bodies, 3)
        };
        assert_eq!(of(&sized(&[100; 10])), vec![3, 7, 10]);
        // One body over most of the bytes: runs before and after it, none empty.
        assert_eq!(of(&sized(&[10, 1000, 10])), vec![1, 2, 3]);
        assert_eq!(of(&sized(&[1000, 1, 1])), vec![1, 3]);
        assert_eq!(of(&sized(&[1000, 1])), vec![1, 2]);
        // No bytes to share: halved by count.
        assert_eq!(of(&sized(&[0, 0, 0])), vec![1, 3]);
    }

    #[test]
    fn a_body_over_the_limit_is_an_error_naming_its_records() {
        let raw = vec![body(500, 10, 10_000, true)];
        let mut c = FrameEncoder::new(FrameFormat::Edgeship, 3).unwrap();
        match c.encode_fitting("gw", "k", &bodies(&raw), 64 << 10) {
            Err(EncodeError::TooLarge {
                body,
                first_seq,
                limit,
                ..
            }) => assert_eq!((body, first_seq, limit), (0, 500, 64 << 10)),
            other => panic!("{:?}", other.map(|v| v.len())),
        }
    }
}
