//! Domain services: what staff do with documents, as engine calls (the CLI and the desktop app
//! are thin layers over these).
//!
//! - [`careplan`]: 居宅サービス計画書 create, edit 第1表〜第3表, 支援経過, monitoring, comments, versions, CSV/PDF export.
//! - [`referral`]: 診療情報提供書 (様式11) import from FHIR, list, show, edit, reply, export.
//! - [`shelter`]: 避難所 reception: open, check-in/out, leave, needs, supply requests, medical notes.
//! - [`hq`]: 災害対策本部 views: counts per shelter and over time, safety inquiry, CSV/HXL exports.

use musubi_crdt::ids::{DocumentId, DocumentKind};

use crate::engine::{Engine, EngineError, Result};

pub mod careplan;
pub mod hq;
pub mod referral;
pub mod shelter;

/// Writes `bytes` to `path` for this user only (mode 0600) and atomically: into `PATH.part`, synced,
/// then renamed over `path` (an existing file is replaced whole or not at all; the part file is
/// removed on failure). For exports that carry personal data (rosters, the audit log).
///
/// Errors: the IO error of the first step that failed.
pub fn write_owner_only(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = std::path::PathBuf::from(part);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&part)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&part, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// Records in the audit log that the signed-in staff member did `action` on `doc`, touching `fields`
/// (names only). Views record before they are returned, changes after they are committed.
pub(crate) fn audit(
    engine: &Engine,
    action: musubi_crdt::audit::AuditAction,
    doc: Option<DocumentId>,
    fields: &[&str],
) -> Result<()> {
    crate::audit::record(engine, action, doc, fields).map(|_| ())
}

/// Runs after a sync step touched `doc`: marks a referral received at the recipient facility.
pub fn after_sync(engine: &mut Engine, doc: DocumentId) -> Result<()> {
    let Some(row) = engine.store().document(doc)? else {
        return Ok(());
    };
    if row.info.kind == DocumentKind::Shelter {
        // An HQ facility that enrolled after the shelter opened becomes a member (owner only).
        if let Err(e) = shelter::ensure_hq_members(engine, doc) {
            tracing::warn!(%doc, "could not add HQ facilities to the shelter: {e}");
        }
        return Ok(());
    }
    if row.info.kind != DocumentKind::Referral {
        return Ok(());
    }
    match referral::mark_received(engine, doc) {
        Ok(()) | Err(EngineError::NoKey(_)) | Err(EngineError::ReadOnly(_)) => Ok(()),
        Err(e) => {
            tracing::warn!(%doc, "could not mark the referral received: {e}");
            Ok(())
        }
    }
}
