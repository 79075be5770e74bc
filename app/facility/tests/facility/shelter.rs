//! 避難所受付 and 災害対策本部: the reception desk (search, care flags, consent, who recorded a stay)
//! and HQ's cached world, on one device enrolled by hand.

use std::collections::BTreeSet;
use std::path::Path;

use musubi_crdt::documents::shelter::{
    self as schema, CareFlag, Method, NewEvacuee, Presence, ShelterStatus, StayKind,
};
use musubi_crdt::ids::FacilityRole;
use musubi_facility::Engine;
use musubi_facility::offline::OfflineDeployment;
use musubi_facility::services::hq::{self, World};
use musubi_facility::services::shelter::{self, CheckIn, Desk, OpenShelter, search_fold};

/// A device of a new facility named `name`, enrolled in a deployment of its own (certified by an
/// in-process authority), with the pseudonym keys of its role.
pub(crate) fn enrolled(dir: &Path, name: &str, role: FacilityRole) -> Engine {
    let engine = Engine::init(dir, name, "correct horse battery", 10).expect("init a device");
    let mut deployment = OfflineDeployment::new(4);
    let facility = deployment.add_facility(&engine, name, role);
    deployment
        .enrol(&engine, facility)
        .expect("record the enrolment");
    engine
}

fn person(name: &str, kana: &str, birth: &str) -> NewEvacuee {
    NewEvacuee {
        name: name.into(),
        kana: kana.into(),
        birth_date: birth.into(),
        ..NewEvacuee::default()
    }
}

fn open_shelter(engine: &mut Engine) -> musubi_crdt::ids::DocumentId {
    shelter::open(
        engine,
        &OpenShelter {
            name: "御祓地区コミュニティセンター".into(),
            address: "七尾市".into(),
            capacity: 120,
            ..OpenShelter::default()
        },
    )
    .expect("open a shelter")
    .shelter
}

fn checkin(desk: &mut Desk, p: NewEvacuee, at: &str) -> String {
    desk.checkin(&CheckIn {
        person: p,
        method: Method::Manual,
        at: Some(at.into()),
    })
    .expect("check in")
    .evacuee
}

#[test]
fn reception_finds_people_by_kana_and_keeps_care_flags_consent_and_who_did_it() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut engine = enrolled(
        &tmp.path().join("centre"),
        "御祓地区",
        FacilityRole::Shelter,
    );
    let doc = open_shelter(&mut engine);

    // Reception checks three people in; the clerk's name goes on every stay event.
    let mut desk = Desk::open(&engine, doc).expect("open the desk");
    desk.set_staff(" 受付 花子 ");
    let yamada = checkin(
        &mut desk,
        person("山田 太郎", "ヤマダ タロウ", "1950-01-02"),
        "2024-01-09T09:00:00+09:00",
    );
    let tanaka = checkin(
        &mut desk,
        person("田中 花", "たなか はな", "1990/3/4"),
        "2024-01-09T09:05:00+09:00",
    );
    let smith = checkin(
        &mut desk,
        person("John SMITH", "", "1985-05-06"),
        "2024-01-09T09:10:00+09:00",
    );
    desk.commit(&mut engine).expect("commit the check-ins");

    // Search ignores hiragana/katakana, width, case and spaces; best match first.
    assert_eq!(search_fold("ﾔﾏﾀﾞ　タロウ"), "やまだたろう");
    let ids = |q: &str| -> Vec<String> { desk.search(q, 10).into_iter().map(|r| r.id).collect() };
    assert_eq!(
        ids("やまだ"),
        vec![yamada.clone()],
        "hiragana finds katakana kana"
    );
    assert_eq!(
        ids("ﾀﾅｶ"),
        vec![tanaka.clone()],
        "half-width katakana finds hiragana"
    );
    assert_eq!(
        ids("ＳＭＩＴＨ"),
        vec![smith.clone()],
        "full-width finds Latin, any case"
    );
    assert_eq!(
        ids("1950/1/2"),
        vec![yamada.clone()],
        "a date finds the birth date"
    );
    assert!(
        ids("").is_empty() && ids("  ").is_empty(),
        "an empty query finds nobody"
    );
    assert!(ids("佐藤").is_empty());
    let both = ids("た");
    assert_eq!(both.len(), 2, "た is in both kana: {both:?}");
    assert_eq!(
        both[0], tanaka,
        "a prefix match ranks before a substring match"
    );
    assert_eq!(desk.search("た", 1).len(), 1, "the limit holds");

    // 要配慮: flags are set exactly (added and removed); consent is recorded; a leave counts.
    let set: BTreeSet<CareFlag> = [CareFlag::Elderly, CareFlag::MedicalCare].into();
    assert!(desk.set_flags(&yamada, &set).expect("set flags"));
    assert!(!desk.set_flags(&yamada, &set).expect("set the same flags"));
    let fewer: BTreeSet<CareFlag> = [CareFlag::Elderly].into();
    assert!(desk.set_flags(&yamada, &fewer).expect("remove a flag"));
    assert!(desk.set_consent(&tanaka, true).expect("consent"));
    desk.stay(&tanaka, StayKind::Leave, Method::Manual, None, "")
        .expect("外泊");
    desk.stay(&smith, StayKind::CheckOut, Method::Manual, None, "")
        .expect("退所");
    desk.commit(&mut engine).expect("commit the edits");

    let view = desk.view();
    assert_eq!(
        (
            view.counts.present,
            view.counts.on_leave,
            view.counts.out,
            view.counts.care,
            view.counts.capacity
        ),
        (2, 1, 1, 1, 120)
    );
    assert_eq!(
        view.evacuees.iter().map(|r| r.presence).collect::<Vec<_>>(),
        vec![Presence::Present, Presence::OnLeave, Presence::Out],
        "present first, then on leave, then out"
    );

    // A fresh desk (another screen, or after a restart) reads the same from the store.
    let again = Desk::open(&engine, doc).expect("reopen the desk");
    assert_eq!(again.view().counts, view.counts);
    let y = again.evacuee(&yamada).expect("山田 is on the roster");
    assert_eq!(y.evacuee.flags, fewer, "the removed flag stays removed");
    let t = again.row(&tanaka).expect("田中 is on the roster");
    assert!(t.consent);
    assert_eq!(t.presence, Presence::OnLeave);
    assert!(
        y.evacuee.events.iter().all(|e| e.staff == "受付 花子"),
        "every stay event names the clerk: {:?}",
        y.evacuee.events
    );

    // A closed shelter takes no check-ins.
    shelter::set_status(&mut engine, &doc.to_string(), ShelterStatus::Closed, None)
        .expect("close the shelter");
    let closed = Desk::open(&engine, doc).expect("open the desk of a closed shelter");
    let err = closed.ensure_open().expect_err("closed");
    assert!(err.to_string().contains("closed"), "{err}");
}

#[test]
fn removing_a_care_flag_removes_it_from_duplicate_records_of_two_offline_desks() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut engine = enrolled(
        &tmp.path().join("centre"),
        "御祓地区",
        FacilityRole::Shelter,
    );
    let doc = open_shelter(&mut engine);
    // Two desks registered the same person offline, each with its own flag.
    let mut loaded = engine.load(doc).expect("load");
    for (id, flag) in [
        ("aaaaaaaa00000001", CareFlag::Elderly),
        ("bbbbbbbb00000002", CareFlag::Disability),
    ] {
        let mut p = person("能登 一郎", "のと いちろう", "1940-04-01");
        p.flags = [flag].into();
        schema::add_evacuee(&mut loaded.doc, id, &p, "2024-01-09T10:00:00+09:00")
            .expect("add a record");
    }
    engine.commit(&mut loaded).expect("commit both records");

    let mut desk = Desk::open(&engine, doc).expect("open the desk");
    let view = desk.view();
    assert_eq!((view.counts.evacuees, view.counts.records), (1, 2));
    let row = &view.evacuees[0];
    assert_eq!(
        row.flags,
        [CareFlag::Elderly, CareFlag::Disability].into(),
        "flags merge as a union"
    );
    // Reception clears 障害者 using the id of the merged-away record: it goes from both.
    let keep: BTreeSet<CareFlag> = [CareFlag::Elderly].into();
    assert!(
        desk.set_flags("bbbbbbbb00000002", &keep)
            .expect("set flags")
    );
    desk.commit(&mut engine).expect("commit");
    let again = Desk::open(&engine, doc).expect("reopen");
    assert_eq!(again.view().evacuees[0].flags, keep);
    // Consent merges as "all records consent": setting it covers both records.
    let mut desk = again;
    assert!(desk.set_consent("aaaaaaaa00000001", true).expect("consent"));
    desk.commit(&mut engine).expect("commit");
    let again = Desk::open(&engine, doc).expect("reopen");
    assert!(again.view().evacuees[0].consent);
}

#[test]
fn hq_keeps_its_world_until_a_shelter_changes_and_answers_the_same_from_it() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut engine = enrolled(
        &tmp.path().join("hq"),
        "七尾市災害対策本部",
        FacilityRole::Hq,
    );
    let doc = open_shelter(&mut engine);
    let mut desk = Desk::open(&engine, doc).expect("open the desk");
    let mut p = person("山田 太郎", "ヤマダ タロウ", "1950-01-02");
    p.consent = true;
    checkin(&mut desk, p, "2024-01-09T09:00:00+09:00");
    desk.commit(&mut engine).expect("commit");

    let world = World::load(&engine).expect("load the world");
    assert!(world.is_current(&engine).expect("check"));
    let summary = hq::summarise(&world, None).expect("summary");
    assert_eq!(summary.total_present, 1);
    assert_eq!(
        hq::inquiry_of(&world, "やまだ たろう").len(),
        1,
        "hiragana finds the katakana kana"
    );
    assert!(
        hq::inquiry_of(&world, "やまだ").is_empty(),
        "never a partial match"
    );
    let asker = hq::Inquirer {
        name: "山田 花子".into(),
        relationship: "妻".into(),
        contact: "0767-52-0000".into(),
    };
    assert_eq!(
        hq::inquiry_of(&world, "山田太郎").len(),
        hq::inquiry(&engine, "山田太郎", &asker)
            .expect("inquiry")
            .len()
    );
    assert!(
        hq::inquiry(&engine, "山田太郎", &hq::Inquirer::default()).is_err(),
        "an inquiry records who asks"
    );
    let recorded = musubi_facility::audit::list(
        &engine,
        &musubi_facility::audit::Filter {
            action: Some(musubi_crdt::audit::AuditAction::SafetyInquiry),
            ..Default::default()
        },
    )
    .expect("audit");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        recorded[0].fields,
        [
            "inquirer=山田 花子",
            "relationship=妻",
            "contact=0767-52-0000",
            "answers=1"
        ]
    );
    let times = vec![
        "2024-01-09T08:00:00+09:00".to_owned(),
        "2024-01-09T10:00:00+09:00".into(),
    ];
    assert_eq!(
        hq::history_of(&world, &times).expect("history").totals,
        vec![0, 1]
    );
    let mut a = Vec::new();
    let mut b = Vec::new();
    hq::export_roster_of(&world, &mut a).expect("export from the world");
    hq::export_roster(&engine, &mut b).expect("export from the engine");
    assert_eq!(a, b);

    // Another check-in is a new bundle: the world is out of date until loaded again.
    checkin(
        &mut desk,
        person("田中 花", "タナカ ハナ", "1990-03-04"),
        "2024-01-09T09:30:00+09:00",
    );
    desk.commit(&mut engine).expect("commit");
    assert!(!world.is_current(&engine).expect("check"));
    let world = World::load(&engine).expect("reload");
    assert!(world.is_current(&engine).expect("check"));
    assert_eq!(
        hq::summarise(&world, None).expect("summary").total_present,
        2
    );
    // A second shelter is a new document: out of date too.
    open_shelter(&mut engine);
    assert!(!world.is_current(&engine).expect("check"));
}
