//! 診療情報提供書 (様式11): referral letters between clinics.

use std::path::Path;

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

/// A letter as shown to users: its document id and the 様式11 fields.
#[derive(Clone, Debug, Serialize)]
pub struct LetterView {
    /// The letter's id (the document id, the same at every facility).
    pub id: DocumentId,
    /// The fields.
    #[serde(flatten)]
    pub letter: ReferralLetter,
    /// Bundles this device cannot read yet (no key for their epoch).
    #[serde(skip_serializing_if = "is_zero")]
    pub unreadable_bundles: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
    engine.create_document(
        DocumentKind::Referral,
        vec![Member {
            facility: target.id,
            role: Role::Writer,
        }],
        |doc| {
            schema::init(doc, &letter)?;
            Ok(())
        },
    )
}

/// Every letter this facility can read, oldest first.
pub fn list(engine: &Engine) -> Result<Vec<LetterView>> {
    let mut out = Vec::new();
    for row in engine.store().documents(Some(DocumentKind::Referral))? {
        match show_doc(engine, row.info.id) {
            Ok(v) => out.push(v),
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

/// One letter.
pub fn show(engine: &Engine, id: &str) -> Result<LetterView> {
    show_doc(engine, parse_id(engine, id)?)
}

/// Replaces one field's text (`field` is a key such as `remarks` or `patient.name`).
pub fn edit(engine: &mut Engine, id: &str, field: &str, text: &str) -> Result<()> {
    let field: ReferralField = field.parse()?;
    let doc = parse_id(engine, id)?;
    let mut loaded = engine.load(doc)?;
    schema::set_field(&mut loaded.doc, field, text)?;
    engine.commit(&mut loaded)?;
    Ok(())
}

/// Writes the 返書 (reply) and sets the status to replied.
pub fn reply(engine: &mut Engine, id: &str, text: &str) -> Result<()> {
    let doc = parse_id(engine, id)?;
    let mut loaded = engine.load(doc)?;
    schema::set_field(&mut loaded.doc, ReferralField::Reply, text)?;
    schema::set_status(&mut loaded.doc, ReferralStatus::Replied)?;
    engine.commit(&mut loaded)?;
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
    engine.commit(&mut loaded)?;
    Ok(())
}

/// The letter as an HL7 FHIR JP eReferral document Bundle.
pub fn export_fhir(engine: &Engine, id: &str) -> Result<serde_json::Value> {
    let view = show(engine, id)?;
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
    let doc = parse_id(engine, id)?;
    let io = |source| EngineError::Io {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > ATTACHMENT_BYTES_MAX as u64 {
        return Err(EngineError::Bundle(
            musubi_crdt::bundle::BundleError::PayloadTooLarge {
                what: "attachment",
                bytes: len as usize,
                max: ATTACHMENT_BYTES_MAX,
            },
        ));
    }
    let data = std::fs::read(path).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "attachment".into());
    let bytes = data.len() as u64;
    let mut loaded = engine.load(doc)?;
    let bundle = engine.add_attachment_bundle(doc, &name, media_type, data)?;
    let att = AttachmentRef {
        id: bundle.to_string(),
        name,
        media_type: media_type.to_owned(),
        bytes,
        added_at: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms()),
        )
        .to_string(),
    };
    schema::add_attachment(&mut loaded.doc, &att)?;
    engine.commit(&mut loaded)?;
    Ok(att)
}
