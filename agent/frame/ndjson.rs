//! The newline-delimited JSON line of one message, the shape every JSON-reading consumer
//! gets (Kinesis routes with `format = "ndjson"`, which Redshift streaming ingestion and
//! Firehose parse; later the S3 and Firehose destinations, so one Athena table reads them all):
//!
//! ```text
//! {"id":"gw:5","gateway":"gw","topic":"devices/d1/telemetry","ts_ms":1700000000000,"payload":{"t":21.5}}
//! ```
//!
//! `payload` is the message itself when it is JSON (written without the whitespace between
//! its tokens, so a pretty-printed payload stays on its line; numbers and strings keep their
//! exact text); any other payload is `payload_base64` (standard alphabet, padded). Every line
//! ends in `\n`, so records concatenated by a consumer (Firehose writes them back to back)
//! keep their lines whole.
//!
//! No I/O; nothing here may allocate per message beyond the output buffer.

use base64::Engine;

/// Appends the line of one message (with its `\n`) to `out`.
pub(crate) fn write_line(
    out: &mut Vec<u8>,
    gateway: &str,
    seq: u64,
    topic: &str,
    ts_ms: u64,
    payload: &[u8],
) {
    out.extend_from_slice(b"{\"id\":");
    // The id is `gateway:seq`, one JSON string: the gateway's literal, reopened for the rest.
    write_string(out, gateway);
    out.pop();
    out.push(b':');
    out.extend_from_slice(itoa_u64(seq, &mut [0; 20]).as_bytes());
    out.push(b'"');
    out.extend_from_slice(b",\"gateway\":");
    write_string(out, gateway);
    out.extend_from_slice(b",\"topic\":");
    write_string(out, topic);
    out.extend_from_slice(b",\"ts_ms\":");
    out.extend_from_slice(itoa_u64(ts_ms, &mut [0; 20]).as_bytes());
    if is_json(payload) {
        out.extend_from_slice(b",\"payload\":");
        compact_json(out, payload);
    } else {
        out.extend_from_slice(b",\"payload_base64\":\"");
        let start = out.len();
        let engine = base64::engine::general_purpose::STANDARD;
        out.resize(
            start + base64::encoded_len(payload.len(), true).unwrap_or(0),
            0,
        );
        let written = engine
            .encode_slice(payload, &mut out[start..])
            .expect("sized by encoded_len");
        out.truncate(start + written);
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
}

/// The decimal digits of `n`, written into `buf`.
fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).expect("ASCII digits")
}

/// A JSON string literal of `s`.
fn write_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// True when `payload` is one complete JSON value (UTF-8, RFC 8259).
pub(crate) fn is_json(payload: &[u8]) -> bool {
    !payload.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// Copies a valid JSON text without the whitespace between its tokens. Inside a valid JSON
/// string a raw newline cannot occur (it must be escaped), so what is left is one line.
pub(crate) fn compact_json(out: &mut Vec<u8>, json: &[u8]) {
    if !json
        .iter()
        .any(|b| matches!(b, b'\n' | b'\r' | b' ' | b'\t'))
    {
        out.extend_from_slice(json);
        return;
    }
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b'\n' | b'\r' | b' ' | b'\t') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(topic: &str, payload: &[u8]) -> String {
        let mut out = Vec::new();
        write_line(&mut out, "gw-1", 42, topic, 1_700_000_000_123, payload);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_json_payload_is_embedded_and_anything_else_is_base64() {
        assert_eq!(
            line("devices/d1/telemetry", br#"{"t":21.50,"ok":true}"#),
            "{\"id\":\"gw-1:42\",\"gateway\":\"gw-1\",\"topic\":\"devices/d1/telemetry\",\"ts_ms\":1700000000123,\"payload\":{\"t\":21.50,\"ok\":true}}\n"
        );
        assert_eq!(
            line("a/b", b"hello"),
            "{\"id\":\"gw-1:42\",\"gateway\":\"gw-1\",\"topic\":\"a/b\",\"ts_ms\":1700000000123,\"payload_base64\":\"aGVsbG8=\"}\n"
        );
        // Binary, empty, two values, and JSON cut short are not JSON.
        for payload in [&[0xff, 0x00][..], b"", b"1 2", b"{\"a\":"] {
            let l = line("a/b", payload);
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            let back = base64::engine::general_purpose::STANDARD
                .decode(v["payload_base64"].as_str().unwrap())
                .unwrap();
            assert_eq!(back, payload);
        }
    }

    #[test]
    fn pretty_printed_json_stays_on_one_line_with_its_strings_and_numbers_exact() {
        let pretty =
            b"{\n  \"msg\": \"a b\\\" \\\\\",\n\t\"n\": 1.10e3,\r\n  \"list\": [ 1, 2 ]\n}\n";
        let l = line("t", pretty);
        assert_eq!(l.matches('\n').count(), 1);
        assert!(
            l.contains(r#""payload":{"msg":"a b\" \\","n":1.10e3,"list":[1,2]}}"#),
            "{l}"
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        let original: serde_json::Value = serde_json::from_slice(pretty).unwrap();
        assert_eq!(v["payload"], original);
    }

    #[test]
    fn topics_and_gateways_are_escaped() {
        let l = line("a/\"quoted\"/\u{1}", b"1");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["topic"], "a/\"quoted\"/\u{1}");
        assert_eq!(v["payload"], 1);
        assert_eq!(v["id"], "gw-1:42");
        assert_eq!(v["ts_ms"], 1_700_000_000_123u64);
        let mut out = Vec::new();
        write_line(&mut out, "gw", 0, "t", 0, b"0");
        assert_eq!(
            out,
            b"{\"id\":\"gw:0\",\"gateway\":\"gw\",\"topic\":\"t\",\"ts_ms\":0,\"payload\":0}\n"
        );
        let mut out = Vec::new();
        write_line(&mut out, "gw", u64::MAX, "t", u64::MAX, b"0");
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("18446744073709551615"));
    }
}
