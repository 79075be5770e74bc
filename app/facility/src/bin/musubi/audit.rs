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
        /// Only this staff member's (login).
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
    /// Check the whole log: exit 0 when every entry verifies and follows the one before; else name
    /// the first break (an entry altered, removed, or the newest ones cut off).
    Verify {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
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
            let verdict = audit::verify(&e)?;
            // A broken log may refuse new entries too: the break is what to report then.
            if let Err(err) = audit::record(&e, AuditAction::AuditRead, None, &["verify"])
                && verdict.is_ok()
            {
                return Err(err.into());
            }
            match verdict {
                Ok(summary) => {
                    if json.json {
                        print_json(&serde_json::json!({"ok": true, "summary": summary}))?;
                    } else {
                        println!(
                            "audit log intact: {} entries verified (entries {}..={})",
                            summary.entries,
                            summary.first.unwrap_or(0),
                            summary.last.unwrap_or(0)
                        );
                    }
                }
                Err(broken) => {
                    if json.json {
                        print_json(&serde_json::json!({"ok": false, "break": broken}))?;
                    }
                    bail!("{broken} (監査ログの改ざんまたは欠落を検出しました)");
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
