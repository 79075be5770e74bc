//! musubi-facility's integration tests: the engine and its services in-process, on a device
//! enrolled by hand (a directory signed by a stand-in relay key), with no relay and no network.
//! Each test is the story of a user; scenario tests with real processes live in `tests/`.

#[path = "facility/audit.rs"]
mod audit;
#[path = "facility/careplan.rs"]
mod careplan;
#[path = "facility/lying_relay.rs"]
mod lying_relay;
#[path = "facility/referral.rs"]
mod referral;
#[path = "facility/shelter.rs"]
mod shelter;
#[path = "facility/two.rs"]
mod two;

/// A stolen laptop's key file resists guessing: `musubi init` refuses a short passphrase and a cheap
/// scrypt work factor (below 2^16, which only a test harness may ask for), before writing any key.
#[test]
fn init_refuses_a_short_passphrase_and_a_weak_work_factor() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let init = |dir: &str, passphrase: &str, log_n: &str, weak: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_musubi"));
        cmd.args(["init", "--name", "受付", "--scrypt-log-n", log_n, "--data"])
            .arg(tmp.path().join(dir))
            .env("MUSUBI_PASSPHRASE", passphrase)
            .env_remove(musubi_crdt::crypto::WEAK_KDF_FOR_TESTS_ENV);
        if weak {
            cmd.env(musubi_crdt::crypto::WEAK_KDF_FOR_TESTS_ENV, "1");
        }
        let out = cmd.output().expect("run musubi init");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = init("weak", "correct horse battery", "10", false);
    assert!(!ok && err.contains("too weak"), "{err}");
    assert!(
        !tmp.path()
            .join("weak")
            .join(musubi_facility::engine::KEY_FILE)
            .exists()
    );
    let (ok, err) = init("short", "短い合言葉", "16", false);
    assert!(
        !ok && err.contains("at least 8 characters") && err.contains("8文字以上"),
        "{err}"
    );
    let (ok, err) = init("good", "correct horse battery", "16", false);
    assert!(ok, "{err}");
    let (ok, err) = init("test", "correct horse battery", "10", true);
    assert!(ok, "a test harness may ask for a cheap key: {err}");
}

/// A reception PC is shared: another user of the machine reads nothing of a device's data
/// directory (owner-only directory, owner-only key file).
#[test]
fn a_new_device_keeps_its_data_directory_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("reception");
    let _engine = musubi_facility::Engine::init(&dir, "受付", "correct horse battery", 10)
        .expect("init a device");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the data directory");
    assert_eq!(
        mode(&dir.join(musubi_facility::engine::KEY_FILE)),
        0o600,
        "the wrapped device key"
    );
}

/// A stolen laptop's disk does not give away its pseudonym keys (the HMAC keys that turn card
/// numbers into ids): they are kept sealed to the device's key, in no file of the data directory in
/// clear, and the directory is its owner's alone. A shelter's device holds reception's key and the
/// staff cards' key only: it cannot compute the id a clinic gives the same card.
#[test]
fn the_pseudonym_keys_are_sealed_at_rest_and_a_shelter_holds_no_clinic_key() {
    use musubi_crdt::crypto::PseudonymSector;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("reception");
    let passphrase = "correct horse battery";
    let engine =
        musubi_facility::Engine::init(&dir, "受付", passphrase, 10).expect("init a device");
    let mut deployment = musubi_facility::offline::OfflineDeployment::new(7);
    let facility = deployment.add_facility(
        &engine,
        "七尾市立避難所",
        musubi_crdt::ids::FacilityRole::Shelter,
    );
    deployment.enrol(&engine, facility).expect("enrol");
    let keys = engine.pseudonym_keys().expect("the keys");
    assert_eq!(
        keys.sectors(),
        [PseudonymSector::Reception, PseudonymSector::Staff],
        "a shelter holds the keys of reception and of staff cards"
    );
    let card = b"0123456789abcdef";
    let id = engine
        .pseudonym(PseudonymSector::Reception, "felica", card)
        .expect("a pseudonym");
    let staff_id = engine
        .pseudonym(PseudonymSector::Staff, "felica", card)
        .expect("a staff card id");
    assert_ne!(id, staff_id, "one card has unrelated ids in two sectors");
    match engine.pseudonym(PseudonymSector::Clinic, "felica", card) {
        Err(musubi_facility::EngineError::NoPseudonymKey { sector, .. }) => {
            assert_eq!(sector, PseudonymSector::Clinic)
        }
        other => panic!("a shelter computes no clinic id: {other:?}"),
    }
    let secrets: Vec<[u8; 32]> = [PseudonymSector::Reception, PseudonymSector::Staff]
        .into_iter()
        .map(|s| *keys.key(s).expect("held"))
        .collect();
    drop(engine);

    let files = assert_in_no_file(&dir, &secrets, "a pseudonym key");
    assert!(files >= 2, "the store and the key file were read");
    let mode = std::fs::metadata(&dir)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the data directory is its owner's alone");

    let engine = musubi_facility::Engine::open(&dir, passphrase).expect("open again");
    assert_eq!(
        engine
            .pseudonym(PseudonymSector::Reception, "felica", card)
            .expect("a pseudonym"),
        id,
        "a card's id is the same after the device is opened again"
    );
}

/// Whoever seals a device its pseudonym keys (the relay passes the authority's on; another device of
/// the facility seals them again) cannot choose them: keys other than the ones the facility's
/// certificate names are refused at enrolment, and the device is not enrolled.
#[test]
fn pseudonym_keys_the_authority_did_not_certify_are_refused() {
    use musubi_crdt::crypto::PseudonymKeys;
    use musubi_crdt::ids::FacilityRole;
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut deployment = musubi_facility::offline::OfflineDeployment::new(11);
    let engine =
        musubi_facility::Engine::init(&tmp.path().join("c"), "外来", "correct horse battery", 10)
            .expect("init a device");
    let clinic = deployment.add_facility(&engine, "港診療所", FacilityRole::Clinic);
    let chosen = [0x77; 32];
    for (what, plain) in [
        (
            "keys of the attacker's own secret",
            PseudonymKeys::for_role(&chosen, FacilityRole::Clinic).to_plain(),
        ),
        ("a bare secret of the attacker's", chosen.to_vec()),
        (
            "a shelter's keys",
            PseudonymKeys::for_role(&chosen, FacilityRole::Shelter).to_plain(),
        ),
    ] {
        match deployment.enrol_with_keys(&engine, clinic, &plain) {
            Err(musubi_facility::EngineError::Trust(m)) => {
                assert!(
                    m.contains("not the ones the authority certified"),
                    "{what}: {m}"
                )
            }
            other => panic!("{what} are refused: {other:?}"),
        }
        assert!(
            matches!(
                engine.enrolment(),
                Err(musubi_facility::EngineError::NotEnrolled)
            ),
            "{what}: the device is not enrolled"
        );
    }
    deployment
        .enrol(&engine, clinic)
        .expect("the authority's keys are taken");
}

/// A device enrolled before sectors kept the deployment's secret itself (in clear, before it was
/// sealed). When it is next unlocked it keeps only its role's keys, derived as the authority derives
/// them, so its card ids match those of a device enrolled since; the secret is gone from every file
/// of its data directory, free pages and write-ahead log included.
#[test]
fn a_store_from_before_sectors_keeps_only_its_roles_keys() {
    use musubi_crdt::crypto::{self, PseudonymKeys, PseudonymSector};
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("clinic");
    let passphrase = "correct horse battery";
    let engine =
        musubi_facility::Engine::init(&dir, "外来受付", passphrase, 10).expect("init a device");
    let mut deployment = musubi_facility::offline::OfflineDeployment::new(9);
    let role = musubi_crdt::ids::FacilityRole::Clinic;
    let facility = deployment.add_facility(&engine, "港診療所", role);
    deployment.enrol(&engine, facility).expect("enrol");
    let secret: [u8; 32] = std::array::from_fn(|i| 0xA0 ^ i as u8);
    engine
        .store()
        .delete_meta("pseudonym_keys_sealed")
        .expect("as before sectors");
    engine
        .store()
        .set_meta("pseudonym_secret", &secret)
        .expect("as before sectors");
    drop(engine);

    let engine = musubi_facility::Engine::open(&dir, passphrase).expect("unlock");
    for key in ["pseudonym_secret", "pseudonym_secret_sealed"] {
        assert!(
            engine.store().meta(key).expect("meta").is_none(),
            "{key} is no longer kept"
        );
    }
    drop(engine);
    assert_in_no_file(&dir, &[secret], "the deployment's secret");

    let engine = musubi_facility::Engine::open(&dir, passphrase).expect("unlock");
    let keys = engine.pseudonym_keys().expect("the keys");
    assert_eq!(keys, PseudonymKeys::for_role(&secret, role));
    assert_eq!(
        keys.sectors(),
        [PseudonymSector::Clinic, PseudonymSector::Staff]
    );
    let id = engine
        .pseudonym(PseudonymSector::Clinic, "felica", b"card")
        .expect("an id");
    assert_eq!(
        id,
        hex::encode(crypto::pseudonym(
            &crypto::pseudonym_sector_key(&secret, PseudonymSector::Clinic),
            "felica",
            b"card"
        ))
    );
    assert!(
        engine
            .pseudonym(PseudonymSector::Reception, "felica", b"card")
            .is_err()
    );
}

/// Asserts that no file under `dir` holds any of `secrets`, raw or as hex (`what` names them in
/// the failure); returns how many files were read.
fn assert_in_no_file(dir: &std::path::Path, secrets: &[[u8; 32]], what: &str) -> usize {
    let mut files = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read a directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).expect("read a file");
            for secret in secrets {
                let hex = hex::encode(secret);
                assert!(
                    !bytes.windows(32).any(|w| w == secret)
                        && !bytes.windows(hex.len()).any(|w| w == hex.as_bytes()),
                    "{} holds {what} in clear",
                    path.display()
                );
            }
            files += 1;
        }
    }
    files
}
