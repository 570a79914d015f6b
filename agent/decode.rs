//! Turning destination record data back into messages, for `edgeship decode` and tests.
//!
//! Input is raw frame bytes, or base64 text (as the Kinesis APIs and most tools print record
//! data) holding one record per line. Output is one JSON object per message: its id, sequence,
//! gateway, topic, timestamp and payload (as text when it is UTF-8, else as `payload_base64`).
//! Nothing here writes anywhere; the caller prints.

use crate::frame::{Frame, Record, MAGIC};
use base64::Engine;

/// Splits input into the bytes of each record it holds.
pub fn split_input(data: &[u8]) -> Vec<Result<Vec<u8>, String>> {
    if data.starts_with(MAGIC) {
        return vec![Ok(data.to_vec())];
    }
    let text = match std::str::from_utf8(data) {
        Ok(t) => t,
        Err(_) => {
            return vec![Err(
                "input is neither an edgeship frame nor base64 text".into()
            )]
        }
    };
    let engine = base64::engine::general_purpose::STANDARD;
    text.split_whitespace()
        .map(|line| engine.decode(line).map_err(|e| format!("not base64: {e}")))
        .collect()
}

/// One JSON line per record of a frame.
pub fn json_lines(frame: &Frame) -> Vec<String> {
    frame
        .records
        .iter()
        .map(|r| json_line(&frame.gateway, r))
        .collect()
}

/// The JSON line of one record of `gateway`.
pub fn json_line(gateway: &str, r: &Record) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("id".into(), format!("{}:{}", gateway, r.seq).into());
    obj.insert("gateway".into(), gateway.into());
    obj.insert("seq".into(), r.seq.into());
    // Version 2 frames carry each record's partition key.
    if !r.key.is_empty() {
        obj.insert("key".into(), r.key.clone().into());
    }
    obj.insert("topic".into(), r.topic.clone().into());
    obj.insert("ts_ms".into(), r.ts_ms.into());
    match std::str::from_utf8(&r.payload) {
        Ok(text) => obj.insert("payload".into(), text.into()),
        Err(_) => obj.insert(
            "payload_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&r.payload)
                .into(),
        ),
    };
    serde_json::Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, encode_record, Record};

    #[test]
    fn raw_and_base64_inputs_decode_to_json_lines() {
        let mut body = Vec::new();
        encode_record(&mut body, 5, 9, "devices/a/telemetry", b"{\"v\":1}");
        encode_record(&mut body, 6, 9, "devices/a/raw", &[0xff, 0x00]);
        let bytes = encode_frame("gw", 2, &body, None).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let two_lines = format!("{b64}\n{b64}\n");
        assert_eq!(split_input(&bytes).len(), 1);
        let split = split_input(two_lines.as_bytes());
        assert_eq!(split.len(), 2);
        let frame = crate::frame::decode_frame(split[1].as_ref().unwrap()).unwrap();
        let lines = json_lines(&frame);
        assert_eq!(
            lines[0],
            r#"{"gateway":"gw","id":"gw:5","payload":"{\"v\":1}","seq":5,"topic":"devices/a/telemetry","ts_ms":9}"#
        );
        assert!(lines[1].contains(r#""payload_base64":"/wA=""#));
        assert_eq!(
            frame.records[1],
            Record {
                seq: 6,
                ts_ms: 9,
                key: String::new(),
                topic: "devices/a/raw".into(),
                payload: vec![0xff, 0]
            }
        );
        assert!(split_input(b"%%%")[0].is_err());
    }
}
