//! Bounded memory: a broker that does not pace the agent (MQTT 3.1.1, so no Receive Maximum
//! to announce, and Mosquitto told to keep no inflight limit) and 40 publishers at full speed
//! while the uplink is down and the backlog builds on disk, then drains. The agent's peak
//! resident memory (the kernel's high-water mark, VmHWM) stays under [`BOUND_MIB`]: the spool,
//! not memory, holds the backlog, and no more than `max_unacked` messages wait in memory for
//! their commit.

use crate::support::*;
use std::time::Duration;

/// The stated bound: a third of the unit's `MemoryMax=192M`. (This debug build peaks near
/// 50 MiB here; the `dist` build the package ships near 30 MiB.)
const BOUND_MIB: u64 = 64;

/// The agent's peak resident set so far, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn a_flood_the_broker_does_not_pace_stays_within_bounded_memory() {
    let stream = "e2e-memory-flood";
    let (devices, per_device) = (40, 2_500);
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let uplink = Uplink::start(kinesis.port);
    let mosquitto = Mosquitto::start_with(dir.path(), "max_inflight_messages 0\n");
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &uplink.endpoint(),
        stream,
        "",
        "",
    );
    assert!(!config.contains("protocol"), "MQTT 3.1.1, the default");
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    agent.wait_shards_learned();
    let pid = agent.pid().unwrap();
    uplink.cut();
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Default::default(),
    ));
    let total = u64::from(devices * per_device);
    wait_for("every message spooled", Duration::from_secs(120), || {
        agent.accounting().filter(|a| a.received >= total)
    });
    let flooded = peak_rss_kib(pid);
    uplink.restore();
    wait_stream_complete(
        &rt,
        &client,
        stream,
        devices,
        per_device,
        Duration::from_secs(300),
    );
    let drained = peak_rss_kib(pid);
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert!(acc.balances(), "{acc:?}");
    assert_eq!(acc.dropped, 0, "{acc:?}");
    eprintln!(
        "bounded memory: {total} messages flooded in, peak RSS {:.1} MiB after the flood, {:.1} MiB after the drain (bound {BOUND_MIB} MiB)",
        flooded as f64 / 1024.0,
        drained as f64 / 1024.0
    );
    assert!(
        drained < BOUND_MIB * 1024,
        "peak RSS {drained} KiB over the bound of {BOUND_MIB} MiB"
    );
}
