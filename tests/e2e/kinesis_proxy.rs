//! A Kinesis front for tests that does what no installable emulator does: enforces per-shard
//! throughput limits and injects failures, with the real error shapes.
//!
//! It sits between the agent and the real emulator. `PutRecords` entries are mapped to shards
//! (MD5 of the partition key over the shards' hash-key ranges, as Kinesis does; the ranges are
//! given by the test, read from the emulator with ListShards); entries that fit their shard's
//! token buckets (records/s and bytes/s, one second of burst) are forwarded, the rest are
//! answered in place with `ProvisionedThroughputExceededException`, so the agent sees a real
//! partial failure. Faults queued with [`KinesisProxy::inject`] answer whole calls with a
//! `LimitExceededException` 400, a 500, or a reset connection. Every other operation passes
//! through unchanged. It counts what it forwarded and throttled per shard, so tests compare
//! the agent's metrics with what actually happened, count for count.

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A whole-call fault for the next PutRecords call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 `LimitExceededException`.
    LimitExceeded,
    /// HTTP 500 `InternalFailure`.
    InternalFailure,
    /// The connection is reset before any answer.
    Reset,
}

/// Per-shard limits; Kinesis' are 1,000 records/s and 1 MiB/s.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub records_per_sec: f64,
    pub bytes_per_sec: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardTally {
    pub forwarded_entries: u64,
    pub forwarded_bytes: u64,
    pub throttled_entries: u64,
}

struct Bucket {
    records: f64,
    bytes: f64,
    at: Instant,
}

struct State {
    upstream: u16,
    /// (start, end inclusive, shard id), sorted.
    ranges: Vec<(u128, u128, String)>,
    limits: Option<Limits>,
    buckets: BTreeMap<String, Bucket>,
    faults: VecDeque<Fault>,
    tally: BTreeMap<String, ShardTally>,
    faults_answered: u64,
    signed: Vec<Signed>,
}

/// Who signed one request: the access key id in its SigV4 `Authorization` header and its
/// `x-amz-security-token`, with the time it arrived.
#[derive(Debug, Clone)]
pub struct Signed {
    pub at: std::time::SystemTime,
    pub target: String,
    pub access_key_id: String,
    pub session_token: Option<String>,
}

pub struct KinesisProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl KinesisProxy {
    /// Starts the proxy in front of the emulator on `upstream`; `shards` are the stream's
    /// (shard id, starting hash key, ending hash key).
    pub fn start(
        upstream: u16,
        shards: &[(String, String, String)],
        limits: Option<Limits>,
    ) -> KinesisProxy {
        let mut ranges: Vec<(u128, u128, String)> = shards
            .iter()
            .map(|(id, a, b)| (a.parse().unwrap(), b.parse().unwrap(), id.clone()))
            .collect();
        ranges.sort();
        let state = Arc::new(Mutex::new(State {
            upstream,
            ranges,
            limits,
            buckets: BTreeMap::new(),
            faults: VecDeque::new(),
            tally: BTreeMap::new(),
            faults_answered: 0,
            signed: Vec::new(),
        }));
        let (runtime, listener, port) = crate::support::background_listener();
        let st = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { handle(st, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        KinesisProxy {
            port,
            state,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Queues whole-call faults for the next PutRecords calls, in order.
    pub fn inject(&self, faults: &[Fault]) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    pub fn tally(&self) -> BTreeMap<String, ShardTally> {
        self.state.lock().unwrap().tally.clone()
    }

    /// Every request's signer, in arrival order.
    pub fn signed(&self) -> Vec<Signed> {
        self.state.lock().unwrap().signed.clone()
    }

    pub fn faults_answered(&self) -> u64 {
        self.state.lock().unwrap().faults_answered
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

fn json_answer(status: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn shard_of(ranges: &[(u128, u128, String)], key: &str, explicit: Option<&str>) -> String {
    let hash = match explicit.and_then(|h| h.parse::<u128>().ok()) {
        Some(h) => h,
        None => u128::from_be_bytes(md5::compute(key.as_bytes()).0),
    };
    ranges
        .iter()
        .find(|(a, b, _)| (*a..=*b).contains(&hash))
        .map(|r| r.2.clone())
        .unwrap_or_else(|| "unmapped".into())
}

async fn handle(state: Arc<Mutex<State>>, req: Request<hyper::body::Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let access_key_id = header("authorization")
        .and_then(|a| {
            let after = a.split_once("Credential=")?.1;
            Some(after.split('/').next()?.to_string())
        })
        .unwrap_or_default();
    state.lock().unwrap().signed.push(Signed {
        at: std::time::SystemTime::now(),
        target: target.clone(),
        access_key_id,
        session_token: header("x-amz-security-token"),
    });
    if target != "Kinesis_20131202.PutRecords" {
        return forward(&state, &parts, body).await;
    }
    let fault = {
        let mut s = state.lock().unwrap();
        let f = s.faults.pop_front();
        if f.is_some() {
            s.faults_answered += 1;
        }
        f
    };
    match fault {
        Some(Fault::LimitExceeded) => {
            return Ok(json_answer(
                400,
                &json!({"__type": "LimitExceededException", "message": "Rate exceeded for stream under account 000000000000."}),
            ))
        }
        Some(Fault::InternalFailure) => {
            return Ok(json_answer(500, &json!({"__type": "InternalFailure"})))
        }
        Some(Fault::Reset) => return Err(std::io::Error::other("reset by the test")),
        None => {}
    }
    let request: Value = serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::other(format!("PutRecords body: {e}")))?;
    let entries = request["Records"].as_array().cloned().unwrap_or_default();
    // Decide each entry: forward (its shard and size) or throttle (its shard). Entries are
    // tallied only in an answer that reaches the agent: forwarded ones once the emulator
    // accepted them, throttled ones when the call's answer is built.
    let mut decisions: Vec<Result<(String, u64), String>> = Vec::with_capacity(entries.len());
    let mut forwarded = Vec::new();
    {
        let mut s = state.lock().unwrap();
        let now = Instant::now();
        for e in &entries {
            let key = e["PartitionKey"].as_str().unwrap_or("");
            let shard = shard_of(&s.ranges, key, e["ExplicitHashKey"].as_str());
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(e["Data"].as_str().unwrap_or(""))
                .map_or(0, |d| d.len())
                + key.len();
            let fits = match s.limits {
                None => true,
                Some(l) => {
                    let b = s.buckets.entry(shard.clone()).or_insert(Bucket {
                        records: l.records_per_sec,
                        bytes: l.bytes_per_sec,
                        at: now,
                    });
                    let dt = now.duration_since(b.at).as_secs_f64();
                    b.at = now;
                    b.records = (b.records + dt * l.records_per_sec).min(l.records_per_sec);
                    b.bytes = (b.bytes + dt * l.bytes_per_sec).min(l.bytes_per_sec);
                    // A record larger than a second's bytes goes when the bucket is full, and
                    // the shard owes it (as Kinesis takes records up to its record limit,
                    // however its per-second budget compares).
                    if b.records >= 1.0 && (b.bytes >= bytes as f64 || b.bytes >= l.bytes_per_sec) {
                        b.records -= 1.0;
                        b.bytes -= bytes as f64;
                        true
                    } else {
                        false
                    }
                }
            };
            if fits {
                forwarded.push(e.clone());
                decisions.push(Ok((shard, bytes as u64)));
            } else {
                decisions.push(Err(shard));
            }
        }
    }
    let mut upstream_results: VecDeque<Value> = VecDeque::new();
    if !forwarded.is_empty() {
        let mut request = request.clone();
        request["Records"] = Value::Array(forwarded);
        let answer = forward(&state, &parts, Bytes::from(request.to_string())).await?;
        let status = answer.status();
        let bytes = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            // The emulator refused the whole call: pass its answer on as is.
            return Ok(Response::builder()
                .status(status)
                .header("content-type", "application/x-amz-json-1.1")
                .body(Full::new(bytes))
                .unwrap());
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::other(format!("emulator answer: {e}")))?;
        upstream_results = v["Records"].as_array().cloned().unwrap_or_default().into();
    }
    let mut failed = 0;
    let mut s = state.lock().unwrap();
    let results: Vec<Value> = decisions
        .into_iter()
        .map(|d| match d {
            Ok((shard, bytes)) => {
                let r = upstream_results.pop_front().unwrap_or(json!({"ErrorCode": "InternalFailure", "ErrorMessage": "missing"}));
                if r["ErrorCode"].is_string() {
                    failed += 1;
                } else {
                    let t = s.tally.entry(shard).or_default();
                    t.forwarded_entries += 1;
                    t.forwarded_bytes += bytes;
                }
                r
            }
            Err(shard) => {
                failed += 1;
                s.tally.entry(shard.clone()).or_default().throttled_entries += 1;
                json!({
                    "ErrorCode": "ProvisionedThroughputExceededException",
                    "ErrorMessage": format!("Rate exceeded for shard {shard} in stream under account 000000000000."),
                })
            }
        })
        .collect();
    drop(s);
    Ok(json_answer(
        200,
        &json!({"FailedRecordCount": failed, "Records": results}),
    ))
}

/// Sends the request to the emulator over a fresh connection and returns its answer.
async fn forward(
    state: &Arc<Mutex<State>>,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Answer {
    let upstream = state.lock().unwrap().upstream;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: 127.0.0.1:{upstream}\r\n",
        parts.method, parts.uri
    );
    for (name, value) in &parts.headers {
        if matches!(
            name.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            continue;
        }
        head.push_str(&format!("{}: {}\r\n", name, value.to_str().unwrap_or("")));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&body).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("emulator answer without a header"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    let mut builder = Response::builder().status(status);
    let mut chunked = false;
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
                continue;
            }
            if matches!(name.as_str(), "content-length" | "connection") {
                continue;
            }
            builder = builder.header(name, value);
        }
    }
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(builder.body(Full::new(Bytes::from(body))).unwrap())
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| std::io::Error::other("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
