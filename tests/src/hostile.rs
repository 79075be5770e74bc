//! A relay that lies, and a device that forges: what the attacker stories of the scenario tests do.
//!
//! [`LyingRelay`] is the real `musubi-node` whose database the test edits underneath it, as modified
//! relay code would: it then serves, and signs, whatever its tables hold (a device in another
//! facility's chain, a facility without the authority's certificate, an extra member, a planted key
//! grant or operation, a bundle it should have refused). [`forged_file`] writes a transfer file of
//! the attacker's choosing. Nothing here goes through the relay's or the facilities' checks: that
//! is the point.

use std::path::Path;
use std::time::Duration;

use musubi_crdt::bundle::Envelope;
use musubi_crdt::crypto::DeviceSecrets;
use musubi_crdt::directory::{DeviceLink, FacilityCert};
use musubi_crdt::ids::{DeploymentId, DocumentId, FacilityId, LogHash, Role};
use musubi_crdt::ops::{DocOp, KeyGrant};
use musubi_crdt::protocol::PushItem;
use musubi_crdt::transfer::{TransferEncoder, TransferHeader};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::Relay;

fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// The relay's database, opened read-write by the attacker (the relay may be running).
pub struct LyingRelay {
    conn: Connection,
}

impl LyingRelay {
    /// Opens `relay`'s database for writing.
    pub fn of(relay: &Relay) -> Self {
        let conn = Connection::open(relay.data.join("node.db")).expect("open the relay's database");
        conn.busy_timeout(Duration::from_secs(20))
            .expect("set busy timeout");
        Self { conn }
    }

    fn bump_directory(&self) {
        self.conn
            .execute(
                "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'directory_version'",
                [],
            )
            .expect("bump the directory version");
    }

    /// Lists `device` as a device of `facility`: a devices row, and a link at the end of the
    /// facility's chain signed by `signer` (whoever the attacker is).
    pub fn add_device(&self, facility: FacilityId, device: &DeviceSecrets, signer: &DeviceSecrets) {
        let last: Vec<u8> = self
            .conn
            .query_row(
                "SELECT link FROM device_links WHERE facility = ?1 ORDER BY seq DESC LIMIT 1",
                [facility.to_string()],
                |r| r.get(0),
            )
            .expect("the facility has a chain");
        let last: DeviceLink = ciborium::from_reader(last.as_slice()).expect("a link");
        let p = device.public();
        let link = DeviceLink::sign(
            signer,
            facility,
            Some(&last),
            musubi_crdt::directory::DeviceChange::Add {
                device: p.device,
                age_recipient: p.age_recipient.clone(),
            },
            crate::raw::now_ms(),
        );
        self.conn
            .execute(
                "INSERT INTO device_links (facility, seq, link) VALUES (?1, ?2, ?3)",
                params![facility.to_string(), link.seq, cbor(&link)],
            )
            .expect("insert a link");
        self.conn
            .execute(
                "INSERT INTO devices (peer_id, facility, age_recipient, enrolled_at) VALUES (?1, ?2, ?3, 0)",
                params![p.device.to_string(), facility.to_string(), p.age_recipient],
            )
            .expect("insert a device");
        self.bump_directory();
    }

    /// Adds a facility whose certificate `cert` (signed by whoever the attacker is) names `root`,
    /// with `root` as its first device.
    pub fn add_facility(&self, cert: &FacilityCert, root: &DeviceSecrets) {
        self.conn
            .execute(
                "INSERT INTO facilities (id, name, role, cert, enrolled_at) VALUES (?1, ?2, ?3, ?4, 0)",
                params![
                    cert.facility.to_string(),
                    cert.name,
                    cert.role.to_string(),
                    cbor(cert)
                ],
            )
            .expect("insert a facility");
        let genesis = DeviceLink::genesis(root, cert.facility, crate::raw::now_ms());
        let p = root.public();
        self.conn
            .execute(
                "INSERT INTO device_links (facility, seq, link) VALUES (?1, 1, ?2)",
                params![cert.facility.to_string(), cbor(&genesis)],
            )
            .expect("insert a link");
        self.conn
            .execute(
                "INSERT INTO devices (peer_id, facility, age_recipient, enrolled_at) VALUES (?1, ?2, ?3, 0)",
                params![p.device.to_string(), cert.facility.to_string(), p.age_recipient],
            )
            .expect("insert a device");
        self.bump_directory();
    }

    /// Replaces a facility's certificate and chain (and its devices) with `cert` and `root`'s genesis.
    pub fn replace_facility(&self, cert: &FacilityCert, root: &DeviceSecrets) {
        let f = cert.facility.to_string();
        self.conn
            .execute("DELETE FROM device_links WHERE facility = ?1", [&f])
            .expect("delete links");
        self.conn
            .execute(
                "UPDATE devices SET chain_revoked = 1 WHERE facility = ?1",
                [&f],
            )
            .expect("retire devices");
        self.conn
            .execute(
                "UPDATE facilities SET cert = ?2, name = ?3 WHERE id = ?1",
                params![f, cbor(cert), cert.name],
            )
            .expect("replace the certificate");
        let genesis = DeviceLink::genesis(root, cert.facility, crate::raw::now_ms());
        let p = root.public();
        self.conn
            .execute(
                "INSERT INTO device_links (facility, seq, link) VALUES (?1, 1, ?2)",
                params![f, cbor(&genesis)],
            )
            .expect("insert a link");
        self.conn
            .execute(
                "INSERT INTO devices (peer_id, facility, age_recipient, enrolled_at) VALUES (?1, ?2, ?3, 0)",
                params![p.device.to_string(), f, p.age_recipient],
            )
            .expect("insert a device");
        self.bump_directory();
    }

    /// Lists `facility` as a member of `doc` in the relay's own view (its members table and the
    /// membership it checks requests against), with no operation behind it.
    pub fn add_member(&self, doc: DocumentId, facility: FacilityId, role: Role) {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO members (doc, facility, role) VALUES (?1, ?2, ?3)",
                params![doc.to_string(), facility.to_string(), role.to_string()],
            )
            .expect("insert a member");
        let view: Vec<u8> = self
            .conn
            .query_row(
                "SELECT view FROM documents WHERE id = ?1",
                [doc.to_string()],
                |r| r.get(0),
            )
            .expect("a known document");
        let mut view: musubi_crdt::membership::Membership =
            ciborium::from_reader(view.as_slice()).expect("a membership");
        view.members
            .push(musubi_crdt::ops::Member { facility, role });
        self.conn
            .execute(
                "UPDATE documents SET view = ?2 WHERE id = ?1",
                params![doc.to_string(), cbor(&view)],
            )
            .expect("rewrite the view");
    }

    /// Stores a key grant as if it had been accepted.
    pub fn plant_grant(&self, grant: &KeyGrant) {
        self.conn
            .execute(
                "INSERT INTO grants (hash, doc, epoch, author, encoded, received_at) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                params![
                    grant.hash().as_slice(),
                    grant.doc.to_string(),
                    grant.epoch.0,
                    grant.author.to_string(),
                    cbor(grant)
                ],
            )
            .expect("plant a grant");
    }

    /// Appends an operation to a document's chain as if it had been accepted, and says so in the
    /// document list (so devices fetch it).
    pub fn plant_op(&self, op: &DocOp) {
        let (ops,): (u32,) = self
            .conn
            .query_row(
                "SELECT ops FROM documents WHERE id = ?1",
                [op.doc.to_string()],
                |r| Ok((r.get(0)?,)),
            )
            .expect("a known document");
        self.conn
            .execute(
                "INSERT INTO ops (doc, idx, hash, author, encoded, received_at) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                params![
                    op.doc.to_string(),
                    ops,
                    op.hash().as_slice(),
                    op.author.to_string(),
                    cbor(op)
                ],
            )
            .expect("plant an operation");
        self.conn
            .execute(
                "UPDATE documents SET ops = ?2, ops_head = ?3 WHERE id = ?1",
                params![op.doc.to_string(), ops + 1, op.hash().as_slice()],
            )
            .expect("advance the chain");
    }

    /// Stores a bundle as if it had been accepted (the next sequence number, its log continued as a
    /// relay does); returns the sequence number.
    pub fn plant_bundle(&self, env: &Envelope) -> u64 {
        self.plant_bundle_under(env.doc, env)
    }

    /// [`LyingRelay::plant_bundle`] in the log of `doc`, whatever document the envelope names (a
    /// relay that serves one document's bundle when another is pulled).
    pub fn plant_bundle_under(&self, doc: DocumentId, env: &Envelope) -> u64 {
        let (head, prev): (i64, LogHash) = self
            .conn
            .query_row(
                "SELECT seq, log FROM bundles WHERE doc = ?1 ORDER BY seq DESC LIMIT 1",
                [doc.to_string()],
                |r| {
                    let log: Vec<u8> = r.get(1)?;
                    Ok((r.get(0)?, LogHash(log.try_into().expect("a 32-byte log"))))
                },
            )
            .optional()
            .expect("head")
            .unwrap_or((0, LogHash::ZERO));
        let encoded = env.encode();
        let log = prev.next(&env.id());
        self.conn
            .execute(
                "INSERT INTO bundles (doc, seq, bundle_id, envelope, author, facility, epoch, bytes, received_at, log)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9)",
                params![
                    doc.to_string(),
                    head + 1,
                    env.id().0.as_slice(),
                    encoded,
                    env.author.to_string(),
                    env.facility.to_string(),
                    env.epoch.0,
                    encoded.len() as i64,
                    log.0.as_slice()
                ],
            )
            .expect("plant a bundle");
        (head + 1) as u64
    }

    /// Deletes a bundle from the relay's log (a relay that withholds it, or files it elsewhere).
    pub fn remove_bundle(&self, env: &Envelope) {
        self.conn
            .execute(
                "DELETE FROM bundles WHERE bundle_id = ?1",
                [env.id().0.as_slice()],
            )
            .expect("remove a bundle");
    }

    /// The operations the relay holds of `doc`, in chain order.
    pub fn ops(&self, doc: DocumentId) -> Vec<DocOp> {
        let mut st = self
            .conn
            .prepare("SELECT encoded FROM ops WHERE doc = ?1 ORDER BY idx")
            .expect("select ops");
        st.query_map([doc.to_string()], |r| r.get::<_, Vec<u8>>(0))
            .expect("query ops")
            .map(|b| ciborium::from_reader(b.expect("row").as_slice()).expect("an op"))
            .collect()
    }

    /// The key grants the relay holds of `doc`.
    pub fn grants(&self, doc: DocumentId) -> Vec<KeyGrant> {
        let mut st = self
            .conn
            .prepare("SELECT encoded FROM grants WHERE doc = ?1 ORDER BY rowid")
            .expect("select grants");
        st.query_map([doc.to_string()], |r| r.get::<_, Vec<u8>>(0))
            .expect("query grants")
            .map(|b| ciborium::from_reader(b.expect("row").as_slice()).expect("a grant"))
            .collect()
    }

    /// The bundles the relay holds of `doc`, in sequence order.
    pub fn bundles(&self, doc: DocumentId) -> Vec<(u64, Envelope)> {
        let mut st = self
            .conn
            .prepare("SELECT seq, envelope FROM bundles WHERE doc = ?1 ORDER BY seq")
            .expect("select bundles");
        st.query_map([doc.to_string()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .expect("query bundles")
        .map(|row| {
            let (seq, b) = row.expect("row");
            (seq as u64, Envelope::decode(&b).expect("an envelope"))
        })
        .collect()
    }

    /// The store generation the relay answers with.
    pub fn generation(&self) -> String {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
                r.get(0)
            })
            .optional()
            .expect("meta")
            .expect("a generation")
    }
}

/// Writes a transfer file at `path` holding `items`, as a device of `deployment` with `secrets`
/// would (no directory in it), record by record (a file of gigabytes is never held in memory).
pub fn forged_file<'a>(
    path: &Path,
    deployment: DeploymentId,
    secrets: &DeviceSecrets,
    items: impl IntoIterator<Item = &'a PushItem>,
) {
    use std::io::Write;
    let (mut enc, start) = TransferEncoder::start(&TransferHeader {
        deployment,
        device: secrets.device_id(),
        created_at_ms: crate::raw::now_ms(),
        directory: None,
    });
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).expect("create the file"));
    w.write_all(&start).expect("write");
    for item in items {
        w.write_all(&enc.item(item).expect("an item fits a record"))
            .expect("write");
    }
    w.write_all(&enc.finish()).expect("write");
    w.flush().expect("flush");
}

/// An Automerge compressed-change chunk (type 2) whose DEFLATE data inflates to `inflated` zero bytes:
/// about 1 KiB of chunk per MiB inflated (a deflate bomb).
pub fn deflate_bomb_chunk(inflated: usize) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    let mut left = inflated;
    while left > 0 {
        let n = left.min(zeros.len());
        enc.write_all(&zeros[..n]).expect("deflate");
        left -= n;
    }
    let body = enc.finish().expect("deflate");
    let mut chunk = musubi_crdt::changes::CHUNK_MAGIC.to_vec();
    chunk.extend_from_slice(&[0, 0, 0, 0, musubi_crdt::changes::CHUNK_COMPRESSED_CHANGE]);
    leb128::write::unsigned(&mut chunk, body.len() as u64).expect("leb128");
    chunk.extend_from_slice(&body);
    chunk
}

/// The change chunks `device` writes (its bound actor, fixed session bytes) when `write` edits a new
/// document, as `Engine::commit` puts them in a bundle.
pub fn changes_by(
    device: &musubi_crdt::ids::DeviceId,
    write: impl FnOnce(&mut automerge::AutoCommit),
) -> Vec<u8> {
    let actor =
        musubi_crdt::changes::device_actor(device, [9; musubi_crdt::changes::ACTOR_SESSION_BYTES]);
    let mut doc = automerge::AutoCommit::new().with_actor(actor);
    write(&mut doc);
    doc.commit();
    let mut out = Vec::new();
    for mut c in doc.get_changes(&[]) {
        out.extend_from_slice(&c.bytes());
    }
    out
}

/// Changes as `device` would write them, that set the document's `kind` to `kind` (a change that,
/// applied, makes a letter unreadable as a letter).
pub fn changes_as(device: &musubi_crdt::ids::DeviceId, kind: &str) -> Vec<u8> {
    changes_by(device, |doc| {
        automerge::transaction::Transactable::put(doc, automerge::ROOT, "kind", kind).expect("put");
    })
}

/// `chunk` (one Automerge change chunk, compressed or not) with every occurrence of `from`'s
/// device id bytes replaced by `to`'s (the same length): the same change, bound to another device.
pub fn rebind_actor(
    chunk: &[u8],
    from: &musubi_crdt::ids::DeviceId,
    to: &musubi_crdt::ids::DeviceId,
) -> Vec<u8> {
    use std::io::{Read, Write};
    let (from, to) = (from.0.to_bytes(), to.0.to_bytes());
    assert_eq!(from.len(), to.len(), "device ids of one length");
    let chunk_type = chunk[8];
    let mut rest = &chunk[9..];
    let len = leb128::read::unsigned(&mut rest).expect("a chunk length") as usize;
    let body = &rest[..len];
    let compressed = chunk_type == musubi_crdt::changes::CHUNK_COMPRESSED_CHANGE;
    let mut plain = if compressed {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(body)
            .read_to_end(&mut out)
            .expect("inflate");
        out
    } else {
        body.to_vec()
    };
    let mut i = 0;
    while i + from.len() <= plain.len() {
        if plain[i..i + from.len()] == from[..] {
            plain[i..i + from.len()].copy_from_slice(&to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    let body = if compressed {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&plain).expect("deflate");
        enc.finish().expect("deflate")
    } else {
        plain
    };
    let mut out = chunk[..9].to_vec();
    leb128::write::unsigned(&mut out, body.len() as u64).expect("leb128");
    out.extend_from_slice(&body);
    out
}
