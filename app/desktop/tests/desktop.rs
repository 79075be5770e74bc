//! The desktop shell's tests that need no window: the generated TypeScript bindings are current,
//! the session lock (idle, and who signs in after it) and the sign-in errors the UI branches on.

use std::path::Path;

/// The UI is typed against `frontend/src/lib/bindings.ts`; if a command or type changed in Rust and
/// the file was not regenerated, the UI would call commands with the wrong shapes. This regenerates
/// the bindings into a temporary file and compares.
#[test]
fn committed_typescript_bindings_match_the_rust_commands_and_types() {
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(musubi_desktop::BINDINGS_PATH);
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; generate it with `cargo run -p musubi-desktop -- --export-bindings`",
            committed_path.display()
        )
    });
    let dir = tempfile::tempdir().expect("a temporary directory");
    let fresh_path = dir.path().join("bindings.ts");
    musubi_desktop::export_bindings(&fresh_path).expect("the bindings export");
    let fresh = std::fs::read_to_string(&fresh_path).expect("the fresh bindings");
    if fresh != committed {
        let line = fresh
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || fresh.lines().count().min(committed.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{} is stale (first difference at line {line}); regenerate it with `cargo run -p musubi-desktop -- --export-bindings` and commit it",
            committed_path.display()
        );
    }
    // The UI depends on these commands and events by name.
    for name in [
        "appStatus(",
        "createFacility(",
        "syncNow(",
        "invitePreview(",
        "deviceInvite(",
        "revokeDevice(",
        "trustDirectory(",
        "confirmRoot(",
        "\"sync-status\"",
        "\"document-changed\"",
    ] {
        assert!(fresh.contains(name), "the bindings lack {name}");
    }
}

/// The generated TypeScript, fresh from the Rust types.
fn fresh_bindings() -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("bindings.ts");
    musubi_desktop::export_bindings(&path).expect("the bindings export");
    std::fs::read_to_string(&path).expect("the fresh bindings")
}

/// The TypeScript declaration of `name`, without its doc comments and line breaks.
fn ts_type(bindings: &str, name: &str) -> String {
    let start = bindings
        .find(&format!("export type {name} = "))
        .unwrap_or_else(|| panic!("the bindings lack the type {name}"));
    let rest = &bindings[start..];
    let end = rest[1..].find("export type ").map_or(rest.len(), |i| i + 1);
    let mut out = String::new();
    let mut in_doc = false;
    for line in rest[..end].lines() {
        let t = line.trim();
        if t.starts_with("/**") {
            in_doc = !t.ends_with("*/");
            continue;
        }
        if in_doc {
            in_doc = !t.ends_with("*/");
            continue;
        }
        if !t.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(t);
        }
    }
    out
}

/// The care plan's types carry serde attributes (flattened authors, fields skipped when empty,
/// choices renamed to the form's words, dotted field keys): the TypeScript must describe the JSON
/// that serde writes and reads, or the UI reads `undefined` where it expects a value.
#[test]
fn care_plan_typescript_describes_the_json_serde_writes() {
    use musubi_crdt::documents::careplan::{CarePlan, PlanField, Sheet1};
    use musubi_desktop::commands::careplan::PlacementInput;
    use musubi_facility::services::careplan::PlanView;

    let ts = fresh_bindings();

    // A plan as `careplan_get` returns it: the plan's keys at the top level, `version` and
    // `unreadable_bundles` left out when null or zero, so the TypeScript makes them optional.
    let mut sheet1 = Sheet1::default();
    sheet1
        .set(PlanField::CareLevel, "care-2")
        .expect("care level");
    let view = PlanView {
        id: musubi_crdt::ids::DocumentId::from_random_bytes([1; 16]),
        version: None,
        plan: CarePlan {
            sheet1,
            ..CarePlan::default()
        },
        unreadable_bundles: 0,
    };
    let json = serde_json::to_value(&view).expect("serialise");
    let mut keys: Vec<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "comments",
            "id",
            "monitoring",
            "needs",
            "sheet1",
            "support_log",
            "versions",
            "weekly"
        ]
    );
    assert_eq!(json["sheet1"]["care_level"], "要介護2");
    let plan_view = ts_type(&ts, "PlanView");
    assert!(plan_view.contains("sheet1: Sheet1;"), "{plan_view}");
    assert!(plan_view.contains("version?: number | null"), "{plan_view}");
    assert!(
        plan_view.contains("unreadable_bundles?: number"),
        "{plan_view}"
    );
    assert!(ts_type(&ts, "CareLevel").contains("\"要介護2\""));
    assert!(
        ts_type(&ts, "Sex").contains("\"男\" | \"女\""),
        "{}",
        ts_type(&ts, "Sex")
    );

    // Entries carry their author's keys at the top level (`#[serde(flatten)]`).
    let log = ts_type(&ts, "LogEntry");
    assert!(
        log.contains("facility_name: string") && log.contains("recorded_at: string"),
        "{log}"
    );

    // The field keys are the dotted keys the services parse.
    let fields = ts_type(&ts, "PlanField");
    for field in PlanField::ALL {
        assert!(
            fields.contains(&format!("\"{}\"", field.key())),
            "{fields} lacks {field}"
        );
    }

    // Placements: what the TypeScript allows is what serde reads.
    assert_eq!(
        ts_type(&ts, "PlacementInput"),
        "export type PlacementInput = \"first\" | \"last\" | { before: string } | { after: string }"
    );
    for json in [
        r#""first""#,
        r#""last""#,
        r#"{"before":"a1b2"}"#,
        r#"{"after":"a1b2"}"#,
    ] {
        serde_json::from_str::<PlacementInput>(json).expect(json);
    }
}

/// The referral letter's `fhir_source` is never serialised and its field keys are dotted; the
/// TypeScript must say the same.
#[test]
fn referral_typescript_describes_the_json_serde_writes() {
    use musubi_crdt::documents::referral::{ReferralField, ReferralLetter};

    let ts = fresh_bindings();
    let letter = ReferralLetter {
        fhir_source: Some("{}".into()),
        ..ReferralLetter::default()
    };
    let json = serde_json::to_value(&letter).expect("serialise");
    assert!(json.get("fhir_source").is_none());
    let ts_letter = ts_type(&ts, "ReferralLetter");
    assert!(!ts_letter.contains("fhir_source"), "{ts_letter}");
    for key in json.as_object().expect("object").keys() {
        assert!(
            ts_letter.contains(&format!("{key}: ")),
            "{ts_letter} lacks {key}"
        );
    }
    let fields = ts_type(&ts, "ReferralField");
    for field in ReferralField::ALL {
        assert!(
            fields.contains(&format!("\"{}\"", field.key())),
            "{fields} lacks {field}"
        );
    }
    assert!(
        ts_type(&ts, "ReferralStatus")
            .contains("\"draft\" | \"sent\" | \"received\" | \"replied\"")
    );
}

fn invite(invite: musubi_crdt::invite::InviteFor, expires_at_ms: u64) -> String {
    use musubi_crdt::crypto::DeviceSecrets;
    let relay = DeviceSecrets::from_seeds([1; 32], [1; 32]).device_id();
    musubi_crdt::invite::InviteCode {
        deployment: musubi_crdt::ids::DeploymentId::from_random_bytes([2; 16]),
        relay,
        addrs: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}")],
        authority: DeviceSecrets::from_seeds([3; 32], [3; 32]).device_id(),
        invite,
        expires_at_ms,
        secret: vec![9; 32],
    }
    .encode()
}

/// The join screen shows what a pasted code enrols and the authority's fingerprint before anything
/// is sent; codes that are not invites, or ran out, are named as such.
#[test]
fn a_pasted_invite_code_is_read_before_joining() {
    use musubi_crdt::ids::{FacilityId, FacilityRole};
    use musubi_crdt::invite::InviteFor;
    use musubi_desktop::commands::session::{InviteKind, preview_invite};
    use musubi_desktop::error::ErrorKind;

    let authority = musubi_crdt::crypto::DeviceSecrets::from_seeds([3; 32], [3; 32]).device_id();
    let fingerprint = musubi_crdt::directory::authority_fingerprint(&authority);

    let clinic = invite(
        InviteFor::NewFacility {
            name: "七尾市立診療所".into(),
            role: FacilityRole::Clinic,
        },
        2_000,
    );
    let p = preview_invite(&format!("  {clinic}\n"), 1_000).expect("a new facility's invite");
    assert_eq!(p.kind, InviteKind::NewFacility);
    assert_eq!(p.facility_name, "七尾市立診療所");
    assert_eq!(p.role, Some(FacilityRole::Clinic));
    assert_eq!(p.authority_fingerprint, fingerprint);
    assert_eq!(p.expires_at_ms, 2_000.0);
    assert_eq!(p.authority_fingerprint.split(' ').count(), 6);

    let laptop = invite(
        InviteFor::Device {
            facility: FacilityId::from_random_bytes([4; 16]),
            facility_name: "小丸山小学校 避難所".into(),
        },
        2_000,
    );
    let p = preview_invite(&laptop, 1_000).expect("a device invite");
    assert_eq!(p.kind, InviteKind::Device);
    assert_eq!(p.facility_name, "小丸山小学校 避難所");
    assert_eq!(p.role, None);

    let expired = preview_invite(&laptop, 2_000).expect_err("expired");
    assert_eq!(expired.kind, ErrorKind::InviteExpired);
    for garbage in ["hello", "musubi1abc", &clinic[..clinic.len() - 5]] {
        let e = preview_invite(garbage, 1_000).expect_err(garbage);
        assert_eq!(e.kind, ErrorKind::BadInvite, "{garbage}");
    }
}

/// A safety number read out by phone is typed with or without spaces, or in full-width digits from
/// a Japanese input method; anything but 30 digits is refused before the engine is asked.
#[test]
fn a_typed_safety_number_is_read_in_any_spacing_and_width() {
    use musubi_desktop::commands::trust::normalize_safety_number;
    use musubi_desktop::error::ErrorKind;

    let want = "12345 67890 12345 67890 12345 67890";
    for typed in [
        want,
        "123456789012345678901234567890",
        "１２３４５　６７８９０　１２３４５　６７８９０　１２３４５　６７８９０",
        " 12345-67890-12345-67890-12345-67890\n",
    ] {
        assert_eq!(
            normalize_safety_number(typed).map_err(|e| e.kind),
            Ok(want.to_owned()),
            "{typed}"
        );
    }
    for typed in ["", "12345 67890", "12345 67890 12345 67890 12345 6789O"] {
        assert_eq!(
            normalize_safety_number(typed).map_err(|e| e.kind),
            Err(ErrorKind::InvalidInput),
            "{typed}"
        );
    }
}

/// The new trust errors reach the UI as kinds it can branch on.
#[test]
fn trust_errors_cross_ipc_as_their_own_kinds() {
    use musubi_desktop::error::{AppError, ErrorKind};
    use musubi_facility::EngineError;
    use musubi_facility::net::SyncError;

    let mismatch = AppError::from(EngineError::SafetyNumber {
        facility: "恵寿総合病院".into(),
        given: "1".into(),
    });
    assert_eq!(mismatch.kind, ErrorKind::SafetyNumberMismatch);
    assert_eq!(
        AppError::from(EngineError::UnknownDevice("12D3KooW...".into())).kind,
        ErrorKind::NotFound
    );
    assert_eq!(
        AppError::from(EngineError::Trust("no".into())).kind,
        ErrorKind::Trust
    );
    assert_eq!(
        AppError::from(EngineError::InvalidExpiry).kind,
        ErrorKind::InvalidInput
    );
    assert_eq!(
        AppError::from(SyncError::InviteRefused(
            "this invite was already used".into()
        ))
        .kind,
        ErrorKind::InviteRefused
    );
    let json = serde_json::to_value(&mismatch).expect("serialise");
    assert_eq!(json["kind"], "safety_number_mismatch");
}

/// A device with one staff member signed in at an [`Unlocked`] session (the engine as the app has it).
fn signed_in(
    dir: &Path,
    login: &str,
    role: musubi_facility::staff::StaffRole,
) -> musubi_desktop::state::Unlocked {
    use musubi_facility::{Engine, staff};
    let engine = Engine::init(&dir.join("d"), "受付", "correct horse battery", 10).expect("init");
    staff::create(
        &engine,
        "admin",
        "管理 者",
        "correct horse",
        staff::StaffRole::Admin,
    )
    .expect("the administrator");
    let who = if login == "admin" {
        staff::find(&engine, "admin").expect("find").expect("admin")
    } else {
        staff::create(&engine, login, "佐藤 一郎", "correct horse", role).expect("create")
    };
    let mut u = musubi_desktop::state::Unlocked::new(engine);
    let state = musubi_desktop::state::AppState::new(dir.to_owned(), false);
    musubi_desktop::commands::session::start_session(
        &state,
        &mut u,
        &who,
        musubi_desktop::commands::session::SignInMethod::Password,
    )
    .expect("sign in");
    u
}

/// The audit entries of `u`'s device: (action, staff, fields).
fn audit_of(u: &musubi_desktop::state::Unlocked) -> Vec<(String, Option<String>, Vec<String>)> {
    musubi_facility::audit::list(&u.engine, &musubi_facility::audit::Filter::default())
        .expect("audit list")
        .into_iter()
        .map(|r| (r.action, r.staff, r.fields))
        .collect()
}

/// The shell enforces the idle lock itself: a command after the idle time (and its grace) locks the
/// session, records `lock`, and is refused; so is every later one, however soon, until the staff
/// member signs in again, which keeps their session (the desk stays) and records `sign-in`.
#[test]
fn an_idle_session_locks_itself_and_refuses_staff_commands_until_signed_in_again() {
    use std::time::{Duration, Instant};

    use musubi_desktop::commands::session::{SignInMethod, start_session};
    use musubi_desktop::error::ErrorKind;
    use musubi_desktop::state::{AppState, IdleLock, LockReason};
    use musubi_facility::staff::StaffRole;

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut u = signed_in(tmp.path(), "sato", StaffRole::Staff);
    let lock = IdleLock {
        idle: Duration::from_secs(8),
        fixed: false,
    };
    assert_eq!(lock.touch_every(), Duration::from_secs(2));
    assert_eq!(lock.limit(), Duration::from_secs(15));
    let ten = IdleLock {
        idle: Duration::from_secs(600),
        fixed: false,
    };
    assert_eq!(ten.touch_every(), Duration::from_secs(30));

    let who = u.active_staff(lock.limit()).expect("an open session");
    assert_eq!(who.login, "sato");
    // A laptop closed for a while: the monotonic clock did not count the sleep, the wall clock did.
    u.last_active = Instant::now();
    u.last_active_wall = std::time::SystemTime::now() - Duration::from_secs(16);
    let refused = u.active_staff(lock.limit()).expect_err("idle too long");
    assert_eq!(refused.kind, ErrorKind::SessionLocked);
    assert!(u.locked, "the session is locked");
    assert_eq!(u.staff.as_ref().map(|s| s.login.as_str()), Some("sato"));
    u.last_active = Instant::now();
    assert_eq!(
        u.active_staff(lock.limit()).map_err(|e| e.kind).err(),
        Some(ErrorKind::SessionLocked),
        "a locked session stays locked whatever the time"
    );
    // Locking again records nothing more.
    u.lock(LockReason::Manual);

    let state = AppState::new(tmp.path().to_owned(), false);
    start_session(&state, &mut u, &who, SignInMethod::Card).expect("sign in again");
    assert!(!u.locked);
    assert_eq!(
        u.active_staff(lock.limit()).expect("open again").login,
        "sato"
    );

    let tail: Vec<_> = audit_of(&u).into_iter().rev().take(3).rev().collect();
    assert_eq!(
        tail,
        [
            (
                "sign-in".into(),
                Some("sato".into()),
                vec!["password".into()]
            ),
            ("lock".into(), Some("sato".into()), vec!["idle".into()]),
            ("sign-in".into(), Some("sato".into()), vec!["card".into()]),
        ]
    );
}

/// Another staff member signing in at a locked session replaces it: the one before is recorded as
/// signed out, and their desk is dropped.
#[test]
fn another_staff_member_signing_in_at_a_locked_session_starts_afresh() {
    use musubi_desktop::commands::session::{SignInMethod, start_session};
    use musubi_desktop::state::{AppState, LockReason};
    use musubi_facility::staff::{self, StaffRole};

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut u = signed_in(tmp.path(), "sato", StaffRole::Staff);
    u.lock(LockReason::Manual);
    let admin = staff::find(&u.engine, "admin")
        .expect("find")
        .expect("admin");
    let state = AppState::new(tmp.path().to_owned(), false);
    start_session(&state, &mut u, &admin, SignInMethod::Password).expect("sign in");
    assert!(!u.locked);
    assert!(u.desk.is_none());
    assert_eq!(u.engine.staff(), Some("admin"));
    let tail: Vec<_> = audit_of(&u).into_iter().rev().take(3).rev().collect();
    assert_eq!(
        tail,
        [
            ("lock".into(), Some("sato".into()), vec!["manual".into()]),
            ("sign-out".into(), Some("sato".into()), vec![]),
            (
                "sign-in".into(),
                Some("admin".into()),
                vec!["password".into()]
            ),
        ]
    );
}

/// Sign-in refusals reach the UI as kinds it can branch on, with the numbers its sentences name.
#[test]
fn sign_in_refusals_cross_ipc_with_what_to_wait_for() {
    use musubi_desktop::error::{AppError, ErrorKind};
    use musubi_facility::card::{CardError, PinKind};
    use musubi_facility::staff::StaffError;

    let paused = AppError::from(StaffError::LockedOut { retry_after_s: 30 });
    assert_eq!(paused.kind, ErrorKind::SignInLocked);
    assert_eq!(paused.retry_after_s, Some(30));
    let json = serde_json::to_value(&paused).expect("serialise");
    assert_eq!(json["kind"], "sign_in_locked");
    assert_eq!(json["retry_after_s"], 30);
    assert_eq!(json["tries_left"], serde_json::Value::Null);

    let wrong = AppError::from(StaffError::WrongStaffPin { tries_left: 3 });
    assert_eq!(
        (wrong.kind, wrong.tries_left),
        (ErrorKind::WrongPin, Some(3))
    );
    let card_pin = AppError::from(StaffError::Card(Box::new(CardError::WrongPin {
        which: PinKind::UserAuthentication,
        tries_left: 2,
    })));
    assert_eq!(
        (card_pin.kind, card_pin.tries_left),
        (ErrorKind::WrongPin, Some(2))
    );
    for locked in [
        StaffError::StaffPinLocked,
        StaffError::Card(Box::new(CardError::PinBlocked {
            which: PinKind::UserAuthentication,
        })),
        StaffError::Card(Box::new(CardError::LastTry {
            which: PinKind::UserAuthentication,
        })),
    ] {
        assert_eq!(AppError::from(locked).kind, ErrorKind::PinLocked);
    }
    assert_eq!(
        AppError::from(StaffError::UnknownCard).kind,
        ErrorKind::UnknownCard
    );
    assert_eq!(
        AppError::from(StaffError::Card(Box::new(CardError::NoCard(
            std::time::Duration::from_secs(20)
        ))))
        .kind,
        ErrorKind::NoCard
    );
    assert_eq!(
        AppError::from(StaffError::Card(Box::new(CardError::NoReader))).kind,
        ErrorKind::Card
    );
}
