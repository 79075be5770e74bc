//! Invite codes: what an operator hands a new facility or device (`musubi-node invite`).
//!
//! Text form: `musubi1` followed by base64url (RFC 4648 §5, no padding) of the CBOR of
//! [`InviteCode`]. The code carries the relay's addresses and peer id (so the device knows whom to
//! dial and whom to trust) and a 32-byte single-use secret; the relay stores only its BLAKE3 hash.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::ids::{DeploymentId, DeviceId};

/// The text prefix of an invite code (also its format version).
pub const INVITE_PREFIX: &str = "musubi1";
/// Longest invite code accepted, in characters.
pub const INVITE_CODE_CHARS_MAX: usize = 4096;

/// A decoded invite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCode {
    /// The deployment the invite enrols into.
    pub deployment: DeploymentId,
    /// The relay's device id (its libp2p PeerId); the facility trusts directories it signs.
    pub relay: DeviceId,
    /// The relay's multiaddrs at the time of the invite (each ending in `/p2p/<relay>`).
    pub addrs: Vec<String>,
    /// The single-use secret (32 bytes).
    #[serde(with = "serde_bytes")]
    pub secret: Vec<u8>,
}

/// Errors decoding an invite code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    /// Not a Musubi invite code (wrong prefix, bad base64 or CBOR, wrong secret length, too long).
    #[error(
        "this is not a Musubi invite code (it should start with {INVITE_PREFIX}); copy the whole line that `musubi-node invite` printed"
    )]
    NotAnInvite,
}

impl InviteCode {
    /// The text form.
    pub fn encode(&self) -> String {
        let mut cbor = Vec::new();
        ciborium::into_writer(self, &mut cbor).expect("writing to a Vec cannot fail");
        format!("{INVITE_PREFIX}{}", URL_SAFE_NO_PAD.encode(cbor))
    }

    /// Parses the text form (surrounding white space is ignored).
    pub fn decode(text: &str) -> Result<Self, InviteError> {
        let text = text.trim();
        if text.len() > INVITE_CODE_CHARS_MAX {
            return Err(InviteError::NotAnInvite);
        }
        let body = text
            .strip_prefix(INVITE_PREFIX)
            .ok_or(InviteError::NotAnInvite)?;
        let cbor = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| InviteError::NotAnInvite)?;
        let code: InviteCode =
            ciborium::from_reader(cbor.as_slice()).map_err(|_| InviteError::NotAnInvite)?;
        if code.secret.len() != 32 {
            return Err(InviteError::NotAnInvite);
        }
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DeviceSecrets;

    #[test]
    fn invite_codes_round_trip_and_reject_garbage() {
        let relay = DeviceSecrets::from_seeds([1; 32], [1; 32]).device_id();
        let code = InviteCode {
            deployment: DeploymentId::from_random_bytes([2; 16]),
            relay,
            addrs: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}")],
            secret: vec![9; 32],
        };
        let text = code.encode();
        assert!(text.starts_with("musubi1"));
        assert_eq!(InviteCode::decode(&format!("  {text}\n")), Ok(code));
        assert_eq!(InviteCode::decode("hello"), Err(InviteError::NotAnInvite));
        assert_eq!(
            InviteCode::decode(&text[..text.len() - 4]),
            Err(InviteError::NotAnInvite)
        );
    }
}
