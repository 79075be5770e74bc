//! The real desktop app (`musubi-desktop`) driven through WebDriver: an Xvfb display, `tauri-driver`
//! (which starts Debian's `WebKitWebDriver`, which starts the app) and a W3C session (fantoccini).
//!
//! One [`DesktopApp`] is one run of the app: its own X display, its own driver on free ports, and the
//! environment the app reads (`MUSUBI_DATA` in the world's directory, `MUSUBI_LAN=0`,
//! `MUSUBI_SCRYPT_LOG_N=12`). The environment travels tauri-driver → WebKitWebDriver → app;
//! [`DesktopApp::launch`] checks that it arrived by reading the app's `/proc/PID/environ`.
//! Dropping it ends the session (which closes the app), stops the driver with SIGTERM (it then kills
//! WebKitWebDriver), kills whatever of that process tree is left, and stops Xvfb.
//!
//! Missing pieces fail with a sentence naming the fix, never a skip: no Xvfb, no `tauri-driver`
//! (`cargo install tauri-driver --locked --root target/tools`), no `WebKitWebDriver`
//! (`apt-get install webkit2gtk-driver`), or no built app (`cargo build -p musubi-desktop`).
//!
//! Run loop: nothing is async for the caller; the WebDriver client lives on a small tokio runtime that
//! each call blocks on. Waits poll with deadlines and panic with the screen's text and a screenshot.
//! Every step can save a PNG to `ci-artifacts/screenshots/STORY-NN-STEP.png` at the repository root.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::{bin, bin_dir, free_port, repo_root};

/// How long a screen may take to show an element or a text after the previous step.
pub const UI_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a step that does real work behind the screen (creating keys, joining the relay) may take.
pub const WORK_TIMEOUT: Duration = Duration::from_secs(90);

/// How long data may take to travel between the app and another facility through the relay.
pub const SYNC_WAIT: Duration = Duration::from_secs(120);

/// The scrypt work factor the app wraps its keys with in the tests (`MUSUBI_SCRYPT_LOG_N`).
pub const APP_SCRYPT_LOG_N: u8 = 12;

/// The size of the virtual screen (and of the app's window, which the config sets to 1280×800).
pub const SCREEN: &str = "1280x800x24";

/// The stable selectors of the session screens and the shell, which the UI is built to.
pub mod sel {
    /// First run: the facility (device) name.
    pub const FACILITY_NAME: &str = "#facility-name";
    /// First run: the passphrase.
    pub const PASSPHRASE: &str = "#passphrase";
    /// First run: the passphrase again.
    pub const PASSPHRASE_CONFIRM: &str = "#passphrase-confirm";
    /// First run: create the facility's keys.
    pub const CREATE_FACILITY: &str = "[data-testid=create-facility]";
    /// Unlock: the passphrase.
    pub const UNLOCK_PASSPHRASE: &str = "#unlock-passphrase";
    /// Unlock: the button.
    pub const UNLOCK: &str = "[data-testid=unlock]";
    /// Join: the invite code.
    pub const INVITE: &str = "#invite";
    /// Join: the button.
    pub const JOIN: &str = "[data-testid=join]";
    /// First staff account: login id.
    pub const STAFF_LOGIN: &str = "#staff-login";
    /// First staff account: display name.
    pub const STAFF_NAME: &str = "#staff-name";
    /// First staff account: password.
    pub const STAFF_PASSWORD: &str = "#staff-password";
    /// First staff account: the button.
    pub const CREATE_STAFF: &str = "[data-testid=create-staff]";
    /// Sign in: login id.
    pub const LOGIN: &str = "#login";
    /// Sign in: password.
    pub const PASSWORD: &str = "#password";
    /// Sign in: the button.
    pub const SIGN_IN: &str = "[data-testid=sign-in]";
    /// Any entry of the main navigation (shown once signed in).
    pub const NAV_ANY: &str = "[data-testid^=nav-]";
    /// The status bar's sync state.
    pub const SYNC_STATE: &str = "[data-testid=sync-state]";
    /// The status bar's count of changes not yet at the relay.
    pub const SYNC_PENDING: &str = "[data-testid=sync-pending]";
    /// The status bar's "sync now" button.
    pub const SYNC_NOW: &str = "[data-testid=sync-now]";
}

/// The CSS selector of `[data-testid=ID]`.
pub fn testid(id: &str) -> String {
    format!("[data-testid=\"{id}\"]")
}

/// The screens of the session flow, as [`DesktopApp::screen`] recognises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Screen {
    /// Signed in: the navigation is shown.
    Main,
    /// First run: create the facility's keys.
    FirstRun,
    /// Unlock the keys with the passphrase.
    Unlock,
    /// Join the relay with an invite code.
    Join,
    /// Create the first staff account.
    FirstStaff,
    /// Sign in as a staff member.
    SignIn,
}

impl Screen {
    const ALL: [(Screen, &'static str); 6] = [
        (Screen::Main, sel::NAV_ANY),
        (Screen::FirstRun, sel::FACILITY_NAME),
        (Screen::Unlock, sel::UNLOCK_PASSPHRASE),
        (Screen::Join, sel::INVITE),
        (Screen::FirstStaff, sel::STAFF_LOGIN),
        (Screen::SignIn, sel::LOGIN),
    ];

    /// A short name for screenshots and messages.
    pub fn name(self) -> &'static str {
        match self {
            Screen::Main => "main",
            Screen::FirstRun => "first-run",
            Screen::Unlock => "unlock",
            Screen::Join => "join",
            Screen::FirstStaff => "first-staff",
            Screen::SignIn => "sign-in",
        }
    }
}

/// What the first run of the app is given: the facility's name and passphrase, the invite, the first
/// staff account.
#[derive(Clone, Debug)]
pub struct FirstRun {
    /// `#facility-name`.
    pub facility_name: String,
    /// `#passphrase` (and its confirmation; also the unlock passphrase).
    pub passphrase: String,
    /// `#invite`: a code from `musubi-node invite`.
    pub invite: String,
    /// `#staff-login` and `#login`.
    pub staff_login: String,
    /// `#staff-name`.
    pub staff_name: String,
    /// `#staff-password` and `#password`.
    pub staff_password: String,
}

impl FirstRun {
    /// A first run for facility `name` with `invite`, a passphrase and a staff account made up for it.
    pub fn new(name: &str, passphrase: &str, invite: &str) -> Self {
        Self {
            facility_name: name.to_owned(),
            passphrase: passphrase.to_owned(),
            invite: invite.to_owned(),
            staff_login: "sato".to_owned(),
            staff_name: "佐藤 一郎".to_owned(),
            staff_password: "staff password 2025!".to_owned(),
        }
    }
}

// --- the pieces: Xvfb, tauri-driver, the binaries ---

/// The `tauri-driver` binary: `$TAURI_DRIVER`, else `target/tools/bin/tauri-driver` (where
/// `scripts/test.sh` installs it), else one on `PATH`. Panics saying how to install it.
pub fn tauri_driver_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TAURI_DRIVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "TAURI_DRIVER names {}, which does not exist",
            p.display()
        );
        return p;
    }
    let mut candidates = Vec::new();
    if let Some(target) = bin_dir().parent() {
        candidates.push(target.join("tools/bin/tauri-driver"));
    }
    candidates.push(repo_root().join("target/tools/bin/tauri-driver"));
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    which("tauri-driver").unwrap_or_else(|| {
        panic!(
            "tauri-driver is missing (looked in {} and PATH): install it with \
             `cargo install tauri-driver --locked --root target/tools` (scripts/test.sh does)",
            candidates[0].display()
        )
    })
}

/// The app binary `musubi-desktop` of this build. Panics saying how to build it.
pub fn app_path() -> PathBuf {
    let p = bin_dir().join("musubi-desktop");
    assert!(
        p.is_file(),
        "the desktop app {} is missing: build it with `cargo build -p musubi-desktop` \
         (after `npm ci && npm run build` in frontend/, since it embeds frontend/dist)",
        p.display()
    );
    bin("musubi-desktop")
}

/// A program on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// The parent pid of `pid` from `/proc/PID/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every living descendant of `pid` (children, grandchildren, ...).
pub fn descendants(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| Some((p, parent_of(p)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut found = BTreeSet::from([pid]);
    loop {
        let before = found.len();
        for (p, pp) in &all {
            if found.contains(pp) {
                found.insert(*p);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&pid);
    found.into_iter().collect()
}

/// The executable of `pid` (`/proc/PID/exe`).
pub fn exe_of(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The environment of `pid` as `KEY=VALUE` strings (`/proc/PID/environ`).
pub fn environ_of(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An Xvfb X server on a display number it picks itself (`-displayfd`).
pub struct Xvfb {
    child: Child,
    /// `:N`, for `DISPLAY`.
    pub display: String,
}

impl Xvfb {
    /// Starts `Xvfb -displayfd 1 -screen 0 1280x800x24 -nolisten tcp`, its stderr to `log`.
    pub fn start(log: &Path) -> Self {
        let xvfb = which("Xvfb").unwrap_or_else(|| {
            panic!(
                "no display server: Xvfb is missing; install it with `apt-get install xvfb xauth` \
                 (scripts/test.sh does)"
            )
        });
        let mut child = Command::new(&xvfb)
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                SCREEN,
                "-nolisten",
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(log).expect("create the Xvfb log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", xvfb.display()));
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let n: u32 = match line.trim().parse() {
            Ok(n) => n,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no display server: Xvfb did not print its display number within 20 s; its log:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        Self {
            child,
            display: format!(":{n}"),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        signal(self.child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tauri-driver` on a free port, with WebKitWebDriver on another, for one display and environment.
pub struct TauriDriver {
    child: Child,
    /// The port WebDriver clients talk to.
    pub port: u16,
}

impl TauriDriver {
    /// Starts `tauri-driver --port P --native-port Q` with `DISPLAY` and `env`; its stderr (and so
    /// WebKitWebDriver's and the app's) to `log`. Waits until it accepts connections.
    pub fn start(display: &str, env: &[(String, OsString)], log: &Path) -> Self {
        let driver = tauri_driver_path();
        let native = which("WebKitWebDriver").unwrap_or_else(|| {
            panic!(
                "WebKitWebDriver is missing: install it with `apt-get install webkit2gtk-driver` \
                 (scripts/test.sh does)"
            )
        });
        let port = free_port();
        let mut native_port = free_port();
        while native_port == port {
            native_port = free_port();
        }
        let mut cmd = Command::new(&driver);
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--native-port")
            .arg(native_port.to_string())
            .arg("--native-driver")
            .arg(&native)
            .env("DISPLAY", display)
            // No accessibility bus under Xvfb: without this GTK waits for one and warns.
            .env("NO_AT_BRIDGE", "1")
            .stdin(Stdio::null())
            .stdout(File::create(log.with_extension("out")).expect("create the driver log"))
            .stderr(File::create(log).expect("create the driver log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tauri-driver exited ({status}) before listening; its log:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tauri-driver did not listen on 127.0.0.1:{port} within 20 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    /// The driver's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the driver and everything it started: SIGTERM (it kills WebKitWebDriver on it), then
    /// SIGKILL for any process of its tree still alive after a moment.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let tree = descendants(self.child.id());
        signal(self.child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let alive: Vec<u32> = tree
                .iter()
                .copied()
                .filter(|p| {
                    fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                        !s.rsplit(')')
                            .next()
                            .unwrap_or("")
                            .trim_start()
                            .starts_with('Z')
                    })
                })
                .collect();
            if alive.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for p in alive {
                    signal(p, Signal::SIGKILL);
                }
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TauriDriver {
    fn drop(&mut self) {
        self.stop();
    }
}

// --- the app ---

/// How to launch the app: its data directory, extra environment, where its logs and screenshots go.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Names the screenshots (`STORY-NN-STEP.png`) and logs.
    pub story: String,
    /// `MUSUBI_DATA`.
    pub data: PathBuf,
    /// Where `xvfb.log` and `desktop.log` (tauri-driver, WebKitWebDriver and the app) go.
    pub logs: PathBuf,
    /// More environment for the app (on top of `MUSUBI_DATA`, `MUSUBI_LAN=0`, `MUSUBI_SCRYPT_LOG_N`).
    pub env: Vec<(String, OsString)>,
}

impl Launch {
    /// The app for `story`, its data in `data`, its logs in `logs`.
    pub fn new(story: &str, data: &Path, logs: &Path) -> Self {
        Self {
            story: story.to_owned(),
            data: data.to_owned(),
            logs: logs.to_owned(),
            env: Vec::new(),
        }
    }
}

/// One running app under WebDriver (see the module docs).
pub struct DesktopApp {
    // Drop ends the session first (in `drop`); then the driver stops and the display goes last.
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: TauriDriver,
    xvfb: Xvfb,
    /// `MUSUBI_DATA` of this run.
    pub data: PathBuf,
    story: String,
    shots: u32,
    app_pid: u32,
    log: PathBuf,
    /// From spawning the session (which spawns the app) to the session being ready.
    pub session_started_in: Duration,
    launched_at: Instant,
}

impl DesktopApp {
    /// Starts Xvfb, tauri-driver and a session that launches the app; checks the app got its
    /// environment. Panics, naming what is missing, when any piece is not there.
    pub fn launch(launch: Launch) -> Self {
        let app = app_path();
        fs::create_dir_all(&launch.logs).expect("create the logs dir");
        let xvfb = Xvfb::start(&launch.logs.join(format!("{}.xvfb.log", launch.story)));
        let mut env: Vec<(String, OsString)> = vec![
            ("MUSUBI_DATA".into(), launch.data.clone().into_os_string()),
            ("MUSUBI_LAN".into(), "0".into()),
            (
                "MUSUBI_SCRYPT_LOG_N".into(),
                APP_SCRYPT_LOG_N.to_string().into(),
            ),
            (
                crate::WEAK_KDF_FOR_TESTS.0.into(),
                crate::WEAK_KDF_FOR_TESTS.1.into(),
            ),
        ];
        if std::env::var_os("MUSUBI_LOG").is_none() {
            env.push(("MUSUBI_LOG".into(), "info".into()));
        }
        // Plain logs in the files the failure messages quote.
        env.push(("NO_COLOR".into(), "1".into()));
        if std::env::var_os("RUST_LOG").is_none() {
            env.push(("RUST_LOG".into(), "info".into()));
        }
        env.extend(launch.env.iter().cloned());
        let log = launch.logs.join(format!("{}.desktop.log", launch.story));
        let driver = TauriDriver::start(&xvfb.display, &env, &log);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the WebDriver client");
        let caps = json!({
            "browserName": "wry",
            "tauri:options": { "application": app },
        });
        let caps = caps.as_object().cloned().expect("an object");
        let url = format!("http://127.0.0.1:{}", driver.port);
        let launched_at = Instant::now();
        let deadline = launched_at + Duration::from_secs(60);
        let client = loop {
            let made = rt.block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps.clone())
                    .connect(&url),
            );
            match made {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("[desktop] the WebDriver session is not up yet ({e}); retrying");
                    thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!(
                    "could not start a WebDriver session for {} through tauri-driver: {e}\n--- {} ---\n{}",
                    app.display(),
                    log.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        let session_started_in = launched_at.elapsed();
        let app_canon = fs::canonicalize(&app).unwrap_or(app.clone());
        let app_pid = crate::poll_until(
            "the app's process under tauri-driver",
            Duration::from_secs(10),
            || {
                descendants(driver.pid())
                    .into_iter()
                    .find(|p| exe_of(*p).is_some_and(|e| e == app_canon))
            },
        );
        // The environment must have reached the app through tauri-driver and WebKitWebDriver.
        let environ = environ_of(app_pid);
        for (k, v) in &env {
            let want = format!("{k}={}", v.to_string_lossy());
            assert!(
                environ.contains(&want),
                "the app (pid {app_pid}) did not get {want} through tauri-driver → WebKitWebDriver; \
                 its environment has: {:?}",
                environ
                    .iter()
                    .filter(|e| e.starts_with("MUSUBI"))
                    .collect::<Vec<_>>()
            );
        }
        let shots = screenshots_dir();
        if let Ok(entries) = fs::read_dir(&shots) {
            let prefix = format!("{}-", launch.story);
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Self {
            rt,
            client: Some(client),
            driver,
            xvfb,
            data: launch.data,
            story: launch.story,
            shots: 0,
            app_pid,
            log,
            session_started_in,
            launched_at,
        }
    }

    /// The app's process id.
    pub fn pid(&self) -> u32 {
        self.app_pid
    }

    /// The app's process and its WebKit helper processes (network, web content).
    pub fn process_tree(&self) -> Vec<u32> {
        let mut v = vec![self.app_pid];
        v.extend(descendants(self.app_pid));
        v
    }

    /// The X display it runs on.
    pub fn display(&self) -> &str {
        &self.xvfb.display
    }

    /// When the session was requested (the app's spawn).
    pub fn launched_at(&self) -> Instant {
        self.launched_at
    }

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the session is open until drop")
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page and returns its value.
    pub fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.client().execute(script, args))
            .unwrap_or_else(|e| self.fail(&format!("a script failed in the page: {e}\n{script}")))
    }

    fn try_js(&self, script: &str, args: Vec<Value>) -> Option<Value> {
        self.rt.block_on(self.client().execute(script, args)).ok()
    }

    /// The visible text of the whole page.
    pub fn text(&self) -> String {
        self.try_js(
            "return document.body ? document.body.innerText : '';",
            vec![],
        )
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
    }

    /// Whether an element matching `css` is shown (present and laid out).
    pub fn visible(&self, css: &str) -> bool {
        self.try_js(
            "const e = document.querySelector(arguments[0]); return !!(e && e.getClientRects().length);",
            vec![json!(css)],
        )
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
    }

    /// The text of the alerts shown (`[role=alert]`: error banners, validation), if any.
    pub fn alert(&self) -> Option<String> {
        self.try_js(
            "return Array.from(document.querySelectorAll('[role=alert]'))
               .filter(e => e.getClientRects().length).map(e => e.innerText.trim())
               .filter(t => t).join(' / ');",
            vec![],
        )
        .and_then(|v| v.as_str().map(str::to_owned))
        .filter(|t| !t.is_empty())
    }

    /// The text of the first element matching `css`, if there is one.
    pub fn text_of(&self, css: &str) -> Option<String> {
        self.try_js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            vec![json!(css)],
        )
        .and_then(|v| v.as_str().map(str::to_owned))
    }

    /// The texts of every element matching `css`.
    pub fn texts_of(&self, css: &str) -> Vec<String> {
        self.try_js(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);",
            vec![json!(css)],
        )
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.try_js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .and_then(|v| v.as_u64())
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
    }

    /// Waits until `css` is shown; panics (with the screen's text and a screenshot) after `timeout`.
    pub fn wait_for(&self, css: &str, timeout: Duration) {
        self.wait_until(&format!("`{css}` to be shown"), timeout, || {
            self.visible(css).then_some(())
        });
    }

    /// Whether the page shows `text`: in its text, or as the value of a field (a form shows a
    /// document's contents in its inputs).
    pub fn shows(&self, text: &str) -> bool {
        self.try_js(
            "const t = arguments[0];
             if (document.body && document.body.innerText.includes(t)) return true;
             return Array.from(document.querySelectorAll('input, textarea, select'))
               .some(e => e.getClientRects().length && String(e.value).includes(t));",
            vec![json!(text)],
        )
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
    }

    /// Waits until the page shows `text` (see [`DesktopApp::shows`]).
    pub fn wait_for_text(&self, text: &str, timeout: Duration) {
        self.wait_until(&format!("the text {text:?}"), timeout, || {
            self.shows(text).then_some(())
        });
    }

    /// Waits until the element `css` shows `text`.
    pub fn wait_for_text_in(&self, css: &str, text: &str, timeout: Duration) {
        self.wait_until(&format!("the text {text:?} in `{css}`"), timeout, || {
            self.text_of(css)
                .is_some_and(|t| t.contains(text))
                .then_some(())
        });
    }

    /// Calls `f` every 100 ms until it returns `Some`; panics naming `what` after `timeout`.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element `css` once it is shown and enabled (retrying while something covers it).
    pub fn click(&self, css: &str) {
        let deadline = Instant::now() + UI_TIMEOUT;
        let mut last: String;
        loop {
            if self.visible(css) {
                let res = self.rt.block_on(async {
                    let e = self.client().find(Locator::Css(css)).await?;
                    if !e.is_enabled().await? {
                        return Ok::<_, fantoccini::error::CmdError>(false);
                    }
                    e.click().await?;
                    Ok(true)
                });
                match res {
                    Ok(true) => return,
                    Ok(false) => last = "it is disabled".into(),
                    Err(e) => last = e.to_string(),
                }
            } else {
                last = "it is not shown".into();
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "could not click `{css}` within {UI_TIMEOUT:?}: {last}"
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Opens a section of the main navigation (`nav-SECTION`) and waits until it is the current one.
    pub fn open_section(&self, section: &str) {
        let nav = testid(&format!("nav-{section}"));
        self.click(&nav);
        self.wait_for(&format!("{nav}[aria-current=page]"), UI_TIMEOUT);
    }

    /// Clicks `[data-testid=ID]`.
    pub fn click_testid(&self, id: &str) {
        self.click(&testid(id));
    }

    /// Clicks the first element matching `css` whose text contains `text` (e.g. a row of a list).
    pub fn click_text(&self, css: &str, text: &str) {
        let found = self.wait_until(
            &format!("an element `{css}` showing {text:?}"),
            UI_TIMEOUT,
            || {
                self.try_js(
                    "const all = Array.from(document.querySelectorAll(arguments[0]));
                     const i = all.findIndex(e => e.innerText.includes(arguments[1]) && e.getClientRects().length);
                     return i;",
                    vec![json!(css), json!(text)],
                )
                .and_then(|v| v.as_i64())
                .filter(|i| *i >= 0)
            },
        );
        let res = self.rt.block_on(async {
            let all = self.client().find_all(Locator::Css(css)).await?;
            let i = usize::try_from(found).unwrap_or(0);
            match all.into_iter().nth(i) {
                Some(e) => e.click().await,
                None => Ok(()),
            }
        });
        if let Err(e) = res {
            self.fail(&format!("could not click `{css}` showing {text:?}: {e}"));
        }
    }

    /// Types `text` into the field `css` (cleared first), as a person would: WebDriver key events, and
    /// when the platform's key synthesis cannot produce the characters (some CJK text), the value is
    /// set with an `input` event, as an input method commits it.
    pub fn type_into(&self, css: &str, text: &str) {
        self.wait_for(css, UI_TIMEOUT);
        let typed = self.rt.block_on(async {
            let e = self.client().find(Locator::Css(css)).await?;
            e.clear().await?;
            e.send_keys(text).await?;
            e.prop("value").await
        });
        if matches!(&typed, Ok(Some(v)) if v == text) {
            return;
        }
        self.set_value(css, text);
    }

    /// Sets the value of the field or select `css` and fires `input` and `change`.
    pub fn set_value(&self, css: &str, value: &str) {
        self.wait_for(css, UI_TIMEOUT);
        let ok = self.js(
            "const e = document.querySelector(arguments[0]);
             if (!e) return false;
             const proto = e instanceof HTMLTextAreaElement ? HTMLTextAreaElement.prototype
               : e instanceof HTMLSelectElement ? HTMLSelectElement.prototype : HTMLInputElement.prototype;
             Object.getOwnPropertyDescriptor(proto, 'value').set.call(e, arguments[1]);
             e.dispatchEvent(new Event('input', { bubbles: true }));
             e.dispatchEvent(new Event('change', { bubbles: true }));
             return e.value === arguments[1];",
            vec![json!(css), json!(value)],
        );
        if ok != json!(true) {
            self.fail(&format!("could not set `{css}` to {value:?}"));
        }
    }

    /// Types into `#ID` (the form fields' stable ids).
    pub fn type_into_id(&self, id: &str, text: &str) {
        self.type_into(&format!("#{id}"), text);
    }

    /// Which session screen is shown (signed in counts as [`Screen::Main`]), if any yet.
    pub fn screen(&self) -> Option<Screen> {
        let pairs: Vec<Value> = Screen::ALL.iter().map(|(_, s)| json!(s)).collect();
        let i = self.try_js(
            "const vis = s => { const e = document.querySelector(s); return !!(e && e.getClientRects().length); };
             return arguments[0].findIndex(vis);",
            vec![Value::Array(pairs)],
        )?;
        let i = usize::try_from(i.as_i64()?).ok()?;
        Screen::ALL.get(i).map(|(s, _)| *s)
    }

    /// Waits for the first screen of the session flow and returns it with the time since launch
    /// (the app is interactive: an input of that screen is shown).
    pub fn wait_first_screen(&self) -> (Screen, Duration) {
        let s = self.wait_until("the first screen of the app", WORK_TIMEOUT, || {
            self.screen()
        });
        (s, self.launched_at.elapsed())
    }

    /// Goes through the session screens as a person would until signed in: first run (create the
    /// facility), join with the invite, create the first staff account, sign in; or unlock and sign
    /// in on later runs. Takes a screenshot of each filled screen. Each screen is acted on once;
    /// one that comes back, or stays, fails the test with the text it shows.
    pub fn sign_in_through_ui(&mut self, run: &FirstRun) {
        let mut done = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let screen = self.wait_until("a screen of the session flow", WORK_TIMEOUT, || {
                self.screen()
            });
            if screen == Screen::Main {
                self.screenshot("signed-in");
                return;
            }
            if !done.insert(screen) {
                self.fail(&format!(
                    "the {} screen came back after it was submitted",
                    screen.name()
                ));
            }
            match screen {
                Screen::FirstRun => {
                    self.type_into(sel::FACILITY_NAME, &run.facility_name);
                    self.type_into(sel::PASSPHRASE, &run.passphrase);
                    self.type_into(sel::PASSPHRASE_CONFIRM, &run.passphrase);
                    self.screenshot(screen.name());
                    self.click(sel::CREATE_FACILITY);
                }
                Screen::Unlock => {
                    self.type_into(sel::UNLOCK_PASSPHRASE, &run.passphrase);
                    self.screenshot(screen.name());
                    self.click(sel::UNLOCK);
                }
                Screen::Join => {
                    self.set_value(sel::INVITE, &run.invite);
                    self.screenshot(screen.name());
                    self.click(sel::JOIN);
                }
                Screen::FirstStaff => {
                    self.type_into(sel::STAFF_LOGIN, &run.staff_login);
                    self.type_into(sel::STAFF_NAME, &run.staff_name);
                    self.type_into(sel::STAFF_PASSWORD, &run.staff_password);
                    self.screenshot(screen.name());
                    self.click(sel::CREATE_STAFF);
                }
                Screen::SignIn => {
                    self.type_into(sel::LOGIN, &run.staff_login);
                    self.type_into(sel::PASSWORD, &run.staff_password);
                    self.screenshot(screen.name());
                    self.click(sel::SIGN_IN);
                }
                Screen::Main => unreachable!("handled above"),
            }
            self.wait_until(
                &format!("the app to leave the {} screen", screen.name()),
                WORK_TIMEOUT,
                || {
                    if let Some(alert) = self.alert() {
                        self.fail(&format!(
                            "the {} screen shows an error after it was submitted: {alert}",
                            screen.name()
                        ));
                    }
                    (self.screen() != Some(screen)).then_some(())
                },
            );
            if Instant::now() > deadline {
                self.fail("the session flow did not reach the main screen within 240 s");
            }
        }
    }

    /// How many changes the status bar counts as not yet at the relay: the number in
    /// `sync-pending`, or 0 when the bar is shown without it (it is left out when nothing is pending);
    /// `None` while there is no status bar.
    pub fn pending(&self) -> Option<u64> {
        match self.text_of(sel::SYNC_PENDING) {
            Some(t) => {
                let digits: String = t.chars().filter(char::is_ascii_digit).collect();
                digits.parse().ok()
            }
            None => self.visible(sel::SYNC_STATE).then_some(0),
        }
    }

    /// Saves a PNG of the window to `ci-artifacts/screenshots/STORY-NN-STEP.png`; returns its path.
    pub fn screenshot(&mut self, step: &str) -> PathBuf {
        self.shots += 1;
        let name = format!("{}-{:02}-{}.png", self.story, self.shots, slug(step));
        let path = screenshots_dir().join(name);
        match self.rt.block_on(self.client().screenshot()) {
            Ok(png) => {
                fs::create_dir_all(screenshots_dir()).expect("create the screenshots dir");
                fs::write(&path, png)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            }
            Err(e) => self.fail(&format!("the window could not be captured: {e}")),
        }
        path
    }

    /// Panics with `msg`, the screen's text, the tail of the app's log, after saving a screenshot.
    pub fn fail(&self, msg: &str) -> ! {
        let path = screenshots_dir().join(format!("{}-FAILED.png", self.story));
        let shot = match &self.client {
            None => "no session".to_owned(),
            Some(c) => match self.rt.block_on(c.screenshot()) {
                Ok(png) => {
                    let _ = fs::create_dir_all(screenshots_dir());
                    fs::write(&path, png)
                        .map(|_| format!("screenshot: {}", path.display()))
                        .unwrap_or_else(|e| format!("no screenshot: {e}"))
                }
                Err(e) => format!("no screenshot: {e}"),
            },
        };
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        panic!(
            "[desktop {}] {msg}\n{shot}\n--- the screen shows ---\n{}\n--- {} (last 30 lines) ---\n{tail}",
            self.story,
            self.text(),
            self.log.display()
        );
    }

    /// Ends the session (the app closes) and waits for the app's process to exit.
    pub fn close(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let pid = self.app_pid;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && exe_of(pid).is_some() && parent_of(pid).is_some() {
            thread::sleep(Duration::from_millis(50));
        }
        self.driver.stop();
    }
}

impl Drop for DesktopApp {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        self.driver.stop();
    }
}

/// `ci-artifacts/screenshots/` at the repository root.
pub fn screenshots_dir() -> PathBuf {
    repo_root().join("ci-artifacts").join("screenshots")
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}
