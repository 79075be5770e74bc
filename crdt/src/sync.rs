//! The facility's side of a sync session with the relay (or a LAN peer), as a sans-IO state machine.
//!
//! Inputs: `handle_connected`, `handle_response`, `handle_failure`, `handle_notify`, `handle_timeout`,
//! `push` (an outbox item). Outputs: `poll_transmit` (requests to send), `poll_event` (what arrived,
//! for the driver to store), `poll_timeout` (when to call `handle_timeout`).
//!
//! The session never loses an item: a push leaves the outbox only when the relay answered for it;
//! a request that failed or timed out goes back to the front, after an exponential backoff.
//! Cursors advance only through [`Event::Pulled`], which the driver stores before anything else.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::directory::SignedDirectory;
use crate::ids::{DocumentId, Epoch, Seq};
use crate::limits::{
    FRAME_BYTES_MAX, PUSH_ITEMS_MAX, SESSION_PULLS_IN_FLIGHT_MAX, SESSION_REQUESTS_IN_FLIGHT_MAX,
};
use crate::ops::KeyGrant;
use crate::protocol::{DocumentInfo, ErrorCode, Pulled, PushItem, PushResult, Request, Response};

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
    /// The relay's list of this facility's documents.
    Documents(Vec<DocumentInfo>),
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
    Grants(DocumentId),
    Pull(DocumentId),
    Push(Vec<(OutboxId, PushItem)>),
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
    heads: BTreeMap<DocumentId, Seq>,
    epochs: HashMap<DocumentId, Epoch>,
    outbox: VecDeque<(OutboxId, PushItem)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    events: VecDeque<Event>,
    caught_up_reported: bool,
    /// Documents whose pull was set back until a newer directory arrives ([`Session::handle_unknown_author`]).
    awaiting_directory: BTreeSet<DocumentId>,
}

impl Session {
    /// A session for a facility that holds `directory_version`, these per-document cursors
    /// (the last sequence number stored) and these known epochs.
    pub fn new(
        config: SessionConfig,
        directory_version: u64,
        cursors: HashMap<DocumentId, Seq>,
        epochs: HashMap<DocumentId, Epoch>,
    ) -> Self {
        let backoff = config.backoff_initial;
        Self {
            config,
            connected: false,
            refused: false,
            next_request: 1,
            in_flight: HashMap::new(),
            want_directory: false,
            directory_version,
            want_documents: false,
            want_grants: BTreeSet::new(),
            cursors,
            heads: BTreeMap::new(),
            epochs,
            outbox: VecDeque::new(),
            retry_at: None,
            backoff,
            events: VecDeque::new(),
            caught_up_reported: false,
            awaiting_directory: BTreeSet::new(),
        }
    }

    /// The transport is up: fetch the directory and document list, then pull and push.
    pub fn handle_connected(&mut self, _now: Instant) {
        self.connected = true;
        self.want_directory = true;
        self.want_documents = true;
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
        let back = Seq(from.0.saturating_sub(1));
        let cursor = self.cursors.entry(doc).or_default();
        *cursor = (*cursor).min(back);
        self.in_flight
            .retain(|_, (what, _)| !matches!(what, InFlight::Pull(d) if *d == doc));
        self.events
            .retain(|e| !matches!(e, Event::Pulled { doc: d, .. } if *d == doc));
        let head = self.heads.entry(doc).or_default();
        *head = (*head).max(from);
        self.want_directory = true;
        self.caught_up_reported = false;
        true
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

    /// The relay answered request `id`.
    pub fn handle_response(&mut self, id: RequestId, response: Response, now: Instant) {
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
            (InFlight::Directory, Response::Directory { directory }) => {
                if let Some(d) = directory {
                    // From now on ask for anything newer than this one, so that the relay answers
                    // `None` when nothing changed (the driver verifies the directory itself).
                    if let Some(version) = d.claimed_version() {
                        self.directory_version = version;
                    }
                    // A newer directory: documents set back for an unknown author get one more try.
                    self.awaiting_directory.clear();
                    self.events.push_back(Event::Directory(d));
                }
            }
            (InFlight::Documents, Response::Documents { docs }) => {
                for d in &docs {
                    let h = self.heads.entry(d.id).or_default();
                    *h = (*h).max(d.head);
                    if self.epochs.get(&d.id).is_none_or(|e| *e < d.epoch) {
                        self.want_grants.insert(d.id);
                    }
                }
                self.events.push_back(Event::Documents(docs));
            }
            (InFlight::Grants(doc), Response::KeyGrants { grants, .. }) => {
                // Which of these grants open for this device only the driver knows: it reports
                // the epochs it now holds with `handle_key`.
                self.events.push_back(Event::KeyGrants { doc, grants });
            }
            (InFlight::Pull(doc), Response::Bundles { items, head, .. }) => {
                let cursor = self.cursors.entry(doc).or_default();
                let last = items.last().map(|p| p.seq).unwrap_or(*cursor);
                if items.is_empty() {
                    // Nothing more is there to take: believe the relay's head is what we hold.
                    self.heads.insert(doc, *cursor);
                } else {
                    *cursor = (*cursor).max(last);
                    let h = self.heads.entry(doc).or_default();
                    *h = (*h).max(head);
                    self.events.push_back(Event::Pulled { doc, items });
                }
            }
            (InFlight::Push(items), Response::Pushed { results })
                if results.len() == items.len() =>
            {
                for ((item, _), result) in items.into_iter().zip(results) {
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
                    InFlight::Pull(doc) | InFlight::Grants(doc) => {
                        let c = self.cursors.get(&doc).copied().unwrap_or_default();
                        self.heads.insert(doc, c);
                        self.want_grants.remove(&doc);
                    }
                    InFlight::Directory | InFlight::Documents => {}
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
        } else if let Some(doc) = self.want_grants.pop_first() {
            (InFlight::Grants(doc), Request::GetKeyGrants { doc })
        } else if !self.outbox.is_empty()
            && !self
                .in_flight
                .values()
                .any(|(w, _)| matches!(w, InFlight::Push(_)))
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
            (InFlight::Pull(doc), Request::Pull { doc, after })
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
                if let InFlight::Pull(d) = w {
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
            InFlight::Pull(_) => {} // heads are unchanged, so the pull is chosen again
            InFlight::Push(items) => {
                for it in items.into_iter().rev() {
                    self.outbox.push_front(it);
                }
            }
        }
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.config.backoff_max);
    }
}
