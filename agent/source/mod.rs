//! Sources: where messages come from. Today MQTT ([`mqtt`]); each source decides a message's
//! [`Disposition`](crate::spool::Disposition) with the [`Router`] and hands it to the spool,
//! acking only once the spool says it is committed.

pub mod mqtt;

use crate::config::Config;
use crate::route::{KeyTemplate, TopicFilter};
use crate::spool::Disposition;
use std::sync::Arc;

/// Route lookup for incoming messages, built once from the config.
pub struct Router {
    gateway: Arc<str>,
    routes: Vec<(Arc<str>, Vec<TopicFilter>, KeyTemplate)>,
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
                .map(|r| {
                    (
                        Arc::from(r.name.as_str()),
                        r.filters.clone(),
                        r.partition_key.clone(),
                    )
                })
                .collect(),
            max_message_bytes: config.batch.max_message_bytes as usize,
            unrouted: Arc::from(""),
        }
    }

    /// What to do with a message on `topic` with a payload of `len` bytes.
    pub fn classify(&self, topic: &str, len: usize) -> Disposition {
        let Some((route, _, template)) = self
            .routes
            .iter()
            .find(|(_, filters, _)| filters.iter().any(|f| f.matches(topic)))
        else {
            return Disposition::Dropped {
                route: self.unrouted.clone(),
                reason: "no_route",
            };
        };
        if len > self.max_message_bytes {
            return Disposition::DeadLetter {
                route: route.clone(),
                reason: "oversize",
            };
        }
        Disposition::Record {
            route: route.clone(),
            key: template.render(&self.gateway, route, topic),
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
        assert!(matches!(
            router.classify("other", 1),
            Disposition::Dropped {
                reason: "no_route",
                ..
            }
        ));
    }
}
