//! Sources: where messages come from. Today MQTT ([`mqtt`]); each source decides a message's
//! [`Disposition`](crate::spool::Disposition) with the [`Router`] and hands it to the spool,
//! acking only once the spool says it is committed.

pub mod mqtt;

use crate::config::Config;
use crate::route::{KeyTemplate, TopicFilter};
use crate::spool::Disposition;
use std::sync::Arc;

/// What a source follows while it runs: how to route, and which filters to subscribe to.
/// Replaced as a whole when the config changes.
pub struct SourcePlan {
    pub router: Arc<Router>,
    pub filters: Vec<(String, u8)>,
}

/// One route as the router needs it.
struct Routed {
    name: Arc<str>,
    filters: Vec<TopicFilter>,
    partition_key: KeyTemplate,
    explicit_hash_key: Option<KeyTemplate>,
}

/// The explicit hash key a rendered template stands for: a decimal as written, else the MD5
/// of the text (as Kinesis hashes partition keys).
pub fn hash_key_of(rendered: &str) -> u128 {
    rendered
        .parse::<u128>()
        .unwrap_or_else(|_| crate::shard::hash_key(rendered))
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
    pub fn classify(&self, topic: &str, len: usize) -> Disposition {
        let Some(r) = self
            .routes
            .iter()
            .find(|r| r.filters.iter().any(|f| f.matches(topic)))
        else {
            return Disposition::Dropped {
                route: self.unrouted.clone(),
                reason: "no_route",
            };
        };
        let route = &r.name;
        if len > self.max_message_bytes {
            return Disposition::DeadLetter {
                route: route.clone(),
                reason: "oversize",
            };
        }
        let mut key = r.partition_key.render(&self.gateway, route, topic);
        if let Some(h) = &r.explicit_hash_key {
            let hash = hash_key_of(&h.render(&self.gateway, route, topic));
            key.push(crate::sink::HASH_KEY_SEPARATOR);
            key.push_str(&hash.to_string());
        }
        Disposition::Record {
            route: route.clone(),
            key,
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
                reason: "oversize",
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
                let (pk, hk) = crate::sink::split_key(&key);
                assert_eq!(pk, "gw");
                assert_eq!(hk, Some(crate::shard::hash_key("a7").to_string().as_str()));
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
                crate::sink::split_key(&key),
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
                reason: "no_route",
                ..
            }
        ));
    }
}
