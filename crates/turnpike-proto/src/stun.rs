//! STUN message framing (RFC 8489 §5-6): a borrowed, validated view over untrusted bytes and a writer into
//! caller-owned buffers. Nothing here allocates or panics on wire data.

use crate::attr::{self, AttrType};
use crate::error::{ErrorCode, NoSpace, ParseError};
use crate::header::be16;
pub use crate::header::{
    ATTR_HEADER_LEN, Class, HEADER_LEN, MAGIC_COOKIE, Method, TransactionId, looks_like_stun, message_type, pad4,
    split_message_type,
};
use crate::integrity;
use std::net::SocketAddr;

/// A validated, borrowed view of one STUN message.
///
/// `parse` checks the header, that every attribute's TLV fits, and that a FINGERPRINT (if any) is last
/// and correct. Attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored, as RFC 8489 §14.5
/// requires of receivers.
#[derive(Clone, Copy, Debug)]
pub struct StunMsg<'a> {
    bytes: &'a [u8],
    method: Method,
    class: Class,
    tid: TransactionId,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if present.
    integrity_at: Option<usize>,
    /// End of the attributes that count (before anything that follows MESSAGE-INTEGRITY).
    attrs_end: usize,
    has_fingerprint: bool,
}

impl<'a> StunMsg<'a> {
    /// Parses exactly one STUN message occupying all of `bytes` (a UDP datagram, or a frame cut from a
    /// stream by its header length).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        if bytes.len() < HEADER_LEN {
            return Err(ParseError::Truncated("header"));
        }
        if bytes[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        if bytes[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(ParseError::BadMagicCookie);
        }
        let body_len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if body_len % 4 != 0 {
            return Err(ParseError::BadLength("message length not a multiple of 4"));
        }
        if HEADER_LEN + body_len != bytes.len() {
            return Err(ParseError::BadLength("message length does not match the datagram"));
        }
        let (method, class) = split_message_type(u16::from_be_bytes([bytes[0], bytes[1]]));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&bytes[8..20]);

        let mut integrity_at = None;
        let mut attrs_end = bytes.len();
        let mut has_fingerprint = false;
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            let typ = be16(bytes, at).ok_or(ParseError::Truncated("attribute header"))?;
            let len = usize::from(be16(bytes, at + 2).ok_or(ParseError::Truncated("attribute header"))?);
            let value_at = at + ATTR_HEADER_LEN;
            let next = value_at + pad4(len);
            if next > bytes.len() {
                return Err(ParseError::Truncated("attribute value"));
            }
            match AttrType(typ) {
                AttrType::FINGERPRINT => {
                    if len != 4 || next != bytes.len() {
                        return Err(ParseError::BadFingerprint);
                    }
                    if !integrity::fingerprint_matches(&bytes[..at], &bytes[value_at..value_at + 4]) {
                        return Err(ParseError::BadFingerprint);
                    }
                    has_fingerprint = true;
                    if integrity_at.is_none() {
                        attrs_end = at;
                    }
                }
                AttrType::MESSAGE_INTEGRITY if integrity_at.is_none() => {
                    if len != integrity::HMAC_SHA1_LEN {
                        return Err(ParseError::BadAttribute("MESSAGE-INTEGRITY length"));
                    }
                    integrity_at = Some(at);
                    attrs_end = next;
                }
                _ => {}
            }
            at = next;
        }
        Ok(Self { bytes, method, class, tid: TransactionId(tid), integrity_at, attrs_end, has_fingerprint })
    }

    /// The whole message.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// Whether the message carried a (valid) FINGERPRINT.
    pub fn has_fingerprint(&self) -> bool {
        self.has_fingerprint
    }

    /// Offset of the MESSAGE-INTEGRITY attribute's header, if the message has one.
    pub(crate) fn integrity_offset(&self) -> Option<usize> {
        self.integrity_at
    }

    /// Iterates over the attributes that count: up to and including MESSAGE-INTEGRITY, FINGERPRINT excluded.
    pub fn attrs(&self) -> AttrIter<'a> {
        AttrIter { bytes: &self.bytes[..self.attrs_end], at: HEADER_LEN }
    }

    /// The value of the first attribute of type `typ`, if any.
    pub fn attr(&self, typ: AttrType) -> Option<&'a [u8]> {
        self.attrs().find(|a| a.typ == typ).map(|a| a.value)
    }
}

/// One attribute of a [`StunMsg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr<'a> {
    /// The attribute type.
    pub typ: AttrType,
    /// The value, without padding.
    pub value: &'a [u8],
}

/// Iterator over a message's attributes; the message was validated, so it never fails.
#[derive(Clone, Debug)]
pub struct AttrIter<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        let typ = be16(self.bytes, self.at)?;
        let len = usize::from(be16(self.bytes, self.at + 2)?);
        let value_at = self.at + ATTR_HEADER_LEN;
        let value = self.bytes.get(value_at..value_at + len)?;
        self.at = value_at + pad4(len);
        Some(Attr { typ: AttrType(typ), value })
    }
}

/// Writes one STUN message into a caller-owned buffer.
///
/// Errors are sticky: once a write does not fit, later writes do nothing and [`MsgWriter::finish`]
/// returns [`NoSpace`], so call sites need no `?` per attribute and nothing can panic.
#[derive(Debug)]
pub struct MsgWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl<'b> MsgWriter<'b> {
    /// Starts a message with the given method, class and transaction ID.
    pub fn new(buf: &'b mut [u8], method: Method, class: Class, tid: TransactionId) -> Self {
        let mut w = Self { buf, len: 0, overflow: false };
        if w.buf.len() < HEADER_LEN {
            w.overflow = true;
            return w;
        }
        w.buf[0..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        w.buf[2..4].copy_from_slice(&[0, 0]);
        w.buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        w.buf[8..20].copy_from_slice(&tid.0);
        w.len = HEADER_LEN;
        w
    }

    /// The transaction ID written in the header.
    pub fn transaction_id(&self) -> TransactionId {
        let mut tid = [0u8; 12];
        if self.buf.len() >= HEADER_LEN {
            tid.copy_from_slice(&self.buf[8..20]);
        }
        TransactionId(tid)
    }

    fn set_length(&mut self, body_len: usize) {
        if let Ok(len) = u16::try_from(body_len) {
            self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        } else {
            self.overflow = true;
        }
    }

    /// Reserves an attribute of `value_len` bytes and returns the value slot (zeroed padding written).
    fn reserve(&mut self, typ: AttrType, value_len: usize) -> Option<&mut [u8]> {
        if self.overflow {
            return None;
        }
        let total = ATTR_HEADER_LEN + pad4(value_len);
        let Ok(len16) = u16::try_from(value_len) else {
            self.overflow = true;
            return None;
        };
        if self.len + total > self.buf.len() || self.len + total - HEADER_LEN > usize::from(u16::MAX) {
            self.overflow = true;
            return None;
        }
        let at = self.len;
        self.buf[at..at + 2].copy_from_slice(&typ.0.to_be_bytes());
        self.buf[at + 2..at + 4].copy_from_slice(&len16.to_be_bytes());
        let value_at = at + ATTR_HEADER_LEN;
        self.buf[value_at + value_len..at + total].fill(0);
        self.len += total;
        self.set_length(self.len - HEADER_LEN);
        Some(&mut self.buf[value_at..value_at + value_len])
    }

    /// Appends an attribute with a raw value.
    pub fn add_bytes(&mut self, typ: AttrType, value: &[u8]) {
        if let Some(slot) = self.reserve(typ, value.len()) {
            slot.copy_from_slice(value);
        }
    }

    /// Appends a 32-bit attribute (LIFETIME, ...).
    pub fn add_u32(&mut self, typ: AttrType, value: u32) {
        self.add_bytes(typ, &value.to_be_bytes());
    }

    /// Appends an XOR-encoded address attribute (XOR-MAPPED-ADDRESS, XOR-RELAYED-ADDRESS, XOR-PEER-ADDRESS).
    pub fn add_xor_addr(&mut self, typ: AttrType, addr: SocketAddr) {
        let tid = self.transaction_id();
        let len = attr::xor_addr_len(&addr);
        if let Some(slot) = self.reserve(typ, len) {
            attr::encode_xor_addr(slot, addr, &tid);
        }
    }

    /// Appends a plain address attribute (ALTERNATE-SERVER).
    pub fn add_plain_addr(&mut self, typ: AttrType, addr: SocketAddr) {
        if let Some(slot) = self.reserve(typ, attr::xor_addr_len(&addr)) {
            attr::encode_plain_addr(slot, addr);
        }
    }

    /// Appends ERROR-CODE; the reason phrase is written only when `with_reason` is set.
    pub fn add_error(&mut self, code: ErrorCode, with_reason: bool) {
        let reason = if with_reason { code.reason().as_bytes() } else { &[] };
        if let Some(slot) = self.reserve(AttrType::ERROR_CODE, 4 + reason.len()) {
            let n = code.code();
            slot[0] = 0;
            slot[1] = 0;
            slot[2] = (n / 100) as u8;
            slot[3] = (n % 100) as u8;
            slot[4..].copy_from_slice(reason);
        }
    }

    /// Appends UNKNOWN-ATTRIBUTES listing `types`.
    pub fn add_unknown_attributes(&mut self, types: &[u16]) {
        if let Some(slot) = self.reserve(AttrType::UNKNOWN_ATTRIBUTES, types.len() * 2) {
            for (chunk, t) in slot.chunks_exact_mut(2).zip(types) {
                chunk.copy_from_slice(&t.to_be_bytes());
            }
        }
    }

    /// Appends a client's long-term credentials (RFC 8489 §9.2.3): USERNAME, REALM and NONCE, then
    /// MESSAGE-INTEGRITY keyed with `key` (from [`long_term_key`](crate::integrity::long_term_key)).
    pub fn add_long_term_credentials(&mut self, username: &[u8], realm: &[u8], nonce: &[u8], key: &[u8]) {
        self.add_bytes(AttrType::USERNAME, username);
        self.add_bytes(AttrType::REALM, realm);
        self.add_bytes(AttrType::NONCE, nonce);
        self.add_message_integrity(key);
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 keyed with `key`) over everything written so far.
    pub fn add_message_integrity(&mut self, key: &[u8]) {
        self.add_message_integrity_with(&integrity::HmacKey::new(key));
    }

    /// [`MsgWriter::add_message_integrity`] with a prepared key.
    pub(crate) fn add_message_integrity_with(&mut self, key: &integrity::HmacKey) {
        if self.overflow {
            return;
        }
        let at = self.len;
        if self.reserve(AttrType::MESSAGE_INTEGRITY, integrity::HMAC_SHA1_LEN).is_none() {
            return;
        }
        // The length field already counts MESSAGE-INTEGRITY, as the HMAC input requires.
        let mac = key.mac(&[&self.buf[..at]]);
        self.buf[at + ATTR_HEADER_LEN..at + ATTR_HEADER_LEN + integrity::HMAC_SHA1_LEN].copy_from_slice(&mac);
    }

    /// Appends FINGERPRINT over everything written so far; must be the last attribute.
    pub fn add_fingerprint(&mut self) {
        if self.overflow {
            return;
        }
        let at = self.len;
        if self.reserve(AttrType::FINGERPRINT, 4).is_none() {
            return;
        }
        let fp = integrity::fingerprint(&self.buf[..at]);
        self.buf[at + ATTR_HEADER_LEN..at + ATTR_HEADER_LEN + 4].copy_from_slice(&fp.to_be_bytes());
    }

    /// Finishes the message and returns its length.
    pub fn finish(self) -> Result<usize, NoSpace> {
        if self.overflow { Err(NoSpace) } else { Ok(self.len) }
    }
}

/// Verifies MESSAGE-INTEGRITY of `msg` with `key`, in constant time. Returns false if absent.
pub fn verify_message_integrity(msg: &StunMsg<'_>, key: &[u8]) -> bool {
    verify_message_integrity_with(msg, &integrity::HmacKey::new(key))
}

/// [`verify_message_integrity`] with a prepared key.
pub(crate) fn verify_message_integrity_with(msg: &StunMsg<'_>, key: &integrity::HmacKey) -> bool {
    let Some(at) = msg.integrity_offset() else {
        return false;
    };
    let bytes = msg.bytes();
    // The HMAC covers the header with its length adjusted to end right after MESSAGE-INTEGRITY.
    let Ok(adjusted) = u16::try_from(at + ATTR_HEADER_LEN + integrity::HMAC_SHA1_LEN - HEADER_LEN) else {
        return false;
    };
    let (Some(kind), Some(rest)) = (bytes.get(0..2), bytes.get(4..at)) else {
        return false;
    };
    let value_at = at + ATTR_HEADER_LEN;
    match bytes.get(value_at..value_at + integrity::HMAC_SHA1_LEN) {
        Some(tag) => key.verify(&[kind, &adjusted.to_be_bytes(), rest], tag),
        None => false,
    }
}

#[cfg(test)]
mod tests;
