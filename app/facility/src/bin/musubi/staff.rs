//! `musubi staff ...`: staff accounts of this device, and signing in with a password or a staff card.
//!
//! Secrets come on standard input, one per line, never as arguments (they would show in `ps`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use musubi_facility::card::{self, ReadOptions};
use musubi_facility::staff::{self, Staff, StaffError};

use crate::card::{StdinLines, StdinPins, card_error_json};
use crate::{Data, Json, open, open_admin, open_staff, print_json};

#[derive(Subcommand)]
pub(crate) enum StaffCommand {
    /// Create a staff account; its password is the first line of standard input. The device's
    /// first account needs no sign-in and is its administrator; later ones are added by a signed-in
    /// administrator (MUSUBI_STAFF, MUSUBI_STAFF_PASSWORD).
    Add {
        #[command(flatten)]
        data: Data,
        /// The login name.
        #[arg(long)]
        login: String,
        /// The name the audit log shows.
        #[arg(long)]
        name: String,
        /// `admin` (also adds staff and reads the audit log) or `staff`.
        #[arg(long, default_value = "staff")]
        role: staff::StaffRole,
    },
    /// The staff accounts of this device.
    List {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// Bind a staff card to an account (once). Standard input: the password, then the card's PIN
    /// (My Number card: its user-authentication PIN, which the card checks) or, for a contactless card,
    /// a new staff PIN of 4 to 8 digits.
    BindCard {
        #[command(flatten)]
        data: Data,
        /// The account.
        #[arg(long)]
        login: String,
        /// Wait at most this many seconds for the card.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Send the card PIN even when only one try is left.
        #[arg(long)]
        confirm_last_try: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Remove an account's staff card; the password is the first line of standard input.
    UnbindCard {
        #[command(flatten)]
        data: Data,
        /// The account.
        #[arg(long)]
        login: String,
    },
    /// Require 二要素認証 on this device (`on`: only a staff card with its PIN signs in, never a
    /// password alone; at least one administrator must have a card) or not (`off`). Administrators
    /// only.
    TwoFactor {
        #[command(flatten)]
        data: Data,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Sign in: with --login, by password (first line of standard input); with --card, by staff card
    /// and PIN (first line of standard input).
    SignIn {
        #[command(flatten)]
        data: Data,
        /// Sign in by password as this login.
        #[arg(long, conflicts_with = "card", required_unless_present = "card")]
        login: Option<String>,
        /// Sign in with a staff card and its PIN.
        #[arg(long)]
        card: bool,
        /// With --card: wait at most this many seconds for the card.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// With --card: send the card PIN even when only one try is left.
        #[arg(long)]
        confirm_last_try: bool,
        #[command(flatten)]
        json: Json,
    },
}

fn print_staff(s: &Staff, json: bool) -> Result<()> {
    if json {
        print_json(s)
    } else {
        println!(
            "{}  {}  {}",
            s.login,
            s.name,
            s.card
                .map_or("no card".to_owned(), |k| format!("card: {k:?}"))
        );
        Ok(())
    }
}

fn report(err: StaffError, json: bool) -> anyhow::Error {
    if json {
        let v = match &err {
            StaffError::Card(c) => card_error_json(c),
            other => serde_json::json!({"error": {"kind": "staff", "message": other.to_string()}}),
        };
        let _ = print_json(&v);
    }
    err.into()
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: StaffCommand) -> Result<()> {
    match cmd {
        StaffCommand::Add {
            data,
            login,
            name,
            role,
        } => {
            let first = staff::list(&open(pf, &data.data)?)?.is_empty();
            let e = if first {
                open(pf, &data.data)?
            } else {
                open_admin(pf, &data.data)?
            };
            let lines = StdinLines::read()?;
            let password = lines.next().context("no password on standard input")?;
            let s = staff::create(&e, &login, &name, &password, role)?;
            if first && role != staff::StaffRole::Admin {
                eprintln!("note: the first account of a device is its administrator");
            }
            println!("{}", s.id);
        }
        StaffCommand::List { data, json } => {
            let e = open_staff(pf, &data.data)?;
            let all = staff::list(&e)?;
            if json.json {
                print_json(&all)?;
            } else {
                for s in &all {
                    print_staff(s, false)?;
                }
            }
        }
        StaffCommand::BindCard {
            data,
            login,
            timeout,
            confirm_last_try,
            json,
        } => {
            let e = open(pf, &data.data)?;
            let lines = StdinLines::read()?;
            let password = lines.next().context("no password on standard input")?;
            // Check the password before waiting for a card.
            staff::verify_password(&e, &login, &password).map_err(|err| report(err, json.json))?;
            let opts = ReadOptions {
                timeout: Duration::from_secs(timeout),
                verify: true,
                confirm_last_try,
                ..ReadOptions::default()
            };
            let read = card::read(
                &e,
                musubi_crdt::crypto::PseudonymSector::Staff,
                &opts,
                Box::new(StdinPins(Some(lines.clone()))),
            )
            .map_err(|err| report(err.into(), json.json))?;
            let pin = match read.identity.kind {
                card::CardKind::MyNumber => None,
                card::CardKind::Contactless => Some(lines.next().context(
                    "a contactless card needs a new staff PIN on the second line of standard input",
                )?),
            };
            let s = staff::bind_card(
                &e,
                &login,
                &password,
                &read,
                pin.as_deref().map(String::as_str),
            )
            .map_err(|err| report(err, json.json))?;
            print_staff(&s, json.json)?;
        }
        StaffCommand::UnbindCard { data, login } => {
            let e = open(pf, &data.data)?;
            let lines = StdinLines::read()?;
            let password = lines.next().context("no password on standard input")?;
            let s = staff::unbind_card(&e, &login, &password)?;
            print_staff(&s, false)?;
        }
        StaffCommand::TwoFactor { data, state } => {
            let e = crate::open_admin(pf, &data.data)?;
            let on = state == "on";
            staff::set_two_factor_required(&e, on).map_err(|err| match err {
                staff::StaffError::UnknownCard => anyhow::anyhow!(
                    "no administrator of this device has a staff card yet: bind one first (`musubi staff bind-card`), or no one could sign in"
                ),
                other => other.into(),
            })?;
            println!(
                "{}",
                if on {
                    "this device now requires a staff card and its PIN to sign in (二要素認証)"
                } else {
                    "a password signs in again on this device"
                }
            );
        }
        StaffCommand::SignIn {
            data,
            login,
            card: _,
            timeout,
            confirm_last_try,
            json,
        } => {
            let e = open(pf, &data.data)?;
            let lines = StdinLines::read()?;
            let s = match login {
                Some(login) => {
                    let password = lines.next().context("no password on standard input")?;
                    staff::sign_in_password(&e, &login, &password)
                }
                None => {
                    let opts = ReadOptions {
                        timeout: Duration::from_secs(timeout),
                        confirm_last_try,
                        ..ReadOptions::default()
                    };
                    let pins = lines.clone();
                    staff::sign_in_with_card(
                        &e,
                        &opts,
                        Box::new(StdinPins(Some(lines))),
                        move || pins.next(),
                    )
                }
            }
            .map_err(|err| report(err, json.json))?;
            print_staff(&s, json.json)?;
        }
    }
    Ok(())
}
