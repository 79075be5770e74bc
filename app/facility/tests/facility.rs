//! musubi-facility's integration tests: the engine and its services in-process, on a device
//! enrolled by hand (a directory signed by a stand-in relay key), with no relay and no network.
//! Each test is the story of a user; scenario tests with real processes live in `tests/`.

#[path = "facility/careplan.rs"]
mod careplan;
#[path = "facility/lying_relay.rs"]
mod lying_relay;
#[path = "facility/referral.rs"]
mod referral;
#[path = "facility/shelter.rs"]
mod shelter;
#[path = "facility/two.rs"]
mod two;
