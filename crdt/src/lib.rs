//! musubi-crdt: the sans-IO core of Musubi.
//!
//! It holds everything that must be the same at the relay and at every facility:
//! identifiers ([`ids`]), named limits ([`limits`]), age envelopes and Ed25519 signatures ([`crypto`]),
//! signed bundles ([`bundle`]), their changes decoded with bounds and bound to their device ([`changes`]), signed membership and key-grant operations ([`ops`]), the membership
//! view and the one admission rule ([`membership`]), the certificate chains of the directory
//! ([`directory`]), invites and join requests ([`invite`]), the `/musubi/sync/1` wire messages ([`protocol`]),
//! the facility's sync-session state machine ([`sync`]) and the typed domain documents ([`documents`]).
//!
//! Run loop: a driver outside this crate feeds inputs with `handle_*` (always with `now`) and drains
//! outputs with `poll_*`; this crate never touches sockets, files, clocks or the OS random source.
//! Randomness is passed in as bytes (`[u8; 32]` seeds); see ARCHITECTURE.md for the one exception,
//! the per-message file keys and nonces that the age library draws itself.

pub mod audit;
pub mod bundle;
pub mod changes;
pub mod crypto;
pub mod directory;
pub mod documents;
pub mod ids;
pub mod invite;
pub mod limits;
pub mod membership;
pub mod ops;
pub mod protocol;
pub mod sync;
pub mod transfer;
