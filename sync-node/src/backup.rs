//! Online backup and restore of a relay's data directory (`musubi-node backup`, `restore`).
//!
//! A backup file is a POSIX tar archive (the `tar` crate) of three members, in this order:
//! 1. `musubi-backup.json`, the [`Manifest`]: the deployment, relay, store generation and schema
//!    version of the copy, when it was taken, and the size and BLAKE3 checksum of the other two;
//! 2. `relay.key.age`: the relay key file and the database's BLAKE3 checksum ([`Sealed`]), sealed
//!    with the backup passphrase (age scrypt, the same sealing as a device's key): a stolen backup
//!    does not let its thief be the relay, and a database swapped in the archive (with a manifest
//!    made to match) is refused, since only the passphrase opens the checksum it must match;
//! 3. `node.db`: a consistent copy of the database made with SQLite's `VACUUM INTO` in one read
//!    transaction while `serve` goes on writing.
//!
//! A backup holds what the relay holds: public material and ciphertext (DESIGN invariant 1); no
//! plaintext and no document key is in it. The database in it is not encrypted: its metadata
//! (facility names, devices, who is a member of which document, sizes and times) is readable by
//! whoever holds the file, as on the relay's disk.
//!
//! A restore refuses a directory that is not empty, checks every checksum before the store is
//! opened, and gives the store a new generation ([`Store::mark_restored`]): every device then
//! notices it talks to a restored relay, pulls everything again and offers what it holds, so what
//! it pushed after the backup reaches the relay again.

use std::fs;
use std::io::{Read, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use musubi_crdt::crypto::{self, CryptoError};
use serde::{Deserialize, Serialize};

use crate::store::{DB_FILE, KEY_FILE, SCHEMA_VERSION, Store, StoreError, rfc3339, unix_ms};

/// `format` of a [`Manifest`].
pub const FORMAT: &str = "musubi-node-backup";
/// The manifest version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside the archive.
pub const MANIFEST_NAME: &str = "musubi-backup.json";
/// Name of the sealed relay key inside the archive.
pub const KEY_NAME: &str = "relay.key.age";
/// File name extension of the backups `backup --out-dir` writes and rotates.
pub const EXTENSION: &str = "musubi-backup";
/// Largest manifest or sealed key read from an archive (a hostile file cannot make a restore
/// allocate more).
const SMALL_MEMBER_BYTES_MAX: u64 = 64 * 1024;

/// Errors of backup and restore.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sealing or opening the relay key failed (a wrong passphrase among them).
    #[error("the relay key in the backup: {0}")]
    Key(#[from] CryptoError),
    /// The restore target is not empty.
    #[error(
        "{} is not empty; a restore goes into a new, empty directory (the relay's old data stays untouched)",
        .0.display()
    )]
    NotEmpty(PathBuf),
    /// The file is not a backup this build can read, or is damaged.
    #[error("{} is not a usable backup: {reason}", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn damaged(path: &Path, reason: impl Into<String>) -> BackupError {
    BackupError::Damaged {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// A member's size and BLAKE3 checksum (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    /// Bytes.
    pub bytes: u64,
    /// BLAKE3 of the bytes, 64 hex digits.
    pub blake3: String,
}

/// The first member of a backup file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The deployment id.
    pub deployment: String,
    /// The deployment's name.
    pub deployment_name: String,
    /// The relay's peer id (its key is in the archive, sealed).
    pub relay: String,
    /// The store generation of the copy (hex); a restore makes a new one.
    pub generation: String,
    /// The copy's schema version.
    pub schema_version: i64,
    /// When the copy was taken (RFC 3339, UTC).
    pub created_at: String,
    /// The same in ms since the Unix epoch.
    pub created_at_ms: i64,
    /// `node.db`.
    pub database: Checksum,
    /// `relay.key.age`.
    pub key: Checksum,
}

/// The sealed member's plaintext (JSON): the relay key file and the database's checksum.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// The relay key file's bytes, hex.
    relay_key: String,
    /// BLAKE3 of `node.db`, hex.
    database_blake3: String,
}

/// What a backup wrote.
#[derive(Debug)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its manifest.
    pub manifest: Manifest,
    /// How long it took.
    pub took: Duration,
    /// Older backups removed by `--keep`.
    pub removed: Vec<PathBuf>,
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    /// The backup's manifest.
    pub manifest: Manifest,
    /// The restored store's new generation (hex).
    pub generation: String,
    /// How long it took.
    pub took: Duration,
}

fn checksum_of(path: &Path) -> Result<Checksum, BackupError> {
    let mut f = fs::File::open(path).map_err(io("read", path))?;
    let mut h = blake3::Hasher::new();
    let bytes = std::io::copy(&mut f, &mut h).map_err(io("read", path))?;
    Ok(Checksum {
        bytes,
        blake3: h.finalize().to_hex().to_string(),
    })
}

/// Takes a backup of `store` into the new file `out` (mode 0600): the consistent database copy,
/// the relay key sealed with `passphrase` (age scrypt, work factor `log_n`), the manifest. The
/// file appears whole or not at all (written beside, synced, renamed). Records the backup in the
/// store (`status`, the last-backup metric).
///
/// Errors: `out` exists; a passphrase shorter than the minimum; IO and SQLite errors (a full
/// disk among them: nothing is left behind).
pub fn backup(
    store: &Store,
    out: &Path,
    passphrase: &str,
    log_n: u8,
    now: SystemTime,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    crypto::check_passphrase(passphrase)?;
    if out.exists() {
        return Err(BackupError::Io {
            action: "create",
            path: out.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    // Names of this process's own: a manual backup and the timer's at the same time do not meet.
    let partial = with_suffix(out, &format!(".{}.partial", std::process::id()));
    let db_copy = with_suffix(out, &format!(".{}.partial-db", std::process::id()));
    let result = (|| {
        store.snapshot_to(&db_copy)?;
        let database = checksum_of(&db_copy)?;
        let key_path = store.dir().join(KEY_FILE);
        let key_plain = fs::read(&key_path).map_err(io("read", &key_path))?;
        let inner = serde_json::to_vec(&Sealed {
            relay_key: hex::encode(&key_plain),
            database_blake3: database.blake3.clone(),
        })
        .expect("serialises");
        let sealed = crypto::seal_with_passphrase(&inner, passphrase, log_n)?;
        let copy = Store::open_copy(&db_copy)?;
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            version: FORMAT_VERSION,
            deployment: copy.deployment()?.to_string(),
            deployment_name: copy.deployment_name()?,
            relay: copy.relay_device()?.to_string(),
            generation: hex::encode(copy.generation()?),
            schema_version: copy.schema_version()?,
            created_at: rfc3339(unix_ms(now)),
            created_at_ms: unix_ms(now),
            database,
            key: Checksum {
                bytes: sealed.len() as u64,
                blake3: blake3::hash(&sealed).to_hex().to_string(),
            },
        };
        drop(copy);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io("create", &partial))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        append_bytes(&mut tar, MANIFEST_NAME, &json, now).map_err(io("write", &partial))?;
        append_bytes(&mut tar, KEY_NAME, &sealed, now).map_err(io("write", &partial))?;
        let mut db = fs::File::open(&db_copy).map_err(io("read", &db_copy))?;
        let mut header = header_for(manifest.database.bytes, now);
        tar.append_data(&mut header, DB_FILE, &mut db)
            .map_err(io("write", &partial))?;
        let file = tar
            .into_inner()
            .map_err(io("write", &partial))?
            .into_inner()
            .map_err(|e| BackupError::Io {
                action: "write",
                path: partial.clone(),
                source: e.into_error(),
            })?;
        file.sync_all().map_err(io("sync", &partial))?;
        let bytes = file.metadata().map_err(io("read", &partial))?.len();
        fs::rename(&partial, out).map_err(io("rename", &partial))?;
        sync_parent(out);
        Ok((manifest, bytes))
    })();
    let _ = fs::remove_file(&db_copy);
    let (manifest, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    store.record_backup(now, bytes)?;
    Ok(BackupReport {
        path: out.to_owned(),
        bytes,
        manifest,
        took: started.elapsed(),
        removed: vec![],
    })
}

/// [`backup`] into `dir` as `musubi-node-<UTC time>.musubi-backup`, then removes the oldest
/// backups there beyond the newest `keep` (only files of that name pattern).
///
/// Errors: as [`backup`]; `dir` cannot be read.
pub fn backup_into_dir(
    store: &Store,
    dir: &Path,
    keep: usize,
    passphrase: &str,
    log_n: u8,
    now: SystemTime,
) -> Result<BackupReport, BackupError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    // RFC 3339 without the characters a file name should not have; sorts in time order.
    let stamp: String = rfc3339(unix_ms(now))
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let out = dir.join(format!("musubi-node-{stamp}.{EXTENSION}"));
    let mut report = backup(store, &out, passphrase, log_n, now)?;
    let mut ours: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io("read", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("musubi-node-") && n.ends_with(&format!(".{EXTENSION}"))
            })
        })
        .collect();
    ours.sort();
    let excess = ours.len().saturating_sub(keep.max(1));
    for old in ours.into_iter().filter(|p| *p != report.path).take(excess) {
        match fs::remove_file(&old) {
            Ok(()) => report.removed.push(old),
            Err(e) => {
                tracing::warn!(path = %old.display(), error = %e, "cannot remove an old backup")
            }
        }
    }
    Ok(report)
}

/// Restores the backup `file` into the new or empty directory `data`, opening the relay key with
/// `passphrase`, and gives the store a new generation. On any failure the files it wrote are
/// removed again.
///
/// Errors: [`BackupError::NotEmpty`]; [`BackupError::Damaged`] (not a backup, a newer format, a
/// checksum that does not match, a truncated file); [`BackupError::Key`] for a wrong passphrase;
/// IO and SQLite errors.
pub fn restore(
    file: &Path,
    data: &Path,
    passphrase: &str,
    now: SystemTime,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    if data.exists() {
        let mut entries = fs::read_dir(data).map_err(io("read", data))?;
        if entries.next().is_some() {
            return Err(BackupError::NotEmpty(data.to_owned()));
        }
    } else {
        fs::create_dir_all(data).map_err(io("create", data))?;
    }
    fs::set_permissions(data, fs::Permissions::from_mode(0o700))
        .map_err(io("set permissions of", data))?;
    let result = restore_files(file, data, passphrase).and_then(|manifest| {
        // Opened only now that every checksum matched (an older schema is upgraded here).
        let mut store = Store::open(data)?;
        let key = store.relay_secrets()?.device_id();
        if key.to_string() != manifest.relay || key != store.relay_device()? {
            return Err(damaged(
                file,
                "the relay key does not belong to the relay of the database",
            ));
        }
        let generation = store.mark_restored(manifest.created_at_ms, now)?;
        Ok((manifest, generation))
    });
    let (manifest, generation) = match result {
        Ok(r) => r,
        Err(e) => {
            // The directory was empty: nothing that could be served on the old generation stays.
            if let Ok(entries) = fs::read_dir(data) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
            return Err(e);
        }
    };
    Ok(RestoreReport {
        manifest,
        generation: hex::encode(generation),
        took: started.elapsed(),
    })
}

/// Writes the key and the database of the backup `file` into `data`, each checked against the
/// manifest; the key is opened with `passphrase` before the database is read.
fn restore_files(file: &Path, data: &Path, passphrase: &str) -> Result<Manifest, BackupError> {
    let f = fs::File::open(file).map_err(io("read", file))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(f));
    let mut entries = archive.entries().map_err(io("read", file))?;
    let mut next = |what: &str| {
        entries
            .next()
            .ok_or_else(|| damaged(file, format!("it ends before its {what}")))?
            .map_err(|e| damaged(file, format!("its {what} cannot be read: {e}")))
    };
    let manifest = manifest_from(file, next("manifest")?)?;

    let key = next("relay key")?;
    if key.path().map_err(io("read", file))?.to_string_lossy() != KEY_NAME {
        return Err(damaged(
            file,
            format!("its second member is not {KEY_NAME}"),
        ));
    }
    let sealed = read_small(file, key)?;
    if blake3::hash(&sealed).to_hex().as_str() != manifest.key.blake3 {
        return Err(damaged(
            file,
            "the sealed relay key does not match its checksum",
        ));
    }
    let inner: Sealed = serde_json::from_slice(&crypto::open_with_passphrase(&sealed, passphrase)?)
        .map_err(|e| damaged(file, format!("its sealed member does not parse: {e}")))?;
    if inner.database_blake3 != manifest.database.blake3 {
        return Err(damaged(
            file,
            "its database is not the one this backup sealed (the archive was altered)",
        ));
    }
    let plain = hex::decode(&inner.relay_key)
        .map_err(|_| damaged(file, "its sealed relay key is not hex"))?;
    write_new(&data.join(KEY_FILE), &plain)?;

    let db = next("database")?;
    if db.path().map_err(io("read", file))?.to_string_lossy() != DB_FILE {
        return Err(damaged(file, format!("its third member is not {DB_FILE}")));
    }
    // A plain file of exactly the size the manifest says, read no further: a sparse or oversized
    // member cannot fill the disk.
    let header_size = db.header().size().map_err(io("read", file))?;
    if db.header().entry_type() != tar::EntryType::Regular || header_size != manifest.database.bytes
    {
        return Err(damaged(
            file,
            "its database member is not a plain file of the size its manifest says",
        ));
    }
    let mut db = db.take(manifest.database.bytes);
    let partial = with_suffix(&data.join(DB_FILE), ".partial");
    let out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io("create", &partial))?;
    let mut writer = HashingWriter {
        inner: std::io::BufWriter::new(out),
        hasher: blake3::Hasher::new(),
    };
    let bytes = std::io::copy(&mut db, &mut writer)
        .map_err(|e| damaged(file, format!("its database cannot be read: {e}")))?;
    let HashingWriter { inner, hasher } = writer;
    let out = inner.into_inner().map_err(|e| BackupError::Io {
        action: "write",
        path: partial.clone(),
        source: e.into_error(),
    })?;
    if bytes != manifest.database.bytes
        || hasher.finalize().to_hex().as_str() != manifest.database.blake3
    {
        return Err(damaged(
            file,
            "the database does not match its checksum (a damaged or truncated file)",
        ));
    }
    out.sync_all().map_err(io("sync", &partial))?;
    fs::rename(&partial, data.join(DB_FILE)).map_err(io("rename", &partial))?;
    sync_parent(&data.join(DB_FILE));
    Ok(manifest)
}

/// Writes through and hashes what it writes.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the manifest of the backup `file` without restoring it (checks the format only).
///
/// Errors: [`BackupError::Damaged`]; IO errors.
pub fn read_manifest(file: &Path) -> Result<Manifest, BackupError> {
    let f = fs::File::open(file).map_err(io("read", file))?;
    let mut archive = tar::Archive::new(f);
    let mut entries = archive.entries().map_err(io("read", file))?;
    let first = entries
        .next()
        .ok_or_else(|| damaged(file, "the archive is empty"))?
        .map_err(io("read", file))?;
    manifest_from(file, first)
}

fn manifest_from<R: Read>(file: &Path, entry: tar::Entry<'_, R>) -> Result<Manifest, BackupError> {
    let name = entry
        .path()
        .map_err(io("read", file))?
        .to_string_lossy()
        .into_owned();
    if name != MANIFEST_NAME {
        return Err(damaged(
            file,
            format!("its first member is {name:?}, not {MANIFEST_NAME}"),
        ));
    }
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(damaged(file, "its manifest is not a plain file"));
    }
    let bytes = read_small(file, entry)?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| damaged(file, format!("its manifest does not parse: {e}")))?;
    if m.format != FORMAT {
        return Err(damaged(file, format!("its format is {:?}", m.format)));
    }
    if m.version != FORMAT_VERSION {
        return Err(damaged(
            file,
            format!(
                "it is format version {}; this musubi-node reads {FORMAT_VERSION}",
                m.version
            ),
        ));
    }
    if m.schema_version > SCHEMA_VERSION {
        return Err(damaged(
            file,
            format!(
                "its database is schema version {}, newer than this musubi-node ({SCHEMA_VERSION}); restore it with a newer musubi-node",
                m.schema_version
            ),
        ));
    }
    Ok(m)
}

fn read_small<R: Read>(file: &Path, entry: tar::Entry<'_, R>) -> Result<Vec<u8>, BackupError> {
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(damaged(file, "a member is not a plain file"));
    }
    let mut out = Vec::new();
    entry
        .take(SMALL_MEMBER_BYTES_MAX + 1)
        .read_to_end(&mut out)
        .map_err(io("read", file))?;
    if out.len() as u64 > SMALL_MEMBER_BYTES_MAX {
        return Err(damaged(file, "a member that should be small is too large"));
    }
    Ok(out)
}

fn header_for(size: u64, now: SystemTime) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o600);
    h.set_mtime(u64::try_from(unix_ms(now) / 1000).unwrap_or(0));
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append_bytes<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    now: SystemTime,
) -> std::io::Result<()> {
    let mut h = header_for(bytes.len() as u64, now);
    tar.append_data(&mut h, name, bytes)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent()
        && let Ok(d) = fs::File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
    {
        let _ = d.sync_all();
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::AuthorityPublic;
    use musubi_crdt::crypto::DeviceSecrets;
    use musubi_crdt::ids::DeploymentId;

    const PASS: &str = "夜間バックアップの合言葉";

    fn relay(dir: &Path) -> Store {
        let key = DeviceSecrets::from_seeds([5; 32], [6; 32]);
        let authority = AuthorityPublic {
            v: 1,
            deployment: DeploymentId::from_random_bytes([1; 16]),
            deployment_name: "柏崎市".into(),
            key: key.device_id(),
            age_recipient: key.public().age_recipient,
        };
        Store::init(dir, &authority, None, SystemTime::now()).expect("init")
    }

    /// The archive's members, in order.
    fn members(file: &Path) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(fs::File::open(file).expect("open"));
        a.entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").to_string_lossy().into_owned();
                let mut b = Vec::new();
                e.read_to_end(&mut b).expect("read");
                (name, b)
            })
            .collect()
    }

    fn write_members(file: &Path, members: &[(String, Vec<u8>)], db_size: Option<u64>) {
        let mut t = tar::Builder::new(fs::File::create(file).expect("create"));
        for (name, bytes) in members {
            let mut h = header_for(bytes.len() as u64, SystemTime::now());
            if name == DB_FILE
                && let Some(s) = db_size
            {
                h.set_size(s);
                h.set_cksum();
                t.append_data(&mut h, name, std::io::repeat(0).take(s))
                    .expect("append");
                continue;
            }
            t.append_data(&mut h, name, bytes.as_slice())
                .expect("append");
        }
        t.finish().expect("finish");
    }

    #[test]
    fn a_backup_restores_with_a_new_generation_and_the_same_relay() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = relay(&tmp.path().join("relay"));
        let file = tmp.path().join("b.musubi-backup");
        let r = backup(&store, &file, PASS, 10, SystemTime::now()).expect("backup");
        assert_eq!(
            r.manifest.relay,
            store.relay_device().expect("id").to_string()
        );
        assert!(store.stats().expect("stats").last_backup_at_ms.is_some());
        let target = tmp.path().join("restored");
        let done = restore(&file, &target, PASS, SystemTime::now()).expect("restore");
        let restored = Store::open(&target).expect("open");
        assert_eq!(
            restored.relay_device().expect("id"),
            store.relay_device().expect("id")
        );
        assert_ne!(
            restored.generation().expect("g"),
            store.generation().expect("g")
        );
        assert_eq!(
            done.generation,
            hex::encode(restored.generation().expect("g"))
        );
        assert!(restored.stats().expect("stats").restored_at_ms.is_some());
        // Not into a directory that holds anything.
        assert!(matches!(
            restore(&file, &target, PASS, SystemTime::now()),
            Err(BackupError::NotEmpty(_))
        ));
    }

    #[test]
    fn a_swapped_database_and_a_sparse_one_are_refused_and_leave_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = relay(&tmp.path().join("relay"));
        let file = tmp.path().join("b.musubi-backup");
        backup(&store, &file, PASS, 10, SystemTime::now()).expect("backup");
        let mut m = members(&file);

        // Another database, with a manifest made to match it: the sealed checksum does not.
        let other = relay(&tmp.path().join("other"));
        let swapped_db = tmp.path().join("other.db");
        other.snapshot_to(&swapped_db).expect("copy");
        let db = fs::read(&swapped_db).expect("read");
        let mut manifest: Manifest = serde_json::from_slice(&m[0].1).expect("manifest");
        manifest.database = Checksum {
            bytes: db.len() as u64,
            blake3: blake3::hash(&db).to_hex().to_string(),
        };
        m[0].1 = serde_json::to_vec(&manifest).expect("json");
        m[2].1 = db;
        let altered = tmp.path().join("altered.musubi-backup");
        write_members(&altered, &m, None);
        let target = tmp.path().join("t1");
        let e = restore(&altered, &target, PASS, SystemTime::now()).expect_err("refused");
        assert!(e.to_string().contains("altered"), "{e}");
        assert_eq!(fs::read_dir(&target).expect("dir").count(), 0);

        // A database member far larger than the manifest says: refused before it is written.
        let m = members(&file);
        let huge = tmp.path().join("huge.musubi-backup");
        write_members(&huge, &m, Some(64 * 1024 * 1024));
        let target = tmp.path().join("t2");
        let e = restore(&huge, &target, PASS, SystemTime::now()).expect_err("refused");
        assert!(e.to_string().contains("size"), "{e}");
        assert_eq!(fs::read_dir(&target).expect("dir").count(), 0);

        // A wrong passphrase.
        let target = tmp.path().join("t3");
        let e =
            restore(&file, &target, "ちがう合言葉です", SystemTime::now()).expect_err("refused");
        assert!(matches!(e, BackupError::Key(_)), "{e}");
        assert_eq!(fs::read_dir(&target).expect("dir").count(), 0);
    }
}
