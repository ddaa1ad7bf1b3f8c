//! # turnpike
//!
//! A TURN/STUN relay server (RFC 8489, RFC 8656) built for dedicated relay hosts.
//! (Architecture overview is expanded below as the crate grows.)

#![deny(unsafe_code)]

pub mod auth;
pub mod config;
pub mod control;
pub mod policy;
pub mod proto;
pub mod server;
pub mod shard;
pub mod shared;
