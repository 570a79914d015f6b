//! What every AWS client of the agent shares: the SDK config (rustls with ring, no SDK
//! retries, bounded timeouts) and where credentials come from: the standard chain
//! (environment, profile, container, IMDS) or the AWS IoT credentials provider.
//!
//! It must never log credentials, and never let the SDK retry on its own: the shipper decides
//! what is resent.

pub(crate) mod iot_credentials;

use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region};
use aws_credential_types::provider::SharedCredentialsProvider;
use std::time::Duration;

/// Longest wait for a connection to an AWS endpoint.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest attempt of a small call (reads, discovery). Calls that carry data set their own,
/// from their size and the measured uplink rate (see `crate::uplink`).
pub(crate) const SMALL_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where AWS credentials come from: the standard chain (environment, profile, container,
/// IMDS) unless `iot_credentials` is set.
#[derive(Debug, Clone, Default)]
pub(crate) struct AwsConfig {
    pub(crate) iot_credentials: Option<iot_credentials::IotCredentialsConfig>,
}

/// Where the agent's AWS credentials come from.
#[derive(Clone, Default)]
pub(crate) struct Credentials {
    /// `None`: the SDK's standard chain.
    pub(crate) provider: Option<SharedCredentialsProvider>,
    /// The AWS IoT provider's figures, when it is the source.
    pub(crate) iot_stats: Option<std::sync::Arc<iot_credentials::CredentialStats>>,
}

/// The credentials provider the config names, started (the IoT provider fetches its first
/// credentials in the background at once).
pub(crate) fn credentials(config: &AwsConfig) -> Result<Credentials, crate::tls::TlsError> {
    Ok(match &config.iot_credentials {
        Some(iot) => {
            let provider = iot_credentials::IotCredentials::start(iot)
                .map_err(|e| e.context("aws.iot_credentials"))?;
            Credentials {
                iot_stats: Some(provider.stats()),
                provider: Some(SharedCredentialsProvider::new(provider)),
            }
        }
        None => Credentials::default(),
    })
}

/// A failed SDK call in words: the innermost causes joined (e.g. `io error: Connection
/// refused (os error 111)`), never a Debug dump of the SDK's error types.
pub(crate) fn describe_sdk_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut causes: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        // Wrappers repeat their source's text or say nothing ("dispatch failure").
        if !text.is_empty() && !causes.iter().any(|c| c.contains(&text)) {
            causes.push(text);
        }
        next = e.source();
    }
    // The innermost causes say what happened; the outer ones only how it was called.
    causes.retain(|t| !matches!(t.as_str(), "dispatch failure" | "other" | "io error"));
    match causes.len() {
        0 => err.to_string(),
        n => causes[n.saturating_sub(2)..].join(": "),
    }
}

/// Loads the AWS config the way every AWS client of the agent does.
pub async fn sdk_config(
    region: Option<&str>,
    endpoint: Option<&str>,
    credentials: Option<SharedCredentialsProvider>,
) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(https)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(SMALL_CALL_TIMEOUT)
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(provider) = credentials {
        // The provider caches and refreshes ahead of expiry itself; a second cache in the SDK
        // would hold credentials past the provider's refresh point.
        loader = loader
            .credentials_provider(provider)
            .identity_cache(aws_config::identity::IdentityCache::no_cache());
    }
    loader.load().await
}
