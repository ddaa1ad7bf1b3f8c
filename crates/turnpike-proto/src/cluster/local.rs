//! A [`Cluster`] for one process with few engines: tests, fuzzing and tools (feature `local-cluster`;
//! the core itself takes no lock, this does). Quotas and reservations sit behind `std` mutexes; the
//! counts can be read back.

use super::{Cluster, LiveRelays, QuotaBook, QuotaError, QuotaLimits, Reservation, ReservationBook, UnauthLimiter};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// The per-user book and the total.
#[derive(Debug, Default)]
struct Quotas {
    book: QuotaBook,
    total: u32,
}

/// A single-process [`Cluster`] (see the module documentation).
#[derive(Debug, Default)]
pub struct LocalCluster {
    quotas: Mutex<Quotas>,
    reservations: Mutex<ReservationBook>,
    live: LiveRelays,
    unauth: UnauthLimiter,
    origin: OnceLock<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LocalCluster {
    /// Relaying from `relays` (bound, advertised), listening on `listening` too.
    pub fn new(
        relays: impl IntoIterator<Item = (IpAddr, IpAddr)>,
        listening: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        Self { live: LiveRelays::new(relays, listening), ..Self::default() }
    }

    /// Quota units counted in total.
    pub fn total(&self) -> u32 {
        lock(&self.quotas).total
    }

    /// Quota units `user` holds.
    pub fn held_by(&self, user: &[u8]) -> u32 {
        lock(&self.quotas).book.held_by(user)
    }

    /// Outstanding reservations.
    pub fn reservations(&self) -> usize {
        lock(&self.reservations).len()
    }

    fn millis(&self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
    }

    fn give_back(&self, user: &[u8], reservation: bool) {
        let mut q = lock(&self.quotas);
        if q.book.release(user, reservation) {
            q.total = q.total.saturating_sub(1);
        }
    }
}

impl Cluster for LocalCluster {
    fn acquire(&self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError> {
        let mut q = lock(&self.quotas);
        let units = 1 + u32::from(reserve);
        if limits.total > 0 && q.total.saturating_add(units) > limits.total {
            return Err(QuotaError::Total);
        }
        q.book.acquire(user, limits, reserve)?;
        q.total += units;
        Ok(())
    }
    fn release(&self, user: &[u8]) {
        self.give_back(user, false);
    }
    fn release_reservation(&self, user: &[u8]) {
        self.give_back(user, true);
    }
    fn restore_reservation(&self, user: &[u8]) {
        let mut q = lock(&self.quotas);
        q.book.restore_reservation(user);
        q.total += 1;
    }
    fn redeem_reservation(&self, user: &[u8]) {
        lock(&self.quotas).book.redeem_reservation(user);
    }
    fn hold_reservation(&self, token: [u8; 8], reservation: Reservation) {
        lock(&self.reservations).hold(token, reservation);
    }
    fn claim_reservation(&self, token: [u8; 8], now: Instant) -> Option<Reservation> {
        lock(&self.reservations).claim(token, now)
    }
    fn lapse_reservation(&self, token: [u8; 8], now: Instant) -> Option<Reservation> {
        lock(&self.reservations).lapse(token, now)
    }
    fn relay_opened(&self, bound: SocketAddr) {
        self.live.insert(bound);
    }
    fn relay_closed(&self, bound: SocketAddr) {
        self.live.remove(bound);
    }
    fn is_own_address(&self, ip: IpAddr) -> bool {
        self.live.is_own(ip)
    }
    fn is_live_relay(&self, addr: SocketAddr) -> bool {
        self.live.contains(addr)
    }
    fn answer_unauthenticated(&self, source: IpAddr, now: Instant, rate: u64, burst: u64) -> bool {
        self.unauth.allow(source, self.millis(now), rate, burst)
    }
    fn unauthenticated_flood(&self, now: Instant) -> bool {
        self.unauth.flooded(self.millis(now))
    }
}
