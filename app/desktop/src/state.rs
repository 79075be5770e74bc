//! What the shell holds: the data directory, the unlocked engine, the signed-in staff member, the
//! open reception desk, and the sync task's handle. The engine's store is the state; nothing here
//! is the only copy of an edit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use musubi_facility::Engine;
use musubi_facility::services::hq::World;
use musubi_facility::services::shelter::Desk;
use musubi_facility::staff::Staff;

use crate::error::{AppError, AppResult, ErrorKind};
use crate::events::{SyncState, SyncStatus};

/// An unlocked device.
pub struct Unlocked {
    /// The engine for user commands (the sync task has its own handle on the same store).
    pub engine: Engine,
    /// Who is signed in; every change is attributed to them.
    pub staff: Option<Staff>,
    /// The reception desk, with its roster kept loaded for fast check-in.
    pub desk: Option<Desk>,
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
            }),
            nudge: Arc::new(tokio::sync::Notify::new()),
            sync_started: Mutex::new(false),
            hq: Mutex::new(None),
            card: Mutex::new(crate::events::CardStatus::starting()),
            taps: Mutex::new(std::collections::VecDeque::new()),
        }))
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
    /// Errors: [`ErrorKind::Locked`], [`ErrorKind::NotSignedIn`]; whatever `f` returns.
    pub async fn with_staff<T, F>(&self, f: F) -> AppResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Engine, &Staff) -> AppResult<T> + Send + 'static,
    {
        self.with_unlocked(move |u| {
            let staff = u.staff.clone().ok_or_else(|| {
                AppError::new(ErrorKind::NotSignedIn, "no staff member is signed in")
            })?;
            f(&mut u.engine, &staff)
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
