//! `musubi card ...`: IC card readers and cards (PC/SC).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Subcommand;
use musubi_crdt::crypto::PseudonymSector;
use musubi_facility::card::{
    self, CardError, CardEvent, CardRead, CardState, Pin, PinKind, PinPrompt, ReadOptions, Watcher,
};
use zeroize::Zeroizing;

use crate::{Data, Json, open_staff, print_json};

/// Most bytes read from standard input for PINs and passwords.
const STDIN_BYTES_MAX: usize = 4096;

#[derive(Subcommand)]
pub(crate) enum CardCommand {
    /// The card readers, what is on them, and the state the reception desk shows.
    Readers {
        #[command(flatten)]
        json: Json,
    },
    /// Watch readers and cards: one JSON line per event (reader or card in or out, service down or up).
    Watch {
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long = "for", value_name = "SECS")]
        duration: Option<f64>,
    },
    /// Wait for a card and print its kind and pseudonymous id (a card already on a reader counts).
    Read {
        #[command(flatten)]
        data: Data,
        /// Also read 氏名, 住所, 生年月日, 性別 (My Number card: only with the resident's consent; needs the
        /// 券面事項入力補助 PIN).
        #[arg(long)]
        attributes: bool,
        /// Prove the card holds its certified key (My Number card; needs the user-authentication PIN).
        #[arg(long)]
        verify: bool,
        /// Read PINs from standard input, one line per PIN (with --verify and --attributes: the
        /// user-authentication PIN, then the 券面事項入力補助 PIN). A PIN is sent only when needed.
        #[arg(long)]
        pin_stdin: bool,
        /// Send a PIN even when only one try is left (the resident confirmed; a wrong PIN then locks it).
        #[arg(long)]
        confirm_last_try: bool,
        /// Only this reader.
        #[arg(long)]
        reader: Option<String>,
        /// Wait at most this many seconds for a card.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Give up on a card that stops answering for this many seconds.
        #[arg(long, default_value_t = 8.0)]
        card_timeout: f64,
        /// The sector of the id: `reception` (evacuees' cards at a shelter or HQ), `clinic`
        /// (patients' cards), `staff` (staff cards). Default: the people this facility registers
        /// (reception at a shelter or HQ, clinic at a clinic, staff at a care office). A facility
        /// holds only its role's keys: another sector is refused.
        #[arg(long)]
        sector: Option<PseudonymSector>,
        #[command(flatten)]
        json: Json,
    },
}

/// Lines of standard input, read once (bounded), handed out one at a time.
#[derive(Clone, Default)]
pub(crate) struct StdinLines(Arc<Mutex<VecDeque<Zeroizing<String>>>>);

impl StdinLines {
    pub(crate) fn read() -> Result<Self> {
        let mut buf = Zeroizing::new(Vec::new());
        std::io::stdin()
            .take(STDIN_BYTES_MAX as u64 + 1)
            .read_to_end(&mut buf)?;
        if buf.len() > STDIN_BYTES_MAX {
            bail!("standard input is longer than {STDIN_BYTES_MAX} bytes");
        }
        let text = String::from_utf8_lossy(&buf);
        let lines = text
            .lines()
            .map(|l| Zeroizing::new(l.trim_end_matches('\r').to_owned()))
            .collect();
        Ok(Self(Arc::new(Mutex::new(lines))))
    }

    pub(crate) fn next(&self) -> Option<Zeroizing<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// The remaining lines, each checked as a card PIN before any card is touched.
    pub(crate) fn check_pins(&self) -> Result<()> {
        for l in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            Pin::new(l)?;
        }
        Ok(())
    }
}

/// A card's PIN from MUSUBI_STAFF_PIN (`--staff-card`), given once: a wrong PIN is not sent again.
pub(crate) struct EnvPin(pub(crate) bool);

impl PinPrompt for EnvPin {
    fn pin(&mut self, _which: PinKind, _tries_left: u8) -> Option<Pin> {
        if std::mem::replace(&mut self.0, true) {
            return None;
        }
        Pin::new(&std::env::var("MUSUBI_STAFF_PIN").ok()?).ok()
    }
}

/// Hands out PINs from standard input, telling the person how many tries are left.
pub(crate) struct StdinPins(pub(crate) Option<StdinLines>);

impl PinPrompt for StdinPins {
    fn pin(&mut self, which: PinKind, tries_left: u8) -> Option<Pin> {
        eprintln!(
            "{}: 残り{tries_left}回 ({} — {tries_left} tries left)",
            which.label_ja(),
            which.label_en()
        );
        let line = self.0.as_ref()?.next()?;
        Pin::new(&line).ok()
    }
}

fn event_line(e: &CardEvent, s: &CardState, start: Instant) -> serde_json::Value {
    let mut v = serde_json::to_value(e).expect("events serialise");
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "state".into(),
            serde_json::to_value(s).expect("states serialise"),
        );
        o.insert("message_ja".into(), s.message_ja().into());
        o.insert("message_en".into(), s.message_en().into());
        o.insert("t_ms".into(), (start.elapsed().as_millis() as u64).into());
    }
    v
}

pub(crate) fn card_error_json(e: &CardError) -> serde_json::Value {
    serde_json::json!({"error": {"kind": e.kind(), "message": e.to_string(), "message_ja": e.message_ja()}})
}

pub(crate) fn print_read(r: &CardRead, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    let kind = match r.identity.kind {
        card::CardKind::MyNumber => "my_number (マイナンバーカード)",
        card::CardKind::Contactless => "contactless",
    };
    println!("kind             {kind}");
    println!("pseudonymous_id  {}", r.identity.pseudonymous_id);
    println!("reader           {}", r.identity.reader);
    if let Some(t) = &r.identity.technology {
        println!("technology       {t}");
    }
    if let Some(x) = &r.identity.expires {
        println!(
            "expires          {x}{}",
            if r.identity.expired {
                "  (EXPIRED)"
            } else {
                ""
            }
        );
    }
    if r.possession_verified {
        println!("possession       verified (PIN and signature)");
    }
    if let Some(a) = &r.attributes {
        println!("氏名             {}", a.name);
        println!("住所             {}", a.address);
        println!("生年月日         {}", a.birth_date);
        println!(
            "性別             {}",
            match a.sex {
                card::Sex::Male => "男",
                card::Sex::Female => "女",
                card::Sex::Other => "その他",
            }
        );
    }
    Ok(())
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: CardCommand) -> Result<()> {
    match cmd {
        CardCommand::Readers { json } => {
            let mut w = Watcher::new();
            w.snapshot();
            let state = w.state();
            let readers: Vec<_> = w
                .readers()
                .into_iter()
                .map(|(name, atr)| {
                    serde_json::json!({
                        "name": name,
                        "card": atr.as_ref().is_some_and(|a| !a.is_empty()),
                        "mute": atr.as_ref().is_some_and(Vec::is_empty),
                        "atr": atr.filter(|a| !a.is_empty()).map(hex::encode_upper),
                    })
                })
                .collect();
            if json.json {
                print_json(&serde_json::json!({
                    "state": state, "message_ja": state.message_ja(), "message_en": state.message_en(), "readers": readers,
                }))?;
            } else {
                println!("{} / {}", state.message_ja(), state.message_en());
                for r in &readers {
                    let what = if r["mute"] == true {
                        "card (not responding)".to_owned()
                    } else if r["card"] == true {
                        format!("card  ATR {}", r["atr"].as_str().unwrap_or(""))
                    } else {
                        "empty".to_owned()
                    };
                    println!("  {}  {what}", r["name"].as_str().unwrap_or(""));
                }
            }
        }
        CardCommand::Watch { duration } => {
            let start = Instant::now();
            let until = duration.map(|s| start + Duration::from_secs_f64(s.max(0.0)));
            let mut w = Watcher::new();
            let mut out = std::io::stdout().lock();
            loop {
                let step = match until {
                    Some(u) => match u.checked_duration_since(Instant::now()) {
                        Some(left) => left.min(Duration::from_millis(500)),
                        None => break,
                    },
                    None => Duration::from_millis(500),
                };
                for e in w.poll(step) {
                    writeln!(out, "{}", event_line(&e, &w.state(), start))?;
                    out.flush()?;
                }
            }
        }
        CardCommand::Read {
            data,
            attributes,
            verify,
            pin_stdin,
            confirm_last_try,
            reader,
            timeout,
            card_timeout,
            sector,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let needs_pin = attributes || verify;
            let lines = if pin_stdin && needs_pin {
                let l = StdinLines::read()?;
                l.check_pins()?;
                Some(l)
            } else {
                if pin_stdin {
                    eprintln!("note: this read needs no PIN; none is read or sent");
                }
                None
            };
            let opts = ReadOptions {
                reader,
                timeout: Duration::from_secs(timeout),
                verify,
                attributes,
                confirm_last_try,
                exchange_timeout: Duration::from_secs_f64(card_timeout.max(0.1)),
            };
            let sector = match sector {
                Some(s) => s,
                None => e.resident_sector()?.unwrap_or(PseudonymSector::Staff),
            };
            match card::read(&e, sector, &opts, Box::new(StdinPins(lines))) {
                Ok(r) => {
                    if attributes && r.attributes.is_none() {
                        eprintln!(
                            "note: this card carries no attributes (only a My Number card does)"
                        );
                    }
                    print_read(&r, json.json)?;
                }
                Err(err) => {
                    if json.json {
                        print_json(&card_error_json(&err))?;
                    }
                    return Err(err.into());
                }
            }
        }
    }
    Ok(())
}
