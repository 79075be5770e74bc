//! The IPC commands: each one a thin call into `musubi-facility`, run on a blocking thread, its
//! error mapped to [`crate::error::AppError`].
//!
//! Every command that reads or changes documents, or shows the device's facilities, devices and
//! settings, runs for the signed-in staff member of an open session
//! ([`crate::state::AppState::with_staff`]): besides the errors each one lists, it fails with
//! `locked` before unlock, `not_signed_in` before sign-in and `session_locked` while the session
//! is locked (or was idle for longer than the idle lock allows).

pub mod audit;
pub mod card;
pub mod careplan;
pub mod hq;
pub mod referral;
pub mod session;
pub mod shelter;
pub mod sync;
pub mod trust;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use musubi_crdt::audit::AuditAction;
use musubi_crdt::ids::DocumentId;
use musubi_facility::Engine;

/// How long one staff member's repeated look at the same view (the same document and fields) is
/// one audit entry: views the shell answers from its caches (the reception desk's roster and
/// searches, HQ's summary and history) are asked again at every sync event.
pub const VIEW_RECORD_COALESCE: Duration = Duration::from_secs(300);

type ViewKey = (Option<String>, Option<DocumentId>, Vec<String>);

static RECENT_VIEWS: Mutex<BTreeMap<ViewKey, Instant>> = Mutex::new(BTreeMap::new());

/// Records a `read` of `doc` touching `fields` by the staff member signed in at `engine`, unless
/// they were recorded looking at the same within [`VIEW_RECORD_COALESCE`]. Called before the view
/// is returned: no entry, no view.
///
/// Errors: the audit log's (`storage`, or `trust` when the log is broken).
pub(crate) fn record_view(
    engine: &Engine,
    doc: Option<DocumentId>,
    fields: &[&str],
) -> crate::error::AppResult<()> {
    let key: ViewKey = (
        engine.staff().map(str::to_owned),
        doc,
        fields.iter().map(|f| (*f).to_owned()).collect(),
    );
    let now = Instant::now();
    {
        let recent = RECENT_VIEWS.lock().unwrap_or_else(|p| p.into_inner());
        if recent
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < VIEW_RECORD_COALESCE)
        {
            return Ok(());
        }
    }
    musubi_facility::audit::record(engine, AuditAction::Read, doc, fields)?;
    let mut recent = RECENT_VIEWS.lock().unwrap_or_else(|p| p.into_inner());
    if recent.len() > 4096 {
        recent.retain(|_, t| now.duration_since(*t) < VIEW_RECORD_COALESCE);
        // Still full (more distinct records within the window): forget them all; at worst a view
        // is recorded twice, never the map unbounded.
        if recent.len() > 4096 {
            recent.clear();
        }
    }
    recent.insert(key, now);
    Ok(())
}
