//! Authentication: nonces, REST and static credentials, the kept key, the unauthenticated budget.

use super::*;

/// RFC 8489 §9.2.4: an expired nonce gets 438 with a fresh one, which then works.
#[test]
fn stale_nonce_is_438() {
    let mut h = harness();
    let mut c = Client::rest(40003, "u", UNIX0 + 7200);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_u32(AttrType::LIFETIME, 3600);
    });
    assert_eq!(r.class(), Class::Success);
    h.advance(601);
    let req = c.request(Method::REFRESH, true, |w| w.add_u32(AttrType::LIFETIME, 600));
    let r = h.request(c.tuple, &req);
    assert_eq!(r.code(), Some(438));
    assert!(r.attr(AttrType::REALM).is_some());
    c.nonce = r.attr(AttrType::NONCE).unwrap();
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 600));
    assert_eq!(r.class(), Class::Success);
}

#[test]
fn credentials_rest_static_expired_rotated_and_wrong() {
    let mut h = harness();
    // The older of two configured secrets still works (rotation).
    let mut c = Client::rest_with_secret(40010, "u1", UNIX0 + 3600, "old-secret");
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    // Colons inside the user part are fine.
    let mut c = Client::rest(40011, "@bob:matrix.org:extra", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let mut c = Client::static_user(40012, "alice", "wonderland");
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    // Expired REST username.
    let mut c = Client::rest(40013, "u", UNIX0 - 1);
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    // Wrong secret, wrong password, unknown user.
    let mut c = Client::rest_with_secret(40014, "u", UNIX0 + 3600, "nope");
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    let mut c = Client::static_user(40015, "alice", "wrong");
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    let mut c = Client::static_user(40016, "mallory", "x");
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    assert_eq!(h.engine.table().len(), 3);
    assert_eq!(
        h.engine.stats.auth_failures[..crate::stats::STALE_NONCE].iter().map(read).sum::<u64>(),
        4,
        "unknown user, expired, bad integrity"
    );
}

#[test]
fn missing_realm_or_nonce_with_integrity_is_400() {
    let mut h = harness();
    let c = Client::static_user(40017, "alice", "wonderland");
    let req = c.request_with_tid(Method::ALLOCATE, TransactionId([5; 12]), false, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::USERNAME, b"alice");
        w.add_message_integrity(&c.key);
    });
    assert_eq!(h.request(c.tuple, &req).code(), Some(400));
}

/// RFC 8656 §5: a request on an allocation with another user's credentials is 441.
#[test]
fn other_users_credentials_are_441() {
    let mut h = harness();
    let mut alice = Client::static_user(40018, "alice", "wonderland");
    assert_eq!(h.allocate(&mut alice).class(), Class::Success);
    let mut bob = Client::static_user(40018, "bob", "builder");
    let r = h.authed(&mut bob, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.code(), Some(441));
    assert_eq!(h.engine.table().len(), 1);
}

/// REST expiries are judged by the wall clock the shard last reported, not the one at start: a clock
/// stepped forward (NTP after boot, a resumed VM) expires credentials, one stepped back revives them.
#[test]
fn rest_expiry_follows_a_stepped_wall_clock() {
    let mut h = harness();
    let mut soon = Client::rest(40050, "u", UNIX0 + 100);
    assert_eq!(h.allocate(&mut soon).class(), Class::Success);
    h.now += Duration::from_secs(1);
    h.engine.set_wall_clock(h.now, UNIX0 + 3600);
    let mut c = Client::rest(40051, "u", UNIX0 + 100);
    assert_eq!(h.allocate(&mut c).code(), Some(401), "expired by the new wall clock");
    let mut c = Client::rest(40052, "u", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    h.engine.set_wall_clock(h.now, UNIX0 + 50);
    let mut c = Client::rest(40053, "v", UNIX0 + 100);
    assert_eq!(h.allocate(&mut c).class(), Class::Success, "valid again by the clock stepped back");
    // Between reports, unix time advances with the monotonic clock.
    h.now += Duration::from_secs(60);
    let mut c = Client::rest(40054, "v", UNIX0 + 100);
    assert_eq!(h.allocate(&mut c).code(), Some(401), "50 + 60 s is past the expiry");
}

/// Answers to unauthenticated requests (401 challenges, Binding) are limited per source address, and
/// authenticated traffic is not.
#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut s = settings();
    s.unauth_rate = 5;
    s.unauth_burst = 10;
    let mut h = harness_with(s);
    let mut c = Client::rest(40093, "u", UNIX0 + 3600);
    let answered = (0..50)
        .filter(|_| {
            let req = c.request(Method::ALLOCATE, false, udp_transport);
            matches!(h.send(c.tuple, &req), Action::Reply { .. })
        })
        .count();
    assert_eq!(answered, 10);
    let binding = c.request(Method::BINDING, false, |_| {});
    assert_eq!(h.send(c.tuple, &binding), Action::Drop(DropReason::SourceRateLimited));
    // Another source is unaffected.
    let other = Client::rest(40094, "u", UNIX0 + 3600);
    let mut other_tuple = other.tuple;
    other_tuple.client = "203.0.113.50:1000".parse().unwrap();
    assert!(matches!(h.send(other_tuple, &binding), Action::Reply { .. }));
    // After a second the source may try again; authenticated requests are never limited.
    h.advance(2);
    let r = h.request(c.tuple, &c.request(Method::ALLOCATE, false, udp_transport));
    c.nonce = r.attr(AttrType::NONCE).unwrap();
    for _ in 0..30 {
        let req = c.request(Method::ALLOCATE, true, udp_transport);
        assert!(matches!(h.send(c.tuple, &req), Action::Reply { .. }));
    }
}

/// The budget of unauthenticated answers is one per source for the whole server, not one per shard;
/// while it refuses, an unauthenticated Refresh smaller than its challenge goes unanswered (no client
/// sends one), while a first Allocate, which real clients send small, is still challenged.
#[test]
fn unauthenticated_budget_is_node_wide_and_floods_silence_small_refreshes() {
    let mut s = settings();
    s.unauth_rate = 5;
    s.unauth_burst = 10;
    let mut a = harness_with(s.clone());
    let mut b = harness_with(s);
    b.engine.cluster = Arc::clone(&a.cluster) as Arc<dyn Cluster>;
    let c = Client::rest(40095, "u", UNIX0 + 3600);
    let binding = c.request_with_tid(Method::BINDING, TransactionId([5; 12]), false, |_| {});
    let answered = (0..50)
        .filter(|k| {
            let h = if k % 2 == 0 { &mut a } else { &mut b };
            matches!(h.send(c.tuple, &binding), Action::Reply { .. })
        })
        .count();
    assert_eq!(answered, 10, "one burst for the source, whichever shard it reaches");
    // Another source, in another prefix: its small unauthenticated Refresh is dropped during the flood.
    let mut d = Client::rest(40096, "v", UNIX0 + 3600);
    d.tuple.client = "203.0.113.60:1000".parse().unwrap();
    let refresh = d.request(Method::REFRESH, false, |w| w.add_u32(AttrType::LIFETIME, 600));
    assert_eq!(a.send(d.tuple, &refresh), Action::Drop(DropReason::UnauthenticatedUnderFlood));
    let allocate = d.request(Method::ALLOCATE, false, udp_transport);
    assert_eq!(a.request(d.tuple, &allocate).code(), Some(401), "first Allocates are always challenged");
    // A Refresh as large as its challenge would be is answered; so is any once the flood is over.
    let padded = d.request(Method::REFRESH, false, |w| w.add_bytes(AttrType::SOFTWARE, &[b'x'; 160]));
    assert_eq!(a.request(d.tuple, &padded).code(), Some(401));
    a.advance(3);
    assert_eq!(a.request(d.tuple, &refresh).code(), Some(401));
}

/// Requests on an allocation reuse the key it was created with, yet every credential check still holds:
/// a REST username past its expiry, a wrong key, a secret removed and a password changed by a reload.
#[test]
fn reused_allocation_keys_keep_every_credential_check() {
    let mut h = harness();
    let refresh =
        |h: &mut Harness, c: &mut Client| h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 600));
    let mut soon = Client::rest(40060, "u", UNIX0 + 100);
    assert_eq!(h.allocate(&mut soon).class(), Class::Success);
    assert_eq!(refresh(&mut h, &mut soon).class(), Class::Success);
    let mut forged = soon.clone();
    forged.key = [7; 16];
    assert_eq!(refresh(&mut h, &mut forged).code(), Some(401), "a wrong key on the allocation's 5-tuple");
    h.now += Duration::from_secs(101);
    assert_eq!(refresh(&mut h, &mut soon).code(), Some(401), "the REST username expired meanwhile");

    let mut rest = Client::rest(40061, "v", UNIX0 + 3600);
    let mut alice = Client::static_user(40062, "alice", "wonderland");
    assert_eq!(h.allocate(&mut rest).class(), Class::Success);
    assert_eq!(h.allocate(&mut alice).class(), Class::Success);
    let mut s = settings();
    s.credentials = CredentialStore::new(REALM, b':');
    s.credentials.add_secret("old-secret");
    s.credentials.add_user("alice", "looking-glass");
    h.engine.reload(h.now, Arc::new(s));
    assert_eq!(refresh(&mut h, &mut rest).code(), Some(401), "its secret was removed");
    assert_eq!(refresh(&mut h, &mut alice).code(), Some(401), "her password changed");
    let mut alice_now = Client::static_user(40062, "alice", "looking-glass");
    alice_now.nonce.clone_from(&alice.nonce);
    assert_eq!(refresh(&mut h, &mut alice_now).class(), Class::Success, "the new password works");
    assert_eq!(refresh(&mut h, &mut alice_now).class(), Class::Success, "and keeps working");
}
