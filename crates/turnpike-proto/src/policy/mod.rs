//! Policies as data: which peers may be reached.

pub mod peer;
pub mod rate;

pub use peer::{IpRange, PeerPolicy};
