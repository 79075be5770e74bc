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
//!
//! [`publish`] copies the entries into the facility's audit document
//! ([`musubi_crdt::audit::document`], a document whose only member is the facility), which syncs
//! like any document: sealed at the relay, held by every device of the facility, so a lost or
//! wiped laptop does not take its log with it. [`list`] and [`verify_all`] read the other devices'
//! entries from there, and compare this device's copy with its own (a device put back to an older
//! copy of its disk is seen). [`publish`] also enforces retention ([`retention_days`]).

use std::collections::BTreeMap;

use musubi_crdt::audit::document::{self as audit_doc, Chain, PUBLISH_BATCH_MAX};
use musubi_crdt::audit::{
    AuditAction, AuditEntry, ChainBreak, ChainHead, ChainSummary, SignedEntry, entry_hash,
    verify_chain,
};
use musubi_crdt::crypto;
use musubi_crdt::directory::{Devices, Trust};
use musubi_crdt::ids::{DeviceId, DocumentId, DocumentKind, FacilityId, FacilityRole, Role};
use musubi_crdt::ops::Member;
use serde::Serialize;

use crate::engine::{Engine, EngineError, Result, now_ms};
use crate::store::StoreError;

/// Largest sealed entry opened, in bytes.
pub const ENTRY_BYTES_MAX: usize = 64 * 1024;
/// Most fields named in one entry.
pub const FIELDS_MAX: usize = 64;
/// Times an append is retried when another process appended meanwhile.
const APPEND_TRIES: usize = 8;
/// How long entries are kept when no administrator set it: 5 years (1,827 days), the period the
/// 安全管理ガイドライン asks access logs to be kept alongside the records they concern.
pub const DEFAULT_RETENTION_DAYS: u64 = 1_827;
/// The shortest retention an administrator may set, in days (entries removed earlier than this
/// would make an unsigned cut look like retention).
pub const RETENTION_DAYS_MIN: u64 = 365;
/// The longest, in days (30 years).
pub const RETENTION_DAYS_MAX: u64 = 10_958;
const DAY_MS: u64 = 86_400_000;

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
    /// The facility of that device (this facility's, or a shelter's whose log HQ reads).
    pub facility: String,
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

fn to_record(entry: AuditEntry, facility: &str) -> AuditRecord {
    AuditRecord {
        facility: facility.to_owned(),
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

/// The entries that match `filter`, oldest first: this device's from its disk, the facility's
/// other devices' from its audit document (what they published before the last sync), and at an
/// HQ the shelters' from theirs. Entries that cannot be read are left out: run [`verify_all`] to
/// learn where a log is broken.
///
/// Errors: store errors.
pub fn list(e: &Engine, filter: &Filter) -> Result<Vec<AuditRecord>> {
    let mut out = Vec::new();
    let me = e.device_id();
    let mine = e
        .enrolment()
        .map(|en| en.facility.to_string())
        .unwrap_or_default();
    for (_, sealed) in e.store().audit_rows()? {
        let Ok(signed) = open_row(e, &sealed) else {
            continue;
        };
        let Ok(entry) = signed.open() else { continue };
        if filter.matches(&entry) {
            out.push(to_record(entry, &mine));
        }
    }
    // The other devices' entries, from the audit documents: only those signed by the device they
    // are filed under, a device that is or was of the facility that keeps the document.
    for (facility, synced) in sources(e)? {
        let ours = of_facility(e, facility);
        let facility = facility.to_string();
        for (device, chain) in synced.chains {
            if device == me || !ours(&device) {
                continue;
            }
            for (seq, signed) in chain {
                let Some(entry) = signed.ok().and_then(|s| s.open().ok()) else {
                    continue;
                };
                if entry.device == device && entry.seq == seq && filter.matches(&entry) {
                    out.push(to_record(entry, &facility));
                }
            }
        }
    }
    out.sort_by(|a, b| (a.at_ms, &a.device, a.seq).cmp(&(b.at_ms, &b.device, b.seq)));
    Ok(out)
}

/// Verifies this device's chain: every entry decrypts, decodes and carries this device's valid
/// signature, each follows the one before by hash with no gap, and the newest is the head the
/// device recorded. `Ok(Err(break))` names the first entry where it does not hold.
///
/// Errors: store errors.
pub fn verify(e: &Engine) -> Result<std::result::Result<ChainSummary, ChainBreak>> {
    verify_at(e, now_ms())
}

/// [`verify`] at `now_ms` (ms since the Unix epoch; the time the retention anchor is judged
/// against: entries may have gone by retention only if the anchor is over
/// [`RETENTION_DAYS_MIN`] days old).
///
/// Errors: store errors.
pub fn verify_at(e: &Engine, now_ms: u64) -> Result<std::result::Result<ChainSummary, ChainBreak>> {
    let (_, head) = head(e)?;
    let device: DeviceId = e.device_id();
    let start = match local_start(e, now_ms) {
        Ok(start) => start,
        Err(broken) => return Ok(Err(broken)),
    };
    let rows = e
        .store()
        .audit_rows()?
        .into_iter()
        .map(|(seq, sealed)| (seq, open_row(e, &sealed)));
    Ok(verify_chain(&device, start, rows, head))
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

/// This facility's audit documents (normally one; two when two devices created one before either
/// had synced), smallest id first.
///
/// Errors: store errors.
pub fn audit_documents(e: &Engine) -> Result<Vec<DocumentId>> {
    let Ok(me) = e.enrolment().map(|en| en.facility) else {
        return Ok(Vec::new());
    };
    let mut ids: Vec<DocumentId> = e
        .store()
        .documents(Some(DocumentKind::Audit))?
        .into_iter()
        .filter(|r| {
            r.info
                .members
                .iter()
                .any(|m| m.facility == me && m.role == Role::Owner)
        })
        .map(|r| r.info.id)
        .collect();
    ids.sort();
    Ok(ids)
}

/// What a facility's audit documents hold: every device's entries, merged by `seq` (the same
/// entry in two documents is one; two different entries at one place are both kept, for
/// [`verify_all`] to report), and the retention anchors recorded for each device.
#[derive(Default)]
struct Synced {
    chains: BTreeMap<DeviceId, Chain>,
    anchors: BTreeMap<DeviceId, Vec<SignedEntry>>,
}

/// The audit documents this device reads, by the facility that keeps them: this facility's first,
/// then (at an HQ) each shelter's.
fn sources(e: &Engine) -> Result<Vec<(FacilityId, Synced)>> {
    let Ok(me) = e.enrolment().map(|en| en.facility) else {
        return Ok(Vec::new());
    };
    let mut others: BTreeMap<FacilityId, Vec<DocumentId>> = BTreeMap::new();
    for row in e.store().documents(Some(DocumentKind::Audit))? {
        if let Some(owner) = row.info.members.iter().find(|m| m.role == Role::Owner)
            && owner.facility != me
        {
            others.entry(owner.facility).or_default().push(row.info.id);
        }
    }
    let mut out = vec![(me, synced(e, &audit_documents(e)?)?)];
    for (facility, ids) in others {
        out.push((facility, synced(e, &ids)?));
    }
    Ok(out)
}

/// What the audit documents `ids` hold ([`Synced`]).
fn synced(e: &Engine, ids: &[DocumentId]) -> Result<Synced> {
    let mut merged: BTreeMap<
        DeviceId,
        BTreeMap<u64, Vec<std::result::Result<SignedEntry, String>>>,
    > = BTreeMap::new();
    let mut out = Synced::default();
    for id in ids {
        let loaded = match e.load(*id) {
            Ok(l) => l,
            // Not readable yet (its key has not arrived): nothing of it to show.
            Err(EngineError::NoKey(_)) => continue,
            Err(err) => return Err(err),
        };
        let (chains, _) = audit_doc::synced_chains(&loaded.doc);
        for (device, chain) in chains {
            if let Some(Ok(anchor)) = audit_doc::anchor(&loaded.doc, &device) {
                out.anchors.entry(device).or_default().push(anchor);
            }
            let into = merged.entry(device).or_default();
            for (seq, entry) in chain {
                let at = into.entry(seq).or_default();
                if !at.contains(&entry) {
                    at.push(entry);
                }
            }
        }
    }
    out.chains = merged
        .into_iter()
        .map(|(device, by_seq)| {
            let chain = by_seq
                .into_iter()
                .flat_map(|(seq, entries)| entries.into_iter().map(move |en| (seq, en)))
                .collect();
            (device, chain)
        })
        .collect();
    Ok(out)
}

/// How long entries are kept, in days: what an administrator set in the facility's audit
/// document ([`set_retention_days`]), else [`DEFAULT_RETENTION_DAYS`].
///
/// Errors: store errors.
pub fn retention_days(e: &Engine) -> Result<u64> {
    for id in audit_documents(e)? {
        if let Ok(loaded) = e.load(id)
            && let Some(days) = audit_doc::retention_days(&loaded.doc)
        {
            return Ok(days.clamp(RETENTION_DAYS_MIN, RETENTION_DAYS_MAX));
        }
    }
    Ok(DEFAULT_RETENTION_DAYS)
}

/// Sets how long every device of the facility keeps audit entries (days, from
/// [`RETENTION_DAYS_MIN`] to [`RETENTION_DAYS_MAX`]); recorded as an `audit-read` of `retention`
/// by the staff member signed in. Takes effect at each device's next [`publish`].
///
/// Errors: [`EngineError::Invalid`] outside the range; [`EngineError::NotEnrolled`]-like errors of
/// a device that has not joined; store errors.
pub fn set_retention_days(e: &mut Engine, days: u64) -> Result<()> {
    if !(RETENTION_DAYS_MIN..=RETENTION_DAYS_MAX).contains(&days) {
        return Err(EngineError::Invalid(format!(
            "retention must be from {RETENTION_DAYS_MIN} to {RETENTION_DAYS_MAX} days, not {days}"
        )));
    }
    let id = ensure_document(e)?;
    let mut loaded = e.load(id)?;
    audit_doc::set_retention_days(&mut loaded.doc, days)
        .map_err(|err| corrupt(format!("audit document: {err}")))?;
    let field = format!("retention:{days}d");
    e.commit_recorded(&mut loaded, AuditAction::AuditRead, &["retention", &field])?;
    Ok(())
}

fn ensure_document(e: &mut Engine) -> Result<DocumentId> {
    if let Some(id) = audit_documents(e)?.first() {
        return Ok(*id);
    }
    let enrolment = e.enrolment()?;
    let facility = enrolment.facility;
    let readers = hq_readers(e, enrolment.role)?;
    e.create_document(DocumentKind::Audit, readers, |doc| {
        audit_doc::init(doc, &facility).map_err(|err| corrupt(format!("audit document: {err}")))
    })
}

/// The HQ facilities that read a shelter's audit log (the admission rule lets no one else in):
/// every current HQ for a shelter, no one for any other facility.
fn hq_readers(e: &Engine, role: FacilityRole) -> Result<Vec<Member>> {
    if role != FacilityRole::Shelter {
        return Ok(Vec::new());
    }
    Ok(e.directory()?
        .facilities
        .iter()
        .filter(|f| f.role == FacilityRole::Hq && !f.revoked && f.trust == Trust::Verified)
        .map(|f| Member {
            facility: f.id,
            role: Role::Reader,
        })
        .collect())
}

/// What one [`publish`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Published {
    /// Entries of this device copied into the audit document.
    pub copied: usize,
    /// Entries removed from this device's disk because their retention ended.
    pub pruned_local: usize,
    /// Entries (of any device of the facility) removed from the audit document for the same reason.
    pub pruned_synced: usize,
}

/// Copies this device's entries not yet in the facility's audit document into it (creating the
/// document the first time; at most [`PUBLISH_BATCH_MAX`] entries a call), and removes entries
/// older than [`retention_days`] from this device's disk (only entries already copied) and from
/// the document. `now_ms` is the time (ms since the Unix epoch). With `create` false, nothing is
/// done until the device holds the facility's audit document (a device that has not synced yet
/// would otherwise start a second one). Nothing to do on a device that has not joined or has no
/// entry.
///
/// Errors: [`EngineError::Trust`] when the document holds entries of this device that its disk no
/// longer has, or holds them differently (the disk was put back to an older copy, or the log was
/// cut or altered); the entries are then not copied, and [`verify_all`] names the break. Store,
/// crypto and Automerge errors.
pub fn publish(e: &mut Engine, now_ms: u64, create: bool) -> Result<Published> {
    let mut out = Published::default();
    if e.enrolment().is_err() || (!create && audit_documents(e)?.is_empty()) {
        return Ok(out);
    }
    let (_, head) = head(e)?;
    let Some(head) = head else {
        return Ok(out);
    };
    if e.store().meta_cbor::<u64>("audit_published")? == Some(head.seq)
        && !retention_due(e, now_ms)?
    {
        return Ok(out);
    }
    let id = ensure_document(e)?;
    // An HQ that enrolled after the shelter's log was started reads it from now on.
    let enrolment = e.enrolment()?;
    if let Some(row) = e.store().document(id)? {
        for hq in hq_readers(e, enrolment.role)? {
            if row.info.role_of(hq.facility).is_none()
                && let Err(err) = e.share(id, &hq.facility.to_string(), Some(Role::Reader))
            {
                tracing::warn!(hq = %hq.facility, "could not add HQ as a reader of this shelter's audit log: {err}");
            }
        }
    }
    let mut loaded = e.load(id)?;
    let me = e.device_id();
    let in_doc = audit_doc::last_seq(&loaded.doc, &me).unwrap_or(0);
    if in_doc > head.seq {
        return Err(EngineError::Trust(format!(
            "the facility's audit document holds entries of this device up to {in_doc}, but its disk only up to {}: the disk was put back to an older copy or its log was cut; an administrator should run `musubi audit verify`",
            head.seq
        )));
    }
    if in_doc > 0
        && let Some((_, sealed)) = e.store().audit_rows_after(in_doc - 1, 1)?.first()
        && let (Ok(local), Some((_, Ok(synced)))) = (
            open_row(e, sealed),
            audit_doc::synced_chains(&loaded.doc)
                .0
                .get(&me)
                .and_then(|c| c.iter().find(|(s, _)| *s == in_doc)),
        )
        && local != *synced
    {
        return Err(EngineError::Trust(format!(
            "this device's audit entry {in_doc} differs from the copy in the facility's audit document: the log was altered; an administrator should run `musubi audit verify`"
        )));
    }
    let rows = e.store().audit_rows_after(in_doc, PUBLISH_BATCH_MAX)?;
    let mut batch = Vec::with_capacity(rows.len());
    for (seq, sealed) in rows {
        let signed = open_row(e, &sealed).map_err(|reason| {
            EngineError::Trust(format!(
                "audit entry {seq} {reason}; an administrator should run `musubi audit verify`"
            ))
        })?;
        batch.push((seq, signed));
    }
    out.copied = batch.len();
    let published = batch.last().map_or(in_doc, |(s, _)| *s);
    audit_doc::append(&mut loaded.doc, &me, &batch)
        .map_err(|err| corrupt(format!("audit document: {err}")))?;

    // Retention: entries older than the cutoff go, on this disk (once copied) and in the document.
    let days = audit_doc::retention_days(&loaded.doc).map_or(DEFAULT_RETENTION_DAYS, |d| {
        d.clamp(RETENTION_DAYS_MIN, RETENTION_DAYS_MAX)
    });
    let cutoff = now_ms.saturating_sub(days * DAY_MS);
    out.pruned_local = prune_local(e, cutoff, published)?;
    out.pruned_synced = prune_document(&mut loaded.doc, cutoff)?;
    e.atomic(|e| {
        e.commit(&mut loaded)?;
        e.store().set_meta_cbor("audit_published", &published)?;
        Ok(())
    })?;
    // A second audit document of the facility (two devices started one each before either had
    // synced) is kept to the same retention.
    for other in audit_documents(e)?.into_iter().filter(|d| *d != id) {
        let Ok(mut loaded) = e.load(other) else {
            continue;
        };
        let removed = prune_document(&mut loaded.doc, cutoff)?;
        if removed > 0 {
            e.commit(&mut loaded)?;
            out.pruned_synced += removed;
        }
    }
    Ok(out)
}

/// Removes from an audit document every device's entries older than `cutoff` (a prefix of its
/// chain), recording the last one removed as the device's anchor there. Returns how many.
fn prune_document(doc: &mut automerge::AutoCommit, cutoff: u64) -> Result<usize> {
    let am = |err: automerge::AutomergeError| corrupt(format!("audit document: {err}"));
    let mut removed = 0;
    for (device, chain) in audit_doc::synced_chains(doc).0 {
        let expired = chain
            .iter()
            .take_while(|(seq, entry)| {
                entry
                    .as_ref()
                    .ok()
                    .and_then(|s| s.open().ok())
                    .is_some_and(|en| en.at_ms < cutoff && en.device == device && en.seq == *seq)
            })
            .last();
        if let Some((through, Ok(anchor))) = expired {
            audit_doc::set_anchor(doc, &device, anchor).map_err(am)?;
            removed += audit_doc::remove_through(doc, &device, *through).map_err(am)?;
        }
    }
    Ok(removed)
}

/// Whether this device's oldest entry on disk is past its retention (a cheap check: one row).
fn retention_due(e: &Engine, now_ms: u64) -> Result<bool> {
    let Some((_, sealed)) = e.store().audit_rows_after(0, 1)?.first().cloned() else {
        return Ok(false);
    };
    let Ok(entry) = open_row(e, &sealed).and_then(|s| s.open().map_err(str::to_owned)) else {
        return Ok(false);
    };
    Ok(entry.at_ms < now_ms.saturating_sub(RETENTION_DAYS_MIN * DAY_MS))
}

/// Removes this device's rows older than `cutoff` and not after `published`, keeping the last one
/// removed (sealed) as the anchor verification starts from. Returns how many.
fn prune_local(e: &Engine, cutoff: u64, published: u64) -> Result<usize> {
    let mut last: Option<(u64, Vec<u8>)> = None;
    let mut after = 0;
    'scan: loop {
        let rows = e.store().audit_rows_after(after, 512)?;
        if rows.is_empty() {
            break;
        }
        for (seq, sealed) in rows {
            after = seq;
            if seq > published {
                break 'scan;
            }
            let Ok(entry) = open_row(e, &sealed).and_then(|s| s.open().map_err(str::to_owned))
            else {
                // A row that does not open stays for `verify` to report.
                break 'scan;
            };
            if entry.at_ms >= cutoff {
                break 'scan;
            }
            last = Some((seq, sealed));
        }
    }
    match last {
        None => Ok(0),
        Some((through, sealed)) => Ok(e.store().audit_prune(through, &sealed)?),
    }
}

/// Where this device's chain on disk starts: after the anchor retention left (its signature and
/// age checked), or at 1.
fn local_start(e: &Engine, now_ms: u64) -> std::result::Result<(u64, [u8; 32]), ChainBreak> {
    let Ok(Some(sealed)) = e.store().meta("audit_anchor") else {
        return Ok((1, [0; 32]));
    };
    let brk = |reason: &str| ChainBreak {
        seq: 1,
        reason: reason.to_owned(),
    };
    let signed = open_row(e, &sealed).map_err(|r| brk(&format!("the retention anchor: {r}")))?;
    let entry = signed
        .open()
        .map_err(|r| brk(&format!("the retention anchor: {r}")))?;
    if entry.device != e.device_id() {
        return Err(brk("the retention anchor is another device's entry"));
    }
    if entry.at_ms >= now_ms.saturating_sub(RETENTION_DAYS_MIN * DAY_MS) {
        return Err(ChainBreak {
            seq: entry.seq,
            reason: format!(
                "entries up to {} were removed before their retention ended",
                entry.seq
            ),
        });
    }
    Ok((entry.seq + 1, entry_hash(&signed)))
}

/// Whether a device is, or was, one of `facility`'s (by the verified directory).
fn of_facility(e: &Engine, facility: FacilityId) -> impl Fn(&DeviceId) -> bool {
    let dir = e.directory().ok();
    move |device| {
        dir.as_ref()
            .and_then(|d| d.device_status(device).ever())
            .is_some_and(|f| f == facility)
    }
}

/// One device's chain as [`verify_all`] found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceChain {
    /// The device (hex).
    pub device: String,
    /// Its facility (this facility, or a shelter whose log HQ reads).
    pub facility: String,
    /// Whether it is this device (its chain read from its disk, and compared with its copy in the
    /// audit document); else the chain is the copy in the audit document.
    pub this_device: bool,
    /// What verified, or the first break.
    pub result: std::result::Result<ChainSummary, ChainBreak>,
}

/// Verifies this device's chain on disk ([`verify`]), compares it with its copy in the facility's
/// audit document (entries there that the disk no longer has, or has differently, are a break),
/// and verifies every other device's chain in the document (and at an HQ, in each shelter's): each
/// entry signed by the device it is filed under, a device that is or was of the facility that
/// keeps the document, following the one before with no gap. This device first, then the others
/// by facility and id.
///
/// Errors: store errors.
pub fn verify_all(e: &Engine) -> Result<Vec<DeviceChain>> {
    verify_all_at(e, now_ms())
}

/// [`verify_all`] at `now_ms` (as [`verify_at`]).
///
/// Errors: store errors.
pub fn verify_all_at(e: &Engine, now_ms: u64) -> Result<Vec<DeviceChain>> {
    let me = e.device_id();
    let mine = verify_at(e, now_ms)?;
    let sources = sources(e)?;
    let my_facility = e
        .enrolment()
        .map(|en| en.facility.to_string())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mine = match (mine, sources.first().and_then(|(_, s)| s.chains.get(&me))) {
        (Ok(summary), Some(copy)) => compare_copy(e, summary, copy)?,
        (r, _) => r,
    };
    out.push(DeviceChain {
        device: me.to_string(),
        facility: my_facility,
        this_device: true,
        result: mine,
    });
    for (facility, synced) in sources {
        let ours = of_facility(e, facility);
        for (device, chain) in &synced.chains {
            let device = *device;
            if device == me {
                continue;
            }
            let anchors = synced.anchors.get(&device).map_or(&[][..], Vec::as_slice);
            let result = if !ours(&device) {
                Err(ChainBreak {
                    seq: chain.first().map_or(0, |(s, _)| *s),
                    reason: "the entries are filed under a device that is not one of the facility's that keeps the document"
                        .into(),
                })
            } else {
                verify_copy(&device, chain, anchors, now_ms)
            };
            out.push(DeviceChain {
                device: device.to_string(),
                facility: facility.to_string(),
                this_device: false,
                result,
            });
        }
    }
    Ok(out)
}

/// Verifies a device's chain as the audit document holds it: from entry 1, or, when retention
/// removed the first ones, from the anchor recorded for them (the last one removed: this
/// device's, signed, over [`RETENTION_DAYS_MIN`] days old at `now_ms`, and the hash the first held
/// entry follows), to its last entry held. Entries removed from the front without such an anchor
/// are a break.
fn verify_copy(
    device: &DeviceId,
    chain: &Chain,
    anchors: &[SignedEntry],
    now_ms: u64,
) -> std::result::Result<ChainSummary, ChainBreak> {
    for w in chain.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(ChainBreak {
                seq: w[0].0,
                reason: "two different entries are filed at this place".into(),
            });
        }
    }
    let first = chain.first().map(|(seq, _)| *seq);
    let opened: Vec<(AuditEntry, &SignedEntry)> = anchors
        .iter()
        .filter_map(|a| a.open().ok().map(|en| (en, a)))
        .filter(|(en, _)| en.device == *device)
        .collect();
    // The anchor the chain starts after: the one just before its first entry, or with no entry
    // left, the newest.
    let anchor = match first {
        Some(1) => None,
        // Written by any member's device: sequence numbers at the ends of u64 are a break, not
        // an overflow.
        Some(f) => match opened
            .iter()
            .find(|(en, _)| en.seq.checked_add(1) == Some(f))
        {
            Some(a) => Some(a),
            None => {
                return Err(ChainBreak {
                    seq: f.saturating_sub(1),
                    reason: format!(
                        "entries before {f} were removed from the audit document without a retention anchor"
                    ),
                });
            }
        },
        None => opened.iter().max_by_key(|(en, _)| en.seq),
    };
    let start = match anchor {
        None => (1, [0; 32]),
        Some((en, signed)) => {
            if en.at_ms >= now_ms.saturating_sub(RETENTION_DAYS_MIN * DAY_MS) {
                return Err(ChainBreak {
                    seq: en.seq,
                    reason: format!(
                        "entries up to {} were removed from the audit document before their retention ended",
                        en.seq
                    ),
                });
            }
            let Some(next) = en.seq.checked_add(1) else {
                return Err(ChainBreak {
                    seq: en.seq,
                    reason: "a retention anchor names the last possible entry".into(),
                });
            };
            (next, entry_hash(signed))
        }
    };
    let head = match (chain.last(), anchor) {
        (Some((seq, Ok(last))), _) => Some(ChainHead {
            seq: *seq,
            hash: entry_hash(last),
        }),
        (None, Some((en, signed))) => Some(ChainHead {
            seq: en.seq,
            hash: entry_hash(signed),
        }),
        _ => None,
    };
    verify_chain(device, start, chain.iter().cloned(), head)
}

/// Compares this device's verified chain with its copy in the audit document.
fn compare_copy(
    e: &Engine,
    summary: ChainSummary,
    copy: &Chain,
) -> Result<std::result::Result<ChainSummary, ChainBreak>> {
    let last_local = summary.last.unwrap_or(0);
    if let Some((beyond, _)) = copy.iter().find(|(s, _)| *s > last_local) {
        return Ok(Err(ChainBreak {
            seq: *beyond,
            reason: format!(
                "the facility's audit document holds entries from {beyond} that this device's disk no longer has (the disk was put back to an older copy, or its newest entries were removed with their record)"
            ),
        }));
    }
    let first_local = summary.first.unwrap_or(u64::MAX);
    let local: BTreeMap<u64, Vec<u8>> = e
        .store()
        .audit_rows_after(first_local.saturating_sub(1), usize::MAX >> 1)?
        .into_iter()
        .collect();
    for (seq, synced) in copy {
        if *seq < first_local {
            continue;
        }
        let same = local
            .get(seq)
            .and_then(|sealed| open_row(e, sealed).ok())
            .is_some_and(|l| Ok(l) == *synced);
        if !same {
            return Ok(Err(ChainBreak {
                seq: *seq,
                reason:
                    "this device's entry differs from its copy in the facility's audit document"
                        .into(),
            }));
        }
    }
    Ok(Ok(summary))
}

#[cfg(test)]
mod tests {
    use musubi_crdt::crypto::DeviceSecrets;

    use super::*;

    fn chain(secrets: &DeviceSecrets, n: u64, at_ms: u64) -> Vec<SignedEntry> {
        let mut prev = [0; 32];
        (1..=n)
            .map(|seq| {
                let s = SignedEntry::sign(
                    secrets,
                    &AuditEntry {
                        seq,
                        at_ms: at_ms + seq,
                        device: secrets.device_id(),
                        staff: Some("sato".into()),
                        doc: None,
                        action: AuditAction::Read,
                        fields: vec![],
                        prev,
                    },
                );
                prev = entry_hash(&s);
                s
            })
            .collect()
    }

    fn held(c: &[SignedEntry], from: u64) -> Chain {
        c.iter()
            .enumerate()
            .skip(from as usize - 1)
            .map(|(i, s)| (i as u64 + 1, Ok(s.clone())))
            .collect()
    }

    /// Entries removed from the front of a device's copy verify only after a retention anchor
    /// that is this device's, signed, old enough by the verifier's clock, and followed by the
    /// first entry held: a cut, or a prune by a device whose clock ran ahead, is a break.
    #[test]
    fn a_synced_chain_cut_at_the_front_needs_an_old_enough_anchor() {
        let me = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let d = me.device_id();
        let now = 10 * 365 * DAY_MS;
        let old = chain(&me, 5, 0);
        assert_eq!(
            verify_copy(&d, &held(&old, 1), &[], now)
                .expect("whole")
                .entries,
            5
        );
        let cut = verify_copy(&d, &held(&old, 3), &[], now).expect_err("cut without anchor");
        assert!(cut.reason.contains("without a retention anchor"), "{cut}");
        let ok = verify_copy(&d, &held(&old, 3), &[old[1].clone()], now).expect("anchored");
        assert_eq!((ok.first, ok.last), (Some(3), Some(5)));
        // The wrong anchor (not the entry just before), or another device's.
        assert!(verify_copy(&d, &held(&old, 3), &[old[0].clone()], now).is_err());
        let other = chain(&DeviceSecrets::from_seeds([3; 32], [4; 32]), 5, 0);
        assert!(verify_copy(&d, &held(&old, 3), &[other[1].clone()], now).is_err());
        // Everything removed: the anchor alone, if old enough.
        verify_copy(&d, &Vec::new(), &[old[4].clone()], now).expect("all expired");
        // Entries a month old "removed by retention" (a device whose clock ran years ahead).
        let recent = chain(&me, 5, now - 30 * DAY_MS);
        let early = verify_copy(&d, &held(&recent, 3), &[recent[1].clone()], now)
            .expect_err("too recent to be retention");
        assert!(
            early.reason.contains("before their retention ended"),
            "{early}"
        );
    }
    /// A member's hostile device files an entry at place 0, or signs an anchor at the last
    /// possible place: each is a break in the chain, never an overflow.
    #[test]
    fn sequence_numbers_at_the_ends_of_u64_are_breaks_not_overflows() {
        let me = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let d = me.device_id();
        let now = 10 * 365 * DAY_MS;
        let old = chain(&me, 2, 0);
        let at_zero: Chain = vec![(0, Ok(old[0].clone()))];
        assert!(verify_copy(&d, &at_zero, &[], now).is_err());
        let last = SignedEntry::sign(
            &me,
            &AuditEntry {
                seq: u64::MAX,
                at_ms: 0,
                device: d,
                staff: None,
                doc: None,
                action: AuditAction::Read,
                fields: vec![],
                prev: [0; 32],
            },
        );
        let e = verify_copy(&d, &Vec::new(), &[last], now).expect_err("no place after it");
        assert!(e.reason.contains("last possible"), "{e}");
    }
}
