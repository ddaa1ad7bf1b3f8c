//! The data path: ChannelData edge cases and bandwidth limits.

use super::*;

#[test]
fn channel_data_edge_cases() {
    let mut h = harness();
    let mut c = Client::rest(40020, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.send(c.tuple, &channel_data(0x4000, b"x")), Action::Drop(DropReason::NoChannel));
    let mut short = channel_data(0x4000, b"abcd");
    short.truncate(6);
    assert_eq!(h.send(c.tuple, &short), Action::Drop(DropReason::Malformed));
    assert_eq!(h.send(c.tuple, &[0x40]), Action::Drop(DropReason::Malformed));
    assert_eq!(h.send(c.tuple, &channel_data(0x7000, b"x")), Action::Drop(DropReason::NoChannel));
    // Padding after the data is allowed over UDP.
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    let mut padded = channel_data(0x4000, b"abc");
    padded.push(0);
    let Action::ToPeer { range, .. } = h.send(c.tuple, &padded) else { panic!() };
    assert_eq!(h.pkt.get(range), b"abc");
}

/// `max-bps`: each direction has its own bucket; excess is dropped and counted.
#[test]
fn max_bps_drops_excess_in_both_directions() {
    let mut s = settings();
    s.max_bps = 16 * 1024;
    let mut h = harness_with(s);
    let mut c = Client::rest(40090, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    let frame = channel_data(0x4000, &[0u8; 1000]);
    let sent_ok = (0..40).filter(|_| matches!(h.send(c.tuple, &frame), Action::ToPeer { .. })).count();
    assert_eq!(sent_ok, 16, "a 16 KiB burst of 1000-byte packets");
    let back_ok = (0..40).filter(|_| matches!(h.peer_sends(0, peer(), &[0u8; 1000]), Action::ToClient { .. })).count();
    assert_eq!(back_ok, 16, "the other direction has its own bucket");
    assert_eq!(h.send(c.tuple, &frame), Action::Drop(DropReason::OverBandwidth));
    assert_eq!(h.peer_sends(0, peer(), &[0u8; 1000]), Action::Drop(DropReason::OverBandwidth));
    h.now += Duration::from_secs(1);
    let refilled = (0..40).filter(|_| matches!(h.send(c.tuple, &frame), Action::ToPeer { .. })).count();
    assert_eq!(refilled, 16, "16 KiB per second");
}

/// The shard's share of a total cap applies across allocations.
#[test]
fn total_bandwidth_is_shared_by_allocations() {
    let mut s = settings();
    s.shard_total_bps = 16 * 1024;
    let mut h = harness_with(s);
    let mut a = Client::rest(40091, "a", UNIX0 + 3600);
    let mut b = Client::rest(40092, "b", UNIX0 + 3600);
    for c in [&mut a, &mut b] {
        assert_eq!(h.allocate(c).class(), Class::Success);
        assert_eq!(h.authed(c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    }
    let frame = channel_data(0x4000, &[0u8; 1000]);
    let mut ok = 0;
    for _ in 0..20 {
        for t in [a.tuple, b.tuple] {
            ok += usize::from(matches!(h.send(t, &frame), Action::ToPeer { .. }));
        }
    }
    assert_eq!(ok, 16);
}
