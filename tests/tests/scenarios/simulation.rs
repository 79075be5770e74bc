//! Randomised faults (issue 6, "Acceptance"): a community centre with two reception laptops on one
//! LAN, a clinic, a care-management office and the disaster HQ edit a shelter roster, its medical
//! notes, a referral letter and a care plan while links to the relay and the LAN go down and come
//! back, frames are lost, the relay crashes and restarts, and files are carried between them. When
//! everything heals, every replica holds byte-identical Automerge heads of every document, and the
//! relay holds each bundle once and never lost one it acknowledged.
//!
//! In-process and without sleeps (`musubi_tests::sim`): the real engines, services, sync session,
//! LAN exchange and relay handler over SQLite, a simulated network and clock. Each seed prints
//! `seed=N`; `MUSUBI_SEED=N` replays one, `MUSUBI_SEEDS=K` runs K (default 200). A seed fixes the
//! schedule (faults, edits, delivery order); ids and ciphertexts come from the OS random source.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use musubi_crdt::documents::shelter::{Method, NewEvacuee};
use musubi_facility::services::shelter::{self, CheckIn, Desk};
use musubi_tests::sim::{self, Sim};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Story, serial};

/// Seeds run by default.
const SEEDS_DEFAULT: u64 = 200;

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("MUSUBI_SEED") {
        let seed = s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MUSUBI_SEED={s:?} is not a number"));
        return vec![seed];
    }
    let n = match std::env::var("MUSUBI_SEEDS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MUSUBI_SEEDS={s:?} is not a number")),
        Err(_) => SEEDS_DEFAULT,
    };
    (0..n).collect()
}

/// What one seed did.
struct Outcome {
    steps: usize,
    docs: usize,
    stats: sim::Stats,
    simulated: Duration,
}

/// One seed: set up, a few dozen random steps of faults and edits, heal, check.
fn run_seed(seed: u64) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sim = Sim::new(&sim::outage_specs());
    let lan = sim.add_lan(0, 1);
    sim::settle_directory(&mut sim, &mut rng);
    let docs = sim::make_documents(&mut sim);
    let steps = rng.random_range(30..60);
    let n = sim.nodes.len();
    for _ in 0..steps {
        match rng.random_range(0..100) {
            0..30 => {
                for _ in 0..rng.random_range(1..8) {
                    sim.deliver_random(&mut rng);
                }
            }
            30..50 => {
                let i = rng.random_range(0..n);
                sim::random_edit(&mut sim, i, &docs, &mut rng);
            }
            50..60 => {
                let i = rng.random_range(0..n);
                let up = !sim.nodes[i].link_up;
                sim.set_link(i, up);
            }
            60..64 => sim.lan[lan].up = !sim.lan[lan].up,
            64..74 => sim.lan_round(lan, rng.random_bool(0.2)),
            74..78 => {
                if sim.relay_up() {
                    sim.crash_relay();
                } else {
                    sim.restart_relay();
                    sim.check_relay_kept()?;
                }
            }
            78..81 => {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                sim.carry_file(a, b);
            }
            81..85 => sim.lose_random(&mut rng),
            _ => sim.advance(Duration::from_millis(rng.random_range(0..3_000))),
        }
        sim.pump_all();
    }
    sim.heal(&mut rng);
    let checked = sim.check()?;
    Ok(Outcome {
        steps,
        docs: checked,
        stats: sim.stats.clone(),
        simulated: sim.elapsed(),
    })
}

/// At least 200 seeds of random partitions, relay crashes and concurrent edits of every document
/// kind: all replicas converge to identical Automerge heads every time.
#[test]
fn random_faults_converge_to_identical_heads() {
    let _serial = serial();
    let story = Story::new("random_faults_converge_to_identical_heads");
    let seeds = seeds();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(seeds.len().max(1));
    story.step(&format!("{} seed(s) on {threads} thread(s)", seeds.len()));
    let queue = Mutex::new(seeds.clone().into_iter());
    let failures = Mutex::new(Vec::new());
    let totals = Mutex::new(sim::Stats::default());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let Some(seed) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                        return;
                    };
                    let start = Instant::now();
                    match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
                        Ok(Ok(o)) => {
                            eprintln!(
                                "seed={seed} ok: {} steps, {} docs, {} edits ({} refused), {} LAN exchanges, {} files, {} relay crashes, {} frames delivered, {} lost, {:.1} s simulated, {} ms",
                                o.steps,
                                o.docs,
                                o.stats.edits,
                                o.stats.edits_refused,
                                o.stats.lan_exchanges,
                                o.stats.files,
                                o.stats.crashes,
                                o.stats.delivered,
                                o.stats.lost,
                                o.simulated.as_secs_f64(),
                                start.elapsed().as_millis()
                            );
                            let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                            t.edits += o.stats.edits;
                            t.crashes += o.stats.crashes;
                            t.files += o.stats.files;
                            t.lan_exchanges += o.stats.lan_exchanges;
                            t.lost += o.stats.lost;
                        }
                        Ok(Err(why)) => {
                            eprintln!("seed={seed} FAILED: {why}");
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((seed, why));
                        }
                        Err(panic) => {
                            let why = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "a panic".into());
                            eprintln!("seed={seed} PANICKED: {why}");
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((seed, why));
                        }
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    let t = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    story.step(&format!(
        "{} seed(s) passed: {} edits, {} relay crashes, {} files, {} LAN exchanges, {} frames lost",
        seeds.len() - failures.len(),
        t.edits,
        t.crashes,
        t.files,
        t.lan_exchanges,
        t.lost
    ));
    assert!(
        failures.is_empty(),
        "{} seed(s) failed (replay one with MUSUBI_SEED=N):\n{}",
        failures.len(),
        failures
            .iter()
            .map(|(s, w)| format!("  seed={s}: {w}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// One seed of the revocation test: the random faults and edits of [`run_seed`], with a third
/// reception laptop that the operator revokes at a random step. Every other replica converges; the
/// laptop holds no key newer than what it held when revoked; every document it could read was
/// rotated exactly once (concurrent rotations by several writers resolve to one).
fn run_revocation_seed(seed: u64) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut specs = sim::outage_specs();
    specs.push(sim::DeviceSpec::new(
        "centre-laptop-3",
        "中央公民館",
        musubi_crdt::ids::FacilityRole::Shelter,
    ));
    let stolen = specs.len() - 1;
    let mut sim = Sim::new(&specs);
    let lan = sim.add_lan(0, 1);
    let lan_thief = sim.add_lan(1, stolen);
    sim::settle_directory(&mut sim, &mut rng);
    let docs = sim::make_documents(&mut sim);
    // Every device holds the keys before the theft.
    sim.heal(&mut rng);
    let steps = rng.random_range(30..60);
    let revoke_at = rng.random_range(0..steps);
    let mut held_at_revocation = None;
    let n = sim.nodes.len();
    for step in 0..steps {
        if step == revoke_at {
            held_at_revocation = Some(sim.revoke(stolen));
        }
        match rng.random_range(0..100) {
            0..30 => {
                for _ in 0..rng.random_range(1..8) {
                    sim.deliver_random(&mut rng);
                }
            }
            30..50 => {
                let i = rng.random_range(0..n);
                if !sim.nodes[i].revoked {
                    sim::random_edit(&mut sim, i, &docs, &mut rng);
                }
            }
            50..60 => {
                let i = rng.random_range(0..n);
                let up = !sim.nodes[i].link_up;
                sim.set_link(i, up);
            }
            60..66 => sim.lan_round(lan, rng.random_bool(0.2)),
            66..70 => sim.lan_round(lan_thief, false),
            70..74 => {
                if sim.relay_up() {
                    sim.crash_relay();
                } else {
                    sim.restart_relay();
                    sim.check_relay_kept()?;
                }
            }
            74..78 => {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                if !sim.nodes[a].revoked && !sim.nodes[b].revoked {
                    sim.carry_file(a, b);
                }
            }
            78..82 => sim.lose_random(&mut rng),
            _ => sim.advance(Duration::from_millis(rng.random_range(0..3_000))),
        }
        sim.pump_all();
    }
    sim.heal(&mut rng);
    let checked = sim.check()?;
    let held = held_at_revocation.expect("revoked during the steps");
    let thief_now: std::collections::BTreeMap<_, _> = sim.nodes[stolen]
        .engine
        .key_epochs()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    for (doc, epoch) in &thief_now {
        let before = held.get(doc).copied().unwrap_or_default();
        if *epoch > before {
            return Err(format!(
                "the revoked laptop holds a key of epoch {epoch} of {doc}, newer than its {before}"
            ));
        }
    }
    let db = sim.relay_db();
    for doc in held.keys() {
        let epoch: u32 = db
            .query_row(
                "SELECT epoch FROM documents WHERE id = ?1",
                [doc.to_string()],
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
        if epoch != held[doc].0 + 1 {
            return Err(format!(
                "{doc} is at epoch {epoch} after one revocation (the laptop held {})\n{}",
                held[doc],
                sim.describe_doc(*doc)
            ));
        }
    }
    Ok(Outcome {
        steps,
        docs: checked,
        stats: sim.stats.clone(),
        simulated: sim.elapsed(),
    })
}

/// The operator revokes a stolen reception laptop in the middle of random faults (relay crashes,
/// partitions, LAN exchanges, including with the thief, and files): every writer that notices
/// rotates, the relay keeps one rotation per document, queued edits are sealed again, every other
/// replica converges, and the laptop never holds a key made after its revocation. Seeds print as
/// `seed=N`; `MUSUBI_SEED=N` replays one, `MUSUBI_REVOCATION_SEEDS=K` runs K (default 40).
#[test]
fn a_laptop_revoked_amid_faults_gets_no_new_key_and_nothing_is_lost() {
    let _serial = serial();
    let story = Story::new("a_laptop_revoked_amid_faults_gets_no_new_key_and_nothing_is_lost");
    let seeds: Vec<u64> = if std::env::var("MUSUBI_SEED").is_ok() {
        seeds()
    } else {
        let n = std::env::var("MUSUBI_REVOCATION_SEEDS")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        (0..n).collect()
    };
    let mut failures = Vec::new();
    for seed in &seeds {
        match catch_unwind(AssertUnwindSafe(|| run_revocation_seed(*seed))) {
            Ok(Ok(o)) => eprintln!(
                "seed={seed} ok: {} steps, {} docs, {} edits, {} files, {} relay crashes",
                o.steps, o.docs, o.stats.edits, o.stats.files, o.stats.crashes
            ),
            Ok(Err(why)) => {
                eprintln!("seed={seed} FAILED: {why}");
                failures.push((*seed, why));
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                eprintln!("seed={seed} PANICKED: {why}");
                failures.push((*seed, why));
            }
        }
    }
    story.step(&format!(
        "{} of {} seed(s) passed",
        seeds.len() - failures.len(),
        seeds.len()
    ));
    assert!(
        failures.is_empty(),
        "{} seed(s) failed (replay one with MUSUBI_SEED=N):\n{}",
        failures.len(),
        failures
            .iter()
            .map(|(s, w)| format!("  seed={s}: {w}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A community centre offline for the equivalent of three days of shelter operation: 10,000 check-ins
/// and check-outs at one laptop, each its own bundle, while HQ and the relay carry on. It reconnects
/// and is fully synced: nothing pending, and the relay, the other laptop and HQ hold the same heads.
#[test]
fn three_days_offline_then_fully_synced() {
    let _serial = serial();
    let story = Story::new("three_days_offline_then_fully_synced");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut sim = Sim::new(&sim::outage_specs());
    sim::settle_directory(&mut sim, &mut rng);
    let docs = sim::make_documents(&mut sim);
    sim.heal(&mut rng);
    story.step("the centre's uplink goes down; reception works for three days");
    sim.set_link(0, false);
    let changes = changes_offline(&mut sim, docs.shelter, 10_000);
    let pending = sim.nodes[0]
        .engine
        .store()
        .pending_count()
        .expect("pending count");
    story.step(&format!(
        "{changes} changes made offline, {pending} item(s) pending; the uplink is back"
    ));
    let start = Instant::now();
    sim.heal(&mut rng);
    let took = start.elapsed();
    let checked = sim.check().unwrap_or_else(|e| panic!("not converged: {e}"));
    assert_eq!(
        sim.nodes[0]
            .engine
            .store()
            .pending_count()
            .expect("pending"),
        0,
        "the centre still has items pending"
    );
    let roster = shelter::roster(&sim.nodes[4].engine, &docs.shelter.to_string()).expect("roster");
    story.step(&format!(
        "fully synced in {:.1} s (in-process: push {pending} items, HQ and the second laptop pull them); {checked} documents identical; HQ sees {} present, {} records",
        took.as_secs_f64(),
        roster.present,
        roster.records
    ));
}

/// Writes `changes` check-ins and check-outs at device 0 on `doc`, each committed as its own bundle,
/// through one reception desk (as a desk that stays open all day). Returns how many were written.
fn changes_offline(sim: &mut Sim, doc: musubi_crdt::ids::DocumentId, changes: usize) -> usize {
    let e = &mut sim.nodes[0].engine;
    let mut desk = Desk::open(e, doc).expect("open the desk");
    let mut present: Vec<String> = Vec::new();
    let t0 = musubi_crdt::documents::shelter::rfc3339_ms("2027-01-15T09:00:00Z").expect("time");
    for k in 0..changes {
        // Three days: a change every 26 s on average.
        let at = shelter::ms_to_rfc3339(t0 + (k as i64) * 25_920);
        if present.len() > 150 && k % 2 == 1 {
            let who = present.swap_remove(k % present.len());
            desk.stay(
                &who,
                musubi_crdt::documents::shelter::StayKind::CheckOut,
                Method::TransitCard,
                Some(at),
                "",
            )
            .expect("check out");
        } else {
            let out = desk
                .checkin(&CheckIn {
                    person: NewEvacuee {
                        name: format!("避難者 {k:05}"),
                        birth_date: format!("19{:02}-0{}-1{}", k % 100, 1 + k % 9, k % 10),
                        ..NewEvacuee::default()
                    },
                    method: Method::TransitCard,
                    at: Some(at),
                })
                .expect("check in");
            present.push(out.evacuee);
        }
        desk.commit(e).expect("commit");
    }
    changes
}
