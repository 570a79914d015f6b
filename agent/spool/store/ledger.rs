//! The accounting totals and the next sequence number as of the last commit, and where each
//! commit writes them.
//!
//! A commit stores its counters with the records they count. The page of the block it
//! appends is written anyway; the `counters` table's page is one more, and at a slow stream's
//! pace (a commit a second holding one block of about 800 bytes) that page is half of what
//! the spool writes. So a commit that appended a block small enough to stay within one page
//! with the totals beside it writes them onto that block's row (`blocks.ledger`), and any
//! other commit writes them into the `counters` table. Every write carries a generation, one
//! more than the last commit's, and the newest is the truth: the `counters` table's, or the
//! newest block's when its generation is higher. Only the newest block can hold the newest
//! copy: block ids only grow, and a commit that deletes or replaces that block writes its
//! own copy, onto its own new block or into the table.
//!
//! The copy on a block is every known counter's total (not a change), so nothing older is
//! needed to read it; counters this build does not know stay in the table as they were.
//!
//! This module never decides what is counted (store.rs does) and never writes the table.

use crate::frame::{get_varint, put_varint, unzigzag, zigzag};
use rusqlite::{Connection, OptionalExtension};
use std::collections::BTreeMap;

/// The `counters` row (route `''`) holding the generation of the table's totals.
pub(super) const GENERATION_ROW: &str = "ledger_gen";

/// Format of a block's copy: this byte, then varints: generation, next sequence number, and
/// per counter its row (length + 1, or 0 for the row before), its name (1 received,
/// 2 delivered, else 0, length and text) and its value (zigzag).
const COPY_VERSION: u8 = 1;

/// What the spool's file says the totals are.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Ledger {
    /// The newest generation written (0 for a file before generations).
    pub(super) generation: u64,
    /// `None` for a file that never committed one.
    pub(super) next_seq: Option<i64>,
    /// The same as the `counters` table holds it.
    pub(super) table_next_seq: Option<i64>,
    /// The block whose copy is the newest, when one is.
    pub(super) copy_on: Option<i64>,
    /// (row, counter name) -> total, the newest copy over the table's.
    pub(super) totals: BTreeMap<(String, String), i64>,
    /// The same as the `counters` table holds them (what a write to the table must update).
    pub(super) table: BTreeMap<(String, String), i64>,
}

/// Reads the newest totals. A file whose newest block cannot be read (a damaged one being
/// salvaged) gives the table's.
pub(super) fn read(conn: &Connection) -> rusqlite::Result<Ledger> {
    let mut ledger = Ledger::default();
    let mut stmt = conn.prepare("SELECT route, name, value FROM counters")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (route, name, value) = row?;
        match (route.as_str(), name.as_str()) {
            ("", "next_seq") => ledger.table_next_seq = Some(value),
            ("", GENERATION_ROW) => ledger.generation = value.max(0) as u64,
            _ => {
                ledger.table.insert((route, name), value);
            }
        }
    }
    ledger.totals.clone_from(&ledger.table);
    ledger.next_seq = ledger.table_next_seq;
    let newest: Option<(i64, Option<Vec<u8>>)> = if has_ledger_column(conn) {
        conn.query_row(
            "SELECT id, ledger FROM blocks ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the spool's newest block could not be read; its counters are the table's");
            None
        })
    } else {
        None
    };
    if let Some((id, Some(copy))) = newest {
        match decode(&copy) {
            Some(copy) if copy.generation > ledger.generation => {
                ledger.copy_on = Some(id);
                ledger.generation = copy.generation;
                ledger.next_seq = Some(copy.next_seq);
                for (row, name, value) in copy.totals {
                    ledger.totals.insert((row, name), value);
                }
            }
            Some(_) => {}
            None => tracing::warn!(
                "the spool's newest block holds counters this build cannot read; the table's are used"
            ),
        }
    }
    Ok(ledger)
}

/// Whether the file's `blocks` has the `ledger` column (schema 3 on).
pub(super) fn has_ledger_column(conn: &Connection) -> bool {
    conn.prepare("SELECT ledger FROM blocks LIMIT 0").is_ok()
}

/// A block's copy of the totals: (row, counter name, total) in the order given.
pub(super) fn encode<'a, N: AsRef<str>>(
    generation: u64,
    next_seq: u64,
    totals: impl Iterator<Item = (&'a str, N, i64)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(COPY_VERSION);
    put_varint(&mut out, generation);
    put_varint(&mut out, next_seq);
    let mut last_row: Option<&str> = None;
    for (row, name, value) in totals {
        if last_row == Some(row) {
            out.push(0);
        } else {
            put_varint(&mut out, row.len() as u64 + 1);
            out.extend_from_slice(row.as_bytes());
            last_row = Some(row);
        }
        match name.as_ref() {
            "received" => out.push(1),
            "delivered" => out.push(2),
            other => {
                out.push(0);
                put_varint(&mut out, other.len() as u64);
                out.extend_from_slice(other.as_bytes());
            }
        }
        put_varint(&mut out, zigzag(value as u64));
    }
    out
}

struct Copy {
    generation: u64,
    next_seq: i64,
    totals: Vec<(String, String, i64)>,
}

fn decode(data: &[u8]) -> Option<Copy> {
    if data.first() != Some(&COPY_VERSION) {
        return None;
    }
    let mut pos = 1;
    let varint = |pos: &mut usize| get_varint(data, pos).ok();
    let generation = varint(&mut pos)?;
    let next_seq = i64::try_from(varint(&mut pos)?).ok()?;
    let text = |pos: &mut usize, len: u64| {
        let end = pos.checked_add(usize::try_from(len).ok()?)?;
        let text = String::from_utf8(data.get(*pos..end)?.to_vec()).ok()?;
        *pos = end;
        Some(text)
    };
    let mut totals = Vec::new();
    let mut row = String::new();
    while pos < data.len() {
        match varint(&mut pos)? {
            0 if totals.is_empty() => return None,
            0 => {}
            len => row = text(&mut pos, len - 1)?,
        }
        let code = *data.get(pos)?;
        pos += 1;
        let name = match code {
            1 => "received".to_string(),
            2 => "delivered".to_string(),
            0 => {
                let len = varint(&mut pos)?;
                text(&mut pos, len)?
            }
            _ => return None,
        };
        let value = unzigzag(varint(&mut pos)?) as i64;
        totals.push((row.clone(), name, value));
    }
    Some(Copy {
        generation,
        next_seq,
        totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::store::{Counter, DropReason};

    #[test]
    fn a_copy_reads_back_as_written_and_stays_small() {
        let mut totals = BTreeMap::new();
        totals.insert(("telemetry".to_string(), Counter::Received), 1_200_345);
        totals.insert(("telemetry".to_string(), Counter::Delivered), 1_200_000);
        totals.insert(
            (
                "telemetry".to_string(),
                Counter::Dropped(DropReason::Oversize),
            ),
            3,
        );
        totals.insert(
            ("telemetry/stream".to_string(), Counter::Received),
            1_200_345,
        );
        totals.insert(("telemetry/stream".to_string(), Counter::Delivered), -1);
        let copy = encode(
            77,
            1_200_346,
            totals.iter().map(|((r, c), v)| (r.as_str(), c.name(), *v)),
        );
        assert!(copy.len() < 80, "{} bytes", copy.len());
        let back = decode(&copy).expect("a copy this build wrote");
        assert_eq!((back.generation, back.next_seq), (77, 1_200_346));
        let expected: Vec<(String, String, i64)> = totals
            .iter()
            .map(|((row, c), v)| (row.clone(), c.name().into_owned(), *v))
            .collect();
        assert_eq!(back.totals, expected);
        for cut in 1..copy.len() {
            // A cut copy is refused or reads as fewer counters, never as other values.
            if let Some(short) = decode(&copy[..cut]) {
                assert!(expected.starts_with(&short.totals), "cut at {cut}");
            }
        }
        assert!(
            decode(&[9, 1, 1]).is_none(),
            "an unknown version is refused"
        );
    }
}
