//! The shelter roster (避難所) and its medical notes as Automerge documents.
//!
//! A community centre opens one shelter document per shelter; the disaster HQ facilities are members
//! of every one (DESIGN "Membership policy"). Medical notes (持病, 服薬, 要介護) live in a separate
//! [`MEDICAL_KIND`] document with fewer members (DESIGN invariant 4).
//!
//! # Layout (schema version [`SCHEMA_VERSION`])
//!
//! ```text
//! ROOT (map)
//!   kind            str   "shelter"
//!   schema_version  uint  1
//!   shelter         map   { code, name, address: str, capacity: uint, medical_doc: str }
//!   status          map   { <event id>: map { status: "open" | "closed", at: str } }
//!   evacuees        map   { <evacuee id>: map {
//!                             name, kana, birth_date, sex, address, household, contact, card_id,
//!                             allergies, pets, vehicle, registered_at: str   (absent when empty)
//!                             consent: bool                                  (安否情報の開示同意)
//!                             flags: map { <care flag>: true }               (要配慮)
//!                             relatives: map { <lowercased e-mail>: map { name, email } }
//!                             events: map { <event id>: map { kind, at, method, device, staff,
//!                                                             note } } } }
//!   needs           map   { <need id>: map { text, at: str, resolved: bool } }
//!   requests        map   { <request id>: map { item, unit, urgency, status, requested_at, note: str,
//!                                               quantity: uint } }
//! ```
//!
//! Ids are random hex strings drawn by the caller (this crate draws no randomness); times are RFC 3339
//! strings given by the caller (this crate reads no clock).
//!
//! # Merge rules
//!
//! - Stay events (入所, 外泊, 帰所, 退所) are entries of a map keyed by a random event id: two reception
//!   desks adding events offline both keep theirs. Events are never edited or removed; the state of a
//!   stay is computed from all of them in time order ([`Evacuee::presence`]).
//! - Two desks that register the same person offline create two records. [`read`] merges them on
//!   read ([`dedup`]): records with the same pseudonymous card id, or the same normalised name and
//!   birth date ([`person_key`]), are one evacuee whose id is the smallest of their ids; its events,
//!   care flags and relatives are the union, empty fields are filled from the other records in id
//!   order, and consent holds only if every record consented. Nothing is deleted, so a wrong merge is
//!   visible in `merged_ids` and a later schema can undo it.
//! - The shelter's status is the latest status event by time (then by event id); a request's status
//!   only moves forward (open → arranged → delivered → cancelled, a max-register as in the referral
//!   letter); scalar fields are last-writer-wins.
//! - [`init`] runs once, at the document's creator.

use super::common::{self, read_u64, too_large, wrong_type};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValueRef, ValueRef};
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use super::DocumentError;

/// The value of the root `kind` key of a shelter roster.
pub const KIND: &str = "shelter";

/// The value of the root `kind` key of a shelter's medical-notes document.
pub const MEDICAL_KIND: &str = "shelter_medical";

/// The schema version this build writes and the newest one it reads (both kinds).
pub const SCHEMA_VERSION: u64 = 1;

/// Maximum size of one text field (name, address, allergies, a note...), in UTF-8 bytes.
pub const FIELD_BYTES_MAX: usize = 4 * 1024;

/// Maximum number of evacuee records in one shelter document (the largest Japanese shelters hold a
/// few thousand people; duplicates from offline desks count too).
pub const EVACUEES_COUNT_MAX: usize = 50_000;

/// Maximum number of stay events of one evacuee record.
pub const EVENTS_PER_EVACUEE_MAX: usize = 2_000;

/// Maximum number of relatives to notify, per evacuee.
pub const RELATIVES_COUNT_MAX: usize = 8;

/// Maximum number of needs plus supply requests of one shelter.
pub const REQUESTS_COUNT_MAX: usize = 10_000;

use super::common::KEY_KIND;
use super::common::KEY_SCHEMA_VERSION;
const KEY_SHELTER: &str = "shelter";
const KEY_STATUS: &str = "status";
const KEY_EVACUEES: &str = "evacuees";
const KEY_NEEDS: &str = "needs";
const KEY_REQUESTS: &str = "requests";
const KEY_NOTES: &str = "notes";

/// The text fields of an evacuee record, by key, in roster order.
pub const EVACUEE_TEXT_FIELDS: [&str; 12] = [
    "name",
    "kana",
    "birth_date",
    "sex",
    "address",
    "household",
    "contact",
    "card_id",
    "allergies",
    "pets",
    "vehicle",
    "registered_at",
];

/// 開設 / 閉鎖: whether a shelter takes evacuees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "lowercase")]
pub enum ShelterStatus {
    /// 開設: open.
    #[default]
    Open,
    /// 閉鎖: closed.
    Closed,
}

impl ShelterStatus {
    /// The lowercase name stored in the document and used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ShelterStatus::Open => "open",
            ShelterStatus::Closed => "closed",
        }
    }
}

/// The shelter itself, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct ShelterInfo {
    /// 施設コード: the registry id (e.g. `CC0000000504` of the 指定緊急避難場所 open data); may be empty.
    pub code: String,
    /// 名称 (e.g. `御祓地区コミュニティセンター`).
    pub name: String,
    /// 住所.
    pub address: String,
    /// 収容人数 (0: not stated).
    pub capacity: u64,
    /// 開設 / 閉鎖, the latest status event.
    pub status: ShelterStatus,
    /// When the current status was set (RFC 3339).
    pub status_at: String,
    /// The id of the medical-notes document of this shelter (empty: none). Only its members can read it.
    pub medical_doc: String,
}

/// 要配慮 (a care need that reception staff flag at check-in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum CareFlag {
    /// 高齢者.
    Elderly,
    /// 障害者.
    Disability,
    /// 乳幼児.
    Infant,
    /// 妊産婦.
    Pregnant,
    /// 外国人 (needs language support).
    Foreigner,
    /// 要介護.
    CareNeeded,
    /// 医療的ケア (e.g. dialysis, oxygen, tube feeding).
    MedicalCare,
    /// 食物アレルギー (the details are in `allergies`).
    FoodAllergy,
}

impl CareFlag {
    /// Every flag, in form order.
    pub const ALL: [CareFlag; 8] = [
        CareFlag::Elderly,
        CareFlag::Disability,
        CareFlag::Infant,
        CareFlag::Pregnant,
        CareFlag::Foreigner,
        CareFlag::CareNeeded,
        CareFlag::MedicalCare,
        CareFlag::FoodAllergy,
    ];

    /// The kebab-case key stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            CareFlag::Elderly => "elderly",
            CareFlag::Disability => "disability",
            CareFlag::Infant => "infant",
            CareFlag::Pregnant => "pregnant",
            CareFlag::Foreigner => "foreigner",
            CareFlag::CareNeeded => "care-needed",
            CareFlag::MedicalCare => "medical-care",
            CareFlag::FoodAllergy => "food-allergy",
        }
    }

    /// The Japanese label of the form (高齢者, 障害者, ...).
    pub fn label(self) -> &'static str {
        match self {
            CareFlag::Elderly => "高齢者",
            CareFlag::Disability => "障害者",
            CareFlag::Infant => "乳幼児",
            CareFlag::Pregnant => "妊産婦",
            CareFlag::Foreigner => "外国人",
            CareFlag::CareNeeded => "要介護",
            CareFlag::MedicalCare => "医療的ケア",
            CareFlag::FoodAllergy => "食物アレルギー",
        }
    }
}

impl FromStr for CareFlag {
    type Err = DocumentError;

    /// Parses the key (`elderly`) or the Japanese label (`高齢者`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        CareFlag::ALL
            .into_iter()
            .find(|f| f.as_str() == s || f.label() == s)
            .ok_or_else(|| DocumentError::InvalidValue {
                key: "flags".to_owned(),
                reason: format!(
                    "unknown care flag `{s}`; valid flags are: {}",
                    CareFlag::ALL
                        .map(|f| format!("{} ({})", f.as_str(), f.label()))
                        .join(", ")
                ),
            })
    }
}

/// A relative to notify by e-mail on check-in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Relative {
    /// 氏名.
    pub name: String,
    /// E-mail address.
    pub email: String,
}

/// What a stay event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum StayKind {
    /// 入所: check-in.
    CheckIn,
    /// 外泊・一時外出: temporary leave (the person still counts as present).
    Leave,
    /// 帰所: back from leave.
    Return,
    /// 退所: check-out.
    CheckOut,
}

impl StayKind {
    /// The kebab-case name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            StayKind::CheckIn => "check-in",
            StayKind::Leave => "leave",
            StayKind::Return => "return",
            StayKind::CheckOut => "check-out",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            StayKind::CheckIn,
            StayKind::Leave,
            StayKind::Return,
            StayKind::CheckOut,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// How reception identified the person.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// マイナンバーカード (the pseudonymous id of its user-authentication certificate).
    MyNumberCard,
    /// 交通系ICカード (the pseudonymous id of its IDm/UID).
    TransitCard,
    /// A QR code (e.g. pre-registration).
    Qr,
    /// Entered by hand.
    #[default]
    Manual,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 4] = [
        Method::MyNumberCard,
        Method::TransitCard,
        Method::Qr,
        Method::Manual,
    ];

    /// The kebab-case name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::MyNumberCard => "my-number-card",
            Method::TransitCard => "transit-card",
            Method::Qr => "qr",
            Method::Manual => "manual",
        }
    }
}

impl FromStr for Method {
    type Err = DocumentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == s.trim())
            .ok_or_else(|| DocumentError::InvalidValue {
                key: "method".to_owned(),
                reason: format!(
                    "unknown method `{s}`; valid methods are: {}",
                    Method::ALL.map(Method::as_str).join(", ")
                ),
            })
    }
}

/// One stay event (入所, 外泊, 帰所, 退所) of an evacuee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct StayEvent {
    /// Random event id (hex).
    pub id: String,
    /// What happened.
    pub kind: StayKind,
    /// When, RFC 3339.
    pub at: String,
    /// How the person was identified.
    pub method: Method,
    /// The device that recorded it (a public device id; empty when unknown).
    pub device: String,
    /// The staff member who recorded it (their name as in the audit log; empty when unknown, e.g.
    /// a check-out written by the CLI or because the person checked in elsewhere).
    pub staff: String,
    /// A note, e.g. `moved-to:<shelter id>` for a check-out written because the person checked in
    /// at another shelter.
    pub note: String,
}

impl StayEvent {
    /// The sort key: time, then id (so every replica orders concurrent events alike).
    fn order_key(&self) -> (i64, &str) {
        (rfc3339_ms(&self.at).unwrap_or(i64::MIN), self.id.as_str())
    }
}

/// Where an evacuee is, as computed from the stay events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    /// 在所: checked in (or back from leave).
    Present,
    /// 外泊・一時外出: away for a while; counts as present.
    OnLeave,
    /// 退所 (or never checked in).
    Out,
}

impl Presence {
    /// Whether the person counts in the shelter's head count (present or on leave).
    pub fn counts(self) -> bool {
        matches!(self, Presence::Present | Presence::OnLeave)
    }
}

/// An evacuee (one person, after merging duplicate records).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Evacuee {
    /// The evacuee id (the smallest id of the merged records).
    pub id: String,
    /// 氏名.
    pub name: String,
    /// かな.
    pub kana: String,
    /// 生年月日 (`YYYY-MM-DD`).
    pub birth_date: String,
    /// 性別.
    pub sex: String,
    /// 住所.
    pub address: String,
    /// 世帯 (household: e.g. the head of household's name or a household number).
    pub household: String,
    /// 連絡先 (phone).
    pub contact: String,
    /// The pseudonymous card id (an HMAC, hex); never a card number.
    pub card_id: String,
    /// 要配慮.
    pub flags: BTreeSet<CareFlag>,
    /// アレルギー.
    pub allergies: String,
    /// ペット.
    pub pets: String,
    /// 車両 (e.g. a number plate for car evacuees, 車中泊).
    pub vehicle: String,
    /// 安否情報の開示同意: may HQ answer safety inquiries about this person.
    pub consent: bool,
    /// Relatives to notify.
    pub relatives: Vec<Relative>,
    /// When the record was made (RFC 3339).
    pub registered_at: String,
    /// Every stay event, in time order.
    pub events: Vec<StayEvent>,
    /// Ids of the duplicate records merged into this one (empty when there were none).
    pub merged_ids: Vec<String>,
}

impl Evacuee {
    fn text(&self, key: &str) -> &str {
        match key {
            "name" => &self.name,
            "kana" => &self.kana,
            "birth_date" => &self.birth_date,
            "sex" => &self.sex,
            "address" => &self.address,
            "household" => &self.household,
            "contact" => &self.contact,
            "card_id" => &self.card_id,
            "allergies" => &self.allergies,
            "pets" => &self.pets,
            "vehicle" => &self.vehicle,
            "registered_at" => &self.registered_at,
            _ => "",
        }
    }

    fn text_mut(&mut self, key: &str) -> Option<&mut String> {
        Some(match key {
            "name" => &mut self.name,
            "kana" => &mut self.kana,
            "birth_date" => &mut self.birth_date,
            "sex" => &mut self.sex,
            "address" => &mut self.address,
            "household" => &mut self.household,
            "contact" => &mut self.contact,
            "card_id" => &mut self.card_id,
            "allergies" => &mut self.allergies,
            "pets" => &mut self.pets,
            "vehicle" => &mut self.vehicle,
            "registered_at" => &mut self.registered_at,
            _ => return None,
        })
    }

    /// Where the person is after all events up to `until_ms` (Unix ms; `None`: all events).
    ///
    /// Check-in → present; leave → on leave; return → present; check-out → out. A second check-in
    /// while present (two desks) changes nothing.
    pub fn presence_at(&self, until_ms: Option<i64>) -> Presence {
        let mut state = Presence::Out;
        for e in &self.events {
            if until_ms.is_some_and(|t| rfc3339_ms(&e.at).is_none_or(|at| at > t)) {
                break;
            }
            state = match (state, e.kind) {
                (_, StayKind::CheckIn) => Presence::Present,
                // Leave, return or check-out of someone who is not in changes nothing.
                (Presence::Out, _) => Presence::Out,
                (_, StayKind::Leave) => Presence::OnLeave,
                (_, StayKind::Return) => Presence::Present,
                (_, StayKind::CheckOut) => Presence::Out,
            };
        }
        state
    }

    /// Where the person is now (after every event).
    pub fn presence(&self) -> Presence {
        self.presence_at(None)
    }

    /// The check-in event that began the current (or last) stay: the first check-in after the last
    /// check-out. Its id is the stay id (relatives are notified once per stay).
    pub fn current_stay(&self) -> Option<&StayEvent> {
        let mut start: Option<&StayEvent> = None;
        let mut inside = false;
        for e in &self.events {
            match e.kind {
                StayKind::CheckIn if !inside => {
                    start = Some(e);
                    inside = true;
                }
                StayKind::CheckOut => inside = false,
                _ => {}
            }
        }
        start
    }

    /// The latest check-in event up to `until_ms` (all when `None`).
    pub fn last_check_in(&self, until_ms: Option<i64>) -> Option<&StayEvent> {
        self.events.iter().rfind(|e| {
            e.kind == StayKind::CheckIn
                && until_ms.is_none_or(|t| rfc3339_ms(&e.at).is_some_and(|at| at <= t))
        })
    }

    /// The identity keys of this person ([`person_key`] and the card key).
    pub fn keys(&self) -> Vec<String> {
        identity_keys(&self.card_id, &self.name, &self.birth_date)
    }
}

/// What reception enters for a new evacuee record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct NewEvacuee {
    /// 氏名 (required).
    pub name: String,
    /// かな.
    pub kana: String,
    /// 生年月日 `YYYY-MM-DD` (required for manual check-in; normalised).
    pub birth_date: String,
    /// 性別.
    pub sex: String,
    /// 住所.
    pub address: String,
    /// 世帯.
    pub household: String,
    /// 連絡先.
    pub contact: String,
    /// The pseudonymous card id (hex HMAC).
    pub card_id: String,
    /// 要配慮.
    pub flags: BTreeSet<CareFlag>,
    /// アレルギー.
    pub allergies: String,
    /// ペット.
    pub pets: String,
    /// 車両.
    pub vehicle: String,
    /// 安否情報の開示同意.
    pub consent: bool,
    /// Relatives to notify.
    pub relatives: Vec<Relative>,
}

/// 緊急度 of a supply request.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "lowercase")]
pub enum Urgency {
    /// 低.
    Low,
    /// 中.
    #[default]
    Medium,
    /// 高.
    High,
}

impl Urgency {
    /// The lowercase name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::Low => "low",
            Urgency::Medium => "medium",
            Urgency::High => "high",
        }
    }
}

impl FromStr for Urgency {
    type Err = DocumentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "low" | "低" => Ok(Urgency::Low),
            "medium" | "中" => Ok(Urgency::Medium),
            "high" | "高" => Ok(Urgency::High),
            other => Err(DocumentError::UnknownStatus {
                found: other.to_owned(),
                valid: "low (低), medium (中), high (高)".to_owned(),
            }),
        }
    }
}

/// Status of a supply request; only moves forward: open < arranged < delivered < cancelled.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    /// 要請中: asked for.
    #[default]
    Open,
    /// 手配済: HQ arranged it.
    Arranged,
    /// 到着: delivered.
    Delivered,
    /// 取消: no longer needed.
    Cancelled,
}

impl RequestStatus {
    /// Every status, in order.
    pub const ALL: [RequestStatus; 4] = [
        RequestStatus::Open,
        RequestStatus::Arranged,
        RequestStatus::Delivered,
        RequestStatus::Cancelled,
    ];

    /// The lowercase name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Open => "open",
            RequestStatus::Arranged => "arranged",
            RequestStatus::Delivered => "delivered",
            RequestStatus::Cancelled => "cancelled",
        }
    }

    /// Whether HQ still has to act (open or arranged but not delivered).
    pub fn is_open(self) -> bool {
        matches!(self, RequestStatus::Open | RequestStatus::Arranged)
    }
}

impl FromStr for RequestStatus {
    type Err = DocumentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RequestStatus::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| DocumentError::UnknownStatus {
                found: s.to_owned(),
                valid: RequestStatus::ALL.map(RequestStatus::as_str).join(", "),
            })
    }
}

/// A supply request (物資要請).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct SupplyRequest {
    /// Random request id (hex).
    pub id: String,
    /// 品目 (e.g. 毛布).
    pub item: String,
    /// 数量.
    pub quantity: u64,
    /// 単位 (e.g. 枚, 箱); may be empty.
    pub unit: String,
    /// 緊急度.
    pub urgency: Urgency,
    /// Status (forward only).
    pub status: RequestStatus,
    /// When it was asked for (RFC 3339).
    pub requested_at: String,
    /// A note.
    pub note: String,
}

/// A need of the shelter (ニーズ: e.g. 仮設トイレ不足), free text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "specta",
    derive(specta::Type),
    specta(rename = "ShelterNeed")
)]
pub struct Need {
    /// Random need id (hex).
    pub id: String,
    /// What is needed.
    pub text: String,
    /// When it was noted (RFC 3339).
    pub at: String,
    /// Whether it was resolved.
    pub resolved: bool,
}

/// A whole shelter document as plain data (evacuees already merged, see [`dedup`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// The shelter.
    pub shelter: ShelterInfo,
    /// Every evacuee, by id.
    pub evacuees: Vec<Evacuee>,
    /// Needs, oldest first.
    pub needs: Vec<Need>,
    /// Supply requests, oldest first.
    pub requests: Vec<SupplyRequest>,
    /// How many records the document holds before merging duplicates.
    pub records: usize,
}

impl Roster {
    /// How many evacuees count as present now (checked in and not checked out; 外泊 counts).
    pub fn present(&self) -> usize {
        self.evacuees
            .iter()
            .filter(|e| e.presence().counts())
            .count()
    }

    /// The merged evacuee with this id (its own id or the id of a record merged into it).
    pub fn evacuee(&self, id: &str) -> Option<&Evacuee> {
        self.evacuees
            .iter()
            .find(|e| e.id == id || e.merged_ids.iter().any(|m| m == id))
    }

    /// The evacuee that has any of `keys` (see [`identity_keys`]).
    pub fn find(&self, keys: &[String]) -> Option<&Evacuee> {
        if keys.is_empty() {
            return None;
        }
        self.evacuees
            .iter()
            .find(|e| e.keys().iter().any(|k| keys.contains(k)))
    }
}

// ---------------------------------------------------------------------------------------------
// Identity: normalisation and dedup
// ---------------------------------------------------------------------------------------------

/// Normalises a name for matching: NFKC (full-width letters and digits become half-width,
/// half-width katakana become full-width), every kind of space removed, Latin letters lowercased.
pub fn normalise_name(name: &str) -> String {
    name.nfkc()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Normalises a birth date to `YYYY-MM-DD`: accepts full-width digits and `/`, `.` or `-` as
/// separators, with or without leading zeros (`1950/1/2` → `1950-01-02`). Returns the NFKC-trimmed
/// input when it is not a date.
pub fn normalise_date(date: &str) -> String {
    let ascii: String = date.nfkc().filter(|c| !c.is_whitespace()).collect();
    let parts: Vec<&str> = ascii.split(['-', '/', '.']).collect();
    if let [y, m, d] = parts.as_slice()
        && let (Ok(y), Ok(m), Ok(d)) = (y.parse::<u32>(), m.parse::<u32>(), d.parse::<u32>())
        && (1..=12).contains(&m)
        && (1..=31).contains(&d)
    {
        return format!("{y:04}-{m:02}-{d:02}");
    }
    ascii
}

/// The name-and-birth-date key of a person (`None` when either is empty).
pub fn person_key(name: &str, birth_date: &str) -> Option<String> {
    let n = normalise_name(name);
    let b = normalise_date(birth_date);
    (!n.is_empty() && !b.is_empty()).then(|| format!("n:{n}|{b}"))
}

/// Every identity key of a person: `c:<card id>` when there is a card id, and the [`person_key`].
/// Two records that share any key are the same person.
pub fn identity_keys(card_id: &str, name: &str, birth_date: &str) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    let card = card_id.trim().to_ascii_lowercase();
    if !card.is_empty() {
        keys.push(format!("c:{card}"));
    }
    if let Some(k) = person_key(name, birth_date) {
        keys.push(k);
    }
    keys
}

/// Merges records of the same person (sharing an identity key) into one evacuee each, by the rules
/// of the module docs. The result is sorted by id and does not depend on the input order.
pub fn dedup(mut records: Vec<Evacuee>) -> Vec<Evacuee> {
    records.sort_by(|a, b| a.id.cmp(&b.id));
    let n = records.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_with: HashMap<String, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        for key in r.keys() {
            match first_with.get(&key) {
                Some(&j) => {
                    let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                    // The smaller index (smaller id) is the survivor.
                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                    parent[hi] = lo;
                }
                None => {
                    first_with.insert(key, i);
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().push(i);
    }
    let mut slots: Vec<Option<Evacuee>> = records.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(groups.len());
    for (root, members) in groups {
        let mut merged = slots[root].take().expect("each record is in one group");
        for &i in members.iter().filter(|&&i| i != root) {
            let other = slots[i].take().expect("each record is in one group");
            for key in EVACUEE_TEXT_FIELDS {
                if let Some(slot) = merged.text_mut(key)
                    && slot.is_empty()
                {
                    *slot = other.text(key).to_owned();
                }
            }
            merged.flags.extend(other.flags.iter().copied());
            for r in &other.relatives {
                if !merged
                    .relatives
                    .iter()
                    .any(|m| m.email.eq_ignore_ascii_case(&r.email))
                {
                    merged.relatives.push(r.clone());
                }
            }
            merged.consent &= other.consent;
            for e in other.events {
                if !merged.events.iter().any(|m| m.id == e.id) {
                    merged.events.push(e);
                }
            }
            merged.merged_ids.push(other.id);
            merged.merged_ids.extend(other.merged_ids);
        }
        merged
            .events
            .sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        merged.relatives.sort();
        out.push(merged);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Writes a fresh shelter document: kind, schema version, the shelter, an `open` status event
/// (`status_event` id, at `opened_at`) and empty evacuees, needs and requests.
///
/// # Errors
///
/// [`DocumentError::AlreadyInitialized`] on an initialised document; [`DocumentError::InvalidValue`]
/// when the name is empty; [`DocumentError::TooLarge`] when a field is too long.
pub fn init(
    doc: &mut AutoCommit,
    shelter: &ShelterInfo,
    status_event: &str,
    opened_at: &str,
) -> Result<(), DocumentError> {
    if let Some(found) = read_u64(doc, &automerge::ROOT, KEY_SCHEMA_VERSION)? {
        return Err(DocumentError::AlreadyInitialized { found });
    }
    if shelter.name.trim().is_empty() {
        return Err(invalid("shelter.name", "must not be empty"));
    }
    for (key, value) in [
        ("shelter.code", &shelter.code),
        ("shelter.name", &shelter.name),
        ("shelter.address", &shelter.address),
        ("shelter.medical_doc", &shelter.medical_doc),
    ] {
        check_len(key, value)?;
    }
    check_time("status.at", opened_at)?;
    doc.put(automerge::ROOT, KEY_KIND, KIND)?;
    doc.put(automerge::ROOT, KEY_SCHEMA_VERSION, SCHEMA_VERSION)?;
    let s = doc.put_object(automerge::ROOT, KEY_SHELTER, ObjType::Map)?;
    doc.put(&s, "code", shelter.code.as_str())?;
    doc.put(&s, "name", shelter.name.as_str())?;
    doc.put(&s, "address", shelter.address.as_str())?;
    doc.put(&s, "capacity", shelter.capacity)?;
    doc.put(&s, "medical_doc", shelter.medical_doc.as_str())?;
    doc.put_object(automerge::ROOT, KEY_STATUS, ObjType::Map)?;
    doc.put_object(automerge::ROOT, KEY_EVACUEES, ObjType::Map)?;
    doc.put_object(automerge::ROOT, KEY_NEEDS, ObjType::Map)?;
    doc.put_object(automerge::ROOT, KEY_REQUESTS, ObjType::Map)?;
    set_status(doc, status_event, ShelterStatus::Open, opened_at)
}

/// Records that the shelter opened or closed at `at` (an event with the random id `event`).
///
/// # Errors
///
/// Header errors of [`read`]; [`DocumentError::InvalidValue`] for a malformed time or id.
pub fn set_status(
    doc: &mut AutoCommit,
    event: &str,
    status: ShelterStatus,
    at: &str,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    check_id("status id", event)?;
    check_time("status.at", at)?;
    let map = child_map(doc, &automerge::ROOT, KEY_STATUS)?;
    let e = doc.put_object(&map, event, ObjType::Map)?;
    doc.put(&e, "status", status.as_str())?;
    doc.put(&e, "at", at)?;
    Ok(())
}

/// Sets 収容人数.
///
/// # Errors
///
/// Header errors of [`read`].
pub fn set_capacity(doc: &mut AutoCommit, capacity: u64) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let s = child_map(doc, &automerge::ROOT, KEY_SHELTER)?;
    doc.put(&s, "capacity", capacity)?;
    Ok(())
}

/// Records the id of the shelter's medical-notes document.
///
/// # Errors
///
/// Header errors of [`read`].
pub fn set_medical_doc(doc: &mut AutoCommit, medical_doc: &str) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    check_len("shelter.medical_doc", medical_doc)?;
    let s = child_map(doc, &automerge::ROOT, KEY_SHELTER)?;
    doc.put(&s, "medical_doc", medical_doc)?;
    Ok(())
}

/// Adds a new evacuee record with the random id `id`, made at `registered_at`.
///
/// Does not look for an existing record of the same person: callers do that on the merged view
/// ([`Roster::find`]) first; duplicates that arise anyway (two offline desks) merge on read.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an empty name, a malformed id or time or e-mail;
/// [`DocumentError::TooLarge`] when a field, the relatives or the roster exceed their limits.
pub fn add_evacuee(
    doc: &mut AutoCommit,
    id: &str,
    person: &NewEvacuee,
    registered_at: &str,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    check_id("evacuee id", id)?;
    check_time("registered_at", registered_at)?;
    if person.name.trim().is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    let evacuees = child_map(doc, &automerge::ROOT, KEY_EVACUEES)?;
    let count = doc.length(&evacuees);
    if count >= EVACUEES_COUNT_MAX {
        return Err(too_large("evacuees (count)", count + 1, EVACUEES_COUNT_MAX));
    }
    let birth = normalise_date(&person.birth_date);
    let card = person.card_id.trim().to_ascii_lowercase();
    let fields: [(&str, &str); 12] = [
        ("name", person.name.trim()),
        ("kana", person.kana.trim()),
        ("birth_date", &birth),
        ("sex", person.sex.trim()),
        ("address", person.address.trim()),
        ("household", person.household.trim()),
        ("contact", person.contact.trim()),
        ("card_id", &card),
        ("allergies", person.allergies.trim()),
        ("pets", person.pets.trim()),
        ("vehicle", person.vehicle.trim()),
        ("registered_at", registered_at),
    ];
    for (key, value) in fields {
        check_len(key, value)?;
    }
    if !card.is_empty() && !card.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "card_id",
            "must be the pseudonymous card id (hex HMAC), never a card number",
        ));
    }
    let e = doc.put_object(&evacuees, id, ObjType::Map)?;
    for (key, value) in fields {
        if !value.is_empty() {
            doc.put(&e, key, value)?;
        }
    }
    doc.put(&e, "consent", person.consent)?;
    let flags = doc.put_object(&e, "flags", ObjType::Map)?;
    for f in &person.flags {
        doc.put(&flags, f.as_str(), true)?;
    }
    doc.put_object(&e, "relatives", ObjType::Map)?;
    doc.put_object(&e, "events", ObjType::Map)?;
    for r in &person.relatives {
        add_relative(doc, id, r)?;
    }
    Ok(())
}

/// Adds a relative to notify (a no-op when one with the same e-mail is already there).
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown evacuee or a malformed e-mail;
/// [`DocumentError::TooLarge`] past [`RELATIVES_COUNT_MAX`].
pub fn add_relative(
    doc: &mut AutoCommit,
    evacuee: &str,
    relative: &Relative,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let email = relative.email.trim().to_ascii_lowercase();
    let valid = email
        .split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
        && !email.contains(char::is_whitespace)
        && !email.contains(['<', '>', ',', ';']);
    if !valid {
        return Err(invalid(
            "relatives.email",
            &format!("`{}` is not an e-mail address", relative.email),
        ));
    }
    check_len("relatives.name", &relative.name)?;
    check_len("relatives.email", &email)?;
    let e = evacuee_obj(doc, evacuee)?;
    let rels = child_map(doc, &e, "relatives")?;
    if doc.get(&rels, email.as_str())?.is_some() {
        return Ok(());
    }
    let count = doc.length(&rels);
    if count >= RELATIVES_COUNT_MAX {
        return Err(too_large(
            "relatives (count)",
            count + 1,
            RELATIVES_COUNT_MAX,
        ));
    }
    let r = doc.put_object(&rels, email.as_str(), ObjType::Map)?;
    doc.put(&r, "name", relative.name.trim())?;
    doc.put(&r, "email", email.as_str())?;
    Ok(())
}

/// Adds care flags (要配慮) to an evacuee record.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown evacuee.
pub fn add_flags(
    doc: &mut AutoCommit,
    evacuee: &str,
    flags: &BTreeSet<CareFlag>,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let e = evacuee_obj(doc, evacuee)?;
    let map = child_map(doc, &e, "flags")?;
    for f in flags {
        doc.put(&map, f.as_str(), true)?;
    }
    Ok(())
}

/// Removes care flags (要配慮) from an evacuee record (a flag not set is skipped). Flags another desk
/// adds concurrently still arrive; setting a flag that was already set changes nothing, so it does
/// not undo a removal.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown evacuee.
pub fn remove_flags(
    doc: &mut AutoCommit,
    evacuee: &str,
    flags: &BTreeSet<CareFlag>,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let e = evacuee_obj(doc, evacuee)?;
    let map = child_map(doc, &e, "flags")?;
    for f in flags {
        if doc.get(&map, f.as_str())?.is_some() {
            doc.delete(&map, f.as_str())?;
        }
    }
    Ok(())
}

/// Sets a text field of an evacuee record (`name`, `kana`, `address`, `allergies`, ...) or, with
/// the key `consent`, the consent (`true`/`false`).
///
/// # Errors
///
/// [`DocumentError::UnknownField`], [`DocumentError::InvalidValue`] for an unknown evacuee or a bad
/// consent value, [`DocumentError::TooLarge`].
pub fn set_evacuee_field(
    doc: &mut AutoCommit,
    evacuee: &str,
    key: &str,
    value: &str,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let e = evacuee_obj(doc, evacuee)?;
    if key == "consent" {
        let v = match value.trim() {
            "true" | "yes" | "同意" => true,
            "false" | "no" | "不同意" => false,
            other => return Err(invalid("consent", &format!("`{other}` is not true/false"))),
        };
        doc.put(&e, "consent", v)?;
        return Ok(());
    }
    if !EVACUEE_TEXT_FIELDS.contains(&key) || key == "registered_at" {
        return Err(DocumentError::UnknownField {
            key: key.to_owned(),
            valid: EVACUEE_TEXT_FIELDS[..11].join(", ") + ", consent",
        });
    }
    let value = match key {
        "birth_date" => normalise_date(value),
        "card_id" => value.trim().to_ascii_lowercase(),
        _ => value.trim().to_owned(),
    };
    check_len(key, &value)?;
    doc.put(&e, key, value.as_str())?;
    Ok(())
}

/// Appends a stay event to an evacuee record.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown evacuee or a malformed id or time;
/// [`DocumentError::TooLarge`] past [`EVENTS_PER_EVACUEE_MAX`].
pub fn add_event(
    doc: &mut AutoCommit,
    evacuee: &str,
    event: &StayEvent,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    check_id("event id", &event.id)?;
    check_time("events.at", &event.at)?;
    check_len("events.note", &event.note)?;
    check_len("events.device", &event.device)?;
    check_len("events.staff", &event.staff)?;
    let e = evacuee_obj(doc, evacuee)?;
    let events = child_map(doc, &e, "events")?;
    let count = doc.length(&events);
    if count >= EVENTS_PER_EVACUEE_MAX {
        return Err(too_large(
            "events of one evacuee (count)",
            count + 1,
            EVENTS_PER_EVACUEE_MAX,
        ));
    }
    let m = doc.put_object(&events, event.id.as_str(), ObjType::Map)?;
    doc.put(&m, "kind", event.kind.as_str())?;
    doc.put(&m, "at", event.at.as_str())?;
    doc.put(&m, "method", event.method.as_str())?;
    if !event.device.is_empty() {
        doc.put(&m, "device", event.device.as_str())?;
    }
    if !event.staff.is_empty() {
        doc.put(&m, "staff", event.staff.as_str())?;
    }
    if !event.note.is_empty() {
        doc.put(&m, "note", event.note.as_str())?;
    }
    Ok(())
}

/// Adds a supply request.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an empty item or a malformed id/time;
/// [`DocumentError::TooLarge`] past [`REQUESTS_COUNT_MAX`] or for long fields.
pub fn add_request(doc: &mut AutoCommit, request: &SupplyRequest) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    check_id("request id", &request.id)?;
    check_time("requested_at", &request.requested_at)?;
    if request.item.trim().is_empty() {
        return Err(invalid("item", "must not be empty"));
    }
    for (k, v) in [
        ("item", &request.item),
        ("unit", &request.unit),
        ("note", &request.note),
    ] {
        check_len(k, v)?;
    }
    let map = child_map(doc, &automerge::ROOT, KEY_REQUESTS)?;
    check_requests_room(doc, &map)?;
    let r = doc.put_object(&map, request.id.as_str(), ObjType::Map)?;
    doc.put(&r, "item", request.item.trim())?;
    doc.put(&r, "quantity", request.quantity)?;
    doc.put(&r, "unit", request.unit.trim())?;
    doc.put(&r, "urgency", request.urgency.as_str())?;
    doc.put(&r, "status", request.status.as_str())?;
    doc.put(&r, "requested_at", request.requested_at.as_str())?;
    doc.put(&r, "note", request.note.trim())?;
    Ok(())
}

/// Moves a supply request's status forward (an earlier status is a no-op, as in the referral letter).
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown request.
pub fn set_request_status(
    doc: &mut AutoCommit,
    id: &str,
    status: RequestStatus,
) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let map = child_map(doc, &automerge::ROOT, KEY_REQUESTS)?;
    let r = match doc.get(&map, id)? {
        Some((automerge::Value::Object(ObjType::Map), r)) => r,
        _ => return Err(invalid("request", &format!("no supply request `{id}`"))),
    };
    let current = read_request_status(doc, &r)?;
    if status > current {
        doc.put(&r, "status", status.as_str())?;
    }
    Ok(())
}

/// Adds a need (ニーズ) of the shelter.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for empty text or a malformed id/time; [`DocumentError::TooLarge`].
pub fn add_need(doc: &mut AutoCommit, need: &Need) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    check_id("need id", &need.id)?;
    check_time("needs.at", &need.at)?;
    if need.text.trim().is_empty() {
        return Err(invalid("needs.text", "must not be empty"));
    }
    check_len("needs.text", &need.text)?;
    let map = child_map(doc, &automerge::ROOT, KEY_NEEDS)?;
    check_requests_room(doc, &map)?;
    let n = doc.put_object(&map, need.id.as_str(), ObjType::Map)?;
    doc.put(&n, "text", need.text.trim())?;
    doc.put(&n, "at", need.at.as_str())?;
    doc.put(&n, "resolved", need.resolved)?;
    Ok(())
}

/// Marks a need resolved.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown need.
pub fn resolve_need(doc: &mut AutoCommit, id: &str) -> Result<(), DocumentError> {
    check_header(doc, KIND)?;
    let map = child_map(doc, &automerge::ROOT, KEY_NEEDS)?;
    match doc.get(&map, id)? {
        Some((automerge::Value::Object(ObjType::Map), n)) => {
            doc.put(&n, "resolved", true)?;
            Ok(())
        }
        _ => Err(invalid("need", &format!("no need `{id}`"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads the whole roster from any replica, merging duplicate records ([`dedup`]).
///
/// # Errors
///
/// [`DocumentError::WrongKind`] / [`DocumentError::UnsupportedSchema`] for another document;
/// [`DocumentError::MissingField`] / [`DocumentError::WrongType`] for malformed content.
pub fn read(doc: &impl ReadDoc) -> Result<Roster, DocumentError> {
    let shelter = read_shelter(doc)?;
    let records = read_records(doc)?;
    let count = records.len();
    let needs = read_needs(doc)?;
    let requests = read_requests(doc)?;
    Ok(Roster {
        shelter,
        evacuees: dedup(records),
        needs,
        requests,
        records: count,
    })
}

/// Reads the shelter's own fields and status only (cheap: no evacuees).
///
/// # Errors
///
/// As [`read`].
pub fn read_shelter(doc: &impl ReadDoc) -> Result<ShelterInfo, DocumentError> {
    check_header(doc, KIND)?;
    let s = child_map(doc, &automerge::ROOT, KEY_SHELTER)?;
    let mut info = ShelterInfo::default();
    for item in doc.map_range(&s, ..) {
        match (item.key.as_ref(), &item.value) {
            ("code", v) => info.code = str_of(v),
            ("name", v) => info.name = str_of(v),
            ("address", v) => info.address = str_of(v),
            ("medical_doc", v) => info.medical_doc = str_of(v),
            ("capacity", v) => info.capacity = u64_of(v).unwrap_or(0),
            _ => {}
        }
    }
    let status = child_map(doc, &automerge::ROOT, KEY_STATUS)?;
    let mut latest: Option<(i64, String, ShelterStatus, String)> = None;
    for item in doc.map_range(&status, ..) {
        let obj = item.id();
        let mut st = None;
        let mut at = String::new();
        for f in doc.map_range(&obj, ..) {
            match f.key.as_ref() {
                "status" => {
                    st = match str_of(&f.value).as_str() {
                        "open" => Some(ShelterStatus::Open),
                        "closed" => Some(ShelterStatus::Closed),
                        _ => None,
                    }
                }
                "at" => at = str_of(&f.value),
                _ => {}
            }
        }
        let Some(st) = st else { continue };
        let key = (
            rfc3339_ms(&at).unwrap_or(i64::MIN),
            item.key.to_string(),
            st,
            at,
        );
        if latest
            .as_ref()
            .is_none_or(|l| (key.0, &key.1) > (l.0, &l.1))
        {
            latest = Some(key);
        }
    }
    if let Some((_, _, st, at)) = latest {
        info.status = st;
        info.status_at = at;
    }
    Ok(info)
}

/// Reads every evacuee record as stored, without merging duplicates (see [`dedup`]).
///
/// # Errors
///
/// As [`read`].
pub fn read_records(doc: &impl ReadDoc) -> Result<Vec<Evacuee>, DocumentError> {
    check_header(doc, KIND)?;
    let evacuees = child_map(doc, &automerge::ROOT, KEY_EVACUEES)?;
    let mut out = Vec::with_capacity(doc.length(&evacuees));
    for item in doc.map_range(&evacuees, ..) {
        if !matches!(item.value, ValueRef::Object(ObjType::Map)) {
            return Err(wrong_type("evacuees[]", "a map"));
        }
        let obj = item.id();
        let mut e = Evacuee {
            id: item.key.to_string(),
            ..Evacuee::default()
        };
        for f in doc.map_range(&obj, ..) {
            let key = f.key.as_ref();
            match &f.value {
                ValueRef::Scalar(ScalarValueRef::Boolean(b)) if key == "consent" => {
                    e.consent = *b;
                }
                ValueRef::Scalar(_) => {
                    if let Some(slot) = e.text_mut(key) {
                        *slot = str_of(&f.value);
                    }
                }
                ValueRef::Object(ObjType::Map) => {
                    let child = f.id();
                    match key {
                        "flags" => {
                            for flag in doc.map_range(&child, ..) {
                                if let Ok(flag) = flag.key.parse::<CareFlag>() {
                                    e.flags.insert(flag);
                                }
                            }
                        }
                        "relatives" => {
                            for r in doc.map_range(&child, ..) {
                                let robj = r.id();
                                let mut rel = Relative {
                                    name: String::new(),
                                    email: r.key.to_string(),
                                };
                                if let Some((v, _)) = doc.get(&robj, "name")? {
                                    rel.name = v.as_str().unwrap_or_default().to_owned();
                                }
                                e.relatives.push(rel);
                            }
                        }
                        "events" => {
                            for ev in doc.map_range(&child, ..) {
                                if let Some(event) = read_event(doc, ev.key.as_ref(), &ev.id()) {
                                    e.events.push(event);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                ValueRef::Object(_) => {}
            }
        }
        e.events.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        out.push(e);
    }
    Ok(out)
}

fn read_event(doc: &impl ReadDoc, id: &str, obj: &ObjId) -> Option<StayEvent> {
    let mut kind = None;
    let mut event = StayEvent {
        id: id.to_owned(),
        kind: StayKind::CheckIn,
        at: String::new(),
        method: Method::Manual,
        device: String::new(),
        staff: String::new(),
        note: String::new(),
    };
    for f in doc.map_range(obj, ..) {
        let v = str_of(&f.value);
        match f.key.as_ref() {
            "kind" => kind = StayKind::parse(&v),
            "at" => event.at = v,
            "method" => event.method = v.parse().unwrap_or_default(),
            "device" => event.device = v,
            "staff" => event.staff = v,
            "note" => event.note = v,
            _ => {}
        }
    }
    // An event of a kind this build does not know (a newer schema) is skipped, not fatal.
    event.kind = kind?;
    Some(event)
}

fn read_needs(doc: &impl ReadDoc) -> Result<Vec<Need>, DocumentError> {
    let map = child_map(doc, &automerge::ROOT, KEY_NEEDS)?;
    let mut out = Vec::new();
    for item in doc.map_range(&map, ..) {
        let obj = item.id();
        let mut n = Need {
            id: item.key.to_string(),
            ..Need::default()
        };
        for f in doc.map_range(&obj, ..) {
            match (f.key.as_ref(), &f.value) {
                ("text", v) => n.text = str_of(v),
                ("at", v) => n.at = str_of(v),
                ("resolved", ValueRef::Scalar(ScalarValueRef::Boolean(b))) => n.resolved = *b,
                _ => {}
            }
        }
        out.push(n);
    }
    out.sort_by(|a, b| time_cmp(&a.at, &b.at).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

fn read_request_status(doc: &impl ReadDoc, r: &ObjId) -> Result<RequestStatus, DocumentError> {
    let mut latest = RequestStatus::Open;
    for (value, _) in doc.get_all(r, "status")? {
        if let Some(s) = value.as_str()
            && let Ok(s) = s.parse::<RequestStatus>()
        {
            latest = latest.max(s);
        }
    }
    Ok(latest)
}

fn read_requests(doc: &impl ReadDoc) -> Result<Vec<SupplyRequest>, DocumentError> {
    let map = child_map(doc, &automerge::ROOT, KEY_REQUESTS)?;
    let mut out = Vec::new();
    for item in doc.map_range(&map, ..) {
        let obj = item.id();
        let mut r = SupplyRequest {
            id: item.key.to_string(),
            ..SupplyRequest::default()
        };
        for f in doc.map_range(&obj, ..) {
            match (f.key.as_ref(), &f.value) {
                ("item", v) => r.item = str_of(v),
                ("quantity", v) => r.quantity = u64_of(v).unwrap_or(0),
                ("unit", v) => r.unit = str_of(v),
                ("urgency", v) => r.urgency = str_of(v).parse().unwrap_or_default(),
                ("requested_at", v) => r.requested_at = str_of(v),
                ("note", v) => r.note = str_of(v),
                _ => {}
            }
        }
        r.status = read_request_status(doc, &obj)?;
        out.push(r);
    }
    out.sort_by(|a, b| time_cmp(&a.requested_at, &b.requested_at).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Medical notes (a separate document with fewer members)
// ---------------------------------------------------------------------------------------------

/// Medical notes about one evacuee (持病, 服薬, 要介護).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct MedicalNote {
    /// The evacuee id in the shelter document.
    pub evacuee: String,
    /// 持病 (chronic conditions).
    pub conditions: String,
    /// 服薬 (medication).
    pub medications: String,
    /// 要介護 (care level, e.g. 要介護2).
    pub care_level: String,
    /// Other notes of the health staff.
    pub notes: String,
    /// When last updated (RFC 3339).
    pub updated_at: String,
}

/// The medical-notes document of a shelter as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct MedicalNotes {
    /// The shelter document these notes belong to.
    pub shelter_doc: String,
    /// Notes by evacuee id.
    pub notes: Vec<MedicalNote>,
}

/// Writes a fresh medical-notes document for the shelter document `shelter_doc`.
///
/// # Errors
///
/// [`DocumentError::AlreadyInitialized`] on an initialised document.
pub fn init_medical(doc: &mut AutoCommit, shelter_doc: &str) -> Result<(), DocumentError> {
    if let Some(found) = read_u64(doc, &automerge::ROOT, KEY_SCHEMA_VERSION)? {
        return Err(DocumentError::AlreadyInitialized { found });
    }
    check_len("shelter", shelter_doc)?;
    doc.put(automerge::ROOT, KEY_KIND, MEDICAL_KIND)?;
    doc.put(automerge::ROOT, KEY_SCHEMA_VERSION, SCHEMA_VERSION)?;
    doc.put(automerge::ROOT, KEY_SHELTER, shelter_doc)?;
    doc.put_object(automerge::ROOT, KEY_NOTES, ObjType::Map)?;
    Ok(())
}

/// Writes (replaces the non-empty fields of) the medical note of one evacuee.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for a malformed id or time; [`DocumentError::TooLarge`].
pub fn set_medical_note(doc: &mut AutoCommit, note: &MedicalNote) -> Result<(), DocumentError> {
    check_header(doc, MEDICAL_KIND)?;
    check_id("evacuee id", &note.evacuee)?;
    check_time("updated_at", &note.updated_at)?;
    let notes = child_map(doc, &automerge::ROOT, KEY_NOTES)?;
    if doc.get(&notes, note.evacuee.as_str())?.is_none() && doc.length(&notes) >= EVACUEES_COUNT_MAX
    {
        return Err(too_large(
            "medical notes (count)",
            doc.length(&notes) + 1,
            EVACUEES_COUNT_MAX,
        ));
    }
    let n = match doc.get(&notes, note.evacuee.as_str())? {
        Some((automerge::Value::Object(ObjType::Map), n)) => n,
        _ => doc.put_object(&notes, note.evacuee.as_str(), ObjType::Map)?,
    };
    for (key, value) in [
        ("conditions", &note.conditions),
        ("medications", &note.medications),
        ("care_level", &note.care_level),
        ("notes", &note.notes),
    ] {
        check_len(key, value)?;
        if !value.trim().is_empty() {
            doc.put(&n, key, value.trim())?;
        }
    }
    doc.put(&n, "updated_at", note.updated_at.as_str())?;
    Ok(())
}

/// Reads a medical-notes document.
///
/// # Errors
///
/// [`DocumentError::WrongKind`] and the other header errors.
pub fn read_medical(doc: &impl ReadDoc) -> Result<MedicalNotes, DocumentError> {
    check_header(doc, MEDICAL_KIND)?;
    let shelter_doc = match doc.get(automerge::ROOT, KEY_SHELTER)? {
        Some((v, _)) => v.as_str().unwrap_or_default().to_owned(),
        None => String::new(),
    };
    let notes = child_map(doc, &automerge::ROOT, KEY_NOTES)?;
    let mut out = Vec::new();
    for item in doc.map_range(&notes, ..) {
        let obj = item.id();
        let mut n = MedicalNote {
            evacuee: item.key.to_string(),
            ..MedicalNote::default()
        };
        for f in doc.map_range(&obj, ..) {
            let v = str_of(&f.value);
            match f.key.as_ref() {
                "conditions" => n.conditions = v,
                "medications" => n.medications = v,
                "care_level" => n.care_level = v,
                "notes" => n.notes = v,
                "updated_at" => n.updated_at = v,
                _ => {}
            }
        }
        out.push(n);
    }
    Ok(MedicalNotes {
        shelter_doc,
        notes: out,
    })
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// Parses an RFC 3339 timestamp (`2024-01-09T18:00:00+09:00`, `...Z`, optional fraction) into Unix
/// milliseconds. `None` when malformed.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        b'+' | b'-' if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let sign = if b[i] == b'+' { 1 } else { -1 };
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi - offset_min) * 60_000 + sec * 1000 + ms)
}

fn time_cmp(a: &str, b: &str) -> Ordering {
    rfc3339_ms(a)
        .unwrap_or(i64::MIN)
        .cmp(&rfc3339_ms(b).unwrap_or(i64::MIN))
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn check_header(doc: &impl ReadDoc, expected: &'static str) -> Result<(), DocumentError> {
    common::check_header(doc, expected, SCHEMA_VERSION)
}

fn child_map(doc: &impl ReadDoc, parent: &ObjId, key: &str) -> Result<ObjId, DocumentError> {
    match doc.get(parent, key)? {
        Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
        Some(_) => Err(wrong_type(key, "a map")),
        None => Err(DocumentError::MissingField {
            key: key.to_owned(),
        }),
    }
}

fn evacuee_obj(doc: &impl ReadDoc, id: &str) -> Result<ObjId, DocumentError> {
    let evacuees = child_map(doc, &automerge::ROOT, KEY_EVACUEES)?;
    match doc.get(&evacuees, id)? {
        Some((automerge::Value::Object(ObjType::Map), e)) => Ok(e),
        _ => Err(invalid("evacuee", &format!("no evacuee record `{id}`"))),
    }
}

fn check_requests_room(doc: &impl ReadDoc, map: &ObjId) -> Result<(), DocumentError> {
    let count = doc.length(map);
    if count >= REQUESTS_COUNT_MAX {
        return Err(too_large(
            "needs or supply requests (count)",
            count + 1,
            REQUESTS_COUNT_MAX,
        ));
    }
    Ok(())
}

fn str_of(v: &ValueRef<'_>) -> String {
    match v {
        ValueRef::Scalar(ScalarValueRef::Str(s)) => s.to_string(),
        _ => String::new(),
    }
}

fn u64_of(v: &ValueRef<'_>) -> Option<u64> {
    match v {
        ValueRef::Scalar(ScalarValueRef::Uint(n)) => Some(*n),
        ValueRef::Scalar(ScalarValueRef::Int(n)) if *n >= 0 => Some(n.unsigned_abs()),
        _ => None,
    }
}

fn check_id(what: &str, id: &str) -> Result<(), DocumentError> {
    if id.len() < 8 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid(
            what,
            &format!("`{id}` is not an id (8 to 64 ASCII letters, digits or dashes)"),
        ));
    }
    Ok(())
}

fn check_time(what: &str, at: &str) -> Result<(), DocumentError> {
    if rfc3339_ms(at).is_none() {
        return Err(invalid(
            what,
            &format!("`{at}` is not an RFC 3339 time (e.g. 2024-01-09T18:00:00+09:00)"),
        ));
    }
    Ok(())
}

fn check_len(what: &str, value: &str) -> Result<(), DocumentError> {
    if value.len() > FIELD_BYTES_MAX {
        return Err(too_large(
            &format!("field {what} (bytes)"),
            value.len(),
            FIELD_BYTES_MAX,
        ));
    }
    Ok(())
}

fn invalid(key: &str, reason: &str) -> DocumentError {
    DocumentError::InvalidValue {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

impl fmt::Display for ShelterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use automerge::ActorId;

    use super::*;

    const T0: &str = "2024-01-09T18:00:00+09:00";

    fn actor(name: &str) -> ActorId {
        ActorId::from(name.as_bytes())
    }

    fn shelter() -> AutoCommit {
        let mut doc = AutoCommit::new().with_actor(actor("centre"));
        let info = ShelterInfo {
            code: "CC0000000504".into(),
            name: "御祓地区コミュニティセンター".into(),
            address: "石川県七尾市一本杉町124".into(),
            capacity: 191,
            ..ShelterInfo::default()
        };
        init(&mut doc, &info, "status-0001", T0).expect("init");
        doc
    }

    fn person(name: &str, birth: &str) -> NewEvacuee {
        NewEvacuee {
            name: name.into(),
            birth_date: birth.into(),
            ..NewEvacuee::default()
        }
    }

    fn event(id: &str, kind: StayKind, at: &str) -> StayEvent {
        StayEvent {
            id: id.into(),
            kind,
            at: at.into(),
            method: Method::Manual,
            device: String::new(),
            staff: String::new(),
            note: String::new(),
        }
    }

    #[test]
    fn times_parse_to_unix_milliseconds() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("1970-01-01T09:00:00+09:00"), Some(0));
        assert_eq!(
            rfc3339_ms("2024-01-09T09:00:00.250Z"),
            Some(1_704_790_800_250)
        );
        assert_eq!(
            rfc3339_ms(T0),
            rfc3339_ms("2024-01-09T09:00:00Z"),
            "offsets are honoured"
        );
        for bad in [
            "",
            "2024-01-09",
            "2024-13-01T00:00:00Z",
            "2024-01-09T18:00:00",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_and_dates_normalise_across_widths_and_spaces() {
        assert_eq!(normalise_name("山田　太郎"), normalise_name("山田 太郎"));
        assert_eq!(normalise_name("ﾔﾏﾀﾞ ﾀﾛｳ"), normalise_name("ヤマダタロウ"));
        assert_eq!(normalise_name("ＪＯＨＮ　Ｓｍｉｔｈ"), "johnsmith");
        assert_eq!(normalise_date("１９５０／１／２"), "1950-01-02");
        assert_eq!(normalise_date("1950-01-02"), "1950-01-02");
        assert_eq!(
            person_key("山田　太郎", "1950/1/2"),
            person_key("山田太郎", "1950-01-02")
        );
    }

    #[test]
    fn a_checked_in_evacuee_reads_back_with_presence() {
        let mut doc = shelter();
        let mut p = person("山田 太郎", "1950-01-02");
        p.flags.insert(CareFlag::Elderly);
        p.consent = true;
        p.relatives.push(Relative {
            name: "山田 花子".into(),
            email: "Hanako@Example.JP".into(),
        });
        add_evacuee(&mut doc, "e0000001", &p, T0).expect("add");
        add_event(
            &mut doc,
            "e0000001",
            &event("v0000001", StayKind::CheckIn, T0),
        )
        .expect("in");
        let roster = read(&doc).expect("read");
        assert_eq!(roster.shelter.name, "御祓地区コミュニティセンター");
        assert_eq!(roster.shelter.capacity, 191);
        assert_eq!(roster.shelter.status, ShelterStatus::Open);
        assert_eq!(roster.evacuees.len(), 1);
        let e = &roster.evacuees[0];
        assert_eq!(e.relatives[0].email, "hanako@example.jp");
        assert!(e.flags.contains(&CareFlag::Elderly) && e.consent);
        assert_eq!(roster.present(), 1);

        add_event(
            &mut doc,
            "e0000001",
            &event("v0000002", StayKind::Leave, "2024-01-10T10:00:00+09:00"),
        )
        .expect("leave");
        assert_eq!(
            read(&doc).expect("read").present(),
            1,
            "外泊 counts as present"
        );
        add_event(
            &mut doc,
            "e0000001",
            &event("v0000003", StayKind::CheckOut, "2024-01-11T10:00:00+09:00"),
        )
        .expect("out");
        let roster = read(&doc).expect("read");
        assert_eq!(roster.present(), 0);
        let e = &roster.evacuees[0];
        assert_eq!(
            e.presence_at(rfc3339_ms("2024-01-10T12:00:00+09:00")),
            Presence::OnLeave
        );
        assert_eq!(
            e.presence_at(rfc3339_ms("2024-01-09T08:00:00Z")),
            Presence::Out
        );
        assert_eq!(e.current_stay().map(|s| s.id.as_str()), Some("v0000001"));
    }

    #[test]
    fn a_removed_care_flag_stays_removed_while_flags_added_elsewhere_arrive() {
        let mut doc = shelter();
        let mut p = person("山田太郎", "1950-01-02");
        p.flags = [CareFlag::Elderly, CareFlag::Disability].into();
        add_evacuee(&mut doc, "evacuee-0001", &p, T0).expect("add");
        let mut other = doc.fork().with_actor(actor("desk-2"));
        remove_flags(&mut doc, "evacuee-0001", &[CareFlag::Disability].into()).expect("remove");
        remove_flags(&mut doc, "evacuee-0001", &[CareFlag::Infant].into())
            .expect("removing a flag that is not set is a no-op");
        let flags = |d: &AutoCommit| read(d).expect("read").evacuees[0].flags.clone();
        assert_eq!(flags(&doc), [CareFlag::Elderly].into());
        // Meanwhile another desk flags 乳幼児, and sets 障害者 again (it already held it: no change).
        add_flags(
            &mut other,
            "evacuee-0001",
            &[CareFlag::Infant, CareFlag::Disability].into(),
        )
        .expect("add");
        doc.merge(&mut other).expect("merge");
        assert_eq!(
            flags(&doc),
            [CareFlag::Elderly, CareFlag::Infant].into(),
            "the new flag arrives; the removal stands"
        );
        assert!(remove_flags(&mut doc, "nobody-00000", &BTreeSet::new()).is_err());
    }

    #[test]
    fn a_stay_event_names_the_staff_member_who_wrote_it() {
        let mut doc = shelter();
        add_evacuee(
            &mut doc,
            "evacuee-0001",
            &person("山田太郎", "1950-01-02"),
            T0,
        )
        .expect("add");
        let mut e = event("event-000001", StayKind::CheckIn, T0);
        e.staff = "受付 花子".into();
        add_event(&mut doc, "evacuee-0001", &e).expect("event");
        add_event(
            &mut doc,
            "evacuee-0001",
            &event("event-000002", StayKind::Leave, T0),
        )
        .expect("an event without a staff member");
        let events = read(&doc).expect("read").evacuees[0].events.clone();
        assert_eq!(events[0].staff, "受付 花子");
        assert_eq!(events[1].staff, "", "absent reads as empty");
    }

    #[test]
    fn two_desks_registering_the_same_person_offline_read_as_one() {
        let mut base = shelter();
        let mut a = base.fork().with_actor(actor("desk-a"));
        let mut b = base.fork().with_actor(actor("desk-b"));
        let mut pa = person("佐藤　一郎", "1940/3/4");
        pa.allergies = "卵".into();
        pa.consent = true;
        add_evacuee(&mut a, "bbbb0001", &pa, T0).expect("a");
        add_event(
            &mut a,
            "bbbb0001",
            &event("ev-a-0001", StayKind::CheckIn, T0),
        )
        .expect("a in");
        let mut pb = person("佐藤 一郎", "1940-03-04");
        pb.kana = "サトウ イチロウ".into();
        add_evacuee(&mut b, "aaaa0001", &pb, T0).expect("b");
        add_event(
            &mut b,
            "aaaa0001",
            &event("ev-b-0001", StayKind::CheckIn, "2024-01-09T18:01:00+09:00"),
        )
        .expect("b in");
        a.merge(&mut b).expect("merge");
        let roster = read(&a).expect("read");
        assert_eq!(roster.records, 2);
        assert_eq!(roster.evacuees.len(), 1, "{:#?}", roster.evacuees);
        let e = &roster.evacuees[0];
        assert_eq!(e.id, "aaaa0001", "the smallest id survives");
        assert_eq!(e.merged_ids, vec!["bbbb0001".to_owned()]);
        assert_eq!(
            e.allergies, "卵",
            "empty fields are filled from the other record"
        );
        assert_eq!(e.kana, "サトウ イチロウ");
        assert!(!e.consent, "consent holds only if every record consented");
        assert_eq!(e.events.len(), 2, "both check-ins are kept");
        assert_eq!(roster.present(), 1);
        assert_eq!(e.current_stay().map(|s| s.id.as_str()), Some("ev-a-0001"));
        assert!(roster.evacuee("bbbb0001").is_some(), "found by a merged id");
    }

    #[test]
    fn dedup_joins_chains_by_card_and_by_name() {
        let r = |id: &str, card: &str, name: &str, birth: &str| Evacuee {
            id: id.into(),
            card_id: card.into(),
            name: name.into(),
            birth_date: birth.into(),
            ..Evacuee::default()
        };
        let out = dedup(vec![
            r("c", "ab12", "", ""),
            r("b", "ab12", "田中 一", "1960-01-01"),
            r("a", "", "田中一", "1960-01-01"),
            r("d", "ff00", "別人", "1960-01-01"),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].id, "a");
        assert_eq!(out[0].merged_ids, vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(out[0].card_id, "ab12");
    }

    #[test]
    fn requests_move_forward_and_needs_resolve() {
        let mut doc = shelter();
        let req = SupplyRequest {
            id: "req00001".into(),
            item: "毛布".into(),
            quantity: 50,
            unit: "枚".into(),
            urgency: Urgency::High,
            requested_at: T0.into(),
            ..SupplyRequest::default()
        };
        add_request(&mut doc, &req).expect("request");
        let mut hq = doc.fork().with_actor(actor("hq"));
        set_request_status(&mut hq, "req00001", RequestStatus::Arranged).expect("arrange");
        set_request_status(&mut doc, "req00001", RequestStatus::Open).expect("no-op");
        doc.merge(&mut hq).expect("merge");
        let roster = read(&doc).expect("read");
        assert_eq!(roster.requests[0].status, RequestStatus::Arranged);
        assert_eq!(roster.requests[0].quantity, 50);
        add_need(
            &mut doc,
            &Need {
                id: "need0001".into(),
                text: "仮設トイレ不足".into(),
                at: T0.into(),
                resolved: false,
            },
        )
        .expect("need");
        resolve_need(&mut doc, "need0001").expect("resolve");
        assert!(read(&doc).expect("read").needs[0].resolved);
    }

    #[test]
    fn the_latest_status_event_wins() {
        let mut doc = shelter();
        set_status(
            &mut doc,
            "status-0002",
            ShelterStatus::Closed,
            "2024-03-01T06:00:00+09:00",
        )
        .expect("close");
        assert_eq!(
            read_shelter(&doc).expect("read").status,
            ShelterStatus::Closed
        );
        let mut other = doc.fork().with_actor(actor("x"));
        set_status(
            &mut other,
            "status-0003",
            ShelterStatus::Open,
            "2024-03-02T06:00:00+09:00",
        )
        .expect("reopen");
        doc.merge(&mut other).expect("merge");
        assert_eq!(
            read_shelter(&doc).expect("read").status,
            ShelterStatus::Open
        );
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        let mut doc = shelter();
        let mut p = person("x", "1950-01-01");
        p.card_id = "1234 5678 9012".into();
        let err = add_evacuee(&mut doc, "e0000001", &p, T0).expect_err("card number");
        assert!(err.to_string().contains("never a card number"), "{err}");
        let err = add_evacuee(&mut doc, "e0000002", &person("", "1950-01-01"), T0)
            .expect_err("empty name");
        assert!(err.to_string().contains("name"), "{err}");
        let err =
            add_evacuee(&mut doc, "e0000003", &person("x", ""), "yesterday").expect_err("bad time");
        assert!(err.to_string().contains("RFC 3339"), "{err}");
        add_evacuee(&mut doc, "e0000004", &person("x", ""), T0).expect("ok");
        let err = add_relative(
            &mut doc,
            "e0000004",
            &Relative {
                name: "n".into(),
                email: "not-an-address".into(),
            },
        )
        .expect_err("bad email");
        assert!(err.to_string().contains("not an e-mail"), "{err}");
        assert!("bogus".parse::<CareFlag>().is_err());
        assert_eq!(
            "高齢者".parse::<CareFlag>().expect("label"),
            CareFlag::Elderly
        );
        let mut referral = AutoCommit::new();
        referral
            .put(automerge::ROOT, "kind", "referral_letter")
            .expect("put");
        assert!(matches!(
            read(&referral),
            Err(DocumentError::WrongKind { .. })
        ));
    }

    #[test]
    fn medical_notes_round_trip() {
        let mut doc = AutoCommit::new().with_actor(actor("centre"));
        init_medical(&mut doc, "shelter-doc-id").expect("init");
        set_medical_note(
            &mut doc,
            &MedicalNote {
                evacuee: "e0000001".into(),
                conditions: "糖尿病".into(),
                medications: "インスリン".into(),
                care_level: "要介護2".into(),
                notes: String::new(),
                updated_at: T0.into(),
            },
        )
        .expect("note");
        let notes = read_medical(&doc).expect("read");
        assert_eq!(notes.shelter_doc, "shelter-doc-id");
        assert_eq!(notes.notes[0].medications, "インスリン");
        assert!(read(&doc).is_err(), "a medical document is not a roster");
    }
}
