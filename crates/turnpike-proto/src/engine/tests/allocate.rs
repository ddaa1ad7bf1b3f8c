//! Allocate: quotas, ports and sockets, EVEN-PORT and reservations, spare sockets.

use super::*;

#[test]
fn user_quota_is_486_at_exactly_the_limit() {
    let mut h = harness();
    for port in [40021, 40022] {
        let mut c = Client::rest(port, "@q:example.org", UNIX0 + 3600 + u64::from(port));
        assert_eq!(h.allocate(&mut c).class(), Class::Success);
    }
    let mut c = Client::rest(40023, "@q:example.org", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).code(), Some(486), "the user part, not the whole username, is counted");
    let mut other = Client::rest(40024, "@r:example.org", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut other).class(), Class::Success);
    let mut first = Client::rest(40021, "@q:example.org", UNIX0 + 3600 + 40021);
    let r = h.authed(&mut first, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.allocate(&mut c).class(), Class::Success, "freed by the delete");
}

#[test]
fn ports_exhausted_is_508_and_busy_ports_are_skipped() {
    let mut s = settings();
    s.user_quota = 0;
    let mut h = harness_with(s);
    h.io.busy_ports.extend([50_000, 50_001, 50_002]);
    let mut granted = HashSet::new();
    for i in 0..7u16 {
        let mut c = Client::rest(41000 + i, "u", UNIX0 + 3600);
        let r = h.allocate(&mut c);
        assert_eq!(r.class(), Class::Success);
        let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
        assert!(!h.io.busy_ports.contains(&port));
        assert!(granted.insert(port));
    }
    let mut c = Client::rest(41100, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).code(), Some(508));
    assert_eq!(h.cluster.total(), 7, "a refused allocation holds no quota");
    assert_eq!(read(&h.engine.stats.capacity_refusals), 1);
}

/// A relay socket that cannot be opened (out of descriptors) refuses the Allocate with 508 and loses
/// no port: once sockets open again, the whole range is there.
#[test]
fn socket_failure_is_508_and_keeps_the_port() {
    let mut h = harness();
    h.io.failing = Some(24);
    let mut c = Client::rest(41000, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).code(), Some(508));
    assert_eq!(h.allocate(&mut c).code(), Some(508));
    assert_eq!(read(&h.engine.stats.capacity_refusals), 2);
    assert_eq!(h.cluster.total(), 0);
    assert_eq!(h.engine.free_ports(), 10);
    h.io.failing = None;
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
}

/// Ports held by other programs (a relay range overlapping the ephemeral range) must not gather in one
/// run of the free list: each Allocate tries a bounded number of ports, so a run of busy ports longer
/// than that would refuse allocations while most of the range is free.
#[test]
fn busy_ports_do_not_gather_into_a_run_that_refuses_allocations() {
    let mut h = harness_unlimited(50_000, 50_199);
    // Every fourth port is in use elsewhere: 50 of 200. A round of 60 Allocates meets about 20 of them,
    // more than one Allocate tries, and with all 200 ports cycling every round meets each of them.
    h.io.busy_ports.extend((50_000..=50_199).filter(|p| p % 4 == 0));
    for round in 0..12u16 {
        let mut clients: Vec<Client> =
            (0..60u16).map(|i| Client::rest(41000 + i, "u", UNIX0 + 3600 + u64::from(round))).collect();
        for c in &mut clients {
            let r = h.allocate(c);
            assert_eq!(r.class(), Class::Success, "round {round}, port {}: {:?}", c.tuple.client.port(), r.code());
            assert!(!h.io.busy_ports.contains(&r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port()));
        }
        for c in &mut clients {
            let r = h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
            assert_eq!(r.class(), Class::Success);
        }
    }
}

/// RFC 8656 §7.2: EVEN-PORT with R reserves the next port; RESERVATION-TOKEN claims it.
#[test]
fn even_port_and_reservation_token() {
    let mut h = harness();
    let mut a = Client::rest(40030, "u", UNIX0 + 3600);
    let r = h.authed(&mut a, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.class(), Class::Success);
    let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
    assert_eq!(port % 2, 0);
    let token = r.attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut b = Client::rest(40031, "v", UNIX0 + 3600);
    let r = h.authed(&mut b, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port(), port + 1);
    let mut c = Client::rest(40032, "w", UNIX0 + 3600);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.code(), Some(508), "a token works once");
}

/// A reservation made on one shard can be claimed on another (the kernel steers 5-tuples, not tokens),
/// and an unclaimed one lapses back into the reserving shard's pool after 30 s.
#[test]
fn reservation_tokens_work_across_shards_and_lapse() {
    let mut a = harness();
    let mut b = harness();
    let shared = Arc::clone(&a.cluster);
    b.engine.cluster = Arc::clone(&shared) as Arc<dyn Cluster>;
    let mut c = Client::rest(40070, "u", UNIX0 + 3600);
    let r = a.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
    let token = r.attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut d = Client::rest(40071, "v", UNIX0 + 3600);
    let r = b.authed(&mut d, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port(), port + 1);

    let free_before = a.engine.free_ports();
    let r = a.authed(&mut c.clone(), Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.code(), Some(437), "same 5-tuple");
    let mut e = Client::rest(40072, "w", UNIX0 + 3600);
    let r = a.authed(&mut e, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    assert!(r.attr(AttrType::RESERVATION_TOKEN).is_some());
    assert_eq!(a.engine.free_ports(), free_before - 2);
    a.advance(31);
    assert_eq!(a.engine.free_ports(), free_before - 1, "the unclaimed reserved port came back");
    assert_eq!(shared.reservations(), 0);
}

/// Deleted allocations' relay sockets are parked, up to an eighth of the range, and the next
/// allocations take them over (no fresh socket) at random among at least `MIN_CHOICE`; every port is
/// always exactly one of free, parked or in use.
#[test]
fn deleted_allocations_sockets_serve_the_next_allocations() {
    use crate::spares::MIN_CHOICE;
    let mut h = harness_unlimited(50_000, 50_159);
    h.io.parks = true;
    let accounted = |h: &Harness| h.engine.free_ports() + h.engine.spare_sockets() + h.engine.table().len();
    let mut clients: Vec<Client> = (0..30u16).map(|i| Client::rest(41_000 + i, "u", UNIX0 + 3600)).collect();
    for c in &mut clients {
        assert_eq!(h.allocate(c).class(), Class::Success);
    }
    assert_eq!(h.io.opened, 30);
    for c in &mut clients {
        assert_eq!(h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0)).class(), Class::Success);
        assert_eq!(accounted(&h), 160);
    }
    assert_eq!(h.engine.spare_sockets(), 20, "one in eight of 160 ports");
    assert_eq!(read(&h.engine.stats.spare_relay_sockets), 20);
    assert_eq!(h.io.open.len(), 0);
    let parked: HashSet<u16> = h.io.parked.values().copied().collect();
    let mut reused = Vec::new();
    for i in 0..(20 - MIN_CHOICE + 1) as u16 {
        let mut c = Client::rest(42_000 + i, "v", UNIX0 + 3600);
        let r = h.allocate(&mut c);
        assert_eq!(r.class(), Class::Success);
        let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
        assert!(parked.contains(&port), "port {port} is not a parked one");
        reused.push(port);
        assert_eq!(accounted(&h), 160);
    }
    assert_eq!(h.io.opened, 30, "no fresh socket while spares were there");
    assert_eq!(h.engine.spare_sockets(), MIN_CHOICE - 1);
    assert_eq!(reused.iter().collect::<HashSet<_>>().len(), reused.len(), "a spare is handed out once");
    // Below MIN_CHOICE spares with fresh ports left: a fresh socket.
    let mut c = Client::rest(43_000, "w", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.io.opened, 31);
    assert_eq!(h.engine.spare_sockets(), MIN_CHOICE - 1);
    assert_eq!(accounted(&h), 160);
}

/// With no fresh port left a spare is used however few there are, and a spare the shard cannot put
/// back in service gives its port back to the pool.
#[test]
fn spares_serve_when_the_range_is_used_up_and_a_failed_one_frees_its_port() {
    let mut h = harness_unlimited(50_000, 50_015);
    h.io.parks = true;
    let mut clients: Vec<Client> = (0..16u16).map(|i| Client::rest(41_000 + i, "u", UNIX0 + 3600)).collect();
    for c in &mut clients {
        assert_eq!(h.allocate(c).class(), Class::Success);
    }
    let mut extra = Client::rest(44_000, "x", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut extra).code(), Some(508), "the range is used up");
    for c in &mut clients[..2] {
        assert_eq!(h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0)).class(), Class::Success);
    }
    assert_eq!((h.engine.spare_sockets(), h.engine.free_ports()), (2, 0));
    let mut a = Client::rest(44_001, "y", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a).class(), Class::Success, "a spare instead of 508");
    assert_eq!((h.engine.spare_sockets(), h.engine.free_ports(), h.io.opened), (1, 0, 16));
    h.io.unpark_fails = true;
    let mut b = Client::rest(44_002, "z", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut b).class(), Class::Success, "the failed spare's port, freshly bound");
    assert_eq!((h.engine.spare_sockets(), h.engine.free_ports(), h.io.opened), (0, 0, 17));
    assert_eq!(h.engine.table().len(), 16);
}

/// A user looping Allocate(EVEN-PORT, R) -> Refresh(0) never holds more than one allocation but,
/// uncounted, kept every reservation for 30 s: 8,187 of 16,384 ports. Reservations count against
/// the quotas and are capped per user (allocations.user_reservations), so others keep their capacity.
#[test]
fn even_port_reservations_cannot_take_the_range() {
    let mut s = settings();
    s.user_quota = 0;
    s.total_quota = 0;
    s.user_reservations = 2;
    let mut h = harness_on(s, (50_000, 50_019));
    let ports = h.engine.free_ports();
    for attempt in 0..10u16 {
        let mut c = Client::rest(41000 + attempt, "mallory", UNIX0 + 3600);
        let r = allocate_even_port(&mut h, &mut c);
        if attempt < 2 {
            assert_eq!(r.class(), Class::Success, "reservation {attempt}");
            delete(&mut h, &mut c);
        } else {
            assert_eq!(r.code(), Some(486), "reservation {attempt}: the user already holds two");
        }
    }
    assert_eq!(h.cluster.held_by(b"mallory"), 2, "two reservations, no allocation");
    assert_eq!(h.cluster.reservations(), 2);
    // Everybody else still gets EVEN-PORT with R, and all the other ports.
    let mut others = 0;
    for k in 0..20u16 {
        let mut c = Client::rest(42000 + k, &format!("user{k}"), UNIX0 + 3600);
        let r = if k < 2 { allocate_even_port(&mut h, &mut c) } else { h.allocate(&mut c) };
        if r.class() == Class::Success {
            others += 1 + usize::from(k < 2);
        }
    }
    assert_eq!(others, ports - 2, "only mallory's two reserved ports are out of reach");
    // Lapsed reservations give their ports and quota back.
    h.advance(31);
    assert_eq!(h.cluster.held_by(b"mallory"), 0);
    let mut c = Client::rest(41100, "mallory", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
}

/// With a user quota, a reservation is one of the user's allocations until it is redeemed (by the
/// same user: the unit carries over; by another user: charged to that user instead, refused if that
/// user is at quota) or lapses.
#[test]
fn reservations_count_against_user_and_total_quotas() {
    let mut s = settings();
    s.user_quota = 2;
    s.total_quota = 5;
    s.user_reservations = 4;
    let mut h = harness_with(s);
    let redeem = |h: &mut Harness, c: &mut Client, token: &[u8]| {
        h.authed(c, Method::ALLOCATE, |w| {
            udp_transport(w);
            w.add_bytes(AttrType::RESERVATION_TOKEN, token);
        })
    };
    let mut a1 = Client::rest(43000, "alice", UNIX0 + 3600);
    let r = allocate_even_port(&mut h, &mut a1);
    assert_eq!(r.class(), Class::Success);
    let token = r.attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut a2 = Client::rest(43001, "alice", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a2).code(), Some(486), "the allocation and its reservation fill alice's quota");
    // Redeeming her own reservation needs no more quota.
    assert_eq!(redeem(&mut h, &mut a2, &token).class(), Class::Success);
    assert_eq!(h.cluster.held_by(b"alice"), 2);
    // Bob reserves; carol fills her quota, then tries to redeem bob's token: refused, still bob's.
    let mut b = Client::rest(43002, "bob", UNIX0 + 3600);
    let token = allocate_even_port(&mut h, &mut b).attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut c1 = Client::rest(43003, "carol", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c1).class(), Class::Success);
    assert_eq!(h.cluster.total(), 5);
    let mut c2 = Client::rest(43004, "carol", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c2).code(), Some(486), "the total is full");
    // With the total full, dave may still redeem bob's token: it moves a unit, it adds none.
    let mut d = Client::rest(43005, "dave", UNIX0 + 3600);
    let mut c3 = Client::rest(43006, "carol", UNIX0 + 3600);
    delete(&mut h, &mut a1);
    assert_eq!(h.allocate(&mut c3).class(), Class::Success, "carol now holds two");
    assert_eq!(redeem(&mut h, &mut c2, &token).code(), Some(486), "carol is at her quota");
    assert_eq!((h.cluster.held_by(b"bob"), h.cluster.reservations()), (2, 1), "still bob's");
    assert_eq!(h.cluster.total(), 5);
    assert_eq!(redeem(&mut h, &mut d, &token).class(), Class::Success);
    assert_eq!((h.cluster.held_by(b"bob"), h.cluster.held_by(b"dave")), (1, 1));
    assert_eq!(h.cluster.total(), 5);
    // With a user quota of one, EVEN-PORT with R (two units) is always refused.
    let mut s = settings();
    s.user_quota = 1;
    let mut h = harness_with(s);
    let mut e = Client::rest(43007, "erin", UNIX0 + 3600);
    assert_eq!(allocate_even_port(&mut h, &mut e).code(), Some(486));
}
