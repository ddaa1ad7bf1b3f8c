//! Policies as data: which peers may be reached.

pub mod peer;

pub use peer::{IpRange, PeerPolicy};
