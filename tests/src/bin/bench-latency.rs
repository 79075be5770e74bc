//! Push-to-notification latency: facility A pushes one bundle of a document that facility B is a member
//! of; the time until B's connection receives the relay's `Notify` for it. p50, p90, p99, max.
//!
//! Usage: `cargo build --release --workspace --bins && cargo run --release -p musubi-tests --bin bench-latency`
//! Optional arguments: `SAMPLES` (default 1000), then `--flood`: the same samples are taken again
//! while a third enrolled device floods the relay with requests (20 at a time on its connection,
//! without pause), to show what the per-device limits keep for the other facilities.
//!
//! A and B are raw protocol clients (two enrolled facilities, each one device) against a real
//! `musubi-node` on loopback; each sample waits for its notification before the next push, and the
//! push's own acknowledgement round trip is reported beside it.

use std::time::{Duration, Instant};

use musubi_crdt::bundle::Payload;
use musubi_crdt::ids::{DocumentKind, Role};
use musubi_crdt::ops::Member;
use musubi_crdt::protocol::{
    PushItem, PushResult, Request, Response, decode_response, encode_request,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use musubi_tests::World;
use musubi_tests::measure::{ms, percentile};
use musubi_tests::raw::RawClient;

fn main() {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let flood = std::env::args().any(|a| a == "--flood");
    let world = World::new("bench-latency");
    let relay = world.relay();
    let b = RawClient::enrol(&relay, "latency-b", "clinic");
    let a = RawClient::enrol(&relay, "latency-a", "clinic");
    let flooder = flood.then(|| RawClient::enrol(&relay, "latency-flood", "clinic"));
    measure(&a, &b, samples, "unloaded");
    if let Some(f) = flooder {
        let stop = AtomicBool::new(false);
        let (sent, slowed) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            let (stop_ref, sent_ref, slowed_ref) = (&stop, &sent, &slowed);
            s.spawn(move || {
                let (stop, sent, slowed) = (stop_ref, sent_ref, slowed_ref);
                let frame = encode_request(&Request::ListDocuments);
                while !stop.load(Ordering::Relaxed) {
                    for r in f.request_pipelined(vec![frame.clone(); 20]) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if let Ok(Ok(Response::Error { .. })) = r.map(|b| decode_response(&b)) {
                            slowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
            let started = Instant::now();
            measure(&a, &b, samples, "while a third device floods the relay");
            stop.store(true, Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64();
            println!(
                "the flooding device sent {:.0} requests/s; {:.1}% of them were refused (rate-limited)",
                sent.load(Ordering::Relaxed) as f64 / secs,
                100.0 * slowed.load(Ordering::Relaxed) as f64
                    / sent.load(Ordering::Relaxed).max(1) as f64
            );
        });
    }
}

/// Takes `samples` push-to-notification samples (after 20 warm-up pushes) and prints them.
fn measure(a: &RawClient, b: &RawClient, samples: usize, label: &str) {
    let (doc, key) = a.create_document(
        DocumentKind::Referral,
        &[Member {
            facility: b.facility(),
            role: Role::Writer,
        }],
    );
    // B's connection is now known to the relay as a member device; warm up both paths.
    let envelopes: Vec<_> = (0..samples + 20)
        .map(|i| {
            a.seal(
                doc,
                &key,
                &Payload::Changes {
                    data: format!("keystroke {i}").into_bytes(),
                },
            )
        })
        .collect();
    let mut notify = Vec::with_capacity(samples);
    let mut ack = Vec::with_capacity(samples);
    let mut missing = 0;
    for (i, env) in envelopes.into_iter().enumerate() {
        b.drain_notifications();
        let frame = encode_request(&Request::Push {
            items: vec![PushItem::Bundle { envelope: env }],
        });
        let sent = Instant::now();
        let answer = a
            .request_bytes(frame)
            .unwrap_or_else(|e| panic!("push failed: {e}"));
        let acked = sent.elapsed();
        let seq = match decode_response(&answer) {
            Ok(Response::Pushed { results }) => match results.as_slice() {
                [PushResult::Accepted { seq: Some(s), .. }] => *s,
                other => panic!("push refused: {other:?}"),
            },
            other => panic!("push answered with {other:?}"),
        };
        let arrived = loop {
            match b.next_notification(Duration::from_secs(5)) {
                Some(n) if n.doc == doc && n.head >= seq => break Some(n.at),
                Some(_) => continue,
                None => break None,
            }
        };
        if i < 20 {
            continue; // warm-up
        }
        match arrived {
            Some(at) => notify.push(at.duration_since(sent)),
            None => missing += 1,
        }
        ack.push(acked);
    }
    println!(
        "push-to-notification latency, A → relay → B on loopback, {label} ({} samples, {missing} without a notification within 5 s)",
        notify.len()
    );
    for (what, v) in [
        ("notification at B", &mut notify),
        ("push ack at A", &mut ack),
    ] {
        if v.is_empty() {
            println!("{what:>18}: no samples");
            continue;
        }
        println!(
            "{what:>18}: p50 {}  p90 {}  p99 {}  max {}",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 90.0)),
            ms(percentile(v, 99.0)),
            ms(*v.iter().max().expect("non-empty"))
        );
    }
}
