//! The limiter of answers to unauthenticated requests (401, 438, Binding) a node's engines share: one
//! budget per source for the whole server, whatever the number of shards, and one per prefix.
//! Lock-free (atomic words); time is passed in.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many times a single source's budget a whole /24 (IPv6 /56) gets: a spoofer spreading over a
/// victim's network reflects at most this much more at it than from one address.
pub const PREFIX_SHARE: u64 = 4;

/// Answers to unauthenticated requests, budgeted per source ([`crate::policy::peer::source_key`]: an
/// IPv4 address, an IPv6 /64) and per /24 (IPv6 /56) prefix,
/// node-wide: one budget per source whatever the number of shards. A fixed table of token buckets,
/// each one atomic word updated by compare-and-swap (no lock); a source whose slot is taken over by
/// another starts afresh (a spoofer gains at most a full burst).
#[derive(Debug)]
pub struct UnauthLimiter {
    slots: Box<[AtomicU64]>,
    hasher: RandomState,
    /// When (milliseconds, the caller's clock) an answer was last refused.
    last_refusal_ms: AtomicU64,
}

/// Slots of [`UnauthLimiter`] (128 KiB).
const UNAUTH_SLOTS: usize = 16_384;
/// How long after a refusal the server counts as under a flood of unauthenticated requests.
const FLOOD_HOLD_MS: u64 = 2_000;

/// One bucket in a word: the owner's tag (16 bits), tokens (16 bits), time of the last refill
/// (milliseconds, 32 bits, wrapping).
#[derive(Clone, Copy)]
struct PackedBucket {
    tag: u16,
    tokens: u16,
    stamp: u32,
}

impl PackedBucket {
    fn unpack(word: u64) -> Self {
        Self { tag: (word >> 48) as u16, tokens: (word >> 32) as u16, stamp: word as u32 }
    }

    fn pack(self) -> u64 {
        u64::from(self.tag) << 48 | u64::from(self.tokens) << 32 | u64::from(self.stamp)
    }

    /// Adds what `rate` per second accrued since the stamp (up to `burst`), advancing the stamp only
    /// by the time that produced whole tokens. Shards read the clock once per wake-up, so one may
    /// charge a bucket with a time a little before the stamp another wrote: that is no time at all, not
    /// a wrap-around of 49 days (which would refill the bucket).
    fn refill(&mut self, now_ms: u32, rate: u64, burst: u16) {
        let elapsed = now_ms.wrapping_sub(self.stamp);
        if elapsed == 0 || elapsed > u32::MAX / 2 {
            return;
        }
        let elapsed = u64::from(elapsed);
        let add = elapsed.saturating_mul(rate) / 1000;
        if add == 0 {
            return;
        }
        let tokens = (u64::from(self.tokens) + add).min(u64::from(burst));
        self.tokens = tokens as u16;
        self.stamp = if self.tokens == burst { now_ms } else { self.stamp.wrapping_add((add * 1000 / rate) as u32) };
    }
}

impl Default for UnauthLimiter {
    fn default() -> Self {
        Self {
            slots: (0..UNAUTH_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            last_refusal_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl UnauthLimiter {
    /// Whether an answer to an unauthenticated request from `ip` may go out at `now_ms`: the source
    /// may send `rate` per second with bursts of `burst`, its prefix [`PREFIX_SHARE`] times that. A
    /// rate of 0 disables limiting.
    pub fn allow(&self, ip: IpAddr, now_ms: u64, rate: u64, burst: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let source = crate::policy::peer::source_key(ip);
        let prefix = match crate::policy::peer::canonical(ip) {
            IpAddr::V4(v4) => u128::from(v4.to_bits() >> 8),
            IpAddr::V6(v6) => (v6.to_bits() >> 72) | 1 << 127,
        };
        let ok = self.take(0, source, now_ms, rate, burst)
            && self.take(1, prefix, now_ms, rate.saturating_mul(PREFIX_SHARE), burst.saturating_mul(PREFIX_SHARE));
        if !ok {
            self.last_refusal_ms.store(now_ms, Ordering::Relaxed);
        }
        ok
    }

    /// Whether an answer was refused within the last two seconds: the server is under a flood of
    /// unauthenticated requests.
    pub fn flooded(&self, now_ms: u64) -> bool {
        let last = self.last_refusal_ms.load(Ordering::Relaxed);
        last != u64::MAX && now_ms.saturating_sub(last) < FLOOD_HOLD_MS
    }

    /// Takes a token from `key`'s bucket in `half` of the table (sources and prefixes apart, so that a
    /// source and its own prefix never take each other's slot over).
    fn take(&self, half: usize, key: u128, now_ms: u64, rate: u64, burst: u64) -> bool {
        let hash = self.hasher.hash_one(key);
        let per_half = self.slots.len() / 2;
        let slot = &self.slots[half * per_half + (hash as usize) % per_half];
        let tag = (hash >> 48) as u16;
        let burst = u16::try_from(burst.max(1)).unwrap_or(u16::MAX);
        let now = now_ms as u32;
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let mut bucket = PackedBucket::unpack(current);
            if bucket.tag != tag || current == 0 {
                bucket = PackedBucket { tag, tokens: burst, stamp: now };
            } else {
                bucket.refill(now, rate, burst);
            }
            let ok = bucket.tokens > 0;
            bucket.tokens = bucket.tokens.saturating_sub(1);
            match slot.compare_exchange_weak(current, bucket.pack(), Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return ok,
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauth_limiter_is_per_source_and_per_prefix() {
        let l = UnauthLimiter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| l.allow(a, 0, 5, 10)).count();
        assert_eq!(allowed, 10);
        assert!(l.flooded(0) && l.flooded(1_999) && !l.flooded(2_000));
        assert!(!l.allow("::ffff:192.0.2.1".parse().unwrap(), 0, 5, 10), "however the source is spelled");
        // One token per 200 ms comes back.
        assert!(l.allow(a, 200, 5, 10));
        assert!(!l.allow(a, 200, 5, 10));
        // Spread over its /24, a spoofer gets the prefix's budget (four sources' worth), not 256.
        let spread = (0..=255u8).filter(|&k| l.allow(IpAddr::from([198, 51, 100, k]), 0, 5, 10)).count();
        assert_eq!(spread, 40);
        // Another prefix is unaffected; thousands of sources fit in the fixed table.
        assert!(l.allow("203.0.113.1".parse().unwrap(), 0, 5, 10));
        for i in 0..50_000u32 {
            let _ = l.allow(IpAddr::from(i.to_be_bytes()), 0, 5, 10);
        }
        assert_eq!(l.slots.len(), UNAUTH_SLOTS);
        // Rate 0: unlimited.
        assert!((0..1000).all(|_| l.allow(a, 0, 0, 0)));
        // An IPv6 /64 is one source.
        let b: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        assert_eq!((0..100).filter(|_| l.allow(b, 0, 5, 10)).count(), 10);
        assert!(!l.allow("2001:db8:1:2::ffff".parse().unwrap(), 0, 5, 10));
    }

    /// Shards charge the same bucket with times read at their own wake-ups: one a little behind
    /// another's is no time at all, not a refill.
    #[test]
    fn unauth_limiter_ignores_a_clock_a_little_behind() {
        let l = UnauthLimiter::default();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!((0..20).filter(|_| l.allow(a, 5_000, 5, 10)).count(), 10);
        assert!(!l.allow(a, 4_999, 5, 10), "a shard 1 ms behind");
        assert!(!l.allow(a, 4_990, 5, 10));
        assert!(l.allow(a, 5_200, 5, 10), "time moving on still refills");
    }

    #[test]
    fn unauth_limiter_accrues_slow_rates_over_time() {
        let l = UnauthLimiter::default();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let got = (0..=10_000u64).step_by(10).filter(|&ms| l.allow(a, ms, 3, 1)).count();
        assert!((30..=32).contains(&got), "{got}");
    }
}
