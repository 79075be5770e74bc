//! musubi-facility: the engine a facility's device runs, and its CLI `musubi`.
//!
//! - [`engine`]: device keys (passphrase-wrapped), documents, bundles, membership and key upkeep.
//! - [`store`]: the SQLite store of ciphertext bundles, grants, outbox and cursors.
//! - [`net`]: the sync driver that runs the sans-IO `musubi_crdt::sync::Session` over libp2p.
//! - [`services`]: the domain work staff do (referral letters first).
//!
//! Run loop: a CLI command opens the engine (unlocking the device key), makes its change as one
//! store transaction, and exits; `musubi sync --watch` keeps a session with the relay and applies
//! what arrives. The store is the only shared state between them.

pub mod engine;
pub mod net;
pub mod services;
pub mod store;

pub use engine::{Engine, EngineError};
