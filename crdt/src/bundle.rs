//! Bundles: batches of Automerge changes (or one attachment), age-encrypted to a document's epoch key,
//! in an Ed25519-signed envelope whose BLAKE3 hash is the bundle's id (DESIGN "Documents, bundles and sync").
//!
//! The relay checks an envelope's signature and author without decrypting anything (invariant 5).

use serde::{Deserialize, Serialize};

use crate::crypto::{self, CryptoError, DeviceSecrets, DocumentKey};
use crate::ids::{BundleId, DeviceId, DocumentId, Epoch, FacilityId};
use crate::limits::{ATTACHMENT_BYTES_MAX, BUNDLE_BYTES_MAX, BUNDLE_CHANGES_BYTES_MAX};

/// The envelope format version this crate writes and reads.
pub const ENVELOPE_VERSION: u8 = 2;

/// Errors of sealing, decoding, verifying and opening bundles.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The encoded envelope is over [`BUNDLE_BYTES_MAX`].
    #[error("bundle is {bytes} bytes, over the limit of {BUNDLE_BYTES_MAX}")]
    TooLarge {
        /// Size of the offending envelope or payload in bytes.
        bytes: usize,
    },
    /// The payload is over its limit ([`BUNDLE_CHANGES_BYTES_MAX`] or [`ATTACHMENT_BYTES_MAX`]).
    #[error("{what} is {bytes} bytes, over the limit of {max}")]
    PayloadTooLarge {
        /// "changes" or "attachment".
        what: &'static str,
        /// Its size in bytes.
        bytes: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The bytes are not a CBOR envelope of a known version.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// Signature or decryption failure.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// What a bundle carries once decrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum Payload {
    /// Automerge changes, in the format of `Automerge::save_after` (loadable with `load_incremental`).
    Changes {
        /// The encoded changes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// One attached file (添付), referenced from the document by this bundle's id.
    Attachment {
        /// File name as the user gave it.
        name: String,
        /// IANA media type, e.g. `application/pdf`.
        media_type: String,
        /// The file's bytes (at most [`ATTACHMENT_BYTES_MAX`]).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

impl Payload {
    fn check_size(&self) -> Result<(), BundleError> {
        match self {
            Payload::Changes { data } if data.len() > BUNDLE_CHANGES_BYTES_MAX => {
                Err(BundleError::PayloadTooLarge {
                    what: "changes",
                    bytes: data.len(),
                    max: BUNDLE_CHANGES_BYTES_MAX,
                })
            }
            Payload::Attachment { data, .. } if data.len() > ATTACHMENT_BYTES_MAX => {
                Err(BundleError::PayloadTooLarge {
                    what: "attachment",
                    bytes: data.len(),
                    max: ATTACHMENT_BYTES_MAX,
                })
            }
            _ => Ok(()),
        }
    }
}

/// A signed, encrypted bundle as the relay stores and forwards it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version ([`ENVELOPE_VERSION`]).
    pub v: u8,
    /// The document the changes belong to.
    pub doc: DocumentId,
    /// The key epoch the ciphertext is encrypted under.
    pub epoch: Epoch,
    /// The commitment of the key it is sealed with ([`DocumentKey::commitment`]): a bundle sealed
    /// with a key other than the one the document's chain commits to for `epoch` (a rotation that
    /// lost a race) is refused where the chain is known, instead of being stored unreadable.
    #[serde(with = "serde_bytes")]
    pub key_commitment: [u8; 32],
    /// The facility whose device wrote it.
    pub facility: FacilityId,
    /// The device that wrote and signed it.
    pub author: DeviceId,
    /// The age-encrypted CBOR [`Payload`].
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// Ed25519 signature by `author` over [`Envelope::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Serialize)]
struct Signed<'a> {
    v: u8,
    doc: &'a DocumentId,
    epoch: Epoch,
    #[serde(with = "serde_bytes")]
    key_commitment: [u8; 32],
    facility: &'a FacilityId,
    author: &'a DeviceId,
    #[serde(with = "serde_bytes")]
    ciphertext_blake3: [u8; 32],
}

impl Envelope {
    /// Encrypts `payload` to `key` and signs the envelope with `author`'s device key.
    ///
    /// Errors: the payload over its limit, or an encryption failure.
    pub fn seal(
        author: &DeviceSecrets,
        facility: FacilityId,
        doc: DocumentId,
        epoch: Epoch,
        key: &DocumentKey,
        payload: &Payload,
    ) -> Result<Self, BundleError> {
        payload.check_size()?;
        let mut plain = Vec::new();
        ciborium::into_writer(payload, &mut plain).expect("writing to a Vec cannot fail");
        let ciphertext = key.seal(&plain)?;
        let mut env = Envelope {
            v: ENVELOPE_VERSION,
            doc,
            epoch,
            key_commitment: key.commitment(),
            facility,
            author: author.device_id(),
            ciphertext,
            signature: vec![],
        };
        env.signature = author.sign(crypto::domain::BUNDLE, &env.signed_bytes());
        let bytes = env.encode().len();
        if bytes > BUNDLE_BYTES_MAX {
            return Err(BundleError::TooLarge { bytes });
        }
        Ok(env)
    }

    /// The bytes the signature covers: version, document, epoch, key commitment, facility, author and
    /// the ciphertext's BLAKE3 hash.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let s = Signed {
            v: self.v,
            doc: &self.doc,
            epoch: self.epoch,
            key_commitment: self.key_commitment,
            facility: &self.facility,
            author: &self.author,
            ciphertext_blake3: *blake3::hash(&self.ciphertext).as_bytes(),
        };
        let mut out = Vec::new();
        ciborium::into_writer(&s, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Checks the signature against the author's key (embedded in the device id). No decryption.
    pub fn verify_signature(&self) -> Result<(), BundleError> {
        crypto::verify(
            &self.author,
            crypto::domain::BUNDLE,
            &self.signed_bytes(),
            &self.signature,
        )?;
        Ok(())
    }

    /// The canonical CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ciphertext.len() + 256);
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes an envelope, refusing more than [`BUNDLE_BYTES_MAX`] bytes or an unknown version.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > BUNDLE_BYTES_MAX {
            return Err(BundleError::TooLarge { bytes: bytes.len() });
        }
        let env: Envelope =
            ciborium::from_reader(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        env.check()?;
        Ok(env)
    }

    /// Checks version and size of an envelope that arrived inside another message.
    pub fn check(&self) -> Result<(), BundleError> {
        if self.v != ENVELOPE_VERSION {
            return Err(BundleError::Malformed(format!(
                "unknown envelope version {}",
                self.v
            )));
        }
        let bytes = self.ciphertext.len() + 256;
        if bytes > BUNDLE_BYTES_MAX {
            return Err(BundleError::TooLarge { bytes });
        }
        Ok(())
    }

    /// The bundle id: BLAKE3 of the canonical encoding.
    pub fn id(&self) -> BundleId {
        BundleId::of_bytes(&self.encode())
    }

    /// Decrypts the payload with the epoch's key.
    pub fn open(&self, key: &DocumentKey) -> Result<Payload, BundleError> {
        let plain = key.open(&self.ciphertext, BUNDLE_BYTES_MAX)?;
        let payload: Payload = ciborium::from_reader(plain.as_slice())
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        payload.check_size()?;
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (DeviceSecrets, DocumentKey, Envelope) {
        let dev = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let key = DocumentKey::from_seed([3; 32]);
        let env = Envelope::seal(
            &dev,
            FacilityId::from_random_bytes([4; 16]),
            DocumentId::from_random_bytes([5; 16]),
            Epoch(0),
            &key,
            &Payload::Changes {
                data: "備考: 至急".as_bytes().to_vec(),
            },
        )
        .expect("seal");
        (dev, key, env)
    }

    #[test]
    fn sealed_bundle_verifies_opens_and_hides_its_text() {
        let (_, key, env) = sample();
        env.verify_signature().expect("valid signature");
        let bytes = env.encode();
        assert!(!bytes.windows("至急".len()).any(|w| w == "至急".as_bytes()));
        let back = Envelope::decode(&bytes).expect("decode");
        assert_eq!(back.id(), env.id());
        assert_eq!(
            back.open(&key).expect("open"),
            Payload::Changes {
                data: "備考: 至急".as_bytes().to_vec()
            }
        );
        assert!(back.open(&DocumentKey::from_seed([6; 32])).is_err());
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let (_, _, env) = sample();
        let mut t = env.clone();
        t.ciphertext[40] ^= 1;
        assert!(t.verify_signature().is_err());
        let mut t = env.clone();
        t.epoch = Epoch(1);
        assert!(t.verify_signature().is_err());
        let mut t = env;
        t.author = DeviceSecrets::from_seeds([7; 32], [7; 32]).device_id();
        assert!(t.verify_signature().is_err());
    }

    #[test]
    fn oversized_and_malformed_input_is_an_error() {
        let dev = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let key = DocumentKey::from_seed([3; 32]);
        let big = Payload::Attachment {
            name: "x".into(),
            media_type: "a/b".into(),
            data: vec![0; ATTACHMENT_BYTES_MAX + 1],
        };
        let r = Envelope::seal(
            &dev,
            FacilityId::from_random_bytes([0; 16]),
            DocumentId::from_random_bytes([0; 16]),
            Epoch(0),
            &key,
            &big,
        );
        assert!(matches!(
            r,
            Err(BundleError::PayloadTooLarge {
                what: "attachment",
                ..
            })
        ));
        assert!(matches!(
            Envelope::decode(&[0xff, 0x00, 0x13]),
            Err(BundleError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::decode(&vec![0; BUNDLE_BYTES_MAX + 1]),
            Err(BundleError::TooLarge { .. })
        ));
    }
}
