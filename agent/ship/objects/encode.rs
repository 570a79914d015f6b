//! An object's bytes, built as a stream: record bodies in, JSON lines (`frame::ndjson`)
//! through one compression stream (zstd or gzip), or Parquet row groups (feature
//! `parquet`), cut into parts of at least `part_bytes` as they fill. At most one part and one body's lines are in memory, however large the
//! object. The whole object is one compressed stream (one zstd frame, one gzip member), so
//! any reader of the format reads it whole; parts are byte ranges of it.
//!
//! The bytes are a function of the records and the settings only, so an object encoded
//! again after a crash gives the same parts (the uploader still compares each part's MD5
//! with the one it recorded before it skips it). No I/O; CPU-bound.

use crate::frame::{self, ndjson};
use crate::sink::s3::{Compression, ObjectFormat};
use std::io::Write;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ObjectEncodeError {
    #[error("block {id}: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error("compressing: {0}")]
    Io(#[from] std::io::Error),
    #[cfg(feature = "parquet")]
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

enum Stream {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    #[cfg(feature = "parquet")]
    Parquet(Box<super::parquet::ParquetStream>),
}

/// Builds one object's parts.
pub(crate) struct ObjectEncoder {
    stream: Stream,
    part_bytes: usize,
    lines: Vec<u8>,
    /// Records and line bytes written so far.
    pub(crate) records: u64,
    pub(crate) line_bytes: u64,
}

impl ObjectEncoder {
    pub(crate) fn new(
        format: ObjectFormat,
        compression: Compression,
        level: i32,
        part_bytes: usize,
        gateway: &str,
    ) -> Result<ObjectEncoder, ObjectEncodeError> {
        #[cfg(feature = "parquet")]
        if format == ObjectFormat::Parquet {
            return Ok(ObjectEncoder {
                stream: Stream::Parquet(Box::new(super::parquet::ParquetStream::new(
                    level, gateway, part_bytes,
                )?)),
                part_bytes,
                lines: Vec::new(),
                records: 0,
                line_bytes: 0,
            });
        }
        let _ = (format, gateway);
        let stream = match compression {
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), level)?;
                e.include_checksum(true)?;
                Stream::Zstd(e)
            }
            Compression::Gzip => Stream::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level as u32),
            )),
        };
        Ok(ObjectEncoder {
            stream,
            part_bytes,
            lines: Vec::new(),
            records: 0,
            line_bytes: 0,
        })
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match &mut self.stream {
            Stream::Zstd(e) => e.get_mut(),
            Stream::Gzip(e) => e.get_mut(),
            #[cfg(feature = "parquet")]
            Stream::Parquet(p) => p.output(),
        }
    }

    /// Adds one block's records (an uncompressed body of `version`); returns a part when
    /// one is full.
    pub(crate) fn add(
        &mut self,
        gateway: &str,
        id: i64,
        body: &[u8],
        records: u32,
        version: u8,
    ) -> Result<Option<Vec<u8>>, ObjectEncodeError> {
        let decoded = frame::decode_records_in(body, records, version).map_err(|e| {
            ObjectEncodeError::Corrupt {
                id,
                reason: e.to_string(),
            }
        })?;
        #[cfg(feature = "parquet")]
        if let Stream::Parquet(p) = &mut self.stream {
            p.add(gateway, &decoded)?;
            self.records += decoded.len() as u64;
            self.line_bytes += body.len() as u64;
            if self.output().len() >= self.part_bytes {
                return Ok(Some(std::mem::take(self.output())));
            }
            return Ok(None);
        }
        self.lines.clear();
        for r in &decoded {
            ndjson::write_line(
                &mut self.lines,
                gateway,
                r.seq,
                &r.topic,
                r.ts_ms,
                &r.payload,
            );
        }
        self.records += decoded.len() as u64;
        self.line_bytes += self.lines.len() as u64;
        match &mut self.stream {
            Stream::Zstd(e) => e.write_all(&self.lines)?,
            Stream::Gzip(e) => e.write_all(&self.lines)?,
            #[cfg(feature = "parquet")]
            Stream::Parquet(_) => unreachable!("handled above"),
        }
        if self.output().len() >= self.part_bytes {
            return Ok(Some(std::mem::take(self.output())));
        }
        Ok(None)
    }

    /// Ends the stream; the last part (all of the object if no part was cut).
    pub(crate) fn finish(self) -> Result<Vec<u8>, ObjectEncodeError> {
        Ok(match self.stream {
            Stream::Zstd(e) => e.finish()?,
            Stream::Gzip(e) => e.finish()?,
            #[cfg(feature = "parquet")]
            Stream::Parquet(p) => p.finish()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn body(first: u64, n: u64, payload: impl Fn(u64) -> Vec<u8>) -> Vec<u8> {
        let mut b = Vec::new();
        for i in first..first + n {
            frame::encode_record_v2(&mut b, i, 1_700_000_000_000 + i, "k", "dev/1", &payload(i));
        }
        b
    }

    fn encode(c: Compression, part: usize, bodies: &[Vec<u8>], n: u32) -> Vec<Vec<u8>> {
        let mut e = ObjectEncoder::new(ObjectFormat::Ndjson, c, 3, part, "gw").unwrap();
        let mut parts = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            if let Some(p) = e.add("gw", i as i64, b, n, frame::VERSION_2).unwrap() {
                parts.push(p);
            }
        }
        parts.push(e.finish().unwrap());
        parts
    }

    #[test]
    fn parts_concatenate_to_one_stream_of_every_line_and_repeat_byte_for_byte() {
        // Values that change every message, some not JSON.
        let payload = |i: u64| {
            if i % 7 == 0 {
                vec![0xff, i as u8, 0]
            } else {
                format!("{{\"t\":{}.{},\"seq\":{i}}}", i * 37 % 91, i % 10).into_bytes()
            }
        };
        let bodies: Vec<Vec<u8>> = (0..200).map(|b| body(b * 100 + 1, 100, payload)).collect();
        for c in [Compression::Zstd, Compression::Gzip] {
            let parts = encode(c, 64 << 10, &bodies, 100);
            assert!(parts.len() > 2, "{c:?}: {} parts", parts.len());
            assert!(parts[..parts.len() - 1].iter().all(|p| p.len() >= 64 << 10));
            let whole: Vec<u8> = parts.concat();
            let mut text = String::new();
            match c {
                Compression::Zstd => {
                    zstd::stream::read::Decoder::new(&whole[..])
                        .unwrap()
                        .read_to_string(&mut text)
                        .unwrap();
                }
                Compression::Gzip => {
                    flate2::read::GzDecoder::new(&whole[..])
                        .read_to_string(&mut text)
                        .unwrap();
                }
            }
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 20_000);
            assert_eq!(
                lines[0],
                "{\"id\":\"gw:1\",\"gateway\":\"gw\",\"topic\":\"dev/1\",\"ts_ms\":1700000000001,\"payload\":{\"t\":37.1,\"seq\":1}}"
            );
            assert!(
                lines[6].contains("\"payload_base64\":\"/wcA\""),
                "{}",
                lines[6]
            );
            assert!(lines[19_999].starts_with("{\"id\":\"gw:20000\""));
            // Encoded again: the same parts.
            assert_eq!(encode(c, 64 << 10, &bodies, 100), parts, "{c:?}");
        }
    }
}
