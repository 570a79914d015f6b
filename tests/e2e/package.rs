//! The installed package keeps and ships what was spooled across an upgrade. Runs only when
//! asked (`--ignored`, as root, with two packages): it installs on the machine. scripts/test.sh
//! runs it in CI with the amd64 packages it builds.

use crate::support::*;
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

fn dpkg(args: &[&str]) {
    let out = Command::new("dpkg").args(args).output().expect("dpkg");
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Purges the package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", "edgeship"]).output();
    }
}

/// Version N installed and run as its service user (as systemd would: `setpriv` to
/// `edgeship`) with the uplink down spools 2,000 messages in /var/lib/edgeship; N+1 is
/// installed over it (the local config kept); run again, it ships every one of them.
#[test]
#[ignore = "installs a package: run as root with EDGESHIP_DEB_N and EDGESHIP_DEB_N1 set"]
fn an_upgrade_keeps_and_ships_the_spooled_records() {
    let deb_n = std::env::var("EDGESHIP_DEB_N").expect("EDGESHIP_DEB_N: the package of version N");
    let deb_n1 =
        std::env::var("EDGESHIP_DEB_N1").expect("EDGESHIP_DEB_N1: the package of version N+1");
    let Rig {
        dir,
        rt,
        client,
        kinesis,
    } = rig("e2e-package", 1);
    let mosquitto = Mosquitto::start(dir.path());
    let uplink = Uplink::start(kinesis.port);
    let _purge = Purge;
    dpkg(&["-i", &deb_n]);

    // The installed config, edited in place as an operator would (it stays root:edgeship 0640).
    let config_path = std::path::Path::new("/etc/edgeship/edgeship.toml");
    let config = agent_config(
        dir.path(),
        mosquitto.port,
        &uplink.endpoint(),
        "e2e-package",
        "",
        "",
    )
    .replace(
        &format!("path = \"{}\"", dir.path().join("spool.db").display()),
        "path = \"/var/lib/edgeship/spool.db\"",
    );
    let as_service = || {
        [
            "setpriv",
            "--reuid=edgeship",
            "--regid=edgeship",
            "--init-groups",
            "--",
        ]
        .into_iter()
        .chain(["/usr/bin/edgeship"])
        .map(Into::into)
        .collect::<Vec<std::ffi::OsString>>()
    };
    uplink.cut();
    let mut agent = Agent::start_at(
        config_path,
        &config,
        &dir.path().join("n.log"),
        as_service(),
    );
    agent.wait_connected(1);
    let (devices, per_device) = (4, 500);
    let total = u64::from(devices * per_device);
    rt.block_on(publish(
        mosquitto.port,
        devices,
        per_device,
        Arc::new(AtomicU64::new(0)),
    ));
    let acc = wait_for(
        "the messages spooled by version N",
        Duration::from_secs(60),
        || agent.accounting().filter(|a| a.received >= total),
    );
    assert_eq!((acc.pending, acc.delivered), (total, 0), "{acc:?}");
    assert_eq!(agent.stop().code(), Some(0));
    let edited = std::fs::read_to_string(config_path).unwrap();

    dpkg(&["--force-confold", "-i", &deb_n1]);
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "edgeship"])
        .output()
        .unwrap();
    let n1_version = Command::new("dpkg-deb")
        .args(["-f", &deb_n1, "Version"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&installed.stdout).trim(),
        String::from_utf8_lossy(&n1_version.stdout).trim()
    );
    assert_eq!(
        std::fs::read_to_string(config_path).unwrap(),
        edited,
        "the upgrade replaced the edited config"
    );
    let kept = agent.accounting().expect("the spool survived the upgrade");
    assert_eq!(kept.pending, total, "{kept:?}");

    uplink.restore();
    let mut agent = Agent::start_at(
        config_path,
        &config,
        &dir.path().join("n1.log"),
        as_service(),
    );
    wait_stream_complete(
        &rt,
        &client,
        "e2e-package",
        devices,
        per_device,
        Duration::from_secs(120),
    );
    let acc = wait_for("deliveries recorded", Duration::from_secs(30), || {
        agent.accounting().filter(|a| a.pending == 0)
    });
    assert_eq!((acc.received, acc.delivered), (total, total), "{acc:?}");
    assert_eq!(agent.stop().code(), Some(0));
    dpkg(&["-P", "edgeship"]);
    assert!(!std::path::Path::new("/var/lib/edgeship").exists());
}
