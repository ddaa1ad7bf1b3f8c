//! Offloading (the host's kernel path): which changes mark an allocation, and what may leave the
//! engine's data path.

use super::*;
use crate::allocation::Traffic;

fn wanted(h: &mut Harness) -> Vec<(u32, Vec<OffloadChannel>)> {
    let mut slots = Vec::new();
    h.engine.take_offload_dirty(&mut slots);
    slots.dedup();
    slots
        .into_iter()
        .map(|slot| {
            let mut out = Vec::new();
            h.engine.offload_wanted(slot, h.now, &mut out);
            (slot, out)
        })
        .collect()
}

/// A harness with offloading on, a client with an allocation and channel 0x4000 bound to [`peer`].
fn bound() -> (Harness, Client) {
    let mut h = harness();
    h.engine.enable_offload();
    let mut c = Client::rest(40500, "off", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    (h, c)
}

#[test]
fn nothing_is_tracked_while_offloading_is_off() {
    let mut h = harness();
    let mut c = Client::rest(40501, "off", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    assert!(!h.engine.offload_pending());
    assert!(wanted(&mut h).is_empty());
}

#[test]
fn a_bound_channel_with_its_permission_may_leave_until_the_permission_lapses() {
    let (mut h, mut c) = bound();
    assert!(h.engine.offload_pending());
    let w = wanted(&mut h);
    assert_eq!(w.len(), 1);
    let (slot, channels) = &w[0];
    assert_eq!(channels.len(), 1);
    let ch = channels[0];
    assert_eq!((ch.client, ch.number, ch.peer), (c.tuple, 0x4000, peer()));
    assert_eq!(ch.relay.ip(), "127.0.0.1".parse::<IpAddr>().unwrap(), "the bound address, not the advertised one");
    assert_eq!(h.io.ports.get(&RelayKey::new(*slot, Half::Primary)), Some(&ch.relay.port()));
    assert!(!h.engine.offload_pending(), "taken");
    // Five minutes without a refresh: the permission lapses, the channel (ten minutes) does not.
    h.advance(301);
    let w = wanted(&mut h);
    assert_eq!(w, vec![(*slot, vec![])], "the permission's end marks the slot and empties it");
    // CreatePermission brings it back.
    assert_eq!(h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(peer())).class(), Class::Success);
    assert_eq!(wanted(&mut h), vec![(*slot, vec![ch])]);
}

#[test]
fn an_unbound_channel_leaves_the_kernel_when_it_expires() {
    let (mut h, mut c) = bound();
    let slot = wanted(&mut h)[0].0;
    // The allocation and the permission are refreshed; the channel is not (no ChannelBind).
    h.advance(290);
    assert_eq!(h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 600)).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(peer())).class(), Class::Success);
    let _ = wanted(&mut h);
    h.advance(290);
    assert_eq!(h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(peer())).class(), Class::Success);
    assert_eq!(wanted(&mut h)[0].1.len(), 1, "still bound at 580 s");
    h.advance(21);
    assert_eq!(wanted(&mut h), vec![(slot, vec![])], "the channel's ten minutes ran out");
}

#[test]
fn a_reload_denying_the_peer_or_limiting_bandwidth_takes_it_back() {
    let (mut h, _c) = bound();
    let slot = wanted(&mut h)[0].0;
    let mut deny = settings();
    deny.peer_policy = PeerPolicy::new(vec![], vec![IpRange::cidr(peer().ip(), 32).unwrap()], true, false);
    h.engine.reload(h.now, Arc::new(deny));
    assert_eq!(wanted(&mut h), vec![(slot, vec![])]);

    let (mut h, _c) = bound();
    let slot = wanted(&mut h)[0].0;
    let limited = Settings { max_bps: 1_000_000, ..settings() };
    h.engine.reload(h.now, Arc::new(limited));
    assert_eq!(wanted(&mut h), vec![(slot, vec![])], "the buckets live in the engine: limited channels stay there");
    h.engine.reload(h.now, Arc::new(settings()));
    assert_eq!(wanted(&mut h)[0].1.len(), 1, "unlimited again");
}

#[test]
fn a_deleted_allocation_ends_its_offload_and_its_counts_are_kept() {
    let (mut h, mut c) = bound();
    let slot = wanted(&mut h)[0].0;
    h.engine.credit_offloaded(slot, Traffic { packets: 3, bytes: 300 }, Traffic { packets: 2, bytes: 20 });
    assert_eq!(read(&h.engine.stats.packets[0]), 3);
    h.io.offloaded = [Traffic { packets: 1, bytes: 100 }, Traffic::default()];
    delete(&mut h, &mut c);
    assert_eq!(h.io.offload_ended, vec![slot]);
    assert_eq!(read(&h.engine.stats.packets[0]), 4, "what the host relayed last is counted");
    assert_eq!(read(&h.engine.stats.packets[1]), 2);
}
