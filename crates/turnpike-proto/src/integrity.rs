//! MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5), FINGERPRINT (CRC-32, §14.7) and the long-term
//! credential key (§9.2.2). MAC comparison is constant-time (`Mac::verify_slice`).

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

/// Length of an HMAC-SHA1 value.
pub const HMAC_SHA1_LEN: usize = 20;
/// XOR constant of FINGERPRINT ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554E;

type HmacSha1 = Hmac<Sha1>;

/// HMAC-SHA1 of the concatenation of `parts`.
pub fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; HMAC_SHA1_LEN] {
    HmacKey::new(key).mac(parts)
}

/// An HMAC-SHA1 key made ready once: the key's inner and outer SHA-1 blocks are hashed when it is made,
/// so each MAC with it costs two compression calls fewer than [`hmac_sha1`]. For keys used on every
/// request (the nonce key, REST API secrets).
#[derive(Clone)]
pub struct HmacKey(HmacSha1);

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(..)")
    }
}

impl HmacKey {
    /// Prepares `key` (any length).
    pub fn new(key: &[u8]) -> Self {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail; the fallback keeps this
        // free of panics all the same.
        Self(HmacSha1::new_from_slice(key).unwrap_or_else(|_| <HmacSha1 as Mac>::new(&Default::default())))
    }

    /// HMAC-SHA1 of the concatenation of `parts` under this key.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; HMAC_SHA1_LEN] {
        self.started(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC-SHA1 of the concatenation of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.started(parts).verify_slice(tag).is_ok()
    }

    fn started(&self, parts: &[&[u8]]) -> HmacSha1 {
        let mut mac = self.0.clone();
        for p in parts {
            mac.update(p);
        }
        mac
    }
}

/// A long-term key kept with an allocation for its later requests. Its `Debug` output hides the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeptKey(pub LongTermKey);

impl std::fmt::Debug for KeptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeptKey(..)")
    }
}

/// A long-term credential key together with its prepared HMAC form: a request's MESSAGE-INTEGRITY is
/// checked and its response signed with one preparation. Its `Debug` output hides the key.
#[derive(Clone)]
pub struct PreparedKey {
    raw: LongTermKey,
    hmac: HmacKey,
}

impl std::fmt::Debug for PreparedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedKey(..)")
    }
}

impl PreparedKey {
    /// Prepares `raw`.
    pub fn new(raw: LongTermKey) -> Self {
        Self { raw, hmac: HmacKey::new(&raw) }
    }

    /// The long-term key.
    pub fn raw(&self) -> &LongTermKey {
        &self.raw
    }

    /// The prepared HMAC key.
    pub(crate) fn hmac(&self) -> &HmacKey {
        &self.hmac
    }
}

/// CRC-32 of `bytes` XOR 0x5354554E, as FINGERPRINT carries it.
pub fn fingerprint(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes) ^ FINGERPRINT_XOR
}

/// Checks a FINGERPRINT value against the message bytes before it. The header's length field already
/// counts the FINGERPRINT attribute, as it must.
pub(crate) fn fingerprint_matches(before: &[u8], value: &[u8]) -> bool {
    value.len() == 4 && fingerprint(before).to_be_bytes() == value
}

/// A long-term credential key: MD5(username ":" realm ":" password) (RFC 8489 §9.2.2).
pub type LongTermKey = [u8; 16];

/// Computes the long-term credential key.
pub fn long_term_key(username: &[u8], realm: &[u8], password: &[u8]) -> LongTermKey {
    let mut h = Md5::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

/// Length of a TURN REST password: base64 of a 20-byte HMAC-SHA1.
pub const REST_PASSWORD_LEN: usize = 28;

/// The TURN REST API password for `username`: base64(HMAC-SHA1(secret, username)), written on the stack.
pub fn rest_password(secret: &[u8], username: &[u8]) -> [u8; REST_PASSWORD_LEN] {
    rest_password_with(&HmacKey::new(secret), username)
}

/// [`rest_password`] with the secret prepared once ([`HmacKey`]), as the server checks it.
pub(crate) fn rest_password_with(secret: &HmacKey, username: &[u8]) -> [u8; REST_PASSWORD_LEN] {
    use base64::Engine as _;
    let mac = secret.mac(&[username]);
    let mut out = [0u8; REST_PASSWORD_LEN];
    // 20 bytes always encode to exactly 28 base64 characters, so this cannot fail.
    let _ = base64::engine::general_purpose::STANDARD.encode_slice(mac, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_and_prepared_keys_do_not_print_their_bytes() {
        let raw = [0xAB; 16];
        assert_eq!(format!("{:?}", KeptKey(raw)), "KeptKey(..)");
        assert_eq!(format!("{:?}", PreparedKey::new(raw)), "PreparedKey(..)");
    }

    /// RFC 2202 test case 2 (HMAC-SHA1, key "Jefe"), with the prepared key used repeatedly: each MAC
    /// starts from the prepared state, never from the previous MAC's.
    #[test]
    fn prepared_key_matches_rfc_2202_every_time() {
        let expected = [
            0xef, 0xfc, 0xdf, 0x6a, 0xe5, 0xeb, 0x2f, 0xa2, 0xd2, 0x74, 0x16, 0xd5, 0xf1, 0x84, 0xdf, 0x9c, 0x25, 0x9a,
            0x7c, 0x79,
        ];
        let key = HmacKey::new(b"Jefe");
        for _ in 0..3 {
            assert_eq!(key.mac(&[b"what do ya want ", b"for nothing?"]), expected);
        }
        assert_eq!(hmac_sha1(b"Jefe", &[b"what do ya want for nothing?"]), expected);
    }

    /// The REST password from a prepared secret is the one clients compute from the plain secret.
    #[test]
    fn rest_password_with_prepared_secret_is_the_same() {
        let secret = HmacKey::new(b"north");
        for user in [&b"1700000000:alice"[..], b"1700000000:bob", b""] {
            assert_eq!(rest_password_with(&secret, user), rest_password(b"north", user));
        }
    }
}
