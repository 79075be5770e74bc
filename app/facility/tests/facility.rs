//! musubi-facility's integration tests: the engine and its services in-process, on a device
//! enrolled by hand (a directory signed by a stand-in relay key), with no relay and no network.
//! Each test is the story of a user; scenario tests with real processes live in `tests/`.

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
