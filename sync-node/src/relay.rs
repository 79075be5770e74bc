//! The request handler: one `/musubi/sync/1` frame in, one response frame and the notifications to send out.
//!
//! [`Relay::handle`] is synchronous and does no network IO: the server calls it on its database thread,
//! and tests call it directly. Every request is checked against the database first (enrolled? revoked?),
//! so a revocation made by `musubi-node revoke` in another process takes effect at the next request.
//! A push is applied in one transaction and committed before the answer is built (an acknowledged
//! bundle is durable); notifications are computed after the commit.
//!
//! The relay never decrypts and decides nothing about who may read: every operation, key grant and
//! bundle goes through [`musubi_crdt::membership::admit`] at [`Point::Relay`], the same rule the
//! facilities apply, over the membership its document's signed operations give and the devices whose
//! certificate chains the relay verified when it stored them. Facilities do not take its word for
//! any of it; they check again.
//!
//! Enrolment: a device joins with a [`JoinRequest`]; the relay stores it until the inviter approves
//! (the deployment authority for a new facility, inline when `serve --authority` runs; a current
//! device of the facility for another device, which pushes the next link of its device chain).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use musubi_crdt::bundle::Envelope;
use musubi_crdt::crypto::DeviceSecrets;
use musubi_crdt::directory::{
    DeviceChange, DeviceLink, DeviceStatus, Devices, FacilityStatus, SignedDirectory, verify_chain,
};
use musubi_crdt::ids::{
    BundleId, DeploymentId, DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole,
    LogHash, Seq,
};
use musubi_crdt::invite::{InviteRegistration, JoinRequest};
use musubi_crdt::limits::{
    DOCUMENT_LIST_MAX, FRAME_BYTES_MAX, INVITE_EXPIRES_SECS_MAX, JOIN_REQUESTS_MAX, OFFER_IDS_MAX,
    OPS_RESPONSE_MAX, PULL_BUNDLES_MAX, PULL_RESPONSE_BYTES_TARGET, PUSH_ITEMS_MAX,
};
use musubi_crdt::membership::{self, Membership, Point};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant};
use musubi_crdt::protocol::{
    self, DocumentInfo, ErrorCode, Generation, Pulled, PushItem, PushResult, Request, Response,
};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use tracing::{debug, info, warn};

use crate::authority::Authority;
use crate::store::{self, Store, StoreError, cbor, parse_col, rfc3339, uncbor, unix_ms};

/// Byte budget of one `KeyGrants` or `Ops` response (a frame minus room for the envelope).
pub const KEY_GRANTS_RESPONSE_BYTES_MAX: usize = FRAME_BYTES_MAX - 64 * 1024;

/// A request the relay sends to a connected device after a change (fire-and-forget).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The device to tell (send only if it is connected).
    pub to: DeviceId,
    /// A [`Request::Notify`] or [`Request::NotifyJoin`].
    pub request: Request,
}

/// The relay's request handler over its store.
pub struct Relay {
    store: Store,
    secrets: DeviceSecrets,
    deployment: DeploymentId,
    generation: Generation,
    authority: Option<Authority>,
    /// Most bundle bytes one facility may store (`None`: no quota).
    facility_quota_bytes: Option<u64>,
    /// What the request being handled did, for [`Relay::handle_observed`].
    observed: Observed,
}

/// What one request did, as the relay's metrics count it (no device, facility or document ids).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The request's kind (`push`, `pull`, ...; `undecodable` for a frame that did not decode).
    pub kind: &'static str,
    /// `ok`, or the refusal's [`ErrorCode::as_str`].
    pub outcome: &'static str,
    /// Items of a push the relay stored (accepted, not duplicates), by item kind.
    pub stored: BTreeMap<&'static str, u64>,
    /// Bundle bytes stored by this request.
    pub stored_bytes: u64,
    /// Push items refused because their facility's quota is used up.
    pub quota_refusals: u64,
    /// How long the push transaction's commit took.
    pub commit: Option<Duration>,
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

/// Who is who, from the relay's tables (devices and certificates it verified when storing them),
/// cached for one request. A database error is kept and reported after the rule ran.
struct DbDevices<'c> {
    conn: &'c Connection,
    devices: RefCell<HashMap<DeviceId, DeviceStatus>>,
    facilities: RefCell<HashMap<FacilityId, FacilityStatus>>,
    error: RefCell<Option<StoreError>>,
}

impl<'c> DbDevices<'c> {
    fn new(conn: &'c Connection) -> Self {
        Self {
            conn,
            devices: RefCell::default(),
            facilities: RefCell::default(),
            error: RefCell::default(),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Devices for DbDevices<'_> {
    fn device_status(&self, device: &DeviceId) -> DeviceStatus {
        if let Some(s) = self.devices.borrow().get(device) {
            return *s;
        }
        let row: Result<Option<(FacilityId, bool, bool)>, rusqlite::Error> = self
            .conn
            .query_row(
                "SELECT d.facility, d.revoked OR d.chain_revoked, f.revoked FROM devices d
                 JOIN facilities f ON f.id = d.facility WHERE d.peer_id = ?1",
                [device.to_string()],
                |r| Ok((parse_col(r, 0)?, r.get(1)?, r.get(2)?)),
            )
            .optional();
        let status = match row {
            Ok(None) => DeviceStatus::Unknown,
            Ok(Some((f, d, fr))) if d || fr => DeviceStatus::Former(f),
            Ok(Some((f, _, _))) => DeviceStatus::Current(f),
            Err(e) => {
                *self.error.borrow_mut() = Some(e.into());
                DeviceStatus::Unknown
            }
        };
        self.devices.borrow_mut().insert(*device, status);
        status
    }

    fn facility_status(&self, facility: FacilityId) -> FacilityStatus {
        if let Some(s) = self.facilities.borrow().get(&facility) {
            return *s;
        }
        let row: Result<Option<(FacilityRole, bool)>, rusqlite::Error> = self
            .conn
            .query_row(
                "SELECT role, revoked FROM facilities WHERE id = ?1",
                [facility.to_string()],
                |r| Ok((parse_col(r, 0)?, r.get(1)?)),
            )
            .optional();
        let status = match row {
            Ok(None) => FacilityStatus::Unknown,
            Ok(Some((role, true))) => FacilityStatus::Former(role),
            Ok(Some((role, false))) => FacilityStatus::Current(role),
            Err(e) => {
                *self.error.borrow_mut() = Some(e.into());
                FacilityStatus::Unknown
            }
        };
        self.facilities.borrow_mut().insert(facility, status);
        status
    }
}

impl Relay {
    /// A handler over `store`, signing with the relay key from the store's data directory.
    ///
    /// Errors: the key file or the deployment id cannot be read.
    pub fn new(store: Store) -> Result<Self, StoreError> {
        Self::with_authority(store, None)
    }

    /// A handler that also approves new facilities as they join, with the unlocked `authority`
    /// (the embedded default: `musubi-node serve --authority ADIR`).
    ///
    /// Errors: the key file or the deployment id cannot be read; the authority certifies another
    /// deployment.
    pub fn with_authority(store: Store, authority: Option<Authority>) -> Result<Self, StoreError> {
        let secrets = store.relay_secrets()?;
        let deployment = store.deployment()?;
        let generation = store.generation()?;
        if let Some(a) = &authority
            && (a.public().deployment != deployment || a.public().key != store.authority()?)
        {
            return Err(StoreError::OtherDeployment {
                relay: deployment.to_string(),
                authority: a.public().deployment.to_string(),
            });
        }
        Ok(Self {
            store,
            secrets,
            deployment,
            generation,
            authority,
            facility_quota_bytes: None,
            observed: Observed::default(),
        })
    }

    /// Sets the most bundle bytes one facility may store at this relay (`None`: no quota). A push
    /// whose bundle would take its facility over the quota is refused item by item with
    /// [`ErrorCode::QuotaExceeded`], inside the push transaction; the device keeps the item.
    pub fn set_facility_quota_bytes(&mut self, quota: Option<u64>) {
        self.facility_quota_bytes = quota;
    }

    /// The relay's identity (its libp2p key pair authenticates connections and signs the directory).
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

    /// The store's generation, as every response frame carries it.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Handles one request frame from the connected device `peer` at `now`.
    ///
    /// Returns the encoded response frame (with the store's generation) and the notifications to send
    /// (to connected devices only). Never fails: a malformed frame, a refusal or a database failure is
    /// a [`Response::Error`].
    pub fn handle(
        &mut self,
        peer: DeviceId,
        frame: &[u8],
        now: SystemTime,
    ) -> (Vec<u8>, Vec<Notification>) {
        let (frame, notes, _) = self.handle_observed(peer, frame, now);
        (frame, notes)
    }

    /// [`Relay::handle`], also saying what the request did ([`Observed`]) for the metrics.
    pub fn handle_observed(
        &mut self,
        peer: DeviceId,
        frame: &[u8],
        now: SystemTime,
    ) -> (Vec<u8>, Vec<Notification>, Observed) {
        self.observed = Observed::default();
        let (response, notes) = match protocol::decode_request(frame) {
            Ok(request) => self.handle_request(peer, request, now),
            Err(e) => {
                debug!(%peer, bytes = frame.len(), error = %e, "undecodable request");
                self.observed.kind = "undecodable";
                (Response::error(e.code(), e.to_string()), vec![])
            }
        };
        let mut observed = std::mem::take(&mut self.observed);
        observed.outcome = match &response {
            Response::Error { code, .. } => code.as_str(),
            _ => "ok",
        };
        (
            protocol::encode_relay_response(&self.generation, &response),
            notes,
            observed,
        )
    }

    /// Handles one decoded request (see [`Relay::handle`]).
    pub fn handle_request(
        &mut self,
        peer: DeviceId,
        request: Request,
        now: SystemTime,
    ) -> (Response, Vec<Notification>) {
        let kind = request.kind();
        self.observed.kind = kind;
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
                // Nothing was stored: what the rolled-back transaction counted is dropped.
                self.observed = Observed {
                    kind,
                    ..Observed::default()
                };
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
        let caller = match (lookup, request) {
            (Lookup::Revoked { facility_revoked }, _) => {
                return answer(Response::error(
                    ErrorCode::Revoked,
                    if facility_revoked {
                        "this device's facility has been revoked"
                    } else {
                        "this device has been revoked"
                    },
                ));
            }
            (lookup, Request::Join { request }) => {
                let caller = match lookup {
                    Lookup::Current(c) => Some(c),
                    _ => None,
                };
                return self.join(peer, caller, *request, now);
            }
            (Lookup::Unknown, _) => {
                return answer(Response::error(
                    ErrorCode::NotEnrolled,
                    "this device is not enrolled at this relay; join with an invite code",
                ));
            }
            (Lookup::Current(c), request) => (c, request),
        };
        let (caller, request) = caller;
        match request {
            Request::Join { .. } => unreachable!("handled above"),
            Request::GetJoinRequests => self.join_requests(caller, now),
            Request::GetDirectory { known_version } => self.get_directory(known_version),
            Request::ListDocuments => self.list_documents(caller),
            Request::GetOps { doc, from } => self.get_ops(caller, doc, from),
            Request::Push { items } => self.push(caller, items, now),
            Request::Pull { doc, after } => self.pull(caller, doc, after),
            Request::GetKeyGrants { doc } => self.key_grants(caller, doc),
            Request::Offer { doc, have, .. } => self.offer(caller, doc, have),
            Request::Notify { .. } | Request::NotifyJoin | Request::NotifyDirectory { .. } => {
                answer(Response::error(
                    ErrorCode::Forbidden,
                    "the relay does not accept notifications",
                ))
            }
            Request::Deliver { .. } => answer(Response::error(
                ErrorCode::Forbidden,
                "LAN delivery is between facilities; push to the relay",
            )),
        }
    }

    fn signed_directory(&self) -> Result<SignedDirectory, StoreError> {
        Ok(SignedDirectory::sign(
            &store::directory_body(&self.store.conn)?,
            &self.secrets,
        ))
    }

    fn join(
        &mut self,
        peer: DeviceId,
        caller: Option<Caller>,
        request: JoinRequest,
        now: SystemTime,
    ) -> HandlerResult {
        if request.device.device != peer {
            return answer(Response::error(
                ErrorCode::BadSignature,
                format!(
                    "the join request names device {} but the connection is from {peer}",
                    request.device.device
                ),
            ));
        }
        if let Err(e) = request.verify_signature() {
            return answer(Response::error(ErrorCode::BadSignature, e.to_string()));
        }
        if let Some(c) = caller {
            // Enrolled already: a device that lost the answer asks again (with this invite or
            // another one of the same facility the approver used).
            let approved: Option<Vec<u8>> = self
                .store
                .conn
                .query_row(
                    "SELECT j.invite_id FROM join_requests j WHERE j.device = ?1 AND j.approved_at IS NOT NULL
                     AND (j.invite_id = ?2 OR j.facility = (SELECT facility FROM invites WHERE invite_id = ?2))
                     ORDER BY j.approved_at LIMIT 1",
                    params![peer.to_string(), request.invite.0.as_slice()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(invite) = approved {
                return self.joined(&invite, &peer);
            }
            return answer(Response::error(
                ErrorCode::Conflict,
                format!(
                    "this device is already enrolled as a device of facility {}; it needs no invite",
                    c.facility
                ),
            ));
        }
        let tx = self
            .store
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        type InviteRow = (String, Option<FacilityId>, i64, Option<i64>, Option<String>);
        let invite: Option<InviteRow> = tx
            .query_row(
                "SELECT kind, facility, expires_at, used_at, used_by FROM invites WHERE invite_id = ?1",
                [request.invite.0.as_slice()],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get::<_, Option<String>>(1)?.and_then(|f| f.parse().ok()),
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((kind, facility, expires_at, used_at, used_by)) = invite else {
            return answer(Response::error(
                ErrorCode::InviteInvalid,
                "this invite is not known at this relay (check that the code is complete and for this relay; a device invite works once the inviting device has synced)",
            ));
        };
        let mine = used_by.as_deref() == Some(peer.to_string().as_str());
        if used_at.is_some() {
            drop(tx);
            if mine {
                // A device that joined but lost the answer asks again with the same code.
                return self.joined(request.invite.0.as_slice(), &peer);
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
                    "this invite expired at {}; ask for a new one",
                    rfc3339(expires_at)
                ),
            ));
        }
        let pending: Option<String> = tx
            .query_row(
                "SELECT device FROM join_requests WHERE invite_id = ?1",
                [request.invite.0.as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        match pending {
            Some(d) if d != peer.to_string() => {
                return answer(Response::error(
                    ErrorCode::InviteInvalid,
                    "another device has already asked to join with this invite",
                ));
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO join_requests (invite_id, device, facility, request, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        request.invite.0.as_slice(),
                        peer.to_string(),
                        facility.map(|f| f.to_string()),
                        cbor(&request),
                        unix_ms(now)
                    ],
                )?;
                info!(%peer, invite = %request.invite, %kind, "join request stored");
            }
        }
        // The embedded default: the authority runs beside the relay and approves at once.
        if kind == "facility"
            && let Some(authority) = &self.authority
        {
            let kept = authority.invite(request.invite).map_err(authority_err)?;
            if let Some(kept) = kept {
                match authority.approve(&request, &kept, u64::try_from(unix_ms(now)).unwrap_or(0)) {
                    Ok(approval) => {
                        store::store_approval(&tx, &request, &approval, now)?;
                        tx.commit()?;
                        if let Err(e) = authority.mark_used(request.invite) {
                            warn!(error = %e, "the approval is stored, but the authority's invite file could not be moved");
                        }
                        info!(%peer, facility = %approval.cert.facility, name = %approval.cert.name, "facility approved by the authority");
                        return self.joined(request.invite.0.as_slice(), &peer);
                    }
                    Err(e) => {
                        tx.commit()?;
                        return answer(Response::error(ErrorCode::InviteInvalid, e.to_string()));
                    }
                }
            }
        }
        tx.commit()?;
        let mut notes = Vec::new();
        if let Some(f) = facility {
            notes = facility_devices(&self.store.conn, f)?
                .into_iter()
                .map(|to| Notification {
                    to,
                    request: Request::NotifyJoin,
                })
                .collect();
        }
        answer_with(
            Response::JoinPending {
                expires_at_ms: u64::try_from(expires_at).unwrap_or(0),
            },
            notes,
        )
    }

    fn joined(&self, invite: &[u8], device: &DeviceId) -> HandlerResult {
        let conn = &self.store.conn;
        let row: Option<(FacilityId, Vec<u8>)> = conn
            .query_row(
                "SELECT facility, sealed_pseudonym FROM join_requests
                 WHERE invite_id = ?1 AND device = ?2 AND approved_at IS NOT NULL",
                params![invite, device.to_string()],
                |r| Ok((parse_col(r, 0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((facility, sealed_pseudonym)) = row else {
            return answer(Response::error(
                ErrorCode::InviteInvalid,
                "this invite was already used",
            ));
        };
        let (name, role): (String, String) = conn.query_row(
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
            sealed_pseudonym,
        })
    }

    fn join_requests(&self, caller: Caller, now: SystemTime) -> HandlerResult {
        let mut st = self.store.conn.prepare(
            "SELECT j.request FROM join_requests j JOIN invites i ON i.invite_id = j.invite_id
             WHERE i.kind = 'device' AND i.facility = ?1 AND j.approved_at IS NULL AND i.expires_at > ?2
             ORDER BY j.received_at LIMIT ?3",
        )?;
        let requests = st
            .query_map(
                params![
                    caller.facility.to_string(),
                    unix_ms(now),
                    JOIN_REQUESTS_MAX as i64
                ],
                |r| r.get::<_, Vec<u8>>(0),
            )?
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .map(|b| uncbor(b, "stored join request"))
            .collect::<Result<Vec<JoinRequest>, _>>()?;
        answer(Response::JoinRequests { requests })
    }

    fn get_directory(&self, known_version: u64) -> HandlerResult {
        let version = store::directory_version(&self.store.conn)?;
        // Any other version (also an older one, after a restore from backup) gets the current directory.
        let directory = if version != known_version {
            Some(self.signed_directory()?)
        } else {
            None
        };
        // Where the relay can be reached now (`--advertise` names first): devices add them to the
        // ones their invite gave, so a relay that moves is found without a new invite.
        let relay_addrs = self.store.invite_addrs()?;
        answer(Response::Directory {
            directory,
            relay_addrs,
        })
    }

    fn list_documents(&self, caller: Caller) -> HandlerResult {
        let conn = &self.store.conn;
        let mut st = conn.prepare(
            "SELECT d.id, d.kind, d.epoch, d.ops, d.ops_head FROM documents d JOIN members m ON m.doc = d.id
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
                        r.get::<_, u32>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut docs = Vec::with_capacity(rows.len());
        for (id, kind, epoch, ops, ops_head) in rows {
            let (head, log) = head_log(conn, id)?;
            docs.push(DocumentInfo {
                id,
                kind,
                epoch: Epoch(epoch),
                head,
                ops,
                ops_head: ops_head.try_into().ok(),
                log,
            });
        }
        answer(Response::Documents { docs })
    }

    fn get_ops(&self, caller: Caller, doc: DocumentId, from: u32) -> HandlerResult {
        let conn = &self.store.conn;
        let view = match member_view(conn, caller, doc)? {
            Ok(v) => v,
            Err(r) => return answer(r),
        };
        let mut st = conn.prepare(
            "SELECT encoded FROM ops WHERE doc = ?1 AND idx >= ?2 ORDER BY idx LIMIT ?3",
        )?;
        let mut rows = st.query(params![doc.to_string(), from, OPS_RESPONSE_MAX as i64])?;
        let mut ops = Vec::new();
        let mut total = 0usize;
        while let Some(row) = rows.next()? {
            let encoded: Vec<u8> = row.get(0)?;
            if !ops.is_empty() && total + encoded.len() > KEY_GRANTS_RESPONSE_BYTES_MAX {
                break;
            }
            total += encoded.len();
            ops.push(uncbor::<DocOp>(&encoded, "stored operation")?);
        }
        answer(Response::Ops {
            doc,
            ops,
            total: view.ops,
        })
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
        let quota = self.facility_quota_bytes;
        for item in items {
            let what = item_kind(&item);
            let result = match item {
                PushItem::Invite { registration } => push_invite(&tx, caller, &registration, now)?,
                PushItem::Approve {
                    link,
                    sealed_pseudonym,
                } => push_approve(&tx, caller, &link, &sealed_pseudonym, now)?,
                item => push_item(
                    &tx,
                    Some(caller),
                    &item,
                    now,
                    &mut touched,
                    quota,
                    &mut self.observed.stored_bytes,
                )?,
            };
            match &result {
                PushResult::Accepted { .. } => *self.observed.stored.entry(what).or_default() += 1,
                PushResult::Rejected {
                    code: ErrorCode::QuotaExceeded,
                    ..
                } => self.observed.quota_refusals += 1,
                _ => {}
            }
            results.push(result);
        }
        let started = Instant::now();
        tx.commit()?;
        self.observed.commit = Some(started.elapsed());
        let mut notes = Vec::new();
        for doc in touched {
            notes.extend(notifications(&self.store.conn, doc, caller.device)?);
        }
        answer_with(Response::Pushed { results }, notes)
    }

    /// Takes items from an offline-transfer file (`musubi-node import`), in one transaction.
    ///
    /// Each item is checked as if its author had pushed it: the admission rule at [`Point::Relay`],
    /// signatures verified, nothing decrypted. Returns one result per item and the notifications to
    /// send to connected devices.
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
            let result = match &item {
                PushItem::Invite { .. } | PushItem::Approve { .. } => reject(
                    ErrorCode::Forbidden,
                    "invites and approvals are pushed by their device, not carried in a file",
                ),
                item => push_item(&tx, None, item, now, &mut touched, None, &mut 0)?,
            };
            results.push(result);
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
        if let Err(r) = member_view(conn, caller, doc)? {
            return answer(r);
        }
        let mut st = conn.prepare(
            "SELECT seq, bytes, envelope, log FROM bundles WHERE doc = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
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
                log: to_log(row.get(3)?)?,
            });
        }
        drop(rows);
        let head = head(conn, doc)?;
        let base = log_at(conn, doc, after)?;
        answer(Response::Bundles {
            doc,
            items,
            head,
            base,
        })
    }

    fn key_grants(&self, caller: Caller, doc: DocumentId) -> HandlerResult {
        let conn = &self.store.conn;
        if let Err(r) = member_view(conn, caller, doc)? {
            return answer(r);
        }
        // The grants that name the caller come first, then the rest (which tell a device which
        // devices hold a key already), each newest epoch first; among the caller's, those of the
        // facility that started the epoch (its `Create` or `NewEpoch`), then those of the
        // caller's own facility. Whatever other members pushed, the caller's key of the current
        // epoch from the facility that made it is never left out of the frame.
        let mut starters: BTreeMap<Epoch, FacilityId> = BTreeMap::new();
        {
            let mut st = conn.prepare("SELECT encoded FROM ops WHERE doc = ?1 ORDER BY idx")?;
            let mut rows = st.query([doc.to_string()])?;
            while let Some(row) = rows.next()? {
                let op = uncbor::<DocOp>(&row.get::<_, Vec<u8>>(0)?, "stored operation")?;
                match op.body {
                    DocOpBody::Create { .. } => {
                        starters.insert(Epoch(0), op.facility);
                    }
                    DocOpBody::NewEpoch { epoch, .. } => {
                        starters.insert(epoch, op.facility);
                    }
                    _ => {}
                }
            }
        }
        let rank = |g: &KeyGrant| {
            if starters.get(&g.epoch) == Some(&g.facility) {
                0
            } else if g.facility == caller.facility {
                1
            } else {
                2
            }
        };
        let mut st = conn.prepare(
            "SELECT encoded FROM grants WHERE doc = ?1 ORDER BY epoch DESC, received_at, rowid",
        )?;
        let mut rows = st.query([doc.to_string()])?;
        let (mut mine, mut others) = (Vec::new(), Vec::new());
        // Memory stays bounded whatever is stored: a few frames of the caller's grants per rank
        // (so other members' grants, however many, never crowd out the starter's or the caller's
        // own facility's before they are ranked), one frame of the rest.
        let mut mine_bytes = [0usize; 3];
        let mut others_bytes = 0usize;
        while let Some(row) = rows.next()? {
            if mine_bytes
                .iter()
                .all(|b| *b > 4 * KEY_GRANTS_RESPONSE_BYTES_MAX)
                && others_bytes > KEY_GRANTS_RESPONSE_BYTES_MAX
            {
                break;
            }
            let encoded: Vec<u8> = row.get(0)?;
            let len = encoded.len();
            let grant = uncbor::<KeyGrant>(&encoded, "stored key grant")?;
            if grant.recipients.contains(&caller.device) {
                let r = rank(&grant);
                if mine_bytes[r] <= 4 * KEY_GRANTS_RESPONSE_BYTES_MAX {
                    mine_bytes[r] += len;
                    mine.push((len, grant));
                }
            } else if others_bytes <= KEY_GRANTS_RESPONSE_BYTES_MAX {
                others_bytes += len;
                others.push((len, grant));
            }
        }
        drop(rows);
        mine.sort_by_key(|(_, g)| (std::cmp::Reverse(g.epoch), rank(g)));
        let mut grants = Vec::new();
        let mut total = 0usize;
        let mut left_out = 0usize;
        for (len, grant) in mine.into_iter().chain(others) {
            if total + len > KEY_GRANTS_RESPONSE_BYTES_MAX {
                left_out += 1;
                continue;
            }
            total += len;
            grants.push(grant);
        }
        if left_out > 0 {
            warn!(%doc, grants = grants.len(), left_out, "key grants exceed one frame; some are left out");
        }
        // Oldest first, as devices apply them.
        grants.sort_by_key(|g| g.epoch);
        answer(Response::KeyGrants { doc, grants })
    }

    /// A device's anti-entropy offer (after a rollback): the ids it holds that the relay lacks.
    fn offer(&self, caller: Caller, doc: DocumentId, have: Vec<BundleId>) -> HandlerResult {
        let conn = &self.store.conn;
        if let Err(r) = member_view(conn, caller, doc)? {
            return answer(r);
        }
        if have.len() > OFFER_IDS_MAX {
            return answer(Response::error(
                ErrorCode::TooLarge,
                format!("an offer lists at most {OFFER_IDS_MAX} bundle ids"),
            ));
        }
        let mut st = conn.prepare("SELECT EXISTS (SELECT 1 FROM bundles WHERE bundle_id = ?1)")?;
        let mut want = Vec::new();
        for id in have {
            if !st.query_row([id.0.as_slice()], |r| r.get::<_, bool>(0))? {
                want.push(id);
            }
        }
        answer(Response::Exchange {
            doc,
            items: vec![],
            more: false,
            want,
            ops: vec![],
            grants: vec![],
        })
    }
}

fn authority_err(e: crate::authority::AuthorityError) -> StoreError {
    StoreError::Corrupt(format!("the deployment authority failed: {e}"))
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
            "SELECT d.facility, d.revoked OR d.chain_revoked, f.revoked FROM devices d
             JOIN facilities f ON f.id = d.facility WHERE d.peer_id = ?1",
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

/// Current devices of a facility (to notify).
fn facility_devices(conn: &Connection, facility: FacilityId) -> Result<Vec<DeviceId>, StoreError> {
    let mut st = conn.prepare(
        "SELECT peer_id FROM devices WHERE facility = ?1 AND NOT revoked AND NOT chain_revoked",
    )?;
    let out = st
        .query_map([facility.to_string()], |r| parse_col::<DeviceId>(r, 0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(out)
}

fn load_view(conn: &Connection, doc: DocumentId) -> Result<Option<Membership>, StoreError> {
    let b: Option<Vec<u8>> = conn
        .query_row(
            "SELECT view FROM documents WHERE id = ?1",
            [doc.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    b.map(|b| uncbor(&b, "stored membership")).transpose()
}

/// The document's membership when the caller's facility is a member of it; else the refusal.
fn member_view(
    conn: &Connection,
    caller: Caller,
    doc: DocumentId,
) -> Result<Result<Membership, Response>, StoreError> {
    let Some(view) = load_view(conn, doc)? else {
        return Ok(Err(Response::error(
            ErrorCode::UnknownDocument,
            format!("document {doc} is not known at this relay"),
        )));
    };
    if view.role_of(caller.facility).is_none() {
        return Ok(Err(Response::error(
            ErrorCode::NotMember,
            format!(
                "facility {} is not a member of document {doc}",
                caller.facility
            ),
        )));
    }
    Ok(Ok(view))
}

fn head(conn: &Connection, doc: DocumentId) -> Result<Seq, StoreError> {
    Ok(head_log(conn, doc)?.0)
}

/// A document's newest sequence number and its bundle log there ([`LogHash::ZERO`] at 0).
fn head_log(conn: &Connection, doc: DocumentId) -> Result<(Seq, LogHash), StoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, log FROM bundles WHERE doc = ?1 ORDER BY seq DESC LIMIT 1",
            [doc.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match row {
        None => Ok((Seq(0), LogHash::ZERO)),
        Some((seq, log)) => Ok((Seq(u64::try_from(seq).unwrap_or(0)), to_log(log)?)),
    }
}

/// The bundle log of `doc` at `seq` ([`LogHash::ZERO`] at 0, or where no bundle has that number).
fn log_at(conn: &Connection, doc: DocumentId, seq: Seq) -> Result<LogHash, StoreError> {
    let log: Option<Vec<u8>> = conn
        .query_row(
            "SELECT log FROM bundles WHERE doc = ?1 AND seq = ?2",
            params![doc.to_string(), i64::try_from(seq.0).unwrap_or(i64::MAX)],
            |r| r.get(0),
        )
        .optional()?;
    log.map_or(Ok(LogHash::ZERO), to_log)
}

fn to_log(bytes: Vec<u8>) -> Result<LogHash, StoreError> {
    bytes
        .try_into()
        .map(LogHash)
        .map_err(|_| StoreError::Corrupt("a stored bundle log is not 32 bytes".into()))
}

/// One operation, grant or bundle through the admission rule at [`Point::Relay`]. `caller` is the
/// pushing device (`None` for a file import); a grant or bundle is taken only from a member facility.
/// The `item` label of the pushed-items metric.
fn item_kind(item: &PushItem) -> &'static str {
    match item {
        PushItem::Op { .. } => "op",
        PushItem::Grant { .. } => "grant",
        PushItem::Bundle { .. } => "bundle",
        PushItem::Invite { .. } => "invite",
        PushItem::Approve { .. } => "approve",
    }
}

/// Checks and stores one document item inside the push transaction. `quota`: most bundle bytes
/// the bundle's facility may hold here (`None` for none, and for an operator's import). A stored
/// bundle's bytes are added to `stored_bytes`.
fn push_item(
    conn: &Connection,
    caller: Option<Caller>,
    item: &PushItem,
    now: SystemTime,
    touched: &mut BTreeSet<DocumentId>,
    quota: Option<u64>,
    stored_bytes: &mut u64,
) -> Result<PushResult, StoreError> {
    let Some(doc) = item.doc() else {
        return Ok(reject(ErrorCode::Malformed, "not a document item"));
    };
    // Idempotency first: an item stored before is a duplicate whatever changed since.
    match item {
        PushItem::Op { op } => {
            let seen: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM ops WHERE hash = ?1)",
                [op.hash().as_slice()],
                |r| r.get(0),
            )?;
            if seen {
                return Ok(PushResult::Duplicate {
                    seq: None,
                    log: None,
                });
            }
        }
        PushItem::Grant { grant } => {
            let seen: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM grants WHERE hash = ?1)",
                [grant.hash().as_slice()],
                |r| r.get(0),
            )?;
            if seen {
                return Ok(PushResult::Duplicate {
                    seq: None,
                    log: None,
                });
            }
        }
        PushItem::Bundle { envelope } => {
            let existing: Option<(i64, Vec<u8>)> = conn
                .query_row(
                    "SELECT seq, log FROM bundles WHERE bundle_id = ?1",
                    [envelope.id().0.as_slice()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((seq, log)) = existing {
                return Ok(PushResult::Duplicate {
                    seq: Some(Seq(u64::try_from(seq).unwrap_or(0))),
                    log: Some(to_log(log)?),
                });
            }
        }
        PushItem::Invite { .. } | PushItem::Approve { .. } => {}
    }
    let view = load_view(conn, doc)?;
    if let (Some(c), Some(v), PushItem::Grant { .. } | PushItem::Bundle { .. }) =
        (caller, view.as_ref(), item)
        && v.role_of(c.facility).is_none()
    {
        return Ok(reject(
            ErrorCode::NotMember,
            format!("facility {} is not a member of document {doc}", c.facility),
        ));
    }
    let devices = DbDevices::new(conn);
    let admitted = membership::admit(item, view.as_ref(), &devices, Point::Relay);
    devices.check()?;
    let admitted = match admitted {
        Ok(a) => a,
        Err(r) => return Ok(reject(r.code, r.message)),
    };
    match (item, admitted) {
        (PushItem::Op { op }, membership::Admitted::Op(next)) => {
            conn.execute(
                "INSERT INTO documents (id, kind, view, epoch, ops, ops_head, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET view = excluded.view, epoch = excluded.epoch,
                     ops = excluded.ops, ops_head = excluded.ops_head",
                params![
                    doc.to_string(),
                    next.kind.to_string(),
                    cbor(&*next),
                    next.epoch.0,
                    next.ops,
                    next.head.as_slice(),
                    unix_ms(now)
                ],
            )?;
            let idx = view.as_ref().map_or(0, |v| v.ops);
            conn.execute(
                "INSERT INTO ops (doc, idx, hash, author, encoded, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    doc.to_string(),
                    idx,
                    op.hash().as_slice(),
                    op.author.to_string(),
                    cbor(op),
                    unix_ms(now)
                ],
            )?;
            conn.execute("DELETE FROM members WHERE doc = ?1", [doc.to_string()])?;
            for m in &next.members {
                conn.execute(
                    "INSERT INTO members (doc, facility, role) VALUES (?1, ?2, ?3)",
                    params![doc.to_string(), m.facility.to_string(), m.role.to_string()],
                )?;
            }
            info!(%doc, kind = %next.kind, ops = next.ops, epoch = %next.epoch, members = next.members.len(), "membership operation stored");
            touched.insert(doc);
            Ok(PushResult::Accepted {
                seq: None,
                log: None,
            })
        }
        (PushItem::Grant { grant }, _) => {
            conn.execute(
                "INSERT INTO grants (hash, doc, epoch, author, encoded, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![grant.hash().as_slice(), doc.to_string(), grant.epoch.0, grant.author.to_string(), cbor(grant), unix_ms(now)],
            )?;
            info!(%doc, epoch = %grant.epoch, recipients = grant.recipients.len(), "key grant stored");
            Ok(PushResult::Accepted {
                seq: None,
                log: None,
            })
        }
        (PushItem::Bundle { envelope }, _) => {
            let encoded = envelope.encode();
            let facility = envelope.facility.to_string();
            if let Some(quota) = quota {
                let used = store::facility_bytes(conn, &facility)?;
                if used.saturating_add(encoded.len() as u64) > quota {
                    warn!(%doc, used, quota, bytes = encoded.len(), "a facility's storage quota is used up; bundle refused");
                    return Ok(reject(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "this facility's storage at the relay is full ({used} of {quota} bytes used; this bundle is {} bytes): the device keeps it and sends it again later; ask the relay operator to raise the quota",
                            encoded.len()
                        ),
                    ));
                }
            }
            store::add_facility_bytes(conn, &facility, encoded.len() as u64)?;
            *stored_bytes += encoded.len() as u64;
            let id = BundleId::of_bytes(&encoded);
            let (head, prev) = head_log(conn, doc)?;
            let seq = head.0 + 1;
            let log = prev.next(&id);
            conn.execute(
                "INSERT INTO bundles (doc, seq, bundle_id, envelope, author, facility, epoch, bytes, received_at, log)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    doc.to_string(),
                    i64::try_from(seq).unwrap_or(i64::MAX),
                    id.0.as_slice(),
                    encoded,
                    envelope.author.to_string(),
                    envelope.facility.to_string(),
                    envelope.epoch.0,
                    encoded.len() as i64,
                    unix_ms(now),
                    log.0.as_slice()
                ],
            )?;
            debug!(%doc, seq, bytes = encoded.len(), bundle = %id, "bundle accepted");
            touched.insert(doc);
            Ok(PushResult::Accepted {
                seq: Some(Seq(seq)),
                log: Some(log),
            })
        }
        _ => Ok(reject(ErrorCode::Malformed, "unexpected item")),
    }
}

/// A device registers an invite it issued for another device of its facility.
fn push_invite(
    conn: &Connection,
    caller: Caller,
    reg: &InviteRegistration,
    now: SystemTime,
) -> Result<PushResult, StoreError> {
    if reg.verify().is_err() {
        return Ok(reject(
            ErrorCode::BadSignature,
            "the invite registration's signature does not verify",
        ));
    }
    if reg.author != caller.device || reg.facility != caller.facility {
        return Ok(reject(
            ErrorCode::Forbidden,
            "a device registers invites for its own facility only",
        ));
    }
    let now_ms = unix_ms(now);
    let expires = i64::try_from(reg.expires_at_ms).unwrap_or(i64::MAX);
    if expires <= now_ms || expires > now_ms.saturating_add((INVITE_EXPIRES_SECS_MAX * 1000) as i64)
    {
        return Ok(reject(
            ErrorCode::InviteInvalid,
            "the invite has expired or lasts longer than allowed",
        ));
    }
    let inserted = conn.execute(
        "INSERT OR IGNORE INTO invites (invite_id, kind, facility, registered_by, created_at, expires_at)
         VALUES (?1, 'device', ?2, ?3, ?4, ?5)",
        params![
            reg.invite.0.as_slice(),
            reg.facility.to_string(),
            reg.author.to_string(),
            now_ms,
            expires
        ],
    )?;
    if inserted == 0 {
        return Ok(PushResult::Duplicate {
            seq: None,
            log: None,
        });
    }
    info!(facility = %reg.facility, invite = %reg.invite, "device invite registered");
    Ok(PushResult::Accepted {
        seq: None,
        log: None,
    })
}

/// A current device of a facility appends the next link of its device chain: it approves a pending
/// join request (adds the device) or revokes a device.
fn push_approve(
    conn: &Connection,
    caller: Caller,
    link: &DeviceLink,
    sealed_pseudonym: &[u8],
    now: SystemTime,
) -> Result<PushResult, StoreError> {
    if link.facility != caller.facility || link.signer != caller.device {
        return Ok(reject(
            ErrorCode::Forbidden,
            "a device pushes the links it signed, for its own facility only",
        ));
    }
    let Some((cert, mut links)) = store::facility_chain(conn, link.facility)? else {
        return Ok(reject(
            ErrorCode::Conflict,
            format!("facility {} is not certified here", link.facility),
        ));
    };
    if links.iter().any(|l| l == link) {
        return Ok(PushResult::Duplicate {
            seq: None,
            log: None,
        });
    }
    let before = links.len();
    links.push(link.clone());
    let state = verify_chain(&cert, &links);
    if state.valid as usize != before + 1 {
        let stale = link.seq as usize != before + 1;
        return Ok(reject(
            if stale {
                ErrorCode::Stale
            } else {
                ErrorCode::Forbidden
            },
            state
                .refused
                .unwrap_or_else(|| "the link does not extend the facility's chain".into()),
        ));
    }
    if let DeviceChange::Add { device, .. } = &link.change {
        let enrolled: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE peer_id = ?1)",
            [device.to_string()],
            |r| r.get(0),
        )?;
        if enrolled {
            return Ok(reject(
                ErrorCode::Conflict,
                format!("device {device} is enrolled already"),
            ));
        }
        // The oldest unexpired request of this device for an invite of this facility.
        let waiting: Option<Vec<u8>> = conn
            .query_row(
                "SELECT j.invite_id FROM join_requests j JOIN invites i ON i.invite_id = j.invite_id
                 WHERE j.device = ?1 AND j.facility = ?2 AND j.approved_at IS NULL
                   AND i.kind = 'device' AND i.expires_at > ?3
                 ORDER BY j.received_at LIMIT 1",
                params![device.to_string(), link.facility.to_string(), unix_ms(now)],
                |r| r.get(0),
            )
            .optional()?;
        let Some(invite) = waiting else {
            return Ok(reject(
                ErrorCode::Forbidden,
                format!(
                    "no device {device} is waiting to join this facility with an unexpired invite"
                ),
            ));
        };
        conn.execute(
            "UPDATE join_requests SET approved_at = ?1, sealed_pseudonym = ?2 WHERE invite_id = ?3",
            params![unix_ms(now), sealed_pseudonym, invite],
        )?;
        conn.execute(
            "UPDATE invites SET used_at = ?1, used_by = ?2 WHERE invite_id = ?3",
            params![unix_ms(now), device.to_string(), invite],
        )?;
        info!(facility = %link.facility, %device, by = %link.signer, "device approved");
    } else {
        info!(facility = %link.facility, by = %link.signer, "device revoked by its facility");
    }
    store::insert_link(conn, link, now)?;
    store::bump_directory_version(conn, now)?;
    Ok(PushResult::Accepted {
        seq: None,
        log: None,
    })
}

/// `Notify{doc, head, epoch}` for every current device of every member facility of `doc` except `caller`.
fn notifications(
    conn: &Connection,
    doc: DocumentId,
    caller: DeviceId,
) -> Result<Vec<Notification>, StoreError> {
    let epoch: Option<u32> = conn
        .query_row(
            "SELECT epoch FROM documents WHERE id = ?1",
            [doc.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    let Some(epoch) = epoch else {
        return Ok(vec![]);
    };
    let request = Request::Notify {
        doc,
        head: head(conn, doc)?,
        epoch: Epoch(epoch),
    };
    let mut st = conn.prepare(
        "SELECT d.peer_id FROM members m
         JOIN facilities f ON f.id = m.facility
         JOIN devices d ON d.facility = m.facility
         WHERE m.doc = ?1 AND NOT f.revoked AND NOT d.revoked AND NOT d.chain_revoked",
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
