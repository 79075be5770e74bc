//! Audit log overhead (issue 12): what one entry costs, what it adds to a check-in and to a
//! 1,000-row roster view, how large the log grows per 1,000 actions, how long listing and
//! verifying take, and what copying the log into the facility's audit document costs (time, and
//! the document's sealed bundle bytes per 1,000 entries).
//!
//! Usage: `cargo run --release -p musubi-tests --bin bench-audit [ENTRIES]` (default 1,000).
//!
//! Everything runs in this process on one shelter device's real store (SQLite, WAL,
//! `synchronous=FULL`), enrolled offline (`musubi_facility::offline`). "Without the log" is the
//! same call's time less the entry it writes, measured on its own (`audit::record`): the services
//! cannot run without recording, by design.

use std::time::Instant;

use musubi_crdt::audit::AuditAction;
use musubi_crdt::documents::shelter::{Method, NewEvacuee};
use musubi_crdt::ids::FacilityRole;
use musubi_facility::Engine;
use musubi_facility::audit;
use musubi_facility::offline::OfflineDeployment;
use musubi_facility::services::shelter::{self, CheckIn, Desk, OpenShelter};
use musubi_tests::measure::{human_bytes, ms, percentile};

fn person(tag: &str, i: usize) -> NewEvacuee {
    NewEvacuee {
        name: format!("避難者 {tag}-{i:06}"),
        kana: format!("ヒナンシャ {tag}-{i:06}"),
        birth_date: format!("{}-{:02}-{:02}", 1930 + i % 80, 1 + i % 12, 1 + i % 28),
        consent: true,
        ..NewEvacuee::default()
    }
}

fn stored_bytes(e: &Engine) -> (i64, i64) {
    e.store()
        .conn()
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(length(sealed)), 0) FROM audit",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("audit table")
}

fn main() {
    let entries: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("centre");
    let mut e = Engine::init(&dir, "受付", "bench passphrase", 10).expect("init");
    let mut deployment = OfflineDeployment::new(3);
    let f = deployment.add_facility(&e, "和倉公民館", FacilityRole::Shelter);
    deployment.enrol(&e, f).expect("enrol");
    e.set_staff(Some("bench".into()));
    println!(
        "bench-audit (profile: {})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );

    // 1. One entry on its own.
    let (rows0, bytes0) = stored_bytes(&e);
    let mut record = Vec::with_capacity(entries);
    for i in 0..entries {
        let t = Instant::now();
        audit::record(
            &e,
            AuditAction::Read,
            None,
            &[if i % 2 == 0 { "roster" } else { "remarks" }],
        )
        .expect("record");
        record.push(t.elapsed());
    }
    let (rows1, bytes1) = stored_bytes(&e);
    let per_entry = (bytes1 - bytes0) as f64 / (rows1 - rows0) as f64;
    println!(
        "audit::record ({entries} entries): p50 {}  p99 {} ; sealed entries {} per 1,000 actions ({} each)",
        ms(percentile(&mut record, 50.0)),
        ms(percentile(&mut record, 99.0)),
        human_bytes(per_entry * 1000.0),
        human_bytes(per_entry)
    );

    // 2. A 1,000-row roster view, and check-ins, each with its entry.
    let opened = shelter::open(
        &mut e,
        &OpenShelter {
            name: "和倉公民館".into(),
            capacity: 2000,
            ..OpenShelter::default()
        },
    )
    .expect("open");
    let sid = opened.shelter.to_string();
    let mut desk = Desk::open(&e, opened.shelter).expect("desk");
    for i in 0..1000 {
        desk.checkin(&CheckIn {
            person: person("R", i),
            method: Method::Manual,
            at: None,
        })
        .expect("check in");
    }
    desk.commit(&mut e).expect("commit");
    drop(desk);
    let mut views = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let v = shelter::roster(&e, &sid).expect("roster");
        views.push(t.elapsed());
        assert!(v.evacuees.len() >= 1000);
    }
    let mut checkins = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        shelter::checkin(
            &mut e,
            &sid,
            &CheckIn {
                person: person("N", i),
                method: Method::Manual,
                at: None,
            },
        )
        .expect("check in");
        checkins.push(t.elapsed());
    }
    let entry = percentile(&mut record, 50.0);
    let view = percentile(&mut views, 50.0);
    let checkin = percentile(&mut checkins, 50.0);
    println!(
        "roster view of 1,000 evacuees: p50 {} with its entry, {} without ; check-in (new person): p50 {} with, {} without",
        ms(view),
        ms(view.saturating_sub(entry)),
        ms(checkin),
        ms(checkin.saturating_sub(entry))
    );

    // 3. Listing and verifying the whole log.
    let total = stored_bytes(&e).0;
    let t = Instant::now();
    let listed = audit::list(&e, &audit::Filter::default()).expect("list");
    let list_time = t.elapsed();
    let t = Instant::now();
    let verified = audit::verify(&e).expect("verify").expect("intact");
    let verify_time = t.elapsed();
    assert_eq!(listed.len() as i64, total);
    println!(
        "{total} entries: list {} ; verify {} ({} verified)",
        ms(list_time),
        ms(verify_time),
        verified.entries
    );

    // 4. Copying the log into the audit document (what each sync does), all of it at once.
    let bundle_bytes = |e: &Engine| -> i64 {
        let mut sum = 0;
        for d in audit::audit_documents(e).expect("audit documents") {
            let id = d.to_string();
            sum += e
                .store()
                .conn()
                .query_row(
                    "SELECT COALESCE(SUM(length(envelope)), 0) FROM bundles WHERE doc = ?1",
                    [&id],
                    |r| r.get::<_, i64>(0),
                )
                .expect("bundles");
        }
        sum
    };
    let before = bundle_bytes(&e);
    let t = Instant::now();
    let mut copied = 0;
    loop {
        let p = audit::publish(&mut e, musubi_facility::engine::now_ms(), true).expect("publish");
        if p.copied == 0 {
            break;
        }
        copied += p.copied;
    }
    let publish_time = t.elapsed();
    let doc_bytes = (bundle_bytes(&e) - before) as f64;
    println!(
        "publish {copied} entries to the audit document: {} ; its sealed bundles {} per 1,000 entries",
        ms(publish_time),
        human_bytes(doc_bytes / copied.max(1) as f64 * 1000.0)
    );
    let t = Instant::now();
    let chains = audit::verify_all(&e).expect("verify all");
    assert!(chains.iter().all(|c| c.result.is_ok()));
    println!(
        "verify_all (disk chain compared with its copy): {}",
        ms(t.elapsed())
    );
}
