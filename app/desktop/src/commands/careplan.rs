//! ケアプラン (居宅サービス計画書 第1〜3表, 第5表 支援経過, monitoring, comments, versions): each
//! command a call into `musubi_facility::services::careplan` as the signed-in staff member.
//!
//! Items of 第2表 and 第3表 are named by their ids (as in the plan returned by `careplan_get`);
//! new items go where a [`PlacementInput`] says. The keys `careplan_edit` and
//! `careplan_edit_item` take, with their labels on the form, come from `careplan_fields`.

use std::path::PathBuf;

use musubi_crdt::documents::careplan::{
    FieldInput, ItemKind, Placement, PlanField, Service, Sheet1, Weekday,
};
use musubi_crdt::ids::{DocumentId, FacilityId, Role};
use musubi_facility::services::careplan::{self, LogInput, PlanSummary, PlanView};
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::commands::referral::{pdf_error, write_file};
use crate::error::{AppError, AppResult};
use crate::state::AppState;

/// Where an item goes among its siblings (needs among needs, a service among the services of its
/// short-term goal). JSON: `"first"`, `"last"`, `{ "before": id }` or `{ "after": id }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum PlacementInput {
    /// Before every sibling.
    First,
    /// After every sibling (where new items go by default).
    Last,
    /// Just before the sibling with this id.
    Before(String),
    /// Just after the sibling with this id.
    After(String),
}

impl From<PlacementInput> for Placement {
    fn from(p: PlacementInput) -> Self {
        match p {
            PlacementInput::First => Placement::First,
            PlacementInput::Last => Placement::Last,
            PlacementInput::Before(id) => Placement::Before(id),
            PlacementInput::After(id) => Placement::After(id),
        }
    }
}

fn placement(p: Option<PlacementInput>) -> Placement {
    p.map(Placement::from).unwrap_or(Placement::Last)
}

/// A facility's role in a plan, as the share screen offers and shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Reads the plan; writes nothing.
    Reader,
    /// Reads and writes (comments, 支援経過, monitoring, edits).
    Writer,
    /// The care-management office that made the plan; adds and removes members.
    Owner,
}

impl From<Role> for MemberRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Reader => MemberRole::Reader,
            Role::Writer => MemberRole::Writer,
            Role::Owner => MemberRole::Owner,
        }
    }
}

/// A facility to share a new plan with at once (e.g. the family doctor's clinic as a writer).
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct ShareWith {
    /// The facility.
    pub facility: FacilityId,
    /// Its role: `reader` or `writer` (`owner` is refused).
    pub role: MemberRole,
}

/// A member facility of a plan.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct PlanMember {
    /// The facility.
    pub facility: FacilityId,
    /// Its directory name (its id when the directory does not know it).
    pub name: String,
    /// Its role in the plan.
    pub role: MemberRole,
    /// Whether it is this facility.
    pub is_self: bool,
}

/// A field of 第1表 with how the editor shows it.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct PlanFieldInfo {
    /// The key `careplan_edit` takes.
    pub key: PlanField,
    /// The label on 第1表.
    pub label: String,
    /// The input type.
    pub input: FieldInput,
    /// For `digits` fields: how many digits.
    pub digits: Option<u32>,
    /// For `choice` and `category` fields: the accepted values, as the form's words.
    pub options: Vec<String>,
}

/// A field of an item of 第2表 or 第3表.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct ItemFieldInfo {
    /// The key `careplan_edit_item` takes.
    pub key: String,
    /// The label on the form.
    pub label: String,
}

/// The editable fields of one kind of item.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct ItemKindInfo {
    /// The kind.
    pub kind: ItemKind,
    /// Its name on the form.
    pub label: String,
    /// Its fields, in form order.
    pub fields: Vec<ItemFieldInfo>,
}

/// A day of 第3表 with its label.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct WeekdayInfo {
    /// The value `careplan_schedule` takes.
    pub day: Weekday,
    /// 月 … 日.
    pub label: String,
}

/// Every key the care-plan editor may use, with the form's labels.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct CarePlanFields {
    /// 第1表, in form order.
    pub sheet1: Vec<PlanFieldInfo>,
    /// Items of 第2表 and 第3表.
    pub items: Vec<ItemKindInfo>,
    /// The days of 第3表, Monday first.
    pub weekdays: Vec<WeekdayInfo>,
}

/// A goal just added, and which kind it became.
#[derive(Clone, Debug, Serialize, Deserialize, specta::Type)]
pub struct NewGoal {
    /// The new item's id.
    pub id: String,
    /// `long_term_goal` under a need, `short_term_goal` under a long-term goal.
    pub kind: ItemKind,
}

/// A service row (援助内容) of 第2表 to add.
#[derive(Clone, Debug, Default, Serialize, Deserialize, specta::Type)]
pub struct NewService {
    /// サービス内容.
    pub content: String,
    /// ※1 保険給付の対象 (○).
    pub insured: bool,
    /// サービス種別 (e.g. 訪問介護).
    pub kind: String,
    /// ※2 当該サービス提供を行う事業所.
    pub provider: String,
    /// サービス事業者コード (10 digits, or empty).
    pub provider_code: String,
    /// 頻度 (e.g. 週2回).
    pub frequency: String,
    /// 期間.
    pub period: String,
}

/// A 第5表 支援経過 entry to append.
#[derive(Clone, Debug, Default, Serialize, Deserialize, specta::Type)]
pub struct NewLogEntry {
    /// 年月日 `YYYY-MM-DD` (empty: today in Japan).
    pub date: String,
    /// 時刻 `HH:MM` (optional, empty).
    pub time: String,
    /// 項目 (e.g. 訪問, 電話, サービス担当者会議).
    pub category: String,
    /// 内容.
    pub text: String,
}

fn version(v: Option<u32>) -> Option<usize> {
    v.map(|n| n as usize)
}

/// Every field key and label of the care-plan editor (第1表 fields with their input types and
/// choices, the fields of each item kind, the days). Constant; needs no sign-in.
#[tauri::command]
#[specta::specta]
pub async fn careplan_fields() -> AppResult<CarePlanFields> {
    Ok(CarePlanFields {
        sheet1: PlanField::ALL
            .iter()
            .map(|&f| PlanFieldInfo {
                key: f,
                label: f.label().to_owned(),
                input: f.input(),
                digits: f.digits().map(|n| n as u32),
                options: f.options().into_iter().map(str::to_owned).collect(),
            })
            .collect(),
        items: ItemKind::ALL
            .into_iter()
            .map(|kind| ItemKindInfo {
                kind,
                label: kind.label().to_owned(),
                fields: kind
                    .fields()
                    .iter()
                    .map(|key| ItemFieldInfo {
                        key: (*key).to_owned(),
                        label: kind.field_label(key).unwrap_or(key).to_owned(),
                    })
                    .collect(),
            })
            .collect(),
        weekdays: Weekday::ALL
            .into_iter()
            .map(|day| WeekdayInfo {
                day,
                label: day.label().to_owned(),
            })
            .collect(),
    })
}

/// The plans this facility can read, oldest first: resident, care level, dates, planner, consent.
///
/// Errors: `locked`, `not_signed_in`, `not_enrolled`, `storage`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_list(state: State<'_, AppState>) -> AppResult<Vec<PlanSummary>> {
    state.with_staff(|e, _| Ok(careplan::list(e)?)).await
}

/// One plan (第1〜3表, 支援経過, monitoring, comments, the version list), or with `version` (1 = the
/// first recorded) the plan exactly as it was when that version was recorded.
///
/// Errors: `not_found`; `invalid_input` (no such version); `no_key` (sync to fetch it).
#[tauri::command]
#[specta::specta]
pub async fn careplan_get(
    state: State<'_, AppState>,
    id: DocumentId,
    version: Option<u32>,
) -> AppResult<PlanView> {
    state
        .with_staff(move |e, _| Ok(careplan::show(e, &id.to_string(), self::version(version))?))
        .await
}

/// Creates a plan from its 第1表, owned by this facility, optionally shared at once with another
/// facility (e.g. the family doctor's clinic as a writer); returns its id.
///
/// Errors: `invalid_input` (a malformed date, number or choice in `sheet1`, or `owner` as the
/// role); `not_found` (unknown facility).
#[tauri::command]
#[specta::specta]
pub async fn careplan_create(
    state: State<'_, AppState>,
    sheet1: Sheet1,
    share_with: Option<ShareWith>,
) -> AppResult<DocumentId> {
    let share = match share_with {
        None => None,
        Some(s) => Some((s.facility.to_string(), share_role(s.role)?)),
    };
    state
        .with_staff(move |e, _| {
            let share = share.as_ref().map(|(f, r)| (f.as_str(), *r));
            Ok(careplan::create(e, &sheet1, share)?)
        })
        .await
}

fn share_role(role: MemberRole) -> AppResult<Role> {
    match role {
        MemberRole::Reader => Ok(Role::Reader),
        MemberRole::Writer => Ok(Role::Writer),
        MemberRole::Owner => Err(AppError::invalid(
            "a plan has one owner, the office that made it; share it as a reader or a writer",
        )),
    }
}

/// Sets one field of 第1表 to `value` (text as a character diff; dates `YYYY-MM-DD`, choices as
/// the form's words, the category as `初回,紹介`; empty clears). One call is one committed change.
///
/// Errors: `invalid_input` (the message names the field and the expected form); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_edit(
    state: State<'_, AppState>,
    id: DocumentId,
    field: PlanField,
    value: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| Ok(careplan::edit(e, &id.to_string(), field.key(), &value)?))
        .await
}

/// Records the resident's consent (同意): 説明・同意日 (`YYYY-MM-DD`) and who consented.
///
/// Errors: `invalid_input` (a malformed date); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_consent(
    state: State<'_, AppState>,
    id: DocumentId,
    date: String,
    by: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| Ok(careplan::consent(e, &id.to_string(), &date, &by)?))
        .await
}

/// Adds a need (生活全般の解決すべき課題) to 第2表 at `placement` (null: last); returns its id.
///
/// Errors: `invalid_input` (unknown sibling, 99 needs already); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_add_need(
    state: State<'_, AppState>,
    id: DocumentId,
    text: String,
    placement: Option<PlacementInput>,
) -> AppResult<String> {
    state
        .with_staff(move |e, _| {
            Ok(careplan::add_need(
                e,
                &id.to_string(),
                &text,
                &self::placement(placement),
            )?)
        })
        .await
}

/// Adds a goal under `parent`: under a need a long-term goal (長期目標), under a long-term goal a
/// short-term goal (短期目標), with its （期間）; returns its id and kind.
///
/// Errors: `invalid_input` (`parent` is neither, or an unknown sibling); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_add_goal(
    state: State<'_, AppState>,
    id: DocumentId,
    parent: String,
    text: String,
    period: String,
    placement: Option<PlacementInput>,
) -> AppResult<NewGoal> {
    state
        .with_staff(move |e, _| {
            let (new, kind) = careplan::add_goal(
                e,
                &id.to_string(),
                &parent,
                &text,
                &period,
                &self::placement(placement),
            )?;
            Ok(NewGoal { id: new, kind })
        })
        .await
}

/// Adds a service row (援助内容) under the short-term goal `goal`; returns its id.
///
/// Errors: `invalid_input` (`goal` is not a short-term goal; the provider code is not 10 digits);
/// `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_add_service(
    state: State<'_, AppState>,
    id: DocumentId,
    goal: String,
    service: NewService,
    placement: Option<PlacementInput>,
) -> AppResult<String> {
    let service = Service {
        id: String::new(),
        content: service.content,
        insured: service.insured,
        kind: service.kind,
        provider: service.provider,
        provider_code: service.provider_code,
        frequency: service.frequency,
        period: service.period,
    };
    state
        .with_staff(move |e, _| {
            Ok(careplan::add_service(
                e,
                &id.to_string(),
                &goal,
                &service,
                &self::placement(placement),
            )?)
        })
        .await
}

/// Sets one field of the item `item` of 第2表 or 第3表 (the keys per kind come from
/// `careplan_fields`; `insured` takes `true`/`false`, `day` a weekday, times `HH:MM`).
///
/// Errors: `invalid_input` (unknown item or key, malformed value); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_edit_item(
    state: State<'_, AppState>,
    id: DocumentId,
    item: String,
    key: String,
    value: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| {
            Ok(careplan::edit_item(
                e,
                &id.to_string(),
                &item,
                &key,
                &value,
            )?)
        })
        .await
}

/// Moves an item of 第2表 among its siblings; concurrent edits of the item survive the move.
///
/// Errors: `invalid_input` (unknown item, a sibling that is not one, or a 第3表 item, which is
/// ordered by time); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_move_item(
    state: State<'_, AppState>,
    id: DocumentId,
    item: String,
    placement: PlacementInput,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| {
            Ok(careplan::move_item(
                e,
                &id.to_string(),
                &item,
                &placement.into(),
            )?)
        })
        .await
}

/// Removes an item with everything under it (a need takes its goals and services); returns what
/// kind of item it was.
///
/// Errors: `invalid_input` (unknown item); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_remove_item(
    state: State<'_, AppState>,
    id: DocumentId,
    item: String,
) -> AppResult<ItemKind> {
    state
        .with_staff(move |e, _| Ok(careplan::remove_item(e, &id.to_string(), &item)?))
        .await
}

/// Adds a service to the weekly grid (第3表): `day`, `start` and `end` as `HH:MM` (end after
/// start, up to `24:00`); returns its id.
///
/// Errors: `invalid_input` (malformed time, end not after start); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_schedule(
    state: State<'_, AppState>,
    id: DocumentId,
    day: Weekday,
    start: String,
    end: String,
    service: String,
) -> AppResult<String> {
    state
        .with_staff(move |e, _| {
            Ok(careplan::schedule(
                e,
                &id.to_string(),
                day,
                &start,
                &end,
                &service,
            )?)
        })
        .await
}

/// Adds an activity to 主な日常生活上の活動 (第3表): `start` `HH:MM`, `end` `HH:MM` or empty for a
/// moment such as 起床; returns its id.
///
/// Errors: `invalid_input`; `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_add_activity(
    state: State<'_, AppState>,
    id: DocumentId,
    start: String,
    end: String,
    text: String,
) -> AppResult<String> {
    state
        .with_staff(move |e, _| {
            Ok(careplan::add_activity(
                e,
                &id.to_string(),
                &start,
                &end,
                &text,
            )?)
        })
        .await
}

/// Sets 週単位以外のサービス (第3表), as a character diff.
///
/// Errors: `invalid_input` (over 128 KiB); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_set_non_weekly(
    state: State<'_, AppState>,
    id: DocumentId,
    text: String,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| Ok(careplan::set_non_weekly(e, &id.to_string(), &text)?))
        .await
}

/// Appends an entry to 第5表 居宅介護支援経過, written by the signed-in staff member of this
/// facility; returns its id. Entries are never edited or removed.
///
/// Errors: `invalid_input` (malformed date or time); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_log(
    state: State<'_, AppState>,
    id: DocumentId,
    entry: NewLogEntry,
) -> AppResult<String> {
    let input = LogInput {
        date: entry.date,
        time: entry.time,
        category: entry.category,
        text: entry.text,
    };
    state
        .with_staff(move |e, staff| Ok(careplan::log(e, &id.to_string(), &input, &staff.name)?))
        .await
}

/// Appends a monitoring entry (`date` `YYYY-MM-DD`, empty: today), optionally about one goal
/// (`goal`: an item id), by the signed-in staff member; returns its id.
///
/// Errors: `invalid_input` (malformed date, unknown goal); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_monitor(
    state: State<'_, AppState>,
    id: DocumentId,
    date: String,
    goal: Option<String>,
    text: String,
) -> AppResult<String> {
    state
        .with_staff(move |e, staff| {
            Ok(careplan::monitor(
                e,
                &id.to_string(),
                &date,
                goal.as_deref().filter(|g| !g.is_empty()),
                &text,
                &staff.name,
            )?)
        })
        .await
}

/// Appends a comment on the plan (optionally about one item, `about`: its id) by the signed-in
/// staff member; returns its id.
///
/// Errors: `invalid_input` (unknown item); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_comment(
    state: State<'_, AppState>,
    id: DocumentId,
    about: Option<String>,
    text: String,
) -> AppResult<String> {
    state
        .with_staff(move |e, staff| {
            Ok(careplan::comment(
                e,
                &id.to_string(),
                about.as_deref().filter(|a| !a.is_empty()),
                &text,
                &staff.name,
            )?)
        })
        .await
}

/// Records the plan as it stands as a new version (版) with a note, by the signed-in staff
/// member; returns its number (1 for the first).
///
/// Errors: `invalid_input` (1,000 versions already); `read_only`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_record_version(
    state: State<'_, AppState>,
    id: DocumentId,
    note: String,
) -> AppResult<u32> {
    state
        .with_staff(move |e, staff| {
            Ok(careplan::record_version(e, &id.to_string(), &note, &staff.name)? as u32)
        })
        .await
}

/// The member facilities of a plan, owner first.
///
/// Errors: `not_found`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_members(
    state: State<'_, AppState>,
    id: DocumentId,
) -> AppResult<Vec<PlanMember>> {
    state
        .with_staff(move |e, _| {
            let info = e.document_info(&id.to_string())?;
            let me = e.enrolment()?.facility;
            let dir = e.directory().ok();
            let mut out: Vec<PlanMember> = info
                .members
                .iter()
                .map(|m| PlanMember {
                    facility: m.facility,
                    name: dir
                        .as_ref()
                        .and_then(|d| d.facility(m.facility))
                        .map(|f| f.name.clone())
                        .unwrap_or_else(|| m.facility.to_string()),
                    role: m.role.into(),
                    is_self: m.facility == me,
                })
                .collect();
            out.sort_by_key(|m| (m.role != MemberRole::Owner, m.name.clone()));
            Ok(out)
        })
        .await
}

/// Shares the plan with `facility` as `role` (`reader` or `writer`), or removes it (`role` null,
/// which also gives the plan a new key the removed facility does not get). Owner only.
///
/// Errors: `read_only` (this facility is not the owner); `not_found` (unknown facility);
/// `invalid_input` (`owner` as the role).
#[tauri::command]
#[specta::specta]
pub async fn careplan_share(
    state: State<'_, AppState>,
    id: DocumentId,
    facility: FacilityId,
    role: Option<MemberRole>,
) -> AppResult<()> {
    let role = role.map(share_role).transpose()?;
    state
        .with_staff(move |e, _| {
            let doc = e.document_info(&id.to_string())?.id;
            Ok(e.share(doc, &facility.to_string(), role)?)
        })
        .await
}

/// Writes the MHLW ケアプランデータ連携 CSV files (第1表, 第2表, 第3表, 利用者補足情報; Shift_JIS) of
/// the plan (or of `version`) into the directory `dir` (picked with the open dialog), named as
/// the standard names them; `to_office` (10 digits) and `to_service_type` (2 digits) address the
/// provider (null: `0000000000` and `00`). Returns the paths written.
///
/// Errors: `not_found`; `invalid_input` (the plan breaks the CSV standard's limits); `storage`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_export_csv(
    state: State<'_, AppState>,
    id: DocumentId,
    dir: String,
    version: Option<u32>,
    to_office: Option<String>,
    to_service_type: Option<String>,
) -> AppResult<Vec<String>> {
    state
        .with_staff(move |e, _| {
            let files = careplan::export_csv_files(
                e,
                &id.to_string(),
                self::version(version),
                to_office.as_deref().unwrap_or("0000000000"),
                to_service_type.as_deref().unwrap_or("00"),
            )?;
            let dir = PathBuf::from(dir);
            let mut written = Vec::new();
            for (name, bytes) in files {
                let path = dir.join(name);
                write_file(&path, &bytes)?;
                written.push(path.display().to_string());
            }
            Ok(written)
        })
        .await
}

/// Prints 第1表〜第3表 of the plan (or of `version`) to a PDF at `path` (picked with the save
/// dialog), in the forms' layout (A4 landscape).
///
/// Errors: `not_found`; `internal` when no Japanese font is installed (the message names the
/// package); `storage`.
#[tauri::command]
#[specta::specta]
pub async fn careplan_export_pdf(
    state: State<'_, AppState>,
    id: DocumentId,
    path: String,
    version: Option<u32>,
) -> AppResult<()> {
    state
        .with_staff(move |e, _| {
            let pdf = careplan::export_pdf(e, &id.to_string(), self::version(version))
                .map_err(pdf_error)?;
            write_file(&PathBuf::from(path), &pdf)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_read_as_the_bindings_write_them() {
        let cases = [
            (r#""first""#, PlacementInput::First),
            (r#""last""#, PlacementInput::Last),
            (
                r#"{"before":"ab12"}"#,
                PlacementInput::Before("ab12".into()),
            ),
            (r#"{"after":"ab12"}"#, PlacementInput::After("ab12".into())),
        ];
        for (json, want) in cases {
            let got: PlacementInput = serde_json::from_str(json).expect(json);
            assert_eq!(got, want);
            assert_eq!(serde_json::to_string(&want).expect("serialise"), json);
        }
        assert_eq!(
            Placement::from(PlacementInput::After("x".into())),
            Placement::After("x".into())
        );
    }

    #[test]
    fn owner_is_not_a_role_to_share_with() {
        assert!(share_role(MemberRole::Owner).is_err());
        assert_eq!(
            share_role(MemberRole::Writer).expect("writer"),
            Role::Writer
        );
    }
}
