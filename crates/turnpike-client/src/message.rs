//! What a client receives: a STUN message kept whole ([`Answer`]), or relayed data ([`Incoming`]); and
//! the ChannelData it sends.

use std::net::SocketAddr;
use turnpike_proto::attr::{self, AttrType};
use turnpike_proto::channel::CHANNEL_HEADER_LEN;
use turnpike_proto::stun::pad4;
use turnpike_proto::{ChannelData, Class, Method, StunMsg, TransactionId};

/// A received STUN message (a response, usually), kept as its bytes; it parsed when it was made.
#[derive(Clone, PartialEq, Eq)]
pub struct Answer(Vec<u8>);

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.msg();
        f.debug_struct("Answer")
            .field("method", &m.method())
            .field("class", &m.class())
            .field("code", &self.code())
            .finish()
    }
}

impl Answer {
    /// Keeps `bytes` when they are a well-formed STUN message.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        StunMsg::parse(bytes).ok().map(|_| Self(bytes.to_vec()))
    }

    /// The message, parsed again (cheap: a walk over the attributes).
    pub fn msg(&self) -> StunMsg<'_> {
        #[allow(clippy::expect_used)] // parsed when the Answer was made, and the bytes never change
        StunMsg::parse(&self.0).expect("an Answer holds a parsed message")
    }

    /// The bytes as received.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Its class (success or error response, indication, request).
    pub fn class(&self) -> Class {
        self.msg().class()
    }

    /// Its method.
    pub fn method(&self) -> Method {
        self.msg().method()
    }

    /// Its transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        self.msg().transaction_id()
    }

    /// The ERROR-CODE number, when it carries one that decodes.
    pub fn code(&self) -> Option<u16> {
        self.msg().attr(AttrType::ERROR_CODE).and_then(|v| attr::decode_error_code(v).ok()).map(|c| c.0)
    }

    /// The value of the first attribute of type `t`.
    pub fn attr(&self, t: AttrType) -> Option<&[u8]> {
        StunMsg::parse(&self.0).ok()?.attr(t)
    }

    /// The address of an XOR-*-ADDRESS attribute of type `t`.
    pub fn xor_addr(&self, t: AttrType) -> Option<SocketAddr> {
        let m = self.msg();
        attr::decode_xor_addr(m.attr(t)?, &m.transaction_id()).ok()
    }

    /// XOR-RELAYED-ADDRESS: the relayed address of an Allocate success.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.xor_addr(AttrType::XOR_RELAYED_ADDRESS)
    }

    /// Whether `bytes` may answer the request `request`: a STUN message with its transaction ID.
    pub fn matches(bytes: &[u8], request: &[u8]) -> bool {
        bytes.len() >= 20 && request.len() >= 20 && bytes[0] & 0xC0 == 0 && bytes[8..20] == request[8..20]
    }
}

/// A received datagram or frame, classified.
#[derive(Debug, Clone)]
pub enum Incoming<'a> {
    /// ChannelData: the channel number and the application data (padding left out).
    Channel {
        /// The channel.
        number: u16,
        /// The data.
        payload: &'a [u8],
    },
    /// A Data indication: the peer it came from and the data.
    Data {
        /// XOR-PEER-ADDRESS.
        peer: Option<SocketAddr>,
        /// DATA.
        payload: &'a [u8],
    },
    /// Any other STUN message.
    Stun(StunMsg<'a>),
}

impl<'a> Incoming<'a> {
    /// Classifies `bytes`; `None` when they are neither ChannelData nor STUN.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        if let Ok(cd) = ChannelData::parse(bytes) {
            return Some(Self::Channel { number: cd.number.0, payload: cd.data });
        }
        let m = StunMsg::parse(bytes).ok()?;
        if m.method() == Method::DATA && m.class() == Class::Indication {
            let peer =
                m.attr(AttrType::XOR_PEER_ADDRESS).and_then(|v| attr::decode_xor_addr(v, &m.transaction_id()).ok());
            if let Some(payload) = m.attr(AttrType::DATA) {
                return Some(Self::Data { peer, payload });
            }
        }
        Some(Self::Stun(m))
    }
}

/// A ChannelData message carrying `payload` on channel `number`, padded to a multiple of four when
/// `padded` (required over TCP and TLS, RFC 8656 §12.5). `None` when the payload exceeds 65535 bytes.
pub fn channel_data(number: u16, payload: &[u8], padded: bool) -> Option<Vec<u8>> {
    let len = u16::try_from(payload.len()).ok()?;
    let total = if padded { pad4(CHANNEL_HEADER_LEN + payload.len()) } else { CHANNEL_HEADER_LEN + payload.len() };
    let mut frame = Vec::with_capacity(total);
    frame.extend_from_slice(&number.to_be_bytes());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    frame.resize(total, 0);
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_proto::MsgWriter;

    #[test]
    fn channel_data_is_padded_only_when_asked_and_parses_back() {
        let plain = channel_data(0x4001, b"odd", false).unwrap();
        assert_eq!(plain, [0x40, 0x01, 0, 3, b'o', b'd', b'd']);
        let padded = channel_data(0x4001, b"odd", true).unwrap();
        assert_eq!(padded.len(), 8);
        assert!(matches!(Incoming::parse(&padded), Some(Incoming::Channel { number: 0x4001, payload: b"odd" })));
        assert!(channel_data(0x4000, &vec![0; 65_536], false).is_none());
    }

    #[test]
    fn data_indications_and_other_messages_are_told_apart() {
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let mut buf = [0u8; 128];
        let mut w = MsgWriter::new(&mut buf, Method::DATA, Class::Indication, TransactionId([3; 12]));
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
        w.add_bytes(AttrType::DATA, b"hello");
        let n = w.finish().unwrap();
        let incoming = Incoming::parse(&buf[..n]);
        assert!(matches!(incoming, Some(Incoming::Data { peer: Some(p), payload: b"hello" }) if p == peer));
        let mut w = MsgWriter::new(&mut buf, Method::BINDING, Class::Success, TransactionId([4; 12]));
        w.add_xor_addr(AttrType::XOR_MAPPED_ADDRESS, peer);
        let n = w.finish().unwrap();
        let Some(Incoming::Stun(m)) = Incoming::parse(&buf[..n]) else { panic!("a Binding success is STUN") };
        assert_eq!(m.class(), Class::Success);
        let answer = Answer::parse(&buf[..n]).unwrap();
        assert_eq!(answer.xor_addr(AttrType::XOR_MAPPED_ADDRESS), Some(peer));
        assert_eq!(answer.code(), None);
        assert!(Incoming::parse(&[0xff; 3]).is_none());
    }
}
