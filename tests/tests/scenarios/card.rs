//! IC cards at the reception desk (issue 5): a real pcscd with vsmartcard's vpcd reader driver, the
//! `musubi-vcard` emulator on its first slot, and the `musubi card` / `musubi staff` commands.
//!
//! Each scenario owns its pcscd (foreground child, its own reader configuration on free ports) and
//! stops it at the end; they need root (pcscd writes /run/pcscd) and the Debian packages `pcscd` and
//! `vsmartcard-vpcd`, and fail with a message saying so when either is missing.
//! The emulator logs every APDU; the stories assert the sequences: the 個人番号 EF is never selected,
//! a wrong PIN is never retried, and a PIN is never sent when it is not needed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use musubi_tests::facility::{STAFF_LOGIN, STAFF_PASSWORD};
use musubi_tests::vcard::harness::{
    Pcscd, READER_0, VCard, Watch, command_of, run_with_stdin, running_pcscd,
    selects_individual_number, sends_pin,
};
use musubi_tests::{Facility, Output, Relay, World, bin, files, run_command};
use serde_json::Value;

use super::{Story, serial};

const WAIT: Duration = Duration::from_secs(20);

/// A relay, an enrolled shelter facility, pcscd with the vpcd reader, and the emulator on its first slot.
struct Desk {
    world: World,
    _relay: Relay,
    f: Facility,
    pcscd: Pcscd,
    vcard: VCard,
}

fn desk(name: &str) -> Desk {
    let world = World::new(name);
    let relay = world.relay();
    let f = world.enrolled_facility(&relay, "shelter-a", "七尾市立袖ケ江公民館", "shelter");
    let pcscd = Pcscd::start(&world);
    let vcard = VCard::start(&world, pcscd.port(), "vcard");
    Desk {
        world,
        _relay: relay,
        f,
        pcscd,
        vcard,
    }
}

/// `musubi SUB --data DIR ARGS` with `input` on standard input.
fn run_in(f: &Facility, sub: &str, args: &[&str], input: &str) -> Output {
    run_with_stdin(f.command(sub, args), input, Duration::from_secs(120))
}

/// `musubi card read --timeout 10 ARGS` with `input` on standard input.
fn read(f: &Facility, args: &[&str], input: &str) -> Output {
    let mut a = vec!["--timeout", "10"];
    a.extend_from_slice(args);
    run_in(f, "card read", &a, input)
}

fn read_json(f: &Facility, args: &[&str], input: &str) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = read(f, &a, input).expect_ok();
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("`card read --json` printed no JSON ({e}):\n{out}"))
}

fn readers_json() -> Value {
    let mut cmd = Command::new(bin("musubi"));
    cmd.args(["card", "readers", "--json"]);
    let out = run_command(cmd, Duration::from_secs(30)).expect_ok();
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("`card readers --json` printed no JSON ({e}):\n{out}"))
}

fn id_of(v: &Value) -> String {
    let id = v["pseudonymous_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no pseudonymous_id in {v:#}"))
        .to_owned();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "not 64 hex digits: {id}"
    );
    id
}

fn commands(apdus: &[Value]) -> Vec<String> {
    apdus.iter().map(|e| command_of(e).to_owned()).collect()
}

fn assert_no_individual_number(apdus: &[Value]) {
    if let Some(e) = apdus.iter().find(|e| selects_individual_number(e)) {
        panic!("the 個人番号 EF was selected: {e}");
    }
}

fn pins_sent(apdus: &[Value]) -> usize {
    apdus.iter().filter(|e| sends_pin(e)).count()
}

fn assert_absent(dir: &Path, needle: &[u8], what: &str) {
    for f in files::walk(dir) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{what} lies in the clear in {}",
            f.display()
        );
    }
}

fn no_pcscd_runs() {
    if let Some(pid) = running_pcscd() {
        panic!(
            "a pcscd the tests did not start runs (pid {pid}); stop it (systemctl stop pcscd.socket pcscd.service)"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------

/// The reception laptop before and after its card reader works: no pcscd (a state, not a crash), pcscd
/// with no reader, the reader arriving, a card on and off, pcscd crashing with a card on the reader
/// and coming back; `card watch` reports each and keeps running.
#[test]
fn the_desk_sees_the_service_readers_and_cards_come_and_go() {
    let _serial = serial();
    let story = Story::new("card states");
    let world = World::new("card-states");
    no_pcscd_runs();

    story.step("no pcscd: `card readers` reports the state and exits 0; `card read` fails with a clear message");
    let r = readers_json();
    assert_eq!(r["state"]["state"], "service_unavailable", "{r:#}");
    assert!(
        r["message_ja"]
            .as_str()
            .is_some_and(|m| m.contains("pcscd")),
        "{r:#}"
    );
    let mut watch = Watch::start();
    let e = watch.expect("service_unavailable", None, WAIT);
    assert_eq!(e["state"]["state"], "service_unavailable");

    story.step("pcscd starts without any reader");
    let mut pcscd = Pcscd::start_with(&world, false);
    watch.expect("service_available", None, WAIT);
    assert_eq!(readers_json()["state"]["state"], "no_reader");

    story.step("the reader arrives (pcscd restarted with the vpcd reader)");
    pcscd.restart(true);
    watch.expect("service_unavailable", None, WAIT);
    watch.expect("service_available", None, WAIT);
    let e = watch.expect("reader_added", Some(READER_0), WAIT);
    assert!(
        matches!(e["state"]["state"].as_str(), Some("ready" | "no_reader")),
        "{e}"
    );
    let r = readers_json();
    assert_eq!(r["state"]["state"], "ready", "{r:#}");

    story.step("a Suica is placed on the reader and taken off");
    let mut vcard = VCard::start(&world, pcscd.port(), "vcard");
    vcard.insert("suica", "felica");
    let e = watch.expect("card_inserted", Some(READER_0), WAIT);
    assert_eq!(e["state"]["state"], "card_present");
    assert!(
        e["atr"]
            .as_str()
            .is_some_and(|a| a.starts_with("3B8F8001804F0CA000000306")),
        "{e}"
    );
    let r = readers_json();
    let slot = r["readers"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == READER_0))
        .cloned();
    assert_eq!(
        slot.as_ref().map(|s| s["card"].clone()),
        Some(Value::Bool(true)),
        "{r:#}"
    );
    vcard.remove();
    let e = watch.expect("card_removed", Some(READER_0), WAIT);
    assert_eq!(e["state"]["state"], "ready");

    story.step("pcscd crashes with a card on the reader, and comes back");
    vcard.insert("suica", "");
    watch.expect("card_inserted", Some(READER_0), WAIT);
    pcscd.kill();
    let e = watch.expect("service_unavailable", None, WAIT);
    assert_eq!(e["state"]["state"], "service_unavailable");
    pcscd.restart(true);
    watch.expect("service_available", None, WAIT);
    watch.expect("card_inserted", Some(READER_0), WAIT);
    assert!(
        watch.running(),
        "card watch must keep running through a pcscd restart"
    );

    story.step("pcscd stops for good: the watch says so and keeps running");
    pcscd.stop();
    watch.expect("service_unavailable", None, WAIT);
    std::thread::sleep(Duration::from_millis(800));
    assert!(watch.running());
    let out = run_command(
        {
            let mut c = Command::new(bin("musubi"));
            c.args(["card", "readers"]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(
        out.ok(),
        "`card readers` exits 0 without pcscd: {}",
        out.stderr
    );
}

/// A resident taps a My Number card: without any PIN the desk gets a pseudonymous id (the same at every
/// tap, another for another card) and the certificate's expiry; the APDUs are the JPKI certificate
/// read and nothing else, in T=1 and T=0, and nothing that identifies the card lies in the clear.
#[test]
fn a_my_number_card_gives_a_stable_pseudonymous_id_without_pin() {
    let _serial = serial();
    let story = Story::new("my number card identity");
    let mut d = desk("card-mynumber");

    story.step("alice taps her card; no PIN is asked for or sent");
    d.vcard.insert("alice", "mynumber");
    let mark = d.vcard.mark();
    let v = read_json(&d.f, &[], "");
    assert_eq!(v["kind"], "my_number", "{v:#}");
    let alice = id_of(&v);
    assert_eq!(v["expires"], "2035-12-31");
    assert_eq!(v["expired"], false);
    assert_eq!(v["possession_verified"], false);
    assert!(v["attributes"].is_null());
    let apdus = d.vcard.apdus_since(mark);
    let cmds = commands(&apdus);
    assert_eq!(
        cmds[0], "00A4040C0AD392F000260100000001",
        "first the JPKI AP: {cmds:#?}"
    );
    assert_eq!(
        cmds[1], "00A4020C02000A",
        "then the user-authentication certificate: {cmds:#?}"
    );
    let reads = cmds.iter().filter(|c| c.starts_with("00B0")).count();
    assert!(reads >= 3, "the certificate is read in chunks: {cmds:#?}");
    assert_eq!(
        cmds.len(),
        2 + reads,
        "nothing but the certificate read: {cmds:#?}"
    );
    assert!(
        cmds.iter().all(|c| !c.starts_with("0020")),
        "no VERIFY at all: {cmds:#?}"
    );
    assert_no_individual_number(&apdus);

    story.step("the same card again gives the same id; bob's card another");
    assert_eq!(id_of(&read_json(&d.f, &[], "")), alice);
    d.vcard.insert("bob", "mynumber");
    let bob = id_of(&read_json(&d.f, &[], ""));
    assert_ne!(alice, bob);

    story.step("nothing identifying the card lies in the clear, in the output or on disk");
    let st = d.vcard.status("alice");
    let (serial_hex, spki_hex) = (st["serial"].clone(), st["spki"].clone());
    d.vcard.insert("alice", "");
    let out = read(&d.f, &["--json"], "").expect_ok();
    for (what, hex_upper) in [
        ("the certificate serial", &serial_hex),
        ("the public key", &spki_hex),
    ] {
        assert!(
            !out.to_uppercase().contains(hex_upper.as_str()),
            "{what} is printed"
        );
        let bytes = hex::decode(hex_upper).expect("hex");
        assert_absent(&d.f.data, &bytes, what);
        assert_absent(&d.f.data, hex_upper.to_lowercase().as_bytes(), what);
    }

    story.step("an expired certificate is reported as such");
    d.vcard.insert("carol", "mynumber-expired");
    let v = read_json(&d.f, &[], "");
    assert_eq!(v["expired"], true, "{v:#}");
    assert_eq!(v["expires"], "2020-01-01");

    story.step("a T=0 card: data comes through GET RESPONSE, and the id is the same kind");
    d.vcard.insert("dave", "mynumber proto=t0");
    let mark = d.vcard.mark();
    let v = read_json(&d.f, &[], "");
    assert_eq!(v["kind"], "my_number");
    let apdus = d.vcard.apdus_since(mark);
    assert!(
        apdus
            .iter()
            .any(|e| e["r"].as_str().is_some_and(|r| r.starts_with("61"))),
        "61xx answers: {apdus:#?}"
    );
    assert!(
        apdus.iter().any(|e| command_of(e).starts_with("00C00000")),
        "GET RESPONSE: {apdus:#?}"
    );
    assert_no_individual_number(&apdus);
    d.pcscd.stop();
    drop(d.world);
}

/// PIN rules at the desk: the tries left are read and shown before asking, a wrong PIN is never
/// retried (even with another PIN waiting on stdin), the last try needs confirmation, a PIN is never
/// sent when the read does not need it, and only with consent and the PIN are the four attributes read.
#[test]
fn pins_are_counted_shown_never_retried_and_sent_only_when_needed() {
    let _serial = serial();
    let story = Story::new("pin rules");
    let mut d = desk("card-pins");
    d.vcard.insert("hanako", "mynumber pin=4321");

    story.step("with consent and the right PIN: 氏名, 住所, 生年月日, 性別");
    let mark = d.vcard.mark();
    let out = read(&d.f, &["--attributes", "--pin-stdin", "--json"], "4321\n");
    assert!(
        out.stderr.contains("残り3回"),
        "the tries left are shown before the PIN: {}",
        out.stderr
    );
    let v: Value = serde_json::from_str(&out.expect_ok()).expect("JSON");
    assert_eq!(v["attributes"]["name"], "結 花子", "{v:#}");
    assert_eq!(v["attributes"]["address"], "石川県七尾市袖ケ江町イ部25番地");
    assert_eq!(v["attributes"]["birth_date"], "1980-04-01");
    assert_eq!(v["attributes"]["sex"], "female");
    let apdus = d.vcard.apdus_since(mark);
    let cmds = commands(&apdus);
    assert!(
        cmds.contains(&"00A4040C0AD3921000310001010408".to_owned()),
        "券面事項入力補助AP: {cmds:#?}"
    );
    let query = cmds
        .iter()
        .position(|c| c == "00200080")
        .expect("the tries-left query");
    let verify = cmds
        .iter()
        .position(|c| c.starts_with("00200080") && c.len() > 8)
        .expect("the VERIFY");
    assert!(query < verify, "tries are read before the PIN is sent");
    assert_eq!(pins_sent(&apdus), 1);
    assert_no_individual_number(&apdus);

    story.step(
        "a wrong PIN: one VERIFY, the tries left named, no retry even with another PIN on stdin",
    );
    let mark = d.vcard.mark();
    let out = read(&d.f, &["--attributes", "--pin-stdin"], "1111\n4321\n").expect_fail();
    assert!(out.stderr.contains("2 tries left"), "{}", out.stderr);
    assert_eq!(pins_sent(&d.vcard.apdus_since(mark)), 1, "never retried");
    let out = read(&d.f, &["--attributes", "--pin-stdin"], "2222\n").expect_fail();
    assert!(out.stderr.contains("1 tries left"), "{}", out.stderr);
    assert_eq!(d.vcard.status("hanako")["kenhojo_tries"], "1");

    story.step("one try left: refused without the resident's confirmation, nothing sent");
    let mark = d.vcard.mark();
    let out = read(&d.f, &["--attributes", "--pin-stdin"], "4321\n").expect_fail();
    assert!(
        out.stderr.contains("only one try is left"),
        "{}",
        out.stderr
    );
    assert_eq!(pins_sent(&d.vcard.apdus_since(mark)), 0);
    assert_eq!(d.vcard.status("hanako")["kenhojo_tries"], "1");
    let v = read_json(
        &d.f,
        &["--attributes", "--pin-stdin", "--confirm-last-try"],
        "4321\n",
    );
    assert_eq!(v["attributes"]["birth_date"], "1980-04-01");
    assert_eq!(
        d.vcard.status("hanako")["kenhojo_tries"],
        "3",
        "a right PIN resets the counter"
    );

    story.step("a PIN on stdin for a read that needs none is not sent");
    let mark = d.vcard.mark();
    read_json(&d.f, &["--pin-stdin"], "4321\n");
    assert!(
        commands(&d.vcard.apdus_since(mark))
            .iter()
            .all(|c| !c.starts_with("0020")),
        "no VERIFY at all"
    );

    story.step("attributes without a PIN: the tries are shown and nothing is sent");
    let mark = d.vcard.mark();
    let out = read(&d.f, &["--attributes"], "").expect_fail();
    assert!(
        out.stderr.contains("3 tries left") && out.stderr.contains("nothing was sent"),
        "{}",
        out.stderr
    );
    assert_eq!(pins_sent(&d.vcard.apdus_since(mark)), 0);

    story.step("a malformed PIN is refused before the card is touched");
    let mark = d.vcard.mark();
    let out = read(&d.f, &["--attributes", "--pin-stdin"], "12a4\n").expect_fail();
    assert!(out.stderr.contains("4 digits"), "{}", out.stderr);
    assert!(d.vcard.apdus_since(mark).is_empty(), "no APDU at all");

    story.step("possession: the user-authentication PIN, then the card signs a fresh challenge");
    let mark = d.vcard.mark();
    let v = read_json(&d.f, &["--verify", "--pin-stdin"], "4321\n");
    assert_eq!(v["possession_verified"], true, "{v:#}");
    let apdus = d.vcard.apdus_since(mark);
    let cmds = commands(&apdus);
    assert!(
        cmds.contains(&"00A4020C020018".to_owned()) && cmds.contains(&"00A4020C020017".to_owned()),
        "{cmds:#?}"
    );
    assert!(
        cmds.iter().any(|c| c.starts_with("802A008033")),
        "COMPUTE DIGITAL SIGNATURE: {cmds:#?}"
    );
    assert_eq!(pins_sent(&apdus), 1);
    let sig1 = cmds.iter().find(|c| c.starts_with("802A")).cloned();
    read_json(&d.f, &["--verify", "--pin-stdin"], "4321\n");
    let sig2 = commands(&d.vcard.apdus_since(mark))
        .into_iter()
        .filter(|c| c.starts_with("802A"))
        .nth(1);
    assert_ne!(sig1, sig2, "every challenge is fresh");

    story.step("a locked PIN is reported and nothing is sent");
    d.vcard.cmd("set hanako kenhojo_tries=0");
    let mark = d.vcard.mark();
    let out = read(&d.f, &["--attributes", "--pin-stdin"], "4321\n").expect_fail();
    assert!(out.stderr.contains("locked"), "{}", out.stderr);
    assert_eq!(pins_sent(&d.vcard.apdus_since(mark)), 0);

    story.step("a contactless card with --attributes: no SELECT, no PIN");
    d.vcard.insert("suica", "felica");
    let mark = d.vcard.mark();
    let v = read_json(&d.f, &["--attributes", "--verify", "--pin-stdin"], "4321\n");
    assert_eq!(v["kind"], "contactless");
    assert!(v["attributes"].is_null());
    assert_eq!(
        commands(&d.vcard.apdus_since(mark)),
        vec!["FFCA000000".to_owned()]
    );

    story.step("a T=0 card that answers 6Cxx to a long Le: the attributes still come");
    d.vcard.insert("taro", "mynumber proto=t0 strict_le=1");
    let mark = d.vcard.mark();
    let v = read_json(&d.f, &["--attributes", "--pin-stdin"], "1234\n");
    assert_eq!(v["attributes"]["birth_date"], "1980-04-01");
    let apdus = d.vcard.apdus_since(mark);
    assert!(
        apdus
            .iter()
            .any(|e| e["r"].as_str().is_some_and(|r| r.starts_with("6C"))),
        "a 6Cxx answer: {apdus:#?}"
    );
    assert_no_individual_number(&apdus);
    d.pcscd.stop();
}

/// Suica and MIFARE cards give ids by their UID; cards that are neither are unsupported; a mute card,
/// a card pulled mid-read and a card with wrong status words each end with a clear error, never a
/// hang, and the next card reads fine.
#[test]
fn contactless_unsupported_and_misbehaving_cards() {
    let _serial = serial();
    let story = Story::new("contactless and misbehaving cards");
    let mut d = desk("card-contactless");

    story.step("Suica: an id from its IDm, the same at every tap, another for another card");
    d.vcard.insert("suica", "felica");
    let v = read_json(&d.f, &[], "");
    assert_eq!(v["kind"], "contactless");
    assert_eq!(v["technology"], "felica");
    let suica = id_of(&v);
    assert_eq!(id_of(&read_json(&d.f, &[], "")), suica);
    let idm = d.vcard.status("suica")["uid"].clone();
    let out = read(&d.f, &["--json"], "").expect_ok();
    assert!(!out.to_uppercase().contains(&idm), "the IDm is not printed");
    d.vcard.insert("pasmo", "felica");
    assert_ne!(id_of(&read_json(&d.f, &[], "")), suica);
    d.vcard.insert("mifare", "mifare");
    assert_eq!(read_json(&d.f, &[], "")["technology"], "mifare");

    story.step("cards that are neither are unsupported");
    d.vcard.insert("bank", "unsupported");
    let out = read(&d.f, &["--json"], "").expect_fail();
    assert!(out.stderr.contains("not supported"), "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("a JSON error");
    assert_eq!(v["error"]["kind"], "unsupported");
    d.vcard.insert("random", "random-uid");
    let out = read(&d.f, &[], "").expect_fail();
    assert!(out.stderr.contains("random"), "{}", out.stderr);

    story.step("a mute card: a clear error within the card timeout, then the next card reads");
    d.vcard.insert("mute", "mynumber mute=1");
    let out = read(&d.f, &["--card-timeout", "2"], "").expect_fail();
    assert!(out.stderr.contains("does not respond"), "{}", out.stderr);
    assert!(
        out.elapsed < Duration::from_secs(15),
        "took {:?}",
        out.elapsed
    );
    d.vcard.remove();
    d.vcard.insert("suica", "");
    assert_eq!(id_of(&read_json(&d.f, &[], "")), suica);

    story.step("a card pulled out in the middle of the certificate");
    d.vcard.insert("eve", "mynumber remove_after=4");
    let out = read(&d.f, &["--json"], "").expect_fail();
    assert!(out.stderr.contains("removed"), "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("a JSON error");
    assert_eq!(v["error"]["kind"], "removed");
    d.vcard.insert("eve", "mynumber remove_after=0");
    assert_eq!(read_json(&d.f, &[], "")["kind"], "my_number");

    story.step("wrong status words are named");
    d.vcard.insert("frank", "mynumber wrong_sw=B0:6F00");
    let out = read(&d.f, &[], "").expect_fail();
    assert!(out.stderr.contains("6F00"), "{}", out.stderr);
    d.pcscd.stop();
}

/// One card, four readers of it: the shelter's id (reception) is the one HQ computes, a clinic's is
/// unrelated, and the staff-card id is the same everywhere. A clinic asked for reception's id
/// (what a stolen clinic laptop would need to link its patients to the evacuee rosters) is refused:
/// the authority never issued it that key.
#[test]
fn a_card_has_unrelated_ids_per_sector_and_each_facility_holds_only_its_own() {
    let _serial = serial();
    let story = Story::new("pseudonym sectors");
    let mut d = desk("card-sectors");
    let clinic = d
        .world
        .enrolled_facility(&d._relay, "clinic", "港診療所", "clinic");
    let hq = d
        .world
        .enrolled_facility(&d._relay, "hq", "七尾市災害対策本部", "hq");

    story.step("a Suica read at the shelter, at HQ and at the clinic");
    d.vcard.insert("suica", "felica");
    let at_shelter = id_of(&read_json(&d.f, &[], ""));
    let at_hq = id_of(&read_json(&hq, &[], ""));
    let at_clinic = id_of(&read_json(&clinic, &[], ""));
    assert_eq!(at_shelter, at_hq, "HQ computes the ids shelters record");
    assert_ne!(at_clinic, at_shelter, "a clinic's id is of another sector");

    story.step("as a staff card, the id is the same at every facility and unrelated to the others");
    let staff = id_of(&read_json(&d.f, &["--sector", "staff"], ""));
    assert_eq!(
        id_of(&read_json(&clinic, &["--sector", "staff"], "")),
        staff
    );
    assert!(staff != at_shelter && staff != at_clinic);

    story.step("the clinic cannot compute reception's id, nor the shelter a clinic's");
    for (f, sector, ja) in [
        (&clinic, "reception", "避難所受付・災害対策本部"),
        (&d.f, "clinic", "医療機関"),
    ] {
        let out = read(f, &["--sector", sector, "--json"], "").expect_fail();
        assert!(
            out.stderr
                .contains(&format!("holds no pseudonym key for {sector} cards")),
            "{}",
            out.stderr
        );
        let v: Value = serde_json::from_str(&out.stdout).expect("a JSON error");
        assert_eq!(v["error"]["kind"], "no_sector_key", "{v:#}");
        let message = v["error"]["message_ja"].as_str().unwrap_or_default();
        assert!(
            message.contains(ja),
            "the desk reads which cards: {message}"
        );
    }
    d.pcscd.stop();
}

/// Staff sign in with a staff card and its PIN: a My Number card proves possession with its own PIN; a
/// Suica gets a Musubi staff PIN; each card is bound once; wrong PINs are counted.
#[test]
fn staff_sign_in_with_a_staff_card_and_pin() {
    let _serial = serial();
    let story = Story::new("staff card sign-in");
    let mut d = desk("card-staff");
    let f = &d.f;

    story.step("accounts with passwords");
    run_in(
        f,
        "staff add",
        &["--login", "sato", "--name", "佐藤 一郎"],
        "correct horse\n",
    )
    .expect_ok();
    run_in(
        f,
        "staff add",
        &["--login", "suzuki", "--name", "鈴木 花"],
        "battery staple\n",
    )
    .expect_ok();
    let out = run_in(
        f,
        "staff sign-in",
        &["--login", "sato", "--json"],
        "correct horse\n",
    )
    .expect_ok();
    assert!(out.contains("\"sato\""), "{out}");
    run_in(f, "staff sign-in", &["--login", "sato"], "wrong horse\n").expect_fail();

    story.step("佐藤 binds a My Number card (its PIN checked by the card) and signs in with it");
    d.vcard.insert("sato-card", "mynumber pin=2580");
    let mark = d.vcard.mark();
    run_in(
        f,
        "staff bind-card",
        &["--login", "sato", "--timeout", "10"],
        "correct horse\n2580\n",
    )
    .expect_ok();
    assert!(
        commands(&d.vcard.apdus_since(mark))
            .iter()
            .any(|c| c.starts_with("802A")),
        "possession proved at binding"
    );
    let out = run_in(
        f,
        "staff sign-in",
        &["--card", "--json", "--timeout", "10"],
        "2580\n",
    )
    .expect_ok();
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["login"], "sato");
    let out = run_in(f, "staff sign-in", &["--card", "--timeout", "10"], "0000\n").expect_fail();
    assert!(out.stderr.contains("2 tries left"), "{}", out.stderr);
    let out = run_in(
        f,
        "staff bind-card",
        &["--login", "suzuki", "--timeout", "10"],
        "battery staple\n2580\n",
    )
    .expect_fail();
    assert!(out.stderr.contains("already bound"), "{}", out.stderr);

    story.step("鈴木 binds a Suica with a staff PIN; a wrong PIN is counted");
    d.vcard.insert("suzuki-suica", "felica");
    run_in(
        f,
        "staff bind-card",
        &["--login", "suzuki", "--timeout", "10"],
        "battery staple\n97531\n",
    )
    .expect_ok();
    let out = run_in(
        f,
        "staff sign-in",
        &["--card", "--json", "--timeout", "10"],
        "97531\n",
    )
    .expect_ok();
    assert!(out.contains("\"suzuki\""), "{out}");
    let out = run_in(
        f,
        "staff sign-in",
        &["--card", "--timeout", "10"],
        "11111\n",
    )
    .expect_fail();
    assert!(out.stderr.contains("4 tries left"), "{}", out.stderr);
    run_in(
        f,
        "staff bind-card",
        &["--login", "suzuki", "--timeout", "10"],
        "battery staple\n97531\n",
    )
    .expect_fail();

    story.step("an unknown card signs nobody in");
    d.vcard.insert("stranger", "felica");
    let out = run_in(
        f,
        "staff sign-in",
        &["--card", "--timeout", "10"],
        "97531\n",
    )
    .expect_fail();
    assert!(out.stderr.contains("not bound"), "{}", out.stderr);
    let listing = run_in(f, "staff list", &["--json"], "").expect_ok();
    assert!(
        listing.contains("sato") && listing.contains("suzuki"),
        "{listing}"
    );

    story.step("二要素認証: the administrator binds a card, then a password alone signs no one in");
    let out = run_in(f, "staff two-factor", &["on"], "").expect_fail();
    assert!(out.stderr.contains("no administrator"), "{}", out.stderr);
    d.vcard.insert("admin-suica", "felica");
    run_in(
        f,
        "staff bind-card",
        &["--login", STAFF_LOGIN, "--timeout", "10"],
        &format!("{STAFF_PASSWORD}\n24680\n"),
    )
    .expect_ok();
    run_in(f, "staff two-factor", &["on"], "").expect_ok();
    let out = run_in(f, "audit list", &[], "").expect_fail();
    assert!(
        out.stderr.contains("two-factor") && out.stderr.contains("二要素認証"),
        "{}",
        out.stderr
    );
    let out = run_in(f, "staff sign-in", &["--login", "sato"], "correct horse\n").expect_fail();
    assert!(out.stderr.contains("two-factor"), "{}", out.stderr);
    let with_card = |sub: &str, args: &[&str], pin: &str| {
        let mut cmd = f.command(sub, args);
        cmd.arg("--staff-card").env("MUSUBI_STAFF_PIN", pin);
        musubi_tests::run_command(cmd, Duration::from_secs(60))
    };
    let out = with_card("audit list", &["--json"], "11111").expect_fail();
    assert!(out.stderr.contains("tries left"), "{}", out.stderr);
    let listed: Value =
        serde_json::from_str(&with_card("audit list", &["--json"], "24680").expect_ok())
            .expect("JSON");
    let refused = listed
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| {
            e["action"] == "sign-in-failed"
                && e["fields"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "second-factor-needed"))
        })
        .count();
    assert_eq!(
        refused, 2,
        "each password-only try is in the log: {listed:#}"
    );
    let out = run_in(
        f,
        "staff unbind-card",
        &["--login", STAFF_LOGIN],
        &format!("{STAFF_PASSWORD}\n"),
    )
    .expect_fail();
    assert!(
        out.stderr.contains("last administrator"),
        "a password alone cannot take away the only way in: {}",
        out.stderr
    );
    with_card("staff two-factor", &["off"], "24680").expect_ok();
    run_in(f, "audit list", &[], "").expect_ok();
    d.pcscd.stop();
}

/// Taps `card` (kind and options in `spec` when new) while `shelter checkin --card` waits at `f`'s
/// shelter `sid`; returns the check-in's JSON and the time from the card landing on the reader until the
/// command exited (the check-in is durable then). The card is taken off afterwards.
fn tap_checkin(
    f: &Facility,
    vcard: &mut VCard,
    sid: &str,
    name: &str,
    birth: &str,
    card: &str,
    spec: &str,
) -> (Value, Duration) {
    let args = [
        "--shelter",
        sid,
        "--name",
        name,
        "--birth",
        birth,
        "--card",
        "--card-timeout",
        "20",
        "--json",
    ];
    let mut cmd = f.command("shelter checkin", &args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("start shelter checkin --card");
    // The desk is waiting for a tap; the resident taps.
    std::thread::sleep(Duration::from_millis(300));
    vcard.insert(card, spec);
    let tapped = std::time::Instant::now();
    let out = child.wait_with_output().expect("wait for shelter checkin");
    let took = tapped.elapsed();
    vcard.remove();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`shelter checkin --card` failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("`shelter checkin --json` printed no JSON ({e}):\n{stdout}"));
    (v, took)
}

/// A resident taps her My Number card at a shelter of 御祓地区コミュニティセンター and is checked in; she
/// moves to the centre's second shelter and taps again there: her stay moves. Another resident taps a
/// Suica at another centre's shelter and is another person. HQ sees each once.
#[test]
fn a_card_tap_checks_a_person_in_and_a_second_tap_moves_the_stay() {
    let _serial = serial();
    let story = Story::new("shelter check-in by card");
    let world = World::new("card-shelter");
    let relay = world.relay();
    let hq = world.enrolled_facility(&relay, "hq", "七尾市災害対策本部", "hq");
    let a = world.enrolled_facility(
        &relay,
        "centre-a",
        "御祓地区コミュニティセンター",
        "shelter",
    );
    let b = world.enrolled_facility(
        &relay,
        "centre-b",
        "矢田郷地区コミュニティセンター",
        "shelter",
    );
    a.sync_once();
    b.sync_once();
    let s1 = a
        .run_ok(
            "shelter open",
            &["--name", "山王小学校", "--capacity", "480"],
        )
        .trim()
        .to_owned();
    let s2 = a
        .run_ok(
            "shelter open",
            &["--name", "小丸山小学校", "--capacity", "466"],
        )
        .trim()
        .to_owned();
    let s3 = b
        .run_ok(
            "shelter open",
            &[
                "--name",
                "矢田郷地区コミュニティセンター",
                "--capacity",
                "1700",
            ],
        )
        .trim()
        .to_owned();
    let pcscd = Pcscd::start(&world);
    let mut vcard = VCard::start(&world, pcscd.port(), "vcard");

    story.step("花子 taps her My Number card at 山王小学校: checked in, by card");
    let (first, took) = tap_checkin(
        &a,
        &mut vcard,
        &s1,
        "結 花子",
        "1980-04-01",
        "hanako",
        "mynumber",
    );
    eprintln!("tap → durable check-in: {took:?}");
    let hanako = first["evacuee"].as_str().expect("an evacuee id").to_owned();
    let roster = a.run_json("shelter roster", &["--shelter", &s1]);
    assert_eq!(roster["present"].as_u64(), Some(1), "{roster:#}");
    let entry = &roster["evacuees"][0];
    vcard.insert("hanako", "");
    let read = read_json(&a, &[], "");
    vcard.remove();
    assert_eq!(
        entry["card_id"], read["pseudonymous_id"],
        "the roster keeps the card's pseudonymous id: {entry:#}"
    );
    assert!(
        roster.to_string().contains("my_number") || roster.to_string().contains("my-number"),
        "the method is the My Number card: {roster:#}"
    );

    story.step("she moves to 小丸山小学校 and taps there: the stay moves");
    let (moved, took) = tap_checkin(&a, &mut vcard, &s2, "結 花子", "1980-04-01", "hanako", "");
    eprintln!("tap → durable check-in (a move): {took:?}");
    assert_eq!(
        moved["moved_from"],
        serde_json::json!([s1]),
        "checked out of the first: {moved:#}"
    );
    assert_eq!(
        a.run_json("shelter roster", &["--shelter", &s1])["present"].as_u64(),
        Some(0)
    );
    let there = a.run_json("shelter roster", &["--shelter", &s2]);
    assert_eq!(there["present"].as_u64(), Some(1), "{there:#}");
    assert_eq!(
        there["evacuees"][0]["card_id"], entry["card_id"],
        "the same card, the same person: {there:#}"
    );

    story.step("another resident taps a Suica at the other centre's shelter: another person");
    let (other, _) = tap_checkin(
        &b,
        &mut vcard,
        &s3,
        "矢田 次郎",
        "1955-10-10",
        "jiro-suica",
        "felica",
    );
    assert_ne!(other["evacuee"], hanako.as_str());
    assert_eq!(other["reused"], false, "{other:#}");
    assert_eq!(other["moved_from"], serde_json::json!([]), "{other:#}");
    let roster = b.run_json("shelter roster", &["--shelter", &s3]);
    let jiro_card = roster["evacuees"][0]["card_id"]
        .as_str()
        .expect("a card id")
        .to_owned();
    assert_eq!(jiro_card.len(), 64);
    assert_ne!(
        Value::String(jiro_card),
        entry["card_id"],
        "a different card, a different id"
    );

    story.step("HQ sees each person once");
    a.sync_once();
    b.sync_once();
    hq.sync_once();
    let summary = hq.run_json("hq summary", &[]);
    let present = |sid: &str| {
        summary["shelters"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == sid))
            .and_then(|s| s["present"].as_u64())
            .unwrap_or_else(|| panic!("no shelter {sid} in {summary:#}"))
    };
    assert_eq!(present(&s1), 0, "{summary:#}");
    assert_eq!(present(&s2), 1, "{summary:#}");
    assert_eq!(present(&s3), 1, "{summary:#}");
    assert_eq!(summary["total_present"].as_u64(), Some(2), "{summary:#}");
    drop(pcscd);
}
