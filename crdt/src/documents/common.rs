//! Reading helpers shared by the document schemas: the root header (kind and schema version),
//! typed scalar reads, and the errors they raise.

use automerge::{ObjId, ReadDoc, ScalarValue, Value};

use super::DocumentError;

/// Root key naming the document kind.
pub(crate) const KEY_KIND: &str = "kind";
/// Root key holding the schema version.
pub(crate) const KEY_SCHEMA_VERSION: &str = "schema_version";

/// Checks the root header: kind `expected`, schema version in `1..=supported`.
pub(crate) fn check_header(
    doc: &impl ReadDoc,
    expected: &'static str,
    supported: u64,
) -> Result<(), DocumentError> {
    let kind = match doc.get(automerge::ROOT, KEY_KIND)? {
        Some((Value::Scalar(value), _)) => value.as_str().unwrap_or_default().to_owned(),
        _ => String::new(),
    };
    if kind != expected {
        return Err(DocumentError::WrongKind {
            found: kind,
            expected,
        });
    }
    match read_u64(doc, &automerge::ROOT, KEY_SCHEMA_VERSION)? {
        Some(version) if (1..=supported).contains(&version) => Ok(()),
        found => Err(DocumentError::UnsupportedSchema {
            found: found.unwrap_or(0),
            supported,
        }),
    }
}

/// An unsigned integer at `obj[key]` (a non-negative signed one is accepted too).
pub(crate) fn read_u64(
    doc: &impl ReadDoc,
    obj: &ObjId,
    key: &str,
) -> Result<Option<u64>, DocumentError> {
    match doc.get(obj, key)? {
        None => Ok(None),
        Some((Value::Scalar(value), _)) => match value.as_ref() {
            ScalarValue::Uint(n) => Ok(Some(*n)),
            ScalarValue::Int(n) if *n >= 0 => Ok(Some(n.unsigned_abs())),
            _ => Err(wrong_type(key, "an unsigned integer")),
        },
        Some((Value::Object(_), _)) => Err(wrong_type(key, "an unsigned integer")),
    }
}

/// A value over its limit.
pub(crate) fn too_large(what: &str, size: usize, max: usize) -> DocumentError {
    DocumentError::TooLarge {
        what: what.to_owned(),
        size: size as u64,
        max: max as u64,
    }
}

/// A field of the wrong type.
pub(crate) fn wrong_type(key: &str, expected: &'static str) -> DocumentError {
    DocumentError::WrongType {
        key: key.to_owned(),
        expected,
    }
}

/// A required field that is absent.
pub(crate) fn missing(key: &str) -> DocumentError {
    DocumentError::MissingField {
        key: key.to_owned(),
    }
}
