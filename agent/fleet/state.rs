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
    /// Reads the state; a missing file is a fresh gateway. A file that cannot be read as state
    /// is an error for the caller to report (it is not silently replaced).
    pub(crate) fn load(dir: &Path) -> Result<State, FleetError> {
        let file = path(dir);
        match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| FleetError::invalid(&file, format!("not a fleet state file ({e})"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(FleetError::Read { path: file, source }),
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
            std::fs::rename(&tmp, &file)?;
            // The rename itself must survive a power cut.
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|source| FleetError::Write { path: file, source })
    }
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
}
