//! The MQTT source: one persistent session per configured broker, MQTT 3.1.1 or 5, on a
//! connection loop of its own over rumqttc's packet codec ([`super::codec`]), its decisions in
//! [`super::session::Session`].
//!
//! Each PUBLISH goes to the spool with an [`AfterCommit`] that brings its ticket back once the
//! spool has committed it; the loop then writes every ack that is ready in one write, on the
//! connection the message came in on and no other. Reading stops while `max_unacked` messages
//! wait for their commit (the spool full under `block`, or slower than the broker), which
//! pushes back on the broker through TCP whatever it makes of Receive Maximum; the keep-alive
//! goes on meanwhile (pings are written, and their answers, queued behind unread messages, are
//! not awaited). Acks the socket cannot take yet wait in a bounded backlog while reading and
//! committing go on (a broker may read its subscriber's packets far more slowly than it sends
//! to it; see [`WRITE_BACKLOG_MAX`]); past the bound reading stops too. A saturated Mosquitto
//! may take none of them for over a minute, so no timer of the agent's judges that wait: a
//! broker host gone away is found by TCP (its zero-window probes go unanswered). A packet over `max_packet_bytes` is read past and counted
//! (`oversize_packet`), the session going on. While the spool says the stream is slow, reads
//! are paced so one wakeup takes several messages (see [`Pace`]).
//!
//! It must never ack a message the spool has not committed, never write an ack on another
//! connection than its message's, and never spool a QoS 2 message twice within a session.

use super::codec::{self, Decoded};
use super::session::{Outbound, Session, Take, Ticket};
use super::SourcePlan;
use crate::config::BrokerConfig;
use crate::logging::Repeated;
use crate::spool::{AckToken, AfterCommit, Disposition, Incoming, Receipt, SpoolHandle};
use bytes::BytesMut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

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
    /// Bytes of packets (acks) waiting for the socket to take them, and the most at once: a
    /// broker slow to read its subscriber's packets (see [`WRITE_BACKLOG_MAX`]).
    pub(crate) write_backlog: AtomicU64,
    pub(crate) max_write_backlog: AtomicU64,
    /// Topic filters the broker granted in its last SUBACK, and filters it refused (ever).
    pub(crate) subscriptions: AtomicU64,
    pub(crate) subscriptions_refused: AtomicU64,
    /// Every filter the config asks for is granted on the current connection.
    pub(crate) subscribed: AtomicBool,
    /// Committed messages whose ack was not written because they came in on an earlier
    /// connection (the broker sends those messages again).
    pub(crate) stale_acks: AtomicU64,
    /// QoS 2 messages the broker sent again before releasing them, not spooled again.
    pub(crate) qos2_duplicates: AtomicU64,
    /// Packets over `max_packet_bytes` read past (a PUBLISH among them is counted dropped
    /// `oversize_packet` and acked).
    pub(crate) oversize_packets: AtomicU64,
    /// Reads of the connection that returned bytes: against `messages`, how many messages a
    /// read takes (several while a slow stream's reads are paced, see [`Pace`]).
    pub(crate) socket_reads: AtomicU64,
    /// Acks held back at the moment of writing because they belonged to an earlier
    /// connection: always 0 (see `Counts::misdirected`).
    pub(crate) misdirected_acks: AtomicU64,
}

impl SourceStats {
    /// Whether every subscription the config asks for is granted.
    pub(crate) fn subscriptions_settled(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
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

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("cannot connect to {address}: {why}")]
    Connect { address: String, why: String },
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    #[error("the broker did not answer CONNECT within {0:?}")]
    NoConnAck(Duration),
    #[error("the broker closed the connection")]
    Closed,
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error(transparent)]
    Session(#[from] super::session::Dead),
    #[error("the broker disconnected: {0}")]
    Disconnected(String),
    #[error("the spool stopped")]
    SpoolStopped,
}

/// How a connection ended.
enum Ended {
    /// `stop` turned true: committed messages were acked, DISCONNECT sent.
    Stopped,
    Failed(ConnectionError),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How long connecting (TCP, TLS and CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 << 10;

/// Room left in the read buffer below which a fresh chunk is taken for the next read.
///
/// A message's payload is a slice of the chunk it was read into, and keeps that whole chunk
/// alive until the spool has stored it. Asking for a full `READ_CHUNK` of room before every
/// read took a fresh chunk each time the last one still had messages waiting for their
/// commit, so a stream that arrives a message per read (1,000 msg/s) held 64 KiB per waiting
/// message: with a second's gathering per commit (`spool.commit_max_wait`) the agent's peak
/// RSS was 37-43 MiB instead of 16. Reading into the chunk's remaining room first keeps what
/// waiting messages hold close to their own size.
const READ_MIN: usize = 4 << 10;

/// Makes room for the next read (see [`READ_MIN`]).
fn make_room(rbuf: &mut BytesMut) {
    if rbuf.capacity() - rbuf.len() < READ_MIN {
        rbuf.reserve(READ_CHUNK);
    }
}

/// Asks the kernel to acknowledge what arrives on `socket` at once rather than delay it
/// (`TCP_QUICKACK`, which lasts until the kernel's next delayed-ack decision, so it is asked
/// again after each read). Mosquitto leaves Nagle's algorithm on: it holds its next small
/// packets until the last ones are acknowledged, and a delayed ack makes a slow, steady
/// stream arrive in bursts whose gaps end the spool's gathering (a commit, several pages
/// written, every few milliseconds at 1,000 msg/s). Only while the spool says the stream is
/// slow: at saturation the extra ack segments cost CPU per message and gain nothing.
fn quick_ack(socket: std::os::fd::RawFd) {
    set_int_option(socket, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
}

/// Sets an int socket option; a failure changes nothing the intake relies on (a socket closed
/// meanwhile gets EBADF), so it is not reported.
fn set_int_option(
    socket: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) {
    // SAFETY: a valid option pointer and length for an int option.
    unsafe {
        libc::setsockopt(
            socket,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Paced reading of a slow stream. A message read on its own costs a wakeup of the intake and
/// one of the spool's thread (most of the CPU per message at 1,000 msg/s and at 20); while the
/// spool says the stream is slow and messages come at least two per pace, the intake reads
/// about once per pace (a few of the stream's mean gaps, at least half the commit interval:
/// `SpoolHandle::read_pace`), so each wakeup takes the several messages the socket gathered
/// meanwhile. Their acks wait for the spool's gathering anyway (up to `commit_max_wait`), and
/// the pace is shorter than any gap the spool takes for a pause (four paces). At saturation
/// and at half load the stream is not slow and every read goes at once.
///
/// The kernel keeps the pace: the socket reports itself readable once the bytes a pace
/// brings have come (`Paced::wake_bytes`, see [`set_low_water`]), and a timer only bounds the
/// wait should the stream slow down, two of its slots ([`TIMER_SLOT`]) past the pace so that
/// its slot's wakeup normally never comes. A timer that kept the pace itself cost two wakeups a
/// read whenever its deadline fell past the slot it was set in (every read of a 64 ms pace,
/// the pace of 1,000 msg/s; half of a 32 ms pace's), where the socket costs one.
#[derive(Debug)]
struct Pace {
    /// While reads are paced: what the next read waits for.
    paced: Option<Paced>,
    /// The last read that took messages, and the mean time between messages (moving).
    last: Instant,
    gap: Duration,
    /// The mean bytes of a message on the connection (moving; 0 before the first).
    bytes_each: u64,
}

/// What a paced read waits for: a pace's bytes, or its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Paced {
    /// The bytes the socket gathers before it reports itself readable: the stream's messages
    /// in a pace at their mean size.
    wake_bytes: libc::c_int,
    /// No read before this unless the socket reports `wake_bytes`: the bound on the wait.
    until: tokio::time::Instant,
}

/// The runtime's timer keeps a deadline past the current 64 ms of its wheel in a coarser slot
/// this wide and wakes its thread at the start of that slot to place the deadline exactly
/// (tokio's timer wheel: 1 ms slots within 64 ms, then 64 ms slots): such a sleep, if it runs
/// out, costs two wakeups.
const TIMER_SLOT: Duration = Duration::from_millis(64);

/// A pace's `wake_bytes` are rounded down to a multiple of this, so the low-water mark
/// is not set again on every read for a few bytes' difference in the moving means.
const WAKE_BYTES_STEP: u64 = 64;

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            paced: None,
            last: Instant::now(),
            gap: Duration::from_secs(1),
            bytes_each: 0,
        }
    }
}

impl Pace {
    /// A read at `now` took `taken` messages in `bytes`; `pace` is the spool's (`None`: not
    /// slow).
    fn read(&mut self, now: Instant, taken: u64, bytes: usize, pace: Option<Duration>) {
        if taken > 0 {
            let each = now.saturating_duration_since(self.last) / taken.min(u32::MAX as u64) as u32;
            self.gap = (self.gap * 7 + each) / 8;
            self.last = now;
            let size = bytes as u64 / taken;
            self.bytes_each = match self.bytes_each {
                0 => size,
                mean => (mean * 7 + size) / 8,
            };
        }
        self.paced = pace.filter(|p| self.gap * 2 < *p).map(|p| {
            let messages = (p.as_micros() / self.gap.as_micros().max(1)).max(1) as u64;
            let bytes =
                messages.saturating_mul(self.bytes_each) / WAKE_BYTES_STEP * WAKE_BYTES_STEP;
            Paced {
                wake_bytes: bytes.clamp(1, PACED_LOW_WATER as u64) as libc::c_int,
                until: tokio::time::Instant::from_std(now) + p + 2 * TIMER_SLOT,
            }
        });
    }

    /// The bound of a pace passed with fewer than its bytes come: the next read goes at once.
    fn bound_passed(&mut self) {
        self.paced = None;
    }

    /// A turn's reading at `now`, `may_read` when the window and the write backlog let the
    /// intake read: not paced, it reads at once and the socket reports every byte; paced, it
    /// reads when the socket reports a pace's bytes, at the latest at the pace's bound.
    fn plan(&self, may_read: bool, now: tokio::time::Instant) -> ReadPlan {
        let paced = self.paced.filter(|p| may_read && p.until > now);
        ReadPlan {
            low_water: paced.map_or(1, |p| p.wake_bytes),
            until: paced.map(|p| p.until),
        }
    }
}

/// What a turn of the connection loop does about reading, when the window and the write
/// backlog let it read (see [`Pace::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadPlan {
    /// The socket's receive low-water mark.
    low_water: libc::c_int,
    /// While reads are paced: the bound on the wait for a pace's bytes.
    until: Option<tokio::time::Instant>,
}

/// The most bytes a pace waits for (see [`set_low_water`]): more than most paces of a slow
/// stream bring (a pace that would bring more wakes the thread sooner, as without it), and
/// small enough that the kernel leaves the receive buffer as it is (it grows it past twice
/// this).
const PACED_LOW_WATER: libc::c_int = 32 << 10;

/// Each message arriving wakes the runtime's thread (the socket reports itself readable): a
/// wakeup per message, which a pace is there to save. Raising the socket's receive low-water
/// mark (`SO_RCVLOWAT`) keeps it quiet until it holds `bytes` (the kernel checks again when
/// the mark is set, so lowering it to one byte reports at once what arrived meanwhile). A
/// non-blocking read still takes whatever the socket holds, below the mark or not.
fn set_low_water(socket: std::os::fd::RawFd, bytes: libc::c_int) {
    set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes);
}

/// The connection's stream, and its TCP socket for [`quick_ack`] and [`set_low_water`].
async fn open(
    config: &BrokerConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Box<dyn Stream>, std::os::fd::RawFd), ConnectionError> {
    let address = format!("{}:{}", config.host, config.port);
    let fail = |why: String| ConnectionError::Connect {
        address: address.clone(),
        why,
    };
    let tcp = tokio::net::TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let socket = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    match tls {
        None => Ok((Box::new(tcp), socket)),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(config.host.clone())
                .map_err(|e| fail(format!("{e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail(describe(&e, config)))?;
            Ok((Box::new(stream), socket))
        }
    }
}

/// Bytes of packets (acks, mostly) that may wait for the socket before reading stops.
///
/// A broker may read a subscriber's packets far more slowly than it sends to it: Mosquitto
/// 2.0.11 under 50 saturating publishers took in about 1,400 of the agent's acks a second
/// while it sent tens of thousands of messages (measured with `ss`; it looks like one packet
/// per connection per turn of its event loop), and the acks piled up in the kernel's send
/// queue (3.5 MB in a million-message run) until writes waited, for seconds. Committed messages' acks then wait here
/// instead, while reading and committing go on; past this bound reading stops, which pushes
/// back on the broker. Acked messages are committed: nothing waiting here is at risk.
const WRITE_BACKLOG_MAX: usize = 1 << 20;

/// Runs one broker session until `stop` turns true, routing with the current `plan`.
pub(crate) async fn run(
    config: BrokerConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut plan: watch::Receiver<Arc<SourcePlan>>,
    spool: SpoolHandle,
    stats: Arc<SourceStats>,
    mut stop: watch::Receiver<bool>,
) {
    let filters = plan.borrow_and_update().filters.clone();
    // QoS 2 messages spooled before a restart whose PUBREL has not come.
    let receipts = match spool.qos2_receipts(&config.name).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(broker = %config.name, error = %e, "cannot read the QoS 2 receipts from the spool; source stops without connecting");
            return;
        }
    };
    if !receipts.is_empty() {
        tracing::info!(broker = %config.name, receipts = receipts.len(), "QoS 2 messages spooled before awaiting their release");
    }
    let mut session = Session::new(
        config.keep_alive,
        config.max_unacked as usize,
        filters,
        receipts,
    );
    let (commit_tx, mut commits) = mpsc::unbounded_channel::<Vec<AckToken>>();
    let broker = format!("{}:{}", config.host, config.port);
    let mut errors = Repeated::new(Duration::from_secs(60));
    let mut retry =
        crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut intake = Intake {
        config: &config,
        stats: &stats,
        spool: &spool,
        commit_tx,
        broker: Arc::from(config.name.as_str()),
        router: plan.borrow().router.clone(),
        unrouted: Repeated::new(Duration::from_secs(60)),
        slow_reader: Repeated::new(Duration::from_secs(60)),
        oversize: Repeated::new(Duration::from_secs(60)),
    };
    loop {
        let opened = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, open(&config, tls.as_ref())) => r
                .unwrap_or_else(|_| Err(ConnectionError::NoConnAck(CONNECT_TIMEOUT))),
            _ = stop.changed() => break,
        };
        let ended = match opened {
            Ok((stream, socket)) => {
                intake
                    .serve(
                        stream,
                        socket,
                        &mut session,
                        &mut commits,
                        &mut plan,
                        &mut stop,
                        &mut retry,
                        &mut errors,
                    )
                    .await
            }
            Err(e) => Ended::Failed(e),
        };
        session.on_disconnected();
        stats.connected.store(false, Ordering::Relaxed);
        stats.subscribed.store(false, Ordering::Relaxed);
        stats.subscriptions.store(0, Ordering::Relaxed);
        match ended {
            Ended::Stopped => break,
            Ended::Failed(ConnectionError::SpoolStopped) => {
                tracing::error!(broker = %config.name, "spool stopped; source stops without acking");
                break;
            }
            Ended::Failed(e) => {
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(repeats) = errors.should_log() {
                    tracing::warn!(broker = %config.name, address = %broker, error = %e, repeats, "MQTT connection failed; retrying");
                }
                let delay = retry.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => break,
                }
                // Commits that came back while disconnected: their acks are stale now.
                while let Ok(tokens) = commits.try_recv() {
                    intake.committed(&mut session, tokens);
                }
            }
        }
    }
    stats.connected.store(false, Ordering::Relaxed);
}

/// What the connection loop needs besides the session.
struct Intake<'a> {
    config: &'a BrokerConfig,
    stats: &'a SourceStats,
    spool: &'a SpoolHandle,
    /// Where the spool sends a commit's acks, together.
    commit_tx: mpsc::UnboundedSender<Vec<AckToken>>,
    /// The broker's name, as the spool keys its QoS 2 receipts.
    broker: Arc<str>,
    router: Arc<super::router::Router>,
    unrouted: Repeated,
    oversize: Repeated,
    slow_reader: Repeated,
}

impl Intake<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        stream: Box<dyn Stream>,
        socket: std::os::fd::RawFd,
        session: &mut Session,
        commits: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
        plan: &mut watch::Receiver<Arc<SourcePlan>>,
        stop: &mut watch::Receiver<bool>,
        retry: &mut crate::backoff::Backoff,
        errors: &mut Repeated,
    ) -> Ended {
        let config = self.config;
        let protocol = config.protocol;
        let max_bytes = config.max_packet_bytes;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut wbuf = BytesMut::with_capacity(4096);
        codec::encode_connect(config, &mut wbuf);
        if let Err(e) = wr.write_all(&wbuf).await {
            return Ended::Failed(ConnectionError::Io(describe(&e, config)));
        }
        wbuf.clear();
        // CONNACK first; nothing else may come before it.
        let connack = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                if let Some(d) = codec::decode(protocol, &mut rbuf, max_bytes)? {
                    return Ok::<_, ConnectionError>(d);
                }
                make_room(&mut rbuf);
                match rd.read_buf(&mut rbuf).await {
                    Ok(0) => return Err(ConnectionError::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(ConnectionError::Io(describe(&e, config))),
                }
            }
        })
        .await;
        let session_present = match connack {
            Err(_) => return Ended::Failed(ConnectionError::NoConnAck(CONNECT_TIMEOUT)),
            Ok(Err(e)) => return Ended::Failed(e),
            Ok(Ok(Decoded::ConnAck {
                session_present,
                accepted: Ok(()),
            })) => session_present,
            Ok(Ok(Decoded::ConnAck {
                accepted: Err(why), ..
            })) => return Ended::Failed(ConnectionError::Refused(why)),
            Ok(Ok(other)) => {
                return Ended::Failed(ConnectionError::Io(format!(
                    "the broker answered CONNECT with {other:?}"
                )))
            }
        };
        session.on_connected(session_present);
        if !session_present
            && self
                .spool
                .qos2_cleared(self.broker.clone(), session.generation())
                .is_err()
        {
            return Ended::Failed(ConnectionError::SpoolStopped);
        }
        self.stats
            .subscribed
            .store(session.ready(), Ordering::Relaxed);
        let broker = format!("{}:{}", config.host, config.port);
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        retry.reset();
        errors.recovered(|n| tracing::info!(broker = %config.name, address = %broker, after_errors = n, "reconnected"));
        tracing::info!(broker = %config.name, address = %broker, session_present, "connected");
        let mut out = Vec::new();
        // Bytes of an oversize packet still to pass over.
        let mut skipping: u64 = 0;
        let mut stopping: Option<tokio::time::Instant> = None;
        // Paced reading of a slow stream (see `Pace`).
        let mut pace = Pace::default();
        // The socket's low-water mark, raised while reads are paced (see `Pace`).
        let mut low_water: libc::c_int = 1;
        loop {
            // Packets read while the window was full wait in the buffer until it opens.
            if let Err(e) = self.take_packets(&mut rbuf, &mut skipping, session) {
                return Ended::Failed(e);
            }
            out.clear();
            session.set_writes_waiting(!wbuf.is_empty());
            if let Err(e) = session.due_writes(Instant::now(), &mut out) {
                return Ended::Failed(e.into());
            }
            if let Some(deadline) = stopping {
                // Stopping: once nothing awaits its commit (or the deadline passed), the
                // last acks go out with DISCONNECT.
                if session.awaiting_commit() == 0 || tokio::time::Instant::now() >= deadline {
                    out.push(Outbound::Disconnect);
                }
            }
            if !out.is_empty() {
                for p in &out {
                    codec::encode(protocol, p, &mut wbuf);
                    if matches!(p, Outbound::Subscribe { .. }) {
                        tracing::debug!(broker = %config.name, "subscribing");
                    }
                }
                if out.last() == Some(&Outbound::Disconnect) {
                    // The last acks and DISCONNECT, given a moment to go out.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        wr.write_all(&wbuf).await?;
                        wr.flush().await?;
                        wr.shutdown().await
                    })
                    .await;
                    return Ended::Stopped;
                }
            }
            self.publish_backlog(wbuf.len());
            if wbuf.len() >= WRITE_BACKLOG_MAX {
                if let Some(repeats) = self.slow_reader.should_log() {
                    tracing::warn!(broker = %config.name, waiting_bytes = wbuf.len(), repeats, "the broker reads this connection's acks more slowly than it sends messages; reading pauses until it takes them (every message waiting for its ack is committed)");
                }
            }
            self.publish_window(session);
            let deadline = session.next_deadline().map(tokio::time::Instant::from_std);
            let may_read =
                session.may_read() && stopping.is_none() && wbuf.len() < WRITE_BACKLOG_MAX;
            let turn = pace.plan(may_read, tokio::time::Instant::now());
            if turn.low_water != low_water {
                low_water = turn.low_water;
                set_low_water(socket, low_water);
            }
            if may_read {
                make_room(&mut rbuf);
            }
            tokio::select! {
                biased;
                _ = stop.changed(), if stopping.is_none() => {
                    // Let committed messages' acks reach the broker; anything newer is
                    // left unacked and the session redelivers it.
                    stopping = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                r = wr.write(&wbuf), if !wbuf.is_empty() => {
                    match r {
                        Ok(0) => return Ended::Failed(ConnectionError::Closed),
                        Ok(n) => {
                            let _ = wbuf.split_to(n);
                        }
                        Err(e) => return Ended::Failed(ConnectionError::Io(describe(&e, config))),
                    }
                }
                Some(tokens) = commits.recv() => {
                    self.committed(session, tokens);
                    while let Ok(tokens) = commits.try_recv() {
                        self.committed(session, tokens);
                    }
                }
                r = rd.read_buf(&mut rbuf), if may_read => {
                    let now = Instant::now();
                    let read = match r {
                        Ok(0) => return Ended::Failed(ConnectionError::Closed),
                        Ok(n) => {
                            self.stats.socket_reads.fetch_add(1, Ordering::Relaxed);
                            session.heard(now);
                            if self.spool.slow_stream() {
                                quick_ack(socket);
                            }
                            n
                        }
                        Err(e) => return Ended::Failed(ConnectionError::Io(describe(&e, config))),
                    };
                    let taken = match self.take_packets(&mut rbuf, &mut skipping, session) {
                        Ok(taken) => taken,
                        Err(e) => return Ended::Failed(e),
                    };
                    pace.read(now, taken, read, self.spool.read_pace());
                }
                _ = async {
                    match turn.until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }, if turn.until.is_some() => {
                    pace.bound_passed();
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if stopping.is_some() => {}
                Ok(()) = plan.changed() => {
                    let next = plan.borrow_and_update().clone();
                    // The router first, so nothing new goes unrouted.
                    self.router = next.router.clone();
                    let (added, removed) = session.set_filters(next.filters.clone());
                    self.stats.subscribed.store(session.ready(), Ordering::Relaxed);
                    if !added.is_empty() || !removed.is_empty() {
                        tracing::info!(broker = %config.name, added = ?added, removed = ?removed, "subscriptions changed with the config");
                    }
                }
            }
        }
    }

    /// Every whole packet in `rbuf` while the window is open (past the rest of an oversize
    /// one first); returns how many PUBLISH packets it took.
    fn take_packets(
        &mut self,
        rbuf: &mut BytesMut,
        skipping: &mut u64,
        session: &mut Session,
    ) -> Result<u64, ConnectionError> {
        let protocol = self.config.protocol;
        let mut taken = 0;
        loop {
            if *skipping > 0 {
                *skipping -= codec::skip(rbuf, *skipping);
                if *skipping > 0 {
                    return Ok(taken);
                }
            }
            // The window is full: the rest stays in the buffer, undecoded, until commits
            // open it (so at most `max_unacked` messages ever await their commit).
            if !session.may_read() {
                return Ok(taken);
            }
            let Some(packet) = codec::decode(protocol, rbuf, self.config.max_packet_bytes)? else {
                return Ok(taken);
            };
            match packet {
                Decoded::Publish {
                    topic,
                    payload,
                    qos,
                    pkid,
                } => {
                    taken += 1;
                    let disposition = self.router.classify(&topic, payload.len());
                    self.spool_message(session, topic, payload, qos, pkid, disposition)?;
                }
                Decoded::Oversize { skip, publish } => {
                    *skipping = skip;
                    self.stats.oversize_packets.fetch_add(1, Ordering::Relaxed);
                    if let Some((topic, qos, pkid)) = publish {
                        taken += 1;
                        if let Some(repeats) = self.oversize.should_log() {
                            tracing::warn!(broker = %self.config.name, %topic, bytes = skip, max_packet_bytes = self.config.max_packet_bytes, repeats, "an MQTT packet over max_packet_bytes was read past (counted dropped, oversize_packet)");
                        }
                        let disposition = self.router.oversize_packet(&topic);
                        self.spool_message(
                            session,
                            topic,
                            bytes::Bytes::new(),
                            qos,
                            pkid,
                            disposition,
                        )?;
                    }
                }
                Decoded::PubRel { pkid } => {
                    session.on_packet(super::session::Inbound::PubRel { pkid }, Instant::now())?;
                    self.spool
                        .qos2_released(self.broker.clone(), pkid)
                        .map_err(|_| ConnectionError::SpoolStopped)?;
                }
                Decoded::SubAck {
                    pkid,
                    granted,
                    refused,
                } => {
                    let was_ready = session.ready();
                    session.on_packet(
                        super::session::Inbound::SubAck {
                            pkid,
                            granted,
                            refused,
                        },
                        Instant::now(),
                    )?;
                    self.stats
                        .subscriptions
                        .store(granted as u64, Ordering::Relaxed);
                    self.stats
                        .subscribed
                        .store(session.ready(), Ordering::Relaxed);
                    if refused > 0 {
                        self.stats
                            .subscriptions_refused
                            .fetch_add(refused as u64, Ordering::Relaxed);
                        tracing::error!(broker = %self.config.name, refused, granted, "the broker refused topic filters; asking again in a while (check its ACLs)");
                    } else if !was_ready && session.ready() {
                        tracing::info!(broker = %self.config.name, filters = granted, "subscribed");
                    } else {
                        tracing::debug!(broker = %self.config.name, filters = granted, "subscription granted again");
                    }
                }
                Decoded::UnsubAck { pkid } => {
                    session
                        .on_packet(super::session::Inbound::UnsubAck { pkid }, Instant::now())?;
                }
                Decoded::PingResp => {
                    session.on_packet(super::session::Inbound::PingResp, Instant::now())?;
                }
                Decoded::Disconnect { reason } => {
                    return Err(ConnectionError::Disconnected(reason));
                }
                Decoded::ConnAck { .. } | Decoded::Other => {}
            }
        }
    }

    /// Hands a message to the spool (unless it is a QoS 2 duplicate); its ticket comes back
    /// on `commit_tx` once committed.
    fn spool_message(
        &mut self,
        session: &mut Session,
        topic: String,
        payload: bytes::Bytes,
        qos: u8,
        pkid: u16,
        disposition: Disposition,
    ) -> Result<(), ConnectionError> {
        let received = Instant::now();
        let ticket = match session.on_publish(qos, pkid) {
            Take::Duplicate => {
                self.stats.qos2_duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Take::SpoolNoAck => None,
            Take::Spool(t) => Some(t),
        };
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        self.stats
            .payload_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        match &disposition {
            Disposition::Dropped { reason, .. } if *reason == crate::spool::DropReason::NoRoute => {
                if let Some(repeats) = self.unrouted.should_log() {
                    tracing::warn!(broker = %self.config.name, %topic, %reason, repeats, "message dropped: no route matches its topic (counted)");
                }
            }
            Disposition::DeadLetter { route, reason } => {
                if let Some(repeats) = self.oversize.should_log() {
                    tracing::warn!(broker = %self.config.name, %topic, %route, bytes = payload.len(), %reason, repeats, "message dead-lettered (counted; kept in the spool's dead_letters table)");
                }
            }
            _ => {}
        }
        let receipt = ticket.filter(|t| t.qos == 2).map(|t| Receipt {
            broker: self.broker.clone(),
            pkid: t.pkid,
            generation: t.generation,
        });
        let token = match ticket {
            Some(t) => AckToken {
                qos: t.qos,
                pkid: t.pkid,
                session: t.generation,
                received,
            },
            None => AckToken {
                qos: 0,
                pkid: 0,
                session: session.generation(),
                received,
            },
        };
        let incoming = Incoming {
            topic,
            payload,
            ts_ms: crate::clock::now_ms(),
            disposition,
            after_commit: AfterCommit {
                ack: Some((self.commit_tx.clone(), token)),
                permit: None,
            },
            receipt,
        };
        self.spool
            .append(incoming)
            .map_err(|_| ConnectionError::SpoolStopped)?;
        // Half the window waiting, or all of it: commit now rather than at the end of the
        // spool's commit interval. At half, the acks of the first half go out while the
        // second is read, so the broker sends on instead of waiting for a whole window's
        // commit; full, nothing more comes until a commit.
        let waiting = session.awaiting_commit();
        if waiting == (self.config.max_unacked as usize / 2).max(1) || !session.may_read() {
            self.spool
                .flush()
                .map_err(|_| ConnectionError::SpoolStopped)?;
        }
        self.publish_window(session);
        Ok(())
    }

    /// A commit's messages came back: each ack is queued if its connection is the current one.
    fn committed(&mut self, session: &mut Session, tokens: Vec<AckToken>) {
        let now = Instant::now();
        for t in tokens {
            if t.qos == 0 {
                session.committed_no_ack();
                continue;
            }
            let stale_before = session.counts().stale_acks;
            session.committed(Ticket {
                generation: t.session,
                qos: t.qos,
                pkid: t.pkid,
            });
            if session.counts().stale_acks == stale_before {
                self.stats
                    .ack_latency
                    .record(now.saturating_duration_since(t.received));
            }
        }
        self.stats
            .stale_acks
            .store(session.counts().stale_acks, Ordering::Relaxed);
    }

    fn publish_backlog(&self, bytes: usize) {
        self.stats
            .write_backlog
            .store(bytes as u64, Ordering::Relaxed);
        self.stats
            .max_write_backlog
            .fetch_max(bytes as u64, Ordering::Relaxed);
    }

    fn publish_window(&self, session: &Session) {
        let now = session.awaiting_commit() as u64;
        self.stats.unacked.store(now, Ordering::Relaxed);
        self.stats
            .max_unacked_seen
            .fetch_max(now, Ordering::Relaxed);
        let counts = session.counts();
        self.stats
            .stale_acks
            .store(counts.stale_acks, Ordering::Relaxed);
        self.stats
            .misdirected_acks
            .store(counts.misdirected, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MqttProtocol;

    /// A connected pair on loopback (the writer without Nagle's delay) whose reader the
    /// runtime knows to hold nothing, as after the intake's last read; and the reader's socket.
    async fn drained_pair() -> (
        tokio::net::TcpStream,
        tokio::net::TcpStream,
        std::os::fd::RawFd,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let writer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        writer.set_nodelay(true).unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        let socket = std::os::fd::AsRawFd::as_raw_fd(&reader);
        let e = reader.try_read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        (writer, reader, socket)
    }

    /// A held socket does not report the bytes that arrive as readable; released, it reports
    /// them at once (the kernel checks again when the low-water mark comes down), and they
    /// all read back.
    #[tokio::test]
    async fn a_held_socket_stays_quiet_until_released() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut writer, mut reader, socket) = drained_pair().await;
        set_low_water(socket, PACED_LOW_WATER);
        let sent: Vec<u8> = (0..3_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).await.unwrap();
        writer.flush().await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(200), reader.readable()).await;
        assert!(
            quiet.is_err(),
            "a held socket reported 3,000 bytes as readable"
        );
        set_low_water(socket, 1);
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("a released socket reports what arrived while it was held")
            .unwrap();
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), reader.read_exact(&mut got))
            .await
            .expect("the bytes read back")
            .unwrap();
        assert_eq!(got, sent);
    }

    /// Reads of one message each at 1,000 msg/s start pacing once the spool says the stream
    /// is slow; at 20 msg/s, or when the spool does not say so, every read goes at once; and
    /// paced reads that take several messages each keep the pace.
    #[test]
    fn reads_are_paced_only_for_a_slow_stream_of_close_messages() {
        let pace = Some(Duration::from_millis(5));
        let start = Instant::now();
        let mut p = Pace::default();
        for i in 1..=100u32 {
            p.read(start + Duration::from_millis(u64::from(i)), 1, 230, None);
        }
        assert_eq!(p.paced, None, "not slow: no pacing");
        let at = start + Duration::from_millis(101);
        p.read(at, 1, 230, pace);
        assert_eq!(
            p.paced.map(|p| p.until),
            Some(tokio::time::Instant::from_std(at) + Duration::from_millis(5 + 128))
        );
        // Paced: each read takes the five messages of its 5 ms.
        for i in 1..=20u64 {
            p.read(at + Duration::from_millis(5 * i), 5, 1150, pace);
            assert!(p.paced.is_some(), "read {i}");
        }
        // 20 msg/s: a message every 50 ms, no pacing.
        let mut p = Pace::default();
        for i in 1..=100u64 {
            p.read(start + Duration::from_millis(50 * i), 1, 230, pace);
        }
        assert_eq!(p.paced, None);
        // A read that took nothing (a ping's answer) changes nothing of the mean gap.
        let gap = p.gap;
        p.read(start + Duration::from_secs(60), 0, 2, pace);
        assert_eq!(p.gap, gap);
        assert_eq!(p.paced, None, "not paced: every byte is reported");
    }

    /// At 20 msg/s (a 125 ms pace) the socket is to report itself readable once a pace's
    /// messages have come (two of 230 bytes in 125 ms, rounded down to 64 bytes), and the
    /// timer only bounds the wait, two of its slots past the pace; at 1,000 msg/s (a 64 ms
    /// pace, which a timer would keep with two wakeups a read) the same, 64 messages.
    #[test]
    fn a_pace_waits_for_its_bytes() {
        let pace = Some(Duration::from_millis(125));
        let start = Instant::now();
        let mut p = Pace::default();
        let mut at = start;
        for i in 1..=100u64 {
            at = start + Duration::from_millis(50 * i);
            p.read(at, 1, 230, pace);
        }
        assert_eq!(p.bytes_each, 230);
        assert_eq!(
            p.paced,
            Some(Paced {
                wake_bytes: 448,
                until: tokio::time::Instant::from_std(at) + Duration::from_millis(125 + 128)
            })
        );
        // Bigger messages: the mark follows their mean, up to its most.
        for i in 101..=200u64 {
            p.read(start + Duration::from_millis(50 * i), 1, 100_000, pace);
        }
        assert_eq!(p.paced.map(|p| p.wake_bytes), Some(PACED_LOW_WATER));
        // Not slow any more: every byte is reported.
        p.read(start + Duration::from_millis(50 * 201), 1, 230, None);
        assert_eq!(p.paced, None);
        // 1,000 msg/s, read every 64 ms.
        let pace = Some(Duration::from_millis(64));
        let mut p = Pace::default();
        for i in 1..=100u64 {
            at = start + Duration::from_millis(64 * i);
            p.read(at, 64, 64 * 230, pace);
        }
        // 63 whole messages (the moving mean gap is still a hair over 1 ms): 14,490 bytes.
        assert_eq!(
            p.paced,
            Some(Paced {
                wake_bytes: 14_464,
                until: tokio::time::Instant::from_std(at) + Duration::from_millis(64 + 128)
            })
        );
    }

    /// A connection loop's turn: not paced, it reads at once with the socket reporting every
    /// byte; paced, it reads when the socket reports a pace's bytes, bounded two timer slots
    /// past the pace; with the window full it reads nothing and holds nothing.
    #[test]
    fn a_turn_reads_at_once_or_when_a_paces_bytes_came() {
        let start = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut p = Pace::default();
        let now = tokio::time::Instant::from_std(start);
        let at_once = ReadPlan {
            low_water: 1,
            until: None,
        };
        assert_eq!(p.plan(true, now), at_once);
        // A 5 ms pace: four whole messages of 230 bytes (the moving mean gap is still a hair
        // over 1 ms), 920 rounded down to 64 bytes.
        for i in 1..=100 {
            p.read(start + ms(i), 1, 230, Some(ms(5)));
        }
        let at = tokio::time::Instant::from_std(start + ms(100));
        assert_eq!(
            p.plan(true, at),
            ReadPlan {
                low_water: 896,
                until: Some(at + ms(5 + 128)),
            }
        );
        assert_eq!(p.plan(true, at + ms(133)), at_once, "the bound passed");
        // With the window full nothing is read: nothing is waited for either.
        assert_eq!(p.plan(false, at), at_once);
        // 20 msg/s: a 125 ms pace.
        let mut p = Pace::default();
        for i in 1..=100 {
            p.read(start + ms(50 * i), 1, 230, Some(ms(125)));
        }
        let at = tokio::time::Instant::from_std(start + ms(5_000));
        assert_eq!(
            p.plan(true, at),
            ReadPlan {
                low_water: 448,
                until: Some(at + ms(125 + 128)),
            }
        );
        assert_eq!(p.plan(true, at + ms(253)), at_once, "the bound passed");
        assert_eq!(p.plan(false, at), at_once);
    }

    /// A socket whose low-water mark is a pace's bytes stays quiet while fewer have come and
    /// reports itself readable with the message that completes them; a read then takes all.
    #[tokio::test]
    async fn a_socket_reports_itself_once_a_paces_bytes_came() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut writer, mut reader, socket) = drained_pair().await;
        set_low_water(socket, 448);
        let message = [5u8; 230];
        writer.write_all(&message).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(200), reader.readable()).await;
        assert!(
            quiet.is_err(),
            "one message of a pace's two woke the reader"
        );
        writer.write_all(&message).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("the second message woke the reader")
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 460 {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf))
                .await
                .expect("the bytes read back")
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [message, message].concat());
    }

    /// Messages that arrive one per read, as a steady low-rate stream does, are read into
    /// the room their chunk has left, so all the messages waiting for a commit hold about
    /// their own size rather than a chunk each.
    #[test]
    fn messages_read_one_at_a_time_share_their_chunk() {
        let payload = [7u8; 200];
        let mut packet = BytesMut::new();
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            "devices/a/telemetry",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            payload.to_vec(),
        );
        p.pkid = 1;
        rumqttc::mqttbytes::v4::Packet::Publish(p)
            .write(&mut packet, usize::MAX)
            .unwrap();

        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let mut waiting = Vec::new();
        for _ in 0..250 {
            make_room(&mut rbuf);
            // What a read of one message does: it lands in the buffer's spare room.
            rbuf.extend_from_slice(&packet);
            match codec::decode(MqttProtocol::V311, &mut rbuf, 1 << 20).unwrap() {
                Some(Decoded::Publish { payload, .. }) => waiting.push(payload),
                other => panic!("not a publish: {other:?}"),
            }
        }
        assert!(waiting.iter().all(|p| p[..] == payload[..]));
        let chunks = 1 + waiting
            .windows(2)
            .filter(|w| w[1].as_ptr() != w[0].as_ptr().wrapping_add(packet.len()))
            .count();
        let held = 250 * packet.len();
        assert!(
            chunks <= held / (READ_CHUNK - READ_MIN) + 1,
            "250 waiting messages of {} bytes hold {chunks} chunks of {READ_CHUNK} bytes",
            packet.len()
        );
    }
}
