//! What the fleet channel must remember across restarts: the last known good document and the
//! highest version seen, in one small JSON file replaced atomically (write, fsync, rename).
//!
//! It must never record a document as good before its health check passed, and never lower
//! the highest version seen (that is what stops a replayed old document).

use super::error::FleetError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "fleet-state.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    /// The envelope of the last document applied whose health check passed.
    pub(crate) good: Option<String>,
    /// Its version (0: the local file alone).
    pub(crate) good_version: u64,
    /// Highest version of an authentic document this gateway has tried or refused as
    /// invalid: nothing at or below it is applied again.
    pub(crate) highest_seen: u64,
    /// The last document that failed, and why (reported in the status).
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_version: Option<u64>,
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

impl State {
    /// Reads the state; a missing file is a fresh gateway. The previous state is kept beside
    /// it (`.prev`), so a damaged file falls back to the one before (its highest version is
    /// at most one document behind). When neither can be read, that is an error for the
    /// caller to act on: it is never silently replaced by a fresh state.
    pub(crate) fn load(dir: &Path) -> Result<State, FleetError> {
        let file = path(dir);
        let prev = previous(dir);
        let read = |file: &Path| -> Result<Option<State>, FleetError> {
            match std::fs::read(file) {
                Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                    FleetError::invalid(file, format!("not a fleet state file ({e})"))
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(FleetError::Read {
                    path: file.to_path_buf(),
                    source,
                }),
            }
        };
        match read(&file) {
            Ok(Some(state)) => Ok(state),
            // A crash between the two renames of a save leaves only the previous one.
            Ok(None) => Ok(read(&prev).ok().flatten().unwrap_or_default()),
            Err(e) => match read(&prev) {
                Ok(Some(state)) => {
                    tracing::warn!(error = %e, previous = %prev.display(), "fleet state unreadable; using the previous one");
                    Ok(state)
                }
                _ => Err(e),
            },
        }
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<(), FleetError> {
        let file = path(dir);
        let tmp = dir.join(format!("{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).expect("state serialises"))?;
            f.sync_all()?;
            match std::fs::rename(&file, previous(dir)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::rename(&tmp, &file)?;
            // The renames themselves must survive a power cut.
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|source| FleetError::Write { path: file, source })
    }
}

fn previous(dir: &Path) -> PathBuf {
    dir.join(format!("{FILE}.prev"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_fresh() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), State::default());
        let s = State {
            good: Some("{}".into()),
            good_version: 3,
            highest_seen: 5,
            last_error: Some("x".into()),
            last_error_version: Some(5),
        };
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
        std::fs::write(path(dir.path()), "nonsense").unwrap();
        assert!(State::load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not a fleet state file"));
    }

    #[test]
    fn a_damaged_state_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = State {
            highest_seen: 5,
            ..State::default()
        };
        first.save(dir.path()).unwrap();
        let second = State {
            highest_seen: 6,
            ..State::default()
        };
        second.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), second);
        std::fs::write(path(dir.path()), "{ torn").unwrap();
        assert_eq!(
            State::load(dir.path()).unwrap(),
            first,
            "the previous state, never a fresh one"
        );
    }
}
