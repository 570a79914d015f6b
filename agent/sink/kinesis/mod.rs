//! Kinesis Data Streams through `PutRecords`, with the credentials [`crate::aws`] provides
//! (standard chain or AWS IoT), an optional endpoint override (VPC endpoints, local
//! emulators) and rustls with the ring provider.
//!
//! The SDK's own retries are off: a whole-call failure comes back as [`SinkError`] and partial
//! failures per entry, each classified ([`errors`]), so the shipper alone decides what is
//! resent. The service's quotas are in [`limits`], the mapping of keys to shards in [`shard`].
//!
//! The stream's open shards are learned with ListShards in the background (at start, when
//! unknown, and when an accepted entry lands on a shard the map does not have, i.e. after a
//! reshard), so outcomes carry the shard an entry went to, or was meant for. Sending never
//! waits for that discovery.

pub(crate) mod errors;
pub(crate) mod limits;
pub mod shard;

use crate::sink::call::{
    CallLimits, Destination, Entry, Failure, FailureKind, Outcome, ShardLimits, SinkError,
};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use shard::ShardMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `[destination.NAME]` of `type = "kinesis"`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct KinesisConfig {
    pub(crate) stream: String,
    pub(crate) region: Option<String>,
    pub(crate) endpoint: Option<String>,
    /// Largest record (data and partition key) sent; the stream's own limit lowers it.
    pub(crate) max_record_bytes: u64,
    /// What the shipper paces each shard to (Kinesis: 1 MiB/s and 1,000 records/s).
    pub(crate) shard_limits: ShardLimits,
}

/// Shard discovery runs at most this often (ListShards allows far more per stream; a reshard
/// is learned within seconds).
const SHARD_REFRESH_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct KinesisSink {
    name: String,
    stream: String,
    /// Where calls go, for error messages: the endpoint override or the regional endpoint.
    endpoint: String,
    max_record_bytes: u64,
    shard_limits: ShardLimits,
    client: aws_sdk_kinesis::Client,
    shards: Arc<Mutex<Shards>>,
}

#[derive(Default)]
struct Shards {
    map: Option<Arc<ShardMap>>,
    /// When discovery last started; `running` while a ListShards walk is under way.
    last_attempt: Option<Instant>,
    running: bool,
    /// The stream's own record size limit (`MaxRecordSizeInKiB`), when it states one.
    max_record_bytes: Option<u64>,
}

/// The stream's `MaxRecordSizeInKiB` in bytes, if it states one (streams whose limit was
/// never raised, and emulators, may leave it out).
async fn stream_max_record_bytes(client: &aws_sdk_kinesis::Client, stream: &str) -> Option<u64> {
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .ok()?;
    let kib = summary
        .stream_description_summary()?
        .max_record_size_in_kib()?;
    u64::try_from(kib).ok().map(|k| k * 1024)
}

/// Why the shards could not be learned (logged at debug level; sending goes on without them).
#[derive(Debug, thiserror::Error)]
enum DiscoveryError {
    #[error("ListShards: {0}")]
    Call(String),
    #[error(transparent)]
    Ranges(#[from] shard::ShardMapError),
}

/// Walks ListShards (all pages) and returns the open shards' map.
async fn list_open_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<ShardMap, DiscoveryError> {
    let mut ranges: Vec<(String, String, String)> = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // The API takes either the stream name or a continuation token, never both.
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let page = request.send().await.map_err(|e| {
            DiscoveryError::Call(match e.as_service_error() {
                Some(s) => format!(
                    "{}: {}",
                    s.code().unwrap_or("Unknown"),
                    s.message().unwrap_or("")
                ),
                None => crate::aws::describe_sdk_error(&e),
            })
        })?;
        for shard in page.shards() {
            // A shard with an ending sequence number is closed (split or merged away).
            let closed = shard
                .sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_some();
            if let (false, Some(range)) = (closed, shard.hash_key_range()) {
                ranges.push((
                    shard.shard_id().to_string(),
                    range.starting_hash_key().to_string(),
                    range.ending_hash_key().to_string(),
                ));
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(ShardMap::new(
        ranges
            .iter()
            .map(|(id, a, b)| (id.as_str(), a.as_str(), b.as_str())),
    )?)
}

impl KinesisSink {
    pub(crate) async fn connect(
        name: &str,
        config: &KinesisConfig,
        credentials: Option<SharedCredentialsProvider>,
    ) -> KinesisSink {
        let sdk = crate::aws::sdk_config(
            config.region.as_deref(),
            config.endpoint.as_deref(),
            credentials,
        )
        .await;
        let endpoint = match (&config.endpoint, sdk.region()) {
            (Some(e), _) => e.clone(),
            (None, Some(r)) => format!("kinesis.{r}.amazonaws.com"),
            (None, None) => "the Kinesis endpoint (no region set)".to_string(),
        };
        let sink = KinesisSink {
            name: name.to_string(),
            stream: config.stream.clone(),
            endpoint,
            max_record_bytes: config.max_record_bytes,
            shard_limits: config.shard_limits,
            client: aws_sdk_kinesis::Client::new(&sdk),
            shards: Arc::default(),
        };
        sink.refresh_shards(true);
        sink
    }

    /// Whether the stream answers: DescribeStreamSummary, with the reason when it does not.
    async fn probe_stream(&self) -> Result<(), Failure> {
        match self
            .client
            .describe_stream_summary()
            .stream_name(&self.stream)
            .send()
            .await
        {
            Ok(out) => match out.stream_description_summary().map(|s| s.stream_status()) {
                Some(aws_sdk_kinesis::types::StreamStatus::Deleting) => Err(Failure::new(
                    FailureKind::Refused,
                    "StreamDeleting",
                    format!("stream {} is being deleted", self.stream),
                )),
                _ => Ok(()),
            },
            Err(e) => {
                let mut failure = self.sdk_failure(e);
                failure.message = format!(
                    "DescribeStreamSummary of stream {}: {}",
                    self.stream, failure.message
                );
                Err(failure)
            }
        }
    }

    /// The open shards as last learned, if they are known yet.
    fn shard_map(&self) -> Option<Arc<ShardMap>> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .clone()
    }

    /// The stream's record size limit, once learned.
    fn stated_record_bytes(&self) -> Option<u64> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max_record_bytes
    }

    /// Starts a background ListShards walk unless one is under way; one asked for within
    /// [`SHARD_REFRESH_EVERY`] of the last waits out the rest of that interval (`now` skips
    /// the wait), so a reshard is learned even if no further entry asks again.
    fn refresh_shards(&self, now: bool) {
        let delay = {
            let mut s = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            if s.running {
                return;
            }
            let delay = match s.last_attempt {
                Some(t) if !now => SHARD_REFRESH_EVERY.saturating_sub(t.elapsed()),
                _ => Duration::ZERO,
            };
            s.running = true;
            s.last_attempt = Some(Instant::now() + delay);
            delay
        };
        let (client, stream, name, shards) = (
            self.client.clone(),
            self.stream.clone(),
            self.name.clone(),
            self.shards.clone(),
        );
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let found = list_open_shards(&client, &stream).await;
            let max_record = match found {
                Ok(_) => stream_max_record_bytes(&client, &stream).await,
                Err(_) => None,
            };
            let mut s = shards.lock().unwrap_or_else(|p| p.into_inner());
            s.running = false;
            if max_record.is_some() && max_record != s.max_record_bytes {
                tracing::info!(destination = %name, %stream, max_record_bytes = max_record, "learned the stream's record size limit");
                s.max_record_bytes = max_record;
            }
            match found {
                Ok(map) => {
                    if s.map.as_deref() != Some(&map) {
                        tracing::info!(destination = %name, %stream, open_shards = map.len(), "learned the stream's shards");
                    }
                    s.map = Some(Arc::new(map));
                }
                Err(e) => {
                    tracing::debug!(destination = %name, %stream, error = %e, "cannot list the stream's shards yet");
                }
            }
        });
    }

    async fn put_records(
        &self,
        entries: &[&Entry],
        timeout: Duration,
    ) -> Result<Vec<Outcome>, SinkError> {
        let mut request = self.client.put_records().stream_name(&self.stream);
        for e in entries {
            let (partition_key, hash_key) = crate::key::split(&e.key);
            let entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(e.data.clone()))
                .partition_key(partition_key)
                .set_explicit_hash_key(hash_key.map(str::to_string))
                .build()
                .map_err(|err| {
                    self.error(Failure::new(
                        FailureKind::Refused,
                        "InvalidEntry",
                        format!("building a PutRecords entry: {err}"),
                    ))
                })?;
            request = request.records(entry);
        }
        // The attempt timeout follows the call's size and the measured uplink (the client's
        // own is for small calls); the override replaces the whole timeout config.
        let response = request
            .customize()
            .config_override(
                aws_sdk_kinesis::Config::builder().timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .connect_timeout(crate::aws::CONNECT_TIMEOUT)
                        .operation_attempt_timeout(timeout)
                        .build(),
                ),
            )
            .send()
            .await
            .map_err(|err| {
                let mut failure = self.sdk_failure(err);
                failure.message =
                    format!("PutRecords to stream {}: {}", self.stream, failure.message);
                self.error(failure)
            })?;
        let results = response.records();
        if results.len() != entries.len() {
            return Err(self.error(Failure::new(
                FailureKind::Transient,
                "ResultCountMismatch",
                format!(
                    "PutRecords answered {} results for {} entries",
                    results.len(),
                    entries.len()
                ),
            )));
        }
        let map = self.shard_map();
        let mut unknown_shard = map.is_none();
        let outcomes = results
            .iter()
            .zip(entries)
            .map(|(r, e)| match (r.sequence_number(), r.error_code()) {
                (Some(_), None) => {
                    let shard = r.shard_id().map(|id| {
                        match map.as_ref().and_then(|m| m.shard_id_for_spooled(&e.key)) {
                            // Reuse the map's id (no allocation) when it agrees.
                            Some(known) if &*known == id => known,
                            _ => {
                                unknown_shard = true;
                                Arc::from(id)
                            }
                        }
                    });
                    Outcome::Accepted { shard }
                }
                (_, code) => {
                    let code = code.unwrap_or("NoSequenceNumber");
                    let message = r.error_message().unwrap_or_default();
                    Outcome::Failed {
                        failure: Failure::new(errors::classify(code, 0, message), code, message),
                        shard: map.as_ref().and_then(|m| m.shard_id_for_spooled(&e.key)),
                    }
                }
            })
            .collect();
        if unknown_shard {
            self.refresh_shards(false);
        }
        Ok(outcomes)
    }

    fn error(&self, failure: Failure) -> SinkError {
        SinkError {
            destination: self.name.clone(),
            failure,
        }
    }

    /// A failed SDK call as a classified failure whose message reads as a sentence.
    fn sdk_failure<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        err: SdkError<E>,
    ) -> Failure {
        match &err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("Unknown");
                let status = service.raw().status().as_u16();
                let text = service.err().message().unwrap_or("");
                let kind = errors::classify(code, status, text);
                let message = format!("{code} (HTTP {status}): {text}");
                // A code with no shape (e.g. a proxy's 502 page) is labelled by its status.
                let code = if code == "Unknown" {
                    format!("Http{status}")
                } else {
                    code.to_string()
                };
                Failure::new(kind, code, message)
            }
            SdkError::TimeoutError(_) => Failure::new(
                FailureKind::TimedOut,
                "Timeout",
                format!("no answer from {} in time", self.endpoint),
            ),
            SdkError::DispatchFailure(_) => Failure::new(
                FailureKind::Transient,
                "Connect",
                format!(
                    "cannot connect to {}: {}",
                    self.endpoint,
                    crate::aws::describe_sdk_error(&err)
                ),
            ),
            SdkError::ResponseError(_) => Failure::new(
                FailureKind::Transient,
                "BadResponse",
                format!(
                    "unreadable answer from {}: {}",
                    self.endpoint,
                    crate::aws::describe_sdk_error(&err)
                ),
            ),
            _ => Failure::new(
                FailureKind::Transient,
                "Other",
                crate::aws::describe_sdk_error(&err),
            ),
        }
    }
}

impl Destination for KinesisSink {
    fn call_limits(&self) -> CallLimits {
        limits::CALL
    }

    fn max_record_bytes(&self) -> u64 {
        match self.stated_record_bytes() {
            Some(stated) => stated.min(self.max_record_bytes),
            None => self.max_record_bytes,
        }
    }

    fn shard_limits(&self) -> Option<ShardLimits> {
        Some(self.shard_limits)
    }

    fn billing_unit_bytes(&self) -> Option<u64> {
        Some(limits::PUT_UNIT_BYTES)
    }

    fn shard_for(&self, key: &str) -> Option<Arc<str>> {
        self.shard_map()?.shard_id_for_spooled(key)
    }

    fn shard_starts(&self) -> Option<Arc<[u128]>> {
        Some(self.shard_map()?.starts())
    }

    async fn put(&self, entries: &[&Entry], timeout: Duration) -> Result<Vec<Outcome>, SinkError> {
        self.put_records(entries, timeout).await
    }

    async fn probe(&self) -> Result<(), Failure> {
        self.probe_stream().await
    }
}
