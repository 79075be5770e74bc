//! Relay ingest: how many signed, encrypted bundles per second (and bytes per second) a real
//! `musubi-node` process accepts from one raw client, for 1 KiB and 64 KiB bundles.
//!
//! Usage: `cargo build --release --workspace --bins && cargo run --release -p musubi-tests --bin bench-ingest`
//! Optional arguments: `TOTAL_MIB` of ciphertext per size (default 32).
//!
//! Bundles are sealed beforehand (not timed); each push carries as many bundles as the facility's sync
//! session would put in one request (at most `PUSH_ITEMS_MAX`, at most half a frame). The relay verifies
//! every signature and commits each push durably before it answers. Two windows are measured: one push in
//! flight (what a facility does) and four. Each is measured twice: with the per-device limits and
//! the admin listener off, and with both on (limits high enough not to bind, `/metrics` scraped
//! every 100 ms), to show what they cost.

use std::time::Instant;

use musubi_crdt::bundle::Payload;
use musubi_crdt::ids::DocumentKind;
use musubi_crdt::limits::{FRAME_BYTES_MAX, PUSH_ITEMS_MAX};
use musubi_crdt::protocol::{
    PushItem, PushResult, Request, Response, decode_response, encode_request,
};
use musubi_tests::measure::{human_bytes, vm_hwm_kib};
use musubi_tests::raw::RawClient;
use musubi_tests::relay::Relay;
use musubi_tests::{World, files};

fn main() {
    let total_mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(32);
    println!(
        "relay ingest: one raw client on loopback, release binaries from {}",
        musubi_tests::bin_dir().display()
    );
    run(
        total_mib,
        "per-device limits and admin listener off",
        &["--device-requests-per-sec", "0"],
        false,
    );
    run(
        total_mib,
        "per-device limits on (not binding), admin listener on and scraped every 100 ms",
        &[
            "--admin",
            "127.0.0.1:0",
            "--device-requests-per-sec",
            "1000000",
            "--device-bytes-per-sec",
            "100GiB",
        ],
        true,
    );
}

fn run(total_mib: usize, label: &str, serve_args: &[&str], scrape: bool) {
    let world = World::new("bench-ingest");
    let mut relay = Relay::init(&world);
    relay.set_serve_args(serve_args);
    relay.start();
    let client = RawClient::enrol(&relay, "ingest-bench", "clinic");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        if scrape {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(relay.admin_get("/metrics", None).0, 200);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
        }
        ingest(&relay, &client, total_mib, label);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

fn ingest(relay: &Relay, client: &RawClient, total_mib: usize, label: &str) {
    println!("{label}:");
    println!(
        "{:>9} {:>7} {:>8} {:>10} {:>12} {:>12}",
        "bundle", "window", "bundles", "seconds", "bundles/s", "MiB/s"
    );
    for size in [1024usize, 64 * 1024] {
        for window in [1usize, 4] {
            let count = (total_mib * 1024 * 1024 / size).max(64);
            let (doc, key) = client.create_document(DocumentKind::Referral, &[]);
            let envelopes: Vec<_> = (0..count)
                .map(|i| {
                    let data: Vec<u8> = (0..size).map(|j| ((i * 7 + j * 13) % 251) as u8).collect();
                    client.seal(doc, &key, &Payload::Changes { data })
                })
                .collect();
            let bytes: usize = envelopes.iter().map(|e| e.encode().len()).sum();
            let mut frames = Vec::new();
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for env in envelopes {
                let item = PushItem::Bundle { envelope: env };
                let b = item.approx_bytes();
                if !batch.is_empty()
                    && (batch.len() >= PUSH_ITEMS_MAX || batch_bytes + b > FRAME_BYTES_MAX / 2)
                {
                    frames.push(encode_request(&Request::Push {
                        items: std::mem::take(&mut batch),
                    }));
                    batch_bytes = 0;
                }
                batch_bytes += b;
                batch.push(item);
            }
            if !batch.is_empty() {
                frames.push(encode_request(&Request::Push { items: batch }));
            }
            let start = Instant::now();
            let mut accepted = 0usize;
            let mut frames = frames.into_iter().peekable();
            while frames.peek().is_some() {
                let group: Vec<Vec<u8>> = frames.by_ref().take(window).collect();
                for answer in client.request_pipelined(group) {
                    let answer = answer.unwrap_or_else(|e| panic!("push failed: {e}"));
                    match decode_response(&answer) {
                        Ok(Response::Pushed { results }) => {
                            for r in results {
                                assert!(matches!(r, PushResult::Accepted { .. }), "refused: {r:?}");
                                accepted += 1;
                            }
                        }
                        other => panic!("push answered with {other:?}"),
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            assert_eq!(accepted, count);
            println!(
                "{:>9} {:>7} {:>8} {:>10.3} {:>12.0} {:>12.2}",
                human_bytes(size as f64),
                window,
                count,
                secs,
                count as f64 / secs,
                bytes as f64 / secs / 1024.0 / 1024.0
            );
        }
    }
    println!(
        "relay data directory: {}; relay peak RSS: {}",
        human_bytes(files::tree_bytes(&relay.data) as f64),
        relay
            .pid()
            .and_then(vm_hwm_kib)
            .map_or("?".into(), |k| human_bytes(k as f64 * 1024.0))
    );
}
