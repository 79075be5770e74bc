//! First run, unlock, joining a deployment, staff accounts and sign-in.

use std::time::Duration;

use musubi_crdt::crypto::PASSPHRASE_LOG_N_DEFAULT;
use musubi_facility::Engine;
use musubi_facility::staff::{self, Staff};
use serde::{Deserialize, Serialize};
use tauri::{AppHandle, State};

use crate::error::{AppError, AppResult, ErrorKind};
use crate::state::{AppState, Unlocked};
use crate::sync_task;

/// Shortest passphrase accepted for a new facility, in characters.
pub const PASSPHRASE_CHARS_MIN: usize = 8;

/// How long joining waits for the relay's answer.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the app stands, which decides the screen shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No facility on this computer: the first-run screen (name, passphrase).
    New,
    /// A facility exists: unlock it with its passphrase.
    Locked,
    /// Unlocked but not part of a deployment: paste the invite code.
    NotJoined,
    /// Joined, but no staff account exists yet: create the first one.
    NoStaff,
    /// Staff accounts exist; nobody is signed in.
    SignedOut,
    /// A staff member is signed in: the work screens.
    Ready,
}

/// What the shell knows before any screen is drawn.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct AppStatus {
    /// Which screen to show.
    pub phase: Phase,
    /// This facility's name (known once unlocked).
    pub facility_name: Option<String>,
    /// This facility's role in the deployment (known once joined).
    pub facility_role: Option<musubi_crdt::ids::FacilityRole>,
    /// The signed-in staff member.
    pub staff: Option<Staff>,
    /// The data directory (shown in settings and in error help).
    pub data_dir: String,
}

fn phase_of(state: &AppState) -> AppResult<AppStatus> {
    let guard = state.session();
    let data_dir = state.0.dir.display().to_string();
    let Some(u) = guard.as_ref() else {
        let phase = if state.0.dir.join(musubi_facility::engine::KEY_FILE).exists() {
            Phase::Locked
        } else {
            Phase::New
        };
        return Ok(AppStatus {
            phase,
            facility_name: None,
            facility_role: None,
            staff: None,
            data_dir,
        });
    };
    let enrolment = u.engine.enrolment().ok();
    let phase = if enrolment.is_none() {
        Phase::NotJoined
    } else if u.staff.is_some() {
        Phase::Ready
    } else if staff::list(&u.engine)?.is_empty() {
        Phase::NoStaff
    } else {
        Phase::SignedOut
    };
    Ok(AppStatus {
        phase,
        facility_name: Some(
            enrolment
                .as_ref()
                .map(|e| e.facility_name.clone())
                .map_or_else(|| u.engine.local_name(), Ok)?,
        ),
        facility_role: enrolment.map(|e| e.role),
        staff: u.staff.clone(),
        data_dir,
    })
}

/// Where the app stands: which screen to show, the facility and the signed-in staff member.
///
/// Errors: `storage` when the store cannot be read.
#[tauri::command]
#[specta::specta]
pub async fn app_status(state: State<'_, AppState>) -> AppResult<AppStatus> {
    state.blocking(phase_of).await
}

/// First run: creates this computer's facility device, its keys wrapped by `passphrase`
/// (age scrypt, work factor 2^18: about a second), and unlocks it.
///
/// Errors: `invalid_input` for an empty name or a passphrase shorter than 8 characters;
/// `already_initialised`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn create_facility(
    state: State<'_, AppState>,
    name: String,
    passphrase: String,
) -> AppResult<AppStatus> {
    let name = name.trim().to_owned();
    if name.is_empty() {
        return Err(AppError::invalid("the facility name is empty"));
    }
    if passphrase.chars().count() < PASSPHRASE_CHARS_MIN {
        return Err(AppError::invalid(format!(
            "the passphrase is shorter than {PASSPHRASE_CHARS_MIN} characters"
        )));
    }
    state
        .blocking(move |st| {
            let engine = Engine::init(&st.0.dir, &name, &passphrase, log_n())?;
            *st.session() = Some(Unlocked {
                engine,
                staff: None,
                desk: None,
            });
            phase_of(st)
        })
        .await
}

/// The scrypt work factor for new facilities: `MUSUBI_SCRYPT_LOG_N` (10–22, for tests) or 18.
fn log_n() -> u8 {
    std::env::var("MUSUBI_SCRYPT_LOG_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (10..=22).contains(n))
        .unwrap_or(PASSPHRASE_LOG_N_DEFAULT)
}

/// Unlocks the facility with its passphrase and starts syncing (when joined).
///
/// Errors: `wrong_passphrase`; `not_initialised`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn unlock(
    app: AppHandle,
    state: State<'_, AppState>,
    passphrase: String,
) -> AppResult<AppStatus> {
    let status = state
        .blocking(move |st| {
            if st.session().is_none() {
                let engine = Engine::open(&st.0.dir, &passphrase)?;
                *st.session() = Some(Unlocked {
                    engine,
                    staff: None,
                    desk: None,
                });
            }
            phase_of(st)
        })
        .await?;
    if status.phase != Phase::NotJoined {
        sync_task::start(app, state.inner().clone());
    }
    Ok(status)
}

/// Joins a deployment with the invite code the relay operator gave (`musubi1...`): asks the relay,
/// records the enrolment and starts syncing.
///
/// Errors: `bad_invite` (malformed, expired, used, refused); `unreachable` (relay not reachable
/// within 20 s); `locked`.
#[tauri::command]
#[specta::specta]
pub async fn join(
    app: AppHandle,
    state: State<'_, AppState>,
    invite: String,
) -> AppResult<AppStatus> {
    let code = invite.trim().to_owned();
    if code.is_empty() {
        return Err(AppError::new(
            ErrorKind::BadInvite,
            "the invite code is empty",
        ));
    }
    let status = state
        .blocking(move |st| {
            let mut guard = st.session();
            let u = guard
                .as_mut()
                .ok_or_else(|| AppError::new(ErrorKind::Locked, "the facility is locked"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AppError::new(ErrorKind::Internal, e.to_string()))?;
            rt.block_on(musubi_facility::net::join(
                &mut u.engine,
                &code,
                JOIN_TIMEOUT,
            ))?;
            drop(guard);
            phase_of(st)
        })
        .await?;
    sync_task::start(app, state.inner().clone());
    Ok(status)
}

/// Creates a staff account on this device. The first account can be created without signing in
/// (first run); later ones need a signed-in staff member.
///
/// Errors: `invalid_input` (login taken or malformed, password too short); `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn create_staff(
    state: State<'_, AppState>,
    login: String,
    name: String,
    password: String,
) -> AppResult<Staff> {
    state
        .with_unlocked(move |u| {
            if u.staff.is_none() && !staff::list(&u.engine)?.is_empty() {
                return Err(AppError::new(
                    ErrorKind::NotSignedIn,
                    "sign in to add staff accounts",
                ));
            }
            Ok(staff::create(
                &u.engine,
                login.trim(),
                name.trim(),
                &password,
            )?)
        })
        .await
}

/// The staff accounts of this device.
///
/// Errors: `locked`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn list_staff(state: State<'_, AppState>) -> AppResult<Vec<Staff>> {
    state.with_unlocked(|u| Ok(staff::list(&u.engine)?)).await
}

/// Signs a staff member in with their own password; every change from now on is attributed to them.
///
/// Errors: `bad_credentials`; `locked`.
#[tauri::command]
#[specta::specta]
pub async fn sign_in(
    state: State<'_, AppState>,
    login: String,
    password: String,
) -> AppResult<Staff> {
    state
        .with_unlocked(move |u| {
            let who = staff::sign_in_password(&u.engine, login.trim(), &password)?;
            u.staff = Some(who.clone());
            Ok(who)
        })
        .await
}

/// Signs the staff member out (the device stays unlocked for the next one).
#[tauri::command]
#[specta::specta]
pub async fn sign_out(state: State<'_, AppState>) -> AppResult<()> {
    state
        .with_unlocked(|u| {
            u.staff = None;
            u.desk = None;
            Ok(())
        })
        .await?;
    *state.hq() = None;
    Ok(())
}
