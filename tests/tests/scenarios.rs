//! Scenario tests: the real `musubi-node` relay and `musubi` facility processes on loopback, each test the
//! story of the people who use them (issue 2, "Acceptance").
//!
//! Needs the binaries: `cargo build --workspace --bins` first (`scripts/test.sh` does it).
//! The scenarios run one at a time (a process-wide lock): each starts several processes, and CI has 2 cores.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::crypto::{self, domain};
use musubi_crdt::documents::referral::{self, ReferralField};
use musubi_crdt::ids::{DocumentId, DocumentKind, Epoch, Role, Seq};
use musubi_crdt::limits::{BUNDLE_BYTES_MAX, FRAME_BYTES_MAX};
use musubi_crdt::ops::Member;
use musubi_crdt::protocol::{
    ErrorCode, PushItem, PushResult, Request, Response, WIRE_VERSION, decode_response,
    encode_request,
};
use musubi_tests::facility::STREAM_TIMEOUT;
use musubi_tests::raw::{RawClient, random_key};
use musubi_tests::relay::count_bundles;
use musubi_tests::{Facility, World, files, poll_every, referral_bundle_path};
use serde_json::Value;

#[path = "scenarios/attacks.rs"]
mod attacks;
#[path = "scenarios/audit.rs"]
mod audit;
#[path = "scenarios/card.rs"]
mod card;
#[path = "scenarios/careplan.rs"]
mod careplan;
#[path = "scenarios/desktop.rs"]
mod desktop;
#[path = "scenarios/hostile.rs"]
mod hostile;
#[path = "scenarios/operations.rs"]
mod operations;
#[path = "scenarios/outage.rs"]
mod outage;
#[path = "scenarios/shelter.rs"]
mod shelter;
#[path = "scenarios/simulation.rs"]
mod simulation;

static SERIAL: Mutex<()> = Mutex::new(());

/// One scenario at a time in this process (a failed one does not block the rest).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints a step of the story with the time since the scenario began.
struct Story(Instant, &'static str);

impl Story {
    fn new(name: &'static str) -> Self {
        eprintln!("=== {name}");
        Self(Instant::now(), name)
    }
    fn step(&self, what: &str) {
        eprintln!(
            "[{} {:>7.2}s] {what}",
            self.1,
            self.0.elapsed().as_secs_f64()
        );
    }
}

const CLINIC_A: &str = "港診療所";
const HOSPITAL_B: &str = "東京第一テスト病院";
const CLINIC_C: &str = "山手クリニック";

/// Relay, clinic A and hospital B (one device), each enrolled; A has synced the directory with B in it.
fn relay_a_b(world: &World) -> (musubi_tests::Relay, Facility, Facility) {
    let relay = world.relay();
    let a = world.enrolled_facility(&relay, "clinic-a", CLINIC_A, "clinic");
    let b = world.enrolled_facility(&relay, "hospital-b1", HOSPITAL_B, "clinic");
    a.sync_once();
    (relay, a, b)
}

/// The text of a field of `show --json`.
fn field(letter: &Value, key: &str) -> String {
    letter
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("letter has no text field `{key}`:\n{letter:#}"))
        .to_owned()
}

/// The document a letter lives in, from the sender's `bundle list --json`.
fn letter_doc(sender: &Facility, letter_id: &str) -> DocumentId {
    let bundles = sender.bundles();
    let docs: BTreeSet<String> = bundles
        .iter()
        .filter_map(|b| b.get("doc").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let doc = if docs.contains(letter_id) {
        letter_id.to_owned()
    } else {
        assert_eq!(
            docs.len(),
            1,
            "cannot tell the letter's document among {docs:?} (letter id {letter_id})"
        );
        docs.into_iter().next().expect("one")
    };
    doc.parse()
        .unwrap_or_else(|e| panic!("`bundle list` doc {doc} is not a document id: {e}"))
}

/// The letter's fields that are the same at sender and recipient (not the workflow status).
fn content(letter: &Value) -> Value {
    let mut l = letter.clone();
    if let Some(o) = l.as_object_mut() {
        o.remove("status");
    }
    l
}

/// Every `entry[].resource` of `input` must be in `output`, unchanged, under the same `fullUrl`.
fn assert_entries_unchanged(input: &Value, output: &Value) {
    let index = |b: &Value| -> BTreeMap<String, Value> {
        b.get("entry")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("not a FHIR Bundle with entries:\n{b:#}"))
            .iter()
            .map(|e| {
                let url = e
                    .get("fullUrl")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("entry without fullUrl: {e:#}"));
                (
                    url.to_owned(),
                    e.get("resource").cloned().unwrap_or(Value::Null),
                )
            })
            .collect()
    };
    let (inp, out) = (index(input), index(output));
    assert!(!inp.is_empty(), "the input Bundle has entries");
    for (url, resource) in &inp {
        let got = out.get(url).unwrap_or_else(|| {
            panic!(
                "the exported Bundle lacks the entry {url} ({}); it has {:?}",
                resource["resourceType"],
                out.keys()
            )
        });
        assert!(
            got == resource,
            "the entry {url} ({}) changed on the way\n--- input ---\n{resource:#}\n--- exported ---\n{got:#}",
            resource["resourceType"]
        );
    }
}

// ---------------------------------------------------------------------------------------------------------

/// 港診療所 imports the real JP eReferral Bundle and sends it to 東京第一テスト病院, which has two devices.
/// Both devices read the same letter; the second exports it back with every entry resource unchanged;
/// the hospital's reply reaches the clinic.
#[test]
fn referral_reaches_both_devices_of_the_recipient() {
    let _serial = serial();
    let story = Story::new("referral_reaches_both_devices_of_the_recipient");
    let world = World::new("referral");
    let (relay, a, b1) = relay_a_b(&world);
    story.step("the hospital enrols its second device");
    let b2 = world.enrolled_device(&relay, &b1, "hospital-b2");
    assert_eq!(
        b2.id(),
        b1.id(),
        "the second device belongs to the same facility"
    );
    a.sync_once();

    story.step("the clinic imports the real FHIR referral and sends it");
    let input: Value =
        serde_json::from_slice(&fs::read(referral_bundle_path()).expect("read the Bundle"))
            .expect("Bundle is JSON");
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    let at_a = a.show(&id);
    assert_eq!(field(&at_a, "id"), id);
    assert!(
        matches!(field(&at_a, "status").as_str(), "sent" | "draft"),
        "a just-imported letter is sent (or a draft until pushed): {at_a:#}"
    );
    a.sync_once();
    assert_eq!(
        a.pending(),
        0,
        "after `sync --once` nothing is pending at the clinic"
    );

    story.step("both hospital devices sync");
    for _ in 0..2 {
        b1.sync_once();
        b2.sync_once();
    }
    let at_b1 = b1.show(&id);
    let at_b2 = b2.show(&id);
    assert_eq!(
        field(&at_b1, "id"),
        id,
        "the letter has the same id at the hospital"
    );
    assert!(
        b1.letter_ids().contains(&id) && b2.letter_ids().contains(&id),
        "both devices list the letter"
    );
    assert_eq!(
        at_b1, at_b2,
        "both devices of the hospital see the same letter"
    );
    assert_eq!(
        content(&at_b1),
        content(&at_a),
        "the hospital sees what the clinic sent"
    );
    assert!(
        matches!(field(&at_b1, "status").as_str(), "sent" | "received"),
        "the letter is sent or received at the hospital: {at_b1:#}"
    );
    let patient = at_b1.get("patient").cloned().unwrap_or_default();
    assert_eq!(
        patient.get("name").and_then(Value::as_str),
        Some("田中 太郎"),
        "the patient of the Bundle: {patient:#}"
    );
    assert!(
        field(&at_b1, "from_facility").contains(CLINIC_A),
        "紹介元 is the clinic of the Bundle: {at_b1:#}"
    );

    story.step("the hospital's second device exports the letter as FHIR");
    let exported = b2.export_fhir(&id);
    assert_eq!(
        exported.get("resourceType").and_then(Value::as_str),
        Some("Bundle")
    );
    assert_entries_unchanged(&input, &exported);

    story.step("the hospital replies; the clinic reads the reply");
    let reply = "返書: ご紹介ありがとうございました。本日外来にて拝見し、精査の上で改めてご報告いたします。";
    b1.reply(&id, reply);
    b1.sync_once();
    a.sync_once();
    let at_a = a.show(&id);
    assert_eq!(
        field(&at_a, "status"),
        "replied",
        "the clinic sees the letter as replied: {at_a:#}"
    );
    assert_eq!(field(&at_a, "reply"), reply);
    b2.sync_once();
    assert_eq!(
        field(&b2.show(&id), "reply"),
        reply,
        "the hospital's other device sees the reply too"
    );
    story.step("done");
}

/// With the relay down, the clinic edits 備考 and the hospital replies and edits 備考 too; after the relay
/// is back both hold identical letters in which every edit survived.
#[test]
fn offline_edits_converge() {
    let _serial = serial();
    let story = Story::new("offline_edits_converge");
    let world = World::new("offline");
    let (mut relay, a, b) = relay_a_b(&world);
    let id = a.import_fhir(b.id(), &referral_bundle_path());
    let base = "紹介状の原本は郵送済み。";
    a.edit(&id, "remarks", base);
    a.sync_once();
    b.sync_once();
    assert_eq!(field(&b.show(&id), "remarks"), base);

    story.step("the relay goes down");
    relay.kill();
    let refused = a.run("sync", &["--once", "--timeout", "3"]).expect_fail();
    assert!(
        !refused.stderr.trim().is_empty(),
        "`sync --once` without a relay says why it failed"
    );

    story.step("both edit 備考 offline; the hospital replies");
    let prefix = "【港診療所より追記】至急ご高診をお願いします。";
    let suffix = "【東京第一テスト病院より追記】来週火曜に受診予約済み。";
    let reply = "返書: 拝見しました。外来で経過を診ます。";
    a.edit(&id, "remarks", &format!("{prefix}{base}"));
    b.edit(&id, "remarks", &format!("{base}{suffix}"));
    b.reply(&id, reply);
    assert!(a.pending() >= 1, "the clinic's edit waits in its outbox");
    assert!(
        b.pending() >= 2,
        "the hospital's edit and reply wait in its outbox"
    );
    assert_eq!(
        field(&a.show(&id), "remarks"),
        format!("{prefix}{base}"),
        "the clinic reads its own edit offline"
    );

    story.step("the relay is back; both sync");
    relay.start();
    a.sync_once();
    b.sync_once();
    a.sync_once();
    let at_a = a.show(&id);
    let at_b = b.show(&id);
    assert_eq!(
        at_a, at_b,
        "clinic and hospital converge to identical letters"
    );
    assert_eq!(
        field(&at_a, "remarks"),
        format!("{prefix}{base}{suffix}"),
        "both concurrent edits of 備考 survive"
    );
    assert_eq!(field(&at_a, "reply"), reply);
    assert_eq!(field(&at_a, "status"), "replied");
    assert_eq!(
        (a.pending(), b.pending()),
        (0, 0),
        "nothing is left pending"
    );
    story.step("done");
}

/// Twenty marker strings written at the facilities never appear in a file the relay wrote, nor in a
/// facility's data directory, while the recipient reads every one of them.
#[test]
fn confidentiality_grep() {
    let _serial = serial();
    let story = Story::new("confidentiality_grep");
    let world = World::new("confidentiality");
    let (mut relay, a, b1) = relay_a_b(&world);
    let mut b2 = world.enrolled_device(&relay, &b1, "hospital-b2");
    a.sync_once();
    let id = a.import_fhir(b1.id(), &referral_bundle_path());
    b1.sync_once();
    b2.sync_once();

    let markers: Vec<String> = (1..=10)
        .flat_map(|i| [format!("MARKER-7f3a-{i:02}"), format!("極秘マーカー{i:02}")])
        .collect();
    let m = |i: usize| markers[i - 1].as_str();

    story.step("the clinic writes markers into six fields");
    for (n, key) in [
        "remarks",
        "purpose",
        "history",
        "progress",
        "treatment",
        "prescription",
    ]
    .iter()
    .enumerate()
    {
        let (x, y) = (m(2 * n + 1), m(2 * n + 2));
        a.edit(&id, key, &format!("患者情報 {x} 本文の続き。{y} 以上。"));
    }
    a.edit(
        &id,
        "diagnosis",
        &format!("高血圧症 {} / 糖尿病 {}", m(13), m(14)),
    );
    a.sync_once();

    story.step("the hospital replies with markers on one device and edits on the other");
    b1.reply(
        &id,
        &format!(
            "返書 {} 拝見しました {} 追って連絡します {} {}",
            m(15),
            m(16),
            m(17),
            m(18)
        ),
    );
    b1.sync_once();
    b2.sync_once();
    let remarks = field(&b2.show(&id), "remarks");
    b2.edit(
        &id,
        "remarks",
        &format!("{remarks} 追記 {} {}", m(19), m(20)),
    );
    b2.start_watch();
    b2.sync_once();
    a.sync_once();
    b1.sync_once();

    story.step("self-check: the recipient and the sender read all twenty markers");
    let shown_b1 = b1.run_ok("referral show", &[&id, "--json"]);
    let shown_a = a.run_ok("referral show", &[&id, "--json"]);
    for mk in &markers {
        assert!(
            shown_b1.contains(mk.as_str()),
            "the hospital does not read marker {mk}:\n{shown_b1}"
        );
        assert!(
            shown_a.contains(mk.as_str()),
            "the clinic does not read marker {mk}:\n{shown_a}"
        );
    }

    story.step("grep every file the relay and the facilities wrote");
    b2.stop_watch();
    relay.kill();
    let mut needles: Vec<Vec<u8>> = markers.iter().map(|s| s.as_bytes().to_vec()).collect();
    // Plaintext of the imported Bundle must not lie on disk either.
    for s in [
        "田中 太郎",
        "タナカ タロウ",
        "神奈川県横浜市港区",
        "03-1234-5678",
    ] {
        needles.push(s.as_bytes().to_vec());
    }
    let logs = world.logs();
    let relay_dirs = [relay.data.as_path(), logs.as_path()];
    let found = files::grep_tree(&relay_dirs, &needles);
    assert!(
        found.is_empty(),
        "plaintext in files of the relay or in logs: {found:#?}\nfiles:\n{}",
        files::listing(&relay.data)
    );
    for f in [&a, &b1, &b2] {
        let found = files::grep_tree(&[f.data.as_path()], &needles);
        assert!(
            found.is_empty(),
            "plaintext in {}'s data directory: {found:#?}\nfiles:\n{}",
            f.name,
            files::listing(&f.data)
        );
        // An Automerge chunk in the clear (document or change) starts with these magic bytes; compressed
        // columns would hide the markers from a plain grep, the header would not. (Random ciphertext holds
        // these four bytes by chance with odds of about one in four thousand per megabyte.)
        let magic = vec![vec![0x85, 0x6f, 0x4a, 0x83]];
        let found = files::grep_tree(&[f.data.as_path(), relay.data.as_path()], &magic);
        assert!(
            found.is_empty(),
            "an Automerge chunk lies unencrypted on disk: {found:#?}"
        );
    }
    // The grep itself works: it finds what the relay may hold in the clear, the facilities' names.
    let names = files::grep_tree(&[relay.data.as_path()], &[HOSPITAL_B.as_bytes().to_vec()]);
    assert!(
        !names.is_empty(),
        "the grep does not even find the directory's facility names in the relay's files"
    );
    story.step("done");
}

/// An enrolled clinic that is not a member of the letter cannot pull or open it; a peer that never
/// enrolled is refused; used and expired invites are refused; a revoked device is refused at once while
/// its facility's other device keeps working.
#[test]
fn non_member_and_strangers_are_refused() {
    let _serial = serial();
    let story = Story::new("non_member_and_strangers_are_refused");
    let world = World::new("refusals");
    let relay = world.relay();
    let a = world.enrolled_facility(&relay, "clinic-a", CLINIC_A, "clinic");
    let b1 = world.enrolled_facility(&relay, "hospital-b1", HOSPITAL_B, "clinic");
    let devices_before = relay.device_ids(b1.id());
    let b2 = world.enrolled_device(&relay, &b1, "hospital-b2");
    let b2_device = relay
        .device_ids(b1.id())
        .into_iter()
        .find(|d| !devices_before.contains(d))
        .expect("the second device is listed under the hospital");
    let mut c = world.facility("clinic-c");
    c.init();
    let c_code = relay.invite_facility(CLINIC_C, "clinic");
    c.join(&c_code);
    a.sync_once();
    let id = a.import_fhir(b1.id(), &referral_bundle_path());
    a.sync_once();
    let doc = letter_doc(&a, &id);

    story.step("clinic C, enrolled but not a member, syncs and never sees the letter");
    c.sync_once();
    assert!(
        !c.letter_ids().contains(&id),
        "a non-member lists the letter"
    );
    c.run("referral show", &[&id, "--json"]).expect_fail();

    story.step("a raw client enrolled like C asks for the letter's bundles and keys");
    let nosy = RawClient::enrol(&relay, "野次馬クリニック", "clinic");
    match nosy.pull_all(doc, Seq(0)) {
        Err((ErrorCode::NotMember, _)) => {}
        other => panic!("a non-member pulled the letter: {other:?}"),
    }
    match nosy.request(&Request::GetKeyGrants { doc }) {
        Response::Error {
            code: ErrorCode::NotMember,
            ..
        } => {}
        other => panic!("a non-member got the letter's key grants: {other:?}"),
    }
    story.step("handed the envelopes, it cannot open them");
    let stored: Vec<_> = relay
        .stored_bundles()
        .into_iter()
        .filter(|s| s.doc == doc.to_string())
        .collect();
    assert!(!stored.is_empty(), "the relay stores the letter's bundles");
    for s in &stored {
        let bytes = s
            .envelope
            .as_ref()
            .expect("the relay's bundles table holds the envelope bytes");
        let env = Envelope::decode(bytes).expect("the relay stores well-formed envelopes");
        env.verify_signature().expect("and genuine ones");
        assert!(
            crypto::open_with(
                nosy.secrets.age_identity(),
                &env.ciphertext,
                BUNDLE_BYTES_MAX
            )
            .is_err()
        );
        assert!(env.open(&random_key()).is_err());
        assert!(
            !files::contains(bytes, "田中".as_bytes()),
            "an envelope holds the patient's name in the clear"
        );
    }

    story.step("a peer that never enrolled is refused");
    let stranger = RawClient::stranger(&relay);
    for req in [
        Request::ListDocuments,
        Request::Pull { doc, after: Seq(0) },
        Request::GetKeyGrants { doc },
    ] {
        match stranger.request(&req) {
            Response::Error {
                code: ErrorCode::NotEnrolled,
                ..
            } => {}
            other => panic!("a stranger's {req:?} was answered with {other:?}"),
        }
    }

    story.step("a used invite and an expired invite are refused");
    let mut again = world.facility("clinic-c-again");
    again.init();
    let out = again.run("join", &[&c_code]).expect_fail();
    assert!(!out.stderr.trim().is_empty(), "a refused join says why");
    let invite = musubi_crdt::invite::InviteCode::decode(&c_code).expect("decode");
    let request = musubi_crdt::invite::JoinRequest::make(
        &invite,
        &stranger.secrets,
        "stranger",
        musubi_tests::raw::now_ms(),
    );
    match stranger.request(&Request::Join {
        request: Box::new(request),
    }) {
        Response::Error {
            code: ErrorCode::InviteInvalid,
            ..
        } => {}
        other => panic!("a used invite was answered with {other:?}"),
    }
    let expiring = relay.invite_facility_expiring("期限切れ診療所", "clinic", "1s");
    thread::sleep(Duration::from_secs(2)); // the invite's lifetime has to pass; nothing to poll
    let mut late = world.facility("clinic-late");
    late.init();
    late.run("join", &[&expiring]).expect_fail();

    story.step("the operator revokes the hospital's second device");
    b1.sync_once();
    b2.sync_once();
    relay.revoke(&b2_device);
    let out = b2.sync_once_result().expect_fail();
    assert!(
        out.stderr.to_lowercase().contains("revoked"),
        "a revoked device is told it was revoked; it said:\n{}",
        out.stderr
    );
    story.step("the hospital's first device keeps working");
    let text = "失効後の追記: 第二端末を紛失したため失効しました。";
    a.edit(&id, "remarks", text);
    a.sync_once();
    b1.sync_once();
    assert_eq!(field(&b1.show(&id), "remarks"), text);
    b2.sync_once_result().expect_fail();
    story.step("done");
}

/// A hostile enrolled peer sends a forged bundle, a bundle of a document it may only read, an oversized
/// bundle and garbage; each gets a clear refusal and the relay keeps serving the clinics.
#[test]
fn hostile_input_is_rejected() {
    let _serial = serial();
    let story = Story::new("hostile_input_is_rejected");
    let world = World::new("hostile");
    let (mut relay, a, b) = relay_a_b(&world);
    let id = a.import_fhir(b.id(), &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    let letter = letter_doc(&a, &id);

    let evil = RawClient::enrol(&relay, "不審な診療所", "clinic");
    let reader = RawClient::enrol(&relay, "閲覧のみ薬局", "clinic");
    let (doc, key) = evil.create_document(
        DocumentKind::Referral,
        &[Member {
            facility: reader.facility(),
            role: Role::Reader,
        }],
    );
    let changes = |text: &str| {
        let mut d = automerge::AutoCommit::new();
        automerge::transaction::Transactable::put(&mut d, automerge::ROOT, "note", text)
            .expect("put");
        Payload::Changes { data: d.save() }
    };

    story.step("sanity: a well-formed bundle of its own document is accepted, twice idempotently");
    let good = evil.seal(doc, &key, &changes("ok"));
    let first = evil.push(vec![PushItem::Bundle {
        envelope: good.clone(),
    }]);
    assert!(
        matches!(first[..], [PushResult::Accepted { seq: Some(_), .. }]),
        "{first:?}"
    );
    let again = evil.push(vec![PushItem::Bundle { envelope: good }]);
    assert!(
        matches!(again[..], [PushResult::Duplicate { .. }]),
        "{again:?}"
    );

    story.step("a bundle whose signature does not verify");
    let mut forged = evil.seal(doc, &key, &changes("forged"));
    forged.ciphertext[20] ^= 0x01;
    let (code, msg) = evil.push_refused(vec![PushItem::Bundle { envelope: forged }]);
    assert_eq!(code, ErrorCode::BadSignature, "{msg}");
    story.step("a bundle that claims another author than the key that signed it");
    let mut impostor = evil.seal(doc, &key, &changes("impostor"));
    impostor.author = reader.device();
    let (code, msg) = evil.push_refused(vec![PushItem::Bundle { envelope: impostor }]);
    assert_eq!(code, ErrorCode::BadSignature, "{msg}");

    story.step("a bundle from a facility that may only read the document");
    let by_reader = reader.seal(doc, &key, &changes("by a reader"));
    let (code, msg) = reader.push_refused(vec![PushItem::Bundle {
        envelope: by_reader,
    }]);
    assert_eq!(code, ErrorCode::Forbidden, "{msg}");
    story.step("a bundle into a letter it is not a member of");
    let intruding = Envelope::seal(
        &evil.secrets,
        evil.facility(),
        letter,
        Epoch(0),
        &random_key(),
        &changes("x"),
    )
    .expect("seal");
    let (code, msg) = evil.push_refused(vec![PushItem::Bundle {
        envelope: intruding,
    }]);
    assert_eq!(code, ErrorCode::NotMember, "{msg}");

    story.step("an oversized bundle (frame under the frame limit)");
    let mut big = Envelope {
        v: musubi_crdt::bundle::ENVELOPE_VERSION,
        doc,
        epoch: Epoch(0),
        key_commitment: key.commitment(),
        facility: evil.facility(),
        author: evil.device(),
        ciphertext: (0..BUNDLE_BYTES_MAX + 1)
            .map(|i| (i * 31 % 251) as u8)
            .collect(),
        signature: vec![],
    };
    big.signature = evil.secrets.sign(domain::BUNDLE, &big.signed_bytes());
    let frame = encode_request(&Request::Push {
        items: vec![PushItem::Bundle { envelope: big }],
    });
    assert!(
        frame.len() < FRAME_BYTES_MAX,
        "the frame itself is within the frame limit"
    );
    let answer = decode_response(
        &evil
            .request_bytes(frame)
            .expect("the relay answers an oversized bundle"),
    )
    .expect("decodable answer");
    match answer {
        Response::Error {
            code: ErrorCode::TooLarge,
            ..
        } => {}
        Response::Pushed { results }
            if matches!(
                results[..],
                [PushResult::Rejected {
                    code: ErrorCode::TooLarge,
                    ..
                }]
            ) => {}
        other => panic!("an oversized bundle was answered with {other:?}"),
    }

    story.step("malformed CBOR, an unknown message and another protocol version");
    let cbor = |v: serde_json::Value| {
        let mut out = Vec::new();
        ciborium::into_writer(&v, &mut out).expect("cbor");
        out
    };
    let garbage = [
        b"\xff\xfe\xfd not cbor at all".to_vec(),
        Vec::new(),
        cbor(serde_json::json!({"v": WIRE_VERSION, "body": {"t": "launch-missile"}})),
        cbor(serde_json::json!({"v": WIRE_VERSION, "body": {"t": "pull", "doc": 7}})),
    ];
    for g in garbage {
        let answer = decode_response(
            &evil
                .request_bytes(g.clone())
                .expect("the relay answers garbage"),
        );
        assert!(
            matches!(
                answer,
                Ok(Response::Error {
                    code: ErrorCode::Malformed,
                    ..
                })
            ),
            "garbage {g:?} was answered with {answer:?}"
        );
    }
    let other = cbor(serde_json::json!({"v": WIRE_VERSION + 1, "body": {"t": "list-documents"}}));
    let answer = decode_response(&evil.request_bytes(other).expect("the relay answers"));
    assert!(
        matches!(
            answer,
            Ok(Response::Error {
                code: ErrorCode::UnsupportedVersion,
                ..
            })
        ),
        "{answer:?}"
    );

    story.step("the relay still serves everyone");
    assert!(relay.is_running(), "the relay survived");
    assert!(
        matches!(
            evil.request(&Request::ListDocuments),
            Response::Documents { .. }
        ),
        "the connection stays usable"
    );
    let text = "攻撃の後も同期できることを確認。";
    a.edit(&id, "remarks", text);
    a.sync_once();
    b.sync_once();
    assert_eq!(field(&b.show(&id), "remarks"), text);
    story.step("done");
}

/// The relay is killed with SIGKILL while the clinic pushes 1,000 edits; after it restarts no
/// acknowledged bundle is missing, the rest are pushed again, each is stored once, and the hospital
/// converges to the clinic's text.
#[test]
fn relay_crash_during_1000_pushes() {
    const EDITS: usize = 1000;
    let _serial = serial();
    let story = Story::new("relay_crash_during_1000_pushes");
    let world = World::new("crash");
    let (mut relay, mut a, b) = relay_a_b(&world);
    let id = a.import_fhir(b.id(), &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    let doc = letter_doc(&a, &id).to_string();
    let before = relay
        .stored_bundles()
        .iter()
        .filter(|s| s.doc == doc)
        .count() as i64;
    let before_total = count_bundles(&relay.db());

    story.step("the relay stops; the clinic makes 1,000 edits offline");
    relay.kill();
    let t = Instant::now();
    // Each edit appends a line of observations and drops the oldest beyond eight, so every bundle both
    // inserts and deletes characters while the text stays short (one CLI call per bundle).
    let line = |i: usize| {
        format!(
            "{i:04} 経過: 血圧 {}/{} mmHg、脈拍 {} 回/分。",
            110 + i % 40,
            60 + i % 30,
            55 + i % 35
        )
    };
    let text_after = |i: usize| {
        (i.saturating_sub(7).max(1)..=i)
            .map(line)
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The first edits are made the way the desktop app makes them: the letter stays loaded in the
    // facility engine (in this process, on A's data directory) and each edit is committed as its own
    // bundle. The last ones go through `musubi referral edit`, one process each (a thousand CLI
    // processes, each loading the letter, would take most of the suite's time on two cores).
    const CLI_EDITS: usize = 20;
    {
        let mut engine = musubi_facility::Engine::open(&a.data, a.passphrase())
            .expect("open the clinic's engine");
        let mut loaded = engine
            .load(doc.parse().expect("doc id"))
            .expect("load the letter");
        for i in 1..=EDITS - CLI_EDITS {
            referral::set_field(&mut loaded.doc, ReferralField::Remarks, &text_after(i))
                .expect("edit 備考");
            let written = engine
                .commit(&mut loaded)
                .unwrap_or_else(|e| panic!("commit edit {i}: {e}"));
            assert_eq!(written, 1, "each edit is one bundle");
        }
    }
    story.step(&format!(
        "{} edits committed by the engine in {:.1} s",
        EDITS - CLI_EDITS,
        t.elapsed().as_secs_f64()
    ));
    for i in EDITS - CLI_EDITS + 1..=EDITS {
        a.edit(&id, "remarks", &text_after(i));
    }
    let text = text_after(EDITS);
    story.step(&format!(
        "1,000 edits took {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let pending = a.pending();
    assert!(
        pending >= EDITS as u64,
        "1,000 bundles are pending, `status` says {pending}"
    );

    story.step("the relay restarts and the clinic streams its pushes");
    relay.start();
    let db = relay.db();
    a.start_watch();
    let target = before_total + EDITS as i64;
    // Kill once at least two push batches are durable (so the clinic has had an acknowledgement) and
    // before the last one is.
    let seen = poll_every(
        "the relay to store part of the stream",
        STREAM_TIMEOUT,
        Duration::from_micros(500),
        &mut || {
            let n = count_bundles(&db);
            assert!(
                n < target,
                "the relay stored all {EDITS} bundles before the test could kill it (stored {n})"
            );
            (n - before_total >= 300).then_some(n)
        },
    );
    relay.kill();
    drop(db);
    story.step(&format!(
        "killed the relay with {} of {EDITS} new bundles stored",
        seen - before_total
    ));

    let acked: Vec<(String, String, u64)> = a
        .acknowledged_bundles()
        .into_iter()
        .filter(|(_, d, _)| *d == doc)
        .collect();
    story.step(&format!(
        "the clinic holds {} acknowledged bundles of the letter",
        acked.len()
    ));
    assert!(
        acked.len() as i64 > before,
        "the clinic recorded acknowledgements of the stream before the crash"
    );

    story.step("the relay restarts: every acknowledged bundle is there");
    relay.start();
    let stored: BTreeMap<String, i64> = relay
        .stored_bundles()
        .into_iter()
        .filter(|s| s.doc == doc)
        .map(|s| (s.id, s.seq))
        .collect();
    let missing: Vec<_> = acked
        .iter()
        .filter(|(bid, _, _)| !stored.contains_key(bid))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged bundles are missing after the crash: {missing:?}",
        missing.len()
    );
    for (bid, _, seq) in &acked {
        assert_eq!(
            stored[bid] as u64, *seq,
            "bundle {bid} kept the sequence number it was acknowledged with"
        );
    }

    story.step("the clinic re-pushes the rest");
    poll_every(
        "the clinic's outbox to empty",
        STREAM_TIMEOUT,
        Duration::from_millis(250),
        &mut || {
            a.assert_watch_running();
            (a.pending() == 0).then_some(())
        },
    );
    a.stop_watch();
    let rows: Vec<_> = relay
        .stored_bundles()
        .into_iter()
        .filter(|s| s.doc == doc)
        .collect();
    let ids: BTreeSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "each bundle is stored exactly once");
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=rows.len() as i64).collect::<Vec<_>>(),
        "sequence numbers are 1..n without gaps"
    );
    let at_a: BTreeSet<String> = a
        .bundles()
        .iter()
        .filter(|b| b["doc"] == doc.as_str())
        .filter_map(|b| b["id"].as_str().map(str::to_owned))
        .collect();
    let at_relay: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        at_a, at_relay,
        "the relay holds exactly the clinic's bundles of the letter"
    );
    assert!(
        rows.len() as i64 >= before + EDITS as i64,
        "all {EDITS} edits reached the relay"
    );

    story.step("the hospital converges");
    b.sync_once();
    let at_b = field(&b.show(&id), "remarks");
    assert_eq!(field(&a.show(&id), "remarks"), text);
    assert_eq!(at_b, text, "the hospital converged to the clinic's text");
    story.step("done");
}
