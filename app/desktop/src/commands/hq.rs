//! 災害対策本部 (disaster HQ): every shelter's counts, counts over time, the safety inquiry (安否確認),
//! CSV exports and supply requests. Each command is a thin call into
//! `musubi_facility::services::hq` over a cached [`World`].
//!
//! Loading the world (every shelter's merged roster) is the expensive part of every HQ screen, so
//! the loaded world stays in [`crate::state::Shared::hq`]. It is used again while no shelter
//! document gained a bundle ([`World::is_current`], one small query per shelter) and dropped when
//! the sync task reports a shelter document changed (which also covers keys arriving for a shelter
//! that was unreadable).

use std::path::{Path, PathBuf};
use std::time::Instant;

use musubi_crdt::audit::AuditAction;
use musubi_crdt::documents::shelter::RequestStatus;
use musubi_crdt::ids::{DocumentId, DocumentKind};
use musubi_facility::Engine;
use musubi_facility::EngineError;
use musubi_facility::audit;
use musubi_facility::services::hq::{
    self as svc, History, Inquirer, InquiryAnswer, Summary, World,
};
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::error::{AppError, AppResult, ErrorKind};
use crate::state::AppState;

/// Most times one `hq_history` call accepts.
pub const HISTORY_TIMES_MAX: usize = svc::HISTORY_POINTS_MAX;

/// What an export wrote.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct ExportReport {
    /// The file written (absolute).
    pub path: String,
    /// Data rows written (evacuees for the roster, shelters for the aggregate).
    pub rows: u32,
    /// Bytes written.
    pub bytes: u64,
}

/// Drops the cached HQ world when a shelter document changed (called by the sync task).
pub fn on_document_changed(state: &AppState, kind: DocumentKind) {
    if kind == DocumentKind::Shelter {
        *state.hq() = None;
    }
}

/// Runs `f` over the cached world, loading it first when missing or out of date.
///
/// Lock order: the caller holds the session lock; the HQ lock is taken inside it.
fn with_world<T>(
    state: &AppState,
    engine: &Engine,
    f: impl FnOnce(&World) -> Result<T, EngineError>,
) -> AppResult<T> {
    let mut hq = state.hq();
    let current = match hq.as_ref() {
        Some(w) => w.is_current(engine)?,
        None => false,
    };
    if !current {
        let t = Instant::now();
        let world = World::load(engine)?;
        tracing::debug!(
            shelters = world.shelters.len(),
            ms = t.elapsed().as_millis() as u64,
            "loaded the HQ world"
        );
        *hq = Some(world);
    }
    let world = hq.as_ref().expect("loaded just above when missing");
    Ok(f(world)?)
}

/// HQ's summary: every readable shelter's counts (a person counts once, at the shelter of their
/// latest check-in; 外泊 counts), capacities, care-flag counts, open supply requests (most urgent
/// first) and the shelters this device cannot read yet. `at` (RFC 3339): the counts as of then,
/// from the stay events up to it; null: now.
///
/// Errors: `invalid_input` (`at` is not RFC 3339); `locked`; `not_signed_in`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn hq_summary(state: State<'_, AppState>, at: Option<String>) -> AppResult<Summary> {
    let st = state.inner().clone();
    state
        .with_staff(move |engine, _| {
            super::record_view(engine, None, &["summary"])?;
            with_world(&st, engine, |w| svc::summarise(w, at.as_deref()))
        })
        .await
}

/// Counts per shelter and in total at each of `times` (RFC 3339, any order; answered ascending),
/// for a chart. With no times: at every distinct stay-event time (at most 1,000, evenly sampled).
///
/// Errors: `invalid_input` (a time is not RFC 3339, or more than 1,000 times); `locked`;
/// `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn hq_history(state: State<'_, AppState>, times: Vec<String>) -> AppResult<History> {
    if times.len() > HISTORY_TIMES_MAX {
        return Err(AppError::invalid(format!(
            "{} times asked; at most {HISTORY_TIMES_MAX}",
            times.len()
        )));
    }
    let st = state.inner().clone();
    state
        .with_staff(move |engine, _| {
            super::record_view(engine, None, &["history"])?;
            with_world(&st, engine, |w| svc::history_of(w, &times))
        })
        .await
}

/// 安否確認: where is the person named `name` (full name or kana; width, spaces and case ignored)?
/// Answers only for evacuees who consented to disclosure; anyone else gets the same empty answer
/// as a person who is in no shelter. Present first, then the latest news first. Who asked
/// (`inquirer`: 問い合わせ者氏名, 続柄, 連絡先) is recorded in the audit log with the answer.
///
/// Errors: `invalid_input` (no inquirer name or relationship); `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn hq_inquiry(
    state: State<'_, AppState>,
    name: String,
    inquirer: Inquirer,
) -> AppResult<Vec<InquiryAnswer>> {
    inquirer.check()?;
    let st = state.inner().clone();
    state
        .with_staff(move |engine, _| {
            let answers = with_world(&st, engine, |w| Ok(svc::inquiry_of(w, &name)))?;
            svc::record_inquiry(engine, &inquirer, answers.len())?;
            Ok(answers)
        })
        .await
}

/// Checks an export path: absolute, with an existing directory.
fn export_path(path: &str) -> AppResult<PathBuf> {
    let p = PathBuf::from(path.trim());
    if !p.is_absolute() {
        return Err(AppError::invalid(format!(
            "the export path `{path}` is not absolute; choose the file with the save dialog"
        )));
    }
    match p.parent() {
        Some(dir) if dir.is_dir() => Ok(p),
        _ => Err(AppError::invalid(format!(
            "the folder of `{path}` does not exist"
        ))),
    }
}

/// Writes `bytes` to `path` through a sibling `.part` file renamed into place, readable by this
/// user only (the roster holds personal data).
fn write_file(path: &Path, bytes: &[u8]) -> AppResult<()> {
    musubi_facility::services::write_owner_only(path, bytes).map_err(|e| {
        AppError::new(
            ErrorKind::Storage,
            format!("writing {}: {e}", path.display()),
        )
    })
}

fn report(path: PathBuf, rows: usize, bytes: usize) -> ExportReport {
    ExportReport {
        path: path.display().to_string(),
        rows: u32::try_from(rows).unwrap_or(u32::MAX),
        bytes: bytes as u64,
    }
}

/// Exports the roster of every readable shelter as CSV (UTF-8 with BOM, one row per merged
/// evacuee: 避難所, 氏名, かな, 生年月日, 要配慮, 安否情報の開示同意, 状態, 入所日時, ...) to `path`
/// (absolute, chosen with the save dialog; replaced if it exists; readable by this user only).
///
/// Errors: `invalid_input` (relative path, missing folder); `storage` (cannot write); `locked`;
/// `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn hq_export_roster(state: State<'_, AppState>, path: String) -> AppResult<ExportReport> {
    let path = export_path(&path)?;
    let st = state.inner().clone();
    state
        .with_staff(move |engine, _| {
            let mut out = Vec::new();
            let rows = with_world(&st, engine, |w| svc::export_roster_of(w, &mut out))?;
            audit::record(engine, AuditAction::Export, None, &["roster.csv"])?;
            write_file(&path, &out)?;
            Ok(report(path, rows, out.len()))
        })
        .await
}

/// Exports per-shelter counts as CSV with HXL hashtags (a header row, a hashtag row, one row per
/// shelter: code, name, status, capacity, evacuees, on leave, 要配慮者, open requests, time, this
/// facility) as of `at` (RFC 3339; null: now) to `path` (absolute; replaced if it exists).
///
/// Errors: `invalid_input` (relative path, missing folder, `at` not RFC 3339); `storage`;
/// `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn hq_export_aggregate(
    state: State<'_, AppState>,
    path: String,
    at: Option<String>,
) -> AppResult<ExportReport> {
    let path = export_path(&path)?;
    let st = state.inner().clone();
    state
        .with_staff(move |engine, _| {
            let org = engine
                .enrolment()
                .map(|e| e.facility_name)
                .unwrap_or_default();
            let mut out = Vec::new();
            let rows = with_world(&st, engine, |w| {
                svc::export_aggregate_of(w, &org, at.as_deref(), &mut out)
            })?;
            audit::record(engine, AuditAction::Export, None, &["aggregate.csv"])?;
            write_file(&path, &out)?;
            Ok(report(path, rows, out.len()))
        })
        .await
}

/// Moves a shelter's supply request forward (open → arranged → delivered → cancelled; an earlier
/// status is ignored): HQ marks it `arranged` (手配済). The same as `shelter_set_request_status`,
/// for the HQ screen. The next summary shows it.
///
/// Errors: `invalid_input` (unknown request); `not_found` (unknown shelter); `read_only`; `locked`;
/// `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn hq_set_request_status(
    state: State<'_, AppState>,
    shelter: DocumentId,
    request: String,
    status: RequestStatus,
) -> AppResult<()> {
    super::shelter::shelter_set_request_status(state, shelter, request, status).await
}
