//! TURN over TCP and TLS against the real server: round trips, frames split at every byte boundary, a
//! slow reader that must not stall the shard, and connection close freeing the allocation.

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use common::stream::{Frame, StreamClient, channel_frame, self_signed, tcp, tls_client};
use common::{EchoPeer, start_server};
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnpike::proto::attr::AttrType;
use turnpike::proto::framing::frame_len;
use turnpike::proto::{Class, Method, StunMsg};

#[test]
fn tcp_allocate_permission_channel_and_indications() {
    let server = start_server(2, (45000, 45019), "");
    let peer = EchoPeer::start();
    let mut c = StreamClient::new(tcp(server.addrs.tcp[0]), "tcp-user");
    let relayed = c.allocate();
    assert!((45000..=45019).contains(&relayed.port()));
    c.round_trips(peer.addr);
    // Data indication when no channel is bound for the peer's address.
    let peer2 = EchoPeer::start();
    let r = c.request(Method::CREATE_PERMISSION, &|w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer2.addr));
    assert_eq!(StunMsg::parse(&r).unwrap().class(), Class::Success);
    let ind = c.build(Method::SEND, Class::Indication, false, &|w| {
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer2.addr);
        w.add_bytes(AttrType::DATA, b"odd");
    });
    c.io().write_all(&ind).unwrap();
    let Frame::Stun(f) = c.read_frame() else { panic!("expected a Data indication") };
    let m = StunMsg::parse(&f).unwrap();
    assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
    assert_eq!(m.attr(AttrType::DATA).unwrap(), b"odd");
    assert_eq!(server.totals().engine.allocations(), 1);
}

#[test]
fn frames_split_at_every_byte_boundary() {
    let server = start_server(1, (45100, 45109), "abuse:\n  unauth_rate: 0\n");
    let peer = EchoPeer::start();
    let mut c = StreamClient::new(tcp(server.addrs.tcp[0]), "splitter");
    c.allocate();
    c.channel_bind(0x4001, peer.addr);
    let binding = c.build(Method::BINDING, Class::Request, false, &|_| {});
    let frame = channel_frame(0x4001, b"split me!");
    let mut two = binding.clone();
    two.extend_from_slice(&frame);
    for split in 1..two.len() {
        c.io().write_all(&two[..split]).unwrap();
        c.io().flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        c.io().write_all(&two[split..]).unwrap();
        let (mut got_binding, mut got_echo) = (false, false);
        while !(got_binding && got_echo) {
            match c.read_frame() {
                Frame::Stun(f) => {
                    assert_eq!(StunMsg::parse(&f).unwrap().class(), Class::Success, "split at {split}");
                    got_binding = true;
                }
                Frame::Channel(n, data) => {
                    assert_eq!((n, data.as_slice()), (0x4001, &b"split me!"[..]), "split at {split}");
                    got_echo = true;
                }
            }
        }
    }
}

/// The server's allocations once those of closed connections are gone (waits up to 5 s for them).
fn allocations_after_closes(server: &turnpike::server::ServerHandle) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.totals().engine.allocations() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.totals().engine.allocations()
}

#[test]
fn closing_the_connection_frees_the_allocation() {
    let server = start_server(2, (45200, 45203), "");
    let mut c = StreamClient::new(tcp(server.addrs.tcp[0]), "leaver");
    let relayed = c.allocate();
    assert_eq!(server.totals().engine.allocations(), 1);
    drop(c);
    assert_eq!(allocations_after_closes(&server), 0, "allocations of closed connections still held");
    assert!(UdpSocket::bind(relayed).is_ok(), "the relay port was released");
    assert_eq!(server.shared.quotas.total(), 0);
}

/// The server stops reading a TCP connection once a read comes back short (the socket is empty), but
/// a close that arrived together with the last bytes raises no further event: the server must still
/// see it, and free the allocation at once, not at its expiry.
#[test]
fn data_and_close_arriving_together_free_the_allocation() {
    let server = start_server(1, (45220, 45239), "");
    for round in 0..20 {
        let mut c = StreamClient::new(tcp(server.addrs.tcp[0]), &format!("leaver{round}"));
        c.allocate();
        // A frame the server drops without answering (no channel bound), and the close right behind it.
        c.io().write_all(&channel_frame(0x4000, b"last words")).unwrap();
        c.io().shutdown(std::net::Shutdown::Write).unwrap();
        drop(c);
    }
    assert_eq!(allocations_after_closes(&server), 0, "allocations of closed connections still held");
}

#[test]
fn garbage_on_the_stream_closes_it() {
    let server = start_server(1, (45300, 45303), "");
    let mut s = tcp(server.addrs.tcp[0]);
    s.write_all(&[0x80, 0xFF, 0x00, 0x10, 1, 2, 3, 4]).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
    assert_eq!(server.totals().io.connections[0], 0);
}

/// One client that never reads while a peer floods it must not stall another client on the same shard:
/// its write buffer fills, relayed packets for it are dropped and counted, the other keeps going.
#[test]
fn a_slow_reader_does_not_stall_the_shard() {
    let server = start_server(1, (45400, 45409), "");
    let flood_peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut slow = StreamClient::new(tcp(server.addrs.tcp[0]), "slow");
    let slow_relay = slow.allocate();
    slow.channel_bind(0x4002, flood_peer.local_addr().unwrap());
    // Shrink nothing: just never read from `slow` again.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let payload = [0xAAu8; 1200];
            let start = Instant::now();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(10)
                && sent < 200_000
            {
                let _ = flood_peer.send_to(&payload, slow_relay);
                sent += 1;
                if sent.is_multiple_of(256) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let peer = EchoPeer::start();
    let mut fast = StreamClient::new(tcp(server.addrs.tcp[0]), "fast");
    fast.allocate();
    fast.channel_bind(0x4003, peer.addr);
    for i in 0..50u32 {
        let payload = i.to_be_bytes();
        fast.io().write_all(&channel_frame(0x4003, &payload)).unwrap();
        match fast.read_frame() {
            Frame::Channel(_, data) => assert_eq!(data, payload),
            Frame::Stun(_) => panic!("expected ChannelData"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    let totals = server.totals();
    assert!(
        totals.engine.drops[turnpike::proto::DropReason::SocketFull.index()] > 0,
        "the slow reader's packets were dropped ({sent} sent): {totals:?}"
    );
    drop(slow);
}

/// A server with a TLS listener on a fresh self-signed certificate for "localhost" (written under a
/// temporary directory named `name`); returns it with the certificate (DER) for the client to trust.
fn start_tls_server(name: &str, threads: usize, ports: (u16, u16)) -> (turnpike::server::ServerHandle, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let (cert, key, der) = self_signed(&dir);
    let extra = format!("tls:\n  cert: {}\n  pkey: {}\n", cert.display(), key.display());
    let yaml =
        common::test_yaml(threads, ports, "127.0.0.1", &extra).replace("  port: 0\n", "  port: 0\n  tls_port: 0\n");
    let cfg = turnpike::config::parse(std::path::Path::new("<test>.yaml"), &yaml).unwrap();
    (turnpike::server::start(&cfg).unwrap(), der)
}

#[test]
fn tls_1_2_and_1_3_round_trips() {
    let (server, der) = start_tls_server("turnpike-tls", 2, (45500, 45519));
    let peer = EchoPeer::start();
    let mut clients = Vec::new();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut c = StreamClient::new(tls_client(server.addrs.tls[0], &der, version), "tls-user");
        c.allocate();
        c.round_trips(peer.addr);
        assert_eq!(c.io().conn.protocol_version(), Some(version.version));
        clients.push(c);
    }
    assert_eq!(server.totals().io.connections[1], 2);
    assert_eq!(server.totals().engine.allocations(), 2);
}

/// The server writes what one wake-up relays to a stream client in one go, but over TLS each message
/// keeps a record of its own: coturn's client tools (and clients like them) read one message per record.
/// A burst from a peer is read here record by record, and every record must hold exactly one message.
#[test]
fn tls_burst_arrives_one_message_per_record() {
    let (server, der) = start_tls_server("turnpike-tls-burst", 1, (45700, 45703));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = StreamClient::new(tls_client(server.addrs.tls[0], &der, &rustls::version::TLS13), "burst");
    let relayed = c.allocate();
    c.channel_bind(0x4000, peer.local_addr().unwrap());
    const BURST: usize = 200;
    for i in 0..BURST as u32 {
        peer.send_to(&[i.to_be_bytes(), [0xAB; 4]].concat(), relayed).unwrap();
    }
    let io = c.io();
    let (conn, sock) = (&mut io.conn, &mut io.sock);
    let (mut raw, mut messages, mut records) = (Vec::new(), 0, 0);
    let mut plain = vec![0u8; 1 << 16];
    while messages < BURST {
        let mut buf = [0u8; 16384];
        let n = sock.read(&mut buf).expect("the whole burst arrives");
        assert!(n > 0, "server closed the connection");
        raw.extend_from_slice(&buf[..n]);
        // Whole records only, one at a time.
        while raw.len() >= 5 && raw.len() >= 5 + usize::from(u16::from_be_bytes([raw[3], raw[4]])) {
            let len = 5 + usize::from(u16::from_be_bytes([raw[3], raw[4]]));
            let record: Vec<u8> = raw.drain(..len).collect();
            conn.read_tls(&mut &record[..]).unwrap();
            conn.process_new_packets().unwrap();
            let got = match conn.reader().read(&mut plain) {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue, // no application data
                Err(e) => panic!("{e}"),
            };
            records += 1;
            assert_eq!(frame_len(&plain[..got]).unwrap(), Some(got), "record {records} holds {got} bytes");
            assert_eq!(&plain[..4], &[0x40, 0x00, 0x00, 0x08], "one ChannelData message");
            messages += 1;
        }
    }
    assert_eq!(records, BURST);
}

/// As `data_and_close_arriving_together_free_the_allocation`, over TLS: the last record and the close
/// (close_notify, then FIN) arrive together.
#[test]
fn tls_data_and_close_arriving_together_free_the_allocation() {
    let (server, der) = start_tls_server("turnpike-tls-close", 1, (45720, 45739));
    for round in 0..20 {
        let mut c = StreamClient::new(
            tls_client(server.addrs.tls[0], &der, &rustls::version::TLS13),
            &format!("tls-leaver{round}"),
        );
        c.allocate();
        c.io().write_all(&channel_frame(0x4000, b"last words")).unwrap();
        c.io().conn.send_close_notify();
        c.io().flush().unwrap();
        c.io().sock.shutdown(std::net::Shutdown::Write).unwrap();
        drop(c);
    }
    assert_eq!(allocations_after_closes(&server), 0, "allocations of closed connections still held");
}

#[test]
fn tls_handshake_with_garbage_is_closed() {
    let (server, _) = start_tls_server("turnpike-tls-bad", 1, (45600, 45603));
    let mut s = tcp(server.addrs.tls[0]);
    s.write_all(b"this is not a TLS ClientHello at all....").unwrap();
    let mut buf = [0u8; 64];
    let mut total = 0;
    // The server answers with an alert at most, then closes.
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
        assert!(total < 4096);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.totals().io.connections[1], 0);
}
