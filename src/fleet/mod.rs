//! A fleet of nodes sharing control state through Redis (`cluster.redis`). Relaying stays local to
//! each node; what the fleet shares is who holds how many allocations (fleet-wide user quotas), which
//! nodes are alive and draining (ALTERNATE-SERVER), revocations, and the operator's commands (list,
//! end). All Redis I/O happens on one thread ([`worker`]); shards never wait on it: they count their
//! allocations into [`crate::shared::FleetCounts`] (a non-blocking queue) and read the other nodes'
//! counts from it. If Redis goes away, running calls are untouched, new allocations are admitted on
//! the node's own counts (or refused, `cluster.on_outage`), and the node publishes its state again when
//! Redis is back.
//!
//! Keys (prefix `turnpike:`): `nodes` (sorted set, score = lease expiry in ms), `node:NAME` (hash:
//! alternate, draining, allocations), `users:NAME` (hash: user -> allocations on that node), both
//! expiring with the lease; `revocations` (hash: user -> until); `events` (a stream, trimmed: count
//! updates and commands, read by every node from where it left off, so a node that was away applies
//! what it missed); `reply:NAME:SEQ` (lists the answers to one node's command, expiring).

mod worker;

use crate::shard::ShardLink;
use crate::shared::Shared;
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

turnpike_proto::counters! {
    /// The fleet's state, for the metrics.
    pub struct FleetCounters / FleetTotals {
        /// 1 while Redis answers.
        connected: gauge total "turnpike_fleet_redis_connected" "1 while this node reaches the fleet's Redis, 0 while it does not (or no fleet is configured).",
        /// Times the connection to Redis was lost.
        outages: counter total "turnpike_fleet_redis_outages_total" "Times this node lost its connection to the fleet's Redis.",
        /// Milliseconds since the lease was last renewed (at the last renewal attempt).
        lease_age_ms: gauge total "turnpike_fleet_lease_age_milliseconds" "Time since this node last renewed its lease in Redis.",
        /// Allocations the fleet holds, as this node last heard.
        fleet_allocations: gauge total "turnpike_fleet_allocations" "Allocations on every live node of the fleet, as this node last heard.",
        /// Live nodes.
        nodes: gauge total "turnpike_fleet_nodes" "Live nodes in the fleet, this one included.",
        /// Revocations in force.
        revocations: gauge total "turnpike_fleet_revocations" "User revocations in force.",
        /// 1 while this node drains.
        draining: gauge total "turnpike_fleet_draining" "1 while this node drains (takes no new allocations).",
        /// Redis commands sent.
        commands: counter total "turnpike_fleet_redis_commands_total" "Redis commands this node sent (a pipeline counts each of its commands).",
        /// Events (count updates, commands) read from the fleet's stream.
        events: counter total "turnpike_fleet_events_total" "Entries this node read from the fleet's event stream.",
    }
}

/// The other nodes' sessions (node name, API objects), or why they are unknown.
pub(crate) type FleetSessions = Result<Vec<(String, Vec<Value>)>, String>;

/// What the admin API asks the fleet thread.
pub(crate) enum Request {
    /// Every other live node's sessions, as API objects.
    Sessions(Sender<FleetSessions>),
    /// End a user's sessions on the other nodes; how many ended.
    EndUser(String, Sender<usize>),
    /// End a session on another node; how many ended (0 or 1).
    EndId(String, u64, Sender<usize>),
    /// Record a revocation fleet-wide (until 0: lift it).
    Revoke(String, u64),
    /// This node started or stopped draining: publish it now.
    Draining,
}

/// The admin API's way to the fleet thread.
pub(crate) struct FleetHandle {
    requests: Sender<Request>,
}

impl FleetHandle {
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Request, wait: Duration) -> Option<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.requests.send(make(tx)).ok()?;
        rx.recv_timeout(wait).ok()
    }

    /// The other live nodes' sessions.
    pub(crate) fn fleet_sessions(&self, wait: Duration) -> FleetSessions {
        self.ask(Request::Sessions, wait).unwrap_or_else(|| Err("no answer from the fleet thread".into()))
    }

    /// Ends `user`'s sessions on the other nodes.
    pub(crate) fn end_user_elsewhere(&self, user: &str) -> usize {
        self.ask(|tx| Request::EndUser(user.to_string(), tx), Duration::from_secs(3)).unwrap_or(0)
    }

    /// Ends session `id` on `node`.
    pub(crate) fn end_id_on(&self, node: &str, id: u64) -> usize {
        self.ask(|tx| Request::EndId(node.to_string(), id, tx), Duration::from_secs(3)).unwrap_or(0)
    }

    /// Revokes `user` until `until` fleet-wide (0 lifts it).
    pub(crate) fn revoke(&self, user: &str, until: u64) {
        let _ = self.requests.send(Request::Revoke(user.to_string(), until));
    }

    /// Publishes this node's drain state now.
    pub(crate) fn draining_changed(&self) {
        let _ = self.requests.send(Request::Draining);
    }
}

/// What the fleet thread is started with.
pub(crate) struct FleetParts {
    pub config: crate::config::ClusterConfig,
    /// The address other nodes send clients to.
    pub alternate: std::net::SocketAddr,
    pub shared: Arc<Shared>,
    pub shards: Vec<ShardLink>,
    pub counters: Arc<FleetCounters>,
    pub stop: Arc<AtomicBool>,
}

/// Starts the fleet thread; returns the admin API's handle and the thread.
pub(crate) fn start(parts: FleetParts) -> std::io::Result<(Arc<FleetHandle>, std::thread::JoinHandle<()>)> {
    let (requests, inbox): (Sender<Request>, Receiver<Request>) = crossbeam_channel::bounded(64);
    // The shards' allocation counts: big enough for bursts; a full queue makes the thread resync.
    let (changes_tx, changes) = crossbeam_channel::bounded(1 << 16);
    parts.shared.fleet.enable(changes_tx);
    parts.shared.operator.enable_publishing();
    let thread = std::thread::Builder::new()
        .name("turnpike-fleet".into())
        .spawn(move || worker::run(parts, &inbox, &changes))?;
    Ok((Arc::new(FleetHandle { requests }), thread))
}
