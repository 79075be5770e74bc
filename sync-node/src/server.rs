//! The network side: one tokio task runs the libp2p swarm; one thread owns the database.
//!
//! The swarm task `select!`s over swarm events, the database thread's finished results, a db-watch
//! interval and the shutdown signal. Each inbound `/musubi/sync/1` request goes to the database thread
//! (at most `Config::requests_queued_max` at a time; beyond that the caller gets `Internal`, "busy");
//! the answer comes back with its notifications, which go to the connected member devices only.
//! The db watch asks the database thread whether another process committed (`PRAGMA data_version`);
//! if a device was revoked meanwhile, its connections are closed.
//!
//! The database thread keeps the swarm's [`FrameGate`] to the current devices, re-read whenever the
//! directory's version changes (after each request, and on the db watch): frames from any other
//! key are read only up to `UNKNOWN_PEER_FRAME_BYTES_MAX`, a few at a time.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use musubi_crdt::ids::DeviceId;
use musubi_crdt::protocol::{self, ErrorCode, Request, Response};
use musubi_transport::libp2p::multiaddr::Protocol;
use musubi_transport::libp2p::request_response::{self, Message, ResponseChannel};
use musubi_transport::libp2p::swarm::SwarmEvent;
use musubi_transport::libp2p::{Multiaddr, PeerId};
use musubi_transport::{
    AddressLimit, AddressLimits, BehaviourEvent, FrameGate, Node, build_swarm_with,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn};

use crate::admin::{self, AdminConfig, AdminError, Identity};
use crate::authority::Authority;
use crate::limits::{Limiter, RateLimits};
use crate::metrics::{LimitLabel, Live, Metrics};
use crate::relay::{Notification, Observed, Relay};
use crate::store::{Store, StoreError, unix_ms};

/// How the relay serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often the database is checked for revocations made by other processes.
    pub db_watch_interval: Duration,
    /// Most requests waiting for or in the database thread; more get `Internal` ("busy, retry").
    pub requests_queued_max: usize,
    /// Print `listening on ADDR/p2p/PEERID` to stdout for each listen address, once it is recorded in the
    /// database (so `invite` run after reading the line puts it in the code), and `admin listening
    /// on http://ADDR:PORT` once the admin listener is bound (before those). The CLI contract.
    pub print_listen_addrs: bool,
    /// Per-device token buckets on requests and bytes (`None`: no limit).
    pub rate_limits: Option<RateLimits>,
    /// Most bundle bytes one facility may store (`None`: no quota).
    pub facility_quota_bytes: Option<u64>,
    /// The admin HTTP listener (`None`: off).
    pub admin: Option<AdminConfig>,
    /// Free bytes the data directory's filesystem must keep for `/readyz` to say ready.
    pub min_free_bytes: u64,
    /// Inbound connections (handshakes included) per source address and in all.
    pub connections: AddressLimits,
    /// Addresses to announce beside the listen addresses, first (`--advertise`: DNS names that
    /// survive a move, addresses behind NAT); in invites and in every directory answer.
    pub advertise: Vec<Multiaddr>,
}

/// Default of [`Config::connections`]`.per_address`: room for a municipality's facilities behind
/// one NAT, far below what one address could otherwise open.
pub const CONNECTIONS_PER_ADDRESS_DEFAULT: usize = 256;

/// Most requests of one device waiting for or in the database thread; more get "busy", so one
/// device cannot fill the queue the other facilities share.
pub const REQUESTS_QUEUED_PER_DEVICE_MAX: usize = 8;

/// Default of [`Config::min_free_bytes`]: room for a few of the largest pushes and the WAL.
pub const MIN_FREE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            db_watch_interval: Duration::from_millis(250),
            requests_queued_max: 64,
            print_listen_addrs: true,
            rate_limits: Some(RateLimits::default()),
            facility_quota_bytes: None,
            admin: None,
            min_free_bytes: MIN_FREE_BYTES_DEFAULT,
            connections: AddressLimits {
                per_address: Some(CONNECTIONS_PER_ADDRESS_DEFAULT),
                total: Some(musubi_crdt::limits::RELAY_CONNECTIONS_INCOMING_MAX as usize),
            },
            advertise: Vec::new(),
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The libp2p stack could not be built.
    #[error(transparent)]
    Transport(#[from] musubi_transport::TransportError),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// Every listener closed; nobody can reach the relay.
    #[error("no listen address is open any more: {0}")]
    NoListeners(String),
    /// The database thread stopped unexpectedly.
    #[error("the database thread stopped unexpectedly")]
    DatabaseThread,
    /// The admin listener could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

enum Job {
    Request {
        id: u64,
        peer: DeviceId,
        frame: Vec<u8>,
        span: tracing::Span,
        arrived: Instant,
    },
    /// Record these listen addresses; then print `listening on` the second one, if given.
    ListenAddrs(Vec<String>, Option<String>),
    Watch,
}

enum Done {
    Response {
        id: u64,
        peer: PeerId,
        frame: Vec<u8>,
        notes: Vec<Notification>,
        observed: Box<Observed>,
        arrived: Instant,
    },
    Revoked(Vec<DeviceId>),
    /// The directory's version changed: every connected device is told.
    Directory(u64),
    Watched,
}

/// Serves `/musubi/sync/1` on `listen` until an error stops it.
pub async fn serve(listen: Vec<Multiaddr>, store: Store, config: Config) -> Result<(), ServeError> {
    serve_until(listen, store, None, config, std::future::pending()).await
}

/// Serves until `shutdown` completes (then returns `Ok`), or an error stops it. With `authority`
/// (unlocked), new facilities are approved as they join (the embedded default).
///
/// Every acknowledged push was committed before its answer was sent, so stopping at any point loses
/// nothing that was acknowledged.
pub async fn serve_until(
    listen: Vec<Multiaddr>,
    mut store: Store,
    authority: Option<Authority>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    store.set_listen_addrs(&[], SystemTime::now())?;
    let metrics = Arc::new(Metrics::new());
    let live = Arc::new(Live::new(config.requests_queued_max, config.min_free_bytes));
    let identity = Identity {
        deployment: store.deployment()?.to_string(),
        deployment_name: store.deployment_name()?,
        relay: store.relay_device()?.to_string(),
        generation: hex::encode(store.generation()?),
    };
    let admin_store = match &config.admin {
        Some(_) => Some(Store::open(store.dir())?),
        None => None,
    };
    let mut relay = Relay::with_authority(store, authority)?;
    relay.set_facility_quota_bytes(config.facility_quota_bytes);
    let keypair = relay.secrets().keypair().clone();
    let generation = relay.generation();
    let local = keypair.public().to_peer_id();
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = match (config.admin.clone(), admin_store) {
        (Some(a), Some(store)) => {
            let (addr, task) =
                admin::start(a, store, metrics.clone(), live.clone(), identity, async {
                    let _ = admin_stopped.await;
                })
                .await?;
            if config.print_listen_addrs {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "admin listening on http://{addr}");
                let _ = out.flush();
            }
            Some(task)
        }
        _ => None,
    };
    let mut limiter = config.rate_limits.map(Limiter::<PeerId>::new);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut last_watchdog = Instant::now();
    let mut ready_sent = false;
    let refusals = metrics.clone();
    let address_limit = AddressLimit::new(
        config.connections,
        Arc::new(move |r: musubi_transport::Refused| {
            refusals
                .rate_limited
                .get_or_create(&LimitLabel { limit: r.as_str() })
                .inc();
        }),
    );
    let mut swarm = build_swarm_with(keypair, Node::Relay, Some(address_limit))?;
    let gate = swarm
        .behaviour()
        .frame_gate()
        .expect("a relay's swarm has a frame gate");
    for addr in listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| ServeError::Listen {
                addr,
                reason: e.to_string(),
            })?;
    }
    info!(relay = %local, "relay started");

    let (job_tx, job_rx) = std_mpsc::channel::<Job>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let worker = std::thread::Builder::new()
        .name("musubi-db".into())
        .spawn({
            let gate = gate.clone();
            move || db_thread(relay, gate, job_rx, done_tx)
        })
        .map_err(|_| ServeError::DatabaseThread)?;

    let mut pending: HashMap<u64, ResponseChannel<Vec<u8>>> = HashMap::new();
    let mut queued_by: HashMap<PeerId, usize> = HashMap::new();
    let mut next_id = 0u64;
    let mut connected: HashMap<PeerId, u32> = HashMap::new();
    // The advertised addresses first (invites put non-loopback addresses first, in this order).
    let advertised: Vec<String> = config
        .advertise
        .iter()
        .map(|a| match a.iter().last() {
            Some(Protocol::P2p(_)) => a.to_string(),
            _ => a.clone().with(Protocol::P2p(local)).to_string(),
        })
        .collect();
    let mut listen_addrs: Vec<String> = advertised.clone();
    if !advertised.is_empty() {
        info!(addrs = ?advertised, "advertising");
        let _ = job_tx.send(Job::ListenAddrs(listen_addrs.clone(), None));
    }
    let mut watch_outstanding = false;
    let mut watch = tokio::time::interval(config.db_watch_interval);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            _ = watch.tick() => {
                if !watch_outstanding {
                    watch_outstanding = job_tx.send(Job::Watch).is_ok();
                }
            }
            done = done_rx.recv() => {
                let Some(done) = done else { break Err(ServeError::DatabaseThread) };
                match done {
                    Done::Response { id, peer, frame, notes, observed, arrived } => {
                        if let Some(channel) = pending.remove(&id)
                            && swarm.behaviour_mut().sync.send_response(channel, frame).is_err()
                        {
                            debug!(%peer, "the caller left before its answer was sent");
                        }
                        if let Some(n) = queued_by.get_mut(&peer) {
                            *n -= 1;
                            if *n == 0 {
                                queued_by.remove(&peer);
                            }
                        }
                        metrics.queue_depth.set(pending.len() as i64);
                        metrics.observe(&observed, arrived.elapsed());
                        let now_ms = unix_ms(SystemTime::now());
                        if observed.commit.is_some() {
                            live.last_commit_ms.store(now_ms, Ordering::Relaxed);
                        }
                        let failed_at = if observed.outcome == "internal" { now_ms } else { 0 };
                        live.store_failed_at_ms.store(failed_at, Ordering::Relaxed);
                        for note in notes {
                            if note.to.0 != peer && connected.contains_key(&note.to.0) {
                                let bytes = protocol::encode_request(&note.request);
                                swarm.behaviour_mut().sync.send_request(&note.to.0, bytes);
                                metrics.notifications.inc();
                            }
                        }
                    }
                    Done::Directory(version) => {
                        let bytes = protocol::encode_request(&Request::NotifyDirectory { version });
                        let peers: Vec<PeerId> =
                            connected.keys().filter(|p| gate.is_known(p)).copied().collect();
                        for p in peers {
                            swarm.behaviour_mut().sync.send_request(&p, bytes.clone());
                        }
                    }
                    Done::Revoked(devices) => {
                        for d in devices {
                            if connected.contains_key(&d.0) {
                                info!(peer = %d, "disconnecting a revoked device");
                                let _ = swarm.disconnect_peer_id(d.0);
                            }
                        }
                    }
                    Done::Watched => {
                        watch_outstanding = false;
                        // Both the swarm task and the database thread are alive: tell systemd.
                        if let Some(every) = watchdog
                            && last_watchdog.elapsed() >= every
                        {
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                            last_watchdog = Instant::now();
                        }
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    let full = address.with(Protocol::P2p(local));
                    info!(addr = %full, "listening");
                    listen_addrs.push(full.to_string());
                    // The database thread prints the line after recording the address, so a script that
                    // reads "listening on" and then runs `invite` gets a code that carries it.
                    let announce = config.print_listen_addrs.then(|| full.to_string());
                    let _ = job_tx.send(Job::ListenAddrs(listen_addrs.clone(), announce));
                    live.listeners.store(swarm.listeners().count(), Ordering::Relaxed);
                    *live.addrs.lock().unwrap_or_else(|e| e.into_inner()) = listen_addrs.clone();
                    if !ready_sent {
                        ready_sent = true;
                        // Under systemd (Type=notify): the relay takes connections now.
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    }
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    let full = address.with(Protocol::P2p(local)).to_string();
                    info!(addr = %full, "no longer listening");
                    listen_addrs.retain(|a| *a != full);
                    let _ = job_tx.send(Job::ListenAddrs(listen_addrs.clone(), None));
                    live.listeners.store(swarm.listeners().count(), Ordering::Relaxed);
                    *live.addrs.lock().unwrap_or_else(|e| e.into_inner()) = listen_addrs.clone();
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    warn!(?reason, "a listener closed");
                    if swarm.listeners().next().is_none() {
                        break Err(ServeError::NoListeners(format!("{reason:?}")));
                    }
                }
                SwarmEvent::ListenerError { error, .. } => warn!(%error, "listener error"),
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                    connected.insert(peer_id, num_established.get());
                    metrics.connected_devices.set(connected.len() as i64);
                    let _span = info_span!("conn", peer = %peer_id, conn = %connection_id).entered();
                    info!(remote = %endpoint.get_remote_address(), "connected");
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                    if num_established == 0 {
                        connected.remove(&peer_id);
                    } else {
                        connected.insert(peer_id, num_established);
                    }
                    metrics.connected_devices.set(connected.len() as i64);
                    let _span = info_span!("conn", peer = %peer_id, conn = %connection_id).entered();
                    info!(cause = ?cause.map(|c| c.to_string()), "disconnected");
                }
                SwarmEvent::IncomingConnectionError { error, send_back_addr, .. } => {
                    if matches!(error, musubi_transport::libp2p::swarm::ListenError::Denied { .. }) {
                        warn!(remote = %send_back_addr, %error, "connection refused by a connection cap");
                    } else {
                        debug!(remote = %send_back_addr, %error, "incoming connection failed");
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => match event {
                    request_response::Event::Message { peer, connection_id, message } => match message {
                        Message::Request { request, channel, request_id } => {
                            let span = info_span!("conn", peer = %peer, conn = %connection_id);
                            let arrived = Instant::now();
                            if let Some(l) = limiter.as_mut()
                                && let Err(r) = l.admit(&peer, request.len(), arrived)
                            {
                                debug!(parent: &span, %request_id, limit = r.limit, "rate limited: refusing a request");
                                metrics.rate_limited.get_or_create(&LimitLabel { limit: r.limit }).inc();
                                metrics.refused("any", "rate-limited");
                                let wait_ms = r.retry_after.as_millis().max(1);
                                let slow = Response::error(ErrorCode::RateLimited, format!(
                                    "this device sent more {} than the relay allows one device; retry in {wait_ms} ms",
                                    r.limit
                                ));
                                let _ = swarm.behaviour_mut().sync.send_response(channel, protocol::encode_relay_response(&generation, &slow));
                                continue;
                            }
                            if pending.len() >= config.requests_queued_max
                                || queued_by.get(&peer).copied().unwrap_or(0) >= REQUESTS_QUEUED_PER_DEVICE_MAX
                            {
                                warn!(parent: &span, %request_id, "busy: refusing a request");
                                metrics.busy_refusals.inc();
                                metrics.refused("any", "busy");
                                let busy = Response::error(ErrorCode::Internal, "the relay is busy; retry in a moment");
                                let _ = swarm.behaviour_mut().sync.send_response(channel, protocol::encode_relay_response(&generation, &busy));
                                continue;
                            }
                            let id = next_id;
                            next_id += 1;
                            pending.insert(id, channel);
                            *queued_by.entry(peer).or_default() += 1;
                            metrics.queue_depth.set(pending.len() as i64);
                            if job_tx.send(Job::Request { id, peer: DeviceId(peer), frame: request, span, arrived }).is_err() {
                                break Err(ServeError::DatabaseThread);
                            }
                        }
                        Message::Response { .. } => {} // a facility's Ack to a notification
                    },
                    request_response::Event::OutboundFailure { peer, error, .. } => {
                        debug!(%peer, %error, "notification not delivered");
                    }
                    request_response::Event::InboundFailure { peer, error, request_id, .. } => {
                        debug!(%peer, %request_id, %error, "inbound request failed");
                    }
                    request_response::Event::ResponseSent { .. } => {}
                },
                _ => {}
            },
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    drop(job_tx);
    if worker.join().is_err() {
        error!("the database thread panicked");
    }
    let _ = admin_stop.send(());
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    info!("relay stopped");
    result
}

/// Re-reads the current devices into `gate` when the directory's version moved from `seen`;
/// returns the new version when it did.
fn refresh_known(relay: &Relay, gate: &FrameGate, seen: &mut Option<u64>) -> Option<u64> {
    let version = relay.store().directory_version().ok();
    if version.is_none() || version == *seen {
        return None;
    }
    match relay.store().current_devices() {
        Ok(devices) => {
            gate.set_known(devices.into_iter().map(|d| d.0));
            *seen = version;
            version
        }
        Err(e) => {
            error!(error = %e, "cannot read the current devices");
            None
        }
    }
}

/// Devices revoked since `revoked` was read (which is brought up to date).
fn newly_revoked(relay: &Relay, revoked: &mut HashSet<DeviceId>) -> Vec<DeviceId> {
    match relay.store().revoked_devices() {
        Ok(set) => {
            let new: Vec<DeviceId> = set.difference(revoked).copied().collect();
            *revoked = set;
            if !new.is_empty() {
                info!(devices = new.len(), "revocation noticed");
            }
            new
        }
        Err(e) => {
            error!(error = %e, "cannot read revocations");
            vec![]
        }
    }
}

fn db_thread(
    mut relay: Relay,
    gate: Arc<FrameGate>,
    jobs: std_mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Done>,
) {
    let mut data_version = relay.store().data_version().ok();
    let mut directory_version = None;
    refresh_known(&relay, &gate, &mut directory_version);
    let mut revoked: HashSet<DeviceId> = relay.store().revoked_devices().unwrap_or_default();
    while let Ok(job) = jobs.recv() {
        let out = match job {
            Job::Request {
                id,
                peer,
                frame,
                span,
                arrived,
            } => {
                let (frame, notes, observed) =
                    span.in_scope(|| relay.handle_observed(peer, &frame, SystemTime::now()));
                // An approval or enrolment: the new device's next frame (a push) is read in full. A
                // facility revoking its own device through its chain: that device is cut off.
                if let Some(v) = refresh_known(&relay, &gate, &mut directory_version) {
                    let _ = done.send(Done::Directory(v));
                    let new = newly_revoked(&relay, &mut revoked);
                    if !new.is_empty() {
                        let _ = done.send(Done::Revoked(new));
                    }
                }
                Some(Done::Response {
                    id,
                    peer: peer.0,
                    frame,
                    notes,
                    observed: Box::new(observed),
                    arrived,
                })
            }
            Job::ListenAddrs(addrs, announce) => {
                if let Err(e) = relay
                    .store_mut()
                    .set_listen_addrs(&addrs, SystemTime::now())
                {
                    error!(error = %e, "cannot record the listen addresses");
                }
                if let Some(addr) = announce {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "listening on {addr}");
                    let _ = out.flush();
                }
                None
            }
            Job::Watch => {
                // The directory changes by requests this thread handled too (approvals, enrolments):
                // its version is read each time, not only when another process committed.
                let directory = refresh_known(&relay, &gate, &mut directory_version);
                if let Some(v) = directory {
                    let _ = done.send(Done::Directory(v));
                }
                let now = relay.store().data_version();
                let changed = match (&now, data_version) {
                    (Ok(v), Some(old)) => *v != old,
                    _ => true,
                };
                data_version = now.ok();
                if changed || directory.is_some() {
                    let new = newly_revoked(&relay, &mut revoked);
                    if !new.is_empty() {
                        let _ = done.send(Done::Revoked(new));
                    }
                }
                Some(Done::Watched)
            }
        };
        if let Some(out) = out
            && done.send(out).is_err()
        {
            break;
        }
    }
}
