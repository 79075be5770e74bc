//! Hostile bundles (issue 11): a writer's stolen laptop pushes crafted bundles through the honest relay
//! (which cannot read them, so it takes them), and a lying relay serves a bundle by a facility that is
//! not a member. Every member still reads the letter, in bounded memory, and lists what it
//! quarantined and who sent it.

use std::collections::BTreeSet;

use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::ids::Epoch;
use musubi_crdt::limits::TRANSFER_RECORD_BYTES_MAX;
use musubi_crdt::protocol::{PushItem, PushResult};
use musubi_tests::Facility;
use musubi_tests::fuzz;
use musubi_tests::hostile::{
    LyingRelay, changes_as, deflate_bomb_chunk, forged_file, rebind_actor,
};
use musubi_tests::measure::run_with_peak;
use musubi_tests::raw::RawClient;

use super::{HOSPITAL_B, Story, relay_a_b, serial};

/// Peak resident memory `referral show` may reach with the crafted bundles stored (the bound).
const SHOW_PEAK_KIB_MAX: u64 = 300 * 1024;

/// A change chunk Automerge panics applying (a fuzzing finding kept in the committed corpus).
fn automerge_panics_on() -> Vec<u8> {
    let path = fuzz::corpus_dir("changes").join("regression-0");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `status --json`'s quarantine: (author, reason) of each quarantined bundle.
fn quarantined(f: &Facility) -> Vec<(String, String)> {
    let s = f.status();
    s["quarantined"]
        .as_array()
        .unwrap_or_else(|| panic!("{}'s status has no quarantine list:\n{s:#}", f.name))
        .iter()
        .map(|q| {
            (
                q["author"].as_str().unwrap_or_default().to_owned(),
                q["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `referral show` at `f`, with its peak resident memory (KiB); panics unless it succeeds.
fn show_with_peak(f: &Facility, id: &str) -> (String, u64) {
    let (out, peak) = run_with_peak(f.command("referral show", &[id]));
    assert!(
        out.status.success(),
        "`referral show` failed at {}: {}",
        f.name,
        out.stderr
    );
    (out.stdout, peak)
}

#[test]
fn crafted_bundles_are_quarantined_and_every_member_still_reads_the_letter() {
    let _serial = serial();
    let story =
        Story::new("crafted_bundles_are_quarantined_and_every_member_still_reads_the_letter");
    let world = musubi_tests::World::new("quarantine");
    let (relay, a, b) = relay_a_b(&world);
    let x = world.enrolled_facility(&relay, "outsider", "外部診療所", "clinic");
    x.sync_once();
    let id = a.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();
    let (before, peak_before) = show_with_peak(&b, &id);
    assert!(before.contains("診療情報提供書"), "B reads the letter");
    let doc = id.parse().expect("a letter id is its document id");

    story.step("a thief with the clinic's laptop pushes four crafted bundles through the relay");
    let thief = a.secrets();
    let lying = LyingRelay::of(&relay);
    let key = lying
        .grants(doc)
        .iter()
        .filter(|g| g.epoch == Epoch(0) && g.recipients.contains(&thief.device_id()))
        .find_map(|g| g.open(&thief).ok())
        .expect("the laptop holds the letter's key");
    let seal = |secrets: &musubi_crdt::crypto::DeviceSecrets, facility, data: Vec<u8>| {
        Envelope::seal(
            secrets,
            facility,
            doc,
            Epoch(0),
            &key,
            &Payload::Changes { data },
        )
        .expect("seal")
    };
    let af = a.facility_id();
    let junk = b"not an automerge change at all";
    let mut malformed = musubi_crdt::changes::CHUNK_MAGIC.to_vec();
    malformed.extend_from_slice(&[0, 0, 0, 0, 1, junk.len() as u8]);
    malformed.extend_from_slice(junk);
    let bomb = deflate_bomb_chunk(1 << 30);
    let crafted = [
        seal(&thief, af, malformed),
        seal(&thief, af, bomb.clone()),
        // Written "as" the hospital's device: setting the kind the letter is read by.
        seal(&thief, af, changes_as(&b.device_id(), "")),
        // A change that decodes and verifies, and that Automerge 0.12 panics applying (found by
        // fuzzing, `tests/fuzz/corpus/changes/regression-0`), bound to the thief's device.
        seal(
            &thief,
            af,
            rebind_actor(
                &automerge_panics_on(),
                &fuzz::fixed_secrets().device_id(),
                &thief.device_id(),
            ),
        ),
    ];
    let addr = relay.p2p_addr();
    let client = RawClient::connect(thief.clone(), &addr).expect("connect");
    let results = client.push(
        crafted
            .iter()
            .map(|e| PushItem::Bundle {
                envelope: e.clone(),
            })
            .collect(),
    );
    for r in &results {
        assert!(
            matches!(r, PushResult::Accepted { .. }),
            "the relay cannot read a bundle and takes a writer's: {r:?}"
        );
    }
    eprintln!(
        "deflate bomb: {} bytes compressed, 1 GiB inflated",
        bomb.len()
    );

    story.step("a lying relay also serves a bundle by a facility that is not a member");
    let outsider = x.secrets();
    lying.plant_bundle(&seal(
        &outsider,
        x.facility_id(),
        changes_as(&outsider.device_id(), "careplan"),
    ));

    story.step("both members sync: each still reads the letter, in bounded memory");
    for f in [&b, &a] {
        f.sync_once();
        let (text, peak) = show_with_peak(f, &id);
        eprintln!(
            "{}: `referral show` peak RSS {} KiB (before the crafted bundles, at B: {} KiB)",
            f.name, peak, peak_before
        );
        assert!(
            text.contains("診療情報提供書") && (f.name != b.name || text == before),
            "{} reads the letter as it was:\n{text}",
            f.name
        );
        assert!(
            peak < SHOW_PEAK_KIB_MAX,
            "{}: `referral show` peaked at {peak} KiB",
            f.name
        );
    }

    story.step("the quarantine lists each crafted bundle and who sent it");
    let at_b = quarantined(&b);
    eprintln!("quarantined at B: {at_b:#?}");
    assert_eq!(at_b.len(), 5, "{at_b:#?}");
    let authors: BTreeSet<&str> = at_b.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        authors,
        BTreeSet::from([
            thief.device_id().to_string().as_str(),
            outsider.device_id().to_string().as_str()
        ]),
    );
    let reasons: Vec<&str> = at_b.iter().map(|(_, r)| r.as_str()).collect();
    for expected in [
        "not a valid Automerge change",
        "inflate to more than",
        "not a device actor of",
        "Automerge failed applying them",
        "not a member",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "a reason says {expected:?}: {reasons:#?}"
        );
    }
    let text = b.run_ok("status", &[]);
    assert!(
        text.contains("quarantine 5 bundle(s)") && text.contains(&thief.device_id().to_string()),
        "`musubi status` lists the quarantine:\n{text}"
    );
    let at_a = quarantined(&a);
    assert_eq!(
        at_a.len(),
        5,
        "the clinic's device lists them too: {at_a:#?}"
    );

    story.step("the letter keeps working: the hospital's reply reaches the clinic");
    b.edit(&id, "remarks", "受診予約を取りました。来週火曜の午前です");
    b.sync_once();
    a.sync_once();
    assert!(a.show_text(&id).contains("来週火曜の午前"));
}

/// Maximal records in the hostile transfer file by default: enough that holding them all (as import
/// did) is over the bound, few enough for a CI disk (each is about 9.4 MB).
/// `MUSUBI_HOSTILE_FILE_RECORDS=256` runs the 256 (a 2.4 GB file).
const HOSTILE_FILE_RECORDS: usize = 40;

/// A hostile USB stick: a transfer file of maximal records, each a bundle no one wrote. The hospital
/// imports it in bounded memory, refuses every record, and keeps working.
#[test]
fn a_file_of_maximal_records_imports_in_bounded_memory() {
    let _serial = serial();
    let story = Story::new("a_file_of_maximal_records_imports_in_bounded_memory");
    let world = musubi_tests::World::new("bigfile");
    let (relay, a, b) = relay_a_b(&world);
    b.sync_once();
    let deployment = relay.deployment();

    story.step("a stranger writes a file of maximal records");
    let stranger = musubi_tests::raw::random_secrets();
    let mut envelope = Envelope::seal(
        &stranger,
        a.facility_id(),
        musubi_crdt::ids::DocumentId::from_random_bytes([7; 16]),
        Epoch(0),
        &musubi_tests::raw::random_key(),
        &Payload::Changes { data: vec![1] },
    )
    .expect("seal");
    // Fill the record to its limit: the CBOR of the item adds a few hundred bytes around it.
    envelope.ciphertext = vec![0x5a; TRANSFER_RECORD_BYTES_MAX - 1024];
    let item = PushItem::Bundle { envelope };
    let file = world.path().join("hostile.musubi");
    let records = musubi_tests::env_or("MUSUBI_HOSTILE_FILE_RECORDS", || HOSTILE_FILE_RECORDS);
    forged_file(
        &file,
        deployment,
        &stranger,
        std::iter::repeat_n(&item, records),
    );
    let bytes = std::fs::metadata(&file).expect("the file").len();

    story.step("the hospital imports it");
    let (out, peak) =
        run_with_peak(b.command("bundle import", &[&file.display().to_string(), "--json"]));
    std::fs::remove_file(&file).expect("remove the file");
    eprintln!("import of {records} records ({bytes} bytes): peak RSS {peak} KiB");
    assert!(
        out.status.success(),
        "the import reports what it refused: {}",
        out.stderr
    );
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("the import report");
    assert_eq!(report["new"], 0, "{report:#}");
    assert!(
        peak < SHOW_PEAK_KIB_MAX,
        "importing {bytes} bytes peaked at {peak} KiB"
    );
    let s = b.status();
    assert_eq!(s["pending"], 0, "nothing of the file is queued: {s:#}");
}

/// SIGKILL trials run by default (`MUSUBI_CRASH_TRIALS=K` runs K).
const CRASH_TRIALS_DEFAULT: u64 = 100;

/// Transfer files the hospital writes for the import trials (each holds one more edit).
const IMPORT_FILES: usize = 40;

/// What a killed command was doing.
#[derive(Clone, Copy, Debug)]
enum Killed {
    /// `referral import-fhir`: a document's `Create`, its key grant and its first changes.
    Create,
    /// `share --with C --role reader` (an operation and the grants it needs), or, when C is a
    /// member, `share --remove` (an operation, a new epoch: the key's rotation, and its grants).
    Share,
    /// `bundle import`: operations, grants and bundles from a file.
    Import,
}

/// A power cut at the clinic, again and again: each trial starts a command that writes (creating a
/// letter, sharing it, removing a facility and so rotating the key, importing a file) and kills it
/// with SIGKILL after a random delay. Afterwards the clinic's device syncs: every letter it holds
/// is readable and editable there, reached the relay and the hospital whole, and nothing waits in
/// its outbox. The trial schedule comes from a seed (`MUSUBI_CRASH_SEED=N` replays one); each
/// trial prints its kind and delay.
#[test]
fn commands_killed_at_random_points_leave_no_document_or_epoch_stranded() {
    use rand::{RngExt, SeedableRng};
    let _serial = serial();
    let story = Story::new("commands_killed_at_random_points_leave_no_document_or_epoch_stranded");
    let seed: u64 = musubi_tests::env_or("MUSUBI_CRASH_SEED", rand::random);
    let trials = musubi_tests::env_or("MUSUBI_CRASH_TRIALS", || CRASH_TRIALS_DEFAULT);
    eprintln!("crash seed={seed} (replay with MUSUBI_CRASH_SEED={seed}), {trials} trials");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let world = musubi_tests::World::new("crash");
    let (relay, a, b) = relay_a_b(&world);
    let c = world.enrolled_facility(&relay, "clinic-c", super::CLINIC_C, "clinic");
    c.sync_once();
    a.sync_once();
    let fhir = musubi_tests::referral_bundle_path();
    let first = a.import_fhir(HOSPITAL_B, &fhir);
    a.sync_once();
    b.sync_once();
    b.sync_once();

    story.step("the hospital writes files of its edits for the clinic, each holding one more");
    let files: Vec<String> = (0..IMPORT_FILES)
        .map(|i| {
            b.edit(&first, "remarks", &format!("返書 その{i}"));
            let file = world.path().join(format!("edits-{i}.musubi"));
            b.run_ok("bundle export", &["--out", &file.display().to_string()]);
            file.display().to_string()
        })
        .collect();
    let mut next_file = 0;

    // Each command does real work when it runs: C is shared when it is not a member, removed
    // (rotating the key) when it is; each import brings a file with edits the clinic lacks.
    let c_id = c.id().to_owned();
    let c_is_member = |a: &Facility| {
        a.status()["documents"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == first.as_str()).cloned())
            .is_some_and(|d| {
                d["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["facility"] == c_id.as_str()))
            })
    };
    let mut command = |kind: Killed, a: &Facility| -> (&'static str, Vec<String>) {
        match kind {
            Killed::Create => (
                "referral import-fhir",
                vec!["--to".into(), HOSPITAL_B.into(), fhir.display().to_string()],
            ),
            Killed::Share if c_is_member(a) => (
                "share",
                vec![
                    "--doc".into(),
                    first.clone(),
                    "--with".into(),
                    c_id.clone(),
                    "--remove".into(),
                ],
            ),
            Killed::Share => (
                "share",
                vec![
                    "--doc".into(),
                    first.clone(),
                    "--with".into(),
                    c_id.clone(),
                    "--role".into(),
                    "reader".into(),
                ],
            ),
            Killed::Import => {
                let f = files[next_file.min(files.len() - 1)].clone();
                next_file += 1;
                ("bundle import", vec![f])
            }
        }
    };
    let kinds = [Killed::Create, Killed::Share, Killed::Import];

    story.step("how long each command takes when not killed");
    let mut full = Vec::new();
    for kind in kinds {
        let (sub, args) = command(kind, &a);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = std::time::Instant::now();
        a.run(sub, &args).expect_ok();
        full.push(started.elapsed());
    }
    eprintln!("unkilled durations (create, share, import): {full:?}");

    story.step("the trials");
    let mut killed_runs = 0;
    for trial in 0..trials {
        let k = rng.random_range(0..kinds.len());
        let kind = kinds[k];
        let delay =
            std::time::Duration::from_micros(rng.random_range(0..=full[k].as_micros() as u64));
        let (sub, args) = command(kind, &a);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = a.command(sub, &args);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("start the command");
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().expect("wait for the command");
        let killed = status.code().is_none();
        killed_runs += usize::from(killed);
        eprintln!(
            "trial {trial}: {sub} {} after {delay:?}: {}",
            args.join(" "),
            if killed { "killed" } else { "had finished" }
        );
    }
    eprintln!("{killed_runs} of {trials} commands were killed before they finished");
    assert!(
        killed_runs as u64 * 2 >= trials,
        "most trials kill a command at work"
    );

    story.step("after the last power cut: the clinic syncs, then the hospital");
    a.sync_once();
    a.sync_once();
    b.sync_once();
    b.sync_once();
    let status = a.status();
    assert_eq!(
        status["pending"], 0,
        "nothing waits in the outbox: {status:#}"
    );
    assert_eq!(
        status["rejected"].as_array().map(Vec::len),
        Some(0),
        "the relay refused nothing: {status:#}"
    );
    let docs: Vec<serde_json::Value> = status["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .filter(|d| d["kind"] != "audit")
        .cloned()
        .collect();
    assert!(docs.len() > 1, "some letters were created: {status:#}");
    for d in &docs {
        let id = d["id"].as_str().expect("an id");
        assert_eq!(
            d["operations"], d["relay_operations"],
            "the relay holds every operation of {id}: {d:#}"
        );
        let shown = a.run("referral show", &[id]);
        assert!(
            shown.ok() && shown.stdout.contains("診療情報提供書"),
            "the clinic reads {id} (no epoch without its key): {}",
            shown.stderr
        );
        let shown = b.run("referral show", &[id]);
        assert!(
            shown.ok() && shown.stdout.contains("診療情報提供書"),
            "the hospital reads {id}: {}",
            shown.stderr
        );
    }
    story.step("the shared letter still takes edits both ways");
    a.edit(&first, "purpose", "停電のあとの追記");
    a.sync_once();
    b.sync_once();
    assert!(b.show_text(&first).contains("停電のあとの追記"));
}

/// Whether `client` gets an answer to a harmless request.
fn answered(client: &RawClient) -> bool {
    client
        .try_request(&musubi_crdt::protocol::Request::GetDirectory { known_version: 0 })
        .is_ok()
}

/// A stranger on the shelter's LAN (any key it made) is disconnected by a facility before a frame
/// of its is read; one key holds at most `CONNECTIONS_PER_PEER_MAX` connections to the relay, and
/// the relay goes on serving the clinics.
#[test]
fn a_stranger_gets_no_lan_answer_and_one_key_holds_few_relay_connections() {
    let _serial = serial();
    let story = Story::new("a_stranger_gets_no_lan_answer_and_one_key_holds_few_relay_connections");
    let world = musubi_tests::World::new("strangers");
    let (relay, mut a, b) = relay_a_b(&world);
    b.sync_once();

    story.step("a stranger connects to the clinic's LAN listener and asks for its directory");
    let port = super::attacks::listen_on_lan(&mut a);
    let lan = super::attacks::lan_addr(&a, port);
    super::attacks::lan_gives_nothing(
        &musubi_tests::raw::random_secrets(),
        &b.secrets(),
        &lan,
        &musubi_crdt::protocol::Request::GetDirectory { known_version: 0 },
        "the clinic",
    );

    story.step("one key opens more connections to the relay than it may hold");
    let addr = relay.p2p_addr();
    let key = musubi_tests::raw::random_secrets();
    let max = musubi_crdt::limits::CONNECTIONS_PER_PEER_MAX as usize;
    let held: Vec<RawClient> = (0..max)
        .map(|_| RawClient::connect(key.clone(), &addr).expect("a connection within the limit"))
        .collect();
    for c in &held {
        assert!(answered(c), "connections within the limit are answered");
    }
    match RawClient::connect(key.clone(), &addr) {
        Err(e) => eprintln!("connection {} refused: {e}", max + 1),
        Ok(extra) => assert!(
            !answered(&extra),
            "connection {} of one key is refused",
            max + 1
        ),
    }

    story.step("the relay still serves the clinics");
    a.stop_watch();
    drop(held);
    let id = a.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();
    assert!(b.show_text(&id).contains("診療情報提供書"));
}

/// A key that is not a current device of the deployment (any key, made for the attack) sends the relay
/// full-size frames on every stream a connection may hold, round after round. The relay reads none
/// of them past `UNKNOWN_PEER_FRAME_BYTES_MAX` and its memory stays flat; the stranger's small
/// request is still answered (not enrolled: no place was leaked), a member connected before it and a
/// device enrolled a moment ago on its connection get their full-size frames read, and once the
/// operator revokes that device, its full-size frames are no longer read.
#[test]
fn a_stranger_cannot_make_the_relay_read_large_frames() {
    use musubi_crdt::limits::{FRAME_BYTES_MAX, STREAMS_PER_CONNECTION_MAX};
    use musubi_crdt::protocol::{ErrorCode, Request, Response, decode_response};

    let _serial = serial();
    let story = Story::new("a_stranger_cannot_make_the_relay_read_large_frames");
    let world = musubi_tests::World::new("frames");
    let relay = world.relay();
    let pid = relay.pid().expect("the relay runs");
    let big = vec![0x42u8; FRAME_BYTES_MAX];
    // A frame of 0x42 bytes is not a request: a peer whose frame is read is answered Malformed.
    let read_in_full = |client: &RawClient| match client.request_bytes(big.clone()) {
        Ok(answer) => match decode_response(&answer) {
            Ok(Response::Error {
                code: ErrorCode::Malformed,
                ..
            }) => true,
            other => panic!("a frame of 0x42 bytes is answered as malformed: {other:?}"),
        },
        Err(_) => false,
    };
    let small =
        |client: &RawClient| client.try_request(&Request::GetDirectory { known_version: 0 });
    let member = RawClient::enrol(&relay, "港診療所", "clinic");
    let stranger = RawClient::stranger(&relay);

    story.step("the stranger's small request is answered: not enrolled");
    match small(&stranger) {
        Ok(Response::Error {
            code: ErrorCode::NotEnrolled,
            ..
        }) => {}
        other => panic!("a stranger's small request is answered NotEnrolled: {other:?}"),
    }

    story.step("three rounds of a full-size frame on every stream of its connection at once");
    let hwm = || musubi_tests::measure::vm_hwm_kib(pid).expect("the relay's VmHWM");
    let before = hwm();
    for round in 0..3 {
        let results = stranger.request_pipelined(vec![big.clone(); STREAMS_PER_CONNECTION_MAX]);
        for (i, r) in results.iter().enumerate() {
            assert!(
                r.is_err(),
                "round {round}, frame {i} of the stranger was read and answered: {:?}",
                r.as_ref().map(|b| decode_response(b))
            );
        }
    }
    let after = hwm();
    eprintln!(
        "relay peak RSS {before} KiB before, {after} KiB after 3 × {STREAMS_PER_CONNECTION_MAX} frames of {FRAME_BYTES_MAX} bytes from a stranger"
    );
    assert!(
        after - before < 16 * 1024,
        "the relay's peak RSS grew by {} KiB reading a stranger's frames",
        after - before
    );
    match small(&stranger) {
        Ok(Response::Error {
            code: ErrorCode::NotEnrolled,
            ..
        }) => {}
        other => panic!("the stranger's next small request is still answered: {other:?}"),
    }

    story.step("a member connected before the stranger, and a facility that just joined: read");
    assert!(read_in_full(&member), "the member's full frame is read");
    let joined = RawClient::enrol(&relay, "新規診療所", "clinic");
    assert!(
        read_in_full(&joined),
        "the full frame of a device approved a moment ago is read on its connection"
    );

    story.step("the operator revokes that facility: its device's full frames are no longer read");
    relay.revoke("新規診療所");
    // The relay notices within its db watch, and disconnects the device.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while small(&joined).is_ok_and(|r| {
        !matches!(
            r,
            Response::Error {
                code: ErrorCode::Revoked,
                ..
            }
        )
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the revocation is noticed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let again = RawClient::connect(joined.secrets.clone(), &relay.p2p_addr())
        .expect("the revoked device reconnects");
    match small(&again) {
        Ok(Response::Error {
            code: ErrorCode::Revoked,
            ..
        }) => {}
        other => panic!("the revoked device's small request is answered Revoked: {other:?}"),
    }
    assert!(
        !read_in_full(&again),
        "a revoked device's full frame is not read"
    );
}

/// A lying relay answers the pull of one letter with an honest bundle of another (so that a device
/// would quarantine it, and hide it when it arrives where it belongs). The hospital neither stores
/// nor quarantines it, and reads the edit once the relay files it in its own letter.
#[test]
fn a_relay_cannot_get_an_honest_bundle_quarantined() {
    let _serial = serial();
    let story = Story::new("a_relay_cannot_get_an_honest_bundle_quarantined");
    let world = musubi_tests::World::new("misfiled");
    let (relay, a, b) = relay_a_b(&world);
    let first = a.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());
    let second = a.import_fhir(HOSPITAL_B, &musubi_tests::referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();

    story.step("the clinic edits the first letter; the relay also files the edit under the second");
    a.edit(&first, "remarks", "至急: 本日中に受診してください");
    a.sync_once();
    let lying = LyingRelay::of(&relay);
    let first_doc = first.parse().expect("a document id");
    let (_, edit) = lying
        .bundles(first_doc)
        .into_iter()
        .last()
        .expect("the edit's bundle");
    lying.remove_bundle(&edit);
    lying.plant_bundle_under(second.parse().expect("a document id"), &edit);
    b.sync_once();
    assert!(
        quarantined(&b).is_empty(),
        "a bundle served for another document is not quarantined: {:#?}",
        quarantined(&b)
    );

    story.step("the relay files the edit where it belongs: the hospital reads it");
    lying.remove_bundle(&edit);
    lying.plant_bundle(&edit);
    b.sync_once();
    b.sync_once();
    assert!(b.show_text(&first).contains("本日中に受診"));
    assert!(quarantined(&b).is_empty(), "{:#?}", quarantined(&b));
}
