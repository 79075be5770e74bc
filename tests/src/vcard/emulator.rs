//! The emulator's run loop: one reader slot of vpcd, the cards that can be put on it, the APDU log,
//! and the control commands that insert, remove and swap cards.
//!
//! vpcd's protocol (vsmartcard `vpcd.c`): the emulator connects to the port pcscd's vpcd driver listens
//! on (35963 by default; 35964 for the second slot); a connection is a card in the reader and closing
//! it takes the card out. Every message is a 2-byte big-endian length and a payload. A 1-byte payload
//! is control: `00` power off, `01` power on, `02` reset, `04` get ATR (answered with the ATR); any
//! longer payload is a command APDU, answered with the response APDU.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::cards::{Answer, Card, Kind, TestCa};

/// Largest vpcd message accepted, in bytes (the length prefix allows 65535).
pub const MESSAGE_BYTES_MAX: usize = 65_535;
/// How long the slot stays empty after a card leaves before the next connects: longer than pcscd's
/// polling interval of serial readers (400 ms), as a hand takes to swap cards, so the reader notices
/// the removal (a vpcd connection swapped faster looks like one card that stopped answering).
pub const SWAP_GAP: Duration = Duration::from_millis(900);

struct Shared {
    cards: BTreeMap<String, Card>,
    /// The card on the reader and its insertion number.
    inserted: Option<(String, u64)>,
    insertions: u64,
    connected: Option<u64>,
}

/// The emulator: a test CA, named cards, one reader slot, and a log of every APDU.
pub struct Emulator {
    ca: TestCa,
    shared: Arc<Mutex<Shared>>,
    log: Arc<Mutex<File>>,
    start: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Emulator {
    /// Makes the test CA and starts the slot thread connecting to vpcd at `addr`; logs to `log_path`.
    pub fn start(addr: SocketAddr, log_path: &Path) -> std::io::Result<Self> {
        let ca = TestCa::generate();
        let log = Arc::new(Mutex::new(File::create(log_path)?));
        let shared = Arc::new(Mutex::new(Shared {
            cards: BTreeMap::new(),
            inserted: None,
            insertions: 0,
            connected: None,
        }));
        let start = Instant::now();
        let em = Self {
            ca,
            shared,
            log,
            start,
        };
        let (shared, log) = (em.shared.clone(), em.log.clone());
        thread::Builder::new()
            .name("vpcd-slot".into())
            .spawn(move || slot(addr, shared, log, start))?;
        Ok(em)
    }

    /// The test CA's certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Runs one control command; returns the reply line (`ok ...` or `err ...`).
    ///
    /// - `card NAME KIND [k=v ...]`: define a card (kinds: mynumber, mynumber-expired, felica, mifare,
    ///   random-uid, unsupported); options as [`Card::set`].
    /// - `insert NAME [KIND [k=v ...]]`: put the card on the reader (defining it first if KIND is given
    ///   and it is new); a card already there is taken off first (a swap).
    /// - `remove`: take the card off.
    /// - `set NAME k=v ...`: change a card's options.
    /// - `status NAME`: its counters and the identifiers that must never appear in the clear.
    pub fn command(&self, line: &str) -> String {
        // Split on ASCII spaces only: Japanese values contain U+3000.
        let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
        match self.run(&words) {
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("err {e}"),
        }
    }

    fn define(&self, name: &str, kind: &str, opts: &[&str]) -> Result<(), String> {
        let (kind, expired) = match kind {
            "mynumber-expired" => ("mynumber", true),
            k => (k, false),
        };
        let mut card = Card::new(name, kind, &self.ca, expired)?;
        apply(&mut card, opts)?;
        lock(&self.shared).cards.insert(name.to_owned(), card);
        Ok(())
    }

    fn run(&self, w: &[&str]) -> Result<String, String> {
        match w {
            ["card", name, kind, opts @ ..] => {
                self.define(name, kind, opts)?;
                Ok(format!("card {name}"))
            }
            ["insert", name, rest @ ..] => {
                let known = lock(&self.shared).cards.contains_key(*name);
                match rest {
                    [kind, opts @ ..] if !known => self.define(name, kind, opts)?,
                    [_, opts @ ..] => apply(
                        lock(&self.shared).cards.get_mut(*name).expect("known"),
                        opts,
                    )?,
                    [] if !known => return Err(format!("no card {name}; give its kind")),
                    [] => {}
                }
                let n = {
                    let mut s = lock(&self.shared);
                    s.insertions += 1;
                    let n = s.insertions;
                    if let Some(c) = s.cards.get_mut(*name) {
                        c.commands = 0;
                    }
                    s.inserted = Some((name.to_string(), n));
                    n
                };
                self.event("insert", Some(name));
                // Wait (briefly) until vpcd took the connection, so "ok" means the reader can see it.
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline {
                    if lock(&self.shared).connected == Some(n) {
                        return Ok(format!("insert {name} connected"));
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Ok(format!("insert {name} pending (no vpcd listening yet)"))
            }
            ["remove"] => {
                let was = lock(&self.shared).inserted.take();
                self.event("remove", was.as_ref().map(|(n, _)| n.as_str()));
                // Wait until the slot thread closed the connection.
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline && lock(&self.shared).connected.is_some() {
                    thread::sleep(Duration::from_millis(2));
                }
                // Reply once the reader has had time to notice (it polls a few times a second).
                if was.is_some() {
                    thread::sleep(SWAP_GAP);
                }
                Ok("remove".into())
            }
            ["set", name, opts @ ..] => {
                let mut s = lock(&self.shared);
                let card = s
                    .cards
                    .get_mut(*name)
                    .ok_or_else(|| format!("no card {name}"))?;
                apply(card, opts)?;
                Ok(format!("set {name}"))
            }
            ["status", name] => {
                let s = lock(&self.shared);
                let card = s
                    .cards
                    .get(*name)
                    .ok_or_else(|| format!("no card {name}"))?;
                Ok(match &card.kind {
                    Kind::MyNumber(m) => format!(
                        "status {name} auth_tries={} kenhojo_tries={} serial={} spki={} my_number={}",
                        m.auth_pin.tries,
                        m.kenhojo_pin.tries,
                        hex::encode_upper(&m.serial),
                        hex::encode_upper(m.spki_der()),
                        m.my_number
                    ),
                    Kind::Felica(idm) => format!("status {name} uid={}", hex::encode_upper(idm)),
                    Kind::Mifare(uid) => format!("status {name} uid={}", hex::encode_upper(uid)),
                    _ => format!("status {name}"),
                })
            }
            [] => Err("empty command".into()),
            other => Err(format!("unknown command {:?}", other.join(" "))),
        }
    }

    fn event(&self, what: &str, card: Option<&str>) {
        write_log(
            &self.log,
            self.start,
            serde_json::json!({"event": what, "card": card}),
        );
    }
}

fn apply(card: &mut Card, opts: &[&str]) -> Result<(), String> {
    for o in opts {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| format!("option {o:?} is not key=value"))?;
        card.set(k, v)?;
    }
    Ok(())
}

fn write_log(log: &Mutex<File>, start: Instant, mut v: serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "t_ms".into(),
            (start.elapsed().as_secs_f64() * 1000.0).into(),
        );
    }
    let mut f = lock(log);
    let _ = writeln!(f, "{v}");
    let _ = f.flush();
}

/// The slot thread: while a card is inserted, keep a connection to vpcd and answer it.
fn slot(addr: SocketAddr, shared: Arc<Mutex<Shared>>, log: Arc<Mutex<File>>, start: Instant) {
    let mut left: Option<Instant> = None;
    loop {
        if let Some(t) = left
            && t.elapsed() < SWAP_GAP
        {
            thread::sleep(SWAP_GAP - t.elapsed());
        }
        let Some((name, n)) = lock(&shared).inserted.clone() else {
            thread::sleep(Duration::from_millis(2));
            continue;
        };
        let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => s,
            Err(_) => {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(5)));
        lock(&shared).connected = Some(n);
        write_log(
            &log,
            start,
            serde_json::json!({"event": "connected", "card": name}),
        );
        let end = serve(&mut stream, &name, n, &shared, &log, start);
        let _ = stream.shutdown(Shutdown::Both);
        lock(&shared).connected = None;
        left = Some(Instant::now());
        write_log(
            &log,
            start,
            serde_json::json!({"event": "disconnected", "card": name, "why": end}),
        );
    }
}

/// Answers vpcd until the card is removed (or vpcd goes away); returns why it stopped.
fn serve(
    stream: &mut TcpStream,
    name: &str,
    n: u64,
    shared: &Mutex<Shared>,
    log: &Mutex<File>,
    start: Instant,
) -> &'static str {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut muted = false;
    loop {
        if lock(shared).inserted.as_ref().map(|(_, k)| *k) != Some(n) {
            return "removed";
        }
        // vpcd writes a message's length and its payload in two segments; acknowledge at once, or the
        // kernel's delayed ACK holds the payload back 40 ms at every exchange (a TCP artefact of the
        // emulation, absent with a real reader).
        let _ = socket2::SockRef::from(&*stream).set_tcp_quickack(true);
        match stream.read(&mut chunk) {
            Ok(0) => return "vpcd closed the connection",
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => return "connection error",
        }
        while buf.len() >= 2 {
            let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
            if buf.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = buf.drain(..2 + len).skip(2).collect();
            let mut s = lock(shared);
            let Some(card) = s.cards.get_mut(name) else {
                return "card deleted";
            };
            let reply = match msg.as_slice() {
                [0x00] | [0x01] | [0x02] => {
                    card.reset();
                    muted = false;
                    let what = ["power_off", "power_on", "reset"][msg[0] as usize];
                    write_log(log, start, serde_json::json!({"event": what, "card": name}));
                    None
                }
                [0x04] => Some(card.atr()),
                [other] => {
                    write_log(
                        log,
                        start,
                        serde_json::json!({"event": "unknown_control", "byte": other}),
                    );
                    None
                }
                apdu => {
                    let before = card.location();
                    let answer = if muted { Answer::Mute } else { card.apdu(apdu) };
                    let after = card.location();
                    let mut entry = serde_json::json!({
                        "card": name, "c": hex::encode_upper(apdu), "at": before, "now": after,
                    });
                    let reply = match answer {
                        Answer::Reply(r) => {
                            entry["r"] = hex::encode_upper(&r).into();
                            Some(r)
                        }
                        Answer::Mute => {
                            muted = true;
                            entry["r"] = serde_json::Value::Null;
                            entry["mute"] = true.into();
                            None
                        }
                        Answer::Remove => {
                            entry["r"] = serde_json::Value::Null;
                            entry["removed"] = true.into();
                            write_log(log, start, entry);
                            s.inserted = None;
                            return "removed mid-command";
                        }
                    };
                    write_log(log, start, entry);
                    reply
                }
            };
            drop(s);
            if let Some(r) = reply {
                if r.len() > MESSAGE_BYTES_MAX {
                    return "response too large";
                }
                let mut out = (r.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&r);
                if stream.write_all(&out).is_err() {
                    return "connection error";
                }
            }
        }
    }
}
