//! The control thread: aggregates per-shard counters once a second and logs a one-line summary
//! periodically. (Signals and reload are handled by the binary's main thread.)

pub mod http;
pub mod metrics;
pub mod notify;

use crate::proto::DropReason;
use crate::proto::stats::{ShardStats, read};
use crate::shared::Shared;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often the summary line is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Server-wide counters kept outside the shards.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Successful reloads.
    pub reloads: AtomicU64,
    /// Reloads refused because the new file was invalid.
    pub reload_failures: AtomicU64,
    /// The configuration generation (0 at start).
    pub generation: AtomicU64,
    /// What the metrics endpoint's HTTP limits did.
    pub http: Arc<http::HttpCounters>,
}

/// Counters summed over all shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Live allocations.
    pub allocations: u64,
    /// Live permissions.
    pub permissions: u64,
    /// Live channels.
    pub channels: u64,
    /// Relay sockets kept open for the next allocations.
    pub spare_relay_sockets: u64,
    /// Open TCP connections.
    pub tcp_connections: u64,
    /// Open TLS connections.
    pub tls_connections: u64,
    /// Allocations ever created.
    pub allocations_created: u64,
    /// Packets client -> peer.
    pub packets_to_peer: u64,
    /// Bytes client -> peer.
    pub bytes_to_peer: u64,
    /// Packets peer -> client.
    pub packets_to_client: u64,
    /// Bytes peer -> client.
    pub bytes_to_client: u64,
    /// Requests.
    pub requests: u64,
    /// Authentication failures.
    pub auth_failures: u64,
    /// Quota refusals.
    pub quota_refusals: u64,
    /// Allocations refused for want of a relay port or socket.
    pub capacity_refusals: u64,
    /// Peers denied.
    pub peers_denied: u64,
    /// Sends dropped because the socket was full.
    pub send_would_block: u64,
    /// TCP/TLS connections closed as soon as they were accepted (all reasons).
    pub connections_refused: u64,
    /// Connections without an allocation closed early (all reasons).
    pub connections_closed_early: u64,
    /// Drops by reason.
    pub drops: [u64; DropReason::ALL.len()],
}

impl Totals {
    /// Sums the counters of all shards.
    pub fn sum(stats: &[Arc<ShardStats>]) -> Self {
        let mut t = Self::default();
        for s in stats {
            t.allocations += read(&s.allocations);
            t.permissions += read(&s.permissions);
            t.channels += read(&s.channels);
            t.spare_relay_sockets += read(&s.spare_relay_sockets);
            t.tcp_connections += read(&s.tcp_connections);
            t.tls_connections += read(&s.tls_connections);
            t.allocations_created += read(&s.allocations_created);
            t.packets_to_peer += read(&s.packets_to_peer);
            t.bytes_to_peer += read(&s.bytes_to_peer);
            t.packets_to_client += read(&s.packets_to_client);
            t.bytes_to_client += read(&s.bytes_to_client);
            t.requests += read(&s.requests);
            t.auth_failures += read(&s.auth_failures);
            t.quota_refusals += read(&s.quota_refusals);
            t.capacity_refusals += read(&s.capacity_refusals);
            t.peers_denied += read(&s.peers_denied);
            t.send_would_block += read(&s.send_would_block);
            t.connections_refused += s.connections_refused.iter().map(read).sum::<u64>();
            t.connections_closed_early += s.connections_closed_early.iter().map(read).sum::<u64>();
            for (d, c) in t.drops.iter_mut().zip(&s.drops) {
                *d += read(c);
            }
        }
        t
    }

    /// Total dropped datagrams.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum::<u64>() + self.send_would_block
    }
}

/// Runs until `stop` is set.
#[allow(clippy::disallowed_methods)]
pub fn run(stats: &[Arc<ShardStats>], shared: &Shared, stop: &AtomicBool) {
    let mut last = Totals::sum(stats);
    let mut since_summary = Duration::ZERO;
    let tick = Duration::from_millis(250);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        since_summary += tick;
        if since_summary < SUMMARY_EVERY {
            continue;
        }
        let now = Totals::sum(stats);
        let secs = since_summary.as_secs().max(1);
        log::info!(
            "summary: {} allocations ({} quota units), {} permissions, {} channels; {} pkt/s to peers, {} pkt/s to clients; {} auth failures, {} dropped in the last {}s",
            now.allocations,
            shared.quotas.total(),
            now.permissions,
            now.channels,
            (now.packets_to_peer - last.packets_to_peer) / secs,
            (now.packets_to_client - last.packets_to_client) / secs,
            now.auth_failures - last.auth_failures,
            now.dropped() - last.dropped(),
            secs
        );
        last = now;
        since_summary = Duration::ZERO;
    }
}
