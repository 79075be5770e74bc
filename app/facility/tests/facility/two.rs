//! Two facilities of one deployment in-process: each a real enrolled [`Engine`] whose directory
//! lists both (signed by a stand-in relay key), and a way to carry what one holds of a document to
//! the other, as the relay or a USB stick would (`export_items` → `import_items`), then run the
//! same after-sync step as the sync driver.

use std::path::Path;

use musubi_crdt::crypto::DeviceSecrets;
use musubi_crdt::directory::{DeviceEntry, Directory, FacilityEntry, SignedDirectory};
use musubi_crdt::ids::{DeploymentId, DocumentId, FacilityId, FacilityRole};
use musubi_facility::Engine;
use musubi_facility::engine::{Enrolment, ImportReport};
use musubi_facility::services;
use musubi_facility::store::Origin;

/// One facility device of the pair.
pub struct Site {
    /// Its engine.
    pub engine: Engine,
    /// Its facility id.
    pub facility: FacilityId,
    /// Its facility name.
    pub name: String,
}

/// Two facilities (`a`, `b`) in one deployment, each with one device in `root`.
pub fn pair(root: &Path, a: (&str, FacilityRole), b: (&str, FacilityRole)) -> (Site, Site) {
    let relay = DeviceSecrets::from_seeds([7; 32], [8; 32]);
    let deployment = DeploymentId::from_random_bytes([9; 16]);
    let specs = [(a, [11u8; 16]), (b, [12u8; 16])];
    let engines: Vec<Engine> = specs
        .iter()
        .map(|((name, _), _)| {
            Engine::init(&root.join(name), name, "correct horse battery", 10)
                .expect("init a device")
        })
        .collect();
    let directory = Directory {
        deployment,
        version: 2,
        facilities: specs
            .iter()
            .zip(&engines)
            .map(|(((name, role), seed), engine)| {
                let public = engine.secrets().public();
                FacilityEntry {
                    id: FacilityId::from_random_bytes(*seed),
                    name: (*name).into(),
                    role: *role,
                    revoked: false,
                    devices: vec![DeviceEntry {
                        device: public.device,
                        age_recipient: public.age_recipient,
                        revoked: false,
                    }],
                }
            })
            .collect(),
    };
    let signed = SignedDirectory::sign(&directory, &relay);
    let mut sites = specs
        .iter()
        .zip(engines)
        .map(|(((name, role), seed), engine)| {
            let facility = FacilityId::from_random_bytes(*seed);
            let enrolment = Enrolment {
                deployment,
                facility,
                facility_name: (*name).into(),
                role: *role,
                relay: relay.device_id(),
                relay_addrs: vec![],
            };
            engine
                .record_enrolment(&enrolment, &signed)
                .expect("record the enrolment");
            engine
                .store()
                .set_meta("pseudonym_secret", &[5; 32])
                .expect("record the pseudonym secret");
            Site {
                engine,
                facility,
                name: (*name).into(),
            }
        })
        .collect::<Vec<_>>();
    let b = sites.pop().expect("two sites");
    let a = sites.pop().expect("two sites");
    (a, b)
}

/// Carries everything `from` holds of `doc` to `to` and runs the sync driver's after-sync step
/// there (which marks a referral received). Returns what the import did.
pub fn carry(from: &Site, to: &mut Site, doc: DocumentId) -> ImportReport {
    let items = from
        .engine
        .export_items(doc)
        .expect("export the document's items");
    let report = to
        .engine
        .import_items(items, Origin::File, false)
        .expect("import the items");
    assert!(report.refused.is_empty(), "refused: {:?}", report.refused);
    if to.engine.store().document(doc).expect("store").is_some() {
        services::after_sync(&mut to.engine, doc).expect("after sync");
    }
    report
}
