//! The facility's local store: one SQLite database (`DATA/facility.db`, WAL) holding only
//! ciphertext bundles, signed grants and operations, and public metadata (DESIGN invariant 2).
//!
//! Tables: `meta` (enrolment, the signed directory, its verified view and this device's pins),
//! `documents` (each document's membership as its verified operation chain leaves it, and how many of
//! those operations the relay confirmed), `ops` (each document's signed operation chain, by position;
//! operations that do not chain yet are kept aside as provisional), `bundles` (encrypted envelopes by
//! BLAKE3 id with the relay's sequence number once acknowledged or pulled), `outbox` (items waiting for
//! the relay, in order; `stale` ones wait to be signed or sealed again), `cursors` (last pulled sequence
//! number per document), `grants` (sealed document keys), `device_invites` (invites this device issued
//! for another device of its facility; the secret sealed to the device's own key).
//! Several processes (the CLI and `sync --watch`) share it; each write is one transaction, begun
//! IMMEDIATE so it waits for the write lock (busy timeout) instead of failing when another process
//! committed between its first read and its first write.

use std::path::Path;
use std::time::Duration;

use musubi_crdt::bundle::Envelope;
use musubi_crdt::ids::{BundleId, DocumentId, DocumentKind, Epoch, LogHash, Seq};
use musubi_crdt::invite::InviteId;
use musubi_crdt::membership::Membership;
use musubi_crdt::ops::{DocOp, KeyGrant, OpHash};
use musubi_crdt::protocol::PushItem;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

/// Schema version written to `PRAGMA user_version`. Versions 1 to 3 (before the deployment authority)
/// are not upgraded: a device made by them joins again.
pub const SCHEMA_VERSION: i64 = 4;

/// Errors of the local store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (disk full, locked for longer than the busy timeout, corrupted file).
    #[error("local database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value did not decode (the file was damaged or written by a newer version).
    #[error("damaged local data: {0}")]
    Corrupt(String),
    /// The database was written by a newer Musubi.
    #[error(
        "the local database has schema version {0}, newer than this program understands ({SCHEMA_VERSION}); update Musubi"
    )]
    TooNew(i64),
    /// The database was written before the deployment authority existed.
    #[error(
        "the local database has schema version {0}, from before the deployment authority; make a new data directory (`musubi init`) and join again"
    )]
    TooOld(i64),
}

type Result<T> = std::result::Result<T, StoreError>;

fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn parse_doc(text: &str) -> Result<DocumentId> {
    text.parse()
        .map_err(|e: musubi_crdt::ids::ParseIdError| StoreError::Corrupt(e.to_string()))
}

fn uncbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Where a bundle came from (shown in sync state as the path a document last synced by).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Written on this device.
    Local,
    /// Written on this device in an epoch it knows is superseded (the new key had not arrived):
    /// kept here, never offered or exported, sealed again when the key arrives.
    Held,
    /// Pulled from the relay.
    Relay,
    /// Received from a facility device on the same LAN.
    Lan,
    /// Imported from an offline-transfer file.
    File,
}

impl Origin {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Held => "held",
            Origin::Relay => "relay",
            Origin::Lan => "lan",
            Origin::File => "file",
        }
    }
}

/// One row of the outbox.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    /// Row id (the session's `OutboxId`).
    pub id: u64,
    /// The item.
    pub item: PushItem,
}

/// A stored bundle.
#[derive(Clone, Debug)]
pub struct BundleRow {
    /// Its id.
    pub id: BundleId,
    /// Its document.
    pub doc: DocumentId,
    /// The relay's sequence number, once known.
    pub seq: Option<Seq>,
    /// The envelope.
    pub envelope: Envelope,
}

/// A quarantined bundle: stored, never applied, shared or exported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuarantineRow {
    /// The bundle's id (hex BLAKE3 of its envelope).
    pub bundle: String,
    /// Its document.
    pub doc: String,
    /// The device that signed it (as its envelope names it).
    pub author: String,
    /// The facility its envelope names.
    pub facility: String,
    /// The relay's sequence number, when it came from the relay.
    pub seq: Option<u64>,
    /// Why it is not applied.
    pub reason: String,
    /// When it was quarantined, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A document as stored locally.
#[derive(Clone, Debug)]
pub struct DocumentRow {
    /// Its membership, from its verified operation chain.
    pub info: Membership,
    /// How many of its operations the relay served or acknowledged.
    pub relay_ops: u32,
}

/// One operation of a document's local chain.
#[derive(Clone, Debug)]
pub struct ChainOp {
    /// Its position (0: the `Create`).
    pub idx: u32,
    /// The operation.
    pub op: DocOp,
    /// Whether the relay served or acknowledged it.
    pub confirmed: bool,
}

/// An invite this device issued for another device of its facility.
#[derive(Clone, Debug)]
pub struct DeviceInviteRow {
    /// Its id.
    pub invite: InviteId,
    /// The secret, sealed to this device's age recipient.
    pub sealed_secret: Vec<u8>,
    /// When it expires, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// The device that used it, once approved.
    pub used_by: Option<String>,
}

/// The open store.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let conn = Connection::open(dir.join("facility.db"))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(version));
        }
        if version > 0 && version < SCHEMA_VERSION {
            return Err(StoreError::TooOld(version));
        }
        if version == 0 {
            conn.execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS documents (
                    id TEXT PRIMARY KEY, kind TEXT NOT NULL, view BLOB NOT NULL,
                    relay_ops INTEGER NOT NULL DEFAULT 0, relay_head INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE IF NOT EXISTS superseded (id BLOB PRIMARY KEY, doc TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS revocation_marks (
                    device TEXT NOT NULL, doc TEXT NOT NULL, seq INTEGER NOT NULL, ops INTEGER NOT NULL,
                    PRIMARY KEY (device, doc));
                 CREATE TABLE IF NOT EXISTS ops (
                    hash BLOB PRIMARY KEY, doc TEXT NOT NULL, idx INTEGER, op_cbor BLOB NOT NULL,
                    confirmed INTEGER NOT NULL DEFAULT 0);
                 CREATE UNIQUE INDEX IF NOT EXISTS ops_chain ON ops(doc, idx);
                 CREATE TABLE IF NOT EXISTS bundles (
                    id BLOB PRIMARY KEY, doc TEXT NOT NULL, seq INTEGER, envelope BLOB NOT NULL,
                    origin TEXT NOT NULL, stored_at_ms INTEGER NOT NULL);
                 CREATE INDEX IF NOT EXISTS bundles_doc ON bundles(doc, seq);
                 CREATE TABLE IF NOT EXISTS outbox (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT, bundle BLOB, epoch INTEGER,
                    item BLOB NOT NULL, state TEXT NOT NULL DEFAULT 'pending', error TEXT);
                 CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, id);
                 CREATE TABLE IF NOT EXISTS cursors (doc TEXT PRIMARY KEY, seq INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS witnesses (doc TEXT PRIMARY KEY, seq INTEGER NOT NULL, log BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS grants (hash BLOB PRIMARY KEY, doc TEXT NOT NULL, epoch INTEGER NOT NULL, grant_cbor BLOB NOT NULL);
                 CREATE INDEX IF NOT EXISTS grants_doc ON grants(doc, epoch);
                 CREATE TABLE IF NOT EXISTS snapshots (doc TEXT PRIMARY KEY, upto_rowid INTEGER NOT NULL, sealed BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS device_invites (
                    invite_id BLOB PRIMARY KEY, sealed_secret BLOB NOT NULL, expires_at_ms INTEGER NOT NULL,
                    created_at_ms INTEGER NOT NULL, used_by TEXT);
                 PRAGMA user_version = 4;
                 COMMIT;",
            )?;
        }
        // Bundles kept but never applied (a table added within schema version 4: a store made
        // before it gains it empty).
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS quarantine (
                bundle BLOB PRIMARY KEY, doc TEXT NOT NULL, author TEXT NOT NULL, facility TEXT NOT NULL,
                seq INTEGER, reason TEXT NOT NULL, at_ms INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS quarantine_doc ON quarantine(doc);
             CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, sealed BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS bundles_unsent ON bundles(origin) WHERE seq IS NULL;",
        )?;
        Ok(Self { conn })
    }

    /// The SQLite connection, for domain modules that keep tables of their own (they create them
    /// with `CREATE TABLE IF NOT EXISTS` and must store only ciphertext or public metadata).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// A counter that changes whenever another connection commits (SQLite `PRAGMA data_version`).
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// Reads a metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Reads and decodes a CBOR metadata value.
    pub fn meta_cbor<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.meta(key)?.map(|b| uncbor(&b)).transpose()
    }

    /// Writes a metadata value.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Removes a metadata value (nothing when absent).
    pub fn delete_meta(&self, key: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM meta WHERE key = ?1", params![key])?;
        Ok(())
    }

    /// Appends an audit entry (`sealed`, at `seq`) and records the chain's new head (`head`, CBOR of
    /// `audit::ChainHead`) in one IMMEDIATE transaction. `expect_head` is the head the entry was
    /// chained to: if another process appended meanwhile, nothing is written and `Ok(false)` says
    /// to chain again.
    pub fn audit_append(
        &self,
        expect_head: Option<&[u8]>,
        seq: u64,
        sealed: &[u8],
        head: &[u8],
    ) -> Result<bool> {
        // Inside an engine operation's transaction, a savepoint; else a transaction of its own.
        let top = self.begin_operation()?;
        let written = (|| -> Result<bool> {
            let now: Option<Vec<u8>> = self.meta("audit_head")?;
            if now.as_deref() != expect_head {
                return Ok(false);
            }
            self.conn.execute(
                "INSERT INTO audit (seq, sealed) VALUES (?1, ?2)",
                params![seq as i64, sealed],
            )?;
            self.conn.execute(
                "INSERT INTO meta (key, value) VALUES ('audit_head', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![head],
            )?;
            Ok(true)
        })();
        self.end_operation(top, matches!(written, Ok(true)))?;
        written
    }

    /// The audit chain's head as recorded (CBOR of `audit::ChainHead`), if any entry was written.
    pub fn audit_head(&self) -> Result<Option<Vec<u8>>> {
        self.meta("audit_head")
    }

    /// Whether the audit table holds no row.
    pub fn audit_rows_empty(&self) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM audit)", [], |r| r.get(0))?)
    }

    /// Every stored audit row, in order: its number and sealed entry.
    pub fn audit_rows(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut st = self
            .conn
            .prepare("SELECT seq, sealed FROM audit ORDER BY seq")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Up to `limit` stored audit rows after `seq`, in order: their number and sealed entry.
    pub fn audit_rows_after(&self, seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut st = self
            .conn
            .prepare("SELECT seq, sealed FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = st
            .query_map(params![seq as i64, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Removes the audit rows up to `through` (retention) and keeps `anchor` (the sealed last
    /// removed entry, where verification starts again), in one transaction.
    pub fn audit_prune(&self, through: u64, anchor: &[u8]) -> Result<usize> {
        let top = self.begin_operation()?;
        let out = (|| -> Result<usize> {
            let n = self
                .conn
                .execute("DELETE FROM audit WHERE seq <= ?1", params![through as i64])?;
            self.set_meta("audit_anchor", anchor)?;
            Ok(n)
        })();
        self.end_operation(top, out.is_ok())?;
        out
    }

    /// Removes metadata values that held a secret, so that no copy stays in the database file or
    /// its write-ahead log: deleted with SQLite's `secure_delete` (the freed space is overwritten
    /// with zeros), then the log is checkpointed and truncated.
    pub fn erase_meta(&self, keys: &[&str]) -> Result<()> {
        self.conn.pragma_update(None, "secure_delete", true)?;
        let deleted = keys.iter().try_for_each(|k| {
            self.conn
                .execute("DELETE FROM meta WHERE key = ?1", params![k])
                .map(|_| ())
        });
        self.conn.pragma_update(None, "secure_delete", false)?;
        deleted?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Writes a CBOR metadata value.
    pub fn set_meta_cbor<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<()> {
        self.set_meta(key, &cbor(value))
    }

    /// Inserts or replaces a document's membership (keeping the relay's confirmed count).
    pub fn put_document(&self, view: &Membership) -> Result<()> {
        put_document(&self.conn, view)
    }

    /// Records how many operations of a document the relay served or acknowledged.
    pub fn set_relay_ops(&self, doc: DocumentId, count: u32) -> Result<()> {
        self.conn.execute(
            "UPDATE documents SET relay_ops = ?2 WHERE id = ?1",
            params![doc.to_string(), count],
        )?;
        Ok(())
    }

    /// Records the relay's newest sequence number of a document, as it listed it.
    pub fn set_relay_head(&self, doc: DocumentId, head: Seq) -> Result<()> {
        self.conn.execute(
            "UPDATE documents SET relay_head = MAX(relay_head, ?2) WHERE id = ?1",
            params![doc.to_string(), head.0 as i64],
        )?;
        Ok(())
    }

    /// Marks, for every document, how far the relay's sequence went when this device first learned
    /// that `device` was revoked: a bundle by it after that mark was taken by a relay that should
    /// have refused it.
    pub fn mark_revocation(&self, device: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO revocation_marks (device, doc, seq, ops)
             SELECT ?1, d.id, MAX(d.relay_head, COALESCE(c.seq, 0)),
                    MAX(d.relay_ops, (SELECT COUNT(*) FROM ops o WHERE o.doc = d.id AND o.idx IS NOT NULL))
             FROM documents d LEFT JOIN cursors c ON c.doc = d.id",
            [device],
        )?;
        Ok(())
    }

    /// The revocation mark of `device` for `doc` (see [`Store::mark_revocation`]): the relay's
    /// sequence number and the count of confirmed operations then.
    pub fn revocation_mark(&self, device: &str, doc: DocumentId) -> Result<Option<(Seq, u32)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq, ops FROM revocation_marks WHERE device = ?1 AND doc = ?2",
                params![device, doc.to_string()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u32>(1)?)),
            )
            .optional()?
            .map(|(s, o)| (Seq(s as u64), o)))
    }

    /// Every revocation mark of `doc`: (device id text, operation count then).
    pub fn revocation_marks(&self, doc: DocumentId) -> Result<Vec<(String, u32)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, ops FROM revocation_marks WHERE doc = ?1")?;
        let rows = stmt.query_map([doc.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A document's row.
    pub fn document(&self, id: DocumentId) -> Result<Option<DocumentRow>> {
        let b: Option<(Vec<u8>, u32)> = self
            .conn
            .query_row(
                "SELECT view, relay_ops FROM documents WHERE id = ?1",
                [id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        b.map(|(b, relay_ops)| {
            Ok(DocumentRow {
                info: uncbor(&b)?,
                relay_ops,
            })
        })
        .transpose()
    }

    /// Every document, optionally of one kind.
    pub fn documents(&self, kind: Option<DocumentKind>) -> Result<Vec<DocumentRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT view, kind, relay_ops FROM documents ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (b, k, relay_ops) = row?;
            if kind.is_some_and(|kind| kind.to_string() != k) {
                continue;
            }
            out.push(DocumentRow {
                info: uncbor(&b)?,
                relay_ops,
            });
        }
        Ok(out)
    }

    /// Stores a bundle written here and queues it (one transaction). Returns the outbox id. A
    /// `held` bundle (sealed in a superseded epoch) is kept from the relay, LAN peers and files: its
    /// outbox row waits as stale until it is sealed again.
    pub fn add_local_bundle(&mut self, env: &Envelope, now_ms: u64, held: bool) -> Result<u64> {
        let tx = begin(&mut self.conn)?;
        let id = env.id();
        let origin = if held { Origin::Held } else { Origin::Local };
        tx.execute(
            "INSERT OR IGNORE INTO bundles (id, doc, seq, envelope, origin, stored_at_ms) VALUES (?1, ?2, NULL, ?3, ?4, ?5)",
            params![&id.0[..], env.doc.to_string(), env.encode(), origin.as_str(), now_ms as i64],
        )?;
        let item = PushItem::Bundle {
            envelope: env.clone(),
        };
        tx.execute(
            "INSERT INTO outbox (doc, bundle, epoch, item, state) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                env.doc.to_string(),
                &id.0[..],
                env.epoch.0,
                cbor(&item),
                if held { "stale" } else { "pending" }
            ],
        )?;
        let row = tx.last_insert_rowid() as u64;
        tx.commit()?;
        Ok(row)
    }

    /// Stores a bundle received from a LAN peer or a file, if new, and (with `queue`) queues it for the
    /// relay in the same transaction. Returns whether it was new.
    pub fn add_foreign_bundle(
        &mut self,
        env: &Envelope,
        origin: Origin,
        queue: bool,
        now_ms: u64,
    ) -> Result<bool> {
        let tx = begin(&mut self.conn)?;
        let id = env.id();
        let superseded: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM superseded WHERE id = ?1)",
            [&id.0[..]],
            |r| r.get(0),
        )?;
        if superseded {
            return Ok(false);
        }
        let new = tx.execute(
            "INSERT OR IGNORE INTO bundles (id, doc, seq, envelope, origin, stored_at_ms) VALUES (?1, ?2, NULL, ?3, ?4, ?5)",
            params![&id.0[..], env.doc.to_string(), env.encode(), origin.as_str(), now_ms as i64],
        )? == 1;
        if new && queue {
            let item = PushItem::Bundle {
                envelope: env.clone(),
            };
            tx.execute(
                "INSERT INTO outbox (doc, bundle, epoch, item) VALUES (?1, ?2, ?3, ?4)",
                params![env.doc.to_string(), &id.0[..], env.epoch.0, cbor(&item)],
            )?;
        }
        tx.commit()?;
        Ok(new)
    }

    /// Queues a stored bundle for the relay again (after the relay lost it). Returns the outbox id.
    pub fn requeue_bundle(&self, env: &Envelope) -> Result<u64> {
        let item = PushItem::Bundle {
            envelope: env.clone(),
        };
        self.conn.execute(
            "INSERT INTO outbox (doc, bundle, epoch, item) VALUES (?1, ?2, ?3, ?4)",
            params![
                env.doc.to_string(),
                &env.id().0[..],
                env.epoch.0,
                cbor(&item)
            ],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Replaces a bundle the relay never took and never will (sealed in a superseded epoch; its
    /// changes were sealed again in a new bundle): the row goes, and its id is remembered, so the same
    /// bundle offered again by a LAN peer or a file is not taken (and sealed) once more.
    pub fn supersede_bundle(&self, id: &BundleId, doc: DocumentId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM bundles WHERE id = ?1 AND seq IS NULL",
            [&id.0[..]],
        )?;
        self.conn.execute(
            "INSERT OR IGNORE INTO superseded (id, doc) VALUES (?1, ?2)",
            params![&id.0[..], doc.to_string()],
        )?;
        Ok(())
    }

    /// Ids of a document's superseded bundles (see [`Store::supersede_bundle`]).
    pub fn superseded_ids(&self, doc: DocumentId) -> Result<Vec<BundleId>> {
        self.doc_bundle_ids("SELECT id FROM superseded WHERE doc = ?1", doc)
    }

    /// A stored bundle by id.
    pub fn bundle(&self, id: &BundleId) -> Result<Option<BundleRow>> {
        Ok(self
            .query_bundles("WHERE id = ?1", [&id.0[..]])?
            .into_iter()
            .next()
            .map(|(_, b)| b))
    }

    /// Ids of every bundle of a document this device may share (held-back bundles left out).
    pub fn bundle_ids(&self, doc: DocumentId) -> Result<Vec<BundleId>> {
        self.doc_bundle_ids(
            "SELECT id FROM bundles WHERE doc = ?1 AND origin != 'held' ORDER BY rowid",
            doc,
        )
    }

    /// The bundle ids `sql` selects (one column, `doc` as `?1`).
    fn doc_bundle_ids(&self, sql: &str, doc: DocumentId) -> Result<Vec<BundleId>> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map([doc.to_string()], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let id: [u8; 32] = row?
                .try_into()
                .map_err(|_| StoreError::Corrupt("bundle id length".into()))?;
            out.push(BundleId(id));
        }
        Ok(out)
    }

    /// The path a document's newest received bundle came by (`relay`, `lan`, `file`), if any.
    pub fn last_path(&self, doc: DocumentId) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT origin FROM bundles WHERE doc = ?1 AND origin != 'local' ORDER BY stored_at_ms DESC, rowid DESC LIMIT 1",
                [doc.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Pending (and stale) outbox items of a document.
    pub fn pending_for(&self, doc: DocumentId) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'stale') AND doc = ?1",
            [doc.to_string()],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Whether an operation is stored (in the chain or aside).
    pub fn has_op(&self, hash: &OpHash) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM ops WHERE hash = ?1)",
            [&hash[..]],
            |r| r.get(0),
        )?)
    }

    /// Replaces a document's chain from position `from` on with `ops` (the rest of the chain is
    /// dropped; operations set aside stay), marking the first `confirmed` positions of the whole
    /// chain as confirmed by the relay. One transaction.
    pub fn replace_chain(
        &mut self,
        doc: DocumentId,
        from: u32,
        ops: &[DocOp],
        confirmed: u32,
    ) -> Result<()> {
        let tx = begin(&mut self.conn)?;
        tx.execute(
            "DELETE FROM ops WHERE doc = ?1 AND idx >= ?2",
            params![doc.to_string(), from],
        )?;
        for (i, op) in ops.iter().enumerate() {
            let idx = from + i as u32;
            // An operation kept aside that now chains moves into the chain.
            tx.execute("DELETE FROM ops WHERE hash = ?1", [&op.hash()[..]])?;
            tx.execute(
                "INSERT INTO ops (hash, doc, idx, op_cbor, confirmed) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    &op.hash()[..],
                    doc.to_string(),
                    idx,
                    cbor(op),
                    idx < confirmed
                ],
            )?;
        }
        tx.execute(
            "UPDATE ops SET confirmed = (idx < ?2) WHERE doc = ?1 AND idx IS NOT NULL",
            params![doc.to_string(), confirmed],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Appends one of this device's operations at position `at` of `doc`'s chain (dropping what
    /// followed there), with the membership `next` it leads to and its key grants, and queues the
    /// operation and then the grants: one transaction, so a crash never leaves an epoch whose key
    /// this device signed but did not keep. `confirmed` is the count the relay confirmed.
    pub fn append_own_op(
        &mut self,
        at: u32,
        op: &DocOp,
        next: &Membership,
        confirmed: u32,
        grants: &[KeyGrant],
    ) -> Result<()> {
        let doc = op.doc.to_string();
        let tx = begin(&mut self.conn)?;
        tx.execute(
            "DELETE FROM ops WHERE doc = ?1 AND idx >= ?2",
            params![doc, at],
        )?;
        tx.execute("DELETE FROM ops WHERE hash = ?1", [&op.hash()[..]])?;
        tx.execute(
            "INSERT INTO ops (hash, doc, idx, op_cbor, confirmed) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![&op.hash()[..], doc, at, cbor(op), at < confirmed],
        )?;
        put_document(&tx, next)?;
        queue(&tx, &PushItem::Op { op: op.clone() })?;
        for grant in grants {
            put_grant(&tx, grant)?;
            queue(
                &tx,
                &PushItem::Grant {
                    grant: grant.clone(),
                },
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The relay acknowledged an operation of the chain: marks it (and every one before it) confirmed
    /// and returns its document and the confirmed count, if it is in a chain.
    pub fn confirm_op(&self, hash: &OpHash) -> Result<Option<(DocumentId, u32)>> {
        let row: Option<(String, Option<u32>)> = self
            .conn
            .query_row(
                "SELECT doc, idx FROM ops WHERE hash = ?1",
                [&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((doc, Some(idx))) = row else {
            return Ok(None);
        };
        self.conn.execute(
            "UPDATE ops SET confirmed = 1 WHERE doc = ?1 AND idx <= ?2",
            params![doc, idx],
        )?;
        self.conn.execute(
            "UPDATE documents SET relay_ops = MAX(relay_ops, ?2) WHERE id = ?1",
            params![doc, idx + 1],
        )?;
        Ok(Some((parse_doc(&doc)?, idx + 1)))
    }

    /// Keeps an operation aside (it does not chain yet: it came from a LAN peer or a file before
    /// the operations it follows). Returns whether it was new.
    pub fn put_provisional_op(&self, op: &DocOp) -> Result<bool> {
        Ok(self.conn.execute(
            "INSERT OR IGNORE INTO ops (hash, doc, idx, op_cbor, confirmed) VALUES (?1, ?2, NULL, ?3, 0)",
            params![&op.hash()[..], op.doc.to_string(), cbor(op)],
        )? == 1)
    }

    /// A document's chain, first operation first.
    pub fn chain(&self, doc: DocumentId) -> Result<Vec<ChainOp>> {
        let mut stmt = self.conn.prepare(
            "SELECT idx, op_cbor, confirmed FROM ops WHERE doc = ?1 AND idx IS NOT NULL ORDER BY idx",
        )?;
        let rows = stmt.query_map([doc.to_string()], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, b, confirmed) = row?;
            out.push(ChainOp {
                idx,
                op: uncbor(&b)?,
                confirmed,
            });
        }
        Ok(out)
    }

    /// A document's chain as operations only.
    pub fn ops(&self, doc: DocumentId) -> Result<Vec<DocOp>> {
        Ok(self.chain(doc)?.into_iter().map(|c| c.op).collect())
    }

    /// Operations of a document kept aside.
    pub fn provisional_ops(&self, doc: DocumentId) -> Result<Vec<DocOp>> {
        let mut stmt = self
            .conn
            .prepare("SELECT op_cbor FROM ops WHERE doc = ?1 AND idx IS NULL ORDER BY rowid")?;
        let rows = stmt.query_map([doc.to_string()], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(uncbor(&row?)?);
        }
        Ok(out)
    }

    /// How many operations of a document are kept aside.
    pub fn provisional_count(&self, doc: DocumentId) -> Result<usize> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM ops WHERE doc = ?1 AND idx IS NULL",
            [doc.to_string()],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Drops an operation kept aside.
    pub fn drop_provisional_op(&self, hash: &OpHash) -> Result<()> {
        self.conn.execute(
            "DELETE FROM ops WHERE hash = ?1 AND idx IS NULL",
            [&hash[..]],
        )?;
        Ok(())
    }

    /// Queues a non-bundle item (operation, grant, invite, approval). Returns the outbox id.
    pub fn queue(&self, item: &PushItem) -> Result<u64> {
        queue(&self.conn, item)
    }

    /// Outbox rows of a document waiting to be signed or sealed again, or pending bundles sealed in
    /// an epoch before `epoch`: (outbox id, item).
    pub fn outdated(&self, doc: DocumentId, epoch: Epoch) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, item FROM outbox WHERE doc = ?1
             AND (state = 'stale' OR (state = 'pending' AND epoch IS NOT NULL AND epoch < ?2))
             ORDER BY id",
        )?;
        let rows = stmt.query_map(params![doc.to_string(), epoch.0], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, b) = row?;
            out.push(OutboxRow {
                id: id as u64,
                item: uncbor(&b)?,
            });
        }
        Ok(out)
    }

    /// Drops an outbox row (replaced by another, or no longer needed).
    pub fn drop_outbox(&self, id: u64) -> Result<()> {
        self.conn
            .execute("DELETE FROM outbox WHERE id = ?1", [id as i64])?;
        Ok(())
    }

    /// Marks an outbox row stale: the relay refused it as made against another membership state;
    /// it waits to be signed or sealed again.
    pub fn mark_stale(&self, id: u64, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE outbox SET state = 'stale', error = ?2 WHERE id = ?1",
            params![id as i64, error],
        )?;
        Ok(())
    }

    /// Outbox items the relay held back (a full storage quota, [`Store::note_outbox_error`]):
    /// still queued, with the relay's sentence.
    pub fn held_back_count(&self) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND error IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Notes why the relay held an outbox item back (it stays queued, state unchanged).
    pub fn note_outbox_error(&self, id: u64, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE outbox SET error = ?2 WHERE id = ?1",
            params![id as i64, error],
        )?;
        Ok(())
    }

    /// The document of an outbox row.
    pub fn outbox_doc(&self, id: u64) -> Result<Option<DocumentId>> {
        let d: Option<Option<String>> = self
            .conn
            .query_row("SELECT doc FROM outbox WHERE id = ?1", [id as i64], |r| {
                r.get(0)
            })
            .optional()?;
        d.flatten().map(|d| parse_doc(&d)).transpose()
    }

    /// The item of an outbox row.
    pub fn outbox_item(&self, id: u64) -> Result<Option<PushItem>> {
        let b: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT item FROM outbox WHERE id = ?1", [id as i64], |r| {
                r.get(0)
            })
            .optional()?;
        b.map(|b| uncbor(&b)).transpose()
    }

    /// Sets a document's cursor (after the relay went back in time).
    pub fn set_cursor(&self, doc: DocumentId, seq: Seq) -> Result<()> {
        self.conn.execute(
            "INSERT INTO cursors (doc, seq) VALUES (?1, ?2) ON CONFLICT(doc) DO UPDATE SET seq = excluded.seq",
            params![doc.to_string(), seq.0 as i64],
        )?;
        Ok(())
    }

    /// Sets every cursor to 0 and forgets every witness (the relay was restored: pull everything
    /// again).
    pub fn reset_cursors(&self) -> Result<()> {
        self.conn.execute("UPDATE cursors SET seq = 0", [])?;
        self.conn.execute("DELETE FROM witnesses", [])?;
        Ok(())
    }

    /// Records that the relay's bundle log of `doc` at `seq` is `log`, unless a newer one is held
    /// (see `musubi_crdt::sync::Known::witnesses`).
    pub fn raise_witness(&self, doc: DocumentId, seq: Seq, log: &LogHash) -> Result<()> {
        self.conn.execute(
            "INSERT INTO witnesses (doc, seq, log) VALUES (?1, ?2, ?3)
             ON CONFLICT(doc) DO UPDATE SET seq = excluded.seq, log = excluded.log
             WHERE excluded.seq >= witnesses.seq",
            params![doc.to_string(), seq.0 as i64, log.0.as_slice()],
        )?;
        Ok(())
    }

    /// Forgets the witness of `doc` (the relay went back in time).
    pub fn clear_witness(&self, doc: DocumentId) -> Result<()> {
        self.conn
            .execute("DELETE FROM witnesses WHERE doc = ?1", [doc.to_string()])?;
        Ok(())
    }

    /// Every witness held: (document, sequence number, the relay's bundle log there).
    pub fn witnesses(&self) -> Result<Vec<(DocumentId, Seq, LogHash)>> {
        let mut stmt = self.conn.prepare("SELECT doc, seq, log FROM witnesses")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, s, l) = row?;
            let log: [u8; 32] = l
                .try_into()
                .map_err(|_| StoreError::Corrupt("a witness log is not 32 bytes".into()))?;
            out.push((parse_doc(&d)?, Seq(s as u64), LogHash(log)));
        }
        Ok(out)
    }

    /// Deletes a grant (one this device made for an epoch that did not become part of the chain).
    pub fn delete_grant(&self, grant: &KeyGrant) -> Result<()> {
        self.conn
            .execute("DELETE FROM grants WHERE hash = ?1", [&grant.hash()[..]])?;
        Ok(())
    }

    /// Records an invite this device issued.
    pub fn put_device_invite(&self, row: &DeviceInviteRow, now_ms: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO device_invites (invite_id, sealed_secret, expires_at_ms, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![&row.invite.0[..], row.sealed_secret, row.expires_at_ms as i64, now_ms as i64],
        )?;
        Ok(())
    }

    /// The invite this device issued with this id.
    pub fn device_invite(&self, invite: &InviteId) -> Result<Option<DeviceInviteRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT sealed_secret, expires_at_ms, used_by FROM device_invites WHERE invite_id = ?1",
                [&invite.0[..]],
                |r| {
                    Ok(DeviceInviteRow {
                        invite: *invite,
                        sealed_secret: r.get(0)?,
                        expires_at_ms: r.get::<_, i64>(1)? as u64,
                        used_by: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Marks an invite used by `device` (or unused again, with `None`).
    pub fn set_device_invite_used(&self, invite: &InviteId, device: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE device_invites SET used_by = ?2 WHERE invite_id = ?1",
            params![&invite.0[..], device],
        )?;
        Ok(())
    }

    /// Pending outbox rows with id greater than `after`, in order.
    pub fn pending(&self, after: u64) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, item FROM outbox WHERE state = 'pending' AND id > ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([after as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, b) = row?;
            out.push(OutboxRow {
                id: id as u64,
                item: uncbor(&b)?,
            });
        }
        Ok(out)
    }

    /// Number of outbox items not yet taken by the relay (pending, or waiting to be sealed again).
    pub fn pending_count(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'stale')",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Rejected outbox items: (id, document, error).
    pub fn rejected(&self) -> Result<Vec<(u64, String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, doc, error FROM outbox WHERE state = 'rejected' ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                r.get::<_, Option<String>>(2)?.unwrap_or_default(),
            ))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// The relay took an outbox item: drop it, and record a bundle's sequence number.
    pub fn acknowledge(&mut self, outbox_id: u64, seq: Option<Seq>) -> Result<()> {
        let tx = begin(&mut self.conn)?;
        let bundle: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT bundle FROM outbox WHERE id = ?1",
                [outbox_id as i64],
                |r| r.get(0),
            )
            .optional()?;
        if let (Some(Some(bundle)), Some(seq)) = (bundle, seq) {
            tx.execute(
                "UPDATE bundles SET seq = ?1 WHERE id = ?2",
                params![seq.0 as i64, bundle],
            )?;
        }
        tx.execute("DELETE FROM outbox WHERE id = ?1", [outbox_id as i64])?;
        tx.commit()?;
        Ok(())
    }

    /// The relay refused an outbox item for good.
    pub fn reject(&self, outbox_id: u64, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE outbox SET state = 'rejected', error = ?2 WHERE id = ?1",
            params![outbox_id as i64, error],
        )?;
        Ok(())
    }

    /// Stores pulled bundles, and quarantines the pulled bundles `refused` (with why), and advances
    /// the document's cursor past all of them, in one transaction.
    pub fn store_pulled(
        &mut self,
        doc: DocumentId,
        items: &[(Seq, Envelope)],
        refused: &[(Seq, Envelope, String)],
        now_ms: u64,
    ) -> Result<()> {
        let tx = begin(&mut self.conn)?;
        let mut last = Seq(0);
        for (seq, env, reason) in refused {
            last = last.max(*seq);
            // A bundle this device already holds (from a LAN peer or a file, admitted there) is
            // not hidden because the relay's copy was refused.
            let new = tx.execute(
                "INSERT OR IGNORE INTO bundles (id, doc, seq, envelope, origin, stored_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![&env.id().0[..], env.doc.to_string(), seq.0 as i64, env.encode(), Origin::Relay.as_str(), now_ms as i64],
            )? == 1;
            if new {
                insert_quarantine(&tx, env, Some(*seq), reason, now_ms)?;
            }
        }
        for (seq, env) in items {
            let id = env.id();
            tx.execute(
                "INSERT INTO bundles (id, doc, seq, envelope, origin, stored_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET seq = excluded.seq",
                params![&id.0[..], doc.to_string(), seq.0 as i64, env.encode(), Origin::Relay.as_str(), now_ms as i64],
            )?;
            last = last.max(*seq);
        }
        tx.execute(
            "INSERT INTO cursors (doc, seq) VALUES (?1, ?2) ON CONFLICT(doc) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            params![doc.to_string(), last.0 as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Begins an engine operation: `BEGIN IMMEDIATE`, or a savepoint inside an operation already
    /// open. Every write until [`Store::end_operation`] commits or rolls back as one, so a crash
    /// never leaves half an operation (a document the relay never learns of, an epoch without its
    /// key). Returns whether it began the transaction (`false`: a savepoint).
    pub fn begin_operation(&self) -> Result<bool> {
        if self.conn.is_autocommit() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            Ok(true)
        } else {
            self.conn.execute_batch("SAVEPOINT engine_operation")?;
            Ok(false)
        }
    }

    /// Ends the operation [`Store::begin_operation`] began (`top`: what it returned): commits or
    /// releases when `ok`, else rolls back what the operation wrote.
    pub fn end_operation(&self, top: bool, ok: bool) -> Result<()> {
        let sql = match (top, ok) {
            (true, true) => "COMMIT",
            (true, false) => "ROLLBACK",
            (false, true) => "RELEASE engine_operation",
            (false, false) => "ROLLBACK TO engine_operation; RELEASE engine_operation",
        };
        if top && !ok && self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn.execute_batch(sql)?;
        Ok(())
    }

    /// Queues again every bundle written here that the relay has neither acknowledged nor has
    /// queued (a store left so by an older version, or edited by hand); returns how many. Bundles
    /// held back, superseded, quarantined or refused for good are left alone.
    pub fn requeue_unsent(&mut self) -> Result<usize> {
        let tx = begin(&mut self.conn)?;
        let rows: Vec<(Vec<u8>, String, Vec<u8>)> = {
            let mut stmt = tx.prepare(
                "SELECT b.id, b.doc, b.envelope FROM bundles b
                 WHERE b.origin = 'local' AND b.seq IS NULL
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.bundle = b.id)
                   AND NOT EXISTS (SELECT 1 FROM superseded s WHERE s.id = b.id)
                   AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.bundle = b.id)
                 ORDER BY b.rowid",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        for (id, doc, env) in &rows {
            let envelope = Envelope::decode(env).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let epoch = envelope.epoch.0;
            tx.execute(
                "INSERT INTO outbox (doc, bundle, epoch, item, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
                params![doc, id, epoch, cbor(&PushItem::Bundle { envelope })],
            )?;
        }
        tx.commit()?;
        Ok(rows.len())
    }

    /// Quarantines a stored bundle (idempotent: the first reason is kept).
    pub fn quarantine(
        &self,
        env: &Envelope,
        seq: Option<Seq>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        insert_quarantine(&self.conn, env, seq, reason, now_ms)
    }

    /// Quarantined bundles that came from the relay (refused by the admission rule on pull), with
    /// their envelopes: [`crate::engine::Engine::recheck_quarantine`] looks at them again.
    pub fn quarantined_pulled(&self) -> Result<Vec<Envelope>> {
        let mut stmt = self.conn.prepare(
            "SELECT b.envelope FROM quarantine q JOIN bundles b ON b.id = q.bundle
             WHERE q.seq IS NOT NULL ORDER BY q.rowid",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Envelope::decode(&row?).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Takes a bundle out of quarantine (it is applied at the next load).
    pub fn release(&self, env: &Envelope) -> Result<()> {
        self.conn.execute(
            "DELETE FROM quarantine WHERE bundle = ?1",
            params![&env.id().0[..]],
        )?;
        Ok(())
    }

    /// How many bundles are quarantined.
    pub fn quarantine_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM quarantine", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// The newest `limit` quarantined bundles, newest first (a sender controls how many there are).
    pub fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT bundle, doc, author, facility, seq, reason, at_ms FROM quarantine
             ORDER BY at_ms DESC, rowid DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(QuarantineRow {
                bundle: hex::encode(r.get::<_, Vec<u8>>(0)?),
                doc: r.get(1)?,
                author: r.get(2)?,
                facility: r.get(3)?,
                seq: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
                reason: r.get(5)?,
                at_ms: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Per-document cursors.
    pub fn cursors(&self) -> Result<Vec<(DocumentId, Seq)>> {
        let mut stmt = self.conn.prepare("SELECT doc, seq FROM cursors")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (d, s) = row?;
            out.push((parse_doc(&d)?, Seq(s as u64)));
        }
        Ok(out)
    }

    /// Every bundle of a document this device may share (held-back bundles left out), in the order
    /// stored.
    pub fn shareable_bundles(&self, doc: DocumentId) -> Result<Vec<BundleRow>> {
        Ok(self
            .query_bundles(
                "WHERE doc = ?1 AND origin != 'held'",
                params![doc.to_string()],
            )?
            .into_iter()
            .map(|(_, b)| b)
            .collect())
    }

    /// Every bundle of a document, in the order stored.
    pub fn bundles(&self, doc: DocumentId) -> Result<Vec<BundleRow>> {
        Ok(self
            .bundles_after(doc, 0)?
            .into_iter()
            .map(|(_, b)| b)
            .collect())
    }

    /// Bundles of a document stored after row `rowid`, with their row ids, in the order stored.
    pub fn bundles_after(&self, doc: DocumentId, rowid: i64) -> Result<Vec<(i64, BundleRow)>> {
        self.query_bundles(
            "WHERE doc = ?1 AND rowid > ?2",
            params![doc.to_string(), rowid],
        )
    }

    /// Bundles matching `clause` (with `args`), with their row ids, in the order stored.
    fn query_bundles(
        &self,
        clause: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<(i64, BundleRow)>> {
        // A quarantined bundle is kept but never applied, offered or exported.
        let clause = if clause.is_empty() { "WHERE 1" } else { clause };
        let sql = format!(
            "SELECT rowid, id, doc, seq, envelope FROM bundles {clause}
             AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.bundle = bundles.id) ORDER BY rowid"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (rowid, id, doc, seq, env) = row?;
            let id: [u8; 32] = id
                .try_into()
                .map_err(|_| StoreError::Corrupt("bundle id length".into()))?;
            out.push((
                rowid,
                BundleRow {
                    id: BundleId(id),
                    doc: parse_doc(&doc)?,
                    seq: seq.map(|s| Seq(s as u64)),
                    envelope: Envelope::decode(&env)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                },
            ));
        }
        Ok(out)
    }

    /// The sealed snapshot of a document and the last bundle row it covers.
    pub fn snapshot(&self, doc: DocumentId) -> Result<Option<(i64, Vec<u8>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT upto_rowid, sealed FROM snapshots WHERE doc = ?1",
                [doc.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Forgets a document's local snapshot (a bundle it covered was taken out; the next load
    /// rebuilds it from the bundles).
    pub fn drop_snapshot(&self, doc: DocumentId) -> Result<()> {
        self.conn
            .execute("DELETE FROM snapshots WHERE doc = ?1", [doc.to_string()])?;
        Ok(())
    }

    /// Replaces the sealed snapshot of a document.
    pub fn put_snapshot(&self, doc: DocumentId, upto_rowid: i64, sealed: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO snapshots (doc, upto_rowid, sealed) VALUES (?1, ?2, ?3)",
            params![doc.to_string(), upto_rowid, sealed],
        )?;
        Ok(())
    }

    /// Every bundle.
    pub fn all_bundles(&self) -> Result<Vec<BundleRow>> {
        Ok(self
            .query_bundles("", [])?
            .into_iter()
            .map(|(_, b)| b)
            .collect())
    }

    /// Stores a key grant (idempotent); returns whether it was new.
    pub fn put_grant(&self, grant: &KeyGrant) -> Result<bool> {
        put_grant(&self.conn, grant)
    }

    /// Every grant of a document.
    pub fn grants(&self, doc: DocumentId) -> Result<Vec<KeyGrant>> {
        let mut stmt = self
            .conn
            .prepare("SELECT grant_cbor FROM grants WHERE doc = ?1 ORDER BY epoch, rowid")?;
        let rows = stmt.query_map([doc.to_string()], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(uncbor(&row?)?);
        }
        Ok(out)
    }
}

/// Stores a document's membership view (on a connection or inside a transaction).
fn put_document(conn: &Connection, view: &Membership) -> Result<()> {
    conn.execute(
        "INSERT INTO documents (id, kind, view) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET view = excluded.view",
        params![view.id.to_string(), view.kind.to_string(), cbor(view)],
    )?;
    Ok(())
}

/// Queues a non-bundle item; returns the outbox id.
fn queue(conn: &Connection, item: &PushItem) -> Result<u64> {
    conn.execute(
        "INSERT INTO outbox (doc, bundle, item) VALUES (?1, NULL, ?2)",
        params![item.doc().map(|d| d.to_string()), cbor(item)],
    )?;
    Ok(conn.last_insert_rowid() as u64)
}

/// Stores a key grant; returns whether it was new.
fn put_grant(conn: &Connection, grant: &KeyGrant) -> Result<bool> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO grants (hash, doc, epoch, grant_cbor) VALUES (?1, ?2, ?3, ?4)",
        params![
            &grant.hash()[..],
            grant.doc.to_string(),
            grant.epoch.0 as i64,
            cbor(grant)
        ],
    )? == 1)
}

/// A write transaction: `BEGIN IMMEDIATE` on its own, or a savepoint inside an engine operation's
/// transaction ([`Store::begin_operation`]), so the operation commits or rolls back as one.
enum Tx<'a> {
    Top(rusqlite::Transaction<'a>),
    Nested(rusqlite::Savepoint<'a>),
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Tx::Top(t) => t,
            Tx::Nested(s) => s,
        }
    }
}

impl Tx<'_> {
    fn commit(self) -> rusqlite::Result<()> {
        match self {
            Tx::Top(t) => t.commit(),
            Tx::Nested(s) => s.commit(),
        }
    }
}

fn begin(conn: &mut Connection) -> rusqlite::Result<Tx<'_>> {
    if conn.is_autocommit() {
        conn.transaction_with_behavior(TransactionBehavior::Immediate)
            .map(Tx::Top)
    } else {
        conn.savepoint().map(Tx::Nested)
    }
}

/// Inserts a quarantine row (kept as first written when the bundle is already quarantined).
fn insert_quarantine(
    conn: &Connection,
    env: &Envelope,
    seq: Option<Seq>,
    reason: &str,
    now_ms: u64,
) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO quarantine (bundle, doc, author, facility, seq, reason, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            &env.id().0[..],
            env.doc.to_string(),
            env.author.to_string(),
            env.facility.to_string(),
            seq.map(|s| s.0 as i64),
            reason,
            now_ms as i64
        ],
    )?;
    Ok(())
}
