//! The referral letter (診療情報提供書, 様式11) as an Automerge document.
//!
//! A clinic writes a letter to another clinic or hospital, attaches files and later receives the
//! reply (返書). Only the two facilities are members of the document (DESIGN "Membership policy");
//! attachments are bundles of their own documents and the letter holds only references to them.
//!
//! # Layout (schema version [`SCHEMA_VERSION`])
//!
//! ```text
//! ROOT (map)
//!   kind            str   "referral_letter"
//!   schema_version  uint  1
//!   to_facility … remarks, reply   Text   (one Text object per free-text field, keys as in JSON)
//!   patient         map   { name, kana, sex, birth_date, address, phone, occupation: Text }
//!   status          str   "draft" | "sent" | "received" | "replied"   (see below)
//!   attachments     list  [ map { id, name, media_type, added_at: str, bytes: uint } ]
//!   fhir_source     str   the imported FHIR Bundle JSON, verbatim; absent when written by hand
//!   to_facility_id  str   the recipient facility's id in the deployment (set by the app's `create`;
//!                         absent in imported letters, whose recipient is a member from the start)
//!   created_at, sent_at, received_at, replied_at   str   RFC 3339, when the letter reached that
//!                         status (each written once, by the facility that moved it; optional)
//! ```
//!
//! # Merge rules
//!
//! - Text fields are edited by diff ([`set_field`] uses Automerge's `update_text`): two replicas
//!   editing the same field concurrently both keep their characters after merge.
//! - The status only moves forward: draft → sent → received → replied. [`set_status`] writes only
//!   a status later than the current one (an earlier one is a no-op), and [`read`] takes the latest
//!   of all concurrently written values (`get_all`), so the merged status is the maximum of what
//!   the replicas set. It behaves as a max-register and never regresses.
//! - Attachments are appended; adding the same id twice is a no-op, and duplicates created by two
//!   replicas adding the same id concurrently are collapsed on read (first in list order wins).
//! - `fhir_source` is written once by [`init`] and never changed: it is the base that
//!   [`super::referral_fhir::export_bundle`] compares the current fields against.
//! - `to_facility_id` and the status times are last-writer-wins scalars; [`set_status_time`] writes
//!   a time only when none is recorded at this replica, so concurrent first writes resolve to one
//!   of them, the same on every replica.
//! - [`init`] runs once, at the document's creator; other replicas get it through sync.

use super::common::{self, missing, read_u64, too_large, wrong_type};
use std::fmt;
use std::str::FromStr;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, Value};
use serde::{Deserialize, Serialize};

use super::DocumentError;

/// The value of the root `kind` key of a referral letter document.
pub const KIND: &str = "referral_letter";

/// The schema version this build writes and the newest one it reads.
pub const SCHEMA_VERSION: u64 = 1;

/// Maximum size of one free-text field, in UTF-8 bytes (about 40,000 Japanese characters).
pub const FIELD_TEXT_BYTES_MAX: usize = 128 * 1024;

/// Maximum number of attachments of one letter.
pub const ATTACHMENTS_COUNT_MAX: usize = 64;

/// Maximum size of an attachment's name and media type, each in UTF-8 bytes.
pub const ATTACHMENT_NAME_BYTES_MAX: usize = 1024;

/// Maximum size of the imported FHIR Bundle kept in `fhir_source`, in bytes.
pub const FHIR_SOURCE_BYTES_MAX: usize = 4 * 1024 * 1024;

use super::common::KEY_KIND;
use super::common::KEY_SCHEMA_VERSION;
const KEY_PATIENT: &str = "patient";
const KEY_STATUS: &str = "status";
const KEY_ATTACHMENTS: &str = "attachments";
const KEY_FHIR_SOURCE: &str = "fhir_source";
const KEY_TO_FACILITY_ID: &str = "to_facility_id";

/// Maximum size of a recorded facility id or status time, in bytes.
pub const SCALAR_BYTES_MAX: usize = 128;

/// A referral letter (診療情報提供書, 様式11) as plain data.
///
/// This is what [`read`] returns and [`init`] writes. Its JSON (serde) form has exactly the keys
/// `to_facility`, `to_doctor`, `from_facility`, `from_doctor`, `patient`, `diagnosis`, `purpose`,
/// `history`, `progress`, `treatment`, `prescription`, `remarks`, `status`, `reply`, `attachments`;
/// `fhir_source` is never serialised (it can be megabytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct ReferralLetter {
    /// 紹介先医療機関名 (name of the facility the patient is referred to).
    pub to_facility: String,
    /// 紹介先担当医 (doctor the letter is addressed to; may include the department, e.g. 循環器内科).
    pub to_doctor: String,
    /// 紹介元医療機関名 (name of the referring facility).
    pub from_facility: String,
    /// 紹介元医師氏名 (name of the referring doctor).
    pub from_doctor: String,
    /// 患者 (the patient: 氏名, 性別, 生年月日, 住所, 電話, 職業).
    pub patient: Patient,
    /// 傷病名 (diagnoses, one per line).
    pub diagnosis: String,
    /// 紹介目的 (purpose of referral).
    pub purpose: String,
    /// 既往歴及び家族歴 (past medical history and family history).
    pub history: String,
    /// 症状経過及び検査結果 (course of symptoms and test results).
    pub progress: String,
    /// 治療経過 (course of treatment).
    pub treatment: String,
    /// 現在の処方 (current prescription).
    pub prescription: String,
    /// 備考 (remarks).
    pub remarks: String,
    /// 状態 (workflow status: draft, sent, received, replied; only moves forward).
    pub status: ReferralStatus,
    /// 返書 (the reply of the receiving doctor).
    pub reply: String,
    /// 添付 (attachments: references to the bundles of separate attachment documents).
    pub attachments: Vec<AttachmentRef>,
    /// 取込元 FHIR Bundle (the imported HL7 FHIR JP eReferral Bundle JSON, verbatim; `None` when the
    /// letter was written in Musubi). Never serialised.
    #[serde(skip)]
    pub fhir_source: Option<String>,
}

/// 患者 (the patient section of 様式11).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Patient {
    /// 氏名 (full name in kanji, family name first, e.g. `田中 太郎`).
    pub name: String,
    /// フリガナ (name in katakana, e.g. `タナカ タロウ`).
    pub kana: String,
    /// 性別 (sex as written on the form: `男`, `女`, `その他` or `不明`; free text).
    pub sex: String,
    /// 生年月日 (date of birth, ISO 8601 `YYYY-MM-DD` when known).
    pub birth_date: String,
    /// 住所 (address; may start with the postal code as `〒123-4567 `).
    pub address: String,
    /// 電話 (telephone number).
    pub phone: String,
    /// 職業 (occupation).
    pub occupation: String,
}

/// 状態 (status of a referral letter). Ordered: `Draft < Sent < Received < Replied`.
///
/// Serialised in lowercase (`"draft"`, `"sent"`, `"received"`, `"replied"`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "lowercase")]
pub enum ReferralStatus {
    /// 作成中: being written at the referring facility.
    #[default]
    Draft,
    /// 送付済: sent to the receiving facility.
    Sent,
    /// 受領済: the receiving facility has opened it.
    Received,
    /// 返書済: the receiving doctor has written the reply (返書).
    Replied,
}

impl ReferralStatus {
    /// All statuses, in order.
    pub const ALL: [ReferralStatus; 4] = [
        ReferralStatus::Draft,
        ReferralStatus::Sent,
        ReferralStatus::Received,
        ReferralStatus::Replied,
    ];

    /// The lowercase name stored in the document and used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ReferralStatus::Draft => "draft",
            ReferralStatus::Sent => "sent",
            ReferralStatus::Received => "received",
            ReferralStatus::Replied => "replied",
        }
    }
}

impl fmt::Display for ReferralStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReferralStatus {
    type Err = DocumentError;

    /// Parses the lowercase name; errors with [`DocumentError::UnknownStatus`] listing the valid ones.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReferralStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| DocumentError::UnknownStatus {
                found: s.to_owned(),
                valid: ReferralStatus::ALL.map(ReferralStatus::as_str).join(", "),
            })
    }
}

/// 添付 (one attachment of a letter: a reference to the bundle of its own attachment document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct AttachmentRef {
    /// Bundle id of the attachment's own bundle: the BLAKE3 hash, 64 lowercase hex digits.
    pub id: String,
    /// ファイル名 (file name shown to the user, e.g. `CT-2024-05-01.pdf`).
    pub name: String,
    /// Media type (MIME), e.g. `application/pdf`.
    pub media_type: String,
    /// Size of the attachment's content, in bytes.
    pub bytes: u64,
    /// When it was attached, RFC 3339 (e.g. `2024-05-01T10:00:00+09:00`); a parameter, never a clock read.
    pub added_at: String,
}

/// A free-text field of a referral letter, as named by its JSON key.
///
/// Parses ([`FromStr`]) from the top-level keys of [`ReferralLetter`] (`remarks`, …) and from
/// `patient.<key>` for the patient's fields (`patient.name`, …). Its serde form is the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub enum ReferralField {
    /// `to_facility`: 紹介先医療機関名.
    #[serde(rename = "to_facility")]
    ToFacility,
    /// `to_doctor`: 紹介先担当医.
    #[serde(rename = "to_doctor")]
    ToDoctor,
    /// `from_facility`: 紹介元医療機関名.
    #[serde(rename = "from_facility")]
    FromFacility,
    /// `from_doctor`: 紹介元医師氏名.
    #[serde(rename = "from_doctor")]
    FromDoctor,
    /// `diagnosis`: 傷病名.
    #[serde(rename = "diagnosis")]
    Diagnosis,
    /// `purpose`: 紹介目的.
    #[serde(rename = "purpose")]
    Purpose,
    /// `history`: 既往歴及び家族歴.
    #[serde(rename = "history")]
    History,
    /// `progress`: 症状経過及び検査結果.
    #[serde(rename = "progress")]
    Progress,
    /// `treatment`: 治療経過.
    #[serde(rename = "treatment")]
    Treatment,
    /// `prescription`: 現在の処方.
    #[serde(rename = "prescription")]
    Prescription,
    /// `remarks`: 備考.
    #[serde(rename = "remarks")]
    Remarks,
    /// `reply`: 返書.
    #[serde(rename = "reply")]
    Reply,
    /// `patient.name`: 患者氏名.
    #[serde(rename = "patient.name")]
    PatientName,
    /// `patient.kana`: 患者フリガナ.
    #[serde(rename = "patient.kana")]
    PatientKana,
    /// `patient.sex`: 性別.
    #[serde(rename = "patient.sex")]
    PatientSex,
    /// `patient.birth_date`: 生年月日.
    #[serde(rename = "patient.birth_date")]
    PatientBirthDate,
    /// `patient.address`: 住所.
    #[serde(rename = "patient.address")]
    PatientAddress,
    /// `patient.phone`: 電話.
    #[serde(rename = "patient.phone")]
    PatientPhone,
    /// `patient.occupation`: 職業.
    #[serde(rename = "patient.occupation")]
    PatientOccupation,
}

impl ReferralField {
    /// Every field, in form order.
    pub const ALL: [ReferralField; 19] = [
        ReferralField::ToFacility,
        ReferralField::ToDoctor,
        ReferralField::FromFacility,
        ReferralField::FromDoctor,
        ReferralField::PatientName,
        ReferralField::PatientKana,
        ReferralField::PatientSex,
        ReferralField::PatientBirthDate,
        ReferralField::PatientAddress,
        ReferralField::PatientPhone,
        ReferralField::PatientOccupation,
        ReferralField::Diagnosis,
        ReferralField::Purpose,
        ReferralField::History,
        ReferralField::Progress,
        ReferralField::Treatment,
        ReferralField::Prescription,
        ReferralField::Remarks,
        ReferralField::Reply,
    ];

    /// The field's key: its JSON key, with `patient.` in front for the patient's fields.
    pub fn key(self) -> &'static str {
        match self {
            ReferralField::ToFacility => "to_facility",
            ReferralField::ToDoctor => "to_doctor",
            ReferralField::FromFacility => "from_facility",
            ReferralField::FromDoctor => "from_doctor",
            ReferralField::Diagnosis => "diagnosis",
            ReferralField::Purpose => "purpose",
            ReferralField::History => "history",
            ReferralField::Progress => "progress",
            ReferralField::Treatment => "treatment",
            ReferralField::Prescription => "prescription",
            ReferralField::Remarks => "remarks",
            ReferralField::Reply => "reply",
            ReferralField::PatientName => "patient.name",
            ReferralField::PatientKana => "patient.kana",
            ReferralField::PatientSex => "patient.sex",
            ReferralField::PatientBirthDate => "patient.birth_date",
            ReferralField::PatientAddress => "patient.address",
            ReferralField::PatientPhone => "patient.phone",
            ReferralField::PatientOccupation => "patient.occupation",
        }
    }

    /// The field's name on the form (様式11), e.g. `紹介目的`.
    pub fn label(self) -> &'static str {
        match self {
            ReferralField::ToFacility => "紹介先医療機関名",
            ReferralField::ToDoctor => "紹介先担当医",
            ReferralField::FromFacility => "紹介元医療機関名",
            ReferralField::FromDoctor => "紹介元医師氏名",
            ReferralField::Diagnosis => "傷病名",
            ReferralField::Purpose => "紹介目的",
            ReferralField::History => "既往歴及び家族歴",
            ReferralField::Progress => "症状経過及び検査結果",
            ReferralField::Treatment => "治療経過",
            ReferralField::Prescription => "現在の処方",
            ReferralField::Remarks => "備考",
            ReferralField::Reply => "返書",
            ReferralField::PatientName => "患者氏名",
            ReferralField::PatientKana => "フリガナ",
            ReferralField::PatientSex => "性別",
            ReferralField::PatientBirthDate => "生年月日",
            ReferralField::PatientAddress => "住所",
            ReferralField::PatientPhone => "電話",
            ReferralField::PatientOccupation => "職業",
        }
    }

    /// Where the field's Text object lives: in the patient map (`true`) or at the root, and its key there.
    fn location(self) -> (bool, &'static str) {
        let key = self.key();
        match key.strip_prefix("patient.") {
            Some(sub) => (true, sub),
            None => (false, key),
        }
    }
}

impl fmt::Display for ReferralField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for ReferralField {
    type Err = DocumentError;

    /// Parses a key such as `remarks` or `patient.name`; errors with
    /// [`DocumentError::UnknownField`] listing every valid key.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReferralField::ALL
            .into_iter()
            .find(|field| field.key() == s)
            .ok_or_else(|| DocumentError::UnknownField {
                key: s.to_owned(),
                valid: ReferralField::ALL.map(ReferralField::key).join(", "),
            })
    }
}

impl ReferralLetter {
    /// The current text of one field.
    pub fn field(&self, field: ReferralField) -> &str {
        match field {
            ReferralField::ToFacility => &self.to_facility,
            ReferralField::ToDoctor => &self.to_doctor,
            ReferralField::FromFacility => &self.from_facility,
            ReferralField::FromDoctor => &self.from_doctor,
            ReferralField::Diagnosis => &self.diagnosis,
            ReferralField::Purpose => &self.purpose,
            ReferralField::History => &self.history,
            ReferralField::Progress => &self.progress,
            ReferralField::Treatment => &self.treatment,
            ReferralField::Prescription => &self.prescription,
            ReferralField::Remarks => &self.remarks,
            ReferralField::Reply => &self.reply,
            ReferralField::PatientName => &self.patient.name,
            ReferralField::PatientKana => &self.patient.kana,
            ReferralField::PatientSex => &self.patient.sex,
            ReferralField::PatientBirthDate => &self.patient.birth_date,
            ReferralField::PatientAddress => &self.patient.address,
            ReferralField::PatientPhone => &self.patient.phone,
            ReferralField::PatientOccupation => &self.patient.occupation,
        }
    }

    /// Mutable access to one field's text.
    pub fn field_mut(&mut self, field: ReferralField) -> &mut String {
        match field {
            ReferralField::ToFacility => &mut self.to_facility,
            ReferralField::ToDoctor => &mut self.to_doctor,
            ReferralField::FromFacility => &mut self.from_facility,
            ReferralField::FromDoctor => &mut self.from_doctor,
            ReferralField::Diagnosis => &mut self.diagnosis,
            ReferralField::Purpose => &mut self.purpose,
            ReferralField::History => &mut self.history,
            ReferralField::Progress => &mut self.progress,
            ReferralField::Treatment => &mut self.treatment,
            ReferralField::Prescription => &mut self.prescription,
            ReferralField::Remarks => &mut self.remarks,
            ReferralField::Reply => &mut self.reply,
            ReferralField::PatientName => &mut self.patient.name,
            ReferralField::PatientKana => &mut self.patient.kana,
            ReferralField::PatientSex => &mut self.patient.sex,
            ReferralField::PatientBirthDate => &mut self.patient.birth_date,
            ReferralField::PatientAddress => &mut self.patient.address,
            ReferralField::PatientPhone => &mut self.patient.phone,
            ReferralField::PatientOccupation => &mut self.patient.occupation,
        }
    }
}

/// Writes `letter` into a fresh document: kind, schema version, one Text object per field, the
/// status, the attachments and, when present, the FHIR source.
///
/// # Errors
///
/// [`DocumentError::AlreadyInitialized`] when `doc` already holds a schema version;
/// [`DocumentError::TooLarge`] / [`DocumentError::InvalidValue`] when a field, an attachment or the
/// FHIR source breaks a limit; [`DocumentError::Automerge`] when Automerge refuses a write.
pub fn init(doc: &mut AutoCommit, letter: &ReferralLetter) -> Result<(), DocumentError> {
    if let Some(found) = read_u64(doc, &automerge::ROOT, KEY_SCHEMA_VERSION)? {
        return Err(DocumentError::AlreadyInitialized { found });
    }
    for field in ReferralField::ALL {
        check_text(field, letter.field(field))?;
    }
    if letter.attachments.len() > ATTACHMENTS_COUNT_MAX {
        return Err(too_large(
            "attachments (count)",
            letter.attachments.len(),
            ATTACHMENTS_COUNT_MAX,
        ));
    }
    for attachment in &letter.attachments {
        check_attachment(attachment)?;
    }
    if let Some(source) = &letter.fhir_source
        && source.len() > FHIR_SOURCE_BYTES_MAX
    {
        return Err(too_large(
            "fhir_source (bytes)",
            source.len(),
            FHIR_SOURCE_BYTES_MAX,
        ));
    }

    doc.put(automerge::ROOT, KEY_KIND, KIND)?;
    doc.put(automerge::ROOT, KEY_SCHEMA_VERSION, SCHEMA_VERSION)?;
    let patient = doc.put_object(automerge::ROOT, KEY_PATIENT, ObjType::Map)?;
    for field in ReferralField::ALL {
        let (in_patient, key) = field.location();
        let parent = if in_patient {
            patient.clone()
        } else {
            automerge::ROOT
        };
        let text = doc.put_object(&parent, key, ObjType::Text)?;
        doc.splice_text(&text, 0, 0, letter.field(field))?;
    }
    doc.put(automerge::ROOT, KEY_STATUS, letter.status.as_str())?;
    let list = doc.put_object(automerge::ROOT, KEY_ATTACHMENTS, ObjType::List)?;
    let mut seen: Vec<&str> = Vec::new();
    for attachment in &letter.attachments {
        if seen.contains(&attachment.id.as_str()) {
            continue;
        }
        seen.push(&attachment.id);
        let index = doc.length(&list);
        write_attachment(doc, &list, index, attachment)?;
    }
    if let Some(source) = &letter.fhir_source {
        doc.put(automerge::ROOT, KEY_FHIR_SOURCE, source.as_str())?;
    }
    Ok(())
}

/// Reads the whole letter from any replica (an [`AutoCommit`], an [`automerge::Automerge`], a
/// transaction).
///
/// Concurrent status values resolve to the latest status (see the module docs); duplicate
/// attachment ids collapse to the first.
///
/// # Errors
///
/// [`DocumentError::WrongKind`] / [`DocumentError::UnsupportedSchema`] when the document is not a
/// referral letter this build understands; [`DocumentError::MissingField`] /
/// [`DocumentError::WrongType`] / [`DocumentError::UnknownStatus`] when its content is malformed.
pub fn read(doc: &impl ReadDoc) -> Result<ReferralLetter, DocumentError> {
    check_header(doc)?;
    let patient = patient_map(doc)?;
    let mut letter = ReferralLetter::default();
    for field in ReferralField::ALL {
        let (in_patient, key) = field.location();
        let parent = if in_patient {
            &patient
        } else {
            &automerge::ROOT
        };
        let text = text_obj(doc, parent, key, field.key())?;
        *letter.field_mut(field) = doc.text(&text)?;
    }
    letter.status = read_status(doc)?;
    letter.attachments = read_attachments(doc)?;
    letter.fhir_source = match doc.get(automerge::ROOT, KEY_FHIR_SOURCE)? {
        None => None,
        Some((Value::Scalar(value), _)) => Some(
            value
                .as_str()
                .ok_or_else(|| wrong_type(KEY_FHIR_SOURCE, "a string"))?
                .to_owned(),
        ),
        Some((Value::Object(_), _)) => return Err(wrong_type(KEY_FHIR_SOURCE, "a string")),
    };
    Ok(letter)
}

/// Replaces the text of one field by `text`, as a character diff against the current text.
///
/// Because only the changed characters become operations, two replicas that edit the same field
/// concurrently (say one at the start, one at the end) both keep their edits after merge.
///
/// # Errors
///
/// [`DocumentError::TooLarge`] when `text` exceeds [`FIELD_TEXT_BYTES_MAX`]; the header and type
/// errors of [`read`] when the document is not a referral letter; [`DocumentError::Automerge`].
pub fn set_field(
    doc: &mut AutoCommit,
    field: ReferralField,
    text: &str,
) -> Result<(), DocumentError> {
    check_text(field, text)?;
    check_header(doc)?;
    let (in_patient, key) = field.location();
    let parent = if in_patient {
        patient_map(doc)?
    } else {
        automerge::ROOT
    };
    let obj = text_obj(doc, &parent, key, field.key())?;
    doc.update_text(&obj, text)?;
    Ok(())
}

/// Moves the status forward to `status`.
///
/// The status never goes back: when `status` is not later than the current status this is a
/// no-op (it returns `Ok` and writes nothing). Concurrent writes resolve to the latest status on
/// read, so after a merge the status is the maximum of what the replicas set.
///
/// # Errors
///
/// The header and type errors of [`read`]; [`DocumentError::Automerge`].
pub fn set_status(doc: &mut AutoCommit, status: ReferralStatus) -> Result<(), DocumentError> {
    check_header(doc)?;
    let current = read_status(doc)?;
    if status > current {
        doc.put(automerge::ROOT, KEY_STATUS, status.as_str())?;
    }
    Ok(())
}

/// Appends a reference to an attachment. Adding an id that is already attached is a no-op.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] when `att.id` is not 64 lowercase hex digits or the name or
/// media type is empty; [`DocumentError::TooLarge`] when the letter already has
/// [`ATTACHMENTS_COUNT_MAX`] attachments or a name exceeds [`ATTACHMENT_NAME_BYTES_MAX`]; the header
/// and type errors of [`read`]; [`DocumentError::Automerge`].
pub fn add_attachment(doc: &mut AutoCommit, att: &AttachmentRef) -> Result<(), DocumentError> {
    check_attachment(att)?;
    check_header(doc)?;
    let existing = read_attachments(doc)?;
    if existing.iter().any(|a| a.id == att.id) {
        return Ok(());
    }
    if existing.len() >= ATTACHMENTS_COUNT_MAX {
        return Err(too_large(
            "attachments (count)",
            existing.len() + 1,
            ATTACHMENTS_COUNT_MAX,
        ));
    }
    let list = match doc.get(automerge::ROOT, KEY_ATTACHMENTS)? {
        Some((Value::Object(ObjType::List), id)) => id,
        Some(_) => return Err(wrong_type(KEY_ATTACHMENTS, "a list")),
        None => return Err(missing(KEY_ATTACHMENTS)),
    };
    let index = doc.length(&list);
    write_attachment(doc, &list, index, att)
}

/// When a letter was created and when it reached each later status, as RFC 3339 timestamps
/// (`None`: not reached, or moved by a build that did not record times).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct StatusTimes {
    /// 作成日時: when the letter was written or imported here.
    pub created_at: Option<String>,
    /// 送付日時: when it was sent.
    pub sent_at: Option<String>,
    /// 受領日時: when the receiving facility first synced it.
    pub received_at: Option<String>,
    /// 返書日時: when the reply was first written.
    pub replied_at: Option<String>,
}

impl StatusTimes {
    /// The time recorded for `status` (`Draft`: the creation time).
    pub fn get(&self, status: ReferralStatus) -> Option<&str> {
        match status {
            ReferralStatus::Draft => self.created_at.as_deref(),
            ReferralStatus::Sent => self.sent_at.as_deref(),
            ReferralStatus::Received => self.received_at.as_deref(),
            ReferralStatus::Replied => self.replied_at.as_deref(),
        }
    }
}

fn status_time_key(status: ReferralStatus) -> &'static str {
    match status {
        ReferralStatus::Draft => "created_at",
        ReferralStatus::Sent => "sent_at",
        ReferralStatus::Received => "received_at",
        ReferralStatus::Replied => "replied_at",
    }
}

fn check_scalar(key: &str, value: &str) -> Result<(), DocumentError> {
    if value.trim().is_empty() {
        return Err(DocumentError::InvalidValue {
            key: key.to_owned(),
            reason: "must not be empty".to_owned(),
        });
    }
    if value.len() > SCALAR_BYTES_MAX {
        return Err(too_large(
            &format!("{key} (bytes)"),
            value.len(),
            SCALAR_BYTES_MAX,
        ));
    }
    Ok(())
}

fn read_scalar(doc: &impl ReadDoc, key: &str) -> Result<Option<String>, DocumentError> {
    match doc.get(automerge::ROOT, key)? {
        None => Ok(None),
        Some((Value::Scalar(value), _)) => value
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| wrong_type(key, "a string")),
        Some(_) => Err(wrong_type(key, "a string")),
    }
}

/// Records when the letter reached `status` (`Draft`: when it was created), `at` as RFC 3339.
///
/// Writes only when no time is recorded for that status yet (the first time stays).
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] / [`DocumentError::TooLarge`] for an empty `at` or one over
/// [`SCALAR_BYTES_MAX`]; the header errors of [`read`]; [`DocumentError::Automerge`].
pub fn set_status_time(
    doc: &mut AutoCommit,
    status: ReferralStatus,
    at: &str,
) -> Result<(), DocumentError> {
    let key = status_time_key(status);
    check_scalar(key, at)?;
    check_header(doc)?;
    if read_scalar(doc, key)?.is_none() {
        doc.put(automerge::ROOT, key, at)?;
    }
    Ok(())
}

/// The recorded status times (see [`StatusTimes`]).
///
/// # Errors
///
/// The header errors of [`read`]; [`DocumentError::WrongType`] when a time is not a string.
pub fn status_times(doc: &impl ReadDoc) -> Result<StatusTimes, DocumentError> {
    check_header(doc)?;
    Ok(StatusTimes {
        created_at: read_scalar(doc, status_time_key(ReferralStatus::Draft))?,
        sent_at: read_scalar(doc, status_time_key(ReferralStatus::Sent))?,
        received_at: read_scalar(doc, status_time_key(ReferralStatus::Received))?,
        replied_at: read_scalar(doc, status_time_key(ReferralStatus::Replied))?,
    })
}

/// Records the recipient facility (紹介先) by its id in the deployment's directory (a UUID string),
/// so whichever device of the sending facility sends the letter knows whom to share it with.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] / [`DocumentError::TooLarge`] for an empty or oversized id; the
/// header errors of [`read`]; [`DocumentError::Automerge`].
pub fn set_recipient(doc: &mut AutoCommit, facility: &str) -> Result<(), DocumentError> {
    check_scalar(KEY_TO_FACILITY_ID, facility)?;
    check_header(doc)?;
    if read_scalar(doc, KEY_TO_FACILITY_ID)?.as_deref() != Some(facility) {
        doc.put(automerge::ROOT, KEY_TO_FACILITY_ID, facility)?;
    }
    Ok(())
}

/// The recipient facility's id recorded by [`set_recipient`] (`None` for imported letters).
///
/// # Errors
///
/// The header errors of [`read`]; [`DocumentError::WrongType`] when it is not a string.
pub fn recipient(doc: &impl ReadDoc) -> Result<Option<String>, DocumentError> {
    check_header(doc)?;
    read_scalar(doc, KEY_TO_FACILITY_ID)
}

fn check_header(doc: &impl ReadDoc) -> Result<(), DocumentError> {
    common::check_header(doc, KIND, SCHEMA_VERSION)
}

fn patient_map(doc: &impl ReadDoc) -> Result<ObjId, DocumentError> {
    match doc.get(automerge::ROOT, KEY_PATIENT)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        Some(_) => Err(wrong_type(KEY_PATIENT, "a map")),
        None => Err(missing(KEY_PATIENT)),
    }
}

fn text_obj(
    doc: &impl ReadDoc,
    parent: &ObjId,
    key: &str,
    full_key: &str,
) -> Result<ObjId, DocumentError> {
    match doc.get(parent, key)? {
        Some((Value::Object(ObjType::Text), id)) => Ok(id),
        Some(_) => Err(wrong_type(full_key, "a text object")),
        None => Err(missing(full_key)),
    }
}

/// The latest of all (possibly conflicting) status values: the max-register rule.
fn read_status(doc: &impl ReadDoc) -> Result<ReferralStatus, DocumentError> {
    let values = doc.get_all(automerge::ROOT, KEY_STATUS)?;
    let mut latest: Option<ReferralStatus> = None;
    for (value, _) in values {
        let Value::Scalar(scalar) = value else {
            return Err(wrong_type(KEY_STATUS, "a string"));
        };
        let text = scalar
            .as_str()
            .ok_or_else(|| wrong_type(KEY_STATUS, "a string"))?;
        let status: ReferralStatus = text.parse()?;
        latest = Some(latest.map_or(status, |l| l.max(status)));
    }
    latest.ok_or_else(|| missing(KEY_STATUS))
}

fn read_attachments(doc: &impl ReadDoc) -> Result<Vec<AttachmentRef>, DocumentError> {
    let list = match doc.get(automerge::ROOT, KEY_ATTACHMENTS)? {
        Some((Value::Object(ObjType::List), id)) => id,
        Some(_) => return Err(wrong_type(KEY_ATTACHMENTS, "a list")),
        None => return Err(missing(KEY_ATTACHMENTS)),
    };
    let mut out: Vec<AttachmentRef> = Vec::new();
    for index in 0..doc.length(&list) {
        let item = match doc.get(&list, index)? {
            Some((Value::Object(ObjType::Map), id)) => id,
            _ => return Err(wrong_type("attachments[]", "a map")),
        };
        let string = |key: &'static str| -> Result<String, DocumentError> {
            match doc.get(&item, key)? {
                Some((Value::Scalar(value), _)) => value
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| wrong_type(&format!("attachments[].{key}"), "a string")),
                Some(_) => Err(wrong_type(&format!("attachments[].{key}"), "a string")),
                None => Err(missing(&format!("attachments[].{key}"))),
            }
        };
        let attachment = AttachmentRef {
            id: string("id")?,
            name: string("name")?,
            media_type: string("media_type")?,
            bytes: read_u64(doc, &item, "bytes")?.ok_or_else(|| missing("attachments[].bytes"))?,
            added_at: string("added_at")?,
        };
        if !out.iter().any(|a| a.id == attachment.id) {
            out.push(attachment);
        }
    }
    Ok(out)
}

fn write_attachment(
    doc: &mut AutoCommit,
    list: &ObjId,
    index: usize,
    att: &AttachmentRef,
) -> Result<(), DocumentError> {
    let map = doc.insert_object(list, index, ObjType::Map)?;
    doc.put(&map, "id", att.id.as_str())?;
    doc.put(&map, "name", att.name.as_str())?;
    doc.put(&map, "media_type", att.media_type.as_str())?;
    doc.put(&map, "bytes", att.bytes)?;
    doc.put(&map, "added_at", att.added_at.as_str())?;
    Ok(())
}

fn check_text(field: ReferralField, text: &str) -> Result<(), DocumentError> {
    if text.len() > FIELD_TEXT_BYTES_MAX {
        return Err(too_large(
            &format!("field {} (bytes)", field.key()),
            text.len(),
            FIELD_TEXT_BYTES_MAX,
        ));
    }
    Ok(())
}

fn check_attachment(att: &AttachmentRef) -> Result<(), DocumentError> {
    let is_hash = att.id.len() == 64
        && att
            .id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hash {
        return Err(DocumentError::InvalidValue {
            key: "attachments.id".to_owned(),
            reason: format!(
                "`{}` is not a BLAKE3 bundle id (64 lowercase hex digits)",
                att.id
            ),
        });
    }
    for (key, value) in [
        ("attachments.name", &att.name),
        ("attachments.media_type", &att.media_type),
    ] {
        if value.trim().is_empty() {
            return Err(DocumentError::InvalidValue {
                key: key.to_owned(),
                reason: "must not be empty".to_owned(),
            });
        }
        if value.len() > ATTACHMENT_NAME_BYTES_MAX {
            return Err(too_large(
                &format!("{key} (bytes)"),
                value.len(),
                ATTACHMENT_NAME_BYTES_MAX,
            ));
        }
    }
    if att.added_at.trim().is_empty() {
        return Err(DocumentError::InvalidValue {
            key: "attachments.added_at".to_owned(),
            reason: "must be an RFC 3339 timestamp".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use automerge::ActorId;

    use super::*;

    fn actor(name: &str) -> ActorId {
        ActorId::from(name.as_bytes())
    }

    fn sample() -> ReferralLetter {
        ReferralLetter {
            to_facility: "東京第一テスト病院".to_owned(),
            to_doctor: "循環器内科 野口 英世丸".to_owned(),
            from_facility: "港診療所".to_owned(),
            from_doctor: "大河内 勘三郎".to_owned(),
            patient: Patient {
                name: "田中 太郎".to_owned(),
                kana: "タナカ タロウ".to_owned(),
                sex: "男".to_owned(),
                birth_date: "1955-05-04".to_owned(),
                address: "〒123-4567 神奈川県横浜市港区１－２－３".to_owned(),
                phone: "03-1234-5678".to_owned(),
                occupation: "会社員".to_owned(),
            },
            diagnosis: "上腹部痛".to_owned(),
            purpose: "腹痛精査お願いします。".to_owned(),
            remarks: "よろしくお願いします。".to_owned(),
            ..ReferralLetter::default()
        }
    }

    fn new_doc(letter: &ReferralLetter) -> AutoCommit {
        let mut doc = AutoCommit::new().with_actor(actor("clinic-a"));
        init(&mut doc, letter).expect("init a fresh document");
        doc
    }

    fn attachment(n: u8) -> AttachmentRef {
        AttachmentRef {
            id: hex::encode([n; 32]),
            name: format!("CT-{n}.pdf"),
            media_type: "application/pdf".to_owned(),
            bytes: 1_234_567,
            added_at: "2024-05-01T10:00:00+09:00".to_owned(),
        }
    }

    #[test]
    fn a_written_letter_reads_back_field_for_field() {
        let mut letter = sample();
        letter.attachments = vec![attachment(1)];
        letter.fhir_source = Some("{\"resourceType\":\"Bundle\"}".to_owned());
        let doc = new_doc(&letter);
        assert_eq!(read(&doc).expect("read"), letter);
    }

    #[test]
    fn the_letter_survives_save_and_load() {
        let mut doc = new_doc(&sample());
        set_field(&mut doc, ReferralField::Remarks, "至急お願いします。").expect("edit remarks");
        set_status(&mut doc, ReferralStatus::Sent).expect("send");
        add_attachment(&mut doc, &attachment(7)).expect("attach");
        let bytes = doc.save();
        let loaded = AutoCommit::load(&bytes).expect("load saved bytes");
        let letter = read(&loaded).expect("read loaded");
        assert_eq!(letter.remarks, "至急お願いします。");
        assert_eq!(letter.status, ReferralStatus::Sent);
        assert_eq!(letter.attachments, vec![attachment(7)]);
        assert_eq!(letter, read(&doc).expect("read original"));
    }

    #[test]
    fn two_clinics_editing_remarks_offline_both_keep_their_words() {
        let mut base = new_doc(&sample());
        let mut clinic = base.fork().with_actor(actor("clinic-a-laptop"));
        let mut hospital = base.fork().with_actor(actor("hospital-b"));
        set_field(
            &mut clinic,
            ReferralField::Remarks,
            "【至急】よろしくお願いします。",
        )
        .expect("clinic edit");
        set_field(
            &mut hospital,
            ReferralField::Remarks,
            "よろしくお願いします。承知しました。",
        )
        .expect("hospital edit");
        clinic
            .merge(&mut hospital)
            .expect("merge hospital into clinic");
        hospital
            .merge(&mut clinic)
            .expect("merge clinic into hospital");
        let merged = read(&clinic).expect("read merged").remarks;
        assert_eq!(merged, "【至急】よろしくお願いします。承知しました。");
        assert_eq!(read(&hospital).expect("read other side").remarks, merged);
    }

    #[test]
    fn concurrent_edits_of_a_patient_field_merge_too() {
        let mut base = new_doc(&sample());
        let mut a = base.fork().with_actor(actor("a"));
        let mut b = base.fork().with_actor(actor("b"));
        set_field(
            &mut a,
            ReferralField::PatientAddress,
            "〒123-4567 神奈川県横浜市港区１－２－３ 101号室",
        )
        .expect("a");
        set_field(
            &mut b,
            ReferralField::PatientAddress,
            "〒123-4567 神奈川県横浜市港北区１－２－３",
        )
        .expect("b");
        a.merge(&mut b).expect("merge");
        assert_eq!(
            read(&a).expect("read").patient.address,
            "〒123-4567 神奈川県横浜市港北区１－２－３ 101号室"
        );
    }

    #[test]
    fn status_never_goes_back_locally_or_on_merge() {
        let mut base = new_doc(&sample());
        set_status(&mut base, ReferralStatus::Sent).expect("send");

        let mut receiver = base.fork().with_actor(actor("hospital-b"));
        let mut sender = base.fork().with_actor(actor("clinic-a-laptop"));
        set_status(&mut receiver, ReferralStatus::Received).expect("receive");
        set_status(&mut receiver, ReferralStatus::Replied).expect("reply");
        // The sender, offline and unaware, marks it sent again and then tries to go back to draft.
        set_status(&mut sender, ReferralStatus::Sent).expect("no-op");
        set_status(&mut sender, ReferralStatus::Draft).expect("no-op");
        assert_eq!(read(&sender).expect("read").status, ReferralStatus::Sent);

        sender.merge(&mut receiver).expect("merge");
        receiver.merge(&mut sender).expect("merge back");
        assert_eq!(read(&sender).expect("read").status, ReferralStatus::Replied);
        assert_eq!(
            read(&receiver).expect("read").status,
            ReferralStatus::Replied
        );

        // Truly concurrent writes of two different statuses resolve to the later one on both sides.
        let mut x = new_doc(&sample());
        let mut y = x.fork().with_actor(actor("y"));
        set_status(&mut x, ReferralStatus::Received).expect("x");
        set_status(&mut y, ReferralStatus::Sent).expect("y");
        x.merge(&mut y).expect("merge");
        y.merge(&mut x).expect("merge");
        assert_eq!(read(&x).expect("x").status, ReferralStatus::Received);
        assert_eq!(read(&y).expect("y").status, ReferralStatus::Received);
        set_status(&mut y, ReferralStatus::Sent).expect("no-op after merge");
        assert_eq!(read(&y).expect("y").status, ReferralStatus::Received);
    }

    #[test]
    fn attaching_the_same_bundle_twice_keeps_one() {
        let mut a = new_doc(&sample());
        let mut b = a.fork().with_actor(actor("b"));
        add_attachment(&mut a, &attachment(1)).expect("attach");
        add_attachment(&mut a, &attachment(1)).expect("attach again");
        add_attachment(&mut b, &attachment(1)).expect("attach concurrently");
        add_attachment(&mut b, &attachment(2)).expect("attach another");
        a.merge(&mut b).expect("merge");
        let ids: Vec<String> = read(&a)
            .expect("read")
            .attachments
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&attachment(1).id) && ids.contains(&attachment(2).id));
    }

    #[test]
    fn a_malformed_attachment_id_is_refused() {
        let mut doc = new_doc(&sample());
        let mut bad = attachment(1);
        bad.id = "not-a-hash".to_owned();
        let err = add_attachment(&mut doc, &bad).expect_err("must refuse");
        assert!(err.to_string().contains("not-a-hash"), "{err}");
    }

    #[test]
    fn unknown_field_keys_are_refused_with_the_valid_ones() {
        assert_eq!(
            "remarks".parse::<ReferralField>().expect("remarks"),
            ReferralField::Remarks
        );
        assert_eq!(
            "patient.birth_date"
                .parse::<ReferralField>()
                .expect("birth date"),
            ReferralField::PatientBirthDate
        );
        let err = "patient.blood_type"
            .parse::<ReferralField>()
            .expect_err("unknown");
        let message = err.to_string();
        assert!(
            message.contains("unknown field `patient.blood_type`"),
            "{message}"
        );
        for field in ReferralField::ALL {
            assert!(
                message.contains(field.key()),
                "{message} should list {}",
                field.key()
            );
        }
        assert!("bogus".parse::<ReferralStatus>().is_err());
    }

    #[test]
    fn every_field_key_round_trips_and_edits_its_own_field() {
        let mut doc = new_doc(&ReferralLetter::default());
        for field in ReferralField::ALL {
            let parsed: ReferralField = field.key().parse().expect("own key parses");
            assert_eq!(parsed, field);
            set_field(&mut doc, field, field.key()).expect("edit");
        }
        let letter = read(&doc).expect("read");
        for field in ReferralField::ALL {
            assert_eq!(letter.field(field), field.key());
        }
    }

    #[test]
    fn json_keys_are_the_official_field_names_and_skip_the_source() {
        let mut letter = sample();
        letter.fhir_source = Some("big".to_owned());
        let value = serde_json::to_value(&letter).expect("serialise");
        let keys: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "to_facility",
                "to_doctor",
                "from_facility",
                "from_doctor",
                "patient",
                "diagnosis",
                "purpose",
                "history",
                "progress",
                "treatment",
                "prescription",
                "remarks",
                "status",
                "reply",
                "attachments"
            ]
        );
        assert_eq!(value["status"], "draft");
        assert_eq!(value["patient"]["birth_date"], "1955-05-04");
    }

    #[test]
    fn init_twice_and_reading_a_foreign_document_fail_clearly() {
        let mut doc = new_doc(&sample());
        assert!(matches!(
            init(&mut doc, &sample()),
            Err(DocumentError::AlreadyInitialized { found: 1 })
        ));
        let mut other = AutoCommit::new().with_actor(actor("x"));
        other
            .put(automerge::ROOT, "kind", "care_plan")
            .expect("put");
        let err = read(&other).expect_err("not a referral");
        assert!(err.to_string().contains("care_plan"), "{err}");
    }

    #[test]
    fn status_times_and_the_recipient_are_recorded_once() {
        let mut doc = new_doc(&sample());
        assert_eq!(status_times(&doc).expect("times"), StatusTimes::default());
        assert_eq!(recipient(&doc).expect("recipient"), None);
        set_status_time(&mut doc, ReferralStatus::Draft, "2024-05-01T09:00:00Z").expect("created");
        set_status_time(&mut doc, ReferralStatus::Sent, "2024-05-01T10:00:00Z").expect("sent");
        set_status_time(&mut doc, ReferralStatus::Sent, "2024-05-02T10:00:00Z").expect("no-op");
        set_recipient(&mut doc, "facility-b").expect("recipient");
        let loaded = AutoCommit::load(&doc.save()).expect("load");
        let times = status_times(&loaded).expect("times");
        assert_eq!(
            times.get(ReferralStatus::Draft),
            Some("2024-05-01T09:00:00Z")
        );
        assert_eq!(times.sent_at.as_deref(), Some("2024-05-01T10:00:00Z"));
        assert_eq!(times.received_at, None);
        assert_eq!(
            recipient(&loaded).expect("recipient").as_deref(),
            Some("facility-b")
        );
        assert!(set_status_time(&mut doc, ReferralStatus::Replied, " ").is_err());
        // Reading the letter itself is unaffected by the extra keys.
        assert_eq!(read(&loaded).expect("read"), read(&doc).expect("read"));
    }

    #[test]
    fn the_serde_name_of_a_field_is_its_key() {
        for field in ReferralField::ALL {
            let json = serde_json::to_value(field).expect("serialise");
            assert_eq!(json, field.key());
            let back: ReferralField = serde_json::from_value(json).expect("deserialise");
            assert_eq!(back, field);
        }
    }

    #[test]
    fn every_field_has_a_form_label() {
        for field in ReferralField::ALL {
            assert!(!field.label().is_empty(), "{field}");
        }
        assert_eq!(ReferralField::Purpose.label(), "紹介目的");
    }

    #[test]
    fn oversized_text_is_refused() {
        let mut doc = new_doc(&sample());
        let long = "あ".repeat(FIELD_TEXT_BYTES_MAX / 3 + 1);
        let err = set_field(&mut doc, ReferralField::Progress, &long).expect_err("too large");
        assert!(matches!(err, DocumentError::TooLarge { .. }), "{err}");
    }
}
