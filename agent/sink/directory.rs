//! A local folder as a destination: each frame becomes one file, written whole, synced, then
//! renamed into place and the folder synced, so a reader never sees half a frame and an
//! accepted frame survives power loss. Used by `edgeship demo`, and by operators who want
//! frames on disk (e.g. for a later bulk upload). `edgeship decode FILE` reads them.

use crate::sink::call::{CallLimits, Destination, Entry, Failure, FailureKind, Outcome, SinkError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A `[destination.NAME]` of `type = "directory"`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryConfig {
    pub(crate) path: PathBuf,
}

/// Frames written to a folder are kept to the size of a default Kinesis record, so they can
/// be uploaded as such later.
pub(crate) const MAX_RECORD_BYTES: u64 = 1 << 20;

const CALL: CallLimits = CallLimits {
    max_entries: 64,
    max_bytes: 64 << 20,
    queued_calls: 2,
};

pub(crate) struct DirectorySink {
    name: String,
    dir: PathBuf,
}

impl DirectorySink {
    pub(crate) fn open(name: &str, config: &DirectoryConfig) -> Result<DirectorySink, SinkError> {
        let dir = &config.path;
        std::fs::create_dir_all(dir).map_err(|e| SinkError {
            destination: name.to_string(),
            failure: Failure::new(
                FailureKind::Refused,
                "IoError",
                format!("cannot create {}: {e}", dir.display()),
            ),
        })?;
        Ok(DirectorySink {
            name: name.to_string(),
            dir: dir.clone(),
        })
    }
}

/// Writes one frame durably: temporary file, fsync, rename, fsync of the folder.
fn write_frame(dir: &Path, first_seq: i64, data: &[u8]) -> std::io::Result<()> {
    let file = dir.join(format!("{first_seq:020}.eshp"));
    let tmp = dir.join(format!(".{first_seq:020}.eshp.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &file)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Destination for DirectorySink {
    fn call_limits(&self) -> CallLimits {
        CALL
    }

    fn max_record_bytes(&self) -> u64 {
        MAX_RECORD_BYTES
    }

    async fn put(&self, entries: &[&Entry], _timeout: Duration) -> Result<Vec<Outcome>, SinkError> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let (dir, seq, data) = (self.dir.clone(), e.first_seq, e.data.clone());
            let written = tokio::task::spawn_blocking(move || write_frame(&dir, seq, &data))
                .await
                .unwrap_or_else(|j| Err(std::io::Error::other(j.to_string())));
            out.push(match written {
                Ok(_) => Outcome::Accepted { shard: None },
                Err(err) => Outcome::Failed {
                    failure: Failure::new(
                        FailureKind::Transient,
                        "IoError",
                        format!(
                            "{}: frame {} in {}: {err}",
                            self.name,
                            e.first_seq,
                            self.dir.display()
                        ),
                    ),
                    shard: None,
                },
            });
        }
        Ok(out)
    }

    /// Whether a frame can be written: a file created and removed in the folder.
    async fn probe(&self) -> Result<(), Failure> {
        let file = self.dir.join(".edgeship-probe");
        std::fs::write(&file, b"")
            .and_then(|()| std::fs::remove_file(&file))
            .map_err(|e| {
                Failure::new(
                    FailureKind::Transient,
                    "IoError",
                    format!("cannot write in {}: {e}", self.dir.display()),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_land_whole_under_their_first_seq() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DirectorySink::open(
            "d",
            &DirectoryConfig {
                path: dir.path().join("out"),
            },
        )
        .unwrap();
        let e = Entry {
            data: b"frame".to_vec(),
            key: "k".into(),
            first_seq: 7,
        };
        let out = sink.put(&[&e], Duration::from_secs(1)).await.unwrap();
        assert_eq!(out, vec![Outcome::Accepted { shard: None }]);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("{:020}.eshp", 7)]);
        sink.probe().await.unwrap();
    }
}
