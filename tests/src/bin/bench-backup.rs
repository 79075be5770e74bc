//! Backup and restore of a relay holding `GIB` GiB of bundles (default 1): the time and size of
//! `musubi-node backup` while `serve` runs, and the time of `musubi-node restore`.
//!
//! Usage: `cargo build --release --workspace --bins && cargo run --release -p musubi-tests --bin bench-backup [GIB]`
//!
//! The relay is filled by one raw client pushing 64 KiB bundles (random bytes, as ciphertext is),
//! then backed up and restored with the release binaries; the key is sealed with the default
//! scrypt work factor (2^18), as in production.

use std::process::Command;
use std::time::Instant;

use musubi_crdt::bundle::Payload;
use musubi_crdt::ids::DocumentKind;
use musubi_crdt::limits::{FRAME_BYTES_MAX, PUSH_ITEMS_MAX};
use musubi_crdt::protocol::{PushItem, Request, Response, decode_response, encode_request};
use musubi_tests::measure::human_bytes;
use musubi_tests::raw::RawClient;
use musubi_tests::relay::Relay;
use musubi_tests::{World, bin, files};
use rand::RngExt as _;

fn main() {
    let gib: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1.0);
    let world = World::new("bench-backup");
    let mut relay = Relay::init(&world);
    relay.set_serve_args(&["--device-requests-per-sec", "0"]);
    relay.start();
    let client = RawClient::enrol(&relay, "backup-bench", "clinic");
    let size = 64 * 1024;
    let count = (gib * 1024.0 * 1024.0 * 1024.0 / size as f64) as usize;
    let started = Instant::now();
    let mut rng = rand::rng();
    let mut pushed = 0;
    while pushed < count {
        // One document per 1,000 bundles, as many documents of a city would be.
        let (doc, key) = client.create_document(DocumentKind::Referral, &[]);
        let n = (count - pushed).min(1000);
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut frames = Vec::new();
        for _ in 0..n {
            let mut data = vec![0u8; size];
            rng.fill(&mut data[..]);
            let item = PushItem::Bundle {
                envelope: client.seal(doc, &key, &Payload::Changes { data }),
            };
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
        frames.push(encode_request(&Request::Push { items: batch }));
        for chunk in frames.chunks(4) {
            for answer in client.request_pipelined(chunk.to_vec()) {
                let answer = answer.unwrap_or_else(|e| panic!("push failed: {e}"));
                assert!(
                    matches!(decode_response(&answer), Ok(Response::Pushed { .. })),
                    "push refused"
                );
            }
        }
        pushed += n;
    }
    let data_bytes = files::tree_bytes(&relay.data);
    println!(
        "relay filled with {count} bundles of {} in {:.1} s; data directory {}",
        human_bytes(size as f64),
        started.elapsed().as_secs_f64(),
        human_bytes(data_bytes as f64)
    );

    let pass = world.path().join("pass");
    std::fs::write(&pass, "バックアップの合言葉 bench").expect("pass");
    let out = world.path().join("relay.musubi-backup");
    let t = Instant::now();
    let o = Command::new(bin("musubi-node"))
        .args(["backup", "--data"])
        .arg(&relay.data)
        .arg("--out")
        .arg(&out)
        .arg("--key-passphrase-file")
        .arg(&pass)
        .output()
        .expect("backup");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let backup_secs = t.elapsed().as_secs_f64();
    let backup_bytes = std::fs::metadata(&out).expect("backup file").len();
    println!(
        "backup while serving: {backup_secs:.1} s, {} ({:.0} MiB/s of database)",
        human_bytes(backup_bytes as f64),
        data_bytes as f64 / backup_secs / 1024.0 / 1024.0
    );
    let restored = world.path().join("restored");
    let t = Instant::now();
    let o = Command::new(bin("musubi-node"))
        .args(["restore", "--data"])
        .arg(&restored)
        .arg(&out)
        .arg("--key-passphrase-file")
        .arg(&pass)
        .output()
        .expect("restore");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    println!(
        "restore into a new directory: {:.1} s; restored data directory {}",
        t.elapsed().as_secs_f64(),
        human_bytes(files::tree_bytes(&restored) as f64)
    );
}
