//! The `/musubi/sync/1` wire messages and their versioned CBOR codec (RFC 8949).
//!
//! Every frame is `{ "v": WIRE_VERSION, "body": Request | Response }`, at most [`FRAME_BYTES_MAX`] bytes;
//! a relay's response frames also carry `"gen"`, its store's [`Generation`], so a device notices when
//! the relay's database was replaced by an older copy.
//! Requests flow both ways: facilities ask the relay; the relay sends [`Request::Notify`] to connected
//! member devices when a document gains a bundle. Errors are answers ([`Response::Error`]), so a
//! malformed or hostile request gets a clear reply and the connection stays usable.

use serde::{Deserialize, Serialize};

use crate::bundle::Envelope;
use crate::directory::{DeviceLink, SignedDirectory};
use crate::ids::{
    BundleId, DeploymentId, DocumentId, DocumentKind, Epoch, FacilityId, FacilityRole, LogHash, Seq,
};
use crate::invite::{InviteRegistration, JoinRequest};
use crate::limits::{ERROR_MESSAGE_BYTES_MAX, FRAME_BYTES_MAX};
use crate::ops::{DocOp, KeyGrant, OpHash};

/// The libp2p protocol name.
pub const PROTOCOL_NAME: &str = "/musubi/sync/1";

/// The frame version this build speaks.
pub const WIRE_VERSION: u16 = 2;

/// A relay store's generation: 16 random bytes made when the store is created, and anew when it is
/// restored from a backup. Every relay response frame carries it.
pub type Generation = [u8; 16];

/// A request (facility → relay, or relay → facility for [`Request::Notify`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum Request {
    /// Asks to join with an invite (the request's device must be the connection's peer). Answered
    /// [`Response::JoinPending`] until the inviter approved, then [`Response::Joined`].
    Join {
        /// The request, with its proof of the invite's secret.
        request: Box<JoinRequest>,
    },
    /// The join requests waiting for approval by the caller's facility (invites its devices issued).
    GetJoinRequests,
    /// The directory, unless the caller already has `known_version` (asked of the relay, and of LAN
    /// peers).
    GetDirectory {
        /// The version the caller holds (0 for none).
        known_version: u64,
    },
    /// A document's operations from position `from` (0-based) on.
    GetOps {
        /// The document.
        doc: DocumentId,
        /// How many the caller already holds.
        from: u32,
    },
    /// The documents the caller's facility is a member of.
    ListDocuments,
    /// Operations, key grants and bundles, applied in order.
    Push {
        /// At most [`crate::limits::PUSH_ITEMS_MAX`] items.
        items: Vec<PushItem>,
    },
    /// Bundles of `doc` with sequence numbers after `after`.
    Pull {
        /// The document.
        doc: DocumentId,
        /// The last sequence number the caller holds.
        after: Seq,
    },
    /// Every key grant of `doc`.
    GetKeyGrants {
        /// The document.
        doc: DocumentId,
    },
    /// What the caller holds of a document (anti-entropy): LAN peer → LAN peer, and a device → the
    /// relay after a rollback (the relay answers with the ids it lacks).
    Offer {
        /// The document.
        doc: DocumentId,
        /// The version of the caller's directory (a LAN peer that knows of a later revocation sends
        /// nothing back but [`ErrorCode::StaleDirectory`] until the caller took its directory).
        directory_version: u64,
        /// Ids of every bundle the caller holds of it (at most [`crate::limits::OFFER_IDS_MAX`]).
        have: Vec<BundleId>,
        /// The document's operations the caller holds (so a peer that never saw it learns its members).
        ops: Vec<DocOp>,
        /// The document's key grants the caller holds (sealed to devices; useless to others).
        grants: Vec<KeyGrant>,
    },
    /// LAN peer → LAN peer: bundles the other side asked for in its [`Response::Exchange`].
    Deliver {
        /// The document.
        doc: DocumentId,
        /// The bundles.
        items: Vec<Envelope>,
    },
    /// Relay → facility: `doc` now has bundles up to `head`, in key epoch `epoch`.
    Notify {
        /// The document.
        doc: DocumentId,
        /// Its newest sequence number.
        head: Seq,
        /// Its current epoch.
        epoch: Epoch,
    },
    /// Relay → facility: a device asked to join the facility with an invite; fetch the requests.
    NotifyJoin,
    /// Relay → facility: the directory changed (an enrolment, an approval, a revocation); fetch it.
    NotifyDirectory {
        /// The directory's new version.
        version: u64,
    },
}

impl Request {
    /// A short name of the request's kind, for logs and messages (`"push"`, `"pull"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Join { .. } => "join",
            Request::GetJoinRequests => "get-join-requests",
            Request::GetDirectory { .. } => "get-directory",
            Request::GetOps { .. } => "get-ops",
            Request::ListDocuments => "list-documents",
            Request::Push { .. } => "push",
            Request::Pull { .. } => "pull",
            Request::GetKeyGrants { .. } => "get-key-grants",
            Request::Notify { .. } => "notify",
            Request::NotifyJoin => "notify-join",
            Request::NotifyDirectory { .. } => "notify-directory",
            Request::Offer { .. } => "offer",
            Request::Deliver { .. } => "deliver",
        }
    }
}

/// One item of a push.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum PushItem {
    /// A membership or epoch operation.
    Op {
        /// The signed operation.
        op: DocOp,
    },
    /// A key grant.
    Grant {
        /// The signed grant.
        grant: KeyGrant,
    },
    /// A bundle.
    Bundle {
        /// The signed envelope.
        envelope: Envelope,
    },
    /// A device registers an invite it issued for another device of its facility.
    Invite {
        /// The signed registration.
        registration: InviteRegistration,
    },
    /// A device approves a join request (or revokes a device of its facility): the next link of the
    /// facility's device chain.
    Approve {
        /// The link.
        link: DeviceLink,
        /// For an added device: the facility's pseudonym keys ([`crate::crypto::PseudonymKeys`]),
        /// age-encrypted to its recipient.
        #[serde(with = "serde_bytes")]
        sealed_pseudonym: Vec<u8>,
    },
}

impl PushItem {
    /// Approximate encoded size in bytes (for batching).
    pub fn approx_bytes(&self) -> usize {
        match self {
            PushItem::Op { .. } | PushItem::Invite { .. } => 512,
            PushItem::Approve {
                sealed_pseudonym, ..
            } => 1024 + sealed_pseudonym.len(),
            PushItem::Grant { grant } => 512 + grant.sealed.len(),
            PushItem::Bundle { envelope } => 256 + envelope.ciphertext.len(),
        }
    }

    /// The document the item belongs to (`None` for invites and approvals).
    pub fn doc(&self) -> Option<DocumentId> {
        match self {
            PushItem::Op { op } => Some(op.doc),
            PushItem::Grant { grant } => Some(grant.doc),
            PushItem::Bundle { envelope } => Some(envelope.doc),
            PushItem::Invite { .. } | PushItem::Approve { .. } => None,
        }
    }
}

/// What the relay did with one pushed item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum PushResult {
    /// Stored durably; bundles get their sequence number.
    Accepted {
        /// The bundle's sequence number (bundles only).
        seq: Option<Seq>,
        /// The document's bundle log at that sequence number (bundles only).
        #[serde(default)]
        log: Option<LogHash>,
    },
    /// Already stored before (idempotent push).
    Duplicate {
        /// The bundle's sequence number (bundles only).
        seq: Option<Seq>,
        /// The document's bundle log at that sequence number (bundles only).
        #[serde(default)]
        log: Option<LogHash>,
    },
    /// Refused for good; pushing it again will be refused again.
    Rejected {
        /// Why.
        code: ErrorCode,
        /// A sentence for people.
        message: String,
    },
}

/// A document as the relay lists it: hints of what to fetch, never a member list (each device
/// replays the document's signed operations itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentInfo {
    /// Document id.
    pub id: DocumentId,
    /// Schema (as its `Create` says).
    pub kind: DocumentKind,
    /// Current key epoch.
    pub epoch: Epoch,
    /// Newest sequence number (0: no bundles yet).
    pub head: Seq,
    /// How many operations its chain has at the relay.
    pub ops: u32,
    /// The hash of the last of them.
    pub ops_head: Option<OpHash>,
    /// The bundle log at `head` ([`LogHash`]).
    pub log: LogHash,
}

/// A bundle with the sequence number the relay gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// The relay's per-document sequence number.
    pub seq: Seq,
    /// The envelope as pushed.
    pub envelope: Envelope,
    /// The document's bundle log at `seq` ([`LogHash`]).
    pub log: LogHash,
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum Response {
    /// The inviter approved: the device is enrolled.
    Joined {
        /// The deployment.
        deployment: DeploymentId,
        /// The facility the device now belongs to.
        facility: FacilityId,
        /// Its name.
        facility_name: String,
        /// Its role.
        role: FacilityRole,
        /// The directory including the new device.
        directory: SignedDirectory,
        /// The pseudonym keys of the facility's role ([`crate::crypto::PseudonymKeys`]: HMAC-SHA256
        /// keys of card ids, one per sector), age-encrypted by the approver to the device's
        /// recipient (the relay cannot read them).
        #[serde(with = "serde_bytes")]
        sealed_pseudonym: Vec<u8>,
    },
    /// The join request is stored and waits for the inviter's approval; ask again later.
    JoinPending {
        /// When the invite expires, milliseconds since the Unix epoch.
        expires_at_ms: u64,
    },
    /// Join requests waiting for the caller's facility.
    JoinRequests {
        /// The requests, oldest first (at most [`crate::limits::JOIN_REQUESTS_MAX`]).
        requests: Vec<JoinRequest>,
    },
    /// A document's operations in chain order.
    Ops {
        /// The document.
        doc: DocumentId,
        /// Operations from the requested position on (at most [`crate::limits::OPS_RESPONSE_MAX`]).
        ops: Vec<DocOp>,
        /// How many the chain has in all.
        total: u32,
    },
    /// The directory, or `None` when the caller's version is current.
    Directory {
        /// The signed directory.
        directory: Option<SignedDirectory>,
        /// The addresses the relay can be reached at now (its `--advertise` addresses, DNS names
        /// first, then its listen addresses), each ending in `/p2p/RELAY`: a hint, not signed (the
        /// relay's peer id is pinned, so a wrong address only fails to connect). Devices add them
        /// to the ones their invite gave, so a relay that moves is found without a new invite.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        relay_addrs: Vec<String>,
    },
    /// The caller's documents.
    Documents {
        /// Documents the caller's facility is a member of.
        docs: Vec<DocumentInfo>,
    },
    /// One result per pushed item, in order.
    Pushed {
        /// Results.
        results: Vec<PushResult>,
    },
    /// Bundles after the requested sequence number, in order.
    Bundles {
        /// The document.
        doc: DocumentId,
        /// Bundles in sequence order.
        items: Vec<Pulled>,
        /// The document's newest sequence number (more remain when it exceeds the last item's).
        head: Seq,
        /// The bundle log at the sequence number the pull asked after ([`LogHash::ZERO`] for 0).
        base: LogHash,
    },
    /// Key grants of a document.
    KeyGrants {
        /// The document.
        doc: DocumentId,
        /// All grants, oldest first.
        grants: Vec<KeyGrant>,
    },
    /// Answer to [`Request::Offer`]: bundles the caller lacks, and ids the answerer wants.
    Exchange {
        /// The document.
        doc: DocumentId,
        /// Bundles the offerer did not list (up to about [`crate::limits::PULL_RESPONSE_BYTES_TARGET`] bytes).
        items: Vec<Envelope>,
        /// Whether more remain (offer again to get them).
        more: bool,
        /// Ids the answerer lacks: send them with [`Request::Deliver`].
        want: Vec<BundleId>,
        /// Operations and grants of the document the offerer did not have.
        ops: Vec<DocOp>,
        /// Key grants of the document the offerer did not have.
        grants: Vec<KeyGrant>,
    },
    /// Acknowledges a [`Request::Notify`].
    Ack,
    /// The request was refused.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// A sentence for people (at most [`ERROR_MESSAGE_BYTES_MAX`] bytes).
        message: String,
    },
}

impl Response {
    /// An error response, its message cut to [`ERROR_MESSAGE_BYTES_MAX`] bytes on a character boundary.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > ERROR_MESSAGE_BYTES_MAX {
            let mut cut = ERROR_MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error { code, message }
    }
}

/// Why a request or item was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The frame is not CBOR of a known message.
    Malformed,
    /// Over a named limit.
    TooLarge,
    /// The frame version is not spoken here.
    UnsupportedVersion,
    /// The peer is not an enrolled device.
    NotEnrolled,
    /// The device or its facility has been revoked.
    Revoked,
    /// The invite is unknown, used or expired.
    InviteInvalid,
    /// The caller's facility is not a member of the document.
    NotMember,
    /// The caller's role does not allow this (e.g. a reader writing, a non-owner sharing).
    Forbidden,
    /// A signature does not verify, or the author is not the connected device.
    BadSignature,
    /// The document is not known to the relay.
    UnknownDocument,
    /// The operation contradicts the document's state (e.g. a document that exists already).
    Conflict,
    /// The item was made against another membership state than the document's current one (an
    /// operation after an older last operation, a bundle in a superseded epoch): fetch the document's
    /// operations, seal or sign it again, and push it again.
    Stale,
    /// (LAN) The caller's directory is older than a revocation the answerer knows: fetch the
    /// answerer's directory first.
    StaleDirectory,
    /// The relay failed to store; retry later.
    Internal,
    /// The relay is slowing this device down (it sent more requests or bytes than the relay's
    /// per-device limit allows); retry after the time the message names.
    RateLimited,
    /// The facility's storage quota at the relay is used up: the item is kept by the device and
    /// pushed again later (the relay operator raises the quota, `musubi-node serve
    /// --quota-bytes-per-facility`).
    QuotaExceeded,
}

impl ErrorCode {
    /// The code as it is spelled on the wire (kebab-case), e.g. `"not-member"`; also the
    /// `outcome` label of the relay's request metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::UnsupportedVersion => "unsupported-version",
            ErrorCode::NotEnrolled => "not-enrolled",
            ErrorCode::Revoked => "revoked",
            ErrorCode::InviteInvalid => "invite-invalid",
            ErrorCode::NotMember => "not-member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadSignature => "bad-signature",
            ErrorCode::UnknownDocument => "unknown-document",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Stale => "stale",
            ErrorCode::StaleDirectory => "stale-directory",
            ErrorCode::Internal => "internal",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::QuotaExceeded => "quota-exceeded",
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::Internal | ErrorCode::RateLimited)
    }

    /// Whether an item refused with this code stands whatever the receiver learns later: a bad
    /// signature, a malformed or oversized item, an author or facility that may not write.
    /// `Stale`, `StaleDirectory` and `UnknownDocument` mean the receiver's view is behind, not
    /// that the item is bad (a pulled bundle refused so is dropped, not quarantined, and taken
    /// when it arrives again).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ErrorCode::BadSignature
                | ErrorCode::Malformed
                | ErrorCode::TooLarge
                | ErrorCode::Forbidden
                | ErrorCode::Revoked
        )
    }
}

/// Errors decoding a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// Over [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// A version other than [`WIRE_VERSION`].
    #[error("unsupported protocol version {0} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion(u16),
    /// Not CBOR of a known message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl CodecError {
    /// The error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::TooLarge(_) => ErrorCode::TooLarge,
            CodecError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            CodecError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

#[derive(Serialize)]
struct FrameOut<'a, T> {
    v: u16,
    body: &'a T,
}

#[derive(Deserialize)]
struct FrameVersion {
    v: u16,
}

#[derive(Serialize)]
struct ResponseFrameOut<'a> {
    v: u16,
    #[serde(
        rename = "gen",
        with = "serde_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    generation: Option<&'a Generation>,
    body: &'a Response,
}

#[derive(Deserialize)]
struct FrameIn<T> {
    #[allow(dead_code)]
    v: u16,
    #[serde(rename = "gen", default, with = "serde_bytes")]
    generation: Option<Generation>,
    body: T,
}

fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(
        &FrameOut {
            v: WIRE_VERSION,
            body,
        },
        &mut out,
    )
    .expect("writing to a Vec cannot fail");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
) -> Result<(Option<Generation>, T), CodecError> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let version: FrameVersion =
        ciborium::from_reader(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if version.v != WIRE_VERSION {
        return Err(CodecError::UnsupportedVersion(version.v));
    }
    let frame: FrameIn<T> =
        ciborium::from_reader(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
    Ok((frame.generation, frame.body))
}

/// Encodes a request frame.
pub fn encode_request(r: &Request) -> Vec<u8> {
    encode(r)
}

/// Decodes a request frame. Errors: [`CodecError`].
pub fn decode_request(bytes: &[u8]) -> Result<Request, CodecError> {
    decode(bytes).map(|(_, r)| r)
}

/// Encodes a response frame without a generation (a LAN peer's answer).
pub fn encode_response(r: &Response) -> Vec<u8> {
    encode(r)
}

/// Encodes a relay's response frame, with its store's generation.
pub fn encode_relay_response(generation: &Generation, r: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(
        &ResponseFrameOut {
            v: WIRE_VERSION,
            generation: Some(generation),
            body: r,
        },
        &mut out,
    )
    .expect("writing to a Vec cannot fail");
    out
}

/// Decodes a response frame. Errors: [`CodecError`].
pub fn decode_response(bytes: &[u8]) -> Result<Response, CodecError> {
    decode(bytes).map(|(_, r)| r)
}

/// Decodes a response frame with the generation it carries (relay frames carry one).
///
/// Errors: [`CodecError`].
pub fn decode_response_frame(bytes: &[u8]) -> Result<(Option<Generation>, Response), CodecError> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The metric label and the wire spelling never drift apart (a dashboard built on one matches
    /// the other).
    #[test]
    fn error_code_names_are_their_wire_names() {
        use ErrorCode::*;
        for c in [
            Malformed,
            TooLarge,
            UnsupportedVersion,
            NotEnrolled,
            Revoked,
            InviteInvalid,
            NotMember,
            Forbidden,
            BadSignature,
            UnknownDocument,
            Conflict,
            Stale,
            StaleDirectory,
            Internal,
            RateLimited,
            QuotaExceeded,
        ] {
            assert_eq!(serde_json::to_value(c).expect("json"), c.as_str(), "{c:?}");
        }
    }

    #[test]
    fn frames_round_trip() {
        let r = Request::Pull {
            doc: DocumentId::from_random_bytes([1; 16]),
            after: Seq(7),
        };
        assert_eq!(decode_request(&encode_request(&r)), Ok(r));
        let g = [7u8; 16];
        let r = Response::Ack;
        assert_eq!(
            decode_response_frame(&encode_relay_response(&g, &r)),
            Ok((Some(g), Response::Ack))
        );
        assert_eq!(
            decode_response_frame(&encode_response(&r)),
            Ok((None, Response::Ack))
        );
        let e = Response::error(ErrorCode::NotMember, "x".repeat(5000));
        match decode_response(&encode_response(&e)) {
            Ok(Response::Error {
                code: ErrorCode::NotMember,
                message,
            }) => {
                assert_eq!(message.len(), ERROR_MESSAGE_BYTES_MAX)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn other_versions_and_garbage_are_clear_errors() {
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &FrameOut {
                v: 1,
                body: &Request::ListDocuments,
            },
            &mut bytes,
        )
        .expect("cbor");
        assert_eq!(
            decode_request(&bytes),
            Err(CodecError::UnsupportedVersion(1)),
            "a build of the first protocol version is told its version is not spoken"
        );
        assert!(matches!(
            decode_request(b"\xa1\x61v"),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(&vec![0u8; FRAME_BYTES_MAX + 1]),
            Err(CodecError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }
    }
}
