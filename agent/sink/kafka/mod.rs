//! Apache Kafka and Amazon MSK as a destination (`type = "kafka"`), through `rskafka` (pure
//! Rust: it cross-compiles to the gateways' ARM targets with Debian's gcc and uses the
//! rustls/ring and zstd already in the binary).
//!
//! By default every message is one Kafka record, as Kafka consumers expect: its key is the
//! route's partition key, its value the payload as received, its timestamp the receive time,
//! and its headers `id` (`<gateway>:<seq>`, the same id as everywhere else), `topic` (the MQTT
//! topic) and `ts_ms` (the receive time). Record batches are compressed with zstd, Kafka's own
//! compression, so consumers need nothing special. `records = "frame"` sends the route's
//! frames instead (edgeship's by default, FORMAT.md; one Kafka record each), for cost.
//!
//! A key goes to partition `murmur2(key) % partitions`, the Java client's default
//! partitioner, so edgeship's records land where any other producer's of the same key do;
//! the topic's partitions are learned when the destination connects and every minute after.
//! Within a call, each partition gets one request at a time, in the order of the call's
//! entries, and a failed request fails every later entry of that partition: a key's order
//! holds across retries. Produce requests ask `acks = all`; an entry is accepted only when
//! the broker acknowledged every record of it.
//!
//! Authenticated sessions end (MSK IAM: when the token or the credentials it was signed with
//! expire; elsewhere after the brokers' `connections.max.reauth.ms`), and the client has no
//! re-authentication of a live connection (KIP-368). So the destination renews them itself:
//! between calls, once a session is due (a minute before its token's end, at most a quarter
//! of its life; or at `sasl.reauthenticate_every`), it drops its connections and connects
//! and authenticates again, instead of letting the broker close a connection under a request.
//!
//! It never creates a topic unless configured to, never retries on its own beyond the
//! client's reconnection within one call, and never logs a password or a token.

pub(crate) mod msk_iam;

use crate::frame::encoder::FrameFormat;
use crate::sink::call::{CallLimits, Destination, Entry, Failure, FailureKind, Outcome, SinkError};
use crate::tls::TlsConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rskafka::chrono::{DateTime, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, OauthBearerCredentials, SaslConfig};
use rskafka::record::Record;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Most entries and bytes one call sends (over all partitions). Entries hold messages
/// uncompressed, and while a call is sent each message is a Kafka `Record` of its own (key,
/// payload, a map of three headers: about five times its bytes), so a call is kept to 1 MiB
/// (peak RSS at saturation into a slow broker: 37.2 MiB with 4 MiB calls, 34.9-35.1 with 1 MiB,
/// 33.0 with 256 KiB, which took 1,440 produce requests per million messages against 980).
pub(crate) const CALL: CallLimits = CallLimits {
    max_entries: 500,
    max_bytes: 1 << 20,
    queued_calls: 1,
};

/// The broker's `message.max.bytes` unless configured: Kafka's default is 1,048,588.
pub(crate) const DEFAULT_MESSAGE_MAX_BYTES: u64 = 1_000_000;

/// Room in a record batch beyond its records' own bytes (batch header, varints).
const BATCH_OVERHEAD: usize = 512;
/// What a record adds to a batch beyond its key, value and headers.
const RECORD_OVERHEAD: usize = 32;

/// How often the topic's partitions are learned again.
const METADATA_AGE: Duration = Duration::from_secs(60);

/// How long before a token's end its session is renewed (at most a quarter of its life).
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// When a session authenticated at `signed` with a token valid until `ends` is renewed.
fn renewal_time(signed: SystemTime, ends: SystemTime) -> SystemTime {
    let life = ends.duration_since(signed).unwrap_or_default();
    ends - RENEW_BEFORE.min(life / 4)
}

/// The earliest renewal time of the tokens the current client's connections authenticated
/// with: the token callback writes it, a new client starts it again.
type RenewBy = Arc<std::sync::Mutex<Option<SystemTime>>>;

/// What one Kafka record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaRecords {
    /// One Kafka record per message (the default).
    #[default]
    Message,
    /// One Kafka record per edgeship frame (FORMAT.md).
    Frame,
}

/// How the agent authenticates to the brokers, beyond TLS.
#[derive(Clone, PartialEq, Eq)]
pub enum KafkaSasl {
    Plain {
        username: String,
        password: String,
    },
    ScramSha256 {
        username: String,
        password: String,
    },
    ScramSha512 {
        username: String,
        password: String,
    },
    /// Amazon MSK IAM: SASL/OAUTHBEARER with a token presigned for `kafka-cluster:Connect`
    /// from the agent's AWS credentials.
    AwsMskIam {
        region: Option<String>,
    },
}

impl std::fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KafkaSasl::Plain { username, .. } => write!(f, "PLAIN({username})"),
            KafkaSasl::ScramSha256 { username, .. } => write!(f, "SCRAM-SHA-256({username})"),
            KafkaSasl::ScramSha512 { username, .. } => write!(f, "SCRAM-SHA-512({username})"),
            KafkaSasl::AwsMskIam { region } => write!(f, "AWS_MSK_IAM({region:?})"),
        }
    }
}

/// A `[destination.NAME]` of `type = "kafka"`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub(crate) brokers: Vec<String>,
    pub(crate) topic: String,
    pub(crate) records: KafkaRecords,
    /// The broker's (or topic's) `message.max.bytes`: the largest record batch it takes.
    pub(crate) message_max_bytes: u64,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) sasl: Option<KafkaSasl>,
    /// Connections are made again, authenticating anew, once their session is this old
    /// (`sasl.reauthenticate_every`: below the brokers' `connections.max.reauth.ms`).
    pub(crate) reauthenticate_every: Option<Duration>,
    /// Create the topic when the cluster does not have it; without it a missing topic is a
    /// refusal that waits for an operator.
    pub(crate) create_topic: Option<CreateTopic>,
}

/// How a missing topic is created (`[destination.NAME.create_topic]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateTopic {
    pub(crate) partitions: i32,
    pub(crate) replication_factor: i16,
}

impl KafkaConfig {
    /// The format the shipper encodes this destination's records in: each message apart, or
    /// (frames) the route's own format.
    pub(crate) fn format(&self) -> Option<FrameFormat> {
        match self.records {
            KafkaRecords::Message => Some(FrameFormat::Messages),
            KafkaRecords::Frame => None,
        }
    }

    /// Largest entry: a record batch of it fits `message.max.bytes`.
    pub(crate) fn max_record_bytes(&self) -> u64 {
        self.message_max_bytes
            .saturating_sub((BATCH_OVERHEAD + RECORD_OVERHEAD + 64) as u64)
    }
}

/// The Java client's `murmur2` (Kafka's `Utils.murmur2`), which its default partitioner uses.
pub(crate) fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h = SEED ^ len as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition a key goes to, as the Java client's default partitioner places it.
pub(crate) fn partition_for(key: &[u8], partitions: usize) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) as usize % partitions.max(1)) as i32
}

fn failure(kind: FailureKind, code: &str, message: impl Into<String>) -> Failure {
    Failure::new(kind, code, message)
}

/// The refusal for a topic the cluster does not have, with what fixes it.
fn missing_topic(topic: &str) -> Failure {
    failure(
        FailureKind::Refused,
        "UnknownTopicOrPartition",
        format!("topic `{topic}` does not exist (create it, or let edgeship: `create_topic` in the destination's config)"),
    )
}

/// The client's error, classified; the first Kafka error inside a retry that ran out.
fn classify(e: &KafkaError, topic: &str, max_bytes: u64) -> Failure {
    if let Some(f) = sasl_refusal(&e.to_string()) {
        return f;
    }
    match e {
        KafkaError::ServerError {
            protocol_error,
            error_message,
            ..
        } => {
            let code = format!("{protocol_error:?}");
            let said = match error_message {
                Some(m) => format!("Kafka {code}: {m}"),
                None => format!("Kafka {code}"),
            };
            let kind = match protocol_error {
                ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge => {
                    FailureKind::TooLarge { limit: max_bytes }
                }
                ProtocolError::UnknownTopicOrPartition => return missing_topic(topic),
                ProtocolError::ThrottlingQuotaExceeded => FailureKind::Throttled,
                ProtocolError::TopicAuthorizationFailed
                | ProtocolError::ClusterAuthorizationFailed
                | ProtocolError::SaslAuthenticationFailed
                | ProtocolError::UnsupportedSaslMechanism
                | ProtocolError::IllegalSaslState
                | ProtocolError::InvalidRecord
                | ProtocolError::InvalidTopicException
                | ProtocolError::InvalidRequiredAcks
                | ProtocolError::UnsupportedCompressionType
                | ProtocolError::UnsupportedForMessageFormat
                | ProtocolError::PolicyViolation
                | ProtocolError::InvalidRequest => FailureKind::Refused,
                ProtocolError::RequestTimedOut => FailureKind::TimedOut,
                _ => FailureKind::Transient,
            };
            failure(kind, &code, said)
        }
        KafkaError::RetryFailed(rskafka::BackoffError::DeadlineExceded { source, .. }) => {
            match source.downcast_ref::<KafkaError>() {
                Some(inner) => classify(inner, topic, max_bytes),
                None => failure(FailureKind::Transient, "Retry", source.to_string()),
            }
        }
        KafkaError::Connection(c) => connection_failure(c),
        KafkaError::Timeout => failure(FailureKind::TimedOut, "Timeout", "Kafka: no answer"),
        KafkaError::Request(r) => failure(FailureKind::Transient, "Request", format!("Kafka: {r}")),
        other => failure(FailureKind::Transient, "Kafka", format!("Kafka: {other}")),
    }
}

/// A refused login: it surfaces through the client's retries in more than one shape, with
/// the same words in each.
fn sasl_refusal(text: &str) -> Option<Failure> {
    let (_, why) = text.split_once("Sasl handshake failed: ")?;
    Some(failure(
        FailureKind::Refused,
        "SaslAuthentication",
        format!("Kafka SASL authentication failed: {why}"),
    ))
}

fn connection_failure(e: &rskafka::ConnectionError) -> Failure {
    if let Some(f) = sasl_refusal(&e.to_string()) {
        return f;
    }
    match e {
        rskafka::ConnectionError::SaslFailed(s) => failure(
            FailureKind::Refused,
            "SaslAuthentication",
            format!("Kafka SASL authentication failed: {s}"),
        ),
        rskafka::ConnectionError::RetryFailed(rskafka::BackoffError::DeadlineExceded {
            source,
            ..
        }) => match source.downcast_ref::<rskafka::ConnectionError>() {
            Some(inner) => connection_failure(inner),
            None => failure(
                FailureKind::Transient,
                "Connect",
                format!("Kafka: cannot reach a broker: {source}"),
            ),
        },
        other => failure(
            FailureKind::Transient,
            "Connect",
            format!("Kafka: cannot reach a broker: {other}"),
        ),
    }
}

/// The client and what it learned of the topic.
#[derive(Default)]
struct Connection {
    client: Option<Arc<Client>>,
    /// When the client was made: its sessions' age.
    since: Option<Instant>,
    partitions: usize,
    learned: Option<Instant>,
    clients: HashMap<i32, Arc<PartitionClient>>,
}

/// One topic on one cluster.
pub(crate) struct KafkaSink {
    name: String,
    config: KafkaConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    sasl: Option<SaslConfig>,
    connection: tokio::sync::Mutex<Connection>,
    renew_by: RenewBy,
    /// The one bucket all keys share when each message is a record of its own.
    one_bucket: Arc<[u128]>,
}

/// One record to send, and the entry it belongs to.
struct Part {
    entry: usize,
    record: Record,
}

impl KafkaSink {
    /// Reads the TLS files and sets up authentication; the brokers are first called by the
    /// first call or probe, so a cluster that is down does not stop the agent.
    pub(crate) async fn connect(
        name: &str,
        config: &KafkaConfig,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<KafkaSink, SinkError> {
        let refused = |m: String| SinkError {
            destination: name.to_string(),
            failure: failure(FailureKind::Refused, "Config", m),
        };
        let tls = match &config.tls {
            Some(t) => Some(crate::tls::client_config(t).map_err(|e| refused(e.to_string()))?),
            None => None,
        };
        let renew_by = RenewBy::default();
        let sasl = match &config.sasl {
            None => None,
            Some(KafkaSasl::Plain { username, password }) => Some(SaslConfig::Plain(
                Credentials::new(username.clone(), password.clone()),
            )),
            Some(KafkaSasl::ScramSha256 { username, password }) => Some(SaslConfig::ScramSha256(
                Credentials::new(username.clone(), password.clone()),
            )),
            Some(KafkaSasl::ScramSha512 { username, password }) => Some(SaslConfig::ScramSha512(
                Credentials::new(username.clone(), password.clone()),
            )),
            Some(KafkaSasl::AwsMskIam { region }) => {
                let (region, provider) =
                    crate::sink::signed::region_and_credentials(region.as_deref(), credentials)
                        .await;
                let Some(provider) = provider else {
                    return Err(refused(
                        "MSK IAM authentication needs AWS credentials and none are configured"
                            .into(),
                    ));
                };
                let renew = renew_by.clone();
                Some(SaslConfig::Oauthbearer(OauthBearerCredentials {
                    callback: Arc::new(move || {
                        let (region, provider, renew) =
                            (region.clone(), provider.clone(), renew.clone());
                        Box::pin(async move {
                            let creds = provider.provide_credentials().await?;
                            let now = SystemTime::now();
                            let token = msk_iam::token(&region, &creds, now, msk_iam::USER_AGENT)?;
                            let ends = creds
                                .expiry()
                                .map_or(now + msk_iam::EXPIRES, |e| e.min(now + msk_iam::EXPIRES));
                            let at = renewal_time(now, ends);
                            let mut by = renew.lock().unwrap_or_else(|e| e.into_inner());
                            *by = Some(by.map_or(at, |t| t.min(at)));
                            Ok(token)
                        })
                    }),
                    authz_id: None,
                    bearer_kvs: Vec::new(),
                }))
            }
        };
        Ok(KafkaSink {
            name: name.to_string(),
            config: config.clone(),
            tls,
            sasl,
            connection: tokio::sync::Mutex::new(Connection::default()),
            renew_by,
            one_bucket: crate::sink::call::one_bucket(),
        })
    }

    fn backoff(&self) -> rskafka::BackoffConfig {
        rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
            deadline: Some(Duration::from_secs(10)),
        }
    }

    /// The client, connected, with the topic's partitions learned within [`METADATA_AGE`].
    async fn ready(&self, conn: &mut Connection) -> Result<Arc<Client>, Failure> {
        let client = match &conn.client {
            Some(c) => c.clone(),
            None => {
                let mut builder = ClientBuilder::new(self.config.brokers.clone())
                    .client_id("edgeship")
                    .backoff_config(self.backoff());
                if let Some(tls) = &self.tls {
                    builder = builder.tls_config(tls.clone());
                }
                if let Some(sasl) = &self.sasl {
                    builder = builder.sasl_config(sasl.clone());
                }
                *self.renew_by.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let client = Arc::new(builder.build().await.map_err(|e| self.classify(&e))?);
                conn.client = Some(client.clone());
                conn.since = Some(Instant::now());
                client
            }
        };
        if conn.learned.is_none_or(|t| t.elapsed() >= METADATA_AGE) {
            let mut topics = client.list_topics().await.map_err(|e| self.classify(&e))?;
            if !topics.iter().any(|t| t.name == self.config.topic) {
                let Some(create) = self.config.create_topic else {
                    return Err(missing_topic(&self.config.topic));
                };
                self.create_topic(&client, create).await?;
                topics = client.list_topics().await.map_err(|e| self.classify(&e))?;
            }
            let Some(topic) = topics.iter().find(|t| t.name == self.config.topic) else {
                return Err(failure(
                    FailureKind::Transient,
                    "UnknownTopicOrPartition",
                    format!(
                        "topic `{}` was created but the cluster does not list it yet",
                        self.config.topic
                    ),
                ));
            };
            let partitions = topic.partitions.len();
            if partitions == 0 {
                return Err(failure(
                    FailureKind::Transient,
                    "NoPartitions",
                    format!("topic `{}` has no partitions yet", self.config.topic),
                ));
            }
            if conn.partitions != partitions {
                if conn.partitions != 0 {
                    tracing::info!(destination = %self.name, topic = %self.config.topic, from = conn.partitions, to = partitions, "the topic's partition count changed");
                }
                conn.partitions = partitions;
            }
            conn.learned = Some(Instant::now());
        }
        Ok(client)
    }

    /// Why the client's sessions are due for renewal, if they are.
    fn renewal_due(&self, age: Duration, now: SystemTime) -> Option<&'static str> {
        if self
            .config
            .reauthenticate_every
            .is_some_and(|every| age >= every)
        {
            return Some("reauthenticate_every");
        }
        let by = *self.renew_by.lock().unwrap_or_else(|e| e.into_inner());
        by.is_some_and(|by| now >= by).then_some("token")
    }

    /// Between calls: drops a client whose sessions are due, so the next connections
    /// authenticate again before the brokers end the old ones under a request.
    fn renew_if_due(&self, conn: &mut Connection) {
        let Some(since) = conn.since.filter(|_| conn.client.is_some()) else {
            return;
        };
        let age = since.elapsed();
        if let Some(why) = self.renewal_due(age, SystemTime::now()) {
            tracing::info!(destination = %self.name, age_s = age.as_secs(), due_to = why, "renewing the Kafka sessions: connecting and authenticating again");
            *conn = Connection::default();
        }
    }

    fn classify(&self, e: &KafkaError) -> Failure {
        classify(e, &self.config.topic, self.config.max_record_bytes() / 2)
    }

    /// Creates the missing topic; one created meanwhile by someone else is as good.
    async fn create_topic(&self, client: &Client, create: CreateTopic) -> Result<(), Failure> {
        let created = match client.controller_client() {
            Ok(controller) => {
                controller
                    .create_topic(
                        self.config.topic.clone(),
                        create.partitions,
                        create.replication_factor,
                        5_000,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match created {
            Ok(()) => {
                tracing::info!(destination = %self.name, topic = %self.config.topic, partitions = create.partitions, replication_factor = create.replication_factor, "created the topic");
                Ok(())
            }
            Err(KafkaError::ServerError {
                protocol_error: ProtocolError::TopicAlreadyExists,
                ..
            }) => Ok(()),
            Err(e) => {
                let mut f = self.classify(&e);
                f.message = format!("creating topic `{}`: {}", self.config.topic, f.message);
                Err(f)
            }
        }
    }

    async fn partition_client(
        &self,
        conn: &mut Connection,
        client: &Client,
        partition: i32,
    ) -> Result<Arc<PartitionClient>, Failure> {
        if let Some(p) = conn.clients.get(&partition) {
            return Ok(p.clone());
        }
        let p = Arc::new(
            client
                .partition_client(
                    self.config.topic.clone(),
                    partition,
                    UnknownTopicHandling::Error,
                )
                .await
                .map_err(|e| self.classify(&e))?,
        );
        conn.clients.insert(partition, p.clone());
        Ok(p)
    }

    /// The Kafka records of one entry, each with the partition its key goes to.
    fn records(&self, entry: &Entry, partitions: usize) -> Result<Vec<(i32, Record)>, Failure> {
        let entry_key = crate::key::split(&entry.key).0;
        match self.config.records {
            KafkaRecords::Frame => {
                let mut headers = BTreeMap::new();
                headers.insert("content-type".to_string(), FRAME_CONTENT_TYPE.to_vec());
                let record = Record {
                    key: Some(entry_key.as_bytes().to_vec()),
                    value: Some(entry.data.clone()),
                    headers,
                    timestamp: at_ms(crate::clock::now_ms()),
                };
                Ok(vec![(
                    partition_for(entry_key.as_bytes(), partitions),
                    record,
                )])
            }
            KafkaRecords::Message => {
                let (gateway, records) = crate::frame::messages::decode(&entry.data)
                    .map_err(|e| failure(FailureKind::Refused, "Corrupt", format!("{e}")))?;
                Ok(records
                    .into_iter()
                    .map(|r| {
                        let key = if r.key.is_empty() {
                            entry_key
                        } else {
                            crate::key::split(&r.key).0
                        };
                        let partition = partition_for(key.as_bytes(), partitions);
                        let mut headers = BTreeMap::new();
                        headers.insert(
                            "id".to_string(),
                            format!("{gateway}:{}", r.seq).into_bytes(),
                        );
                        headers.insert("topic".to_string(), r.topic.into_bytes());
                        headers.insert("ts_ms".to_string(), r.ts_ms.to_string().into_bytes());
                        let record = Record {
                            key: Some(key.as_bytes().to_vec()),
                            value: Some(r.payload),
                            headers,
                            timestamp: at_ms(r.ts_ms),
                        };
                        (partition, record)
                    })
                    .collect())
            }
        }
    }

    /// Sends one call's entries; per entry, why it was not accepted.
    async fn send(&self, entries: &[&Entry]) -> Result<Vec<Option<Failure>>, Failure> {
        let mut conn = self.connection.lock().await;
        self.renew_if_due(&mut conn);
        let client = match self.ready(&mut conn).await {
            Ok(c) => c,
            Err(f) => {
                // Start again from the bootstrap brokers next time.
                if f.kind != FailureKind::Refused {
                    *conn = Connection::default();
                }
                return Err(f);
            }
        };
        let partitions = conn.partitions;
        let mut outcome: Vec<Option<Failure>> = vec![None; entries.len()];
        let mut by_partition: BTreeMap<i32, Vec<Part>> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            match self.records(e, partitions) {
                Ok(records) => {
                    for (p, record) in records {
                        by_partition
                            .entry(p)
                            .or_default()
                            .push(Part { entry: i, record });
                    }
                }
                Err(f) => outcome[i] = Some(f),
            }
        }
        // The partitions' requests run concurrently inside this one task, not spawned: rskafka
        // compresses a batch with a zstd context of its own (3.7 MiB at level 3 with no size
        // given) while it encodes the request, so spawned requests on the runtime's worker
        // threads held one context per thread at once; here one is alive at a time.
        let mut sends = FuturesUnordered::new();
        let batch_bytes = (self.config.message_max_bytes as usize).saturating_sub(BATCH_OVERHEAD);
        let (topic, max) = (
            self.config.topic.as_str(),
            self.config.max_record_bytes() / 2,
        );
        for (partition, parts) in by_partition {
            let pc = match self.partition_client(&mut conn, &client, partition).await {
                Ok(pc) => pc,
                Err(f) => {
                    for part in &parts {
                        outcome[part.entry].get_or_insert_with(|| f.clone());
                    }
                    continue;
                }
            };
            sends.push(async move { produce(&pc, parts, batch_bytes, topic, max).await });
        }
        drop(conn);
        while let Some(failed) = sends.next().await {
            for (entry, f) in failed {
                outcome[entry].get_or_insert(f);
            }
        }
        Ok(outcome)
    }
}

/// A record timestamp from milliseconds since the epoch.
fn at_ms(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms as i64).unwrap_or_default()
}

/// The `content-type` header of a Kafka record that holds an edgeship frame.
pub(crate) const FRAME_CONTENT_TYPE: &[u8] = b"application/vnd.edgeship.frame";

/// Sends one partition's records in order, in batches of at most `batch_bytes`, one request
/// at a time; from the first failure on, nothing more is sent and every entry with records
/// not acknowledged fails.
async fn produce(
    pc: &PartitionClient,
    parts: Vec<Part>,
    batch_bytes: usize,
    topic: &str,
    too_large_limit: u64,
) -> Vec<(usize, Failure)> {
    let mut failed = Vec::new();
    let mut parts = parts.into_iter().peekable();
    while parts.peek().is_some() {
        let (mut batch, mut entries, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        while let Some(next) = parts.peek() {
            let size = next.record.approximate_size() + RECORD_OVERHEAD;
            if !batch.is_empty() && bytes + size > batch_bytes {
                break;
            }
            let part = parts.next().expect("peeked");
            bytes += size;
            entries.push(part.entry);
            batch.push(part.record);
        }
        if let Err(e) = pc.produce(batch, Compression::Zstd).await {
            let f = classify(&e, topic, too_large_limit);
            entries.extend(parts.map(|p| p.entry));
            entries.dedup();
            failed.extend(entries.into_iter().map(|entry| (entry, f.clone())));
            break;
        }
    }
    failed
}

impl Destination for KafkaSink {
    fn call_limits(&self) -> CallLimits {
        CALL
    }

    fn max_record_bytes(&self) -> u64 {
        self.config.max_record_bytes()
    }

    /// One record per message: each keeps its own key (and partition), so all keys share one
    /// bucket and a commit stores one block per route however many devices it holds. Frames
    /// (`records = "frame"`) go to the partition of their block's key, so they keep a block
    /// per key.
    fn shard_starts(&self) -> Option<Arc<[u128]>> {
        match self.config.records {
            KafkaRecords::Message => Some(self.one_bucket.clone()),
            KafkaRecords::Frame => None,
        }
    }

    async fn put(&self, entries: &[&Entry], timeout: Duration) -> Result<Vec<Outcome>, SinkError> {
        let sink_error = |failure: Failure| SinkError {
            destination: self.name.clone(),
            failure,
        };
        let sent = tokio::time::timeout(timeout, self.send(entries))
            .await
            .map_err(|_| {
                sink_error(failure(
                    FailureKind::TimedOut,
                    "Timeout",
                    format!("Kafka: no answer within {timeout:?}"),
                ))
            })?
            .map_err(sink_error)?;
        Ok(sent
            .into_iter()
            .map(|f| match f {
                None => Outcome::Accepted { shard: None },
                Some(failure) => Outcome::Failed {
                    failure,
                    shard: None,
                },
            })
            .collect())
    }

    /// Connects (authenticating) and finds the topic in the cluster's metadata.
    async fn probe(&self) -> Result<(), Failure> {
        let mut conn = self.connection.lock().await;
        self.renew_if_due(&mut conn);
        conn.learned = None;
        match tokio::time::timeout(crate::aws::SMALL_CALL_TIMEOUT, self.ready(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(f)) => {
                if f.kind != FailureKind::Refused {
                    *conn = Connection::default();
                }
                Err(f)
            }
            Err(_) => Err(failure(
                FailureKind::TimedOut,
                "Timeout",
                "Kafka: no broker answered in time",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination of topic `t` on a local broker, with `sasl`.
    fn plain_config(sasl: Option<KafkaSasl>) -> KafkaConfig {
        KafkaConfig {
            brokers: vec!["127.0.0.1:9092".into()],
            topic: "t".into(),
            records: KafkaRecords::Message,
            message_max_bytes: DEFAULT_MESSAGE_MAX_BYTES,
            tls: None,
            sasl,
            reauthenticate_every: None,
            create_topic: None,
        }
    }

    #[test]
    fn keys_are_partitioned_as_the_java_client_does() {
        // Kafka's own test vectors for Utils.murmur2.
        let vectors: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, hash) in vectors {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
        assert!((0..1000).all(|i| {
            let p = partition_for(format!("dev-{i}").as_bytes(), 7);
            (0..7).contains(&p)
        }));
    }

    #[test]
    fn the_largest_entry_leaves_room_for_the_batch() {
        let config = plain_config(None);
        assert!(config.max_record_bytes() < DEFAULT_MESSAGE_MAX_BYTES - 512);
        assert_eq!(config.format(), Some(FrameFormat::Messages));
    }

    #[test]
    fn a_session_is_renewed_a_minute_before_its_token_ends_or_at_its_configured_age() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // A 15-minute MSK IAM token: a minute before its end.
        assert_eq!(
            renewal_time(t0, t0 + Duration::from_secs(900)),
            t0 + Duration::from_secs(840)
        );
        // Credentials that end in 2 minutes: a quarter of the life left, not a minute.
        assert_eq!(
            renewal_time(t0, t0 + Duration::from_secs(120)),
            t0 + Duration::from_secs(90)
        );
        // Already ended: at once.
        assert_eq!(
            renewal_time(t0, t0 - Duration::from_secs(5)),
            t0 - Duration::from_secs(5)
        );

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut config = plain_config(None);
        let sink = rt
            .block_on(KafkaSink::connect("events", &config, None))
            .unwrap();
        let now = SystemTime::now();
        let old = Duration::from_secs(3_600);
        assert_eq!(sink.renewal_due(old, now), None, "no token, no age limit");
        *sink.renew_by.lock().unwrap() = Some(now + Duration::from_secs(1));
        assert_eq!(sink.renewal_due(old, now), None);
        assert_eq!(
            sink.renewal_due(old, now + Duration::from_secs(1)),
            Some("token")
        );
        config.reauthenticate_every = Some(Duration::from_secs(60));
        let sink = rt
            .block_on(KafkaSink::connect("events", &config, None))
            .unwrap();
        assert_eq!(sink.renewal_due(Duration::from_secs(59), now), None);
        assert_eq!(sink.renewal_due(old, now), Some("reauthenticate_every"));
    }

    #[test]
    fn an_msk_iam_token_sets_when_its_session_is_renewed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let expires = SystemTime::now() + Duration::from_secs(120);
        let credentials = aws_credential_types::Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            Some("session".into()),
            Some(expires),
            "test",
        );
        let config = plain_config(Some(KafkaSasl::AwsMskIam {
            region: Some("eu-west-1".into()),
        }));
        let sink = rt
            .block_on(KafkaSink::connect(
                "events",
                &config,
                Some(SharedCredentialsProvider::new(credentials)),
            ))
            .unwrap();
        let Some(SaslConfig::Oauthbearer(bearer)) = &sink.sasl else {
            panic!("an OAUTHBEARER config")
        };
        let before = SystemTime::now();
        let token = rt.block_on((bearer.callback)()).unwrap();
        assert!(!token.is_empty());
        // The credentials end before the token's 15 minutes: renewed a quarter of their
        // remaining life before they end.
        let by = sink.renew_by.lock().unwrap().expect("a renewal time");
        let life = expires.duration_since(before).unwrap();
        assert!(
            by >= expires - life / 4 && by <= expires - life / 4 + Duration::from_secs(2),
            "{by:?} against credentials ending {expires:?}"
        );
        assert_eq!(
            sink.renewal_due(Duration::ZERO, by - Duration::from_secs(1)),
            None
        );
        assert_eq!(sink.renewal_due(Duration::ZERO, by), Some("token"));
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let sasl = KafkaSasl::ScramSha512 {
            username: "edge".into(),
            password: "s3cret".into(),
        };
        let shown = format!("{sasl:?}");
        assert!(
            shown.contains("edge") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
