//! The facility engine: keys, the encrypted local store, documents, membership and key maintenance.
//!
//! Every edit becomes an Automerge change, sealed into a bundle with the document's current epoch
//! key, stored and queued in one transaction before the call returns (nothing lives only in memory).
//! Reading a document decrypts its bundles with the keys this device was granted.
//!
//! Trust (DESIGN invariant 9): the directory is verified here against the authority pinned at join
//! and this device's [`Pins`]; each document's membership is replayed here from its signed operation
//! chain; every item that arrives, from the relay, a LAN peer or a file, passes the one admission
//! rule ([`musubi_crdt::membership::admit`]); a key grant is used only when its key matches the
//! epoch's commitment; and a key is sealed only to current devices of member facilities whose chain
//! verifies and whose root key is the one pinned.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::{ActorId, AutoCommit, ChangeHash};
use musubi_crdt::bundle::{BundleError, Envelope, Payload};
use musubi_crdt::changes;
use musubi_crdt::crypto::{
    self, CryptoError, DeviceSecrets, DocumentKey, PseudonymKeys, PseudonymSector,
};
use musubi_crdt::directory::{
    DeviceChange, DeviceLink, DeviceStatus, Devices, Directory, DirectoryError, FacilityEntry,
    FacilityRecord, Pins, SignedDirectory, Trust,
};
use musubi_crdt::ids::{
    DeploymentId, DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, Role,
};
use musubi_crdt::invite::{
    INVITE_SECRET_BYTES, InviteCode, InviteFor, InviteId, InviteRegistration, JoinRequest,
};
use musubi_crdt::limits::{
    BUNDLE_CHANGES_BYTES_MAX, INVITE_EXPIRES_SECS_MAX, LOAD_CHANGES_INFLATED_BYTES_MAX,
    PROVISIONAL_OPS_MAX,
};
use musubi_crdt::membership::{self, Membership, Point};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member, OpError};
use musubi_crdt::protocol::{DocumentInfo, ErrorCode, PushItem};
use serde::{Deserialize, Serialize};

use crate::store::{DeviceInviteRow, Origin, Store, StoreError};

/// Bundles applied at load beyond which a fresh local snapshot is sealed and stored.
pub const SNAPSHOT_AFTER_BUNDLES: usize = 64;
/// Bytes of changes applied at load beyond which a fresh local snapshot is sealed and stored
/// (a few large bundles cost as much to apply as many small ones).
pub const SNAPSHOT_AFTER_BYTES: usize = 64 * 1024;
/// Inflated change bytes handed to Automerge in one call when loading (64 MiB).
pub const LOAD_BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest local snapshot accepted when opening one, in bytes (256 MiB).
pub const SNAPSHOT_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Metadata key of this facility's pseudonym keys (one per sector its role works in, CBOR
/// [`PseudonymKeys`]), sealed to this device's age key.
const PSEUDONYM_KEYS_META: &str = "pseudonym_keys_sealed";
/// Metadata key under which stores written before sectors kept the deployment's secret itself,
/// sealed; it is replaced by the role's keys on first read.
const PSEUDONYM_SECRET_META: &str = "pseudonym_secret_sealed";
/// Metadata key under which stores written before it was sealed kept that secret in clear.
const PSEUDONYM_SECRET_CLEAR_META: &str = "pseudonym_secret";

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
    /// This facility's role holds no pseudonym key of that sector (the authority issues each
    /// sector's key only to the roles that work in it).
    #[error(
        "this facility (role {role}) holds no pseudonym key for {sector} cards; only the facilities that work with those cards can read them"
    )]
    NoPseudonymKey {
        /// The sector asked for.
        sector: PseudonymSector,
        /// This facility's role.
        role: FacilityRole,
    },
    /// Only owners may change membership.
    #[error("only the owner facility of a document can change its members")]
    NotOwner,
    /// The directory or an invite does not verify.
    #[error("{0}")]
    Trust(String),
    /// The safety number given does not match the facility's new root key.
    #[error(
        "the safety number {given} does not match facility {facility}'s new root key; read it again with the facility by phone"
    )]
    SafetyNumber {
        /// The facility.
        facility: String,
        /// What was given.
        given: String,
    },
    /// No current device of this facility has that id.
    #[error("{0} is not a current device of this facility (see the devices this facility lists)")]
    UnknownDevice(String),
    /// An invite's lifetime is zero or too long.
    #[error("an invite must expire after more than 0 seconds and at most {} days", INVITE_EXPIRES_SECS_MAX / 86_400)]
    InvalidExpiry,
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
    /// A value given is out of its range (the message says which and why).
    #[error("{0}")]
    Invalid(String),
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
/// Most relay addresses a device keeps (its invite's and those the relay named since).
pub const RELAY_ADDRS_MAX: usize = 32;

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
    /// The deployment authority's key, pinned at join (from the invite the person handed over).
    pub authority: DeviceId,
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

/// Whether this process may wrap new keys with a work factor below
/// [`crypto::PASSPHRASE_LOG_N_SAFE_MIN`]: only when a test harness sets
/// [`crypto::WEAK_KDF_FOR_TESTS_ENV`] to `1`.
pub fn weak_kdf_for_tests() -> bool {
    std::env::var(crypto::WEAK_KDF_FOR_TESTS_ENV).as_deref() == Ok("1")
}

/// A document loaded for reading or editing.
pub struct Loaded {
    /// The document's membership, from its verified operation chain.
    pub info: Membership,
    /// The Automerge document, with a fresh actor for this process.
    pub doc: AutoCommit,
    /// Heads before any edit of this process.
    pub heads: Vec<ChangeHash>,
    /// Bundles that could not be decrypted (no key yet for their epoch).
    pub unreadable: usize,
}

/// The pseudonymous id of a card identity under a sector's key, as 64 hex digits (what rosters and
/// staff records keep; see [`Engine::pseudonym`]).
pub fn pseudonym_hex(sector_key: &[u8; 32], domain: &str, identity: &[u8]) -> String {
    hex::encode(crypto::pseudonym(sector_key, domain, identity))
}

/// An open facility device.
pub struct Engine {
    dir: PathBuf,
    pub(crate) store: Store,
    pub(crate) secrets: DeviceSecrets,
    /// Outbox rows replaced (re-sealed or re-signed) since the driver last asked.
    retracted: BTreeSet<u64>,
    /// The staff member signed in (login), to whom audit entries are attributed.
    staff: Option<String>,
}

/// What a device's join came to.
#[derive(Clone, Debug)]
pub enum Joined {
    /// Enrolled.
    Enrolled(Box<Enrolment>),
    /// The join request waits for the inviter's approval (until `expires_at_ms`).
    Pending {
        /// When the invite expires, ms since the Unix epoch.
        expires_at_ms: u64,
    },
}

/// What checking join requests did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Approvals {
    /// Devices approved (their ids and names).
    pub approved: Vec<(String, String)>,
    /// Requests refused, with the reason.
    pub refused: Vec<String>,
}

impl Engine {
    /// Creates a facility device in `dir` (created if missing, made readable by its owner only,
    /// mode 0700): new device keys wrapped by `passphrase` (scrypt work factor `log_n`).
    ///
    /// The shells check `log_n` against [`crypto::check_work_factor`] with the test flag they read
    /// ([`weak_kdf_for_tests`]); here only the passphrase's length is checked, and the work
    /// factor's range when wrapping (an in-process simulation wraps keys cheaply on purpose).
    ///
    /// Errors: [`EngineError::AlreadyInitialised`]; a passphrase shorter than
    /// [`crypto::PASSPHRASE_CHARS_MIN`]; IO and store errors.
    pub fn init(dir: &Path, name: &str, passphrase: &str, log_n: u8) -> Result<Engine> {
        crypto::check_passphrase(passphrase)?;
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            return Err(EngineError::AlreadyInitialised(dir.to_owned()));
        }
        fs::create_dir_all(dir).map_err(|source| EngineError::Io {
            path: dir.to_owned(),
            source,
        })?;
        // The data directory is this device's alone: its database, key file and logs are read by
        // no other user of the machine (a shared reception PC).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
                EngineError::Io {
                    path: dir.to_owned(),
                    source,
                }
            })?;
        }
        let secrets = DeviceSecrets::from_seeds(random(), random());
        let wrapped = secrets.wrap(passphrase, log_n)?;
        write_private(&key_path, &wrapped)?;
        let store = Store::open(dir)?;
        store.set_meta("name", name.as_bytes())?;
        Ok(Engine {
            dir: dir.to_owned(),
            store,
            secrets,
            retracted: BTreeSet::new(),
            staff: None,
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
        let engine = Engine {
            dir: dir.to_owned(),
            store,
            secrets,
            retracted: BTreeSet::new(),
            staff: None,
        };
        engine.migrate_pseudonym_secret()?;
        Ok(engine)
    }

    /// A store from before pseudonym sectors holds the deployment's secret itself: it is replaced by
    /// this facility's sector keys when the device is first unlocked, not at its first card read.
    fn migrate_pseudonym_secret(&self) -> Result<()> {
        let legacy = self.store.meta(PSEUDONYM_SECRET_META)?.is_some()
            || self.store.meta(PSEUDONYM_SECRET_CLEAR_META)?.is_some();
        if legacy && self.store.meta(PSEUDONYM_KEYS_META)?.is_none() && self.enrolment().is_ok() {
            self.pseudonym_keys()?;
        }
        Ok(())
    }

    /// The staff member signed in (login), if any: audit entries name them.
    pub fn staff(&self) -> Option<&str> {
        self.staff.as_deref()
    }

    /// Sets who is signed in (`None` after sign-out). The shells call this once a sign-in succeeded.
    pub fn set_staff(&mut self, login: Option<String>) {
        self.staff = login;
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
            retracted: BTreeSet::new(),
            staff: None,
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

    /// Adds the addresses the relay says it can be reached at now ([`Event::RelayAddrs`], an
    /// unsigned hint) to the ones this device dials: each must parse as a multiaddr of at most
    /// 256 bytes, and one naming a peer must name the pinned relay. New ones go first; at most
    /// [`RELAY_ADDRS_MAX`] are kept. Returns whether the list changed.
    ///
    /// [`Event::RelayAddrs`]: musubi_crdt::sync::Event::RelayAddrs
    ///
    /// Errors: [`EngineError::NotEnrolled`]; store failures.
    pub fn learn_relay_addrs(&mut self, addrs: &[String]) -> Result<bool> {
        use musubi_transport::libp2p::Multiaddr;
        use musubi_transport::libp2p::multiaddr::Protocol;
        let mut enrolment = self.enrolment()?;
        let relay = enrolment.relay.0;
        let mut merged: Vec<String> = addrs
            .iter()
            .filter(|a| a.len() <= 256)
            .filter(|a| {
                a.parse::<Multiaddr>().is_ok_and(|m| match m.iter().last() {
                    Some(Protocol::P2p(p)) => p == relay,
                    _ => true,
                })
            })
            .take(RELAY_ADDRS_MAX)
            .cloned()
            .collect();
        for a in &enrolment.relay_addrs {
            if !merged.contains(a) {
                merged.push(a.clone());
            }
        }
        merged.truncate(RELAY_ADDRS_MAX);
        if merged == enrolment.relay_addrs {
            return Ok(false);
        }
        tracing::info!(addrs = ?merged, "the relay named addresses it can be reached at; dialling them from now on");
        enrolment.relay_addrs = merged;
        self.store.set_meta_cbor("enrolment", &enrolment)?;
        Ok(true)
    }

    /// Records a successful join: verifies the relay's directory against the authority pinned from
    /// the invite (this device must be a current device of its facility in it), opens the pseudonym
    /// keys the approver sealed to this device (only the sectors of the facility's role are kept,
    /// and they must match the check value its certificate names), and stores all three.
    ///
    /// Errors: [`EngineError::Trust`] when the directory does not verify or does not list this
    /// device, or the pseudonym keys are malformed or not the ones the authority certified.
    ///
    /// Returns the enrolment as recorded: the facility's name and role are the ones its certificate
    /// gives, whatever the relay said.
    pub fn record_enrolment(
        &self,
        enrolment: &Enrolment,
        directory: &SignedDirectory,
        sealed_pseudonym: &[u8],
    ) -> Result<Enrolment> {
        let (dir, pins) = directory
            .verify(
                &enrolment.relay,
                enrolment.deployment,
                &enrolment.authority,
                &Pins::default(),
            )
            .map_err(|e| {
                EngineError::Trust(format!("the relay's directory does not verify: {e}"))
            })?;
        if dir.device_status(&self.device_id()).current() != Some(enrolment.facility) {
            return Err(EngineError::Trust(
                "the directory does not list this device as a current device of its facility (the approval did not verify)"
                    .into(),
            ));
        }
        let mut enrolment = enrolment.clone();
        if let Some(f) = dir.facility(enrolment.facility) {
            enrolment.facility_name = f.name.clone();
            enrolment.role = f.role;
        }
        let plain = crypto::open_with(
            self.secrets.age_identity(),
            sealed_pseudonym,
            PseudonymKeys::PLAIN_BYTES_MAX,
        )
        .map_err(|_| {
            EngineError::Trust("the pseudonym keys were not sealed to this device".into())
        })?;
        let keys = PseudonymKeys::from_plain(&plain, enrolment.role)
            .map_err(|_| EngineError::Trust("the pseudonym keys are malformed".into()))?;
        // The keys must be the authority's: whoever sealed them (the relay passes them on, another
        // device of this facility seals them again) could have chosen others.
        if let Some(check) = dir
            .facility(enrolment.facility)
            .and_then(|f| f.pseudonym_check)
            && *check != keys.check()
        {
            return Err(EngineError::Trust(
                "the card-pseudonym keys sealed to this device are not the ones the authority certified for this facility; ask the authority's operator"
                    .into(),
            ));
        }
        self.keep_pseudonym_keys(&keys)?;
        self.store.set_meta_cbor("enrolment", &enrolment)?;
        self.store_directory(directory, &dir, &pins, 0)?;
        if let Ok(body) = directory.open(&enrolment.relay) {
            self.store
                .set_meta_cbor("directory_records", &body.facilities)?;
        }
        Ok(enrolment)
    }

    /// The relay's store was replaced (restored): the next directory it serves is taken whatever its
    /// version (its counter may have started again lower); pins and revocations stay.
    pub fn relay_restored(&mut self) -> Result<()> {
        let mut pins = self.pins()?;
        pins.version = 0;
        self.store.set_meta_cbor("pins", &pins)?;
        self.store.reset_cursors()?;
        Ok(())
    }

    fn store_directory(
        &self,
        signed: &SignedDirectory,
        dir: &Directory,
        pins: &Pins,
        revocation_version: u64,
    ) -> Result<()> {
        self.store.set_meta_cbor("directory", signed)?;
        self.store.set_meta_cbor("directory_view", dir)?;
        self.store.set_meta_cbor("pins", pins)?;
        if revocation_version > 0 {
            self.store
                .set_meta_cbor("revocation_version", &revocation_version)?;
        }
        Ok(())
    }

    /// This facility's pseudonym keys (HMAC-SHA256 keys of card identities, one per sector its role
    /// works in; DESIGN invariant 7), received at enrolment. Errors: [`EngineError::NotEnrolled`].
    ///
    /// They are kept sealed to this device's age key (`pseudonym_keys_sealed`), as staff records
    /// are: the store never holds them in clear. A store written before sectors held the
    /// deployment's secret itself (sealed, or in clear before that): on first read it is replaced
    /// by the keys of this facility's role, derived from it as the authority derives them.
    pub fn pseudonym_keys(&self) -> Result<PseudonymKeys> {
        let corrupt = || EngineError::Store(StoreError::Corrupt("pseudonym keys".into()));
        let role = self.enrolment()?.role;
        if let Some(sealed) = self.store.meta(PSEUDONYM_KEYS_META)? {
            let plain = crypto::open_with(
                self.secrets.age_identity(),
                &sealed,
                PseudonymKeys::PLAIN_BYTES_MAX,
            )?;
            return PseudonymKeys::from_plain(&plain, role).map_err(|_| corrupt());
        }
        let legacy = match self.store.meta(PSEUDONYM_SECRET_META)? {
            Some(sealed) => crypto::open_with(self.secrets.age_identity(), &sealed, 64)?,
            None => self
                .store
                .meta(PSEUDONYM_SECRET_CLEAR_META)?
                .ok_or(EngineError::NotEnrolled)?,
        };
        let secret: &[u8; 32] = legacy.as_slice().try_into().map_err(|_| corrupt())?;
        let keys = PseudonymKeys::for_role(secret, role);
        self.keep_pseudonym_keys(&keys)?;
        Ok(keys)
    }

    /// Stores `keys` sealed to this device, and removes the deployment's secret a store from before
    /// sectors held. For enrolment, and for tools that read cards on a device of their own.
    pub fn keep_pseudonym_keys(&self, keys: &PseudonymKeys) -> Result<()> {
        let sealed = crypto::seal_to(&[self.secrets.age_identity().to_public()], &keys.to_plain())?;
        self.store.set_meta(PSEUDONYM_KEYS_META, &sealed)?;
        if self.store.meta(PSEUDONYM_SECRET_META)?.is_some()
            || self.store.meta(PSEUDONYM_SECRET_CLEAR_META)?.is_some()
        {
            self.store
                .erase_meta(&[PSEUDONYM_SECRET_META, PSEUDONYM_SECRET_CLEAR_META])?;
        }
        Ok(())
    }

    /// This facility's key of `sector`. Errors: [`EngineError::NotEnrolled`],
    /// [`EngineError::NoPseudonymKey`] when its role was not issued that sector's key.
    pub fn pseudonym_key(&self, sector: PseudonymSector) -> Result<[u8; 32]> {
        let role = self.enrolment()?.role;
        self.pseudonym_keys()?
            .key(sector)
            .copied()
            .ok_or(EngineError::NoPseudonymKey { sector, role })
    }

    /// The sector of the cards this facility registers people by at its counter (evacuees at a
    /// shelter or HQ, patients at a clinic; none at a care office). Errors: [`EngineError::NotEnrolled`].
    pub fn resident_sector(&self) -> Result<Option<PseudonymSector>> {
        Ok(PseudonymSector::of_residents(self.enrolment()?.role))
    }

    /// The pseudonymous id of a card identity in `sector` (`domain` separates card kinds), as 64
    /// hex digits. Errors: as [`Engine::pseudonym_key`].
    pub fn pseudonym(
        &self,
        sector: PseudonymSector,
        domain: &str,
        identity: &[u8],
    ) -> Result<String> {
        Ok(pseudonym_hex(
            &self.pseudonym_key(sector)?,
            domain,
            identity,
        ))
    }

    /// The directory as this device verified it last.
    pub fn directory(&self) -> Result<Directory> {
        self.store
            .meta_cbor("directory_view")?
            .ok_or(EngineError::NotEnrolled)
    }

    /// The signed directory this device holds (what it hands LAN peers and writes into files).
    pub fn signed_directory(&self) -> Result<Option<SignedDirectory>> {
        Ok(self.store.meta_cbor("directory")?)
    }

    /// What this device remembers between directories (pinned roots, chains, revocations).
    pub fn pins(&self) -> Result<Pins> {
        Ok(self.store.meta_cbor("pins")?.unwrap_or_default())
    }

    /// The directory version at which the newest revocation this device knows of appeared (0: none).
    /// A LAN peer whose directory is older gets nothing but this device's directory.
    pub fn revocation_version(&self) -> Result<u64> {
        Ok(self.store.meta_cbor("revocation_version")?.unwrap_or(0))
    }

    /// Verifies a directory (from the relay, a LAN peer or a file) and takes it: merged with the
    /// view held before ([`Directory::merged`]), so a directory that is older, or leaves something
    /// out, adds what it has and takes nothing away. Returns whether anything was taken (`false`
    /// for the directory already held, or one that does not verify, which is logged and ignored).
    pub fn update_directory(&self, signed: &SignedDirectory) -> Result<bool> {
        let held = self.signed_directory()?;
        if held.as_ref() == Some(signed) {
            return Ok(false);
        }
        let pins = self.pins()?;
        let (dir, next, records) = match self.verify_directory(signed, &pins) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("ignoring a directory that does not verify: {e}");
                return Ok(false);
            }
        };
        for f in &dir.facilities {
            match &f.trust {
                Trust::Verified => {}
                Trust::RootChanged { .. } => tracing::warn!(
                    facility = %f.id, name = %f.name,
                    "the authority certified another root key for this facility; it gets no key until a person confirms its new safety number ({})",
                    f.safety_number
                ),
                Trust::ChainForked { reason } => tracing::warn!(
                    facility = %f.id, name = %f.name, "its device chain is not taken: {reason}"
                ),
            }
            for r in &f.refused {
                tracing::warn!(facility = %f.id, "{r}");
            }
        }
        for i in &dir.ignored {
            tracing::warn!(facility = %i.facility, name = %i.name, "left out of the directory: {}", i.reason);
        }
        let old_revocations = revocations(&self.directory().ok(), &pins);
        let new_revocations = revocations(&Some(dir.clone()), &next);
        let fresh: Vec<&DeviceId> = new_revocations.difference(&old_revocations).collect();
        let revocation_version = if fresh.is_empty() { 0 } else { dir.version };
        for d in fresh {
            tracing::info!(device = %d, "learned of a revocation");
            self.store.mark_revocation(&d.to_string())?;
        }
        // The signed directory handed to LAN peers and written into files is the newest one held.
        let newest = match &held {
            Some(h) if h.claimed_version() > signed.claimed_version() => h,
            _ => signed,
        };
        self.store_directory(newest, &dir, &next, revocation_version)?;
        self.store.set_meta_cbor("directory_records", &records)?;
        Ok(true)
    }

    /// Verifies `signed` against the pinned authority and `pins`, with the facility records this
    /// device verified before added where the relay's are behind ([`DirectoryBody::add_seen`]), and
    /// merges the result with the view held ([`Directory::merged`]). Returns the view, the pins and
    /// the records to keep.
    fn verify_directory(
        &self,
        signed: &SignedDirectory,
        pins: &Pins,
    ) -> std::result::Result<(Directory, Pins, Vec<FacilityRecord>), DirectoryError> {
        let enrolment = self
            .enrolment()
            .map_err(|e| DirectoryError::Malformed(e.to_string()))?;
        let seen: Vec<FacilityRecord> = self
            .store
            .meta_cbor("directory_records")
            .map_err(|e| DirectoryError::Malformed(e.to_string()))?
            .unwrap_or_default();
        let mut body = signed.open(&enrolment.relay)?;
        body.add_seen(&seen);
        let records = body.facilities.clone();
        let (dir, next) = body.verify(enrolment.deployment, &enrolment.authority, pins)?;
        Ok(match self.directory() {
            Ok(earlier) => (dir.merged(&earlier, &next), next, records),
            Err(_) => (dir, next, records),
        })
    }

    /// Accepts a facility's new root key after a person compared its safety number by phone:
    /// `safety_number` must be the one its current certificate gives.
    ///
    /// Errors: [`EngineError::UnknownFacility`], [`EngineError::SafetyNumber`].
    pub fn confirm_root(&mut self, facility: &str, safety_number: &str) -> Result<()> {
        let f = self.find_facility(facility)?;
        let given: String = safety_number
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if given != f.safety_number {
            return Err(EngineError::SafetyNumber {
                facility: f.name,
                given,
            });
        }
        let mut pins = self.pins()?;
        pins.confirm_root(f.id, f.root);
        let Some(signed) = self.signed_directory()? else {
            return Err(EngineError::NotEnrolled);
        };
        let (dir, next, _) = self
            .verify_directory(&signed, &pins)
            .map_err(|e: DirectoryError| EngineError::Trust(e.to_string()))?;
        self.store_directory(&signed, &dir, &next, 0)?;
        tracing::info!(facility = %f.id, name = %f.name, "new root key confirmed by a person");
        self.maintain()?;
        Ok(())
    }

    /// Finds a facility in the directory by id or exact name.
    pub fn find_facility(&self, id_or_name: &str) -> Result<FacilityEntry> {
        self.directory()?
            .find(id_or_name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownFacility(id_or_name.to_owned()))
    }

    /// The document keys this device may use, by epoch: keys granted to it whose key matches the
    /// epoch's commitment in the document's verified chain (a grant of any other key is ignored).
    pub fn keys(&self, doc: DocumentId) -> Result<BTreeMap<Epoch, Vec<DocumentKey>>> {
        let Some(row) = self.store.document(doc)? else {
            return Ok(BTreeMap::new());
        };
        let view = row.info;
        let mut out: BTreeMap<Epoch, Vec<DocumentKey>> = BTreeMap::new();
        for (epoch, key) in self.all_keys(doc)? {
            if view.commitment(epoch) != Some(key.commitment()) {
                tracing::warn!(%doc, %epoch, "ignoring a key grant whose key is not the one the document's operations commit to");
                continue;
            }
            let keys = out.entry(epoch).or_default();
            if !keys.iter().any(|k| k.seed() == key.seed()) {
                keys.push(key);
            }
        }
        Ok(out)
    }

    /// Every key granted to this device for `doc`, verified or not (only to open this device's own
    /// bundles again when they must be sealed anew).
    fn all_keys(&self, doc: DocumentId) -> Result<Vec<(Epoch, DocumentKey)>> {
        let me = self.device_id();
        let mut out = Vec::new();
        for grant in self.store.grants(doc)? {
            if !grant.recipients.contains(&me) {
                continue;
            }
            match grant.open(&self.secrets) {
                Ok(key) => out.push((grant.epoch, key)),
                Err(e) => {
                    tracing::warn!(%doc, epoch = %grant.epoch, "cannot open a key grant: {e}")
                }
            }
        }
        Ok(out)
    }

    /// The newest epoch this device holds a verified key for, per document (documents without a key
    /// are absent, so a sync session keeps asking for their grants).
    pub fn key_epochs(&self) -> Result<Vec<(DocumentId, Epoch)>> {
        let mut out = Vec::new();
        for row in self.store.documents(None)? {
            if let Some(e) = self.keys(row.info.id)?.keys().next_back() {
                out.push((row.info.id, *e));
            }
        }
        Ok(out)
    }

    /// Resolves a document id given in full.
    pub fn document_info(&self, id: &str) -> Result<Membership> {
        let doc: DocumentId = id
            .parse()
            .map_err(|_| EngineError::UnknownDocument(id.to_owned()))?;
        Ok(self
            .store
            .document(doc)?
            .ok_or_else(|| EngineError::UnknownDocument(id.to_owned()))?
            .info)
    }

    /// Runs `f` as one engine operation ([`Store::begin_operation`]): its writes commit together
    /// when it returns `Ok`, and are rolled back when it returns an error.
    ///
    /// A panic inside `f` (rolled back, then resumed), or a failed `COMMIT`, rolls back too, so the
    /// connection is never left inside a transaction that later operations would join.
    pub(crate) fn atomic<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let top = self.store.begin_operation()?;
        let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(out) => out,
            Err(panic) => {
                self.roll_back(top);
                std::panic::resume_unwind(panic);
            }
        };
        match &out {
            Ok(_) => {
                if let Err(e) = self.store.end_operation(top, true) {
                    self.roll_back(top);
                    return Err(e.into());
                }
            }
            Err(_) => self.roll_back(top),
        }
        out
    }

    /// Rolls back the operation [`Engine::atomic`] began.
    fn roll_back(&self, top: bool) {
        if let Err(e) = self.store.end_operation(top, false) {
            tracing::warn!("could not roll back a failed operation: {e}");
        }
    }

    /// The actor this device writes a document with in this process ([`changes::device_actor`]).
    fn actor(&self) -> ActorId {
        changes::device_actor(&self.device_id(), random())
    }

    /// Decrypts and loads a document: its sealed local snapshot (if any), then every bundle stored since.
    ///
    /// Each bundle's changes are decoded on their own ([`changes::decode_changes`]: bounded inflation
    /// and operation count, actor bound to the signing device); a bundle that fails is quarantined
    /// ([`Store::quarantine`]) and the document loads with everything else. When more than
    /// [`SNAPSHOT_AFTER_BUNDLES`] bundles had to be applied, a new snapshot is sealed to this device's
    /// age recipient and stored, so the next load is quick (a quarantined bundle is never in it).
    pub fn load(&self, doc: DocumentId) -> Result<Loaded> {
        let mut careful = false;
        loop {
            match self.try_load(doc, careful)? {
                Ok(loaded) => return Ok(loaded),
                // A bundle whose changes decoded but that Automerge would not apply: quarantined,
                // then the document is loaded again without it.
                Err(ApplyFailed::Bundle(env, reason)) => self.quarantine(&env, &reason)?,
                Err(ApplyFailed::Batch) => careful = true,
            }
        }
    }

    /// Looks again at the bundles quarantined on pull: one the admission rule now admits (the
    /// refusal came from a view of the document or directory that has since moved) is released,
    /// and its document's snapshot dropped so the next load applies it. Returns how many.
    pub fn recheck_quarantine(&mut self) -> Result<usize> {
        let quarantined = self.store.quarantined_pulled()?;
        if quarantined.is_empty() {
            return Ok(0);
        }
        let Ok(dir) = self.directory() else {
            return Ok(0);
        };
        let mut released = 0;
        for env in quarantined {
            let Some(row) = self.store.document(env.doc)? else {
                continue;
            };
            if membership::admit_bundle(&env, &row.info, &dir, Point::Pulled).is_ok() {
                self.atomic(|e| {
                    e.store.release(&env)?;
                    e.store.drop_snapshot(env.doc)?;
                    Ok(())
                })?;
                tracing::info!(doc = %env.doc, bundle = %env.id(), "released a quarantined bundle the rules now admit");
                released += 1;
            }
        }
        Ok(released)
    }

    /// Quarantines a bundle: kept, never applied, listed with its author.
    fn quarantine(&self, env: &Envelope, reason: &str) -> Result<()> {
        tracing::warn!(doc = %env.doc, bundle = %env.id(), author = %env.author, facility = %env.facility, "quarantined a bundle: {reason}");
        self.store.quarantine(env, None, reason, now_ms())?;
        Ok(())
    }

    /// One attempt of [`Engine::load`]: the loaded document, or what [`apply_batch`] refused.
    fn try_load(
        &self,
        doc: DocumentId,
        careful: bool,
    ) -> Result<std::result::Result<Loaded, ApplyFailed>> {
        let info = self
            .store
            .document(doc)?
            .ok_or_else(|| EngineError::UnknownDocument(doc.to_string()))?
            .info;
        let keys = self.keys(doc)?;
        if keys.is_empty() {
            return Err(EngineError::NoKey(doc));
        }
        let actor = self.actor();
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
        // Changes go to Automerge in batches: each call costs time in proportion to the document,
        // so one call per bundle made loading N new bundles quadratic in N.
        let mut batch: Vec<(Envelope, Vec<automerge::Change>)> = Vec::new();
        let mut blocked = Vec::new();
        // Inflated bytes of changes, in this batch and in this load: batches are cut by what
        // Automerge will hold, and a load takes at most `LOAD_CHANGES_INFLATED_BYTES_MAX`.
        let mut batch_bytes = 0usize;
        let mut load_bytes = 0usize;
        for (rowid, row) in self.store.bundles_after(doc, upto)? {
            match open_any(&keys, &row.envelope) {
                Some(Payload::Changes { data }) => {
                    match changes::decode_changes_by(
                        &data,
                        &row.envelope.author,
                        row.envelope.author == self.device_id(),
                    ) {
                        Ok(decoded) => {
                            let inflated: usize = decoded.iter().map(|c| c.raw_bytes().len()).sum();
                            if load_bytes + inflated > LOAD_CHANGES_INFLATED_BYTES_MAX {
                                self.quarantine(
                                    &row.envelope,
                                    &format!("the document's changes would exceed {LOAD_CHANGES_INFLATED_BYTES_MAX} bytes in one load"),
                                )?;
                            } else {
                                load_bytes += inflated;
                                batch_bytes += inflated;
                                applied_bytes += data.len();
                                batch.push((row.envelope, decoded));
                                applied += 1;
                            }
                        }
                        Err(e) => self.quarantine(&row.envelope, &e.to_string())?,
                    }
                    if batch_bytes >= LOAD_BATCH_BYTES_MAX {
                        let taken = std::mem::take(&mut batch);
                        if let Err(bad) = apply_batch(&mut am, taken, careful, &mut blocked) {
                            return Ok(Err(bad));
                        }
                        batch_bytes = 0;
                    }
                }
                Some(Payload::Attachment { .. }) => {}
                None => unreadable += 1,
            }
            last = rowid;
        }
        if let Err(bad) = apply_batch(&mut am, batch, careful, &mut blocked) {
            return Ok(Err(bad));
        }
        // Changes that wait for changes this device does not hold (a quarantined bundle they build
        // on, or one still on its way): the document shows what it can, and says so.
        let missing = am.get_missing_deps(&[]);
        if !missing.is_empty() || !blocked.is_empty() {
            tracing::warn!(%doc, missing = missing.len(), bundles = blocked.len(), "some changes wait for changes this device does not hold");
            self.store.set_meta_cbor(
                &format!("doc_warning:{doc}"),
                &format!(
                    "changes of this document wait for {} change(s) this device does not hold (quarantined, or not arrived yet); what they change is not shown",
                    missing.len() + blocked.len()
                ),
            )?;
        }
        // A snapshot must cover exactly the rows up to `last`: skip it while some row is unreadable
        // (its key may arrive later and the row must then still be applied) or waits unapplied.
        if (applied > SNAPSHOT_AFTER_BUNDLES || applied_bytes > SNAPSHOT_AFTER_BYTES)
            && unreadable == 0
            && blocked.is_empty()
        {
            let recipient = self.secrets.age_identity().to_public();
            match crypto::seal_to(&[recipient], &am.save()) {
                Ok(sealed) => self.store.put_snapshot(doc, last, &sealed)?,
                Err(e) => tracing::warn!(%doc, "could not seal a local snapshot: {e}"),
            }
        }
        let heads = am.get_heads();
        Ok(Ok(Loaded {
            info,
            doc: am,
            heads,
            unreadable,
        }))
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

    fn my_role(&self, info: &Membership) -> Result<Option<Role>> {
        let me = self.enrolment()?.facility;
        Ok(info
            .members
            .iter()
            .find(|m| m.facility == me)
            .map(|m| m.role))
    }

    /// Seals the changes made to `loaded.doc` since it was loaded into bundles, stores and queues them.
    ///
    /// Returns how many bundles were written (0 when nothing changed), all in one transaction.
    pub fn commit(&mut self, loaded: &mut Loaded) -> Result<usize> {
        let heads = loaded.heads.clone();
        let out = self.atomic(|e| e.commit_in(loaded));
        if out.is_err() {
            // Nothing was stored: the next commit seals these changes again.
            loaded.heads = heads;
        }
        out
    }

    /// [`Engine::commit`] together with its audit entry (`action` on the document, touching
    /// `fields`, by the staff member signed in), in one transaction: a change is stored only with
    /// the entry that names it, and an entry only with its change. Nothing written, no entry.
    ///
    /// Errors: as [`Engine::commit`], and the audit log's (then neither is stored).
    pub fn commit_recorded(
        &mut self,
        loaded: &mut Loaded,
        action: musubi_crdt::audit::AuditAction,
        fields: &[&str],
    ) -> Result<usize> {
        let heads = loaded.heads.clone();
        let doc = loaded.info.id;
        let out = self.atomic(|e| {
            let written = e.commit_in(loaded)?;
            if written > 0 {
                crate::audit::record(e, action, Some(doc), fields)?;
            }
            Ok(written)
        });
        if out.is_err() {
            loaded.heads = heads;
        }
        out
    }

    fn commit_in(&mut self, loaded: &mut Loaded) -> Result<usize> {
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
        let held = self.superseded(doc_id, epoch)?;
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
            self.store.add_local_bundle(&env, now_ms(), held)?;
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
        let held = self.superseded(doc, epoch)?;
        self.store.add_local_bundle(&env, now_ms(), held)?;
        Ok(env.id())
    }

    /// Whether `epoch` is older than the document's current epoch: this device knows of a rotation
    /// whose key has not reached it yet. A bundle sealed now is held back (kept here, never offered
    /// or exported) and sealed again when the key arrives, so nothing written after a revocation is
    /// readable with the revoked device's keys.
    fn superseded(&self, doc: DocumentId, epoch: Epoch) -> Result<bool> {
        Ok(self
            .store
            .document(doc)?
            .is_some_and(|r| epoch < r.info.epoch))
    }

    /// Creates a document owned by this facility with further `members`, built by `build`, queued
    /// for the relay: its signed `Create` (which fixes the document's id and commits to the first
    /// key), a grant of that key to every current device of the members, and the first changes.
    ///
    /// One transaction: a crash leaves either all of it or nothing.
    ///
    /// Errors: a member without a certificate; the engine's errors.
    pub fn create_document(
        &mut self,
        kind: DocumentKind,
        members: Vec<Member>,
        build: impl FnOnce(&mut AutoCommit) -> Result<()>,
    ) -> Result<DocumentId> {
        self.atomic(|e| e.create_document_in(kind, members, build))
    }

    fn create_document_in(
        &mut self,
        kind: DocumentKind,
        members: Vec<Member>,
        build: impl FnOnce(&mut AutoCommit) -> Result<()>,
    ) -> Result<DocumentId> {
        let enrolment = self.enrolment()?;
        let dir = self.directory()?;
        let key = DocumentKey::from_seed(random());
        let mut others: Vec<Member> = Vec::new();
        for m in members {
            if m.facility != enrolment.facility && !others.iter().any(|o| o.facility == m.facility)
            {
                others.push(m);
            }
        }
        let op = DocOp::create(
            &self.secrets,
            enrolment.facility,
            now_ms(),
            DocOpBody::Create {
                kind,
                members: others,
                key_commitment: key.commitment(),
                nonce: random(),
            },
        )?;
        let view = membership::admit_op(&op, None, &dir, Point::Peer)
            .map_err(|e| EngineError::Trust(e.message))?;
        let doc = op.doc;
        let recipients = member_devices(&dir, &view);
        let grant = KeyGrant::seal(
            &self.secrets,
            enrolment.facility,
            doc,
            Epoch(0),
            &key,
            &recipients,
        )?;
        self.store
            .replace_chain(doc, 0, std::slice::from_ref(&op), 0)?;
        self.store.put_document(&view)?;
        self.store.put_grant(&grant)?;
        self.store.queue(&PushItem::Op { op })?;
        self.store.queue(&PushItem::Grant { grant })?;
        let mut loaded = Loaded {
            info: view,
            doc: AutoCommit::new().with_actor(self.actor()),
            heads: vec![],
            unreadable: 0,
        };
        build(&mut loaded.doc)?;
        self.commit(&mut loaded)?;
        Ok(doc)
    }

    /// Appends a signed operation of this device to a document's chain (admitted at
    /// [`Point::Peer`], as any peer would check it) and queues it. Returns the membership after it.
    fn append_own_op(&mut self, view: &Membership, body: DocOpBody) -> Result<Membership> {
        self.append_own_op_with(view, body, |_| Ok(Vec::new()))
    }

    /// Signs `body` on top of `view`, admits it, then stores it with the grants `grants` makes for
    /// the membership it leads to, in one transaction (so a new epoch is never kept without its key).
    fn append_own_op_with(
        &mut self,
        view: &Membership,
        body: DocOpBody,
        grants: impl FnOnce(&Membership) -> Result<Vec<KeyGrant>>,
    ) -> Result<Membership> {
        let enrolment = self.enrolment()?;
        let op = DocOp::sign(
            &self.secrets,
            enrolment.facility,
            view.id,
            now_ms(),
            Some(view.head),
            body,
        )?;
        let dir = self.directory()?;
        let next = membership::admit_op(&op, Some(view), &dir, Point::Peer)
            .map_err(|e| EngineError::Trust(e.message))?;
        let grants = grants(&next)?;
        let relay_ops = self.store.document(view.id)?.map_or(0, |r| r.relay_ops);
        self.store
            .append_own_op(view.ops, &op, &next, relay_ops, &grants)?;
        Ok(next)
    }

    /// Adds `facility` with `role`, or removes it (`role: None`, which also rotates the key). Owner
    /// only. One transaction with the key upkeep it causes.
    pub fn share(&mut self, doc: DocumentId, facility: &str, role: Option<Role>) -> Result<()> {
        self.atomic(|e| e.share_in(doc, facility, role))
    }

    fn share_in(&mut self, doc: DocumentId, facility: &str, role: Option<Role>) -> Result<()> {
        let target = self.find_facility(facility)?;
        let info = self
            .store
            .document(doc)?
            .ok_or_else(|| EngineError::UnknownDocument(doc.to_string()))?
            .info;
        if self.my_role(&info)? != Some(Role::Owner) {
            return Err(EngineError::NotOwner);
        }
        self.append_own_op(
            &info,
            DocOpBody::SetMember {
                facility: target.id,
                role,
            },
        )?;
        self.maintain()?;
        Ok(())
    }

    /// Takes the relay's list of documents; returns the documents this device holds, is a member of,
    /// and knows the relay once acknowledged, that the relay no longer lists (it went back in time).
    pub fn update_documents(&mut self, docs: &[DocumentInfo]) -> Result<Vec<DocumentId>> {
        let me = self.enrolment()?.facility;
        for d in docs {
            self.store.set_relay_head(d.id, d.head)?;
        }
        let listed: BTreeSet<DocumentId> = docs.iter().map(|d| d.id).collect();
        Ok(self
            .store
            .documents(None)?
            .into_iter()
            .filter(|r| {
                r.relay_ops > 0 && r.info.role_of(me).is_some() && !listed.contains(&r.info.id)
            })
            .map(|r| r.info.id)
            .collect())
    }

    /// Takes operations of `doc` the relay served from position `from` on: replays the chain (with
    /// what this device holds before `from`) through the admission rule, keeps the valid prefix as
    /// confirmed, keeps this device's unconfirmed operations that still follow it, signs again on top
    /// of it those of its own that a concurrent operation displaced (or drops them), and sets aside
    /// displaced operations of other devices. Returns how many operations the relay confirmed.
    pub fn apply_relay_ops(
        &mut self,
        doc: DocumentId,
        from: u32,
        ops: &[DocOp],
    ) -> Result<OpsApplied> {
        self.atomic(|e| e.apply_relay_ops_in(doc, from, ops))
    }

    fn apply_relay_ops_in(
        &mut self,
        doc: DocumentId,
        from: u32,
        ops: &[DocOp],
    ) -> Result<OpsApplied> {
        let dir = self.directory()?;
        let devices = self.learned(&dir, doc)?;
        let me = self.enrolment()?.facility;
        let chain = self.store.chain(doc)?;
        let relay_ops = self.store.document(doc)?.map_or(0, |r| r.relay_ops);
        // The relay acknowledged or served these before; it may not rewrite them now (a relay that
        // claims to have gone back and serves another continuation is refused, not followed).
        let held_confirmed = chain.iter().take_while(|c| c.confirmed).count();
        let from = from.min(chain.len() as u32);
        let mut relay_chain: Vec<DocOp> = chain[..from as usize]
            .iter()
            .map(|c| c.op.clone())
            .collect();
        relay_chain.extend(ops.iter().cloned());
        let overlap = held_confirmed.min(relay_chain.len());
        if let Some(p) =
            (from as usize..overlap).find(|&p| relay_chain[p].hash() != chain[p].op.hash())
        {
            tracing::warn!(%doc, position = p, "the relay served a membership operation other than the one it confirmed before; this device keeps its chain");
            self.store.set_meta_cbor(
                &format!("doc_warning:{doc}"),
                &format!(
                    "the relay served operation {p} differently from the one it confirmed before (a relay that rewrites history); this device keeps the chain it verified"
                ),
            )?;
            return Ok(OpsApplied::kept(relay_ops));
        }
        let replay = membership::replay(&relay_chain, &devices, Point::Pulled);
        let awaits_directory = replay
            .refused
            .as_ref()
            .is_some_and(|e| e.code == ErrorCode::StaleDirectory);
        if let Some(e) = &replay.refused
            && awaits_directory
        {
            tracing::info!(%doc, position = replay.valid, "an operation excludes a device this device still holds current; fetching the directory first: {e}");
        } else if let Some(e) = &replay.refused {
            tracing::warn!(%doc, position = replay.valid, "the relay served a membership operation that does not verify; it and those after it are ignored: {e}");
            self.store.set_meta_cbor(
                &format!("doc_warning:{doc}"),
                &format!(
                    "operation {} served by the relay does not verify: {e}",
                    replay.valid
                ),
            )?;
        }
        if replay.valid < overlap.max(from as usize) {
            // What this device holds as confirmed no longer replays with the directory it holds
            // now: it keeps its chain rather than follow the relay.
            tracing::warn!(%doc, position = replay.valid, "the document's confirmed operations do not replay with the current directory; the chain is kept as it is");
            return Ok(OpsApplied::kept(relay_ops));
        }
        let Some(relay_view) = replay.view else {
            // Not even the `Create` is admitted (yet: its author may be enrolled after this
            // device's directory).
            return Ok(OpsApplied {
                confirmed: 0,
                awaits_directory,
            });
        };
        relay_chain.truncate(replay.valid);
        let confirmed = relay_chain.len() as u32;
        if chain.is_empty() && relay_view.role_of(me).is_none() {
            // The relay lists a document whose signed operations do not name this facility.
            tracing::warn!(%doc, "the relay lists a document this facility is not a member of; ignored");
            return Ok(OpsApplied::kept(confirmed));
        }
        let local_tail: Vec<&DocOp> = chain[from as usize..].iter().map(|c| &c.op).collect();
        let relay_tail = &relay_chain[from as usize..];
        let common = local_tail
            .iter()
            .zip(relay_tail)
            .take_while(|(a, b)| a.hash() == b.hash())
            .count();
        let mut new_chain = relay_chain.clone();
        let mut displaced: Vec<DocOp> = Vec::new();
        if common == relay_tail.len() {
            // The relay's chain is a prefix of ours: our unconfirmed tail still follows it.
            new_chain.extend(local_tail[common..].iter().map(|o| (*o).clone()));
        } else {
            displaced.extend(local_tail[common..].iter().map(|o| (*o).clone()));
        }
        let view = membership::replay(&new_chain, &devices, Point::Pulled)
            .view
            .unwrap_or(relay_view);
        self.store.replace_chain(
            doc,
            from,
            &new_chain[from as usize..],
            confirmed.max(held_confirmed as u32),
        )?;
        self.store.put_document(&view)?;
        self.store.set_relay_ops(doc, confirmed)?;
        let my_device = self.device_id();
        for op in displaced {
            self.drop_queued_op(&op)?;
            if op.author == my_device {
                self.rebase_own(doc, op)?;
            } else {
                self.store.put_provisional_op(&op)?;
            }
        }
        self.settle_ops(doc)?;
        Ok(OpsApplied {
            confirmed,
            awaits_directory,
        })
    }

    /// `dir` with this device's revocation marks for `doc`.
    fn learned<'a>(&self, dir: &'a Directory, doc: DocumentId) -> Result<Learned<'a>> {
        let marks = self
            .store
            .revocation_marks(doc)?
            .into_iter()
            .filter_map(|(d, ops)| Some((d.parse::<DeviceId>().ok()?, ops)))
            .collect();
        Ok(Learned { dir, doc, marks })
    }

    /// Drops the outbox rows that carry `op`.
    fn drop_queued_op(&mut self, op: &DocOp) -> Result<()> {
        let hash = op.hash();
        for row in self.store.outdated(op.doc, Epoch(u32::MAX))? {
            if let PushItem::Op { op: o } = &row.item
                && o.hash() == hash
            {
                self.store.drop_outbox(row.id)?;
                self.retracted.insert(row.id);
            }
        }
        for row in self.store.pending(0)? {
            if let PushItem::Op { op: o } = &row.item
                && o.hash() == hash
            {
                self.store.drop_outbox(row.id)?;
                self.retracted.insert(row.id);
            }
        }
        Ok(())
    }

    /// One of this device's operations was displaced by a concurrent one the relay took first: a
    /// membership change is signed again on top of the chain if it still applies; a new epoch is
    /// dropped (key upkeep decides afresh whether one is needed), and bundles sealed with its key
    /// are sealed again once the chain's current key is here.
    fn rebase_own(&mut self, doc: DocumentId, op: DocOp) -> Result<()> {
        let Some(row) = self.store.document(doc)? else {
            return Ok(());
        };
        match &op.body {
            DocOpBody::SetMember { facility, role } => {
                match self.append_own_op(
                    &row.info,
                    DocOpBody::SetMember {
                        facility: *facility,
                        role: *role,
                    },
                ) {
                    Ok(_) => {
                        tracing::info!(%doc, "a membership change was signed again after a concurrent one")
                    }
                    Err(e) => {
                        tracing::warn!(%doc, "a membership change no longer applies after a concurrent one and is dropped: {e}")
                    }
                }
            }
            DocOpBody::Exclude { devices } => {
                let left: Vec<DeviceId> = devices
                    .iter()
                    .filter(|d| !row.info.is_excluded(d))
                    .copied()
                    .collect();
                if !left.is_empty()
                    && let Err(e) =
                        self.append_own_op(&row.info, DocOpBody::Exclude { devices: left })
                {
                    tracing::warn!(%doc, "an exclusion no longer applies and is dropped: {e}");
                }
            }
            DocOpBody::NewEpoch { epoch, .. } => {
                tracing::info!(%doc, %epoch, "another device rotated the key first; this device's rotation is dropped");
                let me = self.device_id();
                for g in self.store.grants(doc)? {
                    if g.epoch == *epoch && g.author == me {
                        for row in self.store.pending(0)? {
                            if let PushItem::Grant { grant } = &row.item
                                && grant.hash() == g.hash()
                            {
                                self.store.drop_outbox(row.id)?;
                                self.retracted.insert(row.id);
                            }
                        }
                    }
                }
                // Bundles this device sealed with the dropped key: seal them again.
                for row in self.store.pending(0)? {
                    if let PushItem::Bundle { envelope } = &row.item
                        && envelope.doc == doc
                        && envelope.epoch == *epoch
                        && envelope.author == me
                    {
                        self.store
                            .mark_stale(row.id, "sealed with a key that lost a rotation race")?;
                        self.retracted.insert(row.id);
                    }
                }
            }
            DocOpBody::Create { .. } => {}
        }
        Ok(())
    }

    /// Moves operations set aside into the chain when they now follow it, drops those that never
    /// can (they follow an operation before the chain's last), and puts stale outbox operations that
    /// the chain confirmed or dropped out of the outbox.
    fn settle_ops(&mut self, doc: DocumentId) -> Result<()> {
        let dir = self.directory()?;
        loop {
            let Some(row) = self.store.document(doc)? else {
                return Ok(());
            };
            let view = row.info;
            let chain: BTreeSet<[u8; 32]> =
                self.store.chain(doc)?.iter().map(|c| c.op.hash()).collect();
            let mut moved = false;
            for op in self.store.provisional_ops(doc)? {
                if op.prev == Some(view.head) {
                    match membership::admit_op(&op, Some(&view), &dir, Point::Peer) {
                        Ok(next) => {
                            self.store.replace_chain(
                                doc,
                                view.ops,
                                std::slice::from_ref(&op),
                                row.relay_ops,
                            )?;
                            self.store.put_document(&next)?;
                            moved = true;
                            break;
                        }
                        Err(e) => {
                            tracing::info!(%doc, "an operation kept aside is refused: {e}");
                            self.store.drop_provisional_op(&op.hash())?;
                        }
                    }
                } else if op.prev.is_some_and(|p| chain.contains(&p)) || chain.contains(&op.hash())
                {
                    // It follows an operation that another one follows already: it lost.
                    self.store.drop_provisional_op(&op.hash())?;
                }
            }
            if !moved {
                break;
            }
        }
        // Stale operations in the outbox: confirmed or gone from the chain → dropped; still
        // unconfirmed in the chain (they follow the relay's head now) → pending again.
        let chain = self.store.chain(doc)?;
        for row in self.store.outdated(doc, Epoch(0))? {
            if let PushItem::Op { op } = &row.item {
                let h = op.hash();
                match chain.iter().find(|c| c.op.hash() == h) {
                    Some(c) if !c.confirmed => {
                        self.store.drop_outbox(row.id)?;
                        self.retracted.insert(row.id);
                        self.store.queue(&row.item)?;
                    }
                    _ => {
                        self.store.drop_outbox(row.id)?;
                        self.retracted.insert(row.id);
                    }
                }
            }
        }
        Ok(())
    }

    /// The relay acknowledged an operation: it is confirmed. Returns its document and the confirmed
    /// count.
    pub fn confirm_op(&mut self, op: &DocOp) -> Result<Option<(DocumentId, u32)>> {
        Ok(self.store.confirm_op(&op.hash())?)
    }

    /// The relay holds less of `doc` than this device knew it acknowledged: `head` is its newest
    /// sequence number and `ops` (when known) its operation count. Sets the cursor back, queues again
    /// the operations from `ops` on and every grant; returns the ids of every bundle held, to offer.
    pub fn relay_behind(
        &mut self,
        doc: DocumentId,
        head: musubi_crdt::ids::Seq,
        ops: Option<u32>,
    ) -> Result<Vec<musubi_crdt::ids::BundleId>> {
        // One transaction: it takes pending items out of the outbox and queues them again.
        self.atomic(|e| e.relay_behind_in(doc, head, ops))
    }

    fn relay_behind_in(
        &mut self,
        doc: DocumentId,
        head: musubi_crdt::ids::Seq,
        ops: Option<u32>,
    ) -> Result<Vec<musubi_crdt::ids::BundleId>> {
        self.store.set_cursor(doc, head)?;
        let Some(row) = self.store.document(doc)? else {
            return Ok(vec![]);
        };
        if let Some(n) = ops
            && n < row.relay_ops
        {
            let chain = self.store.chain(doc)?;
            let again: Vec<DocOp> = chain
                .iter()
                .filter(|c| c.idx >= n && c.confirmed)
                .map(|c| c.op.clone())
                .collect();
            // They wait in the outbox again, before anything queued later.
            let ids: Vec<u64> = self
                .store
                .pending(0)?
                .into_iter()
                .filter(|r| r.item.doc() == Some(doc))
                .map(|r| r.id)
                .collect();
            let later: Vec<PushItem> = ids
                .iter()
                .filter_map(|id| self.store.outbox_item(*id).ok().flatten())
                .collect();
            for id in &ids {
                self.store.drop_outbox(*id)?;
                self.retracted.insert(*id);
            }
            for op in again {
                self.store.queue(&PushItem::Op { op })?;
            }
            for grant in self.store.grants(doc)? {
                self.store.queue(&PushItem::Grant { grant })?;
            }
            for item in later {
                match &item {
                    PushItem::Bundle { envelope } => {
                        self.store.requeue_bundle(envelope)?;
                    }
                    other => {
                        self.store.queue(other)?;
                    }
                }
            }
            // They stay confirmed: the relay acknowledged them once, and no relay may serve
            // another history in their place ([`Engine::apply_relay_ops`]).
            self.store.set_relay_ops(doc, n)?;
        }
        Ok(self.store.bundle_ids(doc)?)
    }

    /// The relay asked for bundles it lacks (after a rollback): queues them again.
    pub fn requeue_bundles(
        &mut self,
        doc: DocumentId,
        ids: &[musubi_crdt::ids::BundleId],
    ) -> Result<usize> {
        let mut n = 0;
        for id in ids {
            if let Some(b) = self.store.bundle(id)?
                && b.doc == doc
            {
                self.store.requeue_bundle(&b.envelope)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The outbox rows replaced since the last call (the sync session drops its copies of them).
    pub fn take_retracted(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.retracted)
    }

    /// Keeps keys where they belong; returns how many items it queued.
    ///
    /// - A writer holding the current key: when a device that holds it is no longer a current device
    ///   of a member facility (revoked, or its facility removed), starts a new epoch whose key only
    ///   current member devices receive (any writer may; the relay takes the first).
    /// - Anyone holding a key: grants it to current member devices that lack it (a new laptop of a
    ///   member), never to a device without a verified chain or of a facility whose root key changed.
    /// - Bundles waiting in the outbox sealed in a superseded epoch are sealed again with the
    ///   current key.
    pub fn maintain(&mut self) -> Result<usize> {
        self.maintain_with(true)
    }

    /// [`Engine::maintain`] without starting a new epoch: what runs after a LAN exchange or a file,
    /// where a rotation could not be ordered against a concurrent one (the relay orders them; this
    /// device rotates at its next sync with it). Grants to missing devices and sealing queued
    /// bundles again still happen.
    pub fn maintain_offline(&mut self) -> Result<usize> {
        self.maintain_with(false)
    }

    fn maintain_with(&mut self, rotate: bool) -> Result<usize> {
        let Ok(enrolment) = self.enrolment() else {
            return Ok(0);
        };
        let Ok(dir) = self.directory() else {
            return Ok(0);
        };
        let mut queued = 0;
        for row in self.store.documents(None)? {
            let doc = row.info.id;
            // One document's trouble (a grant that cannot be sealed, a chain that moved on) never
            // stops the upkeep of the others, nor the sync that runs it.
            // Each document's upkeep (a new epoch, its grants, bundles sealed again) is one
            // transaction: all of it or none.
            match self.atomic(|e| e.maintain_document(row.info, &dir, enrolment.facility, rotate)) {
                Ok(n) => queued += n,
                Err(EngineError::Store(e)) => return Err(EngineError::Store(e)),
                Err(e) => tracing::warn!(%doc, "key upkeep of this document failed: {e}"),
            }
        }
        Ok(queued)
    }

    /// Called after the relay served `doc`'s key grants, at `now_ms` (milliseconds since the Unix
    /// epoch): when the document's current epoch was started by an operation the relay confirmed
    /// and none of the grants served gives this device its key, the epoch is noted as orphaned,
    /// with the time it was first seen so (a writer rotated to a key it granted nobody, or its
    /// grants are late). Once it has stayed so for [`ORPHANED_EPOCH_GRACE_MS`],
    /// [`Engine::maintain`] lets a writer start the next epoch, so one member cannot freeze a
    /// document's writes, and a rotation whose grants are a moment late causes no second one.
    /// `newest_held` is the newest epoch whose key this device holds after taking the grants
    /// (the last key of [`Engine::keys`]).
    pub fn note_grants_fetched(
        &mut self,
        doc: DocumentId,
        newest_held: Option<Epoch>,
        now_ms: u64,
    ) -> Result<()> {
        let Some(row) = self.store.document(doc)? else {
            return Ok(());
        };
        let key = format!("orphaned_epoch:{doc}");
        let orphaned = row.info.epoch > Epoch(0)
            && row.relay_ops >= row.info.ops
            && newest_held.is_none_or(|e| e < row.info.epoch);
        let before = self.store.meta_cbor::<Option<(u32, u64)>>(&key)?.flatten();
        let next = match before {
            _ if !orphaned => None,
            Some((e, since)) if e == row.info.epoch.0 => Some((e, since)),
            _ => Some((row.info.epoch.0, now_ms)),
        };
        if next != before {
            self.store.set_meta_cbor(&key, &next)?;
        }
        Ok(())
    }

    fn maintain_document(
        &mut self,
        mut info: Membership,
        dir: &Directory,
        me: FacilityId,
        rotate: bool,
    ) -> Result<usize> {
        let Some(my_role) = info.role_of(me) else {
            return Ok(0);
        };
        let mut keys = self.keys(info.id)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut queued = 0;
        let held_epoch = keys.keys().next_back().copied().unwrap_or_default();
        // The current epoch's key reached no device here after the relay served every grant it
        // holds (see `note_grants_fetched`): a writer starts the next epoch. Each such rotation
        // of a document doubles the wait before the next (a relay that withholds grants on
        // purpose could otherwise spend the document's operation budget, DOCUMENT_OPS_MAX).
        let writes = rotate && my_role.can_write();
        let recoveries = if writes && held_epoch < info.epoch {
            self.store
                .meta_cbor::<u32>(&format!("orphan_rotations:{}", info.id))?
                .unwrap_or(0)
        } else {
            0
        };
        let orphaned = writes
            && held_epoch < info.epoch
            && self
                .store
                .meta_cbor::<Option<(u32, u64)>>(&format!("orphaned_epoch:{}", info.id))?
                .flatten()
                .is_some_and(|(e, since)| {
                    e == info.epoch.0
                        && now_ms().saturating_sub(since)
                            >= ORPHANED_EPOCH_GRACE_MS << recoveries.min(12)
                });
        if writes && (held_epoch == info.epoch || orphaned) {
            let grants = self.store.grants(info.id)?;
            let current_recipients: BTreeSet<DeviceId> = grants
                .iter()
                .filter(|g| g.epoch == held_epoch)
                .flat_map(|g| g.recipients.iter().copied())
                .collect();
            // Only positive evidence takes a key away: a device revoked (by its facility's chain or
            // the operator), of a revoked facility, or of a facility no longer a member. A device
            // the directory merely does not show (left out, a forked chain, a changed root key)
            // gets no new key, but is neither excluded nor rotated away.
            let gone: Vec<DeviceId> = current_recipients
                .iter()
                .filter(|d| lost_right(dir, &info, d))
                .copied()
                .collect();
            let to_exclude: Vec<DeviceId> = gone
                .iter()
                .filter(|d| !info.is_excluded(d))
                .copied()
                .collect();
            if !to_exclude.is_empty() {
                // First the devices that lost their right may sign nothing more for it, then
                // the key they hold is rotated away.
                match self.append_own_op(
                    &info,
                    DocOpBody::Exclude {
                        devices: to_exclude,
                    },
                ) {
                    Ok(next) => info = next,
                    Err(e) => {
                        tracing::warn!(doc = %info.id, "could not exclude revoked devices: {e}")
                    }
                }
            }
            if !gone.is_empty() || orphaned {
                if orphaned {
                    tracing::warn!(doc = %info.id, epoch = %info.epoch, "no device here got the current epoch's key from the relay; starting the next epoch");
                }
                let epoch = Epoch(info.epoch.0 + 1);
                let key = DocumentKey::from_seed(random());
                let secrets = self.secrets.clone();
                // The grants are sealed before anything is stored, and stored with the operation.
                match self.append_own_op_with(
                    &info,
                    DocOpBody::NewEpoch {
                        epoch,
                        key_commitment: key.commitment(),
                    },
                    |next| {
                        Ok(KeyGrant::seal_all(
                            &secrets,
                            me,
                            next.id,
                            epoch,
                            &key,
                            &member_devices(dir, next),
                        )?)
                    },
                ) {
                    Ok(next) => {
                        keys.entry(epoch).or_default().push(key);
                        info = next;
                        queued += 2;
                        if orphaned {
                            self.store.set_meta_cbor(
                                &format!("orphan_rotations:{}", info.id),
                                &(recoveries + 1),
                            )?;
                        }
                        tracing::info!(doc = %info.id, %epoch, "rotated the document key");
                    }
                    Err(e) => tracing::warn!(doc = %info.id, "could not rotate the key: {e}"),
                }
            }
        }
        let should = member_devices(dir, &info);
        let grants = self.store.grants(info.id)?;
        for (epoch, ks) in &keys {
            // A device counts as holding the key when a grant of this facility or of its own
            // facility names it: another member could name it in a grant whose sealed key is
            // garbage (it cannot be checked without the device's secret), and it would never get
            // the real one.
            let covered: BTreeSet<DeviceId> = grants
                .iter()
                .filter(|g| g.epoch == *epoch)
                .flat_map(|g| {
                    g.recipients.iter().copied().filter(move |d| {
                        g.facility == me || dir.device(d).is_some_and(|(f, _)| f.id == g.facility)
                    })
                })
                .collect();
            let missing: Vec<(DeviceId, String)> = should
                .iter()
                .filter(|(d, _)| !covered.contains(d))
                .cloned()
                .collect();
            let Some(key) = ks.first() else { continue };
            for grant in KeyGrant::seal_all(&self.secrets, me, info.id, *epoch, key, &missing)? {
                self.store.put_grant(&grant)?;
                self.store.queue(&PushItem::Grant { grant })?;
                queued += 1;
            }
        }
        queued += self.reseal(&info, &keys, my_role)?;
        Ok(queued)
    }

    /// Seals again, with the current key, the outbox bundles of `view` that were sealed in a
    /// superseded epoch (or with a key that lost a rotation race), and drops stale grants. Returns
    /// how many bundles it queued.
    fn reseal(
        &mut self,
        view: &Membership,
        keys: &BTreeMap<Epoch, Vec<DocumentKey>>,
        my_role: Role,
    ) -> Result<usize> {
        let outdated = self.store.outdated(view.id, view.epoch)?;
        if outdated.is_empty() {
            return Ok(0);
        }
        let Some(current) = keys.get(&view.epoch).and_then(|k| k.first()).cloned() else {
            return Ok(0); // the current key has not arrived yet
        };
        let all = self.all_keys(view.id)?;
        let facility = self.enrolment()?.facility;
        let mut queued = 0;
        for row in outdated {
            match &row.item {
                PushItem::Bundle { envelope } => {
                    let payload = all
                        .iter()
                        .filter(|(e, _)| *e == envelope.epoch)
                        .find_map(|(_, k)| envelope.open(k).ok());
                    self.store.drop_outbox(row.id)?;
                    self.retracted.insert(row.id);
                    // Dropped for good: marked superseded, so a sync start does not queue it again.
                    let Some(payload) = payload else {
                        tracing::warn!(doc = %view.id, "a queued bundle in a superseded epoch cannot be opened here; it is left to its author");
                        self.store.supersede_bundle(&envelope.id(), view.id)?;
                        continue;
                    };
                    if !my_role.can_write() {
                        self.store.supersede_bundle(&envelope.id(), view.id)?;
                        continue;
                    }
                    let env = Envelope::seal(
                        &self.secrets,
                        facility,
                        view.id,
                        view.epoch,
                        &current,
                        &payload,
                    )?;
                    self.store.add_local_bundle(&env, now_ms(), false)?;
                    // The original never reached the relay and never will: its changes live on in
                    // the copy (Automerge changes keep their own actors), so it is not kept or
                    // offered (a revoked device holds its key).
                    self.store.supersede_bundle(&envelope.id(), view.id)?;
                    queued += 1;
                }
                PushItem::Grant { .. } => {
                    self.store.drop_outbox(row.id)?;
                    self.retracted.insert(row.id);
                }
                _ => {}
            }
        }
        if queued > 0 {
            tracing::info!(doc = %view.id, bundles = queued, epoch = %view.epoch, "sealed queued bundles again with the current key");
        }
        Ok(queued)
    }
}

/// How long, in milliseconds, a document's current epoch must have had no key for this device
/// after the relay served every grant it holds before a writer here starts the next epoch (10
/// minutes: a rotation's grants normally arrive with it, or at the rotating device's next sync).
/// It doubles with each such rotation of the same document, up to 2^12 times (about 28 days).
pub const ORPHANED_EPOCH_GRACE_MS: u64 = 10 * 60 * 1000;

/// What [`Engine::apply_relay_ops`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpsApplied {
    /// How many operations of the chain the relay has confirmed (served or acknowledged).
    pub confirmed: u32,
    /// The chain stopped at an operation that excludes a device this device still holds current:
    /// fetch the directory, then the operations again.
    pub awaits_directory: bool,
}

impl OpsApplied {
    fn kept(confirmed: u32) -> Self {
        Self {
            confirmed,
            awaits_directory: false,
        }
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
    /// Membership operations kept aside until the operations they follow arrive.
    pub provisional: u64,
    /// Grants and bundles made against another membership state than this device's (an epoch it
    /// does not know yet, or a rotation that lost a race): not taken now; they come again by the
    /// relay, sealed for the chain's key.
    pub stale: u64,
    /// Items refused, with the reason.
    pub refused: Vec<String>,
}

impl Engine {
    /// Takes signed items that did not come from the relay: each passes the admission rule at
    /// [`Point::Peer`] (signature, a current author, the document's verified membership), what is
    /// new is stored, and (with `queue_for_relay`) queued so whichever device reaches the relay first
    /// uploads it. Operations that do not follow this device's chain are kept aside, not applied.
    ///
    /// Operations come before grants and bundles so a document this device never saw is known first.
    ///
    /// One transaction: a crash leaves all of the items' effects or none.
    pub fn import_items(
        &mut self,
        items: Vec<PushItem>,
        origin: Origin,
        queue_for_relay: bool,
    ) -> Result<ImportReport> {
        self.atomic(|e| e.import_items_in(items, origin, queue_for_relay))
    }

    fn import_items_in(
        &mut self,
        items: Vec<PushItem>,
        origin: Origin,
        queue_for_relay: bool,
    ) -> Result<ImportReport> {
        let dir = self.directory()?;
        let me = self.enrolment()?.facility;
        let mut report = ImportReport::default();
        let (ops, mut rest): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|i| matches!(i, PushItem::Op { .. }));
        rest.sort_by_key(|i| matches!(i, PushItem::Bundle { .. }));
        // Operations by document, in the order given (a sender gives its chain in order).
        let mut by_doc: Vec<(DocumentId, Vec<DocOp>)> = Vec::new();
        for item in ops {
            let PushItem::Op { op } = item else { continue };
            match by_doc.iter_mut().find(|(d, _)| *d == op.doc) {
                Some((_, v)) => v.push(op),
                None => by_doc.push((op.doc, vec![op])),
            }
        }
        for (doc, ops) in by_doc {
            if self.store.document(doc)?.is_none() {
                // A document new here is taken only when its chain, replayed from its Create,
                // names this facility.
                let r = membership::replay(&ops, &dir, Point::Peer);
                match r.view {
                    Some(view) if view.role_of(me).is_some() => {
                        self.store.replace_chain(doc, 0, &ops[..r.valid], 0)?;
                        self.store.put_document(&view)?;
                        report.new += r.valid as u64;
                        if queue_for_relay {
                            for op in &ops[..r.valid] {
                                self.store.queue(&PushItem::Op { op: op.clone() })?;
                            }
                        }
                        if let Some(e) = r.refused {
                            report
                                .refused
                                .push(format!("operation on {doc}: {}", e.message));
                        }
                    }
                    Some(_) => report.skipped += ops.len() as u64,
                    None => match r.refused {
                        Some(e) if e.code != ErrorCode::UnknownDocument => report
                            .refused
                            .push(format!("operation on {doc}: {}", e.message)),
                        _ => report.skipped += ops.len() as u64,
                    },
                }
                continue;
            }
            for op in ops {
                if self.store.has_op(&op.hash())? {
                    report.known += 1;
                    continue;
                }
                let row = self
                    .store
                    .document(doc)?
                    .ok_or_else(|| EngineError::UnknownDocument(doc.to_string()))?;
                match membership::admit_op(&op, Some(&row.info), &dir, Point::Peer) {
                    Ok(next) => {
                        self.store.replace_chain(
                            doc,
                            row.info.ops,
                            std::slice::from_ref(&op),
                            row.relay_ops,
                        )?;
                        self.store.put_document(&next)?;
                        report.new += 1;
                        if queue_for_relay {
                            self.store.queue(&PushItem::Op { op: op.clone() })?;
                        }
                        self.settle_ops(doc)?;
                    }
                    Err(e) if e.code == ErrorCode::Stale => {
                        if self.store.provisional_count(doc)? >= PROVISIONAL_OPS_MAX {
                            report.refused.push(format!(
                                "operation on {doc}: {PROVISIONAL_OPS_MAX} operations that do not \
                                 follow its chain are already kept aside; sync with the relay first"
                            ));
                        } else if self.store.put_provisional_op(&op)? {
                            report.provisional += 1;
                        } else {
                            report.known += 1;
                        }
                    }
                    Err(e) => report
                        .refused
                        .push(format!("operation on {doc}: {}", e.message)),
                }
            }
        }
        for item in rest {
            let Some(doc) = item.doc() else {
                report
                    .refused
                    .push("an invite or approval belongs to no document".into());
                continue;
            };
            let Some(row) = self.store.document(doc)? else {
                report.skipped += 1;
                continue;
            };
            if row.info.role_of(me).is_none() {
                report.skipped += 1;
                continue;
            }
            if let Err(e) = membership::admit(&item, Some(&row.info), &dir, Point::Peer) {
                if e.code == ErrorCode::Stale {
                    report.stale += 1;
                    continue;
                }
                report.refused.push(format!(
                    "{} of {doc}: {}",
                    match item {
                        PushItem::Grant { .. } => "key grant",
                        _ => "bundle",
                    },
                    e.message
                ));
                continue;
            }
            match item {
                PushItem::Grant { grant } => {
                    if self.store.put_grant(&grant)? {
                        report.new += 1;
                        if queue_for_relay {
                            self.store.queue(&PushItem::Grant { grant })?;
                        }
                    } else {
                        report.known += 1;
                    }
                }
                PushItem::Bundle { envelope } => {
                    if self.store.add_foreign_bundle(
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
                _ => {}
            }
        }
        Ok(report)
    }

    /// The grants of `doc` worth handing on: those for a key the document's chain commits to (a
    /// grant of this device's own rotation that lost a race is kept only to open its own bundles).
    pub fn shareable_grants(&self, doc: DocumentId) -> Result<Vec<KeyGrant>> {
        let Some(row) = self.store.document(doc)? else {
            return Ok(vec![]);
        };
        Ok(self
            .store
            .grants(doc)?
            .into_iter()
            .filter(|g| row.info.commitment(g.epoch) == Some(g.key_commitment))
            .collect())
    }

    /// The relay refused, for good, a bundle this device took from a LAN peer or a file and never
    /// got a sequence number for. When this device's own admission rule refuses it too, as the
    /// relay would (its author was revoked, its facility is no longer a writer, its epoch was
    /// superseded), it is taken out of this device's copy and not taken again, so this device ends
    /// with what every other member has. Otherwise it is kept, and still travels by LAN and file:
    /// a relay's word alone never deletes data. Returns whether it was taken out.
    pub fn drop_refused_bundle(&mut self, envelope: &Envelope) -> Result<bool> {
        let dir = self.directory()?;
        let row = self.store.document(envelope.doc)?;
        if let Some(row) = &row
            && membership::admit_bundle(envelope, &row.info, &dir, Point::Relay).is_ok()
        {
            tracing::warn!(doc = %envelope.doc, bundle = %envelope.id(), author = %envelope.author, "the relay refused a bundle this device's rules admit; keeping it");
            return Ok(false);
        }
        self.store.supersede_bundle(&envelope.id(), envelope.doc)?;
        self.store.drop_snapshot(envelope.doc)?;
        tracing::info!(doc = %envelope.doc, bundle = %envelope.id(), author = %envelope.author, "took out a bundle the relay refused for good");
        Ok(true)
    }

    /// Everything this device holds of a document, as push items (its operation chain in order,
    /// grants, bundles), leaving out bundles held back because they wait to be sealed again.
    pub fn export_items(&self, doc: DocumentId) -> Result<Vec<PushItem>> {
        let mut out: Vec<PushItem> = self
            .store
            .ops(doc)?
            .into_iter()
            .map(|op| PushItem::Op { op })
            .collect();
        out.extend(
            self.shareable_grants(doc)?
                .into_iter()
                .map(|grant| PushItem::Grant { grant }),
        );
        out.extend(
            self.store
                .shareable_bundles(doc)?
                .into_iter()
                .map(|b| PushItem::Bundle {
                    envelope: b.envelope,
                }),
        );
        Ok(out)
    }

    /// This facility's certificate and device chain, from the signed directory held.
    fn own_chain(&self) -> Result<Vec<DeviceLink>> {
        let enrolment = self.enrolment()?;
        let Some(signed) = self.signed_directory()? else {
            return Err(EngineError::NotEnrolled);
        };
        let body = signed
            .open(&enrolment.relay)
            .map_err(|e| EngineError::Trust(e.to_string()))?;
        Ok(body
            .facilities
            .into_iter()
            .find(|f| f.cert.facility == enrolment.facility)
            .map(|f| f.links)
            .unwrap_or_default())
    }

    /// Issues an invite for another device of this facility, valid for `expires`: the code to hand
    /// over in person. The secret stays here (sealed to this device); the relay learns the invite's
    /// id at the next sync, and this device approves the join at the sync after the new device asked.
    ///
    /// Errors: [`EngineError::InvalidExpiry`]; not enrolled.
    pub fn device_invite(&mut self, expires: std::time::Duration) -> Result<InviteCode> {
        if expires.is_zero() || expires.as_secs() > INVITE_EXPIRES_SECS_MAX {
            return Err(EngineError::InvalidExpiry);
        }
        let enrolment = self.enrolment()?;
        let secret: [u8; INVITE_SECRET_BYTES] = random();
        let expires_at_ms = now_ms().saturating_add(expires.as_millis() as u64);
        let invite = InviteId::of_secret(&secret);
        let recipient = self.secrets.age_identity().to_public();
        let sealed_secret = crypto::seal_to(&[recipient], &secret)?;
        self.store.put_device_invite(
            &DeviceInviteRow {
                invite,
                sealed_secret,
                expires_at_ms,
                used_by: None,
            },
            now_ms(),
        )?;
        let registration =
            InviteRegistration::sign(&self.secrets, invite, enrolment.facility, expires_at_ms);
        self.store.queue(&PushItem::Invite { registration })?;
        Ok(InviteCode {
            deployment: enrolment.deployment,
            relay: enrolment.relay,
            addrs: enrolment.relay_addrs,
            authority: enrolment.authority,
            invite: InviteFor::Device {
                facility: enrolment.facility,
                facility_name: enrolment.facility_name,
            },
            expires_at_ms,
            secret: secret.to_vec(),
        })
    }

    /// Approves join requests for invites this device issued: checks each proof against the kept
    /// secret, signs the next link of the facility's device chain adding the device, seals this
    /// facility's pseudonym keys to it, and queues the approval. Requests for other devices' invites are left
    /// to them; expired or used invites and bad proofs are refused.
    pub fn approve_joins(&mut self, requests: &[JoinRequest]) -> Result<Approvals> {
        let enrolment = self.enrolment()?;
        let mut out = Approvals::default();
        let mut links = self.own_chain()?;
        for r in requests {
            let Some(invite) = self.store.device_invite(&r.invite)? else {
                continue;
            };
            if invite.used_by.is_some() {
                continue;
            }
            if invite.expires_at_ms <= now_ms() {
                out.refused.push(format!(
                    "{} ({}): the invite expired",
                    r.name, r.device.device
                ));
                continue;
            }
            let secret: [u8; INVITE_SECRET_BYTES] =
                crypto::open_with(self.secrets.age_identity(), &invite.sealed_secret, 32)?
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("invite secret length".into()))?;
            if let Err(e) = r.verify(&secret, None) {
                tracing::warn!(device = %r.device.device, "refusing a join request: {e}");
                out.refused
                    .push(format!("{} ({}): {e}", r.name, r.device.device));
                continue;
            }
            let link = DeviceLink::sign(
                &self.secrets,
                enrolment.facility,
                links.last(),
                DeviceChange::Add {
                    device: r.device.device,
                    age_recipient: r.device.age_recipient.clone(),
                },
                now_ms(),
            );
            let recipient = crypto::parse_recipient(&r.device.age_recipient)?;
            // The new device is of this facility: it gets the keys of the same sectors.
            let sealed_pseudonym =
                crypto::seal_to(&[recipient], &self.pseudonym_keys()?.to_plain())?;
            self.store
                .set_device_invite_used(&r.invite, Some(&r.device.device.to_string()))?;
            self.store.queue(&PushItem::Approve {
                link: link.clone(),
                sealed_pseudonym,
            })?;
            links.push(link);
            tracing::info!(device = %r.device.device, name = %r.name, "approved a new device of this facility");
            out.approved
                .push((r.device.device.to_string(), r.name.clone()));
        }
        Ok(out)
    }

    /// The relay refused an approval as made against an older chain (another device of this
    /// facility approved someone meanwhile): the invite may be approved again.
    pub fn approval_stale(&mut self, link: &DeviceLink) -> Result<()> {
        if let DeviceChange::Add { device, .. } = &link.change {
            let id: Option<Vec<u8>> = self
                .store
                .conn()
                .query_row(
                    "SELECT invite_id FROM device_invites WHERE used_by = ?1",
                    [device.to_string()],
                    |r| r.get(0),
                )
                .ok();
            if let Some(id) = id.and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                self.store.set_device_invite_used(&InviteId(id), None)?;
            }
        }
        Ok(())
    }

    /// Revokes a device of this facility (a lost laptop): queues the next link of the facility's
    /// device chain. Key upkeep then rotates the key of every document this facility writes.
    ///
    /// Errors: the device is not a current device of this facility.
    pub fn revoke_device(&mut self, device: &str) -> Result<()> {
        let enrolment = self.enrolment()?;
        let target: DeviceId = device
            .parse()
            .map_err(|_| EngineError::UnknownDevice(device.to_owned()))?;
        let dir = self.directory()?;
        if dir.device_status(&target).current() != Some(enrolment.facility) {
            return Err(EngineError::UnknownDevice(target.to_string()));
        }
        let links = self.own_chain()?;
        let link = DeviceLink::sign(
            &self.secrets,
            enrolment.facility,
            links.last(),
            DeviceChange::Revoke { device: target },
            now_ms(),
        );
        self.store.queue(&PushItem::Approve {
            link,
            sealed_pseudonym: vec![],
        })?;
        Ok(())
    }
}

/// Every device this device counts as revoked: the relay's revocations it saw, chain revocations,
/// devices of revoked facilities.
fn revocations(dir: &Option<Directory>, pins: &Pins) -> BTreeSet<DeviceId> {
    let mut out: BTreeSet<DeviceId> = pins.revoked_devices.clone();
    if let Some(d) = dir {
        for f in &d.facilities {
            for dev in &f.devices {
                if dev.revoked || f.revoked {
                    out.insert(dev.device);
                }
            }
        }
    }
    out
}

/// The directory, with this device's record of how far each document's chain was when it learned of
/// each revocation ([`Devices::revocation_learned`]), for one document.
struct Learned<'a> {
    dir: &'a Directory,
    doc: DocumentId,
    marks: BTreeMap<DeviceId, u32>,
}

impl Devices for Learned<'_> {
    fn device_status(&self, device: &DeviceId) -> DeviceStatus {
        self.dir.device_status(device)
    }
    fn facility_status(&self, facility: FacilityId) -> musubi_crdt::directory::FacilityStatus {
        self.dir.facility_status(facility)
    }
    fn revocation_learned(&self, device: &DeviceId, doc: DocumentId) -> Option<u32> {
        (doc == self.doc)
            .then(|| self.marks.get(device).copied())
            .flatten()
    }
}

/// The devices a document's keys go to: current devices (verified chain, not revoked, of a
/// trusted facility) of its member facilities that its chain does not exclude.
fn member_devices(dir: &Directory, info: &Membership) -> Vec<(DeviceId, String)> {
    info.members
        .iter()
        .filter_map(|m| dir.facility(m.facility))
        .flat_map(|f| {
            f.current_devices()
                .filter(|d| !info.is_excluded(&d.device))
                .map(|d| (d.device, d.age_recipient.clone()))
        })
        .collect()
}

/// Whether `device`, which holds a key of `info`, lost its right to it on positive evidence: it is
/// revoked (by its facility's chain or the relay operator), its facility is revoked, or its facility
/// is no longer a member. A device the directory does not show is not taken to have lost anything.
fn lost_right(dir: &Directory, info: &Membership, device: &DeviceId) -> bool {
    match dir.device(device) {
        Some((f, d)) => d.revoked || f.revoked || info.role_of(f.id).is_none(),
        None => false,
    }
}

/// What applying decoded bundles could not do.
enum ApplyFailed {
    /// Applying the batch at once failed: `am` may hold part of it, so the document is loaded again
    /// and its bundles applied one at a time.
    Batch,
    /// Applying this bundle on its own failed, with Automerge's reason: it is quarantined.
    Bundle(Box<Envelope>, String),
}

/// Applies decoded bundles to `am`: all in one call, or (`careful`) one bundle at a time, each
/// only once every change it depends on is in `am` (so a failure is the bundle's own, never that
/// of an earlier change Automerge kept queued). In careful mode, bundles still waiting for a
/// dependency stay in `blocked` for the next call.
///
/// Errors: an [`ApplyFailed`].
fn apply_batch(
    am: &mut AutoCommit,
    batch: Vec<(Envelope, Vec<automerge::Change>)>,
    careful: bool,
    blocked: &mut Vec<(Envelope, Vec<automerge::Change>)>,
) -> std::result::Result<(), ApplyFailed> {
    if careful {
        let mut pending = std::mem::take(blocked);
        pending.extend(batch);
        loop {
            let mut progressed = false;
            let mut waiting = Vec::new();
            for (env, decoded) in pending {
                let own: BTreeSet<ChangeHash> = decoded.iter().map(|c| c.hash()).collect();
                let ready = decoded.iter().all(|c| {
                    c.deps()
                        .iter()
                        .all(|d| own.contains(d) || am.get_change_meta_by_hash(d).is_some())
                });
                if !ready {
                    waiting.push((env, decoded));
                    continue;
                }
                if let Err(e) = changes::apply(am, decoded) {
                    return Err(ApplyFailed::Bundle(Box::new(env), e.to_string()));
                }
                progressed = true;
            }
            pending = waiting;
            if !progressed || pending.is_empty() {
                break;
            }
        }
        *blocked = pending;
        return Ok(());
    }
    let all: Vec<automerge::Change> = batch.into_iter().flat_map(|(_, c)| c).collect();
    if all.is_empty() {
        return Ok(());
    }
    changes::apply(am, all).map_err(|e| {
        tracing::warn!("Automerge refused a batch of bundles ({e}); applying them one by one");
        ApplyFailed::Batch
    })
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
