//! The PROXY protocol on the TCP and TLS listeners (`listen.proxy_from`), driven by hand-written
//! headers: the real client address becomes the connection's (XOR-MAPPED-ADDRESS, allocations, the
//! per-source limit), trusted sources must send a header and others must not, and bad headers are
//! closed within the bound while the listener serves everybody else.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, missing_docs)]

mod common;

use common::stream::{StreamClient, self_signed, tcp};
use common::{EchoPeer, connect_from, metric, scrape};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use turnpike::proto::attr::AttrType;
use turnpike::proto::{Class, Method, StunMsg};

/// A server with TLS and metrics; `proxy` lines go into its `listen:` section, `extra` at the top.
fn server(ports: (u16, u16), proxy: &str, extra: &str) -> (turnpike::server::ServerHandle, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("turnpike-proxy-{}-{}", ports.0, std::process::id()));
    let (cert, key, der) = self_signed(&dir);
    let yaml = common::test_yaml(
        2,
        ports,
        "127.0.0.1",
        &format!(
            "tls:\n  cert: {}\n  pkey: {}\nmetrics:\n  listen: 127.0.0.1:0\n{extra}",
            cert.display(),
            key.display()
        ),
    )
    .replace("  port: 0\n", &format!("  port: 0\n  tls_port: 0\n{proxy}"));
    let cfg = turnpike::config::parse(std::path::Path::new("<test>.yaml"), &yaml).expect("test config");
    (turnpike::server::start(&cfg).expect("server starts"), der)
}

/// A TLS client session over `raw` (already connected, a PROXY header perhaps written) trusting `der`.
fn tls_over(raw: TcpStream, der: &[u8]) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der.to_vec())).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    rustls::StreamOwned::new(rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap(), raw)
}

const TRUST_LOCALHOST: &str = "  proxy_from: [127.0.0.1]\n";

fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else { panic!("IPv4 only here") };
    let mut h = turnpike::proto::proxy::V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&s.port().to_be_bytes());
    h
}

/// The XOR-MAPPED-ADDRESS of a Binding answered over `client`.
fn mapped<S: Read + Write + turnpike_client::ReadTimeout>(client: &mut StreamClient<S>) -> SocketAddr {
    let answer = client.request(Method::BINDING, &|_| {});
    let msg = StunMsg::parse(&answer).unwrap();
    let value = msg.attr(AttrType::XOR_MAPPED_ADDRESS).unwrap();
    turnpike::proto::attr::decode_xor_addr(value, &msg.transaction_id()).unwrap()
}

/// Whether the server closed `s` (within 10 s).
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

fn refused(metrics: &str, reason: &str) -> u64 {
    metric(metrics, &format!("turnpike_proxy_refused_total{{reason=\"{reason}\"}}"))
}

#[test]
fn a_proxied_client_is_known_by_its_real_address_over_tcp_and_tls() {
    let (server, der) = server((48300, 48319), TRUST_LOCALHOST, "");
    let tcp_addr = server.addrs.tcp[0];
    let tls_addr = server.addrs.tls[0];

    // v1 from nginx-like proxy, then TURN over TCP: the answer names the real client, and it relays.
    let mut s = tcp(tcp_addr);
    s.write_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 3478\r\n").unwrap();
    let mut client = StreamClient::new(s, "proxied-tcp");
    assert_eq!(mapped(&mut client), "198.51.100.7:5555".parse().unwrap());
    let peer = EchoPeer::start();
    client.allocate();
    client.round_trips(peer.addr);

    // v2 and TLS: the header comes before the ClientHello.
    let mut raw = tcp(tls_addr);
    raw.write_all(&v2_header("203.0.113.9:40000".parse().unwrap(), tls_addr)).unwrap();
    let mut client = StreamClient::new(tls_over(raw, &der), "proxied-tls");
    assert_eq!(mapped(&mut client), "203.0.113.9:40000".parse().unwrap());
    client.allocate();

    // A LOCAL header (a proxy's health check): the connection's own address.
    let mut s = tcp(tcp_addr);
    let mut local = turnpike::proto::proxy::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    s.write_all(&local).unwrap();
    let own = s.local_addr().unwrap();
    let mut client = StreamClient::new(s, "health");
    assert_eq!(mapped(&mut client), own);

    let text = scrape(server.metrics_addr.unwrap());
    assert_eq!(metric(&text, "turnpike_proxy_headers_total"), 3);
}

#[test]
fn headers_from_the_wrong_sources_and_bad_headers_are_closed() {
    let (server, _) = server((48320, 48339), TRUST_LOCALHOST, "");
    let tcp_addr = server.addrs.tcp[0];
    let metrics = server.metrics_addr.unwrap();

    // A trusted source without a header.
    let mut s = tcp(tcp_addr);
    let mut c = StreamClient::new(s.try_clone().unwrap(), "no-header");
    let binding = c.build(Method::BINDING, Class::Request, false, &|_| {});
    let _ = c.io().write_all(&binding);
    assert!(closed(&mut s), "a trusted source must send a header");

    // An untrusted source claiming to be someone else.
    let mut s = connect_from("127.0.0.2".parse().unwrap(), tcp_addr).unwrap();
    s.write_all(b"PROXY TCP4 10.9.9.9 127.0.0.1 1 3478\r\n").unwrap();
    assert!(closed(&mut s), "an untrusted source must not send one");
    // ... while the same source without a header is served as itself.
    let direct = connect_from("127.0.0.2".parse().unwrap(), tcp_addr).unwrap();
    direct.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut client = StreamClient::new(direct, "direct");
    assert_eq!(mapped(&mut client).ip().to_string(), "127.0.0.2");

    // Malformed, oversize, truncated-and-stalled.
    let mut s = tcp(tcp_addr);
    s.write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n").unwrap();
    assert!(closed(&mut s));
    let mut s = tcp(tcp_addr);
    s.write_all(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(30)).unwrap();
    assert!(closed(&mut s));
    let mut s = tcp(tcp_addr);
    s.write_all(b"PROXY TCP4 198.51.100.").unwrap();
    // Closed by the header's bound (counted as a timeout below), not the 30 s idle timeout.
    assert!(closed(&mut s), "a stalled header is closed");
    // A v2 header whose length says more than ever comes.
    let mut s = tcp(tcp_addr);
    let mut lying = turnpike::proto::proxy::V2_SIGNATURE.to_vec();
    lying.extend_from_slice(&[0x21, 0x11, 0x10, 0x00, 1, 2, 3]);
    s.write_all(&lying).unwrap();
    assert!(closed(&mut s));

    // The listener still serves a good one.
    let mut s = tcp(tcp_addr);
    s.write_all(b"PROXY TCP4 198.51.100.8 127.0.0.1 6000 3478\r\n").unwrap();
    let mut client = StreamClient::new(s, "after");
    assert_eq!(mapped(&mut client), "198.51.100.8:6000".parse().unwrap());

    let text = scrape(metrics);
    for (reason, n) in [("missing", 1), ("untrusted", 1), ("malformed", 1), ("too_long", 1), ("timeout", 2)] {
        assert_eq!(refused(&text, reason), n, "{reason}: {text}");
    }
}

#[test]
fn proxied_clients_are_rate_limited_by_their_real_addresses() {
    let (server, _) = server((48340, 48359), TRUST_LOCALHOST, "abuse:\n  unauth_rate: 1\n  unauth_burst: 3\n");
    let tcp_addr = server.addrs.tcp[0];
    let answered = |real: &str, n: usize| {
        let mut s = tcp(tcp_addr);
        s.write_all(format!("PROXY TCP4 {real} 127.0.0.1 7000 3478\r\n").as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut c = StreamClient::new(s, "limited");
        let mut got = 0;
        for _ in 0..n {
            let req = c.build(Method::BINDING, Class::Request, false, &|_| {});
            c.io().write_all(&req).unwrap();
            let deadline = Instant::now() + Duration::from_millis(300);
            if matches!(c.client.recv(deadline), Ok(Some(_))) {
                got += 1;
            }
        }
        got
    };
    let first = answered("198.51.100.21", 8);
    assert!(first < 8, "the limit applies: {first} of 8 answered");
    // Another real address behind the same proxy has its own budget.
    assert_eq!(answered("203.0.113.22", 3), 3);
}

#[test]
fn without_proxy_from_nothing_is_checked() {
    let (server, _) = server((48360, 48379), "", "");
    // A header is then just bytes that are not STUN: the stream is closed as before, uncounted.
    let mut s = tcp(server.addrs.tcp[0]);
    let own = s.local_addr().unwrap();
    let mut client = StreamClient::new(s.try_clone().unwrap(), "plain");
    assert_eq!(mapped(&mut client), own);
    s.write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n").unwrap();
    let text = scrape(server.metrics_addr.unwrap());
    assert_eq!(metric(&text, "turnpike_proxy_headers_total"), 0);
    assert_eq!(refused(&text, "untrusted"), 0);
}

#[test]
fn the_pending_connection_limit_counts_the_real_clients_not_the_proxy() {
    let (server, _) = server((48380, 48399), TRUST_LOCALHOST, "abuse:\n  unauth_connections_per_source: 2\n");
    let tcp_addr = server.addrs.tcp[0];
    let open = |real: &str| {
        let mut s = tcp(tcp_addr);
        s.write_all(format!("PROXY TCP4 {real} 127.0.0.1 8000 3478\r\n").as_bytes()).unwrap();
        s
    };
    // Two pending connections for each of three real clients, all through the one proxy: served.
    let mut held = Vec::new();
    for real in ["198.51.100.31", "198.51.100.32", "198.51.100.33"] {
        for port in [1u16, 2] {
            let mut s = tcp(tcp_addr);
            s.write_all(format!("PROXY TCP4 {real} 127.0.0.1 {port} 3478\r\n").as_bytes()).unwrap();
            held.push(s);
        }
    }
    let mut client = StreamClient::new(held.pop().unwrap(), "still-served");
    assert_eq!(mapped(&mut client), "198.51.100.33:2".parse().unwrap());
    // A third for one of them is over that client's limit.
    let mut third = open("198.51.100.31");
    assert!(closed(&mut third));
    let text = scrape(server.metrics_addr.unwrap());
    assert_eq!(metric(&text, "turnpike_connections_refused_total{reason=\"per_source_limit\"}"), 1, "{text}");
}
