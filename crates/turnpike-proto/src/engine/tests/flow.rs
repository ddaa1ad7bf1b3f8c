//! Whole exchanges: the RFC 8656 flow end to end, retransmissions, errors of form and transport, and
//! random sequences.

use super::*;

/// RFC 8656 §7-§12: 401 -> Allocate -> CreatePermission -> ChannelBind -> data both ways -> Refresh(0).
#[test]
fn full_flow_over_rest_credentials() {
    let mut h = harness();
    let mut c = Client::rest(40000, "@alice:example.org", UNIX0 + 3600);

    // Unauthenticated: 401 with REALM and NONCE and no MESSAGE-INTEGRITY.
    let req = c.request(Method::ALLOCATE, false, udp_transport);
    let r = h.request(c.tuple, &req);
    assert_eq!((r.class(), r.code()), (Class::Error, Some(401)));
    assert_eq!(r.attr(AttrType::REALM).unwrap(), REALM.as_bytes());
    assert!(r.attr(AttrType::MESSAGE_INTEGRITY).is_none());
    assert!(r.attr(AttrType::ERROR_CODE).unwrap().len() == 4, "no reason phrase by default");
    c.nonce = r.attr(AttrType::NONCE).unwrap();

    let r = h.allocate(&mut c);
    assert_eq!(r.class(), Class::Success);
    assert!(verify_message_integrity(&r.msg(), &c.key));
    let relayed = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.ip(), "203.0.113.9".parse::<IpAddr>().unwrap(), "advertises the external address");
    assert!((50_000..50_010).contains(&relayed.port()));
    assert_eq!(r.xor_addr(AttrType::XOR_MAPPED_ADDRESS), c.tuple.client);
    assert_eq!(r.lifetime(), 600);
    assert_eq!(h.io.open.len(), 1);

    // No permission yet: peer data is dropped silently.
    assert_eq!(h.peer_sends(0, peer(), b"early"), Action::Drop(DropReason::NoPermission));

    let r = h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(peer()));
    assert_eq!(r.class(), Class::Success);
    assert!(verify_message_integrity(&r.msg(), &c.key));

    let r = h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, peer()));
    assert_eq!(r.class(), Class::Success);

    // Client -> peer over the channel: the payload is forwarded in place.
    let action = h.send(c.tuple, &channel_data(0x4001, b"hello peer"));
    let Action::ToPeer { key, peer: to, range } = action else { panic!("{action:?}") };
    assert_eq!((key, to), (RelayKey::new(0, Half::Primary), peer()));
    assert_eq!(h.pkt.get(range), b"hello peer");

    // Peer -> client: a ChannelData header is written in front of the payload.
    let action = h.peer_sends(0, peer(), b"hi client");
    let Action::ToClient { tuple: t, range } = action else { panic!("{action:?}") };
    assert_eq!(t, c.tuple);
    assert_eq!(h.pkt.get(range), &channel_data(0x4001, b"hi client")[..]);

    // Another port of the same permitted IP has no channel: Data indication.
    let other_port: SocketAddr = "8.8.8.8:5001".parse().unwrap();
    let action = h.peer_sends(0, other_port, b"via indication");
    let Action::ToClient { range, .. } = action else { panic!("{action:?}") };
    let bytes = h.pkt.get(range).to_vec();
    let msg = StunMsg::parse(&bytes).unwrap();
    assert_eq!((msg.class(), msg.method()), (Class::Indication, Method::DATA));
    assert_eq!(msg.attr(AttrType::DATA), Some(&b"via indication"[..]));
    assert_eq!(
        attr::decode_xor_addr(msg.attr(AttrType::XOR_PEER_ADDRESS).unwrap(), &msg.transaction_id()).unwrap(),
        other_port
    );

    // Send indication client -> peer.
    let mut buf = [0u8; 128];
    let mut w = MsgWriter::new(&mut buf, Method::SEND, Class::Indication, TransactionId([9; 12]));
    w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, other_port);
    w.add_bytes(AttrType::DATA, b"sent");
    let len = w.finish().unwrap();
    let action = h.send(c.tuple, &buf[..len]);
    let Action::ToPeer { peer: to, range, .. } = action else { panic!("{action:?}") };
    assert_eq!(to, other_port);
    assert_eq!(h.pkt.get(range), b"sent");

    // Refresh(0) deletes the allocation, closes the socket and frees the quota.
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.lifetime(), 0);
    assert!(h.io.open.is_empty());
    assert_eq!(h.cluster.total(), 0);
    assert_eq!(h.send(c.tuple, &channel_data(0x4001, b"late")), Action::Drop(DropReason::NoAllocation));
}

/// RFC 8656 §7.2 (2): a second Allocate on the same 5-tuple gets 437.
#[test]
fn second_allocate_is_437() {
    let mut h = harness();
    let mut c = Client::rest(40001, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let r = h.allocate(&mut c);
    assert_eq!(r.code(), Some(437));
    assert!(verify_message_integrity(&r.msg(), &c.key), "authenticated errors carry MESSAGE-INTEGRITY");
}

/// RFC 8656 §7.2: a retransmitted Allocate gets the very same success response.
#[test]
fn retransmitted_allocate_gets_the_same_answer() {
    let mut h = harness();
    let mut c = Client::rest(40002, "u", UNIX0 + 3600);
    let r = h.request(c.tuple, &c.request(Method::ALLOCATE, false, udp_transport));
    c.nonce = r.attr(AttrType::NONCE).unwrap();
    let req = c.request(Method::ALLOCATE, true, udp_transport);
    let first = h.request(c.tuple, &req);
    h.advance(1);
    let second = h.request(c.tuple, &req);
    assert_eq!(first.class(), Class::Success);
    assert_eq!(first.bytes, second.bytes);
    assert_eq!(h.io.open.len(), 1);
}

#[test]
fn binding_unknown_methods_and_junk() {
    let mut h = harness();
    let c = Client::rest(40040, "u", UNIX0 + 3600);
    let req = c.request_with_tid(Method::BINDING, TransactionId([1; 12]), false, |_| {});
    let r = h.request(c.tuple, &req);
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.xor_addr(AttrType::XOR_MAPPED_ADDRESS), c.tuple.client);
    assert!(r.msg().has_fingerprint());
    let req = c.request_with_tid(Method(0x0FF), TransactionId([2; 12]), false, |_| {});
    assert_eq!(h.request(c.tuple, &req).code(), Some(400));
    assert_eq!(h.send(c.tuple, b""), Action::Drop(DropReason::Malformed));
    assert_eq!(h.send(c.tuple, &[0xFF; 40]), Action::Drop(DropReason::Malformed));
    // A success response from a client is unexpected.
    let mut buf = [0u8; 64];
    let len = MsgWriter::new(&mut buf, Method::BINDING, Class::Success, TransactionId([3; 12])).finish().unwrap();
    assert_eq!(h.send(c.tuple, &buf[..len]), Action::Drop(DropReason::Unexpected));
}

#[test]
fn software_and_reason_phrases_when_configured() {
    let mut s = settings();
    s.software = Some("turnpike test".into());
    s.reason_phrases = true;
    let mut h = harness_with(s);
    let c = Client::rest(40050, "u", UNIX0 + 3600);
    let r = h.request(c.tuple, &c.request_with_tid(Method::ALLOCATE, TransactionId([1; 12]), false, udp_transport));
    assert_eq!(r.attr(AttrType::SOFTWARE).unwrap(), b"turnpike test");
    assert_eq!(&r.attr(AttrType::ERROR_CODE).unwrap()[4..], b"Unauthorized");
}

#[test]
fn dont_fragment_is_refused_as_unknown_420() {
    let mut h = harness();
    let mut c = Client::rest(40006, "u", UNIX0 + 3600);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::DONT_FRAGMENT, &[]);
        w.add_bytes(AttrType(0x7777), &[1, 2, 3]);
    });
    assert_eq!(r.code(), Some(420));
    assert_eq!(r.attr(AttrType::UNKNOWN_ATTRIBUTES).unwrap(), vec![0x00, 0x1A, 0x77, 0x77]);
    assert!(verify_message_integrity(&r.msg(), &c.key));
}

#[test]
fn transport_and_family_errors() {
    let mut h = harness();
    let mut c = Client::rest(40007, "u", UNIX0 + 3600);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[6, 0, 0, 0]));
    assert_eq!(r.code(), Some(442));
    let r = h.authed(&mut c, Method::ALLOCATE, |_| {});
    assert_eq!(r.code(), Some(400), "missing REQUESTED-TRANSPORT");
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]);
    });
    assert_eq!(r.code(), Some(440), "no IPv6 relay configured");
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0]);
    });
    assert_eq!(r.code(), Some(440));
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0]);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &[1; 8]);
    });
    assert_eq!(r.code(), Some(400));
    assert_eq!(h.engine.table().len(), 0);
    assert_eq!(h.cluster.total(), 0);
    // A Refresh names a family of the allocation (443 otherwise), in a well-formed attribute (400).
    h.allocate(&mut c);
    let refresh = |h: &mut Harness, c: &mut Client, family: &[u8]| {
        h.authed(c, Method::REFRESH, |w| w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, family)).code()
    };
    assert_eq!(refresh(&mut h, &mut c, &[FAMILY_IPV4, 0, 0, 0]), None);
    assert_eq!(refresh(&mut h, &mut c, &[FAMILY_IPV6, 0, 0, 0]), Some(443));
    assert_eq!(refresh(&mut h, &mut c, &[FAMILY_IPV4, 0]), Some(400));
    assert_eq!(h.engine.table().len(), 1, "refused refreshes keep the allocation");
}

#[test]
fn fuzzed_sequences_never_panic_and_keep_invariants() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    runner
        .run(
            &proptest::collection::vec((0u8..6, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..80),
            |ops| {
                let mut h = harness();
                let mut c = Client::rest(40060, "u", UNIX0 + 99_999);
                for (op, n, bytes) in ops {
                    match op {
                        0 => {
                            let _ = h.allocate(&mut c);
                        }
                        1 => {
                            let _ =
                                h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000 + (n % 8), peer()));
                        }
                        2 => {
                            let _ = h.send(c.tuple, &bytes);
                        }
                        3 => {
                            let _ = h.peer_sends(usize::from(n % 4), peer(), &bytes);
                        }
                        4 => h.advance(u64::from(n % 700)),
                        _ => {
                            let _ = h.authed(&mut c, Method::REFRESH, |w| {
                                w.add_u32(AttrType::LIFETIME, u32::from(n % 2) * 600)
                            });
                        }
                    }
                    if c.nonce.is_empty() {
                        continue;
                    }
                    prop_assert_eq!(h.io.open.len(), h.engine.table().len());
                    prop_assert_eq!(h.cluster.total() as usize, h.engine.table().len());
                }
                Ok(())
            },
        )
        .unwrap();
}
