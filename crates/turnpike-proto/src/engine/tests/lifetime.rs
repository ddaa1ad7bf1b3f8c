//! Expiry and Refresh: lifetimes, timer entries, mass expiry.

use super::*;

/// RFC 8656 §7: allocations expire at their lifetime; permissions at 300 s; channels at 600 s.
#[test]
fn expiry_at_lifetime() {
    let mut h = harness();
    let mut c = Client::rest(40004, "u", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).lifetime(), 600);
    let r = h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer()));
    assert_eq!(r.class(), Class::Success);
    h.advance(299);
    assert!(matches!(h.peer_sends(0, peer(), b"x"), Action::ToClient { .. }));
    h.advance(2);
    assert_eq!(h.peer_sends(0, peer(), b"x"), Action::Drop(DropReason::NoPermission), "permission expired at 300 s");
    h.advance(298);
    assert_eq!(h.engine.table().len(), 1, "still alive at 599 s");
    h.advance(2);
    assert_eq!(h.engine.table().len(), 0, "gone at lifetime + 1 s");
    assert!(h.io.open.is_empty());
    assert_eq!(h.cluster.total(), 0);
    assert!(h.engine.poll_timeout().is_some() || h.engine.wheel.is_empty());
}

/// RFC 8656 §8: Refresh extends the lifetime; requests below the default get the default; above the
/// maximum get the maximum.
#[test]
fn refresh_lifetimes() {
    let mut h = harness();
    let mut c = Client::rest(40005, "u", UNIX0 + 99_999);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_u32(AttrType::LIFETIME, 100_000);
    });
    assert_eq!(r.lifetime(), 3600);
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 30));
    assert_eq!(r.lifetime(), 600);
    h.advance(599);
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 1200));
    assert_eq!(r.lifetime(), 1200);
    h.advance(1100);
    assert_eq!(h.engine.table().len(), 1, "refresh moved the expiry");
    h.advance(101);
    assert_eq!(h.engine.table().len(), 0);
}

/// Deleted allocations leave their timer entries behind (lazily dropped); a client creating and
/// deleting allocations in a loop must not grow the timer wheel by its whole churn.
#[test]
fn churned_allocations_leave_a_bounded_number_of_timer_entries() {
    let mut h = harness_unlimited(50_000, 51_999);
    let rounds = 2 * crate::timer::SWEEP_SLACK / 1000 + 2;
    for round in 0..rounds as u64 {
        let mut clients: Vec<Client> =
            (0..1000u16).map(|i| Client::rest(20_000 + i, "churn", UNIX0 + 3600 + round)).collect();
        for c in &mut clients {
            assert_eq!(h.allocate(c).class(), Class::Success);
            assert_eq!(h.authed(c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
        }
        for c in &mut clients {
            assert_eq!(h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0)).class(), Class::Success);
        }
        h.engine.handle_timeout(h.now, &mut h.io);
    }
    // Each round armed 3,000 entries (allocation, permission, channel) that all went stale.
    assert!(
        h.engine.pending_timers() <= 2 * crate::timer::SWEEP_SLACK,
        "{} timer entries pending after {rounds} rounds with nothing live",
        h.engine.pending_timers()
    );
    // The sweep kept what is live: a new allocation still expires on time.
    let mut c = Client::rest(40_000, "late", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    h.now += Duration::from_secs(601);
    h.engine.handle_timeout(h.now, &mut h.io);
    assert!(h.io.open.is_empty(), "expired allocation's socket closed");
}

/// Allocations expiring together are freed a budget at a time, so the shard goes back to its sockets
/// in between; none is forgotten.
#[test]
fn mass_expiry_is_spread_over_calls() {
    let mut h = harness_unlimited(50_000, 50_999);
    let n = 3 * TIMER_BUDGET + 10;
    for i in 0..n as u16 {
        let mut c = Client::rest(20_000 + i, "many", UNIX0 + 3600);
        assert_eq!(h.allocate(&mut c).class(), Class::Success);
    }
    h.now += Duration::from_secs(601);
    let mut calls = 0;
    while !h.io.open.is_empty() {
        assert!(h.engine.poll_timeout().is_some_and(|t| t <= h.now), "work waiting must not wait for a deadline");
        let before = h.io.open.len();
        h.engine.handle_timeout(h.now, &mut h.io);
        assert!(before - h.io.open.len() <= TIMER_BUDGET);
        calls += 1;
        assert!(calls <= 4, "{} allocations left after {calls} calls", h.io.open.len());
    }
    assert_eq!(calls, 4);
    assert_eq!(h.engine.table().len(), 0);
    assert!(h.engine.poll_timeout().is_none_or(|t| t > h.now), "nothing left to do now");
}
