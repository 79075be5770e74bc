//! Who saw what (issue 12): staff act under their own login, every read, change and export is in
//! the device's audit log with the right names, and a log altered or cut on disk is detected.

use std::process::Command;

use musubi_tests::facility::{STAFF_LOGIN, STAFF_PASSWORD};
use musubi_tests::vcard::harness::run_with_stdin;
use musubi_tests::{COMMAND_TIMEOUT, Facility, Output};
use serde_json::Value;

use super::{HOSPITAL_B, Story, relay_a_b, serial};

/// `musubi SUB ARGS` at `f` as the staff member `login` with `password`.
fn as_staff(f: &Facility, login: &str, password: &str, sub: &str, args: &[&str]) -> Output {
    let mut cmd: Command = f.command(sub, args);
    cmd.env("MUSUBI_STAFF", login)
        .env("MUSUBI_STAFF_PASSWORD", password);
    musubi_tests::run_command(cmd, COMMAND_TIMEOUT)
}

/// Adds a staff account (as the device's administrator).
fn add_staff(f: &Facility, login: &str, name: &str, password: &str) {
    run_with_stdin(
        f.command("staff add", &["--login", login, "--name", name]),
        &format!("{password}\n"),
        COMMAND_TIMEOUT,
    )
    .expect_ok();
}

/// `(staff, action, doc, fields)` of each entry of `audit list --json ARGS` at `f` that `keep`
/// keeps.
fn listed(
    f: &Facility,
    args: &[&str],
    keep: impl Fn(&Value) -> bool,
) -> Vec<(String, String, String, String)> {
    let v: Value = f.run_json("audit list", args);
    v.as_array()
        .unwrap_or_else(|| panic!("audit list --json prints a list: {v:#}"))
        .iter()
        .filter(|e| keep(e))
        .map(|e| {
            for key in ["time", "staff", "device", "doc", "action", "fields"] {
                assert!(e.get(key).is_some(), "an entry has {key}: {e:#}");
            }
            (
                e["staff"].as_str().unwrap_or("-").to_owned(),
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["doc"].as_str().unwrap_or("-").to_owned(),
                e["fields"]
                    .as_array()
                    .map(|f| {
                        f.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// The entries of `audit list --json ARGS`, leaving out the administrator's own account and log
/// reads.
fn entries(f: &Facility, args: &[&str]) -> Vec<(String, String, String, String)> {
    listed(f, args, |e| e["staff"] != STAFF_LOGIN)
}

fn tuple(staff: &str, action: &str, doc: &str, fields: &str) -> (String, String, String, String) {
    (staff.into(), action.into(), doc.into(), fields.into())
}

/// A clinic clerk reads, edits and exports a letter; an HQ staff member reads the shelters and
/// exports the roster. Each administrator's `audit list` shows exactly those actions, named, and
/// `audit verify` passes. No command runs without a staff member, and a wrong password is logged.
#[test]
fn every_read_change_and_export_is_in_the_audit_log_under_the_staff_member() {
    let _serial = serial();
    let story =
        Story::new("every_read_change_and_export_is_in_the_audit_log_under_the_staff_member");
    let world = musubi_tests::World::new("audit");
    let (relay, a, b) = relay_a_b(&world);
    let hq = world.enrolled_facility(&relay, "hq", "七尾市災害対策本部", "hq");
    let centre = world.enrolled_facility(&relay, "centre", "和倉公民館", "shelter");
    let letter = a.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());
    a.sync_once();
    b.sync_once();
    centre.run_ok(
        "shelter open",
        &["--name", "和倉公民館", "--capacity", "80"],
    );
    centre.sync_once();
    hq.sync_once();

    story.step("without a staff member, or with a wrong password, nothing is shown");
    let mut anonymous = b.command("referral show", &[&letter]);
    anonymous.env_remove("MUSUBI_STAFF");
    let out = musubi_tests::run_command(anonymous, COMMAND_TIMEOUT).expect_fail();
    assert!(out.stderr.contains("MUSUBI_STAFF"), "{}", out.stderr);
    add_staff(&b, "tanaka", "田中 花子", "tanaka password");
    let out = as_staff(
        &b,
        "tanaka",
        "not her password",
        "referral show",
        &[&letter],
    )
    .expect_fail();
    assert!(
        out.stderr.contains("wrong login or password"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("診療情報提供書"));

    story.step("田中 reads the letter, edits its remarks and exports it as FHIR");
    let shown = as_staff(&b, "tanaka", "tanaka password", "referral show", &[&letter]).expect_ok();
    assert!(shown.contains("診療情報提供書"));
    as_staff(
        &b,
        "tanaka",
        "tanaka password",
        "referral edit",
        &[&letter, "--field", "remarks", "--text", "受診予約済み"],
    )
    .expect_ok();
    as_staff(
        &b,
        "tanaka",
        "tanaka password",
        "referral export-fhir",
        &[&letter],
    )
    .expect_ok();

    story.step("鈴木 at HQ reads the summary and exports the roster of every shelter");
    add_staff(&hq, "suzuki", "鈴木 次郎", "suzuki password");
    as_staff(&hq, "suzuki", "suzuki password", "hq summary", &[]).expect_ok();
    let csv = world.path().join("roster.csv");
    as_staff(
        &hq,
        "suzuki",
        "suzuki password",
        "hq export",
        &["--roster", "--out", &csv.display().to_string()],
    )
    .expect_ok();

    story.step("each administrator's audit list shows exactly those actions");
    assert_eq!(
        entries(&b, &[]),
        vec![
            tuple("tanaka", "sign-in-failed", "-", "password"),
            tuple("tanaka", "read", &letter, ""),
            tuple("tanaka", "edit", &letter, "remarks"),
            tuple("tanaka", "export", &letter, "fhir"),
        ]
    );
    assert_eq!(
        entries(&b, &["--staff-login", "tanaka", "--action", "edit"]),
        vec![tuple("tanaka", "edit", &letter, "remarks")]
    );
    // The spelling: the administrator signs in by MUSUBI_STAFF, `--staff` filters.
    assert_eq!(
        entries(&b, &["--staff", "tanaka", "--action", "edit"]),
        vec![tuple("tanaka", "edit", &letter, "remarks")]
    );
    assert_eq!(
        entries(&hq, &[]),
        vec![
            tuple("suzuki", "read", "-", "summary"),
            tuple("suzuki", "export", "-", "roster.csv"),
        ]
    );
    for f in [&b, &hq] {
        let out = f.run_ok("audit verify", &[]);
        assert!(out.contains("this device: intact"), "{out}");
    }

    story.step("HQ also reads the shelter's log (who opened the roster); the hospital does not");
    let centre_id = centre.facility_id().to_string();
    let from_centre = |f: &Facility| listed(f, &[], |e| e["facility"] == centre_id.as_str());
    let at_hq = from_centre(&hq);
    assert!(
        at_hq
            .iter()
            .any(|(staff, action, _, _)| staff == STAFF_LOGIN && action == "create"),
        "HQ lists the shelter's entries: {at_hq:?}"
    );
    assert!(
        from_centre(&b).is_empty(),
        "a clinic reads no shelter's log"
    );
    let out = hq.run_ok("audit verify", &[]);
    let centre_device = centre.device_id().to_string();
    assert!(
        out.contains(&format!("device {centre_device}")) && !out.contains("broken"),
        "{out}"
    );

    story.step("a staff member who is not an administrator cannot read the log");
    let out = as_staff(&b, "tanaka", "tanaka password", "audit list", &[]).expect_fail();
    assert!(
        out.stderr.contains("only an administrator"),
        "{}",
        out.stderr
    );

    story.step("the export is a file of every entry, for the administrator only");
    let file = world.path().join("audit.csv");
    b.run_ok(
        "audit export",
        &["--format", "csv", "--out", &file.display().to_string()],
    );
    let text = std::fs::read_to_string(&file).expect("the export");
    assert!(text.starts_with("seq,time,staff,device,doc,action,fields"));
    assert!(text.contains(&format!("tanaka,{}", b.device_id())) && text.contains(",edit,remarks"));
    assert!(!text.contains("受診予約済み"), "no field value is logged");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let _ = STAFF_PASSWORD;
}

/// A row of the audit table altered, removed, or the newest cut off, directly in `facility.db`:
/// `audit verify` fails and names where, each time.
#[test]
fn an_audit_log_altered_or_cut_on_disk_is_detected() {
    let _serial = serial();
    let story = Story::new("an_audit_log_altered_or_cut_on_disk_is_detected");
    let world = musubi_tests::World::new("audit-tamper");
    let (_relay, a, _b) = relay_a_b(&world);
    let letter = a.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());
    for _ in 0..3 {
        a.run_ok("referral show", &[&letter]);
    }
    a.run_ok("audit verify", &[]);
    let db = a.data.join("facility.db");
    let rows = |conn: &rusqlite::Connection| -> Vec<(i64, Vec<u8>)> {
        let mut st = conn
            .prepare("SELECT seq, sealed FROM audit ORDER BY seq")
            .expect("the audit table");
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    let head = |conn: &rusqlite::Connection| -> Vec<u8> {
        conn.query_row("SELECT value FROM meta WHERE key = 'audit_head'", [], |r| {
            r.get(0)
        })
        .expect("the chain's head")
    };
    let conn = rusqlite::Connection::open(&db).expect("open");
    let (backup, backup_head) = (rows(&conn), head(&conn));
    drop(conn);
    assert!(backup.len() >= 5, "{} entries", backup.len());
    // Puts the log back as it was (each `audit verify` run appends its own entry after checking).
    let restore = || {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('audit_head', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            rusqlite::params![backup_head],
        )
        .expect("head");
        conn.execute("DELETE FROM audit", []).expect("clear");
        for (seq, sealed) in &backup {
            conn.execute(
                "INSERT INTO audit (seq, sealed) VALUES (?1, ?2)",
                rusqlite::params![seq, sealed],
            )
            .expect("put back");
        }
    };
    let broken = |what: &str, expect: &str| {
        let out = a.run("audit verify", &[]).expect_fail();
        eprintln!("{what}: {}", out.stderr.trim());
        assert!(
            out.stderr.contains("audit log broken") && out.stderr.contains(expect),
            "{what}: {}",
            out.stderr
        );
    };

    story.step("one byte of entry 3 changed");
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        let mut sealed = backup[2].1.clone();
        let i = sealed.len() / 2;
        sealed[i] ^= 1;
        conn.execute(
            "UPDATE audit SET sealed = ?1 WHERE seq = 3",
            rusqlite::params![sealed],
        )
        .expect("alter");
    }
    broken("altered", "entry 3");
    restore();

    story.step("entry 3 removed");
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute("DELETE FROM audit WHERE seq = 3", [])
        .expect("remove");
    broken("removed", "entry 3 is missing");
    restore();

    story.step("entry 2 replaced by a copy of entry 4");
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute(
            "UPDATE audit SET sealed = ?1 WHERE seq = 2",
            rusqlite::params![backup[3].1],
        )
        .expect("copy");
    }
    broken("copied", "entry 2");
    restore();

    story.step("the record of the newest entry removed");
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute("DELETE FROM meta WHERE key = 'audit_head'", [])
        .expect("remove the head");
    broken("head removed", "newest entry is missing");
    let out = a.run("referral show", &[&letter]).expect_fail();
    assert!(
        out.stderr.contains("audit log") && !out.stdout.contains("診療情報提供書"),
        "no entry, no data: {}",
        out.stderr
    );
    // An edit is stored only with its entry: refused, it leaves the letter as it was.
    a.run(
        "referral edit",
        &[&letter, "--field", "remarks", "--text", "記録されない編集"],
    )
    .expect_fail();
    restore();
    assert!(
        !a.run_ok("referral show", &[&letter])
            .contains("記録されない編集"),
        "an edit without its audit entry is not stored"
    );
    restore();

    story.step("the newest entries cut off");
    let last = backup.last().expect("entries").0;
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute("DELETE FROM audit WHERE seq >= ?1", [last - 1])
        .expect("cut");
    broken("cut", "newest were removed");
    restore();
    a.run_ok("audit verify", &[]);

    story.step("nothing of the log is readable on disk");
    for f in musubi_tests::files::walk(&a.data) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for needle in ["audit-read", STAFF_LOGIN] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} lies in the clear in {}",
                f.display()
            );
        }
    }
}

/// The entries `audit list --json` at `f` shows for `device`, by 田中.
fn entries_of(f: &Facility, device: &str) -> Vec<(String, String, String, String)> {
    listed(f, &[], |e| {
        e["device"] == device && e["staff"] == "kansa-tanaka"
    })
}

/// A clinic's laptop copies its log into the facility's audit document at each sync: the clinic's
/// desk device lists and verifies the laptop's entries; after the laptop is wiped and joined again
/// as a new device, the new one lists them too. Another facility (a member of the same letter)
/// never receives the audit document. The desk put back to an older copy of its disk is seen
/// against its copy in the audit document. Nothing of the log is readable at the relay or on the
/// disks.
#[test]
fn a_laptops_audit_reaches_its_other_device_and_survives_wiping_it() {
    let _serial = serial();
    let story = Story::new("a_laptops_audit_reaches_its_other_device_and_survives_wiping_it");
    let world = musubi_tests::World::new("audit-sync");
    let (relay, laptop, b) = relay_a_b(&world);
    let desk = world.enrolled_device(&relay, &laptop, "clinic-a-desk");
    let letter = laptop.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());

    story.step("on the laptop, 田中 fails to sign in once, then reads the letter and exports it");
    add_staff(&laptop, "kansa-tanaka", "田中 花子", "tanaka password");
    as_staff(
        &laptop,
        "kansa-tanaka",
        "wrong",
        "referral show",
        &[&letter],
    )
    .expect_fail();
    as_staff(
        &laptop,
        "kansa-tanaka",
        "tanaka password",
        "referral show",
        &[&letter],
    )
    .expect_ok();
    as_staff(
        &laptop,
        "kansa-tanaka",
        "tanaka password",
        "referral export-fhir",
        &[&letter],
    )
    .expect_ok();
    let laptop_id = laptop.device_id().to_string();
    let expected = vec![
        tuple("kansa-tanaka", "sign-in-failed", "-", "password"),
        tuple("kansa-tanaka", "read", &letter, ""),
        tuple("kansa-tanaka", "export", &letter, "fhir"),
    ];
    assert_eq!(entries_of(&laptop, &laptop_id), expected);

    story
        .step("the laptop syncs; the desk's administrator lists and verifies the laptop's entries");
    laptop.sync_once();
    desk.sync_once();
    b.sync_once();
    assert_eq!(entries_of(&desk, &laptop_id), expected);
    let out = desk.run_ok("audit verify", &[]);
    assert!(
        out.contains("this device: intact")
            && out.contains(&format!(
                "device {laptop_id} of facility {} (from its audit document): intact",
                laptop.facility_id()
            )),
        "{out}"
    );

    story.step("hospital B, a member of the letter, holds no audit document of the clinic");
    let clinic = laptop.facility_id();
    let audit_docs = |f: &Facility| {
        f.engine()
            .store()
            .documents(Some(musubi_crdt::ids::DocumentKind::Audit))
            .expect("documents")
            .into_iter()
            .filter(|r| r.info.members.iter().any(|m| m.facility == clinic))
            .count()
    };
    assert_eq!(
        audit_docs(&desk),
        1,
        "the desk holds the clinic's audit document"
    );
    assert_eq!(audit_docs(&b), 0, "another facility never receives it");

    story.step("nothing of the log lies in the clear at the relay, in the logs or on the disks");
    let needles: Vec<Vec<u8>> = ["kansa-tanaka", "sign-in-failed"]
        .iter()
        .map(|n| n.as_bytes().to_vec())
        .collect();
    let logs = world.logs();
    let found = musubi_tests::files::grep_tree(
        &[
            relay.data.as_path(),
            logs.as_path(),
            laptop.data.as_path(),
            desk.data.as_path(),
            b.data.as_path(),
        ],
        &needles,
    );
    assert!(found.is_empty(), "audit plaintext found: {found:?}");

    story.step("the laptop is wiped and joins again as a new device: the old entries are there");
    std::fs::remove_dir_all(&laptop.data).expect("wipe the laptop");
    let again = world.enrolled_device(&relay, &desk, "clinic-a-laptop-again");
    again.sync_once();
    assert_eq!(entries_of(&again, &laptop_id), expected);
    assert_eq!(entries_of(&desk, &laptop_id), expected);
    let out = again.run_ok("audit verify", &[]);
    assert!(out.contains(&format!("device {laptop_id}")), "{out}");

    story.step("the desk put back to an older copy of its disk is seen against the audit document");
    let copy = world.path().join("desk-copy");
    musubi_tests::files::copy_flat(&desk.data, &copy);
    for _ in 0..2 {
        desk.run_ok("referral show", &[&letter]);
    }
    desk.sync_once();
    for name in ["facility.db", "facility.db-wal", "facility.db-shm"] {
        let _ = std::fs::remove_file(desk.data.join(name));
    }
    musubi_tests::files::copy_flat(&copy, &desk.data);
    desk.sync_once();
    let out = desk.run("audit verify", &[]).expect_fail();
    assert!(
        out.stdout.contains("no longer has") && out.stderr.contains("監査ログ"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}
