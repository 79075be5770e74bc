//! The relay process: `musubi-node` on a fixed loopback port, its admin commands and its database.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use musubi_crdt::ids::DeviceId;
use serde_json::Value;

use crate::{
    AUTHORITY_PASSPHRASE, COMMAND_TIMEOUT, Output, World, bin, cmdline, free_port, poll_until,
    run_command,
};

/// How long `serve` may take to print its listen address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One relay: its data directory, its fixed port, and the running `serve` process (if started).
///
/// The port is chosen once, so a restarted relay comes back at the address the facilities stored from
/// their invite. Dropping the value kills the process.
pub struct Relay {
    /// `--data` of every `musubi-node` command.
    pub data: PathBuf,
    authority: PathBuf,
    approve_on_join: bool,
    logs: PathBuf,
    port: u16,
    child: Option<Child>,
    starts: u32,
    addrs: Vec<String>,
    serve_args: Vec<String>,
    admin: Option<String>,
    listen: Option<String>,
}

impl Relay {
    /// The deployment authority (made once per world, `musubi-node authority init`) and
    /// `musubi-node init --data DIR --authority ADIR` in a new directory of `world`.
    pub fn init(world: &World) -> Self {
        let data = world.data_dir("relay");
        let r = Self {
            data,
            authority: world.authority_dir(),
            logs: world.logs(),
            port: free_port(),
            child: None,
            starts: 0,
            addrs: Vec::new(),
            serve_args: Vec::new(),
            admin: None,
            listen: None,
            approve_on_join: true,
        };
        if !r.authority.join("authority.pub").exists() {
            let mut cmd = Command::new(bin("musubi-node"));
            cmd.args(["authority", "init", "--authority"])
                .arg(&r.authority)
                .args(["--deployment", "musubi-test", "--scrypt-log-n", "10"])
                .env("MUSUBI_AUTHORITY_PASSPHRASE", AUTHORITY_PASSPHRASE)
                .env(crate::WEAK_KDF_FOR_TESTS.0, crate::WEAK_KDF_FOR_TESTS.1);
            run_command(cmd, COMMAND_TIMEOUT).expect_ok();
        }
        let a = r.authority.display().to_string();
        r.node("init", &["--authority", &a]).expect_ok();
        r
    }

    /// The deployment authority's directory.
    pub fn authority_dir(&self) -> &std::path::Path {
        &self.authority
    }

    /// Whether `start` runs `serve --authority` (new facilities approved as they join: the
    /// embedded default). Off: they wait for `musubi-node approve`.
    pub fn set_approve_on_join(&mut self, on: bool) {
        self.approve_on_join = on;
    }

    /// Arguments `start` adds to `serve` (limits, `--admin`, `--log-format`, ...).
    pub fn set_serve_args(&mut self, args: &[&str]) {
        self.serve_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Listens on `addr` instead of `127.0.0.1:PORT` from the next `start` on (a relay that
    /// moved).
    pub fn set_listen(&mut self, addr: &str) {
        self.listen = Some(addr.to_owned());
    }

    /// Serves another data directory from the next `start` on (a restored copy), on the same port.
    pub fn set_data(&mut self, data: PathBuf) {
        self.data = data;
    }

    /// The admin listener's base URL (`http://127.0.0.1:PORT`), printed by the running `serve`
    /// started with `--admin`.
    pub fn admin_url(&self) -> String {
        self.admin
            .clone()
            .expect("the relay was started with --admin and printed its address")
    }

    /// `GET PATH` on the admin listener (with `Authorization: Bearer TOKEN` when given): the
    /// status code and the body.
    pub fn admin_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        self.admin_try_get(path, token, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// [`Relay::admin_get`] within `timeout`, or why not.
    pub fn admin_try_get(
        &self,
        path: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        let url = format!("{}{path}", self.admin_url());
        let mut req = agent.get(&url);
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok((status, body))
    }

    /// Runs `serve` with the serve arguments and expects it to exit with an error at once (a
    /// refused configuration); returns its stderr.
    pub fn serve_fails(&self) -> String {
        let mut cmd = Command::new(bin("musubi-node"));
        cmd.arg("serve")
            .arg("--data")
            .arg(&self.data)
            .arg("--listen")
            .arg(self.listen_addr())
            .args(&self.serve_args);
        let out = run_command(cmd, COMMAND_TIMEOUT).expect_fail();
        out.stderr
    }

    /// The stderr log of the running (or last run) `serve`.
    pub fn err_log(&self) -> PathBuf {
        self.logs.join(format!("relay.{}.err", self.starts))
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `--listen` multiaddr.
    pub fn listen_addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.port)
    }

    /// The addresses the running (or last run) `serve` printed.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Whether `serve` is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id of `serve` (for /proc measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts `musubi-node serve` and waits for its "listening on ADDR" line.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the relay is already running");
        self.starts += 1;
        let out_path = self.logs.join(format!("relay.{}.out", self.starts));
        let err_path = self.logs.join(format!("relay.{}.err", self.starts));
        let mut cmd = Command::new(bin("musubi-node"));
        cmd.arg("serve")
            .arg("--data")
            .arg(&self.data)
            .arg("--listen")
            .arg(self.listen.clone().unwrap_or_else(|| self.listen_addr()))
            .env("MUSUBI_AUTHORITY_PASSPHRASE", AUTHORITY_PASSPHRASE);
        if self.approve_on_join {
            cmd.arg("--authority").arg(&self.authority);
        }
        cmd.args(&self.serve_args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let line = cmdline(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("create relay stdout log"))
            .stderr(File::create(&err_path).expect("create relay stderr log"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        self.child = Some(child);
        let child = self.child.as_mut().expect("just set");
        let addrs = poll_until(
            &format!("`{line}` to print \"listening on ADDR\""),
            START_TIMEOUT,
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "`{line}` exited ({status}) before listening\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        fs::read_to_string(&out_path).unwrap_or_default(),
                        fs::read_to_string(&err_path).unwrap_or_default()
                    );
                }
                let text = fs::read_to_string(&out_path).unwrap_or_default();
                let addrs: Vec<String> = text
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("listening on "))
                    .map(|a| a.trim().to_owned())
                    .collect();
                (!addrs.is_empty() && text.ends_with('\n')).then_some(addrs)
            },
        );
        assert!(
            self.listen.is_some()
                || addrs
                    .iter()
                    .any(|a| a.contains(&format!("/tcp/{}", self.port))),
            "the relay listens on {addrs:?}, not on port {}",
            self.port
        );
        self.addrs = addrs;
        self.admin = fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin listening on "))
            .map(str::to_owned);
    }

    /// Kills `serve` with SIGKILL (`Child::kill`) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `musubi-node SUBCOMMAND --data DIR ARGS...` (with the authority's passphrase in the
    /// environment, as the operator holding the authority's USB stick would type it).
    pub fn node(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("musubi-node"));
        cmd.arg(sub)
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .env("MUSUBI_AUTHORITY_PASSPHRASE", AUTHORITY_PASSPHRASE);
        run_command(cmd, COMMAND_TIMEOUT)
    }

    /// Runs `musubi-node SUBCOMMAND --data DIR ARGS...` as the operator who does not hold the
    /// authority (no `--authority`, no passphrase).
    pub fn node_as_operator(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("musubi-node"));
        cmd.arg(sub)
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .env_remove("MUSUBI_AUTHORITY_PASSPHRASE");
        run_command(cmd, COMMAND_TIMEOUT)
    }

    /// An invite for a new facility; returns the code (the one line `invite` prints).
    pub fn invite_facility(&self, name: &str, role: &str) -> String {
        let a = self.authority.display().to_string();
        one_line(
            self.node(
                "invite",
                &["--authority", &a, "--name", name, "--role", role],
            )
            .expect_ok(),
        )
    }

    /// An invite for a new facility that expires after `expires` (e.g. "1s").
    pub fn invite_facility_expiring(&self, name: &str, role: &str, expires: &str) -> String {
        let a = self.authority.display().to_string();
        one_line(
            self.node(
                "invite",
                &[
                    "--authority",
                    &a,
                    "--name",
                    name,
                    "--role",
                    role,
                    "--expires",
                    expires,
                ],
            )
            .expect_ok(),
        )
    }

    /// `musubi-node approve --json`: certifies the facilities that joined with the authority's
    /// invites.
    pub fn approve(&self) -> Value {
        let a = self.authority.display().to_string();
        let out = self
            .node("approve", &["--authority", &a, "--json"])
            .expect_ok();
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("`musubi-node approve --json` printed no JSON ({e}):\n{out}")
        })
    }

    /// `musubi-node revoke FACILITY|DEVICE`.
    pub fn revoke(&self, what: &str) {
        self.node("revoke", &[what]).expect_ok();
    }

    /// `musubi-node facilities --json`.
    pub fn facilities_json(&self) -> Value {
        let out = self.node("facilities", &["--json"]).expect_ok();
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("`musubi-node facilities --json` printed no JSON ({e}):\n{out}")
        })
    }

    /// The device ids of the facility `id_or_name`, as `musubi-node facilities --json` lists them.
    pub fn device_ids(&self, id_or_name: &str) -> Vec<String> {
        let all = self.facilities_json();
        let list = all
            .as_array()
            .cloned()
            .or_else(|| all.get("facilities").and_then(Value::as_array).cloned());
        let list = list
            .unwrap_or_else(|| panic!("`facilities --json` is not a list of facilities:\n{all:#}"));
        let f = list
            .iter()
            .find(|f| {
                f.get("id").and_then(Value::as_str) == Some(id_or_name)
                    || f.get("name").and_then(Value::as_str) == Some(id_or_name)
            })
            .unwrap_or_else(|| {
                panic!("facility {id_or_name} is not in `facilities --json`:\n{all:#}")
            });
        let devices = f
            .get("devices")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        devices
            .iter()
            .filter_map(|d| {
                d.as_str()
                    .or_else(|| d.get("device").and_then(Value::as_str))
                    .or_else(|| d.get("id").and_then(Value::as_str))
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Its listen address with its peer id (`.../p2p/ID`), as a device dials it.
    pub fn p2p_addr(&self) -> String {
        format!("{}/p2p/{}", self.listen_addr(), self.peer_id())
    }

    /// The deployment id the relay serves (its database's metadata).
    pub fn deployment(&self) -> musubi_crdt::ids::DeploymentId {
        let id: String = self
            .db()
            .query_row(
                "SELECT value FROM meta WHERE key = 'deployment_id'",
                [],
                |r| r.get(0),
            )
            .expect("the relay records its deployment");
        id.parse().expect("a deployment id")
    }

    /// The relay's device id (libp2p PeerId): from its printed address when that ends in `/p2p/ID`,
    /// else from a fresh invite code.
    pub fn peer_id(&self) -> DeviceId {
        if let Some(id) = self
            .addrs
            .iter()
            .find_map(|a| a.rsplit_once("/p2p/").and_then(|(_, id)| id.parse().ok()))
        {
            return id;
        }
        self.node("facilities", &[]).expect_ok();
        let db = self.db();
        let id: String = db
            .query_row(
                "SELECT value FROM meta WHERE key = 'relay_peer_id'",
                [],
                |r| r.get(0),
            )
            .expect("the relay's peer id is recorded");
        id.parse().expect("a peer id")
    }

    /// The relay's SQLite database (`DATA/node.db`), opened read-only.
    pub fn db(&self) -> rusqlite::Connection {
        let path = self.data.join("node.db");
        let c = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap_or_else(|e| panic!("cannot open {} read-only: {e}", path.display()));
        c.busy_timeout(Duration::from_secs(10))
            .expect("set busy timeout");
        c
    }

    /// Every bundle the relay stores: (document id, sequence number, bundle id in hex).
    pub fn stored_bundles(&self) -> Vec<StoredBundle> {
        stored_bundles(&self.db())
    }
}

/// How many bundles the relay stores (cheap enough to poll in a tight loop).
pub fn count_bundles(db: &rusqlite::Connection) -> i64 {
    db.query_row("SELECT COUNT(*) FROM bundles", [], |r| r.get(0))
        .expect("count the relay's bundles")
}

/// One row of the relay's `bundles` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBundle {
    /// The document id (UUID text).
    pub doc: String,
    /// The relay's sequence number.
    pub seq: i64,
    /// The bundle id (64 hex digits).
    pub id: String,
    /// The encoded envelope, when the table holds it.
    pub envelope: Option<Vec<u8>>,
}

fn text_of(v: rusqlite::types::Value) -> String {
    use rusqlite::types::Value as V;
    match v {
        V::Text(t) => t,
        V::Blob(b) if b.len() == 16 => uuid_text(&b),
        V::Blob(b) => hex::encode(b),
        V::Integer(i) => i.to_string(),
        V::Real(r) => r.to_string(),
        V::Null => String::new(),
    }
}

fn uuid_text(b: &[u8]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reads the `bundles` table of a relay database (columns found by name, so the test follows the schema).
pub fn stored_bundles(db: &rusqlite::Connection) -> Vec<StoredBundle> {
    let mut cols = Vec::new();
    let mut stmt = db
        .prepare("PRAGMA table_info(bundles)")
        .expect("table_info(bundles)");
    let mut rows = stmt.query([]).expect("query table_info");
    while let Some(r) = rows.next().expect("row") {
        cols.push(r.get::<_, String>(1).expect("column name"));
    }
    assert!(
        !cols.is_empty(),
        "the relay database has no `bundles` table"
    );
    let pick = |names: &[&str]| {
        names
            .iter()
            .find(|n| cols.iter().any(|c| c == *n))
            .map(|s| s.to_string())
    };
    let doc =
        pick(&["doc", "doc_id", "document", "document_id"]).expect("bundles has a document column");
    let seq = pick(&["seq", "sequence"]).expect("bundles has a seq column");
    let id = pick(&["id", "bundle_id", "hash"]).expect("bundles has an id column");
    let env = pick(&["envelope", "bytes", "data", "body"]);
    let sql = format!(
        "SELECT {doc}, {seq}, {id}, {} FROM bundles ORDER BY {doc}, {seq}",
        env.as_deref().unwrap_or("NULL")
    );
    let mut stmt = db.prepare(&sql).expect("select bundles");
    let mut rows = stmt.query([]).expect("query bundles");
    let mut out = Vec::new();
    while let Some(r) = rows.next().expect("row") {
        out.push(StoredBundle {
            doc: text_of(r.get(0).expect("doc")),
            seq: r.get(1).expect("seq"),
            id: text_of(r.get(2).expect("id")),
            envelope: match r.get::<_, rusqlite::types::Value>(3).expect("envelope") {
                rusqlite::types::Value::Blob(b) => Some(b),
                _ => None,
            },
        });
    }
    out
}

fn one_line(out: String) -> String {
    let lines: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line (an invite code), got:\n{out}"
    );
    lines[0].to_owned()
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}
