//! The spool: every received message becomes a committed record here before it is acked, and
//! leaves only when its destination accepted it.
//!
//! # Design
//! One OS thread owns the SQLite connection ([`store::Store`]) and serves [`Command`]s from its
//! own queue ([`queue`]). Each turn it takes everything queued (up to a bound), applies all
//! writes in one transaction, commits once at the configured sync level, and only then
//! releases the [`AfterCommit`]s: the MQTT acks and the source's flow-control permits. Appends
//! gather for `commit_interval` before their commit (group commit): under load thousands of
//! messages share one commit and one compressed block, which is what keeps disk writes below
//! the payload size. A slow, steady stream goes on gathering until its group is a few pages'
//! worth, the stream pauses, or `commit_max_wait` passed (see `Worker::gather_until`), so a
//! message a second does not cost a commit a second. A gathering spool is not woken for each
//! append: it takes them at its deadline (see [`queue`]).
//!
//! Records of one route in one commit are stored as one compressed block per bucket (a shard
//! of the route's destination, see [`placement`]), each record with its own key; a route whose
//! destination has no placement yet gets one block per partition key.
//! The shipper leases blocks (metadata only), reads their bodies when it builds a frame (from
//! then on they are in flight), and reports blocks as delivered when the destination accepted
//! the frame. A lease may ask for the group being gathered to commit first if the group
//! began by a given time (a slow stream's frame is due then, and takes every record read by
//! then); its answer waits for that commit.
//!
//! When the spool holds `max_bytes`, the full policy applies: `block` parks new appends until
//! space frees (their permits stay taken, so the source stops reading and nothing is acked);
//! `drop_oldest` evicts the oldest blocks that are not in flight and counts them (and, when
//! every block is in flight, the oldest of those; counted delivered after all if their
//! destination takes them). A disk that fills first is the same: the disk reserve
//! ([`reserve`]) goes back to the file system, the cap comes down to what the spool holds,
//! and the policy applies there until the disk has room again. A file found damaged while
//! running is rebuilt from what reads back ([`Store::rebuild`]).
//!
//! This module must never ack a message before its commit, never delete a block that its
//! destination has not accepted (except by the counted `drop_oldest` policy), and never hold
//! more than one group of messages in memory.

#[cfg(test)]
mod model;
pub(crate) mod placement;
mod queue;
mod reserve;
pub mod store;

use crate::config::{FullPolicy, SpoolConfig};
use bytes::Bytes;
use queue::{Empty, Receiver, Sender};
use reserve::Reserve;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::DeadLetterCap;
pub use store::{Accounting, BlockMeta, Counter, DropReason, SpoolError};
use store::{NewRecord, Store};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};

/// Most commands applied in one transaction.
const MAX_GROUP: usize = 8192;
/// Most payload bytes appended in one transaction (a single larger message goes alone):
/// bounds what one commit adds to the write-ahead log, which the disk reserve must cover.
const MAX_GROUP_BYTES: usize = 2 << 20;
/// Payload bytes past which a group commits once `commit_interval` has passed: a few pages'
/// worth, so a slow stream's commits are not mostly page overhead. A stream of 1.6 MB/s or
/// more fills it within the default interval, so busy streams commit every interval (a larger
/// target made them gather longer: 64 KiB raised the load program's half-load ack p99 to
/// about 40 ms).
const COMMIT_TARGET_BYTES: usize = 16 << 10;
/// A gap longer than this many mean gaps between appends ends a group's gathering.
const QUIET_GAPS: u32 = 4;
/// A slow stream's read pace in mean gaps between its messages (at least half the commit
/// interval, at most an eighth of `commit_max_wait`): a sparse stream (20 msg/s) is read a
/// few messages per wakeup too, instead of one wakeup of the intake and one of the spool's
/// thread per message. At 1,000 msg/s the intake reads every 64 ms: 16 gaps (every 16 ms)
/// took 13.7-14.2 us of CPU per message, 32 took 11.3-12.4, and a message's publish to
/// accepted p50 rose from 558-567 ms to 589-597 (shapes program, `MQTT 3.1.1 device key,
/// 100 devices, 1000 msg/s`, with the gap measured over windows, `Worker::paced`); 64 took
/// 9.1-10.6 against 12.2-13.7 for 32 and p50 627-664 ms against 588-599 (the three 1,000
/// msg/s shapes, two runs each, same hour). A read then brings about as much as the commit
/// target, so commits come unevenly, which the shipper's cadence allows for (see
/// `ship::state::cadence`). A group's commit still waits at most for the commit target, a
/// pause of four paces (256 ms at 1,000 msg/s) or `commit_max_wait`.
const PACE_GAPS: u32 = 64;
/// The mean gap between appends is measured over windows this long, or of this many
/// appends if they come sooner (a busy stream's pace is learned within milliseconds), see
/// `Worker::paced`.
const GAP_WINDOW: Duration = Duration::from_millis(100);
const GAP_WINDOW_APPENDS: u32 = 256;
/// Largest uncompressed block; far below any destination's record limit, so one block always
/// fits in one frame.
pub(crate) const BLOCK_RAW_MAX: usize = 256 << 10;

/// Whether `bytes` of appends sent over `span` came slower than a busy stream's, which fills
/// [`COMMIT_TARGET_BYTES`] within a commit `interval`. Judged by the appends' send times, not
/// by how long the spool's thread gathered them: while it waits on a turn of deliveries
/// alone (for a steady stream's appends to share their commit), the appends, sent quietly,
/// queue unseen, and taken at the wait's end a whole pace's worth of them make one group. At
/// 20 msg/s with `max_linger = "60s"` (a read pace of 1.25 s, a wait of up to 5 s) that was
/// 100 messages, 17.7 KB, after each frame's delivery; judged by the gathering (before
/// 2026-12-07 evening), the stream counted busy, lost its pace and its reads went one message
/// per wakeup for the 3-4 s until a group gathered again: 22.5-26.1 us of CPU per message
/// over 180 s instead of 18.2-18.9 (benches/MEASURED.md).
fn slower_than_busy(bytes: usize, span: Duration, interval: Duration) -> bool {
    (bytes as u128) * interval.as_nanos() < (COMMIT_TARGET_BYTES as u128) * span.as_nanos()
}

/// What the source needs back to ack one MQTT message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckToken {
    pub(crate) qos: u8,
    pub(crate) pkid: u16,
    /// The session the message came in on: an ack is written only on that session (a
    /// packet id of a fresh session names another message).
    pub(crate) session: u64,
    /// When the message was read from the connection, for the ack-latency histogram.
    pub(crate) received: std::time::Instant,
}

/// Released only after the message's outcome is committed.
#[derive(Default)]
pub(crate) struct AfterCommit {
    /// The ack and where it goes: a source gets a commit's acks in one send.
    pub(crate) ack: Option<(mpsc::UnboundedSender<Vec<AckToken>>, AckToken)>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

impl AfterCommit {
    /// Releases a commit's messages. Each source gets their acks in one send: a send wakes
    /// the source's task, and sent one by one they woke it several times a commit (the task
    /// took the first few while the spool thread sent the rest).
    fn release_all(all: impl IntoIterator<Item = AfterCommit>) {
        let mut acks: Vec<(mpsc::UnboundedSender<Vec<AckToken>>, Vec<AckToken>)> = Vec::new();
        for after in all {
            if let Some((tx, token)) = after.ack {
                match acks.iter_mut().find(|(to, _)| to.same_channel(&tx)) {
                    Some((_, tokens)) => tokens.push(token),
                    None => acks.push((tx, vec![token])),
                }
            }
            // The source may read one more message.
            drop(after.permit);
        }
        for (tx, tokens) in acks {
            // The source may have shut down; its broker session redelivers what was not acked.
            let _ = tx.send(tokens);
        }
    }
}

/// What becomes of a received message.
#[derive(Debug, Clone)]
pub enum Disposition {
    /// Spool it as a record of `route`, partitioned by `key`.
    Record { route: Arc<str>, key: String },
    /// Keep it in the dead-letter table and count it as dropped for `reason`.
    DeadLetter { route: Arc<str>, reason: DropReason },
    /// Count it as dropped for `reason`; nothing is stored.
    Dropped { route: Arc<str>, reason: DropReason },
}

pub(crate) struct Incoming {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) ts_ms: u64,
    pub(crate) disposition: Disposition,
    pub(crate) after_commit: AfterCommit,
    /// A QoS 2 message's packet id, remembered in the same transaction.
    pub(crate) receipt: Option<Receipt>,
}

/// A QoS 2 message's packet id on its broker's session, and the connection it came on.
#[derive(Debug, Clone)]
pub(crate) struct Receipt {
    pub(crate) broker: Arc<str>,
    pub(crate) pkid: u16,
    pub(crate) generation: u64,
}

/// A change to a broker's QoS 2 receipts besides a new one.
#[derive(Debug, Clone)]
enum ReceiptChange {
    /// Its PUBREL came.
    Released { broker: Arc<str>, pkid: u16 },
    /// The broker kept no session at the connection of this generation: every receipt
    /// goes, and those of messages from earlier connections still to commit are not made.
    Cleared { broker: Arc<str>, generation: u64 },
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// The spool settings that may change while it runs (not its file or sync level).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SpoolLimits {
    pub(crate) max_bytes: u64,
    pub(crate) full_policy: FullPolicy,
    pub(crate) max_dead_letters: u64,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_max_wait: Duration,
}

impl SpoolLimits {
    pub(crate) fn of(config: &SpoolConfig) -> SpoolLimits {
        SpoolLimits {
            max_bytes: config.max_bytes,
            full_policy: config.full_policy,
            max_dead_letters: config.max_dead_letters,
            commit_interval: config.commit_interval,
            commit_max_wait: config.commit_max_wait,
        }
    }
}

enum Command {
    /// A message, sent at `at`.
    Append {
        incoming: Incoming,
        at: std::time::Instant,
    },
    Receipts(ReceiptChange),
    LoadReceipts {
        broker: String,
        reply: Reply<Vec<u16>>,
    },
    Lease {
        dest: Arc<str>,
        routes: Arc<[String]>,
        after: i64,
        limit: usize,
        /// Commit the appends being gathered first if the first of them was sent by then,
        /// and list after that commit.
        commit_before: Option<std::time::Instant>,
        reply: Reply<Vec<BlockMeta>>,
    },
    Read {
        dest: Arc<str>,
        ids: Vec<i64>,
        reply: Reply<Vec<(BlockMeta, Vec<u8>)>>,
    },
    Delivered {
        dest: Arc<str>,
        ids: Vec<i64>,
    },
    Release {
        dest: Arc<str>,
        ids: Vec<i64>,
    },
    /// Replace a block by two halves (it encodes larger than its destination takes).
    Split {
        dest: Arc<str>,
        id: i64,
        reply: Reply<Vec<BlockMeta>>,
    },
    /// A one-record block the destination cannot take: dropped for it (and to the dead
    /// letters when no other destination owes it).
    Unshippable {
        dest: Arc<str>,
        id: i64,
        reply: Reply<Option<(String, u32)>>,
    },
    /// The object `dest` was uploading when it stopped (read at its start).
    LoadUpload {
        dest: Arc<str>,
        reply: Reply<Option<store::Upload>>,
    },
    /// A change to `dest`'s object in upload, committed before the reply.
    ChangeUpload {
        dest: Arc<str>,
        change: store::UploadChange,
        reply: Reply<()>,
    },
    /// `dest`'s object is uploaded: its row goes in the transaction that records the
    /// deliveries sent before this.
    EndUpload {
        dest: Arc<str>,
    },
    /// The accounting as committed (unit tests: the agent reads committed figures).
    #[cfg(test)]
    Accounting {
        reply: Reply<Accounting>,
    },
    /// Makes the database "full" at this many pages (SQLITE_FULL, as a full disk gives).
    #[cfg(test)]
    LimitPages(u32),
    /// New limits from a config change; appends waiting for space are retried against them.
    Limits(SpoolLimits),
    /// Where each route's records go now (route -> destinations, format), recorded in the
    /// file so records of a route a later config removes still find their destinations.
    Routes(BTreeMap<String, (Vec<String>, String)>),
    /// Commit what is queued and stop; parked appends stay unacked (the broker redelivers).
    Close,
    /// A source can take no more until this turn's appends commit (its window is full):
    /// commit now instead of gathering until the commit interval has passed.
    Flush,
}

/// Live figures, updated after every commit; cheap to read from any thread.
#[derive(Debug, Default)]
pub(crate) struct SpoolStats {
    /// Where each route's records go as blocks; set by the shippers.
    pub(crate) placements: placement::Placements,
    pub(crate) received: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) pending_records: AtomicU64,
    pub(crate) pending_bytes: AtomicU64,
    /// Uncompressed bytes of records appended, and what they took in the spool.
    pub(crate) appended_raw_bytes: AtomicU64,
    pub(crate) appended_stored_bytes: AtomicU64,
    pub(crate) commits: AtomicU64,
    /// Leases asked for by shippers: each wakes the spool thread and the shipper.
    pub(crate) leases: AtomicU64,
    /// Transactions that failed (disk full, I/O error) and were retried.
    pub(crate) commit_failures: AtomicU64,
    /// How long each commit took (the fsync, at sync levels that sync).
    pub(crate) commit_latency: crate::metrics::Histogram,
    /// False from a failed commit until the next one succeeds.
    pub(crate) writable: AtomicBool,
    /// True while appends are parked because the spool is full (policy `block`).
    pub(crate) full: AtomicBool,
    /// The last group of appends committed short of the commit target after gathering, or
    /// reached it only by waiting for messages past the commit interval: the stream is slow
    /// and steady, and this is the pace the intake may read it at in microseconds (0
    /// otherwise; see `Worker::read_pace`). The intake then asks its socket for quick TCP
    /// acks (see `source::mqtt`), so the broker's small packets are not held back into
    /// bursts whose gaps would look like pauses and end the gathering, and paces its reads
    /// by it (see `SpoolHandle::read_pace`).
    pub(crate) read_pace_us: AtomicU64,
    /// The bytes the spool may hold since the disk filled before `max_bytes`; 0 while
    /// `max_bytes` applies.
    pub(crate) room_cap: AtomicU64,
    /// Times the spool file was found damaged while the agent ran and rebuilt.
    pub(crate) rebuilds: AtomicU64,
    /// Per-route counters and pending figures as of the last commit.
    pub(crate) committed: Arc<std::sync::Mutex<store::Committed>>,
    /// Set when the spool thread has ended (closed, or died).
    pub(crate) stopped: AtomicBool,
}

/// Marks the spool stopped when the thread ends, however it ends.
struct StoppedOnDrop(Arc<SpoolStats>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Relaxed);
    }
}

impl SpoolStats {
    /// A copy of the committed figures (a few small maps).
    pub(crate) fn committed(&self) -> store::Committed {
        self.committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A cheap, clonable handle to the spool thread.
#[derive(Clone)]
pub(crate) struct SpoolHandle {
    tx: Sender<Command>,
    stats: Arc<SpoolStats>,
    committed: watch::Receiver<Commits>,
}

/// What the spool publishes after each commit that added blocks: how many such commits so
/// far and when the last one was made, so a shipper that looks only now and then still
/// learns the stream's cadence.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Commits {
    pub(crate) count: u64,
    pub(crate) last: std::time::Instant,
}

fn closed<T>(_: T) -> SpoolError {
    SpoolError::Stopped
}

impl SpoolHandle {
    /// The placements commits group records by: shippers set their routes'.
    pub(crate) fn placements(&self) -> &placement::Placements {
        &self.stats.placements
    }

    /// Leases asked for so far.
    #[cfg(test)]
    pub(crate) fn leases(&self) -> u64 {
        self.stats.leases.load(Ordering::Relaxed)
    }

    /// Whether the stream is slow and steady (see `SpoolStats::read_pace_us`).
    pub(crate) fn slow_stream(&self) -> bool {
        self.read_pace().is_some()
    }

    /// While the stream is slow (see [`SpoolHandle::slow_stream`]): how long the intake may
    /// wait between reads, gathering several messages per wakeup, without the gap ending the
    /// spool's gathering (a few of the stream's mean gaps, at least half the commit interval;
    /// the spool judges pauses against it).
    pub(crate) fn read_pace(&self) -> Option<Duration> {
        match self.stats.read_pace_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Queues a message; its `after_commit` fires once it is durable. Never blocks.
    pub(crate) fn append(&self, incoming: Incoming) -> Result<(), SpoolError> {
        let at = std::time::Instant::now();
        // Quiet: a gathering spool takes it at its deadline (see `queue`).
        self.tx
            .send_quiet(Command::Append { incoming, at })
            .map_err(closed)
    }

    /// The QoS 2 packet ids of `broker` spooled before and not released (read at start).
    pub(crate) async fn qos2_receipts(&self, broker: &str) -> Result<Vec<u16>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::LoadReceipts {
                broker: broker.to_string(),
                reply,
            })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// A QoS 2 message's PUBREL came: its packet id may name a new message now.
    pub(crate) fn qos2_released(&self, broker: Arc<str>, pkid: u16) -> Result<(), SpoolError> {
        self.tx
            .send(Command::Receipts(ReceiptChange::Released { broker, pkid }))
            .map_err(closed)
    }

    /// The broker kept no session at the connection of `generation`.
    pub(crate) fn qos2_cleared(&self, broker: Arc<str>, generation: u64) -> Result<(), SpoolError> {
        self.tx
            .send(Command::Receipts(ReceiptChange::Cleared {
                broker,
                generation,
            }))
            .map_err(closed)
    }

    /// Commit what is queued without waiting out the commit interval: the caller's window of
    /// unacknowledged messages is full, so nothing more will come until these commit.
    pub(crate) fn flush(&self) -> Result<(), SpoolError> {
        self.tx.send(Command::Flush).map_err(closed)
    }

    /// Up to `limit` blocks of `routes` with ids above `after` that destination `dest` owes,
    /// oldest first (metadata only).
    pub(crate) async fn lease(
        &self,
        dest: Arc<str>,
        routes: Arc<[String]>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        self.lease_with(dest, routes, after, limit, None).await
    }

    /// [`SpoolHandle::lease`], after committing the appends the spool is gathering (a slow
    /// stream's) if the first of them was sent by `due`: a frame due then takes every record
    /// read by then. A group begun later is left gathering (its records start the next
    /// frame anyway; committed now they would be a second, small block). The reply waits
    /// for the commit.
    pub(crate) async fn lease_after_commit(
        &self,
        dest: Arc<str>,
        routes: Arc<[String]>,
        after: i64,
        limit: usize,
        due: std::time::Instant,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        self.lease_with(dest, routes, after, limit, Some(due)).await
    }

    async fn lease_with(
        &self,
        dest: Arc<str>,
        routes: Arc<[String]>,
        after: i64,
        limit: usize,
        commit_before: Option<std::time::Instant>,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Lease {
                dest,
                routes,
                after,
                limit,
                commit_before,
                reply,
            })
            .map_err(closed)?;
        self.stats.leases.fetch_add(1, Ordering::Relaxed);
        rx.await.map_err(closed)?
    }

    /// The uncompressed bodies of these blocks, in the order asked, now in flight (safe from
    /// `drop_oldest`) until delivered or released; a block that is gone (evicted, or
    /// quarantined as corrupt) is left out.
    pub(crate) async fn read(
        &self,
        dest: Arc<str>,
        ids: Vec<i64>,
    ) -> Result<Vec<(BlockMeta, Vec<u8>)>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Read { dest, ids, reply })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// Destination `dest` accepted these blocks: counted delivered for it; each leaves the
    /// spool when no other destination owes it.
    pub(crate) fn delivered(&self, dest: Arc<str>, ids: Vec<i64>) -> Result<(), SpoolError> {
        self.tx
            .send(Command::Delivered { dest, ids })
            .map_err(closed)
    }

    /// Replaces a block that encodes larger than `dest` takes by two of half its records
    /// each (same sequence numbers); returns them, to be planned instead.
    pub(crate) async fn split(
        &self,
        dest: Arc<str>,
        id: i64,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Split { dest, id, reply })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// A one-record block `dest` cannot take: counted dropped `unshippable` for it, and moved
    /// to the dead letters when no other destination owes it; returns its route and records
    /// (`None` if it is gone).
    pub(crate) async fn unshippable(
        &self,
        dest: Arc<str>,
        id: i64,
    ) -> Result<Option<(String, u32)>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Unshippable { dest, id, reply })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// The object `dest` (an object destination) was uploading when it last stopped.
    pub(crate) async fn upload_of(
        &self,
        dest: Arc<str>,
    ) -> Result<Option<store::Upload>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::LoadUpload { dest, reply })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// Changes `dest`'s object in upload; durable when this returns.
    pub(crate) async fn change_upload(
        &self,
        dest: Arc<str>,
        change: store::UploadChange,
    ) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::ChangeUpload {
                dest,
                change,
                reply,
            })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// `dest`'s object is uploaded; send after [`SpoolHandle::delivered`] of its blocks: its
    /// row leaves in the transaction that records them.
    pub(crate) fn end_upload(&self, dest: Arc<str>) -> Result<(), SpoolError> {
        self.tx.send(Command::EndUpload { dest }).map_err(closed)
    }

    /// These blocks will not be shipped by `dest`'s shipper after all (it is stopping).
    pub(crate) fn release(&self, dest: Arc<str>, ids: Vec<i64>) -> Result<(), SpoolError> {
        self.tx.send(Command::Release { dest, ids }).map_err(closed)
    }

    #[cfg(test)]
    pub(crate) fn limit_pages(&self, pages: u32) {
        self.tx.send(Command::LimitPages(pages)).unwrap();
    }

    #[cfg(test)]
    pub(crate) async fn accounting(&self) -> Result<Accounting, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Accounting { reply })
            .map_err(closed)?;
        rx.await.map_err(closed)?
    }

    /// Asks the spool thread to commit what is queued and stop. Handles still held elsewhere
    /// get "spool stopped" errors from then on.
    /// Applies new limits from the next turn on.
    pub(crate) fn set_limits(&self, limits: SpoolLimits) -> Result<(), SpoolError> {
        self.tx.send(Command::Limits(limits)).map_err(closed)
    }

    /// Records where each route's records go (route -> destinations, frame format).
    pub(crate) fn set_routes(
        &self,
        routes: BTreeMap<String, (Vec<String>, String)>,
    ) -> Result<(), SpoolError> {
        self.tx.send(Command::Routes(routes)).map_err(closed)
    }

    pub(crate) fn close(&self) {
        let _ = self.tx.send(Command::Close);
    }

    pub(crate) fn stats(&self) -> &Arc<SpoolStats> {
        &self.stats
    }

    /// Changes after every commit that added blocks.
    pub(crate) fn commits(&self) -> watch::Receiver<Commits> {
        self.committed.clone()
    }
}

/// Opens the spool and starts its thread. The thread ends after [`SpoolHandle::close`] or when
/// every handle is dropped, after a final commit, returning the accounting as committed.
pub(crate) fn start(
    config: &SpoolConfig,
) -> Result<
    (
        SpoolHandle,
        std::thread::JoinHandle<Result<Accounting, SpoolError>>,
    ),
    SpoolError,
> {
    let (store, report) = Store::open(&config.path, config.sync)?;
    report_open(&config.path, &report);
    let acc = store.accounting()?;
    if !acc.balances() {
        tracing::warn!(?acc, "spool accounting does not balance at open");
    }
    let stats = Arc::new(SpoolStats {
        committed: store.committed(),
        writable: AtomicBool::new(true),
        ..SpoolStats::default()
    });
    stats.received.store(acc.received, Ordering::Relaxed);
    stats.delivered.store(acc.delivered, Ordering::Relaxed);
    stats.dropped.store(acc.dropped, Ordering::Relaxed);
    stats.pending_records.store(acc.pending, Ordering::Relaxed);
    stats
        .pending_bytes
        .store(acc.pending_bytes, Ordering::Relaxed);
    let (tx, rx) = queue::queue();
    let (commit_tx, committed) = watch::channel(Commits {
        count: 0,
        last: std::time::Instant::now(),
    });
    let worker = Worker {
        store,
        rx,
        stats: stats.clone(),
        commit_tx,
        max_bytes: config.max_bytes,
        policy: config.full_policy,
        max_dead_letters: config.max_dead_letters,
        commit_interval: config.commit_interval,
        commit_max_wait: config.commit_max_wait,
        last_append: std::time::Instant::now(),
        append_gap: Duration::ZERO,
        window_start: None,
        window_appends: 0,
        in_flight: InFlight::default(),
        parked: VecDeque::new(),
        retry_deliveries: Vec::new(),
        body: Vec::new(),
        routes: None,
        group_limit: MAX_GROUP,
        failed_appends: 0,
        reserve: Reserve::open(&config.path),
        room_cap: None,
        room_checked: std::time::Instant::now(),
        failed_commits: 0,
        receipt_changes: Vec::new(),
        ended_uploads: Vec::new(),
        receipts_from: HashMap::new(),
        phases: TurnPhases::default(),
        slow_turns: SlowTurns {
            since_log: 0,
            logged: None,
        },
        evicted_sending: BTreeMap::new(),
    };
    let thread = std::thread::Builder::new()
        .name("spool".into())
        .spawn(move || {
            let _mark = StoppedOnDrop(worker.stats.clone());
            worker.run()
        })
        .expect("spawning the spool thread");
    Ok((
        SpoolHandle {
            tx,
            stats,
            committed,
        },
        thread,
    ))
}

/// Logs what opening or rebuilding the spool found.
fn report_open(path: &std::path::Path, report: &store::OpenReport) {
    if report.check_unfinished {
        tracing::warn!(spool = %path.display(), limit = ?store::QUICK_CHECK_LIMIT, "the spool's integrity check did not finish in time and was left; damage is still found when it is read");
    }
    if !report.damage.is_empty() {
        tracing::error!(spool = %path.display(), findings = ?report.damage, "the spool file is damaged (PRAGMA quick_check)");
    }
    if let Some(from) = report.converted_from_page_size {
        tracing::info!(spool = %path.display(), from, to = store::PAGE_SIZE, "rewrote the spool file with smaller pages (fewer bytes written per commit)");
    }
    if let Some((size, why)) = &report.kept_page_size {
        tracing::info!(spool = %path.display(), page_size = size, wanted = store::PAGE_SIZE, reason = %why, "the spool file keeps its page size");
    }
    if let Some(aside) = &report.quarantined_file {
        match report.lost_records {
            Some(n) => tracing::error!(lost_records = n, "the corrupt spool's counters were read: its accounting goes on, the {n} records that could not be read back are counted as dropped (corrupt)"),
            None => tracing::error!("the corrupt spool's counters could not be read: how many records it held is unknown"),
        }
        tracing::error!(
            spool = %path.display(),
            moved_to = %aside.display(),
            salvaged_blocks = report.salvaged_blocks,
            salvaged_records = report.salvaged_records,
            "spool file was corrupt; moved it aside and started a new spool with the {} records that read back (no record is counted as delivered that was not)", report.salvaged_records
        );
    }
}

struct Worker {
    store: Store,
    rx: Receiver<Command>,
    stats: Arc<SpoolStats>,
    commit_tx: watch::Sender<Commits>,
    max_bytes: u64,
    policy: FullPolicy,
    max_dead_letters: u64,
    /// How long appends gather at least before a commit (see `SpoolConfig::commit_interval`).
    commit_interval: Duration,
    /// How long a slow, steady stream's appends may gather (`SpoolConfig::commit_max_wait`).
    commit_max_wait: Duration,
    /// When the last append came, and the mean gap between appends (a moving average over
    /// windows, see `Worker::paced`, each window's gap counted at most `commit_max_wait`):
    /// what "their usual pace" is.
    last_append: std::time::Instant,
    append_gap: Duration,
    /// Where the window the mean gap is being measured over began (none before the first
    /// append), and the appends since.
    window_start: Option<std::time::Instant>,
    window_appends: u32,
    /// Blocks whose bodies a shipper has read (they are in frames being sent) and that are
    /// not yet delivered or released: `drop_oldest` never evicts these. Blocks only planned
    /// (leased metadata) may be evicted; the shipper skips them when it reads.
    in_flight: InFlight,
    /// Appends waiting for space (policy `block`) or for a failed commit to be retried, in
    /// arrival order. Bounded by the sources' permits.
    parked: VecDeque<Incoming>,
    /// Deliveries whose commit failed, retried with the next transaction.
    retry_deliveries: Vec<(Arc<str>, i64)>,
    /// Reused encoding buffer.
    body: Vec<u8>,
    /// Where routes' records go, to record in the next transaction.
    routes: Option<BTreeMap<String, (Vec<String>, String)>>,
    /// Most appends in one transaction: a quarter of the failed one's after a full disk,
    /// doubled back after each commit that fits.
    group_limit: usize,
    /// Appends the last failed transaction carried.
    failed_appends: usize,
    /// Space given back to the file system when the disk fills (see [`reserve`]).
    reserve: Reserve,
    /// After the disk filled before `max_bytes`: the bytes the spool may hold instead, lowered
    /// by an eighth at each full-disk failure, until the reserve can be made again.
    room_cap: Option<u64>,
    /// When the disk was last checked for the room to leave that state.
    room_checked: std::time::Instant,
    /// Blocks `drop_oldest` evicted while a shipper was sending them: if a destination that
    /// owed one accepts it after all, it is counted delivered for that destination, not
    /// dropped (and for the route, once all that owed it did). The newest
    /// [`MAX_EVICTED_SENDING`] are remembered.
    evicted_sending: BTreeMap<i64, EvictedSending>,
    /// Commits failed in a row for other reasons than a full disk: at
    /// [`CHECK_AFTER_FAILURES`] the file is checked, and rebuilt if damaged.
    failed_commits: u32,
    /// QoS 2 receipt changes for the next transaction, in arrival order.
    receipt_changes: Vec<ReceiptChange>,
    /// Object destinations whose object is uploaded: their upload rows go in the next
    /// transaction, after its deliveries.
    ended_uploads: Vec<Arc<str>>,
    /// Per broker, the generation of its last connection without a session: receipts of
    /// messages from earlier connections are not written.
    receipts_from: HashMap<Arc<str>, u64>,
    /// Where the current turn's time went.
    phases: TurnPhases,
    /// Turns that worked longer than [`SLOW_TURN`], for the rate-limited warning.
    slow_turns: SlowTurns,
}

/// A turn whose work (not its gathering) takes longer than this is logged with its phases:
/// every message of the group waits that long for its ack.
const SLOW_TURN: Duration = Duration::from_millis(500);

/// Time one turn spent in each kind of work, gathering waits excluded.
#[derive(Debug, Default, Clone, Copy)]
struct TurnPhases {
    lease: Duration,
    read: Duration,
    other: Duration,
    deliver: Duration,
    write: Duration,
    commit: Duration,
}

impl TurnPhases {
    fn worked(&self) -> Duration {
        self.lease + self.read + self.other + self.deliver + self.write + self.commit
    }
}

/// Slow turns since the last warning; warnings at most every [`SLOW_TURN_LOG_EVERY`].
#[derive(Debug)]
struct SlowTurns {
    since_log: u64,
    logged: Option<std::time::Instant>,
}

const SLOW_TURN_LOG_EVERY: Duration = Duration::from_secs(10);

impl SlowTurns {
    /// Notes a finished turn; warns about a slow one unless a warning went out recently.
    fn finished(&mut self, p: &TurnPhases, commands: usize, deliveries: usize) {
        let worked = p.worked();
        if worked < SLOW_TURN {
            return;
        }
        self.since_log += 1;
        let now = std::time::Instant::now();
        if self
            .logged
            .is_some_and(|t| now.duration_since(t) < SLOW_TURN_LOG_EVERY)
        {
            return;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::warn!(
            worked_ms = ms(worked),
            lease_ms = ms(p.lease),
            read_ms = ms(p.read),
            deliver_ms = ms(p.deliver),
            write_ms = ms(p.write),
            commit_ms = ms(p.commit),
            other_ms = ms(p.other),
            commands,
            deliveries,
            slow_turns = self.since_log,
            "a spool turn was slow: its messages waited that long for their acks (is the disk busy?)"
        );
        self.since_log = 0;
        self.logged = Some(now);
    }
}

/// Blocks evicted while being sent that are remembered, to count them delivered should
/// their destination take them after all.
const MAX_EVICTED_SENDING: usize = 4096;

/// Failed commits in a row (I/O errors) after which the spool file is checked for damage.
const CHECK_AFTER_FAILURES: u32 = 5;

/// Which destinations have read each block and not finished with it.
#[derive(Debug, Default)]
struct InFlight(HashMap<i64, Vec<Arc<str>>>);

impl InFlight {
    fn insert(&mut self, id: i64, dest: &Arc<str>) {
        let dests = self.0.entry(id).or_default();
        if !dests.contains(dest) {
            dests.push(dest.clone());
        }
    }

    fn remove(&mut self, id: i64, dest: &str) {
        if let Some(dests) = self.0.get_mut(&id) {
            dests.retain(|d| &**d != dest);
            if dests.is_empty() {
                self.0.remove(&id);
            }
        }
    }

    fn contains(&self, id: i64) -> bool {
        self.0.contains_key(&id)
    }
}

/// A block evicted while it was being sent (see `Worker::evicted_sending`).
#[derive(Debug, Clone)]
struct EvictedSending {
    route: String,
    records: u32,
    /// The destinations that owed it and may still accept it; empty for a route whose
    /// destinations were never recorded (any delivery counts).
    owing: Vec<String>,
    /// Every destination that owed it accepted it so far.
    all_accepted: bool,
}

/// What one transaction did, applied to the live stats only after it commits.
#[derive(Default)]
struct TxEffects {
    received: u64,
    delivered: u64,
    dropped: u64,
    /// Records dropped before, now counted delivered (see `Worker::evicted_sending`).
    undropped: u64,
    /// Blocks evicted while being sent.
    evicted_sending: Vec<(i64, EvictedSending)>,
    /// Such blocks a destination accepted in this transaction: (id, destination).
    recounted: Vec<(i64, Arc<str>)>,
    /// Appends were left parked for want of room (not for the size of the group).
    waiting_for_room: bool,
    raw_bytes: u64,
    stored_bytes: u64,
    blocks_added: bool,
}

impl Worker {
    fn run(mut self) -> Result<Accounting, SpoolError> {
        let mut backoff = Duration::from_millis(50);
        let mut closing = false;
        while !closing {
            // Sized for a commit's usual group, so it does not grow a message at a time.
            let mut appends: Vec<Incoming> = Vec::with_capacity(256);
            let mut deliveries = std::mem::take(&mut self.retry_deliveries);
            // Blocks reported delivered but not yet deleted (that happens at this turn's
            // commit): never listed or read again, or a shipper started meanwhile (a config
            // change) would send them a second time.
            let mut delivering: HashSet<(i64, Arc<str>)> =
                deliveries.iter().map(|(d, id)| (*id, d.clone())).collect();
            // Parked appends that only a delivery, a drop or new limits can make room for:
            // nothing to retry until a command comes (a blocked spool writes nothing).
            let waiting_for_room = !self.parked.is_empty()
                && self.stats.writable.load(Ordering::Relaxed)
                && self.stats.full.load(Ordering::Relaxed);
            // Wait for work; with parked appends after a failed commit, wake periodically to
            // retry them.
            let first = if closing {
                None
            } else if (self.parked.is_empty() || waiting_for_room)
                && deliveries.is_empty()
                && self.room_cap.is_none()
            {
                match self.rx.recv(None) {
                    Ok(c) => Some(c),
                    Err(_) => {
                        closing = true;
                        None
                    }
                }
            } else {
                // After a full disk, wake at least once a second to look for room.
                // Appends left over from a full group go in the next turn, at once; after
                // a failed commit the backoff has already passed.
                let wake = if self.parked.is_empty() || waiting_for_room {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                };
                match self.rx.recv(Some(std::time::Instant::now() + wake)) {
                    Ok(c) => Some(c),
                    Err(Empty::Timeout) => None,
                    Err(Empty::Disconnected) => {
                        closing = true;
                        None
                    }
                }
            };
            let turn_started = std::time::Instant::now();
            self.phases = TurnPhases::default();
            let limits_before = (self.cap(), self.policy);
            let mut next = first;
            let mut taken = 0;
            let mut flush = false;
            let mut group_bytes = 0usize;
            // When this turn's first append was sent.
            let mut first_append = None;
            #[cfg(test)]
            let mut accounting_replies: Vec<Reply<Accounting>> = Vec::new();
            let mut receipt_replies: Vec<(String, Reply<Vec<u16>>)> = Vec::new();
            // Leases answered after this turn's commit.
            let mut leases_after_commit = Vec::new();
            while let Some(cmd) = next.take() {
                taken += 1;
                match cmd {
                    Command::Append { incoming: i, at } => {
                        self.paced(at);
                        first_append.get_or_insert(at);
                        group_bytes += i.payload.len();
                        appends.push(i);
                    }
                    Command::Receipts(change) => {
                        if let ReceiptChange::Cleared { broker, generation } = &change {
                            self.receipts_from.insert(broker.clone(), *generation);
                        }
                        self.receipt_changes.push(change);
                    }
                    // Answered after this turn's writes, so it sees the changes sent before it.
                    Command::LoadReceipts { broker, reply } => {
                        receipt_replies.push((broker, reply))
                    }
                    Command::Delivered { dest, ids } => {
                        delivering.extend(ids.iter().map(|id| (*id, dest.clone())));
                        deliveries.extend(ids.into_iter().map(|id| (dest.clone(), id)));
                    }
                    Command::Release { dest, ids } => {
                        for id in ids {
                            self.in_flight.remove(id, &dest);
                            self.forget_evicted(id, &dest, false);
                        }
                    }
                    // Appends sent before the lease were taken before it (one queue).
                    Command::Lease {
                        dest,
                        routes,
                        after,
                        limit,
                        commit_before: Some(due),
                        reply,
                    } if first_append.is_some_and(|first| first <= due) => {
                        flush = true;
                        leases_after_commit.push((dest, routes, after, limit, reply));
                    }
                    Command::Lease {
                        dest,
                        routes,
                        after,
                        limit,
                        reply,
                        ..
                    } => {
                        let r = self.list_blocks(&dest, after, &routes, limit, &delivering);
                        let _ = reply.send(r);
                    }
                    Command::Read {
                        dest,
                        mut ids,
                        reply,
                    } => {
                        let t = std::time::Instant::now();
                        ids.retain(|id| !delivering.contains(&(*id, dest.clone())));
                        let r = self.read_blocks(&dest, &ids);
                        self.phases.read += t.elapsed();
                        let _ = reply.send(r);
                    }
                    // Rare: their own transactions, at once.
                    Command::Split { dest, id, reply } => {
                        let t = std::time::Instant::now();
                        self.in_flight.remove(id, &dest);
                        let _ = reply.send(self.store.split_block(id, &mut self.body));
                        self.publish_totals();
                        self.phases.other += t.elapsed();
                    }
                    Command::Unshippable { dest, id, reply } => {
                        let t = std::time::Instant::now();
                        self.in_flight.remove(id, &dest);
                        let r = self
                            .store
                            .dead_letter_block(&dest, id, self.dead_letter_cap());
                        if let Ok(Some(settled)) = &r {
                            if let Some(store::Counter::Dropped(_)) = settled.left {
                                self.stats
                                    .dropped
                                    .fetch_add(u64::from(settled.records), Ordering::Relaxed);
                            }
                        }
                        let r = r.map(|s| s.map(|s| (s.route, s.records)));
                        let _ = reply.send(r);
                        self.publish_totals();
                        self.phases.other += t.elapsed();
                    }
                    Command::LoadUpload { dest, reply } => {
                        let _ = reply.send(self.store.upload_of(&dest));
                    }
                    // Its own small transaction, at once (no transaction is open while
                    // commands are gathered).
                    Command::ChangeUpload {
                        dest,
                        change,
                        reply,
                    } => {
                        let _ = reply.send(self.store.change_upload(&dest, &change));
                    }
                    Command::EndUpload { dest } => self.ended_uploads.push(dest),
                    // Answered after this turn's writes, so it sees the commands sent before it.
                    #[cfg(test)]
                    Command::Accounting { reply } => accounting_replies.push(reply),
                    #[cfg(test)]
                    Command::LimitPages(pages) => self.store.limit_pages(pages),
                    Command::Limits(l) => {
                        tracing::info!(max_bytes = l.max_bytes, policy = ?l.full_policy, "spool limits changed");
                        self.max_bytes = l.max_bytes;
                        self.policy = l.full_policy;
                        self.max_dead_letters = l.max_dead_letters;
                        self.commit_interval = l.commit_interval;
                        self.commit_max_wait = l.commit_max_wait;
                    }
                    Command::Routes(r) => self.routes = Some(r),
                    Command::Close => closing = true,
                    Command::Flush => flush = true,
                }
                if taken < MAX_GROUP && !closing {
                    next = self.rx.try_recv();
                    // Group commit (see `gather_until`).
                    while next.is_none() && !flush {
                        let Some(until) = self
                            .gather_until(
                                turn_started,
                                first_append,
                                appends.len(),
                                group_bytes,
                                !deliveries.is_empty(),
                            )
                            .filter(|u| *u > std::time::Instant::now())
                        else {
                            break;
                        };
                        self.pace_while_gathering(first_append, group_bytes);
                        // Appends come in quietly: taken at the deadline, not one wakeup each.
                        match self.rx.wait_until(until) {
                            Ok(c) => next = Some(c),
                            // The deadline passed: ask again (the interval's end may be
                            // followed by more gathering).
                            Err(Empty::Timeout) => {}
                            Err(Empty::Disconnected) => break,
                        }
                    }
                }
            }
            self.look_for_room();
            if !appends.is_empty() {
                // Slow: the group stayed short of the target, or its messages came slower
                // than a busy stream's, which fills the target within the interval (one that
                // fills it only by gathering is still slow, and calling it otherwise would
                // stop the pacing and quick acks its gathering relies on every other commit).
                let sent_over = first_append.map_or(Duration::ZERO, |first| {
                    self.last_append.duration_since(first)
                });
                let slow = self.commit_max_wait > self.commit_interval
                    && (group_bytes < COMMIT_TARGET_BYTES
                        || slower_than_busy(group_bytes, sent_over, self.commit_interval));
                self.publish_pace(slow);
            }
            let delivered_blocks = deliveries.len();
            // Still full and nothing that could make room: no transaction at all.
            let still_blocked = waiting_for_room
                && appends.is_empty()
                && deliveries.is_empty()
                && limits_before == (self.cap(), self.policy)
                && self.store.pending_bytes() >= self.cap();
            let nothing_to_do = appends.is_empty()
                && deliveries.is_empty()
                && self.ended_uploads.is_empty()
                && self.receipt_changes.is_empty()
                && self.parked.is_empty()
                && self.routes.is_none();
            if !(still_blocked || nothing_to_do) {
                // Parked appends go first: arrival order is ack order.
                let mut queue = std::mem::take(&mut self.parked);
                queue.extend(appends);
                match self.apply(queue, &deliveries) {
                    Ok(()) => {
                        backoff = Duration::from_millis(50);
                        self.failed_commits = 0;
                    }
                    Err(e) if e.is_disk_full() => {
                        // The disk filled before the cap: smaller transactions first; when
                        // one append alone does not fit, the spool's cap comes down to what
                        // it holds, and the full policy applies as at the cap.
                        self.retry_deliveries = deliveries;
                        self.on_disk_full(&e);
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "spool commit failed; nothing was acked, retrying in {backoff:?}");
                        self.retry_deliveries = deliveries;
                        self.failed_commits += 1;
                        let damaged = e.is_corrupt()
                            || (self.failed_commits % CHECK_AFTER_FAILURES == 0
                                && matches!(
                                    self.store.check(store::QUICK_CHECK_LIMIT),
                                    Ok(store::Health::Damaged(_))
                                ));
                        if damaged {
                            self.rebuild(&e);
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            for (dest, routes, after, limit, reply) in leases_after_commit {
                let r = self.list_blocks(&dest, after, &routes, limit, &delivering);
                let _ = reply.send(r);
            }
            self.slow_turns
                .finished(&self.phases, taken, delivered_blocks);
            for (broker, reply) in receipt_replies {
                let _ = reply.send(self.store.qos2_receipts(&broker));
            }
            #[cfg(test)]
            for reply in accounting_replies {
                let _ = reply.send(self.store.accounting());
            }
        }
        if !self.parked.is_empty() {
            tracing::info!(parked = self.parked.len(), "spool closed with appends waiting for space; they were not acked and the broker will redeliver them");
        }
        self.store.accounting()
    }

    /// The blocks a lease returns (see [`SpoolHandle::lease`]), leaving out those being
    /// reported delivered; a damaged file is rebuilt and listed again.
    fn list_blocks(
        &mut self,
        dest: &Arc<str>,
        after: i64,
        routes: &[String],
        limit: usize,
        delivering: &HashSet<(i64, Arc<str>)>,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        let t = std::time::Instant::now();
        let skip = |id| delivering.contains(&(id, dest.clone()));
        let mut r = self.store.list_blocks(dest, after, routes, limit, skip);
        if let Err(e) = &r {
            if e.is_corrupt() && self.rebuild(e) {
                r = self.store.list_blocks(dest, after, routes, limit, skip);
            }
        }
        self.phases.lease += t.elapsed();
        r
    }

    /// How long the intake may wait between reads of a slow stream: [`PACE_GAPS`] mean gaps
    /// between appends, at least half the commit interval (a busy stream's reads are not
    /// held past it) and at most an eighth of `commit_max_wait`, so a gathering that waits
    /// for messages sees several reads and a pause ([`QUIET_GAPS`] paces) still ends it
    /// before `commit_max_wait`.
    fn read_pace(&self) -> Duration {
        let floor = self.commit_interval / 2;
        (self.append_gap * PACE_GAPS)
            .min(self.commit_max_wait / 8)
            .max(floor)
    }

    /// A group still gathering whose appends, sent since `first_append`, came slower than a
    /// busy stream's ([`slower_than_busy`] by now) is a slow stream's: the intake may pace
    /// its reads at once, by the pace learned so far, rather than from the group's commit.
    /// Judged only at the commit, the pace a stream started with was the one its first,
    /// early commits published (about the floor, half the commit interval: the gap between
    /// appends not yet learned), and it held while the next group gathered to the target: at
    /// 20 msg/s with `max_linger = "60s"` the intake read one message per wakeup (about 90 us
    /// each) for the first 4.7 s, where a paced read takes about 25 in 136 us. The commit
    /// judges the whole group as before.
    fn pace_while_gathering(&self, first_append: Option<std::time::Instant>, bytes: usize) {
        let Some(first) = first_append else { return };
        // Over an interval at least: a few appends just sent say little of the rate.
        let span = first.elapsed();
        if self.commit_max_wait > self.commit_interval
            && span >= self.commit_interval
            && slower_than_busy(bytes, span, self.commit_interval)
        {
            self.publish_pace(true);
        }
    }

    /// Tells the intake whether the stream is slow, and so the pace it may read it at (see
    /// `SpoolStats::read_pace_us`).
    fn publish_pace(&self, slow: bool) {
        // At least 1 us while slow: 0 says "not slow".
        let pace_us = if slow {
            (self.read_pace().as_micros() as u64).max(1)
        } else {
            0
        };
        self.stats.read_pace_us.store(pace_us, Ordering::Relaxed);
    }

    /// An append was sent at `at`: updates the stream's usual pace, measured over windows of
    /// [`GAP_WINDOW`] or [`GAP_WINDOW_APPENDS`] (the window's span over the appends in it).
    /// Gaps from one append to the next say little of a paced stream, whose reads bring
    /// several messages at once: their mean was mostly the microseconds within a read, so
    /// the pace came out shorter than the stream's own gaps said.
    fn paced(&mut self, at: std::time::Instant) {
        self.last_append = self.last_append.max(at);
        // The first window opens at the first append, not at the spool's start.
        let Some(start) = self.window_start else {
            self.window_start = Some(at);
            return;
        };
        self.window_appends += 1;
        let span = at.saturating_duration_since(start);
        if span >= GAP_WINDOW || self.window_appends >= GAP_WINDOW_APPENDS {
            let gap = (span / self.window_appends).min(self.commit_max_wait);
            self.append_gap = (self.append_gap + gap) / 2;
            self.window_start = Some(at);
            self.window_appends = 0;
        }
    }

    /// Until when a turn that started at `started`, its first append sent at `first_append`,
    /// goes on gathering (`None`: commit now).
    ///
    /// Appends gather for `commit_interval`, so a busy stream commits in few, large blocks.
    /// Past that, a group still smaller than [`COMMIT_TARGET_BYTES`] goes on gathering while
    /// messages keep coming at their usual pace (no gap longer than [`QUIET_GAPS`] mean gaps,
    /// or read paces while a read pace is published), up to `commit_max_wait` and one
    /// commit interval after its first append (after the turn began, for deliveries alone):
    /// a slow, steady stream then commits a few pages' worth at a time instead of a page per
    /// message, for fewer disk writes and less CPU per message. The wait is the linger by
    /// default, and a record's linger counts from its read, so the group's first record
    /// makes its frame due just before the wait ends: the shipper's lease then commits the
    /// group ([`SpoolHandle::lease_after_commit`]). When the wait ended first, by about a
    /// millisecond, the lease often found a record or two appended since (by the timing,
    /// messages the broker sent once that commit's acks came; not traced) and committed them
    /// as a second block; a frame's two rows did not fit the table's page, which split and
    /// merged at every commit (a 20 msg/s stream wrote 0.8-1.1 times its payload instead
    /// of 0.39-0.44). A pause ends the gathering at once, which is also what happens when a
    /// broker stops sending because its inflight window is full of messages awaiting their
    /// ack; and the source asks for a commit (`Flush`) when half its own window waits.
    /// Deliveries alone wait the same way for the appends of a steady stream, to share their
    /// commit.
    fn gather_until(
        &self,
        started: std::time::Instant,
        first_append: Option<std::time::Instant>,
        appends: usize,
        bytes: usize,
        deliveries: bool,
    ) -> Option<std::time::Instant> {
        if appends == 0 && !deliveries {
            return None;
        }
        let now = std::time::Instant::now();
        let interval_end = started + self.commit_interval;
        if appends > 0 && now < interval_end {
            return Some(interval_end);
        }
        if self.commit_max_wait <= self.commit_interval {
            return None;
        }
        if bytes >= COMMIT_TARGET_BYTES {
            return None;
        }
        let max_wait = self.commit_max_wait.max(self.commit_interval);
        // While a read pace is published the intake may pace its reads: messages then come
        // in bursts a pace apart and the mean gap between appends (mostly the microseconds
        // within a burst) says nothing of the stream, so a pause is judged against the pace
        // too. A stream too sparse to be paced has a mean gap above it, which then counts.
        let pace = Duration::from_micros(self.stats.read_pace_us.load(Ordering::Relaxed));
        let quiet = (self.append_gap.max(pace) * QUIET_GAPS).clamp(self.commit_interval, max_wait);
        let since = first_append.map_or(started, |first| first + self.commit_interval);
        let until = (self.last_append + quiet).min(since + max_wait);
        (now < until).then_some(until)
    }

    /// One transaction: deliveries, then appends while there is room, then commit, then acks.
    /// On error everything is rolled back and the appends are parked again.
    fn apply(
        &mut self,
        queue: VecDeque<Incoming>,
        deliveries: &[(Arc<str>, i64)],
    ) -> Result<(), SpoolError> {
        let mut fx = TxEffects::default();
        let mut accepted: Vec<Incoming> = Vec::with_capacity(queue.len());
        let mut queue = queue;
        let result = (|| {
            self.store.begin()?;
            if let Some(routes) = &self.routes {
                self.store.record_routes(routes)?;
            }
            // Before this turn's new receipts: a released id may be taken again by them.
            for change in &self.receipt_changes {
                match change {
                    ReceiptChange::Released { broker, pkid } => {
                        self.store.remove_qos2_receipts(broker, Some(*pkid))?
                    }
                    ReceiptChange::Cleared { broker, .. } => {
                        self.store.remove_qos2_receipts(broker, None)?
                    }
                }
            }
            let t = std::time::Instant::now();
            for (dest, id) in deliveries {
                self.in_flight.remove(*id, dest);
                match self.store.deliver_block(dest, *id)? {
                    Some(settled) => match settled.left {
                        Some(Counter::Delivered) => fx.delivered += u64::from(settled.records),
                        Some(Counter::Dropped(_)) => fx.dropped += u64::from(settled.records),
                        _ => {}
                    },
                    None => self.recount_evicted(dest, *id, &mut fx),
                }
            }
            for dest in &self.ended_uploads {
                self.store.end_upload(dest)?;
            }
            self.phases.deliver += t.elapsed();
            let t = std::time::Instant::now();
            let mut bytes = 0;
            // What the records accepted so far will take in the file (they are written after
            // this loop): the cap counts them too, or one large transaction overshoots it.
            let ratio = self.stored_ratio();
            let mut record_bytes = 0usize;
            while let Some(incoming) = queue.pop_front() {
                // After a full disk, smaller transactions until commits fit again.
                if accepted.len() >= self.group_limit || bytes >= MAX_GROUP_BYTES {
                    queue.push_front(incoming);
                    break;
                }
                let is_record = matches!(incoming.disposition, Disposition::Record { .. });
                if is_record && !self.make_room((record_bytes as f64 * ratio) as u64, &mut fx)? {
                    fx.waiting_for_room = true;
                    queue.push_front(incoming);
                    break;
                }
                if is_record {
                    record_bytes += incoming.payload.len() + incoming.topic.len();
                }
                bytes += incoming.payload.len();
                accepted.push(incoming);
            }
            self.write_appends(&accepted, &mut fx)?;
            self.phases.write += t.elapsed();
            let started = std::time::Instant::now();
            let committed = self.store.commit();
            self.phases.commit += started.elapsed();
            self.stats.commit_latency.record(started.elapsed());
            committed
        })();
        match result {
            Ok(()) => {
                self.routes = None;
                self.receipt_changes.clear();
                self.ended_uploads.clear();
                self.group_limit = (self.group_limit * 2).min(MAX_GROUP);
                if self.room_cap.is_some() {
                    // The log's pages go back to the file system after each commit, so
                    // the pages the spool freed take the next one.
                    self.store.truncate_wal();
                }
                self.stats
                    .full
                    .store(fx.waiting_for_room, Ordering::Relaxed);
                self.parked = queue;
                AfterCommit::release_all(accepted.into_iter().map(|i| i.after_commit));
                self.stats
                    .received
                    .fetch_add(fx.received, Ordering::Relaxed);
                self.stats
                    .delivered
                    .fetch_add(fx.delivered, Ordering::Relaxed);
                self.stats.dropped.fetch_add(fx.dropped, Ordering::Relaxed);
                self.stats
                    .dropped
                    .fetch_sub(fx.undropped, Ordering::Relaxed);
                for (id, dest) in std::mem::take(&mut fx.recounted) {
                    self.forget_evicted(id, &dest, true);
                }
                for (id, evicted) in std::mem::take(&mut fx.evicted_sending) {
                    self.evicted_sending.insert(id, evicted);
                }
                while self.evicted_sending.len() > MAX_EVICTED_SENDING {
                    self.evicted_sending.pop_first();
                }
                self.stats
                    .appended_raw_bytes
                    .fetch_add(fx.raw_bytes, Ordering::Relaxed);
                self.stats
                    .appended_stored_bytes
                    .fetch_add(fx.stored_bytes, Ordering::Relaxed);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.writable.store(true, Ordering::Relaxed);
                self.publish_totals();
                if fx.blocks_added {
                    let last = std::time::Instant::now();
                    self.commit_tx.send_modify(|c| {
                        c.count += 1;
                        c.last = last;
                    });
                }
                Ok(())
            }
            Err(e) => {
                self.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                self.stats.writable.store(false, Ordering::Relaxed);
                self.store.rollback();
                self.failed_appends = accepted.len();
                accepted.extend(queue);
                self.parked = accepted.into();
                Err(e)
            }
        }
    }

    /// A block `dest` accepted that was evicted while it was being sent: counted delivered
    /// for it (and for the route once every destination that owed it did), no longer dropped.
    fn recount_evicted(&mut self, dest: &Arc<str>, id: i64, fx: &mut TxEffects) {
        let Some(e) = self.evicted_sending.get(&id) else {
            return;
        };
        let done: Vec<&Arc<str>> = fx
            .recounted
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, d)| d)
            .collect();
        if done.contains(&dest) {
            return;
        }
        let records = e.records;
        let route_done = if e.owing.is_empty() {
            done.is_empty()
        } else {
            if !e.owing.iter().any(|d| **d == **dest) {
                return;
            }
            let left = e
                .owing
                .iter()
                .filter(|d| ***d != **dest && !done.iter().any(|x| ***x == ***d))
                .count();
            self.store
                .recount_as_delivered(&store::pair_row(&e.route, dest), records);
            left == 0 && e.all_accepted
        };
        if route_done {
            let route = e.route.clone();
            self.store.recount_as_delivered(&route, records);
            fx.delivered += u64::from(records);
            fx.undropped += u64::from(records);
        }
        fx.recounted.push((id, dest.clone()));
    }

    /// `dest` is done with an evicted block: it `accepted` it (and that was counted), or
    /// gave it back.
    fn forget_evicted(&mut self, id: i64, dest: &str, accepted: bool) {
        if let Some(e) = self.evicted_sending.get_mut(&id) {
            if e.owing.is_empty() {
                self.evicted_sending.remove(&id);
                return;
            }
            let before = e.owing.len();
            e.owing.retain(|d| d != dest);
            if e.owing.is_empty() {
                self.evicted_sending.remove(&id);
            } else if e.owing.len() < before && !accepted {
                e.all_accepted = false;
            }
        }
    }

    fn read_blocks(
        &mut self,
        dest: &Arc<str>,
        ids: &[i64],
    ) -> Result<Vec<(BlockMeta, Vec<u8>)>, SpoolError> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.store.read_block(id) {
                Ok(Some(found)) => {
                    self.in_flight.insert(id, dest);
                    out.push(found);
                }
                Ok(None) => {}
                Err(e @ SpoolError::CorruptBlock { .. }) => {
                    tracing::error!(error = %e, "quarantined a corrupt spool block; its records are counted as dropped (corrupt)");
                    self.stats.dropped.store(
                        self.store.accounting().map_or(0, |a| a.dropped),
                        Ordering::Relaxed,
                    );
                    self.publish_totals();
                }
                // The file is damaged: rebuilt from what reads back; the shipper plans
                // again from what is there.
                Err(e) if e.is_corrupt() && self.rebuild(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Rebuilds the spool file found damaged while the agent runs (see [`Store::rebuild`]):
    /// what reads back is kept under the same ids, the rest is counted dropped `corrupt`.
    /// Returns whether it was rebuilt.
    fn rebuild(&mut self, cause: &SpoolError) -> bool {
        tracing::error!(error = %cause, "the spool file is damaged; rebuilding it from what reads back");
        let path = self.store.path().to_path_buf();
        match self.store.rebuild() {
            Ok(report) => {
                report_open(&path, &report);
                self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                if let Ok(acc) = self.store.accounting() {
                    self.stats.received.store(acc.received, Ordering::Relaxed);
                    self.stats.delivered.store(acc.delivered, Ordering::Relaxed);
                    self.stats.dropped.store(acc.dropped, Ordering::Relaxed);
                }
                self.publish_totals();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "rebuilding the damaged spool file failed; retrying with the next failure");
                false
            }
        }
    }

    fn publish_totals(&self) {
        self.stats
            .pending_records
            .store(self.store.pending_records(), Ordering::Relaxed);
        self.stats
            .pending_bytes
            .store(self.store.pending_bytes(), Ordering::Relaxed);
    }

    /// The bytes the spool may hold now: `max_bytes`, or less after a full disk.
    fn cap(&self) -> u64 {
        self.room_cap
            .map_or(self.max_bytes, |c| c.min(self.max_bytes))
    }

    /// A commit failed for a full disk before the spool reached its cap. If it carried
    /// several appends, the next one carries a quarter of them: what the disk still has is
    /// used before anything is given up. When a single append does not fit, the reserve goes
    /// back to the file system (the deletions that make room need log pages), and the cap
    /// comes down to an eighth below what the spool holds, so `drop_oldest` evicts and
    /// `block` waits for deliveries as at the cap.
    fn on_disk_full(&mut self, e: &SpoolError) {
        self.store.truncate_wal();
        if self.failed_appends > 1 {
            self.group_limit = (self.failed_appends / 4).max(1);
            tracing::warn!(error = %e, appends = self.failed_appends, next = self.group_limit, "disk full before the spool's cap: retrying in smaller transactions");
            return;
        }
        self.group_limit = 1;
        let released = self.reserve.release();
        let held = self.cap().min(self.store.pending_bytes());
        let cap = held - held / 8;
        self.room_cap = Some(cap);
        self.stats.room_cap.store(cap.max(1), Ordering::Relaxed);
        self.room_checked = std::time::Instant::now();
        let reserve = if released {
            format!(
                "; released the disk reserve ({} bytes)",
                self.reserve.size()
            )
        } else {
            String::new()
        };
        match self.policy {
            FullPolicy::DropOldest => {
                tracing::error!(error = %e, spool_bytes = held, cap, "disk full before the spool's cap: the spool now holds at most {cap} bytes and drops its oldest blocks to stay below (policy drop_oldest) until the disk has room again{reserve}")
            }
            FullPolicy::Block => {
                tracing::error!(error = %e, spool_bytes = held, cap, "disk full before the spool's cap: the spool now holds at most {cap} bytes; nothing more is acked until deliveries or the disk make room (policy block){reserve}")
            }
        }
    }

    /// After a full disk, at most every two seconds: if the file system has room for the
    /// reserve twice over, the reserve is made again and the cap is `max_bytes` again.
    fn look_for_room(&mut self) {
        if self.room_cap.is_none() || self.room_checked.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.room_checked = std::time::Instant::now();
        if self.reserve.restore() {
            self.room_cap = None;
            self.stats.room_cap.store(0, Ordering::Relaxed);
            tracing::info!(
                max_bytes = self.max_bytes,
                "the disk has room again: disk reserve made again, the spool may fill to its cap"
            );
        }
    }

    fn dead_letter_cap(&self) -> DeadLetterCap {
        DeadLetterCap {
            records: self.max_dead_letters,
            bytes: (self.max_bytes / 8).max(1 << 20),
        }
    }

    /// True if a record may be added: below the cap, or made so by `drop_oldest`.
    /// Stored bytes per raw byte of the records appended so far (1 before any).
    fn stored_ratio(&self) -> f64 {
        let raw = self.stats.appended_raw_bytes.load(Ordering::Relaxed);
        let stored = self.stats.appended_stored_bytes.load(Ordering::Relaxed);
        if raw == 0 {
            1.0
        } else {
            (stored as f64 / raw as f64).clamp(0.01, 1.0)
        }
    }

    /// Room for one more record, `adding` bytes already accepted in this transaction: with
    /// `drop_oldest` the oldest blocks go until the spool is under its cap; false when there
    /// is nothing left to evict (or the policy is `block`).
    fn make_room(&mut self, adding: u64, fx: &mut TxEffects) -> Result<bool, SpoolError> {
        while self.store.pending_bytes() + adding >= self.cap() {
            if self.policy == FullPolicy::Block {
                return Ok(false);
            }
            let in_flight = &self.in_flight;
            match self.store.evict_oldest(|id| in_flight.contains(id))? {
                Some((_, store::Removed { route, records, .. })) => {
                    fx.dropped += u64::from(records);
                    tracing::warn!(
                        route,
                        records,
                        "spool full: dropped the oldest block (policy drop_oldest)"
                    );
                }
                // Everything spooled is being sent (a small cap, or a disk that filled
                // early): the oldest of those goes too, or the spool would stop acking.
                // Should its destination take it after all, it counts as delivered.
                None => match self.store.evict_oldest(|_| false)? {
                    Some((id, removed)) => {
                        fx.dropped += u64::from(removed.records);
                        tracing::warn!(
                            route = removed.route,
                            records = removed.records,
                            "spool full: dropped the oldest block, which was being sent (policy drop_oldest)"
                        );
                        fx.evicted_sending.push((
                            id,
                            EvictedSending {
                                route: removed.route,
                                records: removed.records,
                                owing: removed.owing,
                                all_accepted: true,
                            },
                        ));
                    }
                    None => return Ok(false),
                },
            }
        }
        Ok(true)
    }

    fn write_appends(
        &mut self,
        accepted: &[Incoming],
        fx: &mut TxEffects,
    ) -> Result<(), SpoolError> {
        // Group records by (route, block key) in order of first appearance: a bucket's key
        // when the route has a placement, else the record's own.
        let placements = self.stats.placements.snapshot();
        let mut groups: Vec<(&str, String, Vec<usize>)> = Vec::new();
        let mut index: foldhash::HashMap<(&str, &str), usize> = Default::default();
        let mut by_block: foldhash::HashMap<(&str, String), usize> = Default::default();
        for (i, incoming) in accepted.iter().enumerate() {
            fx.received += 1;
            if let Some(r) = &incoming.receipt {
                if self
                    .receipts_from
                    .get(&r.broker)
                    .is_none_or(|g| r.generation >= *g)
                {
                    self.store.add_qos2_receipt(&r.broker, r.pkid)?;
                }
            }
            match &incoming.disposition {
                Disposition::Record { route, key } => {
                    let g = match index.get(&(&**route, key.as_str())) {
                        Some(g) => *g,
                        None => {
                            let block_key = placements.block_key(route, key);
                            let g = *by_block
                                .entry((&**route, block_key.clone()))
                                .or_insert_with(|| {
                                    groups.push((route, block_key, Vec::new()));
                                    groups.len() - 1
                                });
                            index.insert((route, key), g);
                            g
                        }
                    };
                    groups[g].2.push(i);
                }
                Disposition::DeadLetter { route, reason } => {
                    fx.dropped += 1;
                    self.store.dead_letter(
                        route,
                        incoming.ts_ms,
                        &incoming.topic,
                        *reason,
                        &incoming.payload,
                        self.dead_letter_cap(),
                    )?;
                }
                Disposition::Dropped { route, reason } => {
                    fx.dropped += 1;
                    self.store.drop_message(route, *reason);
                }
            }
        }
        for (route, block_key, members) in groups {
            let mut chunk: Vec<NewRecord<'_>> = Vec::new();
            let mut chunk_bytes = 0;
            for i in members {
                let m = &accepted[i];
                let Disposition::Record { key, .. } = &m.disposition else {
                    unreachable!("only records are grouped");
                };
                let size = crate::frame::encoded_record_len(
                    u64::MAX,
                    m.ts_ms,
                    m.topic.len(),
                    m.payload.len(),
                ) + key.len()
                    + 2;
                // A block never holds records of two clock hours (UTC), so objects cut
                // at the hour take whole blocks.
                let new_hour = chunk
                    .first()
                    .is_some_and(|f| f.ts_ms / HOUR_MS != m.ts_ms / HOUR_MS);
                if !chunk.is_empty() && (chunk_bytes + size > BLOCK_RAW_MAX || new_hour) {
                    self.flush_block(route, &block_key, &chunk, fx)?;
                    chunk.clear();
                    chunk_bytes = 0;
                }
                chunk.push(NewRecord {
                    ts_ms: m.ts_ms,
                    key,
                    topic: &m.topic,
                    payload: &m.payload,
                });
                chunk_bytes += size;
            }
            if !chunk.is_empty() {
                self.flush_block(route, &block_key, &chunk, fx)?;
            }
        }
        Ok(())
    }

    fn flush_block(
        &mut self,
        route: &str,
        key: &str,
        records: &[NewRecord<'_>],
        fx: &mut TxEffects,
    ) -> Result<(), SpoolError> {
        let meta = self
            .store
            .append_block(route, key, records, &mut self.body)?;
        fx.raw_bytes += u64::from(meta.raw_bytes);
        fx.stored_bytes += u64::from(meta.stored_bytes);
        fx.blocks_added = true;
        Ok(())
    }
}

/// An hour in milliseconds: no block holds records of two (see `write_appends`).
pub(crate) const HOUR_MS: u64 = 3_600_000;

#[cfg(test)]
mod tests {
    /// The destination the tests' shipper stands for (their routes record none).
    const D: &str = "d";
    use super::*;
    use crate::config::SyncLevel;

    fn config(dir: &std::path::Path, max_bytes: u64, policy: FullPolicy) -> SpoolConfig {
        SpoolConfig {
            path: dir.join("spool.db"),
            max_bytes,
            full_policy: policy,
            sync: SyncLevel::Off,
            max_dead_letters: 10,
            commit_interval: Duration::from_millis(2),
            commit_max_wait: Duration::from_secs(1),
        }
    }

    /// Incompressible bytes (xorshift), so spool sizes are predictable.
    pub(super) fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A test's acks one at a time (the spool sends a commit's together).
    struct AckRx {
        rx: mpsc::UnboundedReceiver<Vec<AckToken>>,
        ready: std::collections::VecDeque<AckToken>,
    }

    impl AckRx {
        async fn recv(&mut self) -> Option<AckToken> {
            loop {
                if let Some(t) = self.ready.pop_front() {
                    return Some(t);
                }
                self.ready.extend(self.rx.recv().await?);
            }
        }
    }

    fn ack_channel() -> (mpsc::UnboundedSender<Vec<AckToken>>, AckRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ready = Default::default();
        (tx, AckRx { rx, ready })
    }

    fn record(
        route: &str,
        payload: &[u8],
        ack: &mpsc::UnboundedSender<Vec<AckToken>>,
        pkid: u16,
    ) -> Incoming {
        Incoming {
            topic: "t/1".into(),
            payload: Bytes::copy_from_slice(payload),
            ts_ms: 1,
            disposition: Disposition::Record {
                route: route.into(),
                key: "k".into(),
            },
            after_commit: AfterCommit {
                ack: Some((
                    ack.clone(),
                    AckToken {
                        qos: 1,
                        pkid,
                        session: 0,
                        received: std::time::Instant::now(),
                    },
                )),
                permit: None,
            },
            receipt: None,
        }
    }

    #[tokio::test]
    async fn acks_follow_commit_in_arrival_order_and_delivery_balances() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, thread) = start(&config(dir.path(), 1 << 30, FullPolicy::Block)).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        for pkid in 1..=100u16 {
            spool
                .append(record("r", format!("m{pkid}").as_bytes(), &ack_tx, pkid))
                .unwrap();
        }
        for pkid in 1..=100u16 {
            assert_eq!(ack_rx.recv().await.unwrap().pkid, pkid);
        }
        let routes: Arc<[String]> = vec!["r".to_string()].into();
        let blocks = spool
            .lease(D.into(), routes.clone(), 0, 1000)
            .await
            .unwrap();
        let total: u32 = blocks.iter().map(|b| b.records).sum();
        assert_eq!(total, 100);
        let (_, body) = spool
            .read(D.into(), vec![blocks[0].id])
            .await
            .unwrap()
            .remove(0);
        let first =
            crate::frame::decode_records_in(&body, blocks[0].records, blocks[0].version).unwrap();
        assert_eq!(first[0].payload, b"m1");
        spool
            .delivered(D.into(), blocks.iter().map(|b| b.id).collect())
            .unwrap();
        let acc = spool.accounting().await.unwrap();
        assert_eq!((acc.received, acc.delivered, acc.pending), (100, 100, 0));
        drop(spool);
        assert!(thread.join().unwrap().unwrap().balances());
    }

    /// A commit's acks reach each source in one send (sent one by one, each could wake the
    /// source), each source's in the order its messages came.
    #[tokio::test]
    async fn a_commits_acks_reach_each_source_in_one_send() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, thread) = start(&config(dir.path(), 1 << 30, FullPolicy::Block)).unwrap();
        let (odd_tx, mut odd_rx) = mpsc::unbounded_channel();
        let (even_tx, mut even_rx) = mpsc::unbounded_channel();
        for pkid in 1..=100u16 {
            let to = if pkid % 2 == 1 { &odd_tx } else { &even_tx };
            spool.append(record("r", b"m", to, pkid)).unwrap();
        }
        spool.flush().unwrap();
        let mut sends = Vec::new();
        for (rx, first) in [(&mut odd_rx, 1u16), (&mut even_rx, 2)] {
            let mut pkids = Vec::new();
            let mut n = 0;
            while pkids.len() < 50 {
                pkids.extend(rx.recv().await.unwrap().into_iter().map(|t| t.pkid));
                n += 1;
            }
            assert_eq!(pkids, (first..=100).step_by(2).collect::<Vec<_>>());
            sends.push(n);
        }
        let commits = spool.commits().borrow().count;
        assert!(
            sends.iter().all(|n| *n <= commits),
            "{sends:?} sends for {commits} commits"
        );
        drop(spool);
        assert!(thread.join().unwrap().unwrap().balances());
    }

    /// With its destination's shards known, a commit of 400 messages from 200 devices is two
    /// blocks (one per shard), not 200; every record keeps its own key, and each block's key
    /// places it on the shard all its records' keys map to.
    /// Records of one commit that straddle a UTC hour go in two blocks, each of one hour,
    /// in order: an object cut at the hour takes whole blocks.
    #[tokio::test]
    async fn a_block_never_holds_records_of_two_hours() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_secs(5);
        let (spool, thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        let hour_end = 490_000 * HOUR_MS;
        for (i, ts) in [hour_end - 2, hour_end - 1, hour_end, hour_end + 1]
            .into_iter()
            .enumerate()
        {
            let mut m = record("r", format!("m{i}").as_bytes(), &ack_tx, i as u16 + 1);
            m.ts_ms = ts;
            spool.append(m).unwrap();
        }
        spool.flush().unwrap();
        for _ in 0..4 {
            ack_rx.recv().await.unwrap();
        }
        let routes: Arc<[String]> = vec!["r".to_string()].into();
        let blocks = spool.lease(D.into(), routes, 0, 10).await.unwrap();
        let got: Vec<(u32, u64)> = blocks.iter().map(|b| (b.records, b.created_ms)).collect();
        assert_eq!(got, [(2, hour_end - 2), (2, hour_end)]);
        assert!(blocks[0].id < blocks[1].id);
        spool.close();
        thread.join().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_commit_stores_one_block_per_shard_whatever_the_number_of_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_secs(5);
        let (spool, thread) = start(&cfg).unwrap();
        let half = u128::MAX / 2 + 1;
        spool.placements().set(
            &["r".to_string()],
            Some(&placement::Placement {
                label: "gw".into(),
                starts: vec![0, half].into(),
            }),
        );
        let (ack_tx, mut ack_rx) = ack_channel();
        for i in 0..400u16 {
            let mut m = record("r", format!("m{i}").as_bytes(), &ack_tx, i + 1);
            m.disposition = Disposition::Record {
                route: "r".into(),
                key: format!("dev-{}", i % 200),
            };
            spool.append(m).unwrap();
        }
        spool.flush().unwrap();
        for _ in 0..400 {
            ack_rx.recv().await.unwrap();
        }
        let routes: Arc<[String]> = vec!["r".to_string()].into();
        let blocks = spool.lease(D.into(), routes, 0, 1000).await.unwrap();
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        let mut seen = 0;
        for (meta, body) in spool
            .read(D.into(), blocks.iter().map(|b| b.id).collect())
            .await
            .unwrap()
        {
            let (label, start) = crate::key::split(&meta.key);
            assert_eq!(label, "gw");
            let start: u128 = start.unwrap().parse().unwrap();
            assert!(start == 0 || start == half);
            let records =
                crate::frame::decode_records_in(&body, meta.records, meta.version).unwrap();
            for r in records {
                let hash = crate::key::hash_key(&r.key);
                assert_eq!(hash >= half, start == half, "{} in the wrong block", r.key);
                let i: u16 = std::str::from_utf8(&r.payload).unwrap()[1..]
                    .parse()
                    .unwrap();
                assert_eq!(r.key, format!("dev-{}", i % 200));
                seen += 1;
            }
        }
        assert_eq!(seen, 400);
        drop(spool);
        assert!(thread.join().unwrap().unwrap().balances());
    }

    #[tokio::test]
    async fn qos2_receipts_commit_with_their_message_and_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        let broker: Arc<str> = Arc::from("b");
        let receipt = |pkid, generation| {
            Some(Receipt {
                broker: broker.clone(),
                pkid,
                generation,
            })
        };
        let (ack_tx, mut ack_rx) = ack_channel();
        {
            let (spool, thread) = start(&cfg).unwrap();
            for pkid in [3u16, 4, 5] {
                let mut m = record("r", b"m", &ack_tx, pkid);
                m.receipt = receipt(pkid, 1);
                spool.append(m).unwrap();
                ack_rx.recv().await.unwrap();
            }
            spool.qos2_released(broker.clone(), 4).unwrap();
            let mut got = spool.qos2_receipts("b").await.unwrap();
            got.sort_unstable();
            assert_eq!(got, vec![3, 5]);
            drop(spool);
            thread.join().unwrap().unwrap();
        }
        let (spool, _thread) = start(&cfg).unwrap();
        let mut got = spool.qos2_receipts("b").await.unwrap();
        got.sort_unstable();
        assert_eq!(got, vec![3, 5], "after a restart");
        assert!(spool.qos2_receipts("other").await.unwrap().is_empty());
        // The broker kept no session at the connection of generation 2: every receipt
        // goes, and a message of generation 1 committed after that makes none.
        spool.qos2_cleared(broker.clone(), 2).unwrap();
        let mut m = record("r", b"late", &ack_tx, 7);
        m.receipt = receipt(7, 1);
        spool.append(m).unwrap();
        ack_rx.recv().await.unwrap();
        let mut m = record("r", b"new", &ack_tx, 8);
        m.receipt = receipt(8, 2);
        spool.append(m).unwrap();
        ack_rx.recv().await.unwrap();
        assert_eq!(spool.qos2_receipts("b").await.unwrap(), vec![8]);
    }

    #[tokio::test]
    async fn a_flush_commits_without_waiting_out_the_commit_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_secs(1);
        let (spool, _thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        // Without a flush, a lone append waits out the interval.
        let started = std::time::Instant::now();
        spool.append(record("r", b"a", &ack_tx, 1)).unwrap();
        ack_rx.recv().await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1));
        // With one (a source's window is full), it commits at once.
        let started = std::time::Instant::now();
        spool.append(record("r", b"b", &ack_tx, 2)).unwrap();
        spool.flush().unwrap();
        ack_rx.recv().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    /// A lease after a commit commits the group being gathered, if it began by the due time
    /// given, and lists its block; a plain lease, or one whose due time came before the
    /// group began, lists what was committed and leaves the group gathering.
    #[tokio::test]
    async fn a_lease_after_a_commit_lists_the_group_being_gathered() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_secs(5);
        let (spool, _thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        let routes: Arc<[String]> = vec!["r".to_string()].into();
        let before = std::time::Instant::now() - Duration::from_micros(1);
        spool.append(record("r", b"a", &ack_tx, 1)).unwrap();
        spool.append(record("r", b"b", &ack_tx, 2)).unwrap();
        let plain = spool.lease(D.into(), routes.clone(), 0, 10).await.unwrap();
        assert!(plain.is_empty(), "nothing committed yet");
        let early = spool
            .lease_after_commit(D.into(), routes.clone(), 0, 10, before)
            .await
            .unwrap();
        assert!(
            early.is_empty(),
            "a group begun after the due time gathers on"
        );
        let blocks = spool
            .lease_after_commit(D.into(), routes, 0, 10, std::time::Instant::now())
            .await
            .unwrap();
        assert!(
            before.elapsed() < Duration::from_secs(5),
            "not the interval's commit"
        );
        assert_eq!(blocks.iter().map(|b| b.records).sum::<u32>(), 2);
        ack_rx.recv().await.unwrap();
        ack_rx.recv().await.unwrap();
    }

    /// Appends every 2 ms for 300 ms, then none: (commits, acks) seen.
    async fn steady_stream(cfg: &SpoolConfig) -> (u64, usize, bool) {
        let (commits, acked, pace) = stream_of(cfg, Duration::from_millis(2), 150).await;
        (commits, acked, pace.is_some())
    }

    /// `count` appends of 200 bytes, one every `every`, until all are acked: the commits it
    /// took, the acks, and the read pace the spool published after.
    async fn stream_of(
        cfg: &SpoolConfig,
        every: Duration,
        count: u16,
    ) -> (u64, usize, Option<Duration>) {
        let (spool, _thread) = start(cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        let before = spool.stats().commits.load(Ordering::Relaxed);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for pkid in 1..=count {
            tick.tick().await;
            spool
                .append(record("r", &[b'x'; 200], &ack_tx, pkid))
                .unwrap();
        }
        let mut acked = 0;
        while acked < usize::from(count) {
            tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                .await
                .expect("every append is acked")
                .unwrap();
            acked += 1;
        }
        (
            spool.stats().commits.load(Ordering::Relaxed) - before,
            acked,
            spool.read_pace(),
        )
    }

    #[tokio::test]
    async fn a_slow_steady_stream_gathers_past_the_commit_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_millis(10);
        // 30 KB over 300 ms: groups of the commit target (16 KiB), not one per interval;
        // the last, short of it, tells the intake the stream is slow.
        let (commits, acked, slow) = steady_stream(&cfg).await;
        assert_eq!(acked, 150);
        assert!(commits <= 3, "{commits} commits");
        assert!(slow, "a slow stream");
        // With commit_max_wait at the interval, it commits every interval as before.
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_millis(10);
        cfg.commit_max_wait = cfg.commit_interval;
        let (commits, _, slow) = steady_stream(&cfg).await;
        assert!(commits >= 15, "{commits} commits");
        assert!(!slow, "no gathering, no quick acks");
    }

    #[tokio::test]
    async fn a_sparse_stream_is_read_a_few_messages_per_wakeup() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_millis(10);
        cfg.commit_max_wait = Duration::from_secs(1);
        // 40 messages/s: a read per message would be 40 wakeups a second.
        let (_, acked, pace) = stream_of(&cfg, Duration::from_millis(25), 40).await;
        assert_eq!(acked, 40);
        // Four gaps of 25 ms, not half the commit interval (5 ms), and at most an eighth of
        // commit_max_wait (125 ms), so a pause of four paces still ends a gathering.
        let pace = pace.expect("a slow stream");
        assert!(
            pace >= Duration::from_millis(60) && pace <= Duration::from_millis(125),
            "{pace:?}"
        );
    }

    /// A stream's first commits come before the gap between its appends is learned and
    /// publish the floor of the pace; the group that gathers after them publishes the pace
    /// learned meanwhile without waiting for its own commit (seconds away at 20 msg/s).
    #[tokio::test]
    async fn a_slow_stream_is_paced_while_its_group_gathers() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_millis(10);
        cfg.commit_max_wait = Duration::from_secs(10);
        let (spool, _thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // 20 msg/s for half a second: 2 KB, far from the commit target.
        for pkid in 1..=10 {
            tick.tick().await;
            spool
                .append(record("r", &[b'x'; 200], &ack_tx, pkid))
                .unwrap();
        }
        tick.tick().await;
        // 64 gaps of 50 ms, at most an eighth of commit_max_wait; the floor (5 ms) before.
        let pace = spool.read_pace().expect("a slow stream");
        assert!(
            pace >= Duration::from_millis(500) && pace <= Duration::from_millis(1250),
            "{pace:?}"
        );
        spool.flush().unwrap();
        for _ in 0..10 {
            tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                .await
                .expect("every append is acked")
                .unwrap();
        }
    }

    /// A paced intake hands over a slow stream's messages a few at once: the stream's gap
    /// is its mean (2 ms here), not the microseconds within a read, so the pace is
    /// `PACE_GAPS` of it, up to an eighth of `commit_max_wait` (125 ms). Measured append to
    /// append it came to about 1 ms, a pace of about 33 ms with 32 gaps.
    #[tokio::test]
    async fn a_stream_read_in_bursts_is_paced_by_its_mean_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_interval = Duration::from_millis(10);
        cfg.commit_max_wait = Duration::from_secs(1);
        let (spool, _thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // 500 msg/s in bursts of 10 every 20 ms, for 1.2 s.
        for burst in 0..60u16 {
            tick.tick().await;
            for i in 0..10 {
                let m = record("r", &[b'x'; 200], &ack_tx, burst * 10 + i + 1);
                spool.append(m).unwrap();
            }
        }
        for _ in 0..600 {
            tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                .await
                .expect("every append is acked")
                .unwrap();
        }
        let pace = spool.read_pace().expect("a slow stream");
        assert!(
            pace >= Duration::from_millis(50) && pace <= Duration::from_millis(125),
            "{pace:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_that_fills_the_target_only_by_gathering_stays_slow() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        // Long enough that no stall of a busy machine looks like a pause (a pause is at
        // least an interval).
        cfg.commit_interval = Duration::from_millis(100);
        let (spool, _thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        let before = spool.stats().commits.load(Ordering::Relaxed);
        // 200 B every 2 ms: the commit target (16 KiB) fills with the 82nd append, after
        // some 164 ms of gathering, past the interval.
        let appender = {
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for pkid in 1..=120u16 {
                    tick.tick().await;
                    spool
                        .append(record("r", &[b'x'; 200], &ack_tx, pkid))
                        .unwrap();
                }
            })
        };
        for _ in 0..82 {
            tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                .await
                .expect("the first group is acked")
                .unwrap();
        }
        // Read before the rest (committed 100 ms later or more) can change it; the pace is
        // published before a commit's acks, its count after them.
        let slow = spool.slow_stream();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let commits = loop {
            let n = spool.stats().commits.load(Ordering::Relaxed) - before;
            if n > 0 || std::time::Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_eq!(commits, 1, "the first 82 appends made one group");
        assert!(
            slow,
            "a group that filled the target only by gathering is a slow stream"
        );
        appender.await.unwrap();
        for _ in 82..120 {
            tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                .await
                .expect("every append is acked")
                .unwrap();
        }
    }

    /// A group's rate, not its size, says whether its stream is busy: a pace's worth of a
    /// 20 msg/s stream taken at once (100 messages, 17.7 KB, sent over 5 s) is slow, as is
    /// anything under 16 KiB per commit interval; a burst of 40 KB sent within a
    /// millisecond, or a busy stream's backlog taken after a stall (2 MiB over 200 ms), is
    /// busy.
    #[test]
    fn a_group_is_busy_by_the_rate_its_appends_were_sent_at() {
        let interval = Duration::from_millis(10);
        assert!(slower_than_busy(17_678, Duration::from_secs(5), interval));
        assert!(slower_than_busy(
            16_000,
            Duration::from_millis(10),
            interval
        ));
        assert!(!slower_than_busy(
            COMMIT_TARGET_BYTES,
            Duration::from_millis(10),
            interval
        ));
        assert!(!slower_than_busy(
            40_000,
            Duration::from_millis(1),
            interval
        ));
        assert!(!slower_than_busy(
            2 << 20,
            Duration::from_millis(200),
            interval
        ));
        assert!(!slower_than_busy(17_678, Duration::ZERO, interval));
    }

    #[tokio::test]
    async fn a_burst_that_fills_the_commit_target_is_not_a_slow_stream() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, FullPolicy::Block);
        cfg.commit_max_wait = Duration::from_secs(1);
        // An interval a busy machine does not stall the burst's sender for.
        cfg.commit_interval = Duration::from_millis(25);
        let (spool, _thread) = start(&cfg).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        // One message alone, then quiet: a group short of the target.
        spool.append(record("r", &[b'x'; 200], &ack_tx, 1)).unwrap();
        ack_rx.recv().await.unwrap();
        assert!(spool.slow_stream());
        // 40 KB at once: the group reaches the target.
        for pkid in 2..=201u16 {
            spool
                .append(record("r", &[b'y'; 200], &ack_tx, pkid))
                .unwrap();
        }
        for _ in 2..=201u16 {
            tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                .await
                .expect("every append is acked")
                .unwrap();
        }
        assert!(!spool.slow_stream());
    }

    #[tokio::test]
    async fn block_policy_parks_appends_until_space_frees() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _thread) = start(&config(dir.path(), 1 << 20, FullPolicy::Block)).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        // Incompressible payloads fill the 1 MiB cap after a few appends.
        for pkid in 1..=6u16 {
            spool
                .append(record("r", &noise(u64::from(pkid), 250_000), &ack_tx, pkid))
                .unwrap();
            if pkid <= 5 {
                // Each append commits alone until the cap is reached.
                let got = tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got.pkid, pkid);
            }
        }
        // The sixth is parked: no ack while full.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), ack_rx.recv())
                .await
                .is_err()
        );
        assert!(spool.stats().full.load(Ordering::Relaxed));
        // Blocked means quiet: no commit and no byte written while nothing can change
        // (it used to commit ten times a second, rewriting the sequence counter).
        let wal = dir.path().join("spool.db-wal");
        let before = (
            spool.stats().commits.load(Ordering::Relaxed),
            std::fs::metadata(&wal).unwrap().modified().unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let routes: Arc<[String]> = vec!["r".to_string()].into();
        let _ = spool.lease(D.into(), routes.clone(), 0, 1).await.unwrap();
        assert_eq!(
            (
                spool.stats().commits.load(Ordering::Relaxed),
                std::fs::metadata(&wal).unwrap().modified().unwrap()
            ),
            before,
            "a blocked spool wrote"
        );
        let blocks = spool.lease(D.into(), routes, 0, 2).await.unwrap();
        spool
            .delivered(D.into(), blocks.iter().map(|b| b.id).collect())
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.pkid, 6);
        let acc = spool.accounting().await.unwrap();
        assert_eq!(acc.dropped, 0);
        assert!(acc.balances());
    }

    #[tokio::test]
    async fn drop_oldest_evicts_blocks_not_in_flight_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _thread) = start(&config(dir.path(), 1 << 20, FullPolicy::DropOldest)).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        for pkid in 1..=10u16 {
            spool
                .append(record("r", &noise(u64::from(pkid), 250_000), &ack_tx, pkid))
                .unwrap();
            ack_rx.recv().await.unwrap();
        }
        let acc = spool.accounting().await.unwrap();
        assert!(
            acc.dropped_by_reason
                .get("spool_full")
                .copied()
                .unwrap_or(0)
                > 0,
            "{acc:?}"
        );
        assert_eq!(acc.received, 10);
        assert!(acc.balances(), "{acc:?}");
    }

    /// A database that cannot grow (SQLITE_FULL, the error a full disk gives) before the
    /// cap: under `drop_oldest` the cap comes down, the oldest blocks go and are counted,
    /// and every message is still acked.
    #[tokio::test]
    async fn a_database_full_before_the_cap_drops_the_oldest_and_keeps_acking() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _thread) =
            start(&config(dir.path(), 64 << 20, FullPolicy::DropOldest)).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        spool.limit_pages((1 << 20) / store::PAGE_SIZE); // 1 MiB
        for pkid in 1..=40u16 {
            spool
                .append(record("r", &noise(u64::from(pkid), 100_000), &ack_tx, pkid))
                .unwrap();
            ack_rx.recv().await.unwrap();
        }
        let acc = spool.accounting().await.unwrap();
        assert_eq!(acc.received, 40, "{acc:?}");
        let dropped = acc
            .dropped_by_reason
            .get("spool_full")
            .copied()
            .unwrap_or(0);
        assert!(dropped >= 30, "4 MB into 1 MiB: {acc:?}");
        assert!(acc.balances(), "{acc:?}");
        let cap = spool.stats().room_cap.load(Ordering::Relaxed);
        assert!(cap > 0 && cap < 1 << 20, "the cap came down: {cap}");
    }

    /// The same under `block`: acks stop at the full database and resume when deliveries
    /// make room, without losing a record.
    #[tokio::test]
    async fn a_database_full_before_the_cap_blocks_until_deliveries_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _thread) = start(&config(dir.path(), 64 << 20, FullPolicy::Block)).unwrap();
        let (ack_tx, mut ack_rx) = ack_channel();
        spool.limit_pages((1 << 20) / store::PAGE_SIZE);
        // All at once, so the first transaction carries 2 MiB into a 1 MiB file: what fits
        // goes in smaller transactions (a slow machine once took this to a cap of 0 and no
        // ack at all).
        let records: Vec<_> = (1..=40u16)
            .map(|pkid| record("r", &noise(u64::from(pkid), 100_000), &ack_tx, pkid))
            .collect();
        for r in records {
            spool.append(r).unwrap();
        }
        let mut acked = 0;
        while tokio::time::timeout(Duration::from_secs(1), ack_rx.recv())
            .await
            .is_ok()
        {
            acked += 1;
        }
        assert!(
            (3..40).contains(&acked),
            "acks stopped at the full database: {acked}"
        );
        assert!(spool.stats().room_cap.load(Ordering::Relaxed) > 0);
        // Deliveries make room: acks resume until every message is in.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked < 40 {
            assert!(
                std::time::Instant::now() < deadline,
                "stuck at {acked} acks"
            );
            let blocks = spool
                .lease(D.into(), vec!["r".into()].into(), 0, 100)
                .await
                .unwrap();
            spool
                .delivered(D.into(), blocks.iter().map(|b| b.id).collect())
                .unwrap();
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), ack_rx.recv()).await
            {
                acked += 1;
            }
        }
        let acc = spool.accounting().await.unwrap();
        assert_eq!(acc.received, 40, "{acc:?}");
        assert_eq!(acc.dropped, 0, "{acc:?}");
        assert!(acc.balances(), "{acc:?}");
    }
}
