//! 避難所 (shelter reception): open a shelter, check evacuees in and out, needs and supply requests,
//! medical notes.
//!
//! A shelter document is owned by the community centre that opens it; every HQ facility of the
//! directory is a writer (it marks supply requests arranged), added at `open` and later by
//! [`ensure_hq_members`] when an HQ facility enrols after the shelter opened. Medical notes live in
//! a second document whose members are the centre and the HQ health section(s) only.
//!
//! Check-in reuses the record of a known person (same card id, or same normalised name and birth
//! date, on the merged view of [`schema::read`]); a person checked in at a second shelter is checked
//! out ("moved-to:<shelter>") of every other shelter this facility can write where they are present.
//! A shelter this facility is not a member of is out of its sight: HQ, which sees every shelter,
//! counts a person once, at the shelter of their latest check-in (see [`super::hq`]).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, UNIX_EPOCH};

use musubi_crdt::audit::AuditAction;
use musubi_crdt::documents::shelter::{
    self as schema, CareFlag, Evacuee, MedicalNote, MedicalNotes, Method, Need, NewEvacuee,
    Presence, Relative, RequestStatus, Roster, ShelterInfo, ShelterStatus, StayEvent, StayKind,
    SupplyRequest, Urgency,
};
use musubi_crdt::ids::{DocumentId, DocumentKind, FacilityRole, Role};
use musubi_crdt::ops::Member;
use serde::Serialize;

use crate::engine::{Engine, EngineError, Loaded, Result, now_ms, random};
use crate::mail;

/// The current time as RFC 3339 UTC with milliseconds (the engine is where the clock is read).
pub fn now_rfc3339() -> String {
    ms_to_rfc3339(now_ms() as i64)
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn ms_to_rfc3339(ms: i64) -> String {
    // RFC 3339 (and humantime) end at 9999-12-31T23:59:59.999Z: a later time (a hostile entry's)
    // is shown as that.
    const LAST_MS: i64 = 253_402_300_799_999;
    let t = UNIX_EPOCH + Duration::from_millis(ms.clamp(0, LAST_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A random id for evacuees, events, needs and requests: 32 lowercase hex digits.
pub fn new_id() -> String {
    hex::encode(random::<16>())
}

/// What `open` needs.
#[derive(Clone, Debug, Default)]
pub struct OpenShelter {
    /// 名称.
    pub name: String,
    /// 施設コード (registry id), may be empty.
    pub code: String,
    /// 住所.
    pub address: String,
    /// 収容人数 (0: not stated).
    pub capacity: u64,
    /// HQ facilities (ids or exact names) that form the health section: members of the medical notes.
    pub health_sections: Vec<String>,
    /// When it opened (RFC 3339; default now).
    pub at: Option<String>,
}

/// What `open` made.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Opened {
    /// The shelter document id (the shelter id).
    pub shelter: DocumentId,
    /// Its medical-notes document.
    pub medical: DocumentId,
}

/// A check-in as reception enters it.
#[derive(Clone, Debug, Default)]
pub struct CheckIn {
    /// The person.
    pub person: NewEvacuee,
    /// How they were identified.
    pub method: Method,
    /// When (RFC 3339; default now).
    pub at: Option<String>,
}

/// What a check-in did.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct CheckInOutcome {
    /// The evacuee id (the existing one for a known person).
    pub evacuee: String,
    /// Whether an existing record was reused.
    pub reused: bool,
    /// Whether the person was already checked in here (then no new event was written).
    pub already_present: bool,
    /// The stay event written (the stay id of relatives' notifications); empty when already present.
    pub event: String,
    /// Shelters the person was checked out of because they moved here.
    pub moved_from: Vec<DocumentId>,
    /// Relatives' notifications queued.
    pub notifications: usize,
}

/// A shelter as listed.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct ShelterListing {
    /// The shelter id.
    pub id: DocumentId,
    /// The shelter.
    #[serde(flatten)]
    pub shelter: ShelterInfo,
    /// Evacuees present (外泊 counts).
    pub present: usize,
    /// This facility's role in the document.
    pub role: String,
}

/// A roster as shown: the merged evacuees with their presence.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct RosterView {
    /// The shelter id.
    pub id: DocumentId,
    /// The shelter.
    pub shelter: ShelterInfo,
    /// Evacuees present now (外泊 counts).
    pub present: usize,
    /// Records before merging duplicates.
    pub records: usize,
    /// Evacuees (merged).
    pub evacuees: Vec<EvacueeView>,
    /// Needs.
    pub needs: Vec<Need>,
    /// Supply requests.
    pub requests: Vec<SupplyRequest>,
}

/// One evacuee with its presence.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct EvacueeView {
    /// Presence now.
    pub presence: Presence,
    /// The record.
    #[serde(flatten)]
    pub evacuee: Evacuee,
}

/// Most evacuees [`Desk::search`] returns.
pub const SEARCH_RESULTS_MAX: usize = 200;

/// Head counts of the reception desk's shelter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct DeskCounts {
    /// Evacuees counted as present (在所 plus 外泊: on leave still counts).
    pub present: usize,
    /// Of those, on leave (外泊・一時外出).
    pub on_leave: usize,
    /// Evacuees who left (退所), or were registered and never checked in.
    pub out: usize,
    /// Present evacuees with at least one care flag (要配慮者).
    pub care: usize,
    /// Evacuees (merged: one per person).
    pub evacuees: usize,
    /// Records before merging duplicates from offline desks.
    pub records: usize,
    /// 収容人数 (0: not stated).
    pub capacity: u64,
}

/// One evacuee as a row of the reception screen (the full record: [`Desk::evacuee`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct DeskEvacuee {
    /// The evacuee id (hex).
    pub id: String,
    /// 氏名.
    pub name: String,
    /// かな.
    pub kana: String,
    /// 生年月日 (`YYYY-MM-DD`, or as entered when not a date).
    pub birth_date: String,
    /// 性別.
    pub sex: String,
    /// 世帯.
    pub household: String,
    /// 要配慮 flags.
    pub flags: BTreeSet<CareFlag>,
    /// アレルギー.
    pub allergies: String,
    /// 安否情報の開示同意.
    pub consent: bool,
    /// Whether a card (pseudonymous id) is on record: the person can check in by tapping it.
    pub has_card: bool,
    /// Where the person is now.
    pub presence: Presence,
    /// When the current (or last) stay began (RFC 3339; empty when never checked in).
    pub checked_in_at: String,
    /// When the last stay event happened (RFC 3339; empty when none).
    pub last_event_at: String,
}

impl DeskEvacuee {
    fn of(e: &Evacuee) -> DeskEvacuee {
        DeskEvacuee {
            id: e.id.clone(),
            name: e.name.clone(),
            kana: e.kana.clone(),
            birth_date: e.birth_date.clone(),
            sex: e.sex.clone(),
            household: e.household.clone(),
            flags: e.flags.clone(),
            allergies: e.allergies.clone(),
            consent: e.consent,
            has_card: !e.card_id.is_empty(),
            presence: e.presence(),
            checked_in_at: e.current_stay().map(|s| s.at.clone()).unwrap_or_default(),
            last_event_at: e.events.last().map(|s| s.at.clone()).unwrap_or_default(),
        }
    }
}

/// The reception screen: the shelter, its counts, its evacuees, needs and supply requests.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct DeskView {
    /// The shelter id.
    pub id: DocumentId,
    /// The shelter.
    pub shelter: ShelterInfo,
    /// Head counts.
    pub counts: DeskCounts,
    /// Every evacuee: present first, then on leave, then out; by kana within each.
    pub evacuees: Vec<DeskEvacuee>,
    /// Needs (ニーズ), oldest first.
    pub needs: Vec<Need>,
    /// Supply requests (物資要請), oldest first.
    pub requests: Vec<SupplyRequest>,
}

fn presence_rank(p: Presence) -> u8 {
    match p {
        Presence::Present => 0,
        Presence::OnLeave => 1,
        Presence::Out => 2,
    }
}

/// A name folded for search: NFKC (width), no spaces, lowercase, katakana as hiragana.
pub fn search_fold(s: &str) -> String {
    schema::normalise_name(s)
        .chars()
        .map(|c| match c {
            // ァ (U+30A1) .. ヶ (U+30F6) → ぁ (U+3041) .. ゖ (U+3096); ヽヾ → ゝゞ.
            '\u{30A1}'..='\u{30F6}' | '\u{30FD}'..='\u{30FE}' => {
                char::from_u32(c as u32 - 0x60).unwrap_or(c)
            }
            _ => c,
        })
        .collect()
}

fn io_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Io {
        path: "shelter".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Resolves a shelter id (a shelter document this facility can read).
pub fn shelter_doc(engine: &Engine, id: &str) -> Result<DocumentId> {
    let info = engine.document_info(id)?;
    if info.kind != DocumentKind::Shelter {
        return Err(EngineError::UnknownDocument(format!(
            "{id} (it is a {} document, not a shelter)",
            info.kind
        )));
    }
    Ok(info.id)
}

fn hq_members(engine: &Engine) -> Result<Vec<Member>> {
    Ok(engine
        .directory()?
        .facilities
        .iter()
        .filter(|f| f.role == FacilityRole::Hq && !f.revoked)
        .map(|f| Member {
            facility: f.id,
            role: Role::Writer,
        })
        .collect())
}

/// Opens a shelter: a roster owned by this facility with every HQ facility as a writer, and its
/// medical-notes document shared with the named health sections only.
pub fn open(engine: &mut Engine, req: &OpenShelter) -> Result<Opened> {
    let at = req.at.clone().unwrap_or_else(now_rfc3339);
    let mut health = Vec::new();
    for h in &req.health_sections {
        health.push(Member {
            facility: engine.find_facility(h)?.id,
            role: Role::Writer,
        });
    }
    let hq = hq_members(engine)?;
    let mut info = ShelterInfo {
        code: req.code.clone(),
        name: req.name.clone(),
        address: req.address.clone(),
        capacity: req.capacity,
        ..ShelterInfo::default()
    };
    let status_event = new_id();
    let shelter = engine.create_document(DocumentKind::Shelter, hq, |doc| {
        schema::init(doc, &info, &status_event, &at)?;
        Ok(())
    })?;
    let medical = engine.create_document(DocumentKind::ShelterMedical, health, |doc| {
        schema::init_medical(doc, &shelter.to_string())?;
        Ok(())
    })?;
    info.medical_doc = medical.to_string();
    let mut loaded = engine.load(shelter)?;
    schema::set_medical_doc(&mut loaded.doc, &info.medical_doc)?;
    engine.commit_recorded(&mut loaded, AuditAction::Create, &["open"])?;
    Ok(Opened { shelter, medical })
}

/// Adds every HQ facility of the directory that is not yet a member of this facility's shelter
/// `doc` (an HQ that enrolled after the shelter opened). Returns how many were added.
pub fn ensure_hq_members(engine: &mut Engine, doc: DocumentId) -> Result<usize> {
    let me = engine.enrolment()?.facility;
    let info = engine.document_info(&doc.to_string())?;
    if info.kind != DocumentKind::Shelter
        || !info
            .members
            .iter()
            .any(|m| m.facility == me && m.role == Role::Owner)
    {
        return Ok(0);
    }
    let mut added = 0;
    for m in hq_members(engine)? {
        if info.members.iter().any(|x| x.facility == m.facility) {
            continue;
        }
        engine.share(doc, &m.facility.to_string(), Some(Role::Writer))?;
        added += 1;
    }
    Ok(added)
}

/// Every shelter this facility can read, with its current head count.
pub fn list(engine: &Engine) -> Result<Vec<ShelterListing>> {
    let me = engine.enrolment()?.facility;
    let mut out = Vec::new();
    for row in engine.store().documents(Some(DocumentKind::Shelter))? {
        let loaded = match engine.load(row.info.id) {
            Ok(l) if !l.heads.is_empty() => l,
            Ok(_) | Err(EngineError::NoKey(_)) => continue,
            Err(e) => return Err(e),
        };
        let roster = schema::read(&loaded.doc)?;
        let role = row
            .info
            .members
            .iter()
            .find(|m| m.facility == me)
            .map(|m| m.role.to_string())
            .unwrap_or_default();
        out.push(ShelterListing {
            id: row.info.id,
            present: roster.present(),
            shelter: roster.shelter,
            role,
        });
    }
    Ok(out)
}

/// The roster of one shelter (merged evacuees).
pub fn roster(engine: &Engine, shelter: &str) -> Result<RosterView> {
    let doc = shelter_doc(engine, shelter)?;
    let loaded = engine.load(doc)?;
    let roster = schema::read(&loaded.doc)?;
    super::audit(engine, AuditAction::Read, Some(doc), &["roster"])?;
    Ok(view(doc, roster))
}

fn view(id: DocumentId, roster: Roster) -> RosterView {
    let present = roster.present();
    RosterView {
        id,
        shelter: roster.shelter,
        present,
        records: roster.records,
        evacuees: roster
            .evacuees
            .into_iter()
            .map(|e| EvacueeView {
                presence: e.presence(),
                evacuee: e,
            })
            .collect(),
        needs: roster.needs,
        requests: roster.requests,
    }
}

/// A reception desk working on one shelter: the document loaded once, any number of check-ins and
/// stay events, then one [`Desk::commit`] (one bundle). `checkin` uses it for a single person; bulk
/// work (a replay, a paper list typed in later) uses it directly.
pub struct Desk {
    doc: DocumentId,
    loaded: Loaded,
    roster: Roster,
    /// Identity key → index in `roster.evacuees`.
    index: HashMap<String, usize>,
    device: String,
    /// The staff member recorded on stay events (see [`Desk::set_staff`]).
    staff: String,
    notifications: Vec<mail::Draft>,
}

impl Desk {
    /// Loads the shelter `doc` for editing.
    pub fn open(engine: &Engine, doc: DocumentId) -> Result<Desk> {
        let loaded = engine.load(doc)?;
        let roster = schema::read(&loaded.doc)?;
        // The desk holds the whole roster for the staff member at the counter.
        super::audit(engine, AuditAction::Read, Some(doc), &["desk"])?;
        let mut index = HashMap::new();
        for (i, e) in roster.evacuees.iter().enumerate() {
            for k in e.keys() {
                index.insert(k, i);
            }
        }
        Ok(Desk {
            doc,
            loaded,
            roster,
            index,
            device: engine.device_id().to_string(),
            staff: String::new(),
            notifications: Vec::new(),
        })
    }

    /// The merged roster as of the last edit.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// The shelter id.
    pub fn id(&self) -> DocumentId {
        self.doc
    }

    /// Checks a person in: reuses the record of a known person, else makes a new one; writes a
    /// check-in event unless they are already present; queues relatives' notifications (sent to the
    /// mail outbox at [`Desk::commit`]).
    pub fn checkin(&mut self, req: &CheckIn) -> Result<CheckInOutcome> {
        let at = req.at.clone().unwrap_or_else(now_rfc3339);
        let keys = schema::identity_keys(
            &req.person.card_id,
            &req.person.name,
            &req.person.birth_date,
        );
        let slot = keys.iter().find_map(|k| self.index.get(k).copied());
        let existing = slot.map(|i| self.roster.evacuees[i].clone());
        let (evacuee, reused) = match &existing {
            Some(e) => {
                // Fill in what reception learned now: relatives and care flags are added.
                for r in &req.person.relatives {
                    schema::add_relative(&mut self.loaded.doc, &e.id, r)?;
                }
                let new_flags: BTreeSet<CareFlag> =
                    req.person.flags.difference(&e.flags).copied().collect();
                if !new_flags.is_empty() {
                    schema::add_flags(&mut self.loaded.doc, &e.id, &new_flags)?;
                }
                if e.card_id.is_empty() && !req.person.card_id.is_empty() {
                    schema::set_evacuee_field(
                        &mut self.loaded.doc,
                        &e.id,
                        "card_id",
                        &req.person.card_id,
                    )?;
                }
                (e.id.clone(), true)
            }
            None => {
                let id = new_id();
                schema::add_evacuee(&mut self.loaded.doc, &id, &req.person, &at)?;
                (id, false)
            }
        };
        // Keep the in-memory view in step without re-reading the whole document.
        let slot = match slot {
            Some(i) => {
                let e = &mut self.roster.evacuees[i];
                for r in &req.person.relatives {
                    let email = r.email.trim().to_ascii_lowercase();
                    if !e.relatives.iter().any(|x| x.email == email) {
                        e.relatives.push(Relative {
                            name: r.name.trim().to_owned(),
                            email,
                        });
                    }
                }
                e.flags.extend(req.person.flags.iter().copied());
                if e.card_id.is_empty() {
                    e.card_id = req.person.card_id.trim().to_ascii_lowercase();
                }
                i
            }
            None => {
                let p = &req.person;
                let e = Evacuee {
                    id: evacuee.clone(),
                    name: p.name.trim().to_owned(),
                    kana: p.kana.trim().to_owned(),
                    birth_date: schema::normalise_date(&p.birth_date),
                    sex: p.sex.trim().to_owned(),
                    address: p.address.trim().to_owned(),
                    household: p.household.trim().to_owned(),
                    contact: p.contact.trim().to_owned(),
                    card_id: p.card_id.trim().to_ascii_lowercase(),
                    flags: p.flags.clone(),
                    allergies: p.allergies.trim().to_owned(),
                    pets: p.pets.trim().to_owned(),
                    vehicle: p.vehicle.trim().to_owned(),
                    consent: p.consent,
                    relatives: p
                        .relatives
                        .iter()
                        .map(|r| Relative {
                            name: r.name.trim().to_owned(),
                            email: r.email.trim().to_ascii_lowercase(),
                        })
                        .collect(),
                    registered_at: at.clone(),
                    events: Vec::new(),
                    merged_ids: Vec::new(),
                };
                self.roster.evacuees.push(e);
                self.roster.records += 1;
                self.roster.evacuees.len() - 1
            }
        };
        for k in self.roster.evacuees[slot].keys() {
            self.index.insert(k, slot);
        }
        let already_present = existing.as_ref().is_some_and(|e| e.presence().counts());
        let mut event_id = String::new();
        if !already_present {
            event_id = new_id();
            let event = StayEvent {
                id: event_id.clone(),
                kind: StayKind::CheckIn,
                at: at.clone(),
                method: req.method,
                device: self.device.clone(),
                staff: self.staff.clone(),
                note: String::new(),
            };
            schema::add_event(&mut self.loaded.doc, &evacuee, &event)?;
            push_event(&mut self.roster.evacuees[slot], event);
        }
        let mut notifications = 0;
        if !already_present {
            let merged = self.roster.evacuees[slot].clone();
            for r in &merged.relatives {
                self.notifications.push(mail::Draft {
                    stay_event: event_id.clone(),
                    shelter: self.doc,
                    shelter_name: self.roster.shelter.name.clone(),
                    shelter_address: self.roster.shelter.address.clone(),
                    evacuee_name: merged.name.clone(),
                    relative: r.clone(),
                    at: at.clone(),
                });
                notifications += 1;
            }
        }
        Ok(CheckInOutcome {
            evacuee,
            reused,
            already_present,
            event: event_id,
            moved_from: Vec::new(),
            notifications,
        })
    }

    /// Writes a stay event (leave, return, check-out) for the evacuee `evacuee` (any id merged into
    /// it works too). Returns the event id.
    pub fn stay(
        &mut self,
        evacuee: &str,
        kind: StayKind,
        method: Method,
        at: Option<String>,
        note: &str,
    ) -> Result<String> {
        let slot = self
            .roster
            .evacuees
            .iter()
            .position(|e| e.id == evacuee || e.merged_ids.iter().any(|m| m == evacuee));
        let e = slot
            .map(|i| self.roster.evacuees[i].clone())
            .ok_or_else(|| {
                EngineError::from(musubi_crdt::documents::DocumentError::InvalidValue {
                    key: "evacuee".into(),
                    reason: format!("no evacuee `{evacuee}` in this shelter"),
                })
            })?;
        let presence = e.presence();
        let allowed = match kind {
            StayKind::CheckIn => presence == Presence::Out,
            StayKind::Leave => presence == Presence::Present,
            StayKind::Return => presence == Presence::OnLeave,
            StayKind::CheckOut => presence.counts(),
        };
        if !allowed {
            return Err(EngineError::from(
                musubi_crdt::documents::DocumentError::InvalidValue {
                    key: "stay".into(),
                    reason: format!(
                        "cannot record {} for an evacuee who is {}",
                        kind.as_str(),
                        match presence {
                            Presence::Present => "present",
                            Presence::OnLeave => "on leave",
                            Presence::Out => "not checked in",
                        }
                    ),
                },
            ));
        }
        let id = new_id();
        let event = StayEvent {
            id: id.clone(),
            kind,
            at: at.unwrap_or_else(now_rfc3339),
            method,
            device: self.device.clone(),
            staff: self.staff.clone(),
            note: note.to_owned(),
        };
        schema::add_event(&mut self.loaded.doc, &e.id, &event)?;
        if let Some(i) = slot {
            push_event(&mut self.roster.evacuees[i], event);
        }
        Ok(id)
    }

    /// Records `staff` (the signed-in staff member's name) on the stay events written from now on.
    pub fn set_staff(&mut self, staff: &str) {
        staff.trim().clone_into(&mut self.staff);
    }

    /// Errors when the shelter is closed (閉鎖): reception takes no check-ins then.
    ///
    /// # Errors
    ///
    /// [`EngineError::Document`] (`InvalidValue` on `shelter`) naming the shelter.
    pub fn ensure_open(&self) -> Result<()> {
        if self.roster.shelter.status == ShelterStatus::Closed {
            return Err(EngineError::from(
                musubi_crdt::documents::DocumentError::InvalidValue {
                    key: "shelter".into(),
                    reason: format!(
                        "{} is closed; reopen it (開設) before checking anyone in",
                        self.roster.shelter.name
                    ),
                },
            ));
        }
        Ok(())
    }

    /// The reception screen's view: counts and one row per merged evacuee, present first, then
    /// on leave, then out; within each, by kana (or name when there is none).
    pub fn view(&self) -> DeskView {
        let mut counts = DeskCounts {
            capacity: self.roster.shelter.capacity,
            records: self.roster.records,
            evacuees: self.roster.evacuees.len(),
            ..DeskCounts::default()
        };
        let mut rows: Vec<DeskEvacuee> = self
            .roster
            .evacuees
            .iter()
            .map(|e| {
                let row = DeskEvacuee::of(e);
                match row.presence {
                    Presence::Present => counts.present += 1,
                    Presence::OnLeave => {
                        counts.present += 1;
                        counts.on_leave += 1;
                    }
                    Presence::Out => counts.out += 1,
                }
                if row.presence.counts() && !row.flags.is_empty() {
                    counts.care += 1;
                }
                row
            })
            .collect();
        rows.sort_by_cached_key(|r| {
            let key = if r.kana.is_empty() { &r.name } else { &r.kana };
            (presence_rank(r.presence), search_fold(key), r.id.clone())
        });
        DeskView {
            id: self.doc,
            shelter: self.roster.shelter.clone(),
            counts,
            evacuees: rows,
            needs: self.roster.needs.clone(),
            requests: self.roster.requests.clone(),
        }
    }

    /// Evacuees whose name or kana contains `query`, at most `limit` (capped at
    /// [`SEARCH_RESULTS_MAX`]). Matching ignores case, width (NFKC), spaces and the difference
    /// between hiragana and katakana; a query that is a date (`1950/1/2`) matches the birth date.
    /// Best first: exact, then prefix, then substring matches; present before out; then by kana.
    /// An empty query matches nobody.
    pub fn search(&self, query: &str, limit: usize) -> Vec<DeskEvacuee> {
        let q = search_fold(query);
        if q.is_empty() || limit == 0 {
            return Vec::new();
        }
        let date = schema::normalise_date(query);
        let is_date = schema::rfc3339_ms(&format!("{date}T00:00:00Z")).is_some();
        let mut hits: Vec<(u8, u8, String, &Evacuee)> = Vec::new();
        for e in &self.roster.evacuees {
            let name = search_fold(&e.name);
            let kana = search_fold(&e.kana);
            let rank = [&name, &kana]
                .iter()
                .filter_map(|f| {
                    if **f == q {
                        Some(0)
                    } else if f.starts_with(&q) {
                        Some(1)
                    } else if f.contains(&q) {
                        Some(2)
                    } else {
                        None
                    }
                })
                .min()
                .or_else(|| (is_date && e.birth_date == date).then_some(0));
            if let Some(rank) = rank {
                let order = if kana.is_empty() { name } else { kana };
                hits.push((rank, presence_rank(e.presence()), order, e));
            }
        }
        hits.sort_by(|a, b| (a.0, a.1, &a.2, &a.3.id).cmp(&(b.0, b.1, &b.2, &b.3.id)));
        hits.into_iter()
            .take(limit.min(SEARCH_RESULTS_MAX))
            .map(|h| DeskEvacuee::of(h.3))
            .collect()
    }

    /// One merged evacuee with every field and stay event (`evacuee` may be any id merged into it).
    pub fn evacuee(&self, evacuee: &str) -> Option<EvacueeView> {
        self.roster.evacuee(evacuee).map(|e| EvacueeView {
            presence: e.presence(),
            evacuee: e.clone(),
        })
    }

    /// One merged evacuee as a row of [`Desk::view`] (`evacuee` may be any id merged into it).
    pub fn row(&self, evacuee: &str) -> Option<DeskEvacuee> {
        self.roster.evacuee(evacuee).map(DeskEvacuee::of)
    }

    fn slot_of(&self, evacuee: &str) -> Result<usize> {
        self.roster
            .evacuees
            .iter()
            .position(|e| e.id == evacuee || e.merged_ids.iter().any(|m| m == evacuee))
            .ok_or_else(|| {
                EngineError::from(musubi_crdt::documents::DocumentError::InvalidValue {
                    key: "evacuee".into(),
                    reason: format!("no evacuee `{evacuee}` in this shelter"),
                })
            })
    }

    /// Sets the care flags (要配慮) of an evacuee to exactly `flags`: adds the missing ones to its
    /// record and removes the others from every record merged into it (flags merge as a union).
    /// Returns whether anything changed. Commit with [`Desk::commit`].
    ///
    /// # Errors
    ///
    /// [`EngineError::Document`] for an unknown evacuee.
    pub fn set_flags(&mut self, evacuee: &str, flags: &BTreeSet<CareFlag>) -> Result<bool> {
        let slot = self.slot_of(evacuee)?;
        let e = &self.roster.evacuees[slot];
        let add: BTreeSet<CareFlag> = flags.difference(&e.flags).copied().collect();
        let remove: BTreeSet<CareFlag> = e.flags.difference(flags).copied().collect();
        if add.is_empty() && remove.is_empty() {
            return Ok(false);
        }
        let ids: Vec<String> = std::iter::once(e.id.clone())
            .chain(e.merged_ids.iter().cloned())
            .collect();
        if !add.is_empty() {
            schema::add_flags(&mut self.loaded.doc, &ids[0], &add)?;
        }
        if !remove.is_empty() {
            for id in &ids {
                schema::remove_flags(&mut self.loaded.doc, id, &remove)?;
            }
        }
        self.roster.evacuees[slot].flags = flags.clone();
        Ok(true)
    }

    /// Records the evacuee's consent to disclose safety information (安否情報の開示同意) on its record
    /// and every record merged into it (consent merges as "all records consent"). Returns whether
    /// anything changed. Commit with [`Desk::commit`].
    ///
    /// # Errors
    ///
    /// [`EngineError::Document`] for an unknown evacuee.
    pub fn set_consent(&mut self, evacuee: &str, consent: bool) -> Result<bool> {
        let slot = self.slot_of(evacuee)?;
        let e = &self.roster.evacuees[slot];
        if e.consent == consent {
            return Ok(false);
        }
        let ids: Vec<String> = std::iter::once(e.id.clone())
            .chain(e.merged_ids.iter().cloned())
            .collect();
        let value = if consent { "true" } else { "false" };
        for id in &ids {
            schema::set_evacuee_field(&mut self.loaded.doc, id, "consent", value)?;
        }
        self.roster.evacuees[slot].consent = consent;
        Ok(true)
    }

    /// Seals the edits into a bundle (durable before it returns) and queues the relatives'
    /// notifications in the mail outbox. Returns how many bundles were written.
    pub fn commit(&mut self, engine: &mut Engine) -> Result<usize> {
        let written = engine.commit_recorded(&mut self.loaded, AuditAction::Edit, &["roster"])?;
        for draft in self.notifications.drain(..) {
            mail::enqueue(engine, &draft)?;
        }
        Ok(written)
    }
}

/// Inserts an event in time order (then id order), as [`schema::read`] sorts them.
fn push_event(e: &mut Evacuee, event: StayEvent) {
    let key = |x: &StayEvent| (schema::rfc3339_ms(&x.at).unwrap_or(i64::MIN), x.id.clone());
    let k = key(&event);
    let pos = e.events.partition_point(|x| key(x) <= k);
    e.events.insert(pos, event);
}

/// Checks a person in at `shelter` (see [`Desk::checkin`]) and out of every other shelter this
/// facility can write where they are present (a move). Durable when it returns.
pub fn checkin(engine: &mut Engine, shelter: &str, req: &CheckIn) -> Result<CheckInOutcome> {
    let doc = shelter_doc(engine, shelter)?;
    let mut req = req.clone();
    let at = req.at.clone().unwrap_or_else(now_rfc3339);
    req.at = Some(at.clone());
    let mut desk = Desk::open(engine, doc)?;
    desk.ensure_open()?;
    let mut outcome = desk.checkin(&req)?;
    desk.commit(engine)?;
    if !outcome.already_present {
        let keys = desk
            .roster()
            .evacuee(&outcome.evacuee)
            .map(Evacuee::keys)
            .unwrap_or_default();
        outcome.moved_from = move_out_elsewhere(engine, doc, &keys, &at)?;
    }
    Ok(outcome)
}

/// Checks the person with `keys` (see [`Evacuee::keys`]) out of every other shelter this facility
/// can write where they are present, with the note `moved-to:<shelter>`, at `at` (RFC 3339). Each
/// shelter changed is committed (durable) before it returns. Returns the shelters changed.
///
/// Cost: one store query when this facility writes no other shelter; otherwise one load per other
/// shelter.
pub fn move_out_elsewhere(
    engine: &mut Engine,
    here: DocumentId,
    keys: &[String],
    at: &str,
) -> Result<Vec<DocumentId>> {
    let me = engine.enrolment()?.facility;
    let mut moved = Vec::new();
    for row in engine.store().documents(Some(DocumentKind::Shelter))? {
        if row.info.id == here
            || !row
                .info
                .members
                .iter()
                .any(|m| m.facility == me && m.role.can_write())
        {
            continue;
        }
        let mut desk = match Desk::open(engine, row.info.id) {
            Ok(d) => d,
            Err(EngineError::NoKey(_)) => continue,
            Err(e) => return Err(e),
        };
        let Some(e) = desk.roster().find(keys).cloned() else {
            continue;
        };
        if !e.presence().counts() {
            continue;
        }
        let method = e.events.last().map(|x| x.method).unwrap_or_default();
        desk.stay(
            &e.id,
            StayKind::CheckOut,
            method,
            Some(at.to_owned()),
            &format!("moved-to:{here}"),
        )?;
        desk.commit(engine)?;
        moved.push(row.info.id);
    }
    Ok(moved)
}

/// Writes a leave (外泊), return (帰所) or check-out (退所) for an evacuee. Returns the event id.
pub fn stay(
    engine: &mut Engine,
    shelter: &str,
    evacuee: &str,
    kind: StayKind,
    method: Method,
    at: Option<String>,
) -> Result<String> {
    let doc = shelter_doc(engine, shelter)?;
    let mut desk = Desk::open(engine, doc)?;
    let id = desk.stay(evacuee, kind, method, at, "")?;
    desk.commit(engine)?;
    Ok(id)
}

/// Closes (閉鎖) or reopens (開設) a shelter.
pub fn set_status(
    engine: &mut Engine,
    shelter: &str,
    status: ShelterStatus,
    at: Option<String>,
) -> Result<()> {
    let doc = shelter_doc(engine, shelter)?;
    let mut loaded = engine.load(doc)?;
    schema::set_status(
        &mut loaded.doc,
        &new_id(),
        status,
        &at.unwrap_or_else(now_rfc3339),
    )?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["set-status"])?;
    Ok(())
}

/// Sets 収容人数.
pub fn set_capacity(engine: &mut Engine, shelter: &str, capacity: u64) -> Result<()> {
    let doc = shelter_doc(engine, shelter)?;
    let mut loaded = engine.load(doc)?;
    schema::set_capacity(&mut loaded.doc, capacity)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["set-capacity"])?;
    Ok(())
}

/// Adds a supply request (物資要請); returns its id.
pub fn request(
    engine: &mut Engine,
    shelter: &str,
    item: &str,
    quantity: u64,
    unit: &str,
    urgency: Urgency,
    note: &str,
) -> Result<String> {
    let doc = shelter_doc(engine, shelter)?;
    let mut loaded = engine.load(doc)?;
    let id = new_id();
    schema::add_request(
        &mut loaded.doc,
        &SupplyRequest {
            id: id.clone(),
            item: item.to_owned(),
            quantity,
            unit: unit.to_owned(),
            urgency,
            status: RequestStatus::Open,
            requested_at: now_rfc3339(),
            note: note.to_owned(),
        },
    )?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["request"])?;
    Ok(id)
}

/// Moves a supply request's status forward (HQ marks it arranged, the shelter delivered).
pub fn set_request_status(
    engine: &mut Engine,
    shelter: &str,
    request: &str,
    status: RequestStatus,
) -> Result<()> {
    let doc = shelter_doc(engine, shelter)?;
    let mut loaded = engine.load(doc)?;
    schema::set_request_status(&mut loaded.doc, request, status)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["set-request-status"])?;
    Ok(())
}

/// Adds a need (ニーズ) of the shelter; returns its id.
pub fn add_need(engine: &mut Engine, shelter: &str, text: &str) -> Result<String> {
    let doc = shelter_doc(engine, shelter)?;
    let mut loaded = engine.load(doc)?;
    let id = new_id();
    schema::add_need(
        &mut loaded.doc,
        &Need {
            id: id.clone(),
            text: text.to_owned(),
            at: now_rfc3339(),
            resolved: false,
        },
    )?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["add-need"])?;
    Ok(id)
}

/// Marks a need resolved.
pub fn resolve_need(engine: &mut Engine, shelter: &str, need: &str) -> Result<()> {
    let doc = shelter_doc(engine, shelter)?;
    let mut loaded = engine.load(doc)?;
    schema::resolve_need(&mut loaded.doc, need)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["resolve-need"])?;
    Ok(())
}

/// Adds a relative to notify on later check-ins.
pub fn add_relative(
    engine: &mut Engine,
    shelter: &str,
    evacuee: &str,
    relative: &Relative,
) -> Result<()> {
    let doc = shelter_doc(engine, shelter)?;
    let mut desk = Desk::open(engine, doc)?;
    let id = desk
        .roster()
        .evacuee(evacuee)
        .map(|e| e.id.clone())
        .unwrap_or_else(|| evacuee.to_owned());
    schema::add_relative(&mut desk.loaded.doc, &id, relative)?;
    desk.commit(engine)?;
    Ok(())
}

/// The medical-notes document of a shelter (from the roster's `medical_doc`).
pub fn medical_doc(engine: &Engine, shelter: &str) -> Result<DocumentId> {
    let doc = shelter_doc(engine, shelter)?;
    let loaded = engine.load(doc)?;
    let info = schema::read_shelter(&loaded.doc)?;
    engine
        .document_info(&info.medical_doc)
        .map(|i| i.id)
        .map_err(|_| {
            EngineError::UnknownDocument(format!(
                "the medical notes of shelter {shelter} ({}); this facility is not a member of them",
                if info.medical_doc.is_empty() {
                    "none recorded"
                } else {
                    info.medical_doc.as_str()
                }
            ))
        })
}

/// Shares the medical notes with an HQ health section (owner only).
pub fn medical_share(engine: &mut Engine, shelter: &str, facility: &str) -> Result<()> {
    let doc = medical_doc(engine, shelter)?;
    engine.share(doc, facility, Some(Role::Writer))
}

/// Writes an evacuee's medical note (持病, 服薬, 要介護).
pub fn medical_note(engine: &mut Engine, shelter: &str, note: &MedicalNote) -> Result<()> {
    let doc = medical_doc(engine, shelter)?;
    let mut note = note.clone();
    if note.updated_at.is_empty() {
        note.updated_at = now_rfc3339();
    }
    let mut loaded = engine.load(doc)?;
    schema::set_medical_note(&mut loaded.doc, &note)?;
    engine.commit_recorded(&mut loaded, AuditAction::Edit, &["medical-note"])?;
    Ok(())
}

/// Reads a shelter's medical notes (members only: others get `NoKey` or `UnknownDocument`).
pub fn medical_show(engine: &Engine, shelter: &str) -> Result<MedicalNotes> {
    let doc = medical_doc(engine, shelter)?;
    let loaded = engine.load(doc)?;
    let notes = schema::read_medical(&loaded.doc)?;
    super::audit(engine, AuditAction::Read, Some(doc), &["medical"])?;
    Ok(notes)
}

/// Parses `NAME:EMAIL` (the e-mail is after the last colon).
pub fn parse_relative(s: &str) -> Result<Relative> {
    let (name, email) = s.rsplit_once(':').ok_or_else(|| {
        io_err(format!(
            "relative `{s}` should be NAME:EMAIL (e.g. 山田花子:hanako@example.jp)"
        ))
    })?;
    Ok(Relative {
        name: name.trim().to_owned(),
        email: email.trim().to_owned(),
    })
}
