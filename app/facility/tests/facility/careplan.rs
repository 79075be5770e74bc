//! ケアプラン between a care-management office and the family doctor's clinic: the services the
//! desktop app's care-plan commands call, with 第2表 reordered by placements while the clinic
//! edits, and every entry attributed to the facility and staff member who wrote it.

use musubi_crdt::documents::careplan::{ItemKind, Placement, PlanField, Service, Sheet1};
use musubi_crdt::ids::{FacilityRole, Role};
use musubi_facility::services::careplan::{self, LogInput};

use super::two::{carry, pair};

const OFFICE: &str = "みなと居宅介護支援事業所";
const CLINIC: &str = "港診療所";

fn needs(site: &super::two::Site, id: &str) -> Vec<String> {
    careplan::show(&site.engine, id, None)
        .expect("show")
        .plan
        .needs
        .into_iter()
        .map(|n| n.text)
        .collect()
}

#[test]
fn the_care_manager_reorders_needs_while_the_doctor_edits_and_both_survive() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let (mut office, mut clinic) = pair(
        root.path(),
        (OFFICE, FacilityRole::CareOffice),
        (CLINIC, FacilityRole::Clinic),
    );
    let mut sheet = Sheet1::default();
    sheet
        .set(PlanField::ResidentName, "山田 花子")
        .expect("name");
    sheet.set(PlanField::CareLevel, "要介護2").expect("level");
    sheet.set(PlanField::CreatedOn, "2025-04-01").expect("date");
    let id = careplan::create(
        &mut office.engine,
        &sheet,
        Some((&clinic.facility.to_string(), Role::Writer)),
    )
    .expect("create the plan")
    .to_string();

    // Needs placed first, last, before and after others.
    let bath = careplan::add_need(&mut office.engine, &id, "入浴", &Placement::Last).expect("need");
    let meals =
        careplan::add_need(&mut office.engine, &id, "食事", &Placement::Last).expect("need");
    let walk =
        careplan::add_need(&mut office.engine, &id, "歩行", &Placement::First).expect("need");
    let meds = careplan::add_need(
        &mut office.engine,
        &id,
        "服薬",
        &Placement::After(walk.clone()),
    )
    .expect("need");
    assert_eq!(needs(&office, &id), ["歩行", "服薬", "入浴", "食事"]);
    careplan::move_item(&mut office.engine, &id, &meals, &Placement::First).expect("move");
    careplan::move_item(&mut office.engine, &id, &walk, &Placement::Last).expect("move");
    careplan::move_item(
        &mut office.engine,
        &id,
        &bath,
        &Placement::Before(meds.clone()),
    )
    .expect("move");
    assert_eq!(needs(&office, &id), ["食事", "入浴", "服薬", "歩行"]);
    // A prefix of at least 4 characters names an item.
    careplan::move_item(&mut office.engine, &id, &meds[..6], &Placement::First).expect("prefix");
    assert_eq!(needs(&office, &id), ["服薬", "食事", "入浴", "歩行"]);

    // Goals and a service under the need; the service's fields are edited by key.
    let (long, kind) = careplan::add_goal(
        &mut office.engine,
        &id,
        &bath,
        "週2回入浴できる",
        "2025-04〜2026-03",
        &Placement::Last,
    )
    .expect("long-term goal");
    assert_eq!(kind, ItemKind::LongTermGoal);
    let (short, kind) = careplan::add_goal(
        &mut office.engine,
        &id,
        &long,
        "介助で入浴する",
        "2025-04〜2025-09",
        &Placement::Last,
    )
    .expect("short-term goal");
    assert_eq!(kind, ItemKind::ShortTermGoal);
    let service = careplan::add_service(
        &mut office.engine,
        &id,
        &short,
        &Service {
            content: "入浴介助".into(),
            kind: "訪問介護".into(),
            frequency: "週2回".into(),
            ..Service::default()
        },
        &Placement::Last,
    )
    .expect("service");
    careplan::edit_item(&mut office.engine, &id, &service, "insured", "true").expect("insured");
    assert!(careplan::edit_item(&mut office.engine, &id, &service, "colour", "x").is_err());
    assert!(
        careplan::move_item(
            &mut office.engine,
            &id,
            &service,
            &Placement::Before(bath.clone())
        )
        .is_err(),
        "a service moves only among the services of its goal"
    );

    // 支援経過 by the care manager, attributed to her and her office.
    careplan::log(
        &mut office.engine,
        &id,
        &LogInput {
            date: "2025-04-03".into(),
            category: "訪問".into(),
            text: "自宅を訪問し、計画を説明した。".into(),
            ..LogInput::default()
        },
        "佐藤 ケア子",
    )
    .expect("log");
    let version =
        careplan::record_version(&mut office.engine, &id, "初回", "佐藤 ケア子").expect("version");
    assert_eq!(version, 1);

    // The clinic gets the plan; offline, the doctor edits the bath need's text while the care
    // manager moves it to the top. Both survive, and the need is there once.
    let doc = office.engine.document_info(&id).expect("info").id;
    carry(&office, &mut clinic, doc);
    assert_eq!(careplan::list(&clinic.engine).expect("list").len(), 1);
    careplan::edit_item(&mut clinic.engine, &id, &bath, "text", "入浴（見守りで）").expect("edit");
    careplan::comment(
        &mut clinic.engine,
        &id,
        Some(&bath),
        "血圧が高い日は清拭に。",
        "山本 医師",
    )
    .expect("comment");
    careplan::move_item(&mut office.engine, &id, &bath, &Placement::First).expect("move");
    carry(&clinic, &mut office, doc);
    carry(&office, &mut clinic, doc);
    for site in [&office, &clinic] {
        assert_eq!(
            needs(site, &id),
            ["入浴（見守りで）", "服薬", "食事", "歩行"]
        );
    }
    let plan = careplan::show(&office.engine, &id, None)
        .expect("show")
        .plan;
    let log = &plan.support_log[0];
    assert_eq!(
        (log.author.staff.as_str(), log.author.facility_name.as_str()),
        ("佐藤 ケア子", OFFICE)
    );
    let comment = &plan.comments[0];
    assert_eq!(comment.author.staff, "山本 医師");
    assert_eq!(comment.author.facility_name, CLINIC);
    assert_eq!(comment.about, bath);
    assert!(plan.needs[0].goals[0].short_goals[0].services[0].insured);

    // Version 1 reads as it was: before the doctor's edit and the last moves.
    let v1 = careplan::show(&office.engine, &id, Some(1))
        .expect("version 1")
        .plan;
    assert_eq!(
        v1.needs.iter().map(|n| n.text.as_str()).collect::<Vec<_>>(),
        ["服薬", "食事", "入浴", "歩行"]
    );
}
