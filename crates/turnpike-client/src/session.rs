//! The sans-IO side of a TURN client: requests built with the session's transaction IDs and
//! credentials, and the long-term credential exchange (RFC 8489 §9.2: a 401 brings the realm and
//! nonce, a 438 a fresh nonce).

use crate::message::Answer;
use std::net::SocketAddr;
use turnpike_proto::attr::{self, AttrType, PROTO_UDP};
use turnpike_proto::integrity::{LongTermKey, long_term_key, rest_password};
use turnpike_proto::{Class, Method, MsgWriter, TransactionId};

/// The largest message a session builds (a Send indication with a full-size datagram fits).
const MAX_MESSAGE: usize = 65_535 + 512;

/// Who the client is.
#[derive(Clone)]
pub struct Credentials {
    username: String,
    password: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    /// A static user (coturn's `user=name:password`).
    pub fn user(name: &str, password: &[u8]) -> Self {
        Self { username: name.to_string(), password: password.to_vec() }
    }

    /// TURN REST credentials minted from a shared secret as a homeserver does: the username is
    /// `expiry:name` (`expiry` in seconds since the Unix epoch), the password its HMAC under `secret`.
    pub fn rest(secret: &[u8], name: &str, expiry: u64) -> Self {
        let username = format!("{expiry}:{name}");
        let password = rest_password(secret, username.as_bytes()).to_vec();
        Self { username, password }
    }

    /// The username.
    pub fn username(&self) -> &str {
        &self.username
    }
}

/// One client's TURN session, without I/O: what to send, and what an answer teaches.
#[derive(Debug)]
pub struct Session {
    credentials: Credentials,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    key: LongTermKey,
    tid_prefix: u32,
    tid_count: u64,
    fingerprint: bool,
    /// Where messages are written before they are copied out at their length.
    scratch: Vec<u8>,
}

/// What to do after an answer (see [`Session::learn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The answer is final: a success, or an error that credentials do not change.
    Done,
    /// The session learned a realm or nonce: send the request again (built anew).
    Retry,
}

impl Session {
    /// A session for `credentials`. Transaction IDs start with `tid_prefix` (so that the sessions of
    /// one process, or of processes sharing a server, never reuse one) followed by a counter.
    pub fn new(credentials: Credentials, tid_prefix: u32) -> Self {
        Self {
            credentials,
            realm: Vec::new(),
            nonce: Vec::new(),
            key: [0; 16],
            tid_prefix,
            tid_count: 0,
            fingerprint: true,
            scratch: Vec::new(),
        }
    }

    /// The realm known in advance: the key is derived now (requests still wait for a nonce).
    pub fn with_realm(mut self, realm: &[u8]) -> Self {
        self.set_realm(realm);
        self
    }

    /// Requests without FINGERPRINT (the load generator's, for comparison with earlier runs).
    pub fn without_fingerprint(mut self) -> Self {
        self.fingerprint = false;
        self
    }

    /// Signs with `key` instead of the credentials' key (tests forge requests with a wrong one).
    pub fn with_key(mut self, key: LongTermKey) -> Self {
        self.key = key;
        self
    }

    fn set_realm(&mut self, realm: &[u8]) {
        self.realm = realm.to_vec();
        self.key = long_term_key(self.credentials.username.as_bytes(), realm, &self.credentials.password);
    }

    /// The username.
    pub fn username(&self) -> &str {
        &self.credentials.username
    }

    /// The realm learned (or given), empty before.
    pub fn realm(&self) -> &[u8] {
        &self.realm
    }

    /// The nonce learned, empty before.
    pub fn nonce(&self) -> &[u8] {
        &self.nonce
    }

    /// Uses `nonce` from now on (a nonce another session learned, say).
    pub fn set_nonce(&mut self, nonce: &[u8]) {
        self.nonce = nonce.to_vec();
    }

    /// Whether requests carry credentials: a nonce is known.
    pub fn authenticated(&self) -> bool {
        !self.nonce.is_empty()
    }

    /// The next transaction ID.
    pub fn next_transaction_id(&mut self) -> TransactionId {
        self.tid_count = self.tid_count.wrapping_add(1);
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.tid_prefix.to_be_bytes());
        t[4..].copy_from_slice(&self.tid_count.to_be_bytes());
        TransactionId(t)
    }

    /// A message of `method` and `class` with the attributes `body` writes, then, when `signed`,
    /// USERNAME, REALM, NONCE and MESSAGE-INTEGRITY, then FINGERPRINT (unless left out).
    pub fn message(
        &mut self,
        method: Method,
        class: Class,
        signed: bool,
        body: impl FnOnce(&mut MsgWriter<'_>),
    ) -> Vec<u8> {
        let tid = self.next_transaction_id();
        self.scratch.resize(MAX_MESSAGE, 0);
        let mut w = MsgWriter::new(&mut self.scratch, method, class, tid);
        body(&mut w);
        if signed {
            w.add_long_term_credentials(self.credentials.username.as_bytes(), &self.realm, &self.nonce, &self.key);
        }
        if self.fingerprint {
            w.add_fingerprint();
        }
        // Only a body larger than MAX_MESSAGE leaves no space: an empty message says so to the peer.
        let n = w.finish().unwrap_or(0);
        self.scratch[..n].to_vec()
    }

    /// A request, signed once a nonce is known.
    pub fn request(&mut self, method: Method, body: impl FnOnce(&mut MsgWriter<'_>)) -> Vec<u8> {
        let signed = self.authenticated();
        self.message(method, Class::Request, signed, body)
    }

    /// A Send indication carrying `payload` to `peer` (never signed).
    pub fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
        self.message(Method::SEND, Class::Indication, false, |w| {
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
            w.add_bytes(AttrType::DATA, payload);
        })
    }

    /// Learns from the answer to a request sent `signed` or not: a 401 to an unsigned request, or a
    /// 438 (stale nonce), bring the realm and nonce to sign with, and the request is worth sending
    /// again. A 401 to a signed request means wrong credentials, and a challenge without a realm
    /// (none known before) cannot be answered: [`Next::Done`].
    pub fn learn(&mut self, answer: &Answer, signed: bool) -> Next {
        let retry = match answer.code() {
            Some(401) => !signed,
            Some(438) => true,
            _ => false,
        };
        let (Some(nonce), true) = (answer.attr(AttrType::NONCE), retry) else {
            return Next::Done;
        };
        match answer.attr(AttrType::REALM) {
            Some(realm) if realm != self.realm.as_slice() => self.set_realm(realm),
            Some(_) => {}
            None if self.realm.is_empty() => return Next::Done,
            None => {}
        }
        self.nonce = nonce.to_vec();
        Next::Retry
    }
}

/// The attributes of an Allocate for a UDP relay: REQUESTED-TRANSPORT, and
/// REQUESTED-ADDRESS-FAMILY IPv6 when `ipv6`.
pub fn allocate_attributes(w: &mut MsgWriter<'_>, ipv6: bool) {
    w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
    if ipv6 {
        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[attr::FAMILY_IPV6, 0, 0, 0]);
    }
}

/// The attributes of a ChannelBind of `number` to `peer`.
pub fn channel_bind_attributes(w: &mut MsgWriter<'_>, number: u16, peer: SocketAddr) {
    let [hi, lo] = number.to_be_bytes();
    w.add_bytes(AttrType::CHANNEL_NUMBER, &[hi, lo, 0, 0]);
    w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_proto::stun::verify_message_integrity;
    use turnpike_proto::{ErrorCode, StunMsg};

    fn error(code: ErrorCode, realm: Option<&[u8]>, nonce: Option<&[u8]>) -> Answer {
        let mut buf = [0u8; 256];
        let mut w = MsgWriter::new(&mut buf, Method::ALLOCATE, Class::Error, TransactionId([1; 12]));
        w.add_error(code, true);
        if let Some(r) = realm {
            w.add_bytes(AttrType::REALM, r);
        }
        if let Some(n) = nonce {
            w.add_bytes(AttrType::NONCE, n);
        }
        let n = w.finish().unwrap();
        Answer::parse(&buf[..n]).unwrap()
    }

    #[test]
    fn a_challenge_teaches_realm_and_nonce_and_the_retry_is_signed_with_the_right_key() {
        let mut s = Session::new(Credentials::rest(b"secret", "alice", 1_900_000_000), 7);
        let first = s.request(Method::ALLOCATE, |w| allocate_attributes(w, false));
        let m = StunMsg::parse(&first).unwrap();
        assert!(m.attr(AttrType::MESSAGE_INTEGRITY).is_none() && m.has_fingerprint());
        assert_eq!(s.learn(&error(ErrorCode::Unauthorized, Some(b"example.org"), Some(b"n1")), false), Next::Retry);
        let second = s.request(Method::ALLOCATE, |w| allocate_attributes(w, false));
        let m = StunMsg::parse(&second).unwrap();
        assert_ne!(m.transaction_id(), StunMsg::parse(&first).unwrap().transaction_id());
        assert_eq!(m.attr(AttrType::NONCE), Some(&b"n1"[..]));
        assert_eq!(m.attr(AttrType::USERNAME), Some(&b"1900000000:alice"[..]));
        let password = rest_password(b"secret", b"1900000000:alice");
        let key = long_term_key(b"1900000000:alice", b"example.org", &password);
        assert!(verify_message_integrity(&m, &key));
        // A stale nonce: retry with the new one; a 401 to a signed request: wrong credentials.
        assert_eq!(s.learn(&error(ErrorCode::StaleNonce, Some(b"example.org"), Some(b"n2")), true), Next::Retry);
        assert_eq!(s.nonce(), b"n2");
        assert_eq!(s.learn(&error(ErrorCode::Unauthorized, Some(b"example.org"), Some(b"n3")), true), Next::Done);
        assert_eq!(s.learn(&error(ErrorCode::AllocationQuotaReached, None, None), true), Next::Done);
        assert_eq!(
            s.learn(&error(ErrorCode::StaleNonce, None, None), true),
            Next::Done,
            "438 without a nonce teaches nothing"
        );
        // A 438 may leave the realm out: the one known stays.
        assert_eq!(s.learn(&error(ErrorCode::StaleNonce, None, Some(b"n4")), true), Next::Retry);
        assert_eq!((s.realm(), s.nonce()), (&b"example.org"[..], &b"n4"[..]));
        let mut fresh = Session::new(Credentials::user("u", b"p"), 1);
        let challenge = error(ErrorCode::Unauthorized, None, Some(b"n"));
        assert_eq!(fresh.learn(&challenge, false), Next::Done, "no realm to sign in");
    }

    #[test]
    fn transaction_ids_carry_the_prefix_and_never_repeat() {
        let mut s = Session::new(Credentials::user("u", b"p"), 0xABCD_0001);
        let a = s.next_transaction_id();
        let b = s.next_transaction_id();
        assert_ne!(a, b);
        assert_eq!(a.0[..4], 0xABCD_0001u32.to_be_bytes());
    }
}
