//! The automerge-paper editing trace (259,778 keystrokes, `../shared/data/editing-traces/`) replayed as
//! edits of one text field (備考, `remarks`) of a referral letter, pushed through a real relay in bundles,
//! then pulled and loaded by a real facility process.
//!
//! Usage: `cargo build --release --workspace --bins && cargo run --release -p musubi-tests --bin bench-trace`
//! Optional arguments: `KEYSTROKES_PER_BUNDLE` (default 1000) and `CHANGE_PER` = `keystroke` (default: one
//! Automerge change per keystroke, as an editor that commits every keystroke) or `bundle` (one change
//! per bundle, as an editor that commits when it syncs).
//!
//! Facility A is a raw client (it writes the Automerge document in this process: one change per keystroke,
//! one bundle per `KEYSTROKES_PER_BUNDLE` keystrokes, pushed as its sync session would batch them);
//! facility B is a `musubi` device that runs `sync --once` and `referral show`. Printed: time of each phase,
//! bytes the relay stores for the document against a plain `Automerge::save()` of it, and peak RSS
//! (`VmHWM`) of the relay, of B's processes and of this process.

use std::fs::File;
use std::io::BufReader;
use std::time::Instant;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc};
use musubi_crdt::bundle::Payload;
use musubi_crdt::documents::referral::{self, ReferralLetter};
use musubi_crdt::ids::{DocumentKind, FacilityId, Role};
use musubi_crdt::limits::{FRAME_BYTES_MAX, PUSH_ITEMS_MAX};
use musubi_crdt::ops::Member;
use musubi_crdt::protocol::{PushItem, PushResult};
use musubi_tests::measure::{human_bytes, run_with_peak, self_vm_hwm_kib, vm_hwm_kib};
use musubi_tests::raw::RawClient;
use musubi_tests::{World, files, shared_data};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Trace {
    #[serde(rename = "startContent")]
    start_content: String,
    #[serde(rename = "endContent")]
    end_content: String,
    txns: Vec<Txn>,
}

#[derive(Deserialize)]
struct Txn {
    patches: Vec<(usize, usize, String)>,
}

fn kib(k: Option<u64>) -> String {
    k.map_or("?".into(), |k| human_bytes(k as f64 * 1024.0))
}

fn main() {
    let per_bundle: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let change_per_keystroke = match std::env::args().nth(2).as_deref() {
        None | Some("keystroke") => true,
        Some("bundle") => false,
        Some(other) => panic!("CHANGE_PER is `keystroke` or `bundle`, not {other:?}"),
    };
    let t = Instant::now();
    let path = shared_data("editing-traces/sequential-automerge-paper.json.gz");
    let trace: Trace = serde_json::from_reader(BufReader::new(flate2::read::GzDecoder::new(
        File::open(&path).expect("open the trace"),
    )))
    .expect("the trace is JSON of the documented format");
    println!(
        "automerge-paper trace: {} keystrokes, final text {} chars (loaded in {:.2} s)",
        trace.txns.len(),
        trace.end_content.chars().count(),
        t.elapsed().as_secs_f64()
    );

    let world = World::new("bench-trace");
    let relay = world.relay();
    let b = world.enrolled_facility(&relay, "trace-b", "トレース受信病院", "clinic");
    let a = RawClient::enrol(&relay, "トレース送信診療所", "clinic");
    let b_id: FacilityId = b.id().parse().expect("facility id");
    let (doc_id, key) = a.create_document(
        DocumentKind::Referral,
        &[Member {
            facility: b_id,
            role: Role::Writer,
        }],
    );

    // Phase 1: replay into Automerge, one change per keystroke, sealing a bundle every `per_bundle`.
    let t = Instant::now();
    let mut doc = AutoCommit::new();
    let letter = ReferralLetter {
        to_facility: "トレース受信病院".into(),
        from_facility: "トレース送信診療所".into(),
        purpose: "automerge-paper editing trace replay".into(),
        remarks: trace.start_content.clone(),
        ..Default::default()
    };
    referral::init(&mut doc, &letter).expect("init the letter");
    doc.commit();
    let remarks = match doc.get(automerge::ROOT, "remarks").expect("get remarks") {
        Some((automerge::Value::Object(automerge::ObjType::Text), id)) => id,
        other => panic!("remarks is not a text object: {other:?}"),
    };
    let mut envelopes = vec![a.seal(
        doc_id,
        &key,
        &Payload::Changes {
            data: doc.save_after(&[]),
        },
    )];
    let mut heads = doc.get_heads();
    let mut changes_bytes = envelopes[0].ciphertext.len();
    for (i, txn) in trace.txns.iter().enumerate() {
        for (pos, del, ins) in &txn.patches {
            doc.splice_text(&remarks, *pos, *del as isize, ins)
                .expect("splice");
        }
        if change_per_keystroke {
            doc.commit();
        }
        if (i + 1) % per_bundle == 0 || i + 1 == trace.txns.len() {
            let data = doc.save_after(&heads);
            heads = doc.get_heads();
            let env = a.seal(doc_id, &key, &Payload::Changes { data });
            changes_bytes += env.ciphertext.len();
            envelopes.push(env);
        }
    }
    let replay = t.elapsed();
    assert_eq!(
        doc.text(&remarks).expect("text"),
        trace.end_content,
        "the replay reproduces the trace's final text"
    );
    let plain_save = doc.save().len();
    let n_bundles = envelopes.len();

    // Phase 2: push, batched as a facility's sync session batches (≤ PUSH_ITEMS_MAX items, ≤ half a frame).
    let t = Instant::now();
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut pushes = 0;
    let mut flush = |batch: &mut Vec<PushItem>| {
        if batch.is_empty() {
            return;
        }
        for r in a.push(std::mem::take(batch)) {
            assert!(matches!(r, PushResult::Accepted { .. }), "refused: {r:?}");
        }
        pushes += 1;
    };
    for env in envelopes {
        let item = PushItem::Bundle { envelope: env };
        let size = item.approx_bytes();
        if batch.len() >= PUSH_ITEMS_MAX || batch_bytes + size > FRAME_BYTES_MAX / 2 {
            flush(&mut batch);
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push(item);
    }
    flush(&mut batch);
    let push = t.elapsed();

    // Phase 3: facility B pulls and loads.
    let (sync_out, sync_peak) = run_with_peak(b.command("sync", &["--once", "--timeout", "1800"]));
    let sync_out_ok = sync_out.clone().expect_ok();
    let (show_out, show_peak) =
        run_with_peak(b.command("referral show", &[&doc_id.to_string(), "--json"]));
    let shown: Value =
        serde_json::from_str(&show_out.clone().expect_ok()).expect("show --json is JSON");
    assert_eq!(
        shown["remarks"].as_str(),
        Some(trace.end_content.as_str()),
        "B reads the trace's final text"
    );

    let stored: Vec<_> = relay
        .stored_bundles()
        .into_iter()
        .filter(|s| s.doc == doc_id.to_string())
        .collect();
    let stored_bytes: usize = stored
        .iter()
        .filter_map(|s| s.envelope.as_ref())
        .map(Vec::len)
        .sum();
    println!(
        "bundles: {n_bundles} ({per_bundle} keystrokes each, one Automerge change per {}), {pushes} push requests",
        if change_per_keystroke {
            "keystroke"
        } else {
            "bundle"
        }
    );
    println!(
        "phase 1 replay + seal at A:         {:>8.2} s",
        replay.as_secs_f64()
    );
    println!(
        "phase 2 push A → relay:             {:>8.2} s",
        push.as_secs_f64()
    );
    println!(
        "phase 3 `musubi sync --once` at B:  {:>8.2} s  ({})",
        sync_out.elapsed.as_secs_f64(),
        sync_out_ok.trim()
    );
    println!(
        "phase 4 `musubi referral show` at B:{:>8.2} s",
        show_out.elapsed.as_secs_f64()
    );
    println!(
        "total (1-4):                        {:>8.2} s",
        (replay + push + sync_out.elapsed + show_out.elapsed).as_secs_f64()
    );
    println!(
        "plain Automerge::save() of the document:       {}",
        human_bytes(plain_save as f64)
    );
    println!(
        "ciphertext of the bundles (as sealed at A):    {}",
        human_bytes(changes_bytes as f64)
    );
    println!(
        "envelopes stored at the relay ({} rows):      {}  ({:.2}x the plain save)",
        stored.len(),
        human_bytes(stored_bytes as f64),
        stored_bytes as f64 / plain_save as f64
    );
    println!(
        "relay data directory (db, WAL, logs):          {}",
        human_bytes(files::tree_bytes(&relay.data) as f64)
    );
    println!(
        "facility B data directory:                     {}",
        human_bytes(files::tree_bytes(&b.data) as f64)
    );
    println!(
        "peak RSS: relay {}, B sync {}, B show {}, A (this process, incl. the parsed trace) {}",
        kib(relay.pid().and_then(vm_hwm_kib)),
        kib(Some(sync_peak)),
        kib(Some(show_peak)),
        kib(self_vm_hwm_kib())
    );
}
