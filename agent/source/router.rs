//! The router: which route a message's topic belongs to, and what becomes of the message
//! (a record under its route's key, a dead letter, or a counted drop).
//!
//! Built once per config from its routes; the first route whose filter matches wins. No I/O;
//! per message it allocates only the key string.

use crate::config::Config;
use crate::key;
use crate::spool::{Disposition, DropReason};
use crate::topic::{KeyTemplate, TopicFilter};
use std::sync::Arc;

/// One route as the router needs it.
struct Routed {
    name: Arc<str>,
    filters: Vec<TopicFilter>,
    partition_key: KeyTemplate,
    explicit_hash_key: Option<KeyTemplate>,
}

/// Route lookup for incoming messages, built once from the config.
pub struct Router {
    gateway: Arc<str>,
    routes: Vec<Routed>,
    max_message_bytes: usize,
    /// Counter bucket for messages no route claims.
    unrouted: Arc<str>,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        Router {
            gateway: config.gateway_id.as_str().into(),
            routes: config
                .routes
                .iter()
                .map(|r| Routed {
                    name: Arc::from(r.name.as_str()),
                    filters: r.filters.clone(),
                    partition_key: r.partition_key.clone(),
                    explicit_hash_key: r.explicit_hash_key.clone(),
                })
                .collect(),
            max_message_bytes: config.batch.max_message_bytes as usize,
            unrouted: Arc::from(""),
        }
    }

    /// What to do with a message on `topic` with a payload of `len` bytes.
    /// A packet too large to read (over the broker's `max_packet_bytes`): counted as dropped
    /// under its route, or the unrouted one.
    pub(crate) fn oversize_packet(&self, topic: &str) -> Disposition {
        let route = self
            .routes
            .iter()
            .find(|r| r.filters.iter().any(|f| f.matches(topic)))
            .map_or_else(|| self.unrouted.clone(), |r| r.name.clone());
        Disposition::Dropped {
            route,
            reason: DropReason::OversizePacket,
        }
    }

    pub fn classify(&self, topic: &str, len: usize) -> Disposition {
        let Some(r) = self
            .routes
            .iter()
            .find(|r| r.filters.iter().any(|f| f.matches(topic)))
        else {
            return Disposition::Dropped {
                route: self.unrouted.clone(),
                reason: DropReason::NoRoute,
            };
        };
        let route = &r.name;
        if len > self.max_message_bytes {
            return Disposition::DeadLetter {
                route: route.clone(),
                reason: DropReason::Oversize,
            };
        }
        // Keys are cut to what every destination takes (Kinesis: 256 characters).
        let key = r.partition_key.render(
            &self.gateway,
            route,
            topic,
            crate::sink::kinesis::limits::MAX_PARTITION_KEY_CHARS,
        );
        let hash = r
            .explicit_hash_key
            .as_ref()
            .map(|h| key::hash_key_of(&h.render(&self.gateway, route, topic, usize::MAX)));
        Disposition::Record {
            route: route.clone(),
            key: key::spooled(key, hash),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_routes_drops_and_dead_letters() {
        let text = r#"
gateway_id = "gw"
[batch]
max_message_bytes = 100
[[broker]]
host = "h"
[[route]]
name = "t"
topics = ["devices/+/telemetry"]
destination = "d"
partition_key = "{topic[1]}"
[destination.d]
type = "directory"
path = "/tmp/x"
"#;
        let router = Router::new(&Config::parse(text, "t").unwrap());
        match router.classify("devices/a7/telemetry", 10) {
            Disposition::Record { route, key } => assert_eq!((&*route, key.as_str()), ("t", "a7")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            router.classify("devices/a7/telemetry", 101),
            Disposition::DeadLetter {
                reason: DropReason::Oversize,
                ..
            }
        ));
        let hashed = text.replace(
            "partition_key = \"{topic[1]}\"",
            "partition_key = \"{gateway}\"\nexplicit_hash_key = \"{topic[1]}\"",
        );
        let router_h = Router::new(&Config::parse(&hashed, "t").unwrap());
        match router_h.classify("devices/a7/telemetry", 10) {
            Disposition::Record { key, .. } => {
                let (pk, hk) = crate::key::split(&key);
                assert_eq!(pk, "gw");
                assert_eq!(hk, Some(crate::key::hash_key("a7").to_string().as_str()));
            }
            other => panic!("{other:?}"),
        }
        let pinned = text.replace(
            "partition_key = \"{topic[1]}\"",
            "explicit_hash_key = \"0170141183460469231731687303715884105728\"",
        );
        let router_p = Router::new(&Config::parse(&pinned, "t").unwrap());
        match router_p.classify("devices/a7/telemetry", 10) {
            Disposition::Record { key, .. } => assert_eq!(
                crate::key::split(&key),
                ("gw", Some("170141183460469231731687303715884105728"))
            ),
            other => panic!("{other:?}"),
        }
        let too_big = text.replace(
            "partition_key = \"{topic[1]}\"",
            "explicit_hash_key = \"340282366920938463463374607431768211456\"",
        );
        let e = Config::parse(&too_big, "t").unwrap_err().to_string();
        assert!(e.contains("over the largest hash key"), "{e}");
        assert!(matches!(
            router.classify("other", 1),
            Disposition::Dropped {
                reason: DropReason::NoRoute,
                ..
            }
        ));
    }
}
