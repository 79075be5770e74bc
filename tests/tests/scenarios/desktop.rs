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
use musubi_tests::vcard::harness::{Pcscd, VCard, run_with_stdin};
use musubi_tests::{Facility, World, poll_every, referral_bundle_path, run_command};
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

    /// Settings: a new staff account's login, name and password, and the button that adds it.
    pub const NEW_STAFF_LOGIN: &str = "#new-staff-login";
    /// Settings: a new staff account's name.
    pub const NEW_STAFF_NAME: &str = "#new-staff-name";
    /// Settings: a new staff account's password.
    pub const NEW_STAFF_PASSWORD: &str = "#new-staff-password";
    /// Settings: add the staff account.
    pub const ADD_STAFF: &str = "add-staff";
    /// Settings: the account was added.
    pub const STAFF_ADDED: &str = "[data-testid=staff-added]";
    /// The shell: sign out.
    pub const SIGN_OUT: &str = "sign-out";
    /// The shell: lock the screen now (画面をロック).
    pub const LOCK_NOW: &str = "lock-screen-now";
    /// The lock screen (画面ロック中), which covers everything while a session is locked.
    pub const LOCK_SCREEN: &str = "[data-testid=lock-screen]";
    /// The work screens (hidden, not drawn, while locked).
    pub const WORK: &str = "[data-testid=work]";
    /// Sign-in: the staff card path (職員カードでログイン) and its PIN.
    pub const CARD_MODE: &str = "sign-in-card-mode";
    /// Sign-in: the staff card's PIN.
    pub const PIN: &str = "#sign-in-pin";
    /// Sign-in: the card reader's state on the card path.
    pub const CARD_READER: &str = "[data-testid=card-reader]";

    /// Settings → 監査ログ: the tamper check's verdict (`data-state` intact or broken).
    pub const AUDIT_VERDICT: &str = "[data-testid=audit-verdict]";
    /// Settings → 監査ログ: check again.
    pub const AUDIT_VERIFY: &str = "audit-verify";
    /// Settings → 監査ログ: the action filter.
    pub const AUDIT_ACTION: &str = "#audit-action";
    /// Settings → 監査ログ: show the entries that match the filters.
    pub const AUDIT_APPLY: &str = "audit-apply";
    /// Settings → 監査ログ: clear the filters (and show every entry).
    pub const AUDIT_RESET: &str = "audit-reset";
    /// Settings → 監査ログ: an entry (`data-action` its stable name).
    pub const AUDIT_ROW: &str = "[data-testid=audit-row]";
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

/// The idle time of the staff-session stories (`MUSUBI_IDLE_LOCK_SECS`): short, so the lock comes
/// within the story, and long enough that no step of it is idle that long.
const IDLE_SECS: u64 = 15;

/// The app on `desk`'s data directory, its session locking after [`IDLE_SECS`] without input.
fn launch_idle(world: &World, desk: &Facility, story: &str) -> DesktopApp {
    let mut launch = Launch::new(story, &desk.data, &world.logs());
    launch
        .env
        .push(("MUSUBI_IDLE_LOCK_SECS".into(), IDLE_SECS.to_string().into()));
    DesktopApp::launch(launch)
}

/// The value of the field `css` (null when there is none).
fn value_of(app: &DesktopApp, css: &str) -> Option<String> {
    app.js(
        "const e = document.querySelector(arguments[0]); return e ? e.value : null;",
        vec![serde_json::json!(css)],
    )
    .as_str()
    .map(str::to_owned)
}

/// Scrolls `css` into the middle of its scrolling box, then clicks it (a form with an error above
/// its button may be taller than the window; WebKitWebDriver does not scroll nested boxes itself).
fn press(app: &DesktopApp, css: &str) {
    app.wait_for(css, UI_TIMEOUT);
    app.js(
        "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView({ block: 'center' }); return true;",
        vec![serde_json::json!(css)],
    );
    app.click(css);
}

/// Scrolls `css` to the top of its scrolling box (for a screenshot of it).
fn show(app: &DesktopApp, css: &str) {
    app.js(
        "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView({ block: 'start' }); return true;",
        vec![serde_json::json!(css)],
    );
}

/// Submits the sign-in form with `login` and `password` and waits for the answer: the main screen,
/// or an alert (the form clears the password when it refuses); returns the alert.
fn sign_in_once(app: &DesktopApp, login: Option<&str>, password: &str) -> Option<String> {
    if let Some(login) = login {
        app.type_into(sel::LOGIN, login);
    }
    app.type_into(sel::PASSWORD, password);
    press(app, sel::SIGN_IN);
    app.wait_until("the answer to the sign-in", WORK_TIMEOUT, || {
        if app.visible(sel::NAV_ANY) {
            return Some(None);
        }
        let cleared = value_of(app, sel::PASSWORD).is_some_and(|v| v.is_empty());
        app.alert().filter(|_| cleared).map(Some)
    })
}

/// `musubi SUB --data DIR ARGS` on the app's own data directory, as the staff member `login`.
fn cli_as(desk: &Facility, run: &FirstRun, sub: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = desk.command(sub, args);
    cmd.env("MUSUBI_STAFF", &run.staff_login)
        .env("MUSUBI_STAFF_PASSWORD", &run.staff_password);
    cmd
}

/// The app's audit log as `musubi audit list --json` prints it (the administrator signed in).
fn audit_list(desk: &Facility, run: &FirstRun) -> Vec<Value> {
    let out = run_command(
        cli_as(desk, run, "audit list", &["--json"]),
        Duration::from_secs(120),
    )
    .expect_ok();
    serde_json::from_str::<Vec<Value>>(&out)
        .unwrap_or_else(|e| panic!("`audit list --json` printed no JSON list ({e}):\n{out}"))
}

/// Entries of `log` with `action` by `staff`.
fn entries<'a>(log: &'a [Value], action: &str, staff: &str) -> Vec<&'a Value> {
    log.iter()
        .filter(|e| e["action"] == action && e["staff"] == staff)
        .collect()
}

/// Staff sessions (issue 12) in the real app: a colleague's repeated wrong passwords pause sign-in
/// and say so; the administrator's session locks after the idle time, hiding everything, and
/// signing in again finds the draft as it was; the administrator's 監査ログ screen lists the failed
/// sign-ins, the lock and the sign-ins, and shows the log verified; `musubi audit verify` agrees.
#[test]
fn desktop_lockout_idle_lock_and_the_audit_log_screen() {
    let _serial = serial();
    let story = Story::new("desktop: staff sessions and the audit log");
    let world = World::new("desktop-sessions");
    let relay = world.relay();
    let desk = world.facility("clinic-desk");
    let mut app = launch_idle(&world, &desk, "sessions");

    story.step("first run through the screens; the first account (佐藤) is the administrator");
    let invite = relay.invite_facility(CLINIC_A, "clinic");
    let run = FirstRun::new(CLINIC_A, desk.passphrase(), &invite);
    app.sign_in_through_ui(&run);

    story.step("the administrator adds 田中 (職員) in 設定, then signs out");
    app.open_section(ui::SETTINGS);
    app.type_into(ui::NEW_STAFF_LOGIN, "tanaka");
    app.type_into(ui::NEW_STAFF_NAME, "田中 次郎");
    app.type_into(ui::NEW_STAFF_PASSWORD, "tanaka password 1");
    app.click_testid(ui::ADD_STAFF);
    app.wait_for(ui::STAFF_ADDED, WORK_TIMEOUT);
    app.click_testid(ui::SIGN_OUT);
    app.wait_for(sel::LOGIN, UI_TIMEOUT);

    story.step("田中 mistypes the password five times; then even the right one is paused");
    for i in 0..5 {
        let alert = sign_in_once(&app, Some("tanaka"), &format!("wrong password {i}"))
            .unwrap_or_else(|| app.fail("a wrong password signed 田中 in"));
        assert!(
            alert.contains("ログインIDまたはパスワードが違います"),
            "wrong password {i}: {alert}"
        );
    }
    let alert = sign_in_once(&app, Some("tanaka"), "tanaka password 1")
        .unwrap_or_else(|| app.fail("the right password was not paused after five wrong ones"));
    assert!(
        alert.contains("サインインをしばらく停止しています") && alert.contains("秒ほど待って"),
        "the pause is said, with how long: {alert}"
    );
    app.screenshot("sign-in-paused");

    story.step("the administrator signs in and starts adding an account (a draft)");
    assert_eq!(
        sign_in_once(&app, Some(&run.staff_login), &run.staff_password),
        None,
        "the administrator is not paused"
    );
    app.open_section(ui::SETTINGS);
    let draft = "下書き 花子";
    app.type_into(ui::NEW_STAFF_NAME, draft);
    let typed = std::time::Instant::now();

    story.step(&format!(
        "nobody touches the app: after {IDLE_SECS} s the lock screen covers everything"
    ));
    app.wait_for(ui::LOCK_SCREEN, Duration::from_secs(IDLE_SECS + 30));
    let after = typed.elapsed();
    assert!(
        after >= Duration::from_secs(IDLE_SECS - 1),
        "the session locked after {after:?}, before the idle time of {IDLE_SECS} s"
    );
    assert!(!app.visible(ui::WORK), "the work screens are not drawn");
    assert!(!app.visible(sel::NAV_ANY), "the navigation is hidden");
    assert!(!app.visible(ui::NEW_STAFF_NAME), "the form is hidden");
    assert!(
        !app.text().contains(draft),
        "the draft is not on screen while locked"
    );
    assert!(app.shows("佐藤 一郎 さんの画面はロックされています"));
    app.screenshot("locked");

    story.step(
        "the administrator signs in again: the settings screen and the draft are as they were",
    );
    assert_eq!(value_of(&app, sel::LOGIN).as_deref(), Some("sato"));
    assert_eq!(sign_in_once(&app, None, &run.staff_password), None);
    app.wait_for(ui::NEW_STAFF_NAME, UI_TIMEOUT);
    assert_eq!(value_of(&app, ui::NEW_STAFF_NAME).as_deref(), Some(draft));
    assert!(!app.visible(ui::LOCK_SCREEN));

    story.step(
        "監査ログ: the check passes; the failed sign-ins, the lock and the sign-ins are listed",
    );
    app.click_testid(ui::AUDIT_VERIFY);
    app.wait_for(
        &format!("{}[data-state=intact]", ui::AUDIT_VERDICT),
        WORK_TIMEOUT,
    );
    app.click_testid(ui::AUDIT_RESET);
    let row = |action: &str| format!("{}[data-action={action}]", ui::AUDIT_ROW);
    app.wait_until("the lock in the list", WORK_TIMEOUT, || {
        (app.count(&row("lock")) >= 1).then_some(())
    });
    let failed = app.texts_of(&row("sign-in-failed"));
    assert_eq!(
        failed.len(),
        6,
        "five wrong passwords and one paused: {failed:?}"
    );
    assert!(failed.iter().all(|t| t.contains("tanaka")), "{failed:?}");
    assert_eq!(
        failed.iter().filter(|t| t.contains("停止中")).count(),
        1,
        "one refusal while paused: {failed:?}"
    );
    let locks = app.texts_of(&row("lock"));
    assert!(
        locks
            .iter()
            .any(|t| t.contains("佐藤 一郎") && t.contains("無操作")),
        "the idle lock, the administrator's: {locks:?}"
    );
    let sign_ins = app.texts_of(&row("sign-in"));
    assert!(
        sign_ins.iter().filter(|t| t.contains("佐藤 一郎")).count() >= 3,
        "the first, the one after the pause and the one after the lock: {sign_ins:?}"
    );
    show(&app, "[data-testid=audit-list]");
    app.screenshot("audit-log");

    story.step("only the failed sign-ins, by the action filter");
    app.set_value(ui::AUDIT_ACTION, "sign-in-failed");
    app.click_testid(ui::AUDIT_APPLY);
    app.wait_until("only failed sign-ins listed", WORK_TIMEOUT, || {
        (app.count(ui::AUDIT_ROW) == 6 && app.count(&row("sign-in-failed")) == 6).then_some(())
    });
    show(&app, "[data-testid=audit-list]");
    app.screenshot("audit-failed-sign-ins");

    story.step("`musubi audit verify` and `audit list` on the app's data directory agree");
    let verify = run_command(
        cli_as(&desk, &run, "audit verify", &["--json"]),
        Duration::from_secs(120),
    )
    .expect_ok();
    let verdict: Value = serde_json::from_str(&verify)
        .unwrap_or_else(|e| panic!("`audit verify --json` printed no JSON ({e}):\n{verify}"));
    assert_eq!(verdict["ok"], true, "{verdict:#}");
    let log = audit_list(&desk, &run);
    assert_eq!(entries(&log, "sign-in-failed", "tanaka").len(), 6);
    assert!(
        entries(&log, "lock", &run.staff_login)
            .iter()
            .any(|e| e["fields"] == serde_json::json!(["idle"])),
        "the idle lock is in the log"
    );
    assert!(!entries(&log, "audit-read", &run.staff_login).is_empty());
    close_and_check_gone(app);
}

/// The staff card in the real app (issue 12), with a real pcscd, the vpcd reader and the card
/// emulator: the administrator binds a transit card with a staff PIN (`musubi staff bind-card` on
/// the app's data directory), locks the screen, and opens it with the card: a wrong PIN says how
/// many tries are left, the right one signs in and is recorded as a card sign-in.
#[test]
fn desktop_a_staff_card_and_its_pin_open_the_lock_screen() {
    let _serial = serial();
    let story = Story::new("desktop: staff card sign-in");
    let world = World::new("desktop-card");
    let relay = world.relay();
    let mut pcscd = Pcscd::start(&world);
    let mut vcard = VCard::start(&world, pcscd.port(), "vcard");
    let desk = world.facility("clinic-desk");
    let mut app = launch(&world, &desk, "card");

    story.step("first run through the screens");
    let invite = relay.invite_facility(CLINIC_A, "clinic");
    let run = FirstRun::new(CLINIC_A, desk.passphrase(), &invite);
    app.sign_in_through_ui(&run);

    story.step("the administrator locks the screen and binds a transit card with a staff PIN");
    app.click_testid(ui::LOCK_NOW);
    app.wait_for(ui::LOCK_SCREEN, UI_TIMEOUT);
    assert!(!app.visible(ui::WORK));
    vcard.insert("sato-suica", "felica");
    run_with_stdin(
        cli_as(
            &desk,
            &run,
            "staff bind-card",
            &["--login", &run.staff_login, "--timeout", "20"],
        ),
        &format!("{}\n97531\n", run.staff_password),
        Duration::from_secs(120),
    )
    .expect_ok();

    story.step("the card path of the lock screen shows the reader; a wrong PIN is refused");
    app.click_testid(ui::CARD_MODE);
    app.wait_for(ui::PIN, UI_TIMEOUT);
    app.wait_until("the reader to be ready", WORK_TIMEOUT, || {
        app.visible(&format!("{}[data-available=true]", ui::CARD_READER))
            .then_some(())
    });
    app.type_into(ui::PIN, "11111");
    press(&app, sel::SIGN_IN);
    let alert = app.wait_until("the wrong PIN's answer", WORK_TIMEOUT, || {
        app.alert().filter(|a| a.contains("暗証番号が違います"))
    });
    assert!(
        alert.contains("あと4回"),
        "the tries left are said: {alert}"
    );
    app.screenshot("card-wrong-pin");

    story.step("the card and its PIN open the lock screen");
    app.type_into(ui::PIN, "97531");
    press(&app, sel::SIGN_IN);
    app.wait_for(sel::NAV_ANY, WORK_TIMEOUT);
    assert!(!app.visible(ui::LOCK_SCREEN));
    app.screenshot("card-signed-in");

    story.step("an unknown card is refused");
    app.click_testid(ui::LOCK_NOW);
    app.wait_for(ui::LOCK_SCREEN, UI_TIMEOUT);
    vcard.insert("stranger", "felica");
    app.click_testid(ui::CARD_MODE);
    app.type_into(ui::PIN, "97531");
    press(&app, sel::SIGN_IN);
    app.wait_until("the unknown card's answer", WORK_TIMEOUT, || {
        app.alert()
            .filter(|a| a.contains("この端末の職員アカウントに登録されていません"))
    });
    app.screenshot("card-unknown");

    story.step("the log has the card sign-in and the wrong PIN");
    let log = audit_list(&desk, &run);
    assert!(
        entries(&log, "sign-in", &run.staff_login)
            .iter()
            .any(|e| e["fields"] == serde_json::json!(["card"])),
        "a card sign-in is recorded"
    );
    assert!(
        entries(&log, "sign-in-failed", &run.staff_login)
            .iter()
            .any(|e| e["fields"] == serde_json::json!(["card"])),
        "the wrong PIN is recorded"
    );
    close_and_check_gone(app);
    vcard.remove();
    pcscd.stop();
}
