//! Mutation fuzzing of every decoder that takes bytes from someone else (issue 11): wire frames,
//! envelopes, operations, key grants, transfer files, a bundle's Automerge changes, FHIR Bundles,
//! and a card's answers (APDU responses, TLV, the JPKI certificate).
//!
//! cargo-fuzz needs a nightly toolchain with sanitizers, which this project's machines cannot fetch,
//! so this is the stable-Rust equivalent: each [`Target`] starts from a corpus (valid inputs made by
//! the real encoders here, the files committed under `tests/fuzz/corpus/<target>/`, and for FHIR the
//! real letters in `../shared/data`), applies a few random byte-level mutations per execution
//! ([`mutate`]: bit flips, interesting values, insertions, deletions, duplicated and spliced ranges),
//! and runs the input through the real decoder. A panic is a finding: [`fuzz`] returns it with the
//! seed and iteration that replay it. Time and randomness are the caller's (a seed, a budget).
//!
//! The test (`tests/tests/fuzz.rs`) runs each target for a short fixed time in CI; the benchmark
//! driver (`bench-fuzz`, release build) runs millions of executions per target and prints the rates.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::changes;
use musubi_crdt::crypto::{DeviceSecrets, DocumentKey};
use musubi_crdt::documents::{referral, referral_fhir};
use musubi_crdt::ids::{DocumentId, DocumentKind, Epoch, FacilityId, Seq};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant};
use musubi_crdt::protocol::{self, PushItem, Request};
use musubi_crdt::transfer::{TransferDecoder, TransferEncoder, TransferHeader};
use musubi_facility::card::CardError;
use musubi_facility::card::apdu::{Protocol, Transport};
use musubi_facility::card::mynumber::MyNumberCard;
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One decoder under fuzzing.
pub struct Target {
    /// Its name (also its corpus directory).
    pub name: &'static str,
    /// Runs one input through the decoder (and what a device does next with what it decoded).
    pub run: fn(&[u8]),
    /// Valid inputs made by the real encoders.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "frame",
            run: run_frame,
            seeds: seed_frames,
        },
        Target {
            name: "envelope",
            run: run_envelope,
            seeds: seed_envelopes,
        },
        Target {
            name: "op",
            run: run_op,
            seeds: seed_ops,
        },
        Target {
            name: "grant",
            run: run_grant,
            seeds: seed_grants,
        },
        Target {
            name: "transfer",
            run: run_transfer,
            seeds: seed_transfers,
        },
        Target {
            name: "changes",
            run: run_changes,
            seeds: seed_changes,
        },
        Target {
            name: "fhir",
            run: run_fhir,
            seeds: seed_fhir,
        },
        Target {
            name: "card",
            run: run_card,
            seeds: seed_card,
        },
    ]
}

/// The committed corpus directory of `target`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The starting corpus of `target`: its seeds and its committed files. Panics, saying so, when the
/// committed corpus is missing.
pub fn corpus(target: &Target) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target.name);
    let mut out = (target.seeds)();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the committed fuzz corpus {} cannot be read ({e}); write it with `cargo run --release -p musubi-tests --bin bench-fuzz -- --write-corpus`",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files {
        out.push(std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
    }
    out
}

/// What a fuzzing run found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Inputs run.
    pub executions: u64,
    /// Inputs that panicked: (iteration, input, panic message).
    pub panics: Vec<(u64, Vec<u8>, String)>,
}

/// Runs `target` from `corpus` with the mutations of `seed`, until `budget` executions or `time`
/// passed, whichever comes first. Panics of the target are caught and returned (the first 10).
///
/// The caller silences the panic hook for the run ([`silence_panics`]): Automerge's panics, which
/// `changes::apply` catches, would otherwise each print a message (and a backtrace, when
/// `RUST_BACKTRACE` is set).
pub fn fuzz(
    target: &Target,
    corpus: &[Vec<u8>],
    seed: u64,
    budget: u64,
    time: Duration,
) -> Findings {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let started = Instant::now();
    let mut out = Findings::default();
    while out.executions < budget && (out.executions % 256 != 0 || started.elapsed() < time) {
        let input = mutate(&mut rng, corpus);
        let run = target.run;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(&input))) {
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            if out.panics.len() < 10 {
                out.panics.push((out.executions, input, message));
            }
        }
        out.executions += 1;
    }
    out
}

/// Replaces the process's panic hook with one that prints nothing, and returns the one it replaced
/// (to put back before reporting). The hook is global, so threads cannot each set and restore it.
pub fn silence_panics() -> Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    previous
}

/// One input: a corpus entry with 1 to 8 random mutations.
fn mutate(rng: &mut impl Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..=8) {
        let len = v.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x1f, 0x9f, 0xbf][rng.random_range(0..8)];
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(256));
                let copy = v[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                v.splice(at..at, copy);
            }
            5 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                if !other.is_empty() {
                    let i = rng.random_range(0..other.len());
                    let n = rng.random_range(1..=(other.len() - i).min(512));
                    let at = rng.random_range(0..=len);
                    v.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            6 if len > 0 => v.truncate(rng.random_range(0..len)),
            7 if len >= 4 => {
                // A length or count field: a big-endian or CBOR-ish number made huge or zero.
                let i = rng.random_range(0..len - 3);
                let n = [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 0x0100_0000][rng.random_range(0..5)];
                v[i..i + 4].copy_from_slice(&n.to_be_bytes());
            }
            _ => {}
        }
    }
    v
}

// --- the targets ---------------------------------------------------------------------------------

fn run_frame(bytes: &[u8]) {
    if let Ok(req) = protocol::decode_request(bytes) {
        let _ = protocol::encode_request(&req);
    }
    let _ = protocol::decode_response(bytes);
    let _ = protocol::decode_response_frame(bytes);
}

fn run_envelope(bytes: &[u8]) {
    if let Ok(env) = Envelope::decode(bytes) {
        let _ = env.check();
        let _ = env.verify_signature();
        let _ = env.id();
        let _ = env.open(&fixed_key());
    }
}

fn run_op(bytes: &[u8]) {
    if let Ok(op) = ciborium::from_reader::<DocOp, _>(bytes) {
        let _ = op.verify();
        let _ = op.hash();
        let _ = op.id_matches();
    }
}

fn run_grant(bytes: &[u8]) {
    if let Ok(grant) = ciborium::from_reader::<KeyGrant, _>(bytes) {
        let _ = grant.verify();
        let _ = grant.hash();
        let _ = grant.open(&fixed_secrets());
    }
}

fn run_transfer(bytes: &[u8]) {
    // Fed in pieces of the sizes the input's first byte picks, as a file is read.
    let step = usize::from(bytes.first().copied().unwrap_or(1)).max(1) * 7;
    let mut dec = TransferDecoder::new();
    for piece in bytes.chunks(step) {
        dec.feed(piece);
        loop {
            match dec.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = dec.finish();
}

fn run_changes(bytes: &[u8]) {
    let author = fixed_secrets().device_id();
    if let Ok(changes) = changes::decode_changes(bytes, &author) {
        // As `Engine::load` applies them: a panic inside Automerge is an error.
        let mut doc = automerge::AutoCommit::new();
        if changes::apply(&mut doc, changes).is_ok() {
            let _ = referral::read(&doc);
        }
    }
}

fn run_fhir(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    if let Ok(letter) = referral_fhir::import_bundle(&text) {
        let mut doc = automerge::AutoCommit::new();
        let _ = referral::init(&mut doc, &letter);
    }
}

/// A card that answers each command with the next response cut from the input (one length byte,
/// then that many bytes), then "file not found".
struct FuzzCard<'a> {
    rest: &'a [u8],
    protocol: Protocol,
}

impl Transport for FuzzCard<'_> {
    fn transmit(&mut self, _command: &[u8]) -> Result<Vec<u8>, CardError> {
        let Some((&n, rest)) = self.rest.split_first() else {
            return Ok(vec![0x6a, 0x82]);
        };
        let n = usize::from(n).min(rest.len());
        let (answer, rest) = rest.split_at(n);
        self.rest = rest;
        Ok(answer.to_vec())
    }
    fn protocol(&self) -> Protocol {
        self.protocol
    }
}

fn run_card(bytes: &[u8]) {
    let protocol = if bytes.first().is_some_and(|b| b & 1 == 1) {
        Protocol::T0
    } else {
        Protocol::T1
    };
    let mut t = FuzzCard {
        rest: bytes.get(1..).unwrap_or_default(),
        protocol,
    };
    if let Ok(Some(mut card)) = MyNumberCard::detect(&mut t) {
        let _ = card.auth_certificate();
        let _ = card.basic_four();
    }
}

// --- seeds: valid inputs from the real encoders ---------------------------------------------------

/// The device the fuzzing corpus's changes are written by (their actor is bound to it).
pub fn fixed_secrets() -> DeviceSecrets {
    DeviceSecrets::from_seeds([3; 32], [4; 32])
}

fn fixed_key() -> DocumentKey {
    DocumentKey::from_seed([5; 32])
}

fn sample_doc() -> DocumentId {
    DocumentId::from_random_bytes([6; 16])
}

fn sample_facility() -> FacilityId {
    FacilityId::from_random_bytes([7; 16])
}

/// Changes written by the fixed device, as a bundle carries them.
fn sample_changes(text: &str) -> Vec<u8> {
    crate::hostile::changes_by(&fixed_secrets().device_id(), |doc| {
        let letter = referral::ReferralLetter {
            remarks: text.to_owned(),
            ..Default::default()
        };
        let _ = referral::init(doc, &letter);
        doc.put(automerge::ROOT, "note", text).expect("put");
    })
}

fn sample_envelope(text: &str) -> Envelope {
    Envelope::seal(
        &fixed_secrets(),
        sample_facility(),
        sample_doc(),
        Epoch(0),
        &fixed_key(),
        &Payload::Changes {
            data: sample_changes(text),
        },
    )
    .expect("seal")
}

fn sample_op() -> DocOp {
    DocOp::create(
        &fixed_secrets(),
        sample_facility(),
        1_700_000_000_000,
        DocOpBody::Create {
            kind: DocumentKind::Referral,
            members: vec![],
            key_commitment: fixed_key().commitment(),
            nonce: [8; 16],
        },
    )
    .expect("create")
}

fn sample_grant() -> KeyGrant {
    let me = fixed_secrets().public();
    KeyGrant::seal(
        &fixed_secrets(),
        sample_facility(),
        sample_doc(),
        Epoch(0),
        &fixed_key(),
        &[(me.device, me.age_recipient)],
    )
    .expect("seal a grant")
}

fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("cbor");
    out
}

fn seed_frames() -> Vec<Vec<u8>> {
    vec![
        protocol::encode_request(&Request::ListDocuments),
        protocol::encode_request(&Request::Pull {
            doc: sample_doc(),
            after: Seq(41),
        }),
        protocol::encode_request(&Request::Push {
            items: vec![
                PushItem::Op { op: sample_op() },
                PushItem::Grant {
                    grant: sample_grant(),
                },
                PushItem::Bundle {
                    envelope: sample_envelope("紹介状"),
                },
            ],
        }),
    ]
}

fn seed_envelopes() -> Vec<Vec<u8>> {
    vec![
        sample_envelope("x").encode(),
        sample_envelope(&"所見".repeat(300)).encode(),
    ]
}

fn seed_ops() -> Vec<Vec<u8>> {
    vec![cbor(&sample_op())]
}

fn seed_grants() -> Vec<Vec<u8>> {
    vec![cbor(&sample_grant())]
}

fn seed_transfers() -> Vec<Vec<u8>> {
    let (mut enc, mut bytes) = TransferEncoder::start(&TransferHeader {
        deployment: musubi_crdt::ids::DeploymentId::from_random_bytes([9; 16]),
        device: fixed_secrets().device_id(),
        created_at_ms: 1_700_000_000_000,
        directory: None,
    });
    for item in [
        PushItem::Op { op: sample_op() },
        PushItem::Bundle {
            envelope: sample_envelope("file"),
        },
    ] {
        bytes.extend(enc.item(&item).expect("record"));
    }
    bytes.extend(enc.finish());
    vec![bytes]
}

fn seed_changes() -> Vec<Vec<u8>> {
    vec![
        sample_changes("短い"),
        sample_changes(&"長い所見の本文。".repeat(100)),
    ]
}

fn seed_fhir() -> Vec<Vec<u8>> {
    // The real letter (large: mutated now and then), and a small Bundle cut to its bones (fast).
    let real = std::fs::read(crate::referral_bundle_path()).expect("the FHIR example letter");
    let small = serde_json::json!({
        "resourceType": "Bundle", "type": "document",
        "entry": [
            {"fullUrl": "urn:uuid:c", "resource": {"resourceType": "Composition", "title": "診療情報提供書",
              "subject": {"reference": "urn:uuid:p"}, "author": [{"reference": "urn:uuid:d"}],
              "section": [{"title": "紹介目的", "code": {"coding": [{"code": "950"}]},
                           "text": {"div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">胸痛&amp;息切れ</div>"}}]}},
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient",
              "name": [{"text": "結日 太郎"}], "birthDate": "1950-01-02", "gender": "male"}},
            {"fullUrl": "urn:uuid:d", "resource": {"resourceType": "Practitioner", "name": [{"text": "港 医師"}]}}
        ]
    });
    vec![real, serde_json::to_vec(&small).expect("json")]
}

fn seed_card() -> Vec<Vec<u8>> {
    // T=1: SELECT answered 90 00, then a certificate file of a DER SEQUENCE header and a few bytes.
    let mut v = vec![0u8];
    v.extend([2, 0x90, 0x00]);
    v.extend([2, 0x90, 0x00]);
    v.extend([
        10, 0x30, 0x82, 0x01, 0x00, 0x30, 0x03, 0x02, 0x01, 0x90, 0x00,
    ]);
    vec![v]
}

/// Writes damaged variants of a target's seeds into its committed corpus directory (what
/// `bench-fuzz --write-corpus` does); returns how many files.
pub fn write_corpus(target: &Target) -> usize {
    let dir = corpus_dir(target.name);
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    let seeds = (target.seeds)();
    // The FHIR seeds include a file of the shared data, which is not ours to commit.
    let seeds: Vec<Vec<u8>> = if target.name == "fhir" {
        seeds.into_iter().skip(1).collect()
    } else {
        seeds
    };
    // Damaged variants of the seeds (truncations, flipped lengths, splices), so a run starts past
    // the decoders' first checks too; the seeds themselves are made again at every run.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let variants = 8;
    for i in 0..variants {
        let v = mutate(&mut rng, &seeds);
        std::fs::write(dir.join(format!("damaged-{i}")), v).expect("write a corpus file");
    }
    variants
}
