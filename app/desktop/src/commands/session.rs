//! First run, unlock, joining a deployment, staff accounts, sign-in (password, or staff card and
//! PIN), and the session lock (画面ロック: idle, or by the staff member).

use std::time::Duration;

use musubi_crdt::audit::AuditAction;
use musubi_crdt::crypto::{self, PASSPHRASE_LOG_N_DEFAULT};
use musubi_crdt::directory::authority_fingerprint;
use musubi_crdt::ids::FacilityRole;
use musubi_crdt::invite::{InviteCode, InviteFor};
use musubi_facility::Engine;
use musubi_facility::card::{Pin, PinKind, ReadOptions};
use musubi_facility::engine::{Joined, now_ms, weak_kdf_for_tests};
use musubi_facility::staff::{self, Staff, StaffRole};
use serde::{Deserialize, Serialize};
use tauri::{AppHandle, State};

use crate::error::{AppError, AppResult, ErrorKind};
use crate::state::{AppState, IDLE_LOCK_META, IDLE_LOCK_MINUTES, IdleLock, LockReason, Unlocked};
use crate::sync_task;

/// Shortest passphrase accepted for a new facility, in characters (the engine's rule).
pub const PASSPHRASE_CHARS_MIN: usize = crypto::PASSPHRASE_CHARS_MIN;

/// How long one join attempt waits for the relay's answer (a pending join is asked again by the UI).
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
    /// A staff member is signed in but their session is locked (idle, or locked by them): the lock
    /// screen covers the work screens, which stay as they were for the same staff member.
    SessionLocked,
}

/// The idle lock as the UI applies it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct IdleLockSetting {
    /// How long without input before the UI locks the session, in milliseconds.
    pub idle_ms: f64,
    /// How often the UI reports activity (`session_touch`) while someone works, in milliseconds:
    /// the shell itself locks a session whose last command is older than the idle time plus this.
    pub touch_every_ms: f64,
    /// Whether `MUSUBI_IDLE_LOCK_SECS` fixes it (設定 cannot change it then).
    pub fixed: bool,
}

impl From<IdleLock> for IdleLockSetting {
    fn from(l: IdleLock) -> Self {
        Self {
            idle_ms: l.idle.as_millis() as f64,
            touch_every_ms: l.touch_every().as_millis() as f64,
            fixed: l.fixed,
        }
    }
}

/// What the shell knows before any screen is drawn.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct AppStatus {
    /// Which screen to show.
    pub phase: Phase,
    /// This facility's name (known once unlocked).
    pub facility_name: Option<String>,
    /// This facility's role in the deployment (known once joined).
    pub facility_role: Option<FacilityRole>,
    /// The signed-in staff member (also while their session is locked).
    pub staff: Option<Staff>,
    /// The data directory (shown in settings and in error help).
    pub data_dir: String,
    /// The idle lock in force.
    pub idle_lock: IdleLockSetting,
    /// Whether this device requires 二要素認証: a staff card and its PIN sign in, a password alone
    /// does not (an administrator turns it on with `musubi staff two-factor on`).
    pub two_factor: bool,
}

fn phase_of(state: &AppState) -> AppResult<AppStatus> {
    let idle = state.idle_lock();
    let mut guard = state.session();
    let data_dir = state.0.dir.display().to_string();
    let idle_lock = IdleLockSetting::from(idle);
    let Some(u) = guard.as_mut() else {
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
            idle_lock,
            two_factor: false,
        });
    };
    let enrolment = u.engine.enrolment().ok();
    let phase = if enrolment.is_none() {
        Phase::NotJoined
    } else if u.staff.is_some() && u.lock_if_idle(idle.limit()) {
        Phase::SessionLocked
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
        idle_lock,
        two_factor: staff::two_factor_required(&u.engine)?,
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
            st.set_idle_lock(IdleLock::load(&engine));
            *st.session() = Some(Unlocked::new(engine));
            phase_of(st)
        })
        .await
}

/// The scrypt work factor for new facilities: 18, or `MUSUBI_SCRYPT_LOG_N` (16–22; down to 10 only
/// when a test harness also sets `MUSUBI_WEAK_KDF_FOR_TESTS=1`).
fn log_n() -> u8 {
    std::env::var("MUSUBI_SCRYPT_LOG_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| crypto::check_work_factor(n, weak_kdf_for_tests()).is_ok())
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
                st.set_idle_lock(IdleLock::load(&engine));
                *st.session() = Some(Unlocked::new(engine));
            }
            phase_of(st)
        })
        .await?;
    if status.phase != Phase::NotJoined {
        sync_task::start(app, state.inner().clone());
    }
    Ok(status)
}

/// What an invite code enrols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum InviteKind {
    /// A new facility (新しい施設の登録), from the municipality's operator (`musubi-node invite`);
    /// the deployment authority approves it.
    NewFacility,
    /// One more device of an existing facility (この施設の端末の追加), from a current device of it
    /// (`musubi device invite`, or 設定 →「端末を追加」); that device approves it at its next sync.
    Device,
}

/// What a pasted invite code says, shown before joining so the person can check it.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct InvitePreview {
    /// What the code enrols.
    pub kind: InviteKind,
    /// The facility: the new one's name, or the one this device will join.
    pub facility_name: String,
    /// The new facility's role (null for a device invite: the facility's certificate says).
    pub role: Option<FacilityRole>,
    /// The deployment authority's fingerprint (30 digits in six groups of five): the person compares
    /// it with the one the municipality published before joining; the device pins this authority.
    pub authority_fingerprint: String,
    /// When the code stops working, in milliseconds since the Unix epoch.
    pub expires_at_ms: f64,
}

/// Reads an invite code without using it (no network): what it enrols and whom it trusts.
///
/// Errors: `bad_invite` (not an invite code); `invite_expired`.
pub fn preview_invite(text: &str, now_ms: u64) -> AppResult<InvitePreview> {
    let code =
        InviteCode::decode(text).map_err(|e| AppError::new(ErrorKind::BadInvite, e.to_string()))?;
    if code.expires_at_ms <= now_ms {
        return Err(AppError::new(
            ErrorKind::InviteExpired,
            "this invite has expired; ask whoever gave it for a new one",
        ));
    }
    let (kind, facility_name, role) = match &code.invite {
        InviteFor::NewFacility { name, role } => {
            (InviteKind::NewFacility, name.clone(), Some(*role))
        }
        InviteFor::Device { facility_name, .. } => {
            (InviteKind::Device, facility_name.clone(), None)
        }
    };
    Ok(InvitePreview {
        kind,
        facility_name,
        role,
        authority_fingerprint: authority_fingerprint(&code.authority),
        expires_at_ms: code.expires_at_ms as f64,
    })
}

/// What a pasted invite code enrols and the authority's fingerprint, before joining (no network).
///
/// Errors: `bad_invite` (empty, or not an invite code); `invite_expired`.
#[tauri::command]
#[specta::specta]
pub async fn invite_preview(
    state: State<'_, AppState>,
    invite: String,
) -> AppResult<InvitePreview> {
    state
        .blocking(move |_| preview_invite(invite.trim(), now_ms()))
        .await
}

/// A join request that waits for the inviter's approval.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct JoinPending {
    /// Who approves: for a device invite, the inviting device at its next sync; for a new facility,
    /// the deployment authority.
    pub kind: InviteKind,
    /// When the invite (and so the request) expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: f64,
}

/// What joining came to.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct JoinAnswer {
    /// Where the app stands now (`not_joined` while pending).
    pub status: AppStatus,
    /// Set while the request waits for approval: call `join` again with the same code to finish.
    pub pending: Option<JoinPending>,
}

/// Joins a deployment with an invite code (`musubi2...`) handed over in person: sends this device's
/// join request with its proof of the code's secret. When the inviter has approved (the embedded
/// authority approves a new facility at once), verifies the directory against the authority the code
/// names, records the enrolment and starts syncing; otherwise answers `pending` at once, and the same
/// code asked again later finishes the join.
///
/// Errors: `bad_invite` (not an invite code); `invite_expired`; `invite_refused` (unknown at the
/// relay, used, taken by another device, or an approval that does not verify); `unreachable`
/// (no answer within 20 s); `already_enrolled`; `locked`.
#[tauri::command]
#[specta::specta]
pub async fn join(
    app: AppHandle,
    state: State<'_, AppState>,
    invite: String,
) -> AppResult<JoinAnswer> {
    let code = invite.trim().to_owned();
    if code.is_empty() {
        return Err(AppError::new(
            ErrorKind::BadInvite,
            "the invite code is empty",
        ));
    }
    let preview = preview_invite(&code, now_ms())?;
    let answer = state
        .blocking(move |st| {
            let mut guard = st.session();
            let u = guard
                .as_mut()
                .ok_or_else(|| AppError::new(ErrorKind::Locked, "the facility is locked"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AppError::new(ErrorKind::Internal, e.to_string()))?;
            let joined = rt.block_on(musubi_facility::net::join(
                &mut u.engine,
                &code,
                JOIN_TIMEOUT,
                false,
            ))?;
            drop(guard);
            let pending = match joined {
                Joined::Enrolled(_) => None,
                Joined::Pending { expires_at_ms } => Some(JoinPending {
                    kind: preview.kind,
                    expires_at_ms: expires_at_ms as f64,
                }),
            };
            Ok(JoinAnswer {
                status: phase_of(st)?,
                pending,
            })
        })
        .await?;
    if answer.pending.is_none() {
        sync_task::start(app, state.inner().clone());
    }
    Ok(answer)
}

/// Creates a staff account on this device with `role` (default 職員). The first account can be
/// created without signing in (first run) and is the device's administrator whatever `role` says;
/// later ones are added by a signed-in administrator.
///
/// Errors: `invalid_input` (login taken or malformed, password too short); `not_signed_in`;
/// `session_locked`; `admin_only`.
#[tauri::command]
#[specta::specta]
pub async fn create_staff(
    state: State<'_, AppState>,
    login: String,
    name: String,
    password: String,
    role: Option<StaffRole>,
) -> AppResult<Staff> {
    let limit = state.idle_lock().limit();
    state
        .with_unlocked(move |u| {
            if !staff::list(&u.engine)?.is_empty() {
                if u.staff.is_none() {
                    return Err(AppError::new(
                        ErrorKind::NotSignedIn,
                        "sign in to add staff accounts",
                    ));
                }
                if u.active_staff(limit)?.role != StaffRole::Admin {
                    return Err(AppError::new(
                        ErrorKind::AdminOnly,
                        "only an administrator of this device adds staff accounts",
                    ));
                }
            }
            Ok(staff::create(
                &u.engine,
                login.trim(),
                name.trim(),
                &password,
                role.unwrap_or_default(),
            )?)
        })
        .await
}

/// The staff accounts of this device, for a signed-in staff member only (logins are what a
/// password guesser needs first).
///
/// Errors: `locked`; `not_signed_in`; `session_locked`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn list_staff(state: State<'_, AppState>) -> AppResult<Vec<Staff>> {
    state.with_staff(|engine, _| Ok(staff::list(engine)?)).await
}

/// How a staff member signed in: the `sign-in` entry's field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignInMethod {
    /// Login and password.
    Password,
    /// Staff card and PIN.
    Card,
}

/// Starts `who`'s session at `u` (their identity already checked): the same staff member signing
/// in to a locked session goes on where they were (desk and screens kept); anyone else replaces
/// the session, whose staff member is recorded as signed out, and starts afresh. Records `sign-in`.
///
/// Errors: `storage` (and `trust`, for a broken log) when the sign-in cannot be recorded: the
/// session is then not started (no entry, no session).
pub fn start_session(
    state: &AppState,
    u: &mut Unlocked,
    who: &Staff,
    method: SignInMethod,
) -> AppResult<()> {
    let same = u.staff.as_ref().is_some_and(|s| s.id == who.id);
    if !same {
        if u.staff.is_some() {
            staff::sign_out_session(&mut u.engine)?;
        }
        u.desk = None;
        *state.hq() = None;
    }
    u.engine.set_staff(Some(who.login.clone()));
    let field = match method {
        SignInMethod::Password => "password",
        SignInMethod::Card => "card",
    };
    if let Err(e) = musubi_facility::audit::record(&u.engine, AuditAction::SignIn, None, &[field]) {
        u.engine
            .set_staff(u.staff.as_ref().map(|s| s.login.clone()));
        return Err(e.into());
    }
    u.staff = Some(who.clone());
    u.locked = false;
    u.touch();
    Ok(())
}

/// Signs a staff member in with their own password; every change from now on is attributed to them.
/// On a locked session, the same staff member goes on where they were; another one starts afresh.
///
/// Errors: `bad_credentials`; `sign_in_locked` (too many wrong passwords: `retry_after_s`);
/// `card_required` (this device requires 二要素認証); `locked`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn sign_in(
    state: State<'_, AppState>,
    login: String,
    password: String,
) -> AppResult<Staff> {
    let st = state.inner().clone();
    state
        .with_unlocked(move |u| {
            let who = staff::sign_in_password(&u.engine, login.trim(), &password)?;
            start_session(&st, u, &who, SignInMethod::Password)?;
            Ok(who)
        })
        .await
}

/// How long a card sign-in waits for a card on the reader.
pub const CARD_SIGN_IN_WAIT: Duration = Duration::from_secs(20);

/// Signs a staff member in with their staff card and its PIN (the second factor): waits up to
/// [`CARD_SIGN_IN_WAIT`] for a card on the reader (one already there counts). A My Number card
/// proves possession with `pin` as its user-authentication PIN (4 digits; never sent with only one
/// try left); a contactless card's `pin` is its Musubi staff PIN (4 to 8 digits). The card is read
/// in the staff cards' sector. On a locked session, as [`sign_in`].
///
/// Errors: `no_card`; `unknown_card` (not bound to an account here); `wrong_pin` (`tries_left`);
/// `pin_locked`; `invalid_input` (the PIN's form); `card` (no reader or service, an unreadable
/// card, no possession proof); `locked`; `not_enrolled`.
#[tauri::command]
#[specta::specta]
pub async fn sign_in_card(state: State<'_, AppState>, pin: String) -> AppResult<Staff> {
    let pin = pin.trim().to_owned();
    if !staff::STAFF_PIN_DIGITS.contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AppError::invalid("a PIN is 4 to 8 digits"));
    }
    // Waiting for the card uses a handle of its own, so the session is not held meanwhile.
    let engine = state.with_unlocked(|u| Ok(u.engine.try_clone()?)).await?;
    let who = state
        .blocking(move |_| {
            let opts = ReadOptions {
                timeout: CARD_SIGN_IN_WAIT,
                ..ReadOptions::default()
            };
            let card_pin = pin.clone();
            let prompt = move |which: PinKind, _tries_left: u8| -> Option<Pin> {
                (which == PinKind::UserAuthentication)
                    .then(|| Pin::new(&card_pin).ok())
                    .flatten()
            };
            Ok(staff::sign_in_with_card(
                &engine,
                &opts,
                Box::new(prompt),
                // The engine keeps it zeroized from here on.
                move || Some(pin.into()),
            )?)
        })
        .await?;
    let st = state.inner().clone();
    state
        .with_unlocked(move |u| {
            start_session(&st, u, &who, SignInMethod::Card)?;
            Ok(who)
        })
        .await
}

/// Locks the signed-in staff member's session (`idle`: the UI saw no input for the idle time;
/// `manual`: 「画面をロック」) and records `lock`. The staff member stays known and the desk stays
/// loaded; every staff command is refused with `session_locked` until someone signs in again.
/// Returns where the app stands (`session_locked`, or unchanged when nobody is signed in).
///
/// Errors: `locked`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn lock_session(state: State<'_, AppState>, reason: LockReason) -> AppResult<AppStatus> {
    state
        .blocking(move |st| {
            if let Some(u) = st.session().as_mut() {
                u.lock(reason);
            }
            phase_of(st)
        })
        .await
}

/// The UI saw input (typing, a click) since its last report: the session stays open. Sent at most
/// every `idle_lock.touch_every_ms` while someone works, so that the shell's own idle check does
/// not lock a session whose staff member is typing a long text.
///
/// Errors: `not_signed_in`; `session_locked` (the session was idle too long, or is locked).
#[tauri::command]
#[specta::specta]
pub async fn session_touch(state: State<'_, AppState>) -> AppResult<()> {
    state
        .with_signed_in(|u, _| {
            u.touch();
            Ok(())
        })
        .await
}

/// Sets the idle time before a session locks (自動ロック), in minutes (1 to 60), for every staff
/// member of this device; an administrator's choice, kept in the store and recorded as
/// `staff-change` (`idle-lock:Nmin`).
///
/// Errors: `invalid_input` (out of range, or fixed by `MUSUBI_IDLE_LOCK_SECS`); `admin_only`;
/// `not_signed_in`; `session_locked`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn set_idle_lock(state: State<'_, AppState>, minutes: u32) -> AppResult<IdleLockSetting> {
    if !IDLE_LOCK_MINUTES.contains(&minutes) {
        return Err(AppError::invalid(format!(
            "the idle time is {} to {} minutes",
            IDLE_LOCK_MINUTES.start(),
            IDLE_LOCK_MINUTES.end()
        )));
    }
    if state.idle_lock().fixed {
        return Err(AppError::invalid(format!(
            "the idle time is fixed by {} for this computer",
            crate::state::IDLE_LOCK_ENV
        )));
    }
    let st = state.inner().clone();
    state
        .with_admin(move |engine, _| {
            engine
                .store()
                .set_meta_cbor(IDLE_LOCK_META, &(u64::from(minutes) * 60))?;
            // A device's security setting, recorded as 二要素認証's is (`staff-change`).
            musubi_facility::audit::record(
                engine,
                AuditAction::StaffChange,
                None,
                &[&format!("idle-lock:{minutes}min")],
            )?;
            let lock = IdleLock {
                idle: Duration::from_secs(u64::from(minutes) * 60),
                fixed: false,
            };
            st.set_idle_lock(lock);
            Ok(IdleLockSetting::from(lock))
        })
        .await
}

/// Signs the staff member out (the device stays unlocked for the next one), also from a locked
/// session.
#[tauri::command]
#[specta::specta]
pub async fn sign_out(state: State<'_, AppState>) -> AppResult<()> {
    state
        .with_unlocked(|u| {
            staff::sign_out_session(&mut u.engine)?;
            u.staff = None;
            u.desk = None;
            u.locked = false;
            Ok(())
        })
        .await?;
    *state.hq() = None;
    Ok(())
}
