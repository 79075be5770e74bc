//! 診療情報提供書 (様式11): referral letters between clinics.
//!
//! A letter written here starts as a draft that only this facility can read ([`create`]); sending
//! it ([`send`]) makes the recipient facility a writer of the document (it writes the 返書) and
//! moves the status to sent. The recipient's device marks it received when it first syncs it
//! ([`mark_received`], from [`super::after_sync`]). Imported FHIR letters are sent at once.

use std::path::Path;

use musubi_crdt::audit::AuditAction;
use musubi_crdt::documents::referral::{
    self as schema, AttachmentRef, ReferralField, ReferralLetter, ReferralStatus,
};
use musubi_crdt::documents::referral_fhir;
use musubi_crdt::limits::ATTACHMENT_BYTES_MAX;
use musubi_crdt::ops::Member;
use serde::Serialize;

use musubi_crdt::ids::{DocumentId, DocumentKind, Role};

use crate::engine::now_ms;
use crate::engine::{Engine, EngineError, Result};
use crate::services::careplan::PdfExportError;
use musubi_crdt::documents::DocumentError;
use musubi_crdt::documents::referral::StatusTimes;
use musubi_crdt::ids::FacilityId;
use musubi_crdt::membership::Membership;

/// A letter as shown to users: its document id and the 様式11 fields.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct LetterView {
    /// The letter's id (the document id, the same at every facility).
    pub id: DocumentId,
    /// The fields.
    #[serde(flatten)]
    pub letter: ReferralLetter,
    /// Bundles this device cannot read yet (no key for their epoch).
    // Left out of the JSON when zero; `default` after `skip_serializing_if` also makes specta
    // export the key as optional (`unreadable_bundles?: number`), as serde writes it.
    #[serde(skip_serializing_if = "is_zero", default)]
    pub unreadable_bundles: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Which way a letter goes, seen from this facility.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// 受信: another facility wrote it to this one.
    Inbox,
    /// 送信: this facility wrote it (it owns the document).
    Outbox,
}

/// One line of the letter list (受信箱 / 送信箱).
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct LetterSummary {
    /// The letter's id.
    pub id: DocumentId,
    /// Inbox or outbox.
    pub direction: Direction,
    /// 患者氏名.
    pub patient_name: String,
    /// The other facility: the recipient (outbox) or the sender (inbox), by its directory name
    /// (the letter's 紹介先/紹介元医療機関名 when the directory does not know it).
    pub counterpart: String,
    /// The other facility's id, when known.
    pub counterpart_id: Option<FacilityId>,
    /// 傷病名 (first line), for the list.
    pub diagnosis: String,
    /// 状態.
    pub status: ReferralStatus,
    /// When it was created, sent, received and replied (RFC 3339).
    pub times: StatusTimes,
    /// Number of attachments.
    pub attachments: usize,
}

/// One letter with what the screen needs to decide what the user may do.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct LetterDetail {
    /// The letter's id.
    pub id: DocumentId,
    /// Inbox or outbox.
    pub direction: Direction,
    /// The whole 様式11 letter, its status, reply and attachment list.
    pub letter: ReferralLetter,
    /// When it was created, sent, received and replied (RFC 3339).
    pub times: StatusTimes,
    /// The other facility's directory name (see [`LetterSummary::counterpart`]).
    pub counterpart: String,
    /// The other facility's id, when known.
    pub counterpart_id: Option<FacilityId>,
    /// Whether this facility may edit the letter's fields: it wrote the letter and it is a draft.
    pub editable: bool,
    /// Whether this facility may send it: it wrote the letter, it is a draft, and a recipient is set.
    pub can_send: bool,
    /// Whether this facility may write the 返書: it received the letter (a writer, not the owner)
    /// and the letter has been sent.
    pub can_reply: bool,
    /// Bundles this device cannot read yet (no key for their epoch); sync to fetch the keys.
    pub unreadable_bundles: usize,
}

/// Now as RFC 3339 (UTC, seconds).
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms()),
    )
    .to_string()
}

fn invalid(key: &str, reason: impl Into<String>) -> EngineError {
    DocumentError::InvalidValue {
        key: key.to_owned(),
        reason: reason.into(),
    }
    .into()
}

/// This facility's role in the document.
fn my_role(info: &Membership, me: FacilityId) -> Option<Role> {
    info.members
        .iter()
        .find(|m| m.facility == me)
        .map(|m| m.role)
}

/// Direction and the other facility (id) of a letter, from its members and recorded recipient.
fn direction_of(
    info: &Membership,
    me: FacilityId,
    recipient: Option<FacilityId>,
) -> (Direction, Option<FacilityId>) {
    if my_role(info, me) == Some(Role::Owner) {
        let other = recipient.or_else(|| {
            info.members
                .iter()
                .find(|m| m.facility != me)
                .map(|m| m.facility)
        });
        (Direction::Outbox, other)
    } else {
        let owner = info
            .members
            .iter()
            .find(|m| m.role == Role::Owner)
            .map(|m| m.facility);
        (Direction::Inbox, owner)
    }
}

/// Everything read from one letter document, for the list and the detail.
struct Read {
    view: LetterView,
    info: Membership,
    times: StatusTimes,
    recipient: Option<FacilityId>,
}

fn read_doc(engine: &Engine, doc: DocumentId) -> Result<Read> {
    let loaded = engine.load(doc)?;
    let letter = schema::read(&loaded.doc)?;
    let times = schema::status_times(&loaded.doc)?;
    let recipient = schema::recipient(&loaded.doc)?.and_then(|r| r.parse().ok());
    Ok(Read {
        view: LetterView {
            id: doc,
            letter,
            unreadable_bundles: loaded.unreadable,
        },
        info: loaded.info,
        times,
        recipient,
    })
}

/// The directory name of `facility`, else `fallback`.
fn facility_name(
    dir: Option<&musubi_crdt::directory::Directory>,
    facility: Option<FacilityId>,
    fallback: &str,
) -> String {
    facility
        .and_then(|f| dir.and_then(|d| d.facility(f)))
        .map(|f| f.name.clone())
        .unwrap_or_else(|| fallback.to_owned())
}

/// Every letter this facility can read, as list lines: newest activity first.
///
/// Letters whose key or first bundle has not arrived yet are left out (they appear after sync).
pub fn summaries(engine: &Engine) -> Result<Vec<LetterSummary>> {
    let me = engine.enrolment()?.facility;
    // The list shows each letter's patient name.
    super::audit(engine, AuditAction::Read, None, &["referral-list"])?;
    let dir = engine.directory().ok();
    let mut out = Vec::new();
    for row in engine.store().documents(Some(DocumentKind::Referral))? {
        let r = match read_doc(engine, row.info.id) {
            Ok(r) => r,
            Err(EngineError::NoKey(_)) => continue,
            Err(EngineError::Document(e)) if matches!(&*e, DocumentError::WrongKind { found, .. } if found.is_empty()) =>
            {
                continue; // the key came before the letter's first bundle
            }
            Err(e) => return Err(e),
        };
        let (direction, other) = direction_of(&r.info, me, r.recipient);
        let letter = &r.view.letter;
        let fallback = match direction {
            Direction::Outbox => &letter.to_facility,
            Direction::Inbox => &letter.from_facility,
        };
        out.push(LetterSummary {
            id: r.view.id,
            direction,
            patient_name: letter.patient.name.clone(),
            counterpart: facility_name(dir.as_ref(), other, fallback),
            counterpart_id: other,
            diagnosis: letter
                .diagnosis
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            status: letter.status,
            attachments: letter.attachments.len(),
            times: r.times,
        });
    }
    let latest = |s: &LetterSummary| {
        ReferralStatus::ALL
            .iter()
            .rev()
            .find_map(|st| s.times.get(*st).map(str::to_owned))
            .unwrap_or_default()
    };
    out.sort_by_key(|s| std::cmp::Reverse(latest(s)));
    Ok(out)
}

/// One letter with its direction, status times and what this facility may do with it.
pub fn detail(engine: &Engine, id: &str) -> Result<LetterDetail> {
    let doc = parse_id(engine, id)?;
    let me = engine.enrolment()?.facility;
    let r = read_doc(engine, doc)?;
    let (direction, other) = direction_of(&r.info, me, r.recipient);
    let letter = r.view.letter;
    let fallback = match direction {
        Direction::Outbox => &letter.to_facility,
        Direction::Inbox => &letter.from_facility,
    };
    let dir = engine.directory().ok();
    let counterpart = facility_name(dir.as_ref(), other, fallback);
    let can_write = my_role(&r.info, me).is_some_and(Role::can_write);
    let draft = letter.status == ReferralStatus::Draft;
    super::audit(engine, AuditAction::Read, Some(doc), &[])?;
    Ok(LetterDetail {
        id: doc,
        direction,
        editable: direction == Direction::Outbox && draft,
        can_send: direction == Direction::Outbox && draft && other.is_some(),
        can_reply: direction == Direction::Inbox
            && can_write
            && letter.status >= ReferralStatus::Sent,
        times: r.times,
        counterpart,
        counterpart_id: other,
        letter,
        unreadable_bundles: r.view.unreadable_bundles,
    })
}

/// Writes a new draft letter to the facility `to` (id or exact name in the directory); returns its id.
///
/// The draft is prefilled with 紹介先医療機関名 (the recipient's directory name), 紹介元医療機関名 (this
/// facility's name) and 紹介元医師氏名 (`author`, the signed-in staff member). Only this facility can
/// read it until [`send`].
///
/// Errors: [`EngineError::UnknownFacility`] for an unknown `to`; `InvalidValue` when `to` is this
/// facility; [`EngineError::NotEnrolled`].
pub fn create(engine: &mut Engine, to: &str, author: &str) -> Result<DocumentId> {
    let enrolment = engine.enrolment()?;
    let target = engine.find_facility(to)?;
    if target.id == enrolment.facility {
        return Err(invalid(
            "to",
            "a letter goes to another facility, not this one",
        ));
    }
    let letter = ReferralLetter {
        to_facility: target.name.clone(),
        from_facility: enrolment.facility_name.clone(),
        from_doctor: author.trim().to_owned(),
        ..ReferralLetter::default()
    };
    let at = now_rfc3339();
    let doc = engine.create_document(DocumentKind::Referral, vec![], |doc| {
        schema::init(doc, &letter)?;
        schema::set_recipient(doc, &target.id.to_string())?;
        schema::set_status_time(doc, ReferralStatus::Draft, &at)?;
        Ok(())
    })?;
    super::audit(engine, AuditAction::Create, Some(doc), &["draft"])?;
    Ok(doc)
}

/// Sends a draft: makes the recipient facility a writer of the letter (it gets the key and every
/// bundle at its next sync) and sets the status to sent. Sending a letter already sent is a no-op.
///
/// Errors: `InvalidValue` when the letter has no recipient or no patient name (患者氏名), or this
/// facility did not write it; [`EngineError::NotOwner`]; the engine's errors.
pub fn send(engine: &mut Engine, id: &str) -> Result<()> {
    let doc = parse_id(engine, id)?;
    let me = engine.enrolment()?.facility;
    let mut loaded = engine.load(doc)?;
    let letter = schema::read(&loaded.doc)?;
    if letter.status >= ReferralStatus::Sent {
        return Ok(());
    }
    if my_role(&loaded.info, me) != Some(Role::Owner) {
        return Err(invalid(
            "send",
            "only the facility that wrote the letter sends it",
        ));
    }
    if letter.patient.name.trim().is_empty() {
        return Err(invalid(
            "patient.name",
            "患者氏名 (the patient's name) is empty; fill it in before sending",
        ));
    }
    let recipient: FacilityId = schema::recipient(&loaded.doc)?
        .and_then(|r| r.parse().ok())
        .or_else(|| {
            loaded
                .info
                .members
                .iter()
                .find(|m| m.facility != me)
                .map(|m| m.facility)
        })
        .ok_or_else(|| invalid("to", "the letter has no recipient facility"))?;
    if !loaded.info.members.iter().any(|m| m.facility == recipient) {
        engine.share(doc, &recipient.to_string(), Some(Role::Writer))?;
    }
    schema::set_status(&mut loaded.doc, ReferralStatus::Sent)?;
    schema::set_status_time(&mut loaded.doc, ReferralStatus::Sent, &now_rfc3339())?;
    engine.commit_recorded(&mut loaded, AuditAction::Share, &["send"])?;
    Ok(())
}

fn parse_id(engine: &Engine, id: &str) -> Result<DocumentId> {
    let info = engine.document_info(id)?;
    if info.kind != DocumentKind::Referral {
        return Err(EngineError::UnknownDocument(format!(
            "{id} (it is a {} document, not a referral letter)",
            info.kind
        )));
    }
    Ok(info.id)
}

/// Imports a JP eReferral FHIR document Bundle as a new letter addressed to `to` (a facility id or
/// exact name from the directory), with status sent. Returns the letter id.
///
/// The recipient facility becomes a writer (it writes the 返書).
pub fn import_fhir(engine: &mut Engine, to: &str, json: &str) -> Result<DocumentId> {
    let mut letter = referral_fhir::import_bundle(json)?;
    let target = engine.find_facility(to)?;
    letter.status = ReferralStatus::Sent;
    let at = now_rfc3339();
    let doc = engine.create_document(
        DocumentKind::Referral,
        vec![Member {
            facility: target.id,
            role: Role::Writer,
        }],
        |doc| {
            schema::init(doc, &letter)?;
            schema::set_recipient(doc, &target.id.to_string())?;
            schema::set_status_time(doc, ReferralStatus::Draft, &at)?;
            schema::set_status_time(doc, ReferralStatus::Sent, &at)?;
            Ok(())
        },
    )?;
    super::audit(engine, AuditAction::Create, Some(doc), &["fhir"])?;
    Ok(doc)
}

/// Every letter this facility can read, oldest first.
pub fn list(engine: &Engine) -> Result<Vec<LetterView>> {
    let mut out = Vec::new();
    for row in engine.store().documents(Some(DocumentKind::Referral))? {
        match show_doc(engine, row.info.id) {
            Ok(v) => {
                super::audit(engine, AuditAction::Read, Some(v.id), &["list"])?;
                out.push(v)
            }
            Err(EngineError::NoKey(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn show_doc(engine: &Engine, doc: DocumentId) -> Result<LetterView> {
    let loaded = engine.load(doc)?;
    let letter = schema::read(&loaded.doc)?;
    Ok(LetterView {
        id: doc,
        letter,
        unreadable_bundles: loaded.unreadable,
    })
}

/// One letter (recorded as read in the audit log).
pub fn show(engine: &Engine, id: &str) -> Result<LetterView> {
    let view = show_doc(engine, parse_id(engine, id)?)?;
    super::audit(engine, AuditAction::Read, Some(view.id), &[])?;
    Ok(view)
}

/// Replaces one field's text (`field` is a key such as `remarks` or `patient.name`).
pub fn edit(engine: &mut Engine, id: &str, field: &str, text: &str) -> Result<()> {
    let parsed: ReferralField = field.parse()?;
    let doc = parse_id(engine, id)?;
    let mut loaded = engine.load(doc)?;
    schema::set_field(&mut loaded.doc, parsed, text)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &[field])?;
    Ok(())
}

/// Writes the 返書 (reply) and sets the status to replied. Only the receiving facility replies,
/// and only to a letter that was sent; writing again replaces the reply's text (as a diff).
///
/// Errors: `InvalidValue` at the facility that wrote the letter, or for a draft;
/// [`EngineError::ReadOnly`]; the engine's errors.
pub fn reply(engine: &mut Engine, id: &str, text: &str) -> Result<()> {
    let doc = parse_id(engine, id)?;
    let me = engine.enrolment()?.facility;
    let mut loaded = engine.load(doc)?;
    if my_role(&loaded.info, me) == Some(Role::Owner) {
        return Err(invalid(
            "reply",
            "the 返書 is written by the facility that received the letter",
        ));
    }
    if schema::read(&loaded.doc)?.status < ReferralStatus::Sent {
        return Err(invalid("reply", "the letter has not been sent yet"));
    }
    schema::set_field(&mut loaded.doc, ReferralField::Reply, text)?;
    schema::set_status(&mut loaded.doc, ReferralStatus::Replied)?;
    schema::set_status_time(&mut loaded.doc, ReferralStatus::Replied, &now_rfc3339())?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["reply"])?;
    Ok(())
}

/// Marks a letter received, at a facility that is not its owner.
pub fn mark_received(engine: &mut Engine, doc: DocumentId) -> Result<()> {
    let me = engine.enrolment()?.facility;
    let info = engine.document_info(&doc.to_string())?;
    if info
        .members
        .iter()
        .any(|m| m.facility == me && m.role == Role::Owner)
    {
        return Ok(());
    }
    let mut loaded = engine.load(doc)?;
    if loaded.heads.is_empty() {
        return Ok(()); // the key came before the letter's first bundle
    }
    let letter = schema::read(&loaded.doc)?;
    if letter.status >= ReferralStatus::Received || letter.status < ReferralStatus::Sent {
        return Ok(());
    }
    schema::set_status(&mut loaded.doc, ReferralStatus::Received)?;
    schema::set_status_time(&mut loaded.doc, ReferralStatus::Received, &now_rfc3339())?;
    engine.commit(&mut loaded)?;
    Ok(())
}

/// The letter as an HL7 FHIR JP eReferral document Bundle.
pub fn export_fhir(engine: &Engine, id: &str) -> Result<serde_json::Value> {
    let view = show_doc(engine, parse_id(engine, id)?)?;
    super::audit(engine, AuditAction::Export, Some(view.id), &["fhir"])?;
    let timestamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    Ok(referral_fhir::export_bundle(
        &view.letter,
        &view.id.to_string(),
        &timestamp,
    )?)
}

/// Attaches a file (添付, at most [`ATTACHMENT_BYTES_MAX`] bytes) as its own encrypted bundle.
pub fn attach(
    engine: &mut Engine,
    id: &str,
    path: &Path,
    media_type: &str,
) -> Result<AttachmentRef> {
    let io = |source| EngineError::Io {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > ATTACHMENT_BYTES_MAX as u64 {
        return Err(too_large(len as usize));
    }
    let data = std::fs::read(path).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "attachment".into());
    attach_bytes(engine, id, &name, media_type, data)
}

fn too_large(bytes: usize) -> EngineError {
    EngineError::Bundle(musubi_crdt::bundle::BundleError::PayloadTooLarge {
        what: "attachment",
        bytes,
        max: ATTACHMENT_BYTES_MAX,
    })
}

/// Attaches `data` (a file the user picked, at most [`ATTACHMENT_BYTES_MAX`] bytes) named `name`
/// with media type `media_type` as its own encrypted bundle; returns the reference the letter keeps.
///
/// Errors: [`EngineError::Bundle`] (`PayloadTooLarge`) over the limit; `InvalidValue` for an empty
/// name or media type; the engine's errors.
pub fn attach_bytes(
    engine: &mut Engine,
    id: &str,
    name: &str,
    media_type: &str,
    data: Vec<u8>,
) -> Result<AttachmentRef> {
    let doc = parse_id(engine, id)?;
    if data.len() > ATTACHMENT_BYTES_MAX {
        return Err(too_large(data.len()));
    }
    let name = name.trim();
    let name = if name.is_empty() { "attachment" } else { name };
    let bytes = data.len() as u64;
    let mut loaded = engine.load(doc)?;
    let att = AttachmentRef {
        id: String::new(),
        name: name.to_owned(),
        media_type: media_type.trim().to_owned(),
        bytes,
        added_at: now_rfc3339(),
    };
    // Check the reference before sealing the bundle, so a bad name leaves nothing behind.
    schema::add_attachment(
        &mut loaded.doc.fork(),
        &AttachmentRef {
            id: "0".repeat(64),
            ..att.clone()
        },
    )?;
    let bundle = engine.add_attachment_bundle(doc, &att.name, &att.media_type, data)?;
    let att = AttachmentRef {
        id: bundle.to_string(),
        ..att
    };
    schema::add_attachment(&mut loaded.doc, &att)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["attachment"])?;
    Ok(att)
}

/// The content of one attachment of a letter: `(file name, media type, bytes)`.
///
/// Errors: [`EngineError::UnknownDocument`] when the letter has no attachment `attachment` (a
/// bundle id, 64 hex digits) or its bundle has not arrived at this device yet; the engine's errors.
pub fn attachment_data(
    engine: &Engine,
    id: &str,
    attachment: &str,
) -> Result<(String, String, Vec<u8>)> {
    let doc = parse_id(engine, id)?;
    let missing =
        || EngineError::UnknownDocument(format!("attachment {attachment} of letter {id}"));
    let bundle: musubi_crdt::ids::BundleId = attachment.parse().map_err(|_| missing())?;
    match engine.attachment(doc, &bundle)? {
        Some(musubi_crdt::bundle::Payload::Attachment {
            name,
            media_type,
            data,
        }) => {
            super::audit(engine, AuditAction::Read, Some(doc), &["attachment"])?;
            Ok((name, media_type, data))
        }
        _ => Err(missing()),
    }
}

/// The date printed on the letter (`YYYY-MM-DD`, in Japan): when it was sent, else when it was
/// written, else today.
fn written_on(times: &StatusTimes) -> String {
    times
        .sent_at
        .as_deref()
        .or(times.created_at.as_deref())
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| super::careplan::date_jst(d.as_millis() as u64))
        .unwrap_or_else(super::careplan::today_jst)
}

/// The letter as a PDF in the layout of 様式11 (A4 portrait, see [`crate::pdf::render_referral`]),
/// dated the day it was sent (or written), with a Japanese font found on this system.
///
/// Errors: [`PdfExportError::Engine`] when the letter cannot be read; [`PdfExportError::Pdf`] when
/// no Japanese font is installed or the writer fails.
pub fn export_pdf(engine: &Engine, id: &str) -> std::result::Result<Vec<u8>, PdfExportError> {
    let doc = parse_id(engine, id)?;
    let r = read_doc(engine, doc)?;
    let font = crate::pdf::find_font()?;
    super::audit(engine, AuditAction::Print, Some(doc), &["様式11"])?;
    Ok(crate::pdf::render_referral(
        &r.view.letter,
        &written_on(&r.times),
        &font,
    )?)
}
