//! This shard's share of the relay port range, as a shuffled free list.
//!
//! Shards own port *pairs* `(2k, 2k+1)`, dealt round-robin, so every shard can satisfy EVEN-PORT with the
//! R bit (an even port plus the next one reserved), which a plain `port % shards` split cannot.

use crate::rng::Unpredictable;
use std::collections::VecDeque;

/// Which ports shard `shard` of `shards` owns in `min..=max`.
pub fn shard_ports(min: u16, max: u16, shard: usize, shards: usize) -> impl Iterator<Item = u16> {
    let shards = shards.max(1);
    (min..=max).filter(move |p| (usize::from(p / 2) - usize::from(min / 2)) % shards == shard)
}

/// Words of a bitmap with a bit for every port.
pub(crate) const PORT_WORDS: usize = 65_536 / 64;

/// Where `port`'s bit lies in a bitmap of [`PORT_WORDS`] words: the word and the bit's mask.
pub(crate) fn port_bit(port: u16) -> (usize, u64) {
    (usize::from(port / 64), 1 << (port % 64))
}

/// A pool of free relay ports.
#[derive(Debug, Clone)]
pub(crate) struct PortPool {
    free: VecDeque<u16>,
    /// Which ports are in `free` (a bit per port, 8 KiB): EVEN-PORT with R looks for an even port whose
    /// partner is free, which a scan of the list for every candidate would make quadratic in the range.
    is_free: Box<[u64]>,
    /// Shuffles the pool and places ports found busy.
    rng: Unpredictable,
}

impl PortPool {
    /// Builds a pool from `ports`, shuffled with a generator keyed by `seed` (from the OS) so relay ports
    /// cannot be predicted from the ones seen.
    pub(crate) fn new(ports: impl IntoIterator<Item = u16>, seed: &[u8; 32]) -> Self {
        let v: Vec<u16> = ports.into_iter().collect();
        let rng = Unpredictable::new(seed, "relay ports");
        let mut pool = Self { free: VecDeque::new(), is_free: vec![0; PORT_WORDS].into_boxed_slice(), rng };
        for port in v {
            if !pool.contains(port) {
                pool.mark(port, true);
                pool.free.push_back(port);
            }
        }
        for i in (1..pool.free.len()).rev() {
            let j = pool.rng.below(i + 1);
            pool.free.swap(i, j);
        }
        pool
    }

    /// Number of free ports.
    pub(crate) fn len(&self) -> usize {
        self.free.len()
    }

    /// Whether no port is free.
    pub(crate) fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    fn contains(&self, port: u16) -> bool {
        let (word, bit) = port_bit(port);
        self.is_free[word] & bit != 0
    }

    fn mark(&mut self, port: u16, free: bool) {
        let (word, bit) = port_bit(port);
        if free { self.is_free[word] |= bit } else { self.is_free[word] &= !bit }
    }

    /// Takes any free port.
    pub(crate) fn take(&mut self) -> Option<u16> {
        let port = self.free.pop_front()?;
        self.mark(port, false);
        Some(port)
    }

    /// Takes an even port (EVEN-PORT without the R bit). One pass over the list at most.
    pub(crate) fn take_even(&mut self) -> Option<u16> {
        let pos = self.free.iter().position(|&p| p % 2 == 0)?;
        let port = self.free.remove(pos)?;
        self.mark(port, false);
        Some(port)
    }

    /// Takes an even port and `port + 1` (EVEN-PORT's R bit). Two passes over the list at most,
    /// whatever the range.
    pub(crate) fn take_even_pair(&mut self) -> Option<(u16, u16)> {
        let pos = self.free.iter().position(|&p| p % 2 == 0 && p.checked_add(1).is_some_and(|n| self.contains(n)))?;
        let port = self.free.remove(pos)?;
        self.mark(port, false);
        let next = port + 1;
        if self.take_specific(next) {
            Some((port, next))
        } else {
            // Not reached: `next` was found free above.
            self.give_back(port);
            None
        }
    }

    /// Takes a specific port if it is free.
    pub(crate) fn take_specific(&mut self, port: u16) -> bool {
        if !self.contains(port) {
            return false;
        }
        match self.free.iter().position(|&p| p == port) {
            Some(pos) => {
                self.mark(port, false);
                self.free.remove(pos).is_some()
            }
            None => false,
        }
    }

    /// Returns a port to the back of the list, so it is reused as late as possible.
    pub(crate) fn give_back(&mut self, port: u16) {
        if !self.contains(port) {
            self.mark(port, true);
            self.free.push_back(port);
        }
    }

    /// Returns a port that could not be bound (another program holds it) to a random place in the list.
    ///
    /// At the back, ports found busy would gather into one run (each round of allocations pushes the
    /// busy ports it met behind the ports it frees, and the next pass pushes the whole run back again),
    /// and an Allocate, which tries a bounded number of ports, would fail with 508 on reaching the run
    /// while most of the range is free. Scattered, a run of busy ports is as rare as in the shuffled
    /// range. The port it displaces moves to the back, which only delays that port's reuse.
    pub(crate) fn set_aside(&mut self, port: u16) {
        if self.contains(port) {
            return;
        }
        self.mark(port, true);
        self.free.push_back(port);
        let last = self.free.len() - 1;
        let at = self.rng.below(self.free.len());
        self.free.swap(at, last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn shards_partition_the_range_in_pairs() {
        let all: Vec<Vec<u16>> = (0..3).map(|s| shard_ports(49152, 49171, s, 3).collect()).collect();
        let total: usize = all.iter().map(Vec::len).sum();
        assert_eq!(total, 20);
        let set: HashSet<u16> = all.iter().flatten().copied().collect();
        assert_eq!(set.len(), 20);
        assert_eq!(all[0][..4], [49152, 49153, 49158, 49159]);
        for ports in &all {
            assert!(ports.iter().any(|p| p % 2 == 0) && ports.iter().any(|p| p % 2 == 1));
        }
    }

    #[test]
    fn even_port_with_reservation_takes_a_pair() {
        let mut pool = PortPool::new(shard_ports(50000, 50009, 0, 1), &[7; 32]);
        let (p, next) = pool.take_even_pair().unwrap();
        assert_eq!(p % 2, 0);
        assert_eq!(next, p + 1);
        assert_eq!(pool.len(), 8);
        assert!(!pool.take_specific(p + 1));
    }

    proptest! {
        #[test]
        fn never_hands_out_a_port_twice(ops in proptest::collection::vec(0u8..5, 1..200), seed in any::<[u8; 32]>()) {
            let mut pool = PortPool::new(50000..50020, &seed);
            let mut out: HashSet<u16> = HashSet::new();
            for op in ops {
                match op {
                    0 => if let Some(p) = pool.take() { prop_assert!(out.insert(p)); },
                    1 => if let Some((p, n)) = pool.take_even_pair() {
                        prop_assert!(out.insert(p));
                        prop_assert!(out.insert(n));
                    },
                    2 => if let Some(&p) = out.iter().next() { out.remove(&p); pool.give_back(p); },
                    3 => if let Some(&p) = out.iter().next() { out.remove(&p); pool.set_aside(p); },
                    _ => if let Some(p) = pool.take_even() { prop_assert!(out.insert(p)); },
                }
                prop_assert_eq!(out.len() + pool.len(), 20);
                for p in 50000..50020u16 {
                    prop_assert_eq!(pool.contains(p), !out.contains(&p), "{}", p);
                }
            }
        }
    }
}
