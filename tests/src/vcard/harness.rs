//! The test side of cards: a `pcscd` the test owns (foreground child, its own reader configuration
//! with vpcd on a free port), and the `musubi-vcard` emulator driven through its standard input.
//!
//! pcsc-lite has one daemon per machine (`/run/pcscd/pcscd.comm`), so the card scenarios run one at a
//! time and each stops its daemon when done. A daemon the tests did not start makes them fail with a
//! message saying how to stop it, never skip.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{World, bin};

/// pcsc-lite's run directory.
pub const PCSCD_RUN_DIR: &str = "/run/pcscd";
/// The vpcd driver the Debian package `vsmartcard-vpcd` installs.
pub const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";
/// The name pcscd gives the first vpcd slot.
pub const READER_0: &str = "Virtual PCD 00 00";
/// The name pcscd gives the second vpcd slot.
pub const READER_1: &str = "Virtual PCD 00 01";

fn pcscd_path() -> PathBuf {
    for p in ["/usr/sbin/pcscd", "/usr/local/sbin/pcscd", "/sbin/pcscd"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "pcscd is not installed; the card tests need pcsc-lite's daemon and vpcd: \
         apt-get install pcscd vsmartcard-vpcd libpcsclite-dev (scripts/test.sh installs them)"
    );
}

/// The pid of a running pcscd, from its pid file.
pub fn running_pcscd() -> Option<u32> {
    let pid: u32 = fs::read_to_string(Path::new(PCSCD_RUN_DIR).join("pcscd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Two consecutive free loopback ports (vpcd listens on PORT and PORT+1).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = TcpListener::bind("0.0.0.0:0").expect("bind a port");
        let p = a.local_addr().expect("address").port();
        if p < u16::MAX && TcpListener::bind(("0.0.0.0", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free TCP ports for vpcd");
}

/// A pcscd the test started (`pcscd -f -d -c DIR`), stopped when dropped.
pub struct Pcscd {
    child: Option<Child>,
    conf: PathBuf,
    logs: PathBuf,
    port: u16,
    starts: u32,
}

impl Pcscd {
    /// Starts pcscd with the vpcd reader (two slots, [`READER_0`] and [`READER_1`]) on a free port.
    pub fn start(world: &World) -> Self {
        Self::start_with(world, true)
    }

    /// Starts pcscd with the vpcd reader, or with no reader at all.
    pub fn start_with(world: &World, readers: bool) -> Self {
        let conf = world.path().join("pcscd-readers");
        let mut p = Self {
            child: None,
            conf,
            logs: world.logs(),
            port: free_port_pair(),
            starts: 0,
        };
        p.launch(readers);
        p
    }

    /// The port of the first vpcd slot (the second is one more).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn write_conf(&self, readers: bool) {
        let _ = fs::remove_dir_all(&self.conf);
        fs::create_dir_all(&self.conf).expect("create the reader configuration directory");
        if readers {
            assert!(
                Path::new(VPCD_DRIVER).is_file(),
                "the vpcd driver {VPCD_DRIVER} is missing: apt-get install vsmartcard-vpcd"
            );
            let conf = format!(
                "FRIENDLYNAME \"Virtual PCD\"\nDEVICENAME /dev/null:0x{port:04X}\nLIBPATH {VPCD_DRIVER}\nCHANNELID 0x{port:04X}\n",
                port = self.port
            );
            fs::write(self.conf.join("vpcd"), conf).expect("write the vpcd reader configuration");
        }
    }

    fn launch(&mut self, readers: bool) {
        assert!(self.child.is_none(), "pcscd already runs");
        if let Some(pid) = running_pcscd() {
            panic!(
                "a pcscd the tests did not start is running (pid {pid}); the card tests start and stop their own. \
                 Stop it first (systemctl stop pcscd.socket pcscd.service, or kill {pid})"
            );
        }
        // A daemon killed with SIGKILL leaves its socket and pid file behind; pcscd refuses to start over them.
        for f in ["pcscd.comm", "pcscd.pid"] {
            let _ = fs::remove_file(Path::new(PCSCD_RUN_DIR).join(f));
        }
        self.write_conf(readers);
        self.starts += 1;
        let log = self.logs.join(format!("pcscd.{}.log", self.starts));
        let out = fs::File::create(&log).expect("create the pcscd log");
        let err = out.try_clone().expect("clone a file handle");
        let child = Command::new(pcscd_path())
            .args(["--foreground", "--debug", "--config"])
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start pcscd: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("daemon ready") {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "pcscd exited at start ({status}); it needs root to create {PCSCD_RUN_DIR} (CI runs as root). Its log:\n{text}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "pcscd did not become ready within 10 s; its log:\n{text}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops pcscd (SIGTERM, then SIGKILL after 5 s) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Kills pcscd with SIGKILL (a crash), leaving its socket file behind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts pcscd again (after [`Pcscd::stop`] or [`Pcscd::kill`]), with or without the vpcd reader.
    pub fn restart(&mut self, readers: bool) {
        self.stop();
        self.launch(readers);
    }

    /// Whether the daemon still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `musubi-vcard` emulator for one vpcd slot, driven line by line; killed when dropped.
pub struct VCard {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
    /// Its APDU log (JSON lines).
    pub log: PathBuf,
}

impl VCard {
    /// Starts the emulator for the vpcd slot on `port` and waits until its test CA is made.
    pub fn start(world: &World, port: u16, name: &str) -> Self {
        let log = world.logs().join(format!("{name}.apdu.jsonl"));
        let err = fs::File::create(world.logs().join(format!("{name}.err")))
            .expect("create the emulator log");
        let mut child = Command::new(bin("musubi-vcard"))
            .args(["--port", &port.to_string(), "--log"])
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start musubi-vcard: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, replies) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut v = Self {
            child,
            stdin,
            replies,
            log,
        };
        let ready = v.reply(Duration::from_secs(120));
        assert_eq!(ready, "ready", "musubi-vcard did not start: {ready}");
        v
    }

    fn reply(&mut self, timeout: Duration) -> String {
        self.replies
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("musubi-vcard gave no answer within {timeout:?} ({e})"))
    }

    /// Sends one command (see `musubi-vcard --help`); returns the text after `ok `; panics on `err`.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to musubi-vcard");
        self.stdin.flush().expect("flush");
        let r = self.reply(Duration::from_secs(120));
        match r.strip_prefix("ok ") {
            Some(rest) => rest.to_owned(),
            None => panic!("musubi-vcard refused `{line}`: {r}"),
        }
    }

    /// Puts card `name` on the reader (`spec`: its kind and options when new, e.g. "mynumber pin=1234").
    pub fn insert(&mut self, name: &str, spec: &str) {
        self.cmd(&format!("insert {name} {spec}"));
    }

    /// Takes the card off the reader.
    pub fn remove(&mut self) {
        self.cmd("remove");
    }

    /// `status NAME`, as key=value pairs.
    pub fn status(&mut self, name: &str) -> std::collections::BTreeMap<String, String> {
        self.cmd(&format!("status {name}"))
            .split(' ')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    /// Every line of the log so far.
    pub fn entries(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The APDU entries after the first `skip` log lines (use [`VCard::mark`] to take `skip`).
    pub fn apdus_since(&self, skip: usize) -> Vec<Value> {
        self.entries()
            .into_iter()
            .skip(skip)
            .filter(|e| e.get("c").is_some())
            .collect()
    }

    /// How many log lines there are now.
    pub fn mark(&self) -> usize {
        self.entries().len()
    }
}

impl Drop for VCard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command APDU of a log entry, upper-case hex.
pub fn command_of(e: &Value) -> &str {
    e.get("c").and_then(Value::as_str).unwrap_or("")
}

/// Whether a log entry selects EF 0001 of the 券面事項入力補助AP (the 個人番号).
pub fn selects_individual_number(e: &Value) -> bool {
    let c = command_of(e);
    let at_kenhojo = e
        .get("at")
        .and_then(Value::as_str)
        .is_some_and(|a| a.starts_with("kenhojo"));
    let now = e.get("now").and_then(Value::as_str) == Some("kenhojo/0001");
    now || (at_kenhojo && c.starts_with("00A402") && c.len() >= 14 && &c[10..14] == "0001")
}

/// Whether a log entry is a VERIFY that carries a PIN (not the tries-left query).
pub fn sends_pin(e: &Value) -> bool {
    let c = command_of(e);
    c.starts_with("00200080") && c.len() > 8
}

/// Runs `cmd` with `input` on its standard input (then closed), killing it after `timeout`.
pub fn run_with_stdin(mut cmd: Command, input: &str, timeout: Duration) -> crate::Output {
    let line = crate::cmdline(&cmd);
    let start = Instant::now();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_owned();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for a child") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{line}` did not finish within {timeout:?}; killed it");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    crate::Output {
        cmdline: line,
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// `musubi card watch` in the background, its JSON lines collected as they come.
pub struct Watch {
    child: Child,
    lines: mpsc::Receiver<Value>,
    /// Every event seen so far.
    pub seen: Vec<Value>,
}

impl Watch {
    /// Starts `musubi card watch`.
    pub fn start() -> Self {
        let mut child = Command::new(bin("musubi"))
            .args(["card", "watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start musubi card watch: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("card watch printed a non-JSON line ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Waits for an event whose `event` is `kind` (and `reader`, when given); panics with what came instead.
    pub fn expect(&mut self, kind: &str, reader: Option<&str>, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == kind && reader.is_none_or(|r| v["reader"] == r) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "card watch printed no {kind} event within {timeout:?}; it printed:\n{}",
                    self.seen
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Whether the watch process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
