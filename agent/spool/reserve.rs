//! The spool's reserve: a file of real, allocated bytes beside the spool (`<spool>.reserve`)
//! that is given back to the file system the moment the disk fills, so the spool can still
//! commit the deletions that make room (a delivery, a `drop_oldest` eviction) and the
//! checkpoints that move them into the database file. Without it, a disk filled by another
//! program leaves SQLite unable to grow its write-ahead log by one page, and a spool that
//! cannot log a deletion can never shrink.
//!
//! The reserve is made again only when the file system has room for it twice over, so
//! holding it never takes the last free space from the spool itself.
//!
//! This module must never touch the spool's own files, and never fail the spool: a reserve
//! that cannot be made is logged and tried again later.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The reserve of a spool at `spool`, sized for a spool capped at `max_bytes`.
pub(crate) struct Reserve {
    path: PathBuf,
    size: u64,
    held: bool,
}

impl Reserve {
    /// What the write-ahead log can hold before a checkpoint (4 MiB) and one transaction
    /// (2 MiB of payload) with room to spare: a checkpoint that must grow the file by every
    /// page in the log then always fits in the space the reserve gives back.
    pub(crate) const SIZE: u64 = 8 << 20;

    pub(crate) fn path_for(spool: &Path) -> PathBuf {
        PathBuf::from(format!("{}.reserve", spool.display()))
    }

    /// Takes the reserve at start: keeps one already there (of the right size), or makes
    /// one if there is room.
    pub(crate) fn open(spool: &Path) -> Reserve {
        let mut reserve = Reserve {
            path: Reserve::path_for(spool),
            size: Reserve::SIZE,
            held: false,
        };
        match std::fs::metadata(&reserve.path) {
            Ok(m) if m.len() == reserve.size => reserve.held = true,
            _ => {
                let _ = std::fs::remove_file(&reserve.path);
                if !reserve.restore() {
                    tracing::warn!(file = %reserve.path.display(), bytes = reserve.size, "no room for the spool's disk reserve; a full disk may stop the spool until space returns (tried again while the disk is full)");
                }
            }
        }
        reserve
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> bool {
        self.held
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Gives the reserve's space back to the file system. Returns whether there was any.
    pub(crate) fn release(&mut self) -> bool {
        let was = self.held;
        self.held = false;
        match std::fs::remove_file(&self.path) {
            Ok(()) => was,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot remove the spool's disk reserve");
                false
            }
        }
    }

    /// Makes the reserve again if the file system has room for it twice over. Returns
    /// whether it is held.
    pub(crate) fn restore(&mut self) -> bool {
        if self.held {
            return true;
        }
        match crate::process::disk_free_bytes(&self.path) {
            Some(free) if free >= 2 * self.size => {}
            _ => return false,
        }
        match self.write() {
            Ok(()) => {
                self.held = true;
                true
            }
            Err(e) => {
                tracing::debug!(file = %self.path.display(), error = %e, "spool reserve not made");
                let _ = std::fs::remove_file(&self.path);
                false
            }
        }
    }

    /// Real bytes, not a sparse file: a hole gives nothing back when removed.
    fn write(&self) -> std::io::Result<()> {
        let mut file = std::fs::File::create(&self.path)?;
        let chunk = vec![0u8; 64 << 10];
        let mut left = self.size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_made_released_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut r = Reserve::open(&spool);
        assert!(r.held());
        let len = || std::fs::metadata(Reserve::path_for(&spool)).unwrap().len();
        assert_eq!(len(), Reserve::SIZE);
        assert!(r.release());
        assert!(!Reserve::path_for(&spool).exists());
        assert!(!r.release(), "released once");
        assert!(r.restore());
        assert_eq!(len(), Reserve::SIZE);
        // One of another size (cut short by a crash) is made again at open.
        drop(r);
        std::fs::write(Reserve::path_for(&spool), b"short").unwrap();
        let r = Reserve::open(&spool);
        assert!(r.held());
        assert_eq!(len(), Reserve::SIZE);
    }
}
