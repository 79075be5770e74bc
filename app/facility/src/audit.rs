//! This device's audit log (監査ログ): every read, change, export and print of a document, card
//! read, sign-in and staff account change, with time, staff member, device, document, action and
//! the fields touched, never their values (医療情報システムの安全管理に関するガイドライン 第6.0版:
//! アクセスログの記録と定期的な確認, ログの改ざん防止).
//!
//! Each entry is a [`SignedEntry`] (signed by this device, chained to the one before by hash:
//! `musubi_crdt::audit`), sealed to this device's age key and appended to the store's `audit`
//! table together with the chain's head, in one transaction. Nothing of an entry is readable on
//! disk. [`verify`] walks the chain: an altered, removed, reordered or truncated entry is named.
//!
//! Entries are written before a view is returned or a file is written (no audit entry, no
//! data), and after a change is committed.

use musubi_crdt::audit::{
    AuditAction, AuditEntry, ChainBreak, ChainHead, ChainSummary, SignedEntry, entry_hash,
    verify_chain,
};
use musubi_crdt::crypto;
use musubi_crdt::ids::{DeviceId, DocumentId};
use serde::Serialize;

use crate::engine::{Engine, EngineError, Result, now_ms};
use crate::store::StoreError;

/// Largest sealed entry opened, in bytes.
pub const ENTRY_BYTES_MAX: usize = 64 * 1024;
/// Most fields named in one entry.
pub const FIELDS_MAX: usize = 64;
/// Times an append is retried when another process appended meanwhile.
const APPEND_TRIES: usize = 8;

/// One entry as `musubi audit list` and the 監査ログ screen show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Its place in this device's chain.
    pub seq: u64,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The staff member (login), or `null` when no one was signed in.
    pub staff: Option<String>,
    /// The device that wrote it.
    pub device: String,
    /// The document, if any.
    pub doc: Option<String>,
    /// The action's stable name (`read`, `edit`, `export`, `print`, `share`, `sign-in`, ...).
    pub action: String,
    /// The fields touched (names only).
    pub fields: Vec<String>,
}

/// Which entries to list: every given condition must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this staff member's (login).
    pub staff: Option<String>,
    /// Only about this document.
    pub doc: Option<DocumentId>,
    /// Only this action.
    pub action: Option<AuditAction>,
    /// Only at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only before this time (ms since the Unix epoch).
    pub until_ms: Option<u64>,
}

impl Filter {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.staff
            .as_ref()
            .is_none_or(|s| e.staff.as_deref() == Some(s.as_str()))
            && self.doc.is_none_or(|d| e.doc == Some(d))
            && self.action.is_none_or(|a| e.action == a)
            && self.since_ms.is_none_or(|t| e.at_ms >= t)
            && self.until_ms.is_none_or(|t| e.at_ms < t)
    }
}

fn corrupt(what: impl Into<String>) -> EngineError {
    EngineError::Store(StoreError::Corrupt(what.into()))
}

fn head(e: &Engine) -> Result<(Option<Vec<u8>>, Option<ChainHead>)> {
    let raw = e.store().audit_head()?;
    let head = match &raw {
        None => None,
        Some(b) => Some(
            ciborium::from_reader::<ChainHead, _>(b.as_slice())
                .map_err(|err| corrupt(format!("audit head: {err}")))?,
        ),
    };
    Ok((raw, head))
}

/// Records `action` on `doc` touching `fields`, attributed to the staff member signed in at `e`
/// (or to `staff_override`, for a failed sign-in naming the login tried).
///
/// Errors: store and crypto errors (the caller does not go on: no entry, no data).
pub fn record_as(
    e: &Engine,
    staff: Option<&str>,
    action: AuditAction,
    doc: Option<DocumentId>,
    fields: &[&str],
) -> Result<u64> {
    let recipient = e.secrets().age_identity().to_public();
    // A login as typed at a failed sign-in: at most LOGIN_CHARS_MAX characters, no control
    // characters (it is printed and exported).
    let staff = staff.map(clean);
    let fields: Vec<String> = fields.iter().take(FIELDS_MAX).map(|f| clean(f)).collect();
    for _ in 0..APPEND_TRIES {
        let (raw, head) = head(e)?;
        if head.is_none() && !e.store().audit_rows_empty()? {
            return Err(EngineError::Trust(
                "the audit log's record of its newest entry is missing: entries may have been removed; an administrator should run `musubi audit verify`"
                    .into(),
            ));
        }
        let (seq, prev) = head.map_or((1, [0; 32]), |h| (h.seq + 1, h.hash));
        let entry = AuditEntry {
            seq,
            at_ms: now_ms(),
            device: e.device_id(),
            staff: staff.clone(),
            doc,
            action,
            fields: fields.clone(),
            prev,
        };
        let signed = SignedEntry::sign(e.secrets(), &entry);
        let mut plain = Vec::new();
        ciborium::into_writer(&signed, &mut plain).expect("writing to a Vec cannot fail");
        let sealed = crypto::seal_to(std::slice::from_ref(&recipient), &plain)?;
        let mut new_head = Vec::new();
        ciborium::into_writer(
            &ChainHead {
                seq,
                hash: entry_hash(&signed),
            },
            &mut new_head,
        )
        .expect("writing to a Vec cannot fail");
        if e.store()
            .audit_append(raw.as_deref(), seq, &sealed, &new_head)?
        {
            return Ok(seq);
        }
    }
    Err(EngineError::Trust(
        "other programs kept writing to the audit log at the same time; try again".into(),
    ))
}

/// Longest login or field name kept in an entry, in characters.
pub const TEXT_CHARS_MAX: usize = 128;

/// `s` cut to [`TEXT_CHARS_MAX`] characters, control characters replaced by `?`.
fn clean(s: &str) -> String {
    s.chars()
        .take(TEXT_CHARS_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Records `action` on `doc` touching `fields`, attributed to whoever is signed in at `e`.
///
/// Errors: as [`record_as`].
pub fn record(
    e: &Engine,
    action: AuditAction,
    doc: Option<DocumentId>,
    fields: &[&str],
) -> Result<u64> {
    record_as(e, e.staff(), action, doc, fields)
}

/// Opens a stored row: the signed entry, or why it cannot be read.
fn open_row(e: &Engine, sealed: &[u8]) -> std::result::Result<SignedEntry, String> {
    let plain = crypto::open_with(e.secrets().age_identity(), sealed, ENTRY_BYTES_MAX)
        .map_err(|_| "it cannot be decrypted (altered, or not this device's)".to_owned())?;
    ciborium::from_reader(plain.as_slice()).map_err(|_| "it does not decode".to_owned())
}

fn to_record(entry: AuditEntry) -> AuditRecord {
    AuditRecord {
        seq: entry.seq,
        time: crate::services::shelter::ms_to_rfc3339(entry.at_ms as i64),
        at_ms: entry.at_ms,
        staff: entry.staff,
        device: entry.device.to_string(),
        doc: entry.doc.map(|d| d.to_string()),
        action: entry.action.as_str().to_owned(),
        fields: entry.fields,
    }
}

/// The entries that match `filter`, oldest first. Entries that cannot be read are left out: run
/// [`verify`] to learn where the log is broken.
///
/// Errors: store errors.
pub fn list(e: &Engine, filter: &Filter) -> Result<Vec<AuditRecord>> {
    let mut out = Vec::new();
    for (_, sealed) in e.store().audit_rows()? {
        let Ok(signed) = open_row(e, &sealed) else {
            continue;
        };
        let Ok(entry) = signed.open() else { continue };
        if filter.matches(&entry) {
            out.push(to_record(entry));
        }
    }
    Ok(out)
}

/// Verifies this device's chain: every entry decrypts, decodes and carries this device's valid
/// signature, each follows the one before by hash with no gap, and the newest is the head the
/// device recorded. `Ok(Err(break))` names the first entry where it does not hold.
///
/// Errors: store errors.
pub fn verify(e: &Engine) -> Result<std::result::Result<ChainSummary, ChainBreak>> {
    let (_, head) = head(e)?;
    let device: DeviceId = e.device_id();
    let rows = e
        .store()
        .audit_rows()?
        .into_iter()
        .map(|(seq, sealed)| (seq, open_row(e, &sealed)));
    Ok(verify_chain(&device, (1, [0; 32]), rows, head))
}

/// Writes `records` as CSV (UTF-8, a header row; fields joined by `;`; a cell that a spreadsheet
/// would take for a formula starts with `'`).
///
/// Errors: IO errors of `out`.
pub fn write_csv(records: &[AuditRecord], out: impl std::io::Write) -> std::io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["seq", "time", "staff", "device", "doc", "action", "fields"])?;
    // A cell starting with = + - @ would be a formula in a spreadsheet (CSV injection): quoted.
    let cell = |s: &str| -> String {
        if s.starts_with(['=', '+', '-', '@']) {
            format!("'{s}")
        } else {
            s.to_owned()
        }
    };
    for r in records {
        w.write_record([
            r.seq.to_string().as_str(),
            &r.time,
            &cell(r.staff.as_deref().unwrap_or("")),
            &r.device,
            r.doc.as_deref().unwrap_or(""),
            &r.action,
            &cell(&r.fields.join(";")),
        ])?;
    }
    w.flush()
}
