//! Domain services: what staff do with documents, as engine calls (the CLI and the desktop app
//! are thin layers over these).
//!
//! - [`referral`]: 診療情報提供書 (様式11) import from FHIR, list, show, edit, reply, export.

use musubi_crdt::ids::{DocumentId, DocumentKind};

use crate::engine::{Engine, EngineError, Result};

pub mod referral;

/// Runs after a sync step touched `doc`: marks a referral received at the recipient facility.
pub fn after_sync(engine: &mut Engine, doc: DocumentId) -> Result<()> {
    let Some(row) = engine.store().document(doc)? else {
        return Ok(());
    };
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
