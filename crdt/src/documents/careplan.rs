//! The care plan (居宅サービス計画書) as an Automerge document.
//!
//! A care manager (ケアマネージャー) at a care-management office (居宅介護支援事業所) writes and revises a
//! resident's plan during home visits, often offline; the family doctor's clinic and the service
//! providers are members of the same document and add comments and 支援経過 entries.
//! The document follows the MHLW standard forms (「介護サービス計画書の様式及び課題分析標準項目の提示について」,
//! 老企第29号, last revised 老認発0331第6号 of 2021-03-31): 第1表 居宅サービス計画書(1), 第2表 居宅サービス計画書(2),
//! 第3表 週間サービス計画表 and 第5表 居宅介護支援経過, plus monitoring entries, comments and versions.
//!
//! # Layout (schema version [`SCHEMA_VERSION`])
//!
//! ```text
//! ROOT (map)
//!   kind            str   "care_plan"
//!   schema_version  uint  1
//!   sheet1          map   第1表: one key per field of Sheet1 (see PlanField::key); human text is Text,
//!                         dates (YYYY-MM-DD), codes and choices are str scalars;
//!                         sub-maps resident, office, consent { … } and category { initial, referral, continuing: bool }
//!   needs           map   第2表: { <id>: Need }
//!     Need          map   { position: str, text: Text, goals: { <id>: LongTermGoal } }
//!     LongTermGoal  map   { position, text: Text, period: Text, short_goals: { <id>: ShortTermGoal } }
//!     ShortTermGoal map   { position, text: Text, period: Text, services: { <id>: Service } }
//!     Service       map   { position, content, kind, provider, frequency, period: Text,
//!                           insured: bool, provider_code: str }
//!   weekly          map   第3表: { entries: { <id>: { day, start, end: str, service: Text } },
//!                                 activities: { <id>: { start, end: str, text: Text } },
//!                                 non_weekly: Text }
//!   support_log     list  第5表: [ { id, date, time, category, text, facility, facility_name, staff, recorded_at: str } ]
//!   monitoring      list  [ { id, date, goal, text, facility, facility_name, staff, recorded_at: str } ]
//!   comments        list  [ { id, at, about, text, facility, facility_name, staff: str } ]
//!   versions        list  [ { id, heads: [str], created_on, changed_on, note, facility, facility_name,
//!                             staff, recorded_at: str } ]
//! ```
//!
//! # Merge rules
//!
//! - Text fields are edited by diff ([`set_field`] and [`set_item_field`] use Automerge's `update_text`):
//!   two replicas editing the same field concurrently both keep their characters after merge.
//!   Scalars (dates, codes, choices, flags) are last-writer-wins registers, resolved the same way everywhere.
//! - **Reorderable lists (第2表).** Needs, goals and services are *maps keyed by a stable id*, never
//!   Automerge lists. Each item carries a `position`: a fractional index, a string of base-62 digits
//!   ([`key_between`]) that sorts between its neighbours. Reading sorts siblings by `(position, id)`.
//!   Moving an item rewrites only its `position` (a last-writer-wins register), so:
//!   - two people moving the same item offline: one move wins, the item exists once;
//!   - one person moving an item while another edits its text: both survive (the item object is never
//!     deleted and re-created, as a delete+insert move in an Automerge list would do, which loses the
//!     concurrent edit and duplicates the item when both sides move it);
//!   - two people inserting at the same place: both get the same position and the tie is broken by id,
//!     the same order on every replica.
//!
//!   Moves stay within the item's parent (a service stays under its short-term goal). When a position
//!   would exceed [`POSITION_BYTES_MAX`] or two siblings tie, the siblings are renumbered in their current order.
//!   Removing an item deletes its key; a concurrent edit inside a removed item is dropped with it.
//! - **Append-only entries** (支援経過, monitoring, comments, versions) are Automerge lists that are only
//!   appended to: concurrent appends all survive. They are returned sorted by their dates (then the
//!   time they were recorded, then id), so the order is the same on every replica whatever the merge order.
//! - **Versions** record the Automerge heads of the plan when a version was taken ([`record_version`]).
//!   Automerge keeps the whole history, so [`read_version`] forks the document at those heads and reads
//!   the plan exactly as it was, whatever was edited afterwards. Versions are numbered on read (1, 2, …)
//!   in the order they were recorded.
//! - [`init`] runs once, at the document's creator; other replicas get it through sync.
//!
//! Nothing here does IO: ids, dates and timestamps are parameters.

use super::common::{self, missing, read_u64, too_large, wrong_type};
use std::fmt;
use std::str::FromStr;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use super::DocumentError;

/// The value of the root `kind` key of a care plan document.
pub const KIND: &str = "care_plan";

/// The schema version this build writes and the newest one it reads.
pub const SCHEMA_VERSION: u64 = 1;

/// Maximum size of one free-text field, in UTF-8 bytes (about 40,000 Japanese characters).
pub const FIELD_TEXT_BYTES_MAX: usize = 128 * 1024;

/// Maximum size of an item id, in bytes (ids are 1..=32 of `[0-9a-z-]`).
pub const ID_BYTES_MAX: usize = 32;

/// Maximum size of an item's `position` key, in bytes; longer ones trigger a renumbering of siblings.
pub const POSITION_BYTES_MAX: usize = 48;

/// Maximum number of needs (課題) of one plan; the CSV standard numbers them 1〜99 (課題ＮＯ).
pub const NEEDS_COUNT_MAX: usize = 99;

/// Maximum number of long-term goals of one need (援助目標ＮＯ 1〜99).
pub const LONG_GOALS_COUNT_MAX: usize = 99;

/// Maximum number of short-term goals of one long-term goal.
pub const SHORT_GOALS_COUNT_MAX: usize = 99;

/// Maximum number of services of one short-term goal (援助内容ＮＯ 1〜99 per goal).
pub const SERVICES_COUNT_MAX: usize = 99;

/// Maximum number of entries of the weekly plan (第3表), services and activities together.
pub const WEEKLY_ENTRIES_COUNT_MAX: usize = 500;

/// Maximum number of entries of each append-only list (支援経過, monitoring, comments).
pub const ENTRIES_COUNT_MAX: usize = 20_000;

/// Maximum number of recorded versions of one plan.
pub const VERSIONS_COUNT_MAX: usize = 1_000;

use super::common::KEY_KIND;
use super::common::KEY_SCHEMA_VERSION;
const KEY_SHEET1: &str = "sheet1";
const KEY_NEEDS: &str = "needs";
const KEY_GOALS: &str = "goals";
const KEY_SHORT_GOALS: &str = "short_goals";
const KEY_SERVICES: &str = "services";
const KEY_POSITION: &str = "position";
const KEY_WEEKLY: &str = "weekly";
const KEY_ENTRIES: &str = "entries";
const KEY_ACTIVITIES: &str = "activities";
const KEY_NON_WEEKLY: &str = "non_weekly";
const KEY_SUPPORT_LOG: &str = "support_log";
const KEY_MONITORING: &str = "monitoring";
const KEY_COMMENTS: &str = "comments";
const KEY_VERSIONS: &str = "versions";
const KEY_CATEGORY: &str = "category";

// ---------------------------------------------------------------------------------------------
// Plain data
// ---------------------------------------------------------------------------------------------

/// A care plan (居宅サービス計画書) as plain data: what [`read`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct CarePlan {
    /// 第1表 居宅サービス計画書(1).
    pub sheet1: Sheet1,
    /// 第2表 居宅サービス計画書(2): 生活全般の解決すべき課題（ニーズ）, in form order.
    pub needs: Vec<Need>,
    /// 第3表 週間サービス計画表.
    pub weekly: WeeklyPlan,
    /// 第5表 居宅介護支援経過: dated entries, append-only, sorted by date.
    pub support_log: Vec<LogEntry>,
    /// モニタリング (monitoring) entries, append-only, sorted by date.
    pub monitoring: Vec<MonitoringEntry>,
    /// コメント: remarks of members (the clinic, providers), append-only, sorted by time.
    pub comments: Vec<Comment>,
    /// 版 (recorded versions), oldest first; number 1 is the first.
    pub versions: Vec<VersionInfo>,
}

/// 第1表 居宅サービス計画書(1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Sheet1 {
    /// 作成年月日 (date the plan was drawn up and explained, `YYYY-MM-DD`).
    pub created_on: String,
    /// 居宅サービス計画作成（変更）日 (date of this plan or of its latest change, `YYYY-MM-DD`).
    pub changed_on: String,
    /// 初回居宅サービス計画作成日 (date of this office's first plan for the resident, `YYYY-MM-DD`).
    pub first_created_on: String,
    /// 初回・紹介・継続 (first plan, referred from elsewhere, continuing; several may be circled).
    pub category: PlanCategory,
    /// 認定済・申請中 (certified, or certification applied for).
    pub certification: Option<Certification>,
    /// 認定日 (date of the care-need certification, `YYYY-MM-DD`).
    pub certified_on: String,
    /// 認定の有効期間 (開始) (certification valid from, `YYYY-MM-DD`).
    pub valid_from: String,
    /// 認定の有効期間 (終了) (certification valid to, `YYYY-MM-DD`).
    pub valid_to: String,
    /// 要介護状態区分 (care level).
    pub care_level: Option<CareLevel>,
    /// 利用者 (the resident: 利用者名, 生年月日, 住所, …).
    pub resident: Resident,
    /// 保険者番号 (insurer number: the municipality's 6-digit code).
    pub insurer_number: String,
    /// 被保険者番号 (insured person's number: 10 digits, or `H` + 9 digits for public assistance only).
    pub insured_number: String,
    /// 利用者及び家族の生活に対する意向を踏まえた課題分析の結果.
    pub assessment: String,
    /// 介護認定審査会の意見及びサービスの種類の指定.
    pub committee_opinion: String,
    /// 総合的な援助の方針.
    pub policy: String,
    /// 生活援助中心型の算定理由 (reason for housework-centred home help).
    pub housework_reason: Option<HouseworkReason>,
    /// 生活援助中心型の算定理由 3.その他（ ） (the reason, when it is "other").
    pub housework_reason_other: String,
    /// 居宅サービス計画作成者氏名 (the care manager who wrote the plan).
    pub planner: String,
    /// 居宅介護支援事業者・事業所名及び所在地 (the care-management office).
    pub office: Office,
    /// 同意 (the resident's consent: 説明・同意日 and 利用者同意欄).
    pub consent: Consent,
}

/// 利用者 (the resident the plan is for).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Resident {
    /// 利用者名 (full name, family name first, e.g. `山田 花子`).
    pub name: String,
    /// 利用者氏名フリガナ (name in katakana).
    pub kana: String,
    /// 性別 (sex).
    pub sex: Option<Sex>,
    /// 生年月日 (date of birth, `YYYY-MM-DD`).
    pub birth_date: String,
    /// 郵便番号 (postal code, `NNN-NNNN`).
    pub postal_code: String,
    /// 住所 (address).
    pub address: String,
    /// 電話番号 (telephone number).
    pub phone: String,
}

/// 居宅介護支援事業者・事業所 (the care-management office that writes the plan).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Office {
    /// 事業所名 (office name).
    pub name: String,
    /// 介護支援事業者コード (事業所番号, the office's 10-digit number).
    pub code: String,
    /// 郵便番号 (postal code, `NNN-NNNN`).
    pub postal_code: String,
    /// 所在地 (address).
    pub address: String,
}

/// 同意 (the resident's or family's consent to the plan).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Consent {
    /// 説明・同意日 (date of explanation and consent, `YYYY-MM-DD`).
    pub date: String,
    /// 利用者同意欄 (who consented, e.g. `山田 花子` or `山田 一郎（長男）`).
    pub by: String,
}

/// 初回・紹介・継続 (the plan's category; the form circles one or more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct PlanCategory {
    /// 初回 (the office's first plan for the resident).
    pub initial: bool,
    /// 紹介 (referred from another office or facility).
    pub referral: bool,
    /// 継続 (continuing).
    pub continuing: bool,
}

impl PlanCategory {
    /// 計画書区分 of the CSV standard: 11 初回, 12 紹介, 21 継続, 51 初回＆紹介, 52 初回＆継続,
    /// 53 紹介＆継続, 54 初回＆紹介＆継続; `None` when nothing is circled.
    pub fn code(self) -> Option<&'static str> {
        match (self.initial, self.referral, self.continuing) {
            (false, false, false) => None,
            (true, false, false) => Some("11"),
            (false, true, false) => Some("12"),
            (false, false, true) => Some("21"),
            (true, true, false) => Some("51"),
            (true, false, true) => Some("52"),
            (false, true, true) => Some("53"),
            (true, true, true) => Some("54"),
        }
    }

    /// The circled words, e.g. `初回・紹介`.
    pub fn label(self) -> String {
        let mut parts = Vec::new();
        if self.initial {
            parts.push("初回");
        }
        if self.referral {
            parts.push("紹介");
        }
        if self.continuing {
            parts.push("継続");
        }
        parts.join("・")
    }
}

impl FromStr for PlanCategory {
    type Err = DocumentError;

    /// Parses a comma- or `・`-separated list of `初回`/`initial`, `紹介`/`referral`, `継続`/`continuing`
    /// (the empty string circles nothing).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut category = PlanCategory::default();
        for part in s
            .split([',', '・', '、'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match part {
                "初回" | "initial" => category.initial = true,
                "紹介" | "referral" => category.referral = true,
                "継続" | "continuing" => category.continuing = true,
                other => {
                    return Err(invalid(
                        "category",
                        format!(
                            "`{other}` is not one of 初回 (initial), 紹介 (referral), 継続 (continuing)"
                        ),
                    ));
                }
            }
        }
        Ok(category)
    }
}

/// Declares a closed set of form choices: stored as the CSV standard's code, shown and serialised as
/// the form's words, parsed from either (or from an English alias).
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal, $label:literal, $alias:literal; )+
        }
    ) => {
        $(#[$meta])*
        ///
        /// Serialised as the words printed on the form (e.g. `要介護1`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "specta", derive(specta::Type))]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $label)] $variant, )+
        }

        impl $name {
            /// Every value, in form order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The code of the ケアプランデータ連携 CSV standard (also what the document stores).
            pub fn code(self) -> &'static str {
                match self { $($name::$variant => $code,)+ }
            }

            /// The words printed on the form.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)+ }
            }

            fn from_code(code: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.code() == code)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.label())
            }
        }

        impl FromStr for $name {
            type Err = DocumentError;

            /// Parses the form's words, the CSV code or the English alias.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let s = s.trim();
                let normalised = normalise_digits(s);
                match normalised.as_str() {
                    $( $label | $code | $alias => Ok($name::$variant), )+
                    _ => Err(DocumentError::InvalidValue {
                        key: $what.to_owned(),
                        reason: format!(
                            "`{s}` is not one of {}",
                            [$(concat!($label, " (", $alias, ")")),+].join(", "),
                        ),
                    }),
                }
            }
        }
    };
}

choice! {
    /// 認定済・申請中 (認定状況区分 of the CSV standard).
    Certification, "certification" {
        /// 申請中: applied for, not yet decided.
        Applying = "1", "申請中", "applying";
        /// 認定済: certified.
        Certified = "2", "認定済", "certified";
    }
}

choice! {
    /// 要介護状態区分 (care level; 要介護状態区分 of the CSV standard).
    CareLevel, "care level" {
        /// 事業対象者 (eligible for the community support programme only).
        Eligible = "06", "事業対象者", "eligible";
        /// 要支援１.
        Support1 = "12", "要支援1", "support-1";
        /// 要支援２.
        Support2 = "13", "要支援2", "support-2";
        /// 要介護１.
        Care1 = "21", "要介護1", "care-1";
        /// 要介護２.
        Care2 = "22", "要介護2", "care-2";
        /// 要介護３.
        Care3 = "23", "要介護3", "care-3";
        /// 要介護４.
        Care4 = "24", "要介護4", "care-4";
        /// 要介護５.
        Care5 = "25", "要介護5", "care-5";
    }
}

choice! {
    /// 生活援助中心型の算定理由.
    HouseworkReason, "housework reason" {
        /// 1.一人暮らし (lives alone).
        LivesAlone = "1", "一人暮らし", "lives-alone";
        /// 2.家族等が障害、疾病等 (the family has a disability or illness).
        FamilyUnable = "2", "家族等が障害、疾病等", "family-unable";
        /// 3.その他 (other; the reason is in `housework_reason_other`).
        Other = "3", "その他", "other";
    }
}

choice! {
    /// 性別 (sex; 利用者性別 of the CSV standard).
    Sex, "sex" {
        /// 男.
        Male = "1", "男", "male";
        /// 女.
        Female = "2", "女", "female";
    }
}

/// 生活全般の解決すべき課題（ニーズ）: one need of 第2表 with its goals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Need {
    /// Stable id (unique within the plan).
    pub id: String,
    /// 生活全般の解決すべき課題（ニーズ）.
    pub text: String,
    /// 長期目標 (long-term goals), in form order.
    pub goals: Vec<LongTermGoal>,
}

/// 長期目標 with its （期間）.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct LongTermGoal {
    /// Stable id.
    pub id: String,
    /// 長期目標.
    pub text: String,
    /// （期間） of the long-term goal, e.g. `2025-04-01〜2026-03-31`.
    pub period: String,
    /// 短期目標 (short-term goals), in form order.
    pub short_goals: Vec<ShortTermGoal>,
}

/// 短期目標 with its （期間）.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct ShortTermGoal {
    /// Stable id.
    pub id: String,
    /// 短期目標.
    pub text: String,
    /// （期間） of the short-term goal.
    pub period: String,
    /// 援助内容: the services that work toward this goal, in form order.
    pub services: Vec<Service>,
}

/// 援助内容: one service row of 第2表.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Service {
    /// Stable id.
    pub id: String,
    /// サービス内容.
    pub content: String,
    /// ※1 保険給付の対象となるかどうかの区分 (○ when covered by long-term care insurance).
    pub insured: bool,
    /// サービス種別 (e.g. 訪問介護, 通所介護, 家族).
    pub kind: String,
    /// ※2 当該サービス提供を行う事業所 (the provider).
    pub provider: String,
    /// サービス事業者コード (the provider's 10-digit office number; optional, used by the CSV).
    pub provider_code: String,
    /// 頻度 (frequency, e.g. `週2回`).
    pub frequency: String,
    /// 期間 (period).
    pub period: String,
}

/// Fields of a new service row (ids and order are separate parameters).
pub type ServiceInput = Service;

/// 第3表 週間サービス計画表.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct WeeklyPlan {
    /// Services on the day × time grid, sorted by day, start, end.
    pub entries: Vec<WeeklyEntry>,
    /// 主な日常生活上の活動 (the resident's daily routine, e.g. 起床 6:00), sorted by start.
    pub activities: Vec<Activity>,
    /// 週単位以外のサービス (services not on a weekly rhythm, e.g. 福祉用具貸与, 月1回の通院).
    pub non_weekly: String,
}

/// One service on the weekly grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct WeeklyEntry {
    /// Stable id.
    pub id: String,
    /// 曜日 (day of the week).
    pub day: Weekday,
    /// 開始時間 (`HH:MM`).
    pub start: String,
    /// 終了時間 (`HH:MM`, up to `24:00`).
    pub end: String,
    /// 介護サービス内容 (e.g. 訪問介護).
    pub service: String,
}

/// 主な日常生活上の活動: one activity of the resident's day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Activity {
    /// Stable id.
    pub id: String,
    /// 開始時間 (`HH:MM`).
    pub start: String,
    /// 終了時間 (`HH:MM`, empty for a moment such as 起床).
    pub end: String,
    /// 活動 (e.g. 起床, 昼食, 就寝).
    pub text: String,
}

/// 曜日 of the weekly plan. Serialised as `mon` … `sun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    /// 月.
    Mon,
    /// 火.
    Tue,
    /// 水.
    Wed,
    /// 木.
    Thu,
    /// 金.
    Fri,
    /// 土.
    Sat,
    /// 日.
    Sun,
}

impl Weekday {
    /// Monday to Sunday, the form's column order.
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    /// `mon` … `sun` (what the document stores).
    pub fn as_str(self) -> &'static str {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][self.index()]
    }

    /// 月 … 日.
    pub fn label(self) -> &'static str {
        ["月", "火", "水", "木", "金", "土", "日"][self.index()]
    }

    /// 0 for Monday … 6 for Sunday.
    pub fn index(self) -> usize {
        self as usize
    }

    /// 曜日 code of the CSV standard: 月曜日 1 … 日曜日 7.
    pub fn code(self) -> u8 {
        self.index() as u8 + 1
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Weekday {
    type Err = DocumentError;

    /// Parses `mon`…`sun`, `monday`…, `月`…`日` or `月曜日`….
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_lowercase();
        Weekday::ALL
            .into_iter()
            .find(|d| {
                s == d.as_str()
                    || s == d.label()
                    || s == format!("{}曜日", d.label())
                    || s == format!("{}曜", d.label())
                    || (s.len() > 3 && s.starts_with(d.as_str()) && s.ends_with("day"))
            })
            .ok_or_else(|| {
                invalid(
                    "day",
                    format!("`{s}` is not a day of the week (mon … sun, or 月 … 日)"),
                )
            })
    }
}

/// Who made an entry: the facility (from the directory) and the staff member signed in there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Author {
    /// The facility's id.
    pub facility: String,
    /// The facility's name (as the directory had it when the entry was written).
    pub facility_name: String,
    /// 記入者 (the staff member; may be empty when the app has no signed-in staff).
    pub staff: String,
}

/// 第5表 居宅介護支援経過: one dated entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct LogEntry {
    /// Stable id.
    pub id: String,
    /// 年月日 (`YYYY-MM-DD`).
    pub date: String,
    /// 時刻 (`HH:MM`, optional).
    pub time: String,
    /// 項目 (e.g. 訪問, 電話, サービス担当者会議, 主治医連絡).
    pub category: String,
    /// 内容.
    pub text: String,
    /// Who wrote it.
    #[serde(flatten)]
    pub author: Author,
    /// When it was recorded (RFC 3339), a parameter.
    pub recorded_at: String,
}

/// モニタリング: one monitoring entry (目標の達成状況, サービスの実施状況, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct MonitoringEntry {
    /// Stable id.
    pub id: String,
    /// 実施日 (`YYYY-MM-DD`).
    pub date: String,
    /// The short- or long-term goal it is about (an item id; empty for the plan as a whole).
    pub goal: String,
    /// 内容 (observations and assessment).
    pub text: String,
    /// Who wrote it.
    #[serde(flatten)]
    pub author: Author,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
}

/// A remark by a member (the family doctor, a provider) on the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Comment {
    /// Stable id.
    pub id: String,
    /// When it was written (RFC 3339).
    pub at: String,
    /// The item it is about (an id of 第2表 or 第3表; empty for the plan as a whole).
    pub about: String,
    /// The remark.
    pub text: String,
    /// Who wrote it.
    #[serde(flatten)]
    pub author: Author,
}

/// 版: a recorded version of the plan (what [`read_version`] reads back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct VersionInfo {
    /// 1 for the first recorded version, in the order they were recorded.
    pub number: usize,
    /// Stable id.
    pub id: String,
    /// 作成年月日 of the plan at that version.
    pub created_on: String,
    /// 居宅サービス計画作成（変更）日 of the plan at that version.
    pub changed_on: String,
    /// A note (e.g. `区分変更に伴う変更`).
    pub note: String,
    /// Who recorded it.
    #[serde(flatten)]
    pub author: Author,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
    /// The Automerge heads (change hashes, hex) the version stands for.
    pub heads: Vec<String>,
}

/// Where an item goes among its siblings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Before every sibling.
    First,
    /// After every sibling (the default for new items).
    Last,
    /// Just before the sibling with this id.
    Before(String),
    /// Just after the sibling with this id.
    After(String),
}

/// What kind of item an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// 生活全般の解決すべき課題（ニーズ）.
    Need,
    /// 長期目標.
    LongTermGoal,
    /// 短期目標.
    ShortTermGoal,
    /// 援助内容 (a service row).
    Service,
    /// A service on the weekly grid (第3表).
    WeeklyEntry,
    /// 主な日常生活上の活動.
    Activity,
}

impl ItemKind {
    /// The keys [`set_item_field`] accepts for this kind.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            ItemKind::Need => &["text"],
            ItemKind::LongTermGoal | ItemKind::ShortTermGoal => &["text", "period"],
            ItemKind::Service => &[
                "content",
                "insured",
                "kind",
                "provider",
                "provider_code",
                "frequency",
                "period",
            ],
            ItemKind::WeeklyEntry => &["day", "start", "end", "service"],
            ItemKind::Activity => &["start", "end", "text"],
        }
    }

    /// The form's name of the item.
    pub fn label(self) -> &'static str {
        match self {
            ItemKind::Need => "生活全般の解決すべき課題",
            ItemKind::LongTermGoal => "長期目標",
            ItemKind::ShortTermGoal => "短期目標",
            ItemKind::Service => "援助内容",
            ItemKind::WeeklyEntry => "週間サービス",
            ItemKind::Activity => "主な日常生活上の活動",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 第1表 fields
// ---------------------------------------------------------------------------------------------

/// How a field of 第1表 is stored and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    /// Automerge Text, merged character by character.
    Text,
    /// `YYYY-MM-DD` scalar (or empty).
    Date,
    /// Scalar of exactly `n` ASCII digits (or empty).
    Digits(usize),
    /// 被保険者番号: 10 digits or `H` + 9 digits (or empty).
    InsuredNumber,
    /// `NNN-NNNN` scalar (or empty).
    PostalCode,
    /// A choice stored as its CSV code (or empty).
    Choice,
    /// 初回・紹介・継続: three flags in the `category` map.
    Category,
}

macro_rules! plan_fields {
    ( $( $(#[$meta:meta])* $variant:ident => $key:literal, $label:literal, $section:expr, $leaf:literal, $kind:expr; )+ ) => {
        /// A field of 第1表, as named by its key (`resident.name`, `policy`, …). Its serde form is
        /// the same key.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "specta", derive(specta::Type))]
        pub enum PlanField {
            $( $(#[$meta])* #[serde(rename = $key)] $variant, )+
        }

        impl PlanField {
            /// Every field, in form order.
            pub const ALL: &'static [PlanField] = &[$(PlanField::$variant),+];

            /// The key, as in the JSON of [`Sheet1`] (nested ones joined by a dot).
            pub fn key(self) -> &'static str {
                match self { $(PlanField::$variant => $key,)+ }
            }

            /// The field's label on 第1表 (e.g. `総合的な援助の方針`).
            pub fn label(self) -> &'static str {
                match self { $(PlanField::$variant => $label,)+ }
            }

            /// (sub-map of `sheet1` or `None` for `sheet1` itself, leaf key).
            fn location(self) -> (Option<&'static str>, &'static str) {
                match self { $(PlanField::$variant => ($section, $leaf),)+ }
            }

            fn kind(self) -> FieldKind {
                match self { $(PlanField::$variant => $kind,)+ }
            }
        }
    };
}

plan_fields! {
    /// `created_on`: 作成年月日.
    CreatedOn => "created_on", "作成年月日", None, "created_on", FieldKind::Date;
    /// `changed_on`: 居宅サービス計画作成（変更）日.
    ChangedOn => "changed_on", "居宅サービス計画作成（変更）日", None, "changed_on", FieldKind::Date;
    /// `first_created_on`: 初回居宅サービス計画作成日.
    FirstCreatedOn => "first_created_on", "初回居宅サービス計画作成日", None, "first_created_on", FieldKind::Date;
    /// `category`: 初回・紹介・継続 (comma-separated).
    Category => "category", "初回・紹介・継続", None, "category", FieldKind::Category;
    /// `certification`: 認定済・申請中.
    Certification => "certification", "認定済・申請中", None, "certification", FieldKind::Choice;
    /// `certified_on`: 認定日.
    CertifiedOn => "certified_on", "認定日", None, "certified_on", FieldKind::Date;
    /// `valid_from`: 認定の有効期間 (開始).
    ValidFrom => "valid_from", "認定の有効期間（開始）", None, "valid_from", FieldKind::Date;
    /// `valid_to`: 認定の有効期間 (終了).
    ValidTo => "valid_to", "認定の有効期間（終了）", None, "valid_to", FieldKind::Date;
    /// `care_level`: 要介護状態区分.
    CareLevel => "care_level", "要介護状態区分", None, "care_level", FieldKind::Choice;
    /// `resident.name`: 利用者名.
    ResidentName => "resident.name", "利用者名", Some("resident"), "name", FieldKind::Text;
    /// `resident.kana`: 利用者氏名フリガナ.
    ResidentKana => "resident.kana", "利用者氏名フリガナ", Some("resident"), "kana", FieldKind::Text;
    /// `resident.sex`: 性別.
    ResidentSex => "resident.sex", "性別", Some("resident"), "sex", FieldKind::Choice;
    /// `resident.birth_date`: 生年月日.
    ResidentBirthDate => "resident.birth_date", "生年月日", Some("resident"), "birth_date", FieldKind::Date;
    /// `resident.postal_code`: 郵便番号.
    ResidentPostalCode => "resident.postal_code", "郵便番号", Some("resident"), "postal_code", FieldKind::PostalCode;
    /// `resident.address`: 住所.
    ResidentAddress => "resident.address", "住所", Some("resident"), "address", FieldKind::Text;
    /// `resident.phone`: 電話番号.
    ResidentPhone => "resident.phone", "電話番号", Some("resident"), "phone", FieldKind::Text;
    /// `insurer_number`: 保険者番号.
    InsurerNumber => "insurer_number", "保険者番号", None, "insurer_number", FieldKind::Digits(6);
    /// `insured_number`: 被保険者番号.
    InsuredNumber => "insured_number", "被保険者番号", None, "insured_number", FieldKind::InsuredNumber;
    /// `assessment`: 利用者及び家族の生活に対する意向を踏まえた課題分析の結果.
    Assessment => "assessment", "利用者及び家族の生活に対する意向を踏まえた課題分析の結果", None, "assessment", FieldKind::Text;
    /// `committee_opinion`: 介護認定審査会の意見及びサービスの種類の指定.
    CommitteeOpinion => "committee_opinion", "介護認定審査会の意見及びサービスの種類の指定", None, "committee_opinion", FieldKind::Text;
    /// `policy`: 総合的な援助の方針.
    Policy => "policy", "総合的な援助の方針", None, "policy", FieldKind::Text;
    /// `housework_reason`: 生活援助中心型の算定理由.
    HouseworkReason => "housework_reason", "生活援助中心型の算定理由", None, "housework_reason", FieldKind::Choice;
    /// `housework_reason_other`: 生活援助中心型の算定理由 その他.
    HouseworkReasonOther => "housework_reason_other", "生活援助中心型の算定理由 その他", None, "housework_reason_other", FieldKind::Text;
    /// `planner`: 居宅サービス計画作成者氏名.
    Planner => "planner", "居宅サービス計画作成者氏名", None, "planner", FieldKind::Text;
    /// `office.name`: 居宅介護支援事業者・事業所名.
    OfficeName => "office.name", "居宅介護支援事業者・事業所名", Some("office"), "name", FieldKind::Text;
    /// `office.code`: 介護支援事業者コード (事業所番号).
    OfficeCode => "office.code", "介護支援事業者コード (事業所番号)", Some("office"), "code", FieldKind::Digits(10);
    /// `office.postal_code`: 事業所郵便番号.
    OfficePostalCode => "office.postal_code", "事業所郵便番号", Some("office"), "postal_code", FieldKind::PostalCode;
    /// `office.address`: 事業所所在地.
    OfficeAddress => "office.address", "事業所所在地", Some("office"), "address", FieldKind::Text;
    /// `consent.date`: 説明・同意日.
    ConsentDate => "consent.date", "説明・同意日", Some("consent"), "date", FieldKind::Date;
    /// `consent.by`: 利用者同意欄.
    ConsentBy => "consent.by", "利用者同意欄", Some("consent"), "by", FieldKind::Text;
}

/// How a field of 第1表 is entered (the editor's input type); see [`PlanField::input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "snake_case")]
pub enum FieldInput {
    /// Free text (merged character by character).
    Text,
    /// A date `YYYY-MM-DD` (or empty).
    Date,
    /// A fixed number of ASCII digits (or empty); [`PlanField::digits`] says how many.
    Digits,
    /// 被保険者番号: 10 digits, or `H` and 9 digits (or empty).
    InsuredNumber,
    /// A postal code `NNN-NNNN` (or empty).
    PostalCode,
    /// One of [`PlanField::options`] (or empty).
    Choice,
    /// 初回・紹介・継続: any of [`PlanField::options`], joined by `,` or `・`.
    Category,
}

impl PlanField {
    /// How the field is entered.
    pub fn input(self) -> FieldInput {
        match self.kind() {
            FieldKind::Text => FieldInput::Text,
            FieldKind::Date => FieldInput::Date,
            FieldKind::Digits(_) => FieldInput::Digits,
            FieldKind::InsuredNumber => FieldInput::InsuredNumber,
            FieldKind::PostalCode => FieldInput::PostalCode,
            FieldKind::Choice => FieldInput::Choice,
            FieldKind::Category => FieldInput::Category,
        }
    }

    /// The number of digits of a [`FieldInput::Digits`] field (保険者番号 6, 事業所番号 10).
    pub fn digits(self) -> Option<usize> {
        match self.kind() {
            FieldKind::Digits(n) => Some(n),
            _ => None,
        }
    }

    /// The values a choice or the category accepts, as the form's words (empty for other fields).
    pub fn options(self) -> Vec<&'static str> {
        fn labels<T: Copy>(all: &[T], label: fn(T) -> &'static str) -> Vec<&'static str> {
            all.iter().map(|v| label(*v)).collect()
        }
        match self {
            PlanField::Certification => labels(Certification::ALL, Certification::label),
            PlanField::CareLevel => labels(CareLevel::ALL, CareLevel::label),
            PlanField::ResidentSex => labels(Sex::ALL, Sex::label),
            PlanField::HouseworkReason => labels(HouseworkReason::ALL, HouseworkReason::label),
            PlanField::Category => vec!["初回", "紹介", "継続"],
            _ => Vec::new(),
        }
    }
}

impl ItemKind {
    /// Every kind, 第2表 from the need down, then 第3表.
    pub const ALL: [ItemKind; 6] = [
        ItemKind::Need,
        ItemKind::LongTermGoal,
        ItemKind::ShortTermGoal,
        ItemKind::Service,
        ItemKind::WeeklyEntry,
        ItemKind::Activity,
    ];

    /// The form's label of one of [`ItemKind::fields`] (`None` for a key the item does not have).
    pub fn field_label(self, key: &str) -> Option<&'static str> {
        Some(match (self, key) {
            (ItemKind::Need, "text") => "生活全般の解決すべき課題（ニーズ）",
            (ItemKind::LongTermGoal, "text") => "長期目標",
            (ItemKind::ShortTermGoal, "text") => "短期目標",
            (ItemKind::LongTermGoal | ItemKind::ShortTermGoal, "period") => "（期間）",
            (ItemKind::Service, "content") => "サービス内容",
            (ItemKind::Service, "insured") => "※1 保険給付対象",
            (ItemKind::Service, "kind") => "サービス種別",
            (ItemKind::Service, "provider") => "※2 事業所",
            (ItemKind::Service, "provider_code") => "サービス事業者コード",
            (ItemKind::Service, "frequency") => "頻度",
            (ItemKind::Service, "period") => "期間",
            (ItemKind::WeeklyEntry, "day") => "曜日",
            (ItemKind::WeeklyEntry | ItemKind::Activity, "start") => "開始時間",
            (ItemKind::WeeklyEntry | ItemKind::Activity, "end") => "終了時間",
            (ItemKind::WeeklyEntry, "service") => "介護サービス内容",
            (ItemKind::Activity, "text") => "主な日常生活上の活動",
            _ => return None,
        })
    }
}

impl fmt::Display for PlanField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for PlanField {
    type Err = DocumentError;

    /// Parses a key of [`PlanField::ALL`]; errors with [`DocumentError::UnknownField`] listing them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PlanField::ALL
            .iter()
            .copied()
            .find(|f| f.key() == s)
            .ok_or_else(|| DocumentError::UnknownField {
                key: s.to_owned(),
                valid: PlanField::ALL
                    .iter()
                    .map(|f| f.key())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl Sheet1 {
    /// The value of `field` as text (choices as the form's words, the category as `初回・紹介`).
    pub fn get(&self, field: PlanField) -> String {
        use PlanField as F;
        let opt = |v: Option<&'static str>| v.unwrap_or_default().to_owned();
        match field {
            F::CreatedOn => self.created_on.clone(),
            F::ChangedOn => self.changed_on.clone(),
            F::FirstCreatedOn => self.first_created_on.clone(),
            F::Category => self.category.label(),
            F::Certification => opt(self.certification.map(Certification::label)),
            F::CertifiedOn => self.certified_on.clone(),
            F::ValidFrom => self.valid_from.clone(),
            F::ValidTo => self.valid_to.clone(),
            F::CareLevel => opt(self.care_level.map(CareLevel::label)),
            F::ResidentName => self.resident.name.clone(),
            F::ResidentKana => self.resident.kana.clone(),
            F::ResidentSex => opt(self.resident.sex.map(Sex::label)),
            F::ResidentBirthDate => self.resident.birth_date.clone(),
            F::ResidentPostalCode => self.resident.postal_code.clone(),
            F::ResidentAddress => self.resident.address.clone(),
            F::ResidentPhone => self.resident.phone.clone(),
            F::InsurerNumber => self.insurer_number.clone(),
            F::InsuredNumber => self.insured_number.clone(),
            F::Assessment => self.assessment.clone(),
            F::CommitteeOpinion => self.committee_opinion.clone(),
            F::Policy => self.policy.clone(),
            F::HouseworkReason => opt(self.housework_reason.map(HouseworkReason::label)),
            F::HouseworkReasonOther => self.housework_reason_other.clone(),
            F::Planner => self.planner.clone(),
            F::OfficeName => self.office.name.clone(),
            F::OfficeCode => self.office.code.clone(),
            F::OfficePostalCode => self.office.postal_code.clone(),
            F::OfficeAddress => self.office.address.clone(),
            F::ConsentDate => self.consent.date.clone(),
            F::ConsentBy => self.consent.by.clone(),
        }
    }

    /// Sets `field` from text, validated as [`set_field`] does (for building a plan before [`init`]).
    ///
    /// # Errors
    ///
    /// [`DocumentError::InvalidValue`] or
    /// [`DocumentError::TooLarge`] when `value` does not fit the field.
    pub fn set(&mut self, field: PlanField, value: &str) -> Result<(), DocumentError> {
        use PlanField as F;
        let s = check_field(field, value)?;
        match field {
            F::CreatedOn => self.created_on = s,
            F::ChangedOn => self.changed_on = s,
            F::FirstCreatedOn => self.first_created_on = s,
            F::Category => self.category = value.parse()?,
            F::Certification => self.certification = Certification::from_code(&s),
            F::CertifiedOn => self.certified_on = s,
            F::ValidFrom => self.valid_from = s,
            F::ValidTo => self.valid_to = s,
            F::CareLevel => self.care_level = CareLevel::from_code(&s),
            F::ResidentName => self.resident.name = s,
            F::ResidentKana => self.resident.kana = s,
            F::ResidentSex => self.resident.sex = Sex::from_code(&s),
            F::ResidentBirthDate => self.resident.birth_date = s,
            F::ResidentPostalCode => self.resident.postal_code = s,
            F::ResidentAddress => self.resident.address = s,
            F::ResidentPhone => self.resident.phone = s,
            F::InsurerNumber => self.insurer_number = s,
            F::InsuredNumber => self.insured_number = s,
            F::Assessment => self.assessment = s,
            F::CommitteeOpinion => self.committee_opinion = s,
            F::Policy => self.policy = s,
            F::HouseworkReason => self.housework_reason = HouseworkReason::from_code(&s),
            F::HouseworkReasonOther => self.housework_reason_other = s,
            F::Planner => self.planner = s,
            F::OfficeName => self.office.name = s,
            F::OfficeCode => self.office.code = s,
            F::OfficePostalCode => self.office.postal_code = s,
            F::OfficeAddress => self.office.address = s,
            F::ConsentDate => self.consent.date = s,
            F::ConsentBy => self.consent.by = s,
        }
        Ok(())
    }

    /// The value the document stores for `field` (choices as their code; unused for the category).
    fn stored(&self, field: PlanField) -> String {
        use PlanField as F;
        let code = |v: Option<&'static str>| v.unwrap_or_default().to_owned();
        match field {
            F::Certification => code(self.certification.map(Certification::code)),
            F::CareLevel => code(self.care_level.map(CareLevel::code)),
            F::ResidentSex => code(self.resident.sex.map(Sex::code)),
            F::HouseworkReason => code(self.housework_reason.map(HouseworkReason::code)),
            other => self.get(other),
        }
    }
}

/// Validates `value` for `field` and returns what the document stores (a choice's code, trimmed
/// codes and dates; text unchanged).
fn check_field(field: PlanField, value: &str) -> Result<String, DocumentError> {
    let key = field.key();
    let trimmed = normalise_digits(value.trim());
    let empty_or = |ok: bool, what: &str| -> Result<String, DocumentError> {
        if trimmed.is_empty() || ok {
            Ok(trimmed.clone())
        } else {
            Err(invalid(key, format!("`{value}` is not {what}")))
        }
    };
    match field.kind() {
        FieldKind::Text => {
            check_text(key, value)?;
            Ok(value.to_owned())
        }
        FieldKind::Date => {
            let ok = is_date(&trimmed);
            empty_or(ok, "a date YYYY-MM-DD")
        }
        FieldKind::Digits(n) => {
            let ok = trimmed.len() == n && trimmed.bytes().all(|b| b.is_ascii_digit());
            empty_or(ok, &format!("{n} digits"))
        }
        FieldKind::InsuredNumber => {
            let digits = trimmed.strip_prefix('H').unwrap_or(&trimmed);
            let want = if trimmed.starts_with('H') { 9 } else { 10 };
            let ok = digits.len() == want && digits.bytes().all(|b| b.is_ascii_digit());
            empty_or(ok, "10 digits (or H and 9 digits)")
        }
        FieldKind::PostalCode => {
            let b = trimmed.as_bytes();
            let ok = b.len() == 8
                && b[3] == b'-'
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| i == 3 || c.is_ascii_digit());
            empty_or(ok, "a postal code NNN-NNNN")
        }
        FieldKind::Choice => {
            if trimmed.is_empty() {
                return Ok(String::new());
            }
            Ok(match field {
                PlanField::Certification => trimmed.parse::<Certification>()?.code(),
                PlanField::CareLevel => trimmed.parse::<CareLevel>()?.code(),
                PlanField::ResidentSex => trimmed.parse::<Sex>()?.code(),
                _ => trimmed.parse::<HouseworkReason>()?.code(),
            }
            .to_owned())
        }
        FieldKind::Category => {
            value.parse::<PlanCategory>()?;
            Ok(value.to_owned())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Writes a fresh care plan whose 第1表 is `sheet1` (第2表, 第3表 and the entries start empty).
///
/// # Errors
///
/// [`DocumentError::AlreadyInitialized`] when `doc` already holds a schema version; the validation
/// errors of [`set_field`] for a field of `sheet1`; [`DocumentError::Automerge`].
pub fn init(doc: &mut AutoCommit, sheet1: &Sheet1) -> Result<(), DocumentError> {
    if let Some(found) = read_u64(doc, &automerge::ROOT, KEY_SCHEMA_VERSION)? {
        return Err(DocumentError::AlreadyInitialized { found });
    }
    for &field in PlanField::ALL {
        if field.kind() != FieldKind::Category {
            check_field(field, &sheet1.get(field))?;
        }
    }
    doc.put(automerge::ROOT, KEY_KIND, KIND)?;
    doc.put(automerge::ROOT, KEY_SCHEMA_VERSION, SCHEMA_VERSION)?;
    let sheet = doc.put_object(automerge::ROOT, KEY_SHEET1, ObjType::Map)?;
    for section in ["resident", "office", "consent"] {
        doc.put_object(&sheet, section, ObjType::Map)?;
    }
    let category = doc.put_object(&sheet, KEY_CATEGORY, ObjType::Map)?;
    doc.put(&category, "initial", sheet1.category.initial)?;
    doc.put(&category, "referral", sheet1.category.referral)?;
    doc.put(&category, "continuing", sheet1.category.continuing)?;
    for &field in PlanField::ALL {
        let (section, leaf) = field.location();
        let parent = match section {
            Some(name) => map_obj(doc, &sheet, name, name)?,
            None => sheet.clone(),
        };
        match field.kind() {
            FieldKind::Category => {}
            FieldKind::Text => {
                let text = doc.put_object(&parent, leaf, ObjType::Text)?;
                doc.splice_text(&text, 0, 0, &sheet1.get(field))?;
            }
            _ => {
                doc.put(&parent, leaf, sheet1.stored(field))?;
            }
        }
    }
    doc.put_object(automerge::ROOT, KEY_NEEDS, ObjType::Map)?;
    let weekly = doc.put_object(automerge::ROOT, KEY_WEEKLY, ObjType::Map)?;
    doc.put_object(&weekly, KEY_ENTRIES, ObjType::Map)?;
    doc.put_object(&weekly, KEY_ACTIVITIES, ObjType::Map)?;
    doc.put_object(&weekly, KEY_NON_WEEKLY, ObjType::Text)?;
    for list in [KEY_SUPPORT_LOG, KEY_MONITORING, KEY_COMMENTS, KEY_VERSIONS] {
        doc.put_object(automerge::ROOT, list, ObjType::List)?;
    }
    Ok(())
}

/// Sets one field of 第1表. Text fields are updated as a character diff (see the module docs);
/// dates, codes and choices are validated and written as scalars.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for a malformed date, code or postal code or an unknown choice;
/// [`DocumentError::TooLarge`] for text
/// over [`FIELD_TEXT_BYTES_MAX`]; the header errors of [`read`]; [`DocumentError::Automerge`].
pub fn set_field(doc: &mut AutoCommit, field: PlanField, value: &str) -> Result<(), DocumentError> {
    let stored = check_field(field, value)?;
    check_header(doc)?;
    let sheet = map_obj(doc, &automerge::ROOT, KEY_SHEET1, KEY_SHEET1)?;
    let (section, leaf) = field.location();
    let parent = match section {
        Some(name) => map_obj(doc, &sheet, name, name)?,
        None => sheet,
    };
    match field.kind() {
        FieldKind::Text => {
            let text = text_obj(doc, &parent, leaf, field.key())?;
            doc.update_text(&text, &stored)?;
        }
        FieldKind::Category => {
            let wanted: PlanCategory = value.parse()?;
            let category = map_obj(doc, &parent, KEY_CATEGORY, KEY_CATEGORY)?;
            let current = read_category(doc, &category)?;
            for (key, now, want) in [
                ("initial", current.initial, wanted.initial),
                ("referral", current.referral, wanted.referral),
                ("continuing", current.continuing, wanted.continuing),
            ] {
                if now != want {
                    doc.put(&category, key, want)?;
                }
            }
        }
        _ => {
            if read_scalar_str(doc, &parent, leaf)?.as_deref() != Some(stored.as_str()) {
                doc.put(&parent, leaf, stored)?;
            }
        }
    }
    Ok(())
}

/// Adds a need (生活全般の解決すべき課題) with the new `id`.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for a malformed or already used id or an unknown sibling in
/// `placement`; [`DocumentError::TooLarge`] past [`NEEDS_COUNT_MAX`] or for oversized text;
/// the header errors of [`read`]; [`DocumentError::Automerge`].
pub fn add_need(
    doc: &mut AutoCommit,
    id: &str,
    text: &str,
    placement: &Placement,
) -> Result<(), DocumentError> {
    check_text("need.text", text)?;
    check_header(doc)?;
    check_new_id(doc, id)?;
    let needs = map_obj(doc, &automerge::ROOT, KEY_NEEDS, KEY_NEEDS)?;
    let item = insert_item(doc, &needs, id, placement, NEEDS_COUNT_MAX, "needs")?;
    put_text(doc, &item, "text", text)?;
    doc.put_object(&item, KEY_GOALS, ObjType::Map)?;
    Ok(())
}

/// Adds a long-term goal (長期目標 with its （期間）) under the need `need`.
///
/// # Errors
///
/// As [`add_need`]; [`DocumentError::InvalidValue`] when `need` is not a need of this plan.
pub fn add_long_term_goal(
    doc: &mut AutoCommit,
    need: &str,
    id: &str,
    text: &str,
    period: &str,
    placement: &Placement,
) -> Result<(), DocumentError> {
    check_text("goal.text", text)?;
    check_text("goal.period", period)?;
    check_header(doc)?;
    check_new_id(doc, id)?;
    let parent = find_expected(doc, need, ItemKind::Need)?;
    let goals = map_obj(doc, &parent.obj, KEY_GOALS, "needs[].goals")?;
    let item = insert_item(
        doc,
        &goals,
        id,
        placement,
        LONG_GOALS_COUNT_MAX,
        "long-term goals of a need",
    )?;
    put_text(doc, &item, "text", text)?;
    put_text(doc, &item, "period", period)?;
    doc.put_object(&item, KEY_SHORT_GOALS, ObjType::Map)?;
    Ok(())
}

/// Adds a short-term goal (短期目標 with its （期間）) under the long-term goal `long_goal`.
///
/// # Errors
///
/// As [`add_need`]; [`DocumentError::InvalidValue`] when `long_goal` is not a long-term goal.
pub fn add_short_term_goal(
    doc: &mut AutoCommit,
    long_goal: &str,
    id: &str,
    text: &str,
    period: &str,
    placement: &Placement,
) -> Result<(), DocumentError> {
    check_text("goal.text", text)?;
    check_text("goal.period", period)?;
    check_header(doc)?;
    check_new_id(doc, id)?;
    let parent = find_expected(doc, long_goal, ItemKind::LongTermGoal)?;
    let goals = map_obj(doc, &parent.obj, KEY_SHORT_GOALS, "goals[].short_goals")?;
    let item = insert_item(
        doc,
        &goals,
        id,
        placement,
        SHORT_GOALS_COUNT_MAX,
        "short-term goals of a long-term goal",
    )?;
    put_text(doc, &item, "text", text)?;
    put_text(doc, &item, "period", period)?;
    doc.put_object(&item, KEY_SERVICES, ObjType::Map)?;
    Ok(())
}

/// Adds a service row (援助内容) under the short-term goal `short_goal`; `service.id` is ignored in
/// favour of `id`.
///
/// # Errors
///
/// As [`add_need`]; [`DocumentError::InvalidValue`] when `short_goal` is not a short-term goal or
/// the provider code is not 10 digits.
pub fn add_service(
    doc: &mut AutoCommit,
    short_goal: &str,
    id: &str,
    service: &ServiceInput,
    placement: &Placement,
) -> Result<(), DocumentError> {
    for (key, value) in service_texts(service) {
        check_text(&format!("service.{key}"), value)?;
    }
    check_provider_code(&service.provider_code)?;
    check_header(doc)?;
    check_new_id(doc, id)?;
    let parent = find_expected(doc, short_goal, ItemKind::ShortTermGoal)?;
    let services = map_obj(doc, &parent.obj, KEY_SERVICES, "short_goals[].services")?;
    let item = insert_item(
        doc,
        &services,
        id,
        placement,
        SERVICES_COUNT_MAX,
        "services of a short-term goal",
    )?;
    for (key, value) in service_texts(service) {
        put_text(doc, &item, key, value)?;
    }
    doc.put(&item, "insured", service.insured)?;
    doc.put(
        &item,
        "provider_code",
        normalise_digits(service.provider_code.trim()),
    )?;
    Ok(())
}

fn service_texts(service: &Service) -> [(&'static str, &str); 5] {
    [
        ("content", service.content.as_str()),
        ("kind", service.kind.as_str()),
        ("provider", service.provider.as_str()),
        ("frequency", service.frequency.as_str()),
        ("period", service.period.as_str()),
    ]
}

/// Sets one field of the item `id` (a need, goal, service, weekly entry or activity); the valid keys
/// are [`ItemKind::fields`]. Text is updated as a character diff.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown id or a malformed value;
/// [`DocumentError::UnknownField`] for a key the item does not have; [`DocumentError::TooLarge`];
/// the header errors of [`read`]; [`DocumentError::Automerge`].
pub fn set_item_field(
    doc: &mut AutoCommit,
    id: &str,
    key: &str,
    value: &str,
) -> Result<(), DocumentError> {
    check_header(doc)?;
    let item = find_item(doc, id)?;
    if !item.kind.fields().contains(&key) {
        return Err(DocumentError::UnknownField {
            key: key.to_owned(),
            valid: item.kind.fields().join(", "),
        });
    }
    let full = format!("{}.{key}", item.kind.label());
    match (item.kind, key) {
        (ItemKind::Service, "insured") => {
            let insured = parse_bool(value)?;
            doc.put(&item.obj, key, insured)?;
        }
        (ItemKind::Service, "provider_code") => {
            check_provider_code(value)?;
            doc.put(&item.obj, key, normalise_digits(value.trim()))?;
        }
        (ItemKind::WeeklyEntry, "day") => {
            let day: Weekday = value.parse()?;
            doc.put(&item.obj, key, day.as_str())?;
        }
        (ItemKind::WeeklyEntry | ItemKind::Activity, "start" | "end") => {
            let optional = item.kind == ItemKind::Activity && key == "end";
            let time = check_time(key, value, optional)?;
            doc.put(&item.obj, key, time)?;
        }
        _ => {
            check_text(&full, value)?;
            let text = text_obj(doc, &item.obj, key, &full)?;
            doc.update_text(&text, value)?;
        }
    }
    Ok(())
}

/// Moves the item `id` among its siblings (needs among needs, a service among the services of its
/// short-term goal). Only the item's `position` changes, so concurrent edits of the item survive.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown id, an item that is not reorderable (weekly
/// entries sort by time), or a `placement` sibling that is not a sibling; the header errors of
/// [`read`]; [`DocumentError::Automerge`].
pub fn move_item(
    doc: &mut AutoCommit,
    id: &str,
    placement: &Placement,
) -> Result<(), DocumentError> {
    check_header(doc)?;
    let item = find_item(doc, id)?;
    if matches!(item.kind, ItemKind::WeeklyEntry | ItemKind::Activity) {
        return Err(invalid(
            "move",
            format!(
                "{} `{id}` is ordered by its time, not moved",
                item.kind.label()
            ),
        ));
    }
    let position = position_for(doc, &item.parent, Some(id), placement)?;
    doc.put(&item.obj, KEY_POSITION, position)?;
    Ok(())
}

/// Removes the item `id` (with everything under it: a need takes its goals and services along).
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for an unknown id; the header errors of [`read`];
/// [`DocumentError::Automerge`].
pub fn remove_item(doc: &mut AutoCommit, id: &str) -> Result<ItemKind, DocumentError> {
    check_header(doc)?;
    let item = find_item(doc, id)?;
    doc.delete(&item.parent, id)?;
    Ok(item.kind)
}

/// Adds a service to the weekly grid (第3表); `entry.id` is the new id.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for a malformed id or time, or an end before the start;
/// [`DocumentError::TooLarge`] past [`WEEKLY_ENTRIES_COUNT_MAX`]; the header errors of [`read`].
pub fn add_weekly_entry(doc: &mut AutoCommit, entry: &WeeklyEntry) -> Result<(), DocumentError> {
    let start = check_time("start", &entry.start, false)?;
    let end = check_time("end", &entry.end, false)?;
    if end <= start {
        return Err(invalid(
            "end",
            format!("{end} is not after the start {start}"),
        ));
    }
    check_text("weekly.service", &entry.service)?;
    check_header(doc)?;
    check_new_id(doc, &entry.id)?;
    let (entries, activities) = weekly_maps(doc)?;
    check_weekly_room(doc, &entries, &activities)?;
    let item = doc.put_object(&entries, entry.id.as_str(), ObjType::Map)?;
    doc.put(&item, "day", entry.day.as_str())?;
    doc.put(&item, "start", start)?;
    doc.put(&item, "end", end)?;
    put_text(doc, &item, "service", &entry.service)?;
    Ok(())
}

/// Adds an activity to 主な日常生活上の活動; `activity.id` is the new id.
///
/// # Errors
///
/// As [`add_weekly_entry`] (the end is optional).
pub fn add_activity(doc: &mut AutoCommit, activity: &Activity) -> Result<(), DocumentError> {
    let start = check_time("start", &activity.start, false)?;
    let end = check_time("end", &activity.end, true)?;
    if !end.is_empty() && end < start {
        return Err(invalid("end", format!("{end} is before the start {start}")));
    }
    check_text("activity.text", &activity.text)?;
    check_header(doc)?;
    check_new_id(doc, &activity.id)?;
    let (entries, activities) = weekly_maps(doc)?;
    check_weekly_room(doc, &entries, &activities)?;
    let item = doc.put_object(&activities, activity.id.as_str(), ObjType::Map)?;
    doc.put(&item, "start", start)?;
    doc.put(&item, "end", end)?;
    put_text(doc, &item, "text", &activity.text)?;
    Ok(())
}

/// Sets 週単位以外のサービス (character diff).
///
/// # Errors
///
/// [`DocumentError::TooLarge`]; the header errors of [`read`]; [`DocumentError::Automerge`].
pub fn set_non_weekly(doc: &mut AutoCommit, text: &str) -> Result<(), DocumentError> {
    check_text("weekly.non_weekly", text)?;
    check_header(doc)?;
    let weekly = map_obj(doc, &automerge::ROOT, KEY_WEEKLY, KEY_WEEKLY)?;
    let obj = text_obj(doc, &weekly, KEY_NON_WEEKLY, "weekly.non_weekly")?;
    doc.update_text(&obj, text)?;
    Ok(())
}

/// Appends an entry to 第5表 居宅介護支援経過. Entries are never edited or removed.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for a malformed id, date or time; [`DocumentError::TooLarge`]
/// past [`ENTRIES_COUNT_MAX`] or for oversized text; the header errors of [`read`].
pub fn append_log(doc: &mut AutoCommit, entry: &LogEntry) -> Result<(), DocumentError> {
    check_id(&entry.id)?;
    check_required_date("support_log.date", &entry.date)?;
    let time = check_time("support_log.time", &entry.time, true)?;
    check_text("support_log.text", &entry.text)?;
    check_text("support_log.category", &entry.category)?;
    check_header(doc)?;
    let fields = [
        ("id", entry.id.as_str()),
        ("date", entry.date.trim()),
        ("time", time.as_str()),
        ("category", entry.category.as_str()),
        ("text", entry.text.as_str()),
        ("recorded_at", entry.recorded_at.as_str()),
    ];
    append_entry(doc, KEY_SUPPORT_LOG, &fields, &entry.author)
}

/// Appends a monitoring entry.
///
/// # Errors
///
/// As [`append_log`].
pub fn append_monitoring(
    doc: &mut AutoCommit,
    entry: &MonitoringEntry,
) -> Result<(), DocumentError> {
    check_id(&entry.id)?;
    check_required_date("monitoring.date", &entry.date)?;
    check_text("monitoring.text", &entry.text)?;
    check_header(doc)?;
    let fields = [
        ("id", entry.id.as_str()),
        ("date", entry.date.trim()),
        ("goal", entry.goal.as_str()),
        ("text", entry.text.as_str()),
        ("recorded_at", entry.recorded_at.as_str()),
    ];
    append_entry(doc, KEY_MONITORING, &fields, &entry.author)
}

/// Appends a comment.
///
/// # Errors
///
/// As [`append_log`].
pub fn append_comment(doc: &mut AutoCommit, comment: &Comment) -> Result<(), DocumentError> {
    check_id(&comment.id)?;
    check_text("comments.text", &comment.text)?;
    if comment.text.trim().is_empty() {
        return Err(invalid("comments.text", "must not be empty".to_owned()));
    }
    check_header(doc)?;
    let fields = [
        ("id", comment.id.as_str()),
        ("at", comment.at.as_str()),
        ("about", comment.about.as_str()),
        ("text", comment.text.as_str()),
    ];
    append_entry(doc, KEY_COMMENTS, &fields, &comment.author)
}

/// Records the plan as it stands now as a new version and returns its number (1 for the first).
///
/// The version holds the document's current heads, so [`read_version`] reads exactly this state
/// later, whatever is edited afterwards. Its dates are copied for listing.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] for a malformed id; [`DocumentError::TooLarge`] past
/// [`VERSIONS_COUNT_MAX`]; the header errors of [`read`]; [`DocumentError::Automerge`].
pub fn record_version(
    doc: &mut AutoCommit,
    id: &str,
    note: &str,
    author: &Author,
    recorded_at: &str,
) -> Result<usize, DocumentError> {
    check_id(id)?;
    check_text("versions.note", note)?;
    check_header(doc)?;
    let heads = doc.get_heads();
    let sheet = read(doc)?.sheet1;
    let list = list_obj(doc, &automerge::ROOT, KEY_VERSIONS)?;
    let count = doc.length(&list);
    if count >= VERSIONS_COUNT_MAX {
        return Err(too_large("versions (count)", count + 1, VERSIONS_COUNT_MAX));
    }
    let item = doc.insert_object(&list, count, ObjType::Map)?;
    for (key, value) in [
        ("id", id),
        ("created_on", sheet.created_on.as_str()),
        ("changed_on", sheet.changed_on.as_str()),
        ("note", note),
        ("recorded_at", recorded_at),
    ] {
        doc.put(&item, key, value)?;
    }
    put_author(doc, &item, author)?;
    let heads_list = doc.put_object(&item, "heads", ObjType::List)?;
    for (i, head) in heads.iter().enumerate() {
        doc.insert(&heads_list, i, head.to_string())?;
    }
    let versions = read_versions(doc)?;
    Ok(versions
        .iter()
        .find(|v| v.id == id)
        .map_or(versions.len(), |v| v.number))
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads the whole plan from any replica.
///
/// # Errors
///
/// [`DocumentError::WrongKind`] / [`DocumentError::UnsupportedSchema`] when the document is not a
/// care plan this build understands; [`DocumentError::MissingField`] / [`DocumentError::WrongType`]
/// when its content is malformed.
pub fn read(doc: &impl ReadDoc) -> Result<CarePlan, DocumentError> {
    check_header(doc)?;
    Ok(CarePlan {
        sheet1: read_sheet1(doc)?,
        needs: read_needs(doc)?,
        weekly: read_weekly(doc)?,
        support_log: read_support_log(doc)?,
        monitoring: read_monitoring(doc)?,
        comments: read_comments(doc)?,
        versions: read_versions(doc)?,
    })
}

/// Reads version `number` (1-based, as in [`CarePlan::versions`]) as it was when it was recorded.
///
/// # Errors
///
/// [`DocumentError::InvalidValue`] when there is no such version or its heads are not in this
/// document's history; the errors of [`read`].
pub fn read_version(doc: &Automerge, number: usize) -> Result<CarePlan, DocumentError> {
    check_header(doc)?;
    let versions = read_versions(doc)?;
    let version = versions
        .iter()
        .find(|v| v.number == number)
        .ok_or_else(|| {
            invalid(
                "version",
                format!(
                    "there is no version {number} (this plan has {})",
                    versions.len()
                ),
            )
        })?;
    let mut heads = Vec::with_capacity(version.heads.len());
    for head in &version.heads {
        let hash: ChangeHash = head
            .parse()
            .map_err(|_| invalid("versions.heads", format!("`{head}` is not a change hash")))?;
        heads.push(hash);
    }
    if !doc.get_missing_deps(&heads).is_empty() {
        return Err(invalid(
            "version",
            format!("version {number} refers to changes this replica does not hold yet"),
        ));
    }
    let past = doc.fork_at(&heads)?;
    read(&past)
}

/// The kind of item `id` names, if any.
///
/// # Errors
///
/// The header errors of [`read`].
pub fn item_kind(doc: &impl ReadDoc, id: &str) -> Result<Option<ItemKind>, DocumentError> {
    check_header(doc)?;
    Ok(locate(doc, id)?.map(|i| i.kind))
}

impl CarePlan {
    /// Every item id with its kind, in form order (needs, goals, services, then 第3表).
    pub fn items(&self) -> Vec<(&str, ItemKind)> {
        let mut out = Vec::new();
        for need in &self.needs {
            out.push((need.id.as_str(), ItemKind::Need));
            for goal in &need.goals {
                out.push((goal.id.as_str(), ItemKind::LongTermGoal));
                for short in &goal.short_goals {
                    out.push((short.id.as_str(), ItemKind::ShortTermGoal));
                    for service in &short.services {
                        out.push((service.id.as_str(), ItemKind::Service));
                    }
                }
            }
        }
        for entry in &self.weekly.entries {
            out.push((entry.id.as_str(), ItemKind::WeeklyEntry));
        }
        for activity in &self.weekly.activities {
            out.push((activity.id.as_str(), ItemKind::Activity));
        }
        out
    }

    /// Resolves an item id given in full or as a unique prefix of at least 4 characters.
    ///
    /// # Errors
    ///
    /// [`DocumentError::InvalidValue`] when nothing matches or the prefix is ambiguous.
    pub fn resolve_item(&self, id_or_prefix: &str) -> Result<(String, ItemKind), DocumentError> {
        let items = self.items();
        if let Some((id, kind)) = items.iter().find(|(id, _)| *id == id_or_prefix) {
            return Ok(((*id).to_owned(), *kind));
        }
        let matches: Vec<_> = if id_or_prefix.len() >= 4 {
            items
                .iter()
                .filter(|(id, _)| id.starts_with(id_or_prefix))
                .collect()
        } else {
            Vec::new()
        };
        match matches.as_slice() {
            [(id, kind)] => Ok(((*id).to_owned(), *kind)),
            [] => Err(invalid(
                "item",
                format!("no need, goal, service or schedule entry has the id `{id_or_prefix}`"),
            )),
            many => Err(invalid(
                "item",
                format!(
                    "`{id_or_prefix}` matches {} items ({}); give more of the id",
                    many.len(),
                    many.iter()
                        .map(|(id, _)| *id)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

fn read_sheet1(doc: &impl ReadDoc) -> Result<Sheet1, DocumentError> {
    let sheet = map_obj(doc, &automerge::ROOT, KEY_SHEET1, KEY_SHEET1)?;
    let mut out = Sheet1::default();
    for &field in PlanField::ALL {
        let (section, leaf) = field.location();
        let parent = match section {
            Some(name) => map_obj(doc, &sheet, name, name)?,
            None => sheet.clone(),
        };
        let value = match field.kind() {
            FieldKind::Category => {
                let category = map_obj(doc, &parent, KEY_CATEGORY, KEY_CATEGORY)?;
                out.category = read_category(doc, &category)?;
                continue;
            }
            FieldKind::Text => {
                let text = text_obj(doc, &parent, leaf, field.key())?;
                doc.text(&text)?
            }
            _ => read_scalar_str(doc, &parent, leaf)?.unwrap_or_default(),
        };
        match field {
            PlanField::Certification => out.certification = Certification::from_code(&value),
            PlanField::CareLevel => out.care_level = CareLevel::from_code(&value),
            PlanField::ResidentSex => out.resident.sex = Sex::from_code(&value),
            PlanField::HouseworkReason => {
                out.housework_reason = HouseworkReason::from_code(&value);
            }
            other => set_text_unchecked(&mut out, other, value),
        }
    }
    Ok(out)
}

fn set_text_unchecked(sheet: &mut Sheet1, field: PlanField, value: String) {
    use PlanField as F;
    let slot = match field {
        F::CreatedOn => &mut sheet.created_on,
        F::ChangedOn => &mut sheet.changed_on,
        F::FirstCreatedOn => &mut sheet.first_created_on,
        F::CertifiedOn => &mut sheet.certified_on,
        F::ValidFrom => &mut sheet.valid_from,
        F::ValidTo => &mut sheet.valid_to,
        F::ResidentName => &mut sheet.resident.name,
        F::ResidentKana => &mut sheet.resident.kana,
        F::ResidentBirthDate => &mut sheet.resident.birth_date,
        F::ResidentPostalCode => &mut sheet.resident.postal_code,
        F::ResidentAddress => &mut sheet.resident.address,
        F::ResidentPhone => &mut sheet.resident.phone,
        F::InsurerNumber => &mut sheet.insurer_number,
        F::InsuredNumber => &mut sheet.insured_number,
        F::Assessment => &mut sheet.assessment,
        F::CommitteeOpinion => &mut sheet.committee_opinion,
        F::Policy => &mut sheet.policy,
        F::HouseworkReasonOther => &mut sheet.housework_reason_other,
        F::Planner => &mut sheet.planner,
        F::OfficeName => &mut sheet.office.name,
        F::OfficeCode => &mut sheet.office.code,
        F::OfficePostalCode => &mut sheet.office.postal_code,
        F::OfficeAddress => &mut sheet.office.address,
        F::ConsentDate => &mut sheet.consent.date,
        F::ConsentBy => &mut sheet.consent.by,
        F::Category | F::Certification | F::CareLevel | F::ResidentSex | F::HouseworkReason => {
            return;
        }
    };
    *slot = value;
}

fn read_category(doc: &impl ReadDoc, category: &ObjId) -> Result<PlanCategory, DocumentError> {
    Ok(PlanCategory {
        initial: read_bool(doc, category, "initial")?.unwrap_or(false),
        referral: read_bool(doc, category, "referral")?.unwrap_or(false),
        continuing: read_bool(doc, category, "continuing")?.unwrap_or(false),
    })
}

fn read_needs(doc: &impl ReadDoc) -> Result<Vec<Need>, DocumentError> {
    let needs = map_obj(doc, &automerge::ROOT, KEY_NEEDS, KEY_NEEDS)?;
    let mut out = Vec::new();
    for (id, need) in sorted_children(doc, &needs, "needs")? {
        let goals_map = map_obj(doc, &need, KEY_GOALS, "needs[].goals")?;
        let mut goals = Vec::new();
        for (gid, goal) in sorted_children(doc, &goals_map, "goals")? {
            let shorts_map = map_obj(doc, &goal, KEY_SHORT_GOALS, "goals[].short_goals")?;
            let mut short_goals = Vec::new();
            for (sid, short) in sorted_children(doc, &shorts_map, "short_goals")? {
                let services_map = map_obj(doc, &short, KEY_SERVICES, "short_goals[].services")?;
                let mut services = Vec::new();
                for (vid, service) in sorted_children(doc, &services_map, "services")? {
                    services.push(Service {
                        id: vid,
                        content: read_text(doc, &service, "content", "service.content")?,
                        insured: read_bool(doc, &service, "insured")?.unwrap_or(false),
                        kind: read_text(doc, &service, "kind", "service.kind")?,
                        provider: read_text(doc, &service, "provider", "service.provider")?,
                        provider_code: read_scalar_str(doc, &service, "provider_code")?
                            .unwrap_or_default(),
                        frequency: read_text(doc, &service, "frequency", "service.frequency")?,
                        period: read_text(doc, &service, "period", "service.period")?,
                    });
                }
                short_goals.push(ShortTermGoal {
                    id: sid,
                    text: read_text(doc, &short, "text", "short_goal.text")?,
                    period: read_text(doc, &short, "period", "short_goal.period")?,
                    services,
                });
            }
            goals.push(LongTermGoal {
                id: gid,
                text: read_text(doc, &goal, "text", "goal.text")?,
                period: read_text(doc, &goal, "period", "goal.period")?,
                short_goals,
            });
        }
        out.push(Need {
            id,
            text: read_text(doc, &need, "text", "need.text")?,
            goals,
        });
    }
    Ok(out)
}

/// The children of an id-keyed map, sorted by `(position, id)`.
fn sorted_children(
    doc: &impl ReadDoc,
    map: &ObjId,
    what: &str,
) -> Result<Vec<(String, ObjId)>, DocumentError> {
    let mut children = Vec::new();
    for id in doc.keys(map) {
        let obj = match doc.get(map, id.as_str())? {
            Some((Value::Object(ObjType::Map), obj)) => obj,
            _ => return Err(wrong_type(&format!("{what}[{id}]"), "a map")),
        };
        let position = read_scalar_str(doc, &obj, KEY_POSITION)?.unwrap_or_default();
        children.push((position, id, obj));
    }
    children.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    Ok(children.into_iter().map(|(_, id, obj)| (id, obj)).collect())
}

fn read_weekly(doc: &impl ReadDoc) -> Result<WeeklyPlan, DocumentError> {
    let weekly = map_obj(doc, &automerge::ROOT, KEY_WEEKLY, KEY_WEEKLY)?;
    let entries_map = map_obj(doc, &weekly, KEY_ENTRIES, "weekly.entries")?;
    let mut entries = Vec::new();
    for id in doc.keys(&entries_map) {
        let obj = map_obj(doc, &entries_map, &id, "weekly.entries[]")?;
        let day = read_scalar_str(doc, &obj, "day")?.unwrap_or_default();
        entries.push(WeeklyEntry {
            day: day.parse()?,
            start: read_scalar_str(doc, &obj, "start")?.unwrap_or_default(),
            end: read_scalar_str(doc, &obj, "end")?.unwrap_or_default(),
            service: read_text(doc, &obj, "service", "weekly.entries[].service")?,
            id,
        });
    }
    entries.sort_by(|a, b| (a.day, &a.start, &a.end, &a.id).cmp(&(b.day, &b.start, &b.end, &b.id)));
    let activities_map = map_obj(doc, &weekly, KEY_ACTIVITIES, "weekly.activities")?;
    let mut activities = Vec::new();
    for id in doc.keys(&activities_map) {
        let obj = map_obj(doc, &activities_map, &id, "weekly.activities[]")?;
        activities.push(Activity {
            start: read_scalar_str(doc, &obj, "start")?.unwrap_or_default(),
            end: read_scalar_str(doc, &obj, "end")?.unwrap_or_default(),
            text: read_text(doc, &obj, "text", "weekly.activities[].text")?,
            id,
        });
    }
    activities.sort_by(|a, b| (&a.start, &a.end, &a.id).cmp(&(&b.start, &b.end, &b.id)));
    Ok(WeeklyPlan {
        entries,
        activities,
        non_weekly: read_text(doc, &weekly, KEY_NON_WEEKLY, "weekly.non_weekly")?,
    })
}

/// The maps of an append-only list, with duplicate ids collapsed (first in list order wins).
fn list_entries(doc: &impl ReadDoc, key: &str) -> Result<Vec<(String, ObjId)>, DocumentError> {
    let list = list_obj(doc, &automerge::ROOT, key)?;
    let mut out: Vec<(String, ObjId)> = Vec::new();
    for index in 0..doc.length(&list) {
        let obj = match doc.get(&list, index)? {
            Some((Value::Object(ObjType::Map), obj)) => obj,
            _ => return Err(wrong_type(&format!("{key}[]"), "a map")),
        };
        let id = read_scalar_str(doc, &obj, "id")?.unwrap_or_default();
        if !out.iter().any(|(seen, _)| *seen == id) {
            out.push((id, obj));
        }
    }
    Ok(out)
}

fn read_author(doc: &impl ReadDoc, obj: &ObjId) -> Result<Author, DocumentError> {
    Ok(Author {
        facility: read_scalar_str(doc, obj, "facility")?.unwrap_or_default(),
        facility_name: read_scalar_str(doc, obj, "facility_name")?.unwrap_or_default(),
        staff: read_scalar_str(doc, obj, "staff")?.unwrap_or_default(),
    })
}

fn read_support_log(doc: &impl ReadDoc) -> Result<Vec<LogEntry>, DocumentError> {
    let mut out = Vec::new();
    for (id, obj) in list_entries(doc, KEY_SUPPORT_LOG)? {
        let s = |key| -> Result<String, DocumentError> {
            Ok(read_scalar_str(doc, &obj, key)?.unwrap_or_default())
        };
        out.push(LogEntry {
            date: s("date")?,
            time: s("time")?,
            category: s("category")?,
            text: s("text")?,
            author: read_author(doc, &obj)?,
            recorded_at: s("recorded_at")?,
            id,
        });
    }
    out.sort_by(|a, b| {
        (&a.date, &a.time, &a.recorded_at, &a.id).cmp(&(&b.date, &b.time, &b.recorded_at, &b.id))
    });
    Ok(out)
}

fn read_monitoring(doc: &impl ReadDoc) -> Result<Vec<MonitoringEntry>, DocumentError> {
    let mut out = Vec::new();
    for (id, obj) in list_entries(doc, KEY_MONITORING)? {
        let s = |key| -> Result<String, DocumentError> {
            Ok(read_scalar_str(doc, &obj, key)?.unwrap_or_default())
        };
        out.push(MonitoringEntry {
            date: s("date")?,
            goal: s("goal")?,
            text: s("text")?,
            author: read_author(doc, &obj)?,
            recorded_at: s("recorded_at")?,
            id,
        });
    }
    out.sort_by(|a, b| (&a.date, &a.recorded_at, &a.id).cmp(&(&b.date, &b.recorded_at, &b.id)));
    Ok(out)
}

fn read_comments(doc: &impl ReadDoc) -> Result<Vec<Comment>, DocumentError> {
    let mut out = Vec::new();
    for (id, obj) in list_entries(doc, KEY_COMMENTS)? {
        let s = |key| -> Result<String, DocumentError> {
            Ok(read_scalar_str(doc, &obj, key)?.unwrap_or_default())
        };
        out.push(Comment {
            at: s("at")?,
            about: s("about")?,
            text: s("text")?,
            author: read_author(doc, &obj)?,
            id,
        });
    }
    out.sort_by(|a, b| (&a.at, &a.id).cmp(&(&b.at, &b.id)));
    Ok(out)
}

fn read_versions(doc: &impl ReadDoc) -> Result<Vec<VersionInfo>, DocumentError> {
    let mut out = Vec::new();
    for (id, obj) in list_entries(doc, KEY_VERSIONS)? {
        let s = |key| -> Result<String, DocumentError> {
            Ok(read_scalar_str(doc, &obj, key)?.unwrap_or_default())
        };
        let heads_list = list_obj(doc, &obj, "heads")?;
        let mut heads = Vec::new();
        for i in 0..doc.length(&heads_list) {
            match doc.get(&heads_list, i)? {
                Some((Value::Scalar(v), _)) => {
                    heads.push(v.as_str().unwrap_or_default().to_owned());
                }
                _ => return Err(wrong_type("versions[].heads[]", "a string")),
            }
        }
        out.push(VersionInfo {
            number: 0,
            created_on: s("created_on")?,
            changed_on: s("changed_on")?,
            note: s("note")?,
            author: read_author(doc, &obj)?,
            recorded_at: s("recorded_at")?,
            heads,
            id,
        });
    }
    out.sort_by(|a, b| (&a.recorded_at, &a.id).cmp(&(&b.recorded_at, &b.id)));
    for (i, v) in out.iter_mut().enumerate() {
        v.number = i + 1;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Items: lookup and positions
// ---------------------------------------------------------------------------------------------

/// Where an item lives: its own map and the id-keyed map it is a value of.
struct ItemRef {
    kind: ItemKind,
    obj: ObjId,
    parent: ObjId,
}

fn locate(doc: &impl ReadDoc, id: &str) -> Result<Option<ItemRef>, DocumentError> {
    let child = |parent: &ObjId| -> Result<Option<ObjId>, DocumentError> {
        match doc.get(parent, id)? {
            Some((Value::Object(ObjType::Map), obj)) => Ok(Some(obj)),
            _ => Ok(None),
        }
    };
    let found = |kind, obj, parent: &ObjId| {
        Ok(Some(ItemRef {
            kind,
            obj,
            parent: parent.clone(),
        }))
    };
    let needs = map_obj(doc, &automerge::ROOT, KEY_NEEDS, KEY_NEEDS)?;
    if let Some(obj) = child(&needs)? {
        return found(ItemKind::Need, obj, &needs);
    }
    for need_id in doc.keys(&needs) {
        let need = map_obj(doc, &needs, &need_id, "needs[]")?;
        let goals = map_obj(doc, &need, KEY_GOALS, "needs[].goals")?;
        if let Some(obj) = child(&goals)? {
            return found(ItemKind::LongTermGoal, obj, &goals);
        }
        for goal_id in doc.keys(&goals) {
            let goal = map_obj(doc, &goals, &goal_id, "goals[]")?;
            let shorts = map_obj(doc, &goal, KEY_SHORT_GOALS, "goals[].short_goals")?;
            if let Some(obj) = child(&shorts)? {
                return found(ItemKind::ShortTermGoal, obj, &shorts);
            }
            for short_id in doc.keys(&shorts) {
                let short = map_obj(doc, &shorts, &short_id, "short_goals[]")?;
                let services = map_obj(doc, &short, KEY_SERVICES, "short_goals[].services")?;
                if let Some(obj) = child(&services)? {
                    return found(ItemKind::Service, obj, &services);
                }
            }
        }
    }
    let weekly = map_obj(doc, &automerge::ROOT, KEY_WEEKLY, KEY_WEEKLY)?;
    let entries = map_obj(doc, &weekly, KEY_ENTRIES, "weekly.entries")?;
    if let Some(obj) = child(&entries)? {
        return found(ItemKind::WeeklyEntry, obj, &entries);
    }
    let activities = map_obj(doc, &weekly, KEY_ACTIVITIES, "weekly.activities")?;
    if let Some(obj) = child(&activities)? {
        return found(ItemKind::Activity, obj, &activities);
    }
    Ok(None)
}

fn find_item(doc: &impl ReadDoc, id: &str) -> Result<ItemRef, DocumentError> {
    locate(doc, id)?.ok_or_else(|| {
        invalid(
            "item",
            format!("no need, goal, service or schedule entry has the id `{id}`"),
        )
    })
}

fn find_expected(doc: &impl ReadDoc, id: &str, kind: ItemKind) -> Result<ItemRef, DocumentError> {
    let item = find_item(doc, id)?;
    if item.kind != kind {
        return Err(invalid(
            "parent",
            format!(
                "`{id}` is a {} ({:?}), not a {} ({kind:?})",
                item.kind.label(),
                item.kind,
                kind.label()
            ),
        ));
    }
    Ok(item)
}

fn check_new_id(doc: &impl ReadDoc, id: &str) -> Result<(), DocumentError> {
    check_id(id)?;
    if locate(doc, id)?.is_some() {
        return Err(invalid(
            "id",
            format!("`{id}` is already used in this plan"),
        ));
    }
    Ok(())
}

/// Creates the item map `id` in `map` at `placement`, checking the sibling count.
fn insert_item(
    doc: &mut AutoCommit,
    map: &ObjId,
    id: &str,
    placement: &Placement,
    max: usize,
    what: &str,
) -> Result<ObjId, DocumentError> {
    let count = doc.keys(map).count();
    if count >= max {
        return Err(too_large(&format!("{what} (count)"), count + 1, max));
    }
    let position = position_for(doc, map, None, placement)?;
    let item = doc.put_object(map, id, ObjType::Map)?;
    doc.put(&item, KEY_POSITION, position)?;
    Ok(item)
}

/// The position for an item placed at `placement` among the children of `map` (`moving`: the item
/// being moved, left out of the siblings). Renumbers the siblings when they tie or a key grows too long.
fn position_for(
    doc: &mut AutoCommit,
    map: &ObjId,
    moving: Option<&str>,
    placement: &Placement,
) -> Result<String, DocumentError> {
    for attempt in 0..2 {
        let siblings: Vec<(String, String)> = sorted_children(doc, map, "siblings")?
            .into_iter()
            .filter(|(id, _)| Some(id.as_str()) != moving)
            .map(|(id, obj)| {
                let pos = read_scalar_str(doc, &obj, KEY_POSITION)?.unwrap_or_default();
                Ok((id, pos))
            })
            .collect::<Result<_, DocumentError>>()?;
        let index = match placement {
            Placement::First => 0,
            Placement::Last => siblings.len(),
            Placement::Before(other) | Placement::After(other) => {
                let at = siblings
                    .iter()
                    .position(|(id, _)| id == other)
                    .ok_or_else(|| {
                        invalid(
                            "placement",
                            format!(
                                "`{other}` is not a sibling of the item (same need, goal or list)"
                            ),
                        )
                    })?;
                if matches!(placement, Placement::After(_)) {
                    at + 1
                } else {
                    at
                }
            }
        };
        let before = index.checked_sub(1).map(|i| siblings[i].1.as_str());
        let after = siblings.get(index).map(|(_, p)| p.as_str());
        if let Some(key) = key_between(before, after)
            && key.len() <= POSITION_BYTES_MAX
        {
            return Ok(key);
        }
        if attempt == 0 {
            renumber(doc, map, &siblings)?;
        }
    }
    Err(invalid(
        "position",
        "could not find a position even after renumbering the siblings".to_owned(),
    ))
}

/// Gives `siblings` (in their current order) fresh, short, evenly growing positions.
fn renumber(
    doc: &mut AutoCommit,
    map: &ObjId,
    siblings: &[(String, String)],
) -> Result<(), DocumentError> {
    let mut previous: Option<String> = None;
    for (id, _) in siblings {
        let key = key_between(previous.as_deref(), None)
            .ok_or_else(|| invalid("position", "renumbering failed".to_owned()))?;
        let obj = map_obj(doc, map, id, "siblings[]")?;
        doc.put(&obj, KEY_POSITION, key.as_str())?;
        previous = Some(key);
    }
    Ok(())
}

const POSITION_DIGITS: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn digit_value(c: u8) -> Option<usize> {
    POSITION_DIGITS.iter().position(|&d| d == c)
}

/// A fractional index strictly between `a` and `b` (`None`: the open ends), as base-62 digits
/// (`0-9A-Za-z`, in ASCII order) read as the fraction `0.d1d2d3…`; it never ends in `0`, so
/// there is always room for another key before it.
///
/// Returns `None` when `a >= b` or a key is not made of position digits (or ends in `0`).
pub fn key_between(a: Option<&str>, b: Option<&str>) -> Option<String> {
    let valid =
        |k: &str| !k.is_empty() && k.bytes().all(|c| digit_value(c).is_some()) && !k.ends_with('0');
    let a = a.unwrap_or("");
    if (!a.is_empty() && !valid(a)) || b.is_some_and(|b| !valid(b)) {
        return None;
    }
    if let Some(b) = b
        && a >= b
    {
        return None;
    }
    let key = midpoint(a.as_bytes(), b.map(str::as_bytes));
    String::from_utf8(key).ok()
}

/// The midpoint of the fractions `a` < `b` (`b`: `None` for 1.0), both without trailing zeros.
fn midpoint(a: &[u8], b: Option<&[u8]>) -> Vec<u8> {
    if let Some(b) = b {
        let mut n = 0;
        while n < b.len() && a.get(n).copied().unwrap_or(b'0') == b[n] {
            n += 1;
        }
        if n > 0 {
            let mut out = b[..n].to_vec();
            out.extend(midpoint(a.get(n..).unwrap_or(&[]), Some(&b[n..])));
            return out;
        }
    }
    let da = a.first().and_then(|&c| digit_value(c)).unwrap_or(0);
    let db = b
        .and_then(|b| b.first())
        .and_then(|&c| digit_value(c))
        .unwrap_or(POSITION_DIGITS.len());
    if db - da > 1 {
        vec![POSITION_DIGITS[(da + db) / 2]]
    } else if let Some(b) = b
        && b.len() > 1
    {
        vec![b[0]]
    } else {
        let mut out = vec![POSITION_DIGITS[da]];
        out.extend(midpoint(a.get(1..).unwrap_or(&[]), None));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn weekly_maps(doc: &impl ReadDoc) -> Result<(ObjId, ObjId), DocumentError> {
    let weekly = map_obj(doc, &automerge::ROOT, KEY_WEEKLY, KEY_WEEKLY)?;
    Ok((
        map_obj(doc, &weekly, KEY_ENTRIES, "weekly.entries")?,
        map_obj(doc, &weekly, KEY_ACTIVITIES, "weekly.activities")?,
    ))
}

fn check_weekly_room(
    doc: &impl ReadDoc,
    entries: &ObjId,
    activities: &ObjId,
) -> Result<(), DocumentError> {
    let count = doc.keys(entries).count() + doc.keys(activities).count();
    if count >= WEEKLY_ENTRIES_COUNT_MAX {
        return Err(too_large(
            "weekly entries (count)",
            count + 1,
            WEEKLY_ENTRIES_COUNT_MAX,
        ));
    }
    Ok(())
}

fn append_entry(
    doc: &mut AutoCommit,
    list_key: &str,
    fields: &[(&str, &str)],
    author: &Author,
) -> Result<(), DocumentError> {
    let list = list_obj(doc, &automerge::ROOT, list_key)?;
    let count = doc.length(&list);
    if count >= ENTRIES_COUNT_MAX {
        return Err(too_large(
            &format!("{list_key} (count)"),
            count + 1,
            ENTRIES_COUNT_MAX,
        ));
    }
    let item = doc.insert_object(&list, count, ObjType::Map)?;
    for (key, value) in fields {
        doc.put(&item, *key, *value)?;
    }
    put_author(doc, &item, author)
}

fn put_author(doc: &mut AutoCommit, obj: &ObjId, author: &Author) -> Result<(), DocumentError> {
    for (key, value) in [
        ("facility", &author.facility),
        ("facility_name", &author.facility_name),
        ("staff", &author.staff),
    ] {
        check_text(&format!("author.{key}"), value)?;
        doc.put(obj, key, value.as_str())?;
    }
    Ok(())
}

fn put_text(doc: &mut AutoCommit, obj: &ObjId, key: &str, text: &str) -> Result<(), DocumentError> {
    let t = doc.put_object(obj, key, ObjType::Text)?;
    doc.splice_text(&t, 0, 0, text)?;
    Ok(())
}

fn check_header(doc: &impl ReadDoc) -> Result<(), DocumentError> {
    common::check_header(doc, KIND, SCHEMA_VERSION)
}

fn read_scalar_str(
    doc: &impl ReadDoc,
    obj: &ObjId,
    key: &str,
) -> Result<Option<String>, DocumentError> {
    match doc.get(obj, key)? {
        None => Ok(None),
        Some((Value::Scalar(value), _)) => match value.as_ref() {
            ScalarValue::Str(s) => Ok(Some(s.to_string())),
            _ => Err(wrong_type(key, "a string")),
        },
        Some((Value::Object(_), _)) => Err(wrong_type(key, "a string")),
    }
}

fn read_bool(doc: &impl ReadDoc, obj: &ObjId, key: &str) -> Result<Option<bool>, DocumentError> {
    match doc.get(obj, key)? {
        None => Ok(None),
        Some((Value::Scalar(value), _)) => match value.as_ref() {
            ScalarValue::Boolean(b) => Ok(Some(*b)),
            _ => Err(wrong_type(key, "a boolean")),
        },
        Some((Value::Object(_), _)) => Err(wrong_type(key, "a boolean")),
    }
}

fn map_obj(
    doc: &impl ReadDoc,
    parent: &ObjId,
    key: &str,
    full: &str,
) -> Result<ObjId, DocumentError> {
    match doc.get(parent, key)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        Some(_) => Err(wrong_type(full, "a map")),
        None => Err(missing(full)),
    }
}

fn list_obj(doc: &impl ReadDoc, parent: &ObjId, key: &str) -> Result<ObjId, DocumentError> {
    match doc.get(parent, key)? {
        Some((Value::Object(ObjType::List), id)) => Ok(id),
        Some(_) => Err(wrong_type(key, "a list")),
        None => Err(missing(key)),
    }
}

fn text_obj(
    doc: &impl ReadDoc,
    parent: &ObjId,
    key: &str,
    full: &str,
) -> Result<ObjId, DocumentError> {
    match doc.get(parent, key)? {
        Some((Value::Object(ObjType::Text), id)) => Ok(id),
        Some(_) => Err(wrong_type(full, "a text object")),
        None => Err(missing(full)),
    }
}

fn read_text(
    doc: &impl ReadDoc,
    parent: &ObjId,
    key: &str,
    full: &str,
) -> Result<String, DocumentError> {
    let obj = text_obj(doc, parent, key, full)?;
    Ok(doc.text(&obj)?)
}

/// Ids are 1..=[`ID_BYTES_MAX`] of `[0-9a-z-]` (callers use random hex).
fn check_id(id: &str) -> Result<(), DocumentError> {
    let ok = !id.is_empty()
        && id.len() <= ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
    if !ok {
        return Err(invalid(
            "id",
            format!("`{id}` is not an id (1 to {ID_BYTES_MAX} of 0-9, a-z, -)"),
        ));
    }
    Ok(())
}

fn check_text(key: &str, text: &str) -> Result<(), DocumentError> {
    if text.len() > FIELD_TEXT_BYTES_MAX {
        return Err(too_large(
            &format!("field {key} (bytes)"),
            text.len(),
            FIELD_TEXT_BYTES_MAX,
        ));
    }
    Ok(())
}

fn check_provider_code(code: &str) -> Result<(), DocumentError> {
    let code = normalise_digits(code.trim());
    if code.is_empty() || (code.len() == 10 && code.bytes().all(|b| b.is_ascii_digit())) {
        Ok(())
    } else {
        Err(invalid(
            "service.provider_code",
            format!("`{code}` is not a 10-digit office number"),
        ))
    }
}

fn check_required_date(key: &str, date: &str) -> Result<(), DocumentError> {
    if is_date(date.trim()) {
        Ok(())
    } else {
        Err(invalid(key, format!("`{date}` is not a date YYYY-MM-DD")))
    }
}

/// `YYYY-MM-DD` with a real month and day (leap years included).
pub fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        s.get(r)
            .filter(|p| p.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// Validates a time `H:MM` or `HH:MM` (00:00 to 24:00) and returns it as `HH:MM`.
fn check_time(key: &str, value: &str, optional: bool) -> Result<String, DocumentError> {
    let v = normalise_digits(value.trim()).replace('：', ":");
    if v.is_empty() && optional {
        return Ok(String::new());
    }
    let parsed = v.split_once(':').and_then(|(h, m)| {
        let h: u32 = h.parse().ok().filter(|_| (1..=2).contains(&h.len()))?;
        let m: u32 = m.parse().ok().filter(|_| m.len() == 2)?;
        (h < 24 && m < 60 || h == 24 && m == 0).then_some((h, m))
    });
    match parsed {
        Some((h, m)) => Ok(format!("{h:02}:{m:02}")),
        None => Err(invalid(
            key,
            format!("`{value}` is not a time HH:MM (00:00 to 24:00)"),
        )),
    }
}

fn parse_bool(value: &str) -> Result<bool, DocumentError> {
    match value.trim().to_lowercase().as_str() {
        "true" | "yes" | "y" | "1" | "○" | "〇" | "対象" => Ok(true),
        "false" | "no" | "n" | "0" | "×" | "" | "対象外" => Ok(false),
        other => Err(invalid(
            "service.insured",
            format!("`{other}` is not yes/no (○/×)"),
        )),
    }
}

/// Full-width digits and hyphens (as typed with a Japanese IME) to ASCII.
fn normalise_digits(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '０'..='９' => char::from_u32(c as u32 - '０' as u32 + '0' as u32).unwrap_or(c),
            '－' | 'ー' | '‐' | '−' => '-',
            'Ｈ' => 'H',
            _ => c,
        })
        .collect()
}

fn invalid(key: &str, reason: String) -> DocumentError {
    DocumentError::InvalidValue {
        key: key.to_owned(),
        reason,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use automerge::ActorId;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn field_keys_labels_and_inputs_are_complete() {
        for &field in PlanField::ALL {
            let json = serde_json::to_value(field).expect("serialise");
            assert_eq!(json, field.key());
            assert_eq!(
                serde_json::from_value::<PlanField>(json).expect("deserialise"),
                field
            );
            assert!(!field.label().is_empty(), "{field}");
            let choice = matches!(field.input(), FieldInput::Choice | FieldInput::Category);
            assert_eq!(choice, !field.options().is_empty(), "{field}");
            assert_eq!(
                field.input() == FieldInput::Digits,
                field.digits().is_some()
            );
            for option in field.options() {
                let mut sheet = Sheet1::default();
                sheet.set(field, option).expect("every option is accepted");
                assert!(sheet.get(field).contains(option), "{field}: {option}");
            }
        }
        assert_eq!(PlanField::Policy.label(), "総合的な援助の方針");
        for kind in ItemKind::ALL {
            for key in kind.fields() {
                assert!(kind.field_label(key).is_some(), "{kind:?}.{key}");
            }
            assert_eq!(kind.field_label("bogus"), None);
        }
    }

    #[test]
    fn choices_serialise_as_the_forms_words() {
        let mut sheet = Sheet1::default();
        sheet.set(PlanField::CareLevel, "care-2").expect("alias");
        sheet.set(PlanField::ResidentSex, "女").expect("sex");
        let json = serde_json::to_value(&sheet).expect("serialise");
        assert_eq!(json["care_level"], "要介護2");
        assert_eq!(json["resident"]["sex"], "女");
        assert_eq!(json["certification"], serde_json::Value::Null);
        let back: Sheet1 = serde_json::from_value(json).expect("deserialise");
        assert_eq!(back, sheet);
    }

    fn actor(name: &str) -> ActorId {
        ActorId::from(name.as_bytes())
    }

    fn author(facility: &str, staff: &str) -> Author {
        Author {
            facility: format!("{facility}-id"),
            facility_name: facility.to_owned(),
            staff: staff.to_owned(),
        }
    }

    pub(crate) fn sample_sheet1() -> Sheet1 {
        let mut s = Sheet1::default();
        for (field, value) in [
            (PlanField::CreatedOn, "2025-04-01"),
            (PlanField::ChangedOn, "2025-04-01"),
            (PlanField::FirstCreatedOn, "2024-04-01"),
            (PlanField::Category, "継続"),
            (PlanField::Certification, "認定済"),
            (PlanField::CertifiedOn, "2025-03-25"),
            (PlanField::ValidFrom, "2025-04-01"),
            (PlanField::ValidTo, "2026-03-31"),
            (PlanField::CareLevel, "要介護2"),
            (PlanField::ResidentName, "山田 花子"),
            (PlanField::ResidentKana, "ヤマダ ハナコ"),
            (PlanField::ResidentSex, "女"),
            (PlanField::ResidentBirthDate, "1940-02-29"),
            (PlanField::ResidentPostalCode, "945-0011"),
            (PlanField::ResidentAddress, "新潟県柏崎市松波１－２－３"),
            (PlanField::ResidentPhone, "0257-00-0000"),
            (PlanField::InsurerNumber, "152056"),
            (PlanField::InsuredNumber, "0000123456"),
            (PlanField::Assessment, "自宅で夫と暮らし続けたい。"),
            (PlanField::CommitteeOpinion, "特になし"),
            (
                PlanField::Policy,
                "転倒を防ぎ、在宅生活を続けられるよう支援します。",
            ),
            (PlanField::HouseworkReason, "一人暮らし"),
            (PlanField::Planner, "佐藤 ケア子"),
            (PlanField::OfficeName, "みなと居宅介護支援事業所"),
            (PlanField::OfficeCode, "1570000001"),
            (PlanField::OfficePostalCode, "945-0051"),
            (PlanField::OfficeAddress, "新潟県柏崎市東本町１－１"),
        ] {
            s.set(field, value).expect("valid sample value");
        }
        s
    }

    fn new_doc() -> AutoCommit {
        let mut doc = AutoCommit::new().with_actor(actor("care-office"));
        init(&mut doc, &sample_sheet1()).expect("init");
        doc
    }

    fn service(content: &str) -> Service {
        Service {
            content: content.to_owned(),
            insured: true,
            kind: "訪問介護".to_owned(),
            provider: "ひまわりヘルパーステーション".to_owned(),
            provider_code: "1570000002".to_owned(),
            frequency: "週2回".to_owned(),
            period: "2025-04-01〜2025-09-30".to_owned(),
            ..Service::default()
        }
    }

    /// Needs n1..n3, each with one long goal gN, one short goal sN and one service vN.
    fn with_needs() -> AutoCommit {
        let mut doc = new_doc();
        for n in 1..=3 {
            let need = format!("n{n}");
            add_need(&mut doc, &need, &format!("課題{n}"), &Placement::Last).expect("need");
            add_long_term_goal(
                &mut doc,
                &need,
                &format!("g{n}"),
                &format!("長期{n}"),
                "1年",
                &Placement::Last,
            )
            .expect("long goal");
            add_short_term_goal(
                &mut doc,
                &format!("g{n}"),
                &format!("s{n}"),
                &format!("短期{n}"),
                "6か月",
                &Placement::Last,
            )
            .expect("short goal");
            add_service(
                &mut doc,
                &format!("s{n}"),
                &format!("v{n}"),
                &service(&format!("サービス{n}")),
                &Placement::Last,
            )
            .expect("service");
        }
        doc
    }

    fn need_ids(doc: &AutoCommit) -> Vec<String> {
        read(doc)
            .expect("read")
            .needs
            .into_iter()
            .map(|n| n.id)
            .collect()
    }

    fn log(id: &str, date: &str, text: &str, who: &Author, at: &str) -> LogEntry {
        LogEntry {
            id: id.to_owned(),
            date: date.to_owned(),
            time: String::new(),
            category: "訪問".to_owned(),
            text: text.to_owned(),
            author: who.clone(),
            recorded_at: at.to_owned(),
        }
    }

    #[test]
    fn a_written_plan_reads_back_field_for_field() {
        let doc = new_doc();
        let plan = read(&doc).expect("read");
        assert_eq!(plan.sheet1, sample_sheet1());
        assert_eq!(plan.sheet1.care_level, Some(CareLevel::Care2));
        assert_eq!(plan.sheet1.category.code(), Some("21"));
        assert!(plan.needs.is_empty() && plan.support_log.is_empty() && plan.versions.is_empty());
        for &field in PlanField::ALL {
            assert_eq!(field.key().parse::<PlanField>().expect("own key"), field);
        }
        let json = serde_json::to_value(&plan).expect("json");
        assert_eq!(json["sheet1"]["care_level"], "要介護2");
        assert_eq!(json["sheet1"]["resident"]["name"], "山田 花子");
        assert_eq!(json["sheet1"]["certification"], "認定済");
        let loaded = AutoCommit::load(&doc.clone().save()).expect("load");
        assert_eq!(read(&loaded).expect("read loaded"), plan);
    }

    #[test]
    fn fields_are_validated_and_choices_parse_from_words_codes_and_aliases() {
        let mut doc = new_doc();
        set_field(&mut doc, PlanField::CareLevel, "23").expect("code");
        assert_eq!(
            read(&doc).expect("read").sheet1.care_level,
            Some(CareLevel::Care3)
        );
        set_field(&mut doc, PlanField::CareLevel, "要介護５").expect("full-width digit");
        assert_eq!(
            read(&doc).expect("read").sheet1.care_level,
            Some(CareLevel::Care5)
        );
        set_field(&mut doc, PlanField::CareLevel, "support-1").expect("alias");
        assert_eq!(
            read(&doc).expect("read").sheet1.care_level,
            Some(CareLevel::Support1)
        );
        set_field(&mut doc, PlanField::Category, "初回,紹介").expect("category");
        assert_eq!(read(&doc).expect("read").sheet1.category.code(), Some("51"));
        set_field(&mut doc, PlanField::InsuredNumber, "H123456789").expect("public assistance");
        set_field(&mut doc, PlanField::ResidentPostalCode, "９４５－００１１").expect("full width");
        assert_eq!(
            read(&doc).expect("read").sheet1.resident.postal_code,
            "945-0011"
        );
        set_field(&mut doc, PlanField::ValidTo, "").expect("dates may be cleared");

        for (field, bad) in [
            (PlanField::CreatedOn, "2025-02-30"),
            (PlanField::CreatedOn, "R7.4.1"),
            (PlanField::InsurerNumber, "12345"),
            (PlanField::OfficeCode, "15700000ab"),
            (PlanField::ResidentPostalCode, "9450011"),
        ] {
            let err = set_field(&mut doc, field, bad).expect_err("must refuse");
            assert!(
                matches!(err, DocumentError::InvalidValue { .. }),
                "{field}: {err}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
        let err = set_field(&mut doc, PlanField::CareLevel, "要介護6").expect_err("unknown level");
        assert!(err.to_string().contains("要介護5"), "{err}");
        let err = "resident.blood_type"
            .parse::<PlanField>()
            .expect_err("unknown key");
        assert!(err.to_string().contains("consent.by"), "{err}");
        let long = "あ".repeat(FIELD_TEXT_BYTES_MAX / 3 + 1);
        assert!(matches!(
            set_field(&mut doc, PlanField::Policy, &long),
            Err(DocumentError::TooLarge { .. })
        ));
    }

    #[test]
    fn sheet2_nests_needs_goals_and_services_in_the_order_given() {
        let mut doc = with_needs();
        add_need(&mut doc, "n0", "課題0", &Placement::First).expect("first");
        add_need(
            &mut doc,
            "n15",
            "課題1.5",
            &Placement::After("n1".to_owned()),
        )
        .expect("after");
        add_service(
            &mut doc,
            "s1",
            "v1b",
            &service("サービス1b"),
            &Placement::Before("v1".to_owned()),
        )
        .expect("before");
        let plan = read(&doc).expect("read");
        assert_eq!(need_ids(&doc), ["n0", "n1", "n15", "n2", "n3"]);
        let services: Vec<&str> = plan.needs[1].goals[0].short_goals[0]
            .services
            .iter()
            .map(|s| s.id.as_str())
            .collect();
        assert_eq!(services, ["v1b", "v1"]);
        assert_eq!(plan.needs[1].goals[0].text, "長期1");
        assert_eq!(plan.needs[1].goals[0].short_goals[0].period, "6か月");
        assert!(plan.needs[1].goals[0].short_goals[0].services[1].insured);

        // Wrong parents, reused ids and unknown siblings are refused.
        assert!(add_long_term_goal(&mut doc, "s1", "gx", "x", "", &Placement::Last).is_err());
        assert!(add_need(&mut doc, "v1", "dup", &Placement::Last).is_err());
        assert!(add_need(&mut doc, "Bad Id", "x", &Placement::Last).is_err());
        assert!(move_item(&mut doc, "v1", &Placement::Before("n2".to_owned())).is_err());

        set_item_field(&mut doc, "v1", "insured", "×").expect("not insured");
        set_item_field(&mut doc, "v1", "frequency", "週3回").expect("frequency");
        let err = set_item_field(&mut doc, "v1", "colour", "red").expect_err("no such key");
        assert!(err.to_string().contains("frequency"), "{err}");
        let plan = read(&doc).expect("read");
        let v1 = &plan.needs[1].goals[0].short_goals[0].services[1];
        assert!(!v1.insured);
        assert_eq!(v1.frequency, "週3回");

        assert_eq!(remove_item(&mut doc, "n2").expect("remove"), ItemKind::Need);
        assert_eq!(need_ids(&doc), ["n0", "n1", "n15", "n3"]);
        assert_eq!(
            item_kind(&doc, "v2").expect("lookup"),
            None,
            "a need takes its services along"
        );
    }

    #[test]
    fn two_replicas_reorder_add_and_edit_offline_and_lose_nothing() {
        let mut base = with_needs();
        let mut office = base.fork().with_actor(actor("office-laptop"));
        let mut clinic = base.fork().with_actor(actor("clinic"));
        let office_author = author("みなと居宅介護支援事業所", "佐藤");
        let clinic_author = author("港診療所", "大河内医師");

        // The care manager, offline at the resident's home: moves 課題3 to the top, adds 課題4,
        // edits 課題1 at its end and adds a service before サービス1.
        move_item(&mut office, "n3", &Placement::First).expect("move");
        add_need(&mut office, "n4", "課題4", &Placement::Last).expect("add");
        set_item_field(&mut office, "n1", "text", "課題1（入浴）").expect("edit");
        add_service(
            &mut office,
            "s1",
            "v1o",
            &service("見守り"),
            &Placement::First,
        )
        .expect("service");
        append_log(
            &mut office,
            &log(
                "l-office",
                "2025-04-10",
                "自宅訪問。",
                &office_author,
                "2025-04-10T10:00:00+09:00",
            ),
        )
        .expect("log");

        // The clinic, offline too: moves 課題1 to the end, edits its text at the start, adds 課題5,
        // writes 支援経過 and a comment.
        move_item(&mut clinic, "n1", &Placement::Last).expect("move");
        set_item_field(&mut clinic, "n1", "text", "【主治医】課題1").expect("edit");
        add_need(&mut clinic, "n5", "課題5", &Placement::Last).expect("add");
        append_log(
            &mut clinic,
            &log(
                "l-clinic",
                "2025-04-09",
                "往診。血圧安定。",
                &clinic_author,
                "2025-04-09T15:00:00+09:00",
            ),
        )
        .expect("log");
        append_comment(
            &mut clinic,
            &Comment {
                id: "c1".to_owned(),
                at: "2025-04-09T15:05:00+09:00".to_owned(),
                about: "n1".to_owned(),
                text: "入浴時の血圧に注意してください。".to_owned(),
                author: clinic_author.clone(),
            },
        )
        .expect("comment");

        office.merge(&mut clinic).expect("merge clinic into office");
        clinic.merge(&mut office).expect("merge office into clinic");
        let merged = read(&office).expect("read merged");
        assert_eq!(
            merged,
            read(&clinic).expect("read other side"),
            "both replicas converge"
        );

        let ids = need_ids(&office);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["n1", "n2", "n3", "n4", "n5"],
            "every need exactly once: {ids:?}"
        );
        assert_eq!(
            ids.first().map(String::as_str),
            Some("n3"),
            "the office's move holds: {ids:?}"
        );
        let n1 = merged.needs.iter().find(|n| n.id == "n1").expect("n1");
        assert_eq!(
            n1.text, "【主治医】課題1（入浴）",
            "both edits of the moved need survive"
        );
        let services: Vec<&str> = n1.goals[0].short_goals[0]
            .services
            .iter()
            .map(|s| s.id.as_str())
            .collect();
        assert_eq!(services, ["v1o", "v1"]);
        // 課題4 and 課題5 were both appended after 課題3 concurrently: same position, ordered by id.
        let n4 = ids.iter().position(|i| i == "n4").expect("n4");
        let n5 = ids.iter().position(|i| i == "n5").expect("n5");
        assert!(n4 < n5, "{ids:?}");

        let log_ids: Vec<&str> = merged.support_log.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            log_ids,
            ["l-clinic", "l-office"],
            "支援経過 sorted by date, both kept"
        );
        assert_eq!(merged.support_log[0].author, clinic_author);
        assert_eq!(merged.comments.len(), 1);
    }

    #[test]
    fn the_same_item_moved_twice_concurrently_exists_once() {
        let mut a = with_needs();
        let mut b = a.fork().with_actor(actor("b"));
        move_item(&mut a, "n2", &Placement::First).expect("a moves");
        move_item(&mut b, "n2", &Placement::Last).expect("b moves");
        set_item_field(&mut b, "n2", "text", "課題2（改）").expect("b edits");
        a.merge(&mut b).expect("merge");
        b.merge(&mut a).expect("merge back");
        let ids = need_ids(&a);
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert_eq!(ids.iter().filter(|i| *i == "n2").count(), 1);
        assert_eq!(ids, need_ids(&b));
        let plan = read(&a).expect("read");
        assert_eq!(
            plan.needs.iter().find(|n| n.id == "n2").expect("n2").text,
            "課題2（改）"
        );
    }

    #[test]
    fn long_or_tied_positions_are_renumbered_without_reordering() {
        let mut doc = new_doc();
        add_need(&mut doc, "first", "first", &Placement::Last).expect("first");
        add_need(&mut doc, "last", "last", &Placement::Last).expect("last");
        // Always insert right after `first`: keys grow until the siblings are renumbered.
        let mut expected = vec!["first".to_owned()];
        for i in 0..97 {
            let id = format!("x{i:02}");
            add_need(&mut doc, &id, &id, &Placement::After("first".to_owned())).expect("insert");
            expected.insert(1, id);
        }
        expected.push("last".to_owned());
        assert_eq!(need_ids(&doc), expected);
        let needs = map_obj(&doc, &automerge::ROOT, KEY_NEEDS, KEY_NEEDS).expect("needs");
        for (id, obj) in sorted_children(&doc, &needs, "needs").expect("children") {
            let pos = read_scalar_str(&doc, &obj, KEY_POSITION)
                .expect("read")
                .expect("position");
            assert!(pos.len() <= POSITION_BYTES_MAX, "{id}: {pos}");
        }
        let err = add_need(&mut doc, "too-many", "x", &Placement::Last).expect_err("limit");
        assert!(
            matches!(err, DocumentError::TooLarge { max: 99, .. }),
            "{err}"
        );

        // Two siblings with the same position (two replicas appended at once): inserting between
        // them renumbers first.
        let mut a = with_needs();
        let mut b = a.fork().with_actor(actor("b"));
        add_need(&mut a, "a4", "a4", &Placement::Last).expect("a");
        add_need(&mut b, "b4", "b4", &Placement::Last).expect("b");
        a.merge(&mut b).expect("merge");
        add_need(&mut a, "mid", "mid", &Placement::After("a4".to_owned())).expect("between a tie");
        assert_eq!(need_ids(&a), ["n1", "n2", "n3", "a4", "mid", "b4"]);
    }

    #[test]
    fn weekly_plan_sorts_by_day_and_time_and_checks_times() {
        let mut doc = new_doc();
        let entry = |id: &str, day: Weekday, start: &str, end: &str| WeeklyEntry {
            id: id.to_owned(),
            day,
            start: start.to_owned(),
            end: end.to_owned(),
            service: "訪問介護".to_owned(),
        };
        add_weekly_entry(&mut doc, &entry("w2", Weekday::Thu, "10:00", "12:00")).expect("thu");
        add_weekly_entry(&mut doc, &entry("w1", Weekday::Mon, "9:30", "10:30")).expect("mon");
        add_activity(
            &mut doc,
            &Activity {
                id: "a1".to_owned(),
                start: "06:00".to_owned(),
                end: String::new(),
                text: "起床".to_owned(),
            },
        )
        .expect("activity");
        set_non_weekly(&mut doc, "福祉用具貸与（車いす）").expect("non weekly");
        let weekly = read(&doc).expect("read").weekly;
        assert_eq!(
            weekly
                .entries
                .iter()
                .map(|e| (e.id.as_str(), e.start.as_str()))
                .collect::<Vec<_>>(),
            [("w1", "09:30"), ("w2", "10:00")]
        );
        assert_eq!(weekly.activities[0].text, "起床");
        assert_eq!(weekly.non_weekly, "福祉用具貸与（車いす）");
        assert!(add_weekly_entry(&mut doc, &entry("w3", Weekday::Fri, "10:00", "09:00")).is_err());
        assert!(add_weekly_entry(&mut doc, &entry("w4", Weekday::Fri, "25:00", "26:00")).is_err());
        set_item_field(&mut doc, "w2", "day", "金曜日").expect("move to friday");
        assert_eq!(
            read(&doc).expect("read").weekly.entries[1].day,
            Weekday::Fri
        );
        assert!(move_item(&mut doc, "w2", &Placement::First).is_err());
        assert_eq!("sunday".parse::<Weekday>().expect("sunday"), Weekday::Sun);
    }

    #[test]
    fn an_earlier_version_stays_readable_after_later_edits() {
        let mut doc = with_needs();
        let who = author("みなと居宅介護支援事業所", "佐藤");
        let first = record_version(
            &mut doc,
            "ver1",
            "初回作成",
            &who,
            "2025-04-01T12:00:00+09:00",
        )
        .expect("version 1");
        assert_eq!(first, 1);
        let before = read(&doc).expect("read");

        // The plan changes: a new 変更日, a new policy, a need removed and one added.
        set_field(&mut doc, PlanField::ChangedOn, "2025-10-01").expect("changed on");
        set_field(
            &mut doc,
            PlanField::Policy,
            "区分変更に伴い方針を見直します。",
        )
        .expect("policy");
        remove_item(&mut doc, "n2").expect("remove");
        add_need(&mut doc, "n9", "新しい課題", &Placement::First).expect("add");
        let second = record_version(
            &mut doc,
            "ver2",
            "区分変更",
            &who,
            "2025-10-01T12:00:00+09:00",
        )
        .expect("version 2");
        assert_eq!(second, 2);
        set_field(&mut doc, PlanField::Policy, "さらに変更").expect("edit after v2");

        let saved = Automerge::load(&doc.save()).expect("load");
        let v1 = read_version(&saved, 1).expect("version 1 readable");
        assert_eq!(v1.sheet1, before.sheet1);
        assert_eq!(v1.needs, before.needs);
        let v2 = read_version(&saved, 2).expect("version 2 readable");
        assert_eq!(v2.sheet1.changed_on, "2025-10-01");
        assert_eq!(v2.sheet1.policy, "区分変更に伴い方針を見直します。");
        assert_eq!(
            v2.needs.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            ["n9", "n1", "n3"]
        );
        let now = read(&saved).expect("read current");
        assert_eq!(now.sheet1.policy, "さらに変更");
        assert_eq!(now.versions.len(), 2);
        assert_eq!(now.versions[0].changed_on, "2025-04-01");
        assert_eq!(now.versions[1].note, "区分変更");
        assert!(read_version(&saved, 3).is_err());
    }

    #[test]
    fn items_resolve_by_unique_prefix() {
        let mut doc = new_doc();
        add_need(&mut doc, "3fa9c2d1", "a", &Placement::Last).expect("a");
        add_need(&mut doc, "3fa9ffff", "b", &Placement::Last).expect("b");
        let plan = read(&doc).expect("read");
        assert_eq!(plan.resolve_item("3fa9c").expect("unique").0, "3fa9c2d1");
        assert!(
            plan.resolve_item("3fa9")
                .expect_err("ambiguous")
                .to_string()
                .contains("2 items")
        );
        assert!(plan.resolve_item("3f").is_err(), "too short to guess");
    }

    #[test]
    fn init_twice_and_foreign_documents_fail_clearly() {
        let mut doc = new_doc();
        assert!(matches!(
            init(&mut doc, &sample_sheet1()),
            Err(DocumentError::AlreadyInitialized { found: 1 })
        ));
        let mut other = AutoCommit::new();
        other
            .put(automerge::ROOT, "kind", "referral_letter")
            .expect("put");
        let err = read(&other).expect_err("not a care plan");
        assert!(err.to_string().contains("referral_letter"), "{err}");
    }

    #[test]
    fn key_between_orders_known_cases() {
        assert_eq!(key_between(None, None).as_deref(), Some("V"));
        assert_eq!(key_between(Some("V"), None).as_deref(), Some("k"));
        assert_eq!(key_between(None, Some("V")).as_deref(), Some("F"));
        assert_eq!(key_between(Some("1"), Some("2")).as_deref(), Some("1V"));
        assert_eq!(key_between(Some("1"), Some("105")).as_deref(), Some("102"));
        assert_eq!(key_between(Some("z"), None).as_deref(), Some("zV"));
        assert_eq!(key_between(Some("a"), Some("a")), None);
        assert_eq!(key_between(Some("b"), Some("a")), None);
        assert_eq!(key_between(Some("a0"), None), None, "no trailing zero");
    }

    proptest! {
        /// Any sequence of insertions yields keys strictly between their neighbours, never ending in 0.
        #[test]
        fn key_between_always_fits_between(picks in proptest::collection::vec(0usize..1000, 1..120)) {
            let mut keys: Vec<String> = Vec::new();
            for pick in picks {
                let at = pick % (keys.len() + 1);
                let before = at.checked_sub(1).map(|i| keys[i].as_str());
                let after = keys.get(at).map(String::as_str);
                let key = key_between(before, after).expect("neighbours are ordered");
                prop_assert!(!key.ends_with('0'));
                prop_assert!(before.is_none_or(|b| b < key.as_str()));
                prop_assert!(after.is_none_or(|a| key.as_str() < a));
                keys.insert(at, key);
            }
        }
    }
}
