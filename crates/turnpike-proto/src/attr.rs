//! Attribute types and typed decoders/encoders (RFC 8489 §14, RFC 8656 §18, RFC 6156).

use crate::error::ParseError;
use crate::header::{MAGIC_COOKIE, TransactionId};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A STUN attribute type. Types below 0x8000 are comprehension-required.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttrType(pub u16);

impl AttrType {
    /// MAPPED-ADDRESS (RFC 8489).
    pub const MAPPED_ADDRESS: Self = Self(0x0001);
    /// USERNAME (RFC 8489).
    pub const USERNAME: Self = Self(0x0006);
    /// MESSAGE-INTEGRITY (RFC 8489).
    pub const MESSAGE_INTEGRITY: Self = Self(0x0008);
    /// ERROR-CODE (RFC 8489).
    pub const ERROR_CODE: Self = Self(0x0009);
    /// UNKNOWN-ATTRIBUTES (RFC 8489).
    pub const UNKNOWN_ATTRIBUTES: Self = Self(0x000A);
    /// CHANNEL-NUMBER (RFC 8656).
    pub const CHANNEL_NUMBER: Self = Self(0x000C);
    /// LIFETIME (RFC 8656).
    pub const LIFETIME: Self = Self(0x000D);
    /// BANDWIDTH (RFC 5766 drafts; still sent by some clients; ignored).
    pub const BANDWIDTH: Self = Self(0x0010);
    /// XOR-PEER-ADDRESS (RFC 8656).
    pub const XOR_PEER_ADDRESS: Self = Self(0x0012);
    /// DATA (RFC 8656).
    pub const DATA: Self = Self(0x0013);
    /// REALM (RFC 8489).
    pub const REALM: Self = Self(0x0014);
    /// NONCE (RFC 8489).
    pub const NONCE: Self = Self(0x0015);
    /// XOR-RELAYED-ADDRESS (RFC 8656).
    pub const XOR_RELAYED_ADDRESS: Self = Self(0x0016);
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656).
    pub const REQUESTED_ADDRESS_FAMILY: Self = Self(0x0017);
    /// EVEN-PORT (RFC 8656).
    pub const EVEN_PORT: Self = Self(0x0018);
    /// REQUESTED-TRANSPORT (RFC 8656).
    pub const REQUESTED_TRANSPORT: Self = Self(0x0019);
    /// DONT-FRAGMENT (RFC 8656).
    pub const DONT_FRAGMENT: Self = Self(0x001A);
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489).
    pub const MESSAGE_INTEGRITY_SHA256: Self = Self(0x001C);
    /// PASSWORD-ALGORITHM (RFC 8489).
    pub const PASSWORD_ALGORITHM: Self = Self(0x001D);
    /// USERHASH (RFC 8489).
    pub const USERHASH: Self = Self(0x001E);
    /// XOR-MAPPED-ADDRESS (RFC 8489).
    pub const XOR_MAPPED_ADDRESS: Self = Self(0x0020);
    /// RESERVATION-TOKEN (RFC 8656).
    pub const RESERVATION_TOKEN: Self = Self(0x0022);
    /// PRIORITY (RFC 8445, ICE).
    pub const PRIORITY: Self = Self(0x0024);
    /// USE-CANDIDATE (RFC 8445, ICE).
    pub const USE_CANDIDATE: Self = Self(0x0025);
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656).
    pub const ADDITIONAL_ADDRESS_FAMILY: Self = Self(0x8000);
    /// ADDRESS-ERROR-CODE (RFC 8656).
    pub const ADDRESS_ERROR_CODE: Self = Self(0x8001);
    /// PASSWORD-ALGORITHMS (RFC 8489).
    pub const PASSWORD_ALGORITHMS: Self = Self(0x8002);
    /// ALTERNATE-DOMAIN (RFC 8489).
    pub const ALTERNATE_DOMAIN: Self = Self(0x8003);
    /// ICMP (RFC 8656).
    pub const ICMP: Self = Self(0x8004);
    /// SOFTWARE (RFC 8489).
    pub const SOFTWARE: Self = Self(0x8022);
    /// ALTERNATE-SERVER (RFC 8489).
    pub const ALTERNATE_SERVER: Self = Self(0x8023);
    /// FINGERPRINT (RFC 8489).
    pub const FINGERPRINT: Self = Self(0x8028);
    /// ICE-CONTROLLED (RFC 8445).
    pub const ICE_CONTROLLED: Self = Self(0x8029);
    /// ICE-CONTROLLING (RFC 8445).
    pub const ICE_CONTROLLING: Self = Self(0x802A);

    /// Whether a receiver that does not understand this attribute must reject the message (RFC 8489 §14).
    pub fn comprehension_required(self) -> bool {
        self.0 < 0x8000
    }
}

/// Address family codes used in address attributes and REQUESTED-ADDRESS-FAMILY.
pub const FAMILY_IPV4: u8 = 0x01;
/// IPv6 family code.
pub const FAMILY_IPV6: u8 = 0x02;

/// The transport protocol number for UDP in REQUESTED-TRANSPORT.
pub const PROTO_UDP: u8 = 17;
/// The transport protocol number for TCP in REQUESTED-TRANSPORT.
pub const PROTO_TCP: u8 = 6;

/// Length of an address attribute's value for `addr`.
pub fn xor_addr_len(addr: &SocketAddr) -> usize {
    if addr.is_ipv4() { 8 } else { 20 }
}

/// Writes an XOR-encoded address into `slot` (exactly [`xor_addr_len`] bytes).
pub fn encode_xor_addr(slot: &mut [u8], addr: SocketAddr, tid: &TransactionId) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    slot[0] = 0;
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    slot[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            slot[1] = FAMILY_IPV4;
            for (i, b) in ip.octets().iter().enumerate() {
                slot[4 + i] = b ^ cookie[i];
            }
        }
        IpAddr::V6(ip) => {
            slot[1] = FAMILY_IPV6;
            let octets = ip.octets();
            for i in 0..16 {
                let k = if i < 4 { cookie[i] } else { tid.0[i - 4] };
                slot[4 + i] = octets[i] ^ k;
            }
        }
    }
}

/// Writes a plain (non-XOR) address into `slot` (exactly [`xor_addr_len`] bytes): ALTERNATE-SERVER.
pub fn encode_plain_addr(slot: &mut [u8], addr: SocketAddr) {
    slot[0] = 0;
    slot[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            slot[1] = FAMILY_IPV4;
            slot[4..8].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            slot[1] = FAMILY_IPV6;
            slot[4..20].copy_from_slice(&ip.octets());
        }
    }
}

/// Decodes an XOR-encoded address value (XOR-MAPPED/RELAYED/PEER-ADDRESS).
pub fn decode_xor_addr(value: &[u8], tid: &TransactionId) -> Result<SocketAddr, ParseError> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let raw = decode_plain_addr(value)?;
    let port = raw.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = match raw.ip() {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            IpAddr::V4(Ipv4Addr::new(o[0] ^ cookie[0], o[1] ^ cookie[1], o[2] ^ cookie[2], o[3] ^ cookie[3]))
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            for (i, b) in o.iter_mut().enumerate() {
                *b ^= if i < 4 { cookie[i] } else { tid.0[i - 4] };
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// Decodes a plain (non-XOR) address value such as MAPPED-ADDRESS.
pub fn decode_plain_addr(value: &[u8]) -> Result<SocketAddr, ParseError> {
    if value.len() < 4 {
        return Err(ParseError::BadAttribute("address too short"));
    }
    let port = u16::from_be_bytes([value[2], value[3]]);
    match (value[1], value.len()) {
        (FAMILY_IPV4, 8) => {
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(value[4], value[5], value[6], value[7])), port))
        }
        (FAMILY_IPV6, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&value[4..20]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => Err(ParseError::BadAttribute("address family or length")),
    }
}

/// Decodes a 32-bit value (LIFETIME, ...).
pub fn decode_u32(value: &[u8]) -> Result<u32, ParseError> {
    let b: [u8; 4] = value.try_into().map_err(|_| ParseError::BadAttribute("expected 4 bytes"))?;
    Ok(u32::from_be_bytes(b))
}

/// Decodes ERROR-CODE into (code, reason bytes).
pub fn decode_error_code(value: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    if value.len() < 4 {
        return Err(ParseError::BadAttribute("ERROR-CODE too short"));
    }
    let class = u16::from(value[2] & 0x07);
    let number = u16::from(value[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(ParseError::BadAttribute("ERROR-CODE out of range"));
    }
    Ok((class * 100 + number, &value[4..]))
}

/// Decodes CHANNEL-NUMBER (the number is in the first two bytes, then RFFU).
pub fn decode_channel_number(value: &[u8]) -> Result<u16, ParseError> {
    if value.len() != 4 {
        return Err(ParseError::BadAttribute("CHANNEL-NUMBER length"));
    }
    Ok(u16::from_be_bytes([value[0], value[1]]))
}

/// Decodes REQUESTED-TRANSPORT into the IP protocol number.
pub fn decode_requested_transport(value: &[u8]) -> Result<u8, ParseError> {
    if value.len() != 4 {
        return Err(ParseError::BadAttribute("REQUESTED-TRANSPORT length"));
    }
    Ok(value[0])
}

/// Decodes REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY into the family code.
pub fn decode_family(value: &[u8]) -> Result<u8, ParseError> {
    if value.len() != 4 {
        return Err(ParseError::BadAttribute("address family length"));
    }
    Ok(value[0])
}

/// Decodes EVEN-PORT into its R (reserve next port) bit.
pub fn decode_even_port(value: &[u8]) -> Result<bool, ParseError> {
    match value.first() {
        Some(b) if value.len() == 1 => Ok(b & 0x80 != 0),
        _ => Err(ParseError::BadAttribute("EVEN-PORT length")),
    }
}

/// Decodes RESERVATION-TOKEN (8 opaque bytes).
pub fn decode_reservation_token(value: &[u8]) -> Result<[u8; 8], ParseError> {
    value.try_into().map_err(|_| ParseError::BadAttribute("RESERVATION-TOKEN length"))
}
