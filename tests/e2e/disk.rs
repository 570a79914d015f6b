//! A full disk, for real: the spool on a small tmpfs (mounted with `size=`, as root) that a
//! filler file has nearly filled before the spool reaches its own cap. Under `drop_oldest` the
//! oldest blocks are dropped and counted and acking goes on; under `block` acking stops and
//! everything arrives once space returns. Without root the tests say so and pass (they need a
//! mount).

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// A tmpfs of `mib` MiB mounted under `dir`, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, mib: u32) -> SmallDisk {
        let path = dir.join("small-disk");
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", path.display());
        SmallDisk { path }
    }

    /// Fills all but `free_kib` KiB of the disk with a file of its own.
    fn fill_leaving(&self, free_kib: u64) -> PathBuf {
        let filler = self.path.join("filler");
        let stat = nix_free_bytes(&self.path);
        let size = stat.saturating_sub(free_kib * 1024);
        std::fs::write(&filler, vec![0u8; size as usize]).unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        // The test's temp folder, which holds the mount point, could not be removed while it
        // was mounted (the agent goes first, so a failed test shows its spool): remove it now.
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Free bytes on the file system holding `path`.
fn nix_free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

struct Setup {
    behind: Behind,
    disk: SmallDisk,
    filler: PathBuf,
}

/// An agent whose spool (cap 64 MiB) is on a 24 MiB tmpfs with about 1.5 MiB free (the
/// spool's 8 MiB disk reserve and another program's file hold the rest), its uplink cut.
fn full_disk(stream: &str, policy: &str) -> Option<Setup> {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs it as root)");
        return None;
    }
    let mut disk = None;
    let behind = agent_behind_uplink(
        stream,
        &format!("max_bytes = \"64MiB\"\nfull_policy = \"{policy}\""),
        "",
        |dir, config| {
            let small = SmallDisk::mount(dir, 24);
            let config = config.replace(
                &format!("path = \"{}\"", dir.join("spool.db").display()),
                &format!("path = \"{}\"", small.path.join("spool.db").display()),
            );
            disk = Some(small);
            config
        },
    );
    let disk = disk.expect("mounted");
    assert!(
        disk.path.join("spool.db.reserve").exists(),
        "the spool's disk reserve is made at start"
    );
    behind.uplink.cut();
    let filler = disk.fill_leaving(1536);
    Some(Setup {
        behind,
        disk,
        filler,
    })
}

fn noisy(d: u32, s: u32) -> Vec<u8> {
    noise(d, s, 1_000)
}

#[test]
fn a_full_disk_under_drop_oldest_drops_the_oldest_counts_them_and_keeps_acking() {
    let Some(s) = full_disk("e2e-disk-drop", "drop_oldest") else {
        return;
    };
    // 4 MB of incompressible messages for 1.5 MiB of free disk: all are acked.
    s.behind.rt.block_on(publish_with(
        s.behind.mosquitto.port,
        4,
        1_000,
        Arc::new(AtomicU64::new(0)),
        noisy,
        "n-",
    ));
    let acc = wait_for("every message received", Duration::from_secs(120), || {
        s.behind.agent.accounting().filter(|a| a.received == 4_000)
    });
    let dropped = acc
        .dropped_by_reason
        .get("spool_full")
        .copied()
        .unwrap_or(0);
    assert!(dropped > 0, "the disk filled, something had to go: {acc:?}");
    assert!(acc.balances(), "{acc:?}");
    assert!(s
        .behind
        .agent
        .log()
        .contains("drops its oldest blocks to stay below"));
    // The uplink returns: what was kept arrives.
    s.behind.uplink.restore();
    let acc = wait_for("the spool to drain", Duration::from_secs(120), || {
        s.behind.agent.accounting().filter(|a| a.pending == 0)
    });
    assert_eq!(acc.delivered + acc.dropped, 4_000, "{acc:?}");
    let contents = s
        .behind
        .rt
        .block_on(read_stream(&s.behind.client, "e2e-disk-drop"));
    assert_eq!(tally(&contents.messages).len() as u64, acc.delivered);
    let _ = (&s.disk, &s.filler);
}

#[test]
fn a_full_disk_under_block_stops_acking_and_deliveries_make_room_until_the_disk_has_room() {
    let Some(mut s) = full_disk("e2e-disk-block", "block") else {
        return;
    };
    let port = s.behind.mosquitto.port;
    let publisher = std::thread::spawn(move || {
        runtime().block_on(publish_with(
            port,
            4,
            1_000,
            Arc::new(AtomicU64::new(0)),
            noisy,
            "b-",
        ))
    });
    // Commits fail with the disk full; acks stop (the broker keeps the rest).
    wait_for(
        "a commit to fail for the full disk",
        Duration::from_secs(120),
        || {
            s.behind
                .agent
                .log()
                .contains("nothing more is acked until deliveries or the disk make room")
                .then_some(())
        },
    );
    let stuck = s.behind.agent.accounting().unwrap().received;
    assert!(stuck < 4_000, "{stuck}");
    let scrape = s.behind.agent.scrape();
    assert!(scrape.sum("edgeship_spool_disk_cap_bytes", &[]) > 0.0);
    assert!(
        scrape.sum("edgeship_spool_disk_free_bytes", &[]) < f64::from(24u32 << 20),
        "the small disk's free space: {}",
        scrape.sum("edgeship_spool_disk_free_bytes", &[])
    );
    // The uplink returns while the disk stays full: deliveries (committed in the space the
    // reserve gave back) make room, and every message arrives.
    s.behind.uplink.restore();
    publisher.join().unwrap();
    let contents = wait_stream_complete_with(
        &s.behind.rt,
        &s.behind.client,
        "e2e-disk-block",
        Duration::from_secs(180),
        |t| (0..4).all(|d| (0..1_000).all(|q| t.contains_key(&(topic_of(d), noisy(d, q))))),
    );
    assert!(tally(&contents.messages).len() >= 4_000);
    let acc = wait_for("the spool to drain", Duration::from_secs(60), || {
        s.behind.agent.accounting().filter(|a| a.pending == 0)
    });
    assert_eq!(acc.dropped, 0, "{acc:?}");
    assert!(acc.balances(), "{acc:?}");
    // The other program's file goes: the reserve is made again and the cap is max_bytes.
    std::fs::remove_file(&s.filler).unwrap();
    wait_for(
        "the disk to have room again",
        Duration::from_secs(30),
        || {
            (s.behind
                .agent
                .scrape()
                .sum("edgeship_spool_disk_cap_bytes", &[])
                == 0.0)
                .then_some(())
        },
    );
    assert!(s.disk.path.join("spool.db.reserve").exists());
    assert!(s.behind.agent.log().contains("the disk has room again"));
    assert_eq!(s.behind.agent.stop().code(), Some(0));
}
