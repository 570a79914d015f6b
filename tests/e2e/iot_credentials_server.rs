//! A local stand-in for the AWS IoT credentials endpoint: HTTPS that requires a client
//! certificate signed by the test CA, answering `GET /role-aliases/{alias}/credentials` with
//! the documented document (`{"credentials": {accessKeyId, secretAccessKey, sessionToken,
//! expiration}}`). Each answer carries new credentials of a set lifetime, so tests can see
//! refreshes; failures can be queued. It records every request and every issued credential.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct CredentialRequest {
    pub at: SystemTime,
    pub path: String,
    pub thing_name: Option<String>,
    /// The client certificate the TLS layer verified (DER).
    pub client_cert: Vec<u8>,
    /// Answered with an error (queued with `fail_next`).
    pub failed: bool,
}

#[derive(Debug, Clone)]
pub struct IssuedCredentials {
    pub at: SystemTime,
    pub access_key_id: String,
    pub session_token: String,
    pub expires: SystemTime,
}

#[derive(Default)]
struct State {
    requests: Vec<CredentialRequest>,
    issued: Vec<IssuedCredentials>,
    fail_next: u32,
}

pub struct IotCredentialsServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

/// RFC 3339 in UTC, seconds precision, as the endpoint writes it.
fn rfc3339(t: SystemTime) -> String {
    aws_smithy_types::DateTime::from(t)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap()
}

impl IotCredentialsServer {
    /// Serves with the server certificate `cert`/`key`, trusting client certificates signed
    /// by `client_ca`; credentials live `lifetime`.
    pub fn start(
        client_ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        lifetime: Duration,
    ) -> IotCredentialsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(client_ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state = Arc::new(Mutex::new(State::default()));
        let (runtime, listener, port) = crate::support::background_listener();
        let st = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    // A client without an acceptable certificate fails here: no HTTP at all.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        let client_cert = client_cert.clone();
                        async move { answer(&st, req, client_cert, lifetime) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        IotCredentialsServer {
            port,
            state,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The next `n` requests are answered 500 (after their TLS handshake succeeded).
    pub fn fail_next(&self, n: u32) {
        self.state.lock().unwrap().fail_next = n;
    }

    pub fn requests(&self) -> Vec<CredentialRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn issued(&self) -> Vec<IssuedCredentials> {
        self.state.lock().unwrap().issued.clone()
    }
}

fn answer(
    state: &Mutex<State>,
    req: Request<hyper::body::Incoming>,
    client_cert: Vec<u8>,
    lifetime: Duration,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let mut s = state.lock().unwrap();
    let now = SystemTime::now();
    let failed = s.fail_next > 0;
    s.requests.push(CredentialRequest {
        at: now,
        path: req.uri().path().to_string(),
        thing_name: req
            .headers()
            .get("x-amzn-iot-thingname")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        client_cert,
        failed,
    });
    let (status, body) = if failed {
        s.fail_next -= 1;
        (
            500,
            r#"{"message":"Internal failure (injected by the test)"}"#.to_string(),
        )
    } else {
        let n = s.issued.len() + 1;
        // Whole seconds, as the endpoint's expiration has no fraction.
        let expires = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                (now + lifetime)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let issued = IssuedCredentials {
            at: now,
            access_key_id: format!("ASIAEDGESHIPIOT{n:05}"),
            session_token: format!("iot-session-token-{n}"),
            expires,
        };
        let body = serde_json::json!({"credentials": {
            "accessKeyId": issued.access_key_id,
            "secretAccessKey": format!("iot-secret-{n}"),
            "sessionToken": issued.session_token,
            "expiration": rfc3339(expires),
        }})
        .to_string();
        s.issued.push(issued);
        (200, body)
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap())
}
