//! musubi-facility: the engine a facility's device runs, and its CLI `musubi`.
//!
//! - [`engine`]: device keys (passphrase-wrapped), documents, bundles, membership and key upkeep.
//! - [`store`]: the SQLite store of ciphertext bundles, grants, outbox and cursors.
//! - [`net`]: the sync driver that runs the sans-IO `musubi_crdt::sync::Session` over libp2p.
//! - [`offline`]: a stand-in authority and relay that enrol devices in process (tests, exercises).
//! - [`card`]: IC cards through PC/SC (reader watch, My Number card, contactless cards) → pseudonymous ids.
//! - [`staff`]: staff accounts of this device (password, or staff card + PIN), sealed at rest.
//! - [`mail`]: relatives' e-mail notifications: the sealed outbox and SMTP delivery (lettre).
//! - [`pdf`]: the care plan's 第1表〜第3表 as a PDF in the forms' layout (Japanese font from the system).
//! - [`services`]: the domain work staff do (referral letters first).
//!
//! Run loop: a CLI command opens the engine (unlocking the device key), makes its change as one
//! store transaction, and exits; `musubi sync --watch` keeps a session with the relay and applies
//! what arrives. The store is the only shared state between them.

pub mod audit;
pub mod card;
pub mod engine;
pub mod lan;
pub mod mail;
pub mod net;
pub mod offline;
pub mod pdf;
pub mod services;
pub mod staff;
pub mod store;
pub mod transfer;

pub use engine::{Engine, EngineError};
