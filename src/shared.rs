//! State shared between shards, written on allocation create/delete only (never per packet):
//! the 5-tuple directory, quota counters, and per-shard statistics blocks that only their shard writes.

use crate::proto::DropReason;
use crate::proto::allocation::FiveTuple;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const STRIPES: usize = 64;

fn stripe_of<T: Hash>(key: &T) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % STRIPES
}

/// Which shard owns each 5-tuple, in striped maps.
#[derive(Debug)]
pub struct Directory {
    stripes: Vec<RwLock<HashMap<FiveTuple, u16>>>,
}

impl Default for Directory {
    fn default() -> Self {
        Self { stripes: (0..STRIPES).map(|_| RwLock::new(HashMap::new())).collect() }
    }
}

impl Directory {
    /// Records that `shard` owns `tuple`.
    pub fn insert(&self, tuple: FiveTuple, shard: u16) {
        self.stripes[stripe_of(&tuple)].write().insert(tuple, shard);
    }

    /// Forgets `tuple`.
    pub fn remove(&self, tuple: &FiveTuple) {
        self.stripes[stripe_of(tuple)].write().remove(tuple);
    }

    /// The shard owning `tuple`.
    pub fn owner(&self, tuple: &FiveTuple) -> Option<u16> {
        self.stripes[stripe_of(tuple)].read().get(tuple).copied()
    }

    /// Total number of allocations.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.read().len()).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why an allocation was refused by quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// The user holds `user-quota` allocations already.
    User,
    /// The server holds `total-quota` allocations already.
    Total,
}

/// Allocation counters per user and in total (0 = unlimited).
#[derive(Debug)]
pub struct Quotas {
    total: AtomicU32,
    users: Vec<Mutex<HashMap<Box<[u8]>, u32>>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self { total: AtomicU32::new(0), users: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl Quotas {
    /// Counts one more allocation for `user`, unless that exceeds a limit.
    pub fn try_acquire(&self, user: &[u8], user_limit: u32, total_limit: u32) -> Result<(), QuotaError> {
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        if total_limit > 0 && prev >= total_limit {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(QuotaError::Total);
        }
        let mut map = self.users[stripe_of(&user)].lock();
        let count = map.entry(user.into()).or_insert(0);
        if user_limit > 0 && *count >= user_limit {
            if *count == 0 {
                map.remove(user);
            }
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(QuotaError::User);
        }
        *count += 1;
        Ok(())
    }

    /// Releases one allocation of `user`.
    pub fn release(&self, user: &[u8]) {
        let mut map = self.users[stripe_of(&user)].lock();
        if let Some(count) = map.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                map.remove(user);
            }
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Allocations currently counted.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }
}

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
pub fn transport_index(t: crate::proto::allocation::Transport) -> usize {
    match t {
        crate::proto::allocation::Transport::Udp => 0,
        crate::proto::allocation::Transport::Tcp => 1,
        crate::proto::allocation::Transport::Tls => 2,
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

/// A relay port held for a RESERVATION-TOKEN (EVEN-PORT with the R bit). The token may be presented
/// from another 5-tuple, which the kernel may steer to another shard, so reservations are shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The reserved port (taken out of the reserving shard's pool).
    pub port: u16,
    /// When the reservation lapses.
    pub expires: std::time::Instant,
}

/// Everything shards share.
#[derive(Debug, Default)]
pub struct Shared {
    /// 5-tuple -> owning shard.
    pub directory: Directory,
    /// Allocation quotas.
    pub quotas: Quotas,
    /// Outstanding RESERVATION-TOKENs. Touched only by Allocate requests that use EVEN-PORT(R) or a token.
    pub reservations: Mutex<HashMap<[u8; 8], Reservation>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_refuse_at_exactly_the_limit_and_free_up() {
        let q = Quotas::default();
        assert!(q.try_acquire(b"alice", 2, 3).is_ok());
        assert!(q.try_acquire(b"alice", 2, 3).is_ok());
        assert_eq!(q.try_acquire(b"alice", 2, 3), Err(QuotaError::User));
        assert!(q.try_acquire(b"bob", 2, 3).is_ok());
        assert_eq!(q.try_acquire(b"carol", 2, 3), Err(QuotaError::Total));
        q.release(b"alice");
        assert!(q.try_acquire(b"carol", 2, 3).is_ok());
        assert_eq!(q.total(), 3);
    }
}
