//! Deterministic simulations of facilities syncing through the relay (DESIGN "Tests and measurements").
//!
//! The story: a few facilities edit shared documents — real Automerge changes, sealed in real signed
//! envelopes — online or offline, while a seeded network delays, reorders and loses their requests and
//! the relay's answers, cuts connections, and the relay crashes and loses what it had not yet made
//! durable. When the network heals, every facility holds the same documents, nothing anyone wrote is
//! lost, and every push was answered exactly once.
//!
//! The relay here is a model: per-document logs with sequence numbers, deduplicated by bundle id.
//! It acknowledges a push only once the push is durable, and a crash loses only the rest.
//!
//! No sleeps and no wall clock: time is `t0 + milliseconds`, randomness is `ChaCha8Rng::seed_from_u64`.
//! Every run prints `seed=N`; `MUSUBI_SEED=N cargo test -p musubi-crdt --test crdt NAME` replays it,
//! `MUSUBI_SEEDS=K` runs K seeds instead of the default.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjType, ROOT, ReadDoc, TextEncoding};
use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::crypto::{DeviceSecrets, DocumentKey};
use musubi_crdt::directory::{DirectoryBody, SignedDirectory};
use musubi_crdt::ids::{
    BundleId, DeploymentId, DocumentId, DocumentKind, Epoch, FacilityId, LogHash, Seq,
};
use musubi_crdt::ops::{DocOp, DocOpBody};
use musubi_crdt::protocol::{
    DocumentInfo, ErrorCode, Pulled, PushItem, PushResult, Request, Response,
};
use musubi_crdt::sync::{Event, Known, OutboxId, RequestId, Session, SessionConfig, Transmit};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Seeds per looping test unless `MUSUBI_SEEDS` says otherwise.
const SEEDS_DEFAULT: u64 = 200;

/// Below this many seeds a run is a replay, and the "was it exercised" checks are skipped.
const SEEDS_FOR_COVERAGE_MIN: u64 = 50;

/// The request timeout of the simulated sessions.
const REQUEST_TIMEOUT_MS: u64 = 400;

/// How long the healed network may take to settle before the test calls it stuck (simulated time).
const SETTLE_MS_MAX: u64 = 120_000;

/// What facility staff type into the shared documents.
const WORDS: &[&str] = &[
    "発熱なし",
    "血圧 132/84",
    "服薬確認",
    "訪問看護 14:00",
    "要配慮",
    "歩行器",
    " ",
    "。",
    "ok",
];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn session_config() -> SessionConfig {
    SessionConfig {
        request_timeout: ms(REQUEST_TIMEOUT_MS),
        backoff_initial: ms(20),
        backoff_max: ms(320),
    }
}

/// Runs `run` for each seed (or the one in `MUSUBI_SEED`), printing each, and sums what the runs exercised.
fn run_seeds(run: impl Fn(u64) -> Stats) -> Stats {
    run_seeds_n(SEEDS_DEFAULT, run)
}

/// [`run_seeds`] with its own default count.
fn run_seeds_n(count_default: u64, run: impl Fn(u64) -> Stats) -> Stats {
    let seeds: Vec<u64> = match std::env::var("MUSUBI_SEED") {
        Ok(s) => vec![
            s.trim()
                .parse()
                .expect("MUSUBI_SEED is an unsigned integer"),
        ],
        Err(_) => {
            let n = std::env::var("MUSUBI_SEEDS")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(count_default);
            (0..n).collect()
        }
    };
    let mut total = Stats::default();
    for seed in seeds {
        eprintln!("seed={seed}");
        match catch_unwind(AssertUnwindSafe(|| run(seed))) {
            Ok(stats) => total.add(&stats),
            Err(panic) => {
                eprintln!("failed at seed={seed}; replay with MUSUBI_SEED={seed}");
                resume_unwind(panic);
            }
        }
        total.seeds += 1;
    }
    eprintln!("{total:?}");
    total
}

/// What a run exercised, so a test can show its faults really happened.
#[derive(Clone, Debug, Default)]
struct Stats {
    seeds: u64,
    edits: u64,
    lost_messages: u64,
    failures_reported: u64,
    transient_errors: u64,
    late_answers: u64,
    duplicate_answers: u64,
    disconnects: u64,
    crashes: u64,
    lost_in_crash: u64,
    restarts: u64,
    received_again: u64,
    refused: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.edits += o.edits;
        self.lost_messages += o.lost_messages;
        self.failures_reported += o.failures_reported;
        self.transient_errors += o.transient_errors;
        self.late_answers += o.late_answers;
        self.duplicate_answers += o.duplicate_answers;
        self.disconnects += o.disconnects;
        self.crashes += o.crashes;
        self.lost_in_crash += o.lost_in_crash;
        self.restarts += o.restarts;
        self.received_again += o.received_again;
        self.refused += o.refused;
    }

    fn many(&self) -> bool {
        self.seeds >= SEEDS_FOR_COVERAGE_MIN
    }
}

// ---------------------------------------------------------------------------------------------------
// Documents: real Automerge text, real sealed envelopes.
// ---------------------------------------------------------------------------------------------------

/// A document every simulated facility is a member of.
struct SharedDoc {
    id: DocumentId,
    key: DocumentKey,
}

fn new_automerge(actor: ActorId) -> AutoCommit {
    AutoCommit::new_with_encoding(TextEncoding::UnicodeCodePoint).with_actor(actor)
}

fn text_obj(doc: &AutoCommit) -> automerge::ObjId {
    match doc.get(ROOT, "text").expect("the root is readable") {
        Some((_, obj)) => obj,
        None => panic!("the document has no text: its first bundle is missing"),
    }
}

fn changes_of(envelope: &Envelope, key: &DocumentKey) -> Vec<u8> {
    match envelope
        .open(key)
        .expect("a bundle opens with its document's key")
    {
        Payload::Changes { data } => data,
        other => panic!("only changes are pushed here, got {other:?}"),
    }
}

/// What a user sees of a document: its heads (sorted) and its text.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    heads: Vec<ChangeHash>,
    text: String,
}

fn seen(doc: &mut AutoCommit) -> Seen {
    let mut heads = doc.get_heads();
    heads.sort();
    let text = doc.text(text_obj(doc)).expect("the text is readable");
    Seen { heads, text }
}

/// Loads change sets in the given order into a fresh document; every dependency must have arrived.
fn load_all<'a>(changes: impl IntoIterator<Item = &'a [u8]>) -> Seen {
    let mut doc = new_automerge(ActorId::from(vec![0xEE; 4]));
    for data in changes {
        doc.load_incremental(data).expect("changes load");
    }
    let missing = doc.get_missing_deps(&[]);
    assert!(
        missing.is_empty(),
        "changes wait for missing dependencies {missing:?}"
    );
    seen(&mut doc)
}

// ---------------------------------------------------------------------------------------------------
// The model relay.
// ---------------------------------------------------------------------------------------------------

/// A push the relay received but has not yet made durable; a crash loses it, and it is not yet answered.
struct Unflushed {
    from: usize,
    conn: u64,
    id: RequestId,
    sent_at: u64,
    items: Vec<PushItem>,
    durable_at: u64,
}

/// Per-document logs of durable bundles (sequence number = index + 1), deduplicated by bundle id.
struct Relay {
    logs: BTreeMap<DocumentId, Vec<Envelope>>,
    held: HashMap<BundleId, (DocumentId, Seq)>,
    unflushed: VecDeque<Unflushed>,
    down_until: Option<u64>,
    refused: BTreeMap<usize, ErrorCode>,
    /// Most bundles in one pull answer (small, so pulls page).
    page: usize,
    /// Repeat the last bundle the puller already holds in each answer (a sloppy relay; must be harmless).
    overlap: bool,
}

impl Relay {
    fn new(docs: impl IntoIterator<Item = DocumentId>, page: usize, overlap: bool) -> Self {
        Self {
            logs: docs.into_iter().map(|d| (d, Vec::new())).collect(),
            held: HashMap::new(),
            unflushed: VecDeque::new(),
            down_until: None,
            refused: BTreeMap::new(),
            page,
            overlap,
        }
    }

    fn head(&self, doc: DocumentId) -> Seq {
        Seq(self.logs.get(&doc).map_or(0, |l| l.len() as u64))
    }

    /// The bundle log of `doc` at `seq`, as a relay computes it.
    fn log_at(&self, doc: DocumentId, seq: u64) -> LogHash {
        self.logs.get(&doc).map_or(LogHash::ZERO, |l| {
            l.iter()
                .take(seq as usize)
                .fold(LogHash::ZERO, |h, e| h.next(&e.id()))
        })
    }

    fn is_up(&self) -> bool {
        self.down_until.is_none()
    }

    /// The answer to anything but a push.
    fn answer(&self, request: &Request) -> Response {
        match request {
            Request::GetDirectory { .. } => Response::Directory {
                directory: None,
                relay_addrs: vec![],
            },
            Request::ListDocuments => Response::Documents {
                docs: self
                    .logs
                    .iter()
                    .map(|(id, log)| DocumentInfo {
                        id: *id,
                        kind: DocumentKind::CarePlan,
                        epoch: Epoch(0),
                        head: Seq(log.len() as u64),
                        ops: 0,
                        ops_head: None,
                        log: self.log_at(*id, log.len() as u64),
                    })
                    .collect(),
            },
            Request::GetJoinRequests => Response::JoinRequests { requests: vec![] },
            Request::GetKeyGrants { doc } => Response::KeyGrants {
                doc: *doc,
                grants: vec![],
            },
            Request::Pull { doc, after } => match self.logs.get(doc) {
                None => Response::error(ErrorCode::UnknownDocument, "no such document"),
                Some(log) => {
                    let from = if self.overlap {
                        after.0.saturating_sub(1)
                    } else {
                        after.0
                    };
                    let items = (from..log.len() as u64)
                        .take(self.page)
                        .map(|i| Pulled {
                            seq: Seq(i + 1),
                            envelope: log[i as usize].clone(),
                            log: self.log_at(*doc, i + 1),
                        })
                        .collect();
                    Response::Bundles {
                        doc: *doc,
                        items,
                        head: Seq(log.len() as u64),
                        base: self.log_at(*doc, after.0),
                    }
                }
            },
            Request::Push { .. } => unreachable!("pushes are answered when durable"),
            // Enrolment, LAN exchange and notifications are not what a session sends the relay.
            _ => Response::error(ErrorCode::Malformed, "not a request for the relay"),
        }
    }

    /// Stores a push's items durably, in order; says what happened to each.
    fn store(&mut self, items: &[PushItem]) -> Vec<PushResult> {
        items
            .iter()
            .map(|item| match item {
                PushItem::Bundle { envelope } => {
                    let id = envelope.id();
                    if let Some((doc, seq)) = self.held.get(&id) {
                        return PushResult::Duplicate {
                            seq: Some(*seq),
                            log: Some(self.log_at(*doc, seq.0)),
                        };
                    }
                    if envelope.verify_signature().is_err() {
                        return PushResult::Rejected {
                            code: ErrorCode::BadSignature,
                            message: "bad signature".into(),
                        };
                    }
                    let log = self
                        .logs
                        .get_mut(&envelope.doc)
                        .expect("pushes name shared documents");
                    log.push(envelope.clone());
                    let seq = Seq(log.len() as u64);
                    self.held.insert(id, (envelope.doc, seq));
                    PushResult::Accepted {
                        seq: Some(seq),
                        log: Some(self.log_at(envelope.doc, seq.0)),
                    }
                }
                PushItem::Op { .. }
                | PushItem::Grant { .. }
                | PushItem::Invite { .. }
                | PushItem::Approve { .. } => PushResult::Accepted {
                    seq: None,
                    log: None,
                },
            })
            .collect()
    }

    /// Asserts that each bundle is held once, under the sequence number the index says.
    fn assert_each_bundle_once(&self) {
        let total: usize = self.logs.values().map(Vec::len).sum();
        assert_eq!(total, self.held.len(), "the relay holds some bundle twice");
        for (doc, log) in &self.logs {
            for (i, env) in log.iter().enumerate() {
                assert_eq!(self.held.get(&env.id()), Some(&(*doc, Seq(i as u64 + 1))));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// A facility: its session and what its driver keeps on disk.
// ---------------------------------------------------------------------------------------------------

struct Facility {
    index: usize,
    device: DeviceSecrets,
    id: FacilityId,
    session: Session,
    /// The current connection, if connected.
    conn: Option<u64>,
    reconnect_at: u64,
    /// The working documents (own edits and everything received).
    live: BTreeMap<DocumentId, AutoCommit>,
    /// Every bundle held, own and received, in arrival order, repeats included.
    store: Vec<(DocumentId, BundleId)>,
    /// The decrypted changes of each bundle held (each opened once).
    changes: HashMap<BundleId, Vec<u8>>,
    cursors: BTreeMap<DocumentId, Seq>,
    /// Own bundles the relay has not answered for yet.
    outbox: BTreeMap<OutboxId, Envelope>,
    next_outbox: u64,
    /// Bundles this facility pushed.
    made: Vec<BundleId>,
    /// Every answer to every outbox item.
    answers: BTreeMap<OutboxId, Vec<PushResult>>,
    /// Bundles the relay acknowledged to this facility, with their sequence numbers.
    acked: BTreeMap<BundleId, Seq>,
    /// How often each (document, sequence number) arrived.
    pulled: BTreeMap<(DocumentId, Seq), u32>,
    refused: Vec<ErrorCode>,
    caught_up_last: bool,
}

fn epochs(docs: &[SharedDoc]) -> HashMap<DocumentId, Epoch> {
    docs.iter().map(|d| (d.id, Epoch(0))).collect()
}

impl Facility {
    fn new(index: usize, device: DeviceSecrets, id: FacilityId, docs: &[SharedDoc]) -> Self {
        let actor = ActorId::from(vec![0xF0, index as u8]);
        Self {
            index,
            device,
            id,
            session: Session::new(
                session_config(),
                Known {
                    epochs: epochs(docs),
                    ..Known::default()
                },
            ),
            conn: None,
            reconnect_at: 0,
            live: docs
                .iter()
                .map(|d| (d.id, new_automerge(actor.clone())))
                .collect(),
            store: Vec::new(),
            changes: HashMap::new(),
            cursors: BTreeMap::new(),
            outbox: BTreeMap::new(),
            next_outbox: 0,
            made: Vec::new(),
            answers: BTreeMap::new(),
            acked: BTreeMap::new(),
            pulled: BTreeMap::new(),
            refused: Vec::new(),
            caught_up_last: false,
        }
    }

    fn enqueue(&mut self, envelope: Envelope) {
        let item = OutboxId(self.next_outbox);
        self.next_outbox += 1;
        self.made.push(envelope.id());
        self.outbox.insert(item, envelope.clone());
        self.session.push(item, PushItem::Bundle { envelope });
    }

    /// What the driver does with an event: store bundles, clear the outbox, remember refusals.
    ///
    /// `opened` spares the simulation from decrypting a bundle again at every facility (the key is the
    /// same); the first facility to receive a bundle opens it.
    fn apply(
        &mut self,
        event: Event,
        docs: &[SharedDoc],
        opened: &mut HashMap<BundleId, Vec<u8>>,
        stats: &mut Stats,
    ) {
        self.caught_up_last = matches!(event, Event::CaughtUp);
        match event {
            Event::Pulled { doc, items } => {
                let shared = docs
                    .iter()
                    .find(|d| d.id == doc)
                    .expect("the relay lists only shared documents");
                let live = self
                    .live
                    .get_mut(&doc)
                    .expect("every facility holds every shared document");
                for p in items {
                    assert_eq!(
                        p.envelope.doc, doc,
                        "facility {}: a bundle filed under another document",
                        self.index
                    );
                    let id = p.envelope.id();
                    let changes = match self.changes.entry(id) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => e.insert(
                            opened
                                .entry(id)
                                .or_insert_with(|| changes_of(&p.envelope, &shared.key))
                                .clone(),
                        ),
                    };
                    live.load_incremental(changes).expect("changes load");
                    let times = self.pulled.entry((doc, p.seq)).or_default();
                    *times += 1;
                    if *times > 1 {
                        stats.received_again += 1;
                    }
                    let c = self.cursors.entry(doc).or_default();
                    *c = (*c).max(p.seq);
                    self.store.push((doc, id));
                }
            }
            Event::Pushed { item, result } => {
                self.answers.entry(item).or_default().push(result.clone());
                let Some(envelope) = self.outbox.remove(&item) else {
                    return; // answered twice; the final check reports it
                };
                match result {
                    PushResult::Accepted { seq: Some(seq), .. } => {
                        self.acked.insert(envelope.id(), seq);
                    }
                    PushResult::Duplicate { seq: Some(seq), .. } => {
                        stats.duplicate_answers += 1;
                        self.acked.insert(envelope.id(), seq);
                    }
                    other => panic!("facility {}: item {item:?} answered {other:?}", self.index),
                }
            }
            Event::Refused { code, .. } => self.refused.push(code),
            _ => {} // CaughtUp, and what the relay says about the directory, documents and grants
        }
    }

    /// The facility's documents rebuilt from its store, in the order its bundles arrived.
    fn rebuild(&self, doc: &SharedDoc) -> Seen {
        // One load of all of them, concatenated in arrival order (Automerge takes a run of chunks).
        let all: Vec<u8> = self
            .store
            .iter()
            .filter(|(d, _)| *d == doc.id)
            .flat_map(|(_, id)| self.changes[id].iter().copied())
            .collect();
        load_all([all.as_slice()])
    }
}

// ---------------------------------------------------------------------------------------------------
// The simulated network and its faults.
// ---------------------------------------------------------------------------------------------------

/// How unkind the world is.
#[derive(Clone, Copy, Debug)]
struct Knobs {
    /// Most facilities (at least two); each seed draws how many.
    facilities: usize,
    /// Most shared documents; each seed draws how many.
    docs: usize,
    /// Most edits (at least half of it); each seed draws how many.
    edits: usize,
    /// How long the faults last before the network heals.
    chaos_ms: u64,
    /// Longest ordinary delay of a message.
    delay_max_ms: u64,
    /// Chance a message is held until after its request timed out.
    late: f64,
    /// Chances a request, or an answer, is lost.
    drop_request: f64,
    drop_response: f64,
    /// Chance the transport reports a lost message (`handle_failure`) rather than staying silent.
    reported: f64,
    /// Chance the relay answers `Internal` (try later).
    transient: f64,
    /// Longest time a push waits in relay memory before it is durable and answered.
    flush_max_ms: u64,
    /// Most cut connections during the storm; each seed draws how many.
    disconnects: usize,
    /// Relay crashes during the storm.
    crashes: usize,
    /// Most facility process restarts during the storm (at least one if any); each seed draws how many.
    restarts: usize,
    /// A restarted facility lost its cursors and pulls everything again.
    forget_cursors: bool,
    /// See [`Relay::overlap`].
    overlap: bool,
    /// See [`Relay::page`].
    page: usize,
    /// The relay refuses the last facility part-way with this code.
    refuse: Option<ErrorCode>,
}

impl Knobs {
    /// A poor network: delays, reordering, lost and late messages, transient errors, cut connections.
    fn stormy() -> Self {
        Self {
            facilities: 4,
            docs: 2,
            edits: 12,
            chaos_ms: 2_500,
            delay_max_ms: 60,
            late: 0.04,
            drop_request: 0.05,
            drop_response: 0.05,
            reported: 0.5,
            transient: 0.03,
            flush_max_ms: 20,
            disconnects: 8,
            crashes: 0,
            restarts: 0,
            forget_cursors: false,
            overlap: false,
            page: 3,
            refuse: None,
        }
    }

    /// The same world once the network healed: nothing lost or late, no transient errors.
    fn healed(self) -> Self {
        Self {
            late: 0.0,
            drop_request: 0.0,
            drop_response: 0.0,
            transient: 0.0,
            ..self
        }
    }
}

/// A fault at a drawn time of the storm.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Crash,
    Disconnect(usize),
    Restart(usize),
    Refuse(usize, ErrorCode),
}

enum Msg {
    /// Facility → relay.
    Request {
        id: RequestId,
        request: Request,
        sent_at: u64,
    },
    /// Relay → facility.
    Response {
        id: RequestId,
        response: Response,
        sent_at: u64,
    },
    /// Relay → facility.
    Notify { doc: DocumentId, head: Seq },
    /// The facility's transport reports that request `id` failed.
    Failure { id: RequestId },
}

/// A message on one facility's connection.
struct Packet {
    facility: usize,
    conn: u64,
    msg: Msg,
}

/// What a run did, comparable between two runs of one seed.
#[derive(PartialEq)]
struct Trace {
    ended_at: u64,
    stats: String,
    /// The changes of each document's relay log, in sequence order.
    relay: Vec<Vec<Vec<u8>>>,
    /// The changes of each facility's store, in arrival order.
    stores: Vec<Vec<Vec<u8>>>,
}

struct Sim {
    knobs: Knobs,
    rng: ChaCha8Rng,
    t0: Instant,
    now: u64,
    docs: Vec<SharedDoc>,
    relay: Relay,
    facilities: Vec<Facility>,
    /// Messages by delivery time (ties by sending order).
    net: BTreeMap<(u64, u64), Packet>,
    packets: u64,
    conns: u64,
    edits: VecDeque<(u64, usize, usize)>,
    faults: VecDeque<(u64, Fault)>,
    /// The changes of every bundle opened so far.
    opened: HashMap<BundleId, Vec<u8>>,
    /// Bundles of pushes a relay crash lost before they were durable.
    lost_in_crash: Vec<BundleId>,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64, knobs: Knobs) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Each seed draws its own size, up to the knobs' maxima.
        let n = rng.random_range(2..=knobs.facilities);
        let doc_count = rng.random_range(1..=knobs.docs);
        let edit_count = rng.random_range(knobs.edits / 2..=knobs.edits);
        let devices: Vec<DeviceSecrets> = (0..n)
            .map(|_| DeviceSecrets::from_seeds(rng.random(), rng.random()))
            .collect();
        let ids: Vec<FacilityId> = (0..n)
            .map(|_| FacilityId::from_random_bytes(rng.random()))
            .collect();
        // Facility 0 creates each document; the others start from the same first bundle.
        let mut docs = Vec::new();
        let mut firsts = Vec::new();
        for d in 0..doc_count {
            let id = DocumentId::from_random_bytes(rng.random());
            let key = DocumentKey::from_seed(rng.random());
            let mut am = new_automerge(ActorId::from(vec![0xA0, d as u8]));
            let text = am
                .put_object(ROOT, "text", ObjType::Text)
                .expect("a new document takes a text");
            am.splice_text(&text, 0, 0, "支援経過: ")
                .expect("splice into an empty text");
            am.commit_with(CommitOptions::default().with_time(0));
            let data = am.save();
            let first = Envelope::seal(
                &devices[0],
                ids[0],
                id,
                Epoch(0),
                &key,
                &Payload::Changes { data: data.clone() },
            )
            .expect("seal the first bundle");
            firsts.push((first, data));
            docs.push(SharedDoc { id, key });
        }
        let mut facilities: Vec<Facility> = devices
            .into_iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (device, id))| Facility::new(i, device, id, &docs))
            .collect();
        for fac in &mut facilities {
            for (doc, (first, data)) in docs.iter().zip(&firsts) {
                fac.live
                    .get_mut(&doc.id)
                    .expect("created above")
                    .load_incremental(data)
                    .expect("first changes load");
                fac.changes.insert(first.id(), data.clone());
                fac.store.push((doc.id, first.id()));
                if fac.index == 0 {
                    fac.enqueue(first.clone());
                }
            }
        }
        let mut edits: Vec<(u64, usize, usize)> = (0..edit_count)
            .map(|_| {
                (
                    rng.random_range(0..knobs.chaos_ms),
                    rng.random_range(0..n),
                    rng.random_range(0..doc_count),
                )
            })
            .collect();
        edits.sort();
        let mut faults: Vec<(u64, Fault)> = Vec::new();
        let storm = 0..knobs.chaos_ms;
        for _ in 0..knobs.crashes {
            faults.push((rng.random_range(storm.clone()), Fault::Crash));
        }
        for _ in 0..rng.random_range(0..=knobs.disconnects) {
            faults.push((
                rng.random_range(storm.clone()),
                Fault::Disconnect(rng.random_range(0..n)),
            ));
        }
        for _ in 0..rng.random_range(knobs.restarts.min(1)..=knobs.restarts) {
            faults.push((
                rng.random_range(storm.clone()),
                Fault::Restart(rng.random_range(0..n)),
            ));
        }
        if let Some(code) = knobs.refuse {
            let at = rng.random_range(knobs.chaos_ms / 4..knobs.chaos_ms * 3 / 4);
            faults.push((at, Fault::Refuse(n - 1, code)));
        }
        faults.sort_by_key(|(at, _)| *at);
        Self {
            relay: Relay::new(docs.iter().map(|d| d.id), knobs.page, knobs.overlap),
            knobs,
            rng,
            t0: Instant::now(),
            now: 0,
            docs,
            facilities,
            net: BTreeMap::new(),
            packets: 0,
            conns: 0,
            edits: edits.into(),
            faults: faults.into(),
            opened: HashMap::new(),
            lost_in_crash: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// A storm of `knobs.chaos_ms`, then a healed network until everything settles.
    fn run(seed: u64, knobs: Knobs) -> Self {
        let mut sim = Sim::new(seed, knobs);
        while sim.now < knobs.chaos_ms && sim.step() {}
        sim.heal();
        sim
    }

    fn instant(&self) -> Instant {
        self.t0 + ms(self.now)
    }

    /// The next moment anything happens: a delivery, a flush, a timer, an edit, a fault, a reconnection.
    fn next_moment(&self) -> Option<u64> {
        let to_ms = |t: Instant| (t - self.t0).as_micros().div_ceil(1000) as u64;
        let facilities = self.facilities.iter().flat_map(|f| {
            let reconnect = f.conn.is_none().then_some(f.reconnect_at);
            [reconnect, f.session.poll_timeout().map(to_ms)]
        });
        [
            self.net.first_key_value().map(|((at, _), _)| *at),
            self.relay.unflushed.front().map(|u| u.durable_at),
            self.relay.down_until,
            self.edits.front().map(|(at, ..)| *at),
            self.faults.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .chain(facilities)
        .flatten()
        .min()
    }

    /// Jumps to the next moment anything happens and lets it happen; false when nothing ever will.
    fn step(&mut self) -> bool {
        let Some(next) = self.next_moment() else {
            return false;
        };
        self.now = next.max(self.now + 1);
        if self.relay.down_until.is_some_and(|t| self.now >= t) {
            self.relay.down_until = None;
        }
        self.deliver();
        self.flush();
        while let Some(&(at, fault)) = self.faults.front()
            && at <= self.now
        {
            self.faults.pop_front();
            self.fault(fault);
        }
        while let Some(&(at, f, d)) = self.edits.front()
            && at <= self.now
        {
            self.edits.pop_front();
            self.edit(f, d);
        }
        for f in 0..self.facilities.len() {
            let fac = &mut self.facilities[f];
            if fac.conn.is_none() && self.relay.is_up() && self.now >= fac.reconnect_at {
                self.conns += 1;
                fac.conn = Some(self.conns);
                fac.session.handle_connected(self.t0 + ms(self.now));
            }
        }
        for f in 0..self.facilities.len() {
            self.drive(f);
        }
        true
    }

    /// The network heals: from now on nothing is lost or late. Remaining edits and faults still happen.
    fn heal(&mut self) {
        self.knobs = self.knobs.healed();
        let deadline = self.now + SETTLE_MS_MAX;
        while !self.settled() {
            assert!(
                self.now < deadline && self.step(),
                "the healed network did not settle:\n{}",
                self.describe()
            );
        }
    }

    /// Nothing on the wire, nothing unflushed, nothing left to happen; every facility the relay accepts is
    /// connected and caught up, and every one it refuses was told.
    fn settled(&self) -> bool {
        self.net.is_empty()
            && self.relay.unflushed.is_empty()
            && self.edits.is_empty()
            && self.faults.is_empty()
            && self.facilities.iter().all(|f| {
                if self.relay.refused.contains_key(&f.index) {
                    !f.refused.is_empty()
                } else {
                    f.conn.is_some() && f.session.is_caught_up() && f.caught_up_last
                }
            })
    }

    fn describe(&self) -> String {
        let mut out = format!("now={} relay heads: ", self.now);
        for d in &self.docs {
            out += &format!("{} ", self.relay.head(d.id));
        }
        for f in &self.facilities {
            out += &format!(
                "\nfacility {}: conn={:?} caught_up={} outbox={} cursors={:?} refused={:?}\n  {:?}",
                f.index,
                f.conn,
                f.session.is_caught_up(),
                f.outbox.len(),
                f.cursors.values().collect::<Vec<_>>(),
                f.refused,
                f.session
            );
        }
        out
    }

    // --- the facility side -----------------------------------------------------------------------

    fn edit(&mut self, f: usize, d: usize) {
        let (rng, fac, doc) = (&mut self.rng, &mut self.facilities[f], &self.docs[d]);
        let live = fac
            .live
            .get_mut(&doc.id)
            .expect("every facility holds every shared document");
        let before = live.get_heads();
        let text = text_obj(live);
        let len = live.length(&text);
        let pos = rng.random_range(0..=len);
        let del = if pos < len && rng.random_bool(0.3) {
            rng.random_range(1..=(len - pos).min(4))
        } else {
            0
        };
        let word = WORDS[rng.random_range(0..WORDS.len())];
        live.splice_text(&text, pos, del as isize, word)
            .expect("splice within the text");
        live.commit_with(CommitOptions::default().with_time(self.now as i64));
        let data = live.save_after(&before);
        let envelope = Envelope::seal(
            &fac.device,
            fac.id,
            doc.id,
            Epoch(0),
            &doc.key,
            &Payload::Changes { data: data.clone() },
        )
        .expect("seal an edit");
        fac.changes.insert(envelope.id(), data);
        fac.store.push((doc.id, envelope.id()));
        fac.enqueue(envelope);
        self.stats.edits += 1;
    }

    /// The driver's loop for one facility: timers, requests out, events in.
    fn drive(&mut self, f: usize) {
        let now = self.instant();
        let fac = &mut self.facilities[f];
        if fac.session.poll_timeout().is_some_and(|t| t <= now) {
            fac.session.handle_timeout(now);
        }
        let mut out = Vec::new();
        while let Some(t) = fac.session.poll_transmit(now) {
            assert!(
                fac.refused.is_empty(),
                "facility {f} sent {:?} after the relay refused it",
                t.request
            );
            out.push(t);
        }
        while let Some(event) = fac.session.poll_event() {
            fac.apply(event, &self.docs, &mut self.opened, &mut self.stats);
        }
        let conn = fac.conn;
        for t in out {
            let conn = conn.expect("only a connected session transmits");
            self.send_request(f, conn, t);
        }
    }

    // --- the network -----------------------------------------------------------------------------

    fn post(&mut self, delay: u64, facility: usize, conn: u64, msg: Msg) {
        self.packets += 1;
        self.net.insert(
            (self.now + delay, self.packets),
            Packet {
                facility,
                conn,
                msg,
            },
        );
    }

    fn delay(&mut self) -> u64 {
        if self.rng.random_bool(self.knobs.late) {
            self.rng
                .random_range(REQUEST_TIMEOUT_MS..=2 * REQUEST_TIMEOUT_MS)
        } else {
            self.rng.random_range(1..=self.knobs.delay_max_ms)
        }
    }

    /// A message of request `id` is lost; perhaps the transport says so, perhaps only the timeout will.
    fn lose(&mut self, facility: usize, conn: u64, id: RequestId) {
        self.stats.lost_messages += 1;
        if self.rng.random_bool(self.knobs.reported) {
            self.stats.failures_reported += 1;
            let delay = self.rng.random_range(1..=self.knobs.delay_max_ms);
            self.post(delay, facility, conn, Msg::Failure { id });
        }
    }

    fn send_request(&mut self, f: usize, conn: u64, t: Transmit) {
        if self.rng.random_bool(self.knobs.drop_request) {
            self.lose(f, conn, t.id);
            return;
        }
        let delay = self.delay();
        self.post(
            delay,
            f,
            conn,
            Msg::Request {
                id: t.id,
                request: t.request,
                sent_at: self.now,
            },
        );
    }

    fn respond(&mut self, f: usize, conn: u64, id: RequestId, response: Response, sent_at: u64) {
        if self.rng.random_bool(self.knobs.drop_response) {
            self.lose(f, conn, id);
            return;
        }
        let delay = self.delay();
        self.post(
            delay,
            f,
            conn,
            Msg::Response {
                id,
                response,
                sent_at,
            },
        );
    }

    fn deliver(&mut self) {
        while let Some(entry) = self.net.first_entry()
            && entry.key().0 <= self.now
        {
            let Packet {
                facility: f,
                conn,
                msg,
            } = entry.remove();
            if self.facilities[f].conn != Some(conn) {
                continue; // that connection is closed; whatever was on it is gone
            }
            let now = self.instant();
            match msg {
                Msg::Request {
                    id,
                    request,
                    sent_at,
                } => self.relay_receive(f, conn, id, request, sent_at),
                Msg::Response {
                    id,
                    response,
                    sent_at,
                } => {
                    if self.now - sent_at >= REQUEST_TIMEOUT_MS {
                        self.stats.late_answers += 1;
                    }
                    self.facilities[f]
                        .session
                        .handle_response(id, response, now);
                }
                Msg::Notify { doc, head } => {
                    self.facilities[f]
                        .session
                        .handle_notify(doc, head, Epoch(0), now)
                }
                Msg::Failure { id } => self.facilities[f].session.handle_failure(id, now),
            }
        }
    }

    fn relay_receive(
        &mut self,
        f: usize,
        conn: u64,
        id: RequestId,
        request: Request,
        sent_at: u64,
    ) {
        if let Some(code) = self.relay.refused.get(&f) {
            self.respond(
                f,
                conn,
                id,
                Response::error(*code, "this device may not sync"),
                sent_at,
            );
            return;
        }
        if self.rng.random_bool(self.knobs.transient) {
            self.stats.transient_errors += 1;
            self.respond(
                f,
                conn,
                id,
                Response::error(ErrorCode::Internal, "try again later"),
                sent_at,
            );
            return;
        }
        match request {
            Request::Push { items } => {
                let last = self.relay.unflushed.back().map_or(0, |u| u.durable_at);
                let durable_at =
                    (self.now + self.rng.random_range(0..=self.knobs.flush_max_ms)).max(last);
                self.relay.unflushed.push_back(Unflushed {
                    from: f,
                    conn,
                    id,
                    sent_at,
                    items,
                    durable_at,
                });
            }
            other => {
                let response = self.relay.answer(&other);
                self.respond(f, conn, id, response, sent_at);
            }
        }
    }

    /// The relay makes received pushes durable, in order, then answers them and notifies members.
    fn flush(&mut self) {
        while self
            .relay
            .unflushed
            .front()
            .is_some_and(|u| u.durable_at <= self.now)
        {
            let u = self.relay.unflushed.pop_front().expect("front was Some");
            let before: Vec<Seq> = self.docs.iter().map(|d| self.relay.head(d.id)).collect();
            let results = self.relay.store(&u.items);
            self.respond(
                u.from,
                u.conn,
                u.id,
                Response::Pushed { results },
                u.sent_at,
            );
            for (d, before) in before.into_iter().enumerate() {
                let doc = self.docs[d].id;
                let head = self.relay.head(doc);
                if head == before {
                    continue;
                }
                for g in 0..self.facilities.len() {
                    if let Some(conn) = self.facilities[g].conn
                        && !self.relay.refused.contains_key(&g)
                    {
                        let delay = self.delay();
                        self.post(delay, g, conn, Msg::Notify { doc, head });
                    }
                }
            }
        }
    }

    // --- faults ----------------------------------------------------------------------------------

    fn fault(&mut self, fault: Fault) {
        match fault {
            Fault::Crash if self.relay.is_up() => self.crash(),
            Fault::Crash => {}
            Fault::Disconnect(f) if self.facilities[f].conn.is_some() => self.disconnect(f),
            Fault::Disconnect(_) => {}
            Fault::Restart(f) => self.restart(f),
            Fault::Refuse(f, code) => {
                // The relay refuses the device from now on and drops its connection at once.
                self.relay.refused.insert(f, code);
                self.stats.refused += 1;
                if self.facilities[f].conn.is_some() {
                    self.disconnect(f);
                }
            }
        }
    }

    fn disconnect(&mut self, f: usize) {
        self.stats.disconnects += 1;
        let now = self.instant();
        let down = self.rng.random_range(0..=300);
        let fac = &mut self.facilities[f];
        fac.session.handle_disconnected(now);
        fac.conn = None;
        fac.reconnect_at = self.now + down;
    }

    /// The relay dies: what it had not made durable is gone, and so is every connection.
    fn crash(&mut self) {
        self.stats.crashes += 1;
        for u in self.relay.unflushed.drain(..) {
            for item in &u.items {
                if let PushItem::Bundle { envelope } = item {
                    self.stats.lost_in_crash += 1;
                    self.lost_in_crash.push(envelope.id());
                }
            }
        }
        self.net.clear();
        self.relay.down_until = Some(self.now + self.rng.random_range(50..=400));
        for f in 0..self.facilities.len() {
            if self.facilities[f].conn.is_some() {
                self.disconnect(f);
            }
        }
        // Nothing the relay acknowledged to anyone is lost.
        for fac in &self.facilities {
            for (id, seq) in &fac.acked {
                assert_eq!(
                    self.relay.held.get(id).map(|(_, s)| *s),
                    Some(*seq),
                    "the relay lost bundle {id:?} it had acknowledged to facility {}",
                    fac.index
                );
            }
        }
    }

    /// The facility's process restarts: a new session from what the driver stored.
    fn restart(&mut self, f: usize) {
        self.stats.restarts += 1;
        let forget = self.knobs.forget_cursors;
        let down = self.rng.random_range(0..=100);
        let fac = &mut self.facilities[f];
        if forget {
            fac.cursors.clear();
        }
        let cursors = fac.cursors.iter().map(|(d, s)| (*d, *s)).collect();
        fac.session = Session::new(
            session_config(),
            Known {
                cursors,
                epochs: epochs(&self.docs),
                ..Known::default()
            },
        );
        for (item, envelope) in &fac.outbox {
            fac.session.push(
                *item,
                PushItem::Bundle {
                    envelope: envelope.clone(),
                },
            );
        }
        fac.conn = None;
        fac.reconnect_at = self.now + down;
        fac.caught_up_last = false;
    }

    // --- what a user would notice ----------------------------------------------------------------

    fn accepted(&self) -> impl Iterator<Item = &Facility> {
        self.facilities
            .iter()
            .filter(|f| !self.relay.refused.contains_key(&f.index))
    }

    /// Every item pushed was answered exactly once, Accepted or Duplicate; the relay holds each bundle
    /// once, under the sequence number it told its author.
    fn assert_every_push_answered_once(&self) {
        self.relay.assert_each_bundle_once();
        for fac in self.accepted() {
            let f = fac.index;
            assert!(
                fac.outbox.is_empty(),
                "facility {f}: {} items never answered",
                fac.outbox.len()
            );
            assert_eq!(
                fac.session.pending_pushes(),
                0,
                "facility {f}: the session still holds pushes"
            );
            assert_eq!(
                fac.answers.len() as u64,
                fac.next_outbox,
                "facility {f}: not every item was answered"
            );
            for (item, answers) in &fac.answers {
                assert_eq!(
                    answers.len(),
                    1,
                    "facility {f}: item {item:?} answered {answers:?}"
                );
            }
            for id in &fac.made {
                assert!(
                    self.relay.held.contains_key(id),
                    "facility {f}: bundle {id:?} never reached the relay"
                );
            }
        }
        for fac in &self.facilities {
            for (id, seq) in &fac.acked {
                assert_eq!(
                    self.relay.held.get(id).map(|(_, s)| *s),
                    Some(*seq),
                    "facility {}: {id:?}",
                    fac.index
                );
            }
        }
    }

    /// Everything a run did that does not depend on age's own randomness (bundle ids do).
    fn trace(&self) -> Trace {
        Trace {
            ended_at: self.now,
            stats: format!("{:?}", self.stats),
            relay: self.docs.iter().map(|d| self.relay_changes(d)).collect(),
            stores: self
                .facilities
                .iter()
                .map(|f| {
                    f.store
                        .iter()
                        .map(|(_, id)| f.changes[id].clone())
                        .collect()
                })
                .collect(),
        }
    }

    /// What the relay's log of `doc` reads as, loaded in sequence order.
    fn relay_view(&self, doc: &SharedDoc) -> Seen {
        load_all(self.relay_changes(doc).iter().map(Vec::as_slice))
    }

    /// The changes of the relay's log of `doc`, in sequence order.
    fn relay_changes(&self, doc: &SharedDoc) -> Vec<Vec<u8>> {
        self.relay.logs[&doc.id]
            .iter()
            .map(|e| {
                self.opened
                    .get(&e.id())
                    .cloned()
                    .unwrap_or_else(|| changes_of(e, &doc.key))
            })
            .collect()
    }

    /// Every facility the relay accepts is caught up, said so, and reads the same documents as the relay.
    fn assert_converged(&self) {
        for doc in &self.docs {
            let relay = self.relay_view(doc);
            for fac in self.accepted() {
                let f = fac.index;
                assert!(
                    fac.session.is_caught_up(),
                    "facility {f} is not caught up:\n{}",
                    self.describe()
                );
                assert!(
                    fac.caught_up_last,
                    "facility {f} did not report CaughtUp last"
                );
                assert_eq!(
                    fac.rebuild(doc),
                    relay,
                    "facility {f}: its stored bundles read differently"
                );
                let mut live = fac.live[&doc.id].clone();
                assert_eq!(
                    seen(&mut live),
                    relay,
                    "facility {f}: its working document differs"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------------

/// (1) Through lost, late and reordered requests and answers, timeouts, transient errors and cut
/// connections, every bundle a facility pushes is answered exactly once (Accepted or Duplicate),
/// and the relay holds each bundle once.
#[test]
fn every_push_is_answered_exactly_once_through_a_stormy_network() {
    let stats = run_seeds(|seed| {
        let sim = Sim::run(seed, Knobs::stormy());
        sim.assert_every_push_answered_once();
        for fac in &sim.facilities {
            // No restarts and a tidy relay here: no bundle needs to arrive twice.
            let twice: Vec<_> = fac.pulled.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                twice.is_empty(),
                "facility {}: pulled again {twice:?}",
                fac.index
            );
        }
        sim.stats
    });
    if stats.many() {
        assert!(
            stats.lost_messages > 0 && stats.failures_reported > 0,
            "{stats:?}"
        );
        assert!(
            stats.late_answers > 0 && stats.duplicate_answers > 0,
            "{stats:?}"
        );
        assert!(
            stats.transient_errors > 0 && stats.disconnects > 0,
            "{stats:?}"
        );
    }
}

/// (2) Once the network heals, every facility reports CaughtUp, and all of them read the same text
/// with the same heads as the relay's log — whatever they edited offline, in whatever order.
#[test]
fn after_the_network_heals_every_facility_is_caught_up_with_the_same_documents() {
    let stats = run_seeds(|seed| {
        let sim = Sim::run(
            seed,
            Knobs {
                crashes: 1,
                ..Knobs::stormy()
            },
        );
        sim.assert_converged();
        sim.assert_every_push_answered_once();
        sim.stats
    });
    if stats.many() {
        assert!(
            stats.edits > 0 && stats.crashes > 0 && stats.disconnects > 0,
            "{stats:?}"
        );
    }
}

/// (3) The relay crashes, losing pushes it received but had not made durable. It never loses what it
/// acknowledged (checked at every crash), and the sessions push the lost items again.
#[test]
fn a_relay_crash_loses_nothing_acknowledged_and_unacknowledged_items_are_pushed_again() {
    let stats = run_seeds(|seed| {
        let knobs = Knobs {
            crashes: 3,
            flush_max_ms: 80,
            ..Knobs::stormy()
        };
        let sim = Sim::run(seed, knobs);
        sim.assert_every_push_answered_once();
        for id in &sim.lost_in_crash {
            assert!(
                sim.relay.held.contains_key(id),
                "bundle {id:?}, lost in a crash, was never pushed again"
            );
        }
        sim.assert_converged();
        sim.stats
    });
    if stats.many() {
        assert!(stats.crashes > stats.seeds, "{stats:?}");
        assert!(
            stats.lost_in_crash > 0,
            "no crash ever lost an unacknowledged push: {stats:?}"
        );
    }
}

/// (4) Receiving a bundle twice or out of order changes nothing (DESIGN invariant 6): facilities that
/// restart without their cursors pull everything again, a sloppy relay repeats bundles, and still every
/// store reads the same; and any order of the relay's bundles, with repeats, gives the same document.
#[test]
fn receiving_bundles_twice_or_out_of_order_changes_nothing() {
    let stats = run_seeds(|seed| {
        let knobs = Knobs {
            restarts: 4,
            forget_cursors: true,
            overlap: true,
            page: 2,
            crashes: 1,
            ..Knobs::stormy()
        };
        let mut sim = Sim::run(seed, knobs);
        sim.assert_converged();
        sim.assert_every_push_answered_once();
        for doc in &sim.docs {
            let reference = sim.relay_view(doc);
            let changes = sim.relay_changes(doc);
            for _ in 0..2 {
                // Each bundle once to three times, in a random order.
                let mut shuffled: Vec<&[u8]> = changes
                    .iter()
                    .flat_map(|c| std::iter::repeat_n(c.as_slice(), sim.rng.random_range(1..=3)))
                    .collect();
                for i in (1..shuffled.len()).rev() {
                    shuffled.swap(i, sim.rng.random_range(0..=i));
                }
                assert_eq!(
                    load_all(shuffled),
                    reference,
                    "another order or repeats changed the document"
                );
            }
            // A replica that holds everything is unchanged by all of it again.
            let mut replica = sim.facilities[0].live[&doc.id].clone();
            for c in &changes {
                replica.load_incremental(c).expect("changes load");
            }
            assert_eq!(seen(&mut replica), reference);
        }
        sim.stats
    });
    if stats.many() {
        assert!(
            stats.restarts > 0 && stats.received_again > stats.seeds,
            "{stats:?}"
        );
    }
}

/// (5) The relay refuses a device part-way (not enrolled, or revoked): its session reports Refused and
/// sends nothing more, even after reconnecting; it loses none of its unsent work, and the other
/// facilities carry on and converge.
#[test]
fn a_refused_device_stops_syncing_and_the_others_carry_on() {
    let stats = run_seeds(|seed| {
        let code = if seed % 2 == 0 {
            ErrorCode::Revoked
        } else {
            ErrorCode::NotEnrolled
        };
        let sim = Sim::run(
            seed,
            Knobs {
                refuse: Some(code),
                ..Knobs::stormy()
            },
        );
        let refused = sim.facilities.last().expect("several facilities");
        assert_eq!(
            refused.refused.first(),
            Some(&code),
            "facility {} was not told",
            refused.index
        );
        assert!(refused.session.is_refused() && !refused.session.is_caught_up());
        assert_eq!(
            refused.refused.len(),
            1,
            "Refused reported more than once: {:?}",
            refused.refused
        );
        // Its unanswered edits are still in its outbox, not dropped and not reported as rejected.
        for id in &refused.made {
            assert!(
                sim.relay.held.contains_key(id) || refused.outbox.values().any(|e| e.id() == *id),
                "the refused facility lost its bundle {id:?}"
            );
        }
        sim.assert_every_push_answered_once();
        sim.assert_converged();
        sim.stats
    });
    assert_eq!(stats.refused, stats.seeds);
}

/// A seed replays its run exactly: the same messages at the same moments, the same faults, the same
/// documents in the same order at every facility (DESIGN: "seeds are printed and replayable").
#[test]
fn a_seed_replays_the_same_run() {
    run_seeds_n(10, |seed| {
        let knobs = Knobs {
            crashes: 1,
            restarts: 2,
            ..Knobs::stormy()
        };
        let first = Sim::run(seed, knobs);
        let again = Sim::run(seed, knobs);
        assert!(
            first.trace() == again.trace(),
            "seed {seed} ran differently the second time"
        );
        first.stats
    });
}

/// Answers to a lone session, straight from a model relay.
struct Bench {
    session: Session,
    relay: Relay,
    doc: SharedDoc,
    device: DeviceSecrets,
    facility: FacilityId,
    t0: Instant,
    now: u64,
    pulled: BTreeMap<Seq, u32>,
    answers: BTreeMap<OutboxId, Vec<PushResult>>,
    caught_up: bool,
}

impl Bench {
    fn new(rng: &mut ChaCha8Rng, config: SessionConfig) -> Self {
        let doc = SharedDoc {
            id: DocumentId::from_random_bytes(rng.random()),
            key: DocumentKey::from_seed(rng.random()),
        };
        Self {
            session: Session::new(
                config,
                Known {
                    epochs: HashMap::from([(doc.id, Epoch(0))]),
                    ..Known::default()
                },
            ),
            relay: Relay::new([doc.id], 3, false),
            doc,
            device: DeviceSecrets::from_seeds(rng.random(), rng.random()),
            facility: FacilityId::from_random_bytes(rng.random()),
            t0: Instant::now(),
            now: 0,
            pulled: BTreeMap::new(),
            answers: BTreeMap::new(),
            caught_up: false,
        }
    }

    fn at(&self, ms_: u64) -> Instant {
        self.t0 + ms(ms_)
    }

    /// A new sealed bundle (each seal differs: age draws its own file key).
    fn bundle(&self, n: u64) -> Envelope {
        let payload = Payload::Changes {
            data: format!("bundle {n}").into_bytes(),
        };
        Envelope::seal(
            &self.device,
            self.facility,
            self.doc.id,
            Epoch(0),
            &self.doc.key,
            &payload,
        )
        .expect("seal")
    }

    /// Another facility's bundle reaches the relay.
    fn elsewhere(&mut self, n: u64) -> Seq {
        let item = PushItem::Bundle {
            envelope: self.bundle(n),
        };
        assert!(matches!(
            self.relay.store(&[item])[0],
            PushResult::Accepted { .. }
        ));
        self.relay.head(self.doc.id)
    }

    fn send(&mut self) -> Vec<Transmit> {
        let now = self.at(self.now);
        std::iter::from_fn(|| self.session.poll_transmit(now)).collect()
    }

    fn answer(&mut self, t: &Transmit) -> Response {
        match &t.request {
            Request::Push { items } => Response::Pushed {
                results: self.relay.store(items),
            },
            other => self.relay.answer(other),
        }
    }

    fn events(&mut self) {
        while let Some(e) = self.session.poll_event() {
            self.caught_up = matches!(e, Event::CaughtUp);
            match e {
                Event::Pulled { items, .. } => {
                    for p in items {
                        *self.pulled.entry(p.seq).or_default() += 1;
                    }
                }
                Event::Pushed { item, result } => {
                    self.answers.entry(item).or_default().push(result)
                }
                Event::Refused { code, .. } => panic!("refused: {code:?}"),
                _ => {}
            }
        }
    }

    /// A healthy relay answers everything at once until the session is caught up.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let now = self.at(self.now);
            if self.session.poll_timeout().is_some_and(|t| t <= now) {
                self.session.handle_timeout(now);
            }
            for t in self.send() {
                let r = self.answer(&t);
                self.session.handle_response(t.id, r, now);
            }
            self.events();
            if self.session.is_caught_up() && self.caught_up {
                return;
            }
            self.now += 1;
        }
        panic!("the session never caught up: {:?}", self.session);
    }
}

/// (6) While the relay keeps failing (transport failures, `Internal` errors, silence until the timeout),
/// the session waits before retrying — it sends nothing however often the driver asks — and the wait
/// grows but never beyond the configured maximum.
#[test]
fn after_repeated_failures_the_session_waits_but_never_longer_than_the_maximum() {
    run_seeds(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let max_ms = rng.random_range(100..=3_000);
        let config = SessionConfig {
            request_timeout: ms(rng.random_range(100..=1_000)),
            backoff_initial: ms(rng.random_range(1..=50)),
            backoff_max: ms(max_ms),
        };
        let mut b = Bench::new(&mut rng, config.clone());
        b.session.handle_connected(b.at(0));
        if rng.random_bool(0.5) {
            b.session.push(
                OutboxId(0),
                PushItem::Bundle {
                    envelope: b.bundle(0),
                },
            );
        }
        let mut waits = Vec::new();
        for round in 0..24 {
            let sent = b.send();
            assert!(
                !sent.is_empty(),
                "round {round}: the retry time came but nothing was sent"
            );
            match rng.random_range(0..3) {
                0 | 1 => {
                    b.now += rng.random_range(0..config.request_timeout.as_millis() as u64);
                    for t in &sent {
                        if rng.random_bool(0.5) {
                            b.session.handle_failure(t.id, b.at(b.now));
                        } else {
                            let busy = Response::error(ErrorCode::Internal, "disk busy");
                            b.session.handle_response(t.id, busy, b.at(b.now));
                        }
                    }
                }
                _ => {
                    let deadline = b
                        .session
                        .poll_timeout()
                        .expect("requests in flight have a deadline");
                    b.now = (deadline - b.t0).as_millis() as u64;
                    b.session.handle_timeout(b.at(b.now));
                }
            }
            let failed_at = b.now;
            let retry = b
                .session
                .poll_timeout()
                .expect("a failed session schedules its retry");
            let wait = retry - b.at(failed_at);
            assert!(wait > Duration::ZERO, "round {round}: retries at once");
            assert!(
                wait <= config.backoff_max,
                "round {round}: waits {wait:?}, over {:?}",
                config.backoff_max
            );
            let mut asks: Vec<u64> = (0..4)
                .map(|_| failed_at + rng.random_range(0..wait.as_millis() as u64))
                .collect();
            asks.sort();
            for t in asks {
                b.session.handle_timeout(b.at(t));
                assert!(
                    b.session.poll_transmit(b.at(t)).is_none(),
                    "round {round}: sent during the backoff"
                );
            }
            b.now = (retry - b.t0).as_millis() as u64;
            b.session.handle_timeout(b.at(b.now));
            waits.push(wait);
        }
        assert!(waits[0] >= config.backoff_initial, "{waits:?}");
        assert!(
            waits.windows(2).all(|w| w[0] <= w[1]),
            "the wait shrank while failures went on: {waits:?}"
        );
        assert_eq!(
            waits.last(),
            Some(&config.backoff_max),
            "the wait never reached its maximum: {waits:?}"
        );
        b.events();
        assert!(
            b.answers.is_empty(),
            "failures are not answers: {:?}",
            b.answers
        );
        Stats::default()
    });
}

/// (6b) Once the relay answers again, the next hiccup is retried after the first, short delay — also
/// for a facility that only reads (nothing to push), such as the disaster HQ.
#[test]
fn once_the_relay_answers_again_the_backoff_starts_over() {
    run_seeds(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = SessionConfig {
            request_timeout: ms(500),
            backoff_initial: ms(rng.random_range(1..=50)),
            backoff_max: ms(rng.random_range(1_000..=30_000)),
        };
        let mut b = Bench::new(&mut rng, config.clone());
        for n in 0..rng.random_range(0..5) {
            b.elsewhere(n);
        }
        let pushes = rng.random_bool(0.5);
        if pushes {
            b.session.push(
                OutboxId(0),
                PushItem::Bundle {
                    envelope: b.bundle(100),
                },
            );
        }
        b.session.handle_connected(b.at(0));
        // The relay is unreachable for a while: the backoff climbs to its maximum.
        for _ in 0..20 {
            for t in b.send() {
                b.session.handle_failure(t.id, b.at(b.now));
            }
            b.now =
                (b.session.poll_timeout().expect("a retry is scheduled") - b.t0).as_millis() as u64;
            b.session.handle_timeout(b.at(b.now));
        }
        // Then it answers, and the session catches up.
        b.settle();
        // A new bundle elsewhere; the pull for it fails once.
        let head = b.elsewhere(1_000);
        b.session
            .handle_notify(b.doc.id, head, Epoch(0), b.at(b.now));
        let sent = b.send();
        assert!(
            matches!(
                sent[..],
                [Transmit {
                    request: Request::Pull { .. },
                    ..
                }]
            ),
            "the notify asks for a pull"
        );
        b.now += 3;
        b.session.handle_failure(sent[0].id, b.at(b.now));
        let wait = b.session.poll_timeout().expect("a retry is scheduled") - b.at(b.now);
        assert_eq!(
            wait, config.backoff_initial,
            "after answers came again the first retry waits {wait:?}, not {:?} (pushed: {pushes})",
            config.backoff_initial
        );
        Stats::default()
    });
}

/// (7) A request times out (or the transport reports it failed) although the relay did handle it; its
/// answer arrives late, before or after the answer to the retry. The late answer is ignored: every item
/// is answered exactly once, every bundle arrives exactly once, and nothing is lost.
#[test]
fn a_late_answer_to_a_timed_out_request_is_ignored() {
    run_seeds(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut b = Bench::new(&mut rng, session_config());
        for n in 0..rng.random_range(0..4) {
            b.elsewhere(n);
        }
        b.session.handle_connected(b.at(0));
        b.settle();
        // Own items to push, and news from elsewhere to pull.
        let items = rng.random_range(1..=5);
        let own: Vec<Envelope> = (0..items).map(|i| b.bundle(100 + i)).collect();
        for (i, envelope) in own.iter().enumerate() {
            b.session.push(
                OutboxId(i as u64),
                PushItem::Bundle {
                    envelope: envelope.clone(),
                },
            );
        }
        let head = b.elsewhere(200);
        b.session
            .handle_notify(b.doc.id, head, Epoch(0), b.at(b.now));
        let first = b.send();
        assert_eq!(
            first.len(),
            2,
            "a push and a pull: {:?}",
            first.iter().map(|t| &t.request).collect::<Vec<_>>()
        );
        // The relay handles both, but its answers are slow.
        let mut late: Vec<(RequestId, Response)> =
            first.iter().map(|t| (t.id, b.answer(t))).collect();
        if rng.random_bool(0.5) {
            b.elsewhere(300); // more news meanwhile
        }
        if rng.random_bool(0.5) {
            b.now += REQUEST_TIMEOUT_MS;
            b.session.handle_timeout(b.at(b.now));
        } else {
            b.now += rng.random_range(1..REQUEST_TIMEOUT_MS);
            for t in &first {
                b.session.handle_failure(t.id, b.at(b.now));
            }
        }
        // Some late answers arrive during the backoff.
        late.retain(|(id, response)| {
            if rng.random_bool(0.3) {
                b.session
                    .handle_response(*id, response.clone(), b.at(b.now));
                false
            } else {
                true
            }
        });
        b.events();
        assert!(
            b.answers.is_empty() && (b.pulled.len() as u64) < head.0,
            "a late answer counted"
        );
        b.now = (b.session.poll_timeout().expect("a retry is scheduled") - b.t0).as_millis() as u64;
        b.session.handle_timeout(b.at(b.now));
        let retry = b.send();
        assert!(!retry.is_empty(), "the session retries");
        let mut answers: Vec<(RequestId, Response)> =
            retry.iter().map(|t| (t.id, b.answer(t))).collect();
        answers.extend(late.iter().cloned());
        answers.extend(late); // and some arrive twice
        for i in (1..answers.len()).rev() {
            answers.swap(i, rng.random_range(0..=i));
        }
        for (id, response) in answers {
            b.now += 1;
            b.session.handle_response(id, response, b.at(b.now));
        }
        b.settle();
        b.relay.assert_each_bundle_once();
        assert_eq!(b.session.pending_pushes(), 0);
        for i in 0..items {
            let answers = &b.answers[&OutboxId(i)];
            assert_eq!(answers.len(), 1, "item {i} answered {answers:?}");
            let seq = match answers[0] {
                PushResult::Accepted { seq: Some(s), .. }
                | PushResult::Duplicate { seq: Some(s), .. } => s,
                ref other => panic!("item {i} answered {other:?}"),
            };
            assert_eq!(
                b.relay.held.get(&own[i as usize].id()).map(|(_, s)| *s),
                Some(seq)
            );
        }
        let head = b.relay.head(b.doc.id);
        let expected: BTreeMap<Seq, u32> = (1..=head.0).map(|s| (Seq(s), 1)).collect();
        assert_eq!(b.pulled, expected, "every bundle arrives exactly once");
        Stats::default()
    });
}

/// A bundle written by a device enrolled after this device fetched the directory is not lost: the
/// driver hands it back (`handle_unknown_author`), the session fetches the directory before any
/// pull, then pulls the same bundle again. When that directory was no newer, a second hand-back is
/// refused, so an author unknown to the relay too cannot make the session loop.
#[test]
fn a_bundle_by_a_device_enrolled_later_is_pulled_again_after_the_directory() {
    run_seeds(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut b = Bench::new(&mut rng, session_config());
        b.session.handle_connected(b.at(0));
        b.settle();
        let seq = b.elsewhere(1);
        let now = b.at(b.now);
        b.session.handle_notify(b.doc.id, seq, Epoch(0), now);
        b.settle();
        assert_eq!(b.pulled.get(&seq), Some(&1), "the bundle was pulled once");

        assert!(b.session.handle_unknown_author(b.doc.id, seq));
        assert!(
            !b.session.is_caught_up(),
            "a handed-back bundle is not caught up"
        );
        let sent = b.send();
        assert!(
            matches!(
                sent.first().map(|t| &t.request),
                Some(Request::GetDirectory { .. })
            ),
            "the directory is fetched first: {sent:?}"
        );
        assert!(
            sent.iter()
                .all(|t| !matches!(t.request, Request::Pull { .. })),
            "no pull before the directory has arrived: {sent:?}"
        );
        let now = b.at(b.now);
        for t in sent {
            let r = b.answer(&t);
            b.session.handle_response(t.id, r, now);
        }
        b.settle();
        assert_eq!(b.pulled.get(&seq), Some(&2), "the bundle was pulled again");
        assert!(
            !b.session.handle_unknown_author(b.doc.id, seq),
            "the directory was no newer: the second hand-back is final"
        );
        Default::default()
    });
}

/// A bundle is handed back while the pull of the document's next page is already in flight (the
/// driver sends what the session wants before it applies an answer). That page's answer continues
/// past the handed-back bundle; it is ignored, so nothing is skipped: after the directory, every
/// bundle from the handed-back one on is pulled, each once.
#[test]
fn a_pull_in_flight_when_a_bundle_is_handed_back_skips_nothing() {
    run_seeds(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut b = Bench::new(&mut rng, session_config());
        b.session.handle_connected(b.at(0));
        b.settle();
        // More bundles than one answer carries (the model relay answers three at a time).
        let head = (0..7)
            .map(|n| b.elsewhere(n))
            .last()
            .expect("seven bundles");
        let now = b.at(b.now);
        b.session.handle_notify(b.doc.id, head, Epoch(0), now);
        let first_page = b.send();
        assert!(
            matches!(
                first_page[..],
                [Transmit {
                    request: Request::Pull { .. },
                    ..
                }]
            ),
            "{first_page:?}"
        );
        let r = b.answer(&first_page[0]);
        b.session.handle_response(first_page[0].id, r, now);
        let next_page = b.send();
        assert!(
            matches!(
                next_page[..],
                [Transmit {
                    request: Request::Pull { .. },
                    ..
                }]
            ),
            "the next page is asked for before the first is applied: {next_page:?}"
        );
        let from = match b.session.poll_event() {
            Some(Event::Pulled { items, .. }) => items[0].seq,
            other => panic!("the first page is reported: {other:?}"),
        };
        assert!(b.session.handle_unknown_author(b.doc.id, from));
        let r = b.answer(&next_page[0]);
        b.session.handle_response(next_page[0].id, r, now);
        assert!(
            b.session.poll_event().is_none(),
            "the answer to the pull in flight is ignored"
        );
        b.settle();
        assert_eq!(
            b.pulled,
            (1..=head.0)
                .map(|s| (Seq(s), 1))
                .collect::<BTreeMap<_, _>>(),
            "every bundle from the handed-back one on is pulled once more, none skipped"
        );
        Default::default()
    });
}

/// The session asks the relay for a directory newer than the last one it received, not than the one
/// it began with: after a directory change at connect, a hand-back whose directory fetch brings
/// nothing new is still final (the relay answers "no newer" rather than the same directory again,
/// which would make the session pull and hand back forever).
#[test]
fn a_hand_back_asks_for_a_directory_newer_than_the_last_one_received() {
    run_seeds(|seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut b = Bench::new(&mut rng, session_config());
        let relay_key = DeviceSecrets::from_seeds(rng.random(), rng.random());
        let current = rng.random_range(1..=1_000u64);
        let directory = SignedDirectory::sign(
            &DirectoryBody {
                deployment: DeploymentId::from_random_bytes(rng.random()),
                authority: relay_key.device_id(),
                version: current,
                facilities: vec![],
                revoked_devices: vec![],
                revoked_facilities: vec![],
            },
            &relay_key,
        );
        // One round trip of everything the session sends; returns the directory versions it quoted.
        let round = |b: &mut Bench| -> Vec<u64> {
            let now = b.at(b.now);
            let mut asked = Vec::new();
            for t in b.send() {
                let r = match t.request {
                    Request::GetDirectory { known_version } => {
                        asked.push(known_version);
                        Response::Directory {
                            directory: (known_version != current).then(|| directory.clone()),
                            relay_addrs: vec![],
                        }
                    }
                    _ => b.answer(&t),
                };
                b.session.handle_response(t.id, r, now);
            }
            b.events();
            b.now += 1;
            asked
        };
        let settle = |b: &mut Bench| -> Vec<u64> {
            let mut asked = Vec::new();
            for _ in 0..100 {
                asked.extend(round(b));
                if b.session.is_caught_up() {
                    return asked;
                }
            }
            panic!("the session never caught up: {:?}", b.session);
        };

        b.session.handle_connected(b.at(0));
        assert_eq!(settle(&mut b), [0], "the session began with no directory");
        let seq = b.elsewhere(1);
        let now = b.at(b.now);
        b.session.handle_notify(b.doc.id, seq, Epoch(0), now);
        settle(&mut b);
        assert!(b.session.handle_unknown_author(b.doc.id, seq));
        assert_eq!(
            settle(&mut b),
            [current],
            "the hand-back asks for a directory newer than the one received at connect"
        );
        assert_eq!(b.pulled.get(&seq), Some(&2), "the bundle was pulled again");
        assert!(
            !b.session.handle_unknown_author(b.doc.id, seq),
            "no newer directory came: the second hand-back is final"
        );
        Default::default()
    });
}

// --- the session against a relay that goes back in time, and the trust-model requests ---------------

/// A session that was connected and answered the relay's opening questions; returns it and `now`.
fn opened(known: Known) -> (Session, Instant) {
    let now = Instant::now();
    let mut s = Session::new(session_config(), known);
    s.handle_connected(now);
    (s, now)
}

/// Sends what the session wants and answers with `answer`, in a frame carrying `generation`.
fn exchange(
    s: &mut Session,
    now: Instant,
    generation: Option<[u8; 16]>,
    mut answer: impl FnMut(&Request) -> Response,
) -> Vec<Request> {
    let mut sent = Vec::new();
    while let Some(t) = s.poll_transmit(now) {
        let r = answer(&t.request);
        sent.push(t.request.clone());
        s.handle_response_frame(t.id, generation, r, now);
    }
    sent
}

fn info(doc: DocumentId, head: u64, ops: u32) -> DocumentInfo {
    DocumentInfo {
        id: doc,
        kind: DocumentKind::Referral,
        epoch: Epoch(0),
        head: Seq(head),
        ops,
        ops_head: None,
        log: LogHash::ZERO,
    }
}

fn plain(docs: Vec<DocumentInfo>) -> impl FnMut(&Request) -> Response {
    move |r| match r {
        Request::GetDirectory { .. } => Response::Directory {
            directory: None,
            relay_addrs: vec![],
        },
        Request::ListDocuments => Response::Documents { docs: docs.clone() },
        Request::GetJoinRequests => Response::JoinRequests { requests: vec![] },
        Request::GetOps { doc, .. } => Response::Ops {
            doc: *doc,
            ops: vec![],
            total: 0,
        },
        Request::GetKeyGrants { doc } => Response::KeyGrants {
            doc: *doc,
            grants: vec![],
        },
        Request::Pull { doc, after } => Response::Bundles {
            doc: *doc,
            items: vec![],
            head: *after,
            base: LogHash::ZERO,
        },
        other => panic!("unexpected {other:?}"),
    }
}

fn drain(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// The relay lists a document with a head below what this device pulled, and fewer operations than
/// it confirmed: the session says the relay is behind and sets its cursor back to the relay's head,
/// so bundles the relay numbers afresh after a rollback are pulled, not skipped.
#[test]
fn a_relay_that_holds_less_than_it_acknowledged_is_noticed_and_the_cursor_set_back() {
    let doc = DocumentId::from_random_bytes([1; 16]);
    let (mut s, now) = opened(Known {
        cursors: HashMap::from([(doc, Seq(10))]),
        ops: HashMap::from([(doc, 3)]),
        ..Known::default()
    });
    exchange(&mut s, now, Some([7; 16]), plain(vec![info(doc, 4, 2)]));
    let events = drain(&mut s);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Behind { doc: d, head: Seq(4), ops: Some(2) } if *d == doc
        )),
        "{events:?}"
    );
    // The next bundle the relay gives sequence 5 is pulled.
    let pulls = exchange(&mut s, now, Some([7; 16]), plain(vec![info(doc, 5, 2)]));
    assert!(
        pulls.is_empty()
            || pulls
                .iter()
                .all(|r| !matches!(r, Request::Pull { after, .. } if *after > Seq(4)))
    );
    s.handle_notify(doc, Seq(5), Epoch(0), now);
    let sent = exchange(&mut s, now, Some([7; 16]), plain(vec![]));
    assert!(
        sent.iter()
            .any(|r| matches!(r, Request::Pull { doc: d, after: Seq(4) } if *d == doc)),
        "the pull starts after the relay's head, not after the old cursor: {sent:?}"
    );
}

/// Another store generation in a relay's answer (a restore from a backup): the session reports it,
/// forgets every cursor (the relay numbers bundles afresh) and asks for the directory and the
/// document list again; the answer computed by the restored store is not applied.
#[test]
fn a_new_store_generation_resets_the_cursors_and_starts_over() {
    let doc = DocumentId::from_random_bytes([2; 16]);
    let (mut s, now) = opened(Known {
        cursors: HashMap::from([(doc, Seq(40))]),
        ops: HashMap::from([(doc, 2)]),
        generation: Some([1; 16]),
        ..Known::default()
    });
    let sent = exchange(&mut s, now, Some([2; 16]), plain(vec![info(doc, 3, 2)]));
    let events = drain(&mut s);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::RelayRestored { previous, now } if *previous == [1; 16] && *now == [2; 16]
        )),
        "{events:?}"
    );
    assert_eq!(s.generation(), Some([2; 16]));
    assert!(
        sent.iter().any(|r| matches!(r, Request::ListDocuments)),
        "the document list is asked for: {sent:?}"
    );
    s.handle_notify(doc, Seq(3), Epoch(0), now);
    let sent = exchange(&mut s, now, Some([2; 16]), plain(vec![]));
    assert!(
        sent.iter()
            .any(|r| matches!(r, Request::Pull { after: Seq(0), .. })),
        "everything is pulled again from the start: {sent:?}"
    );
}

/// The relay acknowledged a bundle at sequence number 3 (its log then known), went back to an older
/// copy, and gave 3 and 4 to other bundles. Its head is not below the cursor, but the log at 3
/// differs: the session says so and pulls everything again, in a listing and in a pull.
#[test]
fn another_bundle_under_a_sequence_number_seen_before_means_the_relay_went_back() {
    let doc = DocumentId::from_random_bytes([4; 16]);
    let seen = LogHash::ZERO.next(&BundleId([7; 32]));
    let other = LogHash::ZERO.next(&BundleId([8; 32]));
    let known = || Known {
        cursors: HashMap::from([(doc, Seq(2))]),
        witnesses: HashMap::from([(doc, (Seq(3), seen))]),
        ..Known::default()
    };
    // In the document list: head 3 with another log.
    let (mut s, now) = opened(known());
    let listed = DocumentInfo {
        log: other,
        ..info(doc, 3, 0)
    };
    exchange(&mut s, now, None, plain(vec![listed]));
    let events = drain(&mut s);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Behind { doc: d, head: Seq(0), .. } if *d == doc)),
        "{events:?}"
    );
    // The same log: nothing is wrong.
    let (mut s, now) = opened(known());
    let listed = DocumentInfo {
        log: seen,
        ..info(doc, 3, 0)
    };
    exchange(&mut s, now, None, |r| match r {
        Request::Pull { .. } => Response::Bundles {
            doc,
            items: vec![],
            head: Seq(3),
            base: LogHash::ZERO,
        },
        other => plain(vec![listed.clone()])(other),
    });
    assert!(
        !drain(&mut s)
            .iter()
            .any(|e| matches!(e, Event::Behind { .. })),
        "a matching log is not a rollback"
    );
    // In a pull: the bundle numbered 3 comes with another log.
    let (mut s, now) = opened(known());
    let env = |n: u8| {
        Envelope::seal(
            &DeviceSecrets::from_seeds([n; 32], [n; 32]),
            FacilityId::from_random_bytes([1; 16]),
            doc,
            Epoch(0),
            &DocumentKey::from_seed([5; 32]),
            &Payload::Changes { data: vec![n] },
        )
        .expect("seal")
    };
    let sent = exchange(&mut s, now, None, |r| match r {
        Request::Pull { after, .. } if *after == Seq(2) => Response::Bundles {
            doc,
            items: vec![
                Pulled {
                    seq: Seq(3),
                    envelope: env(1),
                    log: other,
                },
                Pulled {
                    seq: Seq(4),
                    envelope: env(2),
                    log: other.next(&env(2).id()),
                },
            ],
            head: Seq(4),
            base: LogHash::ZERO,
        },
        other => plain(vec![info(doc, 4, 0)])(other),
    });
    let events = drain(&mut s);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Behind { doc: d, head: Seq(0), .. } if *d == doc)),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Pulled { .. })),
        "nothing from the other history is taken as a continuation: {events:?}"
    );
    assert!(
        sent.iter()
            .any(|r| matches!(r, Request::Pull { after: Seq(0), .. })),
        "everything is pulled again: {sent:?}"
    );
}

/// Operations the relay lists beyond what the device holds are fetched, page by page, before any
/// push; a bundle in an epoch the device cannot place yet hands the pull back once per operation
/// count (so a relay that never sends the operations cannot make it loop).
#[test]
fn operations_are_fetched_before_pushing_and_an_unknown_epoch_hands_the_pull_back_once() {
    let doc = DocumentId::from_random_bytes([3; 16]);
    let (mut s, now) = opened(Known::default());
    let device = DeviceSecrets::from_seeds([1; 32], [2; 32]);
    let op = DocOp::sign(
        &device,
        FacilityId::from_random_bytes([1; 16]),
        doc,
        1,
        None,
        DocOpBody::SetMember {
            facility: FacilityId::from_random_bytes([2; 16]),
            role: None,
        },
    )
    .expect("sign");
    let key = DocumentKey::from_seed([5; 32]);
    s.push(
        OutboxId(1),
        PushItem::Bundle {
            envelope: Envelope::seal(
                &device,
                FacilityId::from_random_bytes([1; 16]),
                doc,
                Epoch(0),
                &key,
                &Payload::Changes { data: vec![1] },
            )
            .expect("seal"),
        },
    );
    let mut order = Vec::new();
    let mut pages = 0;
    exchange(&mut s, now, None, |r| {
        order.push(r.kind());
        match r {
            Request::ListDocuments => Response::Documents {
                docs: vec![info(doc, 0, 2)],
            },
            Request::GetOps { from, .. } => {
                pages += 1;
                Response::Ops {
                    doc,
                    ops: vec![op.clone()],
                    total: 2 - from + from,
                }
            }
            Request::Push { items } => Response::Pushed {
                results: items
                    .iter()
                    .map(|_| PushResult::Accepted {
                        seq: Some(Seq(1)),
                        log: None,
                    })
                    .collect(),
            },
            other => plain(vec![])(other),
        }
    });
    assert_eq!(pages, 2, "two pages of one operation each");
    let first_ops = order.iter().position(|k| *k == "get-ops").expect("ops");
    let push = order.iter().position(|k| *k == "push").expect("push");
    assert!(first_ops < push, "operations before the push: {order:?}");
    s.handle_ops(doc, 2);
    assert!(s.handle_unknown_epoch(doc, Seq(1)), "the first hand-back");
    assert!(
        !s.handle_unknown_epoch(doc, Seq(1)),
        "no second hand-back at the same operation count"
    );
    s.handle_ops(doc, 3);
    assert!(
        s.handle_unknown_epoch(doc, Seq(1)),
        "a new operation allows one more"
    );
}

/// A relay's join notification makes the session ask for the join requests; a directory
/// notification of another version asks for the directory; an offer's answer says which bundles the
/// relay lacks; retracted outbox items are not sent.
#[test]
fn join_and_directory_notifications_offers_and_retraction() {
    let doc = DocumentId::from_random_bytes([4; 16]);
    let (mut s, now) = opened(Known {
        directory_version: 5,
        ..Known::default()
    });
    exchange(&mut s, now, None, plain(vec![]));
    drain(&mut s);
    s.handle_notify_join();
    s.handle_notify_directory(5);
    let sent = exchange(&mut s, now, None, plain(vec![]));
    assert_eq!(
        sent.iter().map(Request::kind).collect::<Vec<_>>(),
        ["get-join-requests"],
        "the same directory version asks for nothing more"
    );
    s.handle_notify_directory(6);
    let sent = exchange(&mut s, now, None, plain(vec![]));
    assert!(
        sent.iter()
            .any(|r| matches!(r, Request::GetDirectory { known_version: 5 }))
    );
    let lost = BundleId::of_bytes(b"lost");
    s.offer(doc, vec![lost, BundleId::of_bytes(b"kept")]);
    exchange(&mut s, now, None, |r| match r {
        Request::Offer { have, .. } => Response::Exchange {
            doc,
            items: vec![],
            more: false,
            want: have.iter().copied().filter(|id| *id == lost).collect(),
            ops: vec![],
            grants: vec![],
        },
        other => plain(vec![])(other),
    });
    assert!(
        drain(&mut s)
            .iter()
            .any(|e| matches!(e, Event::Wanted { ids, .. } if ids == &vec![lost]))
    );
    let device = DeviceSecrets::from_seeds([1; 32], [2; 32]);
    let item = PushItem::Bundle {
        envelope: Envelope::seal(
            &device,
            FacilityId::from_random_bytes([1; 16]),
            doc,
            Epoch(0),
            &DocumentKey::from_seed([5; 32]),
            &Payload::Changes { data: vec![1] },
        )
        .expect("seal"),
    };
    s.push(OutboxId(7), item);
    s.retract(&BTreeSet::from([OutboxId(7)]));
    let sent = exchange(&mut s, now, None, plain(vec![]));
    assert!(
        !sent.iter().any(|r| matches!(r, Request::Push { .. })),
        "a retracted item is not pushed: {sent:?}"
    );
}
