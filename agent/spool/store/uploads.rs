//! Object uploads in progress: what an object destination (S3) fixed about an object before
//! sending it, so an upload cut off by a crash resumes with the same key and the same records
//! instead of writing a second object that overlaps the first.
//!
//! # Layout
//! `uploads (destination, route, key, first_block, last_block, upload_id, parts)`: at most
//! one row per destination (one object in upload at a time). The object holds the blocks of
//! `route` with ids in `first_block..=last_block` that the destination owes; `upload_id` is
//! the multipart upload's id once created (`NULL` for a single PUT, or before the create
//! answered); `parts` lists each uploaded part as `<etag> <md5-hex>\n`, in part order.
//!
//! The row is written before the upload starts and changed as it goes, each change its own
//! small transaction (a handful per object of tens of MiB); it is deleted in the transaction
//! that records the object's blocks delivered, so after any crash either the row is there
//! (resume) or the blocks are gone (done). Nothing here talks to S3.

use super::{SpoolError, Store, Upload, UploadChange, UploadedPart};
use rusqlite::{params, OptionalExtension};

fn parse_parts(text: &str) -> Vec<UploadedPart> {
    text.lines()
        .filter_map(|l| {
            let (etag, md5) = l.rsplit_once(' ')?;
            Some(UploadedPart {
                etag: etag.to_string(),
                md5: md5.to_string(),
            })
        })
        .collect()
}

impl Store {
    /// The object `destination` was uploading when it stopped, if any.
    pub(crate) fn upload_of(&self, destination: &str) -> Result<Option<Upload>, SpoolError> {
        self.conn
            .query_row(
                "SELECT route, key, first_block, last_block, upload_id, parts FROM uploads WHERE destination = ?1",
                [destination],
                |r| {
                    Ok(Upload {
                        destination: destination.to_string(),
                        route: r.get(0)?,
                        key: r.get(1)?,
                        first_block: r.get(2)?,
                        last_block: r.get(3)?,
                        upload_id: r.get(4)?,
                        parts: parse_parts(&r.get::<_, String>(5)?),
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Applies one change to `destination`'s upload row (in the open transaction, or as its
    /// own when none is open).
    pub(crate) fn change_upload(
        &mut self,
        destination: &str,
        change: &UploadChange,
    ) -> Result<(), SpoolError> {
        let r = match change {
            UploadChange::Begin(u) => self.conn.execute(
                "INSERT OR REPLACE INTO uploads (destination, route, key, first_block, last_block, upload_id, parts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    destination,
                    u.route,
                    u.key,
                    u.first_block,
                    u.last_block,
                    u.upload_id,
                    u.parts.iter().map(|p| format!("{} {}\n", p.etag, p.md5)).collect::<String>()
                ],
            ),
            UploadChange::UploadId(id) => self.conn.execute(
                "UPDATE uploads SET upload_id = ?2, parts = '' WHERE destination = ?1",
                params![destination, id],
            ),
            UploadChange::Part(p) => self.conn.execute(
                "UPDATE uploads SET parts = parts || ?2 WHERE destination = ?1",
                params![destination, format!("{} {}\n", p.etag, p.md5)],
            ),
        };
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    /// The object of `destination` is uploaded (in the transaction that records its blocks
    /// delivered).
    pub(crate) fn end_upload(&mut self, destination: &str) -> Result<(), SpoolError> {
        self.conn
            .execute("DELETE FROM uploads WHERE destination = ?1", [destination])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every upload row, for a rebuilt file.
    pub(super) fn all_uploads(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<Upload>> {
        let mut st = conn.prepare(
            "SELECT destination, route, key, first_block, last_block, upload_id, parts FROM uploads",
        )?;
        let rows = st.query_map([], |r| {
            Ok(Upload {
                destination: r.get(0)?,
                route: r.get(1)?,
                key: r.get(2)?,
                first_block: r.get(3)?,
                last_block: r.get(4)?,
                upload_id: r.get(5)?,
                parts: parse_parts(&r.get::<_, String>(6)?),
            })
        })?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncLevel;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(&dir.join("spool.db"), SyncLevel::Normal)
            .unwrap()
            .0
    }

    #[test]
    fn an_upload_row_keeps_its_object_its_upload_id_and_its_parts_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        assert_eq!(s.upload_of("lake").unwrap(), None);
        let begun = Upload {
            destination: "lake".into(),
            route: "r".into(),
            key: "p/dt=2026-12-03/hr=13/gw-1-9.ndjson.zst".into(),
            first_block: 1,
            last_block: 7,
            upload_id: None,
            parts: Vec::new(),
        };
        s.change_upload("lake", &UploadChange::Begin(begun.clone()))
            .unwrap();
        s.change_upload("lake", &UploadChange::UploadId(Some("u1".into())))
            .unwrap();
        let part = |n: &str| UploadedPart {
            etag: format!("\"e{n}\""),
            md5: format!("m{n}"),
        };
        s.change_upload("lake", &UploadChange::Part(part("1")))
            .unwrap();
        s.change_upload("lake", &UploadChange::Part(part("2")))
            .unwrap();
        drop(s);
        let mut s = open(dir.path());
        let got = s.upload_of("lake").unwrap().unwrap();
        assert_eq!(
            got,
            Upload {
                upload_id: Some("u1".into()),
                parts: vec![part("1"), part("2")],
                ..begun.clone()
            }
        );
        // Given up: a new upload id starts with no parts.
        s.change_upload("lake", &UploadChange::UploadId(None))
            .unwrap();
        assert_eq!(s.upload_of("lake").unwrap().unwrap(), begun);
        assert_eq!(s.upload_of("other").unwrap(), None);
        s.end_upload("lake").unwrap();
        assert_eq!(s.upload_of("lake").unwrap(), None);
    }
}
