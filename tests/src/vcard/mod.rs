//! Cards for the tests: the `musubi-vcard` emulator (a virtual smart card speaking vsmartcard's vpcd
//! protocol to a real pcscd) and the harness that owns pcscd and the emulator during a scenario.
//!
//! - [`cards`]: the emulated cards (My Number card with a test CA, FeliCa, MIFARE, misbehaving ones).
//! - [`emulator`]: the vpcd slot loop, the APDU log (JSON lines) and the control commands.
//! - [`harness`]: [`harness::Pcscd`] (a foreground `pcscd` the test owns) and [`harness::VCard`].

pub mod cards;
pub mod emulator;
pub mod harness;
