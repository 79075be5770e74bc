//! A relay running modified code (with a stolen laptop's keys, where the story says so) tries the
//! trust model in process, from the positions a real relay could serve; each test is the attacker's
//! story, and what the devices do instead. The last story is an enrolled facility that is not a
//! member, handing over a file.
//!
//! The relay is played by the test: it hands each engine exactly what a relay running modified
//! code could serve (its own signed directory, operations and grants signed by real devices, in an
//! order and from a position it chooses), through the sync driver's own event handler
//! (`net::apply_event`), as `sync` would. A thief is a real enrolled device whose secrets the test
//! holds (a stolen laptop with its passphrase).

use std::path::Path;

use automerge::transaction::Transactable as _;
use musubi_crdt::crypto::{DeviceSecrets, DocumentKey};
use musubi_crdt::directory::{DirectoryBody, SignedDirectory};
use musubi_crdt::ids::{DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, Role};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member};
use musubi_crdt::protocol::PushItem;
use musubi_crdt::sync::{Event, Known, Session, SessionConfig};
use musubi_facility::Engine;
use musubi_facility::engine::{ORPHANED_EPOCH_GRACE_MS, now_ms};
use musubi_facility::net::{self, SyncReport};
use musubi_facility::offline::OfflineDeployment;
use musubi_facility::store::Origin;

const SEED: u8 = 21;

fn engine(root: &Path, name: &str) -> Engine {
    Engine::init(&root.join(name), name, "correct horse battery", 10).expect("init a device")
}

/// The stand-in relay's key of `OfflineDeployment::new(SEED)` (what the relay operator holds).
fn relay_key() -> DeviceSecrets {
    DeviceSecrets::from_seeds([SEED ^ 0xAA; 32], [SEED ^ 0x0F; 32])
}

/// The body `dep` signs now (decoded with the relay's key).
fn body_of(dep: &OfflineDeployment) -> DirectoryBody {
    dep.signed()
        .open(&relay_key().device_id())
        .expect("the stand-in relay's directory opens")
}

/// Hands `ev` to `engine` the way the sync driver does.
fn serve(engine: &mut Engine, ev: Event) {
    let mut session = Session::new(SessionConfig::default(), Known::default());
    let mut report = SyncReport::default();
    net::apply_event(engine, &mut session, ev, &mut report).expect("apply a relay event");
}

/// The relay serves `doc`'s operations from `from` on.
fn serve_ops(engine: &mut Engine, doc: DocumentId, from: u32, ops: Vec<DocOp>) {
    let total = from + ops.len() as u32;
    serve(
        engine,
        Event::Ops {
            doc,
            from,
            ops,
            total,
        },
    );
}

/// The relay serves `doc`'s key grants.
fn serve_grants(engine: &mut Engine, doc: DocumentId, grants: Vec<KeyGrant>) {
    serve(engine, Event::KeyGrants { doc, grants });
}

/// A clinic (`a1`, its laptop `a2`) that owns a care plan with a hospital (`b`) as writer, and a
/// facility `x` that is enrolled but no member. Every member device holds the chain (confirmed by
/// the relay), the epoch-0 key and the first edit.
struct World {
    _tmp: tempfile::TempDir,
    dep: OfflineDeployment,
    a1: Engine,
    a2: Engine,
    b: Engine,
    x: Engine,
    fa: FacilityId,
    fx: FacilityId,
    doc: DocumentId,
}

fn world() -> World {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut dep = OfflineDeployment::new(SEED);
    let a1 = engine(tmp.path(), "a1");
    let a2 = engine(tmp.path(), "a2");
    let b = engine(tmp.path(), "b");
    let x = engine(tmp.path(), "x");
    let fa = dep.add_facility(&a1, "港診療所", FacilityRole::Clinic);
    dep.add_device(fa, &a1, &a2);
    let fb = dep.add_facility(&b, "東京第一テスト病院", FacilityRole::Clinic);
    let fx = dep.add_facility(&x, "山手クリニック", FacilityRole::Clinic);
    for (e, f) in [(&a1, fa), (&a2, fa), (&b, fb), (&x, fx)] {
        dep.enrol(e, f).expect("enrol");
    }
    let mut w = World {
        _tmp: tmp,
        dep,
        a1,
        a2,
        b,
        x,
        fa,
        fx,
        doc: DocumentId::from_random_bytes([0; 16]),
    };
    w.doc =
        w.a1.create_document(
            DocumentKind::CarePlan,
            vec![Member {
                facility: fb,
                role: Role::Writer,
            }],
            |d| {
                d.put(automerge::ROOT, "note", "第1表: 初回")?;
                Ok(())
            },
        )
        .expect("create");
    let items = w.a1.export_items(w.doc).expect("export");
    for e in [&mut w.a2, &mut w.b] {
        e.import_items(items.clone(), Origin::File, false)
            .expect("import");
    }
    // The relay confirms the Create to everyone.
    let ops = w.a1.store().ops(w.doc).expect("ops");
    for e in [&mut w.a1, &mut w.a2, &mut w.b] {
        serve_ops(e, w.doc, 0, ops.clone());
        assert!(e.keys(w.doc).expect("keys").contains_key(&Epoch(0)));
    }
    w
}

fn recipients_of(e: &Engine, doc: DocumentId) -> Vec<(Epoch, DeviceId)> {
    e.store()
        .grants(doc)
        .expect("grants")
        .iter()
        .flat_map(|g| g.recipients.iter().map(move |r| (g.epoch, *r)))
        .collect()
}

/// The accomplice facility `x`'s role in `doc` at the hospital, and the epochs the hospital sealed
/// to its device.
fn accomplice_at_b(w: &World, doc: DocumentId) -> (Option<Role>, Vec<(Epoch, DeviceId)>) {
    let info = w.b.document_info(&doc.to_string()).expect("info");
    let x = w.x.device_id();
    let leaked = recipients_of(&w.b, doc)
        .into_iter()
        .filter(|(_, r)| *r == x)
        .collect();
    (info.role_of(w.fx), leaked)
}

/// The newest epoch whose key `e` holds for `doc`.
fn newest_held(e: &Engine, doc: DocumentId) -> Option<Epoch> {
    e.keys(doc).expect("keys").keys().next_back().copied()
}

fn age_recipient(e: &Engine) -> (DeviceId, String) {
    let p = e.secrets().public();
    (p.device, p.age_recipient)
}

/// The bundles `e` queued for `doc` after `after` (outbox ids).
fn queued_bundles(e: &Engine, after: u64) -> Vec<musubi_crdt::bundle::Envelope> {
    e.store()
        .pending(after)
        .expect("outbox")
        .into_iter()
        .filter_map(|r| match r.item {
            PushItem::Bundle { envelope } => Some(envelope),
            _ => None,
        })
        .collect()
}

fn last_outbox(e: &Engine) -> u64 {
    e.store()
        .pending(0)
        .expect("outbox")
        .last()
        .map_or(0, |r| r.id)
}

fn edit(e: &mut Engine, doc: DocumentId, text: &str) {
    let mut l = e.load(doc).expect("load");
    l.doc
        .put(automerge::ROOT, "note", text)
        .expect("edit the document");
    e.commit(&mut l).expect("commit");
}

// ---------------------------------------------------------------------------------------------------------

/// A stolen laptop, revoked by the operator, plus a relay running modified code: after the
/// hospital learned of the revocation, the relay serves a `NewEpoch` the laptop signed (a key the
/// thief chose) and a grant of that key to the honest devices. The hospital takes both as history
/// (`Point::Pulled` admits a revoked author), sees no device to rotate away (the thief left itself
/// out of the grant), and seals its next edit with the thief's key.
#[test]
fn a_revoked_laptop_cannot_make_a_member_use_its_key() {
    let mut w = world();
    let doc = w.doc;
    // The operator revokes the laptop; the hospital learns of it.
    w.dep.revoke(w.a2.device_id());
    assert!(w.dep.refresh(&w.b).expect("refresh"));
    assert!(!w.b.directory().expect("dir").is_current(&w.a2.device_id()));

    // The thief signs a new epoch with a key of its choosing, and grants it to the honest devices.
    let head = w.b.document_info(&doc.to_string()).expect("info").head;
    let evil = DocumentKey::from_seed([0xEE; 32]);
    let rotate = DocOp::sign(
        w.a2.secrets(),
        w.fa,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::NewEpoch {
            epoch: Epoch(1),
            key_commitment: evil.commitment(),
        },
    )
    .expect("sign");
    let grant = KeyGrant::seal(
        w.a2.secrets(),
        w.fa,
        doc,
        Epoch(1),
        &evil,
        &[age_recipient(&w.a1), age_recipient(&w.b)],
    )
    .expect("seal");

    // The lying relay serves them after the revocation.
    serve_ops(&mut w.b, doc, 1, vec![rotate]);
    serve_grants(&mut w.b, doc, vec![grant]);

    let before = last_outbox(&w.b);
    edit(&mut w.b, doc, "第2表: 退院後の目標 (after the revocation)");
    let sealed = queued_bundles(&w.b, before);
    assert!(!sealed.is_empty(), "the hospital queued its edit");
    for env in &sealed {
        assert!(
            env.open(&evil).is_err(),
            "the hospital sealed an edit made after it learned of the revocation with a key the \
             revoked laptop chose (epoch {})",
            env.epoch
        );
    }
}

/// Same attacker: the relay serves a `SetMember` the revoked laptop signed that makes an enrolled
/// non-member facility (the thief's accomplice) a writer. The hospital takes it and seals the
/// document's key to the accomplice's device.
#[test]
fn a_revoked_laptop_cannot_add_a_facility_after_its_revocation() {
    let mut w = world();
    let doc = w.doc;
    w.dep.revoke(w.a2.device_id());
    assert!(w.dep.refresh(&w.b).expect("refresh"));

    let head = w.b.document_info(&doc.to_string()).expect("info").head;
    let add = DocOp::sign(
        w.a2.secrets(),
        w.fa,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::SetMember {
            facility: w.fx,
            role: Some(Role::Writer),
        },
    )
    .expect("sign");
    serve_ops(&mut w.b, doc, 1, vec![add]);

    let (role, leaked) = accomplice_at_b(&w, doc);
    assert!(
        role.is_none() && leaked.is_empty(),
        "an operation the revoked laptop signed after the revocation made {} a {role:?}, and the \
         hospital sealed keys to its device: {leaked:?}",
        w.fx,
    );
}

/// The relay can also undo the rotation that already cut the laptop off: it claims to have gone
/// back to one operation (a rollback), then serves the laptop's `SetMember` at position 1. The
/// hospital replaces its confirmed `Exclude` + `NewEpoch` with it (it signs its `Exclude` again
/// after), and the accomplice becomes a member and gets the new key.
#[test]
fn a_relay_cannot_splice_a_revoked_laptops_operation_before_the_exclusion() {
    let mut w = world();
    let doc = w.doc;
    w.dep.revoke(w.a2.device_id());
    assert!(w.dep.refresh(&w.b).expect("refresh"));
    // The hospital excludes the laptop and rotates; the relay acknowledges both.
    w.b.maintain().expect("maintain");
    let chain = w.b.store().ops(doc).expect("ops");
    assert_eq!(chain.len(), 3, "Create, Exclude, NewEpoch: {chain:#?}");
    for op in &chain[1..] {
        w.b.confirm_op(op).expect("confirm");
    }
    let create = chain[0].hash();

    // The thief signs an operation that follows the Create, before the exclusion.
    let add = DocOp::sign(
        w.a2.secrets(),
        w.fa,
        doc,
        now_ms(),
        Some(create),
        DocOpBody::SetMember {
            facility: w.fx,
            role: Some(Role::Writer),
        },
    )
    .expect("sign");
    serve(
        &mut w.b,
        Event::Behind {
            doc,
            head: musubi_crdt::ids::Seq(0),
            ops: Some(1),
        },
    );
    serve_ops(&mut w.b, doc, 1, vec![add]);

    let (role, leaked) = accomplice_at_b(&w, doc);
    assert!(
        role.is_none() && leaked.is_empty(),
        "the relay replaced the hospital's confirmed exclusion with an operation of the revoked \
         laptop: {} is now a {role:?} and holds keys {leaked:?}; chain: {:#?}",
        w.fx,
        w.b.store()
            .ops(doc)
            .expect("ops")
            .iter()
            .map(|o| (o.author, o.body.clone()))
            .collect::<Vec<_>>()
    );
}

/// A relay that leaves a facility out of the directory it signs (or serves a facility's device
/// chain shorter), then announces one more operation: the device replays its confirmed chain with
/// that directory, the replay stops inside the confirmed prefix, and `apply_relay_ops` slices past
/// the end of the chain. The sync driver panics, at every sync.
#[test]
fn a_relay_cannot_crash_a_device_with_a_directory_that_leaves_a_facility_out() {
    let mut w = world();
    let doc = w.doc;
    // The owner adds a third facility; the relay confirms it to the hospital (2 operations).
    let head = w.a1.document_info(&doc.to_string()).expect("info").head;
    let add = DocOp::sign(
        w.a1.secrets(),
        w.fa,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::SetMember {
            facility: w.fx,
            role: Some(Role::Reader),
        },
    )
    .expect("sign");
    serve_ops(&mut w.b, doc, 1, vec![add.clone()]);
    assert_eq!(w.b.store().ops(doc).expect("ops").len(), 2);

    // The relay signs a newer directory without that facility.
    let mut body = body_of(&w.dep);
    body.facilities.retain(|f| f.cert.facility != w.fx);
    body.version += 10;
    let signed = SignedDirectory::sign(&body, &relay_key());
    assert!(w.b.update_directory(&signed).expect("update"));

    // It says the chain has one more operation and serves anything at position 2.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_ops(&mut w.b, doc, 2, vec![add.clone()]);
    }));
    assert!(
        outcome.is_ok(),
        "the device panicked on what a relay served (a crash at every sync)"
    );
}

/// The relay withholds the laptop's revocation from the hospital's directory but serves the
/// clinic's `Exclude` + `NewEpoch` (which name the laptop). The hospital does not take an exclusion
/// of a device it still holds current: it asks for the directory first. Once it has learned of the
/// revocation it takes both, and its key upkeep never seals the new key to the laptop.
#[test]
fn key_upkeep_never_seals_a_key_to_a_device_the_chain_excludes() {
    let mut w = world();
    let doc = w.doc;
    // The clinic's first device learns of the revocation and rotates.
    w.dep.revoke(w.a2.device_id());
    assert!(w.dep.refresh(&w.a1).expect("refresh"));
    w.a1.maintain().expect("maintain");
    let chain = w.a1.store().ops(doc).expect("ops");
    assert_eq!(chain.len(), 3, "Create, Exclude, NewEpoch");
    let grants = w.a1.store().grants(doc).expect("grants");
    // The hospital gets the operations and grants, not the directory: it waits for it.
    let applied = w.b.apply_relay_ops(doc, 1, &chain[1..]).expect("apply");
    assert!(applied.awaits_directory, "{applied:?}");
    let info = w.b.document_info(&doc.to_string()).expect("info");
    assert_eq!(info.epoch, Epoch(0), "not taken before the directory");
    // The directory arrives; the operations are served again.
    assert!(w.dep.refresh(&w.b).expect("refresh"));
    serve_ops(&mut w.b, doc, 1, chain[1..].to_vec());
    serve_grants(&mut w.b, doc, grants);
    let info = w.b.document_info(&doc.to_string()).expect("info");
    assert_eq!(info.epoch, Epoch(1));
    assert!(info.is_excluded(&w.a2.device_id()));
    w.b.maintain().expect("maintain");

    let laptop = w.a2.device_id();
    let leaked: Vec<_> = recipients_of(&w.b, doc)
        .into_iter()
        .filter(|(e, r)| *r == laptop && *e >= Epoch(1))
        .collect();
    assert!(
        leaked.is_empty(),
        "the hospital sealed a key of an epoch after the laptop's exclusion to the laptop: {leaked:?}"
    );
    // And the laptop opens none of them.
    let opened =
        w.b.store()
            .grants(doc)
            .expect("grants")
            .iter()
            .filter(|g| g.epoch >= Epoch(1))
            .any(|g| g.open(w.a2.secrets()).is_ok());
    assert!(!opened, "the excluded laptop opens a key of epoch 1");
}

/// A directory with a version far ahead (a lying relay, or the relay before its database was put
/// back to a backup with the same generation) pins the version; every later directory with a
/// lower version is ignored, from the relay, a LAN peer or a file, so a revocation made afterwards
/// never reaches the device.
#[test]
fn a_revocation_reaches_a_device_after_the_relay_served_a_higher_version() {
    let mut w = world();
    let mut body = body_of(&w.dep);
    body.version += 1000;
    assert!(
        w.b.update_directory(&SignedDirectory::sign(&body, &relay_key()))
            .expect("update")
    );
    // The relay is back to its real counter; the operator revokes the laptop.
    w.dep.revoke(w.a2.device_id());
    let _ = w.dep.refresh(&w.b).expect("refresh");
    assert!(
        !w.b.directory().expect("dir").is_current(&w.a2.device_id()),
        "the hospital never learns that the laptop was revoked (its directory stays pinned at the \
         higher version, {} > {})",
        w.b.pins().expect("pins").version,
        w.dep.signed().claimed_version().unwrap_or(0)
    );
}

/// A relay running modified code leaves the hospital out of the directory it serves the clinic
/// (or serves the hospital's device chain shorter, or its old certificate): nothing the hospital
/// signed changed, yet the clinic's key upkeep counts the hospital's devices as gone, signs an
/// `Exclude` of them into the document's chain and rotates. A device replaying the chain at
/// `Point::Pulled` takes the `Exclude` without the "current member device" check, and an excluded
/// device stays excluded for good: the relay alone locks a member facility's devices out of a
/// document permanently.
#[test]
fn a_directory_that_leaves_a_member_out_does_not_exclude_its_devices() {
    let mut w = world();
    let doc = w.doc;
    let mut body = body_of(&w.dep);
    let fb = w.b.enrolment().expect("enrolment").facility;
    body.facilities.retain(|f| f.cert.facility != fb);
    body.version += 10;
    assert!(
        w.a1.update_directory(&SignedDirectory::sign(&body, &relay_key()))
            .expect("update")
    );
    w.a1.maintain().expect("maintain");
    let info = w.a1.document_info(&doc.to_string()).expect("info");
    assert!(
        !info.is_excluded(&w.b.device_id()),
        "the clinic signed an exclusion of the hospital's certified, unrevoked device because the \
         relay left it out of a directory: {:?}",
        info.excluded
    );
}

/// A stolen laptop that is not revoked yet (or a hostile device of a member facility) fills its
/// facility's chain with devices of its own (invites it registers, joins it makes with fresh keys,
/// approvals it signs: all accepted). Every member device's key upkeep then has more devices to
/// seal to than one grant may name, `KeyGrant::seal` fails with `TooMany`, and `maintain` returns
/// the error for every document: `start_session` and every sync event call it with `?`, so every
/// device sharing a document with that facility can no longer sync at all.
#[test]
fn a_facility_with_many_devices_does_not_stop_the_others_from_syncing() {
    let mut w = world();
    let fb = w.b.enrolment().expect("enrolment").facility;
    let mut body = body_of(&w.dep);
    let rec = body
        .facilities
        .iter_mut()
        .find(|f| f.cert.facility == fb)
        .expect("the hospital");
    let by = w.b.secrets().clone();
    for i in 0..1023u32 {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_be_bytes());
        seed[4] = 0x77;
        let fake = DeviceSecrets::from_seeds(seed, seed);
        let p = fake.public();
        let link = musubi_crdt::directory::DeviceLink::sign(
            &by,
            fb,
            rec.links.last(),
            musubi_crdt::directory::DeviceChange::Add {
                device: p.device,
                age_recipient: p.age_recipient,
            },
            now_ms(),
        );
        rec.links.push(link);
    }
    body.version += 10;
    assert!(
        w.a1.update_directory(&SignedDirectory::sign(&body, &relay_key()))
            .expect("update")
    );
    w.a1.maintain()
        .expect("grants to the new devices still fit in one grant");
    // The theft is noticed: the operator revokes the hospital's device that added them (the
    // devices it added stay current: a revocation does not reach them).
    body.revoked_devices.push(w.b.device_id());
    body.version += 1;
    assert!(
        w.a1.update_directory(&SignedDirectory::sign(&body, &relay_key()))
            .expect("update")
    );
    let r = w.a1.maintain();
    let info = w.a1.document_info(&w.doc.to_string()).expect("info");
    let keys = w.a1.keys(w.doc).expect("keys");
    assert!(
        r.is_ok() && keys.contains_key(&info.epoch),
        "key upkeep fails ({:?}), so the clinic can no longer start a sync; the chain is at epoch {} \
         and the clinic holds keys of epochs {:?} (a NewEpoch was signed whose key nobody holds)",
        r.err(),
        info.epoch,
        keys.keys().collect::<Vec<_>>()
    );
}

/// An enrolled facility that is not a member hands over a file (or a LAN offer) of thousands of
/// signed operations that follow nothing in the document's chain. Each verifies (a real device
/// signed it), so a device keeps some aside in case their predecessors arrive; it keeps at most
/// `PROVISIONAL_OPS_MAX` per document and refuses the rest, and its chain and key are untouched.
#[test]
fn a_non_member_cannot_fill_a_disk_with_operations_that_never_chain() {
    use musubi_crdt::limits::PROVISIONAL_OPS_MAX;
    let mut w = world();
    let before = w.b.store().ops(w.doc).expect("ops");
    let x = w.x.secrets().clone();
    let flood: Vec<PushItem> = (0..PROVISIONAL_OPS_MAX as u64 + 40)
        .map(|i| {
            let mut prev = [7u8; 32];
            prev[..8].copy_from_slice(&i.to_le_bytes());
            let op = DocOp::sign(
                &x,
                w.fx,
                w.doc,
                now_ms() + i,
                Some(prev),
                DocOpBody::SetMember {
                    facility: w.fx,
                    role: Some(Role::Owner),
                },
            )
            .expect("sign");
            PushItem::Op { op }
        })
        .collect();
    let report =
        w.b.import_items(flood, Origin::File, false)
            .expect("the import finishes");
    assert_eq!(report.provisional, PROVISIONAL_OPS_MAX as u64);
    assert_eq!(report.refused.len(), 40, "{:?}", report.refused.first());
    assert!(
        report.refused[0].contains("kept aside"),
        "{}",
        report.refused[0]
    );
    assert_eq!(
        w.b.store().provisional_count(w.doc).expect("count"),
        PROVISIONAL_OPS_MAX
    );
    assert_eq!(
        w.b.store().ops(w.doc).expect("ops"),
        before,
        "the chain is untouched"
    );
    let members = w.b.store().document(w.doc).expect("row").expect("doc").info;
    assert!(
        members.role_of(w.fx).is_none(),
        "the non-member is still not a member"
    );
    // The hospital still edits and seals to the document's own key.
    let after = last_outbox(&w.b);
    edit(&mut w.b, w.doc, "第1表: 追記");
    let sealed = queued_bundles(&w.b, after);
    assert_eq!(sealed.len(), 1);
    assert_eq!(sealed[0].epoch, Epoch(0));
}

/// A member (a clinic added as reader) names the clinic owner's new device in a grant whose
/// sealed key is garbage under the real commitment: nobody but that device can tell. The owner
/// still seals the real key to its new device, because only a grant of its own facility, or of the
/// recipient's facility, counts as the device holding the key.
#[test]
fn a_member_cannot_cover_up_a_new_device_with_a_grant_that_does_not_open() {
    let mut w = world();
    let doc = w.doc;
    w.a1.share(doc, "山手クリニック", Some(Role::Reader))
        .expect("share with the clinic");
    let chain = w.a1.store().ops(doc).expect("ops");
    w.a1.confirm_op(chain.last().expect("the share"))
        .expect("confirm");
    let a3 = engine(w._tmp.path(), "a3");
    w.dep.add_device(w.fa, &w.a1, &a3);
    w.dep.enrol(&a3, w.fa).expect("enrol the new device");
    assert!(w.dep.refresh(&w.a1).expect("refresh"));

    let commitment =
        w.a1.document_info(&doc.to_string())
            .expect("info")
            .commitment(Epoch(0))
            .expect("epoch 0");
    let x = w.x.secrets();
    let mut garbage = KeyGrant::seal(
        x,
        w.fx,
        doc,
        Epoch(0),
        &DocumentKey::from_seed([66; 32]),
        &[age_recipient(&a3)],
    )
    .expect("seal");
    garbage.key_commitment = commitment;
    garbage.signature = x.sign(
        musubi_crdt::crypto::domain::KEY_GRANT,
        &garbage.signed_bytes(),
    );
    serve_grants(&mut w.a1, doc, vec![garbage.clone()]);
    assert!(
        w.a1.store().grants(doc).expect("grants").contains(&garbage),
        "the grant is admitted: it is signed by a member and matches the commitment"
    );

    w.a1.maintain().expect("maintain");
    let real: Vec<KeyGrant> =
        w.a1.store()
            .grants(doc)
            .expect("grants")
            .into_iter()
            .filter(|g| g.author == w.a1.device_id() && g.recipients.contains(&a3.device_id()))
            .collect();
    assert_eq!(real.len(), 1, "the owner seals the key to its new device");
    assert_eq!(
        real[0].open(a3.secrets()).expect("opens").commitment(),
        commitment
    );
    assert!(garbage.open(a3.secrets()).is_err());
}

/// The hospital carries the clinic laptop's edit from a USB stick and forwards it; a lying relay
/// refuses it as forbidden. The hospital keeps it (its own rules admit it) and still hands it on
/// by file; once the laptop is revoked and the relay refuses again, the hospital's own rules agree
/// and it takes the bundle out.
#[test]
fn a_relay_cannot_make_a_device_delete_a_bundle_it_carried() {
    use musubi_crdt::protocol::{ErrorCode, PushResult};
    use musubi_crdt::sync::OutboxId;
    let mut w = world();
    let doc = w.doc;
    edit(&mut w.a2, doc, "第1表: 訪問時の聞き取り(USBで運ぶ)");
    let items = w.a2.export_items(doc).expect("export");
    let report =
        w.b.import_items(items, Origin::File, true)
            .expect("import the stick");
    assert!(report.new >= 1, "{report:?}");
    let carried = |e: &Engine| {
        e.store()
            .pending(0)
            .expect("outbox")
            .into_iter()
            .find_map(|r| match r.item {
                PushItem::Bundle { envelope } if envelope.author == w.a2.device_id() => {
                    Some((r.id, envelope))
                }
                _ => None,
            })
    };
    let (row, envelope) = carried(&w.b).expect("the laptop's bundle is queued for the relay");
    serve(
        &mut w.b,
        Event::Pushed {
            item: OutboxId(row),
            result: PushResult::Rejected {
                code: ErrorCode::Forbidden,
                message: "refused by a lying relay".into(),
            },
        },
    );
    assert!(
        w.b.store()
            .bundle(&envelope.id())
            .expect("bundle")
            .is_some(),
        "the hospital keeps the bundle"
    );
    let exported = w.b.export_items(doc).expect("export");
    assert!(
        exported
            .iter()
            .any(|i| matches!(i, PushItem::Bundle { envelope: e } if e.id() == envelope.id())),
        "and hands it on by file"
    );

    // The laptop is revoked; the hospital learns it and sees the same bundle refused again.
    w.dep.revoke(w.a2.device_id());
    assert!(w.dep.refresh(&w.b).expect("refresh"));
    let row =
        w.b.store_mut()
            .queue(&PushItem::Bundle {
                envelope: envelope.clone(),
            })
            .expect("queue again");
    serve(
        &mut w.b,
        Event::Pushed {
            item: OutboxId(row),
            result: PushResult::Rejected {
                code: ErrorCode::Revoked,
                message: "the author is revoked".into(),
            },
        },
    );
    assert!(
        w.b.store()
            .bundle(&envelope.id())
            .expect("bundle")
            .is_none(),
        "the hospital's own rules refuse it now, so it is taken out"
    );
}

/// A LAN exchange with the clinic's laptop is under way when the hospital learns (from the relay
/// or a file) that the laptop was revoked: the laptop's answer asks for the hospital's bundles,
/// and the hospital sends none; while the laptop was current, the same answer got them.
#[test]
fn a_laptop_revoked_during_a_lan_exchange_gets_nothing_more() {
    use musubi_crdt::protocol::Response;
    use musubi_facility::lan::Lan;
    let mut w = world();
    let doc = w.doc;
    edit(&mut w.b, doc, "第1表: 病院側の追記");
    let want: Vec<_> =
        w.b.store()
            .bundles(doc)
            .expect("bundles")
            .iter()
            .map(|b| b.envelope.id())
            .collect();
    let laptop = w.a2.device_id().0;
    let answer = || Response::Exchange {
        doc,
        items: vec![],
        more: false,
        want: want.clone(),
        ops: vec![],
        grants: vec![],
    };
    let before = Lan::take_exchange(&mut w.b, &laptop, doc, answer()).expect("exchange");
    assert!(
        before.is_some(),
        "while current, the laptop gets the bundles it asks for"
    );
    w.dep.revoke(w.a2.device_id());
    assert!(w.dep.refresh(&w.b).expect("refresh"));
    let after = Lan::take_exchange(&mut w.b, &laptop, doc, answer()).expect("exchange");
    assert!(
        after.is_none(),
        "after the revocation it gets nothing: {after:?}"
    );
}

/// The hospital (a writer) rotates the care plan to a key it grants to nobody. Every other
/// device then has no key for the current epoch, and the relay refuses bundles in the old one:
/// the document's writes would be frozen for good. Once the relay has served every grant it holds
/// and none opens, the clinic starts the next epoch itself and grants it to every member device.
#[test]
fn a_writer_cannot_freeze_a_document_with_a_key_it_grants_to_nobody() {
    let mut w = world();
    let doc = w.doc;
    let head =
        w.a1.store()
            .ops(doc)
            .expect("ops")
            .last()
            .expect("create")
            .hash();
    let fb = w.b.enrolment().expect("enrolment").facility;
    let hidden = DocumentKey::from_seed([77; 32]);
    let freeze = DocOp::sign(
        w.b.secrets(),
        fb,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::NewEpoch {
            epoch: Epoch(1),
            key_commitment: hidden.commitment(),
        },
    )
    .expect("sign");
    serve_ops(&mut w.a1, doc, 1, vec![freeze]);
    assert_eq!(
        w.a1.document_info(&doc.to_string()).expect("info").epoch,
        Epoch(1)
    );
    serve_grants(&mut w.a1, doc, vec![]);
    // A rotation's grants may be a moment late: nothing happens yet.
    w.a1.maintain().expect("maintain");
    assert_eq!(
        w.a1.document_info(&doc.to_string()).expect("info").epoch,
        Epoch(1),
        "no second rotation while the grants may still come"
    );
    // The relay served every grant again, and the epoch has had no key here for longer than the
    // grace (the first sighting is put back in time).
    w.a1.store()
        .set_meta_cbor(&format!("orphaned_epoch:{doc}"), &None::<(u32, u64)>)
        .expect("meta");
    w.a1.note_grants_fetched(
        doc,
        newest_held(&w.a1, doc),
        now_ms() - ORPHANED_EPOCH_GRACE_MS - 1,
    )
    .expect("note");

    let after = last_outbox(&w.a1);
    w.a1.maintain().expect("maintain");
    let info = w.a1.document_info(&doc.to_string()).expect("info");
    assert_eq!(info.epoch, Epoch(2), "the clinic started the next epoch");
    let keys = w.a1.keys(doc).expect("keys");
    assert!(keys.contains_key(&Epoch(2)));
    let to_b: Vec<KeyGrant> =
        w.a1.store()
            .grants(doc)
            .expect("grants")
            .into_iter()
            .filter(|g| g.epoch == Epoch(2) && g.recipients.contains(&w.b.device_id()))
            .collect();
    assert_eq!(to_b.len(), 1, "the hospital gets the new key too");
    edit(&mut w.a1, doc, "第1表: 凍結後の追記");
    let sealed = queued_bundles(&w.a1, after);
    assert!(
        sealed.iter().any(|e| e.epoch == Epoch(2)),
        "the clinic's edit is sealed in the new epoch: {:?}",
        sealed.iter().map(|e| e.epoch).collect::<Vec<_>>()
    );

    // The hospital does it again (or a relay withholds the grants again): the clinic waits twice
    // as long before the next rotation, so the document's operation budget is not spent.
    for op in w.a1.store().ops(doc).expect("ops").iter().skip(2) {
        w.a1.confirm_op(op).expect("confirm");
    }
    let head =
        w.a1.store()
            .ops(doc)
            .expect("ops")
            .last()
            .expect("op")
            .hash();
    let again = DocOp::sign(
        w.b.secrets(),
        fb,
        doc,
        now_ms(),
        Some(head),
        DocOpBody::NewEpoch {
            epoch: Epoch(3),
            key_commitment: hidden.commitment(),
        },
    )
    .expect("sign");
    let from = w.a1.store().ops(doc).expect("ops").len() as u32;
    serve_ops(&mut w.a1, doc, from, vec![again]);
    assert_eq!(
        w.a1.document_info(&doc.to_string()).expect("info").epoch,
        Epoch(3)
    );
    let epoch_after = |w: &mut World, waited: u64| {
        w.a1.store()
            .set_meta_cbor(&format!("orphaned_epoch:{doc}"), &None::<(u32, u64)>)
            .expect("meta");
        w.a1.note_grants_fetched(doc, newest_held(&w.a1, doc), now_ms() - waited)
            .expect("note");
        w.a1.maintain().expect("maintain");
        w.a1.document_info(&doc.to_string()).expect("info").epoch
    };
    assert_eq!(epoch_after(&mut w, ORPHANED_EPOCH_GRACE_MS + 1), Epoch(3));
    assert_eq!(
        epoch_after(&mut w, 2 * ORPHANED_EPOCH_GRACE_MS + 1),
        Epoch(4)
    );
}

/// Not an attack, the race the desktop story met: a clinic joins while the hospital's app runs and
/// sends its first letter at once. The hospital's session has the letter's operations before the
/// directory that lists the clinic's device: it waits for the directory instead of ignoring the
/// operations for the rest of the session, and takes them once the directory has arrived.
#[test]
fn a_letter_from_a_facility_enrolled_a_moment_ago_waits_for_the_directory() {
    let mut w = world();
    let clinic = engine(w._tmp.path(), "new-clinic");
    let fc = w
        .dep
        .add_facility(&clinic, "山手第二クリニック", FacilityRole::Clinic);
    w.dep.enrol(&clinic, fc).expect("enrol the new clinic");
    let mut clinic = clinic;
    let fb = w.b.enrolment().expect("enrolment").facility;
    let letter = clinic
        .create_document(
            DocumentKind::Referral,
            vec![Member {
                facility: fb,
                role: Role::Writer,
            }],
            |d| {
                d.put(automerge::ROOT, "note", "紹介状: 初診")?;
                Ok(())
            },
        )
        .expect("create");
    let ops = clinic.store().ops(letter).expect("ops");

    // The hospital still holds the directory from before the clinic enrolled.
    let applied = w.b.apply_relay_ops(letter, 0, &ops).expect("apply");
    assert!(
        applied.awaits_directory,
        "the hospital waits for the directory: {applied:?}"
    );
    assert!(w.b.store().document(letter).expect("row").is_none());

    assert!(w.dep.refresh(&w.b).expect("refresh"));
    let applied = w.b.apply_relay_ops(letter, 0, &ops).expect("apply");
    assert!(!applied.awaits_directory);
    assert_eq!(applied.confirmed, 1);
    let info =
        w.b.document_info(&letter.to_string())
            .expect("the letter is known");
    assert_eq!(info.role_of(fb), Some(Role::Writer));
}
