//! The card reader as the reception screen sees it (taps arrive as `CardTapped` events from
//! [`crate::card_task`]).

use tauri::State;

use crate::card_task;
use crate::error::AppResult;
use crate::events::CardStatus;
use crate::state::AppState;

/// The card reader's current status (the same value the latest `CardStatus` event carried):
/// whether a tap can be read now, the readers, a message to show, and the last read failure.
#[tauri::command]
#[specta::specta]
pub async fn card_status(state: State<'_, AppState>) -> AppResult<CardStatus> {
    Ok(card_task::status(&state))
}
