//! What a config calls for, and what a config change does to the running shippers: decided
//! without I/O, so each rule is unit-tested.
//!
//! One shipper per destination that has routes (a route with several destinations is in
//! each one's). Routes a change removes keep shipping what they spooled to the destinations
//! of the same names the new config still has (retired routes); a route named again is live
//! again. A destination whose settings or
//! routes changed gets a new shipper (the old one stops first), an unchanged one keeps its
//! own.

use crate::config::Config;
use crate::frame::encoder::FrameFormat;
use crate::ship::ShipperSpec;
use crate::sink::DestinationConfig;
use std::collections::BTreeMap;

/// Everything one destination's shipper is built from: a change in any of it means a new
/// shipper.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spec {
    pub(crate) destination: DestinationConfig,
    pub(crate) shipper: ShipperSpec,
}

/// Routes a config change removed, with the destinations (and format) that still ship what
/// they spooled.
pub(crate) type Retired = BTreeMap<String, (Vec<String>, FrameFormat)>;

/// The shippers `config` calls for: one per destination with routes (its own and the retired
/// ones it drains).
pub(crate) fn specs(config: &Config, retired: &Retired) -> BTreeMap<String, Spec> {
    let mut specs = BTreeMap::new();
    for (name, dest) in &config.destinations {
        let mut routes = Vec::new();
        let mut placed_routes = Vec::new();
        let mut route_formats = Vec::new();
        let mine = config
            .routes
            .iter()
            .filter(|r| r.destinations.contains(name))
            .map(|r| (&r.name, &r.destinations, r.format));
        let drained = retired
            .iter()
            .filter(|(_, (d, _))| d.contains(name))
            .map(|(route, (d, format))| (route, d, *format));
        for (route, dests, format) in mine.chain(drained) {
            routes.push(route.clone());
            if placer(config, dests) == Some(name) {
                placed_routes.push(route.clone());
            }
            let format = dest.required_format().unwrap_or(format);
            if format != FrameFormat::Edgeship {
                route_formats.push((route.clone(), format));
            }
        }
        if routes.is_empty() {
            continue;
        }
        specs.insert(
            name.clone(),
            Spec {
                destination: dest.clone(),
                shipper: ShipperSpec {
                    routes,
                    placed_routes,
                    route_formats,
                    batch: config.batch.clone(),
                    max_queued_bytes: (config.spool.max_bytes / 4) as usize,
                },
            },
        );
    }
    specs
}

/// The destination of a route that says where its records go in the spool: the first with
/// shards of its own (a Kinesis stream), whose buckets keep every key on one of its shards and
/// serve the others too; else the first. A destination without shards that packs all keys
/// (S3, Firehose, Kafka messages) has one bucket, which, placing a route that also feeds a
/// stream, would send all of it to one shard.
fn placer<'a>(config: &Config, destinations: &'a [String]) -> Option<&'a String> {
    destinations
        .iter()
        .find(|d| {
            matches!(
                config.destinations.get(*d),
                Some(DestinationConfig::Kinesis(_))
            )
        })
        .or(destinations.first())
}

/// Updates `retired` for a change from `old` to `new`: routes `new` drops are retired to
/// their destinations; retired routes none of whose destinations is left, or that `new`
/// names again, are no longer.
pub(crate) fn retire(old: &Config, new: &Config, retired: &mut Retired) {
    for r in &old.routes {
        if new.route(&r.name).is_none() {
            retired.insert(r.name.clone(), (r.destinations.clone(), r.format));
        }
    }
    retired.retain(|route, (dests, _)| {
        dests.retain(|d| new.destinations.contains_key(d));
        new.route(route).is_none() && !dests.is_empty()
    });
}

/// Where each route's records go (its own and the retired ones): route -> (destinations,
/// frame format), as the spool records it.
pub(crate) fn route_map(
    config: &Config,
    retired: &Retired,
) -> BTreeMap<String, (Vec<String>, String)> {
    config
        .routes
        .iter()
        .map(|r| (r.name.clone(), (r.destinations.clone(), r.format)))
        .chain(
            retired
                .iter()
                .map(|(route, (d, f))| (route.clone(), (d.clone(), *f))),
        )
        .map(|(route, (d, f))| (route, (d, f.as_str().to_string())))
        .collect()
}

/// Routes the spool holds records of that `config` no longer has, whose recorded
/// destinations it still has (some of them): they are drained there (retired). `pending` are
/// the routes with records spooled, `recorded` where the spool says each route's records go.
pub(crate) fn retired_at_start<'a>(
    config: &Config,
    pending: impl IntoIterator<Item = &'a String>,
    recorded: &BTreeMap<String, (Vec<String>, String)>,
) -> Retired {
    pending
        .into_iter()
        .filter(|route| config.route(route).is_none())
        .filter_map(|route| {
            let (dests, format) = recorded.get(route)?;
            let format = FrameFormat::parse(format)?;
            let dests: Vec<String> = dests
                .iter()
                .filter(|d| config.destinations.contains_key(*d))
                .cloned()
                .collect();
            (!dests.is_empty()).then(|| (route.clone(), (dests, format)))
        })
        .collect()
}

/// Which shippers to start and which to stop to go from `running` to `wanted`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// New destinations, and those whose spec changed (after their old shipper stopped).
    pub(crate) start: Vec<String>,
    /// Removed destinations, and those whose spec changed.
    pub(crate) stop: Vec<String>,
}

pub(crate) fn changes(
    running: &BTreeMap<String, Spec>,
    wanted: &BTreeMap<String, Spec>,
) -> Changes {
    let start: Vec<String> = wanted
        .iter()
        .filter(|(name, spec)| running.get(*name) != Some(spec))
        .map(|(name, _)| name.clone())
        .collect();
    let stop = running
        .keys()
        .filter(|name| !wanted.contains_key(*name) || start.contains(name))
        .cloned()
        .collect();
    Changes { start, stop }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(routes: &[(&str, &str)], destinations: &[&str]) -> Config {
        let mut text = String::from("gateway_id = \"gw\"\n[[broker]]\nhost = \"h\"\n");
        for (route, dest) in routes {
            text.push_str(&format!(
                "[[route]]\nname = \"{route}\"\ntopics = [\"{route}/#\"]\ndestination = \"{dest}\"\n"
            ));
        }
        for d in destinations {
            text.push_str(&format!(
                "[destination.{d}]\ntype = \"directory\"\npath = \"/tmp/{d}\"\n"
            ));
        }
        Config::parse(&text, "test").unwrap()
    }

    #[test]
    fn one_shipper_per_destination_with_routes() {
        let c = config(&[("t", "a"), ("u", "a")], &["a", "b"]);
        let s = specs(&c, &Retired::new());
        assert_eq!(s.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(s["a"].shipper.routes, ["t", "u"]);
    }

    #[test]
    fn a_removed_route_drains_to_its_destination_while_it_exists() {
        let old = config(&[("t", "a"), ("u", "a")], &["a"]);
        let new = config(&[("u", "a")], &["a"]);
        let mut retired = Retired::new();
        retire(&old, &new, &mut retired);
        assert_eq!(retired.keys().collect::<Vec<_>>(), ["t"]);
        let s = specs(&new, &retired);
        assert_eq!(
            s["a"].shipper.routes,
            ["u", "t"],
            "t still ships what it spooled"
        );
        // Named again: live again, not retired.
        retire(&new, &old, &mut retired);
        assert!(retired.is_empty());
        // Its destination removed: nothing can ship it (reported elsewhere).
        let mut retired = Retired::new();
        retire(&old, &config(&[("u", "b")], &["b"]), &mut retired);
        assert!(retired.is_empty());
    }

    #[test]
    fn records_of_a_route_gone_at_a_restart_drain_to_their_recorded_destination() {
        let old = config(&[("telemetry", "a")], &["a"]);
        let recorded = route_map(&old, &Retired::new());
        // Renamed while the agent was down: the records of `telemetry` still go to `a`.
        let renamed = config(&[("t2", "a")], &["a"]);
        let pending = ["telemetry".to_string()];
        let retired = retired_at_start(&renamed, &pending, &recorded);
        assert_eq!(retired.keys().collect::<Vec<_>>(), ["telemetry"]);
        assert_eq!(
            specs(&renamed, &retired)["a"].shipper.routes,
            ["t2", "telemetry"]
        );
        // Its destination is gone too: nothing drains it (reported as orphaned).
        let elsewhere = config(&[("t2", "b")], &["b"]);
        assert!(retired_at_start(&elsewhere, &pending, &recorded).is_empty());
    }

    #[test]
    fn a_route_with_two_destinations_is_in_both_shippers_and_placed_by_the_first() {
        let c = config(&[("t", "a"), ("u", "b")], &["a", "b"]);
        let mut c2 = c.clone();
        c2.routes[0].destinations = vec!["b".into(), "a".into()];
        let s = specs(&c2, &Retired::new());
        assert_eq!(s["a"].shipper.routes, ["t"]);
        assert!(s["a"].shipper.placed_routes.is_empty(), "b is t's first");
        assert_eq!(s["b"].shipper.routes, ["t", "u"]);
        assert_eq!(s["b"].shipper.placed_routes, ["t", "u"]);
        assert_eq!(route_map(&c2, &Retired::new())["t"].0, ["b", "a"]);
        // Removed: it drains to each destination still configured.
        let mut retired = Retired::new();
        let only_a = config(&[("u", "a")], &["a"]);
        retire(&c2, &only_a, &mut retired);
        assert_eq!(retired["t"].0, ["a"]);
        assert_eq!(specs(&only_a, &retired)["a"].shipper.routes, ["u", "t"]);
    }

    #[test]
    fn a_stream_places_a_route_it_shares_with_destinations_without_shards() {
        let mut c = config(&[("t", "a"), ("u", "b")], &["a", "b"]);
        c.routes[0].destinations = vec!["b".into(), "a".into()];
        c.routes[1].destinations = vec!["b".into(), "a".into()];
        let kinesis = Config::parse(
            "gateway_id = \"gw\"\n[[broker]]\nhost = \"h\"\n[[route]]\nname = \"t\"\ntopics = [\"t/#\"]\ndestination = \"a\"\n[destination.a]\ntype = \"kinesis\"\nstream = \"s\"\nregion = \"us-east-1\"\n",
            "test",
        )
        .unwrap();
        c.destinations
            .insert("a".into(), kinesis.destinations["a"].clone());
        let s = specs(&c, &Retired::new());
        // b is first in both routes, but a is a stream: its shards place them.
        assert_eq!(s["a"].shipper.placed_routes, ["t", "u"]);
        assert!(s["b"].shipper.placed_routes.is_empty());
    }

    #[test]
    fn only_changed_destinations_get_new_shippers() {
        let running = specs(
            &config(&[("t", "a"), ("u", "b")], &["a", "b", "c"]),
            &Retired::new(),
        );
        let wanted = specs(
            &config(&[("t", "a"), ("u", "c"), ("v", "b")], &["a", "b", "c"]),
            &Retired::new(),
        );
        let c = changes(&running, &wanted);
        assert_eq!(c.start, ["b", "c"], "b's routes changed, c is new");
        assert_eq!(c.stop, ["b"], "a keeps its shipper");
        let none = changes(&running, &running);
        assert_eq!(none, Changes::default());
        let gone = changes(&running, &BTreeMap::new());
        assert_eq!(gone.stop, ["a", "b"]);
    }
}
