//! # turnpike
//!
//! A TURN/STUN relay server (RFC 8489, RFC 8656) for dedicated relay hosts: Matrix homeservers and any
//! WebRTC service that needs calls to cross NATs. This crate is the host: sockets, event loops, TLS,
//! configuration, the control side and the tools. The protocol itself (codec, credentials, peer
//! policy, the TURN state machine) is the sans-IO core, [`turnpike_proto`] (re-exported as [`proto`]),
//! which does no I/O, reads no clock and takes no lock.
//!
//! ## Threads
//!
//! * **Shards** ([`shard`]): one mio event loop per core (`runtime.threads`, `auto` = cores),
//!   optionally pinned. Each owns one `SO_REUSEPORT` UDP, TCP and TLS listener per listening address,
//!   its share of the relay port range, the relay sockets and connections of its allocations, and its
//!   own [`proto::Engine`]. Linux hashes a flow's 4-tuple onto one socket of the reuse-port group, so a
//!   client's packets always reach the same shard, and both directions of an allocation stay there.
//! * **Control** ([`control`]): sums the shards' counters and logs a summary line; serves the
//!   Prometheus endpoint on its own thread ([`control::http`]: hyper on a one-thread tokio runtime,
//!   bounded in connections, header size and time). The binary's main thread handles signals,
//!   reload and shutdown; it reaches shards through a bounded channel and a mio `Waker`, and a shard
//!   applies new settings between two packets.
//!
//! ## The data path
//!
//! A shard wakes from `epoll_wait`, reads the clock once, and drains each ready socket with
//! `recvmmsg` up to `runtime.recv_batch` datagrams (a socket with more waiting is served again before
//! the next poll). Each datagram lands in a [`proto::PacketBuf`] with headroom in front of the payload,
//! and the engine answers with an [`proto::Action`]:
//!
//! * **client -> peer**: ChannelData is looked up by 5-tuple and channel number, the permission checked,
//!   and its payload queued to leave from the allocation's relay socket exactly where it was received;
//!   Send indications are parsed without allocating and queued the same way.
//! * **peer -> client**: the relay socket's token names its [`proto::allocation::RelayKey`] (the
//!   allocation's slot and which of its relayed addresses); the permission for the peer is checked
//!   and a ChannelData or Data indication header written into the headroom.
//!
//! Queued datagrams leave at the end of the wake-up ([`shard::send`]): one `sendmmsg` per socket, UDP
//! GSO for runs to one destination, and the lone datagrams of many allocations together through one
//! send-only raw socket per shard and family ([`shard::rawsend`], `runtime.raw_send`). TCP and TLS
//! clients get what the wake-up queued for them in one write (one TLS record per message). A busy
//! shard then pauses briefly before polling again, so that the next wake-up finds a batch
//! ([`shard::coalesce`]). Neither direction allocates (a test counts with a global allocator), takes a
//! lock shared with another shard, or waits on the network; counters are per shard and written with
//! relaxed stores by their shard only.
//!
//! With `runtime.kernel_path` ([`kernel_path`]) most of a call's datagrams never reach a shard: an XDP
//! program relays the ChannelData of the channels the shards install in its table, in both directions,
//! and the rest arrives as above. The engine marks an allocation whenever its channels' eligibility may
//! have changed (a ChannelBind, a permission or channel ending, a reload, a deletion); the shard makes
//! that allocation's entries say what the engine allows before it polls again.
//!
//! ## Control messages and shared state
//!
//! Allocate, Refresh, CreatePermission, ChannelBind and Binding go through the core's codec,
//! authentication and policy; what an engine shares with the other shards (quotas, RESERVATION-TOKENs,
//! the relayed addresses in use, the budget of unauthenticated answers) it asks through
//! [`proto::Cluster`], which [`shared::Shared`] implements for one host. Connections that hold no
//! allocation yet are admitted against a node-wide budget ([`admission`]).
//!
//! ## Modules
//!
//! * [`config`]: YAML and coturn `turnserver.conf`, validated whole; errors name file, line and option;
//!   `config::preflight` is `turnpike check`, the gate before every start and reload.
//! * [`logging`]: stderr (journald priorities), a file (reopened on SIGHUP) or syslog; text or JSON.
//! * [`server`]: start-up (listeners, descriptors, shards, control) and reload.
//! * [`shard`]: the event loop, sockets, batched sending, TCP/TLS connections.
//! * [`shared`], [`admission`]: what the shards of a node share.
//! * [`control`]: counters, the summary line, the HTTP endpoint, systemd notification.
//! * [`kernel_path`]: the XDP program, its loader and the shards' tables of channels it relays.
//! * [`probe`], [`tls`], [`descriptors`], [`ephemeral`]: the probe tool, TLS set-up, the descriptor
//!   budget, the ephemeral-port check.

#![deny(unsafe_code)]
// The overview links the internal modules; `cargo doc --document-private-items` renders them.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod admission;
pub mod config;
pub mod control;
pub(crate) mod descriptors;
pub(crate) mod ephemeral;
pub(crate) mod fleet;
pub mod kernel_path;
pub mod logging;
pub mod operator;
pub mod probe;
pub mod server;
pub mod shard;
pub mod shared;
pub(crate) mod stats;
pub(crate) mod tls;

pub use stats::{ShardStats, Totals};

/// The sans-IO core ([`turnpike_proto`]), under the name the host's modules use.
pub use turnpike_proto as proto;
pub use turnpike_proto::{auth, policy};
