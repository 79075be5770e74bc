//! 監査ログ retention: entries older than the facility's retention leave the disk and the audit
//! document at the next publish, and the chain still verifies from what retention kept; a cut
//! made to look like retention is a break.

use musubi_crdt::audit::AuditAction;
use musubi_crdt::ids::FacilityRole;
use musubi_facility::audit::{self, DEFAULT_RETENTION_DAYS, Filter};
use musubi_facility::engine::now_ms;

use crate::shelter::enrolled;

const DAY_MS: u64 = 86_400_000;

#[test]
fn entries_past_their_retention_leave_the_disk_and_the_document_and_the_rest_verifies() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut e = enrolled(
        &tmp.path().join("clinic"),
        "みなと診療所",
        FacilityRole::Clinic,
    );
    for _ in 0..5 {
        audit::record(&e, AuditAction::Read, None, &["purpose"]).expect("record");
    }
    let now = now_ms();
    let first = audit::publish(&mut e, now, true).expect("publish");
    assert_eq!(
        (first.copied, first.pruned_local, first.pruned_synced),
        (5, 0, 0)
    );
    assert_eq!(
        audit::retention_days(&e).expect("retention"),
        DEFAULT_RETENTION_DAYS
    );
    let chains = audit::verify_all_at(&e, now).expect("verify");
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].result.as_ref().expect("intact").entries, 5);

    // Within the retention nothing goes; a year before it ends, still nothing.
    let later = now + (DEFAULT_RETENTION_DAYS - 365) * DAY_MS;
    assert_eq!(
        audit::publish(&mut e, later, true)
            .expect("publish")
            .pruned_local,
        0
    );

    // Five years and a day later, the five entries go from the disk and from the document.
    let expired = now + (DEFAULT_RETENTION_DAYS + 1) * DAY_MS;
    let gone = audit::publish(&mut e, expired, true).expect("publish");
    assert_eq!((gone.pruned_local, gone.pruned_synced), (5, 5));
    assert!(
        audit::list(&e, &Filter::default())
            .expect("list")
            .is_empty()
    );
    let chains = audit::verify_all_at(&e, expired).expect("verify");
    assert!(chains[0].result.is_ok(), "{:?}", chains[0].result);

    // The next entry chains on from what retention kept.
    audit::record(&e, AuditAction::Read, None, &["purpose"]).expect("record");
    let chains = audit::verify_all_at(&e, expired).expect("verify");
    let kept = chains[0].result.as_ref().expect("intact");
    assert_eq!((kept.first, kept.last), (Some(6), Some(6)));

    // Judged today, the same removal is a cut: entries went before their retention ended.
    let today = audit::verify_all_at(&e, now).expect("verify");
    let broken = today[0].result.as_ref().expect_err("a cut");
    assert!(
        broken.reason.contains("before their retention ended"),
        "{broken}"
    );
}

#[test]
fn an_administrator_sets_the_retention_within_its_bounds() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut e = enrolled(
        &tmp.path().join("clinic"),
        "みなと診療所",
        FacilityRole::Clinic,
    );
    let err = audit::set_retention_days(&mut e, 30).expect_err("a month is too short");
    assert!(err.to_string().contains("365"), "{err}");
    audit::set_retention_days(&mut e, 3_650).expect("ten years");
    assert_eq!(audit::retention_days(&e).expect("retention"), 3_650);
    let set = audit::list(
        &e,
        &Filter {
            action: Some(AuditAction::AuditRead),
            ..Filter::default()
        },
    )
    .expect("list");
    assert!(
        set.iter()
            .any(|r| r.fields.contains(&"retention:3650d".to_owned())),
        "{set:?}"
    );
}
