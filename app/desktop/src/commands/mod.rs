//! The IPC commands: each one a thin call into `musubi-facility`, run on a blocking thread, its
//! error mapped to [`crate::error::AppError`].

pub mod card;
pub mod careplan;
pub mod hq;
pub mod referral;
pub mod session;
pub mod shelter;
pub mod sync;
pub mod trust;
