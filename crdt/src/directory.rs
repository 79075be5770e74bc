//! The directory: who belongs to the deployment, as certificates no relay can forge.
//!
//! Trust runs along a chain (DESIGN "Trust roots"): the deployment **authority** (the municipality's
//! Ed25519 key, kept off the relay host) signs a [`FacilityCert`] for each facility: its id, name, role
//! and **root key**. The root key is the Ed25519 key of the facility's first device. Each facility
//! keeps a hash-chained list of [`DeviceLink`]s: the first adds the root device and is signed by it;
//! every later link adds or revokes a device and is signed by a device that is current at that point
//! of the chain. A device is *current* when a valid chain adds it and nothing revokes it.
//!
//! The relay stores the certificates and links and serves them in a [`SignedDirectory`]; its own
//! signature covers only what the relay alone decides: the version (it grows with every change) and
//! the operator's revocations (revoking only takes access away, so a relay that lies can only deny
//! service). A facility verifies everything itself with [`SignedDirectory::verify`] against the
//! authority it pinned at join and the [`Pins`] it keeps: each facility's root key at first sight
//! (a changed one is shown, and gets no key until a person confirms its safety number), how far each
//! chain was seen (a chain served shorter or different is refused), and every revocation seen.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::crypto::{self, CryptoError, DeviceSecrets};
use crate::ids::{DeploymentId, DeviceId, DocumentId, FacilityId, FacilityRole};
use crate::limits::{
    DIRECTORY_FACILITIES_MAX, FACILITY_LINKS_MAX, FACILITY_NAME_BYTES_MAX, REVOCATIONS_MAX,
};

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// A BLAKE3 hash of a certificate or link (32 bytes).
pub type LinkHash = [u8; 32];

/// The authority's certificate of one facility: id, name, role and root key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityCert {
    /// The deployment the facility belongs to.
    pub deployment: DeploymentId,
    /// The facility.
    pub facility: FacilityId,
    /// Its name as the authority certified it (at most [`FACILITY_NAME_BYTES_MAX`] bytes).
    pub name: String,
    /// What kind of facility it is (only an authority-certified facility is ever an HQ).
    pub role: FacilityRole,
    /// The facility's root key: the Ed25519 key of its first device (as a device id).
    pub root: DeviceId,
    /// When the authority signed, milliseconds since the Unix epoch (informational).
    pub issued_at_ms: u64,
    /// The signing authority's key (as a device id: a PeerId that embeds the Ed25519 key).
    pub authority: DeviceId,
    /// The check value of the card-pseudonym keys the authority issued to this facility's role
    /// ([`crypto::PseudonymKeys::check`]): a device refuses keys that do not match, whoever sealed
    /// them to it (the relay passes them on; another device of the facility seals them again).
    /// Absent in certificates signed before sectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pseudonym_check: Option<serde_bytes::ByteArray<32>>,
    /// Ed25519 signature by `authority` over [`FacilityCert::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl FacilityCert {
    /// Makes and signs a certificate with the authority's key.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        authority: &DeviceSecrets,
        deployment: DeploymentId,
        facility: FacilityId,
        name: &str,
        role: FacilityRole,
        root: DeviceId,
        issued_at_ms: u64,
    ) -> Self {
        let mut cert = FacilityCert {
            deployment,
            facility,
            name: name.to_owned(),
            role,
            root,
            issued_at_ms,
            authority: authority.device_id(),
            pseudonym_check: None,
            signature: vec![],
        };
        cert.signature = authority.sign(crypto::domain::FACILITY_CERT, &cert.signed_bytes());
        cert
    }

    /// The certificate with `check` as its pseudonym keys' check value, signed again by `authority`.
    pub fn with_pseudonym_check(mut self, authority: &DeviceSecrets, check: [u8; 32]) -> Self {
        self.pseudonym_check = Some(serde_bytes::ByteArray::new(check));
        self.signature = authority.sign(crypto::domain::FACILITY_CERT, &self.signed_bytes());
        self
    }

    /// The bytes the signature covers (everything but the signature; the pseudonym check value
    /// only when present, so certificates signed before it still verify).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let fields = (
            &self.deployment,
            &self.facility,
            &self.name,
            self.role,
            &self.root,
            self.issued_at_ms,
            &self.authority,
        );
        match &self.pseudonym_check {
            None => cbor(&fields),
            Some(check) => cbor(&(fields, check)),
        }
    }

    /// Checks that `authority` signed it, for `deployment`, with a valid name.
    ///
    /// Errors: [`DirectoryError::Certificate`] naming what is wrong.
    pub fn verify(
        &self,
        authority: &DeviceId,
        deployment: DeploymentId,
    ) -> Result<(), DirectoryError> {
        let bad = |reason: &str| DirectoryError::Certificate {
            facility: self.facility.to_string(),
            reason: reason.to_owned(),
        };
        if &self.authority != authority {
            return Err(bad(
                "it is signed by another authority than the one pinned at join",
            ));
        }
        if self.deployment != deployment {
            return Err(bad("it is for another deployment"));
        }
        if self.name.trim().is_empty() || self.name.len() > FACILITY_NAME_BYTES_MAX {
            return Err(bad("its name is empty or too long"));
        }
        crypto::verify(
            authority,
            crypto::domain::FACILITY_CERT,
            &self.signed_bytes(),
            &self.signature,
        )
        .map_err(|_| bad("the authority's signature does not verify"))
    }

    /// BLAKE3 of the encoded certificate.
    pub fn hash(&self) -> LinkHash {
        *blake3::hash(&cbor(self)).as_bytes()
    }

    /// The facility's safety number: what two facilities read to each other by phone to be sure
    /// they see the same root key ([`safety_number`] of the facility id and root key).
    pub fn safety_number(&self) -> String {
        safety_number(self.facility, &self.root)
    }
}

/// What a link of a facility's device chain does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum DeviceChange {
    /// Adds a device with its age X25519 recipient (`age1...`), to which document keys are sealed.
    Add {
        /// The device.
        device: DeviceId,
        /// Its age recipient.
        age_recipient: String,
    },
    /// Revokes a device of the facility (a lost laptop); it gets no key from then on.
    Revoke {
        /// The device.
        device: DeviceId,
    },
}

/// One link of a facility's device chain, signed by a current device of the facility.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLink {
    /// The facility.
    pub facility: FacilityId,
    /// Its position in the chain, from 1.
    pub seq: u32,
    /// The hash of the link before it (`None` for the first).
    pub prev: Option<LinkHash>,
    /// What it does.
    pub change: DeviceChange,
    /// The device that signed (the root device for the first link).
    pub signer: DeviceId,
    /// When it was signed, milliseconds since the Unix epoch (informational).
    pub at_ms: u64,
    /// Ed25519 signature by `signer` over [`DeviceLink::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl DeviceLink {
    /// Makes and signs a link after `prev` (the chain's last link, or `None` for the first).
    pub fn sign(
        signer: &DeviceSecrets,
        facility: FacilityId,
        prev: Option<&DeviceLink>,
        change: DeviceChange,
        at_ms: u64,
    ) -> Self {
        let mut link = DeviceLink {
            facility,
            seq: prev.map_or(1, |p| p.seq + 1),
            prev: prev.map(DeviceLink::hash),
            change,
            signer: signer.device_id(),
            at_ms,
            signature: vec![],
        };
        link.signature = signer.sign(crypto::domain::DEVICE_LINK, &link.signed_bytes());
        link
    }

    /// The first link of a new facility: its root device adds itself.
    pub fn genesis(root: &DeviceSecrets, facility: FacilityId, at_ms: u64) -> Self {
        let public = root.public();
        Self::sign(
            root,
            facility,
            None,
            DeviceChange::Add {
                device: public.device,
                age_recipient: public.age_recipient,
            },
            at_ms,
        )
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        cbor(&(
            &self.facility,
            self.seq,
            &self.prev,
            &self.change,
            &self.signer,
            self.at_ms,
        ))
    }

    /// Checks the signature only (not the signer's right to sign; see [`verify_chain`]).
    pub fn verify_signature(&self) -> Result<(), CryptoError> {
        crypto::verify(
            &self.signer,
            crypto::domain::DEVICE_LINK,
            &self.signed_bytes(),
            &self.signature,
        )
    }

    /// BLAKE3 of the encoded link.
    pub fn hash(&self) -> LinkHash {
        *blake3::hash(&cbor(self)).as_bytes()
    }
}

/// One device as a verified chain leaves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The device id (its Ed25519 PeerId).
    pub device: DeviceId,
    /// Its age X25519 recipient (`age1...`).
    pub age_recipient: String,
    /// Revoked by its facility's chain, or by the relay operator.
    pub revoked: bool,
}

/// What a verified chain says: the facility's devices and how far the chain was valid.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ChainState {
    /// Devices in the order added.
    pub devices: Vec<DeviceEntry>,
    /// Valid links (a prefix of what was given).
    pub valid: u32,
    /// The hash of the last valid link.
    pub head: Option<LinkHash>,
    /// Why the first invalid link was refused, if one was.
    pub refused: Option<String>,
}

/// Verifies a facility's device chain against its certificate: the first link adds the root key and
/// is signed by it; each later link follows the one before (sequence and hash) and is signed by a
/// device current at that point. Stops at the first invalid link; what came before stays valid.
pub fn verify_chain(cert: &FacilityCert, links: &[DeviceLink]) -> ChainState {
    verify_chain_with(cert, links, &BTreeMap::new())
}

/// [`verify_chain`], where a device in `cut` signs no link at or past the position it names (a
/// count of links): the chain length this device had verified when it first saw the relay
/// operator revoke that device ([`Pins::revoked_at`]). A stolen laptop the operator revoked thus
/// cannot add a device to its facility's chain after the revocation was seen, even though no link
/// of the chain revokes it yet.
pub fn verify_chain_with(
    cert: &FacilityCert,
    links: &[DeviceLink],
    cut: &BTreeMap<DeviceId, u32>,
) -> ChainState {
    let mut state = ChainState::default();
    let mut prev: Option<&DeviceLink> = None;
    for link in links.iter().take(FACILITY_LINKS_MAX) {
        let refuse =
            |why: String| format!("link {} of facility {}: {why}", link.seq, cert.facility);
        if link.facility != cert.facility {
            state.refused = Some(refuse("it belongs to another facility".into()));
            break;
        }
        if link.seq != prev.map_or(1, |p| p.seq + 1) || link.prev != prev.map(DeviceLink::hash) {
            state.refused = Some(refuse("it does not follow the link before it".into()));
            break;
        }
        if link.verify_signature().is_err() {
            state.refused = Some(refuse("its signature does not verify".into()));
            break;
        }
        let signer_ok = match prev {
            None => link.signer == cert.root,
            Some(_) => state
                .devices
                .iter()
                .any(|d| d.device == link.signer && !d.revoked),
        };
        if !signer_ok {
            state.refused = Some(refuse(format!(
                "it is signed by {}, which is not a current device of the facility",
                link.signer
            )));
            break;
        }
        if cut
            .get(&link.signer)
            .is_some_and(|&n| u64::from(link.seq) > u64::from(n))
        {
            state.refused = Some(refuse(format!(
                "it is signed by {}, which the relay operator revoked before this device saw the link",
                link.signer
            )));
            break;
        }
        match &link.change {
            DeviceChange::Add {
                device,
                age_recipient,
            } => {
                if prev.is_none() && device != &cert.root {
                    state.refused = Some(refuse("the first link must add the root key".into()));
                    break;
                }
                if crypto::parse_recipient(age_recipient).is_err() {
                    state.refused = Some(refuse("the age recipient is not valid".into()));
                    break;
                }
                if state.devices.iter().any(|d| &d.device == device) {
                    state.refused = Some(refuse(format!("{device} is added twice")));
                    break;
                }
                state.devices.push(DeviceEntry {
                    device: *device,
                    age_recipient: age_recipient.clone(),
                    revoked: false,
                });
            }
            DeviceChange::Revoke { device } => {
                let Some(d) = state.devices.iter_mut().find(|d| &d.device == device) else {
                    state.refused = Some(refuse(format!("{device} is not a device of it")));
                    break;
                };
                d.revoked = true;
            }
        }
        state.valid = link.seq;
        state.head = Some(link.hash());
        prev = Some(link);
    }
    if state.refused.is_none() && links.len() > FACILITY_LINKS_MAX {
        state.refused = Some(format!(
            "facility {} has more than {FACILITY_LINKS_MAX} links",
            cert.facility
        ));
    }
    state
}

/// A facility as the relay serves it: the authority's certificate and the device chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityRecord {
    /// The authority's certificate.
    pub cert: FacilityCert,
    /// The device chain, first link first.
    pub links: Vec<DeviceLink>,
}

/// What the relay signs: the certificates and chains it stores, its version and its revocations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryBody {
    /// The deployment.
    pub deployment: DeploymentId,
    /// The authority's key (facilities compare it with the one they pinned at join).
    pub authority: DeviceId,
    /// Grows with every enrolment, approval and revocation.
    pub version: u64,
    /// Facilities in enrolment order.
    pub facilities: Vec<FacilityRecord>,
    /// Devices the relay operator revoked.
    pub revoked_devices: Vec<DeviceId>,
    /// Facilities the relay operator revoked (with every device).
    pub revoked_facilities: Vec<FacilityId>,
}

impl DirectoryBody {
    /// Adds what `seen` (records verified before) has that this body lacks: a facility it leaves
    /// out, and the longer chain of a facility whose served chain is a prefix of the one seen (a
    /// relay put back to an older copy). A chain that differs, or another certificate, stays as
    /// served, for verification to report ([`Trust::ChainForked`], [`Trust::RootChanged`]).
    pub fn add_seen(&mut self, seen: &[FacilityRecord]) {
        for old in seen {
            match self
                .facilities
                .iter_mut()
                .find(|f| f.cert.facility == old.cert.facility)
            {
                None => {
                    if self.facilities.len() < DIRECTORY_FACILITIES_MAX {
                        self.facilities.push(old.clone());
                    }
                }
                Some(f) => {
                    if f.cert == old.cert
                        && old.links.len() > f.links.len()
                        && old.links.starts_with(&f.links)
                    {
                        f.links = old.links.clone();
                    }
                }
            }
        }
    }
}

/// A [`DirectoryBody`] signed by the relay's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDirectory {
    /// CBOR of [`DirectoryBody`].
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
    /// The directory names another authority than the one pinned at join.
    #[error("the directory names the authority {got}, but this facility pinned {expected} at join")]
    WrongAuthority {
        /// The pinned authority (device id text).
        expected: String,
        /// The one named (device id text).
        got: String,
    },
    /// The directory is for another deployment.
    #[error("the directory is for deployment {got}, not {expected}")]
    WrongDeployment {
        /// The enrolled deployment.
        expected: String,
        /// The one named.
        got: String,
    },
    /// A facility certificate does not verify.
    #[error("the certificate of facility {facility} is refused: {reason}")]
    Certificate {
        /// The facility id (text).
        facility: String,
        /// What is wrong.
        reason: String,
    },
    /// The relay's signature does not verify.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The body is not a directory, or is over a limit.
    #[error("malformed directory: {0}")]
    Malformed(String),
}

/// How far a facility is trusted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum Trust {
    /// Certified by the pinned authority with the pinned root key; its chain extends what was seen.
    Verified,
    /// The authority certified another root key than the one pinned: its devices get no key until a
    /// person compares the new safety number and confirms ([`Pins::confirm_root`]).
    RootChanged {
        /// The safety number of the pinned root key.
        pinned: String,
    },
    /// The relay served a chain that does not extend the one seen before (shorter, or different):
    /// what was seen stays, nothing new is taken.
    ChainForked {
        /// Why.
        reason: String,
    },
}

/// One facility of the verified directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityEntry {
    /// Facility id.
    pub id: FacilityId,
    /// Its name as the authority certified it.
    pub name: String,
    /// What kind of facility it is.
    pub role: FacilityRole,
    /// Revoked by the relay operator.
    pub revoked: bool,
    /// Its root key (the certificate's).
    pub root: DeviceId,
    /// The safety number of its root key.
    pub safety_number: String,
    /// How far it is trusted.
    pub trust: Trust,
    /// Its devices (revoked ones included, marked).
    pub devices: Vec<DeviceEntry>,
    /// Chain links the relay served that were refused, with the reason.
    pub refused: Vec<String>,
    /// The check value of the pseudonym keys its certificate names, if it names one.
    #[serde(default)]
    pub pseudonym_check: Option<serde_bytes::ByteArray<32>>,
}

impl FacilityEntry {
    /// The devices that may currently read and write: not revoked, of a facility not revoked and
    /// trusted ([`Trust::Verified`]).
    pub fn current_devices(&self) -> impl Iterator<Item = &DeviceEntry> {
        let ok = !self.revoked && self.trust == Trust::Verified;
        self.devices.iter().filter(move |d| ok && !d.revoked)
    }
}

/// Something the relay listed that the verification left out, with the reason (shown to people).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ignored {
    /// The facility id the relay gave.
    pub facility: FacilityId,
    /// The name the relay gave.
    pub name: String,
    /// Why it was left out.
    pub reason: String,
}

/// The deployment's directory as this device verified it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// The deployment.
    pub deployment: DeploymentId,
    /// The pinned authority.
    pub authority: DeviceId,
    /// The relay's version of what it served.
    pub version: u64,
    /// Facilities whose certificate verifies, in the relay's order.
    pub facilities: Vec<FacilityEntry>,
    /// Facilities the relay listed without a valid certificate.
    pub ignored: Vec<Ignored>,
}

/// A device as a [`Directory`] knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Not listed by any verified chain.
    Unknown,
    /// Added by a verified chain of this facility, and neither revoked nor of a facility that is
    /// revoked or not trusted.
    Current(FacilityId),
    /// Added by a verified chain of this facility once, but revoked since (or its facility was
    /// revoked, or is not trusted now). Its earlier work stays valid; it may do nothing new.
    Former(FacilityId),
}

impl DeviceStatus {
    /// The facility of a current device.
    pub fn current(self) -> Option<FacilityId> {
        match self {
            DeviceStatus::Current(f) => Some(f),
            _ => None,
        }
    }

    /// The facility of a device that was ever certified (current or former).
    pub fn ever(self) -> Option<FacilityId> {
        match self {
            DeviceStatus::Current(f) | DeviceStatus::Former(f) => Some(f),
            DeviceStatus::Unknown => None,
        }
    }
}

/// A facility as a [`Directory`] knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FacilityStatus {
    /// No valid certificate.
    Unknown,
    /// Certified, trusted and not revoked, with its role.
    Current(FacilityRole),
    /// Certified once, but revoked or not trusted now.
    Former(FacilityRole),
}

impl FacilityStatus {
    /// The role of a facility certified now or once (`None`: never certified).
    pub fn ever(self) -> Option<FacilityRole> {
        match self {
            FacilityStatus::Current(r) | FacilityStatus::Former(r) => Some(r),
            FacilityStatus::Unknown => None,
        }
    }
}

/// Who is who, as the membership and admission rules ask it (implemented by [`Directory`] at the
/// facilities and by the relay's tables).
pub trait Devices {
    /// A device's status.
    fn device_status(&self, device: &DeviceId) -> DeviceStatus;
    /// A facility's status.
    fn facility_status(&self, facility: FacilityId) -> FacilityStatus;
    /// How many operations `doc`'s chain had when this party learned that `device` was revoked
    /// (`None`: it has no such record, as the relay, or a device that learned of the revocation
    /// before it knew the document). An operation by `device` at that position or later was signed,
    /// or spliced in by a relay, after this party knew it was revoked.
    fn revocation_learned(&self, _device: &DeviceId, _doc: DocumentId) -> Option<u32> {
        None
    }
    /// A certified, trusted facility that is not revoked, with its role; `None` otherwise.
    fn current_facility(&self, facility: FacilityId) -> Option<FacilityRole> {
        match self.facility_status(facility) {
            FacilityStatus::Current(role) => Some(role),
            _ => None,
        }
    }
}

impl Devices for Directory {
    fn device_status(&self, device: &DeviceId) -> DeviceStatus {
        match self.device(device) {
            None => DeviceStatus::Unknown,
            Some((f, d)) => {
                if f.revoked || d.revoked || f.trust != Trust::Verified {
                    DeviceStatus::Former(f.id)
                } else {
                    DeviceStatus::Current(f.id)
                }
            }
        }
    }

    fn facility_status(&self, facility: FacilityId) -> FacilityStatus {
        match self.facility(facility) {
            None => FacilityStatus::Unknown,
            Some(f) if !f.revoked && f.trust == Trust::Verified => FacilityStatus::Current(f.role),
            Some(f) => FacilityStatus::Former(f.role),
        }
    }
}

impl Directory {
    /// This directory with what `earlier` (the view held before it) showed and it does not: nothing a
    /// relay serves later takes away what was verified, only revocations do (DESIGN "Trust roots").
    ///
    /// - A facility this directory leaves out (a relay put back to an older copy, or one that lies)
    ///   is kept as it was.
    /// - A facility whose chain is [`Trust::ChainForked`] keeps the devices seen before.
    /// - A device seen before in a facility's chain that this one does not list is kept: as it was
    ///   while the facility is not trusted, revoked once a verified chain under another root key (a
    ///   person confirmed it) replaced the old chain.
    /// - `pins`' revocations apply to everything kept.
    pub fn merged(mut self, earlier: &Directory, pins: &Pins) -> Directory {
        for old in &earlier.facilities {
            match self.facilities.iter_mut().find(|f| f.id == old.id) {
                None => self.facilities.push(old.clone()),
                Some(f) => {
                    if matches!(f.trust, Trust::ChainForked { .. }) {
                        f.devices = old.devices.clone();
                    }
                    // A verified chain extends the one seen before, so a device it lacks is of
                    // a chain under an earlier root key: that chain is over.
                    let replaced = f.trust == Trust::Verified;
                    for d in &old.devices {
                        if !f.devices.iter().any(|n| n.device == d.device) {
                            let mut d = d.clone();
                            d.revoked |= replaced;
                            f.devices.push(d);
                        }
                    }
                }
            }
        }
        for f in &mut self.facilities {
            f.revoked |= pins.revoked_facilities.contains(&f.id);
            for d in &mut f.devices {
                d.revoked |= pins.revoked_devices.contains(&d.device);
            }
        }
        self
    }

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

    /// Whether a device is a current device (verified chain, not revoked, trusted facility).
    pub fn is_current(&self, device: &DeviceId) -> bool {
        self.device_status(device).current().is_some()
    }
}

/// What a facility device remembers between directories: the roots it pinned, how far it saw each
/// chain, and every revocation it saw (revocations are never taken back).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    /// Root key pinned per facility (at first sight, or confirmed by a person).
    pub roots: BTreeMap<FacilityId, DeviceId>,
    /// Per facility: how many links were seen valid, and the hash of the last.
    pub chains: BTreeMap<FacilityId, (u32, LinkHash)>,
    /// Devices the relay operator revoked, as seen in any directory.
    pub revoked_devices: BTreeSet<DeviceId>,
    /// Facilities the relay operator revoked.
    pub revoked_facilities: BTreeSet<FacilityId>,
    /// The highest directory version accepted.
    pub version: u64,
    /// Per device the operator revoked: how many links of its facility's chain this device had
    /// verified when it first saw the revocation. Links that device signs past that count are
    /// refused ([`verify_chain_with`]). Devices first seen revoked in a facility not yet pinned
    /// have no entry (the served chain is taken at first sight, as roots are).
    #[serde(default)]
    pub revoked_at: BTreeMap<DeviceId, u32>,
}

impl Pins {
    /// Accepts a new root key for `facility` after a person compared its safety number: its chain
    /// is then seen afresh.
    pub fn confirm_root(&mut self, facility: FacilityId, root: DeviceId) {
        self.roots.insert(facility, root);
        self.chains.remove(&facility);
    }
}

impl SignedDirectory {
    /// Signs a directory body with the relay's key.
    pub fn sign(body: &DirectoryBody, relay: &DeviceSecrets) -> Self {
        let body = cbor(body);
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
    pub fn claimed_version(&self) -> Option<u64> {
        #[derive(Deserialize)]
        struct Version {
            version: u64,
        }
        ciborium::from_reader::<Version, _>(self.body.as_slice())
            .ok()
            .map(|v| v.version)
    }

    /// Decodes the body after checking the relay's signature (nothing else is checked).
    ///
    /// Errors: [`DirectoryError::WrongRelay`], a bad signature, a malformed body.
    pub fn open(&self, expected_relay: &DeviceId) -> Result<DirectoryBody, DirectoryError> {
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
        let body: DirectoryBody = ciborium::from_reader(self.body.as_slice())
            .map_err(|e| DirectoryError::Malformed(e.to_string()))?;
        if body.facilities.len() > DIRECTORY_FACILITIES_MAX
            || body.revoked_devices.len() > REVOCATIONS_MAX
            || body.revoked_facilities.len() > REVOCATIONS_MAX
        {
            return Err(DirectoryError::Malformed(
                "more facilities or revocations than allowed".into(),
            ));
        }
        Ok(body)
    }

    /// Verifies a directory from `relay` against the `authority` pinned at join and this device's
    /// `pins`, and returns the verified view with the pins it implies (the caller stores both).
    ///
    /// - A facility whose certificate does not verify is left out ([`Directory::ignored`]).
    /// - A facility whose root key differs from the pinned one is [`Trust::RootChanged`].
    /// - A chain that does not extend the one seen before is [`Trust::ChainForked`]; otherwise its
    ///   valid prefix counts and links beyond it are reported in [`FacilityEntry::refused`].
    /// - Revocations are the union of the relay's and every earlier one.
    ///
    /// Errors: the relay's signature, another deployment or authority, a malformed body.
    pub fn verify(
        &self,
        relay: &DeviceId,
        deployment: DeploymentId,
        authority: &DeviceId,
        pins: &Pins,
    ) -> Result<(Directory, Pins), DirectoryError> {
        self.open(relay)?.verify(deployment, authority, pins)
    }
}

impl DirectoryBody {
    /// [`SignedDirectory::verify`] of a body already opened (the relay's signature checked), for
    /// example after [`DirectoryBody::add_seen`].
    ///
    /// Errors: another deployment or authority.
    pub fn verify(
        self,
        deployment: DeploymentId,
        authority: &DeviceId,
        pins: &Pins,
    ) -> Result<(Directory, Pins), DirectoryError> {
        let body = self;
        if body.deployment != deployment {
            return Err(DirectoryError::WrongDeployment {
                expected: deployment.to_string(),
                got: body.deployment.to_string(),
            });
        }
        if &body.authority != authority {
            return Err(DirectoryError::WrongAuthority {
                expected: authority.to_string(),
                got: body.authority.to_string(),
            });
        }
        let mut next = pins.clone();
        next.version = next.version.max(body.version);
        next.revoked_devices
            .extend(body.revoked_devices.iter().copied());
        // Where each revoked device's facility chain stood, as far as this device verified it,
        // for every revocation that has no such mark yet: taken only from a facility whose served
        // chain starts with exactly the links verified before (its pinned head), and only when
        // that facility's own verified chain adds the device (a record listing the device in
        // another facility's chain, or in links that do not verify, counts for nothing).
        let unmarked: BTreeSet<DeviceId> = next
            .revoked_devices
            .iter()
            .filter(|d| !next.revoked_at.contains_key(d))
            .copied()
            .collect();
        if !unmarked.is_empty() {
            let mut by_record: BTreeMap<usize, Vec<DeviceId>> = BTreeMap::new();
            for (i, rec) in body.facilities.iter().enumerate() {
                for l in &rec.links {
                    if let DeviceChange::Add { device, .. } = &l.change
                        && unmarked.contains(device)
                    {
                        by_record.entry(i).or_default().push(*device);
                    }
                }
            }
            for (i, candidates) in by_record {
                let rec = &body.facilities[i];
                let Some(&(n, head)) = next.chains.get(&rec.cert.facility) else {
                    continue;
                };
                if n == 0 || rec.links.get(n as usize - 1).map(DeviceLink::hash) != Some(head) {
                    continue;
                }
                let state = verify_chain(&rec.cert, &rec.links);
                for d in candidates {
                    if state.devices.iter().any(|x| x.device == d) {
                        next.revoked_at.entry(d).or_insert(n);
                    }
                }
            }
        }
        next.revoked_facilities
            .extend(body.revoked_facilities.iter().copied());
        let mut dir = Directory {
            deployment,
            authority: *authority,
            version: body.version,
            facilities: Vec::with_capacity(body.facilities.len()),
            ignored: Vec::new(),
        };
        let mut seen = BTreeSet::new();
        for rec in body.facilities {
            let cert = &rec.cert;
            if !seen.insert(cert.facility) {
                dir.ignored.push(Ignored {
                    facility: cert.facility,
                    name: cert.name.clone(),
                    reason: "the relay lists this facility twice".into(),
                });
                continue;
            }
            if let Err(e) = cert.verify(authority, deployment) {
                dir.ignored.push(Ignored {
                    facility: cert.facility,
                    name: cert.name.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
            let pinned_root = *next.roots.entry(cert.facility).or_insert(cert.root);
            let chain = verify_chain_with(cert, &rec.links, &next.revoked_at);
            let mut refused: Vec<String> = chain.refused.iter().cloned().collect();
            let trust = if pinned_root != cert.root {
                Trust::RootChanged {
                    pinned: safety_number(cert.facility, &pinned_root),
                }
            } else {
                match next.chains.get(&cert.facility) {
                    Some(&(n, _)) if n > chain.valid => Trust::ChainForked {
                        reason: format!(
                            "the relay served {} valid link(s) of its device chain, fewer than the {n} seen before",
                            chain.valid
                        ),
                    },
                    Some(&(n, seen))
                        if n > 0
                            && rec.links.get(n as usize - 1).map(DeviceLink::hash) != Some(seen) =>
                    {
                        Trust::ChainForked {
                            reason: "the relay served a device chain that differs from the one seen before"
                                .into(),
                        }
                    }
                    _ => Trust::Verified,
                }
            };
            if trust == Trust::Verified
                && let Some(head) = chain.head
            {
                next.chains.insert(cert.facility, (chain.valid, head));
            }
            let mut devices = chain.devices;
            for d in &mut devices {
                if next.revoked_devices.contains(&d.device) {
                    d.revoked = true;
                }
            }
            if let Trust::ChainForked { reason } = &trust {
                refused.push(reason.clone());
            }
            dir.facilities.push(FacilityEntry {
                id: cert.facility,
                name: cert.name.clone(),
                role: cert.role,
                revoked: next.revoked_facilities.contains(&cert.facility),
                root: cert.root,
                safety_number: cert.safety_number(),
                trust,
                devices,
                refused,
                pseudonym_check: cert.pseudonym_check,
            });
        }
        Ok((dir, next))
    }
}

/// A safety number: 30 decimal digits in six groups of five, from the BLAKE3 hash of the facility id
/// and its root key (as Signal shows one per contact). Two facilities read it to each other by phone.
pub fn safety_number(facility: FacilityId, root: &DeviceId) -> String {
    let mut h = blake3::Hasher::new_derive_key("musubi safety number v1");
    h.update(facility.0.as_bytes());
    h.update(&root.0.to_bytes());
    digits(h.finalize().as_bytes())
}

/// The authority's fingerprint, in the same 30-digit form as [`safety_number`]: what an invite shows
/// so the person joining can compare it with the one the municipality published.
pub fn authority_fingerprint(authority: &DeviceId) -> String {
    let mut h = blake3::Hasher::new_derive_key("musubi authority fingerprint v1");
    h.update(&authority.0.to_bytes());
    digits(h.finalize().as_bytes())
}

fn digits(hash: &[u8; 32]) -> String {
    hash.chunks(5)
        .take(6)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u8) -> DeviceSecrets {
        DeviceSecrets::from_seeds([n; 32], [n.wrapping_add(100); 32])
    }

    struct Fixture {
        authority: DeviceSecrets,
        relay: DeviceSecrets,
        deployment: DeploymentId,
        facility: FacilityId,
        root: DeviceSecrets,
        cert: FacilityCert,
        links: Vec<DeviceLink>,
    }

    fn fixture() -> Fixture {
        let authority = dev(1);
        let root = dev(2);
        let deployment = DeploymentId::from_random_bytes([9; 16]);
        let facility = FacilityId::from_random_bytes([3; 16]);
        let cert = FacilityCert::sign(
            &authority,
            deployment,
            facility,
            "港診療所",
            FacilityRole::Clinic,
            root.device_id(),
            1,
        );
        let links = vec![DeviceLink::genesis(&root, facility, 1)];
        Fixture {
            authority,
            relay: dev(4),
            deployment,
            facility,
            root,
            cert,
            links,
        }
    }

    impl Fixture {
        fn signed(&self, version: u64, revoked: Vec<DeviceId>) -> SignedDirectory {
            SignedDirectory::sign(
                &DirectoryBody {
                    deployment: self.deployment,
                    authority: self.authority.device_id(),
                    version,
                    facilities: vec![FacilityRecord {
                        cert: self.cert.clone(),
                        links: self.links.clone(),
                    }],
                    revoked_devices: revoked,
                    revoked_facilities: vec![],
                },
                &self.relay,
            )
        }

        fn verify(&self, s: &SignedDirectory, pins: &Pins) -> (Directory, Pins) {
            s.verify(
                &self.relay.device_id(),
                self.deployment,
                &self.authority.device_id(),
                pins,
            )
            .expect("verifies")
        }

        fn add(&mut self, by: &DeviceSecrets, new: &DeviceSecrets) {
            let p = new.public();
            let link = DeviceLink::sign(
                by,
                self.facility,
                self.links.last(),
                DeviceChange::Add {
                    device: p.device,
                    age_recipient: p.age_recipient,
                },
                2,
            );
            self.links.push(link);
        }
    }

    #[test]
    fn a_chain_adds_devices_signed_by_current_devices_only() {
        let mut f = fixture();
        let second = dev(5);
        let root = f.root.clone();
        f.add(&root, &second);
        let state = verify_chain(&f.cert, &f.links);
        assert_eq!(state.valid, 2);
        assert_eq!(state.devices.len(), 2);
        assert!(state.refused.is_none());

        // A stranger signs a third link: refused, the first two stay.
        let stranger = dev(6);
        f.add(&stranger.clone(), &stranger);
        let state = verify_chain(&f.cert, &f.links);
        assert_eq!(state.valid, 2);
        assert!(
            state
                .refused
                .as_deref()
                .is_some_and(|r| r.contains("not a current device"))
        );

        // A revoked device may not sign.
        let mut f = fixture();
        f.add(&root, &second);
        let revoke = DeviceLink::sign(
            &root,
            f.facility,
            f.links.last(),
            DeviceChange::Revoke {
                device: second.device_id(),
            },
            3,
        );
        f.links.push(revoke);
        f.add(&second, &dev(7));
        let state = verify_chain(&f.cert, &f.links);
        assert_eq!(
            state.valid, 3,
            "the revocation is valid, the link after it is not"
        );
        assert!(state.devices[1].revoked);
    }

    #[test]
    fn the_first_link_must_be_the_root_adding_itself() {
        let f = fixture();
        let other = dev(8);
        let forged = DeviceLink::genesis(&other, f.facility, 1);
        let state = verify_chain(&f.cert, &[forged]);
        assert_eq!(state.valid, 0);
        assert!(state.devices.is_empty());
    }

    #[test]
    fn a_certificate_by_another_authority_is_ignored() {
        let mut f = fixture();
        f.cert = FacilityCert::sign(
            &dev(30),
            f.deployment,
            f.facility,
            "偽の本部",
            FacilityRole::Hq,
            f.root.device_id(),
            1,
        );
        let (dir, _) = f.verify(&f.signed(2, vec![]), &Pins::default());
        assert!(dir.facilities.is_empty());
        assert_eq!(dir.ignored.len(), 1);
        assert!(dir.ignored[0].reason.contains("another authority"));
    }

    #[test]
    fn a_changed_root_key_is_shown_and_trusted_only_after_confirmation() {
        let f = fixture();
        let (dir, pins) = f.verify(&f.signed(2, vec![]), &Pins::default());
        assert_eq!(dir.facilities[0].trust, Trust::Verified);
        assert!(dir.is_current(&f.root.device_id()));

        let mut g = fixture();
        let new_root = dev(40);
        g.cert = FacilityCert::sign(
            &g.authority,
            g.deployment,
            g.facility,
            "港診療所",
            FacilityRole::Clinic,
            new_root.device_id(),
            5,
        );
        g.links = vec![DeviceLink::genesis(&new_root, g.facility, 5)];
        let (dir, pins2) = g.verify(&g.signed(3, vec![]), &pins);
        assert!(matches!(dir.facilities[0].trust, Trust::RootChanged { .. }));
        assert!(!dir.is_current(&new_root.device_id()));
        assert_eq!(dir.current_facility(g.facility), None);

        let mut confirmed = pins2;
        confirmed.confirm_root(g.facility, new_root.device_id());
        let (dir, _) = g.verify(&g.signed(3, vec![]), &confirmed);
        assert_eq!(dir.facilities[0].trust, Trust::Verified);
        assert!(dir.is_current(&new_root.device_id()));
    }

    #[test]
    fn a_shorter_chain_or_an_undone_revocation_is_not_taken() {
        let mut f = fixture();
        let second = dev(5);
        let root = f.root.clone();
        f.add(&root, &second);
        let (_, pins) = f.verify(&f.signed(2, vec![second.device_id()]), &Pins::default());
        // The relay later serves the chain cut back to its first link, and no revocation.
        let mut g = fixture();
        g.links.truncate(1);
        let (dir, pins2) = g.verify(&g.signed(3, vec![]), &pins);
        assert!(matches!(dir.facilities[0].trust, Trust::ChainForked { .. }));
        assert!(
            pins2.revoked_devices.contains(&second.device_id()),
            "a revocation once seen stays"
        );
    }

    #[test]
    fn a_directory_served_later_takes_away_nothing_seen_before() {
        let mut f = fixture();
        let second = dev(5);
        let root = f.root.clone();
        f.add(&root, &second);
        let first = f.signed(2, vec![]);
        let seen = first.open(&f.relay.device_id()).expect("opens").facilities;
        let (earlier, pins) = f.verify(&first, &Pins::default());
        assert!(earlier.is_current(&second.device_id()));

        // A relay put back to an older copy serves the chain before `second` was added, and then
        // a directory that leaves the facility out altogether.
        let mut older = fixture();
        older.links.truncate(1);
        let mut none = older
            .signed(3, vec![])
            .open(&f.relay.device_id())
            .expect("opens");
        none.facilities.clear();
        for body in [
            older
                .signed(3, vec![])
                .open(&f.relay.device_id())
                .expect("opens"),
            none,
        ] {
            let mut body = body;
            body.add_seen(&seen);
            let (dir, next) = body
                .verify(f.deployment, &f.authority.device_id(), &pins)
                .expect("verifies");
            let dir = dir.merged(&earlier, &next);
            assert_eq!(
                dir.facility(f.facility).map(|e| e.trust.clone()),
                Some(Trust::Verified)
            );
            assert!(
                dir.is_current(&second.device_id()) && dir.is_current(&root.device_id()),
                "both devices seen before are still current"
            );
        }

        // A revocation served later applies to what was kept.
        let mut body = f
            .signed(4, vec![second.device_id()])
            .open(&f.relay.device_id())
            .expect("opens");
        body.facilities.clear();
        body.add_seen(&seen);
        let (dir, next) = body
            .verify(f.deployment, &f.authority.device_id(), &pins)
            .expect("verifies");
        let dir = dir.merged(&earlier, &next);
        assert!(!dir.is_current(&second.device_id()), "the revocation holds");
        assert!(dir.is_current(&root.device_id()));
    }

    #[test]
    fn a_laptop_the_operator_revoked_adds_no_device_after_the_revocation_was_seen() {
        let mut f = fixture();
        let laptop = dev(5);
        let root = f.root.clone();
        f.add(&root, &laptop);
        let (_, pins) = f.verify(&f.signed(2, vec![]), &Pins::default());

        // The operator revokes the stolen laptop; the relay (or the operator, holding the laptop)
        // serves, with that revocation, a link the laptop signed adding a device of its own.
        let evil = dev(6);
        f.add(&laptop, &evil);
        let (dir, next) = f.verify(&f.signed(3, vec![laptop.device_id()]), &pins);
        assert_eq!(next.revoked_at.get(&laptop.device_id()), Some(&2));
        assert!(
            !dir.is_current(&evil.device_id()),
            "the thief's device is not enrolled"
        );
        assert!(!dir.is_current(&laptop.device_id()));
        assert!(dir.is_current(&root.device_id()));
        assert!(
            dir.facilities[0]
                .refused
                .iter()
                .any(|r| r.contains("relay operator revoked")),
            "{:?}",
            dir.facilities[0].refused
        );

        // Served later, after the revocation was seen, it is refused all the same.
        let (dir, _) = f.verify(&f.signed(4, vec![laptop.device_id()]), &next);
        assert!(!dir.is_current(&evil.device_id()));
        // A link by a current device extends the chain as before.
        let mut g = fixture();
        g.add(&root, &laptop);
        let fresh = dev(7);
        g.add(&root, &fresh);
        let (dir, _) = g.verify(&g.signed(5, vec![laptop.device_id()]), &next);
        assert!(dir.is_current(&fresh.device_id()));
    }

    #[test]
    fn the_mark_of_an_operator_revocation_comes_from_the_facility_that_verified_the_device() {
        let mut f = fixture();
        let laptop = dev(5);
        let root = f.root.clone();
        f.add(&root, &laptop);
        // Another facility Z, with a longer chain, pinned alongside.
        let zroot = dev(20);
        let zid = FacilityId::from_random_bytes([21; 16]);
        let zcert = FacilityCert::sign(
            &f.authority,
            f.deployment,
            zid,
            "山手クリニック",
            FacilityRole::Clinic,
            zroot.device_id(),
            1,
        );
        let mut zlinks = vec![DeviceLink::genesis(&zroot, zid, 1)];
        for n in 22..26 {
            let p = dev(n).public();
            let link = DeviceLink::sign(
                &zroot,
                zid,
                zlinks.last(),
                DeviceChange::Add {
                    device: p.device,
                    age_recipient: p.age_recipient,
                },
                2,
            );
            zlinks.push(link);
        }
        let body = |f: &Fixture, z: &[DeviceLink], version: u64, revoked: Vec<DeviceId>| {
            SignedDirectory::sign(
                &DirectoryBody {
                    deployment: f.deployment,
                    authority: f.authority.device_id(),
                    version,
                    facilities: vec![
                        FacilityRecord {
                            cert: zcert.clone(),
                            links: z.to_vec(),
                        },
                        FacilityRecord {
                            cert: f.cert.clone(),
                            links: f.links.clone(),
                        },
                    ],
                    revoked_devices: revoked,
                    revoked_facilities: vec![],
                },
                &f.relay,
            )
        };
        let (_, pins) = f.verify(&body(&f, &zlinks, 2, vec![]), &Pins::default());
        assert_eq!(pins.chains.get(&zid).map(|c| c.0), Some(5));

        // The relay lists Z first, with a link of its own adding the laptop (it does not verify),
        // so that Z's longer chain would set the laptop's mark; and serves the laptop's link.
        let mut decoy = zlinks.clone();
        let lp = laptop.public();
        decoy.push(DeviceLink::sign(
            &laptop,
            zid,
            decoy.last(),
            DeviceChange::Add {
                device: lp.device,
                age_recipient: lp.age_recipient,
            },
            3,
        ));
        let evil = dev(6);
        f.add(&laptop, &evil);
        let (dir, next) = f.verify(&body(&f, &decoy, 3, vec![laptop.device_id()]), &pins);
        assert_eq!(
            next.revoked_at.get(&laptop.device_id()),
            Some(&2),
            "the mark is where the clinic's own chain stood"
        );
        assert!(!dir.is_current(&evil.device_id()));

        // A revocation seen before marks existed (an older version of this device) gets its mark
        // from the pinned chain at the next directory.
        let mut old = pins.clone();
        old.revoked_devices.insert(laptop.device_id());
        let (dir, next) = f.verify(&body(&f, &zlinks, 4, vec![laptop.device_id()]), &old);
        assert_eq!(next.revoked_at.get(&laptop.device_id()), Some(&2));
        assert!(!dir.is_current(&evil.device_id()));
    }

    #[test]
    fn safety_numbers_are_thirty_digits_and_differ_per_key() {
        let f = fixture();
        let a = f.cert.safety_number();
        assert_eq!(a.len(), 35);
        assert!(
            a.split(' ')
                .all(|g| g.len() == 5 && g.chars().all(|c| c.is_ascii_digit()))
        );
        assert_ne!(a, safety_number(f.facility, &dev(77).device_id()));
        assert_ne!(
            authority_fingerprint(&f.authority.device_id()),
            authority_fingerprint(&dev(78).device_id())
        );
    }

    #[test]
    fn the_claimed_version_is_read_without_the_signature() {
        let f = fixture();
        let mut signed = f.signed(7, vec![]);
        assert_eq!(signed.claimed_version(), Some(7));
        signed.body = b"not a directory".to_vec();
        assert_eq!(signed.claimed_version(), None);
    }
}
