//! State shared between shards, written on allocation create/delete only (never per packet):
//! the 5-tuple directory, quota counters, the relayed addresses in use, and per-shard statistics blocks
//! that only their shard writes.

use crate::proto::DropReason;
use crate::proto::allocation::FiveTuple;
use crate::proto::ports::{PORT_WORDS, port_bit};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
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
    /// The user holds `user-quota` allocations (and reservations) already.
    User,
    /// The server holds `total-quota` allocations (and reservations) already.
    Total,
    /// The user holds `allocations.user_reservations` unredeemed EVEN-PORT reservations already.
    Reservations,
}

/// The limits an Allocate is checked against (`user` and `total`: 0 = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Allocations plus reservations per user.
    pub user: u32,
    /// Allocations plus reservations in total.
    pub total: u32,
    /// Unredeemed reservations per user (0: none).
    pub user_reservations: u32,
}

/// What one user holds: quota units (an allocation or a reserved port each) and, among them, reservations.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    units: u32,
    reservations: u32,
}

/// Allocation counters per user and in total. A port reserved by EVEN-PORT with the R bit counts as
/// an allocation of the user who reserved it until it is redeemed (then it is the new allocation's
/// unit) or lapses: a reservation holds a relay port as an allocation does, so a user within quota
/// cannot hold more of the range than the quota says.
#[derive(Debug)]
pub struct Quotas {
    total: AtomicU32,
    users: Vec<Mutex<HashMap<Box<[u8]>, Held>>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self { total: AtomicU32::new(0), users: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl Quotas {
    /// Counts one more allocation for `user` and, with `reserve`, the port it reserves, unless that
    /// exceeds a limit.
    pub fn try_acquire(&self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError> {
        let units = 1 + u32::from(reserve);
        let prev = self.total.fetch_add(units, Ordering::AcqRel);
        if limits.total > 0 && prev.saturating_add(units) > limits.total {
            self.total.fetch_sub(units, Ordering::AcqRel);
            return Err(QuotaError::Total);
        }
        let mut map = self.users[stripe_of(&user)].lock();
        let held = map.get(user).copied().unwrap_or_default();
        let refused = if limits.user > 0 && held.units.saturating_add(units) > limits.user {
            Some(QuotaError::User)
        } else if reserve && held.reservations >= limits.user_reservations {
            Some(QuotaError::Reservations)
        } else {
            None
        };
        if let Some(why) = refused {
            drop(map);
            self.total.fetch_sub(units, Ordering::AcqRel);
            return Err(why);
        }
        let entry = map.entry(user.into()).or_default();
        entry.units += units;
        entry.reservations += u32::from(reserve);
        Ok(())
    }

    /// Releases one allocation of `user`.
    pub fn release(&self, user: &[u8]) {
        self.give_back(user, false);
    }

    /// Releases a reservation of `user` that lapsed or was not made after all.
    pub fn release_reservation(&self, user: &[u8]) {
        self.give_back(user, true);
    }

    /// Counts a reservation of `user` again, whatever the limits: one released for a redemption that
    /// was then refused.
    pub fn restore_reservation(&self, user: &[u8]) {
        self.total.fetch_add(1, Ordering::AcqRel);
        let mut map = self.users[stripe_of(&user)].lock();
        let entry = map.entry(user.into()).or_default();
        entry.units += 1;
        entry.reservations += 1;
    }

    /// A reservation of `user` was redeemed by an allocation of the same user: its unit becomes the
    /// allocation's.
    pub fn redeem_reservation(&self, user: &[u8]) {
        let mut map = self.users[stripe_of(&user)].lock();
        if let Some(held) = map.get_mut(user) {
            held.reservations = held.reservations.saturating_sub(1);
        }
    }

    fn give_back(&self, user: &[u8], reservation: bool) {
        let mut map = self.users[stripe_of(&user)].lock();
        let Some(held) = map.get_mut(user) else {
            return;
        };
        if held.units == 0 {
            return;
        }
        held.units -= 1;
        if reservation {
            held.reservations = held.reservations.saturating_sub(1);
        }
        if held.units == 0 {
            map.remove(user);
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    /// Allocations and reservations currently counted.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// The quota units (allocations plus reservations) `user` holds.
    pub fn held_by(&self, user: &[u8]) -> u32 {
        self.users[stripe_of(&user)].lock().get(user).map_or(0, |h| h.units)
    }
}

/// One relay address and which of its ports are relayed addresses of live allocations.
#[derive(Debug)]
struct RelayPorts {
    bind: IpAddr,
    advertised: IpAddr,
    live: Box<[AtomicU64]>,
}

/// This server's own addresses, and the relayed transport addresses of live allocations, node-wide:
/// a bitmap of ports per relay address (8 KiB each), set when an allocation is created and cleared
/// when it is deleted, by the shard that owns it. It tells which of this server's own addresses a
/// client may reach through the relay (client -> TURN -> TURN -> client calls): only live relayed
/// addresses, never another program bound on the host. A lookup is a relaxed load, without a lock.
#[derive(Debug, Default)]
pub struct LiveRelays {
    addrs: Vec<RelayPorts>,
    /// Every address of this server: relay (bound and advertised) and listening ones.
    own: Vec<IpAddr>,
}

impl LiveRelays {
    /// The relay addresses, each as the address sockets bind and the one clients are told, and the
    /// other addresses the server listens on. Unspecified addresses are left out.
    pub fn new(
        relays: impl IntoIterator<Item = (IpAddr, IpAddr)>,
        listening: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        let mut addrs: Vec<RelayPorts> = Vec::new();
        let mut own = Vec::new();
        for (bind, advertised) in relays {
            if bind.is_unspecified() || addrs.iter().any(|a| a.bind == bind) {
                continue;
            }
            let live = (0..PORT_WORDS).map(|_| AtomicU64::new(0)).collect();
            addrs.push(RelayPorts { bind, advertised, live });
            own.extend([bind, advertised]);
        }
        own.extend(listening);
        own.retain(|ip| !ip.is_unspecified());
        own.sort_unstable();
        own.dedup();
        Self { addrs, own }
    }

    /// Whether `ip` (however spelled) is one of this server's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.own.contains(&crate::policy::peer::canonical(ip))
    }

    fn word(&self, bound: SocketAddr) -> Option<(&AtomicU64, u64)> {
        let entry = self.addrs.iter().find(|a| a.bind == bound.ip())?;
        let (word, bit) = port_bit(bound.port());
        Some((entry.live.get(word)?, bit))
    }

    /// A relay socket bound to `bound` now serves a live allocation.
    pub fn insert(&self, bound: SocketAddr) {
        if let Some((word, bit)) = self.word(bound) {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// The allocation the relay socket bound to `bound` served was deleted.
    pub fn remove(&self, bound: SocketAddr) {
        if let Some((word, bit)) = self.word(bound) {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Whether `addr` (however spelled, by its bound or advertised address) is the relayed address of
    /// a live allocation of this server.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = crate::policy::peer::canonical(addr.ip());
        let (word, bit) = port_bit(addr.port());
        self.addrs.iter().any(|a| {
            (a.bind == ip || a.advertised == ip)
                && a.live.get(word).is_some_and(|w| w.load(Ordering::Relaxed) & bit != 0)
        })
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
    /// TCP/TLS connections closed as soon as they were accepted, by [`crate::admission::Refusal`].
    pub connections_refused: [AtomicU64; crate::admission::Refusal::ALL.len()],
    /// Connections without an allocation closed early, by [`crate::admission::EarlyClose`]: to make
    /// room for a newcomer, or idle or old while pending connections were many.
    pub connections_closed_early: [AtomicU64; crate::admission::EarlyClose::ALL.len()],
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The reserved port (taken out of the reserving shard's pool).
    pub port: u16,
    /// When the reservation lapses.
    pub expires: std::time::Instant,
    /// The user it is counted against in [`Quotas`].
    pub holder: Box<[u8]>,
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
    /// The relayed addresses of live allocations.
    pub live_relays: LiveRelays,
    /// TCP/TLS connections without an allocation, and their limits.
    pub conns: crate::admission::ConnBudget,
    /// Answers to unauthenticated requests, per source and prefix.
    pub unauth: crate::policy::rate::UnauthLimiter,
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
        q.release(b"alice");
        assert!(q.try_acquire(b"carol", LIMITS, false).is_ok());
        assert_eq!(q.total(), 3);
    }

    #[test]
    fn a_reservation_counts_until_it_lapses_or_is_redeemed() {
        let q = Quotas::default();
        // An allocation with a reservation is two units.
        assert!(q.try_acquire(b"alice", LIMITS, true).is_ok());
        assert_eq!((q.held_by(b"alice"), q.total()), (2, 2));
        assert_eq!(q.try_acquire(b"alice", LIMITS, false), Err(QuotaError::User));
        // Deleting the allocation leaves the reservation counted.
        q.release(b"alice");
        assert_eq!((q.held_by(b"alice"), q.total()), (1, 1));
        // One reservation at a time (user_reservations 1), and the total counts it.
        let roomy = QuotaLimits { user: 0, total: 0, user_reservations: 1 };
        assert_eq!(q.try_acquire(b"alice", roomy, true), Err(QuotaError::Reservations));
        assert!(q.try_acquire(b"bob", LIMITS, false).is_ok());
        assert!(q.try_acquire(b"bob", LIMITS, false).is_ok());
        assert_eq!(q.try_acquire(b"carol", LIMITS, false), Err(QuotaError::Total));
        // Lapsing frees it.
        q.release_reservation(b"alice");
        assert_eq!((q.held_by(b"alice"), q.total()), (0, 2));
        // Redeemed by the same user, the unit becomes the allocation's and the reservation slot frees.
        assert!(q.try_acquire(b"dave", roomy, true).is_ok());
        q.redeem_reservation(b"dave");
        assert_eq!(q.held_by(b"dave"), 2);
        assert!(q.try_acquire(b"dave", roomy, true).is_ok());
        assert_eq!(q.held_by(b"dave"), 4);
    }

    #[test]
    fn live_relays_know_only_live_ports_however_spelled() {
        let bind: IpAddr = "127.0.0.1".parse().unwrap();
        let public: IpAddr = "203.0.113.9".parse().unwrap();
        let live = LiveRelays::new([(bind, public)], ["192.0.2.10".parse().unwrap()]);
        assert!(live.is_own(bind) && live.is_own(public) && live.is_own("::ffff:192.0.2.10".parse().unwrap()));
        assert!(!live.is_own("192.0.2.11".parse().unwrap()));
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let wildcard = LiveRelays::new([(any, any)], [any]);
        wildcard.insert(SocketAddr::new(any, 50_001));
        assert!(
            !wildcard.is_own(any) && !wildcard.contains(SocketAddr::new(any, 50_001)),
            "never the unspecified address"
        );
        let bound = SocketAddr::new(bind, 50_001);
        assert!(!live.contains(bound));
        live.insert(bound);
        assert!(live.contains(bound));
        assert!(live.contains("203.0.113.9:50001".parse().unwrap()), "by the advertised address");
        assert!(live.contains("[::ffff:127.0.0.1]:50001".parse().unwrap()), "IPv4-mapped");
        assert!(!live.contains("127.0.0.1:50002".parse().unwrap()), "another port");
        assert!(!live.contains("127.0.0.2:50001".parse().unwrap()), "another address");
        live.remove(bound);
        assert!(!live.contains(bound));
        // Unknown addresses are ignored.
        live.insert("10.0.0.1:1".parse().unwrap());
        assert!(!live.contains("10.0.0.1:1".parse().unwrap()));
    }
}
