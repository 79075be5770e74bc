//! Signed document operations (create, membership, new epoch) and key grants.
//!
//! A document's operations form a hash chain: each names the hash of the one before it (`prev`), and
//! the first, `Create`, fixes the document's id (derived from its signed fields, so a second
//! `Create` of the same document cannot exist). `Create` and `NewEpoch` commit to the epoch's key
//! ([`crate::crypto::DocumentKey::commitment`]); a grant of any other key is refused when opened.
//! Every facility replays the chain itself ([`crate::membership`]); none takes a member list from
//! the relay. The relay stores key grants (a document key of one epoch, age-encrypted to a list of
//! member devices) without being able to open them (invariant 1).

use serde::{Deserialize, Serialize};

use crate::crypto::{self, CryptoError, DeviceSecrets, DocumentKey};
use crate::ids::{DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, Role};
use crate::limits::{
    DOCUMENT_MEMBERS_MAX, GRANT_RECIPIENTS_MAX, GRANT_SEALED_BYTES_BASE,
    GRANT_SEALED_BYTES_PER_RECIPIENT,
};

/// One member of a document: a facility and its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The member facility.
    pub facility: FacilityId,
    /// What its devices may do.
    pub role: Role,
}

/// What a document operation does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum DocOpBody {
    /// Creates the document; the author's facility is its owner; `members` are the others.
    Create {
        /// Schema of the document.
        kind: DocumentKind,
        /// Further members (at most [`DOCUMENT_MEMBERS_MAX`]).
        members: Vec<Member>,
        /// Commitment to the key of epoch 0.
        #[serde(with = "serde_bytes")]
        key_commitment: [u8; 32],
        /// 16 random bytes, so two documents made in the same millisecond get different ids.
        #[serde(with = "serde_bytes")]
        nonce: [u8; 16],
    },
    /// Adds a member, changes its role, or (with `role: None`) removes it.
    SetMember {
        /// The facility concerned.
        facility: FacilityId,
        /// Its new role, or `None` to remove it.
        role: Option<Role>,
    },
    /// Devices that held a key of the document and are no longer current devices of a member
    /// facility (revoked, or of a facility removed): from this point of the chain on they may sign
    /// nothing for it. Made by a writer before the `NewEpoch` that rotates their key away, so a
    /// device that replays the chain later refuses what they sign after it.
    Exclude {
        /// The devices (at most [`crate::limits::GRANT_RECIPIENTS_MAX`]).
        devices: Vec<DeviceId>,
    },
    /// Starts a new key epoch (after a removal or a revocation); must be the current epoch plus one.
    NewEpoch {
        /// The new epoch.
        epoch: Epoch,
        /// Commitment to the new epoch's key.
        #[serde(with = "serde_bytes")]
        key_commitment: [u8; 32],
    },
}

/// A signed operation on a document's membership or keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocOp {
    /// The document.
    pub doc: DocumentId,
    /// The facility of the author device.
    pub facility: FacilityId,
    /// The device that signed.
    pub author: DeviceId,
    /// When the author made it, milliseconds since the Unix epoch (informational).
    pub at_ms: u64,
    /// The hash ([`DocOp::hash`]) of the operation before it in the document's chain; `None` only
    /// for `Create`.
    pub prev: Option<OpHash>,
    /// The operation.
    pub body: DocOpBody,
    /// Ed25519 signature over [`DocOp::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Errors of operations and key grants.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// More members or recipients than allowed.
    #[error("{what}: {n} is over the limit of {max}")]
    TooMany {
        /// "members" or "recipients".
        what: &'static str,
        /// How many were given.
        n: usize,
        /// The limit.
        max: usize,
    },
    /// Signature or decryption failure.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A grant's plaintext is not a key.
    #[error("malformed key grant")]
    Malformed,
}

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// The hash of an operation: BLAKE3 of its encoding (32 bytes).
pub type OpHash = [u8; 32];

impl DocOp {
    /// Creates a document: signs its `Create` and derives the document's id from it.
    ///
    /// Errors: [`OpError::TooMany`] members.
    pub fn create(
        author: &DeviceSecrets,
        facility: FacilityId,
        at_ms: u64,
        body: DocOpBody,
    ) -> Result<Self, OpError> {
        let doc = Self::derive_id(facility, &author.device_id(), at_ms, &body);
        Self::sign(author, facility, doc, at_ms, None, body)
    }

    /// The id a document created by this `Create` has: BLAKE3 (derive-key mode, context
    /// `musubi document id v1`) of the creating facility, author, time and body, cut to a UUID.
    pub fn derive_id(
        facility: FacilityId,
        author: &DeviceId,
        at_ms: u64,
        body: &DocOpBody,
    ) -> DocumentId {
        let h = blake3::derive_key(
            "musubi document id v1",
            &cbor(&(&facility, author, at_ms, body)),
        );
        DocumentId::from_random_bytes(h[..16].try_into().expect("16 of 32 bytes"))
    }

    /// Makes and signs an operation after `prev` in the document's chain.
    ///
    /// Errors: [`OpError::TooMany`] members in a `Create`.
    pub fn sign(
        author: &DeviceSecrets,
        facility: FacilityId,
        doc: DocumentId,
        at_ms: u64,
        prev: Option<OpHash>,
        body: DocOpBody,
    ) -> Result<Self, OpError> {
        if let DocOpBody::Create { members, .. } = &body
            && members.len() > DOCUMENT_MEMBERS_MAX
        {
            return Err(OpError::TooMany {
                what: "members",
                n: members.len(),
                max: DOCUMENT_MEMBERS_MAX,
            });
        }
        let mut op = DocOp {
            doc,
            facility,
            author: author.device_id(),
            at_ms,
            prev,
            body,
            signature: vec![],
        };
        op.signature = author.sign(crypto::domain::DOC_OP, &op.signed_bytes());
        Ok(op)
    }

    /// The bytes the signature covers (everything but the signature).
    pub fn signed_bytes(&self) -> Vec<u8> {
        cbor(&(
            &self.doc,
            &self.facility,
            &self.author,
            self.at_ms,
            &self.prev,
            &self.body,
        ))
    }

    /// Checks the signature.
    pub fn verify(&self) -> Result<(), OpError> {
        crypto::verify(
            &self.author,
            crypto::domain::DOC_OP,
            &self.signed_bytes(),
            &self.signature,
        )?;
        Ok(())
    }

    /// BLAKE3 of the encoded operation: its name in the chain, and the relay's idempotency key.
    pub fn hash(&self) -> OpHash {
        *blake3::hash(&cbor(self)).as_bytes()
    }

    /// For a `Create`: whether the document id is the one derived from it.
    pub fn id_matches(&self) -> bool {
        Self::derive_id(self.facility, &self.author, self.at_ms, &self.body) == self.doc
    }
}

/// A document key of one epoch, age-encrypted to a list of member devices, signed by the granting device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGrant {
    /// The document.
    pub doc: DocumentId,
    /// The epoch of the key.
    pub epoch: Epoch,
    /// The commitment of the key sealed inside ([`DocumentKey::commitment`]); a grant whose
    /// commitment is not the chain's for `epoch` is refused, and a key that does not match it is
    /// not used.
    #[serde(with = "serde_bytes")]
    pub key_commitment: [u8; 32],
    /// The granting device's facility.
    pub facility: FacilityId,
    /// The granting device.
    pub author: DeviceId,
    /// The devices the key is sealed to (at most [`GRANT_RECIPIENTS_MAX`]).
    pub recipients: Vec<DeviceId>,
    /// age ciphertext of the key's 32-byte seed, one stanza per recipient.
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
    /// Ed25519 signature over [`KeyGrant::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl KeyGrant {
    /// Seals `key` to the given devices' age recipients and signs the grant.
    ///
    /// `recipients` pairs each device id with its age recipient (`age1...`) from the directory.
    pub fn seal(
        author: &DeviceSecrets,
        facility: FacilityId,
        doc: DocumentId,
        epoch: Epoch,
        key: &DocumentKey,
        recipients: &[(DeviceId, String)],
    ) -> Result<Self, OpError> {
        if recipients.len() > GRANT_RECIPIENTS_MAX {
            return Err(OpError::TooMany {
                what: "recipients",
                n: recipients.len(),
                max: GRANT_RECIPIENTS_MAX,
            });
        }
        let parsed = recipients
            .iter()
            .map(|(_, r)| crypto::parse_recipient(r))
            .collect::<Result<Vec<_>, _>>()?;
        let sealed = crypto::seal_to(&parsed, &key.seed())?;
        let mut g = KeyGrant {
            doc,
            epoch,
            key_commitment: key.commitment(),
            facility,
            author: author.device_id(),
            recipients: recipients.iter().map(|(d, _)| *d).collect(),
            sealed,
            signature: vec![],
        };
        g.signature = author.sign(crypto::domain::KEY_GRANT, &g.signed_bytes());
        Ok(g)
    }

    /// [`KeyGrant::seal`] to any number of recipients: one grant per
    /// [`GRANT_RECIPIENTS_MAX`] of them, in order (none for no recipients).
    ///
    /// Errors: a recipient that is not an age X25519 recipient.
    pub fn seal_all(
        author: &DeviceSecrets,
        facility: FacilityId,
        doc: DocumentId,
        epoch: Epoch,
        key: &DocumentKey,
        recipients: &[(DeviceId, String)],
    ) -> Result<Vec<Self>, OpError> {
        recipients
            .chunks(GRANT_RECIPIENTS_MAX)
            .map(|chunk| Self::seal(author, facility, doc, epoch, key, chunk))
            .collect()
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        cbor(&(
            &self.doc,
            self.epoch,
            &self.key_commitment,
            &self.facility,
            &self.author,
            &self.recipients,
            blake3::hash(&self.sealed).as_bytes(),
        ))
    }

    /// Checks the signature, the recipient limit and the size of the sealed key
    /// ([`GRANT_SEALED_BYTES_BASE`] plus [`GRANT_SEALED_BYTES_PER_RECIPIENT`] per recipient).
    pub fn verify(&self) -> Result<(), OpError> {
        if self.recipients.len() > GRANT_RECIPIENTS_MAX {
            return Err(OpError::TooMany {
                what: "recipients",
                n: self.recipients.len(),
                max: GRANT_RECIPIENTS_MAX,
            });
        }
        let sealed_max =
            GRANT_SEALED_BYTES_BASE + GRANT_SEALED_BYTES_PER_RECIPIENT * self.recipients.len();
        if self.sealed.len() > sealed_max {
            return Err(OpError::TooMany {
                what: "sealed bytes",
                n: self.sealed.len(),
                max: sealed_max,
            });
        }
        crypto::verify(
            &self.author,
            crypto::domain::KEY_GRANT,
            &self.signed_bytes(),
            &self.signature,
        )?;
        Ok(())
    }

    /// Opens the grant with this device's age identity. Errors: [`OpError::Malformed`] when the key
    /// inside is not the one the grant commits to.
    pub fn open(&self, device: &DeviceSecrets) -> Result<DocumentKey, OpError> {
        let seed = crypto::open_with(device.age_identity(), &self.sealed, 32)?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| OpError::Malformed)?;
        let key = DocumentKey::from_seed(seed);
        if key.commitment() != self.key_commitment {
            return Err(OpError::Malformed);
        }
        Ok(key)
    }

    /// BLAKE3 of the encoded grant (the relay's idempotency key).
    pub fn hash(&self) -> [u8; 32] {
        *blake3::hash(&cbor(self)).as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_opens_only_for_named_devices() {
        let owner = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let b1 = DeviceSecrets::from_seeds([3; 32], [4; 32]);
        let c = DeviceSecrets::from_seeds([5; 32], [6; 32]);
        let key = DocumentKey::from_seed([7; 32]);
        let f = FacilityId::from_random_bytes([1; 16]);
        let d = DocumentId::from_random_bytes([2; 16]);
        let rs: Vec<_> = [&owner, &b1]
            .iter()
            .map(|s| (s.device_id(), s.public().age_recipient))
            .collect();
        let g = KeyGrant::seal(&owner, f, d, Epoch(0), &key, &rs).expect("seal");
        g.verify().expect("verify");
        assert_eq!(g.open(&b1).expect("b1 opens").seed(), key.seed());
        assert!(g.open(&c).is_err());
        let mut forged = g.clone();
        forged.recipients.push(c.device_id());
        assert!(forged.verify().is_err());
    }

    #[test]
    fn a_grant_padded_past_what_its_recipients_need_is_refused() {
        let owner = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let key = DocumentKey::from_seed([7; 32]);
        let f = FacilityId::from_random_bytes([1; 16]);
        let d = DocumentId::from_random_bytes([2; 16]);
        // A real grant to one device and to the most devices fits its bound.
        for n in [1, 2, 3, 4, GRANT_RECIPIENTS_MAX] {
            let rs: Vec<_> = (0..n)
                .map(|i| {
                    let mut seed = [0u8; 32];
                    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    let s = DeviceSecrets::from_seeds(seed, seed);
                    (s.device_id(), s.public().age_recipient)
                })
                .collect();
            let g = KeyGrant::seal(&owner, f, d, Epoch(0), &key, &rs).expect("seal");
            g.verify().expect("a real grant verifies");
        }
        // A member pads one grant with megabytes (signed, so the signature holds).
        let me = [(owner.device_id(), owner.public().age_recipient)];
        let mut padded = KeyGrant::seal(&owner, f, d, Epoch(0), &key, &me).expect("seal");
        padded.sealed.extend(std::iter::repeat_n(0u8, 9 << 20));
        padded.signature = owner.sign(crypto::domain::KEY_GRANT, &padded.signed_bytes());
        assert!(matches!(
            padded.verify(),
            Err(OpError::TooMany {
                what: "sealed bytes",
                ..
            })
        ));
    }

    #[test]
    fn a_document_id_is_fixed_by_its_create() {
        let owner = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let f = FacilityId::from_random_bytes([1; 16]);
        let body = DocOpBody::Create {
            kind: DocumentKind::Referral,
            members: vec![],
            key_commitment: [3; 32],
            nonce: [4; 16],
        };
        let op = DocOp::create(&owner, f, 5, body.clone()).expect("create");
        assert!(op.id_matches());
        op.verify().expect("verify");
        // The same id with another body (another owner, other members) cannot be made.
        let thief = DeviceSecrets::from_seeds([5; 32], [6; 32]);
        let forged = DocOp::sign(&thief, f, op.doc, 5, None, body).expect("sign");
        assert!(forged.verify().is_ok());
        assert!(!forged.id_matches());
    }

    #[test]
    fn doc_op_signature_covers_its_body() {
        let owner = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let op = DocOp::sign(
            &owner,
            FacilityId::from_random_bytes([1; 16]),
            DocumentId::from_random_bytes([2; 16]),
            5,
            Some([7; 32]),
            DocOpBody::SetMember {
                facility: FacilityId::from_random_bytes([3; 16]),
                role: Some(Role::Reader),
            },
        )
        .expect("sign");
        op.verify().expect("verify");
        let mut t = op.clone();
        t.body = DocOpBody::SetMember {
            facility: FacilityId::from_random_bytes([3; 16]),
            role: Some(Role::Owner),
        };
        assert!(t.verify().is_err());
    }
}
