//! 設定 → 監査ログ: this device's audit log for its administrators (医療情報システムの安全管理に関する
//! ガイドライン 第6.0版: アクセスログの記録と定期的な確認, ログの改ざん防止). Listing and verifying are
//! themselves recorded (`audit-read`), and a 定期確認 (periodic review) records who reviewed which
//! period (`review`). Every command here is for an administrator only (`admin_only` otherwise).

use std::collections::BTreeMap;

use musubi_crdt::audit::AuditAction;
use musubi_crdt::ids::DocumentId;
use musubi_facility::Engine;
use musubi_facility::audit::{self, AuditRecord, Filter};
use musubi_facility::services::shelter::ms_to_rfc3339;
use musubi_facility::staff;
use serde::{Deserialize, Serialize};
use tauri::State;

use crate::error::{AppError, AppResult};
use crate::state::AppState;

/// Most entries one `audit_list` returns (the newest that match): narrow the filters for older ones.
pub const AUDIT_PAGE_MAX: usize = 500;
/// Most past reviews `audit_list` returns (the newest).
pub const REVIEWS_SHOWN_MAX: usize = 24;
/// Japan Standard Time, UTC+9 (Japan has no daylight saving time): a review's period is named in
/// the dates of the municipality that keeps the log.
const JST_OFFSET_MS: i64 = 9 * 3600 * 1000;

/// Which entries to list: every given condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditQuery {
    /// Only this staff member's (login; a failed sign-in names the login tried).
    pub staff: Option<String>,
    /// Only about this document (its id).
    pub doc: Option<String>,
    /// Only this action.
    pub action: Option<AuditAction>,
    /// Only at or after this time, in milliseconds since the Unix epoch.
    pub since_ms: Option<f64>,
    /// Only before this time, in milliseconds since the Unix epoch.
    pub until_ms: Option<f64>,
}

/// One audit entry as the screen shows it (field names only, never values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditEntryView {
    /// Its place in its device's chain, from 1 (with `device`, what names the entry).
    pub seq: f64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: f64,
    /// The staff member (login), or null when no one was signed in.
    pub staff: Option<String>,
    /// That staff member's name, when the login is an account of this device.
    pub staff_name: Option<String>,
    /// The device that wrote it.
    pub device: String,
    /// Whether this device wrote it (else another device of the facility, or at an HQ a
    /// shelter's, whose entries came through an audit document).
    pub this_device: bool,
    /// The facility of that device (its id).
    pub facility: String,
    /// That facility's name, from the verified directory.
    pub facility_name: Option<String>,
    /// The document, if any.
    pub doc: Option<String>,
    /// What was done.
    pub action: AuditAction,
    /// The fields touched, or what the action names (`password`, `idle`, `period:...`).
    pub fields: Vec<String>,
}

/// A past 定期確認: who reviewed which period, when, and what they saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditReviewView {
    /// The `review` entry's place in its device's chain.
    pub seq: f64,
    /// The device it was recorded on.
    pub device: String,
    /// When the review was recorded, in milliseconds since the Unix epoch.
    pub at_ms: f64,
    /// The administrator (login).
    pub staff: Option<String>,
    /// Their name, when the login is an account of this device.
    pub staff_name: Option<String>,
    /// The first day reviewed (`YYYY-MM-DD`, Japan time).
    pub from: String,
    /// The last day reviewed (`YYYY-MM-DD`, Japan time).
    pub to: String,
    /// How many entries the period held.
    pub entries: u32,
    /// Whether every chain verified at the review (null when the entry does not say).
    pub chain_intact: Option<bool>,
}

/// What the 監査ログ screen shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditPage {
    /// The entries that match, newest first, at most [`AUDIT_PAGE_MAX`].
    pub entries: Vec<AuditEntryView>,
    /// How many entries match in all.
    pub matched: u32,
    /// The past reviews, newest first, at most [`REVIEWS_SHOWN_MAX`].
    pub reviews: Vec<AuditReviewView>,
}

/// Where a device's chain stops verifying.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditBreak {
    /// The entry (place in the chain) that does not verify, or the first one missing.
    pub seq: f64,
    /// Why (English, from the engine).
    pub reason: String,
}

/// One device's chain as the check found it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditChainView {
    /// The device.
    pub device: String,
    /// Whether it is this device (its chain read from its disk and compared with its copy in the
    /// facility's audit document); else the chain is the copy an audit document holds.
    pub this_device: bool,
    /// Its facility (id).
    pub facility: String,
    /// That facility's name, from the verified directory.
    pub facility_name: Option<String>,
    /// Entries verified (none when it is broken).
    pub entries: u32,
    /// The first entry's place (over 1 when retention removed older ones).
    pub first: Option<f64>,
    /// The newest entry's place.
    pub last: Option<f64>,
    /// Where it breaks: an entry altered, removed, moved, or the newest ones cut off.
    pub broken: Option<AuditBreak>,
}

/// What verifying the log found: this device's chain first, then the facility's other devices'
/// (and at an HQ the shelters') as their audit documents hold them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct AuditVerdict {
    /// Whether every chain verified.
    pub intact: bool,
    /// Entries verified in all.
    pub entries: u32,
    /// Each device's chain.
    pub chains: Vec<AuditChainView>,
}

/// Logins of this device's accounts → their names.
fn names(engine: &Engine) -> AppResult<BTreeMap<String, String>> {
    Ok(staff::list(engine)?
        .into_iter()
        .map(|s| (s.login, s.name))
        .collect())
}

/// Facility ids → their names, from the verified directory (empty before joining).
fn facility_names(engine: &Engine) -> BTreeMap<String, String> {
    engine
        .directory()
        .map(|d| {
            d.facilities
                .iter()
                .map(|f| (f.id.to_string(), f.name.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn view(
    r: &AuditRecord,
    names: &BTreeMap<String, String>,
    facilities: &BTreeMap<String, String>,
    me: &str,
) -> AppResult<AuditEntryView> {
    let action: AuditAction = r.action.parse().map_err(|_| {
        AppError::new(
            crate::error::ErrorKind::Internal,
            format!("an audit entry has an unknown action {:?}", r.action),
        )
    })?;
    Ok(AuditEntryView {
        seq: r.seq as f64,
        at_ms: r.at_ms as f64,
        staff: r.staff.clone(),
        staff_name: r.staff.as_ref().and_then(|l| names.get(l).cloned()),
        device: r.device.clone(),
        this_device: r.device == me,
        facility: r.facility.clone(),
        facility_name: facilities.get(&r.facility).cloned(),
        doc: r.doc.clone(),
        action,
        fields: r.fields.clone(),
    })
}

/// A `review` entry read back (its fields as [`audit_review`] writes them).
fn review_of(r: &AuditRecord, names: &BTreeMap<String, String>) -> AuditReviewView {
    let field = |prefix: &str| {
        r.fields
            .iter()
            .find_map(|f| f.strip_prefix(prefix).map(str::to_owned))
    };
    let period = field("period:").unwrap_or_default();
    let (from, to) = period.split_once('/').unwrap_or((&period, ""));
    AuditReviewView {
        seq: r.seq as f64,
        device: r.device.clone(),
        at_ms: r.at_ms as f64,
        staff: r.staff.clone(),
        staff_name: r.staff.as_ref().and_then(|l| names.get(l).cloned()),
        from: from.to_owned(),
        to: to.to_owned(),
        entries: field("entries:").and_then(|n| n.parse().ok()).unwrap_or(0),
        chain_intact: field("chain:").map(|c| c == "intact"),
    }
}

/// A time from the UI (milliseconds since the Unix epoch).
///
/// Errors: `invalid_input` for a negative or non-finite time.
fn ms(name: &str, t: f64) -> AppResult<u64> {
    if !t.is_finite() || t < 0.0 {
        return Err(AppError::invalid(format!("{name} is not a time")));
    }
    Ok(t as u64)
}

/// The engine's filter for `q`.
///
/// Errors: `invalid_input` for a malformed document id or time.
fn filter_of(q: &AuditQuery) -> AppResult<Filter> {
    let doc = match q.doc.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
        None => None,
        Some(d) => Some(
            d.parse::<DocumentId>()
                .map_err(|_| AppError::invalid(format!("{d:?} is not a document id")))?,
        ),
    };
    Ok(Filter {
        staff: q
            .staff
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        doc,
        action: q.action,
        since_ms: q.since_ms.map(|t| ms("since_ms", t)).transpose()?,
        until_ms: q.until_ms.map(|t| ms("until_ms", t)).transpose()?,
    })
}

/// Whether `r` matches `f` (as `audit::list` filters: every given condition holds; `until` is
/// exclusive).
fn matches(f: &Filter, r: &AuditRecord) -> bool {
    f.staff.as_ref().is_none_or(|s| r.staff.as_ref() == Some(s))
        && f.doc
            .is_none_or(|d| r.doc.as_deref() == Some(d.to_string().as_str()))
        && f.action.is_none_or(|a| r.action == a.as_str())
        && f.since_ms.is_none_or(|t| r.at_ms >= t)
        && f.until_ms.is_none_or(|t| r.at_ms < t)
}

/// The entries that match `query` (newest first, at most [`AUDIT_PAGE_MAX`]; this device's and,
/// from the audit documents, the facility's other devices' and at an HQ the shelters') and the
/// past reviews. Recorded first as `audit-read` (`list`), so the listing shows itself. Entries
/// that cannot be read are left out: `audit_verify` says where the log is broken.
///
/// Errors: `admin_only`; `invalid_input` (a malformed document id or time); `trust` (the log's
/// record of its newest entry is missing: nothing is recorded, so nothing is shown, until an
/// administrator looks with `audit_verify`); `storage`.
#[tauri::command]
#[specta::specta]
pub async fn audit_list(state: State<'_, AppState>, query: AuditQuery) -> AppResult<AuditPage> {
    let filter = filter_of(&query)?;
    state
        .with_admin(move |engine, _| {
            audit::record(engine, AuditAction::AuditRead, None, &["list"])?;
            let all = audit::list(engine, &Filter::default())?;
            let names = names(engine)?;
            let facilities = facility_names(engine);
            let me = engine.device_id().to_string();
            let matched: Vec<&AuditRecord> = all.iter().filter(|r| matches(&filter, r)).collect();
            let entries = matched
                .iter()
                .rev()
                .take(AUDIT_PAGE_MAX)
                .map(|r| view(r, &names, &facilities, &me))
                .collect::<AppResult<Vec<_>>>()?;
            let reviews = all
                .iter()
                .rev()
                .filter(|r| r.action == AuditAction::Review.as_str())
                .take(REVIEWS_SHOWN_MAX)
                .map(|r| review_of(r, &names))
                .collect();
            Ok(AuditPage {
                entries,
                matched: u32::try_from(matched.len()).unwrap_or(u32::MAX),
                reviews,
            })
        })
        .await
}

fn verdict_of(
    chains: Vec<audit::DeviceChain>,
    facilities: &BTreeMap<String, String>,
) -> AuditVerdict {
    let chains: Vec<AuditChainView> = chains
        .into_iter()
        .map(|c| {
            let (entries, first, last, broken) = match c.result {
                Ok(s) => (s.entries, s.first, s.last, None),
                Err(b) => (
                    0,
                    None,
                    None,
                    Some(AuditBreak {
                        seq: b.seq as f64,
                        reason: b.reason,
                    }),
                ),
            };
            AuditChainView {
                facility_name: facilities.get(&c.facility).cloned(),
                device: c.device,
                this_device: c.this_device,
                facility: c.facility,
                entries: u32::try_from(entries).unwrap_or(u32::MAX),
                first: first.map(|n| n as f64),
                last: last.map(|n| n as f64),
                broken,
            }
        })
        .collect();
    AuditVerdict {
        intact: chains.iter().all(|c| c.broken.is_none()),
        entries: chains
            .iter()
            .map(|c| c.entries)
            .fold(0, u32::saturating_add),
        chains,
    }
}

/// Verifies the whole log: this device's chain (every entry decrypts, carries this device's
/// signature and follows the one before, up to the newest entry the device recorded, and matches
/// its copy in the facility's audit document), then every other device's chain the audit
/// documents hold. Recorded as `audit-read` (`verify`) after the check, so the check is not of its
/// own entry. A broken log is an answer, not an error: the chain's [`AuditBreak`] names the first
/// entry altered, removed, moved or cut off.
///
/// Errors: `admin_only`; `trust` (the log is intact but refuses the entry); `storage`.
#[tauri::command]
#[specta::specta]
pub async fn audit_verify(state: State<'_, AppState>) -> AppResult<AuditVerdict> {
    state
        .with_admin(|engine, _| {
            let verdict = verdict_of(audit::verify_all(engine)?, &facility_names(engine));
            // A broken log may refuse new entries too: the break is what to report then.
            if let Err(e) = audit::record(engine, AuditAction::AuditRead, None, &["verify"]) {
                if verdict.intact {
                    return Err(e.into());
                }
                tracing::warn!("the broken audit log refused the verification's entry: {e}");
            }
            Ok(verdict)
        })
        .await
}

/// The day (`YYYY-MM-DD`, Japan time) of `ms` since the Unix epoch.
fn jst_day(ms: u64) -> String {
    let shifted = i64::try_from(ms)
        .unwrap_or(i64::MAX)
        .saturating_add(JST_OFFSET_MS);
    ms_to_rfc3339(shifted).chars().take(10).collect()
}

/// Most broken chains a review names (`break:DEVICE#SEQ` fields).
const REVIEW_BREAKS_MAX: usize = 8;

/// 定期確認: the administrator has reviewed the entries from `since_ms` (inclusive) to `until_ms`
/// (exclusive). Verifies the whole log (every device's chain), counts the period's entries, and
/// records `review` with the fields `period:FROM/TO` (days, Japan time, both inclusive),
/// `entries:N` and `chain:intact`, or `chain:broken` followed by `break:DEVICE#SEQ` for each broken
/// chain (at most 8). Returns the review as the screen lists it.
///
/// Errors: `invalid_input` (a malformed period, or one that ends before it starts); `admin_only`;
/// `trust` (the log refuses new entries: `audit_verify` says where it is broken); `storage`.
#[tauri::command]
#[specta::specta]
pub async fn audit_review(
    state: State<'_, AppState>,
    since_ms: f64,
    until_ms: f64,
) -> AppResult<AuditReviewView> {
    let since = ms("since_ms", since_ms)?;
    let until = ms("until_ms", until_ms)?;
    if until <= since {
        return Err(AppError::invalid("the period ends before it starts"));
    }
    state
        .with_admin(move |engine, _| {
            let chains = audit::verify_all(engine)?;
            let entries = audit::list(
                engine,
                &Filter {
                    since_ms: Some(since),
                    until_ms: Some(until),
                    ..Filter::default()
                },
            )?
            .len();
            let period = format!("period:{}/{}", jst_day(since), jst_day(until - 1));
            let count = format!("entries:{entries}");
            let breaks: Vec<String> = chains
                .iter()
                .filter_map(|c| {
                    c.result
                        .as_ref()
                        .err()
                        .map(|b| format!("break:{}#{}", c.device, b.seq))
                })
                .take(REVIEW_BREAKS_MAX)
                .collect();
            let chain = if breaks.is_empty() {
                "chain:intact"
            } else {
                "chain:broken"
            };
            let mut fields: Vec<&str> = vec![&period, &count, chain];
            fields.extend(breaks.iter().map(String::as_str));
            let seq = audit::record(engine, AuditAction::Review, None, &fields)?;
            let me = engine.device_id().to_string();
            let names = names(engine)?;
            let recorded = audit::list(
                engine,
                &Filter {
                    action: Some(AuditAction::Review),
                    ..Filter::default()
                },
            )?
            .into_iter()
            .rev()
            .find(|r| r.seq == seq && r.device == me)
            .ok_or_else(|| {
                AppError::new(
                    crate::error::ErrorKind::Storage,
                    "the review's entry cannot be read back",
                )
            })?;
            Ok(review_of(&recorded, &names))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_is_named_in_japan_time() {
        // 2026-11-01T00:00+09:00 is 2026-10-31T15:00Z.
        let since = 1_793_458_800_000;
        assert_eq!(jst_day(since), "2026-11-01");
        assert_eq!(jst_day(since - 1), "2026-10-31");
    }

    fn record(seq: u64, at_ms: u64, staff: &str, action: &str, fields: &[&str]) -> AuditRecord {
        AuditRecord {
            seq,
            time: String::new(),
            at_ms,
            staff: Some(staff.to_owned()),
            device: "12D3KooW".into(),
            facility: "0194a3c2-7d1e-7c3a-9f00-0000000000c1".into(),
            doc: None,
            action: action.to_owned(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    #[test]
    fn filters_combine_and_the_period_ends_before_until() {
        let q = AuditQuery {
            staff: Some(" sato ".into()),
            action: Some(AuditAction::SignInFailed),
            since_ms: Some(1_000.0),
            until_ms: Some(2_000.0),
            ..AuditQuery::default()
        };
        let f = filter_of(&q).expect("a filter");
        assert!(matches(
            &f,
            &record(1, 1_000, "sato", "sign-in-failed", &[])
        ));
        assert!(!matches(
            &f,
            &record(2, 2_000, "sato", "sign-in-failed", &[])
        ));
        assert!(!matches(
            &f,
            &record(3, 1_500, "suzuki", "sign-in-failed", &[])
        ));
        assert!(!matches(&f, &record(4, 1_500, "sato", "sign-in", &[])));
        let bad = AuditQuery {
            doc: Some("not-an-id".into()),
            ..AuditQuery::default()
        };
        assert!(filter_of(&bad).is_err());
        let negative = AuditQuery {
            since_ms: Some(-1.0),
            ..AuditQuery::default()
        };
        assert!(filter_of(&negative).is_err());
    }

    #[test]
    fn a_review_reads_back_as_it_was_written() {
        let names = BTreeMap::from([("sato".to_owned(), "佐藤 一郎".to_owned())]);
        let r = review_of(
            &record(
                9,
                5,
                "sato",
                "review",
                &[
                    "period:2026-11-01/2026-11-30",
                    "entries:42",
                    "chain:broken",
                    "break:12D3KooW#7",
                ],
            ),
            &names,
        );
        assert_eq!(
            (r.from.as_str(), r.to.as_str()),
            ("2026-11-01", "2026-11-30")
        );
        assert_eq!(r.entries, 42);
        assert_eq!(r.chain_intact, Some(false));
        assert_eq!(r.staff_name.as_deref(), Some("佐藤 一郎"));
    }
}
