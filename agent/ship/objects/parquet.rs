//! Parquet objects (cargo feature `parquet`): the same fields as the JSON lines, as columns,
//! written with the parquet crate's own column writers (no Arrow), zstd inside. Rows gather
//! into row groups of [`ROW_GROUP_RAW_BYTES`] of records (or of the part size, if smaller); each closed row group goes to the
//! output, from which the object encoder cuts parts, and the footer ends the last part.
//!
//! Columns: `id`, `gateway`, `topic` (strings), `ts_ms` (int64), `payload` (the message's
//! JSON text when it is JSON, else null) and `payload_base64` (else). No I/O; CPU-bound.

use crate::frame::{ndjson, Record};
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::sync::Arc;

/// Records (as spooled, uncompressed) gathered per row group: what is held in memory
/// before it is compressed into the output.
pub(crate) const ROW_GROUP_RAW_BYTES: usize = 4 << 20;

const SCHEMA: &str = "
message edgeship_record {
  REQUIRED BYTE_ARRAY id (UTF8);
  REQUIRED BYTE_ARRAY gateway (UTF8);
  REQUIRED BYTE_ARRAY topic (UTF8);
  REQUIRED INT64 ts_ms;
  OPTIONAL BYTE_ARRAY payload (UTF8);
  OPTIONAL BYTE_ARRAY payload_base64 (UTF8);
}";

#[derive(Default)]
struct Rows {
    id: Vec<ByteArray>,
    gateway: Vec<ByteArray>,
    topic: Vec<ByteArray>,
    ts_ms: Vec<i64>,
    payload: Vec<ByteArray>,
    payload_def: Vec<i16>,
    base64: Vec<ByteArray>,
    base64_def: Vec<i16>,
    raw: usize,
}

/// One Parquet object being written.
pub(crate) struct ParquetStream {
    writer: SerializedFileWriter<Vec<u8>>,
    rows: Rows,
    gateway: ByteArray,
    row_group_bytes: usize,
}

impl ParquetStream {
    pub(crate) fn new(
        level: i32,
        gateway: &str,
        part_bytes: usize,
    ) -> parquet::errors::Result<ParquetStream> {
        let schema = Arc::new(parse_message_type(SCHEMA)?);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(level)?))
            // The same bytes for the same records, whatever the build's version string.
            .set_created_by("edgeship".into())
            .build();
        Ok(ParquetStream {
            writer: SerializedFileWriter::new(Vec::new(), schema, Arc::new(props))?,
            rows: Rows::default(),
            gateway: ByteArray::from(gateway.as_bytes().to_vec()),
            row_group_bytes: ROW_GROUP_RAW_BYTES.min(part_bytes),
        })
    }

    /// Adds records; writes a row group when enough are gathered.
    pub(crate) fn add(&mut self, gateway: &str, records: &[Record]) -> parquet::errors::Result<()> {
        let r = &mut self.rows;
        for rec in records {
            r.id.push(ByteArray::from(
                format!("{gateway}:{}", rec.seq).into_bytes(),
            ));
            r.gateway.push(self.gateway.clone());
            r.topic.push(ByteArray::from(rec.topic.as_bytes().to_vec()));
            r.ts_ms.push(rec.ts_ms as i64);
            if ndjson::is_json(&rec.payload) {
                let mut text = Vec::with_capacity(rec.payload.len());
                ndjson::compact_json(&mut text, &rec.payload);
                r.payload.push(ByteArray::from(text));
                r.payload_def.push(1);
                r.base64_def.push(0);
            } else {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(&rec.payload);
                r.base64.push(ByteArray::from(b64.into_bytes()));
                r.base64_def.push(1);
                r.payload_def.push(0);
            }
            r.raw += rec.payload.len() + rec.topic.len() + 16;
        }
        if self.rows.raw >= self.row_group_bytes {
            self.flush_rows()?;
        }
        Ok(())
    }

    /// Writes the gathered rows as one row group.
    fn flush_rows(&mut self) -> parquet::errors::Result<()> {
        if self.rows.id.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let mut group = self.writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            match index {
                0 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&rows.id, None, None)?,
                1 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&rows.gateway, None, None)?,
                2 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&rows.topic, None, None)?,
                3 => column
                    .typed::<Int64Type>()
                    .write_batch(&rows.ts_ms, None, None)?,
                4 => column.typed::<ByteArrayType>().write_batch(
                    &rows.payload,
                    Some(&rows.payload_def),
                    None,
                )?,
                _ => column.typed::<ByteArrayType>().write_batch(
                    &rows.base64,
                    Some(&rows.base64_def),
                    None,
                )?,
            };
            column.close()?;
            index += 1;
        }
        group.close()?;
        self.writer.flush()?;
        Ok(())
    }

    /// The bytes written so far and not yet taken.
    pub(crate) fn output(&mut self) -> &mut Vec<u8> {
        self.writer.inner_mut()
    }

    /// Writes the last row group and the footer; the rest of the output.
    pub(crate) fn finish(mut self) -> parquet::errors::Result<Vec<u8>> {
        self.flush_rows()?;
        self.writer.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode::ObjectEncoder;
    use crate::frame;
    use crate::sink::s3::{Compression, ObjectFormat};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::RowAccessor;

    #[test]
    fn parquet_parts_concatenate_to_a_file_with_every_record_and_repeat_byte_for_byte() {
        let bodies: Vec<Vec<u8>> = (0..60u64)
            .map(|b| {
                let mut body = Vec::new();
                for i in b * 1000 + 1..=b * 1000 + 1000 {
                    let payload = if i % 5 == 0 {
                        vec![0xfe, i as u8]
                    } else {
                        format!("{{ \"t\": {}.{} }}", i % 37, i % 10).into_bytes()
                    };
                    frame::encode_record_v2(
                        &mut body,
                        i,
                        1_700_000_000_000 + i,
                        "k",
                        "dev/1",
                        &payload,
                    );
                }
                body
            })
            .collect();
        let encode = || {
            let mut e =
                ObjectEncoder::new(ObjectFormat::Parquet, Compression::Zstd, 3, 256 << 10, "gw")
                    .unwrap();
            let mut parts = Vec::new();
            for (i, b) in bodies.iter().enumerate() {
                if let Some(p) = e.add("gw", i as i64, b, 1000, frame::VERSION_2).unwrap() {
                    parts.push(p);
                }
            }
            parts.push(e.finish().unwrap());
            parts
        };
        let parts = encode();
        assert!(parts.len() > 1, "{} parts", parts.len());
        assert_eq!(encode(), parts, "the same records make the same bytes");
        let file = bytes::Bytes::from(parts.concat());
        let reader = SerializedFileReader::new(file).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 60_000);
        let rows: Vec<parquet::record::Row> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(rows[0].get_string(0).unwrap(), "gw:1");
        assert_eq!(rows[0].get_string(2).unwrap(), "dev/1");
        assert_eq!(rows[0].get_long(3).unwrap(), 1_700_000_000_001);
        // JSON payloads without the whitespace between tokens, others as base64.
        assert_eq!(rows[0].get_string(4).unwrap(), "{\"t\":1.1}");
        assert_eq!(rows[4].get_string(5).unwrap(), "/gU=");
        assert_eq!(rows[59_999].get_string(0).unwrap(), "gw:60000");
    }
}
