//! An in-process deployment with a simulated network: the real relay handler over its real SQLite
//! store, facility devices as real [`Engine`]s in temporary directories, and message queues instead
//! of sockets.
//!
//! Each device runs the real sync driver's pieces (`net::start_session`, `feed_outbox`,
//! `apply_event`) over a sans-IO [`Session`] on a simulated clock (a fixed `Instant` plus an
//! offset; nothing sleeps). Requests and answers are encoded frames in flight; the relay answers
//! through [`Relay::handle`]. LAN peers exchange with [`lan::offer`], [`Lan::answer`] and
//! [`Lan::take_exchange`]; files move with [`transfer::export`] and [`transfer::import`].
//!
//! Faults: a device's link to the relay goes down (its frames in flight are lost, its session is
//! told), a frame is lost on a live link (the session times it out), LAN links go down, the relay
//! crashes (its handler and store are dropped with every frame in flight) and restarts from its
//! data directory. The caller (a seeded test) chooses the faults; [`Sim::heal`] then brings
//! everything up and runs until nothing moves, and [`Sim::check`] says whether every replica holds
//! the same Automerge heads and the relay each bundle once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::ChangeHash;
use musubi_crdt::documents::careplan::Sheet1;
use musubi_crdt::documents::shelter::{MedicalNote, Method, NewEvacuee, Presence, StayKind};
use musubi_crdt::ids::{DeviceId, DocumentId, DocumentKind, FacilityId, FacilityRole, Role};
use musubi_crdt::invite::JoinRequest;
use musubi_crdt::protocol::{self, PushResult, Request, Response};
use musubi_crdt::sync::{RequestId, Session};
use musubi_facility::engine::{Engine, EngineError, Enrolment};
use musubi_facility::lan::{self, Lan};
use musubi_facility::net::{self, SyncReport};
use musubi_facility::services::{self, careplan, referral, shelter};
use musubi_facility::transfer;
use musubi_sync_node::authority::{AuthorityDir, AuthorityInvite};
use musubi_sync_node::{Relay, Store};
use rand::{Rng, RngExt};

use crate::relay::stored_bundles;

/// The scrypt work factor of simulated devices (the lowest the core accepts).
pub const SIM_SCRYPT_LOG_N: u8 = musubi_crdt::crypto::PASSPHRASE_LOG_N_MIN;

/// The passphrase of every simulated device.
pub const SIM_PASSPHRASE: &str = "simulated device passphrase";

/// Steps [`Sim::heal`] may take before it gives up (a livelock is a failure, not a hang).
pub const HEAL_STEPS_MAX: usize = 3_000;

/// One device to create: its directory name, its facility, and the facility's role.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    /// The device's name (its directory in the simulation's temporary directory).
    pub device: String,
    /// The facility's name; a second device of an earlier facility repeats the name.
    pub facility: String,
    /// The facility's role.
    pub role: FacilityRole,
}

impl DeviceSpec {
    /// A device `device` of the facility `facility` with `role`.
    pub fn new(device: &str, facility: &str, role: FacilityRole) -> Self {
        Self {
            device: device.to_owned(),
            facility: facility.to_owned(),
            role,
        }
    }
}

/// One simulated facility device: its engine, its sync session and its link to the relay.
pub struct Node {
    /// The device's name.
    pub name: String,
    /// Its facility's role.
    pub role: FacilityRole,
    /// The engine over its data directory.
    pub engine: Engine,
    /// The session with the relay (a new one per connection, as the real driver makes per run).
    pub session: Session,
    last_outbox: u64,
    /// What the session did so far.
    pub report: SyncReport,
    /// Whether its link to the relay is up.
    pub link_up: bool,
    connected: bool,
    /// Revoked by the operator (its link stays down; the checks leave it out).
    pub revoked: bool,
}

impl Node {
    /// This device's id.
    pub fn device(&self) -> DeviceId {
        self.engine.device_id()
    }

    /// This device's facility.
    pub fn facility(&self) -> FacilityId {
        self.engine
            .enrolment()
            .expect("simulated devices are enrolled at creation")
            .facility
    }
}

enum Frame {
    Request {
        from: usize,
        id: RequestId,
        bytes: Vec<u8>,
    },
    Response {
        to: usize,
        id: RequestId,
        bytes: Vec<u8>,
    },
    Notify {
        to: usize,
        bytes: Vec<u8>,
    },
}

impl Frame {
    fn node(&self) -> usize {
        match self {
            Frame::Request { from, .. } => *from,
            Frame::Response { to, .. } | Frame::Notify { to, .. } => *to,
        }
    }
}

/// Counters of what happened, for the test's summary line.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Frames delivered.
    pub delivered: u64,
    /// Frames lost (link cut, relay crash, random loss).
    pub lost: u64,
    /// Relay crashes.
    pub crashes: u64,
    /// LAN exchanges (one document each).
    pub lan_exchanges: u64,
    /// Files carried.
    pub files: u64,
    /// Edits made through the services.
    pub edits: u64,
    /// Edits refused by the services (for example a check-out of someone already out).
    pub edits_refused: u64,
}

/// A LAN segment between two devices.
#[derive(Clone, Copy, Debug)]
pub struct LanLink {
    /// One device.
    pub a: usize,
    /// The other.
    pub b: usize,
    /// Whether it is up.
    pub up: bool,
}

/// The simulated deployment.
pub struct Sim {
    dir: tempfile::TempDir,
    relay: Option<Relay>,
    relay_device: DeviceId,
    /// The devices, in the order of their specs.
    pub nodes: Vec<Node>,
    /// LAN segments.
    pub lan: Vec<LanLink>,
    flight: Vec<Frame>,
    base: Instant,
    base_sys: SystemTime,
    elapsed: Duration,
    /// What happened.
    pub stats: Stats,
    files: u64,
    last_list: Duration,
}

/// Where simulations keep their files: `MUSUBI_SIM_DIR`, else `/dev/shm` when it exists (memory:
/// the simulation tests sync logic, not disks, and SQLite's fsyncs would dominate its time), else
/// the system's temporary directory.
pub fn scratch_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MUSUBI_SIM_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

fn io<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

impl Sim {
    /// A relay and the devices of `specs`, each enrolled (`Join` through the relay's handler, the
    /// answer recorded with `record_enrolment`, as `net::join` does), every device's link up.
    pub fn new(specs: &[DeviceSpec]) -> Sim {
        Sim::new_in(&scratch_dir(), specs)
    }

    /// [`Sim::new`] with the temporary directory made in `parent`.
    pub fn new_in(parent: &Path, specs: &[DeviceSpec]) -> Sim {
        let dir = io(
            "a temporary directory",
            tempfile::Builder::new()
                .prefix("musubi-sim-")
                .tempdir_in(parent),
        );
        // A fixed wall clock for the relay: 2027-01-15T08:00:00Z plus the simulated time.
        let base_sys = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let authority_dir = io(
            "initialise the authority",
            AuthorityDir::init(
                &dir.path().join("authority"),
                "simulated deployment",
                SIM_PASSPHRASE,
                SIM_SCRYPT_LOG_N,
            ),
        );
        let authority = io(
            "unlock the authority",
            AuthorityDir::open(&dir.path().join("authority"))
                .and_then(|a| a.unlock(SIM_PASSPHRASE)),
        );
        let relay_dir = dir.path().join("relay");
        let store = io(
            "initialise the relay",
            Store::init(&relay_dir, authority_dir.public(), None, base_sys),
        );
        let mut relay = io(
            "open the relay handler",
            Relay::with_authority(store, Some(authority)),
        );
        let relay_device = relay.secrets().device_id();
        let mut nodes: Vec<Node> = Vec::new();
        // Per facility: the index of its first device.
        let mut facilities: BTreeMap<String, usize> = BTreeMap::new();
        // Enrolment runs on the wall clock (invites expire by it); the simulation's own clock
        // starts after it.
        let handle = |relay: &mut Relay, engine: &Engine, request: &Request| -> Response {
            let (bytes, _) = relay.handle(
                engine.device_id(),
                &protocol::encode_request(request),
                SystemTime::now(),
            );
            io(
                "the relay's answer decodes",
                protocol::decode_response(&bytes),
            )
        };
        // Pushes what `engine` queued (an invite registration, an approval) and acknowledges it.
        let push_outbox = |relay: &mut Relay, engine: &mut Engine| {
            let rows = io("read the outbox", engine.store().pending(0));
            let items = rows.iter().map(|r| r.item.clone()).collect();
            let Response::Pushed { results } = handle(relay, engine, &Request::Push { items })
            else {
                panic!("the relay did not answer the push");
            };
            for (row, r) in rows.iter().zip(results) {
                assert!(
                    matches!(
                        r,
                        PushResult::Accepted { .. } | PushResult::Duplicate { .. }
                    ),
                    "{r:?}"
                );
                io("acknowledge", engine.store_mut().acknowledge(row.id, None));
            }
        };
        for (i, spec) in specs.iter().enumerate() {
            let mut engine = io(
                "initialise a device",
                Engine::init(
                    &dir.path().join(&spec.device),
                    &spec.device,
                    SIM_PASSPHRASE,
                    SIM_SCRYPT_LOG_N,
                ),
            );
            let code = match facilities.get(&spec.facility) {
                Some(first) => {
                    let first = &mut nodes[*first].engine;
                    let code = io(
                        "a device invite",
                        first.device_invite(Duration::from_secs(3600)),
                    );
                    push_outbox(&mut relay, first);
                    code
                }
                None => {
                    let mut secret = [0u8; 32];
                    secret[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                    secret[8..16].copy_from_slice(&rand::random::<[u8; 8]>());
                    let code = io(
                        "issue an invite",
                        relay.store_mut().issue_facility_invite(
                            secret,
                            &spec.facility,
                            spec.role,
                            SystemTime::now(),
                            Duration::from_secs(3600),
                        ),
                    );
                    io(
                        "the authority keeps the invite",
                        authority_dir.record_invite(&AuthorityInvite {
                            secret,
                            name: spec.facility.clone(),
                            role: spec.role,
                            expires_at_ms: code.expires_at_ms,
                        }),
                    );
                    code
                }
            };
            let request = JoinRequest::make(&code, engine.secrets(), &spec.device, 1);
            let join = Request::Join {
                request: Box::new(request),
            };
            let mut answer = handle(&mut relay, &engine, &join);
            if let (Response::JoinPending { .. }, Some(first)) =
                (&answer, facilities.get(&spec.facility))
            {
                // The facility's first device approves at its next sync.
                let first = &mut nodes[*first].engine;
                let Response::JoinRequests { requests } =
                    handle(&mut relay, first, &Request::GetJoinRequests)
                else {
                    panic!("no join requests for {}", spec.device);
                };
                io("approve", first.approve_joins(&requests));
                push_outbox(&mut relay, first);
                // As after an acknowledged approval: the approver takes the directory with the new
                // device, so its next approval follows the new link.
                if let Response::Directory {
                    directory: Some(d), ..
                } = handle(
                    &mut relay,
                    first,
                    &Request::GetDirectory { known_version: 0 },
                ) {
                    io("take the directory", first.update_directory(&d));
                }
                answer = handle(&mut relay, &engine, &join);
            }
            let Response::Joined {
                deployment,
                facility,
                facility_name,
                role,
                directory,
                sealed_pseudonym,
            } = answer
            else {
                panic!("{} could not join: {answer:?}", spec.device);
            };
            let enrolment = Enrolment {
                deployment,
                facility,
                facility_name,
                role,
                relay: relay_device,
                relay_addrs: vec![],
                authority: code.authority,
            };
            io(
                "record the enrolment",
                engine.record_enrolment(&enrolment, &directory, &sealed_pseudonym),
            );
            facilities.entry(spec.facility.clone()).or_insert(i);
            let (session, last_outbox) = io("start a session", net::start_session(&mut engine));
            nodes.push(Node {
                name: spec.device.clone(),
                role: spec.role,
                engine,
                session,
                last_outbox,
                report: SyncReport::default(),
                link_up: false,
                connected: false,
                revoked: false,
            });
        }
        let mut sim = Sim {
            dir,
            relay: Some(relay),
            relay_device,
            nodes,
            lan: Vec::new(),
            flight: Vec::new(),
            base: Instant::now(),
            base_sys,
            elapsed: Duration::ZERO,
            stats: Stats::default(),
            files: 0,
            last_list: Duration::ZERO,
        };
        for i in 0..sim.nodes.len() {
            sim.set_link(i, true);
        }
        sim
    }

    /// The simulation's temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The relay's data directory.
    pub fn relay_dir(&self) -> PathBuf {
        self.dir.path().join("relay")
    }

    /// The relay's device id.
    pub fn relay_device(&self) -> DeviceId {
        self.relay_device
    }

    /// Whether the relay is running.
    pub fn relay_up(&self) -> bool {
        self.relay.is_some()
    }

    /// The simulated monotonic clock.
    pub fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    /// The simulated wall clock (2027-01-15T08:00:00Z plus the simulated time).
    pub fn wall(&self) -> SystemTime {
        self.base_sys + self.elapsed
    }

    /// The simulated wall clock as RFC 3339 (for event times written through the services).
    pub fn wall_rfc3339(&self) -> String {
        let ms = self
            .wall()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis();
        shelter::ms_to_rfc3339(ms as i64)
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Frames in flight.
    pub fn in_flight(&self) -> usize {
        self.flight.len()
    }

    /// Lets `d` pass: sessions whose timers are due are told.
    pub fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        let now = self.now();
        for n in &mut self.nodes {
            if n.session.poll_timeout().is_some_and(|t| t <= now) {
                n.session.handle_timeout(now);
            }
        }
        if self.elapsed - self.last_list >= net::RELIST_INTERVAL {
            self.relist();
        }
    }

    /// What the driver does every [`net::RELIST_INTERVAL`]: connected sessions ask for the
    /// document list again (recovering notifications lost on a live connection).
    pub fn relist(&mut self) {
        self.last_list = self.elapsed;
        for n in &mut self.nodes {
            if n.connected {
                n.session.want_documents();
                n.session.want_directory();
            }
        }
    }

    /// A number that changes whenever a device stores, pulls or pushes something.
    fn progress(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                n.report.pulled
                    + n.report.pushed
                    + n.engine.store().pending_count().unwrap_or(0)
                    + n.engine.store().all_bundles().map_or(0, |b| b.len() as u64)
                    + n.engine
                        .store()
                        .documents(None)
                        .map_or(0, |d| d.len() as u64)
            })
            .sum()
    }

    /// Brings device `i`'s link to the relay up or down. Going down loses its frames in flight and
    /// tells its session; coming up (with the relay running) tells its session it is connected.
    pub fn set_link(&mut self, i: usize, up: bool) {
        let up = up && !self.nodes[i].revoked;
        self.nodes[i].link_up = up;
        if up {
            self.connect(i);
        } else {
            self.disconnect(i);
        }
    }

    fn connect(&mut self, i: usize) {
        let now = self.now();
        let n = &mut self.nodes[i];
        if n.link_up && !n.connected && self.relay.is_some() {
            n.connected = true;
            n.session.handle_connected(now);
        }
    }

    fn disconnect(&mut self, i: usize) {
        let now = self.now();
        let n = &mut self.nodes[i];
        if n.connected {
            n.connected = false;
            n.session.handle_disconnected(now);
        }
        let before = self.flight.len();
        self.flight.retain(|f| f.node() != i);
        self.stats.lost += (before - self.flight.len()) as u64;
    }

    /// The relay process dies: its handler and store are dropped, every connection and every frame
    /// in flight with it (answers it computed but had not sent are lost).
    pub fn crash_relay(&mut self) {
        if self.relay.take().is_none() {
            return;
        }
        self.stats.crashes += 1;
        for i in 0..self.nodes.len() {
            self.disconnect(i);
        }
        self.stats.lost += self.flight.len() as u64;
        self.flight.clear();
    }

    /// The relay starts again from its data directory; devices whose links are up reconnect.
    pub fn restart_relay(&mut self) {
        if self.relay.is_some() {
            return;
        }
        let store = io("reopen the relay's store", Store::open(&self.relay_dir()));
        self.relay = Some(io("reopen the relay handler", Relay::new(store)));
        for i in 0..self.nodes.len() {
            self.connect(i);
        }
    }

    /// The operator revokes device `i` (`musubi-node revoke`): its link goes down for good and the
    /// relay refuses it. Returns the device's key epochs per document at that moment.
    pub fn revoke(&mut self, i: usize) -> BTreeMap<DocumentId, musubi_crdt::ids::Epoch> {
        let device = self.nodes[i].device().to_string();
        let wall = self.wall();
        if self.relay.is_none() {
            self.restart_relay();
        }
        io(
            "revoke the device",
            self.relay
                .as_mut()
                .expect("running")
                .store_mut()
                .revoke(&device, wall),
        );
        self.set_link(i, false);
        self.nodes[i].revoked = true;
        // As the server's database watch does: every connected device hears of the new directory.
        let version = io(
            "directory version",
            self.relay
                .as_ref()
                .expect("running")
                .store()
                .directory_version(),
        );
        for n in self.nodes.iter_mut().filter(|n| n.connected) {
            n.session.handle_notify_directory(version);
        }
        io("key epochs", self.nodes[i].engine.key_epochs())
            .into_iter()
            .collect()
    }

    /// Runs device `i`'s driver until it has nothing more to do now: sends what its session wants
    /// to send, applies its session's events to its engine, and queues new outbox rows.
    pub fn pump(&mut self, i: usize) {
        if self.nodes[i].revoked {
            return;
        }
        let now = self.now();
        loop {
            let n = &mut self.nodes[i];
            while let Some(t) = n.session.poll_transmit(now) {
                self.flight.push(Frame::Request {
                    from: i,
                    id: t.id,
                    bytes: protocol::encode_request(&t.request),
                });
            }
            let mut busy = false;
            while let Some(ev) = n.session.poll_event() {
                busy = true;
                if let Err(e) = net::apply_event(&mut n.engine, &mut n.session, ev, &mut n.report) {
                    panic!("{}: applying a session event failed: {e}", n.name);
                }
            }
            if io(
                "read the outbox",
                net::feed_outbox(&n.engine, &mut n.session, &mut n.last_outbox),
            ) {
                busy = true;
            }
            if !busy {
                break;
            }
        }
    }

    /// [`Sim::pump`] for every device.
    pub fn pump_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.pump(i);
        }
    }

    /// Delivers the frame in flight at index `k` (the relay answers a request at once; the answer
    /// and the notifications it causes are new frames in flight).
    pub fn deliver(&mut self, k: usize) {
        let frame = self.flight.swap_remove(k);
        self.stats.delivered += 1;
        let now = self.now();
        let wall = self.wall();
        match frame {
            Frame::Request { from, id, bytes } => {
                let relay = self
                    .relay
                    .as_mut()
                    .expect("frames to a crashed relay are dropped at the crash");
                let (answer, notes) = relay.handle(self.nodes[from].device(), &bytes, wall);
                self.flight.push(Frame::Response {
                    to: from,
                    id,
                    bytes: answer,
                });
                for note in notes {
                    if let Some(to) = self
                        .nodes
                        .iter()
                        .position(|n| n.device() == note.to && n.connected)
                    {
                        self.flight.push(Frame::Notify {
                            to,
                            bytes: protocol::encode_request(&note.request),
                        });
                    }
                }
            }
            Frame::Response { to, id, bytes } => {
                let n = &mut self.nodes[to];
                match protocol::decode_response(&bytes) {
                    Ok(r) => n.session.handle_response(id, r, now),
                    Err(_) => n.session.handle_failure(id, now),
                }
            }
            Frame::Notify { to, bytes } => {
                if let Ok(Request::Notify { doc, head, epoch }) = protocol::decode_request(&bytes) {
                    self.nodes[to].session.handle_notify(doc, head, epoch, now);
                }
            }
        }
    }

    /// Delivers a random frame in flight, if any; returns whether one was.
    pub fn deliver_random(&mut self, rng: &mut impl Rng) -> bool {
        if self.flight.is_empty() {
            return false;
        }
        let k = rng.random_range(0..self.flight.len());
        self.deliver(k);
        true
    }

    /// Loses a random frame in flight on a live link (the session notices by its request timeout).
    pub fn lose_random(&mut self, rng: &mut impl Rng) {
        if !self.flight.is_empty() {
            let k = rng.random_range(0..self.flight.len());
            self.flight.swap_remove(k);
            self.stats.lost += 1;
        }
    }

    /// Adds a LAN segment between devices `a` and `b` (up); returns its index.
    pub fn add_lan(&mut self, a: usize, b: usize) -> usize {
        self.lan.push(LanLink { a, b, up: true });
        self.lan.len() - 1
    }

    /// One LAN round on segment `l` (when up): `a` offers every document it shares with `b`'s
    /// facility, `b` answers, `a` takes the answer and delivers what `b` wants; then the other way.
    /// With `cut_before_deliver`, the link breaks after the answers (the deliveries are lost).
    pub fn lan_round(&mut self, l: usize, cut_before_deliver: bool) {
        let LanLink { a, b, up } = self.lan[l];
        if !up {
            return;
        }
        self.lan_offer(a, b, cut_before_deliver);
        self.lan_offer(b, a, cut_before_deliver);
    }

    fn lan_offer(&mut self, a: usize, b: usize, cut_before_deliver: bool) {
        let (pa, pb) = (self.nodes[a].device().0, self.nodes[b].device().0);
        let docs = io(
            "shared documents",
            lan::shared_docs(&self.nodes[a].engine, self.nodes[b].facility()),
        );
        for doc in docs {
            self.stats.lan_exchanges += 1;
            let offer = io("build an offer", lan::offer(&self.nodes[a].engine, doc));
            let offer = io(
                "decode an offer",
                protocol::decode_request(&protocol::encode_request(&offer)),
            );
            let (answer, touched) = io(
                "answer an offer",
                Lan::answer(&mut self.nodes[b].engine, &pa, offer),
            );
            self.after_sync(b, &touched);
            let answer = io(
                "decode an exchange",
                protocol::decode_response(&protocol::encode_response(&answer)),
            );
            let deliver = io(
                "take an exchange",
                Lan::take_exchange(&mut self.nodes[a].engine, &pb, doc, answer),
            );
            self.after_sync(a, &[doc]);
            if let Some(deliver) = deliver
                && !cut_before_deliver
            {
                let deliver = io(
                    "decode a delivery",
                    protocol::decode_request(&protocol::encode_request(&deliver)),
                );
                let (_, touched) = io(
                    "take a delivery",
                    Lan::answer(&mut self.nodes[b].engine, &pa, deliver),
                );
                self.after_sync(b, &touched);
            }
        }
    }

    fn after_sync(&mut self, i: usize, docs: &[DocumentId]) {
        let e = &mut self.nodes[i].engine;
        for doc in docs {
            if let Err(err) = services::after_sync(e, *doc) {
                panic!("{}: after_sync of {doc}: {err}", self.nodes[i].name);
            }
        }
        // A new epoch or member can need grants (what the driver does after a change).
        io("key upkeep", e.maintain());
    }

    /// Carries a file from device `a` to device `b`: `b` writes its have-list, `a` exports what `b`
    /// lacks, `b` imports it. Returns the file's size in bytes.
    pub fn carry_file(&mut self, a: usize, b: usize) -> u64 {
        self.files += 1;
        self.stats.files += 1;
        let path = self
            .dir
            .path()
            .join(format!("transfer-{}.musubi", self.files));
        let have = io(
            "write a have-list",
            transfer::have_list(&self.nodes[b].engine),
        );
        let report = io(
            "export a file",
            transfer::export(&self.nodes[a].engine, &[], Some(&have), &path),
        );
        let imported = io(
            "import a file",
            transfer::import(&mut self.nodes[b].engine, &path),
        );
        assert!(
            imported.refused.is_empty(),
            "{} refused items of a file from {}: {:?}",
            self.nodes[b].name,
            self.nodes[a].name,
            imported.refused
        );
        let docs: Vec<DocumentId> = io(
            "list documents",
            self.nodes[b].engine.store().documents(None),
        )
        .into_iter()
        .map(|d| d.info.id)
        .collect();
        self.after_sync(b, &docs);
        let _ = std::fs::remove_file(&path);
        report.bytes
    }

    /// Whether nothing moves: no frame in flight, every connected session caught up with an empty
    /// outbox and nothing pending in any store.
    pub fn quiescent(&self) -> bool {
        self.flight.is_empty()
            && self.nodes.iter().filter(|n| !n.revoked).all(|n| {
                n.session.is_caught_up()
                    && n.session.pending_pushes() == 0
                    && n.engine.store().pending_count().unwrap_or(1) == 0
            })
    }

    /// Heals every fault (relay up, every link and LAN segment up) and runs until nothing moves:
    /// frames are delivered in random order, LAN rounds run, and when nothing is in flight the clock
    /// jumps to the next timer. Panics (naming the state) after [`HEAL_STEPS_MAX`] steps.
    pub fn heal(&mut self, rng: &mut impl Rng) {
        self.restart_relay();
        for i in 0..self.nodes.len() {
            self.set_link(i, true);
        }
        for l in &mut self.lan {
            l.up = true;
        }
        for l in 0..self.lan.len() {
            self.lan_round(l, false);
        }
        let mut listed_at: Option<u64> = None;
        for step in 0..HEAL_STEPS_MAX {
            self.pump_all();
            if self.deliver_random(rng) {
                self.advance(Duration::from_millis(rng.random_range(0..20)));
                continue;
            }
            if self.quiescent() {
                // A LAN round must change nothing either.
                let before = self.pending_total();
                for l in 0..self.lan.len() {
                    self.lan_round(l, false);
                }
                self.pump_all();
                if self.pending_total() != before || !self.quiescent() {
                    continue;
                }
                // Nor may the driver's periodic document list: settled when a whole list round
                // brought nothing.
                let progress = self.progress();
                if listed_at == Some(progress) {
                    return;
                }
                listed_at = Some(progress);
                self.advance(net::RELIST_INTERVAL);
                self.relist();
                continue;
            }
            let next = self
                .nodes
                .iter()
                .filter_map(|n| n.session.poll_timeout())
                .min();
            match next {
                Some(t) if t > self.now() => self.advance(t - self.now()),
                _ => self.advance(Duration::from_millis(250)),
            }
            if step + 1 == HEAL_STEPS_MAX {
                break;
            }
        }
        let mut stuck: BTreeSet<DocumentId> = BTreeSet::new();
        for n in self.nodes.iter().filter(|n| !n.revoked) {
            for r in n.engine.store().pending(0).unwrap_or_default() {
                stuck.extend(r.item.doc());
            }
        }
        let docs: String = stuck.iter().map(|d| self.describe_doc(*d)).collect();
        panic!("the deployment did not settle:\n{}{docs}", self.describe());
    }

    fn pending_total(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.engine.store().pending_count().unwrap_or(0))
            .sum()
    }

    /// A line per device: link, session state, pending items.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "relay {}, {} frame(s) in flight, t={:?}\n",
            if self.relay.is_some() { "up" } else { "down" },
            self.flight.len(),
            self.elapsed
        );
        for n in &self.nodes {
            s.push_str(&format!(
                "  {}: link {}, connected {}, caught up {}, session pending {}, store pending {}, rejected {:?}\n",
                n.name,
                n.link_up,
                n.connected,
                n.session.is_caught_up(),
                n.session.pending_pushes(),
                n.engine.store().pending_count().unwrap_or(0),
                n.engine.store().rejected().unwrap_or_default(),
            ));
            if let Ok(mut st) = n
                .engine
                .store()
                .conn()
                .prepare("SELECT id, doc, state, error, item FROM outbox ORDER BY id")
            {
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Vec<u8>>(4)?,
                        ))
                    })
                    .and_then(|r| r.collect::<Result<Vec<_>, _>>())
                    .unwrap_or_default();
                for (id, doc, state, error, item) in rows {
                    let item: Option<musubi_crdt::protocol::PushItem> =
                        ciborium::from_reader(item.as_slice()).ok();
                    let what = match item {
                        Some(musubi_crdt::protocol::PushItem::Op { op }) => {
                            format!("op {:?}", op.body)
                        }
                        Some(musubi_crdt::protocol::PushItem::Grant { grant }) => {
                            format!("grant epoch {}", grant.epoch)
                        }
                        Some(musubi_crdt::protocol::PushItem::Bundle { envelope }) => {
                            format!("bundle epoch {}", envelope.epoch)
                        }
                        Some(other) => format!("{:?}", std::mem::discriminant(&other)),
                        None => "?".into(),
                    };
                    s.push_str(&format!(
                        "    outbox {id} {doc:?} {state} {what} {}\n",
                        error.unwrap_or_default()
                    ));
                }
            }
        }
        s
    }

    /// Every bundle a device holds with a relay sequence number (acknowledged or pulled) is stored
    /// at the relay under that document and number: the relay never loses what it acknowledged.
    pub fn check_relay_kept(&self) -> Result<(), String> {
        let db = self.relay_db();
        let stored: BTreeSet<(String, i64, String)> = stored_bundles(&db)
            .into_iter()
            .map(|b| (b.doc, b.seq, b.id))
            .collect();
        for n in &self.nodes {
            for b in io("list bundles", n.engine.store().all_bundles()) {
                if let Some(seq) = b.seq {
                    let key = (b.doc.to_string(), seq.0 as i64, b.id.to_string());
                    if !stored.contains(&key) {
                        return Err(format!(
                            "{} holds bundle {} of {} as relay seq {}, but the relay does not",
                            n.name, b.id, b.doc, seq.0
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A document's membership chain and key grants at the relay, and each device's view of it:
    /// what a failing seed prints.
    pub fn describe_doc(&self, doc: DocumentId) -> String {
        let db = self.relay_db();
        let name = |d: &DeviceId| {
            self.nodes
                .iter()
                .find(|n| n.device() == *d)
                .map_or_else(|| d.to_string(), |n| n.name.clone())
        };
        let mut out = format!("document {doc} at the relay:\n");
        let mut st = io(
            "select ops",
            db.prepare("SELECT idx, encoded FROM ops WHERE doc = ?1 ORDER BY idx"),
        );
        let ops: Vec<(i64, Vec<u8>)> = io(
            "read ops",
            st.query_map([doc.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|r| r.collect::<Result<Vec<_>, _>>()),
        );
        for (i, b) in ops {
            let op: musubi_crdt::ops::DocOp = io("an op", ciborium::from_reader(b.as_slice()));
            out.push_str(&format!(
                "  op {i} by {}: {:?}\n",
                name(&op.author),
                op.body
            ));
        }
        let mut st = io(
            "select grants",
            db.prepare("SELECT encoded FROM grants WHERE doc = ?1 ORDER BY rowid"),
        );
        let grants: Vec<Vec<u8>> = io(
            "read grants",
            st.query_map([doc.to_string()], |r| r.get(0))
                .and_then(|r| r.collect::<Result<Vec<_>, _>>()),
        );
        let mut st = io(
            "select bundles",
            db.prepare(
                "SELECT seq, bundle_id, epoch, author FROM bundles WHERE doc = ?1 ORDER BY seq",
            ),
        );
        let rows: Vec<(i64, Vec<u8>, i64, String)> = io(
            "read bundles",
            st.query_map([doc.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .and_then(|r| r.collect::<Result<Vec<_>, _>>()),
        );
        out.push_str("  bundles:");
        for (seq, id, epoch, author) in rows {
            let author: DeviceId = io("a device id", author.parse());
            out.push_str(&format!(
                " {}@{seq}:e{epoch}:{}",
                &hex::encode(id)[..6],
                name(&author)
            ));
        }
        out.push('\n');
        for b in grants {
            let g: musubi_crdt::ops::KeyGrant = io("a grant", ciborium::from_reader(b.as_slice()));
            out.push_str(&format!(
                "  grant epoch {} by {} to {:?}\n",
                g.epoch,
                name(&g.author),
                g.recipients.iter().map(name).collect::<Vec<_>>()
            ));
        }
        for n in &self.nodes {
            let row = n.engine.store().document(doc).ok().flatten();
            let keys: Vec<_> = n
                .engine
                .keys(doc)
                .map(|k| k.keys().copied().collect())
                .unwrap_or_default();
            let bundles: Vec<String> = n
                .engine
                .store()
                .bundles(doc)
                .unwrap_or_default()
                .iter()
                .map(|b| {
                    format!(
                        "{}@{}:e{}:{}",
                        &b.id.to_string()[..6],
                        b.seq.map_or("-".into(), |s| s.0.to_string()),
                        b.envelope.epoch,
                        name(&b.envelope.author)
                    )
                })
                .collect();
            let chain: Vec<String> = n
                .engine
                .store()
                .chain(doc)
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    let what = match &c.op.body {
                        musubi_crdt::ops::DocOpBody::Create { .. } => "create".to_owned(),
                        musubi_crdt::ops::DocOpBody::SetMember { .. } => "set-member".to_owned(),
                        musubi_crdt::ops::DocOpBody::Exclude { .. } => "exclude".to_owned(),
                        musubi_crdt::ops::DocOpBody::NewEpoch { epoch, .. } => {
                            format!("epoch{epoch}")
                        }
                    };
                    format!(
                        "{}:{what}:{}{}",
                        c.idx,
                        name(&c.op.author),
                        if c.confirmed { "" } else { "?" }
                    )
                })
                .collect();
            let aside = n
                .engine
                .store()
                .provisional_ops(doc)
                .map(|v| v.len())
                .unwrap_or(0);
            let cursor = n
                .engine
                .store()
                .cursors()
                .unwrap_or_default()
                .into_iter()
                .find(|(d, _)| *d == doc)
                .map(|(_, s)| s.0);
            let warning: Option<String> = n
                .engine
                .store()
                .meta_cbor(&format!("doc_warning:{doc}"))
                .ok()
                .flatten();
            out.push_str(&format!(
                "    chain [{}], aside {aside}, cursor {cursor:?}, warning {warning:?}\n",
                chain.join(" ")
            ));
            out.push_str(&format!(
                "  {}{}: epoch {:?}, ops {:?} (relay confirmed {:?}), keys {keys:?}, pending {}\n    bundles {}\n",
                n.name,
                if n.revoked { " (revoked)" } else { "" },
                row.as_ref().map(|r| r.info.epoch),
                row.as_ref().map(|r| r.info.ops),
                row.as_ref().map(|r| r.relay_ops),
                n.engine.store().pending_for(doc).unwrap_or(0),
                bundles.join(" "),
            ));
        }
        out
    }

    /// The relay's database, opened read-only.
    pub fn relay_db(&self) -> rusqlite::Connection {
        io(
            "open node.db",
            rusqlite::Connection::open_with_flags(
                self.relay_dir().join("node.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            ),
        )
    }

    /// The Automerge heads of `doc` at device `i` (sorted), or why they cannot be read.
    pub fn heads(&self, i: usize, doc: DocumentId) -> Result<Vec<ChangeHash>, EngineError> {
        let loaded = self.nodes[i].engine.load(doc)?;
        if loaded.unreadable > 0 {
            return Err(EngineError::NoKey(doc));
        }
        let mut h = loaded.heads;
        h.sort();
        Ok(h)
    }

    /// After [`Sim::heal`]: every device of every member facility of every document the relay knows
    /// holds it with the same Automerge heads; the relay holds each bundle once, and every bundle any
    /// device holds. Returns the number of documents checked.
    pub fn check(&self) -> Result<usize, String> {
        let db = self.relay_db();
        let (n, distinct): (i64, i64) = io(
            "count the relay's bundles",
            db.query_row(
                "SELECT COUNT(*), COUNT(DISTINCT bundle_id) FROM bundles",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            ),
        );
        if n != distinct {
            return Err(format!(
                "the relay holds {n} bundle rows but {distinct} distinct bundles"
            ));
        }
        let at_relay: BTreeSet<String> = stored_bundles(&db).into_iter().map(|b| b.id).collect();
        self.check_relay_kept()?;
        let mut docs: BTreeMap<DocumentId, Vec<usize>> = BTreeMap::new();
        let mut st = io(
            "query documents",
            db.prepare("SELECT d.id, m.facility FROM documents d JOIN members m ON m.doc = d.id"),
        );
        let rows: Vec<(String, String)> = io(
            "read documents",
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|r| r.collect::<Result<Vec<_>, _>>()),
        );
        for (doc, facility) in rows {
            let doc: DocumentId = io("a document id", doc.parse());
            let members = docs.entry(doc).or_default();
            for (i, node) in self.nodes.iter().enumerate() {
                if !node.revoked && node.facility().to_string() == facility {
                    members.push(i);
                }
            }
        }
        for (doc, members) in &docs {
            let mut first: Option<(usize, Vec<ChangeHash>)> = None;
            for &i in members {
                let heads = self.heads(i, *doc).map_err(|e| {
                    format!(
                        "{} cannot read {doc}: {e}\n{}",
                        self.nodes[i].name,
                        self.describe_doc(*doc)
                    )
                })?;
                match &first {
                    None => first = Some((i, heads)),
                    Some((j, h)) if *h != heads => {
                        return Err(format!(
                            "{doc}: {} has heads {h:?}, {} has {heads:?}\n{}",
                            self.nodes[*j].name,
                            self.nodes[i].name,
                            self.describe_doc(*doc)
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        for n in self.nodes.iter().filter(|n| !n.revoked) {
            for b in io("list bundles", n.engine.store().all_bundles()) {
                if !at_relay.contains(&b.id.to_string()) {
                    return Err(format!(
                        "{} holds bundle {} of {} that never reached the relay",
                        n.name, b.id, b.doc
                    ));
                }
            }
        }
        Ok(docs.len())
    }

    /// The documents device `i` can read, of `kind`.
    pub fn readable(&self, i: usize, kind: DocumentKind) -> Vec<DocumentId> {
        let e = &self.nodes[i].engine;
        io("list documents", e.store().documents(Some(kind)))
            .into_iter()
            .filter(|d| {
                io("read keys", e.keys(d.info.id))
                    .keys()
                    .next_back()
                    .copied()
                    >= Some(d.info.epoch)
                    && d.info
                        .members
                        .iter()
                        .any(|m| m.facility == self.nodes[i].facility() && m.role.can_write())
            })
            .map(|d| d.info.id)
            .collect()
    }
}

/// The four facilities of the fault test: a community centre with two reception laptops (devices
/// 0 and 1, on one LAN segment), a clinic (2), a care-management office (3) and the disaster HQ (4).
pub fn outage_specs() -> Vec<DeviceSpec> {
    vec![
        DeviceSpec::new("centre-laptop-1", "中央公民館", FacilityRole::Shelter),
        DeviceSpec::new("centre-laptop-2", "中央公民館", FacilityRole::Shelter),
        DeviceSpec::new("clinic", "港診療所", FacilityRole::Clinic),
        DeviceSpec::new(
            "care-office",
            "みなと居宅介護支援事業所",
            FacilityRole::CareOffice,
        ),
        DeviceSpec::new("hq", "災害対策本部", FacilityRole::Hq),
    ]
}

/// The documents of the fault test, one of every kind, made by their owners.
#[derive(Clone, Copy, Debug)]
pub struct Docs {
    /// The shelter roster (owner: the centre; HQ writes).
    pub shelter: DocumentId,
    /// Its medical notes (the centre and HQ as its health section).
    pub medical: DocumentId,
    /// A referral letter from the clinic to the care office.
    pub referral: DocumentId,
    /// A care plan of the care office, shared with the clinic as a writer.
    pub careplan: DocumentId,
}

/// Brings every device's directory up to date (relay reachable, nothing else moving), so documents
/// made next have every device of every member facility as a key recipient.
pub fn settle_directory(sim: &mut Sim, rng: &mut impl Rng) {
    sim.heal(rng);
}

/// Makes the documents of [`outage_specs`] at their owners (queued, not yet synced).
pub fn make_documents(sim: &mut Sim) -> Docs {
    let at = sim.wall_rfc3339();
    let opened = io(
        "open the shelter",
        shelter::open(
            &mut sim.nodes[0].engine,
            &shelter::OpenShelter {
                name: "中央公民館".into(),
                code: "CC0000000001".into(),
                address: "港町1-1".into(),
                capacity: 200,
                health_sections: vec!["災害対策本部".into()],
                at: Some(at),
            },
        ),
    );
    let fhir = io(
        "read the real eReferral bundle",
        std::fs::read_to_string(crate::referral_bundle_path()),
    );
    let referral = io(
        "import the referral",
        referral::import_fhir(&mut sim.nodes[2].engine, "みなと居宅介護支援事業所", &fhir),
    );
    let mut sheet1 = Sheet1::default();
    sheet1.resident.name = "山田 花子".into();
    sheet1.policy = "自宅での生活を続ける".into();
    let careplan = io(
        "create the care plan",
        careplan::create(
            &mut sim.nodes[3].engine,
            &sheet1,
            Some(("港診療所", Role::Writer)),
        ),
    );
    Docs {
        shelter: opened.shelter,
        medical: opened.medical,
        referral,
        careplan,
    }
}

/// People who come to the shelter (few, so both desks often meet the same person).
const PEOPLE: &[(&str, &str)] = &[
    ("佐藤 一郎", "1950-01-02"),
    ("鈴木 花子", "1962-03-04"),
    ("高橋 健", "1988-05-06"),
    ("田中 美咲", "2001-07-08"),
    ("伊藤 翔", "2015-09-10"),
    ("渡辺 和子", "1939-11-12"),
];

/// One random edit at device `i` through the services, on a document of [`Docs`] it can write now;
/// returns what it did (`None` when it could not: no key yet, or the service refused).
pub fn random_edit(sim: &mut Sim, i: usize, docs: &Docs, rng: &mut impl Rng) -> Option<String> {
    let at = sim.wall_rfc3339();
    let role = sim.nodes[i].role;
    let shelter_ok = sim
        .readable(i, DocumentKind::Shelter)
        .contains(&docs.shelter);
    let medical_ok = sim
        .readable(i, DocumentKind::ShelterMedical)
        .contains(&docs.medical);
    let referral_ok = sim
        .readable(i, DocumentKind::Referral)
        .contains(&docs.referral);
    let plan_ok = sim
        .readable(i, DocumentKind::CarePlan)
        .contains(&docs.careplan);
    let word = rng.random_range(0..1000u32);
    let e = &mut sim.nodes[i].engine;
    let id = docs.shelter.to_string();
    let note = |medications: bool| MedicalNote {
        evacuee: format!("evacuee-{}", word % 4),
        conditions: if medications {
            String::new()
        } else {
            format!("高血圧 {word}")
        },
        medications: if medications {
            format!("降圧薬 {word}")
        } else {
            String::new()
        },
        ..MedicalNote::default()
    };
    let result: Result<String, EngineError> = match (role, rng.random_range(0..10)) {
        (FacilityRole::Shelter, 0..5) if shelter_ok => {
            let (name, birth) = PEOPLE[rng.random_range(0..PEOPLE.len())];
            let person = NewEvacuee {
                name: name.into(),
                birth_date: birth.into(),
                ..NewEvacuee::default()
            };
            let req = shelter::CheckIn {
                person,
                method: Method::Manual,
                at: Some(at),
            };
            shelter::checkin(e, &id, &req).map(|o| format!("check in {name} ({})", o.evacuee))
        }
        (FacilityRole::Shelter, 5..8) if shelter_ok => shelter::roster(e, &id).and_then(|r| {
            let present: Vec<_> = r
                .evacuees
                .iter()
                .filter(|v| v.presence != Presence::Out)
                .collect();
            if present.is_empty() {
                return Ok("nobody to check out".into());
            }
            let v = present[rng.random_range(0..present.len())];
            let kind = match (v.presence, rng.random_range(0..3)) {
                (Presence::OnLeave, 0) => StayKind::Return,
                (Presence::Present, 0) => StayKind::Leave,
                _ => StayKind::CheckOut,
            };
            shelter::stay(e, &id, &v.evacuee.id, kind, Method::Manual, Some(at))
                .map(|_| format!("{} {}", kind.as_str(), v.evacuee.name))
        }),
        (FacilityRole::Shelter, 8) if shelter_ok => {
            shelter::add_need(e, &id, &format!("毛布が足りない {word}"))
                .map(|n| format!("need {n}"))
        }
        (FacilityRole::Shelter, _) if shelter_ok && medical_ok => {
            shelter::medical_note(e, &id, &note(false)).map(|_| "medical note".into())
        }
        (FacilityRole::Hq, 0..5) if shelter_ok && medical_ok => {
            shelter::medical_note(e, &id, &note(true)).map(|_| "HQ medical note".into())
        }
        (FacilityRole::Hq, _) if shelter_ok => {
            shelter::add_need(e, &id, &format!("給水車 {word}")).map(|n| format!("HQ need {n}"))
        }
        (FacilityRole::Clinic, 0..5) if referral_ok => {
            let text = format!("備考 {word}");
            referral::edit(e, &docs.referral.to_string(), "remarks", &text)
                .map(|_| "referral remarks".into())
        }
        (FacilityRole::Clinic, _) if plan_ok => {
            let text = format!("血圧安定 {word}");
            careplan::comment(e, &docs.careplan.to_string(), None, &text, "医師")
                .map(|c| format!("care plan comment {c}"))
        }
        (FacilityRole::CareOffice, 0..3) if referral_ok => {
            let text = format!("返書 {word}");
            referral::reply(e, &docs.referral.to_string(), &text).map(|_| "referral reply".into())
        }
        (FacilityRole::CareOffice, 3..6) if plan_ok => {
            let text = format!("自宅での生活を続ける {word}");
            careplan::edit(e, &docs.careplan.to_string(), "policy", &text)
                .map(|_| "care plan policy".into())
        }
        (FacilityRole::CareOffice, _) if plan_ok => {
            let input = careplan::LogInput {
                date: "2027-01-15".into(),
                category: "訪問".into(),
                text: format!("訪問 {word}"),
                ..careplan::LogInput::default()
            };
            careplan::log(e, &docs.careplan.to_string(), &input, "ケアマネ")
                .map(|l| format!("care plan log {l}"))
        }
        _ => return None,
    };
    match result {
        Ok(what) => {
            sim.stats.edits += 1;
            Some(what)
        }
        Err(EngineError::Document(_)) => {
            sim.stats.edits_refused += 1;
            None
        }
        Err(e) => panic!("{}: an edit failed: {e}", sim.nodes[i].name),
    }
}
