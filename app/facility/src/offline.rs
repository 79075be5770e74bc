//! An offline deployment: a stand-in authority and relay that certify and enrol devices in process,
//! with no network. For tests, benchmark drivers and tabletop exercises, where a real
//! `musubi-node` would only add waiting; the trust chain is the real one (authority certificate →
//! root device → device links, verified by each engine exactly as after a real join).

use musubi_crdt::crypto::{self, DeviceSecrets};
use musubi_crdt::directory::{
    DeviceChange, DeviceLink, DirectoryBody, FacilityCert, FacilityRecord, SignedDirectory,
};
use musubi_crdt::ids::{DeploymentId, FacilityId, FacilityRole};

use crate::engine::{Engine, Enrolment, Result, now_ms};

/// A deployment whose authority and relay keys live in this process.
pub struct OfflineDeployment {
    authority: DeviceSecrets,
    relay: DeviceSecrets,
    deployment: DeploymentId,
    pseudonym: [u8; 32],
    facilities: Vec<FacilityRecord>,
    revoked: Vec<musubi_crdt::ids::DeviceId>,
    version: u64,
}

impl OfflineDeployment {
    /// A deployment whose keys derive from `seed` (the same seed gives the same deployment).
    pub fn new(seed: u8) -> Self {
        Self {
            authority: DeviceSecrets::from_seeds([seed; 32], [seed ^ 0x55; 32]),
            relay: DeviceSecrets::from_seeds([seed ^ 0xAA; 32], [seed ^ 0x0F; 32]),
            deployment: DeploymentId::from_random_bytes([seed; 16]),
            pseudonym: [seed ^ 0x33; 32],
            facilities: Vec::new(),
            revoked: Vec::new(),
            version: 1,
        }
    }

    /// The authority's keys (to certify something on purpose, e.g. a changed root key).
    pub fn authority(&self) -> &DeviceSecrets {
        &self.authority
    }

    /// The deployment id.
    pub fn deployment(&self) -> DeploymentId {
        self.deployment
    }

    /// Certifies a new facility `name` of `role` whose root is `root`'s device, and adds the device
    /// (the first link, signed by itself). Returns the facility's id.
    pub fn add_facility(&mut self, root: &Engine, name: &str, role: FacilityRole) -> FacilityId {
        let facility = FacilityId::from_random_bytes(
            blake3::derive_key("musubi offline facility", name.as_bytes())[..16]
                .try_into()
                .expect("16 bytes"),
        );
        let cert = FacilityCert::sign(
            &self.authority,
            self.deployment,
            facility,
            name,
            role,
            root.device_id(),
            now_ms(),
        )
        .with_pseudonym_check(
            &self.authority,
            crypto::PseudonymKeys::for_role(&self.pseudonym, role).check(),
        );
        let genesis = DeviceLink::genesis(root.secrets(), facility, now_ms());
        self.facilities.push(FacilityRecord {
            cert,
            links: vec![genesis],
        });
        self.version += 1;
        facility
    }

    /// Adds `device`'s device to `facility`, signed by `by`, a current device of it.
    pub fn add_device(&mut self, facility: FacilityId, by: &Engine, device: &Engine) {
        let rec = self
            .facilities
            .iter_mut()
            .find(|f| f.cert.facility == facility)
            .expect("a facility of this deployment");
        let p = device.secrets().public();
        let link = DeviceLink::sign(
            by.secrets(),
            facility,
            rec.links.last(),
            DeviceChange::Add {
                device: p.device,
                age_recipient: p.age_recipient,
            },
            now_ms(),
        );
        rec.links.push(link);
        self.version += 1;
    }

    /// The operator revokes a device.
    pub fn revoke(&mut self, device: musubi_crdt::ids::DeviceId) {
        self.revoked.push(device);
        self.version += 1;
    }

    /// The directory as the stand-in relay signs it now.
    pub fn signed(&self) -> SignedDirectory {
        SignedDirectory::sign(
            &DirectoryBody {
                deployment: self.deployment,
                authority: self.authority.device_id(),
                version: self.version,
                facilities: self.facilities.clone(),
                revoked_devices: self.revoked.clone(),
                revoked_facilities: vec![],
            },
            &self.relay,
        )
    }

    /// Records `engine`'s enrolment as a device of `facility`, as a real join would (the directory
    /// verified against the authority, the pseudonym keys of its role sealed to the device).
    ///
    /// Errors: the engine's, when the directory does not list the device.
    pub fn enrol(&self, engine: &Engine, facility: FacilityId) -> Result<Enrolment> {
        let role = self.record(facility).cert.role;
        let keys = crypto::PseudonymKeys::for_role(&self.pseudonym, role);
        self.enrol_with_keys(engine, facility, &keys.to_plain())
    }

    /// [`OfflineDeployment::enrol`] with `plain` sealed to the device as its pseudonym keys,
    /// whatever they are (what a lying relay, or another device of the facility, could seal).
    ///
    /// Errors: the engine's, when the directory does not list the device or the keys are not the
    /// ones the facility's certificate names.
    pub fn enrol_with_keys(
        &self,
        engine: &Engine,
        facility: FacilityId,
        plain: &[u8],
    ) -> Result<Enrolment> {
        let rec = self.record(facility);
        let recipient = engine.secrets().age_identity().to_public();
        let sealed = crypto::seal_to(&[recipient], plain)?;
        engine.record_enrolment(
            &Enrolment {
                deployment: self.deployment,
                facility,
                facility_name: rec.cert.name.clone(),
                role: rec.cert.role,
                relay: self.relay.device_id(),
                relay_addrs: vec![],
                authority: self.authority.device_id(),
            },
            &self.signed(),
            &sealed,
        )
    }

    fn record(&self, facility: FacilityId) -> &FacilityRecord {
        self.facilities
            .iter()
            .find(|f| f.cert.facility == facility)
            .expect("a facility of this deployment")
    }

    /// Gives `engine` the current directory; returns whether it took it.
    ///
    /// Errors: the engine's.
    pub fn refresh(&self, engine: &Engine) -> Result<bool> {
        engine.update_directory(&self.signed())
    }
}
