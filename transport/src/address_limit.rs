//! Connection caps by source address and in all, counted from the moment an inbound connection is
//! accepted (its handshake included) until it closes: a network behaviour that denies a pending
//! inbound connection over either cap, before any other behaviour sees it, and says so through a
//! callback (the relay counts it in its metrics).
//!
//! libp2p's `connection_limits` caps established connections in all and per peer id; a peer id
//! costs nothing to make, so it does not stop one address from opening thousands. The address is
//! the remote IP of the transport (TCP or QUIC); connections without one are counted in the total
//! only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::multiaddr::Protocol;
use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its source address has [`AddressLimits::per_address`] connections already.
    PerAddress,
    /// The node has [`AddressLimits::total`] inbound connections already.
    Total,
}

impl Refused {
    /// `per-address` or `total` (the `limit` label of the relay's refusal metric).
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::PerAddress => "per-address",
            Refused::Total => "total",
        }
    }
}

/// The caps (`None`: no cap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressLimits {
    /// Most inbound connections (pending or established) from one IP address.
    pub per_address: Option<usize>,
    /// Most inbound connections (pending or established) in all.
    pub total: Option<usize>,
}

/// The denial a refused connection fails with.
#[derive(Debug)]
struct Denied(Refused, Option<IpAddr>);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied(Refused::PerAddress, Some(ip)) => {
                write!(f, "too many connections from {ip}")
            }
            Denied(_, _) => f.write_str("too many connections"),
        }
    }
}

impl std::error::Error for Denied {}

/// The behaviour (see the module docs).
pub struct AddressLimit {
    limits: AddressLimits,
    by_ip: HashMap<IpAddr, usize>,
    counted: HashMap<ConnectionId, Option<IpAddr>>,
    on_refused: Arc<dyn Fn(Refused) + Send + Sync>,
}

impl fmt::Debug for AddressLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressLimit")
            .field("limits", &self.limits)
            .field("connections", &self.counted.len())
            .finish()
    }
}

/// The IP address a multiaddr starts with.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl AddressLimit {
    /// Caps `limits`; `on_refused` is called for every connection refused.
    pub fn new(limits: AddressLimits, on_refused: Arc<dyn Fn(Refused) + Send + Sync>) -> Self {
        Self {
            limits,
            by_ip: HashMap::new(),
            counted: HashMap::new(),
            on_refused,
        }
    }

    /// Inbound connections counted now.
    pub fn connections(&self) -> usize {
        self.counted.len()
    }

    fn release(&mut self, id: ConnectionId) {
        if let Some(Some(ip)) = self.counted.remove(&id)
            && let Some(n) = self.by_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for AddressLimit {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let ip = ip_of(remote);
        let refused = if self.limits.total.is_some_and(|t| self.counted.len() >= t) {
            Some(Refused::Total)
        } else if let (Some(max), Some(ip)) = (self.limits.per_address, ip)
            && self.by_ip.get(&ip).copied().unwrap_or(0) >= max
        {
            Some(Refused::PerAddress)
        } else {
            None
        };
        if let Some(r) = refused {
            (self.on_refused)(r);
            return Err(ConnectionDenied::new(Denied(r, ip)));
        }
        self.counted.insert(id, ip);
        if let Some(ip) = ip {
            *self.by_ip.entry(ip).or_default() += 1;
        }
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(c) => self.release(c.connection_id),
            FromSwarm::ListenFailure(f) => self.release(f.connection_id),
            _ => {}
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn one_address_is_capped_others_are_not_and_a_closed_connection_frees_its_place() {
        let refused = Arc::new(AtomicUsize::new(0));
        let r = refused.clone();
        let mut l = AddressLimit::new(
            AddressLimits {
                per_address: Some(2),
                total: Some(3),
            },
            Arc::new(move |_| {
                r.fetch_add(1, Ordering::Relaxed);
            }),
        );
        let local = addr("/ip4/0.0.0.0/tcp/4001");
        let a = addr("/ip4/10.0.0.1/tcp/50000");
        let b = addr("/ip4/10.0.0.2/tcp/50000");
        let id = |n: usize| ConnectionId::new_unchecked(n);
        assert!(
            l.handle_pending_inbound_connection(id(1), &local, &a)
                .is_ok()
        );
        assert!(
            l.handle_pending_inbound_connection(id(2), &local, &a)
                .is_ok()
        );
        assert!(
            l.handle_pending_inbound_connection(id(3), &local, &a)
                .is_err()
        );
        assert!(
            l.handle_pending_inbound_connection(id(4), &local, &b)
                .is_ok()
        );
        // Three in all: another address is refused too, by the total.
        assert!(
            l.handle_pending_inbound_connection(
                id(5),
                &local,
                &addr("/ip4/10.0.0.3/udp/1/quic-v1")
            )
            .is_err()
        );
        assert_eq!(refused.load(Ordering::Relaxed), 2);
        l.release(id(1));
        assert_eq!(l.connections(), 2);
        assert!(
            l.handle_pending_inbound_connection(id(6), &local, &a)
                .is_ok()
        );
    }
}
