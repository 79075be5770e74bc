//! Care plans (issue 3, care-plan half): a care-management office writes a resident's 居宅サービス計画書,
//! shares it with the family doctor's clinic, both edit it while the relay is down, and after the relay
//! comes back both hold the same plan with nothing lost; the MHLW ケアプランデータ連携 CSV and the PDF of
//! 第1表〜第3表 come out of it. Every step is the real `musubi` CLI against the real relay.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use musubi_tests::{Facility, World, run_command};
use serde_json::Value;

use super::{Story, serial};

const OFFICE: &str = "みなと居宅介護支援事業所";
const CLINIC: &str = "港診療所";

/// `careplan SUB PLAN ARGS…`, which must succeed; returns its one line of stdout (a new id, or empty).
fn cp(f: &Facility, sub: &str, plan: &str, args: &[&str]) -> String {
    let mut a = vec![plan];
    a.extend_from_slice(args);
    f.run_ok(&format!("careplan {sub}"), &a).trim().to_owned()
}

fn show(f: &Facility, plan: &str, args: &[&str]) -> Value {
    let mut a = vec![plan];
    a.extend_from_slice(args);
    f.run_json("careplan show", &a)
}

fn need_texts(plan: &Value) -> Vec<String> {
    plan["needs"]
        .as_array()
        .unwrap_or_else(|| panic!("no needs in {plan:#}"))
        .iter()
        .map(|n| n["text"].as_str().expect("need text").to_owned())
        .collect()
}

fn texts(plan: &Value, list: &str) -> Vec<String> {
    plan[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {plan:#}"))
        .iter()
        .map(|e| e["text"].as_str().expect("entry text").to_owned())
        .collect()
}

/// A CSV file of the standard: decoded from Shift_JIS, split into records of fields (quotes honoured),
/// checking that every record ends in CRLF.
fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (text, _, had_errors) = encoding_rs::SHIFT_JIS.decode(&bytes);
    assert!(!had_errors, "{} is not valid Shift_JIS", path.display());
    assert!(
        std::str::from_utf8(&bytes).is_err(),
        "{} holds Japanese, so it cannot also be UTF-8",
        path.display()
    );
    let (mut records, mut record, mut field, mut quoted) =
        (Vec::new(), Vec::new(), String::new(), false);
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
                assert_eq!(
                    chars.next(),
                    Some('\n'),
                    "{}: CR without LF",
                    path.display()
                );
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, '\n') => panic!("{}: a record ends in a bare LF, not CRLF", path.display()),
            (false, c) => field.push(c),
        }
    }
    assert!(
        record.is_empty() && field.is_empty(),
        "{}: the last record does not end in CRLF",
        path.display()
    );
    records
}

/// Renders page `page` of `pdf` with `pdftoppm -png -r 50` and returns (width, height, share of ink).
fn render_page(pdf: &Path, page: u32, out: &Path) -> (u32, u32, f64) {
    let prefix = out.join(format!("page{page}"));
    assert!(
        Command::new("pdftoppm").arg("-v").output().is_ok(),
        "pdftoppm is missing: install poppler-utils (apt-get install poppler-utils; scripts/test.sh does)"
    );
    let mut cmd = Command::new("pdftoppm");
    cmd.args([
        "-png",
        "-r",
        "50",
        "-f",
        &page.to_string(),
        "-l",
        &page.to_string(),
        "-singlefile",
    ])
    .arg(pdf)
    .arg(&prefix);
    let output = run_command(cmd, Duration::from_secs(60));
    assert!(output.ok(), "pdftoppm failed: {}", output.stderr);
    let png_path: PathBuf = prefix.with_extension("png");
    let file = fs::File::open(&png_path)
        .unwrap_or_else(|e| panic!("pdftoppm wrote no {}: {e}", png_path.display()));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane PNG size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let dark = pixels
        .chunks(channels)
        .filter(|px| px.iter().take(3).any(|&v| v < 160))
        .count();
    (
        info.width,
        info.height,
        dark as f64 / (pixels.len() / channels) as f64,
    )
}

#[test]
fn care_plan_edited_offline_by_office_and_clinic_converges_and_exports() {
    let _serial = serial();
    let story = Story::new("care plan");
    let world = World::new("careplan");
    let mut relay = world.relay();
    let office = world.enrolled_facility(&relay, "care-office", OFFICE, "care-office");
    let clinic = world.enrolled_facility(&relay, "clinic", CLINIC, "clinic");
    office.sync_once();

    story.step(
        "the care manager writes 第1表〜第3表 and shares the plan with the family doctor's clinic",
    );
    let plan = office
        .run_ok(
            "careplan create",
            &[
                "--resident",
                "山田 花子",
                "--kana",
                "ヤマダ ハナコ",
                "--sex",
                "女",
                "--birth",
                "1940-02-29",
                "--postal-code",
                "945-0011",
                "--address",
                "新潟県柏崎市松波１－２－３",
                "--insurer",
                "152056",
                "--insured",
                "0000123456",
                "--care-level",
                "要介護2",
                "--certification",
                "認定済",
                "--certified-on",
                "2025-03-25",
                "--valid-from",
                "2025-04-01",
                "--valid-to",
                "2026-03-31",
                "--category",
                "初回",
                "--created-on",
                "2025-04-01",
                "--first-created-on",
                "2025-04-01",
                "--planner",
                "佐藤 ケア子",
                "--office-code",
                "1570000001",
                "--office-postal-code",
                "945-0051",
                "--office-address",
                "新潟県柏崎市東本町１－１",
                "--with",
                CLINIC,
                "--role",
                "writer",
            ],
        )
        .trim()
        .to_owned();
    cp(
        &office,
        "edit",
        &plan,
        &[
            "--field",
            "assessment",
            "--value",
            "本人：自宅で夫と暮らし続けたい。\n家族：入浴時の転倒が心配。",
        ],
    );
    cp(
        &office,
        "edit",
        &plan,
        &[
            "--field",
            "policy",
            "--value",
            "転倒を防ぎ在宅生活を続けます。",
        ],
    );
    cp(
        &office,
        "edit",
        &plan,
        &["--field", "housework_reason", "--value", "一人暮らし"],
    );
    let bath = cp(&office, "add-need", &plan, &["--text", "安全に入浴したい"]);
    let meds = cp(
        &office,
        "add-need",
        &plan,
        &["--text", "薬を飲み忘れないようにしたい"],
    );
    let outing = cp(
        &office,
        "add-need",
        &plan,
        &["--text", "近所へ散歩に出かけたい"],
    );
    let bath_long = cp(
        &office,
        "add-goal",
        &plan,
        &[
            "--under",
            &bath,
            "--text",
            "自宅の浴槽で入浴できる",
            "--period",
            "2025-04-01〜2026-03-31",
        ],
    );
    let bath_short = cp(
        &office,
        "add-goal",
        &plan,
        &[
            "--under",
            &bath_long,
            "--text",
            "介助を受けて週2回入浴する",
            "--period",
            "2025-04-01〜2025-09-30",
        ],
    );
    let help = cp(
        &office,
        "add-service",
        &plan,
        &[
            "--goal",
            &bath_short,
            "--content",
            "入浴介助",
            "--kind",
            "訪問介護",
            "--provider",
            "ひまわりヘルパーステーション",
            "--provider-code",
            "1570000002",
            "--frequency",
            "週2回",
            "--period",
            "2025-04-01〜2025-09-30",
        ],
    );
    let meds_long = cp(
        &office,
        "add-goal",
        &plan,
        &[
            "--under",
            &meds,
            "--text",
            "服薬を自分で管理できる",
            "--period",
            "1年",
        ],
    );
    let meds_short = cp(
        &office,
        "add-goal",
        &plan,
        &[
            "--under",
            &meds_long,
            "--text",
            "お薬カレンダーで服薬する",
            "--period",
            "6か月",
        ],
    );
    cp(
        &office,
        "add-service",
        &plan,
        &[
            "--goal",
            &meds_short,
            "--content",
            "服薬確認",
            "--kind",
            "家族",
            "--provider",
            "長男",
            "--not-insured",
            "--frequency",
            "毎日",
        ],
    );
    cp(
        &office,
        "schedule",
        &plan,
        &[
            "--day",
            "mon",
            "--start",
            "10:00",
            "--end",
            "11:00",
            "--service",
            "訪問介護",
        ],
    );
    cp(
        &office,
        "schedule",
        &plan,
        &[
            "--day",
            "木",
            "--start",
            "10:00",
            "--end",
            "11:00",
            "--service",
            "訪問介護",
        ],
    );
    cp(
        &office,
        "schedule",
        &plan,
        &["--activity", "起床", "--start", "6:00"],
    );
    cp(
        &office,
        "schedule",
        &plan,
        &["--non-weekly", "福祉用具貸与（車いす）"],
    );
    cp(
        &office,
        "consent",
        &plan,
        &["--date", "2025-04-01", "--by", "山田 花子"],
    );
    assert_eq!(
        cp(
            &office,
            "version",
            &plan,
            &["--note", "初回作成", "--writer", "佐藤"]
        ),
        "1"
    );
    office.sync_once();
    clinic.sync_once();
    let at_clinic = show(&clinic, &plan, &[]);
    assert_eq!(
        at_clinic["sheet1"]["resident"]["name"], "山田 花子",
        "the clinic reads the shared plan"
    );
    assert_eq!(need_texts(&at_clinic).len(), 3);

    story.step("the relay goes down; the care manager and the clinic both edit the plan offline");
    relay.kill();
    let falls = cp(
        &office,
        "add-need",
        &plan,
        &["--text", "転ばずに家の中を移動したい", "--first"],
    );
    cp(&office, "move", &plan, &[&outing, "--after", &falls]);
    cp(
        &office,
        "add-service",
        &plan,
        &[
            "--goal",
            &bath_short,
            "--content",
            "浴室の見守り",
            "--kind",
            "家族",
            "--provider",
            "長男",
            "--not-insured",
            "--before",
            &help,
        ],
    );
    cp(
        &office,
        "edit",
        &plan,
        &[
            "--field",
            "policy",
            "--value",
            "転倒を防ぎ在宅生活を続けます。入浴は訪問介護で支援します。",
        ],
    );
    cp(
        &office,
        "edit",
        &plan,
        &["--field", "changed_on", "--value", "2025-05-01"],
    );
    cp(
        &office,
        "log",
        &plan,
        &[
            "--date",
            "2025-04-20",
            "--category",
            "訪問",
            "--text",
            "自宅訪問。浴室に手すり設置を提案。",
            "--writer",
            "佐藤",
        ],
    );

    cp(
        &clinic,
        "edit",
        &plan,
        &[
            "--field",
            "policy",
            "--value",
            "【主治医】血圧に注意。転倒を防ぎ在宅生活を続けます。",
        ],
    );
    cp(
        &clinic,
        "comment",
        &plan,
        &[
            "--about",
            &bath,
            "--text",
            "入浴前に血圧を測ってください。",
            "--writer",
            "大河内医師",
        ],
    );
    cp(
        &clinic,
        "log",
        &plan,
        &[
            "--date",
            "2025-04-15",
            "--category",
            "往診",
            "--text",
            "往診。血圧 128/76、安定。",
            "--writer",
            "大河内医師",
        ],
    );
    cp(
        &clinic,
        "monitor",
        &plan,
        &[
            "--date",
            "2025-04-30",
            "--goal",
            &meds_short,
            "--text",
            "服薬は概ねできている。",
            "--writer",
            "大河内医師",
        ],
    );
    cp(
        &clinic,
        "edit-item",
        &plan,
        &[
            &meds,
            "--field",
            "text",
            "--value",
            "薬を飲み忘れないようにしたい（降圧薬）",
        ],
    );

    story.step("the relay comes back; both sync and hold the same plan, nothing lost");
    relay.start();
    office.sync_once();
    clinic.sync_once();
    office.sync_once();
    let a = show(&office, &plan, &[]);
    let b = show(&clinic, &plan, &[]);
    assert_eq!(a, b, "the office and the clinic converge");
    assert_eq!(
        need_texts(&a),
        [
            "転ばずに家の中を移動したい",
            "近所へ散歩に出かけたい",
            "安全に入浴したい",
            "薬を飲み忘れないようにしたい（降圧薬）"
        ],
        "the office's reorder and the clinic's edit both hold, every need once"
    );
    assert_eq!(
        a["sheet1"]["policy"],
        "【主治医】血圧に注意。転倒を防ぎ在宅生活を続けます。入浴は訪問介護で支援します。",
        "both edits of 総合的な援助の方針 merge character by character"
    );
    let bath_services: Vec<&str> = a["needs"][2]["goals"][0]["short_goals"][0]["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["content"].as_str().expect("content"))
        .collect();
    assert_eq!(bath_services, ["浴室の見守り", "入浴介助"]);
    assert_eq!(
        texts(&a, "support_log"),
        [
            "往診。血圧 128/76、安定。",
            "自宅訪問。浴室に手すり設置を提案。"
        ],
        "支援経過 from both, in date order"
    );
    assert_eq!(a["support_log"][0]["facility_name"], CLINIC);
    assert_eq!(a["support_log"][0]["staff"], "大河内医師");
    assert_eq!(a["support_log"][1]["facility_name"], OFFICE);
    assert_eq!(texts(&a, "comments"), ["入浴前に血圧を測ってください。"]);
    assert_eq!(a["comments"][0]["about"], bath.as_str());
    assert_eq!(texts(&a, "monitoring"), ["服薬は概ねできている。"]);
    let v1 = show(&clinic, &plan, &["--version", "1"]);
    assert_eq!(
        need_texts(&v1),
        [
            "安全に入浴したい",
            "薬を飲み忘れないようにしたい",
            "近所へ散歩に出かけたい"
        ]
    );
    assert_eq!(
        v1["sheet1"]["policy"], "転倒を防ぎ在宅生活を続けます。",
        "version 1 is the plan as agreed"
    );
    assert_eq!(v1["sheet1"]["changed_on"], "2025-04-01");

    story.step("the ケアプランデータ連携 CSV: Shift_JIS, CRLF, the standard's items in order");
    let csv_dir = world.path().join("csv");
    let listed = clinic.run_ok(
        "careplan export-csv",
        &[
            &plan,
            "--out",
            &csv_dir.to_string_lossy(),
            "--to-office",
            "1570000002",
            "--to-service",
            "11",
        ],
    );
    let files: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();
    let named = |prefix: &str| -> PathBuf {
        files
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .unwrap_or_else(|| panic!("no {prefix} file among {files:?}"))
            .clone()
    };
    let up1 = named("UP1KYO_1570000001_43_1570000002_11_");
    let t1 = read_csv(&up1);
    assert_eq!(t1.len(), 1);
    let r = &t1[0];
    assert_eq!(r.len(), 28, "居宅サービス計画1表 has 28 items: {r:?}");
    // 1 CSVバージョン, 2 保険者番号, 3 被保険者番号, 4 作成年月日, 5 利用者郵便番号, 6 利用者住所１,
    // 8 居宅サービス計画作成者氏名, 9 介護支援事業者名, 13 介護支援事業者コード, 14 居宅サービス計画作成（変更）日,
    // 16 計画書区分, 17 認定状況区分, 21 要介護状態区分, 22 課題分析の結果, 24 総合的な援助の方針, 25 算定理由.
    for (item, expected) in [
        (1, "202407"),
        (2, "152056"),
        (3, "0000123456"),
        (4, "20250401"),
        (5, "945-0011"),
        (6, "新潟県柏崎市松波１－２－３"),
        (8, "佐藤 ケア子"),
        (9, OFFICE),
        (10, "945-0051"),
        (13, "1570000001"),
        (14, "20250501"),
        (15, "20250401"),
        (16, "11"),
        (17, "2"),
        (18, "20250325"),
        (19, "20250401"),
        (20, "20260331"),
        (21, "22"),
        (
            22,
            "本人：自宅で夫と暮らし続けたい。\r\n家族：入浴時の転倒が心配。",
        ),
        (
            24,
            "【主治医】血圧に注意。転倒を防ぎ在宅生活を続けます。入浴は訪問介護で支援します。",
        ),
        (25, "1"),
    ] {
        assert_eq!(r[item - 1], expected, "居宅サービス計画1表 item {item}");
    }
    let t2 = read_csv(&named("UP2KYO_"));
    assert!(
        t2.iter().all(|r| r.len() == 22),
        "居宅サービス計画2表 has 22 items"
    );
    // One record per service, needs without goals get one record each: 転倒, 散歩, 入浴 ×2, 服薬.
    let col = |n: usize| -> Vec<&str> { t2.iter().map(|r| r[n - 1].as_str()).collect() };
    assert_eq!(
        col(6),
        ["1", "2", "3", "3", "4"],
        "課題ＮＯ in the form's order"
    );
    assert_eq!(
        col(7),
        [
            "転ばずに家の中を移動したい",
            "近所へ散歩に出かけたい",
            "安全に入浴したい",
            "",
            "薬を飲み忘れないようにしたい（降圧薬）"
        ]
    );
    assert_eq!(col(13), ["", "", "1", "2", "1"], "援助内容ＮＯ");
    assert_eq!(col(14), ["", "", "浴室の見守り", "入浴介助", "服薬確認"]);
    assert_eq!(col(15), ["", "", "N", "Y", "N"], "保険対象区分");
    assert_eq!(col(17)[3], "1570000002", "サービス事業者コード");
    assert_eq!(
        col(11)[2],
        "2025-04-01～2026-03-31",
        "長期期間, with the wave dash as MS932's tilde"
    );
    let supplement = read_csv(&named("UPHOSOKU_000000_"));
    assert_eq!(supplement[0].len(), 63);
    assert_eq!(
        (supplement[0][5].as_str(), supplement[0][7].as_str()),
        ("山田 花子", "19400229")
    );

    story.step("the PDF of 第1表〜第3表 renders");
    let pdf = world.path().join("careplan.pdf");
    office.run_ok(
        "careplan export-pdf",
        &[&plan, "--out", &pdf.to_string_lossy()],
    );
    let bytes = fs::read(&pdf).expect("the PDF");
    assert!(bytes.starts_with(b"%PDF-"), "not a PDF");
    let pages_dir = world.data_dir("pages");
    for page in 1..=3 {
        let (w, h, ink) = render_page(&pdf, page, &pages_dir);
        assert!(
            (580..=590).contains(&w) && (410..=416).contains(&h),
            "page {page} is A4 landscape at 50 dpi: {w}x{h}"
        );
        assert!(
            ink > 0.01 && ink < 0.5,
            "page {page} has the form drawn on it ({:.1}% ink)",
            ink * 100.0
        );
    }
    let info = run_command(
        {
            let mut c = Command::new("pdfinfo");
            c.arg(&pdf);
            c
        },
        Duration::from_secs(60),
    );
    assert!(info.ok(), "pdfinfo failed: {}", info.stderr);
    assert!(
        info.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Pages:", "3"]),
        "a short plan has exactly three pages (第1表, 第2表, 第3表):\n{}",
        info.stdout
    );
    story.step("done");
}
