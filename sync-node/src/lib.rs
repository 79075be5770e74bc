//! musubi-sync-node: the relay of a Musubi deployment (binary `musubi-node`).
//!
//! The relay enrols devices with single-use invites, keeps the signed directory of facilities and their
//! devices' public keys, and stores and forwards the signed, encrypted bundles, operations and key grants
//! of every document, giving each accepted bundle a per-document sequence number.
//! It never holds plaintext or document keys (DESIGN invariant 1): it checks signatures, authors,
//! membership and epochs on public fields only.
//!
//! Run loop ([`serve`]): one tokio task drives the libp2p swarm (`musubi-transport`) and `select!`s over
//! swarm events, the database thread's finished results, and a db-watch interval; one thread owns the
//! SQLite [`Store`] and runs [`Relay::handle`] for each request: decode, check against the database,
//! apply a push in one transaction, commit, then answer and notify connected member devices.
//!
//! Modules: [`invite`] (the invite code format), [`store`] (data directory and SQLite schema),
//! [`relay`] (the request handler, testable without sockets), and the server (`serve`, [`Config`]).

pub mod invite;
pub mod relay;
mod server;
pub mod store;

pub use relay::{Notification, Relay};
pub use server::{Config, ServeError, serve, serve_until};
pub use store::{Store, StoreError};
