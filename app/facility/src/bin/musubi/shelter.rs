//! `musubi shelter ...` (避難所 reception) and `musubi mail ...` (relatives' notifications).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use musubi_crdt::documents::shelter::{
    CareFlag, MedicalNote, Method, NewEvacuee, RequestStatus, ShelterStatus, StayKind, Urgency,
};
use musubi_facility::engine::now_ms;
use musubi_facility::mail;
use musubi_facility::services::shelter;

use crate::{Data, Json, open_staff, print_json, refresh_directory_for, runtime};

#[derive(Args)]
pub(crate) struct Shelter {
    /// The shelter id (printed by `shelter open`, listed by `shelter list`).
    #[arg(long)]
    shelter: String,
}

#[derive(Args)]
pub(crate) struct When {
    /// When it happened (RFC 3339, e.g. 2024-01-09T18:00:00+09:00); default now.
    #[arg(long)]
    at: Option<String>,
}

#[derive(Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the CLI"
)]
pub(crate) enum ShelterCommand {
    /// Open (開設) a shelter: prints its id. Every HQ facility becomes a member.
    Open {
        #[command(flatten)]
        data: Data,
        /// 名称.
        #[arg(long)]
        name: String,
        /// 収容人数.
        #[arg(long, default_value_t = 0)]
        capacity: u64,
        /// 施設コード (e.g. the registry id CC0000000504).
        #[arg(long, default_value = "")]
        code: String,
        /// 住所.
        #[arg(long, default_value = "")]
        address: String,
        /// An HQ facility (id or exact name) that may read the medical notes (保健医療班); repeatable.
        #[arg(long = "health-section")]
        health_sections: Vec<String>,
        #[command(flatten)]
        when: When,
        #[command(flatten)]
        json: Json,
    },
    /// Shelters this facility can read, with head counts.
    List {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// Check a person in (入所): prints the evacuee id (the existing one for a known person).
    Checkin {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        /// 氏名.
        #[arg(long)]
        name: String,
        /// 生年月日 (YYYY-MM-DD).
        #[arg(long, default_value = "")]
        birth: String,
        /// かな.
        #[arg(long, default_value = "")]
        kana: String,
        /// 性別.
        #[arg(long, default_value = "")]
        sex: String,
        /// 住所.
        #[arg(long, default_value = "")]
        address: String,
        /// 世帯.
        #[arg(long, default_value = "")]
        household: String,
        /// 連絡先.
        #[arg(long, default_value = "")]
        contact: String,
        /// The pseudonymous card id (hex HMAC from `musubi card`), never a card number.
        #[arg(long, default_value = "")]
        card_id: String,
        /// Wait for a card tap (My Number card or transit card) and use its pseudonymous id as the card
        /// id (no PIN is asked); the method follows the card unless --method is given.
        #[arg(long, conflicts_with = "card_id")]
        card: bool,
        /// With --card: wait at most this many seconds for the tap.
        #[arg(long, default_value_t = 30)]
        card_timeout: u64,
        /// How the person was identified.
        #[arg(long, default_value = "manual", value_parser = ["my-number-card", "transit-card", "qr", "manual"])]
        method: String,
        /// 要配慮 flags, comma separated: elderly, disability, infant, pregnant, foreigner,
        /// care-needed, medical-care, food-allergy (or 高齢者, 障害者, ...).
        #[arg(long, default_value = "")]
        needs: String,
        /// アレルギー.
        #[arg(long, default_value = "")]
        allergies: String,
        /// ペット.
        #[arg(long, default_value = "")]
        pets: String,
        /// 車両.
        #[arg(long, default_value = "")]
        vehicle: String,
        /// 安否情報の開示同意: HQ may tell inquirers where this person is.
        #[arg(long)]
        consent: bool,
        /// A relative to notify by e-mail, NAME:EMAIL; repeatable.
        #[arg(long = "relative")]
        relatives: Vec<String>,
        #[command(flatten)]
        when: When,
        #[command(flatten)]
        json: Json,
    },
    /// Check an evacuee out (退所).
    Checkout(StayArgs),
    /// Temporary leave (外泊・一時外出); the person still counts as present.
    Leave(StayArgs),
    /// Back from leave (帰所).
    Return(StayArgs),
    /// Close (閉鎖) a shelter.
    Close {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        #[command(flatten)]
        when: When,
    },
    /// Reopen (開設) a closed shelter.
    Reopen {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        #[command(flatten)]
        when: When,
    },
    /// The roster (merged evacuees with their stays).
    Roster {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        #[command(flatten)]
        json: Json,
    },
    /// Needs (ニーズ) and supply requests of a shelter; --add or --resolve a need.
    Needs {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        /// Add a need (free text); prints its id.
        #[arg(long, conflicts_with = "resolve")]
        add: Option<String>,
        /// Mark the need with this id resolved.
        #[arg(long)]
        resolve: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// A supply request (物資要請): --item and --quantity make one (prints its id); --id and --status
    /// move one forward (open → arranged → delivered, or cancelled).
    Request {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        /// 品目.
        #[arg(long, required_unless_present = "id")]
        item: Option<String>,
        /// 数量.
        #[arg(long, default_value_t = 1)]
        quantity: u64,
        /// 単位 (枚, 箱, ...).
        #[arg(long, default_value = "")]
        unit: String,
        /// 緊急度: low, medium, high.
        #[arg(long, default_value = "medium")]
        urgency: String,
        /// A note.
        #[arg(long, default_value = "")]
        note: String,
        /// An existing request's id.
        #[arg(long, requires = "status")]
        id: Option<String>,
        /// Its new status: arranged, delivered, cancelled.
        #[arg(long)]
        status: Option<String>,
    },
    /// Add a relative to notify on later check-ins.
    Relative {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        /// The evacuee id.
        #[arg(long)]
        evacuee: String,
        /// NAME:EMAIL.
        #[arg(long)]
        relative: String,
    },
    /// Share the medical notes with an HQ health section (owner only).
    MedicalShare {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        /// The facility (id or exact name).
        #[arg(long = "with")]
        with: String,
    },
    /// Write an evacuee's medical note (持病, 服薬, 要介護).
    MedicalNote {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        /// The evacuee id.
        #[arg(long)]
        evacuee: String,
        /// 持病.
        #[arg(long, default_value = "")]
        conditions: String,
        /// 服薬.
        #[arg(long, default_value = "")]
        medications: String,
        /// 要介護.
        #[arg(long, default_value = "")]
        care_level: String,
        /// Other notes.
        #[arg(long, default_value = "")]
        notes: String,
    },
    /// The medical notes (members of the medical document only).
    Medical {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        shelter: Shelter,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Args)]
pub(crate) struct StayArgs {
    #[command(flatten)]
    data: Data,
    #[command(flatten)]
    shelter: Shelter,
    /// The evacuee id.
    #[arg(long)]
    evacuee: String,
    /// How the person was identified.
    #[arg(long, default_value = "manual", value_parser = ["my-number-card", "transit-card", "qr", "manual"])]
    method: String,
    #[command(flatten)]
    when: When,
}

#[derive(Subcommand)]
pub(crate) enum MailCommand {
    /// Deliver queued notifications by SMTP (lettre); exits 0 when none is left waiting.
    Send {
        #[command(flatten)]
        data: Data,
        /// The SMTP server, HOST:PORT.
        #[arg(long)]
        smtp: String,
        /// The From address.
        #[arg(
            long,
            default_value = "Musubi 避難所受付 <noreply@shelter.musubi.invalid>"
        )]
        from: String,
        /// Require STARTTLS.
        #[arg(long)]
        starttls: bool,
        /// Keep retrying (with backoff) for up to this many seconds while messages wait.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Keep delivering forever (next to `musubi sync --watch`).
        #[arg(long, conflicts_with = "wait")]
        watch: bool,
        #[command(flatten)]
        json: Json,
    },
    /// The outbox (states and attempts; no message content).
    Status {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// Send an `unconfirmed` (or failed) message again, with the same Message-ID.
    Resend {
        #[command(flatten)]
        data: Data,
        /// The outbox id (from `mail status`).
        id: String,
    },
}

fn method(s: &str) -> Result<Method> {
    Ok(s.parse::<Method>()?)
}

fn flags(s: &str) -> Result<BTreeSet<CareFlag>> {
    let mut out = BTreeSet::new();
    for f in s
        .split([',', '、', '・'])
        .map(str::trim)
        .filter(|f| !f.is_empty())
    {
        out.insert(f.parse::<CareFlag>()?);
    }
    Ok(out)
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: ShelterCommand) -> Result<()> {
    match cmd {
        ShelterCommand::Open {
            data,
            name,
            capacity,
            code,
            address,
            health_sections,
            when,
            json,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            for h in &health_sections {
                refresh_directory_for(&mut e, h)?;
            }
            let opened = shelter::open(
                &mut e,
                &shelter::OpenShelter {
                    name,
                    code,
                    address,
                    capacity,
                    health_sections,
                    at: when.at,
                },
            )?;
            if json.json {
                print_json(&opened)?;
            } else {
                println!("{}", opened.shelter);
            }
        }
        ShelterCommand::List { data, json } => {
            let e = open_staff(pf, &data.data)?;
            let list = shelter::list(&e)?;
            if json.json {
                print_json(&list)?;
            } else {
                for s in list {
                    println!(
                        "{}  {}  {}  {}/{}  ({})",
                        s.id,
                        s.shelter.name,
                        if s.shelter.status == ShelterStatus::Open {
                            "開設"
                        } else {
                            "閉鎖"
                        },
                        s.present,
                        s.shelter.capacity,
                        s.role
                    );
                }
            }
        }
        ShelterCommand::Checkin {
            data,
            shelter: s,
            name,
            birth,
            kana,
            sex,
            address,
            household,
            contact,
            card_id,
            card,
            card_timeout,
            method: m,
            needs,
            allergies,
            pets,
            vehicle,
            consent,
            relatives,
            when,
            json,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let relatives = relatives
                .iter()
                .map(|r| shelter::parse_relative(r))
                .collect::<Result<Vec<_>, _>>()?;
            let (card_id, m) = if card {
                let tap = musubi_facility::card::wait_for_tap(
                    &e,
                    musubi_crdt::crypto::PseudonymSector::Reception,
                    Duration::from_secs(card_timeout),
                )?;
                let m = match (m.as_str(), tap.kind) {
                    ("manual", musubi_facility::card::CardKind::MyNumber) => {
                        "my-number-card".to_owned()
                    }
                    ("manual", musubi_facility::card::CardKind::Contactless) => {
                        "transit-card".to_owned()
                    }
                    _ => m,
                };
                (tap.pseudonymous_id, m)
            } else {
                (card_id, m)
            };
            let outcome = shelter::checkin(
                &mut e,
                &s.shelter,
                &shelter::CheckIn {
                    person: NewEvacuee {
                        name,
                        kana,
                        birth_date: birth,
                        sex,
                        address,
                        household,
                        contact,
                        card_id,
                        flags: flags(&needs)?,
                        allergies,
                        pets,
                        vehicle,
                        consent,
                        relatives,
                    },
                    method: method(&m)?,
                    at: when.at,
                },
            )?;
            if json.json {
                print_json(&outcome)?;
            } else {
                println!("{}", outcome.evacuee);
                if outcome.already_present {
                    eprintln!("note: already checked in here; nothing recorded");
                } else if outcome.reused {
                    eprintln!("note: a known person; their record was reused");
                }
                for m in &outcome.moved_from {
                    eprintln!("note: checked out of shelter {m} (moved here)");
                }
                if outcome.notifications > 0 {
                    eprintln!(
                        "{} relative notification(s) queued (`musubi mail send`)",
                        outcome.notifications
                    );
                }
            }
        }
        ShelterCommand::Checkout(a) => stay(pf, a, StayKind::CheckOut)?,
        ShelterCommand::Leave(a) => stay(pf, a, StayKind::Leave)?,
        ShelterCommand::Return(a) => stay(pf, a, StayKind::Return)?,
        ShelterCommand::Close {
            data,
            shelter: s,
            when,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            shelter::set_status(&mut e, &s.shelter, ShelterStatus::Closed, when.at)?;
        }
        ShelterCommand::Reopen {
            data,
            shelter: s,
            when,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            shelter::set_status(&mut e, &s.shelter, ShelterStatus::Open, when.at)?;
        }
        ShelterCommand::Roster {
            data,
            shelter: s,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let r = shelter::roster(&e, &s.shelter)?;
            if json.json {
                print_json(&r)?;
            } else {
                println!(
                    "{}  {}  在所 {} / 収容 {}  (records {})",
                    r.id, r.shelter.name, r.present, r.shelter.capacity, r.records
                );
                for v in &r.evacuees {
                    let flags: Vec<&str> = v.evacuee.flags.iter().map(|f| f.label()).collect();
                    println!(
                        "{}  {:<9} {} ({}) {}  {}",
                        v.evacuee.id,
                        format!("{:?}", v.presence).to_lowercase(),
                        v.evacuee.name,
                        v.evacuee.kana,
                        v.evacuee.birth_date,
                        flags.join("・")
                    );
                }
            }
        }
        ShelterCommand::Needs {
            data,
            shelter: s,
            add,
            resolve,
            json,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            if let Some(text) = add {
                println!("{}", shelter::add_need(&mut e, &s.shelter, &text)?);
                return Ok(());
            }
            if let Some(id) = resolve {
                shelter::resolve_need(&mut e, &s.shelter, &id)?;
                return Ok(());
            }
            let r = shelter::roster(&e, &s.shelter)?;
            if json.json {
                print_json(&serde_json::json!({"needs": r.needs, "requests": r.requests}))?;
            } else {
                for n in &r.needs {
                    println!(
                        "need     {}  {}  {}{}",
                        n.id,
                        n.at,
                        n.text,
                        if n.resolved { "  (resolved)" } else { "" }
                    );
                }
                for q in &r.requests {
                    println!(
                        "request  {}  {}  {} {}{}  [{}] {}",
                        q.id,
                        q.requested_at,
                        q.item,
                        q.quantity,
                        q.unit,
                        q.urgency.as_str(),
                        q.status.as_str()
                    );
                }
            }
        }
        ShelterCommand::Request {
            data,
            shelter: s,
            item,
            quantity,
            unit,
            urgency,
            note,
            id,
            status,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            match (id, status, item) {
                (Some(id), Some(status), _) => {
                    let status: RequestStatus = status.parse()?;
                    shelter::set_request_status(&mut e, &s.shelter, &id, status)?;
                }
                (None, _, Some(item)) => {
                    let urgency: Urgency = urgency.parse()?;
                    println!(
                        "{}",
                        shelter::request(
                            &mut e, &s.shelter, &item, quantity, &unit, urgency, &note
                        )?
                    );
                }
                _ => bail!("give --item (a new request) or --id with --status"),
            }
        }
        ShelterCommand::Relative {
            data,
            shelter: s,
            evacuee,
            relative,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let r = shelter::parse_relative(&relative)?;
            shelter::add_relative(&mut e, &s.shelter, &evacuee, &r)?;
        }
        ShelterCommand::MedicalShare {
            data,
            shelter: s,
            with,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            refresh_directory_for(&mut e, &with)?;
            shelter::medical_share(&mut e, &s.shelter, &with)?;
            println!("shared; it reaches the facility at the next sync");
        }
        ShelterCommand::MedicalNote {
            data,
            shelter: s,
            evacuee,
            conditions,
            medications,
            care_level,
            notes,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            shelter::medical_note(
                &mut e,
                &s.shelter,
                &MedicalNote {
                    evacuee,
                    conditions,
                    medications,
                    care_level,
                    notes,
                    updated_at: String::new(),
                },
            )?;
        }
        ShelterCommand::Medical {
            data,
            shelter: s,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let notes = shelter::medical_show(&e, &s.shelter)?;
            if json.json {
                print_json(&notes)?;
            } else {
                for n in &notes.notes {
                    println!(
                        "{}  持病: {}  服薬: {}  要介護: {}  {}",
                        n.evacuee, n.conditions, n.medications, n.care_level, n.notes
                    );
                }
            }
        }
    }
    Ok(())
}

fn stay(pf: &Option<PathBuf>, a: StayArgs, kind: StayKind) -> Result<()> {
    let mut e = open_staff(pf, &a.data.data)?;
    let id = shelter::stay(
        &mut e,
        &a.shelter.shelter,
        &a.evacuee,
        kind,
        method(&a.method)?,
        a.when.at,
    )?;
    println!("{id}");
    Ok(())
}

pub(crate) fn run_mail(pf: &Option<PathBuf>, cmd: MailCommand) -> Result<()> {
    match cmd {
        MailCommand::Send {
            data,
            smtp,
            from,
            starttls,
            wait,
            watch,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let (host, port) = smtp
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
                .with_context(|| format!("--smtp {smtp:?} should be HOST:PORT"))?;
            let cfg = mail::SmtpConfig {
                host,
                port,
                from,
                starttls,
            };
            let missed = mail::reconcile(&e)?;
            if missed > 0 {
                eprintln!("queued {missed} notification(s) of check-ins that were not queued yet");
            }
            let deadline = (!watch).then(|| Instant::now() + Duration::from_secs(wait));
            let rt = runtime()?;
            let mut total = mail::Report::default();
            loop {
                let r = rt.block_on(mail::deliver(&e, &cfg))?;
                total.sent += r.sent;
                total.failed += r.failed;
                total.deferred += r.deferred;
                total.unconfirmed = r.unconfirmed;
                total.waiting = r.waiting;
                total.next_attempt_ms = r.next_attempt_ms;
                let pause = match r.next_attempt_ms {
                    Some(next) if r.waiting > 0 => {
                        Duration::from_millis(next.saturating_sub(now_ms()).clamp(50, 60_000))
                    }
                    _ if watch => Duration::from_secs(2),
                    _ => break,
                };
                if let Some(d) = deadline
                    && Instant::now() + pause > d
                {
                    break;
                }
                std::thread::sleep(pause);
            }
            if json.json {
                print_json(&total)?;
            } else {
                println!(
                    "sent {}, failed {}, still waiting {}, unconfirmed {}",
                    total.sent, total.failed, total.waiting, total.unconfirmed
                );
            }
            if total.waiting > 0 {
                bail!(
                    "{} notification(s) still wait for the SMTP server; they are retried at the next `musubi mail send`",
                    total.waiting
                );
            }
        }
        MailCommand::Status { data, json } => {
            let e = open_staff(pf, &data.data)?;
            let rows = mail::status(&e)?;
            if json.json {
                print_json(&rows)?;
            } else {
                for r in rows {
                    println!(
                        "{}  {:<11}  attempts {}  {}",
                        r.id,
                        r.state,
                        r.attempts,
                        r.error.unwrap_or_default()
                    );
                }
            }
        }
        MailCommand::Resend { data, id } => {
            let e = open_staff(pf, &data.data)?;
            if !mail::resend(&e, &id)? {
                bail!("no unconfirmed or failed message {id} in the outbox");
            }
            println!("queued again; `musubi mail send` delivers it");
        }
    }
    Ok(())
}
