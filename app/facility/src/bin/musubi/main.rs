//! `musubi`: the facility CLI (see `musubi --help`). A thin layer over `musubi_facility`.
//!
//! One module per domain (`referral`, ...), each with its subcommand enum and handler.

mod audit;
mod bundle;
mod card;
mod careplan;
mod device;
mod hq;
mod referral;
mod shelter;
mod staff;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use musubi_crdt::crypto::PASSPHRASE_LOG_N_DEFAULT;
use musubi_crdt::ids::Role;
use musubi_facility::engine::{Engine, EngineError, Joined};
use musubi_facility::net::{self, Mode};

/// Musubi facility device: encrypted documents that sync through the relay when a network exists.
#[derive(Parser)]
#[command(name = "musubi", version, about)]
struct Cli {
    /// Read the passphrase from this file (else from the MUSUBI_PASSPHRASE environment variable).
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Act as this staff member (login; else MUSUBI_STAFF): every command that reads or changes
    /// documents, exports, prints, reads cards or manages devices needs one, and the audit log
    /// names them.
    #[arg(long, global = true, value_name = "LOGIN")]
    staff: Option<String>,
    /// Read that staff member's password from this file (else MUSUBI_STAFF_PASSWORD).
    #[arg(long, global = true, value_name = "FILE")]
    staff_password_file: Option<PathBuf>,
    /// Sign the staff member in with their staff card instead (the only way when the device
    /// requires 二要素認証): waits for the card on the reader; its PIN (a My Number card's, or a
    /// contactless card's staff PIN) is MUSUBI_STAFF_PIN.
    #[arg(long, global = true, conflicts_with_all = ["staff", "staff_password_file"])]
    staff_card: bool,
    #[command(subcommand)]
    command: Command,
}

/// Who the command acts as (from `--staff`/`MUSUBI_STAFF` and the password file or variable).
struct StaffArgs {
    login: Option<String>,
    password_file: Option<PathBuf>,
    card: bool,
}

static STAFF_ARGS: std::sync::OnceLock<StaffArgs> = std::sync::OnceLock::new();

#[derive(Args)]
pub(crate) struct Data {
    /// The facility device's data directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) data: PathBuf,
}

#[derive(Args)]
pub(crate) struct Json {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
enum FacilitiesAction {
    /// Accept a facility's new root key after reading its safety number with it by phone.
    Confirm {
        /// The facility (id or exact name).
        facility: String,
        /// Its new safety number, as `musubi facilities` shows it (30 digits).
        safety_number: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Create a facility device: new keys, wrapped by the passphrase.
    Init {
        #[command(flatten)]
        data: Data,
        /// The facility's name (as the operator enrols it).
        #[arg(long)]
        name: String,
        /// scrypt work factor (log2 N) for the passphrase, 16 to 22; higher is slower to unlock and
        /// to attack (below 16 only for tests, with MUSUBI_WEAK_KDF_FOR_TESTS=1).
        #[arg(long, default_value_t = PASSPHRASE_LOG_N_DEFAULT, value_parser = clap::value_parser!(u8).range(10..=22))]
        scrypt_log_n: u8,
    },
    /// Join a deployment with an invite code: from `musubi-node invite` (a new facility) or from
    /// `musubi device invite` at a current device (another device of that facility). Waits until the
    /// inviter approved.
    Join {
        #[command(flatten)]
        data: Data,
        /// The invite code.
        code: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Send the join request and return at once if it waits for approval (`musubi join` again
        /// later finishes it).
        #[arg(long)]
        no_wait: bool,
    },
    /// The facilities of the deployment as this device verified them, with each one's safety number.
    Facilities {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
        #[command(subcommand)]
        action: Option<FacilitiesAction>,
    },
    /// This facility's devices: invite another one, revoke a lost one.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Sync with the relay.
    Sync {
        #[command(flatten)]
        data: Data,
        /// Push what is pending, pull what is new, then exit (0 only when everything is done).
        #[arg(long, conflicts_with = "watch", required_unless_present = "watch")]
        once: bool,
        /// Stay connected, reconnecting with backoff; apply changes as they arrive.
        #[arg(long)]
        watch: bool,
        /// With --once: give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// With --watch: also find facility devices on this LAN (mDNS) and sync with them directly.
        #[arg(long, requires = "watch")]
        lan: bool,
        /// With --lan: listen for LAN peers on these multiaddrs (default /ip4/0.0.0.0/tcp/0).
        #[arg(long, requires = "lan")]
        listen: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Add a member facility to a document, or (--remove) take one away. Owner only.
    Share {
        #[command(flatten)]
        data: Data,
        /// The document id.
        #[arg(long)]
        doc: String,
        /// The facility (id or exact name).
        #[arg(long = "with")]
        with: String,
        /// Its role.
        #[arg(long, value_parser = ["reader", "writer"], required_unless_present = "remove")]
        role: Option<String>,
        /// Remove the facility (the document key is rotated so it reads nothing new).
        #[arg(long, conflicts_with = "role")]
        remove: bool,
    },
    /// This device: enrolment, pending items, documents, quarantined bundles.
    Status {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// Bundles: list them, and carry them on a file when no network exists.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// 診療情報提供書 (referral letters).
    #[command(subcommand)]
    Referral(referral::ReferralCommand),
    /// 居宅サービス計画書 (care plans).
    #[command(subcommand)]
    Careplan(careplan::CareplanCommand),
    /// 避難所 (shelter reception).
    #[command(subcommand)]
    Shelter(shelter::ShelterCommand),
    /// 災害対策本部 (disaster HQ views).
    #[command(subcommand)]
    Hq(hq::HqCommand),
    /// Relatives' e-mail notifications (outbox and SMTP delivery).
    #[command(subcommand)]
    Mail(shelter::MailCommand),
    /// ICカード (PC/SC card readers).
    #[command(subcommand)]
    Card(card::CardCommand),
    /// 職員 (staff accounts and sign-in).
    #[command(subcommand)]
    Staff(staff::StaffCommand),
    /// 監査ログ (this device's audit log; administrators only).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

pub(crate) fn passphrase(cli_file: &Option<PathBuf>) -> Result<String> {
    if let Some(f) = cli_file {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("reading the passphrase file {}", f.display()))?;
        return Ok(s.trim_end_matches(['\n', '\r']).to_owned());
    }
    match std::env::var("MUSUBI_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => bail!("no passphrase: set MUSUBI_PASSPHRASE or pass --passphrase-file FILE"),
    }
}

pub(crate) fn open(cli: &Option<PathBuf>, dir: &Path) -> Result<Engine> {
    Ok(Engine::open(dir, &passphrase(cli)?)?)
}

/// Opens the device and signs the staff member in (`--staff`/`MUSUBI_STAFF` and their password):
/// what the command does is recorded in the audit log under their login. A wrong login or password
/// is recorded too (`sign-in-failed`).
///
/// Errors: no staff member given, no account on this device yet, a wrong login or password.
pub(crate) fn open_staff(cli: &Option<PathBuf>, dir: &Path) -> Result<Engine> {
    let mut e = open(cli, dir)?;
    let args = STAFF_ARGS.get();
    if args.is_some_and(|a| a.card) {
        let pin = || {
            std::env::var("MUSUBI_STAFF_PIN")
                .ok()
                .map(zeroize::Zeroizing::new)
        };
        let who = musubi_facility::staff::sign_in_with_card(
            &e,
            &musubi_facility::card::ReadOptions {
                timeout: Duration::from_secs(30),
                ..Default::default()
            },
            Box::new(card::EnvPin(false)),
            pin,
        )?;
        e.set_staff(Some(who.login));
        return Ok(e);
    }
    let login = args
        .and_then(|a| a.login.clone())
        .or_else(|| std::env::var("MUSUBI_STAFF").ok().filter(|s| !s.is_empty()));
    let Some(login) = login else {
        bail!(
            "this command is recorded in the audit log under a staff member: sign in with MUSUBI_STAFF=LOGIN and MUSUBI_STAFF_PASSWORD (or --staff LOGIN --staff-password-file FILE){}",
            if musubi_facility::staff::list(&e)?.is_empty() {
                "; this device has no staff account yet: create the first with `musubi staff add --data DIR --login LOGIN --name NAME` (password on standard input)"
            } else {
                ""
            }
        );
    };
    let password = match args.and_then(|a| a.password_file.as_ref()) {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the staff password file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => std::env::var("MUSUBI_STAFF_PASSWORD").map_err(|_| {
            anyhow::anyhow!(
                "no password for staff member {login}: set MUSUBI_STAFF_PASSWORD or pass --staff-password-file FILE"
            )
        })?,
    };
    let who = musubi_facility::staff::sign_in_password(&e, &login, &password)?;
    e.set_staff(Some(who.login));
    Ok(e)
}

/// [`open_staff`], for a staff member who is an administrator of this device.
pub(crate) fn open_admin(cli: &Option<PathBuf>, dir: &Path) -> Result<Engine> {
    let e = open_staff(cli, dir)?;
    let login = e.staff().unwrap_or_default().to_owned();
    match musubi_facility::staff::find(&e, &login)? {
        Some(s) if s.role == musubi_facility::staff::StaffRole::Admin => Ok(e),
        _ => bail!("only an administrator of this device may do this; {login} is not one"),
    }
}

/// The directory may predate a facility's enrolment: when `facility` is not in it, sync once to refresh it.
pub(crate) fn refresh_directory_for(e: &mut Engine, facility: &str) -> Result<()> {
    if matches!(
        e.find_facility(facility),
        Err(EngineError::UnknownFacility(_))
    ) && e.enrolment().is_ok()
    {
        let once = Mode::Once {
            timeout: Duration::from_secs(10),
        };
        if let Err(err) = runtime()?.block_on(net::sync(e, once, |_| {})) {
            eprintln!("note: could not refresh the directory ({err})");
        }
    }
    Ok(())
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Quarantined bundles `status` lists (the newest; the total is given too).
const QUARANTINE_LISTED_MAX: usize = 1000;

fn run(mut cli: Cli) -> Result<()> {
    // `musubi audit list --staff LOGIN` (the contract) filters by LOGIN when the staff
    // member signing in is given otherwise (MUSUBI_STAFF, or --staff-card), with no password file
    // for `--staff`: then `--staff` cannot be the sign-in.
    if let Command::Audit(audit::AuditCommand::List { staff_login, .. }) = &mut cli.command
        && staff_login.is_none()
        && cli.staff_password_file.is_none()
        && (cli.staff_card || std::env::var("MUSUBI_STAFF").is_ok_and(|s| !s.is_empty()))
        && let Some(login) = cli.staff.take()
    {
        *staff_login = Some(login);
    }
    let pf = &cli.passphrase_file;
    let _ = STAFF_ARGS.set(StaffArgs {
        login: cli.staff.clone(),
        password_file: cli.staff_password_file.clone(),
        card: cli.staff_card,
    });
    match cli.command {
        Command::Init {
            data,
            name,
            scrypt_log_n,
        } => {
            musubi_crdt::crypto::check_work_factor(
                scrypt_log_n,
                musubi_facility::engine::weak_kdf_for_tests(),
            )?;
            let e = Engine::init(&data.data, &name, &passphrase(pf)?, scrypt_log_n)?;
            println!("{}", e.device_id());
        }
        Command::Join {
            data,
            code,
            timeout,
            no_wait,
        } => {
            let mut e = open(pf, &data.data)?;
            if let Ok(invite) = musubi_crdt::invite::InviteCode::decode(&code) {
                eprintln!(
                    "the invite names the deployment authority with fingerprint {}; compare it with the one your municipality published",
                    musubi_crdt::directory::authority_fingerprint(&invite.authority)
                );
            }
            let joined = runtime()?.block_on(net::join(
                &mut e,
                &code,
                Duration::from_secs(timeout),
                !no_wait,
            ))?;
            match joined {
                Joined::Enrolled(enrolment) => {
                    let local = e.local_name()?;
                    if !local.is_empty() && local != enrolment.facility_name {
                        eprintln!(
                            "note: this device is now a device of {:?} (init named it {local:?})",
                            enrolment.facility_name
                        );
                    }
                    println!("{}", enrolment.facility);
                }
                Joined::Pending { expires_at_ms } if no_wait => {
                    println!("pending");
                    eprintln!(
                        "the join request waits for the inviter's approval (the invite expires {}); run `musubi join` again to finish",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(expires_at_ms)
                        )
                    );
                }
                Joined::Pending { .. } => bail!(
                    "the join request still waits for approval after {timeout} s: for a new facility the deployment authority approves (`musubi-node approve`); for another device, the inviting device approves at its next sync. Run `musubi join` again to finish"
                ),
            }
        }
        Command::Facilities { data, json, action } => {
            let mut e = open(pf, &data.data)?;
            if let Some(FacilitiesAction::Confirm {
                facility,
                safety_number,
            }) = action
            {
                e.confirm_root(&facility, &safety_number)?;
                println!(
                    "confirmed the new root key of {facility}; its devices get keys from now on"
                );
                return Ok(());
            }
            device::print_facilities(&e, json.json)?;
        }
        Command::Sync {
            data,
            once,
            watch: _,
            timeout,
            lan,
            listen,
            json,
        } => {
            let mut e = open(pf, &data.data)?;
            let listen = listen
                .iter()
                .map(|a| {
                    a.parse()
                        .with_context(|| format!("{a:?} is not a multiaddr"))
                })
                .collect::<Result<Vec<_>>>()?;
            let options = net::SyncOptions {
                lan,
                listen,
                ..net::SyncOptions::default()
            };
            let mode = if once {
                Mode::Once {
                    timeout: Duration::from_secs(timeout),
                }
            } else {
                Mode::Watch
            };
            let report = runtime()?.block_on(net::sync_with(&mut e, mode, options, |r| {
                tracing::info!(pushed = r.pushed, pulled = r.pulled, "sync progress");
            }))?;
            if json.json {
                print_json(&report)?;
            } else {
                println!(
                    "synced: {} item(s) sent, {} bundle(s) received",
                    report.pushed, report.pulled
                );
                if let Some(why) = &report.held_back_message {
                    println!(
                        "{} item(s) held back and kept for the next sync: {why}",
                        report.held_back
                    );
                }
            }
        }
        Command::Share {
            data,
            doc,
            with,
            role,
            remove,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let doc = e.document_info(&doc)?.id;
            refresh_directory_for(&mut e, &with)?;
            let role = if remove {
                None
            } else {
                role.as_deref().map(str::parse::<Role>).transpose()?
            };
            e.share(doc, &with, role)?;
            let facility = format!("facility={with}");
            musubi_facility::audit::record(
                &e,
                if remove {
                    musubi_crdt::audit::AuditAction::Unshare
                } else {
                    musubi_crdt::audit::AuditAction::Share
                },
                Some(doc),
                &[&facility],
            )?;
            println!(
                "{}",
                if remove {
                    "removed; the document key will be rotated at the next sync"
                } else {
                    "shared; it reaches the facility at the next sync"
                }
            );
        }
        Command::Status { data, json } => {
            let e = open(pf, &data.data)?;
            let enrolment = e.enrolment().ok();
            let mut docs = Vec::new();
            for d in e.store().documents(None)? {
                let warning: Option<String> =
                    e.store().meta_cbor(&format!("doc_warning:{}", d.info.id))?;
                docs.push(serde_json::json!({
                    "id": d.info.id.to_string(), "kind": d.info.kind.to_string(), "epoch": d.info.epoch.0,
                    "operations": d.info.ops, "relay_operations": d.relay_ops,
                    "members": d.info.members.iter().map(|m| serde_json::json!({"facility": m.facility.to_string(), "role": m.role.to_string()})).collect::<Vec<_>>(),
                    "pending": e.store().pending_for(d.info.id)?,
                    "last_path": e.store().last_path(d.info.id)?,
                    "warning": warning,
                }));
            }
            let behind = net::relay_behind(&e)?;
            let rejected: Vec<_> = e
                .store()
                .rejected()?
                .into_iter()
                .map(|(id, doc, err)| serde_json::json!({"item": id, "doc": doc, "error": err}))
                .collect();
            let quarantined = e.store().quarantined(QUARANTINE_LISTED_MAX)?;
            let quarantined_total = e.store().quarantine_count()?;
            let v = serde_json::json!({
                "device": e.device_id().to_string(),
                "facility": enrolment.as_ref().map(|x| serde_json::json!({"id": x.facility.to_string(), "name": x.facility_name, "role": x.role.to_string()})),
                "relay": enrolment.as_ref().map(|x| x.relay_addrs.clone()),
                "pending": e.store().pending_count()?,
                "held_back": e.store().held_back_count()?,
                "rejected": rejected,
                "relay_behind": behind.as_ref().map(|b| serde_json::json!({
                    "at_ms": b.at_ms, "restored": b.restored, "times": b.times,
                })),
                "documents": docs,
                "quarantined": quarantined,
                "quarantined_total": quarantined_total,
            });
            if json.json {
                print_json(&v)?;
            } else {
                match &enrolment {
                    Some(x) => {
                        println!("facility {} ({}, {})", x.facility_name, x.facility, x.role)
                    }
                    None => println!("not enrolled yet (run `musubi join`)"),
                }
                println!("device   {}", e.device_id());
                println!(
                    "pending  {} item(s) waiting for the relay",
                    e.store().pending_count()?
                );
                println!(
                    "documents {}",
                    v["documents"].as_array().map_or(0, Vec::len)
                );
                if !quarantined.is_empty() {
                    println!(
                        "quarantine {quarantined_total} bundle(s) kept but not applied (隔離), newest first:"
                    );
                    for q in &quarantined {
                        println!(
                            "  {} document {} from device {} of facility {}: {}",
                            q.bundle.get(..16).unwrap_or(&q.bundle),
                            q.doc,
                            q.author,
                            q.facility,
                            q.reason
                        );
                    }
                }
                if let Some(b) = &behind {
                    println!(
                        "relay    went back in time at {} ({}); what this device holds was offered to it again",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(b.at_ms)
                        ),
                        if b.restored {
                            "its store was restored from a backup"
                        } else {
                            "it held less than it had acknowledged"
                        }
                    );
                }
            }
        }
        Command::Device(cmd) => device::run(pf, cmd)?,
        Command::Bundle(cmd) => bundle::run(pf, cmd)?,
        Command::Referral(cmd) => referral::run(pf, cmd)?,
        Command::Careplan(cmd) => careplan::run(pf, cmd)?,
        Command::Shelter(cmd) => shelter::run(pf, cmd)?,
        Command::Hq(cmd) => hq::run(pf, cmd)?,
        Command::Mail(cmd) => shelter::run_mail(pf, cmd)?,
        Command::Card(cmd) => card::run(pf, cmd)?,
        Command::Staff(cmd) => staff::run(pf, cmd)?,
        Command::Audit(cmd) => audit::run(pf, cmd)?,
    }
    Ok(())
}
