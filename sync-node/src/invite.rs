//! Invite codes as the relay hands them out (`musubi-node invite`): the format lives in
//! [`musubi_crdt::invite`] (re-exported here). The relay stores an invite by its public
//! [`InviteId`] only, with its kind, expiry and use; the secret stays with whoever issued it (the
//! deployment authority for a new facility, the inviting device for another device of a facility).
//! A joining device proves it knows the secret in its [`musubi_crdt::invite::JoinRequest`]; the
//! relay cannot check that proof, and cannot make one.

pub use musubi_crdt::invite::{
    INVITE_CODE_CHARS_MAX, INVITE_PREFIX, INVITE_SECRET_BYTES, InviteCode, InviteError, InviteId,
};

/// Most relay addresses the relay puts in one invite code.
pub const INVITE_ADDRS_MAX: usize = 16;

/// Longest relay address the relay puts in an invite code, in bytes (longer ones are left out).
pub const INVITE_ADDR_BYTES_MAX: usize = 256;
