//! The control thread: aggregates per-shard counters once a second and logs a one-line summary
//! periodically. (Signals and reload are handled by the binary's main thread.)

pub(crate) mod admin;
pub(crate) mod http;
pub(crate) mod metrics;
pub mod notify;

use crate::shared::Shared;
use crate::stats::{ShardStats, Totals};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use turnpike_proto::stats::{STALE_NONCE, TO_CLIENT, TO_PEER};

/// How often the summary line is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Label values of [`ServerCounters::reloads`].
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "failed"];

turnpike_proto::counters! {
    /// Server-wide counters kept outside the shards (the main thread writes them).
    pub struct ServerCounters / ServerTotals {
        /// Reloads, by [`RELOAD_RESULTS`]: applied, or refused because the new file was invalid.
        reloads: counter total "turnpike_reloads_total" "Configuration reloads, by result." [result: RELOAD_RESULTS],
        /// The configuration generation in force (0 at start).
        generation: gauge total "turnpike_config_generation" "Configuration generation in force.",
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
        let (e, l) = (&now.engine, &last.engine);
        // Stale nonces are how clients learn a new nonce, not failures (as before the counters! tables).
        let failures = |t: &turnpike_proto::stats::EngineTotals| {
            t.auth_failures.iter().enumerate().filter(|&(i, _)| i != STALE_NONCE).map(|(_, n)| n).sum::<u64>()
        };
        log::info!(
            "summary: {} allocations ({} quota units), {} permissions, {} channels; {} pkt/s to peers, {} pkt/s to clients; {} auth failures, {} dropped in the last {}s",
            e.allocations(),
            shared.quotas.total(),
            e.permissions,
            e.channels,
            (e.packets[TO_PEER] - l.packets[TO_PEER]) / secs,
            (e.packets[TO_CLIENT] - l.packets[TO_CLIENT]) / secs,
            failures(e) - failures(l),
            e.dropped() - l.dropped(),
            secs
        );
        last = now;
        since_summary = Duration::ZERO;
    }
}
