//! Two facilities of one deployment in-process: each a real enrolled [`Engine`] whose directory
//! lists both (certified by an in-process authority, signed by a stand-in relay key), and a way to carry what one holds of a document to
//! the other, as the relay or a USB stick would (`export_items` → `import_items`), then run the
//! same after-sync step as the sync driver.

use std::path::Path;

use musubi_crdt::ids::{DocumentId, FacilityId, FacilityRole};
use musubi_facility::Engine;
use musubi_facility::engine::ImportReport;
use musubi_facility::offline::OfflineDeployment;
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

/// Two facilities (`a`, `b`) in one deployment, each with one device in `root`, certified by an
/// in-process authority.
pub fn pair(root: &Path, a: (&str, FacilityRole), b: (&str, FacilityRole)) -> (Site, Site) {
    let mut deployment = OfflineDeployment::new(9);
    let engines: Vec<(Engine, &str, FacilityRole)> = [a, b]
        .iter()
        .map(|(name, role)| {
            (
                Engine::init(&root.join(name), name, "correct horse battery", 10)
                    .expect("init a device"),
                *name,
                *role,
            )
        })
        .collect();
    let ids: Vec<FacilityId> = engines
        .iter()
        .map(|(e, name, role)| deployment.add_facility(e, name, *role))
        .collect();
    let mut sites = engines
        .into_iter()
        .zip(ids)
        .map(|((engine, name, _), facility)| {
            deployment
                .enrol(&engine, facility)
                .expect("record the enrolment");
            Site {
                engine,
                facility,
                name: name.into(),
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
