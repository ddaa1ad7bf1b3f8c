//! Counters of one shard. Only that shard writes them (with plain relaxed load+store, no locked
//! instruction); the host reads them for metrics.

use crate::error::DropReason;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one shard. Only that shard writes them (with plain relaxed load+store, no locked
/// instruction); the control thread reads them. Aligned so shards never share a cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Live allocations on this shard.
    pub allocations: AtomicU64,
    /// Live permissions.
    pub permissions: AtomicU64,
    /// Live channel bindings.
    pub channels: AtomicU64,
    /// Relay sockets of deleted allocations kept open for the next ones (`proto::spares`).
    pub spare_relay_sockets: AtomicU64,
    /// Open TURN-over-TCP connections.
    pub tcp_connections: AtomicU64,
    /// Open TURN-over-TLS connections.
    pub tls_connections: AtomicU64,
    /// Allocations ever created.
    pub allocations_created: AtomicU64,
    /// Packets relayed client -> peer.
    pub packets_to_peer: AtomicU64,
    /// Bytes (payload) relayed client -> peer.
    pub bytes_to_peer: AtomicU64,
    /// Packets relayed peer -> client.
    pub packets_to_client: AtomicU64,
    /// Bytes (payload) relayed peer -> client.
    pub bytes_to_client: AtomicU64,
    /// STUN requests handled.
    pub requests: AtomicU64,
    /// Authentication failures (401 after credentials were presented, 438).
    pub auth_failures: AtomicU64,
    /// Requests refused by quota (486).
    pub quota_refusals: AtomicU64,
    /// Allocations refused for want of a relay port or socket (508).
    pub capacity_refusals: AtomicU64,
    /// Peers refused by policy (403 or dropped Send).
    pub peers_denied: AtomicU64,
    /// Packets dropped because the socket would block.
    pub send_would_block: AtomicU64,
    /// System calls (`sendmmsg`, `sendto`) that sent UDP datagrams: relayed data and replies to UDP clients.
    pub send_calls: AtomicU64,
    /// Relayed datagrams that left inside a UDP GSO message.
    pub datagrams_segmented: AtomicU64,
    /// Relayed datagrams that left through the shard's raw socket (`runtime.raw_send`).
    pub datagrams_raw: AtomicU64,
    /// Receive-coalescing pauses (`shard::coalesce`): wake-ups after which the shard waited for a batch.
    pub coalescing_pauses: AtomicU64,
    /// TCP/TLS connections closed as soon as they were accepted, by reason (the host's `admission::Refusal`).
    pub connections_refused: [AtomicU64; 3],
    /// Connections without an allocation closed early, by reason (the host's `admission::EarlyClose`): to make
    /// room for a newcomer, or idle or old while pending connections were many.
    pub connections_closed_early: [AtomicU64; 2],
    /// Drops by [`DropReason`].
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Authentication failures by reason, in [`AUTH_FAILURE_REASONS`] order.
    pub auth_failure_reasons: [AtomicU64; 4],
    /// Live allocations by client transport: UDP, TCP, TLS.
    pub allocations_by_transport: [AtomicU64; 3],
}

/// Labels of [`ShardStats::auth_failure_reasons`].
pub const AUTH_FAILURE_REASONS: [&str; 4] = ["unknown_user", "expired", "bad_integrity", "stale_nonce"];

/// Index of a transport in [`ShardStats::allocations_by_transport`].
pub fn transport_index(t: crate::allocation::Transport) -> usize {
    match t {
        crate::allocation::Transport::Udp => 0,
        crate::allocation::Transport::Tcp => 1,
        crate::allocation::Transport::Tls => 2,
    }
}

/// Adds `n` to a single-writer counter without a locked instruction.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Subtracts one from a single-writer gauge (never below zero).
#[inline]
pub fn bump_down(gauge: &AtomicU64) {
    gauge.store(gauge.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
}

/// Sets a single-writer gauge.
#[inline]
pub fn set(gauge: &AtomicU64, v: u64) {
    gauge.store(v, Ordering::Relaxed);
}

/// Reads a counter.
#[inline]
pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
