//! The desktop app's start with a full store: cold start of the real `musubi-desktop` to an
//! interactive window with 1,000 care plans in its store, and the app's memory (peak and steady RSS).
//!
//! Usage: `cargo run --release -p musubi-tests --bin bench-desktop [DOCS]` (DOCS: care plans in the
//! store, default 1000). Needs what the end-to-end tests need: Xvfb, WebKitWebDriver, tauri-driver in
//! `target/tools/bin`, and the built binaries of the same profile
//! (`cargo build --release --workspace --bins`, after `npm run build` in frontend/).
//!
//! Steps: a relay; the app's first run through its screens (facility, invite, staff, sign in); the app
//! closes; the CLI `musubi` writes DOCS care plans into the same data directory; then, timed from the
//! WebDriver "new session" request that spawns the app (a cold start: a new process, its store on
//! disk, the page cache warm as on any second start of a day):
//! - to the unlock screen being interactive (its passphrase input shown),
//! - unlock and sign in, to the main screen,
//! - the care plan list showing all DOCS rows.
//!
//! Memory: `VmHWM` (peak RSS) of the app process, and `VmRSS` of the app and of its WebKit processes
//! after 10 s idle on the list. Prints figures; asserts nothing about them.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use musubi_tests::World;
use musubi_tests::desktop::{
    DesktopApp, FirstRun, Launch, Screen, UI_TIMEOUT, WORK_TIMEOUT, exe_of, sel, testid,
};
use musubi_tests::measure::{human_bytes, ms};

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn kib(k: u64) -> String {
    human_bytes(k as f64 * 1024.0)
}

fn name_of(pid: u32) -> String {
    exe_of(pid)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let docs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("DOCS is a number"))
        .unwrap_or(1000);
    let world = World::new("bench-desktop");
    let relay = world.relay();
    let desk = world.facility("desk");
    let run = FirstRun::new(
        "みなと居宅介護支援事業所",
        desk.passphrase(),
        &relay.invite_facility("みなと居宅介護支援事業所", "care-office"),
    );

    println!("desktop app start with {docs} care plans in its store");
    let mut first = DesktopApp::launch(Launch::new("bench-first-run", &desk.data, &world.logs()));
    let (_, to_first) = first.wait_first_screen();
    first.sign_in_through_ui(&run);
    println!(
        "  first run: first screen {} after spawn (empty store)",
        ms(to_first)
    );
    first.close();
    drop(first);

    let t = Instant::now();
    for i in 0..docs {
        desk.run_ok(
            "careplan create",
            &[
                "--resident",
                &format!("利用者 {i:04}"),
                "--care-level",
                "要介護2",
                "--planner",
                "佐藤 ケア子",
            ],
        );
        if (i + 1) % 100 == 0 {
            eprintln!(
                "  {} care plans written ({:.1} s)",
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "  store: {docs} care plans written by the CLI in {:.1} s; data dir {}",
        t.elapsed().as_secs_f64(),
        human_bytes(musubi_tests::files::tree_bytes(&desk.data) as f64)
    );

    let mut app = DesktopApp::launch(Launch::new("bench", &desk.data, &world.logs()));
    let session = app.session_started_in;
    let (screen, to_interactive) = app.wait_first_screen();
    assert_eq!(
        screen,
        Screen::Unlock,
        "the second start shows the unlock screen"
    );
    let t = Instant::now();
    app.type_into(sel::UNLOCK_PASSPHRASE, &run.passphrase);
    app.click(sel::UNLOCK);
    app.wait_for(sel::LOGIN, WORK_TIMEOUT);
    let unlock = t.elapsed();
    let t = Instant::now();
    app.type_into(sel::LOGIN, &run.staff_login);
    app.type_into(sel::PASSWORD, &run.staff_password);
    app.click(sel::SIGN_IN);
    app.wait_for(sel::NAV_ANY, WORK_TIMEOUT);
    let sign_in = t.elapsed();
    let t = Instant::now();
    app.open_section("careplan");
    app.wait_until(
        &format!("{docs} rows in the care plan list"),
        Duration::from_secs(300),
        || (app.count(&testid("plan-row")) >= docs).then_some(()),
    );
    let list = t.elapsed();
    app.screenshot("plan-list");
    let hwm_after_list = status_kib(app.pid(), "VmHWM:").unwrap_or(0);
    thread::sleep(Duration::from_secs(10));
    app.wait_for(sel::NAV_ANY, UI_TIMEOUT);
    println!(
        "  cold start (spawn → WebDriver session ready, the app process up): {}",
        ms(session)
    );
    println!(
        "  cold start (spawn → unlock screen interactive):                  {}",
        ms(to_interactive)
    );
    println!(
        "  unlock (scrypt log_n {}, open store) → sign-in screen:             {}",
        musubi_tests::desktop::APP_SCRYPT_LOG_N,
        ms(unlock)
    );
    println!(
        "  sign in → main screen:                                           {}",
        ms(sign_in)
    );
    println!(
        "  care plan list with {docs} rows shown:                           {}",
        ms(list)
    );
    println!(
        "  spawn → list of {docs} plans, user's typing included:            {}",
        ms(app.launched_at().elapsed() - Duration::from_secs(10))
    );
    let hwm = status_kib(app.pid(), "VmHWM:").unwrap_or(0);
    println!(
        "  app process peak RSS (VmHWM): {} (at the list: {})",
        kib(hwm),
        kib(hwm_after_list)
    );
    let mut total = 0;
    for pid in app.process_tree() {
        let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
        total += rss;
        println!(
            "  steady RSS after 10 s idle: {:>10}  {} (pid {pid})",
            kib(rss),
            name_of(pid)
        );
    }
    println!("  steady RSS, app + WebKit processes: {}", kib(total));
    app.close();
}
