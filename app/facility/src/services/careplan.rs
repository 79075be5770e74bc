//! 居宅サービス計画書: care plans, owned by a care-management office and shared with the resident's
//! family doctor and service providers (DESIGN "Membership policy": the owner adds whom it chooses).
//!
//! Every call loads the plan's document, makes one edit through [`musubi_crdt::documents::careplan`]
//! and commits it as one sealed bundle; reading never writes. Ids of new items are random (16 hex
//! digits); items can be named by a unique prefix of at least 4 characters. Entries (支援経過,
//! monitoring, comments, versions) are attributed to this facility and the staff member given.

use automerge::AutoCommit;
use musubi_crdt::audit::AuditAction;
use musubi_crdt::documents::careplan::{
    self as schema, Activity, Author, CarePlan, Comment, ItemKind, LogEntry, MonitoringEntry,
    Placement, PlanField, Service, Sheet1, Weekday, WeeklyEntry,
};
use musubi_crdt::documents::careplan_csv::{self, Addressing, CsvFile};
use musubi_crdt::ids::{DocumentId, DocumentKind, Role};
use musubi_crdt::ops::Member;
use serde::Serialize;

use crate::engine::{Engine, EngineError, Result, now_ms, random};
use crate::pdf::{self, PdfError};

/// A plan as shown to users: its document id and the plan (or one of its versions).
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct PlanView {
    /// The plan's id (the document id, the same at every facility).
    pub id: DocumentId,
    /// The version shown (`None`: the current plan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<usize>,
    /// The plan.
    #[serde(flatten)]
    pub plan: CarePlan,
    /// Bundles this device cannot read yet (no key for their epoch).
    // Left out of the JSON when zero; `default` after `skip_serializing_if` also makes specta
    // export the key as optional (`unreadable_bundles?: number`), as serde writes it.
    #[serde(skip_serializing_if = "is_zero", default)]
    pub unreadable_bundles: usize,
}

/// One line of `list`: who the plan is for and where it stands.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct PlanSummary {
    /// The plan's id.
    pub id: DocumentId,
    /// 利用者名.
    pub resident: String,
    /// 生年月日.
    pub birth_date: String,
    /// 要介護状態区分 (the form's words, empty when not set).
    pub care_level: String,
    /// 作成年月日.
    pub created_on: String,
    /// 居宅サービス計画作成（変更）日.
    pub changed_on: String,
    /// 居宅サービス計画作成者氏名.
    pub planner: String,
    /// 同意: the date, empty while the resident has not consented.
    pub consented_on: String,
    /// Number of needs (課題) in 第2表.
    pub needs: usize,
    /// Number of recorded versions.
    pub versions: usize,
}

/// Errors of the PDF export: reading the plan, or rendering it.
#[derive(Debug, thiserror::Error)]
pub enum PdfExportError {
    /// The plan could not be read.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The PDF could not be made (e.g. no Japanese font installed).
    #[error(transparent)]
    Pdf(#[from] PdfError),
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A new random item id: 16 lowercase hex digits.
fn new_id() -> String {
    hex::encode(random::<8>())
}

/// Now as RFC 3339 (UTC), for `recorded_at`.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms()),
    )
    .to_string()
}

/// Today's date in Japan (JST, UTC+9, no daylight saving), `YYYY-MM-DD`: the default date of entries.
pub fn today_jst() -> String {
    date_jst(now_ms())
}

/// The date in Japan (JST, UTC+9) at `ms` milliseconds since the Unix epoch, `YYYY-MM-DD`.
pub fn date_jst(ms: u64) -> String {
    let days = ((ms / 1000 + 9 * 3600) / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn parse_id(engine: &Engine, id: &str) -> Result<DocumentId> {
    let info = engine.document_info(id)?;
    if info.kind != DocumentKind::CarePlan {
        return Err(EngineError::UnknownDocument(format!(
            "{id} (it is a {} document, not a care plan)",
            info.kind
        )));
    }
    Ok(info.id)
}

fn author(engine: &Engine, staff: &str) -> Result<Author> {
    let enrolment = engine.enrolment()?;
    Ok(Author {
        facility: enrolment.facility.to_string(),
        facility_name: enrolment.facility_name,
        staff: staff.trim().to_owned(),
    })
}

/// Loads the plan, lets `edit` change it (it sees the plan as read before the edit), commits.
/// Loads the plan, applies `edit`, commits, and records the change in the audit log as touching
/// `what` (a field or part of the plan, never its value).
fn edit_plan<T>(
    engine: &mut Engine,
    id: &str,
    what: &str,
    edit: impl FnOnce(&mut AutoCommit, &CarePlan) -> Result<T>,
) -> Result<T> {
    let doc = parse_id(engine, id)?;
    let mut loaded = engine.load(doc)?;
    let plan = schema::read(&loaded.doc)?;
    let out = edit(&mut loaded.doc, &plan)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &[what])?;
    Ok(out)
}

/// Resolves an item id or unique prefix to its full id (and checks its kind when `kind` is given).
fn resolve(plan: &CarePlan, item: &str, kind: Option<ItemKind>) -> Result<String> {
    let (id, found) = plan.resolve_item(item)?;
    if let Some(kind) = kind
        && kind != found
    {
        return Err(musubi_crdt::documents::DocumentError::InvalidValue {
            key: "item".to_owned(),
            reason: format!(
                "`{item}` is a {} ({found:?}), not a {} ({kind:?})",
                found.label(),
                kind.label()
            ),
        }
        .into());
    }
    Ok(id)
}

/// A [`Placement`] whose sibling ids may be prefixes.
fn resolve_placement(plan: &CarePlan, placement: &Placement) -> Result<Placement> {
    Ok(match placement {
        Placement::Before(id) => Placement::Before(resolve(plan, id, None)?),
        Placement::After(id) => Placement::After(resolve(plan, id, None)?),
        other => other.clone(),
    })
}

/// Creates a plan for the resident of `sheet1`, owned by this facility, and returns its id.
///
/// `share_with`: another facility (id or exact name in the directory) to make a member at once,
/// e.g. the family doctor's clinic as a writer.
pub fn create(
    engine: &mut Engine,
    sheet1: &Sheet1,
    share_with: Option<(&str, Role)>,
) -> Result<DocumentId> {
    let mut members = Vec::new();
    if let Some((facility, role)) = share_with {
        let target = engine.find_facility(facility)?;
        members.push(Member {
            facility: target.id,
            role,
        });
    }
    let doc = engine.create_document(DocumentKind::CarePlan, members, |doc| {
        schema::init(doc, sheet1)?;
        Ok(())
    })?;
    super::audit(engine, AuditAction::Create, Some(doc), &[])?;
    Ok(doc)
}

/// Every plan this facility can read, oldest first.
pub fn list(engine: &Engine) -> Result<Vec<PlanSummary>> {
    // The list shows each resident's name, birth date and care level.
    super::audit(engine, AuditAction::Read, None, &["care-plan-list"])?;
    let mut out = Vec::new();
    for row in engine.store().documents(Some(DocumentKind::CarePlan))? {
        let view = match show_doc(engine, row.info.id, None) {
            Ok(v) => v,
            Err(EngineError::NoKey(_)) => continue,
            Err(EngineError::Document(e)) if matches!(&*e, musubi_crdt::documents::DocumentError::WrongKind { found, .. } if found.is_empty()) =>
            {
                continue; // the key came before the plan's first bundle
            }
            Err(e) => return Err(e),
        };
        let s = &view.plan.sheet1;
        out.push(PlanSummary {
            id: view.id,
            resident: s.resident.name.clone(),
            birth_date: s.resident.birth_date.clone(),
            care_level: s
                .care_level
                .map(|c| c.label().to_owned())
                .unwrap_or_default(),
            created_on: s.created_on.clone(),
            changed_on: s.changed_on.clone(),
            planner: s.planner.clone(),
            consented_on: s.consent.date.clone(),
            needs: view.plan.needs.len(),
            versions: view.plan.versions.len(),
        });
    }
    Ok(out)
}

fn show_doc(engine: &Engine, doc: DocumentId, version: Option<usize>) -> Result<PlanView> {
    let mut loaded = engine.load(doc)?;
    let plan = match version {
        None => schema::read(&loaded.doc)?,
        Some(n) => schema::read_version(loaded.doc.document(), n)?,
    };
    Ok(PlanView {
        id: doc,
        version,
        plan,
        unreadable_bundles: loaded.unreadable,
    })
}

/// One plan, or (with `version`) one of its recorded versions as it was then (recorded as read in
/// the audit log).
pub fn show(engine: &Engine, id: &str, version: Option<usize>) -> Result<PlanView> {
    let doc = parse_id(engine, id)?;
    let view = show_doc(engine, doc, version)?;
    super::audit(engine, AuditAction::Read, Some(doc), &[])?;
    Ok(view)
}

/// Sets a field of 第1表 (`field` is a key such as `policy` or `resident.address`; see [`PlanField`]).
pub fn edit(engine: &mut Engine, id: &str, field: &str, value: &str) -> Result<()> {
    let field_name = field;
    let field: PlanField = field.parse()?;
    edit_plan(engine, id, field_name, |doc, _| {
        schema::set_field(doc, field, value)?;
        Ok(())
    })
}

/// Records the resident's consent (同意): 説明・同意日 and who consented.
pub fn consent(engine: &mut Engine, id: &str, date: &str, by: &str) -> Result<()> {
    edit_plan(engine, id, "consent", |doc, _| {
        schema::set_field(doc, PlanField::ConsentDate, date)?;
        schema::set_field(doc, PlanField::ConsentBy, by)?;
        Ok(())
    })
}

/// Adds a need (生活全般の解決すべき課題) to 第2表; returns its id.
pub fn add_need(
    engine: &mut Engine,
    id: &str,
    text: &str,
    placement: &Placement,
) -> Result<String> {
    let new = new_id();
    edit_plan(engine, id, "add-need", |doc, plan| {
        let placement = resolve_placement(plan, placement)?;
        schema::add_need(doc, &new, text, &placement)?;
        Ok(())
    })?;
    Ok(new)
}

/// Adds a goal under `parent`: under a need, a long-term goal (長期目標); under a long-term goal, a
/// short-term goal (短期目標). Returns the new id and which kind of goal it is.
pub fn add_goal(
    engine: &mut Engine,
    id: &str,
    parent: &str,
    text: &str,
    period: &str,
    placement: &Placement,
) -> Result<(String, ItemKind)> {
    let new = new_id();
    let kind = edit_plan(engine, id, "add-goal", |doc, plan| {
        let (parent, kind) = plan.resolve_item(parent)?;
        let placement = resolve_placement(plan, placement)?;
        match kind {
            ItemKind::Need => {
                schema::add_long_term_goal(doc, &parent, &new, text, period, &placement)?;
                Ok(ItemKind::LongTermGoal)
            }
            ItemKind::LongTermGoal => {
                schema::add_short_term_goal(doc, &parent, &new, text, period, &placement)?;
                Ok(ItemKind::ShortTermGoal)
            }
            other => Err(musubi_crdt::documents::DocumentError::InvalidValue {
                key: "parent".to_owned(),
                reason: format!(
                    "a goal goes under a need (長期目標) or a long-term goal (短期目標), not under a {}",
                    other.label()
                ),
            }
            .into()),
        }
    })?;
    Ok((new, kind))
}

/// Adds a service row (援助内容) under the short-term goal `goal`; returns its id.
pub fn add_service(
    engine: &mut Engine,
    id: &str,
    goal: &str,
    service: &Service,
    placement: &Placement,
) -> Result<String> {
    let new = new_id();
    edit_plan(engine, id, "add-service", |doc, plan| {
        let goal = resolve(plan, goal, Some(ItemKind::ShortTermGoal))?;
        let placement = resolve_placement(plan, placement)?;
        schema::add_service(doc, &goal, &new, service, &placement)?;
        Ok(())
    })?;
    Ok(new)
}

/// Sets a field of an item of 第2表 or 第3表 (see [`ItemKind::fields`]).
pub fn edit_item(engine: &mut Engine, id: &str, item: &str, key: &str, value: &str) -> Result<()> {
    edit_plan(engine, id, "edit-item", |doc, plan| {
        let item = resolve(plan, item, None)?;
        schema::set_item_field(doc, &item, key, value)?;
        Ok(())
    })
}

/// Moves an item of 第2表 among its siblings.
pub fn move_item(engine: &mut Engine, id: &str, item: &str, placement: &Placement) -> Result<()> {
    edit_plan(engine, id, "move-item", |doc, plan| {
        let item = resolve(plan, item, None)?;
        let placement = resolve_placement(plan, placement)?;
        schema::move_item(doc, &item, &placement)?;
        Ok(())
    })
}

/// Removes an item (with what is under it); returns what kind of item it was.
pub fn remove_item(engine: &mut Engine, id: &str, item: &str) -> Result<ItemKind> {
    edit_plan(engine, id, "remove-item", |doc, plan| {
        let item = resolve(plan, item, None)?;
        Ok(schema::remove_item(doc, &item)?)
    })
}

/// Adds a service to the weekly grid (第3表); returns its id.
pub fn schedule(
    engine: &mut Engine,
    id: &str,
    day: Weekday,
    start: &str,
    end: &str,
    service: &str,
) -> Result<String> {
    let entry = WeeklyEntry {
        id: new_id(),
        day,
        start: start.to_owned(),
        end: end.to_owned(),
        service: service.to_owned(),
    };
    edit_plan(engine, id, "schedule", |doc, _| {
        Ok(schema::add_weekly_entry(doc, &entry)?)
    })?;
    Ok(entry.id)
}

/// Adds an activity to 主な日常生活上の活動 (第3表); returns its id.
pub fn add_activity(
    engine: &mut Engine,
    id: &str,
    start: &str,
    end: &str,
    text: &str,
) -> Result<String> {
    let activity = Activity {
        id: new_id(),
        start: start.to_owned(),
        end: end.to_owned(),
        text: text.to_owned(),
    };
    edit_plan(engine, id, "add-activity", |doc, _| {
        Ok(schema::add_activity(doc, &activity)?)
    })?;
    Ok(activity.id)
}

/// Sets 週単位以外のサービス (第3表).
pub fn set_non_weekly(engine: &mut Engine, id: &str, text: &str) -> Result<()> {
    edit_plan(engine, id, "set-non-weekly", |doc, _| {
        Ok(schema::set_non_weekly(doc, text)?)
    })
}

/// What a 支援経過 entry says (its id, author and recording time are added here).
#[derive(Clone, Debug, Default)]
pub struct LogInput {
    /// 年月日 (`YYYY-MM-DD`; empty: today in Japan).
    pub date: String,
    /// 時刻 (`HH:MM`, optional).
    pub time: String,
    /// 項目 (e.g. 訪問, 電話, 往診).
    pub category: String,
    /// 内容.
    pub text: String,
}

/// Appends an entry to 第5表 居宅介護支援経過; returns its id.
pub fn log(engine: &mut Engine, id: &str, input: &LogInput, staff: &str) -> Result<String> {
    let entry = LogEntry {
        id: new_id(),
        date: or_today(&input.date),
        time: input.time.clone(),
        category: input.category.clone(),
        text: input.text.clone(),
        author: author(engine, staff)?,
        recorded_at: now_rfc3339(),
    };
    edit_plan(engine, id, "log", |doc, _| {
        Ok(schema::append_log(doc, &entry)?)
    })?;
    Ok(entry.id)
}

/// Appends a monitoring entry (optionally about one goal); returns its id.
pub fn monitor(
    engine: &mut Engine,
    id: &str,
    date: &str,
    goal: Option<&str>,
    text: &str,
    staff: &str,
) -> Result<String> {
    let mut entry = MonitoringEntry {
        id: new_id(),
        date: or_today(date),
        goal: String::new(),
        text: text.to_owned(),
        author: author(engine, staff)?,
        recorded_at: now_rfc3339(),
    };
    edit_plan(engine, id, "monitor", |doc, plan| {
        if let Some(goal) = goal {
            entry.goal = resolve(plan, goal, None)?;
        }
        Ok(schema::append_monitoring(doc, &entry)?)
    })?;
    Ok(entry.id)
}

/// Appends a comment (optionally about one item); returns its id.
pub fn comment(
    engine: &mut Engine,
    id: &str,
    about: Option<&str>,
    text: &str,
    staff: &str,
) -> Result<String> {
    let mut comment = Comment {
        id: new_id(),
        at: now_rfc3339(),
        about: String::new(),
        text: text.to_owned(),
        author: author(engine, staff)?,
    };
    edit_plan(engine, id, "comment", |doc, plan| {
        if let Some(about) = about {
            comment.about = resolve(plan, about, None)?;
        }
        Ok(schema::append_comment(doc, &comment)?)
    })?;
    Ok(comment.id)
}

/// Records the plan as it stands as a new version; returns its number.
pub fn record_version(engine: &mut Engine, id: &str, note: &str, staff: &str) -> Result<usize> {
    let who = author(engine, staff)?;
    let at = now_rfc3339();
    edit_plan(engine, id, "record-version", |doc, _| {
        Ok(schema::record_version(doc, &new_id(), note, &who, &at)?)
    })
}

/// One file of the ケアプランデータ連携 CSV (Shift_JIS bytes) for the plan or one of its versions.
pub fn export_csv(
    engine: &Engine,
    id: &str,
    file: CsvFile,
    version: Option<usize>,
) -> Result<Vec<u8>> {
    let doc = parse_id(engine, id)?;
    let view = show_doc(engine, doc, version)?;
    super::audit(engine, AuditAction::Export, Some(doc), &["csv"])?;
    Ok(careplan_csv::export(file, &view.plan)?)
}

/// The four files sent together (第1表, 第2表, 第3表, 利用者補足情報), named as the standard names them:
/// `(file name, Shift_JIS bytes)`. The sender is the plan's 介護支援事業者コード; `to_office` and
/// `to_service_type` name the provider (`0000000000` and `00` when unknown).
pub fn export_csv_files(
    engine: &Engine,
    id: &str,
    version: Option<usize>,
    to_office: &str,
    to_service_type: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    let doc = parse_id(engine, id)?;
    let view = show_doc(engine, doc, version)?;
    super::audit(engine, AuditAction::Export, Some(doc), &["csv"])?;
    let made_at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms() + 9 * 3_600_000),
    )
    .to_string()
    .chars()
    .filter(char::is_ascii_digit)
    .take(14)
    .collect::<String>();
    let from = view.plan.sheet1.office.code.trim();
    let addressing = Addressing {
        from_office: if from.is_empty() { "0000000000" } else { from }.to_owned(),
        to_office: to_office.to_owned(),
        to_service_type: to_service_type.to_owned(),
        made_at,
    };
    CsvFile::ALL
        .into_iter()
        .map(|file| {
            Ok((
                careplan_csv::file_name(file, &addressing),
                careplan_csv::export(file, &view.plan)?,
            ))
        })
        .collect()
}

/// 第1表〜第3表 as a PDF in the forms' layout, with a Japanese font found on this system.
pub fn export_pdf(
    engine: &Engine,
    id: &str,
    version: Option<usize>,
) -> std::result::Result<Vec<u8>, PdfExportError> {
    let doc = parse_id(engine, id)?;
    let view = show_doc(engine, doc, version)?;
    let font = pdf::find_font()?;
    super::audit(engine, AuditAction::Print, Some(doc), &["第1表〜第3表"])?;
    Ok(pdf::render(&view.plan, &font)?)
}

fn or_today(date: &str) -> String {
    if date.trim().is_empty() {
        today_jst()
    } else {
        date.trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_089), (2025, 1, 1));
        assert!(schema::is_date(&today_jst()));
    }
}
