//! The TURN server state machine of one shard (RFC 8656 over RFC 8489), sans-IO.
//!
//! The shard feeds it datagrams from clients ([`Engine::handle_client`]) and from peers
//! ([`Engine::handle_peer`]) together with `now`, and performs the returned [`Action`]. Relay sockets are
//! opened and closed through [`RelaySockets`], which the shard implements with real sockets and tests
//! implement with a fake. Expiry runs off a timer wheel ([`Engine::handle_timeout`]).
//!
//! The data path (ChannelData, Send indications, peer datagrams) does no heap allocation: payloads stay
//! where they were received and headers are written into the [`PacketBuf`] headroom in front of them.

mod allocate;
mod auth;
mod lifetime;
mod offload;
mod permission;
mod relay;
mod sessions;

pub use offload::OffloadChannel;

pub use lifetime::TIMER_BUDGET;
pub use sessions::{Selector, Session, session_id};

use crate::allocation::FiveTuple;
use crate::allocation::RelayKey;
use crate::attr::{AttrType, FAMILY_IPV4, FAMILY_IPV6};
use crate::auth::{CredentialStore, NonceKey};
use crate::channel::{self};
use crate::cluster::Cluster;
use crate::error::{DropReason, ErrorCode};
use crate::integrity::PreparedKey;
use crate::policy::PeerPolicy;
use crate::policy::rate::{LogLimiter, TokenBucket};
use crate::ports::PortPool;
use crate::rng::{Unpredictable, XorShift};
use crate::spares::SparePool;
use crate::stats::{EngineCounters, bump, set};
use crate::stun::{Class, Method, MsgWriter, StunMsg};
use crate::table::AllocTable;
use crate::timer::TimerWheel;
use lifetime::Timer;
use permission::{permission_scope, reach};
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
pub(crate) const TAILROOM: usize = 16;
/// Size of the response buffer; every response the engine writes fits.
const OUT_LEN: usize = 1_500;
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

impl Settings {
    /// Settings for `credentials`, relaying from `relay_v4` and `relay_v6`, everything else at
    /// turnpike's defaults: nonces and allocations of 10 minutes (at most an hour on request), 64
    /// permissions and 64 channels per allocation, the default peer policy (private, loopback and
    /// reserved peers refused), 20 unauthenticated answers per second per source (bursts of 40), two
    /// EVEN-PORT reservations per user, no quotas, no bandwidth limits, channel numbers up to 0x7FFF
    /// (RFC 5766's range, which older clients use).
    pub fn new(
        credentials: CredentialStore,
        nonce_key: NonceKey,
        relay_v4: Vec<RelayAddr>,
        relay_v6: Vec<RelayAddr>,
    ) -> Self {
        Self {
            credentials,
            nonce_key,
            nonce_lifetime: Duration::from_secs(600),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_permissions: 64,
            max_channels: 64,
            peer_policy: PeerPolicy::new(Vec::new(), Vec::new(), true, false),
            user_quota: 0,
            total_quota: 0,
            user_reservations: 2,
            max_bps: 0,
            shard_total_bps: 0,
            unauth_rate: 20,
            unauth_burst: 40,
            software: None,
            reason_phrases: false,
            legacy_channel_numbers: true,
            relay_v4,
            relay_v6,
        }
    }
}

/// Why a relay socket could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindError {
    /// The port is taken (by another process): try another.
    AddrInUse,
    /// Anything else (out of descriptors, ...), with the OS error number (0 if none).
    Failed(i32),
}

/// The I/O layer's side of relay socket management.
pub trait RelaySockets {
    /// Opens the relay socket `key`, bound to `addr`.
    fn open(&mut self, key: RelayKey, addr: SocketAddr) -> Result<(), BindError>;
    /// Closes the relay socket `key`.
    fn close(&mut self, key: RelayKey);
    /// Takes the relay socket `key` out of service but keeps it open, bound and drained, for a later
    /// allocation (the `spares` module: ports of deleted allocations reused without a new bind). Returns its id among the parked sockets, or `None` when it
    /// was closed instead (the default: an implementation that does not park).
    fn park(&mut self, key: RelayKey) -> Option<u32> {
        self.close(key);
        None
    }
    /// Puts parked socket `spare` in service as the relay socket `key`. On an error the parked socket
    /// is closed.
    fn unpark(&mut self, _spare: u32, _key: RelayKey) -> Result<(), BindError> {
        Err(BindError::Failed(0))
    }
    /// An allocation was deleted; for TCP/TLS clients the connection goes with it (RFC 8656 §7).
    fn allocation_freed(&mut self, _tuple: FiveTuple) {}
    /// Allocation slot `slot` is being deleted: the host stops relaying its channels outside the
    /// engine now and returns what it relayed for it since its last [`Engine::credit_offloaded`]
    /// ([to peer, to client]); nothing by default (no offloading).
    fn offload_ended(&mut self, _slot: u32) -> [crate::allocation::Traffic; 2] {
        [crate::allocation::Traffic::default(); 2]
    }
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
    /// Send `range` of the packet buffer from relay socket `key` to `peer`.
    ToPeer {
        /// The relay socket.
        key: RelayKey,
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

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
}

/// The TURN server state machine of one shard.
pub struct Engine {
    shard: u16,
    settings: Arc<Settings>,
    cluster: Arc<dyn Cluster>,
    stats: Arc<EngineCounters>,
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
    /// Relay port choice among spares, reservation tokens.
    unpredictable: Unpredictable,
    /// Data indication transaction IDs.
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
    /// Allocation slots whose offloadable channels may have changed; `None` while offloading is off
    /// (see the `offload` module).
    offload_dirty: Option<Vec<u32>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shard", &self.shard).field("allocations", &self.table.len()).finish()
    }
}

impl Engine {
    /// A shard's engine. `origin`/`origin_unix` tie the monotonic clock to unix time (REST expiries,
    /// nonces); `seed`, 32 bytes from the operating system's generator, keys the choice of relay ports
    /// and reservation tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: u16,
        settings: Arc<Settings>,
        cluster: Arc<dyn Cluster>,
        stats: Arc<EngineCounters>,
        ports: impl IntoIterator<Item = u16>,
        origin: Instant,
        origin_unix: u64,
        seed: &[u8; 32],
    ) -> Self {
        let ports = PortPool::new(ports, seed);
        let mut unpredictable = Unpredictable::new(seed, "engine");
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
            rng: XorShift::new(unpredictable.next_u64()),
            unpredictable,
            live_permissions: 0,
            live_channels: 0,
            total_bandwidth: (settings.shard_total_bps > 0)
                .then(|| [TokenBucket::for_bandwidth(settings.shard_total_bps, origin); 2]),
            logs: LogLimiter::default(),
            relay_turn: 0,
            key_generation: 0,
            offload_dirty: None,
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
        self.offload_touch_all();
    }

    /// The allocation table (read-only, for tests).
    #[cfg(test)]
    pub(crate) fn table(&self) -> &AllocTable {
        &self.table
    }

    /// Whether `tuple` has an allocation on this shard.
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.table.find(tuple).is_some()
    }

    /// How many allocations this shard holds.
    pub fn allocation_count(&self) -> usize {
        self.table.len()
    }

    /// Free relay ports left on this shard.
    #[cfg(test)]
    pub(crate) fn free_ports(&self) -> usize {
        self.ports.len()
    }

    /// Relay sockets of deleted allocations kept open for the next ones (their ports are not free).
    #[cfg(test)]
    pub(crate) fn spare_sockets(&self) -> usize {
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

    /// When [`Engine::handle_timeout`] next has work (in the past while fired timers wait their turn).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.due.is_empty() { self.wheel.next_deadline() } else { Some(self.origin) }
    }

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
}

#[cfg(test)]
mod tests;
