//! Running the relay for a city (issue 13): online backup and restore under load, readiness when
//! the database is locked or the disk is full, metrics that count what was pushed, a flooding
//! device slowed, a facility's storage quota, JSON logs without secrets; real `musubi-node` and
//! `musubi` processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use musubi_tests::relay::Relay;
use musubi_tests::{COMMAND_TIMEOUT, Output, WEAK_KDF_FOR_TESTS, bin, run_command};

use super::*;

/// The passphrase that seals the relay key inside the backups.
const BACKUP_PASSPHRASE: &str = "夜間バックアップの合言葉 2026-12";

/// `musubi-node SUB --data DATA ARGS...` with the backup passphrase in a file and the test
/// harness's cheap scrypt work factor.
fn node_in(data: &Path, sub: &str, args: &[&str], pass_file: &Path) -> Output {
    let mut cmd = Command::new(bin("musubi-node"));
    cmd.arg(sub)
        .arg("--data")
        .arg(data)
        .args(args)
        .arg("--key-passphrase-file")
        .arg(pass_file)
        .env(WEAK_KDF_FOR_TESTS.0, WEAK_KDF_FOR_TESTS.1);
    run_command(cmd, COMMAND_TIMEOUT)
}

fn pass_file(world: &World) -> PathBuf {
    let p = world.path().join("backup-passphrase");
    fs::write(&p, BACKUP_PASSPHRASE).expect("write the passphrase file");
    p
}

fn relay_status(data: &Path) -> Value {
    let mut cmd = Command::new(bin("musubi-node"));
    cmd.args(["status", "--json", "--data"]).arg(data);
    serde_json::from_str(&run_command(cmd, COMMAND_TIMEOUT).expect_ok()).expect("status json")
}

/// Acceptance 1: under a steady push load, `backup` runs 10 times; each backup restores into a new
/// directory, serves, and both facilities converge with everything, including what they pushed
/// after the backup; the restored relay's generation differs and every device noticed.
#[test]
fn backups_taken_under_load_restore_and_every_facility_converges() {
    let _serial = serial();
    let story = Story::new("backups_taken_under_load_restore_and_every_facility_converges");
    let world = World::new("backup-restore");
    let pass = pass_file(&world);
    let (mut relay, a, b) = relay_a_b(&world);
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();

    story.step("the clinic edits and syncs without pause while the operator takes 10 backups");
    let backups: Vec<PathBuf> = (0..10)
        .map(|i| world.path().join(format!("nightly-{i}.musubi-backup")))
        .collect();
    let stop = AtomicBool::new(false);
    let edits = AtomicUsize::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                a.edit(&id, "remarks", &format!("経過記録 第{n}報"));
                a.sync_once();
                edits.store(n, Ordering::Relaxed);
            }
        });
        for (i, file) in backups.iter().enumerate() {
            let before = edits.load(Ordering::Relaxed);
            poll_every(
                "the clinic to push another edit",
                Duration::from_secs(60),
                Duration::from_millis(50),
                &mut || (edits.load(Ordering::Relaxed) > before).then_some(()),
            );
            let out = node_in(
                &relay.data,
                "backup",
                &["--json", "--out", file.to_str().expect("utf-8")],
                &pass,
            )
            .expect_ok();
            let report: Value = serde_json::from_str(&out).expect("backup json");
            assert!(report["bytes"].as_u64().unwrap_or(0) > 0, "{report}");
            story.step(&format!(
                "backup {} taken: {} bytes in {} ms",
                i + 1,
                report["bytes"],
                report["took_ms"]
            ));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let total = edits.load(Ordering::Relaxed);
    assert!(
        total >= 10,
        "the clinic pushed {total} edits during the backups"
    );
    let last_backup = relay_status(&relay.data)["last_backup"].clone();
    assert!(last_backup.is_string(), "status shows the last backup");
    relay.kill();
    let old_generation = relay_status(&relay.data)["generation"].clone();

    for (i, file) in backups.iter().enumerate() {
        story.step(&format!(
            "restore backup {} into a new directory and serve it",
            i + 1
        ));
        let dir = world.path().join(format!("restored-{i}"));
        let out = node_in(
            &dir,
            "restore",
            &["--json", file.to_str().expect("utf-8")],
            &pass,
        )
        .expect_ok();
        let restored: Value = serde_json::from_str(&out).expect("restore json");
        assert_ne!(restored["generation"], old_generation);
        assert_ne!(restored["generation"], restored["manifest"]["generation"]);
        relay.set_data(dir.clone());
        relay.start();
        let text = format!("復元{i}の後の追記");
        b.reply(&id, &text);
        for f in [&a, &b, &a, &b] {
            f.sync_once();
        }
        for f in [&a, &b] {
            let shown = f.show_text(&id);
            assert!(
                shown.contains(&format!("経過記録 第{total}報")) && shown.contains(&text),
                "{} after restoring backup {}: {shown}",
                f.name,
                i + 1
            );
            assert_eq!(
                f.status()["relay_behind"]["restored"],
                true,
                "{} noticed the restore",
                f.name
            );
        }
        // Everything both hold is at the restored relay again: a new device gets it from there.
        let db = relay.db();
        let stored = count_bundles(&db);
        assert!(
            stored as usize >= total,
            "the restored relay holds {stored} bundles after the facilities re-offered"
        );
        relay.kill();
    }

    story.step("a restore refuses a directory that is not empty, and a wrong passphrase");
    let again = node_in(
        &world.path().join("restored-0"),
        "restore",
        &[backups[0].to_str().expect("utf-8")],
        &pass,
    )
    .expect_fail();
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
    let wrong = world.path().join("wrong-passphrase");
    fs::write(&wrong, "まちがった合言葉です").expect("write");
    let refused = node_in(
        &world.path().join("restored-wrong"),
        "restore",
        &[backups[0].to_str().expect("utf-8")],
        &wrong,
    )
    .expect_fail();
    assert!(refused.stderr.contains("passphrase"), "{}", refused.stderr);
    assert!(
        fs::read_dir(world.path().join("restored-wrong"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "a failed restore leaves nothing behind"
    );

    story.step("a damaged backup is refused before anything is served");
    let mut bytes = fs::read(&backups[9]).expect("read");
    let at = bytes.len() - 4096;
    bytes[at] ^= 0x55;
    let damaged = world.path().join("damaged.musubi-backup");
    fs::write(&damaged, &bytes).expect("write");
    let out = node_in(
        &world.path().join("restored-damaged"),
        "restore",
        &[damaged.to_str().expect("utf-8")],
        &pass,
    )
    .expect_fail();
    assert!(out.stderr.contains("checksum"), "{}", out.stderr);

    story.step("no secret is in a backup in the clear");
    let key = fs::read(world.path().join("restored-0/relay.key")).expect("key");
    let backup = fs::read(&backups[0]).expect("backup");
    assert!(
        !backup.windows(key.len()).any(|w| w == key.as_slice()),
        "the relay key is sealed inside the backup"
    );
}

/// Parses the OpenMetrics text with the Prometheus project's Python parser
/// (`prometheus_client.openmetrics.parser`, Debian's python3-prometheus-client): one
/// `(name, labels, value)` per sample.
fn parse_metrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    // Debian's interpreter, where python3-prometheus-client installs (a pyenv `python3` may come
    // first on PATH).
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (install python3-prometheus-client: scripts/test.sh does)");
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser json")
}

fn sample(
    samples: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Acceptance 3: `/metrics` parses with a Prometheus text parser and its counters match the pushes
/// the test made; `/status` reports the same store; `/livez`; no id is a label; a token guards a
/// listener bound beyond loopback.
#[test]
fn metrics_parse_and_count_the_pushes_and_status_tells_the_store() {
    let _serial = serial();
    let story = Story::new("metrics_parse_and_count_the_pushes_and_status_tells_the_store");
    let world = World::new("metrics");
    let mut relay = Relay::init(&world);
    relay.set_serve_args(&["--admin", "127.0.0.1:0", "--log-format", "json"]);
    relay.start();
    let a = world.enrolled_facility(&relay, "clinic-a", CLINIC_A, "clinic");
    let mut b = world.enrolled_facility(&relay, "hospital-b1", HOSPITAL_B, "clinic");
    a.sync_once();
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    // The hospital stays connected while the clinic edits: the relay notifies it of each push.
    b.start_watch();
    for n in 0..5 {
        a.edit(&id, "remarks", &format!("第{n}報"));
        a.sync_once();
    }
    poll_every(
        "the hospital's watch to receive the fifth edit",
        Duration::from_secs(30),
        Duration::from_millis(200),
        &mut || b.show_text(&id).contains("第4報").then_some(()),
    );
    b.stop_watch();
    b.reply(&id, "承知しました");
    b.sync_once();
    a.sync_once();

    story.step("the counters match what the relay stored");
    assert_eq!(relay.admin_get("/livez", None).0, 200);
    let (code, text) = relay.admin_get("/metrics", None);
    assert_eq!(code, 200);
    let samples = parse_metrics(&text);
    let db = relay.db();
    let (bundles, bytes): (i64, i64) = db
        .query_row("SELECT COUNT(*), SUM(bytes) FROM bundles", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("count");
    assert!(bundles >= 7, "{bundles} bundles");
    assert_eq!(
        sample(
            &samples,
            "musubi_relay_pushed_items_total",
            &[("item", "bundle")]
        ),
        bundles as f64
    );
    assert_eq!(
        sample(&samples, "musubi_relay_pushed_bytes_total", &[]),
        bytes as f64
    );
    let ops: i64 = db
        .query_row("SELECT COUNT(*) FROM ops", [], |r| r.get(0))
        .expect("ops");
    assert_eq!(
        sample(
            &samples,
            "musubi_relay_pushed_items_total",
            &[("item", "op")]
        ),
        ops as f64
    );
    assert!(
        sample(
            &samples,
            "musubi_relay_requests_total",
            &[("kind", "push"), ("outcome", "ok")]
        ) >= 7.0
    );
    assert!(sample(&samples, "musubi_relay_commit_duration_seconds_count", &[]) >= 7.0);
    assert!(sample(&samples, "musubi_relay_notifications_total", &[]) >= 1.0);
    assert_eq!(
        sample(&samples, "musubi_relay_build_info", &[("schema", "4")]),
        1.0
    );
    for id in [
        a.device_id().to_string(),
        b.device_id().to_string(),
        id.clone(),
    ] {
        assert!(!text.contains(&id), "{id} is not in /metrics");
    }

    story.step("/status tells the deployment, the store and the relay");
    let (code, body) = relay.admin_get("/status", None);
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).expect("status json");
    let cli = relay_status(&relay.data);
    assert_eq!(status["generation"], cli["generation"]);
    assert_eq!(status["relay"], relay.peer_id().to_string());
    assert_eq!(status["store"]["facilities"], 2);
    assert_eq!(status["protocol_version"], WIRE_VERSION);
    assert!(status["uptime_secs"].is_u64());
    assert!(status["last_commit"].is_string(), "{status:#}");
    assert_eq!(relay.admin_get("/readyz", None), (200, "ready\n".into()));
    let usage: Value =
        serde_json::from_str(&relay.node("usage", &["--json"]).expect_ok()).expect("usage json");
    let used: u64 = usage
        .as_array()
        .expect("array")
        .iter()
        .map(|u| u["bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(used, bytes as u64, "usage adds up to the stored bundles");
    let docs: Value = serde_json::from_str(&relay.node("documents", &["--json"]).expect_ok())
        .expect("documents json");
    assert!(
        docs.as_array()
            .expect("array")
            .iter()
            .any(|d| d["id"] == id && d["kind"] == "referral"),
        "{docs:#}"
    );

    story.step("idle connections cannot take the admin listener's places for long");
    let admin_addr = relay.admin_url().trim_start_matches("http://").to_owned();
    let idle: Vec<std::net::TcpStream> = (0..musubi_sync_node::admin::ADMIN_CONNECTIONS_MAX)
        .map(|_| std::net::TcpStream::connect(&admin_addr).expect("connect"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    assert!(
        relay
            .admin_try_get("/livez", None, Duration::from_secs(2))
            .is_err(),
        "while every place is held, the next connection waits"
    );
    drop(idle);
    poll_every(
        "the admin listener to answer again",
        Duration::from_secs(10),
        Duration::from_millis(100),
        &mut || {
            relay
                .admin_try_get("/livez", None, Duration::from_secs(2))
                .ok()
                .filter(|(c, _)| *c == 200)
        },
    );

    story.step("the logs are JSON lines, and no secret is in them");
    let log = fs::read_to_string(relay.err_log()).expect("log");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5);
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    let key = fs::read(relay.data.join("relay.key")).expect("key");
    assert!(!log.contains(&hex::encode(&key)));
    assert!(!log.contains(musubi_tests::AUTHORITY_PASSPHRASE));
    assert!(!log.contains("承知しました") && !log.contains("第4報"));
    relay.kill();

    story.step("beyond loopback the admin listener asks for a token");
    relay.set_serve_args(&["--admin", "0.0.0.0:0"]);
    let refused = relay.serve_fails();
    assert!(refused.contains("--admin-token-file"), "{refused}");
    let token = world.path().join("admin-token");
    fs::write(&token, "c2VjcmV0LXRva2VuLWZvci10aGUtYWRtaW4\n").expect("token");
    relay.set_serve_args(&[
        "--admin",
        "0.0.0.0:0",
        "--admin-token-file",
        token.to_str().expect("utf-8"),
    ]);
    relay.start();
    assert_eq!(relay.admin_get("/metrics", None).0, 401);
    assert_eq!(relay.admin_get("/status", Some("wrong")).0, 401);
    assert_eq!(
        relay
            .admin_get("/metrics", Some("c2VjcmV0LXRva2VuLWZvci10aGUtYWRtaW4"))
            .0,
        200
    );
    assert_eq!(relay.admin_get("/livez", None).0, 200);
}

/// Acceptance 2: `/readyz` goes 503 when another process holds the database's write lock, and
/// when the disk is full (a small tmpfs), and back to 200 after; a push while the disk is full is
/// not acknowledged, stays at the facility and arrives once there is room.
#[test]
fn readyz_says_why_it_is_not_ready_and_nothing_unstored_is_acknowledged() {
    let _serial = serial();
    let story = Story::new("readyz_says_why_it_is_not_ready_and_nothing_unstored_is_acknowledged");
    assert!(
        nix::unistd::geteuid().is_root(),
        "this scenario mounts a small tmpfs for the relay's disk: run the scenarios as root (CI does)"
    );
    let world = World::new("readyz");
    let (mut relay, a, b) = relay_a_b(&world);
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();
    relay.kill();

    story.step("the relay moves onto a 48 MiB disk of its own");
    let disk = world.path().join("small-disk");
    fs::create_dir_all(&disk).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &disk,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=48m,mode=0700"),
    )
    .expect("mount a tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(disk.clone());
    let data = disk.join("relay");
    musubi_tests::files::copy_flat(&relay.data, &data);
    relay.set_data(data.clone());
    relay.set_serve_args(&["--admin", "127.0.0.1:0", "--min-free-bytes", "8MiB"]);
    relay.start();
    assert_eq!(relay.admin_get("/readyz", None), (200, "ready\n".into()));

    story.step("another process holds the write lock: not ready, and ready again after");
    let locker = rusqlite::Connection::open(data.join("node.db")).expect("open");
    locker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let (code, body) = relay.admin_get("/readyz", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("locked"), "{body}");
    locker.execute_batch("ROLLBACK").expect("unlock");
    drop(locker);
    assert_eq!(relay.admin_get("/readyz", None).0, 200);

    story.step("the disk fills up: not ready, and a push is not acknowledged");
    let filler = disk.join("filler");
    {
        use std::io::Write as _;
        let mut f = fs::File::create(&filler).expect("filler");
        let block = vec![0x5au8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        let mut small = vec![0u8; 4096];
        while f.write_all(&small).is_ok() {}
        small.truncate(1);
        while f.write_all(&small).is_ok() {}
    }
    let (code, body) = relay.admin_get("/readyz", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk is almost full"), "{body}");
    let before = count_bundles(&relay.db());
    a.edit(&id, "remarks", "ディスク満杯中の追記");
    let out = a.sync_once_result();
    assert_eq!(
        count_bundles(&relay.db()),
        before,
        "nothing was stored on a full disk: {}",
        out.stderr
    );
    assert!(a.pending() >= 1, "the edit is still queued at the clinic");

    story.step("room again: ready, and the edit arrives");
    fs::remove_file(&filler).expect("remove the filler");
    poll_every(
        "/readyz to say ready",
        Duration::from_secs(10),
        Duration::from_millis(100),
        &mut || (relay.admin_get("/readyz", None).0 == 200).then_some(()),
    );
    a.sync_once();
    assert_eq!(a.pending(), 0);
    b.sync_once();
    assert!(b.show_text(&id).contains("ディスク満杯中の追記"));
    relay.kill();
}

/// A device that floods the relay with requests is slowed and told how long to wait, and the
/// metric counts it; another facility's sync goes on. (Its latency under the flood is measured by
/// `bench-latency --flood`.)
#[test]
fn a_flooding_device_is_slowed_and_told_so() {
    let _serial = serial();
    let story = Story::new("a_flooding_device_is_slowed_and_told_so");
    let world = World::new("flood");
    let mut relay = Relay::init(&world);
    relay.set_serve_args(&["--admin", "127.0.0.1:0", "--device-requests-per-sec", "20"]);
    relay.start();
    let flooder = RawClient::enrol(&relay, "洪水診療所", "clinic");
    let a = world.enrolled_facility(&relay, "clinic-a", CLINIC_A, "clinic");
    let b = world.enrolled_facility(&relay, "hospital-b1", HOSPITAL_B, "clinic");
    a.sync_once();

    story.step("the flooding device sends 2,000 requests as fast as it can");
    let frame = encode_request(&Request::ListDocuments);
    let mut limited = 0;
    let mut answered = 0;
    let mut told = String::new();
    for _ in 0..(2000 / STREAM_WINDOW) {
        for r in flooder.request_pipelined(vec![frame.clone(); STREAM_WINDOW]) {
            match r.map(|b| decode_response(&b)) {
                Ok(Ok(Response::Error {
                    code: ErrorCode::RateLimited,
                    message,
                })) => {
                    limited += 1;
                    told = message;
                }
                Ok(Ok(Response::Documents { .. })) => answered += 1,
                other => panic!("flood answered with {other:?}"),
            }
        }
    }
    story.step(&format!("{answered} answered, {limited} slowed: {told}"));
    assert!(limited > 1500, "{limited} of 2000 slowed");
    assert!(answered >= 200, "the burst passes ({answered})");
    assert!(told.contains("retry in"), "{told}");

    story.step("the other facilities sync as before");
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    assert!(b.show_text(&id).contains("診療情報提供書"));
    let samples = parse_metrics(&relay.admin_get("/metrics", None).1);
    assert_eq!(
        sample(
            &samples,
            "musubi_relay_rate_limited_total",
            &[("limit", "requests")]
        ),
        limited as f64
    );
}

/// Requests pipelined at once on one connection: the most one device may have queued at the
/// relay (`REQUESTS_QUEUED_PER_DEVICE_MAX`; more would be answered "busy").
const STREAM_WINDOW: usize = musubi_sync_node::REQUESTS_QUEUED_PER_DEVICE_MAX;

/// A facility over its storage quota: its bundle is held back (told, kept, not lost), the other
/// facility is unaffected, and once the operator raises the quota it arrives.
#[test]
fn a_facility_over_its_quota_is_told_and_keeps_its_edits_until_there_is_room() {
    let _serial = serial();
    let story =
        Story::new("a_facility_over_its_quota_is_told_and_keeps_its_edits_until_there_is_room");
    let world = World::new("quota");
    let (mut relay, a, b) = relay_a_b(&world);
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();
    let usage: Value =
        serde_json::from_str(&relay.node("usage", &["--json"]).expect_ok()).expect("usage json");
    let a_bytes = usage
        .as_array()
        .expect("array")
        .iter()
        .find(|u| u["name"] == CLINIC_A)
        .and_then(|u| u["bytes"].as_u64())
        .expect("the clinic's usage");

    story.step("the operator sets the quota just above what the clinic holds");
    relay.kill();
    let quota = (a_bytes + 64).to_string();
    relay.set_serve_args(&["--quota-bytes-per-facility", &quota]);
    relay.start();
    a.edit(&id, "remarks", "容量超過中の追記 ".repeat(40).as_str());
    let out = a.run_ok("sync", &["--once", "--timeout", "60"]);
    assert!(out.contains("held back"), "the clinic is told: {out}");
    assert!(a.pending() >= 1, "the edit is kept");
    assert!(
        a.status()["held_back"].as_u64().unwrap_or(0) >= 1,
        "`status` (and the app's status bar, from the same count) says it is held back"
    );
    b.reply(&id, "病院からの返信(容量に影響されない)");
    b.sync_once();
    a.sync_once();
    assert!(a.show_text(&id).contains("病院からの返信"));

    story.step("the quota is raised: the edit arrives");
    relay.kill();
    relay.set_serve_args(&["--quota-bytes-per-facility", "1GiB"]);
    relay.start();
    a.sync_once();
    assert_eq!(a.pending(), 0);
    assert_eq!(a.status()["held_back"], 0);
    b.sync_once();
    assert!(b.show_text(&id).contains("容量超過中の追記"));
}

/// One source address can open only `--connections-per-address` connections (handshakes
/// included); the next is refused before its handshake ends, counted in the metrics, and its
/// place comes back when one closes.
#[test]
fn connections_from_one_address_are_capped() {
    let _serial = serial();
    let story = Story::new("connections_from_one_address_are_capped");
    let world = World::new("conn-cap");
    let mut relay = Relay::init(&world);
    relay.set_serve_args(&["--admin", "127.0.0.1:0", "--connections-per-address", "3"]);
    relay.start();
    story.step("three strangers' keys connect from 127.0.0.1; a fourth is refused");
    let first: Vec<RawClient> = (0..3).map(|_| RawClient::stranger(&relay)).collect();
    let refused = RawClient::connect(musubi_tests::raw::random_secrets(), &relay.p2p_addr());
    assert!(
        refused.is_err(),
        "the fourth connection from one address is refused"
    );
    let samples = parse_metrics(&relay.admin_get("/metrics", None).1);
    assert_eq!(
        sample(
            &samples,
            "musubi_relay_rate_limited_total",
            &[("limit", "per-address")]
        ),
        1.0
    );
    let log = fs::read_to_string(relay.err_log()).expect("log");
    assert!(
        log.contains("connection refused by a connection cap"),
        "{log}"
    );

    story.step("one closes: another may connect");
    drop(first);
    poll_every(
        "a place to come back",
        Duration::from_secs(20),
        Duration::from_millis(200),
        &mut || RawClient::connect(musubi_tests::raw::random_secrets(), &relay.p2p_addr()).ok(),
    );
}

/// Puts a line into /etc/hosts for the test's lifetime (the file is restored on drop).
struct HostsEntry(String);

impl HostsEntry {
    fn set(line: &str) -> Self {
        let original = fs::read_to_string("/etc/hosts").expect("read /etc/hosts");
        let mut hosts = original.clone();
        if !hosts.ends_with('\n') {
            hosts.push('\n');
        }
        hosts.push_str(line);
        hosts.push('\n');
        // Written in place: in a container /etc/hosts is a mounted file, not to be replaced.
        fs::write("/etc/hosts", hosts).expect("write /etc/hosts");
        Self(original)
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _ = fs::write("/etc/hosts", &self.0);
    }
}

/// Acceptance 5: a relay that moves to another address and port, with `--advertise` naming a DNS
/// name that now resolves to it (an /etc/hosts entry), is found by every facility without a new
/// invite: they dial the name (resolved at every connect), and learned the new port from the
/// relay's directory answers when the operator announced it before the move.
#[test]
fn a_relay_that_moves_is_found_by_its_dns_name_without_a_new_invite() {
    let _serial = serial();
    let story = Story::new("a_relay_that_moves_is_found_by_its_dns_name_without_a_new_invite");
    assert!(
        nix::unistd::geteuid().is_root(),
        "this scenario points a name at the relay in /etc/hosts: run the scenarios as root (CI does)"
    );
    const NAME: &str = "relay.musubi-move.test";
    let world = World::new("relay-move");
    let (p1, p2) = (musubi_tests::free_port(), musubi_tests::free_port());
    let old_home = HostsEntry::set(&format!("127.0.0.2 {NAME}"));
    let mut relay = Relay::init(&world);
    relay.set_listen(&format!("/ip4/127.0.0.2/tcp/{p1}"));
    let advertise_p1 = format!("/dns4/{NAME}/tcp/{p1}");
    relay.set_serve_args(&["--advertise", &advertise_p1]);
    relay.start();
    let code = relay.invite_facility(CLINIC_A, "clinic");
    assert!(
        musubi_crdt::invite::InviteCode::decode(&code)
            .expect("invite")
            .addrs[0]
            .starts_with(&advertise_p1),
        "the invite names the relay by its DNS name first"
    );
    let mut a = world.facility("clinic-a");
    a.init();
    a.join(&code);
    let b = world.enrolled_facility(&relay, "hospital-b1", HOSPITAL_B, "clinic");
    a.sync_once();
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();

    story.step("the operator announces the new port before the move; the facilities sync");
    relay.kill();
    let advertise_p2 = format!("/dns4/{NAME}/tcp/{p2}");
    relay.set_serve_args(&["--advertise", &advertise_p1, "--advertise", &advertise_p2]);
    relay.start();
    a.sync_once();
    b.sync_once();
    for f in [&a, &b] {
        let addrs = f.engine().enrolment().expect("enrolment").relay_addrs;
        assert!(
            addrs.iter().any(|x| x.starts_with(&advertise_p2)),
            "{} learned the announced address: {addrs:?}",
            f.name
        );
    }

    story.step(&format!(
        "the relay moves to 127.0.0.3, port {p2}; the name now points there"
    ));
    relay.kill();
    drop(old_home);
    let _new_home = HostsEntry::set(&format!("127.0.0.3 {NAME}"));
    relay.set_listen(&format!("/ip4/127.0.0.3/tcp/{p2}"));
    relay.set_serve_args(&["--advertise", &advertise_p2]);
    relay.start();
    a.edit(&id, "remarks", "移転後の中継サーバーへ送信");
    a.sync_once();
    b.sync_once();
    assert!(
        b.show_text(&id).contains("移転後の中継サーバーへ送信"),
        "both facilities found the moved relay without a new invite"
    );
    relay.kill();
}
