//! One facility device: a data directory and passphrase driven through the `musubi` CLI.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{COMMAND_TIMEOUT, Output, TEST_SCRYPT_LOG_N, World, bin, cmdline, run_command};

/// How long `sync --once` may take in the tests (passed as `--timeout`).
pub const SYNC_TIMEOUT_SECS: u64 = 60;

/// The staff account [`Facility::init`] makes on every device (its administrator), as whom every
/// command acts (`MUSUBI_STAFF`, `MUSUBI_STAFF_PASSWORD`).
pub const STAFF_LOGIN: &str = "shiken";
/// Its password.
pub const STAFF_PASSWORD: &str = "correct horse battery (staff)";

/// One device of a facility. Its passphrase is handed to every command as `MUSUBI_PASSPHRASE`.
///
/// Dropping the value kills its `sync --watch` child, if any.
pub struct Facility {
    /// The device's name (also its data directory's name and `musubi init --name`).
    pub name: String,
    /// `--data` of every command.
    pub data: PathBuf,
    passphrase: String,
    logs: PathBuf,
    watch: Option<Child>,
    watch_starts: u32,
    id: Option<String>,
}

impl Facility {
    /// A device named `name` (ASCII, used as a directory name) with a fresh data directory in `world`.
    pub fn new(world: &World, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            data: world.data_dir(name),
            passphrase: format!("correct horse battery staple for {name} 合言葉"),
            logs: world.logs(),
            watch: None,
            watch_starts: 0,
            id: None,
        }
    }

    /// Its passphrase.
    pub fn passphrase(&self) -> &str {
        &self.passphrase
    }

    /// The facility id `join` printed, parsed.
    pub fn facility_id(&self) -> musubi_crdt::ids::FacilityId {
        self.id().parse().expect("a facility id")
    }

    /// The facility id `join` printed.
    pub fn id(&self) -> &str {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("{} has not joined a relay yet", self.name))
    }

    /// The `musubi` command for `sub` (space-separated words, e.g. "referral show") with `--data DIR`.
    pub fn command(&self, sub: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("musubi"));
        cmd.args(sub.split_whitespace())
            .arg("--data")
            .arg(&self.data)
            .args(args);
        cmd.env("MUSUBI_PASSPHRASE", &self.passphrase)
            .env("MUSUBI_STAFF", STAFF_LOGIN)
            .env("MUSUBI_STAFF_PASSWORD", STAFF_PASSWORD)
            .env(crate::WEAK_KDF_FOR_TESTS.0, crate::WEAK_KDF_FOR_TESTS.1);
        // Info logs on stderr: they land in `logs/NAME.log`, which the confidentiality test greps too.
        if std::env::var_os("MUSUBI_LOG").is_none() {
            cmd.env("MUSUBI_LOG", "info");
        }
        cmd
    }

    /// Runs `musubi SUB --data DIR ARGS...`; its stderr is also appended to `logs/NAME.log`.
    pub fn run(&self, sub: &str, args: &[&str]) -> Output {
        let out = run_command(self.command(sub, args), COMMAND_TIMEOUT);
        if let Ok(mut log) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            // The command's arguments are left out: they may hold the very text the confidentiality test
            // looks for on disk.
            let _ = writeln!(
                log,
                "$ musubi {sub}  # {} in {:?}\n{}",
                out.status, out.elapsed, out.stderr
            );
        }
        out
    }

    /// [`Facility::run`], panicking with the full stderr unless it exits 0; returns stdout.
    pub fn run_ok(&self, sub: &str, args: &[&str]) -> String {
        self.run(sub, args).expect_ok()
    }

    /// [`Facility::run_ok`] with `--json` appended, parsed.
    pub fn run_json(&self, sub: &str, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run_ok(sub, &a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`musubi {sub} {a:?}` printed no JSON ({e}):\n{out}"))
    }

    /// `musubi init --name NAME --scrypt-log-n 10`.
    pub fn init(&mut self) {
        let n = TEST_SCRYPT_LOG_N.to_string();
        self.run_ok(
            "init",
            &["--name", &self.name.clone(), "--scrypt-log-n", &n],
        );
        // The device's first staff account (its administrator), as whom every later command acts.
        let mut cmd = self.command(
            "staff add",
            &[
                "--login",
                STAFF_LOGIN,
                "--name",
                "試験 職員",
                "--role",
                "admin",
            ],
        );
        cmd.env_remove("MUSUBI_STAFF");
        crate::vcard::harness::run_with_stdin(cmd, &format!("{STAFF_PASSWORD}\n"), COMMAND_TIMEOUT)
            .expect_ok();
    }

    /// This device's engine, opened in the test's process (to read what it holds, or to act as an
    /// attacker who stole the laptop together with its passphrase).
    pub fn engine(&self) -> musubi_facility::Engine {
        musubi_facility::Engine::open(&self.data, &self.passphrase)
            .unwrap_or_else(|e| panic!("cannot open {}'s engine: {e}", self.name))
    }

    /// This device's secrets (what a thief holding the laptop and its passphrase has).
    pub fn secrets(&self) -> musubi_crdt::crypto::DeviceSecrets {
        self.engine().secrets().clone()
    }

    /// This device's id.
    pub fn device_id(&self) -> musubi_crdt::ids::DeviceId {
        self.secrets().device_id()
    }

    /// `musubi device invite`: a code for one more device of this facility (it works once this
    /// device synced).
    pub fn device_invite(&self) -> String {
        let out = self.run_ok("device invite", &[]);
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with("musubi"))
            .unwrap_or_else(|| panic!("`musubi device invite` printed no code:\n{out}"))
            .to_owned()
    }

    /// `musubi join CODE`; remembers and returns the facility id it prints.
    pub fn join(&mut self, code: &str) -> String {
        let out = self.run_ok("join", &[code]);
        let id = out
            .split_whitespace()
            .find(|w| w.parse::<musubi_crdt::ids::FacilityId>().is_ok())
            .unwrap_or_else(|| panic!("`musubi join` printed no facility id:\n{out}"))
            .to_owned();
        self.id = Some(id.clone());
        id
    }

    /// `musubi sync --once --timeout 60`, which must succeed.
    pub fn sync_once(&self) {
        self.sync_once_result().expect_ok();
    }

    /// `musubi sync --once --timeout 60`, whatever it does.
    pub fn sync_once_result(&self) -> Output {
        self.run(
            "sync",
            &["--once", "--timeout", &SYNC_TIMEOUT_SECS.to_string()],
        )
    }

    /// Starts `musubi sync --watch` in the background (stdout and stderr to `logs/NAME.watch.N.*`).
    pub fn start_watch(&mut self) {
        self.start_watch_with(&[]);
    }

    /// Starts `musubi sync --watch ARGS...` in the background (e.g. `--lan --listen ADDR`).
    pub fn start_watch_with(&mut self, extra: &[&str]) {
        assert!(
            self.watch.is_none(),
            "{} already runs sync --watch",
            self.name
        );
        self.watch_starts += 1;
        let mut args = vec!["--watch"];
        args.extend_from_slice(extra);
        let mut cmd = self.command("sync", &args);
        let line = cmdline(&cmd);
        let base = self
            .logs
            .join(format!("{}.watch.{}", self.name, self.watch_starts));
        cmd.stdin(Stdio::null())
            .stdout(File::create(base.with_extension("out")).expect("create watch log"))
            .stderr(File::create(base.with_extension("err")).expect("create watch log"));
        self.watch = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}")),
        );
    }

    /// The `sync --watch` child's process id.
    pub fn watch_pid(&self) -> Option<u32> {
        self.watch.as_ref().map(|c| c.id())
    }

    /// Whether `sync --watch` is still running (panics with its log if it exited).
    pub fn assert_watch_running(&mut self) {
        let name = self.name.clone();
        let n = self.watch_starts;
        if let Some(c) = self.watch.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let err = fs::read_to_string(self.logs.join(format!("{name}.watch.{n}.err")))
                .unwrap_or_default();
            panic!("`musubi sync --watch` of {name} exited ({status}):\n{err}");
        }
    }

    /// Kills `sync --watch` (SIGKILL) and reaps it.
    pub fn stop_watch(&mut self) {
        if let Some(mut c) = self.watch.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.logs.join(format!("{}.log", self.name))
    }

    // --- the referral commands of the CLI contract ---

    /// `referral import-fhir --to FACILITY FILE`; returns the letter's id (its one line of stdout).
    pub fn import_fhir(&self, to: &str, file: &Path) -> String {
        let out = self.run_ok(
            "referral import-fhir",
            &["--to", to, &file.to_string_lossy()],
        );
        let lines: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "`referral import-fhir` should print one line (the letter id), got:\n{out}"
        );
        lines[0].to_owned()
    }

    /// `referral show ID --json`.
    pub fn show(&self, id: &str) -> Value {
        self.run_json("referral show", &[id])
    }

    /// `referral show ID` (the human form).
    pub fn show_text(&self, id: &str) -> String {
        self.run_ok("referral show", &[id])
    }

    /// `referral list --json`, as a list.
    pub fn list(&self) -> Vec<Value> {
        let v = self.run_json("referral list", &[]);
        v.as_array()
            .cloned()
            .unwrap_or_else(|| panic!("`referral list --json` is not an array:\n{v:#}"))
    }

    /// The ids in `referral list --json`.
    pub fn letter_ids(&self) -> Vec<String> {
        self.list()
            .iter()
            .filter_map(|l| l.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// `referral edit ID --field FIELD --text TEXT`.
    pub fn edit(&self, id: &str, field: &str, text: &str) {
        self.run_ok("referral edit", &[id, "--field", field, "--text", text]);
    }

    /// `referral reply ID --text TEXT`.
    pub fn reply(&self, id: &str, text: &str) {
        self.run_ok("referral reply", &[id, "--text", text]);
    }

    /// `referral export-fhir ID`, parsed.
    pub fn export_fhir(&self, id: &str) -> Value {
        let out = self.run_ok("referral export-fhir", &[id]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`referral export-fhir` printed no JSON ({e}):\n{out}"))
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.run_json("status", &[])
    }

    /// `pending` of `status --json`: outbox items the relay has not acknowledged.
    pub fn pending(&self) -> u64 {
        let s = self.status();
        s.get("pending")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("`status --json` has no number `pending`:\n{s:#}"))
    }

    /// `bundle list --json`: `[{id, doc, seq}]`.
    pub fn bundles(&self) -> Vec<Value> {
        let v = self.run_json("bundle list", &[]);
        v.as_array()
            .cloned()
            .unwrap_or_else(|| panic!("`bundle list --json` is not an array:\n{v:#}"))
    }

    /// Ids of the bundles the relay acknowledged (`seq` not null), with their documents and seqs.
    pub fn acknowledged_bundles(&self) -> Vec<(String, String, u64)> {
        self.bundles()
            .iter()
            .filter_map(|b| {
                Some((
                    b.get("id")?.as_str()?.to_owned(),
                    b.get("doc")?.as_str()?.to_owned(),
                    b.get("seq")?.as_u64()?,
                ))
            })
            .collect()
    }
}

impl Drop for Facility {
    fn drop(&mut self) {
        self.stop_watch();
    }
}

/// A long timeout for whole-stream waits.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(240);
