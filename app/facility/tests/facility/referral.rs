//! 紹介状 (診療情報提供書, 様式11) between two clinics: the services the desktop app's referral
//! commands call, from the draft to the 返書, and the letter printed in the form's layout.

use musubi_crdt::documents::referral::{ReferralField, ReferralStatus};
use musubi_crdt::ids::FacilityRole;
use musubi_crdt::limits::ATTACHMENT_BYTES_MAX;
use musubi_facility::EngineError;
use musubi_facility::services::referral::{self, Direction};

use super::two::{carry, pair};

const CLINIC: &str = "港診療所";
const HOSPITAL: &str = "東京第一テスト病院";

fn real_bundle() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fhir-ereferral/Bundle-BundleReferralExample01.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the real JP eReferral Bundle {} is needed beside the repository: {e}",
            path.display()
        )
    })
}

#[test]
fn a_clinic_drafts_attaches_and_sends_a_letter_the_hospital_receives_and_answers() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let (mut clinic, mut hospital) = pair(
        root.path(),
        (CLINIC, FacilityRole::Clinic),
        (HOSPITAL, FacilityRole::Clinic),
    );

    // The doctor starts a letter to the hospital: both facilities' names and the doctor are filled in.
    let id = referral::create(
        &mut clinic.engine,
        &hospital.facility.to_string(),
        "大河内 勘三郎",
    )
    .expect("create a draft");
    let sid = id.to_string();
    let draft = referral::detail(&clinic.engine, &sid).expect("the draft");
    assert_eq!(draft.letter.to_facility, hospital.name);
    assert_eq!(draft.letter.from_facility, clinic.name);
    assert_eq!(draft.letter.from_doctor, "大河内 勘三郎");
    assert_eq!(draft.letter.status, ReferralStatus::Draft);
    assert_eq!(draft.direction, Direction::Outbox);
    assert_eq!(draft.counterpart, HOSPITAL);
    assert_eq!(draft.counterpart_id, Some(hospital.facility));
    assert!(draft.editable && draft.can_send && !draft.can_reply);
    assert!(draft.times.created_at.is_some() && draft.times.sent_at.is_none());
    assert!(
        referral::create(&mut clinic.engine, &clinic.facility.to_string(), "x").is_err(),
        "a letter to oneself is refused"
    );

    // Typing: every call is one committed change; a call that changes nothing writes nothing.
    let bundles = |site: &super::two::Site| site.engine.store().bundles(id).expect("bundles").len();
    let before = bundles(&clinic);
    for typed in ["田", "田中", "田中 太郎"] {
        referral::edit(
            &mut clinic.engine,
            &sid,
            ReferralField::PatientName.key(),
            typed,
        )
        .expect("type the name");
    }
    referral::edit(
        &mut clinic.engine,
        &sid,
        "purpose",
        "腹痛精査お願いします。",
    )
    .expect("purpose");
    assert_eq!(bundles(&clinic), before + 4);
    referral::edit(
        &mut clinic.engine,
        &sid,
        "purpose",
        "腹痛精査お願いします。",
    )
    .expect("same");
    assert_eq!(
        bundles(&clinic),
        before + 4,
        "an unchanged field writes nothing"
    );
    assert!(referral::edit(&mut clinic.engine, &sid, "patient.blood_type", "A").is_err());

    // The draft is the clinic's alone: carried to the hospital, nothing of it is taken.
    let report = carry(&clinic, &mut hospital, id);
    assert!(report.skipped > 0 && report.new == 0, "{report:?}");
    assert!(
        referral::summaries(&hospital.engine)
            .expect("list")
            .is_empty()
    );

    // An attachment; one over the limit is refused before anything is written.
    let scan = b"%PDF-1.4 CT 2024-05-01".to_vec();
    let att = referral::attach_bytes(
        &mut clinic.engine,
        &sid,
        "CT-2024-05-01.pdf",
        "application/pdf",
        scan.clone(),
    )
    .expect("attach");
    let too_big = referral::attach_bytes(
        &mut clinic.engine,
        &sid,
        "big.bin",
        "application/octet-stream",
        vec![0; ATTACHMENT_BYTES_MAX + 1],
    );
    assert!(
        matches!(too_big, Err(EngineError::Bundle(_))),
        "{too_big:?}"
    );
    assert!(
        referral::reply(&mut clinic.engine, &sid, "x").is_err(),
        "the writer does not write the 返書"
    );

    // Sent: the hospital becomes a member and, at its next sync, has it in its inbox as received.
    referral::send(&mut clinic.engine, &sid).expect("send");
    referral::send(&mut clinic.engine, &sid).expect("sending twice is harmless");
    let outbox = referral::summaries(&clinic.engine).expect("list");
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].direction, Direction::Outbox);
    assert_eq!(outbox[0].status, ReferralStatus::Sent);
    assert_eq!(outbox[0].counterpart, HOSPITAL);
    carry(&clinic, &mut hospital, id);
    let inbox = referral::summaries(&hospital.engine).expect("list");
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    let line = &inbox[0];
    assert_eq!(line.direction, Direction::Inbox);
    assert_eq!(line.status, ReferralStatus::Received);
    assert_eq!(line.patient_name, "田中 太郎");
    assert_eq!(line.counterpart, CLINIC);
    assert_eq!(line.counterpart_id, Some(clinic.facility));
    assert_eq!(line.attachments, 1);
    assert!(line.times.sent_at.is_some() && line.times.received_at.is_some());
    let received = referral::detail(&hospital.engine, &sid).expect("detail");
    assert!(received.can_reply && !received.editable && !received.can_send);
    assert_eq!(received.letter.purpose, "腹痛精査お願いします。");
    let (name, media_type, data) =
        referral::attachment_data(&hospital.engine, &sid, &att.id).expect("the attachment");
    assert_eq!(
        (name.as_str(), media_type.as_str(), data),
        ("CT-2024-05-01.pdf", "application/pdf", scan)
    );

    // The clinic sees that it was received; the hospital's 返書 comes back.
    carry(&hospital, &mut clinic, id);
    assert_eq!(
        referral::summaries(&clinic.engine).expect("list")[0].status,
        ReferralStatus::Received
    );
    let answer = "ご紹介ありがとうございました。本日外来にて拝見しました。";
    referral::reply(&mut hospital.engine, &sid, answer).expect("reply");
    carry(&hospital, &mut clinic, id);
    let answered = referral::detail(&clinic.engine, &sid).expect("detail");
    assert_eq!(answered.letter.status, ReferralStatus::Replied);
    assert_eq!(answered.letter.reply, answer);
    assert!(answered.times.replied_at.is_some());
    assert!(!answered.can_reply && !answered.editable);

    let fhir = referral::export_fhir(&clinic.engine, &sid).expect("FHIR");
    assert_eq!(fhir["resourceType"], "Bundle");
}

/// The text of a PDF, as `pdftotext` (poppler-utils) reads it, without white space.
fn pdf_text(pdf: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("letter.pdf");
    std::fs::write(&path, pdf).expect("write the PDF");
    let out = std::process::Command::new("pdftotext")
        .args(["-enc", "UTF-8"])
        .arg(&path)
        .arg("-")
        .output()
        .expect("run pdftotext (apt-get install poppler-utils)");
    assert!(
        out.status.success(),
        "pdftotext: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

#[test]
fn an_imported_real_letter_prints_in_the_layout_of_form_11() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let (mut clinic, mut hospital) = pair(
        root.path(),
        (CLINIC, FacilityRole::Clinic),
        (HOSPITAL, FacilityRole::Clinic),
    );
    let id = referral::import_fhir(&mut clinic.engine, HOSPITAL, &real_bundle()).expect("import");
    let sid = id.to_string();
    let letter = referral::show(&clinic.engine, &sid).expect("show").letter;
    assert_eq!(letter.patient.name, "田中 太郎");
    assert_eq!(letter.status, ReferralStatus::Sent);

    let pdf = referral::export_pdf(&clinic.engine, &sid).expect("render the letter");
    assert!(pdf.starts_with(b"%PDF-"));
    let text = pdf_text(&pdf);
    for wanted in [
        "診療情報提供書",
        "紹介先医療機関等名",
        "担当医",
        "紹介元医療機関の所在地及び名称",
        "医師氏名",
        "患者氏名",
        "生年月日",
        "傷病名",
        "紹介目的",
        "既往歴及び家族歴",
        "症状経過及び検査結果",
        "治療経過",
        "現在の処方",
        "備考",
        "田中太郎",
    ] {
        assert!(text.contains(wanted), "the PDF lacks {wanted}: {text}");
    }
    let purpose: String = letter
        .purpose
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(8)
        .collect();
    assert!(
        text.contains(&purpose),
        "the PDF lacks the purpose {purpose}: {text}"
    );
    if let Some(out) = std::env::var_os("MUSUBI_REFERRAL_PDF_SAMPLE") {
        std::fs::write(out, &pdf).expect("write the sample");
    }

    // Imported letters are sent at once; the hospital's inbox shows it received.
    carry(&clinic, &mut hospital, id);
    let inbox = referral::summaries(&hospital.engine).expect("list");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].direction, Direction::Inbox);
    assert_eq!(inbox[0].status, ReferralStatus::Received);
    assert_eq!(inbox[0].counterpart, CLINIC);
}
