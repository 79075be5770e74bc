//! The card task: a background thread that watches the PC/SC readers (`musubi_facility::card`'s
//! [`Watcher`]) and, for each card placed on a reader, reads its pseudonymous id the way
//! `musubi shelter checkin --card` does ([`card::read`] without a PIN: the JPKI
//! user-authentication certificate of a My Number card, the UID/IDm of a contactless card, each an
//! HMAC under the facility's key of the sector of the people it registers) and sends [`CardTapped`]. Reader and service changes go out
//! as [`CardStatus`] (only when they change).
//!
//! No pcscd, or no reader, is a normal state: it is reported once and looked at again every
//! [`RETRY`] (at once when pcscd announces a reader, where it can). A card left on the reader is
//! read once; it must leave and come back to be read again. Card ids and numbers are never logged.
//!
//! The task starts with the app and waits until the facility is unlocked and enrolled (its
//! pseudonym keys are needed to derive ids). A card is read only while a staff member is signed in
//! and their session is open ([`AppState::attending`]), and its read is recorded in their name; a
//! card placed while nobody is signed in or the session is locked is left alone (a staff card
//! sign-in, `sign_in_card`, reads it then). Every tap is announced, whatever screen is shown:
//! screens that do not take cards ignore the event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use musubi_crdt::crypto::PseudonymSector;
use musubi_facility::Engine;
use musubi_facility::card::{self, CardEvent, CardState, NoPin, ReadOptions, Watcher};
use musubi_facility::engine::now_ms;
use tauri::AppHandle;
use tauri_specta::Event as _;

use crate::events::{CardReadError, CardReaderState, CardStatus, CardTapped};
use crate::state::AppState;

/// How often an absent service or reader, a locked app or a missing enrolment is looked at again.
pub const RETRY: Duration = Duration::from_secs(5);

/// How long one wait for reader changes lasts while a reader is connected.
pub const POLL_STEP: Duration = Duration::from_millis(500);

/// How long reading a card just placed may take (the card is already there: this bounds a slow or
/// half-removed card, not the person).
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Most recent taps remembered for check-in's method (see [`crate::state::Shared::taps`]).
pub const RECENT_TAPS_MAX: usize = 32;

/// What the watch loop reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Signal {
    /// The reader side changed.
    Status(CardStatus),
    /// A card was read.
    Tapped(CardTapped),
}

/// Starts the card thread (call once, at app start); it runs for the life of the process.
pub fn start(app: AppHandle, state: AppState) {
    let spawned = thread::Builder::new()
        .name("musubi-card".into())
        .spawn(move || {
            let mut engine = wait_for_engine(&state, &mut |s| publish(&app, &state, s));
            let stop = AtomicBool::new(false);
            watch(
                &mut engine,
                &stop,
                || state.attending(),
                |s| publish(&app, &state, s),
            );
        });
    if let Err(e) = spawned {
        tracing::error!("card thread: {e}");
    }
}

/// Sends a signal to the UI and keeps what `card_status` and check-in need.
fn publish(app: &AppHandle, state: &AppState, signal: Signal) {
    match signal {
        Signal::Status(status) => {
            *state.0.card.lock().unwrap_or_else(|p| p.into_inner()) = status.clone();
            if let Err(e) = status.emit(app) {
                tracing::warn!("card status event: {e}");
            }
        }
        Signal::Tapped(tap) => {
            {
                let mut taps = state.0.taps.lock().unwrap_or_else(|p| p.into_inner());
                taps.retain(|(id, _)| *id != tap.card_id);
                taps.push_back((tap.card_id.clone(), tap.card_kind));
                while taps.len() > RECENT_TAPS_MAX {
                    taps.pop_front();
                }
            }
            if let Err(e) = tap.emit(app) {
                tracing::warn!("card tap event: {e}");
            }
        }
    }
}

/// An engine handle of its own once the facility is unlocked and enrolled; reports the wait.
fn wait_for_engine(state: &AppState, sink: &mut impl FnMut(Signal)) -> Engine {
    let mut reported: Option<CardReaderState> = None;
    loop {
        let handle = state.session().as_ref().map(|u| u.engine.try_clone());
        let waiting = match handle {
            Some(Ok(engine)) if engine.pseudonym_keys().is_ok() => return engine,
            Some(Ok(_)) => CardReaderState::NotEnrolled,
            Some(Err(e)) => {
                tracing::warn!("card task: the store cannot be opened: {e}");
                CardReaderState::Starting
            }
            None => CardReaderState::Starting,
        };
        if reported != Some(waiting) {
            reported = Some(waiting);
            if waiting == CardReaderState::NotEnrolled {
                sink(Signal::Status(CardStatus {
                    available: false,
                    state: waiting,
                    readers: Vec::new(),
                    message: "この端末はまだ参加していないため、カードを読み取れません".into(),
                    message_en: "This device has not joined a deployment; cards cannot be read yet"
                        .into(),
                    last_error: None,
                }));
            }
        }
        thread::sleep(RETRY);
    }
}

/// The status the UI shows for the watcher's state.
fn status_of(w: &Watcher, last_error: Option<CardReadError>) -> CardStatus {
    let state = w.state();
    let kind = match &state {
        CardState::Starting => CardReaderState::Starting,
        CardState::ServiceUnavailable => CardReaderState::ServiceUnavailable,
        CardState::NoReader => CardReaderState::NoReader,
        CardState::Ready { .. } => CardReaderState::Ready,
        CardState::CardPresent { .. } => CardReaderState::CardPresent,
        CardState::CardMute { .. } => CardReaderState::CardMute,
    };
    CardStatus {
        available: matches!(
            kind,
            CardReaderState::Ready | CardReaderState::CardPresent | CardReaderState::CardMute
        ),
        state: kind,
        readers: w.readers().into_iter().map(|(name, _)| name).collect(),
        message: state.message_ja().into(),
        message_en: state.message_en().into(),
        last_error,
    }
}

/// Watches readers until `stop` is set: a [`Signal::Status`] whenever the reader side changes
/// (first at once), a [`Signal::Tapped`] for each card placed and read. `at_ms` of a tap is when
/// the watcher saw the card arrive (ms since the Unix epoch). A card is read only when `attending`
/// names a staff member (login), to whom the read is attributed; otherwise it is left alone.
///
/// A tap's id is in the sector of the people this facility registers at its counter (evacuees at
/// a shelter or HQ, patients at a clinic); at a care office, which registers no one by card, in
/// the staff cards' sector.
pub fn watch(
    engine: &mut Engine,
    stop: &AtomicBool,
    mut attending: impl FnMut() -> Option<String>,
    mut sink: impl FnMut(Signal),
) {
    let sector = engine
        .resident_sector()
        .ok()
        .flatten()
        .unwrap_or(PseudonymSector::Staff);
    let mut w = Watcher::new();
    let mut last: Option<CardStatus> = None;
    let mut last_error: Option<CardReadError> = None;
    while !stop.load(Ordering::Relaxed) {
        let available = last.as_ref().is_some_and(|s| s.available);
        let step = if available { POLL_STEP } else { RETRY };
        let began = Instant::now();
        let events = w.poll(step);
        for e in &events {
            let CardEvent::CardInserted { reader, .. } = e else {
                continue;
            };
            let Some(login) = attending() else {
                tracing::debug!("a card was placed while nobody is signed in: not read");
                continue;
            };
            engine.set_staff(Some(login));
            let at_ms = now_ms() as f64;
            let opts = ReadOptions {
                reader: Some(reader.clone()),
                timeout: READ_TIMEOUT,
                ..ReadOptions::default()
            };
            match card::read(engine, sector, &opts, Box::new(NoPin)) {
                Ok(read) => {
                    last_error = None;
                    tracing::debug!(
                        kind = ?read.identity.kind,
                        read_ms = now_ms() as f64 - at_ms,
                        "card read"
                    );
                    sink(Signal::Tapped(CardTapped {
                        card_id: read.identity.pseudonymous_id,
                        card_kind: read.identity.kind,
                        at_ms,
                    }));
                }
                Err(err) => {
                    tracing::info!(kind = err.kind(), "a card on the reader could not be read");
                    last_error = Some(CardReadError {
                        kind: err.kind().into(),
                        message: err.message_ja(),
                    });
                }
            }
        }
        let status = status_of(&w, last_error.clone());
        if last.as_ref() != Some(&status) {
            if last.as_ref().map(|s| s.state) != Some(status.state) {
                tracing::info!(state = ?status.state, readers = status.readers.len(), "card readers");
            }
            last = Some(status.clone());
            sink(Signal::Status(status));
        }
        // Never spin: without a service or a reader, look again only every RETRY; with readers,
        // a wait that ended at once without news (a failing service) still pauses briefly.
        let took = began.elapsed();
        if !status_available(&last) && events.is_empty() && took < step {
            sleep_unless(stop, step - took);
        } else if events.is_empty() && took < Duration::from_millis(10) {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn status_available(s: &Option<CardStatus>) -> bool {
    s.as_ref().is_some_and(|s| s.available)
}

/// Sleeps for `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(200)));
    }
}

/// The latest card status (what the `card_status` command returns).
pub fn status(state: &AppState) -> CardStatus {
    state
        .0
        .card
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}
