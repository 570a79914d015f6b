//! Amazon S3, and S3-compatible stores, as an object destination: the bucket's half of the
//! batch path. The shipper of object destinations (`ship/objects`) decides what goes in an
//! object; this module only talks to the bucket: `PutObject`, the multipart upload calls,
//! and `HeadBucket` for health checks.
//!
//! Requests are signed with AWS Signature Version 4 (`aws-sigv4`, the AWS SDK's own signer)
//! and sent through the agent's one HTTP client ([`crate::http`]), over TLS with the system's
//! CA store for `https`. Not the AWS SDK's S3 client: it would add about 2 MiB to the aarch64
//! binary (whose budget is 12 MiB) for five calls. Every body carries `Content-MD5`, so a part
//! damaged on the way is refused by S3 rather than stored.
//!
//! It never retries (the shipper does, with backoff), never logs credentials, and reports a
//! call done only on S3's 2xx answer, after which the data is durable in the bucket.

pub(crate) mod athena;
pub(crate) mod layout;

use crate::sink::call::{CallLimits, Destination, Entry, Failure, FailureKind, Outcome, SinkError};
use crate::sink::signed::{self, Endpoint, Payload, SignedClient};
use aws_credential_types::provider::SharedCredentialsProvider;
use base64::Engine;
use bytes::Bytes;
use layout::KeyTemplate;
use std::time::Duration;

/// How objects are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Gzip,
}

impl Compression {
    /// The key's extension (`{ext}`).
    pub(crate) fn ext(self) -> &'static str {
        match self {
            Compression::Zstd => "ndjson.zst",
            Compression::Gzip => "ndjson.gz",
        }
    }
}

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    /// JSON lines (FORMAT.md), compressed as a whole.
    Ndjson,
    /// Parquet (cargo feature `parquet`), zstd inside.
    Parquet,
}

/// A daily span of local time in which uploads may run, `[start, end)` in minutes after
/// midnight; one that ends before it starts runs over midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadWindow {
    pub(crate) start_min: u32,
    pub(crate) end_min: u32,
}

impl UploadWindow {
    /// Parses `HH:MM-HH:MM`.
    pub(crate) fn parse(text: &str) -> Option<UploadWindow> {
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
        };
        let (a, b) = text.split_once('-')?;
        let (start_min, end_min) = (minutes(a)?, minutes(b)?);
        (start_min != end_min).then_some(UploadWindow { start_min, end_min })
    }

    /// Whether `minute` (after local midnight) is inside.
    pub(crate) fn contains(&self, minute: u32) -> bool {
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        }
    }
}

/// A `[destination.NAME]` of `type = "s3"`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Config {
    pub(crate) bucket: String,
    /// Leading part of every key (`{prefix}`), without slashes at its ends; may be empty.
    pub(crate) prefix: String,
    pub(crate) region: Option<String>,
    /// An S3-compatible store's URL instead of AWS's (`http://127.0.0.1:9000`).
    pub(crate) endpoint: Option<String>,
    /// `endpoint/bucket/key` instead of `bucket.endpoint/key`.
    pub(crate) path_style: bool,
    pub(crate) key_template: KeyTemplate,
    pub(crate) format: ObjectFormat,
    pub(crate) compression: Compression,
    pub(crate) compression_level: i32,
    /// An object closes when its records reach this many bytes as spooled, uncompressed.
    pub(crate) max_object_bytes: u64,
    /// ... or when its first record is this old.
    pub(crate) max_object_age: Duration,
    /// Compressed bytes per part of a multipart upload; an object that compresses to less
    /// is sent in one `PutObject`.
    pub(crate) part_bytes: u64,
    /// Uploads run only inside these (local time); empty: always.
    pub(crate) upload_windows: Vec<UploadWindow>,
    /// SSE-KMS: objects encrypted with this KMS key (id, ARN or alias).
    pub(crate) sse_kms_key_id: Option<String>,
}

impl S3Config {
    /// The key's extension (`{ext}`).
    pub(crate) fn ext(&self) -> &'static str {
        match self.format {
            ObjectFormat::Parquet => "parquet",
            ObjectFormat::Ndjson => self.compression.ext(),
        }
    }
}

/// S3's smallest part (but the last) of a multipart upload, and its most parts.
pub(crate) const MIN_PART_BYTES: u64 = 5 << 20;
pub(crate) const MAX_PARTS: u64 = 10_000;

/// Longest answer body read (errors, upload ids).
const MAX_ANSWER: usize = 64 << 10;

/// One bucket.
pub(crate) struct S3Sink {
    name: String,
    config: S3Config,
    client: SignedClient,
}

fn failure(kind: FailureKind, code: &str, message: impl Into<String>) -> Failure {
    Failure::new(kind, code, message)
}

/// The text of `<tag>` in an XML answer.
fn xml_text<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))?;
    Some(&body[start..start + end])
}

/// Percent-encodes a key for a URL path, `/` kept (S3's own encoding: unreserved characters
/// stay).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encodes a query value.
fn encode_query(value: &str) -> String {
    encode_key(value).replace('/', "%2F")
}

/// What S3 said, classified: the shipper only sees kinds.
fn classify(status: u16, body: &[u8]) -> Failure {
    let text = String::from_utf8_lossy(body);
    let code = xml_text(&text, "Code").unwrap_or("").to_string();
    let message = xml_text(&text, "Message").unwrap_or("").to_string();
    let code = if code.is_empty() {
        format!("Http{status}")
    } else {
        code
    };
    let kind = match (status, code.as_str()) {
        (503, _) | (_, "SlowDown") => FailureKind::Throttled,
        (500..=599, _) | (_, "RequestTimeout") | (_, "InternalError") => FailureKind::Transient,
        _ => FailureKind::Refused,
    };
    let said = if message.is_empty() {
        format!("HTTP {status} {code}")
    } else {
        format!("HTTP {status} {code}: {message}")
    };
    failure(kind, &code, said)
}

impl S3Sink {
    /// Opens the bucket's client (no call yet: `probe` checks the bucket).
    pub(crate) async fn connect(
        name: &str,
        config: &S3Config,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<S3Sink, SinkError> {
        let refused = |m: String| SinkError {
            destination: name.to_string(),
            failure: failure(FailureKind::Refused, "Config", m),
        };
        let (region, credentials) =
            signed::region_and_credentials(config.region.as_deref(), credentials).await;
        let url = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let authority = if config.path_style {
            None
        } else {
            let base = Endpoint::parse(&url, None).map_err(refused)?.authority;
            Some(format!("{}.{base}", config.bucket))
        };
        let endpoint = Endpoint::parse(&url, authority.as_deref()).map_err(refused)?;
        let client = SignedClient::new("s3", region, endpoint, credentials).map_err(refused)?;
        Ok(S3Sink {
            name: name.to_string(),
            config: config.clone(),
            client,
        })
    }

    pub(crate) fn config(&self) -> &S3Config {
        &self.config
    }

    /// The path of `key` (or of the bucket, for `None`) on the endpoint.
    fn path(&self, key: Option<&str>) -> String {
        match (key.map(encode_key), self.config.path_style) {
            (Some(key), true) => format!("/{}/{key}", self.config.bucket),
            (None, true) => format!("/{}", self.config.bucket),
            (Some(key), false) => format!("/{key}"),
            (None, false) => "/".to_string(),
        }
    }

    /// Signs and sends one request; the answer when S3 said 2xx, else why not.
    async fn call(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<crate::http::Answer, Failure> {
        let answer = self
            .client
            .call(
                method,
                path_and_query,
                headers,
                body,
                Payload::Unsigned,
                MAX_ANSWER,
                timeout,
            )
            .await?;
        if (200..300).contains(&answer.status) {
            Ok(answer)
        } else {
            Err(classify(answer.status, &answer.body))
        }
    }

    /// How long a call carrying `bytes` may take: slow uplinks carry tens of MiB too.
    fn timeout_for(bytes: usize) -> Duration {
        crate::aws::SMALL_CALL_TIMEOUT + Duration::from_secs((bytes >> 15) as u64)
    }

    fn md5_header(body: &[u8]) -> (String, String) {
        let digest = md5::compute(body);
        (
            base64::engine::general_purpose::STANDARD.encode(digest.0),
            format!("{digest:x}"),
        )
    }

    fn sse_headers(&self, headers: &mut Vec<(&'static str, String)>) {
        if let Some(key) = &self.config.sse_kms_key_id {
            headers.push(("x-amz-server-side-encryption", "aws:kms".to_string()));
            headers.push(("x-amz-server-side-encryption-aws-kms-key-id", key.clone()));
        }
    }

    fn content_type(&self) -> (&'static str, String) {
        let kind = match self.config.format {
            ObjectFormat::Ndjson => "application/x-ndjson",
            ObjectFormat::Parquet => "application/vnd.apache.parquet",
        };
        ("content-type", kind.to_string())
    }

    /// Stores `body` at `key` in one `PutObject`.
    pub(crate) async fn put_object(&self, key: &str, body: Bytes) -> Result<(), Failure> {
        let (md5, _) = Self::md5_header(&body);
        let mut headers = vec![("content-md5", md5), self.content_type()];
        self.sse_headers(&mut headers);
        let timeout = Self::timeout_for(body.len());
        self.call("PUT", &self.path(Some(key)), &headers, body, timeout)
            .await
            .map(|_| ())
    }

    /// Starts a multipart upload of `key`; its upload id.
    pub(crate) async fn create_multipart(&self, key: &str) -> Result<String, Failure> {
        let mut headers = vec![self.content_type()];
        self.sse_headers(&mut headers);
        let answer = self
            .call(
                "POST",
                &format!("{}?uploads", self.path(Some(key))),
                &headers,
                Bytes::new(),
                crate::aws::SMALL_CALL_TIMEOUT,
            )
            .await?;
        let text = String::from_utf8_lossy(&answer.body);
        xml_text(&text, "UploadId")
            .map(str::to_string)
            .ok_or_else(|| {
                failure(
                    FailureKind::Transient,
                    "NoUploadId",
                    "CreateMultipartUpload answered without an UploadId",
                )
            })
    }

    /// Uploads part `number` (from 1); its ETag and the MD5 (hex) of its bytes.
    pub(crate) async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: usize,
        body: Bytes,
    ) -> Result<String, Failure> {
        let (md5, _) = Self::md5_header(&body);
        let timeout = Self::timeout_for(body.len());
        let answer = self
            .call(
                "PUT",
                &format!(
                    "{}?partNumber={number}&uploadId={}",
                    self.path(Some(key)),
                    encode_query(upload_id)
                ),
                &[("content-md5", md5)],
                body,
                timeout,
            )
            .await?;
        answer
            .headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                failure(
                    FailureKind::Transient,
                    "NoETag",
                    "UploadPart answered without an ETag",
                )
            })
    }

    /// Completes a multipart upload of these parts (ETags in part order).
    pub(crate) async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), Failure> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                etag.replace('&', "&amp;").replace('<', "&lt;")
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let body = Bytes::from(xml);
        let (md5, _) = Self::md5_header(&body);
        let answer = self
            .call(
                "POST",
                &self.upload_path(key, upload_id),
                &[
                    ("content-md5", md5),
                    ("content-type", "application/xml".to_string()),
                ],
                body,
                // S3 may take minutes to assemble a large object, sending spaces meanwhile.
                Duration::from_secs(600),
            )
            .await?;
        // An error can come with status 200, in the body.
        let text = String::from_utf8_lossy(&answer.body);
        if text.contains("<Error>") {
            return Err(classify(500, &answer.body));
        }
        Ok(())
    }

    /// Whether S3 still knows a multipart upload (`ListParts` of one part): asked when calls
    /// on it keep failing, since some S3-compatible stores answer an upload they no longer
    /// have with a server error or `AccessDenied` instead of `NoSuchUpload`. `Err` when the
    /// store gives no answer either way.
    pub(crate) async fn upload_exists(&self, key: &str, upload_id: &str) -> Result<bool, Failure> {
        let path = format!("{}&max-parts=1", self.upload_path(key, upload_id));
        match self.small_call("GET", &path).await {
            Ok(_) => Ok(true),
            Err(f) if f.code == "NoSuchUpload" => Ok(false),
            Err(f) => Err(f),
        }
    }

    /// Abandons a multipart upload (its parts are freed).
    pub(crate) async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), Failure> {
        match self
            .small_call("DELETE", &self.upload_path(key, upload_id))
            .await
        {
            Err(f) if f.code == "NoSuchUpload" => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// `key`'s path with the query naming one of its multipart uploads.
    fn upload_path(&self, key: &str, upload_id: &str) -> String {
        format!(
            "{}?uploadId={}",
            self.path(Some(key)),
            encode_query(upload_id)
        )
    }

    /// A call without a body or headers, answered within the small-call timeout.
    async fn small_call(&self, method: &str, path: &str) -> Result<crate::http::Answer, Failure> {
        self.call(
            method,
            path,
            &[],
            Bytes::new(),
            crate::aws::SMALL_CALL_TIMEOUT,
        )
        .await
    }

    /// The MD5 (hex) of a part, as kept with its ETag.
    pub(crate) fn part_md5(body: &[u8]) -> String {
        Self::md5_header(body).1
    }
}

/// What is refused for an object destination: records are not sent one by one.
const CALL: CallLimits = CallLimits {
    max_entries: 1,
    max_bytes: 5 << 20,
    queued_calls: 2,
};

impl Destination for S3Sink {
    fn call_limits(&self) -> CallLimits {
        CALL
    }

    fn max_record_bytes(&self) -> u64 {
        self.config.max_object_bytes
    }

    /// Objects are built by their own shipper; a stream shipper never gets this destination.
    async fn put(&self, entries: &[&Entry], _timeout: Duration) -> Result<Vec<Outcome>, SinkError> {
        let _ = entries;
        Err(SinkError {
            destination: self.name.clone(),
            failure: failure(
                FailureKind::Refused,
                "NotAStream",
                "an S3 destination takes objects, not records",
            ),
        })
    }

    /// `HeadBucket`: the bucket exists and these credentials may use it.
    async fn probe(&self) -> Result<(), Failure> {
        match self
            .call(
                "HEAD",
                &self.path(None),
                &[],
                Bytes::new(),
                crate::aws::SMALL_CALL_TIMEOUT,
            )
            .await
        {
            Ok(_) => Ok(()),
            // A HEAD answer has no body: say what the status means.
            Err(f) if f.code == "Http404" => Err(failure(
                FailureKind::Refused,
                "NoSuchBucket",
                format!("bucket `{}` does not exist", self.config.bucket),
            )),
            Err(f) if f.code == "Http403" => Err(failure(
                FailureKind::Refused,
                "AccessDenied",
                format!(
                    "access to bucket `{}` denied for these credentials",
                    self.config.bucket
                ),
            )),
            Err(f) => Err(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_upload_ids_are_encoded_as_s3_wants() {
        assert_eq!(
            encode_key("p/dt=2026-12-03/hr=13/gw 1+x.ndjson.zst"),
            "p/dt%3D2026-12-03/hr%3D13/gw%201%2Bx.ndjson.zst"
        );
        assert_eq!(encode_query("a/b+c="), "a%2Fb%2Bc%3D");
    }

    #[test]
    fn s3_errors_are_classified_by_code_and_status() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        let f = classify(404, body);
        assert_eq!(
            (f.kind, f.code.as_str()),
            (FailureKind::Refused, "NoSuchBucket")
        );
        assert!(f.message.contains("does not exist"), "{}", f.message);
        assert_eq!(classify(503, b"").kind, FailureKind::Throttled);
        assert_eq!(classify(500, b"").kind, FailureKind::Transient);
        assert_eq!(classify(403, b"").code, "Http403");
    }

    #[test]
    fn upload_windows_parse_and_run_over_midnight() {
        let w = UploadWindow::parse("01:00-05:00").unwrap();
        assert!(w.contains(60) && w.contains(299) && !w.contains(300) && !w.contains(59));
        let night = UploadWindow::parse("22:30-02:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && !night.contains(12 * 60));
        for bad in ["1-5", "01:00", "25:00-26:00", "03:00-03:00", "01:60-02:00"] {
            assert_eq!(UploadWindow::parse(bad), None, "{bad}");
        }
    }
}
