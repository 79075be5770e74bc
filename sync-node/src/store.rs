//! The relay's data directory and its SQLite database.
//!
//! Layout of a data directory (`DATA`):
//! - `DATA/node.db` (+ `-wal`, `-shm`): SQLite in WAL mode with `synchronous=FULL`, so a commit that
//!   returned is on disk; the relay answers a push only after its commit.
//! - `DATA/relay.key`: the relay's Ed25519 and age seeds (CBOR, file mode 0600). It authenticates the
//!   relay's libp2p connections and signs what only the relay decides (the directory's version and
//!   the operator's revocations). It never holds the deployment authority's key: `init` copies only
//!   the authority's public key and the deployment id from `ADIR/authority.pub`.
//! - `DATA/pre-migration-v{N}-{unix ms}.db`: a copy of a version-N database taken before
//!   [`Store::open`] upgraded it.
//!
//! The binary logs to stderr only (journald under systemd): no log file grows in `DATA`.
//!
//! Several processes may open the same directory at once (`serve` and the operator's `invite`,
//! `facilities`, `revoke`): WAL lets readers run beside the writer and a busy timeout serialises writers.
//! The schema is versioned with `PRAGMA user_version` and upgraded by [`Store::open`].
//!
//! Only public material lives here: ids, public keys, certificates and device chains, names,
//! membership operations, sizes, times, and the ciphertext bundles and key grants exactly as
//! facilities pushed them (DESIGN invariant 1). Invites are known by their public id only; the
//! secrets stay with whoever issued them.
//!
//! The store has a **generation**: 16 random bytes made at `init` (and anew by a restore), sent in
//! every response frame, so devices notice a relay that went back in time.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use musubi_crdt::crypto::DeviceSecrets;
use musubi_crdt::directory::{
    DeviceChange, DeviceLink, DirectoryBody, FacilityCert, FacilityRecord as Record, safety_number,
};
use musubi_crdt::ids::{BundleId, DeploymentId, DeviceId, FacilityId, FacilityRole, LogHash};
use musubi_crdt::invite::{InviteCode, InviteFor, InviteId, JoinRequest};
use musubi_crdt::limits::{DIRECTORY_FACILITIES_MAX, FACILITY_NAME_BYTES_MAX};
use musubi_crdt::protocol::Generation;
use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::authority::{Approval, AuthorityPublic};
use crate::invite::{INVITE_ADDR_BYTES_MAX, INVITE_ADDRS_MAX};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "node.db";
/// File name of the relay's key inside the data directory.
pub const KEY_FILE: &str = "relay.key";

/// The schema version this build writes. Version 1 (relay-signed membership, before the deployment
/// authority) is not upgraded: it held no deployed data.
pub const SCHEMA_VERSION: i64 = 4;

/// Prefix of the snapshot [`Store::open`] takes before it upgrades a database's schema:
/// `DATA/pre-migration-v{old}-{unix ms}.db`, a consistent copy (`VACUUM INTO`) to go back to.
pub const PRE_MIGRATION_PREFIX: &str = "pre-migration-v";

/// How long a writer waits for another process's write lock before failing, in milliseconds.
pub const BUSY_TIMEOUT_MS: u64 = 10_000;

/// Longest invite lifetime accepted, in seconds (30 days).
pub const INVITE_EXPIRES_SECS_MAX: u64 = musubi_crdt::limits::INVITE_EXPIRES_SECS_MAX;

/// Errors of the data directory and the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory holds no relay yet.
    #[error("no relay data in {}: run `musubi-node init --data {}` first", .0.display(), .0.display())]
    NotInitialised(PathBuf),
    /// `init` found an existing relay.
    #[error("{} already holds a relay; refusing to overwrite it (choose another --data directory)", .0.display())]
    AlreadyInitialised(PathBuf),
    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What was attempted ("create", "read", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file is damaged.
    #[error("the relay key file {} is damaged: {reason}", .path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The database was written by a newer build.
    #[error(
        "the database has schema version {found}, newer than this musubi-node understands ({SCHEMA_VERSION}); upgrade musubi-node"
    )]
    SchemaTooNew {
        /// The version found.
        found: i64,
    },
    /// The database was written before the deployment authority existed.
    #[error(
        "the database has schema version {found}, from before the deployment authority; make a new relay with `musubi-node init --authority ADIR` and enrol the facilities again"
    )]
    SchemaTooOld {
        /// The version found.
        found: i64,
    },
    /// A command that does not upgrade found an older schema.
    #[error(
        "the database has schema version {found}; this musubi-node writes {SCHEMA_VERSION}: stop `serve`, run `musubi-node migrate` (a snapshot is taken first), then start the new `serve`"
    )]
    UpgradeDue {
        /// The version found.
        found: i64,
    },
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not decode (a damaged or hand-edited database).
    #[error("the database holds a damaged value: {0}")]
    Corrupt(String),
    /// No facility has this id or exact name.
    #[error(
        "no facility has the id or name {0:?} (a facility exists once its first device joined); `musubi-node facilities` lists them"
    )]
    UnknownFacility(String),
    /// Several facilities have this exact name.
    #[error(
        "several facilities are named {0:?}; use the facility id instead (`musubi-node facilities` lists them)"
    )]
    AmbiguousFacility(String),
    /// Nothing to revoke matches.
    #[error(
        "no device or facility matches {0:?}; give a device id (12D3KooW...), a facility id, or a facility's exact name"
    )]
    UnknownTarget(String),
    /// The facility was revoked, so it gets no new devices.
    #[error("facility {0:?} has been revoked; it cannot enrol devices")]
    FacilityRevoked(String),
    /// The facility name is empty or too long.
    #[error("a facility name must be 1 to {FACILITY_NAME_BYTES_MAX} bytes of text; got {0} bytes")]
    InvalidName(usize),
    /// A facility with this name exists or is pending.
    #[error(
        "a facility named {0:?} already exists or has an open invite; another device of a facility is invited at one of its devices (`musubi device invite`)"
    )]
    NameTaken(String),
    /// The data directory belongs to another deployment than the authority given.
    #[error(
        "this relay serves deployment {relay}, but the authority certifies deployment {authority}"
    )]
    OtherDeployment {
        /// The relay's deployment.
        relay: String,
        /// The authority's.
        authority: String,
    },
    /// The deployment has the most facilities allowed.
    #[error("the deployment already has {DIRECTORY_FACILITIES_MAX} facilities, the most allowed")]
    TooManyFacilities,
    /// The requested invite lifetime is zero or too long.
    #[error("an invite must expire after more than 0 seconds and at most {} days", INVITE_EXPIRES_SECS_MAX / 86_400)]
    InvalidExpiry,
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch (negative values clamp to the epoch).
pub fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// RFC 3339 text (UTC, seconds) of a stored time.
pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix_ms(ms)).to_string()
}

/// Reads a text column and parses it (ids, roles).
pub(crate) fn parse_col<T>(row: &Row<'_>, i: usize) -> rusqlite::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: String = row.get(i)?;
    s.parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, Type::Text, Box::new(e)))
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    v: u8,
    #[serde(with = "serde_bytes")]
    signing_seed: [u8; 32],
    #[serde(with = "serde_bytes")]
    age_seed: [u8; 32],
}

/// One device of a facility, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    /// Its id (PeerId).
    #[serde(serialize_with = "ser_display")]
    pub device: DeviceId,
    /// Its age recipient (`age1...`).
    #[serde(skip)]
    pub age_recipient: String,
    /// Whether the operator revoked it, or its facility's chain did.
    pub revoked: bool,
    /// When it enrolled, ms since the Unix epoch.
    #[serde(skip)]
    pub enrolled_at_ms: i64,
}

/// One facility with its devices, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FacilityRecord {
    /// Facility id.
    #[serde(serialize_with = "ser_display")]
    pub id: FacilityId,
    /// Name.
    pub name: String,
    /// Role.
    #[serde(serialize_with = "ser_display")]
    pub role: FacilityRole,
    /// Whether the operator revoked the whole facility.
    pub revoked: bool,
    /// The safety number of its root key.
    pub safety_number: String,
    /// Its devices in enrolment order.
    pub devices: Vec<DeviceRecord>,
}

/// A join request waiting for approval, as `musubi-node approve` lists it.
#[derive(Clone, Debug)]
pub struct PendingJoin {
    /// The request.
    pub request: JoinRequest,
    /// The new facility's name (for a new-facility invite).
    pub name: Option<String>,
    /// When it arrived, ms since the Unix epoch.
    pub received_at_ms: i64,
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub(crate) fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("writing to a Vec cannot fail");
    out
}

pub(crate) fn uncbor<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// What `revoke` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// One device.
    Device {
        /// The device.
        device: DeviceId,
        /// Its facility's name.
        facility_name: String,
        /// It was revoked before (nothing changed).
        already: bool,
    },
    /// A whole facility (and so each of its devices).
    Facility {
        /// The facility.
        id: FacilityId,
        /// Its name.
        name: String,
        /// How many devices it has.
        devices: usize,
        /// It was revoked before (nothing changed).
        already: bool,
    },
}

/// The relay's database and data directory.
pub struct Store {
    pub(crate) conn: Connection,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.dir.display())
    }
}

impl Store {
    /// Creates a relay in `dir` for the deployment of `authority`: the directory (mode 0700 if new),
    /// the database, the relay key (mode 0600), a store generation, and the authority's public key
    /// and deployment id (never its secret). `deployment_name` overrides the authority's name.
    ///
    /// Errors: [`StoreError::AlreadyInitialised`] when `dir` already holds a database or key; IO errors.
    pub fn init(
        dir: &Path,
        authority: &AuthorityPublic,
        deployment_name: Option<&str>,
        now: SystemTime,
    ) -> Result<Self, StoreError> {
        let db = dir.join(DB_FILE);
        let key = dir.join(KEY_FILE);
        if db.exists() || key.exists() {
            return Err(StoreError::AlreadyInitialised(dir.to_owned()));
        }
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("set permissions of", dir))?;
        }
        let file = KeyFile {
            v: 1,
            signing_seed: rand::random(),
            age_seed: rand::random(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&file, &mut bytes).expect("writing to a Vec cannot fail");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::AlreadyInitialised(dir.to_owned()),
                _ => StoreError::Io {
                    action: "create",
                    path: key.clone(),
                    source: e,
                },
            })?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &key))?;
        let secrets = DeviceSecrets::from_seeds(file.signing_seed, file.age_seed);

        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mut store = Self {
            conn,
            dir: dir.to_owned(),
        };
        store.configure()?;
        let tx = store.conn.transaction()?;
        let generation: Generation = rand::random();
        for (k, v) in [
            ("deployment_id", authority.deployment.to_string()),
            (
                "deployment_name",
                deployment_name
                    .unwrap_or(&authority.deployment_name)
                    .to_owned(),
            ),
            ("authority", authority.key.to_string()),
            ("relay_peer_id", secrets.device_id().to_string()),
            ("directory_version", "1".to_owned()),
            ("generation", hex::encode(generation)),
            ("created_at", unix_ms(now).to_string()),
        ] {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )?;
        }
        tx.commit()?;
        Ok(store)
    }

    /// Opens the relay in `dir`, upgrading a version-2 database (before the bundle log) in place.
    ///
    /// Errors: [`StoreError::NotInitialised`] when there is no database; [`StoreError::SchemaTooNew`],
    /// [`StoreError::SchemaTooOld`] (version 1, before the trust model: initialise a new relay).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = dir.join(DB_FILE);
        if !db.exists() {
            return Err(StoreError::NotInitialised(dir.to_owned()));
        }
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mut store = Self {
            conn,
            dir: dir.to_owned(),
        };
        store.configure()?;
        Ok(store)
    }

    /// Opens the relay in `dir` for a command that must not change its schema (`status`,
    /// `documents`, `usage`, `backup`: a newer binary's nightly backup must not upgrade the
    /// database under an older `serve`).
    ///
    /// Errors: as [`Store::open`], and [`StoreError::UpgradeDue`] when the schema is older than
    /// this build's.
    pub fn open_current(dir: &Path) -> Result<Self, StoreError> {
        let found = schema_version_of(dir)?;
        if found < SCHEMA_VERSION && found != 0 {
            return Err(StoreError::UpgradeDue { found });
        }
        Self::open(dir)
    }

    /// Opens the database file `db` (a copy a backup just made) read-only, without upgrading it,
    /// to read its meta values.
    pub(crate) fn open_copy(db: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(Self {
            conn,
            dir: db.parent().unwrap_or(Path::new(".")).to_owned(),
        })
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        self.conn
            .busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot switch the database to WAL mode (it is {mode})"
            )));
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut self.conn, &self.dir)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the relay's secrets from `DATA/relay.key`.
    ///
    /// Errors: IO errors, or [`StoreError::KeyFile`] for a damaged file.
    pub fn relay_secrets(&self) -> Result<DeviceSecrets, StoreError> {
        let path = self.dir.join(KEY_FILE);
        let meta = fs::metadata(&path).map_err(io_err("read", &path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the relay key file is readable by other users; run chmod 600 on it");
        }
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let file: KeyFile =
            ciborium::from_reader(bytes.as_slice()).map_err(|e| StoreError::KeyFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if file.v != 1 {
            return Err(StoreError::KeyFile {
                path,
                reason: format!("unknown version {}", file.v),
            });
        }
        Ok(DeviceSecrets::from_seeds(file.signing_seed, file.age_seed))
    }

    fn meta(&self, key: &str) -> Result<String, StoreError> {
        meta(&self.conn, key)
    }

    /// The deployment id.
    pub fn deployment(&self) -> Result<DeploymentId, StoreError> {
        self.meta("deployment_id")?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))
    }

    /// The deployment's name.
    pub fn deployment_name(&self) -> Result<String, StoreError> {
        self.meta("deployment_name")
    }

    /// The deployment authority's key (public), as recorded at `init`.
    pub fn authority(&self) -> Result<DeviceId, StoreError> {
        self.meta("authority")?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))
    }

    /// The relay's device id (PeerId), as recorded at `init`.
    pub fn relay_device(&self) -> Result<DeviceId, StoreError> {
        self.meta("relay_peer_id")?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))
    }

    /// The store's generation (sent in every response frame).
    pub fn generation(&self) -> Result<Generation, StoreError> {
        let text = self.meta("generation")?;
        let mut out = [0u8; 16];
        hex::decode_to_slice(text.trim(), &mut out).map_err(|_| {
            StoreError::Corrupt("meta value generation is not 32 hex digits".into())
        })?;
        Ok(out)
    }

    /// The directory's version: increases with every enrolment, approval and revocation.
    pub fn directory_version(&self) -> Result<u64, StoreError> {
        directory_version(&self.conn)
    }

    /// Replaces the relay's recorded listen addresses (each ending in `/p2p/<relay>`).
    pub fn set_listen_addrs(
        &mut self,
        addrs: &[String],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM listen_addrs", [])?;
        for a in addrs {
            tx.execute(
                "INSERT OR IGNORE INTO listen_addrs (addr, added_at) VALUES (?1, ?2)",
                params![a, unix_ms(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The recorded listen addresses, oldest first.
    pub fn listen_addrs(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT addr FROM listen_addrs ORDER BY rowid")?;
        let rows = st
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// The addresses an invite carries (non-loopback first, at most `INVITE_ADDRS_MAX`).
    pub fn invite_addrs(&self) -> Result<Vec<String>, StoreError> {
        let mut addrs = self.listen_addrs()?;
        addrs.retain(|a| a.len() <= INVITE_ADDR_BYTES_MAX);
        addrs.sort_by_key(|a| is_loopback(a));
        addrs.truncate(INVITE_ADDRS_MAX);
        Ok(addrs)
    }

    /// Every certified facility with its devices, in enrolment order.
    pub fn facilities(&self) -> Result<Vec<FacilityRecord>, StoreError> {
        facilities(&self.conn)
    }

    /// The facility with this id or exact name.
    ///
    /// Errors: [`StoreError::UnknownFacility`], [`StoreError::AmbiguousFacility`].
    pub fn find_facility(&self, id_or_name: &str) -> Result<FacilityRecord, StoreError> {
        let all = self.facilities()?;
        if let Ok(id) = id_or_name.parse::<FacilityId>()
            && let Some(f) = all.iter().find(|f| f.id == id)
        {
            return Ok(f.clone());
        }
        let mut named = all.into_iter().filter(|f| f.name == id_or_name);
        match (named.next(), named.next()) {
            (Some(f), None) => Ok(f),
            (Some(_), Some(_)) => Err(StoreError::AmbiguousFacility(id_or_name.to_owned())),
            _ => Err(StoreError::UnknownFacility(id_or_name.to_owned())),
        }
    }

    /// What the relay signs as its directory: every certificate and device chain it stores, its
    /// version and the operator's revocations.
    pub fn directory_body(&self) -> Result<DirectoryBody, StoreError> {
        directory_body(&self.conn)
    }

    /// Registers an invite for a new facility `name` of `role` (the authority keeps its secret) and
    /// returns the code to hand out. The code carries the recorded listen addresses.
    ///
    /// Errors: invalid name or expiry, a taken name, too many facilities.
    pub fn issue_facility_invite(
        &mut self,
        secret: [u8; 32],
        name: &str,
        role: FacilityRole,
        now: SystemTime,
        expires: Duration,
    ) -> Result<InviteCode, StoreError> {
        if expires.is_zero() || expires.as_secs() > INVITE_EXPIRES_SECS_MAX {
            return Err(StoreError::InvalidExpiry);
        }
        if name.trim().is_empty() || name.len() > FACILITY_NAME_BYTES_MAX || name.trim() != name {
            return Err(StoreError::InvalidName(name.len()));
        }
        let expires_at_ms =
            unix_ms(now).saturating_add(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX));
        let id = InviteId::of_secret(&secret);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM facilities", [], |r| r.get(0))?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= DIRECTORY_FACILITIES_MAX {
            return Err(StoreError::TooManyFacilities);
        }
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM facilities WHERE name = ?1)
                 OR EXISTS (SELECT 1 FROM invites WHERE kind = 'facility' AND name = ?1
                            AND used_at IS NULL AND expires_at > ?2)",
            params![name, unix_ms(now)],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::NameTaken(name.to_owned()));
        }
        tx.execute(
            "INSERT INTO invites (invite_id, kind, name, role, facility, created_at, expires_at)
             VALUES (?1, 'facility', ?2, ?3, NULL, ?4, ?5)",
            params![
                id.0.as_slice(),
                name,
                role.to_string(),
                unix_ms(now),
                expires_at_ms
            ],
        )?;
        tx.commit()?;
        Ok(InviteCode {
            deployment: self.deployment()?,
            relay: self.relay_device()?,
            addrs: self.invite_addrs()?,
            authority: self.authority()?,
            invite: InviteFor::NewFacility {
                name: name.to_owned(),
                role,
            },
            expires_at_ms: u64::try_from(expires_at_ms).unwrap_or(0),
            secret: secret.to_vec(),
        })
    }

    /// Join requests for new-facility invites that wait for the authority, oldest first.
    pub fn pending_facility_joins(&self) -> Result<Vec<PendingJoin>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT j.request, i.name, j.received_at FROM join_requests j
             JOIN invites i ON i.invite_id = j.invite_id
             WHERE i.kind = 'facility' AND j.approved_at IS NULL ORDER BY j.received_at",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(b, name, at)| {
                Ok(PendingJoin {
                    request: uncbor(&b, "stored join request")?,
                    name,
                    received_at_ms: at,
                })
            })
            .collect()
    }

    /// Stores the authority's approval of a new facility (certificate, first link, the device, the
    /// pseudonym keys sealed to the joining device) and bumps the directory version.
    ///
    /// Errors: the invite or request is unknown or already used; database errors.
    pub fn store_approval(
        &mut self,
        request: &JoinRequest,
        approval: &Approval,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        store_approval(&tx, request, approval, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Revokes a device (by device id) or a whole facility (by id or exact name) and bumps the directory
    /// version. Revoking something already revoked changes nothing and says so.
    ///
    /// Errors: [`StoreError::UnknownTarget`], [`StoreError::AmbiguousFacility`].
    pub fn revoke(&mut self, target: &str, now: SystemTime) -> Result<Revocation, StoreError> {
        let target = target.trim();
        if let Ok(device) = target.parse::<DeviceId>() {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(bool, String)> = tx
                .query_row(
                    "SELECT d.revoked, f.name FROM devices d JOIN facilities f ON f.id = d.facility WHERE d.peer_id = ?1",
                    [device.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((already, facility_name)) = row else {
                return Err(StoreError::UnknownTarget(target.to_owned()));
            };
            if !already {
                tx.execute(
                    "UPDATE devices SET revoked = 1, revoked_at = ?2 WHERE peer_id = ?1",
                    params![device.to_string(), unix_ms(now)],
                )?;
                bump_directory_version(&tx, now)?;
            }
            tx.commit()?;
            return Ok(Revocation::Device {
                device,
                facility_name,
                already,
            });
        }
        let f = self.find_facility(target).map_err(|e| match e {
            StoreError::UnknownFacility(t) => StoreError::UnknownTarget(t),
            e => e,
        })?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !f.revoked {
            tx.execute(
                "UPDATE facilities SET revoked = 1, revoked_at = ?2 WHERE id = ?1",
                params![f.id.to_string(), unix_ms(now)],
            )?;
            bump_directory_version(&tx, now)?;
        }
        tx.commit()?;
        Ok(Revocation::Facility {
            id: f.id,
            name: f.name,
            devices: f.devices.len(),
            already: f.revoked,
        })
    }

    /// Devices that may not use the relay: revoked ones (by the operator or their facility's chain)
    /// and every device of a revoked facility.
    pub fn revoked_devices(&self) -> Result<HashSet<DeviceId>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT d.peer_id FROM devices d JOIN facilities f ON f.id = d.facility
             WHERE d.revoked OR d.chain_revoked OR f.revoked",
        )?;
        let set = st
            .query_map([], |r| parse_col::<DeviceId>(r, 0))?
            .collect::<Result<HashSet<_>, _>>()?;
        Ok(set)
    }

    /// Devices that may use the relay: current devices (not revoked by the operator or their
    /// facility's chain) of facilities that are not revoked. Their frames are read in full.
    pub fn current_devices(&self) -> Result<HashSet<DeviceId>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT d.peer_id FROM devices d JOIN facilities f ON f.id = d.facility
             WHERE NOT d.revoked AND NOT d.chain_revoked AND NOT f.revoked",
        )?;
        let set = st
            .query_map([], |r| parse_col::<DeviceId>(r, 0))?
            .collect::<Result<HashSet<_>, _>>()?;
        Ok(set)
    }

    /// `PRAGMA user_version` of the database (its schema version).
    ///
    /// Errors: SQLite errors.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// A meta value, if set.
    pub fn meta_opt(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// The figures `musubi-node status` and the admin listener's `/status` and `/metrics` report:
    /// counts from the database, sizes of its files, the last backup and restore.
    ///
    /// Errors: SQLite errors.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let c = &self.conn;
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = c.query_row(sql, [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let file_bytes = |name: &str| fs::metadata(self.dir.join(name)).map_or(0, |m| m.len());
        let ms = |key: &str| -> Result<Option<i64>, StoreError> {
            Ok(self.meta_opt(key)?.and_then(|v| v.parse().ok()))
        };
        Ok(StoreStats {
            schema_version: c.query_row("PRAGMA user_version", [], |r| r.get(0))?,
            facilities: count("SELECT COUNT(*) FROM facilities WHERE NOT revoked")?,
            devices: count("SELECT COUNT(*) FROM devices WHERE NOT revoked AND NOT chain_revoked")?,
            documents: count("SELECT COUNT(*) FROM documents")?,
            bundles: count("SELECT COALESCE(SUM(bundles), 0) FROM facility_usage")?,
            bundle_bytes: count("SELECT COALESCE(SUM(bytes), 0) FROM facility_usage")?,
            db_bytes: file_bytes(DB_FILE),
            wal_bytes: file_bytes(&format!("{DB_FILE}-wal")),
            // The newest row (rowids grow with inserts): no scan of the table.
            last_bundle_at_ms: c
                .query_row(
                    "SELECT received_at FROM bundles ORDER BY rowid DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?,
            last_backup_at_ms: ms("last_backup_at")?,
            last_backup_bytes: ms("last_backup_bytes")?.and_then(|b| u64::try_from(b).ok()),
            restored_at_ms: ms("restored_at")?,
        })
    }

    /// Stored bundle bytes and bundles per facility (revoked ones included), largest first.
    ///
    /// Errors: SQLite errors.
    pub fn facility_usage(&self) -> Result<Vec<FacilityUsage>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT facility, bytes, bundles FROM facility_usage ORDER BY bytes DESC, facility",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(FacilityUsage {
                    facility: r.get(0)?,
                    bytes: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    bundles: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every document the relay holds, with its public figures (kind, epoch, members, bundles,
    /// bytes, head, last bundle time), newest activity first. Nothing about its content: the relay
    /// has none.
    ///
    /// Errors: SQLite errors.
    pub fn documents_usage(&self) -> Result<Vec<DocumentUsage>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT d.id, d.kind, d.epoch, d.created_at,
                    (SELECT COUNT(*) FROM members m WHERE m.doc = d.id),
                    COUNT(b.seq), COALESCE(SUM(b.bytes), 0), COALESCE(MAX(b.seq), 0), MAX(b.received_at)
             FROM documents d LEFT JOIN bundles b ON b.doc = d.id
             GROUP BY d.id ORDER BY COALESCE(MAX(b.received_at), d.created_at) DESC, d.id",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(DocumentUsage {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    epoch: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    created_at_ms: r.get(3)?,
                    members: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                    bundles: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    bytes: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                    head: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                    last_bundle_at_ms: r.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Writes a consistent copy of the database to `path` (see [`vacuum_into`]) while other
    /// processes (a running `serve`) go on writing.
    ///
    /// Errors: `path` exists; IO or SQLite errors.
    pub fn snapshot_to(&self, path: &Path) -> Result<(), StoreError> {
        vacuum_into(&self.conn, path)
    }

    /// Records a finished backup (shown by `status` and the `last backup` metric).
    ///
    /// Errors: SQLite errors (the database is locked for longer than the busy timeout).
    pub fn record_backup(&self, now: SystemTime, bytes: u64) -> Result<(), StoreError> {
        self.set_meta("last_backup_at", &unix_ms(now).to_string())?;
        self.set_meta("last_backup_bytes", &bytes.to_string())
    }

    /// Makes a database copied from a backup this relay's store: a new generation (every device
    /// then notices the restore, pulls everything again and offers what it holds), a directory
    /// version above any signed before (it counts from `now`), no listen addresses (the serving
    /// process records its own) and no backup yet. One transaction.
    ///
    /// Errors: SQLite errors.
    pub fn mark_restored(
        &mut self,
        backup_taken_at_ms: i64,
        now: SystemTime,
    ) -> Result<Generation, StoreError> {
        let generation: Generation = rand::random();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'generation'",
            [hex::encode(generation)],
        )?;
        bump_directory_version(&tx, now)?;
        tx.execute("DELETE FROM listen_addrs", [])?;
        tx.execute(
            "DELETE FROM meta WHERE key IN ('last_backup_at', 'last_backup_bytes')",
            [],
        )?;
        for (k, v) in [
            ("restored_at", unix_ms(now).to_string()),
            ("restored_from_backup_at", backup_taken_at_ms.to_string()),
        ] {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )?;
        }
        tx.commit()?;
        Ok(generation)
    }

    /// Whether a write transaction can start within `wait` (another process holding the write lock
    /// for longer makes this false); begins and rolls back at once, writing nothing.
    ///
    /// Errors: SQLite errors other than busy/locked.
    pub fn can_write_within(&mut self, wait: Duration) -> Result<bool, StoreError> {
        self.conn.busy_timeout(wait)?;
        let r = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map(drop);
        self.conn
            .busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        match r {
            Ok(()) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// SQLite's `PRAGMA data_version`: changes when another connection (another process) commits.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }
}

/// The schema version of the database in `dir`, read without upgrading it (`musubi-node migrate
/// --check`). 0 for a database no version was written to.
///
/// Errors: [`StoreError::NotInitialised`]; SQLite errors.
pub fn schema_version_of(dir: &Path) -> Result<i64, StoreError> {
    let db = dir.join(DB_FILE);
    if !db.exists() {
        return Err(StoreError::NotInitialised(dir.to_owned()));
    }
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// What [`Store::stats`] reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// `PRAGMA user_version` of the database.
    pub schema_version: i64,
    /// Facilities not revoked.
    pub facilities: u64,
    /// Devices not revoked.
    pub devices: u64,
    /// Documents (with or without bundles).
    pub documents: u64,
    /// Stored bundles.
    pub bundles: u64,
    /// Bytes of the stored bundles (their envelopes as pushed).
    pub bundle_bytes: u64,
    /// Size of `node.db` in bytes.
    pub db_bytes: u64,
    /// Size of `node.db-wal` in bytes (0 when absent).
    pub wal_bytes: u64,
    /// When the newest bundle was stored (ms since the Unix epoch).
    pub last_bundle_at_ms: Option<i64>,
    /// When the last `musubi-node backup` finished (ms since the Unix epoch).
    pub last_backup_at_ms: Option<i64>,
    /// Size of that backup file in bytes.
    pub last_backup_bytes: Option<u64>,
    /// When this store was restored from a backup (ms since the Unix epoch).
    pub restored_at_ms: Option<i64>,
}

/// One facility's stored bundles (see [`Store::facility_usage`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FacilityUsage {
    /// The facility id.
    pub facility: String,
    /// Bytes of its bundles.
    pub bytes: u64,
    /// Its bundles.
    pub bundles: u64,
}

/// One document's public figures (see [`Store::documents_usage`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DocumentUsage {
    /// The document id.
    pub id: String,
    /// Its kind (`referral`, `careplan`, `shelter`, ...), public by design.
    pub kind: String,
    /// Its key epoch.
    pub epoch: u64,
    /// Member facilities.
    pub members: u64,
    /// Stored bundles.
    pub bundles: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Its head: the highest sequence number.
    pub head: u64,
    /// When its first operation was stored (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When its newest bundle was stored (ms since the Unix epoch).
    pub last_bundle_at_ms: Option<i64>,
}

/// Bundle bytes the relay holds for `facility`.
pub(crate) fn facility_bytes(conn: &Connection, facility: &str) -> Result<u64, StoreError> {
    let n: Option<i64> = conn
        .query_row(
            "SELECT bytes FROM facility_usage WHERE facility = ?1",
            [facility],
            |r| r.get(0),
        )
        .optional()?;
    Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
}

/// Counts a stored bundle of `bytes` against `facility` (inside the push transaction).
pub(crate) fn add_facility_bytes(
    conn: &Connection,
    facility: &str,
    bytes: u64,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO facility_usage (facility, bytes, bundles) VALUES (?1, ?2, 1)
         ON CONFLICT (facility) DO UPDATE SET bytes = bytes + excluded.bytes, bundles = bundles + 1",
        params![facility, i64::try_from(bytes).unwrap_or(i64::MAX)],
    )?;
    Ok(())
}

pub(crate) fn meta(conn: &Connection, key: &str) -> Result<String, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::Corrupt(format!("meta value {key} is missing")))
}

/// Stores an approved new facility (see [`Store::store_approval`]) inside the caller's transaction.
pub(crate) fn store_approval(
    conn: &Connection,
    request: &JoinRequest,
    approval: &Approval,
    now: SystemTime,
) -> Result<(), StoreError> {
    let cert = &approval.cert;
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM facilities WHERE id = ?1)",
        [cert.facility.to_string()],
        |r| r.get(0),
    )?;
    if exists {
        return Err(StoreError::Corrupt(format!(
            "facility {} is certified already",
            cert.facility
        )));
    }
    let count: i64 = conn.query_row("SELECT COUNT(*) FROM facilities", [], |r| r.get(0))?;
    if usize::try_from(count).unwrap_or(usize::MAX) >= DIRECTORY_FACILITIES_MAX {
        return Err(StoreError::TooManyFacilities);
    }
    conn.execute(
        "INSERT INTO facilities (id, name, role, cert, enrolled_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            cert.facility.to_string(),
            cert.name,
            cert.role.to_string(),
            cbor(cert),
            unix_ms(now)
        ],
    )?;
    insert_link(conn, &approval.genesis, now)?;
    let changed = conn.execute(
        "UPDATE join_requests SET approved_at = ?2, facility = ?3, sealed_pseudonym = ?4
         WHERE invite_id = ?1 AND device = ?5 AND approved_at IS NULL",
        params![
            request.invite.0.as_slice(),
            unix_ms(now),
            cert.facility.to_string(),
            approval.sealed_pseudonym,
            request.device.device.to_string()
        ],
    )?;
    if changed != 1 {
        return Err(StoreError::Corrupt(
            "no pending join request matches the approval".into(),
        ));
    }
    conn.execute(
        "UPDATE invites SET used_at = ?2, used_by = ?3 WHERE invite_id = ?1",
        params![
            request.invite.0.as_slice(),
            unix_ms(now),
            request.device.device.to_string()
        ],
    )?;
    bump_directory_version(conn, now)?;
    Ok(())
}

/// Appends a verified link to its facility's chain and updates the devices table.
pub(crate) fn insert_link(
    conn: &Connection,
    link: &DeviceLink,
    now: SystemTime,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO device_links (facility, seq, link) VALUES (?1, ?2, ?3)",
        params![link.facility.to_string(), link.seq, cbor(link)],
    )?;
    match &link.change {
        DeviceChange::Add {
            device,
            age_recipient,
        } => {
            conn.execute(
                "INSERT INTO devices (peer_id, facility, age_recipient, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
                params![device.to_string(), link.facility.to_string(), age_recipient, unix_ms(now)],
            )?;
        }
        DeviceChange::Revoke { device } => {
            conn.execute(
                "UPDATE devices SET chain_revoked = 1, revoked_at = COALESCE(revoked_at, ?2) WHERE peer_id = ?1",
                params![device.to_string(), unix_ms(now)],
            )?;
        }
    }
    Ok(())
}

/// The certificate and device chain of a facility.
pub(crate) fn facility_chain(
    conn: &Connection,
    facility: FacilityId,
) -> Result<Option<(FacilityCert, Vec<DeviceLink>)>, StoreError> {
    let cert: Option<Vec<u8>> = conn
        .query_row(
            "SELECT cert FROM facilities WHERE id = ?1",
            [facility.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    let Some(cert) = cert else { return Ok(None) };
    let cert: FacilityCert = uncbor(&cert, "stored certificate")?;
    let mut st = conn.prepare("SELECT link FROM device_links WHERE facility = ?1 ORDER BY seq")?;
    let links = st
        .query_map([facility.to_string()], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(|b| uncbor(b, "stored device link"))
        .collect::<Result<Vec<DeviceLink>, _>>()?;
    Ok(Some((cert, links)))
}

fn is_loopback(addr: &str) -> bool {
    addr.starts_with("/ip4/127.") || addr.starts_with("/ip6/::1/")
}

pub(crate) fn directory_version(conn: &Connection) -> Result<u64, StoreError> {
    let v = meta(conn, "directory_version")?;
    v.parse()
        .map_err(|_| StoreError::Corrupt(format!("directory_version {v:?} is not a number")))
}

/// Moves the directory's version on: to the later of one more and `now` in ms since the Unix epoch.
/// Time-based, so a database put back to an older copy (a file-level restore keeps the store
/// generation) never serves two different directories under one version once it changes again.
pub(crate) fn bump_directory_version(conn: &Connection, now: SystemTime) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = CAST(MAX(CAST(value AS INTEGER) + 1, ?1) AS TEXT) WHERE key = 'directory_version'",
        [unix_ms(now)],
    )?;
    Ok(())
}

pub(crate) fn facilities(conn: &Connection) -> Result<Vec<FacilityRecord>, StoreError> {
    let mut st =
        conn.prepare("SELECT id, name, role, revoked, cert FROM facilities ORDER BY rowid")?;
    let mut out = st
        .query_map([], |r| {
            Ok((
                FacilityRecord {
                    id: parse_col(r, 0)?,
                    name: r.get(1)?,
                    role: parse_col(r, 2)?,
                    revoked: r.get(3)?,
                    safety_number: String::new(),
                    devices: vec![],
                },
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(mut f, cert)| {
            let cert: FacilityCert = uncbor(&cert, "stored certificate")?;
            f.safety_number = safety_number(f.id, &cert.root);
            Ok(f)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut st = conn.prepare(
        "SELECT facility, peer_id, age_recipient, revoked OR chain_revoked, enrolled_at FROM devices ORDER BY enrolled_at, rowid",
    )?;
    let devices = st.query_map([], |r| {
        Ok((
            parse_col::<FacilityId>(r, 0)?,
            DeviceRecord {
                device: parse_col(r, 1)?,
                age_recipient: r.get(2)?,
                revoked: r.get(3)?,
                enrolled_at_ms: r.get(4)?,
            },
        ))
    })?;
    let index: std::collections::HashMap<FacilityId, usize> =
        out.iter().enumerate().map(|(i, f)| (f.id, i)).collect();
    for d in devices {
        let (f, d) = d?;
        let i = *index.get(&f).ok_or_else(|| {
            StoreError::Corrupt(format!("device {} of unknown facility {f}", d.device))
        })?;
        out[i].devices.push(d);
    }
    Ok(out)
}

pub(crate) fn directory_body(conn: &Connection) -> Result<DirectoryBody, StoreError> {
    let deployment = meta(conn, "deployment_id")?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
    let authority = meta(conn, "authority")?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
    let mut st = conn.prepare("SELECT cert FROM facilities ORDER BY rowid")?;
    let certs = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut st = conn.prepare("SELECT facility, link FROM device_links ORDER BY facility, seq")?;
    let mut links: std::collections::HashMap<String, Vec<DeviceLink>> = Default::default();
    for row in st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })? {
        let (f, b) = row?;
        links
            .entry(f)
            .or_default()
            .push(uncbor(&b, "stored device link")?);
    }
    let facilities = certs
        .iter()
        .map(|b| {
            let cert: FacilityCert = uncbor(b, "stored certificate")?;
            let links = links.remove(&cert.facility.to_string()).unwrap_or_default();
            Ok(Record { cert, links })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut st = conn.prepare("SELECT peer_id FROM devices WHERE revoked ORDER BY rowid")?;
    let revoked_devices = st
        .query_map([], |r| parse_col::<DeviceId>(r, 0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut st = conn.prepare("SELECT id FROM facilities WHERE revoked ORDER BY rowid")?;
    let revoked_facilities = st
        .query_map([], |r| parse_col::<FacilityId>(r, 0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DirectoryBody {
        deployment,
        authority,
        version: directory_version(conn)?,
        facilities,
        revoked_devices,
        revoked_facilities,
    })
}

const SCHEMA_V2: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE listen_addrs (
    addr     TEXT PRIMARY KEY,
    added_at INTEGER NOT NULL
);
CREATE TABLE facilities (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    cert        BLOB NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0,
    enrolled_at INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE TABLE device_links (
    facility TEXT NOT NULL REFERENCES facilities(id),
    seq      INTEGER NOT NULL,
    link     BLOB NOT NULL,
    PRIMARY KEY (facility, seq)
);
CREATE TABLE devices (
    peer_id       TEXT PRIMARY KEY,
    facility      TEXT NOT NULL REFERENCES facilities(id),
    age_recipient TEXT NOT NULL,
    revoked       INTEGER NOT NULL DEFAULT 0,
    chain_revoked INTEGER NOT NULL DEFAULT 0,
    enrolled_at   INTEGER NOT NULL,
    revoked_at    INTEGER
);
CREATE INDEX devices_by_facility ON devices(facility);
CREATE TABLE invites (
    invite_id  BLOB PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('facility', 'device')),
    name       TEXT,
    role       TEXT,
    facility   TEXT REFERENCES facilities(id),
    registered_by TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    used_by    TEXT
);
CREATE TABLE join_requests (
    invite_id        BLOB PRIMARY KEY REFERENCES invites(invite_id),
    device           TEXT NOT NULL,
    facility         TEXT,
    request          BLOB NOT NULL,
    received_at      INTEGER NOT NULL,
    approved_at      INTEGER,
    sealed_pseudonym BLOB
);
CREATE TABLE documents (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    view       BLOB NOT NULL,
    epoch      INTEGER NOT NULL,
    ops        INTEGER NOT NULL,
    ops_head   BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE members (
    doc      TEXT NOT NULL REFERENCES documents(id),
    facility TEXT NOT NULL REFERENCES facilities(id),
    role     TEXT NOT NULL CHECK (role IN ('reader', 'writer', 'owner')),
    PRIMARY KEY (doc, facility)
);
CREATE INDEX members_by_facility ON members(facility);
CREATE TABLE ops (
    doc         TEXT NOT NULL REFERENCES documents(id),
    idx         INTEGER NOT NULL,
    hash        BLOB NOT NULL UNIQUE,
    author      TEXT NOT NULL,
    encoded     BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (doc, idx)
);
CREATE TABLE grants (
    hash        BLOB PRIMARY KEY,
    doc         TEXT NOT NULL REFERENCES documents(id),
    epoch       INTEGER NOT NULL,
    author      TEXT NOT NULL,
    encoded     BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX grants_by_doc ON grants(doc);
CREATE TABLE bundles (
    doc         TEXT NOT NULL REFERENCES documents(id),
    seq         INTEGER NOT NULL,
    bundle_id   BLOB NOT NULL UNIQUE,
    envelope    BLOB NOT NULL,
    author      TEXT NOT NULL,
    facility    TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    log         BLOB NOT NULL,
    PRIMARY KEY (doc, seq)
);
";

/// Tables of version 4: each facility's stored bundle bytes, kept in the push transaction, so the
/// storage quota is checked without summing the facility's bundles.
const SCHEMA_V4_USAGE: &str = "
CREATE TABLE facility_usage (
    facility TEXT PRIMARY KEY,
    bytes    INTEGER NOT NULL,
    bundles  INTEGER NOT NULL
);
";

/// Brings a new database to [`SCHEMA_VERSION`] and an older one (version 2 or 3) up to it, after a
/// snapshot of it (`DATA/pre-migration-v{old}-{unix ms}.db`); refuses older and newer ones.
fn migrate(conn: &mut Connection, dir: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: version });
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version == 0 {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Re-read under the write lock: another process may have created it meanwhile.
        let locked: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if locked == 0 {
            tx.execute_batch(SCHEMA_V2)?;
            tx.execute_batch(SCHEMA_V4_USAGE)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        return Ok(());
    }
    if version < 2 {
        return Err(StoreError::SchemaTooOld { found: version });
    }
    let snapshot = dir.join(format!(
        "{PRE_MIGRATION_PREFIX}{version}-{}.db",
        unix_ms(SystemTime::now())
    ));
    // Written under another name and renamed when whole: a migration killed half way (a start
    // timeout) leaves no truncated file that looks like a good snapshot.
    let partial = dir.join(format!(
        ".{PRE_MIGRATION_PREFIX}{version}-{}.partial",
        std::process::id()
    ));
    let _ = fs::remove_file(&partial);
    vacuum_into(conn, &partial)?;
    fs::rename(&partial, &snapshot).map_err(io_err("rename", &partial))?;
    tracing::info!(from = version, to = SCHEMA_VERSION, snapshot = %snapshot.display(), "upgrading the database schema; a snapshot of the old one was taken");
    if version == 2 {
        add_bundle_log(conn)?;
    }
    add_facility_usage(conn)
}

/// Writes a consistent copy of the database `conn` is open on to `path` (SQLite `VACUUM INTO`: one
/// read transaction, so writers in other processes go on; the copy is compact and in rollback
/// journal mode). The file is made with mode 0600.
///
/// Errors: `path` exists; IO or SQLite errors (a full disk among them).
pub(crate) fn vacuum_into(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    // Made empty first with mode 0600, so the copy of the relay's database is never world-readable.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    let target = path
        .to_str()
        .ok_or_else(|| StoreError::Corrupt(format!("{} is not UTF-8", path.display())))?;
    if let Err(e) = conn.execute("VACUUM INTO ?1", [target]) {
        let _ = fs::remove_file(path);
        return Err(e.into());
    }
    Ok(())
}

/// Version 3 → 4: [`SCHEMA_V4_USAGE`], filled from the stored bundles, in one transaction.
fn add_facility_usage(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let locked: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if locked == 3 {
        tx.execute_batch(SCHEMA_V4_USAGE)?;
        tx.execute(
            "INSERT INTO facility_usage (facility, bytes, bundles)
             SELECT facility, SUM(bytes), COUNT(*) FROM bundles GROUP BY facility",
            [],
        )?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

/// Version 2 → 3: every bundle gets its place in the document's bundle log ([`LogHash`]), counted
/// from [`LogHash::ZERO`] in sequence order, in one transaction.
fn add_bundle_log(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let locked: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if locked == 2 {
        tx.execute_batch("ALTER TABLE bundles ADD COLUMN log BLOB NOT NULL DEFAULT x''")?;
        // One document at a time, so memory is bounded by the largest document, not the table.
        let docs: Vec<String> = {
            let mut st = tx.prepare("SELECT DISTINCT doc FROM bundles")?;
            st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut read =
            tx.prepare("SELECT seq, bundle_id FROM bundles WHERE doc = ?1 ORDER BY seq")?;
        let mut write = tx.prepare("UPDATE bundles SET log = ?3 WHERE doc = ?1 AND seq = ?2")?;
        for doc in docs {
            let rows: Vec<(i64, Vec<u8>)> = read
                .query_map([&doc], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut log = LogHash::ZERO;
            for (seq, id) in rows {
                let id: [u8; 32] = id.try_into().map_err(|_| {
                    StoreError::Corrupt("a stored bundle id is not 32 bytes".into())
                })?;
                log = log.next(&BundleId(id));
                write.execute(params![doc, seq, log.0.as_slice()])?;
            }
        }
        drop((read, write));
        tx.pragma_update(None, "user_version", 3)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> AuthorityPublic {
        let key = DeviceSecrets::from_seeds([5; 32], [6; 32]);
        AuthorityPublic {
            v: 1,
            deployment: DeploymentId::from_random_bytes([1; 16]),
            deployment_name: "柏崎市".into(),
            key: key.device_id(),
            age_recipient: key.public().age_recipient,
        }
    }

    #[test]
    fn init_refuses_to_overwrite_and_keeps_only_the_authoritys_public_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("relay");
        assert!(matches!(
            Store::open(&dir),
            Err(StoreError::NotInitialised(_))
        ));
        let a = authority();
        let store = Store::init(&dir, &a, None, SystemTime::now()).expect("init");
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let relay = store.relay_secrets().expect("key").device_id();
        assert_eq!(store.relay_device().expect("relay id"), relay);
        assert_eq!(store.deployment_name().expect("name"), "柏崎市");
        assert_eq!(store.deployment().expect("deployment"), a.deployment);
        assert_eq!(store.authority().expect("authority"), a.key);
        assert_ne!(store.generation().expect("generation"), [0; 16]);
        drop(store);
        assert!(matches!(
            Store::init(&dir, &a, Some("x"), SystemTime::now()),
            Err(StoreError::AlreadyInitialised(_))
        ));
        let again = Store::open(&dir).expect("open");
        assert_eq!(again.relay_secrets().expect("key").device_id(), relay);
    }

    #[test]
    fn newer_and_older_schemas_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::init(tmp.path(), &authority(), None, SystemTime::now()).expect("init");
        store
            .conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump");
        drop(store);
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::SchemaTooNew { .. })
        ));
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::init(tmp.path(), &authority(), None, SystemTime::now()).expect("init");
        store
            .conn
            .pragma_update(None, "user_version", 1)
            .expect("set");
        drop(store);
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::SchemaTooOld { found: 1 })
        ));
    }

    #[test]
    fn a_version_2_database_gets_its_bundle_log_in_sequence_order_and_its_usage_after_a_snapshot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::init(tmp.path(), &authority(), None, SystemTime::now()).expect("init");
        let c = &store.conn;
        c.execute_batch(
            "PRAGMA foreign_keys = OFF; ALTER TABLE bundles DROP COLUMN log; DROP TABLE facility_usage;",
        )
        .expect("a version-2 table");
        let id = |n: u8| BundleId([n; 32]);
        for (doc, seq, n) in [("x", 2, 12), ("x", 1, 11), ("y", 1, 21), ("x", 3, 13)] {
            c.execute(
                "INSERT INTO bundles (doc, seq, bundle_id, envelope, author, facility, epoch, bytes, received_at)
                 VALUES (?1, ?2, ?3, x'00', 'a', 'f', 0, 1, 0)",
                params![doc, seq, id(n).0.as_slice()],
            )
            .expect("insert");
        }
        c.pragma_update(None, "user_version", 2).expect("version 2");
        drop(store);

        let store = Store::open(tmp.path()).expect("a version-2 database opens");
        let v: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
        let log = |doc: &str, seq: i64| -> Vec<u8> {
            store
                .conn
                .query_row(
                    "SELECT log FROM bundles WHERE doc = ?1 AND seq = ?2",
                    params![doc, seq],
                    |r| r.get(0),
                )
                .expect("log")
        };
        let x1 = LogHash::ZERO.next(&id(11));
        let x3 = x1.next(&id(12)).next(&id(13));
        assert_eq!(log("x", 1), x1.0.to_vec());
        assert_eq!(log("x", 3), x3.0.to_vec());
        assert_eq!(log("y", 1), LogHash::ZERO.next(&id(21)).0.to_vec());
        assert_eq!(
            store.facility_usage().expect("usage"),
            vec![FacilityUsage {
                facility: "f".into(),
                bytes: 4,
                bundles: 4
            }]
        );
        // The snapshot taken before the upgrade is the version-2 database, whole.
        let snapshots: Vec<PathBuf> = fs::read_dir(tmp.path())
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{PRE_MIGRATION_PREFIX}2-")))
            })
            .collect();
        assert_eq!(snapshots.len(), 1, "one pre-migration snapshot");
        let old = Connection::open(&snapshots[0]).expect("open the snapshot");
        let (v, n): (i64, i64) = old
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), COUNT(*) FROM bundles",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("read the snapshot");
        assert_eq!((v, n), (2, 4));
    }

    #[test]
    fn invites_check_names_and_expiry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut store =
            Store::init(tmp.path(), &authority(), None, SystemTime::now()).expect("init");
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let code = store
            .issue_facility_invite([1; 32], "港診療所", FacilityRole::Clinic, now, day)
            .expect("first invite");
        assert_eq!(code.authority, authority().key);
        assert!(matches!(
            store.issue_facility_invite([2; 32], "港診療所", FacilityRole::Clinic, now, day),
            Err(StoreError::NameTaken(_))
        ));
        assert!(matches!(
            store.issue_facility_invite([3; 32], " ", FacilityRole::Clinic, now, day),
            Err(StoreError::InvalidName(_))
        ));
        assert!(matches!(
            store.issue_facility_invite([5; 32], "本部", FacilityRole::Hq, now, Duration::ZERO),
            Err(StoreError::InvalidExpiry)
        ));
        assert!(matches!(
            store.find_facility("nobody"),
            Err(StoreError::UnknownFacility(_))
        ));
        assert!(matches!(
            store.revoke("nobody", now),
            Err(StoreError::UnknownTarget(_))
        ));
    }
}
