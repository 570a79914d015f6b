//! The MQTT intake under the faults that used to cost a connection a minute: a broker that
//! floods an agent whose spool is full (the keep-alive used to time out behind unread
//! messages), saturating publishers for minutes on MQTT 3.1.1 and 5, a broker restarted
//! without persistence, and a message larger than `max_packet_bytes`; and a slow, steady
//! stream read several messages at a time.

use crate::support::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn kilobyte(d: u32, s: u32) -> Vec<u8> {
    noise(d, s, 1_000)
}

/// The agent's peak resident set so far, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A broker that does not pace the agent (3.1.1, no inflight limit) floods 12,000 messages
/// of 1 KB into an agent whose 2 MiB spool is full under `block`, its uplink down: the agent
/// stops reading, and keeps its one connection for five keep-alive intervals (it used to lose
/// it to an unanswered ping every 10 s and take every unacked message again); its memory
/// stays bounded; once the uplink returns every message arrives, each read about once.
#[test]
fn a_flood_into_a_full_spool_keeps_one_connection() {
    let stream = "e2e-intake-full-flood";
    // 12 MB of incompressible payload: six times the spool, and what the emulator takes back
    // in about a minute once the uplink returns.
    let (devices, per_device) = (40, 300);
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
        "max_bytes = \"2MiB\"\nfull_policy = \"block\"",
        "",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    agent.wait_shards_learned();
    let pid = agent.pid().unwrap();
    uplink.cut();
    let total = u64::from(devices * per_device);
    rt.block_on(publish_with(
        mosquitto.port,
        devices,
        per_device,
        Default::default(),
        kilobyte,
        "flood-",
    ));
    wait_for("the spool to fill", Duration::from_secs(60), || {
        (agent.scrape().sum("edgeship_spool_full", &[]) == 1.0).then_some(())
    });
    // Five keep-alive intervals (5 s each) with the window full and the broker pushing.
    std::thread::sleep(Duration::from_secs(25));
    let s = agent.scrape();
    assert_eq!(
        s.sum("edgeship_mqtt_connections_total", &[]),
        1.0,
        "one connection while the spool was full:\n{}",
        agent.log()
    );
    let flooded = peak_rss_kib(pid);
    uplink.restore();
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(300), |t| {
        (0..devices)
            .all(|d| (0..per_device).all(|s| t.contains_key(&(topic_of(d), kilobyte(d, s)))))
    });
    assert_eq!(tally(&contents.messages).len() as u64, total);
    let s = agent.scrape();
    let received = s.sum("edgeship_mqtt_messages_received_total", &[]);
    assert_eq!(s.sum("edgeship_mqtt_connections_total", &[]), 1.0);
    assert!(
        received <= total as f64 * 1.01,
        "{received} messages read for {total} published"
    );
    eprintln!(
        "full-spool flood: {total} messages, {received} read, 1 connection, peak RSS {:.1} MiB",
        flooded as f64 / 1024.0
    );
    assert!(flooded < 64 * 1024, "peak RSS {flooded} KiB");
}

/// Devices publishing as fast as the broker takes them until `until`; returns the messages
/// the broker acked. Each device's event loop is polled without a timeout while its sender
/// runs (cancelling a poll can lose a request); it ends once the sender is done and every
/// publish is acked.
async fn saturate(port: u16, devices: u32, until: Instant, prefix: &'static str) -> u64 {
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for d in 0..devices {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(format!("{prefix}{d}"), "127.0.0.1", port);
            // No keep-alive: under saturation rumqttc's own PINGRESP waits behind the acks
            // (the fault this file tests in the agent), and a publisher must not fail on it.
            opts.set_keep_alive(Duration::ZERO).set_inflight(100);
            let (c, mut events) = rumqttc::AsyncClient::new(opts, 1000);
            let sent = Arc::new(AtomicU64::new(0));
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sender = {
                let (sent, done) = (sent.clone(), done.clone());
                tokio::spawn(async move {
                    let mut s = 0;
                    while Instant::now() < until {
                        c.publish(topic_of(d), rumqttc::QoS::AtLeastOnce, false, payload(d, s))
                            .await
                            .unwrap();
                        s += 1;
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    done.store(true, Ordering::SeqCst);
                    c
                })
            };
            let mut mine = 0u64;
            let deadline = until + Duration::from_secs(60);
            while !(done.load(Ordering::SeqCst) && mine >= sent.load(Ordering::SeqCst)) {
                assert!(
                    Instant::now() < deadline,
                    "publisher {d}: {mine} of {} acked a minute after the end",
                    sent.load(Ordering::SeqCst)
                );
                // Once the sender is done, a poll may wait for nothing: bound it (by then every
                // request is written, and a cancelled read loses nothing).
                let event = if done.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
                        Ok(e) => e,
                        Err(_) => continue,
                    }
                } else {
                    events.poll().await
                };
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        mine += 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("publisher {d}: {e}"),
                }
            }
            let c = sender.await.unwrap();
            let _ = c.disconnect().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    acked.load(Ordering::Relaxed)
}

/// Saturating publishers for three minutes (36 keep-alive intervals) on two brokers at once,
/// one spoken to in MQTT 3.1.1 and one in 5: the agent keeps one connection to each and reads
/// each message about once (it used to reconnect every minute under load and take every
/// message about four times).
#[test]
fn three_minutes_of_saturation_on_both_protocols_keep_one_connection_each() {
    let dir = tempdir();
    // Without persistence: a broker that saves its store every second (the harness's default)
    // stops for as long as writing its queue for the agent takes, seconds under saturation,
    // and the agent rightly takes that silence for a dead connection.
    let v311 = Mosquitto::start_with(&dir.path().join("a"), "persistence false\n");
    let v5 = Mosquitto::start_with(&dir.path().join("b"), "persistence false\n");
    let folder = dir.path().join("frames");
    let config = agent_config(dir.path(), v311.port, "http://127.0.0.1:9", "s", "", "")
        .replace(
            "type = \"kinesis\"\nstream = \"s\"\nregion = \"us-east-1\"\nendpoint = \"http://127.0.0.1:9\"",
            &format!("type = \"directory\"\npath = \"{}\"", folder.display()),
        )
        .replace(
            "[[route]]",
            &format!(
                "[[broker]]\nname = \"five\"\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive = \"5s\"\nprotocol = \"5\"\n[[route]]",
                v5.port
            ),
        );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(2);
    let until = Instant::now() + Duration::from_secs(180);
    let (p1, p2) = (v311.port, v5.port);
    let a = std::thread::spawn(move || runtime().block_on(saturate(p1, 10, until, "sat-a-")));
    let b = std::thread::spawn(move || runtime().block_on(saturate(p2, 10, until, "sat-b-")));
    let published = a.join().unwrap() + b.join().unwrap();
    let acc = wait_for("every message spooled", Duration::from_secs(120), || {
        agent.accounting().filter(|a| a.received >= published)
    });
    let s = agent.scrape();
    for broker in ["test", "five"] {
        assert_eq!(
            s.sum("edgeship_mqtt_connections_total", &[("broker", broker)]),
            1.0,
            "broker {broker} reconnected:\n{}",
            agent.log()
        );
    }
    let received = s.sum("edgeship_mqtt_messages_received_total", &[]);
    eprintln!(
        "saturation, 3 minutes: {published} messages published on 3.1.1 and 5, {received} read by the agent, 1 connection each, the most awaiting a commit at once {}",
        s.sum("edgeship_mqtt_unacked_messages_max", &[])
    );
    // The window held: never more than max_unacked (1,000 by default) awaited a commit.
    for broker in ["test", "five"] {
        let most = s.sum("edgeship_mqtt_unacked_messages_max", &[("broker", broker)]);
        assert!(
            most > 0.0 && most <= 1_000.0,
            "broker {broker}: {most} at once"
        );
    }
    assert!(
        received <= published as f64 * 1.01,
        "{received} read for {published} published"
    );
    assert!(acc.balances(), "{acc:?}");
}

/// Mosquitto without persistence restarted while publishers saturate it: the agent
/// reconnects to a fresh session, subscribes again, every message published after the
/// restart arrives, and no ack is written for a packet id of the earlier connection.
#[test]
fn a_broker_restarted_without_its_sessions_gets_no_ack_of_the_old_one() {
    let stream = "e2e-intake-fresh-broker";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let mut mosquitto = Mosquitto::start_with(dir.path(), "persistence false\n");
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        stream,
        "",
        "",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    // Load before the restart, so acks are in flight when the connection goes.
    let port = mosquitto.port;
    let until = Instant::now() + Duration::from_secs(4);
    let load = std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                saturate(port, 10, until, "before-"),
            )
            .await
            .ok()
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    mosquitto.restart();
    let _ = load.join();
    agent.wait_connected(2);
    wait_for("subscribed again", Duration::from_secs(30), || {
        agent.get("/readyz").filter(|(status, _)| *status == 200)
    });
    rt.block_on(publish_with(
        mosquitto.port,
        5,
        200,
        Default::default(),
        |d, s| payload(d, s + 1_000_000),
        "after-",
    ));
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(120), |t| {
        (0..5).all(|d| (0..200).all(|s| t.contains_key(&(topic_of(d), payload(d, s + 1_000_000)))))
    });
    let s = agent.scrape();
    assert_eq!(s.sum("edgeship_mqtt_misdirected_acks_total", &[]), 0.0);
    eprintln!(
        "fresh broker: {} records in the stream, {} acks of the old connection held back (stale), 0 written",
        contents.messages.len(),
        s.sum("edgeship_mqtt_stale_acks_total", &[])
    );
}

/// A 17 MiB QoS 1 message on MQTT 3.1.1 (over the default `max_packet_bytes` of 16 MiB),
/// then small ones: the big one is read past and counted dropped (`oversize_packet`), the
/// small ones arrive, and the connection stays up (it used to fail and the broker to send
/// the big one again on every reconnect, everything behind it waiting).
#[test]
fn a_packet_over_the_limit_is_counted_and_the_session_goes_on() {
    let stream = "e2e-intake-oversize-packet";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let mosquitto = Mosquitto::start(dir.path());
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        stream,
        "",
        "",
    );
    let agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new("big-sender", "127.0.0.1", mosquitto.port);
        opts.set_max_packet_size(32 << 20, 32 << 20);
        // Room for every request: the event loop is polled only after they are queued.
        let (c, mut events) = rumqttc::AsyncClient::new(opts, 32);
        c.publish(
            topic_of(0),
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![b'x'; 17 << 20],
        )
        .await
        .unwrap();
        for s in 0..10 {
            c.publish(topic_of(1), rumqttc::QoS::AtLeastOnce, false, payload(1, s))
                .await
                .unwrap();
        }
        let mut acks = 0;
        while acks < 11 {
            if let Rumqtt::PubAck = classify(events.poll().await.unwrap()) {
                acks += 1;
            }
        }
        let _ = c.disconnect().await;
    });
    let contents = wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(60), |t| {
        (0..10).all(|s| t.contains_key(&(topic_of(1), payload(1, s))))
    });
    assert!(contents.messages.iter().all(|m| m.payload.len() < 1 << 20));
    let acc = wait_for("the big one counted", Duration::from_secs(30), || {
        agent.accounting().filter(|a| {
            a.dropped_by_reason.get("oversize_packet").copied() == Some(1) && a.pending == 0
        })
    });
    assert!(acc.balances(), "{acc:?}");
    let s = agent.scrape();
    assert_eq!(s.sum("edgeship_mqtt_oversize_packets_total", &[]), 1.0);
    assert_eq!(
        s.sum("edgeship_mqtt_connections_total", &[]),
        1.0,
        "{}",
        agent.log()
    );
}

enum Rumqtt {
    PubAck,
    Other,
}

fn classify(e: rumqttc::Event) -> Rumqtt {
    match e {
        rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => Rumqtt::PubAck,
        _ => Rumqtt::Other,
    }
}

/// QoS 2 across a crash: the agent spools 100 exactly-once messages and answers each with
/// PUBREC, but none reaches the broker (a forwarder between them throws away what the agent
/// sends); the agent is killed. After the restart the broker sends all 100 again; their
/// packet ids, committed with them, mark them duplicates: answered, not spooled. The spool
/// received 100, not 200, and the stream holds each message.
#[test]
fn qos2_messages_whose_pubrec_was_lost_in_a_crash_are_not_spooled_twice() {
    let stream = "e2e-intake-qos2-crash";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let mosquitto = Mosquitto::start(dir.path());
    let link = Uplink::start(mosquitto.port);
    let config = agent_config(dir.path(), link.port, &kinesis.endpoint(), stream, "", "").replace(
        "partition_key = \"{topic[1]}\"",
        "partition_key = \"{topic[1]}\"\nqos = 2",
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);
    link.mute_upstream(true);
    let n = 100;
    let completed = rt.block_on(publish_paced_at(
        mosquitto.port,
        1,
        n,
        Duration::from_millis(100),
        rumqttc::QoS::ExactlyOnce,
    ));
    assert_eq!(completed, u64::from(n));
    wait_for(
        "the agent to spool all 100",
        Duration::from_secs(30),
        || agent.accounting().filter(|a| a.received == u64::from(n)),
    );
    agent.kill();
    link.mute_upstream(false);
    agent.spawn();
    wait_stream_complete_with(&rt, &client, stream, Duration::from_secs(60), |t| {
        (0..n).all(|s| t.contains_key(&(topic_of(0), payload(0, s))))
    });
    let duplicates = wait_for(
        "the broker's resends answered",
        Duration::from_secs(30),
        || {
            let d = agent
                .scrape()
                .sum("edgeship_mqtt_qos2_duplicates_total", &[]);
            (d >= f64::from(n)).then_some(d)
        },
    );
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    eprintln!(
        "QoS 2 after a crash: {n} messages spooled, {duplicates} sent again by the broker and answered without spooling, {} received in all",
        acc.received
    );
    assert_eq!(acc.received, u64::from(n), "spooled twice: {acc:?}");
    assert!(acc.balances() && acc.dropped == 0, "{acc:?}");
}

/// Mosquitto's dynamic security plugin, its default ACL refusing subscriptions: the agent
/// stays connected but not ready (`/readyz` says the subscriptions are not granted) and asks
/// again on the same connection; once an administrator allows them (`mosquitto_ctrl` while
/// the broker runs; the plugin then drops the clients of the role, and the agent connects
/// again), `/readyz` turns 200 and messages arrive. (A refused SUBSCRIBE used to be dropped for good while `/readyz` passed.)
#[test]
fn a_refused_subscription_is_asked_again_and_readiness_waits_for_it() {
    let stream = "e2e-intake-refused-subscription";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let plugin = ["/usr/lib", "/usr/lib64", "/usr/local/lib"]
        .iter()
        .flat_map(|d| {
            let direct = std::path::Path::new(d).join("mosquitto_dynamic_security.so");
            let nested = std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("mosquitto_dynamic_security.so"));
            std::iter::once(direct).chain(nested)
        })
        .find(|p| p.exists())
        .expect("mosquitto's dynamic security plugin (package mosquitto)");
    let security = dir.path().join("dynsec");
    std::fs::create_dir_all(&security).unwrap();
    let file = security.join("dynamic-security.json");
    let ctrl = |args: &[&str]| {
        let out = std::process::Command::new("mosquitto_ctrl")
            .args(args)
            .output()
            .expect("mosquitto_ctrl (package mosquitto)");
        let said = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            out.status.success() && !said.contains("error"),
            "mosquitto_ctrl {args:?}: {out:?}"
        );
    };
    // An administrator and defaults that refuse every subscription and publication.
    ctrl(&[
        "dynsec",
        "init",
        file.to_str().unwrap(),
        "admin",
        "admin-secret",
    ]);
    if is_root() {
        let _ = std::process::Command::new("chown")
            .args(["-R", "mosquitto:", security.to_str().unwrap()])
            .status();
    }
    let mosquitto = Mosquitto::start_with(
        dir.path(),
        &format!(
            "plugin {}\nplugin_opt_config_file {}\n",
            plugin.display(),
            file.display()
        ),
    );
    let port = mosquitto.port.to_string();
    let admin = |command: &[&str]| {
        let mut args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "admin",
            "-P",
            "admin-secret",
            "dynsec",
        ];
        args.extend_from_slice(command);
        ctrl(&args);
    };
    // Anonymous clients (the agent, the devices) get a role that allows nothing yet.
    admin(&["createRole", "devices"]);
    admin(&["createGroup", "anonymous"]);
    admin(&["addGroupRole", "anonymous", "devices"]);
    admin(&["setAnonymousGroup", "anonymous"]);
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &kinesis.endpoint(),
        stream,
        "",
        "",
    );
    let agent = Agent::start(dir.path(), &config);
    // Asked again on the same connection: a second refusal within 10 s of the first.
    wait_for("two refusals logged", Duration::from_secs(30), || {
        (agent
            .log()
            .matches("the broker refused topic filters")
            .count()
            >= 2)
            .then_some(())
    });
    let s = agent.scrape();
    assert_eq!(s.sum("edgeship_mqtt_connections_total", &[]), 1.0);
    assert!(s.sum("edgeship_mqtt_subscriptions_refused_total", &[]) >= 2.0);
    let (status, body) = agent.get("/readyz").expect("/readyz answers");
    assert_ne!(status, 200, "ready while refused: {body}");
    assert!(body.contains("not granted"), "{body}");
    for acl in [
        "subscribePattern",
        "publishClientSend",
        "publishClientReceive",
    ] {
        admin(&["addRoleACL", "devices", acl, "devices/#", "allow"]);
    }
    // The agent asks again within 10 s of the refusal.
    wait_for("readiness after the grant", Duration::from_secs(30), || {
        agent.get("/readyz").filter(|(status, _)| *status == 200)
    });
    rt.block_on(publish(mosquitto.port, 2, 50, Default::default()));
    wait_stream_complete(&rt, &client, stream, 2, 50, Duration::from_secs(60));
}

/// A broker that sends without reading (Mosquitto 2.0 under saturating publishers reads one
/// packet per connection per turn of its loop: a subscriber's acks pile up unread): the
/// agent's acks wait in its own bounded backlog while it goes on reading and committing; once
/// the broker reads, every ack arrives, each once, and every message is in the stream. The
/// broker's receive buffer is a few KiB, so an agent that waits for each ack write stops after
/// a few thousand messages.
#[test]
fn a_broker_that_reads_no_acks_for_a_while_does_not_stop_the_intake() {
    use std::io::{Read, Write};
    const MESSAGES: u16 = 60_000;
    let stream = "e2e-intake-unread-acks";
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig(stream, 1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    {
        use std::os::fd::AsRawFd;
        // A small receive buffer, and small segments (the agent's send buffer is sized by
        // its segments: on loopback's 64 KiB ones it would hold megabytes of acks).
        for (level, option, value) in [
            (libc::SOL_SOCKET, libc::SO_RCVBUF, 4096),
            (libc::IPPROTO_TCP, libc::TCP_MAXSEG, 536),
        ] {
            let value: libc::c_int = value;
            // SAFETY: a valid socket and an int option; accepted sockets inherit it.
            let rc = unsafe {
                libc::setsockopt(
                    listener.as_raw_fd(),
                    level,
                    option,
                    &value as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        }
    }
    let port = listener.local_addr().unwrap().port();
    let config = agent_config(
        dir.path(),
        port,
        &kinesis.endpoint(),
        stream,
        "",
        "protocol = \"3.1.1\"",
    )
    .replace("keep_alive = \"5s\"", "keep_alive = \"60s\"");
    let agent = Agent::start(dir.path(), &config);
    let (mut sock, _) = listener.accept().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let read_packet = |sock: &mut std::net::TcpStream| -> (u8, Vec<u8>) {
        let mut first = [0u8; 1];
        sock.read_exact(&mut first).unwrap();
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            sock.read_exact(&mut b).unwrap();
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).unwrap();
        (first[0], body)
    };
    let (connect, _) = read_packet(&mut sock);
    assert_eq!(connect, 0x10, "CONNECT first");
    sock.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
    let (subscribe, body) = read_packet(&mut sock);
    assert_eq!(subscribe, 0x82, "SUBSCRIBE next");
    sock.write_all(&[0x90, 0x03, body[0], body[1], 0x01])
        .unwrap();
    // Every message at once, reading nothing.
    let topic = topic_of(0);
    let mut out = Vec::new();
    for pkid in 1..=MESSAGES {
        let p = payload(0, u32::from(pkid - 1));
        let len = 2 + topic.len() + 2 + p.len();
        out.push(0x32);
        let mut l = len;
        loop {
            let b = (l & 0x7f) as u8;
            l >>= 7;
            out.push(if l > 0 { b | 0x80 } else { b });
            if l == 0 {
                break;
            }
        }
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&pkid.to_be_bytes());
        out.extend_from_slice(&p);
    }
    let mut writer = sock.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&out).unwrap());
    let acc = wait_for(
        "the agent to commit every message while the broker reads nothing",
        Duration::from_secs(60),
        || {
            agent
                .accounting()
                .filter(|a| a.received >= u64::from(MESSAGES))
        },
    );
    assert_eq!(acc.received, u64::from(MESSAGES));
    sender.join().unwrap();
    let waiting = agent
        .scrape()
        .sum("edgeship_mqtt_write_backlog_bytes_max", &[]);
    assert!(
        waiting > 0.0,
        "the acks should have waited for the broker: {}",
        agent.log()
    );
    // Now the broker reads: every ack, each once.
    let mut acked = vec![0u32; usize::from(MESSAGES) + 1];
    let mut count = 0;
    while count < u32::from(MESSAGES) {
        let (kind, body) = read_packet(&mut sock);
        if kind == 0x40 {
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            acked[usize::from(pkid)] += 1;
            count += 1;
        }
    }
    assert!(
        acked[1..].iter().all(|&n| n == 1),
        "each packet id acked once"
    );
    wait_stream_complete(
        &rt,
        &client,
        stream,
        1,
        u32::from(MESSAGES),
        Duration::from_secs(120),
    );
    let s = agent.scrape();
    assert_eq!(
        s.sum("edgeship_mqtt_connections_total", &[]),
        1.0,
        "{}",
        agent.log()
    );
}

/// One publisher, one message every `every` (never two at once: a late tick delays the rest),
/// round robin over `devices` devices' topics; returns how many the broker acked.
async fn publish_steadily(port: u16, devices: u32, per_device: u32, every: Duration) -> u64 {
    let acked = AtomicU64::new(0);
    let total = devices * per_device;
    let mut opts = rumqttc::MqttOptions::new("steady", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 1000);
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..total {
            tick.tick().await;
            let (d, s) = (i % devices, i / devices);
            client
                .publish(topic_of(d), rumqttc::QoS::AtLeastOnce, false, payload(d, s))
                .await
                .unwrap();
        }
        client
    });
    let deadline = Instant::now() + every * total + Duration::from_secs(300);
    await_acks(
        &mut events,
        0,
        total,
        deadline,
        &acked,
        rumqttc::QoS::AtLeastOnce,
    )
    .await;
    let _ = sender.await.unwrap().disconnect().await;
    acked.load(Ordering::Relaxed)
}

/// A slow, steady stream (1,000 msg/s of small telemetry, far below what fills the spool's
/// commit target within its interval) is read several messages at a time: while the spool
/// says the stream is slow the intake paces its reads, so one wakeup takes what the socket
/// gathered meanwhile instead of one message each (with the quick TCP acks a slow stream gets,
/// the broker sends each message as it comes). Every message arrives, byte for byte.
#[test]
fn a_slow_steady_stream_is_read_several_messages_at_a_time() {
    let stream = "intake-paced";
    let b = agent_behind_uplink(stream, "", "", |_, config| config);
    let (devices, per_device) = (20, 200);
    let published = b.rt.block_on(publish_steadily(
        b.mosquitto.port,
        devices,
        per_device,
        Duration::from_millis(1),
    ));
    assert_eq!(published, u64::from(devices * per_device));
    wait_stream_complete(
        &b.rt,
        &b.client,
        stream,
        devices,
        per_device,
        Duration::from_secs(120),
    );
    let scrape = b.agent.scrape();
    let messages = scrape.sum("edgeship_mqtt_messages_received_total", &[]);
    let reads = scrape.sum("edgeship_mqtt_socket_reads_total", &[]);
    assert!(messages >= published as f64, "{messages} messages received");
    assert!(
        reads > 0.0 && reads * 2.0 <= messages,
        "{reads} socket reads for {messages} messages: the reads of a slow stream are not paced"
    );
}
