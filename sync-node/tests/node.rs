//! The relay's story: the municipality's authority certifies clinics, a care office and HQ; their
//! devices join, push, pull and get refused exactly as the protocol says; a second laptop of a
//! facility joins only when a current device of that facility approves it; a relay that tries to read
//! finds nothing readable on its own disk, and a device that tries what it may not is refused.
//!
//! Most tests drive `Relay::handle` directly (frames in, frames out, no sockets, fixed clock);
//! the last ones run the real swarm in-process and the real `musubi-node` binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::crypto::{
    self, DevicePublic, DeviceSecrets, DocumentKey, PseudonymKeys, PseudonymSector,
};
use musubi_crdt::directory::{
    DeviceChange, DeviceLink, DeviceStatus, Devices as _, Directory, Pins, SignedDirectory, Trust,
};
use musubi_crdt::ids::{
    BundleId, DeploymentId, DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole,
    LogHash, Role, Seq,
};
use musubi_crdt::invite::{InviteCode, InviteFor, InviteId, InviteRegistration, JoinRequest};
use musubi_crdt::limits::{OFFER_IDS_MAX, PULL_RESPONSE_BYTES_TARGET, PUSH_ITEMS_MAX};
use musubi_crdt::membership::{self, Point};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member};
use musubi_crdt::protocol::{self, ErrorCode, PushItem, PushResult, Request, Response};
use musubi_sync_node::authority::{Authority, AuthorityDir, AuthorityInvite};
use musubi_sync_node::{Notification, Relay, Store};

/// The authority's passphrase in these tests (at least 8 characters).
const PASSPHRASE: &str = "柏崎市の認証局パスフレーズ";
/// A cheap scrypt work factor for tests.
const LOG_N: u8 = 10;

/// A fixed clock: 2027-01-15T08:00:00Z.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// [`t0`] in milliseconds: when the devices of these stories sign.
const AT_MS: u64 = 1_800_000_000_000;

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn device(n: u8) -> DeviceSecrets {
    DeviceSecrets::from_seeds([n; 32], [n ^ 0x5a; 32])
}

fn unlock(adir: &Path) -> Authority {
    AuthorityDir::open(adir)
        .expect("open the authority")
        .unlock(PASSPHRASE)
        .expect("unlock the authority")
}

/// The pseudonym keys sealed to `who` (the plaintext: CBOR of [`PseudonymKeys`]).
fn open_pseudonym(who: &DeviceSecrets, sealed: &[u8]) -> Vec<u8> {
    crypto::open_with(who.age_identity(), sealed, PseudonymKeys::PLAIN_BYTES_MAX)
        .expect("the device opens its pseudonym keys")
}

/// The sectors of the pseudonym keys sealed to `who`, for a facility of `role`.
fn pseudonym_sectors(
    who: &DeviceSecrets,
    sealed: &[u8],
    role: FacilityRole,
) -> Vec<PseudonymSector> {
    PseudonymKeys::from_plain(&open_pseudonym(who, sealed), role)
        .expect("pseudonym keys")
        .sectors()
}

/// An enrolled device: its secrets, its facility, and the pseudonym keys it opened (plaintext).
#[derive(Clone)]
struct Device {
    secrets: DeviceSecrets,
    facility: FacilityId,
    facility_name: String,
    pseudonym: Vec<u8>,
}

impl std::ops::Deref for Device {
    type Target = DeviceSecrets;
    fn deref(&self) -> &DeviceSecrets {
        &self.secrets
    }
}

/// A deployment: the authority's directory (off the relay host in real life), and a relay in a
/// temporary directory, driven through `Relay::handle` with encoded frames.
struct World {
    tmp: tempfile::TempDir,
    relay: Relay,
    authority: AuthorityDir,
    /// Whether the authority runs beside the relay (`serve --authority`) and approves new facilities.
    beside: bool,
    now: SystemTime,
    next_secret: u8,
    /// Every invite secret handed out (the relay must never hold one).
    secrets_issued: Vec<[u8; 32]>,
}

impl World {
    /// A relay with the authority beside it: new facilities are approved as they join.
    fn new() -> Self {
        Self::with_authority_beside(true)
    }

    /// A relay alone: new facilities wait for `musubi-node approve`.
    fn without_authority() -> Self {
        Self::with_authority_beside(false)
    }

    fn with_authority_beside(beside: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let adir = tmp.path().join("authority");
        let authority =
            AuthorityDir::init(&adir, "柏崎市", PASSPHRASE, LOG_N).expect("authority init");
        let store =
            Store::init(&tmp.path().join("relay"), authority.public(), None, t0()).expect("init");
        let relay =
            Relay::with_authority(store, beside.then(|| unlock(&adir))).expect("relay handler");
        Self {
            tmp,
            relay,
            authority,
            beside,
            now: t0(),
            next_secret: 1,
            secrets_issued: vec![],
        }
    }

    /// Stops the relay, runs `between` on its data directory, and starts it again.
    fn reopen(self, between: impl FnOnce(&Path)) -> Self {
        let data = self.data();
        let adir = self.tmp.path().join("authority");
        let World {
            tmp,
            relay,
            authority,
            beside,
            now,
            next_secret,
            secrets_issued,
        } = self;
        drop(relay);
        between(&data);
        let store = Store::open(&data).expect("reopen the store");
        let relay = Relay::with_authority(store, beside.then(|| unlock(&adir))).expect("relay");
        Self {
            tmp,
            relay,
            authority,
            beside,
            now,
            next_secret,
            secrets_issued,
        }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("relay")
    }

    fn relay_id(&self) -> DeviceId {
        self.relay.secrets().device_id()
    }

    fn deployment(&self) -> DeploymentId {
        self.authority.public().deployment
    }

    fn authority_key(&self) -> DeviceId {
        self.authority.public().key
    }

    fn now_ms(&self) -> u64 {
        ms(self.now)
    }

    /// A new invite secret (deterministic, but as varied as a random one).
    fn fresh_secret(&mut self) -> [u8; 32] {
        let secret = *blake3::hash(&[b's', self.next_secret]).as_bytes();
        self.next_secret += 1;
        self.secrets_issued.push(secret);
        secret
    }

    /// The operator issues a new-facility invite; the authority keeps its secret.
    fn invite_facility(&mut self, name: &str, role: FacilityRole) -> InviteCode {
        let secret = self.fresh_secret();
        let code = self
            .relay
            .store_mut()
            .issue_facility_invite(secret, name, role, self.now, Duration::from_secs(72 * 3600))
            .expect("issue invite");
        self.authority
            .record_invite(&AuthorityInvite {
                secret,
                name: name.into(),
                role,
                expires_at_ms: code.expires_at_ms,
            })
            .expect("the authority keeps the invite");
        code
    }

    /// Sends `request` over `who`'s connection.
    fn ask(&mut self, who: &DeviceSecrets, request: Request) -> (Response, Vec<Notification>) {
        self.raw(who.device_id(), &protocol::encode_request(&request))
    }

    /// Sends a raw frame from `peer`; every answer must decode and carry the store's generation.
    fn raw(&mut self, peer: DeviceId, frame: &[u8]) -> (Response, Vec<Notification>) {
        let (bytes, notes) = self.relay.handle(peer, frame, self.now);
        let (generation, response) = protocol::decode_response_frame(&bytes)
            .expect("the relay always answers a decodable frame");
        assert_eq!(
            generation,
            Some(self.relay.generation()),
            "every answer carries the store's generation"
        );
        (response, notes)
    }

    /// `who` asks to join with `code`.
    fn join(&mut self, who: &DeviceSecrets, code: &InviteCode) -> Response {
        let request = JoinRequest::make(code, who, "受付PC", self.now_ms());
        self.ask(
            who,
            Request::Join {
                request: Box::new(request),
            },
        )
        .0
    }

    /// Enrols device `n` as the first device of a new facility, approved by the authority beside the relay.
    fn enrol(&mut self, n: u8, name: &str, role: FacilityRole) -> Device {
        let secrets = device(n);
        let code = self.invite_facility(name, role);
        match self.join(&secrets, &code) {
            Response::Joined {
                facility,
                facility_name,
                sealed_pseudonym,
                ..
            } => {
                assert_eq!(
                    facility,
                    code.facility(),
                    "the facility id derives from the invite"
                );
                let pseudonym = open_pseudonym(&secrets, &sealed_pseudonym);
                Device {
                    secrets,
                    facility,
                    facility_name,
                    pseudonym,
                }
            }
            other => panic!("join failed: {other:?}"),
        }
    }

    /// `by` invites another device of its facility: it registers the invite at the relay (keeping the
    /// secret) and hands out the code.
    fn device_invite(&mut self, by: &Device) -> InviteCode {
        let secret = self.fresh_secret();
        let expires_at_ms = self.now_ms() + 3_600_000;
        let registration =
            InviteRegistration::sign(by, InviteId::of_secret(&secret), by.facility, expires_at_ms);
        assert_eq!(
            self.push_one(by, PushItem::Invite { registration }),
            PushResult::Accepted {
                seq: None,
                log: None
            }
        );
        InviteCode {
            deployment: self.deployment(),
            relay: self.relay_id(),
            addrs: vec![],
            authority: self.authority_key(),
            invite: InviteFor::Device {
                facility: by.facility,
                facility_name: by.facility_name.clone(),
            },
            expires_at_ms,
            secret: secret.to_vec(),
        }
    }

    fn signed_directory(&mut self, who: &DeviceSecrets) -> SignedDirectory {
        match self.ask(who, Request::GetDirectory { known_version: 0 }).0 {
            Response::Directory {
                directory: Some(d), ..
            } => d,
            other => panic!("expected a directory: {other:?}"),
        }
    }

    /// The directory as `who` verifies it (against the authority it pinned at join).
    fn directory(&mut self, who: &DeviceSecrets) -> Directory {
        let signed = self.signed_directory(who);
        signed
            .verify(
                &self.relay_id(),
                self.deployment(),
                &self.authority_key(),
                &Pins::default(),
            )
            .expect("the directory verifies")
            .0
    }

    /// `facility`'s device chain as the relay serves it to `who`.
    fn chain(&mut self, who: &DeviceSecrets, facility: FacilityId) -> Vec<DeviceLink> {
        let signed = self.signed_directory(who);
        signed
            .open(&self.relay_id())
            .expect("signed by the relay")
            .facilities
            .into_iter()
            .find(|r| r.cert.facility == facility)
            .expect("the facility is listed")
            .links
    }

    /// The join request of `new` as `approver` fetches it, checked against the secret it kept.
    fn waiting_request(
        &mut self,
        approver: &Device,
        code: &InviteCode,
        new: &DeviceSecrets,
    ) -> JoinRequest {
        let Response::JoinRequests { requests } = self.ask(approver, Request::GetJoinRequests).0
        else {
            panic!("join requests")
        };
        let request = requests
            .into_iter()
            .find(|r| r.device.device == new.device_id())
            .expect("the request waits for the facility");
        request
            .verify(&code.secret(), None)
            .expect("the request proves the invite's secret");
        request
    }

    /// `approver` approves `new`'s join request for `code`: the next link of its facility's chain.
    fn approve(&mut self, approver: &Device, code: &InviteCode, new: &DeviceSecrets) -> PushResult {
        let request = self.waiting_request(approver, code, new);
        let chain = self.chain(approver, approver.facility);
        let item = approval(
            approver,
            chain.last().expect("a chain"),
            &request.device,
            self.now_ms(),
        );
        self.push_one(approver, item)
    }

    /// Enrols device `n` as another device of `by`'s facility: invite, join (waits), approval, join.
    fn enrol_device_of(&mut self, n: u8, by: &Device) -> Device {
        let secrets = device(n);
        let code = self.device_invite(by);
        let r = self.join(&secrets, &code);
        assert!(matches!(r, Response::JoinPending { .. }), "{r:?}");
        assert_eq!(
            self.approve(by, &code, &secrets),
            PushResult::Accepted {
                seq: None,
                log: None
            }
        );
        match self.join(&secrets, &code) {
            Response::Joined {
                facility,
                facility_name,
                sealed_pseudonym,
                ..
            } => {
                assert_eq!(facility, by.facility);
                let pseudonym = open_pseudonym(&secrets, &sealed_pseudonym);
                Device {
                    secrets,
                    facility,
                    facility_name,
                    pseudonym,
                }
            }
            other => panic!("join failed after approval: {other:?}"),
        }
    }

    /// `by` revokes `lost`, a device of its own facility, with the next link of its chain.
    fn revoke_by_chain(&mut self, by: &Device, lost: &DeviceSecrets) -> PushResult {
        let chain = self.chain(by, by.facility);
        let link = DeviceLink::sign(
            by,
            by.facility,
            chain.last(),
            DeviceChange::Revoke {
                device: lost.device_id(),
            },
            self.now_ms(),
        );
        self.push_one(
            by,
            PushItem::Approve {
                link,
                sealed_pseudonym: vec![],
            },
        )
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

/// The next link of `approver`'s facility chain after `last`, adding `new`, with the approver's
/// pseudonym keys sealed to the new device.
fn approval(approver: &Device, last: &DeviceLink, new: &DevicePublic, at_ms: u64) -> PushItem {
    let link = DeviceLink::sign(
        approver,
        approver.facility,
        Some(last),
        DeviceChange::Add {
            device: new.device,
            age_recipient: new.age_recipient.clone(),
        },
        at_ms,
    );
    let recipient = crypto::parse_recipient(&new.age_recipient).expect("recipient");
    PushItem::Approve {
        link,
        sealed_pseudonym: crypto::seal_to(&[recipient], &approver.pseudonym).expect("seal"),
    }
}

/// Signs `request` again after a test changed it: a new proof under `secret` and a new signature by
/// `who` (what a device that knows `secret`, or guesses one, can make; mirrors `JoinRequest::make`).
fn resign(request: &mut JoinRequest, secret: &[u8; 32], who: &DeviceSecrets) {
    let mut proven = Vec::new();
    ciborium::into_writer(
        &(
            &request.invite,
            &request.device,
            &request.name,
            &request.genesis,
        ),
        &mut proven,
    )
    .expect("cbor");
    let key = blake3::derive_key("musubi invite proof v1", secret);
    request.proof = *blake3::keyed_hash(&key, &proven).as_bytes();
    proven.extend_from_slice(&request.proof);
    request.signature = who.sign(crypto::domain::JOIN_REQUEST, &proven);
}

/// The document key of `epoch` in these stories.
fn key(epoch: u32) -> DocumentKey {
    DocumentKey::from_seed(*blake3::hash(&epoch.to_le_bytes()).as_bytes())
}

fn create_body(members: Vec<Member>, nonce: u8) -> DocOpBody {
    DocOpBody::Create {
        kind: DocumentKind::Referral,
        members,
        key_commitment: key(0).commitment(),
        nonce: [nonce; 16],
    }
}

/// `author` creates a referral with `members` (its facility is the owner); the id derives from it.
fn create(author: &Device, members: Vec<Member>) -> DocOp {
    DocOp::create(author, author.facility, AT_MS, create_body(members, 1)).expect("create")
}

/// The operation after `prev` in its document's chain, by `author` for its own facility.
fn after(author: &Device, prev: &DocOp, body: DocOpBody) -> DocOp {
    DocOp::sign(
        author,
        author.facility,
        prev.doc,
        AT_MS,
        Some(prev.hash()),
        body,
    )
    .expect("sign op")
}

fn rotate(epoch: u32) -> DocOpBody {
    DocOpBody::NewEpoch {
        epoch: Epoch(epoch),
        key_commitment: key(epoch).commitment(),
    }
}

fn set_member(facility: FacilityId, role: Option<Role>) -> DocOpBody {
    DocOpBody::SetMember { facility, role }
}

fn op(op: DocOp) -> PushItem {
    PushItem::Op { op }
}

fn grant(grant: KeyGrant) -> PushItem {
    PushItem::Grant { grant }
}

fn sealed(envelope: Envelope) -> PushItem {
    PushItem::Bundle { envelope }
}

/// A bundle of `text` by `author` claiming `facility`, sealed with the key of `epoch`.
fn bundle_as(
    author: &DeviceSecrets,
    facility: FacilityId,
    doc: DocumentId,
    epoch: u32,
    text: &str,
) -> Envelope {
    Envelope::seal(
        author,
        facility,
        doc,
        Epoch(epoch),
        &key(epoch),
        &Payload::Changes {
            data: text.as_bytes().to_vec(),
        },
    )
    .expect("seal bundle")
}

/// A bundle of `text` by `author` for its own facility.
fn bundle(author: &Device, doc: DocumentId, epoch: u32, text: &str) -> Envelope {
    bundle_as(author, author.facility, doc, epoch, text)
}

fn recipient(d: &DeviceSecrets) -> (DeviceId, String) {
    (d.device_id(), d.public().age_recipient)
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
    a1: Device,
    a2: Device,
    b1: Device,
    hq: Device,
    doc: DocumentId,
    create: DocOp,
}

fn referral() -> Referral {
    let mut w = World::new();
    let a1 = w.enrol(1, "港診療所", FacilityRole::Clinic);
    let a2 = w.enrol_device_of(2, &a1);
    let b1 = w.enrol(3, "柏崎総合病院", FacilityRole::Clinic);
    let hq = w.enrol(4, "災害対策本部", FacilityRole::Hq);
    let create = create(
        &a1,
        vec![
            Member {
                facility: b1.facility,
                role: Role::Writer,
            },
            Member {
                facility: hq.facility,
                role: Role::Reader,
            },
        ],
    );
    let doc = create.doc;
    let (results, notes) = w.push(&a1, vec![op(create.clone())]);
    assert_eq!(
        results,
        vec![PushResult::Accepted {
            seq: None,
            log: None
        }]
    );
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
        doc,
        create,
    }
}

/// What a push result says, without the bundle log: ("accepted" | "duplicate" | "rejected", seq).
fn placed(r: &PushResult) -> (&'static str, Option<Seq>) {
    match r {
        PushResult::Accepted { seq, .. } => ("accepted", *seq),
        PushResult::Duplicate { seq, .. } => ("duplicate", *seq),
        PushResult::Rejected { .. } => ("rejected", None),
    }
}

#[test]
fn a_device_joins_once_with_a_valid_invite_and_gets_the_signed_directory() {
    let mut w = World::new();
    let a1 = device(1);
    let invite = w.invite_facility("港診療所", FacilityRole::Clinic);
    let relay = w.relay_id();
    assert_eq!(
        (invite.relay, invite.authority, invite.deployment),
        (relay, w.authority_key(), w.deployment()),
        "the code says where to go and whom to trust"
    );
    let Response::Joined {
        facility,
        facility_name,
        role,
        directory,
        deployment,
        sealed_pseudonym,
    } = w.join(&a1, &invite)
    else {
        panic!("join refused")
    };
    assert_eq!(
        (facility_name.as_str(), role),
        ("港診療所", FacilityRole::Clinic)
    );
    assert_eq!(deployment, w.deployment());
    assert_eq!(
        facility,
        invite.facility(),
        "the id derives from the invite"
    );
    let pseudonym = open_pseudonym(&a1, &sealed_pseudonym);
    assert_eq!(
        pseudonym_sectors(&a1, &sealed_pseudonym, FacilityRole::Clinic),
        [PseudonymSector::Clinic, PseudonymSector::Staff],
        "a clinic is issued the clinic and staff-card keys"
    );

    // The directory verifies against the authority the device pins, and names it with its age key.
    let (dir, pins) = directory
        .verify(&relay, deployment, &w.authority_key(), &Pins::default())
        .expect("the directory verifies");
    assert_eq!(
        dir.device(&a1.device_id())
            .map(|(f, d)| (f.id, d.age_recipient.clone())),
        Some((facility, a1.public().age_recipient))
    );
    let entry = dir.facility(facility).expect("listed");
    assert_eq!(
        (entry.name.as_str(), entry.role, entry.root, &entry.trust),
        (
            "港診療所",
            FacilityRole::Clinic,
            a1.device_id(),
            &Trust::Verified
        )
    );
    assert!(dir.is_current(&a1.device_id()));
    assert_eq!(pins.roots.get(&facility), Some(&a1.device_id()));

    // The same device asking again (its answer was lost) gets the same answer; anyone else is refused.
    assert!(matches!(w.join(&a1, &invite), Response::Joined { facility: f, .. } if f == facility));
    let r = w.join(&device(9), &invite);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("already used")),
        "{r:?}"
    );

    // An enrolled device does not spend another invite.
    let other = w.invite_facility("本部", FacilityRole::Hq);
    assert_eq!(code(&w.join(&a1, &other)), Some(ErrorCode::Conflict));
    let Response::Joined {
        sealed_pseudonym, ..
    } = w.join(&device(5), &other)
    else {
        panic!("the invite is still unused")
    };
    let hq = PseudonymKeys::from_plain(
        &open_pseudonym(&device(5), &sealed_pseudonym),
        FacilityRole::Hq,
    )
    .expect("keys");
    let clinic = PseudonymKeys::from_plain(&pseudonym, FacilityRole::Clinic).expect("keys");
    assert_eq!(
        hq.sectors(),
        [PseudonymSector::Reception, PseudonymSector::Staff],
        "HQ is issued reception's key (evacuees' cards) and the staff-card key, not the clinics'"
    );
    assert_eq!(
        hq.key(PseudonymSector::Staff),
        clinic.key(PseudonymSector::Staff),
        "the authority derives each sector's key once for the deployment"
    );

    // A secret nobody issued is refused.
    let mut unknown = invite.clone();
    unknown.secret = vec![0xee; 32];
    let r = w.join(&device(6), &unknown);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("not known")),
        "{r:?}"
    );
}

#[test]
fn a_join_request_is_the_connected_devices_own_and_an_invite_serves_once() {
    let mut w = World::new();
    let a1 = w.enrol(1, "港診療所", FacilityRole::Clinic);
    let invite = w.device_invite(&a1);
    let (six, seven) = (device(6), device(7));

    // Device 7's genuine request, replayed over device 6's connection.
    let request = JoinRequest::make(&invite, &seven, "受付2", w.now_ms());
    let r = w
        .ask(
            &six,
            Request::Join {
                request: Box::new(request),
            },
        )
        .0;
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::BadSignature, message } if message.contains("connection")),
        "{r:?}"
    );

    // A request changed after it was signed.
    let mut renamed = JoinRequest::make(&invite, &six, "受付2", w.now_ms());
    renamed.name = "院長室".into();
    let r = w
        .ask(
            &six,
            Request::Join {
                request: Box::new(renamed),
            },
        )
        .0;
    assert_eq!(code(&r), Some(ErrorCode::BadSignature));

    // A request signed properly but naming an age key that is not one.
    let mut broken = JoinRequest::make(&invite, &six, "受付2", w.now_ms());
    broken.device.age_recipient = "age1nonsense".into();
    resign(&mut broken, &invite.secret(), &six);
    let r = w
        .ask(
            &six,
            Request::Join {
                request: Box::new(broken),
            },
        )
        .0;
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::BadSignature, message } if message.contains("age recipient")),
        "{r:?}"
    );

    // None of these spent or blocked the invite: device 6's own request waits for its facility.
    assert_eq!(
        w.join(&six, &invite),
        Response::JoinPending {
            expires_at_ms: invite.expires_at_ms
        }
    );
    // While it waits, nobody else may use the invite.
    let r = w.join(&seven, &invite);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("another device")),
        "{r:?}"
    );
    assert_eq!(
        w.approve(&a1, &invite, &six),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert!(
        matches!(w.join(&six, &invite), Response::Joined { facility, .. } if facility == a1.facility)
    );

    // A used invite is refused to anyone else.
    let r = w.join(&seven, &invite);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("already used")),
        "{r:?}"
    );
    assert_eq!(
        code(&w.ask(&seven, Request::ListDocuments).0),
        Some(ErrorCode::NotEnrolled)
    );
}

#[test]
fn an_expired_invite_says_when_it_expired() {
    let mut w = World::new();
    let secret = w.fresh_secret();
    let invite = w
        .relay
        .store_mut()
        .issue_facility_invite(
            secret,
            "港診療所",
            FacilityRole::Clinic,
            t0(),
            Duration::from_secs(3600),
        )
        .expect("invite");
    w.now = t0() + Duration::from_secs(2 * 3600);
    let r = w.join(&device(1), &invite);
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::InviteInvalid, message } if message.contains("expired at 2027-01-15T09:00:00Z")),
        "{r:?}"
    );
}

#[test]
fn a_new_facility_waits_for_the_authority_when_it_is_not_beside_the_relay() {
    let mut w = World::without_authority();
    let a1 = device(1);
    let invite = w.invite_facility("港診療所", FacilityRole::Clinic);

    // The relay cannot certify anyone: the device waits, however often it asks, and may do nothing else.
    for _ in 0..2 {
        assert_eq!(
            w.join(&a1, &invite),
            Response::JoinPending {
                expires_at_ms: invite.expires_at_ms
            }
        );
    }
    assert_eq!(
        code(&w.ask(&a1, Request::ListDocuments).0),
        Some(ErrorCode::NotEnrolled)
    );

    // Someone who learnt the invite's id but not its secret asks too: the relay cannot tell, the authority can.
    let other = w.invite_facility("本部", FacilityRole::Hq);
    let thief = device(9);
    let mut guess = other.clone();
    guess.secret = vec![0xee; 32];
    let mut forged = JoinRequest::make(&guess, &thief, "本部PC", w.now_ms());
    forged.invite = other.id();
    resign(&mut forged, &guess.secret(), &thief);
    let r = w
        .ask(
            &thief,
            Request::Join {
                request: Box::new(forged.clone()),
            },
        )
        .0;
    assert!(matches!(r, Response::JoinPending { .. }), "{r:?}");

    // `musubi-node approve`: the authority, unlocked off the relay, checks each waiting request.
    let authority = unlock(&w.tmp.path().join("authority"));
    let pending = w.relay.store().pending_facility_joins().expect("pending");
    assert_eq!(pending.len(), 2);
    let mut approved = 0;
    for p in &pending {
        let kept = authority
            .invite(p.request.invite)
            .expect("read")
            .expect("the authority issued it");
        match authority.approve(&p.request, &kept, w.now_ms()) {
            Ok(approval) => {
                assert_eq!(p.request.device.device, a1.device_id());
                assert_eq!(p.name.as_deref(), Some("港診療所"));
                assert_eq!(approval.cert.root, a1.device_id());
                assert_eq!(approval.cert.facility, invite.facility());
                approval
                    .cert
                    .verify(&w.authority_key(), w.deployment())
                    .expect("the certificate verifies");
                w.relay
                    .store_mut()
                    .store_approval(&p.request, &approval, w.now)
                    .expect("store the approval");
                authority.mark_used(p.request.invite).expect("mark used");
                approved += 1;
            }
            Err(e) => {
                assert_eq!(p.request.device.device, thief.device_id());
                assert!(e.to_string().contains("secret"), "{e}");
            }
        }
    }
    assert_eq!(approved, 1);
    assert_eq!(
        w.relay
            .store()
            .pending_facility_joins()
            .expect("pending")
            .len(),
        1,
        "only the thief's request still waits"
    );

    let Response::Joined {
        facility,
        sealed_pseudonym,
        ..
    } = w.join(&a1, &invite)
    else {
        panic!("joined after approval")
    };
    assert_eq!(facility, invite.facility());
    assert_eq!(
        pseudonym_sectors(&a1, &sealed_pseudonym, FacilityRole::Clinic),
        [PseudonymSector::Clinic, PseudonymSector::Staff]
    );
    assert!(w.directory(&a1).is_current(&a1.device_id()));
    assert!(matches!(
        w.ask(
            &thief,
            Request::Join {
                request: Box::new(forged)
            }
        )
        .0,
        Response::JoinPending { .. }
    ));
    assert_eq!(
        code(&w.ask(&thief, Request::ListDocuments).0),
        Some(ErrorCode::NotEnrolled)
    );
}

#[test]
fn another_device_of_a_facility_joins_only_when_a_current_device_of_it_approves() {
    let mut w = World::new();
    let a1 = w.enrol(1, "港診療所", FacilityRole::Clinic);
    let b1 = w.enrol(3, "柏崎総合病院", FacilityRole::Clinic);
    let hour = w.now_ms() + 3_600_000;

    // A device registers invites for its own facility only, signed, and for a bounded time.
    let id = InviteId::of_secret(&[0x77; 32]);
    let foreign = InviteRegistration::sign(&b1, id, a1.facility, hour);
    assert_eq!(
        rejected(&w.push_one(
            &b1,
            PushItem::Invite {
                registration: foreign
            }
        )),
        Some(ErrorCode::Forbidden)
    );
    let mut tampered = InviteRegistration::sign(&a1, id, a1.facility, hour);
    tampered.expires_at_ms += 1;
    assert_eq!(
        rejected(&w.push_one(
            &a1,
            PushItem::Invite {
                registration: tampered
            }
        )),
        Some(ErrorCode::BadSignature)
    );
    for expires in [w.now_ms(), w.now_ms() + 31 * 86_400_000] {
        let reg = InviteRegistration::sign(&a1, id, a1.facility, expires);
        assert_eq!(
            rejected(&w.push_one(&a1, PushItem::Invite { registration: reg })),
            Some(ErrorCode::InviteInvalid)
        );
    }

    // A third laptop joined once, then was lost: the facility revoked it in its own chain.
    let a3 = w.enrol_device_of(5, &a1);
    assert_eq!(
        w.revoke_by_chain(&a1, &a3),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );

    // The reception desk's second laptop asks to join: its facility's current devices are told.
    let invite = w.device_invite(&a1);
    let a2 = device(2);
    let request = JoinRequest::make(&invite, &a2, "受付2", w.now_ms());
    let (r, notes) = w.ask(
        &a2,
        Request::Join {
            request: Box::new(request),
        },
    );
    assert_eq!(
        r,
        Response::JoinPending {
            expires_at_ms: invite.expires_at_ms
        }
    );
    assert_eq!(targets(&notes), BTreeSet::from([a1.device_id()]));
    assert!(notes.iter().all(|n| n.request == Request::NotifyJoin));

    // The relay does not approve it itself: asking again still waits, and it may do nothing else.
    assert!(matches!(w.join(&a2, &invite), Response::JoinPending { .. }));
    assert_eq!(
        code(&w.ask(&a2, Request::ListDocuments).0),
        Some(ErrorCode::NotEnrolled)
    );

    // Only its facility sees the request.
    assert_eq!(
        w.ask(&b1, Request::GetJoinRequests).0,
        Response::JoinRequests { requests: vec![] }
    );
    let request = w.waiting_request(&a1, &invite, &a2);
    let chain = w.chain(&a1, a1.facility);
    let last = chain.last().expect("a chain").clone();
    let add_a2 = DeviceChange::Add {
        device: a2.device_id(),
        age_recipient: a2.public().age_recipient,
    };

    // A device of another facility signs the link: refused, pushed by itself or forwarded.
    let by_b = PushItem::Approve {
        link: DeviceLink::sign(&b1, a1.facility, Some(&last), add_a2.clone(), w.now_ms()),
        sealed_pseudonym: vec![],
    };
    assert_eq!(
        rejected(&w.push_one(&b1, by_b.clone())),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(rejected(&w.push_one(&a1, by_b)), Some(ErrorCode::Forbidden));
    // Nor can b1 add it to its own facility: nobody asked to join there.
    let b_chain = w.chain(&b1, b1.facility);
    let to_b = PushItem::Approve {
        link: DeviceLink::sign(&b1, b1.facility, b_chain.last(), add_a2.clone(), w.now_ms()),
        sealed_pseudonym: vec![],
    };
    let r = w.push_one(&b1, to_b);
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains("waiting")),
        "{r:?}"
    );

    // The revoked laptop signs the link: it is refused at the door, and its link when forwarded.
    let by_revoked = PushItem::Approve {
        link: DeviceLink::sign(&a3, a1.facility, Some(&last), add_a2.clone(), w.now_ms()),
        sealed_pseudonym: vec![],
    };
    let (r, _) = w.ask(
        &a3,
        Request::Push {
            items: vec![by_revoked.clone()],
        },
    );
    assert_eq!(code(&r), Some(ErrorCode::Revoked));
    assert_eq!(
        rejected(&w.push_one(&a1, by_revoked)),
        Some(ErrorCode::Forbidden)
    );

    // Links that do not extend the chain: made against an older head, or after another link.
    let old = PushItem::Approve {
        link: DeviceLink::sign(
            &a1,
            a1.facility,
            Some(&chain[0]),
            add_a2.clone(),
            w.now_ms(),
        ),
        sealed_pseudonym: vec![],
    };
    assert_eq!(rejected(&w.push_one(&a1, old)), Some(ErrorCode::Stale));
    let mut forked = DeviceLink::sign(&a1, a1.facility, Some(&last), add_a2.clone(), w.now_ms());
    forked.prev = Some([0; 32]);
    forked.signature = a1.sign(crypto::domain::DEVICE_LINK, &forked.signed_bytes());
    let r = w.push_one(
        &a1,
        PushItem::Approve {
            link: forked,
            sealed_pseudonym: vec![],
        },
    );
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains("does not follow")),
        "{r:?}"
    );
    // A link adding a device that never asked.
    let uninvited = DeviceChange::Add {
        device: device(8).device_id(),
        age_recipient: device(8).public().age_recipient,
    };
    let r = w.push_one(
        &a1,
        PushItem::Approve {
            link: DeviceLink::sign(&a1, a1.facility, Some(&last), uninvited, w.now_ms()),
            sealed_pseudonym: vec![],
        },
    );
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains("waiting")),
        "{r:?}"
    );
    assert!(matches!(w.join(&a2, &invite), Response::JoinPending { .. }));

    // A current device of the facility approves: the laptop is enrolled, and the same approval again changes nothing.
    let item = approval(&a1, &last, &request.device, w.now_ms());
    assert_eq!(
        w.push_one(&a1, item.clone()),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert_eq!(
        w.push_one(&a1, item),
        PushResult::Duplicate {
            seq: None,
            log: None
        }
    );
    let Response::Joined {
        facility,
        facility_name,
        role,
        sealed_pseudonym,
        directory,
        ..
    } = w.join(&a2, &invite)
    else {
        panic!("joined")
    };
    assert_eq!(
        (facility, facility_name.as_str(), role),
        (a1.facility, "港診療所", FacilityRole::Clinic)
    );
    assert_eq!(open_pseudonym(&a2, &sealed_pseudonym), a1.pseudonym);
    let (dir, _) = directory
        .verify(
            &w.relay_id(),
            w.deployment(),
            &w.authority_key(),
            &Pins::default(),
        )
        .expect("verifies");
    assert_eq!(
        dir.device_status(&a2.device_id()),
        DeviceStatus::Current(a1.facility)
    );
    assert_eq!(
        dir.device_status(&a3.device_id()),
        DeviceStatus::Former(a1.facility)
    );
    assert_eq!(
        dir.facility(a1.facility)
            .expect("listed")
            .current_devices()
            .map(|d| d.device)
            .collect::<Vec<_>>(),
        vec![a1.device_id(), a2.device_id()]
    );
    assert_eq!(
        w.ask(&a1, Request::GetJoinRequests).0,
        Response::JoinRequests { requests: vec![] }
    );
    assert!(matches!(
        w.ask(&a2, Request::ListDocuments).0,
        Response::Documents { .. }
    ));
}

#[test]
fn an_unenrolled_peer_may_only_join() {
    let mut w = World::new();
    let stranger = device(9);
    let doc = DocumentId::from_random_bytes([1; 16]);
    for request in [
        Request::ListDocuments,
        Request::GetDirectory { known_version: 0 },
        Request::GetJoinRequests,
        Request::GetOps { doc, from: 0 },
        Request::GetKeyGrants { doc },
        Request::Pull { doc, after: Seq(0) },
        Request::Push { items: vec![] },
        Request::Offer {
            doc,
            directory_version: 0,
            have: vec![],
            ops: vec![],
            grants: vec![],
        },
    ] {
        assert_eq!(
            code(&w.ask(&stranger, request).0),
            Some(ErrorCode::NotEnrolled)
        );
    }
    let a1 = w.enrol(1, "港診療所", FacilityRole::Clinic);
    for request in [
        Request::Notify {
            doc,
            head: Seq(1),
            epoch: Epoch(0),
        },
        Request::NotifyJoin,
        Request::Deliver { doc, items: vec![] },
    ] {
        assert_eq!(code(&w.ask(&a1, request).0), Some(ErrorCode::Forbidden));
    }
}

#[test]
fn the_directory_is_sent_only_when_the_caller_lacks_this_version() {
    let mut w = World::new();
    let a1 = w.enrol(1, "港診療所", FacilityRole::Clinic);
    let dir = w.directory(&a1);
    let lacks = |w: &mut World, version: u64| -> bool {
        match w
            .ask(
                &a1,
                Request::GetDirectory {
                    known_version: version,
                },
            )
            .0
        {
            Response::Directory { directory, .. } => directory.is_some(),
            other => panic!("directory: {other:?}"),
        }
    };
    assert!(!lacks(&mut w, dir.version));
    assert!(
        lacks(&mut w, dir.version + 1),
        "any other version gets the current one"
    );

    // A new facility, a new device and a revocation each make a new version.
    w.enrol(2, "本部", FacilityRole::Hq);
    assert!(lacks(&mut w, dir.version));
    let v1 = w.directory(&a1).version;
    let a2 = w.enrol_device_of(3, &a1);
    assert!(lacks(&mut w, v1));
    let v2 = w.directory(&a1).version;
    assert_eq!(
        w.revoke_by_chain(&a1, &a2),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert!(lacks(&mut w, v2));
}

#[test]
fn bundles_get_sequence_numbers_duplicates_keep_theirs_and_members_are_notified() {
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        hq,
        doc,
        create,
    } = referral();
    let e1 = bundle(&a1, doc, 0, "紹介目的: 精査依頼");
    let (results, notes) = w.push(&a1, vec![sealed(e1.clone())]);
    assert_eq!(
        results.iter().map(placed).collect::<Vec<_>>(),
        vec![("accepted", Some(Seq(1)))]
    );
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

    // The bundle log runs over the ids in sequence order; a duplicate answers with its own.
    let log1 = LogHash::ZERO.next(&e1.id());
    assert!(matches!(results[0], PushResult::Accepted { log: Some(l), .. } if l == log1));
    // Pushing it again, even by another member (a LAN peer forwarding it), is harmless.
    let again = w.push_one(&b1, sealed(e1.clone()));
    assert_eq!(placed(&again), ("duplicate", Some(Seq(1))));
    assert!(matches!(again, PushResult::Duplicate { log: Some(l), .. } if l == log1));
    let reply = bundle(&b1, doc, 0, "返書");
    assert_eq!(
        placed(&w.push_one(&b1, sealed(reply.clone()))),
        ("accepted", Some(Seq(2)))
    );
    let log2 = log1.next(&reply.id());
    let Response::Bundles {
        items, head, base, ..
    } = w.pull(&b1, doc, 1)
    else {
        panic!("bundles")
    };
    assert_eq!(
        (items.len(), items[0].log, head, base),
        (1, log2, Seq(2), log1),
        "a pull carries each bundle's log and the log where it starts"
    );

    // The list gives hints of what to fetch, never a member list.
    let Response::Documents { docs } = w.ask(&hq, Request::ListDocuments).0 else {
        panic!("documents")
    };
    assert_eq!(docs.len(), 1);
    assert_eq!(
        (
            docs[0].id,
            docs[0].kind,
            docs[0].head,
            docs[0].epoch,
            docs[0].ops,
            docs[0].ops_head,
            docs[0].log
        ),
        (
            doc,
            DocumentKind::Referral,
            Seq(2),
            Epoch(0),
            1,
            Some(create.hash()),
            log2
        )
    );

    // Each member replays the signed operations itself to learn who the members are.
    let Response::Ops { ops, total, .. } = w.ask(&hq, Request::GetOps { doc, from: 0 }).0 else {
        panic!("ops")
    };
    assert_eq!((ops.clone(), total), (vec![create.clone()], 1));
    let dir = w.directory(&hq);
    let replay = membership::replay(&ops, &dir, Point::Pulled);
    assert_eq!(
        replay.view.expect("the chain replays").members,
        vec![
            Member {
                facility: a1.facility,
                role: Role::Owner
            },
            Member {
                facility: b1.facility,
                role: Role::Writer
            },
            Member {
                facility: hq.facility,
                role: Role::Reader
            },
        ]
    );
    assert_eq!(
        w.ask(&hq, Request::GetOps { doc, from: 1 }).0,
        Response::Ops {
            doc,
            ops: vec![],
            total: 1
        }
    );
}

#[test]
fn hostile_pushes_are_refused_with_the_right_code_and_the_relay_keeps_answering() {
    let Referral {
        mut w,
        a1,
        b1,
        hq,
        doc,
        create,
        ..
    } = referral();

    // A tampered ciphertext.
    let mut forged = bundle(&a1, doc, 0, "処方");
    forged.ciphertext[30] ^= 1;
    assert_eq!(
        rejected(&w.push_one(&a1, sealed(forged))),
        Some(ErrorCode::BadSignature)
    );

    // A reader facility writing.
    let r = w.push_one(&hq, sealed(bundle(&hq, doc, 0, "x")));
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains("is a reader")),
        "{r:?}"
    );

    // A bundle claiming to come from a facility its author does not belong to.
    let r = w.push_one(&b1, sealed(bundle_as(&b1, a1.facility, doc, 0, "x")));
    assert_eq!(rejected(&r), Some(ErrorCode::Forbidden));

    // A document nobody created; a facility that is not a member.
    let ghost = DocumentId::from_random_bytes([9; 16]);
    assert_eq!(
        rejected(&w.push_one(&a1, sealed(bundle(&a1, ghost, 0, "x")))),
        Some(ErrorCode::UnknownDocument)
    );
    let c1 = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);
    assert_eq!(
        rejected(&w.push_one(&c1, sealed(bundle(&c1, doc, 0, "x")))),
        Some(ErrorCode::NotMember)
    );

    // A tampered operation; an operation naming a facility its signer does not belong to.
    let add_c = set_member(c1.facility, Some(Role::Reader));
    let mut forged = after(&a1, &create, add_c.clone());
    forged.body = set_member(c1.facility, Some(Role::Owner));
    assert_eq!(
        rejected(&w.push_one(&a1, op(forged))),
        Some(ErrorCode::BadSignature)
    );
    let as_a = DocOp::sign(
        &b1,
        a1.facility,
        doc,
        AT_MS,
        Some(create.hash()),
        add_c.clone(),
    )
    .expect("sign");
    assert_eq!(
        rejected(&w.push_one(&b1, op(as_a))),
        Some(ErrorCode::Forbidden)
    );
    // A genuine operation of the owner, forwarded by another member (a LAN peer), is accepted once.
    let forwarded = op(after(&a1, &create, add_c));
    assert_eq!(
        w.push_one(&b1, forwarded.clone()),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert_eq!(
        w.push_one(&a1, forwarded),
        PushResult::Duplicate {
            seq: None,
            log: None
        }
    );

    // An invite registration or approval in an offline file is not a document item.
    let (results, _) = w
        .relay
        .import(
            vec![PushItem::Invite {
                registration: InviteRegistration::sign(
                    &a1,
                    InviteId::of_secret(&[0x66; 32]),
                    a1.facility,
                    w.now_ms() + 1000,
                ),
            }],
            w.now,
        )
        .expect("import");
    assert_eq!(rejected(&results[0]), Some(ErrorCode::Forbidden));

    // Too many items; a malformed frame; a frame of another protocol version.
    let items = vec![sealed(bundle(&a1, doc, 0, "x")); PUSH_ITEMS_MAX + 1];
    assert_eq!(
        code(&w.ask(&a1, Request::Push { items }).0),
        Some(ErrorCode::TooLarge)
    );
    assert_eq!(
        code(&w.raw(a1.device_id(), b"\xa2\x61v\x02\x64body\xff").0),
        Some(ErrorCode::Malformed)
    );
    assert_eq!(
        code(&w.raw(a1.device_id(), &[0xff; 64]).0),
        Some(ErrorCode::Malformed)
    );
    let mut v1 = protocol::encode_request(&Request::ListDocuments);
    assert_eq!(v1[..4], [0xa2, 0x61, b'v', 0x02], "{{v: 2, body: ...}}");
    v1[3] = 0x01;
    assert_eq!(
        code(&w.raw(a1.device_id(), &v1).0),
        Some(ErrorCode::UnsupportedVersion)
    );

    // Items in one push are judged one by one; the good one is stored.
    let (results, _) = w.push(
        &b1,
        vec![
            sealed(bundle_as(&b1, a1.facility, doc, 0, "bad")),
            sealed(bundle(&b1, doc, 0, "ok")),
        ],
    );
    assert_eq!(rejected(&results[0]), Some(ErrorCode::Forbidden));
    assert_eq!(placed(&results[1]), ("accepted", Some(Seq(1))));
    let Response::Bundles { items, head, .. } = w.pull(&hq, doc, 0) else {
        panic!("pull")
    };
    assert_eq!((items.len(), head), (1, Seq(1)));
}

#[test]
fn a_non_member_cannot_add_itself_rotate_or_take_over_a_document() {
    let Referral {
        mut w,
        a1,
        b1,
        hq,
        doc,
        create,
        ..
    } = referral();
    let c1 = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);

    // Even knowing the chain's head, an enrolled outsider cannot make itself a member ...
    let add_self = after(&c1, &create, set_member(c1.facility, Some(Role::Owner)));
    assert_eq!(
        rejected(&w.push_one(&c1, op(add_self.clone()))),
        Some(ErrorCode::NotMember)
    );
    assert_eq!(
        rejected(&w.push_one(&a1, op(add_self))),
        Some(ErrorCode::NotMember),
        "forwarding does not help"
    );
    // ... nor start a new epoch with a key it chose ...
    let r = w.push_one(&c1, op(after(&c1, &create, rotate(1))));
    assert_eq!(rejected(&r), Some(ErrorCode::Forbidden));
    // ... nor sign as the owner's facility.
    let as_owner = DocOp::sign(
        &c1,
        a1.facility,
        doc,
        AT_MS,
        Some(create.hash()),
        set_member(c1.facility, Some(Role::Owner)),
    )
    .expect("sign");
    assert_eq!(
        rejected(&w.push_one(&c1, op(as_owner))),
        Some(ErrorCode::Forbidden)
    );
    // A reader member may neither share nor rotate.
    assert_eq!(
        rejected(&w.push_one(
            &hq,
            op(after(
                &hq,
                &create,
                set_member(c1.facility, Some(Role::Reader))
            ))
        )),
        Some(ErrorCode::Forbidden)
    );

    // A Create that takes the document's id: refused as existing here ...
    let takeover =
        DocOp::sign(&c1, c1.facility, doc, AT_MS, None, create_body(vec![], 1)).expect("sign");
    assert_eq!(
        rejected(&w.push_one(&c1, op(takeover))),
        Some(ErrorCode::Conflict)
    );
    // ... and a Create whose id its body does not derive, for a document not yet known.
    let squat = DocOp::sign(
        &c1,
        c1.facility,
        DocumentId::from_random_bytes([0x33; 16]),
        AT_MS,
        None,
        create_body(vec![], 1),
    )
    .expect("sign");
    assert_eq!(
        rejected(&w.push_one(&c1, op(squat))),
        Some(ErrorCode::Malformed)
    );

    // Nothing changed: c1 reads nothing, and the members replay the same single operation.
    for request in [
        Request::Pull { doc, after: Seq(0) },
        Request::GetKeyGrants { doc },
        Request::GetOps { doc, from: 0 },
    ] {
        assert_eq!(code(&w.ask(&c1, request).0), Some(ErrorCode::NotMember));
    }
    let Response::Documents { docs } = w.ask(&c1, Request::ListDocuments).0 else {
        panic!("documents")
    };
    assert!(docs.is_empty());
    let Response::Ops { ops, total, .. } = w.ask(&b1, Request::GetOps { doc, from: 0 }).0 else {
        panic!("ops")
    };
    assert_eq!((ops, total), (vec![create], 1));
}

#[test]
fn key_grants_come_from_member_devices_and_go_to_member_devices_only() {
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        hq,
        doc,
        ..
    } = referral();
    let c1 = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);
    let members: Vec<(DeviceId, String)> =
        [&a1, &a2, &b1, &hq].iter().map(|d| recipient(d)).collect();

    // An outsider plants a key of its own for the members: refused, pushed or forwarded.
    let planted = KeyGrant::seal(
        &c1,
        c1.facility,
        doc,
        Epoch(0),
        &DocumentKey::from_seed([99; 32]),
        &members,
    )
    .expect("grant");
    assert_eq!(
        rejected(&w.push_one(&c1, grant(planted.clone()))),
        Some(ErrorCode::NotMember)
    );
    assert_eq!(
        rejected(&w.push_one(&a1, grant(planted))),
        Some(ErrorCode::NotMember)
    );
    // ... or signs it as a member facility.
    let as_member =
        KeyGrant::seal(&c1, a1.facility, doc, Epoch(0), &key(0), &members).expect("grant");
    assert_eq!(
        rejected(&w.push_one(&a1, grant(as_member))),
        Some(ErrorCode::Forbidden)
    );

    // A member seals the key to a device of a non-member facility.
    let mut to = members.clone();
    to.push(recipient(&c1));
    let leak = KeyGrant::seal(&a1, a1.facility, doc, Epoch(0), &key(0), &to).expect("grant");
    let r = w.push_one(&a1, grant(leak));
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains(&c1.device_id().to_string())),
        "{r:?}"
    );
    // A grant whose recipients were changed after signing.
    let mut altered =
        KeyGrant::seal(&a1, a1.facility, doc, Epoch(0), &key(0), &members).expect("grant");
    altered.recipients.pop();
    assert_eq!(
        rejected(&w.push_one(&a1, grant(altered))),
        Some(ErrorCode::BadSignature)
    );

    // The members' grant is stored; every member device opens it; the outsider cannot fetch it.
    let g0 = KeyGrant::seal(&a1, a1.facility, doc, Epoch(0), &key(0), &members).expect("grant");
    assert_eq!(
        w.push_one(&a1, grant(g0.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let Response::KeyGrants { grants, .. } = w.ask(&hq, Request::GetKeyGrants { doc }).0 else {
        panic!("grants")
    };
    assert_eq!(grants, vec![g0]);
    for d in [&a1, &a2, &b1, &hq] {
        assert_eq!(
            grants[0].open(d).expect("opens").commitment(),
            key(0).commitment()
        );
    }
    assert!(grants[0].open(&c1).is_err());
    assert_eq!(
        code(&w.ask(&c1, Request::GetKeyGrants { doc }).0),
        Some(ErrorCode::NotMember)
    );

    // A device nobody here enrolled may have been enrolled in a history this relay lost (it was put
    // back to a backup): a member's grant naming it is kept, so the other recipients get the key,
    // and the unknown device still fetches nothing until the authority enrols it here.
    let unknown = device(9);
    let mut to = members.clone();
    to.push(recipient(&unknown));
    let wider = KeyGrant::seal(&a1, a1.facility, doc, Epoch(0), &key(0), &to).expect("grant");
    assert_eq!(
        w.push_one(&a1, grant(wider)),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert!(
        code(&w.ask(&unknown, Request::GetKeyGrants { doc }).0).is_some(),
        "an unenrolled device is answered with a refusal"
    );
}

#[test]
fn after_a_rotation_old_epoch_bundles_are_stale_and_a_revoked_device_writes_nothing() {
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        doc,
        create,
        ..
    } = referral();
    assert!(matches!(
        w.push_one(&a2, sealed(bundle(&a2, doc, 0, "受付票"))),
        PushResult::Accepted { .. }
    ));

    // The clinic's second laptop is lost: the clinic revokes it, and b1 (a writer) rotates the key.
    assert_eq!(
        w.revoke_by_chain(&a1, &a2),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let next = after(&b1, &create, rotate(1));
    let (results, notes) = w.push(&b1, vec![op(next)]);
    assert_eq!(
        results,
        vec![PushResult::Accepted {
            seq: None,
            log: None
        }]
    );
    assert!(!targets(&notes).contains(&a2.device_id()));
    assert!(notes.iter().all(|n| matches!(
        n.request,
        Request::Notify {
            epoch: Epoch(1),
            ..
        }
    )));
    let current: Vec<(DeviceId, String)> = [&a1, &b1].iter().map(|d| recipient(d)).collect();
    let g1 = KeyGrant::seal(&b1, b1.facility, doc, Epoch(1), &key(1), &current).expect("grant");
    assert_eq!(
        w.push_one(&b1, grant(g1)),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );

    // A member that was offline seals in the superseded epoch: stale, told to seal it again.
    let r = w.push_one(&a1, sealed(bundle(&a1, doc, 0, "古い鍵で")));
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Stale, message } if message.contains("superseded")),
        "{r:?}"
    );
    assert_eq!(
        placed(&w.push_one(&a1, sealed(bundle(&a1, doc, 1, "新しい鍵で")))),
        ("accepted", Some(Seq(2)))
    );

    // The lost laptop writes nothing: not in the old epoch, not in the new one, not through a friend.
    for epoch in [0, 1] {
        let late = bundle(&a2, doc, epoch, "盗まれたPCから");
        assert_eq!(
            code(
                &w.ask(
                    &a2,
                    Request::Push {
                        items: vec![sealed(late.clone())]
                    }
                )
                .0
            ),
            Some(ErrorCode::Revoked)
        );
        assert_eq!(
            rejected(&w.push_one(&a1, sealed(late))),
            Some(ErrorCode::Revoked)
        );
    }
    // Nobody can seal the new key to it.
    let to_lost =
        KeyGrant::seal(&a1, a1.facility, doc, Epoch(1), &key(1), &[recipient(&a2)]).expect("grant");
    assert_eq!(
        rejected(&w.push_one(&a1, grant(to_lost))),
        Some(ErrorCode::Forbidden)
    );
    // What it wrote before the loss stays as history.
    let Response::Bundles { items, head, .. } = w.pull(&b1, doc, 0) else {
        panic!("pull")
    };
    assert_eq!((items.len(), head), (2, Seq(2)));
    assert_eq!(items[0].envelope.author, a2.device_id());
}

#[test]
fn pull_returns_bundles_after_a_sequence_number_to_members_only() {
    let Referral {
        mut w, a1, b1, doc, ..
    } = referral();
    let sent: Vec<Envelope> = (0..5)
        .map(|i| bundle(&a1, doc, 0, &format!("支援経過 {i}")))
        .collect();
    let (results, _) = w.push(&a1, sent.iter().cloned().map(sealed).collect());
    assert_eq!(results.last().map(placed), Some(("accepted", Some(Seq(5)))));

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

    let c1 = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);
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
        mut w, a1, b1, doc, ..
    } = referral();
    let big = "x".repeat(PULL_RESPONSE_BYTES_TARGET / 3);
    for i in 0..4 {
        let e = bundle(&a1, doc, 0, &format!("{i}{big}"));
        assert!(matches!(
            w.push_one(&a1, sealed(e)),
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
        doc,
        ..
    } = referral();
    let early = bundle(&a2, doc, 0, "before the laptop was lost");
    assert!(matches!(
        w.push_one(&a2, sealed(early.clone())),
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
    // Every facility learns it from the directory, which the relay signs.
    let dir = w.directory(&b1);
    assert_eq!(
        dir.device_status(&a2.device_id()),
        DeviceStatus::Former(a1.facility)
    );

    // New bundles by the revoked device are refused even when another device forwards them;
    // the one stored before stays (pushing it again is a duplicate), and it is no longer notified.
    let late = bundle(&a2, doc, 0, "after");
    assert_eq!(
        rejected(&w.push_one(&a1, sealed(late))),
        Some(ErrorCode::Revoked)
    );
    assert_eq!(
        placed(&w.push_one(&b1, sealed(early))),
        ("duplicate", Some(Seq(1)))
    );
    let (_, notes) = w.push(&a1, vec![sealed(bundle(&a1, doc, 0, "new"))]);
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
fn a_facility_revokes_its_lost_laptop_through_its_own_chain_and_no_one_else_can() {
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        doc,
        ..
    } = referral();
    let early = bundle(&a2, doc, 0, "before");
    assert!(matches!(
        w.push_one(&a2, sealed(early.clone())),
        PushResult::Accepted { .. }
    ));

    // Another facility cannot revoke the clinic's device, in the clinic's chain or in its own.
    let chain = w.chain(&b1, a1.facility);
    let revoke_a2 = DeviceChange::Revoke {
        device: a2.device_id(),
    };
    let theirs = PushItem::Approve {
        link: DeviceLink::sign(
            &b1,
            a1.facility,
            chain.last(),
            revoke_a2.clone(),
            w.now_ms(),
        ),
        sealed_pseudonym: vec![],
    };
    assert_eq!(
        rejected(&w.push_one(&b1, theirs)),
        Some(ErrorCode::Forbidden)
    );
    let b_chain = w.chain(&b1, b1.facility);
    let own = PushItem::Approve {
        link: DeviceLink::sign(&b1, b1.facility, b_chain.last(), revoke_a2, w.now_ms()),
        sealed_pseudonym: vec![],
    };
    let r = w.push_one(&b1, own);
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Forbidden, message } if message.contains("not a device of it")),
        "{r:?}"
    );
    assert!(matches!(
        w.ask(&a2, Request::ListDocuments).0,
        Response::Documents { .. }
    ));

    // The clinic's own current device revokes it: refused at once.
    assert_eq!(
        w.revoke_by_chain(&a1, &a2),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let r = w.ask(&a2, Request::ListDocuments).0;
    assert!(
        matches!(&r, Response::Error { code: ErrorCode::Revoked, message } if message.contains("this device has been revoked")),
        "{r:?}"
    );
    assert_eq!(
        rejected(&w.push_one(&a1, sealed(bundle(&a2, doc, 0, "after")))),
        Some(ErrorCode::Revoked)
    );
    assert_eq!(
        placed(&w.push_one(&b1, sealed(early))),
        ("duplicate", Some(Seq(1)))
    );
    let (_, notes) = w.push(&a1, vec![sealed(bundle(&a1, doc, 0, "new"))]);
    assert!(!targets(&notes).contains(&a2.device_id()));

    // Every facility verifies the revocation in the chain itself; the relay's word is not needed.
    let dir = w.directory(&b1);
    assert_eq!(
        dir.device_status(&a2.device_id()),
        DeviceStatus::Former(a1.facility)
    );
    assert!(dir.is_current(&a1.device_id()));
    let facilities = w.relay.store().facilities().expect("facilities");
    assert!(facilities[0].devices[1].revoked);
}

#[test]
fn only_owners_change_members_and_a_document_keeps_an_owner() {
    let Referral {
        mut w,
        a1,
        b1,
        hq,
        doc,
        create,
        ..
    } = referral();
    let c1 = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);

    let by_writer = w.push_one(
        &b1,
        op(after(
            &b1,
            &create,
            set_member(c1.facility, Some(Role::Reader)),
        )),
    );
    assert_eq!(rejected(&by_writer), Some(ErrorCode::Forbidden));

    let add = after(&a1, &create, set_member(c1.facility, Some(Role::Reader)));
    let (results, notes) = w.push(&a1, vec![op(add.clone())]);
    assert_eq!(
        results,
        vec![PushResult::Accepted {
            seq: None,
            log: None
        }]
    );
    assert!(
        targets(&notes).contains(&c1.device_id()),
        "the added facility is told"
    );
    assert_eq!(
        w.push_one(&a1, op(add.clone())),
        PushResult::Duplicate {
            seq: None,
            log: None
        }
    );
    assert!(matches!(w.pull(&c1, doc, 0), Response::Bundles { .. }));

    // An operation made against an older head (another owner's change crossed it) is stale.
    let crossed = after(&a1, &create, set_member(hq.facility, None));
    let r = w.push_one(&a1, op(crossed));
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Stale, message } if message.contains("does not follow")),
        "{r:?}"
    );

    let orphan = w.push_one(
        &a1,
        op(after(
            &a1,
            &add,
            set_member(a1.facility, Some(Role::Writer)),
        )),
    );
    assert_eq!(rejected(&orphan), Some(ErrorCode::Conflict));
    let remove_self = w.push_one(&a1, op(after(&a1, &add, set_member(a1.facility, None))));
    assert_eq!(rejected(&remove_self), Some(ErrorCode::Conflict));

    // With a second owner, the first may step down; removing HQ takes its access away.
    let promote = after(&a1, &add, set_member(b1.facility, Some(Role::Owner)));
    assert_eq!(
        w.push_one(&a1, op(promote.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let demote = after(&a1, &promote, set_member(a1.facility, Some(Role::Writer)));
    assert_eq!(
        w.push_one(&a1, op(demote.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let remove = after(&b1, &demote, set_member(hq.facility, None));
    assert_eq!(
        w.push_one(&b1, op(remove.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert_eq!(code(&w.pull(&hq, doc, 0)), Some(ErrorCode::NotMember));
    let Response::Ops { ops, total, .. } = w.ask(&c1, Request::GetOps { doc, from: 0 }).0 else {
        panic!("ops")
    };
    assert_eq!(total, 5);
    let view = membership::replay(&ops, &w.directory(&c1), Point::Pulled)
        .view
        .expect("replays");
    assert_eq!(view.head, remove.hash());
    assert_eq!(view.role_of(a1.facility), Some(Role::Writer));
    assert_eq!(view.role_of(hq.facility), None);

    // A document cannot be created twice, nor with a member the authority never certified.
    assert_eq!(
        w.push_one(&a1, op(create.clone())),
        PushResult::Duplicate {
            seq: None,
            log: None
        },
        "the same Create again is harmless"
    );
    let again =
        DocOp::sign(&a1, a1.facility, doc, AT_MS, None, create_body(vec![], 2)).expect("sign");
    assert_eq!(
        rejected(&w.push_one(&a1, op(again))),
        Some(ErrorCode::Conflict)
    );
    let ghost = Member {
        facility: FacilityId::from_random_bytes([1; 16]),
        role: Role::Reader,
    };
    let r = w.push_one(
        &a1,
        op(DocOp::create(&a1, a1.facility, AT_MS, create_body(vec![ghost], 3)).expect("create")),
    );
    assert!(
        matches!(&r, PushResult::Rejected { code: ErrorCode::Conflict, message } if message.contains("no certificate")),
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
        doc,
        create,
        ..
    } = referral();
    let recipients: Vec<(DeviceId, String)> = [&a1, &b1].iter().map(|d| recipient(d)).collect();
    let g0 = KeyGrant::seal(&a1, a1.facility, doc, Epoch(0), &key(0), &recipients).expect("grant");
    assert_eq!(
        w.push_one(&a1, grant(g0.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    assert_eq!(
        w.push_one(&a1, grant(g0.clone())),
        PushResult::Duplicate {
            seq: None,
            log: None
        }
    );

    let skip = w.push_one(&a1, op(after(&a1, &create, rotate(2))));
    assert_eq!(rejected(&skip), Some(ErrorCode::Stale));
    let by_reader = w.push_one(&hq, op(after(&hq, &create, rotate(1))));
    assert_eq!(rejected(&by_reader), Some(ErrorCode::Forbidden));
    let early = w.push_one(&b1, sealed(bundle(&b1, doc, 1, "too early")));
    assert_eq!(rejected(&early), Some(ErrorCode::Stale));

    let next = after(&a1, &create, rotate(1));
    let (results, notes) = w.push(&a1, vec![op(next.clone())]);
    assert_eq!(
        results,
        vec![PushResult::Accepted {
            seq: None,
            log: None
        }]
    );
    assert!(notes.iter().all(|n| matches!(
        n.request,
        Request::Notify {
            epoch: Epoch(1),
            ..
        }
    )));
    assert_eq!(
        w.push_one(&a1, op(next.clone())),
        PushResult::Duplicate {
            seq: None,
            log: None
        }
    );
    // A writer rotating at the same moment from the same head is told it is stale.
    let crossed = DocOp::sign(
        &b1,
        b1.facility,
        doc,
        AT_MS + 1,
        Some(create.hash()),
        rotate(1),
    )
    .expect("sign");
    assert_eq!(
        rejected(&w.push_one(&b1, op(crossed))),
        Some(ErrorCode::Stale)
    );

    let g1 = KeyGrant::seal(&a1, a1.facility, doc, Epoch(1), &key(1), &recipients).expect("grant");
    assert_eq!(
        w.push_one(&a1, grant(g1.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let outsider = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);
    let leak = KeyGrant::seal(
        &a1,
        a1.facility,
        doc,
        Epoch(1),
        &key(1),
        &[recipient(&outsider)],
    )
    .expect("grant");
    assert_eq!(
        rejected(&w.push_one(&a1, grant(leak))),
        Some(ErrorCode::Forbidden)
    );
    let future =
        KeyGrant::seal(&a1, a1.facility, doc, Epoch(2), &key(1), &recipients).expect("grant");
    assert_eq!(
        rejected(&w.push_one(&a1, grant(future))),
        Some(ErrorCode::Stale)
    );
    assert!(matches!(
        w.push_one(&b1, sealed(bundle(&b1, doc, 1, "ok"))),
        PushResult::Accepted { .. }
    ));

    let Response::KeyGrants { grants, .. } = w.ask(&hq, Request::GetKeyGrants { doc }).0 else {
        panic!("grants")
    };
    assert_eq!(grants, vec![g0, g1]);
    let opened = grants[1].open(&b1).expect("b1 opens its grant");
    assert_eq!(opened.seed(), key(1).seed());
    assert_eq!(
        opened.commitment(),
        key(1).commitment(),
        "the key is the one the NewEpoch committed to"
    );

    // Any writer, not only the owner, may start the next epoch.
    assert_eq!(
        w.push_one(&b1, op(after(&b1, &next, rotate(2)))),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let Response::Documents { docs } = w.ask(&a1, Request::ListDocuments).0 else {
        panic!("documents")
    };
    assert_eq!((docs[0].epoch, docs[0].ops), (Epoch(2), 3));
}

#[test]
fn every_answer_carries_the_generation_of_the_relays_store() {
    let mut w = World::new();
    let a1 = w.enrol(1, "港診療所", FacilityRole::Clinic);
    let generation = w.relay.generation();
    assert_eq!(
        Store::open(&w.data())
            .expect("open")
            .generation()
            .expect("generation"),
        generation
    );
    let frames = [
        (
            a1.device_id(),
            protocol::encode_request(&Request::ListDocuments),
        ),
        (
            device(9).device_id(),
            protocol::encode_request(&Request::ListDocuments),
        ),
        (a1.device_id(), b"not cbor".to_vec()),
    ];
    for (peer, frame) in frames {
        let (bytes, _) = w.relay.handle(peer, &frame, w.now);
        let (got, _) = protocol::decode_response_frame(&bytes).expect("decodes");
        assert_eq!(got, Some(generation));
    }
    // Another relay's store has another generation; this one keeps its own across restarts.
    assert_ne!(World::new().relay.generation(), generation);
    let w = w.reopen(|_| {});
    assert_eq!(w.relay.generation(), generation);
}

#[test]
fn after_a_rollback_an_offer_names_what_the_relay_lacks_and_devices_restore_it() {
    let Referral {
        mut w, a1, b1, doc, ..
    } = referral();
    let e: Vec<Envelope> = (1..=3)
        .map(|i| bundle(&a1, doc, 0, &format!("支援経過 {i}")))
        .collect();
    assert_eq!(
        placed(&w.push_one(&a1, sealed(e[0].clone()))),
        ("accepted", Some(Seq(1)))
    );

    // The operator backs the relay up, the relay takes two more bundles, then the backup is restored.
    let backup = w.tmp.path().join("backup");
    let mut w = w.reopen(|data| copy_dir(data, &backup));
    let (results, _) = w.push(&a1, vec![sealed(e[1].clone()), sealed(e[2].clone())]);
    assert_eq!(placed(&results[1]), ("accepted", Some(Seq(3))));
    let mut w = w.reopen(|data| {
        std::fs::remove_dir_all(data).expect("remove");
        copy_dir(&backup, data);
    });
    let Response::Bundles { head, .. } = w.pull(&b1, doc, 0) else {
        panic!("pull")
    };
    assert_eq!(head, Seq(1), "the head fell below the devices' cursor");

    // A device offers what it holds: the relay names the bundles it lost.
    let version = w.relay.store().directory_version().expect("version");
    let offer = |have: Vec<BundleId>| Request::Offer {
        doc,
        directory_version: version,
        have,
        ops: vec![],
        grants: vec![],
    };
    let ids: Vec<BundleId> = e.iter().map(Envelope::id).collect();
    let Response::Exchange { want, items, .. } = w.ask(&a1, offer(ids.clone())).0 else {
        panic!("exchange")
    };
    assert_eq!(want, ids[1..].to_vec());
    assert!(items.is_empty(), "the relay sends nothing back on an offer");

    // It pushes them again: nothing acknowledged is lost while any device holds it.
    let (results, _) = w.push(&a1, vec![sealed(e[1].clone()), sealed(e[2].clone())]);
    assert_eq!(
        results.iter().map(placed).collect::<Vec<_>>(),
        vec![("accepted", Some(Seq(2))), ("accepted", Some(Seq(3)))]
    );
    let Response::Exchange { want, .. } = w.ask(&b1, offer(ids.clone())).0 else {
        panic!("exchange")
    };
    assert!(want.is_empty());

    // Offers are for members, and bounded.
    let c1 = w.enrol(8, "ケアプランセンター", FacilityRole::CareOffice);
    assert_eq!(code(&w.ask(&c1, offer(ids)).0), Some(ErrorCode::NotMember));
    let flood = vec![BundleId::of_bytes(b"x"); OFFER_IDS_MAX + 1];
    let (r, _) = w.relay.handle_request(a1.device_id(), offer(flood), w.now);
    assert_eq!(code(&r), Some(ErrorCode::TooLarge));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("a name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

#[test]
fn everything_acknowledged_survives_reopening_and_no_secret_reaches_the_relays_disk() {
    const MARKER: &str = "MARKER-患者氏名-柏崎太郎";
    let Referral {
        mut w,
        a1,
        a2,
        b1,
        doc,
        ..
    } = referral();
    let e = bundle(&a1, doc, 0, MARKER);
    assert_eq!(
        placed(&w.push_one(&a1, sealed(e.clone()))),
        ("accepted", Some(Seq(1)))
    );
    let recipients: Vec<(DeviceId, String)> = [&a1, &b1].iter().map(|d| recipient(d)).collect();
    let g = KeyGrant::seal(&a1, a1.facility, doc, Epoch(0), &key(0), &recipients).expect("grant");
    assert_eq!(
        w.push_one(&a1, grant(g)),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let data = w.data();
    let mut w = w.reopen(|_| {});

    // What the relay must never be able to read: the plaintext, the document key, the pseudonym
    // keys (sealed by the authority and by an approving device), the invite secrets.
    let mut forbidden: Vec<(String, Vec<u8>)> = vec![
        ("plaintext".into(), MARKER.as_bytes().to_vec()),
        ("document key".into(), key(0).seed().to_vec()),
    ];
    let keys = PseudonymKeys::from_plain(&a1.pseudonym, FacilityRole::Clinic).expect("keys");
    for sector in keys.sectors() {
        let k = keys.key(sector).expect("held");
        forbidden.push((format!("{sector} pseudonym key"), k.to_vec()));
    }
    assert_eq!(a2.pseudonym, a1.pseudonym);
    for s in &w.secrets_issued {
        forbidden.push(("invite secret".into(), s.to_vec()));
    }
    let mut files = vec![];
    collect_files(&data, &mut files);
    assert!(files.iter().any(|p| p.ends_with("node.db")));
    for f in &files {
        let bytes = std::fs::read(f).expect("read");
        for (what, secret) in &forbidden {
            assert!(
                !bytes
                    .windows(secret.len())
                    .any(|win| win == secret.as_slice()),
                "{} holds the {what}",
                f.display()
            );
        }
    }

    let Response::Bundles { items, head, .. } = w.pull(&b1, doc, 0) else {
        panic!("pull")
    };
    assert_eq!((head, items.len()), (Seq(1), 1));
    assert_eq!(items[0].envelope, e);
    assert_eq!(
        placed(&w.push_one(&a1, sealed(e))),
        ("duplicate", Some(Seq(1)))
    );
    assert!(w.directory(&b1).is_current(&a2.device_id()));
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
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
fn operators_list_facilities_and_invite_codes_carry_the_relay_and_the_authority() {
    let Referral { mut w, a1, a2, .. } = referral();
    let relay = w.relay_id();
    let addr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}");
    let lan = format!("/ip4/192.0.2.10/tcp/4001/p2p/{relay}");
    w.relay
        .store_mut()
        .set_listen_addrs(&[addr.clone(), lan.clone()], w.now)
        .expect("addrs");
    let issued = w.invite_facility("ケアプランセンター", FacilityRole::CareOffice);
    let decoded = InviteCode::decode(&issued.encode()).expect("decode");
    assert_eq!(decoded, issued);
    assert_eq!(
        (decoded.relay, decoded.authority, decoded.deployment),
        (relay, w.authority_key(), w.deployment())
    );
    assert_eq!(
        decoded.addrs,
        vec![lan, addr],
        "non-loopback addresses first"
    );
    assert_eq!(
        decoded.invite,
        InviteFor::NewFacility {
            name: "ケアプランセンター".into(),
            role: FacilityRole::CareOffice
        }
    );
    assert_eq!(decoded.expires_at_ms, w.now_ms() + 72 * 3_600_000);
    assert_eq!(decoded.secret.len(), 32);

    // A name that is taken, or waits on an open invite, is refused.
    for name in ["港診療所", "ケアプランセンター"] {
        let r = w.relay.store_mut().issue_facility_invite(
            [0x99; 32],
            name,
            FacilityRole::Clinic,
            w.now,
            Duration::from_secs(60),
        );
        assert!(
            matches!(r, Err(musubi_sync_node::StoreError::NameTaken(_))),
            "{r:?}"
        );
    }

    let list = w.relay.store().facilities().expect("facilities");
    let names: Vec<&str> = list.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, vec!["港診療所", "柏崎総合病院", "災害対策本部"]);
    assert_eq!(
        list[0].devices.iter().map(|d| d.device).collect::<Vec<_>>(),
        vec![a1.device_id(), a2.device_id()]
    );
    let dir = w.directory(&a1);
    assert_eq!(
        list[0].safety_number,
        dir.facility(a1.facility).expect("listed").safety_number,
        "the operator reads the same safety number the facilities verify"
    );
    assert_eq!(
        w.relay
            .store()
            .find_facility(&a1.facility.to_string())
            .expect("by id")
            .name,
        "港診療所"
    );
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
    use musubi_crdt::protocol::Generation;
    use musubi_transport::libp2p::request_response::{self, Message, OutboundRequestId};
    use musubi_transport::libp2p::swarm::SwarmEvent;
    use musubi_transport::libp2p::{Multiaddr, PeerId, Swarm};
    use musubi_transport::{Behaviour, BehaviourEvent, build_swarm};

    /// A facility device speaking `/musubi/sync/1` to the relay.
    struct Client {
        swarm: Swarm<Behaviour>,
        relay: PeerId,
        notified: Vec<Request>,
        /// The generation the last answer carried.
        generation: Option<Generation>,
    }

    impl Client {
        async fn connect(secrets: &DeviceSecrets, addr: &Multiaddr, relay: PeerId) -> Self {
            let mut swarm = build_swarm(
                secrets.keypair().clone(),
                musubi_transport::Node::Facility {
                    lan_discovery: false,
                },
            )
            .expect("swarm");
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
                generation: None,
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
                } => {
                    let (generation, response) =
                        protocol::decode_response_frame(&response).expect("response decodes");
                    self.generation = generation;
                    Some((request_id, response))
                }
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
        /// The next notification other than a directory change (each join notifies every
        /// connected device of the new directory version).
        async fn notification(&mut self) -> Request {
            let wait = async {
                loop {
                    while self.notified.is_empty() {
                        let event = self.swarm.select_next_some().await;
                        self.on_event(event);
                    }
                    let note = self.notified.remove(0);
                    if !matches!(note, Request::NotifyDirectory { .. }) {
                        break note;
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(20), wait)
                .await
                .expect("a notification within 20 s")
        }
    }

    fn join_request(who: &DeviceSecrets, code: &InviteCode) -> Request {
        Request::Join {
            request: Box::new(JoinRequest::make(
                code,
                who,
                "受付PC",
                ms(SystemTime::now()),
            )),
        }
    }

    fn doc_create(author: &DeviceSecrets, facility: FacilityId, members: Vec<Member>) -> DocOp {
        DocOp::create(
            author,
            facility,
            ms(SystemTime::now()),
            create_body(members, 7),
        )
        .expect("create")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connected_members_are_notified_of_new_bundles_over_the_wire() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("relay");
        let adir = tmp.path().join("authority");
        let authority = AuthorityDir::init(&adir, "柏崎市", PASSPHRASE, LOG_N).expect("authority");
        let mut store =
            Store::init(&data, authority.public(), None, SystemTime::now()).expect("init");
        let relay = store.relay_device().expect("relay").0;
        let generation = store.generation().expect("generation");
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let mut invite = |secret: [u8; 32], name: &str| {
            let code = store
                .issue_facility_invite(secret, name, FacilityRole::Clinic, now, hour)
                .expect("invite");
            authority
                .record_invite(&AuthorityInvite {
                    secret,
                    name: name.into(),
                    role: FacilityRole::Clinic,
                    expires_at_ms: code.expires_at_ms,
                })
                .expect("record");
            code
        };
        let ia = invite([1; 32], "港診療所");
        let ib = invite([2; 32], "柏崎総合病院");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let config = musubi_sync_node::Config {
            print_listen_addrs: false,
            ..Default::default()
        };
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("addr");
        let server = tokio::spawn(musubi_sync_node::serve_until(
            vec![listen],
            store,
            Some(unlock(&adir)),
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
        let Response::Joined { facility: fa, .. } = ca.ask(&join_request(&a1, &ia)).await else {
            panic!("join a")
        };
        assert_eq!(
            ca.generation,
            Some(generation),
            "answers carry the generation"
        );
        let Response::Joined { facility: fb, .. } = cb.ask(&join_request(&b1, &ib)).await else {
            panic!("join b")
        };
        assert_eq!(
            code(&cb.ask_raw(b"not cbor".to_vec()).await),
            Some(ErrorCode::Malformed)
        );
        assert_eq!(cb.generation, Some(generation));

        let create = doc_create(
            &a1,
            fa,
            vec![Member {
                facility: fb,
                role: Role::Writer,
            }],
        );
        let doc = create.doc;
        let items = vec![op(create), sealed(bundle_as(&a1, fa, doc, 0, "紹介状"))];
        let Response::Pushed { results } = ca.ask(&Request::Push { items }).await else {
            panic!("push")
        };
        assert_eq!(placed(&results[1]), ("accepted", Some(Seq(1))));
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

    /// `musubi-node`, allowed the cheap scrypt work factor these tests wrap keys with.
    fn node() -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_musubi-node"));
        cmd.env(musubi_crdt::crypto::WEAK_KDF_FOR_TESTS_ENV, "1");
        cmd
    }

    fn run_ok(cmd: &mut Command, what: &str) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_binary_enrols_through_the_authority_and_keeps_every_acknowledged_bundle_through_sigkill()
     {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("relay");
        let adir = tmp.path().join("authority");
        let pass = tmp.path().join("passphrase");
        std::fs::write(&pass, format!("{PASSPHRASE}\n")).expect("passphrase file");
        run_ok(
            node()
                .args(["authority", "init", "--authority"])
                .arg(&adir)
                .args([
                    "--deployment",
                    "柏崎市",
                    "--scrypt-log-n",
                    "10",
                    "--passphrase-file",
                ])
                .arg(&pass),
            "authority init",
        );
        let authority_key = AuthorityDir::open(&adir).expect("authority").public().key;
        run_ok(
            node()
                .args(["init", "--data"])
                .arg(&data)
                .arg("--authority")
                .arg(&adir),
            "init",
        );
        let again = node()
            .args(["init", "--data"])
            .arg(&data)
            .arg("--authority")
            .arg(&adir)
            .output()
            .expect("init again");
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

        // Serve without the authority: new facilities wait for `musubi-node approve`.
        let (mut child, addr) = spawn_serve(&data);
        let relay = match addr.iter().last() {
            Some(musubi_transport::libp2p::multiaddr::Protocol::P2p(p)) => p,
            _ => panic!("the address ends in /p2p/PEERID: {addr}"),
        };
        let gone = node()
            .args(["invite", "--data"])
            .arg(&data)
            .args(["--facility", "港診療所"])
            .output()
            .expect("invite --facility");
        assert!(!gone.status.success());
        assert!(
            String::from_utf8_lossy(&gone.stderr).contains("musubi device invite"),
            "another device of a facility is invited at the facility"
        );
        let text = run_ok(
            node()
                .args(["invite", "--data"])
                .arg(&data)
                .arg("--authority")
                .arg(&adir)
                .args(["--name", "港診療所", "--role", "clinic", "--expires", "10m"]),
            "invite",
        );
        assert_eq!(text.lines().count(), 1, "invite prints one line");
        let code = InviteCode::decode(&text).expect("the printed code decodes");
        assert_eq!(code.relay.0, relay);
        assert_eq!(code.authority, authority_key);
        assert!(
            code.addrs.contains(&addr.to_string()),
            "{:?} lacks {addr}",
            code.addrs
        );

        let a1 = device(1);
        let mut ca = Client::connect(&a1, &code.addrs[0].parse().expect("addr"), relay).await;
        let r = ca.ask(&join_request(&a1, &code)).await;
        assert!(matches!(r, Response::JoinPending { .. }), "{r:?}");
        let approved = run_ok(
            node()
                .args(["approve", "--json", "--data"])
                .arg(&data)
                .arg("--authority")
                .arg(&adir)
                .arg("--passphrase-file")
                .arg(&pass),
            "approve",
        );
        let json: serde_json::Value = serde_json::from_str(&approved).expect("json");
        assert_eq!(json["approved"][0]["name"], "港診療所");
        assert_eq!(json["approved"][0]["device"], a1.device_id().to_string());
        let Response::Joined { facility: fa, .. } = ca.ask(&join_request(&a1, &code)).await else {
            panic!("join after approval")
        };
        assert_eq!(fa, code.facility());
        let list = run_ok(
            node().args(["facilities", "--json", "--data"]).arg(&data),
            "facilities",
        );
        let json: serde_json::Value = serde_json::from_str(&list).expect("json");
        assert_eq!(json[0]["name"], "港診療所");
        assert_eq!(json[0]["devices"][0]["device"], a1.device_id().to_string());

        let create = doc_create(&a1, fa, vec![]);
        let doc = create.doc;
        let Response::Pushed { results } = ca
            .ask(&Request::Push {
                items: vec![op(create)],
            })
            .await
        else {
            panic!("create")
        };
        assert_eq!(
            results,
            vec![PushResult::Accepted {
                seq: None,
                log: None
            }]
        );
        // Push bundles one by one; kill the relay while more are in flight.
        let mut acked = Vec::new();
        for i in 0..12 {
            let item = sealed(bundle_as(&a1, fa, doc, 0, &format!("支援経過 {i}")));
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
            assert_eq!(placed(r), ("accepted", Some(Seq(i as u64 + 1))));
            assert!(
                items.iter().any(|p| p.seq == Seq(i as u64 + 1)),
                "acknowledged bundle {} is missing",
                i + 1
            );
        }
        assert!(
            !data.join("logs").exists(),
            "serve writes no log file into DATA: its logs go to stderr (journald keeps them)"
        );
    }
}

/// A member (here the HQ, a reader) pushes grants as large as the rules let it: each names the
/// hospital's device and the most other recipients (devices nobody enrolled), for the new epoch the
/// clinic just started, and pads its sealed key to the bound, until they fill more than one
/// `KeyGrants` frame. The key the clinic grants the hospital still reaches it: grants naming the
/// caller come first, newest epoch first, and among them those of the facility that started the
/// epoch.
#[test]
fn a_member_cannot_crowd_a_devices_new_key_out_of_its_grants() {
    use musubi_crdt::limits::{
        FRAME_BYTES_MAX, GRANT_RECIPIENTS_MAX, GRANT_SEALED_BYTES_BASE,
        GRANT_SEALED_BYTES_PER_RECIPIENT,
    };
    let Referral {
        mut w,
        a1,
        b1,
        hq,
        doc,
        create,
        ..
    } = referral();
    // A laptop of the hospital is lost: the clinic rotates.
    let next = after(&a1, &create, rotate(1));
    assert_eq!(
        w.push_one(&a1, op(next)),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let nobody: Vec<DeviceId> = std::iter::once(b1.device_id())
        .chain((1..GRANT_RECIPIENTS_MAX as u32).map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            DeviceSecrets::from_seeds(seed, seed).device_id()
        }))
        .collect();
    let sealed_max =
        GRANT_SEALED_BYTES_BASE + GRANT_SEALED_BYTES_PER_RECIPIENT * GRANT_RECIPIENTS_MAX;
    let mut pushed = 0usize;
    let mut n = 0u32;
    // Past what the relay collects of one rank of the caller's grants before ranking them.
    while pushed < 4 * musubi_sync_node::relay::KEY_GRANTS_RESPONSE_BYTES_MAX + FRAME_BYTES_MAX {
        let batch: Vec<PushItem> = (0..24)
            .map(|_| {
                n += 1;
                let mut g =
                    KeyGrant::seal(&hq, hq.facility, doc, Epoch(1), &key(1), &[recipient(&hq)])
                        .expect("grant");
                g.recipients = nobody.clone();
                g.sealed.resize(sealed_max, 0);
                g.sealed[..4].copy_from_slice(&n.to_le_bytes());
                g.signature = hq.sign(crypto::domain::KEY_GRANT, &g.signed_bytes());
                pushed += g.sealed.len() + 32 * nobody.len();
                grant(g)
            })
            .collect();
        let (results, _) = w.push(&hq, batch);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, PushResult::Accepted { .. })),
            "{:?}",
            results.first()
        );
    }

    // The clinic grants the new key after the flood.
    let g1 = KeyGrant::seal(
        &a1,
        a1.facility,
        doc,
        Epoch(1),
        &key(1),
        &[recipient(&a1), recipient(&b1)],
    )
    .expect("grant");
    assert_eq!(
        w.push_one(&a1, grant(g1.clone())),
        PushResult::Accepted {
            seq: None,
            log: None
        }
    );
    let Response::KeyGrants { grants, .. } = w.ask(&b1, Request::GetKeyGrants { doc }).0 else {
        panic!("grants")
    };
    assert!(
        grants.len() < n as usize,
        "the padded grants fill more than a frame ({} of {n} served)",
        grants.len()
    );
    assert!(grants.contains(&g1), "the hospital's new key is served");
    assert_eq!(
        grants
            .iter()
            .filter(|g| g.epoch == Epoch(1))
            .find_map(|g| g.open(&b1).ok())
            .map(|k| k.commitment()),
        Some(key(1).commitment()),
        "the hospital opens the new key from what it was served"
    );
}
