//! 避難所受付 (shelter reception): list and open shelters, the reception desk (roster kept loaded,
//! search, check-in by hand or card, 外泊/帰所/退所, 要配慮 flags, consent), capacity, status, needs
//! and supply requests. Each command is a thin call into `musubi_facility::services::shelter`.
//!
//! The desk ([`Desk`]) lives in [`crate::state::Unlocked::desk`]: the roster stays loaded, so a
//! check-in is one in-memory edit plus one commit (durable and queued for the relay before the
//! command returns). When a desk edit fails half-way, the desk is loaded again, so nothing
//! uncommitted lingers into the next commit. Edits to the shelter made outside the desk (capacity,
//! status, requests, needs) reload the desk when it shows that shelter; other devices' changes
//! reload it from the sync task.

use std::collections::BTreeSet;

use musubi_crdt::documents::shelter::{
    CareFlag, Method, NewEvacuee, RequestStatus, ShelterStatus, StayKind, Urgency,
};
use musubi_crdt::ids::{DocumentId, FacilityId};
use musubi_facility::Engine;
use musubi_facility::card::CardKind;
use musubi_facility::services::shelter::{
    self as svc, CheckIn, CheckInOutcome, Desk, DeskEvacuee, DeskView, EvacueeView, OpenShelter,
    Opened, ShelterListing,
};
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::error::{AppError, AppResult, ErrorKind};
use crate::state::{AppState, Unlocked};

/// How many matches [`desk_search`] returns when the UI does not say.
pub const SEARCH_LIMIT_DEFAULT: u32 = 20;

/// What the 避難所開設 form sends.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct OpenShelterRequest {
    /// 名称 (required).
    pub name: String,
    /// 施設コード (the registry id), may be empty.
    pub code: String,
    /// 住所.
    pub address: String,
    /// 収容人数 (0: not stated).
    pub capacity: u64,
    /// HQ facilities that form the health section: the only members of the shelter's medical
    /// notes besides this facility (ids from `facilities`). May be empty.
    pub health_sections: Vec<FacilityId>,
}

/// One evacuee's row after a desk edit.
fn row(desk: &Desk, evacuee: &str) -> AppResult<DeskEvacuee> {
    desk.row(evacuee).ok_or_else(|| {
        AppError::new(
            ErrorKind::NotFound,
            format!("no evacuee `{evacuee}` in this shelter"),
        )
    })
}

/// Runs `f` on the open desk of the signed-in staff member (their name goes on stay events). A
/// failed edit reloads the desk, dropping whatever `f` wrote before failing.
///
/// Errors: `locked`, `not_signed_in`; `not_found` when no desk is open; whatever `f` returns.
fn with_desk<T>(
    u: &mut Unlocked,
    f: impl FnOnce(&mut Desk, &mut Engine) -> AppResult<T>,
) -> AppResult<T> {
    let staff = u
        .staff
        .clone()
        .ok_or_else(|| AppError::new(ErrorKind::NotSignedIn, "no staff member is signed in"))?;
    let desk = u.desk.as_mut().ok_or_else(|| {
        AppError::new(
            ErrorKind::NotFound,
            "no reception desk is open: open one for a shelter first (desk_open)",
        )
    })?;
    desk.set_staff(&staff.name);
    let result = f(desk, &mut u.engine);
    if result.is_err() {
        let id = desk.id();
        match Desk::open(&u.engine, id) {
            Ok(mut fresh) => {
                fresh.set_staff(&staff.name);
                *desk = fresh;
            }
            Err(e) => {
                tracing::warn!(%id, "reloading the reception desk after a failed edit: {e}");
                u.desk = None;
            }
        }
    }
    result
}

/// Loads the desk again when it shows `shelter` (after an edit made outside it).
fn refresh_desk(u: &mut Unlocked, shelter: DocumentId) -> AppResult<()> {
    if let Some(desk) = u.desk.as_mut()
        && desk.id() == shelter
    {
        *desk = Desk::open(&u.engine, shelter)?;
    }
    Ok(())
}

/// Checks that `id` is a shelter document this device knows.
fn shelter_id(engine: &Engine, id: DocumentId) -> AppResult<DocumentId> {
    Ok(svc::shelter_doc(engine, &id.to_string())?)
}

/// The shelters this facility can read (its own, and every shelter for HQ), each with its current
/// head count (外泊 counts) and this facility's role in it (`owner`, `writer`, `reader`).
///
/// Errors: `locked`; `not_signed_in`; `not_enrolled`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_list(state: State<'_, AppState>) -> AppResult<Vec<ShelterListing>> {
    state.with_staff(|engine, _| Ok(svc::list(engine)?)).await
}

/// 避難所開設: opens a shelter owned by this facility. Every HQ facility of the directory becomes a
/// writer (an HQ that enrols later is added by the next sync); the medical notes are a separate
/// document shared only with `health_sections`. Durable and queued for the relay when it returns.
///
/// Errors: `invalid_input` (empty name, a field over 4 KiB); `not_found` (unknown health section);
/// `not_enrolled`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_open(
    state: State<'_, AppState>,
    request: OpenShelterRequest,
) -> AppResult<Opened> {
    if request.name.trim().is_empty() {
        return Err(AppError::invalid("the shelter name (名称) is empty"));
    }
    state
        .with_staff(move |engine, _| {
            let req = OpenShelter {
                name: request.name.trim().to_owned(),
                code: request.code.trim().to_owned(),
                address: request.address.trim().to_owned(),
                capacity: request.capacity,
                health_sections: request
                    .health_sections
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                at: None,
            };
            Ok(svc::open(engine, &req)?)
        })
        .await
}

/// Opens the reception desk on `shelter`: loads its roster once and keeps it loaded for fast
/// check-in and search. Returns the desk's view (counts, evacuees with 要配慮 flags, needs, requests).
///
/// Errors: `not_found` (not a shelter here); `no_key` (sync first); `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_open(state: State<'_, AppState>, shelter: DocumentId) -> AppResult<DeskView> {
    state
        .with_signed_in(move |u, staff| {
            let doc = shelter_id(&u.engine, shelter)?;
            let mut desk = Desk::open(&u.engine, doc)?;
            desk.set_staff(&staff.name);
            let view = desk.view();
            u.desk = Some(desk);
            Ok(view)
        })
        .await
}

/// Closes the reception desk (its roster leaves memory). Nothing is lost: every edit was committed.
#[tauri::command]
#[specta::specta]
pub async fn desk_close(state: State<'_, AppState>) -> AppResult<()> {
    state
        .with_signed_in(|u, _| {
            u.desk = None;
            Ok(())
        })
        .await
}

/// The open desk's current view (from memory: no document load), with other devices' check-ins
/// included as they arrive.
///
/// Errors: `not_found` when no desk is open; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_roster(state: State<'_, AppState>) -> AppResult<DeskView> {
    state
        .with_signed_in(|u, _| {
            with_desk(u, |desk, engine| {
                super::record_view(engine, Some(desk.id()), &["roster"])?;
                Ok(desk.view())
            })
        })
        .await
}

/// Evacuees of the open desk whose name or kana contains `query` (case, width, spaces and
/// hiragana/katakana ignored; a date matches the birth date), best first, at most `limit`
/// (default 20, at most 200).
///
/// Errors: `not_found` when no desk is open; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_search(
    state: State<'_, AppState>,
    query: String,
    limit: Option<u32>,
) -> AppResult<Vec<DeskEvacuee>> {
    let limit = limit.unwrap_or(SEARCH_LIMIT_DEFAULT) as usize;
    state
        .with_signed_in(move |u, _| {
            with_desk(u, |desk, engine| {
                super::record_view(engine, Some(desk.id()), &["search"])?;
                Ok(desk.search(&query, limit))
            })
        })
        .await
}

/// One evacuee of the open desk with every field and stay event (`evacuee`: its id, or the id of
/// a duplicate record merged into it).
///
/// Errors: `not_found`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_evacuee(state: State<'_, AppState>, evacuee: String) -> AppResult<EvacueeView> {
    state
        .with_signed_in(move |u, _| {
            with_desk(u, |desk, engine| {
                let view = desk.evacuee(&evacuee).ok_or_else(|| {
                    AppError::new(
                        ErrorKind::NotFound,
                        format!("no evacuee `{evacuee}` in this shelter"),
                    )
                })?;
                // Which record was looked at (its random id, never its fields' values).
                super::record_view(
                    engine,
                    Some(desk.id()),
                    &[&format!("evacuee:{}", view.evacuee.id)],
                )?;
                Ok(view)
            })
        })
        .await
}

/// Checks a person in at the open desk's shelter. A known person (same card id, or same name and
/// birth date after normalising) is reused and their new relatives and care flags are added;
/// otherwise a record is made. A person already present gets no second check-in. A person present
/// at another shelter this facility runs is checked out there (`moved_from`). Relatives are
/// queued for e-mail. Durable and queued for the relay when it returns; the stay event records
/// this device and the signed-in staff member.
///
/// - `person`: the form; `person.card_id` may be empty.
/// - `card_id`: the pseudonymous id from a `CardTapped` event (overrides `person.card_id`).
/// - `method`: how the person was identified; null: the kind of the card when `card_id` was
///   tapped on this device recently (`my-number-card` / `transit-card`), else `manual`.
///
/// Errors: `invalid_input` (empty name, a manual check-in without birth date, a malformed e-mail,
/// the shelter is closed, a field over 4 KiB); `not_found` (no desk open); `locked`;
/// `not_signed_in`; `storage`.
#[tauri::command]
#[specta::specta]
pub async fn desk_checkin(
    state: State<'_, AppState>,
    person: NewEvacuee,
    card_id: Option<String>,
    method: Option<Method>,
) -> AppResult<CheckInOutcome> {
    let mut person = person;
    if let Some(c) = card_id.filter(|c| !c.trim().is_empty()) {
        person.card_id = c.trim().to_ascii_lowercase();
    }
    // A tap alone (no name typed) checks in the card's holder when the roster knows the card.
    let card_only = person.name.trim().is_empty() && !person.card_id.is_empty();
    if person.name.trim().is_empty() && !card_only {
        return Err(AppError::invalid("the name (氏名) is empty"));
    }
    if person.card_id.is_empty() && person.birth_date.trim().is_empty() {
        return Err(AppError::invalid(
            "the birth date (生年月日) is needed to check in without a card",
        ));
    }
    let method = match method {
        Some(m) => m,
        None if person.card_id.is_empty() => Method::Manual,
        None => recent_kind(&state, &person.card_id)
            .map(|k| match k {
                CardKind::MyNumber => Method::MyNumberCard,
                CardKind::Contactless => Method::TransitCard,
            })
            .unwrap_or(Method::Manual),
    };
    state
        .with_signed_in(move |u, _| {
            let at = svc::now_rfc3339();
            let (doc, mut outcome, keys) = with_desk(u, |desk, engine| {
                desk.ensure_open()?;
                let mut person = person;
                if card_only {
                    let keys = musubi_crdt::documents::shelter::identity_keys(&person.card_id, "", "");
                    let holder = desk.roster().find(&keys).ok_or_else(|| {
                        AppError::new(
                            ErrorKind::NotFound,
                            "no evacuee of this shelter holds this card yet; enter the name to register it",
                        )
                    })?;
                    person.name = holder.name.clone();
                    person.kana = holder.kana.clone();
                    person.birth_date = holder.birth_date.clone();
                }
                let outcome = desk.checkin(&CheckIn {
                    person,
                    method,
                    at: Some(at.clone()),
                })?;
                desk.commit(engine)?;
                let keys = desk
                    .roster()
                    .evacuee(&outcome.evacuee)
                    .map(|e| e.keys())
                    .unwrap_or_default();
                Ok((desk.id(), outcome, keys))
            })?;
            if !outcome.already_present {
                outcome.moved_from = svc::move_out_elsewhere(&mut u.engine, doc, &keys, &at)?;
            }
            Ok(outcome)
        })
        .await
}

/// The card kind of a recent tap of `card_id` on this device.
fn recent_kind(state: &AppState, card_id: &str) -> Option<CardKind> {
    let taps = state.0.taps.lock().unwrap_or_else(|p| p.into_inner());
    taps.iter()
        .rev()
        .find(|(id, _)| id == card_id)
        .map(|(_, k)| *k)
}

/// Records a stay event for an evacuee of the open desk: `leave` (外泊・一時外出; still counted),
/// `return` (帰所), `check-out` (退所) or `check-in` (入所 again after leaving). `method` defaults to
/// `manual`; `note` is optional. Durable when it returns. Returns the evacuee's updated row.
///
/// Errors: `invalid_input` when the event does not fit (e.g. `return` for someone not on leave,
/// `check-in` at a closed shelter); `not_found`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_stay(
    state: State<'_, AppState>,
    evacuee: String,
    kind: StayKind,
    method: Option<Method>,
    note: Option<String>,
) -> AppResult<DeskEvacuee> {
    state
        .with_signed_in(move |u, _| {
            with_desk(u, |desk, engine| {
                if kind == StayKind::CheckIn {
                    desk.ensure_open()?;
                }
                desk.stay(
                    &evacuee,
                    kind,
                    method.unwrap_or_default(),
                    None,
                    note.as_deref().unwrap_or("").trim(),
                )?;
                desk.commit(engine)?;
                row(desk, &evacuee)
            })
        })
        .await
}

/// Sets an evacuee's care flags (要配慮) to exactly `flags` (adds and removes). Durable when it
/// returns. Returns the updated row.
///
/// Errors: `invalid_input`/`not_found` for an unknown evacuee; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_set_flags(
    state: State<'_, AppState>,
    evacuee: String,
    flags: Vec<CareFlag>,
) -> AppResult<DeskEvacuee> {
    let flags: BTreeSet<CareFlag> = flags.into_iter().collect();
    state
        .with_signed_in(move |u, _| {
            with_desk(u, |desk, engine| {
                if desk.set_flags(&evacuee, &flags)? {
                    desk.commit(engine)?;
                }
                row(desk, &evacuee)
            })
        })
        .await
}

/// Records an evacuee's consent to disclose safety information (安否情報の開示同意): HQ answers
/// safety inquiries about them only while it holds. Durable when it returns. Returns the row.
///
/// Errors: `invalid_input`/`not_found` for an unknown evacuee; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn desk_set_consent(
    state: State<'_, AppState>,
    evacuee: String,
    consent: bool,
) -> AppResult<DeskEvacuee> {
    state
        .with_signed_in(move |u, _| {
            with_desk(u, |desk, engine| {
                if desk.set_consent(&evacuee, consent)? {
                    desk.commit(engine)?;
                }
                row(desk, &evacuee)
            })
        })
        .await
}

/// Runs a shelter edit outside the desk as the signed-in staff member, then reloads the desk if it
/// shows that shelter.
async fn shelter_edit<T: Send + 'static>(
    state: &AppState,
    shelter: DocumentId,
    f: impl FnOnce(&mut Engine, &str) -> AppResult<T> + Send + 'static,
) -> AppResult<T> {
    state
        .with_signed_in(move |u, _| {
            let doc = shelter_id(&u.engine, shelter)?;
            let out = f(&mut u.engine, &doc.to_string())?;
            refresh_desk(u, doc)?;
            Ok(out)
        })
        .await
}

/// Sets 収容人数 (0: not stated).
///
/// Errors: `not_found`; `read_only`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_set_capacity(
    state: State<'_, AppState>,
    shelter: DocumentId,
    capacity: u64,
) -> AppResult<()> {
    shelter_edit(&state, shelter, move |e, s| {
        Ok(svc::set_capacity(e, s, capacity)?)
    })
    .await
}

/// Opens (開設) or closes (閉鎖) a shelter; a closed shelter takes no check-ins.
///
/// Errors: `not_found`; `read_only`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_set_status(
    state: State<'_, AppState>,
    shelter: DocumentId,
    status: ShelterStatus,
) -> AppResult<()> {
    shelter_edit(&state, shelter, move |e, s| {
        Ok(svc::set_status(e, s, status, None)?)
    })
    .await
}

/// 物資要請: asks HQ for supplies. `unit` may be empty (e.g. 枚, 箱); `urgency` defaults to
/// `medium`. Returns the request id.
///
/// Errors: `invalid_input` (empty item, a field over 4 KiB); `not_found`; `read_only`; `locked`;
/// `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_request(
    state: State<'_, AppState>,
    shelter: DocumentId,
    item: String,
    quantity: u64,
    unit: String,
    urgency: Option<Urgency>,
    note: Option<String>,
) -> AppResult<String> {
    if item.trim().is_empty() {
        return Err(AppError::invalid("the item (品目) is empty"));
    }
    shelter_edit(&state, shelter, move |e, s| {
        Ok(svc::request(
            e,
            s,
            item.trim(),
            quantity,
            unit.trim(),
            urgency.unwrap_or_default(),
            note.as_deref().unwrap_or("").trim(),
        )?)
    })
    .await
}

/// Moves a supply request's status forward (open → arranged → delivered → cancelled; an earlier
/// status is ignored): HQ marks it arranged, the shelter delivered.
///
/// Errors: `invalid_input` (unknown request); `not_found`; `read_only`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_set_request_status(
    state: State<'_, AppState>,
    shelter: DocumentId,
    request: String,
    status: RequestStatus,
) -> AppResult<()> {
    shelter_edit(&state, shelter, move |e, s| {
        Ok(svc::set_request_status(e, s, &request, status)?)
    })
    .await
}

/// Notes a need of the shelter (ニーズ, free text, e.g. 仮設トイレ不足). Returns the need id.
///
/// Errors: `invalid_input` (empty, over 4 KiB); `not_found`; `read_only`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_add_need(
    state: State<'_, AppState>,
    shelter: DocumentId,
    text: String,
) -> AppResult<String> {
    if text.trim().is_empty() {
        return Err(AppError::invalid("the need is empty"));
    }
    shelter_edit(&state, shelter, move |e, s| {
        Ok(svc::add_need(e, s, text.trim())?)
    })
    .await
}

/// Marks a need resolved.
///
/// Errors: `invalid_input` (unknown need); `not_found`; `read_only`; `locked`; `not_signed_in`.
#[tauri::command]
#[specta::specta]
pub async fn shelter_resolve_need(
    state: State<'_, AppState>,
    shelter: DocumentId,
    need: String,
) -> AppResult<()> {
    shelter_edit(&state, shelter, move |e, s| {
        Ok(svc::resolve_need(e, s, &need)?)
    })
    .await
}

#[cfg(test)]
mod tests {
    use musubi_crdt::documents::shelter::{Evacuee, Presence, StayEvent};
    use serde_json::json;

    use super::*;

    /// The JSON serde writes has the shape the generated TypeScript declares: flattened records,
    /// kebab-case enums, and `merged_ids` / `staff` present even when empty.
    #[test]
    fn evacuee_json_matches_the_bindings() {
        let view = EvacueeView {
            presence: Presence::OnLeave,
            evacuee: Evacuee {
                id: "aaaaaaaa00000001".into(),
                flags: [CareFlag::CareNeeded].into(),
                events: vec![StayEvent {
                    id: "event-000001".into(),
                    kind: StayKind::CheckOut,
                    at: "2024-01-09T09:00:00+09:00".into(),
                    method: Method::MyNumberCard,
                    device: String::new(),
                    staff: String::new(),
                    note: String::new(),
                }],
                ..Evacuee::default()
            },
        };
        let v = serde_json::to_value(&view).expect("serialise");
        assert_eq!(v["presence"], "on-leave", "flattened next to the record");
        assert_eq!(v["flags"], json!(["care-needed"]));
        assert_eq!(v["merged_ids"], json!([]));
        assert_eq!(v["events"][0]["staff"], "");
        assert_eq!(v["events"][0]["kind"], "check-out");
        assert_eq!(v["events"][0]["method"], "my-number-card");
    }

    /// What the check-in form sends (every field of the TypeScript `NewEvacuee`) is accepted.
    #[test]
    fn the_checkin_form_deserialises() {
        let p: NewEvacuee = serde_json::from_value(json!({
            "name": "山田 太郎", "kana": "ヤマダ タロウ", "birth_date": "1950-01-02", "sex": "男",
            "address": "", "household": "", "contact": "", "card_id": "",
            "flags": ["elderly", "food-allergy"], "allergies": "えび", "pets": "", "vehicle": "",
            "consent": true, "relatives": [{ "name": "山田 花子", "email": "hanako@example.jp" }]
        }))
        .expect("deserialise");
        assert_eq!(p.flags, [CareFlag::Elderly, CareFlag::FoodAllergy].into());
        let r: OpenShelterRequest = serde_json::from_value(json!({
            "name": "御祓地区コミュニティセンター", "code": "", "address": "七尾市", "capacity": 191,
            "health_sections": []
        }))
        .expect("deserialise");
        assert_eq!(r.capacity, 191);
    }
}
