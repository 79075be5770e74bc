//! Importing a FHIR referral Bundle (JP-CLINS 診療情報提供書) grown to a given size: the real example
//! Bundle from `../shared/data/fhir-ereferral/`, with the entries of one section repeated (new
//! `fullUrl`s and ids, each referenced from that section) until the JSON reaches each target size.
//! Prints, per size, the entries, the bytes and the median of three imports.
//!
//! Usage: `cargo run --release -p musubi-tests --bin bench-fhir [MAX_KIB]` (default: up to
//! `FHIR_SOURCE_BYTES_MAX`, 4 MiB).

use std::time::Instant;

use musubi_crdt::documents::referral::FHIR_SOURCE_BYTES_MAX;
use musubi_crdt::documents::referral_fhir::import_bundle;
use musubi_tests::referral_bundle_path;
use serde_json::Value;

/// The first section (depth first) with an entry that resolves to a resource of the Bundle.
fn section_with_entries(sections: &mut [Value]) -> Option<&mut Value> {
    for s in sections.iter_mut() {
        if s.get("entry")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty())
        {
            return Some(s);
        }
        if let Some(Value::Array(inner)) = s.get_mut("section")
            && let Some(found) = section_with_entries(inner)
        {
            return Some(found);
        }
    }
    None
}

/// `base` with `copies` more entries like the ones its first referenced section points at.
fn grown(base: &Value, copies: usize) -> Value {
    let mut bundle = base.clone();
    let entries = bundle["entry"].as_array().expect("entries").clone();
    let comp_index = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == "Composition")
        .expect("a Composition");
    let mut comp = entries[comp_index]["resource"].clone();
    let sections = comp["section"].as_array_mut().expect("sections");
    let section = section_with_entries(sections).expect("a section with entries");
    let reference = section["entry"][0]["reference"]
        .as_str()
        .expect("a reference")
        .to_owned();
    let template = entries
        .iter()
        .find(|e| e["fullUrl"] == reference.as_str())
        .expect("the referenced entry")
        .clone();
    let mut added = Vec::with_capacity(copies);
    for i in 0..copies {
        let mut e = template.clone();
        let url = format!("urn:uuid:00000000-0000-4000-8000-{i:012}");
        e["fullUrl"] = Value::String(url.clone());
        e["resource"]["id"] = Value::String(format!("bench-{i}"));
        section["entry"]
            .as_array_mut()
            .expect("entry")
            .push(serde_json::json!({ "reference": url }));
        added.push(e);
    }
    let all = bundle["entry"].as_array_mut().expect("entries");
    all[comp_index]["resource"] = comp;
    all.extend(added);
    bundle
}

fn main() {
    let max_kib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MAX_KIB is a number"))
        .unwrap_or(FHIR_SOURCE_BYTES_MAX / 1024);
    let path = referral_bundle_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (is ../shared/data beside the repository?)",
            path.display()
        )
    });
    let base: Value = serde_json::from_str(&text).expect("the example Bundle is JSON");
    let one = serde_json::to_string(&grown(&base, 1)).expect("json").len()
        - serde_json::to_string(&base).expect("json").len();
    println!(
        "bench-fhir: {} grown by copies of one entry ({one} bytes each)",
        path.display()
    );
    println!("{:>10} {:>8} {:>12}", "bytes", "entries", "import (ms)");
    let mut target = 54 * 1024;
    loop {
        let target_bytes = target.min(max_kib * 1024);
        let copies = target_bytes.saturating_sub(text.len()) / one.max(1);
        let json = serde_json::to_string(&grown(&base, copies)).expect("json");
        if json.len() > FHIR_SOURCE_BYTES_MAX {
            break;
        }
        let mut times: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                let letter = import_bundle(&json).expect("imports");
                assert!(!letter.to_facility.is_empty() || !letter.from_facility.is_empty());
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{:>10} {:>8} {:>12.1}",
            json.len(),
            json.matches("\"fullUrl\"").count(),
            times[1]
        );
        if target_bytes >= max_kib * 1024 {
            break;
        }
        target *= 2;
    }

    // A narrative made to be slow: the first section's text is `&` repeated, with no `;`.
    println!("{:>10} {:>12}", "& in text", "import (ms)");
    let mut n = 16 * 1024;
    while n <= max_kib * 1024 / 2 {
        let mut bundle = base.clone();
        let entries = bundle["entry"].as_array_mut().expect("entries");
        let comp = entries
            .iter_mut()
            .find(|e| e["resource"]["resourceType"] == "Composition")
            .expect("a Composition");
        let section = section_with_entries(
            comp["resource"]["section"]
                .as_array_mut()
                .expect("sections"),
        )
        .expect("a section");
        section["entry"] = Value::Array(vec![]);
        section["text"] = serde_json::json!({
            "status": "generated",
            "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", "&".repeat(n)),
        });
        let json = serde_json::to_string(&bundle).expect("json");
        let t = Instant::now();
        import_bundle(&json).expect("imports");
        println!("{n:>10} {:>12.1}", t.elapsed().as_secs_f64() * 1000.0);
        n *= 4;
    }
}
