//! The attacker's stories (issue 10): the relay's operator, a relay that lies, an enrolled facility
//! that is not a member, a revoked laptop, each trying with the real binaries, and failing.
//!
//! The lying relay is the real `musubi-node` whose database the test edits underneath it
//! ([`LyingRelay`]), as modified relay code would: it then serves and signs what its tables hold.
//! A forging device is a real enrolled device whose keys the test takes from its data directory
//! (a thief with the laptop and its passphrase).

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::Duration;

use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::crypto::{DeviceSecrets, DocumentKey};
use musubi_crdt::directory::FacilityCert;
use musubi_crdt::ids::{DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, Role};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member};
use musubi_crdt::protocol::{ErrorCode, PushItem, PushResult, Request, Response};
use musubi_tests::hostile::{LyingRelay, forged_file};
use musubi_tests::raw::{RawClient, now_ms, random_key, random_secrets};
use musubi_tests::{
    AUTHORITY_PASSPHRASE, COMMAND_TIMEOUT, Facility, WEAK_KDF_FOR_TESTS, World, bin, free_port,
    poll_until, referral_bundle_path, run_command,
};
use serde_json::Value;

use super::{HOSPITAL_B, Story, relay_a_b, serial};

/// The referral A sent B, synced to both: its id and document.
fn letter(a: &Facility, b: &Facility) -> (String, DocumentId) {
    let id = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();
    assert!(
        b.show_text(&id).contains("診療情報提供書"),
        "B reads the letter"
    );
    let doc = id.parse().expect("a letter id is its document id");
    (id, doc)
}

/// `status --json` entry of a document.
fn doc_status(f: &Facility, doc: DocumentId) -> Value {
    let s = f.status();
    s["documents"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == doc.to_string()).cloned())
        .unwrap_or_else(|| panic!("{} holds no document {doc}:\n{s:#}", f.name))
}

fn members_of(f: &Facility, doc: DocumentId) -> BTreeSet<String> {
    doc_status(f, doc)["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["facility"].as_str().map(str::to_owned))
        .collect()
}

/// Every key any grant of `doc` at the relay opens for `device`.
fn keys_for(
    lying: &LyingRelay,
    doc: DocumentId,
    secrets: &musubi_crdt::crypto::DeviceSecrets,
) -> Vec<DocumentKey> {
    lying
        .grants(doc)
        .iter()
        .filter(|g| g.recipients.contains(&secrets.device_id()))
        .filter_map(|g| g.open(secrets).ok())
        .collect()
}

/// The multiaddr of `f`'s LAN listener on `port`.
pub(super) fn lan_addr(f: &Facility, port: u16) -> String {
    format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", f.device_id())
}

/// A device the LAN listener at `addr` does not list as current (revoked, or never enrolled) gets
/// nothing for `request`: it is refused when the connection is established (or, had its frame been
/// read, refused as not enrolled). `member`, a current device, is answered at the same address, so
/// the refusal is the listener's and not a wrong address.
pub(super) fn lan_gives_nothing(
    secrets: &DeviceSecrets,
    member: &DeviceSecrets,
    addr: &str,
    request: &Request,
    who: &str,
) {
    let control = RawClient::connect(member.clone(), addr).expect("a member dials the listener");
    assert!(
        control
            .try_request(&Request::GetDirectory { known_version: 0 })
            .is_ok(),
        "{who} answers a current device at {addr}"
    );
    let Ok(peer) = RawClient::connect(secrets.clone(), addr) else {
        return;
    };
    match peer.try_request(request) {
        Err(e) => eprintln!("{who} disconnected the device: {e}"),
        Ok(Response::Error {
            code: ErrorCode::NotEnrolled,
            ..
        }) => {}
        Ok(other) => panic!("{who} answered a device it does not list as current: {other:?}"),
    }
}

/// Starts `sync --watch --lan` on a loopback port and waits until its LAN listener answers.
pub(super) fn listen_on_lan(f: &mut Facility) -> u16 {
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    f.start_watch_with(&["--lan", "--listen", &listen]);
    poll_until(
        &format!("{}'s LAN listener on port {port}", f.name),
        Duration::from_secs(30),
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    port
}

// ---------------------------------------------------------------------------------------------------------

/// Stories 1 and 2: the relay's operator, who holds the relay's data directory but not the
/// authority's, tries to add a laptop to the hospital and to enrol a fake HQ. The stock commands
/// refuse; the same done by editing the relay's database (modified code) gets a laptop and an HQ
/// that hold no key and read nothing, and the victims show why.
#[test]
fn the_operator_cannot_enrol_a_device_or_an_hq_and_forged_ones_read_nothing() {
    let _serial = serial();
    let story =
        Story::new("the_operator_cannot_enrol_a_device_or_an_hq_and_forged_ones_read_nothing");
    let world = World::new("operator");
    let (relay, a, b) = relay_a_b(&world);
    let (_id, letter_doc) = letter(&a, &b);

    story.step("the stock commands refuse the operator");
    let out = relay
        .node_as_operator("invite", &["--facility", b.id()])
        .expect_fail();
    assert!(
        out.stderr.contains("musubi device invite"),
        "the refusal says who invites devices:\n{}",
        out.stderr
    );
    let out = relay
        .node_as_operator("invite", &["--name", "災害対策本部(偽)", "--role", "hq"])
        .expect_fail();
    assert!(out.stderr.contains("--authority"), "{}", out.stderr);
    let adir = relay.authority_dir().display().to_string();
    let out = relay
        .node_as_operator("approve", &["--authority", &adir])
        .expect_fail();
    assert!(out.stderr.contains("passphrase"), "{}", out.stderr);
    // An authority of the operator's own is not the deployment's.
    let own = world.path().join("operator-authority");
    let mut cmd = Command::new(bin("musubi-node"));
    cmd.args(["authority", "init", "--authority"])
        .arg(&own)
        .args(["--scrypt-log-n", "10"])
        .env(WEAK_KDF_FOR_TESTS.0, WEAK_KDF_FOR_TESTS.1)
        .env(
            "MUSUBI_AUTHORITY_PASSPHRASE",
            "the operator's own passphrase",
        );
    run_command(cmd, COMMAND_TIMEOUT).expect_ok();
    let out = relay
        .node_as_operator(
            "invite",
            &[
                "--authority",
                &own.display().to_string(),
                "--name",
                "偽本部",
                "--role",
                "hq",
            ],
        )
        .expect_fail();
    assert!(out.stderr.contains("deployment"), "{}", out.stderr);

    story.step("modified relay code lists a laptop in the hospital's chain and a fake HQ");
    let lying = LyingRelay::of(&relay);
    let laptop = random_secrets();
    lying.add_device(b.facility_id(), &laptop, &laptop);
    let fake_hq = random_secrets();
    let operator_key = random_secrets();
    let cert = FacilityCert::sign(
        &operator_key,
        relay.deployment(),
        FacilityId::from_random_bytes(rand::random()),
        "災害対策本部",
        FacilityRole::Hq,
        fake_hq.device_id(),
        now_ms(),
    );
    let fake_hq_facility = cert.facility;
    lying.add_facility(&cert, &fake_hq);

    story.step("a community centre enrols, opens a shelter and checks someone in");
    let centre = world.enrolled_facility(&relay, "centre", "みなと公民館", "shelter");
    centre.sync_once();
    let shelter = centre
        .run_ok(
            "shelter open",
            &["--name", "みなと公民館", "--capacity", "120"],
        )
        .trim()
        .to_owned();
    centre.run_ok(
        "shelter checkin",
        &[
            "--shelter",
            &shelter,
            "--name",
            "七尾 花子",
            "--birth",
            "1948-03-03",
        ],
    );
    centre.sync_once();
    let shelter_doc: DocumentId = shelter.parse().expect("a shelter id");
    story.step("the lying relay also lists the fake HQ as a member of the shelter");
    lying.add_member(shelter_doc, fake_hq_facility, Role::Writer);
    for f in [&a, &b, &centre, &a, &b, &centre] {
        f.sync_once();
    }

    story.step("the laptop and the fake HQ connect to the lying relay: ciphertext, and no key");
    let addr = relay.p2p_addr();
    let laptop_client = RawClient::connect(laptop.clone(), &addr).expect("connect");
    let fake_client = RawClient::connect(fake_hq.clone(), &addr).expect("connect");
    match laptop_client.request(&Request::ListDocuments) {
        Response::Documents { docs } => assert!(
            docs.iter().any(|d| d.id == letter_doc),
            "the lying relay lists the hospital's letter to the laptop"
        ),
        other => panic!("ListDocuments: {other:?}"),
    }
    for (who, doc) in [(&laptop, letter_doc), (&fake_hq, shelter_doc)] {
        assert!(
            keys_for(&lying, doc, who).is_empty(),
            "no grant of {doc} opens for {}",
            who.device_id()
        );
        assert!(
            lying
                .grants(doc)
                .iter()
                .all(|g| !g.recipients.contains(&who.device_id())),
            "no member sealed a key of {doc} to {}",
            who.device_id()
        );
    }
    let pulled = fake_client
        .pull_all(shelter_doc, musubi_crdt::ids::Seq(0))
        .expect("the lying relay serves the roster's ciphertext");
    assert!(!pulled.is_empty(), "ciphertext, but nothing opens it");

    story.step("the victims show why");
    let facilities = b.run_json("facilities", &[]);
    let hospital = facilities["facilities"]
        .as_array()
        .expect("facilities")
        .iter()
        .find(|f| f["id"] == b.id())
        .expect("the hospital is listed")
        .clone();
    let refused = hospital["refused"].to_string();
    assert!(
        refused.contains("not a current device"),
        "the hospital sees the forged link refused: {hospital:#}"
    );
    assert!(
        hospital["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .all(|d| d["device"] != laptop.device_id().to_string()),
        "the laptop is not one of the hospital's devices: {hospital:#}"
    );
    let ignored = facilities["ignored"].to_string();
    assert!(
        ignored.contains(&fake_hq_facility.to_string()) && ignored.contains("another authority"),
        "the fake HQ is listed as ignored, with the reason: {facilities:#}"
    );
    let members = members_of(&centre, shelter_doc);
    assert!(
        !members.contains(&fake_hq_facility.to_string()),
        "the shelter's own chain does not name the fake HQ: {members:?}"
    );
    let text = b.run_ok("facilities", &[]);
    assert!(
        text.contains("IGNORED"),
        "the text form says so too:\n{text}"
    );
}

/// Stories 3 and 5 at the relay: a non-member pushes a key grant and a new epoch (the honest relay
/// refuses); a lying relay stores them anyway. The members ignore both, keep the chain they verify,
/// and seal their next edits to the real key, which the attacker's key does not open.
#[test]
fn a_planted_grant_and_epoch_are_refused_and_never_used() {
    let _serial = serial();
    let story = Story::new("a_planted_grant_and_epoch_are_refused_and_never_used");
    let world = World::new("planted");
    let (relay, a, b) = relay_a_b(&world);
    let x = world.enrolled_facility(&relay, "outsider", "外部診療所", "clinic");
    x.sync_once();
    let (id, doc) = letter(&a, &b);
    let xs = x.secrets();
    let xf = x.facility_id();
    let evil = random_key();
    let lying = LyingRelay::of(&relay);
    let head = lying.ops(doc).last().expect("the letter's chain").hash();
    let new_epoch = DocOp::sign(
        &xs,
        xf,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::NewEpoch {
            epoch: Epoch(1),
            key_commitment: evil.commitment(),
        },
    )
    .expect("sign");
    let a_dev = a.secrets().public();
    let b_dev = b.secrets().public();
    let recipients = [
        (a_dev.device, a_dev.age_recipient.clone()),
        (b_dev.device, b_dev.age_recipient.clone()),
    ];
    let grants: Vec<KeyGrant> = [Epoch(0), Epoch(1)]
        .iter()
        .map(|e| KeyGrant::seal(&xs, xf, doc, *e, &evil, &recipients).expect("seal"))
        .collect();

    story.step("the outsider pushes them to the honest relay: refused");
    let addr = relay.p2p_addr();
    let xc = RawClient::connect(xs.clone(), &addr).expect("connect");
    let mut items = vec![PushItem::Op {
        op: new_epoch.clone(),
    }];
    items.extend(grants.iter().map(|g| PushItem::Grant { grant: g.clone() }));
    for r in xc.push(items) {
        assert!(
            matches!(
                r,
                PushResult::Rejected {
                    code: ErrorCode::NotMember | ErrorCode::Forbidden,
                    ..
                }
            ),
            "{r:?}"
        );
    }

    story.step("a lying relay stores them anyway");
    lying.plant_op(&new_epoch);
    for g in &grants {
        lying.plant_grant(g);
    }
    a.sync_once();
    b.sync_once();
    a.edit(&id, "remarks", "至急: 明朝の外来で診察をお願いします");
    a.sync_once();
    b.sync_once();

    story.step("the members ignored both and sealed the edit to the real key");
    let at_a = doc_status(&a, doc);
    assert_eq!(
        at_a["epoch"], 0,
        "A did not take the planted epoch: {at_a:#}"
    );
    assert!(
        at_a["warning"]
            .as_str()
            .is_some_and(|w| w.contains("does not verify")),
        "A says the relay served an operation that does not verify: {at_a:#}"
    );
    let bundles = lying.bundles(doc);
    assert!(
        bundles.iter().all(|(_, e)| e.epoch == Epoch(0)),
        "every bundle is sealed in epoch 0"
    );
    for (seq, env) in &bundles {
        assert!(
            env.open(&evil).is_err(),
            "the planted key opens nothing (bundle {seq})"
        );
    }
    assert!(
        b.show_text(&id).contains("明朝の外来"),
        "the hospital reads the edit with the real key"
    );
}

/// Stories 4 and 5 through a USB file and a LAN peer: an enrolled non-member forges a `Create` for
/// the clinic's letter (to become its owner), a new epoch, a key grant and a bundle. The hospital
/// refuses all of them by file and over the LAN and stores nothing; its next edits stay sealed to
/// the real key.
#[test]
fn a_forged_create_and_a_planted_key_are_refused_by_file_and_over_the_lan() {
    let _serial = serial();
    let story =
        Story::new("a_forged_create_and_a_planted_key_are_refused_by_file_and_over_the_lan");
    let world = World::new("forged");
    let (relay, a, mut b) = relay_a_b(&world);
    let x = world.enrolled_facility(&relay, "outsider", "外部診療所", "clinic");
    x.sync_once();
    let (id, doc) = letter(&a, &b);
    let xs = x.secrets();
    let xf = x.facility_id();
    let evil = random_key();
    let lying = LyingRelay::of(&relay);
    let head = lying.ops(doc).last().expect("chain").hash();
    let forged_create = DocOp::sign(
        &xs,
        xf,
        doc,
        now_ms(),
        None,
        DocOpBody::Create {
            kind: DocumentKind::Referral,
            members: vec![Member {
                facility: b.facility_id(),
                role: Role::Writer,
            }],
            key_commitment: evil.commitment(),
            nonce: rand::random(),
        },
    )
    .expect("sign");
    let forged_epoch = DocOp::sign(
        &xs,
        xf,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::NewEpoch {
            epoch: Epoch(1),
            key_commitment: evil.commitment(),
        },
    )
    .expect("sign");
    let b_dev = b.secrets().public();
    let planted = KeyGrant::seal(
        &xs,
        xf,
        doc,
        Epoch(0),
        &evil,
        &[(b_dev.device, b_dev.age_recipient.clone())],
    )
    .expect("seal");
    let bundle = Envelope::seal(
        &xs,
        xf,
        doc,
        Epoch(0),
        &evil,
        &Payload::Changes {
            data: b"forged changes".to_vec(),
        },
    )
    .expect("seal");
    let items = vec![
        PushItem::Op {
            op: forged_create.clone(),
        },
        PushItem::Op {
            op: forged_epoch.clone(),
        },
        PushItem::Grant {
            grant: planted.clone(),
        },
        PushItem::Bundle {
            envelope: bundle.clone(),
        },
    ];
    // The letter's bundles (the hospital's own audit document gains bundles as it syncs).
    let letter_bundles = |f: &Facility| {
        f.bundles()
            .iter()
            .filter(|x| x["doc"] == doc.to_string())
            .count()
    };
    let before_bundles = letter_bundles(&b);
    let before = doc_status(&b, doc);

    story.step("by a USB file");
    let file = world.path().join("forged.musubi");
    forged_file(&file, relay.deployment(), &xs, &items);
    let report = b.run_json("bundle import", &[&file.display().to_string()]);
    assert_eq!(report["new"], 0, "nothing new is taken: {report:#}");
    assert!(
        report["refused"].as_array().map_or(0, Vec::len) >= 3,
        "each forged item is refused with its reason: {report:#}"
    );
    assert_eq!(letter_bundles(&b), before_bundles, "no bundle was stored");
    let after = doc_status(&b, doc);
    assert_eq!(after["operations"], before["operations"]);
    assert_eq!(after["epoch"], before["epoch"]);
    assert_eq!(members_of(&b, doc), {
        let m: BTreeSet<String> = before["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["facility"].as_str().map(str::to_owned))
            .collect();
        m
    });
    let keys = b.engine().keys(doc).expect("keys");
    assert!(
        keys.values()
            .flatten()
            .all(|k| k.commitment() != evil.commitment()),
        "the planted key is not among the hospital's keys"
    );

    story.step("over the LAN: the outsider dials the hospital's LAN listener");
    let port = listen_on_lan(&mut b);
    let peer = RawClient::connect(xs.clone(), &lan_addr(&b, port)).expect("dial the hospital");
    let offer = Request::Offer {
        doc,
        directory_version: u64::MAX,
        have: vec![],
        ops: vec![forged_create, forged_epoch],
        grants: vec![planted],
    };
    match peer.request(&offer) {
        Response::Error {
            code: ErrorCode::NotMember,
            ..
        } => {}
        other => panic!("the forged offer was answered {other:?}"),
    }
    match peer.request(&Request::Deliver {
        doc,
        items: vec![bundle],
    }) {
        Response::Error {
            code: ErrorCode::NotMember,
            ..
        } => {}
        other => panic!("the forged delivery was answered {other:?}"),
    }
    b.stop_watch();
    assert_eq!(letter_bundles(&b), before_bundles, "no bundle was stored");
    let after = doc_status(&b, doc);
    assert_eq!(after["operations"], before["operations"]);

    story.step("the clinic's next edit is sealed to the real key");
    a.edit(&id, "remarks", "紹介先での検査結果を返書でお知らせください");
    a.sync_once();
    b.sync_once();
    assert!(b.show_text(&id).contains("検査結果を返書で"));
    for (_, env) in lying.bundles(doc) {
        assert!(env.open(&evil).is_err(), "the planted key opens nothing");
    }
}

/// Story 6: the clinic's second laptop is revoked while the clinic is offline. The hospital, a
/// writer of the letter, syncs and excludes the laptop and rotates the key; a lying relay takes a
/// bundle the laptop wrote in the old epoch afterwards, which every member reports (it cannot be
/// told from one taken just before the revocation, so it is kept, and it carries no key). The laptop reads nothing written after its
/// revocation by the relay, by a file, or over the LAN (a peer whose directory predates the
/// revocation learns of it from a file before it exchanges).
#[test]
fn a_revoked_laptop_reads_nothing_new_by_any_route() {
    let _serial = serial();
    let story = Story::new("a_revoked_laptop_reads_nothing_new_by_any_route");
    let world = World::new("revoked");
    let (relay, a, mut b) = relay_a_b(&world);
    let (id, doc) = letter(&a, &b);
    story.step("the clinic has a laptop and a reception PC besides its first device");
    let laptop = world.enrolled_device(&relay, &a, "clinic-a-laptop");
    let mut reception = world.enrolled_device(&relay, &a, "clinic-a-reception");
    a.sync_once();
    b.sync_once();
    laptop.sync_once();
    reception.sync_once();
    assert!(
        laptop.show_text(&id).contains("診療情報提供書"),
        "the laptop reads the letter"
    );
    let thief = laptop.secrets();
    let old_keys = laptop.engine().keys(doc).expect("keys");
    let k0 = old_keys
        .get(&Epoch(0))
        .and_then(|k| k.first())
        .cloned()
        .expect("the laptop holds the epoch-0 key");

    story.step("the laptop is stolen; the operator revokes it while the clinic is offline");
    relay.revoke(&thief.device_id().to_string());
    b.sync_once();
    let lying = LyingRelay::of(&relay);
    let ops = lying.ops(doc);
    let b_device = b.device_id();
    assert!(
        ops.iter().any(|o| o.author == b_device
            && matches!(&o.body, DocOpBody::Exclude { devices } if devices.contains(&thief.device_id()))),
        "the hospital excluded the laptop"
    );
    assert!(
        ops.iter().any(|o| o.author == b_device
            && matches!(
                o.body,
                DocOpBody::NewEpoch {
                    epoch: Epoch(1),
                    ..
                }
            )),
        "the hospital rotated the key"
    );
    b.reply(&id, "返書: 退院後は当院外来で経過を診ます");
    b.sync_once();

    story.step(
        "a lying relay takes a bundle the laptop wrote in the old epoch after its revocation",
    );
    let stale = Envelope::seal(
        &thief,
        a.facility_id(),
        doc,
        Epoch(0),
        &k0,
        &Payload::Attachment {
            name: "偽の添付.pdf".into(),
            media_type: "application/pdf".into(),
            data: b"%PDF forged after revocation".to_vec(),
        },
    )
    .expect("seal");
    lying.plant_bundle(&stale);
    b.sync_once();
    a.sync_once();
    for f in [&a, &b] {
        let status = doc_status(f, doc);
        assert!(
            status["warning"]
                .as_str()
                .is_some_and(|w| w.contains("revoked device")),
            "{} reports the revoked laptop's bundle that arrived after the revocation: {status:#}",
            f.name
        );
        assert!(
            f.engine()
                .keys(doc)
                .expect("keys")
                .keys()
                .any(|e| *e == Epoch(1)),
            "{} holds the new key",
            f.name
        );
    }

    story.step("the clinic comes back, learns the rotation and writes in the new epoch");
    a.edit(&id, "remarks", "退院サマリーを追って送付します");
    a.sync_once();
    let post: Vec<Envelope> = lying
        .bundles(doc)
        .into_iter()
        .filter(|(_, e)| e.author != thief.device_id() && e.epoch >= Epoch(1))
        .map(|(_, e)| e)
        .collect();
    assert!(
        post.len() >= 2,
        "the reply and the edit are in epoch 1: {}",
        post.len()
    );
    let all = lying.bundles(doc);
    let newest = &all.last().expect("bundles").1;
    assert_eq!(
        newest.epoch,
        Epoch(1),
        "the clinic's edit is sealed in the new epoch"
    );

    story.step(
        "route 1, the relay: the laptop is refused, and nothing it holds opens the new bundles",
    );
    laptop.sync_once_result().expect_fail();
    let text = laptop.show_text(&id);
    assert!(
        !text.contains("外来で経過") && !text.contains("退院サマリー"),
        "{text}"
    );
    for env in &post {
        for k in old_keys.values().flatten() {
            assert!(
                env.open(k).is_err(),
                "no key of the laptop opens what was written after"
            );
        }
    }

    story.step("route 2, a file: the hospital exports everything, the laptop imports it");
    let file = world.path().join("hospital.musubi");
    b.run_ok("bundle export", &["--out", &file.display().to_string()]);
    let _ = laptop.run("bundle import", &[&file.display().to_string()]);
    let text = laptop.show_text(&id);
    assert!(
        !text.contains("外来で経過") && !text.contains("退院サマリー"),
        "{text}"
    );

    story.step("route 3, the LAN: the hospital refuses the revoked laptop");
    let port = listen_on_lan(&mut b);
    let offer = musubi_facility::lan::offer(&laptop.engine(), doc).expect("offer");
    lan_gives_nothing(
        &thief,
        &a.secrets(),
        &lan_addr(&b, port),
        &offer,
        "the hospital",
    );
    b.stop_watch();

    story.step("route 4, the operator holds the laptop: it signs a link adding a device of its own to the clinic's chain");
    let evil = random_secrets();
    lying.add_device(a.facility_id(), &evil, &thief);
    a.sync_once();
    b.sync_once();
    for f in [&a, &b] {
        let dir = f.engine().directory().expect("directory");
        assert!(
            !dir.is_current(&evil.device_id()),
            "{} takes no device the revoked laptop added",
            f.name
        );
    }
    let addr = relay.p2p_addr();
    let _evil_client = RawClient::connect(evil.clone(), &addr).expect("the lying relay lets it in");
    assert!(
        keys_for(&lying, doc, &evil).is_empty()
            && lying
                .grants(doc)
                .iter()
                .all(|g| !g.recipients.contains(&evil.device_id())),
        "no member sealed a key to the thief's device"
    );

    story.step("a reception PC offline since before the revocation takes the hospital's file, and with it the revocation");
    reception.run_ok("bundle import", &[&file.display().to_string()]);
    assert!(
        reception.show_text(&id).contains("外来で経過"),
        "the reception PC reads the reply from the file"
    );
    let port = listen_on_lan(&mut reception);
    let offer = musubi_facility::lan::offer(&laptop.engine(), doc).expect("offer");
    lan_gives_nothing(
        &thief,
        &b.secrets(),
        &lan_addr(&reception, port),
        &offer,
        "the reception PC",
    );
    reception.stop_watch();
}

/// Story 3, rollback: the relay is put back to an older copy of its database (same store
/// generation, as a lying relay would), then to a copy with a new generation (a restore). Every
/// device notices, offers what the relay lost, and all converge to every edit, including those
/// written after the restore; `status` says what happened.
#[test]
fn after_a_rollback_and_a_restore_nothing_acknowledged_is_lost() {
    let _serial = serial();
    let story = Story::new("after_a_rollback_and_a_restore_nothing_acknowledged_is_lost");
    let world = World::new("rollback");
    let (mut relay, a, b) = relay_a_b(&world);
    let (id, _doc) = letter(&a, &b);
    let backup = world.path().join("relay-backup");

    story.step("the relay's database is copied while it is stopped");
    relay.kill();
    musubi_tests::files::copy_flat(&relay.data, &backup);
    relay.start();
    a.edit(&id, "remarks", "一回目: 採血結果を同封します");
    a.sync_once();
    let second = a.import_fhir(HOSPITAL_B, &referral_bundle_path());
    a.sync_once();
    b.sync_once();
    b.sync_once();
    assert!(b.show_text(&id).contains("採血結果"));

    story.step("the relay goes back to the old copy (same generation)");
    relay.kill();
    restore_dir(&backup, &relay.data, None);
    relay.start();
    for f in [&a, &b, &a, &b] {
        f.sync_once();
    }
    b.reply(&id, "二回目: 承知しました(巻き戻し後)");
    b.sync_once();
    a.sync_once();
    for f in [&a, &b] {
        let text = f.show_text(&id);
        assert!(
            text.contains("採血結果") && text.contains("巻き戻し後"),
            "{}: {text}",
            f.name
        );
        assert!(
            f.letter_ids().contains(&second),
            "{} holds the second letter",
            f.name
        );
        assert!(
            !f.status()["relay_behind"].is_null(),
            "{} says the relay went back in time",
            f.name
        );
    }
    let fresh = world.enrolled_device(&relay, &b, "hospital-b-new");
    fresh.sync_once();
    let text = fresh.show_text(&id);
    assert!(
        text.contains("採血結果") && text.contains("巻き戻し後"),
        "a device that joins after the rollback gets every edit from the relay: {text}"
    );

    story.step("the relay is restored from the backup with a new generation");
    relay.kill();
    restore_dir(
        &backup,
        &relay.data,
        Some("00112233445566778899aabbccddeeff"),
    );
    relay.start();
    for f in [&a, &b, &a, &b] {
        f.sync_once();
    }
    a.edit(&id, "treatment", "三回目: 復元後の追記");
    a.sync_once();
    b.sync_once();
    let text = b.show_text(&id);
    assert!(
        text.contains("採血結果") && text.contains("巻き戻し後") && text.contains("復元後の追記"),
        "{text}"
    );
    assert_eq!(b.status()["relay_behind"]["restored"], true);
    let again = world.enrolled_device(&relay, &a, "clinic-a-new");
    again.sync_once();
    assert!(again.show_text(&id).contains("復元後の追記"));
    assert!(again.letter_ids().contains(&second));
}

fn restore_dir(from: &std::path::Path, to: &std::path::Path, generation: Option<&str>) {
    for name in ["node.db", "node.db-wal", "node.db-shm"] {
        let _ = fs::remove_file(to.join(name));
    }
    musubi_tests::files::copy_flat(from, to);
    if let Some(g) = generation {
        let c = rusqlite::Connection::open(to.join("node.db")).expect("open");
        c.execute("UPDATE meta SET value = ?1 WHERE key = 'generation'", [g])
            .expect("set the generation");
    }
}

/// A shelter's `Create` already names the certified HQ: HQ sees a shelter after the shelter's first
/// sync, and from a file carried before the shelter ever synced after opening.
#[test]
fn a_shelter_reaches_hq_with_its_first_sync_and_by_file() {
    let _serial = serial();
    let story = Story::new("a_shelter_reaches_hq_with_its_first_sync_and_by_file");
    let world = World::new("first-sync");
    let relay = world.relay();
    let hq = world.enrolled_facility(&relay, "hq", "七尾市災害対策本部", "hq");
    let centre = world.enrolled_facility(&relay, "centre", "和倉公民館", "shelter");
    let school = world.enrolled_facility(&relay, "school", "山王小学校", "shelter");
    for f in [&hq, &centre, &school] {
        f.sync_once();
    }
    let counts = |hq: &Facility| -> Vec<String> {
        let v = hq.run_json("hq summary", &[]);
        v["shelters"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };

    story.step("a shelter opens and syncs once; HQ syncs once");
    centre.run_ok(
        "shelter open",
        &["--name", "和倉公民館", "--capacity", "80"],
    );
    centre.sync_once();
    assert_eq!(centre.pending(), 0);
    hq.sync_once();
    assert!(
        counts(&hq).contains(&"和倉公民館".to_owned()),
        "{:?}",
        counts(&hq)
    );

    story.step("another shelter opens with its uplink down and sends a USB stick to HQ");
    let opened = school.run_json(
        "shelter open",
        &["--name", "山王小学校", "--capacity", "300"],
    );
    let roster = opened["shelter"]
        .as_str()
        .expect("the roster's id")
        .to_owned();
    let file = world.path().join("school.musubi");
    school.run_ok(
        "bundle export",
        &["--docs", &roster, "--out", &file.display().to_string()],
    );
    let report = hq.run_json("bundle import", &[&file.display().to_string()]);
    assert_eq!(
        report["skipped"], 0,
        "nothing of the shelter is left out: {report:#}"
    );
    assert!(
        counts(&hq).contains(&"山王小学校".to_owned()),
        "{:?}",
        counts(&hq)
    );
}

/// The authority certifies another root key for the clinic (a compromised or mistaken authority, as
/// a lying relay would serve it). The hospital shows the change, seals no key to the new root until a
/// person confirms its safety number (a wrong number is refused), and then does.
#[test]
fn a_changed_root_key_gets_no_key_until_a_person_confirms_its_safety_number() {
    let _serial = serial();
    let story =
        Story::new("a_changed_root_key_gets_no_key_until_a_person_confirms_its_safety_number");
    let world = World::new("root-change");
    let (relay, a, b) = relay_a_b(&world);
    b.sync_once();
    story.step("the hospital shares a care plan with the clinic");
    let plan = b
        .run_ok(
            "careplan create",
            &[
                "--resident",
                "港 一郎",
                "--with",
                super::CLINIC_A,
                "--role",
                "writer",
            ],
        )
        .trim()
        .to_owned();
    b.sync_once();
    let plan_doc: DocumentId = plan.parse().expect("a plan id");

    story.step("a new root key for the clinic is certified and served");
    let mut newcomer = world.facility("clinic-a-newroot");
    newcomer.init();
    let new_root = newcomer.secrets();
    let authority = musubi_sync_node::authority::AuthorityDir::open(relay.authority_dir())
        .and_then(|d| d.unlock(AUTHORITY_PASSPHRASE))
        .expect("the authority");
    let cert = FacilityCert::sign(
        authority.secrets(),
        relay.deployment(),
        a.facility_id(),
        super::CLINIC_A,
        FacilityRole::Clinic,
        new_root.device_id(),
        now_ms(),
    );
    let lying = LyingRelay::of(&relay);
    lying.replace_facility(&cert, &new_root);
    b.sync_once();
    let listed = b.run_json("facilities", &[]);
    let clinic = listed["facilities"]
        .as_array()
        .expect("facilities")
        .iter()
        .find(|f| f["id"] == a.id())
        .expect("the clinic")
        .clone();
    assert_eq!(clinic["trust"], "root-changed", "{clinic:#}");
    assert!(clinic["pinned_safety_number"].is_string());
    let sealed_to_new = |lying: &LyingRelay| {
        lying
            .grants(plan_doc)
            .iter()
            .any(|g| g.recipients.contains(&new_root.device_id()))
    };
    assert!(
        !sealed_to_new(&lying),
        "no key went to the new root before confirmation"
    );

    story.step("a wrong safety number is refused; the right one is confirmed");
    let right = clinic["safety_number"].as_str().expect("number").to_owned();
    let wrong = "00000 11111 22222 33333 44444 55555";
    b.run("facilities", &["confirm", a.id(), wrong])
        .expect_fail();
    b.sync_once();
    assert!(!sealed_to_new(&lying));
    b.run_ok("facilities", &["confirm", a.id(), &right]);
    b.sync_once();
    assert!(
        sealed_to_new(&lying),
        "after confirmation the plan's key reaches the new root"
    );
}

/// Without the authority beside the relay, a new facility's join waits; the operator cannot approve
/// it; `musubi-node approve` with the authority can, and prints the safety number the facilities
/// then show. A facility revokes its own lost laptop through its chain.
#[test]
fn a_new_facility_waits_for_the_authority_and_a_facility_revokes_its_own_laptop() {
    let _serial = serial();
    let story =
        Story::new("a_new_facility_waits_for_the_authority_and_a_facility_revokes_its_own_laptop");
    let world = World::new("approve");
    let mut relay = musubi_tests::Relay::init(&world);
    relay.set_approve_on_join(false);
    relay.start();
    let code = relay.invite_facility("港診療所", "clinic");
    let mut a = world.facility("clinic-a");
    a.init();
    let out = a.run_ok("join", &[&code, "--no-wait"]);
    assert_eq!(out.trim(), "pending");
    let adir = relay.authority_dir().display().to_string();
    relay
        .node_as_operator("approve", &["--authority", &adir])
        .expect_fail();
    let approved = relay.approve();
    let safety = approved["approved"][0]["safety_number"]
        .as_str()
        .unwrap_or_else(|| panic!("approve lists the facility: {approved:#}"))
        .to_owned();
    a.join(&code);
    let listed = a.run_json("facilities", &[]);
    assert_eq!(listed["facilities"][0]["safety_number"], safety.as_str());

    story.step("a second device joins; the clinic revokes it when it is lost");
    let laptop = world.enrolled_device(&relay, &a, "clinic-a-laptop");
    let laptop_id = laptop.device_id().to_string();
    a.run_ok("device revoke", &[&laptop_id]);
    a.sync_once();
    laptop.sync_once_result().expect_fail();
    a.sync_once();
    let listed = a.run_json("facilities", &[]);
    let devices = listed["facilities"][0]["devices"].to_string();
    assert!(
        devices.contains(&laptop_id)
            && listed["facilities"][0]["devices"]
                .as_array()
                .expect("devices")
                .iter()
                .any(|d| d["device"] == laptop_id.as_str() && d["revoked"] == true),
        "{listed:#}"
    );
}

/// Clinic A (one device), hospital B with two devices (b1, b2); A's letter to B synced to all.
fn letter_to_two_devices(
    world: &World,
) -> (
    musubi_tests::Relay,
    Facility,
    Facility,
    Facility,
    String,
    DocumentId,
) {
    let (relay, a, b1) = relay_a_b(world);
    let b2 = world.enrolled_device(&relay, &b1, "hospital-b2");
    a.sync_once();
    let (id, doc) = letter(&a, &b1);
    for _ in 0..2 {
        b1.sync_once();
        b2.sync_once();
    }
    a.sync_once();
    assert!(b2.show_text(&id).contains("診療情報提供書"));
    (relay, a, b1, b2, id, doc)
}

/// The relay goes back to an older copy with the same generation (a file-level restore, or a relay
/// that lies), and the first device to reach it had not pulled the lost edit and pushes its own:
/// they take the lost edit's sequence numbers. The bundle log tells every device that the bundle
/// under a number it saw is another one: the clinic offers its acknowledged edit again and both
/// hospital devices pull everything.
#[test]
fn a_rollback_followed_by_new_pushes_loses_nothing_acknowledged() {
    let _serial = serial();
    let story = Story::new("a_rollback_followed_by_new_pushes_loses_nothing_acknowledged");
    let world = World::new("rollback-reuse");
    let (mut relay, a, b1, b2, id, doc) = letter_to_two_devices(&world);
    let backup = world.path().join("relay-backup");
    relay.kill();
    musubi_tests::files::copy_flat(&relay.data, &backup);
    relay.start();

    story.step("the clinic's edit is acknowledged and the hospital's first device pulls it");
    a.edit(&id, "remarks", "採血結果を同封します(巻き戻しで失われる)");
    a.sync_once();
    assert_eq!(a.pending(), 0, "the relay acknowledged the clinic's edit");
    b1.sync_once();
    assert!(b1.show_text(&id).contains("巻き戻しで失われる"));
    let acknowledged: Vec<_> = LyingRelay::of(&relay)
        .bundles(doc)
        .into_iter()
        .map(|(_, e)| e.id())
        .collect();

    story.step("the relay goes back; the hospital's second device writes and syncs first");
    relay.kill();
    restore_dir(&backup, &relay.data, None);
    relay.start();
    b2.reply(&id, "承知しました(巻き戻し後の返書)");
    b2.edit(&id, "treatment", "外来で経過観察(巻き戻し後)");
    b2.sync_once();
    for _ in 0..2 {
        a.sync_once();
        b1.sync_once();
        b2.sync_once();
    }

    let at_relay: Vec<_> = LyingRelay::of(&relay)
        .bundles(doc)
        .into_iter()
        .map(|(_, e)| e.id())
        .collect();
    let missing = acknowledged
        .iter()
        .filter(|b| !at_relay.contains(b))
        .count();
    assert_eq!(
        missing, 0,
        "the clinic offered its acknowledged bundles again"
    );
    for f in [&a, &b1, &b2] {
        let text = f.show_text(&id);
        assert!(
            text.contains("巻き戻しで失われる") && text.contains("巻き戻し後の返書"),
            "{} holds both sides' edits: {text}",
            f.name
        );
    }
    assert!(
        !a.status()["relay_behind"].is_null(),
        "the clinic says the relay went back in time"
    );
}

/// The relay goes back to an older copy after a device was enrolled (the directory it signed then
/// is newer than the copy). A lost laptop the operator revokes after the restore is still revoked
/// at every device: the restored relay signs a directory with a version above every one it signed
/// before (it counts from the clock), and a device merges what it saw earlier instead of
/// forgetting it, so the clinic rotates the key away from the laptop.
#[test]
fn a_revocation_after_a_rollback_reaches_the_devices() {
    let _serial = serial();
    let story = Story::new("a_revocation_after_a_rollback_reaches_the_devices");
    let world = World::new("rollback-revoke");
    let (mut relay, a, b1, b2, _letter, doc) = letter_to_two_devices(&world);
    let backup = world.path().join("relay-backup");
    relay.kill();
    musubi_tests::files::copy_flat(&relay.data, &backup);
    relay.start();

    story.step("a third hospital device enrols; everyone syncs");
    let b3 = world.enrolled_device(&relay, &b1, "hospital-b3");
    for f in [&a, &b1, &b3] {
        f.sync_once();
    }
    let pinned = a.engine().pins().expect("pins").version;

    story.step("the relay goes back; the operator then revokes the hospital's second device");
    relay.kill();
    restore_dir(&backup, &relay.data, None);
    relay.start();
    relay.revoke(&b2.device_id().to_string());
    for f in [&a, &b1, &a, &b1] {
        f.sync_once();
    }
    let dir = a.engine().directory().expect("directory");
    assert!(
        a.engine().pins().expect("pins").version > pinned,
        "the restored relay's directory is newer than the one pinned before"
    );
    assert!(!dir.is_current(&b2.device_id()), "the laptop is revoked");
    assert!(
        dir.is_current(&b3.device_id()),
        "the device the restored relay forgot is still known to the clinic"
    );
    let lying = LyingRelay::of(&relay);
    assert!(
        lying.ops(doc).iter().any(|o| matches!(
            &o.body,
            DocOpBody::Exclude { devices } if devices.contains(&b2.device_id())
        )),
        "a member excluded the laptop from the letter"
    );
    let new_key: Vec<KeyGrant> = lying
        .grants(doc)
        .into_iter()
        .filter(|g| g.epoch == Epoch(1))
        .collect();
    let named = |d: DeviceId| new_key.iter().any(|g| g.recipients.contains(&d));
    assert!(
        named(a.device_id()) && named(b1.device_id()) && !named(b2.device_id()),
        "the new key is sealed to the members' devices and not to the laptop"
    );
    assert!(
        named(b3.device_id()),
        "the new key is sealed to the device the restored relay forgot (it reads once re-enrolled)"
    );
    let _ = b2.sync_once_result();
    let held: BTreeSet<Epoch> = b2
        .engine()
        .keys(doc)
        .expect("keys")
        .keys()
        .copied()
        .collect();
    assert!(
        !held.contains(&Epoch(1)),
        "the revoked laptop gets no key written after its revocation: {held:?}"
    );
}
