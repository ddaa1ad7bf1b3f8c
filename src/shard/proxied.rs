//! The start of a TCP or TLS stream when `listen.proxy_from` is set: a connection from a trusted proxy
//! must begin with a PROXY header (v1 or v2, [`crate::proto::proxy`]), before the TLS ClientHello or
//! the first STUN message, and the client address it names becomes the connection's; a connection from
//! anyone else must not send one. The header is read with `MSG_PEEK` and then exactly its length, so
//! what follows stays in the socket for TLS or STUN. With `proxy_from` empty nothing here runs.

pub(crate) use crate::admission::ProxyRefusal;
use crate::proto::proxy::{self, Parsed, ProxyError};
use mio::net::TcpStream;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Duration;

/// A trusted connection's header must be complete this long after the connection was accepted.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// How a stream must start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// From a `proxy_from` source: a PROXY header first.
    ProxyHeader,
    /// From anyone else while `proxy_from` is set: no PROXY header.
    NoProxyHeader,
    /// Checked (or nothing to check).
    Open,
}

fn refusal_of(e: ProxyError) -> ProxyRefusal {
    match e {
        ProxyError::Missing => ProxyRefusal::Missing,
        ProxyError::Malformed => ProxyRefusal::Malformed,
        ProxyError::TooLong => ProxyRefusal::TooLong,
    }
}

/// What the start check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not enough bytes yet.
    Wait,
    /// The stream may go on; with a header naming a client, that address.
    Ready(Option<SocketAddr>),
    /// Close the connection.
    Refused(ProxyRefusal),
    /// The peer closed or the socket failed.
    Closed,
}

/// Checks the start of `stream` as `start` requires, peeking into `scratch` (at least
/// [`proxy::V2_MAX`] bytes are never needed at once: the v2 length field bounds what is peeked).
pub(crate) fn check(stream: &mut TcpStream, start: Start, scratch: &mut [u8]) -> Outcome {
    let n = match stream.peek(scratch) {
        Ok(0) => return Outcome::Closed,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Outcome::Wait,
        Err(_) => return Outcome::Closed,
    };
    let seen = &scratch[..n];
    match start {
        Start::Open => Outcome::Ready(None),
        Start::NoProxyHeader => {
            // Two bytes tell a PROXY header ("PR", "\r\n") from TLS (0x16) and STUN (a first message
            // type a TURN client sends never starts so).
            if n < 2 && proxy::looks_like_header(seen) {
                Outcome::Wait
            } else if proxy::looks_like_header(seen) {
                Outcome::Refused(ProxyRefusal::Untrusted)
            } else {
                Outcome::Ready(None)
            }
        }
        Start::ProxyHeader => match proxy::parse(seen) {
            Ok(Parsed::Incomplete) if n >= scratch.len() => Outcome::Refused(ProxyRefusal::TooLong),
            Ok(Parsed::Incomplete) => Outcome::Wait,
            Err(e) => Outcome::Refused(refusal_of(e)),
            Ok(Parsed::Complete(h)) => {
                // Take exactly the header out of the socket: the bytes after it are TLS's or STUN's.
                let mut left = h.len;
                while left > 0 {
                    match stream.read(&mut scratch[..left]) {
                        Ok(0) => return Outcome::Closed,
                        Ok(k) => left -= k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Outcome::Closed,
                    }
                }
                Outcome::Ready(h.source)
            }
        },
    }
}
