//! # turnpike-proto
//!
//! The sans-IO core of turnpike, a TURN/STUN relay server (RFC 8489, RFC 8656): the STUN/TURN codec,
//! long-term credentials (static users, TURN REST secrets, stateless nonces), peer policy and rate
//! limits as data, and the TURN server state machine of one shard ([`Engine`]).
//!
//! It does no I/O, reads no clock and takes no lock: every entry point takes `now`, relay sockets are
//! opened and closed through [`RelaySockets`], and what an engine shares with the engines beside it
//! (quotas, RESERVATION-TOKENs, live relayed addresses, the budget of unauthenticated answers) it asks
//! through [`Cluster`], which the host implements. The host (the `turnpike` crate) brings sockets,
//! event loops, TLS and configuration; tests and fuzzers drive the engine directly.
//!
//! The data path (ChannelData, Send indications, peer datagrams) allocates nothing: payloads stay
//! where they were received ([`PacketBuf`]) and headers are written into the headroom in front of them.

#![forbid(unsafe_code)]

pub mod allocation;
pub mod attr;
pub mod auth;
pub mod channel;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod framing;
mod header;
pub mod integrity;
pub mod policy;
mod ports;
pub mod proxy;
mod rng;
mod spares;
pub mod stats;
pub mod stun;
mod table;
mod timer;

pub use attr::AttrType;
pub use channel::{ChannelData, ChannelNumber};
pub use cluster::Cluster;
pub use engine::{Action, Engine, PacketBuf, RelayAddr, RelaySockets, Settings};
pub use error::{DropReason, ErrorCode, NoSpace, ParseError};
pub use ports::shard_ports;
pub use spares::spares_at_most;
pub use stun::{Class, Method, MsgWriter, StunMsg, TransactionId};
pub use timer::TimerWheel;
