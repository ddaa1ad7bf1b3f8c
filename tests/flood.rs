//! Floods of idle TCP and TLS connections against a server with few descriptors (256): they must not
//! take the descriptors relay sockets need (UDP Allocates keep succeeding) nor keep TCP and TLS
//! clients out, and what is done to them is counted and logged at a bounded rate.

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use common::stream::{StreamClient, self_signed, tls_client};
use common::{Binary, TurnClient, connect_from, metric, raise_nofile, scrape};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PORT: u16 = 48_800;
const TLS_PORT: u16 = 48_801;
const METRICS_PORT: u16 = 48_802;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

/// Loopback sources of the flood, none of them 127.0.0.1 (where the real clients come from).
fn flood_source(k: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (k / 250) as u8, 1 + (k % 250) as u8))
}

/// Opens idle connections to the TCP and TLS ports from `sources` loopback addresses, `per_source`
/// each, and holds them (the server may close them: that is the point).
fn idle_flood(sources: u32, per_source: u32) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for k in 0..sources {
        for j in 0..per_source {
            let to = addr(if j % 2 == 0 { PORT } else { TLS_PORT });
            if let Ok(s) = connect_from(flood_source(k), to) {
                held.push(s);
            }
        }
    }
    held
}

/// Until `stop`, keeps reconnecting from a few sources (holding the last connections open), as a
/// client in a reconnect loop does; at most `max` connections and 60 s.
fn reconnect_loop(stop: Arc<AtomicBool>, opened: Arc<AtomicU64>, max: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut held = std::collections::VecDeque::new();
        let mut k = 0u32;
        while !stop.load(Ordering::Relaxed) && opened.load(Ordering::Relaxed) < max && start.elapsed().as_secs() < 60 {
            let to = addr(if k.is_multiple_of(2) { PORT } else { TLS_PORT });
            if let Ok(s) = connect_from(flood_source(1000 + k % 8), to) {
                held.push_back(s);
                opened.fetch_add(1, Ordering::Relaxed);
            }
            if held.len() > 64 {
                held.pop_front();
            }
            k = k.wrapping_add(1);
        }
    })
}

/// A TCP or TLS client from 127.0.0.1 that connects and allocates, trying again (a new connection)
/// when the server closes the connection (the client panics, caught here), for at most `within`.
/// Returns how long it took.
fn stream_allocate(tls: Option<&[u8]>, user: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        let result = std::panic::catch_unwind(|| match tls {
            None => {
                let s = TcpStream::connect(addr(PORT)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                StreamClient::new(s, user).allocate()
            }
            Some(der) => StreamClient::new(tls_client(addr(TLS_PORT), der, &rustls::version::TLS13), user).allocate(),
        });
        if result.is_ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn idle_connection_floods_leave_allocations_served() {
    raise_nofile();
    let dir = std::env::temp_dir().join(format!("turnpike-flood-{}", std::process::id()));
    let (cert, key, der) = self_signed(&dir);
    let yaml = common::test_yaml(2, (48_810, 48_909), "127.0.0.1", "")
        .replace("  port: 0\n", &format!("  port: {PORT}\n  tls_port: {TLS_PORT}\n"))
        + &format!(
            "tls:\n  cert: {}\n  pkey: {}\nmetrics:\n  listen: 127.0.0.1:{METRICS_PORT}\n",
            cert.display(),
            key.display()
        );
    let server = Binary::start_with_nofile("flood", &yaml, 256);

    // 500 idle connections from 100 sources, and a client reconnecting in a loop.
    let flood = idle_flood(100, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let reconnecting = reconnect_loop(Arc::clone(&stop), Arc::clone(&opened), 1_000_000);
    std::thread::sleep(Duration::from_millis(500));

    // UDP Allocates are served every time.
    for k in 0..30 {
        let mut c = TurnClient::rest(server.addr, &format!("udp{k}"));
        c.allocate();
        assert_eq!(c.refresh(0).class(), turnpike::proto::Class::Success);
    }
    // TCP and TLS clients are served within a few seconds, every one of them.
    let mut slowest = Duration::ZERO;
    for k in 0..12 {
        let tls = (k % 2 == 1).then_some(der.as_slice());
        let took = stream_allocate(tls, &format!("stream{k}"), Duration::from_secs(5));
        let took = took.unwrap_or_else(|| {
            panic!("client {k} ({}) not served within 5 s", if tls.is_some() { "tls" } else { "tcp" })
        });
        slowest = slowest.max(took);
    }
    stop.store(true, Ordering::Relaxed);
    reconnecting.join().unwrap();
    println!("slowest stream client: {slowest:?}; reconnect loop opened {}", opened.load(Ordering::Relaxed));

    // The flood was refused or closed early, counted, and logged at a bounded rate.
    let text = scrape(addr(METRICS_PORT));
    let refused = metric(&text, "turnpike_connections_refused_total{");
    let closed_early = metric(&text, "turnpike_connections_closed_early_total{");
    assert!(refused + closed_early >= 300, "refused {refused}, closed early {closed_early}\n{text}");
    let logged = server
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("closed at once") || l.contains("to make room"))
        .count();
    // At most 10 lines per shard per 10 s, plus a line saying how many were suppressed.
    assert!(logged <= 2 * 11 * 4, "{logged} log lines for {} refusals", refused + closed_early);
    drop(flood);
}
