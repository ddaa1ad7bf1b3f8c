//! Operations: reload on SIGHUP mid-stream without losing a packet, metrics that match, SIGTERM, the
//! systemd readiness protocol, the systemd unit, and the operator commands (probe, synapse-config,
//! config convert, credentials).

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

/// These tests measure rates or require zero loss: run them one at a time, so a 2-core machine is not
/// measuring its own contention.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialized() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

use common::{Binary, EchoPeer, REALM, SECRET, TurnClient, metric, scrape, start_server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnpike::proto::attr::AttrType;
use turnpike::proto::{Class, Method};
use turnpike_client::Credentials;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-ops-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_cert(dir: &Path, tag: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (c, k) = (dir.join(format!("{tag}-cert.pem")), dir.join(format!("{tag}-key.pem")));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    (c, k, cert.cert.der().to_vec())
}

fn client_with_secret(server: SocketAddr, user: &str, secret: &str) -> TurnClient {
    TurnClient::with_credentials(server, Credentials::rest(secret.as_bytes(), user, common::unix_now() + 3600))
}

fn try_allocate(c: &mut TurnClient) -> Option<u16> {
    c.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0])).code()
}

/// The DER of the certificate a TLS server presents.
fn presented_cert(addr: SocketAddr) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(turnpike_client::tls::AcceptAny(provider)))
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), rustls::pki_types::ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// A notification socket standing in for systemd.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { sock, path }
    }
    fn expect(&self, needle: &str) -> String {
        let mut buf = [0u8; 512];
        loop {
            let n = self.sock.recv(&mut buf).unwrap_or_else(|_| panic!("no `{needle}` notification"));
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(needle) {
                return msg;
            }
        }
    }
}

#[test]
fn sighup_mid_stream_reloads_everything_and_loses_nothing() {
    let _turn = serialized();
    let dir = temp_dir("reload");
    let (cert1, key1, der1) = write_cert(&dir, "one");
    let (cert2, key2, der2) = write_cert(&dir, "two");
    let base = |secrets: &str, quota: u32, denied: &str, cert: &Path, key: &Path| {
        format!(
            "listen:\n  ips: [127.0.0.1]\n  port: 0\n  tls_port: 0\nrelay:\n  ips: [127.0.0.1]\n  min_port: 47000\n  max_port: 47039\n\
             auth:\n  realm: {REALM}\n  shared_secrets: [{secrets}]\nallocations:\n  user_quota: {quota}\n\
             peers:\n  allowed: [\"127.0.0.0/8\"]\n  denied: [{denied}]\ntls:\n  cert: {}\n  pkey: {}\nruntime:\n  threads: 2\n",
            cert.display(),
            key.display()
        )
    };
    let notify = Notify::new(&dir);
    let server = Binary::start_with_env(
        "reload",
        &base("old-secret", 5, "", &cert1, &key1),
        &[("NOTIFY_SOCKET", notify.path.as_os_str())],
    );
    assert!(notify.expect("READY=1").contains("READY=1"), "Type=notify readiness after binding");
    let tls_addr: SocketAddr = server
        .wait_log("/tls with", Duration::from_secs(5))
        .unwrap()
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(presented_cert(tls_addr), der1);

    let peer = EchoPeer::start();
    let mut a = client_with_secret(server.addr, "@alice:example.org", "old-secret");
    assert_eq!(try_allocate(&mut a), None);
    assert_eq!(a.channel_bind(0x4000, peer.addr).class(), Class::Success);
    assert_eq!(a.create_permission("127.0.0.9:9".parse().unwrap()).class(), Class::Success, "allowed before");
    // Stream 1500 paced packets through the channel while the configuration changes underneath.
    let sock = a.sock().try_clone().unwrap();
    let relay_server = server.addr;
    let streamer = std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut received = 0u32;
        let mut buf = [0u8; 256];
        let start = Instant::now();
        for i in 0..1500u32 {
            let mut frame = vec![0x40, 0x00, 0x00, 0x04];
            frame.extend_from_slice(&i.to_be_bytes());
            sock.send_to(&frame, relay_server).unwrap();
            let due = start + Duration::from_millis(2 * u64::from(i + 1));
            while Instant::now() < due {
                if let Ok((n, _)) = sock.recv_from(&mut buf)
                    && n >= 8
                    && buf[0] == 0x40
                {
                    received += 1;
                }
            }
        }
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 8 && buf[0] == 0x40 {
                received += 1;
            }
        }
        received
    });
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&server.config, base("new-secret, old-secret", 1, "127.0.0.9", &cert2, &key2)).unwrap();
    server.signal("HUP");
    notify.expect("RELOADING=1");
    notify.expect("READY=1");
    assert!(server.wait_log("reload: generation 1 live on all shards", Duration::from_secs(5)).is_some());
    let received = streamer.join().unwrap();
    assert_eq!(received, 1500, "no relayed packet lost across the reload");

    // Old credentials still work while the old secret is listed; the new secret works too.
    assert_eq!(a.refresh(600).class(), Class::Success);
    let mut b = client_with_secret(server.addr, "@bob:example.org", "new-secret");
    assert_eq!(try_allocate(&mut b), None);
    // Quota 5 -> 1: alice already holds one.
    let mut a2 = client_with_secret(server.addr, "@alice:example.org", "old-secret");
    assert_eq!(try_allocate(&mut a2), Some(486));
    // Policy: 127.0.0.9 is now denied, and its old permission is gone.
    assert_eq!(a.create_permission("127.0.0.9:9".parse().unwrap()).code(), Some(403));
    // Certificate swapped for new connections.
    assert_eq!(presented_cert(tls_addr), der2);

    // An invalid file changes nothing.
    std::fs::write(&server.config, "auth:\n  realm: x\n  shared_secrets: [\n").unwrap();
    server.signal("HUP");
    assert!(server.wait_log("reload refused", Duration::from_secs(5)).is_some());
    let mut c = client_with_secret(server.addr, "@carol:example.org", "new-secret");
    assert_eq!(try_allocate(&mut c), None, "the running configuration stayed");
    assert_eq!(presented_cert(tls_addr), der2);

    // SIGTERM: clean exit, quickly.
    let mut server = server;
    server.signal("TERM");
    notify.expect("STOPPING=1");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(12), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(server.wait_log("allocation deleted (server shutting down)", Duration::from_secs(1)).is_some());
}

#[test]
fn metrics_match_live_state_and_traffic() {
    let _turn = serialized();
    let server = start_server(2, (47100, 47119), "metrics:\n  listen: 127.0.0.1:0\n");
    let addr = server.metrics_addr.expect("metrics enabled");
    let peer = EchoPeer::start();
    let mut clients: Vec<TurnClient> =
        (0..3).map(|i| TurnClient::rest(server.udp_addrs[0], &format!("m{i}"))).collect();
    for c in &mut clients {
        c.allocate();
    }
    assert_eq!(clients[0].channel_bind(0x4000, peer.addr).class(), Class::Success);
    let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(clients[1].create_permission(other).class(), Class::Success);
    for i in 0..10u8 {
        clients[0].send_channel(0x4000, &[i; 100]);
        assert!(clients[0].recv_data().is_some());
    }
    let bad = client_with_secret(server.udp_addrs[0], "mallory", "wrong");
    let mut bad = bad;
    assert_eq!(try_allocate(&mut bad), Some(401));
    let text = scrape(addr);
    assert_eq!(metric(&text, "turnpike_allocations{"), 3, "{text}");
    assert_eq!(
        metric(&text, "turnpike_allocations{shard=\"0\",transport=\"udp\"}")
            + metric(&text, "turnpike_allocations{shard=\"1\",transport=\"udp\"}"),
        3
    );
    assert_eq!(metric(&text, "turnpike_permissions{"), 2, "channel bind installs one, CreatePermission one");
    assert_eq!(metric(&text, "turnpike_channels{"), 1);
    assert_eq!(metric(&text, "turnpike_relayed_packets_total{direction=\"to_peer\"}"), 10);
    assert_eq!(metric(&text, "turnpike_relayed_packets_total{direction=\"to_client\"}"), 10);
    assert_eq!(metric(&text, "turnpike_relayed_bytes_total{direction=\"to_peer\"}"), 1000);
    assert_eq!(metric(&text, "turnpike_auth_failures_total{reason=\"bad_integrity\"}"), 1);
    assert_eq!(metric(&text, "turnpike_allocations_created_total{"), 3);
    assert!(text.contains("# TYPE turnpike_dropped_packets_total counter"));
    // Every relayed UDP datagram and every reply to a UDP client left through a counted send call, at
    // most one call per datagram (each request got one reply).
    let calls = metric(&text, "turnpike_send_calls_total");
    let replies = metric(&text, "turnpike_requests_total");
    assert!((1..=20 + replies).contains(&calls), "send calls {calls}, requests {replies}");
    assert!(text.contains("# TYPE turnpike_segmented_datagrams_total counter"));
    for c in &mut clients {
        assert_eq!(c.refresh(0).class(), Class::Success);
    }
    let text = scrape(addr);
    assert_eq!(metric(&text, "turnpike_allocations{"), 0);
    assert_eq!(metric(&text, "turnpike_permissions{"), 0);
    // More allocations than the 20 relay ports: the 508s are counted.
    let mut crowd: Vec<TurnClient> =
        (0..21).map(|i| client_with_secret(server.udp_addrs[0], &format!("c{i}"), SECRET)).collect();
    let refused = crowd.iter_mut().map(try_allocate).filter(|code| *code == Some(508)).count() as u64;
    assert!(refused >= 1);
    assert_eq!(metric(&scrape(addr), "turnpike_capacity_refusals_total"), refused);
}

/// Sends `request` on a new connection to the metrics endpoint and reads the answer to its end. An
/// answer is what arrives within a second: a read timeout is an error.
fn http_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

const SCRAPE: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// The metrics endpoint answers while more idle connections than it holds (its cap is 256) and
/// slowloris clients (a header byte a second) are connected: the old endpoint served one connection
/// at a time and let each hold it for seconds.
#[test]
fn metrics_answer_while_idle_and_slow_clients_hold_connections() {
    let _turn = serialized();
    let server = start_server(1, (47800, 47809), "metrics:\n  listen: 127.0.0.1:0\n");
    let addr = server.metrics_addr.expect("metrics enabled");
    // Idle connections: connected, never a byte. Stop opening at the first that is not accepted in time,
    // or after 10 s (a server that does not accept fills its backlog), so the test ends either way.
    let mut idle = Vec::new();
    let opening = Instant::now();
    for _ in 0..300 {
        if opening.elapsed() > Duration::from_secs(10) {
            break;
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(c) => idle.push(c),
            Err(_) => break,
        }
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return };
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                if s.write_all(b"GET /metrics HTTP/1.1\r\n").is_err() {
                    return;
                }
                // At most 20 bytes, a second apart; ends when the server hangs up or the test is done.
                for &b in b"X-Slow: aaaaaaaaaaaa".iter() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    // Let every slow client send its request line and a first header byte.
    std::thread::sleep(Duration::from_millis(1200));
    let mut answers = Vec::new();
    for i in 0..3 {
        let answer = http_exchange(addr, SCRAPE).unwrap_or_else(|e| panic!("scrape {i} got no answer in time: {e}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "scrape {i}: {answer}");
        assert!(answer.contains("turnpike_allocations"), "scrape {i}: {answer}");
        answers.push(answer);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
    assert_eq!(idle.len(), 300, "every idle connection was accepted");
    // At most 256 connections were open when the first scrape was rendered, its own among them: the
    // server closed the others (the oldest unanswered, or those silent for 2 s) and counted them.
    let closed = metric(&answers[0], "turnpike_http_connections_closed_total{");
    assert!(closed >= 300 + 1 - 256, "{}", answers[0]);
}

/// An oversized request head is refused (431) or the connection closed, never left hanging; unknown
/// paths get 404 and other methods 405.
#[test]
fn metrics_endpoint_refuses_oversized_heads_and_unknown_paths() {
    let _turn = serialized();
    let server = start_server(1, (47810, 47819), "metrics:\n  listen: 127.0.0.1:0\n");
    let addr = server.metrics_addr.expect("metrics enabled");
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..1024 {
        big.extend_from_slice(format!("X-Pad-{i:04}: {}\r\n", "a".repeat(50)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    assert!(big.len() >= 64 * 1024);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    // The server may stop reading and close while this is being written.
    let _ = s.write_all(&big);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {
            let text = String::from_utf8_lossy(&out);
            assert!(text.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "not closed in time: {e}"),
    }
    let answer = http_exchange(addr, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer =
        http_exchange(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    // `/` still renders the metrics, and the refusal was counted.
    let answer = http_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(metric(body, "turnpike_http_connections_closed_total{reason=\"header_too_large\"}"), 1, "{body}");
}

/// Receive coalescing (`runtime.coalesce_us`): a shard receiving more than `coalesce_min_pps` pauses
/// after its wake-ups (counted in the metrics) and still relays every datagram, in order; below that
/// rate, or with coalescing off, it never pauses.
#[test]
fn coalescing_pauses_busy_shards_and_loses_nothing() {
    let _turn = serialized();
    let cases = [
        ("  coalesce_us: 1000\n  coalesce_min_pps: 200\n", true),
        ("  coalesce_us: 1000\n  coalesce_min_pps: 100000000\n", false),
        ("  coalesce_us: 0\n  coalesce_min_pps: 200\n", false),
    ];
    for (runtime, pauses_expected) in cases {
        let server = start_server(1, (47700, 47709), &format!("{runtime}metrics:\n  listen: 127.0.0.1:0\n"));
        let addr = server.metrics_addr.expect("metrics enabled");
        let peer = EchoPeer::start();
        let mut client = TurnClient::rest(server.udp_addrs[0], "busy");
        client.allocate();
        assert_eq!(client.channel_bind(0x4000, peer.addr).class(), Class::Success);
        let payload = |round: u16, i: u16| [round.to_be_bytes(), i.to_be_bytes()].concat().repeat(40);
        for round in 0..100u16 {
            for i in 0..20u16 {
                client.send_channel(0x4000, &payload(round, i));
            }
            for i in 0..20u16 {
                let (_, _, data) = client.recv_data().unwrap_or_else(|| panic!("{runtime}: echo {round}/{i} lost"));
                assert_eq!(data, payload(round, i), "{runtime}: out of order");
            }
        }
        let text = scrape(addr);
        assert_eq!(metric(&text, "turnpike_relayed_packets_total{direction=\"to_peer\"}"), 2000);
        assert_eq!(metric(&text, "turnpike_relayed_packets_total{direction=\"to_client\"}"), 2000);
        let pauses = metric(&text, "turnpike_coalescing_pauses_total");
        assert_eq!(pauses > 0, pauses_expected, "{runtime}: {pauses} pauses");
    }
}

/// `runtime.raw_send`: many allocations each sending a lone datagram per round (channel data and Send
/// indications) reach the peer intact (the loopback device checks the UDP checksum the shard wrote),
/// each from its own allocation's relayed address, through the shard's raw socket (counted), and the
/// peer's answers still come back through the relay sockets; with the option off, none leaves raw.
/// Without CAP_NET_RAW only the delivery is checked (the server falls back), unless
/// TURNPIKE_REQUIRE_RAW is set.
#[test]
fn raw_send_relays_each_allocations_datagrams_from_its_own_address() {
    let _turn = serialized();
    let permitted = turnpike::shard::rawsend::RawSocket::open(0, 1).is_ok();
    assert!(
        permitted || std::env::var_os("TURNPIKE_REQUIRE_RAW").is_none(),
        "TURNPIKE_REQUIRE_RAW is set but no raw socket opens"
    );
    // On: first, since a server gives up CAP_NET_RAW for the thread that starts it (this one).
    for raw_send in [true, false] {
        // raw_min_batch 1: every lone datagram takes the raw socket, however the shard's wake-ups fall.
        let extra = format!("  raw_send: {raw_send}\n  raw_min_batch: 1\nmetrics:\n  listen: 127.0.0.1:0\n");
        let server = start_server(1, (47720, 47759), &extra);
        let metrics = server.metrics_addr.expect("metrics enabled");
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut clients: Vec<TurnClient> =
            (0..20).map(|i| TurnClient::rest(server.udp_addrs[0], &format!("raw{i}"))).collect();
        let relayed: Vec<SocketAddr> = clients.iter_mut().map(TurnClient::allocate).collect();
        for (i, c) in clients.iter_mut().enumerate() {
            let r = if i % 2 == 0 {
                c.channel_bind(0x4000, peer.local_addr().unwrap())
            } else {
                c.create_permission(peer.local_addr().unwrap())
            };
            assert_eq!(r.class(), Class::Success);
        }
        let payload = |i: usize, round: usize| format!("allocation {i} round {round} ").repeat(i + 1).into_bytes();
        let mut buf = [0u8; 2048];
        for round in 0..5 {
            for (i, c) in clients.iter_mut().enumerate() {
                if i % 2 == 0 {
                    c.send_channel(0x4000, &payload(i, round));
                } else {
                    c.send_indication(peer.local_addr().unwrap(), &payload(i, round));
                }
            }
            let mut seen = vec![false; clients.len()];
            for _ in 0..clients.len() {
                let (n, from) =
                    peer.recv_from(&mut buf).unwrap_or_else(|e| panic!("raw_send {raw_send}: round {round}: {e}"));
                let i = relayed
                    .iter()
                    .position(|r| *r == from)
                    .unwrap_or_else(|| panic!("from {from}, not a relayed address"));
                assert_eq!(buf[..n], payload(i, round), "raw_send {raw_send}: allocation {i}");
                assert!(!seen[i], "allocation {i} twice");
                seen[i] = true;
                peer.send_to(b"answer", from).unwrap();
            }
            for c in &mut clients {
                let (_, _, data) = c.recv_data().expect("the peer's answer relayed back");
                assert_eq!(data, b"answer");
            }
        }
        let text = scrape(metrics);
        assert_eq!(metric(&text, "turnpike_relayed_packets_total{direction=\"to_peer\"}"), 100);
        let raw = metric(&text, "turnpike_raw_socket_datagrams_total");
        assert_eq!(raw, if raw_send && permitted { 100 } else { 0 }, "raw_send {raw_send}, permitted {permitted}");
    }
}

fn turnpike(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn probe_succeeds_and_diagnoses_failures() {
    let _turn = serialized();
    let server = start_server(2, (47200, 47239), "");
    let udp = format!("turn:{}", server.udp_addrs[0]);
    let tcp = format!("turn:{}?transport=tcp", server.addrs.tcp[0]);
    for uri in [&udp, &tcp] {
        let (ok, out) = turnpike(&["probe", uri, "--secret", SECRET, "--count", "5"]);
        assert!(ok, "{out}");
        assert!(out.contains("5/5 datagrams relayed") && out.contains("TURN relaying works"), "{out}");
    }
    let (ok, out) = turnpike(&["probe", &udp, "--secret", "not-the-secret"]);
    assert!(!ok && out.contains("wrong shared secret"), "{out}");
    // --json: one object per step as it completes, then the summary.
    let json = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["probe", &udp, "--secret", SECRET, "--count", "3", "--json"])
        .output()
        .unwrap();
    assert!(json.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&json.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<&str> = lines.iter().filter_map(|v| v["step"].as_str()).collect();
    assert_eq!(steps[..3], ["resolve", "allocate A", "allocate B"], "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!((last["result"].as_bool(), last["rtt_ms"].as_array().map(Vec::len)), (Some(true), Some(3)), "{last}");
    // A CA file that holds no certificate is an error, not silently the system's roots alone.
    let empty = std::env::temp_dir().join(format!("turnpike-empty-ca-{}.pem", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let turns = format!("turns:{}", listener.local_addr().unwrap());
    let (ok, out) = turnpike(&["probe", &turns, "--secret", "x", "--ca", empty.to_str().unwrap(), "--timeout", "1"]);
    assert!(!ok && out.contains("no usable CA certificate"), "{out}");
    let (ok, out) = turnpike(&["probe", &udp, "--user", "alice", "--password", "wonderland", "--count", "2"]);
    assert!(ok, "static user: {out}");
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (ok, out) = turnpike(&["probe", &format!("turn:{closed}"), "--secret", "x", "--timeout", "1"]);
    assert!(!ok && out.contains("port closed"), "{out}");
    let closed_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (ok, out) = turnpike(&["probe", &format!("turn:{closed_tcp}?transport=tcp"), "--secret", "x"]);
    assert!(!ok && out.contains("port closed"), "{out}");
}

#[test]
fn probe_succeeds_against_coturn() {
    let _turn = serialized();
    if Command::new("turnserver").arg("-h").output().is_err() {
        assert!(std::env::var_os("TURNPIKE_REQUIRE_INTEROP").is_none(), "coturn's turnserver is required");
        eprintln!("SKIPPED: turnserver (coturn) not installed");
        return;
    }
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = temp_dir("coturn");
    let mut coturn = Command::new("turnserver")
        .args(["-n", "--listening-ip=127.0.0.1", &format!("--listening-port={port}"), "--relay-ip=127.0.0.1"])
        .args(["--min-port=47300", "--max-port=47399", "--use-auth-secret", "--static-auth-secret=coturn-secret"])
        .args(["--realm=coturn.test", "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls"])
        .arg(format!("--pidfile={}", dir.join("pid").display()))
        .arg(format!("--log-file={}", dir.join("log").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) =
        turnpike(&["probe", &format!("turn:127.0.0.1:{port}"), "--secret", "coturn-secret", "--count", "5"]);
    let (ok_tcp, out_tcp) = turnpike(&[
        "probe",
        &format!("turn:127.0.0.1:{port}?transport=tcp"),
        "--secret",
        "coturn-secret",
        "--count",
        "5",
    ]);
    let (bad, out_bad) = turnpike(&["probe", &format!("turn:127.0.0.1:{port}"), "--secret", "wrong"]);
    let _ = coturn.kill();
    let _ = coturn.wait();
    assert!(ok, "{out}");
    assert!(ok_tcp, "{out_tcp}");
    assert!(!bad && out_bad.contains("wrong shared secret"), "{out_bad}");
}

#[test]
fn systemd_unit_verifies_with_the_built_binary() {
    let _turn = serialized();
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    }
    let dir = temp_dir("unit");
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/turnpike.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/usr/bin/turnpike reload --config"));
    let unit = unit
        .replace("/usr/bin/turnpike", env!("CARGO_BIN_EXE_turnpike"))
        .replace("/etc/turnpike/turnpike.yaml", concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.yaml"));
    let path = dir.join("turnpike.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
    // With the kernel path's drop-in beside it (what an operator installs for runtime.kernel_path).
    let drop_in = dir.join("turnpike.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/kernel-path.conf"), drop_in.join("kernel-path.conf"))
        .unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify with kernel-path.conf: {text}");
}

#[test]
fn operator_commands() {
    let _turn = serialized();
    let dir = temp_dir("cli");
    // credentials: the password is what the homeserver would mint.
    let (ok, out) =
        turnpike(&["credentials", "--secret", "s3", "--user", "@u:x", "--ttl", "60", "--uri", "turn:t.example:3478"]);
    assert!(ok, "{out}");
    let username = out.lines().find_map(|l| l.strip_prefix("username: ")).unwrap().to_string();
    let password = out.lines().find_map(|l| l.strip_prefix("password: ")).unwrap().to_string();
    assert!(username.ends_with(":@u:x"));
    assert_eq!(password.as_bytes(), turnpike::proto::integrity::rest_password(b"s3", username.as_bytes()));
    assert!(out.contains("\"urls\":\"turn:t.example:3478\""), "{out}");

    // config convert: the Synapse how-to's turnserver.conf becomes YAML turnpike reads back.
    let conf = dir.join("turnserver.conf");
    std::fs::write(
        &conf,
        "use-auth-secret\nstatic-auth-secret=howto\nrealm=turn.myserver.org\nsyslog\nno-tcp-relay\n\
         denied-peer-ip=10.0.0.0-10.255.255.255\nallowed-peer-ip=10.0.0.1\nno-multicast-peers\nuser-quota=12\ntotal-quota=1200\n",
    )
    .unwrap();
    let (ok, yaml) = turnpike(&["config", "convert", conf.to_str().unwrap()]);
    assert!(ok, "{yaml}");
    let converted = turnpike::config::parse(Path::new("converted.yaml"), &yaml).expect("converted YAML is valid");
    assert_eq!(converted.realm, "turn.myserver.org");
    assert_eq!(converted.secrets, ["howto"]);
    assert_eq!((converted.user_quota, converted.total_quota), (12, 1200));

    // synapse-config from the server's own settings.
    let yaml_path = dir.join("t.yaml");
    std::fs::write(&yaml_path, "auth:\n  realm: turn.example.org\n  shared_secrets: [abc]\ntls:\n  cert: null\n")
        .unwrap();
    let (ok, out) = turnpike(&["synapse-config", "--config", yaml_path.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("turn_uris: [ \"turn:turn.example.org?transport=udp\", \"turn:turn.example.org?transport=tcp\" ]"),
        "{out}"
    );
    assert!(out.contains("turn_shared_secret: \"abc\"") && out.contains("turn_user_lifetime: 86400000"));

    // check reports errors with file, line and option.
    std::fs::write(&yaml_path, "auth:\n  realm: x\n  shared_secrets: [a]\nrelay:\n  min_port: 9\n  max_port: 8\n")
        .unwrap();
    let (ok, out) = turnpike(&["check", "--config", yaml_path.to_str().unwrap()]);
    assert!(!ok && out.contains("t.yaml:5: option `relay.min_port`"), "{out}");
}

/// Writes a configuration that logs to a file (relay ports `ports`, then changed by `edit`) into a fresh
/// directory `name`, and starts the binary on it through `sh -c` after `shell_prefix` (e.g. a `ulimit`),
/// stderr discarded. Returns the child and the log file.
fn spawn_logging(
    name: &str,
    ports: (u16, u16),
    edit: impl FnOnce(String) -> String,
    shell_prefix: &str,
) -> (std::process::Child, PathBuf) {
    let dir = temp_dir(name);
    let log = dir.join("turnpike.log");
    let cfg = dir.join("t.yaml");
    let yaml = common::test_yaml(1, ports, "127.0.0.1", &format!("logging:\n  file: {}\n", log.display()));
    std::fs::write(&cfg, edit(yaml)).unwrap();
    let command = format!("{shell_prefix} exec {} --config {}", env!("CARGO_BIN_EXE_turnpike"), cfg.display());
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (child, log)
}

/// The log file's text once it contains `needle` (or after 10 s).
fn wait_for_log(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while Instant::now() < deadline && !text.contains(needle) {
        std::thread::sleep(Duration::from_millis(50));
        text = std::fs::read_to_string(log).unwrap_or_default();
    }
    text
}

#[test]
fn logging_to_a_file() {
    let _turn = serialized();
    let (mut child, log) = spawn_logging("logfile", (47400, 47409), |yaml| yaml, "");
    let text = wait_for_log(&log, "listening on");
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(text.contains("listening on 127.0.0.1:"), "log file: {text}");
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopped"), "shutdown is logged too: {text}");
    assert!(!text.contains(SECRET), "credentials are never logged");
}

#[test]
fn probe_over_tls() {
    let _turn = serialized();
    let dir = temp_dir("probe-tls");
    let (cert, key, _) = write_cert(&dir, "probe");
    let extra = format!("tls:\n  cert: {}\n  pkey: {}\n", cert.display(), key.display());
    let yaml =
        common::test_yaml(1, (47500, 47519), "127.0.0.1", &extra).replace("  port: 0\n", "  port: 0\n  tls_port: 0\n");
    let cfg = turnpike::config::parse(Path::new("<test>.yaml"), &yaml).unwrap();
    let server = turnpike::server::start(&cfg).unwrap();
    let uri = format!("turns:{}", server.addrs.tls[0]);
    let (ok, out) = turnpike(&["probe", &uri, "--secret", SECRET, "--count", "3", "--insecure"]);
    assert!(ok && out.contains("3/3 datagrams relayed"), "{out}");
    // Without --insecure the self-signed certificate is refused, and the probe says where.
    let (ok, out) = turnpike(&["probe", &uri, "--secret", SECRET, "--count", "1"]);
    assert!(!ok && out.contains("TLS handshake"), "{out}");
}

/// Starts a one-shard server listening on `port` (UDP and TCP) with relay ports `relay`.
fn start_on_port(port: u16, relay: (u16, u16)) -> std::io::Result<turnpike::server::ServerHandle> {
    let yaml = common::test_yaml(1, relay, "127.0.0.1", "").replace("  port: 0\n", &format!("  port: {port}\n"));
    let cfg = turnpike::config::parse(Path::new("<test>.yaml"), &yaml).unwrap();
    turnpike::server::start(&cfg)
}

/// A port another process holds is refused with an error that says so, instead of binding beside it
/// (the shards' SO_REUSEPORT would allow it) and silently taking part of its traffic; once the holder
/// is gone the port is used.
#[test]
fn a_listening_port_already_in_use_is_refused() {
    let first = start_server(1, (47600, 47609), "");
    let port = first.udp_addrs[0].port();
    let err = start_on_port(port, (47610, 47619)).expect_err("a second server on the same port");
    let want = format!("cannot listen on 127.0.0.1:{port}/udp: another process is already using this port");
    assert!(err.to_string().contains(&want), "{err}");
    first.shutdown();

    // Any holder, not only turnpike: a plain UDP socket, then a plain TCP listener.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let err = start_on_port(port, (47620, 47629)).expect_err("UDP port held");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}/udp: another process")), "{err}");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    if UdpSocket::bind(("127.0.0.1", tcp_port)).is_ok() {
        let err = start_on_port(tcp_port, (47620, 47629)).expect_err("TCP port held");
        assert!(err.to_string().contains(&format!("127.0.0.1:{tcp_port}/tcp: another process")), "{err}");
    }
    drop((udp, tcp));
    let server = start_on_port(port, (47630, 47639)).expect("the port is free again");
    assert_eq!(server.udp_addrs[0].port(), port);
    server.shutdown();
}

/// A server out of descriptors (relay sockets took them all) cannot accept; a connection the kernel
/// completed meanwhile waits in its backlog and is accepted once descriptors free up, without waiting
/// for yet another connection.
#[test]
fn accept_resumes_when_descriptors_free_up() {
    let _turn = serialized();
    let fixed_port = |yaml: String| yaml.replace("  port: 0\n", "  port: 47650\n");
    let (mut child, log) = spawn_logging("emfile", (47600, 47649), fixed_port, "ulimit -n 48 &&");
    wait_for_log(&log, "listening on");
    let addr: SocketAddr = "127.0.0.1:47650".parse().unwrap();
    // Allocations until the relay sockets have taken every descriptor (508).
    let mut clients = Vec::new();
    let refused = loop {
        assert!(clients.len() < 50, "48 descriptors never ran out");
        let mut c = TurnClient::rest(addr, &format!("emfile{}", clients.len()));
        let r = c.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
        if r.code() == Some(508) {
            break c;
        }
        assert_eq!(r.class(), Class::Success, "{:?}", r.code());
        clients.push(c);
    };
    drop(refused);
    let mut last = TcpStream::connect(addr).unwrap();
    // A STUN Binding request (type, length 0, magic cookie, transaction ID).
    let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    binding.extend_from_slice(b"emfile-test!");
    last.write_all(&binding).unwrap();
    let text = wait_for_log(&log, "cannot accept a connection");
    // Free descriptors: delete the allocations (a few sockets stay open as spares, the rest close).
    // No new connection comes.
    for c in &mut clients {
        assert_eq!(c.refresh(0).class(), Class::Success);
    }
    last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let answer = last.read(&mut buf);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    assert!(child.wait().unwrap().success());
    assert!(text.contains("cannot accept a connection"), "the server ran out of descriptors: {text}");
    let n = answer.unwrap();
    assert!(n >= 20 && buf[..2] == [0x01, 0x01] && buf[8..20] == *b"emfile-test!", "Binding success");
}
