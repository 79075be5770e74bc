//! Trust, as the settings screen shows it: this facility's devices (add one with an invite, revoke a
//! lost one), every facility's safety number and trust state (confirm a changed root key), and the
//! deployment authority's fingerprint. The engine verifies; these commands only show and forward.

use std::time::Duration;

use musubi_crdt::directory::{DeviceChange, FacilityEntry, Trust, authority_fingerprint};
use musubi_crdt::ids::{DeviceId, FacilityId, FacilityRole};
use musubi_crdt::protocol::PushItem;
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::error::{AppError, AppResult};
use crate::state::AppState;

/// Digits in a safety number (six groups of five).
pub const SAFETY_NUMBER_DIGITS: usize = 30;

/// Longest lifetime of a device invite the UI may ask for, in hours (the engine's limit: 30 days).
pub const DEVICE_INVITE_HOURS_MAX: u32 = 30 * 24;

/// The fingerprint of a device's public keys, as its own settings screen shows it: BLAKE3 of the
/// Ed25519 key and the age recipient, first 16 bytes as eight groups of four hex digits.
pub fn device_fingerprint(device: &DeviceId, age_recipient: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&device.0.to_bytes());
    h.update(age_recipient.as_bytes());
    let digest = h.finalize();
    let hexed = hex::encode(&digest.as_bytes()[..16]);
    hexed
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A safety number as a person typed it (spaces or none, full-width digits from a Japanese input
/// method) in the engine's form: six groups of five ASCII digits.
///
/// Errors: `invalid_input` unless it is 30 digits.
pub fn normalize_safety_number(typed: &str) -> AppResult<String> {
    let mut digits = String::with_capacity(SAFETY_NUMBER_DIGITS);
    for c in typed.chars() {
        let d = match c {
            '0'..='9' => c,
            '０'..='９' => char::from_u32(u32::from(c) - u32::from('０') + u32::from('0'))
                .expect("a full-width digit maps to an ASCII digit"),
            ' ' | '　' | '-' | '\t' | '\n' | '\r' => continue,
            _ => {
                return Err(AppError::invalid(
                    "a safety number has only digits (six groups of five)",
                ));
            }
        };
        digits.push(d);
    }
    if digits.len() != SAFETY_NUMBER_DIGITS {
        return Err(AppError::invalid(format!(
            "a safety number has {SAFETY_NUMBER_DIGITS} digits; {} were typed",
            digits.len()
        )));
    }
    Ok(digits
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" "))
}

/// One device of this facility.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct FacilityDevice {
    /// The device id (libp2p PeerId of its Ed25519 key).
    pub device_id: String,
    /// Its key fingerprint: the one its own settings screen shows, to tell the laptops apart.
    pub fingerprint: String,
    /// Whether it is this device.
    pub is_self: bool,
    /// Revoked by the facility's chain or by the operator.
    pub revoked: bool,
    /// A revocation made here waits in the outbox for the relay.
    pub revoking: bool,
}

/// This facility's devices, in the order they were added, from the verified directory.
///
/// Errors: `locked`; `not_signed_in`; `session_locked`; `not_enrolled`.
#[tauri::command]
#[specta::specta]
pub async fn facility_devices(state: State<'_, AppState>) -> AppResult<Vec<FacilityDevice>> {
    state
        .with_signed_in(|u, _| {
            let me = u.engine.enrolment()?.facility;
            let dir = u.engine.directory()?;
            let this = u.engine.device_id();
            let revoking: Vec<DeviceId> = u
                .engine
                .store()
                .pending(0)?
                .into_iter()
                .filter_map(|row| match row.item {
                    PushItem::Approve { link, .. } if link.facility == me => match link.change {
                        DeviceChange::Revoke { device } => Some(device),
                        DeviceChange::Add { .. } => None,
                    },
                    _ => None,
                })
                .collect();
            Ok(dir
                .facility(me)
                .map(|f| {
                    f.devices
                        .iter()
                        .map(|d| FacilityDevice {
                            device_id: d.device.to_string(),
                            fingerprint: device_fingerprint(&d.device, &d.age_recipient),
                            is_self: d.device == this,
                            revoked: d.revoked,
                            revoking: !d.revoked && revoking.contains(&d.device),
                        })
                        .collect()
                })
                .unwrap_or_default())
        })
        .await
}

/// A code for one more device of this facility.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct DeviceInvite {
    /// The invite code (`musubi2...`), to hand over in person; it is a secret until used.
    pub code: String,
    /// When it stops working, in milliseconds since the Unix epoch.
    pub expires_at_ms: f64,
    /// This facility's name (what the new device's join screen will show).
    pub facility_name: String,
}

/// Makes an invite code for one more device of this facility, valid for `hours`, and wakes the sync
/// so the relay learns of it at once. It works once this device has synced; this device approves the
/// new device automatically at its next sync after the new device asked.
///
/// Errors: `invalid_input` (hours outside 1 to 720); `not_signed_in`; `admin_only` (an administrator
/// of this device only); `not_enrolled`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn device_invite(state: State<'_, AppState>, hours: u32) -> AppResult<DeviceInvite> {
    if hours == 0 || hours > DEVICE_INVITE_HOURS_MAX {
        return Err(AppError::invalid(format!(
            "an invite lasts 1 to {DEVICE_INVITE_HOURS_MAX} hours"
        )));
    }
    let invite = state
        .with_admin(move |engine, _| {
            let code = engine.device_invite(Duration::from_secs(u64::from(hours) * 3600))?;
            let facility_name = match &code.invite {
                musubi_crdt::invite::InviteFor::Device { facility_name, .. } => {
                    facility_name.clone()
                }
                musubi_crdt::invite::InviteFor::NewFacility { name, .. } => name.clone(),
            };
            Ok(DeviceInvite {
                code: code.encode(),
                expires_at_ms: code.expires_at_ms as f64,
                facility_name,
            })
        })
        .await?;
    state.0.nudge.notify_one();
    Ok(invite)
}

/// Revokes another device of this facility (a lost or stolen laptop): queues the revocation and the
/// key upkeep that follows (new keys for every document this facility writes), and wakes the sync.
/// The revoked device reads nothing written after; the facility's other devices keep working.
///
/// Errors: `invalid_input` (this device itself); `not_found` (not a device id, or not a current
/// device of this facility); `not_signed_in`; `admin_only`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn revoke_device(state: State<'_, AppState>, device: String) -> AppResult<()> {
    let device = device.trim().to_owned();
    state
        .with_admin(move |engine, _| {
            if engine.device_id().to_string() == device {
                return Err(AppError::invalid(
                    "this device cannot revoke itself; revoke it from another device of the facility",
                ));
            }
            engine.revoke_device(&device)?;
            engine.maintain()?;
            Ok(())
        })
        .await?;
    state.0.nudge.notify_one();
    Ok(())
}

/// How far a facility is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum TrustState {
    /// Certified by the authority with the root key seen first, its device chain as seen before.
    Verified,
    /// The authority certified another root key than the one seen first: its devices receive no
    /// document key until a person confirms the new safety number by phone (`confirm_root`).
    RootChanged,
    /// The relay served a device chain that does not extend the one seen before: what was seen
    /// stays, nothing new is taken.
    ChainForked,
}

/// A facility of the deployment with its safety number and trust state.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct FacilityTrust {
    /// Facility id.
    pub id: FacilityId,
    /// Its name as the authority certified it.
    pub name: String,
    /// What kind of facility it is.
    pub role: FacilityRole,
    /// Whether it is this facility.
    pub is_self: bool,
    /// Revoked by the operator.
    pub revoked: bool,
    /// How far it is trusted.
    pub trust: TrustState,
    /// The safety number of its root key (30 digits in six groups of five); null while its root key
    /// changed, since the person must hear the new one from the facility, not read it here.
    pub safety_number: Option<String>,
    /// When the root key changed: the safety number of the key seen first.
    pub pinned_safety_number: Option<String>,
    /// When its chain forked: why.
    pub problem: Option<String>,
    /// Its devices that are not revoked.
    pub devices: u32,
    /// Device chain links the relay served that were refused, with the reason.
    pub refused: Vec<String>,
}

/// A facility the relay listed without a valid certificate: left out, shown as a warning.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct IgnoredFacility {
    /// The facility id the relay gave.
    pub id: FacilityId,
    /// The name the relay gave.
    pub name: String,
    /// Why it was left out (English).
    pub reason: String,
}

/// The deployment as this device verified it.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct TrustDirectory {
    /// The fingerprint of the deployment authority pinned at join (30 digits in six groups of five),
    /// to compare with the one the municipality published.
    pub authority_fingerprint: String,
    /// Facilities whose certificate verifies: this one first, then by name.
    pub facilities: Vec<FacilityTrust>,
    /// Facilities the relay listed without a valid certificate.
    pub ignored: Vec<IgnoredFacility>,
}

fn facility_trust(f: &FacilityEntry, me: FacilityId) -> FacilityTrust {
    let (trust, pinned, problem) = match &f.trust {
        Trust::Verified => (TrustState::Verified, None, None),
        Trust::RootChanged { pinned } => (TrustState::RootChanged, Some(pinned.clone()), None),
        Trust::ChainForked { reason } => (TrustState::ChainForked, None, Some(reason.clone())),
    };
    FacilityTrust {
        id: f.id,
        name: f.name.clone(),
        role: f.role,
        is_self: f.id == me,
        revoked: f.revoked,
        trust,
        safety_number: (trust != TrustState::RootChanged).then(|| f.safety_number.clone()),
        pinned_safety_number: pinned,
        problem,
        devices: u32::try_from(f.devices.iter().filter(|d| !d.revoked).count()).unwrap_or(u32::MAX),
        refused: f.refused.clone(),
    }
}

/// Every facility with its safety number and trust state, the facilities left out, and the
/// deployment authority's fingerprint.
///
/// Errors: `locked`; `not_signed_in`; `session_locked`; `not_enrolled`.
#[tauri::command]
#[specta::specta]
pub async fn trust_directory(state: State<'_, AppState>) -> AppResult<TrustDirectory> {
    state
        .with_signed_in(|u, _| {
            let me = u.engine.enrolment()?.facility;
            let dir = u.engine.directory()?;
            let mut facilities: Vec<FacilityTrust> = dir
                .facilities
                .iter()
                .map(|f| facility_trust(f, me))
                .collect();
            facilities.sort_by(|a, b| b.is_self.cmp(&a.is_self).then_with(|| a.name.cmp(&b.name)));
            Ok(TrustDirectory {
                authority_fingerprint: authority_fingerprint(&dir.authority),
                facilities,
                ignored: dir
                    .ignored
                    .iter()
                    .map(|i| IgnoredFacility {
                        id: i.facility,
                        name: i.name.clone(),
                        reason: i.reason.clone(),
                    })
                    .collect(),
            })
        })
        .await
}

/// Accepts a facility's new root key after a person heard its safety number by phone from the
/// facility and typed it: the engine checks it against the new certificate, grants keys to the
/// facility's devices again, and the sync is woken to send them.
///
/// Errors: `invalid_input` (not 30 digits); `safety_number_mismatch`; `not_found` (no such
/// facility); `not_signed_in`; `admin_only`; `trust`.
#[tauri::command]
#[specta::specta]
pub async fn confirm_root(
    state: State<'_, AppState>,
    facility: FacilityId,
    safety_number: String,
) -> AppResult<()> {
    let typed = normalize_safety_number(&safety_number)?;
    state
        .with_admin(move |engine, _| Ok(engine.confirm_root(&facility.to_string(), &typed)?))
        .await?;
    state.0.nudge.notify_one();
    Ok(())
}
