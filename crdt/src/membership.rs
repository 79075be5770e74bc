//! Who may do what to a document: the membership view a document's signed operations give, and the
//! one admission rule every party applies to every item (DESIGN "Membership policy", invariant 9).
//!
//! [`Membership`] is what replaying a document's operation chain leaves: kind, members with roles,
//! current epoch, the key commitment of each epoch, and the chain's head. It is built only from
//! signed operations, never from what a relay says.
//!
//! [`admit`] decides "may this item be taken into this document at this point" for an operation, a
//! key grant or a bundle, as a pure function of the item, the document's [`Membership`], who is who
//! ([`Devices`]) and the [`Point`]. The relay calls it on every push and file import; a facility calls
//! it on everything it pulls, and on everything a LAN peer or a file brings.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::bundle::{BundleError, Envelope};
use crate::directory::{DeviceStatus, Devices, FacilityStatus};
use crate::ids::{DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, Role};
use crate::limits::{DOCUMENT_MEMBERS_MAX, DOCUMENT_OPS_MAX, GRANT_RECIPIENTS_MAX};
use crate::ops::{DocOp, DocOpBody, KeyGrant, Member, OpError, OpHash};
use crate::protocol::{ErrorCode, PushItem};

/// A document's membership as its verified operation chain leaves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The document.
    pub id: DocumentId,
    /// Its schema.
    pub kind: DocumentKind,
    /// Current members with roles; the creating facility first.
    pub members: Vec<Member>,
    /// Current key epoch.
    pub epoch: Epoch,
    /// Key commitment of each epoch (index = epoch).
    pub commitments: Vec<[u8; 32]>,
    /// Every member of each epoch (index = epoch) at any time during it, with its highest role then:
    /// what history (bundles the relay accepted earlier) is checked against.
    pub members_by_epoch: Vec<Vec<Member>>,
    /// Devices excluded by an `Exclude` operation, with the epoch current when they were: they may
    /// sign nothing for the document from that point of the chain on.
    #[serde(default)]
    pub excluded: Vec<(DeviceId, Epoch)>,
    /// The hash of the last operation.
    pub head: OpHash,
    /// How many operations the chain has.
    pub ops: u32,
}

impl Membership {
    /// The role of `facility` now.
    pub fn role_of(&self, facility: FacilityId) -> Option<Role> {
        self.members
            .iter()
            .find(|m| m.facility == facility)
            .map(|m| m.role)
    }

    /// The key commitment of `epoch`.
    pub fn commitment(&self, epoch: Epoch) -> Option<[u8; 32]> {
        self.commitments.get(epoch.0 as usize).copied()
    }

    /// The highest role `facility` had at any time during `epoch`.
    pub fn role_during(&self, facility: FacilityId, epoch: Epoch) -> Option<Role> {
        self.members_by_epoch
            .get(epoch.0 as usize)?
            .iter()
            .find(|m| m.facility == facility)
            .map(|m| m.role)
    }

    /// Whether `device` was excluded from the document.
    pub fn is_excluded(&self, device: &DeviceId) -> bool {
        self.excluded.iter().any(|(d, _)| d == device)
    }

    /// The epoch that was current when `device` was excluded (it held keys up to it, no later).
    pub fn excluded_at(&self, device: &DeviceId) -> Option<Epoch> {
        self.excluded
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, e)| *e)
    }

    /// Whether `facility` was ever a member.
    pub fn ever_member(&self, facility: FacilityId) -> bool {
        self.members_by_epoch
            .iter()
            .any(|ms| ms.iter().any(|m| m.facility == facility))
    }

    fn note_member(&mut self, m: Member) {
        let during = self
            .members_by_epoch
            .last_mut()
            .expect("a membership has epoch 0 from its Create");
        match during.iter_mut().find(|x| x.facility == m.facility) {
            Some(x) => x.role = x.role.max(m.role),
            None => during.push(m),
        }
    }
}

/// Where an item is being taken, which decides how strict the rule is about time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// The relay taking a push or a file: the author must be a current device of a facility allowed
    /// now, and a bundle must be in the current epoch (a superseded epoch is refused).
    Relay,
    /// A device taking what the relay served, in the relay's order: history the relay accepted
    /// earlier, so an author certified once (revoked since) and an earlier epoch are taken.
    Pulled,
    /// A device taking what a LAN peer or a file brings: current authors only, epochs up to the
    /// current one.
    Peer,
}

/// Why an item was not admitted: a protocol error code and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The code to answer with.
    pub code: ErrorCode,
    /// What is wrong.
    pub message: String,
}

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        code,
        message: message.into(),
    })
}

/// What admitting an item gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// An operation: the membership after it.
    Op(Box<Membership>),
    /// A grant or a bundle: nothing changes in the membership.
    Item,
}

/// The one admission rule: may `item` be taken into its document, whose membership is `view`
/// (`None`: not known here), by `devices`' account of who is who, at `point`?
///
/// Errors: a [`Refusal`] with the code to answer with.
pub fn admit(
    item: &PushItem,
    view: Option<&Membership>,
    devices: &dyn Devices,
    point: Point,
) -> Result<Admitted, Refusal> {
    match item {
        PushItem::Op { op } => {
            admit_op(op, view, devices, point).map(|m| Admitted::Op(Box::new(m)))
        }
        PushItem::Grant { grant } => {
            let Some(view) = view else {
                return refuse(
                    ErrorCode::UnknownDocument,
                    format!("document {} is not known here", grant.doc),
                );
            };
            admit_grant(grant, view, devices, point).map(|()| Admitted::Item)
        }
        PushItem::Bundle { envelope } => {
            let Some(view) = view else {
                return refuse(
                    ErrorCode::UnknownDocument,
                    format!("document {} is not known here", envelope.doc),
                );
            };
            admit_bundle(envelope, view, devices, point).map(|()| Admitted::Item)
        }
        PushItem::Invite { .. } | PushItem::Approve { .. } => refuse(
            ErrorCode::Malformed,
            "an invite or approval belongs to no document",
        ),
    }
}

/// Checks that `author` may act for `facility` at `point`, and is not excluded from the document.
fn author_ok(
    devices: &dyn Devices,
    view: Option<&Membership>,
    author: &DeviceId,
    facility: FacilityId,
    point: Point,
    what: &str,
) -> Result<(), Refusal> {
    if view.is_some_and(|v| v.is_excluded(author)) {
        return refuse(
            ErrorCode::Revoked,
            format!("the {what} is signed by {author}, a device excluded from this document"),
        );
    }
    match (devices.device_status(author), point) {
        (DeviceStatus::Current(f), _) if f == facility => Ok(()),
        (DeviceStatus::Former(f), Point::Pulled) if f == facility => Ok(()),
        (DeviceStatus::Former(f), _) if f == facility => refuse(
            ErrorCode::Revoked,
            format!("the {what} is signed by {author}, a revoked device"),
        ),
        // Pulled from the relay, by a device this directory does not list yet: it was enrolled
        // after this directory was fetched (a facility that joined a moment ago sending its first
        // letter). Ask for the directory, then for the operations again.
        (DeviceStatus::Unknown, Point::Pulled) => refuse(
            ErrorCode::StaleDirectory,
            format!(
                "the {what} is signed by {author}, which the directory this device holds does not list yet"
            ),
        ),
        _ => refuse(
            ErrorCode::Forbidden,
            format!(
                "the {what} is signed by {author}, which is not a certified device of facility {facility}"
            ),
        ),
    }
}

/// Whether `facility` may be named a member at `point`.
fn facility_ok(devices: &dyn Devices, facility: FacilityId, point: Point) -> Result<(), Refusal> {
    match (devices.facility_status(facility), point) {
        (FacilityStatus::Current(_), _) | (FacilityStatus::Former(_), Point::Pulled) => Ok(()),
        (FacilityStatus::Former(_), _) => refuse(
            ErrorCode::Conflict,
            format!("facility {facility} has been revoked"),
        ),
        (FacilityStatus::Unknown, _) => refuse(
            ErrorCode::Conflict,
            format!("facility {facility} has no certificate from the deployment authority"),
        ),
    }
}

/// Whether `owner` (a facility keeping an audit document) may give `member` the role `role` in
/// it: only a certified shelter gives an HQ facility the reader role (or removes it, `role:
/// None`). Any other member of an audit document is refused. At [`Point::Pulled`] (history the
/// relay accepted) a facility certified once counts, as for shelter rosters: an HQ revoked, or not
/// trusted for a while, since must not make a shelter's log unreadable to its own devices.
fn audit_reader_allowed(
    devices: &dyn Devices,
    point: Point,
    owner: FacilityId,
    member: FacilityId,
    role: Option<Role>,
) -> bool {
    let role_of = |f: FacilityId| match point {
        Point::Pulled => devices.facility_status(f).ever(),
        Point::Relay | Point::Peer => devices.current_facility(f),
    };
    member != owner
        && matches!(role, Some(Role::Reader) | None)
        && role_of(owner) == Some(FacilityRole::Shelter)
        && (role.is_none() || role_of(member) == Some(FacilityRole::Hq))
}

/// Admits an operation: `Create` when the document is not known, else the next link of its chain.
/// Returns the membership after it.
pub fn admit_op(
    op: &DocOp,
    view: Option<&Membership>,
    devices: &dyn Devices,
    point: Point,
) -> Result<Membership, Refusal> {
    if op.verify().is_err() {
        return refuse(
            ErrorCode::BadSignature,
            "the operation's signature does not verify",
        );
    }
    author_ok(devices, view, &op.author, op.facility, point, "operation")?;
    let doc = op.doc;
    let position = view.map_or(0, |v| v.ops);
    if let DeviceStatus::Former(_) = devices.device_status(&op.author)
        && let Some(learned) = devices.revocation_learned(&op.author, doc)
        && position >= learned
    {
        // History the relay serves is taken from a revoked author only up to where this device
        // stood when it learned of the revocation: later, the relay should have refused it.
        return refuse(
            ErrorCode::Revoked,
            format!(
                "operation {position} of document {doc} is signed by {}, a device revoked before this device had seen more than {learned} operation(s)",
                op.author
            ),
        );
    }
    match (&op.body, view) {
        (DocOpBody::Create { .. }, Some(_)) => refuse(
            ErrorCode::Conflict,
            format!("document {doc} already exists"),
        ),
        (
            DocOpBody::Create {
                kind,
                members,
                key_commitment,
                ..
            },
            None,
        ) => {
            if op.prev.is_some() || !op.id_matches() {
                return refuse(
                    ErrorCode::Malformed,
                    "the document id is not the one its Create derives",
                );
            }
            // An audit log is its facility's alone, except that HQ reads a shelter's (who looked
            // at which evacuee): no other facility reads who looked at what.
            if *kind == DocumentKind::Audit
                && let Some(m) = members.iter().find(|m| {
                    !audit_reader_allowed(devices, point, op.facility, m.facility, Some(m.role))
                })
            {
                return refuse(
                    ErrorCode::Forbidden,
                    format!(
                        "facility {} cannot be a {} of an audit document: only HQ reads a shelter's, and no one else reads any",
                        m.facility, m.role
                    ),
                );
            }
            // HQ counts every shelter roster it is a member of (避難者名簿 → 避難所別集計): only a
            // facility the authority certified as a shelter, or an HQ (which may open one for a
            // shelter it runs), opens one, so an enrolled clinic cannot add a made-up shelter to
            // the city's totals.
            if *kind == DocumentKind::Shelter
                && !matches!(
                    devices.facility_status(op.facility).ever(),
                    Some(FacilityRole::Shelter | FacilityRole::Hq)
                )
            {
                return refuse(
                    ErrorCode::Forbidden,
                    format!(
                        "facility {} is certified neither as a shelter nor as an HQ and cannot open a shelter roster",
                        op.facility
                    ),
                );
            }
            if members.len() + 1 > DOCUMENT_MEMBERS_MAX {
                return refuse(
                    ErrorCode::TooLarge,
                    format!(
                        "a document has at most {DOCUMENT_MEMBERS_MAX} members; this one would have {}",
                        members.len() + 1
                    ),
                );
            }
            let mut seen = BTreeSet::from([op.facility]);
            for m in members {
                if !seen.insert(m.facility) {
                    return refuse(
                        ErrorCode::Malformed,
                        format!("facility {} is listed twice", m.facility),
                    );
                }
                facility_ok(devices, m.facility, point)?;
            }
            let all: Vec<Member> = std::iter::once(Member {
                facility: op.facility,
                role: Role::Owner,
            })
            .chain(members.iter().copied())
            .collect();
            Ok(Membership {
                id: doc,
                kind: *kind,
                members: all.clone(),
                epoch: Epoch(0),
                commitments: vec![*key_commitment],
                members_by_epoch: vec![all],
                excluded: Vec::new(),
                head: op.hash(),
                ops: 1,
            })
        }
        (_, None) => refuse(
            ErrorCode::UnknownDocument,
            format!("document {doc} is not known here"),
        ),
        (body, Some(view)) => {
            if op.prev != Some(view.head) {
                return refuse(
                    ErrorCode::Stale,
                    format!(
                        "the operation does not follow the last one of document {doc}; fetch its operations and retry"
                    ),
                );
            }
            if view.ops as usize >= DOCUMENT_OPS_MAX {
                return refuse(
                    ErrorCode::TooLarge,
                    format!("document {doc} has {DOCUMENT_OPS_MAX} operations, the most allowed"),
                );
            }
            let role = view.role_of(op.facility);
            let mut next = view.clone();
            match body {
                DocOpBody::Create { .. } => unreachable!("matched above"),
                DocOpBody::SetMember { facility, role: to } => {
                    if view.kind == DocumentKind::Audit
                        && !audit_reader_allowed(devices, point, op.facility, *facility, *to)
                    {
                        return refuse(
                            ErrorCode::Forbidden,
                            "an audit document is not shared, except a shelter's with HQ as a reader",
                        );
                    }
                    match role {
                        None => {
                            return refuse(
                                ErrorCode::NotMember,
                                format!(
                                    "facility {} is not a member of document {doc}",
                                    op.facility
                                ),
                            );
                        }
                        Some(Role::Owner) => {}
                        Some(r) => {
                            return refuse(
                                ErrorCode::Forbidden,
                                format!(
                                    "only an owner can change members; facility {} is a {r} of this document",
                                    op.facility
                                ),
                            );
                        }
                    }
                    let existing = view.role_of(*facility);
                    let owners = view
                        .members
                        .iter()
                        .filter(|m| m.role == Role::Owner)
                        .count();
                    if existing == Some(Role::Owner) && *to != Some(Role::Owner) && owners <= 1 {
                        return refuse(
                            ErrorCode::Conflict,
                            "this would leave the document without an owner",
                        );
                    }
                    next.members.retain(|m| m.facility != *facility);
                    if let Some(to) = to {
                        facility_ok(devices, *facility, point)?;
                        if existing.is_none() && view.members.len() >= DOCUMENT_MEMBERS_MAX {
                            return refuse(
                                ErrorCode::TooLarge,
                                format!(
                                    "document {doc} already has {DOCUMENT_MEMBERS_MAX} members, the most allowed"
                                ),
                            );
                        }
                        let m = Member {
                            facility: *facility,
                            role: *to,
                        };
                        next.members.push(m);
                        next.note_member(m);
                    }
                }
                DocOpBody::Exclude { devices: excluded } => {
                    if !role.is_some_and(Role::can_write) {
                        return refuse(
                            ErrorCode::Forbidden,
                            format!(
                                "only a writer or owner can exclude devices; facility {} is not one",
                                op.facility
                            ),
                        );
                    }
                    if excluded.is_empty() || excluded.len() > GRANT_RECIPIENTS_MAX {
                        return refuse(
                            ErrorCode::Malformed,
                            "an exclusion names 1 to the most recipients of a grant",
                        );
                    }
                    for d in excluded {
                        // A device still current in a member facility may not be excluded (that
                        // would only deny it service), at any point: revocations are never taken
                        // back, so one that was revoked when the exclusion was signed is not
                        // current now; a device that has not learned of it yet takes the exclusion
                        // once it has.
                        let current_member = matches!(
                            devices.device_status(d),
                            DeviceStatus::Current(f) if view.role_of(f).is_some()
                        );
                        if current_member {
                            // On pull this device may not have learned of the revocation yet.
                            let code = if point == Point::Pulled {
                                ErrorCode::StaleDirectory
                            } else {
                                ErrorCode::Forbidden
                            };
                            return refuse(
                                code,
                                format!("{d} is a current device of a member facility"),
                            );
                        }
                        if !next.is_excluded(d) {
                            next.excluded.push((*d, view.epoch));
                        }
                    }
                }
                DocOpBody::NewEpoch {
                    epoch,
                    key_commitment,
                } => {
                    if !role.is_some_and(Role::can_write) {
                        return refuse(
                            ErrorCode::Forbidden,
                            format!(
                                "only a writer or owner can start a new key epoch; facility {} is not one",
                                op.facility
                            ),
                        );
                    }
                    if view.epoch.0.checked_add(1) != Some(epoch.0) {
                        return refuse(
                            ErrorCode::Stale,
                            format!(
                                "epoch {epoch} is not the next epoch of document {doc} (its current epoch is {})",
                                view.epoch
                            ),
                        );
                    }
                    next.epoch = *epoch;
                    next.commitments.push(*key_commitment);
                    next.members_by_epoch.push(next.members.clone());
                }
            }
            next.head = op.hash();
            next.ops += 1;
            Ok(next)
        }
    }
}

/// Admits a key grant: signed by a device of a member facility, for an epoch the chain has, sealed
/// only to devices of member facilities. (Whether the sealed key matches the epoch's commitment only
/// a recipient can tell, when it opens the grant.)
pub fn admit_grant(
    grant: &KeyGrant,
    view: &Membership,
    devices: &dyn Devices,
    point: Point,
) -> Result<(), Refusal> {
    match grant.verify() {
        Ok(()) => {}
        Err(OpError::TooMany { what, n, max }) => {
            return refuse(
                ErrorCode::TooLarge,
                format!("a key grant names {n} {what}, over the limit of {max}"),
            );
        }
        Err(_) => {
            return refuse(
                ErrorCode::BadSignature,
                "the key grant's signature does not verify",
            );
        }
    }
    if grant.doc != view.id {
        return refuse(
            ErrorCode::Malformed,
            "the key grant is for another document",
        );
    }
    // A device excluded while epoch E was current held keys up to E: a grant of such a key, by it
    // or to it, is history; a grant of any later key is refused.
    let later = |d: &DeviceId| view.excluded_at(d).is_some_and(|e| grant.epoch > e);
    if later(&grant.author) {
        return refuse(
            ErrorCode::Revoked,
            format!(
                "the key grant is signed by {}, a device excluded from this document",
                grant.author
            ),
        );
    }
    author_ok(
        devices,
        None,
        &grant.author,
        grant.facility,
        point,
        "key grant",
    )?;
    let member = match point {
        Point::Pulled => view.ever_member(grant.facility),
        Point::Relay | Point::Peer => view.role_of(grant.facility).is_some(),
    };
    if !member {
        return refuse(
            ErrorCode::NotMember,
            format!(
                "facility {} is not a member of document {}",
                grant.facility, view.id
            ),
        );
    }
    if grant.epoch > view.epoch {
        return refuse(
            ErrorCode::Stale,
            format!(
                "the key grant is for epoch {} but document {} is at epoch {}",
                grant.epoch, view.id, view.epoch
            ),
        );
    }
    if view.commitment(grant.epoch) != Some(grant.key_commitment) {
        return refuse(
            ErrorCode::Stale,
            format!(
                "the key grant is for another key than the one document {} commits to for epoch {}",
                view.id, grant.epoch
            ),
        );
    }
    if grant.recipients.is_empty() {
        return refuse(ErrorCode::Malformed, "the key grant names no recipients");
    }
    for r in &grant.recipients {
        if later(r) {
            return refuse(
                ErrorCode::Forbidden,
                format!("recipient {r} is excluded from document {}", view.id),
            );
        }
        // A known recipient must be a current device of a member facility at the relay; a device
        // taking a grant from the relay's history or from a peer also takes one that names a
        // device revoked since (it was made before; a device excluded from the document is refused
        // above for later keys). A device this party does not know at all is let through, the
        // relay included: it may have been enrolled in a history this party has not seen (a relay
        // restored from a backup forgets devices enrolled since), and refusing would withhold the
        // key from every other recipient; only the author chose to seal to it, and the unknown
        // device fetches nothing until it is enrolled.
        let ok = match (devices.device_status(r), point) {
            (DeviceStatus::Unknown, _) => true,
            (DeviceStatus::Current(f), Point::Relay) => view.role_of(f).is_some(),
            (DeviceStatus::Current(f) | DeviceStatus::Former(f), Point::Pulled | Point::Peer) => {
                view.ever_member(f)
            }
            _ => false,
        };
        if !ok {
            return refuse(
                ErrorCode::Forbidden,
                format!(
                    "recipient {r} is not a current device of a member facility of document {}",
                    view.id
                ),
            );
        }
    }
    Ok(())
}

/// Admits a bundle: signed by a device of a writer facility, in an epoch allowed at `point`.
pub fn admit_bundle(
    envelope: &Envelope,
    view: &Membership,
    devices: &dyn Devices,
    point: Point,
) -> Result<(), Refusal> {
    match envelope.check() {
        Ok(()) => {}
        Err(e @ BundleError::TooLarge { .. }) => return refuse(ErrorCode::TooLarge, e.to_string()),
        Err(e) => return refuse(ErrorCode::Malformed, e.to_string()),
    }
    if envelope.verify_signature().is_err() {
        return refuse(
            ErrorCode::BadSignature,
            "the bundle's signature does not verify",
        );
    }
    if envelope.doc != view.id {
        return refuse(ErrorCode::Malformed, "the bundle is for another document");
    }
    // An excluded device's bundles from before its exclusion are history (a device pulling the
    // relay's order takes them); at the relay and from peers it is not current anyway.
    let history = point == Point::Pulled;
    author_ok(
        devices,
        if history { None } else { Some(view) },
        &envelope.author,
        envelope.facility,
        point,
        "bundle",
    )?;
    // An epoch this device does not know yet is not a refusal of its author: the operations that
    // start it have not arrived here.
    if envelope.epoch > view.epoch {
        return refuse(
            ErrorCode::Stale,
            format!(
                "the bundle is in epoch {} but document {} is at epoch {}",
                envelope.epoch, view.id, view.epoch
            ),
        );
    }
    let role = match point {
        Point::Pulled => view.role_during(envelope.facility, envelope.epoch),
        Point::Relay | Point::Peer => view.role_of(envelope.facility),
    };
    match role {
        None => {
            return refuse(
                ErrorCode::Forbidden,
                format!(
                    "facility {} is not a member of this document",
                    envelope.facility
                ),
            );
        }
        Some(r) if !r.can_write() => {
            return refuse(
                ErrorCode::Forbidden,
                format!(
                    "facility {} is a reader of this document",
                    envelope.facility
                ),
            );
        }
        Some(_) => {}
    }
    if view.commitment(envelope.epoch) != Some(envelope.key_commitment) {
        return refuse(
            ErrorCode::Stale,
            format!(
                "the bundle is sealed with another key than the one document {} commits to for epoch {}; seal it again",
                view.id, envelope.epoch
            ),
        );
    }
    if point == Point::Relay && envelope.epoch < view.epoch {
        return refuse(
            ErrorCode::Stale,
            format!(
                "the bundle is sealed in epoch {}, superseded by epoch {} of document {}; seal it again with the current key",
                envelope.epoch, view.epoch, view.id
            ),
        );
    }
    Ok(())
}

/// What replaying a chain gives.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// The membership after the valid prefix (`None` when even the `Create` is refused).
    pub view: Option<Membership>,
    /// How many operations were valid.
    pub valid: usize,
    /// Why the first invalid one was refused.
    pub refused: Option<Refusal>,
}

/// Replays a chain from its `Create`, stopping at the first operation that is not admitted.
pub fn replay(ops: &[DocOp], devices: &dyn Devices, point: Point) -> Replay {
    let mut out = Replay::default();
    for op in ops {
        match admit_op(op, out.view.as_ref(), devices, point) {
            Ok(v) => {
                out.view = Some(v);
                out.valid += 1;
            }
            Err(e) => {
                out.refused = Some(e);
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bundle::Payload;
    use crate::crypto::{DeviceSecrets, DocumentKey};
    use crate::ids::{DeviceId, FacilityRole};

    #[derive(Default)]
    struct Who {
        devices: BTreeMap<DeviceId, DeviceStatus>,
        facilities: BTreeMap<FacilityId, FacilityStatus>,
    }

    impl Devices for Who {
        fn device_status(&self, d: &DeviceId) -> DeviceStatus {
            self.devices
                .get(d)
                .copied()
                .unwrap_or(DeviceStatus::Unknown)
        }
        fn facility_status(&self, f: FacilityId) -> FacilityStatus {
            self.facilities
                .get(&f)
                .copied()
                .unwrap_or(FacilityStatus::Unknown)
        }
    }

    struct Party {
        facility: FacilityId,
        device: DeviceSecrets,
    }

    fn party(who: &mut Who, n: u8) -> Party {
        let p = Party {
            facility: FacilityId::from_random_bytes([n; 16]),
            device: DeviceSecrets::from_seeds([n; 32], [n + 50; 32]),
        };
        who.devices
            .insert(p.device.device_id(), DeviceStatus::Current(p.facility));
        who.facilities
            .insert(p.facility, FacilityStatus::Current(FacilityRole::Clinic));
        p
    }

    fn create(owner: &Party, members: Vec<Member>, key: &DocumentKey) -> DocOp {
        DocOp::create(
            &owner.device,
            owner.facility,
            1,
            DocOpBody::Create {
                kind: DocumentKind::Referral,
                members,
                key_commitment: key.commitment(),
                nonce: [1; 16],
            },
        )
        .expect("create")
    }

    fn next(by: &Party, view: &Membership, body: DocOpBody) -> DocOp {
        DocOp::sign(&by.device, by.facility, view.id, 2, Some(view.head), body).expect("sign")
    }

    #[test]
    fn a_non_member_cannot_add_itself_or_rotate() {
        let mut who = Who::default();
        let (a, b, x) = (party(&mut who, 1), party(&mut who, 2), party(&mut who, 3));
        let key = DocumentKey::from_seed([9; 32]);
        let c = create(
            &a,
            vec![Member {
                facility: b.facility,
                role: Role::Writer,
            }],
            &key,
        );
        let view = admit_op(&c, None, &who, Point::Relay).expect("create");
        for body in [
            DocOpBody::SetMember {
                facility: x.facility,
                role: Some(Role::Owner),
            },
            DocOpBody::NewEpoch {
                epoch: Epoch(1),
                key_commitment: [0; 32],
            },
        ] {
            let op = next(&x, &view, body);
            let e = admit_op(&op, Some(&view), &who, Point::Peer).expect_err("refused");
            assert!(
                matches!(e.code, ErrorCode::NotMember | ErrorCode::Forbidden),
                "{e:?}"
            );
        }
        // A writer may rotate, but not share.
        let rot = next(
            &b,
            &view,
            DocOpBody::NewEpoch {
                epoch: Epoch(1),
                key_commitment: [2; 32],
            },
        );
        let after = admit_op(&rot, Some(&view), &who, Point::Relay).expect("writer rotates");
        assert_eq!(after.epoch, Epoch(1));
        let share = next(
            &b,
            &after,
            DocOpBody::SetMember {
                facility: x.facility,
                role: Some(Role::Reader),
            },
        );
        assert_eq!(
            admit_op(&share, Some(&after), &who, Point::Relay)
                .expect_err("refused")
                .code,
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn only_hq_reads_an_audit_document_and_only_a_shelters_at_any_point() {
        let mut who = Who::default();
        let (clinic, hq, centre) = (party(&mut who, 1), party(&mut who, 2), party(&mut who, 3));
        who.facilities
            .insert(hq.facility, FacilityStatus::Current(FacilityRole::Hq));
        who.facilities.insert(
            centre.facility,
            FacilityStatus::Current(FacilityRole::Shelter),
        );
        let key = DocumentKey::from_seed([9; 32]);
        let audit = |by: &Party, members: Vec<Member>| {
            DocOp::create(
                &by.device,
                by.facility,
                1,
                DocOpBody::Create {
                    kind: DocumentKind::Audit,
                    members,
                    key_commitment: key.commitment(),
                    nonce: [1; 16],
                },
            )
            .expect("create")
        };
        let member = |p: &Party, role| Member {
            facility: p.facility,
            role,
        };
        let points = [Point::Relay, Point::Peer, Point::Pulled];
        // A clinic's log: HQ may not read it. A shelter's: HQ may read it, not write it, and no
        // clinic reads it.
        for refused in [
            audit(&clinic, vec![member(&hq, Role::Reader)]),
            audit(&centre, vec![member(&hq, Role::Writer)]),
            audit(&centre, vec![member(&clinic, Role::Reader)]),
        ] {
            for point in points {
                assert_eq!(
                    admit_op(&refused, None, &who, point)
                        .expect_err("an audit document with a member it may not have")
                        .code,
                    ErrorCode::Forbidden
                );
            }
        }
        let shelter_log = admit_op(
            &audit(&centre, vec![member(&hq, Role::Reader)]),
            None,
            &who,
            Point::Relay,
        )
        .expect("HQ reads a shelter's log");
        assert_eq!(shelter_log.role_of(hq.facility), Some(Role::Reader));
        // The HQ revoked (or not trusted for a while) later: the shelter's devices still follow
        // the history the relay accepted, and a new device can still read the log.
        let mut later = Who {
            devices: who.devices.clone(),
            facilities: who.facilities.clone(),
        };
        later
            .facilities
            .insert(hq.facility, FacilityStatus::Former(FacilityRole::Hq));
        let create = audit(&centre, vec![member(&hq, Role::Reader)]);
        admit_op(&create, None, &later, Point::Pulled).expect("history stays readable");
        assert_eq!(
            admit_op(&create, None, &later, Point::Relay)
                .expect_err("a revoked HQ is not added now")
                .code,
            ErrorCode::Forbidden
        );
        // Shared later: a clinic's never; a shelter's with a clinic never.
        let clinic_log =
            admit_op(&audit(&clinic, vec![]), None, &who, Point::Relay).expect("its own");
        for (by, view, to) in [
            (&clinic, &clinic_log, &hq),
            (&centre, &shelter_log, &clinic),
        ] {
            let share = next(
                by,
                view,
                DocOpBody::SetMember {
                    facility: to.facility,
                    role: Some(Role::Reader),
                },
            );
            for point in points {
                assert_eq!(
                    admit_op(&share, Some(view), &who, point)
                        .expect_err("an audit document shared later")
                        .code,
                    ErrorCode::Forbidden
                );
            }
        }
    }

    #[test]
    fn only_a_certified_shelter_or_hq_opens_a_shelter_roster_at_every_point() {
        let mut who = Who::default();
        let (clinic, centre, hq) = (party(&mut who, 1), party(&mut who, 2), party(&mut who, 3));
        who.facilities.insert(
            centre.facility,
            FacilityStatus::Current(FacilityRole::Shelter),
        );
        who.facilities
            .insert(hq.facility, FacilityStatus::Current(FacilityRole::Hq));
        let key = DocumentKey::from_seed([9; 32]);
        let roster = |by: &Party| {
            DocOp::create(
                &by.device,
                by.facility,
                1,
                DocOpBody::Create {
                    kind: DocumentKind::Shelter,
                    members: vec![Member {
                        facility: hq.facility,
                        role: Role::Writer,
                    }]
                    .into_iter()
                    .filter(|m| m.facility != by.facility)
                    .collect(),
                    key_commitment: key.commitment(),
                    nonce: [1; 16],
                },
            )
            .expect("create")
        };
        for point in [Point::Relay, Point::Pulled, Point::Peer] {
            let e = admit_op(&roster(&clinic), None, &who, point).expect_err("a clinic's roster");
            assert_eq!(e.code, ErrorCode::Forbidden, "{point:?}: {e:?}");
            assert!(e.message.contains("shelter"), "{}", e.message);
            for by in [&centre, &hq] {
                let view = admit_op(&roster(by), None, &who, point).expect("a roster");
                assert_eq!(view.kind, DocumentKind::Shelter);
            }
        }
    }

    #[test]
    fn a_second_create_of_a_known_document_or_with_a_borrowed_id_is_refused() {
        let mut who = Who::default();
        let (a, x) = (party(&mut who, 1), party(&mut who, 3));
        let key = DocumentKey::from_seed([9; 32]);
        let c = create(&a, vec![], &key);
        let view = admit_op(&c, None, &who, Point::Relay).expect("create");
        let mut forged = create(
            &x,
            vec![Member {
                facility: x.facility,
                role: Role::Owner,
            }],
            &key,
        );
        assert_eq!(
            admit_op(&forged, Some(&view), &who, Point::Peer)
                .expect_err("exists")
                .code,
            ErrorCode::Conflict
        );
        // The same id on a device that never saw the real Create.
        forged.doc = c.doc;
        forged.signature = x
            .device
            .sign(crate::crypto::domain::DOC_OP, &forged.signed_bytes());
        assert_eq!(
            admit_op(&forged, None, &who, Point::Peer)
                .expect_err("id not derived")
                .code,
            ErrorCode::Malformed
        );
    }

    #[test]
    fn superseded_epochs_are_refused_at_the_relay_and_history_is_kept_on_pull() {
        let mut who = Who::default();
        let (a, b) = (party(&mut who, 1), party(&mut who, 2));
        let k0 = DocumentKey::from_seed([9; 32]);
        let c = create(
            &a,
            vec![Member {
                facility: b.facility,
                role: Role::Writer,
            }],
            &k0,
        );
        let v0 = admit_op(&c, None, &who, Point::Relay).expect("create");
        let old = Envelope::seal(
            &b.device,
            b.facility,
            c.doc,
            Epoch(0),
            &k0,
            &Payload::Changes { data: vec![1] },
        )
        .expect("seal");
        assert!(admit_bundle(&old, &v0, &who, Point::Relay).is_ok());
        // b is removed and the key rotated; b's device is then revoked.
        let rm = next(
            &a,
            &v0,
            DocOpBody::SetMember {
                facility: b.facility,
                role: None,
            },
        );
        let v1 = admit_op(&rm, Some(&v0), &who, Point::Relay).expect("remove");
        let rot = next(
            &a,
            &v1,
            DocOpBody::NewEpoch {
                epoch: Epoch(1),
                key_commitment: [3; 32],
            },
        );
        let v2 = admit_op(&rot, Some(&v1), &who, Point::Relay).expect("rotate");
        who.devices
            .insert(b.device.device_id(), DeviceStatus::Former(b.facility));
        let stale = admit_bundle(&old, &v2, &who, Point::Relay).expect_err("stale");
        assert!(matches!(
            stale.code,
            ErrorCode::Revoked | ErrorCode::Forbidden | ErrorCode::Stale
        ));
        assert!(
            admit_bundle(&old, &v2, &who, Point::Pulled).is_ok(),
            "what the relay accepted before is history"
        );
        assert!(admit_bundle(&old, &v2, &who, Point::Peer).is_err());
        // A replay of the whole chain gives the same membership at a device that joins later.
        let r = replay(&[c, rm, rot], &who, Point::Pulled);
        assert_eq!(r.valid, 3);
        assert_eq!(r.view.as_ref(), Some(&v2));
    }

    /// A writer excludes a revoked laptop; nothing the laptop signs after that point is taken by
    /// anyone, while a reader cannot exclude, and nobody can exclude a current device of a member
    /// (that would only deny it service).
    #[test]
    fn an_exclusion_names_revoked_devices_only_and_shuts_them_out_from_that_point() {
        let mut who = Who::default();
        let (a, b, r) = (party(&mut who, 1), party(&mut who, 2), party(&mut who, 4));
        let laptop = DeviceSecrets::from_seeds([7; 32], [57; 32]);
        who.devices
            .insert(laptop.device_id(), DeviceStatus::Current(b.facility));
        let k0 = DocumentKey::from_seed([9; 32]);
        let c = create(
            &a,
            vec![
                Member {
                    facility: b.facility,
                    role: Role::Writer,
                },
                Member {
                    facility: r.facility,
                    role: Role::Reader,
                },
            ],
            &k0,
        );
        let v0 = admit_op(&c, None, &who, Point::Relay).expect("create");
        let exclude = |by: &Party, view: &Membership| {
            next(
                by,
                view,
                DocOpBody::Exclude {
                    devices: vec![laptop.device_id()],
                },
            )
        };
        assert_eq!(
            admit_op(&exclude(&a, &v0), Some(&v0), &who, Point::Relay)
                .expect_err("a current device")
                .code,
            ErrorCode::Forbidden
        );
        who.devices
            .insert(laptop.device_id(), DeviceStatus::Former(b.facility));
        assert_eq!(
            admit_op(&exclude(&r, &v0), Some(&v0), &who, Point::Relay)
                .expect_err("a reader")
                .code,
            ErrorCode::Forbidden
        );
        let v1 = admit_op(&exclude(&b, &v0), Some(&v0), &who, Point::Peer).expect("a writer");
        assert!(v1.is_excluded(&laptop.device_id()));
        // A bundle the laptop signs in the epoch it still knows is refused by the relay and from
        // peers; served by a relay, it cannot be told from one signed before (history, kept).
        let late = Envelope::seal(
            &laptop,
            b.facility,
            c.doc,
            Epoch(0),
            &k0,
            &Payload::Changes { data: vec![1] },
        )
        .expect("seal");
        for point in [Point::Relay, Point::Peer] {
            assert!(
                admit_bundle(&late, &v1, &who, point).is_err(),
                "taken at {point:?}"
            );
        }
        assert!(admit_bundle(&late, &v1, &who, Point::Pulled).is_ok());
        // An operation it signs after the exclusion has a place in the chain: refused everywhere.
        let lp = Party {
            facility: b.facility,
            device: laptop.clone(),
        };
        let rot = next(
            &lp,
            &v1,
            DocOpBody::NewEpoch {
                epoch: Epoch(1),
                key_commitment: [3; 32],
            },
        );
        for point in [Point::Relay, Point::Pulled, Point::Peer] {
            assert!(
                admit_op(&rot, Some(&v1), &who, point).is_err(),
                "taken at {point:?}"
            );
        }
    }

    #[test]
    fn a_grant_from_a_non_member_or_to_a_non_member_is_refused() {
        let mut who = Who::default();
        let (a, x) = (party(&mut who, 1), party(&mut who, 3));
        let key = DocumentKey::from_seed([9; 32]);
        let c = create(&a, vec![], &key);
        let view = admit_op(&c, None, &who, Point::Relay).expect("create");
        let rec = |p: &Party| (p.device.device_id(), p.device.public().age_recipient);
        let planted =
            KeyGrant::seal(&x.device, x.facility, c.doc, Epoch(0), &key, &[rec(&a)]).expect("seal");
        assert_eq!(
            admit_grant(&planted, &view, &who, Point::Pulled)
                .expect_err("non-member author")
                .code,
            ErrorCode::NotMember
        );
        let leak =
            KeyGrant::seal(&a.device, a.facility, c.doc, Epoch(0), &key, &[rec(&x)]).expect("seal");
        assert_eq!(
            admit_grant(&leak, &view, &who, Point::Relay)
                .expect_err("non-member recipient")
                .code,
            ErrorCode::Forbidden
        );
        let ok =
            KeyGrant::seal(&a.device, a.facility, c.doc, Epoch(0), &key, &[rec(&a)]).expect("seal");
        assert!(admit_grant(&ok, &view, &who, Point::Relay).is_ok());
    }
}
