//! The destination record of destinations that send one record per message (Kafka): the
//! records exactly as the spool keeps them, with the gateway's name, so the destination
//! takes each message apart without decompressing anything:
//!
//! ```text
//! version: u8 | gateway length: u16 LE | gateway | record count: u32 LE | records (FORMAT.md)
//! ```
//!
//! It lives only between the shipper and the destination, never on the wire or on disk, so
//! it has no version of its own beyond the records' body version. No I/O.

use super::{decode_records_in, FrameError, Record};

/// Appends the record of `records` records of body `version`, concatenated in `raw`.
pub(crate) fn encode(gateway: &str, records: u32, version: u8, raw: &[u8], out: &mut Vec<u8>) {
    let gateway = &gateway.as_bytes()[..gateway.len().min(u16::MAX as usize)];
    out.reserve(1 + 2 + gateway.len() + 4 + raw.len());
    out.push(version);
    out.extend_from_slice(&(gateway.len() as u16).to_le_bytes());
    out.extend_from_slice(gateway);
    out.extend_from_slice(&records.to_le_bytes());
    out.extend_from_slice(raw);
}

/// The gateway and the records of one such record.
pub(crate) fn decode(data: &[u8]) -> Result<(&str, Vec<Record>), FrameError> {
    let short = || FrameError::Corrupt("a message batch ends early".into());
    let (&version, rest) = data.split_first().ok_or_else(short)?;
    let len = u16::from_le_bytes(rest.get(..2).ok_or_else(short)?.try_into().unwrap()) as usize;
    let gateway = rest.get(2..2 + len).ok_or_else(short)?;
    let gateway = std::str::from_utf8(gateway)
        .map_err(|_| FrameError::Corrupt("a message batch's gateway is not UTF-8".into()))?;
    let rest = &rest[2 + len..];
    let count = u32::from_le_bytes(rest.get(..4).ok_or_else(short)?.try_into().unwrap());
    Ok((gateway, decode_records_in(&rest[4..], count, version)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_record, encode_record_v2, VERSION_1, VERSION_2};

    #[test]
    fn records_come_back_as_they_went_in() {
        let mut raw = Vec::new();
        encode_record(&mut raw, 7, 1_700_000_000_000, "devices/d1/t", b"{\"t\":1}");
        encode_record(&mut raw, 8, 1_700_000_000_001, "devices/d1/t", b"\x00\xff");
        let mut out = Vec::new();
        encode("gw-1", 2, VERSION_1, &raw, &mut out);
        let (gateway, records) = decode(&out).unwrap();
        assert_eq!(gateway, "gw-1");
        let seqs: Vec<(u64, &[u8])> = records
            .iter()
            .map(|r| (r.seq, r.payload.as_slice()))
            .collect();
        assert_eq!(seqs, [(7, &b"{\"t\":1}"[..]), (8, &b"\x00\xff"[..])]);

        let mut raw = Vec::new();
        encode_record_v2(&mut raw, 9, 5, "d2", "devices/d2/t", b"x");
        let mut out = Vec::new();
        encode("gw-1", 1, VERSION_2, &raw, &mut out);
        let (_, records) = decode(&out).unwrap();
        assert_eq!((records[0].key.as_str(), records[0].seq), ("d2", 9));
    }

    #[test]
    fn a_cut_record_is_an_error_not_a_panic() {
        let mut raw = Vec::new();
        encode_record(&mut raw, 7, 1, "t", b"payload");
        let mut out = Vec::new();
        encode("gw", 1, VERSION_1, &raw, &mut out);
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err(), "cut at {cut}");
        }
    }
}
