//! Outage figures (issue 6, "Measure and report"): LAN sync latency between two reception laptops,
//! convergence time after a partition heals as a function of the changes made meanwhile, and the
//! size of an offline-transfer file per change.
//!
//! Usage: `cargo run --release -p musubi-tests --bin bench-outage [--quick] [--skip-lan]
//! [--skip-processes] [--sizes=N,M]` (`--quick`: 1k and 10k changes only, 50 LAN samples;
//! `--sizes`: the in-process convergence runs). Build the binaries first
//! (`cargo build --release --bins`): the LAN and loopback parts run the real `musubi-node` and
//! `musubi` processes.
//!
//! - LAN latency: two laptops in network namespaces on one bridge (mDNS), uplink cut, each running
//!   `musubi sync --watch --lan`; a check-in is written at laptop 1 (in this process, through the
//!   shelter service, on laptop 1's store) and timed until its bundle is in laptop 2's store. Needs
//!   root and iproute2; without them the in-process LAN exchange (offer, answer, delivery, no
//!   transport) is timed instead, and the output says so.
//! - Convergence: in-process (`musubi_tests::sim`: the real engines, sync sessions and relay
//!   handler over SQLite, frames in memory instead of sockets, files in /dev/shm). Laptop 1 of a
//!   centre makes N check-ins and check-outs offline, each its own bundle; then its link returns and
//!   the time until every device (laptop 2, HQ, the relay) holds everything is taken, and then the
//!   time HQ needs to open the roster the first time.
//! - Export size: `transfer::export` of the shelter document after N changes, per change.

use std::collections::BTreeSet;
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use musubi_crdt::documents::shelter::{Method, NewEvacuee, StayKind};
use musubi_crdt::ids::DocumentId;
use musubi_facility::Engine;
use musubi_facility::services::shelter::{self, CheckIn, Desk};
use musubi_facility::transfer;
use musubi_tests::measure::{human_bytes, ms, percentile};
use musubi_tests::netns::{self, INTERNET_PREFIX, LAN_PREFIX, Netns, Segment, Spawned};
use musubi_tests::sim::{self, Sim};
use musubi_tests::{COMMAND_TIMEOUT, Facility, World, bin, poll_every, run_command};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Distinct people who come to the shelter in the convergence runs.
const PEOPLE_POOL: usize = 20_000;

fn person(i: usize) -> NewEvacuee {
    NewEvacuee {
        name: format!("避難者 {i:06}"),
        kana: format!("ヒナンシャ {i:06}"),
        birth_date: format!("{}-{:02}-{:02}", 1930 + i % 80, 1 + i % 12, 1 + i % 28),
        address: format!("石川県七尾市一本杉町{}番地", i % 300),
        ..NewEvacuee::default()
    }
}

/// `changes` check-ins and check-outs at device 0 on `doc`, each its own bundle (one desk open all
/// along, as reception keeps it). Three days of operation when `changes` is 10,000.
fn make_changes(e: &mut Engine, doc: DocumentId, changes: usize) {
    let mut desk = Desk::open(e, doc).expect("open the desk");
    let mut present: Vec<String> = Vec::new();
    let mut next = 0usize;
    let t0 = musubi_crdt::documents::shelter::rfc3339_ms("2027-01-15T09:00:00Z").expect("time");
    for k in 0..changes {
        let at = shelter::ms_to_rfc3339(t0 + (k as i64) * 25_920);
        if present.len() > 150 && k % 2 == 1 {
            let who = present.swap_remove(k % present.len());
            desk.stay(&who, StayKind::CheckOut, Method::TransitCard, Some(at), "")
                .expect("check out");
        } else {
            // People come back: a pool of 20,000 (a shelter holds at most 50,000 records).
            loop {
                let out = desk
                    .checkin(&CheckIn {
                        person: person(next % PEOPLE_POOL),
                        method: Method::TransitCard,
                        at: Some(at.clone()),
                    })
                    .expect("check in");
                next += 1;
                if !out.already_present {
                    present.push(out.evacuee);
                    break;
                }
            }
        }
        desk.commit(e).expect("commit");
    }
}

/// Convergence after a partition with `changes` made offline, and the export size per change.
fn convergence(changes: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(changes as u64);
    let mut s = Sim::new(&sim::outage_specs());
    sim::settle_directory(&mut s, &mut rng);
    let docs = sim::make_documents(&mut s);
    s.heal(&mut rng);
    s.set_link(0, false);
    let t = Instant::now();
    make_changes(&mut s.nodes[0].engine, docs.shelter, changes);
    let made = t.elapsed();
    let pending = s.nodes[0].engine.store().pending_count().expect("pending");

    // The export a USB stick would carry to a facility that has none of these changes.
    let have = transfer::have_list(&s.nodes[4].engine).expect("have-list");
    let file = s.path().join("export.musubi");
    let t = Instant::now();
    let report =
        transfer::export(&s.nodes[0].engine, &[docs.shelter], Some(&have), &file).expect("export");
    let export_time = t.elapsed();
    let cipher: usize = s.nodes[0]
        .engine
        .store()
        .bundles(docs.shelter)
        .expect("bundles")
        .iter()
        .map(|b| b.envelope.ciphertext.len())
        .sum();
    let _ = std::fs::remove_file(&file);

    s.set_link(0, true);
    let t = Instant::now();
    s.heal(&mut rng);
    let converged = t.elapsed();
    let t = Instant::now();
    let roster = shelter::roster(&s.nodes[4].engine, &docs.shelter.to_string()).expect("roster");
    let first_open = t.elapsed();
    let t = Instant::now();
    let _ = shelter::roster(&s.nodes[4].engine, &docs.shelter.to_string()).expect("roster");
    let second_open = t.elapsed();
    s.check()
        .unwrap_or_else(|e| panic!("not converged after {changes} changes: {e}"));
    println!(
        "  {changes:>7} changes: made offline in {} ({pending} items queued); converged in {} after the link returned \
         (laptop 1 pushes, laptop 2 and HQ pull); HQ opens the roster first in {}, then in {} ({} present, {} records)",
        ms(made),
        ms(converged),
        ms(first_open),
        ms(second_open),
        roster.present,
        roster.records,
    );
    println!(
        "  {changes:>7} changes: export file {} for {} bundles = {} per change (ciphertext {} per change), written in {}",
        human_bytes(report.bytes as f64),
        report.bundles,
        human_bytes(report.bytes as f64 / changes as f64),
        human_bytes(cipher as f64 / changes as f64),
        ms(export_time),
    );
}

/// Convergence with real processes on loopback: the relay (`musubi-node serve`), HQ running
/// `musubi sync --watch`, and a centre that made `changes` check-ins and check-outs while offline
/// (written in this process on its store) and then runs `musubi sync --once`. Timed from the start
/// of that command until HQ's store holds every bundle, then HQ's first `hq summary`.
fn convergence_processes(changes: usize) {
    let world = World::new("bench-outage-converge");
    let relay = world.relay();
    let mut hq = world.enrolled_facility(&relay, "hq", "本部", "hq");
    let centre = world.enrolled_facility(&relay, "centre", "公民館", "shelter");
    centre.sync_once();
    let shelter_id = centre
        .run_ok("shelter open", &["--name", "公民館", "--capacity", "300"])
        .trim()
        .to_owned();
    let doc: DocumentId = shelter_id.parse().expect("shelter id");
    centre.sync_once();
    hq.sync_once();
    hq.start_watch();
    let mut e = Engine::open(&centre.data, centre.passphrase()).expect("open the centre");
    let t = Instant::now();
    make_changes(&mut e, doc, changes);
    let made = t.elapsed();
    drop(e);
    let target = centre
        .bundles()
        .iter()
        .filter(|b| b["doc"].as_str() == Some(shelter_id.as_str()))
        .count() as i64;
    let db = rusqlite::Connection::open_with_flags(
        hq.data.join("facility.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open HQ's store");
    let t = Instant::now();
    let mut push = centre.command("sync", &["--once", "--timeout", "600"]);
    push.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = push.spawn().expect("start sync --once");
    let mut pushed = None;
    poll_every(
        "HQ to hold every bundle",
        Duration::from_secs(1800),
        Duration::from_millis(20),
        &mut || {
            if pushed.is_none() && child.try_wait().ok().flatten().is_some() {
                pushed = Some(t.elapsed());
            }
            let n: i64 = db
                .query_row(
                    "SELECT COUNT(*) FROM bundles WHERE doc = ?1",
                    [&shelter_id],
                    |r| r.get(0),
                )
                .unwrap_or(0);
            (n >= target).then_some(())
        },
    );
    let converged = t.elapsed();
    let status = child.wait().expect("sync --once");
    assert!(status.success(), "the centre's sync --once failed");
    let pushed = pushed.unwrap_or_else(|| t.elapsed());
    let t = Instant::now();
    let summary = hq.run_json("hq summary", &[]);
    let first = t.elapsed();
    let t = Instant::now();
    let _ = hq.run_json("hq summary", &[]);
    let second = t.elapsed();
    hq.stop_watch();
    println!(
        "  {changes:>7} changes: made offline in {}; HQ holds all {target} bundles {} after the centre's `sync --once` started \
         (that command ended after {}); HQ's first `hq summary` {}, the next {} ({} present)",
        ms(made),
        ms(converged),
        ms(pushed),
        ms(first),
        ms(second),
        summary["total_present"],
    );
}

/// LAN latency with real processes in network namespaces; `None` when namespaces are unavailable.
fn lan_latency_netns(samples: usize) -> Option<Vec<Duration>> {
    if Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_or(true, |o| !o.status.success())
        || !is_root()
    {
        return None;
    }
    let world = World::new("bench-outage");
    let logs = world.logs();
    let mut internet = Segment::new("inet", INTERNET_PREFIX, true);
    let mut lan = Segment::new("lan", LAN_PREFIX, false);
    let l1 = Netns::new("laptop1");
    let l2 = Netns::new("laptop2");
    internet.attach(&l1, "up0", 11, false);
    internet.attach(&l2, "up0", 12, false);
    let a1 = lan.attach(&l1, "lan0", 11, true);
    let a2 = lan.attach(&l2, "lan0", 12, true);
    let hq_ns = Netns::new("hq");
    internet.attach(&hq_ns, "up0", 13, false);

    let relay = musubi_tests::Relay::init(&world);
    let mut serve = Command::new(bin("musubi-node"));
    serve
        .args(["serve", "--data"])
        .arg(&relay.data)
        .arg("--authority")
        .arg(relay.authority_dir())
        .env(
            "MUSUBI_AUTHORITY_PASSPHRASE",
            musubi_tests::AUTHORITY_PASSPHRASE,
        )
        .args(["--listen", &format!("/ip4/{}/tcp/7000", internet.gateway())]);
    let mut serve = internet.ns.wrap(&serve);
    let relay_out = logs.join("relay.out");
    serve
        .stdin(Stdio::null())
        .stdout(File::create(&relay_out).expect("log"))
        .stderr(File::create(logs.join("relay.err")).expect("log"));
    let _relay_proc = Spawned {
        what: "musubi-node serve".into(),
        child: serve.spawn().expect("start the relay"),
    };
    poll_every(
        "the relay to listen",
        Duration::from_secs(30),
        Duration::from_millis(50),
        &mut || {
            std::fs::read_to_string(&relay_out)
                .unwrap_or_default()
                .contains("listening on")
                .then_some(())
        },
    );
    let mut f1 = world.facility("laptop-1");
    let mut f2 = world.facility("laptop-2");
    let mut hq = world.facility("hq");
    for f in [&mut f1, &mut f2, &mut hq] {
        f.init();
    }
    let net = |ns: &Netns, f: &Facility, sub: &str, args: &[&str]| {
        run_command(ns.wrap(&f.command(sub, args)), COMMAND_TIMEOUT).expect_ok()
    };
    net(&hq_ns, &hq, "join", &[&relay.invite_facility("本部", "hq")]);
    net(
        &l1,
        &f1,
        "join",
        &[&relay.invite_facility("公民館", "shelter")],
    );
    let device_code = net(&l1, &f1, "device invite", &[]).trim().to_owned();
    net(&l1, &f1, "sync", &["--once", "--timeout", "60"]);
    net(&l2, &f2, "join", &[&device_code, "--no-wait"]);
    net(&l1, &f1, "sync", &["--once", "--timeout", "60"]);
    net(&l2, &f2, "join", &[&device_code]);
    for (ns, f) in [(&l1, &f1), (&l2, &f2)] {
        net(ns, f, "sync", &["--once", "--timeout", "60"]);
    }
    let shelter_id = f1
        .run_ok("shelter open", &["--name", "公民館", "--capacity", "300"])
        .trim()
        .to_owned();
    net(&l1, &f1, "sync", &["--once", "--timeout", "60"]);
    net(&l2, &f2, "sync", &["--once", "--timeout", "60"]);
    let doc: DocumentId = shelter_id.parse().expect("shelter id");
    let mut watches = Vec::new();
    for (ns, f, addr) in [(&l1, &f1, &a1), (&l2, &f2, &a2)] {
        let listen = format!("/ip4/{addr}/tcp/7100");
        let mut cmd = ns.wrap(&f.command("sync", &["--watch", "--lan", "--listen", &listen]));
        let base = logs.join(format!("{}.watch", f.name));
        cmd.stdin(Stdio::null())
            .stdout(File::create(base.with_extension("out")).expect("log"))
            .stderr(File::create(base.with_extension("err")).expect("log"));
        watches.push(Spawned {
            what: format!("watch {}", f.name),
            child: cmd.spawn().expect("start sync --watch"),
        });
    }
    netns::set_link(&l1, "up0", false);
    netns::set_link(&l2, "up0", false);

    let mut e1 = Engine::open(&f1.data, f1.passphrase()).expect("open laptop 1");
    let db2 = rusqlite::Connection::open_with_flags(
        f2.data.join("facility.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open laptop 2's store");
    let count = |db: &rusqlite::Connection| -> i64 {
        db.query_row(
            "SELECT COUNT(*) FROM bundles WHERE doc = ?1",
            [doc.to_string()],
            |r| r.get(0),
        )
        .unwrap_or(0)
    };
    // The laptops find each other first (mDNS), as at a shelter that has been open a while.
    let warm = count(&db2);
    shelter::checkin(
        &mut e1,
        &shelter_id,
        &CheckIn {
            person: person(999_999),
            ..CheckIn::default()
        },
    )
    .expect("check in");
    poll_every(
        "the laptops to find each other",
        Duration::from_secs(60),
        Duration::from_millis(20),
        &mut || (count(&db2) > warm).then_some(()),
    );
    let mut out = Vec::new();
    for i in 0..samples {
        let before: BTreeSet<Vec<u8>> = ids(&e1, doc);
        shelter::checkin(
            &mut e1,
            &shelter_id,
            &CheckIn {
                person: person(i),
                method: Method::TransitCard,
                at: None,
            },
        )
        .expect("check in");
        let t = Instant::now();
        let new: Vec<Vec<u8>> = ids(&e1, doc).difference(&before).cloned().collect();
        poll_every(
            "the check-in to reach laptop 2",
            Duration::from_secs(30),
            Duration::from_millis(1),
            &mut || {
                new.iter()
                    .all(|id| {
                        db2.query_row("SELECT 1 FROM bundles WHERE id = ?1", [id], |_| Ok(()))
                            .is_ok()
                    })
                    .then_some(())
            },
        );
        out.push(t.elapsed());
        // Spread the changes like reception does (and off the watch's 200 ms tick).
        std::thread::sleep(Duration::from_millis(37 + (i as u64 * 13) % 150));
    }
    drop(watches);
    Some(out)
}

fn ids(e: &Engine, doc: DocumentId) -> BTreeSet<Vec<u8>> {
    e.store()
        .bundle_ids(doc)
        .expect("bundle ids")
        .into_iter()
        .map(|b| b.0.to_vec())
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The in-process LAN exchange of one new bundle (no transport): laptop 1 offers, laptop 2 answers
/// and takes the delivery.
fn lan_latency_in_process(samples: usize) -> Vec<Duration> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut s = Sim::new(&sim::outage_specs());
    let lan = s.add_lan(0, 1);
    sim::settle_directory(&mut s, &mut rng);
    let docs = sim::make_documents(&mut s);
    s.heal(&mut rng);
    s.set_link(0, false);
    s.set_link(1, false);
    let mut out = Vec::new();
    for i in 0..samples {
        shelter::checkin(
            &mut s.nodes[0].engine,
            &docs.shelter.to_string(),
            &CheckIn {
                person: person(i),
                ..CheckIn::default()
            },
        )
        .expect("check in");
        let t = Instant::now();
        s.lan_round(lan, false);
        out.push(t.elapsed());
    }
    out
}

fn lan(samples: usize) {
    println!(
        "LAN sync latency, change at laptop 1 to visible in laptop 2's store ({samples} check-ins):"
    );
    let (mut lat, how) = match lan_latency_netns(samples) {
        Some(l) => (
            l,
            "real processes in network namespaces: `musubi sync --watch --lan` at both laptops, mDNS, TCP + Noise + Yamux, uplink cut",
        ),
        None => (
            lan_latency_in_process(samples),
            "IN-PROCESS (network namespaces unavailable: not root or no iproute2): offer, answer and delivery without a transport",
        ),
    };
    println!("  how: {how}");
    println!(
        "  p50 {}  p90 {}  p99 {}  max {}",
        ms(percentile(&mut lat, 50.0)),
        ms(percentile(&mut lat, 90.0)),
        ms(percentile(&mut lat, 99.0)),
        ms(percentile(&mut lat, 100.0)),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let skip_lan = std::env::args().any(|a| a == "--skip-lan");
    let skip_processes = std::env::args().any(|a| a == "--skip-processes");
    let only: Option<Vec<usize>> = std::env::args()
        .find_map(|a| a.strip_prefix("--sizes=").map(str::to_owned))
        .map(|s| {
            s.split(',')
                .map(|n| n.parse().expect("--sizes=N,M"))
                .collect()
        });
    let samples = if quick { 50 } else { 200 };
    println!(
        "bench-outage ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );

    if !skip_lan {
        lan(samples);
    }
    if !skip_processes {
        println!(
            "Convergence after a partition heals, real processes on loopback (relay, HQ `sync --watch`, the centre `sync --once`):"
        );
        for &n in &[1_000, 10_000] {
            convergence_processes(n);
        }
    }
    println!(
        "Convergence after a partition heals (in-process: real engines, sessions and relay handler over SQLite in {}, frames in memory):",
        sim::scratch_dir().display()
    );
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    for &n in only.as_deref().unwrap_or(sizes) {
        convergence(n);
    }
}
