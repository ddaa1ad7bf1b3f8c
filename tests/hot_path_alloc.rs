//! The relay hot path performs no heap allocation: ChannelData and Send indications client -> peer, and
//! ChannelData and Data indications peer -> client, counted with a global allocator.

#![allow(clippy::disallowed_methods, unsafe_code)] // a counting allocator needs `unsafe impl GlobalAlloc`

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use turnpike::auth::NonceKey;
use turnpike::proto::allocation::{FiveTuple, ListenerId, Transport};
use turnpike::proto::attr::{AttrType, PROTO_UDP};
use turnpike::proto::engine::{BindError, RelaySockets};
use turnpike::proto::integrity::{long_term_key, rest_password};
use turnpike::proto::{Action, Class, Engine, Method, MsgWriter, PacketBuf, StunMsg, TransactionId};
use turnpike::shared::{ShardStats, Shared};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct NoSockets;

impl RelaySockets for NoSockets {
    fn open(&mut self, _: u32, _: SocketAddr) -> Result<(), BindError> {
        Ok(())
    }
    fn close(&mut self, _: u32) {}
}

fn request(
    key: &[u8],
    username: &str,
    nonce: &[u8],
    method: Method,
    tid: u8,
    body: impl Fn(&mut MsgWriter<'_>),
) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MsgWriter::new(&mut buf, method, Class::Request, TransactionId([tid; 12]));
    body(&mut w);
    if !nonce.is_empty() {
        w.add_bytes(AttrType::USERNAME, username.as_bytes());
        w.add_bytes(AttrType::REALM, b"alloc.test");
        w.add_bytes(AttrType::NONCE, nonce);
        w.add_message_integrity(key);
    }
    let n = w.finish().unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn relaying_allocates_nothing() {
    let yaml = "listen: {ips: [127.0.0.1]}\nrelay: {ips: [127.0.0.1], min_port: 50000, max_port: 50009}\n\
                auth: {realm: alloc.test, shared_secrets: [s]}\nruntime: {threads: 1}\n";
    let cfg = turnpike::config::parse(Path::new("<test>.yaml"), yaml).unwrap();
    let plan = turnpike::server::relay_plan(&cfg).unwrap();
    let settings = Arc::new(turnpike::server::settings(&cfg, plan, NonceKey::new([1; 32])));
    let now = Instant::now();
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut engine = Engine::new(
        0,
        settings,
        Arc::new(Shared::default()),
        Arc::new(ShardStats::default()),
        cfg.shard_port_list(0),
        now,
        unix,
        7,
    );
    let mut io = NoSockets;
    let mut pkt = PacketBuf::default();
    let tuple =
        FiveTuple { client: "198.51.100.1:4000".parse().unwrap(), listener: ListenerId(0), transport: Transport::Udp };
    let peer: SocketAddr = "8.8.8.8:9000".parse().unwrap();
    let other_port: SocketAddr = "8.8.8.8:9001".parse().unwrap();

    let username = format!("{}:u", unix + 3600);
    let password = rest_password(b"s", username.as_bytes());
    let key = long_term_key(username.as_bytes(), b"alloc.test", &password);
    let send = |engine: &mut Engine, pkt: &mut PacketBuf, io: &mut NoSockets, bytes: &[u8]| {
        let n = pkt.fill(bytes);
        engine.handle_client(now, tuple, pkt, n, io)
    };
    let transport = |w: &mut MsgWriter<'_>| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
    let Action::Reply { len } =
        send(&mut engine, &mut pkt, &mut io, &request(&key, &username, b"", Method::ALLOCATE, 1, transport))
    else {
        panic!()
    };
    let nonce = StunMsg::parse(engine.reply(len)).unwrap().attr(AttrType::NONCE).unwrap().to_vec();
    let Action::Reply { .. } =
        send(&mut engine, &mut pkt, &mut io, &request(&key, &username, &nonce, Method::ALLOCATE, 2, transport))
    else {
        panic!()
    };
    let bind = |w: &mut MsgWriter<'_>| {
        w.add_bytes(AttrType::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
    };
    let Action::Reply { len } =
        send(&mut engine, &mut pkt, &mut io, &request(&key, &username, &nonce, Method::CHANNEL_BIND, 3, bind))
    else {
        panic!()
    };
    assert_eq!(StunMsg::parse(engine.reply(len)).unwrap().class(), Class::Success);

    let mut channel_data = vec![0x40, 0x00, 0, 172];
    channel_data.extend_from_slice(&[0xAB; 172]);
    let mut buf = vec![0u8; 512];
    let mut w = MsgWriter::new(&mut buf, Method::SEND, Class::Indication, TransactionId([4; 12]));
    w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, other_port);
    w.add_bytes(AttrType::DATA, &[0xCD; 172]);
    let n = w.finish().unwrap();
    let send_indication = buf[..n].to_vec();
    let payload = [0xEF; 172];

    // Warm up once, then count.
    let _ = send(&mut engine, &mut pkt, &mut io, &channel_data);
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..1000 {
        let n = pkt.fill(&channel_data);
        assert!(matches!(engine.handle_client(now, tuple, &mut pkt, n, &mut io), Action::ToPeer { .. }));
        let n = pkt.fill(&send_indication);
        assert!(matches!(engine.handle_client(now, tuple, &mut pkt, n, &mut io), Action::ToPeer { .. }));
        let n = pkt.fill(&payload);
        assert!(matches!(engine.handle_peer(now, 0, peer, &mut pkt, n), Action::ToClient { .. }));
        let n = pkt.fill(&payload);
        assert!(matches!(engine.handle_peer(now, 0, other_port, &mut pkt, n), Action::ToClient { .. }));
        engine.handle_timeout(now + Duration::from_millis(10), &mut io);
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0, "heap allocations on the relay path");
}
