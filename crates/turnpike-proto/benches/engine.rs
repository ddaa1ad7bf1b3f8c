//! The engine on its two hottest requests: an authenticated Allocate (credentials checked, quota
//! counted, a relay port drawn, the response signed; the allocation deleted again outside the timing)
//! and the relay path's ChannelData lookup (tuple -> allocation -> channel -> permission -> peer).

#![allow(clippy::disallowed_methods)] // a benchmark starts its clock at a real Instant

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnpike_proto::allocation::{FiveTuple, ListenerId, RelayKey, Transport};
use turnpike_proto::attr::{AttrType, PROTO_UDP};
use turnpike_proto::auth::{CredentialStore, NonceKey};
use turnpike_proto::cluster::LocalCluster;
use turnpike_proto::engine::{BindError, RelaySockets};
use turnpike_proto::integrity::{LongTermKey, long_term_key, rest_password};
use turnpike_proto::stats::EngineCounters;
use turnpike_proto::{
    Action, Class, Cluster, Engine, Method, MsgWriter, PacketBuf, RelayAddr, Settings, StunMsg, TransactionId,
};

const UNIX0: u64 = 1_800_000_000;
const REALM: &[u8] = b"bench";
/// Relay ports of the benchmark's shard: the most allocations alive at once.
const PORTS: std::ops::Range<u16> = 40_000..50_000;

/// Relay sockets that always open (no system calls: the engine's own cost is measured).
struct NoSockets;

impl RelaySockets for NoSockets {
    fn open(&mut self, _: RelayKey, _: SocketAddr) -> Result<(), BindError> {
        Ok(())
    }
    fn close(&mut self, _: RelayKey) {}
}

/// An engine with one IPv4 relay address, a REST secret, no quotas, the default peer policy.
fn engine(t0: Instant) -> Engine {
    let mut credentials = CredentialStore::new("bench", b':');
    credentials.add_secret("s");
    let relay = RelayAddr { bind: IpAddr::from([127, 0, 0, 1]), advertised: IpAddr::from([192, 0, 2, 1]) };
    // No limit on unauthenticated answers (0: unlimited): the benchmark's client is challenged from one address.
    let settings = Settings {
        unauth_rate: 0,
        unauth_burst: 0,
        ..Settings::new(credentials, NonceKey::new([9; 32]), vec![relay], vec![])
    };
    let cluster = Arc::new(LocalCluster::new([(relay.bind, relay.advertised)], []));
    Engine::new(
        0,
        Arc::new(settings),
        cluster as Arc<dyn Cluster>,
        Arc::new(EngineCounters::default()),
        PORTS,
        t0,
        UNIX0,
        &[1; 32],
    )
}

/// A client of the benchmark: REST credentials, the nonce once challenged, transaction IDs.
struct Client {
    username: String,
    key: LongTermKey,
    nonce: Vec<u8>,
    tid: u64,
}

impl Client {
    fn new() -> Self {
        let username = format!("{}:bench", UNIX0 + 3600);
        let password = rest_password(b"s", username.as_bytes());
        let key = long_term_key(username.as_bytes(), REALM, &password);
        Self { username, key, nonce: Vec::new(), tid: 0 }
    }

    fn request(&mut self, method: Method, body: impl Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        self.tid += 1;
        let mut tid = [0u8; 12];
        tid[4..].copy_from_slice(&self.tid.to_be_bytes());
        let mut buf = vec![0u8; 512];
        let mut w = MsgWriter::new(&mut buf, method, Class::Request, TransactionId(tid));
        body(&mut w);
        if !self.nonce.is_empty() {
            w.add_long_term_credentials(self.username.as_bytes(), REALM, &self.nonce, &self.key);
        }
        w.add_fingerprint();
        let n = w.finish().unwrap_or(0);
        buf.truncate(n);
        buf
    }
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([198, 51, 100, 1], port)),
        listener: ListenerId(0),
        transport: Transport::Udp,
    }
}

fn allocate_body(w: &mut MsgWriter<'_>) {
    w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
}

/// Sends `bytes` from `from`; the engine's answer.
fn send(engine: &mut Engine, pkt: &mut PacketBuf, now: Instant, from: FiveTuple, bytes: &[u8]) -> Action {
    let len = pkt.fill(bytes);
    engine.handle_client(now, from, pkt, len, &mut NoSockets)
}

/// Whether the engine answers `bytes` with a success response.
fn succeeds(engine: &mut Engine, pkt: &mut PacketBuf, now: Instant, from: FiveTuple, bytes: &[u8]) -> bool {
    match send(engine, pkt, now, from, bytes) {
        Action::Reply { len } => StunMsg::parse(engine.reply(len)).is_ok_and(|m| m.class() == Class::Success),
        _ => false,
    }
}

/// The client learns the nonce from a 401.
fn challenge(engine: &mut Engine, pkt: &mut PacketBuf, now: Instant, client: &mut Client) {
    let request = client.request(Method::ALLOCATE, allocate_body);
    if let Action::Reply { len } = send(engine, pkt, now, tuple(1), &request)
        && let Ok(m) = StunMsg::parse(engine.reply(len))
    {
        client.nonce = m.attr(AttrType::NONCE).unwrap_or_default().to_vec();
    }
    assert!(!client.nonce.is_empty(), "the engine challenges an unsigned Allocate");
}

fn allocate(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut engine = engine(t0);
    let mut pkt = PacketBuf::default();
    let mut client = Client::new();
    challenge(&mut engine, &mut pkt, t0, &mut client);
    // Up to a batch of allocations at a time, each from its own client port; the requests are built
    // and the allocations deleted outside the timing.
    const BATCH: u64 = 1000;
    c.bench_function("engine: authenticated Allocate", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                left -= n;
                let requests: Vec<Vec<u8>> = (0..n).map(|_| client.request(Method::ALLOCATE, allocate_body)).collect();
                let start = Instant::now();
                for (i, request) in requests.iter().enumerate() {
                    let _ = black_box(send(&mut engine, &mut pkt, t0, tuple(2000 + i as u16), request));
                }
                spent += start.elapsed();
                assert_eq!(engine.allocation_count() as u64, n, "every Allocate succeeded");
                for i in 0..n {
                    let delete = client.request(Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
                    let _ = send(&mut engine, &mut pkt, t0, tuple(2000 + i as u16), &delete);
                }
                assert_eq!(engine.allocation_count(), 0, "every allocation made was deleted");
                // The timers of deleted allocations are swept, as a shard's wake-up does.
                engine.handle_timeout(t0, &mut NoSockets);
            }
            spent
        });
    });
}

fn channel_data(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut engine = engine(t0);
    let mut pkt = PacketBuf::default();
    let mut client = Client::new();
    challenge(&mut engine, &mut pkt, t0, &mut client);
    let from = tuple(3000);
    let peer: SocketAddr = "8.8.8.8:9000".parse().unwrap_or_else(|_| unreachable!());
    let request = client.request(Method::ALLOCATE, allocate_body);
    assert!(succeeds(&mut engine, &mut pkt, t0, from, &request), "the allocation is made");
    let bind = client.request(Method::CHANNEL_BIND, |w| {
        w.add_bytes(AttrType::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
    });
    assert!(succeeds(&mut engine, &mut pkt, t0, from, &bind), "the channel is bound");
    let mut frame = vec![0x40, 0x00, 0, 172];
    frame.extend_from_slice(&[0xAB; 172]);
    assert!(matches!(send(&mut engine, &mut pkt, t0, from, &frame), Action::ToPeer { .. }), "the channel relays");
    c.bench_function("engine: ChannelData to its peer (172 bytes)", |b| {
        b.iter(|| send(&mut engine, &mut pkt, t0, black_box(from), black_box(&frame)));
    });
}

criterion_group!(benches, allocate, channel_data);
criterion_main!(benches);
