//! Identifiers shared by the relay and the facilities.
//!
//! Random identifiers are built from caller-supplied bytes (this crate draws no randomness).
//! Text forms: UUIDs in hyphenated lowercase (RFC 9562), device ids as libp2p PeerIds (base58),
//! bundle ids as 64 lowercase hex digits of a BLAKE3 hash.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Error parsing an identifier from text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what}: {input:?}")]
pub struct ParseIdError {
    /// Which kind of identifier was expected (for example "document id").
    pub what: &'static str,
    /// The text that did not parse (truncated to 80 characters).
    pub input: String,
}

impl ParseIdError {
    pub(crate) fn new(what: &'static str, input: &str) -> Self {
        Self {
            what,
            input: input.chars().take(80).collect(),
        }
    }
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "specta", derive(specta::Type), specta(transparent))]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Builds a random (version 4) id from 16 caller-supplied random bytes.
            pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Builder::from_random_bytes(bytes).into_uuid())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim()).map(Self).map_err(|_| ParseIdError::new($what, s))
            }
        }
    };
}

uuid_id!(
    /// A deployment: one relay and the facilities enrolled at it (one municipality or a 広域 group).
    DeploymentId,
    "deployment id"
);
uuid_id!(
    /// A facility (clinic, care office, community centre, HQ): an organisation with one or more devices.
    FacilityId,
    "facility id"
);
uuid_id!(
    /// A document: the unit of membership, encryption and sync. The same at every facility.
    DocumentId,
    "document id"
);

/// A device: the libp2p PeerId of its Ed25519 identity (base58 text form).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub libp2p_identity::PeerId);

impl DeviceId {
    /// The device id of an Ed25519 public key.
    pub fn from_public_key(key: &libp2p_identity::PublicKey) -> Self {
        Self(key.to_peer_id())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

impl FromStr for DeviceId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse()
            .map(Self)
            .map_err(|_| ParseIdError::new("device id", s))
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.to_bytes())
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        libp2p_identity::PeerId::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| serde::de::Error::custom("invalid device id bytes"))
    }
}

/// The id of a bundle: the BLAKE3 hash of its encoded envelope (DESIGN invariant 6).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BundleId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl BundleId {
    /// The id of the given encoded envelope bytes.
    pub fn of_bytes(encoded: &[u8]) -> Self {
        Self(*blake3::hash(encoded).as_bytes())
    }
}

impl fmt::Display for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleId({})", &hex::encode(self.0)[..12])
    }
}

impl FromStr for BundleId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseIdError::new("bundle id", s))?;
        Ok(Self(out))
    }
}

/// A running hash of a document's bundle ids in the relay's sequence order: the log of sequence
/// number 0 is [`LogHash::ZERO`], the log of `s` is [`LogHash::next`] of the log of `s - 1` and the
/// id of bundle `s`. A relay that gave sequence number `s` to another bundle than before (it went back
/// in time and took new ones) gives `s` another log, which is how a device notices.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct LogHash(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl LogHash {
    /// The log before any bundle.
    pub const ZERO: LogHash = LogHash([0; 32]);

    /// The log after `id` follows this one (BLAKE3 in derive-key mode, context
    /// `"musubi bundle log v1"`, over this log then the id).
    pub fn next(&self, id: &BundleId) -> LogHash {
        let mut h = blake3::Hasher::new_derive_key("musubi bundle log v1");
        h.update(&self.0);
        h.update(&id.0);
        LogHash(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for LogHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogHash({})", &hex::encode(self.0)[..12])
    }
}

/// A document's key epoch. Epoch 0 is the first key; each rotation adds one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Epoch(pub u32);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The relay's per-document sequence number of an accepted bundle; the first bundle is 1, 0 means "none".
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A member facility's role in one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads everything; writes nothing.
    Reader,
    /// Reads and writes changes.
    Writer,
    /// Writes, and adds or removes members and rotates keys.
    Owner,
}

impl Role {
    /// Whether bundles authored by this role are accepted.
    pub fn can_write(self) -> bool {
        matches!(self, Role::Writer | Role::Owner)
    }
}

impl FromStr for Role {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "owner" => Ok(Role::Owner),
            _ => Err(ParseIdError::new("role (reader, writer or owner)", s)),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Owner => "owner",
        })
    }
}

/// What kind of organisation a facility is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum FacilityRole {
    /// 診療所・病院 (clinic or hospital).
    Clinic,
    /// 居宅介護支援事業所 (care-management office).
    CareOffice,
    /// 公民館・コミュニティセンター used as a 避難所 (shelter).
    Shelter,
    /// 災害対策本部 (disaster headquarters).
    Hq,
}

impl FromStr for FacilityRole {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "clinic" => Ok(Self::Clinic),
            "care-office" => Ok(Self::CareOffice),
            "shelter" => Ok(Self::Shelter),
            "hq" => Ok(Self::Hq),
            _ => Err(ParseIdError::new(
                "facility role (clinic, care-office, shelter or hq)",
                s,
            )),
        }
    }
}

impl fmt::Display for FacilityRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Clinic => "clinic",
            Self::CareOffice => "care-office",
            Self::Shelter => "shelter",
            Self::Hq => "hq",
        })
    }
}

/// Which domain schema a document follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum DocumentKind {
    /// 診療情報提供書 (様式11), a referral letter.
    Referral,
    /// 居宅サービス計画書, a care plan.
    CarePlan,
    /// 避難者名簿, a shelter's roster.
    Shelter,
    /// Medical notes about a shelter's evacuees (fewer members than the roster).
    ShelterMedical,
    /// A facility's 監査ログ: its devices' signed audit entries of one calendar year (UTC), so
    /// that a lost or wiped device does not take its log with it. Its facility is its only member.
    Audit,
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Referral => "referral",
            Self::CarePlan => "care-plan",
            Self::Shelter => "shelter",
            Self::ShelterMedical => "shelter-medical",
            Self::Audit => "audit",
        })
    }
}

impl FromStr for DocumentKind {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "referral" => Ok(Self::Referral),
            "care-plan" => Ok(Self::CarePlan),
            "shelter" => Ok(Self::Shelter),
            "shelter-medical" => Ok(Self::ShelterMedical),
            "audit" => Ok(Self::Audit),
            _ => Err(ParseIdError::new("document kind", s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let d = DocumentId::from_random_bytes([7; 16]);
        assert_eq!(d.to_string().parse::<DocumentId>(), Ok(d));
        assert_eq!(d.0.get_version_num(), 4);
        let b = BundleId::of_bytes(b"x");
        assert_eq!(b.to_string().parse::<BundleId>(), Ok(b));
        assert!("nonsense".parse::<FacilityId>().is_err());
        assert_eq!(
            "care-office".parse::<FacilityRole>(),
            Ok(FacilityRole::CareOffice)
        );
        assert!("admin".parse::<Role>().is_err());
    }
}
