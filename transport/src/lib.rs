//! musubi-transport: the libp2p side of `/musubi/sync/1`, shared by the relay and the facilities.
//!
//! Transports are QUIC (rustls inside) and TCP + Noise + Yamux; behaviours are identify, ping,
//! optional mDNS (LAN discovery at facilities), request-response carrying opaque frames (at most
//! `STREAMS_PER_CONNECTION_MAX` streams per connection), and connection limits in all, in the
//! handshake and per peer ([`Node::connection_limits`]). At the relay, a [`FrameGate`] reads frames
//! in full only from known peers (current enrolled devices); anyone else's are small and few.
//! Frames are encoded and decoded by `musubi_crdt::protocol`; this crate only moves bounded bytes,
//! so a malformed frame reaches the protocol layer, which answers it with a clear error.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::prelude::*;
use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, connection_limits, identify,
    identity::Keypair, mdns, noise, ping, request_response, tcp, yamux,
};
use musubi_crdt::limits::{
    CONNECTIONS_PENDING_INCOMING_MAX, CONNECTIONS_PER_PEER_MAX, FACILITY_CONNECTIONS_INCOMING_MAX,
    FRAME_BYTES_MAX, RELAY_CONNECTIONS_INCOMING_MAX, STREAMS_PER_CONNECTION_MAX,
    UNKNOWN_PEER_FRAME_BYTES_MAX, UNKNOWN_PEER_FRAME_READ_SECS, UNKNOWN_PEER_FRAMES_IN_FLIGHT_MAX,
    UNKNOWN_PEER_FRAMES_PER_CONNECTION_MAX,
};
use musubi_crdt::protocol::PROTOCOL_NAME;

pub use libp2p;

pub mod address_limit;
pub use address_limit::{AddressLimit, AddressLimits, Refused};

/// How long a request may wait for its response on the wire, in seconds.
pub const REQUEST_TIMEOUT_SECS: u64 = 60;
/// How long an idle connection is kept open, in seconds (notifications need it open).
pub const IDLE_CONNECTION_TIMEOUT_SECS: u64 = 24 * 3600;

/// Which peers' frames a node reads in full.
///
/// At the relay, a known peer (a current device of an enrolled facility, as the relay's database
/// says: [`FrameGate::set_known`]) sends frames of up to [`FRAME_BYTES_MAX`]. Any other key (it
/// costs nothing to make one) may only join, so its frames are read up to
/// [`UNKNOWN_PEER_FRAME_BYTES_MAX`], within [`UNKNOWN_PEER_FRAME_READ_SECS`], at most
/// [`UNKNOWN_PEER_FRAMES_PER_CONNECTION_MAX`] at once on a connection and
/// [`UNKNOWN_PEER_FRAMES_IN_FLIGHT_MAX`] across all: past that, a stranger's stream is closed
/// before a byte is read. Strangers' frames being read thus hold at most 256 × 16 KiB of the
/// relay's memory, however many connections they open; a flood of them can delay joins, never a
/// known device.
#[derive(Debug, Default)]
pub struct FrameGate {
    known: RwLock<HashSet<PeerId>>,
    /// The peer of the connection being established (set by [`PeerMark`] just before the
    /// request-response behaviour makes that connection's handler and clones its codec).
    establishing: Mutex<Option<PeerId>>,
    unknown_in_flight: AtomicUsize,
}

impl FrameGate {
    /// Replaces the set of known peers (the relay calls this whenever its directory changes).
    pub fn set_known(&self, peers: impl IntoIterator<Item = PeerId>) {
        let set: HashSet<PeerId> = peers.into_iter().collect();
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = set;
    }

    /// Whether `peer` is known (its frames are read in full).
    pub fn is_known(&self, peer: &PeerId) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// Frames of unknown peers being read now.
    pub fn unknown_in_flight(&self) -> usize {
        self.unknown_in_flight.load(Ordering::Relaxed)
    }

    /// The largest frame to read from `peer` on a connection whose unknown frames `on_connection`
    /// counts and, for an unknown peer, its place among the frames read at once. Errors: too many
    /// unknown peers' frames are being read already, on this connection or in all.
    fn admit(
        self: &Arc<Self>,
        peer: Option<PeerId>,
        on_connection: &Arc<AtomicUsize>,
    ) -> io::Result<(usize, Option<InFlight>)> {
        if peer.is_some_and(|p| self.is_known(&p)) {
            return Ok((FRAME_BYTES_MAX, None));
        }
        let in_all = self.unknown_in_flight.fetch_add(1, Ordering::AcqRel);
        let here = on_connection.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            gate: self.clone(),
            connection: on_connection.clone(),
        };
        if in_all >= UNKNOWN_PEER_FRAMES_IN_FLIGHT_MAX
            || here >= UNKNOWN_PEER_FRAMES_PER_CONNECTION_MAX
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "too many frames from peers that are not enrolled; retry later",
            ));
        }
        Ok((UNKNOWN_PEER_FRAME_BYTES_MAX, Some(guard)))
    }
}

/// One unknown peer's frame being read (its places are given back when dropped).
struct InFlight {
    gate: Arc<FrameGate>,
    connection: Arc<AtomicUsize>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gate.unknown_in_flight.fetch_sub(1, Ordering::AcqRel);
        self.connection.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Moves one frame per stream direction: the whole stream's bytes, at most [`FRAME_BYTES_MAX`]
/// (with a [`FrameGate`], less from peers it does not know).
///
/// request-response clones the codec once per connection, when the connection is established,
/// and then once per stream from that copy. Only the behaviour's own codec (`root`) takes the peer
/// [`PeerMark`] recorded for the connection being established; the connection's copy keeps it
/// (and its count of unknown frames) for every stream, so each stream knows whose bytes it reads.
/// A copy that never learnt its peer treats it as unknown.
#[derive(Debug)]
pub struct FrameCodec {
    gate: Option<Arc<FrameGate>>,
    root: bool,
    peer: Option<PeerId>,
    unknown_on_connection: Arc<AtomicUsize>,
}

impl Default for FrameCodec {
    /// A codec without a gate (every peer's frames read in full), as facilities use.
    fn default() -> Self {
        Self::new(None)
    }
}

impl Clone for FrameCodec {
    fn clone(&self) -> Self {
        if !self.root {
            return Self {
                gate: self.gate.clone(),
                root: false,
                peer: self.peer,
                unknown_on_connection: self.unknown_on_connection.clone(),
            };
        }
        let peer = self.gate.as_ref().and_then(|g| {
            g.establishing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        });
        Self {
            gate: self.gate.clone(),
            root: false,
            peer,
            unknown_on_connection: Arc::default(),
        }
    }
}

impl FrameCodec {
    /// The behaviour's codec, gated by `gate` when given.
    fn new(gate: Option<Arc<FrameGate>>) -> Self {
        Self {
            gate,
            root: true,
            peer: None,
            unknown_on_connection: Arc::default(),
        }
    }

    /// The largest frame this stream may read, and the in-flight place it holds while reading.
    fn admit(&self) -> io::Result<(usize, Option<InFlight>)> {
        match &self.gate {
            None => Ok((FRAME_BYTES_MAX, None)),
            Some(gate) => gate.admit(self.peer, &self.unknown_on_connection),
        }
    }
}

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    admitted: io::Result<(usize, Option<InFlight>)>,
) -> io::Result<Vec<u8>> {
    let (max, in_flight) = admitted?;
    let mut buf = Vec::new();
    let mut limited = io.take(max as u64 + 1);
    let read = limited.read_to_end(&mut buf);
    if in_flight.is_some() {
        // An unknown peer's frame: whole within the deadline, or its place is given back.
        let deadline = futures_timer::Delay::new(Duration::from_secs(UNKNOWN_PEER_FRAME_READ_SECS));
        match future::select(read, deadline).await {
            future::Either::Left((read, _)) => {
                read?;
            }
            future::Either::Right(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("frame not received within {UNKNOWN_PEER_FRAME_READ_SECS} s"),
                ));
            }
        }
    } else {
        read.await?;
    }
    drop(in_flight);
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame over the limit of {max} bytes"),
        ));
    }
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, frame: Vec<u8>) -> io::Result<()> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes over the limit of {FRAME_BYTES_MAX}",
                frame.len()
            ),
        ));
    }
    io.write_all(&frame).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.admit())
    }

    fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.admit())
    }

    fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> impl Future<Output = io::Result<()>> + Send
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, req)
    }

    fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> impl Future<Output = io::Result<()>> + Send
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, res)
    }
}

/// Records the peer of each connection being established for the [`FrameGate`] (no protocol of
/// its own). It comes just before the request-response behaviour in [`Behaviour`], whose codec
/// copy for the connection takes the peer from the gate.
pub struct PeerMark {
    gate: Option<Arc<FrameGate>>,
}

impl PeerMark {
    fn mark(&self, peer: PeerId) {
        if let Some(gate) = &self.gate {
            let mut slot = gate.establishing.lock().unwrap_or_else(|e| e.into_inner());
            debug_assert!(
                slot.is_none(),
                "the request-response behaviour took no peer for the last connection"
            );
            *slot = Some(peer);
        }
    }
}

impl NetworkBehaviour for PeerMark {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.mark(peer);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.mark(peer);
        Ok(dummy::ConnectionHandler)
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        e: THandlerOutEvent<Self>,
    ) {
        match e {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}
}

pub use behaviour::{Behaviour, BehaviourEvent};

mod behaviour {
    #![allow(missing_docs)] // the derive macro generates an undocumented event enum
    use super::*;

    /// The network behaviour of a Musubi node (relay or facility).
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// At the relay: connection caps by source address and in all, handshakes included
        /// ([`super::AddressLimit`]); it denies a pending connection before any other behaviour
        /// sees it.
        pub address: Toggle<super::AddressLimit>,
        /// Connection limits: in all, in the handshake, and per peer ([`super::Node`]). First, so a
        /// connection it denies never reaches the other behaviours (request-response panics when a
        /// connection it registered is denied after it).
        pub limits: connection_limits::Behaviour,
        /// On a facility that listens on the LAN: the peers it may connect with (its relay and the
        /// current devices of its verified directory, kept up to date by the driver). Anyone else
        /// is refused when the connection is established, before a stream is opened.
        pub allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
        /// Tells the [`super::FrameGate`] whose connection is being set up. Just before `sync`.
        pub mark: super::PeerMark,
        /// `/musubi/sync/1` request-response.
        pub sync: request_response::Behaviour<FrameCodec>,
        /// Identify (`/musubi/id/1`): lets peers learn each other's listen addresses.
        pub identify: identify::Behaviour,
        /// Ping: keeps connections alive and measures round trips.
        pub ping: ping::Behaviour,
        /// mDNS discovery on the LAN (facilities only).
        pub mdns: Toggle<mdns::tokio::Behaviour>,
    }
}

impl Behaviour {
    /// The relay's frame gate (`None` at a facility, which reads full frames from the peers its
    /// allow list lets connect).
    pub fn frame_gate(&self) -> Option<Arc<FrameGate>> {
        self.mark.gate.clone()
    }
}

/// Errors building the swarm.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TCP/Noise/Yamux stack could not be set up.
    #[error("cannot set up the transport: {0}")]
    Setup(String),
}

/// What a swarm is for, which sets its connection limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// The relay: up to [`RELAY_CONNECTIONS_INCOMING_MAX`] devices; frames read in full only from
    /// the peers its [`FrameGate`] knows ([`Behaviour::frame_gate`]).
    Relay,
    /// A facility device (or a client): up to [`FACILITY_CONNECTIONS_INCOMING_MAX`] LAN peers;
    /// `lan_discovery` turns mDNS on (facilities on a shelter LAN find each other with it).
    Facility {
        /// mDNS on.
        lan_discovery: bool,
    },
}

impl Node {
    /// The connection limits of this kind of node (`limits.rs`): a peer, known or not, gets at
    /// most [`CONNECTIONS_PER_PEER_MAX`] connections, and at most
    /// [`CONNECTIONS_PENDING_INCOMING_MAX`] handshakes run at once.
    fn connection_limits(self) -> connection_limits::ConnectionLimits {
        let incoming = match self {
            Node::Relay => RELAY_CONNECTIONS_INCOMING_MAX,
            Node::Facility { .. } => FACILITY_CONNECTIONS_INCOMING_MAX,
        };
        connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(CONNECTIONS_PENDING_INCOMING_MAX))
            .with_max_established_incoming(Some(incoming))
            .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX))
    }
}

/// Builds a tokio swarm with QUIC and TCP+Noise+Yamux, authenticated as `keypair`, with the
/// connection limits of `node` and at most [`STREAMS_PER_CONNECTION_MAX`] streams per connection.
pub fn build_swarm(keypair: Keypair, node: Node) -> Result<Swarm<Behaviour>, TransportError> {
    build_swarm_with(keypair, node, None)
}

/// [`build_swarm`], with connection caps by source address and in all (the relay's
/// `--connections-per-address`, `--connections-max`).
pub fn build_swarm_with(
    keypair: Keypair,
    node: Node,
    address: Option<AddressLimit>,
) -> Result<Swarm<Behaviour>, TransportError> {
    let lan_discovery = matches!(
        node,
        Node::Facility {
            lan_discovery: true
        }
    );
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| TransportError::Setup(e.to_string()))?
        .with_quic()
        // `/dns4/NAME/...` addresses (a relay's `--advertise`) are resolved at every dial, with
        // the system's resolver configuration and /etc/hosts.
        .with_dns()
        .map_err(|e| TransportError::Setup(e.to_string()))?
        .with_behaviour(|key| {
            let gate = (node == Node::Relay).then(|| Arc::new(FrameGate::default()));
            let sync = request_response::Behaviour::with_codec(
                FrameCodec::new(gate.clone()),
                [(
                    StreamProtocol::new(PROTOCOL_NAME),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS))
                    .with_max_concurrent_streams(STREAMS_PER_CONNECTION_MAX),
            );
            let identify = identify::Behaviour::new(identify::Config::new(
                "/musubi/id/1".into(),
                key.public(),
            ));
            let ping =
                ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15)));
            let mdns = if lan_discovery {
                mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id()).ok()
            } else {
                None
            };
            Behaviour {
                address: Toggle::from(address),
                limits: connection_limits::Behaviour::new(node.connection_limits()),
                allowed: Toggle::from(lan_discovery.then(allow_block_list::Behaviour::default)),
                mark: PeerMark { gate },
                sync,
                identify,
                ping,
                mdns: Toggle::from(mdns),
            }
        })
        .map_err(|e| TransportError::Setup(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(IDLE_CONNECTION_TIMEOUT_SECS))
        })
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::time::Instant;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    /// A stream that never delivers a byte (a stranger that opens a stream and waits).
    struct Silent;

    impl AsyncRead for Silent {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    /// The connection copy of a gated codec for `peer`, as request-response makes it.
    fn connection_codec(root: &FrameCodec, peer: PeerId) -> FrameCodec {
        PeerMark {
            gate: root.gate.clone(),
        }
        .mark(peer);
        root.clone()
    }

    #[test]
    fn strangers_get_small_frames_two_per_connection_and_few_in_all() {
        let gate = Arc::new(FrameGate::default());
        let root = FrameCodec::new(Some(gate.clone()));
        let (member, stranger) = (peer(), peer());
        gate.set_known([member]);

        let m = connection_codec(&root, member);
        let held: Vec<_> = (0..STREAMS_PER_CONNECTION_MAX)
            .map(|_| m.clone().admit().expect("a member's frames are admitted"))
            .collect();
        assert!(
            held.iter()
                .all(|(max, slot)| *max == FRAME_BYTES_MAX && slot.is_none())
        );

        let s = connection_codec(&root, stranger);
        let first = s.clone().admit().expect("first");
        let second = s.clone().admit().expect("second");
        assert_eq!(first.0, UNKNOWN_PEER_FRAME_BYTES_MAX);
        assert!(
            s.clone().admit().is_err(),
            "a third frame on one connection is refused"
        );
        drop(first);
        let third = s
            .clone()
            .admit()
            .expect("a place given back is taken again");
        assert_eq!(gate.unknown_in_flight(), 2);
        drop((second, third));
        assert_eq!(gate.unknown_in_flight(), 0, "every place is given back");

        // Across connections (new keys cost nothing), the total is capped.
        let mut all = Vec::new();
        while let Ok(slot) = connection_codec(&root, peer()).admit() {
            all.push(slot);
            assert!(
                all.len() <= UNKNOWN_PEER_FRAMES_IN_FLIGHT_MAX,
                "no cap in all"
            );
        }
        assert_eq!(all.len(), UNKNOWN_PEER_FRAMES_IN_FLIGHT_MAX);
        assert!(
            m.clone().admit().is_ok(),
            "a member is read whatever strangers hold"
        );
        drop(all);
        assert_eq!(gate.unknown_in_flight(), 0);

        // A connection whose peer was never marked is a stranger's, and a member's connection
        // copy keeps its peer for every stream whatever is marked later.
        let unmarked = root.clone();
        assert_eq!(
            unmarked.admit().expect("admitted").0,
            UNKNOWN_PEER_FRAME_BYTES_MAX
        );
        let _ = connection_codec(&root, stranger);
        assert_eq!(m.clone().admit().expect("admitted").0, FRAME_BYTES_MAX);
    }

    #[test]
    fn a_strangers_silent_stream_gives_its_place_back_by_the_deadline() {
        let gate = Arc::new(FrameGate::default());
        let codec = connection_codec(&FrameCodec::new(Some(gate.clone())), peer());
        let began = Instant::now();
        let err = futures::executor::block_on(read_frame(&mut Silent, codec.admit()))
            .expect_err("a silent stream is not a frame");
        let took = began.elapsed();
        eprintln!("silent stream closed after {took:?}");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(took >= Duration::from_secs(UNKNOWN_PEER_FRAME_READ_SECS));
        assert_eq!(gate.unknown_in_flight(), 0);
    }
}
