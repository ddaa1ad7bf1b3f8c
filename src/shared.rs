//! What the shards of one node share, written on allocation create and delete (never per packet):
//! quota counters, outstanding RESERVATION-TOKENs, the relayed addresses in use, the budget of
//! unauthenticated answers and of connections without an allocation. [`Shared`] is the single-host
//! [`Cluster`] the engines ask.

use crate::admission::ConnBudget;
use crate::operator::Operator;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use turnpike_proto::Cluster;
use turnpike_proto::cluster::{
    Admission, LiveRelays, QuotaBook, QuotaError, QuotaLimits, Reservation, ReservationBook, UnauthLimiter,
};

const STRIPES: usize = 64;

fn stripe_of<T: Hash + ?Sized>(key: &T) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % STRIPES
}

/// Allocation counters per user (in striped books) and in total.
#[derive(Debug)]
pub struct Quotas {
    total: AtomicU32,
    users: Vec<Mutex<QuotaBook>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self { total: AtomicU32::new(0), users: (0..STRIPES).map(|_| Mutex::new(QuotaBook::default())).collect() }
    }
}

impl Quotas {
    fn book(&self, user: &[u8]) -> parking_lot::MutexGuard<'_, QuotaBook> {
        self.users[stripe_of(user)].lock()
    }

    /// Counts one more allocation for `user` and, with `reserve`, the port it reserves, unless that
    /// exceeds a limit.
    pub fn try_acquire(&self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError> {
        let units = 1 + u32::from(reserve);
        let prev = self.total.fetch_add(units, Ordering::AcqRel);
        if limits.total > 0 && prev.saturating_add(units) > limits.total {
            self.total.fetch_sub(units, Ordering::AcqRel);
            return Err(QuotaError::Total);
        }
        self.book(user).acquire(user, limits, reserve).inspect_err(|_| {
            self.total.fetch_sub(units, Ordering::AcqRel);
        })
    }

    fn give_back(&self, user: &[u8], reservation: bool) {
        if self.book(user).release(user, reservation) {
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Allocations and reservations currently counted.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// The quota units (allocations plus reservations) `user` holds.
    pub fn held_by(&self, user: &[u8]) -> u32 {
        self.book(user).held_by(user)
    }
}

/// Everything the shards of a node share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Allocation quotas.
    pub quotas: Quotas,
    /// Outstanding RESERVATION-TOKENs. Touched only by Allocate requests that use EVEN-PORT(R) or a token.
    pub reservations: Mutex<ReservationBook>,
    /// This server's addresses and the relayed addresses of live allocations.
    pub live_relays: LiveRelays,
    /// TCP/TLS connections without an allocation, and their limits.
    pub conns: ConnBudget,
    /// Answers to unauthenticated requests, per source and prefix.
    pub unauth: UnauthLimiter,
    /// Sessions, heartbeats, drain and revocations.
    pub operator: Operator,
    /// The fleet's view of users' allocations on the other nodes (empty without a fleet).
    pub fleet: FleetCounts,
    /// The moment the limiter's milliseconds count from: the first time it was asked (every shard
    /// passes its own reading of one monotonic clock).
    origin: OnceLock<Instant>,
}

impl Shared {
    /// Shared state for a server relaying from `relays` (bound and advertised address of each) and
    /// listening on `listening` too.
    pub fn new(
        relays: impl IntoIterator<Item = (IpAddr, IpAddr)>,
        listening: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        Self { live_relays: LiveRelays::new(relays, listening), ..Self::default() }
    }

    fn millis(&self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
    }
}

/// A user's allocations on the other nodes of a fleet, as this node last heard (from Redis), and the
/// way this node's own changes reach the fleet thread. The user quota counts both; without a fleet
/// both are idle.
#[derive(Debug, Default)]
pub struct FleetCounts {
    /// Whether a fleet is configured (else nothing below is touched).
    enabled: AtomicBool,
    /// Per user: allocations on other live nodes.
    others: RwLock<HashMap<Box<[u8]>, u32>>,
    /// This node's changes, for the fleet thread (never blocks: a full queue is a resync).
    changes: OnceLock<crossbeam_channel::Sender<(Box<[u8]>, i32)>>,
    /// Set when a change could not be queued: the fleet thread publishes all counts again.
    lost_changes: AtomicBool,
}

impl FleetCounts {
    /// Turns the fleet on; this node's changes go to `changes`.
    pub fn enable(&self, changes: crossbeam_channel::Sender<(Box<[u8]>, i32)>) {
        let _ = self.changes.set(changes);
        self.enabled.store(true, AtomicOrdering::Release);
    }

    /// Replaces the other nodes' counts.
    pub fn set_others(&self, others: HashMap<Box<[u8]>, u32>) {
        *self.others.write() = others;
    }

    /// `user`'s allocations on other nodes.
    pub fn others(&self, user: &[u8]) -> u32 {
        if !self.enabled.load(AtomicOrdering::Acquire) {
            return 0;
        }
        self.others.read().get(user).copied().unwrap_or(0)
    }

    /// Whether changes were lost since the last call (the fleet thread then republishes everything).
    pub fn take_lost(&self) -> bool {
        self.lost_changes.swap(false, AtomicOrdering::AcqRel)
    }

    fn changed(&self, user: &[u8], delta: i32) {
        if !self.enabled.load(AtomicOrdering::Acquire) {
            return;
        }
        if let Some(tx) = self.changes.get()
            && tx.try_send((user.into(), delta)).is_err()
        {
            self.lost_changes.store(true, AtomicOrdering::Release);
        }
    }
}

impl Cluster for Shared {
    fn acquire(&self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError> {
        // A fleet-wide user quota: what the other nodes hold leaves less for this one.
        let others = self.fleet.others(user);
        let limits = match limits.user {
            0 => limits,
            quota if others >= quota => return Err(QuotaError::User),
            quota => QuotaLimits { user: quota - others, ..limits },
        };
        self.quotas.try_acquire(user, limits, reserve)?;
        self.fleet.changed(user, 1);
        Ok(())
    }

    fn release(&self, user: &[u8]) {
        self.quotas.give_back(user, false);
        self.fleet.changed(user, -1);
    }

    fn release_reservation(&self, user: &[u8]) {
        self.quotas.give_back(user, true);
    }

    fn restore_reservation(&self, user: &[u8]) {
        self.quotas.total.fetch_add(1, Ordering::AcqRel);
        self.quotas.book(user).restore_reservation(user);
    }

    fn redeem_reservation(&self, user: &[u8]) {
        self.quotas.book(user).redeem_reservation(user);
    }

    fn hold_reservation(&self, token: [u8; 8], reservation: Reservation) {
        self.reservations.lock().hold(token, reservation);
    }

    fn claim_reservation(&self, token: [u8; 8], now: Instant) -> Option<Reservation> {
        self.reservations.lock().claim(token, now)
    }

    fn lapse_reservation(&self, token: [u8; 8], now: Instant) -> Option<Reservation> {
        self.reservations.lock().lapse(token, now)
    }

    fn relay_opened(&self, bound: SocketAddr) {
        self.live_relays.insert(bound);
    }

    fn relay_closed(&self, bound: SocketAddr) {
        self.live_relays.remove(bound);
    }

    fn is_own_address(&self, ip: IpAddr) -> bool {
        self.live_relays.is_own(ip)
    }

    fn is_live_relay(&self, addr: SocketAddr) -> bool {
        self.live_relays.contains(addr)
    }

    fn answer_unauthenticated(&self, source: IpAddr, now: Instant, rate: u64, burst: u64) -> bool {
        self.unauth.allow(source, self.millis(now), rate, burst)
    }

    fn unauthenticated_flood(&self, now: Instant) -> bool {
        self.unauth.flooded(self.millis(now))
    }

    fn revoked(&self, user: &[u8], now_unix: u64) -> bool {
        self.operator.is_revoked(user, now_unix)
    }

    fn admission(&self) -> Admission {
        self.operator.admission()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QuotaLimits = QuotaLimits { user: 2, total: 3, user_reservations: 1 };

    #[test]
    fn quotas_refuse_at_exactly_the_limit_and_free_up() {
        let q = Quotas::default();
        assert!(q.try_acquire(b"alice", LIMITS, false).is_ok());
        assert!(q.try_acquire(b"alice", LIMITS, false).is_ok());
        assert_eq!(q.try_acquire(b"alice", LIMITS, false), Err(QuotaError::User));
        assert!(q.try_acquire(b"bob", LIMITS, false).is_ok());
        assert_eq!(q.try_acquire(b"carol", LIMITS, false), Err(QuotaError::Total));
        q.give_back(b"alice", false);
        assert!(q.try_acquire(b"carol", LIMITS, false).is_ok());
        assert_eq!(q.total(), 3);
        // A refused reservation leaves the total as it was; a lapsed one frees a unit of it.
        assert_eq!(q.try_acquire(b"dave", QuotaLimits { total: 0, ..LIMITS }, true).map(|()| q.total()), Ok(5));
        q.give_back(b"dave", true);
        q.give_back(b"dave", false);
        assert_eq!((q.total(), q.held_by(b"dave")), (3, 0));
        q.give_back(b"nobody", false);
        assert_eq!(q.total(), 3, "releasing what nobody holds changes nothing");
    }
}
