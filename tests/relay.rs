//! The real server on loopback with 2 shards, driven by a small TURN client over UDP.

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use common::{EchoPeer, TurnClient, start_server};
use std::collections::HashSet;
use std::net::UdpSocket;
use std::time::Duration;
use turnpike::proto::attr::AttrType;
use turnpike::proto::{Class, Method};
use turnpike_client::Credentials;

/// RFC 8656 end to end: Allocate -> CreatePermission -> ChannelBind -> ChannelData both ways ->
/// Send/Data indications -> Refresh(0), for many clients spread by the kernel over both shards.
#[test]
fn many_clients_relay_through_two_shards() {
    let server = start_server(2, (42000, 42199), "");
    let addr = server.udp_addrs[0];
    let peer = EchoPeer::start();
    let mut clients: Vec<TurnClient> =
        (0..16).map(|i| TurnClient::rest(addr, &format!("@user{i}:example.org"))).collect();
    let mut relays = HashSet::new();
    for c in &mut clients {
        let relayed = c.allocate();
        assert!((42000..=42199).contains(&relayed.port()));
        assert!(relays.insert(relayed), "relay address handed out twice");
        assert_eq!(c.channel_bind(0x4000, peer.addr).class(), Class::Success);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let payload = format!("channel payload {i}");
        c.send_channel(0x4000, payload.as_bytes());
        let (channel, _, data) = c.recv_data().expect("echo over the channel");
        assert_eq!(channel, Some(0x4000));
        assert_eq!(data, payload.as_bytes());
    }
    // Send indication to a second peer port: needs only the permission (same IP), comes back as Data.
    let peer2 = EchoPeer::start();
    for c in &mut clients {
        c.send_indication(peer2.addr, b"indication");
        let (channel, from, data) = c.recv_data().expect("echo as a Data indication");
        assert_eq!((channel, from), (None, Some(peer2.addr)));
        assert_eq!(data, b"indication");
    }
    let per_shard: Vec<u64> =
        server.stats.iter().map(|s| turnpike::proto::stats::read(&s.engine.allocations_created)).collect();
    assert_eq!(per_shard.iter().sum::<u64>(), 16);
    assert!(per_shard.iter().all(|&n| n > 0), "SO_REUSEPORT spreads clients over both shards: {per_shard:?}");
    assert_eq!(server.shared.quotas.total(), 16);
    for c in &mut clients {
        let r = c.refresh(0);
        assert_eq!(r.class(), Class::Success);
    }
    let totals = server.totals();
    assert_eq!(totals.engine.allocations(), 0);
    assert_eq!(totals.engine.packets[0], 32);
    assert_eq!(totals.engine.packets[1], 32);
    assert_eq!(server.shared.quotas.total(), 0);
    server.shutdown();
}

#[test]
fn unauthenticated_requests_get_401_with_realm_and_nonce() {
    let server = start_server(2, (42200, 42209), "");
    let mut c = TurnClient::rest(server.udp_addrs[0], "x");
    let req = c.build(Method::ALLOCATE, Class::Request, false, &|w| {
        w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let r = c.transact(&req);
    assert_eq!(r.code(), Some(401));
    assert_eq!(r.attr(AttrType::REALM).unwrap(), common::REALM.as_bytes());
    assert!(r.attr(AttrType::NONCE).is_some());
    assert!(r.attr(AttrType::MESSAGE_INTEGRITY).is_none());
    assert!(r.attr(AttrType::SOFTWARE).is_none(), "no SOFTWARE unless configured");
    // A Binding request needs no credentials.
    let req = c.build(Method::BINDING, Class::Request, false, &|_| {});
    let r = c.transact(&req);
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.xor_addr(AttrType::XOR_MAPPED_ADDRESS), Some(c.sock().local_addr().unwrap()));
}

/// Random, truncated and mutated datagrams never stop the server: afterwards it still answers Binding
/// and relays on an allocation made before the barrage.
#[test]
fn malformed_barrage_is_dropped_and_service_continues() {
    let server = start_server(2, (42300, 42309), "");
    let addr = server.udp_addrs[0];
    let peer = EchoPeer::start();
    let mut c = TurnClient::rest(addr, "steady");
    c.allocate();
    assert_eq!(c.channel_bind(0x4001, peer.addr).class(), Class::Success);
    // The template is signed with a key the server does not know, so no mutation of it can turn into a
    // valid request (a mutated copy of a correctly signed one may legitimately be accepted: flipping the
    // FINGERPRINT type, say, leaves an ignorable attribute after MESSAGE-INTEGRITY).
    let mut forger = TurnClient::with_key(addr, c.username(), [0x55; 16]);
    forger.set_nonce(&c.nonce());
    let valid = forger.build(Method::ALLOCATE, Class::Request, true, &|w| {
        w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let attacker = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..20_000u32 {
        let mut pkt = match i % 5 {
            0 => (0..(rand() % 200) as usize).map(|_| rand() as u8).collect::<Vec<u8>>(),
            1 => valid[..(rand() as usize % valid.len())].to_vec(),
            2 => {
                let mut m = valid.clone();
                let at = rand() as usize % m.len();
                m[at] ^= 1 << (rand() % 8);
                m
            }
            3 => {
                let mut m = valid.clone();
                m[2..4].copy_from_slice(&((rand() % 4000) as u16).to_be_bytes());
                m
            }
            _ => vec![0x40, (rand() % 256) as u8, 0xFF, 0xFF, 1, 2, 3],
        };
        if pkt.is_empty() {
            pkt.push(0);
        }
        let _ = attacker.send_to(&pkt, addr);
        if i % 2000 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let req = c.build(Method::BINDING, Class::Request, false, &|_| {});
    assert_eq!(c.transact(&req).class(), Class::Success);
    c.send_channel(0x4001, b"still relaying");
    let (_, _, data) = c.recv_data().expect("relay works after the barrage");
    assert_eq!(data, b"still relaying");
    let totals = server.totals();
    assert!(totals.engine.dropped() > 1000, "garbage was counted as dropped: {totals:?}");
    assert_eq!(totals.engine.allocations(), 1, "garbage created no allocation");
}

#[test]
fn relay_ports_exhausted_is_508_and_freed_on_delete() {
    // 4 ports, 2 shards: each shard owns one pair.
    let server = start_server(2, (42400, 42403), "");
    let addr = server.udp_addrs[0];
    let mut ok = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        let mut c = TurnClient::rest(addr, &format!("u{i}"));
        let r = c.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
        match r.code() {
            None => ok.push(c),
            Some(508) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ok.len() <= 4 && refused >= 2, "{} granted, {refused} refused", ok.len());
    let mut first = ok.remove(0);
    assert_eq!(first.refresh(0).class(), Class::Success);
    assert_eq!(server.totals().engine.allocations() as usize, ok.len());
}

#[test]
fn static_user_and_wrong_password() {
    let server = start_server(1, (42500, 42509), "");
    let addr = server.udp_addrs[0];
    let mut alice = TurnClient::with_credentials(addr, Credentials::user("alice", b"wonderland"));
    alice.allocate();
    let mut mallory = TurnClient::with_credentials(addr, Credentials::user("alice", b"guess"));
    let r = mallory.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
    assert_eq!(r.code(), Some(401));
    assert_eq!(server.totals().engine.auth_failures.iter().sum::<u64>(), 1);
}

#[test]
fn shutdown_closes_relay_sockets() {
    let server = start_server(2, (42600, 42603), "");
    let mut c = TurnClient::rest(server.udp_addrs[0], "x");
    let relayed = c.allocate();
    assert!(UdpSocket::bind(relayed).is_err(), "the relay port is held");
    server.shutdown();
    assert!(UdpSocket::bind(relayed).is_ok(), "freed on shutdown");
}

/// A deleted allocation's relay socket stays open as a spare and serves a later allocation: what
/// peers send to it meanwhile is read and dropped, not delivered to the next client, and relaying
/// through the reused socket works both ways.
#[test]
fn spare_relay_sockets_are_drained_and_serve_the_next_allocations() {
    use turnpike::proto::DropReason;
    // 80 ports on one shard: up to 10 spares.
    let server = start_server(1, (42700, 42779), "");
    let addr = server.udp_addrs[0];
    let mut first: Vec<TurnClient> = (0..10).map(|i| TurnClient::rest(addr, &format!("a{i}"))).collect();
    let relayed: Vec<_> = first.iter_mut().map(TurnClient::allocate).collect();
    for c in &mut first {
        assert_eq!(c.refresh(0).class(), Class::Success);
    }
    let totals = server.totals();
    assert_eq!((totals.engine.allocations(), totals.engine.spare_relay_sockets), (0, 10));
    for r in &relayed {
        assert!(UdpSocket::bind(r).is_err(), "{r}: a spare keeps its port");
    }
    // A peer that had talked to the old allocations goes on sending to them.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for r in &relayed {
        for _ in 0..5 {
            peer.send_to(b"stale", r).unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.totals().engine.drops[DropReason::NoAllocation.index()] < 50 {
        assert!(std::time::Instant::now() < deadline, "datagrams to spares were not read: {:?}", server.totals());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = TurnClient::rest(addr, "b");
    let mine = c.allocate();
    assert!(relayed.contains(&mine), "{mine} is not one of the spares {relayed:?}");
    assert_eq!(server.totals().engine.spare_relay_sockets, 9);
    assert_eq!(c.channel_bind(0x4000, peer.local_addr().unwrap()).class(), Class::Success);
    peer.send_to(b"fresh", mine).unwrap();
    let (channel, _, payload) = c.recv_data().expect("relayed to the client");
    assert_eq!((channel, payload.as_slice()), (Some(0x4000), &b"fresh"[..]), "the first data is the new one");
    c.send_channel(0x4000, b"back");
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"back"[..], mine));
}
