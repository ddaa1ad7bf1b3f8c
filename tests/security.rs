//! Secure by default, over real sockets: denied peers (every range, every IPv6 spelling) never receive
//! a datagram, quotas hold at exactly their limit, `max-bps` holds, and a garbage barrage costs nothing.

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

/// These tests measure rates or require zero loss: run them one at a time, so a 2-core machine is not
/// measuring its own contention.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialized() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

use common::{Binary, TurnClient, start_server, start_server_relaying, test_yaml};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use turnpike::policy::peer::ipv6_spellings;
use turnpike::proto::attr::{AttrType, FAMILY_IPV6};
use turnpike::proto::{Class, Method};

/// A loopback listener standing where an attacker wants the relay to send.
struct Target(UdpSocket);

impl Target {
    fn bind(addr: &str) -> Self {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        Self(s)
    }
    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }
    fn received_anything(&self) -> bool {
        let mut buf = [0u8; 2048];
        self.0.recv_from(&mut buf).is_ok()
    }
}

fn allocate_v6(c: &mut TurnClient) -> SocketAddr {
    let r = c.request(Method::ALLOCATE, &|w| {
        w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]);
    });
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).unwrap()
}

/// Tries every way of reaching `peer`: CreatePermission and ChannelBind must be 403, and Send
/// indications and ChannelData must not leave the relay.
fn assert_refused(c: &mut TurnClient, peer: SocketAddr) {
    let r = c.create_permission(peer);
    assert_eq!(r.code(), Some(403), "CreatePermission to {peer}");
    let r = c.channel_bind(0x4000, peer);
    assert_eq!(r.code(), Some(403), "ChannelBind to {peer}");
    c.send_indication(peer, b"should never arrive");
    c.send_channel(0x4000, b"should never arrive");
}

/// The default policy says of every address of the table, and of every IPv6 spelling of its IPv4
/// addresses, what the table says.
#[test]
fn the_default_policy_follows_the_table() {
    let policy = turnpike::policy::PeerPolicy::new(vec![], vec![], true, false);
    let rows = common::peer_table();
    assert!(rows.len() > 40, "the table was not read");
    for (addr, deny) in rows {
        assert_eq!(policy.permits(addr), !deny, "{addr}");
        if let IpAddr::V4(v4) = addr {
            for s in ipv6_spellings(v4) {
                assert_eq!(policy.permits(IpAddr::V6(s)), !deny, "{s} spells {v4}");
            }
        }
    }
}

/// Every address the table denies, and every IPv6 spelling of its IPv4 ones, is refused by a running
/// server with the defaults (CreatePermission and ChannelBind 403), and nothing sent there arrives;
/// the table's public addresses are granted.
#[test]
fn denied_ranges_and_every_ipv6_spelling_are_refused_and_nothing_arrives() {
    let _turn = serialized();
    // Pure defaults: no `peers.allowed`.
    let server = start_server_relaying(2, (44000, 44019), "127.0.0.1, \"::1\"", "peers:\n  no_multicast: true\n");
    let addr = server.udp_addrs[0];
    let target4 = Target::bind("127.0.0.1:0");
    let target6 = Target::bind("[::1]:0");
    let (p4, p6) = (target4.port(), target6.port());
    let port_for = |ip: IpAddr| match turnpike::policy::peer::canonical(ip) {
        IpAddr::V4(v4) if v4.is_loopback() => p4,
        IpAddr::V6(v6) if v6.is_loopback() => p6,
        _ => 9,
    };

    let mut v4 = TurnClient::rest(addr, "attacker4");
    v4.allocate();
    let mut v6 = TurnClient::rest(addr, "attacker6");
    let relayed6 = allocate_v6(&mut v6);
    assert!(relayed6.is_ipv6());
    let mut refused = 0u64;
    for (ip, deny) in common::peer_table() {
        let client = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
        if !deny {
            let r = client.create_permission(SocketAddr::new(ip, 9));
            assert_eq!(r.class(), Class::Success, "CreatePermission to public {ip}: {:?}", r.code());
            continue;
        }
        assert_refused(client, SocketAddr::new(ip, port_for(ip)));
        refused += 1;
        if let IpAddr::V4(ip4) = ip {
            for s in ipv6_spellings(ip4) {
                let s = IpAddr::V6(s);
                assert_refused(&mut v6, SocketAddr::new(s, port_for(s)));
                refused += 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!target4.received_anything(), "a datagram reached the IPv4 loopback target");
    assert!(!target6.received_anything(), "a datagram reached the IPv6 loopback target");
    let totals = server.totals();
    assert!(totals.engine.peers_denied >= 2 * refused, "{refused} refused: {totals:?}");
    assert_eq!(totals.engine.packets[0], 0);
}

/// With loopback denied (the defaults), the relay still reaches its own relayed addresses
/// (client -> TURN -> TURN -> client), but only live ones: a program that holds a port inside the
/// relay range on the relay's address gets neither a permission nor a datagram.
#[test]
fn own_relay_exception_reaches_no_other_program_in_the_relay_range() {
    let _turn = serialized();
    // Another program's socket inside the relay range, on the relay address; bound first, so turnpike
    // skips its port.
    let service = Target::bind("127.0.0.1:44605");
    let server = start_server(1, (44600, 44609), "peers:\n  no_multicast: true\n");
    let addr = server.udp_addrs[0];
    let mut a = TurnClient::rest(addr, "a");
    let mut b = TurnClient::rest(addr, "b");
    let relayed_a = a.allocate();
    let relayed_b = b.allocate();
    let service_addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), service.port());
    assert_eq!(a.create_permission(service_addr).code(), Some(403), "another program's port");
    assert_eq!(a.channel_bind(0x4000, service_addr).code(), Some(403));
    // b's relayed address is reachable, and with the permission for 127.0.0.1 in place, Send
    // indications to the other program's port still go nowhere.
    assert_eq!(a.create_permission(relayed_b).class(), Class::Success);
    assert_eq!(b.create_permission(relayed_a).class(), Class::Success);
    a.send_indication(service_addr, b"must not arrive");
    a.send_indication(relayed_b, b"turn to turn");
    let (_, _, payload) = b.recv_data().expect("b receives a's datagram through both relays");
    assert_eq!(payload, b"turn to turn");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!service.received_anything(), "a datagram reached the other program");
}

#[test]
fn allowed_peers_relay() {
    let _turn = serialized();
    let server = start_server(2, (44100, 44119), "peers:\n  allowed: [\"127.0.0.0/8\"]\n  denied: [127.0.0.2]\n");
    let target = Target::bind("127.0.0.1:0");
    let mut c = TurnClient::rest(server.udp_addrs[0], "ok");
    c.allocate();
    let dest = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), target.port());
    assert_eq!(c.create_permission(dest).class(), Class::Success);
    c.send_indication(dest, b"allowed");
    std::thread::sleep(Duration::from_millis(200));
    assert!(target.received_anything(), "the allowed peer got the datagram");
    assert_eq!(c.create_permission("127.0.0.2:9".parse().unwrap()).code(), Some(403), "narrower deny wins");
}

#[test]
fn quotas_refuse_at_exactly_the_limit_and_free_on_delete() {
    let _turn = serialized();
    let server = start_server(2, (44200, 44239), "allocations:\n  user_quota: 2\n  total_quota: 3\n");
    let addr = server.udp_addrs[0];
    let alloc = |c: &mut TurnClient| {
        c.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0])).code()
    };
    // REST usernames count the user part: different expiries, same user.
    let mut a1 = TurnClient::rest(addr, "@alice:example.org");
    let mut a2 = TurnClient::rest(addr, "@alice:example.org");
    let mut a3 = TurnClient::rest(addr, "@alice:example.org");
    assert_eq!(alloc(&mut a1), None);
    assert_eq!(alloc(&mut a2), None);
    assert_eq!(alloc(&mut a3), Some(486), "user quota 2");
    let mut b1 = TurnClient::rest(addr, "@bob:example.org");
    let mut b2 = TurnClient::rest(addr, "@bob:example.org");
    assert_eq!(alloc(&mut b1), None);
    assert_eq!(alloc(&mut b2), Some(486), "total quota 3");
    assert_eq!(a1.refresh(0).class(), Class::Success);
    assert_eq!(alloc(&mut b2), None, "freed by the delete");
    assert_eq!(server.totals().engine.quota_refusals, 2);
}

/// Measures bytes delivered at `dest` while `send` offers three times `rate` for about 3 s.
fn measure(rate: u64, send: &mut dyn FnMut(&[u8]), recv: &UdpSocket) -> (u64, Duration) {
    recv.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let payload = [0x5Au8; 1000];
    let interval = Duration::from_secs_f64(1000.0 / (3.0 * rate as f64));
    let start = Instant::now();
    let mut next = start;
    let mut received = 0u64;
    let mut buf = [0u8; 2048];
    while start.elapsed() < Duration::from_secs(3) {
        send(&payload);
        next += interval;
        while let Some(wait) = next.checked_duration_since(Instant::now()) {
            recv.set_read_timeout(Some(wait.max(Duration::from_micros(100)))).unwrap();
            if let Ok((n, _)) = recv.recv_from(&mut buf) {
                received += n as u64;
            }
        }
    }
    let elapsed = start.elapsed();
    recv.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while let Ok((n, _)) = recv.recv_from(&mut buf) {
        received += n as u64;
    }
    (received, elapsed)
}

#[test]
fn max_bps_holds_within_ten_percent_in_both_directions() {
    let _turn = serialized();
    const RATE: u64 = 100_000;
    let server = start_server(1, (44300, 44309), &format!("allocations:\n  max_bps: {RATE}\n"));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = TurnClient::rest(server.udp_addrs[0], "metered");
    let relayed = c.allocate();
    assert_eq!(c.channel_bind(0x4000, peer.local_addr().unwrap()).class(), Class::Success);

    // Client -> peer: payloads arrive bare at the peer.
    let (got, elapsed) = measure(RATE, &mut |p| c.send_channel(0x4000, p), &peer);
    let expected = RATE as f64 * elapsed.as_secs_f64();
    let ratio = got as f64 / expected;
    assert!((0.9..=1.1).contains(&ratio), "client->peer delivered {got} B in {elapsed:?}: {ratio:.3} of max-bps");

    // Peer -> client: ChannelData frames (4-byte header) arrive at the client.
    let client_sock = c.sock().try_clone().unwrap();
    let (got, elapsed) = measure(RATE, &mut |p| drop(peer.send_to(p, relayed)), &client_sock);
    let payload_bytes = got as f64 * 1000.0 / 1004.0;
    let ratio = payload_bytes / (RATE as f64 * elapsed.as_secs_f64());
    assert!((0.9..=1.1).contains(&ratio), "peer->client delivered {got} B in {elapsed:?}: {ratio:.3} of max-bps");
    assert!(server.totals().engine.drops[turnpike::proto::DropReason::OverBandwidth.index()] > 0);
}

/// Tens of thousands of random, truncated and mutated datagrams from many source ports: the server
/// keeps answering Binding and relaying, and its memory returns to the baseline.
#[test]
fn garbage_barrage_leaves_memory_at_baseline() {
    let _turn = serialized();
    let yaml = test_yaml(2, (44400, 44419), "127.0.0.1", "");
    let server = Binary::start("barrage", &yaml);
    let addr_tcp = server.addr;
    let addr = server.addr;
    let peer = common::EchoPeer::start();
    let mut c = TurnClient::rest(addr, "steady");
    c.allocate();
    assert_eq!(c.channel_bind(0x4000, peer.addr).class(), Class::Success);
    c.send_channel(0x4000, b"warm-up");
    assert!(c.recv_data().is_some());
    std::thread::sleep(Duration::from_millis(300));
    let baseline = server.rss_kib();

    let mut forger = TurnClient::with_key(addr, c.username(), [0x77; 16]);
    forger.set_nonce(&c.nonce());
    let template = forger.build(Method::ALLOCATE, Class::Request, true, &|w| {
        w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let sockets: Vec<UdpSocket> = (0..64).map(|_| UdpSocket::bind("127.0.0.2:0").unwrap()).collect();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3 {
        for i in 0..20_000u32 {
            let mut pkt = match i % 6 {
                0 => (0..(rand() % 300) as usize).map(|_| rand() as u8).collect::<Vec<u8>>(),
                1 => template[..(rand() as usize % template.len())].to_vec(),
                2 => {
                    let mut m = template.clone();
                    let at = rand() as usize % m.len();
                    m[at] ^= 1 << (rand() % 8);
                    m
                }
                3 => template.clone(),
                4 => {
                    let n = (rand() % 1200) as usize;
                    let mut m = vec![0x40 | (rand() % 0x40) as u8, rand() as u8];
                    m.extend_from_slice(&(n as u16).to_be_bytes());
                    m.resize(4 + n, 0xEE);
                    m
                }
                _ => {
                    let mut m = template.clone();
                    m[2..4].copy_from_slice(&((rand() % 2000) as u16 & !3).to_be_bytes());
                    m
                }
            };
            if pkt.is_empty() {
                pkt.push(0x01);
            }
            let _ = sockets[(rand() % 64) as usize].send_to(&pkt, addr);
            if i % 1000 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // Half-open TCP connections (connect, send nothing) and garbage TCP streams.
        let mut half_open = Vec::new();
        for i in 0..100u32 {
            let Ok(mut s) = std::net::TcpStream::connect(addr) else { continue };
            if i % 2 == 0 {
                half_open.push(s);
            } else {
                let junk: Vec<u8> = (0..(rand() % 3000) as usize).map(|_| rand() as u8).collect();
                let _ = std::io::Write::write_all(&mut s, &junk);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let rss = server.rss_kib();
        assert!(rss <= baseline + 2048, "round {round}: RSS grew from {baseline} KiB to {rss} KiB");
        drop(half_open);
    }
    // Still serving. The attack came from 127.0.0.2, so the steady client (127.0.0.1) is not limited.
    let req = c.build(Method::BINDING, Class::Request, false, &|_| {});
    assert_eq!(c.transact(&req).class(), Class::Success);
    c.send_channel(0x4000, b"after the barrage");
    let (_, _, data) = c.recv_data().expect("relay still works");
    assert_eq!(data, b"after the barrage");
    // And TCP still accepts and answers.
    let mut s = std::net::TcpStream::connect(addr_tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    std::io::Write::write_all(&mut s, &req).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert!(n >= 20 && buf[0] == 0x01 && buf[1] == 0x01, "Binding success over TCP");
}

/// Reads until the server closes the connection (end of stream or reset); a read timeout fails.
fn assert_closed(s: &mut std::net::TcpStream) {
    let mut buf = [0u8; 8];
    match std::io::Read::read(s, &mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

/// TCP connections that never allocate are closed after `runtime.unallocated_timeout`; one with an
/// allocation stays.
#[test]
fn unauthenticated_tcp_connections_time_out() {
    let _turn = serialized();
    let yaml = test_yaml(1, (44510, 44519), "127.0.0.1", "")
        .replace("  threads: 1\n", "  threads: 1\n  unallocated_timeout: 1\n");
    let cfg = turnpike::config::parse(std::path::Path::new("<test>.yaml"), &yaml).unwrap();
    let server = turnpike::server::start(&cfg).unwrap();
    let addr = server.addrs.tcp[0];
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let start = Instant::now();
    assert_closed(&mut idle);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900), "not before the timeout ({waited:?})");
    assert_eq!(server.totals().io.connections[0], 0);
    // More connections timing out together than the shard checks per wake-up: all are closed.
    let many: Vec<std::net::TcpStream> = (0..300).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    for mut s in many {
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        assert_closed(&mut s);
    }
    assert_eq!(server.totals().io.connections[0], 0);
}
