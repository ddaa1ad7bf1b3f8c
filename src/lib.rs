//! # turnpike
//!
//! A TURN/STUN relay server (RFC 8489, RFC 8656) for dedicated relay hosts: Matrix homeservers and any
//! WebRTC service that needs calls to cross NATs.
//!
//! ## Threads
//!
//! * **Shards** ([`shard`]): one mio event loop per core (`runtime.threads`, `auto` = cores), optionally
//!   pinned with `core_affinity`. Each shard owns one `SO_REUSEPORT` UDP listener per listening address,
//!   its share of the relay port range ([`proto::ports`]), the relay sockets and state of every
//!   allocation it created, and its own [`proto::Engine`]. Linux hashes a flow's 4-tuple onto one socket of
//!   the reuse-port group, so a client's packets always reach the same shard, and both directions of an
//!   allocation stay on the shard that owns it.
//! * **Control** ([`control`]): sums per-shard counters and logs a summary line; the binary's main thread
//!   handles signals and shutdown. Control talks to shards through a bounded crossbeam channel plus a mio
//!   `Waker`; a shard applies new settings between two packets.
//!
//! ## The data path
//!
//! A shard wakes from `epoll_wait`, reads the clock once, and drains each ready socket up to
//! `runtime.recv_batch` datagrams (a socket with more waiting is revisited before the next poll, so one
//! busy socket cannot starve the others). Each datagram lands in a [`proto::PacketBuf`] with 64 bytes of
//! headroom in front of the payload:
//!
//! * **client → peer**: a ChannelData frame (first two bits `01`) is looked up by 5-tuple (keyed hash:
//!   the key is chosen by the remote) and channel number, its binding and permission checked against
//!   `now`, and its payload sent from the allocation's relay socket exactly where it was received. Send
//!   indications are parsed with the borrowed, allocation-free codec and forwarded the same way.
//! * **peer → client**: the relay socket's token names the allocation slot; the permission for the
//!   peer's IP is checked, and a ChannelData header (or a Data indication header) is written into the
//!   headroom in front of the payload, which therefore never moves.
//!
//! Neither direction allocates (a test counts with a global allocator), takes a lock shared with
//! another shard, or makes a system call besides the receive and the send. Counters are per shard
//! ([`shared::ShardStats`]) and written with plain relaxed stores by their shard only.
//!
//! ## Control messages
//!
//! Allocate, Refresh, CreatePermission, ChannelBind and Binding go through the codec, then
//! authentication ([`auth`]: stateless HMAC nonces, static users, TURN REST secrets, constant-time
//! MESSAGE-INTEGRITY), then policy ([`policy`]: peer addresses; quotas in [`shared::Quotas`]), then the
//! state change, and the response is written into a reusable buffer. Relay sockets are opened through
//! [`proto::engine::RelaySockets`], so the engine itself never touches a socket or the clock: every entry
//! point takes `now`. A deleted allocation's relay socket is kept open as a spare for a later allocation
//! ([`proto::spares`]: bounded, handed out at random among the older half), which spares the kernel most of an Allocate's work.
//! Requests on an allocation are checked with the key it was created with (no REST HMAC and MD5 again)
//! until a reload changes the credentials. Expiry of allocations, permissions, channels and port reservations runs off a
//! per-shard [`proto::timer::TimerWheel`]; entries re-check the real deadline when they fire, so a
//! refresh costs no timer operation.
//!
//! ## Shared state
//!
//! [`shared::Shared`] holds the 5-tuple directory (striped `RwLock`ed maps), per-user and total
//! allocation counters, and outstanding RESERVATION-TOKENs. All are written when allocations are created
//! or deleted, never per packet.
//!
//! ## Modules
//!
//! * [`proto`]: sans-IO STUN codec and TURN state machine (`#![forbid(unsafe_code)]`).
//! * [`auth`], [`policy`]: credentials and peer policy as data.
//! * [`config`]: YAML and coturn `turnserver.conf`, validated whole, errors with file, line and option.
//! * [`shard`], [`server`], [`control`]: the I/O layer, start-up, and the control thread.

#![deny(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod config;
pub mod control;
pub mod descriptors;
pub mod ephemeral;
pub mod policy;
pub mod probe;
pub mod proto;
pub mod server;
pub mod shard;
pub mod shared;
pub mod tls;
