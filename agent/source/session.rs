//! One MQTT session's state, without I/O: what the intake owes the broker, and when it may
//! read. The connection loop ([`super::mqtt`]) reads packets, hands them here, and writes
//! what this says; it decides nothing itself.
//!
//! What it keeps:
//! - **A generation per connection.** Every message handed to the spool carries the
//!   generation it came in on; its ack, once committed, is written only if the connection is
//!   still that one (a packet id of another connection names another message). Acks of an
//!   earlier connection are counted (`stale_acks`) and dropped: the broker sends those
//!   messages again.
//! - **Acks ready to write**, written together: every ack that is ready when the socket is
//!   writable goes out in one write.
//! - **The window.** Reading stops while `max_unacked` messages wait for their commit, which
//!   pushes back on the broker through TCP whatever it does with Receive Maximum. While the
//!   agent is not reading, an unanswered PINGREQ is no sign of a dead broker (the answer waits
//!   behind the messages), so the keep-alive deadline runs only while reading.
//! - **QoS 2 receipts.** A QoS 2 message's packet id is remembered from the commit that
//!   spooled it (the spool persists it in the same transaction) until its PUBREL: a resent
//!   PUBLISH with that id is not spooled again, only answered with PUBREC, and a PUBREL is
//!   always answered with PUBCOMP, after a reconnect or a restart too.
//! - **Subscriptions** asked for until the broker grants them: a SUBSCRIBE not answered in
//!   time is sent again; readiness is false while any filter is not granted.
//!
//! It must never ack a message before its commit, never write an ack on a connection other
//! than the one its message came in on, and never spool a QoS 2 message twice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// A packet the session must write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outbound {
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    PingReq,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Disconnect,
}

/// A packet the broker sent besides CONNACK and PUBLISH ([`Session::on_connected`],
/// [`Session::on_publish`]), as far as the session cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    PubRel {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        granted: usize,
        refused: usize,
    },
    UnsubAck {
        pkid: u16,
    },
    PingResp,
}

/// What to do with a PUBLISH just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Hand it to the spool with this ticket; its ack follows the commit.
    Spool(Ticket),
    /// QoS 0: hand it to the spool, nothing to ack.
    SpoolNoAck,
    /// A QoS 2 message spooled before (its PUBREL has not come): not spooled again, its
    /// PUBREC is queued.
    Duplicate,
}

/// What a message handed to the spool carries back once committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) generation: u64,
    pub(crate) qos: u8,
    pub(crate) pkid: u16,
}

/// Why a connection is given up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Dead {
    #[error("the broker did not answer a ping within {0:?}")]
    PingTimeout(Duration),
    #[error("the broker released packet {0} with PUBREL before this connection's CONNACK")]
    NotConnected(u16),
}

/// Counters the session keeps for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Committed messages whose ack was not written: they came in on an earlier connection.
    pub(crate) stale_acks: u64,
    /// QoS 2 messages the broker sent again before their PUBREL, not spooled again.
    pub(crate) qos2_duplicates: u64,
    /// SUBSCRIBE packets sent again because the broker had not answered in time.
    pub(crate) subscribe_retries: u64,
    /// Acks found, at the moment of writing, to belong to another connection than the one
    /// being written to, and held back. Zero unless this module has a defect; counted so a
    /// test and an operator can see it stays zero.
    pub(crate) misdirected: u64,
}

/// How long a SUBSCRIBE may go unanswered before it is sent again.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Session {
    keep_alive: Duration,
    max_unacked: usize,
    generation: u64,
    connected: bool,
    /// Messages handed to the spool and not yet committed, of any generation (they hold
    /// memory whichever connection they came on).
    awaiting_commit: usize,
    /// Acks to write, in commit order, each with the connection it belongs to.
    ready: VecDeque<(u64, Outbound)>,
    /// QoS 2 packet ids spooled (PUBREC owed or sent), waiting for their PUBREL.
    qos2: BTreeSet<u16>,
    /// QoS 2 packet ids handed to the spool and not committed yet, with their generation.
    qos2_pending: BTreeMap<u16, u64>,
    /// Pending QoS 2 packet ids the broker sent again: their PUBREC follows the commit of
    /// the first copy.
    qos2_owed: BTreeSet<u16>,
    /// The generation of the last connection whose broker kept no session: QoS 2 messages
    /// of earlier generations are no receipts of the broker's session now.
    receipts_from: u64,
    last_write: Option<Instant>,
    /// The earliest PINGREQ not answered yet.
    ping_sent: Option<Instant>,
    /// When the broker was last heard from (any bytes), or reading last resumed: the
    /// connection is dead only after a keep-alive interval of silence while reading.
    last_heard: Option<Instant>,
    paused: bool,
    /// Packets written by the agent wait for the socket to take them (a broker reading
    /// slowly): a PINGREQ behind them has not reached the broker.
    writes_waiting: bool,
    /// Filters wanted, and for each whether the broker granted it on this connection.
    wanted: Vec<(String, u8)>,
    granted: bool,
    /// The SUBSCRIBE in flight and when it was sent; `None` with `granted` false: send one.
    subscribing: Option<(u16, Instant)>,
    unsubscribing: BTreeMap<u16, Vec<String>>,
    to_unsubscribe: Vec<String>,
    next_pkid: u16,
    counts: Counts,
}

impl Session {
    /// A session that has spooled the QoS 2 packet ids `qos2` before (from the spool).
    pub(crate) fn new(
        keep_alive: Duration,
        max_unacked: usize,
        filters: Vec<(String, u8)>,
        qos2: impl IntoIterator<Item = u16>,
    ) -> Session {
        Session {
            keep_alive,
            max_unacked: max_unacked.max(1),
            generation: 0,
            connected: false,
            awaiting_commit: 0,
            ready: VecDeque::new(),
            qos2: qos2.into_iter().collect(),
            qos2_pending: BTreeMap::new(),
            qos2_owed: BTreeSet::new(),
            receipts_from: 0,
            last_write: None,
            ping_sent: None,
            last_heard: None,
            paused: false,
            writes_waiting: false,
            wanted: filters,
            granted: false,
            subscribing: None,
            unsubscribing: BTreeMap::new(),
            to_unsubscribe: Vec::new(),
            next_pkid: 0,
            counts: Counts::default(),
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the connection may read another packet: fewer than `max_unacked` messages
    /// wait for their commit.
    pub(crate) fn may_read(&self) -> bool {
        self.awaiting_commit < self.max_unacked
    }

    /// Whether a silent broker is at fault: the agent reads, and no message waits for its
    /// commit. While one does, the broker may rightly be waiting for its ack (its inflight
    /// window full), and its PINGRESP may sit behind messages the agent has not read yet; a
    /// commit slowed by a busy disk must not pass for a dead connection. Nor is it while the
    /// agent's own packets wait for the socket: its ping has not reached the broker yet.
    fn broker_owes(&self) -> bool {
        self.may_read() && self.awaiting_commit == 0 && !self.writes_waiting
    }

    /// Whether packets the agent wrote still wait for the socket to take them.
    pub(crate) fn set_writes_waiting(&mut self, waiting: bool) {
        self.writes_waiting = waiting;
    }

    /// Connected and every wanted filter granted.
    pub(crate) fn ready(&self) -> bool {
        self.connected && self.granted
    }

    pub(crate) fn awaiting_commit(&self) -> usize {
        self.awaiting_commit
    }

    /// A new connection's CONNACK. Acks still owed to the last one are not written on this
    /// one; they are counted stale as their commits arrive. If the broker kept nothing, its
    /// QoS 2 receipts are gone too (it will not send those PUBRELs).
    pub(crate) fn on_connected(&mut self, session_present: bool) {
        self.generation += 1;
        self.connected = true;
        self.counts.stale_acks += self
            .ready
            .iter()
            .filter(|(_, o)| matches!(o, Outbound::PubAck(_) | Outbound::PubRec(_)))
            .count() as u64;
        self.ready.clear();
        self.ping_sent = None;
        self.last_write = None;
        self.last_heard = None;
        self.paused = false;
        self.granted = self.wanted.is_empty();
        self.subscribing = None;
        self.unsubscribing.clear();
        self.to_unsubscribe.clear();
        if !session_present {
            self.qos2.clear();
            self.qos2_owed.clear();
            self.receipts_from = self.generation;
        }
    }

    pub(crate) fn on_disconnected(&mut self) {
        self.connected = false;
        self.ping_sent = None;
    }

    /// A PUBLISH was read: what to do with it. A QoS 1/2 message handed to the spool counts
    /// against the window until [`Session::committed`].
    pub(crate) fn on_publish(&mut self, qos: u8, pkid: u16) -> Take {
        match qos {
            0 => {
                self.awaiting_commit += 1;
                Take::SpoolNoAck
            }
            2 if self.qos2.contains(&pkid) => {
                self.counts.qos2_duplicates += 1;
                self.ready
                    .push_back((self.generation, Outbound::PubRec(pkid)));
                Take::Duplicate
            }
            // Sent again while the first copy (of a session the broker kept) awaits its
            // commit: its PUBREC follows that commit.
            2 if self
                .qos2_pending
                .get(&pkid)
                .is_some_and(|g| *g >= self.receipts_from) =>
            {
                self.counts.qos2_duplicates += 1;
                self.qos2_owed.insert(pkid);
                Take::Duplicate
            }
            _ => {
                self.awaiting_commit += 1;
                if qos == 2 {
                    self.qos2_pending.insert(pkid, self.generation);
                }
                Take::Spool(Ticket {
                    generation: self.generation,
                    qos,
                    pkid,
                })
            }
        }
    }

    /// A QoS 0 message's commit (it holds a place in the window, nothing more).
    pub(crate) fn committed_no_ack(&mut self) {
        self.awaiting_commit = self.awaiting_commit.saturating_sub(1);
    }

    /// A message's commit: its ack is queued if it came on this connection.
    pub(crate) fn committed(&mut self, t: Ticket) {
        self.awaiting_commit = self.awaiting_commit.saturating_sub(1);
        if t.qos == 2 {
            if self.qos2_pending.get(&t.pkid) == Some(&t.generation) {
                self.qos2_pending.remove(&t.pkid);
            }
            // Spooled once: a resent PUBLISH is a duplicate now, unless the broker has
            // since started a new session (where this id names another message).
            if t.generation >= self.receipts_from {
                self.qos2.insert(t.pkid);
                if self.qos2_owed.remove(&t.pkid) && self.connected {
                    self.ready
                        .push_back((self.generation, Outbound::PubRec(t.pkid)));
                    return;
                }
            }
        }
        if t.generation != self.generation || !self.connected {
            self.counts.stale_acks += 1;
            return;
        }
        let ack = match t.qos {
            2 => Outbound::PubRec(t.pkid),
            _ => Outbound::PubAck(t.pkid),
        };
        self.ready.push_back((t.generation, ack));
    }

    /// Bytes came from the broker: it is alive, whatever they are (a PINGRESP may wait
    /// behind many messages).
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
    }

    /// Any other packet from the broker.
    pub(crate) fn on_packet(&mut self, p: Inbound, now: Instant) -> Result<(), Dead> {
        match p {
            Inbound::PubRel { pkid } => {
                if !self.connected {
                    return Err(Dead::NotConnected(pkid));
                }
                // Answered whether or not the id is known: after a restart that lost
                // nothing, or a PUBREL sent twice, PUBCOMP is still the answer.
                self.qos2.remove(&pkid);
                self.ready
                    .push_back((self.generation, Outbound::PubComp(pkid)));
            }
            Inbound::SubAck {
                pkid,
                granted: _,
                refused,
            } => {
                if self.subscribing.is_some_and(|(p, _)| p == pkid) {
                    self.subscribing = None;
                    if refused == 0 {
                        self.granted = true;
                    } else {
                        // Asked again after the timeout: a broker may refuse until an ACL
                        // or a bridge is ready.
                        self.subscribing = Some((pkid, now));
                    }
                }
            }
            Inbound::UnsubAck { pkid } => {
                self.unsubscribing.remove(&pkid);
            }
            Inbound::PingResp => self.ping_sent = None,
        }
        Ok(())
    }

    /// The filters wanted changed (a config change): new ones are subscribed, gone ones
    /// unsubscribed. Returns the filters added and the ones removed (both empty when the
    /// config changed something else).
    pub(crate) fn set_filters(
        &mut self,
        filters: Vec<(String, u8)>,
    ) -> (Vec<(String, u8)>, Vec<String>) {
        let gone: Vec<String> = self
            .wanted
            .iter()
            .filter(|(f, _)| !filters.iter().any(|(n, _)| n == f))
            .map(|(f, _)| f.clone())
            .collect();
        let added: Vec<(String, u8)> = filters
            .iter()
            .filter(|f| !self.wanted.contains(f))
            .cloned()
            .collect();
        self.wanted = filters;
        if !added.is_empty() {
            self.granted = self.wanted.is_empty();
            self.subscribing = None;
        }
        self.to_unsubscribe.extend(gone.iter().cloned());
        (added, gone)
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % u16::MAX + 1;
        self.next_pkid
    }

    /// What to write now, in one write: every ack ready, a SUBSCRIBE or UNSUBSCRIBE due, a
    /// PINGREQ if nothing was written for a keep-alive interval. Dead if a ping went
    /// unanswered for a keep-alive interval while reading.
    pub(crate) fn due_writes(&mut self, now: Instant, out: &mut Vec<Outbound>) -> Result<(), Dead> {
        if !self.connected {
            return Ok(());
        }
        // Silence counts only while the broker owes the agent something; resuming restarts
        // the clock.
        if !self.broker_owes() {
            self.paused = true;
        } else if std::mem::take(&mut self.paused) {
            self.last_heard = Some(now);
        }
        if let Some(sent) = self.ping_sent {
            let quiet_since = self.last_heard.map_or(sent, |h| h.max(sent));
            if self.broker_owes() && now.duration_since(quiet_since) >= self.keep_alive {
                return Err(Dead::PingTimeout(self.keep_alive));
            }
        }
        for (generation, ack) in self.ready.drain(..) {
            if generation == self.generation {
                out.push(ack);
            } else {
                self.counts.misdirected += 1;
            }
        }
        let due = match self.subscribing {
            None => !self.granted,
            Some((_, sent)) => now.duration_since(sent) >= SUBSCRIBE_TIMEOUT,
        };
        if due && !self.wanted.is_empty() {
            if self.subscribing.is_some() {
                self.counts.subscribe_retries += 1;
            }
            let pkid = self.pkid();
            self.subscribing = Some((pkid, now));
            out.push(Outbound::Subscribe {
                pkid,
                filters: self.wanted.clone(),
            });
        }
        if !self.to_unsubscribe.is_empty() {
            let pkid = self.pkid();
            let filters = std::mem::take(&mut self.to_unsubscribe);
            self.unsubscribing.insert(pkid, filters.clone());
            out.push(Outbound::Unsubscribe { pkid, filters });
        }
        let idle = self
            .last_write
            .is_none_or(|t| now.duration_since(t) >= self.keep_alive);
        // A ping whenever nothing else was written for a keep-alive interval, answered or
        // not: the broker must hear from the agent while the agent is not reading.
        if out.is_empty() && idle && !self.keep_alive.is_zero() {
            self.ping_sent.get_or_insert(now);
            out.push(Outbound::PingReq);
        }
        if !out.is_empty() {
            self.last_write = Some(now);
        }
        Ok(())
    }

    /// When [`Session::due_writes`] next has something to say without a packet or a commit
    /// arriving first: a ping due, a ping's deadline, a SUBSCRIBE to send again.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        if self.keep_alive.is_zero() {
            return self.subscribing.map(|(_, sent)| sent + SUBSCRIBE_TIMEOUT);
        }
        let next_ping = self.last_write.map(|w| w + self.keep_alive);
        let dead_at = self
            .ping_sent
            .filter(|_| self.broker_owes())
            .map(|sent| self.last_heard.map_or(sent, |h| h.max(sent)) + self.keep_alive);
        let ping = match (next_ping, dead_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let subscribe = self.subscribing.map(|(_, sent)| sent + SUBSCRIBE_TIMEOUT);
        match (ping, subscribe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KA: Duration = Duration::from_secs(5);

    fn connected(max_unacked: usize) -> (Session, Instant) {
        let mut s = Session::new(KA, max_unacked, vec![("devices/#".into(), 1)], []);
        let t0 = Instant::now();
        s.on_connected(false);
        let mut out = Vec::new();
        s.due_writes(t0, &mut out).unwrap();
        let Some(Outbound::Subscribe { pkid, .. }) = out.first().cloned() else {
            panic!("subscribes first: {out:?}");
        };
        s.on_packet(
            Inbound::SubAck {
                pkid,
                granted: 1,
                refused: 0,
            },
            t0,
        )
        .unwrap();
        assert!(s.ready());
        (s, t0)
    }

    fn written(s: &mut Session, now: Instant) -> Vec<Outbound> {
        let mut out = Vec::new();
        s.due_writes(now, &mut out).unwrap();
        out
    }

    #[test]
    fn acks_follow_commits_and_go_out_together() {
        let (mut s, t0) = connected(100);
        let tickets: Vec<Ticket> = (1..=3)
            .map(|p| match s.on_publish(1, p) {
                Take::Spool(t) => t,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(written(&mut s, t0).is_empty(), "nothing before a commit");
        for t in tickets {
            s.committed(t);
        }
        assert_eq!(
            written(&mut s, t0),
            vec![
                Outbound::PubAck(1),
                Outbound::PubAck(2),
                Outbound::PubAck(3)
            ]
        );
        assert_eq!(s.awaiting_commit(), 0);
    }

    #[test]
    fn an_ack_of_an_earlier_connection_is_never_written() {
        let (mut s, t0) = connected(100);
        let Take::Spool(old) = s.on_publish(1, 7) else {
            panic!()
        };
        let Take::Spool(queued) = s.on_publish(1, 8) else {
            panic!()
        };
        s.committed(queued); // ready, not yet written
        s.on_disconnected();
        s.on_connected(false);
        s.committed(old);
        let out = written(&mut s, t0);
        assert!(
            !out.iter().any(|o| matches!(o, Outbound::PubAck(_))),
            "{out:?}"
        );
        assert_eq!(s.counts().stale_acks, 2);
    }

    #[test]
    fn reading_stops_at_the_window_and_resumes_at_a_commit() {
        let (mut s, _) = connected(2);
        let Take::Spool(a) = s.on_publish(1, 1) else {
            panic!()
        };
        assert!(s.may_read());
        let _ = s.on_publish(1, 2);
        assert!(!s.may_read());
        s.committed(a);
        assert!(s.may_read());
    }

    #[test]
    fn an_unanswered_ping_is_fatal_only_after_silence_while_reading() {
        let (mut s, t0) = connected(1);
        let t1 = t0 + KA;
        assert_eq!(written(&mut s, t1), vec![Outbound::PingReq]);
        // The window is full: the PINGRESP waits behind messages the agent does not read.
        // Pings go on, so the broker hears from the agent.
        let _ = s.on_publish(1, 1);
        assert_eq!(written(&mut s, t1 + KA), vec![Outbound::PingReq]);
        assert_eq!(written(&mut s, t1 + KA * 2), vec![Outbound::PingReq]);
        // Reading again at t1 + 3 KA: the broker has a keep-alive interval to be heard.
        s.committed(Ticket {
            generation: s.generation(),
            qos: 1,
            pkid: 1,
        });
        let resumed = t1 + KA * 3;
        assert_eq!(written(&mut s, resumed), vec![Outbound::PubAck(1)]);
        s.heard(resumed + KA / 2); // messages, not yet the PINGRESP
        let mut out = Vec::new();
        assert!(s.due_writes(resumed + KA, &mut out).is_ok());
        let mut out = Vec::new();
        assert_eq!(
            s.due_writes(resumed + KA / 2 + KA, &mut out),
            Err(Dead::PingTimeout(KA))
        );
    }

    /// Messages awaiting their commit, the window not full: the broker's own inflight window
    /// may be full of them, so its silence is not a fault until their acks are written.
    #[test]
    fn silence_while_commits_are_awaited_is_not_a_dead_connection() {
        let (mut s, t0) = connected(10);
        assert_eq!(written(&mut s, t0 + KA), vec![Outbound::PingReq]);
        let Take::Spool(t) = s.on_publish(1, 1) else {
            panic!()
        };
        assert!(s.may_read());
        // A slow commit: many keep-alive intervals pass.
        let mut out = Vec::new();
        assert!(s.due_writes(t0 + KA * 5, &mut out).is_ok());
        s.committed(t);
        let acked = t0 + KA * 6;
        assert_eq!(written(&mut s, acked), vec![Outbound::PubAck(1)]);
        let mut out = Vec::new();
        assert!(s.due_writes(acked + KA / 2, &mut out).is_ok());
        // Nothing owed to the agent now: a keep-alive interval of silence is fatal.
        let mut out = Vec::new();
        assert_eq!(
            s.due_writes(acked + KA, &mut out),
            Err(Dead::PingTimeout(KA))
        );
    }

    /// The agent's acks wait for a broker that reads slowly: its ping is behind them, so
    /// the broker's silence is no fault until the socket has taken them.
    #[test]
    fn silence_while_the_agents_writes_wait_is_not_a_dead_connection() {
        let (mut s, t0) = connected(10);
        assert_eq!(written(&mut s, t0 + KA), vec![Outbound::PingReq]);
        s.set_writes_waiting(true);
        let mut out = Vec::new();
        assert!(s.due_writes(t0 + KA * 5, &mut out).is_ok());
        s.set_writes_waiting(false);
        let taken = t0 + KA * 6;
        let mut out = Vec::new();
        assert!(s.due_writes(taken, &mut out).is_ok());
        let mut out = Vec::new();
        assert!(s.due_writes(taken + KA / 2, &mut out).is_ok());
        let mut out = Vec::new();
        assert_eq!(
            s.due_writes(taken + KA, &mut out),
            Err(Dead::PingTimeout(KA))
        );
    }

    #[test]
    fn a_ping_answered_keeps_the_connection() {
        let (mut s, t0) = connected(10);
        assert_eq!(written(&mut s, t0 + KA), vec![Outbound::PingReq]);
        s.on_packet(Inbound::PingResp, t0 + KA).unwrap();
        assert!(written(&mut s, t0 + KA * 3 / 2).is_empty());
        assert_eq!(written(&mut s, t0 + KA * 2), vec![Outbound::PingReq]);
    }

    #[test]
    fn acks_written_count_as_activity() {
        let (mut s, t0) = connected(10);
        let Take::Spool(t) = s.on_publish(1, 1) else {
            panic!()
        };
        s.committed(t);
        let t1 = t0 + KA - Duration::from_millis(1);
        assert_eq!(written(&mut s, t1), vec![Outbound::PubAck(1)]);
        assert!(
            written(&mut s, t0 + KA).is_empty(),
            "an ack was written just now"
        );
        assert_eq!(s.next_deadline(), Some(t1 + KA));
    }

    #[test]
    fn a_qos2_message_is_spooled_once_and_its_pubrel_answered() {
        let (mut s, t0) = connected(10);
        let Take::Spool(t) = s.on_publish(2, 9) else {
            panic!()
        };
        s.committed(t);
        assert_eq!(written(&mut s, t0), vec![Outbound::PubRec(9)]);
        // The broker did not see the PUBREC (a reconnect) and sends the PUBLISH again.
        s.on_disconnected();
        s.on_connected(true);
        assert_eq!(s.on_publish(2, 9), Take::Duplicate);
        s.on_packet(Inbound::PubRel { pkid: 9 }, t0).unwrap();
        let out = written(&mut s, t0);
        assert!(
            out.contains(&Outbound::PubRec(9)) && out.contains(&Outbound::PubComp(9)),
            "{out:?}"
        );
        // Released: the id may name a new message now.
        assert!(matches!(s.on_publish(2, 9), Take::Spool(_)));
        assert_eq!(s.counts().qos2_duplicates, 1);
    }

    #[test]
    fn qos2_receipts_from_the_spool_survive_a_restart() {
        let mut s = Session::new(KA, 10, vec![], [4]);
        let t0 = Instant::now();
        s.on_connected(true);
        assert_eq!(s.on_publish(2, 4), Take::Duplicate);
        s.on_packet(Inbound::PubRel { pkid: 4 }, t0).unwrap();
        assert_eq!(
            written(&mut s, t0),
            vec![Outbound::PubRec(4), Outbound::PubComp(4)]
        );
    }

    #[test]
    fn a_pubrel_for_an_unknown_id_is_still_completed() {
        let (mut s, t0) = connected(10);
        s.on_packet(Inbound::PubRel { pkid: 77 }, t0).unwrap();
        assert_eq!(written(&mut s, t0), vec![Outbound::PubComp(77)]);
    }

    #[test]
    fn a_subscription_is_asked_again_until_granted() {
        let mut s = Session::new(KA, 10, vec![("a/#".into(), 1)], []);
        let t0 = Instant::now();
        s.on_connected(false);
        let out = written(&mut s, t0);
        let Some(Outbound::Subscribe { pkid: first, .. }) = out.first().cloned() else {
            panic!("{out:?}")
        };
        assert!(!s.ready());
        // Refused once: asked again after the timeout, not at once.
        s.on_packet(
            Inbound::SubAck {
                pkid: first,
                granted: 0,
                refused: 1,
            },
            t0,
        )
        .unwrap();
        assert!(!written(&mut s, t0 + Duration::from_secs(1))
            .iter()
            .any(|o| matches!(o, Outbound::Subscribe { .. })));
        let later = t0 + SUBSCRIBE_TIMEOUT;
        let out = written(&mut s, later);
        let Some(Outbound::Subscribe { pkid: second, .. }) = out
            .iter()
            .find(|o| matches!(o, Outbound::Subscribe { .. }))
            .cloned()
        else {
            panic!("{out:?}")
        };
        assert_ne!(first, second);
        assert!(!s.ready());
        s.on_packet(
            Inbound::SubAck {
                pkid: second,
                granted: 1,
                refused: 0,
            },
            later,
        )
        .unwrap();
        assert!(s.ready());
        assert_eq!(s.counts().subscribe_retries, 1);
    }

    #[test]
    fn an_unanswered_subscribe_is_sent_again() {
        let mut s = Session::new(KA * 100, 10, vec![("a/#".into(), 1)], []);
        let t0 = Instant::now();
        s.on_connected(false);
        let _ = written(&mut s, t0);
        assert_eq!(s.next_deadline(), Some(t0 + SUBSCRIBE_TIMEOUT));
        assert!(written(&mut s, t0 + SUBSCRIBE_TIMEOUT)
            .iter()
            .any(|o| matches!(o, Outbound::Subscribe { .. })));
    }

    #[test]
    fn new_filters_are_subscribed_and_gone_ones_unsubscribed() {
        let (mut s, t0) = connected(10);
        s.set_filters(vec![("other/#".into(), 1)]);
        assert!(!s.ready());
        let out = written(&mut s, t0);
        assert!(out.iter().any(|o| matches!(o, Outbound::Subscribe { filters, .. } if filters == &vec![("other/#".to_string(), 1)])), "{out:?}");
        assert!(out.iter().any(|o| matches!(o, Outbound::Unsubscribe { filters, .. } if filters == &vec!["devices/#".to_string()])), "{out:?}");
    }

    #[test]
    fn a_config_change_that_keeps_the_filters_keeps_the_session_ready() {
        let (mut s, t0) = connected(10);
        assert!(s.ready());
        let (added, removed) = s.set_filters(vec![("devices/#".into(), 1)]);
        assert!(added.is_empty() && removed.is_empty());
        assert!(s.ready());
        let out = written(&mut s, t0);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Outbound::Subscribe { .. } | Outbound::Unsubscribe { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn a_qos2_message_sent_again_before_its_commit_is_spooled_once() {
        let (mut s, t0) = connected(10);
        let Take::Spool(first) = s.on_publish(2, 5) else {
            panic!()
        };
        // The connection drops before the commit; the broker kept the session and resends.
        s.on_disconnected();
        s.on_connected(true);
        assert_eq!(s.on_publish(2, 5), Take::Duplicate);
        s.committed(first);
        let acks: Vec<Outbound> = written(&mut s, t0)
            .into_iter()
            .filter(|o| matches!(o, Outbound::PubRec(_) | Outbound::PubAck(_)))
            .collect();
        assert_eq!(acks, vec![Outbound::PubRec(5)]);
        assert_eq!(s.on_publish(2, 5), Take::Duplicate, "a receipt now");
    }

    #[test]
    fn after_a_session_the_broker_dropped_an_old_qos2_id_names_a_new_message() {
        let (mut s, t0) = connected(10);
        let Take::Spool(first) = s.on_publish(2, 5) else {
            panic!()
        };
        s.on_disconnected();
        s.on_connected(false);
        assert!(
            matches!(s.on_publish(2, 5), Take::Spool(_)),
            "pending of a dropped session"
        );
        s.committed(first);
        assert!(written(&mut s, t0)
            .iter()
            .all(|o| !matches!(o, Outbound::PubRec(_))));
        let (mut s, _) = connected(10);
        let Take::Spool(first) = s.on_publish(2, 6) else {
            panic!()
        };
        s.on_disconnected();
        s.on_connected(false);
        s.committed(first);
        assert!(
            matches!(s.on_publish(2, 6), Take::Spool(_)),
            "no receipt of a dropped session"
        );
    }
}
