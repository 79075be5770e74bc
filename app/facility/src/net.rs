//! The sync driver: runs `musubi_crdt::sync::Session` over libp2p against the relay.
//!
//! One task owns the swarm, the session and the engine; it feeds transport events and timers into
//! the session and applies the session's events to the store, each in one transaction, before the
//! next input. `Once` ends when the session is caught up; `Watch` reconnects with backoff forever
//! and picks up edits other processes make in the same store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use std::collections::BTreeSet;

use musubi_crdt::directory::{DeviceStatus, Devices as _};
use musubi_crdt::ids::{DocumentId, Seq};
use musubi_crdt::invite::{InviteCode, JoinRequest};
use musubi_crdt::membership::{self, Point};
use musubi_crdt::protocol::{self, ErrorCode, PushItem, PushResult, Request, Response};
use musubi_crdt::sync::{Event, Known, OutboxId, RequestId, Session, SessionConfig};
use musubi_transport::libp2p::request_response::{self, OutboundRequestId};
use musubi_transport::libp2p::swarm::SwarmEvent;
use musubi_transport::libp2p::swarm::dial_opts::DialOpts;
use musubi_transport::libp2p::{Multiaddr, PeerId, Swarm, mdns};
use musubi_transport::{Behaviour, BehaviourEvent, Node, build_swarm};

use crate::engine::{Engine, EngineError, Enrolment, Joined, now_ms};
use crate::lan::Lan;
use crate::services;

/// How often a watching session asks the relay for its document list again while connected, so a
/// notification lost on a live connection (the relay does not resend them) delays an update by at
/// most this long instead of until the next reconnection.
pub const RELIST_INTERVAL: Duration = Duration::from_secs(300);

/// How a sync run ends.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Until caught up, or fail after the timeout.
    Once {
        /// Give up after this long.
        timeout: Duration,
    },
    /// Forever, reconnecting with backoff.
    Watch,
}

/// What a sync run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncReport {
    /// Items the relay acknowledged.
    pub pushed: u64,
    /// Bundles received.
    pub pulled: u64,
    /// Items the relay refused for good: (document, reason).
    pub rejected: Vec<(String, String)>,
    /// Items the relay refused for now because this facility's storage quota there is full: kept
    /// in the outbox and sent again at a later sync.
    pub held_back: u64,
    /// The relay's sentence for the first item it held back.
    pub held_back_message: Option<String>,
    /// Documents the relay held less of than this device knew it acknowledged (a rollback), whose
    /// items were offered again.
    pub rolled_back: u64,
    /// Whether the relay's store turned out to be another generation (restored from a backup).
    pub relay_restored: bool,
    /// Devices this device approved to join its facility.
    pub approved: u64,
}

/// Errors of a sync run.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The relay could not be reached in time.
    #[error(
        "could not reach the relay at {addrs} within {secs} s ({last}); the edits stay queued and will be sent at the next sync"
    )]
    Unreachable {
        /// The addresses tried.
        addrs: String,
        /// The timeout in seconds.
        secs: u64,
        /// The last transport error.
        last: String,
    },
    /// The relay refused this device.
    #[error("{}", refused_message(*.code, .message))]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The relay's sentence.
        message: String,
    },
    /// The invite was refused.
    #[error("the relay refused the invite: {0}")]
    InviteRefused(String),
    /// Some items were refused by the relay.
    #[error("the relay refused {} item(s): {}", .0.len(), .0.iter().map(|(d, r)| format!("{d}: {r}")).collect::<Vec<_>>().join("; "))]
    Rejected(Vec<(String, String)>),
    /// Engine failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Transport setup failure.
    #[error("network setup failed: {0}")]
    Transport(String),
    /// A bad invite code.
    #[error(transparent)]
    Invite(#[from] musubi_crdt::invite::InviteError),
}

fn refused_message(code: ErrorCode, message: &str) -> String {
    match code {
        ErrorCode::Revoked => format!(
            "the relay operator has revoked this device or its facility; ask the operator for a new invite ({message})"
        ),
        ErrorCode::NotEnrolled => {
            format!("the relay does not know this device; join again with a new invite ({message})")
        }
        _ => format!("the relay refused this device: {message}"),
    }
}

fn relay_target(enrolment: &Enrolment) -> (PeerId, Vec<Multiaddr>) {
    let addrs = enrolment
        .relay_addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .map(|a| {
            if matches!(
                a.iter().last(),
                Some(musubi_transport::libp2p::multiaddr::Protocol::P2p(_))
            ) {
                a
            } else {
                a.with(musubi_transport::libp2p::multiaddr::Protocol::P2p(
                    enrolment.relay.0,
                ))
            }
        })
        .collect();
    (enrolment.relay.0, addrs)
}

/// Sets the LAN allow list (when the swarm has one) to the relay and the current devices of the
/// verified directory: a peer that is not one is refused at connection establishment, and one that
/// stopped being one (revoked) is disconnected.
fn refresh_allowed(engine: &Engine, swarm: &mut Swarm<Behaviour>, relay: PeerId) {
    let Some(allowed) = swarm.behaviour_mut().allowed.as_mut() else {
        return;
    };
    let me = engine.device_id().0;
    let mut want: std::collections::HashSet<PeerId> = std::collections::HashSet::from([relay]);
    if let Ok(dir) = engine.directory() {
        want.extend(
            dir.facilities
                .iter()
                .flat_map(|f| f.current_devices())
                .map(|d| d.device.0)
                .filter(|p| *p != me),
        );
    }
    let gone: Vec<PeerId> = allowed
        .allowed_peers()
        .iter()
        .filter(|p| !want.contains(p))
        .copied()
        .collect();
    for p in gone {
        allowed.disallow_peer(p);
    }
    for p in want {
        allowed.allow_peer(p);
    }
}

fn dial(swarm: &mut Swarm<Behaviour>, peer: PeerId, addrs: &[Multiaddr]) {
    let opts = DialOpts::peer_id(peer).addresses(addrs.to_vec()).build();
    if let Err(e) = swarm.dial(opts) {
        tracing::debug!("dial: {e}");
    }
}

/// How often `join` asks again while its request waits for the inviter's approval.
pub const JOIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Asks to join with an invite code: dials the relay, sends the signed join request with its proof
/// of the invite's secret, and (with `wait`) asks again every [`JOIN_POLL_INTERVAL`] until the inviter
/// approved or `timeout` passed. On approval the directory is verified against the authority the
/// invite names (the device pins it) and the enrolment recorded.
///
/// Errors: [`SyncError::InviteRefused`] (unknown, used or expired invite, or an answer that does not
/// verify), [`SyncError::Unreachable`], already enrolled.
pub async fn join(
    engine: &mut Engine,
    code: &str,
    timeout: Duration,
    wait: bool,
) -> Result<Joined, SyncError> {
    if let Ok(e) = engine.enrolment() {
        return Err(EngineError::AlreadyEnrolled(e.facility_name).into());
    }
    let invite = InviteCode::decode(code)?;
    if invite.expires_at_ms <= now_ms() {
        return Err(SyncError::InviteRefused(
            "this invite has expired; ask for a new one".into(),
        ));
    }
    let request = JoinRequest::make(&invite, engine.secrets(), &engine.local_name()?, now_ms());
    let target = Enrolment {
        deployment: invite.deployment,
        facility: invite.facility(),
        facility_name: String::new(),
        role: musubi_crdt::ids::FacilityRole::Clinic,
        relay: invite.relay,
        relay_addrs: invite.addrs.clone(),
        authority: invite.authority,
    };
    let (peer, addrs) = relay_target(&target);
    let mut swarm = build_swarm(
        engine.secrets().keypair().clone(),
        Node::Facility {
            lan_discovery: false,
        },
    )
    .map_err(|e| SyncError::Transport(e.to_string()))?;
    dial(&mut swarm, peer, &addrs);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no answer");
    let mut sent: Option<OutboundRequestId> = None;
    let mut connected = false;
    let mut pending_until: Option<u64> = None;
    let mut again: Option<tokio::time::Instant> = None;
    let join_frame = protocol::encode_request(&Request::Join {
        request: Box::new(request),
    });
    loop {
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == peer => {
                    connected = true;
                    if sent.is_none() {
                        sent = Some(swarm.behaviour_mut().sync.send_request(&peer, join_frame.clone()));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if peer_id == peer => {
                    connected = false;
                    sent = None;
                    dial(&mut swarm, peer, &addrs);
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    last = error.to_string();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    dial(&mut swarm, peer, &addrs);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message { message: request_response::Message::Response { request_id, response }, .. })) if Some(request_id) == sent => {
                    sent = None;
                    match protocol::decode_response(&response) {
                        Ok(Response::Joined { deployment, facility, facility_name, role, directory, sealed_pseudonym }) => {
                            if deployment != invite.deployment || facility != invite.facility() {
                                return Err(SyncError::InviteRefused("the relay answered for another deployment or facility than the invite names".into()));
                            }
                            let enrolment = Enrolment { deployment, facility, facility_name, role, relay: invite.relay, relay_addrs: invite.addrs.clone(), authority: invite.authority };
                            let enrolment = engine
                                .record_enrolment(&enrolment, &directory, &sealed_pseudonym)
                                .map_err(|e| SyncError::InviteRefused(e.to_string()))?;
                            return Ok(Joined::Enrolled(Box::new(enrolment)));
                        }
                        Ok(Response::JoinPending { expires_at_ms }) => {
                            if !wait {
                                return Ok(Joined::Pending { expires_at_ms });
                            }
                            pending_until = Some(expires_at_ms);
                            again = Some(tokio::time::Instant::now() + JOIN_POLL_INTERVAL);
                        }
                        Ok(Response::Error { message, .. }) => return Err(SyncError::InviteRefused(message)),
                        Ok(other) => return Err(SyncError::InviteRefused(format!("unexpected answer {}", response_kind(&other)))),
                        Err(e) => return Err(SyncError::InviteRefused(e.to_string())),
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::OutboundFailure { error, .. })) => {
                    last = error.to_string();
                    sent = None;
                    dial(&mut swarm, peer, &addrs);
                }
                _ => {}
            },
            _ = async { match again { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                again = None;
                if connected && sent.is_none() {
                    sent = Some(swarm.behaviour_mut().sync.send_request(&peer, join_frame.clone()));
                } else {
                    dial(&mut swarm, peer, &addrs);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                if let Some(expires_at_ms) = pending_until {
                    return Ok(Joined::Pending { expires_at_ms });
                }
                return Err(SyncError::Unreachable { addrs: invite.addrs.join(", "), secs: timeout.as_secs(), last });
            }
        }
    }
}

fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Joined { .. } => "joined",
        Response::JoinPending { .. } => "join-pending",
        Response::JoinRequests { .. } => "join-requests",
        Response::Ops { .. } => "ops",
        Response::Directory { .. } => "directory",
        Response::Documents { .. } => "documents",
        Response::Pushed { .. } => "pushed",
        Response::Bundles { .. } => "bundles",
        Response::KeyGrants { .. } => "key-grants",
        Response::Exchange { .. } => "exchange",
        Response::Ack => "ack",
        Response::Error { .. } => "error",
    }
}

/// Options of a sync run beyond its mode.
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Also find facility devices on the LAN by mDNS and exchange bundles with them (watch mode).
    pub lan: bool,
    /// Addresses to listen on for LAN peers (default `/ip4/0.0.0.0/tcp/0` when `lan`).
    pub listen: Vec<Multiaddr>,
    /// Where to report what the run does, for a UI: connection state, documents changed, pushes.
    /// Sending never blocks; a closed receiver is ignored.
    pub events: Option<tokio::sync::mpsc::UnboundedSender<SyncEvent>>,
    /// Woken to sync now: when offline, dial the relay at once instead of waiting out the backoff;
    /// when connected, ask the relay for the document list again.
    pub nudge: Option<Arc<tokio::sync::Notify>>,
}

/// What a sync run reports to an observer ([`SyncOptions::events`]) as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncEvent {
    /// The connection to the relay came up (`true`) or went down (`false`).
    Relay(bool),
    /// The number of facility devices on the LAN this run is connected to changed.
    LanPeers(usize),
    /// Bundles or keys arrived for this document (from the relay or a LAN peer): its content may
    /// have changed.
    Changed(DocumentId),
    /// The relay's document list arrived: documents may have been shared with this facility.
    Listed,
    /// The relay acknowledged outbox items: the count of unsent items went down.
    Pushed,
    /// The relay went back in time (its store was restored, or it rolled back): what this device
    /// holds was offered to it again ([`relay_behind`] says when).
    RelayBehind,
    /// A directory arrived (facilities, devices, revocations may have changed).
    Directory,
    /// In step with the relay: everything queued was sent and everything announced was pulled.
    CaughtUp,
}

/// Runs a sync session with the relay.
pub async fn sync(
    engine: &mut Engine,
    mode: Mode,
    on_progress: impl FnMut(&SyncReport),
) -> Result<SyncReport, SyncError> {
    sync_with(engine, mode, SyncOptions::default(), on_progress).await
}

/// Runs a sync session with the relay and, with `options.lan`, with LAN peers.
pub async fn sync_with(
    engine: &mut Engine,
    mode: Mode,
    options: SyncOptions,
    mut on_progress: impl FnMut(&SyncReport),
) -> Result<SyncReport, SyncError> {
    let enrolment = engine.enrolment()?;
    let requeued = engine.store_mut().requeue_unsent()?;
    let released = engine.recheck_quarantine()?;
    if released > 0 {
        tracing::info!(
            released,
            "quarantined bundles the rules now admit were released"
        );
    }
    if requeued > 0 {
        tracing::warn!(
            requeued,
            "queued again bundles written here that were neither acknowledged nor queued"
        );
    }
    let (relay, addrs) = relay_target(&enrolment);
    let mut swarm = build_swarm(
        engine.secrets().keypair().clone(),
        Node::Facility {
            lan_discovery: options.lan,
        },
    )
    .map_err(|e| SyncError::Transport(e.to_string()))?;
    let mut lan = Lan::default();
    if options.lan {
        let listen = if options.listen.is_empty() {
            vec!["/ip4/0.0.0.0/tcp/0".parse().expect("constant multiaddr")]
        } else {
            options.listen.clone()
        };
        for a in listen {
            swarm
                .listen_on(a.clone())
                .map_err(|e| SyncError::Transport(format!("cannot listen on {a}: {e}")))?;
        }
    }
    let (mut session, mut last_outbox) = start_session(engine)?;
    let mut requests: HashMap<OutboundRequestId, RequestId> = HashMap::new();
    let mut report = SyncReport::default();
    let mut connected = false;
    let mut redial_backoff = Duration::from_millis(250);
    let mut redial_at: Option<tokio::time::Instant> = None;
    let mut last_error = String::from("no answer");
    let deadline = match mode {
        Mode::Once { timeout } => Some(tokio::time::Instant::now() + timeout),
        Mode::Watch => None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_list = tokio::time::Instant::now();
    let mut last_audit = tokio::time::Instant::now();
    let emit = |e: SyncEvent| {
        if let Some(tx) = &options.events {
            let _ = tx.send(e);
        }
    };
    let mut lan_peers = 0usize;
    refresh_allowed(engine, &mut swarm, relay);
    dial(&mut swarm, relay, &addrs);

    loop {
        let now = Instant::now();
        while let Some(t) = session.poll_transmit(now) {
            let rid = swarm
                .behaviour_mut()
                .sync
                .send_request(&relay, protocol::encode_request(&t.request));
            requests.insert(rid, t.id);
        }
        while let Some(ev) = session.poll_event() {
            let observed = match &ev {
                Event::Pulled { doc, .. }
                | Event::KeyGrants { doc, .. }
                | Event::Ops { doc, .. } => Some(SyncEvent::Changed(*doc)),
                Event::Documents(_) => Some(SyncEvent::Listed),
                Event::Directory(_) => Some(SyncEvent::Directory),
                Event::Pushed { .. } => Some(SyncEvent::Pushed),
                Event::Behind { .. } | Event::RelayRestored { .. } => Some(SyncEvent::RelayBehind),
                Event::CaughtUp => Some(SyncEvent::CaughtUp),
                _ => None,
            };
            let applied = apply_event(engine, &mut session, ev, &mut report)?;
            if observed == Some(SyncEvent::Directory) {
                refresh_allowed(engine, &mut swarm, relay);
            }
            if let Some(e) = observed {
                emit(e);
            }
            match applied {
                Applied::Continue => {}
                Applied::Progress => on_progress(&report),
                Applied::CaughtUp => {
                    // The relay's list is in: the audit log goes to the facility's audit document
                    // (created now if the facility has none).
                    publish_audit(engine, true);
                    // Anything queued meanwhile (by this task or another process) goes first.
                    let fresh = engine.store().pending(last_outbox)?;
                    if fresh.is_empty() && matches!(mode, Mode::Once { .. }) {
                        if report.rejected.is_empty() {
                            return Ok(report);
                        }
                        return Err(SyncError::Rejected(report.rejected));
                    }
                }
            }
        }
        if feed_outbox(engine, &mut session, &mut last_outbox)? {
            if options.lan {
                lan.round(engine, &mut swarm, true);
            }
            continue;
        }

        let timer = session.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id != relay && options.lan => {
                    // Only current devices of the verified directory get here: the allow list
                    // (`refresh_allowed`) refuses anyone else when the connection is established.
                    lan.on_connected(engine, &mut swarm, peer_id);
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if peer_id != relay => {
                    lan.on_closed(&peer_id);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    refresh_allowed(engine, &mut swarm, relay);
                    for (peer, addr) in found {
                        if peer != relay {
                            lan.on_discovered(engine, &mut swarm, peer, addr);
                        }
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay && !connected => {
                    connected = true;
                    redial_backoff = Duration::from_millis(250);
                    session.handle_connected(Instant::now());
                    last_list = tokio::time::Instant::now();
                    tracing::info!("connected to the relay");
                    emit(SyncEvent::Relay(true));
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } if peer_id == relay => {
                    connected = false;
                    session.handle_disconnected(Instant::now());
                    requests.clear();
                    last_error = cause.map(|c| c.to_string()).unwrap_or_else(|| "connection closed".into());
                    redial_at = Some(tokio::time::Instant::now() + redial_backoff);
                    emit(SyncEvent::Relay(false));
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(p), error, .. } if p == relay => {
                    last_error = error.to_string();
                    if !connected {
                        redial_at = Some(tokio::time::Instant::now() + redial_backoff);
                        redial_backoff = (redial_backoff * 2).min(Duration::from_secs(30));
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(p), error, .. } if lan.is_peer(&p) => {
                    // Dialled again at a later LAN round.
                    tracing::info!(peer = %p, "could not connect to a LAN peer: {error}");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => match ev {
                    request_response::Event::Message { peer, message, .. } => match message {
                        request_response::Message::Response { request_id, response } if lan.owns(&request_id) => {
                            let touched = lan.on_response(engine, &mut swarm, request_id, &response)?;
                            after_lan(engine, &mut session, touched, &emit)?;
                        }
                        request_response::Message::Request { request, channel, .. } if peer != relay && options.lan => {
                            let (answer, touched) = match protocol::decode_request(&request) {
                                Ok(req) => Lan::answer(engine, &peer, req)?,
                                Err(e) => (Response::error(e.code(), e.to_string()), vec![]),
                            };
                            let _ = swarm.behaviour_mut().sync.send_response(channel, protocol::encode_response(&answer));
                            after_lan(engine, &mut session, touched, &emit)?;
                        }
                        request_response::Message::Response { request_id, response } => {
                            if let Some(id) = requests.remove(&request_id) {
                                match protocol::decode_response_frame(&response) {
                                    Ok((generation, r)) => session.handle_response_frame(id, generation, r, Instant::now()),
                                    Err(e) => {
                                        tracing::warn!("undecodable answer from the relay: {e}");
                                        session.handle_failure(id, Instant::now());
                                    }
                                }
                            }
                        }
                        request_response::Message::Request { request, channel, .. } => {
                            let answer = if peer != relay {
                                Response::error(ErrorCode::Forbidden, "this facility takes notifications only from its relay")
                            } else {
                                match protocol::decode_request(&request) {
                                    Ok(Request::Notify { doc, head, epoch }) => {
                                        session.handle_notify(doc, head, epoch, Instant::now());
                                        Response::Ack
                                    }
                                    Ok(Request::NotifyJoin) => {
                                        session.handle_notify_join();
                                        Response::Ack
                                    }
                                    Ok(Request::NotifyDirectory { version }) => {
                                        session.handle_notify_directory(version);
                                        Response::Ack
                                    }
                                    Ok(_) => Response::error(ErrorCode::Forbidden, "facilities answer only notifications"),
                                    Err(e) => Response::error(e.code(), e.to_string()),
                                }
                            };
                            let _ = swarm.behaviour_mut().sync.send_response(channel, protocol::encode_response(&answer));
                        }
                    },
                    request_response::Event::OutboundFailure { request_id, .. } if lan.owns(&request_id) => {
                        lan.on_failure(&request_id);
                    }
                    request_response::Event::OutboundFailure { request_id, error, .. } => {
                        last_error = error.to_string();
                        if let Some(id) = requests.remove(&request_id) {
                            session.handle_failure(id, Instant::now());
                        }
                    }
                    _ => {}
                },
                _ => {}
            },
            _ = async { match timer { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                session.handle_timeout(Instant::now());
            }
            _ = async { match &options.nudge { Some(n) => n.notified().await, None => std::future::pending().await } } => {
                if connected {
                    last_list = tokio::time::Instant::now();
                    session.want_documents();
                } else {
                    redial_backoff = Duration::from_millis(250);
                    redial_at = None;
                    // The addresses the relay named since (a move announced in advance) too.
                    let addrs = engine.enrolment().map(|e| relay_target(&e).1).unwrap_or_else(|_| addrs.clone());
                    dial(&mut swarm, relay, &addrs);
                }
                if options.lan {
                    lan.round(engine, &mut swarm, true);
                }
            }
            _ = tick.tick() => {
                if options.lan {
                    lan.round(engine, &mut swarm, false);
                    let now_peers = lan.connected_peers();
                    if now_peers != lan_peers {
                        lan_peers = now_peers;
                        emit(SyncEvent::LanPeers(now_peers));
                    }
                }
                if last_audit.elapsed() >= AUDIT_PUBLISH_INTERVAL {
                    last_audit = tokio::time::Instant::now();
                    publish_audit(engine, connected);
                }
                if connected && last_list.elapsed() >= RELIST_INTERVAL {
                    last_list = tokio::time::Instant::now();
                    session.want_documents();
                    session.want_directory();
                }
                if let Some(t) = redial_at
                    && tokio::time::Instant::now() >= t
                    && !connected
                {
                    redial_at = None;
                    let addrs = engine.enrolment().map(|e| relay_target(&e).1).unwrap_or_else(|_| addrs.clone());
                    dial(&mut swarm, relay, &addrs);
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                let pending = engine.store().pending_count().unwrap_or(0);
                if connected {
                    return Err(SyncError::Unreachable { addrs: enrolment.relay_addrs.join(", "), secs: mode_secs(mode), last: format!("connected but not finished: {pending} item(s) still pending") });
                }
                return Err(SyncError::Unreachable { addrs: enrolment.relay_addrs.join(", "), secs: mode_secs(mode), last: last_error });
            }
        }
    }
}

/// A session for this device: its directory version, cursors, key epochs, the operations the relay
/// confirmed and the relay's store generation, with every pending outbox item queued in order of
/// urgency. Returns the session and the last outbox id queued.
pub fn start_session(engine: &mut Engine) -> Result<(Session, u64), SyncError> {
    let directory_version = engine.pins().map(|p| p.version).unwrap_or(0);
    let cursors: HashMap<_, _> = engine.store().cursors()?.into_iter().collect();
    let epochs: HashMap<_, _> = engine.key_epochs()?.into_iter().collect();
    let ops: HashMap<_, _> = engine
        .store()
        .documents(None)?
        .into_iter()
        .map(|r| (r.info.id, r.relay_ops))
        .collect();
    let generation = engine.store().meta_cbor("relay_generation")?;
    let witnesses: HashMap<_, _> = engine
        .store()
        .witnesses()?
        .into_iter()
        .map(|(doc, seq, log)| (doc, (seq, log)))
        .collect();
    let mut session = Session::new(
        SessionConfig::default(),
        Known {
            directory_version,
            cursors,
            epochs,
            ops,
            generation,
            witnesses,
        },
    );
    engine.maintain()?;
    engine.take_retracted();
    publish_audit(engine, false);
    // The queue drains in order of urgency: shelter rosters before referrals before care plans;
    // a stable sort keeps each document's own items in the order they were made.
    let mut last_outbox = 0u64;
    let mut initial = engine.store().pending(0)?;
    let mut urgency: HashMap<musubi_crdt::ids::DocumentId, u8> = HashMap::new();
    for row in engine.store().documents(None)? {
        urgency.insert(row.info.id, urgency_of(row.info.kind));
    }
    initial.sort_by_key(|r| {
        r.item
            .doc()
            .and_then(|d| urgency.get(&d).copied())
            .unwrap_or(0)
    });
    for row in initial {
        last_outbox = last_outbox.max(row.id);
        session.push(OutboxId(row.id), row.item);
    }
    Ok((session, last_outbox))
}

/// How often a running sync copies new audit entries into the facility's audit document.
pub const AUDIT_PUBLISH_INTERVAL: Duration = Duration::from_secs(30);

/// Copies this device's new audit entries into the facility's audit document
/// ([`crate::audit::publish`]), which then syncs like any document. A failure is logged, never
/// stops the sync: a log this device cannot publish (it was put back to an older copy, or cut) is
/// what `musubi audit verify` reports. `create`: as in [`crate::audit::publish`] (false before
/// the session has heard the relay's list of documents).
pub fn publish_audit(engine: &mut Engine, create: bool) {
    match crate::audit::publish(engine, crate::engine::now_ms(), create) {
        Ok(p) if p != crate::audit::Published::default() => {
            tracing::debug!(?p, "audit entries published");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("could not copy the audit log to the facility's audit document: {e}")
        }
    }
}

/// Queues outbox items written since `last_outbox` (by this process or another); returns whether any were.
pub fn feed_outbox(
    engine: &Engine,
    session: &mut Session,
    last_outbox: &mut u64,
) -> Result<bool, SyncError> {
    let fresh = engine.store().pending(*last_outbox)?;
    let any = !fresh.is_empty();
    for row in fresh {
        *last_outbox = row.id;
        session.push(OutboxId(row.id), row.item);
    }
    Ok(any)
}

/// What applying a session event means for the run.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing to report.
    Continue,
    /// Bundles arrived or items were acknowledged.
    Progress,
    /// The session is caught up.
    CaughtUp,
}

/// Applies one session event to the engine: verifies what arrived with the admission rule and stores
/// it (each in one transaction), acknowledges or rejects outbox items, approves join requests, offers
/// the relay again what it lost, and runs key upkeep after directory, operation or grant changes.
///
/// Errors: [`SyncError::Refused`] when the relay refused this device; store failures.
pub fn apply_event(
    engine: &mut Engine,
    session: &mut Session,
    ev: Event,
    report: &mut SyncReport,
) -> Result<Applied, SyncError> {
    let mut changed = false;
    let applied = match ev {
        Event::RelayAddrs(addrs) => {
            engine.learn_relay_addrs(&addrs)?;
            Applied::Continue
        }
        Event::Directory(d) => {
            if engine.update_directory(&d)? {
                changed = true;
                for row in engine.store().documents(None)? {
                    session.want_grants(row.info.id);
                }
            }
            Applied::Continue
        }
        Event::Documents(docs) => {
            for doc in engine.update_documents(&docs)? {
                tracing::warn!(%doc, "the relay no longer lists a document it acknowledged; offering it again");
                let ids = engine.relay_behind(doc, Seq(0), Some(0))?;
                session.offer(doc, ids);
                report.rolled_back += 1;
                mark_relay_behind(engine, false)?;
            }
            changed = true;
            Applied::Continue
        }
        Event::Ops {
            doc,
            from,
            ops,
            total: _,
        } => {
            let served = from.saturating_add(ops.len() as u32);
            let applied = engine.apply_relay_ops(doc, from, &ops)?;
            if applied.awaits_directory {
                // An exclusion of a device this device still holds current: the revocation is
                // on its way; ask again once the directory has arrived.
                session.handle_ops_await_directory(doc, applied.confirmed);
            } else {
                // An operation the relay served that does not verify is not asked for again.
                session.handle_ops(doc, applied.confirmed.max(served));
            }
            session.want_grants(doc);
            changed = true;
            services::after_sync(engine, doc)?;
            Applied::Continue
        }
        Event::KeyGrants { doc, grants } => {
            if let Some(row) = engine.store().document(doc)? {
                let dir = engine.directory()?;
                for g in grants {
                    match membership::admit_grant(&g, &row.info, &dir, Point::Pulled) {
                        Ok(()) => {
                            engine.store().put_grant(&g)?;
                        }
                        Err(e) => {
                            tracing::warn!(%doc, epoch = %g.epoch, "ignoring a key grant the relay served: {e}")
                        }
                    }
                }
            }
            let newest_held = engine.keys(doc)?.keys().next_back().copied();
            if let Some(epoch) = newest_held {
                session.handle_key(doc, epoch);
            }
            engine.note_grants_fetched(doc, newest_held, crate::engine::now_ms())?;
            changed = true;
            services::after_sync(engine, doc)?;
            Applied::Continue
        }
        Event::Pulled { doc, items } => {
            // The relay's bundle log at the last item, whatever is taken of them (the session
            // compares it with what the relay says later).
            let last = items.last().map(|p| (p.seq, p.log));
            let dir = engine.directory()?;
            let row = engine.store().document(doc)?;
            let mut good: Vec<(Seq, _)> = Vec::with_capacity(items.len());
            let mut refused: Vec<(Seq, _, String)> = Vec::new();
            for p in items {
                let author = p.envelope.author;
                // A bundle by a revoked device the relay gave a sequence number this device had not
                // seen when it learned of the revocation: the relay may have taken it after the
                // revocation (a relay that lies), or just before (this device had not pulled that far).
                // It cannot tell, so it keeps the bundle (history) and says so.
                if matches!(dir.device_status(&author), DeviceStatus::Former(_))
                    && engine
                        .store()
                        .revocation_mark(&author.to_string(), doc)?
                        .is_some_and(|(mark, _)| p.seq > mark)
                {
                    tracing::warn!(%doc, seq = %p.seq, %author, "the relay served a bundle by a revoked device that this device had not seen before learning of the revocation");
                    engine.store().set_meta_cbor(
                        &format!("doc_warning:{doc}"),
                        &format!(
                            "bundle {} (relay seq {}) is by {author}, a revoked device, and arrived after this device learned of the revocation; if it was written after it, the relay should have refused it",
                            p.envelope.id(),
                            p.seq
                        ),
                    )?;
                }
                let verdict = match &row {
                    Some(r) => membership::admit_bundle(&p.envelope, &r.info, &dir, Point::Pulled),
                    None => Err(membership::Refusal {
                        code: ErrorCode::Stale,
                        message: "the document's operations have not arrived".into(),
                    }),
                };
                tracing::debug!(
                    %doc,
                    seq = %p.seq,
                    epoch = %p.envelope.epoch,
                    refused = ?verdict.as_ref().err().map(|e| &e.message),
                    "pulled a bundle"
                );
                match verdict {
                    Ok(()) => good.push((p.seq, p.envelope)),
                    Err(e)
                        if e.code == ErrorCode::Stale
                            && p.envelope.verify_signature().is_ok()
                            && session.handle_unknown_epoch(doc, p.seq) =>
                    {
                        // In an epoch (or sealed with a key) whose operation has not arrived:
                        // fetch the operations, then pull again from here.
                        tracing::info!(%doc, seq = %p.seq, "a bundle in an epoch this device does not know yet; fetching the operations");
                        break;
                    }
                    Err(_)
                        if dir.device_status(&p.envelope.author) == DeviceStatus::Unknown
                            && p.envelope.verify_signature().is_ok()
                            && session.handle_unknown_author(doc, p.seq) =>
                    {
                        // Written by a device enrolled after this directory: fetch it, then pull
                        // again from here (the cursor stays before this bundle).
                        tracing::info!(%doc, seq = %p.seq, "a bundle by a device the directory does not list yet; fetching the directory");
                        break;
                    }
                    Err(e) if p.envelope.doc != doc => {
                        // The relay answered a pull of `doc` with another document's bundle: its
                        // fault, not the author's. Neither stored nor quarantined (an honest bundle
                        // of that document must stay usable when it arrives where it belongs).
                        tracing::warn!(%doc, seq = %p.seq, "the relay served a bundle of another document: {}", e.message);
                    }
                    Err(e) if e.code.is_final() => {
                        // Kept, never applied, and listed with its author (`musubi status`); looked
                        // at again when this device's view of the document or directory moves.
                        tracing::warn!(%doc, seq = %p.seq, author = %p.envelope.author, "quarantining a bundle that is not admitted: {}", e.message);
                        refused.push((p.seq, p.envelope, e.message));
                    }
                    Err(e) => {
                        // Refused only for now (an epoch or a device this device does not know
                        // yet): not quarantined, so it is taken once the view catches up.
                        tracing::warn!(%doc, seq = %p.seq, "dropping a bundle this device cannot admit yet: {}", e.message);
                    }
                }
            }
            report.pulled += good.len() as u64;
            engine
                .store_mut()
                .store_pulled(doc, &good, &refused, now_ms())?;
            if let Some((seq, log)) = last {
                engine.store().raise_witness(doc, seq, &log)?;
            }
            services::after_sync(engine, doc)?;
            Applied::Progress
        }
        Event::Pushed { item, result } => {
            let pushed = engine.store().outbox_item(item.0)?;
            match result {
                PushResult::Accepted { seq, log } | PushResult::Duplicate { seq, log } => {
                    engine.store_mut().acknowledge(item.0, seq)?;
                    if let (Some(PushItem::Bundle { envelope }), Some(seq), Some(log)) =
                        (&pushed, seq, log)
                    {
                        engine.store().raise_witness(envelope.doc, seq, &log)?;
                    }
                    match &pushed {
                        Some(PushItem::Op { op }) => {
                            if let Some((doc, n)) = engine.confirm_op(op)? {
                                session.handle_ops(doc, n);
                            }
                        }
                        Some(PushItem::Approve { .. }) => {
                            session.want_directory();
                            report.approved += 1;
                        }
                        _ => {}
                    }
                    report.pushed += 1;
                    Applied::Progress
                }
                PushResult::Rejected {
                    code: ErrorCode::Stale,
                    message,
                } => {
                    engine.store().mark_stale(item.0, &message)?;
                    tracing::info!(
                        "the relay refused item {} as made against another membership state; fetching and trying again: {message}",
                        item.0
                    );
                    match &pushed {
                        Some(PushItem::Approve { link, .. }) => {
                            engine.approval_stale(link)?;
                            engine.store().drop_outbox(item.0)?;
                            session.want_directory();
                            session.handle_notify_join();
                        }
                        Some(other) => {
                            if let Some(doc) = other.doc() {
                                let known =
                                    engine.store().document(doc)?.map_or(0, |r| r.relay_ops);
                                session.want_ops(doc, known);
                                session.want_grants(doc);
                            }
                        }
                        None => {}
                    }
                    changed = true;
                    Applied::Continue
                }
                PushResult::Rejected {
                    code: ErrorCode::QuotaExceeded,
                    message,
                } => {
                    // Not this item's fault: the facility's storage at the relay is full. The item
                    // stays queued (with the relay's sentence, `musubi status` shows it) and goes
                    // out again at the next sync, once the operator raised the quota.
                    engine.store().note_outbox_error(item.0, &message)?;
                    tracing::warn!("the relay holds back item {}: {message}", item.0);
                    report.held_back += 1;
                    report.held_back_message.get_or_insert(message);
                    Applied::Continue
                }
                PushResult::Rejected { code, message }
                    if pushed.as_ref().and_then(item_author) != Some(engine.device_id()) =>
                {
                    // Another device's item this device forwarded (from a LAN peer or a file): the
                    // relay's refusal is its author's concern, not this device's; it leaves the
                    // outbox. A refused bundle is also taken out of this device's copy when this
                    // device's own rules refuse it too, so it ends with what every other member
                    // has; a relay's word alone deletes nothing.
                    tracing::info!(
                        ?code,
                        "the relay refused an item this device forwarded: {message}"
                    );
                    engine.store().drop_outbox(item.0)?;
                    if let Some(PushItem::Bundle { envelope }) = &pushed
                        && engine
                            .store()
                            .bundle(&envelope.id())?
                            .is_some_and(|b| b.seq.is_none())
                    {
                        engine.drop_refused_bundle(envelope)?;
                    }
                    Applied::Continue
                }
                PushResult::Rejected { code, message } => {
                    let row_doc = format!("item {}", item.0);
                    engine
                        .store()
                        .reject(item.0, &format!("{code:?}: {message}"))?;
                    tracing::warn!("the relay refused {row_doc}: {message}");
                    report.rejected.push((row_doc, message));
                    Applied::Continue
                }
            }
        }
        Event::JoinRequests(requests) => {
            let a = engine.approve_joins(&requests)?;
            for r in &a.refused {
                tracing::warn!("join request refused: {r}");
            }
            Applied::Continue
        }
        Event::Wanted { doc, ids } => {
            let n = engine.requeue_bundles(doc, &ids)?;
            tracing::info!(%doc, bundles = n, "the relay lacked bundles this device holds; queued again");
            Applied::Continue
        }
        Event::Behind { doc, head, ops } => {
            tracing::warn!(%doc, %head, ops = ?ops, "the relay holds less of this document than it acknowledged before, or another history (rolled back?); offering it again");
            engine.store().clear_witness(doc)?;
            let ids = engine.relay_behind(doc, head, ops)?;
            session.offer(doc, ids);
            report.rolled_back += 1;
            mark_relay_behind(engine, false)?;
            changed = true;
            Applied::Continue
        }
        Event::RelayRestored { previous, now } => {
            tracing::warn!(previous = %hex::encode(previous), now = %hex::encode(now), "the relay's store is another generation (restored from a backup); pulling everything again and offering what this device holds");
            engine.store().set_meta_cbor("relay_generation", &now)?;
            engine.relay_restored()?;
            for row in engine.store().documents(None)? {
                let ids = engine.store().bundle_ids(row.info.id)?;
                session.offer(row.info.id, ids);
            }
            report.relay_restored = true;
            mark_relay_behind(engine, true)?;
            Applied::Continue
        }
        Event::Refused { code, message } => return Err(SyncError::Refused { code, message }),
        Event::CaughtUp => Applied::CaughtUp,
    };
    if let Some(g) = session.generation() {
        let known: Option<musubi_crdt::protocol::Generation> =
            engine.store().meta_cbor("relay_generation")?;
        if known != Some(g) {
            engine.store().set_meta_cbor("relay_generation", &g)?;
        }
    }
    if changed {
        engine.maintain()?;
    }
    let retracted: BTreeSet<OutboxId> = engine.take_retracted().into_iter().map(OutboxId).collect();
    if !retracted.is_empty() {
        session.retract(&retracted);
    }
    Ok(applied)
}

/// The device that signed an outbox item.
fn item_author(item: &PushItem) -> Option<musubi_crdt::ids::DeviceId> {
    match item {
        PushItem::Op { op } => Some(op.author),
        PushItem::Grant { grant } => Some(grant.author),
        PushItem::Bundle { envelope } => Some(envelope.author),
        PushItem::Invite { registration } => Some(registration.author),
        PushItem::Approve { link, .. } => Some(link.signer),
    }
}

/// After a LAN exchange changed `touched`: key upkeep (which may retract outbox items the session
/// holds), then each document's services, and the event for the front-end.
fn after_lan(
    engine: &mut Engine,
    session: &mut Session,
    touched: Vec<DocumentId>,
    emit: &dyn Fn(SyncEvent),
) -> Result<(), SyncError> {
    if !touched.is_empty() {
        engine.maintain_offline()?;
        retract(engine, session);
    }
    for doc in touched {
        services::after_sync(engine, doc)?;
        emit(SyncEvent::Changed(doc));
    }
    Ok(())
}

/// Drops from the session the outbox items the engine replaced (sealed or signed again).
fn retract(engine: &mut Engine, session: &mut Session) {
    let retracted: BTreeSet<OutboxId> = engine.take_retracted().into_iter().map(OutboxId).collect();
    if !retracted.is_empty() {
        session.retract(&retracted);
    }
}

/// What `status` says about the relay going back in time.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RelayBehind {
    /// When this device last noticed, ms since the Unix epoch.
    pub at_ms: u64,
    /// Whether the relay's store was another generation (restored) rather than rolled back.
    pub restored: bool,
    /// How many times this device noticed.
    pub times: u64,
}

/// The store key of [`RelayBehind`].
const RELAY_BEHIND_META: &str = "relay_behind";

/// When this device last noticed the relay going back in time, if it ever did.
///
/// Errors: the store's.
pub fn relay_behind(engine: &Engine) -> Result<Option<RelayBehind>, SyncError> {
    Ok(engine.store().meta_cbor(RELAY_BEHIND_META)?)
}

fn mark_relay_behind(engine: &Engine, restored: bool) -> Result<(), SyncError> {
    let mut r: RelayBehind = relay_behind(engine)?.unwrap_or_default();
    r.at_ms = now_ms();
    r.restored |= restored;
    r.times += 1;
    engine.store().set_meta_cbor(RELAY_BEHIND_META, &r)?;
    Ok(())
}

/// Lower drains first: rosters and medical notes of shelters, then referrals, then care plans,
/// then the audit log.
pub fn urgency_of(kind: musubi_crdt::ids::DocumentKind) -> u8 {
    use musubi_crdt::ids::DocumentKind::*;
    match kind {
        Shelter | ShelterMedical => 0,
        Referral => 1,
        CarePlan => 2,
        Audit => 3,
    }
}

fn mode_secs(mode: Mode) -> u64 {
    match mode {
        Mode::Once { timeout } => timeout.as_secs(),
        Mode::Watch => 0,
    }
}
