//! Stateless, time-limited nonces: `hex(expiry) || hex(HMAC(key, expiry || client IP)[..8])`.
//! Nothing is stored per client; any shard can check a nonce any other shard issued.

use crate::integrity::HmacKey;
use std::net::IpAddr;

/// Length of a nonce: 16 hex digits of expiry + 16 hex digits of MAC.
pub(crate) const NONCE_LEN: usize = 32;

/// The secret that signs nonces; random per process (nonces die with a restart and clients get 438).
#[derive(Clone)]
pub struct NonceKey(HmacKey);

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

/// Result of checking a nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceCheck {
    /// Issued by us, for this client, and unexpired.
    Valid,
    /// Issued by us but expired, or not ours at all: answer 438 with a fresh one.
    Stale,
}

fn hex_digit(v: u8) -> u8 {
    b"0123456789abcdef"[usize::from(v & 0x0F)]
}

fn from_hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl NonceKey {
    /// A key from 32 bytes of randomness.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(HmacKey::new(&bytes))
    }

    fn mac(&self, expiry: u64, ip: IpAddr) -> [u8; 20] {
        let ip_bytes: [u8; 16] = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        self.0.mac(&[&expiry.to_be_bytes(), &ip_bytes])
    }

    /// Mints a nonce for `client` valid until `expiry` (unix seconds).
    pub fn mint(&self, expiry: u64, client: IpAddr) -> [u8; NONCE_LEN] {
        let mut out = [0u8; NONCE_LEN];
        for (i, b) in expiry.to_be_bytes().iter().enumerate() {
            out[2 * i] = hex_digit(b >> 4);
            out[2 * i + 1] = hex_digit(*b);
        }
        let mac = self.mac(expiry, client);
        for (i, b) in mac[..8].iter().enumerate() {
            out[16 + 2 * i] = hex_digit(b >> 4);
            out[16 + 2 * i + 1] = hex_digit(*b);
        }
        out
    }

    /// Checks a nonce a client sent back, at `now` (unix seconds).
    pub fn check(&self, nonce: &[u8], client: IpAddr, now: u64) -> NonceCheck {
        let Ok(nonce) = <&[u8; NONCE_LEN]>::try_from(nonce) else {
            return NonceCheck::Stale;
        };
        let mut raw = [0u8; 16];
        for (i, pair) in nonce.chunks_exact(2).enumerate() {
            match (from_hex(pair[0]), from_hex(pair[1])) {
                (Some(h), Some(l)) => raw[i] = (h << 4) | l,
                _ => return NonceCheck::Stale,
            }
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&raw[..8]);
        let expiry = u64::from_be_bytes(exp);
        let mac = self.mac(expiry, client);
        // Constant-time comparison of the truncated MAC.
        let diff = mac[..8].iter().zip(&raw[8..]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 || expiry < now { NonceCheck::Stale } else { NonceCheck::Valid }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_check() {
        let key = NonceKey::new([7; 32]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let n = key.mint(1000, ip);
        assert_eq!(key.check(&n, ip, 999), NonceCheck::Valid);
        assert_eq!(key.check(&n, ip, 1000), NonceCheck::Valid);
        assert_eq!(key.check(&n, ip, 1001), NonceCheck::Stale);
        assert_eq!(key.check(&n, "192.0.2.2".parse().unwrap(), 999), NonceCheck::Stale);
        assert_eq!(NonceKey::new([8; 32]).check(&n, ip, 999), NonceCheck::Stale);
        let mut forged = n;
        forged[15] = if forged[15] == b'f' { b'e' } else { b'f' };
        assert_eq!(key.check(&forged, ip, 999), NonceCheck::Stale);
        assert_eq!(key.check(b"short", ip, 0), NonceCheck::Stale);
    }
}
