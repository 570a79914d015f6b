//! Kinesis Data Streams through `PutRecords`, with the standard AWS credential chain, an
//! optional endpoint override (VPC endpoints, local emulators) and rustls with the ring
//! provider.
//!
//! The SDK's own retries are off: a whole-call failure comes back as [`SinkError`] and partial
//! failures per entry, so the shipper alone decides what is resent.

use super::{Entry, EntryFailure, SinkError};
use crate::config::KinesisConfig;
use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use std::time::Duration;

pub struct KinesisSink {
    name: String,
    stream: String,
    client: aws_sdk_kinesis::Client,
}

/// Loads the AWS config the way every AWS client of the agent does: rustls with ring for
/// HTTPS, no SDK retries, bounded timeouts.
pub async fn aws_config(region: Option<&str>, endpoint: Option<&str>) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(https)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

impl KinesisSink {
    pub async fn connect(name: &str, config: &KinesisConfig) -> KinesisSink {
        let sdk = aws_config(config.region.as_deref(), config.endpoint.as_deref()).await;
        KinesisSink {
            name: name.to_string(),
            stream: config.stream.clone(),
            client: aws_sdk_kinesis::Client::new(&sdk),
        }
    }

    pub async fn put(
        &self,
        entries: &[&Entry],
    ) -> Result<Vec<Result<(), EntryFailure>>, SinkError> {
        let mut request = self.client.put_records().stream_name(&self.stream);
        for e in entries {
            let entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(e.data.clone()))
                .partition_key(&e.key)
                .build()
                .map_err(|err| self.error(format!("building PutRecords entry: {err}"), false))?;
            request = request.records(entry);
        }
        let response = request.send().await.map_err(|err| self.sdk_error(err))?;
        let results = response.records();
        if results.len() != entries.len() {
            return Err(self.error(
                format!(
                    "PutRecords answered {} results for {} entries",
                    results.len(),
                    entries.len()
                ),
                true,
            ));
        }
        Ok(results
            .iter()
            .map(|r| match (r.sequence_number(), r.error_code()) {
                (Some(_), None) => Ok(()),
                (_, code) => Err(EntryFailure {
                    code: code.unwrap_or("NoSequenceNumber").to_string(),
                    message: r.error_message().unwrap_or_default().to_string(),
                }),
            })
            .collect())
    }

    fn error(&self, message: String, retryable: bool) -> SinkError {
        SinkError {
            destination: self.name.clone(),
            message,
            retryable,
        }
    }

    fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        err: SdkError<E>,
    ) -> SinkError {
        let (message, retryable) = match &err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("Unknown").to_string();
                let status = service.raw().status().as_u16();
                let retryable = status >= 500
                    || matches!(
                        code.as_str(),
                        "ProvisionedThroughputExceededException"
                            | "LimitExceededException"
                            | "ThrottlingException"
                    );
                (
                    format!(
                        "PutRecords to stream {}: {code} (HTTP {status}): {}",
                        self.stream,
                        service.err().message().unwrap_or("")
                    ),
                    retryable,
                )
            }
            SdkError::TimeoutError(_) => (
                format!("PutRecords to stream {}: timed out", self.stream),
                true,
            ),
            SdkError::DispatchFailure(d) => (
                format!(
                    "PutRecords to stream {}: cannot connect: {d:?}",
                    self.stream
                ),
                true,
            ),
            other => (
                format!(
                    "PutRecords to stream {}: {}",
                    self.stream,
                    error_chain(other)
                ),
                true,
            ),
        };
        self.error(message, retryable)
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
