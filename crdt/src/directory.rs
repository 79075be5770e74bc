//! The directory: the relay-signed list of facilities and their devices' public keys.
//!
//! Every enrolled device can read it; it is how a clinic finds another clinic's devices' age
//! recipients, and how facilities learn of revocations (DESIGN "Identity and keys").

use serde::{Deserialize, Serialize};

use crate::crypto::{self, CryptoError, DeviceSecrets};
use crate::ids::{DeploymentId, DeviceId, FacilityId, FacilityRole};

/// One device of a facility.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The device id (its Ed25519 PeerId).
    pub device: DeviceId,
    /// Its age X25519 recipient (`age1...`).
    pub age_recipient: String,
    /// Whether the operator revoked it.
    pub revoked: bool,
}

/// One facility.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityEntry {
    /// Facility id.
    pub id: FacilityId,
    /// Its name as the operator enrolled it.
    pub name: String,
    /// What kind of facility it is.
    pub role: FacilityRole,
    /// Whether the operator revoked the whole facility.
    pub revoked: bool,
    /// Its devices.
    pub devices: Vec<DeviceEntry>,
}

impl FacilityEntry {
    /// The devices that may currently read and write: not revoked, of a facility not revoked.
    pub fn current_devices(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.devices
            .iter()
            .filter(move |d| !d.revoked && !self.revoked)
    }
}

/// The deployment's directory at one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// The deployment.
    pub deployment: DeploymentId,
    /// Increases with every enrolment and revocation.
    pub version: u64,
    /// Facilities in enrolment order.
    pub facilities: Vec<FacilityEntry>,
}

impl Directory {
    /// Finds a facility by id or by exact name; `None` when there is none, or two share the name.
    pub fn find(&self, id_or_name: &str) -> Option<&FacilityEntry> {
        if let Ok(id) = id_or_name.parse::<FacilityId>() {
            return self.facilities.iter().find(|f| f.id == id);
        }
        let mut named = self.facilities.iter().filter(|f| f.name == id_or_name);
        match (named.next(), named.next()) {
            (Some(f), None) => Some(f),
            _ => None,
        }
    }

    /// The facility by id.
    pub fn facility(&self, id: FacilityId) -> Option<&FacilityEntry> {
        self.facilities.iter().find(|f| f.id == id)
    }

    /// The facility a device belongs to, and its entry.
    pub fn device(&self, device: &DeviceId) -> Option<(&FacilityEntry, &DeviceEntry)> {
        self.facilities.iter().find_map(|f| {
            f.devices
                .iter()
                .find(|d| &d.device == device)
                .map(|d| (f, d))
        })
    }
}

/// A directory signed by the relay's device key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDirectory {
    /// CBOR of [`Directory`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The relay's device id.
    pub relay: DeviceId,
    /// Ed25519 signature by `relay` over `body`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Errors of checking a directory.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Signed by another relay than the one this facility enrolled at.
    #[error("directory signed by {got}, expected the relay {expected}")]
    WrongRelay {
        /// Who this facility trusts (device id text).
        expected: String,
        /// Who signed (device id text).
        got: String,
    },
    /// The signature does not verify.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The body is not a directory.
    #[error("malformed directory: {0}")]
    Malformed(String),
}

impl SignedDirectory {
    /// Signs a directory with the relay's key.
    pub fn sign(dir: &Directory, relay: &DeviceSecrets) -> Self {
        let mut body = Vec::new();
        ciborium::into_writer(dir, &mut body).expect("writing to a Vec cannot fail");
        let signature = relay.sign(crypto::domain::DIRECTORY, &body);
        Self {
            body,
            relay: relay.device_id(),
            signature,
        }
    }

    /// The version its body claims, read without checking the signature: what a sync session quotes
    /// as `known_version` when it next asks the same relay for a newer directory. `None` when the
    /// body is not a directory.
    pub(crate) fn claimed_version(&self) -> Option<u64> {
        #[derive(Deserialize)]
        struct Version {
            version: u64,
        }
        ciborium::from_reader::<Version, _>(self.body.as_slice())
            .ok()
            .map(|v| v.version)
    }

    /// Verifies the signature against the relay this facility trusts, and decodes.
    pub fn verify(&self, expected_relay: &DeviceId) -> Result<Directory, DirectoryError> {
        if &self.relay != expected_relay {
            return Err(DirectoryError::WrongRelay {
                expected: expected_relay.to_string(),
                got: self.relay.to_string(),
            });
        }
        crypto::verify(
            &self.relay,
            crypto::domain::DIRECTORY,
            &self.body,
            &self.signature,
        )?;
        ciborium::from_reader(self.body.as_slice())
            .map_err(|e| DirectoryError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_verifies_only_from_its_relay() {
        let relay = DeviceSecrets::from_seeds([1; 32], [1; 32]);
        let other = DeviceSecrets::from_seeds([2; 32], [2; 32]);
        let dir = Directory {
            deployment: DeploymentId::from_random_bytes([0; 16]),
            version: 3,
            facilities: vec![FacilityEntry {
                id: FacilityId::from_random_bytes([1; 16]),
                name: "港診療所".into(),
                role: FacilityRole::Clinic,
                revoked: false,
                devices: vec![],
            }],
        };
        let signed = SignedDirectory::sign(&dir, &relay);
        assert_eq!(signed.verify(&relay.device_id()).expect("verify"), dir);
        assert!(signed.verify(&other.device_id()).is_err());
        let mut forged = signed.clone();
        forged.body[10] ^= 1;
        assert!(forged.verify(&relay.device_id()).is_err());
        assert_eq!(
            dir.find("港診療所").map(|f| f.id),
            Some(dir.facilities[0].id)
        );
        assert!(dir.find("港").is_none());
    }

    #[test]
    fn the_claimed_version_is_read_without_the_signature() {
        let relay = DeviceSecrets::from_seeds([1; 32], [1; 32]);
        let dir = Directory {
            deployment: DeploymentId::from_random_bytes([0; 16]),
            version: 7,
            facilities: vec![FacilityEntry {
                id: FacilityId::from_random_bytes([1; 16]),
                name: "港診療所".into(),
                role: FacilityRole::Clinic,
                revoked: false,
                devices: vec![DeviceEntry {
                    device: relay.device_id(),
                    age_recipient: "age1example".into(),
                    revoked: false,
                }],
            }],
        };
        let mut signed = SignedDirectory::sign(&dir, &relay);
        assert_eq!(signed.claimed_version(), Some(7));
        signed.body = b"not a directory".to_vec();
        assert_eq!(signed.claimed_version(), None);
    }
}
