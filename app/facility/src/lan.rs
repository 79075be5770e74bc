//! LAN sync: facility devices on the same network find each other by mDNS, authenticate each other
//! against the verified directory (a current device of a certified facility, not revoked), and
//! exchange the bundles of documents both are members of.
//!
//! Revocations travel too: every offer carries the offerer's directory version, and a device that
//! knows of a revocation newer than it answers [`ErrorCode::StaleDirectory`] and nothing else; the
//! offerer then fetches that device's directory (`GetDirectory`, verified like one from the relay) and
//! offers again. So a laptop revoked while its facility was offline gets nothing from a peer that
//! heard of it, and a peer that had not heard of it learns before it exchanges.
//!
//! The exchange is anti-entropy over `/musubi/sync/1`: `Offer` lists the bundle ids one side holds
//! of a document (with its operations and grants); the answer `Exchange` carries the bundles the
//! offerer lacks and the ids the answerer wants, which the offerer sends with `Deliver`. Everything
//! received is verified like a file import and queued for the relay, so whichever device reaches the
//! relay first uploads what the other made; the relay dedups by bundle id.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use musubi_crdt::ids::{BundleId, DocumentId, FacilityId};
use musubi_crdt::limits::{OFFER_IDS_MAX, PULL_RESPONSE_BYTES_TARGET};
use musubi_crdt::protocol::{self, ErrorCode, PushItem, Request, Response};
use musubi_transport::Behaviour;
use musubi_transport::libp2p::request_response::OutboundRequestId;
use musubi_transport::libp2p::swarm::dial_opts::DialOpts;
use musubi_transport::libp2p::{Multiaddr, PeerId, Swarm};

use musubi_crdt::directory::{Devices as _, Directory};

use crate::engine::{Engine, Result};
use crate::store::Origin;

/// How often connected LAN peers are offered every shared document.
pub const LAN_ROUND_INTERVAL: Duration = Duration::from_secs(2);
/// How often a LAN peer found by mDNS but not connected is dialled again.
pub const LAN_REDIAL_INTERVAL: Duration = Duration::from_secs(5);

/// A device found on the LAN. Its facility is asked of the directory each time, never cached:
/// a device revoked while connected gets nothing more.
#[derive(Debug)]
struct LanPeer {
    connected: bool,
    /// Where mDNS last found it (dialled again while not connected: a dial can fail, e.g. when
    /// both devices dial each other as they start, and mDNS announces again only minutes later).
    addr: Option<Multiaddr>,
    /// When it was last dialled.
    dialled: Option<Instant>,
}

/// LAN state of a sync run.
#[derive(Debug, Default)]
pub struct Lan {
    peers: HashMap<PeerId, LanPeer>,
    offers: HashMap<OutboundRequestId, (PeerId, DocumentId)>,
    delivers: HashMap<OutboundRequestId, PeerId>,
    directories: HashMap<OutboundRequestId, PeerId>,
    last_round: Option<Instant>,
}

/// The facility of a current device (verified chain, not revoked, trusted facility), if `peer` is
/// one and is not this device.
fn peer_facility(engine: &Engine, peer: &PeerId) -> Option<FacilityId> {
    current_facility(engine, &engine.directory().ok()?, peer)
}

/// [`peer_facility`] with the directory already loaded.
fn current_facility(engine: &Engine, dir: &Directory, peer: &PeerId) -> Option<FacilityId> {
    if *peer == engine.device_id().0 {
        return None;
    }
    dir.device_status(&musubi_crdt::ids::DeviceId(*peer))
        .current()
}

/// Whether both this device's facility and `facility` are members of `doc`.
fn shares(engine: &Engine, facility: FacilityId, doc: DocumentId) -> Result<bool> {
    let me = engine.enrolment()?.facility;
    Ok(engine
        .store()
        .document(doc)?
        .is_some_and(|d| d.info.role_of(facility).is_some() && d.info.role_of(me).is_some()))
}

/// The documents whose members include both this device's facility and `facility`.
pub fn shared_docs(engine: &Engine, facility: FacilityId) -> Result<Vec<DocumentId>> {
    let me = engine.enrolment()?.facility;
    Ok(engine
        .store()
        .documents(None)?
        .into_iter()
        .filter(|d| d.info.role_of(facility).is_some() && d.info.role_of(me).is_some())
        .map(|d| d.info.id)
        .collect())
}

fn ops_and_grants(
    engine: &Engine,
    doc: DocumentId,
) -> Result<(
    Vec<musubi_crdt::ops::DocOp>,
    Vec<musubi_crdt::ops::KeyGrant>,
)> {
    Ok((engine.store().ops(doc)?, engine.shareable_grants(doc)?))
}

/// Bundles of `doc` with the given ids (or not in `except`), up to about the pull byte target.
fn bundles_for(
    engine: &Engine,
    doc: DocumentId,
    pick: impl Fn(&BundleId) -> bool,
) -> Result<(Vec<musubi_crdt::bundle::Envelope>, bool)> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for b in engine.store().shareable_bundles(doc)? {
        if !pick(&b.id) {
            continue;
        }
        let size = b.envelope.ciphertext.len() + 256;
        if !out.is_empty() && bytes + size > PULL_RESPONSE_BYTES_TARGET {
            return Ok((out, true));
        }
        bytes += size;
        out.push(b.envelope);
    }
    Ok((out, false))
}

impl Lan {
    /// Whether `peer` is a LAN peer of this run.
    pub fn is_peer(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// mDNS found `peer` at `addr`: dial it if the directory lists it as a current device.
    pub fn on_discovered(
        &mut self,
        engine: &Engine,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        addr: Multiaddr,
    ) {
        if peer_facility(engine, &peer).is_none() {
            return;
        }
        let known = self.peers.entry(peer).or_insert(LanPeer {
            connected: false,
            addr: None,
            dialled: None,
        });
        known.addr = Some(addr.clone());
        if !known.connected {
            known.dialled = Some(Instant::now());
            let _ = swarm.dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
        }
    }

    /// A connection to `peer` is up; returns whether it is a LAN peer.
    pub fn on_connected(
        &mut self,
        engine: &Engine,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
    ) -> bool {
        if peer_facility(engine, &peer).is_none() {
            return false;
        }
        let known = self.peers.entry(peer).or_insert(LanPeer {
            connected: true,
            addr: None,
            dialled: None,
        });
        known.connected = true;
        tracing::info!(%peer, "LAN peer connected");
        self.offer_all(engine, swarm, Some(peer));
        true
    }

    /// Number of facility devices on the LAN this run is connected to now.
    pub fn connected_peers(&self) -> usize {
        self.peers.values().filter(|p| p.connected).count()
    }

    /// The last connection to `peer` closed.
    pub fn on_closed(&mut self, peer: &PeerId) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
        }
        self.offers.retain(|_, (p, _)| p != peer);
        self.delivers.retain(|_, p| p != peer);
        self.directories.retain(|_, p| p != peer);
    }

    /// Offers every shared document to connected peers, at most every [`LAN_ROUND_INTERVAL`] unless `force`.
    pub fn round(&mut self, engine: &Engine, swarm: &mut Swarm<Behaviour>, force: bool) {
        if !force
            && self
                .last_round
                .is_some_and(|t| t.elapsed() < LAN_ROUND_INTERVAL)
        {
            return;
        }
        self.last_round = Some(Instant::now());
        // A peer found but not connected (its dial failed, or the connection dropped) is dialled
        // again, at most every LAN_REDIAL_INTERVAL.
        for (peer, p) in &mut self.peers {
            if !p.connected
                && let Some(addr) = &p.addr
                && peer_facility(engine, peer).is_some()
                && p.dialled.is_none_or(|t| t.elapsed() >= LAN_REDIAL_INTERVAL)
            {
                p.dialled = Some(Instant::now());
                tracing::debug!(%peer, "dialling a LAN peer again");
                let _ = swarm.dial(
                    DialOpts::peer_id(*peer)
                        .addresses(vec![addr.clone()])
                        .build(),
                );
            }
        }
        self.offer_all(engine, swarm, None);
    }

    fn offer_all(&mut self, engine: &Engine, swarm: &mut Swarm<Behaviour>, only: Option<PeerId>) {
        // Who the peer is, asked of the directory now: a device revoked since it connected (this
        // device learned it from the relay or a file meanwhile) is offered nothing more.
        let Ok(dir) = engine.directory() else {
            return;
        };
        let peers: Vec<(PeerId, FacilityId)> = self
            .peers
            .iter()
            .filter(|(p, s)| s.connected && only.is_none_or(|o| o == **p))
            .filter_map(|(p, _)| current_facility(engine, &dir, p).map(|f| (*p, f)))
            .collect();
        for (peer, facility) in peers {
            let Ok(docs) = shared_docs(engine, facility) else {
                continue;
            };
            for doc in docs {
                if self.offers.values().any(|(p, d)| *p == peer && *d == doc) {
                    continue;
                }
                match offer(engine, doc) {
                    Ok(req) => {
                        let id = swarm
                            .behaviour_mut()
                            .sync
                            .send_request(&peer, protocol::encode_request(&req));
                        self.offers.insert(id, (peer, doc));
                    }
                    Err(e) => tracing::warn!(%doc, "cannot build a LAN offer: {e}"),
                }
            }
        }
    }

    /// Answers a LAN request (`Offer` or `Deliver`) from `peer`; returns the answer and the documents it changed.
    pub fn answer(
        engine: &mut Engine,
        peer: &PeerId,
        request: Request,
    ) -> Result<(Response, Vec<DocumentId>)> {
        let Some(facility) = peer_facility(engine, peer) else {
            return Ok((
                Response::error(
                    ErrorCode::NotEnrolled,
                    "this device is not a current device of the deployment's directory",
                ),
                vec![],
            ));
        };
        match request {
            Request::GetDirectory { known_version } => {
                let directory = engine
                    .signed_directory()?
                    .filter(|d| d.claimed_version().is_some_and(|v| v != known_version));
                Ok((
                    Response::Directory {
                        directory,
                        relay_addrs: vec![],
                    },
                    vec![],
                ))
            }
            Request::Offer {
                directory_version, ..
            } if directory_version < engine.revocation_version()? => Ok((
                Response::error(
                    ErrorCode::StaleDirectory,
                    "this device knows of a revocation your directory does not have; fetch its directory first",
                ),
                vec![],
            )),
            Request::Offer {
                doc,
                have,
                ops,
                grants,
                ..
            } => {
                let is_member = |engine: &Engine| -> Result<bool> {
                    Ok(engine
                        .store()
                        .document(doc)?
                        .is_some_and(|d| d.info.role_of(facility).is_some()))
                };
                let known = engine.store().document(doc)?.is_some();
                if known && !is_member(engine)? {
                    // Nothing a non-member offers is taken, not even its operations.
                    return Ok((
                        Response::error(
                            ErrorCode::NotMember,
                            "your facility is not a member of this document",
                        ),
                        vec![],
                    ));
                }
                let mut items: Vec<PushItem> =
                    ops.iter().cloned().map(|op| PushItem::Op { op }).collect();
                items.extend(
                    grants
                        .iter()
                        .cloned()
                        .map(|grant| PushItem::Grant { grant }),
                );
                // Each item passes the admission rule; a document unknown here is taken only when
                // its signed operations name this facility.
                let report = engine.import_items(items, Origin::Lan, true)?;
                for r in &report.refused {
                    tracing::warn!(%peer, "LAN item refused: {r}");
                }
                if !is_member(engine)? {
                    return Ok((
                        Response::error(
                            ErrorCode::NotMember,
                            "your facility is not a member of this document",
                        ),
                        vec![],
                    ));
                }
                let have: BTreeSet<BundleId> = have.into_iter().collect();
                let mut mine: BTreeSet<BundleId> =
                    engine.store().bundle_ids(doc)?.into_iter().collect();
                // Bundles sealed again here are not wanted back.
                mine.extend(engine.store().superseded_ids(doc)?);
                let (items, more) = bundles_for(engine, doc, |id| !have.contains(id))?;
                let want: Vec<BundleId> = have.difference(&mine).copied().collect();
                let their_ops: BTreeSet<[u8; 32]> = ops.iter().map(|o| o.hash()).collect();
                let their_grants: BTreeSet<[u8; 32]> = grants.iter().map(|g| g.hash()).collect();
                let (my_ops, my_grants) = ops_and_grants(engine, doc)?;
                Ok((
                    Response::Exchange {
                        doc,
                        items,
                        more,
                        want,
                        ops: my_ops
                            .into_iter()
                            .filter(|o| !their_ops.contains(&o.hash()))
                            .collect(),
                        grants: my_grants
                            .into_iter()
                            .filter(|g| !their_grants.contains(&g.hash()))
                            .collect(),
                    },
                    vec![doc],
                ))
            }
            Request::Deliver { doc, items } => {
                let member = engine
                    .store()
                    .document(doc)?
                    .is_some_and(|d| d.info.role_of(facility).is_some());
                if !member {
                    return Ok((
                        Response::error(
                            ErrorCode::NotMember,
                            "your facility is not a member of this document",
                        ),
                        vec![],
                    ));
                }
                let items = items
                    .into_iter()
                    .filter(|e| e.doc == doc)
                    .map(|envelope| PushItem::Bundle { envelope })
                    .collect();
                engine.import_items(items, Origin::Lan, true)?;
                Ok((Response::Ack, vec![doc]))
            }
            _ => Ok((
                Response::error(
                    ErrorCode::Forbidden,
                    "LAN peers exchange offers and deliveries only",
                ),
                vec![],
            )),
        }
    }

    /// Whether `id` is one of this LAN's outbound requests.
    pub fn owns(&self, id: &OutboundRequestId) -> bool {
        self.offers.contains_key(id)
            || self.delivers.contains_key(id)
            || self.directories.contains_key(id)
    }

    /// A LAN answer arrived; returns the documents it changed.
    pub fn on_response(
        &mut self,
        engine: &mut Engine,
        swarm: &mut Swarm<Behaviour>,
        id: OutboundRequestId,
        bytes: &[u8],
    ) -> Result<Vec<DocumentId>> {
        if self.delivers.remove(&id).is_some() {
            return Ok(vec![]);
        }
        if let Some(peer) = self.directories.remove(&id) {
            if let Ok(Response::Directory {
                directory: Some(d), ..
            }) = protocol::decode_response(bytes)
                && engine.update_directory(&d)?
            {
                tracing::info!(%peer, "took a newer directory from a LAN peer");
                engine.maintain_offline()?;
            }
            self.last_round = None;
            return Ok(vec![]);
        }
        let Some((peer, doc)) = self.offers.remove(&id) else {
            return Ok(vec![]);
        };
        match protocol::decode_response(bytes) {
            Ok(response @ Response::Exchange { more, .. }) => {
                if let Some(Request::Deliver { doc, items }) =
                    Lan::take_exchange(engine, &peer, doc, response)?
                {
                    let rid = swarm.behaviour_mut().sync.send_request(
                        &peer,
                        protocol::encode_request(&Request::Deliver { doc, items }),
                    );
                    self.delivers.insert(rid, peer);
                }
                if more {
                    self.last_round = None;
                }
                Ok(vec![doc])
            }
            Ok(Response::Error {
                code: ErrorCode::StaleDirectory,
                ..
            }) => {
                if !self.directories.values().any(|p| *p == peer) {
                    let known_version = engine.pins()?.version;
                    let rid = swarm.behaviour_mut().sync.send_request(
                        &peer,
                        protocol::encode_request(&Request::GetDirectory { known_version }),
                    );
                    self.directories.insert(rid, peer);
                }
                Ok(vec![])
            }
            Ok(Response::Error { code, message }) => {
                tracing::debug!(%peer, %doc, ?code, "LAN offer refused: {message}");
                Ok(vec![])
            }
            _ => Ok(vec![]),
        }
    }

    /// The offerer's side of an exchange, without IO: stores what the answer to [`offer`] for `doc`
    /// carries (verified, queued for the relay) and returns the `Deliver` of the bundles the peer
    /// wants, if it wants any.
    pub fn take_exchange(
        engine: &mut Engine,
        peer: &PeerId,
        doc: DocumentId,
        response: Response,
    ) -> Result<Option<Request>> {
        let Response::Exchange {
            doc: d,
            items,
            more: _,
            want,
            ops,
            grants,
        } = response
        else {
            return Ok(None);
        };
        if d != doc {
            return Ok(None);
        }
        let Some(facility) = peer_facility(engine, peer) else {
            tracing::info!(%peer, "a LAN peer is no longer a current device; nothing more is sent to it");
            return Ok(None);
        };
        let mut all: Vec<PushItem> = ops.into_iter().map(|op| PushItem::Op { op }).collect();
        all.extend(grants.into_iter().map(|grant| PushItem::Grant { grant }));
        all.extend(
            items
                .into_iter()
                .filter(|e| e.doc == doc)
                .map(|envelope| PushItem::Bundle { envelope }),
        );
        let report = engine.import_items(all, Origin::Lan, true)?;
        for r in &report.refused {
            tracing::warn!(%peer, "LAN item refused: {r}");
        }
        if want.is_empty() || !shares(engine, facility, doc)? {
            return Ok(None);
        }
        let want: BTreeSet<BundleId> = want.into_iter().collect();
        let (items, _) = bundles_for(engine, doc, |id| want.contains(id))?;
        Ok((!items.is_empty()).then_some(Request::Deliver { doc, items }))
    }

    /// A LAN request failed.
    pub fn on_failure(&mut self, id: &OutboundRequestId) {
        self.offers.remove(id);
        self.delivers.remove(id);
        self.directories.remove(id);
    }
}

/// The `Offer` of `doc` to a LAN peer: the bundle ids this device holds (the newest
/// [`OFFER_IDS_MAX`]), and the document's operations and grants.
pub fn offer(engine: &Engine, doc: DocumentId) -> Result<Request> {
    let mut have = engine.store().bundle_ids(doc)?;
    if have.len() > OFFER_IDS_MAX {
        have.drain(..have.len() - OFFER_IDS_MAX);
    }
    let (ops, grants) = ops_and_grants(engine, doc)?;
    Ok(Request::Offer {
        doc,
        directory_version: engine.pins()?.version,
        have,
        ops,
        grants,
    })
}
