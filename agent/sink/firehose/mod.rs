//! Amazon Data Firehose (Kinesis Data Firehose) as a destination: `PutRecordBatch` of
//! records that each hold many messages as newline-delimited JSON (the lines of
//! `frame::ndjson`, the same as in the S3 destination's objects, so one Athena table reads
//! both), every record ending in a newline so Firehose's concatenation keeps lines whole.
//!
//! The service's limits are the agent's own (emulators accept more): at most 500 records and
//! 4 MiB per call, 1,000 KiB per record. Firehose bills each record in 5 KB increments, so the
//! shipper fills records up to the limit whatever their keys: the destination says it has one
//! "shard", and blocks and records gather all keys. Requests are signed and sent by
//! [`crate::sink::signed`] (the JSON 1.1 protocol, two calls: not worth an SDK crate).
//!
//! It never retries (the shipper resends only the records Firehose did not take, with
//! backoff; `ServiceUnavailableException` slows the destination), never drops a record, and
//! reports a record accepted only when Firehose answered it with a record id.

use crate::sink::call::{CallLimits, Destination, Entry, Failure, FailureKind, Outcome, SinkError};
use crate::sink::signed::{self, Endpoint, Payload, SignedClient};
use aws_credential_types::provider::SharedCredentialsProvider;
use base64::Engine;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Firehose's own limits.
pub(crate) const CALL: CallLimits = CallLimits {
    max_entries: 500,
    max_bytes: 4 << 20,
    queued_calls: 1,
};
/// Largest record, before base64: 1,000 KiB.
pub(crate) const MAX_RECORD_BYTES: u64 = 1_000 << 10;

/// Longest answer read: 500 record ids, or an error.
const MAX_ANSWER: usize = 1 << 20;

/// The JSON 1.1 target prefix of Firehose's API.
const TARGET: &str = "Firehose_20150804";

/// A `[destination.NAME]` of `type = "firehose"`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FirehoseConfig {
    pub(crate) delivery_stream: String,
    pub(crate) region: Option<String>,
    /// A Firehose-compatible endpoint instead of AWS's (`http://127.0.0.1:5000`).
    pub(crate) endpoint: Option<String>,
    /// Largest record (many messages' lines), at most [`MAX_RECORD_BYTES`].
    pub(crate) max_record_bytes: u64,
}

/// One delivery stream.
pub(crate) struct FirehoseSink {
    name: String,
    config: FirehoseConfig,
    client: SignedClient,
    /// The one "shard" every key goes to, so records pack all keys.
    all: Arc<str>,
    starts: Arc<[u128]>,
}

fn failure(kind: FailureKind, code: &str, message: impl Into<String>) -> Failure {
    Failure::new(kind, code, message)
}

/// What Firehose said about one record of a `PutRecordBatch`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RecordAnswer {
    record_id: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BatchAnswer {
    request_responses: Vec<RecordAnswer>,
}

/// A per-record or whole-call error code, classified.
fn kind_of(code: &str) -> FailureKind {
    match code {
        "ServiceUnavailableException" | "LimitExceededException" | "ThrottlingException" => {
            FailureKind::Throttled
        }
        "InternalFailure" | "InternalFailureException" | "ServiceFailure" => FailureKind::Transient,
        "ResourceNotFoundException"
        | "InvalidArgumentException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidKMSResourceException"
        | "ResourceInUseException"
        | "ValidationException"
        | "SerializationException" => FailureKind::Refused,
        _ => FailureKind::Transient,
    }
}

/// A whole call's error answer (`{"__type": "...", "message": "..."}`), classified.
fn classify(status: u16, body: &[u8]) -> Failure {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v["__type"]
        .as_str()
        .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("Http{status}"));
    let message = v["message"]
        .as_str()
        .or_else(|| v["Message"].as_str())
        .unwrap_or("");
    let kind = match kind_of(&code) {
        FailureKind::Refused => FailureKind::Refused,
        FailureKind::Throttled => FailureKind::Throttled,
        _ if status == 503 => FailureKind::Throttled,
        _ if status >= 500 => FailureKind::Transient,
        // A 4xx without a type the agent knows: an operator's problem.
        _ if (400..500).contains(&status) => FailureKind::Refused,
        k => k,
    };
    let said = if message.is_empty() {
        format!("HTTP {status} {code}")
    } else {
        format!("HTTP {status} {code}: {message}")
    };
    failure(kind, &code, said)
}

/// The `PutRecordBatch` request body: each entry's data as one record, base64 as the JSON
/// protocol carries blobs.
fn batch_body(stream: &str, entries: &[&Entry]) -> Vec<u8> {
    let data: usize = entries.iter().map(|e| e.data.len()).sum();
    let mut out = Vec::with_capacity(data * 4 / 3 + entries.len() * 16 + stream.len() + 64);
    out.extend_from_slice(b"{\"DeliveryStreamName\":");
    serde_json::to_writer(&mut out, stream).expect("a string serializes");
    out.extend_from_slice(b",\"Records\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"Data\":\"");
        // Encoded in place, not through a string of its own.
        let at = out.len();
        out.resize(
            at + base64::encoded_len(e.data.len(), true).expect("a record's size"),
            0,
        );
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&e.data, &mut out[at..])
            .expect("sized by encoded_len");
        out.truncate(at + written);
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}");
    out
}

/// One outcome per entry from a 200 answer; a whole-call failure if it does not answer each.
fn outcomes(body: &[u8], entries: usize) -> Result<Vec<Outcome>, Failure> {
    let answer: BatchAnswer = serde_json::from_slice(body).map_err(|e| {
        failure(
            FailureKind::Transient,
            "BadAnswer",
            format!("PutRecordBatch answer not understood: {e}"),
        )
    })?;
    if answer.request_responses.len() != entries {
        return Err(failure(
            FailureKind::Transient,
            "BadAnswer",
            format!(
                "PutRecordBatch answered {} records of {entries}",
                answer.request_responses.len()
            ),
        ));
    }
    Ok(answer
        .request_responses
        .into_iter()
        .map(|r| match (r.record_id, r.error_code) {
            (Some(_), None) => Outcome::Accepted { shard: None },
            (_, code) => {
                let code = code.unwrap_or_else(|| "NoRecordId".to_string());
                let message = r.error_message.unwrap_or_default();
                Outcome::Failed {
                    failure: failure(kind_of(&code), &code, format!("{code}: {message}")),
                    shard: None,
                }
            }
        })
        .collect())
}

impl FirehoseSink {
    /// Opens the delivery stream's client (no call yet: `probe` checks the stream).
    pub(crate) async fn connect(
        name: &str,
        config: &FirehoseConfig,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<FirehoseSink, SinkError> {
        let refused = |m: String| SinkError {
            destination: name.to_string(),
            failure: failure(FailureKind::Refused, "Config", m),
        };
        let (region, credentials) =
            signed::region_and_credentials(config.region.as_deref(), credentials).await;
        let url = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://firehose.{region}.amazonaws.com"));
        let endpoint = Endpoint::parse(&url, None).map_err(refused)?;
        let client =
            SignedClient::new("firehose", region, endpoint, credentials).map_err(refused)?;
        Ok(FirehoseSink {
            name: name.to_string(),
            all: Arc::from(config.delivery_stream.as_str()),
            starts: crate::sink::call::one_bucket(),
            config: config.clone(),
            client,
        })
    }

    /// One call of Firehose's API: the answer body on 200, else why not.
    async fn call(&self, action: &str, body: Vec<u8>, timeout: Duration) -> Result<Bytes, Failure> {
        let headers = [
            ("content-type", "application/x-amz-json-1.1".to_string()),
            ("x-amz-target", format!("{TARGET}.{action}")),
        ];
        let answer = self
            .client
            .call(
                "POST",
                "/",
                &headers,
                Bytes::from(body),
                Payload::Signed,
                MAX_ANSWER,
                timeout,
            )
            .await?;
        if answer.status == 200 {
            Ok(answer.body)
        } else {
            Err(classify(answer.status, &answer.body))
        }
    }
}

impl Destination for FirehoseSink {
    fn call_limits(&self) -> CallLimits {
        CALL
    }

    fn max_record_bytes(&self) -> u64 {
        self.config.max_record_bytes
    }

    /// Every key goes to the one stream: records gather all keys.
    fn shard_for(&self, _key: &str) -> Option<Arc<str>> {
        Some(self.all.clone())
    }

    fn shard_starts(&self) -> Option<Arc<[u128]>> {
        Some(self.starts.clone())
    }

    async fn put(&self, entries: &[&Entry], timeout: Duration) -> Result<Vec<Outcome>, SinkError> {
        let body = batch_body(&self.config.delivery_stream, entries);
        let sink_error = |failure: Failure| SinkError {
            destination: self.name.clone(),
            failure,
        };
        let answer = self
            .call("PutRecordBatch", body, timeout)
            .await
            .map_err(sink_error)?;
        outcomes(&answer, entries.len()).map_err(sink_error)
    }

    /// `DescribeDeliveryStream`: the stream exists and these credentials may use it.
    async fn probe(&self) -> Result<(), Failure> {
        let mut body = b"{\"DeliveryStreamName\":".to_vec();
        serde_json::to_writer(&mut body, &self.config.delivery_stream).expect("a string");
        body.push(b'}');
        match self
            .call(
                "DescribeDeliveryStream",
                body,
                crate::aws::SMALL_CALL_TIMEOUT,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(f) if f.code == "ResourceNotFoundException" => Err(failure(
                FailureKind::Refused,
                &f.code,
                format!(
                    "delivery stream `{}` does not exist",
                    self.config.delivery_stream
                ),
            )),
            Err(f) => Err(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(data: &[u8]) -> Entry {
        Entry {
            data: data.to_vec(),
            key: "dev-1".into(),
            first_seq: 1,
        }
    }

    #[test]
    fn the_batch_body_carries_each_record_in_base64() {
        let (a, b) = (entry(b"{\"a\":1}\n"), entry(b"\x00\xff\n"));
        let body = batch_body("tele\"metry", &[&a, &b]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["DeliveryStreamName"], "tele\"metry");
        let records = v["Records"].as_array().unwrap();
        let decoded: Vec<Vec<u8>> = records
            .iter()
            .map(|r| {
                base64::engine::general_purpose::STANDARD
                    .decode(r["Data"].as_str().unwrap())
                    .unwrap()
            })
            .collect();
        assert_eq!(decoded, vec![a.data.clone(), b.data.clone()]);
    }

    #[test]
    fn partial_failures_are_answered_per_record() {
        let answer = br#"{"FailedPutCount":2,"Encrypted":false,"RequestResponses":[
            {"RecordId":"r1"},
            {"ErrorCode":"ServiceUnavailableException","ErrorMessage":"Slow down."},
            {"ErrorCode":"InternalFailure","ErrorMessage":"oops"}]}"#;
        let o = outcomes(answer, 3).unwrap();
        assert_eq!(o[0], Outcome::Accepted { shard: None });
        let kinds: Vec<FailureKind> = o[1..]
            .iter()
            .map(|o| match o {
                Outcome::Failed { failure, .. } => failure.kind,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, [FailureKind::Throttled, FailureKind::Transient]);
        // An answer that does not cover every record fails the call: nothing is taken as sent.
        assert_eq!(outcomes(answer, 4).unwrap_err().code, "BadAnswer");
        assert_eq!(outcomes(b"<html>", 1).unwrap_err().code, "BadAnswer");
    }

    #[test]
    fn whole_call_errors_are_classified_by_type() {
        let f = classify(
            400,
            br#"{"__type":"ResourceNotFoundException","message":"Firehose x not found"}"#,
        );
        assert_eq!(
            (f.kind, f.code.as_str()),
            (FailureKind::Refused, "ResourceNotFoundException")
        );
        assert!(f.message.contains("not found"), "{}", f.message);
        let f = classify(
            400,
            br#"{"__type":"com.amazonaws#ServiceUnavailableException"}"#,
        );
        assert_eq!(
            (f.kind, f.code.as_str()),
            (FailureKind::Throttled, "ServiceUnavailableException")
        );
        assert_eq!(classify(503, b"").kind, FailureKind::Throttled);
        assert_eq!(classify(500, b"").kind, FailureKind::Transient);
        assert_eq!(classify(403, b"").kind, FailureKind::Refused);
    }

    #[test]
    fn the_limits_are_firehoses_own() {
        assert_eq!((CALL.max_entries, CALL.max_bytes), (500, 4 * 1024 * 1024));
        assert_eq!(MAX_RECORD_BYTES, 1_024_000);
    }
}
