//! Configuration: load a TOML file, check it, and hand out a typed [`Config`].
//!
//! Two stages, so that every mistake is reported once, precisely: [`raw`] mirrors the file
//! (unknown fields are errors, units parsed by [`units`]), then each section is checked by its
//! own module ([`spool`], [`batch`], [`destination`], [`route`], [`broker`], [`aws`],
//! [`fleet`]) for meaning (names that must exist, ranges, templates) and gets its defaults.
//! Every error names the file, the line and the field ([`source`]). Destinations, TLS and AWS
//! credentials are checked into the settings types their own modules define. This module
//! never opens sockets or the spool, and never logs a secret: a broker's `Debug` hides its
//! password.

pub(crate) mod aws;
pub(crate) mod batch;
pub(crate) mod broker;
pub(crate) mod destination;
pub(crate) mod fleet;
pub(crate) mod raw;
pub(crate) mod route;
pub(crate) mod source;
pub(crate) mod spool;
pub mod units;

use crate::aws::AwsConfig;
use crate::sink::DestinationConfig;
pub(crate) use batch::BatchConfig;
pub(crate) use broker::BrokerConfig;
pub(crate) use fleet::{FleetConfig, ShadowConfig};
pub use raw::{FullPolicy, MqttProtocol, SyncLevel};
use raw::{RawAdmin, RawConfig, RawPushed};
pub(crate) use route::RouteConfig;
pub(crate) use source::ConfigError;
use source::Source;
pub(crate) use spool::SpoolConfig;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The commented default config, also shipped as `/etc/edgeship/edgeship.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/edgeship.toml");

#[derive(Debug, Clone)]
pub struct Config {
    /// Stable identity of this gateway; part of every record id.
    pub(crate) gateway_id: String,
    /// How long a SIGTERM may take: stop reading, commit, finish in-flight calls.
    pub(crate) shutdown_timeout: Duration,
    pub spool: SpoolConfig,
    pub(crate) batch: BatchConfig,
    pub brokers: Vec<BrokerConfig>,
    pub routes: Vec<RouteConfig>,
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub admin: AdminConfig,
    pub(crate) aws: AwsConfig,
    /// `None`: no fleet config push; the local file is the whole config.
    pub(crate) fleet: Option<FleetConfig>,
}

/// The local HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `None` when the config says `listen = "off"`.
    pub listen: Option<std::net::SocketAddr>,
}

/// Where the admin endpoint listens unless the config says otherwise: loopback only, since it
/// has no authentication.
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9710";

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            location: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let source = Source::new(text, file);
        let raw: RawConfig = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        validate(raw, &source)
    }

    /// The local file with a fleet document's sections in place of its own: `route`,
    /// `destination`, `batch` and `shutdown_timeout` replace the local ones when present,
    /// `[spool]` replaces the local limits (the file and sync level stay). Errors in those
    /// sections name the document (`pushed_name`) and its line; the rest, the local file.
    pub fn parse_layered(
        base_text: &str,
        base_file: &str,
        pushed_text: &str,
        pushed_name: &str,
    ) -> Result<Config, ConfigError> {
        let base = Source::new(base_text, base_file);
        let mut raw: RawConfig = toml::from_str(base_text).map_err(|e| base.toml_error(&e))?;
        let pushed_src = Source::new(pushed_text, pushed_name);
        let pushed: RawPushed = toml::from_str(pushed_text).map_err(|e| {
            let mut err = pushed_src.toml_error(&e);
            if err.message.contains("unknown field") {
                err.message.push_str(
                    " (a fleet document sets route, destination, batch, spool limits and shutdown_timeout; brokers, gateway_id, admin, aws, fleet and the spool's path and sync stay in the local file)",
                );
            }
            err
        })?;
        let mut sections = Vec::new();
        if let Some(routes) = pushed.route {
            raw.route = routes;
            sections.push("route");
        }
        if let Some(destinations) = pushed.destination {
            raw.destination = destinations;
            sections.push("destination");
        }
        if let Some(batch) = pushed.batch {
            raw.batch = batch;
            sections.push("batch");
        }
        if let Some(limits) = pushed.spool {
            raw.spool.max_bytes = limits.max_bytes;
            raw.spool.full_policy = limits.full_policy;
            raw.spool.max_dead_letters = limits.max_dead_letters;
            raw.spool.commit_interval = limits.commit_interval;
            raw.spool.commit_max_wait = limits.commit_max_wait;
            sections.push("spool");
        }
        if let Some(t) = pushed.shutdown_timeout {
            raw.shutdown_timeout = Some(t);
        }
        let source = Source {
            overlay: Some((pushed_text, pushed_name, sections)),
            ..base
        };
        validate(raw, &source)
    }

    pub(crate) fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The TLS client config of each broker, in config order (`None`: plain MQTT). Reads
    /// their files now, so the agent refuses to start on a bad one.
    pub(crate) fn broker_tls(
        &self,
    ) -> Result<Vec<Option<std::sync::Arc<rustls::ClientConfig>>>, crate::tls::TlsError> {
        self.brokers
            .iter()
            .map(|b| match &b.tls {
                Some(t) => crate::tls::client_config(t)
                    .map(Some)
                    .map_err(|e| e.context(&format!("broker `{}` TLS", b.name))),
                None => Ok(None),
            })
            .collect()
    }

    /// Reads every TLS file the config names, as the agent would at start (`config
    /// validate`).
    pub fn check_files(&self) -> Result<(), crate::tls::TlsError> {
        self.broker_tls()?;
        if let Some(iot) = &self.aws.iot_credentials {
            crate::tls::client_config(&iot.tls).map_err(|e| e.context("aws.iot_credentials"))?;
        }
        Ok(())
    }
}

fn validate(raw: RawConfig, src: &Source) -> Result<Config, ConfigError> {
    let gateway_id = match raw.gateway_id {
        Some(id) => {
            let span = id.span();
            let id = id.into_inner();
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(src.error_at(
                    Some(span),
                    "gateway_id",
                    format!("`{id}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'"),
                ));
            }
            id
        }
        None => default_gateway_id(
            &std::fs::read_to_string("/etc/machine-id").unwrap_or_default(),
            &std::fs::read_to_string("/etc/hostname").unwrap_or_default(),
        )
        .ok_or_else(|| {
            src.error_at(
                None,
                "gateway_id",
                "is not set, this machine has no /etc/machine-id, and its host name is generic; set gateway_id to a name no other gateway uses (it is part of every record id and the MQTT client id)",
            )
        })?,
    };

    let batch = batch::batch(raw.batch, src)?;
    let spool = spool::spool(raw.spool, batch.max_linger, src)?;
    let destinations = destination::destinations(raw.destination, src)?;
    let routes = route::routes(raw.route, &destinations, &batch, src)?;
    let brokers = broker::brokers(raw.broker, &gateway_id, &batch, src)?;
    let admin = admin(raw.admin, src)?;
    let aws = aws::aws(raw.aws, &gateway_id, src)?;
    let fleet = match raw.fleet {
        Some(f) => Some(fleet::fleet(f, &gateway_id, &brokers, &spool, src)?),
        None => None,
    };
    Ok(Config {
        fleet,
        aws,
        gateway_id,
        shutdown_timeout: raw
            .shutdown_timeout
            .map_or(Duration::from_secs(10), |d| d.0),
        spool,
        batch,
        brokers,
        routes,
        destinations,
        admin,
    })
}

fn admin(raw: RawAdmin, src: &Source) -> Result<AdminConfig, ConfigError> {
    Ok(match raw.listen {
        Some(l) if l.get_ref() == "off" => AdminConfig { listen: None },
        Some(l) => {
            let span = l.span();
            let text = l.into_inner();
            let addr = text.parse::<std::net::SocketAddr>().map_err(|_| {
                src.error_at(
                    Some(span),
                    "admin.listen",
                    format!("`{text}` is not an IP:port address (or \"off\")"),
                )
            })?;
            AdminConfig { listen: Some(addr) }
        }
        None => AdminConfig {
            listen: Some(
                DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("default address parses"),
            ),
        },
    })
}

/// Host names that images ship with: every gateway cloned from the image would share it.
const GENERIC_HOST_NAMES: &[&str] = &[
    "localhost",
    "raspberrypi",
    "raspberry",
    "ubuntu",
    "debian",
    "dietpi",
    "orangepi",
    "beaglebone",
    "gateway",
    "edge",
];

/// The gateway id when the config sets none: `gw-` and the first 16 hex digits of the
/// machine id (systemd makes one per installation; an image cloned with it must run
/// `systemd-machine-id-setup` again), else a host name that is not an image's default.
fn default_gateway_id(machine_id: &str, host_name: &str) -> Option<String> {
    let machine_id = machine_id.trim();
    if machine_id.len() >= 16 && machine_id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Some(format!("gw-{}", &machine_id[..16]));
    }
    let host: String = host_name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(64)
        .collect();
    (!host.is_empty() && !GENERIC_HOST_NAMES.contains(&host.to_ascii_lowercase().as_str()))
        .then_some(host)
}

/// The Athena `CREATE EXTERNAL TABLE` (or, with `glue`, the Glue `TableInput` JSON) for the
/// objects route `route` writes to its S3 destination (`destination`, if it has several):
/// what `edgeship s3 ddl` prints. `table` defaults to the route's name.
pub fn athena_ddl(
    config: &Config,
    route: &str,
    destination: Option<&str>,
    table: Option<&str>,
    glue: bool,
) -> Result<String, String> {
    let r = config
        .routes
        .iter()
        .find(|r| r.name == route)
        .ok_or_else(|| format!("the config has no route `{route}`"))?;
    let buckets: Vec<(&String, &crate::sink::s3::S3Config)> = r
        .destinations
        .iter()
        .filter(|d| destination.is_none_or(|want| want == d.as_str()))
        .filter_map(|d| match config.destinations.get(d) {
            Some(DestinationConfig::S3(s)) => Some((d, s)),
            _ => None,
        })
        .collect();
    let (_, s3) = match buckets.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "route `{route}` has no S3 destination{}",
                destination.map_or(String::new(), |d| format!(" named `{d}`"))
            ))
        }
        _ => {
            return Err(format!(
                "route `{route}` has several S3 destinations: name one with --destination"
            ))
        }
    };
    // Athena table names: lower case, digits, underscores.
    let table = table.map_or_else(|| route.replace('-', "_").to_lowercase(), str::to_string);
    if glue {
        crate::sink::s3::athena::glue_table_input(s3, route, &table)
    } else {
        crate::sink::s3::athena::create_table(s3, route, &table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const MINIMAL: &str = r#"
gateway_id = "gw-1"
[[broker]]
host = "127.0.0.1"
[[route]]
name = "telemetry"
topics = ["devices/+/telemetry"]
destination = "main"
partition_key = "{topic[1]}"
[destination.main]
type = "kinesis"
stream = "s"
"#;

    #[test]
    fn the_default_gateway_id_is_the_machines_never_an_images() {
        assert_eq!(
            default_gateway_id("0123456789abcdef0123456789abcdef\n", "raspberrypi"),
            Some("gw-0123456789abcdef".into())
        );
        assert_eq!(
            default_gateway_id("", "pump-house-7\n"),
            Some("pump-house-7".into())
        );
        assert_eq!(default_gateway_id("", "raspberrypi\n"), None);
        assert_eq!(default_gateway_id("uninitialized", "localhost"), None);
    }

    #[test]
    fn embedded_default_config_is_valid() {
        Config::parse(DEFAULT_CONFIG, "default").expect("default config validates");
    }

    /// The shipped config leaves out the settings whose default follows another one, so a
    /// gateway that edits only `linger` (or a destination's shard rate) gets what follows.
    #[test]
    fn the_default_config_leaves_out_what_follows_other_settings() {
        let text = DEFAULT_CONFIG.replace("linger = \"1s\"", "linger = \"5s\"");
        assert_ne!(text, DEFAULT_CONFIG);
        let c = Config::parse(&text, "default").unwrap();
        assert_eq!(c.spool.commit_max_wait, Duration::from_secs(5));
        assert!(!c.batch.frame_bytes_set);
    }

    const BASE: &str = r#"
gateway_id = "gw"
[spool]
path = "/var/lib/x/spool.db"
max_bytes = "64MiB"
[[broker]]
name = "b"
host = "h"
[[route]]
name = "t"
topics = ["devices/+/telemetry"]
destination = "d"
[destination.d]
type = "directory"
path = "/tmp/x"
[fleet]
keys = ["ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
groups = ["plant"]
"#;

    #[test]
    fn a_fleet_document_replaces_its_sections_and_keeps_the_local_ones() {
        let pushed = r#"
[spool]
max_bytes = "128MiB"
[[route]]
name = "alerts"
topics = ["alerts/#"]
destination = "k"
[destination.k]
type = "kinesis"
stream = "s"
"#;
        let c = Config::parse_layered(BASE, "local.toml", pushed, "doc v3").unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].name, "alerts");
        assert!(c.destinations.contains_key("k") && !c.destinations.contains_key("d"));
        assert_eq!(c.spool.max_bytes, 128 << 20);
        assert_eq!(c.spool.path, PathBuf::from("/var/lib/x/spool.db"));
        assert_eq!(c.gateway_id, "gw");
        let fleet = c.fleet.unwrap();
        assert_eq!(fleet.state_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(fleet.client_id, "edgeship-gw-fleet");
        assert_eq!(fleet.groups, ["plant"]);
        // Without a [batch] in the document, the local one stays.
        assert_eq!(c.batch, Config::parse(BASE, "b").unwrap().batch);
    }

    #[test]
    fn fleet_document_errors_name_the_document_and_its_line() {
        let e = Config::parse_layered(BASE, "local.toml", "[spool]\npath = \"/x\"\n", "doc v3")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("doc v3:2:1: field `path`: unknown field `path`"),
            "{e}"
        );
        assert!(e.contains("stay in the local file"), "{e}");
        let e = Config::parse_layered(
            BASE,
            "local.toml",
            "[[route]]\nname = \"r\"\ntopics = [\"a\"]\ndestination = \"nowhere\"\n",
            "doc v4",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("doc v4:4:15: field `route.destination`"),
            "{e}"
        );
        let e = Config::parse(&BASE.replace("AAAA=", "AA="), "local.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("local.toml:17:8: field `fleet.keys`"), "{e}");
        let e = Config::parse(&format!("{BASE}broker = \"nope\"\n"), "local.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[broker]] is named `nope`"), "{e}");
    }

    #[test]
    fn commit_max_wait_is_checked_and_follows_a_longer_commit_interval() {
        let with = |spool: &str| Config::parse(&format!("{MINIMAL}[spool]\n{spool}"), "m.toml");
        let c = with("").unwrap();
        assert_eq!(
            (c.spool.commit_interval, c.spool.commit_max_wait),
            (Duration::from_millis(10), Duration::from_secs(1))
        );
        // Set to the interval: a commit every interval whatever the rate.
        let c = with("commit_max_wait = \"10ms\"\n").unwrap();
        assert_eq!(c.spool.commit_max_wait, Duration::from_millis(10));
        let c = with("commit_max_wait = \"5s\"\n").unwrap();
        assert_eq!(c.spool.commit_max_wait, Duration::from_secs(5));
        // Left out, it is never below the interval.
        let c = with("commit_interval = \"1s\"\n").unwrap();
        assert_eq!(c.spool.commit_max_wait, Duration::from_secs(1));
        let e = with("commit_max_wait = \"11s\"\n").unwrap_err().to_string();
        assert!(
            e.contains("spool.commit_max_wait") && e.contains("at most 10s"),
            "{e}"
        );
        let e = with("commit_interval = \"500ms\"\ncommit_max_wait = \"100ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least commit_interval"), "{e}");
    }

    /// `max_linger` is the linger unless set; set, it is at least the linger and at most an
    /// hour. The spool's commit wait follows it as it follows a longer linger.
    #[test]
    fn max_linger_is_the_linger_unless_set_and_never_below_it() {
        let with = |batch: &str| Config::parse(&format!("{MINIMAL}[batch]\n{batch}"), "m.toml");
        let c = with("linger = \"2s\"\n").unwrap();
        assert_eq!(c.batch.max_linger, Duration::from_secs(2));
        let c = with("max_linger = \"60s\"\n").unwrap();
        assert_eq!(
            (c.batch.linger, c.batch.max_linger, c.spool.commit_max_wait),
            (
                Duration::from_secs(1),
                Duration::from_secs(60),
                Duration::from_secs(10)
            )
        );
        let e = with("linger = \"5s\"\nmax_linger = \"2s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("batch.max_linger") && e.contains("at least linger"),
            "{e}"
        );
        let e = with("max_linger = \"2h\"\n").unwrap_err().to_string();
        assert!(
            e.contains("batch.max_linger") && e.contains("at most 1h"),
            "{e}"
        );
    }

    /// Left out, `commit_max_wait` is the frames' linger when that is longer than a second
    /// (at most 10 s): a slow stream's records wait that long for their frame anyway.
    #[test]
    fn commit_max_wait_left_out_follows_a_longer_linger() {
        let with = |linger: &str, spool: &str| {
            Config::parse(
                &format!("{MINIMAL}[batch]\nlinger = \"{linger}\"\n[spool]\n{spool}"),
                "m.toml",
            )
            .unwrap()
            .spool
            .commit_max_wait
        };
        assert_eq!(with("5s", ""), Duration::from_secs(5));
        assert_eq!(with("30s", ""), Duration::from_secs(10));
        assert_eq!(with("500ms", ""), Duration::from_secs(1));
        assert_eq!(with("1s", ""), Duration::from_secs(1));
        // Set, it is kept.
        assert_eq!(
            with("5s", "commit_max_wait = \"2s\"\n"),
            Duration::from_secs(2)
        );
        assert_eq!(
            with("5s", "commit_max_wait = \"10ms\"\n"),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "m.toml").unwrap();
        assert_eq!(c.gateway_id, "gw-1");
        assert_eq!(c.brokers[0].port, 1883);
        assert_eq!(c.brokers[0].client_id, "edgeship-gw-1");
        assert_eq!(c.routes[0].qos, 1);
        assert_eq!(c.spool.full_policy, FullPolicy::Block);
    }

    #[test]
    fn tls_and_iot_credentials_sections_parse_and_check_pairs() {
        let text = MINIMAL.replace(
            "[[broker]]\n",
            "[[broker]]\ntls = { ca_file = \"/etc/edgeship/ca.pem\", alpn = [\"x-amzn-mqtt-ca\"] }\n",
        ) + "[aws.iot_credentials]\nendpoint = \"c1.credentials.iot.eu-west-1.amazonaws.com\"\n\
               role_alias = \"edgeship\"\ncert = \"/etc/edgeship/gw.crt\"\nkey = \"/etc/edgeship/gw.key\"\n";
        let c = Config::parse(&text, "m.toml").unwrap();
        let b = &c.brokers[0];
        assert_eq!(b.port, 8883, "TLS without a port means 8883");
        assert_eq!(b.tls.as_ref().unwrap().alpn, vec!["x-amzn-mqtt-ca"]);
        let iot = c.aws.iot_credentials.unwrap();
        assert_eq!(
            iot.endpoint,
            "https://c1.credentials.iot.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            iot.thing_name, "gw-1",
            "the thing name defaults to the gateway id"
        );
        let half = MINIMAL.replace(
            "[[broker]]\n",
            "[[broker]]\ntls = { client_cert = \"/etc/edgeship/gw.crt\" }\n",
        );
        let e = Config::parse(&half, "m.toml").unwrap_err().to_string();
        assert!(e.contains("client_cert and client_key go together"), "{e}");
        let http = text.replace("endpoint = \"c1.", "endpoint = \"http://c1.");
        let e = Config::parse(&http, "m.toml").unwrap_err().to_string();
        assert!(e.contains("must be a host name or an https:// URL"), "{e}");
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = MINIMAL.replace("[[broker]]\n", "[[broker]]\nhots = \"x\"\n");
        let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.starts_with("m.toml:4:"), "{e}");
        assert!(e.contains("hots"), "{e}");
    }

    #[test]
    fn bad_unit_names_line_and_field() {
        let text = format!("{MINIMAL}[spool]\nmax_bytes = \"12 parsecs\"\n");
        let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.contains("m.toml:14:13:"), "{e}");
        assert!(e.contains("field `max_bytes`"), "{e}");
        assert!(e.contains("unknown size unit"), "{e}");
    }

    #[test]
    fn unknown_destination_is_refused_with_its_line() {
        let text = MINIMAL.replace("destination = \"main\"", "destination = \"nope\"");
        let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.contains("m.toml:8:"), "{e}");
        assert!(e.contains("`nope`"), "{e}");
    }

    #[test]
    fn an_s3_destination_is_checked_with_its_defaults_said() {
        let lake = |extra: &str| {
            format!(
                "{}[destination.lake]\ntype = \"s3\"\nbucket = \"my-lake\"\n{extra}\n",
                MINIMAL.replace(
                    "destination = \"main\"",
                    "destinations = [\"main\", \"lake\"]"
                )
            )
        };
        let c = Config::parse(&lake(""), "m.toml").unwrap();
        let Some(DestinationConfig::S3(s3)) = c.destinations.get("lake") else {
            panic!("an s3 destination")
        };
        assert_eq!(
            (s3.max_object_bytes, s3.max_object_age, s3.part_bytes),
            (64 << 20, std::time::Duration::from_secs(900), 5 << 20)
        );
        assert_eq!(s3.compression, crate::sink::s3::Compression::Zstd);
        for (bad, said) in [
            (
                "key_template = \"{prefix}/{date}/{first_seq}\"",
                "unknown field `{date}`",
            ),
            (
                "key_template = \"{prefix}/{dt}.json\"",
                "must contain {first_seq}",
            ),
            ("compression = \"lz4\"", "not one of zstd, gzip"),
            ("part_bytes = \"1MiB\"", "at least 5MiB"),
            ("upload_windows = [\"1am-5am\"]", "HH:MM-HH:MM"),
            ("endpoint = \"127.0.0.1:9000\"", "must start with http"),
            ("max_object_age = \"2h\"", "between 1s and 1h"),
        ] {
            let e = Config::parse(&lake(bad), "m.toml").unwrap_err().to_string();
            assert!(
                e.contains("m.toml:") && e.contains("destination.lake."),
                "{e}"
            );
            assert!(e.contains(said), "{bad}: {e}");
        }
        let e = Config::parse(&lake("").replace("my-lake", "My_Lake"), "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an S3 bucket name"), "{e}");
    }

    #[test]
    fn a_kafka_destination_is_checked_field_by_field() {
        let events = |extra: &str| {
            format!(
                "{}[destination.events]\ntype = \"kafka\"\nbrokers = [\"127.0.0.1:9092\"]\ntopic = \"telemetry\"\n{extra}\n",
                MINIMAL.replace("destination = \"main\"", "destination = \"events\"")
            )
        };
        let c = Config::parse(
            &events("[destination.events.create_topic]\npartitions = 6\nreplication_factor = 3"),
            "m.toml",
        )
        .unwrap();
        let Some(DestinationConfig::Kafka(k)) = c.destinations.get("events") else {
            panic!("a kafka destination")
        };
        assert_eq!(
            k.create_topic,
            Some(crate::sink::kafka::CreateTopic {
                partitions: 6,
                replication_factor: 3
            })
        );
        assert_eq!(
            k.message_max_bytes,
            crate::sink::kafka::DEFAULT_MESSAGE_MAX_BYTES
        );
        let c = Config::parse(&events(""), "m.toml").unwrap();
        assert!(matches!(
            c.destinations.get("events"),
            Some(DestinationConfig::Kafka(k)) if k.create_topic.is_none() && k.reauthenticate_every.is_none()
        ));
        let c = Config::parse(
            &events("[destination.events.sasl]\nmechanism = \"scram-sha-512\"\nusername = \"u\"\npassword = \"p\"\nreauthenticate_every = \"50m\""),
            "m.toml",
        )
        .unwrap();
        assert!(matches!(
            c.destinations.get("events"),
            Some(DestinationConfig::Kafka(k)) if k.reauthenticate_every == Some(std::time::Duration::from_secs(3000))
        ));
        for (bad, said) in [
            ("records = \"batch\"", "is not one of \"message\""),
            ("message_max_bytes = \"1KiB\"", "between 64KiB and 256MiB"),
            (
                "[destination.events.create_topic]\npartitions = 0\nreplication_factor = 1",
                "create_topic.partitions",
            ),
            (
                "[destination.events.create_topic]\npartitions = 3\nreplication_factor = 0",
                "create_topic.replication_factor",
            ),
            (
                "[destination.events.create_topic]\npartitions = 3",
                "replication_factor",
            ),
            (
                "[destination.events.sasl]\nmechanism = \"aws-msk-iam\"",
                "aws-msk-iam needs TLS",
            ),
            (
                "[destination.events.sasl]\nmechanism = \"plain\"\nusername = \"u\"\npassword = \"p\"\nreauthenticate_every = \"500ms\"",
                "sasl.reauthenticate_every",
            ),
            (
                "[destination.events.sasl]\nmechanism = \"scram-sha-512\"",
                "needs `username` and `password`",
            ),
        ] {
            let e = Config::parse(&events(bad), "m.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("m.toml:"), "{e}");
            assert!(e.contains(said), "{bad}: {e}");
        }
        let e = Config::parse(
            &events("").replace("topic = \"telemetry\"", "topic = \"tele/metry\""),
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a Kafka topic name"), "{e}");
    }

    #[test]
    fn a_route_may_name_several_destinations_each_once_and_defined() {
        let two = format!(
            "{}[destination.archive]\ntype = \"directory\"\npath = \"/tmp/archive\"\n",
            MINIMAL.replace(
                "destination = \"main\"",
                "destinations = [\"main\", \"archive\"]"
            )
        );
        let c = Config::parse(&two, "m.toml").unwrap();
        assert_eq!(c.routes[0].destinations, ["main", "archive"]);
        for (bad, said) in [
            (
                "destinations = [\"main\", \"nope\"]",
                "`nope`, which is not defined",
            ),
            ("destinations = [\"main\", \"main\"]", "`main` twice"),
            ("destinations = []", "names no destination"),
            (
                "destination = \"main\"\ndestinations = [\"main\"]",
                "sets both `destination` and `destinations`",
            ),
            ("", "has no `destination`"),
        ] {
            let text = MINIMAL.replace("destination = \"main\"", bad);
            let e = Config::parse(&text, "m.toml").unwrap_err().to_string();
            assert!(e.contains("m.toml:"), "{e}");
            assert!(e.contains(said), "{bad}: {e}");
        }
    }

    #[test]
    fn password_is_not_in_debug_output() {
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"",
            "host = \"h\"\npassword = \"hunter2\"",
        );
        let c = Config::parse(&text, "m.toml").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
