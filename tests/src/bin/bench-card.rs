//! Card workload: time from a card landing on the reader to its pseudonymous id, and from a tap to a
//! durable shelter check-in.
//!
//! Usage (as root: it starts its own pcscd): `cargo build --workspace --bins && cargo run --release -p
//! musubi-tests --bin bench-card [SAMPLES]` (SAMPLES per measurement, default 10).
//!
//! Setup: a real pcscd with vsmartcard's vpcd reader and the `musubi-vcard` emulator on its first slot.
//! - "insertion → id (library)": `card::read` waits in this process; the emulator puts the card on the
//!   reader (its vpcd connection is accepted); the clock stops when the id is derived. pcscd notices a
//!   vpcd card by polling (every 400 ms), so this includes that delay; "session" is the part after the
//!   card was seen (connect, APDUs, HMAC).
//! - "tap → durable check-in (CLI)": `musubi shelter checkin --card` waits at an enrolled community
//!   centre; the card is placed; the clock stops when the command exits (the stay is on disk, sealed).

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use musubi_crdt::crypto::PseudonymSector;
use musubi_crdt::ids::FacilityRole;
use musubi_facility::Engine;
use musubi_facility::card::{self, NoPin, ReadOptions};
use musubi_tests::World;
use musubi_tests::measure::{ms, percentile};
use musubi_tests::vcard::harness::{Pcscd, VCard};

fn report(what: &str, samples: &mut [Duration]) {
    println!(
        "{what:<60} n={:<3} min {:>11}  p50 {:>11}  p90 {:>11}  max {:>11}",
        samples.len(),
        ms(percentile(samples, 0.0)),
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 90.0)),
        ms(percentile(samples, 100.0))
    );
}

/// Times `card::read` from the insertion to the id, `n` times, for the card `name` (`spec` when new).
fn insertion_to_id(
    engine: &Engine,
    vcard: &mut VCard,
    name: &str,
    spec: &str,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut total = Vec::new();
    let mut session = Vec::new();
    for i in 0..n {
        let spec = if i == 0 { spec } else { "" };
        let (placed, r) = thread::scope(|scope| {
            let placer = scope.spawn(|| {
                thread::sleep(Duration::from_millis(200));
                vcard.insert(name, spec);
                Instant::now()
            });
            let opts = ReadOptions {
                timeout: Duration::from_secs(20),
                ..ReadOptions::default()
            };
            let r = card::read(engine, PseudonymSector::Reception, &opts, Box::new(NoPin))
                .map(|r| (Instant::now(), r));
            (placer.join().expect("the placing thread"), r)
        });
        let (done, r) = r.unwrap_or_else(|e| panic!("read {name}: {e}"));
        total.push(done.saturating_duration_since(placed));
        session.push(Duration::from_millis(r.timings.read_ms));
        vcard.remove();
    }
    (total, session)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let world = World::new("bench-card");
    let pcscd = Pcscd::start(&world);
    let mut vcard = VCard::start(&world, pcscd.port(), "vcard");
    println!(
        "bench-card: {n} samples each; pcscd with vpcd on port {}; the emulator on slot 0",
        pcscd.port()
    );

    // In process: a shelter's device enrolled offline (it holds reception's pseudonym key) is all
    // `card::read` needs.
    let dir = world.data_dir("engine");
    let engine = Engine::init(&dir, "bench", "bench passphrase", 10).expect("init");
    let mut deployment = musubi_facility::offline::OfflineDeployment::new(7);
    let shelter = deployment.add_facility(&engine, "bench", FacilityRole::Shelter);
    deployment.enrol(&engine, shelter).expect("enrol");
    for (what, name, spec) in [
        (
            "My Number card, T=1 (JPKI certificate, 4 reads)",
            "mn-t1",
            "mynumber",
        ),
        (
            "My Number card, T=0 (61xx / GET RESPONSE)",
            "mn-t0",
            "mynumber proto=t0",
        ),
        ("FeliCa (GET DATA IDm)", "suica", "felica"),
    ] {
        let (mut total, mut session) = insertion_to_id(&engine, &mut vcard, name, spec, n);
        report(&format!("insertion → id, {what}"), &mut total);
        report(
            "  of which the session (connect, APDUs, HMAC)",
            &mut session,
        );
    }

    // Through the CLI at an enrolled centre.
    let relay = world.relay();
    let centre =
        world.enrolled_facility(&relay, "centre", "御祓地区コミュニティセンター", "shelter");
    let sid = centre
        .run_ok(
            "shelter open",
            &["--name", "山王小学校", "--capacity", "480"],
        )
        .trim()
        .to_owned();
    for (what, kind) in [("My Number card", "mynumber"), ("Suica", "felica")] {
        let mut samples = Vec::new();
        for i in 0..n {
            let name = format!("{kind}-{i}");
            let person = format!("計測 {kind} {i}");
            let args = [
                "--shelter",
                sid.as_str(),
                "--name",
                person.as_str(),
                "--birth",
                "1970-01-01",
                "--card",
                "--card-timeout",
                "20",
            ];
            let mut cmd = centre.command("shelter checkin", &args);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = cmd.spawn().expect("start shelter checkin --card");
            thread::sleep(Duration::from_millis(400));
            vcard.insert(&name, kind);
            let placed = Instant::now();
            let out = child.wait_with_output().expect("wait");
            samples.push(placed.elapsed());
            assert!(
                out.status.success(),
                "checkin failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            vcard.remove();
        }
        report(
            &format!("tap → durable check-in (CLI), {what}"),
            &mut samples,
        );
    }
    drop(vcard);
    drop(pcscd);
}
