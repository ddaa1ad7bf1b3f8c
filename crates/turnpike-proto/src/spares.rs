//! Relay sockets kept open between allocations.
//!
//! Setting up an allocation's relay socket costs four system calls (socket, setsockopt, bind,
//! epoll_ctl) and deleting it a close, which together are about a third of what a server spends per
//! Allocate and delete. A deleted allocation's socket is instead parked: still bound and watched (what
//! arrives on it is read and dropped), out of service, for a later allocation to take over: one
//! `epoll_ctl` when it is parked and one when it is taken over, each only changing its token.
//!
//! RFC 8656 §7.2 foresees servers that "pre-allocate a number of ports from the underlying OS and then
//! later assign them to allocations", and recommends that the assignment be randomised (RFC 6056): a
//! spare is taken at random among the older half of the pool, and only while at least [`MIN_CHOICE`]
//! are parked, so the port a deleted allocation leaves does not predict the next allocation's, and a
//! freed relayed address is not handed out again before as many allocations as half the pool (a peer of
//! the old allocation that goes on sending for a while meets a socket that drops what it sends, not a
//! new owner). The pool is bounded, so idle spares hold a small part of the range.

use crate::rng::Unpredictable;
use std::collections::VecDeque;
use std::net::IpAddr;

/// Spares are handed out only while at least this many are parked (or no fresh port is left): each
/// Allocate then gets one of at least this many ports, at random.
pub(crate) const MIN_CHOICE: usize = 8;
/// At most this many spares per shard...
pub(crate) const MAX_SPARES: usize = 1024;
/// ...and at most this share of the shard's ports (one in eight), so spares never crowd out EVEN-PORT
/// pairs and fresh ports.
pub(crate) const RANGE_SHARE: usize = 8;

/// How many relay sockets shards holding `ports` relay ports between them keep open as spares at
/// most (the host budgets file descriptors for them).
pub fn spares_at_most(ports: u64) -> u64 {
    ports / RANGE_SHARE as u64
}
/// Entries looked at for a spare on the wanted address (several relay addresses of a family).
const SCAN: usize = 8;

/// A parked relay socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spare {
    /// The shard's id for the parked socket (see [`crate::engine::RelaySockets::park`]).
    pub id: u32,
    /// The address it is bound to.
    pub ip: IpAddr,
    /// The port it is bound to.
    pub port: u16,
}

/// The parked relay sockets of one shard, oldest first.
#[derive(Debug, Clone)]
pub(crate) struct SparePool {
    spares: VecDeque<Spare>,
    cap: usize,
}

impl SparePool {
    /// A pool for a shard owning `ports` relay ports.
    pub(crate) fn new(ports: usize) -> Self {
        Self { spares: VecDeque::new(), cap: (ports / RANGE_SHARE).min(MAX_SPARES) }
    }

    /// Spares parked now.
    pub(crate) fn len(&self) -> usize {
        self.spares.len()
    }

    /// Whether another socket may be parked.
    pub(crate) fn has_room(&self) -> bool {
        self.spares.len() < self.cap
    }

    /// Records a parked socket (the caller checked [`SparePool::has_room`]).
    pub(crate) fn put(&mut self, spare: Spare) {
        self.spares.push_back(spare);
    }

    /// Takes a spare bound to `ip` at random among the older half of the pool, when at least
    /// [`MIN_CHOICE`] are parked or `no_fresh_port`.
    pub(crate) fn take(&mut self, ip: IpAddr, no_fresh_port: bool, rng: &mut Unpredictable) -> Option<Spare> {
        let n = self.spares.len();
        if n == 0 || (n < MIN_CHOICE && !no_fresh_port) {
            return None;
        }
        let older = n.div_ceil(2);
        let start = rng.below(older);
        let at = (0..SCAN.min(older)).map(|k| (start + k) % older).find(|&i| self.spares[i].ip == ip)?;
        // The oldest takes the taken one's place: still in the older half, so the order is kept enough.
        self.spares.swap_remove_front(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spare(id: u32, port: u16) -> Spare {
        Spare { id, ip: "192.0.2.1".parse().unwrap(), port }
    }

    #[test]
    fn bounded_by_share_of_range_and_maximum() {
        assert_eq!(SparePool::new(800).cap, 100);
        assert_eq!(SparePool::new(20_000).cap, MAX_SPARES);
        assert_eq!(SparePool::new(7).cap, 0);
        let mut pool = SparePool::new(16);
        assert!(pool.has_room());
        pool.put(spare(0, 1));
        pool.put(spare(1, 2));
        assert!(!pool.has_room());
    }

    #[test]
    fn hands_out_only_from_enough_unless_no_fresh_port() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut rng = Unpredictable::new(&[5; 32], "test");
        let mut pool = SparePool::new(1000);
        for i in 0..MIN_CHOICE as u32 - 1 {
            pool.put(spare(i, 100 + i as u16));
        }
        assert_eq!(pool.take(ip, false, &mut rng), None, "too few to choose from");
        assert!(pool.take(ip, true, &mut rng).is_some(), "no fresh port left: a spare is better than 508");
        pool.put(spare(50, 150));
        pool.put(spare(51, 151));
        assert!(pool.take(ip, false, &mut rng).is_some());
        assert_eq!(pool.take("192.0.2.2".parse().unwrap(), true, &mut rng), None, "another address");
    }

    /// The spare a deletion has just parked is not handed out before half the pool.
    #[test]
    fn the_newest_spares_wait() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for seed in 1..40 {
            let mut rng = Unpredictable::new(&[seed; 32], "test");
            let mut pool = SparePool::new(8000);
            for i in 0..100u32 {
                pool.put(spare(i, 1000 + i as u16));
            }
            pool.put(spare(999, 9999));
            for _ in 0..50 {
                let taken = pool.take(ip, false, &mut rng).unwrap();
                assert_ne!(taken.id, 999, "seed {seed}: the newest spare went out with 100 older ones parked");
            }
        }
    }

    #[test]
    fn the_choice_is_spread_over_the_pool() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut rng = Unpredictable::new(&[9; 32], "test");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut pool = SparePool::new(1000);
            for i in 0..32u32 {
                pool.put(spare(i, 1000 + i as u16));
            }
            seen.insert(pool.take(ip, false, &mut rng).map(|s| s.port));
        }
        assert!(seen.len() >= 12, "only {} different ports over 200 choices among the older 16", seen.len());
    }
}
