//! Shelter workload: check-in latency with a 5,000-evacuee roster, HQ summary time over 50 shelters ×
//! 2,000 evacuees, and the size and load time of a shelter document after 10,000 check-ins and
//! check-outs.
//!
//! Usage: `cargo run --release -p musubi-tests --bin bench-shelter [SAMPLES]` (SAMPLES: single
//! check-ins timed, default 300).
//!
//! Everything runs in this process on one facility device's real encrypted store (SQLite, WAL,
//! `synchronous=FULL`, every commit sealed with the document key): the device is enrolled offline
//! by an in-process authority and relay (`musubi_facility::offline`), so no network is involved. "Check-in latency" is
//! `services::shelter::checkin` from the call to its return, when the bundle is durable on disk:
//! it loads the document (sealed snapshot plus newer bundles), finds a known person, writes the
//! record and the stay event, seals and stores the bundle, and looks for the person in the facility's
//! other shelters.

use std::time::Instant;

use musubi_crdt::documents::shelter::{self as schema, Method, NewEvacuee, StayKind};
use musubi_crdt::ids::{DocumentId, FacilityRole};
use musubi_facility::Engine;
use musubi_facility::offline::OfflineDeployment;
use musubi_facility::services::hq;
use musubi_facility::services::shelter::{self, CheckIn, Desk, OpenShelter};
use musubi_tests::measure::{human_bytes, ms, percentile};

const BATCH: usize = 500;

fn person(tag: &str, i: usize) -> NewEvacuee {
    NewEvacuee {
        name: format!("避難者 {tag}-{i:06}"),
        kana: format!("ヒナンシャ {tag}-{i:06}"),
        birth_date: format!("{}-{:02}-{:02}", 1930 + i % 80, 1 + i % 12, 1 + i % 28),
        address: format!("石川県七尾市一本杉町{}番地", i % 300),
        contact: format!("0767-{:02}-{:04}", i % 100, i % 10_000),
        consent: !i.is_multiple_of(3),
        ..NewEvacuee::default()
    }
}

/// An enrolled community-centre device in `dir`, with an HQ facility in its directory (certified by
/// an in-process authority, as after a real join).
fn centre(dir: &std::path::Path) -> Engine {
    let e = Engine::init(dir, "bench-centre", "bench passphrase", 10).expect("init");
    let hq = Engine::init(
        &dir.with_extension("hq"),
        "bench-hq",
        "bench passphrase",
        10,
    )
    .expect("init HQ");
    let mut deployment = OfflineDeployment::new(21);
    let me = deployment.add_facility(&e, "bench-centre", FacilityRole::Shelter);
    deployment.add_facility(&hq, "bench-hq", FacilityRole::Hq);
    deployment.enrol(&e, me).expect("enrol");
    e
}

fn open(e: &mut Engine, name: &str) -> DocumentId {
    shelter::open(
        e,
        &OpenShelter {
            name: name.into(),
            capacity: 5000,
            ..OpenShelter::default()
        },
    )
    .expect("open")
    .shelter
}

/// Checks in `n` people in batches (one bundle per batch); returns their evacuee ids.
fn fill(e: &mut Engine, doc: DocumentId, tag: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(BATCH) {
        let mut desk = Desk::open(e, doc).expect("desk");
        for i in start..(start + BATCH).min(n) {
            let out = desk
                .checkin(&CheckIn {
                    person: person(tag, i),
                    method: Method::TransitCard,
                    at: None,
                })
                .expect("check in");
            ids.push(out.evacuee);
        }
        desk.commit(e).expect("commit");
    }
    ids
}

fn main() {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut e = centre(tmp.path());
    println!(
        "bench-shelter (profile: {})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );

    // 1. Check-in latency with a 5,000-evacuee roster.
    let s1 = open(&mut e, "避難所 latency");
    let t = Instant::now();
    fill(&mut e, s1, "L", 5000);
    println!(
        "roster of 5,000 built in {:.1} s (batches of {BATCH})",
        t.elapsed().as_secs_f64()
    );
    let sid = s1.to_string();
    let mut new_person = Vec::with_capacity(samples);
    let mut known_person = Vec::with_capacity(samples / 5);
    for i in 0..samples {
        let req = CheckIn {
            person: person("N", i),
            method: Method::MyNumberCard,
            at: None,
        };
        let t = Instant::now();
        let out = shelter::checkin(&mut e, &sid, &req).expect("check in");
        new_person.push(t.elapsed());
        assert!(!out.reused);
    }
    let known_ids = {
        let desk = Desk::open(&e, s1).expect("desk");
        (0..samples / 5)
            .map(|i| {
                let p = person("L", i);
                let keys = schema::identity_keys("", &p.name, &p.birth_date);
                desk.roster().find(&keys).expect("in the roster").id.clone()
            })
            .collect::<Vec<_>>()
    };
    for (i, id) in known_ids.iter().enumerate() {
        // A known person who left comes back: the record is reused and a new stay begins.
        shelter::stay(&mut e, &sid, id, StayKind::CheckOut, Method::Manual, None)
            .expect("check out");
        let req = CheckIn {
            person: person("L", i),
            method: Method::Manual,
            at: None,
        };
        let t = Instant::now();
        let out = shelter::checkin(&mut e, &sid, &req).expect("check in");
        known_person.push(t.elapsed());
        assert!(out.reused && !out.already_present);
    }
    // The desktop app keeps the roster loaded: each check-in is then the write, the dedup lookup
    // and the durable commit (one sealed bundle, fsync) only.
    let mut resident = Vec::with_capacity(samples);
    let mut desk = Desk::open(&e, s1).expect("desk");
    for i in 0..samples {
        let req = CheckIn {
            person: person("R", i),
            method: Method::TransitCard,
            at: None,
        };
        let t = Instant::now();
        desk.checkin(&req).expect("check in");
        desk.commit(&mut e).expect("commit");
        resident.push(t.elapsed());
    }
    drop(desk);
    let roster = shelter::roster(&e, &sid).expect("roster");
    println!(
        "check-in latency, roster {} evacuees, new person ({} samples): p50 {}  p99 {}  max {}",
        roster.evacuees.len(),
        new_person.len(),
        ms(percentile(&mut new_person, 50.0)),
        ms(percentile(&mut new_person, 99.0)),
        ms(*new_person.iter().max().expect("samples"))
    );
    println!(
        "check-in latency with the roster kept loaded (desktop app), {} samples: p50 {}  p99 {}",
        resident.len(),
        ms(percentile(&mut resident, 50.0)),
        ms(percentile(&mut resident, 99.0))
    );
    println!(
        "check-in latency, known person coming back ({} samples): p50 {}  p99 {}",
        known_person.len(),
        ms(percentile(&mut known_person, 50.0)),
        ms(percentile(&mut known_person, 99.0))
    );

    // 2. A shelter document after 10,000 check-ins and check-outs.
    let s2 = open(&mut e, "避難所 size");
    let t = Instant::now();
    let ids = fill(&mut e, s2, "S", 5000);
    for chunk in ids.chunks(BATCH) {
        let mut desk = Desk::open(&e, s2).expect("desk");
        for id in chunk {
            desk.stay(id, StayKind::CheckOut, Method::TransitCard, None, "")
                .expect("check out");
        }
        desk.commit(&mut e).expect("commit");
    }
    println!(
        "10,000 check-ins and check-outs written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut loaded = e.load(s2).expect("load");
    let saved = loaded.doc.save();
    let ciphertext: usize = e
        .store()
        .bundles(s2)
        .expect("bundles")
        .iter()
        .map(|b| b.envelope.ciphertext.len())
        .sum();
    let bundles = e.store().bundles(s2).expect("bundles").len();
    let mut load_times = Vec::new();
    let mut read_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let l = e.load(s2).expect("load");
        load_times.push(t.elapsed());
        let t = Instant::now();
        let r = schema::read(&l.doc).expect("read");
        read_times.push(t.elapsed());
        assert_eq!(r.evacuees.len(), 5000);
        assert_eq!(r.present(), 0);
    }
    let t = Instant::now();
    let cold = automerge::AutoCommit::load(&saved).expect("load saved");
    let cold_load = t.elapsed();
    drop(cold);
    println!(
        "shelter document after 10,000 check-ins and check-outs: Automerge save {} ; {bundles} encrypted bundles totalling {} ; load (sealed snapshot + newer bundles) p50 {} ; AutoCommit::load of the saved bytes {} ; read + merge p50 {}",
        human_bytes(saved.len() as f64),
        human_bytes(ciphertext as f64),
        ms(percentile(&mut load_times, 50.0)),
        ms(cold_load),
        ms(percentile(&mut read_times, 50.0))
    );

    // 3. HQ summary over 50 shelters × 2,000 evacuees (the two shelters above are included too).
    let t = Instant::now();
    let mut hq_docs = Vec::new();
    for s in 0..50 {
        let doc = open(&mut e, &format!("避難所 {s:02}"));
        hq_docs.push(doc);
        fill(&mut e, doc, &format!("H{s:02}"), 2000);
    }
    println!(
        "50 shelters × 2,000 evacuees written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    let mut total = 0;
    for _ in 0..4 {
        let t = Instant::now();
        let summary = hq::summary(&e, None).expect("summary");
        times.push(t.elapsed());
        total = summary.total_present;
    }
    let cold = times[0];
    let mut warm = times[1..].to_vec();
    println!(
        "HQ summary over 52 shelters ({total} present): first (loads and merges every roster, fills the sealed cache) {} ; again with no new bundles (from the cache) p50 {}",
        ms(cold),
        ms(percentile(&mut warm, 50.0))
    );
    // One more check-in at one shelter: only that shelter is loaded again.
    let one = hq_docs[5].to_string();
    shelter::checkin(
        &mut e,
        &one,
        &CheckIn {
            person: person("X", 0),
            method: Method::Manual,
            at: None,
        },
    )
    .expect("check in");
    let t = Instant::now();
    hq::summary(&e, None).expect("summary");
    println!(
        "HQ summary after one new check-in at one shelter: {}",
        ms(t.elapsed())
    );
}
