//! Sync state, "sync now", settings and the deployment's directory.

use musubi_crdt::ids::{FacilityId, FacilityRole};
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::error::AppResult;
use crate::events::SyncStatus;
use crate::state::AppState;

/// The current sync status (the same value the `SyncStatus` event carries).
#[tauri::command]
#[specta::specta]
pub async fn sync_status(state: State<'_, AppState>) -> AppResult<SyncStatus> {
    Ok(state
        .0
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone())
}

/// Syncs now: dials the relay at once if it is out of reach (instead of waiting out the backoff),
/// else asks it for the document list again; offers documents to LAN peers.
#[tauri::command]
#[specta::specta]
pub async fn sync_now(state: State<'_, AppState>) -> AppResult<()> {
    state.0.nudge.notify_one();
    Ok(())
}

/// What the settings screen shows.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct Settings {
    /// This facility's name.
    pub facility_name: String,
    /// This facility's id in the deployment (null before joining).
    pub facility_id: Option<FacilityId>,
    /// Its role (null before joining).
    pub facility_role: Option<FacilityRole>,
    /// This device's id (libp2p PeerId of its Ed25519 key).
    pub device_id: String,
    /// Fingerprint of this device's public keys (BLAKE3 of the Ed25519 key and the age recipient,
    /// first 16 bytes as eight groups of four hex digits), to read out to the operator.
    pub fingerprint: String,
    /// The relay's device id (null before joining).
    pub relay_id: Option<String>,
    /// The relay's addresses (multiaddrs).
    pub relay_addrs: Vec<String>,
    /// Whether this device also syncs directly with facility devices on the LAN.
    pub lan: bool,
    /// The data directory.
    pub data_dir: String,
    /// The app's version.
    pub version: String,
}

/// The settings screen's facts.
///
/// Errors: `locked`; `not_signed_in`; `session_locked`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn settings(state: State<'_, AppState>) -> AppResult<Settings> {
    let lan = state.0.lan;
    state
        .with_signed_in(move |u, _| {
            let public = u.engine.secrets().public();
            let fingerprint =
                crate::commands::trust::device_fingerprint(&public.device, &public.age_recipient);
            let enrolment = u.engine.enrolment().ok();
            Ok(Settings {
                facility_name: match &enrolment {
                    Some(e) => e.facility_name.clone(),
                    None => u.engine.local_name()?,
                },
                facility_id: enrolment.as_ref().map(|e| e.facility),
                facility_role: enrolment.as_ref().map(|e| e.role),
                device_id: public.device.to_string(),
                fingerprint,
                relay_id: enrolment.as_ref().map(|e| e.relay.to_string()),
                relay_addrs: enrolment.map(|e| e.relay_addrs).unwrap_or_default(),
                lan,
                data_dir: u.engine.dir().display().to_string(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
        })
        .await
}

/// A facility of the deployment, for pickers (recipient of a letter, members of a plan).
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct FacilityChoice {
    /// Facility id.
    pub id: FacilityId,
    /// Its name as the operator enrolled it.
    pub name: String,
    /// What kind of facility it is.
    pub role: FacilityRole,
    /// Whether it is this facility.
    pub is_self: bool,
}

/// The facilities of the deployment (not revoked), from the relay-signed directory, by name.
///
/// Errors: `locked`; `not_signed_in`; `session_locked`; `not_enrolled`.
#[tauri::command]
#[specta::specta]
pub async fn facilities(state: State<'_, AppState>) -> AppResult<Vec<FacilityChoice>> {
    state
        .with_signed_in(|u, _| {
            let me = u.engine.enrolment()?.facility;
            let dir = u.engine.directory()?;
            let mut out: Vec<FacilityChoice> = dir
                .facilities
                .iter()
                .filter(|f| !f.revoked)
                .map(|f| FacilityChoice {
                    id: f.id,
                    name: f.name.clone(),
                    role: f.role,
                    is_self: f.id == me,
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
}
