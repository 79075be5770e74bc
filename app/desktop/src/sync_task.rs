//! The background sync task: `musubi_facility::net::sync_with` in watch mode on its own thread and
//! runtime, with its own engine handle on the same store; it turns the run's events into the UI's
//! [`SyncStatus`] and [`DocumentChanged`] events.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use musubi_facility::Engine;
use musubi_facility::engine::now_ms;
use musubi_facility::net::{self, Mode, SyncError, SyncEvent, SyncOptions};
use musubi_facility::services::shelter::Desk;
use tauri::AppHandle;
use tauri_specta::Event as _;

use crate::events::{
    DocumentChanged, QUARANTINE_SHOWN_MAX, QuarantinedNotice, RelayBehindNotice, SyncState,
    SyncStatus,
};
use crate::state::AppState;

/// Store meta key of the last time this device was in step with the relay (ms since the epoch, decimal).
pub const LAST_SYNC_META: &str = "desktop.last_sync_ms";

/// How long "connecting" is shown before the relay is declared out of reach.
const CONNECTING_GRACE: Duration = Duration::from_secs(5);

/// Starts the task once per process, after unlock when the device is enrolled.
pub fn start(app: AppHandle, state: AppState) {
    {
        let mut started = state
            .0
            .sync_started
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *started {
            return;
        }
        let handles = {
            let guard = state.session();
            guard
                .as_ref()
                .map(|u| (u.engine.try_clone(), u.engine.try_clone()))
        };
        let Some((Ok(engine), Ok(observer))) = handles else {
            tracing::warn!("sync not started: the device is locked or its store cannot be opened");
            return;
        };
        *started = true;
        let st = state.clone();
        let spawned = std::thread::Builder::new()
            .name("musubi-sync".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(run(app, st, engine, observer)),
                    Err(e) => tracing::error!("sync runtime: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!("sync thread: {e}");
            *started = false;
        }
    }
}

struct Tracker {
    app: AppHandle,
    state: AppState,
    observer: Engine,
    relay: bool,
    lan_peers: usize,
    since: Instant,
    message: Option<String>,
    refused: bool,
    known: HashSet<musubi_crdt::ids::DocumentId>,
}

impl Tracker {
    fn status(&self) -> SyncStatus {
        let pending = self.observer.store().pending_count().unwrap_or(0);
        let last_sync_ms = self
            .observer
            .store()
            .meta(LAST_SYNC_META)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<f64>().ok());
        let relay_behind =
            net::relay_behind(&self.observer)
                .ok()
                .flatten()
                .map(|r| RelayBehindNotice {
                    at_ms: r.at_ms as f64,
                    restored: r.restored,
                    times: u32::try_from(r.times).unwrap_or(u32::MAX),
                });
        let store = self.observer.store();
        let quarantined_total =
            u32::try_from(store.quarantine_count().unwrap_or(0)).unwrap_or(u32::MAX);
        let directory = self.observer.directory().ok();
        let quarantined = store
            .quarantined(QUARANTINE_SHOWN_MAX)
            .unwrap_or_default()
            .into_iter()
            .map(|q| QuarantinedNotice {
                bundle: q.bundle.chars().take(16).collect(),
                document: q.doc,
                facility: directory
                    .as_ref()
                    .zip(q.facility.parse().ok())
                    .and_then(|(d, id)| d.facility(id))
                    .map_or(q.facility.clone(), |f| f.name.clone()),
                device: q.author,
                reason: q.reason,
                at_ms: q.at_ms as f64,
            })
            .collect();
        let state = if self.refused {
            SyncState::Refused
        } else if self.relay {
            SyncState::Online
        } else if self.lan_peers > 0 {
            SyncState::Lan
        } else if self.since.elapsed() < CONNECTING_GRACE {
            SyncState::Connecting
        } else {
            SyncState::Offline
        };
        SyncStatus {
            state,
            pending: u32::try_from(pending).unwrap_or(u32::MAX),
            last_sync_ms,
            lan_peers: u32::try_from(self.lan_peers).unwrap_or(u32::MAX),
            message: self.message.clone(),
            relay_behind,
            quarantined,
            quarantined_total,
            held_back: u32::try_from(store.held_back_count().unwrap_or(0)).unwrap_or(u32::MAX),
        }
    }

    /// Sends the status if it changed.
    fn publish(&self) {
        let status = self.status();
        let mut last = self
            .state
            .0
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *last != status {
            *last = status.clone();
            drop(last);
            if let Err(e) = status.emit(&self.app) {
                tracing::warn!("sync status event: {e}");
            }
        }
    }

    fn changed(&mut self, doc: musubi_crdt::ids::DocumentId) {
        self.known.insert(doc);
        let Ok(info) = self.observer.document_info(&doc.to_string()) else {
            return;
        };
        reload_desk(&self.state, doc);
        crate::commands::hq::on_document_changed(&self.state, info.kind);
        let ev = DocumentChanged {
            id: doc,
            kind: info.kind,
        };
        if let Err(e) = ev.emit(&self.app) {
            tracing::warn!("document event: {e}");
        }
    }

    fn listed(&mut self) {
        let Ok(rows) = self.observer.store().documents(None) else {
            return;
        };
        for row in rows {
            if self.known.insert(row.info.id) {
                let ev = DocumentChanged {
                    id: row.info.id,
                    kind: row.info.kind,
                };
                let _ = ev.emit(&self.app);
            }
        }
    }

    fn on(&mut self, ev: SyncEvent) {
        match ev {
            SyncEvent::Relay(up) => {
                self.relay = up;
                self.since = Instant::now();
                if up {
                    self.message = None;
                }
            }
            SyncEvent::LanPeers(n) => self.lan_peers = n,
            SyncEvent::Changed(doc) => self.changed(doc),
            SyncEvent::Listed => self.listed(),
            // The status read below carries the relay going back in time (the driver recorded it).
            SyncEvent::Pushed | SyncEvent::RelayBehind | SyncEvent::Directory => {}
            SyncEvent::CaughtUp => {
                let _ = self
                    .observer
                    .store()
                    .set_meta(LAST_SYNC_META, now_ms().to_string().as_bytes());
            }
        }
        self.publish();
    }
}

/// The reception desk keeps its roster loaded; when another desk's check-ins arrive for the same
/// shelter, it is loaded again so counts and search include them.
fn reload_desk(state: &AppState, doc: musubi_crdt::ids::DocumentId) {
    let mut guard = state.session();
    if let Some(u) = guard.as_mut()
        && let Some(desk) = u.desk.as_mut()
        && desk.id() == doc
    {
        match Desk::open(&u.engine, doc) {
            Ok(fresh) => *desk = fresh,
            Err(e) => tracing::warn!(%doc, "reloading the reception desk: {e}"),
        }
    }
}

async fn run(app: AppHandle, state: AppState, mut engine: Engine, observer: Engine) {
    let known = observer
        .store()
        .documents(None)
        .map(|rows| rows.into_iter().map(|r| r.info.id).collect())
        .unwrap_or_default();
    let mut tracker = Tracker {
        app,
        state: state.clone(),
        observer,
        relay: false,
        lan_peers: 0,
        since: Instant::now(),
        message: None,
        refused: false,
        known,
    };
    tracker.publish();
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let options = SyncOptions {
            lan: state.0.lan,
            listen: Vec::new(),
            events: Some(tx),
            nudge: Some(state.0.nudge.clone()),
        };
        let outcome = {
            let run = net::sync_with(&mut engine, Mode::Watch, options, |_| {});
            tokio::pin!(run);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    outcome = &mut run => break outcome,
                    Some(ev) = rx.recv() => tracker.on(ev),
                    _ = tick.tick() => tracker.publish(),
                }
            }
        };
        while let Ok(ev) = rx.try_recv() {
            tracker.on(ev);
        }
        tracker.relay = false;
        let wait = match outcome {
            Ok(_) => Duration::from_secs(1),
            Err(SyncError::Refused { .. }) => {
                tracker.refused = true;
                tracker.message = outcome.err().map(|e| e.to_string());
                Duration::from_secs(60)
            }
            Err(e) => {
                tracing::warn!("sync stopped: {e}");
                tracker.message = Some(e.to_string());
                Duration::from_secs(5)
            }
        };
        tracker.publish();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.0.nudge.notified() => {}
        }
        tracker.refused = false;
        tracker.since = Instant::now();
    }
}
