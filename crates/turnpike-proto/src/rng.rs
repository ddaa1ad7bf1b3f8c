//! Randomness. What an attacker must not guess (the order and choice of relay ports, RESERVATION-TOKEN
//! values) comes from [`Unpredictable`]: HMAC-SHA1 of a counter under a key the host draws from the
//! operating system's generator (`getrandom`), so the core stays free of I/O and, given its seed,
//! reproducible (fuzzing). What only needs spreading (transaction IDs of Data indications, sent on
//! the relay path per datagram) comes from [`XorShift`], seeded from it.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// A keyed pseudo-random generator: block `i` is HMAC-SHA1(key, i). Without the key, its output
/// cannot be predicted from earlier output (HMAC is a pseudo-random function).
#[derive(Clone)]
pub(crate) struct Unpredictable {
    mac: Hmac<Sha1>,
    counter: u64,
    block: [u8; 20],
    used: usize,
}

impl std::fmt::Debug for Unpredictable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Unpredictable { .. }")
    }
}

impl Unpredictable {
    /// A generator keyed by `seed` (32 bytes from the OS) for the purpose `domain` (one seed serves
    /// several generators whose outputs must not coincide).
    pub(crate) fn new(seed: &[u8; 32], domain: &str) -> Self {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail; the fallback keeps this
        // free of a panic path all the same.
        let mac =
            <Hmac<Sha1> as Mac>::new_from_slice(seed).unwrap_or_else(|_| <Hmac<Sha1> as Mac>::new(&Default::default()));
        let mut me = Self { mac, counter: 0, block: [0; 20], used: 20 };
        me.mac.update(domain.as_bytes());
        me
    }

    /// The next 64 unpredictable bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        if self.used + 8 > self.block.len() {
            let mut mac = self.mac.clone();
            mac.update(&self.counter.to_be_bytes());
            self.block.copy_from_slice(&mac.finalize().into_bytes());
            self.counter += 1;
            self.used = 0;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.block[self.used..self.used + 8]);
        self.used += 8;
        u64::from_be_bytes(word)
    }

    /// An index below `n` (0 when `n` is 0); the modulo bias is below 2^-47 for the n (at most 65,536) used.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// xorshift64* state: fast, and predictable from its output; only for values nobody needs to guess.
#[derive(Debug, Clone)]
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; the state is never zero).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next 64 pseudo-random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_outputs_differ_by_key_and_domain_and_spread() {
        let mut a = Unpredictable::new(&[1; 32], "ports");
        let mut b = Unpredictable::new(&[2; 32], "ports");
        let mut c = Unpredictable::new(&[1; 32], "tokens");
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert_ne!(xs, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..8).map(|_| c.next_u64()).collect::<Vec<_>>());
        // The same key and domain give the same sequence (reproducible fuzzing).
        let mut again = Unpredictable::new(&[1; 32], "ports");
        assert_eq!(xs, (0..8).map(|_| again.next_u64()).collect::<Vec<_>>());
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            hits[a.below(10)] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    }
}
