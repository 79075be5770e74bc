//! The facility's side of a sync session with the relay (or a LAN peer), as a sans-IO state machine.
//!
//! Inputs: `handle_connected`, `handle_response_frame`, `handle_failure`, `handle_notify`,
//! `handle_timeout`, `push` (an outbox item), `offer` (anti-entropy against the relay). Outputs:
//! `poll_transmit` (requests to send), `poll_event` (what arrived, for the driver to verify and
//! store), `poll_timeout` (when to call `handle_timeout`).
//!
//! The session never loses an item: a push leaves the outbox only when the relay answered for it;
//! a request that failed or timed out goes back to the front, after an exponential backoff.
//! Cursors advance only through [`Event::Pulled`], which the driver stores before anything else.
//!
//! It also notices a relay that went back in time: another store [`Generation`] in a response
//! ([`Event::RelayRestored`]), or a document the relay holds less of than this device knows it
//! acknowledged ([`Event::Behind`]). The driver then offers what it holds, as LAN peers do.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::directory::SignedDirectory;
use crate::ids::{BundleId, DocumentId, Epoch, LogHash, Seq};
use crate::invite::JoinRequest;
use crate::limits::{
    FRAME_BYTES_MAX, PUSH_ITEMS_MAX, SESSION_PULLS_IN_FLIGHT_MAX, SESSION_REQUESTS_IN_FLIGHT_MAX,
};
use crate::ops::{DocOp, KeyGrant};
use crate::protocol::{
    DocumentInfo, ErrorCode, Generation, Pulled, PushItem, PushResult, Request, Response,
};

/// Timing of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// How long to wait for an answer before the request counts as failed.
    pub request_timeout: Duration,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The driver's id of an outbox item (its row in the local store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboxId(pub u64);

/// The session's id of a request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A request for the driver to send.
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Quote it back in `handle_response` / `handle_failure`.
    pub id: RequestId,
    /// The request.
    pub request: Request,
}

/// What the session reports to the driver.
#[derive(Clone, Debug)]
pub enum Event {
    /// A newer directory (unverified: the driver checks it against the relay it trusts).
    Directory(SignedDirectory),
    /// The addresses the relay says it can be reached at now (an unsigned hint; see
    /// [`Response::Directory`]).
    RelayAddrs(Vec<String>),
    /// The relay's list of this facility's documents.
    Documents(Vec<DocumentInfo>),
    /// Operations of a document from position `from` on (unverified: the driver replays them).
    Ops {
        /// The document.
        doc: DocumentId,
        /// The position of the first.
        from: u32,
        /// The operations.
        ops: Vec<DocOp>,
        /// How many the relay's chain has.
        total: u32,
    },
    /// Join requests waiting for this device's facility (unverified: the driver checks each proof).
    JoinRequests(Vec<JoinRequest>),
    /// The relay's answer to an [`Session::offer`]: the bundles of `doc` it lacks.
    Wanted {
        /// The document.
        doc: DocumentId,
        /// Ids of bundles to push again.
        ids: Vec<BundleId>,
    },
    /// The relay holds less of `doc` than this device knows it acknowledged, or gave a sequence
    /// number this device saw to another bundle (its [`LogHash`] differs): it went back in time.
    /// The session's cursor is set back to `head` (0 when the histories differ); the driver pushes
    /// again what the relay lost ([`Session::offer`], operations from `ops` on).
    Behind {
        /// The document.
        doc: DocumentId,
        /// Where the cursor now stands: the relay's newest sequence number, or 0.
        head: Seq,
        /// The relay's operation count (`None` when only the head is known).
        ops: Option<u32>,
    },
    /// The relay's store has another generation than before (restored from a backup): every cursor
    /// is reset; the driver offers every document again.
    RelayRestored {
        /// The generation seen before.
        previous: Generation,
        /// The generation now.
        now: Generation,
    },
    /// Key grants of a document.
    KeyGrants {
        /// The document.
        doc: DocumentId,
        /// Its grants.
        grants: Vec<KeyGrant>,
    },
    /// Bundles of a document, in sequence order; store them and the cursor atomically.
    Pulled {
        /// The document.
        doc: DocumentId,
        /// The bundles.
        items: Vec<Pulled>,
    },
    /// The relay answered for an outbox item; remove it from the outbox (and mark it failed if rejected).
    Pushed {
        /// The item.
        item: OutboxId,
        /// The relay's answer.
        result: PushResult,
    },
    /// The relay refused the session itself (not enrolled, revoked, version); the session stops.
    Refused {
        /// Why.
        code: ErrorCode,
        /// The relay's sentence.
        message: String,
    },
    /// Everything pending was pushed and everything known to be new was pulled.
    CaughtUp,
}

#[derive(Debug)]
enum InFlight {
    Directory,
    Documents,
    Ops(DocumentId, u32),
    Grants(DocumentId),
    Joins,
    Offer(DocumentId, Vec<BundleId>),
    Pull(DocumentId, Seq),
    Push(Vec<(OutboxId, PushItem)>),
}

/// What a device knows when a session starts.
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// The directory version it holds.
    pub directory_version: u64,
    /// Per document: the last sequence number stored.
    pub cursors: HashMap<DocumentId, Seq>,
    /// Per document: the newest epoch it holds a key of.
    pub epochs: HashMap<DocumentId, Epoch>,
    /// Per document: how many operations of its chain the relay served or acknowledged.
    pub ops: HashMap<DocumentId, u32>,
    /// The relay's store generation seen last.
    pub generation: Option<Generation>,
    /// Per document: the newest sequence number this device knows the relay's bundle log at, and
    /// that log (from a pull or a push's acknowledgement). A relay whose log disagrees went back in
    /// time and took other bundles since.
    pub witnesses: HashMap<DocumentId, (Seq, LogHash)>,
}

/// Keeps the newer of the witness held for `doc` and `(seq, log)`.
fn raise(
    witnesses: &mut HashMap<DocumentId, (Seq, LogHash)>,
    doc: DocumentId,
    seq: Seq,
    log: LogHash,
) {
    let w = witnesses.entry(doc).or_insert((seq, log));
    if seq >= w.0 {
        *w = (seq, log);
    }
}

/// One sync session's state.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    connected: bool,
    refused: bool,
    next_request: u64,
    in_flight: HashMap<RequestId, (InFlight, Instant)>,
    want_directory: bool,
    directory_version: u64,
    want_documents: bool,
    want_grants: BTreeSet<DocumentId>,
    cursors: HashMap<DocumentId, Seq>,
    witnesses: HashMap<DocumentId, (Seq, LogHash)>,
    heads: BTreeMap<DocumentId, Seq>,
    epochs: HashMap<DocumentId, Epoch>,
    ops: HashMap<DocumentId, u32>,
    want_ops: BTreeMap<DocumentId, u32>,
    want_joins: bool,
    offers: VecDeque<(DocumentId, Vec<BundleId>)>,
    generation: Option<Generation>,
    outbox: VecDeque<(OutboxId, PushItem)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    events: VecDeque<Event>,
    caught_up_reported: bool,
    /// Documents whose pull was set back until a newer directory arrives ([`Session::handle_unknown_author`]).
    awaiting_directory: BTreeSet<DocumentId>,
    /// Documents whose pull was set back until more operations arrive, with the operation count then
    /// ([`Session::handle_unknown_epoch`]).
    awaiting_ops: BTreeMap<DocumentId, u32>,
    /// Documents whose operations are fetched again once a directory arrives
    /// ([`Session::handle_ops_await_directory`]).
    ops_awaiting_directory: BTreeSet<DocumentId>,
}

impl Session {
    /// A session for a device that knows `known`.
    pub fn new(config: SessionConfig, known: Known) -> Self {
        let backoff = config.backoff_initial;
        Self {
            config,
            connected: false,
            refused: false,
            next_request: 1,
            in_flight: HashMap::new(),
            want_directory: false,
            directory_version: known.directory_version,
            want_documents: false,
            want_grants: BTreeSet::new(),
            cursors: known.cursors,
            witnesses: known.witnesses,
            heads: BTreeMap::new(),
            epochs: known.epochs,
            ops: known.ops,
            want_ops: BTreeMap::new(),
            want_joins: false,
            offers: VecDeque::new(),
            generation: known.generation,
            outbox: VecDeque::new(),
            retry_at: None,
            backoff,
            events: VecDeque::new(),
            caught_up_reported: false,
            awaiting_directory: BTreeSet::new(),
            awaiting_ops: BTreeMap::new(),
            ops_awaiting_directory: BTreeSet::new(),
        }
    }

    /// The transport is up: fetch the directory and document list, then pull and push.
    pub fn handle_connected(&mut self, _now: Instant) {
        self.connected = true;
        self.want_directory = true;
        self.want_documents = true;
        self.want_joins = true;
        self.retry_at = None;
        self.caught_up_reported = false;
    }

    /// The transport went down: everything in flight returns to its queue.
    pub fn handle_disconnected(&mut self, _now: Instant) {
        self.connected = false;
        let ids: Vec<RequestId> = self.in_flight.keys().copied().collect();
        for id in ids {
            self.requeue(id);
        }
    }

    /// Queues an item for the relay (in order after earlier items).
    pub fn push(&mut self, id: OutboxId, item: PushItem) {
        self.outbox.push_back((id, item));
        self.caught_up_reported = false;
    }

    /// Drops queued items that were not sent yet (the driver replaced them, e.g. re-sealed bundles).
    /// Items already in flight are answered as usual.
    pub fn retract(&mut self, ids: &BTreeSet<OutboxId>) {
        self.outbox.retain(|(id, _)| !ids.contains(id));
    }

    /// Asks for a document's operations from position `from` on.
    pub fn want_ops(&mut self, doc: DocumentId, from: u32) {
        let f = self.want_ops.entry(doc).or_insert(from);
        *f = (*f).min(from);
        self.caught_up_reported = false;
    }

    /// The relay has served or acknowledged `count` operations of `doc`.
    pub fn handle_ops(&mut self, doc: DocumentId, count: u32) {
        let c = self.ops.entry(doc).or_default();
        *c = (*c).max(count);
    }

    /// The driver could not take `doc`'s operations past the first `held`: one of them excludes a
    /// device this device still holds current (it has not learned of that revocation yet). The
    /// session fetches the directory, and the operations again once a directory has arrived.
    ///
    /// Returns `false`, changing nothing, when the document already waits for a directory.
    pub fn handle_ops_await_directory(&mut self, doc: DocumentId, held: u32) -> bool {
        self.ops.insert(doc, held);
        if !self.ops_awaiting_directory.insert(doc) {
            return false;
        }
        self.want_directory = true;
        self.caught_up_reported = false;
        true
    }

    /// Offers the relay the ids of every bundle this device holds of `doc`; the relay answers with
    /// those it lacks ([`Event::Wanted`]).
    pub fn offer(&mut self, doc: DocumentId, have: Vec<BundleId>) {
        self.offers.push_back((doc, have));
        self.caught_up_reported = false;
    }

    /// The relay says its directory is now at `version` (a revocation, an enrolment, an approval).
    pub fn handle_notify_directory(&mut self, version: u64) {
        if version != self.directory_version {
            self.want_directory = true;
            self.caught_up_reported = false;
        }
    }

    /// The relay says a device asked to join this facility.
    pub fn handle_notify_join(&mut self) {
        self.want_joins = true;
        self.caught_up_reported = false;
    }

    /// Asks for a document's key grants (for example after a directory change).
    pub fn want_grants(&mut self, doc: DocumentId) {
        self.want_grants.insert(doc);
        self.caught_up_reported = false;
    }

    /// The driver now holds the key of `epoch` for `doc`; notifications of that epoch need no grant fetch.
    pub fn handle_key(&mut self, doc: DocumentId, epoch: Epoch) {
        let known = self.epochs.entry(doc).or_insert(epoch);
        *known = (*known).max(epoch);
    }

    /// The driver could not accept the bundle of `doc` at `from` (and those after it) because its
    /// author is a device the directory it holds does not list: a facility or device enrolled since
    /// the directory was fetched. The session sets the document's cursor back to before `from`,
    /// fetches the directory, and pulls the document again once it has arrived.
    /// A pull of the document already in flight, or answered and not yet polled, continues past
    /// `from`; it is dropped (its answer is then ignored as a late one).
    ///
    /// Returns `false`, changing nothing, when this document already waits for a directory that
    /// turned out no newer: the author is unknown to the relay's directory too, and the driver
    /// drops the bundle as unverifiable.
    pub fn handle_unknown_author(&mut self, doc: DocumentId, from: Seq) -> bool {
        if !self.awaiting_directory.insert(doc) {
            return false;
        }
        self.set_back(doc, from);
        self.want_directory = true;
        true
    }

    /// The driver could not place the bundle of `doc` at `from` (and those after it): it is in an
    /// epoch, or sealed with a key, that the operations this device holds do not have yet. The
    /// session sets the document's cursor back to before `from`, fetches the operations, and pulls
    /// again once they arrived (as [`Session::handle_unknown_author`] does for the directory).
    ///
    /// Returns `false`, changing nothing, when this document already waits at the same operation
    /// count: the operations it waited for did not come, and the driver drops the bundle.
    pub fn handle_unknown_epoch(&mut self, doc: DocumentId, from: Seq) -> bool {
        let known = self.ops.get(&doc).copied().unwrap_or_default();
        if self.awaiting_ops.get(&doc) == Some(&known) {
            return false;
        }
        self.awaiting_ops.insert(doc, known);
        self.set_back(doc, from);
        self.want_ops(doc, known);
        true
    }

    fn set_back(&mut self, doc: DocumentId, from: Seq) {
        let back = Seq(from.0.saturating_sub(1));
        let cursor = self.cursors.entry(doc).or_default();
        *cursor = (*cursor).min(back);
        self.in_flight
            .retain(|_, (what, _)| !matches!(what, InFlight::Pull(d, _) if *d == doc));
        self.events
            .retain(|e| !matches!(e, Event::Pulled { doc: d, .. } if *d == doc));
        let head = self.heads.entry(doc).or_default();
        *head = (*head).max(from);
        self.caught_up_reported = false;
    }

    /// Asks for the directory again (for example after this device's approval of a new device was
    /// acknowledged).
    pub fn want_directory(&mut self) {
        self.want_directory = true;
        self.caught_up_reported = false;
    }

    /// The relay's store generation as last seen.
    pub fn generation(&self) -> Option<Generation> {
        self.generation
    }

    /// Asks for the document list again.
    pub fn want_documents(&mut self) {
        self.want_documents = true;
        self.caught_up_reported = false;
    }

    /// The relay says `doc` has bundles up to `head` in epoch `epoch`.
    pub fn handle_notify(&mut self, doc: DocumentId, head: Seq, epoch: Epoch, _now: Instant) {
        if !self.heads.contains_key(&doc) && !self.cursors.contains_key(&doc) {
            self.want_documents = true;
        }
        let h = self.heads.entry(doc).or_default();
        *h = (*h).max(head);
        if self.epochs.get(&doc).is_none_or(|e| *e < epoch) {
            self.want_grants.insert(doc);
        }
        self.caught_up_reported = false;
    }

    /// The relay answered request `id` (in a frame without a generation).
    pub fn handle_response(&mut self, id: RequestId, response: Response, now: Instant) {
        self.handle_response_frame(id, None, response, now);
    }

    /// The relay answered request `id` in a frame carrying `generation`.
    pub fn handle_response_frame(
        &mut self,
        id: RequestId,
        generation: Option<Generation>,
        response: Response,
        now: Instant,
    ) {
        if let Some(g) = generation {
            match self.generation {
                Some(previous) if previous != g => {
                    self.generation = Some(g);
                    self.relay_restored(previous, g);
                    // Whatever this answer says was computed against the restored store; drop it
                    // and ask again from scratch.
                    self.in_flight.remove(&id);
                    return;
                }
                _ => self.generation = Some(g),
            }
        }
        let Some((what, _)) = self.in_flight.remove(&id) else {
            return; // an answer after its timeout; the request was already requeued
        };
        if let Response::Error { code, message } = &response
            && matches!(
                code,
                ErrorCode::NotEnrolled | ErrorCode::Revoked | ErrorCode::UnsupportedVersion
            )
        {
            // Reported once: the answers to the other requests in flight say the same.
            if !self.refused {
                self.refused = true;
                self.events.push_back(Event::Refused {
                    code: *code,
                    message: message.clone(),
                });
            }
            return;
        }
        match (what, response) {
            (
                InFlight::Directory,
                Response::Directory {
                    directory,
                    relay_addrs,
                },
            ) => {
                if !relay_addrs.is_empty() {
                    self.events.push_back(Event::RelayAddrs(relay_addrs));
                }
                if let Some(d) = directory {
                    // From now on ask for anything newer than this one, so that the relay answers
                    // `None` when nothing changed (the driver verifies the directory itself).
                    if let Some(version) = d.claimed_version() {
                        self.directory_version = version;
                    }
                    // A newer directory: documents set back for an unknown author get one more try,
                    // and so do operations that waited for a revocation.
                    self.awaiting_directory.clear();
                    for doc in std::mem::take(&mut self.ops_awaiting_directory) {
                        let held = self.ops.get(&doc).copied().unwrap_or_default();
                        self.want_ops(doc, held);
                    }
                    self.events.push_back(Event::Directory(d));
                }
            }
            (InFlight::Documents, Response::Documents { docs }) => {
                for d in &docs {
                    let cursor = self.cursors.get(&d.id).copied().unwrap_or_default();
                    let known_ops = self.ops.get(&d.id).copied().unwrap_or_default();
                    let witness = self.witnesses.get(&d.id).copied();
                    // Another log at a sequence number this device saw: the relay's history differs
                    // from the one it served or acknowledged; everything is pulled again.
                    let diverged = witness.is_some_and(|(ws, wl)| d.head == ws && d.log != wl);
                    let behind = d.head < cursor
                        || d.ops < known_ops
                        || witness.is_some_and(|(ws, _)| d.head < ws);
                    if diverged || behind {
                        let back = if diverged { Seq(0) } else { cursor.min(d.head) };
                        self.cursors.insert(d.id, back);
                        self.heads.insert(d.id, back);
                        self.ops.insert(d.id, d.ops.min(known_ops));
                        self.witnesses.remove(&d.id);
                        self.events.push_back(Event::Behind {
                            doc: d.id,
                            head: back,
                            ops: Some(d.ops),
                        });
                    }
                    let h = self.heads.entry(d.id).or_default();
                    *h = (*h).max(d.head);
                    let known_ops = self.ops.get(&d.id).copied().unwrap_or_default();
                    if d.ops > known_ops {
                        self.want_ops(d.id, known_ops);
                    }
                    if self.epochs.get(&d.id).is_none_or(|e| *e < d.epoch) {
                        self.want_grants.insert(d.id);
                    }
                }
                self.events.push_back(Event::Documents(docs));
            }
            (InFlight::Ops(doc, from), Response::Ops { doc: d, ops, total }) if d == doc => {
                let got = from.saturating_add(u32::try_from(ops.len()).unwrap_or(u32::MAX));
                if !ops.is_empty() && got < total {
                    // More remain: ask for the next page (the driver reports what it stored).
                    self.want_ops.entry(doc).or_insert(got);
                }
                if !ops.is_empty() {
                    self.events.push_back(Event::Ops {
                        doc,
                        from,
                        ops,
                        total,
                    });
                }
            }
            (InFlight::Joins, Response::JoinRequests { requests }) => {
                if !requests.is_empty() {
                    self.events.push_back(Event::JoinRequests(requests));
                }
            }
            (InFlight::Offer(doc, _), Response::Exchange { want, .. }) => {
                if !want.is_empty() {
                    self.events.push_back(Event::Wanted { doc, ids: want });
                }
            }
            (InFlight::Grants(doc), Response::KeyGrants { grants, .. }) => {
                // Which of these grants open for this device only the driver knows: it reports
                // the epochs it now holds with `handle_key`.
                self.events.push_back(Event::KeyGrants { doc, grants });
            }
            (
                InFlight::Pull(doc, after),
                Response::Bundles {
                    items, head, base, ..
                },
            ) => {
                let witness = self.witnesses.get(&doc).copied();
                let diverged = witness.is_some_and(|(ws, wl)| {
                    (after == ws && base != wl) || items.iter().any(|p| p.seq == ws && p.log != wl)
                });
                let cursor = self.cursors.entry(doc).or_default();
                let last = items.last().map(|p| p.seq).unwrap_or(*cursor);
                if diverged {
                    // The relay gave a sequence number this device saw to another bundle: it went
                    // back in time and took new bundles since. Everything is pulled again.
                    *cursor = Seq(0);
                    self.heads.insert(doc, head);
                    self.witnesses.remove(&doc);
                    self.events.push_back(Event::Behind {
                        doc,
                        head: Seq(0),
                        ops: None,
                    });
                } else if head < *cursor || witness.is_some_and(|(ws, _)| head < ws) {
                    // The relay holds less than this device pulled or pushed before: it went back
                    // in time.
                    *cursor = (*cursor).min(head);
                    self.heads.insert(doc, head);
                    self.witnesses.remove(&doc);
                    self.events.push_back(Event::Behind {
                        doc,
                        head: *cursor,
                        ops: None,
                    });
                } else if items.is_empty() {
                    // Nothing more is there to take: believe the relay's head is what we hold.
                    self.heads.insert(doc, *cursor);
                } else {
                    *cursor = (*cursor).max(last);
                    let h = self.heads.entry(doc).or_default();
                    *h = (*h).max(head);
                    if let Some(p) = items.last() {
                        raise(&mut self.witnesses, doc, p.seq, p.log);
                    }
                    self.events.push_back(Event::Pulled { doc, items });
                }
            }
            (InFlight::Push(items), Response::Pushed { results })
                if results.len() == items.len() =>
            {
                for ((item, pushed), result) in items.into_iter().zip(results) {
                    if let (
                        PushItem::Bundle { envelope },
                        PushResult::Accepted {
                            seq: Some(seq),
                            log: Some(log),
                        }
                        | PushResult::Duplicate {
                            seq: Some(seq),
                            log: Some(log),
                        },
                    ) = (&pushed, &result)
                    {
                        raise(&mut self.witnesses, envelope.doc, *seq, *log);
                    }
                    self.events.push_back(Event::Pushed { item, result });
                }
            }
            (what, Response::Error { code, message }) if !code.is_transient() => {
                // A permanent refusal of this request: report pushes item by item; drop the rest.
                match what {
                    InFlight::Push(items) => {
                        for (item, _) in items {
                            self.events.push_back(Event::Pushed {
                                item,
                                result: PushResult::Rejected {
                                    code,
                                    message: message.clone(),
                                },
                            });
                        }
                    }
                    InFlight::Pull(doc, _) | InFlight::Grants(doc) | InFlight::Ops(doc, _) => {
                        let c = self.cursors.get(&doc).copied().unwrap_or_default();
                        self.heads.insert(doc, c);
                        self.want_grants.remove(&doc);
                        self.want_ops.remove(&doc);
                    }
                    InFlight::Directory
                    | InFlight::Documents
                    | InFlight::Joins
                    | InFlight::Offer(..) => {}
                }
            }
            (what, _) => {
                // A transient error or an answer of the wrong shape: retry after a backoff.
                self.in_flight.insert(id, (what, now));
                self.requeue(id);
                self.schedule_retry(now);
                return;
            }
        }
        // The relay answered: the next failure starts the backoff over (not only after a push).
        self.backoff = self.config.backoff_initial;
    }

    /// Request `id` failed in the transport (connection lost, stream reset, timeout in the driver).
    pub fn handle_failure(&mut self, id: RequestId, now: Instant) {
        if self.in_flight.contains_key(&id) {
            self.requeue(id);
            self.schedule_retry(now);
        }
    }

    /// Time passed: expire requests older than the timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<RequestId> = self
            .in_flight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= self.config.request_timeout)
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            for id in expired {
                self.requeue(id);
            }
            self.schedule_retry(now);
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
        }
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let oldest = self
            .in_flight
            .values()
            .map(|(_, at)| *at + self.config.request_timeout)
            .min();
        match (oldest, self.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next request to send, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if !self.connected || self.refused || self.in_flight.len() >= SESSION_REQUESTS_IN_FLIGHT_MAX
        {
            return None;
        }
        if let Some(t) = self.retry_at {
            if now < t {
                return None;
            }
            self.retry_at = None;
        }
        let (what, request) = if self.want_directory {
            self.want_directory = false;
            (
                InFlight::Directory,
                Request::GetDirectory {
                    known_version: self.directory_version,
                },
            )
        } else if self.want_documents {
            self.want_documents = false;
            (InFlight::Documents, Request::ListDocuments)
        } else if self
            .in_flight
            .values()
            .any(|(w, _)| matches!(w, InFlight::Directory | InFlight::Documents))
        {
            // Wait for the document list before pushing or pulling, so pulls start from fresh heads.
            return None;
        } else if let Some((doc, from)) = self.want_ops.pop_first() {
            (InFlight::Ops(doc, from), Request::GetOps { doc, from })
        } else if self
            .in_flight
            .values()
            .any(|(w, _)| matches!(w, InFlight::Ops(..)))
        {
            // Operations before grants: a grant is checked against the epochs they make.
            return None;
        } else if let Some(doc) = self.want_grants.pop_first() {
            (InFlight::Grants(doc), Request::GetKeyGrants { doc })
        } else if self.want_joins {
            self.want_joins = false;
            (InFlight::Joins, Request::GetJoinRequests)
        } else if let Some((doc, have)) = self.offers.pop_front() {
            let request = Request::Offer {
                doc,
                directory_version: self.directory_version,
                have: have.clone(),
                ops: vec![],
                grants: vec![],
            };
            (InFlight::Offer(doc, have), request)
        } else if !self.outbox.is_empty()
            && !self
                .in_flight
                .values()
                .any(|(w, _)| matches!(w, InFlight::Push(_) | InFlight::Grants(_)))
        {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some((_, item)) = self.outbox.front() {
                let b = item.approx_bytes();
                if !batch.is_empty()
                    && (batch.len() >= PUSH_ITEMS_MAX || bytes + b > FRAME_BYTES_MAX / 2)
                {
                    break;
                }
                bytes += b;
                batch.push(self.outbox.pop_front().expect("front was Some"));
            }
            let items = batch.iter().map(|(_, i)| i.clone()).collect();
            (InFlight::Push(batch), Request::Push { items })
        } else if let Some(doc) = self.next_pull() {
            let after = self.cursors.get(&doc).copied().unwrap_or_default();
            (InFlight::Pull(doc, after), Request::Pull { doc, after })
        } else {
            return None;
        };
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.in_flight.insert(id, (what, now));
        Some(Transmit { id, request })
    }

    /// The next thing that happened, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if !self.caught_up_reported && self.is_caught_up() {
            self.caught_up_reported = true;
            return Some(Event::CaughtUp);
        }
        None
    }

    /// Connected, nothing queued, nothing in flight, and every known head pulled.
    pub fn is_caught_up(&self) -> bool {
        self.connected
            && !self.refused
            && !self.want_directory
            && !self.want_documents
            && !self.want_joins
            && self.want_ops.is_empty()
            && self.offers.is_empty()
            && self.want_grants.is_empty()
            && self.outbox.is_empty()
            && self.in_flight.is_empty()
            && self.events.is_empty()
            && self
                .heads
                .iter()
                .all(|(d, h)| self.cursors.get(d).copied().unwrap_or_default() >= *h)
    }

    /// Items queued but not yet answered (queued or in flight).
    pub fn pending_pushes(&self) -> usize {
        self.outbox.len()
            + self
                .in_flight
                .values()
                .map(|(w, _)| {
                    if let InFlight::Push(v) = w {
                        v.len()
                    } else {
                        0
                    }
                })
                .sum::<usize>()
    }

    /// Whether the relay refused this session for good.
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    fn next_pull(&self) -> Option<DocumentId> {
        let pulling: Vec<DocumentId> = self
            .in_flight
            .values()
            .filter_map(|(w, _)| {
                if let InFlight::Pull(d, _) = w {
                    Some(*d)
                } else {
                    None
                }
            })
            .collect();
        if pulling.len() >= SESSION_PULLS_IN_FLIGHT_MAX {
            return None;
        }
        self.heads
            .iter()
            .find(|(d, h)| {
                self.cursors.get(d).copied().unwrap_or_default() < **h && !pulling.contains(d)
            })
            .map(|(d, _)| *d)
    }

    fn requeue(&mut self, id: RequestId) {
        let Some((what, _)) = self.in_flight.remove(&id) else {
            return;
        };
        match what {
            InFlight::Directory => self.want_directory = true,
            InFlight::Documents => self.want_documents = true,
            InFlight::Grants(d) => {
                self.want_grants.insert(d);
            }
            InFlight::Ops(d, from) => self.want_ops(d, from),
            InFlight::Joins => self.want_joins = true,
            InFlight::Offer(d, have) => self.offers.push_front((d, have)),
            InFlight::Pull(..) => {} // heads are unchanged, so the pull is chosen again
            InFlight::Push(items) => {
                for it in items.into_iter().rev() {
                    self.outbox.push_front(it);
                }
            }
        }
    }

    fn relay_restored(&mut self, previous: Generation, now: Generation) {
        for c in self.cursors.values_mut() {
            *c = Seq(0);
        }
        self.heads.clear();
        self.ops.clear();
        self.witnesses.clear();
        self.awaiting_directory.clear();
        // Everything in flight was asked of the store before; ask again.
        let ids: Vec<RequestId> = self.in_flight.keys().copied().collect();
        for id in ids {
            self.requeue(id);
        }
        self.want_directory = true;
        self.want_documents = true;
        self.caught_up_reported = false;
        self.events
            .push_back(Event::RelayRestored { previous, now });
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.config.backoff_max);
    }
}
