//! The PROXY protocol (HAProxy's specification, versions 1 and 2): the header a trusted proxy (nginx
//! `proxy_protocol on`, HAProxy `send-proxy[-v2]`) puts in front of a TCP stream to say whose
//! connection it relays. A strict parser of our own, without allocation: it needs only the bytes the
//! shard has buffered, says whether the header is complete, and never reads past it, so what follows
//! (a TLS ClientHello, the first STUN message) stays for its reader.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;
/// The longest version 2 header: 16 bytes and a 16-bit length.
pub const V2_MAX: usize = 16 + 65_535;

/// A complete header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its length: the stream's own bytes start here.
    pub len: usize,
    /// The client's address, when the header carries one for TCP over IPv4 or IPv6. `None`: v1
    /// `UNKNOWN`, v2 `LOCAL` (the proxy's own connection, a health check) or an address family the
    /// relay does not use: the specification says to use the connection's own addresses then.
    pub source: Option<SocketAddr>,
    /// Version 1 or 2.
    pub version: u8,
}

/// Why a header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// Neither signature: the stream does not start with a PROXY header.
    Missing,
    /// A signature, then something the specification does not allow.
    Malformed,
    /// Longer than the version allows (v1 without CRLF within 107 bytes).
    TooLong,
}

impl ProxyError {
    /// Every error, in counter order.
    pub const ALL: [Self; 3] = [Self::Missing, Self::Malformed, Self::TooLong];

    /// The metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::TooLong => "too_long",
        }
    }
}

/// What the bytes received so far hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header: read more (within the size and time bounds).
    Incomplete,
    /// A whole header.
    Complete(Header),
}

/// Whether `bytes` start like a PROXY header of either version (as many bytes as are there agree).
/// An untrusted source that sends one is refused.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    let v1 = b"PROXY ";
    let n = bytes.len().min(v1.len());
    let m = bytes.len().min(V2_SIGNATURE.len());
    !bytes.is_empty() && (bytes[..n] == v1[..n] || bytes[..m] == V2_SIGNATURE[..m])
}

/// Parses the header at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    if bytes.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let v1 = b"PROXY ";
    let n = bytes.len().min(v1.len());
    if bytes[..n] == v1[..n] {
        return parse_v1(bytes);
    }
    let m = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..m] == V2_SIGNATURE[..m] {
        return parse_v2(bytes);
    }
    Err(ProxyError::Missing)
}

//= PROXY protocol §2.1: "PROXY" SP ("TCP4" | "TCP6" | "UNKNOWN") SP src SP dst SP sport SP dport CRLF,
//= at most 107 bytes; with UNKNOWN the rest of the line is ignored.
fn parse_v1(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX { Err(ProxyError::TooLong) } else { Ok(Parsed::Incomplete) };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(ProxyError::TooLong);
    }
    let line = std::str::from_utf8(&bytes[6..end]).map_err(|_| ProxyError::Malformed)?;
    let mut parts = line.split(' ');
    let family = parts.next().ok_or(ProxyError::Malformed)?;
    if family == "UNKNOWN" {
        return Ok(Parsed::Complete(Header { len, source: None, version: 1 }));
    }
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ProxyError::Malformed);
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            src.parse::<Ipv4Addr>().map_err(|_| ProxyError::Malformed)?.into(),
            dst.parse::<Ipv4Addr>().map_err(|_| ProxyError::Malformed)?.into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>().map_err(|_| ProxyError::Malformed)?.into(),
            dst.parse::<Ipv6Addr>().map_err(|_| ProxyError::Malformed)?.into(),
        ),
        _ => return Err(ProxyError::Malformed),
    };
    let _ = dst;
    let port = |p: &str| {
        // Decimal without leading zeros or sign, 0-65535.
        if p.is_empty() || (p.len() > 1 && p.starts_with('0')) || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProxyError::Malformed);
        }
        p.parse::<u16>().map_err(|_| ProxyError::Malformed)
    };
    let sport = port(sport)?;
    port(dport)?;
    Ok(Parsed::Complete(Header { len, source: Some(SocketAddr::new(src, sport)), version: 1 }))
}

//= PROXY protocol §2.2: 12-byte signature, version/command byte (0x2 in the high nibble; command 0
//= LOCAL, 1 PROXY), family/protocol byte, 16-bit length of what follows (addresses, then TLVs).
fn parse_v2(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    if bytes.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let (version, command) = (bytes[12] >> 4, bytes[12] & 0x0F);
    if version != 2 || command > 1 {
        return Err(ProxyError::Malformed);
    }
    let rest = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let len = 16 + rest;
    if bytes.len() < len {
        return Ok(Parsed::Incomplete);
    }
    if command == 0 {
        // LOCAL: the proxy's own connection; addresses, if any, are ignored.
        return Ok(Parsed::Complete(Header { len, source: None, version: 2 }));
    }
    let body = &bytes[16..len];
    let source = match bytes[13] {
        // TCP over IPv4: src (4), dst (4), sport, dport.
        0x11 => {
            let a = body.get(..12).ok_or(ProxyError::Malformed)?;
            Some(SocketAddr::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(), u16::from_be_bytes([a[8], a[9]])))
        }
        // TCP over IPv6: src (16), dst (16), sport, dport.
        0x21 => {
            let a = body.get(..36).ok_or(ProxyError::Malformed)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(Ipv6Addr::from(ip).into(), u16::from_be_bytes([a[32], a[33]])))
        }
        //= §2.2: "UNSPEC ... the receiver ... must ignore the address information"; UDP and UNIX
        //= sockets are not TURN's clients either: the connection's own address is used.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => None,
        _ => return Err(ProxyError::Malformed),
    };
    Ok(Parsed::Complete(Header { len, source, version: 2 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 443\r\nrest";
        let parsed = parse(h).unwrap();
        assert_eq!(
            parsed,
            Parsed::Complete(Header {
                len: h.len() - 4,
                source: Some("198.51.100.7:5555".parse().unwrap()),
                version: 1
            })
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n";
        assert!(
            matches!(parse(h6), Ok(Parsed::Complete(Header { source: Some(s), .. })) if s == "[2001:db8::7]:65535".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Parsed::Complete(Header { len: 15, source: None, version: 1 })));
        assert_eq!(parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").map(|_| ()), Ok(()));
        // Prefixes wait; a line without CRLF within 107 bytes is too long.
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY TCP4 198.51.100.7"), Ok(Parsed::Incomplete));
        assert_eq!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)), Err(ProxyError::TooLong));
    }

    #[test]
    fn version_1_refuses_what_the_specification_does() {
        for bad in [
            &b"PROXY TCP4 198.51.100.7 10.0.0.1 5555\r\n"[..],
            b"PROXY TCP4 198.51.100.777 10.0.0.1 5555 443\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 5555 443\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 05555 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert_eq!(parse(bad), Err(ProxyError::Malformed), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert_eq!(parse(&[0x16, 3, 1]), Err(ProxyError::Missing));
    }

    #[test]
    fn version_2() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1];
        body.extend_from_slice(&5555u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0, 2, b'x', b'y']); // a TLV after the addresses
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Complete(Header {
                len: h.len(),
                source: Some("198.51.100.7:5555".parse().unwrap()),
                version: 2
            }))
        );
        // Every prefix waits.
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(Parsed::Incomplete), "{cut}");
        }
        let mut body6 = vec![0x20, 0x01, 0x0d, 0xb8];
        body6.resize(16, 0);
        body6[15] = 7;
        body6.resize(32, 1);
        body6.extend_from_slice(&[0x13, 0x88, 0x01, 0xbb]);
        assert!(
            matches!(parse(&v2(1, 0x21, &body6)), Ok(Parsed::Complete(Header { source: Some(s), .. })) if s == "[2001:db8::7]:5000".parse().unwrap())
        );
        // LOCAL and families without a TCP client: the connection's own address.
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Parsed::Complete(Header { len: 16, source: None, version: 2 })));
        assert!(matches!(parse(&v2(1, 0x00, &[])), Ok(Parsed::Complete(Header { source: None, .. }))));
        assert!(matches!(parse(&v2(1, 0x31, &[0; 216])), Ok(Parsed::Complete(Header { source: None, .. }))));
    }

    #[test]
    fn version_2_refuses_lying_lengths_and_unknown_values() {
        // A length too short for the family's addresses.
        assert_eq!(parse(&v2(1, 0x11, &[1, 2, 3, 4])), Err(ProxyError::Malformed));
        assert_eq!(parse(&v2(1, 0x21, &[0; 20])), Err(ProxyError::Malformed));
        // Unknown command, version, family.
        assert_eq!(parse(&v2(2, 0x11, &[0; 12])), Err(ProxyError::Malformed));
        let mut h = v2(1, 0x11, &[0; 12]);
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(ProxyError::Malformed));
        assert_eq!(parse(&v2(1, 0x41, &[0; 12])), Err(ProxyError::Malformed));
    }

    #[test]
    fn untrusted_headers_are_recognised_from_their_first_bytes() {
        assert!(looks_like_header(b"PR") && looks_like_header(b"PROXY TCP4") && looks_like_header(b"\r\n\r\n\0"));
        assert!(!looks_like_header(b"") && !looks_like_header(&[0x00, 0x03]) && !looks_like_header(&[0x16, 3, 1]));
        assert!(!looks_like_header(b"PRX"));
    }
}
