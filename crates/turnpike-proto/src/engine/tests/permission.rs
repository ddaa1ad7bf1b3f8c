//! CreatePermission and ChannelBind: the peer policy, this server's own addresses, caps and rules.

use super::*;

#[test]
fn peer_policy_403_and_family_443() {
    let mut h = harness();
    let mut c = Client::rest(40008, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    for denied in ["127.0.0.1:80", "10.0.0.1:80", "169.254.169.254:80", "0.0.0.0:80", "224.0.0.1:80"] {
        let r = h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(denied.parse().unwrap()));
        assert_eq!(r.code(), Some(403), "{denied}");
        let r = h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, denied.parse().unwrap()));
        assert_eq!(r.code(), Some(403), "{denied}");
    }
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr("[::ffff:127.0.0.1]:80".parse().unwrap()));
    assert_eq!(r.code(), Some(443), "an IPv6 spelling on an IPv4 allocation is a family mismatch");
    // All-or-nothing: one bad peer in the list installs none.
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |w| {
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer());
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, "10.1.1.1:1".parse().unwrap());
    });
    assert_eq!(r.code(), Some(403));
    assert_eq!(h.peer_sends(0, peer(), b"x"), Action::Drop(DropReason::NoPermission));
}

/// The policy denies the relay's own addresses (203.0.113.9 advertised, 127.0.0.1 bound), but the
/// relayed addresses of live allocations stay reachable (client -> TURN -> TURN -> client): only
/// those, not another port of the relay range where another program may listen, and not once the
/// allocation is gone; in both directions.
#[test]
fn own_relay_exception_reaches_only_live_relayed_addresses() {
    let mut h = harness();
    let mut a = Client::rest(40090, "a", UNIX0 + 3600);
    let mut b = Client::rest(40091, "b", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a).class(), Class::Success);
    let relayed_b = h.allocate(&mut b).xor_addr(AttrType::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed_b.ip(), "203.0.113.9".parse::<IpAddr>().unwrap());
    let bound_b = SocketAddr::new("127.0.0.1".parse().unwrap(), relayed_b.port());
    let busy: Vec<u16> = h.io.ports.values().copied().collect();
    let idle_port = (PORTS.0..=PORTS.1).find(|p| !busy.contains(p)).unwrap();
    for not_live in [SocketAddr::new(relayed_b.ip(), idle_port), SocketAddr::new(bound_b.ip(), idle_port)] {
        let r = h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(not_live));
        assert_eq!(r.code(), Some(403), "{not_live} is in the relay range but no allocation's");
        let r = h.authed(&mut a, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, not_live));
        assert_eq!(r.code(), Some(403), "{not_live}");
    }
    for live in [relayed_b, bound_b] {
        let r = h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(live));
        assert_eq!(r.class(), Class::Success, "{live} is a live relayed address");
    }
    // The permission is for the IP; the data path still lets only the live relayed address through.
    let to_b = h.send(a.tuple, &send_indication(relayed_b, b"to b"));
    assert!(matches!(to_b, Action::ToPeer { peer, .. } if peer == relayed_b), "{to_b:?}");
    let elsewhere = SocketAddr::new(relayed_b.ip(), idle_port);
    assert_eq!(h.send(a.tuple, &send_indication(elsewhere, b"x")), Action::Drop(DropReason::NoPermission));
    assert!(matches!(h.peer_sends(0, bound_b, b"from b"), Action::ToClient { .. }));
    assert_eq!(h.peer_sends(0, SocketAddr::new(bound_b.ip(), idle_port), b"x"), Action::Drop(DropReason::NoPermission));
    // Once b's allocation is deleted its address is closed too.
    let r = h.authed(&mut b, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.send(a.tuple, &send_indication(relayed_b, b"x")), Action::Drop(DropReason::NoPermission));
    assert_eq!(h.peer_sends(0, bound_b, b"x"), Action::Drop(DropReason::NoPermission));
    let r = h.authed(&mut a, Method::CHANNEL_BIND, channel_bind_attrs(0x4002, relayed_b));
    assert_eq!(r.code(), Some(403));
}

#[test]
fn several_peers_in_one_create_permission_and_the_cap() {
    let mut h = harness();
    let mut c = Client::rest(40009, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |w| {
        for i in 1..=3u8 {
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, SocketAddr::new(IpAddr::from([8, 8, 4, i]), 1));
        }
    });
    assert_eq!(r.class(), Class::Success);
    for i in 1..=3u8 {
        assert!(matches!(
            h.peer_sends(0, SocketAddr::new(IpAddr::from([8, 8, 4, i]), 9), b"x"),
            Action::ToClient { .. }
        ));
    }
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |w| {
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, "8.8.4.4:1".parse().unwrap());
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, "8.8.4.5:1".parse().unwrap());
    });
    assert_eq!(r.code(), Some(508), "max_permissions = 4");
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |_| {});
    assert_eq!(r.code(), Some(400), "no XOR-PEER-ADDRESS");
}

/// RFC 8656 §11.2: channel numbers 0x4000-0x4FFF; no rebinding a number or a peer to something else,
/// also during the 5-minute cool-down after expiry; refreshing the same pair is fine.
#[test]
fn channel_bind_rules() {
    let mut h = harness();
    let mut c = Client::rest(40019, "u", UNIX0 + 99_999);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let p2: SocketAddr = PEER2.parse().unwrap();
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x3FFF, peer())).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x5000, peer())).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, p2)).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, peer())).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, p2)).class(), Class::Success);
    // Keep the allocation alive, let the channels lapse.
    h.advance(590);
    assert_eq!(h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 3600)).class(), Class::Success);
    h.advance(20);
    assert_eq!(h.send(c.tuple, &channel_data(0x4000, b"x")), Action::Drop(DropReason::NoChannel));
    // Cooling down: the number cannot move to another peer yet, but the same pair can be re-bound.
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, p2)).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, p2)).class(), Class::Success);
    h.advance(301);
    assert_eq!(
        h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, "8.8.4.4:1".parse().unwrap())).class(),
        Class::Success
    );
}

/// RFC 5766 clients (coturn's turnutils among them) bind numbers up to 0x7FFF; accepted unless strict.
#[test]
fn legacy_channel_numbers_when_enabled() {
    let mut s = settings();
    s.legacy_channel_numbers = true;
    let mut h = harness_with(s);
    let mut c = Client::rest(40080, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x7FFF, peer())).class(), Class::Success);
    assert_eq!(
        h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x8000, PEER2.parse().unwrap())).code(),
        Some(400)
    );
    let Action::ToPeer { range, .. } = h.send(c.tuple, &channel_data(0x7FFF, b"old")) else { panic!() };
    assert_eq!(h.pkt.get(range), b"old");
}

/// A relay on a public address (which the policy permits) and its listening address: only live
/// relayed addresses are reachable there, not the host's other services, unless the operator names
/// the address in `peers.allowed` (a service on the relay's host); a reload that drops the name closes
/// those permissions down to the live relayed addresses again.
#[test]
fn own_public_addresses_reach_only_live_relays_unless_named() {
    let public: IpAddr = "192.88.100.9".parse().unwrap();
    let listening: IpAddr = "192.88.100.10".parse().unwrap();
    let mut s = settings();
    s.relay_v4 = vec![RelayAddr { bind: public, advertised: public }];
    let relays = s.relay_v4.iter().map(|r| (r.bind, r.advertised));
    let shared = Arc::new(LocalCluster::new(relays, [listening]));
    let mut h = harness_on(s.clone(), PORTS);
    h.engine.cluster = Arc::clone(&shared) as Arc<dyn Cluster>;
    h.cluster = shared;
    let mut a = Client::rest(40100, "a", UNIX0 + 3600);
    let mut b = Client::rest(40101, "b", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a).class(), Class::Success);
    let relayed_b = h.allocate(&mut b).xor_addr(AttrType::XOR_RELAYED_ADDRESS);
    for service in [SocketAddr::new(public, 22), SocketAddr::new(public, 53), SocketAddr::new(listening, 3478)] {
        let r = h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(service));
        assert_eq!(r.code(), Some(403), "{service}: another program on the relay's host");
    }
    assert_eq!(h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(relayed_b)).class(), Class::Success);
    assert!(matches!(h.send(a.tuple, &send_indication(relayed_b, b"x")), Action::ToPeer { .. }));
    let ssh = SocketAddr::new(public, 22);
    assert_eq!(h.send(a.tuple, &send_indication(ssh, b"x")), Action::Drop(DropReason::NoPermission));
    // Named by the operator: every port of it.
    let mut named = s.clone();
    named.peer_policy = PeerPolicy::new(vec![IpRange::cidr(public, 32).unwrap()], vec![], true, false);
    h.engine.reload(h.now, Arc::new(named));
    assert_eq!(h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(ssh)).class(), Class::Success);
    assert!(matches!(h.send(a.tuple, &send_indication(ssh, b"x")), Action::ToPeer { .. }));
    // Unnamed again: back to the live relayed addresses only.
    h.engine.reload(h.now, Arc::new(s));
    assert_eq!(h.send(a.tuple, &send_indication(ssh, b"x")), Action::Drop(DropReason::NoPermission));
    assert!(matches!(h.send(a.tuple, &send_indication(relayed_b, b"x")), Action::ToPeer { .. }));
}
