//! `musubi careplan ...`: 居宅サービス計画書 (care plans) commands.
//!
//! Items of 第2表/第3表 are named by their id or a unique prefix of at least 4 characters
//! (`careplan show` prints them). Entries are attributed to this facility and `--staff`
//! (default: the MUSUBI_STAFF environment variable).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, Subcommand};
use musubi_crdt::documents::careplan::{Placement, PlanField, Service, Sheet1, Weekday};
use musubi_crdt::documents::careplan_csv::CsvFile;
use musubi_crdt::ids::Role;
use musubi_facility::services::careplan::{self, LogInput, PlanView};

use crate::{Data, Json, open_staff, print_json, refresh_directory_for};

#[derive(Args)]
#[command(group(ArgGroup::new("placement").multiple(false)))]
pub(crate) struct Place {
    /// Put it before every sibling.
    #[arg(long, group = "placement")]
    first: bool,
    /// Put it after every sibling (the default for new items).
    #[arg(long, group = "placement")]
    last: bool,
    /// Put it just before this sibling (id or prefix).
    #[arg(long, group = "placement", value_name = "ITEM")]
    before: Option<String>,
    /// Put it just after this sibling (id or prefix).
    #[arg(long, group = "placement", value_name = "ITEM")]
    after: Option<String>,
}

impl Place {
    fn placement(&self) -> Placement {
        match (&self.before, &self.after) {
            (Some(id), _) => Placement::Before(id.clone()),
            (_, Some(id)) => Placement::After(id.clone()),
            _ if self.first => Placement::First,
            _ => Placement::Last,
        }
    }
}

#[derive(Args)]
pub(crate) struct Staff {
    /// 記入者 as the entry names them (default: the name of the staff member signed in).
    #[arg(long, default_value = "")]
    writer: String,
}

impl Staff {
    /// The 記入者: as given, else the signed-in staff member's name.
    fn name(&self, e: &musubi_facility::Engine) -> Result<String> {
        if !self.writer.trim().is_empty() {
            return Ok(self.writer.trim().to_owned());
        }
        let login = e.staff().unwrap_or_default();
        Ok(musubi_facility::staff::find(e, login)?
            .map(|s| s.name)
            .unwrap_or_else(|| login.to_owned()))
    }
}

#[derive(Args)]
pub(crate) struct NewPlan {
    /// 利用者名 (the resident's full name).
    #[arg(long)]
    resident: String,
    /// 利用者氏名フリガナ.
    #[arg(long)]
    kana: Option<String>,
    /// 性別 (男/女).
    #[arg(long)]
    sex: Option<String>,
    /// 生年月日 (YYYY-MM-DD).
    #[arg(long)]
    birth: Option<String>,
    /// 郵便番号 (NNN-NNNN).
    #[arg(long)]
    postal_code: Option<String>,
    /// 住所.
    #[arg(long)]
    address: Option<String>,
    /// 電話番号.
    #[arg(long)]
    phone: Option<String>,
    /// 保険者番号 (6 digits).
    #[arg(long)]
    insurer: Option<String>,
    /// 被保険者番号 (10 digits).
    #[arg(long)]
    insured: Option<String>,
    /// 要介護状態区分 (要介護1 … 要介護5, 要支援1, 要支援2, 事業対象者).
    #[arg(long)]
    care_level: Option<String>,
    /// 認定済・申請中.
    #[arg(long)]
    certification: Option<String>,
    /// 認定日 (YYYY-MM-DD).
    #[arg(long)]
    certified_on: Option<String>,
    /// 認定の有効期間 開始 (YYYY-MM-DD).
    #[arg(long)]
    valid_from: Option<String>,
    /// 認定の有効期間 終了 (YYYY-MM-DD).
    #[arg(long)]
    valid_to: Option<String>,
    /// 初回・紹介・継続 (comma separated).
    #[arg(long)]
    category: Option<String>,
    /// 作成年月日 (YYYY-MM-DD; default today).
    #[arg(long)]
    created_on: Option<String>,
    /// 居宅サービス計画作成（変更）日 (default: the 作成年月日).
    #[arg(long)]
    changed_on: Option<String>,
    /// 初回居宅サービス計画作成日.
    #[arg(long)]
    first_created_on: Option<String>,
    /// 居宅サービス計画作成者氏名 (the care manager).
    #[arg(long)]
    planner: Option<String>,
    /// 事業所名 (default: this facility's name).
    #[arg(long)]
    office_name: Option<String>,
    /// 介護支援事業者コード (10 digits).
    #[arg(long)]
    office_code: Option<String>,
    /// 事業所郵便番号.
    #[arg(long)]
    office_postal_code: Option<String>,
    /// 事業所所在地.
    #[arg(long)]
    office_address: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum CareplanCommand {
    /// Create a plan for a resident (this facility owns it); prints its id.
    Create {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        plan: Box<NewPlan>,
        /// Make this facility (id or exact name) a member at once, e.g. the family doctor's clinic.
        #[arg(long = "with", value_name = "FACILITY")]
        with: Option<String>,
        /// Its role.
        #[arg(long, value_parser = ["writer", "reader"], default_value = "writer", requires = "with")]
        role: String,
    },
    /// Plans this facility can read.
    List {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// One plan (第1表〜第3表, 支援経過, monitoring, comments, versions).
    Show {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// Show recorded version N as it was (see `careplan version`).
        #[arg(long)]
        version: Option<usize>,
        #[command(flatten)]
        json: Json,
    },
    /// Set a field of 第1表.
    ///
    /// Keys: created_on, changed_on, first_created_on, category, certification,
    /// certified_on, valid_from, valid_to, care_level, resident.name, resident.kana, resident.sex,
    /// resident.birth_date, resident.postal_code, resident.address, resident.phone, insurer_number,
    /// insured_number, assessment, committee_opinion, policy, housework_reason, housework_reason_other,
    /// planner, office.name, office.code, office.postal_code, office.address, consent.date, consent.by.
    Edit {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The field key.
        #[arg(long)]
        field: String,
        /// The new value.
        #[arg(long, alias = "text")]
        value: String,
    },
    /// Add a need (生活全般の解決すべき課題) to 第2表; prints its id.
    AddNeed {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// 課題（ニーズ）.
        #[arg(long)]
        text: String,
        #[command(flatten)]
        place: Place,
    },
    /// Add a goal: under a need a 長期目標, under a long-term goal a 短期目標; prints its id.
    AddGoal {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The need or long-term goal it belongs to (id or prefix).
        #[arg(long, value_name = "ITEM")]
        under: String,
        /// 目標.
        #[arg(long)]
        text: String,
        /// （期間）.
        #[arg(long, default_value = "")]
        period: String,
        #[command(flatten)]
        place: Place,
    },
    /// Add a service row (援助内容) under a short-term goal; prints its id.
    AddService {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The short-term goal (id or prefix).
        #[arg(long, value_name = "ITEM")]
        goal: String,
        /// サービス内容.
        #[arg(long)]
        content: String,
        /// サービス種別 (e.g. 訪問介護).
        #[arg(long, default_value = "")]
        kind: String,
        /// ※2 事業所 (the provider).
        #[arg(long, default_value = "")]
        provider: String,
        /// サービス事業者コード (10 digits).
        #[arg(long, default_value = "")]
        provider_code: String,
        /// 頻度.
        #[arg(long, default_value = "")]
        frequency: String,
        /// 期間.
        #[arg(long, default_value = "")]
        period: String,
        /// ※1 not covered by long-term care insurance (default: covered, ○).
        #[arg(long)]
        not_insured: bool,
        #[command(flatten)]
        place: Place,
    },
    /// Set a field of an item of 第2表 or 第3表.
    ///
    /// Fields: need: text; goal: text, period; service: content, insured, kind,
    /// provider, provider_code, frequency, period; schedule entry: day, start, end, service;
    /// activity: start, end, text.
    EditItem {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The item (id or prefix).
        item: String,
        /// The field key.
        #[arg(long)]
        field: String,
        /// The new value.
        #[arg(long, alias = "text")]
        value: String,
    },
    /// Reorder an item of 第2表 among its siblings.
    Move {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The item (id or prefix).
        item: String,
        #[command(flatten)]
        place: Place,
    },
    /// Remove an item (with what is under it).
    Remove {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The item (id or prefix).
        item: String,
    },
    /// 第3表: add a weekly service or an activity, or set 週単位以外のサービス.
    ///
    /// Add a service on the weekly grid (--day --start --end --service), an activity of the day
    /// (--activity --start [--end]), or set 週単位以外のサービス (--non-weekly); prints the new id.
    #[command(group(ArgGroup::new("what").required(true).args(["day", "activity", "non_weekly"])))]
    Schedule {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// 曜日 (mon … sun, or 月 … 日).
        #[arg(long)]
        day: Option<String>,
        /// 介護サービス内容 of a grid entry.
        #[arg(long, requires = "day")]
        service: Option<String>,
        /// 主な日常生活上の活動 (e.g. 起床).
        #[arg(long)]
        activity: Option<String>,
        /// 開始時間 (HH:MM).
        #[arg(long)]
        start: Option<String>,
        /// 終了時間 (HH:MM).
        #[arg(long)]
        end: Option<String>,
        /// 週単位以外のサービス (replaces the text).
        #[arg(long)]
        non_weekly: Option<String>,
    },
    /// Append an entry to 第5表 居宅介護支援経過; prints its id.
    Log {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// 内容.
        #[arg(long)]
        text: String,
        /// 年月日 (YYYY-MM-DD; default today).
        #[arg(long, default_value = "")]
        date: String,
        /// 時刻 (HH:MM).
        #[arg(long, default_value = "")]
        time: String,
        /// 項目 (e.g. 訪問, 電話, 往診, サービス担当者会議).
        #[arg(long, default_value = "")]
        category: String,
        #[command(flatten)]
        staff: Staff,
    },
    /// Append a monitoring entry; prints its id.
    Monitor {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// 内容 (observations, achievement of the goals).
        #[arg(long)]
        text: String,
        /// 実施日 (YYYY-MM-DD; default today).
        #[arg(long, default_value = "")]
        date: String,
        /// The goal it is about (id or prefix).
        #[arg(long, value_name = "ITEM")]
        goal: Option<String>,
        #[command(flatten)]
        staff: Staff,
    },
    /// Add a comment (e.g. from the family doctor); prints its id.
    Comment {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The comment.
        #[arg(long)]
        text: String,
        /// The item it is about (id or prefix).
        #[arg(long, value_name = "ITEM")]
        about: Option<String>,
        #[command(flatten)]
        staff: Staff,
    },
    /// Record the resident's consent (同意).
    Consent {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// 説明・同意日 (YYYY-MM-DD; default today).
        #[arg(long, default_value = "")]
        date: String,
        /// Who consented (利用者同意欄).
        #[arg(long)]
        by: String,
    },
    /// Record the plan as it stands as a new version; prints its number.
    ///
    /// The version stays readable as it was with `show --version N` and the exports' `--version N`.
    Version {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// A note (e.g. 区分変更に伴う変更).
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        staff: Staff,
    },
    /// The ケアプランデータ連携 CSV (Shift_JIS, CRLF).
    ///
    /// One file to stdout (--table), or the four files of the standard, named as it names them,
    /// into a directory (--out).
    #[command(group(ArgGroup::new("target").required(true).args(["table", "out"])))]
    ExportCsv {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// 1 (第1表), 2 (第2表), 3 (第3表) or supplement (利用者補足情報), written to stdout.
        #[arg(long)]
        table: Option<String>,
        /// Write UP1KYO_…, UP2KYO_…, UP3KYO_… and UPHOSOKU_… into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// 送信先の事業所番号 for the file names.
        #[arg(long, default_value = "0000000000")]
        to_office: String,
        /// 送信先のサービス種類コード for the file names (e.g. 11 訪問介護).
        #[arg(long, default_value = "00")]
        to_service: String,
        /// Export recorded version N.
        #[arg(long)]
        version: Option<usize>,
    },
    /// 第1表〜第3表 as a PDF in the forms' layout.
    ExportPdf {
        #[command(flatten)]
        data: Data,
        /// The plan id.
        id: String,
        /// The PDF file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Export recorded version N.
        #[arg(long)]
        version: Option<usize>,
    },
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: CareplanCommand) -> Result<()> {
    match cmd {
        CareplanCommand::Create {
            data,
            plan,
            with,
            role,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let mut sheet = sheet1(&plan)?;
            if sheet.office.name.is_empty() {
                sheet.office.name = e.enrolment()?.facility_name;
            }
            let share = match &with {
                Some(facility) => {
                    refresh_directory_for(&mut e, facility)?;
                    Some((facility.as_str(), role.parse::<Role>()?))
                }
                None => None,
            };
            let id = careplan::create(&mut e, &sheet, share)?;
            println!("{id}");
        }
        CareplanCommand::List { data, json } => {
            let e = open_staff(pf, &data.data)?;
            let plans = careplan::list(&e)?;
            if json.json {
                print_json(&plans)?;
            } else {
                for p in plans {
                    println!(
                        "{}  {}  {}  変更日 {}  課題 {}  版 {}",
                        p.id,
                        p.resident,
                        if p.care_level.is_empty() {
                            "-"
                        } else {
                            &p.care_level
                        },
                        p.changed_on,
                        p.needs,
                        p.versions
                    );
                }
            }
        }
        CareplanCommand::Show {
            data,
            id,
            version,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let v = careplan::show(&e, &id, version)?;
            if json.json {
                print_json(&v)?;
            } else {
                print_plan(&v);
            }
        }
        CareplanCommand::Edit {
            data,
            id,
            field,
            value,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            careplan::edit(&mut e, &id, &field, &value)?;
        }
        CareplanCommand::AddNeed {
            data,
            id,
            text,
            place,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            println!(
                "{}",
                careplan::add_need(&mut e, &id, &text, &place.placement())?
            );
        }
        CareplanCommand::AddGoal {
            data,
            id,
            under,
            text,
            period,
            place,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let (new, kind) =
                careplan::add_goal(&mut e, &id, &under, &text, &period, &place.placement())?;
            println!("{new}");
            eprintln!("added a {}", kind.label());
        }
        CareplanCommand::AddService {
            data,
            id,
            goal,
            content,
            kind,
            provider,
            provider_code,
            frequency,
            period,
            not_insured,
            place,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let service = Service {
                id: String::new(),
                content,
                insured: !not_insured,
                kind,
                provider,
                provider_code,
                frequency,
                period,
            };
            let new = careplan::add_service(&mut e, &id, &goal, &service, &place.placement())?;
            println!("{new}");
        }
        CareplanCommand::EditItem {
            data,
            id,
            item,
            field,
            value,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            careplan::edit_item(&mut e, &id, &item, &field, &value)?;
        }
        CareplanCommand::Move {
            data,
            id,
            item,
            place,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            careplan::move_item(&mut e, &id, &item, &place.placement())?;
        }
        CareplanCommand::Remove { data, id, item } => {
            let mut e = open_staff(pf, &data.data)?;
            let kind = careplan::remove_item(&mut e, &id, &item)?;
            eprintln!("removed a {}", kind.label());
        }
        CareplanCommand::Schedule {
            data,
            id,
            day,
            service,
            activity,
            start,
            end,
            non_weekly,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            if let Some(text) = non_weekly {
                careplan::set_non_weekly(&mut e, &id, &text)?;
            } else if let Some(text) = activity {
                let start = start.context("an activity needs --start HH:MM")?;
                let new = careplan::add_activity(
                    &mut e,
                    &id,
                    &start,
                    end.as_deref().unwrap_or(""),
                    &text,
                )?;
                println!("{new}");
            } else if let Some(day) = day {
                let (Some(start), Some(end), Some(service)) = (start, end, service) else {
                    bail!("a weekly service needs --start HH:MM --end HH:MM --service TEXT");
                };
                let day: Weekday = day.parse()?;
                let new = careplan::schedule(&mut e, &id, day, &start, &end, &service)?;
                println!("{new}");
            }
        }
        CareplanCommand::Log {
            data,
            id,
            text,
            date,
            time,
            category,
            staff,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let input = LogInput {
                date,
                time,
                category,
                text,
            };
            let writer = staff.name(&e)?;
            println!("{}", careplan::log(&mut e, &id, &input, &writer)?);
        }
        CareplanCommand::Monitor {
            data,
            id,
            text,
            date,
            goal,
            staff,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let writer = staff.name(&e)?;
            let new = careplan::monitor(&mut e, &id, &date, goal.as_deref(), &text, &writer)?;
            println!("{new}");
        }
        CareplanCommand::Comment {
            data,
            id,
            text,
            about,
            staff,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let writer = staff.name(&e)?;
            let new = careplan::comment(&mut e, &id, about.as_deref(), &text, &writer)?;
            println!("{new}");
        }
        CareplanCommand::Consent { data, id, date, by } => {
            let mut e = open_staff(pf, &data.data)?;
            let date = if date.is_empty() {
                careplan::today_jst()
            } else {
                date
            };
            careplan::consent(&mut e, &id, &date, &by)?;
        }
        CareplanCommand::Version {
            data,
            id,
            note,
            staff,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let writer = staff.name(&e)?;
            println!("{}", careplan::record_version(&mut e, &id, &note, &writer)?);
        }
        CareplanCommand::ExportCsv {
            data,
            id,
            table,
            out,
            to_office,
            to_service,
            version,
        } => {
            let e = open_staff(pf, &data.data)?;
            if let Some(table) = table {
                let file: CsvFile = table.parse()?;
                let bytes = careplan::export_csv(&e, &id, file, version)?;
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            } else if let Some(dir) = out {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (name, bytes) in
                    careplan::export_csv_files(&e, &id, version, &to_office, &to_service)?
                {
                    let path = dir.join(name);
                    std::fs::write(&path, bytes)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("{}", path.display());
                }
            }
        }
        CareplanCommand::ExportPdf {
            data,
            id,
            out,
            version,
        } => {
            let e = open_staff(pf, &data.data)?;
            let bytes = careplan::export_pdf(&e, &id, version)?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} ({} bytes)", out.display(), bytes.len());
        }
    }
    Ok(())
}

/// 第1表 of a new plan from the `create` options (validated field by field).
fn sheet1(p: &NewPlan) -> Result<Sheet1> {
    let today = careplan::today_jst();
    let created = p.created_on.clone().unwrap_or(today);
    let mut sheet = Sheet1::default();
    let fields: [(PlanField, Option<&str>); 23] = [
        (PlanField::ResidentName, Some(p.resident.as_str())),
        (PlanField::ResidentKana, p.kana.as_deref()),
        (PlanField::ResidentSex, p.sex.as_deref()),
        (PlanField::ResidentBirthDate, p.birth.as_deref()),
        (PlanField::ResidentPostalCode, p.postal_code.as_deref()),
        (PlanField::ResidentAddress, p.address.as_deref()),
        (PlanField::ResidentPhone, p.phone.as_deref()),
        (PlanField::InsurerNumber, p.insurer.as_deref()),
        (PlanField::InsuredNumber, p.insured.as_deref()),
        (PlanField::CareLevel, p.care_level.as_deref()),
        (PlanField::Certification, p.certification.as_deref()),
        (PlanField::CertifiedOn, p.certified_on.as_deref()),
        (PlanField::ValidFrom, p.valid_from.as_deref()),
        (PlanField::ValidTo, p.valid_to.as_deref()),
        (PlanField::Category, p.category.as_deref()),
        (PlanField::CreatedOn, Some(created.as_str())),
        (
            PlanField::ChangedOn,
            Some(p.changed_on.as_deref().unwrap_or(created.as_str())),
        ),
        (PlanField::FirstCreatedOn, p.first_created_on.as_deref()),
        (PlanField::Planner, p.planner.as_deref()),
        (PlanField::OfficeName, p.office_name.as_deref()),
        (PlanField::OfficeCode, p.office_code.as_deref()),
        (PlanField::OfficePostalCode, p.office_postal_code.as_deref()),
        (PlanField::OfficeAddress, p.office_address.as_deref()),
    ];
    for (field, value) in fields {
        if let Some(value) = value {
            sheet
                .set(field, value)
                .with_context(|| format!("--{}", field.key().replace(['.', '_'], "-")))?;
        }
    }
    Ok(sheet)
}

fn print_plan(v: &PlanView) {
    let p = &v.plan;
    let s = &p.sheet1;
    let title = match v.version {
        Some(n) => format!("居宅サービス計画書  {}  (第{n}版)", v.id),
        None => format!("居宅サービス計画書  {}", v.id),
    };
    println!("{title}");
    println!("【第1表】");
    for &field in PlanField::ALL {
        let value = s.get(field);
        if !value.is_empty() {
            println!("  {:<24} {}", field.key(), value.replace('\n', "\n    "));
        }
    }
    println!("【第2表】");
    for need in &p.needs {
        println!("  課題 [{}] {}", need.id, need.text);
        for goal in &need.goals {
            println!(
                "    長期目標 [{}] {}（{}）",
                goal.id, goal.text, goal.period
            );
            for short in &goal.short_goals {
                println!(
                    "      短期目標 [{}] {}（{}）",
                    short.id, short.text, short.period
                );
                for sv in &short.services {
                    println!(
                        "        援助内容 [{}] {} {} {} {} {} {}",
                        sv.id,
                        sv.content,
                        if sv.insured { "○" } else { "-" },
                        sv.kind,
                        sv.provider,
                        sv.frequency,
                        sv.period
                    );
                }
            }
        }
    }
    println!("【第3表】");
    for e in &p.weekly.entries {
        println!(
            "  [{}] {} {}〜{} {}",
            e.id,
            e.day.label(),
            e.start,
            e.end,
            e.service
        );
    }
    for a in &p.weekly.activities {
        println!("  [{}] 活動 {}〜{} {}", a.id, a.start, a.end, a.text);
    }
    if !p.weekly.non_weekly.is_empty() {
        println!("  週単位以外のサービス: {}", p.weekly.non_weekly);
    }
    if !p.support_log.is_empty() {
        println!("【第5表 支援経過】");
        for l in &p.support_log {
            println!(
                "  {} {} [{}] {} — {} {}",
                l.date, l.time, l.category, l.text, l.author.facility_name, l.author.staff
            );
        }
    }
    if !p.monitoring.is_empty() {
        println!("【モニタリング】");
        for m in &p.monitoring {
            println!(
                "  {} {} — {} {}",
                m.date, m.text, m.author.facility_name, m.author.staff
            );
        }
    }
    if !p.comments.is_empty() {
        println!("【コメント】");
        for c in &p.comments {
            let about = if c.about.is_empty() {
                String::new()
            } else {
                format!(" (on {})", c.about)
            };
            println!(
                "  {} {}{} — {} {}",
                c.at, c.text, about, c.author.facility_name, c.author.staff
            );
        }
    }
    for ver in &p.versions {
        println!(
            "版 {}: 作成 {} 変更 {} {} ({} {})",
            ver.number,
            ver.created_on,
            ver.changed_on,
            ver.note,
            ver.author.facility_name,
            ver.recorded_at
        );
    }
    if v.unreadable_bundles > 0 {
        println!(
            "({} change(s) cannot be read yet: run `musubi sync --once`)",
            v.unreadable_bundles
        );
    }
}
