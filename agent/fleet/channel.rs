//! The fleet channel: a second, small MQTT connection (MQTT 3.1.1, clean session) to the broker
//! `[fleet] broker` names, subscribed to this gateway's config topics, and publishing its status
//! document (retained). It is separate from the data sessions so that a config change, a
//! saturated data connection or a broken route can never cut a gateway off from the next push.
//!
//! It only moves bytes: it never verifies or applies a document ([`super`] does).

use super::document::Target;
use crate::config::{BrokerConfig, FleetConfig, ShadowConfig};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The topics of one gateway.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    pub(crate) gateway: String,
    pub(crate) groups: Vec<(String, String)>,
    pub(crate) status: String,
    pub(crate) shadow: Option<ShadowTopics>,
}

/// A named AWS IoT shadow's reserved topics (as AWS documents them).
#[derive(Debug, Clone)]
pub(crate) struct ShadowTopics {
    pub(crate) get: String,
    pub(crate) get_accepted: String,
    pub(crate) delta: String,
    pub(crate) update: String,
}

impl ShadowTopics {
    pub(crate) fn new(shadow: &ShadowConfig) -> ShadowTopics {
        let base = format!(
            "$aws/things/{}/shadow/name/{}",
            shadow.thing_name, shadow.name
        );
        ShadowTopics {
            get: format!("{base}/get"),
            get_accepted: format!("{base}/get/accepted"),
            delta: format!("{base}/update/delta"),
            update: format!("{base}/update"),
        }
    }
}

/// The key under `state.desired` (and `state.reported`) that holds the signed document.
pub(crate) const SHADOW_KEY: &str = "edgeship";
/// The key under `state.reported` that holds the status document.
pub(crate) const SHADOW_STATUS_KEY: &str = "edgeship_status";

/// The signed document in a shadow's full state (a `get/accepted` answer), if it has one.
fn desired_document(shadow: &[u8]) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(shadow).ok()?;
    let doc = v.get("state")?.get("desired")?.get(SHADOW_KEY)?;
    (!doc.is_null()).then(|| serde_json::to_vec(doc).expect("a JSON value serialises"))
}

impl Topics {
    pub(crate) fn new(fleet: &FleetConfig, gateway_id: &str) -> Topics {
        let p = &fleet.topic_prefix;
        Topics {
            gateway: config_topic(p, &Target::Gateway(gateway_id.into())),
            groups: fleet
                .groups
                .iter()
                .map(|g| (g.clone(), config_topic(p, &Target::Group(g.clone()))))
                .collect(),
            status: status_topic(p, gateway_id),
            shadow: fleet.shadow.as_ref().map(ShadowTopics::new),
        }
    }

    /// Which target a config topic belongs to.
    fn target_of(&self, topic: &str, gateway_id: &str) -> Option<Target> {
        if topic == self.gateway {
            return Some(Target::Gateway(gateway_id.into()));
        }
        self.groups
            .iter()
            .find(|(_, t)| t == topic)
            .map(|(g, _)| Target::Group(g.clone()))
    }
}

/// Where documents for `target` are published (retained).
pub(crate) fn config_topic(prefix: &str, target: &Target) -> String {
    match target {
        Target::Gateway(g) => format!("{prefix}/config/gateway/{g}"),
        Target::Group(g) => format!("{prefix}/config/group/{g}"),
    }
}

pub(crate) fn status_topic(prefix: &str, gateway_id: &str) -> String {
    format!("{prefix}/status/{gateway_id}")
}

/// What the channel hands to the controller.
pub(crate) enum Event {
    /// (Re)connected and subscribed: time to publish the status.
    Connected,
    /// A retained or new message on a config topic (empty: the document was cleared).
    Document { target: Target, payload: Bytes },
}

/// MQTT options for a control connection (the fleet channel, the operator's tools): clean
/// session, documents up to 2 MiB, the given login and TLS.
pub(crate) fn options(
    client_id: &str,
    (host, port): (&str, u16),
    keep_alive: Duration,
    login: Option<(&str, &str)>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_keep_alive(keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(2 << 20, 2 << 20);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    if let Some(t) = tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(t),
        ));
    }
    o
}

/// Starts the channel; events arrive on the returned receiver, statuses go out through the
/// returned client.
pub(crate) fn start(
    broker: &BrokerConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    fleet: &FleetConfig,
    gateway_id: &str,
) -> (rumqttc::AsyncClient, mpsc::Receiver<Event>, Topics) {
    let topics = Topics::new(fleet, gateway_id);
    let login = broker
        .username
        .as_deref()
        .map(|u| (u, broker.password.as_deref().unwrap_or_default()));
    let opts = options(
        &fleet.client_id,
        (&broker.host, broker.port),
        broker.keep_alive,
        login,
        tls,
    );
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::channel(16);
    let sub = client.clone();
    let t = topics.clone();
    let gateway = gateway_id.to_string();
    let name = broker.name.clone();
    tokio::spawn(async move {
        use rumqttc::{Event as E, Packet};
        let mut errors = crate::logging::Repeated::new(Duration::from_secs(60));
        let mut retry =
            crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            match events.poll().await {
                Ok(E::Incoming(Packet::ConnAck(_))) => {
                    retry.reset();
                    let mut filters = vec![rumqttc::SubscribeFilter::new(
                        t.gateway.clone(),
                        rumqttc::QoS::AtLeastOnce,
                    )];
                    filters.extend(t.groups.iter().map(|(_, topic)| {
                        rumqttc::SubscribeFilter::new(topic.clone(), rumqttc::QoS::AtLeastOnce)
                    }));
                    if let Some(sh) = &t.shadow {
                        for topic in [&sh.get_accepted, &sh.delta] {
                            filters.push(rumqttc::SubscribeFilter::new(
                                topic.clone(),
                                rumqttc::QoS::AtLeastOnce,
                            ));
                        }
                    }
                    if let Err(e) = sub.try_subscribe_many(filters) {
                        tracing::error!(error = %e, "fleet channel: cannot subscribe");
                    }
                    // The shadow's state as it is now (its answer comes on get/accepted).
                    if let Some(sh) = &t.shadow {
                        let _ = sub.try_publish(&sh.get, rumqttc::QoS::AtLeastOnce, false, "{}");
                    }
                    tracing::info!(broker = %name, gateway_topic = %t.gateway, groups = t.groups.len(), "fleet channel open");
                    if tx.send(Event::Connected).await.is_err() {
                        break;
                    }
                }
                Ok(E::Incoming(Packet::Publish(p))) => {
                    if let Some(sh) = &t.shadow {
                        // A delta carries only what changed: ask for the whole document.
                        if p.topic == sh.delta {
                            let _ =
                                sub.try_publish(&sh.get, rumqttc::QoS::AtLeastOnce, false, "{}");
                            continue;
                        }
                        if p.topic == sh.get_accepted {
                            if let Some(doc) = desired_document(&p.payload) {
                                let event = Event::Document {
                                    target: Target::Gateway(gateway.clone()),
                                    payload: doc.into(),
                                };
                                if tx.send(event).await.is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                    }
                    let Some(target) = t.target_of(&p.topic, &gateway) else {
                        continue;
                    };
                    if tx
                        .send(Event::Document {
                            target,
                            payload: p.payload,
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(repeats) = errors.should_log() {
                        tracing::warn!(broker = %name, error = %e, repeats, "fleet channel: connection failed; retrying");
                    }
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        }
    });
    (client, rx, topics)
}
