//! musubi-sync-node: the relay of a Musubi deployment (binary `musubi-node`).
//!
//! The relay stores and forwards what facilities sign: the deployment authority's certificates and each
//! facility's device chain (the directory), join requests until their inviter approves them, and the
//! signed, encrypted bundles, membership operations and key grants of every document, giving each
//! accepted bundle a per-document sequence number.
//! It never holds plaintext, document keys or the authority's key (DESIGN invariants 1 and 9): it
//! checks signatures, authors, membership and epochs on public fields with the same admission rule
//! the facilities apply, and decides nothing about who may read.
//!
//! Run loop ([`serve`]): one tokio task drives the libp2p swarm (`musubi-transport`) and `select!`s over
//! swarm events, the database thread's finished results, and a db-watch interval; one thread owns the
//! SQLite [`Store`] and runs [`Relay::handle`] for each request: decode, check against the database,
//! apply a push in one transaction, commit, then answer and notify connected member devices.
//!
//! Modules: [`authority`] (the deployment authority's directory: init, invites, approval),
//! [`invite`] (the invite code format), [`store`] (data directory and SQLite schema), [`relay`] (the
//! request handler, testable without sockets), [`limits`] (per-device token buckets), [`metrics`]
//! (Prometheus metrics and live figures), [`admin`] (the admin HTTP listener: health, status,
//! metrics), [`backup`] (online backup and restore), and the server (`serve`, [`Config`]).

pub mod admin;
pub mod authority;
pub mod backup;
pub mod invite;
pub mod limits;
pub mod metrics;
pub mod relay;
mod server;
pub mod store;

pub use relay::{Notification, Relay};
pub use server::{
    CONNECTIONS_PER_ADDRESS_DEFAULT, Config, MIN_FREE_BYTES_DEFAULT,
    REQUESTS_QUEUED_PER_DEVICE_MAX, ServeError, serve, serve_until,
};
pub use store::{Store, StoreError};
