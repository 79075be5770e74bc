//! The desktop app (issue: the Tauri app), end to end: the real `musubi-desktop` under Xvfb, driven
//! through tauri-driver and WebKitWebDriver, against a real relay and another facility run by the CLI.
//! Each story starts with the app's first run, done through its screens as a person would (create
//! the facility, paste the invite, create the first staff account, sign in), and saves a screenshot of
//! each screen to `ci-artifacts/screenshots/`.
//!
//! Needs Xvfb, WebKitWebDriver (webkit2gtk-driver), tauri-driver in `target/tools/bin` and the built app
//! (`scripts/test.sh` provides them all); a missing one fails the story with a sentence saying so.

use std::time::Duration;

use musubi_tests::desktop::{
    DesktopApp, FirstRun, Launch, SYNC_WAIT, UI_TIMEOUT, WORK_TIMEOUT, exe_of, sel, testid,
};
use musubi_tests::{Facility, World, poll_every, referral_bundle_path};
use serde_json::Value;

use super::{CLINIC_A, HOSPITAL_B, Story, serial};

/// The selectors of the domain screens the stories use, in one place to follow the screens
/// (`frontend/src/screens/`): the shell's navigation, then each screen's own.
mod ui {
    /// The 紹介状 (referral) section (`nav-referral`).
    pub const REFERRAL: &str = "referral";
    /// The care plan section.
    pub const CAREPLAN: &str = "careplan";
    /// The reception (避難所受付) section.
    pub const RECEPTION: &str = "reception";
    /// The 災害対策本部 (HQ) section.
    pub const HQ: &str = "hq";
    /// The settings (設定) section.
    pub const SETTINGS: &str = "settings";

    /// HQ: a shelter's row in the table of every shelter.
    pub const HQ_ROW: &str = "[data-testid=hq-row]";
    /// Settings: this device's key fingerprint.
    pub const FINGERPRINT: &str = "[data-testid=fingerprint]";

    /// A letter in the referral inbox (the link in its row, which opens it).
    pub const REFERRAL_ROW: &str = "[data-testid=referral-row] a";

    /// Reception: the form that opens a shelter (shown while this facility has none): its name.
    pub const SHELTER_NAME: &str = "#shelter-name";
    /// Reception: the opened shelter's capacity.
    pub const SHELTER_CAPACITY: &str = "#shelter-capacity";
    /// Reception: open the shelter.
    pub const SHELTER_OPEN: &str = "shelter-open";
    /// Reception: start the desk of an open shelter (when the facility has some already).
    pub const DESK_OPEN: &str = "desk-open";
    /// Reception: the desk's search field (name, kana or card).
    pub const SEARCH: &str = "#reception-search";
    /// Reception: a new evacuee (opens the check-in form with what was typed in the search).
    pub const NEW_EVACUEE: &str = "new-evacuee-open";
    /// Reception: the check-in form's 氏名.
    pub const EVACUEE_NAME: &str = "#evacuee-name";
    /// Reception: the check-in form's 生年月日 (needed without a card).
    pub const EVACUEE_BIRTH: &str = "#evacuee-birth";
    /// Reception: check in.
    pub const CHECKIN_SUBMIT: &str = "checkin-submit";
    /// Reception: the "checked in" confirmation.
    pub const CHECKIN_DONE: &str = "[data-testid=checkin-done]";
    /// Reception: the head count of the shelter.
    pub const PRESENT: &str = "[data-testid=shelter-present]";

    /// Care plans: a plan in the list (the link in its row, which opens it).
    pub const PLAN_ROW: &str = "[data-testid=plan-row] a";
    /// Care plans: 第1表 総合的な援助の方針 in the editor.
    pub const PLAN_POLICY: &str = "[data-field=policy]";
    /// Care plans: the editor's save state ("保存済み", ...).
    pub const PLAN_SAVE_STATE: &str = "[data-testid=save-state]";
}

/// The patient of the real JP eReferral Bundle (`referral_bundle_path()`).
const PATIENT: &str = "田中 太郎";
const SHELTER: &str = "御祓地区コミュニティセンター";
const HQ: &str = "七尾市災害対策本部";
const OFFICE: &str = "みなと居宅介護支援事業所";
const RESIDENT: &str = "山田 花子";
const EVACUEE: &str = "結び 花子";

/// The app on `desk`'s data directory (which the app's first run initialises), screenshots named `story`.
fn launch(world: &World, desk: &Facility, story: &str) -> DesktopApp {
    DesktopApp::launch(Launch::new(story, &desk.data, &world.logs()))
}

/// Closes the app and checks that nothing of it is left running (app, WebKit processes, drivers).
fn close_and_check_gone(mut app: DesktopApp) {
    let tree = app.process_tree();
    app.close();
    drop(app);
    let alive: Vec<String> = tree
        .iter()
        .filter_map(|p| {
            let exe = exe_of(*p)?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let state = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_owned();
            (state != "Z").then(|| format!("{p} {}", exe.display()))
        })
        .collect();
    assert!(
        alive.is_empty(),
        "processes of the app are left running after it closed: {alive:?}"
    );
}

/// Waits until the status bar shows nothing pending (everything the app wrote is at the relay).
fn wait_nothing_pending(app: &DesktopApp) {
    app.wait_until(
        "the status bar to show 0 changes pending",
        SYNC_WAIT,
        || (app.pending() == Some(0)).then_some(()),
    );
}

/// Waits until the reception's head count shows `n`.
fn wait_present(app: &DesktopApp, n: u64) {
    app.wait_until(&format!("the head count to show {n}"), UI_TIMEOUT, || {
        (app.text_of(ui::PRESENT)?.trim().parse::<u64>().ok()? == n).then_some(())
    });
}

#[test]
fn desktop_referral_from_a_clinic_appears_in_the_inbox_without_a_restart() {
    let _serial = serial();
    let story = Story::new("desktop: referral inbox");
    let world = World::new("desktop-referral");
    let relay = world.relay();
    let desk = world.facility("hospital-desk");
    let mut app = launch(&world, &desk, "referral");
    let (first, after) = app.wait_first_screen();
    story.step(&format!(
        "the app shows its {} screen {after:?} after launch",
        first.name()
    ));

    story.step("first run through the screens: facility, invite, first staff account, sign in");
    let invite = relay.invite_facility(HOSPITAL_B, "clinic");
    app.sign_in_through_ui(&FirstRun::new(HOSPITAL_B, desk.passphrase(), &invite));
    app.wait_for(sel::SYNC_STATE, UI_TIMEOUT);

    story.step(
        "a clinic (CLI) joins while the app runs; the hospital's desk opens its 紹介状 inbox",
    );
    let clinic = world.enrolled_facility(&relay, "clinic-a", CLINIC_A, "clinic");
    clinic.sync_once();
    app.open_section(ui::REFERRAL);
    app.screenshot("inbox-empty");

    story.step("the clinic imports the real FHIR Bundle and sends it to the hospital");
    let id = clinic.import_fhir(HOSPITAL_B, &referral_bundle_path());
    clinic.sync_once();

    story.step("the letter appears in the open inbox, with no restart and no click");
    app.wait_for_text(PATIENT, SYNC_WAIT);
    app.screenshot("inbox-letter");

    story.step("the clerk opens it");
    app.click_text(ui::REFERRAL_ROW, PATIENT);
    let letter = clinic.show(&id);
    let purpose = letter
        .get("purpose")
        .or_else(|| letter.get("紹介目的"))
        .and_then(Value::as_str)
        .map(|s| s.lines().next().unwrap_or(s).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("the clinic's letter has no 紹介目的: {letter:#}"));
    app.wait_for_text(&purpose, UI_TIMEOUT);
    app.wait_for_text(PATIENT, UI_TIMEOUT);
    app.screenshot("letter");
    close_and_check_gone(app);
}

#[test]
fn desktop_check_in_at_the_reception_reaches_hq() {
    let _serial = serial();
    let story = Story::new("desktop: reception check-in");
    let world = World::new("desktop-reception");
    let relay = world.relay();
    story.step("HQ (CLI) is enrolled first, so the shelter's documents name it as a member");
    let hq = world.enrolled_facility(&relay, "hq", HQ, "hq");
    let desk = world.facility("shelter-desk");
    let mut app = launch(&world, &desk, "reception");

    story.step("first run through the screens");
    let invite = relay.invite_facility(SHELTER, "shelter");
    app.sign_in_through_ui(&FirstRun::new(SHELTER, desk.passphrase(), &invite));

    story.step("reception: open the shelter (none is open yet)");
    app.open_section(ui::RECEPTION);
    app.wait_until("the reception screen", UI_TIMEOUT, || {
        (app.visible(ui::SHELTER_NAME)
            || app.visible(&testid(ui::DESK_OPEN))
            || app.visible(ui::SEARCH))
        .then_some(())
    });
    if app.visible(ui::SHELTER_NAME) {
        app.type_into(ui::SHELTER_NAME, SHELTER);
        app.type_into(ui::SHELTER_CAPACITY, "480");
        app.screenshot("open-shelter");
        app.click_testid(ui::SHELTER_OPEN);
    } else if app.visible(&testid(ui::DESK_OPEN)) {
        app.click_testid(ui::DESK_OPEN);
    }
    app.wait_for(ui::SEARCH, WORK_TIMEOUT);
    wait_present(&app, 0);
    app.screenshot("desk");

    story.step("a resident with no card is looked up by name, not found, and checked in");
    app.type_into(ui::SEARCH, EVACUEE);
    app.click_testid(ui::NEW_EVACUEE);
    app.wait_for(ui::EVACUEE_NAME, UI_TIMEOUT);
    app.type_into(ui::EVACUEE_NAME, EVACUEE);
    app.type_into(ui::EVACUEE_BIRTH, "1950-01-02");
    app.screenshot("check-in-form");
    app.click_testid(ui::CHECKIN_SUBMIT);
    app.wait_for(ui::CHECKIN_DONE, WORK_TIMEOUT);
    wait_present(&app, 1);
    app.wait_for_text(EVACUEE, UI_TIMEOUT);
    app.screenshot("checked-in");
    wait_nothing_pending(&app);

    story.step("HQ (CLI) sees the shelter's head count");
    let summary = poll_every(
        "HQ's summary to count the evacuee checked in at the app",
        SYNC_WAIT,
        Duration::from_millis(500),
        &mut || {
            hq.sync_once();
            let s = hq.run_json("hq summary", &[]);
            (s["total_present"].as_u64() == Some(1)).then_some(s)
        },
    );
    let shelters = summary["shelters"].as_array().cloned().unwrap_or_default();
    assert!(
        shelters
            .iter()
            .any(|s| s["name"].as_str() == Some(SHELTER) && s["present"].as_u64() == Some(1)),
        "HQ counts 1 person at {SHELTER}: {summary:#}"
    );

    story.step("the app's own 災害対策本部 screen lists the shelter with its count");
    app.open_section(ui::HQ);
    app.wait_for_text_in(ui::HQ_ROW, SHELTER, WORK_TIMEOUT);
    app.screenshot("hq");

    story.step("settings show this device's key fingerprint and the relay");
    app.open_section(ui::SETTINGS);
    app.wait_until("the key fingerprint", UI_TIMEOUT, || {
        // Eight groups of four hex digits: the first 16 bytes of BLAKE3 over the device's keys.
        let f: String = app
            .text_of(ui::FINGERPRINT)?
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        (f.len() == 32 && f.chars().all(|c| c.is_ascii_hexdigit())).then_some(())
    });
    app.screenshot("settings");
    close_and_check_gone(app);
}

#[test]
fn desktop_care_plan_edit_made_while_the_relay_is_down_reaches_the_office() {
    let _serial = serial();
    let story = Story::new("desktop: care plan offline edit");
    let world = World::new("desktop-careplan");
    let mut relay = world.relay();
    let office = world.enrolled_facility(&relay, "care-office", OFFICE, "care-office");
    let desk = world.facility("clinic-desk");
    let mut app = launch(&world, &desk, "careplan");

    story.step("first run through the screens (the family doctor's clinic)");
    let invite = relay.invite_facility(CLINIC_A, "clinic");
    app.sign_in_through_ui(&FirstRun::new(CLINIC_A, desk.passphrase(), &invite));

    story.step("the care office (CLI) writes a plan and shares it with the clinic as a writer");
    office.sync_once();
    let plan = office
        .run_ok(
            "careplan create",
            &[
                "--resident",
                RESIDENT,
                "--care-level",
                "要介護2",
                "--planner",
                "佐藤 ケア子",
                "--with",
                CLINIC_A,
                "--role",
                "writer",
            ],
        )
        .trim()
        .to_owned();
    office.sync_once();

    story.step("the plan arrives in the app's list");
    app.open_section(ui::CAREPLAN);
    app.wait_until("the plan in the list", SYNC_WAIT, || {
        app.texts_of(ui::PLAN_ROW)
            .iter()
            .any(|t| t.contains(RESIDENT))
            .then_some(())
    });
    app.screenshot("plan-list");
    app.click_text(ui::PLAN_ROW, RESIDENT);
    app.wait_for(ui::PLAN_POLICY, WORK_TIMEOUT);
    app.screenshot("plan-open");

    story.step("the relay goes down; the doctor writes 総合的な援助の方針 in the app");
    relay.kill();
    let policy = "退院後は週2回の訪問看護で服薬を確認します（結び e2e）。";
    app.type_into(ui::PLAN_POLICY, policy);
    app.js(
        "const e = document.querySelector(arguments[0]); if (e) e.blur(); return true;",
        vec![serde_json::json!(ui::PLAN_POLICY)],
    );
    app.wait_until(
        "the edit to be saved locally and queued",
        WORK_TIMEOUT,
        || app.pending().filter(|n| *n > 0),
    );
    if app.visible(ui::PLAN_SAVE_STATE) {
        story.step(&format!(
            "save state: {}",
            app.text_of(ui::PLAN_SAVE_STATE).unwrap_or_default()
        ));
    }
    app.screenshot("offline-edit-pending");

    story.step("the relay comes back on the same port and keys; the app pushes on its own");
    relay.start();
    wait_nothing_pending(&app);
    app.screenshot("synced");

    story.step("the office (CLI) reads the doctor's words");
    poll_every(
        "the office to see the policy written in the app",
        SYNC_WAIT,
        Duration::from_millis(500),
        &mut || {
            office.sync_once();
            let v = office.run_json("careplan show", &[&plan]);
            v["sheet1"]["policy"]
                .as_str()
                .is_some_and(|p| p.contains(policy))
                .then_some(())
        },
    );
    close_and_check_gone(app);
}
