//! Human-readable accounting for `edgeship status`. Formatting only.

use crate::spool::Accounting;
use std::fmt::Write;
use std::path::Path;

pub fn render(spool: &Path, acc: &Accounting) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "spool      {}", spool.display());
    let _ = writeln!(s, "received   {}", acc.received);
    let _ = writeln!(s, "delivered  {}", acc.delivered);
    let _ = writeln!(s, "dropped    {}", acc.dropped);
    for (reason, n) in &acc.dropped_by_reason {
        let _ = writeln!(s, "  {reason:<16} {n}");
    }
    let _ = writeln!(
        s,
        "pending    {} ({} bytes spooled)",
        acc.pending, acc.pending_bytes
    );
    let _ = writeln!(
        s,
        "dead letters {}   quarantined blocks {}",
        acc.dead_letters, acc.quarantined_blocks
    );
    let _ = writeln!(
        s,
        "balance    received = delivered + dropped + pending: {}",
        if acc.balances() {
            "holds"
        } else {
            "DOES NOT HOLD"
        }
    );
    s
}
