//! The MQTT source: one persistent session per configured broker, MQTT 3.1.1 or 5, with
//! manual acks.
//!
//! One task drives the rumqttc event loop and hands each PUBLISH to the spool with an
//! [`AfterCommit`]; a second task sends the PUBACK/PUBREC once the spool has committed, in
//! commit order (which is arrival order). A semaphore of `max_unacked` permits bounds what is
//! received but not yet committed: when the spool is full under policy `block`, permits are not
//! returned, the loop stops reading, and the broker keeps the rest in the session.
//!
//! It must never ack a message the spool has not committed, and never block the event loop on
//! the ack path (the acker is a separate task, so a full request channel cannot deadlock).
//!
//! Why permits come back at commit and not once the ack is on the wire: rumqttc writes acks
//! only while its event loop is polled, one request per turn against up to ten incoming
//! packets per turn. A source that stopped polling until its acks were out would wait for
//! itself. Under saturation acks therefore trail reads (the load program reports the most
//! outstanding at once); what they hold is an ack token each, and the broker redelivers the
//! unacked after a reconnect, so nothing is lost.

use super::SourcePlan;
use crate::config::{BrokerConfig, MqttProtocol};
use crate::logging::Repeated;
use crate::spool::{AckToken, AfterCommit, Disposition, Incoming, SpoolHandle};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};

/// Live figures of one broker connection.
#[derive(Debug, Default)]
pub(crate) struct SourceStats {
    pub(crate) connected: AtomicBool,
    pub(crate) connects: AtomicU64,
    pub(crate) connection_errors: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) payload_bytes: AtomicU64,
    /// From reading a QoS 1/2 message off the connection to handing its ack to the client:
    /// the spool commit is most of it.
    pub(crate) ack_latency: crate::metrics::Histogram,
    /// QoS 1/2 messages received whose ack has not been handed to the client yet, and the
    /// most seen at once: the broker's window in practice.
    pub(crate) unacked: AtomicU64,
    pub(crate) max_unacked_seen: AtomicU64,
    /// Topic filters the broker granted in its last SUBACK, and filters it refused (ever).
    pub(crate) subscriptions: AtomicU64,
    pub(crate) subscriptions_refused: AtomicU64,
    /// SUBSCRIBE packets sent on the current connection, and SUBACKs received for them: equal
    /// once the broker granted (or refused) every filter asked for, e.g. after a config change.
    pub(crate) subscribes_sent: AtomicU64,
    pub(crate) subacks: AtomicU64,
    /// Acks not written because their message came in on an earlier session that the broker
    /// did not keep (the broker sends those messages again).
    pub(crate) stale_acks: AtomicU64,
    /// The session messages arrive on now: a new number at every connection whose session
    /// the broker did not keep.
    pub(crate) session: AtomicU64,
}

impl SourceStats {
    /// Whether every subscription asked for on this connection has been answered.
    pub(crate) fn subscriptions_settled(&self) -> bool {
        self.subacks.load(Ordering::Relaxed) >= self.subscribes_sent.load(Ordering::Relaxed)
    }
}

/// What went wrong with a broker session.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The connection failed or dropped; TLS failures are explained against the broker's
    /// files.
    #[error("{0}")]
    Connection(String),
    /// The MQTT client did not take a request (its channel is closed or full).
    #[error("the MQTT client did not take the request: {0}")]
    Request(String),
}

/// A message or a session change, the same for both protocol versions.
enum SessionEvent {
    Connected {
        session_present: bool,
    },
    Message {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    SubAck {
        granted: u64,
        refused: u64,
    },
    Other,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The text of a connection error, with TLS failures explained against the broker's files.
fn describe(err: &(dyn std::error::Error + 'static), config: &BrokerConfig) -> String {
    match config
        .tls
        .as_ref()
        .and_then(|tls| crate::tls::explain(err, tls))
    {
        Some(why) => format!("TLS: {why}"),
        None => err.to_string(),
    }
}

/// Publishes the agent itself may have in flight to the broker. It only subscribes, so a few
/// packet ids (for SUBSCRIBE) are enough; rumqttc sizes a table by this limit, and its
/// MQTT 5 default (65,535) costs 14 MB of resident memory.
const OUTGOING_INFLIGHT: u16 = 16;

fn connect(config: &BrokerConfig, tls: Option<Arc<rustls::ClientConfig>>) -> (Client, EventLoop) {
    let transport =
        tls.map(|t| rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(t)));
    // The request channel carries acks and subscriptions; it holds one window of acks.
    let capacity = (config.max_unacked as usize).clamp(64, 65_535);
    match config.protocol {
        MqttProtocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&config.client_id, &config.host, config.port);
            o.set_keep_alive(config.keep_alive)
                .set_inflight(OUTGOING_INFLIGHT)
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_request_channel_capacity(capacity)
                .set_max_packet_size(
                    config.max_packet_bytes as usize,
                    config.max_packet_bytes as usize,
                );
            if let Some(user) = &config.username {
                o.set_credentials(user, config.password.clone().unwrap_or_default());
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = rumqttc::AsyncClient::new(o, capacity);
            (Client::V4(c), EventLoop::V4(Box::new(e)))
        }
        MqttProtocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&config.client_id, &config.host, config.port);
            o.set_keep_alive(config.keep_alive)
                .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
                .set_clean_start(false)
                // Keep the session (and the broker's queue for it) across disconnects.
                .set_session_expiry_interval(Some(u32::MAX))
                .set_receive_maximum(Some(config.max_unacked.clamp(1, 65_535) as u16))
                .set_manual_acks(true)
                .set_request_channel_capacity(capacity)
                .set_max_packet_size(Some(config.max_packet_bytes.min(u64::from(u32::MAX)) as u32));
            if let Some(user) = &config.username {
                o.set_credentials(user, config.password.clone().unwrap_or_default());
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(c), EventLoop::V5(Box::new(e)))
        }
    }
}

impl EventLoop {
    /// Polls the connection once. Cancel-safe enough for shutdown: a dropped poll can lose
    /// at most a message that was never acked, which the broker redelivers.
    async fn next(&mut self, config: &BrokerConfig) -> Result<SessionEvent, SessionError> {
        match self {
            EventLoop::V4(e) => {
                use rumqttc::{Event, Packet};
                match e
                    .poll()
                    .await
                    .map_err(|err| SessionError::Connection(describe(&err, config)))?
                {
                    Event::Incoming(Packet::ConnAck(a)) => Ok(SessionEvent::Connected {
                        session_present: a.session_present,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(SessionEvent::Message {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                    }),
                    Event::Incoming(Packet::SubAck(a)) => {
                        let granted = a
                            .return_codes
                            .iter()
                            .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)))
                            .count() as u64;
                        Ok(SessionEvent::SubAck {
                            granted,
                            refused: a.return_codes.len() as u64 - granted,
                        })
                    }
                    _ => Ok(SessionEvent::Other),
                }
            }
            EventLoop::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event;
                match e
                    .poll()
                    .await
                    .map_err(|err| SessionError::Connection(describe(&err, config)))?
                {
                    Event::Incoming(Packet::ConnAck(a)) => Ok(SessionEvent::Connected {
                        session_present: a.session_present,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(SessionEvent::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                    }),
                    Event::Incoming(Packet::SubAck(a)) => {
                        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
                        let granted = a
                            .return_codes
                            .iter()
                            .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .count() as u64;
                        Ok(SessionEvent::SubAck {
                            granted,
                            refused: a.return_codes.len() as u64 - granted,
                        })
                    }
                    _ => Ok(SessionEvent::Other),
                }
            }
        }
    }
}

impl Client {
    fn subscribe(&self, filters: &[(String, u8)]) -> Result<(), SessionError> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos_v4(*q))),
                )
                .map_err(|e| SessionError::Request(e.to_string())),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters.iter().map(|(f, q)| {
                        rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), qos_v5(*q))
                    }),
                )
                .map_err(|e| SessionError::Request(e.to_string())),
        }
    }

    fn unsubscribe(&self, filter: &str) -> Result<(), SessionError> {
        match self {
            Client::V4(c) => c
                .try_unsubscribe(filter)
                .map_err(|e| SessionError::Request(e.to_string())),
            Client::V5(c) => c
                .try_unsubscribe(filter)
                .map_err(|e| SessionError::Request(e.to_string())),
        }
    }

    async fn ack(&self, token: AckToken) -> Result<(), SessionError> {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos_v4(token.qos), Vec::new());
                p.pkid = token.pkid;
                c.ack(&p)
                    .await
                    .map_err(|e| SessionError::Request(e.to_string()))
            }
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    qos_v5(token.qos),
                    Bytes::new(),
                    None,
                );
                p.pkid = token.pkid;
                c.ack(&p)
                    .await
                    .map_err(|e| SessionError::Request(e.to_string()))
            }
        }
    }

    fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c
                .try_disconnect()
                .map_err(|e| SessionError::Request(e.to_string())),
            Client::V5(c) => c
                .try_disconnect()
                .map_err(|e| SessionError::Request(e.to_string())),
        };
    }
}

/// Follows the plan's topic filters: subscribes to added ones and unsubscribes from removed
/// ones, on the live session (the router was swapped before, so nothing new goes unrouted).
fn reconcile_subscriptions(
    name: String,
    client: Arc<Client>,
    mut plan: watch::Receiver<Arc<SourcePlan>>,
    stats: Arc<SourceStats>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut current = plan.borrow_and_update().filters.clone();
        while plan.changed().await.is_ok() {
            let next = plan.borrow_and_update().filters.clone();
            let added: Vec<(String, u8)> = next
                .iter()
                .filter(|f| !current.contains(f))
                .cloned()
                .collect();
            let removed: Vec<&String> = current
                .iter()
                .filter(|(t, _)| !next.iter().any(|(n, _)| n == t))
                .map(|(t, _)| t)
                .collect();
            if !added.is_empty() {
                stats.subscribes_sent.fetch_add(1, Ordering::Relaxed);
                // The client's channel may be full of acks for a while: try until it takes it.
                let mut logged = false;
                while let Err(e) = client.subscribe(&added) {
                    if !std::mem::replace(&mut logged, true) {
                        tracing::warn!(broker = %name, error = %e, "cannot queue the new subscriptions yet; trying again");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            for t in &removed {
                if let Err(e) = client.unsubscribe(t) {
                    tracing::error!(broker = %name, filter = %t, error = %e, "cannot queue an unsubscribe");
                }
            }
            if !added.is_empty() || !removed.is_empty() {
                tracing::info!(broker = %name, added = ?added, removed = ?removed, "subscriptions changed with the config");
            }
            current = next;
        }
    })
}

/// Runs one broker session until `stop` turns true, routing with the current `plan`.
pub(crate) async fn run(
    config: BrokerConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut plan: watch::Receiver<Arc<SourcePlan>>,
    spool: SpoolHandle,
    stats: Arc<SourceStats>,
    mut stop: watch::Receiver<bool>,
) {
    let (client, mut events) = connect(&config, tls);
    let client = Arc::new(client);
    let permits = Arc::new(Semaphore::new(config.max_unacked as usize));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<AckToken>();
    let acker = {
        let client = client.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            while let Some(token) = ack_rx.recv().await {
                stats.unacked.fetch_sub(1, Ordering::Relaxed);
                if token.session != stats.session.load(Ordering::Relaxed) {
                    stats.stale_acks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if client.ack(token).await.is_err() {
                    break;
                }
                stats.ack_latency.record(token.received.elapsed());
            }
        })
    };
    let mut router = plan.borrow_and_update().router.clone();
    let reconciler = reconcile_subscriptions(
        config.name.clone(),
        client.clone(),
        plan.clone(),
        stats.clone(),
    );
    let broker = format!("{}:{}", config.host, config.port);
    let mut errors = Repeated::new(Duration::from_secs(60));
    let mut unrouted = Repeated::new(Duration::from_secs(60));
    let mut oversize = Repeated::new(Duration::from_secs(60));
    let mut subscribe_errors = Repeated::new(Duration::from_secs(60));
    let mut retry =
        crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    // When to (try to) queue the session's SUBSCRIBE again, until the client takes it.
    let mut subscribe_due: Option<tokio::time::Instant> = None;
    loop {
        if let Some(due) = subscribe_due.filter(|d| *d <= tokio::time::Instant::now()) {
            let filters = plan.borrow().filters.clone();
            match client.subscribe(&filters) {
                Ok(()) => subscribe_due = None,
                Err(e) => {
                    if let Some(repeats) = subscribe_errors.should_log() {
                        tracing::warn!(broker = %config.name, error = %e, repeats, "cannot queue the subscriptions yet; trying again");
                    }
                    subscribe_due = Some(due + Duration::from_millis(100));
                }
            }
        }
        let event = tokio::select! {
            // Cancel-safe: see `EventLoop::next`; a timer.
            e = events.next(&config) => e,
            _ = async {
                match subscribe_due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => continue,
            _ = stop.changed() => break,
        };
        match event {
            Ok(SessionEvent::Connected { session_present }) => {
                stats.connected.store(true, Ordering::Relaxed);
                stats.connects.fetch_add(1, Ordering::Relaxed);
                if !session_present {
                    // The broker kept nothing: acks of earlier messages must not be written
                    // on this session (their packet ids would name other messages).
                    stats.session.fetch_add(1, Ordering::Relaxed);
                }
                retry.reset();
                errors.recovered(|n| tracing::info!(broker = %config.name, address = %broker, after_errors = n, "reconnected"));
                tracing::info!(broker = %config.name, address = %broker, session_present, "connected");
                // A new connection: only this SUBSCRIBE is outstanding. Queued until the
                // client takes it (its channel may be full of acks).
                stats
                    .subscribes_sent
                    .store(stats.subacks.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                subscribe_due = Some(tokio::time::Instant::now());
            }
            Ok(SessionEvent::Message {
                topic,
                payload,
                qos,
                pkid,
            }) => {
                let received = std::time::Instant::now();
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                    _ = stop.changed() => break,
                };
                stats.messages.fetch_add(1, Ordering::Relaxed);
                stats
                    .payload_bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                // A config change swaps the router; checking for one is one atomic load.
                if plan.has_changed().unwrap_or(false) {
                    router = plan.borrow_and_update().router.clone();
                }
                let disposition = router.classify(&topic, payload.len());
                match &disposition {
                    Disposition::Dropped { reason, .. } => {
                        if let Some(repeats) = unrouted.should_log() {
                            tracing::warn!(broker = %config.name, %topic, %reason, repeats, "message dropped: no route matches its topic (counted)");
                        }
                    }
                    Disposition::DeadLetter { route, reason } => {
                        if let Some(repeats) = oversize.should_log() {
                            tracing::warn!(broker = %config.name, %topic, %route, bytes = payload.len(), %reason, repeats, "message dead-lettered (counted; kept in the spool's dead_letters table)");
                        }
                    }
                    Disposition::Record { .. } => {}
                }
                if qos > 0 {
                    let now = stats.unacked.fetch_add(1, Ordering::Relaxed) + 1;
                    stats.max_unacked_seen.fetch_max(now, Ordering::Relaxed);
                }
                let ack = (qos > 0).then(|| {
                    (
                        ack_tx.clone(),
                        AckToken {
                            qos,
                            pkid,
                            session: stats.session.load(Ordering::Relaxed),
                            received,
                        },
                    )
                });
                let incoming = Incoming {
                    topic,
                    payload,
                    ts_ms: crate::clock::now_ms(),
                    disposition,
                    after_commit: AfterCommit {
                        ack,
                        permit: Some(permit),
                    },
                };
                if spool.append(incoming).is_err() {
                    tracing::error!(broker = %config.name, "spool stopped; source stops without acking");
                    break;
                }
            }
            Ok(SessionEvent::SubAck { granted, refused }) => {
                stats.subacks.fetch_add(1, Ordering::Relaxed);
                stats.subscriptions.store(granted, Ordering::Relaxed);
                tracing::info!(broker = %config.name, filters = granted, "subscribed");
                if refused > 0 {
                    stats
                        .subscriptions_refused
                        .fetch_add(refused, Ordering::Relaxed);
                    tracing::error!(broker = %config.name, refused, granted, "the broker refused topic filters; messages on them will not arrive (check its ACLs)");
                }
            }
            Ok(SessionEvent::Other) => {}
            Err(e) => {
                stats.connected.store(false, Ordering::Relaxed);
                stats.subscriptions.store(0, Ordering::Relaxed);
                subscribe_due = None;
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(repeats) = errors.should_log() {
                    tracing::warn!(broker = %config.name, address = %broker, error = %e, repeats, "MQTT connection failed; retrying");
                }
                let delay = retry.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    // Let committed messages' acks reach the broker before disconnecting; anything newer is
    // left unacked and the session redelivers it.
    let all = config.max_unacked;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    drop(ack_tx);
    while tokio::time::Instant::now() < deadline {
        let settled = permits.available_permits() == all as usize && acker.is_finished();
        tokio::select! {
            r = events.next(&config) => if r.is_err() { break },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if settled {
            break;
        }
    }
    client.disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while events.next(&config).await.is_ok() {}
    })
    .await;
    stats.connected.store(false, Ordering::Relaxed);
    acker.abort();
    reconciler.abort();
}
