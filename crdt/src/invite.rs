//! Invites: one-time secrets handed over in person, which the relay never sees (DESIGN "Enrolment").
//!
//! Text form of a code: `musubi2` followed by base64url (RFC 4648 §5, no padding) of the CBOR of
//! [`InviteCode`]. A code carries where to go (deployment, relay id and addresses), whom to trust
//! (the authority's key: the joining device pins it, and shows its fingerprint so a person can compare
//! it with the one the municipality published), what it enrols (a new facility, or another device of
//! one), and a 32-byte secret.
//!
//! The relay knows an invite only by its [`InviteId`], derived from the secret one way. The joining
//! device sends a [`JoinRequest`]: its public keys, signed with its own key, and a proof that it knows
//! the secret (a BLAKE3 keyed hash of its request under a key derived from the secret). The inviter,
//! who kept the secret, checks the proof and signs: the authority a [`crate::directory::FacilityCert`]
//! for a new facility, a current device of the facility a [`crate::directory::DeviceLink`] for
//! another device. Neither the relay nor anyone who saw only the relay's traffic can make a proof.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::crypto::{self, DevicePublic, DeviceSecrets};
use crate::directory::{DeviceChange, DeviceLink};
use crate::ids::{DeploymentId, DeviceId, FacilityId, FacilityRole};

/// The text prefix of an invite code (also its format version).
pub const INVITE_PREFIX: &str = "musubi2";
/// Longest invite code accepted, in characters.
pub const INVITE_CODE_CHARS_MAX: usize = 4096;
/// Length of an invite secret, in bytes.
pub const INVITE_SECRET_BYTES: usize = 32;

/// The public name of an invite: the first 16 bytes of BLAKE3 (derive-key mode, context
/// `musubi invite id v1`) of its secret. The relay stores and looks invites up by it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InviteId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl InviteId {
    /// The id of the invite with this secret.
    pub fn of_secret(secret: &[u8; INVITE_SECRET_BYTES]) -> Self {
        let h = blake3::derive_key("musubi invite id v1", secret);
        Self(h[..16].try_into().expect("16 of 32 bytes"))
    }
}

impl fmt::Display for InviteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for InviteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InviteId({})", hex::encode(self.0))
    }
}

impl std::str::FromStr for InviteId {
    type Err = crate::ids::ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| crate::ids::ParseIdError {
            what: "invite id",
            input: s.chars().take(80).collect(),
        })?;
        Ok(Self(out))
    }
}

/// The id a new facility gets from its invite's secret (BLAKE3 derive-key `musubi facility id v2`),
/// so the authority and the joining device agree on it without a round trip.
pub fn facility_id_of_secret(secret: &[u8; INVITE_SECRET_BYTES]) -> FacilityId {
    let h = blake3::derive_key("musubi facility id v2", secret);
    FacilityId::from_random_bytes(h[..16].try_into().expect("16 of 32 bytes"))
}

/// What an invite enrols.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum InviteFor {
    /// A new facility; the authority certifies it, and the joining device becomes its root.
    NewFacility {
        /// The facility's name.
        name: String,
        /// What kind of facility.
        role: FacilityRole,
    },
    /// Another device of an existing facility; a current device of it approves.
    Device {
        /// The facility.
        facility: FacilityId,
        /// Its name (shown while joining).
        facility_name: String,
    },
}

/// A decoded invite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCode {
    /// The deployment the invite enrols into.
    pub deployment: DeploymentId,
    /// The relay's device id (its libp2p PeerId); it authenticates transport only.
    pub relay: DeviceId,
    /// The relay's multiaddrs at the time of the invite (each ending in `/p2p/<relay>`).
    pub addrs: Vec<String>,
    /// The deployment authority's key; the joining device pins it.
    pub authority: DeviceId,
    /// What the invite enrols.
    pub invite: InviteFor,
    /// When the invite stops working, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The single-use secret ([`INVITE_SECRET_BYTES`] bytes).
    #[serde(with = "serde_bytes")]
    pub secret: Vec<u8>,
}

/// Errors decoding an invite code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    /// Not a Musubi invite code (wrong prefix, bad base64 or CBOR, wrong secret length, too long).
    #[error(
        "this is not a Musubi invite code (it should start with {INVITE_PREFIX}); copy the whole line that `musubi-node invite` or `musubi device invite` printed"
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
        if code.secret.len() != INVITE_SECRET_BYTES {
            return Err(InviteError::NotAnInvite);
        }
        Ok(code)
    }

    /// The secret as an array.
    pub fn secret(&self) -> [u8; INVITE_SECRET_BYTES] {
        self.secret
            .as_slice()
            .try_into()
            .expect("decode checks the length")
    }

    /// The invite's public id.
    pub fn id(&self) -> InviteId {
        InviteId::of_secret(&self.secret())
    }

    /// The facility the joining device will belong to.
    pub fn facility(&self) -> FacilityId {
        match &self.invite {
            InviteFor::NewFacility { .. } => facility_id_of_secret(&self.secret()),
            InviteFor::Device { facility, .. } => *facility,
        }
    }
}

/// A device's request to join with an invite, as the relay stores it until the inviter approves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The invite.
    pub invite: InviteId,
    /// The device's public keys.
    pub device: DevicePublic,
    /// The name the device was given at `musubi init` (shown to the approver).
    pub name: String,
    /// For a new facility: the first link of its device chain, the device adding itself.
    pub genesis: Option<DeviceLink>,
    /// BLAKE3 keyed hash, under a key derived from the invite's secret, of everything above.
    #[serde(with = "serde_bytes")]
    pub proof: [u8; 32],
    /// The device's Ed25519 signature over everything above (it holds the key it names).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a join request is refused by its inviter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    /// The device's signature does not verify.
    #[error("the join request is not signed by the device it names")]
    BadSignature,
    /// The proof does not match the invite's secret.
    #[error("the join request does not prove knowledge of the invite's secret")]
    BadProof,
    /// The first link of a new facility is missing or wrong.
    #[error("the join request's first device link is missing or does not add the joining device")]
    BadGenesis,
    /// The age recipient does not parse.
    #[error("the device's age recipient is not valid")]
    BadRecipient,
}

fn proof_key(secret: &[u8; INVITE_SECRET_BYTES]) -> [u8; 32] {
    blake3::derive_key("musubi invite proof v1", secret)
}

impl JoinRequest {
    fn proven_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(
            &(&self.invite, &self.device, &self.name, &self.genesis),
            &mut out,
        )
        .expect("writing to a Vec cannot fail");
        out
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = self.proven_bytes();
        out.extend_from_slice(&self.proof);
        out
    }

    /// The request a device makes for `code`: its keys, its name, for a new facility the first link
    /// of the chain (signed at `at_ms`), the proof and its signature.
    pub fn make(code: &InviteCode, device: &DeviceSecrets, name: &str, at_ms: u64) -> Self {
        let genesis = match &code.invite {
            InviteFor::NewFacility { .. } => {
                Some(DeviceLink::genesis(device, code.facility(), at_ms))
            }
            InviteFor::Device { .. } => None,
        };
        let mut r = JoinRequest {
            invite: code.id(),
            device: device.public(),
            name: name.to_owned(),
            genesis,
            proof: [0; 32],
            signature: vec![],
        };
        r.proof = *blake3::keyed_hash(&proof_key(&code.secret()), &r.proven_bytes()).as_bytes();
        r.signature = device.sign(crypto::domain::JOIN_REQUEST, &r.signed_bytes());
        r
    }

    /// Checks the device's own signature and age recipient (what the relay can check).
    pub fn verify_signature(&self) -> Result<(), JoinError> {
        crypto::verify(
            &self.device.device,
            crypto::domain::JOIN_REQUEST,
            &self.signed_bytes(),
            &self.signature,
        )
        .map_err(|_| JoinError::BadSignature)?;
        crypto::parse_recipient(&self.device.age_recipient).map_err(|_| JoinError::BadRecipient)?;
        Ok(())
    }

    /// Checks everything the inviter holding `secret` can: the signature, the proof, and for a new
    /// facility `facility` that the first link adds the joining device, signed by it.
    pub fn verify(
        &self,
        secret: &[u8; INVITE_SECRET_BYTES],
        new_facility: Option<FacilityId>,
    ) -> Result<(), JoinError> {
        self.verify_signature()?;
        let expected = blake3::keyed_hash(&proof_key(secret), &self.proven_bytes());
        // blake3::Hash compares in constant time.
        if expected != blake3::Hash::from_bytes(self.proof)
            || self.invite != InviteId::of_secret(secret)
        {
            return Err(JoinError::BadProof);
        }
        match (new_facility, &self.genesis) {
            (None, None) => Ok(()),
            (Some(f), Some(g))
                if g.facility == f
                    && g.seq == 1
                    && g.prev.is_none()
                    && g.signer == self.device.device
                    && g.change
                        == (DeviceChange::Add {
                            device: self.device.device,
                            age_recipient: self.device.age_recipient.clone(),
                        })
                    && g.verify_signature().is_ok() =>
            {
                Ok(())
            }
            _ => Err(JoinError::BadGenesis),
        }
    }
}

/// A current device's registration, at the relay, of an invite it issued for another device of its
/// facility (so the relay takes a join with it). The secret stays on the issuing device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteRegistration {
    /// The invite.
    pub invite: InviteId,
    /// The facility the new device will belong to.
    pub facility: FacilityId,
    /// When the invite stops working, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The issuing device.
    pub author: DeviceId,
    /// Ed25519 signature by `author`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl InviteRegistration {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(
            &(
                &self.invite,
                &self.facility,
                self.expires_at_ms,
                &self.author,
            ),
            &mut out,
        )
        .expect("writing to a Vec cannot fail");
        out
    }

    /// Makes and signs a registration.
    pub fn sign(
        author: &DeviceSecrets,
        invite: InviteId,
        facility: FacilityId,
        expires_at_ms: u64,
    ) -> Self {
        let mut r = InviteRegistration {
            invite,
            facility,
            expires_at_ms,
            author: author.device_id(),
            signature: vec![],
        };
        r.signature = author.sign(crypto::domain::INVITE_REGISTRATION, &r.signed_bytes());
        r
    }

    /// Checks the signature (not that the author is a current device of the facility).
    pub fn verify(&self) -> Result<(), crypto::CryptoError> {
        crypto::verify(
            &self.author,
            crypto::domain::INVITE_REGISTRATION,
            &self.signed_bytes(),
            &self.signature,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(invite: InviteFor) -> InviteCode {
        let relay = DeviceSecrets::from_seeds([1; 32], [1; 32]).device_id();
        InviteCode {
            deployment: DeploymentId::from_random_bytes([2; 16]),
            relay,
            addrs: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}")],
            authority: DeviceSecrets::from_seeds([3; 32], [3; 32]).device_id(),
            invite,
            expires_at_ms: 5,
            secret: vec![9; 32],
        }
    }

    #[test]
    fn invite_codes_round_trip_and_reject_garbage() {
        let code = code(InviteFor::NewFacility {
            name: "港診療所".into(),
            role: FacilityRole::Clinic,
        });
        let text = code.encode();
        assert!(text.starts_with("musubi2"));
        assert_eq!(InviteCode::decode(&format!("  {text}\n")), Ok(code));
        assert_eq!(InviteCode::decode("hello"), Err(InviteError::NotAnInvite));
        assert_eq!(
            InviteCode::decode(&text[..text.len() - 4]),
            Err(InviteError::NotAnInvite)
        );
    }

    #[test]
    fn a_join_request_proves_the_secret_and_nobody_else_can() {
        let c = code(InviteFor::NewFacility {
            name: "港診療所".into(),
            role: FacilityRole::Clinic,
        });
        let device = DeviceSecrets::from_seeds([4; 32], [5; 32]);
        let r = JoinRequest::make(&c, &device, "受付1", 7);
        assert_eq!(r.verify(&c.secret(), Some(c.facility())), Ok(()));
        assert_eq!(
            r.verify(&[8; 32], Some(c.facility())),
            Err(JoinError::BadProof)
        );

        // Someone who saw the request (the relay) swaps in their own device: the proof breaks.
        let thief = DeviceSecrets::from_seeds([6; 32], [7; 32]);
        let mut forged = r.clone();
        forged.device = thief.public();
        forged.signature = thief.sign(crypto::domain::JOIN_REQUEST, &forged.signed_bytes());
        assert_eq!(
            forged.verify(&c.secret(), Some(c.facility())),
            Err(JoinError::BadProof)
        );
        // Or keeps the device but changes the name: the device's signature breaks.
        let mut renamed = r;
        renamed.name = "別名".into();
        assert_eq!(
            renamed.verify(&c.secret(), Some(c.facility())),
            Err(JoinError::BadSignature)
        );
    }

    #[test]
    fn an_invite_registration_is_signed_by_its_author() {
        let a = DeviceSecrets::from_seeds([4; 32], [5; 32]);
        let mut reg = InviteRegistration::sign(
            &a,
            InviteId::of_secret(&[1; 32]),
            FacilityId::from_random_bytes([1; 16]),
            9,
        );
        assert!(reg.verify().is_ok());
        reg.expires_at_ms = 10;
        assert!(reg.verify().is_err());
    }
}
