//! One scrape: reads the live figures of the running pipeline and writes every metric family.
//!
//! Reading is lock-free or takes a short lock on a small map; nothing here waits for the spool
//! thread, a broker or a destination, so a scrape answers even when they hang. Labels are only
//! names from the config (route, destination, broker, stream), shard ids, drop reasons and
//! error codes (both bounded); never a device id or a topic.

use super::exposition::{Exposition, Kind};
use crate::live::Live;
use crate::process;
use crate::sink::DestinationConfig;
use crate::spool::Counter;
use std::sync::atomic::Ordering::Relaxed;

/// The destinations a route's records go to, comma-separated ("" for messages no route
/// took).
fn destination_of(config: &crate::config::Config, route: &str) -> String {
    config
        .route(route)
        .map_or_else(String::new, |r| r.destinations.join(","))
}

pub(crate) fn render(live: &Live) -> String {
    let mut e = Exposition::default();
    accounting(&mut e, live);
    spool(&mut e, live);
    mqtt(&mut e, live);
    destinations(&mut e, live);
    agent(&mut e, live);
    e.finish()
}

/// Each destination's own terms: a route with several destinations keeps one copy of a
/// record and a cursor per destination, so one destination's backlog shows here while the
/// route's figures count a record once.
fn destination_terms(e: &mut Exposition, c: &crate::spool::store::Committed) {
    let pairs = c.pairs();
    for (name, counter, help) in [
        (
            "edgeship_destination_records_received_total",
            Counter::Received,
            "Records stored for a destination of their route, by route and destination.",
        ),
        (
            "edgeship_destination_records_delivered_total",
            Counter::Delivered,
            "Records a destination accepted, by route and destination.",
        ),
    ] {
        e.family(name, Kind::Counter, help);
        for (route, dest) in &pairs {
            let labels = [("route", route.as_str()), ("destination", dest.as_str())];
            e.sample(name, &labels, c.pair_counter(route, dest, counter));
        }
    }
    e.family(
        "edgeship_destination_records_dropped_total",
        Kind::Counter,
        "Records dropped for a destination, by route, destination and reason.",
    );
    for ((route, dest, counter), value) in &c.pair_counters {
        if let Counter::Dropped(reason) = counter {
            let labels = [
                ("route", route.as_str()),
                ("destination", dest.as_str()),
                ("reason", reason.as_str()),
            ];
            e.sample(
                "edgeship_destination_records_dropped_total",
                &labels,
                *value,
            );
        }
    }
    e.family(
        "edgeship_destination_records_pending",
        Kind::Gauge,
        "Records a destination still owes (its backlog), by route and destination. For each pair received = delivered + dropped + pending.",
    );
    for (route, dest) in &pairs {
        let pending = c
            .pair_pending
            .get(&(route.clone(), dest.clone()))
            .map_or(0, |p| p.0);
        let labels = [("route", route.as_str()), ("destination", dest.as_str())];
        e.sample("edgeship_destination_records_pending", &labels, pending);
    }
}

fn accounting(e: &mut Exposition, live: &Live) {
    let c = live.spool.stats().committed();
    let config = live.config();
    let mut routes: Vec<&str> = c.counters.keys().map(|(r, _)| r.as_str()).collect();
    routes.extend(c.pending.keys().map(String::as_str));
    routes.extend(config.routes.iter().map(|r| r.name.as_str()));
    routes.sort_unstable();
    routes.dedup();
    for (name, counter, help) in [
        (
            "edgeship_records_received_total",
            Counter::Received,
            "Messages committed to the spool (every outcome starts here), by route.",
        ),
        (
            "edgeship_records_delivered_total",
            Counter::Delivered,
            "Records their destination accepted, by route.",
        ),
    ] {
        e.family(name, Kind::Counter, help);
        for route in &routes {
            let labels = [
                ("route", *route),
                ("destination", &destination_of(&config, route)),
            ];
            e.sample(name, &labels, c.counter(route, counter));
        }
    }
    e.family(
        "edgeship_records_dropped_total",
        Kind::Counter,
        "Messages dropped, by route and reason (no_route, oversize, spool_full, corrupt). Nothing else is ever dropped.",
    );
    for ((route, counter), value) in &c.counters {
        if let Counter::Dropped(reason) = counter {
            let labels = [
                ("route", route.as_str()),
                ("destination", &destination_of(&config, route)),
                ("reason", reason.as_str()),
            ];
            e.sample("edgeship_records_dropped_total", &labels, *value);
        }
    }
    e.family(
        "edgeship_records_pending",
        Kind::Gauge,
        "Records spooled and not yet accepted by their destination, by route. received = delivered + dropped + pending.",
    );
    for route in &routes {
        let pending = c.pending.get(*route).map_or(0, |p| p.0);
        let labels = [
            ("route", *route),
            ("destination", &destination_of(&config, route)),
        ];
        e.sample("edgeship_records_pending", &labels, pending);
    }
    destination_terms(e, &c);
    e.family(
        "edgeship_records_orphaned",
        Kind::Gauge,
        "Records spooled for a route that no destination ships (route and destination removed); edgeship spool drop-route removes them.",
    );
    for (route, records, _) in live.orphaned() {
        e.sample(
            "edgeship_records_orphaned",
            &[("route", route.as_str())],
            records,
        );
    }
    e.family(
        "edgeship_spool_pending_bytes",
        Kind::Gauge,
        "Compressed bytes of pending records in the spool, by route.",
    );
    for route in &routes {
        let bytes = c.pending.get(*route).map_or(0, |p| p.1);
        let labels = [
            ("route", *route),
            ("destination", &destination_of(&config, route)),
        ];
        e.sample("edgeship_spool_pending_bytes", &labels, bytes);
    }
    let age = c.oldest_pending_ms.map_or(0.0, |ms| {
        (crate::clock::now_secs_f64() - ms as f64 / 1000.0).max(0.0)
    });
    e.single(
        "edgeship_spool_oldest_pending_age_seconds",
        Kind::Gauge,
        "Age of the oldest pending record (0 when none is pending).",
        age,
    );
    e.single(
        "edgeship_spool_dead_letters",
        Kind::Gauge,
        "Messages kept in the dead-letter table for inspection.",
        c.dead_letters,
    );
    e.single(
        "edgeship_spool_quarantined_blocks",
        Kind::Gauge,
        "Spool blocks that failed to decode and were moved aside.",
        c.quarantined_blocks,
    );
}

fn spool(e: &mut Exposition, live: &Live) {
    let s = live.spool.stats();
    let path = &live.config().spool.path;
    e.single(
        "edgeship_spool_max_bytes",
        Kind::Gauge,
        "Configured cap on spooled bytes; past it the full policy applies.",
        live.config().spool.max_bytes,
    );
    if let Some(bytes) = process::spool_file_bytes(path) {
        e.single(
            "edgeship_spool_file_bytes",
            Kind::Gauge,
            "Size of the spool file and its write-ahead log on disk.",
            bytes,
        );
    }
    if let Some(free) = process::disk_free_bytes(path) {
        e.single(
            "edgeship_spool_disk_free_bytes",
            Kind::Gauge,
            "Free bytes (for unprivileged writers) on the spool's file system.",
            free,
        );
    }
    e.single(
        "edgeship_spool_full",
        Kind::Gauge,
        "1 while new messages wait for spool space (policy block: reading has stopped).",
        s.full.load(Relaxed),
    );
    e.single(
        "edgeship_spool_disk_cap_bytes",
        Kind::Gauge,
        "The bytes the spool may hold since the disk filled before max_bytes (the full policy applies at this size until the disk has room again); 0 while max_bytes applies.",
        s.room_cap.load(Relaxed),
    );
    e.single(
        "edgeship_spool_rebuilds_total",
        Kind::Counter,
        "Times the spool file was found damaged while the agent ran and rebuilt from what read back (the rest counted dropped, reason corrupt).",
        s.rebuilds.load(Relaxed),
    );
    e.single(
        "edgeship_spool_writable",
        Kind::Gauge,
        "0 from a failed commit (disk full, I/O error) until a commit succeeds.",
        s.writable.load(Relaxed),
    );
    e.single(
        "edgeship_spool_commits_total",
        Kind::Counter,
        "Spool transactions committed.",
        s.commits.load(Relaxed),
    );
    e.single(
        "edgeship_spool_leases_total",
        Kind::Counter,
        "Leases taken by shippers (each wakes the spool thread and a shipper): at a steady rate, about one per commit, fewer while commits come closer than 100 ms and a slow stream's frames linger.",
        s.leases.load(Relaxed),
    );
    e.single(
        "edgeship_spool_commit_errors_total",
        Kind::Counter,
        "Spool transactions that failed and were retried (nothing was acked for them).",
        s.commit_failures.load(Relaxed),
    );
    e.family(
        "edgeship_spool_commit_duration_seconds",
        Kind::Histogram,
        "Time to commit one spool transaction, including its fsync where the sync level asks for one.",
    )
    .histogram(
        "edgeship_spool_commit_duration_seconds",
        &[],
        &s.commit_latency.cumulative(),
    );
    e.single(
        "edgeship_spool_appended_bytes_total",
        Kind::Counter,
        "Uncompressed record bytes appended to the spool.",
        s.appended_raw_bytes.load(Relaxed),
    );
    e.single(
        "edgeship_spool_stored_bytes_total",
        Kind::Counter,
        "Compressed bytes those records took in the spool.",
        s.appended_stored_bytes.load(Relaxed),
    );
}

fn mqtt(e: &mut Exposition, live: &Live) {
    type Read = fn(&crate::source::mqtt::SourceStats) -> u64;
    let families: [(&str, Kind, &str, Read); 17] = [
        (
            "edgeship_mqtt_connected",
            Kind::Gauge,
            "1 while the broker session is up.",
            |s| u64::from(s.connected.load(Relaxed)),
        ),
        (
            "edgeship_mqtt_connections_total",
            Kind::Counter,
            "Successful connections (CONNACK) to the broker.",
            |s| s.connects.load(Relaxed),
        ),
        (
            "edgeship_mqtt_reconnects_total",
            Kind::Counter,
            "Connections after the first one.",
            |s| s.connects.load(Relaxed).saturating_sub(1),
        ),
        (
            "edgeship_mqtt_connection_errors_total",
            Kind::Counter,
            "Failed connection attempts and dropped connections.",
            |s| s.connection_errors.load(Relaxed),
        ),
        (
            "edgeship_mqtt_subscriptions",
            Kind::Gauge,
            "Topic filters the broker granted in its last SUBACK.",
            |s| s.subscriptions.load(Relaxed),
        ),
        (
            "edgeship_mqtt_subscriptions_refused_total",
            Kind::Counter,
            "Topic filters the broker refused.",
            |s| s.subscriptions_refused.load(Relaxed),
        ),
        (
            "edgeship_mqtt_stale_acks_total",
            Kind::Counter,
            "Acks not written because their message came in on an earlier connection (the broker sends the message again).",
            |s| s.stale_acks.load(Relaxed),
        ),
        (
            "edgeship_mqtt_misdirected_acks_total",
            Kind::Counter,
            "Acks held back at the moment of writing because they belonged to an earlier connection (always 0: a defect if not).",
            |s| s.misdirected_acks.load(Relaxed),
        ),
        (
            "edgeship_mqtt_qos2_duplicates_total",
            Kind::Counter,
            "QoS 2 messages the broker sent again before releasing them, not spooled again.",
            |s| s.qos2_duplicates.load(Relaxed),
        ),
        (
            "edgeship_mqtt_oversize_packets_total",
            Kind::Counter,
            "Packets over max_packet_bytes read past (a PUBLISH among them is counted dropped, oversize_packet).",
            |s| s.oversize_packets.load(Relaxed),
        ),
        (
            "edgeship_mqtt_socket_reads_total",
            Kind::Counter,
            "Reads of the broker connection that returned bytes (with messages_received: messages per read).",
            |s| s.socket_reads.load(Relaxed),
        ),
        (
            "edgeship_mqtt_messages_received_total",
            Kind::Counter,
            "Messages read from the broker (redeliveries included).",
            |s| s.messages.load(Relaxed),
        ),
        (
            "edgeship_mqtt_received_bytes_total",
            Kind::Counter,
            "Payload bytes read from the broker.",
            |s| s.payload_bytes.load(Relaxed),
        ),
        (
            "edgeship_mqtt_unacked_messages",
            Kind::Gauge,
            "Messages read and not yet committed to the spool: the window, at most max_unacked.",
            |s| s.unacked.load(Relaxed),
        ),
        (
            "edgeship_mqtt_unacked_messages_max",
            Kind::Gauge,
            "The most messages awaiting their commit at once since the agent started (the window held: at most max_unacked).",
            |s| s.max_unacked_seen.load(Relaxed),
        ),
        (
            "edgeship_mqtt_write_backlog_bytes",
            Kind::Gauge,
            "Bytes of acks written by the agent that the connection has not taken yet: a broker reading its subscriber's packets more slowly than it sends (reading pauses at 1 MiB).",
            |s| s.write_backlog.load(Relaxed),
        ),
        (
            "edgeship_mqtt_write_backlog_bytes_max",
            Kind::Gauge,
            "The most bytes of acks waiting for the connection at once since the agent started.",
            |s| s.max_write_backlog.load(Relaxed),
        ),
    ];
    for (name, kind, help, read) in families {
        e.family(name, kind, help);
        for (broker, stats) in &live.sources {
            e.sample(name, &[("broker", broker)], read(stats));
        }
    }
    e.family(
        "edgeship_mqtt_ack_latency_seconds",
        Kind::Histogram,
        "From reading a QoS 1/2 message to handing its ack to the client (the spool commit is most of it).",
    );
    for (broker, stats) in &live.sources {
        e.histogram(
            "edgeship_mqtt_ack_latency_seconds",
            &[("broker", broker)],
            &stats.ack_latency.cumulative(),
        );
    }
}

fn destinations(e: &mut Exposition, live: &Live) {
    let stream = |name: &str| match live.config().destinations.get(name) {
        Some(DestinationConfig::Kinesis(k)) => k.stream.clone(),
        _ => String::new(),
    };
    let kind = |name: &str| {
        live.config()
            .destinations
            .get(name)
            .map_or("", DestinationConfig::kind)
    };
    e.family(
        "edgeship_destination_info",
        Kind::Gauge,
        "Each destination's type and stream (always 1).",
    );
    for (name, _) in &live.shippers() {
        let s = stream(name);
        e.sample(
            "edgeship_destination_info",
            &[("destination", name), ("type", kind(name)), ("stream", &s)],
            1u64,
        );
    }
    type Read = fn(&crate::ship::stats::ShipperStats) -> u64;
    let families: [(&str, Kind, &str, Read); 13] = [
        (
            "edgeship_destination_calls_total",
            Kind::Counter,
            "Calls made to the destination (PutRecords for Kinesis).",
            |s| s.calls.load(Relaxed),
        ),
        (
            "edgeship_destination_call_errors_total",
            Kind::Counter,
            "Calls that failed as a whole (nothing in them was accepted).",
            |s| s.call_failures.load(Relaxed),
        ),
        (
            "edgeship_destination_retried_entries_total",
            Kind::Counter,
            "Entries (frames) sent again after a failure.",
            |s| s.entries_retried.load(Relaxed),
        ),
        (
            "edgeship_destination_sent_bytes_total",
            Kind::Counter,
            "Frame bytes the destination accepted (compressed, what the uplink carried once).",
            |s| s.bytes_accepted.load(Relaxed),
        ),
        (
            "edgeship_destination_uncompressed_bytes_total",
            Kind::Counter,
            "Uncompressed record bytes inside accepted frames.",
            |s| s.raw_bytes_accepted.load(Relaxed),
        ),
        (
            "edgeship_destination_queued_bytes",
            Kind::Gauge,
            "Encoded frame bytes held in memory, waiting to be sent or resent.",
            |s| s.queued_bytes.load(Relaxed),
        ),
        (
            "edgeship_destination_uplink_bytes_per_second",
            Kind::Gauge,
            "Measured rate at which calls reach the destination (sets call sizes and timeouts); 0 until measured.",
            |s| s.uplink_rate.load(Relaxed),
        ),
        (
            "edgeship_destination_learned_record_limit_bytes",
            Kind::Gauge,
            "Record size limit the destination showed by refusing a larger record, when below max_record_bytes; 0 if none.",
            |s| s.learned_record_limit.load(Relaxed),
        ),
        (
            "edgeship_destination_split_frames_total",
            Kind::Counter,
            "Frames whose encoding was larger than one record, so they were encoded again in parts (work done twice); a route's frames are planned smaller once one is seen.",
            |s| s.frames_split.load(Relaxed),
        ),
        (
            "edgeship_destination_shipping",
            Kind::Gauge,
            "1 while the destination's shipper runs; 0 while it is started again after stopping on its own.",
            |s| u64::from(s.shipping.load(Relaxed)),
        ),
        (
            "edgeship_destination_restarts_total",
            Kind::Counter,
            "Times the destination's shipper stopped on its own and was started again.",
            |s| s.restarts.load(Relaxed),
        ),
        (
            "edgeship_destination_failing",
            Kind::Gauge,
            "1 from a failed call or entry until a call succeeds entirely.",
            |s| u64::from(s.failing.load(Relaxed)),
        ),
        (
            "edgeship_destination_records_accepted_total",
            Kind::Counter,
            "Records inside frames the destination accepted (a record accepted twice after a lost answer counts twice).",
            |s| s.records_accepted.load(Relaxed),
        ),
    ];
    for (name, kind, help, read) in families {
        e.family(name, kind, help);
        for (dest, stats) in &live.shippers() {
            e.sample(name, &[("destination", dest)], read(stats));
        }
    }
    e.family(
        "edgeship_destination_entries_total",
        Kind::Counter,
        "Entries (frames) by outcome: accepted, throttled (the destination asked to slow down), failed (any other error).",
    );
    for (dest, s) in &live.shippers() {
        let failed = s.entries_failed.load(Relaxed);
        let throttled = s.entries_throttled.load(Relaxed);
        for (outcome, n) in [
            ("accepted", s.entries_accepted.load(Relaxed)),
            ("throttled", throttled),
            ("failed", failed.saturating_sub(throttled)),
        ] {
            e.sample(
                "edgeship_destination_entries_total",
                &[("destination", dest), ("outcome", outcome)],
                n,
            );
        }
    }
    e.family(
        "edgeship_destination_errors_total",
        Kind::Counter,
        "Failed entries by error code (whole failed calls count each of their entries).",
    );
    for (dest, s) in &live.shippers() {
        for (code, n) in s.errors() {
            e.sample(
                "edgeship_destination_errors_total",
                &[("destination", dest), ("code", &code)],
                n,
            );
        }
    }
    e.family(
        "edgeship_destination_compression_ratio",
        Kind::Gauge,
        "Sent bytes per uncompressed record byte, over the agent's life (0 before the first frame).",
    );
    for (dest, s) in &live.shippers() {
        let raw = s.raw_bytes_accepted.load(Relaxed);
        let sent = s.bytes_accepted.load(Relaxed);
        let ratio = if raw == 0 {
            0.0
        } else {
            sent as f64 / raw as f64
        };
        e.sample(
            "edgeship_destination_compression_ratio",
            &[("destination", dest)],
            ratio,
        );
    }
    e.family(
        "edgeship_destination_last_success_timestamp_seconds",
        Kind::Gauge,
        "When a call to the destination last succeeded entirely (0: never).",
    );
    for (dest, s) in &live.shippers() {
        e.sample(
            "edgeship_destination_last_success_timestamp_seconds",
            &[("destination", dest)],
            s.last_success_ms.load(Relaxed) as f64 / 1000.0,
        );
    }
    e.family(
        "edgeship_end_to_end_latency_seconds",
        Kind::Histogram,
        "From a record's receipt to its destination accepting it, per record.",
    );
    for (dest, s) in &live.shippers() {
        e.histogram(
            "edgeship_end_to_end_latency_seconds",
            &[("destination", dest)],
            &s.end_to_end_latency.cumulative(),
        );
    }
    // Per shard, for destinations with shards (Kinesis). Closed shards stay until restart.
    type Shard = fn(&crate::ship::stats::ShardCounters) -> u64;
    let per_shard: [(&str, &str, Shard); 3] = [
        (
            "edgeship_kinesis_shard_records_total",
            "Records accepted per shard.",
            |c| c.records_accepted,
        ),
        (
            "edgeship_kinesis_shard_sent_bytes_total",
            "Frame bytes accepted per shard.",
            |c| c.bytes_accepted,
        ),
        (
            "edgeship_kinesis_shard_entries_accepted_total",
            "Entries (frames) accepted per shard.",
            |c| c.entries_accepted,
        ),
    ];
    let shippers = live.shippers();
    let shards: Vec<_> = shippers
        .iter()
        .map(|(dest, s)| (dest, stream(dest), s.shards()))
        .collect();
    for (name, help, read) in per_shard {
        e.family(name, Kind::Counter, help);
        for (dest, stream, map) in &shards {
            for (shard, c) in map {
                e.sample(
                    name,
                    &[("destination", dest), ("stream", stream), ("shard", shard)],
                    read(c),
                );
            }
        }
    }
    e.family(
        "edgeship_kinesis_shard_entries_failed_total",
        Kind::Counter,
        "Entries (frames) not accepted per shard, by kind: throttled or failed.",
    );
    for (dest, stream, map) in &shards {
        for (shard, c) in map {
            for (kind, n) in [
                ("throttled", c.entries_throttled),
                ("failed", c.entries_failed),
            ] {
                e.sample(
                    "edgeship_kinesis_shard_entries_failed_total",
                    &[
                        ("destination", dest),
                        ("stream", stream),
                        ("shard", shard),
                        ("kind", kind),
                    ],
                    n,
                );
            }
        }
    }
}

fn agent(e: &mut Exposition, live: &Live) {
    e.family(
        "edgeship_build_info",
        Kind::Gauge,
        "The running agent's version (always 1).",
    )
    .sample(
        "edgeship_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1u64,
    );
    e.single(
        "edgeship_config_version",
        Kind::Gauge,
        "Version of the applied config document (0: the local file).",
        live.config_version.load(Relaxed),
    );
    let fleet = live.fleet_report();
    if let Some(f) = fleet {
        e.family(
            "edgeship_fleet_documents_total",
            Kind::Counter,
            "Fleet config documents by outcome (applied, refused, rolled_back); repeats of the running or an already tried version are not counted.",
        );
        for (outcome, n) in [
            ("applied", f.applied_total),
            ("refused", f.refused_total),
            ("rolled_back", f.rolled_back_total),
        ] {
            e.sample("edgeship_fleet_documents_total", &[("outcome", outcome)], n);
        }
        e.single(
            "edgeship_fleet_pending_version",
            Kind::Gauge,
            "The fleet config version being applied and health-checked now (0: none).",
            f.pending_version.unwrap_or(0),
        );
    }
    if let Some(c) = &live.iot_credentials {
        e.single(
            "edgeship_aws_credentials_fetches_total",
            Kind::Counter,
            "Credentials obtained from the AWS IoT credentials provider.",
            c.fetches.load(Relaxed),
        );
        e.single(
            "edgeship_aws_credentials_fetch_errors_total",
            Kind::Counter,
            "Failed attempts to get credentials from the AWS IoT credentials provider.",
            c.fetch_errors.load(Relaxed),
        );
        e.single(
            "edgeship_aws_credentials_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the current AWS IoT credentials expire (Unix seconds; 0 before the first).",
            c.expires_unix.load(Relaxed),
        );
    }
    let p = process::read();
    let figures: [(&str, Kind, &str, Option<f64>); 6] = [
        (
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
            p.resident_bytes.map(|v| v as f64),
        ),
        (
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
            p.virtual_bytes.map(|v| v as f64),
        ),
        (
            "process_cpu_seconds_total",
            Kind::Counter,
            "User and system CPU time spent in seconds.",
            p.cpu_seconds,
        ),
        (
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since the Unix epoch in seconds.",
            Some(crate::clock::unix_ms(live.started) as f64 / 1000.0),
        ),
        (
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors.",
            p.max_fds.map(|v| v as f64),
        ),
    ];
    for (name, kind, help, value) in figures {
        if let Some(v) = value {
            e.single(name, kind, help, v);
        }
    }
}
