//! The TURN server state machine of one shard (RFC 8656 over RFC 8489), sans-IO.
//!
//! The shard feeds it datagrams from clients ([`Engine::handle_client`]) and from peers
//! ([`Engine::handle_peer`]) together with `now`, and performs the returned [`Action`]. Relay sockets are
//! opened and closed through [`RelaySockets`], which the shard implements with real sockets and tests
//! implement with a fake. Expiry runs off a timer wheel ([`Engine::handle_timeout`]).
//!
//! The data path (ChannelData, Send indications, peer datagrams) does no heap allocation: payloads stay
//! where they were received and headers are written into the [`PacketBuf`] headroom in front of them.

use crate::allocation::{
    Allocation, CHANNEL_COOLDOWN, CHANNEL_LIFETIME, ChannelBinding, FiveTuple, PERMISSION_LIFETIME, PeerScope,
    PermissionChange, relay_key,
};
use crate::attr::{self, AttrType, FAMILY_IPV4, FAMILY_IPV6, PROTO_UDP};
use crate::auth::{CredentialStore, NonceCheck, NonceKey, Verdict};
use crate::channel::{self, CHANNEL_HEADER_LEN, ChannelData, ChannelNumber};
use crate::cluster::{Cluster, QuotaError, QuotaLimits, Reservation};
use crate::error::{DropReason, ErrorCode};
use crate::integrity::{KeptKey, PreparedKey};
use crate::policy::PeerPolicy;
use crate::policy::rate::{LogKind, LogLimiter, TokenBucket};
use crate::ports::PortPool;
use crate::rng::XorShift;
use crate::spares::{Spare, SparePool};
use crate::stats::{ShardStats, bump, bump_down, set, transport_index};
use crate::stun::{self, Class, HEADER_LEN, MAGIC_COOKIE, Method, MsgWriter, StunMsg, TransactionId, pad4};
use crate::table::{AllocId, AllocTable};
use crate::timer::TimerWheel;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes kept free in front of every received payload, enough for a Data indication header
/// (20 + XOR-PEER-ADDRESS of up to 24 + DATA header 4 = 48).
pub const HEADROOM: usize = 64;
/// Largest payload a [`PacketBuf`] receives.
pub const MAX_PAYLOAD: usize = 65_536;
/// Bytes kept free after the payload for padding.
pub const TAILROOM: usize = 16;
/// Size of the response buffer; every response the engine writes fits.
const OUT_LEN: usize = 1_500;
/// Most unknown attributes listed in one 420 response.
const MAX_UNKNOWN_LISTED: usize = 8;
/// How long a RESERVATION-TOKEN holds its port (RFC 8656 §7.2 suggests about 30 seconds).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Most timers fired per [`Engine::handle_timeout`]; the rest wait for the next call, which the shard
/// makes at once after serving its sockets. Freeing an allocation costs a few microseconds (its socket
/// is closed), so 10,000 allocations expiring in the same second would otherwise hold up relaying for
/// tens of milliseconds (`scripts/bench-expiry.sh`: a call's p99 13-21 ms during such an expiry when
/// all were freed at once; see bench/README.md, "Churn and mass expiry").
pub const TIMER_BUDGET: usize = 128;

/// How many busy ports an Allocate skips before giving up with 508.
const BIND_ATTEMPTS: usize = 16;
/// Longest USERNAME accepted (RFC 8489 §14.3: less than 513 bytes).
const MAX_USERNAME: usize = 512;
/// Longest REALM or NONCE accepted (RFC 8489 §14.9, §14.10: less than 763 bytes).
const MAX_REALM_OR_NONCE: usize = 762;

/// One receive buffer with headroom and tailroom, so relay headers are written in place.
pub struct PacketBuf {
    buf: Box<[u8]>,
}

impl Default for PacketBuf {
    fn default() -> Self {
        Self { buf: vec![0u8; HEADROOM + MAX_PAYLOAD + TAILROOM].into_boxed_slice() }
    }
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketBuf")
    }
}

impl PacketBuf {
    /// The region a datagram is received into.
    pub fn body_mut(&mut self) -> &mut [u8] {
        &mut self.buf[HEADROOM..HEADROOM + MAX_PAYLOAD]
    }

    /// Bytes of an [`Action`]'s range.
    pub fn get(&self, range: Range<usize>) -> &[u8] {
        self.buf.get(range).unwrap_or(&[])
    }

    /// Bytes of `range`, writable (empty when out of bounds): the send path writes headers into the
    /// headroom in front of a relayed payload.
    pub fn get_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        self.buf.get_mut(range).unwrap_or(&mut [])
    }

    /// Copies `bytes` in as if received (tests, fuzzing). Longer input is truncated.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(MAX_PAYLOAD);
        self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&bytes[..n]);
        n
    }
}

/// A relay address of one family: the IP the socket binds and the IP advertised to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddr {
    /// Bound by relay sockets.
    pub bind: IpAddr,
    /// Sent in XOR-RELAYED-ADDRESS (the public address behind NAT).
    pub advertised: IpAddr,
}

/// The engine's configuration; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Accepted credentials and the realm.
    pub credentials: CredentialStore,
    /// Signs nonces and reservation tokens.
    pub nonce_key: NonceKey,
    /// How long a nonce stays valid.
    pub nonce_lifetime: Duration,
    /// Lifetime granted when the client asks for less (RFC 8656: 10 minutes).
    pub default_lifetime: Duration,
    /// Longest lifetime granted.
    pub max_lifetime: Duration,
    /// Most permissions per allocation.
    pub max_permissions: usize,
    /// Most channel bindings per allocation.
    pub max_channels: usize,
    /// Which peers may be reached.
    pub peer_policy: PeerPolicy,
    /// Allocations per user (0 = unlimited).
    pub user_quota: u32,
    /// Allocations in total (0 = unlimited).
    pub total_quota: u32,
    /// Unredeemed EVEN-PORT reservations one user may hold (0: none); each also counts as an allocation.
    pub user_reservations: u32,
    /// Bytes per second per allocation and direction (0 = unlimited).
    pub max_bps: u64,
    /// This shard's share of the total bytes per second per direction (0 = unlimited).
    pub shard_total_bps: u64,
    /// Unauthenticated requests answered per source address per second (0 = unlimited).
    pub unauth_rate: u64,
    /// Burst of unauthenticated requests per source address.
    pub unauth_burst: u64,
    /// SOFTWARE attribute added to responses, if any.
    pub software: Option<Box<str>>,
    /// Whether ERROR-CODE carries reason phrases.
    pub reason_phrases: bool,
    /// Accept channel numbers up to 0x7FFF (RFC 5766) and not only up to 0x4FFF (RFC 8656).
    pub legacy_channel_numbers: bool,
    /// IPv4 relay addresses (used in turn), if IPv4 relaying is offered.
    pub relay_v4: Vec<RelayAddr>,
    /// IPv6 relay addresses (used in turn), if IPv6 relaying is offered.
    pub relay_v6: Vec<RelayAddr>,
}

/// Why a relay socket could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindError {
    /// The port is taken (by another process): try another.
    AddrInUse,
    /// Anything else (out of descriptors, ...), with the OS error number (0 if none).
    Failed(i32),
}

/// Why an Allocate got no relay port (each answered with 508).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoPort {
    /// The RESERVATION-TOKEN is unknown, expired, or its port could not be bound.
    Reservation,
    /// The shard's share of the relay port range is used up.
    RangeExhausted,
    /// Every port tried was held by another program.
    AllBusy,
    /// The relay socket could not be opened.
    Socket(i32),
}

impl std::fmt::Display for NoPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reservation => f.write_str("reservation token unknown, expired or its port unusable"),
            Self::RangeExhausted => f.write_str("no relay port left in this shard's share of the range"),
            Self::AllBusy => write!(f, "the {BIND_ATTEMPTS} relay ports tried are all held by other programs"),
            Self::Socket(errno) => {
                write!(f, "cannot open a relay socket: {}", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

/// The I/O layer's side of relay socket management.
pub trait RelaySockets {
    /// Opens the relay socket of allocation slot `idx`, bound to `addr`.
    fn open(&mut self, idx: u32, addr: SocketAddr) -> Result<(), BindError>;
    /// Closes the relay socket of slot `idx`.
    fn close(&mut self, idx: u32);
    /// Takes the relay socket of slot `idx` out of service but keeps it open, bound and drained, for a
    /// later allocation (see [`crate::spares`]). Returns its id among the parked sockets, or `None`
    /// when it was closed instead (the default: an implementation that does not park).
    fn park(&mut self, idx: u32) -> Option<u32> {
        self.close(idx);
        None
    }
    /// Puts parked socket `spare` in service as the relay socket of slot `idx`. On an error the parked
    /// socket is closed.
    fn unpark(&mut self, _spare: u32, _idx: u32) -> Result<(), BindError> {
        Err(BindError::Failed(0))
    }
    /// An allocation was deleted; for TCP/TLS clients the connection goes with it (RFC 8656 §7).
    fn allocation_freed(&mut self, _tuple: FiveTuple) {}
}

/// What the shard must do with a datagram.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Nothing to send (a keep-alive indication, say).
    Done,
    /// Drop it and count the reason.
    Drop(DropReason),
    /// Send [`Engine::reply`] bytes `..len` back to the client the request came from.
    Reply {
        /// Length of the response in the engine's reply buffer.
        len: usize,
    },
    /// Send `range` of the packet buffer from relay socket `idx` to `peer`.
    ToPeer {
        /// Relay socket (allocation slot).
        idx: u32,
        /// Destination peer.
        peer: SocketAddr,
        /// The payload in the packet buffer.
        range: Range<usize>,
    },
    /// Send `range` of the packet buffer to the client of `tuple`.
    ToClient {
        /// The allocation's client side.
        tuple: FiveTuple,
        /// ChannelData or Data indication, header included.
        range: Range<usize>,
    },
}

#[derive(Clone, Copy, Debug)]
enum Timer {
    /// The deadline the entry was armed for: entries that no longer match `armed_at` are stale.
    Allocation(AllocId, Instant),
    Permission(AllocId, IpAddr),
    Channel(AllocId, ChannelNumber),
    Reservation([u8; 8]),
}

/// Attributes the engine understands; other comprehension-required ones get 420. DONT-FRAGMENT is
/// deliberately absent: relays do not set DF, and RFC 8656 §7.2 says to treat it as unknown then.
const KNOWN: &[AttrType] = &[
    AttrType::MAPPED_ADDRESS,
    AttrType::USERNAME,
    AttrType::MESSAGE_INTEGRITY,
    AttrType::ERROR_CODE,
    AttrType::UNKNOWN_ATTRIBUTES,
    AttrType::CHANNEL_NUMBER,
    AttrType::LIFETIME,
    AttrType::BANDWIDTH,
    AttrType::XOR_PEER_ADDRESS,
    AttrType::DATA,
    AttrType::REALM,
    AttrType::NONCE,
    AttrType::XOR_RELAYED_ADDRESS,
    AttrType::REQUESTED_ADDRESS_FAMILY,
    AttrType::EVEN_PORT,
    AttrType::REQUESTED_TRANSPORT,
    AttrType::XOR_MAPPED_ADDRESS,
    AttrType::RESERVATION_TOKEN,
    AttrType::PRIORITY,
    AttrType::USE_CANDIDATE,
];

/// The result of authenticating a request: the key and the username it carried, and the allocation of
/// its 5-tuple, if any (looked up once, for the key and for the request).
struct Authenticated<'a> {
    key: PreparedKey,
    username: &'a [u8],
    existing: Option<AllocId>,
}

/// Writes a response to `req` into `out`: body, then SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT as due.
fn write_response(
    out: &mut [u8],
    settings: &Settings,
    req: &StunMsg<'_>,
    class: Class,
    key: Option<&PreparedKey>,
    body: impl FnOnce(&mut MsgWriter<'_>),
) -> Action {
    let mut w = MsgWriter::new(out, req.method(), class, req.transaction_id());
    body(&mut w);
    if let Some(software) = &settings.software {
        w.add_bytes(AttrType::SOFTWARE, software.as_bytes());
    }
    if let Some(key) = key {
        w.add_message_integrity_with(key.hmac());
    }
    if req.has_fingerprint() {
        w.add_fingerprint();
    }
    match w.finish() {
        Ok(len) => Action::Reply { len },
        Err(_) => Action::Drop(DropReason::NoSpace),
    }
}

/// Takes `len` bytes from the allocation's and the shard's buckets of direction `dir` (0 = to peer,
/// 1 = to client); false means drop.
fn take_bandwidth(
    alloc: &mut Option<[TokenBucket; 2]>,
    total: &mut Option<[TokenBucket; 2]>,
    dir: usize,
    len: usize,
    now: Instant,
) -> bool {
    let n = len as u64;
    alloc.as_mut().is_none_or(|b| b[dir].take(n, now)) && total.as_mut().is_none_or(|b| b[dir].take(n, now))
}

/// Decodes an XOR-PEER-ADDRESS of a request, checking family and policy (400/443/403), and says which
/// ports of that IP the permission covers.
fn check_peer(
    settings: &Settings,
    cluster: &dyn Cluster,
    alloc: &Allocation,
    value: &[u8],
    tid: &TransactionId,
) -> Result<(SocketAddr, PeerScope), ErrorCode> {
    let peer = attr::decode_xor_addr(value, tid).map_err(|_| ErrorCode::BadRequest)?;
    //= RFC 8656 §9.1/§11.1: "If the XOR-PEER-ADDRESS attribute contains an address of an address
    //= family that is not the same as that of a relayed transport address for the allocation, the
    //= server MUST generate an error response with the 443 (Peer Address Family Mismatch)".
    if !alloc.serves_family_of(peer.ip()) {
        return Err(ErrorCode::PeerAddressFamilyMismatch);
    }
    //= RFC 8656 §9.1: "The server MAY impose restrictions on the IP address allowed in the
    //= XOR-PEER-ADDRESS attribute; if a value is not allowed, the server rejects the request with a
    //= 403 (Forbidden) error."
    match reach(settings, cluster, peer) {
        Some(scope) => Ok((peer, scope)),
        None => Err(ErrorCode::Forbidden),
    }
}

/// Which ports of `ip` a permission may reach, if any. The server's own addresses (relay and
/// listening) are reachable only at the relayed addresses of live allocations (client -> TURN -> TURN
/// -> client), whether the policy would deny them (loopback, private) or not (a public relay address):
/// any other port there may be another program's, reached from the relay's own address. Unless the
/// operator named the address in `peers.allowed` (a service on this host that clients reach through
/// the relay); the data path checks the live relayed address again per datagram.
fn permission_scope(settings: &Settings, cluster: &dyn Cluster, ip: IpAddr) -> Option<PeerScope> {
    if cluster.is_own_address(ip) && !settings.peer_policy.explicitly_allows(ip) {
        return Some(PeerScope::LiveRelays);
    }
    settings.peer_policy.permits(ip).then_some(PeerScope::Any)
}

/// Whether `peer` may be reached, and the scope of the permission that lets it.
fn reach(settings: &Settings, cluster: &dyn Cluster, peer: SocketAddr) -> Option<PeerScope> {
    match permission_scope(settings, cluster, peer.ip())? {
        PeerScope::LiveRelays if !cluster.is_live_relay(peer) => None,
        scope => Some(scope),
    }
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
}

/// Offset of `inner` within `outer`, both slices of the same buffer.
fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize)
}

/// The TURN server state machine of one shard.
pub struct Engine {
    shard: u16,
    settings: Arc<Settings>,
    cluster: Arc<dyn Cluster>,
    stats: Arc<ShardStats>,
    table: AllocTable,
    ports: PortPool,
    wheel: TimerWheel<Timer>,
    due: Vec<Timer>,
    out: Box<[u8]>,
    origin: Instant,
    /// A moment of the monotonic clock and the unix time (seconds) it was: REST expiries and nonces are
    /// judged against unix time, derived from the two ([`Engine::set_wall_clock`] renews them).
    wall_at: Instant,
    wall_unix: u64,
    rng: XorShift,
    live_permissions: u64,
    live_channels: u64,
    /// The shard's share of the total bandwidth, [client -> peer, peer -> client].
    total_bandwidth: Option<[TokenBucket; 2]>,
    /// Budget for log lines a remote can cause (an attack must not fill the disk).
    logs: LogLimiter,
    /// Round-robin position over relay addresses.
    relay_turn: usize,
    /// Relay sockets of deleted allocations, kept for the next ones.
    spares: SparePool,
    /// Counts configuration reloads: an allocation's stored key is reused only under the credentials
    /// it was derived with.
    key_generation: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shard", &self.shard).field("allocations", &self.table.len()).finish()
    }
}

impl Engine {
    /// A shard's engine. `origin`/`origin_unix` tie the monotonic clock to unix time (REST expiries,
    /// nonces); `seed` randomises ports and indication transaction IDs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: u16,
        settings: Arc<Settings>,
        cluster: Arc<dyn Cluster>,
        stats: Arc<ShardStats>,
        ports: impl IntoIterator<Item = u16>,
        origin: Instant,
        origin_unix: u64,
        seed: u64,
    ) -> Self {
        let ports = PortPool::new(ports, seed);
        Self {
            shard,
            cluster,
            stats,
            table: AllocTable::default(),
            spares: SparePool::new(ports.len()),
            ports,
            wheel: TimerWheel::new(origin),
            due: Vec::new(),
            out: vec![0u8; OUT_LEN].into_boxed_slice(),
            origin,
            wall_at: origin,
            wall_unix: origin_unix,
            rng: XorShift::new(seed),
            live_permissions: 0,
            live_channels: 0,
            total_bandwidth: (settings.shard_total_bps > 0)
                .then(|| [TokenBucket::for_bandwidth(settings.shard_total_bps, origin); 2]),
            logs: LogLimiter::default(),
            relay_turn: 0,
            key_generation: 0,
            settings,
        }
    }

    /// The response written for the last [`Action::Reply`].
    pub fn reply(&self, len: usize) -> &[u8] {
        self.out.get(..len).unwrap_or(&[])
    }

    /// Swaps in a new configuration (between packets).
    pub fn reload(&mut self, now: Instant, settings: Arc<Settings>) {
        if settings.shard_total_bps != self.settings.shard_total_bps {
            self.total_bandwidth =
                (settings.shard_total_bps > 0).then(|| [TokenBucket::for_bandwidth(settings.shard_total_bps, now); 2]);
        }
        // Permissions and channels to peers the new policy refuses end now: the data path checks only
        // permissions, so a stricter policy must not leave old ones open.
        let (mut perms, mut chans, mut purged) = (0u64, 0u64, 0u64);
        let cluster = &*self.cluster;
        for alloc in self.table.iter_mut() {
            let before = alloc.permissions.len() + alloc.channels.len();
            alloc.permissions.retain_mut(|p| match permission_scope(&settings, cluster, p.ip) {
                Some(scope) => {
                    p.scope = scope;
                    true
                }
                None => false,
            });
            alloc.channels.retain(|c| reach(&settings, cluster, c.peer).is_some());
            let new_max = settings.max_bps;
            if new_max != self.settings.max_bps {
                alloc.bandwidth = (new_max > 0).then(|| [TokenBucket::for_bandwidth(new_max, now); 2]);
            }
            purged += (before - alloc.permissions.len() - alloc.channels.len()) as u64;
            perms += alloc.permissions.len() as u64;
            chans += alloc.channels.len() as u64;
        }
        if purged > 0 {
            log::info!("reload: shard {} closed {purged} permissions/channels the new peer policy refuses", self.shard);
        }
        self.live_permissions = perms;
        self.live_channels = chans;
        set(&self.stats.permissions, perms);
        set(&self.stats.channels, chans);
        self.key_generation += 1;
        self.settings = settings;
    }

    /// The current configuration.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The allocation table (read-only, for stats and tests).
    pub fn table(&self) -> &AllocTable {
        &self.table
    }

    /// Free relay ports left on this shard.
    pub fn free_ports(&self) -> usize {
        self.ports.len()
    }

    /// Relay sockets of deleted allocations kept open for the next ones (their ports are not free).
    pub fn spare_sockets(&self) -> usize {
        self.spares.len()
    }

    fn unix(&self, now: Instant) -> u64 {
        self.wall_unix + now.saturating_duration_since(self.wall_at).as_secs()
    }

    /// Ties the monotonic clock to unix time again: `now` is `unix_secs`. The shard calls this about
    /// once a second, so REST expiries and nonces follow the wall clock when it is stepped (NTP setting
    /// the clock after boot, a virtual machine resumed: the monotonic clock does not count a suspend).
    /// Reading the wall clock once at start would judge every credential by a wrong clock until restart.
    pub fn set_wall_clock(&mut self, now: Instant, unix_secs: u64) {
        let expected = self.unix(now);
        // The two clocks agree within a second between calls (both are read in whole seconds).
        if unix_secs.abs_diff(expected) > 2 && self.shard == 0 {
            let (by, way) =
                if unix_secs > expected { (unix_secs - expected, "forward") } else { (expected - unix_secs, "back") };
            log::warn!("the wall clock moved {way} by {by} s: REST credential expiries and nonces follow it");
        }
        self.wall_at = now;
        self.wall_unix = unix_secs;
    }

    /// Charges an answer to an unauthenticated request to its source and the source's prefix,
    /// node-wide; true when over the limit (drop). Unauthenticated answers are bigger than the
    /// requests, so an unlimited server is a reflector.
    fn over_source_limit(&mut self, now: Instant, tuple: FiveTuple) -> bool {
        let (rate, burst) = (self.settings.unauth_rate, self.settings.unauth_burst);
        if self.cluster.answer_unauthenticated(tuple.client.ip(), now, rate, burst) {
            return false;
        }
        let ip = tuple.client.ip();
        self.logs.log(
            LogKind::RateLimited,
            log::Level::Info,
            now,
            format_args!("unauthenticated requests from {ip} over the rate limit: dropped"),
        );
        true
    }

    /// When [`Engine::handle_timeout`] next has work (in the past while fired timers wait their turn).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.due.is_empty() { self.wheel.next_deadline() } else { Some(self.origin) }
    }

    // ---------------------------------------------------------------------------------------------
    // Client -> server
    // ---------------------------------------------------------------------------------------------

    /// Handles a datagram (or stream frame) of `len` bytes at the body of `pkt`, from `tuple`.
    pub fn handle_client(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        pkt: &mut PacketBuf,
        len: usize,
        io: &mut dyn RelaySockets,
    ) -> Action {
        let len = len.min(MAX_PAYLOAD);
        let bytes = &pkt.buf[HEADROOM..HEADROOM + len];
        if channel::looks_like_channel_data(bytes) {
            return self.channel_data(now, tuple, bytes);
        }
        let Ok(msg) = StunMsg::parse(bytes) else {
            return Action::Drop(DropReason::Malformed);
        };
        match (msg.class(), msg.method()) {
            (Class::Request, _) => {
                bump(&self.stats.requests, 1);
                self.handle_request(now, tuple, &msg, io)
            }
            (Class::Indication, Method::SEND) => self.send_indication(now, tuple, &msg, bytes),
            // Binding indications are keep-alives (RFC 8489 §6.3.2): nothing to do.
            (Class::Indication, Method::BINDING) => Action::Done,
            _ => Action::Drop(DropReason::Unexpected),
        }
    }

    //= RFC 8656 §12.6: "If the ChannelData message is received on a channel that is not bound to any
    //= peer, then the message is silently discarded."
    fn channel_data(&mut self, now: Instant, tuple: FiveTuple, bytes: &[u8]) -> Action {
        let Ok(cd) = ChannelData::parse(bytes) else {
            return Action::Drop(DropReason::Malformed);
        };
        let Some(id) = self.table.find(&tuple) else {
            return Action::Drop(DropReason::NoAllocation);
        };
        let Some(alloc) = self.table.get_mut(id) else {
            return Action::Drop(DropReason::NoAllocation);
        };
        let Some(binding) = alloc.channel_by_number(cd.number).filter(|c| c.is_active(now)).copied() else {
            return Action::Drop(DropReason::NoChannel);
        };
        if !alloc.permits(binding.peer, now, |a| self.cluster.is_live_relay(a)) {
            return Action::Drop(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut alloc.bandwidth, &mut self.total_bandwidth, 0, cd.data.len(), now) {
            return Action::Drop(DropReason::OverBandwidth);
        }
        let key = relay_key(id.idx, alloc.half_for(binding.peer));
        bump(&self.stats.packets_to_peer, 1);
        bump(&self.stats.bytes_to_peer, cd.data.len() as u64);
        let start = HEADROOM + CHANNEL_HEADER_LEN;
        Action::ToPeer { idx: key, peer: binding.peer, range: start..start + cd.data.len() }
    }

    //= RFC 8656 §10.2: "the server MUST validate that the Send indication contains an XOR-PEER-ADDRESS
    //= attribute and a DATA attribute ... If there is no permission ... the server silently discards".
    fn send_indication(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>, bytes: &[u8]) -> Action {
        let Some(id) = self.table.find(&tuple) else {
            return Action::Drop(DropReason::NoAllocation);
        };
        let Some(alloc) = self.table.get_mut(id) else {
            return Action::Drop(DropReason::NoAllocation);
        };
        let mut peer = None;
        let mut data = None;
        for a in msg.attrs() {
            match a.typ {
                AttrType::XOR_PEER_ADDRESS if peer.is_none() => peer = Some(a.value),
                AttrType::DATA if data.is_none() => data = Some(a.value),
                t if t.comprehension_required() && !KNOWN.contains(&t) => {
                    return Action::Drop(DropReason::BadIndication);
                }
                _ => {}
            }
        }
        let (Some(peer), Some(data)) = (peer, data) else {
            return Action::Drop(DropReason::BadIndication);
        };
        let Ok(peer) = attr::decode_xor_addr(peer, &msg.transaction_id()) else {
            return Action::Drop(DropReason::BadIndication);
        };
        if !alloc.serves_family_of(peer.ip()) {
            return Action::Drop(DropReason::BadIndication);
        }
        let key = relay_key(id.idx, alloc.half_for(peer));
        if !alloc.permits(peer, now, |a| self.cluster.is_live_relay(a)) {
            return Action::Drop(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut alloc.bandwidth, &mut self.total_bandwidth, 0, data.len(), now) {
            return Action::Drop(DropReason::OverBandwidth);
        }
        bump(&self.stats.packets_to_peer, 1);
        bump(&self.stats.bytes_to_peer, data.len() as u64);
        let start = HEADROOM + offset_in(bytes, data);
        Action::ToPeer { idx: key, peer, range: start..start + data.len() }
    }

    fn handle_request(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        io: &mut dyn RelaySockets,
    ) -> Action {
        match msg.method() {
            Method::BINDING => {
                if self.over_source_limit(now, tuple) {
                    return Action::Drop(DropReason::SourceRateLimited);
                }
                self.binding(tuple, msg)
            }
            Method::ALLOCATE => self.allocate(now, tuple, msg, io),
            Method::REFRESH => self.refresh(now, tuple, msg, io),
            Method::CREATE_PERMISSION => self.create_permission(now, tuple, msg),
            Method::CHANNEL_BIND => self.channel_bind(now, tuple, msg),
            _ if self.over_source_limit(now, tuple) => Action::Drop(DropReason::SourceRateLimited),
            _ => self.error(msg, ErrorCode::BadRequest, None),
        }
    }

    fn error(&mut self, msg: &StunMsg<'_>, code: ErrorCode, key: Option<&PreparedKey>) -> Action {
        let with_reason = self.settings.reason_phrases;
        write_response(&mut self.out, &self.settings, msg, Class::Error, key, |w| w.add_error(code, with_reason))
    }

    /// 401 or 438 with a fresh NONCE and the REALM, and no MESSAGE-INTEGRITY.
    fn challenge(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>, code: ErrorCode) -> Action {
        let expiry = self.unix(now) + self.settings.nonce_lifetime.as_secs();
        let nonce = self.settings.nonce_key.mint(expiry, tuple.client.ip());
        let with_reason = self.settings.reason_phrases;
        let settings = &self.settings;
        write_response(&mut self.out, settings, msg, Class::Error, None, |w| {
            w.add_error(code, with_reason);
            w.add_bytes(AttrType::REALM, settings.credentials.realm().as_bytes());
            w.add_bytes(AttrType::NONCE, &nonce);
        })
    }

    //= RFC 8489 §9.2.4: "If the message does not contain a MESSAGE-INTEGRITY or a
    //= MESSAGE-INTEGRITY-SHA256 attribute, the server MUST generate an error response with an error
    //= code of 401 (Unauthenticated). ... If the message contains a MESSAGE-INTEGRITY ... but is missing
    //= USERNAME or USERHASH, REALM, or NONCE, the server MUST generate an error response with an error
    //= code of 400 (Bad Request). ... If the NONCE is no longer valid, ... 438 (Stale Nonce)."
    fn authenticate<'m>(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'m>,
    ) -> Result<Authenticated<'m>, Action> {
        let limited = |engine: &mut Self| {
            engine.over_source_limit(now, tuple).then_some(Action::Drop(DropReason::SourceRateLimited))
        };
        if msg.integrity_offset().is_none() {
            if let Some(drop) = limited(self) {
                return Err(drop);
            }
            let challenge = self.challenge(now, tuple, msg, ErrorCode::Unauthorized);
            // Clients refresh with the credentials they allocated with (libwebrtc, Firefox, pion), so an
            // unauthenticated Refresh smaller than its answer is a reflection probe: under a flood it
            // goes unanswered. First Allocates are answered whatever their size: real clients' are
            // smaller than any 401 (28 bytes from libwebrtc, 44 from Firefox).
            if msg.method() == Method::REFRESH
                && matches!(challenge, Action::Reply { len } if msg.bytes().len() < len)
                && self.cluster.unauthenticated_flood(now)
            {
                return Err(Action::Drop(DropReason::UnauthenticatedUnderFlood));
            }
            return Err(challenge);
        }
        let (Some(username), Some(realm), Some(nonce)) =
            (msg.attr(AttrType::USERNAME), msg.attr(AttrType::REALM), msg.attr(AttrType::NONCE))
        else {
            return Err(limited(self).unwrap_or_else(|| self.error(msg, ErrorCode::BadRequest, None)));
        };
        if username.len() > MAX_USERNAME || realm.len() > MAX_REALM_OR_NONCE || nonce.len() > MAX_REALM_OR_NONCE {
            return Err(limited(self).unwrap_or_else(|| self.error(msg, ErrorCode::BadRequest, None)));
        }
        let unix = self.unix(now);
        if self.settings.nonce_key.check(nonce, tuple.client.ip(), unix) == NonceCheck::Stale {
            bump(&self.stats.auth_failure_reasons[3], 1);
            return Err(limited(self).unwrap_or_else(|| self.challenge(now, tuple, msg, ErrorCode::StaleNonce)));
        }
        // Requests on an allocation (Refresh, CreatePermission, ChannelBind) by the username that made it
        // are checked with the key it authenticated with, unless a reload changed the credentials since:
        // the REST expiry is checked again, the key (HMAC-SHA1 and MD5) is not derived again.
        let existing = self.table.find(&tuple);
        let known = existing
            .and_then(|id| self.table.get(id))
            .filter(|a| a.key_generation == self.key_generation && a.username.as_bytes() == username)
            .map(|a| a.key.0);
        let credentials = &self.settings.credentials;
        let verdict = match known {
            Some(key) => credentials.verify_known(msg, username, unix, &key),
            None => credentials.verify(msg, username, unix),
        };
        let (reason, which) = match verdict {
            Verdict::Ok(key) => return Ok(Authenticated { key, username, existing }),
            Verdict::UnknownUser => ("unknown user", 0),
            Verdict::Expired => ("expired REST credential", 1),
            Verdict::BadIntegrity => ("wrong password or secret", 2),
        };
        bump(&self.stats.auth_failures, 1);
        bump(&self.stats.auth_failure_reasons[which], 1);
        let user = String::from_utf8_lossy(username);
        self.logs.log(
            LogKind::AuthFailure,
            log::Level::Info,
            now,
            format_args!("authentication failed ({reason}): user={user} client={tuple}"),
        );
        Err(limited(self).unwrap_or_else(|| self.challenge(now, tuple, msg, ErrorCode::Unauthorized)))
    }

    //= RFC 8489 §6.3.1: "If the request contains one or more unknown comprehension-required attributes,
    //= the server replies with an error response with an error code of 420 (Unknown Attribute) and
    //= includes an UNKNOWN-ATTRIBUTES attribute in the response that lists the unknown
    //= comprehension-required attributes."
    fn reject_unknown(&mut self, msg: &StunMsg<'_>, key: Option<&PreparedKey>) -> Option<Action> {
        let mut unknown = [0u16; MAX_UNKNOWN_LISTED];
        let mut n = 0;
        for a in msg.attrs() {
            let listed = unknown[..n].contains(&a.typ.0);
            if a.typ.comprehension_required() && !KNOWN.contains(&a.typ) && n < MAX_UNKNOWN_LISTED && !listed {
                unknown[n] = a.typ.0;
                n += 1;
            }
        }
        if n == 0 {
            return None;
        }
        let with_reason = self.settings.reason_phrases;
        Some(write_response(&mut self.out, &self.settings, msg, Class::Error, key, |w| {
            w.add_error(ErrorCode::UnknownAttribute, with_reason);
            w.add_unknown_attributes(&unknown[..n]);
        }))
    }

    fn binding(&mut self, tuple: FiveTuple, msg: &StunMsg<'_>) -> Action {
        if let Some(action) = self.reject_unknown(msg, None) {
            return action;
        }
        write_response(&mut self.out, &self.settings, msg, Class::Success, None, |w| {
            w.add_xor_addr(AttrType::XOR_MAPPED_ADDRESS, tuple.client);
        })
    }

    /// Authenticates, rejects unknown attributes, finds the 5-tuple's allocation and checks the username.
    fn authorize_on_allocation<'m>(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'m>,
    ) -> Result<(Authenticated<'m>, AllocId), Action> {
        let auth = self.authenticate(now, tuple, msg)?;
        if let Some(action) = self.reject_unknown(msg, Some(&auth.key)) {
            return Err(action);
        }
        let Some(id) = auth.existing else {
            return Err(self.error(msg, ErrorCode::AllocationMismatch, Some(&auth.key)));
        };
        //= RFC 8656 §5: "if the USERNAME ... does not match the username used to create the allocation,
        //= the request MUST be rejected with a 441 (Wrong Credentials) error."
        if self.table.get(id).is_some_and(|a| a.username.as_bytes() != auth.username) {
            return Err(self.error(msg, ErrorCode::WrongCredentials, Some(&auth.key)));
        }
        Ok((auth, id))
    }

    /// The lifetime RFC 8656 §7.2 and §8 prescribe for a requested LIFETIME.
    fn granted_lifetime(&self, requested: Option<u32>) -> Duration {
        let s = &self.settings;
        match requested {
            Some(secs) => Duration::from_secs(u64::from(secs)).min(s.max_lifetime).max(s.default_lifetime),
            None => s.default_lifetime,
        }
    }

    fn allocate(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>, io: &mut dyn RelaySockets) -> Action {
        //= RFC 8656 §7.2 (1): retransmitted Allocate requests get the same success response, which is
        //= why it is kept with the allocation.
        if let Some(alloc) = self.table.find(&tuple).and_then(|id| self.table.get(id)) {
            if alloc.allocate_tid == msg.transaction_id() {
                let cached = &alloc.allocate_response;
                let n = cached.len().min(self.out.len());
                self.out[..n].copy_from_slice(&cached[..n]);
                return Action::Reply { len: n };
            }
        }
        let auth = match self.authenticate(now, tuple, msg) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let key = auth.key;
        if let Some(action) = self.reject_unknown(msg, Some(&key)) {
            return action;
        }
        //= RFC 8656 §7.2 (2): "The server checks if the 5-tuple is currently in use by an existing
        //= allocation. If yes, the server rejects the request with a 437 (Allocation Mismatch) error."
        if auth.existing.is_some() {
            return self.error(msg, ErrorCode::AllocationMismatch, Some(&key));
        }
        //= RFC 8656 §7.2 (3): "If the REQUESTED-TRANSPORT attribute is not included or is malformed,
        //= the server rejects the request with a 400 (Bad Request) error. Otherwise, if the attribute
        //= indicates an unsupported transport protocol, the server rejects the request with a 442".
        let transport = msg.attr(AttrType::REQUESTED_TRANSPORT).map(attr::decode_requested_transport);
        match transport {
            None | Some(Err(_)) => return self.error(msg, ErrorCode::BadRequest, Some(&key)),
            Some(Ok(PROTO_UDP)) => {}
            Some(Ok(_)) => {
                return self.error(msg, ErrorCode::UnsupportedTransportProtocol, Some(&key));
            }
        }
        let even_port = match msg.attr(AttrType::EVEN_PORT).map(attr::decode_even_port) {
            None => None,
            Some(Ok(reserve)) => Some(reserve),
            Some(Err(_)) => return self.error(msg, ErrorCode::BadRequest, Some(&key)),
        };
        let token = match msg.attr(AttrType::RESERVATION_TOKEN).map(attr::decode_reservation_token) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(_)) => return self.error(msg, ErrorCode::BadRequest, Some(&key)),
        };
        let requested_family = msg.attr(AttrType::REQUESTED_ADDRESS_FAMILY).map(attr::decode_family);
        let additional_family = msg.attr(AttrType::ADDITIONAL_ADDRESS_FAMILY).map(attr::decode_family);
        //= RFC 8656 §7.2 (4)-(6): RESERVATION-TOKEN together with EVEN-PORT, REQUESTED-ADDRESS-FAMILY
        //= or ADDITIONAL-ADDRESS-FAMILY, and REQUESTED- with ADDITIONAL-ADDRESS-FAMILY, are 400.
        if (token.is_some() && (even_port.is_some() || requested_family.is_some() || additional_family.is_some()))
            || (requested_family.is_some() && additional_family.is_some())
        {
            return self.error(msg, ErrorCode::BadRequest, Some(&key));
        }
        let family = match requested_family {
            None => FAMILY_IPV4,
            Some(Ok(f @ (FAMILY_IPV4 | FAMILY_IPV6))) => f,
            Some(Ok(_)) => {
                return self.error(msg, ErrorCode::AddressFamilyNotSupported, Some(&key));
            }
            Some(Err(_)) => return self.error(msg, ErrorCode::BadRequest, Some(&key)),
        };
        //= RFC 8656 §7.2 (6): "If the server does not support the address family requested by the
        //= client in ADDITIONAL-ADDRESS-FAMILY, ... it MUST NOT fail the request ... includes an
        //= ADDRESS-ERROR-CODE attribute". IPv4 there is a 400.
        let dual = match additional_family {
            None => false,
            Some(Ok(FAMILY_IPV6)) => true,
            Some(_) => return self.error(msg, ErrorCode::BadRequest, Some(&key)),
        };
        // A RESERVATION-TOKEN names a port reserved on an IPv4 relay address (EVEN-PORT pairs).
        let family = if token.is_some() && self.settings.relay_v4.is_empty() { FAMILY_IPV6 } else { family };
        let Some(relay) = self.next_relay(family) else {
            return self.error(msg, ErrorCode::AddressFamilyNotSupported, Some(&key));
        };
        let quota_user: Box<[u8]> = self.settings.credentials.quota_user(auth.username).into();
        //= RFC 8656 §7.2 (7): a RESERVATION-TOKEN that names no valid reservation is 508.
        let claimed = match token {
            None => None,
            Some(token) => match self.cluster.claim_reservation(token, now) {
                Some(r) => Some((token, r)),
                None => return self.refuse_capacity(now, tuple, msg, &key, NoPort::Reservation),
            },
        };
        let reserve = even_port == Some(true);
        //= RFC 8656 §7.2 (10): "At any point, the server MAY choose to reject the request with a 486
        //= (Allocation Quota Reached) error if it feels the client is trying to exceed some locally
        //= defined allocation quota."
        if let Err(which) = self.charge_quota(&quota_user, claimed.as_ref().map(|(_, r)| r), reserve) {
            if let Some((token, r)) = claimed {
                // Still the holder's, until it lapses.
                self.cluster.hold_reservation(token, r);
            }
            bump(&self.stats.quota_refusals, 1);
            let which = match which {
                QuotaError::User => "user quota reached",
                QuotaError::Total => "total quota reached",
                QuotaError::Reservations => "the user holds allocations.user_reservations EVEN-PORT reservations",
            };
            let user = String::from_utf8_lossy(&quota_user).into_owned();
            self.logs.log(
                LogKind::Quota,
                log::Level::Info,
                now,
                format_args!("allocation refused: {which}, user={user} client={tuple}"),
            );
            return self.error(msg, ErrorCode::AllocationQuotaReached, Some(&key));
        }
        let claimed_port = claimed.map(|(_, r)| r.port);
        let idx = self.table.next_index();
        let (port, next) = match self.pick_port(relay.bind, claimed_port, even_port, relay_key(idx, 0), io) {
            Ok(picked) => picked,
            Err(why) => {
                self.refund_quota(&quota_user, reserve);
                return self.refuse_capacity(now, tuple, msg, &key, why);
            }
        };
        let reserved = next.map(|port| {
            let expires = now + RESERVATION_LIFETIME;
            (self.rng.next_u64().to_be_bytes(), Reservation { port, expires, holder: quota_user.clone() })
        });
        // The IPv6 half of a dual allocation, or the error code explaining why there is none.
        let mut second = None;
        let mut second_error = None;
        if dual {
            match self.next_relay(FAMILY_IPV6) {
                None => second_error = Some(ErrorCode::AddressFamilyNotSupported),
                Some(r6) => match self.pick_port(r6.bind, None, None, relay_key(idx, 1), io) {
                    Ok((p6, _)) => second = Some((SocketAddr::new(r6.advertised, p6), SocketAddr::new(r6.bind, p6))),
                    Err(why) => {
                        log::debug!("dual allocation without its IPv6 half: {why}, client={tuple}");
                        second_error = Some(ErrorCode::InsufficientCapacity);
                    }
                },
            }
        }
        let lifetime = self.granted_lifetime(msg.attr(AttrType::LIFETIME).and_then(|v| attr::decode_u32(v).ok()));
        let relayed = SocketAddr::new(relay.advertised, port);
        let bound = SocketAddr::new(relay.bind, port);
        let lifetime_secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let with_reason = self.settings.reason_phrases;
        let action = write_response(&mut self.out, &self.settings, msg, Class::Success, Some(&key), |w| {
            w.add_xor_addr(AttrType::XOR_RELAYED_ADDRESS, relayed);
            if let Some((relayed6, _)) = second {
                w.add_xor_addr(AttrType::XOR_RELAYED_ADDRESS, relayed6);
            }
            w.add_u32(AttrType::LIFETIME, lifetime_secs);
            if let Some((token, _)) = &reserved {
                w.add_bytes(AttrType::RESERVATION_TOKEN, token);
            }
            w.add_xor_addr(AttrType::XOR_MAPPED_ADDRESS, tuple.client);
            if let Some(code) = second_error {
                //= RFC 8656 §18.12: ADDRESS-ERROR-CODE is a family, a reserved byte, then as ERROR-CODE.
                let mut v = [0u8; 4 + 32];
                v[0] = FAMILY_IPV6;
                v[2] = (code.code() / 100) as u8;
                v[3] = (code.code() % 100) as u8;
                let reason: &[u8] = if with_reason { code.reason().as_bytes() } else { &[] };
                let n = reason.len().min(32);
                v[4..4 + n].copy_from_slice(&reason[..n]);
                w.add_bytes(AttrType::ADDRESS_ERROR_CODE, &v[..4 + n]);
            }
        });
        let Action::Reply { len } = action else {
            io.close(relay_key(idx, 0));
            self.ports.give_back(port);
            if let Some((_, bound6)) = second {
                io.close(relay_key(idx, 1));
                self.ports.give_back(bound6.port());
            }
            if let Some((_, r)) = reserved {
                self.ports.give_back(r.port);
                self.cluster.release_reservation(&r.holder);
            }
            self.cluster.release(&quota_user);
            return action;
        };
        if let Some((token, r)) = reserved {
            self.wheel.insert(r.expires, Timer::Reservation(token));
            self.cluster.hold_reservation(token, r);
        }
        let username: Box<str> = String::from_utf8_lossy(auth.username).into();
        let also = second.map(|(r6, _)| format!(" + {r6}")).unwrap_or_default();
        log::info!(
            "allocation created: user={username} client={tuple} relay={relayed}{also} bound={bound} lifetime={}s shard={}",
            lifetime.as_secs(),
            self.shard
        );
        let alloc = Allocation {
            five_tuple: tuple,
            relayed,
            bound,
            second,
            expires: now + lifetime,
            armed_at: now + lifetime,
            username,
            key: KeptKey(*key.raw()),
            key_generation: self.key_generation,
            quota_user: String::from_utf8_lossy(&quota_user).into(),
            permissions: Vec::new(),
            channels: Vec::new(),
            allocate_tid: msg.transaction_id(),
            allocate_response: self.out[..len].into(),
            bandwidth: (self.settings.max_bps > 0).then(|| [TokenBucket::for_bandwidth(self.settings.max_bps, now); 2]),
        };
        let id = self.table.insert(alloc);
        self.wheel.insert(now + lifetime, Timer::Allocation(id, now + lifetime));
        self.cluster.relay_opened(bound);
        if let Some((_, bound6)) = second {
            self.cluster.relay_opened(bound6);
        }
        bump(&self.stats.allocations_created, 1);
        set(&self.stats.allocations, self.table.len() as u64);
        bump(&self.stats.allocations_by_transport[transport_index(tuple.transport)], 1);
        Action::Reply { len }
    }

    /// The next relay address of `family`, round robin over the configured ones.
    fn next_relay(&mut self, family: u8) -> Option<RelayAddr> {
        let list = if family == FAMILY_IPV4 { &self.settings.relay_v4 } else { &self.settings.relay_v6 };
        if list.is_empty() {
            return None;
        }
        self.relay_turn = self.relay_turn.wrapping_add(1);
        Some(list[self.relay_turn % list.len()])
    }

    /// Counts the allocation against `user`'s quota and the total, and with `reserve` the port it
    /// reserves. An allocation that redeems its own user's reservation takes over the reservation's unit;
    /// one that redeems another user's is charged to its own user instead of the holder (the total
    /// does not change), and refused, the reservation still the holder's, when that user is at quota.
    fn charge_quota(&self, user: &[u8], redeemed: Option<&Reservation>, reserve: bool) -> Result<(), QuotaError> {
        let cluster = &*self.cluster;
        let s = &self.settings;
        let limits = QuotaLimits { user: s.user_quota, total: s.total_quota, user_reservations: s.user_reservations };
        let Some(r) = redeemed else {
            return cluster.acquire(user, limits, reserve);
        };
        if *r.holder == *user {
            cluster.redeem_reservation(&r.holder);
            return Ok(());
        }
        cluster.release_reservation(&r.holder);
        cluster.acquire(user, limits, reserve).inspect_err(|_| cluster.restore_reservation(&r.holder))
    }

    /// Undoes [`Engine::charge_quota`] for an Allocate that got no relay port.
    fn refund_quota(&self, user: &[u8], reserve: bool) {
        if reserve {
            self.cluster.release_reservation(user);
        }
        self.cluster.release(user);
    }

    /// Answers 508 for an Allocate that got no relay port, counted and logged (rate-limited).
    fn refuse_capacity(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        key: &PreparedKey,
        why: NoPort,
    ) -> Action {
        bump(&self.stats.capacity_refusals, 1);
        // Out of descriptors is the operator's to fix; the rest is load or a client's token.
        let level = if matches!(why, NoPort::Socket(_)) { log::Level::Warn } else { log::Level::Info };
        self.logs.log(LogKind::Capacity, level, now, format_args!("allocation refused (508): {why}, client={tuple}"));
        //= RFC 8656 §7.2 (7)/(8): an invalid RESERVATION-TOKEN, or no port available, is 508.
        self.error(msg, ErrorCode::InsufficientCapacity, Some(key))
    }

    /// Chooses and binds a relay port: the `claimed` reservation's port, or a spare socket's, or a free
    /// one. Returns the port and, for EVEN-PORT with R, the next port, now reserved.
    fn pick_port(
        &mut self,
        bind_ip: IpAddr,
        claimed: Option<u16>,
        even_port: Option<bool>,
        key: u32,
        io: &mut dyn RelaySockets,
    ) -> Result<(u16, Option<u16>), NoPort> {
        if let Some(port) = claimed {
            // The port may come from another shard's range; it joins this shard's pool when freed.
            return match io.open(key, SocketAddr::new(bind_ip, port)) {
                Ok(()) => Ok((port, None)),
                Err(_) => {
                    self.ports.give_back(port);
                    Err(NoPort::Reservation)
                }
            };
        }
        if even_port.is_none() {
            if let Some(spare) = self.spares.take(bind_ip, self.ports.is_empty(), &mut self.rng) {
                set(&self.stats.spare_relay_sockets, self.spares.len() as u64);
                match io.unpark(spare.id, key) {
                    Ok(()) => return Ok((spare.port, None)),
                    // The shard closed it: its port is free again; go on with a fresh one.
                    Err(_) => self.ports.give_back(spare.port),
                }
            }
        }
        for _ in 0..BIND_ATTEMPTS {
            let (port, next) = match even_port {
                Some(true) => self.ports.take_even_pair().map(|(p, n)| (p, Some(n))).ok_or(NoPort::RangeExhausted)?,
                Some(false) => (self.ports.take_even().ok_or(NoPort::RangeExhausted)?, None),
                None => (self.ports.take().ok_or(NoPort::RangeExhausted)?, None),
            };
            match io.open(key, SocketAddr::new(bind_ip, port)) {
                Ok(()) => return Ok((port, next)),
                Err(e) => {
                    // The reserved next port was not tried: back to the end of the pool.
                    if let Some(next) = next {
                        self.ports.give_back(next);
                    }
                    match e {
                        // A port in use elsewhere goes back to a random place in the pool; try another.
                        BindError::AddrInUse => self.ports.set_aside(port),
                        BindError::Failed(errno) => {
                            self.ports.give_back(port);
                            return Err(NoPort::Socket(errno));
                        }
                    }
                }
            }
        }
        Err(NoPort::AllBusy)
    }

    //= RFC 8656 §8: "If the 'desired lifetime' is zero, then the request succeeds and the allocation is
    //= deleted." A retransmitted Refresh(0) then finds no allocation and gets 437, which the RFC accepts.
    fn refresh(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>, io: &mut dyn RelaySockets) -> Action {
        let (auth, id) = match self.authorize_on_allocation(now, tuple, msg) {
            Ok(x) => x,
            Err(action) => return action,
        };
        let key = auth.key;
        let Some(alloc) = self.table.get(id) else {
            return self.error(msg, ErrorCode::AllocationMismatch, Some(&key));
        };
        //= RFC 8656 §8: a REQUESTED-ADDRESS-FAMILY that does not match a family of the allocation is 443.
        if let Some(fam) = msg.attr(AttrType::REQUESTED_ADDRESS_FAMILY) {
            let families = [Some(family_of(alloc.relayed.ip())), alloc.second.map(|(r, _)| family_of(r.ip()))];
            if !families.contains(&attr::decode_family(fam).ok()) {
                return self.error(msg, ErrorCode::PeerAddressFamilyMismatch, Some(&key));
            }
        }
        let requested = msg.attr(AttrType::LIFETIME).and_then(|v| attr::decode_u32(v).ok());
        let lifetime = if requested == Some(0) { Duration::ZERO } else { self.granted_lifetime(requested) };
        let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let action = write_response(&mut self.out, &self.settings, msg, Class::Success, Some(&key), |w| {
            w.add_u32(AttrType::LIFETIME, secs);
        });
        if lifetime.is_zero() {
            self.free(id, io, "deleted by client");
        } else if let Some(alloc) = self.table.get_mut(id) {
            alloc.expires = now + lifetime;
            // Extensions are picked up lazily when the armed timer fires; a shorter lifetime needs an
            // earlier timer (the later entry goes stale).
            if alloc.expires < alloc.armed_at {
                alloc.armed_at = alloc.expires;
                self.wheel.insert(alloc.expires, Timer::Allocation(id, alloc.expires));
            }
            // Debug, not info: a client may refresh as often as it likes, and each line would be logged.
            log::debug!(
                "allocation refreshed: user={} client={} relay={} lifetime={secs}s",
                alloc.username,
                tuple,
                alloc.relayed
            );
        }
        action
    }

    fn note_peer_denied(&mut self, now: Instant, tuple: FiveTuple, value: &[u8], tid: &TransactionId) {
        bump(&self.stats.peers_denied, 1);
        if let Ok(peer) = attr::decode_xor_addr(value, tid) {
            self.logs.log(
                LogKind::PeerDenied,
                log::Level::Info,
                now,
                format_args!("peer refused by policy: {peer} requested by {tuple}"),
            );
        }
    }

    fn create_permission(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>) -> Action {
        let (auth, id) = match self.authorize_on_allocation(now, tuple, msg) {
            Ok(x) => x,
            Err(action) => return action,
        };
        let key = auth.key;
        let tid = msg.transaction_id();
        let Some(alloc) = self.table.get(id) else {
            return self.error(msg, ErrorCode::AllocationMismatch, Some(&key));
        };
        //= RFC 8656 §9.2: "When the server receives the CreatePermission request, it processes as per
        //= Section 5 plus the specific rules mentioned here. The message is checked for validity. The
        //= CreatePermission request MUST contain at least one XOR-PEER-ADDRESS attribute and MAY contain
        //= multiple such attributes." All are checked before any is installed.
        let mut peers = 0usize;
        let mut new_ips = 0usize;
        for a in msg.attrs().filter(|a| a.typ == AttrType::XOR_PEER_ADDRESS) {
            match check_peer(&self.settings, &*self.cluster, alloc, a.value, &tid) {
                Ok((peer, _)) => {
                    peers += 1;
                    if !alloc.permissions.iter().any(|p| p.ip == peer.ip()) {
                        new_ips += 1;
                    }
                }
                Err(code) => {
                    if code == ErrorCode::Forbidden {
                        self.note_peer_denied(now, tuple, a.value, &tid);
                    }
                    return self.error(msg, code, Some(&key));
                }
            }
        }
        if peers == 0 {
            return self.error(msg, ErrorCode::BadRequest, Some(&key));
        }
        if alloc.permissions.len() + new_ips > self.settings.max_permissions {
            return self.error(msg, ErrorCode::InsufficientCapacity, Some(&key));
        }
        let max = self.settings.max_permissions;
        let expires = now + PERMISSION_LIFETIME;
        let mut created = 0u64;
        if let Some(alloc) = self.table.get_mut(id) {
            for a in msg.attrs().filter(|a| a.typ == AttrType::XOR_PEER_ADDRESS) {
                // Validated above; the scope is recomputed the same way.
                let Ok((peer, scope)) = check_peer(&self.settings, &*self.cluster, alloc, a.value, &tid) else {
                    continue;
                };
                {
                    if alloc.install_permission(peer.ip(), expires, max, scope) == PermissionChange::Created {
                        self.wheel.insert(expires, Timer::Permission(id, peer.ip()));
                        created += 1;
                    }
                }
            }
        }
        self.live_permissions += created;
        set(&self.stats.permissions, self.live_permissions);
        write_response(&mut self.out, &self.settings, msg, Class::Success, Some(&key), |_| {})
    }

    fn channel_bind(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>) -> Action {
        let (auth, id) = match self.authorize_on_allocation(now, tuple, msg) {
            Ok(x) => x,
            Err(action) => return action,
        };
        let key = auth.key;
        let Some(alloc) = self.table.get(id) else {
            return self.error(msg, ErrorCode::AllocationMismatch, Some(&key));
        };
        //= RFC 8656 §11.2: "The request contains both a CHANNEL-NUMBER and an XOR-PEER-ADDRESS
        //= attribute; The channel number is in the range 0x4000 through 0x4FFF (inclusive)" else 400.
        //  RFC 5766 allowed up to 0x7FFF and deployed clients still pick from there, so that range is
        //  accepted unless `legacy_channel_numbers` is off.
        let legacy = self.settings.legacy_channel_numbers;
        let number = match msg.attr(AttrType::CHANNEL_NUMBER).map(attr::decode_channel_number) {
            Some(Ok(n)) if ChannelNumber(n).is_valid() || (legacy && ChannelNumber(n).is_valid_legacy()) => {
                ChannelNumber(n)
            }
            other => {
                log::debug!("channel bind refused: client={tuple}: bad CHANNEL-NUMBER {other:?}");
                return self.error(msg, ErrorCode::BadRequest, Some(&key));
            }
        };
        let Some(peer_value) = msg.attr(AttrType::XOR_PEER_ADDRESS) else {
            return self.error(msg, ErrorCode::BadRequest, Some(&key));
        };
        let cluster = &*self.cluster;
        let (peer, scope) = match check_peer(&self.settings, cluster, alloc, peer_value, &msg.transaction_id()) {
            Ok(p) => p,
            Err(code) => {
                if code == ErrorCode::Forbidden {
                    self.note_peer_denied(now, tuple, peer_value, &msg.transaction_id());
                }
                return self.error(msg, code, Some(&key));
            }
        };
        //= RFC 8656 §11.2: "The channel number is not currently bound to a different transport address
        //= (same transport address is OK); The transport address is not currently bound to a different
        //= channel number." Bindings in their 5-minute cool-down still count as bound.
        let by_number = alloc.channel_by_number(number).map(|c| c.peer);
        let by_peer = alloc.channel_by_peer(peer).map(|c| c.number);
        if by_number.is_some_and(|p| p != peer) || by_peer.is_some_and(|n| n != number) {
            log::debug!(
                "channel bind refused: client={tuple} channel={:#06x} peer={peer}: bound to {by_number:?} / {by_peer:?}",
                number.0
            );
            return self.error(msg, ErrorCode::BadRequest, Some(&key));
        }
        let is_new = by_number.is_none();
        let needs_permission = !alloc.permissions.iter().any(|p| p.ip == peer.ip());
        if (is_new && alloc.channels.len() >= self.settings.max_channels)
            || (needs_permission && alloc.permissions.len() >= self.settings.max_permissions)
        {
            return self.error(msg, ErrorCode::InsufficientCapacity, Some(&key));
        }
        let max_permissions = self.settings.max_permissions;
        let channel_expires = now + CHANNEL_LIFETIME;
        let permission_expires = now + PERMISSION_LIFETIME;
        if let Some(alloc) = self.table.get_mut(id) {
            if is_new {
                alloc.channels.push(ChannelBinding { number, peer, expires: channel_expires });
                self.wheel.insert(channel_expires, Timer::Channel(id, number));
                self.live_channels += 1;
            } else if let Some(c) = alloc.channels.iter_mut().find(|c| c.number == number) {
                c.expires = channel_expires;
            }
            //= RFC 8656 §11.2: "the server installs or refreshes a permission for the IP address
            //= contained in the XOR-PEER-ADDRESS attribute".
            if alloc.install_permission(peer.ip(), permission_expires, max_permissions, scope)
                == PermissionChange::Created
            {
                self.wheel.insert(permission_expires, Timer::Permission(id, peer.ip()));
                self.live_permissions += 1;
            }
        }
        set(&self.stats.channels, self.live_channels);
        set(&self.stats.permissions, self.live_permissions);
        write_response(&mut self.out, &self.settings, msg, Class::Success, Some(&key), |_| {})
    }

    // ---------------------------------------------------------------------------------------------
    // Peer -> client
    // ---------------------------------------------------------------------------------------------

    /// Handles a datagram of `len` bytes at the body of `pkt`, received by relay socket `key` (see [`relay_key`]) from `peer`.
    pub fn handle_peer(&mut self, now: Instant, key: u32, peer: SocketAddr, pkt: &mut PacketBuf, len: usize) -> Action {
        let len = len.min(MAX_PAYLOAD);
        let Some(alloc) = self.table.by_index_mut(key / 2) else {
            return Action::Drop(DropReason::NoAllocation);
        };
        //= RFC 8656 §11.3: "the server ... looks for a permission ... If no permission exists, the UDP
        //= datagram is silently discarded."
        if !alloc.permits(peer, now, |a| self.cluster.is_live_relay(a)) {
            return Action::Drop(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut alloc.bandwidth, &mut self.total_bandwidth, 1, len, now) {
            return Action::Drop(DropReason::OverBandwidth);
        }
        let tuple = alloc.five_tuple;
        let channel = alloc.channel_by_peer(peer).filter(|c| c.is_active(now)).map(|c| c.number);
        let Ok(len16) = u16::try_from(len) else {
            return Action::Drop(DropReason::NoSpace);
        };
        let range = match channel {
            //= RFC 8656 §12.7: "If the relayed UDP datagram's source transport address is bound to a
            //= channel ... the server MUST send the application data to the client in a ChannelData
            //= message"; over TCP/TLS the frame is padded to a multiple of four (§12.5).
            Some(number) => {
                let start = HEADROOM - CHANNEL_HEADER_LEN;
                let mut header = [0u8; CHANNEL_HEADER_LEN];
                channel::write_header(&mut header, number, len16);
                pkt.buf[start..HEADROOM].copy_from_slice(&header);
                let end = if tuple.transport == crate::allocation::Transport::Udp {
                    HEADROOM + len
                } else {
                    pkt.buf[HEADROOM + len..HEADROOM + pad4(len)].fill(0);
                    HEADROOM + pad4(len)
                };
                start..end
            }
            None => match self.data_indication_header(pkt, peer, len) {
                Some(r) => r,
                None => return Action::Drop(DropReason::NoSpace),
            },
        };
        bump(&self.stats.packets_to_client, 1);
        bump(&self.stats.bytes_to_client, len as u64);
        Action::ToClient { tuple, range }
    }

    //= RFC 8656 §11.3: "Otherwise, the server MUST send a Data indication ... with an XOR-PEER-ADDRESS
    //= attribute ... and a DATA attribute containing the application data".
    fn data_indication_header(&mut self, pkt: &mut PacketBuf, peer: SocketAddr, len: usize) -> Option<Range<usize>> {
        let addr_len = attr::xor_addr_len(&peer);
        let header_len = HEADER_LEN + 4 + addr_len + 4;
        let body_len = 4 + addr_len + 4 + pad4(len);
        let body16 = u16::try_from(body_len).ok()?;
        let start = HEADROOM - header_len;
        let mut tid = TransactionId::default();
        tid.0[..8].copy_from_slice(&self.rng.next_u64().to_be_bytes());
        tid.0[8..].copy_from_slice(&(self.rng.next_u64() as u32).to_be_bytes());
        let h = &mut pkt.buf[start..HEADROOM];
        h[0..2].copy_from_slice(&stun::message_type(Method::DATA, Class::Indication).to_be_bytes());
        h[2..4].copy_from_slice(&body16.to_be_bytes());
        h[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        h[8..20].copy_from_slice(&tid.0);
        h[20..22].copy_from_slice(&AttrType::XOR_PEER_ADDRESS.0.to_be_bytes());
        h[22..24].copy_from_slice(&(addr_len as u16).to_be_bytes());
        attr::encode_xor_addr(&mut h[24..24 + addr_len], peer, &tid);
        let d = 24 + addr_len;
        h[d..d + 2].copy_from_slice(&AttrType::DATA.0.to_be_bytes());
        h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
        pkt.buf[HEADROOM + len..HEADROOM + pad4(len)].fill(0);
        Some(start..HEADROOM + pad4(len))
    }

    // ---------------------------------------------------------------------------------------------
    // Time
    // ---------------------------------------------------------------------------------------------

    /// Expires allocations, permissions, channels and reservations due at `now`: at most
    /// [`TIMER_BUDGET`] of them, oldest first; [`Engine::poll_timeout`] says when more are waiting.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut dyn RelaySockets) {
        let mut due = std::mem::take(&mut self.due);
        for timer in self.wheel.drain_due(now, &mut due, TIMER_BUDGET) {
            self.fire(now, timer, io);
        }
        self.due = due;
        self.sweep_stale_timers();
    }

    /// Timer entries pending, stale ones included.
    pub fn pending_timers(&self) -> usize {
        self.wheel.len()
    }

    /// Drops the timer entries of deleted allocations, permissions and channels, and allocation entries
    /// superseded by an earlier deadline, once they outnumber the live ones ([`TimerWheel::sweep_stale`]).
    fn sweep_stale_timers(&mut self) {
        // Live reservations are not counted; sweep_stale's second bound keeps them from sweeping often.
        let live = self.table.len() + (self.live_permissions + self.live_channels) as usize;
        let table = &self.table;
        let swept = self.wheel.sweep_stale(live, |timer| match *timer {
            Timer::Allocation(id, armed) => table.get(id).is_some_and(|a| a.armed_at == armed),
            Timer::Permission(id, ip) => table.get(id).is_some_and(|a| a.permissions.iter().any(|p| p.ip == ip)),
            Timer::Channel(id, number) => table.get(id).is_some_and(|a| a.channels.iter().any(|c| c.number == number)),
            Timer::Reservation(_) => true,
        });
        if swept > 0 {
            log::debug!("shard {}: swept {swept} stale timer entries", self.shard);
        }
    }

    fn fire(&mut self, now: Instant, timer: Timer, io: &mut dyn RelaySockets) {
        match timer {
            Timer::Allocation(id, armed) => {
                let Some(alloc) = self.table.get_mut(id) else {
                    return;
                };
                if alloc.armed_at != armed {
                    return;
                }
                if alloc.expires <= now {
                    self.free(id, io, "expired");
                } else {
                    alloc.armed_at = alloc.expires;
                    self.wheel.insert(alloc.expires, Timer::Allocation(id, alloc.expires));
                }
            }
            Timer::Permission(id, ip) => {
                let Some(alloc) = self.table.get_mut(id) else {
                    return;
                };
                let Some(pos) = alloc.permissions.iter().position(|p| p.ip == ip) else {
                    return;
                };
                let expires = alloc.permissions[pos].expires;
                if expires <= now {
                    alloc.permissions.swap_remove(pos);
                    self.live_permissions = self.live_permissions.saturating_sub(1);
                    set(&self.stats.permissions, self.live_permissions);
                } else {
                    self.wheel.insert(expires, timer);
                }
            }
            Timer::Channel(id, number) => {
                let Some(alloc) = self.table.get_mut(id) else {
                    return;
                };
                let Some(pos) = alloc.channels.iter().position(|c| c.number == number) else {
                    return;
                };
                let expires = alloc.channels[pos].expires;
                if expires + CHANNEL_COOLDOWN <= now {
                    alloc.channels.swap_remove(pos);
                    self.live_channels = self.live_channels.saturating_sub(1);
                    set(&self.stats.channels, self.live_channels);
                } else if expires <= now {
                    self.wheel.insert(expires + CHANNEL_COOLDOWN, timer);
                } else {
                    self.wheel.insert(expires, timer);
                }
            }
            Timer::Reservation(token) => {
                // Still unclaimed (by any shard): the port returns to this shard's pool.
                if let Some(r) = self.cluster.lapse_reservation(token, now) {
                    self.ports.give_back(r.port);
                    self.cluster.release_reservation(&r.holder);
                }
            }
        }
    }

    /// The client's TCP/TLS connection closed: its allocation goes with it (RFC 8656 §3.1).
    pub fn client_closed(&mut self, tuple: FiveTuple, io: &mut dyn RelaySockets) {
        if let Some(id) = self.table.find(&tuple) {
            self.free(id, io, "connection closed");
        }
    }

    fn free(&mut self, id: AllocId, io: &mut dyn RelaySockets, why: &str) {
        let Some(alloc) = self.table.remove(id) else {
            return;
        };
        self.retire_socket(relay_key(id.idx, 0), alloc.bound, io);
        if let Some((_, bound6)) = alloc.second {
            self.retire_socket(relay_key(id.idx, 1), bound6, io);
        }
        io.allocation_freed(alloc.five_tuple);
        self.cluster.relay_closed(alloc.bound);
        if let Some((_, bound6)) = alloc.second {
            self.cluster.relay_closed(bound6);
        }
        self.cluster.release(alloc.quota_user.as_bytes());
        self.live_permissions = self.live_permissions.saturating_sub(alloc.permissions.len() as u64);
        self.live_channels = self.live_channels.saturating_sub(alloc.channels.len() as u64);
        set(&self.stats.permissions, self.live_permissions);
        set(&self.stats.channels, self.live_channels);
        set(&self.stats.allocations, self.table.len() as u64);
        bump_down(&self.stats.allocations_by_transport[transport_index(alloc.five_tuple.transport)]);
        log::info!(
            "allocation deleted ({why}): user={} client={} relay={}",
            alloc.username,
            alloc.five_tuple,
            alloc.relayed
        );
    }

    /// Parks the relay socket of `key`, bound to `bound`, for a later allocation, or closes it and frees
    /// its port when the spare pool is full.
    fn retire_socket(&mut self, key: u32, bound: SocketAddr, io: &mut dyn RelaySockets) {
        if self.spares.has_room() {
            if let Some(id) = io.park(key) {
                self.spares.put(Spare { id, ip: bound.ip(), port: bound.port() });
                set(&self.stats.spare_relay_sockets, self.spares.len() as u64);
                return;
            }
        } else {
            io.close(key);
        }
        self.ports.give_back(bound.port());
    }

    /// Deletes every allocation (shutdown).
    pub fn close_all(&mut self, io: &mut dyn RelaySockets) {
        let ids: Vec<AllocId> = self.table.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.free(id, io, "server shutting down");
        }
    }
}

#[cfg(test)]
mod tests;
