//! Stateful: sequences of client datagrams (raw, or scripted requests the harness signs so the fuzzer
//! reaches authenticated states), peer datagrams and clock steps. The engine must never panic, and
//! open relay sockets, table entries and quota counts must always agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use turnpike_proto::allocation::{FiveTuple, ListenerId, RelayKey, Transport};
use turnpike_proto::attr::AttrType;
use turnpike_proto::auth::{CredentialStore, NonceKey};
use turnpike_proto::cluster::LocalCluster;
use turnpike_proto::engine::{BindError, RelaySockets};
use turnpike_proto::integrity::{long_term_key, rest_password};
use turnpike_proto::stats::EngineCounters;
use turnpike_proto::{
    Action, Class, Cluster, Engine, Method, MsgWriter, PacketBuf, RelayAddr, Settings, StunMsg, TransactionId,
};

#[derive(Default)]
struct Sockets(HashSet<RelayKey>);

impl RelaySockets for Sockets {
    fn open(&mut self, key: RelayKey, _: SocketAddr) -> Result<(), BindError> {
        assert!(self.0.insert(key), "relay socket opened twice");
        Ok(())
    }
    fn close(&mut self, key: RelayKey) {
        assert!(self.0.remove(&key), "relay socket closed but not open");
    }
}

const UNIX0: u64 = 1_800_000_000;

/// Settings and ports, built once per process: one relay address (127.0.0.1, ports 50000-50007), a REST
/// secret and a static user, a user quota of 3, the default peer policy and unauthenticated budget.
fn setup() -> &'static (Arc<Settings>, Vec<u16>) {
    static SETUP: OnceLock<(Arc<Settings>, Vec<u16>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let mut credentials = CredentialStore::new("fuzz", b':');
        credentials.add_secret("s");
        credentials.add_user("u", "p");
        let relay = RelayAddr { bind: IpAddr::from([127, 0, 0, 1]), advertised: IpAddr::from([127, 0, 0, 1]) };
        let settings = Settings {
            max_permissions: 4,
            max_channels: 4,
            user_quota: 3,
            ..Settings::new(credentials, NonceKey::new([9; 32]), vec![relay], vec![])
        };
        (Arc::new(settings), (50_000..=50_007).collect())
    })
}

fuzz_target!(|data: &[u8]| {
    let (settings, ports) = setup();
    let settings = Arc::clone(settings);
    // The relay addresses known, so that the own-relay exception (live relayed addresses) is explored.
    let relays = settings.relay_v4.iter().chain(&settings.relay_v6).map(|r| (r.bind, r.advertised));
    let shared = Arc::new(LocalCluster::new(relays, []));
    #[allow(clippy::disallowed_methods)] // the harness starts its fake clock at a real Instant
    let t0 = Instant::now();
    let mut now = t0;
    let mut engine = Engine::new(
        0,
        settings,
        Arc::clone(&shared) as Arc<dyn Cluster>,
        Arc::new(EngineCounters::default()),
        ports.iter().copied(),
        t0,
        UNIX0,
        &[1; 32],
    );
    let mut io = Sockets::default();
    let mut pkt = PacketBuf::default();
    let username = format!("{}:fuzz", UNIX0 + 3600);
    let password = rest_password(b"s", username.as_bytes());
    let key = long_term_key(username.as_bytes(), b"fuzz", &password);
    let mut nonce: Vec<u8> = Vec::new();
    let mut tid = 0u8;

    let mut input = data;
    while input.len() >= 3 {
        let (op, a, b) = (input[0], input[1], input[2]);
        input = &input[3..];
        let client = FiveTuple {
            client: SocketAddr::new(IpAddr::from([198, 51, 100, 1]), 4000 + u16::from(a % 4)),
            listener: ListenerId(0),
            transport: Transport::Udp,
        };
        let peer = SocketAddr::new(IpAddr::from([8, 8, 8, 8 + (b % 3)]), 7000 + u16::from(b % 2));
        let action = match op % 9 {
            0 => {
                let n = usize::from(b).min(input.len());
                let (raw, rest) = input.split_at(n);
                input = rest;
                let len = pkt.fill(raw);
                engine.handle_client(now, client, &mut pkt, len, &mut io)
            }
            1 => {
                let n = usize::from(b).min(input.len());
                let (raw, rest) = input.split_at(n);
                input = rest;
                let len = pkt.fill(raw);
                // Both halves of the first three slots.
                match RelayKey::from_index(usize::from(a % 6)) {
                    Some(key) => engine.handle_peer(now, key, peer, &mut pkt, len),
                    None => Action::Done,
                }
            }
            2 => {
                now += Duration::from_secs(u64::from(a) * 4 + u64::from(b));
                engine.handle_timeout(now, &mut io);
                Action::Done
            }
            3..=7 => {
                tid = tid.wrapping_add(1);
                let mut buf = [0u8; 512];
                let method = [
                    Method::ALLOCATE,
                    Method::CREATE_PERMISSION,
                    Method::CHANNEL_BIND,
                    Method::REFRESH,
                    Method::BINDING,
                ][usize::from(op % 9 - 3)];
                let mut w = MsgWriter::new(&mut buf, method, Class::Request, TransactionId([tid; 12]));
                match method {
                    Method::ALLOCATE => {
                        w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[if b % 7 == 0 { 6 } else { 17 }, 0, 0, 0]);
                        if b % 5 == 0 {
                            w.add_bytes(AttrType::EVEN_PORT, &[b & 0x80]);
                        }
                    }
                    Method::CREATE_PERMISSION => w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer),
                    Method::CHANNEL_BIND => {
                        w.add_bytes(AttrType::CHANNEL_NUMBER, &[0x40 | (b & 0x3F) >> 4, b, 0, 0]);
                        w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
                    }
                    Method::REFRESH => w.add_u32(AttrType::LIFETIME, u32::from(b) * 8),
                    _ => {}
                }
                if a & 0x80 == 0 && method != Method::BINDING {
                    w.add_long_term_credentials(username.as_bytes(), b"fuzz", &nonce, &key);
                }
                let Ok(n) = w.finish() else { continue };
                let len = pkt.fill(&buf[..n]);
                engine.handle_client(now, client, &mut pkt, len, &mut io)
            }
            _ => {
                let payload = [b; 40];
                let mut frame = vec![0x40 | (a & 0x0F), a, 0, payload.len() as u8];
                frame.extend_from_slice(&payload);
                let len = pkt.fill(&frame);
                engine.handle_client(now, client, &mut pkt, len, &mut io)
            }
        };
        if let Action::Reply { len } = action
            && let Ok(msg) = StunMsg::parse(engine.reply(len))
            && let Some(n) = msg.attr(AttrType::NONCE)
        {
            nonce = n.to_vec();
        }
        assert_eq!(io.0.len(), engine.allocation_count());
        // Every allocation and every outstanding EVEN-PORT reservation is counted, nothing else.
        assert_eq!(shared.total() as usize, engine.allocation_count() + shared.reservations());
    }
});
