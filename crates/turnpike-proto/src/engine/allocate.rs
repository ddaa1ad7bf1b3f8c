//! Allocate (RFC 8656 §7): quotas and reservations, relay port and socket, the response, the new
//! allocation.

use super::BindError;
use super::lifetime::Timer;
use super::{Action, Engine, RelayAddr, RelaySockets, write_response};
use crate::allocation::{Allocation, FiveTuple, Half, RelayKey, Relayed, Traffic};
use crate::attr::{self, AttrType, FAMILY_IPV4, FAMILY_IPV6, PROTO_UDP};
use crate::cluster::{Admission, QuotaError, QuotaLimits, Reservation};
use crate::error::ErrorCode;
use crate::integrity::{KeptKey, PreparedKey};
use crate::policy::rate::{LogKind, TokenBucket};
use crate::stats::{bump, set};
use crate::stun::{Class, StunMsg};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long a RESERVATION-TOKEN holds its port (RFC 8656 §7.2 suggests about 30 seconds).
pub(super) const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How many busy ports an Allocate skips before giving up with 508.
pub(super) const BIND_ATTEMPTS: usize = 16;
/// Why an Allocate got no relay port (each answered with 508).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoPort {
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

/// What an Allocate asks for, once its attributes are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AllocateRequest {
    /// The family of the relayed address (REQUESTED-ADDRESS-FAMILY, else IPv4).
    family: u8,
    /// Also an IPv6 relayed address (ADDITIONAL-ADDRESS-FAMILY).
    dual: bool,
    /// EVEN-PORT, with its R bit.
    even_port: Option<bool>,
    /// RESERVATION-TOKEN.
    token: Option<[u8; 8]>,
    /// LIFETIME.
    lifetime: Option<u32>,
}

impl AllocateRequest {
    /// Whether the next port is to be reserved (EVEN-PORT with R).
    fn reserve(&self) -> bool {
        self.even_port == Some(true)
    }
}

/// Checks an Allocate's attributes (RFC 8656 §7.2 (3)-(6)); `no_ipv4`: the server relays no IPv4.
pub(super) fn parse_allocate(msg: &StunMsg<'_>, no_ipv4: bool) -> Result<AllocateRequest, ErrorCode> {
    //= RFC 8656 §7.2 (3): "If the REQUESTED-TRANSPORT attribute is not included or is malformed,
    //= the server rejects the request with a 400 (Bad Request) error. Otherwise, if the attribute
    //= indicates an unsupported transport protocol, the server rejects the request with a 442".
    match msg.attr(AttrType::REQUESTED_TRANSPORT).map(attr::decode_requested_transport) {
        None | Some(Err(_)) => return Err(ErrorCode::BadRequest),
        Some(Ok(PROTO_UDP)) => {}
        Some(Ok(_)) => return Err(ErrorCode::UnsupportedTransportProtocol),
    }
    let even_port = msg.attr(AttrType::EVEN_PORT).map(attr::decode_even_port).transpose();
    let token = msg.attr(AttrType::RESERVATION_TOKEN).map(attr::decode_reservation_token).transpose();
    let (Ok(even_port), Ok(token)) = (even_port, token) else {
        return Err(ErrorCode::BadRequest);
    };
    let requested_family = msg.attr(AttrType::REQUESTED_ADDRESS_FAMILY).map(attr::decode_family);
    let additional_family = msg.attr(AttrType::ADDITIONAL_ADDRESS_FAMILY).map(attr::decode_family);
    //= RFC 8656 §7.2 (4)-(6): RESERVATION-TOKEN together with EVEN-PORT, REQUESTED-ADDRESS-FAMILY
    //= or ADDITIONAL-ADDRESS-FAMILY, and REQUESTED- with ADDITIONAL-ADDRESS-FAMILY, are 400.
    if (token.is_some() && (even_port.is_some() || requested_family.is_some() || additional_family.is_some()))
        || (requested_family.is_some() && additional_family.is_some())
    {
        return Err(ErrorCode::BadRequest);
    }
    let family = match requested_family {
        None => FAMILY_IPV4,
        Some(Ok(f @ (FAMILY_IPV4 | FAMILY_IPV6))) => f,
        Some(Ok(_)) => return Err(ErrorCode::AddressFamilyNotSupported),
        Some(Err(_)) => return Err(ErrorCode::BadRequest),
    };
    // ADDITIONAL-ADDRESS-FAMILY can only add IPv6; IPv4 there is a 400.
    let dual = match additional_family {
        None => false,
        Some(Ok(FAMILY_IPV6)) => true,
        Some(_) => return Err(ErrorCode::BadRequest),
    };
    // A RESERVATION-TOKEN names a port reserved on an IPv4 relay address (EVEN-PORT pairs).
    let family = if token.is_some() && no_ipv4 { FAMILY_IPV6 } else { family };
    let lifetime = msg.attr(AttrType::LIFETIME).and_then(|v| attr::decode_u32(v).ok());
    Ok(AllocateRequest { family, dual, even_port, token, lifetime })
}

/// The relay sockets an Allocate opened.
#[derive(Debug)]
struct Relays {
    /// The relayed address.
    relayed: Relayed,
    /// The IPv6 half of a dual allocation.
    second: Option<Relayed>,
    /// Why a dual allocation has no IPv6 half.
    second_error: Option<ErrorCode>,
    /// The port reserved for EVEN-PORT with R, and its token.
    reserved: Option<([u8; 8], Reservation)>,
}

/// What a new allocation is made of, besides the request.
struct Installed {
    username: Box<str>,
    key: KeptKey,
    quota_user: Box<[u8]>,
    relays: Relays,
    lifetime: Duration,
    /// The length of its success response in the engine's reply buffer.
    len: usize,
}

impl Engine {
    /// The lifetime RFC 8656 §7.2 and §8 prescribe for a requested LIFETIME.
    pub(super) fn granted_lifetime(&self, requested: Option<u32>) -> Duration {
        let s = &self.settings;
        match requested {
            Some(secs) => Duration::from_secs(u64::from(secs)).min(s.max_lifetime).max(s.default_lifetime),
            None => s.default_lifetime,
        }
    }

    pub(super) fn allocate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        io: &mut dyn RelaySockets,
    ) -> Action {
        if let Some(replay) = self.replay_allocate(tuple, msg) {
            return replay;
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
        let req = match parse_allocate(msg, self.settings.relay_v4.is_empty()) {
            Ok(req) => req,
            Err(code) => return self.error(msg, code, Some(&key)),
        };
        let Some(relay) = self.next_relay(req.family) else {
            return self.error(msg, ErrorCode::AddressFamilyNotSupported, Some(&key));
        };
        let quota_user: Box<[u8]> = self.settings.credentials.quota_user(auth.username).into();
        if let Some(refusal) = self.operator_refusal(now, tuple, msg, &key, &quota_user, true) {
            return refusal;
        }
        let claimed = match self.admit(now, tuple, msg, &key, &quota_user, &req) {
            Ok(claimed) => claimed,
            Err(refusal) => return refusal,
        };
        let idx = self.table.next_index();
        let relays = match self.open_relays(now, tuple, idx, relay, &req, claimed, &quota_user, io) {
            Ok(relays) => relays,
            Err(why) => {
                self.refund_quota(&quota_user, req.reserve());
                return self.refuse_capacity(now, tuple, msg, &key, why);
            }
        };
        let lifetime = self.granted_lifetime(req.lifetime);
        let action = self.write_allocated(msg, &key, tuple, &relays, lifetime);
        let Action::Reply { len } = action else {
            self.close_relays(idx, relays, &quota_user, io);
            return action;
        };
        let username: Box<str> = String::from_utf8_lossy(auth.username).into();
        self.install(
            now,
            tuple,
            msg,
            Installed { username, key: KeptKey(*key.raw()), quota_user, relays, lifetime, len },
        );
        Action::Reply { len }
    }

    /// What an operator decided for this request, if it is refused: `user` revoked (403), or, for a new
    /// allocation (`allocating`), the node draining (300 with ALTERNATE-SERVER, or 486 with nowhere to
    /// send the client).
    pub(super) fn operator_refusal(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        key: &PreparedKey,
        user: &[u8],
        allocating: bool,
    ) -> Option<Action> {
        if self.cluster.revoked(user, self.unix(now)) {
            let user = String::from_utf8_lossy(user).into_owned();
            let message = format_args!("request refused: user={user} is revoked, client={tuple}");
            self.logs.log(LogKind::Quota, log::Level::Info, now, message);
            bump(&self.stats.revoked_refusals, 1);
            return Some(self.error(msg, ErrorCode::Forbidden, Some(key)));
        }
        if !allocating {
            return None;
        }
        match self.cluster.admission() {
            Admission::Open => None,
            //= RFC 8489 §10: a 300 (Try Alternate) error response carries ALTERNATE-SERVER, the server
            //= the client should contact instead.
            Admission::Redirect(alternate) => {
                bump(&self.stats.drain_redirects, 1);
                let with_reason = self.settings.reason_phrases;
                Some(write_response(&mut self.out, &self.settings, msg, Class::Error, Some(key), |w| {
                    w.add_error(ErrorCode::TryAlternate, with_reason);
                    w.add_plain_addr(AttrType::ALTERNATE_SERVER, alternate);
                }))
            }
            Admission::Closed => {
                bump(&self.stats.drain_redirects, 1);
                Some(self.error(msg, ErrorCode::AllocationQuotaReached, Some(key)))
            }
        }
    }

    /// The answer to a retransmitted Allocate: the same success response (RFC 8656 §7.2 (1)), kept with
    /// the allocation for that.
    fn replay_allocate(&mut self, tuple: FiveTuple, msg: &StunMsg<'_>) -> Option<Action> {
        let alloc = self.table.find(&tuple).and_then(|id| self.table.get(id))?;
        if alloc.allocate_tid != msg.transaction_id() {
            return None;
        }
        let cached = &alloc.allocate_response;
        let n = cached.len().min(self.out.len());
        self.out[..n].copy_from_slice(&cached[..n]);
        Some(Action::Reply { len: n })
    }

    /// Claims the RESERVATION-TOKEN, if any (508 when it names no valid reservation), and charges the
    /// quotas (486). Returns the claimed reservation's token and reservation.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        key: &PreparedKey,
        quota_user: &[u8],
        req: &AllocateRequest,
    ) -> Result<Option<([u8; 8], Reservation)>, Action> {
        //= RFC 8656 §7.2 (7): a RESERVATION-TOKEN that names no valid reservation is 508.
        let claimed = match req.token {
            None => None,
            Some(token) => match self.cluster.claim_reservation(token, now) {
                Some(r) => Some((token, r)),
                None => return Err(self.refuse_capacity(now, tuple, msg, key, NoPort::Reservation)),
            },
        };
        //= RFC 8656 §7.2 (10): "At any point, the server MAY choose to reject the request with a 486
        //= (Allocation Quota Reached) error if it feels the client is trying to exceed some locally
        //= defined allocation quota."
        let Err(which) = self.charge_quota(quota_user, claimed.as_ref().map(|(_, r)| r), req.reserve()) else {
            return Ok(claimed);
        };
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
        let user = String::from_utf8_lossy(quota_user).into_owned();
        let message = format_args!("allocation refused: {which}, user={user} client={tuple}");
        self.logs.log(LogKind::Quota, log::Level::Info, now, message);
        Err(self.error(msg, ErrorCode::AllocationQuotaReached, Some(key)))
    }

    /// Opens the relay socket of slot `idx` on `relay` (the claimed reservation's port, a spare or a free
    /// one), reserves the next port for EVEN-PORT with R, and opens the IPv6 half of a dual allocation.
    #[allow(clippy::too_many_arguments)]
    fn open_relays(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        idx: u32,
        relay: RelayAddr,
        req: &AllocateRequest,
        claimed: Option<([u8; 8], Reservation)>,
        quota_user: &[u8],
        io: &mut dyn RelaySockets,
    ) -> Result<Relays, NoPort> {
        let claimed_port = claimed.map(|(_, r)| r.port);
        let key = RelayKey::new(idx, Half::Primary);
        let (port, next) = self.pick_port(relay.bind, claimed_port, req.even_port, key, io)?;
        let reserved = next.map(|port| {
            let expires = now + RESERVATION_LIFETIME;
            (self.unpredictable.next_u64().to_be_bytes(), Reservation { port, expires, holder: quota_user.into() })
        });
        let mut relays = Relays {
            relayed: Relayed {
                advertised: SocketAddr::new(relay.advertised, port),
                bound: SocketAddr::new(relay.bind, port),
            },
            second: None,
            second_error: None,
            reserved,
        };
        //= RFC 8656 §7.2 (6): "If the server does not support the address family requested by the
        //= client in ADDITIONAL-ADDRESS-FAMILY, ... it MUST NOT fail the request ... includes an
        //= ADDRESS-ERROR-CODE attribute".
        if req.dual {
            match self.next_relay(FAMILY_IPV6) {
                None => relays.second_error = Some(ErrorCode::AddressFamilyNotSupported),
                Some(r6) => match self.pick_port(r6.bind, None, None, RelayKey::new(idx, Half::Ipv6), io) {
                    Ok((p6, _)) => {
                        let (advertised, bound) = (SocketAddr::new(r6.advertised, p6), SocketAddr::new(r6.bind, p6));
                        relays.second = Some(Relayed { advertised, bound });
                    }
                    Err(why) => {
                        log::debug!("dual allocation without its IPv6 half: {why}, client={tuple}");
                        relays.second_error = Some(ErrorCode::InsufficientCapacity);
                    }
                },
            }
        }
        Ok(relays)
    }

    /// The success response: relayed addresses, lifetime, reservation token, mapped address, and the
    /// reason a dual allocation lacks its IPv6 half.
    fn write_allocated(
        &mut self,
        msg: &StunMsg<'_>,
        key: &PreparedKey,
        tuple: FiveTuple,
        relays: &Relays,
        lifetime: Duration,
    ) -> Action {
        let lifetime_secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let with_reason = self.settings.reason_phrases;
        write_response(&mut self.out, &self.settings, msg, Class::Success, Some(key), |w| {
            w.add_xor_addr(AttrType::XOR_RELAYED_ADDRESS, relays.relayed.advertised);
            if let Some(second) = relays.second {
                w.add_xor_addr(AttrType::XOR_RELAYED_ADDRESS, second.advertised);
            }
            w.add_u32(AttrType::LIFETIME, lifetime_secs);
            if let Some((token, _)) = &relays.reserved {
                w.add_bytes(AttrType::RESERVATION_TOKEN, token);
            }
            w.add_xor_addr(AttrType::XOR_MAPPED_ADDRESS, tuple.client);
            if let Some(code) = relays.second_error {
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
        })
    }

    /// Undoes [`Engine::open_relays`] and the quota charge for an allocation whose response could not
    /// be written.
    fn close_relays(&mut self, idx: u32, relays: Relays, quota_user: &[u8], io: &mut dyn RelaySockets) {
        io.close(RelayKey::new(idx, Half::Primary));
        self.ports.give_back(relays.relayed.bound.port());
        if let Some(second) = relays.second {
            io.close(RelayKey::new(idx, Half::Ipv6));
            self.ports.give_back(second.bound.port());
        }
        if let Some((_, r)) = relays.reserved {
            self.ports.give_back(r.port);
            self.cluster.release_reservation(&r.holder);
        }
        self.cluster.release(quota_user);
    }

    /// Records the new allocation, its expiry and its reservation, and tells the cluster its relayed
    /// addresses are live.
    fn install(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>, new: Installed) {
        let Installed { username, key, quota_user, relays, lifetime, len } = new;
        let Relays { relayed, second, reserved, .. } = relays;
        if let Some((token, r)) = reserved {
            self.wheel.insert(r.expires, Timer::Reservation(token));
            self.cluster.hold_reservation(token, r);
        }
        let also = second.map(|r6| format!(" + {}", r6.advertised)).unwrap_or_default();
        let (advertised, bound) = (relayed.advertised, relayed.bound);
        log::info!(
            "allocation created: user={username} client={tuple} relay={advertised}{also} bound={bound} lifetime={}s shard={}",
            lifetime.as_secs(),
            self.shard
        );
        let alloc = Allocation {
            five_tuple: tuple,
            created: now,
            traffic: [Traffic::default(); 2],
            relayed,
            second,
            expires: now + lifetime,
            armed_at: now + lifetime,
            username,
            key,
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
        self.cluster.relay_opened(relayed.bound);
        if let Some(second) = second {
            self.cluster.relay_opened(second.bound);
        }
        bump(&self.stats.allocations_created, 1);
        bump(&self.stats.allocations[tuple.transport.index()], 1);
    }

    /// The next relay address of `family`, round robin over the configured ones.
    pub(super) fn next_relay(&mut self, family: u8) -> Option<RelayAddr> {
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
    pub(super) fn charge_quota(
        &self,
        user: &[u8],
        redeemed: Option<&Reservation>,
        reserve: bool,
    ) -> Result<(), QuotaError> {
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
    pub(super) fn refund_quota(&self, user: &[u8], reserve: bool) {
        if reserve {
            self.cluster.release_reservation(user);
        }
        self.cluster.release(user);
    }

    /// Answers 508 for an Allocate that got no relay port, counted and logged (rate-limited).
    pub(super) fn refuse_capacity(
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
    pub(super) fn pick_port(
        &mut self,
        bind_ip: IpAddr,
        claimed: Option<u16>,
        even_port: Option<bool>,
        key: RelayKey,
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
        if even_port.is_none()
            && let Some(spare) = self.spares.take(bind_ip, self.ports.is_empty(), &mut self.unpredictable)
        {
            set(&self.stats.spare_relay_sockets, self.spares.len() as u64);
            match io.unpark(spare.id, key) {
                Ok(()) => return Ok((spare.port, None)),
                // The shard closed it: its port is free again; go on with a fresh one.
                Err(_) => self.ports.give_back(spare.port),
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
}
