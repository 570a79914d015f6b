//! One route, several destinations: each record is stored once and every destination gets
//! all of them, however the others fare (one down for a while, the agent killed meanwhile).

use crate::support::*;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// The agent's config with route `telemetry` feeding `destinations` (a TOML list) of two
/// Kinesis streams: `near` (stream `<prefix>-near`) through `near_endpoint`, `far`
/// (`<prefix>-far`) through `far_endpoint`.
fn config_with(
    dir: &std::path::Path,
    broker: u16,
    destinations: &str,
    prefix: &str,
    (near_endpoint, far_endpoint): (&str, &str),
) -> String {
    agent_config(
        dir,
        broker,
        near_endpoint,
        &format!("{prefix}-near"),
        "",
        "",
    )
    .replace(
        "destination = \"stream\"",
        &format!("destinations = {destinations}"),
    )
    .replace("[destination.stream]", "[destination.near]")
        + &format!(
            r#"[destination.far]
type = "kinesis"
stream = "{prefix}-far"
region = "us-east-1"
endpoint = "{far_endpoint}"
"#
        )
}

fn terms(acc: &edgeship::spool::Accounting, dest: &str) -> edgeship::spool::store::Terms {
    acc.destinations
        .get(&format!("telemetry/{dest}"))
        .cloned()
        .unwrap_or_default()
}

/// Two streams on one route; the far one's uplink is cut while 10,000 messages arrive and
/// the agent is killed with -9 in the middle of that. The near stream gets everything
/// without waiting for the far one and is not sent the far one's backlog after the restart;
/// when the link is back the far stream gets every record too. Each destination's terms
/// balance, and the records were stored once.
#[test]
fn each_destination_gets_every_record_through_the_others_outage_and_a_kill() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-fan-near", 1);
    rt.block_on(create_stream(&client, "e2e-fan-far", 1));
    let far_link = Uplink::start(kinesis.port);
    let mosquitto = Mosquitto::start(dir.path());
    let config = config_with(
        dir.path(),
        mosquitto.port,
        r#"["near", "far"]"#,
        "e2e-fan",
        (&kinesis.endpoint(), &far_link.endpoint()),
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    let devices = 10;

    // Both up: 1,000 messages reach both.
    rt.block_on(publish(
        mosquitto.port,
        devices,
        100,
        Arc::new(AtomicU64::new(0)),
    ));
    wait_for(
        "both destinations take the first 1,000",
        Duration::from_secs(60),
        || {
            agent.accounting().filter(|a| {
                terms(a, "near").delivered >= 1_000 && terms(a, "far").delivered >= 1_000
            })
        },
    );

    // The far link goes down; 5,000 more arrive and the near stream takes them meanwhile.
    far_link.cut();
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        500,
        Arc::new(AtomicU64::new(0)),
        |d, s| payload(d, s + 100),
        "b-",
    ));
    let before_kill = wait_for(
        "the near stream to take 6,000 while the far one is down",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| terms(a, "near").delivered >= 6_000 && terms(a, "near").pending == 0)
        },
    );
    let far = terms(&before_kill, "far");
    assert!(
        far.pending >= 4_000 && far.delivered < 6_000,
        "the far destination's backlog holds what came during the outage: {before_kill:?}"
    );
    assert!(before_kill.balances(), "{before_kill:?}");

    // kill -9 with the far backlog spooled; 5,000 more while the link is still down.
    agent.kill();
    agent.spawn();
    agent.wait_connected(2);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        500,
        Arc::new(AtomicU64::new(0)),
        |d, s| payload(d, s + 600),
        "c-",
    ));
    let near = wait_stream_complete(
        &rt,
        &client,
        "e2e-fan-near",
        devices,
        1_100,
        Duration::from_secs(180),
    );
    let after_restart = agent.accounting().expect("accounting");
    assert!(
        terms(&after_restart, "far").pending >= 9_000,
        "the far backlog is still spooled after the kill: {after_restart:?}"
    );

    far_link.restore();
    let far = wait_stream_complete(
        &rt,
        &client,
        "e2e-fan-far",
        devices,
        1_100,
        Duration::from_secs(240),
    );
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
    let (n, f) = (terms(&acc, "near"), terms(&acc, "far"));
    assert_eq!(
        (n.received, n.dropped, n.pending, f.received, f.dropped, f.pending),
        (acc.received, 0, 0, acc.received, 0, 0),
        "each destination took every record received: {acc:?}"
    );
    assert_eq!((n.delivered, f.delivered), (acc.received, acc.received));
    let near_dups = assert_all_delivered(&near.messages, devices, 1_100);
    let far_dups = assert_all_delivered(&far.messages, devices, 1_100);
    // What the kill cut off may come twice (the broker's redelivery of unacked messages,
    // a frame sent but not yet recorded); the far backlog of 5,000 must not.
    assert!(
        near_dups < 2_000,
        "the near stream got {near_dups} duplicates: was the far backlog sent to it?"
    );
    eprintln!(
        "fan-out: {} received, near stream {} messages ({near_dups} duplicates), far stream {} ({far_dups} duplicates)",
        acc.received,
        near.messages.len(),
        far.messages.len()
    );
    assert_eq!(agent.stop().code(), Some(0));
}

/// Which of `payload(d, 0..upto)` of `devices` devices a stream holds, by sequence.
fn held(contents: &StreamContents, devices: u32, upto: u32) -> Vec<u32> {
    let t = tally(&contents.messages);
    (0..upto)
        .filter(|s| (0..devices).all(|d| t.contains_key(&(topic_of(d), payload(d, *s)))))
        .collect()
}

/// Destinations changed by config between runs: one added while the other has a backlog
/// takes only what comes after the change; one removed gives up its backlog, which leaves
/// the spool because the other destination took it, counted dropped `removed` for the
/// removed one only.
#[test]
fn an_added_destination_takes_what_comes_after_and_a_removed_one_releases_its_backlog() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-fanc-near", 1);
    rt.block_on(create_stream(&client, "e2e-fanc-far", 1));
    let near_link = Uplink::start(kinesis.port);
    let mosquitto = Mosquitto::start(dir.path());
    let config = |dests: &str| {
        config_with(
            dir.path(),
            mosquitto.port,
            dests,
            "e2e-fanc",
            (&near_link.endpoint(), &kinesis.endpoint()),
        )
    };
    let devices = 10;
    let publish_seqs = |from: u32, n: u32, prefix: &'static str| {
        rt.block_on(publish_with(
            mosquitto.port,
            devices,
            n,
            Arc::new(AtomicU64::new(0)),
            move |d, s| payload(d, s + from),
            prefix,
        ))
    };

    // near only, its link down: 1,000 wait for it.
    near_link.cut();
    let mut agent = Agent::start(dir.path(), &config(r#"["near"]"#));
    agent.wait_connected(1);
    publish_seqs(0, 100, "a-");
    wait_for("1,000 spooled for near", Duration::from_secs(60), || {
        agent
            .accounting()
            .filter(|a| terms(a, "near").pending >= 1_000)
    });
    assert_eq!(agent.stop().code(), Some(0));

    // far added: it takes the next 500, not near's backlog.
    let mut agent = Agent::start(dir.path(), &config(r#"["near", "far"]"#));
    agent.wait_connected(2);
    publish_seqs(100, 50, "b-");
    let acc = wait_for(
        "far takes the 500 new ones",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| terms(a, "far").delivered >= 500 && terms(a, "far").pending == 0)
        },
    );
    assert_eq!(
        (terms(&acc, "far").received, terms(&acc, "near").pending),
        (500, 1_500),
        "{acc:?}"
    );
    let far = rt.block_on(read_stream(&client, "e2e-fanc-far"));
    assert_eq!(held(&far, devices, 150), (100..150).collect::<Vec<_>>());
    let before: std::collections::HashSet<Vec<u8>> = (0..devices)
        .flat_map(|d| (0..100).map(move |s| payload(d, s)))
        .collect();
    assert!(
        !far.messages.iter().any(|m| before.contains(&m.payload)),
        "nothing from before far was added"
    );

    // near back: it gets all 1,500.
    near_link.restore();
    wait_stream_complete(
        &rt,
        &client,
        "e2e-fanc-near",
        devices,
        150,
        Duration::from_secs(180),
    );

    // near down again with 500 more, then removed: far took them, so they leave.
    near_link.cut();
    publish_seqs(150, 50, "c-");
    wait_for(
        "far takes 1,000, near owes 500",
        Duration::from_secs(120),
        || {
            agent
                .accounting()
                .filter(|a| terms(a, "far").delivered >= 1_000 && terms(a, "near").pending >= 500)
        },
    );
    assert_eq!(agent.stop().code(), Some(0));
    let mut agent = Agent::start(dir.path(), &config(r#"["far"]"#));
    agent.wait_connected(3);
    let acc = wait_for("the spool to empty", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    let (n, f) = (terms(&acc, "near"), terms(&acc, "far"));
    assert_eq!(
        (n.received, n.delivered, n.dropped, n.pending),
        (2_000, 1_500, 500, 0)
    );
    assert_eq!(
        (f.received, f.delivered, f.dropped, f.pending),
        (1_000, 1_000, 0, 0)
    );
    assert_eq!(
        (acc.received, acc.delivered, acc.dropped),
        (2_000, 2_000, 0),
        "every record left delivered to each destination that still wanted it: {acc:?}"
    );
    let near = rt.block_on(read_stream(&client, "e2e-fanc-near"));
    assert_eq!(held(&near, devices, 200), (0..150).collect::<Vec<_>>());
    let far = rt.block_on(read_stream(&client, "e2e-fanc-far"));
    assert_eq!(held(&far, devices, 200), (100..200).collect::<Vec<_>>());
    assert_eq!(agent.stop().code(), Some(0));
}
