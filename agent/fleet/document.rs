//! Signed config documents: the envelope that travels over MQTT or sits in a file, Ed25519
//! signing and verification, and the text forms of the keys.
//!
//! The envelope carries the body as a string and the signature covers exactly its bytes, so no
//! JSON canonicalisation is involved. Ed25519 comes from `ring`, already in the binary under
//! rustls, so signing adds no dependency.
//!
//! This module never hands out a body whose signature it has not checked against a pinned key,
//! and never decides whether a version may be applied (that is [`super`]'s policy).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

use super::error::FleetError;
pub(crate) use crate::config::fleet::public_key_text;

/// Format number of the envelope (`"edgeship_config": 1`).
pub(crate) const FORMAT: u32 = 1;
/// Largest document accepted (the config text inside is far smaller in practice).
pub(crate) const MAX_DOCUMENT_BYTES: usize = 1 << 20;

const PRIVATE_PREFIX: &str = "ed25519-pkcs8:";

/// What is published (retained) on a config topic or written to the local file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Envelope {
    pub(crate) edgeship_config: u32,
    /// The JSON text of a [`Body`], signed as these exact bytes.
    pub(crate) body: String,
    /// Base64 Ed25519 signature of `body`.
    pub(crate) signature: String,
    /// The public key that signed (`ed25519:...`), so an operator can tell which one.
    pub(crate) key: String,
}

/// What the operator signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// Must grow with every document; a gateway never applies one not newer than it has seen.
    pub version: u64,
    /// Who the document is for: `gateway:<id>` or `group:<name>`.
    pub target: Target,
    /// Unix seconds when it was signed.
    pub issued_at: u64,
    /// Unix seconds after which a gateway refuses it (a replayed document stops working).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// TOML: the sections of the config the fleet sets (routes, destinations, batch, spool
    /// limits, shutdown_timeout).
    pub config: String,
}

/// A gateway or a group of gateways.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Gateway(String),
    Group(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Gateway(g) => write!(f, "gateway:{g}"),
            Target::Group(g) => write!(f, "group:{g}"),
        }
    }
}

/// Text that is not a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a target: write gateway:<gateway_id> or group:<group> (one topic level each)"
)]
pub struct BadTarget(String);

impl std::str::FromStr for Target {
    type Err = BadTarget;
    fn from_str(s: &str) -> Result<Target, BadTarget> {
        let level_ok = |t: &str| !t.is_empty() && !t.contains(['/', '+', '#', '\0']);
        match s.split_once(':') {
            Some(("gateway", g)) if level_ok(g) => Ok(Target::Gateway(g.into())),
            Some(("group", g)) if level_ok(g) => Ok(Target::Group(g.into())),
            _ => Err(BadTarget(s.to_string())),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A document whose signature checked out against one of the pinned keys.
#[derive(Debug, Clone)]
pub struct Verified {
    pub(crate) body: Body,
    /// The envelope as received, to persist as the last known good document.
    pub(crate) envelope: String,
}

/// Why a document was not accepted as authentic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("not a config document: {0}")]
    Malformed(String),
    #[error("bad signature: no pinned fleet key signed this document (it names key {0})")]
    Signature(String),
}

/// A new signing key: the private key file's text and the public key's text.
pub(crate) fn generate_key() -> Result<(String, String), FleetError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| FleetError::KeyGeneration)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| FleetError::KeyGeneration)?;
    let public: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| FleetError::KeyGeneration)?;
    Ok((
        format!("{PRIVATE_PREFIX}{}\n", B64.encode(pkcs8.as_ref())),
        public_key_text(&public),
    ))
}

/// Reads a private key file written by [`generate_key`].
pub fn read_private_key(path: &Path) -> Result<Ed25519KeyPair, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let b64 = text.trim().strip_prefix(PRIVATE_PREFIX).ok_or_else(|| {
        FleetError::invalid(
            path,
            "not an edgeship signing key (edgeship fleet keygen writes one)",
        )
    })?;
    let der = B64
        .decode(b64)
        .map_err(|e| FleetError::invalid(path, format!("signing key: not base64 ({e})")))?;
    Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|e| FleetError::invalid(path, format!("signing key: not an Ed25519 key ({e})")))
}

/// Signs `body`; the envelope's JSON text.
pub fn sign(body: &Body, key: &Ed25519KeyPair) -> String {
    let body_text = serde_json::to_string(body).expect("a body serialises");
    let signature = key.sign(body_text.as_bytes());
    let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32-byte key");
    let envelope = Envelope {
        edgeship_config: FORMAT,
        body: body_text,
        signature: B64.encode(signature.as_ref()),
        key: public_key_text(&public),
    };
    serde_json::to_string_pretty(&envelope).expect("an envelope serialises") + "\n"
}

/// Parses an envelope and checks its signature against `keys`, then reads the body.
pub fn verify(bytes: &[u8], keys: &[[u8; 32]]) -> Result<Verified, DocError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(DocError::Malformed(format!(
            "{} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| DocError::Malformed("not UTF-8 text".into()))?;
    let envelope: Envelope =
        serde_json::from_str(text).map_err(|e| DocError::Malformed(e.to_string()))?;
    if envelope.edgeship_config != FORMAT {
        return Err(DocError::Malformed(format!(
            "format {} (this agent reads format {FORMAT})",
            envelope.edgeship_config
        )));
    }
    let signature = B64
        .decode(envelope.signature.trim())
        .map_err(|_| DocError::Signature(envelope.key.clone()))?;
    let signed = keys.iter().any(|k| {
        UnparsedPublicKey::new(&ED25519, k)
            .verify(envelope.body.as_bytes(), &signature)
            .is_ok()
    });
    if !signed {
        return Err(DocError::Signature(envelope.key));
    }
    let body: Body = serde_json::from_str(&envelope.body)
        .map_err(|e| DocError::Malformed(format!("signed body: {e}")))?;
    Ok(Verified {
        body,
        envelope: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fleet::parse_public_key;

    fn key() -> (Ed25519KeyPair, [u8; 32]) {
        let (private, public) = generate_key().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, private).unwrap();
        (
            read_private_key(&path).unwrap(),
            parse_public_key(&public).unwrap(),
        )
    }

    fn body() -> Body {
        Body {
            version: 7,
            target: "group:plant-a".parse().unwrap(),
            issued_at: 1,
            not_after: None,
            config: "[batch]\nlinger = \"2s\"\n".into(),
        }
    }

    #[test]
    fn signed_documents_verify_with_any_pinned_key_and_nothing_else() {
        let (k1, p1) = key();
        let (_, p2) = key();
        let doc = sign(&body(), &k1);
        assert_eq!(verify(doc.as_bytes(), &[p2, p1]).unwrap().body, body());
        assert!(matches!(
            verify(doc.as_bytes(), &[p2]),
            Err(DocError::Signature(_))
        ));
        // Any change to the signed body breaks the signature.
        let mut env: Envelope = serde_json::from_str(&doc).unwrap();
        env.body = env.body.replace("\\\"2s\\\"", "\\\"3s\\\"");
        assert!(env.body.contains("3s"));
        let tampered = serde_json::to_string(&env).unwrap();
        assert!(matches!(
            verify(tampered.as_bytes(), &[p1]),
            Err(DocError::Signature(_))
        ));
        assert!(matches!(
            verify(b"{\"edgeship_config\":1}", &[p1]),
            Err(DocError::Malformed(_))
        ));
    }

    #[test]
    fn keys_and_targets_have_clear_text_forms() {
        assert!(parse_public_key("ssh-ed25519 AAAA")
            .unwrap_err()
            .to_string()
            .contains("expected ed25519:"));
        assert!(parse_public_key("ed25519:AAAA")
            .unwrap_err()
            .to_string()
            .contains("3 bytes"));
        assert_eq!(
            "gateway:gw-1".parse::<Target>().unwrap(),
            Target::Gateway("gw-1".into())
        );
        assert!("group:a/b".parse::<Target>().is_err());
        assert!("gw-1".parse::<Target>().is_err());
    }
}
