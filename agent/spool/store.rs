//! The spool's SQLite file: schema, statements, and the bookkeeping that must change in the
//! same transaction as the records it describes.
//!
//! # Layout
//! - `blocks`: one row per group of records of one route committed together, bound for one
//!   place (`key`: one partition key, or a shard's bucket, see `spool/placement.rs`). `id` is
//!   the first record's sequence number, so ids only grow. `data` is the records in the frame
//!   body encoding of `body_version` (FORMAT.md; version 2 keeps each record's key),
//!   zstd-compressed: spooled bytes are a fraction of the payload bytes, which is what keeps
//!   SD-card writes within budget.
//! - `counters`: the accounting terms per route (`received`, `delivered`, `dropped_<reason>`),
//!   updated in the transaction that changes `blocks`, so after any crash
//!   `received = delivered + dropped + pending` still holds with `pending = SUM(blocks.records)`.
//! - `dead_letters`: messages that could not be spooled as records (oversize), kept for
//!   inspection, oldest evicted past a cap; each is also counted as dropped.
//! - `quarantine`: blocks that failed to decode, moved aside and counted as dropped `corrupt`.
//! - `mqtt_qos2_receipts`: per broker, the packet ids of QoS 2 messages spooled whose PUBREL
//!   has not come, written in the transaction that spools the message (so a PUBLISH the
//!   broker sends again, after a restart too, is not spooled twice).
//! - `fanout` and `taken`: each route's destinations and what each still owes, so a record
//!   stored once leaves when every destination took it (see [`fanout`]).
//! - `uploads`: the object each object destination (S3) is uploading, fixed before its upload
//!   starts, so an upload cut off by a crash resumes under the same key (see [`uploads`]).
//! - `meta`: the schema version. The next sequence number (never reused, even when the spool
//!   empties) is the `counters` row (`''`, `next_seq`).
//! - `blocks.ledger`: a commit that appended one small block writes the counters' totals and
//!   the next sequence number onto that block's row instead of the `counters` table, so it
//!   writes one page, not two; the newer of the two copies counts (see [`ledger`]).
//!
//! This module is synchronous and single-threaded; the spool thread in `spool/mod.rs` owns the
//! only connection while the agent runs (it holds the file exclusively, see
//! [`EXCLUSIVE_LOCKING`]). It never acks or ships anything.

use crate::config::SyncLevel;
use crate::frame;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod fanout;
mod ledger;
mod recent;
mod uploads;

/// 2: `blocks.body_version` (version 1 files gain the column, their blocks keep version 1).
/// 3: `blocks.ledger` (older files gain the column; their totals are the table's until a
/// commit writes a copy).
const SCHEMA_VERSION: i64 = 3;

/// Sequence numbers are never reused for a gateway, not even when the spool file is lost or
/// replaced: a floor kept beside it (`<spool>.seq`) is raised ahead of use in steps of this
/// many, so it is written once per about a million records and never while idle.
const SEQ_RESERVE: u64 = 1 << 20;

/// The file holding the sequence floor of the spool at `path`.
pub fn seq_floor_path(path: &Path) -> PathBuf {
    beside(path, ".seq")
}

/// The floor, or 0 when there is none yet (a first start) or it cannot be read.
fn read_seq_floor(path: &Path) -> u64 {
    match std::fs::read_to_string(seq_floor_path(path)) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::error!(file = %seq_floor_path(path).display(), "the sequence floor is unreadable; ids continue from the spool's own");
            0
        }),
        Err(_) => 0,
    }
}

/// Replaces the floor atomically and durably (write, fsync, rename, fsync of the folder).
fn write_seq_floor(path: &Path, floor: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = seq_floor_path(path);
    let tmp = PathBuf::from(format!("{}.tmp", file.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{floor}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file)?;
    sync_folder_of(&file)
}

/// Makes renames and removals in the folder holding `path` durable.
fn sync_folder_of(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

/// `path` with `suffix` appended to its file name (`spool.db` + `-wal`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Renames `from` to `to` when `from` exists; errors name the spool at `home`.
fn move_if_present(from: &Path, to: &Path, home: &Path) -> Result<(), SpoolError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SpoolError::folder(home, source)),
    }
}

/// Removes a SQLite file's log and index, where present.
fn remove_file_set_sides(path: &Path) -> std::io::Result<()> {
    for side in ["-wal", "-shm"] {
        match std::fs::remove_file(beside(path, side)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Removes a SQLite file with its log and index, where present.
fn remove_file_set(path: &Path) -> std::io::Result<()> {
    remove_file_set_sides(path)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves the damaged file set of a finished rebuild, `<path>.damaged`, to
/// `<path>.corrupt-<unix seconds>` (the file last: while it is there, the move is not done).
fn quarantine_damaged(path: &Path) -> Result<PathBuf, SpoolError> {
    let damaged = beside(path, ".damaged");
    let aside = beside(path, &format!(".corrupt-{}", crate::clock::now_secs()));
    for side in ["-wal", "-shm", ""] {
        move_if_present(&beside(&damaged, side), &beside(&aside, side), path)?;
    }
    sync_folder_of(path).map_err(|source| SpoolError::folder(path, source))?;
    Ok(aside)
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("spool {path}: schema version {found} is newer than this build understands ({SCHEMA_VERSION})")]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("spool {path}: cannot create it or its folder: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool {path}: a running agent holds the spool file (it keeps it to itself while it runs); ask that agent through its admin endpoint ([admin] listen), or stop it first")]
    Held { path: PathBuf },
    #[error("spool block {id} is corrupt: {reason}")]
    CorruptBlock { id: i64, reason: String },
    #[error("the spool thread has stopped")]
    Stopped,
}

impl SpoolError {
    /// A file or folder operation on the spool at `path` failed.
    pub(crate) fn folder(path: &Path, source: std::io::Error) -> SpoolError {
        SpoolError::Folder {
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the disk is full: the caller applies the full-spool policy and retries.
    /// True when SQLite finds the file damaged (or not a database at all).
    pub(crate) fn is_corrupt(&self) -> bool {
        matches!(self, SpoolError::Sqlite { source, .. } if matches!(source.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)))
    }

    /// Another connection holds the file (a running agent, see [`EXCLUSIVE_LOCKING`]): `e`
    /// as [`SpoolError::Held`] when SQLite found it busy.
    fn held_or(path: &Path, e: rusqlite::Error) -> SpoolError {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SpoolError::Held {
                path: path.to_path_buf(),
            },
            _ => SpoolError::Sqlite {
                path: path.to_path_buf(),
                source: e,
            },
        }
    }

    pub(crate) fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Sqlite { source, .. } if source.sqlite_error_code() == Some(ErrorCode::DiskFull))
    }
}

/// Why a message or record was dropped. Every drop is counted under one of these; the
/// `counters` table names them `dropped_<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// No route's topic filter matches the message's topic.
    NoRoute,
    /// The message is larger than `max_message_bytes` (kept as a dead letter).
    Oversize,
    /// Evicted by the `drop_oldest` policy to make room.
    SpoolFull,
    /// Its spool block could not be read back (quarantined).
    Corrupt,
    /// An operator removed the records of a route that no longer exists
    /// (`edgeship spool drop-route`).
    Removed,
    /// A record larger than its destination takes, however it is encoded (kept as a dead
    /// letter).
    Unshippable,
    /// An MQTT packet over the broker's `max_packet_bytes`: read past, never held whole.
    OversizePacket,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::NoRoute,
        DropReason::Oversize,
        DropReason::OversizePacket,
        DropReason::SpoolFull,
        DropReason::Corrupt,
        DropReason::Unshippable,
        DropReason::Removed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::Oversize => "oversize",
            DropReason::SpoolFull => "spool_full",
            DropReason::Corrupt => "corrupt",
            DropReason::Unshippable => "unshippable",
            DropReason::Removed => "removed",
            DropReason::OversizePacket => "oversize_packet",
        }
    }

    fn parse(text: &str) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One accounting term of a route: `received = delivered + dropped + pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    Received,
    Delivered,
    Dropped(DropReason),
}

impl Counter {
    /// Its name in the `counters` table.
    fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Counter::Received => "received".into(),
            Counter::Delivered => "delivered".into(),
            Counter::Dropped(reason) => format!("dropped_{}", reason.as_str()).into(),
        }
    }

    fn parse(name: &str) -> Option<Counter> {
        match name {
            "received" => Some(Counter::Received),
            "delivered" => Some(Counter::Delivered),
            other => DropReason::parse(other.strip_prefix("dropped_")?).map(Counter::Dropped),
        }
    }
}

/// route -> its destinations and the first record id each takes.
type Fanout = BTreeMap<String, Vec<(String, i64)>>;

/// How a destination finished with a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Accepted,
    Dropped(DropReason),
}

impl Outcome {
    fn counter(self) -> Counter {
        match self {
            Outcome::Accepted => Counter::Delivered,
            Outcome::Dropped(reason) => Counter::Dropped(reason),
        }
    }
}

/// What one destination's outcome did to a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub(crate) route: String,
    pub(crate) records: u32,
    /// The block left the spool, counted under this at the route level; `None` while other
    /// destinations still owe it.
    pub(crate) left: Option<Counter>,
}

/// A block removed for every destination (evicted, corrupt, removed by an operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removed {
    pub(crate) route: String,
    pub(crate) records: u32,
    /// The destinations that still owed it (each counts it dropped).
    pub(crate) owing: Vec<String>,
}

/// The `counters` route name of a (route, destination) pair.
pub(crate) fn pair_row(route: &str, destination: &str) -> String {
    format!("{route}/{destination}")
}

/// The (route, destination) of a `counters` route name, `None` for a route's own row.
pub(crate) fn split_pair_row(row: &str) -> Option<(&str, &str)> {
    row.split_once('/')
}

const FANOUT_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS fanout (
        route TEXT NOT NULL, destination TEXT NOT NULL, since INTEGER NOT NULL,
        PRIMARY KEY (route, destination)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS taken (
        block INTEGER NOT NULL, destination TEXT NOT NULL, dropped TEXT,
        PRIMARY KEY (block, destination)
    ) WITHOUT ROWID;";

// The `uploads` table and its rows (see `store/uploads.rs`).
const UPLOADS_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS uploads (
        destination TEXT PRIMARY KEY, route TEXT NOT NULL, key TEXT NOT NULL,
        first_block INTEGER NOT NULL, last_block INTEGER NOT NULL,
        upload_id TEXT, parts TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;";

/// One uploaded part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedPart {
    /// The ETag S3 answered, quotes included, as CompleteMultipartUpload wants it back.
    pub etag: String,
    /// The MD5 of the part's bytes (hex): a resumed upload re-encodes the object and skips
    /// a part only when its bytes are the same.
    pub md5: String,
}

/// An object fixed for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub destination: String,
    pub route: String,
    pub key: String,
    pub first_block: i64,
    pub last_block: i64,
    pub upload_id: Option<String>,
    pub parts: Vec<UploadedPart>,
}

/// A change to a destination's upload row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadChange {
    /// The object is fixed; its upload starts (replaces any earlier row of the destination).
    Begin(Upload),
    /// The multipart upload was created (`Some`), or was given up (`None`: start again).
    UploadId(Option<String>),
    /// One more part was uploaded.
    Part(UploadedPart),
}

/// How many dead letters are kept, and how many bytes of them: past either, the oldest go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeadLetterCap {
    pub(crate) records: u64,
    pub(crate) bytes: u64,
}

/// Uncompressed bytes of the blocks appended last that the store keeps to read them back
/// (see [`recent`]): at 1,000 msg/s of 200-byte messages, about five seconds of them.
const RECENT_BODY_BYTES: usize = 1 << 20;

/// What the shipper needs to plan a frame, without the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMeta {
    pub id: i64,
    pub route: String,
    /// Where the block goes: a partition key, or a bucket (see `spool/placement.rs`).
    pub key: String,
    /// The body encoding of its data: [`frame::VERSION_1`] or [`frame::VERSION_2`].
    pub version: u8,
    pub records: u32,
    pub raw_bytes: u32,
    pub stored_bytes: u32,
    pub created_ms: u64,
}

/// A record on its way into a block.
pub struct NewRecord<'a> {
    pub ts_ms: u64,
    /// Its key as the spool keeps it (see [`crate::key`]).
    pub key: &'a str,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// Accounting terms read from a spool file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Accounting {
    pub received: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub dropped_by_reason: std::collections::BTreeMap<String, u64>,
    pub pending: u64,
    pub pending_bytes: u64,
    pub dead_letters: u64,
    pub(crate) quarantined_blocks: u64,
    /// Each destination's own terms, by `route/destination`.
    #[serde(default)]
    pub destinations: BTreeMap<String, Terms>,
}

/// The accounting terms of one (route, destination) pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Terms {
    pub received: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub pending: u64,
}

impl Terms {
    fn add(&mut self, counter: Counter, value: u64) {
        match counter {
            Counter::Received => self.received += value,
            Counter::Delivered => self.delivered += value,
            Counter::Dropped(_) => self.dropped += value,
        }
    }

    pub fn balances(&self) -> bool {
        self.received == self.delivered + self.dropped + self.pending
    }
}

impl Accounting {
    /// The contract's equation: received = delivered + dropped + pending, for all routes
    /// together and for each (route, destination) pair.
    pub fn balances(&self) -> bool {
        self.received == self.delivered + self.dropped + self.pending
            && self.destinations.values().all(Terms::balances)
    }
}

/// The spool's figures as of the last commit, shared with readers on other threads (metrics,
/// status) so they never wait for the spool thread or query the file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Committed {
    /// (route, counter) -> value, as in the `counters` table.
    pub(crate) counters: BTreeMap<(String, Counter), u64>,
    /// route -> (records, stored bytes) still spooled.
    pub(crate) pending: BTreeMap<String, (u64, u64)>,
    pub(crate) dead_letters: u64,
    pub(crate) quarantined_blocks: u64,
    /// Receipt time (ms since the Unix epoch) of the oldest spooled record.
    pub(crate) oldest_pending_ms: Option<u64>,
    /// Where each route's records go, as last recorded: route -> (destinations, format).
    pub(crate) routes: BTreeMap<String, (Vec<String>, String)>,
    /// (route, destination, counter) -> value: each destination's own terms.
    pub(crate) pair_counters: BTreeMap<(String, String, Counter), u64>,
    /// (route, destination) -> (records, stored bytes) that destination still owes.
    pub(crate) pair_pending: BTreeMap<(String, String), (u64, u64)>,
}

impl Committed {
    /// The same terms [`read_accounting_at`] reads from the file.
    pub(crate) fn accounting(&self) -> Accounting {
        let mut acc = Accounting::default();
        for ((_, counter), value) in &self.counters {
            match counter {
                Counter::Received => acc.received += value,
                Counter::Delivered => acc.delivered += value,
                Counter::Dropped(reason) => {
                    acc.dropped += value;
                    *acc.dropped_by_reason
                        .entry(reason.as_str().to_string())
                        .or_insert(0) += value;
                }
            }
        }
        for (records, bytes) in self.pending.values() {
            acc.pending += records;
            acc.pending_bytes += bytes;
        }
        acc.dead_letters = self.dead_letters;
        acc.quarantined_blocks = self.quarantined_blocks;
        for ((route, dest, counter), value) in &self.pair_counters {
            acc.destinations
                .entry(pair_row(route, dest))
                .or_default()
                .add(*counter, *value);
        }
        for ((route, dest), (records, _)) in &self.pair_pending {
            acc.destinations
                .entry(pair_row(route, dest))
                .or_default()
                .pending += records;
        }
        acc
    }

    /// A counter of one route, 0 if it never moved.
    pub(crate) fn counter(&self, route: &str, counter: Counter) -> u64 {
        self.counters
            .get(&(route.to_string(), counter))
            .copied()
            .unwrap_or(0)
    }

    /// A counter of one (route, destination) pair, 0 if it never moved.
    pub(crate) fn pair_counter(&self, route: &str, destination: &str, counter: Counter) -> u64 {
        self.pair_counters
            .get(&(route.to_string(), destination.to_string(), counter))
            .copied()
            .unwrap_or(0)
    }

    /// The (route, destination) pairs with figures.
    pub(crate) fn pairs(&self) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = self
            .pair_counters
            .keys()
            .map(|(r, d, _)| (r.clone(), d.clone()))
            .chain(self.pair_pending.keys().cloned())
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    }
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    sync: SyncLevel,
    next_seq: u64,
    /// `next_seq` as the file's newest copy of the totals holds it: written again only when
    /// it moved, so a commit that stored nothing writes nothing.
    stored_next_seq: u64,
    /// `next_seq` as the `counters` table holds it.
    table_next_seq: Option<i64>,
    /// Every known counter's total as of the last commit.
    totals: BTreeMap<(String, Counter), i64>,
    /// The same as the `counters` table holds them (older while a block holds the newest).
    in_table: BTreeMap<(String, Counter), i64>,
    /// The generation of the newest copy of the totals (see [`ledger`]).
    generation: u64,
    /// The block holding the newest copy, when one does (else the table holds it).
    copy_on: Option<i64>,
    /// The block the open transaction appended last, and its row's bytes besides a copy.
    ledger_host: Option<(i64, usize)>,
    /// No sequence number at or above this has been issued; raised (on disk first) before
    /// one is.
    seq_floor: u64,
    /// Where `next_seq` starts at least: the floor, when this file is new or older than it.
    seq_start: u64,
    /// The `routes` table changed (or was never read): read it again at the next publish.
    routes_dirty: bool,
    pending_records: u64,
    pending_bytes: u64,
    /// The same, per route.
    pending_by_route: BTreeMap<String, (u64, u64)>,
    dead_letters: u64,
    /// Payload bytes the dead letters hold.
    dead_letter_bytes: u64,
    quarantined_blocks: u64,
    /// Published after every successful commit.
    committed: Arc<Mutex<Committed>>,
    compressor: zstd::bulk::Compressor<'static>,
    /// Kept for reading blocks back: a new one per block cost a context's set-up each time.
    decompressor: zstd::bulk::Decompressor<'static>,
    /// The bodies of the blocks appended last, read back without the file or zstd.
    recent: recent::RecentBodies<BlockMeta>,
    /// Counter changes of the open transaction, written just before commit (a pair's under
    /// its `route/destination` name).
    counter_deltas: HashMap<(String, Counter), i64>,
    /// Each route's destinations (the `fanout` table).
    fanout: Fanout,
    /// Records and bytes each (route, destination) still owes.
    pair_pending: BTreeMap<(String, String), (u64, u64)>,
}

/// What opening found: a corrupt file moved aside is reported, never silently replaced.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub(crate) quarantined_file: Option<PathBuf>,
    /// Records the corrupt file still held, now counted as dropped `corrupt`; `None` when its
    /// counters could not be read either.
    pub(crate) lost_records: Option<u64>,
    /// What the integrity check said about a file that opened but is damaged (its first
    /// findings).
    pub(crate) damage: Vec<String>,
    /// Blocks and records read back from the damaged file into the new one (same ids).
    pub(crate) salvaged_blocks: u64,
    pub(crate) salvaged_records: u64,
    /// The integrity check ran out of time (a large spool on a slow card) and was left.
    pub(crate) check_unfinished: bool,
    /// The file had pages of this size and was rewritten with [`PAGE_SIZE`].
    pub(crate) converted_from_page_size: Option<u32>,
    /// The file has pages of another size than [`PAGE_SIZE`] and keeps them (too large to
    /// convert at open, or the conversion failed: the reason).
    pub(crate) kept_page_size: Option<(u32, String)>,
}

/// Page size of a new spool file. Each commit logs every page it changed in full, and a
/// slow stream's commit changes a few pages for a few hundred bytes of records, so at low
/// rates the page is what a commit costs the flash: 1 KiB pages write a third to a quarter of
/// what SQLite's default 4 KiB write at 20 msg/s (benches/MEASURED.md, "Smaller spool
/// pages"), and cost nothing measurable at saturation (a block of many records spans
/// overflow pages either way). A
/// file keeps the page size it was made with (WAL mode cannot change it); a small one is
/// converted at open (see [`CONVERT_PAGES_UP_TO`]).
pub(crate) const PAGE_SIZE: u32 = 1024;

/// The largest row of `blocks` SQLite keeps whole in its page (a table leaf cell's local
/// payload: the page less 35 bytes); a larger one spills into overflow pages. A commit's
/// copy of the totals goes onto its block only while the row stays within this.
const LEDGER_HOST_ROW_BYTES: usize = PAGE_SIZE as usize - 35;

/// A `blocks` row's bytes besides its route, key, data and copy of the totals, at most: the
/// record header and the integers.
const ROW_FIXED_BYTES: usize = 40;

/// Pages the write-ahead log may hold before it is copied into the file: 4 MiB of them, with
/// one transaction's pages on top what the disk reserve must cover for the spool to shrink on
/// a full disk.
pub(crate) const WAL_CHECKPOINT_PAGES: u32 = (4 << 20) / PAGE_SIZE;
/// The spool's connection holds the file exclusively (`PRAGMA locking_mode = EXCLUSIVE`, set
/// before WAL mode): SQLite then keeps the write-ahead log's index in the agent's memory
/// instead of a -shm file every process maps. Each commit wrote that file's header and hash
/// pages, and the kernel counts a page written again after its writeback as written again:
/// at 20 msg/s with a minute's `max_linger` the -shm file took 10 of the 34 pages the spool
/// dirtied in 70 s (benches/MEASURED.md, 2026-12-07 afternoon). The cost: no other process
/// opens the file while the agent runs, so `edgeship status` asks the agent's admin
/// endpoint, and [`read_accounting_at`] says the agent holds the file.
const EXCLUSIVE_LOCKING: &str = "PRAGMA locking_mode = EXCLUSIVE;";

/// Prepared statements kept: room for every one the spool prepares (about 30; rusqlite's
/// default keeps 16), so none is parsed again.
const STATEMENT_CACHE: usize = 64;

/// A spool file made with another page size (an agent before 1 KiB pages) is rewritten with
/// [`PAGE_SIZE`] at open when it is at most this large (`VACUUM`: a copy of the file, made in
/// a crash-safe rollback-journal transaction); a larger one keeps its pages rather than make
/// a start wait on a backlog's copy (it converts at a later start, once drained).
pub(crate) const CONVERT_PAGES_UP_TO: u64 = 16 << 20;

/// How long the integrity check at open may take: past it, the agent starts unchecked (and
/// says so) rather than keep a gateway from shipping.
pub(crate) const QUICK_CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What `PRAGMA quick_check` found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Health {
    Sound,
    /// Its findings, at most twenty.
    Damaged(Vec<String>),
    /// Interrupted at the time limit.
    Unchecked,
}

/// Creates the spool file readable and writable by its owner only (records are data the
/// gateway's other users have no business reading), or takes group and other access away
/// from an existing one. SQLite gives its -wal and -shm files the database file's mode.
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(drop),
        Err(e) => Err(e),
    }
}

impl Store {
    /// Opens (or creates) the spool and checks it (`PRAGMA quick_check`, at most
    /// [`QUICK_CHECK_LIMIT`]). A file SQLite reports as corrupt, not a database, or damaged is
    /// renamed to `<path>.corrupt-<unix seconds>`; a fresh spool takes its place with what
    /// could be read back from it (counters, routes, every block that reads and decodes,
    /// under its own id), and the records that could not are counted dropped `corrupt`.
    pub fn open(path: &Path, sync: SyncLevel) -> Result<(Store, OpenReport), SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SpoolError::folder(path, source))?;
        }
        if let Some(rebuilt) = Store::finish_interrupted_rebuild(path, sync)? {
            return Ok(rebuilt);
        }
        let mut report = OpenReport::default();
        match Store::open_inner(path, sync) {
            Ok(mut store) => match store.check(QUICK_CHECK_LIMIT)? {
                Health::Sound => {
                    store.settle_page_size(CONVERT_PAGES_UP_TO, &mut report);
                    Ok((store, report))
                }
                Health::Unchecked => {
                    report.check_unfinished = true;
                    Ok((store, report))
                }
                Health::Damaged(findings) => {
                    report.damage = findings;
                    drop(store);
                    Store::replace(path, sync, report)
                }
            },
            Err(e) if e.is_corrupt() => Store::replace(path, sync, report),
            Err(e) => Err(e),
        }
    }

    /// Rewrites a sound file whose pages are not [`PAGE_SIZE`] with that size when it is at
    /// most `up_to` bytes (see [`CONVERT_PAGES_UP_TO`]); says in `report` what it did. A
    /// failed conversion (a full disk) leaves the file as it was: SQLite rolls the `VACUUM`
    /// back, and the spool goes on with its old pages.
    fn settle_page_size(&mut self, up_to: u64, report: &mut OpenReport) {
        let size = |conn: &Connection| {
            conn.query_row("PRAGMA page_size", [], |r| r.get::<_, u32>(0))
                .and_then(|size| {
                    conn.query_row("PRAGMA page_count", [], |r| r.get::<_, u64>(0))
                        .map(|pages| (size, pages))
                })
        };
        let (from, pages) = match size(&self.conn) {
            Ok((s, _)) if s == PAGE_SIZE => return,
            Ok(found) => found,
            Err(e) => {
                report.kept_page_size = Some((0, e.to_string()));
                return;
            }
        };
        let bytes = u64::from(from) * pages;
        if bytes > up_to {
            report.kept_page_size = Some((
                from,
                format!("{bytes} bytes: converted at a start once it holds at most {up_to}"),
            ));
            return;
        }
        let converted = self.conn.execute_batch(&format!(
            "PRAGMA journal_mode = DELETE;
             PRAGMA page_size = {PAGE_SIZE};
             VACUUM;"
        ));
        // Back to the log whatever happened (a failed VACUUM changed nothing).
        let wal = self.conn.execute_batch("PRAGMA journal_mode = WAL;");
        match converted.and(wal).and_then(|()| size(&self.conn)) {
            Ok((now, _)) if now == PAGE_SIZE => report.converted_from_page_size = Some(from),
            Ok((now, _)) => report.kept_page_size = Some((now, "SQLite kept it".into())),
            Err(e) => report.kept_page_size = Some((from, e.to_string())),
        }
    }

    /// Checks the open file while the agent runs (after commits keep failing): at most
    /// `limit`.
    pub(crate) fn check(&self, limit: std::time::Duration) -> Result<Health, SpoolError> {
        let interrupt = self.conn.get_interrupt_handle();
        let (done, timer) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = timer.recv_timeout(limit) {
                interrupt.interrupt();
            }
        });
        let findings: rusqlite::Result<Vec<String>> = self
            .conn
            .prepare("PRAGMA quick_check(20)")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
        drop(done);
        let _ = watchdog.join();
        match findings {
            Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(Health::Sound),
            Ok(lines) => Ok(Health::Damaged(lines)),
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {
                Ok(Health::Unchecked)
            }
            Err(e) => {
                let e = self.err(e);
                if e.is_corrupt() {
                    Ok(Health::Damaged(vec![e.to_string()]))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Rebuilds the spool this store has open, found damaged while the agent runs: as at
    /// open, what reads back is carried into a new file that takes the damaged one's place
    /// (see [`Store::replace`] for the steps and what a crash between them leaves).
    pub(crate) fn rebuild(&mut self) -> Result<OpenReport, SpoolError> {
        // The damaged connection closes before its files are renamed: SQLite removes a log
        // by its name when the last connection closes.
        let placeholder = Connection::open_in_memory().map_err(|e| self.err(e))?;
        drop(std::mem::replace(&mut self.conn, placeholder));
        let (store, report) = Store::replace(&self.path, self.sync, OpenReport::default())?;
        *self = store;
        Ok(report)
    }

    /// Moves the damaged file aside and rebuilds the spool at `path` from it. Each step can be
    /// cut off by a crash and is finished or redone at the next open
    /// ([`Store::finish_interrupted_rebuild`]): the damaged file set moves to
    /// `<path>.damaged` (its log and index first, the file last); the new spool is built
    /// complete at `<path>.rebuilt`, made durable and renamed to `path`; only then does the
    /// damaged set move on to `<path>.corrupt-<unix seconds>`. At no moment is `path` a spool
    /// that lacks records the damaged one could give.
    fn replace(
        path: &Path,
        sync: SyncLevel,
        report: OpenReport,
    ) -> Result<(Store, OpenReport), SpoolError> {
        let damaged = beside(path, ".damaged");
        for side in ["-wal", "-shm", ""] {
            move_if_present(&beside(path, side), &beside(&damaged, side), path)?;
        }
        sync_folder_of(path).map_err(|source| SpoolError::folder(path, source))?;
        Store::rebuild_from_damaged(path, sync, report)
    }

    /// Builds the spool at `path` from `<path>.damaged` (see [`Store::replace`]).
    fn rebuild_from_damaged(
        path: &Path,
        sync: SyncLevel,
        mut report: OpenReport,
    ) -> Result<(Store, OpenReport), SpoolError> {
        let damaged = beside(path, ".damaged");
        let rebuilt = beside(path, ".rebuilt");
        remove_file_set(&rebuilt).map_err(|source| SpoolError::folder(&rebuilt, source))?;
        let mut store = Store::open_file(&rebuilt, path, sync)?;
        let (lost, blocks, records) = store.salvage(&damaged)?;
        store.truncate_wal();
        drop(store);
        // Closed: SQLite has copied its log into the file and removed it.
        std::fs::File::open(&rebuilt)
            .and_then(|f| f.sync_all())
            .and_then(|()| remove_file_set_sides(&rebuilt))
            .and_then(|()| std::fs::rename(&rebuilt, path))
            .and_then(|()| sync_folder_of(path))
            .map_err(|source| SpoolError::folder(path, source))?;
        let aside = quarantine_damaged(path)?;
        let store = Store::open_inner(path, sync)?;
        report.lost_records = lost;
        report.salvaged_blocks = blocks;
        report.salvaged_records = records;
        report.quarantined_file = Some(aside);
        Ok((store, report))
    }

    /// Finishes a rebuild a crash cut off (see [`Store::replace`]); `Some` when it had to
    /// build the spool again from the damaged file.
    fn finish_interrupted_rebuild(
        path: &Path,
        sync: SyncLevel,
    ) -> Result<Option<(Store, OpenReport)>, SpoolError> {
        let damaged = beside(path, ".damaged");
        let rebuilt = beside(path, ".rebuilt");
        if damaged.exists() {
            if path.exists() {
                // The new spool is in place; only the damaged file's last move is left.
                let aside = quarantine_damaged(path)?;
                tracing::warn!(spool = %path.display(), moved_to = %aside.display(), "finished a spool rebuild that was cut off after the new file was in place");
                return Ok(None);
            }
            tracing::warn!(spool = %path.display(), "a spool rebuild was cut off; building the spool from the damaged file again");
            return Store::rebuild_from_damaged(path, sync, OpenReport::default()).map(Some);
        }
        // Cut off while the damaged file set was moving: its log and index go back.
        for side in ["-wal", "-shm"] {
            let moved = beside(&damaged, side);
            if moved.exists() && !beside(path, side).exists() {
                move_if_present(&moved, &beside(path, side), path)?;
            }
        }
        remove_file_set(&rebuilt).map_err(|source| SpoolError::folder(&rebuilt, source))?;
        Ok(None)
    }

    fn open_inner(path: &Path, sync: SyncLevel) -> Result<Store, SpoolError> {
        Store::open_file(path, path, sync)
    }

    /// Opens the SQLite file `file` as the spool whose home is `home` (they differ while a
    /// rebuild builds the new file beside the damaged one): the sequence floor and error
    /// messages are the home's.
    fn open_file(file: &Path, home: &Path, sync: SyncLevel) -> Result<Store, SpoolError> {
        let path = home;
        let err = |source| SpoolError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        restrict_to_owner(file).map_err(|source| SpoolError::folder(file, source))?;
        let conn = Connection::open(file).map_err(err)?;
        // Every statement of a turn stays prepared, `BEGIN` and `COMMIT` included (parsing
        // them again each commit was about 1% of the agent's CPU at 1,000 msg/s).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let sync_pragma = match sync {
            SyncLevel::Off => "OFF",
            SyncLevel::Normal => "NORMAL",
            SyncLevel::Full => "FULL",
        };
        // The write-ahead log's index in this process's memory, not in a shared -shm file:
        // see [`EXCLUSIVE_LOCKING`]. Set before the first access in WAL mode, or SQLite maps
        // the file.
        conn.execute_batch(&format!(
            "{EXCLUSIVE_LOCKING}
             PRAGMA page_size = {PAGE_SIZE};
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {sync_pragma};
             PRAGMA busy_timeout = 5000;
             PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES};
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS blocks (
                 id INTEGER PRIMARY KEY,
                 route TEXT NOT NULL,
                 key TEXT NOT NULL,
                 records INTEGER NOT NULL,
                 raw_bytes INTEGER NOT NULL,
                 created_ms INTEGER NOT NULL,
                 data BLOB NOT NULL,
                 body_version INTEGER NOT NULL DEFAULT 1,
                 ledger BLOB
             );
             CREATE TABLE IF NOT EXISTS counters (
                 route TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
                 PRIMARY KEY (route, name)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS dead_letters (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 ts_ms INTEGER NOT NULL, route TEXT NOT NULL, topic TEXT NOT NULL,
                 reason TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS quarantine (
                 id INTEGER PRIMARY KEY, route TEXT NOT NULL, records INTEGER NOT NULL,
                 reason TEXT NOT NULL, data BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS routes (
                 route TEXT PRIMARY KEY, destination TEXT NOT NULL, format TEXT NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS mqtt_qos2_receipts (
                 broker TEXT NOT NULL, pkid INTEGER NOT NULL, PRIMARY KEY (broker, pkid)
             ) WITHOUT ROWID;
             {}
             {}",
            FANOUT_SCHEMA,
            UPLOADS_SCHEMA
        ))
        .map_err(|e| SpoolError::held_or(path, e))?;
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(err)?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(SpoolError::NewerSchema {
                    path: path.to_path_buf(),
                    found: v,
                });
            }
            Some(v) => {
                if !has_body_version(&conn) {
                    conn.execute_batch(
                        "ALTER TABLE blocks ADD COLUMN body_version INTEGER NOT NULL DEFAULT 1",
                    )
                    .map_err(err)?;
                }
                if !ledger::has_ledger_column(&conn) {
                    conn.execute_batch("ALTER TABLE blocks ADD COLUMN ledger BLOB")
                        .map_err(err)?;
                }
                if v < SCHEMA_VERSION {
                    conn.execute(
                        "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                        [SCHEMA_VERSION],
                    )
                    .map_err(err)?;
                }
            }
        }
        let ledger = ledger::read(&conn).map_err(err)?;
        let stored = ledger.next_seq;
        let stored_next = stored.unwrap_or(1);
        let seq_floor = read_seq_floor(path);
        // A new file (a first start, or one that replaced a lost or corrupt spool), or one
        // older than the floor (restored from a copy), starts at the floor.
        let seq_start = match stored {
            None => seq_floor,
            Some(n) if seq_floor > (n.max(0) as u64).saturating_add(2 * SEQ_RESERVE) => seq_floor,
            Some(_) => 0,
        };
        let max_end: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(id + records), 1) FROM blocks",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let known = |map: &BTreeMap<(String, String), i64>| {
            map.iter()
                .filter_map(|((route, name), value)| {
                    Some(((route.clone(), Counter::parse(name)?), *value))
                })
                .collect::<BTreeMap<_, _>>()
        };
        for (route, name) in ledger.totals.keys() {
            if Counter::parse(name).is_none() {
                tracing::warn!(%route, counter = %name, "the spool holds a counter this build does not know; left out of the figures");
            }
        }
        let compressor = zstd::bulk::Compressor::new(1).expect("zstd level 1 is valid");
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            sync,
            next_seq: (stored_next.max(max_end) as u64).max(seq_start),
            stored_next_seq: stored_next as u64,
            table_next_seq: ledger.table_next_seq,
            totals: known(&ledger.totals),
            in_table: known(&ledger.table),
            generation: ledger.generation,
            copy_on: ledger.copy_on,
            ledger_host: None,
            seq_floor,
            seq_start,
            routes_dirty: true,
            pending_records: 0,
            pending_bytes: 0,
            pending_by_route: BTreeMap::new(),
            dead_letters: 0,
            dead_letter_bytes: 0,
            quarantined_blocks: 0,
            committed: Arc::default(),
            compressor,
            decompressor: zstd::bulk::Decompressor::new().expect("a zstd context"),
            recent: recent::RecentBodies::new(RECENT_BODY_BYTES),
            counter_deltas: HashMap::new(),
            fanout: BTreeMap::new(),
            pair_pending: BTreeMap::new(),
        };
        store.load_fanout()?;
        let unadopted: i64 = store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM routes r WHERE NOT EXISTS (SELECT 1 FROM fanout f WHERE f.route = r.route)",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        if unadopted > 0 {
            store.begin()?;
            let adopted = store.adopt_recorded_routes().and_then(|()| store.commit());
            if let Err(e) = adopted {
                store.rollback();
                return Err(e);
            }
            store.load_fanout()?;
        }
        store.reload_totals()?;
        let counters = store
            .totals
            .iter()
            .map(|(k, v)| (k.clone(), (*v).max(0) as u64))
            .collect();
        store.publish(Some(counters));
        Ok(store)
    }

    /// The figures of the last commit, for other threads.
    pub(crate) fn committed(&self) -> Arc<Mutex<Committed>> {
        self.committed.clone()
    }

    fn add_pending(&mut self, route: &str, records: u64, bytes: u64) {
        self.pending_records += records;
        self.pending_bytes += bytes;
        let p = self.pending_by_route.entry(route.to_string()).or_default();
        p.0 += records;
        p.1 += bytes;
    }

    fn sub_pending(&mut self, route: &str, records: u64, bytes: u64) {
        self.pending_records -= records;
        self.pending_bytes -= bytes;
        if let Some(p) = self.pending_by_route.get_mut(route) {
            p.0 = p.0.saturating_sub(records);
            p.1 = p.1.saturating_sub(bytes);
        }
    }

    /// The QoS 2 packet ids of `broker` spooled and not released yet.
    pub(crate) fn qos2_receipts(&self, broker: &str) -> Result<Vec<u16>, SpoolError> {
        self.conn
            .prepare_cached("SELECT pkid FROM mqtt_qos2_receipts WHERE broker = ?1")
            .and_then(|mut s| s.query_map([broker], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))
    }

    /// Remembers a QoS 2 message's packet id, in the open transaction that spools it.
    pub(crate) fn add_qos2_receipt(&mut self, broker: &str, pkid: u16) -> Result<(), SpoolError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO mqtt_qos2_receipts (broker, pkid) VALUES (?1, ?2)",
            )
            .and_then(|mut s| s.execute(params![broker, pkid]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Forgets one packet id of `broker` (its PUBREL came), or all of them (`None`: the
    /// broker kept no session), in the open transaction.
    pub(crate) fn remove_qos2_receipts(
        &mut self,
        broker: &str,
        pkid: Option<u16>,
    ) -> Result<(), SpoolError> {
        let r = match pkid {
            Some(pkid) => self
                .conn
                .prepare_cached("DELETE FROM mqtt_qos2_receipts WHERE broker = ?1 AND pkid = ?2")
                .and_then(|mut s| s.execute(params![broker, pkid])),
            None => self
                .conn
                .prepare_cached("DELETE FROM mqtt_qos2_receipts WHERE broker = ?1")
                .and_then(|mut s| s.execute(params![broker])),
        };
        r.map(drop).map_err(|e| self.err(e))
    }

    /// Records where each route's records go (destination and format), so records of a
    /// route a later config removes can still find their destination. Writes only what
    /// changed, in the open transaction.
    pub(crate) fn record_routes(
        &mut self,
        routes: &BTreeMap<String, (Vec<String>, String)>,
    ) -> Result<bool, SpoolError> {
        let known = self
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .routes
            .clone();
        let mut changed = false;
        for (route, (dests, format)) in routes {
            let Some(first) = dests.first() else { continue };
            if known.get(route).map(|(d, f)| (d.first(), f)) != Some((Some(first), format)) {
                self.conn
                    .prepare_cached(
                        "INSERT INTO routes (route, destination, format) VALUES (?1, ?2, ?3)
                         ON CONFLICT (route) DO UPDATE SET destination = excluded.destination, format = excluded.format",
                    )
                    .and_then(|mut s| s.execute(params![route, first, format]))
                    .map_err(|e| self.err(e))?;
                changed = true;
            }
            changed |= self.record_fanout(route, dests)?;
        }
        self.routes_dirty |= changed;
        Ok(changed)
    }

    /// Removes every pending block of `route`, counting its records as dropped `removed`;
    /// returns how many records that was. For routes that no longer exist, by an operator.
    pub fn drop_route(&mut self, route: &str) -> Result<u64, SpoolError> {
        let ids: Vec<i64> = self
            .conn
            .prepare("SELECT id FROM blocks WHERE route = ?1")
            .and_then(|mut s| s.query_map([route], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        self.begin()?;
        let mut records = 0;
        for id in ids {
            match self.remove_for_all(id, DropReason::Removed) {
                Ok(Some(removed)) => records += u64::from(removed.records),
                Ok(None) => {}
                Err(e) => {
                    self.rollback();
                    return Err(e);
                }
            }
        }
        self.commit()?;
        Ok(records)
    }

    /// Publishes the committed figures: `counters` replaces the totals (at open), otherwise
    /// the deltas of the transaction that just committed are added.
    fn publish(&mut self, counters: Option<BTreeMap<(String, Counter), u64>>) {
        let oldest: Option<i64> = self
            .conn
            .prepare_cached("SELECT created_ms FROM blocks ORDER BY id LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .unwrap_or(None);
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut *c;
        fn add(c: &mut Committed, row: &str, counter: Counter, delta: i64) {
            let v = match split_pair_row(row) {
                Some((route, dest)) => c
                    .pair_counters
                    .entry((route.to_string(), dest.to_string(), counter))
                    .or_insert(0),
                None => c.counters.entry((row.to_string(), counter)).or_insert(0),
            };
            *v = v.saturating_add_signed(delta);
        }
        match counters {
            Some(all) => {
                c.counters.clear();
                c.pair_counters.clear();
                for ((row, counter), value) in all {
                    add(c, &row, counter, value as i64);
                }
            }
            None => {
                for ((row, counter), delta) in &self.counter_deltas {
                    add(c, row, *counter, *delta);
                }
            }
        }
        if std::mem::take(&mut self.routes_dirty) {
            let routes: Result<Vec<(String, String, String)>, _> = self
                .conn
                .prepare_cached("SELECT route, destination, format FROM routes")
                .and_then(|mut st| {
                    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                });
            if let Ok(routes) = routes {
                c.routes = routes
                    .into_iter()
                    .map(|(route, dest, format)| {
                        // The recorded destination is the route's first (it places the
                        // route's blocks); the others follow.
                        let mut dests = vec![dest];
                        for (d, _) in self.fanout.get(&route).into_iter().flatten() {
                            if !dests.contains(d) {
                                dests.push(d.clone());
                            }
                        }
                        (route, (dests, format))
                    })
                    .collect();
            }
        }
        c.pending.clone_from(&self.pending_by_route);
        c.pair_pending.clone_from(&self.pair_pending);
        c.dead_letters = self.dead_letters;
        c.quarantined_blocks = self.quarantined_blocks;
        c.oldest_pending_ms = oldest.map(|ms| ms.max(0) as u64);
    }

    fn err(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn pending_records(&self) -> u64 {
        self.pending_records
    }
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    pub fn begin(&mut self) -> Result<(), SpoolError> {
        self.counter_deltas.clear();
        self.ledger_host = None;
        self.conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]))
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Writes the counters' totals and `next_seq` (onto the block this transaction appended
    /// when they fit in its page, else into the `counters` table; see [`ledger`]), then
    /// commits.
    pub fn commit(&mut self) -> Result<(), SpoolError> {
        let mut totals = None;
        for ((route, counter), delta) in &self.counter_deltas {
            if *delta != 0 {
                *totals
                    .get_or_insert_with(|| self.totals.clone())
                    .entry((route.clone(), *counter))
                    .or_insert(0) += delta;
            }
        }
        let write = totals.is_some()
            || self.next_seq != self.stored_next_seq
            || self.copy_on.is_some_and(|id| !self.newest_copy_is_on(id));
        let totals = match (write, totals) {
            (true, None) => self.totals.clone(),
            (_, totals) => totals.unwrap_or_default(),
        };
        let generation = self.generation + 1;
        let result = (|| {
            let mut hosted = None;
            if write {
                if let Some((id, row_bytes)) = self.ledger_host {
                    let copy = ledger::encode(
                        generation,
                        self.next_seq,
                        totals.iter().map(|((r, c), v)| (r.as_str(), c.name(), *v)),
                    );
                    if row_bytes + copy.len() <= LEDGER_HOST_ROW_BYTES {
                        let changed = self
                            .conn
                            .prepare_cached("UPDATE blocks SET ledger = ?1 WHERE id = ?2")?
                            .execute(params![copy, id])?;
                        hosted = (changed == 1).then_some(id);
                    }
                }
                if hosted.is_none() {
                    self.write_table(generation, &totals)?;
                }
            }
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(hosted)
        })();
        self.ledger_host = None;
        match result {
            Ok(hosted) => {
                if write {
                    self.generation = generation;
                    self.stored_next_seq = self.next_seq;
                    self.copy_on = hosted;
                    if hosted.is_none() {
                        self.in_table.clone_from(&totals);
                        self.table_next_seq = Some(self.next_seq as i64);
                    }
                    self.totals = totals;
                }
                self.publish(None);
                self.counter_deltas.clear();
                Ok(())
            }
            Err(e) => {
                self.counter_deltas.clear();
                Err(self.err(e))
            }
        }
    }

    /// Brings the `counters` table to `totals` (what changed since it was last written).
    fn write_table(
        &mut self,
        generation: u64,
        totals: &BTreeMap<(String, Counter), i64>,
    ) -> rusqlite::Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO counters (route, name, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (route, name) DO UPDATE SET value = excluded.value",
        )?;
        for ((route, counter), value) in totals {
            if self.in_table.get(&(route.clone(), *counter)) != Some(value) {
                stmt.execute(params![route, counter.name(), value])?;
            }
        }
        if self.table_next_seq != Some(self.next_seq as i64) {
            stmt.execute(params!["", "next_seq", self.next_seq as i64])?;
        }
        stmt.execute(params!["", ledger::GENERATION_ROW, generation as i64])?;
        Ok(())
    }

    /// Whether block `id` still holds the newest copy of the totals: it is the newest block
    /// and has a copy (a split or a delete in this transaction may have taken it).
    fn newest_copy_is_on(&self, id: i64) -> bool {
        self.conn
            .prepare_cached("SELECT id, ledger IS NOT NULL FROM blocks ORDER BY id DESC LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?))))
            .is_ok_and(|newest| newest == (id, true))
    }

    /// Undoes the open transaction; the caller must also forget what it did in memory, which
    /// is why [`Store::reload_totals`] exists.
    pub(crate) fn rollback(&mut self) {
        self.counter_deltas.clear();
        self.ledger_host = None;
        // Blocks this transaction appended are gone, and their ids will be used again.
        self.recent.clear();
        let _ = self.conn.execute_batch("ROLLBACK");
        let _ = self.reload_totals();
    }

    fn reload_totals(&mut self) -> Result<(), SpoolError> {
        let next: i64 = self
            .conn
            .query_row(
                "SELECT MAX(?1, COALESCE(MAX(id + records), 1)) FROM blocks",
                [self.stored_next_seq as i64],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        self.next_seq = (next as u64).max(self.seq_start);
        let by_route: Vec<(String, i64, i64)> = self
            .conn
            .prepare("SELECT route, SUM(records), SUM(LENGTH(data)) FROM blocks GROUP BY route")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        self.pending_records = 0;
        self.pending_bytes = 0;
        self.pending_by_route.clear();
        for (route, records, bytes) in by_route {
            self.add_pending(&route, records as u64, bytes as u64);
        }
        self.load_fanout()?;
        self.reload_pair_pending()?;
        let (count, bytes): (i64, i64) = self
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM dead_letters",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        self.dead_letters = count as u64;
        self.dead_letter_bytes = bytes as u64;
        self.quarantined_blocks = self
            .conn
            .query_row("SELECT COUNT(*) FROM quarantine", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| self.err(e))? as u64;
        Ok(())
    }

    /// Adds `delta` to a counter within the open transaction.
    pub(crate) fn count(&mut self, route: &str, counter: Counter, delta: u64) {
        *self
            .counter_deltas
            .entry((route.to_string(), counter))
            .or_insert(0) += delta as i64;
    }

    /// Stores records as one block, giving them consecutive sequence numbers; counts them as
    /// received. Returns the block's metadata.
    pub fn append_block(
        &mut self,
        route: &str,
        key: &str,
        records: &[NewRecord<'_>],
        body: &mut Vec<u8>,
    ) -> Result<BlockMeta, SpoolError> {
        body.clear();
        let first = self.next_seq;
        self.reserve_seqs(records.len() as u64)?;
        for (i, r) in records.iter().enumerate() {
            frame::encode_record_v2(body, first + i as u64, r.ts_ms, r.key, r.topic, r.payload);
        }
        let data = self
            .compressor
            .compress(body)
            .map_err(|e| SpoolError::CorruptBlock {
                id: first as i64,
                reason: format!("compress: {e}"),
            })?;
        let created_ms = records.first().map_or(0, |r| r.ts_ms);
        let meta = BlockMeta {
            id: first as i64,
            route: route.to_string(),
            key: key.to_string(),
            version: frame::VERSION_2,
            records: records.len() as u32,
            raw_bytes: body.len() as u32,
            stored_bytes: data.len() as u32,
            created_ms,
        };
        self.conn
            .prepare_cached(
                "INSERT INTO blocks (id, route, key, records, raw_bytes, created_ms, data, body_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![meta.id, route, key, meta.records, meta.raw_bytes, created_ms as i64, data, meta.version])
            })
            .map_err(|e| self.err(e))?;
        // The route's blocks not yet delivered, uncompressed (by this block's ratio).
        let queued = self.pending_by_route.get(route).map_or(0, |p| p.1);
        let queued = queued.saturating_mul(body.len() as u64) / (data.len() as u64).max(1);
        self.recent.remember(meta.id, meta.clone(), body, queued);
        self.next_seq += records.len() as u64;
        self.ledger_host = Some((
            meta.id,
            data.len() + route.len() + key.len() + ROW_FIXED_BYTES,
        ));
        self.add_pending(route, records.len() as u64, data.len() as u64);
        self.count(route, Counter::Received, records.len() as u64);
        self.bind_new(route, meta.id, records.len() as u64, data.len() as u64);
        Ok(meta)
    }

    /// Replaces a block by two of about half its records each, with the same sequence numbers
    /// (for a block that encodes larger than its destination takes). Returns the new blocks;
    /// a block of one record, or one that is gone, is returned as it is (or not at all).
    pub(crate) fn split_block(
        &mut self,
        id: i64,
        body: &mut Vec<u8>,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        let Some((meta, raw)) = self.read_block(id)? else {
            return Ok(Vec::new());
        };
        let records = frame::decode_records_in(&raw, meta.records, meta.version).map_err(|e| {
            SpoolError::CorruptBlock {
                id,
                reason: e.to_string(),
            }
        })?;
        if records.len() < 2 {
            return Ok(vec![meta]);
        }
        let (left, right) = records.split_at(records.len() / 2);
        self.recent.forget(id);
        self.begin()?;
        let result = (|| {
            self.conn
                .execute("DELETE FROM blocks WHERE id = ?1", [id])
                .map_err(|e| self.err(e))?;
            self.sub_pending(
                &meta.route,
                u64::from(meta.records),
                u64::from(meta.stored_bytes),
            );
            let a = self.insert_block(&meta.route, &meta.key, meta.version, left, body)?;
            let b = self.insert_block(&meta.route, &meta.key, meta.version, right, body)?;
            let halves = vec![a, b];
            self.rebind_split(&meta, &halves)?;
            Ok(halves)
        })();
        match result {
            Ok(parts) => {
                self.commit()?;
                Ok(parts)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Stores records that keep their sequence numbers (a split block's) as one block.
    fn insert_block(
        &mut self,
        route: &str,
        key: &str,
        version: u8,
        records: &[frame::Record],
        body: &mut Vec<u8>,
    ) -> Result<BlockMeta, SpoolError> {
        body.clear();
        for r in records {
            frame::encode_record_in(body, version, r);
        }
        let id = records.first().map_or(0, |r| r.seq) as i64;
        let data = self
            .compressor
            .compress(body)
            .map_err(|e| SpoolError::CorruptBlock {
                id,
                reason: format!("compress: {e}"),
            })?;
        let created_ms = records.first().map_or(0, |r| r.ts_ms);
        let meta = BlockMeta {
            id,
            route: route.to_string(),
            key: key.to_string(),
            version,
            records: records.len() as u32,
            raw_bytes: body.len() as u32,
            stored_bytes: data.len() as u32,
            created_ms,
        };
        self.conn
            .prepare_cached(
                "INSERT INTO blocks (id, route, key, records, raw_bytes, created_ms, data, body_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![meta.id, route, key, meta.records, meta.raw_bytes, created_ms as i64, data, meta.version])
            })
            .map_err(|e| self.err(e))?;
        self.add_pending(route, records.len() as u64, data.len() as u64);
        Ok(meta)
    }

    /// A block `dest` cannot take (each record larger than its record limit, however
    /// encoded): dropped `unshippable` for it. When no other destination owes the block, its
    /// records move to the dead letters.
    pub(crate) fn dead_letter_block(
        &mut self,
        dest: &str,
        id: i64,
        cap: DeadLetterCap,
    ) -> Result<Option<Settled>, SpoolError> {
        let Some((meta, raw)) = self.read_block(id)? else {
            return Ok(None);
        };
        let owing = self.owing(&meta.route, id)?;
        if owing.iter().any(|d| d != dest) {
            self.begin()?;
            let r = self.settle(dest, id, Outcome::Dropped(DropReason::Unshippable));
            return match r {
                Ok(settled) => {
                    self.commit()?;
                    Ok(settled)
                }
                Err(e) => {
                    self.rollback();
                    Err(e)
                }
            };
        }
        let records = frame::decode_records_in(&raw, meta.records, meta.version).map_err(|e| {
            SpoolError::CorruptBlock {
                id,
                reason: e.to_string(),
            }
        })?;
        self.begin()?;
        let result = (|| {
            for r in &records {
                self.keep_dead_letter(
                    &meta.route,
                    r.ts_ms,
                    &r.topic,
                    DropReason::Unshippable,
                    &r.payload,
                    cap,
                )?;
            }
            self.settle(dest, id, Outcome::Dropped(DropReason::Unshippable))
        })();
        match result {
            Ok(removed) => {
                self.commit()?;
                Ok(removed)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Makes sure the floor on disk is above the next `n` sequence numbers before they are
    /// used.
    fn reserve_seqs(&mut self, n: u64) -> Result<(), SpoolError> {
        let end = self.next_seq + n;
        if end > self.seq_floor {
            let floor = end + SEQ_RESERVE;
            write_seq_floor(&self.path, floor)
                .map_err(|source| SpoolError::folder(&seq_floor_path(&self.path), source))?;
            self.seq_floor = floor;
        }
        Ok(())
    }

    /// Carries what reads back from the damaged file at `aside` into this new, empty
    /// store, in one transaction: its counters (so the accounting goes on), its routes, and
    /// every block that reads and decodes, under its own id. The records it held that did
    /// not come across are counted dropped `corrupt`. Returns those (`None` when its
    /// counters were unreadable too), and the blocks and records that came across.
    fn salvage(&mut self, aside: &Path) -> Result<(Option<u64>, u64, u64), SpoolError> {
        let old = Connection::open_with_flags(aside, OpenFlags::SQLITE_OPEN_READ_ONLY).ok();
        let counters = old.as_ref().and_then(read_counters);
        self.begin()?;
        let result = (|| {
            let (mut blocks, mut records) = (0u64, 0u64);
            let mut carried: BTreeMap<String, u64> = BTreeMap::new();
            if let Some(old) = &old {
                if let Ok(routes) = old
                    .prepare("SELECT route, destination, format FROM routes")
                    .and_then(|mut st| {
                        st.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                            .collect::<rusqlite::Result<BTreeMap<String, (String, String)>>>()
                    })
                {
                    for (route, (dest, format)) in routes {
                        self.conn
                            .execute(
                                "INSERT OR REPLACE INTO routes (route, destination, format) VALUES (?1, ?2, ?3)",
                                params![route, dest, format],
                            )
                            .map_err(|e| self.err(e))?;
                    }
                    self.routes_dirty = true;
                }
                // Each destination's cursor: without them every destination owes every block
                // that came across (sent twice rather than lost).
                let fanout: rusqlite::Result<Vec<(String, String, i64)>> = old
                    .prepare("SELECT route, destination, since FROM fanout")
                    .and_then(|mut st| {
                        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                            .collect()
                    });
                let fanout_read = fanout.is_ok();
                for (route, dest, since) in fanout.unwrap_or_default() {
                    self.conn
                        .execute(
                            "INSERT OR REPLACE INTO fanout (route, destination, since) VALUES (?1, ?2, ?3)",
                            params![route, dest, since],
                        )
                        .map_err(|e| self.err(e))?;
                }
                let taken: rusqlite::Result<Vec<(i64, String, Option<String>)>> = old
                    .prepare("SELECT block, destination, dropped FROM taken")
                    .and_then(|mut st| {
                        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                            .collect()
                    });
                for (block, dest, dropped) in taken.unwrap_or_default() {
                    self.conn
                        .execute(
                            "INSERT OR REPLACE INTO taken (block, destination, dropped) VALUES (?1, ?2, ?3)",
                            params![block, dest, dropped],
                        )
                        .map_err(|e| self.err(e))?;
                }
                // An object in upload keeps its key (without it the object is planned again,
                // most likely the same, and a multipart upload is left for the bucket's
                // lifecycle rule to abort).
                for u in Store::all_uploads(old).unwrap_or_default() {
                    self.change_upload(&u.destination.clone(), &UploadChange::Begin(u))?;
                }
                for block in readable_blocks(old) {
                    self.conn
                        .prepare_cached("INSERT INTO blocks (id, route, key, records, raw_bytes, created_ms, data, body_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
                        .and_then(|mut st| st.execute(params![block.meta.id, block.meta.route, block.meta.key, block.meta.records, block.meta.raw_bytes, block.meta.created_ms as i64, block.data, block.meta.version]))
                        .map_err(|e| self.err(e))?;
                    blocks += 1;
                    records += u64::from(block.meta.records);
                    *carried.entry(block.meta.route).or_default() += u64::from(block.meta.records);
                }
                if !fanout_read {
                    self.adopt_recorded_routes()?;
                }
            }
            self.load_fanout()?;
            self.reload_pair_pending()?;
            for ((route, dest), (n, _)) in &self.pair_pending {
                carried.insert(pair_row(route, dest), *n);
            }
            let lost = match counters {
                Some(counters) => {
                    let mut held: BTreeMap<String, i64> = BTreeMap::new();
                    for ((route, counter), value) in &counters {
                        let v = *value as i64;
                        *held.entry(route.clone()).or_default() += match counter {
                            Counter::Received => v,
                            Counter::Delivered | Counter::Dropped(_) => -v,
                        };
                    }
                    for ((route, counter), value) in counters {
                        self.count(&route, counter, value);
                    }
                    let mut lost = 0;
                    for (route, n) in held {
                        let gone = n - carried.get(&route).copied().unwrap_or(0) as i64;
                        if gone > 0 {
                            self.count(&route, Counter::Dropped(DropReason::Corrupt), gone as u64);
                            lost += gone as u64;
                        }
                    }
                    Some(lost)
                }
                // Without counters, what came across is all that is known to have arrived.
                None => {
                    for (route, n) in &carried {
                        self.count(route, Counter::Received, *n);
                    }
                    None
                }
            };
            Ok((lost, blocks, records))
        })();
        match result.and_then(|r| self.commit().map(|()| r)) {
            Ok(r) => {
                self.reload_totals()?;
                Ok(r)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Keeps a message that cannot become a record; counted as received and dropped.
    pub(crate) fn dead_letter(
        &mut self,
        route: &str,
        ts_ms: u64,
        topic: &str,
        reason: DropReason,
        payload: &[u8],
        cap: DeadLetterCap,
    ) -> Result<(), SpoolError> {
        self.keep_dead_letter(route, ts_ms, topic, reason, payload, cap)?;
        self.count(route, Counter::Received, 1);
        self.count(route, Counter::Dropped(reason), 1);
        self.drop_for_pairs(route, reason);
        Ok(())
    }

    /// Inserts a dead letter (its first MiB), the oldest evicted past `cap`; counts nothing.
    fn keep_dead_letter(
        &mut self,
        route: &str,
        ts_ms: u64,
        topic: &str,
        reason: DropReason,
        payload: &[u8],
        cap: DeadLetterCap,
    ) -> Result<(), SpoolError> {
        const KEEP: usize = 1 << 20;
        let kept = &payload[..payload.len().min(KEEP).min(cap.bytes as usize)];
        self.conn
            .prepare_cached("INSERT INTO dead_letters (ts_ms, route, topic, reason, size, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .and_then(|mut s| s.execute(params![ts_ms as i64, route, topic, reason.as_str(), payload.len() as i64, kept]))
            .map_err(|e| self.err(e))?;
        self.dead_letters += 1;
        self.dead_letter_bytes += kept.len() as u64;
        // The oldest go past either cap.
        while self.dead_letters > cap.records || self.dead_letter_bytes > cap.bytes {
            let oldest: Option<(i64, i64)> = self
                .conn
                .prepare_cached("SELECT id, LENGTH(payload) FROM dead_letters ORDER BY id LIMIT 1")
                .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(|e| self.err(e))?;
            let Some((id, bytes)) = oldest else { break };
            self.conn
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(|e| self.err(e))?;
            self.dead_letters -= 1;
            self.dead_letter_bytes = self.dead_letter_bytes.saturating_sub(bytes as u64);
        }
        Ok(())
    }

    /// Counts a message dropped before it became a record (e.g. no route matched).
    pub(crate) fn drop_message(&mut self, route: &str, reason: DropReason) {
        self.count(route, Counter::Received, 1);
        self.count(route, Counter::Dropped(reason), 1);
        self.drop_for_pairs(route, reason);
    }

    /// Blocks after `after` (by id) of the given routes that `dest` owes, oldest first,
    /// leaving out those `skip` names.
    pub(crate) fn list_blocks(
        &self,
        dest: &str,
        after: i64,
        routes: &[String],
        limit: usize,
        skip: impl Fn(i64) -> bool,
    ) -> Result<Vec<BlockMeta>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, route, key, records, raw_bytes, LENGTH(data), created_ms, body_version FROM blocks
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut cursor = after;
        // Filter routes in Rust: a handful of routes, and it keeps one cached statement.
        'scan: loop {
            let rows = stmt
                .query_map(params![cursor, (limit * 4).max(64) as i64], row_to_meta)
                .map_err(|e| self.err(e))?;
            let mut seen = 0;
            for row in rows {
                let meta = row.map_err(|e| self.err(e))?;
                seen += 1;
                cursor = meta.id;
                if routes.contains(&meta.route) && !skip(meta.id) && self.owes(dest, &meta)? {
                    out.push(meta);
                    if out.len() >= limit {
                        break 'scan;
                    }
                }
            }
            if seen == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// The uncompressed record body of a block. A block that fails to decode is moved to
    /// `quarantine`, counted as dropped `corrupt`, and reported as [`SpoolError::CorruptBlock`].
    pub(crate) fn read_block(
        &mut self,
        id: i64,
    ) -> Result<Option<(BlockMeta, Vec<u8>)>, SpoolError> {
        if self.recent.holds(id) {
            // The row without its data: whether the kept body still answers for it.
            let row = self
                .conn
                .prepare_cached(
                    "SELECT id, route, key, records, raw_bytes, LENGTH(data), created_ms, body_version FROM blocks WHERE id = ?1",
                )
                .and_then(|mut s| s.query_row([id], row_to_meta).optional())
                .map_err(|e| self.err(e))?;
            let Some(meta) = row else {
                self.recent.forget(id);
                return Ok(None);
            };
            if let Some(body) = self.recent.take(id, &meta) {
                return Ok(Some((meta, body)));
            }
        }
        let row = self
            .conn
            .prepare_cached(
                "SELECT id, route, key, records, raw_bytes, LENGTH(data), created_ms, body_version, data FROM blocks WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id], |r| Ok((row_to_meta(r)?, r.get::<_, Vec<u8>>(8)?))).optional()
            })
            .map_err(|e| self.err(e))?;
        let Some((meta, data)) = row else {
            return Ok(None);
        };
        let decoded =
            frame::decompress_exact_with(&mut self.decompressor, &data, meta.raw_bytes as usize)
                .and_then(|body| {
                    frame::check_records_in(&body, meta.records, meta.version).map(|_| body)
                });
        match decoded {
            Ok(body) => Ok(Some((meta, body))),
            Err(e) => {
                let reason = e.to_string();
                self.quarantine(&meta, &reason, &data)?;
                Err(SpoolError::CorruptBlock { id, reason })
            }
        }
    }

    fn quarantine(
        &mut self,
        meta: &BlockMeta,
        reason: &str,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        self.begin()?;
        let r = self
            .conn
            .execute(
                "INSERT OR REPLACE INTO quarantine (id, route, records, reason, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![meta.id, meta.route, meta.records, reason, data],
            )
            .map_err(|e| self.err(e))
            .and_then(|_| self.remove_for_all(meta.id, DropReason::Corrupt));
        if let Err(e) = r {
            self.rollback();
            return Err(e);
        }
        self.quarantined_blocks += 1;
        self.commit()
    }

    #[cfg(test)]
    pub(crate) fn limit_pages(&self, pages: u32) {
        self.conn
            .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .unwrap();
    }

    /// Hands the write-ahead log's space back to the file system (after a full disk: freed
    /// pages in the database file take the next commits). Failure is harmless.
    pub(crate) fn truncate_wal(&self) {
        let r = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            });
        match r {
            Ok((0, _, _)) => {}
            Ok((busy, log, done)) => tracing::warn!(busy, log, done, "spool log not truncated"),
            Err(e) => tracing::warn!(error = %e, "spool log not truncated"),
        }
    }

    /// `dest` accepted the records of block `id`: counted delivered for it; the block leaves
    /// when no other destination owes it.
    pub fn deliver_block(&mut self, dest: &str, id: i64) -> Result<Option<Settled>, SpoolError> {
        self.settle(dest, id, Outcome::Accepted)
    }

    /// Records of a block evicted while it was being sent, which a destination then accepted:
    /// counted delivered, and no longer dropped, for `row` (a route, or a route and
    /// destination pair's [`pair_row`]).
    pub(crate) fn recount_as_delivered(&mut self, row: &str, records: u32) {
        self.count(row, Counter::Delivered, u64::from(records));
        *self
            .counter_deltas
            .entry((row.to_string(), Counter::Dropped(DropReason::SpoolFull)))
            .or_insert(0) -= i64::from(records);
    }

    /// Removes the oldest block `skip` does not name, counting its records as dropped
    /// `spool_full` for its route and every destination that owed it. Returns its id and what
    /// was removed.
    pub(crate) fn evict_oldest(
        &mut self,
        skip: impl Fn(i64) -> bool,
    ) -> Result<Option<(i64, Removed)>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM blocks WHERE id > ?1 ORDER BY id LIMIT 64")
            .map_err(|e| self.err(e))?;
        let mut cursor = i64::MIN;
        let victim = loop {
            let ids: Vec<i64> = stmt
                .query_map([cursor], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(|e| self.err(e))?;
            if ids.is_empty() {
                break None;
            }
            cursor = *ids.last().expect("non-empty");
            if let Some(id) = ids.into_iter().find(|id| !skip(*id)) {
                break Some(id);
            }
        };
        drop(stmt);
        match victim {
            Some(id) => Ok(self
                .remove_for_all(id, DropReason::SpoolFull)?
                .map(|removed| (id, removed))),
            None => Ok(None),
        }
    }

    /// The accounting terms as committed.
    pub(crate) fn accounting(&self) -> Result<Accounting, SpoolError> {
        read_accounting(&self.conn).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
impl Store {
    /// Damages a block's data as a bad sector would (tests only).
    pub(crate) fn damage_block_for_test(&mut self, id: i64) {
        self.conn
            .execute("UPDATE blocks SET data = X'00112233' WHERE id = ?1", [id])
            .unwrap();
    }
}

/// The counters of a damaged file, if they read (the table's, or a newer copy on the
/// newest block when that block reads).
fn read_counters(conn: &Connection) -> Option<BTreeMap<(String, Counter), u64>> {
    let ledger = ledger::read(conn).ok()?;
    Some(
        ledger
            .totals
            .into_iter()
            .filter_map(|((route, name), value)| {
                Some(((route, Counter::parse(&name)?), value.max(0) as u64))
            })
            .collect(),
    )
}

/// A block read back from a damaged file, its body checked.
struct Salvaged {
    meta: BlockMeta,
    data: Vec<u8>,
}

/// The blocks of a damaged file that read and decode, in id order. A read that fails skips
/// ahead past the failing id, twice as far at each further failure (a damaged page hides a
/// run of ids; seeking past it finds the rest), so the walk ends after about 64 failed reads
/// per damaged run.
fn readable_blocks(conn: &Connection) -> impl Iterator<Item = Salvaged> + '_ {
    let mut cursor = 0i64;
    let mut skip = 1i64;
    // A file of schema 1 has no body_version column: its blocks are all version 1.
    let select = if has_body_version(conn) {
        "SELECT id, route, key, records, raw_bytes, LENGTH(data), created_ms, body_version, data FROM blocks WHERE id > ?1 ORDER BY id LIMIT 1"
    } else {
        "SELECT id, route, key, records, raw_bytes, LENGTH(data), created_ms, 1, data FROM blocks WHERE id > ?1 ORDER BY id LIMIT 1"
    };
    std::iter::from_fn(move || loop {
        let row = conn.prepare_cached(select).and_then(|mut s| {
            s.query_row([cursor], |r| Ok((row_to_meta(r)?, r.get::<_, Vec<u8>>(8)?)))
                .optional()
        });
        match row {
            Ok(None) => return None,
            Ok(Some((meta, data))) => {
                cursor = meta.id;
                skip = 1;
                let sound = frame::decompress_exact(&data, meta.raw_bytes as usize)
                    .and_then(|body| frame::check_records_in(&body, meta.records, meta.version))
                    .is_ok();
                if sound {
                    return Some(Salvaged { meta, data });
                }
            }
            Err(_) => {
                if cursor == i64::MAX {
                    return None;
                }
                cursor = cursor.saturating_add(skip);
                skip = skip.saturating_mul(2);
            }
        }
    })
}

/// Whether the `blocks` table of `conn` has the `body_version` column (schema 2 and later).
fn has_body_version(conn: &Connection) -> bool {
    conn.prepare("SELECT body_version FROM blocks LIMIT 0")
        .is_ok()
}

fn row_to_meta(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlockMeta> {
    Ok(BlockMeta {
        id: r.get(0)?,
        route: r.get(1)?,
        key: r.get(2)?,
        version: r.get(7)?,
        records: r.get(3)?,
        raw_bytes: r.get(4)?,
        stored_bytes: r.get::<_, i64>(5)? as u32,
        created_ms: r.get::<_, i64>(6)? as u64,
    })
}

fn read_accounting(conn: &Connection) -> rusqlite::Result<Accounting> {
    let mut acc = Accounting::default();
    let ledger = ledger::read(conn)?;
    let mut by_name: BTreeMap<&str, i64> = BTreeMap::new();
    for ((route, name), value) in &ledger.totals {
        if split_pair_row(route).is_none() {
            *by_name.entry(name).or_insert(0) += value;
        }
    }
    for (name, value) in by_name {
        let value = value.max(0) as u64;
        match Counter::parse(name) {
            Some(Counter::Received) => acc.received = value,
            Some(Counter::Delivered) => acc.delivered = value,
            Some(Counter::Dropped(reason)) => {
                acc.dropped += value;
                acc.dropped_by_reason
                    .insert(reason.as_str().to_string(), value);
            }
            None => {}
        }
    }
    let (pending, bytes): (i64, i64) = conn.query_row(
        "SELECT COALESCE(SUM(records), 0), COALESCE(SUM(LENGTH(data)), 0) FROM blocks",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    acc.pending = pending as u64;
    acc.pending_bytes = bytes as u64;
    acc.dead_letters = conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    acc.quarantined_blocks = conn.query_row("SELECT COUNT(*) FROM quarantine", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    for ((pair, name), value) in &ledger.totals {
        if split_pair_row(pair).is_none() {
            continue;
        }
        if let Some(counter) = Counter::parse(name) {
            acc.destinations
                .entry(pair.clone())
                .or_default()
                .add(counter, (*value).max(0) as u64);
        }
    }
    // A file from before destinations had cursors has no `fanout` table: no pairs.
    if let Ok(mut stmt) = conn.prepare(PAIR_PENDING) {
        for row in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))? {
            let (route, dest, records): (String, String, i64) = row?;
            acc.destinations
                .entry(pair_row(&route, &dest))
                .or_default()
                .pending += records.max(0) as u64;
        }
    }
    Ok(acc)
}

/// Records and stored bytes each (route, destination) pair still owes.
const PAIR_PENDING: &str = "SELECT b.route, f.destination, SUM(b.records), SUM(LENGTH(b.data))
     FROM blocks b JOIN fanout f ON f.route = b.route AND b.id >= f.since
     WHERE NOT EXISTS (SELECT 1 FROM taken t WHERE t.block = b.id AND t.destination = f.destination)
     GROUP BY b.route, f.destination";

/// Reads the accounting of a spool file without taking part in its writes, once no agent
/// holds it: a running agent keeps the file to itself ([`EXCLUSIVE_LOCKING`]), and the
/// error then says so (ask the agent's admin endpoint instead).
pub fn read_accounting_at(path: &Path) -> Result<Accounting, SpoolError> {
    let err = |source| SpoolError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    if !path.exists() {
        return Err(err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some("no spool file at this path".into()),
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .or_else(|_| Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY))
    .map_err(err)?;
    // An agent starting or stopping lets go within this; a running one does not.
    conn.busy_timeout(std::time::Duration::from_secs(1))
        .map_err(err)?;
    // One read transaction, so the counters and the blocks are of the same commit: read
    // apart, a delivery committed between them unbalances the figures.
    conn.execute_batch("BEGIN").map_err(err)?;
    let acc = read_accounting(&conn);
    let _ = conn.execute_batch("COMMIT");
    acc.map_err(|e| SpoolError::held_or(path, e))
}

#[cfg(test)]
mod tests {
    use super::super::tests::noise;
    use super::*;

    fn rec<'a>(topic: &'a str, payload: &'a [u8]) -> NewRecord<'a> {
        NewRecord {
            ts_ms: 7,
            key: "k",
            topic,
            payload,
        }
    }

    /// A spool written by an agent of schema 1 (no `body_version`, blocks of one key in
    /// version 1 bodies) opens as schema 2: its blocks read as version 1, new ones are
    /// version 2, and an agent of schema 1 would refuse the file from then on.
    #[test]
    fn a_schema_1_spool_is_migrated_and_its_blocks_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        drop(Store::open(&path, SyncLevel::Normal).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "ALTER TABLE blocks DROP COLUMN body_version;
                 UPDATE meta SET value = 1 WHERE key = 'schema';",
            )
            .unwrap();
            let mut body = Vec::new();
            frame::encode_record(&mut body, 1, 7, "t/1", b"old");
            frame::encode_record(&mut body, 2, 7, "t/1", b"older");
            let data = zstd::bulk::compress(&body, 3).unwrap();
            conn.execute(
                "INSERT INTO blocks (id, route, key, records, raw_bytes, created_ms, data) VALUES (1, 'r', 'dev-1', 2, ?1, 7, ?2)",
                params![body.len() as i64, data],
            )
            .unwrap();
            conn.execute(
                "INSERT OR REPLACE INTO counters (route, name, value) VALUES ('', 'next_seq', 3)",
                [],
            )
            .unwrap();
        }
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        let (meta, raw) = s.read_block(1).unwrap().unwrap();
        assert_eq!(
            (meta.version, meta.key.as_str()),
            (frame::VERSION_1, "dev-1")
        );
        let old = frame::decode_records_in(&raw, meta.records, meta.version).unwrap();
        assert_eq!(old[1].payload, b"older");
        let mut body = Vec::new();
        s.begin().unwrap();
        let new = s
            .append_block("r", "k", &[rec("t/2", b"new")], &mut body)
            .unwrap();
        s.commit().unwrap();
        assert_eq!((new.id, new.version), (3, frame::VERSION_2));
        let (meta, raw) = s.read_block(3).unwrap().unwrap();
        let r = frame::decode_records_in(&raw, meta.records, meta.version).unwrap();
        assert_eq!(
            (r[0].key.as_str(), r[0].payload.as_slice()),
            ("k", &b"new"[..])
        );
        let schema: i64 = s
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(schema, SCHEMA_VERSION);
    }

    #[test]
    fn blocks_round_trip_and_accounting_balances() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        let a = s
            .append_block(
                "r",
                "k",
                &[rec("t/1", b"one"), rec("t/2", b"two")],
                &mut body,
            )
            .unwrap();
        let b = s
            .append_block("r", "k", &[rec("t/3", b"three")], &mut body)
            .unwrap();
        s.drop_message("", DropReason::NoRoute);
        s.commit().unwrap();
        assert_eq!((a.id, b.id), (1, 3));
        let (meta, raw) = s.read_block(a.id).unwrap().unwrap();
        let records = frame::decode_records_in(&raw, meta.records, meta.version).unwrap();
        assert_eq!(records[1].payload, b"two");
        assert_eq!(records[1].seq, 2);

        s.begin().unwrap();
        s.deliver_block("", a.id).unwrap();
        s.commit().unwrap();
        let acc = s.accounting().unwrap();
        assert_eq!(
            (acc.received, acc.delivered, acc.dropped, acc.pending),
            (4, 2, 1, 1)
        );
        assert!(acc.balances());

        // Sequence numbers are never reused, even after the spool empties and reopens.
        s.begin().unwrap();
        s.deliver_block("", b.id).unwrap();
        s.commit().unwrap();
        drop(s);
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        s.begin().unwrap();
        let c = s
            .append_block("r", "k", &[rec("t", b"x")], &mut body)
            .unwrap();
        s.commit().unwrap();
        assert_eq!(c.id, 4);
        drop(s);
        assert!(read_accounting_at(&path).unwrap().balances());
    }

    /// The open store keeps the file to itself: no -shm file, and a reader of the file is
    /// told that the agent holds it, then reads it once the store is closed.
    #[test]
    fn an_open_spool_keeps_its_file_and_its_logs_index_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        s.append_block("r", "k", &[rec("t", b"x")], &mut body)
            .unwrap();
        s.commit().unwrap();
        let side = |name: &str| dir.path().join(format!("s.db-{name}")).exists();
        assert!(side("wal") && !side("shm"), "the log's index is a file");
        let e = read_accounting_at(&path).unwrap_err().to_string();
        assert!(e.contains("a running agent holds the spool file"), "{e}");
        // A second agent on the same spool is refused, and the file stays as it was.
        let e = Store::open(&path, SyncLevel::Normal)
            .err()
            .expect("refused");
        assert!(matches!(e, SpoolError::Held { .. }), "{e}");
        drop(s);
        let acc = read_accounting_at(&path).unwrap();
        assert_eq!((acc.received, acc.pending), (1, 1), "{acc:?}");
    }

    /// What the `counters` table says `route` received, and whether block `id` holds a copy.
    fn table_received_and_copy(s: &Store, route: &str, id: i64) -> (Option<i64>, bool) {
        let received = s
            .conn
            .query_row(
                "SELECT value FROM counters WHERE route = ?1 AND name = 'received'",
                [route],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        let copy: bool = s
            .conn
            .query_row(
                "SELECT ledger IS NOT NULL FROM blocks WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
            .unwrap_or(false);
        (received, copy)
    }

    /// A commit that appends one small block writes the totals onto it (one page) and leaves
    /// the table; the newest copy is what a reopen and a reader of the file find, also after
    /// a split took the block that held it, and a large block sends them to the table.
    #[test]
    fn the_totals_ride_on_a_small_block_and_the_newest_copy_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        let mut body = Vec::new();
        let four: Vec<NewRecord<'_>> = (0..4).map(|_| rec("t", b"small")).collect();
        s.begin().unwrap();
        let a = s.append_block("r", "k", &four, &mut body).unwrap();
        s.commit().unwrap();
        assert_eq!(table_received_and_copy(&s, "r", a.id), (None, true));

        s.begin().unwrap();
        s.deliver_block("", a.id).unwrap();
        let b = s.append_block("r", "k", &four[..3], &mut body).unwrap();
        s.drop_message("r", DropReason::NoRoute);
        s.commit().unwrap();
        assert_eq!(table_received_and_copy(&s, "r", b.id), (None, true));
        let generation = s.generation;
        s.begin().unwrap();
        s.commit().unwrap();
        assert_eq!(
            s.generation, generation,
            "a commit that changed nothing writes nothing"
        );
        drop(s);

        let expect = |acc: &Accounting| {
            assert_eq!(
                (acc.received, acc.delivered, acc.dropped, acc.pending),
                (8, 4, 1, 3),
                "{acc:?}"
            );
            assert!(acc.balances(), "{acc:?}");
        };
        expect(&read_accounting_at(&path).unwrap());
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        expect(&s.committed.lock().unwrap().accounting());
        assert_eq!(s.copy_on, Some(b.id));

        // A split replaces the block holding the copy by two without one: the totals go to
        // the table in the split's own transaction.
        let halves = s.split_block(b.id, &mut body).unwrap();
        assert_eq!(halves.len(), 2);
        assert_eq!(s.copy_on, None);
        assert_eq!(table_received_and_copy(&s, "r", b.id), (Some(8), false));
        drop(s);
        expect(&read_accounting_at(&path).unwrap());

        // A block too large to share its page with the totals leaves them to the table.
        let noise = noise(5, 4096);
        let (mut s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        s.begin().unwrap();
        let c = s
            .append_block("r", "k", &[rec("t", &noise)], &mut body)
            .unwrap();
        s.commit().unwrap();
        assert_eq!(table_received_and_copy(&s, "r", c.id), (Some(9), false));
        s.begin().unwrap();
        let d = s.append_block("r", "k", &four[..1], &mut body).unwrap();
        s.commit().unwrap();
        assert_eq!(table_received_and_copy(&s, "r", d.id), (Some(9), true));
        drop(s);
        let (s, _) = Store::open(&path, SyncLevel::Normal).unwrap();
        let acc = s.committed.lock().unwrap().accounting();
        assert_eq!((acc.received, acc.pending), (10, 5), "{acc:?}");
        assert_eq!(s.next_seq, d.id as u64 + 1);
    }

    #[test]
    fn spool_files_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        s.append_block("r", "k", &[rec("t", b"x")], &mut body)
            .unwrap();
        s.commit().unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("s.db-wal")), 0o600);
        drop(s);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _ = Store::open(&path, SyncLevel::Off).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn rollback_forgets_uncommitted_work() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("s.db"), SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        s.append_block("r", "k", &[rec("t", b"x")], &mut body)
            .unwrap();
        s.rollback();
        assert_eq!(s.pending_records(), 0);
        let acc = s.accounting().unwrap();
        assert_eq!(acc.received, 0);
    }

    /// A block read back soon after it was appended comes from memory, and only while its
    /// row is the one the kept body was written as: not after a rollback gave its id to other
    /// records, not after a split, not twice.
    #[test]
    fn a_block_read_back_from_memory_is_the_one_its_row_describes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("s.db"), SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        let gone = s
            .append_block("r", "k", &[rec("t", b"first")], &mut body)
            .unwrap();
        s.rollback();
        s.begin().unwrap();
        let a = s
            .append_block("r", "k", &[rec("t", b"other")], &mut body)
            .unwrap();
        let b = s
            .append_block(
                "r",
                "k",
                &[rec("t", b"b1"), rec("t", b"b2"), rec("t", b"b3")],
                &mut body,
            )
            .unwrap();
        s.commit().unwrap();
        assert_eq!(gone.id, a.id);
        let payloads = |s: &mut Store, id: i64| -> Result<Vec<Vec<u8>>, SpoolError> {
            let (meta, raw) = s.read_block(id)?.expect("the block is there");
            Ok(frame::decode_records_in(&raw, meta.records, meta.version)
                .unwrap()
                .into_iter()
                .map(|r| r.payload)
                .collect())
        };
        // Zeroing the blob in the file (its length kept, so the row reads the same) shows
        // which copy answers: the kept body once, then the file, found damaged.
        s.conn
            .execute(
                "UPDATE blocks SET data = zeroblob(LENGTH(data)) WHERE id = ?1",
                [a.id],
            )
            .unwrap();
        assert_eq!(payloads(&mut s, a.id).unwrap(), vec![b"other".to_vec()]);
        assert!(matches!(
            payloads(&mut s, a.id),
            Err(SpoolError::CorruptBlock { .. })
        ));
        let halves = s.split_block(b.id, &mut body).unwrap();
        assert_eq!(halves[0].id, b.id);
        assert_eq!(
            payloads(&mut s, halves[0].id).unwrap(),
            vec![b"b1".to_vec()]
        );
        assert_eq!(
            payloads(&mut s, halves[1].id).unwrap(),
            vec![b"b2".to_vec(), b"b3".to_vec()]
        );
        assert_eq!(s.recent.bytes(), 0);
        // Behind more undelivered blocks of its route than the memory keeps (seven blocks of
        // 200 KB of noise: five fit in 1 MiB), a block is left to the file: the shipper
        // reaches it later.
        let payloads: Vec<Vec<u8>> = (0..7).map(|i| noise(i, 200_000)).collect();
        s.begin().unwrap();
        let blocks: Vec<BlockMeta> = payloads
            .iter()
            .map(|p| s.append_block("r", "k", &[rec("t", p)], &mut body).unwrap())
            .collect();
        s.commit().unwrap();
        let kept: Vec<bool> = blocks.iter().map(|b| s.recent.holds(b.id)).collect();
        assert_eq!(kept, [true, true, true, true, true, false, false]);
    }

    #[test]
    fn eviction_skips_in_flight_blocks_and_counts_drops() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("s.db"), SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        let a = s
            .append_block("r", "k", &[rec("t", b"a")], &mut body)
            .unwrap();
        let b = s
            .append_block("r", "k", &[rec("t", b"b"), rec("t", b"c")], &mut body)
            .unwrap();
        s.commit().unwrap();
        let in_flight = std::collections::HashSet::from([a.id]);
        s.begin().unwrap();
        assert_eq!(
            s.evict_oldest(|id| in_flight.contains(&id))
                .unwrap()
                .map(|(id, r)| (id, r.route, r.records)),
            Some((b.id, "r".into(), 2))
        );
        assert_eq!(s.evict_oldest(|id| in_flight.contains(&id)).unwrap(), None);
        s.commit().unwrap();
        let acc = s.accounting().unwrap();
        assert_eq!(acc.dropped_by_reason["spool_full"], 2);
        assert!(acc.balances());
        assert!(s
            .list_blocks("", 0, &["r".into()], 10, |_| false)
            .unwrap()
            .iter()
            .all(|m| m.id != b.id));
    }

    #[test]
    fn corrupt_block_is_quarantined_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        let a = s
            .append_block("r", "k", &[rec("t", b"payload")], &mut body)
            .unwrap();
        s.commit().unwrap();
        s.conn
            .execute("UPDATE blocks SET data = X'00112233' WHERE id = ?1", [a.id])
            .unwrap();
        assert!(matches!(
            s.read_block(a.id),
            Err(SpoolError::CorruptBlock { .. })
        ));
        let acc = s.accounting().unwrap();
        assert_eq!(acc.dropped_by_reason["corrupt"], 1);
        assert_eq!(acc.quarantined_blocks, 1);
        assert!(acc.balances());
    }

    #[test]
    fn a_block_splits_in_halves_that_keep_their_seqs_and_a_lone_record_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(&dir.path().join("s.db"), SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        let recs: Vec<NewRecord<'_>> = payloads.iter().map(|p| rec("t", p)).collect();
        let a = s.append_block("r", "k", &recs, &mut body).unwrap();
        s.commit().unwrap();
        let parts = s.split_block(a.id, &mut body).unwrap();
        assert_eq!(
            parts.iter().map(|p| (p.id, p.records)).collect::<Vec<_>>(),
            [(1, 2), (3, 3)]
        );
        let (meta, raw) = s.read_block(3).unwrap().unwrap();
        let r = frame::decode_records_in(&raw, meta.records, meta.version).unwrap();
        assert_eq!((r[0].seq, r[0].payload.clone()), (3, vec![2u8; 10]));
        let acc = s.accounting().unwrap();
        assert_eq!((acc.received, acc.pending), (5, 5), "a split moves nothing");
        let one = s.split_block(1, &mut body).unwrap();
        let lone = s.split_block(one[0].id, &mut body).unwrap();
        assert_eq!(lone.len(), 1, "one record cannot be split");
        assert_eq!(
            s.dead_letter_block(
                "",
                lone[0].id,
                DeadLetterCap {
                    records: 10,
                    bytes: 1 << 20
                }
            )
            .unwrap()
            .map(|s| (s.route, s.records)),
            Some(("r".into(), 1))
        );
        let acc = s.accounting().unwrap();
        assert_eq!(acc.dropped_by_reason["unshippable"], 1);
        assert_eq!((acc.pending, acc.dead_letters), (4, 1));
        assert!(acc.balances(), "{acc:?}");
    }

    #[test]
    fn ids_never_repeat_even_when_the_spool_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 8]).collect();
        let recs: Vec<NewRecord<'_>> = payloads.iter().map(|p| rec("t", p)).collect();
        s.begin().unwrap();
        let a = s.append_block("r", "k", &recs, &mut body).unwrap();
        s.commit().unwrap();
        assert_eq!(a.id, 1);
        drop(s);
        // A restart of the same file goes on where it was, not at the floor.
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        s.begin().unwrap();
        assert_eq!(
            s.append_block("r", "k", &recs[..1], &mut body).unwrap().id,
            21
        );
        s.commit().unwrap();
        drop(s);
        // The file is lost: the new one starts above every id issued.
        for side in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", path.display()));
        }
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        s.begin().unwrap();
        let c = s.append_block("r", "k", &recs[..1], &mut body).unwrap();
        s.commit().unwrap();
        assert!(c.id > 21, "id {} reused", c.id);
        let floor: u64 = std::fs::read_to_string(seq_floor_path(&path))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(floor > c.id as u64);
    }

    /// A spool of 300 one-record blocks of 3,000 bytes (one to a page), the first 10
    /// delivered, its log checkpointed into the file.
    fn spool_of_300(path: &Path) -> Vec<Vec<u8>> {
        let payloads: Vec<Vec<u8>> = (0..300).map(|i| noise(i, 3_000)).collect();
        let (mut s, _) = Store::open(path, SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        for p in &payloads {
            s.append_block("r", "k", &[rec("t", p)], &mut body).unwrap();
        }
        s.commit().unwrap();
        s.begin().unwrap();
        for id in 1..=10 {
            s.deliver_block("", id).unwrap();
        }
        s.commit().unwrap();
        s.truncate_wal();
        payloads
    }

    /// Overwrites `bytes` of the file from byte `at` with garbage (the same bytes whatever
    /// the page size: 400 KiB in is among the blocks of [`spool_of_300`]).
    fn damage(path: &Path, at: u64, bytes: usize) {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&vec![0xa5; bytes]).unwrap();
    }

    /// Rewrites `path` (closed) with pages of `size` bytes, as an agent before 1 KiB pages
    /// made them.
    fn repage(path: &Path, size: u32) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = DELETE; PRAGMA page_size = {size}; VACUUM; PRAGMA journal_mode = WAL;"
        ))
        .unwrap();
        let now: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(now, size);
    }

    /// Every block of [`spool_of_300`] still listed, read back under its id byte for byte:
    /// how many.
    fn blocks_read_back(s: &mut Store, payloads: &[Vec<u8>]) -> usize {
        let blocks = s
            .list_blocks("", 0, &["r".to_string()], 1_000, |_| false)
            .unwrap();
        for meta in &blocks {
            let (_, raw) = s.read_block(meta.id).unwrap().unwrap();
            let records = frame::decode_records_in(&raw, 1, meta.version).unwrap();
            assert_eq!(records[0].seq, meta.id as u64);
            assert_eq!(records[0].payload, payloads[meta.id as usize - 1]);
        }
        blocks.len()
    }

    /// Appends one block in its own transaction: its id.
    fn append_one(s: &mut Store) -> i64 {
        let mut body = Vec::new();
        s.begin().unwrap();
        let next = s
            .append_block("r", "k", &[rec("t", b"x")], &mut body)
            .unwrap();
        s.commit().unwrap();
        next.id
    }

    fn journal_mode_of(s: &Store) -> String {
        s.conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap()
    }

    fn page_size_of(s: &Store) -> u32 {
        s.conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    }

    /// A spool of 4 KiB pages (an earlier agent's) is rewritten with 1 KiB pages at open, and
    /// keeps every block, byte for byte under its id, and its accounting; one too large to
    /// convert keeps its pages and works as before.
    #[test]
    fn a_small_spool_of_other_pages_is_rewritten_at_open_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let payloads = spool_of_300(&path);
        repage(&path, 4096);
        let (mut s, report) = Store::open(&path, SyncLevel::Off).unwrap();
        assert_eq!(report.converted_from_page_size, Some(4096), "{report:?}");
        assert_eq!(report.kept_page_size, None);
        assert_eq!(page_size_of(&s), PAGE_SIZE);
        assert_eq!(journal_mode_of(&s), "wal");
        let acc = s.accounting().unwrap();
        assert_eq!((acc.received, acc.delivered, acc.pending), (300, 10, 290));
        assert_eq!(blocks_read_back(&mut s, &payloads), 290);
        assert_eq!(append_one(&mut s), 301);
        drop(s);

        // Over the size limit: kept as it is, and said why.
        repage(&path, 4096);
        let (mut s, _) = Store::open_inner(&path, SyncLevel::Off)
            .map(|s| (s, ()))
            .unwrap();
        let mut report = OpenReport::default();
        s.settle_page_size(64 << 10, &mut report);
        assert_eq!(report.converted_from_page_size, None);
        assert_eq!(report.kept_page_size.as_ref().map(|k| k.0), Some(4096));
        assert_eq!(page_size_of(&s), 4096);
        assert_eq!(s.accounting().unwrap().pending, 291);
        assert_eq!(journal_mode_of(&s), "wal");
    }

    /// Pages overwritten in the middle of the blocks while the agent was down: the check at
    /// open finds it, the blocks that read come across under their own ids byte for byte,
    /// the records that do not are counted corrupt, the accounting goes on and balances.
    #[test]
    fn a_damaged_file_is_rebuilt_from_what_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let payloads = spool_of_300(&path);
        damage(&path, 400 << 10, 20 << 10);
        let (mut s, report) = Store::open(&path, SyncLevel::Off).unwrap();
        assert!(report.quarantined_file.as_ref().unwrap().exists());
        let lost = report.lost_records.expect("the counters read back");
        assert!((5..100).contains(&lost), "{report:?}");
        let acc = s.accounting().unwrap();
        assert_eq!((acc.received, acc.delivered), (300, 10), "{acc:?}");
        assert_eq!(acc.pending, report.salvaged_records);
        assert_eq!(acc.pending + lost, 290, "{acc:?}");
        assert_eq!(acc.dropped_by_reason["corrupt"], lost);
        assert!(acc.balances(), "{acc:?}");
        assert_eq!(
            blocks_read_back(&mut s, &payloads) as u64,
            report.salvaged_blocks
        );
        // New ids go on above the old file's.
        let next = append_one(&mut s);
        assert!(next > 300, "{next}");
    }

    /// The same found while the agent runs: the store rebuilds the file it has open.
    #[test]
    fn a_file_damaged_under_a_running_store_is_rebuilt_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        spool_of_300(&path);
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        // Pages read from the file again, as in a spool larger than SQLite's cache.
        s.conn
            .execute_batch("PRAGMA cache_size = 1; PRAGMA shrink_memory")
            .unwrap();
        damage(&path, 400 << 10, 20 << 10);
        assert!(matches!(
            s.check(QUICK_CHECK_LIMIT).unwrap(),
            Health::Damaged(_)
        ));
        let report = s.rebuild().unwrap();
        assert!(report.lost_records.unwrap() > 0, "{report:?}");
        assert_eq!(s.check(QUICK_CHECK_LIMIT).unwrap(), Health::Sound);
        let acc = s.accounting().unwrap();
        assert!(acc.balances(), "{acc:?}");
        assert_eq!(acc.received, 300);
    }

    /// Names in `dir` starting with `prefix`.
    fn files_named(dir: &Path, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    /// A crash can cut a rebuild off at every step; the next open finishes it or does it
    /// again, and never starts an empty spool beside records that could be read.
    #[test]
    fn a_rebuild_cut_off_is_finished_or_redone_at_the_next_open() {
        let check = |s: &Store, report: &OpenReport| {
            let acc = s.accounting().unwrap();
            assert_eq!((acc.received, acc.delivered), (300, 10), "{acc:?}");
            assert_eq!(
                acc.pending + report.lost_records.unwrap_or(0),
                290,
                "{acc:?}"
            );
            assert!(acc.pending > 200, "{acc:?}");
            assert!(acc.balances(), "{acc:?}");
        };
        // Cut off after the damaged file moved, while the new one was being built.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        spool_of_300(&path);
        damage(&path, 400 << 10, 20 << 10);
        std::fs::rename(&path, beside(&path, ".damaged")).unwrap();
        std::fs::write(beside(&path, ".rebuilt"), b"half a file").unwrap();
        let (s, report) = Store::open(&path, SyncLevel::Off).unwrap();
        check(&s, &report);
        assert!(report.quarantined_file.unwrap().exists());
        assert_eq!(
            files_named(dir.path(), "s.db.damaged"),
            Vec::<String>::new()
        );
        assert_eq!(
            files_named(dir.path(), "s.db.rebuilt"),
            Vec::<String>::new()
        );
        drop(s);

        // Cut off after the new file was in place: it is kept, the damaged one moves on.
        let main_files = |prefix: &str| {
            let mut names = files_named(dir.path(), prefix);
            names.retain(|n| !n.ends_with("-wal") && !n.ends_with("-shm"));
            names
        };
        let aside = main_files("s.db.corrupt-");
        assert_eq!(aside.len(), 1, "{aside:?}");
        for side in ["-wal", "-shm", ""] {
            let from = beside(&dir.path().join(&aside[0]), side);
            if from.exists() {
                std::fs::rename(from, beside(&path, &format!(".damaged{side}"))).unwrap();
            }
        }
        let (s, report) = Store::open(&path, SyncLevel::Off).unwrap();
        assert!(report.quarantined_file.is_none(), "{report:?}");
        let acc = s.accounting().unwrap();
        assert_eq!((acc.received, acc.delivered), (300, 10), "{acc:?}");
        assert_eq!(
            files_named(dir.path(), "s.db.damaged"),
            Vec::<String>::new()
        );
        assert_eq!(main_files("s.db.corrupt-").len(), 1);
        drop(s);

        // Cut off while the damaged file set was moving: its log had moved, the file had not.
        // The log goes back, and with it the last commit.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let crashed = dir.path().join("crashed");
        std::fs::create_dir(&crashed).unwrap();
        spool_of_300(&path);
        let (mut s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        let mut body = Vec::new();
        s.begin().unwrap();
        s.append_block("r", "k", &[rec("t", b"in the log")], &mut body)
            .unwrap();
        s.commit().unwrap();
        // The files as a crash leaves them (the log not yet copied into the file).
        for side in ["", "-wal"] {
            std::fs::copy(beside(&path, side), beside(&crashed.join("s.db"), side)).unwrap();
        }
        drop(s);
        let path = crashed.join("s.db");
        std::fs::rename(beside(&path, "-wal"), beside(&path, ".damaged-wal")).unwrap();
        let (s, _) = Store::open(&path, SyncLevel::Off).unwrap();
        let acc = s.accounting().unwrap();
        assert_eq!(
            (acc.received, acc.delivered, acc.pending),
            (301, 10, 291),
            "{acc:?}"
        );
        assert_eq!(files_named(&crashed, "s.db.damaged"), Vec::<String>::new());
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(&path, vec![0x42; 8192]).unwrap();
        let (s, report) = Store::open(&path, SyncLevel::Normal).unwrap();
        let aside = report.quarantined_file.expect("moved aside");
        assert!(aside.exists());
        assert_eq!(s.pending_records(), 0);
    }
}
