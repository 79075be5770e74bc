//! The request handler: one `/musubi/sync/1` frame in, one response frame and the notifications to send out.
//!
//! [`Relay::handle`] is synchronous and does no network IO: the server calls it on its database thread,
//! and tests call it directly. Every request is checked against the database first (enrolled? revoked?),
//! so a revocation made by `musubi-node revoke` in another process takes effect at the next request.
//! A push is applied in one transaction and committed before the answer is built (an acknowledged
//! bundle is durable); notifications are computed after the commit.
//!
//! The relay never decrypts: it checks signatures, authors, membership and epochs on public fields only.
//! An operation, key grant or bundle may be pushed by a device other than its author (a LAN peer or a
//! file import forwards it); its author must be a current device of the facility it names, and the
//! pusher's facility must be a member of the document (for grants and bundles).

use std::collections::BTreeSet;
use std::time::SystemTime;

use musubi_crdt::bundle::{BundleError, Envelope};
use musubi_crdt::crypto::{self, DevicePublic, DeviceSecrets};
use musubi_crdt::directory::SignedDirectory;
use musubi_crdt::ids::{
    BundleId, DeploymentId, DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, Role, Seq,
};
use musubi_crdt::limits::{
    DIRECTORY_FACILITIES_MAX, DOCUMENT_LIST_MAX, DOCUMENT_MEMBERS_MAX, FRAME_BYTES_MAX,
    PULL_BUNDLES_MAX, PULL_RESPONSE_BYTES_TARGET, PUSH_ITEMS_MAX,
};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member, OpError};
use musubi_crdt::protocol::{
    self, DocumentInfo, ErrorCode, Pulled, PushItem, PushResult, Request, Response,
};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use tracing::{debug, info, warn};

use crate::invite::hash_secret;
use crate::store::{self, Store, StoreError, parse_col, rfc3339, unix_ms};

/// Byte budget of one `KeyGrants` response (a frame minus room for the envelope).
pub const KEY_GRANTS_RESPONSE_BYTES_MAX: usize = FRAME_BYTES_MAX - 64 * 1024;

/// A request the relay sends to a connected device after a change (fire-and-forget).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The device to tell (send only if it is connected).
    pub to: DeviceId,
    /// Always a [`Request::Notify`].
    pub request: Request,
}

/// The relay's request handler over its store.
pub struct Relay {
    store: Store,
    secrets: DeviceSecrets,
    deployment: DeploymentId,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Relay({})", self.secrets.device_id())
    }
}

/// The connected device as the database knows it.
#[derive(Clone, Copy, Debug)]
struct Caller {
    device: DeviceId,
    facility: FacilityId,
}

/// A row of the `invites` table.
struct InviteRow {
    kind: String,
    name: Option<String>,
    role: Option<String>,
    facility: Option<String>,
    expires_at: i64,
    used_at: Option<i64>,
    used_by: Option<String>,
}

enum Lookup {
    Unknown,
    Revoked { facility_revoked: bool },
    Current(Caller),
}

/// A per-item refusal inside a push.
fn reject(code: ErrorCode, message: impl Into<String>) -> PushResult {
    let Response::Error { code, message } = Response::error(code, message) else {
        unreachable!("Response::error always builds an Error")
    };
    PushResult::Rejected { code, message }
}

type HandlerResult = Result<(Response, Vec<Notification>), StoreError>;

impl Relay {
    /// A handler over `store`, signing with the relay key from the store's data directory.
    ///
    /// Errors: the key file or the deployment id cannot be read.
    pub fn new(store: Store) -> Result<Self, StoreError> {
        let secrets = store.relay_secrets()?;
        let deployment = store.deployment()?;
        Ok(Self {
            store,
            secrets,
            deployment,
        })
    }

    /// The relay's identity (its libp2p key pair signs the directory and the connections).
    pub fn secrets(&self) -> &DeviceSecrets {
        &self.secrets
    }

    /// The store (for watching revocations and recording listen addresses).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, mutably.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Handles one request frame from the connected device `peer` at `now`.
    ///
    /// Returns the encoded response frame and the notifications to send (to connected devices only).
    /// Never fails: a malformed frame, a refusal or a database failure is a [`Response::Error`].
    pub fn handle(
        &mut self,
        peer: DeviceId,
        frame: &[u8],
        now: SystemTime,
    ) -> (Vec<u8>, Vec<Notification>) {
        let (response, notes) = match protocol::decode_request(frame) {
            Ok(request) => self.handle_request(peer, request, now),
            Err(e) => {
                debug!(%peer, bytes = frame.len(), error = %e, "undecodable request");
                (Response::error(e.code(), e.to_string()), vec![])
            }
        };
        (protocol::encode_response(&response), notes)
    }

    /// Handles one decoded request (see [`Relay::handle`]).
    pub fn handle_request(
        &mut self,
        peer: DeviceId,
        request: Request,
        now: SystemTime,
    ) -> (Response, Vec<Notification>) {
        let kind = request.kind();
        match self.dispatch(peer, request, now) {
            Ok((response, notes)) => {
                if let Response::Error { code, message } = &response {
                    info!(%peer, request = kind, ?code, %message, "refused");
                } else {
                    debug!(%peer, request = kind, "answered");
                }
                (response, notes)
            }
            Err(e) => {
                tracing::error!(%peer, request = kind, error = %e, "request failed");
                (
                    Response::error(
                        ErrorCode::Internal,
                        "the relay could not complete this request; retry later",
                    ),
                    vec![],
                )
            }
        }
    }

    fn dispatch(&mut self, peer: DeviceId, request: Request, now: SystemTime) -> HandlerResult {
        let lookup = lookup(&self.store.conn, &peer)?;
        let caller = match (lookup, &request) {
            (
                Lookup::Revoked {
                    facility_revoked: true,
                },
                _,
            ) => {
                return answer(Response::error(
                    ErrorCode::Revoked,
                    "this device's facility has been revoked by the relay operator",
                ));
            }
            (
                Lookup::Revoked {
                    facility_revoked: false,
                },
                _,
            ) => {
                return answer(Response::error(
                    ErrorCode::Revoked,
                    "this device has been revoked by the relay operator",
                ));
            }
            (lookup, Request::Join { .. }) => {
                let Request::Join { secret, device } = request else {
                    unreachable!("matched Join above")
                };
                let caller = match lookup {
                    Lookup::Current(c) => Some(c),
                    _ => None,
                };
                return self.join(peer, caller, &secret, device, now);
            }
            (Lookup::Unknown, _) => {
                return answer(Response::error(
                    ErrorCode::NotEnrolled,
                    "this device is not enrolled at this relay; join with an invite code from the relay operator",
                ));
            }
            (Lookup::Current(c), _) => c,
        };
        match request {
            Request::Join { .. } => unreachable!("handled above"),
            Request::GetDirectory { known_version } => self.get_directory(known_version),
            Request::ListDocuments => self.list_documents(caller),
            Request::Push { items } => self.push(caller, items, now),
            Request::Pull { doc, after } => self.pull(caller, doc, after),
            Request::GetKeyGrants { doc } => self.key_grants(caller, doc),
            Request::Notify { .. } => answer(Response::error(
                ErrorCode::Forbidden,
                "the relay does not accept notifications",
            )),
            Request::Offer { .. } | Request::Deliver { .. } => answer(Response::error(
                ErrorCode::Forbidden,
                "LAN exchange is between facilities; push and pull with the relay",
            )),
        }
    }

    fn signed_directory(&self) -> Result<SignedDirectory, StoreError> {
        Ok(SignedDirectory::sign(
            &store::directory(&self.store.conn)?,
            &self.secrets,
        ))
    }

    fn join(
        &mut self,
        peer: DeviceId,
        caller: Option<Caller>,
        secret: &[u8],
        device: DevicePublic,
        now: SystemTime,
    ) -> HandlerResult {
        if device.device != peer {
            return answer(Response::error(
                ErrorCode::BadSignature,
                format!(
                    "the join names device {} but the connection is from {peer}",
                    device.device
                ),
            ));
        }
        if crypto::parse_recipient(&device.age_recipient).is_err() {
            return answer(Response::error(
                ErrorCode::Malformed,
                "the device's age recipient is not a valid age1... key",
            ));
        }
        let hash = hash_secret(secret);
        let tx = self
            .store
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let invite = tx
            .query_row(
                "SELECT kind, name, role, facility, expires_at, used_at, used_by FROM invites WHERE secret_hash = ?1",
                [hash.as_slice()],
                |r| {
                    Ok(InviteRow {
                        kind: r.get(0)?,
                        name: r.get(1)?,
                        role: r.get(2)?,
                        facility: r.get(3)?,
                        expires_at: r.get(4)?,
                        used_at: r.get(5)?,
                        used_by: r.get(6)?,
                    })
                },
            )
            .optional()?;
        let Some(InviteRow {
            kind,
            name,
            role,
            facility,
            expires_at,
            used_at,
            used_by,
        }) = invite
        else {
            return answer(Response::error(
                ErrorCode::InviteInvalid,
                "this invite is not known at this relay (check that the code is complete and for this relay)",
            ));
        };
        if used_at.is_some() {
            // A device that joined but lost the answer may ask again with the same code.
            if let (Some(c), Some(by)) = (caller, used_by)
                && by == peer.to_string()
            {
                drop(tx);
                return self.joined(c.facility);
            }
            return answer(Response::error(
                ErrorCode::InviteInvalid,
                "this invite was already used",
            ));
        }
        if let Some(c) = caller {
            return answer(Response::error(
                ErrorCode::Conflict,
                format!(
                    "this device is already enrolled as a device of facility {}; it needs no invite",
                    c.facility
                ),
            ));
        }
        if expires_at <= unix_ms(now) {
            return answer(Response::error(
                ErrorCode::InviteInvalid,
                format!(
                    "this invite expired at {}; ask the relay operator for a new one",
                    rfc3339(expires_at)
                ),
            ));
        }
        let facility = match (kind.as_str(), name, role, facility) {
            ("facility", Some(name), Some(role), _) => {
                let count: i64 =
                    tx.query_row("SELECT COUNT(*) FROM facilities", [], |r| r.get(0))?;
                if usize::try_from(count).unwrap_or(usize::MAX) >= DIRECTORY_FACILITIES_MAX {
                    return answer(Response::error(
                        ErrorCode::TooLarge,
                        format!(
                            "the deployment already has {DIRECTORY_FACILITIES_MAX} facilities, the most allowed"
                        ),
                    ));
                }
                // Derived from the secret, so the id is fixed by the invite and needs no randomness here.
                let mut seed = blake3::Hasher::new_derive_key("musubi facility id from invite v1");
                seed.update(secret);
                let bytes: [u8; 16] = seed.finalize().as_bytes()[..16]
                    .try_into()
                    .expect("16 of 32 bytes");
                let id = FacilityId::from_random_bytes(bytes);
                tx.execute(
                    "INSERT INTO facilities (id, name, role, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
                    params![id.to_string(), name, role, unix_ms(now)],
                )?;
                id
            }
            ("device", _, _, Some(facility)) => {
                let id: FacilityId = facility
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                let revoked: bool = tx.query_row(
                    "SELECT revoked FROM facilities WHERE id = ?1",
                    [&facility],
                    |r| r.get(0),
                )?;
                if revoked {
                    return answer(Response::error(
                        ErrorCode::InviteInvalid,
                        "the facility of this invite has been revoked; ask the relay operator",
                    ));
                }
                id
            }
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "invite of kind {kind:?} lacks its fields"
                )));
            }
        };
        tx.execute(
            "INSERT INTO devices (peer_id, facility, age_recipient, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
            params![peer.to_string(), facility.to_string(), device.age_recipient, unix_ms(now)],
        )?;
        tx.execute(
            "UPDATE invites SET used_at = ?2, used_by = ?3 WHERE secret_hash = ?1",
            params![hash.as_slice(), unix_ms(now), peer.to_string()],
        )?;
        store::bump_directory_version(&tx)?;
        tx.commit()?;
        info!(%peer, %facility, "device enrolled");
        self.joined(facility)
    }

    fn joined(&self, facility: FacilityId) -> HandlerResult {
        let (name, role): (String, String) = self.store.conn.query_row(
            "SELECT name, role FROM facilities WHERE id = ?1",
            [facility.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        answer(Response::Joined {
            deployment: self.deployment,
            facility,
            facility_name: name,
            role: role
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("{e}")))?,
            directory: self.signed_directory()?,
            pseudonym_secret: self.store.pseudonym_secret()?.to_vec(),
        })
    }

    fn get_directory(&self, known_version: u64) -> HandlerResult {
        let version = store::directory_version(&self.store.conn)?;
        // Any other version (also an older one, after a restore from backup) gets the current directory.
        let directory = if version != known_version {
            Some(self.signed_directory()?)
        } else {
            None
        };
        answer(Response::Directory { directory })
    }

    fn list_documents(&self, caller: Caller) -> HandlerResult {
        let conn = &self.store.conn;
        let mut st = conn.prepare(
            "SELECT d.id, d.kind, d.epoch FROM documents d JOIN members m ON m.doc = d.id
             WHERE m.facility = ?1 ORDER BY d.rowid LIMIT ?2",
        )?;
        let rows = st
            .query_map(
                params![caller.facility.to_string(), DOCUMENT_LIST_MAX as i64],
                |r| {
                    Ok((
                        parse_col::<DocumentId>(r, 0)?,
                        parse_col::<DocumentKind>(r, 1)?,
                        r.get::<_, u32>(2)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut docs = Vec::with_capacity(rows.len());
        for (id, kind, epoch) in rows {
            docs.push(DocumentInfo {
                id,
                kind,
                members: members(conn, id)?,
                epoch: Epoch(epoch),
                head: head(conn, id)?,
            });
        }
        answer(Response::Documents { docs })
    }

    fn push(&mut self, caller: Caller, items: Vec<PushItem>, now: SystemTime) -> HandlerResult {
        if items.len() > PUSH_ITEMS_MAX {
            return answer(Response::error(
                ErrorCode::TooLarge,
                format!(
                    "a push carries at most {PUSH_ITEMS_MAX} items; this one has {}",
                    items.len()
                ),
            ));
        }
        let tx = self
            .store
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut touched = BTreeSet::new();
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match item {
                PushItem::Op { op } => push_op(&tx, &op, now, &mut touched)?,
                PushItem::Grant { grant } => push_grant(&tx, caller, &grant, now)?,
                PushItem::Bundle { envelope } => {
                    push_bundle(&tx, caller, &envelope, now, &mut touched)?
                }
            };
            results.push(result);
        }
        tx.commit()?;
        let mut notes = Vec::new();
        for doc in touched {
            notes.extend(notifications(&self.store.conn, doc, caller.device)?);
        }
        answer_with(Response::Pushed { results }, notes)
    }

    /// Takes items from an offline-transfer file (`musubi-node import`), in one transaction.
    ///
    /// Each item is checked as if its author had pushed it: the author must be a current device of a
    /// facility allowed to make it; signatures are verified; nothing is decrypted. Returns one result
    /// per item and the notifications to send to connected devices.
    pub fn import(
        &mut self,
        items: Vec<PushItem>,
        now: SystemTime,
    ) -> Result<(Vec<PushResult>, Vec<Notification>), StoreError> {
        let tx = self
            .store
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut touched = BTreeSet::new();
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let author = match &item {
                PushItem::Op { op } => op.author,
                PushItem::Grant { grant } => grant.author,
                PushItem::Bundle { envelope } => envelope.author,
            };
            let caller = match lookup(&tx, &author)? {
                Lookup::Current(c) => c,
                Lookup::Revoked { .. } => {
                    results.push(reject(
                        ErrorCode::Revoked,
                        format!("{author} has been revoked"),
                    ));
                    continue;
                }
                Lookup::Unknown => {
                    results.push(reject(
                        ErrorCode::NotEnrolled,
                        format!("{author} is not an enrolled device"),
                    ));
                    continue;
                }
            };
            results.push(match item {
                PushItem::Op { op } => push_op(&tx, &op, now, &mut touched)?,
                PushItem::Grant { grant } => push_grant(&tx, caller, &grant, now)?,
                PushItem::Bundle { envelope } => {
                    push_bundle(&tx, caller, &envelope, now, &mut touched)?
                }
            });
        }
        tx.commit()?;
        let mut notes = Vec::new();
        for doc in touched {
            notes.extend(notifications(
                &self.store.conn,
                doc,
                self.secrets.device_id(),
            )?);
        }
        Ok((results, notes))
    }

    fn pull(&self, caller: Caller, doc: DocumentId, after: Seq) -> HandlerResult {
        let conn = &self.store.conn;
        if let Some(refusal) = check_member(conn, caller, doc)? {
            return answer(refusal);
        }
        let mut st = conn.prepare(
            "SELECT seq, bytes, envelope FROM bundles WHERE doc = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let after_i = i64::try_from(after.0).unwrap_or(i64::MAX);
        let mut rows = st.query(params![doc.to_string(), after_i, PULL_BUNDLES_MAX as i64])?;
        let mut items = Vec::new();
        let mut total = 0usize;
        while let Some(row) = rows.next()? {
            let bytes = usize::try_from(row.get::<_, i64>(1)?).unwrap_or(usize::MAX);
            if !items.is_empty() && total.saturating_add(bytes) > PULL_RESPONSE_BYTES_TARGET {
                break;
            }
            let seq: i64 = row.get(0)?;
            let encoded: Vec<u8> = row.get(2)?;
            let envelope = Envelope::decode(&encoded).map_err(|e| {
                StoreError::Corrupt(format!("stored bundle {doc}/{seq} does not decode: {e}"))
            })?;
            total = total.saturating_add(bytes);
            items.push(Pulled {
                seq: Seq(u64::try_from(seq).unwrap_or(0)),
                envelope,
            });
        }
        drop(rows);
        let head = head(conn, doc)?;
        answer(Response::Bundles { doc, items, head })
    }

    fn key_grants(&self, caller: Caller, doc: DocumentId) -> HandlerResult {
        let conn = &self.store.conn;
        if let Some(refusal) = check_member(conn, caller, doc)? {
            return answer(refusal);
        }
        let mut st =
            conn.prepare("SELECT encoded FROM grants WHERE doc = ?1 ORDER BY received_at, rowid")?;
        let mut rows = st.query([doc.to_string()])?;
        let mut grants = Vec::new();
        let mut total = 0usize;
        while let Some(row) = rows.next()? {
            let encoded: Vec<u8> = row.get(0)?;
            if total + encoded.len() > KEY_GRANTS_RESPONSE_BYTES_MAX {
                warn!(%doc, grants = grants.len(), "key grants exceed one frame; the newest are left out");
                break;
            }
            total += encoded.len();
            let grant: KeyGrant = ciborium::from_reader(encoded.as_slice()).map_err(|e| {
                StoreError::Corrupt(format!("stored key grant of {doc} does not decode: {e}"))
            })?;
            grants.push(grant);
        }
        drop(rows);
        answer(Response::KeyGrants { doc, grants })
    }
}

fn answer(r: Response) -> HandlerResult {
    Ok((r, vec![]))
}

fn answer_with(r: Response, notes: Vec<Notification>) -> HandlerResult {
    Ok((r, notes))
}

fn lookup(conn: &Connection, peer: &DeviceId) -> Result<Lookup, StoreError> {
    let row: Option<(FacilityId, bool, bool)> = conn
        .query_row(
            "SELECT d.facility, d.revoked, f.revoked FROM devices d JOIN facilities f ON f.id = d.facility
             WHERE d.peer_id = ?1",
            [peer.to_string()],
            |r| Ok((parse_col(r, 0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(match row {
        None => Lookup::Unknown,
        Some((_, _, true)) => Lookup::Revoked {
            facility_revoked: true,
        },
        Some((_, true, false)) => Lookup::Revoked {
            facility_revoked: false,
        },
        Some((facility, false, false)) => Lookup::Current(Caller {
            device: *peer,
            facility,
        }),
    })
}

/// The state of a device as far as authorship goes.
enum DeviceState {
    Unknown,
    Revoked,
    Of(FacilityId),
}

fn device_state(conn: &Connection, device: &DeviceId) -> Result<DeviceState, StoreError> {
    let row: Option<(FacilityId, bool, bool)> = conn
        .query_row(
            "SELECT d.facility, d.revoked, f.revoked FROM devices d JOIN facilities f ON f.id = d.facility
             WHERE d.peer_id = ?1",
            [device.to_string()],
            |r| Ok((parse_col(r, 0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(match row {
        None => DeviceState::Unknown,
        Some((_, d, f)) if d || f => DeviceState::Revoked,
        Some((f, _, _)) => DeviceState::Of(f),
    })
}

/// `Some(revoked)` for an enrolled facility, `None` for an unknown one.
fn facility_revoked(conn: &Connection, facility: FacilityId) -> Result<Option<bool>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT revoked FROM facilities WHERE id = ?1",
            [facility.to_string()],
            |r| r.get(0),
        )
        .optional()?)
}

fn doc_epoch(conn: &Connection, doc: DocumentId) -> Result<Option<Epoch>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT epoch FROM documents WHERE id = ?1",
            [doc.to_string()],
            |r| r.get::<_, u32>(0),
        )
        .optional()?
        .map(Epoch))
}

fn member_role(
    conn: &Connection,
    doc: DocumentId,
    facility: FacilityId,
) -> Result<Option<Role>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT role FROM members WHERE doc = ?1 AND facility = ?2",
            [doc.to_string(), facility.to_string()],
            |r| parse_col::<Role>(r, 0),
        )
        .optional()?)
}

fn members(conn: &Connection, doc: DocumentId) -> Result<Vec<Member>, StoreError> {
    let mut st =
        conn.prepare("SELECT facility, role FROM members WHERE doc = ?1 ORDER BY rowid")?;
    let out = st
        .query_map([doc.to_string()], |r| {
            Ok(Member {
                facility: parse_col(r, 0)?,
                role: parse_col(r, 1)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(out)
}

fn head(conn: &Connection, doc: DocumentId) -> Result<Seq, StoreError> {
    let h: i64 = conn.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM bundles WHERE doc = ?1",
        [doc.to_string()],
        |r| r.get(0),
    )?;
    Ok(Seq(u64::try_from(h).unwrap_or(0)))
}

/// `Some(refusal)` unless `doc` exists and the caller's facility is a member.
fn check_member(
    conn: &Connection,
    caller: Caller,
    doc: DocumentId,
) -> Result<Option<Response>, StoreError> {
    Ok(member_epoch(conn, caller, doc)?
        .err()
        .map(|(code, message)| Response::error(code, message)))
}

/// The document's current epoch when it exists and the caller's facility is a member; else why not.
fn member_epoch(
    conn: &Connection,
    caller: Caller,
    doc: DocumentId,
) -> Result<Result<Epoch, (ErrorCode, String)>, StoreError> {
    let Some(epoch) = doc_epoch(conn, doc)? else {
        return Ok(Err((
            ErrorCode::UnknownDocument,
            format!("document {doc} is not known at this relay"),
        )));
    };
    if member_role(conn, doc, caller.facility)?.is_none() {
        return Ok(Err((
            ErrorCode::NotMember,
            format!(
                "facility {} is not a member of document {doc}",
                caller.facility
            ),
        )));
    }
    Ok(Ok(epoch))
}

/// Why a facility cannot become a member, if it cannot.
fn member_refusal(
    conn: &Connection,
    facility: FacilityId,
) -> Result<Option<PushResult>, StoreError> {
    Ok(match facility_revoked(conn, facility)? {
        None => Some(reject(
            ErrorCode::Conflict,
            format!("facility {facility} is not enrolled at this relay"),
        )),
        Some(true) => Some(reject(
            ErrorCode::Conflict,
            format!("facility {facility} has been revoked"),
        )),
        Some(false) => None,
    })
}

fn insert_op(
    conn: &Connection,
    op: &DocOp,
    hash: &[u8; 32],
    now: SystemTime,
) -> Result<(), StoreError> {
    let mut encoded = Vec::new();
    ciborium::into_writer(op, &mut encoded).expect("writing to a Vec cannot fail");
    conn.execute(
        "INSERT INTO ops (hash, doc, author, encoded, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            hash.as_slice(),
            op.doc.to_string(),
            op.author.to_string(),
            encoded,
            unix_ms(now)
        ],
    )?;
    Ok(())
}

fn push_op(
    conn: &Connection,
    op: &DocOp,
    now: SystemTime,
    touched: &mut BTreeSet<DocumentId>,
) -> Result<PushResult, StoreError> {
    let doc = op.doc;
    if op.verify().is_err() {
        return Ok(reject(
            ErrorCode::BadSignature,
            "the operation's signature does not verify",
        ));
    }
    // The pusher need not be the author (a LAN peer or a file import forwards another device's
    // operation); the author must be a current device of the facility the operation names.
    if let Some(refusal) = author_refusal(conn, &op.author, op.facility, "operation")? {
        return Ok(refusal);
    }
    let hash = op.hash();
    let seen: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM ops WHERE hash = ?1)",
        [hash.as_slice()],
        |r| r.get(0),
    )?;
    if seen {
        return Ok(PushResult::Duplicate { seq: None });
    }
    let current = doc_epoch(conn, doc)?;
    match &op.body {
        DocOpBody::Create {
            kind,
            members: others,
        } => {
            if current.is_some() {
                return Ok(reject(
                    ErrorCode::Conflict,
                    format!("document {doc} already exists"),
                ));
            }
            if others.len() + 1 > DOCUMENT_MEMBERS_MAX {
                return Ok(reject(
                    ErrorCode::TooLarge,
                    format!(
                        "a document has at most {DOCUMENT_MEMBERS_MAX} members; this one would have {}",
                        others.len() + 1
                    ),
                ));
            }
            let mut seen = BTreeSet::from([op.facility]);
            for m in others {
                if !seen.insert(m.facility) {
                    return Ok(reject(
                        ErrorCode::Malformed,
                        format!("facility {} is listed twice", m.facility),
                    ));
                }
                if let Some(refusal) = member_refusal(conn, m.facility)? {
                    return Ok(refusal);
                }
            }
            conn.execute(
                "INSERT INTO documents (id, kind, owner, epoch, created_at) VALUES (?1, ?2, ?3, 0, ?4)",
                params![doc.to_string(), kind.to_string(), op.facility.to_string(), unix_ms(now)],
            )?;
            let owner = Member {
                facility: op.facility,
                role: Role::Owner,
            };
            for m in std::iter::once(&owner).chain(others) {
                conn.execute(
                    "INSERT INTO members (doc, facility, role) VALUES (?1, ?2, ?3)",
                    params![doc.to_string(), m.facility.to_string(), m.role.to_string()],
                )?;
            }
            info!(%doc, %kind, facility = %op.facility, members = others.len() + 1, "document created");
        }
        DocOpBody::SetMember { facility, role } => {
            if current.is_none() {
                return Ok(reject(
                    ErrorCode::UnknownDocument,
                    format!("document {doc} is not known at this relay"),
                ));
            }
            if let Some(refusal) = owner_refusal(conn, doc, op.facility)? {
                return Ok(refusal);
            }
            let existing = member_role(conn, doc, *facility)?;
            let owners: i64 = conn.query_row(
                "SELECT COUNT(*) FROM members WHERE doc = ?1 AND role = 'owner'",
                [doc.to_string()],
                |r| r.get(0),
            )?;
            if existing == Some(Role::Owner) && *role != Some(Role::Owner) && owners <= 1 {
                return Ok(reject(
                    ErrorCode::Conflict,
                    "this would leave the document without an owner",
                ));
            }
            match role {
                Some(role) => {
                    if let Some(refusal) = member_refusal(conn, *facility)? {
                        return Ok(refusal);
                    }
                    if existing.is_none() {
                        let count: i64 = conn.query_row(
                            "SELECT COUNT(*) FROM members WHERE doc = ?1",
                            [doc.to_string()],
                            |r| r.get(0),
                        )?;
                        if usize::try_from(count).unwrap_or(usize::MAX) >= DOCUMENT_MEMBERS_MAX {
                            return Ok(reject(
                                ErrorCode::TooLarge,
                                format!(
                                    "document {doc} already has {DOCUMENT_MEMBERS_MAX} members, the most allowed"
                                ),
                            ));
                        }
                    }
                    conn.execute(
                        "INSERT INTO members (doc, facility, role) VALUES (?1, ?2, ?3)
                         ON CONFLICT (doc, facility) DO UPDATE SET role = excluded.role",
                        params![doc.to_string(), facility.to_string(), role.to_string()],
                    )?;
                }
                None => {
                    conn.execute(
                        "DELETE FROM members WHERE doc = ?1 AND facility = ?2",
                        params![doc.to_string(), facility.to_string()],
                    )?;
                }
            }
            info!(%doc, member = %facility, role = ?role, by = %op.facility, "membership changed");
        }
        DocOpBody::NewEpoch { epoch } => {
            let Some(current) = current else {
                return Ok(reject(
                    ErrorCode::UnknownDocument,
                    format!("document {doc} is not known at this relay"),
                ));
            };
            if let Some(refusal) = owner_refusal(conn, doc, op.facility)? {
                return Ok(refusal);
            }
            if current.0.checked_add(1) != Some(epoch.0) {
                return Ok(reject(
                    ErrorCode::Conflict,
                    format!(
                        "epoch {epoch} is not the next epoch of document {doc} (its current epoch is {current})"
                    ),
                ));
            }
            conn.execute(
                "UPDATE documents SET epoch = ?2 WHERE id = ?1",
                params![doc.to_string(), epoch.0],
            )?;
            info!(%doc, %epoch, by = %op.facility, "new key epoch");
        }
    }
    insert_op(conn, op, &hash, now)?;
    touched.insert(doc);
    Ok(PushResult::Accepted { seq: None })
}

/// Refuses an item unless `author` is a current device of `facility`.
fn author_refusal(
    conn: &Connection,
    author: &DeviceId,
    facility: FacilityId,
    what: &str,
) -> Result<Option<PushResult>, StoreError> {
    Ok(match device_state(conn, author)? {
        DeviceState::Of(f) if f == facility => None,
        DeviceState::Revoked => Some(reject(
            ErrorCode::Revoked,
            format!("the {what} is signed by {author}, a revoked device"),
        )),
        DeviceState::Of(_) | DeviceState::Unknown => Some(reject(
            ErrorCode::Forbidden,
            format!(
                "the {what} is signed by {author}, which is not a current device of facility {facility}"
            ),
        )),
    })
}

fn owner_refusal(
    conn: &Connection,
    doc: DocumentId,
    facility: FacilityId,
) -> Result<Option<PushResult>, StoreError> {
    Ok(match member_role(conn, doc, facility)? {
        None => Some(reject(
            ErrorCode::NotMember,
            format!("facility {facility} is not a member of document {doc}"),
        )),
        Some(Role::Owner) => None,
        Some(role) => Some(reject(
            ErrorCode::Forbidden,
            format!(
                "only an owner can change members or keys; facility {facility} is a {role} of this document"
            ),
        )),
    })
}

fn push_grant(
    conn: &Connection,
    caller: Caller,
    grant: &KeyGrant,
    now: SystemTime,
) -> Result<PushResult, StoreError> {
    let doc = grant.doc;
    match grant.verify() {
        Ok(()) => {}
        Err(OpError::TooMany { what, n, max }) => {
            return Ok(reject(
                ErrorCode::TooLarge,
                format!("a key grant names {n} {what}, over the limit of {max}"),
            ));
        }
        Err(_) => {
            return Ok(reject(
                ErrorCode::BadSignature,
                "the key grant's signature does not verify",
            ));
        }
    }
    if let Some(refusal) = author_refusal(conn, &grant.author, grant.facility, "key grant")? {
        return Ok(refusal);
    }
    let current = match member_epoch(conn, caller, doc)? {
        Ok(epoch) => epoch,
        Err((code, message)) => return Ok(reject(code, message)),
    };
    let hash = grant.hash();
    let seen: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM grants WHERE hash = ?1)",
        [hash.as_slice()],
        |r| r.get(0),
    )?;
    if seen {
        return Ok(PushResult::Duplicate { seq: None });
    }
    if grant.epoch > current {
        return Ok(reject(
            ErrorCode::Conflict,
            format!(
                "the key grant is for epoch {} but document {doc} is at epoch {current}",
                grant.epoch
            ),
        ));
    }
    if grant.recipients.is_empty() {
        return Ok(reject(
            ErrorCode::Malformed,
            "the key grant names no recipients",
        ));
    }
    for r in &grant.recipients {
        let ok = match device_state(conn, r)? {
            DeviceState::Of(f) => member_role(conn, doc, f)?.is_some(),
            DeviceState::Unknown | DeviceState::Revoked => false,
        };
        if !ok {
            return Ok(reject(
                ErrorCode::Forbidden,
                format!(
                    "recipient {r} is not a current device of a member facility of document {doc}"
                ),
            ));
        }
    }
    let mut encoded = Vec::new();
    ciborium::into_writer(grant, &mut encoded).expect("writing to a Vec cannot fail");
    conn.execute(
        "INSERT INTO grants (hash, doc, epoch, author, encoded, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![hash.as_slice(), doc.to_string(), grant.epoch.0, grant.author.to_string(), encoded, unix_ms(now)],
    )?;
    info!(%doc, epoch = %grant.epoch, recipients = grant.recipients.len(), "key grant stored");
    Ok(PushResult::Accepted { seq: None })
}

fn push_bundle(
    conn: &Connection,
    caller: Caller,
    envelope: &Envelope,
    now: SystemTime,
    touched: &mut BTreeSet<DocumentId>,
) -> Result<PushResult, StoreError> {
    let doc = envelope.doc;
    match envelope.check() {
        Ok(()) => {}
        Err(e @ BundleError::TooLarge { .. }) => {
            return Ok(reject(ErrorCode::TooLarge, e.to_string()));
        }
        Err(e) => return Ok(reject(ErrorCode::Malformed, e.to_string())),
    }
    if envelope.verify_signature().is_err() {
        return Ok(reject(
            ErrorCode::BadSignature,
            "the bundle's signature does not verify",
        ));
    }
    let current = match member_epoch(conn, caller, doc)? {
        Ok(epoch) => epoch,
        Err((code, message)) => return Ok(reject(code, message)),
    };
    let encoded = envelope.encode();
    let id = BundleId::of_bytes(&encoded);
    let existing: Option<i64> = conn
        .query_row(
            "SELECT seq FROM bundles WHERE bundle_id = ?1",
            [id.0.as_slice()],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(seq) = existing {
        return Ok(PushResult::Duplicate {
            seq: Some(Seq(u64::try_from(seq).unwrap_or(0))),
        });
    }
    match member_role(conn, doc, envelope.facility)? {
        None => {
            return Ok(reject(
                ErrorCode::Forbidden,
                format!(
                    "facility {} is not a member of this document",
                    envelope.facility
                ),
            ));
        }
        Some(role) if !role.can_write() => {
            return Ok(reject(
                ErrorCode::Forbidden,
                format!(
                    "facility {} is a reader of this document",
                    envelope.facility
                ),
            ));
        }
        Some(_) => {}
    }
    match device_state(conn, &envelope.author)? {
        DeviceState::Of(f) if f == envelope.facility => {}
        DeviceState::Revoked => {
            return Ok(reject(
                ErrorCode::Revoked,
                format!("device {} has been revoked", envelope.author),
            ));
        }
        DeviceState::Of(_) | DeviceState::Unknown => {
            return Ok(reject(
                ErrorCode::Forbidden,
                format!(
                    "device {} is not a device of facility {}",
                    envelope.author, envelope.facility
                ),
            ));
        }
    }
    if envelope.epoch > current {
        return Ok(reject(
            ErrorCode::Conflict,
            format!(
                "the bundle is in epoch {} but document {doc} is at epoch {current}",
                envelope.epoch
            ),
        ));
    }
    let seq = head(conn, doc)?.0 + 1;
    conn.execute(
        "INSERT INTO bundles (doc, seq, bundle_id, envelope, author, facility, epoch, bytes, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            doc.to_string(),
            i64::try_from(seq).unwrap_or(i64::MAX),
            id.0.as_slice(),
            encoded,
            envelope.author.to_string(),
            envelope.facility.to_string(),
            envelope.epoch.0,
            encoded.len() as i64,
            unix_ms(now)
        ],
    )?;
    debug!(%doc, seq, bytes = encoded.len(), bundle = %id, "bundle accepted");
    touched.insert(doc);
    Ok(PushResult::Accepted {
        seq: Some(Seq(seq)),
    })
}

/// `Notify{doc, head, epoch}` for every current device of every member facility of `doc` except `caller`.
fn notifications(
    conn: &Connection,
    doc: DocumentId,
    caller: DeviceId,
) -> Result<Vec<Notification>, StoreError> {
    let Some(epoch) = doc_epoch(conn, doc)? else {
        return Ok(vec![]);
    };
    let request = Request::Notify {
        doc,
        head: head(conn, doc)?,
        epoch,
    };
    let mut st = conn.prepare(
        "SELECT d.peer_id FROM members m
         JOIN facilities f ON f.id = m.facility
         JOIN devices d ON d.facility = m.facility
         WHERE m.doc = ?1 AND NOT f.revoked AND NOT d.revoked",
    )?;
    let out = st
        .query_map([doc.to_string()], |r| parse_col::<DeviceId>(r, 0))?
        .filter(|d| d.as_ref().map_or(true, |d| *d != caller))
        .map(|d| {
            d.map(|to| Notification {
                to,
                request: request.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(out)
}
