//! The uplink fails (issue 6, "Acceptance"): network namespaces model a city where the relay sits on
//! the "internet" and a community centre runs its shelter reception on two laptops on their own LAN.
//!
//! Everything is real: `musubi-node serve` in the internet's namespace, `musubi sync --watch --lan`
//! in each laptop's namespace (mDNS over the LAN's bridge), `musubi sync --watch` at the clinic and
//! HQ, and the CLI for every step staff take. The namespaces, bridges and veth pairs are made by the
//! test (addresses 10.231.0.0/24 and 10.232.0.0/24 exist only inside them) and deleted when it ends.
//! It needs root and iproute2, and fails (never skips) without them.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use musubi_crdt::ids::DocumentId;
use musubi_facility::Engine;
use musubi_tests::netns::{self, INTERNET_PREFIX, LAN_PREFIX, Netns, Segment, Spawned};
use musubi_tests::relay::stored_bundles;
use musubi_tests::{
    AUTHORITY_PASSPHRASE, COMMAND_TIMEOUT, Facility, World, bin, poll_every, run_command,
};
use serde_json::Value;

use super::{Story, serial};

const CENTRE: &str = "七尾市中央公民館";
const CLINIC: &str = "七尾港診療所";
const HQ: &str = "七尾市災害対策本部";
const RELAY_PORT: u16 = 7000;
const LAN_PORT: u16 = 7100;
/// How long convergence may take after a change of the network (mDNS discovery, the driver's
/// redial backoff of at most 30 s, then sync).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(150);

/// A facility device in its own namespace.
struct Site {
    ns: Netns,
    f: Facility,
    /// Its address on the LAN, for laptops.
    lan_addr: Option<String>,
}

impl Site {
    /// Runs `musubi SUB ARGS...` inside the namespace (for commands that use the network).
    fn run_net(&self, sub: &str, args: &[&str]) -> String {
        run_command(self.ns.wrap(&self.f.command(sub, args)), COMMAND_TIMEOUT).expect_ok()
    }

    /// Starts `musubi sync --watch` (with `--lan --listen` on its LAN address, for laptops).
    fn watch(&self, logs: &Path) -> Spawned {
        let mut args = vec!["--watch"];
        let listen;
        if let Some(a) = &self.lan_addr {
            listen = format!("/ip4/{a}/tcp/{LAN_PORT}");
            args.extend(["--lan", "--listen", &listen]);
        }
        let mut cmd = self.ns.wrap(&self.f.command("sync", &args));
        let base = logs.join(format!("{}.watch", self.f.name));
        cmd.stdin(Stdio::null())
            .stdout(File::create(base.with_extension("out")).expect("create a log"))
            .stderr(File::create(base.with_extension("err")).expect("create a log"));
        Spawned {
            what: format!("sync --watch of {}", self.f.name),
            child: cmd.spawn().expect("start sync --watch"),
        }
    }

    /// The uplink cable.
    fn uplink(&self, up: bool) {
        netns::set_link(&self.ns, "up0", up);
    }
}

/// Starts `musubi-node serve --authority` in the internet's namespace and waits until it listens.
fn serve(ns: &Netns, relay: &musubi_tests::Relay, logs: &Path, start: u32) -> Spawned {
    let mut cmd = Command::new(bin("musubi-node"));
    cmd.args(["serve", "--data"])
        .arg(&relay.data)
        .arg("--authority")
        .arg(relay.authority_dir())
        .args([
            "--listen",
            &format!("/ip4/{INTERNET_PREFIX}.1/tcp/{RELAY_PORT}"),
        ])
        .env("RUST_LOG", "info")
        .env("MUSUBI_AUTHORITY_PASSPHRASE", AUTHORITY_PASSPHRASE);
    let out = logs.join(format!("relay.{start}.out"));
    let mut cmd = ns.wrap(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).expect("relay log"))
        .stderr(File::create(logs.join(format!("relay.{start}.err"))).expect("relay log"));
    let mut p = Spawned {
        what: "musubi-node serve".into(),
        child: cmd.spawn().expect("start musubi-node serve"),
    };
    poll_every(
        "the relay to listen",
        Duration::from_secs(30),
        Duration::from_millis(50),
        &mut || {
            assert!(
                p.running(),
                "musubi-node serve exited; see {}",
                out.display()
            );
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("listening on")
                .then_some(())
        },
    );
    p
}

/// The Automerge heads of `doc` at `f`, read in this process (None while it cannot read all of it).
fn heads(f: &Facility, doc: DocumentId) -> Option<Vec<ChangeHash>> {
    let e = Engine::open(&f.data, f.passphrase()).ok()?;
    let loaded = e.load(doc).ok()?;
    if loaded.unreadable > 0 {
        return None;
    }
    let mut h = loaded.heads;
    h.sort();
    Some(h)
}

/// The names on a roster (`shelter roster --json`) and how many are present.
fn roster(f: &Facility, shelter: &str) -> (BTreeSet<String>, u64) {
    let r = f.run_json("shelter roster", &["--shelter", shelter]);
    let names = r["evacuees"]
        .as_array()
        .unwrap_or_else(|| panic!("roster without evacuees: {r:#}"))
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect();
    (names, r["present"].as_u64().expect("present"))
}

/// `last_path` of `doc` in `status --json`.
fn last_path(f: &Facility, doc: &str) -> Option<String> {
    let s = f.status();
    s["documents"]
        .as_array()?
        .iter()
        .find(|d| d["id"].as_str() == Some(doc))?
        .get("last_path")?
        .as_str()
        .map(str::to_owned)
}

fn checkin(f: &Facility, shelter: &str, name: &str, birth: &str) {
    f.run_ok(
        "shelter checkin",
        &[
            "--shelter",
            shelter,
            "--name",
            name,
            "--birth",
            birth,
            "--method",
            "transit-card",
        ],
    );
}

/// Two laptops of a community centre keep reception going over their LAN while the uplink is down;
/// a USB stick takes the roster to HQ, which is cut off too; when the uplink returns every facility
/// converges to identical documents and the relay holds each bundle once.
#[test]
fn shelter_lan_and_a_usb_stick_carry_the_roster_through_an_uplink_outage() {
    let _serial = serial();
    let story = Story::new("shelter_lan_and_a_usb_stick_carry_the_roster_through_an_uplink_outage");
    let world = World::new("outage");
    let logs = world.logs();

    story.step(
        "namespaces: the internet with the relay, the centre's LAN, two laptops, a clinic, HQ",
    );
    let mut internet = Segment::new("inet", INTERNET_PREFIX, true);
    let mut lan = Segment::new("lan", LAN_PREFIX, false);
    let mut sites = Vec::new();
    for (k, name) in ["laptop-1", "laptop-2", "clinic", "hq"]
        .into_iter()
        .enumerate()
    {
        let ns = Netns::new(name);
        // The uplink carries no multicast: LAN peers find each other on the LAN only.
        internet.attach(&ns, "up0", 11 + k as u8, false);
        let lan_addr = (k < 2).then(|| lan.attach(&ns, "lan0", 11 + k as u8, true));
        sites.push(Site {
            ns,
            f: world.facility(name),
            lan_addr,
        });
    }

    story.step("the relay serves on the internet; every device enrols over its uplink");
    let relay = musubi_tests::Relay::init(&world);
    let mut relay_proc = serve(&internet.ns, &relay, &logs, 1);
    let codes = [
        relay.invite_facility(CENTRE, "shelter"),
        String::new(), // laptop-2: a device invite from laptop 1 once the centre exists
        relay.invite_facility(CLINIC, "clinic"),
        relay.invite_facility(HQ, "hq"),
    ];
    for (k, site) in sites.iter_mut().enumerate() {
        site.f.init();
        if k != 1 {
            site.run_net("join", &[&codes[k]]);
        }
    }
    // Laptop 1 invites laptop 2 and approves it at its next sync.
    let device_code = sites[0].run_net("device invite", &[]).trim().to_owned();
    sites[0].run_net("sync", &["--once", "--timeout", "60"]);
    sites[1].run_net("join", &[&device_code, "--no-wait"]);
    sites[0].run_net("sync", &["--once", "--timeout", "60"]);
    sites[1].run_net("join", &[&device_code]);
    for site in &sites {
        site.run_net("sync", &["--once", "--timeout", "60"]);
    }
    let [l1, l2, clinic, hq] = &sites[..] else {
        unreachable!("four sites")
    };

    story.step("laptop 1 opens the shelter (HQ and the clinic read the medical notes) and syncs");
    let opened: Value = serde_json::from_str(&l1.f.run_ok(
        "shelter open",
        &[
            "--name",
            CENTRE,
            "--code",
            "CC0000000504",
            "--capacity",
            "300",
            "--health-section",
            HQ,
            "--health-section",
            CLINIC,
            "--json",
        ],
    ))
    .expect("shelter open --json");
    let shelter = opened["shelter"].as_str().expect("shelter id").to_owned();
    let medical = opened["medical"].as_str().expect("medical id").to_owned();
    let shelter_doc: DocumentId = shelter.parse().expect("a document id");
    let medical_doc: DocumentId = medical.parse().expect("a document id");
    checkin(&l1.f, &shelter, "能登 太郎", "1948-02-11");
    l1.run_net("sync", &["--once", "--timeout", "60"]);
    for s in [l2, clinic, hq] {
        s.run_net("sync", &["--once", "--timeout", "60"]);
    }

    story.step("every device runs sync --watch; the laptops also on their LAN");
    let mut watches: Vec<Spawned> = sites.iter().map(|s| s.watch(&logs)).collect();

    story.step("the uplink fails: the laptops and HQ lose the internet (the clinic keeps it)");
    for s in [l1, l2, hq] {
        s.uplink(false);
    }

    story.step("the relay is restarted meanwhile (every connection to it breaks)");
    drop(relay_proc);
    relay_proc = serve(&internet.ns, &relay, &logs, 2);

    story.step("both desks check people in; one person comes to both");
    let at_1 = [
        ("七尾 花子", "1952-04-03"),
        ("和倉 一郎", "1960-07-21"),
        ("石崎 美穂", "1985-12-01"),
    ];
    let at_2 = [
        ("七尾 花子", "1952-04-03"),
        ("田鶴浜 健", "1971-09-09"),
        ("中島 さくら", "2012-05-05"),
    ];
    let t = Instant::now();
    for (a, b) in at_1.iter().zip(&at_2) {
        checkin(&l1.f, &shelter, a.0, a.1);
        checkin(&l2.f, &shelter, b.0, b.1);
    }
    let evacuee = l1.f.run_json("shelter roster", &["--shelter", &shelter])["evacuees"][0]["id"]
        .as_str()
        .expect("an evacuee id")
        .to_owned();
    l2.f.run_ok(
        "shelter medical-note",
        &[
            "--shelter",
            &shelter,
            "--evacuee",
            &evacuee,
            "--conditions",
            "高血圧",
            "--medications",
            "降圧薬",
        ],
    );
    let expected: BTreeSet<String> = std::iter::once("能登 太郎")
        .chain(at_1.iter().map(|p| p.0))
        .chain(at_2.iter().map(|p| p.0))
        .map(str::to_owned)
        .collect();
    let present = expected.len() as u64;
    poll_every(
        "both laptops to hold every check-in (over the LAN)",
        CONVERGE_TIMEOUT,
        Duration::from_millis(200),
        &mut || {
            for w in &mut watches {
                assert!(
                    w.running(),
                    "{} exited; see the logs in {}",
                    w.what,
                    logs.display()
                );
            }
            let ok = [l1, l2]
                .iter()
                .all(|s| roster(&s.f, &shelter) == (expected.clone(), present))
                && heads(&l1.f, shelter_doc) == heads(&l2.f, shelter_doc)
                && heads(&l1.f, medical_doc) == heads(&l2.f, medical_doc);
            ok.then_some(())
        },
    );
    assert_eq!(
        last_path(&l1.f, &shelter).as_deref(),
        Some("lan"),
        "laptop 1's roster last synced by the LAN"
    );
    assert_eq!(
        last_path(&l2.f, &shelter).as_deref(),
        Some("lan"),
        "laptop 2's roster last synced by the LAN"
    );
    story.step(&format!(
        "the laptops agree on {present} evacuees (one person at both desks is one) after {:.1} s, by LAN",
        t.elapsed().as_secs_f64()
    ));

    story.step("a USB stick: HQ lists what it holds, laptop 2 exports what HQ lacks, HQ imports");
    let have = world.path().join("hq.have");
    let stick = world.path().join("usb-stick.musubi");
    hq.f.run_ok("bundle have", &["--out", &have.to_string_lossy()]);
    l2.f.run_ok(
        "bundle export",
        &[
            "--docs",
            &shelter,
            &medical,
            "--have",
            &have.to_string_lossy(),
            "--out",
            &stick.to_string_lossy(),
        ],
    );
    let imported = hq.f.run_json("bundle import", &[&stick.to_string_lossy()]);
    assert!(
        imported["refused"].as_array().is_some_and(Vec::is_empty),
        "HQ refused items of the file: {imported:#}"
    );
    let summary = hq.f.run_json("hq summary", &[]);
    assert_eq!(
        summary["total_present"].as_u64(),
        Some(present),
        "HQ, still offline, counts the roster from the file: {summary:#}"
    );
    assert_eq!(
        last_path(&hq.f, &shelter).as_deref(),
        Some("file"),
        "HQ's roster came by file"
    );
    assert_eq!(
        heads(&hq.f, shelter_doc),
        heads(&l2.f, shelter_doc),
        "HQ holds what laptop 2 holds"
    );
    assert!(
        hq.f.pending() > 0,
        "what the file brought waits at HQ for the relay too"
    );
    story.step(&format!(
        "HQ (offline) counts {present} present from the file ({} bytes)",
        std::fs::metadata(&stick).map(|m| m.len()).unwrap_or(0)
    ));

    story.step("the uplink returns");
    for s in [l1, l2, hq] {
        s.uplink(true);
    }
    let t = Instant::now();
    poll_every(
        "every facility to converge through the relay",
        CONVERGE_TIMEOUT,
        Duration::from_millis(500),
        &mut || {
            for w in &mut watches {
                assert!(
                    w.running(),
                    "{} exited; see the logs in {}",
                    w.what,
                    logs.display()
                );
            }
            let shelter_heads = heads(&l1.f, shelter_doc)?;
            let medical_heads = heads(&l1.f, medical_doc)?;
            let same = [l2, hq]
                .iter()
                .all(|s| heads(&s.f, shelter_doc).as_ref() == Some(&shelter_heads))
                && [l2, clinic, hq]
                    .iter()
                    .all(|s| heads(&s.f, medical_doc).as_ref() == Some(&medical_heads));
            let drained = sites.iter().all(|s| s.f.pending() == 0);
            (same && drained).then_some(())
        },
    );
    story.step(&format!(
        "converged {:.1} s after the uplink returned",
        t.elapsed().as_secs_f64()
    ));

    let rosters: Vec<Value> = [l1, l2, hq]
        .iter()
        .map(|s| s.f.run_json("shelter roster", &["--shelter", &shelter]))
        .collect();
    assert!(
        rosters.windows(2).all(|w| w[0] == w[1]),
        "the rosters differ:\n{rosters:#?}"
    );
    let summary = hq.f.run_json("hq summary", &[]);
    assert_eq!(
        summary["total_present"].as_u64(),
        Some(present),
        "HQ's count after the outage: {summary:#}"
    );

    let db = relay.db();
    let (rows, distinct): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT bundle_id) FROM bundles",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count the relay's bundles");
    assert_eq!(rows, distinct, "the relay holds a bundle twice");
    let at_relay: BTreeSet<String> = stored_bundles(&db).into_iter().map(|b| b.id).collect();
    for s in &sites {
        for (id, doc, _) in s.f.acknowledged_bundles() {
            assert!(
                at_relay.contains(&id),
                "{}'s bundle {id} of {doc} is not at the relay",
                s.f.name
            );
        }
        let all = s.f.bundles();
        assert!(
            all.iter().all(|b| b["seq"].as_u64().is_some()),
            "{} holds bundles the relay never acknowledged: {all:#?}",
            s.f.name
        );
    }
    story.step(&format!(
        "the relay holds {rows} bundles, each once; every device's bundles are there"
    ));
    drop(watches);
    drop(relay_proc);
}
