//! 災害対策本部 (disaster HQ) views over every shelter this facility is a member of: head counts per
//! shelter and in total, counts over time, open supply requests, the safety inquiry (安否確認), and
//! CSV exports (the roster; aggregates with HXL hashtags).
//!
//! # Counting a person once
//!
//! Within a shelter, duplicate records merge on read ([`schema::dedup`]). Across shelters, records
//! that share an identity key (card id, or normalised name + birth date) are one person; that person
//! counts only at the shelter of their latest check-in (by time, then event id), and only while that
//! stay is open there. So a person who moved to a second shelter counts once, at the second, even
//! while the first shelter's roster still shows them (its facility may not see the second shelter).
//!
//! Merged rosters are cached, sealed, per shelter until its next bundle (see `hq_roster_cache`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use musubi_crdt::audit::AuditAction;
use musubi_crdt::crypto;
use musubi_crdt::documents::shelter::{
    self as schema, Evacuee, Presence, Roster, ShelterStatus, SupplyRequest, rfc3339_ms,
};
use musubi_crdt::ids::{DocumentId, DocumentKind};
use serde::{Deserialize, Serialize};

use super::shelter::{ms_to_rfc3339, now_rfc3339, search_fold};
use crate::engine::{Engine, EngineError, Result, now_ms};

/// Most points `history` returns when it picks the times itself.
pub const HISTORY_POINTS_MAX: usize = 1_000;

/// Counts of one shelter.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct ShelterCount {
    /// The shelter id.
    pub id: DocumentId,
    /// 名称.
    pub name: String,
    /// 施設コード.
    pub code: String,
    /// 住所.
    pub address: String,
    /// 開設 / 閉鎖.
    pub status: ShelterStatus,
    /// 収容人数 (0: not stated).
    pub capacity: u64,
    /// Evacuees counted here (checked in, not checked out, not since checked in elsewhere; 外泊 counts).
    pub present: usize,
    /// Of those, on leave (外泊・一時外出).
    pub on_leave: usize,
    /// Present evacuees with each care flag (要配慮), by flag key.
    pub care: BTreeMap<String, usize>,
    /// Supply requests not yet delivered or cancelled.
    pub open_requests: usize,
    /// Needs not yet resolved.
    pub open_needs: usize,
    /// Distinct evacuees ever recorded here.
    pub evacuees: usize,
}

/// An open supply request with its shelter.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct OpenRequest {
    /// The shelter id.
    pub shelter: DocumentId,
    /// The shelter's name.
    pub shelter_name: String,
    /// The request.
    #[serde(flatten)]
    pub request: SupplyRequest,
}

/// HQ's summary.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Summary {
    /// The time the counts are for (RFC 3339).
    pub as_of: String,
    /// Every shelter, by name.
    pub shelters: Vec<ShelterCount>,
    /// Sum of `present`.
    pub total_present: usize,
    /// Sum of `on_leave`.
    pub total_on_leave: usize,
    /// Sum of capacities.
    pub total_capacity: u64,
    /// Shelters open now.
    pub open_shelters: usize,
    /// Open supply requests of all shelters, most urgent first.
    pub open_requests: Vec<OpenRequest>,
    /// Shelter documents this device cannot read yet (no key, or not yet synced).
    pub unreadable: Vec<DocumentId>,
}

/// Counts over time.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct History {
    /// The times (RFC 3339), ascending.
    pub times: Vec<String>,
    /// Per shelter: counts at each time.
    pub shelters: Vec<ShelterSeries>,
    /// Total at each time.
    pub totals: Vec<usize>,
}

/// One shelter's counts over time.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct ShelterSeries {
    /// The shelter id.
    pub id: DocumentId,
    /// 名称.
    pub name: String,
    /// 施設コード.
    pub code: String,
    /// Present at each time of [`History::times`].
    pub counts: Vec<usize>,
}

/// An answer to a safety inquiry (only for evacuees who consented to disclosure).
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct InquiryAnswer {
    /// 氏名.
    pub name: String,
    /// かな.
    pub kana: String,
    /// The shelter id.
    pub shelter: DocumentId,
    /// 避難所名.
    pub shelter_name: String,
    /// Where the person is at that shelter.
    pub presence: Presence,
    /// When the last stay event happened (RFC 3339).
    pub since: String,
}

/// Every readable shelter and its merged roster.
pub struct World {
    /// (shelter id, roster), by shelter name.
    pub shelters: Vec<(DocumentId, Roster)>,
    /// Shelters not readable here.
    pub unreadable: Vec<DocumentId>,
    /// Person groups across shelters: each a list of (shelter index, evacuee index).
    groups: Vec<Vec<(usize, usize)>>,
    /// Per shelter document: (highest bundle row id, bundle count) when loaded.
    stamp: Vec<(DocumentId, (i64, i64))>,
}

impl World {
    /// Loads every shelter document this facility can read and groups records of the same person.
    pub fn load(engine: &Engine) -> Result<World> {
        let mut shelters = Vec::new();
        let mut unreadable = Vec::new();
        let mut stamps = Vec::new();
        ensure_cache(engine)?;
        for row in engine.store().documents(Some(DocumentKind::Shelter))? {
            let doc = row.info.id;
            let stamp = bundle_stamp(engine, doc)?;
            stamps.push((doc, stamp));
            if let Some(roster) = cached(engine, doc, stamp)? {
                shelters.push((doc, roster));
                continue;
            }
            match engine.load(doc) {
                Ok(l) if !l.heads.is_empty() => {
                    let roster = schema::read(&l.doc)?;
                    if l.unreadable == 0 {
                        store_cache(engine, doc, stamp, &roster)?;
                    }
                    shelters.push((doc, roster));
                }
                Ok(_) | Err(EngineError::NoKey(_)) => unreadable.push(doc),
                Err(e) => return Err(e),
            }
        }
        shelters.sort_by(|a, b| {
            (a.1.shelter.code.as_str(), a.1.shelter.name.as_str(), a.0).cmp(&(
                b.1.shelter.code.as_str(),
                b.1.shelter.name.as_str(),
                b.0,
            ))
        });
        let groups = group_people(&shelters);
        Ok(World {
            shelters,
            unreadable,
            groups,
            stamp: stamps,
        })
    }

    /// Whether no shelter document gained or lost a bundle, and none was added, since this world
    /// was loaded (one small query per shelter: cheap next to [`World::load`]). A key that arrives
    /// for an unreadable shelter is not seen here: callers also drop the world when told a shelter
    /// document changed.
    pub fn is_current(&self, engine: &Engine) -> Result<bool> {
        let rows = engine.store().documents(Some(DocumentKind::Shelter))?;
        if rows.len() != self.stamp.len() {
            return Ok(false);
        }
        for row in rows {
            let Some((_, old)) = self.stamp.iter().find(|(d, _)| *d == row.info.id) else {
                return Ok(false);
            };
            if bundle_stamp(engine, row.info.id)? != *old {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Per shelter (present, on leave, present with each care flag) at `at_ms` (`None`: now, all events).
    fn counts_at(&self, at_ms: Option<i64>) -> Vec<(usize, usize, BTreeMap<String, usize>)> {
        let mut out = vec![(0, 0, BTreeMap::new()); self.shelters.len()];
        for group in &self.groups {
            let latest = group
                .iter()
                .filter_map(|&(s, e)| {
                    let ev = &self.shelters[s].1.evacuees[e];
                    ev.last_check_in(at_ms)
                        .map(|c| ((rfc3339_ms(&c.at).unwrap_or(i64::MIN), c.id.clone()), s, e))
                })
                .max_by(|a, b| a.0.cmp(&b.0));
            let Some((_, s, e)) = latest else { continue };
            let ev: &Evacuee = &self.shelters[s].1.evacuees[e];
            let presence = ev.presence_at(at_ms);
            if presence.counts() {
                out[s].0 += 1;
                if presence == Presence::OnLeave {
                    out[s].1 += 1;
                }
                for f in &ev.flags {
                    *out[s].2.entry(f.as_str().to_owned()).or_default() += 1;
                }
            }
        }
        out
    }
}

// --- the roster cache -----------------------------------------------------------------------
//
// HQ reads every shelter for each view; loading and merging 50 rosters of 2,000 people takes
// seconds. The merged roster of each shelter is cached in the table `hq_roster_cache`, sealed to
// this device's own age recipient (nothing readable on disk), and keyed by the document's bundle
// rows (the highest row id and the count) and [`CACHE_VERSION`]: any new bundle, or a new build,
// misses the cache. A roster with bundles this device cannot read yet is never cached.

/// Bumped whenever the cached roster's meaning or shape changes (2: stay events name the staff
/// member; `merged_ids` always present).
const CACHE_VERSION: i64 = 2;
/// Largest cached roster accepted when opening it, in bytes.
const CACHE_BYTES_MAX: usize = 256 * 1024 * 1024;

fn db_err(e: rusqlite::Error) -> EngineError {
    EngineError::Store(e.into())
}

fn ensure_cache(engine: &Engine) -> Result<()> {
    engine
        .store()
        .conn()
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS hq_roster_cache (doc TEXT PRIMARY KEY, version INTEGER NOT NULL,
             upto_rowid INTEGER NOT NULL, bundles INTEGER NOT NULL, sealed BLOB NOT NULL);",
        )
        .map_err(db_err)
}

/// (highest bundle row id, bundle count) of a document: changes whenever a bundle arrives.
fn bundle_stamp(engine: &Engine, doc: DocumentId) -> Result<(i64, i64)> {
    engine
        .store()
        .conn()
        .query_row(
            "SELECT COALESCE(MAX(rowid), 0), COUNT(*) FROM bundles WHERE doc = ?1",
            [doc.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err)
}

fn cached(engine: &Engine, doc: DocumentId, stamp: (i64, i64)) -> Result<Option<Roster>> {
    use rusqlite::OptionalExtension;
    let sealed: Option<Vec<u8>> = engine
        .store()
        .conn()
        .query_row(
            "SELECT sealed FROM hq_roster_cache WHERE doc = ?1 AND version = ?2 AND upto_rowid = ?3 AND bundles = ?4",
            rusqlite::params![doc.to_string(), CACHE_VERSION, stamp.0, stamp.1],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    let Some(sealed) = sealed else {
        return Ok(None);
    };
    let plain = match crypto::open_with(engine.secrets().age_identity(), &sealed, CACHE_BYTES_MAX) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%doc, "ignoring an unreadable cached roster: {e}");
            return Ok(None);
        }
    };
    Ok(ciborium::from_reader(plain.as_slice()).ok())
}

fn store_cache(engine: &Engine, doc: DocumentId, stamp: (i64, i64), roster: &Roster) -> Result<()> {
    let mut plain = Vec::new();
    ciborium::into_writer(roster, &mut plain).expect("writing to a Vec cannot fail");
    let sealed = crypto::seal_to(&[engine.secrets().age_identity().to_public()], &plain)?;
    engine
        .store()
        .conn()
        .execute(
            "INSERT OR REPLACE INTO hq_roster_cache (doc, version, upto_rowid, bundles, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![doc.to_string(), CACHE_VERSION, stamp.0, stamp.1, sealed],
        )
        .map_err(db_err)?;
    Ok(())
}

/// Union of (shelter, evacuee) records that share an identity key.
fn group_people(shelters: &[(DocumentId, Roster)]) -> Vec<Vec<(usize, usize)>> {
    let mut items: Vec<(usize, usize)> = Vec::new();
    for (s, (_, r)) in shelters.iter().enumerate() {
        for e in 0..r.evacuees.len() {
            items.push((s, e));
        }
    }
    let mut parent: Vec<usize> = (0..items.len()).collect();
    fn find(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    let mut first: HashMap<String, usize> = HashMap::new();
    for (i, &(s, e)) in items.iter().enumerate() {
        for k in shelters[s].1.evacuees[e].keys() {
            match first.get(&k) {
                Some(&j) => {
                    let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                    if a != b {
                        parent[a.max(b)] = a.min(b);
                    }
                }
                None => {
                    first.insert(k, i);
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().push(*item);
    }
    groups.into_values().collect()
}

/// HQ's summary now, or at `at` (RFC 3339) from the stay events up to then.
pub fn summary(engine: &Engine, at: Option<&str>) -> Result<Summary> {
    let world = World::load(engine)?;
    super::audit(engine, AuditAction::Read, None, &["summary"])?;
    summarise(&world, at)
}

/// [`summary`] over an already loaded [`World`].
pub fn summarise(world: &World, at: Option<&str>) -> Result<Summary> {
    let at_ms = at.map(parse_time).transpose()?;
    let counts = world.counts_at(at_ms);
    let mut shelters = Vec::new();
    let mut open_requests = Vec::new();
    for ((id, roster), (present, on_leave, care)) in world.shelters.iter().zip(counts) {
        let open: Vec<&SupplyRequest> = roster
            .requests
            .iter()
            .filter(|r| r.status.is_open())
            .collect();
        for r in &open {
            open_requests.push(OpenRequest {
                shelter: *id,
                shelter_name: roster.shelter.name.clone(),
                request: (*r).clone(),
            });
        }
        shelters.push(ShelterCount {
            id: *id,
            name: roster.shelter.name.clone(),
            code: roster.shelter.code.clone(),
            address: roster.shelter.address.clone(),
            status: roster.shelter.status,
            capacity: roster.shelter.capacity,
            present,
            on_leave,
            care,
            open_requests: open.len(),
            open_needs: roster.needs.iter().filter(|n| !n.resolved).count(),
            evacuees: roster.evacuees.len(),
        });
    }
    open_requests.sort_by(|a, b| {
        b.request
            .urgency
            .cmp(&a.request.urgency)
            .then_with(|| a.request.requested_at.cmp(&b.request.requested_at))
    });
    Ok(Summary {
        as_of: at.map(str::to_owned).unwrap_or_else(now_rfc3339),
        total_present: shelters.iter().map(|s| s.present).sum(),
        total_on_leave: shelters.iter().map(|s| s.on_leave).sum(),
        total_capacity: shelters.iter().map(|s| s.capacity).sum(),
        open_shelters: shelters
            .iter()
            .filter(|s| s.status == ShelterStatus::Open)
            .count(),
        shelters,
        open_requests,
        unreadable: world.unreadable.clone(),
    })
}

fn parse_time(t: &str) -> Result<i64> {
    rfc3339_ms(t).ok_or_else(|| {
        EngineError::from(musubi_crdt::documents::DocumentError::InvalidValue {
            key: "time".into(),
            reason: format!("`{t}` is not an RFC 3339 time (e.g. 2024-01-09T18:00:00+09:00)"),
        })
    })
}

/// Counts per shelter at each of `times` (RFC 3339); with no times, at every distinct stay-event
/// time (at most [`HISTORY_POINTS_MAX`], evenly sampled).
pub fn history(engine: &Engine, times: &[String]) -> Result<History> {
    history_of(&World::load(engine)?, times)
}

/// [`history`] over an already loaded [`World`].
pub fn history_of(world: &World, times: &[String]) -> Result<History> {
    let mut points: Vec<(i64, String)> = Vec::new();
    if times.is_empty() {
        let mut all: Vec<i64> = world
            .shelters
            .iter()
            .flat_map(|(_, r)| r.evacuees.iter())
            .flat_map(|e| e.events.iter())
            .filter_map(|e| rfc3339_ms(&e.at))
            .collect();
        all.sort_unstable();
        all.dedup();
        let step = all.len().div_ceil(HISTORY_POINTS_MAX).max(1);
        let mut picked: Vec<i64> = all.iter().copied().step_by(step).collect();
        if let Some(&last) = all.last()
            && picked.last() != Some(&last)
        {
            picked.push(last);
        }
        points = picked.into_iter().map(|t| (t, ms_to_rfc3339(t))).collect();
    } else {
        for t in times {
            points.push((parse_time(t)?, t.clone()));
        }
        points.sort_by_key(|p| p.0);
    }
    let mut series: Vec<ShelterSeries> = world
        .shelters
        .iter()
        .map(|(id, r)| ShelterSeries {
            id: *id,
            name: r.shelter.name.clone(),
            code: r.shelter.code.clone(),
            counts: Vec::with_capacity(points.len()),
        })
        .collect();
    let mut totals = Vec::with_capacity(points.len());
    for (t, _) in &points {
        let counts = world.counts_at(Some(*t));
        totals.push(counts.iter().map(|c| c.0).sum());
        for (s, c) in series.iter_mut().zip(counts) {
            s.counts.push(c.0);
        }
    }
    Ok(History {
        times: points.into_iter().map(|p| p.1).collect(),
        shelters: series,
        totals,
    })
}

/// 安否確認: where is the person named `name` (the whole name or kana: width, spaces, case and
/// hiragana/katakana ignored, see [`search_fold`]; never a partial match)? Answers only for evacuees who consented to disclosure; for anyone else the answer is empty,
/// exactly as for a person who is in no shelter. The answer and `inquirer` are recorded in the
/// audit log ([`record_inquiry`]).
///
/// Errors: `InvalidValue` for an inquirer without a name or relationship ([`Inquirer::check`]).
pub fn inquiry(engine: &Engine, name: &str, inquirer: &Inquirer) -> Result<Vec<InquiryAnswer>> {
    inquirer.check()?;
    if schema::normalise_name(name).is_empty() {
        return Ok(Vec::new());
    }
    let answers = inquiry_of(&World::load(engine)?, name);
    record_inquiry(engine, inquirer, answers.len())?;
    Ok(answers)
}

/// Who asks in a 安否確認: recorded with the answer in the audit log, as the guideline expects
/// (who asked, their relationship to the person, how to reach them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Inquirer {
    /// 問い合わせ者氏名 (required).
    pub name: String,
    /// 続柄 (relationship to the person asked about; required).
    pub relationship: String,
    /// 連絡先 (telephone or address; may be empty).
    pub contact: String,
}

/// Longest inquirer detail kept, in characters.
pub const INQUIRER_CHARS_MAX: usize = 100;

impl Inquirer {
    /// Errors: `InvalidValue` when the name or the relationship is empty, or a detail is over
    /// [`INQUIRER_CHARS_MAX`] characters.
    pub fn check(&self) -> Result<()> {
        let invalid = |key: &str, message: &str| {
            EngineError::from(musubi_crdt::documents::DocumentError::InvalidValue {
                key: key.to_owned(),
                reason: message.to_owned(),
            })
        };
        for (key, v, required) in [
            ("inquirer.name", &self.name, true),
            ("inquirer.relationship", &self.relationship, true),
            ("inquirer.contact", &self.contact, false),
        ] {
            if required && v.trim().is_empty() {
                return Err(invalid(
                    key,
                    "a safety inquiry records who asks and their relationship to the person",
                ));
            }
            if v.chars().count() > INQUIRER_CHARS_MAX {
                return Err(invalid(key, "at most 100 characters"));
            }
        }
        Ok(())
    }
}

/// Records a 安否確認 answer: the inquirer's details (the one place the audit log keeps values: the
/// guideline asks who was told), how many answers were given, and the staff member who answered.
pub fn record_inquiry(engine: &Engine, inquirer: &Inquirer, answers: usize) -> Result<()> {
    super::audit(
        engine,
        AuditAction::SafetyInquiry,
        None,
        &[
            &format!("inquirer={}", inquirer.name.trim()),
            &format!("relationship={}", inquirer.relationship.trim()),
            &format!("contact={}", inquirer.contact.trim()),
            &format!("answers={answers}"),
        ],
    )
}

/// [`inquiry`] over an already loaded [`World`].
pub fn inquiry_of(world: &World, name: &str) -> Vec<InquiryAnswer> {
    let wanted = search_fold(name);
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (id, roster) in &world.shelters {
        for e in &roster.evacuees {
            if !e.consent {
                continue;
            }
            if search_fold(&e.name) != wanted && search_fold(&e.kana) != wanted {
                continue;
            }
            out.push(InquiryAnswer {
                name: e.name.clone(),
                kana: e.kana.clone(),
                shelter: *id,
                shelter_name: roster.shelter.name.clone(),
                presence: e.presence(),
                since: e.events.last().map(|x| x.at.clone()).unwrap_or_default(),
            });
        }
    }
    // Present first, then the latest news first.
    out.sort_by(|a, b| {
        b.presence.counts().cmp(&a.presence.counts()).then_with(|| {
            rfc3339_ms(&b.since)
                .unwrap_or(0)
                .cmp(&rfc3339_ms(&a.since).unwrap_or(0))
        })
    });
    out
}

fn csv_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Io {
        path: "csv".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The roster of every shelter as CSV (UTF-8 with BOM for spreadsheet software): one row per merged
/// evacuee. Returns the number of rows.
pub fn export_roster(engine: &Engine, out: impl Write) -> Result<usize> {
    let world = World::load(engine)?;
    super::audit(engine, AuditAction::Export, None, &["roster.csv"])?;
    export_roster_of(&world, out)
}

/// [`export_roster`] over an already loaded [`World`].
pub fn export_roster_of(world: &World, out: impl Write) -> Result<usize> {
    let mut out = out;
    out.write_all("\u{feff}".as_bytes()).map_err(csv_err)?;
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "避難所ID",
        "避難所名",
        "避難者ID",
        "氏名",
        "かな",
        "生年月日",
        "性別",
        "住所",
        "世帯",
        "連絡先",
        "要配慮",
        "アレルギー",
        "ペット",
        "車両",
        "安否情報の開示同意",
        "状態",
        "入所日時",
        "最終更新",
    ])
    .map_err(csv_err)?;
    let mut rows = 0;
    for (id, roster) in &world.shelters {
        for e in &roster.evacuees {
            let flags: Vec<&str> = e.flags.iter().map(|f| f.label()).collect();
            let state = match e.presence() {
                Presence::Present => "在所",
                Presence::OnLeave => "外泊・外出",
                Presence::Out => "退所",
            };
            w.write_record([
                id.to_string().as_str(),
                &roster.shelter.name,
                &e.id,
                &e.name,
                &e.kana,
                &e.birth_date,
                &e.sex,
                &e.address,
                &e.household,
                &e.contact,
                &flags.join("・"),
                &e.allergies,
                &e.pets,
                &e.vehicle,
                if e.consent { "同意" } else { "不同意" },
                state,
                e.current_stay().map(|s| s.at.as_str()).unwrap_or(""),
                e.events.last().map(|s| s.at.as_str()).unwrap_or(""),
            ])
            .map_err(csv_err)?;
            rows += 1;
        }
    }
    w.flush().map_err(csv_err)?;
    Ok(rows)
}

/// Aggregate counts per shelter as CSV with HXL hashtags (Humanitarian Exchange Language 1.1): a
/// header row of column names, then a row of hashtags, then one row per shelter. Returns the
/// number of data rows.
pub fn export_aggregate(engine: &Engine, at: Option<&str>, out: impl Write) -> Result<usize> {
    let org = engine
        .enrolment()
        .map(|e| e.facility_name)
        .unwrap_or_default();
    let world = World::load(engine)?;
    super::audit(engine, AuditAction::Export, None, &["aggregate.csv"])?;
    export_aggregate_of(&world, &org, at, out)
}

/// [`export_aggregate`] over an already loaded [`World`]; `org` is the `#org` column (this
/// facility's name).
pub fn export_aggregate_of(
    world: &World,
    org: &str,
    at: Option<&str>,
    out: impl Write,
) -> Result<usize> {
    let summary = summarise(world, at)?;
    let date = summary.as_of.clone();
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "避難所コード",
        "避難所名",
        "住所",
        "状態",
        "収容人数",
        "避難者数",
        "うち外泊・外出",
        "要配慮者数",
        "未対応の物資要請",
        "時点",
        "集計機関",
    ])
    .map_err(csv_err)?;
    w.write_record([
        "#loc+code",
        "#loc+name",
        "#loc+address",
        "#status",
        "#capacity+ind",
        "#affected+displaced+ind",
        "#affected+displaced+ind+away",
        "#affected+displaced+ind+vulnerable",
        "#output+requests+open",
        "#date",
        "#org",
    ])
    .map_err(csv_err)?;
    for s in &summary.shelters {
        let vulnerable: usize = care_people(world, s.id, at)?;
        w.write_record([
            s.code.as_str(),
            &s.name,
            &s.address,
            if s.status == ShelterStatus::Open {
                "開設"
            } else {
                "閉鎖"
            },
            &s.capacity.to_string(),
            &s.present.to_string(),
            &s.on_leave.to_string(),
            &vulnerable.to_string(),
            &s.open_requests.to_string(),
            &date,
            org,
        ])
        .map_err(csv_err)?;
    }
    w.flush().map_err(csv_err)?;
    Ok(summary.shelters.len())
}

/// Present evacuees of one shelter with at least one care flag.
fn care_people(world: &World, shelter: DocumentId, at: Option<&str>) -> Result<usize> {
    let at_ms = at.map(parse_time).transpose()?;
    let Some(s) = world.shelters.iter().position(|(id, _)| *id == shelter) else {
        return Ok(0);
    };
    let mut n = 0;
    for group in &world.groups {
        let latest = group
            .iter()
            .filter_map(|&(si, e)| {
                let ev = &world.shelters[si].1.evacuees[e];
                ev.last_check_in(at_ms)
                    .map(|c| ((rfc3339_ms(&c.at).unwrap_or(i64::MIN), c.id.clone()), si, e))
            })
            .max_by(|a, b| a.0.cmp(&b.0));
        if let Some((_, si, e)) = latest
            && si == s
        {
            let ev = &world.shelters[si].1.evacuees[e];
            if ev.presence_at(at_ms).counts() && !ev.flags.is_empty() {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// How long ago (ms) a time was, for display.
pub fn age_ms(at: &str) -> Option<i64> {
    rfc3339_ms(at).map(|t| now_ms() as i64 - t)
}
