//! Engine scenarios (compiled only under #[cfg(test)]) on a fake clock, asserting the actions (RFC 8656 sections named per test).

#![allow(clippy::disallowed_methods)] // the fake clock starts at a real Instant

use super::*;

mod cluster;

use crate::allocation::{ListenerId, Transport};
use crate::auth::CredentialStore;
use crate::integrity::{LongTermKey, long_term_key, rest_password, verify_message_integrity};
use crate::policy::IpRange;
use cluster::TestCluster;
use std::collections::HashSet;

const REALM: &str = "turn.example.org";
const SECRET: &str = "s3cret";
const UNIX0: u64 = 1_700_000_000;

#[derive(Default)]
struct FakeSockets {
    open: HashSet<u32>,
    busy_ports: HashSet<u16>,
    /// Every open fails with this OS error (out of descriptors, ...).
    failing: Option<i32>,
    /// Whether deleted allocations' sockets are parked (as the shard does) rather than closed.
    parks: bool,
    /// Parked sockets by id: their port.
    parked: std::collections::HashMap<u32, u16>,
    next_parked: u32,
    /// Ports of the open sockets, by slot.
    ports: std::collections::HashMap<u32, u16>,
    /// Fresh sockets opened so far.
    opened: usize,
    /// Every unpark fails (the parked socket is closed).
    unpark_fails: bool,
}

impl RelaySockets for FakeSockets {
    fn open(&mut self, idx: u32, addr: SocketAddr) -> Result<(), BindError> {
        if let Some(errno) = self.failing {
            return Err(BindError::Failed(errno));
        }
        if self.busy_ports.contains(&addr.port()) {
            return Err(BindError::AddrInUse);
        }
        assert!(self.open.insert(idx), "slot {idx} opened twice");
        self.ports.insert(idx, addr.port());
        self.opened += 1;
        Ok(())
    }
    fn close(&mut self, idx: u32) {
        assert!(self.open.remove(&idx), "slot {idx} closed but not open");
        self.ports.remove(&idx);
    }
    fn park(&mut self, idx: u32) -> Option<u32> {
        if !self.parks {
            self.close(idx);
            return None;
        }
        assert!(self.open.remove(&idx), "slot {idx} parked but not open");
        let id = self.next_parked;
        self.next_parked += 1;
        self.parked.insert(id, self.ports.remove(&idx).unwrap());
        Some(id)
    }
    fn unpark(&mut self, spare: u32, idx: u32) -> Result<(), BindError> {
        let port = self.parked.remove(&spare).expect("unparked a socket that is not parked");
        if self.unpark_fails {
            return Err(BindError::Failed(9));
        }
        assert!(self.open.insert(idx), "slot {idx} opened twice");
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
        credentials,
        nonce_key: NonceKey::new([3; 32]),
        nonce_lifetime: Duration::from_secs(600),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        max_permissions: 4,
        max_channels: 4,
        peer_policy: PeerPolicy::new(vec![], vec![], true, false),
        user_quota: 2,
        total_quota: 100,
        max_bps: 0,
        shard_total_bps: 0,
        unauth_rate: 0,
        unauth_burst: 0,
        software: None,
        reason_phrases: false,
        legacy_channel_numbers: false,
        relay_v4: vec![relay],
        relay_v6: vec![],
        user_reservations: 2,
    }
}

struct Harness {
    engine: Engine,
    io: FakeSockets,
    pkt: PacketBuf,
    now: Instant,
    cluster: Arc<TestCluster>,
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
    let cluster = Arc::new(TestCluster::new(relays, []));
    let engine = Engine::new(
        0,
        Arc::new(s),
        Arc::clone(&cluster) as Arc<dyn Cluster>,
        Arc::new(ShardStats::default()),
        min_port..=max_port,
        t0,
        UNIX0,
        42,
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

    fn peer_sends(&mut self, idx: u32, peer: SocketAddr, payload: &[u8]) -> Action {
        let len = self.pkt.fill(payload);
        self.engine.handle_peer(self.now, idx, peer, &mut self.pkt, len)
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

/// RFC 8656 §7-§12: 401 -> Allocate -> CreatePermission -> ChannelBind -> data both ways -> Refresh(0).
#[test]
fn full_flow_over_rest_credentials() {
    let mut h = harness();
    let mut c = Client::rest(40000, "@alice:example.org", UNIX0 + 3600);

    // Unauthenticated: 401 with REALM and NONCE and no MESSAGE-INTEGRITY.
    let req = c.request(Method::ALLOCATE, false, udp_transport);
    let r = h.request(c.tuple, &req);
    assert_eq!((r.class(), r.code()), (Class::Error, Some(401)));
    assert_eq!(r.attr(AttrType::REALM).unwrap(), REALM.as_bytes());
    assert!(r.attr(AttrType::MESSAGE_INTEGRITY).is_none());
    assert!(r.attr(AttrType::ERROR_CODE).unwrap().len() == 4, "no reason phrase by default");
    c.nonce = r.attr(AttrType::NONCE).unwrap();

    let r = h.allocate(&mut c);
    assert_eq!(r.class(), Class::Success);
    assert!(verify_message_integrity(&r.msg(), &c.key));
    let relayed = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.ip(), "203.0.113.9".parse::<IpAddr>().unwrap(), "advertises the external address");
    assert!((50_000..50_010).contains(&relayed.port()));
    assert_eq!(r.xor_addr(AttrType::XOR_MAPPED_ADDRESS), c.tuple.client);
    assert_eq!(r.lifetime(), 600);
    assert_eq!(h.io.open.len(), 1);

    // No permission yet: peer data is dropped silently.
    assert_eq!(h.peer_sends(0, peer(), b"early"), Action::Drop(DropReason::NoPermission));

    let r = h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(peer()));
    assert_eq!(r.class(), Class::Success);
    assert!(verify_message_integrity(&r.msg(), &c.key));

    let r = h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, peer()));
    assert_eq!(r.class(), Class::Success);

    // Client -> peer over the channel: the payload is forwarded in place.
    let action = h.send(c.tuple, &channel_data(0x4001, b"hello peer"));
    let Action::ToPeer { idx, peer: to, range } = action else { panic!("{action:?}") };
    assert_eq!((idx, to), (0, peer()));
    assert_eq!(h.pkt.get(range), b"hello peer");

    // Peer -> client: a ChannelData header is written in front of the payload.
    let action = h.peer_sends(0, peer(), b"hi client");
    let Action::ToClient { tuple: t, range } = action else { panic!("{action:?}") };
    assert_eq!(t, c.tuple);
    assert_eq!(h.pkt.get(range), &channel_data(0x4001, b"hi client")[..]);

    // Another port of the same permitted IP has no channel: Data indication.
    let other_port: SocketAddr = "8.8.8.8:5001".parse().unwrap();
    let action = h.peer_sends(0, other_port, b"via indication");
    let Action::ToClient { range, .. } = action else { panic!("{action:?}") };
    let bytes = h.pkt.get(range).to_vec();
    let msg = StunMsg::parse(&bytes).unwrap();
    assert_eq!((msg.class(), msg.method()), (Class::Indication, Method::DATA));
    assert_eq!(msg.attr(AttrType::DATA), Some(&b"via indication"[..]));
    assert_eq!(
        attr::decode_xor_addr(msg.attr(AttrType::XOR_PEER_ADDRESS).unwrap(), &msg.transaction_id()).unwrap(),
        other_port
    );

    // Send indication client -> peer.
    let mut buf = [0u8; 128];
    let mut w = MsgWriter::new(&mut buf, Method::SEND, Class::Indication, TransactionId([9; 12]));
    w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, other_port);
    w.add_bytes(AttrType::DATA, b"sent");
    let len = w.finish().unwrap();
    let action = h.send(c.tuple, &buf[..len]);
    let Action::ToPeer { peer: to, range, .. } = action else { panic!("{action:?}") };
    assert_eq!(to, other_port);
    assert_eq!(h.pkt.get(range), b"sent");

    // Refresh(0) deletes the allocation, closes the socket and frees the quota.
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.lifetime(), 0);
    assert!(h.io.open.is_empty());
    assert_eq!(h.cluster.total(), 0);
    assert_eq!(h.send(c.tuple, &channel_data(0x4001, b"late")), Action::Drop(DropReason::NoAllocation));
}

/// RFC 8656 §7.2 (2): a second Allocate on the same 5-tuple gets 437.
#[test]
fn second_allocate_is_437() {
    let mut h = harness();
    let mut c = Client::rest(40001, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let r = h.allocate(&mut c);
    assert_eq!(r.code(), Some(437));
    assert!(verify_message_integrity(&r.msg(), &c.key), "authenticated errors carry MESSAGE-INTEGRITY");
}

/// RFC 8656 §7.2: a retransmitted Allocate gets the very same success response.
#[test]
fn retransmitted_allocate_gets_the_same_answer() {
    let mut h = harness();
    let mut c = Client::rest(40002, "u", UNIX0 + 3600);
    let r = h.request(c.tuple, &c.request(Method::ALLOCATE, false, udp_transport));
    c.nonce = r.attr(AttrType::NONCE).unwrap();
    let req = c.request(Method::ALLOCATE, true, udp_transport);
    let first = h.request(c.tuple, &req);
    h.advance(1);
    let second = h.request(c.tuple, &req);
    assert_eq!(first.class(), Class::Success);
    assert_eq!(first.bytes, second.bytes);
    assert_eq!(h.io.open.len(), 1);
}

/// RFC 8489 §9.2.4: an expired nonce gets 438 with a fresh one, which then works.
#[test]
fn stale_nonce_is_438() {
    let mut h = harness();
    let mut c = Client::rest(40003, "u", UNIX0 + 7200);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_u32(AttrType::LIFETIME, 3600);
    });
    assert_eq!(r.class(), Class::Success);
    h.advance(601);
    let req = c.request(Method::REFRESH, true, |w| w.add_u32(AttrType::LIFETIME, 600));
    let r = h.request(c.tuple, &req);
    assert_eq!(r.code(), Some(438));
    assert!(r.attr(AttrType::REALM).is_some());
    c.nonce = r.attr(AttrType::NONCE).unwrap();
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 600));
    assert_eq!(r.class(), Class::Success);
}

/// RFC 8656 §7: allocations expire at their lifetime; permissions at 300 s; channels at 600 s.
#[test]
fn expiry_at_lifetime() {
    let mut h = harness();
    let mut c = Client::rest(40004, "u", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).lifetime(), 600);
    let r = h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer()));
    assert_eq!(r.class(), Class::Success);
    h.advance(299);
    assert!(matches!(h.peer_sends(0, peer(), b"x"), Action::ToClient { .. }));
    h.advance(2);
    assert_eq!(h.peer_sends(0, peer(), b"x"), Action::Drop(DropReason::NoPermission), "permission expired at 300 s");
    h.advance(298);
    assert_eq!(h.engine.table().len(), 1, "still alive at 599 s");
    h.advance(2);
    assert_eq!(h.engine.table().len(), 0, "gone at lifetime + 1 s");
    assert!(h.io.open.is_empty());
    assert_eq!(h.cluster.total(), 0);
    assert!(h.engine.poll_timeout().is_some() || h.engine.wheel.is_empty());
}

/// RFC 8656 §8: Refresh extends the lifetime; requests below the default get the default; above the
/// maximum get the maximum.
#[test]
fn refresh_lifetimes() {
    let mut h = harness();
    let mut c = Client::rest(40005, "u", UNIX0 + 99_999);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_u32(AttrType::LIFETIME, 100_000);
    });
    assert_eq!(r.lifetime(), 3600);
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 30));
    assert_eq!(r.lifetime(), 600);
    h.advance(599);
    let r = h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 1200));
    assert_eq!(r.lifetime(), 1200);
    h.advance(1100);
    assert_eq!(h.engine.table().len(), 1, "refresh moved the expiry");
    h.advance(101);
    assert_eq!(h.engine.table().len(), 0);
}

#[test]
fn dont_fragment_is_refused_as_unknown_420() {
    let mut h = harness();
    let mut c = Client::rest(40006, "u", UNIX0 + 3600);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::DONT_FRAGMENT, &[]);
        w.add_bytes(AttrType(0x7777), &[1, 2, 3]);
    });
    assert_eq!(r.code(), Some(420));
    assert_eq!(r.attr(AttrType::UNKNOWN_ATTRIBUTES).unwrap(), vec![0x00, 0x1A, 0x77, 0x77]);
    assert!(verify_message_integrity(&r.msg(), &c.key));
}

#[test]
fn transport_and_family_errors() {
    let mut h = harness();
    let mut c = Client::rest(40007, "u", UNIX0 + 3600);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[6, 0, 0, 0]));
    assert_eq!(r.code(), Some(442));
    let r = h.authed(&mut c, Method::ALLOCATE, |_| {});
    assert_eq!(r.code(), Some(400), "missing REQUESTED-TRANSPORT");
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]);
    });
    assert_eq!(r.code(), Some(440), "no IPv6 relay configured");
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0]);
    });
    assert_eq!(r.code(), Some(440));
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0]);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &[1; 8]);
    });
    assert_eq!(r.code(), Some(400));
    assert_eq!(h.engine.table().len(), 0);
    assert_eq!(h.cluster.total(), 0);
}

#[test]
fn peer_policy_403_and_family_443() {
    let mut h = harness();
    let mut c = Client::rest(40008, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    for denied in ["127.0.0.1:80", "10.0.0.1:80", "169.254.169.254:80", "0.0.0.0:80", "224.0.0.1:80"] {
        let r = h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr(denied.parse().unwrap()));
        assert_eq!(r.code(), Some(403), "{denied}");
        let r = h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, denied.parse().unwrap()));
        assert_eq!(r.code(), Some(403), "{denied}");
    }
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, peer_attr("[::ffff:127.0.0.1]:80".parse().unwrap()));
    assert_eq!(r.code(), Some(443), "an IPv6 spelling on an IPv4 allocation is a family mismatch");
    // All-or-nothing: one bad peer in the list installs none.
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |w| {
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer());
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, "10.1.1.1:1".parse().unwrap());
    });
    assert_eq!(r.code(), Some(403));
    assert_eq!(h.peer_sends(0, peer(), b"x"), Action::Drop(DropReason::NoPermission));
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

/// The policy denies the relay's own addresses (203.0.113.9 advertised, 127.0.0.1 bound), but the
/// relayed addresses of live allocations stay reachable (client -> TURN -> TURN -> client): only
/// those, not another port of the relay range where another program may listen, and not once the
/// allocation is gone; in both directions.
#[test]
fn own_relay_exception_reaches_only_live_relayed_addresses() {
    let mut h = harness();
    let mut a = Client::rest(40090, "a", UNIX0 + 3600);
    let mut b = Client::rest(40091, "b", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a).class(), Class::Success);
    let relayed_b = h.allocate(&mut b).xor_addr(AttrType::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed_b.ip(), "203.0.113.9".parse::<IpAddr>().unwrap());
    let bound_b = SocketAddr::new("127.0.0.1".parse().unwrap(), relayed_b.port());
    let busy: Vec<u16> = h.io.ports.values().copied().collect();
    let idle_port = (PORTS.0..=PORTS.1).find(|p| !busy.contains(p)).unwrap();
    for not_live in [SocketAddr::new(relayed_b.ip(), idle_port), SocketAddr::new(bound_b.ip(), idle_port)] {
        let r = h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(not_live));
        assert_eq!(r.code(), Some(403), "{not_live} is in the relay range but no allocation's");
        let r = h.authed(&mut a, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, not_live));
        assert_eq!(r.code(), Some(403), "{not_live}");
    }
    for live in [relayed_b, bound_b] {
        let r = h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(live));
        assert_eq!(r.class(), Class::Success, "{live} is a live relayed address");
    }
    // The permission is for the IP; the data path still lets only the live relayed address through.
    let to_b = h.send(a.tuple, &send_indication(relayed_b, b"to b"));
    assert!(matches!(to_b, Action::ToPeer { peer, .. } if peer == relayed_b), "{to_b:?}");
    let elsewhere = SocketAddr::new(relayed_b.ip(), idle_port);
    assert_eq!(h.send(a.tuple, &send_indication(elsewhere, b"x")), Action::Drop(DropReason::NoPermission));
    assert!(matches!(h.peer_sends(0, bound_b, b"from b"), Action::ToClient { .. }));
    assert_eq!(h.peer_sends(0, SocketAddr::new(bound_b.ip(), idle_port), b"x"), Action::Drop(DropReason::NoPermission));
    // Once b's allocation is deleted its address is closed too.
    let r = h.authed(&mut b, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.send(a.tuple, &send_indication(relayed_b, b"x")), Action::Drop(DropReason::NoPermission));
    assert_eq!(h.peer_sends(0, bound_b, b"x"), Action::Drop(DropReason::NoPermission));
    let r = h.authed(&mut a, Method::CHANNEL_BIND, channel_bind_attrs(0x4002, relayed_b));
    assert_eq!(r.code(), Some(403));
}

#[test]
fn several_peers_in_one_create_permission_and_the_cap() {
    let mut h = harness();
    let mut c = Client::rest(40009, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |w| {
        for i in 1..=3u8 {
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, SocketAddr::new(IpAddr::from([8, 8, 4, i]), 1));
        }
    });
    assert_eq!(r.class(), Class::Success);
    for i in 1..=3u8 {
        assert!(matches!(
            h.peer_sends(0, SocketAddr::new(IpAddr::from([8, 8, 4, i]), 9), b"x"),
            Action::ToClient { .. }
        ));
    }
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |w| {
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, "8.8.4.4:1".parse().unwrap());
        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, "8.8.4.5:1".parse().unwrap());
    });
    assert_eq!(r.code(), Some(508), "max_permissions = 4");
    let r = h.authed(&mut c, Method::CREATE_PERMISSION, |_| {});
    assert_eq!(r.code(), Some(400), "no XOR-PEER-ADDRESS");
}

#[test]
fn credentials_rest_static_expired_rotated_and_wrong() {
    let mut h = harness();
    // The older of two configured secrets still works (rotation).
    let mut c = Client::rest_with_secret(40010, "u1", UNIX0 + 3600, "old-secret");
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    // Colons inside the user part are fine.
    let mut c = Client::rest(40011, "@bob:matrix.org:extra", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let mut c = Client::static_user(40012, "alice", "wonderland");
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    // Expired REST username.
    let mut c = Client::rest(40013, "u", UNIX0 - 1);
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    // Wrong secret, wrong password, unknown user.
    let mut c = Client::rest_with_secret(40014, "u", UNIX0 + 3600, "nope");
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    let mut c = Client::static_user(40015, "alice", "wrong");
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    let mut c = Client::static_user(40016, "mallory", "x");
    assert_eq!(h.allocate(&mut c).code(), Some(401));
    assert_eq!(h.engine.table().len(), 3);
    assert_eq!(read(&h.engine.stats.auth_failures), 4);
}

fn read(c: &std::sync::atomic::AtomicU64) -> u64 {
    crate::stats::read(c)
}

#[test]
fn missing_realm_or_nonce_with_integrity_is_400() {
    let mut h = harness();
    let c = Client::static_user(40017, "alice", "wonderland");
    let req = c.request_with_tid(Method::ALLOCATE, TransactionId([5; 12]), false, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::USERNAME, b"alice");
        w.add_message_integrity(&c.key);
    });
    assert_eq!(h.request(c.tuple, &req).code(), Some(400));
}

/// RFC 8656 §5: a request on an allocation with another user's credentials is 441.
#[test]
fn other_users_credentials_are_441() {
    let mut h = harness();
    let mut alice = Client::static_user(40018, "alice", "wonderland");
    assert_eq!(h.allocate(&mut alice).class(), Class::Success);
    let mut bob = Client::static_user(40018, "bob", "builder");
    let r = h.authed(&mut bob, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.code(), Some(441));
    assert_eq!(h.engine.table().len(), 1);
}

/// RFC 8656 §11.2: channel numbers 0x4000-0x4FFF; no rebinding a number or a peer to something else,
/// also during the 5-minute cool-down after expiry; refreshing the same pair is fine.
#[test]
fn channel_bind_rules() {
    let mut h = harness();
    let mut c = Client::rest(40019, "u", UNIX0 + 99_999);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    let p2: SocketAddr = PEER2.parse().unwrap();
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x3FFF, peer())).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x5000, peer())).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, p2)).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, peer())).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, p2)).class(), Class::Success);
    // Keep the allocation alive, let the channels lapse.
    h.advance(590);
    assert_eq!(h.authed(&mut c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 3600)).class(), Class::Success);
    h.advance(20);
    assert_eq!(h.send(c.tuple, &channel_data(0x4000, b"x")), Action::Drop(DropReason::NoChannel));
    // Cooling down: the number cannot move to another peer yet, but the same pair can be re-bound.
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, p2)).code(), Some(400));
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4001, p2)).class(), Class::Success);
    h.advance(301);
    assert_eq!(
        h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, "8.8.4.4:1".parse().unwrap())).class(),
        Class::Success
    );
}

#[test]
fn channel_data_edge_cases() {
    let mut h = harness();
    let mut c = Client::rest(40020, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.send(c.tuple, &channel_data(0x4000, b"x")), Action::Drop(DropReason::NoChannel));
    let mut short = channel_data(0x4000, b"abcd");
    short.truncate(6);
    assert_eq!(h.send(c.tuple, &short), Action::Drop(DropReason::Malformed));
    assert_eq!(h.send(c.tuple, &[0x40]), Action::Drop(DropReason::Malformed));
    assert_eq!(h.send(c.tuple, &channel_data(0x7000, b"x")), Action::Drop(DropReason::NoChannel));
    // Padding after the data is allowed over UDP.
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    let mut padded = channel_data(0x4000, b"abc");
    padded.push(0);
    let Action::ToPeer { range, .. } = h.send(c.tuple, &padded) else { panic!() };
    assert_eq!(h.pkt.get(range), b"abc");
}

#[test]
fn user_quota_is_486_at_exactly_the_limit() {
    let mut h = harness();
    for port in [40021, 40022] {
        let mut c = Client::rest(port, "@q:example.org", UNIX0 + 3600 + u64::from(port));
        assert_eq!(h.allocate(&mut c).class(), Class::Success);
    }
    let mut c = Client::rest(40023, "@q:example.org", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).code(), Some(486), "the user part, not the whole username, is counted");
    let mut other = Client::rest(40024, "@r:example.org", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut other).class(), Class::Success);
    let mut first = Client::rest(40021, "@q:example.org", UNIX0 + 3600 + 40021);
    let r = h.authed(&mut first, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.allocate(&mut c).class(), Class::Success, "freed by the delete");
}

#[test]
fn ports_exhausted_is_508_and_busy_ports_are_skipped() {
    let mut s = settings();
    s.user_quota = 0;
    let mut h = harness_with(s);
    h.io.busy_ports.extend([50_000, 50_001, 50_002]);
    let mut granted = HashSet::new();
    for i in 0..7u16 {
        let mut c = Client::rest(41000 + i, "u", UNIX0 + 3600);
        let r = h.allocate(&mut c);
        assert_eq!(r.class(), Class::Success);
        let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
        assert!(!h.io.busy_ports.contains(&port));
        assert!(granted.insert(port));
    }
    let mut c = Client::rest(41100, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).code(), Some(508));
    assert_eq!(h.cluster.total(), 7, "a refused allocation holds no quota");
    assert_eq!(read(&h.engine.stats.capacity_refusals), 1);
}

/// A relay socket that cannot be opened (out of descriptors) refuses the Allocate with 508 and loses
/// no port: once sockets open again, the whole range is there.
#[test]
fn socket_failure_is_508_and_keeps_the_port() {
    let mut h = harness();
    h.io.failing = Some(24);
    let mut c = Client::rest(41000, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).code(), Some(508));
    assert_eq!(h.allocate(&mut c).code(), Some(508));
    assert_eq!(read(&h.engine.stats.capacity_refusals), 2);
    assert_eq!(h.cluster.total(), 0);
    assert_eq!(h.engine.free_ports(), 10);
    h.io.failing = None;
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
}

/// Ports held by other programs (a relay range overlapping the ephemeral range) must not gather in one
/// run of the free list: each Allocate tries a bounded number of ports, so a run of busy ports longer
/// than that would refuse allocations while most of the range is free.
#[test]
fn busy_ports_do_not_gather_into_a_run_that_refuses_allocations() {
    let mut h = harness_unlimited(50_000, 50_199);
    // Every fourth port is in use elsewhere: 50 of 200. A round of 60 Allocates meets about 20 of them,
    // more than one Allocate tries, and with all 200 ports cycling every round meets each of them.
    h.io.busy_ports.extend((50_000..=50_199).filter(|p| p % 4 == 0));
    for round in 0..12u16 {
        let mut clients: Vec<Client> =
            (0..60u16).map(|i| Client::rest(41000 + i, "u", UNIX0 + 3600 + u64::from(round))).collect();
        for c in &mut clients {
            let r = h.allocate(c);
            assert_eq!(r.class(), Class::Success, "round {round}, port {}: {:?}", c.tuple.client.port(), r.code());
            assert!(!h.io.busy_ports.contains(&r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port()));
        }
        for c in &mut clients {
            let r = h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0));
            assert_eq!(r.class(), Class::Success);
        }
    }
}

/// Deleted allocations leave their timer entries behind (lazily dropped); a client creating and
/// deleting allocations in a loop must not grow the timer wheel by its whole churn.
#[test]
fn churned_allocations_leave_a_bounded_number_of_timer_entries() {
    let mut h = harness_unlimited(50_000, 51_999);
    let rounds = 2 * crate::timer::SWEEP_SLACK / 1000 + 2;
    for round in 0..rounds as u64 {
        let mut clients: Vec<Client> =
            (0..1000u16).map(|i| Client::rest(20_000 + i, "churn", UNIX0 + 3600 + round)).collect();
        for c in &mut clients {
            assert_eq!(h.allocate(c).class(), Class::Success);
            assert_eq!(h.authed(c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
        }
        for c in &mut clients {
            assert_eq!(h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0)).class(), Class::Success);
        }
        h.engine.handle_timeout(h.now, &mut h.io);
    }
    // Each round armed 3,000 entries (allocation, permission, channel) that all went stale.
    assert!(
        h.engine.pending_timers() <= 2 * crate::timer::SWEEP_SLACK,
        "{} timer entries pending after {rounds} rounds with nothing live",
        h.engine.pending_timers()
    );
    // The sweep kept what is live: a new allocation still expires on time.
    let mut c = Client::rest(40_000, "late", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    h.now += Duration::from_secs(601);
    h.engine.handle_timeout(h.now, &mut h.io);
    assert!(h.io.open.is_empty(), "expired allocation's socket closed");
}

/// Allocations expiring together are freed a budget at a time, so the shard goes back to its sockets
/// in between; none is forgotten.
#[test]
fn mass_expiry_is_spread_over_calls() {
    let mut h = harness_unlimited(50_000, 50_999);
    let n = 3 * TIMER_BUDGET + 10;
    for i in 0..n as u16 {
        let mut c = Client::rest(20_000 + i, "many", UNIX0 + 3600);
        assert_eq!(h.allocate(&mut c).class(), Class::Success);
    }
    h.now += Duration::from_secs(601);
    let mut calls = 0;
    while !h.io.open.is_empty() {
        assert!(h.engine.poll_timeout().is_some_and(|t| t <= h.now), "work waiting must not wait for a deadline");
        let before = h.io.open.len();
        h.engine.handle_timeout(h.now, &mut h.io);
        assert!(before - h.io.open.len() <= TIMER_BUDGET);
        calls += 1;
        assert!(calls <= 4, "{} allocations left after {calls} calls", h.io.open.len());
    }
    assert_eq!(calls, 4);
    assert_eq!(h.engine.table().len(), 0);
    assert!(h.engine.poll_timeout().is_none_or(|t| t > h.now), "nothing left to do now");
}

/// REST expiries are judged by the wall clock the shard last reported, not the one at start: a clock
/// stepped forward (NTP after boot, a resumed VM) expires credentials, one stepped back revives them.
#[test]
fn rest_expiry_follows_a_stepped_wall_clock() {
    let mut h = harness();
    let mut soon = Client::rest(40050, "u", UNIX0 + 100);
    assert_eq!(h.allocate(&mut soon).class(), Class::Success);
    h.now += Duration::from_secs(1);
    h.engine.set_wall_clock(h.now, UNIX0 + 3600);
    let mut c = Client::rest(40051, "u", UNIX0 + 100);
    assert_eq!(h.allocate(&mut c).code(), Some(401), "expired by the new wall clock");
    let mut c = Client::rest(40052, "u", UNIX0 + 7200);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    h.engine.set_wall_clock(h.now, UNIX0 + 50);
    let mut c = Client::rest(40053, "v", UNIX0 + 100);
    assert_eq!(h.allocate(&mut c).class(), Class::Success, "valid again by the clock stepped back");
    // Between reports, unix time advances with the monotonic clock.
    h.now += Duration::from_secs(60);
    let mut c = Client::rest(40054, "v", UNIX0 + 100);
    assert_eq!(h.allocate(&mut c).code(), Some(401), "50 + 60 s is past the expiry");
}

/// RFC 8656 §7.2: EVEN-PORT with R reserves the next port; RESERVATION-TOKEN claims it.
#[test]
fn even_port_and_reservation_token() {
    let mut h = harness();
    let mut a = Client::rest(40030, "u", UNIX0 + 3600);
    let r = h.authed(&mut a, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.class(), Class::Success);
    let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
    assert_eq!(port % 2, 0);
    let token = r.attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut b = Client::rest(40031, "v", UNIX0 + 3600);
    let r = h.authed(&mut b, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port(), port + 1);
    let mut c = Client::rest(40032, "w", UNIX0 + 3600);
    let r = h.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.code(), Some(508), "a token works once");
}

#[test]
fn binding_unknown_methods_and_junk() {
    let mut h = harness();
    let c = Client::rest(40040, "u", UNIX0 + 3600);
    let req = c.request_with_tid(Method::BINDING, TransactionId([1; 12]), false, |_| {});
    let r = h.request(c.tuple, &req);
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.xor_addr(AttrType::XOR_MAPPED_ADDRESS), c.tuple.client);
    assert!(r.msg().has_fingerprint());
    let req = c.request_with_tid(Method(0x0FF), TransactionId([2; 12]), false, |_| {});
    assert_eq!(h.request(c.tuple, &req).code(), Some(400));
    assert_eq!(h.send(c.tuple, b""), Action::Drop(DropReason::Malformed));
    assert_eq!(h.send(c.tuple, &[0xFF; 40]), Action::Drop(DropReason::Malformed));
    // A success response from a client is unexpected.
    let mut buf = [0u8; 64];
    let len = MsgWriter::new(&mut buf, Method::BINDING, Class::Success, TransactionId([3; 12])).finish().unwrap();
    assert_eq!(h.send(c.tuple, &buf[..len]), Action::Drop(DropReason::Unexpected));
}

#[test]
fn software_and_reason_phrases_when_configured() {
    let mut s = settings();
    s.software = Some("turnpike test".into());
    s.reason_phrases = true;
    let mut h = harness_with(s);
    let c = Client::rest(40050, "u", UNIX0 + 3600);
    let r = h.request(c.tuple, &c.request_with_tid(Method::ALLOCATE, TransactionId([1; 12]), false, udp_transport));
    assert_eq!(r.attr(AttrType::SOFTWARE).unwrap(), b"turnpike test");
    assert_eq!(&r.attr(AttrType::ERROR_CODE).unwrap()[4..], b"Unauthorized");
}

#[test]
fn fuzzed_sequences_never_panic_and_keep_invariants() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    runner
        .run(
            &proptest::collection::vec((0u8..6, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..80),
            |ops| {
                let mut h = harness();
                let mut c = Client::rest(40060, "u", UNIX0 + 99_999);
                for (op, n, bytes) in ops {
                    match op {
                        0 => {
                            let _ = h.allocate(&mut c);
                        }
                        1 => {
                            let _ =
                                h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000 + (n % 8), peer()));
                        }
                        2 => {
                            let _ = h.send(c.tuple, &bytes);
                        }
                        3 => {
                            let _ = h.peer_sends(u32::from(n % 4), peer(), &bytes);
                        }
                        4 => h.advance(u64::from(n % 700)),
                        _ => {
                            let _ = h.authed(&mut c, Method::REFRESH, |w| {
                                w.add_u32(AttrType::LIFETIME, u32::from(n % 2) * 600)
                            });
                        }
                    }
                    if c.nonce.is_empty() {
                        continue;
                    }
                    prop_assert_eq!(h.io.open.len(), h.engine.table().len());
                    prop_assert_eq!(h.cluster.total() as usize, h.engine.table().len());
                }
                Ok(())
            },
        )
        .unwrap();
}

/// A reservation made on one shard can be claimed on another (the kernel steers 5-tuples, not tokens),
/// and an unclaimed one lapses back into the reserving shard's pool after 30 s.
#[test]
fn reservation_tokens_work_across_shards_and_lapse() {
    let mut a = harness();
    let mut b = harness();
    let shared = Arc::clone(&a.cluster);
    b.engine.cluster = Arc::clone(&shared) as Arc<dyn Cluster>;
    let mut c = Client::rest(40070, "u", UNIX0 + 3600);
    let r = a.authed(&mut c, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
    let token = r.attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut d = Client::rest(40071, "v", UNIX0 + 3600);
    let r = b.authed(&mut d, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port(), port + 1);

    let free_before = a.engine.free_ports();
    let r = a.authed(&mut c.clone(), Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.code(), Some(437), "same 5-tuple");
    let mut e = Client::rest(40072, "w", UNIX0 + 3600);
    let r = a.authed(&mut e, Method::ALLOCATE, |w| {
        udp_transport(w);
        w.add_bytes(AttrType::EVEN_PORT, &[0x80]);
    });
    assert!(r.attr(AttrType::RESERVATION_TOKEN).is_some());
    assert_eq!(a.engine.free_ports(), free_before - 2);
    a.advance(31);
    assert_eq!(a.engine.free_ports(), free_before - 1, "the unclaimed reserved port came back");
    assert_eq!(shared.reservations(), 0);
}

/// RFC 5766 clients (coturn's turnutils among them) bind numbers up to 0x7FFF; accepted unless strict.
#[test]
fn legacy_channel_numbers_when_enabled() {
    let mut s = settings();
    s.legacy_channel_numbers = true;
    let mut h = harness_with(s);
    let mut c = Client::rest(40080, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x7FFF, peer())).class(), Class::Success);
    assert_eq!(
        h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x8000, PEER2.parse().unwrap())).code(),
        Some(400)
    );
    let Action::ToPeer { range, .. } = h.send(c.tuple, &channel_data(0x7FFF, b"old")) else { panic!() };
    assert_eq!(h.pkt.get(range), b"old");
}

/// `max-bps`: each direction has its own bucket; excess is dropped and counted.
#[test]
fn max_bps_drops_excess_in_both_directions() {
    let mut s = settings();
    s.max_bps = 16 * 1024;
    let mut h = harness_with(s);
    let mut c = Client::rest(40090, "u", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.authed(&mut c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    let frame = channel_data(0x4000, &[0u8; 1000]);
    let sent_ok = (0..40).filter(|_| matches!(h.send(c.tuple, &frame), Action::ToPeer { .. })).count();
    assert_eq!(sent_ok, 16, "a 16 KiB burst of 1000-byte packets");
    let back_ok = (0..40).filter(|_| matches!(h.peer_sends(0, peer(), &[0u8; 1000]), Action::ToClient { .. })).count();
    assert_eq!(back_ok, 16, "the other direction has its own bucket");
    assert_eq!(h.send(c.tuple, &frame), Action::Drop(DropReason::OverBandwidth));
    assert_eq!(h.peer_sends(0, peer(), &[0u8; 1000]), Action::Drop(DropReason::OverBandwidth));
    h.now += Duration::from_secs(1);
    let refilled = (0..40).filter(|_| matches!(h.send(c.tuple, &frame), Action::ToPeer { .. })).count();
    assert_eq!(refilled, 16, "16 KiB per second");
}

/// The shard's share of a total cap applies across allocations.
#[test]
fn total_bandwidth_is_shared_by_allocations() {
    let mut s = settings();
    s.shard_total_bps = 16 * 1024;
    let mut h = harness_with(s);
    let mut a = Client::rest(40091, "a", UNIX0 + 3600);
    let mut b = Client::rest(40092, "b", UNIX0 + 3600);
    for c in [&mut a, &mut b] {
        assert_eq!(h.allocate(c).class(), Class::Success);
        assert_eq!(h.authed(c, Method::CHANNEL_BIND, channel_bind_attrs(0x4000, peer())).class(), Class::Success);
    }
    let frame = channel_data(0x4000, &[0u8; 1000]);
    let mut ok = 0;
    for _ in 0..20 {
        for t in [a.tuple, b.tuple] {
            ok += usize::from(matches!(h.send(t, &frame), Action::ToPeer { .. }));
        }
    }
    assert_eq!(ok, 16);
}

/// Answers to unauthenticated requests (401 challenges, Binding) are limited per source address, and
/// authenticated traffic is not.
#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut s = settings();
    s.unauth_rate = 5;
    s.unauth_burst = 10;
    let mut h = harness_with(s);
    let mut c = Client::rest(40093, "u", UNIX0 + 3600);
    let answered = (0..50)
        .filter(|_| {
            let req = c.request(Method::ALLOCATE, false, udp_transport);
            matches!(h.send(c.tuple, &req), Action::Reply { .. })
        })
        .count();
    assert_eq!(answered, 10);
    let binding = c.request(Method::BINDING, false, |_| {});
    assert_eq!(h.send(c.tuple, &binding), Action::Drop(DropReason::SourceRateLimited));
    // Another source is unaffected.
    let other = Client::rest(40094, "u", UNIX0 + 3600);
    let mut other_tuple = other.tuple;
    other_tuple.client = "203.0.113.50:1000".parse().unwrap();
    assert!(matches!(h.send(other_tuple, &binding), Action::Reply { .. }));
    // After a second the source may try again; authenticated requests are never limited.
    h.advance(2);
    let r = h.request(c.tuple, &c.request(Method::ALLOCATE, false, udp_transport));
    c.nonce = r.attr(AttrType::NONCE).unwrap();
    for _ in 0..30 {
        let req = c.request(Method::ALLOCATE, true, udp_transport);
        assert!(matches!(h.send(c.tuple, &req), Action::Reply { .. }));
    }
}

/// The budget of unauthenticated answers is one per source for the whole server, not one per shard;
/// while it refuses, an unauthenticated Refresh smaller than its challenge goes unanswered (no client
/// sends one), while a first Allocate, which real clients send small, is still challenged.
#[test]
fn unauthenticated_budget_is_node_wide_and_floods_silence_small_refreshes() {
    let mut s = settings();
    s.unauth_rate = 5;
    s.unauth_burst = 10;
    let mut a = harness_with(s.clone());
    let mut b = harness_with(s);
    b.engine.cluster = Arc::clone(&a.cluster) as Arc<dyn Cluster>;
    let c = Client::rest(40095, "u", UNIX0 + 3600);
    let binding = c.request_with_tid(Method::BINDING, TransactionId([5; 12]), false, |_| {});
    let answered = (0..50)
        .filter(|k| {
            let h = if k % 2 == 0 { &mut a } else { &mut b };
            matches!(h.send(c.tuple, &binding), Action::Reply { .. })
        })
        .count();
    assert_eq!(answered, 10, "one burst for the source, whichever shard it reaches");
    // Another source, in another prefix: its small unauthenticated Refresh is dropped during the flood.
    let mut d = Client::rest(40096, "v", UNIX0 + 3600);
    d.tuple.client = "203.0.113.60:1000".parse().unwrap();
    let refresh = d.request(Method::REFRESH, false, |w| w.add_u32(AttrType::LIFETIME, 600));
    assert_eq!(a.send(d.tuple, &refresh), Action::Drop(DropReason::UnauthenticatedUnderFlood));
    let allocate = d.request(Method::ALLOCATE, false, udp_transport);
    assert_eq!(a.request(d.tuple, &allocate).code(), Some(401), "first Allocates are always challenged");
    // A Refresh as large as its challenge would be is answered; so is any once the flood is over.
    let padded = d.request(Method::REFRESH, false, |w| w.add_bytes(AttrType::SOFTWARE, &[b'x'; 160]));
    assert_eq!(a.request(d.tuple, &padded).code(), Some(401));
    a.advance(3);
    assert_eq!(a.request(d.tuple, &refresh).code(), Some(401));
}

/// Deleted allocations' relay sockets are parked, up to an eighth of the range, and the next
/// allocations take them over (no fresh socket) at random among at least `MIN_CHOICE`; every port is
/// always exactly one of free, parked or in use.
#[test]
fn deleted_allocations_sockets_serve_the_next_allocations() {
    use crate::spares::MIN_CHOICE;
    let mut h = harness_unlimited(50_000, 50_159);
    h.io.parks = true;
    let accounted = |h: &Harness| h.engine.free_ports() + h.engine.spare_sockets() + h.engine.table().len();
    let mut clients: Vec<Client> = (0..30u16).map(|i| Client::rest(41_000 + i, "u", UNIX0 + 3600)).collect();
    for c in &mut clients {
        assert_eq!(h.allocate(c).class(), Class::Success);
    }
    assert_eq!(h.io.opened, 30);
    for c in &mut clients {
        assert_eq!(h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0)).class(), Class::Success);
        assert_eq!(accounted(&h), 160);
    }
    assert_eq!(h.engine.spare_sockets(), 20, "one in eight of 160 ports");
    assert_eq!(read(&h.engine.stats.spare_relay_sockets), 20);
    assert_eq!(h.io.open.len(), 0);
    let parked: HashSet<u16> = h.io.parked.values().copied().collect();
    let mut reused = Vec::new();
    for i in 0..(20 - MIN_CHOICE + 1) as u16 {
        let mut c = Client::rest(42_000 + i, "v", UNIX0 + 3600);
        let r = h.allocate(&mut c);
        assert_eq!(r.class(), Class::Success);
        let port = r.xor_addr(AttrType::XOR_RELAYED_ADDRESS).port();
        assert!(parked.contains(&port), "port {port} is not a parked one");
        reused.push(port);
        assert_eq!(accounted(&h), 160);
    }
    assert_eq!(h.io.opened, 30, "no fresh socket while spares were there");
    assert_eq!(h.engine.spare_sockets(), MIN_CHOICE - 1);
    assert_eq!(reused.iter().collect::<HashSet<_>>().len(), reused.len(), "a spare is handed out once");
    // Below MIN_CHOICE spares with fresh ports left: a fresh socket.
    let mut c = Client::rest(43_000, "w", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
    assert_eq!(h.io.opened, 31);
    assert_eq!(h.engine.spare_sockets(), MIN_CHOICE - 1);
    assert_eq!(accounted(&h), 160);
}

/// With no fresh port left a spare is used however few there are, and a spare the shard cannot put
/// back in service gives its port back to the pool.
#[test]
fn spares_serve_when_the_range_is_used_up_and_a_failed_one_frees_its_port() {
    let mut h = harness_unlimited(50_000, 50_015);
    h.io.parks = true;
    let mut clients: Vec<Client> = (0..16u16).map(|i| Client::rest(41_000 + i, "u", UNIX0 + 3600)).collect();
    for c in &mut clients {
        assert_eq!(h.allocate(c).class(), Class::Success);
    }
    let mut extra = Client::rest(44_000, "x", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut extra).code(), Some(508), "the range is used up");
    for c in &mut clients[..2] {
        assert_eq!(h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 0)).class(), Class::Success);
    }
    assert_eq!((h.engine.spare_sockets(), h.engine.free_ports()), (2, 0));
    let mut a = Client::rest(44_001, "y", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a).class(), Class::Success, "a spare instead of 508");
    assert_eq!((h.engine.spare_sockets(), h.engine.free_ports(), h.io.opened), (1, 0, 16));
    h.io.unpark_fails = true;
    let mut b = Client::rest(44_002, "z", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut b).class(), Class::Success, "the failed spare's port, freshly bound");
    assert_eq!((h.engine.spare_sockets(), h.engine.free_ports(), h.io.opened), (0, 0, 17));
    assert_eq!(h.engine.table().len(), 16);
}

/// Requests on an allocation reuse the key it was created with, yet every credential check still holds:
/// a REST username past its expiry, a wrong key, a secret removed and a password changed by a reload.
#[test]
fn reused_allocation_keys_keep_every_credential_check() {
    let mut h = harness();
    let refresh =
        |h: &mut Harness, c: &mut Client| h.authed(c, Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, 600));
    let mut soon = Client::rest(40060, "u", UNIX0 + 100);
    assert_eq!(h.allocate(&mut soon).class(), Class::Success);
    assert_eq!(refresh(&mut h, &mut soon).class(), Class::Success);
    let mut forged = soon.clone();
    forged.key = [7; 16];
    assert_eq!(refresh(&mut h, &mut forged).code(), Some(401), "a wrong key on the allocation's 5-tuple");
    h.now += Duration::from_secs(101);
    assert_eq!(refresh(&mut h, &mut soon).code(), Some(401), "the REST username expired meanwhile");

    let mut rest = Client::rest(40061, "v", UNIX0 + 3600);
    let mut alice = Client::static_user(40062, "alice", "wonderland");
    assert_eq!(h.allocate(&mut rest).class(), Class::Success);
    assert_eq!(h.allocate(&mut alice).class(), Class::Success);
    let mut s = settings();
    s.credentials = CredentialStore::new(REALM, b':');
    s.credentials.add_secret("old-secret");
    s.credentials.add_user("alice", "looking-glass");
    h.engine.reload(h.now, Arc::new(s));
    assert_eq!(refresh(&mut h, &mut rest).code(), Some(401), "its secret was removed");
    assert_eq!(refresh(&mut h, &mut alice).code(), Some(401), "her password changed");
    let mut alice_now = Client::static_user(40062, "alice", "looking-glass");
    alice_now.nonce.clone_from(&alice.nonce);
    assert_eq!(refresh(&mut h, &mut alice_now).class(), Class::Success, "the new password works");
    assert_eq!(refresh(&mut h, &mut alice_now).class(), Class::Success, "and keeps working");
}

/// A relay on a public address (which the policy permits) and its listening address: only live
/// relayed addresses are reachable there, not the host's other services, unless the operator names
/// the address in `peers.allowed` (a service on the relay's host); a reload that drops the name closes
/// those permissions down to the live relayed addresses again.
#[test]
fn own_public_addresses_reach_only_live_relays_unless_named() {
    let public: IpAddr = "192.88.100.9".parse().unwrap();
    let listening: IpAddr = "192.88.100.10".parse().unwrap();
    let mut s = settings();
    s.relay_v4 = vec![RelayAddr { bind: public, advertised: public }];
    let relays = s.relay_v4.iter().map(|r| (r.bind, r.advertised));
    let shared = Arc::new(TestCluster::new(relays, [listening]));
    let mut h = harness_on(s.clone(), PORTS);
    h.engine.cluster = Arc::clone(&shared) as Arc<dyn Cluster>;
    h.cluster = shared;
    let mut a = Client::rest(40100, "a", UNIX0 + 3600);
    let mut b = Client::rest(40101, "b", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a).class(), Class::Success);
    let relayed_b = h.allocate(&mut b).xor_addr(AttrType::XOR_RELAYED_ADDRESS);
    for service in [SocketAddr::new(public, 22), SocketAddr::new(public, 53), SocketAddr::new(listening, 3478)] {
        let r = h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(service));
        assert_eq!(r.code(), Some(403), "{service}: another program on the relay's host");
    }
    assert_eq!(h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(relayed_b)).class(), Class::Success);
    assert!(matches!(h.send(a.tuple, &send_indication(relayed_b, b"x")), Action::ToPeer { .. }));
    let ssh = SocketAddr::new(public, 22);
    assert_eq!(h.send(a.tuple, &send_indication(ssh, b"x")), Action::Drop(DropReason::NoPermission));
    // Named by the operator: every port of it.
    let mut named = s.clone();
    named.peer_policy = PeerPolicy::new(vec![IpRange::cidr(public, 32).unwrap()], vec![], true, false);
    h.engine.reload(h.now, Arc::new(named));
    assert_eq!(h.authed(&mut a, Method::CREATE_PERMISSION, peer_attr(ssh)).class(), Class::Success);
    assert!(matches!(h.send(a.tuple, &send_indication(ssh, b"x")), Action::ToPeer { .. }));
    // Unnamed again: back to the live relayed addresses only.
    h.engine.reload(h.now, Arc::new(s));
    assert_eq!(h.send(a.tuple, &send_indication(ssh, b"x")), Action::Drop(DropReason::NoPermission));
    assert!(matches!(h.send(a.tuple, &send_indication(relayed_b, b"x")), Action::ToPeer { .. }));
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

/// A user looping Allocate(EVEN-PORT, R) -> Refresh(0) never holds more than one allocation but,
/// uncounted, kept every reservation for 30 s: 8,187 of 16,384 ports. Reservations count against
/// the quotas and are capped per user (allocations.user_reservations), so others keep their capacity.
#[test]
fn even_port_reservations_cannot_take_the_range() {
    let mut s = settings();
    s.user_quota = 0;
    s.total_quota = 0;
    s.user_reservations = 2;
    let mut h = harness_on(s, (50_000, 50_019));
    let ports = h.engine.free_ports();
    for attempt in 0..10u16 {
        let mut c = Client::rest(41000 + attempt, "mallory", UNIX0 + 3600);
        let r = allocate_even_port(&mut h, &mut c);
        if attempt < 2 {
            assert_eq!(r.class(), Class::Success, "reservation {attempt}");
            delete(&mut h, &mut c);
        } else {
            assert_eq!(r.code(), Some(486), "reservation {attempt}: the user already holds two");
        }
    }
    assert_eq!(h.cluster.held_by(b"mallory"), 2, "two reservations, no allocation");
    assert_eq!(h.cluster.reservations(), 2);
    // Everybody else still gets EVEN-PORT with R, and all the other ports.
    let mut others = 0;
    for k in 0..20u16 {
        let mut c = Client::rest(42000 + k, &format!("user{k}"), UNIX0 + 3600);
        let r = if k < 2 { allocate_even_port(&mut h, &mut c) } else { h.allocate(&mut c) };
        if r.class() == Class::Success {
            others += 1 + usize::from(k < 2);
        }
    }
    assert_eq!(others, ports - 2, "only mallory's two reserved ports are out of reach");
    // Lapsed reservations give their ports and quota back.
    h.advance(31);
    assert_eq!(h.cluster.held_by(b"mallory"), 0);
    let mut c = Client::rest(41100, "mallory", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c).class(), Class::Success);
}

/// With a user quota, a reservation is one of the user's allocations until it is redeemed (by the
/// same user: the unit carries over; by another user: charged to that user instead, refused if that
/// user is at quota) or lapses.
#[test]
fn reservations_count_against_user_and_total_quotas() {
    let mut s = settings();
    s.user_quota = 2;
    s.total_quota = 5;
    s.user_reservations = 4;
    let mut h = harness_with(s);
    let redeem = |h: &mut Harness, c: &mut Client, token: &[u8]| {
        h.authed(c, Method::ALLOCATE, |w| {
            udp_transport(w);
            w.add_bytes(AttrType::RESERVATION_TOKEN, token);
        })
    };
    let mut a1 = Client::rest(43000, "alice", UNIX0 + 3600);
    let r = allocate_even_port(&mut h, &mut a1);
    assert_eq!(r.class(), Class::Success);
    let token = r.attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut a2 = Client::rest(43001, "alice", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut a2).code(), Some(486), "the allocation and its reservation fill alice's quota");
    // Redeeming her own reservation needs no more quota.
    assert_eq!(redeem(&mut h, &mut a2, &token).class(), Class::Success);
    assert_eq!(h.cluster.held_by(b"alice"), 2);
    // Bob reserves; carol fills her quota, then tries to redeem bob's token: refused, still bob's.
    let mut b = Client::rest(43002, "bob", UNIX0 + 3600);
    let token = allocate_even_port(&mut h, &mut b).attr(AttrType::RESERVATION_TOKEN).unwrap();
    let mut c1 = Client::rest(43003, "carol", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c1).class(), Class::Success);
    assert_eq!(h.cluster.total(), 5);
    let mut c2 = Client::rest(43004, "carol", UNIX0 + 3600);
    assert_eq!(h.allocate(&mut c2).code(), Some(486), "the total is full");
    // With the total full, dave may still redeem bob's token: it moves a unit, it adds none.
    let mut d = Client::rest(43005, "dave", UNIX0 + 3600);
    let mut c3 = Client::rest(43006, "carol", UNIX0 + 3600);
    delete(&mut h, &mut a1);
    assert_eq!(h.allocate(&mut c3).class(), Class::Success, "carol now holds two");
    assert_eq!(redeem(&mut h, &mut c2, &token).code(), Some(486), "carol is at her quota");
    assert_eq!((h.cluster.held_by(b"bob"), h.cluster.reservations()), (2, 1), "still bob's");
    assert_eq!(h.cluster.total(), 5);
    assert_eq!(redeem(&mut h, &mut d, &token).class(), Class::Success);
    assert_eq!((h.cluster.held_by(b"bob"), h.cluster.held_by(b"dave")), (1, 1));
    assert_eq!(h.cluster.total(), 5);
    // With a user quota of one, EVEN-PORT with R (two units) is always refused.
    let mut s = settings();
    s.user_quota = 1;
    let mut h = harness_with(s);
    let mut e = Client::rest(43007, "erin", UNIX0 + 3600);
    assert_eq!(allocate_even_port(&mut h, &mut e).code(), Some(486));
}
