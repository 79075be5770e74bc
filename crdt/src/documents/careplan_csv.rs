//! The care plan as the MHLW ケアプランデータ連携 CSV (「ケアプランデータ連携標準仕様」).
//!
//! # What this follows
//!
//! 厚生労働省老健局「ケアプランデータ連携標準仕様」4.1版 (令和6年10月; 版数 202407), 別紙「CSVファイルレイアウト
//! 定義書」: the files 居宅サービス計画1表 (`UP1KYO`, 28 items), 居宅サービス計画2表 (`UP2KYO`, 22 items),
//! 居宅サービス計画3表 (`UP3KYO`, 13 items) and 利用者補足情報 (`UPHOSOKU`, 63 items; it carries the resident's
//! name and birth date, which 第1表 itself does not, and the standard sends it with 第1表〜第3表 as one unit).
//! The column lists below ([`TABLE1_COLUMNS`], …) are the standard's items in the standard's order, by their
//! official names. They were checked against the item lists the MHLW published with 介護保険最新情報 Vol.1156
//! (居宅サービス計画1表 items 1〜14 and 居宅サービス計画2表 items 1〜22, identical in 4.1) and against the text of
//! the 4.1 layout definition; where the text extraction of that PDF was ambiguous (which items are required, the
//! meaning of 識別子), the choice made is documented at the item.
//!
//! # Format (section 4 of the standard and the layout's notes)
//!
//! - Comma-separated, no header line, one record per line, each line ending in CRLF.
//! - Free-text items (フリーテキスト) are enclosed in `"`; a `"` inside is doubled; line breaks and commas
//!   inside are kept (as CRLF). Codes, numbers and dates are written bare.
//! - Encoding Shift_JIS (MS932). Characters outside MS932 are converted to valid ones: the usual
//!   JIS/Unicode mapping differences (〜 U+301C → ～, — U+2014 → ―, ‖ → ∥, ¢ £ ¬ → ￠ ￡ ￢) and anything
//!   else (emoji, 𠮷, accented Latin) → 〓 (the geta mark, the customary stand-in for a missing glyph).
//! - Dates `YYYYMMDD`, times `HHMM`; 認定状況区分, 要介護状態区分, 計画書区分, 生活援助中心型の算定理由 and
//!   利用者性別 as the standard's codes; 保険対象区分 `Y`/`N`.
//! - 更新業者コード ("※使用しない" in the layout) and 識別子 are left empty: the standard does not say what
//!   a sender puts in 識別子 for these files.
//!
//! Everything here is a pure function from a [`CarePlan`] to bytes.

use super::DocumentError;
use super::careplan::CarePlan;

/// CSVバージョン written in item 1 of every record: the 版数 of 標準仕様 4.0/4.1 (`YYYYMM`).
pub const CSV_VERSION: &str = "202407";

/// サービス種類コード of the sender in file names: 43 居宅介護支援.
pub const CARE_MANAGEMENT_SERVICE_TYPE: &str = "43";

/// The character that stands in for one that Shift_JIS (MS932) cannot hold.
pub const REPLACEMENT_CHAR: char = '〓';

/// 居宅サービス計画1表 (`UP1KYO`): the standard's items, in order.
pub const TABLE1_COLUMNS: [&str; 28] = [
    "CSVバージョン",
    "保険者番号",
    "被保険者番号",
    "作成年月日",
    "利用者郵便番号",
    "利用者住所１",
    "利用者住所２",
    "居宅サービス計画作成者氏名",
    "介護支援事業者名",
    "介護支援事業者郵便番号",
    "介護支援事業者住所１",
    "介護支援事業者住所２",
    "介護支援事業者コード",
    "居宅サービス計画作成（変更）日",
    "初回居宅サービス計画作成日",
    "計画書区分",
    "認定状況区分",
    "認定日",
    "認定有効期間開始日",
    "認定有効期間終了日",
    "要介護状態区分",
    "利用者及び家族の生活に対する意向を踏まえた課題分析の結果",
    "介護認定審査会の意見及びサービスの種類の指定",
    "総合的な援助の方針",
    "生活援助中心型の算定理由",
    "その他理由",
    "更新業者コード",
    "識別子",
];

/// 居宅サービス計画2表 (`UP2KYO`): the standard's items, in order (one record per 援助内容).
pub const TABLE2_COLUMNS: [&str; 22] = [
    "CSVバージョン",
    "保険者番号",
    "被保険者番号",
    "居宅計画書作成年月日",
    "居宅サービス計画作成（変更）日",
    "課題ＮＯ",
    "課題",
    "援助目標ＮＯ",
    "長期目標",
    "短期目標",
    "長期期間",
    "短期期間",
    "援助内容ＮＯ",
    "サービス内容",
    "保険対象区分",
    "サービス種別",
    "サービス事業者コード",
    "サービス事業所名",
    "頻度",
    "実施期間",
    "更新業者コード",
    "識別子",
];

/// 居宅サービス計画3表 (`UP3KYO`): the standard's items, in order.
pub const TABLE3_COLUMNS: [&str; 13] = [
    "CSVバージョン",
    "保険者番号",
    "被保険者番号",
    "週間サービス計画表作成年月日",
    "居宅サービス計画作成（変更）日",
    "介護サービス内容",
    "曜日",
    "開始時間",
    "終了時間",
    "主な日常生活上の活動",
    "開始時間",
    "終了時間",
    "週単位以外のサービス",
];

/// 利用者補足情報 (`UPHOSOKU`): the number of items (1 CSVバージョン … 63 対象年月). Items 20〜55 are the
/// nine サービス種類別限度額 slots, which a plan does not hold and which stay empty.
pub const SUPPLEMENT_COLUMN_COUNT: usize = 63;

/// 利用者補足情報: the names of the items this export fills, by 1-based item number.
pub const SUPPLEMENT_COLUMNS: [(usize, &str); 17] = [
    (1, "CSVバージョン"),
    (2, "保険者番号"),
    (3, "被保険者番号"),
    (4, "居宅サービス計画作成（変更）日"),
    (5, "利用者氏名フリガナ"),
    (6, "利用者氏名"),
    (7, "利用者性別"),
    (8, "利用者生年月日"),
    (9, "利用者郵便番号"),
    (10, "利用者住所１"),
    (11, "利用者住所２"),
    (12, "利用者電話番号"),
    (13, "認定日"),
    (14, "限度額適用開始年月日"),
    (15, "限度額適用終了年月日"),
    (16, "認定状況区分"),
    (18, "要介護状態区分"),
];

/// One of the interface files of the standard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CsvFile {
    /// 居宅サービス計画1表.
    Table1,
    /// 居宅サービス計画2表.
    Table2,
    /// 居宅サービス計画3表.
    Table3,
    /// 利用者補足情報 (linked to 第1表〜第3表).
    Supplement,
}

impl CsvFile {
    /// The four files sent together for a care plan (one ファイル連番).
    pub const ALL: [CsvFile; 4] = [
        CsvFile::Table1,
        CsvFile::Table2,
        CsvFile::Table3,
        CsvFile::Supplement,
    ];

    /// The file-name prefix of the standard.
    pub fn prefix(self) -> &'static str {
        match self {
            CsvFile::Table1 => "UP1KYO",
            CsvFile::Table2 => "UP2KYO",
            CsvFile::Table3 => "UP3KYO",
            CsvFile::Supplement => "UPHOSOKU",
        }
    }

    /// The number of items of each record.
    pub fn column_count(self) -> usize {
        match self {
            CsvFile::Table1 => TABLE1_COLUMNS.len(),
            CsvFile::Table2 => TABLE2_COLUMNS.len(),
            CsvFile::Table3 => TABLE3_COLUMNS.len(),
            CsvFile::Supplement => SUPPLEMENT_COLUMN_COUNT,
        }
    }

    /// The file's name in the standard.
    pub fn title(self) -> &'static str {
        match self {
            CsvFile::Table1 => "居宅サービス計画1表",
            CsvFile::Table2 => "居宅サービス計画2表",
            CsvFile::Table3 => "居宅サービス計画3表",
            CsvFile::Supplement => "利用者補足情報",
        }
    }
}

impl std::str::FromStr for CsvFile {
    type Err = DocumentError;

    /// `1`, `2`, `3`, `supplement` (or the prefixes `UP1KYO`, …).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "1" | "table1" | "up1kyo" => Ok(CsvFile::Table1),
            "2" | "table2" | "up2kyo" => Ok(CsvFile::Table2),
            "3" | "table3" | "up3kyo" => Ok(CsvFile::Table3),
            "supplement" | "hosoku" | "uphosoku" => Ok(CsvFile::Supplement),
            other => Err(DocumentError::InvalidValue {
                key: "table".to_owned(),
                reason: format!("`{other}` is not one of 1, 2, 3, supplement"),
            }),
        }
    }
}

/// Who sends the files to whom, and when (for the standard's file names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    /// 送信元の事業所番号 (10 digits): the care-management office.
    pub from_office: String,
    /// 送信先の事業所番号 (10 digits): the service provider.
    pub to_office: String,
    /// 送信先のサービス種類コード (2 characters, e.g. `11` 訪問介護).
    pub to_service_type: String,
    /// When the files were made, `YYYYMMDDHHMMSS` (the ファイル連番 shared by the four files).
    pub made_at: String,
}

/// The standard's file name, e.g. `UP1KYO_0300000100_43_0300000005_11_20191025200201.CSV`
/// (`UPHOSOKU` carries 提供年月 `000000` first, as it is linked to 第1表〜第3表).
pub fn file_name(file: CsvFile, to: &Addressing) -> String {
    let middle = format!(
        "{}_{}_{}_{}_{}",
        to.from_office, CARE_MANAGEMENT_SERVICE_TYPE, to.to_office, to.to_service_type, to.made_at
    );
    match file {
        CsvFile::Supplement => format!("{}_000000_{middle}.CSV", file.prefix()),
        _ => format!("{}_{middle}.CSV", file.prefix()),
    }
}

/// One item of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// フリーテキスト: written in quotes.
    Free(String),
    /// A code, number or date: written bare.
    Code(String),
}

impl Cell {
    /// The item's value.
    pub fn value(&self) -> &str {
        match self {
            Cell::Free(s) | Cell::Code(s) => s,
        }
    }
}

/// The records of `file` for `plan`, before encoding (what [`export`] writes).
///
/// # Errors
///
/// [`DocumentError::MissingField`] when an item the standard requires to link the files is empty
/// (保険者番号, 被保険者番号, 作成年月日, 居宅サービス計画作成（変更）日); [`DocumentError::TooLarge`] when 第2表
/// numbers past 99 (課題ＮＯ, 援助目標ＮＯ, 援助内容ＮＯ are 1〜99).
pub fn records(file: CsvFile, plan: &CarePlan) -> Result<Vec<Vec<Cell>>, DocumentError> {
    let s = &plan.sheet1;
    for (value, key) in [
        (&s.insurer_number, "insurer_number (保険者番号)"),
        (&s.insured_number, "insured_number (被保険者番号)"),
        (&s.created_on, "created_on (作成年月日)"),
        (&s.changed_on, "changed_on (居宅サービス計画作成（変更）日)"),
    ] {
        if value.trim().is_empty() {
            return Err(DocumentError::MissingField {
                key: format!("{key}, required by the ケアプランデータ連携 CSV"),
            });
        }
    }
    let rows = match file {
        CsvFile::Table1 => vec![table1(plan)],
        CsvFile::Table2 => table2(plan)?,
        CsvFile::Table3 => table3(plan),
        CsvFile::Supplement => vec![supplement(plan)],
    };
    debug_assert!(rows.iter().all(|r| r.len() == file.column_count()));
    Ok(rows)
}

/// `file` for `plan` as the standard's bytes: Shift_JIS (MS932), quoted free text, CRLF.
///
/// # Errors
///
/// As [`records`].
pub fn export(file: CsvFile, plan: &CarePlan) -> Result<Vec<u8>, DocumentError> {
    let mut text = String::new();
    for record in records(file, plan)? {
        let cells: Vec<String> = record
            .iter()
            .map(|cell| match cell {
                Cell::Free(s) => format!("\"{}\"", crlf(s).replace('"', "\"\"")),
                Cell::Code(s) => s.clone(),
            })
            .collect();
        text.push_str(&cells.join(","));
        text.push_str("\r\n");
    }
    Ok(encode_ms932(&text).0)
}

/// Encodes `text` as Shift_JIS (MS932), converting characters it cannot hold (see the module docs);
/// returns the bytes and how many characters were converted.
pub fn encode_ms932(text: &str) -> (Vec<u8>, usize) {
    let mapped: String = text.chars().map(ms932_equivalent).collect();
    let mut encoder = encoding_rs::SHIFT_JIS.new_encoder();
    let mut out: Vec<u8> = Vec::with_capacity(mapped.len() * 2);
    let mut rest = mapped.as_str();
    let mut replaced = text
        .chars()
        .zip(mapped.chars())
        .filter(|(a, b)| a != b)
        .count();
    let mut buffer = [0u8; 4096];
    loop {
        let (result, read, written) =
            encoder.encode_from_utf8_without_replacement(rest, &mut buffer, true);
        out.extend_from_slice(&buffer[..written]);
        rest = &rest[read..];
        match result {
            encoding_rs::EncoderResult::InputEmpty => break,
            encoding_rs::EncoderResult::OutputFull => {}
            encoding_rs::EncoderResult::Unmappable(_) => {
                replaced += 1;
                let (geta, _, _) = encoding_rs::SHIFT_JIS.encode("〓");
                out.extend_from_slice(&geta);
            }
        }
    }
    (out, replaced)
}

/// The MS932 character that stands for `c` where Unicode and MS932 disagree on the code point.
fn ms932_equivalent(c: char) -> char {
    match c {
        '\u{301C}' => '～', // WAVE DASH (JIS 0x8160 in most converters) → FULLWIDTH TILDE
        '\u{2014}' => '―',  // EM DASH → HORIZONTAL BAR
        '\u{2016}' => '∥',  // DOUBLE VERTICAL LINE → PARALLEL TO
        '\u{00A2}' => '￠',
        '\u{00A3}' => '￡',
        '\u{00AC}' => '￢',
        _ => c,
    }
}

/// Line breaks as CRLF.
fn crlf(s: &str) -> String {
    s.replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\n', "\r\n")
}

fn ymd(date: &str) -> String {
    date.trim().replace('-', "")
}

fn hhmm(time: &str) -> String {
    time.trim().replace(':', "")
}

fn free(s: &str) -> Cell {
    Cell::Free(s.to_owned())
}

fn code(s: impl Into<String>) -> Cell {
    Cell::Code(s.into())
}

/// Items 1〜3, common to every file.
fn head(plan: &CarePlan) -> [Cell; 3] {
    [
        code(CSV_VERSION),
        code(plan.sheet1.insurer_number.trim()),
        code(plan.sheet1.insured_number.trim()),
    ]
}

fn table1(plan: &CarePlan) -> Vec<Cell> {
    let s = &plan.sheet1;
    let mut r: Vec<Cell> = head(plan).into();
    r.extend([
        code(ymd(&s.created_on)),                                    // 4 作成年月日
        code(s.resident.postal_code.trim()),                         // 5 利用者郵便番号
        free(&s.resident.address),                                   // 6 利用者住所１
        free(""),             // 7 利用者住所２ (the address is kept whole in 住所１)
        free(&s.planner),     // 8 居宅サービス計画作成者氏名
        free(&s.office.name), // 9 介護支援事業者名
        code(s.office.postal_code.trim()), // 10 介護支援事業者郵便番号
        free(&s.office.address), // 11 介護支援事業者住所１
        free(""),             // 12 介護支援事業者住所２
        code(s.office.code.trim()), // 13 介護支援事業者コード
        code(ymd(&s.changed_on)), // 14 居宅サービス計画作成（変更）日
        code(ymd(&s.first_created_on)), // 15 初回居宅サービス計画作成日
        code(s.category.code().unwrap_or_default()), // 16 計画書区分
        code(s.certification.map(|c| c.code()).unwrap_or_default()), // 17 認定状況区分
        code(ymd(&s.certified_on)), // 18 認定日
        code(ymd(&s.valid_from)), // 19 認定有効期間開始日
        code(ymd(&s.valid_to)), // 20 認定有効期間終了日
        code(s.care_level.map(|c| c.code()).unwrap_or_default()), // 21 要介護状態区分
        free(&s.assessment),  // 22 課題分析の結果
        free(&s.committee_opinion), // 23 介護認定審査会の意見及びサービスの種類の指定
        free(&s.policy),      // 24 総合的な援助の方針
        code(s.housework_reason.map(|h| h.code()).unwrap_or_default()), // 25 生活援助中心型の算定理由
        free(&s.housework_reason_other),                                // 26 その他理由
        code(""), // 27 更新業者コード (※使用しない)
        code(""), // 28 識別子
    ]);
    r
}

/// The 1-based number of item `index` of a list numbered 1〜99.
fn number(index: usize, what: &str) -> Result<String, DocumentError> {
    if index >= 99 {
        return Err(DocumentError::TooLarge {
            what: format!("{what} (the CSV numbers them 1〜99)"),
            size: index as u64 + 1,
            max: 99,
        });
    }
    Ok((index + 1).to_string())
}

/// One record per 援助内容, in form order. As in the standard's example, 課題, 長期目標 and 短期目標 are
/// written on the first record of their group and left empty on the records that follow it; the numbers
/// are on every record, so sorting by 課題ＮＯ, 援助目標ＮＯ, 援助内容ＮＯ gives the form's order.
/// 援助目標ＮＯ numbers the long-term goals of a need; 援助内容ＮＯ runs through the services of a
/// long-term goal across its short-term goals. A need, goal or short-term goal without services still gets
/// one record, so nothing on the form is left out of the file.
fn table2(plan: &CarePlan) -> Result<Vec<Vec<Cell>>, DocumentError> {
    let s = &plan.sheet1;
    let mut rows = Vec::new();
    let base = |need_no: &str| -> Vec<Cell> {
        let mut r: Vec<Cell> = head(plan).into();
        r.push(code(ymd(&s.created_on)));
        r.push(code(ymd(&s.changed_on)));
        r.push(code(need_no));
        r
    };
    for (ni, need) in plan.needs.iter().enumerate() {
        let need_no = number(ni, "needs")?;
        let mut need_text = Some(need.text.as_str());
        if need.goals.is_empty() {
            let mut r = base(&need_no);
            r.push(free(need.text.as_str()));
            r.push(code(""));
            r.extend([free(""), free(""), free(""), free("")]);
            r.push(code(""));
            r.extend(empty_service());
            rows.push(r);
            continue;
        }
        for (gi, goal) in need.goals.iter().enumerate() {
            let goal_no = number(gi, "long-term goals of a need")?;
            let mut long = Some((goal.text.as_str(), goal.period.as_str()));
            let mut service_index = 0usize;
            let mut emit = |short: Option<(&str, &str)>,
                            service: Option<&super::careplan::Service>,
                            service_no: String,
                            long: &mut Option<(&str, &str)>,
                            need_text: &mut Option<&str>| {
                let mut r = base(&need_no);
                r.push(free(need_text.take().unwrap_or_default()));
                r.push(code(goal_no.as_str()));
                let (lt, lp) = long.take().unwrap_or_default();
                let (st, sp) = short.unwrap_or_default();
                r.extend([free(lt), free(st), free(lp), free(sp)]);
                r.push(code(service_no));
                match service {
                    Some(v) => r.extend([
                        free(&v.content),
                        code(if v.insured { "Y" } else { "N" }),
                        free(&v.kind),
                        code(v.provider_code.trim()),
                        free(&v.provider),
                        free(&v.frequency),
                        free(&v.period),
                        code(""),
                        code(""),
                    ]),
                    None => r.extend(empty_service()),
                }
                rows.push(r);
            };
            if goal.short_goals.is_empty() {
                emit(None, None, String::new(), &mut long, &mut need_text);
                continue;
            }
            for short in &goal.short_goals {
                let mut short_cells = Some((short.text.as_str(), short.period.as_str()));
                if short.services.is_empty() {
                    let no = number(service_index, "services of a long-term goal")?;
                    service_index += 1;
                    emit(short_cells.take(), None, no, &mut long, &mut need_text);
                    continue;
                }
                for service in &short.services {
                    let no = number(service_index, "services of a long-term goal")?;
                    service_index += 1;
                    emit(
                        short_cells.take(),
                        Some(service),
                        no,
                        &mut long,
                        &mut need_text,
                    );
                }
            }
        }
    }
    Ok(rows)
}

/// Items 14〜22 of 第2表 for a record without a service.
fn empty_service() -> [Cell; 9] {
    [
        free(""),
        code(""),
        free(""),
        code(""),
        free(""),
        free(""),
        free(""),
        code(""),
        code(""),
    ]
}

/// One record per service on the weekly grid, one per activity, and one for 週単位以外のサービス
/// (when there is any), as in the standard's example.
fn table3(plan: &CarePlan) -> Vec<Vec<Cell>> {
    let s = &plan.sheet1;
    let base = || -> Vec<Cell> {
        let mut r: Vec<Cell> = head(plan).into();
        r.push(code(ymd(&s.created_on)));
        r.push(code(ymd(&s.changed_on)));
        r
    };
    let mut rows = Vec::new();
    for entry in &plan.weekly.entries {
        let mut r = base();
        r.extend([
            free(&entry.service),
            code(entry.day.code().to_string()),
            code(hhmm(&entry.start)),
            code(hhmm(&entry.end)),
            free(""),
            code(""),
            code(""),
            free(""),
        ]);
        rows.push(r);
    }
    for activity in &plan.weekly.activities {
        let mut r = base();
        r.extend([
            free(""),
            code(""),
            code(""),
            code(""),
            free(&activity.text),
            code(hhmm(&activity.start)),
            code(hhmm(&activity.end)),
            free(""),
        ]);
        rows.push(r);
    }
    if !plan.weekly.non_weekly.trim().is_empty() {
        let mut r = base();
        r.extend([
            free(""),
            code(""),
            code(""),
            code(""),
            free(""),
            code(""),
            code(""),
            free(&plan.weekly.non_weekly),
        ]);
        rows.push(r);
    }
    rows
}

fn supplement(plan: &CarePlan) -> Vec<Cell> {
    let s = &plan.sheet1;
    let mut r: Vec<Cell> = head(plan).into();
    r.extend([
        code(ymd(&s.changed_on)),                                    // 4
        free(&s.resident.kana),                                      // 5 利用者氏名フリガナ
        free(&s.resident.name),                                      // 6 利用者氏名
        code(s.resident.sex.map(|x| x.code()).unwrap_or_default()),  // 7 利用者性別
        code(ymd(&s.resident.birth_date)),                           // 8 利用者生年月日
        code(s.resident.postal_code.trim()),                         // 9 利用者郵便番号
        free(&s.resident.address),                                   // 10 利用者住所１
        free(""),                                                    // 11 利用者住所２
        code(s.resident.phone.trim()),                               // 12 利用者電話番号
        code(ymd(&s.certified_on)),                                  // 13 認定日
        code(ymd(&s.valid_from)),                                    // 14 限度額適用開始年月日
        code(ymd(&s.valid_to)),                                      // 15 限度額適用終了年月日
        code(s.certification.map(|c| c.code()).unwrap_or_default()), // 16 認定状況区分
        code(""),                                                    // 17 要介護状態変更日
        code(s.care_level.map(|c| c.code()).unwrap_or_default()),    // 18 要介護状態区分
    ]);
    // 19 区分支給限度基準額 … 62 識別子: not held by a plan.
    while r.len() < SUPPLEMENT_COLUMN_COUNT - 1 {
        r.push(code(""));
    }
    r.push(code("000000")); // 63 対象年月: 000000 when linked to 第1表〜第3表
    r
}

#[cfg(test)]
mod tests {
    use automerge::AutoCommit;

    use super::super::careplan::{
        self, Activity, Placement, PlanField, Service, Weekday, WeeklyEntry, tests::sample_sheet1,
    };
    use super::*;

    /// A minimal RFC 4180 reader for the tests: records of fields, quotes honoured.
    fn parse(text: &str) -> Vec<Vec<String>> {
        let mut records = Vec::new();
        let mut record = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => record.push(std::mem::take(&mut field)),
                (false, '\r') => {
                    assert_eq!(chars.next(), Some('\n'), "CR must be followed by LF");
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                (false, '\n') => panic!("a bare LF ends a record; the standard wants CRLF"),
                (false, c) => field.push(c),
            }
        }
        assert!(
            field.is_empty() && record.is_empty(),
            "the last record must end in CRLF"
        );
        records
    }

    fn decode(bytes: &[u8]) -> String {
        let (text, _, had_errors) = encoding_rs::SHIFT_JIS.decode(bytes);
        assert!(!had_errors, "the bytes must be valid Shift_JIS");
        text.into_owned()
    }

    fn service(content: &str, kind: &str, provider: &str, insured: bool) -> Service {
        Service {
            content: content.to_owned(),
            insured,
            kind: kind.to_owned(),
            provider: provider.to_owned(),
            frequency: "隔日".to_owned(),
            period: "6か月".to_owned(),
            ..Service::default()
        }
    }

    /// The 第2表 of the standard's own data layout example (課題１/長期１/短期１ …).
    fn example_plan() -> CarePlan {
        let mut doc = AutoCommit::new();
        let mut sheet = sample_sheet1();
        sheet
            .set(
                PlanField::Assessment,
                "本人：「家で暮らしたい」, 家族は\"見守り\"を希望。\n週末は長男が来る。",
            )
            .expect("assessment");
        careplan::init(&mut doc, &sheet).expect("init");
        let last = &Placement::Last;
        careplan::add_need(&mut doc, "k1", "課題１", last).expect("need");
        careplan::add_long_term_goal(&mut doc, "k1", "l1", "長期１", "aaaa", last).expect("goal");
        careplan::add_short_term_goal(&mut doc, "l1", "t1", "短期１", "bbbb", last).expect("short");
        careplan::add_service(
            &mut doc,
            "t1",
            "v1",
            &service("サービス１", "訪問介護", "ＸＸＸ事業所", true),
            last,
        )
        .expect("service");
        careplan::add_service(
            &mut doc,
            "t1",
            "v2",
            &service("サービス２", "家政婦", "YYY家政婦協会", false),
            last,
        )
        .expect("service");
        careplan::add_short_term_goal(&mut doc, "l1", "t2", "短期２", "eeee", last).expect("short");
        careplan::add_service(
            &mut doc,
            "t2",
            "v3",
            &service("サービス３", "福祉用具", "ZZZZ事業所", true),
            last,
        )
        .expect("service");
        careplan::add_need(&mut doc, "k2", "課題２", last).expect("need");
        careplan::add_long_term_goal(&mut doc, "k2", "l2", "長期２", "gggg", last).expect("goal");
        careplan::add_short_term_goal(&mut doc, "l2", "t3", "短期３", "hhhh", last).expect("short");
        careplan::add_service(
            &mut doc,
            "t3",
            "v4",
            &service("サービス４", "医療", "ｘｘｘ病院", false),
            last,
        )
        .expect("service");
        careplan::add_long_term_goal(&mut doc, "k2", "l3", "長期３", "jjjj", last).expect("goal");
        careplan::add_short_term_goal(&mut doc, "l3", "t4", "短期４", "kkkk", last).expect("short");
        careplan::add_service(
            &mut doc,
            "t4",
            "v5",
            &service("サービス５", "訪問看護", "ｙｙｙ看護ステーション", true),
            last,
        )
        .expect("service");
        careplan::add_weekly_entry(
            &mut doc,
            &WeeklyEntry {
                id: "w1".to_owned(),
                day: Weekday::Mon,
                start: "12:00".to_owned(),
                end: "16:00".to_owned(),
                service: "訪問介護".to_owned(),
            },
        )
        .expect("weekly");
        careplan::add_activity(
            &mut doc,
            &Activity {
                id: "a1".to_owned(),
                start: "06:00".to_owned(),
                end: "06:00".to_owned(),
                text: "起床".to_owned(),
            },
        )
        .expect("activity");
        careplan::set_non_weekly(&mut doc, "通院〜月1回").expect("non weekly");
        careplan::read(&doc).expect("read")
    }

    #[test]
    fn table1_is_shift_jis_crlf_with_the_standards_28_items_in_order() {
        let plan = example_plan();
        let bytes = export(CsvFile::Table1, &plan).expect("export");
        assert!(bytes.ends_with(b"\r\n"));
        assert!(
            std::str::from_utf8(&bytes).is_err(),
            "Japanese text is not UTF-8 here"
        );
        let text = decode(&bytes);
        let records = parse(&text);
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.len(), TABLE1_COLUMNS.len());
        let item = |name: &str| -> &str {
            let at = TABLE1_COLUMNS
                .iter()
                .position(|c| *c == name)
                .expect("known item");
            &r[at]
        };
        assert_eq!(item("CSVバージョン"), CSV_VERSION);
        assert_eq!(item("保険者番号"), "152056");
        assert_eq!(item("被保険者番号"), "0000123456");
        assert_eq!(item("作成年月日"), "20250401");
        assert_eq!(item("利用者郵便番号"), "945-0011");
        assert_eq!(item("利用者住所１"), "新潟県柏崎市松波１－２－３");
        assert_eq!(item("居宅サービス計画作成者氏名"), "佐藤 ケア子");
        assert_eq!(item("介護支援事業者名"), "みなと居宅介護支援事業所");
        assert_eq!(item("介護支援事業者コード"), "1570000001");
        assert_eq!(item("居宅サービス計画作成（変更）日"), "20250401");
        assert_eq!(item("初回居宅サービス計画作成日"), "20240401");
        assert_eq!(item("計画書区分"), "21");
        assert_eq!(item("認定状況区分"), "2");
        assert_eq!(item("認定日"), "20250325");
        assert_eq!(item("認定有効期間開始日"), "20250401");
        assert_eq!(item("認定有効期間終了日"), "20260331");
        assert_eq!(item("要介護状態区分"), "22");
        assert_eq!(
            item("利用者及び家族の生活に対する意向を踏まえた課題分析の結果"),
            "本人：「家で暮らしたい」, 家族は\"見守り\"を希望。\r\n週末は長男が来る。",
            "commas, quotes and line breaks survive inside quotes"
        );
        assert_eq!(
            item("総合的な援助の方針"),
            "転倒を防ぎ、在宅生活を続けられるよう支援します。"
        );
        assert_eq!(item("生活援助中心型の算定理由"), "1");
        // Free text is quoted, codes are bare.
        assert!(
            text.starts_with(&format!(
                "{CSV_VERSION},152056,0000123456,20250401,945-0011,\"新潟県"
            )),
            "{text}"
        );
    }

    #[test]
    fn table2_numbers_and_groups_rows_like_the_standards_example() {
        let plan = example_plan();
        let records = parse(&decode(&export(CsvFile::Table2, &plan).expect("export")));
        assert!(records.iter().all(|r| r.len() == TABLE2_COLUMNS.len()));
        let col = |name: &str| {
            TABLE2_COLUMNS
                .iter()
                .position(|c| *c == name)
                .expect("item")
        };
        let column =
            |name: &str| -> Vec<&str> { records.iter().map(|r| r[col(name)].as_str()).collect() };
        assert_eq!(column("課題ＮＯ"), ["1", "1", "1", "2", "2"]);
        assert_eq!(column("課題"), ["課題１", "", "", "課題２", ""]);
        assert_eq!(column("援助目標ＮＯ"), ["1", "1", "1", "1", "2"]);
        assert_eq!(column("長期目標"), ["長期１", "", "", "長期２", "長期３"]);
        assert_eq!(column("長期期間"), ["aaaa", "", "", "gggg", "jjjj"]);
        assert_eq!(
            column("短期目標"),
            ["短期１", "", "短期２", "短期３", "短期４"]
        );
        assert_eq!(column("短期期間"), ["bbbb", "", "eeee", "hhhh", "kkkk"]);
        assert_eq!(column("援助内容ＮＯ"), ["1", "2", "3", "1", "1"]);
        assert_eq!(
            column("サービス内容"),
            [
                "サービス１",
                "サービス２",
                "サービス３",
                "サービス４",
                "サービス５"
            ]
        );
        assert_eq!(column("保険対象区分"), ["Y", "N", "Y", "N", "Y"]);
        assert_eq!(
            column("サービス種別"),
            ["訪問介護", "家政婦", "福祉用具", "医療", "訪問看護"]
        );
        assert_eq!(column("サービス事業所名")[4], "ｙｙｙ看護ステーション");
        assert_eq!(column("頻度")[0], "隔日");
        assert!(
            column("居宅計画書作成年月日")
                .iter()
                .all(|d| *d == "20250401")
        );
    }

    #[test]
    fn table3_and_the_supplement_carry_the_week_and_the_resident() {
        let plan = example_plan();
        let records = parse(&decode(&export(CsvFile::Table3, &plan).expect("export")));
        assert_eq!(records.len(), 3);
        assert_eq!(&records[0][5..9], ["訪問介護", "1", "1200", "1600"]);
        assert_eq!(&records[1][9..12], ["起床", "0600", "0600"]);
        assert_eq!(
            records[2][12], "通院～月1回",
            "the wave dash becomes the MS932 tilde"
        );

        let records = parse(&decode(
            &export(CsvFile::Supplement, &plan).expect("export"),
        ));
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.len(), SUPPLEMENT_COLUMN_COUNT);
        for (number, name) in SUPPLEMENT_COLUMNS {
            let value = &r[number - 1];
            let expected = match name {
                "利用者氏名" => "山田 花子",
                "利用者氏名フリガナ" => "ヤマダ ハナコ",
                "利用者性別" => "2",
                "利用者生年月日" => "19400229",
                "要介護状態区分" => "22",
                _ => continue,
            };
            assert_eq!(value, expected, "item {number} {name}");
        }
        assert_eq!(r[62], "000000", "対象年月 of a supplement linked to 第1表");
    }

    #[test]
    fn characters_outside_ms932_are_converted_not_dropped() {
        let (bytes, replaced) = encode_ms932("髙橋〜𠮷野家🙂—①");
        assert_eq!(replaced, 4);
        assert_eq!(decode(&bytes), "髙橋～〓野家〓―①");
    }

    #[test]
    fn the_linking_items_are_required_and_file_names_follow_the_standard() {
        let mut plan = example_plan();
        plan.sheet1.insurer_number.clear();
        let err = export(CsvFile::Table1, &plan).expect_err("missing 保険者番号");
        assert!(err.to_string().contains("保険者番号"), "{err}");

        let to = Addressing {
            from_office: "0300000100".to_owned(),
            to_office: "0300000005".to_owned(),
            to_service_type: "11".to_owned(),
            made_at: "20191025200201".to_owned(),
        };
        assert_eq!(
            file_name(CsvFile::Table1, &to),
            "UP1KYO_0300000100_43_0300000005_11_20191025200201.CSV"
        );
        assert_eq!(
            file_name(CsvFile::Supplement, &to),
            "UPHOSOKU_000000_0300000100_43_0300000005_11_20191025200201.CSV"
        );
        assert_eq!("2".parse::<CsvFile>().expect("2"), CsvFile::Table2);
    }
}
