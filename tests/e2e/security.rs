//! Transport security and credentials: MQTT over mutual TLS against Mosquitto requiring client
//! certificates, the refusals an operator must be able to read, private key permissions, and
//! AWS credentials from the AWS IoT credentials provider (a local endpoint requiring the
//! device certificate), refreshed before they expire.
//!
//! Certificates are made by the test (tests/e2e/pki.rs); nothing is checked in.

use crate::iot_credentials_server::IotCredentialsServer;
use crate::kinesis_proxy::KinesisProxy;
use crate::pki::{Ca, Use, Validity};
use crate::support::*;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// The `[broker.tls]` table (after a client id, so several agents can share the broker).
fn broker_tls(client_id: &str, ca: &Path, client: Option<&crate::pki::Issued>) -> String {
    let mut t = format!(
        "client_id = \"{client_id}\"\n[broker.tls]\nca_file = \"{}\"\nalpn = [\"mqtt\"]\n",
        ca.display()
    );
    if let Some(c) = client {
        t += &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        );
    }
    t
}

/// A folder of its own for each agent of a test (spool, config, log).
fn agent_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn mqtt_over_mutual_tls_delivers_and_bad_certificates_are_refused_clearly() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-mqtt-tls", 1);
    let pki = agent_dir(dir.path(), "pki");
    let ca = Ca::new(&pki, "edgeship-test-ca");
    let other_ca = Ca::new(&pki, "some-other-ca");
    let server = ca.issue(&pki, "broker", "127.0.0.1", Use::Server, Validity::Current);
    let good = ca.issue(&pki, "gw-good", "gw-good", Use::Client, Validity::Current);
    let expired = ca.issue(
        &pki,
        "gw-expired",
        "gw-expired",
        Use::Client,
        Validity::Expired,
    );
    let foreign = other_ca.issue(
        &pki,
        "gw-foreign",
        "gw-foreign",
        Use::Client,
        Validity::Current,
    );
    // Mosquitto reads its files as itself when run as root (it drops to user mosquitto).
    for f in [&server.cert, &server.key, &ca.file] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&pki, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The plain listener is for the test's publishers; the agents use the TLS one.
    let tls_port = free_port();
    let mosquitto = Mosquitto::start_with(
        dir.path(),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\n",
            ca.file.display(),
            server.cert.display(),
            server.key.display()
        ),
    );
    wait_port(
        tls_port,
        Duration::from_secs(10),
        "mosquitto's TLS listener",
    );
    let endpoint = kinesis.endpoint();
    let start = |name: &str, extra_broker: &str| {
        let d = agent_dir(dir.path(), name);
        Agent::start(
            &d,
            &agent_config(&d, tls_port, &endpoint, "e2e-mqtt-tls", "", extra_broker),
        )
    };

    let good_agent = start("good", &broker_tls("agent-good", &ca.file, Some(&good)));
    let wrong_ca = start(
        "wrong-ca",
        &broker_tls("agent-wrong-ca", &other_ca.file, Some(&good)),
    );
    let expired_agent = start(
        "expired",
        &broker_tls("agent-expired", &ca.file, Some(&expired)),
    );
    let foreign_agent = start(
        "foreign",
        &broker_tls("agent-foreign", &ca.file, Some(&foreign)),
    );
    let no_cert = start("no-cert", &broker_tls("agent-no-cert", &ca.file, None));

    good_agent.wait_connected(1);
    let (devices, per_device) = (4, 500);
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
    ));
    let contents = wait_stream_complete(
        &rt,
        &client,
        "e2e-mqtt-tls",
        devices,
        per_device,
        Duration::from_secs(60),
    );
    assert_eq!(contents.messages.len() as u32, devices * per_device);

    // Each refused agent says why, in words that point at the file to fix.
    let cases = [
        (
            &wrong_ca,
            format!(
                "TLS: the server's certificate is not signed by a CA in the CA file {}",
                other_ca.file.display()
            ),
        ),
        (
            &expired_agent,
            format!(
                "TLS: the server refused the client certificate {}: it has expired",
                expired.cert.display()
            ),
        ),
        (
            &foreign_agent,
            format!(
                "TLS: the server refused the client certificate {}: not signed by a CA it trusts",
                foreign.cert.display()
            ),
        ),
        (
            &no_cert,
            "TLS: the server requires a client certificate; set client_cert and client_key"
                .to_string(),
        ),
    ];
    for (agent, expected) in &cases {
        wait_for(
            &format!("the agent to log: {expected}"),
            Duration::from_secs(30),
            || agent.log().contains(expected.as_str()).then_some(()),
        );
        let m = agent.scrape();
        assert_eq!(m.sum("edgeship_mqtt_connected", &[]), 0.0);
        assert!(m.sum("edgeship_mqtt_connection_errors_total", &[]) >= 1.0);
        assert_eq!(m.sum("edgeship_mqtt_messages_received_total", &[]), 0.0);
        assert!(!agent.log().contains(" connected"), "{}", agent.log());
    }
    let m = good_agent.scrape();
    assert_eq!(m.sum("edgeship_mqtt_connected", &[]), 1.0);
    assert_eq!(
        m.sum("edgeship_mqtt_messages_received_total", &[]),
        f64::from(devices * per_device)
    );
}

#[test]
fn a_private_key_others_can_read_is_refused_with_the_fix() {
    let dir = tempdir();
    let pki = agent_dir(dir.path(), "pki");
    let ca = Ca::new(&pki, "edgeship-test-ca");
    let cert = ca.issue(&pki, "gw", "gw-test", Use::Client, Validity::Current);
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = agent_config(
        dir.path(),
        free_port(),
        "http://127.0.0.1:9",
        "unused",
        "",
        &broker_tls("agent", &ca.file, Some(&cert)),
    );
    let path = dir.path().join("edgeship.toml");
    std::fs::write(&path, &config).unwrap();
    let expected = format!(
        "is readable by every user (mode 0644); refusing to use it. Fix: chmod 600 {}",
        cert.key.display()
    );

    let validate = Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .args(["config", "validate"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&validate.stderr);
    assert_eq!(validate.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("broker `test` TLS"), "{stderr}");

    let run = Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    // Refused before anything was opened: no spool file was created.
    assert!(!dir.path().join("spool.db").exists());

    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let validate = Command::new(env!("CARGO_BIN_EXE_edgeship"))
        .args(["config", "validate"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(validate.status.success(), "{validate:?}");
}

#[test]
fn aws_credentials_come_from_the_iot_provider_and_are_refreshed_before_expiry() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-iot-credentials", 1);
    let pki = agent_dir(dir.path(), "pki");
    let ca = Ca::new(&pki, "edgeship-test-ca");
    let server_cert = ca.issue(
        &pki,
        "credentials",
        "127.0.0.1",
        Use::Server,
        Validity::Current,
    );
    let device = ca.issue(&pki, "gw-iot", "gw-iot", Use::Client, Validity::Current);
    // Credentials live 40 s: the agent should fetch new ones after about 20, with 20 s left
    // for a fetch slowed by a loaded machine (the agent's own limit for one is 15 s).
    let lifetime = Duration::from_secs(40);
    let credentials =
        IotCredentialsServer::start(&ca.file, &server_cert.cert, &server_cert.key, lifetime);
    // The first two fetches fail: the agent must retry on its own.
    credentials.fail_next(2);
    let shards = rt.block_on(shard_ranges(&client, "e2e-iot-credentials"));
    let proxy = KinesisProxy::start(kinesis.port, &shards, None);

    let mosquitto = Mosquitto::start(dir.path());
    let config = format!(
        "{}\n[aws.iot_credentials]\nendpoint = \"{}\"\nrole_alias = \"edgeship-test-role\"\n\
         thing_name = \"gw-iot\"\ncert = \"{}\"\nkey = \"{}\"\nca_file = \"{}\"\n",
        agent_config(
            dir.path(),
            mosquitto.port,
            &proxy.endpoint(),
            "e2e-iot-credentials",
            "",
            ""
        ),
        credentials.endpoint(),
        device.cert.display(),
        device.key.display(),
        ca.file.display()
    );
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_connected(1);

    // Three waves, each published after the credentials of the one before were replaced.
    let per_wave = 300;
    for wave in 0..3u32 {
        wait_for(
            &format!("credentials set {} to be issued", wave + 1),
            Duration::from_secs(60),
            || (credentials.issued().len() > wave as usize).then_some(()),
        );
        rt.block_on(publish_with(
            mosquitto.port,
            2,
            per_wave,
            Arc::new(AtomicU64::new(0)),
            move |d, s| payload(d, wave * per_wave + s),
            &format!("wave{wave}-"),
        ));
        wait_stream_complete(
            &rt,
            &client,
            "e2e-iot-credentials",
            2,
            (wave + 1) * per_wave,
            Duration::from_secs(60),
        );
    }
    // The agent's own figures agree with the endpoint's.
    let before = credentials.issued().len();
    let m = agent.scrape();
    let after = credentials.issued().len();
    let fetched = m.count("edgeship_aws_credentials_fetches_total", &[]) as usize;
    assert!(
        before <= fetched && fetched <= after,
        "{before} <= {fetched} <= {after}"
    );
    assert_eq!(
        m.count("edgeship_aws_credentials_fetch_errors_total", &[]),
        2
    );
    let expiry = m.count("edgeship_aws_credentials_expiry_timestamp_seconds", &[]);
    assert!(credentials.issued().iter().any(|i| i
        .expires
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        == expiry));
    assert_eq!(agent.stop().code(), Some(0));

    // The endpoint saw the device's certificate, the role alias and the thing name, and the
    // two injected failures were retried.
    let requests = credentials.requests();
    assert!(requests.len() >= 5, "{requests:?}");
    assert!(requests[0].failed && requests[1].failed && !requests[2].failed);
    // Retried with backoff (1 s, then 2 s, each jittered down to half), not in a storm.
    for pair in requests[..3].windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at).unwrap();
        assert!(gap >= Duration::from_millis(450), "retried after {gap:?}");
    }
    for r in &requests {
        assert_eq!(r.path, "/role-aliases/edgeship-test-role/credentials");
        assert_eq!(r.thing_name.as_deref(), Some("gw-iot"));
        assert_eq!(r.client_cert, device.der);
    }
    // Each set was replaced before it expired.
    let issued = credentials.issued();
    for pair in issued.windows(2) {
        assert!(
            pair[1].at < pair[0].expires,
            "credentials {} were replaced only after they expired",
            pair[0].access_key_id
        );
    }
    // Every Kinesis request was signed with issued credentials that were valid then, token
    // included; and the waves used at least three different sets.
    let signed = proxy.signed();
    let mut used = BTreeSet::new();
    assert!(!signed.is_empty());
    for s in &signed {
        let set = issued
            .iter()
            .find(|i| i.access_key_id == s.access_key_id)
            .unwrap_or_else(|| {
                panic!(
                    "{} signed with {:?}, not with IoT credentials",
                    s.target, s.access_key_id
                )
            });
        assert_eq!(s.session_token.as_deref(), Some(set.session_token.as_str()));
        assert!(
            s.at < set.expires,
            "{} signed with credentials {} after they expired",
            s.target,
            set.access_key_id
        );
        used.insert(s.access_key_id.clone());
    }
    assert!(used.len() >= 3, "credential sets used: {used:?}");
    let puts = signed
        .iter()
        .filter(|s| s.target.ends_with("PutRecords"))
        .count();
    assert!(puts >= 3);
    // No secret in the log.
    let log = agent.log();
    assert!(!log.contains("iot-secret-") && !log.contains("iot-session-token-"));
}

/// Answers the container credentials endpoint and the EC2 instance metadata service (IMDSv2:
/// token, role name, role credentials) on one loopback port, each with its own access key id.
fn metadata_server() -> (tokio::runtime::Runtime, u16) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let (runtime, listener, port) = background_listener();
    runtime.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let path = req.uri().path().to_string();
                    let creds = |akid: &str| {
                        serde_json::json!({
                            "Code": "Success",
                            "Type": "AWS-HMAC",
                            "AccessKeyId": akid,
                            "SecretAccessKey": "chain-secret",
                            "Token": format!("{akid}-token"),
                            "Expiration": "2036-01-01T00:00:00Z",
                            "LastUpdated": "2026-01-01T00:00:00Z",
                        })
                        .to_string()
                    };
                    let (status, body) = match path.as_str() {
                        "/container-credentials" => (200, creds("ASIACONTAINERTEST")),
                        "/latest/api/token" if req.method() == hyper::Method::PUT => {
                            (200, "imds-session-token".to_string())
                        }
                        p if p.starts_with("/latest/meta-data/iam/security-credentials") => {
                            if req
                                .headers()
                                .get("x-aws-ec2-metadata-token")
                                .is_none_or(|t| t != "imds-session-token")
                            {
                                (401, String::new())
                            } else if p.ends_with('/') {
                                (200, "edgeship-role".to_string())
                            } else if p.ends_with("/edgeship-role") {
                                (200, creds("ASIAIMDSTEST"))
                            } else {
                                (404, String::new())
                            }
                        }
                        _ => (404, String::new()),
                    };
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(status)
                            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (runtime, port)
}

/// Environment changes for an agent: set (`Some`) or removed (`None`).
type Env<'a> = Vec<(&'a str, Option<&'a str>)>;

/// Without `[aws.iot_credentials]` the SDK's standard chain still provides credentials: a
/// profile file, the container credentials endpoint and the instance metadata service each
/// sign the Kinesis calls of their own agent (the environment is how every other test runs).
#[test]
fn the_standard_credential_chain_still_works() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-credential-chain", 1);
    let shards = rt.block_on(shard_ranges(&client, "e2e-credential-chain"));
    let proxy = KinesisProxy::start(kinesis.port, &shards, None);
    let (_metadata_rt, metadata_port) = metadata_server();
    let mosquitto = Mosquitto::start(dir.path());
    let profile = dir.path().join("aws-credentials");
    std::fs::write(
        &profile,
        "[default]\naws_access_key_id = AKIAPROFILETEST\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    let missing = dir.path().join("no-such-file");
    let (profile, missing) = (
        profile.to_str().unwrap().to_string(),
        missing.to_str().unwrap().to_string(),
    );
    let container_uri = format!("http://127.0.0.1:{metadata_port}/container-credentials");
    let imds = format!("http://127.0.0.1:{metadata_port}");
    let no_env: [(&str, Option<&str>); 4] = [
        ("AWS_ACCESS_KEY_ID", None),
        ("AWS_SECRET_ACCESS_KEY", None),
        ("AWS_SESSION_TOKEN", None),
        ("AWS_CONFIG_FILE", Some(missing.as_str())),
    ];
    let cases: [(&str, &str, Env); 3] = [
        (
            "profile",
            "AKIAPROFILETEST",
            vec![
                ("AWS_SHARED_CREDENTIALS_FILE", Some(profile.as_str())),
                ("AWS_EC2_METADATA_DISABLED", Some("true")),
            ],
        ),
        (
            "container",
            "ASIACONTAINERTEST",
            vec![
                ("AWS_SHARED_CREDENTIALS_FILE", Some(missing.as_str())),
                (
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    Some(container_uri.as_str()),
                ),
                ("AWS_EC2_METADATA_DISABLED", Some("true")),
            ],
        ),
        (
            "imds",
            "ASIAIMDSTEST",
            vec![
                ("AWS_SHARED_CREDENTIALS_FILE", Some(missing.as_str())),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", Some(imds.as_str())),
            ],
        ),
    ];
    let mut agents = Vec::new();
    for (name, akid, env) in &cases {
        let d = agent_dir(dir.path(), name);
        let config = agent_config(
            &d,
            mosquitto.port,
            &proxy.endpoint(),
            "e2e-credential-chain",
            "",
            &format!("client_id = \"agent-{name}\""),
        )
        .replace(
            "topics = [\"devices/+/telemetry\"]",
            &format!("topics = [\"{name}/+/telemetry\"]"),
        );
        let mut all_env = no_env.to_vec();
        all_env.extend(env.iter().cloned());
        let agent = Agent::start_with_env(&d, &config, &all_env);
        agent.wait_connected(1);
        agents.push((name, akid, agent));
    }
    rt.block_on(async {
        for (i, (name, _, _)) in cases.iter().enumerate() {
            publish_on(mosquitto.port, format!("{name}/dev-{i}/telemetry"), 0, 20).await;
        }
    });
    wait_for(
        "each agent's records in the stream",
        Duration::from_secs(60),
        || {
            let contents = rt.block_on(read_stream(&client, "e2e-credential-chain"));
            (contents.messages.len() == 60).then_some(())
        },
    );
    let signed = proxy.signed();
    for (name, akid, agent) in &agents {
        let puts = signed
            .iter()
            .filter(|s| s.target.ends_with("PutRecords") && s.access_key_id == **akid)
            .count();
        assert!(
            puts >= 1,
            "no PutRecords signed by the {name} credentials ({akid})"
        );
        assert!(!agent.log().contains("chain-secret") && !agent.log().contains("profile-secret"));
    }
    // Each source's session token travels with its key.
    for s in &signed {
        match s.access_key_id.as_str() {
            "ASIACONTAINERTEST" | "ASIAIMDSTEST" => {
                assert_eq!(s.session_token, Some(format!("{}-token", s.access_key_id)))
            }
            "AKIAPROFILETEST" => assert_eq!(s.session_token, None),
            other => panic!("{} signed with unexpected key {other:?}", s.target),
        }
    }
}

/// The ALPN protocol each connection negotiated (`None`: none).
type NegotiatedAlpn = Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>;

/// A TLS front for Mosquitto that, like AWS IoT Core on port 443, takes MQTT only from clients
/// that negotiate the ALPN protocol `x-amzn-mqtt-ca`; it records what each connection
/// negotiated.
fn alpn_front(
    cert: &Path,
    key: &Path,
    upstream: u16,
) -> (tokio::runtime::Runtime, u16, NegotiatedAlpn) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
    .unwrap();
    config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (runtime, listener, port) = background_listener();
    let log = seen.clone();
    runtime.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let ok = alpn.as_deref() == Some(b"x-amzn-mqtt-ca".as_slice());
                log.lock().unwrap().push(alpn);
                if !ok {
                    return;
                }
                let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (runtime, port, seen)
}

/// Where the broker requires ALPN (AWS IoT Core's MQTT on port 443), the agent offers the
/// configured protocol and is let through; one offering another protocol is refused with an
/// error that names what it offered.
#[test]
fn mqtt_alpn_is_offered_where_the_broker_requires_it() {
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-mqtt-alpn", 1);
    let pki = agent_dir(dir.path(), "pki");
    let ca = Ca::new(&pki, "edgeship-test-ca");
    let server = ca.issue(&pki, "front", "127.0.0.1", Use::Server, Validity::Current);
    let mosquitto = Mosquitto::start(dir.path());
    let (_front_rt, front_port, seen) = alpn_front(&server.cert, &server.key, mosquitto.port);
    let tls = |id: &str, alpn: &str| {
        format!(
            "client_id = \"{id}\"\n[broker.tls]\nca_file = \"{}\"\nalpn = [\"{alpn}\"]\n",
            ca.file.display()
        )
    };
    let start = |name: &str, extra: &str| {
        let d = agent_dir(dir.path(), name);
        Agent::start(
            &d,
            &agent_config(
                &d,
                front_port,
                &kinesis.endpoint(),
                "e2e-mqtt-alpn",
                "",
                extra,
            ),
        )
    };
    let good = start("good", &tls("agent-alpn", "x-amzn-mqtt-ca"));
    let wrong = start("wrong", &tls("agent-wrong-alpn", "mqtt"));
    good.wait_connected(1);
    rt.block_on(publish(mosquitto.port, 2, 100, Arc::new(AtomicU64::new(0))));
    wait_stream_complete(
        &rt,
        &client,
        "e2e-mqtt-alpn",
        2,
        100,
        Duration::from_secs(60),
    );
    let expected = "TLS: the server accepts none of the ALPN protocols offered ([\"mqtt\"])";
    wait_for(
        &format!("the agent to log: {expected}"),
        Duration::from_secs(30),
        || wrong.log().contains(expected).then_some(()),
    );
    assert_eq!(wrong.scrape().sum("edgeship_mqtt_connected", &[]), 0.0);
    assert!(seen
        .lock()
        .unwrap()
        .contains(&Some(b"x-amzn-mqtt-ca".to_vec())));
}
