//! Typed schemas of Musubi's domain documents over Automerge.
//!
//! Each document kind has a module that knows its layout inside an [`automerge::AutoCommit`]:
//! `init` writes a fresh document, `read` turns any replica back into a plain Rust value,
//! and small `set_*` functions make the edits a user makes, in a way that merges well.
//! Long free-text fields are Automerge `Text` objects, so two facilities editing the same field
//! offline merge character by character.
//!
//! Nothing here does IO: timestamps and ids are parameters, like everywhere in this crate.
//!
//! - [`careplan`]: the care plan (居宅サービス計画書 第1表〜第3表, 第5表 支援経過, monitoring, versions).
//! - [`careplan_csv`]: its export as the MHLW ケアプランデータ連携 CSV (Shift_JIS).
//! - [`referral`]: the referral letter (診療情報提供書, 様式11).
//! - [`referral_fhir`]: its import and export as an HL7 FHIR JP eReferral document Bundle.
//! - [`shelter`]: the shelter roster (避難所: evacuees, stays, needs, supply requests) and its medical notes.

pub mod careplan;
pub mod careplan_csv;
mod common;
pub mod referral;
pub mod referral_fhir;
pub mod shelter;

/// Why reading or editing a typed document failed.
///
/// Every variant names the field or limit involved, so a caller can show it to the user.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Automerge refused an operation (a corrupt or foreign object id, a type mismatch inside Automerge).
    #[error("automerge operation failed: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// `init` was called on a document that already holds a schema version: a document is initialised
    /// once, by its creator; every other replica receives that change through sync.
    #[error("document is already initialised (schema version {found})")]
    AlreadyInitialized {
        /// The schema version found at the root.
        found: u64,
    },
    /// The root has no `kind` or it names another document kind (e.g. a care plan was passed to the
    /// referral reader).
    #[error("document kind is `{found}`, expected `{expected}`")]
    WrongKind {
        /// The kind found at the root (empty when absent).
        found: String,
        /// The kind the reader handles.
        expected: &'static str,
    },
    /// The document was written by a newer schema than this build understands.
    #[error(
        "document schema version {found} is not supported (this build reads up to {supported})"
    )]
    UnsupportedSchema {
        /// The schema version found at the root (0 when absent).
        found: u64,
        /// The newest schema version this build reads.
        supported: u64,
    },
    /// A field the schema requires is absent.
    #[error("field `{key}` is missing")]
    MissingField {
        /// The field's key, e.g. `patient.name`.
        key: String,
    },
    /// A field holds a value of the wrong type (e.g. a scalar where a text object belongs).
    #[error("field `{key}` should be {expected}")]
    WrongType {
        /// The field's key, e.g. `status`.
        key: String,
        /// What the schema expects there, e.g. `a text object`.
        expected: &'static str,
    },
    /// A field key that the document kind does not have (parsing a user- or UI-supplied key).
    #[error("unknown field `{key}`; valid fields are: {valid}")]
    UnknownField {
        /// The key that was given.
        key: String,
        /// The valid keys, comma separated.
        valid: String,
    },
    /// A status string that is not one of the kind's statuses.
    #[error("unknown status `{found}`; valid statuses are: {valid}")]
    UnknownStatus {
        /// The status that was found or given.
        found: String,
        /// The valid statuses, comma separated.
        valid: String,
    },
    /// A value given to an edit is malformed (e.g. an attachment id that is not a hex BLAKE3 hash).
    #[error("invalid {key}: {reason}")]
    InvalidValue {
        /// The field's key, e.g. `attachments.id`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value exceeds one of the named limits of the schema (Invariant 8: bounded everything).
    #[error("{what} is {size} long, the maximum is {max}")]
    TooLarge {
        /// What was too large, e.g. `field remarks (bytes)` or `attachments (count)`.
        what: String,
        /// The size that was given, in the unit named in `what`.
        size: u64,
        /// The limit, in the same unit.
        max: u64,
    },
}

/// Reads a file of the real data set (`../shared/data` next to the repository), for tests.
///
/// Panics with the path it looked at when the file is missing: tests never skip silently.
#[cfg(test)]
pub(crate) fn shared_data(relative: &str) -> String {
    let path = format!(
        "{}/../../shared/data/{relative}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("real test data missing: could not read {path}: {e} (the tests need ../shared/data next to the repository)"))
}
