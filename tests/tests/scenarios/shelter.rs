//! Shelters (issue 3, shelter half): community centres run reception, the disaster HQ counts.
//!
//! The relay and the `musubi` CLI are the real processes. Bulk check-ins (the 七尾市 replay, the two
//! desks with 500 people each) go through `musubi_facility::services::shelter` in this process, on
//! the same data directories, because thousands of CLI processes would take too long; HQ always
//! reads through the CLI (`musubi hq summary|history --json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use musubi_crdt::documents::shelter::{Method, NewEvacuee, StayKind};
use musubi_crdt::ids::{DocumentId, Seq};
use musubi_crdt::protocol::{ErrorCode, Request, Response};
use musubi_facility::Engine;
use musubi_facility::net::{self, Mode};
use musubi_facility::services::shelter::{self, CheckIn, Desk, OpenShelter};
use musubi_tests::raw::RawClient;
use musubi_tests::{Facility, World, files, free_port, nanao, poll_until, repo_root};
use serde_json::Value;

use super::{Story, serial};

const HQ: &str = "七尾市災害対策本部";
const HQ_HEALTH: &str = "七尾市災害対策本部 保健医療班";

fn engine(f: &Facility) -> Engine {
    Engine::open(&f.data, f.passphrase())
        .unwrap_or_else(|e| panic!("open {} in process: {e}", f.name))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `sync --once` in this process (no new process, no passphrase unwrap): pushes and pulls everything.
fn sync_in_process(rt: &tokio::runtime::Runtime, e: &mut Engine) {
    rt.block_on(net::sync(
        e,
        Mode::Once {
            timeout: Duration::from_secs(60),
        },
        |_| {},
    ))
    .unwrap_or_else(|err| panic!("in-process sync failed: {err}"));
}

fn hq_summary(hq: &Facility) -> Value {
    hq.run_json("hq summary", &[])
}

/// `present` per shelter code from `hq summary --json`, and the total.
fn counts_by_code(summary: &Value) -> (BTreeMap<String, u64>, u64) {
    let shelters = summary["shelters"]
        .as_array()
        .unwrap_or_else(|| panic!("summary has no shelters: {summary:#}"));
    let mut out = BTreeMap::new();
    for s in shelters {
        let code = s["code"]
            .as_str()
            .unwrap_or_else(|| panic!("shelter without code: {s:#}"))
            .to_owned();
        for key in ["id", "name", "present", "capacity"] {
            assert!(
                s.get(key).is_some(),
                "`hq summary --json` shelter lacks `{key}`: {s:#}"
            );
        }
        out.insert(code, s["present"].as_u64().expect("present is a number"));
    }
    let total = summary["total_present"]
        .as_u64()
        .unwrap_or_else(|| panic!("no total_present: {summary:#}"));
    (out, total)
}

fn person(name: &str, birth: &str) -> NewEvacuee {
    NewEvacuee {
        name: name.into(),
        birth_date: birth.into(),
        ..NewEvacuee::default()
    }
}

// ---------------------------------------------------------------------------------------------------------

/// 七尾市, January to August 2024: four community centres run the 34 shelters of the real data set
/// (several each); every snapshot's counts become check-ins and check-outs; the relay goes down twice
/// along the way. HQ's counts per shelter and in total equal the data set's: live at sampled snapshots
/// (`hq summary`), and at all 117 snapshot times at the end (`hq history --at ...`).
#[test]
fn nanao_replay_hq_counts_match_the_real_data() {
    let _serial = serial();
    let story = Story::new("nanao_replay_hq_counts_match_the_real_data");
    let snapshots = nanao::snapshots();
    let plan = nanao::plan(&snapshots);
    let registry = nanao::shelters(&snapshots);
    let world = World::new("nanao");
    let mut relay = world.relay();
    let hq = world.enrolled_facility(&relay, "hq", HQ, "hq");
    let centres: Vec<Facility> = (0..4)
        .map(|i| {
            world.enrolled_facility(
                &relay,
                &format!("centre-{i}"),
                &format!("七尾市地区センター{i}"),
                "shelter",
            )
        })
        .collect();
    let rt = runtime();
    let mut engines: Vec<Engine> = centres.iter().map(engine).collect();
    for e in &mut engines {
        sync_in_process(&rt, e); // the directory with HQ in it
    }
    // Shelters go to centres by district, so each centre runs several.
    let districts: BTreeSet<&str> = registry.values().map(|r| r.district.as_str()).collect();
    let district_centre: BTreeMap<&str, usize> = districts
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, i % 4))
        .collect();
    let mut docs: BTreeMap<String, (usize, DocumentId)> = BTreeMap::new();
    let mut per_centre = [0usize; 4];
    let mut relay_up = true;
    let mut live_checks = 0;
    let sample: BTreeSet<usize> = (0..snapshots.len())
        .filter(|i| i % 15 == 0 || *i + 1 == snapshots.len())
        .collect();
    story.step(&format!(
        "replaying {} snapshots, {} shelters, {} check-ins and check-outs",
        snapshots.len(),
        registry.len(),
        plan.iter()
            .flat_map(|s| s.values())
            .map(|s| s.check_ins.len() + s.check_outs.len())
            .sum::<usize>()
    ));
    let mut evacuee_ids: BTreeMap<String, String> = BTreeMap::new();
    for (k, (snap, steps)) in snapshots.iter().zip(&plan).enumerate() {
        if k == 40 || k == 100 {
            story.step(&format!(
                "the relay goes down at snapshot {k} ({})",
                snap.time
            ));
            relay.kill();
            relay_up = false;
        }
        if k == 70 || k == 101 {
            story.step(&format!("the relay is back at snapshot {k}"));
            relay.start();
            relay_up = true;
        }
        // Events a minute before the snapshot time: the snapshot counts them.
        let at_ms = musubi_crdt::documents::shelter::rfc3339_ms(&snap.time).expect("snapshot time")
            - 60_000;
        let at = shelter::ms_to_rfc3339(at_ms);
        for (code, step) in steps {
            let row = &registry[code];
            let c = district_centre[row.district.as_str()];
            let e = &mut engines[c];
            let (_, doc) = *docs.entry(code.clone()).or_insert_with(|| {
                per_centre[c] += 1;
                let opened = shelter::open(
                    e,
                    &OpenShelter {
                        name: row.name.clone(),
                        code: code.clone(),
                        address: row.address.clone(),
                        capacity: row.capacity,
                        at: Some(shelter::ms_to_rfc3339(at_ms - 60_000)),
                        ..OpenShelter::default()
                    },
                )
                .unwrap_or_else(|err| panic!("open {code}: {err}"));
                (c, opened.shelter)
            });
            let mut desk = Desk::open(e, doc).expect("load the shelter");
            for p in &step.check_outs {
                let id = &evacuee_ids[&p.name];
                desk.stay(
                    id,
                    StayKind::CheckOut,
                    Method::TransitCard,
                    Some(at.clone()),
                    "",
                )
                .expect("check out");
            }
            for p in &step.check_ins {
                let out = desk
                    .checkin(&CheckIn {
                        person: person(&p.name, &p.birth),
                        method: Method::TransitCard,
                        at: Some(at.clone()),
                    })
                    .expect("check in");
                evacuee_ids.insert(p.name.clone(), out.evacuee);
            }
            desk.commit(e).expect("commit");
        }
        if relay_up && sample.contains(&k) {
            for e in &mut engines {
                sync_in_process(&rt, e);
            }
            hq.sync_once();
            let (counts, total) = counts_by_code(&hq_summary(&hq));
            for code in docs.keys() {
                assert_eq!(
                    counts.get(code).copied(),
                    Some(snap.count(code) as u64),
                    "HQ's count of {code} at {}",
                    snap.time
                );
            }
            assert_eq!(total, snap.total() as u64, "HQ's total at {}", snap.time);
            live_checks += 1;
            story.step(&format!(
                "snapshot {k} ({}): HQ counts {total} in {} shelters, as the data set",
                snap.time,
                counts.len()
            ));
        }
    }
    assert!(
        per_centre.iter().all(|&n| n >= 2),
        "every centre runs several shelters: {per_centre:?}"
    );
    story.step("every centre syncs; HQ's history at all snapshot times");
    for e in &mut engines {
        sync_in_process(&rt, e);
    }
    hq.sync_once();
    let times: Vec<String> = snapshots.iter().map(|s| s.time.clone()).collect();
    let history = hq.run_json("hq history", &["--at", &times.join(",")]);
    let series: BTreeMap<String, Vec<u64>> = history["shelters"]
        .as_array()
        .expect("history.shelters")
        .iter()
        .map(|s| {
            (
                s["code"].as_str().expect("code").to_owned(),
                s["counts"]
                    .as_array()
                    .expect("counts")
                    .iter()
                    .map(|c| c.as_u64().expect("n"))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        series.len(),
        registry.len(),
        "HQ sees every shelter of the data set"
    );
    let totals: Vec<u64> = history["totals"]
        .as_array()
        .expect("totals")
        .iter()
        .map(|c| c.as_u64().expect("n"))
        .collect();
    for (i, snap) in snapshots.iter().enumerate() {
        for (code, counts) in &series {
            assert_eq!(
                counts[i],
                snap.count(code) as u64,
                "HQ's history of {code} at {}",
                snap.time
            );
        }
        assert_eq!(
            totals[i],
            snap.total() as u64,
            "HQ's total at {}",
            snap.time
        );
    }
    story.step(&format!(
        "checked {} shelters at all {} snapshot times (history) and {live_checks} snapshots live (summary); shelters per centre {per_centre:?}",
        registry.len(),
        snapshots.len()
    ));
}

/// Two reception laptops of one community centre, cut off from each other and from the relay, check
/// in 500 different people each; after reconnecting the roster holds exactly 1,000 evacuees and HQ
/// shows 1,000. Then 20 people are checked in at both desks offline (one desk by card, the other by
/// name and birth date typed differently): each is one evacuee afterwards.
#[test]
fn two_desks_offline_never_lose_or_duplicate_an_evacuee() {
    let _serial = serial();
    let story = Story::new("two_desks_offline_never_lose_or_duplicate_an_evacuee");
    let world = World::new("two-desks");
    let mut relay = world.relay();
    let hq = world.enrolled_facility(&relay, "hq", HQ, "hq");
    let desk_a = world.enrolled_facility(
        &relay,
        "centre-a",
        "御祓地区コミュニティセンター",
        "shelter",
    );
    let desk_b = world.enrolled_device(&relay, &desk_a, "centre-b");
    desk_a.sync_once();
    let sid = desk_a
        .run_ok(
            "shelter open",
            &[
                "--name",
                "御祓地区コミュニティセンター",
                "--capacity",
                "1200",
            ],
        )
        .trim()
        .to_owned();
    desk_a.sync_once();
    desk_b.sync_once();
    assert!(
        desk_b.run_json("shelter roster", &["--shelter", &sid])["evacuees"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );

    story.step("the relay goes down; each desk checks in 500 people");
    relay.kill();
    let rt = runtime();
    let mut a = engine(&desk_a);
    let mut b = engine(&desk_b);
    let t0 = Instant::now();
    for i in 0..1000 {
        let e = if i < 500 { &mut a } else { &mut b };
        let req = CheckIn {
            person: person(
                &format!("避難 太郎{i:04}"),
                &format!("19{:02}-{:02}-{:02}", 30 + i % 60, 1 + i % 12, 1 + i % 28),
            ),
            method: Method::Manual,
            at: None,
        };
        let out = shelter::checkin(e, &sid, &req).expect("check in");
        assert!(!out.reused, "person {i} is new");
    }
    story.step(&format!(
        "1,000 check-ins in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));

    story.step("the relay is back; both desks and HQ sync");
    relay.start();
    for _ in 0..2 {
        sync_in_process(&rt, &mut a);
        sync_in_process(&rt, &mut b);
    }
    hq.sync_once();
    for d in [&desk_a, &desk_b] {
        let roster = d.run_json("shelter roster", &["--shelter", &sid]);
        assert_eq!(
            roster["evacuees"].as_array().map(Vec::len),
            Some(1000),
            "{}'s roster",
            d.name
        );
        assert_eq!(roster["present"].as_u64(), Some(1000));
    }
    let (counts, total) = counts_by_code(&hq_summary(&hq));
    assert_eq!(total, 1000, "HQ shows 1,000: {counts:?}");

    story.step("offline again: 20 people come to both desks");
    relay.kill();
    for i in 0..20 {
        let card = format!("{:064x}", 0xC0FFEE00u64 + i);
        let mut by_card = person(
            &format!("重複 花子{i:02}"),
            &format!("1980-01-{:02}", i + 1),
        );
        by_card.card_id = card;
        shelter::checkin(
            &mut a,
            &sid,
            &CheckIn {
                person: by_card,
                method: Method::MyNumberCard,
                at: None,
            },
        )
        .expect("desk a");
        // Desk B types the name with a full-width space and the date with slashes.
        let typed = person(&format!("重複　花子{i:02}"), &format!("1980/1/{}", i + 1));
        shelter::checkin(
            &mut b,
            &sid,
            &CheckIn {
                person: typed,
                method: Method::Manual,
                at: None,
            },
        )
        .expect("desk b");
    }
    relay.start();
    for _ in 0..2 {
        sync_in_process(&rt, &mut a);
        sync_in_process(&rt, &mut b);
    }
    hq.sync_once();
    let roster = desk_b.run_json("shelter roster", &["--shelter", &sid]);
    let evacuees = roster["evacuees"].as_array().expect("evacuees");
    assert_eq!(
        evacuees.len(),
        1020,
        "20 people checked in at both desks are 20 evacuees"
    );
    assert_eq!(
        roster["records"].as_u64(),
        Some(1040),
        "the document keeps both records of each"
    );
    let twice: Vec<&Value> = evacuees
        .iter()
        .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("重複")))
        .collect();
    assert_eq!(twice.len(), 20);
    for e in &twice {
        assert_eq!(
            e["merged_ids"].as_array().map(Vec::len),
            Some(1),
            "one duplicate merged: {e:#}"
        );
        assert_eq!(
            e["events"].as_array().map(Vec::len),
            Some(2),
            "both check-ins kept: {e:#}"
        );
        assert!(
            e["card_id"].as_str().is_some_and(|c| c.len() == 64),
            "the card id is kept: {e:#}"
        );
    }
    assert_eq!(
        desk_a.run_json("shelter roster", &["--shelter", &sid])["evacuees"]
            .as_array()
            .map(Vec::len),
        Some(1020)
    );
    let (_, total) = counts_by_code(&hq_summary(&hq));
    assert_eq!(total, 1020, "HQ counts each person once");
    story.step("done");
}

/// A person moves: checked in at one shelter, then at a second of the same centre (checked out of the
/// first), then at a third shelter of another centre that cannot see the first two. HQ counts them
/// once, at the latest shelter. A known person checking in again reuses the record.
#[test]
fn a_person_moving_between_shelters_counts_once() {
    let _serial = serial();
    let story = Story::new("a_person_moving_between_shelters_counts_once");
    let world = World::new("moves");
    let relay = world.relay();
    let hq = world.enrolled_facility(&relay, "hq", HQ, "hq");
    let a = world.enrolled_facility(
        &relay,
        "centre-a",
        "御祓地区コミュニティセンター",
        "shelter",
    );
    let b = world.enrolled_facility(
        &relay,
        "centre-b",
        "矢田郷地区コミュニティセンター",
        "shelter",
    );
    a.sync_once();
    b.sync_once();
    let s1 = a
        .run_ok(
            "shelter open",
            &["--name", "山王小学校", "--capacity", "480"],
        )
        .trim()
        .to_owned();
    let s2 = a
        .run_ok(
            "shelter open",
            &["--name", "小丸山小学校", "--capacity", "466"],
        )
        .trim()
        .to_owned();
    let s3 = b
        .run_ok(
            "shelter open",
            &[
                "--name",
                "矢田郷地区コミュニティセンター",
                "--capacity",
                "1700",
            ],
        )
        .trim()
        .to_owned();
    let card = "ab".repeat(32);
    let id1 = a.run_ok(
        "shelter checkin",
        &[
            "--shelter",
            &s1,
            "--name",
            "移動 一郎",
            "--birth",
            "1950-05-05",
            "--card-id",
            &card,
            "--method",
            "transit-card",
        ],
    );
    let again = a.run_ok(
        "shelter checkin",
        &[
            "--shelter",
            &s1,
            "--name",
            "移動　一郎",
            "--birth",
            "1950/5/5",
        ],
    );
    assert_eq!(
        id1.trim(),
        again.trim(),
        "a known person checking in again reuses the record"
    );
    let stay = a.run_json("shelter roster", &["--shelter", &s1]);
    assert_eq!(
        stay["evacuees"][0]["events"].as_array().map(Vec::len),
        Some(1),
        "already present: no second check-in"
    );

    story.step("the person moves to the centre's second shelter");
    let moved = a.run_json(
        "shelter checkin",
        &[
            "--shelter",
            &s2,
            "--name",
            "移動 一郎",
            "--birth",
            "1950-05-05",
            "--card-id",
            &card,
        ],
    );
    assert_eq!(
        moved["moved_from"],
        serde_json::json!([s1]),
        "checked out of the first: {moved:#}"
    );
    assert_eq!(
        a.run_json("shelter roster", &["--shelter", &s1])["present"].as_u64(),
        Some(0)
    );

    story.step("then to a shelter of another centre, which cannot see the first two");
    let other = b.run_json(
        "shelter checkin",
        &[
            "--shelter",
            &s3,
            "--name",
            "移動 一郎",
            "--birth",
            "1950-05-05",
            "--card-id",
            &card,
        ],
    );
    assert_eq!(
        other["reused"], false,
        "centre B has no record of the person"
    );
    assert_eq!(other["moved_from"], serde_json::json!([]));
    a.sync_once();
    b.sync_once();
    hq.sync_once();
    assert_eq!(
        a.run_json("shelter roster", &["--shelter", &s2])["present"].as_u64(),
        Some(1),
        "centre A still counts them at S2"
    );
    let summary = hq_summary(&hq);
    let present: BTreeMap<String, u64> = summary["shelters"]
        .as_array()
        .expect("shelters")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().expect("id").to_owned(),
                s["present"].as_u64().expect("present"),
            )
        })
        .collect();
    assert_eq!(present.get(&s1), Some(&0));
    assert_eq!(
        present.get(&s2),
        Some(&0),
        "HQ counts the person at the latest shelter only: {summary:#}"
    );
    assert_eq!(present.get(&s3), Some(&1));
    assert_eq!(summary["total_present"].as_u64(), Some(1));
    story.step("done");
}

/// Medical notes are for the health section only; HQ's general section reads the roster but not the
/// notes (the relay refuses its pulls, and no key was ever wrapped for it). An HQ facility that enrols
/// later becomes a member of the roster. Safety inquiries answer only for those who consented; exports
/// are well-formed; and no marker string lies in any file of the relay or of a facility.
#[test]
fn medical_notes_inquiry_exports_and_confidentiality() {
    let _serial = serial();
    let story = Story::new("medical_notes_inquiry_exports_and_confidentiality");
    let world = World::new("shelter-confidential");
    let mut relay = world.relay();
    let hq = world.enrolled_facility(&relay, "hq", HQ, "hq");
    let health = world.enrolled_facility(&relay, "hq-health", HQ_HEALTH, "hq");
    let centre =
        world.enrolled_facility(&relay, "centre", "御祓地区コミュニティセンター", "shelter");
    centre.sync_once();
    let sid = centre
        .run_ok(
            "shelter open",
            &[
                "--name",
                "御祓地区コミュニティセンター",
                "--capacity",
                "191",
                "--code",
                "CC0000000504",
                "--health-section",
                HQ_HEALTH,
            ],
        )
        .trim()
        .to_owned();
    let m = |i: u32| format!("SHELTER-MARKER-{i:02}");
    let consenting = format!("開示 同意子{}", m(1));
    let private = format!("非開示 秘匿男{}", m(2));
    let e1 = centre.run_ok(
        "shelter checkin",
        &[
            "--shelter",
            &sid,
            "--name",
            &consenting,
            "--birth",
            "1960-02-02",
            "--kana",
            "カイジ ドウイコ",
            "--consent",
            "--allergies",
            &format!("そば {}", m(3)),
            "--needs",
            "elderly,food-allergy",
        ],
    );
    let e2 = centre.run_ok(
        "shelter checkin",
        &[
            "--shelter",
            &sid,
            "--name",
            &private,
            "--birth",
            "1970-03-03",
            "--address",
            &format!("七尾市一本杉町 {}", m(4)),
        ],
    );
    let (e1, e2) = (e1.trim().to_owned(), e2.trim().to_owned());
    centre.run_ok(
        "shelter medical-note",
        &[
            "--shelter",
            &sid,
            "--evacuee",
            &e1,
            "--conditions",
            &format!("糖尿病 {}", m(5)),
            "--medications",
            &format!("インスリン {}", m(6)),
            "--care-level",
            "要介護2",
        ],
    );
    centre.run_ok(
        "shelter request",
        &[
            "--shelter",
            &sid,
            "--item",
            "毛布",
            "--quantity",
            "50",
            "--unit",
            "枚",
            "--urgency",
            "high",
        ],
    );
    centre.run_ok(
        "shelter needs",
        &["--shelter", &sid, "--add", "仮設トイレ不足"],
    );
    centre.run_ok("shelter leave", &["--shelter", &sid, "--evacuee", &e2]);
    centre.sync_once();
    hq.sync_once();
    health.sync_once();

    story.step("the health section reads the medical notes; HQ's general section cannot");
    let notes = health.run_json("shelter medical", &["--shelter", &sid]);
    assert!(
        notes.to_string().contains(&m(5)),
        "the health section reads the notes: {notes:#}"
    );
    let refused = hq
        .run("shelter medical", &["--shelter", &sid, "--json"])
        .expect_fail();
    assert!(
        refused.stderr.contains("medical") || refused.stderr.contains("key"),
        "{}",
        refused.stderr
    );
    let roster = hq.run_json("shelter roster", &["--shelter", &sid]);
    assert_eq!(
        roster["evacuees"].as_array().map(Vec::len),
        Some(2),
        "HQ reads the roster"
    );
    let medical_doc: DocumentId = roster["shelter"]["medical_doc"]
        .as_str()
        .expect("medical_doc")
        .parse()
        .expect("a document id");
    let roster_doc: DocumentId = sid.parse().expect("shelter id is a document id");
    let nosy = RawClient::join_device_of(&hq);
    assert!(
        nosy.pull_all(roster_doc, Seq(0))
            .is_ok_and(|b| !b.is_empty()),
        "an HQ device pulls the roster"
    );
    match nosy.pull_all(medical_doc, Seq(0)) {
        Err((ErrorCode::NotMember, _)) => {}
        other => panic!("HQ's general section pulled the medical notes: {other:?}"),
    }
    match nosy.request(&Request::GetKeyGrants { doc: medical_doc }) {
        Response::Error {
            code: ErrorCode::NotMember,
            ..
        } => {}
        other => panic!("HQ's general section got the medical notes' keys: {other:?}"),
    }

    story.step("HQ: counts with 外泊, open requests, safety inquiry by consent only");
    let summary = hq_summary(&hq);
    assert_eq!(
        summary["total_present"].as_u64(),
        Some(2),
        "外泊 counts as present: {summary:#}"
    );
    assert_eq!(summary["total_on_leave"].as_u64(), Some(1));
    assert_eq!(summary["open_requests"][0]["item"], "毛布");
    let rid = summary["open_requests"][0]["id"]
        .as_str()
        .expect("request id")
        .to_owned();
    hq.run_ok(
        "shelter request",
        &["--shelter", &sid, "--id", &rid, "--status", "arranged"],
    );
    let found = hq.run_json(
        "hq inquiry",
        &[
            "--name",
            &consenting.replace(' ', "　"),
            "--inquirer",
            "能登 一郎",
            "--relationship",
            "長男",
            "--contact",
            "090-0000-0000",
        ],
    );
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found:#}");
    assert_eq!(found[0]["shelter_name"], "御祓地区コミュニティセンター");
    assert_eq!(
        hq.run_json(
            "hq inquiry",
            &[
                "--name",
                "カイジ ドウイコ",
                "--inquirer",
                "能登 一郎",
                "--relationship",
                "長男",
            ],
        )
        .as_array()
        .map(Vec::len),
        Some(1),
        "by kana too"
    );
    let hidden = hq.run_json(
        "hq inquiry",
        &[
            "--name",
            &private,
            "--inquirer",
            "能登 一郎",
            "--relationship",
            "長男",
        ],
    );
    assert_eq!(hidden, serde_json::json!([]), "no answer without consent");

    story.step("exports: roster CSV and HXL aggregates");
    let exports = world.path().join("exports");
    fs::create_dir_all(&exports).expect("exports dir");
    let roster_csv = exports.join("roster.csv");
    let agg_csv = exports.join("aggregate.csv");
    hq.run_ok(
        "hq export",
        &["--roster", "--out", &roster_csv.to_string_lossy()],
    );
    hq.run_ok(
        "hq export",
        &["--aggregate", "--out", &agg_csv.to_string_lossy()],
    );
    let roster_text = fs::read_to_string(&roster_csv).expect("roster csv");
    assert_eq!(
        roster_text.lines().count(),
        3,
        "header and two evacuees:\n{roster_text}"
    );
    assert!(
        roster_text.contains(&consenting) && roster_text.contains("高齢者"),
        "{roster_text}"
    );
    let agg = fs::read_to_string(&agg_csv).expect("aggregate csv");
    let lines: Vec<&str> = agg.lines().collect();
    assert_eq!(lines.len(), 3, "names, HXL hashtags, one shelter:\n{agg}");
    let tags: Vec<&str> = lines[1].split(',').collect();
    assert!(
        tags.iter().all(|t| t.starts_with('#')),
        "the second row is HXL hashtags: {}",
        lines[1]
    );
    for t in ["#loc+name", "#affected+displaced+ind", "#date", "#org"] {
        assert!(tags.contains(&t), "HXL row lacks {t}: {}", lines[1]);
    }
    let cells: Vec<&str> = lines[2].split(',').collect();
    let col = |t: &str| tags.iter().position(|x| *x == t).expect("tag");
    assert_eq!(cells[col("#loc+name")], "御祓地区コミュニティセンター");
    assert_eq!(cells[col("#affected+displaced+ind")], "2");
    assert_eq!(cells[col("#loc+code")], "CC0000000504");
    for text in [&roster_text, &agg] {
        assert!(
            !text.contains(&m(5)) && !text.contains(&m(6)),
            "medical notes never reach an export"
        );
    }

    story.step("an HQ facility enrolled later becomes a member of the shelter");
    let late = world.enrolled_facility(&relay, "hq-late", "石川県災害対策本部", "hq");
    centre.sync_once();
    centre.sync_once();
    late.sync_once();
    let late_summary = hq_summary(&late);
    assert_eq!(
        late_summary["total_present"].as_u64(),
        Some(2),
        "the late HQ reads the shelter: {late_summary:#}"
    );
    assert!(
        !late
            .run("shelter medical", &["--shelter", &sid])
            .expect_fail()
            .stderr
            .is_empty()
    );

    story.step("grep every file of the relay, the logs and the facilities for the markers");
    relay.kill();
    let needles: Vec<Vec<u8>> = (1..=6)
        .map(|i| m(i).into_bytes())
        .chain([
            consenting.clone().into_bytes(),
            "糖尿病".as_bytes().to_vec(),
        ])
        .collect();
    let logs = world.logs();
    let found = files::grep_tree(&[relay.data.as_path(), logs.as_path()], &needles);
    assert!(
        found.is_empty(),
        "plaintext in the relay's files or logs: {found:#?}"
    );
    for f in [&hq, &health, &centre, &late] {
        let found = files::grep_tree(&[f.data.as_path()], &needles);
        assert!(
            found.is_empty(),
            "plaintext in {}'s data directory: {found:#?}\n{}",
            f.name,
            files::listing(&f.data)
        );
    }
    story.step("done");
}

// --- relatives' e-mail ------------------------------------------------------------------------------------

/// The loopback SMTP server (Debian's python3-aiosmtpd, `tests/smtp/sink.py`); killed on drop.
struct Smtp {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Smtp {
    fn new(world: &World) -> Smtp {
        Smtp {
            port: free_port(),
            dir: world.path().join("smtp-received"),
            log: world.logs().join("smtp.log"),
            child: None,
        }
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let script = repo_root().join("tests/smtp/sink.py");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("smtp log");
        // Debian's interpreter, where python3-aiosmtpd installs (a pyenv `python3` may come first on PATH).
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let mut child = Command::new(python)
            .arg(&script)
            .arg("127.0.0.1")
            .arg(self.port.to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (needs python3 and python3-aiosmtpd)",
                    script.display()
                )
            });
        let port = self.port;
        poll_until("the SMTP sink to listen", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the SMTP sink exited ({status}); is python3-aiosmtpd installed?\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Message-IDs of every message the server accepted, with how often each arrived.
    fn received(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for f in files::walk(&self.dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        {
            let text = fs::read_to_string(&f).expect("read a saved message");
            let id = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Message-ID:")
                        .or_else(|| l.strip_prefix("Message-Id:"))
                })
                .unwrap_or_else(|| panic!("{} has no Message-ID:\n{text}", f.display()))
                .trim()
                .to_owned();
            *out.entry(id).or_default() += 1;
        }
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mail_status(f: &Facility) -> Vec<Value> {
    f.run_json("mail status", &[])
        .as_array()
        .cloned()
        .expect("mail status is a list")
}

fn states(f: &Facility) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in mail_status(f) {
        *out.entry(r["state"].as_str().expect("state").to_owned())
            .or_default() += 1;
    }
    out
}

fn send(f: &Facility, smtp: &Smtp, fault: Option<&str>, wait: u64) -> musubi_tests::Output {
    let mut cmd = f.command(
        "mail send",
        &["--smtp", &smtp.addr(), "--wait", &wait.to_string()],
    );
    if let Some(point) = fault {
        cmd.env(musubi_facility::mail::FAULT_ENV, point);
    }
    musubi_tests::run_command(cmd, musubi_tests::COMMAND_TIMEOUT)
}

/// Relatives' notifications arrive exactly once each at a real SMTP server: while the server is down
/// they wait and are retried with backoff; a sender killed before the end of DATA sends again; a sender
/// killed after the server accepted (before recording it) does not send again, and says so.
#[test]
fn relatives_are_mailed_exactly_once() {
    let _serial = serial();
    let story = Story::new("relatives_are_mailed_exactly_once");
    let world = World::new("mail");
    let relay = world.relay();
    let centre =
        world.enrolled_facility(&relay, "centre", "御祓地区コミュニティセンター", "shelter");
    let sid = centre
        .run_ok("shelter open", &["--name", "御祓地区コミュニティセンター"])
        .trim()
        .to_owned();
    let mut smtp = Smtp::new(&world);
    let checkin = |name: &str, birth: &str, relatives: &[&str]| -> String {
        let mut args = vec!["--shelter", sid.as_str(), "--name", name, "--birth", birth];
        for r in relatives {
            args.extend(["--relative", r]);
        }
        centre.run_ok("shelter checkin", &args).trim().to_owned()
    };

    story.step("three check-ins with four relatives while the SMTP server is down");
    checkin(
        "通知 一郎MAILMARK",
        "1950-01-01",
        &[
            "通知 花子:hanako.mailmark@example.jp",
            "通知 次郎:jiro@example.jp",
        ],
    );
    let e2 = checkin("通知 二郎", "1951-01-01", &["通知 三郎:saburo@example.jp"]);
    checkin("通知 四郎", "1952-01-01", &["通知 五郎:goro@example.jp"]);
    checkin("通知 無縁", "1953-01-01", &[]);
    assert_eq!(states(&centre), BTreeMap::from([("queued".to_owned(), 4)]));
    let failed = send(&centre, &smtp, None, 0).expect_fail();
    assert!(failed.stderr.contains("still wait"), "{}", failed.stderr);
    assert!(
        mail_status(&centre)
            .iter()
            .all(|r| r["attempts"].as_u64() >= Some(1) && r["state"] == "queued")
    );

    story.step("the sender keeps retrying with backoff; the server comes up after 3 s");
    let mut waiting = centre.command("mail send", &["--smtp", &smtp.addr(), "--wait", "90"]);
    waiting.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = waiting.spawn().expect("start mail send --wait");
    std::thread::sleep(Duration::from_secs(3));
    smtp.start();
    let status = poll_until(
        "mail send --wait to finish",
        Duration::from_secs(90),
        || child.try_wait().ok().flatten(),
    );
    assert!(
        status.success(),
        "mail send --wait delivered everything and exited 0"
    );
    assert_eq!(smtp.received().len(), 4, "{:?}", smtp.received());
    assert_eq!(states(&centre), BTreeMap::from([("sent".to_owned(), 4)]));

    story.step("sending again sends nothing; a second check-in while present queues nothing");
    send(&centre, &smtp, None, 0).expect_ok();
    checkin("通知 二郎", "1951-01-01", &[]);
    assert_eq!(mail_status(&centre).len(), 4);

    story.step("killed after the server accepted, before recording: not sent again");
    centre.run_ok("shelter checkout", &["--shelter", &sid, "--evacuee", &e2]);
    checkin("通知 二郎", "1951-01-01", &[]); // a new stay: a new notification
    let killed = send(&centre, &smtp, Some("abort-after-smtp-accept"), 0).expect_fail();
    assert!(
        killed.stderr.contains("fault injection"),
        "{}",
        killed.stderr
    );
    assert_eq!(
        smtp.received().len(),
        5,
        "the server has the new stay's message"
    );
    assert_eq!(
        states(&centre).get("unconfirmed"),
        Some(&1),
        "{:?}",
        mail_status(&centre)
    );
    let after = send(&centre, &smtp, None, 0).expect_ok();
    assert!(after.contains("unconfirmed 1"), "{after}");
    assert_eq!(
        smtp.received().len(),
        5,
        "an unconfirmed message is not sent twice"
    );

    story.step("killed before the end of DATA: sent again, once");
    checkin("通知 六郎", "1954-01-01", &["通知 七子:nanako@example.jp"]);
    let killed = send(&centre, &smtp, Some("abort-before-data-end"), 0).expect_fail();
    assert!(
        killed.stderr.contains("fault injection"),
        "{}",
        killed.stderr
    );
    assert_eq!(
        smtp.received().len(),
        5,
        "the server discarded the unfinished message"
    );
    send(&centre, &smtp, None, 0).expect_ok();
    let received = smtp.received();
    assert_eq!(received.len(), 6, "{received:?}");
    assert!(
        received.values().all(|&n| n == 1),
        "every Message-ID arrived exactly once: {received:?}"
    );
    let total_files = files::walk(&smtp.dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .count();
    assert_eq!(total_files, 6, "no message arrived twice");

    story.step("a check-in whose notification was never queued (a crash in between) is caught up");
    checkin("通知 八郎", "1955-01-01", &["通知 九子:kyuko@example.jp"]);
    let db = rusqlite::Connection::open(centre.data.join("facility.db"))
        .expect("open the facility database");
    let dropped = db
        .execute("DELETE FROM mail_outbox WHERE state = 'queued'", [])
        .expect("drop the queued row");
    assert_eq!(dropped, 1);
    drop(db);
    let caught = send(&centre, &smtp, None, 0);
    assert!(
        caught.stderr.contains("queued 1 notification"),
        "{}",
        caught.stderr
    );
    caught.expect_ok();
    let received = smtp.received();
    assert_eq!(received.len(), 7, "{received:?}");
    assert!(
        received.values().all(|&n| n == 1),
        "every Message-ID arrived exactly once: {received:?}"
    );
    send(&centre, &smtp, None, 0).expect_ok();
    assert_eq!(
        smtp.received().len(),
        7,
        "catching up twice queues nothing new"
    );

    story.step("the outbox is sealed at rest");
    let needles: Vec<Vec<u8>> = [
        "MAILMARK",
        "hanako.mailmark",
        "通知 花子",
        "saburo@example.jp",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let found = files::grep_tree(&[centre.data.as_path()], &needles);
    assert!(
        found.is_empty(),
        "plaintext of a notification on disk: {found:#?}"
    );
    let sample = files::walk(&smtp.dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|x| x == "eml"))
        .expect("a message");
    let text = fs::read_to_string(sample).expect("read");
    assert!(text.contains("Subject:"), "{text}");
    story.step("done");
}
