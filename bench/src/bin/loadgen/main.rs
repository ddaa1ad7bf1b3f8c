//! Load generator for TURN servers (turnpike, coturn, or a raw UDP forwarder as the kernel's baseline).
//!
//! Sets up N allocations with TURN REST credentials, binds each to a channel towards a UDP peer it runs
//! itself (or, with `--calls`, to its partner's relayed address: client -> relay -> relay -> client, as
//! in a call), then sends paced open-loop traffic and measures delivery, loss and one-way latency.
//! Every payload carries its send time and a sequence number. The server's CPU time and RSS come from
//! /proc/PID. Output: a human summary on stderr and one JSON line on stdout.
//!
//! `--tcp` reaches the server over TCP, `--tls` over TLS (one connection per client; the relay side
//! stays UDP).
//!
//! `--relay-family ipv6` asks for IPv6 relayed addresses (RFC 6156), so that the peers and the relay
//! side run over IPv6 while the clients reach the server as `--server` says.
//!
//! `--raw ADDR` skips TURN: payloads go to ADDR (a plain forwarder) which must send them to
//! `--peer-port` on the generator's address towards ADDR.
//!
//! The clients bind the address this host's routes use towards the server, and the peers the address
//! they use towards the relayed addresses: on loopback 127.0.0.1 (or ::1), from another host its
//! address on the way to the relay, so that a relay host can be load-tested over the network.

#![allow(clippy::disallowed_methods)] // a load generator reads the clock and sleeps

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use turnpike::proto::attr::AttrType;
use turnpike::proto::{Class, Method, MsgWriter, StunMsg, TransactionId};
use turnpike_client::{Answer, Credentials, Next, Session, allocate_attributes, channel_bind_attributes};

mod host;
mod latency;
mod link;
mod stamped;
use host::{proc_usage, steal_ms, unix_nanos, unix_now, wait_until_unix};
use latency::Latency;
use link::Link;
use stamped::StampedBatch;

struct Args {
    server: SocketAddr,
    secret: String,
    realm: String,
    allocations: usize,
    rate: u64,
    size: usize,
    duration: f64,
    warmup: f64,
    send_mode: bool,
    calls: bool,
    /// Ask for IPv6 relayed addresses (REQUESTED-ADDRESS-FAMILY, RFC 6156); the peers then listen on
    /// this host's IPv6 address towards them.
    ipv6_relays: bool,
    /// Clients reach the server over TCP.
    tcp: bool,
    /// ... over TLS (implies `tcp`).
    tls: bool,
    server_pid: Option<u32>,
    raw: Option<SocketAddr>,
    peer_port: u16,
    setup_only: bool,
    /// With --setup-only: how many times the authenticated Allocates are measured (allocations deleted
    /// in between), so that a small N still makes a measurement long enough to time.
    setup_rounds: usize,
    /// Wall-clock time (seconds since the Unix epoch) at which the traffic starts, after the set-up:
    /// several generators given the same instant share one measurement window.
    start_at: Option<f64>,
    /// Sleep until the next datagram is due instead of spinning (`--sleep-idle`): the generator's core
    /// then idles between sends, so that work the kernel does on it shows in /proc/stat.
    sleep_idle: bool,
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn parse_args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let num = |name: &str, default: &str| -> Result<f64, String> {
        arg(&a, name).unwrap_or(default).parse::<f64>().map_err(|_| format!("{name} must be a number"))
    };
    Ok(Args {
        server: arg(&a, "--server").unwrap_or("127.0.0.1:3478").parse().map_err(|_| "--server IP:PORT")?,
        secret: arg(&a, "--secret").unwrap_or("bench-secret").to_string(),
        realm: arg(&a, "--realm").unwrap_or("").to_string(),
        allocations: num("--allocations", "10")? as usize,
        rate: num("--rate", "10000")? as u64,
        size: (num("--size", "172")? as usize).clamp(24, 1400),
        duration: num("--duration", "3")?,
        warmup: num("--warmup", "0.5")?,
        send_mode: a.iter().any(|x| x == "--send-indications"),
        calls: a.iter().any(|x| x == "--calls"),
        ipv6_relays: match arg(&a, "--relay-family") {
            None | Some("ipv4") => false,
            Some("ipv6") => true,
            Some(_) => return Err("--relay-family ipv4|ipv6".into()),
        },
        tcp: a.iter().any(|x| x == "--tcp" || x == "--tls"),
        tls: a.iter().any(|x| x == "--tls"),
        server_pid: arg(&a, "--server-pid").and_then(|p| p.parse().ok()),
        raw: arg(&a, "--raw").map(|r| r.parse()).transpose().map_err(|_| "--raw IP:PORT")?,
        peer_port: num("--peer-port", "0")? as u16,
        setup_only: a.iter().any(|x| x == "--setup-only"),
        setup_rounds: (num("--setup-rounds", "1")? as usize).clamp(1, 1000),
        sleep_idle: a.iter().any(|x| x == "--sleep-idle"),
        start_at: match arg(&a, "--start-at").map(str::parse::<f64>).transpose() {
            Ok(Some(at)) if (at - unix_now()).abs() > 600.0 => {
                return Err("--start-at must be within 10 minutes of now (seconds since the Unix epoch)".into());
            }
            Ok(at) => at,
            Err(_) => return Err("--start-at UNIX-SECONDS".into()),
        },
    })
}

/// One client: its socket, its TURN session (the workspace's client, driven by this event loop) and
/// relayed address.
struct Client {
    link: Link,
    session: Session,
    relayed: Option<SocketAddr>,
    id: u32,
}

impl Client {
    fn request(&mut self, method: Method, auth: bool, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        self.session.message(method, Class::Request, auth, body)
    }
}

/// One message (or none) per client, indexed by client.
type PerClient = Vec<Option<Vec<u8>>>;

/// Builds one request per client in `which` (indexed by client; `None` for the others).
fn build_requests(clients: &mut [Client], which: &[usize], build: &dyn Fn(&mut Client) -> Vec<u8>) -> PerClient {
    let mut requests: PerClient = vec![None; clients.len()];
    for &i in which {
        requests[i] = Some(build(&mut clients[i]));
    }
    requests
}

/// Builds and sends one request from every client in `which` and waits (pipelined) for all answers.
fn round(
    poll: &mut Poll,
    clients: &mut [Client],
    which: &[usize],
    server: SocketAddr,
    build: &dyn Fn(&mut Client) -> Vec<u8>,
) -> PerClient {
    let requests = build_requests(clients, which, build);
    exchange(poll, clients, &requests, server)
}

/// Sends every request (one per client at most, all at once) and waits for the answer to each: a
/// datagram carrying that request's transaction ID (a late answer to an earlier retransmitted request
/// is skipped). Unanswered requests are retransmitted after 500 ms without progress; after
/// `GIVE_UP` without any answer the rest stay `None`.
fn exchange(poll: &mut Poll, clients: &mut [Client], requests: &[Option<Vec<u8>>], server: SocketAddr) -> PerClient {
    let mut out: PerClient = vec![None; clients.len()];
    let mut pending = 0;
    for (c, req) in clients.iter_mut().zip(requests) {
        if let Some(req) = req {
            let _ = c.link.send_to(req, server);
            pending += 1;
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let mut last_progress = Instant::now();
    let mut last_answer = Instant::now();
    while pending > 0 && last_answer.elapsed() < GIVE_UP {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
        for ev in events.iter() {
            let i = ev.token().0;
            let (Some(c), Some(Some(req))) = (clients.get_mut(i), requests.get(i)) else { continue };
            // Read until this request's answer (or nothing is left): one read per client in the
            // normal case. What stays queued is stale and is skipped by a later round.
            while let Ok(n) = c.link.recv(&mut buf) {
                let answers_it = n >= 20 && buf[0] & 0xC0 == 0 && buf[8..20] == req[8..20];
                if answers_it && out[i].is_none() {
                    out[i] = Some(buf[..n].to_vec());
                    pending -= 1;
                    last_progress = Instant::now();
                    last_answer = last_progress;
                    break;
                }
            }
        }
        if last_progress.elapsed() > Duration::from_millis(500) {
            // Retransmit what is still unanswered (UDP may drop under a burst of set-ups; a stream
            // does not, and is not retransmitted on).
            for ((c, req), answer) in clients.iter_mut().zip(requests).zip(&out) {
                if let (None, Some(req), Some(_)) = (answer, req, c.link.udp()) {
                    let _ = c.link.send_to(req, server);
                }
            }
            last_progress = Instant::now();
        }
    }
    out
}

/// How long [`exchange`] waits without any answer before it gives up on the rest.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Fails with a message naming the step when some requests of a round went unanswered.
fn all_answered(answers: &[Option<Vec<u8>>], which: &[usize], step: &str) -> io::Result<()> {
    let missing = which.iter().filter(|&&i| answers.get(i).is_none_or(Option::is_none)).count();
    if missing == 0 {
        Ok(())
    } else {
        Err(io::Error::other(format!("{missing} {step} requests unanswered after {} s", GIVE_UP.as_secs())))
    }
}

/// The attributes of every Allocate: REQUESTED-TRANSPORT UDP, and REQUESTED-ADDRESS-FAMILY IPv6 with
/// `--relay-family ipv6`.
fn allocate_body(args: &Args) -> impl Fn(&mut MsgWriter<'_>) {
    let ipv6 = args.ipv6_relays;
    move |w: &mut MsgWriter<'_>| allocate_attributes(w, ipv6)
}

/// Sends an unauthenticated Allocate from each of `which`: the session learns the realm and nonce of
/// its 401 answer.
fn challenge(poll: &mut Poll, clients: &mut [Client], which: &[usize], args: &Args) -> io::Result<()> {
    let attributes = allocate_body(args);
    let answers = round(poll, clients, which, args.server, &|c| c.request(Method::ALLOCATE, false, &attributes));
    all_answered(&answers, which, "Allocate")?;
    for &i in which {
        let (Some(Some(a)), Some(c)) = (answers.get(i), clients.get_mut(i)) else { continue };
        let answer = Answer::parse(a).ok_or_else(|| io::Error::other("the answer to an Allocate is not STUN"))?;
        if c.session.learn(&answer, false) != Next::Retry {
            let code = answer.code().map_or("a success".to_string(), |c| format!("error {c}"));
            return Err(io::Error::other(format!("an Allocate without credentials got {code}, not a 401 challenge")));
        }
    }
    Ok(())
}

/// One timed round of authenticated Allocates.
struct Timed {
    /// Each client's answer.
    answers: PerClient,
    /// Seconds from the first request to the last answer.
    took: f64,
    /// The server's CPU seconds meanwhile (when its PID is known).
    cpu: Option<f64>,
    /// Steal time of each CPU meanwhile, in milliseconds: a round the hypervisor interrupted is slower
    /// and, where the guest cannot tell, costs more CPU.
    steal_ms: Vec<u64>,
}

/// Sends an authenticated Allocate from each of `which` at once and times the answers: returns them
/// (every one present), the seconds they took, the server's CPU seconds (with --server-pid) and the
/// steal time meanwhile. The requests (and their MESSAGE-INTEGRITY) are built before the clock starts: the
/// generator's own work is not the server's set-up rate.
fn timed_allocate(poll: &mut Poll, clients: &mut [Client], which: &[usize], args: &Args) -> io::Result<Timed> {
    let attributes = allocate_body(args);
    let requests = build_requests(clients, which, &|c| c.request(Method::ALLOCATE, true, &attributes));
    let steal_before = steal_ms();
    let cpu_before = args.server_pid.and_then(proc_usage).map(|u| u.0);
    let start = Instant::now();
    let answers = exchange(poll, clients, &requests, args.server);
    let took = start.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.and_then(proc_usage).map(|u| u.0);
    let stolen = steal_ms().iter().zip(&steal_before).map(|(end, start)| end.saturating_sub(*start)).collect();
    all_answered(&answers, which, "authenticated Allocate")?;
    Ok(Timed { answers, took, cpu: cpu_before.zip(cpu_after).map(|(a, b)| b - a), steal_ms: stolen })
}

/// Deletes every allocation (Refresh with LIFETIME 0), so that the next run, whose sockets may get
/// the same ports, is not refused with 437 (Allocation Mismatch). Best effort: answers are not checked.
fn release(poll: &mut Poll, clients: &mut [Client], server: SocketAddr) {
    let which: Vec<usize> = (0..clients.len()).filter(|&i| clients[i].relayed.is_some()).collect();
    round(poll, clients, &which, server, &|c| {
        c.request(Method::REFRESH, true, &|w| w.add_bytes(AttrType::LIFETIME, &[0, 0, 0, 0]))
    });
}

fn error_code(resp: &[u8]) -> Option<u16> {
    Answer::parse(resp)?.code()
}

/// Reads everything waiting on the socket of `token` (a peer, or a client in calls mode) in batches
/// (`recvmmsg`: the generator must not be what limits the rate), records the latency of payloads sent
/// inside the measurement window (Unix nanoseconds), and returns how many those were.
fn receive_ready(
    token: usize,
    peers: &[UdpSocket],
    clients: &mut [Client],
    batch: &mut StampedBatch,
    window: (u64, u64),
    latency: &mut Latency,
) -> u64 {
    if let Some(Link::Tcp(_)) = clients.get(token).map(|c| &c.link) {
        return receive_stream(&mut clients[token].link, window, latency);
    }
    let mut counted = 0;
    loop {
        let n = if token >= 1_000_000 {
            peers.get(token - 1_000_000).map_or(0, |p| batch.recv(p))
        } else {
            clients.get(token).and_then(|c| c.link.udp()).map_or(0, |s| batch.recv(s))
        };
        if n == 0 {
            return counted;
        }
        let now = unix_nanos();
        for i in 0..n {
            let (buf, stamp) = batch.get(i);
            counted += record_arrival(buf, token >= 1_000_000, stamp, now, window, latency);
        }
    }
}

/// Reads every frame waiting on a client's TCP connection (calls mode) and records its latency. A
/// stream has no per-datagram kernel stamp: the time of the read is used, and the frame counted as
/// unstamped.
fn receive_stream(link: &mut Link, window: (u64, u64), latency: &mut Latency) -> u64 {
    let mut buf = [0u8; 2048];
    let mut counted = 0;
    while let Ok(n) = link.recv(&mut buf) {
        let now = unix_nanos();
        counted += record_arrival(&buf[..n], false, None, now, window, latency);
    }
    counted
}

/// Records one arrival (at a peer, `bare`, or at a client) sent inside the window; returns 1 if it was.
fn record_arrival(
    buf: &[u8],
    bare: bool,
    stamp: Option<u64>,
    now: u64,
    window: (u64, u64),
    latency: &mut Latency,
) -> u64 {
    // The payload is bare at peers; at clients it follows a ChannelData header or sits in a Data
    // indication.
    let payload: &[u8] = if bare {
        buf
    } else if buf.len() >= 4 && buf[0] & 0xC0 == 0x40 {
        &buf[4..]
    } else {
        match StunMsg::parse(buf).ok().and_then(|m| m.attr(AttrType::DATA)) {
            Some(d) => d,
            None => return 0,
        }
    };
    if payload.len() < 20 {
        return 0;
    }
    let sent_at = u64::from_be_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
    if sent_at < window.0 || sent_at >= window.1 {
        return 0;
    }
    latency.observed.record(now.saturating_sub(sent_at) / 1000);
    let arrived = stamp.unwrap_or_else(|| {
        latency.unstamped += 1;
        now
    });
    latency.added.record(arrived.saturating_sub(sent_at) / 1000);
    1
}

/// `--help` text.
const USAGE: &str = "usage: loadgen [--server IP:PORT] [--secret S] [--realm R] [--allocations N] [--rate PPS]
               [--size BYTES] [--duration S] [--warmup S] [--send-indications] [--calls] [--tcp | --tls]
               [--server-pid PID] [--setup-only [--setup-rounds K]] [--raw IP:PORT --peer-port P]
               [--start-at UNIX-SECONDS] [--relay-family ipv4|ipv6] [--sleep-idle]
Sets up N TURN allocations (REST credentials from --secret), binds channels to local peers (or, with
--calls, to each other's relayed addresses), sends paced traffic and prints loss, latency and the
server's CPU and RSS (with --server-pid) as a human line on stderr and a JSON line on stdout.
--tcp: each client reaches the server over its own TCP connection (TURN over TCP; relaying stays UDP);
--tls: over TLS (the server's certificate is accepted whatever it is). Latency at TCP and TLS clients
(--calls) is taken when the generator reads, so those arrivals count as unstamped.
--setup-only measures the set-up alone (rate, server CPU per Allocate, RSS per allocation); with
--setup-rounds K the authenticated Allocates are measured K times, the allocations deleted in between.
--relay-family ipv6 asks for IPv6 relayed addresses (RFC 6156); the peers listen on IPv6 then.
--start-at starts the traffic (warm-up, then the window) at that wall-clock time, after the set-up, so
that several generators measure the same window; `late_start_ms` says how late one was.
--sleep-idle sleeps until the next datagram is due instead of spinning, so that the generator's core
idles between sends and the kernel's work there shows in /proc/stat (bench-kernel).
Defaults: 127.0.0.1:3478, 10 allocations, 10000 pps, 172 bytes, 3 s after 0.5 s of warm-up.";

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

/// The local address this host's routes use towards `destination` (no datagram is sent): 127.0.0.1
/// for a server on loopback, the address of the outgoing interface for one across the network.
fn source_towards(destination: SocketAddr) -> io::Result<std::net::IpAddr> {
    let any: SocketAddr = if destination.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(destination)?;
    Ok(probe.local_addr()?.ip())
}

/// `count` peer sockets on `first` (the first on its port, the others on ephemeral ports of its
/// address), registered with the poll.
fn open_peers(poll: &mut Poll, count: usize, first: SocketAddr) -> io::Result<Vec<UdpSocket>> {
    (0..count)
        .map(|p| {
            let port = if p == 0 { first.port() } else { 0 };
            let mut sock = bench_socket(SocketAddr::new(first.ip(), port))?;
            poll.registry().register(&mut sock, Token(1_000_000 + p), Interest::READABLE)?;
            Ok(sock)
        })
        .collect()
}

/// A socket with 4 MiB buffers (as far as net.core.rmem_max/wmem_max allow): bursts that a server
/// sends in one batch must not overflow the generator's default 208 KiB receive buffer, or the loss
/// measured would be the generator's.
fn bench_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let buffers = turnpike::shard::socket::Buffers { recv: 4 << 20, send: 4 << 20 };
    Ok(UdpSocket::from_std(turnpike::shard::socket::relay_udp(addr, buffers)?))
}

fn run(args: &Args) -> io::Result<()> {
    if args.tcp && args.raw.is_some() {
        return Err(io::Error::other("--tcp/--tls and --raw cannot be combined (the raw forwarder is UDP)"));
    }
    if args.ipv6_relays && args.raw.is_some() {
        return Err(io::Error::other("--relay-family and --raw cannot be combined (--raw skips TURN)"));
    }
    let mut poll = Poll::new()?;
    let unix = unix_nanos() / 1_000_000_000;
    let n = if args.calls { args.allocations.max(2) & !1 } else { args.allocations.max(1) };
    // Peers: one UDP socket per 64 allocations (client <-> peer mode). The raw forwarder's are bound
    // before the clients, whose ephemeral ports could otherwise take the fixed `--peer-port`; a TURN
    // server's once the relayed addresses are known (the peers must be reachable from there).
    let peer_count = if args.calls { 0 } else { n.div_ceil(64).max(1) };
    let mut peers = Vec::new();
    if let Some(raw) = args.raw {
        peers = open_peers(&mut poll, peer_count, SocketAddr::new(source_towards(raw)?, args.peer_port))?;
    }
    let client_ip = source_towards(args.raw.unwrap_or(args.server))?;
    let mut clients = Vec::with_capacity(n);
    let tls = if args.tls { Some(link::tls_config()?) } else { None };
    for i in 0..n {
        let mut link = if args.tcp {
            Link::tcp(args.server, tls.as_ref())?
        } else {
            Link::Udp(bench_socket(SocketAddr::new(client_ip, 0))?)
        };
        poll.registry().register(link.source(), Token(i), Interest::READABLE)?;
        let credentials = Credentials::rest(args.secret.as_bytes(), &format!("bench{i}"), unix + 3600);
        // No FINGERPRINT: the requests stay those of earlier measurements.
        let session = Session::new(credentials, i as u32).with_realm(args.realm.as_bytes()).without_fingerprint();
        clients.push(Client { link, session, relayed: None, id: i as u32 });
    }
    let server_usage = |pid: Option<u32>| pid.and_then(proc_usage);
    let rss_before = server_usage(args.server_pid).map(|u| u.1);
    let mut setup_rate = 0.0;
    let mut setup_cpu_us = f64::NAN;
    // Where each client's data goes through its allocation: a peer, or (calls) its partner's relayed
    // address. Empty in raw mode.
    let mut targets: Vec<SocketAddr> = Vec::new();
    if args.raw.is_none() {
        let all: Vec<usize> = (0..n).collect();
        // Phase 1: unauthenticated Allocate -> 401 with realm and nonce.
        challenge(&mut poll, &mut clients, &all, args)?;
        // Phase 2: authenticated Allocate, pipelined from every client: the set-up rate, and the server
        // CPU it took (the rate alone may be bounded by this generator).
        let first = timed_allocate(&mut poll, &mut clients, &all, args)?;
        let (answers, took, cpu) = (&first.answers, first.took, first.cpu);
        let mut ok = 0usize;
        for (c, a) in clients.iter_mut().zip(answers) {
            let Some(a) = a else { continue };
            if let Some(code) = error_code(a) {
                return Err(io::Error::other(format!("Allocate failed with {code}")));
            }
            c.relayed = Answer::parse(a).and_then(|a| a.relayed());
            if let Some(relayed) = c.relayed.filter(|r| r.is_ipv6() != args.ipv6_relays) {
                return Err(io::Error::other(format!("the server relayed from {relayed}, not the family asked for")));
            }
            ok += 1;
        }
        setup_rate = ok as f64 / took;
        setup_cpu_us = cpu.map_or(f64::NAN, |c| c * 1e6 / ok.max(1) as f64);
        // The peers, on this host's address towards the relay.
        if let Some(relayed) = clients.iter().find_map(|c| c.relayed) {
            peers = open_peers(&mut poll, peer_count, SocketAddr::new(source_towards(relayed)?, 0))?;
        }
        // Channels (or permissions, in Send-indication mode) towards the peers or the partners.
        targets = (0..n)
            .map(|i| {
                if args.calls {
                    clients[i ^ 1].relayed.unwrap_or(args.server)
                } else {
                    peers[i / 64].local_addr().unwrap_or(args.server)
                }
            })
            .collect();
        let send_mode = args.send_mode;
        let answers = round(&mut poll, &mut clients, &all, args.server, &|c| {
            let peer = targets[c.id as usize];
            if send_mode {
                c.request(Method::CREATE_PERMISSION, true, &|w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer))
            } else {
                c.request(Method::CHANNEL_BIND, true, &|w| channel_bind_attributes(w, 0x4000, peer))
            }
        });
        all_answered(&answers, &all, "ChannelBind/CreatePermission")?;
        if let Some(code) = answers.iter().flatten().find_map(|a| error_code(a)) {
            return Err(io::Error::other(format!("ChannelBind/CreatePermission failed with {code}")));
        }
        if args.setup_only {
            std::thread::sleep(Duration::from_millis(300));
            let rss_after = server_usage(args.server_pid).map(|u| u.1);
            let per_alloc = match (rss_before, rss_after) {
                (Some(b), Some(a)) => (a.saturating_sub(b)) as f64 / n as f64,
                _ => f64::NAN,
            };
            // Further rounds: delete every allocation (not timed), then time the authenticated
            // Allocates again from the same sockets.
            let (mut total_ok, mut total_took, mut total_cpu) = (ok, took, cpu);
            let mut steal = first.steal_ms.clone();
            let per_alloc_us = |cpu: Option<f64>, ok: usize| cpu.map_or(f64::NAN, |c| c * 1e6 / ok.max(1) as f64);
            let mut round_cpu_us = vec![per_alloc_us(cpu, ok)];
            for _ in 1..args.setup_rounds {
                release(&mut poll, &mut clients, args.server);
                // coturn frees a deleted allocation on its next one-second timer tick and until then
                // answers a new Allocate from the same 5-tuple with 437; wait for it, and fetch fresh
                // nonces (coturn's ended with the allocation) - neither is timed.
                std::thread::sleep(Duration::from_millis(1200));
                challenge(&mut poll, &mut clients, &all, args)?;
                let timed = timed_allocate(&mut poll, &mut clients, &all, args)?;
                if let Some(code) = timed.answers.iter().flatten().find_map(|a| error_code(a)) {
                    return Err(io::Error::other(format!("Allocate failed with {code} in a later set-up round")));
                }
                total_ok += n;
                total_took += timed.took;
                total_cpu = total_cpu.zip(timed.cpu).map(|(t, c)| t + c);
                round_cpu_us.push(per_alloc_us(timed.cpu, n));
                for (sum, more) in steal.iter_mut().zip(&timed.steal_ms) {
                    *sum += more;
                }
            }
            let setup_rate = total_ok as f64 / total_took;
            let setup_cpu_us = per_alloc_us(total_cpu, total_ok);
            let steal: Vec<String> = steal.iter().map(u64::to_string).collect();
            let rounds: Vec<String> = round_cpu_us.iter().map(|us| format!("{us:.2}")).collect();
            eprintln!(
                "{n} allocations: {setup_rate:.0} authenticated allocations/s, server CPU {setup_cpu_us:.1} us per allocation (rounds: {}), RSS +{per_alloc:.2} KiB per allocation, timed {:.3} s, steal ms per CPU meanwhile [{}]",
                rounds.join(" "),
                total_took,
                steal.join(", ")
            );
            println!(
                "{{\"allocations\":{n},\"setup_per_sec\":{setup_rate:.1},\"cpu_us_per_alloc\":{setup_cpu_us:.2},\"round_cpu_us_per_alloc\":[{}],\"timed_s\":{total_took:.4},\"steal_ms\":[{}],\"rss_before_kib\":{},\"rss_after_kib\":{},\"rss_per_alloc_kib\":{per_alloc:.3}}}",
                rounds.join(","),
                steal.join(","),
                rss_before.unwrap_or(0),
                rss_after.unwrap_or(0)
            );
            release(&mut poll, &mut clients, args.server);
            return Ok(());
        }
    }

    // Each client sends to one address from here on: a connected socket spares the kernel a route
    // lookup per datagram (the generator must not be what limits the rate). Answers still come from
    // that address, and `release` may still name it.
    let destination = args.raw.unwrap_or(args.server);
    for s in clients.iter().filter_map(|c| c.link.udp()) {
        s.connect(destination)?;
    }
    let late_start_ms = match args.start_at {
        Some(at) => wait_until_unix(at),
        None => 0.0,
    };
    // Receive times from the kernel (see `stamped`); a socket that refuses leaves its datagrams
    // unstamped, and they are counted as such.
    for sock in peers.iter().chain(clients.iter().filter_map(|c| c.link.udp())) {
        if let Err(e) = stamped::enable(sock) {
            eprintln!("no kernel receive timestamps ({e}): latency includes the generator's own delay");
            break;
        }
    }
    // Traffic. Payload: [send time, ns since the Unix epoch (8)] [sequence (8)] [client (4)] [padding].
    let mut frame = vec![0u8; 4 + args.size + 48];
    let mut indication = vec![0u8; 0];
    let total_secs = args.warmup + args.duration;
    let interval_ns = 1e9 / args.rate.max(1) as f64;
    let mut latency = Latency::new();
    let mut sent_measured = 0u64;
    let mut recv_measured = 0u64;
    // The generator's worst lateness against its own schedule in the window: a stall of this process
    // (or of its core) is followed by a catch-up burst, whose queueing in the server shows up as latency.
    let mut max_lag_us = 0u64;
    let mut events = Events::with_capacity(4096);
    let mut batch = StampedBatch::new();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let measure_to = start + Duration::from_secs_f64(total_secs);
    // The same window in send times (Unix ns), which decide what counts.
    let start_unix = unix_nanos();
    let window = (start_unix + (args.warmup * 1e9) as u64, start_unix + (total_secs * 1e9) as u64);
    let mut usage_start = None;
    let mut steal_start = Vec::new();
    let mut seq = 0u64;
    let mut next_client = 0usize;
    let mut backlogged: Vec<u32> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= measure_to {
            break;
        }
        if usage_start.is_none() && now >= measure_from {
            usage_start = Some((server_usage(args.server_pid), now));
            steal_start = steal_ms();
        }
        // Packets due by now.
        let due = ((now - start).as_nanos() as f64 / interval_ns) as u64;
        if now >= measure_from && due > seq {
            max_lag_us = max_lag_us.max(((due - seq) as f64 * interval_ns / 1000.0) as u64);
        }
        let mut burst = 0;
        while seq < due && burst < 256 {
            let count = clients.len();
            let c = &mut clients[next_client];
            next_client = (next_client + 1) % count;
            let ts = unix_nanos();
            // A long burst can cross the end of the window; the receiver counts only payloads sent
            // inside it, so nothing is sent (and counted) past the end.
            if ts >= window.1 {
                break;
            }
            let payload_at = if args.raw.is_some() { 0 } else { 4 };
            frame[payload_at..payload_at + 8].copy_from_slice(&ts.to_be_bytes());
            frame[payload_at + 8..payload_at + 16].copy_from_slice(&seq.to_be_bytes());
            frame[payload_at + 16..payload_at + 20].copy_from_slice(&c.id.to_be_bytes());
            let result = if args.raw.is_some() {
                c.link.send(&frame[..args.size])
            } else if args.send_mode {
                let peer = targets.get(c.id as usize).copied().unwrap_or(args.server);
                indication.clear();
                indication.resize(args.size + 64, 0);
                let mut w = MsgWriter::new(&mut indication, Method::SEND, Class::Indication, TransactionId([7; 12]));
                w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
                w.add_bytes(AttrType::DATA, &frame[4..4 + args.size]);
                let len = w.finish().unwrap_or(0);
                c.link.send(&indication[..len])
            } else {
                frame[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
                frame[2..4].copy_from_slice(&(args.size as u16).to_be_bytes());
                c.link.send(&frame[..4 + args.size])
            };
            if result.is_ok() && ts >= window.0 {
                sent_measured += 1;
            }
            if c.link.backlog() > 0 && !backlogged.contains(&c.id) {
                backlogged.push(c.id);
            }
            seq += 1;
            burst += 1;
        }
        // TCP connections the server has not yet taken everything from.
        backlogged.retain(|&id| {
            let link = &mut clients[id as usize].link;
            link.flush();
            link.backlog() > 0
        });
        // Receive whatever is ready (peers, or clients in calls mode).
        let _ = poll.poll(&mut events, Some(Duration::ZERO));
        for ev in events.iter() {
            let counted = receive_ready(ev.token().0, &peers, &mut clients, &mut batch, window, &mut latency);
            recv_measured += counted;
        }
        if seq >= due {
            if args.sleep_idle {
                let next = start + Duration::from_secs_f64((seq + 1) as f64 * interval_ns / 1e9);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            } else {
                std::hint::spin_loop();
            }
        }
    }
    // Drain late arrivals for 300 ms.
    let drain_until = Instant::now() + Duration::from_millis(300);
    let usage_end = server_usage(args.server_pid);
    let steal: Vec<String> =
        steal_ms().iter().zip(&steal_start).map(|(end, start)| end.saturating_sub(*start).to_string()).collect();
    while Instant::now() < drain_until {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        for ev in events.iter() {
            let counted = receive_ready(ev.token().0, &peers, &mut clients, &mut batch, window, &mut latency);
            recv_measured += counted;
        }
    }
    release(&mut poll, &mut clients, args.server);
    let measured_secs = args.duration;
    let offered = sent_measured as f64 / measured_secs;
    let delivered = recv_measured as f64 / measured_secs;
    let loss =
        if sent_measured == 0 { 0.0 } else { 1.0 - (recv_measured.min(sent_measured) as f64 / sent_measured as f64) };
    let (cpu, rss) = match (usage_start.and_then(|u| u.0), usage_end) {
        (Some((c0, _)), Some((c1, rss))) => (c1 - c0, rss),
        _ => (f64::NAN, 0),
    };
    // Packets the server handled in the window: each delivered packet crossed it once (twice in calls
    // mode, where it is relayed from one allocation to the other).
    let hops = if args.calls { 2.0 } else { 1.0 };
    let cpu_us_per_packet = cpu * 1e6 / (recv_measured.max(1) as f64 * hops);
    let saturated = offered < 0.97 * args.rate as f64;
    let (added, observed) = (&latency.added, &latency.observed);
    eprintln!(
        "offered {offered:.0} pkt/s, delivered {delivered:.0} pkt/s, loss {:.3} %, added latency p50 {} us p99 {} us p99.9 {} us ({} unstamped; p99 {} us as read by the generator), server CPU {cpu:.2} s = {cpu_us_per_packet:.2} us/packet, RSS {rss} KiB, generator at most {max_lag_us} us behind schedule, steal ms per CPU [{}]{}",
        loss * 100.0,
        added.percentile(0.5),
        added.percentile(0.99),
        added.percentile(0.999),
        latency.unstamped,
        observed.percentile(0.99),
        steal.join(", "),
        if saturated { " (generator could not keep the schedule: offered rate below target)" } else { "" }
    );
    println!(
        "{{\"rate\":{},\"size\":{},\"allocations\":{},\"calls\":{},\"offered_pps\":{offered:.1},\"delivered_pps\":{delivered:.1},\"loss\":{loss:.6},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"p99_observed_us\":{},\"unstamped\":{},\"steal_ms\":[{}],\"server_cpu_s\":{cpu:.4},\"cpu_us_per_packet\":{cpu_us_per_packet:.4},\"rss_kib\":{rss},\"setup_per_sec\":{setup_rate:.1},\"cpu_us_per_alloc\":{setup_cpu_us:.2},\"generator_saturated\":{saturated},\"generator_max_lag_us\":{max_lag_us},\"late_start_ms\":{late_start_ms:.1}}}",
        args.rate,
        args.size,
        n,
        args.calls,
        added.percentile(0.5),
        added.percentile(0.99),
        added.percentile(0.999),
        observed.percentile(0.99),
        latency.unstamped,
        steal.join(",")
    );
    Ok(())
}
