//! Which signed document should run, decided without I/O: every rule of the fleet push that
//! does not need the network, the pipeline or the disk, unit-tested below.
//!
//! 1. A document must verify and be signed for the topic (or file) it came on, and address
//!    this gateway or one of its groups.
//! 2. It must not have expired (`not_after`), and, if the persisted state was lost, it must
//!    have been issued after that was noticed.
//! 3. Its version must not be older than any authentic document seen before: an old document
//!    replayed is refused and not kept, so it can never stand in the way of newer ones.
//! 4. The gateway's own document wins over its groups'; among groups the highest version.
//! 5. The winner is applied if its version is new; the one running, or one already tried, is
//!    ignored quietly (a retained message comes again on every reconnect).
//!
//! It never applies anything itself: it says [`Decision::Apply`], and the controller applies,
//! checks health, and reports back ([`Policy::applied`]).

use super::document::{DocError, Target, Verified};
use std::collections::BTreeMap;

/// What to do with a document, or after a document was cleared.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Apply it: its version is now the highest seen (persist that before applying).
    Apply(Box<Verified>),
    /// Nothing to do (running it, or tried it already).
    Ignore,
    /// Not applied: the version when the document was authentic, and why.
    Refuse(Option<u64>, String),
}

pub(crate) struct Policy {
    gateway: String,
    groups: Vec<String>,
    /// The latest authentic, current document per target.
    slots: BTreeMap<Target, Verified>,
    /// The version running (0: the local file alone).
    good_version: u64,
    /// Nothing at or below it is applied again.
    highest_seen: u64,
    /// When the persisted state was found lost (Unix seconds): replay protection then takes
    /// only documents issued after it.
    issued_after: Option<u64>,
}

impl Policy {
    pub(crate) fn new(
        gateway: &str,
        groups: &[String],
        good_version: u64,
        highest_seen: u64,
        issued_after: Option<u64>,
    ) -> Policy {
        Policy {
            gateway: gateway.to_string(),
            groups: groups.to_vec(),
            slots: BTreeMap::new(),
            good_version,
            highest_seen: highest_seen.max(good_version),
            issued_after,
        }
    }

    pub(crate) fn highest_seen(&self) -> u64 {
        self.highest_seen
    }

    /// Whether `target` addresses this gateway.
    pub(crate) fn addresses(&self, target: &Target) -> bool {
        match target {
            Target::Gateway(g) => *g == self.gateway,
            Target::Group(g) => self.groups.contains(g),
        }
    }

    /// A document arrived for `on` (its topic's target, or the file's), as verified.
    pub(crate) fn on_document(
        &mut self,
        on: &Target,
        doc: Result<Verified, DocError>,
        now_secs: u64,
    ) -> Decision {
        let doc = match doc {
            Ok(d) => d,
            Err(e) => return Decision::Refuse(None, format!("{on}: {e}")),
        };
        let (v, target) = (doc.body.version, doc.body.target.clone());
        if target != *on {
            return Decision::Refuse(
                None,
                format!("version {v} is signed for {target} but arrived for {on}; refused"),
            );
        }
        if !self.addresses(&target) {
            return Decision::Refuse(
                None,
                format!("version {v} is signed for {target}, which is not this gateway or one of its groups"),
            );
        }
        if let Some(t) = doc.body.not_after.filter(|t| now_secs > *t) {
            return Decision::Refuse(
                None,
                format!("version {v} ({target}) expired at {t} (Unix seconds); sign it again"),
            );
        }
        if let Some(t) = self.issued_after.filter(|t| doc.body.issued_at <= *t) {
            return Decision::Refuse(
                None,
                format!(
                    "version {v} ({target}) was issued at {}, before the fleet state was found unreadable at {t}; without it old documents cannot be told from new ones, so only documents signed after that are taken",
                    doc.body.issued_at
                ),
            );
        }
        if v < self.highest_seen && v != self.good_version {
            // Not kept: an old document must never shadow a newer one of another target.
            return Decision::Refuse(
                None,
                format!(
                    "version {v} ({target}) is older than version {} already seen; an old or replayed document is never applied",
                    self.highest_seen
                ),
            );
        }
        self.slots.insert(target.clone(), doc);
        match self.candidate() {
            Some(c) if c.body.target == target => self.consider(),
            Some(c) => Decision::Refuse(
                None,
                format!(
                    "group config not applied: this gateway's own config wins (version {v} of {target}; this gateway's own is version {})",
                    c.body.version
                ),
            ),
            None => Decision::Ignore,
        }
    }

    /// The document of `target` was removed (an empty retained message).
    pub(crate) fn on_cleared(&mut self, target: &Target) -> Decision {
        self.slots.remove(target);
        self.consider()
    }

    /// The document that should run: the gateway's own, else its groups' newest.
    fn candidate(&self) -> Option<&Verified> {
        self.slots
            .get(&Target::Gateway(self.gateway.clone()))
            .or_else(|| {
                self.slots
                    .iter()
                    .filter(|(t, _)| matches!(t, Target::Group(_)))
                    .map(|(_, d)| d)
                    .max_by_key(|d| d.body.version)
            })
    }

    fn consider(&mut self) -> Decision {
        let Some(doc) = self.candidate() else {
            return Decision::Ignore;
        };
        let v = doc.body.version;
        if v == self.good_version || v == self.highest_seen {
            // Running it, or tried it already.
            return Decision::Ignore;
        }
        if v < self.highest_seen {
            return Decision::Refuse(
                None,
                format!(
                    "version {v} ({}) is older than version {} already seen; an old or replayed document is never applied",
                    doc.body.target, self.highest_seen
                ),
            );
        }
        let doc = doc.clone();
        self.highest_seen = v;
        Decision::Apply(Box::new(doc))
    }

    /// `version` was applied and passed its health check: it runs now.
    pub(crate) fn applied(&mut self, version: u64) {
        self.good_version = version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::document::Body;

    fn doc(target: &str, version: u64, issued_at: u64, not_after: Option<u64>) -> Verified {
        Verified {
            body: Body {
                version,
                target: target.parse().unwrap(),
                issued_at,
                not_after,
                config: String::new(),
            },
            envelope: format!("v{version}"),
        }
    }

    fn t(s: &str) -> Target {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        Policy::new("gw", &["plant".to_string()], 10, 10, None)
    }

    fn applied(d: Decision) -> u64 {
        match d {
            Decision::Apply(doc) => doc.body.version,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    fn refused(d: Decision) -> String {
        match d {
            Decision::Refuse(_, why) => why,
            other => panic!("expected Refuse, got {other:?}"),
        }
    }

    #[test]
    fn a_newer_document_for_this_gateway_is_applied_once() {
        let mut p = policy();
        let d = p.on_document(&t("gateway:gw"), Ok(doc("gateway:gw", 11, 1, None)), 5);
        assert_eq!(applied(d), 11);
        assert_eq!(p.highest_seen(), 11);
        p.applied(11);
        // The retained message again after a reconnect: nothing to do.
        let again = p.on_document(&t("gateway:gw"), Ok(doc("gateway:gw", 11, 1, None)), 5);
        assert!(matches!(again, Decision::Ignore));
    }

    #[test]
    fn a_replayed_old_gateway_document_is_refused_and_does_not_block_groups() {
        let mut p = policy();
        let why = refused(p.on_document(&t("gateway:gw"), Ok(doc("gateway:gw", 3, 1, None)), 5));
        assert!(why.contains("older than version 10"), "{why}");
        // A newer group document still applies: the old one was not kept.
        let d = p.on_document(&t("group:plant"), Ok(doc("group:plant", 12, 1, None)), 5);
        assert_eq!(applied(d), 12);
    }

    #[test]
    fn the_gateways_own_document_wins_over_its_groups_and_says_so() {
        let mut p = policy();
        assert_eq!(
            applied(p.on_document(&t("gateway:gw"), Ok(doc("gateway:gw", 11, 1, None)), 5)),
            11
        );
        p.applied(11);
        let why = refused(p.on_document(&t("group:plant"), Ok(doc("group:plant", 12, 1, None)), 5));
        assert!(why.contains("own config wins"), "{why}");
        assert!(why.contains("own is version 11"), "{why}");
        // Cleared: the group's document applies.
        assert_eq!(applied(p.on_cleared(&t("gateway:gw"))), 12);
    }

    #[test]
    fn documents_for_others_misdirected_or_unverified_are_refused() {
        let mut p = policy();
        let why =
            refused(p.on_document(&t("gateway:gw"), Ok(doc("gateway:other", 11, 1, None)), 5));
        assert!(why.contains("arrived for gateway:gw"), "{why}");
        let why = refused(p.on_document(&t("group:other"), Ok(doc("group:other", 11, 1, None)), 5));
        assert!(why.contains("not this gateway"), "{why}");
        let why = refused(p.on_document(
            &t("gateway:gw"),
            Err(DocError::Signature("ed25519:x".into())),
            5,
        ));
        assert!(why.contains("bad signature"), "{why}");
        assert_eq!(
            p.highest_seen(),
            10,
            "nothing refused moves the replay floor"
        );
    }

    #[test]
    fn an_expired_document_is_refused() {
        let mut p = policy();
        let why = refused(p.on_document(
            &t("gateway:gw"),
            Ok(doc("gateway:gw", 11, 1, Some(100))),
            101,
        ));
        assert!(why.contains("expired at 100"), "{why}");
        assert_eq!(
            applied(p.on_document(
                &t("gateway:gw"),
                Ok(doc("gateway:gw", 11, 1, Some(100))),
                100
            )),
            11
        );
    }

    #[test]
    fn with_the_state_lost_only_documents_issued_after_are_taken() {
        let mut p = Policy::new("gw", &[], 0, 0, Some(1_000));
        let why = refused(p.on_document(
            &t("gateway:gw"),
            Ok(doc("gateway:gw", 50, 999, None)),
            2_000,
        ));
        assert!(
            why.contains("before the fleet state was found unreadable"),
            "{why}"
        );
        assert_eq!(
            applied(p.on_document(
                &t("gateway:gw"),
                Ok(doc("gateway:gw", 5, 1_001, None)),
                2_000
            )),
            5
        );
    }
}
