//! musubi-transport: the libp2p side of `/musubi/sync/1`, shared by the relay and the facilities.
//!
//! Transports are QUIC (rustls inside) and TCP + Noise + Yamux; behaviours are identify, ping,
//! optional mDNS (LAN discovery at facilities), request-response carrying opaque frames (at most
//! `STREAMS_PER_CONNECTION_MAX` streams per connection), and connection limits in all, in the
//! handshake and per peer ([`Node::connection_limits`]).
//! Frames are encoded and decoded by `musubi_crdt::protocol`; this crate only moves bounded bytes,
//! so a malformed frame reaches the protocol layer, which answers it with a clear error.

use std::io;
use std::time::Duration;

use futures::prelude::*;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, allow_block_list, connection_limits, identify, identity::Keypair, mdns,
    noise, ping, request_response, tcp, yamux,
};
use musubi_crdt::limits::{
    CONNECTIONS_PENDING_INCOMING_MAX, CONNECTIONS_PER_PEER_MAX, FACILITY_CONNECTIONS_INCOMING_MAX,
    FRAME_BYTES_MAX, RELAY_CONNECTIONS_INCOMING_MAX, STREAMS_PER_CONNECTION_MAX,
};
use musubi_crdt::protocol::PROTOCOL_NAME;

pub use libp2p;

/// How long a request may wait for its response on the wire, in seconds.
pub const REQUEST_TIMEOUT_SECS: u64 = 60;
/// How long an idle connection is kept open, in seconds (notifications need it open).
pub const IDLE_CONNECTION_TIMEOUT_SECS: u64 = 24 * 3600;

/// Moves one frame per stream direction: the whole stream's bytes, at most [`FRAME_BYTES_MAX`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(FRAME_BYTES_MAX as u64 + 1)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame over the limit of {FRAME_BYTES_MAX} bytes"),
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
        read_frame(io)
    }

    fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io)
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

pub use behaviour::{Behaviour, BehaviourEvent};

mod behaviour {
    #![allow(missing_docs)] // the derive macro generates an undocumented event enum
    use super::*;

    /// The network behaviour of a Musubi node (relay or facility).
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// Connection limits: in all, in the handshake, and per peer ([`super::Node`]). First, so a
        /// connection it denies never reaches the other behaviours (request-response panics when a
        /// connection it registered is denied after it).
        pub limits: connection_limits::Behaviour,
        /// On a facility that listens on the LAN: the peers it may connect with (its relay and the
        /// current devices of its verified directory, kept up to date by the driver). Anyone else
        /// is refused when the connection is established, before a stream is opened.
        pub allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
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
    /// The relay: up to [`RELAY_CONNECTIONS_INCOMING_MAX`] devices.
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
        .with_behaviour(|key| {
            let sync = request_response::Behaviour::with_codec(
                FrameCodec,
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
                limits: connection_limits::Behaviour::new(node.connection_limits()),
                allowed: Toggle::from(lan_discovery.then(allow_block_list::Behaviour::default)),
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
