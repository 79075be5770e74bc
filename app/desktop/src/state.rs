//! What the shell holds: the data directory, the unlocked engine, the signed-in staff member and
//! whether their session is locked, the open reception desk, and the sync task's handle. The
//! engine's store is the state; nothing here is the only copy of an edit.
//!
//! A session locks (画面ロック) when its staff member locks it or is idle for [`IdleLock::idle`]:
//! the UI notices the idle time and calls `lock_session`, and [`Unlocked::active_staff`] checks it
//! again at every staff command, so that a UI that failed to lock cannot keep a session open.
//! While locked, the staff member stays known and the desk stays loaded; every staff command is
//! refused with `session_locked` until someone signs in again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use musubi_crdt::audit::AuditAction;
use musubi_facility::Engine;
use musubi_facility::services::hq::World;
use musubi_facility::services::shelter::Desk;
use musubi_facility::staff::{Staff, StaffRole};

use crate::error::{AppError, AppResult, ErrorKind};
use crate::events::{SyncState, SyncStatus};

/// An unlocked device.
pub struct Unlocked {
    /// The engine for user commands (the sync task has its own handle on the same store).
    pub engine: Engine,
    /// Who is signed in; every change is attributed to them. Kept while the session is locked.
    pub staff: Option<Staff>,
    /// The reception desk, with its roster kept loaded for fast check-in.
    pub desk: Option<Desk>,
    /// Whether the signed-in staff member's session is locked (idle, or locked by them).
    pub locked: bool,
    /// When the UI last reported the signed-in staff member's input (or they signed in).
    pub last_active: Instant,
    /// The same, by the wall clock: a monotonic clock does not count the time a computer slept,
    /// so a laptop closed for an hour would otherwise wake with its session open.
    pub last_active_wall: std::time::SystemTime,
}

/// Why a session locked: the audit entry's field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum LockReason {
    /// Nobody used the app for the idle time (自動ロック).
    Idle,
    /// The staff member locked it (「画面をロック」).
    Manual,
}

impl LockReason {
    /// The audit entry's field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Manual => "manual",
        }
    }
}

impl Unlocked {
    /// A device just unlocked: nobody signed in.
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            staff: None,
            desk: None,
            locked: false,
            last_active: Instant::now(),
            last_active_wall: std::time::SystemTime::now(),
        }
    }

    /// Someone is at the computer now (the UI saw input, or they signed in).
    pub fn touch(&mut self) {
        self.last_active = Instant::now();
        self.last_active_wall = std::time::SystemTime::now();
    }

    /// How long since [`Self::touch`]: the longer of the monotonic and the wall clock's measure
    /// (a wall clock set back counts as no time).
    pub fn idle_for(&self) -> Duration {
        let wall = self.last_active_wall.elapsed().unwrap_or_default();
        self.last_active.elapsed().max(wall)
    }

    /// Locks the signed-in staff member's session, and records `lock` (with `why`) in the audit
    /// log. Nothing happens when nobody is signed in or the session is already locked. Locking
    /// always succeeds: when the entry cannot be written, the failure is logged.
    pub fn lock(&mut self, why: LockReason) {
        if self.locked || self.staff.is_none() {
            return;
        }
        self.locked = true;
        if let Err(e) =
            musubi_facility::audit::record(&self.engine, AuditAction::Lock, None, &[why.as_str()])
        {
            tracing::error!("could not record a session lock in the audit log: {e}");
        }
    }

    /// Locks the session when its last command is longer ago than `limit`; whether it is locked.
    pub fn lock_if_idle(&mut self, limit: Duration) -> bool {
        if !self.locked && self.staff.is_some() && self.idle_for() > limit {
            tracing::info!("the session was idle for longer than {limit:?}: locked");
            self.lock(LockReason::Idle);
        }
        self.locked
    }

    /// The signed-in staff member of an open session, whose command this is. A session idle for
    /// longer than `limit` is locked first. A command is not activity by itself (screens reload on
    /// sync events with no one there): only the UI's reports of a person's input
    /// (`session_touch`) and a sign-in are.
    ///
    /// Errors: [`ErrorKind::NotSignedIn`]; [`ErrorKind::SessionLocked`].
    pub fn active_staff(&mut self, limit: Duration) -> AppResult<Staff> {
        let staff = self
            .staff
            .clone()
            .ok_or_else(|| AppError::new(ErrorKind::NotSignedIn, "no staff member is signed in"))?;
        if self.lock_if_idle(limit) {
            return Err(AppError::new(
                ErrorKind::SessionLocked,
                "the session is locked; sign in again to go on",
            ));
        }
        Ok(staff)
    }
}

/// Default idle time before a session locks: 10 minutes.
pub const IDLE_LOCK_DEFAULT: Duration = Duration::from_secs(10 * 60);
/// The idle times an administrator may choose in 設定, in minutes.
pub const IDLE_LOCK_MINUTES: std::ops::RangeInclusive<u32> = 1..=60;
/// The environment variable that fixes the idle time, in seconds (1 to 3,600: never longer than an administrator may choose): for a deployment
/// that sets it centrally, and for tests. While set, 設定 shows it and cannot change it.
pub const IDLE_LOCK_ENV: &str = "MUSUBI_IDLE_LOCK_SECS";
/// The store's metadata key of the idle time an administrator chose (seconds, CBOR).
pub const IDLE_LOCK_META: &str = "desktop.idle_lock_secs";
/// Longest interval between the UI's activity reports (`session_touch`) while someone works.
pub const TOUCH_EVERY_MAX: Duration = Duration::from_secs(30);
/// Added to the idle time before the shell itself locks a session: IPC and timer delays.
pub const IDLE_GRACE: Duration = Duration::from_secs(5);

/// The idle lock in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleLock {
    /// How long without input before the UI locks the session.
    pub idle: Duration,
    /// Whether [`IDLE_LOCK_ENV`] fixes it.
    pub fixed: bool,
}

impl IdleLock {
    /// The idle time from [`IDLE_LOCK_ENV`], if it is set to a number of seconds in range.
    pub fn from_env() -> Option<Self> {
        let secs: u64 = std::env::var(IDLE_LOCK_ENV).ok()?.trim().parse().ok()?;
        (1..=3_600).contains(&secs).then(|| Self {
            idle: Duration::from_secs(secs),
            fixed: true,
        })
    }

    /// The idle lock for `engine`'s device: [`IDLE_LOCK_ENV`], else what an administrator chose,
    /// else [`IDLE_LOCK_DEFAULT`].
    pub fn load(engine: &Engine) -> Self {
        if let Some(fixed) = Self::from_env() {
            return fixed;
        }
        let chosen = engine
            .store()
            .meta_cbor::<u64>(IDLE_LOCK_META)
            .unwrap_or_else(|e| {
                tracing::warn!("the idle-lock setting cannot be read: {e}");
                None
            })
            .filter(|s| IDLE_LOCK_MINUTES.contains(&u32::try_from(s / 60).unwrap_or(0)));
        Self {
            idle: chosen.map_or(IDLE_LOCK_DEFAULT, Duration::from_secs),
            fixed: false,
        }
    }

    /// How often the UI reports activity while someone works: a quarter of the idle time, at most
    /// [`TOUCH_EVERY_MAX`].
    pub fn touch_every(&self) -> Duration {
        (self.idle / 4).min(TOUCH_EVERY_MAX)
    }

    /// How long after its last command the shell locks a session itself: the idle time, plus one
    /// activity report's interval and [`IDLE_GRACE`] (the UI locks first).
    pub fn limit(&self) -> Duration {
        self.idle + self.touch_every() + IDLE_GRACE
    }
}

/// The shell's state, shared by commands and background tasks.
pub struct Shared {
    /// The facility device's data directory.
    pub dir: PathBuf,
    /// Whether the sync task also syncs with facility devices on the LAN (mDNS).
    pub lan: bool,
    /// The device once unlocked.
    pub session: Mutex<Option<Unlocked>>,
    /// The last sync status sent to the UI.
    pub status: Mutex<SyncStatus>,
    /// Wakes the sync task to sync now.
    pub nudge: Arc<tokio::sync::Notify>,
    /// Whether the sync task runs.
    pub sync_started: Mutex<bool>,
    /// HQ's loaded view of every readable shelter (`hq::World::load` is the expensive part of
    /// every HQ screen). Dropped when the sync task reports a shelter document changed; reloaded
    /// when a bundle of any shelter was added since (`World::is_current`). Lock order: after
    /// `session`, never before it.
    pub hq: Mutex<Option<World>>,
    /// The card reader as last reported to the UI (see `card_task`).
    pub card: Mutex<crate::events::CardStatus>,
    /// Recent taps on this device (pseudonymous card id, card kind), newest last, at most
    /// `card_task::RECENT_TAPS_MAX`: check-in by card takes its method from here.
    pub taps: Mutex<std::collections::VecDeque<(String, musubi_facility::card::CardKind)>>,
    /// The idle lock in force (read from the store at unlock; an administrator may change it).
    pub idle_lock: Mutex<IdleLock>,
}

/// The managed state: cheap to clone into blocking tasks.
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl AppState {
    /// State for the device in `dir`.
    pub fn new(dir: PathBuf, lan: bool) -> Self {
        Self(Arc::new(Shared {
            dir,
            lan,
            session: Mutex::new(None),
            status: Mutex::new(SyncStatus {
                state: SyncState::NotJoined,
                pending: 0,
                last_sync_ms: None,
                lan_peers: 0,
                message: None,
                relay_behind: None,
                quarantined: Vec::new(),
                quarantined_total: 0,
                held_back: 0,
            }),
            nudge: Arc::new(tokio::sync::Notify::new()),
            sync_started: Mutex::new(false),
            hq: Mutex::new(None),
            card: Mutex::new(crate::events::CardStatus::starting()),
            taps: Mutex::new(std::collections::VecDeque::new()),
            idle_lock: Mutex::new(IdleLock::from_env().unwrap_or(IdleLock {
                idle: IDLE_LOCK_DEFAULT,
                fixed: false,
            })),
        }))
    }

    /// The idle lock in force.
    pub fn idle_lock(&self) -> IdleLock {
        *self.0.idle_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the idle lock in force.
    pub fn set_idle_lock(&self, lock: IdleLock) {
        *self.0.idle_lock.lock().unwrap_or_else(|p| p.into_inner()) = lock;
    }

    /// The login a card tap is read for now: the signed-in staff member's, while their session is
    /// open; `None` (do not read) while nobody is signed in or the session is locked.
    pub fn attending(&self) -> Option<String> {
        let limit = self.idle_lock().limit();
        let mut guard = self.session();
        let u = guard.as_mut()?;
        if u.lock_if_idle(limit) {
            return None;
        }
        u.staff.as_ref().map(|s| s.login.clone())
    }

    /// The HQ world cache (poisoning is ignored: the cache is only ever replaced whole).
    pub fn hq(&self) -> MutexGuard<'_, Option<World>> {
        self.0.hq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session lock (a poisoned lock means a command panicked mid-way; the store is still
    /// consistent, since each change is one transaction, so the guard is taken anyway).
    pub fn session(&self) -> MutexGuard<'_, Option<Unlocked>> {
        self.0.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the unlocked device, on a blocking thread (SQLite, scrypt, Automerge).
    ///
    /// Errors: [`ErrorKind::Locked`] before unlock; whatever `f` returns.
    pub async fn with_unlocked<T, F>(&self, f: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Unlocked) -> AppResult<T> + Send + 'static,
    {
        let me = self.clone();
        tauri::async_runtime::spawn_blocking(move || {
            let mut guard = me.session();
            let unlocked = guard.as_mut().ok_or_else(|| {
                AppError::new(
                    ErrorKind::Locked,
                    "the facility is locked; unlock it with its passphrase",
                )
            })?;
            f(unlocked)
        })
        .await
        .map_err(|e| AppError::new(ErrorKind::Internal, format!("the command stopped: {e}")))?
    }

    /// Runs `f` with the engine and the signed-in staff member (every change is theirs).
    ///
    /// Errors: [`ErrorKind::Locked`], [`ErrorKind::NotSignedIn`], [`ErrorKind::SessionLocked`];
    /// whatever `f` returns.
    pub async fn with_staff<T, F>(&self, f: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Engine, &Staff) -> AppResult<T> + Send + 'static,
    {
        self.with_signed_in(move |u, staff| f(&mut u.engine, staff))
            .await
    }

    /// Runs `f` on the unlocked device for the signed-in staff member of an open session (their
    /// command counts as activity; a session idle too long is locked and the command refused).
    ///
    /// Errors: [`ErrorKind::Locked`], [`ErrorKind::NotSignedIn`], [`ErrorKind::SessionLocked`];
    /// whatever `f` returns.
    pub async fn with_signed_in<T, F>(&self, f: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Unlocked, &Staff) -> AppResult<T> + Send + 'static,
    {
        let limit = self.idle_lock().limit();
        self.with_unlocked(move |u| {
            let staff = u.active_staff(limit)?;
            f(u, &staff)
        })
        .await
    }

    /// As [`Self::with_staff`], for an administrator only (the audit log, the idle-lock setting).
    ///
    /// Errors: as [`Self::with_staff`]; [`ErrorKind::AdminOnly`] for another staff member.
    pub async fn with_admin<T, F>(&self, f: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Engine, &Staff) -> AppResult<T> + Send + 'static,
    {
        self.with_staff(move |engine, staff| {
            if staff.role != StaffRole::Admin {
                return Err(AppError::new(
                    ErrorKind::AdminOnly,
                    "only an administrator of this device may do this",
                ));
            }
            f(engine, staff)
        })
        .await
    }

    /// Runs `f` on a blocking thread without the session (first-run work: creating keys).
    pub async fn blocking<T, F>(&self, f: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&AppState) -> AppResult<T> + Send + 'static,
    {
        let me = self.clone();
        tauri::async_runtime::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| AppError::new(ErrorKind::Internal, format!("the command stopped: {e}")))?
    }
}
