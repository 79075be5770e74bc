//! `musubi referral ...`: 診療情報提供書 (様式11) commands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use musubi_facility::net::{self, Mode};
use musubi_facility::services::referral;

use crate::{Data, Json, open_staff, print_json, refresh_directory_for, runtime};

#[derive(Subcommand)]
pub(crate) enum ReferralCommand {
    /// Create a letter from a JP eReferral FHIR Bundle and send it to a facility.
    ImportFhir {
        #[command(flatten)]
        data: Data,
        /// The receiving facility (id or exact name).
        #[arg(long)]
        to: String,
        /// Do not try to send it now (it is sent at the next sync).
        #[arg(long)]
        no_send: bool,
        /// The Bundle JSON file.
        file: PathBuf,
    },
    /// Letters this facility can read.
    List {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// One letter.
    Show {
        #[command(flatten)]
        data: Data,
        /// The letter id.
        id: String,
        #[command(flatten)]
        json: Json,
    },
    /// Replace a field's text (keys: to_facility, to_doctor, from_facility, from_doctor, diagnosis,
    /// purpose, history, progress, treatment, prescription, remarks, reply, patient.name, ...).
    Edit {
        #[command(flatten)]
        data: Data,
        /// The letter id.
        id: String,
        /// The field key.
        #[arg(long)]
        field: String,
        /// The new text.
        #[arg(long)]
        text: String,
    },
    /// Write the 返書 (reply).
    Reply {
        #[command(flatten)]
        data: Data,
        /// The letter id.
        id: String,
        /// The reply text.
        #[arg(long)]
        text: String,
    },
    /// Attach a file (添付) to a letter.
    Attach {
        #[command(flatten)]
        data: Data,
        /// The letter id.
        id: String,
        /// The file.
        file: PathBuf,
        /// Its media type.
        #[arg(long, default_value = "application/octet-stream")]
        media_type: String,
    },
    /// The letter as a FHIR JP eReferral document Bundle (JSON on stdout).
    ExportFhir {
        #[command(flatten)]
        data: Data,
        /// The letter id.
        id: String,
    },
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: ReferralCommand) -> Result<()> {
    match cmd {
        ReferralCommand::ImportFhir {
            data,
            to,
            no_send,
            file,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let json = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            refresh_directory_for(&mut e, &to)?;
            let id = referral::import_fhir(&mut e, &to, &json)?;
            println!("{id}");
            if !no_send {
                match runtime()?.block_on(net::sync(
                    &mut e,
                    Mode::Once {
                        timeout: Duration::from_secs(5),
                    },
                    |_| {},
                )) {
                    Ok(_) => eprintln!("sent to {to}"),
                    Err(err) => eprintln!("queued (not sent yet: {err})"),
                }
            }
        }
        ReferralCommand::List { data, json } => {
            let e = open_staff(pf, &data.data)?;
            let letters = referral::list(&e)?;
            if json.json {
                print_json(&letters)?;
            } else {
                for l in letters {
                    println!(
                        "{}  {:<8}  {} → {}  患者: {}",
                        l.id,
                        format!("{:?}", l.letter.status).to_lowercase(),
                        l.letter.from_facility,
                        l.letter.to_facility,
                        l.letter.patient.name
                    );
                }
            }
        }
        ReferralCommand::Show { data, id, json } => {
            let e = open_staff(pf, &data.data)?;
            let v = referral::show(&e, &id)?;
            if json.json {
                print_json(&v)?;
            } else {
                print_letter(&v);
            }
        }
        ReferralCommand::Edit {
            data,
            id,
            field,
            text,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            referral::edit(&mut e, &id, &field, &text)?;
        }
        ReferralCommand::Reply { data, id, text } => {
            let mut e = open_staff(pf, &data.data)?;
            referral::reply(&mut e, &id, &text)?;
        }
        ReferralCommand::Attach {
            data,
            id,
            file,
            media_type,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let att = referral::attach(&mut e, &id, &file, &media_type)?;
            println!("{}", att.id);
        }
        ReferralCommand::ExportFhir { data, id } => {
            let e = open_staff(pf, &data.data)?;
            print_json(&referral::export_fhir(&e, &id)?)?;
        }
    }
    Ok(())
}

fn print_letter(v: &referral::LetterView) {
    let l = &v.letter;
    println!(
        "診療情報提供書  {}  [{}]",
        v.id,
        format!("{:?}", l.status).to_lowercase()
    );
    println!("紹介先: {} {}", l.to_facility, l.to_doctor);
    println!("紹介元: {} {}", l.from_facility, l.from_doctor);
    let p = &l.patient;
    println!(
        "患者: {} ({}) {} {} {}",
        p.name, p.kana, p.sex, p.birth_date, p.address
    );
    for (label, text) in [
        ("傷病名", &l.diagnosis),
        ("紹介目的", &l.purpose),
        ("既往歴及び家族歴", &l.history),
        ("症状経過及び検査結果", &l.progress),
        ("治療経過", &l.treatment),
        ("現在の処方", &l.prescription),
        ("備考", &l.remarks),
        ("返書", &l.reply),
    ] {
        if !text.is_empty() {
            println!("【{label}】\n{text}");
        }
    }
    for a in &l.attachments {
        println!("添付: {} ({}, {} bytes)", a.name, a.media_type, a.bytes);
    }
    if v.unreadable_bundles > 0 {
        println!(
            "({} change(s) cannot be read yet: run `musubi sync --once`)",
            v.unreadable_bundles
        );
    }
}
