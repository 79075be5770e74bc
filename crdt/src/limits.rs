//! Named maxima (DESIGN invariant 8). Units are the last word of each name.
//!
//! Exceeding any of these is a clear error at the place that checks it, never a crash.

/// Largest plaintext of one attachment (添付) carried in its own bundle, in bytes (8 MiB).
pub const ATTACHMENT_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Largest encoded bundle envelope (ciphertext plus header and signature), in bytes.
///
/// Leaves room for an attachment of [`ATTACHMENT_BYTES_MAX`] plus age and CBOR overhead.
pub const BUNDLE_BYTES_MAX: usize = ATTACHMENT_BYTES_MAX + 64 * 1024;

/// Largest plaintext of the changes in one bundle, in bytes (4 MiB); larger edits are split.
pub const BUNDLE_CHANGES_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most bytes the changes of one bundle may inflate to when compressed chunks are decoded (16 MiB,
/// four times [`BUNDLE_CHANGES_BYTES_MAX`]): a DEFLATE bomb is refused here (see
/// [`crate::changes::decode_changes`]) instead of costing gigabytes at every member.
pub const CHANGES_INFLATED_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Most Automerge operations in the changes of one bundle (2^20). Automerge keeps each applied
/// operation in memory; a run-length-encoded column can name millions in a few bytes.
pub const CHANGES_OPS_MAX: usize = 1 << 20;

/// Most inflated change bytes one load of a document applies on top of its snapshot (256 MiB);
/// bundles past it are quarantined. Each bundle is bounded by [`CHANGES_INFLATED_BYTES_MAX`], but
/// a writer could push thousands; the forms this project holds are a few MiB after years of use.
pub const LOAD_CHANGES_INFLATED_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Largest `/musubi/sync/1` frame (one request or one response), in bytes.
pub const FRAME_BYTES_MAX: usize = BUNDLE_BYTES_MAX + 1024 * 1024;

/// Most items in one push request.
pub const PUSH_ITEMS_MAX: usize = 256;

/// Target size of a pull response, in bytes; a single larger bundle is still sent alone.
pub const PULL_RESPONSE_BYTES_TARGET: usize = 2 * 1024 * 1024;

/// Most bundles in one pull response.
pub const PULL_BUNDLES_MAX: usize = 1024;

/// Most members of one document.
pub const DOCUMENT_MEMBERS_MAX: usize = 256;

/// Most devices named in one key grant.
pub const GRANT_RECIPIENTS_MAX: usize = 1024;

/// Largest sealed key of a grant, in bytes, is this plus [`GRANT_SEALED_BYTES_PER_RECIPIENT`] per
/// recipient: an age file (age-encryption.org/v1) of a 32-byte key has a 22-byte version line, a
/// 48-byte MAC line, a 64-byte payload, about 98 bytes per X25519 stanza and one random "grease"
/// stanza of up to a few hundred bytes (measured: 309 bytes for 1 recipient, 580 for 4, 100 662
/// for 1024). A grant padded with more would only crowd the other grants out of a `KeyGrants`
/// response.
pub const GRANT_SEALED_BYTES_BASE: usize = 1024;

/// See [`GRANT_SEALED_BYTES_BASE`].
pub const GRANT_SEALED_BYTES_PER_RECIPIENT: usize = 128;

/// Longest facility name, in bytes (UTF-8).
pub const FACILITY_NAME_BYTES_MAX: usize = 200;

/// Most facilities in a deployment's directory.
pub const DIRECTORY_FACILITIES_MAX: usize = 10_000;

/// Most documents listed in one `Documents` response.
pub const DOCUMENT_LIST_MAX: usize = 100_000;

/// Longest error message carried in a response, in bytes.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// Most connections a relay keeps with devices at once (a prefecture's devices, each with one
/// connection, and headroom); more are refused while the handshake is still cheap.
pub const RELAY_CONNECTIONS_INCOMING_MAX: u32 = 8192;

/// Most connections a facility device accepts from LAN peers at once.
pub const FACILITY_CONNECTIONS_INCOMING_MAX: u32 = 64;

/// Most incoming connections still in their handshake at once, at a relay or a facility.
pub const CONNECTIONS_PENDING_INCOMING_MAX: u32 = 256;

/// Most connections one peer (one device key) may hold with a node at once (a reconnect may overlap
/// the connection it replaces, over TCP and QUIC).
pub const CONNECTIONS_PER_PEER_MAX: u32 = 4;

/// Largest frame the relay reads from a peer that is not a current enrolled device, in bytes: such a
/// key can only join (a join request is under 2 KiB), and keys cost nothing to make.
pub const UNKNOWN_PEER_FRAME_BYTES_MAX: usize = 16 * 1024;

/// Most frames of peers that are not current enrolled devices the relay reads at once, over all
/// connections (so strangers' frames being read hold at most this × [`UNKNOWN_PEER_FRAME_BYTES_MAX`],
/// 4 MiB, of its memory).
pub const UNKNOWN_PEER_FRAMES_IN_FLIGHT_MAX: usize = 256;

/// Most frames of such a peer read at once on one connection (a join needs one).
pub const UNKNOWN_PEER_FRAMES_PER_CONNECTION_MAX: usize = 2;

/// Longest the relay waits for the whole of such a peer's frame, in seconds: a stream that trickles
/// (or sends nothing) gives its place back by then.
pub const UNKNOWN_PEER_FRAME_READ_SECS: u64 = 5;

/// Most `/musubi/sync/1` streams open on one connection at once, both directions (a session keeps
/// [`SESSION_REQUESTS_IN_FLIGHT_MAX`] requests in flight; notifications and LAN requests share the
/// rest). With [`FRAME_BYTES_MAX`] per stream this bounds what one connection can make a node hold.
pub const STREAMS_PER_CONNECTION_MAX: usize = 32;

/// Most requests a sync session keeps in flight at once.
pub const SESSION_REQUESTS_IN_FLIGHT_MAX: usize = 8;

/// Most documents a session pulls concurrently.
pub const SESSION_PULLS_IN_FLIGHT_MAX: usize = 4;

/// Most bundle ids in one LAN offer (a document with more is offered in its newest this-many).
pub const OFFER_IDS_MAX: usize = 200_000;

/// Largest offline-transfer file record, in bytes (one item; the file itself is bounded only by disk).
pub const TRANSFER_RECORD_BYTES_MAX: usize = FRAME_BYTES_MAX;

/// Most links of one facility's device chain (additions and revocations of devices).
pub const FACILITY_LINKS_MAX: usize = 1024;

/// Most devices or facilities in one of the relay's revocation lists.
pub const REVOCATIONS_MAX: usize = 100_000;

/// Most membership operations of one document.
pub const DOCUMENT_OPS_MAX: usize = 4096;

/// Most operations of one document a device keeps aside because they do not chain yet (from a LAN
/// peer or a file, before the operations they follow). An enrolled peer cannot fill a disk with
/// signed operations that never chain: past this, new ones are refused until the chain catches up.
pub const PROVISIONAL_OPS_MAX: usize = 256;

/// Most operations in one `Ops` response.
pub const OPS_RESPONSE_MAX: usize = 512;

/// Most pending join requests in one `JoinRequests` response.
pub const JOIN_REQUESTS_MAX: usize = 256;

/// Longest an invite stays valid, in seconds (30 days).
pub const INVITE_EXPIRES_SECS_MAX: u64 = 30 * 24 * 3600;
