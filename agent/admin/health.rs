//! Liveness and readiness, as `/healthz` and `/readyz` answer them.
//!
//! Live: the spool thread is running (the async runtime answering the request is the rest).
//! Ready: every broker session is up, the spool commits (writable, not full), and every
//! destination either accepts calls or its backlog is still small (under half the spool cap),
//! so a short uplink outage does not flap a fleet monitor. Checks only read live figures.

use crate::live::Live;
use crate::status::Check;
use std::sync::atomic::Ordering::Relaxed;

pub(crate) fn alive(live: &Live) -> bool {
    !live.spool.stats().stopped.load(Relaxed)
}

pub(crate) fn readiness(live: &Live) -> Vec<Check> {
    let mut checks = Vec::new();
    for (name, s) in &live.sources {
        let connected = s.connected.load(Relaxed);
        let subscribed = s.subscriptions_settled();
        checks.push(Check {
            name: format!("broker {name}"),
            ok: connected && subscribed,
            detail: if !connected {
                format!(
                    "not connected ({} failed attempts so far)",
                    s.connection_errors.load(Relaxed)
                )
            } else if !subscribed {
                "connected; the broker has not granted the subscriptions yet".into()
            } else {
                "connected".into()
            },
        });
    }
    let spool = live.spool.stats();
    let (writable, full, stopped, disk_cap) = (
        spool.writable.load(Relaxed),
        spool.full.load(Relaxed),
        spool.stopped.load(Relaxed),
        spool.room_cap.load(Relaxed),
    );
    checks.push(Check {
        name: "spool".into(),
        ok: writable && !full && !stopped && disk_cap == 0,
        detail: if stopped {
            "the spool thread has stopped".into()
        } else if disk_cap > 0 {
            format!("the disk filled before the spool's cap: it holds at most {disk_cap} bytes until the disk has room again")
        } else if !writable {
            "the last commit failed (disk full or I/O error); retrying".into()
        } else if full {
            "full: reading has stopped until the destinations catch up".into()
        } else {
            "writable".into()
        },
    });
    for (route, records, _) in live.orphaned() {
        checks.push(Check {
            name: format!("route {route}"),
            ok: false,
            detail: format!(
                "{records} records spooled that no destination ships (the route and its destination were removed); add the route back, or remove them with `edgeship spool drop-route {route}` while the agent is stopped"
            ),
        });
    }
    let pending = spool.pending_bytes.load(Relaxed);
    let bound = live.config().spool.max_bytes / 2;
    for (name, s) in &live.shippers() {
        if !s.shipping.load(Relaxed) {
            checks.push(Check {
                name: format!("destination {name}"),
                ok: false,
                detail: format!(
                    "not shipping: it stopped on its own {} time(s) and is being started again",
                    s.restarts.load(Relaxed)
                ),
            });
            continue;
        }
        let failing = s.failing.load(Relaxed);
        let ok = !failing || pending < bound;
        let detail = match (failing, ok) {
            (false, _) => "accepting".to_string(),
            (true, true) => format!(
                "failing, backlog {pending} bytes is within bounds ({bound}): {}",
                s.last_error().unwrap_or_default()
            ),
            (true, false) => format!(
                "failing with a backlog of {pending} bytes (bound {bound}): {}",
                s.last_error().unwrap_or_default()
            ),
        };
        checks.push(Check {
            name: format!("destination {name}"),
            ok,
            detail,
        });
    }
    checks
}
