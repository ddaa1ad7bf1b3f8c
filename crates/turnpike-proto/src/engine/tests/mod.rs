//! Engine scenarios (compiled only under #[cfg(test)]) on a fake clock, asserting the actions (RFC 8656 sections named per test).

#![allow(clippy::disallowed_methods)] // the fake clock starts at a real Instant

mod allocate;
mod auth;
mod flow;
mod lifetime;
mod offload;
mod permission;
mod relay;

use super::*;
use crate::allocation::FiveTuple;
use crate::attr::{self, AttrType, FAMILY_IPV6, PROTO_UDP};
use crate::auth::NonceKey;
use crate::error::DropReason;
use crate::policy::PeerPolicy;
use crate::stun::{Class, Method, MsgWriter, StunMsg, TransactionId};

use crate::allocation::{Half, ListenerId, RelayKey, Transport};
use crate::auth::CredentialStore;
use crate::cluster::LocalCluster;
use crate::integrity::{LongTermKey, long_term_key, rest_password};
use crate::policy::IpRange;
use crate::stun::verify_message_integrity;
use std::collections::HashSet;

const REALM: &str = "turn.example.org";
const SECRET: &str = "s3cret";
const UNIX0: u64 = 1_700_000_000;

#[derive(Default)]
struct FakeSockets {
    open: HashSet<RelayKey>,
    busy_ports: HashSet<u16>,
    /// Every open fails with this OS error (out of descriptors, ...).
    failing: Option<i32>,
    /// Whether deleted allocations' sockets are parked (as the shard does) rather than closed.
    parks: bool,
    /// Parked sockets by id: their port.
    parked: std::collections::HashMap<u32, u16>,
    next_parked: u32,
    /// Ports of the open sockets.
    ports: std::collections::HashMap<RelayKey, u16>,
    /// Fresh sockets opened so far.
    opened: usize,
    /// Every unpark fails (the parked socket is closed).
    unpark_fails: bool,
    /// Slots whose offloaded channels the engine ended ([`RelaySockets::offload_ended`]).
    offload_ended: Vec<u32>,
    /// What `offload_ended` reports as relayed outside the engine.
    offloaded: [crate::allocation::Traffic; 2],
}

impl RelaySockets for FakeSockets {
    fn open(&mut self, idx: RelayKey, addr: SocketAddr) -> Result<(), BindError> {
        if let Some(errno) = self.failing {
            return Err(BindError::Failed(errno));
        }
        if self.busy_ports.contains(&addr.port()) {
            return Err(BindError::AddrInUse);
        }
        assert!(self.open.insert(idx), "{idx:?} opened twice");
        self.ports.insert(idx, addr.port());
        self.opened += 1;
        Ok(())
    }
    fn close(&mut self, idx: RelayKey) {
        assert!(self.open.remove(&idx), "{idx:?} closed but not open");
        self.ports.remove(&idx);
    }
    fn park(&mut self, idx: RelayKey) -> Option<u32> {
        if !self.parks {
            self.close(idx);
            return None;
        }
        assert!(self.open.remove(&idx), "{idx:?} parked but not open");
        let id = self.next_parked;
        self.next_parked += 1;
        self.parked.insert(id, self.ports.remove(&idx).unwrap());
        Some(id)
    }
    fn offload_ended(&mut self, slot: u32) -> [crate::allocation::Traffic; 2] {
        self.offload_ended.push(slot);
        self.offloaded
    }
    fn unpark(&mut self, spare: u32, idx: RelayKey) -> Result<(), BindError> {
        let port = self.parked.remove(&spare).expect("unparked a socket that is not parked");
        if self.unpark_fails {
            return Err(BindError::Failed(9));
        }
        assert!(self.open.insert(idx), "{idx:?} opened twice");
        self.ports.insert(idx, port);
        Ok(())
    }
}

fn settings() -> Settings {
    let mut credentials = CredentialStore::new(REALM, b':');
    credentials.add_secret("old-secret");
    credentials.add_secret(SECRET);
    credentials.add_user("alice", "wonderland");
    credentials.add_user("bob", "builder");
    let relay = RelayAddr { bind: "127.0.0.1".parse().unwrap(), advertised: "203.0.113.9".parse().unwrap() };
    Settings {
        max_permissions: 4,
        max_channels: 4,
        user_quota: 2,
        total_quota: 100,
        unauth_rate: 0,
        unauth_burst: 0,
        legacy_channel_numbers: false,
        ..Settings::new(credentials, NonceKey::new([3; 32]), vec![relay], vec![])
    }
}

struct Harness {
    engine: Engine,
    io: FakeSockets,
    pkt: PacketBuf,
    now: Instant,
    cluster: Arc<LocalCluster>,
}

/// The relay ports of a harness unless a test asks for others.
const PORTS: (u16, u16) = (50_000, 50_009);

fn harness_with(s: Settings) -> Harness {
    harness_on(s, PORTS)
}

/// A harness whose engine relays from the ports `min_port..=max_port`.
fn harness_on(s: Settings, (min_port, max_port): (u16, u16)) -> Harness {
    let t0 = Instant::now();
    let relays = s.relay_v4.iter().chain(&s.relay_v6).map(|r| (r.bind, r.advertised));
    let cluster = Arc::new(LocalCluster::new(relays, []));
    let engine = Engine::new(
        0,
        Arc::new(s),
        Arc::clone(&cluster) as Arc<dyn Cluster>,
        Arc::new(EngineCounters::default()),
        min_port..=max_port,
        t0,
        UNIX0,
        &[42; 32],
    );
    Harness { engine, io: FakeSockets::default(), pkt: PacketBuf::default(), now: t0, cluster }
}

fn harness() -> Harness {
    harness_with(settings())
}

/// A harness without quotas over the relay ports `min..=max` (tests with many allocations).
fn harness_unlimited(min: u16, max: u16) -> Harness {
    let mut s = settings();
    s.user_quota = 0;
    s.total_quota = 0;
    harness_on(s, (min, max))
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("198.51.100.7".parse().unwrap(), port),
        listener: ListenerId(0),
        transport: Transport::Udp,
    }
}

const PEER: &str = "8.8.8.8:5000";
const PEER2: &str = "9.9.9.9:6000";

fn peer() -> SocketAddr {
    PEER.parse().unwrap()
}

/// What a client knows: its credentials and the last nonce.
#[derive(Clone)]
struct Client {
    tuple: FiveTuple,
    username: String,
    key: LongTermKey,
    nonce: Vec<u8>,
    next_tid: u8,
}

impl Client {
    fn rest(port: u16, user: &str, expiry: u64) -> Self {
        Self::rest_with_secret(port, user, expiry, SECRET)
    }
    fn rest_with_secret(port: u16, user: &str, expiry: u64, secret: &str) -> Self {
        let username = format!("{expiry}:{user}");
        let password = rest_password(secret.as_bytes(), username.as_bytes());
        let key = long_term_key(username.as_bytes(), REALM.as_bytes(), &password);
        Self { tuple: tuple(port), username, key, nonce: Vec::new(), next_tid: 1 }
    }
    fn static_user(port: u16, user: &str, password: &str) -> Self {
        let key = long_term_key(user.as_bytes(), REALM.as_bytes(), password.as_bytes());
        Self { tuple: tuple(port), username: user.into(), key, nonce: Vec::new(), next_tid: 1 }
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        TransactionId([self.next_tid; 12])
    }

    /// Builds a request; `auth` adds USERNAME/REALM/NONCE/MESSAGE-INTEGRITY.
    fn request(&mut self, method: Method, auth: bool, body: impl FnOnce(&mut MsgWriter<'_>)) -> Vec<u8> {
        let tid = self.tid();
        self.request_with_tid(method, tid, auth, body)
    }

    fn request_with_tid(
        &self,
        method: Method,
        tid: TransactionId,
        auth: bool,
        body: impl FnOnce(&mut MsgWriter<'_>),
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 1024];
        let mut w = MsgWriter::new(&mut buf, method, Class::Request, tid);
        body(&mut w);
        if auth {
            w.add_long_term_credentials(self.username.as_bytes(), REALM.as_bytes(), &self.nonce, &self.key);
        }
        w.add_fingerprint();
        let len = w.finish().unwrap();
        buf.truncate(len);
        buf
    }
}

fn udp_transport(w: &mut MsgWriter<'_>) {
    w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
}

/// A parsed response, owned.
struct Resp {
    bytes: Vec<u8>,
}

impl Resp {
    fn msg(&self) -> StunMsg<'_> {
        StunMsg::parse(&self.bytes).unwrap()
    }
    fn class(&self) -> Class {
        self.msg().class()
    }
    fn code(&self) -> Option<u16> {
        self.msg().attr(AttrType::ERROR_CODE).map(|v| attr::decode_error_code(v).unwrap().0)
    }
    fn attr(&self, t: AttrType) -> Option<Vec<u8>> {
        self.msg().attr(t).map(<[u8]>::to_vec)
    }
    fn xor_addr(&self, t: AttrType) -> SocketAddr {
        let msg = self.msg();
        attr::decode_xor_addr(msg.attr(t).unwrap(), &msg.transaction_id()).unwrap()
    }
    fn lifetime(&self) -> u32 {
        attr::decode_u32(&self.attr(AttrType::LIFETIME).unwrap()).unwrap()
    }
}

impl Harness {
    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.engine.handle_timeout(self.now, &mut self.io);
    }

    fn send(&mut self, from: FiveTuple, bytes: &[u8]) -> Action {
        let len = self.pkt.fill(bytes);
        self.engine.handle_client(self.now, from, &mut self.pkt, len, &mut self.io)
    }

    fn request(&mut self, from: FiveTuple, bytes: &[u8]) -> Resp {
        match self.send(from, bytes) {
            Action::Reply { len } => Resp { bytes: self.engine.reply(len).to_vec() },
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// A datagram from `peer` to the relay socket at `index` of the shard's table.
    fn peer_sends(&mut self, index: usize, peer: SocketAddr, payload: &[u8]) -> Action {
        let len = self.pkt.fill(payload);
        let key = RelayKey::from_index(index).unwrap();
        self.engine.handle_peer(self.now, key, peer, &mut self.pkt, len)
    }

    /// 401 round trip, then an authenticated request: returns the response.
    fn authed(&mut self, c: &mut Client, method: Method, body: impl Fn(&mut MsgWriter<'_>)) -> Resp {
        if c.nonce.is_empty() {
            let req = c.request(method, false, &body);
            let r = self.request(c.tuple, &req);
            assert_eq!(r.code(), Some(401));
            c.nonce = r.attr(AttrType::NONCE).unwrap();
        }
        let req = c.request(method, true, &body);
        let r = self.request(c.tuple, &req);
        if r.code() != Some(438) {
            return r;
        }
        // Like a real client: take the fresh nonce and retry once.
        c.nonce = r.attr(AttrType::NONCE).unwrap();
        let req = c.request(method, true, &body);
        self.request(c.tuple, &req)
    }

    fn allocate(&mut self, c: &mut Client) -> Resp {
        self.authed(c, Method::ALLOCATE, udp_transport)
    }
}

fn peer_attr(addr: SocketAddr) -> impl Fn(&mut MsgWriter<'_>) {
    move |w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, addr)
}

fn channel_bind_attrs(number: u16, addr: SocketAddr) -> impl Fn(&mut MsgWriter<'_>) {
    move |w| {
        w.add_bytes(AttrType::CHANNEL_NUMBER, &[(number >> 8) as u8, number as u8, 0, 0]);
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, addr);
    }
}

fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&number.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn send_indication(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut w = MsgWriter::new(&mut buf, Method::SEND, Class::Indication, TransactionId([9; 12]));
    w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, to);
    w.add_bytes(AttrType::DATA, data);
    let len = w.finish().unwrap();
    buf.truncate(len);
    buf
}

fn read(c: &std::sync::atomic::AtomicU64) -> u64 {
    crate::stats::read(c)
}

fn allocate_even_port(h: &mut Harness, c: &mut Client) -> Resp {
    h.authed(c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    })
}

fn delete(h: &mut Harness, c: &mut Client) {
    let r = h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
}
