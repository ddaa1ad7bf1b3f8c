//! Codec tests, compiled only under #[cfg(test)]: RFC 5769 test vectors, round trips, and never-panic properties.

use super::*;
use crate::attr::{decode_plain_addr, decode_xor_addr};
use crate::integrity::long_term_key;
use crate::stun::verify_message_integrity;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// RFC 5769 §2.1 Sample Request.
fn sample_request() -> Vec<u8> {
    hex("00010058 2112a442 b7e7a701 bc34d686 fa87dfae 80220010 5354554e 20746573 7420636c 69656e74
         00240004 6e0001ff 80290008 932ff9b1 51263b36 00060009 6576746a 3a683676 59202020
         00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2 80280004 e57a3bcf")
}

/// RFC 5769 §2.2 Sample IPv4 Response.
fn sample_ipv4_response() -> Vec<u8> {
    hex("0101003c 2112a442 b7e7a701 bc34d686 fa87dfae 8022000b 74657374 20766563 746f7220
         00200008 0001a147 e112a643 00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
         80280004 c07d4c96")
}

/// RFC 5769 §2.3 Sample IPv6 Response.
fn sample_ipv6_response() -> Vec<u8> {
    hex("01010048 2112a442 b7e7a701 bc34d686 fa87dfae 8022000b 74657374 20766563 746f7220
         00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9 00080014 a382954e 4be67bf1
         1784c97c 8292c275 bfe3ed41 80280004 c8fb0b4c")
}

/// RFC 5769 §2.4 Sample Request with Long-Term Authentication.
fn sample_long_term_request() -> Vec<u8> {
    hex("00010060 2112a442 78ad3433 c6ad72c0 29da412e 00060012 e3839ee3 8388e383 aae38383
         e382afe3 82b90000 0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679
         36347341 0014000b 6578616d 706c652e 6f726700 00080014 f6702465 6dd64a3e 02b8e071
         2e85c9a2 8ca89666")
}

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

#[test]
fn rfc5769_2_1_sample_request() {
    let bytes = sample_request();
    let msg = StunMsg::parse(&bytes).unwrap();
    assert_eq!(msg.class(), Class::Request);
    assert_eq!(msg.method(), Method::BINDING);
    assert!(msg.has_fingerprint());
    assert_eq!(msg.attr(AttrType::SOFTWARE), Some(&b"STUN test client"[..]));
    assert_eq!(msg.attr(AttrType::USERNAME), Some(&b"evtj:h6vY"[..]));
    assert!(verify_message_integrity(&msg, SHORT_TERM_PASSWORD));
    assert!(!verify_message_integrity(&msg, b"wrong"));
}

#[test]
fn rfc5769_2_2_ipv4_response() {
    let bytes = sample_ipv4_response();
    let msg = StunMsg::parse(&bytes).unwrap();
    assert_eq!(msg.class(), Class::Success);
    let addr = decode_xor_addr(msg.attr(AttrType::XOR_MAPPED_ADDRESS).unwrap(), &msg.transaction_id()).unwrap();
    assert_eq!(addr, "192.0.2.1:32853".parse().unwrap());
    assert!(verify_message_integrity(&msg, SHORT_TERM_PASSWORD));
}

#[test]
fn rfc5769_2_3_ipv6_response() {
    let bytes = sample_ipv6_response();
    let msg = StunMsg::parse(&bytes).unwrap();
    let addr = decode_xor_addr(msg.attr(AttrType::XOR_MAPPED_ADDRESS).unwrap(), &msg.transaction_id()).unwrap();
    assert_eq!(addr, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap());
    assert!(verify_message_integrity(&msg, SHORT_TERM_PASSWORD));
}

#[test]
fn rfc5769_2_4_long_term_request() {
    let bytes = sample_long_term_request();
    let msg = StunMsg::parse(&bytes).unwrap();
    let username = msg.attr(AttrType::USERNAME).unwrap();
    assert_eq!(std::str::from_utf8(username).unwrap(), "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}");
    assert_eq!(msg.attr(AttrType::NONCE), Some(&b"f//499k954d6OL34oL9FSTvy64sA"[..]));
    assert_eq!(msg.attr(AttrType::REALM), Some(&b"example.org"[..]));
    // The password after SASLprep is "TheMatrIX".
    let key = long_term_key(username, b"example.org", b"TheMatrIX");
    assert!(verify_message_integrity(&msg, &key));
}

#[test]
fn writer_reproduces_rfc5769_ipv4_response() {
    let expected = sample_ipv4_response();
    let mut tid = [0u8; 12];
    tid.copy_from_slice(&expected[8..20]);
    let mut buf = [0u8; 128];
    let mut w = MsgWriter::new(&mut buf, Method::BINDING, Class::Success, TransactionId(tid));
    // The vector pads SOFTWARE with a space, not a zero; write the padded value, then fix the length.
    w.add_bytes(AttrType::SOFTWARE, b"test vector ");
    w.add_xor_addr(AttrType::XOR_MAPPED_ADDRESS, "192.0.2.1:32853".parse().unwrap());
    let len = {
        let mut w2 = w;
        w2.buf[22..24].copy_from_slice(&11u16.to_be_bytes());
        w2.add_message_integrity(SHORT_TERM_PASSWORD);
        w2.add_fingerprint();
        w2.finish().unwrap()
    };
    assert_eq!(&buf[..len], &expected[..]);
}

#[test]
fn message_type_round_trip() {
    for m in [Method::BINDING, Method::ALLOCATE, Method::CHANNEL_BIND, Method(0xFFF)] {
        for c in [Class::Request, Class::Indication, Class::Success, Class::Error] {
            assert_eq!(split_message_type(message_type(m, c)), (m, c));
        }
    }
    assert_eq!(message_type(Method::ALLOCATE, Class::Error), 0x0113);
    assert_eq!(message_type(Method::DATA, Class::Indication), 0x0017);
}

#[test]
fn rejects_malformed_headers() {
    let good = sample_request();
    assert_eq!(StunMsg::parse(&good[..19]).unwrap_err(), ParseError::Truncated("header"));
    let mut bad = good.clone();
    bad[4] ^= 1;
    assert_eq!(StunMsg::parse(&bad).unwrap_err(), ParseError::BadMagicCookie);
    let mut bad = good.clone();
    bad[0] |= 0x80;
    assert_eq!(StunMsg::parse(&bad).unwrap_err(), ParseError::NotStun);
    let mut bad = good.clone();
    bad[3] += 4;
    assert!(matches!(StunMsg::parse(&bad).unwrap_err(), ParseError::BadLength(_)));
    let mut bad = good.clone();
    bad[3] += 1;
    assert!(matches!(StunMsg::parse(&bad).unwrap_err(), ParseError::BadLength(_)));
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert_eq!(StunMsg::parse(&bad).unwrap_err(), ParseError::BadFingerprint);
    // An attribute whose length runs past the end.
    let mut bad = good;
    bad[22..24].copy_from_slice(&0x0100u16.to_be_bytes());
    assert_eq!(StunMsg::parse(&bad).unwrap_err(), ParseError::Truncated("attribute value"));
}

#[test]
fn writer_reports_no_space_instead_of_panicking() {
    let mut buf = [0u8; 30];
    let mut w = MsgWriter::new(&mut buf, Method::BINDING, Class::Request, TransactionId([1; 12]));
    w.add_bytes(AttrType::SOFTWARE, &[0u8; 64]);
    w.add_fingerprint();
    assert!(w.finish().is_err());
    let mut tiny = [0u8; 4];
    assert!(MsgWriter::new(&mut tiny, Method::BINDING, Class::Request, TransactionId([1; 12])).finish().is_err());
}

#[test]
fn plain_address_decoding() {
    let v4 = [0, 1, 0x12, 0x34, 10, 0, 0, 1];
    assert_eq!(decode_plain_addr(&v4).unwrap(), "10.0.0.1:4660".parse().unwrap());
    assert!(decode_plain_addr(&[0, 3, 0, 0, 1, 2, 3, 4]).is_err());
    assert!(decode_plain_addr(&[0, 1, 0]).is_err());
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(msg) = StunMsg::parse(&bytes) {
            for a in msg.attrs() {
                let _ = decode_xor_addr(a.value, &msg.transaction_id());
                let _ = attr::decode_error_code(a.value);
            }
        }
        let _ = crate::ChannelData::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_stun_shaped_input(body in proptest::collection::vec(any::<u8>(), 0..300), typ in any::<u16>()) {
        let mut bytes = Vec::with_capacity(20 + body.len());
        bytes.extend_from_slice(&(typ & 0x3FFF).to_be_bytes());
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        bytes.extend_from_slice(&[7; 12]);
        bytes.extend_from_slice(&body);
        if let Ok(msg) = StunMsg::parse(&bytes) {
            prop_assert!(msg.attrs().count() <= body.len() / 4);
        }
    }

    #[test]
    fn encode_then_decode_is_identity(
        port in any::<u16>(), v4 in any::<[u8; 4]>(), v6 in any::<[u8; 16]>(), tid in any::<[u8; 12]>(),
        user in "[a-z0-9:]{1,40}", lifetime in any::<u32>(), key in any::<[u8; 16]>(),
    ) {
        let a4 = SocketAddr::new(std::net::IpAddr::from(v4), port);
        let a6 = SocketAddr::new(std::net::IpAddr::from(v6), port);
        let mut buf = [0u8; 512];
        let mut w = MsgWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TransactionId(tid));
        w.add_bytes(AttrType::USERNAME, user.as_bytes());
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, a4);
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, a6);
        w.add_u32(AttrType::LIFETIME, lifetime);
        w.add_message_integrity(&key);
        w.add_fingerprint();
        let len = w.finish().unwrap();
        let msg = StunMsg::parse(&buf[..len]).unwrap();
        prop_assert_eq!(msg.transaction_id(), TransactionId(tid));
        prop_assert_eq!(msg.attr(AttrType::USERNAME), Some(user.as_bytes()));
        let peers: Vec<SocketAddr> = msg.attrs().filter(|a| a.typ == AttrType::XOR_PEER_ADDRESS)
            .map(|a| decode_xor_addr(a.value, &msg.transaction_id()).unwrap()).collect();
        prop_assert_eq!(peers, vec![a4, a6]);
        prop_assert_eq!(attr::decode_u32(msg.attr(AttrType::LIFETIME).unwrap()).unwrap(), lifetime);
        prop_assert!(verify_message_integrity(&msg, &key));
        prop_assert!(msg.has_fingerprint());
    }
}
