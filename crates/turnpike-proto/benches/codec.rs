//! The codec on the paths every packet takes: an authenticated Allocate parsed and its
//! MESSAGE-INTEGRITY checked (what a request costs before the state machine sees it), and ChannelData
//! framing (the relay path: parse on the way in, a header written on the way out).

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use turnpike_proto::attr::{AttrType, PROTO_UDP};
use turnpike_proto::channel::{CHANNEL_HEADER_LEN, write_header};
use turnpike_proto::integrity::{long_term_key, rest_password};
use turnpike_proto::stun::verify_message_integrity;
use turnpike_proto::{ChannelData, ChannelNumber, Class, Method, MsgWriter, StunMsg, TransactionId};

/// An Allocate as libwebrtc sends its second one: REQUESTED-TRANSPORT, credentials, FINGERPRINT.
fn signed_allocate(key: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MsgWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TransactionId([7; 12]));
    w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
    w.add_long_term_credentials(b"1800003600:alice", b"turn.example.org", b"0123456789abcdef0123456789abcdef", key);
    w.add_fingerprint();
    let n = w.finish().unwrap_or(0);
    buf.truncate(n);
    buf
}

fn codec(c: &mut Criterion) {
    let password = rest_password(b"secret", b"1800003600:alice");
    let key = long_term_key(b"1800003600:alice", b"turn.example.org", &password);
    let allocate = signed_allocate(&key);
    c.bench_function("parse an Allocate and check its MESSAGE-INTEGRITY", |b| {
        b.iter(|| {
            let msg = StunMsg::parse(black_box(&allocate)).ok();
            msg.is_some_and(|m| verify_message_integrity(&m, black_box(&key)))
        });
    });
    c.bench_function("parse an Allocate (no integrity check)", |b| {
        b.iter(|| StunMsg::parse(black_box(&allocate)).is_ok());
    });

    let mut frame = vec![0x40, 0x00, 0, 172];
    frame.extend_from_slice(&[0xAB; 172]);
    c.bench_function("ChannelData: parse a 172-byte frame", |b| {
        b.iter(|| ChannelData::parse(black_box(&frame)).map(|cd| cd.data.len()).unwrap_or(0));
    });
    let mut slot = [0u8; CHANNEL_HEADER_LEN];
    c.bench_function("ChannelData: write a header", |b| {
        b.iter(|| {
            write_header(&mut slot, black_box(ChannelNumber(0x4000)), black_box(172));
            slot
        });
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
