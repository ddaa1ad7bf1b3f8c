//! What operators see of a node and decide for it: the session board (each shard publishes its
//! allocations about once a second, so listing them never stops a shard), the shards' heartbeats
//! (`/healthz`), drain, and revocations. The admin API reads and writes it; the shards' engines ask
//! it through [`crate::shared::Shared`]'s `Cluster` methods; the fleet keeps it in step with the other
//! nodes.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use turnpike_proto::cluster::Admission;
use turnpike_proto::engine::Session;

/// A shard whose loop has not run for this long is stalled (`/healthz` fails). Shards wake at least
/// every [`crate::shard`]'s maximum sleep and beat once a second.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// One shard's latest publication.
#[derive(Debug, Clone)]
struct Published {
    at: Instant,
    sessions: Arc<[Session]>,
}

/// The node's operator-facing state.
#[derive(Debug, Default)]
pub struct Operator {
    /// Whether shards publish their sessions (admin API or fleet configured): off, nothing is copied.
    publishing: AtomicBool,
    /// Per shard: when its loop last ran, and its sessions then.
    board: Mutex<HashMap<u16, Published>>,
    /// Not taking new allocations.
    draining: AtomicBool,
    /// The fleet's store is unreachable and `cluster.on_outage` is `refuse`: no new allocations.
    outage: AtomicBool,
    /// Where a draining node sends clients (another node's address), if anywhere.
    alternate: Mutex<Option<SocketAddr>>,
    /// Whether any revocation is in force (spares the lock on every Allocate otherwise).
    any_revoked: AtomicBool,
    /// Revoked users and until when (Unix seconds).
    revoked: RwLock<HashMap<String, u64>>,
}

impl Operator {
    /// Shards publish their sessions from now on.
    pub fn enable_publishing(&self) {
        self.publishing.store(true, Ordering::Release);
    }

    /// Whether shards publish their sessions.
    pub fn publishing(&self) -> bool {
        self.publishing.load(Ordering::Acquire)
    }

    /// A shard's loop ran at `now`, with these sessions (`None` when not publishing).
    pub fn beat(&self, shard: u16, now: Instant, sessions: Option<Vec<Session>>) {
        let mut board = self.board.lock();
        let entry = board.entry(shard).or_insert_with(|| Published { at: now, sessions: Arc::from(Vec::new()) });
        entry.at = now;
        if let Some(s) = sessions {
            entry.sessions = Arc::from(s);
        }
    }

    /// The shards whose loops have not run since `now - STALL_AFTER`, among `shards` expected.
    pub fn stalled(&self, shards: u16, now: Instant) -> Vec<u16> {
        let board = self.board.lock();
        (0..shards).filter(|k| board.get(k).is_none_or(|p| now.saturating_duration_since(p.at) > STALL_AFTER)).collect()
    }

    /// Every published session, by shard.
    pub fn sessions(&self) -> Vec<Arc<[Session]>> {
        self.board.lock().values().map(|p| Arc::clone(&p.sessions)).collect()
    }

    /// Starts (`true`) or ends draining.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Whether the node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Sets where a draining node sends new clients.
    pub fn set_alternate(&self, alternate: Option<SocketAddr>) {
        *self.alternate.lock() = alternate;
    }

    /// Refuses (`true`) or admits new allocations while the fleet's store is unreachable.
    pub fn set_outage(&self, refuse: bool) {
        self.outage.store(refuse, Ordering::Release);
    }

    /// What a new Allocate meets.
    pub fn admission(&self) -> Admission {
        if self.outage.load(Ordering::Acquire) {
            return Admission::Closed;
        }
        if !self.draining() {
            return Admission::Open;
        }
        match *self.alternate.lock() {
            Some(a) => Admission::Redirect(a),
            None => Admission::Closed,
        }
    }

    /// Revokes `user` until `until` (Unix seconds); 0 lifts the revocation.
    pub fn revoke(&self, user: &str, until: u64) {
        let mut revoked = self.revoked.write();
        if until == 0 {
            revoked.remove(user);
        } else {
            revoked.insert(user.to_string(), until);
        }
        self.any_revoked.store(!revoked.is_empty(), Ordering::Release);
    }

    /// The revocations in force at `now_unix`.
    pub fn revocations(&self, now_unix: u64) -> Vec<(String, u64)> {
        let mut list: Vec<(String, u64)> =
            self.revoked.read().iter().filter(|(_, until)| **until > now_unix).map(|(u, t)| (u.clone(), *t)).collect();
        list.sort();
        list
    }

    /// Whether `user` is revoked at `now_unix`.
    pub fn is_revoked(&self, user: &[u8], now_unix: u64) -> bool {
        if !self.any_revoked.load(Ordering::Acquire) {
            return false;
        }
        let Ok(user) = std::str::from_utf8(user) else {
            return false;
        };
        self.revoked.read().get(user).is_some_and(|until| *until > now_unix)
    }
}

/// A session as the admin API shows it (`id` is `HEX@NODE`).
pub fn session_json(s: &Session, node: &str) -> serde_json::Value {
    serde_json::json!({
        "id": format!("{:x}@{node}", s.id),
        "node": node,
        "username": s.username,
        "user": s.user,
        "transport": s.client.transport.name(),
        "client": s.client.client.to_string(),
        "relayed": s.relayed.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "created": s.created_unix,
        "expires": s.expires_unix,
        "permissions": s.permissions,
        "channels": s.channels,
        "to_peer": {"packets": s.traffic[0].packets, "bytes": s.traffic[0].bytes},
        "to_client": {"packets": s.traffic[1].packets, "bytes": s.traffic[1].bytes},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_lapse_and_lift() {
        let o = Operator::default();
        assert!(!o.is_revoked(b"bob", 100));
        o.revoke("bob", 200);
        assert!(o.is_revoked(b"bob", 100) && !o.is_revoked(b"bob", 200) && !o.is_revoked(b"alice", 100));
        assert_eq!(o.revocations(100), [("bob".to_string(), 200)]);
        o.revoke("bob", 0);
        assert!(!o.is_revoked(b"bob", 100));
    }

    #[test]
    fn drain_redirects_or_closes_and_stalls_are_seen() {
        let o = Operator::default();
        assert_eq!(o.admission(), Admission::Open);
        o.set_draining(true);
        assert_eq!(o.admission(), Admission::Closed);
        let a: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        o.set_alternate(Some(a));
        assert_eq!(o.admission(), Admission::Redirect(a));
        let t0 = crate::shard::clock::now();
        o.beat(0, t0, None);
        assert_eq!(o.stalled(2, t0), [1]);
        assert_eq!(o.stalled(2, t0 + STALL_AFTER + Duration::from_secs(1)), [0, 1]);
    }
}
