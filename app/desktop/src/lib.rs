//! musubi-desktop: the Tauri 2 shell of a facility's device.
//!
//! - [`commands`]: the IPC commands, each a thin call into `musubi-facility`.
//! - [`events`]: typed events to the UI (sync status, document changed, card tapped).
//! - [`state`]: the unlocked engine, the signed-in staff member (and whether their session is
//!   locked), and the reception desk.
//! - [`error`]: `{ kind, message }`, the only error shape that crosses IPC.
//!
//! Run loop: the window's commands run on blocking threads against one engine handle; a sync task
//! on its own thread runs `net::sync_with` in watch mode with a second handle on the same store and
//! turns what it does into events. The store is the only shared state, as between CLI processes.
//! A card task on its own thread ([`card_task`]) watches the PC/SC readers and sends taps.
//! The TypeScript bindings in `frontend/src/lib/bindings.ts` are generated from these types
//! (`cargo run -p musubi-desktop -- --export-bindings`), and a test checks they are current.

pub mod card_task;
pub mod commands;
pub mod error;
pub mod events;
pub mod state;
mod sync_task;

use std::path::{Path, PathBuf};

use specta_typescript::{BigIntExportBehavior, Typescript};

use crate::state::AppState;

/// The bindings file, relative to this crate's directory.
pub const BINDINGS_PATH: &str = "../../frontend/src/lib/bindings.ts";

/// Every command and event the UI may use.
pub fn specta_builder() -> tauri_specta::Builder<tauri::Wry> {
    use commands::*;
    tauri_specta::Builder::<tauri::Wry>::new()
        .commands(tauri_specta::collect_commands![
            session::app_status,
            session::create_facility,
            session::unlock,
            session::invite_preview,
            session::join,
            session::create_staff,
            session::list_staff,
            session::sign_in,
            session::sign_in_card,
            session::sign_out,
            session::lock_session,
            session::session_touch,
            session::set_idle_lock,
            audit::audit_list,
            audit::audit_verify,
            audit::audit_review,
            sync::sync_status,
            sync::sync_now,
            sync::settings,
            sync::facilities,
            trust::facility_devices,
            trust::device_invite,
            trust::revoke_device,
            trust::trust_directory,
            trust::confirm_root,
            shelter::shelter_list,
            shelter::shelter_open,
            shelter::shelter_set_capacity,
            shelter::shelter_set_status,
            shelter::shelter_request,
            shelter::shelter_set_request_status,
            shelter::shelter_add_need,
            shelter::shelter_resolve_need,
            shelter::desk_open,
            shelter::desk_close,
            shelter::desk_roster,
            shelter::desk_search,
            shelter::desk_evacuee,
            shelter::desk_checkin,
            shelter::desk_stay,
            shelter::desk_set_flags,
            shelter::desk_set_consent,
            hq::hq_summary,
            hq::hq_history,
            hq::hq_inquiry,
            hq::hq_export_roster,
            hq::hq_export_aggregate,
            hq::hq_set_request_status,
            card::card_status,
            referral::referral_fields,
            referral::referral_list,
            referral::referral_get,
            referral::referral_create,
            referral::referral_edit,
            referral::referral_send,
            referral::referral_reply,
            referral::referral_import_fhir,
            referral::referral_attach,
            referral::referral_attachment,
            referral::referral_save_attachment,
            referral::referral_export_fhir,
            referral::referral_export_pdf,
            careplan::careplan_fields,
            careplan::careplan_list,
            careplan::careplan_get,
            careplan::careplan_create,
            careplan::careplan_edit,
            careplan::careplan_consent,
            careplan::careplan_add_need,
            careplan::careplan_add_goal,
            careplan::careplan_add_service,
            careplan::careplan_edit_item,
            careplan::careplan_move_item,
            careplan::careplan_remove_item,
            careplan::careplan_schedule,
            careplan::careplan_add_activity,
            careplan::careplan_set_non_weekly,
            careplan::careplan_log,
            careplan::careplan_monitor,
            careplan::careplan_comment,
            careplan::careplan_record_version,
            careplan::careplan_members,
            careplan::careplan_share,
            careplan::careplan_export_csv,
            careplan::careplan_export_pdf,
        ])
        .events(tauri_specta::collect_events![
            events::SyncStatus,
            events::DocumentChanged,
            events::CardTapped,
            events::CardStatus,
        ])
}

/// Writes the TypeScript bindings to `path`.
///
/// Errors: the exporter's (an unsupported type, or the file cannot be written).
pub fn export_bindings(path: &Path) -> anyhow::Result<()> {
    specta_builder()
        .export(
            Typescript::default()
                .bigint(BigIntExportBehavior::Number)
                .header("// Generated by musubi-desktop from its Rust types. Do not edit: run `cargo run -p musubi-desktop -- --export-bindings`.\n"),
            path,
        )
        .map_err(|e| anyhow::anyhow!("exporting TypeScript bindings to {}: {e}", path.display()))
}

/// The facility's data directory: `MUSUBI_DATA`, else the platform's data directory + `musubi`.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MUSUBI_DATA") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("musubi")
}

/// Runs the app until its window closes.
///
/// Environment: `MUSUBI_DATA` (data directory), `MUSUBI_LAN=0` (no LAN sync),
/// `MUSUBI_IDLE_LOCK_SECS` (the idle time before a session locks, fixed for this computer; else
/// 設定's, default 10 minutes), `MUSUBI_SCRYPT_LOG_N` (passphrase work factor for new facilities,
/// tests only).
///
/// Errors: Tauri's, when the window cannot be created.
pub fn run() -> anyhow::Result<()> {
    let lan = std::env::var("MUSUBI_LAN")
        .map(|v| v != "0")
        .unwrap_or(true);
    let state = AppState::new(data_dir(), lan);
    let builder = specta_builder();
    let card_state = state.clone();
    tauri::Builder::default()
        .plugin(tauri_plugin_dialog::init())
        .manage(state)
        .invoke_handler(builder.invoke_handler())
        .setup(move |app| {
            builder.mount_events(app);
            card_task::start(app.handle().clone(), card_state);
            Ok(())
        })
        .run(tauri::generate_context!())
        .map_err(|e| anyhow::anyhow!("the window could not start: {e}"))
}
