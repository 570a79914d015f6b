//! Requests to an AWS service signed with Signature Version 4 (`aws-sigv4`, the AWS SDK's own
//! signer) and sent through the agent's one HTTP client ([`crate::http`]), over TLS with the
//! system's CA store for `https`: for the services the agent calls without an SDK client
//! (S3 and Firehose), each of which would add an SDK crate to the binary for a few calls.
//!
//! It sends one request and returns the answer, whatever its status: reading a service's
//! error body is its destination's job. It never retries, never logs credentials, and never
//! reads an answer longer than the caller allows.

use crate::sink::call::{Failure, FailureKind};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use bytes::Bytes;
use http_body_util::Full;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Where requests go.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) https: bool,
    /// `host[:port]` as the `Host` header says it.
    pub(crate) authority: String,
    host: String,
    port: u16,
}

impl Endpoint {
    /// `http(s)://host[:port][/...]`, with `authority` in place of the URL's when given (S3's
    /// virtual-hosted buckets); the path is not kept.
    pub(crate) fn parse(url: &str, authority: Option<&str>) -> Result<Endpoint, String> {
        let (https, rest) = match url.split_once("://") {
            Some(("https", r)) => (true, r),
            Some(("http", r)) => (false, r),
            _ => return Err(format!("endpoint `{url}` is not http(s)://")),
        };
        let base = rest.trim_end_matches('/');
        let authority = authority
            .map(str::to_string)
            .unwrap_or_else(|| base.split('/').next().unwrap_or(base).to_string());
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().unwrap()),
            _ => (authority.clone(), if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("endpoint `{url}` has no host"));
        }
        Ok(Endpoint {
            https,
            authority,
            host,
            port,
        })
    }
}

/// How the body enters the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload {
    /// `UNSIGNED-PAYLOAD` (S3 only; its bodies carry `Content-MD5` instead).
    Unsigned,
    /// The body's SHA-256 is signed (every other service).
    Signed,
}

/// One service at one endpoint, with the credentials to sign for it.
pub(crate) struct SignedClient {
    /// The signing name: `s3`, `firehose`.
    service: &'static str,
    region: String,
    endpoint: Endpoint,
    credentials: Option<SharedCredentialsProvider>,
    cached: Mutex<Option<Credentials>>,
    tls: Option<tokio_rustls::TlsConnector>,
}

fn failure(kind: FailureKind, code: &str, message: impl Into<String>) -> Failure {
    Failure::new(kind, code, message)
}

/// The region to sign for (the configured one, else the AWS config chain's, else
/// `us-east-1`) and the credentials provider of the chain (or the one given).
pub(crate) async fn region_and_credentials(
    region: Option<&str>,
    credentials: Option<SharedCredentialsProvider>,
) -> (String, Option<SharedCredentialsProvider>) {
    let sdk = crate::aws::sdk_config(region, None, credentials).await;
    let region = region
        .map(str::to_string)
        .or_else(|| sdk.region().map(|r| r.to_string()))
        .unwrap_or_else(|| "us-east-1".to_string());
    (region, sdk.credentials_provider())
}

impl SignedClient {
    pub(crate) fn new(
        service: &'static str,
        region: String,
        endpoint: Endpoint,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<SignedClient, String> {
        let tls = if endpoint.https {
            let tls = crate::tls::client_config(&crate::tls::TlsConfig::default())
                .map_err(|e| e.to_string())?;
            Some(tokio_rustls::TlsConnector::from(tls))
        } else {
            None
        };
        Ok(SignedClient {
            service,
            region,
            endpoint,
            credentials,
            cached: Mutex::new(None),
            tls,
        })
    }

    /// Credentials from the chain, cached until five minutes before they expire.
    async fn credentials(&self) -> Result<Credentials, Failure> {
        if let Some(c) = self
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let fresh = c.expiry().is_none_or(|e| {
                e.duration_since(SystemTime::now())
                    .is_ok_and(|left| left > Duration::from_secs(300))
            });
            if fresh {
                return Ok(c.clone());
            }
        }
        let Some(provider) = &self.credentials else {
            return Err(failure(
                FailureKind::Refused,
                "NoCredentials",
                "no AWS credentials (environment, profile, container, instance or aws.iot_credentials)",
            ));
        };
        let c = provider.provide_credentials().await.map_err(|e| {
            failure(
                FailureKind::Transient,
                "Credentials",
                format!("AWS credentials: {}", crate::aws::describe_sdk_error(&e)),
            )
        })?;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Signs and sends one request; the answer, whatever its status. `Failure` only when
    /// there was no answer (no credentials, no connection, no answer within `timeout`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Bytes,
        payload: Payload,
        max_answer: usize,
        timeout: Duration,
    ) -> Result<crate::http::Answer, Failure> {
        let creds = self.credentials().await?;
        let identity = creds.into();
        let mut settings = SigningSettings::default();
        if self.service == "s3" {
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        }
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| failure(FailureKind::Refused, "Signing", e.to_string()))?
            .into();
        let scheme = if self.endpoint.https { "https" } else { "http" };
        let url = format!("{scheme}://{}{path_and_query}", self.endpoint.authority);
        let mut all: Vec<(&str, &str)> = vec![("host", self.endpoint.authority.as_str())];
        all.extend(headers.iter().map(|(n, v)| (*n, v.as_str())));
        let signable_body = match payload {
            Payload::Unsigned => SignableBody::UnsignedPayload,
            Payload::Signed => SignableBody::Bytes(&body),
        };
        let signable = SignableRequest::new(method, &url, all.iter().copied(), signable_body)
            .map_err(|e| failure(FailureKind::Refused, "Signing", e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| failure(FailureKind::Refused, "Signing", e.to_string()))?
            .into_parts();
        let mut request = hyper::Request::builder().method(method).uri(path_and_query);
        for (n, v) in &all {
            request = request.header(*n, *v);
        }
        let mut request = request
            .body(Full::new(body))
            .map_err(|e| failure(FailureKind::Refused, "Request", e.to_string()))?;
        instructions.apply_to_request_http1x(&mut request);
        tokio::time::timeout(timeout, self.send(request, max_answer))
            .await
            .map_err(|_| {
                failure(
                    FailureKind::TimedOut,
                    "Timeout",
                    format!(
                        "no answer from {} within {timeout:?}",
                        self.endpoint.authority
                    ),
                )
            })?
    }

    async fn send(
        &self,
        request: hyper::Request<Full<Bytes>>,
        max_answer: usize,
    ) -> Result<crate::http::Answer, Failure> {
        let ep = &self.endpoint;
        let tcp = tokio::time::timeout(
            crate::aws::CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| {
            failure(
                FailureKind::Transient,
                "Connect",
                format!("connecting to {}: timed out", ep.authority),
            )
        })?
        .map_err(|e| {
            failure(
                FailureKind::Transient,
                "Connect",
                format!("connecting to {}: {e}", ep.authority),
            )
        })?;
        let http = |e: crate::http::HttpError| {
            failure(
                FailureKind::Transient,
                "Http",
                format!("{}: {e}", ep.authority),
            )
        };
        match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                    .map_err(|e| failure(FailureKind::Refused, "Tls", e.to_string()))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| {
                    failure(
                        FailureKind::Transient,
                        "Tls",
                        format!("TLS to {}: {e}", ep.authority),
                    )
                })?;
                crate::http::send(stream, request, max_answer)
                    .await
                    .map_err(http)
            }
            None => crate::http::send(tcp, request, max_answer)
                .await
                .map_err(http),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_their_ports_and_hosts() {
        let e = Endpoint::parse("http://127.0.0.1:4566/", None).unwrap();
        assert_eq!(
            (e.https, e.authority.as_str(), e.host.as_str(), e.port),
            (false, "127.0.0.1:4566", "127.0.0.1", 4566)
        );
        let e = Endpoint::parse(
            "https://s3.eu-west-1.amazonaws.com",
            Some("lake.s3.eu-west-1.amazonaws.com"),
        )
        .unwrap();
        assert_eq!(
            (e.host.as_str(), e.port),
            ("lake.s3.eu-west-1.amazonaws.com", 443)
        );
        assert!(Endpoint::parse("ftp://x", None).is_err());
        assert!(Endpoint::parse("http://", None).is_err());
    }
}
