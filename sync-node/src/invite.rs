//! Invite codes: the single line `musubi-node invite` prints so one device can enrol.
//!
//! The format is shared with the facilities and lives in [`musubi_crdt::invite`] (re-exported here):
//! [`INVITE_PREFIX`] (`musubi1`) followed by base64url without padding (RFC 4648 §5) of the CBOR map
//! (RFC 8949) of [`InviteCode`]: `{ "deployment": DeploymentId, "relay": DeviceId, "addrs": [text],
//! "secret": bytes(32) }`.
//! - `relay` is the relay's libp2p PeerId; the facility trusts only directories it signs.
//! - `addrs` are the relay's multiaddrs as `serve` recorded them, each ending in `/p2p/<relay>`
//!   (non-loopback first, at most [`INVITE_ADDRS_MAX`]; empty when `serve` never ran on the data directory).
//! - `secret` is 32 random bytes; the relay stores only [`hash_secret`] of it, with the expiry, the kind
//!   of enrolment and whether it was used.
//!
//! A device decodes the code with [`InviteCode::decode`], dials one of `addrs`, and sends
//! `Request::Join { secret, device }`.

pub use musubi_crdt::invite::{INVITE_CODE_CHARS_MAX, INVITE_PREFIX, InviteCode, InviteError};

/// Length of an invite secret, in bytes.
pub const INVITE_SECRET_BYTES: usize = 32;

/// Most relay addresses the relay puts in one invite code.
pub const INVITE_ADDRS_MAX: usize = 16;

/// Longest relay address the relay puts in an invite code, in bytes (longer ones are left out).
pub const INVITE_ADDR_BYTES_MAX: usize = 256;

/// BLAKE3 of an invite secret: what the relay stores and looks invites up by.
pub fn hash_secret(secret: &[u8]) -> [u8; 32] {
    *blake3::hash(secret).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use musubi_crdt::crypto::DeviceSecrets;
    use musubi_crdt::ids::DeploymentId;

    #[test]
    fn a_code_round_trips_as_one_line_and_garbage_is_refused() {
        let relay = DeviceSecrets::from_seeds([1; 32], [2; 32]).device_id();
        let code = InviteCode {
            deployment: DeploymentId::from_random_bytes([3; 16]),
            relay,
            addrs: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}")],
            secret: vec![9; INVITE_SECRET_BYTES],
        };
        let text = code.encode();
        assert!(text.starts_with(INVITE_PREFIX) && !text.contains(char::is_whitespace));
        assert_eq!(InviteCode::decode(&format!("  {text}\n")), Ok(code.clone()));
        assert!(InviteCode::decode("hello").is_err());
        assert!(InviteCode::decode(&text[..text.len() - 6]).is_err());
        assert_eq!(
            hash_secret(&code.secret),
            *blake3::hash(&[9; 32]).as_bytes()
        );
    }
}
