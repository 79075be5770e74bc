//! The relay's story: an operator enrols clinics, a care office and HQ; their devices push, pull and get
//! refused exactly as the protocol says, and nothing readable ever reaches the relay's disk.
//!
//! Most tests drive `Relay::handle` directly (frames in, frames out, no sockets, fixed clock);
//! the last ones run the real swarm in-process and the real `musubi-node` binary.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::crypto::{DeviceSecrets, DocumentKey};
use musubi_crdt::directory::Directory;
use musubi_crdt::ids::{
    DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, Role, Seq,
};
use musubi_crdt::limits::{PULL_RESPONSE_BYTES_TARGET, PUSH_ITEMS_MAX};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member};
use musubi_crdt::protocol::{self, ErrorCode, PushItem, PushResult, Request, Response};
use musubi_sync_node::invite::InviteCode;
use musubi_sync_node::store::InviteKind;
use musubi_sync_node::{Notification, Relay, Store};

/// A fixed clock: 2027-01-15T08:00:00Z.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn device(n: u8) -> DeviceSecrets {
    DeviceSecrets::from_seeds([n; 32], [n ^ 0x5a; 32])
}

/// A relay in a temporary directory, driven through `Relay::handle` with encoded frames.
struct World {
    tmp: tempfile::TempDir,
    relay: Relay,
    now: SystemTime,
    next_secret: u8,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::init(&tmp.path().join("relay"), "柏崎市", t0()).expect("init");
        let relay = Relay::new(store).expect("relay");
        Self {
            tmp,
            relay,
            now: t0(),
            next_secret: 1,
        }
    }

    fn data(&self) -> std::path::PathBuf {
        self.tmp.path().join("relay")
    }

    fn invite(&mut self, kind: InviteKind, expires: Duration) -> [u8; 32] {
        let secret = [self.next_secret; 32];
        self.next_secret += 1;
        self.relay
            .store_mut()
            .issue_invite(kind, secret, self.now, expires)
            .expect("issue invite");
        secret
    }

    fn invite_facility(&mut self, name: &str, role: FacilityRole) -> [u8; 32] {
        self.invite(
            InviteKind::NewFacility {
                name: name.into(),
                role,
            },
            Duration::from_secs(72 * 3600),
        )
    }

    fn ask(&mut self, who: &DeviceSecrets, request: Request) -> (Response, Vec<Notification>) {
        self.raw(who.device_id(), &protocol::encode_request(&request))
    }

    fn raw(&mut self, peer: DeviceId, frame: &[u8]) -> (Response, Vec<Notification>) {
        let (bytes, notes) = self.relay.handle(peer, frame, self.now);
        (
            protocol::decode_response(&bytes).expect("the relay always answers a decodable frame"),
            notes,
        )
    }

    fn join(&mut self, who: &DeviceSecrets, secret: [u8; 32]) -> Response {
        self.ask(
            who,
            Request::Join {
                secret: secret.to_vec(),
                device: who.public(),
            },
        )
        .0
    }

    /// Enrols `who` with a fresh new-facility invite and returns the facility id.
    fn enrol(&mut self, who: &DeviceSecrets, name: &str, role: FacilityRole) -> FacilityId {
        let secret = self.invite_facility(name, role);
        match self.join(who, secret) {
            Response::Joined { facility, .. } => facility,
            other => panic!("join failed: {other:?}"),
        }
    }

    /// Enrols `who` as another device of `facility`.
    fn enrol_device(&mut self, who: &DeviceSecrets, facility: FacilityId) {
        let secret = self.invite(InviteKind::Device { facility }, Duration::from_secs(3600));
        assert!(
            matches!(self.join(who, secret), Response::Joined { facility: f, .. } if f == facility)
        );
    }

    fn push(
        &mut self,
        who: &DeviceSecrets,
        items: Vec<PushItem>,
    ) -> (Vec<PushResult>, Vec<Notification>) {
        match self.ask(who, Request::Push { items }) {
            (Response::Pushed { results }, notes) => (results, notes),
            other => panic!("push refused: {other:?}"),
        }
    }

    fn push_one(&mut self, who: &DeviceSecrets, item: PushItem) -> PushResult {
        let (mut results, _) = self.push(who, vec![item]);
        assert_eq!(results.len(), 1);
        results.remove(0)
    }

    fn pull(&mut self, who: &DeviceSecrets, doc: DocumentId, after: u64) -> Response {
        self.ask(
            who,
            Request::Pull {
                doc,
                after: Seq(after),
            },
        )
        .0
    }
}

fn op(author: &DeviceSecrets, facility: FacilityId, doc: DocumentId, body: DocOpBody) -> PushItem {
    PushItem::Op {
        op: DocOp::sign(author, facility, doc, 1_800_000_000_000, body).expect("sign op"),
    }
}

fn create(
    author: &DeviceSecrets,
    facility: FacilityId,
    doc: DocumentId,
    members: Vec<Member>,
) -> PushItem {
    op(
        author,
        facility,
        doc,
        DocOpBody::Create {
            kind: DocumentKind::Referral,
            members,
        },
    )
}

fn bundle(
    author: &DeviceSecrets,
    facility: FacilityId,
    doc: DocumentId,
    epoch: u32,
    text: &str,
) -> Envelope {
    let key = DocumentKey::from_seed([epoch as u8 + 40; 32]);
    Envelope::seal(
        author,
        facility,
        doc,
        Epoch(epoch),
        &key,
        &Payload::Changes {
            data: text.as_bytes().to_vec(),
        },
    )
    .expect("seal bundle")
}

fn code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

fn rejected(r: &PushResult) -> Option<ErrorCode> {
    match r {
        PushResult::Rejected { code, .. } => Some(*code),
        _ => None,
    }
}

fn targets(notes: &[Notification]) -> BTreeSet<DeviceId> {
    notes.iter().map(|n| n.to).collect()
}

/// A referral between two clinics, with HQ as a reader, and a second device at the sending clinic.
struct Referral {
    w: World,
    a1: DeviceSecrets,
    a2: DeviceSecrets,
    b1: DeviceSecrets,
    hq: DeviceSecrets,
    fa: FacilityId,
    fb: FacilityId,
    fhq: FacilityId,
    doc: DocumentId,
}

fn referral() -> Referral {
    let mut w = World::new();
    let (a1, a2, b1, hq) = (device(1), device(2), device(3), device(4));
    let fa = w.enrol(&a1, "港診療所", FacilityRole::Clinic);
    w.enrol_device(&a2, fa);
    let fb = w.enrol(&b1, "柏崎総合病院", FacilityRole::Clinic);
    let fhq = w.enrol(&hq, "災害対策本部", FacilityRole::Hq);
    let doc = DocumentId::from_random_bytes([7; 16]);
    let members = vec![
        Member {
            facility: fb,
            role: Role::Writer,
        },
        Member {
            facility: fhq,
            role: Role::Reader,
        },
    ];
    let (results, notes) = w.push(&a1, vec![create(&a1, fa, doc, members)]);
    assert_eq!(results, vec![PushResult::Accepted { seq: None }]);
    assert_eq!(
        targets(&notes),
        BTreeSet::from([a2.device_id(), b1.device_id(), hq.device_id()])
    );
    Referral {
        w,
        a1,
        a2,
        b1,
        hq,
        fa,
        fb,
        fhq,
        doc,
    }
}

#[test]
fn a_device_joins_once_with_a_valid_invite_and_gets_the_signed_directory() {
    let mut w = World::new();
    let a1 = device(1);
    let secret = w.invite_facility("港診療所", FacilityRole::Clinic);
    let relay = w.relay.secrets().device_id();
    let Response::Joined {
        facility,
        facility_name,
        role,
        directory,
        deployment,
        pseudonym_secret,
    } = w.join(&a1, secret)
    else {
        panic!("join refused")
    };
    assert_eq!(
        (facility_name.as_str(), role),
        ("港診療所", FacilityRole::Clinic)
    );
    assert_eq!(
        deployment,
        w.relay.store().deployment().expect("deployment")
    );
    assert_eq!(pseudonym_secret.len(), 32);
    assert_eq!(
        pseudonym_secret,
        w.relay.store().pseudonym_secret().expect("secret").to_vec(),
        "every device of the deployment gets the same pseudonym secret"
    );
    let dir: Directory = directory
        .verify(&relay)
        .expect("directory signed by the relay");
    assert_eq!(
        dir.device(&a1.device_id())
            .map(|(f, d)| (f.id, d.age_recipient.clone())),
        Some((facility, a1.public().age_recipient))
    );

    // The same device asking again (its answer was lost) gets the same answer; anyone else is refused.
    assert!(matches!(w.join(&a1, secret), Response::Joined { facility: f, .. } if f == facility));
    let (r, _) = w.ask(
        &device(9),
        Request::Join {
            secret: secret.to_vec(),
            device: device(9).public(),
        },
    );
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("already used")),
        "{r:?}"
    );

    // An enrolled device does not spend another invite.
    let other = w.invite_facility("本部", FacilityRole::Hq);
    assert_eq!(code(&w.join(&a1, other)), Some(ErrorCode::Conflict));
    assert!(
        matches!(w.join(&device(5), other), Response::Joined { .. }),
        "the invite is still unused"
    );

    // Unknown secrets and a device id that is not the connection's are refused.
    assert_eq!(
        code(&w.join(&device(6), [0xee; 32])),
        Some(ErrorCode::InviteInvalid)
    );
    let fresh = w.invite(InviteKind::Device { facility }, Duration::from_secs(60));
    let (r, _) = w.ask(
        &device(6),
        Request::Join {
            secret: fresh.to_vec(),
            device: device(7).public(),
        },
    );
    assert_eq!(code(&r), Some(ErrorCode::BadSignature));
    let mut bad = device(6).public();
    bad.age_recipient = "age1nonsense".into();
    let (r, _) = w.ask(
        &device(6),
        Request::Join {
            secret: fresh.to_vec(),
            device: bad,
        },
    );
    assert_eq!(code(&r), Some(ErrorCode::Malformed));
    assert!(
        matches!(w.join(&device(6), fresh), Response::Joined { facility: f, .. } if f == facility)
    );
}

#[test]
fn an_expired_invite_says_when_it_expired() {
    let mut w = World::new();
    let secret = w.invite(
        InviteKind::NewFacility {
            name: "港診療所".into(),
            role: FacilityRole::Clinic,
        },
        Duration::from_secs(3600),
    );
    w.now = t0() + Duration::from_secs(2 * 3600);
    let r = w.join(&device(1), secret);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("expired at 2027-01-15T09:00:00Z")),
        "{r:?}"
    );
}

#[test]
fn an_unenrolled_peer_may_only_join() {
    let mut w = World::new();
    let stranger = device(9);
    for request in [
        Request::ListDocuments,
        Request::GetDirectory { known_version: 0 },
        Request::Pull {
            doc: DocumentId::from_random_bytes([1; 16]),
            after: Seq(0),
        },
        Request::Push { items: vec![] },
    ] {
        assert_eq!(
            code(&w.ask(&stranger, request).0),
            Some(ErrorCode::NotEnrolled)
        );
    }
    let a1 = device(1);
    w.enrol(&a1, "港診療所", FacilityRole::Clinic);
    let notify = Request::Notify {
        doc: DocumentId::from_random_bytes([1; 16]),
        head: Seq(1),
        epoch: Epoch(0),
    };
    assert_eq!(code(&w.ask(&a1, notify).0), Some(ErrorCode::Forbidden));
}

#[test]
fn the_directory_is_sent_only_when_the_caller_lacks_this_version() {
    let mut w = World::new();
    let a1 = device(1);
    w.enrol(&a1, "港診療所", FacilityRole::Clinic);
    let Response::Directory {
        directory: Some(signed),
    } = w.ask(&a1, Request::GetDirectory { known_version: 0 }).0
    else {
        panic!("expected a directory")
    };
    let dir = signed
        .verify(&w.relay.secrets().device_id())
        .expect("verify");
    assert_eq!(
        w.ask(
            &a1,
            Request::GetDirectory {
                known_version: dir.version
            }
        )
        .0,
        Response::Directory { directory: None }
    );
    w.enrol(&device(2), "本部", FacilityRole::Hq);
    assert!(matches!(
        w.ask(
            &a1,
            Request::GetDirectory {
                known_version: dir.version
            }
        )
        .0,
        Response::Directory { directory: Some(_) }
    ));
}

#[test]
fn bundles_get_sequence_numbers_duplicates_keep_theirs_and_members_are_notified() {
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        hq,
        fa,
        fb,
        doc,
        ..
    } = referral();
    let e1 = bundle(&a1, fa, doc, 0, "紹介目的: 精査依頼");
    let (results, notes) = w.push(
        &a1,
        vec![PushItem::Bundle {
            envelope: e1.clone(),
        }],
    );
    assert_eq!(results, vec![PushResult::Accepted { seq: Some(Seq(1)) }]);
    assert_eq!(
        targets(&notes),
        BTreeSet::from([a2.device_id(), b1.device_id(), hq.device_id()])
    );
    assert!(notes.iter().all(|n| n.request
        == Request::Notify {
            doc,
            head: Seq(1),
            epoch: Epoch(0)
        }));

    // Pushing it again, even by another member (a LAN peer forwarding it), is harmless.
    assert_eq!(
        w.push_one(
            &b1,
            PushItem::Bundle {
                envelope: e1.clone()
            }
        ),
        PushResult::Duplicate { seq: Some(Seq(1)) }
    );
    let e2 = bundle(&b1, fb, doc, 0, "返書");
    assert_eq!(
        w.push_one(&b1, PushItem::Bundle { envelope: e2 }),
        PushResult::Accepted { seq: Some(Seq(2)) }
    );

    let Response::Documents { docs } = w.ask(&hq, Request::ListDocuments).0 else {
        panic!("documents")
    };
    assert_eq!(docs.len(), 1);
    assert_eq!(
        (
            docs[0].id,
            docs[0].head,
            docs[0].epoch,
            docs[0].members.len()
        ),
        (doc, Seq(2), Epoch(0), 3)
    );
    assert!(docs[0].members.contains(&Member {
        facility: fa,
        role: Role::Owner
    }));
}

#[test]
fn hostile_pushes_are_refused_with_the_right_code_and_the_relay_keeps_answering() {
    let Referral {
        mut w,
        a1,
        b1,
        hq,
        fa,
        fb,
        fhq,
        doc,
        ..
    } = referral();

    // A tampered ciphertext.
    let mut forged = bundle(&a1, fa, doc, 0, "処方");
    forged.ciphertext[30] ^= 1;
    assert_eq!(
        rejected(&w.push_one(&a1, PushItem::Bundle { envelope: forged })),
        Some(ErrorCode::BadSignature)
    );

    // A reader facility writing.
    let r = w.push_one(
        &hq,
        PushItem::Bundle {
            envelope: bundle(&hq, fhq, doc, 0, "x"),
        },
    );
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains("is a reader")),
        "{r:?}"
    );

    // A bundle claiming to come from a facility its author does not belong to.
    let r = w.push_one(
        &b1,
        PushItem::Bundle {
            envelope: bundle(&b1, fa, doc, 0, "x"),
        },
    );
    assert_eq!(rejected(&r), Some(ErrorCode::Forbidden));

    // A document nobody created; a facility that is not a member.
    let ghost = DocumentId::from_random_bytes([9; 16]);
    assert_eq!(
        rejected(&w.push_one(
            &a1,
            PushItem::Bundle {
                envelope: bundle(&a1, fa, ghost, 0, "x")
            }
        )),
        Some(ErrorCode::UnknownDocument)
    );
    let c1 = device(8);
    let fc = w.enrol(&c1, "ケアプランセンター", FacilityRole::CareOffice);
    assert_eq!(
        rejected(&w.push_one(
            &c1,
            PushItem::Bundle {
                envelope: bundle(&c1, fc, doc, 0, "x")
            }
        )),
        Some(ErrorCode::NotMember)
    );

    // A tampered operation; an operation naming a facility its signer does not belong to.
    let add_c = DocOpBody::SetMember {
        facility: fc,
        role: Some(Role::Reader),
    };
    let mut forged = DocOp::sign(&a1, fa, doc, 1, add_c.clone()).expect("sign");
    forged.body = DocOpBody::SetMember {
        facility: fc,
        role: Some(Role::Owner),
    };
    assert_eq!(
        rejected(&w.push_one(&a1, PushItem::Op { op: forged })),
        Some(ErrorCode::BadSignature)
    );
    let r = w.push_one(&b1, op(&b1, fa, doc, add_c.clone()));
    assert_eq!(rejected(&r), Some(ErrorCode::Forbidden));
    // A genuine operation of the owner, forwarded by another member (a LAN peer), is accepted once.
    let forwarded = op(&a1, fa, doc, add_c);
    assert_eq!(
        w.push_one(&b1, forwarded.clone()),
        PushResult::Accepted { seq: None }
    );
    assert_eq!(
        w.push_one(&a1, forwarded),
        PushResult::Duplicate { seq: None }
    );

    // Too many items; a malformed frame; a frame of another protocol version.
    let items = vec![
        PushItem::Bundle {
            envelope: bundle(&a1, fa, doc, 0, "x")
        };
        PUSH_ITEMS_MAX + 1
    ];
    assert_eq!(
        code(&w.ask(&a1, Request::Push { items }).0),
        Some(ErrorCode::TooLarge)
    );
    assert_eq!(
        code(&w.raw(a1.device_id(), b"\xa2\x61v\x01\x64body\xff").0),
        Some(ErrorCode::Malformed)
    );
    assert_eq!(
        code(&w.raw(a1.device_id(), &[0xff; 64]).0),
        Some(ErrorCode::Malformed)
    );

    // Items in one push are judged one by one; the good one is stored.
    let good = bundle(&b1, fb, doc, 0, "ok");
    let (results, _) = w.push(
        &b1,
        vec![
            PushItem::Bundle {
                envelope: bundle(&b1, fa, doc, 0, "bad"),
            },
            PushItem::Bundle { envelope: good },
        ],
    );
    assert_eq!(rejected(&results[0]), Some(ErrorCode::Forbidden));
    assert_eq!(results[1], PushResult::Accepted { seq: Some(Seq(1)) });
    let Response::Bundles { items, head, .. } = w.pull(&hq, doc, 0) else {
        panic!("pull")
    };
    assert_eq!((items.len(), head), (1, Seq(1)));
}

#[test]
fn pull_returns_bundles_after_a_sequence_number_to_members_only() {
    let Referral {
        mut w,
        a1,
        b1,
        fa,
        doc,
        ..
    } = referral();
    let sent: Vec<Envelope> = (0..5)
        .map(|i| bundle(&a1, fa, doc, 0, &format!("支援経過 {i}")))
        .collect();
    let (results, _) = w.push(
        &a1,
        sent.iter()
            .cloned()
            .map(|envelope| PushItem::Bundle { envelope })
            .collect(),
    );
    assert_eq!(
        results.last(),
        Some(&PushResult::Accepted { seq: Some(Seq(5)) })
    );

    let Response::Bundles { items, head, .. } = w.pull(&b1, doc, 2) else {
        panic!("pull")
    };
    assert_eq!(head, Seq(5));
    assert_eq!(
        items.iter().map(|p| p.seq.0).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(items[0].envelope, sent[2]);
    let Response::Bundles { items, .. } = w.pull(&b1, doc, 5) else {
        panic!("pull")
    };
    assert!(items.is_empty());

    let c1 = device(8);
    w.enrol(&c1, "ケアプランセンター", FacilityRole::CareOffice);
    assert_eq!(code(&w.pull(&c1, doc, 0)), Some(ErrorCode::NotMember));
    assert_eq!(
        code(&w.ask(&c1, Request::GetKeyGrants { doc }).0),
        Some(ErrorCode::NotMember)
    );
    assert_eq!(
        code(&w.pull(&c1, DocumentId::from_random_bytes([3; 16]), 0)),
        Some(ErrorCode::UnknownDocument)
    );
}

#[test]
fn a_pull_is_bounded_by_its_byte_target() {
    let Referral {
        mut w,
        a1,
        b1,
        fa,
        doc,
        ..
    } = referral();
    let big = "x".repeat(PULL_RESPONSE_BYTES_TARGET / 3);
    for i in 0..4 {
        let e = bundle(&a1, fa, doc, 0, &format!("{i}{big}"));
        assert!(matches!(
            w.push_one(&a1, PushItem::Bundle { envelope: e }),
            PushResult::Accepted { .. }
        ));
    }
    let Response::Bundles { items, head, .. } = w.pull(&b1, doc, 0) else {
        panic!("pull")
    };
    assert_eq!(head, Seq(4));
    assert!(
        !items.is_empty() && items.len() < 4,
        "got {} bundles",
        items.len()
    );
    let bytes: usize = items.iter().map(|p| p.envelope.encode().len()).sum();
    assert!(bytes <= PULL_RESPONSE_BYTES_TARGET);
    let last = items.last().map(|p| p.seq.0).unwrap_or_default();
    let Response::Bundles { items, .. } = w.pull(&b1, doc, last) else {
        panic!("pull")
    };
    assert_eq!(items.first().map(|p| p.seq.0), Some(last + 1));
}

#[test]
fn a_revoked_device_is_refused_at_once_while_its_facility_mate_works_on() {
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        fa,
        doc,
        ..
    } = referral();
    let early = bundle(&a2, fa, doc, 0, "before the laptop was lost");
    assert!(matches!(
        w.push_one(
            &a2,
            PushItem::Bundle {
                envelope: early.clone()
            }
        ),
        PushResult::Accepted { .. }
    ));

    // The operator revokes the lost laptop from another process (its own connection to the database).
    let mut operator = Store::open(&w.data()).expect("open as the operator");
    operator
        .revoke(&a2.device_id().to_string(), w.now)
        .expect("revoke");
    assert!(
        operator
            .revoked_devices()
            .expect("revoked")
            .contains(&a2.device_id())
    );

    let r = w.ask(&a2, Request::ListDocuments).0;
    assert_eq!(code(&r), Some(ErrorCode::Revoked));
    assert!(matches!(
        w.ask(&a1, Request::ListDocuments).0,
        Response::Documents { .. }
    ));

    // New bundles by the revoked device are refused even when another device forwards them;
    // the one stored before stays (pushing it again is a duplicate), and it is no longer notified.
    let late = bundle(&a2, fa, doc, 0, "after");
    assert_eq!(
        rejected(&w.push_one(&a1, PushItem::Bundle { envelope: late })),
        Some(ErrorCode::Revoked)
    );
    assert_eq!(
        w.push_one(&b1, PushItem::Bundle { envelope: early }),
        PushResult::Duplicate { seq: Some(Seq(1)) }
    );
    let (_, notes) = w.push(
        &a1,
        vec![PushItem::Bundle {
            envelope: bundle(&a1, fa, doc, 0, "new"),
        }],
    );
    assert!(!targets(&notes).contains(&a2.device_id()));

    // Revoking the whole facility refuses its other device too.
    operator.revoke("港診療所", w.now).expect("revoke facility");
    assert_eq!(
        code(&w.ask(&a1, Request::ListDocuments).0),
        Some(ErrorCode::Revoked)
    );
    assert!(matches!(
        w.ask(&b1, Request::ListDocuments).0,
        Response::Documents { .. }
    ));
}

#[test]
fn only_owners_change_members_and_a_document_keeps_an_owner() {
    let Referral {
        mut w,
        a1,
        b1,
        fa,
        fb,
        fhq,
        doc,
        ..
    } = referral();
    let c1 = device(8);
    let fc = w.enrol(&c1, "ケアプランセンター", FacilityRole::CareOffice);

    let by_writer = w.push_one(
        &b1,
        op(
            &b1,
            fb,
            doc,
            DocOpBody::SetMember {
                facility: fc,
                role: Some(Role::Reader),
            },
        ),
    );
    assert_eq!(rejected(&by_writer), Some(ErrorCode::Forbidden));

    let add = op(
        &a1,
        fa,
        doc,
        DocOpBody::SetMember {
            facility: fc,
            role: Some(Role::Reader),
        },
    );
    let (results, notes) = w.push(&a1, vec![add.clone()]);
    assert_eq!(results, vec![PushResult::Accepted { seq: None }]);
    assert!(
        targets(&notes).contains(&c1.device_id()),
        "the added facility is told"
    );
    assert_eq!(w.push_one(&a1, add), PushResult::Duplicate { seq: None });
    assert!(matches!(w.pull(&c1, doc, 0), Response::Bundles { .. }));

    let orphan = w.push_one(
        &a1,
        op(
            &a1,
            fa,
            doc,
            DocOpBody::SetMember {
                facility: fa,
                role: Some(Role::Writer),
            },
        ),
    );
    assert_eq!(rejected(&orphan), Some(ErrorCode::Conflict));
    let remove_self = w.push_one(
        &a1,
        op(
            &a1,
            fa,
            doc,
            DocOpBody::SetMember {
                facility: fa,
                role: None,
            },
        ),
    );
    assert_eq!(rejected(&remove_self), Some(ErrorCode::Conflict));

    // With a second owner, the first may step down; removing HQ takes its access away.
    let promote = op(
        &a1,
        fa,
        doc,
        DocOpBody::SetMember {
            facility: fb,
            role: Some(Role::Owner),
        },
    );
    assert_eq!(w.push_one(&a1, promote), PushResult::Accepted { seq: None });
    let demote = op(
        &a1,
        fa,
        doc,
        DocOpBody::SetMember {
            facility: fa,
            role: Some(Role::Writer),
        },
    );
    assert_eq!(w.push_one(&a1, demote), PushResult::Accepted { seq: None });
    let remove = op(
        &b1,
        fb,
        doc,
        DocOpBody::SetMember {
            facility: fhq,
            role: None,
        },
    );
    assert_eq!(w.push_one(&b1, remove), PushResult::Accepted { seq: None });
    let hq = device(4);
    assert_eq!(code(&w.pull(&hq, doc, 0)), Some(ErrorCode::NotMember));

    // A document cannot be created twice, nor with a member that is not enrolled.
    let again = w.push_one(&a1, create(&a1, fa, doc, vec![]));
    assert_eq!(rejected(&again), Some(ErrorCode::Conflict));
    let doc2 = DocumentId::from_random_bytes([8; 16]);
    let ghost = Member {
        facility: FacilityId::from_random_bytes([1; 16]),
        role: Role::Reader,
    };
    let r = w.push_one(&a1, create(&a1, fa, doc2, vec![ghost]));
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Conflict, message } if message.contains("not enrolled")),
        "{r:?}"
    );
}

#[test]
fn epochs_advance_one_at_a_time_and_key_grants_follow_them() {
    let Referral {
        mut w,
        a1,
        b1,
        hq,
        fa,
        fb,
        doc,
        ..
    } = referral();
    let key0 = DocumentKey::from_seed([40; 32]);
    let recipients: Vec<(DeviceId, String)> = [&a1, &b1]
        .iter()
        .map(|d| (d.device_id(), d.public().age_recipient))
        .collect();
    let g0 = KeyGrant::seal(&a1, fa, doc, Epoch(0), &key0, &recipients).expect("grant");
    assert_eq!(
        w.push_one(&a1, PushItem::Grant { grant: g0.clone() }),
        PushResult::Accepted { seq: None }
    );
    assert_eq!(
        w.push_one(&a1, PushItem::Grant { grant: g0.clone() }),
        PushResult::Duplicate { seq: None }
    );

    let skip = w.push_one(
        &a1,
        op(&a1, fa, doc, DocOpBody::NewEpoch { epoch: Epoch(2) }),
    );
    assert_eq!(rejected(&skip), Some(ErrorCode::Conflict));
    let by_writer = w.push_one(
        &b1,
        op(&b1, fb, doc, DocOpBody::NewEpoch { epoch: Epoch(1) }),
    );
    assert_eq!(rejected(&by_writer), Some(ErrorCode::Forbidden));
    let early = w.push_one(
        &b1,
        PushItem::Bundle {
            envelope: bundle(&b1, fb, doc, 1, "too early"),
        },
    );
    assert_eq!(rejected(&early), Some(ErrorCode::Conflict));

    let next = op(&a1, fa, doc, DocOpBody::NewEpoch { epoch: Epoch(1) });
    let (results, notes) = w.push(&a1, vec![next.clone()]);
    assert_eq!(results, vec![PushResult::Accepted { seq: None }]);
    assert!(notes.iter().all(|n| matches!(
        n.request,
        Request::Notify {
            epoch: Epoch(1),
            ..
        }
    )));
    assert_eq!(w.push_one(&a1, next), PushResult::Duplicate { seq: None });

    let key1 = DocumentKey::from_seed([41; 32]);
    let g1 = KeyGrant::seal(&a1, fa, doc, Epoch(1), &key1, &recipients).expect("grant");
    assert_eq!(
        w.push_one(&a1, PushItem::Grant { grant: g1.clone() }),
        PushResult::Accepted { seq: None }
    );
    let stranger = vec![(device(9).device_id(), device(9).public().age_recipient)];
    let leak = KeyGrant::seal(&a1, fa, doc, Epoch(1), &key1, &stranger).expect("grant");
    assert_eq!(
        rejected(&w.push_one(&a1, PushItem::Grant { grant: leak })),
        Some(ErrorCode::Forbidden)
    );
    let future = KeyGrant::seal(&a1, fa, doc, Epoch(2), &key1, &recipients).expect("grant");
    assert_eq!(
        rejected(&w.push_one(&a1, PushItem::Grant { grant: future })),
        Some(ErrorCode::Conflict)
    );
    assert!(matches!(
        w.push_one(
            &b1,
            PushItem::Bundle {
                envelope: bundle(&b1, fb, doc, 1, "ok")
            }
        ),
        PushResult::Accepted { .. }
    ));

    let Response::KeyGrants { grants, .. } = w.ask(&hq, Request::GetKeyGrants { doc }).0 else {
        panic!("grants")
    };
    assert_eq!(grants, vec![g0, g1]);
    assert_eq!(
        grants[1].open(&b1).expect("b1 opens its grant").seed(),
        key1.seed()
    );
}

#[test]
fn everything_acknowledged_survives_reopening_and_no_plaintext_reaches_the_disk() {
    const MARKER: &str = "MARKER-患者氏名-柏崎太郎";
    let Referral {
        mut w,
        a1,
        b1,
        fa,
        doc,
        ..
    } = referral();
    let e = bundle(&a1, fa, doc, 0, MARKER);
    assert_eq!(
        w.push_one(
            &a1,
            PushItem::Bundle {
                envelope: e.clone()
            }
        ),
        PushResult::Accepted { seq: Some(Seq(1)) }
    );
    let data = w.data();
    let World {
        tmp, relay, now, ..
    } = w;
    drop(relay);

    let mut files = vec![];
    collect_files(&data, &mut files);
    assert!(files.iter().any(|p| p.ends_with("node.db")));
    for f in &files {
        let bytes = std::fs::read(f).expect("read");
        assert!(
            !bytes
                .windows(MARKER.len())
                .any(|win| win == MARKER.as_bytes()),
            "{} holds plaintext",
            f.display()
        );
    }

    let relay = Relay::new(Store::open(&data).expect("reopen")).expect("relay");
    let mut w = World {
        tmp,
        relay,
        now,
        next_secret: 100,
    };
    let Response::Bundles { items, head, .. } = w.pull(&b1, doc, 0) else {
        panic!("pull")
    };
    assert_eq!((head, items.len()), (Seq(1), 1));
    assert_eq!(items[0].envelope, e);
    assert_eq!(
        w.push_one(&a1, PushItem::Bundle { envelope: e }),
        PushResult::Duplicate { seq: Some(Seq(1)) }
    );
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn operators_list_facilities_and_invite_codes_carry_the_relay() {
    let Referral { mut w, a2, fa, .. } = referral();
    let relay = w.relay.secrets().device_id();
    let addr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}");
    let lan = format!("/ip4/192.0.2.10/tcp/4001/p2p/{relay}");
    w.relay
        .store_mut()
        .set_listen_addrs(&[addr.clone(), lan.clone()], w.now)
        .expect("addrs");
    let issued = w
        .relay
        .store_mut()
        .issue_invite(
            InviteKind::Device { facility: fa },
            [77; 32],
            w.now,
            Duration::from_secs(60),
        )
        .expect("invite");
    let decoded = InviteCode::decode(&issued.code.encode()).expect("decode");
    assert_eq!(decoded.relay, relay);
    assert_eq!(
        decoded.addrs,
        vec![lan, addr],
        "non-loopback addresses first"
    );
    assert_eq!(decoded.secret, vec![77; 32]);

    let list = w.relay.store().facilities().expect("facilities");
    let names: Vec<&str> = list.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, vec!["港診療所", "柏崎総合病院", "災害対策本部"]);
    assert_eq!(list[0].devices.len(), 2);
    assert!(w.relay.store().find_facility(&fa.to_string()).is_ok());
    w.relay
        .store_mut()
        .revoke(&a2.device_id().to_string(), w.now)
        .expect("revoke");
    let again = w
        .relay
        .store_mut()
        .revoke(&a2.device_id().to_string(), w.now)
        .expect("revoke again");
    assert!(matches!(
        again,
        musubi_sync_node::store::Revocation::Device { already: true, .. }
    ));
}

mod network {
    //! The real swarm: in-process `serve_until` with libp2p clients, and the `musubi-node` binary.

    use super::*;
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};

    use futures::StreamExt as _;
    use musubi_transport::libp2p::request_response::{self, Message, OutboundRequestId};
    use musubi_transport::libp2p::swarm::SwarmEvent;
    use musubi_transport::libp2p::{Multiaddr, PeerId, Swarm};
    use musubi_transport::{Behaviour, BehaviourEvent, build_swarm};

    /// A facility device speaking `/musubi/sync/1` to the relay.
    struct Client {
        swarm: Swarm<Behaviour>,
        relay: PeerId,
        notified: Vec<Request>,
    }

    impl Client {
        async fn connect(secrets: &DeviceSecrets, addr: &Multiaddr, relay: PeerId) -> Self {
            let mut swarm = build_swarm(secrets.keypair().clone(), false).expect("swarm");
            swarm.dial(addr.clone()).expect("dial");
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay => break,
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        panic!("cannot connect: {error}")
                    }
                    _ => {}
                }
            }
            Self {
                swarm,
                relay,
                notified: vec![],
            }
        }

        fn on_event(
            &mut self,
            event: SwarmEvent<BehaviourEvent>,
        ) -> Option<(OutboundRequestId, Response)> {
            let SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) = event else {
                return None;
            };
            match event {
                request_response::Event::Message {
                    message:
                        Message::Request {
                            request, channel, ..
                        },
                    ..
                } => {
                    self.notified
                        .push(protocol::decode_request(&request).expect("notify decodes"));
                    let ack = protocol::encode_response(&Response::Ack);
                    let _ = self.swarm.behaviour_mut().sync.send_response(channel, ack);
                    None
                }
                request_response::Event::Message {
                    message:
                        Message::Response {
                            request_id,
                            response,
                        },
                    ..
                } => Some((
                    request_id,
                    protocol::decode_response(&response).expect("response decodes"),
                )),
                request_response::Event::OutboundFailure { error, .. } => {
                    panic!("request failed: {error}")
                }
                _ => None,
            }
        }

        async fn ask(&mut self, request: &Request) -> Response {
            self.ask_raw(protocol::encode_request(request)).await
        }

        async fn ask_raw(&mut self, frame: Vec<u8>) -> Response {
            let id = self
                .swarm
                .behaviour_mut()
                .sync
                .send_request(&self.relay, frame);
            loop {
                let event = self.swarm.select_next_some().await;
                if let Some((got, response)) = self.on_event(event)
                    && got == id
                {
                    return response;
                }
            }
        }

        /// Waits (bounded) for a notification.
        async fn notification(&mut self) -> Request {
            let wait = async {
                while self.notified.is_empty() {
                    let event = self.swarm.select_next_some().await;
                    self.on_event(event);
                }
                self.notified.remove(0)
            };
            tokio::time::timeout(Duration::from_secs(20), wait)
                .await
                .expect("a notification within 20 s")
        }
    }

    fn join_request(who: &DeviceSecrets, code: &InviteCode) -> Request {
        Request::Join {
            secret: code.secret.to_vec(),
            device: who.public(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connected_members_are_notified_of_new_bundles_over_the_wire() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("relay");
        let mut store = Store::init(&data, "柏崎市", SystemTime::now()).expect("init");
        let relay = store.relay_device().expect("relay").0;
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let ia = store
            .issue_invite(
                InviteKind::NewFacility {
                    name: "港診療所".into(),
                    role: FacilityRole::Clinic,
                },
                [1; 32],
                now,
                hour,
            )
            .expect("invite");
        let ib = store
            .issue_invite(
                InviteKind::NewFacility {
                    name: "柏崎総合病院".into(),
                    role: FacilityRole::Clinic,
                },
                [2; 32],
                now,
                hour,
            )
            .expect("invite");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let config = musubi_sync_node::Config {
            print_listen_addrs: false,
            ..Default::default()
        };
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("addr");
        let server = tokio::spawn(musubi_sync_node::serve_until(
            vec![listen],
            store,
            config,
            async move {
                let _ = stop_rx.await;
            },
        ));

        // Wait until the relay has recorded its address, as `invite` would read it.
        let operator = Store::open(&data).expect("operator");
        let addr: Multiaddr = loop {
            if let Some(a) = operator.listen_addrs().expect("addrs").first() {
                break a.parse().expect("multiaddr");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        let (a1, b1) = (device(1), device(3));
        let mut ca = Client::connect(&a1, &addr, relay).await;
        let mut cb = Client::connect(&b1, &addr, relay).await;
        let Response::Joined { facility: fa, .. } = ca.ask(&join_request(&a1, &ia.code)).await
        else {
            panic!("join a")
        };
        let Response::Joined { facility: fb, .. } = cb.ask(&join_request(&b1, &ib.code)).await
        else {
            panic!("join b")
        };
        assert_eq!(
            code(&cb.ask_raw(b"not cbor".to_vec()).await),
            Some(ErrorCode::Malformed)
        );

        let doc = DocumentId::from_random_bytes([7; 16]);
        let items = vec![
            create(
                &a1,
                fa,
                doc,
                vec![Member {
                    facility: fb,
                    role: Role::Writer,
                }],
            ),
            PushItem::Bundle {
                envelope: bundle(&a1, fa, doc, 0, "紹介状"),
            },
        ];
        let Response::Pushed { results } = ca.ask(&Request::Push { items }).await else {
            panic!("push")
        };
        assert_eq!(results[1], PushResult::Accepted { seq: Some(Seq(1)) });
        assert_eq!(
            cb.notification().await,
            Request::Notify {
                doc,
                head: Seq(1),
                epoch: Epoch(0)
            }
        );
        let Response::Bundles { items, .. } = cb.ask(&Request::Pull { doc, after: Seq(0) }).await
        else {
            panic!("pull")
        };
        assert_eq!(items.len(), 1);

        // A revocation by the operator's process disconnects the device within the watch interval.
        let mut operator = operator;
        operator
            .revoke(&b1.device_id().to_string(), SystemTime::now())
            .expect("revoke");
        let closed = async {
            loop {
                if let SwarmEvent::ConnectionClosed { peer_id, .. } =
                    cb.swarm.select_next_some().await
                    && peer_id == relay
                {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the revoked device is disconnected");

        let _ = stop_tx.send(());
        server.await.expect("join").expect("served without error");
    }

    fn node() -> Command {
        Command::new(env!("CARGO_BIN_EXE_musubi-node"))
    }

    /// Starts `musubi-node serve` on a loopback port and returns it with its first "listening on" address.
    fn spawn_serve(data: &Path) -> (std::process::Child, Multiaddr) {
        let mut child = node()
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn musubi-node serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read a line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        (child, addr.parse().expect("a multiaddr"))
    }

    fn invite_code(data: &Path, args: &[&str]) -> InviteCode {
        let out = node()
            .args(["invite", "--data"])
            .arg(data)
            .args(args)
            .output()
            .expect("run invite");
        assert!(
            out.status.success(),
            "invite failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "invite prints one line");
        InviteCode::decode(&text).expect("the printed code decodes")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_binary_serves_invites_and_keeps_every_acknowledged_bundle_through_sigkill() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("relay");
        let init = node()
            .args(["init", "--data"])
            .arg(&data)
            .args(["--deployment", "柏崎市"])
            .output()
            .expect("init");
        assert!(init.status.success());
        let again = node()
            .args(["init", "--data"])
            .arg(&data)
            .output()
            .expect("init again");
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

        let (mut child, addr) = spawn_serve(&data);
        let relay = match addr.iter().last() {
            Some(musubi_transport::libp2p::multiaddr::Protocol::P2p(p)) => p,
            _ => panic!("the address ends in /p2p/PEERID: {addr}"),
        };
        let code = invite_code(
            &data,
            &["--name", "港診療所", "--role", "clinic", "--expires", "10m"],
        );
        assert_eq!(code.relay.0, relay);
        assert!(
            code.addrs.contains(&addr.to_string()),
            "{:?} lacks {addr}",
            code.addrs
        );

        let a1 = device(1);
        let mut ca = Client::connect(&a1, &code.addrs[0].parse().expect("addr"), relay).await;
        let Response::Joined { facility: fa, .. } = ca.ask(&join_request(&a1, &code)).await else {
            panic!("join")
        };
        let list = node()
            .args(["facilities", "--json", "--data"])
            .arg(&data)
            .output()
            .expect("facilities");
        let json: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
        assert_eq!(json[0]["name"], "港診療所");
        assert_eq!(json[0]["devices"][0]["device"], a1.device_id().to_string());

        let doc = DocumentId::from_random_bytes([7; 16]);
        let Response::Pushed { .. } = ca
            .ask(&Request::Push {
                items: vec![create(&a1, fa, doc, vec![])],
            })
            .await
        else {
            panic!("create")
        };
        // Push bundles one by one; kill the relay while more are in flight.
        let mut acked = Vec::new();
        for i in 0..12 {
            let item = PushItem::Bundle {
                envelope: bundle(&a1, fa, doc, 0, &format!("支援経過 {i}")),
            };
            if i == 8 {
                let frame = protocol::encode_request(&Request::Push { items: vec![item] });
                ca.swarm.behaviour_mut().sync.send_request(&relay, frame);
                child.kill().expect("SIGKILL");
                break;
            }
            match ca.ask(&Request::Push { items: vec![item] }).await {
                Response::Pushed { results } => acked.push(results[0].clone()),
                other => panic!("push {i}: {other:?}"),
            }
        }
        let _ = child.wait();
        assert_eq!(acked.len(), 8);

        let mut relay =
            Relay::new(Store::open(&data).expect("reopen after SIGKILL")).expect("relay");
        let (bytes, _) = relay.handle(
            a1.device_id(),
            &protocol::encode_request(&Request::Pull { doc, after: Seq(0) }),
            SystemTime::now(),
        );
        let Response::Bundles { items, .. } = protocol::decode_response(&bytes).expect("decode")
        else {
            panic!("pull")
        };
        for (i, r) in acked.iter().enumerate() {
            assert_eq!(
                r,
                &PushResult::Accepted {
                    seq: Some(Seq(i as u64 + 1))
                }
            );
            assert!(
                items.iter().any(|p| p.seq == Seq(i as u64 + 1)),
                "acknowledged bundle {} is missing",
                i + 1
            );
        }
        let log = std::fs::read_to_string(data.join("logs/node.log")).expect("log file");
        assert!(
            log.contains("listening"),
            "serve logs to DATA/logs/node.log"
        );
    }
}
