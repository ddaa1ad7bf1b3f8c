//! The send queue against real sockets on loopback: order per destination, GSO, the raw socket,
//! closed sockets.

#![allow(clippy::disallowed_methods)] // tests wait for loopback delivery

use super::*;
use crate::proto::engine::HEADROOM;
use std::net::UdpSocket;
use std::time::Duration;

fn packet(payload: &[u8]) -> (PacketBuf, Range<usize>) {
    let mut pkt = PacketBuf::default();
    let n = pkt.fill(payload);
    (pkt, HEADROOM..HEADROOM + n)
}

fn receive_all(sock: &UdpSocket) -> Vec<Vec<u8>> {
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Interleaved datagrams to two destinations from two sockets, of mixed sizes: every datagram
/// arrives intact, in queue order per destination, whether segmentation is on or off.
#[test]
fn flush_delivers_everything_in_order_per_destination() {
    for gso in [true, false] {
        let out_a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let out_b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest_1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest_2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut queue = SendQueue::new(gso, None);
        let mut expected: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for i in 0..QUEUE_CAPACITY {
            let (via, dest) = match i % 3 {
                0 => (Via::Listener(0), 0),
                1 => (Via::Listener(1), 1),
                _ => (Via::Listener(0), 1),
            };
            // Runs of one size with a shorter datagram now and then.
            let len = if i % 7 == 6 { 40 } else { 100 };
            let payload: Vec<u8> = (0..len).map(|k| (i + k) as u8).collect();
            let (mut pkt, range) = packet(&payload);
            let to = [&dest_1, &dest_2][dest].local_addr().unwrap();
            assert!(queue.push(via, None, to, &mut pkt, range));
            expected[dest].push(payload);
        }
        assert!(queue.is_full());
        let (mut spare, range) = packet(b"x");
        assert!(!queue.push(Via::Listener(0), None, dest_1.local_addr().unwrap(), &mut spare, range));
        let sockets = [out_a, out_b];
        let done = queue.flush(|via| match via {
            Via::Listener(i) => sockets.get(usize::from(i)),
            Via::Relay { .. } => None,
        });
        assert_eq!(done.sent, QUEUE_CAPACITY as u64, "gso {gso}: {done:?}");
        assert_eq!(done.failed + done.would_block, 0);
        assert!(done.syscalls < QUEUE_CAPACITY as u64 / 4, "batched: {done:?}");
        if gso && queue.gso() {
            assert!(done.segmented > 0, "{done:?}");
        } else {
            assert_eq!(done.segmented, 0);
        }
        assert!(queue.is_empty());
        // Per destination, arrival order equals queue order (two sockets feed dest_2: sort by
        // content would hide reordering, so compare each source's subsequence).
        assert_eq!(receive_all(&dest_1), expected[0], "gso {gso}");
        let got_2 = receive_all(&dest_2);
        assert_eq!(got_2.len(), expected[1].len(), "gso {gso}");
        for want in &expected[1] {
            assert!(got_2.contains(want));
        }
    }
}

/// A datagram whose socket has gone is dropped and counted; the others still leave.
#[test]
fn closed_socket_drops_only_its_datagrams() {
    let out = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dest = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = dest.local_addr().unwrap();
    let mut queue = SendQueue::new(true, None);
    for via in [Via::Relay { key: 1, generation: 1 }, Via::Relay { key: 2, generation: 1 }] {
        let (mut pkt, range) = packet(b"relayed");
        queue.push(via, None, to, &mut pkt, range);
    }
    let done = queue.flush(|via| (via == Via::Relay { key: 2, generation: 1 }).then_some(&out));
    assert_eq!((done.sent, done.failed), (1, 1));
    assert_eq!(receive_all(&dest), vec![b"relayed".to_vec()]);
}

/// Copied replies and moved relayed datagrams to one client leave in the order they were queued,
/// in one flush, and a copy leaves the caller's bytes untouched.
#[test]
fn copied_replies_keep_their_place_among_relayed_datagrams() {
    let out = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = client.local_addr().unwrap();
    let mut queue = SendQueue::new(true, None);
    let via = Via::Listener(0);
    let reply = b"success response".to_vec();
    let (mut pkt, range) = packet(b"data-1");
    assert!(queue.push(via, None, to, &mut pkt, range));
    assert!(queue.push_copy(via, to, &reply));
    let (mut pkt, range) = packet(b"data-2");
    assert!(queue.push(via, None, to, &mut pkt, range));
    assert_eq!(reply, b"success response");
    let done = queue.flush(|_| Some(&out));
    assert_eq!(done.sent, 3);
    assert_eq!(receive_all(&client), vec![b"data-1".to_vec(), reply, b"data-2".to_vec()]);
    // A full queue refuses a copy as it refuses a move.
    for _ in 0..QUEUE_CAPACITY {
        assert!(queue.push_copy(via, to, b"x"));
    }
    assert!(!queue.push_copy(via, to, b"x"));
    assert_eq!(queue.flush(|_| Some(&out)).sent, QUEUE_CAPACITY as u64);
}

/// A raw socket taking the lone datagrams of a flush from `min_batch` of a family on, or `None` (and
/// a note) without CAP_NET_RAW, unless TURNPIKE_REQUIRE_RAW is set.
fn raw_socket(min_batch: usize) -> Option<RawSocket> {
    match RawSocket::open(1 << 20, min_batch) {
        Ok(raw) => Some(raw),
        Err(e) if std::env::var_os("TURNPIKE_REQUIRE_RAW").is_none() => {
            eprintln!("skipped: no raw socket ({e})");
            None
        }
        Err(e) => panic!("TURNPIKE_REQUIRE_RAW is set but no raw socket opens: {e}"),
    }
}

/// Every datagram with `receive_all`, with its source.
fn receive_from_all(sock: &UdpSocket) -> Vec<(SocketAddr, Vec<u8>)> {
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        out.push((from, buf[..n].to_vec()));
    }
    out
}

/// With raw sockets: lone datagrams of many relay sockets leave in one call per family, each from
/// its own relay socket's address and intact (the loopback device checks the UDP checksum); a run
/// from one socket to one peer keeps its socket (a GSO message); a datagram of a closed socket is
/// dropped; one with no room for the headers leaves through its own socket.
#[test]
fn lone_relayed_datagrams_leave_together_through_the_raw_socket() {
    let Some(raw) = raw_socket(1) else { return };
    let relays: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let v6_relay = UdpSocket::bind("[::1]:0").unwrap();
    let peer_1 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_v6 = UdpSocket::bind("[::1]:0").unwrap();
    let (to_1, to_2) = (peer_1.local_addr().unwrap(), peer_2.local_addr().unwrap());
    let local = |k: usize| Some(relays[k].local_addr().unwrap());
    let relay = |key: u32| Via::Relay { key, generation: 1 };
    let mut queue = SendQueue::new(true, Some(raw));
    assert!(queue.raw());
    // Relays 0-5: one datagram each, alternating peers; relay 6: a run of three to peer 1 and one to
    // peer 2; relay 7 has closed; relay 5's datagram has no headroom; key 8: the IPv6 relay.
    let mut push = |key: u32, from: Option<SocketAddr>, to: SocketAddr, payload: &[u8], headroom: bool| {
        let (mut pkt, range) = packet(payload);
        let range = if headroom { range } else { 0..payload.len() };
        assert!(queue.push(relay(key), from, to, &mut pkt, range));
    };
    for k in 0..5 {
        push(k as u32, local(k), [to_1, to_2][k % 2], format!("lone {k}").as_bytes(), true);
    }
    push(5, local(5), to_2, &[0u8; 7], false);
    for i in 0..3 {
        push(6, local(6), to_1, format!("run {i}").as_bytes(), true);
    }
    push(6, local(6), to_2, b"lone 6", true);
    push(7, local(7), to_1, b"closed", true);
    push(8, Some(v6_relay.local_addr().unwrap()), peer_v6.local_addr().unwrap(), b"over IPv6", true);
    let done = queue.flush(|via| match via {
        Via::Relay { key: 7, .. } | Via::Listener(_) => None,
        Via::Relay { key: 8, .. } => Some(&v6_relay),
        Via::Relay { key, .. } => relays.get(key as usize),
    });
    assert_eq!((done.sent, done.failed, done.would_block), (11, 1, 0), "{done:?}");
    assert_eq!(done.raw, 7, "relays 0-4, relay 6's datagram to peer 2 and the IPv6 relay's: {done:?}");
    if queue.gso() {
        assert_eq!(done.segmented, 3, "{done:?}");
    }
    // One raw sendmmsg per family, one for relay 6's run, one sendto for relay 5's.
    assert_eq!(done.syscalls, 4, "{done:?}");
    let from = |k: usize| relays[k].local_addr().unwrap();
    let got_1 = receive_from_all(&peer_1);
    let want_1: Vec<(SocketAddr, Vec<u8>)> = vec![
        (from(0), b"lone 0".to_vec()),
        (from(2), b"lone 2".to_vec()),
        (from(4), b"lone 4".to_vec()),
        (from(6), b"run 0".to_vec()),
        (from(6), b"run 1".to_vec()),
        (from(6), b"run 2".to_vec()),
    ];
    assert_eq!(got_1.len(), want_1.len(), "{got_1:?}");
    for want in &want_1 {
        assert!(got_1.contains(want), "{want:?} in {got_1:?}");
    }
    let run: Vec<_> = got_1.iter().filter(|(f, _)| *f == from(6)).collect();
    assert_eq!(run.iter().map(|(_, d)| d.as_slice()).collect::<Vec<_>>(), [b"run 0", b"run 1", b"run 2"]);
    let mut got_2 = receive_from_all(&peer_2);
    got_2.sort();
    let mut want_2 = vec![
        (from(1), b"lone 1".to_vec()),
        (from(3), b"lone 3".to_vec()),
        (from(5), vec![0u8; 7]),
        (from(6), b"lone 6".to_vec()),
    ];
    want_2.sort();
    assert_eq!(got_2, want_2);
    assert_eq!(receive_from_all(&peer_v6), vec![(v6_relay.local_addr().unwrap(), b"over IPv6".to_vec())]);
}

/// A lone datagram larger than the route's MTU, which the raw socket refuses (`EMSGSIZE`: a raw
/// socket does not fragment), leaves through its relay socket instead (the kernel fragments it),
/// and the flush goes on through the raw socket. Loopback's MTU is 65,536, so the test runs itself
/// again in a network namespace of its own whose loopback has an MTU of 1,500 (`unshare --net`,
/// root only; without it the test says so and passes, unless TURNPIKE_REQUIRE_NETNS is set:
/// `scripts/ci/test.sh` sets it where `unshare --net` works).
#[test]
fn a_datagram_above_the_mtu_leaves_through_its_relay_socket() {
    const INSIDE: &str = "TURNPIKE_TEST_IN_NETNS";
    if std::env::var_os(INSIDE).is_none() {
        let exe = std::env::current_exe().unwrap();
        let name = "shard::send::tests::a_datagram_above_the_mtu_leaves_through_its_relay_socket";
        let out = std::process::Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo mtu 1500 up && exec \"$0\" --exact \"$1\" --nocapture"])
            .arg(exe)
            .arg(name)
            .env(INSIDE, "1")
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let log = String::from_utf8_lossy(&out.stdout);
                assert!(log.contains("1 passed"), "the test did not run inside the namespace: {log}");
            }
            Ok(out) if String::from_utf8_lossy(&out.stdout).contains("test result") => {
                panic!("failed inside the namespace: {}", String::from_utf8_lossy(&out.stdout));
            }
            failed if std::env::var_os("TURNPIKE_REQUIRE_NETNS").is_none() => {
                eprintln!("skipped: no network namespace ({failed:?})");
            }
            failed => panic!("TURNPIKE_REQUIRE_NETNS is set but no network namespace: {failed:?}"),
        }
        return;
    }
    let raw = RawSocket::open(1 << 20, 1).expect("root inside the namespace");
    let (big_relay, small_relay) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = peer.local_addr().unwrap();
    let mut queue = SendQueue::new(true, Some(raw));
    let big: Vec<u8> = (0..1600).map(|i| (i % 251) as u8).collect();
    for (key, relay, payload) in [(0, &big_relay, big.as_slice()), (1, &small_relay, b"small".as_slice())] {
        let (mut pkt, range) = packet(payload);
        assert!(queue.push(Via::Relay { key, generation: 1 }, Some(relay.local_addr().unwrap()), to, &mut pkt, range));
    }
    let done = queue.flush(|via| match via {
        Via::Relay { key: 0, .. } => Some(&big_relay),
        Via::Relay { key: 1, .. } => Some(&small_relay),
        _ => None,
    });
    // The raw socket refuses the big one (1 call), its relay socket sends it (1), then the raw
    // socket sends the small one (1).
    assert_eq!((done.sent, done.raw, done.failed, done.syscalls), (2, 1, 0, 3), "{done:?}");
    let mut got = receive_from_all(&peer);
    got.sort();
    let mut want = vec![(big_relay.local_addr().unwrap(), big), (small_relay.local_addr().unwrap(), b"small".to_vec())];
    want.sort();
    assert_eq!(got, want);
}

/// Fewer lone datagrams of a family than the raw socket's `min_batch` leave through their relay
/// sockets, one `sendto` each (the raw socket would save no call and cost the kernel a route per
/// datagram on-link); from `min_batch` on they leave through the raw socket in one call. The
/// count is per family.
#[test]
fn lone_datagrams_take_the_raw_socket_from_its_min_batch() {
    let Some(raw) = raw_socket(4) else { return };
    assert_eq!(raw.min_batch(), 4);
    let relays: Vec<UdpSocket> = (0..4).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let v6_relay = UdpSocket::bind("[::1]:0").unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_v6 = UdpSocket::bind("[::1]:0").unwrap();
    let mut queue = SendQueue::new(true, Some(raw));
    let socket = |via: Via| match via {
        Via::Relay { key: 9, .. } => Some(&v6_relay),
        Via::Relay { key, .. } => relays.get(key as usize),
        Via::Listener(_) => None,
    };
    for lone in [3, 4] {
        for (k, relay) in relays.iter().enumerate().take(lone) {
            let (mut pkt, range) = packet(format!("lone {k} of {lone}").as_bytes());
            let from = Some(relay.local_addr().unwrap());
            assert!(queue.push(
                Via::Relay { key: k as u32, generation: 1 },
                from,
                peer.local_addr().unwrap(),
                &mut pkt,
                range
            ));
        }
        // One IPv6 datagram: below the minimum of its own family whatever the IPv4 count.
        let (mut pkt, range) = packet(b"lone over IPv6");
        let from = Some(v6_relay.local_addr().unwrap());
        assert!(queue.push(Via::Relay { key: 9, generation: 1 }, from, peer_v6.local_addr().unwrap(), &mut pkt, range));
        let done = queue.flush(socket);
        let (raw, calls) = if lone < 4 { (0, lone + 1) } else { (4, 2) };
        assert_eq!((done.sent, done.raw, done.syscalls), (lone as u64 + 1, raw, calls as u64), "{lone}: {done:?}");
        let mut got = receive_from_all(&peer);
        got.sort();
        let mut want: Vec<(SocketAddr, Vec<u8>)> =
            (0..lone).map(|k| (relays[k].local_addr().unwrap(), format!("lone {k} of {lone}").into_bytes())).collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(receive_from_all(&peer_v6), vec![(v6_relay.local_addr().unwrap(), b"lone over IPv6".to_vec())]);
    }
}

/// An IPv4 address spelled as IPv6 never takes the raw socket: no IPv6 packet may carry it.
#[test]
fn v4_mapped_destinations_never_take_the_raw_socket() {
    assert!(is_v4_mapped("[::ffff:192.0.2.1]:5004".parse().unwrap()));
    assert!(!is_v4_mapped("[2001:db8::1]:5004".parse().unwrap()));
    assert!(!is_v4_mapped("192.0.2.1:5004".parse().unwrap()));
    let Some(raw) = raw_socket(1) else { return };
    let relay = UdpSocket::bind("[::1]:0").unwrap();
    let mut queue = SendQueue::new(true, Some(raw));
    let (mut pkt, range) = packet(b"mapped");
    let to: SocketAddr = "[::ffff:127.0.0.1]:9".parse().unwrap();
    assert!(queue.push(Via::Relay { key: 0, generation: 1 }, Some(relay.local_addr().unwrap()), to, &mut pkt, range));
    let done = queue.flush(|_| Some(&relay));
    assert_eq!((done.raw, done.sent + done.failed), (0, 1), "{done:?}");
}

/// Without a raw socket, a source address changes nothing: every datagram leaves through its socket.
#[test]
fn without_a_raw_socket_source_addresses_are_ignored() {
    let out = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut queue = SendQueue::new(true, None);
    assert!(!queue.raw());
    let (mut pkt, range) = packet(b"relayed");
    assert!(queue.push(
        Via::Relay { key: 0, generation: 1 },
        Some(out.local_addr().unwrap()),
        peer.local_addr().unwrap(),
        &mut pkt,
        range
    ));
    let done = queue.flush(|_| Some(&out));
    assert_eq!((done.sent, done.raw, done.syscalls), (1, 0, 1));
    assert_eq!(receive_from_all(&peer), vec![(out.local_addr().unwrap(), b"relayed".to_vec())]);
}

#[test]
fn flush_keys_group_by_socket_then_destination_then_queue_order() {
    let relay = |key, generation| Via::Relay { key, generation };
    let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let b: SocketAddr = "192.0.2.1:4001".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
    let queued = [
        (relay(7, 1), b),
        (Via::Listener(1), a),
        (relay(7, 1), a),
        (relay(3, 2), a),
        (relay(7, 2), a),
        (relay(7, 1), b),
        (Via::Listener(0), v6),
        (relay(7, 1), a),
    ];
    let mut keys: Vec<u128> = queued.iter().enumerate().map(|(i, &(via, to))| flush_key(via, to, i as u8)).collect();
    keys.sort_unstable();
    let order: Vec<u8> = keys.iter().map(|&k| k as u8).collect();
    assert_eq!(order, [6, 1, 3, 2, 7, 0, 5, 4]);
}

#[test]
fn runs_stop_at_a_new_destination_size_or_limit() {
    let dest: SocketAddr = "192.0.2.1:9".parse().unwrap();
    let other: SocketAddr = "192.0.2.2:9".parse().unwrap();
    let mut queue = SendQueue::new(true, None);
    for (to, len) in [(dest, 100), (dest, 100), (dest, 60), (dest, 100), (other, 100), (other, 120)] {
        let (mut pkt, range) = packet(&vec![7u8; len]);
        queue.push(Via::Listener(0), None, to, &mut pkt, range);
    }
    let order: Vec<u8> = (0..6).collect();
    assert_eq!(run_len(&queue.pending, &order, 0, 6), 3, "a shorter datagram ends the run");
    assert_eq!(run_len(&queue.pending, &order, 3, 6), 1, "another destination ends it");
    assert_eq!(run_len(&queue.pending, &order, 4, 6), 1, "a longer datagram cannot follow");
}
