//! The AWS IoT credentials provider: temporary AWS credentials for a role alias, fetched from
//! the account's credentials endpoint over mutual TLS with the device's X.509 certificate
//! (`GET /role-aliases/{alias}/credentials`, header `x-amzn-iot-thingname`).
//!
//! Credentials are cached and refreshed by one background task before they expire (at the
//! latest five minutes, at most half their lifetime, ahead). Callers never fetch: while the
//! cached credentials are valid they get them at once, even while a refresh is on its way or
//! hangs; only a caller with nothing valid to use waits for the task's next fetch. A failed
//! fetch is retried with jittered backoff (1 s .. 5 min) while the cached credentials, if still
//! valid, keep being used.
//!
//! It must never log or expose the secret key or session token, and never send a request
//! without the client certificate.

use crate::backoff::Backoff;
use crate::logging::Repeated;
use crate::tls::TlsConfig;
use aws_credential_types::provider::{error::CredentialsError, future, ProvideCredentials};
use aws_credential_types::Credentials;
use rustls::pki_types::ServerName;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The AWS IoT credentials provider: temporary credentials for a role alias, fetched over
/// mutual TLS with the device's certificate.
#[derive(Debug, Clone)]
pub(crate) struct IotCredentialsConfig {
    /// `https://host[:port]`: the account's credentials endpoint
    /// (`aws iot describe-endpoint --endpoint-type iot:CredentialProvider`).
    pub(crate) endpoint: String,
    pub(crate) role_alias: String,
    /// Sent as `x-amzn-iot-thingname`; the thing the certificate is attached to.
    pub(crate) thing_name: String,
    /// Certificate and key (required), CA bundle for the endpoint.
    pub(crate) tls: TlsConfig,
}

/// How long one fetch (connect, handshake, answer) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Credentials this close to expiry are not handed out any more.
const EXPIRY_SLACK: Duration = Duration::from_secs(10);

/// Live figures of the provider, for metrics.
#[derive(Debug, Default)]
pub(crate) struct CredentialStats {
    pub(crate) fetches: AtomicU64,
    pub(crate) fetch_errors: AtomicU64,
    /// Unix seconds at which the current credentials expire; 0 before the first fetch.
    pub(crate) expires_unix: AtomicU64,
}

#[derive(Clone)]
pub(crate) struct IotCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    config: IotCredentialsConfig,
    host: String,
    port: u16,
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    cache: Cache,
}

/// The credentials held and the one task that replaces them. Its lock is never held across
/// a fetch.
struct Cache {
    endpoint: String,
    role_alias: String,
    state: std::sync::Mutex<State>,
    /// A caller with nothing valid asks the refresh task to look now.
    wake: tokio::sync::Notify,
    /// Counts finished fetches, whatever their outcome: waiting callers watch it.
    fetched: tokio::sync::watch::Sender<u64>,
    stats: Arc<CredentialStats>,
}

struct State {
    current: Option<Current>,
    retry: Backoff,
    /// After a failure: no fetch before this.
    next_attempt: Option<Instant>,
    last_error: Option<String>,
    errors: Repeated,
}

struct Current {
    credentials: Credentials,
    expires: SystemTime,
    refresh_at: Instant,
}

impl Current {
    fn usable(&self) -> bool {
        SystemTime::now() + EXPIRY_SLACK < self.expires
    }
}

impl fmt::Debug for IotCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IotCredentials")
            .field("endpoint", &self.inner.config.endpoint)
            .field("role_alias", &self.inner.config.role_alias)
            .field("thing_name", &self.inner.config.thing_name)
            .finish_non_exhaustive()
    }
}

/// `https://host[:port]` -> (host, port).
fn host_port(endpoint: &str) -> (String, u16) {
    let rest = endpoint.trim_start_matches("https://");
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => match port.parse() {
            Ok(p) => (host.trim_matches(|c| c == '[' || c == ']').to_string(), p),
            Err(_) => (rest.to_string(), 443),
        },
        _ => (rest.to_string(), 443),
    }
}

/// When to fetch again: at the latest five minutes, at most half the lifetime, before expiry.
fn refresh_point(now: Instant, expires: SystemTime) -> Instant {
    let lifetime = expires
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let margin = (lifetime / 2).min(Duration::from_secs(300));
    now + (lifetime - margin)
}

/// Why credentials could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connecting to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    /// The handshake or the server refused the device certificate; explained against the
    /// configured files when possible.
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Http(crate::http::HttpError),
    #[error("HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the answer is not the credentials document: {0}")]
    Answer(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The endpoint's answer: `{"credentials": {"accessKeyId", "secretAccessKey", "sessionToken",
/// "expiration"}}`.
fn parse_answer(body: &[u8]) -> Result<(Credentials, SystemTime), FetchError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Creds {
        access_key_id: String,
        secret_access_key: String,
        session_token: String,
        expiration: String,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        credentials: Creds,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| FetchError::Answer(e.to_string()))?;
    let expires = aws_smithy_types::DateTime::from_str(
        &a.credentials.expiration,
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()
    .and_then(|d| SystemTime::try_from(d).ok())
    .ok_or_else(|| {
        FetchError::Answer(format!(
            "expiration `{}` is not an RFC 3339 time",
            a.credentials.expiration
        ))
    })?;
    let credentials = Credentials::new(
        a.credentials.access_key_id,
        a.credentials.secret_access_key,
        Some(a.credentials.session_token),
        Some(expires),
        "edgeship-iot-credentials",
    );
    Ok((credentials, expires))
}

impl IotCredentials {
    /// Reads the certificate and key (refusing a world-readable key) and starts the background
    /// fetch-and-refresh task. Needs a tokio runtime.
    pub(crate) fn start(
        config: &IotCredentialsConfig,
    ) -> Result<IotCredentials, crate::tls::TlsError> {
        let tls = crate::tls::client_config(&config.tls)?;
        let (host, port) = host_port(&config.endpoint);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| {
            crate::tls::TlsError::not_a_host_name(&host).context("aws.iot_credentials.endpoint")
        })?;
        let inner = Arc::new(Inner {
            config: config.clone(),
            host,
            port,
            connector: tokio_rustls::TlsConnector::from(tls),
            server_name,
            cache: Cache::new(&config.endpoint, &config.role_alias),
        });
        let task = inner.clone();
        tokio::spawn(async move { task.cache.run(|| task.fetch()).await });
        Ok(IotCredentials { inner })
    }

    pub(crate) fn stats(&self) -> Arc<CredentialStats> {
        self.inner.cache.stats.clone()
    }
}

impl Cache {
    fn new(endpoint: &str, role_alias: &str) -> Cache {
        Cache {
            endpoint: endpoint.to_string(),
            role_alias: role_alias.to_string(),
            state: std::sync::Mutex::new(State {
                current: None,
                retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
                next_attempt: None,
                last_error: None,
                errors: Repeated::new(Duration::from_secs(60)),
            }),
            wake: tokio::sync::Notify::new(),
            fetched: tokio::sync::watch::channel(0).0,
            stats: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The refresh task: fetches when the credentials held are due (or missing), and after a
    /// failure when its backoff has passed; never returns.
    async fn run<F, Fut>(&self, fetch: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(Credentials, SystemTime), FetchError>>,
    {
        loop {
            let (due, wake) = self.lock().next_fetch(Instant::now());
            if !due {
                tokio::select! {
                    () = tokio::time::sleep_until(wake.into()) => {}
                    () = self.wake.notified() => {}
                }
                continue;
            }
            let outcome = fetch().await;
            self.record(outcome);
            self.fetched.send_modify(|n| *n += 1);
        }
    }

    /// Takes a fetch's outcome into the state, with its figures and logs.
    fn record(&self, outcome: Result<(Credentials, SystemTime), FetchError>) {
        let mut st = self.lock();
        match outcome {
            Ok((credentials, expires)) => {
                self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                let unix = expires
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.stats.expires_unix.store(unix, Ordering::Relaxed);
                st.errors.recovered(|n| {
                    tracing::info!(after_errors = n, "AWS IoT credentials fetched again")
                });
                let refresh_at = refresh_point(Instant::now(), expires);
                tracing::info!(
                    role_alias = %self.role_alias,
                    expires_in_s = expires.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()),
                    refresh_in_s = refresh_at.saturating_duration_since(Instant::now()).as_secs(),
                    "AWS credentials obtained from the AWS IoT credentials provider"
                );
                st.current = Some(Current {
                    credentials,
                    expires,
                    refresh_at,
                });
                st.retry.reset();
                st.next_attempt = None;
                st.last_error = None;
            }
            Err(e) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                let delay = st.retry.next_delay();
                st.next_attempt = Some(Instant::now() + delay);
                if let Some(repeats) = st.errors.should_log() {
                    let still_valid = st.current.as_ref().is_some_and(Current::usable);
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        role_alias = %self.role_alias,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        using_cached = still_valid,
                        repeats,
                        "cannot get AWS credentials from the AWS IoT credentials provider"
                    );
                }
                st.last_error = Some(e.to_string());
            }
        }
    }

    /// What a caller (the SDK, before each signed request) gets: the credentials held while
    /// they are valid, at once; with nothing valid, the outcome of the refresh task's next
    /// fetch, or the last error while that task waits out its backoff.
    async fn get(&self) -> Result<Credentials, CredentialsError> {
        let mut fetched = self.fetched.subscribe();
        {
            let st = self.lock();
            let now = Instant::now();
            if let Some(c) = &st.current {
                if now < c.refresh_at || c.usable() {
                    return Ok(c.credentials.clone());
                }
            }
            if st.next_attempt.is_some_and(|t| now < t) {
                return st.cached_or_error();
            }
        }
        self.wake.notify_one();
        // The sender lives as long as the cache: changed() only returns after a fetch.
        let _ = fetched.changed().await;
        self.lock().cached_or_error()
    }
}

impl Inner {
    async fn fetch(&self) -> Result<(Credentials, SystemTime), FetchError> {
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch_once()).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(FETCH_TIMEOUT)),
        }
    }

    async fn fetch_once(&self) -> Result<(Credentials, SystemTime), FetchError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| FetchError::Connect {
                host: self.host.clone(),
                port: self.port,
                source,
            })?;
        let stream = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                FetchError::Tls(match crate::tls::explain(&e, &self.config.tls) {
                    Some(why) => why,
                    None => e.to_string(),
                })
            })?;
        let answer = crate::http::get(
            stream,
            &self.host,
            &format!("/role-aliases/{}/credentials", self.config.role_alias),
            &[("x-amzn-iot-thingname", self.config.thing_name.as_str())],
            64 << 10,
        )
        .await
        .map_err(|e| {
            // A server that refuses the client certificate in TLS 1.3 says so here.
            let why = match &e {
                crate::http::HttpError::Request(h) => std::error::Error::source(h)
                    .and_then(|s| crate::tls::explain(s, &self.config.tls)),
                _ => None,
            };
            match why {
                Some(why) => FetchError::Tls(why),
                None => FetchError::Http(e),
            }
        })?;
        let (status, body) = (answer.status, answer.body);
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(FetchError::Refused { status, message });
        }
        parse_answer(&body)
    }
}

impl State {
    /// Whether a fetch is due now, and if not, when to look again.
    fn next_fetch(&self, now: Instant) -> (bool, Instant) {
        let at = match (&self.current, self.next_attempt) {
            (_, Some(retry_at)) => retry_at,
            (Some(c), None) => c.refresh_at,
            (None, None) => now,
        };
        (now >= at, at)
    }

    fn cached_or_error(&self) -> Result<Credentials, CredentialsError> {
        match &self.current {
            Some(c) if c.usable() => Ok(c.credentials.clone()),
            _ => Err(CredentialsError::not_loaded(format!(
                "no valid credentials from the AWS IoT credentials provider yet: {}",
                self.last_error.as_deref().unwrap_or("fetch pending")
            ))),
        }
    }
}

impl ProvideCredentials for IotCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.inner.cache.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(
            host_port("https://c1.credentials.iot.eu-west-1.amazonaws.com"),
            ("c1.credentials.iot.eu-west-1.amazonaws.com".into(), 443)
        );
        assert_eq!(
            host_port("https://127.0.0.1:8443"),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(host_port("https://[::1]:8443"), ("::1".into(), 8443));
    }

    #[test]
    fn the_documented_answer_parses_and_refresh_comes_early() {
        let body = br#"{"credentials":{"accessKeyId":"ASIAEXAMPLE","secretAccessKey":"s3cr3t","sessionToken":"tok","expiration":"2030-01-18T09:18:06Z"}}"#;
        let (c, expires) = parse_answer(body).unwrap();
        assert_eq!(c.access_key_id(), "ASIAEXAMPLE");
        assert_eq!(c.session_token(), Some("tok"));
        assert_eq!(
            expires
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_894_958_286
        );
        assert!(!format!("{c:?}").contains("s3cr3t"));
        // One hour: refresh five minutes before; twenty seconds: after ten.
        let now = Instant::now();
        let hour = refresh_point(now, SystemTime::now() + Duration::from_secs(3600));
        assert!((3290..=3300).contains(&(hour - now).as_secs()));
        let short = refresh_point(now, SystemTime::now() + Duration::from_secs(20));
        assert!((9..=10).contains(&(short - now).as_secs()));
        assert!(parse_answer(br#"{"message":"Access Denied"}"#).is_err());
    }

    fn issued(n: u32, lifetime: Duration) -> (Credentials, SystemTime) {
        let expires = SystemTime::now() + lifetime;
        let c = Credentials::new(format!("AKID{n}"), "secret", None, Some(expires), "test");
        (c, expires)
    }

    async fn poll_until(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The refresh task with a fetch the test answers by hand: each fetch waits for the next
    /// outcome sent.
    #[tokio::test]
    async fn callers_never_wait_on_a_refresh_while_the_credentials_held_are_valid() {
        type Outcome = Result<(Credentials, SystemTime), FetchError>;
        let cache = Arc::new(Cache::new("https://127.0.0.1:1", "role"));
        let (answer, answers) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
        let answers = Arc::new(tokio::sync::Mutex::new(answers));
        let calls = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (cache, answers, calls) = (cache.clone(), answers.clone(), calls.clone());
            async move {
                cache
                    .run(|| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let answers = answers.clone();
                        async move { answers.lock().await.recv().await.unwrap() }
                    })
                    .await
            }
        });
        let get = |cache: &Arc<Cache>| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get().await })
        };

        // Nothing held yet: the first caller waits for the first fetch.
        let first = get(&cache);
        poll_until("the first fetch", || calls.load(Ordering::SeqCst) == 1).await;
        assert!(!first.is_finished());
        answer
            .send(Ok(issued(1, Duration::from_secs(3600))))
            .unwrap();
        assert_eq!(first.await.unwrap().unwrap().access_key_id(), "AKID1");

        // Due for refresh and still valid, with the refresh hanging: callers get the set held.
        cache.lock().current.as_mut().unwrap().refresh_at = Instant::now();
        cache.wake.notify_one();
        poll_until("the refresh", || calls.load(Ordering::SeqCst) == 2).await;
        for _ in 0..3 {
            let held = tokio::time::timeout(Duration::from_millis(200), cache.get())
                .await
                .expect("a caller waited on the refresh");
            assert_eq!(held.unwrap().access_key_id(), "AKID1");
        }
        answer
            .send(Ok(issued(2, Duration::from_secs(3600))))
            .unwrap();
        poll_until("the refreshed set", || {
            cache
                .lock()
                .current
                .as_ref()
                .unwrap()
                .credentials
                .access_key_id()
                == "AKID2"
        })
        .await;

        // Nothing valid (inside the expiry slack) and the next fetch fails: the waiting caller
        // gets the error, and while the task backs off callers get it at once.
        let (credentials, expires) = issued(3, Duration::from_secs(5));
        cache.lock().current = Some(Current {
            credentials,
            expires,
            refresh_at: Instant::now(),
        });
        let waiting = get(&cache);
        poll_until("the fetch for a caller", || {
            calls.load(Ordering::SeqCst) == 3
        })
        .await;
        assert!(!waiting.is_finished());
        answer
            .send(Err(FetchError::Timeout(Duration::from_secs(1))))
            .unwrap();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(format!("{err:?}").contains("no answer within"), "{err:?}");
        let again = tokio::time::timeout(Duration::from_millis(200), cache.get())
            .await
            .expect("a caller waited through the backoff");
        assert!(again.is_err());
        assert_eq!(cache.stats.fetches.load(Ordering::SeqCst), 2);
        assert_eq!(cache.stats.fetch_errors.load(Ordering::SeqCst), 1);
        task.abort();
    }
}
