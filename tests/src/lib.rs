//! musubi-tests: the harness that runs the real `musubi-node` relay and `musubi` facility processes.
//!
//! Scenario tests (`tests/scenarios.rs`) and workload drivers (`src/bin/bench-*.rs`) build on it.
//! A [`World`] is one scenario's temporary directory; in it a [`Relay`] runs `musubi-node serve` on a
//! fixed loopback port and each [`Facility`] is one device's data directory driven through the `musubi` CLI.
//! A [`raw::RawClient`] speaks `/musubi/sync/1` directly, to act as a hostile or curious peer and to
//! drive the benchmarks.
//! A [`desktop::DesktopApp`] is the real desktop app (`musubi-desktop`) under Xvfb, driven through
//! `tauri-driver` and WebKitWebDriver, with screenshots of every step.
//!
//! Run loop: nothing here is async for the caller. Processes are spawned with `std::process::Command`;
//! waiting is polling with a deadline ([`poll_until`]) that panics with a message naming what it waited for.
//! The raw client owns a small tokio runtime whose task drives its libp2p swarm.
//!
//! The binaries are not built here: run `cargo build --workspace --bins` first (`scripts/test.sh` does).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

pub mod desktop;
pub mod facility;
pub mod files;
pub mod fuzz;
pub mod hostile;
pub mod measure;
pub mod nanao;
pub mod netns;
pub mod raw;
pub mod relay;
pub mod sim;
pub mod vcard;

pub use facility::Facility;
pub use relay::Relay;

/// How long one CLI command may run before the harness kills it and fails the test.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The scrypt work factor the tests wrap device keys with (the production default is 18; the
/// programs take it only with [`WEAK_KDF_FOR_TESTS`] in their environment).
pub const TEST_SCRYPT_LOG_N: u8 = 10;

/// The value of the environment variable `name` parsed as a `T`, or `default()` when it is not set.
/// Panics, naming the variable, when it is set but does not parse (a replay seed, a count).
pub fn env_or<T: std::str::FromStr>(name: &str, default: impl FnOnce() -> T) -> T {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s:?} does not parse")),
        Err(_) => default(),
    }
}

/// The environment variable and value with which the programs accept [`TEST_SCRYPT_LOG_N`].
pub const WEAK_KDF_FOR_TESTS: (&str, &str) = (musubi_crdt::crypto::WEAK_KDF_FOR_TESTS_ENV, "1");

/// The deployment authority's passphrase in the tests.
pub const AUTHORITY_PASSPHRASE: &str = "the municipality's authority passphrase";

/// The directory holding the built binaries: `target/<profile>/`.
///
/// Derived from the running executable (`target/<profile>/deps/<test>` for a test,
/// `target/<profile>/<bin>` for a workload driver), which already honours `CARGO_TARGET_DIR`;
/// falls back to `$CARGO_TARGET_DIR/debug` and then `<repo>/target/debug`.
pub fn bin_dir() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        if dir.file_name() == Some(OsStr::new("deps")) {
            if let Some(up) = dir.parent() {
                candidates.push(up.to_path_buf());
            }
        } else {
            candidates.push(dir.to_path_buf());
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug"));
    }
    candidates.push(repo_root().join("target").join("debug"));
    candidates
        .iter()
        .find(|d| d.join("musubi-node").is_file() || d.join("musubi").is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// The path of a built workspace binary (`musubi-node`, `musubi` or `musubi-desktop`).
///
/// Panics when it is missing; warns (once per process and binary) when it is older than the sources it
/// is built from, since a stale binary can make a test pass or fail for the wrong reason.
pub fn bin(name: &str) -> PathBuf {
    static CHECKED: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = checked.get(name) {
        return p.clone();
    }
    let path = checked_bin(name);
    checked.insert(name.to_owned(), path.clone());
    path
}

fn checked_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    let meta = fs::metadata(&path).unwrap_or_else(|_| {
        panic!(
            "the binary {} is missing: run `cargo build --workspace --bins` first",
            path.display()
        )
    });
    if let (Ok(built), Some(newest)) = (meta.modified(), newest_source_mtime(name))
        && built < newest.0
    {
        // A warning, not a failure: it is shown with a failing test's output, where a stale binary may
        // be the reason.
        eprintln!(
            "warning: the binary {} is older than {}; run `cargo build --workspace --bins` to test the current sources",
            path.display(),
            newest.1.display()
        );
    }
    path
}

fn newest_source_mtime(bin: &str) -> Option<(std::time::SystemTime, PathBuf)> {
    let root = repo_root();
    let own = match bin {
        "musubi-node" => "sync-node/src",
        "musubi" => "app/facility/src",
        "musubi-desktop" => "app/desktop/src",
        _ => return None,
    };
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for dir in ["crdt/src", "transport/src", own] {
        for f in files::walk(&root.join(dir)) {
            if let Ok(t) = fs::metadata(&f).and_then(|m| m.modified())
                && newest.as_ref().is_none_or(|(n, _)| t > *n)
            {
                newest = Some((t, f));
            }
        }
    }
    newest
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies inside the repository")
        .to_path_buf()
}

/// A file of the shared real data (`../shared/data` beside the repository), e.g.
/// `shared_data("fhir-ereferral/Bundle-BundleReferralExample01.json")`.
///
/// Panics naming the path when it is missing: the tests never skip silently.
pub fn shared_data(rel: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel);
    assert!(
        path.exists(),
        "the real data file {} is missing; the tests need ../shared/data beside the repository",
        path.display()
    );
    path
}

/// The real JP eReferral document Bundle of the acceptance tests.
pub fn referral_bundle_path() -> PathBuf {
    shared_data("fhir-ereferral/Bundle-BundleReferralExample01.json")
}

/// A loopback TCP port that was free a moment ago (bound to `127.0.0.1:0` and released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// Calls `f` until it returns `Some`, every `interval`, for at most `timeout`; panics naming `what`.
pub fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    poll_every(what, timeout, Duration::from_millis(20), &mut f)
}

/// [`poll_until`] with an explicit polling interval.
pub fn poll_every<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    f: &mut impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(interval);
    }
}

/// What a finished command printed and how it exited.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (UTF-8, lossy).
    pub stdout: String,
    /// Standard error (UTF-8, lossy).
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Output {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Its stdout; panics with the full stderr when it did not exit 0.
    pub fn expect_ok(self) -> String {
        assert!(
            self.ok(),
            "`{}` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Itself; panics when it exited 0 (a refusal was expected).
    pub fn expect_fail(self) -> Self {
        assert!(
            !self.ok(),
            "`{}` succeeded but should have been refused\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A printable command line.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.len() > 120 {
            let mut cut = 100;
            while !a.is_char_boundary(cut) {
                cut -= 1;
            }
            s.push_str(&format!("{}…({} bytes)", &a[..cut], a.len()));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion with piped output, killing it (and panicking) after `timeout`.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Output {
    let line = cmdline(&cmd);
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let mut sleep = Duration::from_millis(1);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for a child") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
            panic!(
                "`{line}` did not finish within {timeout:?}; killed it\n--- stderr ---\n{stderr}"
            );
        }
        thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Output {
        cmdline: line,
        status,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// One scenario's temporary directory: the relay's and each facility's data, and every process's log.
///
/// On a panic (a failing test) it prints its path and the tail of each log, and keeps the directory.
pub struct World {
    dir: Option<tempfile::TempDir>,
    name: String,
}

impl World {
    /// A fresh world for the scenario `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("musubi-{name}-"))
            .tempdir()
            .expect("create a temp dir");
        fs::create_dir_all(dir.path().join("logs")).expect("create logs dir");
        Self {
            dir: Some(dir),
            name: name.to_owned(),
        }
    }

    /// Its root directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// Where every process's stdout and stderr go.
    pub fn logs(&self) -> PathBuf {
        self.path().join("logs")
    }

    /// A (new) subdirectory for one party's data.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        let d = self.path().join(name);
        fs::create_dir_all(&d).expect("create data dir");
        d
    }

    /// The deployment authority's directory of this world (made by the first [`Relay::init`]).
    pub fn authority_dir(&self) -> PathBuf {
        self.path().join("authority")
    }

    /// An initialised, running relay.
    pub fn relay(&self) -> Relay {
        let mut r = Relay::init(self);
        r.start();
        r
    }

    /// A facility device (its data directory is created, `musubi init` is not run yet).
    pub fn facility(&self, name: &str) -> Facility {
        Facility::new(self, name)
    }

    /// A facility device `device` initialised and enrolled at `relay` as a new facility `name` of `role`.
    pub fn enrolled_facility(
        &self,
        relay: &Relay,
        device: &str,
        name: &str,
        role: &str,
    ) -> Facility {
        let mut f = self.facility(device);
        f.init();
        let code = relay.invite_facility(name, role);
        f.join(&code);
        f
    }

    /// A second (third, ...) device of `of`'s facility: `of` issues a device invite (`musubi device
    /// invite`) and registers it with a sync; the new device asks to join; `of` approves at its next
    /// sync; the new device's join then completes.
    pub fn enrolled_device(&self, _relay: &Relay, of: &Facility, device_name: &str) -> Facility {
        let mut f = self.facility(device_name);
        f.init();
        let code = of.device_invite();
        of.sync_once();
        let out = f.run_ok("join", &[&code, "--no-wait"]);
        assert!(
            out.trim() == "pending",
            "a device invite waits for its inviter's approval: {out}"
        );
        of.sync_once();
        f.join(&code);
        f
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        let Some(dir) = self.dir.take() else { return };
        let path = dir.keep();
        eprintln!(
            "\n=== scenario `{}` failed; its files are kept in {} ===",
            self.name,
            path.display()
        );
        let mut logs = files::walk(&path.join("logs"));
        logs.sort();
        for log in logs {
            let text = fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- {} (last {} of {} lines) ---",
                log.display(),
                tail.len(),
                lines.len()
            );
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}
