//! The relay's data directory and its SQLite database.
//!
//! Layout of a data directory (`DATA`):
//! - `DATA/node.db` (+ `-wal`, `-shm`): SQLite in WAL mode with `synchronous=FULL`, so a commit that
//!   returned is on disk; the relay answers a push only after its commit.
//! - `DATA/relay.key`: the relay's Ed25519 and age seeds (CBOR, file mode 0600). It signs the directory
//!   and authenticates the relay's libp2p connections.
//! - `DATA/logs/node.log`: plain-text log written by the binary.
//!
//! Several processes may open the same directory at once (`serve` and the operator's `invite`,
//! `facilities`, `revoke`): WAL lets readers run beside the writer and a busy timeout serialises writers.
//! The schema is versioned with `PRAGMA user_version` and upgraded by [`Store::open`].
//!
//! Only public material lives here: ids, public keys, names, membership, sizes, times, and the
//! ciphertext bundles and key grants exactly as facilities pushed them (DESIGN invariant 1).

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use musubi_crdt::crypto::DeviceSecrets;
use musubi_crdt::directory::{DeviceEntry, Directory, FacilityEntry};
use musubi_crdt::ids::{DeploymentId, DeviceId, FacilityId, FacilityRole};
use musubi_crdt::limits::{DIRECTORY_FACILITIES_MAX, FACILITY_NAME_BYTES_MAX};
use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::invite::{INVITE_ADDR_BYTES_MAX, INVITE_ADDRS_MAX, InviteCode, hash_secret};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "node.db";
/// File name of the relay's key inside the data directory.
pub const KEY_FILE: &str = "relay.key";
/// Directory of the log file inside the data directory.
pub const LOG_DIR: &str = "logs";
/// File name of the log inside [`LOG_DIR`].
pub const LOG_FILE: &str = "node.log";

/// The schema version this build writes ([`Store::open`] upgrades older ones).
pub const SCHEMA_VERSION: i64 = 1;

/// How long a writer waits for another process's write lock before failing, in milliseconds.
pub const BUSY_TIMEOUT_MS: u64 = 10_000;

/// Longest invite lifetime accepted, in seconds (30 days).
pub const INVITE_EXPIRES_SECS_MAX: u64 = 30 * 24 * 3600;

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
        "a facility named {0:?} already exists or has an open invite; to enrol another device of it use --facility"
    )]
    NameTaken(String),
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

/// What an invite enrols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InviteKind {
    /// A new facility with this name and role; the joining device is its first.
    NewFacility {
        /// The facility's name (1 to `FACILITY_NAME_BYTES_MAX` bytes).
        name: String,
        /// What kind of facility.
        role: FacilityRole,
    },
    /// Another device of an existing facility.
    Device {
        /// The facility.
        facility: FacilityId,
    },
}

/// An invite as issued: the code to hand out and what it enrols.
#[derive(Debug, Clone)]
pub struct IssuedInvite {
    /// The code (contains the secret; print it once, never log it).
    pub code: InviteCode,
    /// What it enrols.
    pub kind: InviteKind,
    /// The facility's name (the new one, or the existing one for a device invite).
    pub facility_name: String,
    /// When it stops working, ms since the Unix epoch.
    pub expires_at_ms: i64,
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
    /// Whether the operator revoked it.
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
    /// Its devices in enrolment order.
    pub devices: Vec<DeviceRecord>,
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
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
    /// Creates a relay in `dir`: the directory (mode 0700 if new), the database, the relay key
    /// (mode 0600) and a random deployment id, named `deployment_name`.
    ///
    /// Errors: [`StoreError::AlreadyInitialised`] when `dir` already holds a database or key; IO errors.
    pub fn init(dir: &Path, deployment_name: &str, now: SystemTime) -> Result<Self, StoreError> {
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
        let deployment = DeploymentId::from_random_bytes(rand::random());
        for (k, v) in [
            ("deployment_id", deployment.to_string()),
            ("deployment_name", deployment_name.to_owned()),
            ("relay_peer_id", secrets.device_id().to_string()),
            ("directory_version", "1".to_owned()),
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

    /// Opens the relay in `dir`, upgrading its schema if needed.
    ///
    /// Errors: [`StoreError::NotInitialised`] when there is no database; [`StoreError::SchemaTooNew`].
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
        migrate(&mut self.conn)
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
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::Corrupt(format!("meta value {key} is missing")))
    }

    /// The deployment's secret for pseudonymous card ids (32 bytes, HMAC-SHA256 key; DESIGN invariant 7).
    ///
    /// Made on first use and handed to every device at enrolment. The relay never sees a card id:
    /// pseudonyms live only inside encrypted documents.
    pub fn pseudonym_secret(&self) -> Result<[u8; 32], StoreError> {
        let fresh: [u8; 32] = rand::random();
        self.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('pseudonym_secret', ?1)",
            [hex::encode(fresh)],
        )?;
        let text = self.meta("pseudonym_secret")?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out).map_err(|_| {
            StoreError::Corrupt("meta value pseudonym_secret is not 64 hex digits".into())
        })?;
        Ok(out)
    }

    /// The deployment id.
    pub fn deployment(&self) -> Result<DeploymentId, StoreError> {
        self.meta("deployment_id")?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))
    }

    /// The deployment's name as given to `init`.
    pub fn deployment_name(&self) -> Result<String, StoreError> {
        self.meta("deployment_name")
    }

    /// The relay's device id (PeerId), as recorded at `init`.
    pub fn relay_device(&self) -> Result<DeviceId, StoreError> {
        self.meta("relay_peer_id")?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))
    }

    /// The directory's version: increases with every enrolment and revocation.
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

    /// Every facility with its devices, in enrolment order.
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

    /// The signed-directory content: every facility with its devices' public keys.
    pub fn directory(&self) -> Result<Directory, StoreError> {
        directory(&self.conn)
    }

    /// Issues a single-use invite with `secret` (32 random bytes) that expires `expires` after `now`.
    ///
    /// The code carries the recorded listen addresses (at most `INVITE_ADDRS_MAX`, non-loopback first).
    /// Errors: invalid name or expiry, a taken name, an unknown or revoked facility, too many facilities.
    pub fn issue_invite(
        &mut self,
        kind: InviteKind,
        secret: [u8; 32],
        now: SystemTime,
        expires: Duration,
    ) -> Result<IssuedInvite, StoreError> {
        if expires.is_zero() || expires.as_secs() > INVITE_EXPIRES_SECS_MAX {
            return Err(StoreError::InvalidExpiry);
        }
        let expires_at_ms =
            unix_ms(now).saturating_add(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let facility_name = match &kind {
            InviteKind::NewFacility { name, .. } => {
                if name.trim().is_empty()
                    || name.len() > FACILITY_NAME_BYTES_MAX
                    || name.trim() != name
                {
                    return Err(StoreError::InvalidName(name.len()));
                }
                let count: i64 =
                    tx.query_row("SELECT COUNT(*) FROM facilities", [], |r| r.get(0))?;
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
                    return Err(StoreError::NameTaken(name.clone()));
                }
                name.clone()
            }
            InviteKind::Device { facility } => {
                let row: Option<(String, bool)> = tx
                    .query_row(
                        "SELECT name, revoked FROM facilities WHERE id = ?1",
                        [facility.to_string()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                match row {
                    None => return Err(StoreError::UnknownFacility(facility.to_string())),
                    Some((name, true)) => return Err(StoreError::FacilityRevoked(name)),
                    Some((name, false)) => name,
                }
            }
        };
        let (k, name, role, facility) = match &kind {
            InviteKind::NewFacility { name, role } => {
                ("facility", Some(name.clone()), Some(role.to_string()), None)
            }
            InviteKind::Device { facility } => ("device", None, None, Some(facility.to_string())),
        };
        tx.execute(
            "INSERT INTO invites (secret_hash, kind, name, role, facility, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                hash_secret(&secret).as_slice(),
                k,
                name,
                role,
                facility,
                unix_ms(now),
                expires_at_ms
            ],
        )?;
        tx.commit()?;
        let relay = self.relay_device()?;
        let mut addrs = self.listen_addrs()?;
        addrs.retain(|a| a.len() <= INVITE_ADDR_BYTES_MAX);
        addrs.sort_by_key(|a| is_loopback(a));
        addrs.truncate(INVITE_ADDRS_MAX);
        let code = InviteCode {
            deployment: self.deployment()?,
            relay,
            addrs,
            secret: secret.to_vec(),
        };
        Ok(IssuedInvite {
            code,
            kind,
            facility_name,
            expires_at_ms,
        })
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
                bump_directory_version(&tx)?;
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
            bump_directory_version(&tx)?;
        }
        tx.commit()?;
        Ok(Revocation::Facility {
            id: f.id,
            name: f.name,
            devices: f.devices.len(),
            already: f.revoked,
        })
    }

    /// Devices that may not use the relay: revoked ones and every device of a revoked facility.
    pub fn revoked_devices(&self) -> Result<HashSet<DeviceId>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT d.peer_id FROM devices d JOIN facilities f ON f.id = d.facility WHERE d.revoked OR f.revoked",
        )?;
        let set = st
            .query_map([], |r| parse_col::<DeviceId>(r, 0))?
            .collect::<Result<HashSet<_>, _>>()?;
        Ok(set)
    }

    /// SQLite's `PRAGMA data_version`: changes when another connection (another process) commits.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }
}

fn is_loopback(addr: &str) -> bool {
    addr.starts_with("/ip4/127.") || addr.starts_with("/ip6/::1/")
}

pub(crate) fn directory_version(conn: &Connection) -> Result<u64, StoreError> {
    let v: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'directory_version'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::Corrupt("meta value directory_version is missing".into()))?;
    v.parse()
        .map_err(|_| StoreError::Corrupt(format!("directory_version {v:?} is not a number")))
}

pub(crate) fn bump_directory_version(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'directory_version'",
        [],
    )?;
    Ok(())
}

pub(crate) fn facilities(conn: &Connection) -> Result<Vec<FacilityRecord>, StoreError> {
    let mut st = conn.prepare("SELECT id, name, role, revoked FROM facilities ORDER BY rowid")?;
    let mut out = st
        .query_map([], |r| {
            Ok(FacilityRecord {
                id: parse_col(r, 0)?,
                name: r.get(1)?,
                role: parse_col(r, 2)?,
                revoked: r.get(3)?,
                devices: vec![],
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut st = conn.prepare(
        "SELECT facility, peer_id, age_recipient, revoked, enrolled_at FROM devices ORDER BY enrolled_at, rowid",
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

pub(crate) fn directory(conn: &Connection) -> Result<Directory, StoreError> {
    let deployment: String = conn.query_row(
        "SELECT value FROM meta WHERE key = 'deployment_id'",
        [],
        |r| r.get(0),
    )?;
    let deployment = deployment
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
    let facilities = facilities(conn)?
        .into_iter()
        .map(|f| FacilityEntry {
            id: f.id,
            name: f.name,
            role: f.role,
            revoked: f.revoked,
            devices: f
                .devices
                .into_iter()
                .map(|d| DeviceEntry {
                    device: d.device,
                    age_recipient: d.age_recipient,
                    revoked: d.revoked,
                })
                .collect(),
        })
        .collect();
    Ok(Directory {
        deployment,
        version: directory_version(conn)?,
        facilities,
    })
}

const SCHEMA_V1: &str = "
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
    revoked     INTEGER NOT NULL DEFAULT 0,
    enrolled_at INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE TABLE devices (
    peer_id       TEXT PRIMARY KEY,
    facility      TEXT NOT NULL REFERENCES facilities(id),
    age_recipient TEXT NOT NULL,
    revoked       INTEGER NOT NULL DEFAULT 0,
    enrolled_at   INTEGER NOT NULL,
    revoked_at    INTEGER
);
CREATE INDEX devices_by_facility ON devices(facility);
CREATE TABLE invites (
    secret_hash BLOB PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('facility', 'device')),
    name        TEXT,
    role        TEXT,
    facility    TEXT REFERENCES facilities(id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT
);
CREATE TABLE documents (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    owner      TEXT NOT NULL REFERENCES facilities(id),
    epoch      INTEGER NOT NULL DEFAULT 0,
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
    hash        BLOB PRIMARY KEY,
    doc         TEXT NOT NULL REFERENCES documents(id),
    author      TEXT NOT NULL,
    encoded     BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX ops_by_doc ON ops(doc);
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
    PRIMARY KEY (doc, seq)
);
";

/// Brings the schema to [`SCHEMA_VERSION`], one step per version, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: version });
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Re-read under the write lock: another process may have migrated meanwhile.
        let locked: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if locked == version {
            match version {
                0 => tx.execute_batch(SCHEMA_V1)?,
                v => {
                    return Err(StoreError::Corrupt(format!(
                        "no migration from schema version {v}"
                    )));
                }
            }
            tx.pragma_update(None, "user_version", version + 1)?;
        }
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_to_overwrite_and_open_needs_init() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("relay");
        assert!(matches!(
            Store::open(&dir),
            Err(StoreError::NotInitialised(_))
        ));
        let store = Store::init(&dir, "柏崎市", SystemTime::now()).expect("init");
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let relay = store.relay_secrets().expect("key").device_id();
        assert_eq!(store.relay_device().expect("relay id"), relay);
        assert_eq!(store.deployment_name().expect("name"), "柏崎市");
        drop(store);
        assert!(matches!(
            Store::init(&dir, "x", SystemTime::now()),
            Err(StoreError::AlreadyInitialised(_))
        ));
        let again = Store::open(&dir).expect("open");
        assert_eq!(again.relay_secrets().expect("key").device_id(), relay);
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::init(tmp.path(), "x", SystemTime::now()).expect("init");
        store
            .conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump");
        drop(store);
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::SchemaTooNew { .. })
        ));
    }

    #[test]
    fn invites_check_names_and_facilities() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut store = Store::init(tmp.path(), "x", SystemTime::now()).expect("init");
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let kind = InviteKind::NewFacility {
            name: "港診療所".into(),
            role: FacilityRole::Clinic,
        };
        store
            .issue_invite(kind.clone(), [1; 32], now, day)
            .expect("first invite");
        assert!(matches!(
            store.issue_invite(kind, [2; 32], now, day),
            Err(StoreError::NameTaken(_))
        ));
        let empty = InviteKind::NewFacility {
            name: " ".into(),
            role: FacilityRole::Clinic,
        };
        assert!(matches!(
            store.issue_invite(empty, [3; 32], now, day),
            Err(StoreError::InvalidName(_))
        ));
        let ghost = InviteKind::Device {
            facility: FacilityId::from_random_bytes([0; 16]),
        };
        assert!(matches!(
            store.issue_invite(ghost, [4; 32], now, day),
            Err(StoreError::UnknownFacility(_))
        ));
        let ok = InviteKind::NewFacility {
            name: "本部".into(),
            role: FacilityRole::Hq,
        };
        assert!(matches!(
            store.issue_invite(ok, [5; 32], now, Duration::ZERO),
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
