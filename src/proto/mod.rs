//! The sans-IO core: STUN/TURN codec and the per-shard TURN server state machine.
//!
//! Nothing in here touches sockets, threads or the OS clock: every entry point takes `now`, and socket
//! creation is a request answered through the [`engine::RelaySockets`] trait.

#![forbid(unsafe_code)]

pub mod allocation;
pub mod attr;
pub mod channel;
pub mod engine;
pub mod error;
pub mod framing;
pub mod integrity;
pub mod ports;
pub mod rng;
pub mod spares;
pub mod stun;
pub mod table;
pub mod timer;

pub use attr::AttrType;
pub use channel::{ChannelData, ChannelNumber};
pub use engine::{Action, Engine, PacketBuf, RelayAddr, RelaySockets, Settings};
pub use error::{DropReason, ErrorCode, NoSpace, ParseError};
pub use stun::{Class, Method, MsgWriter, StunMsg, TransactionId};
