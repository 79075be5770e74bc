//! Import and export of a referral letter as an HL7 FHIR JP eReferral document Bundle
//! (profile `JP_Bundle_eReferral`, 診療情報提供書 HL7 FHIR 記述仕様 by JAMI / HL7 Japan).
//!
//! # Mapping
//!
//! Sections are found by their code in `http://jpfhir.jp/fhir/eReferral/CodeSystem/document-section`,
//! at any depth (910/920/220/210 sit at the top of the Composition, the others inside 300 構造情報).
//!
//! | letter field | FHIR source |
//! | --- | --- |
//! | `to_facility`, `to_doctor` | section 910 紹介先情報 → its `Organization.name`, `Practitioner.name` (漢字 `IDE` representation) |
//! | `from_facility`, `from_doctor` | section 920 紹介元情報 → the same |
//! | `patient.name`, `patient.kana` | `Composition.subject` → `Patient.name` with representation `IDE` (漢字) and `SYL` (カナ) |
//! | `patient.sex` | `Patient.gender` as 男 / 女 / その他 / 不明 |
//! | `patient.birth_date` | `Patient.birthDate` |
//! | `patient.address` | `Patient.address[0]`: `〒postalCode text` |
//! | `patient.phone` | `Patient.telecom` with `system = phone` |
//! | `patient.occupation` | an `Observation` coded LOINC 11341-5 (History of Occupation) or with 職業 in `code.text` |
//! | `diagnosis` | 340 傷病名・主訴 |
//! | `purpose` | 950 紹介目的 (and its `Encounter.reasonCode` on export) |
//! | `history` | 370 既往歴, then labelled parts 【家族歴】550, 【アレルギー・不耐性反応】510, 【感染症情報】520, 【予防接種歴】530, 【社会歴・生活習慣】640, 【輸血歴】740 |
//! | `progress` | 360 現病歴, then 【身体所見】610, 【検査結果】620 |
//! | `treatment` | 330 臨床経過, then 【手術】730, 【処置】720, 【医療機器】810 |
//! | `prescription` | 430 投薬指示 |
//! | `remarks` | 220 備考・連絡情報, then 【診療方針指示】420, 【事前指示】410, 【臨床研究参加】830 |
//! | `attachments` | 210 添付情報 sections whose `DocumentReference` points at `urn:musubi:bundle:<hex>` |
//! | `status`, `reply` | not in the Bundle (a reply, 返書, is a document of its own) |
//!
//! The text of one section is, in order of preference: the decoded `text/*` attachments of its
//! `DocumentReference`/`Binary` entries (330 臨床経過 carries the course itself there, with the
//! narrative only saying 添付参照); else its narrative `text.div` stripped to plain text (status
//! `additional`: the complete human-readable text); else a line per entry resource (`Condition`,
//! `AllergyIntolerance`, `Observation`, `MedicationRequest`, `Encounter.reasonCode`, …).
//! A field made of several sections puts each further non-empty section on its own line after a
//! 【title】 label, and export splits the text at those labels again.
//!
//! # Export
//!
//! An imported letter keeps the Bundle verbatim in `fhir_source`. Export parses it, re-runs the
//! import mapping on it, and changes only what differs from the letter: the narrative of an edited
//! section (or its text attachment), the `Organization`/`Practitioner`/`Patient` elements of an edited
//! party or patient field, adding a section with the right code when the Bundle had none.
//! Every other entry resource leaves unchanged; edited resources get `meta.lastUpdated = timestamp`,
//! an edited Composition also `date = timestamp`. Structured entries of an edited section
//! (`Condition`, `Observation`, …) stay as they were: the narrative carries the edited text.
//! Clearing such a section's text removes its narrative, so on the next import the text is
//! derived from those entries again; an optional section without entries is removed instead.
//! A letter without `fhir_source` exports a minimal document Bundle built from its fields.
//! Bundle `id`, `timestamp` and `meta.lastUpdated` always come from the parameters, and an edited
//! letter also gets `identifier.value = bundle_id` (it is a new document); new resources get
//! `urn:uuid:` full URLs derived from `bundle_id` (BLAKE3), so the output is deterministic.

use std::collections::{BTreeSet, HashMap, HashSet};

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::referral::{
    AttachmentRef, FHIR_SOURCE_BYTES_MAX, Patient, ReferralField, ReferralLetter,
};

/// Code system of the eReferral document sections.
pub const SECTION_SYSTEM: &str = "http://jpfhir.jp/fhir/eReferral/CodeSystem/document-section";

/// Prefix of the attachment URL by which an exported `DocumentReference` names a Musubi bundle.
pub const MUSUBI_BUNDLE_URL_PREFIX: &str = "urn:musubi:bundle:";

const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";
const EN_REPRESENTATION: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";
const DOC_TYPE_SYSTEM: &str = "http://jpfhir.jp/fhir/Common/CodeSystem/doc-typecodes";
const RESOURCE_ID_SYSTEM: &str = "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier";
const DOCUMENT_ID_SYSTEM: &str = "http://jpfhir.jp/fhir/core/IdSystem/documentInstance-identifier";
const LIST_EMPTY_REASON: &str = "http://terminology.hl7.org/CodeSystem/list-empty-reason";
const LOINC: &str = "http://loinc.org";
const OCCUPATION_LOINC: [&str; 3] = ["11341-5", "85658-3", "21843-8"];

/// Why a FHIR Bundle could not be imported or a letter not exported.
#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    /// The input is not JSON (or the stored `fhir_source` no longer parses).
    #[error("bundle is not valid json: {0}")]
    Json(#[from] serde_json::Error),
    /// The input exceeds [`FHIR_SOURCE_BYTES_MAX`].
    #[error("bundle is {bytes} bytes, the maximum is {max}")]
    TooLarge {
        /// Size of the input, in bytes.
        bytes: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The JSON is not a FHIR Bundle resource.
    #[error("expected a fhir bundle, found resourceType `{found}`")]
    NotABundle {
        /// The `resourceType` found (empty when absent).
        found: String,
    },
    /// The Bundle is not a document Bundle (`type` is e.g. `collection` or `transaction`).
    #[error("bundle type is `{found}`, expected `document`")]
    NotADocument {
        /// The Bundle `type` found (empty when absent).
        found: String,
    },
    /// The document Bundle has no Composition entry.
    #[error("document bundle has no composition entry")]
    MissingComposition,
    /// The Bundle's structure is broken where the mapping needs it (e.g. `entry` is not an array).
    #[error("malformed bundle: {what}")]
    Malformed {
        /// What is wrong, e.g. `entry is not an array`.
        what: String,
    },
    /// A letter field cannot be expressed in FHIR (e.g. 性別 `x`, a birth date that is not a date).
    #[error("cannot export {key} `{value}`: {reason}")]
    InvalidField {
        /// The field's key, e.g. `patient.sex`.
        key: &'static str,
        /// The value in the letter.
        value: String,
        /// What FHIR accepts there.
        reason: &'static str,
    },
}

/// Imports a JP eReferral document Bundle (JSON text) as a letter, keeping the JSON verbatim in
/// `fhir_source`. The status is `draft`, the reply empty; see the module docs for the mapping.
///
/// # Errors
///
/// [`FhirError::TooLarge`] above [`FHIR_SOURCE_BYTES_MAX`]; [`FhirError::Json`] for invalid JSON;
/// [`FhirError::NotABundle`], [`FhirError::NotADocument`], [`FhirError::MissingComposition`],
/// [`FhirError::Malformed`] when it is not a document Bundle with a Composition.
pub fn import_bundle(json: &str) -> Result<ReferralLetter, FhirError> {
    if json.len() > FHIR_SOURCE_BYTES_MAX {
        return Err(FhirError::TooLarge {
            bytes: json.len(),
            max: FHIR_SOURCE_BYTES_MAX,
        });
    }
    let bundle: Value = serde_json::from_str(json)?;
    let mut letter = map_bundle(&bundle)?;
    letter.fhir_source = Some(json.to_owned());
    Ok(letter)
}

/// Exports `letter` as a JP eReferral document Bundle with `id = bundle_id` and
/// `timestamp = timestamp` (RFC 3339, e.g. `2024-05-01T10:00:00+09:00`).
///
/// With a `fhir_source`, only what was edited since the import changes (see the module docs):
/// an unedited letter exports every entry resource unchanged. Without one, a minimal Bundle is
/// built: Composition (sections 920, 910, 300 with 950/340/360/370/330 and any other non-empty part),
/// Patient, two Organizations, two Practitioners, and an occupation Observation when given.
///
/// # Errors
///
/// [`FhirError::InvalidField`] when a patient field has no FHIR form (性別 other than 男/女/その他/不明,
/// a birth date that is not `YYYY`, `YYYY-MM` or `YYYY-MM-DD`); the errors of [`import_bundle`]
/// when the stored `fhir_source` is not a document Bundle.
pub fn export_bundle(
    letter: &ReferralLetter,
    bundle_id: &str,
    timestamp: &str,
) -> Result<Value, FhirError> {
    let (bundle, base) = match &letter.fhir_source {
        Some(source) => {
            let bundle: Value = serde_json::from_str(source)?;
            let base = map_bundle(&bundle)?;
            (bundle, base)
        }
        None => (skeleton(bundle_id, timestamp), ReferralLetter::default()),
    };
    let fresh = letter.fhir_source.is_none();
    let mut editor = Editor {
        bundle,
        bundle_id,
        timestamp,
        touched: BTreeSet::new(),
    };
    editor.apply(&base, letter)?;
    if fresh {
        editor.add_required_sections()?;
    }
    Ok(editor.finish(fresh))
}

// ---------------------------------------------------------------------------------------------
// Section table
// ---------------------------------------------------------------------------------------------

/// A section code of the eReferral code system with its fixed title.
struct SectionDef {
    code: &'static str,
    title: &'static str,
    /// Sits at the top of the Composition rather than inside 300 構造情報.
    top_level: bool,
}

const SECTION_DEFS: [SectionDef; 23] = [
    SectionDef {
        code: "210",
        title: "添付情報",
        top_level: true,
    },
    SectionDef {
        code: "220",
        title: "備考・連絡情報",
        top_level: true,
    },
    SectionDef {
        code: "330",
        title: "臨床経過",
        top_level: false,
    },
    SectionDef {
        code: "340",
        title: "傷病名・主訴",
        top_level: false,
    },
    SectionDef {
        code: "360",
        title: "現病歴",
        top_level: false,
    },
    SectionDef {
        code: "370",
        title: "既往歴",
        top_level: false,
    },
    SectionDef {
        code: "410",
        title: "事前指示",
        top_level: false,
    },
    SectionDef {
        code: "420",
        title: "診療方針指示",
        top_level: false,
    },
    SectionDef {
        code: "430",
        title: "投薬指示",
        top_level: false,
    },
    SectionDef {
        code: "510",
        title: "アレルギー・不耐性反応",
        top_level: false,
    },
    SectionDef {
        code: "520",
        title: "感染症情報",
        top_level: false,
    },
    SectionDef {
        code: "530",
        title: "予防接種歴",
        top_level: false,
    },
    SectionDef {
        code: "550",
        title: "家族歴",
        top_level: false,
    },
    SectionDef {
        code: "610",
        title: "身体所見",
        top_level: false,
    },
    SectionDef {
        code: "620",
        title: "検査結果",
        top_level: false,
    },
    SectionDef {
        code: "640",
        title: "社会歴・生活習慣",
        top_level: false,
    },
    SectionDef {
        code: "720",
        title: "処置",
        top_level: false,
    },
    SectionDef {
        code: "730",
        title: "手術",
        top_level: false,
    },
    SectionDef {
        code: "740",
        title: "輸血歴",
        top_level: false,
    },
    SectionDef {
        code: "810",
        title: "医療機器",
        top_level: false,
    },
    SectionDef {
        code: "830",
        title: "臨床研究参加",
        top_level: false,
    },
    SectionDef {
        code: "910",
        title: "紹介先情報",
        top_level: true,
    },
    SectionDef {
        code: "920",
        title: "紹介元情報",
        top_level: true,
    },
];

const PURPOSE_DEF: SectionDef = SectionDef {
    code: "950",
    title: "紹介目的",
    top_level: false,
};
const STRUCTURED_DEF: SectionDef = SectionDef {
    code: "300",
    title: "構造情報",
    top_level: true,
};

fn section_def(code: &str) -> &'static SectionDef {
    if code == PURPOSE_DEF.code {
        return &PURPOSE_DEF;
    }
    SECTION_DEFS
        .iter()
        .find(|def| def.code == code)
        .expect("every code used by the mapping is in SECTION_DEFS")
}

/// The text fields made of sections: the first code is the field's own section, the others are
/// appended as 【title】 parts.
const FIELD_SECTIONS: [(ReferralField, &[&str]); 7] = [
    (ReferralField::Diagnosis, &["340"]),
    (ReferralField::Purpose, &["950"]),
    (
        ReferralField::History,
        &["370", "550", "510", "520", "530", "640", "740"],
    ),
    (ReferralField::Progress, &["360", "610", "620"]),
    (ReferralField::Treatment, &["330", "730", "720", "810"]),
    (ReferralField::Prescription, &["430"]),
    (ReferralField::Remarks, &["220", "420", "410", "830"]),
];

/// Order of sections in a Composition, as in the JP example: new sections are inserted by it.
const SECTION_ORDER: [&str; 24] = [
    "920", "910", "300", "950", "340", "360", "370", "510", "550", "610", "520", "530", "640",
    "740", "620", "730", "720", "430", "810", "330", "420", "410", "830", "220",
];

/// Sections the profile requires inside 300 構造情報 (cardinality 1..1).
const REQUIRED_STRUCTURED: [&str; 5] = ["950", "340", "360", "370", "330"];

fn label(code: &str) -> String {
    format!("【{}】", section_def(code).title)
}

/// Joins the texts of a field's sections: the first as is, each further non-empty one on its own
/// line after its 【title】 label.
fn join_parts(codes: &[&str], texts: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    for (index, (code, text)) in codes.iter().zip(texts).enumerate() {
        if text.is_empty() {
            continue;
        }
        if index == 0 {
            out.push(text.clone());
        } else {
            out.push(format!("{}{}", label(code), text));
        }
    }
    out.join("\n")
}

/// Splits a field's text back into its sections' texts, at 【title】 labels that start a line.
fn split_parts(codes: &[&str], text: &str) -> Vec<String> {
    let mut cuts: Vec<(usize, usize, usize)> = Vec::new(); // (byte position, code index, label bytes)
    let labels: Vec<String> = codes.iter().map(|code| label(code)).collect();
    let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1));
    for start in line_starts {
        for (index, label) in labels.iter().enumerate().skip(1) {
            if text[start..].starts_with(label.as_str()) {
                cuts.push((start, index, label.len()));
            }
        }
    }
    let mut parts: Vec<String> = vec![String::new(); codes.len()];
    let first_end = cuts.first().map_or(text.len(), |cut| cut.0);
    parts[0] = text[..first_end].trim().to_owned();
    for (n, &(start, index, label_len)) in cuts.iter().enumerate() {
        let end = cuts.get(n + 1).map_or(text.len(), |next| next.0);
        let piece = text[start + label_len..end].trim();
        if piece.is_empty() {
            continue;
        }
        if !parts[index].is_empty() {
            parts[index].push('\n');
        }
        parts[index].push_str(piece);
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// Reading a Bundle
// ---------------------------------------------------------------------------------------------

fn map_bundle(bundle: &Value) -> Result<ReferralLetter, FhirError> {
    let composition = check_document(bundle)?;
    let comp = resource(bundle, composition).ok_or(FhirError::MissingComposition)?;
    let mut letter = ReferralLetter::default();
    let refs = Refs::new(bundle);

    let (to_facility, to_doctor) = party(&refs, comp, "910");
    let (from_facility, from_doctor) = party(&refs, comp, "920");
    letter.to_facility = to_facility;
    letter.to_doctor = to_doctor;
    letter.from_facility = from_facility;
    letter.from_doctor = from_doctor;

    if let Some(index) = patient_index(&refs, comp) {
        letter.patient = read_patient(resource(bundle, index).unwrap_or(&Value::Null));
    }
    letter.patient.occupation = occupation_index(bundle)
        .and_then(|index| resource(bundle, index))
        .map(observation_value)
        .unwrap_or_default();

    for (field, codes) in FIELD_SECTIONS {
        let texts: Vec<String> = codes
            .iter()
            .map(|code| section_text_by_code(&refs, comp, code))
            .collect();
        *letter.field_mut(field) = join_parts(codes, &texts);
    }
    letter.attachments = read_attachments(&refs, comp);
    Ok(letter)
}

/// Checks that `bundle` is a document Bundle and returns the entry index of its Composition.
fn check_document(bundle: &Value) -> Result<usize, FhirError> {
    let resource_type = str_at(bundle, "resourceType");
    if resource_type != "Bundle" {
        return Err(FhirError::NotABundle {
            found: resource_type.to_owned(),
        });
    }
    let bundle_type = str_at(bundle, "type");
    if bundle_type != "document" {
        return Err(FhirError::NotADocument {
            found: bundle_type.to_owned(),
        });
    }
    match bundle.get("entry") {
        Some(Value::Array(_)) => {}
        None => return Err(FhirError::MissingComposition),
        Some(_) => {
            return Err(FhirError::Malformed {
                what: "entry is not an array".to_owned(),
            });
        }
    }
    (0..entries(bundle).len())
        .find(|&i| resource(bundle, i).is_some_and(|r| str_at(r, "resourceType") == "Composition"))
        .ok_or(FhirError::MissingComposition)
}

fn entries(bundle: &Value) -> &[Value] {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn resource(bundle: &Value, index: usize) -> Option<&Value> {
    entries(bundle).get(index)?.get("resource")
}

fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn array_at<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Every entry of a Bundle by `fullUrl` and by resource type and id, indexed once, so that
/// resolving a reference costs O(1) and reading a Bundle is linear in its size.
struct Refs<'a> {
    bundle: &'a Value,
    by_url: HashMap<&'a str, usize>,
    by_id: HashMap<(&'a str, &'a str), usize>,
}

impl<'a> Refs<'a> {
    fn new(bundle: &'a Value) -> Self {
        let mut by_url = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, entry) in entries(bundle).iter().enumerate() {
            let url = str_at(entry, "fullUrl");
            if !url.is_empty() {
                by_url.entry(url).or_insert(i);
            }
            if let Some(r) = entry.get("resource") {
                by_id
                    .entry((str_at(r, "resourceType"), str_at(r, "id")))
                    .or_insert(i);
            }
        }
        Self {
            bundle,
            by_url,
            by_id,
        }
    }

    /// The entry index a reference points at (the first such entry): `urn:uuid:…` or any
    /// absolute URL by `fullUrl`, `Type/id` by resource type and id (FHIR R4 §3.3.1 "Resolving
    /// references in Bundles").
    fn resolve(&self, reference: &str) -> Option<usize> {
        if reference.is_empty() {
            return None;
        }
        self.by_url.get(reference).copied().or_else(|| {
            let (kind, id) = reference.rsplit_once('/')?;
            let kind = kind.rsplit('/').next().unwrap_or(kind);
            self.by_id.get(&(kind, id)).copied()
        })
    }
}

fn reference_of(value: &Value) -> &str {
    str_at(value, "reference")
}

fn is_code(section: &Value, code: &str) -> bool {
    section
        .get("code")
        .map(|c| array_at(c, "coding"))
        .unwrap_or_default()
        .iter()
        .any(|coding| {
            let system = str_at(coding, "system");
            str_at(coding, "code") == code
                && (system.is_empty() || system.ends_with("/document-section"))
        })
}

/// Path (indices into nested `section` arrays) of the first section with `code`, depth first.
fn find_section_path(sections: &[Value], code: &str) -> Option<Vec<usize>> {
    for (index, section) in sections.iter().enumerate() {
        if is_code(section, code) {
            return Some(vec![index]);
        }
        if let Some(mut path) = find_section_path(array_at(section, "section"), code) {
            path.insert(0, index);
            return Some(path);
        }
    }
    None
}

fn section_at<'a>(comp: &'a Value, path: &[usize]) -> Option<&'a Value> {
    let mut current = comp;
    for &index in path {
        current = array_at(current, "section").get(index)?;
    }
    Some(current)
}

fn find_section<'a>(comp: &'a Value, code: &str) -> Option<&'a Value> {
    let path = find_section_path(array_at(comp, "section"), code)?;
    section_at(comp, &path)
}

/// Entry indices of the resources a section references, in order.
fn section_refs(refs: &Refs, section: &Value) -> Vec<usize> {
    array_at(section, "entry")
        .iter()
        .filter_map(|e| refs.resolve(reference_of(e)))
        .collect()
}

fn section_text_by_code(refs: &Refs, comp: &Value, code: &str) -> String {
    find_section(comp, code)
        .map(|s| section_text(refs, s))
        .unwrap_or_default()
}

/// The plain text of a section: text attachments, else narrative, else one line per entry.
fn section_text(index: &Refs, section: &Value) -> String {
    let bundle = index.bundle;
    let refs = section_refs(index, section);
    let attached: Vec<String> = refs
        .iter()
        .filter_map(|&i| resource(bundle, i))
        .flat_map(text_attachments)
        .map(|(_, text)| text.trim().to_owned())
        .filter(|text| !text.is_empty())
        .collect();
    if !attached.is_empty() {
        return attached.join("\n");
    }
    if let Some(div) = section
        .get("text")
        .and_then(|t| t.get("div"))
        .and_then(Value::as_str)
    {
        return xhtml_to_text(div);
    }
    refs.iter()
        .filter_map(|&i| resource(bundle, i))
        .filter(|r| !is_occupation(r))
        .map(resource_line)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The decoded `text/*` attachments of a DocumentReference (`content[i].attachment`) or a Binary,
/// with the JSON pointer of each (relative to the resource) for export.
fn text_attachments(resource: &Value) -> Vec<(String, String)> {
    let decode = |attachment: &Value, content_type_key: &str| -> Option<String> {
        let content_type = str_at(attachment, content_type_key).to_ascii_lowercase();
        if !content_type.starts_with("text/") {
            return None;
        }
        let data = attachment.get("data")?.as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    match str_at(resource, "resourceType") {
        "DocumentReference" => array_at(resource, "content")
            .iter()
            .enumerate()
            .filter_map(|(i, content)| {
                let text = decode(content.get("attachment")?, "contentType")?;
                Some((format!("/content/{i}/attachment"), text))
            })
            .collect(),
        "Binary" => decode(resource, "contentType")
            .map(|text| (String::new(), text))
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

fn concept_text(concept: &Value) -> String {
    let text = str_at(concept, "text");
    if !text.is_empty() {
        return text.to_owned();
    }
    array_at(concept, "coding")
        .iter()
        .map(|c| str_at(c, "display"))
        .find(|d| !d.is_empty())
        .unwrap_or_default()
        .to_owned()
}

fn notes(resource: &Value) -> String {
    array_at(resource, "note")
        .iter()
        .map(|n| str_at(n, "text"))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One readable line for a resource referenced by a section that has no narrative.
fn resource_line(resource: &Value) -> String {
    let with_note = |head: String, note: String| match (head.is_empty(), note.is_empty()) {
        (_, true) => head,
        (true, false) => note,
        (false, false) => format!("{head}：{note}"),
    };
    match str_at(resource, "resourceType") {
        "Condition"
        | "AllergyIntolerance"
        | "Procedure"
        | "FamilyMemberHistory"
        | "Immunization" => {
            let code = resource
                .get("code")
                .or_else(|| resource.get("vaccineCode"))
                .map(concept_text);
            with_note(code.unwrap_or_default(), notes(resource))
        }
        "Observation" => {
            let code = resource.get("code").map(concept_text).unwrap_or_default();
            with_note(code, observation_value(resource))
        }
        "Encounter" => array_at(resource, "reasonCode")
            .iter()
            .map(concept_text)
            .collect::<Vec<_>>()
            .join("\n"),
        "MedicationRequest" | "MedicationStatement" => {
            let medication = resource
                .get("medicationCodeableConcept")
                .map(concept_text)
                .unwrap_or_default();
            let dosage = array_at(resource, "dosageInstruction")
                .iter()
                .chain(array_at(resource, "dosage"))
                .map(|d| str_at(d, "text"))
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            [medication, dosage]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        }
        "DocumentReference" => str_at(resource, "description").to_owned(),
        _ => String::new(),
    }
}

fn observation_value(resource: &Value) -> String {
    if let Some(text) = resource.get("valueString").and_then(Value::as_str) {
        return text.to_owned();
    }
    if let Some(concept) = resource.get("valueCodeableConcept") {
        return concept_text(concept);
    }
    if let Some(quantity) = resource.get("valueQuantity") {
        let value = quantity
            .get("value")
            .map(Value::to_string)
            .unwrap_or_default();
        return format!("{value}{}", str_at(quantity, "unit"));
    }
    String::new()
}

fn is_occupation(resource: &Value) -> bool {
    if str_at(resource, "resourceType") != "Observation" {
        return false;
    }
    let Some(code) = resource.get("code") else {
        return false;
    };
    let coded = array_at(code, "coding")
        .iter()
        .any(|c| str_at(c, "system") == LOINC && OCCUPATION_LOINC.contains(&str_at(c, "code")));
    coded || str_at(code, "text").contains("職業")
}

fn occupation_index(bundle: &Value) -> Option<usize> {
    (0..entries(bundle).len()).find(|&i| resource(bundle, i).is_some_and(is_occupation))
}

/// Facility and doctor of section 910 or 920.
fn party(index: &Refs, comp: &Value, code: &str) -> (String, String) {
    let bundle = index.bundle;
    let Some(section) = find_section(comp, code) else {
        return (String::new(), String::new());
    };
    let refs = section_refs(index, section);
    let facility = facility_index(bundle, &refs)
        .and_then(|i| resource(bundle, i))
        .map(|r| str_at(r, "name").to_owned());
    let doctor = refs
        .iter()
        .filter_map(|&i| resource(bundle, i))
        .find(|r| str_at(r, "resourceType") == "Practitioner")
        .map(|r| person_name(r, "IDE"))
        .unwrap_or_default();
    let facility = facility.unwrap_or_else(|| {
        section
            .get("text")
            .and_then(|t| t.get("div"))
            .and_then(Value::as_str)
            .map(xhtml_to_text)
            .unwrap_or_default()
    });
    (facility, doctor)
}

/// Among a section's references, the Organization that is the facility (not a department).
fn facility_index(bundle: &Value, refs: &[usize]) -> Option<usize> {
    let organizations: Vec<usize> = refs
        .iter()
        .copied()
        .filter(|&i| {
            resource(bundle, i).is_some_and(|r| str_at(r, "resourceType") == "Organization")
        })
        .collect();
    let is_department = |i: usize| {
        resource(bundle, i).is_some_and(|r| {
            r.get("partOf").is_some()
                || r.get("meta")
                    .map(|m| array_at(m, "profile"))
                    .unwrap_or_default()
                    .iter()
                    .any(|p| p.as_str().unwrap_or_default().contains("department"))
        })
    };
    organizations
        .iter()
        .copied()
        .find(|&i| !is_department(i))
        .or_else(|| organizations.first().copied())
}

fn representation(name: &Value) -> &str {
    array_at(name, "extension")
        .iter()
        .find(|e| str_at(e, "url") == EN_REPRESENTATION)
        .map(|e| str_at(e, "valueCode"))
        .unwrap_or_default()
}

/// Index of the name with the given representation (`IDE` 漢字, `SYL` カナ); for `IDE`, a name
/// without a representation also counts.
fn name_index(resource: &Value, wanted: &str) -> Option<usize> {
    let names = array_at(resource, "name");
    names
        .iter()
        .position(|n| representation(n) == wanted)
        .or_else(|| {
            (wanted == "IDE")
                .then(|| names.iter().position(|n| representation(n).is_empty()))
                .flatten()
        })
}

fn person_name(resource: &Value, wanted: &str) -> String {
    let Some(name) = name_index(resource, wanted).and_then(|i| array_at(resource, "name").get(i))
    else {
        return String::new();
    };
    let text = str_at(name, "text");
    if !text.is_empty() {
        return text.to_owned();
    }
    let family = str_at(name, "family");
    let given: Vec<&str> = array_at(name, "given")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    std::iter::once(family)
        .chain(given)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn patient_index(refs: &Refs, comp: &Value) -> Option<usize> {
    let bundle = refs.bundle;
    comp.get("subject")
        .and_then(|s| refs.resolve(reference_of(s)))
        .filter(|&i| resource(bundle, i).is_some_and(|r| str_at(r, "resourceType") == "Patient"))
        .or_else(|| {
            (0..entries(bundle).len()).find(|&i| {
                resource(bundle, i).is_some_and(|r| str_at(r, "resourceType") == "Patient")
            })
        })
}

fn read_patient(patient: &Value) -> Patient {
    let sex = match str_at(patient, "gender") {
        "male" => "男",
        "female" => "女",
        "other" => "その他",
        "unknown" => "不明",
        _ => "",
    };
    let address = array_at(patient, "address")
        .first()
        .map(address_text)
        .unwrap_or_default();
    let phone = array_at(patient, "telecom")
        .iter()
        .find(|t| str_at(t, "system") == "phone")
        .map(|t| str_at(t, "value").to_owned())
        .unwrap_or_default();
    Patient {
        name: person_name(patient, "IDE"),
        kana: person_name(patient, "SYL"),
        sex: sex.to_owned(),
        birth_date: str_at(patient, "birthDate").to_owned(),
        address,
        phone,
        occupation: String::new(),
    }
}

fn address_text(address: &Value) -> String {
    let mut text = str_at(address, "text").to_owned();
    if text.is_empty() {
        let lines: Vec<&str> = array_at(address, "line")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        text = [
            str_at(address, "state"),
            str_at(address, "city"),
            str_at(address, "district"),
        ]
        .into_iter()
        .chain(lines)
        .collect::<Vec<_>>()
        .concat();
    }
    let postal = str_at(address, "postalCode");
    match (postal.is_empty(), text.is_empty()) {
        (true, _) => text,
        (false, true) => format!("〒{postal}"),
        (false, false) => format!("〒{postal} {text}"),
    }
}

/// Splits `〒123-4567 住所` into the postal code and the rest.
fn split_postal(address: &str) -> (Option<&str>, &str) {
    let Some(rest) = address.trim().strip_prefix('〒') else {
        return (None, address.trim());
    };
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '-'))
        .unwrap_or(rest.len());
    if end == 0 {
        return (None, address.trim());
    }
    (Some(&rest[..end]), rest[end..].trim())
}

fn read_attachments(refs: &Refs, comp: &Value) -> Vec<AttachmentRef> {
    let mut out: Vec<AttachmentRef> = Vec::new();
    let mut seen = HashSet::new();
    collect_attachments(refs, array_at(comp, "section"), &mut out, &mut seen);
    out
}

fn collect_attachments(
    refs: &Refs,
    sections: &[Value],
    out: &mut Vec<AttachmentRef>,
    seen: &mut HashSet<String>,
) {
    let bundle = refs.bundle;
    for section in sections {
        if is_code(section, "210") {
            for index in section_refs(refs, section) {
                let Some(doc) = resource(bundle, index) else {
                    continue;
                };
                for content in array_at(doc, "content") {
                    let Some(attachment) = content.get("attachment") else {
                        continue;
                    };
                    let Some(id) = str_at(attachment, "url").strip_prefix(MUSUBI_BUNDLE_URL_PREFIX)
                    else {
                        continue;
                    };
                    if !seen.insert(id.to_owned()) {
                        continue;
                    }
                    out.push(AttachmentRef {
                        id: id.to_owned(),
                        name: str_at(attachment, "title").to_owned(),
                        media_type: str_at(attachment, "contentType").to_owned(),
                        bytes: attachment.get("size").and_then(Value::as_u64).unwrap_or(0),
                        added_at: str_at(attachment, "creation").to_owned(),
                    });
                }
            }
        }
        collect_attachments(refs, array_at(section, "section"), out, seen);
    }
}

// ---------------------------------------------------------------------------------------------
// Narrative (XHTML) <-> text
// ---------------------------------------------------------------------------------------------

/// Strips a narrative `div` to plain text: `<br>` and the ends of block elements become line
/// breaks, tags go, entities are decoded, the result is trimmed.
fn xhtml_to_text(div: &str) -> String {
    let mut out = String::new();
    let mut rest = div;
    while let Some(open) = rest.find('<') {
        out.push_str(&decode_entities(&source_text(&rest[..open])));
        let Some(close) = rest[open..].find('>') else {
            rest = "";
            break;
        };
        let tag = rest[open + 1..open + close].trim();
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let block = matches!(
            name.as_str(),
            "p" | "div" | "li" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "table"
        );
        if name == "br" || (block && !out.is_empty() && !out.ends_with('\n')) {
            out.push('\n');
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(&decode_entities(&source_text(rest)));
    out.trim().to_owned()
}

/// Text between tags without the line breaks and indentation of pretty-printed XHTML (only
/// `<br>` and block ends make lines).
fn source_text(raw: &str) -> String {
    let mut lines = raw.split('\n');
    let mut out = lines
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r')
        .to_owned();
    for line in lines {
        out.push_str(line.trim_start_matches([' ', '\t']).trim_end_matches('\r'));
    }
    out
}

fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        // An entity is at most 10 bytes before its `;`: look no further, so text with many `&`
        // and no `;` stays linear.
        let end = after.as_bytes().iter().take(11).position(|&b| b == b';');
        let decoded = end.and_then(|end| {
            let entity = &after[..end];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A narrative `div` for plain text: escaped, line breaks as `<br/>`.
fn text_to_xhtml(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = escaped.lines().collect::<Vec<_>>().join("<br/>");
    format!("<div xmlns=\"{XHTML_NS}\">{body}</div>")
}

// ---------------------------------------------------------------------------------------------
// Writing a Bundle
// ---------------------------------------------------------------------------------------------

/// Applies the differences between `base` (the import mapping of the Bundle) and the letter.
struct Editor<'a> {
    bundle: Value,
    bundle_id: &'a str,
    timestamp: &'a str,
    /// Entry indices of resources changed, for `meta.lastUpdated`.
    touched: BTreeSet<usize>,
}

impl Editor<'_> {
    fn apply(&mut self, base: &ReferralLetter, letter: &ReferralLetter) -> Result<(), FhirError> {
        for (code, base_pair, pair) in [
            (
                "910",
                (&base.to_facility, &base.to_doctor),
                (&letter.to_facility, &letter.to_doctor),
            ),
            (
                "920",
                (&base.from_facility, &base.from_doctor),
                (&letter.from_facility, &letter.from_doctor),
            ),
        ] {
            if base_pair.0 != pair.0 {
                self.set_facility(code, base_pair.0, pair.0)?;
            }
            if base_pair.1 != pair.1 {
                self.set_doctor(code, base_pair.1, pair.1)?;
            }
        }
        self.apply_patient(&base.patient, &letter.patient)?;
        for (field, codes) in FIELD_SECTIONS {
            if base.field(field) == letter.field(field) {
                continue;
            }
            let parts = split_parts(codes, letter.field(field));
            for (code, new) in codes.iter().zip(&parts) {
                // Only sections whose text differs from what the Bundle holds are touched.
                if &self.current_section_text(code)? != new {
                    self.set_section_text(code, new)?;
                }
            }
        }
        for attachment in &letter.attachments {
            if !base.attachments.iter().any(|a| a.id == attachment.id) {
                self.add_attachment(attachment)?;
            }
        }
        Ok(())
    }

    fn finish(mut self, fresh: bool) -> Value {
        let composition = check_document(&self.bundle).ok();
        let timestamp = self.timestamp.to_owned();
        let edited = !self.touched.is_empty();
        for index in std::mem::take(&mut self.touched) {
            if let Some(resource) = self.resource_mut(index) {
                let meta = resource.entry("meta").or_insert_with(|| json!({}));
                if let Some(meta) = meta.as_object_mut() {
                    meta.insert("lastUpdated".to_owned(), json!(timestamp));
                }
                if Some(index) == composition && !fresh {
                    resource.insert("date".to_owned(), json!(timestamp));
                }
            }
        }
        if let Some(bundle) = self.bundle.as_object_mut() {
            bundle.insert("id".to_owned(), json!(self.bundle_id));
            let meta = bundle.entry("meta").or_insert_with(|| json!({}));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert("lastUpdated".to_owned(), json!(timestamp));
            }
            bundle.insert("timestamp".to_owned(), json!(timestamp));
            if edited && !fresh {
                // An edited letter is a new document: it gets its own document identifier.
                bundle.insert(
                    "identifier".to_owned(),
                    json!({ "system": DOCUMENT_ID_SYSTEM, "value": self.bundle_id }),
                );
            }
        }
        self.bundle
    }

    fn derived_url(&self, role: &str) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"musubi referral fhir export\0");
        hasher.update(self.bundle_id.as_bytes());
        hasher.update(b"\0");
        hasher.update(role.as_bytes());
        let hash = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.as_bytes()[..16]);
        format!(
            "urn:uuid:{}",
            uuid::Builder::from_custom_bytes(bytes).into_uuid()
        )
    }

    fn composition_index(&self) -> Result<usize, FhirError> {
        check_document(&self.bundle)
    }

    fn resource_mut(&mut self, index: usize) -> Option<&mut Map<String, Value>> {
        self.bundle
            .get_mut("entry")?
            .as_array_mut()?
            .get_mut(index)?
            .get_mut("resource")?
            .as_object_mut()
    }

    fn composition_mut(&mut self) -> Result<&mut Map<String, Value>, FhirError> {
        let index = self.composition_index()?;
        self.touched.insert(index);
        self.resource_mut(index)
            .ok_or(FhirError::MissingComposition)
    }

    fn composition(&self) -> Result<&Value, FhirError> {
        let index = self.composition_index()?;
        resource(&self.bundle, index).ok_or(FhirError::MissingComposition)
    }

    /// Appends a resource as a new entry with a derived `urn:uuid:` full URL; returns the URL and index.
    fn add_entry(&mut self, role: &str, mut resource: Value) -> Result<(String, usize), FhirError> {
        let url = self.derived_url(role);
        if let Some(object) = resource.as_object_mut() {
            let id = url.trim_start_matches("urn:uuid:").to_owned();
            let mut ordered = Map::new();
            if let Some(kind) = object.remove("resourceType") {
                ordered.insert("resourceType".to_owned(), kind);
            }
            ordered.insert("id".to_owned(), json!(id));
            ordered.append(object);
            *object = ordered;
        }
        let entries = self
            .bundle
            .get_mut("entry")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| FhirError::Malformed {
                what: "entry is not an array".to_owned(),
            })?;
        entries.push(json!({ "fullUrl": url, "resource": resource }));
        let index = entries.len() - 1;
        self.touched.insert(index);
        Ok((url, index))
    }

    /// Path of the section with `code`, creating it (inside 300 unless top-level) when absent.
    fn ensure_section(&mut self, code: &str) -> Result<Vec<usize>, FhirError> {
        let comp = self.composition()?;
        if let Some(path) = find_section_path(array_at(comp, "section"), code) {
            return Ok(path);
        }
        let def = section_def(code);
        let parent: Vec<usize> = if def.top_level {
            Vec::new()
        } else {
            self.ensure_section_300()?
        };
        let section = new_section(def);
        let comp = self.composition_mut()?;
        let position = insert_ordered(sections_mut(comp, &parent)?, code, section);
        let mut path = parent;
        path.push(position);
        Ok(path)
    }

    fn ensure_section_300(&mut self) -> Result<Vec<usize>, FhirError> {
        let comp = self.composition()?;
        if let Some(path) = find_section_path(array_at(comp, "section"), STRUCTURED_DEF.code) {
            return Ok(path);
        }
        let mut section = new_section(&STRUCTURED_DEF);
        if let Some(object) = section.as_object_mut() {
            object.insert("section".to_owned(), json!([]));
        }
        let comp = self.composition_mut()?;
        Ok(vec![insert_ordered(
            sections_mut(comp, &[])?,
            STRUCTURED_DEF.code,
            section,
        )])
    }

    fn section_mut(&mut self, path: &[usize]) -> Result<&mut Map<String, Value>, FhirError> {
        let (last, parent) = path.split_last().ok_or_else(|| FhirError::Malformed {
            what: "empty section path".to_owned(),
        })?;
        let comp = self.composition_mut()?;
        sections_mut(comp, parent)?
            .get_mut(*last)
            .and_then(Value::as_object_mut)
            .ok_or_else(|| FhirError::Malformed {
                what: "section is not an object".to_owned(),
            })
    }

    fn current_section_text(&self, code: &str) -> Result<String, FhirError> {
        let comp = self.composition()?;
        Ok(section_text_by_code(&Refs::new(&self.bundle), comp, code))
    }

    /// Sets the text of the section `code` (see the module docs for where it goes).
    fn set_section_text(&mut self, code: &str, text: &str) -> Result<(), FhirError> {
        let comp = self.composition()?;
        let existing = find_section_path(array_at(comp, "section"), code);
        let Some(path) = existing else {
            if text.is_empty() {
                return Ok(());
            }
            let path = self.ensure_section(code)?;
            let section = self.section_mut(&path)?;
            section.insert("text".to_owned(), narrative(text));
            return Ok(());
        };
        let section = section_at(comp, &path).cloned().unwrap_or(Value::Null);
        let refs = section_refs(&Refs::new(&self.bundle), &section);

        // 1. The section's text lives in attachments (330 臨床経過 in the JP example).
        let carriers: Vec<(usize, Vec<String>)> = refs
            .iter()
            .filter_map(|&i| {
                let pointers: Vec<String> = text_attachments(resource(&self.bundle, i)?)
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect();
                (!pointers.is_empty()).then_some((i, pointers))
            })
            .collect();
        if !carriers.is_empty() {
            let mut first = true;
            for (index, pointers) in carriers {
                for pointer in pointers {
                    let content = if first { text } else { "" };
                    first = false;
                    self.set_attachment_text(index, &pointer, content);
                }
            }
            return Ok(());
        }

        // 2. Narrative, and for 950 紹介目的 the purpose Encounter's reasonCode as well.
        if code == PURPOSE_DEF.code {
            let encounter = refs.iter().copied().find(|&i| {
                resource(&self.bundle, i).is_some_and(|r| str_at(r, "resourceType") == "Encounter")
            });
            if let Some(index) = encounter {
                if let Some(resource) = self.resource_mut(index) {
                    if text.is_empty() {
                        resource.remove("reasonCode");
                    } else {
                        resource.insert("reasonCode".to_owned(), json!([{ "text": text }]));
                    }
                }
                self.touched.insert(index);
            }
        }
        let required = REQUIRED_STRUCTURED.contains(&code) || matches!(code, "910" | "920");
        if text.is_empty() && refs.is_empty() && !required {
            let comp = self.composition_mut()?;
            let (last, parent) = path.split_last().ok_or_else(|| FhirError::Malformed {
                what: "empty section path".to_owned(),
            })?;
            sections_mut(comp, parent)?.remove(*last);
            return Ok(());
        }
        let section = self.section_mut(&path)?;
        if text.is_empty() {
            section.remove("text");
            if refs.is_empty() {
                section.insert("emptyReason".to_owned(), empty_reason());
            }
        } else {
            section.insert("text".to_owned(), narrative(text));
            section.remove("emptyReason");
        }
        Ok(())
    }

    fn set_attachment_text(&mut self, index: usize, pointer: &str, text: &str) {
        let Some(resource) = self.resource_mut(index) else {
            return;
        };
        let mut resource_value = Value::Object(std::mem::take(resource));
        if let Some(attachment) = resource_value
            .pointer_mut(pointer)
            .and_then(Value::as_object_mut)
        {
            attachment.insert(
                "data".to_owned(),
                json!(base64::engine::general_purpose::STANDARD.encode(text.as_bytes())),
            );
            if attachment.contains_key("size") {
                attachment.insert("size".to_owned(), json!(text.len()));
            }
            attachment.remove("hash");
        }
        if let (Some(resource), Value::Object(object)) = (self.resource_mut(index), resource_value)
        {
            *resource = object;
        }
        self.touched.insert(index);
    }

    /// Index of the section's resource of `kind` (the facility for Organization), if referenced.
    fn party_ref(
        &self,
        code: &str,
        kind: &str,
    ) -> Result<(Option<Vec<usize>>, Option<usize>), FhirError> {
        let comp = self.composition()?;
        let Some(path) = find_section_path(array_at(comp, "section"), code) else {
            return Ok((None, None));
        };
        let section = section_at(comp, &path).unwrap_or(&Value::Null);
        let refs = section_refs(&Refs::new(&self.bundle), section);
        let index = if kind == "Organization" {
            facility_index(&self.bundle, &refs)
        } else {
            refs.iter().copied().find(|&i| {
                resource(&self.bundle, i).is_some_and(|r| str_at(r, "resourceType") == kind)
            })
        };
        Ok((Some(path), index))
    }

    /// Ensures section `code` references a resource of `kind`; creates both when absent.
    fn ensure_party_resource(
        &mut self,
        code: &str,
        kind: &str,
        display: &str,
    ) -> Result<usize, FhirError> {
        let (path, index) = self.party_ref(code, kind)?;
        if let Some(index) = index {
            return Ok(index);
        }
        let path = match path {
            Some(path) => path,
            None => self.ensure_section(code)?,
        };
        let role = format!("{code}-{kind}");
        let (url, index) = self.add_entry(&role, json!({ "resourceType": kind }))?;
        let section = self.section_mut(&path)?;
        let list = section.entry("entry").or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.push(json!({ "reference": url, "type": kind, "display": display }));
        }
        Ok(index)
    }

    fn set_facility(&mut self, code: &str, old: &str, new: &str) -> Result<(), FhirError> {
        let display = if code == "910" {
            "紹介先医療機関"
        } else {
            "紹介元医療機関"
        };
        let index = self.ensure_party_resource(code, "Organization", display)?;
        if let Some(resource) = self.resource_mut(index) {
            set_or_remove(resource, "name", new.trim());
        }
        self.touched.insert(index);
        self.replace_in_narrative(code, old, new)
    }

    fn set_doctor(&mut self, code: &str, old: &str, new: &str) -> Result<(), FhirError> {
        let display = if code == "910" {
            "紹介先医師"
        } else {
            "紹介元医師"
        };
        let index = self.ensure_party_resource(code, "Practitioner", display)?;
        if let Some(resource) = self.resource_mut(index) {
            set_person_name(resource, "IDE", new, true);
        }
        self.touched.insert(index);
        self.replace_in_narrative(code, old, new)
    }

    /// Replaces `old` by `new` in a party section's narrative when the narrative names it.
    fn replace_in_narrative(&mut self, code: &str, old: &str, new: &str) -> Result<(), FhirError> {
        let comp = self.composition()?;
        let Some(path) = find_section_path(array_at(comp, "section"), code) else {
            return Ok(());
        };
        let section = section_at(comp, &path).unwrap_or(&Value::Null);
        let current = section
            .get("text")
            .and_then(|t| t.get("div"))
            .and_then(Value::as_str)
            .map(xhtml_to_text);
        let replacement = match current {
            // A party section without narrative gets the facility name, as in the JP example.
            None => party(&Refs::new(&self.bundle), comp, code).0,
            Some(text) if !old.is_empty() && text.contains(old) => text.replacen(old, new, 1),
            Some(_) => return Ok(()),
        };
        let replacement = replacement.trim().to_owned();
        let section = self.section_mut(&path)?;
        if replacement.is_empty() {
            section.remove("text");
        } else {
            section.insert("text".to_owned(), narrative(&replacement));
        }
        Ok(())
    }

    fn patient_index_or_create(&mut self) -> Result<usize, FhirError> {
        let comp = self.composition()?;
        if let Some(index) = patient_index(&Refs::new(&self.bundle), comp) {
            return Ok(index);
        }
        let (url, index) = self.add_entry("patient", json!({ "resourceType": "Patient" }))?;
        let comp = self.composition_mut()?;
        comp.insert(
            "subject".to_owned(),
            json!({ "reference": url, "type": "Patient" }),
        );
        Ok(index)
    }

    fn apply_patient(&mut self, old: &Patient, new: &Patient) -> Result<(), FhirError> {
        let gender = if old.sex != new.sex {
            Some(gender_code(&new.sex)?)
        } else {
            None
        };
        if old.birth_date != new.birth_date && !is_fhir_date(&new.birth_date) {
            return Err(FhirError::InvalidField {
                key: "patient.birth_date",
                value: new.birth_date.clone(),
                reason: "a date is YYYY, YYYY-MM or YYYY-MM-DD",
            });
        }
        let changed = old.name != new.name
            || old.kana != new.kana
            || gender.is_some()
            || old.birth_date != new.birth_date
            || old.address != new.address
            || old.phone != new.phone;
        if changed {
            let index = self.patient_index_or_create()?;
            self.touched.insert(index);
            let patient = self
                .resource_mut(index)
                .ok_or_else(|| FhirError::Malformed {
                    what: "patient entry has no resource".to_owned(),
                })?;
            if old.name != new.name {
                set_person_name(patient, "IDE", &new.name, false);
            }
            if old.kana != new.kana {
                set_person_name(patient, "SYL", &new.kana, false);
            }
            if let Some(gender) = gender {
                set_or_remove(patient, "gender", gender);
            }
            if old.birth_date != new.birth_date {
                set_or_remove(patient, "birthDate", &new.birth_date);
            }
            if old.address != new.address {
                set_address(patient, &new.address);
            }
            if old.phone != new.phone {
                set_phone(patient, &new.phone);
            }
        }
        if old.occupation != new.occupation {
            self.set_occupation(&new.occupation)?;
        }
        Ok(())
    }

    fn set_occupation(&mut self, text: &str) -> Result<(), FhirError> {
        if let Some(index) = occupation_index(&self.bundle) {
            if let Some(resource) = self.resource_mut(index) {
                resource.retain(|key, _| !key.starts_with("value") && key != "dataAbsentReason");
                if !text.is_empty() {
                    resource.insert("valueString".to_owned(), json!(text));
                } else {
                    resource.insert("dataAbsentReason".to_owned(), json!({ "text": "記載なし" }));
                }
            }
            self.touched.insert(index);
            return Ok(());
        }
        if text.is_empty() {
            return Ok(());
        }
        let patient_url = {
            let index = self.patient_index_or_create()?;
            entries(&self.bundle)
                .get(index)
                .map(|e| str_at(e, "fullUrl").to_owned())
                .unwrap_or_default()
        };
        let observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "social-history",
            }]}],
            "code": { "coding": [{ "system": LOINC, "code": "11341-5", "display": "History of Occupation" }], "text": "職業" },
            "subject": { "reference": patient_url },
            "valueString": text,
        });
        let (url, _) = self.add_entry("occupation", observation)?;
        let path = self.ensure_section("640")?;
        let section = self.section_mut(&path)?;
        let list = section.entry("entry").or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.push(json!({ "reference": url, "type": "Observation", "display": "職業" }));
        }
        section.remove("emptyReason");
        Ok(())
    }

    fn add_attachment(&mut self, attachment: &AttachmentRef) -> Result<(), FhirError> {
        let patient_url = {
            let comp = self.composition()?;
            patient_index(&Refs::new(&self.bundle), comp)
                .and_then(|i| entries(&self.bundle).get(i))
                .map(|e| str_at(e, "fullUrl").to_owned())
        };
        let mut content = Map::new();
        content.insert("contentType".to_owned(), json!(attachment.media_type));
        content.insert(
            "url".to_owned(),
            json!(format!("{MUSUBI_BUNDLE_URL_PREFIX}{}", attachment.id)),
        );
        if let Ok(size) = u32::try_from(attachment.bytes) {
            content.insert("size".to_owned(), json!(size));
        }
        content.insert("title".to_owned(), json!(attachment.name));
        content.insert("creation".to_owned(), json!(attachment.added_at));
        let mut doc = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "description": attachment.name,
            "content": [{ "attachment": content }],
        });
        if let (Some(url), Some(object)) = (patient_url, doc.as_object_mut()) {
            object.insert("subject".to_owned(), json!({ "reference": url }));
        }
        let (url, _) = self.add_entry(&format!("attachment-{}", attachment.id), doc)?;
        let mut section = new_section(section_def("210"));
        if let Some(object) = section.as_object_mut() {
            object.insert("text".to_owned(), narrative(&attachment.name));
            object.insert(
                "entry".to_owned(),
                json!([{ "reference": url, "type": "DocumentReference", "display": "添付情報" }]),
            );
        }
        let comp = self.composition_mut()?;
        sections_mut(comp, &[])?.push(section);
        Ok(())
    }

    /// Adds the subsections the profile requires (950, 340, 360, 370, 330) when a fresh Bundle lacks them.
    fn add_required_sections(&mut self) -> Result<(), FhirError> {
        for code in REQUIRED_STRUCTURED {
            let comp = self.composition()?;
            if find_section_path(array_at(comp, "section"), code).is_none() {
                let path = self.ensure_section(code)?;
                self.section_mut(&path)?
                    .insert("emptyReason".to_owned(), empty_reason());
            }
        }
        Ok(())
    }
}

fn sections_mut<'a>(
    comp: &'a mut Map<String, Value>,
    path: &[usize],
) -> Result<&'a mut Vec<Value>, FhirError> {
    let malformed = || FhirError::Malformed {
        what: "composition section is not an array".to_owned(),
    };
    let mut list = comp
        .entry("section")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(malformed)?;
    for &index in path {
        let section = list
            .get_mut(index)
            .and_then(Value::as_object_mut)
            .ok_or_else(malformed)?;
        list = section
            .entry("section")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .ok_or_else(malformed)?;
    }
    Ok(list)
}

/// Inserts `section` (code `code`) before the first sibling that comes later in [`SECTION_ORDER`];
/// returns its index.
fn insert_ordered(list: &mut Vec<Value>, code: &str, section: Value) -> usize {
    let rank = |code: &str| {
        SECTION_ORDER
            .iter()
            .position(|c| *c == code)
            .unwrap_or(SECTION_ORDER.len())
    };
    let position = list
        .iter()
        .position(|sibling| {
            SECTION_ORDER
                .iter()
                .position(|c| is_code(sibling, c))
                .is_some_and(|r| r > rank(code))
        })
        .unwrap_or(list.len());
    list.insert(position, section);
    position
}

fn new_section(def: &SectionDef) -> Value {
    json!({
        "title": def.title,
        "code": { "coding": [{ "system": SECTION_SYSTEM, "code": def.code, "display": format!("{}セクション", def.title) }] },
    })
}

fn narrative(text: &str) -> Value {
    json!({ "status": "additional", "div": text_to_xhtml(text) })
}

fn empty_reason() -> Value {
    json!({ "coding": [{ "system": LIST_EMPTY_REASON, "code": "unavailable", "display": "Unavailable" }] })
}

fn set_or_remove(resource: &mut Map<String, Value>, key: &str, value: &str) {
    if value.is_empty() {
        resource.remove(key);
    } else {
        resource.insert(key.to_owned(), json!(value));
    }
}

/// Sets the name with representation `wanted` (`IDE` 漢字 or `SYL` カナ), creating it when absent,
/// removing it when `text` is empty. With `drop_others`, names of other representations (the
/// reading of a previous name) are removed.
fn set_person_name(resource: &mut Map<String, Value>, wanted: &str, text: &str, drop_others: bool) {
    let current = Value::Object(resource.clone());
    let index = name_index(&current, wanted);
    let names = resource.entry("name").or_insert_with(|| json!([]));
    let Some(names) = names.as_array_mut() else {
        return;
    };
    let text = text.trim();
    let (family, given) = match text.split_once([' ', '\u{3000}']) {
        Some((family, given)) => (family.trim(), Some(given.trim())),
        None => (text, None),
    };
    match (index, text.is_empty()) {
        (Some(i), true) => {
            names.remove(i);
        }
        (None, true) => {}
        (index, false) => {
            let mut name = match index {
                Some(i) => names[i].as_object().cloned().unwrap_or_default(),
                None => {
                    let mut name = Map::new();
                    name.insert(
                        "extension".to_owned(),
                        json!([{ "url": EN_REPRESENTATION, "valueCode": wanted }]),
                    );
                    name.insert("use".to_owned(), json!("official"));
                    name
                }
            };
            name.insert("text".to_owned(), json!(text));
            name.insert("family".to_owned(), json!(family));
            match given {
                Some(given) if !given.is_empty() => {
                    name.insert("given".to_owned(), json!([given]));
                }
                _ => {
                    name.remove("given");
                }
            }
            match index {
                Some(i) => names[i] = Value::Object(name),
                None => names.push(Value::Object(name)),
            }
        }
    }
    if drop_others && !text.is_empty() {
        names.retain(|n| {
            let rep = representation(n);
            rep == wanted || (wanted == "IDE" && rep.is_empty())
        });
    }
    if names.is_empty() {
        resource.remove("name");
    }
}

fn set_address(patient: &mut Map<String, Value>, address: &str) {
    let addresses = patient.entry("address").or_insert_with(|| json!([]));
    let Some(addresses) = addresses.as_array_mut() else {
        return;
    };
    if address.trim().is_empty() {
        if !addresses.is_empty() {
            addresses.remove(0);
        }
    } else {
        let (postal, text) = split_postal(address);
        let mut new = Map::new();
        if let Some(old) = addresses.first().and_then(Value::as_object) {
            // Keep what the letter does not hold (use, type, period); structured parts would contradict the new text.
            for (key, value) in old {
                if matches!(key.as_str(), "use" | "type" | "period" | "extension") {
                    new.insert(key.clone(), value.clone());
                }
            }
            if let Some(country) = old.get("country") {
                new.insert("country".to_owned(), country.clone());
            }
        }
        new.insert("text".to_owned(), json!(text));
        if let Some(postal) = postal {
            new.insert("postalCode".to_owned(), json!(postal));
        }
        if !new.contains_key("country") {
            new.insert("country".to_owned(), json!("JP"));
        }
        if addresses.is_empty() {
            addresses.push(Value::Object(new));
        } else {
            addresses[0] = Value::Object(new);
        }
    }
    if addresses.is_empty() {
        patient.remove("address");
    }
}

fn set_phone(patient: &mut Map<String, Value>, phone: &str) {
    let telecom = patient.entry("telecom").or_insert_with(|| json!([]));
    let Some(telecom) = telecom.as_array_mut() else {
        return;
    };
    let index = telecom.iter().position(|t| str_at(t, "system") == "phone");
    match (index, phone.trim().is_empty()) {
        (Some(i), true) => {
            telecom.remove(i);
        }
        (None, true) => {}
        (Some(i), false) => {
            if let Some(entry) = telecom[i].as_object_mut() {
                entry.insert("value".to_owned(), json!(phone.trim()));
            }
        }
        (None, false) => telecom.push(json!({ "system": "phone", "value": phone.trim() })),
    }
    if telecom.is_empty() {
        patient.remove("telecom");
    }
}

fn gender_code(sex: &str) -> Result<&'static str, FhirError> {
    match sex.trim() {
        "" => Ok(""),
        "男" | "男性" | "male" | "M" => Ok("male"),
        "女" | "女性" | "female" | "F" => Ok("female"),
        "その他" | "other" => Ok("other"),
        "不明" | "unknown" => Ok("unknown"),
        _ => Err(FhirError::InvalidField {
            key: "patient.sex",
            value: sex.to_owned(),
            reason: "性別 is one of 男, 女, その他, 不明",
        }),
    }
}

fn is_fhir_date(text: &str) -> bool {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = text.split('-');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(""), None, None, None) => true,
        (Some(y), None, None, None) => digits(y, 4),
        (Some(y), Some(m), None, None) => digits(y, 4) && digits(m, 2),
        (Some(y), Some(m), Some(d), None) => digits(y, 4) && digits(m, 2) && digits(d, 2),
        _ => false,
    }
}

/// The shell of a Bundle for a letter written in Musubi: Composition with 920 and 910 sections,
/// Patient, Organizations and Practitioners without content; [`Editor::apply`] fills them in.
fn skeleton(bundle_id: &str, timestamp: &str) -> Value {
    let editor = Editor {
        bundle: Value::Null,
        bundle_id,
        timestamp,
        touched: BTreeSet::new(),
    };
    let url = |role: &str| editor.derived_url(role);
    let (composition, patient) = (url("composition"), url("patient"));
    let (from_org, from_doc) = (url("920-Organization"), url("920-Practitioner"));
    let (to_org, to_doc) = (url("910-Organization"), url("910-Practitioner"));
    let id = |url: &str| url.trim_start_matches("urn:uuid:").to_owned();
    let profile = |name: &str| json!({ "lastUpdated": timestamp, "profile": [format!("http://jpfhir.jp/fhir/eCS/StructureDefinition/{name}")] });
    let party_section = |code: &str, org: &str, doc: &str, org_display: &str, doc_display: &str| {
        let mut section = new_section(section_def(code));
        if let Some(object) = section.as_object_mut() {
            object.insert(
                "entry".to_owned(),
                json!([
                    { "reference": org, "type": "Organization", "display": org_display },
                    { "reference": doc, "type": "Practitioner", "display": doc_display },
                ]),
            );
        }
        section
    };
    let date = timestamp.get(..10).unwrap_or(timestamp);
    let organization = |url: &str| {
        json!({
            "resourceType": "Organization",
            "id": id(url),
            "meta": profile("JP_Organization_eCS"),
            "type": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov" }] }],
        })
    };
    let practitioner = |url: &str| json!({ "resourceType": "Practitioner", "id": id(url), "meta": profile("JP_Practitioner_eCS") });
    json!({
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {
            "lastUpdated": timestamp,
            "profile": ["http://jpfhir.jp/fhir/eReferral/StructureDefinition/JP_Bundle_eReferral"],
        },
        "type": "document",
        "identifier": { "system": DOCUMENT_ID_SYSTEM, "value": bundle_id },
        "timestamp": timestamp,
        "entry": [
            { "fullUrl": composition, "resource": {
                "resourceType": "Composition",
                "id": id(&composition),
                "meta": {
                    "lastUpdated": timestamp,
                    "profile": ["http://jpfhir.jp/fhir/eReferral/StructureDefinition/JP_Composition_eReferral"],
                },
                "extension": [{
                    "url": "http://hl7.org/fhir/StructureDefinition/composition-clinicaldocument-versionNumber",
                    "valueString": "1",
                }],
                "identifier": { "system": RESOURCE_ID_SYSTEM, "value": bundle_id },
                "status": "final",
                "type": { "coding": [{ "system": DOC_TYPE_SYSTEM, "code": "57133-1", "display": "診療情報提供書" }] },
                "category": [{ "coding": [{ "system": DOC_TYPE_SYSTEM, "code": "57133-1", "display": "診療情報提供書" }] }],
                "subject": { "reference": patient, "type": "Patient" },
                "date": timestamp,
                "author": [
                    { "reference": from_doc, "type": "Practitioner" },
                    { "reference": from_org, "type": "Organization" },
                ],
                "title": "診療情報提供書",
                "custodian": { "reference": from_org, "type": "Organization" },
                "event": [{ "code": [{ "text": "診療情報提供書発行" }], "period": { "start": date } }],
                "section": [
                    party_section("920", &from_org, &from_doc, "紹介元医療機関", "紹介元医師"),
                    party_section("910", &to_org, &to_doc, "紹介先医療機関", "紹介先医師"),
                ],
            }},
            { "fullUrl": patient, "resource": { "resourceType": "Patient", "id": id(&patient), "meta": profile("JP_Patient_eCS") } },
            { "fullUrl": from_doc, "resource": practitioner(&from_doc) },
            { "fullUrl": to_doc, "resource": practitioner(&to_doc) },
            { "fullUrl": from_org, "resource": organization(&from_org) },
            { "fullUrl": to_org, "resource": organization(&to_org) },
        ],
    })
}

#[cfg(test)]
mod tests {
    use automerge::{ActorId, AutoCommit};

    use super::*;
    use crate::documents::referral::{self, ReferralStatus};
    use crate::documents::shared_data;

    const BUNDLE: &str = "fhir-ereferral/Bundle-BundleReferralExample01.json";
    const PURPOSE_ENCOUNTER: &str = "urn:uuid:3acc3dc7-c79b-41f1-8eea-ac4de9b664b8";
    const COURSE_DOCUMENT: &str = "urn:uuid:a6e4fc73-a749-4583-94a7-18e4241b4c75";
    const PATIENT: &str = "urn:uuid:0a48a4bf-0d87-4efb-aafd-d45e0842a4dd";
    const TO_ORGANIZATION: &str = "urn:uuid:a44951be-cdaa-4c53-9e35-6be013da5441";
    const FROM_PRACTITIONER: &str = "urn:uuid:3e6a0ba2-d781-4fd7-9de6-e077b690daed";
    const TIMESTAMP: &str = "2024-05-01T10:00:00+09:00";

    fn source() -> String {
        shared_data(BUNDLE)
    }

    fn original() -> Value {
        serde_json::from_str(&source()).expect("the real bundle is json")
    }

    fn entry_by_url<'a>(bundle: &'a Value, url: &str) -> &'a Value {
        entries(bundle)
            .iter()
            .find(|e| str_at(e, "fullUrl") == url)
            .and_then(|e| e.get("resource"))
            .unwrap_or_else(|| panic!("no entry {url}"))
    }

    fn section<'a>(bundle: &'a Value, code: &str) -> &'a Value {
        let comp = resource(bundle, 0).expect("composition first");
        find_section(comp, code).unwrap_or_else(|| panic!("no section {code}"))
    }

    fn narrative_of(section: &Value) -> String {
        xhtml_to_text(section["text"]["div"].as_str().expect("narrative div"))
    }

    /// Indices of entries whose resource differs between the two Bundles (same length required).
    fn changed_entries(before: &Value, after: &Value) -> Vec<String> {
        assert_eq!(
            entries(before).len(),
            entries(after).len(),
            "entry count changed"
        );
        entries(before)
            .iter()
            .zip(entries(after))
            .filter(|(a, b)| a["resource"] != b["resource"] || a["fullUrl"] != b["fullUrl"])
            .map(|(a, _)| str_at(a, "fullUrl").to_owned())
            .collect()
    }

    fn reimport(bundle: &Value) -> ReferralLetter {
        let mut letter = import_bundle(&bundle.to_string()).expect("exported bundle imports again");
        letter.fhir_source = None;
        letter
    }

    #[test]
    fn importing_the_real_jp_bundle_fills_the_form() {
        let letter = import_bundle(&source()).expect("import");
        assert_eq!(letter.to_facility, "東京第一テスト病院");
        assert_eq!(letter.to_doctor, "野口 英世丸");
        assert_eq!(letter.from_facility, "港診療所");
        assert_eq!(letter.from_doctor, "大河内 勘三郎");
        assert_eq!(letter.patient.name, "田中 太郎");
        assert_eq!(letter.patient.kana, "タナカ タロウ");
        assert_eq!(letter.patient.sex, "男");
        assert_eq!(letter.patient.birth_date, "1955-05-04");
        assert_eq!(
            letter.patient.address,
            "〒123-4567 神奈川県横浜市港区１－２－３"
        );
        assert_eq!(letter.patient.phone, "03-1234-5678");
        assert_eq!(letter.patient.occupation, "");
        assert_eq!(letter.diagnosis, "上腹部痛、腰痛");
        assert_eq!(letter.purpose, "腹痛精査お願いします。");
        assert_eq!(
            letter.history,
            "2018年　狭心症　２ヶ月治療で軽快。2019年　交通事故で左前腕骨折　３ヶ月ギプス固定。\n\
             【家族歴】母　胃がん\n【アレルギー・不耐性反応】サバ　キーウイ\n【感染症情報】特になし"
        );
        assert!(
            letter
                .progress
                .starts_with("２０２２年６月上旬から夜食後に時々上腹部痛があり"),
            "{}",
            letter.progress
        );
        assert!(
            letter
                .progress
                .ends_with("\n【身体所見】腹部所見：上腹部圧痛あり、その他特に所見なし。"),
            "{}",
            letter.progress
        );
        // 臨床経過 says only 添付参照 in its narrative; the course itself is the text attachment.
        assert!(
            letter.treatment.starts_with("食欲不振と心窩部痛を認めた．"),
            "{}",
            letter.treatment
        );
        assert!(
            letter
                .treatment
                .contains("抗潰瘍薬投与による経過観察となった．")
        );
        assert_eq!(letter.treatment.lines().count(), 5);
        assert_eq!(letter.prescription, "");
        assert_eq!(letter.remarks, "");
        assert_eq!(letter.status, ReferralStatus::Draft);
        assert!(letter.attachments.is_empty());
        assert_eq!(letter.fhir_source.as_deref(), Some(source().as_str()));
    }

    #[test]
    fn an_unedited_import_exports_every_entry_unchanged() {
        let letter = import_bundle(&source()).expect("import");
        let exported = export_bundle(&letter, "bundle-1", TIMESTAMP).expect("export");
        let before = original();
        assert_eq!(changed_entries(&before, &exported), Vec::<String>::new());
        assert_eq!(exported["entry"], before["entry"]);
        assert_eq!(exported["id"], "bundle-1");
        assert_eq!(
            exported["identifier"], before["identifier"],
            "same document, same identifier"
        );
        assert_eq!(exported["timestamp"], TIMESTAMP);
        assert_eq!(exported["type"], "document");
    }

    #[test]
    fn an_imported_letter_kept_in_automerge_still_exports_unchanged() {
        let letter = import_bundle(&source()).expect("import");
        let mut doc = AutoCommit::new().with_actor(ActorId::from(&b"clinic"[..]));
        referral::init(&mut doc, &letter).expect("init");
        referral::set_status(&mut doc, ReferralStatus::Sent).expect("send");
        let loaded = AutoCommit::load(&doc.save()).expect("load");
        let stored = referral::read(&loaded).expect("read");
        let exported = export_bundle(&stored, "bundle-2", TIMESTAMP).expect("export");
        assert_eq!(exported["entry"], original()["entry"]);
    }

    #[test]
    fn edited_remarks_and_purpose_appear_in_their_sections_and_nothing_else_changes() {
        let mut letter = import_bundle(&source()).expect("import");
        letter.remarks = "ご多忙のところ恐縮ですが、よろしくお願いします。".to_owned();
        letter.purpose =
            "腹痛精査および内視鏡検査をお願いします。\n貧血の評価もお願いします。".to_owned();
        let exported = export_bundle(&letter, "bundle-3", TIMESTAMP).expect("export");
        let before = original();

        // 備考 has no section in the source: a 220 備考・連絡情報 section is added at the top level.
        let remarks = section(&exported, "220");
        assert_eq!(remarks["title"], "備考・連絡情報");
        assert_eq!(remarks["code"]["coding"][0]["system"], SECTION_SYSTEM);
        assert_eq!(narrative_of(remarks), letter.remarks);
        let comp = resource(&exported, 0).expect("composition");
        assert!(
            array_at(comp, "section").iter().any(|s| is_code(s, "220")),
            "220 sits at the top level"
        );

        let purpose = section(&exported, "950");
        assert_eq!(narrative_of(purpose), letter.purpose);
        assert_eq!(
            entry_by_url(&exported, PURPOSE_ENCOUNTER)["reasonCode"][0]["text"],
            letter.purpose.as_str()
        );

        // Only the Composition and the purpose Encounter changed; every other entry is the source's.
        let mut changed = changed_entries(&before, &exported);
        changed.sort();
        let mut expected = vec![
            str_at(&before["entry"][0], "fullUrl").to_owned(),
            PURPOSE_ENCOUNTER.to_owned(),
        ];
        expected.sort();
        assert_eq!(changed, expected);
        // Inside the Composition the other sections are untouched.
        for code in [
            "910", "920", "340", "360", "370", "510", "550", "610", "520", "330",
        ] {
            assert_eq!(
                section(&exported, code),
                section(&before, code),
                "section {code}"
            );
        }
        assert_eq!(comp["date"], TIMESTAMP);
        assert_eq!(
            exported["identifier"]["value"], "bundle-3",
            "an edited letter is a new document"
        );
        assert_eq!(
            reimport(&exported),
            ReferralLetter {
                fhir_source: None,
                ..letter
            }
        );
    }

    #[test]
    fn edited_parties_patient_and_multi_section_fields_round_trip() {
        let mut letter = import_bundle(&source()).expect("import");
        letter.to_facility = "東京第二テスト病院".to_owned();
        letter.from_doctor = "大河内 勘四郎".to_owned();
        letter.patient.name = "田中 次郎".to_owned();
        letter.patient.kana = "タナカ ジロウ".to_owned();
        letter.patient.sex = "女".to_owned();
        letter.patient.birth_date = "1956-06-05".to_owned();
        letter.patient.address = "〒231-0001 神奈川県横浜市中区新港１－１".to_owned();
        letter.patient.phone = "045-000-0000".to_owned();
        letter.patient.occupation = "漁業".to_owned();
        letter.history = letter
            .history
            .replace("母　胃がん", "母　胃がん、父　高血圧");
        letter.progress.push_str("\n【検査結果】Hb 5.0 g/dL");
        letter.treatment = "内視鏡的止血術を施行し、経過良好。".to_owned();
        letter.prescription = "タケキャブ錠10mg 1錠 1日2回 朝食後、就寝時".to_owned();
        let exported = export_bundle(&letter, "bundle-4", TIMESTAMP).expect("export");

        assert_eq!(
            entry_by_url(&exported, TO_ORGANIZATION)["name"],
            "東京第二テスト病院"
        );
        assert_eq!(
            narrative_of(section(&exported, "910")),
            "東京第二テスト病院"
        );
        let doctor = entry_by_url(&exported, FROM_PRACTITIONER);
        assert_eq!(doctor["name"][0]["text"], "大河内 勘四郎");
        assert_eq!(doctor["name"][0]["given"][0], "勘四郎");
        assert_eq!(
            array_at(doctor, "name").len(),
            1,
            "the old reading (カナ) of a renamed doctor is dropped"
        );
        let patient = entry_by_url(&exported, PATIENT);
        assert_eq!(patient["name"][0]["family"], "田中");
        assert_eq!(patient["name"][1]["text"], "タナカ ジロウ");
        assert_eq!(patient["gender"], "female");
        assert_eq!(patient["birthDate"], "1956-06-05");
        assert_eq!(patient["address"][0]["postalCode"], "231-0001");
        assert_eq!(
            patient["address"][0]["text"],
            "神奈川県横浜市中区新港１－１"
        );
        assert_eq!(patient["telecom"][0]["value"], "045-000-0000");
        assert_eq!(
            narrative_of(section(&exported, "550")),
            "母　胃がん、父　高血圧"
        );
        assert_eq!(
            section(&exported, "370"),
            section(&original(), "370"),
            "既往歴 itself was not edited"
        );
        assert_eq!(narrative_of(section(&exported, "620")), "Hb 5.0 g/dL");
        assert_eq!(narrative_of(section(&exported, "430")), letter.prescription);
        let course = entry_by_url(&exported, COURSE_DOCUMENT);
        let data = course["content"][0]["attachment"]["data"]
            .as_str()
            .expect("data");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64");
        assert_eq!(String::from_utf8(decoded).expect("utf-8"), letter.treatment);
        assert_eq!(course["meta"]["lastUpdated"], TIMESTAMP);

        assert_eq!(
            reimport(&exported),
            ReferralLetter {
                fhir_source: None,
                ..letter
            }
        );
    }

    #[test]
    fn a_letter_written_in_musubi_exports_a_minimal_document_bundle() {
        let letter = ReferralLetter {
            to_facility: "七尾市立病院".to_owned(),
            to_doctor: "能登 一郎".to_owned(),
            from_facility: "和倉診療所".to_owned(),
            from_doctor: "石川 花子".to_owned(),
            patient: Patient {
                name: "七尾 太郎".to_owned(),
                kana: "ナナオ タロウ".to_owned(),
                sex: "男".to_owned(),
                birth_date: "1948-01-09".to_owned(),
                address: "〒926-0000 石川県七尾市本府中町".to_owned(),
                phone: "0767-00-0000".to_owned(),
                occupation: "農業".to_owned(),
            },
            diagnosis: "慢性心不全".to_owned(),
            purpose: "避難所生活での増悪、精査加療をお願いします。".to_owned(),
            history: "高血圧\n【家族歴】特記事項なし".to_owned(),
            progress: "1月以降下腿浮腫が増悪。".to_owned(),
            treatment: "フロセミド増量。".to_owned(),
            prescription: "フロセミド錠20mg 1錠 1日1回 朝食後".to_owned(),
            remarks: "ご家族は金沢市に避難中です。".to_owned(),
            ..ReferralLetter::default()
        };
        let exported = export_bundle(&letter, "bundle-5", TIMESTAMP).expect("export");
        assert_eq!(exported["resourceType"], "Bundle");
        assert_eq!(exported["type"], "document");
        assert_eq!(exported["id"], "bundle-5");
        assert_eq!(exported["timestamp"], TIMESTAMP);
        let kinds: Vec<&str> = entries(&exported)
            .iter()
            .map(|e| str_at(&e["resource"], "resourceType"))
            .collect();
        assert_eq!(kinds[0], "Composition");
        for (kind, count) in [
            ("Patient", 1),
            ("Organization", 2),
            ("Practitioner", 2),
            ("Observation", 1),
        ] {
            assert_eq!(
                kinds.iter().filter(|k| **k == kind).count(),
                count,
                "{kind} in {kinds:?}"
            );
        }
        for entry in entries(&exported) {
            assert!(str_at(entry, "fullUrl").starts_with("urn:uuid:"), "{entry}");
        }
        let comp = resource(&exported, 0).expect("composition");
        assert_eq!(comp["title"], "診療情報提供書");
        assert_eq!(comp["type"]["coding"][0]["code"], "57133-1");
        let top: Vec<&str> = array_at(comp, "section")
            .iter()
            .map(|s| str_at(&s["code"]["coding"][0], "code"))
            .collect();
        assert_eq!(top, ["920", "910", "300", "220"]);
        let structured: Vec<&str> = array_at(section(&exported, "300"), "section")
            .iter()
            .map(|s| str_at(&s["code"]["coding"][0], "code"))
            .collect();
        assert_eq!(
            structured,
            ["950", "340", "360", "370", "550", "640", "430", "330"]
        );
        assert_eq!(narrative_of(section(&exported, "950")), letter.purpose);
        assert_eq!(reimport(&exported), letter);
        // Deterministic: same inputs, same bytes.
        assert_eq!(
            export_bundle(&letter, "bundle-5", TIMESTAMP).expect("again"),
            exported
        );
    }

    #[test]
    fn attachments_export_as_musubi_bundle_references() {
        let mut letter = import_bundle(&source()).expect("import");
        letter.attachments.push(AttachmentRef {
            id: "ab".repeat(32),
            name: "胃内視鏡画像.pdf".to_owned(),
            media_type: "application/pdf".to_owned(),
            bytes: 2_048_000,
            added_at: TIMESTAMP.to_owned(),
        });
        let exported = export_bundle(&letter, "bundle-6", TIMESTAMP).expect("export");
        let attached = section(&exported, "210");
        let doc = entry_by_url(&exported, reference_of(&attached["entry"][0]));
        assert_eq!(
            doc["content"][0]["attachment"]["url"],
            format!("urn:musubi:bundle:{}", "ab".repeat(32))
        );
        assert_eq!(entries(&exported).len(), entries(&original()).len() + 1);
        assert_eq!(
            reimport(&exported),
            ReferralLetter {
                fhir_source: None,
                ..letter
            }
        );
    }

    #[test]
    fn bundles_that_are_not_referral_documents_are_refused_clearly() {
        let err = import_bundle("{not json").expect_err("json");
        assert!(
            err.to_string().starts_with("bundle is not valid json"),
            "{err}"
        );
        let err = import_bundle(r#"{"resourceType":"Bundle","type":"collection","entry":[]}"#)
            .expect_err("collection");
        assert_eq!(
            err.to_string(),
            "bundle type is `collection`, expected `document`"
        );
        let err = import_bundle(r#"{"resourceType":"Patient"}"#).expect_err("patient");
        assert_eq!(
            err.to_string(),
            "expected a fhir bundle, found resourceType `Patient`"
        );
        let err = import_bundle(r#"{"resourceType":"Bundle","type":"document","entry":[]}"#)
            .expect_err("empty");
        assert!(matches!(err, FhirError::MissingComposition));
    }

    #[test]
    fn a_sex_fhir_cannot_express_is_an_export_error() {
        let mut letter = import_bundle(&source()).expect("import");
        letter.patient.sex = "おとこ".to_owned();
        let err = export_bundle(&letter, "b", TIMESTAMP).expect_err("invalid sex");
        assert!(err.to_string().contains("patient.sex"), "{err}");
        letter.patient.sex = "男".to_owned();
        letter.patient.birth_date = "昭和30年5月4日".to_owned();
        assert!(export_bundle(&letter, "b", TIMESTAMP).is_err());
    }

    #[test]
    fn narratives_strip_to_text_and_back() {
        let div = "<div xmlns=\"http://www.w3.org/1999/xhtml\">\n  <p>タケキャブ錠10mg&amp;1錠</p>\n  <p>A &lt; B<br/>次の行&#x3042;&#12354;</p>\n</div>";
        assert_eq!(
            xhtml_to_text(div),
            "タケキャブ錠10mg&1錠\nA < B\n次の行ああ"
        );
        let text = "一行目 <b>\n二行目 & 三";
        assert_eq!(xhtml_to_text(&text_to_xhtml(text)), text);
    }

    #[test]
    fn entities_decode_and_a_stray_ampersand_stays_as_written() {
        assert_eq!(
            decode_entities("a &amp; b &#x3042;&#12354; c & d; &verylongentityname; &lt;"),
            "a & b ああ c & d; &verylongentityname; <"
        );
        // Many `&` and no `;`: every one is kept (and the scan stays linear; bench-fhir times it).
        let raw = "&".repeat(10_000);
        assert_eq!(decode_entities(&raw), raw);
    }

    #[test]
    fn labelled_parts_split_where_they_were_joined() {
        let codes = ["370", "550", "510"];
        let texts = [
            "既往なし".to_owned(),
            "母　胃がん".to_owned(),
            String::new(),
        ];
        let joined = join_parts(&codes, &texts);
        assert_eq!(joined, "既往なし\n【家族歴】母　胃がん");
        assert_eq!(split_parts(&codes, &joined), texts);
        assert_eq!(
            split_parts(&codes, "【アレルギー・不耐性反応】サバ"),
            ["", "", "サバ"]
        );
    }
}
