//! The facility engine: keys, the encrypted local store, documents, membership and key maintenance.
//!
//! Every edit becomes an Automerge change, sealed into a bundle with the document's current epoch
//! key, stored and queued in one transaction before the call returns (nothing lives only in memory).
//! Reading a document decrypts its bundles with the keys this device was granted.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::{ActorId, AutoCommit, ChangeHash};
use musubi_crdt::bundle::{BundleError, Envelope, Payload};
use musubi_crdt::crypto::{self, CryptoError, DeviceSecrets, DocumentKey};
use musubi_crdt::directory::{Directory, SignedDirectory};
use musubi_crdt::ids::{
    DeploymentId, DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, Role,
};
use musubi_crdt::limits::BUNDLE_CHANGES_BYTES_MAX;
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member, OpError};
use musubi_crdt::protocol::{DocumentInfo, PushItem};
use serde::{Deserialize, Serialize};

use crate::store::{Origin, Store, StoreError};

/// Bundles applied at load beyond which a fresh local snapshot is sealed and stored.
pub const SNAPSHOT_AFTER_BUNDLES: usize = 64;
/// Bytes of changes applied at load beyond which a fresh local snapshot is sealed and stored
/// (a few large bundles cost as much to apply as many small ones).
pub const SNAPSHOT_AFTER_BYTES: usize = 64 * 1024;
/// Change bytes handed to Automerge in one `load_incremental` call when loading (64 MiB).
pub const LOAD_BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest local snapshot accepted when opening one, in bytes (256 MiB).
pub const SNAPSHOT_BYTES_MAX: usize = 256 * 1024 * 1024;

/// The file holding the device's passphrase-wrapped secrets (age scrypt).
pub const KEY_FILE: &str = "device.age";

/// Errors a facility user can meet; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// `init` on a directory that already holds a facility.
    #[error("{} already holds a Musubi facility; use another --data directory", .0.display())]
    AlreadyInitialised(PathBuf),
    /// A command on a directory without a facility.
    #[error("{} holds no Musubi facility; run `musubi init --data {} --name NAME` first", .0.display(), .0.display())]
    NotInitialised(PathBuf),
    /// The passphrase does not unwrap the device key.
    #[error("wrong passphrase for this facility's device key")]
    WrongPassphrase,
    /// A command that needs enrolment before `join`.
    #[error(
        "this device has not joined a deployment yet; run `musubi join --data DIR INVITE_CODE` with a code from the relay operator"
    )]
    NotEnrolled,
    /// `join` on an enrolled device.
    #[error("this device already belongs to facility {0}")]
    AlreadyEnrolled(String),
    /// No facility of that id or exact name in the directory.
    #[error(
        "no facility {0:?} in the directory (check `musubi facilities`, or run `musubi sync --once` to refresh it)"
    )]
    UnknownFacility(String),
    /// No such document here.
    #[error("no document {0} at this facility (run `musubi sync --once` if it was just sent)")]
    UnknownDocument(String),
    /// The device holds no key for a document yet.
    #[error("this device has no key for document {0} yet; run `musubi sync --once` to fetch it")]
    NoKey(DocumentId),
    /// Only owners may change membership.
    #[error("only the owner facility of a document can change its members")]
    NotOwner,
    /// Readers cannot edit.
    #[error("this facility is a reader of document {0} and cannot change it")]
    ReadOnly(DocumentId),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Crypto failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Bundle handling failed.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Operation or grant handling failed.
    #[error(transparent)]
    Op(#[from] OpError),
    /// Automerge refused the document data.
    #[error("document data is damaged: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    /// A domain document did not validate.
    #[error(transparent)]
    Document(Box<musubi_crdt::documents::DocumentError>),
    /// A FHIR Bundle could not be imported or exported.
    #[error("FHIR: {0}")]
    Fhir(Box<musubi_crdt::documents::referral_fhir::FhirError>),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

// The large errors are boxed so every `Result<_, EngineError>` stays small (clippy::result_large_err).
impl From<automerge::AutomergeError> for EngineError {
    fn from(e: automerge::AutomergeError) -> Self {
        EngineError::Automerge(Box::new(e))
    }
}

impl From<musubi_crdt::documents::DocumentError> for EngineError {
    fn from(e: musubi_crdt::documents::DocumentError) -> Self {
        EngineError::Document(Box::new(e))
    }
}

impl From<musubi_crdt::documents::referral_fhir::FhirError> for EngineError {
    fn from(e: musubi_crdt::documents::referral_fhir::FhirError) -> Self {
        EngineError::Fhir(Box::new(e))
    }
}

/// Result of engine calls.
pub type Result<T> = std::result::Result<T, EngineError>;

/// What joining a deployment recorded (public data only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enrolment {
    /// The deployment.
    pub deployment: DeploymentId,
    /// This device's facility.
    pub facility: FacilityId,
    /// Its name.
    pub facility_name: String,
    /// Its role.
    pub role: FacilityRole,
    /// The relay's device id (trusted signer of the directory).
    pub relay: DeviceId,
    /// The relay's multiaddrs.
    pub relay_addrs: Vec<String>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Random bytes from the OS-seeded CSPRNG (the engine is where randomness enters; the core takes it as input).
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::fill(&mut b);
    b
}

/// A document loaded for reading or editing.
pub struct Loaded {
    /// The relay's (or local) view of the document.
    pub info: DocumentInfo,
    /// The Automerge document, with a fresh actor for this process.
    pub doc: AutoCommit,
    /// Heads before any edit of this process.
    pub heads: Vec<ChangeHash>,
    /// Bundles that could not be decrypted (no key yet for their epoch).
    pub unreadable: usize,
}

/// An open facility device.
pub struct Engine {
    dir: PathBuf,
    pub(crate) store: Store,
    pub(crate) secrets: DeviceSecrets,
}

impl Engine {
    /// Creates a facility device in `dir`: new device keys wrapped by `passphrase` (scrypt work factor `log_n`).
    pub fn init(dir: &Path, name: &str, passphrase: &str, log_n: u8) -> Result<Engine> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            return Err(EngineError::AlreadyInitialised(dir.to_owned()));
        }
        fs::create_dir_all(dir).map_err(|source| EngineError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let secrets = DeviceSecrets::from_seeds(random(), random());
        let wrapped = secrets.wrap(passphrase, log_n)?;
        write_private(&key_path, &wrapped)?;
        let store = Store::open(dir)?;
        store.set_meta("name", name.as_bytes())?;
        Ok(Engine {
            dir: dir.to_owned(),
            store,
            secrets,
        })
    }

    /// Opens the facility device in `dir`, unwrapping its keys with `passphrase`.
    pub fn open(dir: &Path, passphrase: &str) -> Result<Engine> {
        let key_path = dir.join(KEY_FILE);
        let wrapped = match fs::read(&key_path) {
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::NotInitialised(dir.to_owned()));
            }
            Err(source) => {
                return Err(EngineError::Io {
                    path: key_path,
                    source,
                });
            }
        };
        let secrets = DeviceSecrets::unwrap(&wrapped, passphrase)
            .map_err(|_| EngineError::WrongPassphrase)?;
        let store = Store::open(dir)?;
        Ok(Engine {
            dir: dir.to_owned(),
            store,
            secrets,
        })
    }

    /// A second handle on this unlocked device: the same keys, its own store connection.
    ///
    /// For a process that runs the sync loop beside user commands (the desktop app), without
    /// asking for the passphrase again. The store is the only shared state, as between processes.
    ///
    /// Errors: [`EngineError::Store`] when the store cannot be opened.
    pub fn try_clone(&self) -> Result<Engine> {
        Ok(Engine {
            dir: self.dir.clone(),
            store: Store::open(&self.dir)?,
            secrets: self.secrets.clone(),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.secrets.device_id()
    }

    /// The device secrets (for the transport's keypair).
    pub fn secrets(&self) -> &DeviceSecrets {
        &self.secrets
    }

    /// The local store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The local store, mutably.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// The name given at `init`.
    pub fn local_name(&self) -> Result<String> {
        Ok(self
            .store
            .meta("name")?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    }

    /// The enrolment, or [`EngineError::NotEnrolled`].
    pub fn enrolment(&self) -> Result<Enrolment> {
        self.store
            .meta_cbor("enrolment")?
            .ok_or(EngineError::NotEnrolled)
    }

    /// Records a successful join.
    pub fn record_enrolment(
        &self,
        enrolment: &Enrolment,
        directory: &SignedDirectory,
    ) -> Result<()> {
        self.store.set_meta_cbor("enrolment", enrolment)?;
        self.store.set_meta_cbor("directory", directory)?;
        Ok(())
    }

    /// The deployment's secret for pseudonymous ids (HMAC-SHA256 key of card identities, DESIGN
    /// invariant 7), received at enrolment. Errors: [`EngineError::NotEnrolled`].
    pub fn pseudonym_secret(&self) -> Result<[u8; 32]> {
        let bytes = self
            .store
            .meta("pseudonym_secret")?
            .ok_or(EngineError::NotEnrolled)?;
        bytes
            .try_into()
            .map_err(|_| EngineError::Store(StoreError::Corrupt("pseudonym secret length".into())))
    }

    /// The pseudonymous id of a card identity (`domain` separates card kinds), as 64 hex digits.
    pub fn pseudonym(&self, domain: &str, identity: &[u8]) -> Result<String> {
        Ok(hex::encode(crypto::pseudonym(
            &self.pseudonym_secret()?,
            domain,
            identity,
        )))
    }

    /// The directory as last synced (verified against the enrolled relay).
    pub fn directory(&self) -> Result<Directory> {
        let enrolment = self.enrolment()?;
        let signed: SignedDirectory = self
            .store
            .meta_cbor("directory")?
            .ok_or(EngineError::NotEnrolled)?;
        signed
            .verify(&enrolment.relay)
            .map_err(|e| EngineError::Store(StoreError::Corrupt(format!("stored directory: {e}"))))
    }

    /// Stores a newer directory if it verifies against the enrolled relay; returns whether it was newer.
    pub fn update_directory(&self, signed: &SignedDirectory) -> Result<bool> {
        let enrolment = self.enrolment()?;
        let Ok(new) = signed.verify(&enrolment.relay) else {
            tracing::warn!("ignoring a directory not signed by the enrolled relay");
            return Ok(false);
        };
        let old = self.directory().ok().map(|d| d.version).unwrap_or(0);
        if new.version <= old {
            return Ok(false);
        }
        self.store.set_meta_cbor("directory", signed)?;
        Ok(true)
    }

    /// Finds a facility in the directory by id or exact name.
    pub fn find_facility(&self, id_or_name: &str) -> Result<musubi_crdt::directory::FacilityEntry> {
        self.directory()?
            .find(id_or_name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownFacility(id_or_name.to_owned()))
    }

    /// The document keys this device holds, by epoch (several per epoch only after a rotation race).
    pub fn keys(&self, doc: DocumentId) -> Result<BTreeMap<Epoch, Vec<DocumentKey>>> {
        let me = self.device_id();
        let mut out: BTreeMap<Epoch, Vec<DocumentKey>> = BTreeMap::new();
        for grant in self.store.grants(doc)? {
            if !grant.recipients.contains(&me) {
                continue;
            }
            match grant.open(&self.secrets) {
                Ok(key) => {
                    let keys = out.entry(grant.epoch).or_default();
                    if !keys.iter().any(|k| k.seed() == key.seed()) {
                        keys.push(key);
                    }
                }
                Err(e) => {
                    tracing::warn!(%doc, epoch = %grant.epoch, "cannot open a key grant: {e}")
                }
            }
        }
        Ok(out)
    }

    /// The newest epoch this device holds a key for, per document (documents without a key are absent,
    /// so a sync session keeps asking for their grants).
    pub fn key_epochs(&self) -> Result<Vec<(DocumentId, Epoch)>> {
        let me = self.device_id();
        let mut out = Vec::new();
        for row in self.store.documents(None)? {
            let newest = self
                .store
                .grants(row.info.id)?
                .iter()
                .filter(|g| g.recipients.contains(&me))
                .map(|g| g.epoch)
                .max();
            if let Some(e) = newest {
                out.push((row.info.id, e));
            }
        }
        Ok(out)
    }

    /// Resolves a document id given in full.
    pub fn document_info(&self, id: &str) -> Result<DocumentInfo> {
        let doc: DocumentId = id
            .parse()
            .map_err(|_| EngineError::UnknownDocument(id.to_owned()))?;
        Ok(self
            .store
            .document(doc)?
            .ok_or_else(|| EngineError::UnknownDocument(id.to_owned()))?
            .info)
    }

    /// Decrypts and loads a document: its sealed local snapshot (if any), then every bundle stored since.
    ///
    /// When more than [`SNAPSHOT_AFTER_BUNDLES`] bundles had to be applied, a new snapshot is sealed to
    /// this device's age recipient and stored, so the next load is quick.
    pub fn load(&self, doc: DocumentId) -> Result<Loaded> {
        let info = self
            .store
            .document(doc)?
            .ok_or_else(|| EngineError::UnknownDocument(doc.to_string()))?
            .info;
        let keys = self.keys(doc)?;
        if keys.is_empty() {
            return Err(EngineError::NoKey(doc));
        }
        let actor = ActorId::from(random::<16>().to_vec());
        let (mut am, upto) = match self.store.snapshot(doc)? {
            Some((upto, sealed)) => {
                match crypto::open_with(self.secrets.age_identity(), &sealed, SNAPSHOT_BYTES_MAX)
                    .ok()
                    .and_then(|plain| AutoCommit::load(&plain).ok())
                {
                    Some(am) => (am.with_actor(actor), upto),
                    None => {
                        tracing::warn!(%doc, "ignoring an unreadable local snapshot; rebuilding from bundles");
                        (AutoCommit::new().with_actor(actor), 0)
                    }
                }
            }
            None => (AutoCommit::new().with_actor(actor), 0),
        };
        let mut unreadable = 0;
        let mut applied = 0usize;
        let mut applied_bytes = 0usize;
        let mut last = upto;
        // Changes go to Automerge in batches: each `load_incremental` call costs time in proportion
        // to the document, so one call per bundle made loading N new bundles quadratic in N.
        let mut batch: Vec<u8> = Vec::new();
        for (rowid, row) in self.store.bundles_after(doc, upto)? {
            match open_any(&keys, &row.envelope) {
                Some(Payload::Changes { data }) => {
                    batch.extend_from_slice(&data);
                    applied_bytes += data.len();
                    if batch.len() >= LOAD_BATCH_BYTES_MAX {
                        am.load_incremental(&batch)?;
                        batch.clear();
                    }
                    applied += 1;
                }
                Some(Payload::Attachment { .. }) => {}
                None => unreadable += 1,
            }
            last = rowid;
        }
        if !batch.is_empty() {
            am.load_incremental(&batch)?;
        }
        // A snapshot must cover exactly the rows up to `last`: skip it while some row is unreadable
        // (its key may arrive later and the row must then still be applied).
        if (applied > SNAPSHOT_AFTER_BUNDLES || applied_bytes > SNAPSHOT_AFTER_BYTES)
            && unreadable == 0
        {
            let recipient = self.secrets.age_identity().to_public();
            match crypto::seal_to(&[recipient], &am.save()) {
                Ok(sealed) => self.store.put_snapshot(doc, last, &sealed)?,
                Err(e) => tracing::warn!(%doc, "could not seal a local snapshot: {e}"),
            }
        }
        let heads = am.get_heads();
        Ok(Loaded {
            info,
            doc: am,
            heads,
            unreadable,
        })
    }

    /// Reads an attachment bundle's payload.
    pub fn attachment(
        &self,
        doc: DocumentId,
        bundle: &musubi_crdt::ids::BundleId,
    ) -> Result<Option<Payload>> {
        let keys = self.keys(doc)?;
        Ok(self
            .store
            .bundles(doc)?
            .into_iter()
            .find(|b| &b.id == bundle)
            .and_then(|b| open_any(&keys, &b.envelope)))
    }

    fn current_key(&self, doc: DocumentId) -> Result<(Epoch, DocumentKey)> {
        let keys = self.keys(doc)?;
        let (epoch, ks) = keys
            .into_iter()
            .next_back()
            .ok_or(EngineError::NoKey(doc))?;
        let key = ks.into_iter().next().ok_or(EngineError::NoKey(doc))?;
        Ok((epoch, key))
    }

    fn my_role(&self, info: &DocumentInfo) -> Result<Option<Role>> {
        let me = self.enrolment()?.facility;
        Ok(info
            .members
            .iter()
            .find(|m| m.facility == me)
            .map(|m| m.role))
    }

    /// Seals the changes made to `loaded.doc` since it was loaded into bundles, stores and queues them.
    ///
    /// Returns how many bundles were written (0 when nothing changed).
    pub fn commit(&mut self, loaded: &mut Loaded) -> Result<usize> {
        let doc_id = loaded.info.id;
        if !self.my_role(&loaded.info)?.is_some_and(Role::can_write) {
            return Err(EngineError::ReadOnly(doc_id));
        }
        loaded.doc.commit();
        let mut changes = loaded.doc.get_changes(&loaded.heads);
        if changes.is_empty() {
            return Ok(0);
        }
        let (epoch, key) = self.current_key(doc_id)?;
        let facility = self.enrolment()?.facility;
        let mut written = 0;
        let mut chunk: Vec<u8> = Vec::new();
        let mut chunks = Vec::new();
        for change in changes.iter_mut() {
            let bytes = change.bytes();
            if !chunk.is_empty() && chunk.len() + bytes.len() > BUNDLE_CHANGES_BYTES_MAX {
                chunks.push(std::mem::take(&mut chunk));
            }
            chunk.extend_from_slice(&bytes);
        }
        chunks.push(chunk);
        for data in chunks {
            let env = Envelope::seal(
                &self.secrets,
                facility,
                doc_id,
                epoch,
                &key,
                &Payload::Changes { data },
            )?;
            self.store.add_local_bundle(&env, now_ms())?;
            written += 1;
        }
        loaded.heads = loaded.doc.get_heads();
        Ok(written)
    }

    /// Stores an attachment as its own bundle; returns its bundle id (the reference the document keeps).
    pub fn add_attachment_bundle(
        &mut self,
        doc: DocumentId,
        name: &str,
        media_type: &str,
        data: Vec<u8>,
    ) -> Result<musubi_crdt::ids::BundleId> {
        let (epoch, key) = self.current_key(doc)?;
        let facility = self.enrolment()?.facility;
        let payload = Payload::Attachment {
            name: name.to_owned(),
            media_type: media_type.to_owned(),
            data,
        };
        let env = Envelope::seal(&self.secrets, facility, doc, epoch, &key, &payload)?;
        self.store.add_local_bundle(&env, now_ms())?;
        Ok(env.id())
    }

    /// Creates a document owned by this facility with further `members`, built by `build`, queued for the relay.
    pub fn create_document(
        &mut self,
        kind: DocumentKind,
        members: Vec<Member>,
        build: impl FnOnce(&mut AutoCommit) -> Result<()>,
    ) -> Result<DocumentId> {
        let enrolment = self.enrolment()?;
        let doc = DocumentId::from_random_bytes(random());
        let key = DocumentKey::from_seed(random());
        let mut all = vec![Member {
            facility: enrolment.facility,
            role: Role::Owner,
        }];
        all.extend(
            members
                .into_iter()
                .filter(|m| m.facility != enrolment.facility),
        );
        let op = DocOp::sign(
            &self.secrets,
            enrolment.facility,
            doc,
            now_ms(),
            DocOpBody::Create {
                kind,
                members: all[1..].to_vec(),
            },
        )?;
        let info = DocumentInfo {
            id: doc,
            kind,
            members: all,
            epoch: Epoch(0),
            head: Default::default(),
        };
        let recipients = member_devices(&self.directory()?, &info);
        let grant = KeyGrant::seal(
            &self.secrets,
            enrolment.facility,
            doc,
            Epoch(0),
            &key,
            &recipients,
        )?;
        self.store.put_document(&info)?;
        self.store.put_grant(&grant)?;
        self.store.put_op(&op)?;
        self.store.queue(&PushItem::Op { op })?;
        self.store.queue(&PushItem::Grant { grant })?;
        let mut loaded = Loaded {
            info,
            doc: AutoCommit::new().with_actor(ActorId::from(random::<16>().to_vec())),
            heads: vec![],
            unreadable: 0,
        };
        build(&mut loaded.doc)?;
        self.commit(&mut loaded)?;
        Ok(doc)
    }

    /// Adds `facility` with `role`, or removes it (`role: None`, which also rotates the key). Owner only.
    pub fn share(&mut self, doc: DocumentId, facility: &str, role: Option<Role>) -> Result<()> {
        let enrolment = self.enrolment()?;
        let target = self.find_facility(facility)?;
        let mut info = self
            .store
            .document(doc)?
            .ok_or_else(|| EngineError::UnknownDocument(doc.to_string()))?
            .info;
        if self.my_role(&info)? != Some(Role::Owner) {
            return Err(EngineError::NotOwner);
        }
        let op = DocOp::sign(
            &self.secrets,
            enrolment.facility,
            doc,
            now_ms(),
            DocOpBody::SetMember {
                facility: target.id,
                role,
            },
        )?;
        info.members.retain(|m| m.facility != target.id);
        if let Some(role) = role {
            info.members.push(Member {
                facility: target.id,
                role,
            });
        }
        self.store.put_document(&info)?;
        self.store.put_op(&op)?;
        self.store.queue(&PushItem::Op { op })?;
        self.maintain()?;
        Ok(())
    }

    /// Takes the relay's list of documents, keeping local epochs and members where this device has
    /// operations the relay has not acknowledged yet.
    pub fn update_documents(&mut self, docs: &[DocumentInfo]) -> Result<()> {
        let pending_docs: BTreeSet<DocumentId> = self
            .store
            .pending(0)?
            .into_iter()
            .filter(|r| matches!(r.item, PushItem::Op { .. } | PushItem::Grant { .. }))
            .map(|r| r.item.doc())
            .collect();
        for d in docs {
            match self.store.document(d.id)? {
                Some(local) if pending_docs.contains(&d.id) => {
                    let mut info = local.info;
                    info.head = info.head.max(d.head);
                    info.epoch = info.epoch.max(d.epoch);
                    self.store.put_document(&info)?;
                }
                Some(local) => {
                    let mut info = d.clone();
                    info.epoch = info.epoch.max(local.info.epoch);
                    self.store.put_document(&info)?;
                }
                None => self.store.put_document(d)?,
            }
        }
        Ok(())
    }

    /// Keeps keys where they belong; returns how many items it queued.
    ///
    /// - Owner: when a device that holds the current epoch's key is revoked, or its facility is no
    ///   longer a member, starts a new epoch whose key only current member devices receive.
    /// - Anyone holding a key: grants it to current member devices that lack it (a new laptop of a member).
    pub fn maintain(&mut self) -> Result<usize> {
        let Ok(enrolment) = self.enrolment() else {
            return Ok(0);
        };
        // One directory (signature checked once) and one key decryption per document per pass.
        let Ok(dir) = self.directory() else {
            return Ok(0);
        };
        let mut queued = 0;
        for row in self.store.documents(None)? {
            let mut info = row.info;
            let Some(my_role) = info
                .members
                .iter()
                .find(|m| m.facility == enrolment.facility)
                .map(|m| m.role)
            else {
                continue;
            };
            let mut keys = self.keys(info.id)?;
            if keys.is_empty() {
                continue;
            }
            let should = member_devices(&dir, &info);
            let should_ids: BTreeSet<DeviceId> = should.iter().map(|(d, _)| *d).collect();
            let mut grants = self.store.grants(info.id)?;
            let held_epoch = keys.keys().next_back().copied().unwrap_or_default();
            if my_role == Role::Owner && held_epoch >= info.epoch {
                let current_recipients: BTreeSet<DeviceId> = grants
                    .iter()
                    .filter(|g| g.epoch == held_epoch)
                    .flat_map(|g| g.recipients.iter().copied())
                    .collect();
                if current_recipients.iter().any(|d| !should_ids.contains(d)) {
                    let epoch = Epoch(held_epoch.0 + 1);
                    let key = DocumentKey::from_seed(random());
                    let op = DocOp::sign(
                        &self.secrets,
                        enrolment.facility,
                        info.id,
                        now_ms(),
                        DocOpBody::NewEpoch { epoch },
                    )?;
                    let grant = KeyGrant::seal(
                        &self.secrets,
                        enrolment.facility,
                        info.id,
                        epoch,
                        &key,
                        &should,
                    )?;
                    self.store.put_grant(&grant)?;
                    self.store.put_op(&op)?;
                    self.store.queue(&PushItem::Op { op })?;
                    self.store.queue(&PushItem::Grant {
                        grant: grant.clone(),
                    })?;
                    grants.push(grant);
                    keys.entry(epoch).or_default().push(key);
                    info.epoch = epoch;
                    self.store.put_document(&info)?;
                    queued += 2;
                    tracing::info!(doc = %info.id, %epoch, "rotated the document key");
                }
            }
            for (epoch, ks) in keys {
                let covered: BTreeSet<DeviceId> = grants
                    .iter()
                    .filter(|g| g.epoch == epoch)
                    .flat_map(|g| g.recipients.iter().copied())
                    .collect();
                let missing: Vec<(DeviceId, String)> = should
                    .iter()
                    .filter(|(d, _)| !covered.contains(d))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                let Some(key) = ks.first() else { continue };
                let grant = KeyGrant::seal(
                    &self.secrets,
                    enrolment.facility,
                    info.id,
                    epoch,
                    key,
                    &missing,
                )?;
                self.store.put_grant(&grant)?;
                self.store.queue(&PushItem::Grant { grant })?;
                queued += 1;
            }
        }
        Ok(queued)
    }
}

/// What taking foreign items (from a LAN peer or a file) did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    /// Operations, grants and bundles that were new here.
    pub new: u64,
    /// Items already held.
    pub known: u64,
    /// Items of documents this facility is not a member of, left out (a file may carry documents
    /// for other facilities; the relay would refuse them from a non-member).
    pub skipped: u64,
    /// Items refused, with the reason.
    pub refused: Vec<String>,
}

impl Engine {
    /// Takes signed items that did not come from the relay: verifies each (signature, author in the
    /// directory, the author's facility allowed by the document's operations), stores what is new,
    /// and (with `queue_for_relay`) queues it so whichever device reaches the relay first uploads it.
    ///
    /// Operations come before grants and bundles so a document this device never saw is known first.
    pub fn import_items(
        &mut self,
        items: Vec<PushItem>,
        origin: Origin,
        queue_for_relay: bool,
    ) -> Result<ImportReport> {
        let dir = self.directory()?;
        let mut report = ImportReport::default();
        let device_ok = |author: &DeviceId, facility: FacilityId| {
            dir.device(author)
                .is_some_and(|(f, d)| f.id == facility && !f.revoked && !d.revoked)
        };
        let (mut ops, mut rest): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|i| matches!(i, PushItem::Op { .. }));
        rest.sort_by_key(|i| matches!(i, PushItem::Bundle { .. }));
        let me = self.enrolment()?.facility;
        let mut touched = BTreeSet::new();
        let mut verified: BTreeMap<DocumentId, Vec<DocOp>> = BTreeMap::new();
        for item in ops.drain(..) {
            let PushItem::Op { op } = item else { continue };
            if op.verify().is_err() || !device_ok(&op.author, op.facility) {
                report.refused.push(format!(
                    "operation on {}: signature or author does not verify",
                    op.doc
                ));
                continue;
            }
            verified.entry(op.doc).or_default().push(op);
        }
        // A document this device does not hold is taken only if its operations make this facility a member.
        let mut foreign: BTreeSet<DocumentId> = BTreeSet::new();
        for (doc, new_ops) in &verified {
            if self.store.document(*doc)?.is_some() {
                continue;
            }
            let mut all = self.store.ops(*doc)?;
            all.extend(new_ops.iter().cloned());
            if derive_info(&all).is_some_and(|i| !i.members.iter().any(|m| m.facility == me)) {
                foreign.insert(*doc);
            }
        }
        for op in verified.into_values().flatten() {
            if foreign.contains(&op.doc) {
                report.skipped += 1;
                continue;
            }
            if self.store.put_op(&op)? {
                report.new += 1;
                touched.insert(op.doc);
                if queue_for_relay {
                    self.store.queue(&PushItem::Op { op })?;
                }
            } else {
                report.known += 1;
            }
        }
        for doc in touched {
            if let Some(info) = derive_info(&self.store.ops(doc)?) {
                match self.store.document(doc)? {
                    Some(local) => {
                        let mut merged = local.info;
                        merged.epoch = merged.epoch.max(info.epoch);
                        for m in info.members {
                            if !merged.members.iter().any(|x| x.facility == m.facility) {
                                merged.members.push(m);
                            }
                        }
                        self.store.put_document(&merged)?;
                    }
                    None => self.store.put_document(&info)?,
                }
            }
        }
        for item in rest {
            if self.store.document(item.doc())?.is_none() {
                report.skipped += 1;
                continue;
            }
            match item {
                PushItem::Grant { grant } => {
                    if grant.verify().is_err() || !device_ok(&grant.author, grant.facility) {
                        report.refused.push(format!(
                            "key grant of {}: signature or author does not verify",
                            grant.doc
                        ));
                    } else if self.store.put_grant(&grant)? {
                        report.new += 1;
                        if queue_for_relay {
                            self.store.queue(&PushItem::Grant { grant })?;
                        }
                    } else {
                        report.known += 1;
                    }
                }
                PushItem::Bundle { envelope } => {
                    let writer = self.store.document(envelope.doc)?.is_some_and(|d| {
                        d.info
                            .members
                            .iter()
                            .any(|m| m.facility == envelope.facility && m.role.can_write())
                    });
                    if envelope.check().is_err()
                        || envelope.verify_signature().is_err()
                        || !device_ok(&envelope.author, envelope.facility)
                        || !writer
                    {
                        report.refused.push(format!(
                            "bundle {} of {}: signature, author or membership does not verify",
                            envelope.id(),
                            envelope.doc
                        ));
                    } else if self.store.add_foreign_bundle(
                        &envelope,
                        origin,
                        queue_for_relay,
                        now_ms(),
                    )? {
                        report.new += 1;
                    } else {
                        report.known += 1;
                    }
                }
                PushItem::Op { .. } => {}
            }
        }
        Ok(report)
    }

    /// Everything this device holds of a document, as push items (operations, grants, bundles).
    pub fn export_items(&self, doc: DocumentId) -> Result<Vec<PushItem>> {
        let mut out: Vec<PushItem> = self
            .store
            .ops(doc)?
            .into_iter()
            .map(|op| PushItem::Op { op })
            .collect();
        out.extend(
            self.store
                .grants(doc)?
                .into_iter()
                .map(|grant| PushItem::Grant { grant }),
        );
        out.extend(
            self.store
                .bundles(doc)?
                .into_iter()
                .map(|b| PushItem::Bundle {
                    envelope: b.envelope,
                }),
        );
        Ok(out)
    }
}

/// A document's kind, members and epoch as its signed operations say (the relay applies the same rules).
///
/// `None` when no valid `Create` is among them. Operations by non-owners are ignored.
pub fn derive_info(ops: &[DocOp]) -> Option<DocumentInfo> {
    let create = ops
        .iter()
        .find(|o| matches!(o.body, DocOpBody::Create { .. }))?;
    let DocOpBody::Create { kind, members } = &create.body else {
        return None;
    };
    let mut info = DocumentInfo {
        id: create.doc,
        kind: *kind,
        members: std::iter::once(Member {
            facility: create.facility,
            role: Role::Owner,
        })
        .chain(
            members
                .iter()
                .copied()
                .filter(|m| m.facility != create.facility),
        )
        .collect(),
        epoch: Epoch(0),
        head: Default::default(),
    };
    let mut rest: Vec<&DocOp> = ops.iter().filter(|o| !std::ptr::eq(*o, create)).collect();
    rest.sort_by_key(|o| o.at_ms);
    for op in rest {
        let owner = info
            .members
            .iter()
            .any(|m| m.facility == op.facility && m.role == Role::Owner);
        if !owner {
            continue;
        }
        match &op.body {
            DocOpBody::SetMember { facility, role } => {
                info.members.retain(|m| m.facility != *facility);
                if let Some(role) = role {
                    info.members.push(Member {
                        facility: *facility,
                        role: *role,
                    });
                }
            }
            DocOpBody::NewEpoch { epoch } => info.epoch = info.epoch.max(*epoch),
            DocOpBody::Create { .. } => {}
        }
    }
    Some(info)
}

/// Current devices of the document's member facilities, with their age recipients.
fn member_devices(dir: &Directory, info: &DocumentInfo) -> Vec<(DeviceId, String)> {
    info.members
        .iter()
        .filter_map(|m| dir.facility(m.facility))
        .flat_map(|f| {
            f.current_devices()
                .map(|d| (d.device, d.age_recipient.clone()))
        })
        .collect()
}

fn open_any(keys: &BTreeMap<Epoch, Vec<DocumentKey>>, env: &Envelope) -> Option<Payload> {
    keys.get(&env.epoch)?.iter().find_map(|k| env.open(k).ok())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| EngineError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}
