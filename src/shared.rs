//! What the shards of one node share, written on allocation create and delete (never per packet):
//! quota counters, outstanding RESERVATION-TOKENs, the relayed addresses in use, the budget of
//! unauthenticated answers and of connections without an allocation. [`Shared`] is the single-host
//! [`Cluster`] the engines ask.

use crate::admission::ConnBudget;
use parking_lot::Mutex;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use turnpike_proto::Cluster;
use turnpike_proto::cluster::{
    LiveRelays, QuotaBook, QuotaError, QuotaLimits, Reservation, ReservationBook, UnauthLimiter,
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

impl Cluster for Shared {
    fn acquire(&self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError> {
        self.quotas.try_acquire(user, limits, reserve)
    }

    fn release(&self, user: &[u8]) {
        self.quotas.give_back(user, false);
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
