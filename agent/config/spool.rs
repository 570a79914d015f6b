//! `[spool]`: where records wait, how much of the disk they may take, and how hard each
//! commit syncs.

use super::raw::{FullPolicy, RawSpool, SyncLevel};
use super::source::{ConfigError, Source};
use super::units::ByteSize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    pub path: PathBuf,
    /// Cap on spooled (compressed) record bytes; past it `full_policy` applies.
    pub(crate) max_bytes: u64,
    pub(crate) full_policy: FullPolicy,
    pub(crate) sync: SyncLevel,
    /// Dead letters kept for inspection; the oldest are evicted past this count.
    pub(crate) max_dead_letters: u64,
    /// How long received messages gather at least before one commit. Longer means fewer,
    /// larger writes (less disk wear) and later acks; throughput per broker is at most its
    /// inflight window divided by this.
    pub(crate) commit_interval: Duration,
    /// The longest received messages gather when they come slowly and steadily (a group
    /// smaller than the commit target goes on gathering past `commit_interval` while messages
    /// keep coming at their usual pace): what a message may wait for its commit and ack.
    pub(crate) commit_max_wait: Duration,
}

/// How long a slow, steady stream's messages gather by default: at 20 msg/s a commit then
/// holds about 20 messages instead of one (disk writes per payload byte 2.5 instead of 54).
const DEFAULT_COMMIT_MAX_WAIT: Duration = Duration::from_secs(1);

/// The longest `commit_max_wait` (acks wait this long).
const MAX_COMMIT_MAX_WAIT: Duration = Duration::from_secs(10);

/// `[spool]` checked. Left out, `commit_max_wait` is [`DEFAULT_COMMIT_MAX_WAIT`], or the
/// frames' `linger` (their `max_linger`, which is the linger unless set) when that is longer
/// (at most [`MAX_COMMIT_MAX_WAIT`]): a slow stream's records wait for their frame that long
/// anyway (a record's linger counts from its read, so its frame leaves about when it would
/// have), and fewer, larger commits spare the flash the pages each one rewrites and the
/// agent their wakeups (at 20 msg/s with a 5 s linger: 0.50 bytes written per payload byte
/// instead of 1.37, 50 us of CPU per message instead of 105; with `max_linger = "60s"`, 0.62
/// instead of 1.25 and 23 us instead of 77; benches/MEASURED.md).
pub(super) fn spool(
    raw: RawSpool,
    linger: Duration,
    src: &Source,
) -> Result<SpoolConfig, ConfigError> {
    let max_wait_set = raw.commit_max_wait.is_some();
    let default_max_wait = linger.clamp(DEFAULT_COMMIT_MAX_WAIT, MAX_COMMIT_MAX_WAIT);
    let mut spool = SpoolConfig {
        path: PathBuf::from(
            raw.path
                .unwrap_or_else(|| "/var/lib/edgeship/spool.db".into()),
        ),
        max_bytes: raw.max_bytes.unwrap_or(ByteSize(512 << 20)).bytes(),
        full_policy: raw.full_policy.unwrap_or(FullPolicy::Block),
        sync: raw.sync.unwrap_or(SyncLevel::Normal),
        max_dead_letters: raw.max_dead_letters.unwrap_or(10_000),
        commit_interval: raw
            .commit_interval
            .map_or(Duration::from_millis(10), |d| d.0),
        // Left out: a second, or a longer linger (a slow, steady stream commits about that
        // often).
        commit_max_wait: raw.commit_max_wait.map_or(default_max_wait, |d| d.0),
    };
    if spool.commit_interval > Duration::from_secs(1) {
        return Err(src.error_at(
            None,
            "spool.commit_interval",
            "must be at most 1s (acks wait this long)",
        ));
    }
    if spool.commit_max_wait > MAX_COMMIT_MAX_WAIT {
        return Err(src.error_at(
            None,
            "spool.commit_max_wait",
            "must be at most 10s (acks wait this long)",
        ));
    }
    if spool.commit_max_wait < spool.commit_interval {
        if max_wait_set {
            return Err(src.error_at(
                None,
                "spool.commit_max_wait",
                "must be at least commit_interval",
            ));
        }
        spool.commit_max_wait = spool.commit_interval;
    }
    if spool.max_bytes < (1 << 20) {
        return Err(src.error_at(None, "spool.max_bytes", "must be at least 1MiB"));
    }

    Ok(spool)
}
