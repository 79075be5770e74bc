//! A raw `/musubi/sync/1` client: a libp2p swarm (`musubi_transport::build_swarm`) that sends frames the
//! tests choose, including malformed and hostile ones, and records the relay's notifications.
//!
//! Run loop: [`RawClient`] owns a one-worker tokio runtime; a task in it drives the swarm, sends the
//! requests it is handed over a channel, answers the relay's `Notify` requests with `Ack` and forwards them
//! (stamped with the time they arrived) to [`RawClient::next_notification`]. The API is blocking.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use musubi_crdt::bundle::{Envelope, Payload};
use musubi_crdt::crypto::{DeviceSecrets, DocumentKey};
use musubi_crdt::directory::{Directory, Pins};
use musubi_crdt::ids::{DeploymentId, DeviceId, DocumentId, DocumentKind, Epoch, FacilityId, Seq};
use musubi_crdt::invite::{InviteCode, JoinRequest};
use musubi_crdt::ops::{DocOp, DocOpBody, KeyGrant, Member};
use musubi_crdt::protocol::{
    ErrorCode, Pulled, PushItem, PushResult, Request, Response, decode_request, decode_response,
    encode_request, encode_response,
};
use musubi_transport::libp2p::request_response::{self, Message};
use musubi_transport::libp2p::swarm::SwarmEvent;
use musubi_transport::libp2p::{Multiaddr, PeerId, Swarm};
use musubi_transport::{Behaviour, BehaviourEvent, build_swarm};
use tokio::sync::{mpsc, oneshot};

use crate::Relay;

/// How long a raw request may wait for its answer.
pub const RAW_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Fresh device secrets from the OS random source.
pub fn random_secrets() -> DeviceSecrets {
    DeviceSecrets::from_seeds(rand::random(), rand::random())
}

/// A fresh random document key.
pub fn random_key() -> DocumentKey {
    DocumentKey::from_seed(rand::random())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A `Notify` the relay sent, with the instant it arrived.
#[derive(Clone, Debug)]
pub struct Notification {
    /// When the frame was decoded here.
    pub at: Instant,
    /// The document.
    pub doc: DocumentId,
    /// Its newest sequence number.
    pub head: Seq,
    /// Its epoch.
    pub epoch: Epoch,
}

type Reply = oneshot::Sender<Result<Vec<u8>, String>>;

/// A raw protocol client connected to one relay.
pub struct RawClient {
    rt: tokio::runtime::Runtime,
    tx: mpsc::UnboundedSender<(Vec<u8>, Reply)>,
    notes: std_mpsc::Receiver<Notification>,
    /// This device's secrets.
    pub secrets: DeviceSecrets,
    /// The relay's device id.
    pub relay: DeviceId,
    /// The facility this device joined as (after [`RawClient::join_with`]).
    pub facility: Option<FacilityId>,
    /// The deployment and authority of the invite it joined with (to verify directories).
    pub trust: Option<(DeploymentId, DeviceId)>,
}

impl RawClient {
    /// Connects to `addr` (a multiaddr ending in `/p2p/RELAY`) as the device `secrets`.
    pub fn connect(secrets: DeviceSecrets, addr: &str) -> Result<Self, String> {
        let addr: Multiaddr = addr
            .parse()
            .map_err(|e| format!("bad multiaddr {addr}: {e}"))?;
        let relay = match addr.iter().last() {
            Some(musubi_transport::libp2p::multiaddr::Protocol::P2p(p)) => p,
            _ => return Err(format!("{addr} does not end in /p2p/PEER")),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (notes_tx, notes) = std_mpsc::channel();
        let keypair = secrets.keypair().clone();
        let swarm = rt.block_on(async move {
            let mut swarm = build_swarm(
                keypair,
                musubi_transport::Node::Facility {
                    lan_discovery: false,
                },
            )
            .map_err(|e| e.to_string())?;
            swarm
                .dial(addr.clone())
                .map_err(|e| format!("dial {addr}: {e}"))?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
                    .await
                    .map_err(|_| format!("no connection to {addr} within 20 s"))?;
                match ev {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay => break,
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        return Err(format!("dial {addr}: {error}"));
                    }
                    _ => {}
                }
            }
            Ok::<_, String>(swarm)
        })?;
        rt.spawn(drive(swarm, relay, rx, notes_tx));
        Ok(Self {
            rt,
            tx,
            notes,
            secrets,
            relay: DeviceId(relay),
            facility: None,
            trust: None,
        })
    }

    /// A device with fresh keys that never enrolled, connected to `relay`.
    pub fn stranger(relay: &Relay) -> Self {
        Self::connect(random_secrets(), &relay.p2p_addr())
            .unwrap_or_else(|e| panic!("raw client cannot connect: {e}"))
    }

    /// A device with fresh keys enrolled through its own invite as a new facility `name` of `role`.
    pub fn enrol(relay: &Relay, name: &str, role: &str) -> Self {
        let code = relay.invite_facility(name, role);
        Self::join_with(&code)
    }

    /// A device with fresh keys that joins with the invite `code` (approved at once: the harness's
    /// relay runs with the authority; for a device invite, call [`RawClient::join_with_pending`]).
    pub fn join_with(code: &str) -> Self {
        Self::join_with_secrets(code, random_secrets())
    }

    /// [`RawClient::join_with`] as the device `secrets`.
    pub fn join_with_secrets(code: &str, secrets: DeviceSecrets) -> Self {
        let mut c = Self::join_request(code, secrets);
        match c.join_again(code) {
            Response::Joined { facility, .. } => c.facility = Some(facility),
            other => panic!("join with a fresh invite was refused: {other:?}"),
        }
        c
    }

    /// A raw device of `of`'s facility: `of` issues a device invite and syncs (registering it), the
    /// raw device asks to join, `of` syncs again (approving), and the join completes.
    pub fn join_device_of(of: &crate::Facility) -> Self {
        let code = of.device_invite();
        of.sync_once();
        let mut c = Self::join_request(&code, random_secrets());
        match c.join_again(&code) {
            Response::JoinPending { .. } => {}
            other => panic!("a device invite's join was answered {other:?}"),
        }
        of.sync_once();
        match c.join_again(&code) {
            Response::Joined { .. } => {}
            other => panic!("the approved join was answered {other:?}"),
        }
        c
    }

    /// Connects as `secrets` to the relay of the invite `code`, without joining yet.
    pub fn join_request(code: &str, secrets: DeviceSecrets) -> Self {
        let invite =
            InviteCode::decode(code).unwrap_or_else(|e| panic!("invite code does not decode: {e}"));
        let addr = invite
            .addrs
            .first()
            .unwrap_or_else(|| panic!("invite carries no address: {invite:?}"));
        let mut c = Self::connect(secrets, addr)
            .unwrap_or_else(|e| panic!("raw client cannot connect: {e}"));
        assert_eq!(
            c.relay, invite.relay,
            "the invite's address and relay id disagree"
        );
        c.trust = Some((invite.deployment, invite.authority));
        c
    }

    /// Sends (again) the join request for `code`; the relay's answer. On `Joined`, the facility
    /// is recorded.
    pub fn join_again(&mut self, code: &str) -> Response {
        let invite =
            InviteCode::decode(code).unwrap_or_else(|e| panic!("invite code does not decode: {e}"));
        let request = JoinRequest::make(&invite, &self.secrets, "raw client", now_ms());
        let r = self.request(&Request::Join {
            request: Box::new(request),
        });
        if let Response::Joined { facility, .. } = &r {
            self.facility = Some(*facility);
        }
        r
    }

    /// This device's id.
    pub fn device(&self) -> DeviceId {
        self.secrets.device_id()
    }

    /// The facility it joined as.
    pub fn facility(&self) -> FacilityId {
        self.facility.expect("this raw client has joined")
    }

    /// Sends raw frame bytes; the raw answer, or the transport's failure.
    pub fn request_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((bytes, reply))
            .map_err(|_| "the raw client's driver stopped".to_owned())?;
        self.rt.block_on(async {
            match tokio::time::timeout(RAW_REQUEST_TIMEOUT, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("the raw client's driver dropped the request".to_owned()),
                Err(_) => Err(format!("no answer within {RAW_REQUEST_TIMEOUT:?}")),
            }
        })
    }

    /// Sends every frame at once (they are in flight together) and waits for all answers, in order.
    pub fn request_pipelined(&self, frames: Vec<Vec<u8>>) -> Vec<Result<Vec<u8>, String>> {
        let mut waits = Vec::with_capacity(frames.len());
        for bytes in frames {
            let (reply, rx) = oneshot::channel();
            if self.tx.send((bytes, reply)).is_err() {
                waits.push(None);
            } else {
                waits.push(Some(rx));
            }
        }
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(waits.len());
            for w in waits {
                out.push(match w {
                    None => Err("the raw client's driver stopped".to_owned()),
                    Some(rx) => match tokio::time::timeout(RAW_REQUEST_TIMEOUT, rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err("the raw client's driver dropped the request".to_owned()),
                        Err(_) => Err(format!("no answer within {RAW_REQUEST_TIMEOUT:?}")),
                    },
                });
            }
            out
        })
    }

    /// Sends a request; its decoded answer, or a description of what went wrong.
    pub fn try_request(&self, req: &Request) -> Result<Response, String> {
        let bytes = self.request_bytes(encode_request(req))?;
        decode_response(&bytes).map_err(|e| format!("undecodable answer: {e}"))
    }

    /// Sends a request and returns the answer; panics on a transport failure.
    pub fn request(&self, req: &Request) -> Response {
        self.try_request(req)
            .unwrap_or_else(|e| panic!("raw request {} failed: {e}", describe(req)))
    }

    /// The relay's directory, verified against the relay's id and the authority of the invite.
    pub fn directory(&self) -> Directory {
        let (deployment, authority) = self.trust.expect("this raw client joined with an invite");
        match self.request(&Request::GetDirectory { known_version: 0 }) {
            Response::Directory {
                directory: Some(d), ..
            } => {
                d.verify(&self.relay, deployment, &authority, &Pins::default())
                    .expect("the directory verifies")
                    .0
            }
            other => panic!("GetDirectory: {other:?}"),
        }
    }

    /// Pushes items; one result per item.
    pub fn push(&self, items: Vec<PushItem>) -> Vec<PushResult> {
        let n = items.len();
        match self.request(&Request::Push { items }) {
            Response::Pushed { results } => {
                assert_eq!(results.len(), n, "one push result per item");
                results
            }
            other => panic!("Push: {other:?}"),
        }
    }

    /// Pushes items, expecting an error answer for the whole request or a rejection of each item.
    pub fn push_refused(&self, items: Vec<PushItem>) -> (ErrorCode, String) {
        match self.request(&Request::Push { items }) {
            Response::Pushed { results } => match results.as_slice() {
                [PushResult::Rejected { code, message }, ..] => (*code, message.clone()),
                other => panic!("the relay accepted what it should refuse: {other:?}"),
            },
            Response::Error { code, message } => (code, message),
            other => panic!("Push: unexpected answer {other:?}"),
        }
    }

    /// Creates a document owned by this device's facility with further `members`, and grants the epoch-0
    /// key to this device and every current device of the members (from the directory).
    pub fn create_document(
        &self,
        kind: DocumentKind,
        members: &[Member],
    ) -> (DocumentId, DocumentKey) {
        let key = random_key();
        let me = self.facility();
        let op = DocOp::create(
            &self.secrets,
            me,
            now_ms(),
            DocOpBody::Create {
                kind,
                members: members.to_vec(),
                key_commitment: key.commitment(),
                nonce: rand::random(),
            },
        )
        .expect("sign create");
        let doc = op.doc;
        let dir = self.directory();
        let mut recipients = vec![(self.device(), self.secrets.public().age_recipient)];
        for m in members {
            let f = dir
                .facility(m.facility)
                .unwrap_or_else(|| panic!("member {} is not in the directory", m.facility));
            recipients.extend(
                f.current_devices()
                    .map(|d| (d.device, d.age_recipient.clone())),
            );
        }
        let grant = KeyGrant::seal(&self.secrets, me, doc, Epoch(0), &key, &recipients)
            .expect("seal grant");
        let results = self.push(vec![PushItem::Op { op }, PushItem::Grant { grant }]);
        for r in &results {
            assert!(
                matches!(
                    r,
                    PushResult::Accepted { .. } | PushResult::Duplicate { .. }
                ),
                "creating a document was refused: {results:?}"
            );
        }
        (doc, key)
    }

    /// A bundle of `payload` for `doc` in epoch 0, sealed and signed by this device.
    pub fn seal(&self, doc: DocumentId, key: &DocumentKey, payload: &Payload) -> Envelope {
        Envelope::seal(&self.secrets, self.facility(), doc, Epoch(0), key, payload)
            .expect("seal bundle")
    }

    /// Every bundle of `doc` after `after`, following the relay's pages.
    pub fn pull_all(
        &self,
        doc: DocumentId,
        after: Seq,
    ) -> Result<Vec<Pulled>, (ErrorCode, String)> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            match self.request(&Request::Pull { doc, after: cursor }) {
                Response::Bundles { items, head, .. } => {
                    let Some(last) = items.last().map(|p| p.seq) else {
                        return Ok(out);
                    };
                    cursor = last;
                    out.extend(items);
                    if cursor >= head {
                        return Ok(out);
                    }
                }
                Response::Error { code, message } => return Err((code, message)),
                other => panic!("Pull: unexpected answer {other:?}"),
            }
        }
    }

    /// The next notification, waiting at most `timeout`.
    pub fn next_notification(&self, timeout: Duration) -> Option<Notification> {
        self.notes.recv_timeout(timeout).ok()
    }

    /// Drops every notification received so far.
    pub fn drain_notifications(&self) {
        while self.notes.try_recv().is_ok() {}
    }
}

fn describe(req: &Request) -> &'static str {
    req.kind()
}

async fn drive(
    mut swarm: Swarm<Behaviour>,
    relay: PeerId,
    mut rx: mpsc::UnboundedReceiver<(Vec<u8>, Reply)>,
    notes: std_mpsc::Sender<Notification>,
) {
    let mut pending: HashMap<request_response::OutboundRequestId, Reply> = HashMap::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some((bytes, reply)) => {
                    let id = swarm.behaviour_mut().sync.send_request(&relay, bytes);
                    pending.insert(id, reply);
                }
            },
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message { message, .. })) => match message {
                    Message::Response { request_id, response } => {
                        if let Some(r) = pending.remove(&request_id) {
                            let _ = r.send(Ok(response));
                        }
                    }
                    Message::Request { request, channel, .. } => {
                        let at = Instant::now();
                        if let Ok(Request::Notify { doc, head, epoch }) = decode_request(&request) {
                            let _ = notes.send(Notification { at, doc, head, epoch });
                        }
                        let _ = swarm.behaviour_mut().sync.send_response(channel, encode_response(&Response::Ack));
                    }
                },
                SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::OutboundFailure { request_id, error, .. })) => {
                    if let Some(r) = pending.remove(&request_id) {
                        let _ = r.send(Err(format!("transport failure: {error}")));
                    }
                }
                _ => {}
            },
        }
    }
}
