//! `musubi audit ...`: this device's audit log (監査ログ), for its administrators.
//!
//! Listing, verifying and exporting are recorded in the log too (`audit-read`; a verification after
//! it checked).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use musubi_crdt::audit::AuditAction;
use musubi_facility::audit::{self, AuditRecord, Filter};

use crate::{Data, Json, open_admin, print_json};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    Csv,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// The entries, oldest first (filters combine).
    List {
        #[command(flatten)]
        data: Data,
        /// Only this staff member's (login). `--staff LOGIN` says the same when the administrator
        /// signs in by MUSUBI_STAFF or `--staff-card`.
        #[arg(long = "staff-login", value_name = "LOGIN")]
        staff_login: Option<String>,
        /// Only about this document (id).
        #[arg(long)]
        doc: Option<String>,
        /// Only this action (read, create, edit, export, print, share, unshare, card-read, sign-in,
        /// sign-out, sign-in-failed, staff-add, staff-change, safety-inquiry, audit-read).
        #[arg(long)]
        action: Option<AuditAction>,
        /// Only at or after this time (RFC 3339, e.g. 2024-01-01T09:00:00+09:00).
        #[arg(long)]
        since: Option<String>,
        /// Only before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Check the whole log: this device's chain on disk, its copy in the facility's audit
    /// document, and every other device's chain there. Exit 0 when every entry verifies and
    /// follows the one before; else name each chain's first break (an entry altered, removed, the
    /// newest ones cut off, or a disk put back to an older copy).
    Verify {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// Show, or set for every device of the facility, how many days entries are kept (default
    /// 1827, five years; from 365 to 10958). Older entries are removed at each device's next sync.
    Retention {
        #[command(flatten)]
        data: Data,
        /// The new retention, in days.
        #[arg(long)]
        days: Option<u64>,
    },
    /// Write every entry to a file (CSV with a header row, or JSON).
    Export {
        #[command(flatten)]
        data: Data,
        /// csv or json.
        #[arg(long)]
        format: Format,
        /// The file to write (mode 0600, written whole or not at all; an existing file is replaced).
        #[arg(long)]
        out: PathBuf,
    },
}

fn time_ms(s: &str) -> Result<u64> {
    musubi_crdt::documents::shelter::rfc3339_ms(s)
        .and_then(|ms| u64::try_from(ms).ok())
        .with_context(|| format!("{s:?} is not an RFC 3339 time (2024-01-01T09:00:00+09:00)"))
}

fn print_records(records: &[AuditRecord]) {
    for r in records {
        println!(
            "{}  {:<14}  {:<12}  {}  {}",
            r.time,
            r.action,
            r.staff.as_deref().unwrap_or("-"),
            r.doc.as_deref().unwrap_or("-"),
            r.fields.join(",")
        );
    }
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::List {
            data,
            staff_login,
            doc,
            action,
            since,
            until,
            json,
        } => {
            let e = open_admin(pf, &data.data)?;
            let filter = Filter {
                staff: staff_login,
                doc: doc.map(|d| e.document_info(&d).map(|i| i.id)).transpose()?,
                action,
                since_ms: since.as_deref().map(time_ms).transpose()?,
                until_ms: until.as_deref().map(time_ms).transpose()?,
            };
            audit::record(&e, AuditAction::AuditRead, None, &["list"])?;
            let records = audit::list(&e, &filter)?;
            if json.json {
                print_json(&records)?;
            } else {
                print_records(&records);
            }
        }
        AuditCommand::Verify { data, json } => {
            let e = open_admin(pf, &data.data)?;
            // Verified first, so that this check's own entry is not what it checks.
            let chains = audit::verify_all(&e)?;
            let ok = chains.iter().all(|c| c.result.is_ok());
            // A broken log may refuse new entries too: the break is what to report then.
            if let Err(err) = audit::record(&e, AuditAction::AuditRead, None, &["verify"])
                && ok
            {
                return Err(err.into());
            }
            if json.json {
                print_json(&serde_json::json!({"ok": ok, "chains": chains}))?;
            } else {
                for c in &chains {
                    let whose = if c.this_device {
                        "this device".to_owned()
                    } else {
                        format!(
                            "device {} of facility {} (from its audit document)",
                            c.device, c.facility
                        )
                    };
                    match &c.result {
                        Ok(summary) => println!(
                            "{whose}: intact, {} entries verified (entries {}..={})",
                            summary.entries,
                            summary.first.unwrap_or(0),
                            summary.last.unwrap_or(0)
                        ),
                        Err(broken) => println!("{whose}: {broken}"),
                    }
                }
            }
            if !json.json && chains.len() > 1 {
                println!(
                    "(the other devices' chains are as this device last synced them: entries made since, or withheld by the relay, are not checked)"
                );
            }
            if let Some(broken) = chains.iter().find_map(|c| c.result.as_ref().err()) {
                bail!("{broken} (監査ログの改ざんまたは欠落を検出しました)");
            }
        }
        AuditCommand::Retention { data, days } => {
            let mut e = open_admin(pf, &data.data)?;
            match days {
                Some(days) => {
                    audit::set_retention_days(&mut e, days)?;
                    println!(
                        "audit entries are kept {days} days on every device of this facility (from its next sync)"
                    );
                }
                None => {
                    audit::record(&e, AuditAction::AuditRead, None, &["retention"])?;
                    println!("{}", audit::retention_days(&e)?);
                }
            }
        }
        AuditCommand::Export { data, format, out } => {
            let e = open_admin(pf, &data.data)?;
            let what = match format {
                Format::Csv => "csv",
                Format::Json => "json",
            };
            audit::record(&e, AuditAction::AuditRead, None, &["export", what])?;
            let records = audit::list(&e, &Filter::default())?;
            let mut bytes = Vec::new();
            match format {
                Format::Csv => audit::write_csv(&records, &mut bytes)?,
                Format::Json => serde_json::to_writer_pretty(&mut bytes, &records)?,
            }
            musubi_facility::services::write_owner_only(&out, &bytes)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{} entries written to {}", records.len(), out.display());
        }
    }
    Ok(())
}
