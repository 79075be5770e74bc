//! 紹介状 (診療情報提供書, 様式11): the clinic's letters, each command a call into
//! `musubi_facility::services::referral` as the signed-in staff member.
//!
//! The flow: `referral_create` (a draft only this facility reads) → `referral_edit` as the user
//! types → `referral_attach` → `referral_send`; the recipient's device marks it received when it
//! syncs it, shows it in its inbox, and answers with `referral_reply`. FHIR JP eReferral Bundles
//! come in with `referral_import_fhir` and go out with `referral_export_fhir`; the form prints
//! with `referral_export_pdf`.

use std::path::PathBuf;

use base64::Engine as _;
use musubi_crdt::documents::referral::{AttachmentRef, ReferralField};
use musubi_crdt::ids::{DocumentId, FacilityId};
use musubi_crdt::limits::ATTACHMENT_BYTES_MAX;
use musubi_facility::services::careplan::PdfExportError;
use musubi_facility::services::referral::{self, LetterDetail, LetterSummary};
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::error::{AppError, AppResult, ErrorKind};
use crate::state::AppState;

/// A field of 様式11 with its label on the form, for the editor's labels.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct ReferralFieldLabel {
    /// The key `referral_edit` takes (`purpose`, `patient.name`, …).
    pub key: ReferralField,
    /// The form's label (`紹介目的`, `患者氏名`, …).
    pub label: String,
}

/// An attachment's content, for saving or previewing it.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct AttachmentContent {
    /// File name as attached.
    pub name: String,
    /// Media type (MIME).
    pub media_type: String,
    /// The bytes, standard base64 (RFC 4648, with padding).
    pub data_base64: String,
}

/// The attachment limit in MB (MiB), for messages.
fn attachment_mb_max() -> usize {
    ATTACHMENT_BYTES_MAX / (1024 * 1024)
}

fn too_large_message(bytes: usize) -> String {
    format!(
        "the file is {:.1} MB; an attachment may be at most {} MB",
        bytes as f64 / (1024.0 * 1024.0),
        attachment_mb_max()
    )
}

/// Every field of 様式11 in form order with its Japanese label.
#[tauri::command]
#[specta::specta]
pub async fn referral_fields() -> AppResult<Vec<ReferralFieldLabel>> {
    Ok(ReferralField::ALL
        .into_iter()
        .map(|key| ReferralFieldLabel {
            key,
            label: key.label().to_owned(),
        })
        .collect())
}

/// The letters this facility can read, newest activity first: direction (inbox: written to this
/// facility; outbox: written here), patient, the other facility, status and its times.
///
/// Errors: `locked`, `not_signed_in`, `not_enrolled`, `storage`.
#[tauri::command]
#[specta::specta]
pub async fn referral_list(state: State<'_, AppState>) -> AppResult<Vec<LetterSummary>> {
    state.with_staff(|e, _| Ok(referral::summaries(e)?)).await
}

/// One letter: the whole 様式11 form, status and times, attachments, direction and what this
/// facility may do (`editable`, `can_send`, `can_reply`).
///
/// Errors: `not_found`; `no_key` (sync to fetch it); `locked`, `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn referral_get(state: State<'_, AppState>, id: DocumentId) -> AppResult<LetterDetail> {
    state
        .with_staff(move |e, _| Ok(referral::detail(e, &id.to_string())?))
        .await
}

/// Writes a new draft letter to the facility `to`, prefilled with both facilities' names and the
/// signed-in staff member as 紹介元医師; returns its id. Only this facility reads it until sent.
///
/// Errors: `not_found` (unknown facility: refresh the directory by syncing); `invalid_input` (`to`
/// is this facility); `not_enrolled`.
#[tauri::command]
#[specta::specta]
pub async fn referral_create(state: State<'_, AppState>, to: FacilityId) -> AppResult<DocumentId> {
    state
        .with_staff(move |e, staff| Ok(referral::create(e, &to.to_string(), &staff.name)?))
        .await
}

/// Replaces one field's text with `text` (the whole new text; stored as a character diff, so
/// concurrent edits elsewhere merge). One call is one committed change; a call that changes
/// nothing writes nothing. Call it as the user types (debounced).
///
/// Errors: `invalid_input` (text over 128 KiB); `read_only`; `not_found`.
#[tauri::command]
#[specta::specta]
pub async fn referral_edit(
    state: State<'_, AppState>,
    id: DocumentId,
    field: ReferralField,
    text: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| Ok(referral::edit(e, &id.to_string(), field.key(), &text)?))
        .await
}

/// Sends a draft (draft → sent): the recipient facility becomes a member and gets it at its next
/// sync. Sending a letter already sent does nothing.
///
/// Errors: `invalid_input` (no patient name, no recipient, or the letter came from elsewhere);
/// `not_found`.
#[tauri::command]
#[specta::specta]
pub async fn referral_send(state: State<'_, AppState>, id: DocumentId) -> AppResult<()> {
    state
        .with_staff(move |e, _| Ok(referral::send(e, &id.to_string())?))
        .await
}

/// Writes the 返書 (reply) to a received letter and sets it to replied; calling again replaces
/// the reply's text.
///
/// Errors: `invalid_input` (this facility wrote the letter, or it is a draft); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn referral_reply(
    state: State<'_, AppState>,
    id: DocumentId,
    text: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| Ok(referral::reply(e, &id.to_string(), &text)?))
        .await
}

/// Imports a JP eReferral FHIR document Bundle (the JSON text of the file the user picked) as a
/// letter to `to`, sent at once; returns its id.
///
/// Errors: `invalid_input` (not a JP eReferral Bundle, with what is wrong); `not_found` (facility).
#[tauri::command]
#[specta::specta]
pub async fn referral_import_fhir(
    state: State<'_, AppState>,
    to: FacilityId,
    json: String,
) -> AppResult<DocumentId> {
    state
        .with_staff(move |e, _| Ok(referral::import_fhir(e, &to.to_string(), &json)?))
        .await
}

/// Attaches a file to the letter: `name` (file name), `media_type` (MIME, e.g. `application/pdf`)
/// and the content as standard base64. At most 8 MB (`ATTACHMENT_BYTES_MAX`).
///
/// Errors: `invalid_input` (over the limit, naming it in MB; not base64; empty media type);
/// `read_only`; `not_found`.
#[tauri::command]
#[specta::specta]
pub async fn referral_attach(
    state: State<'_, AppState>,
    id: DocumentId,
    name: String,
    media_type: String,
    data_base64: String,
) -> AppResult<AttachmentRef> {
    // Refuse before decoding: 4 base64 characters carry 3 bytes.
    let approx = data_base64.trim().len() / 4 * 3;
    if approx > ATTACHMENT_BYTES_MAX + 2 {
        return Err(AppError::invalid(too_large_message(approx)));
    }
    state
        .with_staff(move |e, _| {
            let data = base64::engine::general_purpose::STANDARD
                .decode(data_base64.trim())
                .map_err(|err| {
                    AppError::invalid(format!("the file content is not base64: {err}"))
                })?;
            if data.len() > ATTACHMENT_BYTES_MAX {
                return Err(AppError::invalid(too_large_message(data.len())));
            }
            Ok(referral::attach_bytes(
                e,
                &id.to_string(),
                &name,
                &media_type,
                data,
            )?)
        })
        .await
}

/// The content of one attachment (`attachment`: its id from the letter's attachment list).
///
/// Errors: `not_found` (unknown attachment, or its bundle has not arrived yet: sync).
#[tauri::command]
#[specta::specta]
pub async fn referral_attachment(
    state: State<'_, AppState>,
    id: DocumentId,
    attachment: String,
) -> AppResult<AttachmentContent> {
    state
        .with_staff(move |e, _| {
            let (name, media_type, data) =
                referral::attachment_data(e, &id.to_string(), &attachment)?;
            Ok(AttachmentContent {
                name,
                media_type,
                data_base64: base64::engine::general_purpose::STANDARD.encode(data),
            })
        })
        .await
}

/// Saves one attachment to `path` (picked with the save dialog).
///
/// Errors: `not_found`; `storage` (the file cannot be written).
#[tauri::command]
#[specta::specta]
pub async fn referral_save_attachment(
    state: State<'_, AppState>,
    id: DocumentId,
    attachment: String,
    path: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| {
            let (_, _, data) = referral::attachment_data(e, &id.to_string(), &attachment)?;
            write_file(&PathBuf::from(path), &data)
        })
        .await
}

/// The letter as an HL7 FHIR JP eReferral document Bundle, pretty-printed JSON text.
///
/// Errors: `not_found`; `invalid_input` when the letter cannot be expressed as the profile.
#[tauri::command]
#[specta::specta]
pub async fn referral_export_fhir(state: State<'_, AppState>, id: DocumentId) -> AppResult<String> {
    state
        .with_staff(move |e, _| {
            let bundle = referral::export_fhir(e, &id.to_string())?;
            serde_json::to_string_pretty(&bundle)
                .map_err(|err| AppError::new(ErrorKind::Internal, err.to_string()))
        })
        .await
}

/// Prints the letter to a PDF at `path` (picked with the save dialog) in the layout of 様式11,
/// A4 portrait, dated the day it was sent (or written).
///
/// Errors: `not_found`; `internal` when no Japanese font is installed (the message names the
/// package); `storage` (the file cannot be written).
#[tauri::command]
#[specta::specta]
pub async fn referral_export_pdf(
    state: State<'_, AppState>,
    id: DocumentId,
    path: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| {
            let pdf = referral::export_pdf(e, &id.to_string()).map_err(pdf_error)?;
            write_file(&PathBuf::from(path), &pdf)
        })
        .await
}

/// The error of a PDF export: the engine's kind, or `internal` for the font or the writer.
pub(crate) fn pdf_error(e: PdfExportError) -> AppError {
    match e {
        PdfExportError::Engine(inner) => inner.into(),
        PdfExportError::Pdf(inner) => AppError::new(ErrorKind::Internal, inner.to_string()),
    }
}

/// Writes `data` to `path` (a path the user picked), mapping failure to `storage`.
pub(crate) fn write_file(path: &std::path::Path, data: &[u8]) -> AppResult<()> {
    std::fs::write(path, data).map_err(|err| {
        AppError::new(
            ErrorKind::Storage,
            format!("could not write {}: {err}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_message_names_megabytes() {
        let m = too_large_message(9 * 1024 * 1024);
        assert!(m.contains("9.0 MB") && m.contains("at most 8 MB"), "{m}");
    }
}
