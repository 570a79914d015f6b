//! A local folder as a destination: each frame becomes one file, written whole then renamed
//! into place, so a reader never sees half a frame. Used by `edgeship demo`, and by operators
//! who want frames on disk (e.g. for a later bulk upload). `edgeship decode FILE` reads them.

use super::{Accepted, Entry, EntryFailure, Outcome, SinkError};
use std::path::{Path, PathBuf};

pub struct DirectorySink {
    name: String,
    dir: PathBuf,
}

impl DirectorySink {
    pub fn open(name: &str, dir: &Path) -> Result<DirectorySink, SinkError> {
        std::fs::create_dir_all(dir).map_err(|e| SinkError {
            destination: name.to_string(),
            code: "IoError".into(),
            message: format!("cannot create {}: {e}", dir.display()),
            retryable: false,
        })?;
        Ok(DirectorySink {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        })
    }

    /// Whether a frame can be written: a file created and removed in the folder.
    pub async fn probe(&self) -> Result<(), String> {
        let file = self.dir.join(".edgeship-probe");
        std::fs::write(&file, b"")
            .and_then(|()| std::fs::remove_file(&file))
            .map_err(|e| format!("cannot write in {}: {e}", self.dir.display()))
    }

    pub async fn put(&self, entries: &[&Entry]) -> Result<Vec<Outcome>, SinkError> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let file = self.dir.join(format!("{:020}.eshp", e.first_seq));
            let tmp = self.dir.join(format!(".{:020}.eshp.tmp", e.first_seq));
            let written = async {
                tokio::fs::write(&tmp, &e.data).await?;
                tokio::fs::rename(&tmp, &file).await
            }
            .await;
            out.push(
                written
                    .map(|()| Accepted::default())
                    .map_err(|err| EntryFailure {
                        code: "IoError".into(),
                        message: format!("{}: {}: {err}", self.name, file.display()),
                        shard: None,
                    }),
            );
        }
        Ok(out)
    }
}
