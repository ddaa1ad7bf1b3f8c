//! Allocation state (RFC 8656 §2.2): the 5-tuple, the relayed address, permissions and channel bindings.

use crate::channel::ChannelNumber;
use crate::policy::rate::TokenBucket;
use crate::stun::TransactionId;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Permission lifetime (RFC 8656 §9: "The Permission Lifetime MUST be 300 seconds").
pub(crate) const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 §12: "a channel binding lasts for 10 minutes").
pub(crate) const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a binding expires, its number and peer stay reserved this long (RFC 8656 §12).
pub(crate) const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// How the client reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// STUN/TURN over UDP.
    Udp,
    /// STUN/TURN over TCP.
    Tcp,
    /// STUN/TURN over TLS.
    Tls,
}

impl Transport {
    /// Every transport, in the order of [`Transport::index`].
    pub const ALL: [Self; 3] = [Self::Udp, Self::Tcp, Self::Tls];

    /// Position in [`Transport::ALL`] (and in per-transport counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// Index of a listening socket within a shard (all shards number their listeners alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(pub u16);

/// The client side of an allocation: client address, the server listener it reached and the transport.
/// The listener stands in for the server address, since each listener is bound to one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FiveTuple {
    /// The client's (server-reflexive) transport address.
    pub client: SocketAddr,
    /// The listener the client's packets arrive on.
    pub listener: ListenerId,
    /// The transport between client and server.
    pub transport: Transport,
}

/// Hashes the 5-tuple as one or two words instead of field by field: the shard looks a 5-tuple up for
/// every datagram a client sends, and each separate `write` costs the keyed hasher a call of its own.
/// Equal 5-tuples hash equally (the IPv6 flow label and scope, left out here, only make more tuples
/// share a hash, never split equal ones).
impl std::hash::Hash for FiveTuple {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let transport: u64 = match self.transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        };
        let tail = u64::from(self.client.port()) | u64::from(self.listener.0) << 16 | transport << 32;
        match self.client {
            SocketAddr::V4(a) => state.write_u128(u128::from(a.ip().to_bits()) << 64 | u128::from(tail)),
            SocketAddr::V6(a) => {
                state.write_u128(a.ip().to_bits());
                state.write_u64(tail | 1 << 34);
            }
        }
    }
}

impl std::fmt::Display for FiveTuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}", self.client, self.transport.name(), self.listener.0)
    }
}

/// Which ports of a permitted IP may be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerScope {
    /// Any port: the peer policy permits the IP.
    Any,
    /// Only the relayed addresses of live allocations: the IP is one of this server's own, which TURN
    /// -> TURN calls need. Any other port there, relay range or not, may be another program's and
    /// stays closed.
    LiveRelays,
}

/// A permission for one peer IP address.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Permission {
    /// The peer IP (RFC 8656 permissions ignore ports; see [`PeerScope`] for the one exception).
    pub(crate) ip: IpAddr,
    /// When it stops letting data through.
    pub(crate) expires: Instant,
    /// Which ports may be reached.
    pub(crate) scope: PeerScope,
}

/// A channel binding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelBinding {
    /// The channel number.
    pub(crate) number: ChannelNumber,
    /// The peer transport address.
    pub(crate) peer: SocketAddr,
    /// When the binding stops carrying data; the pair stays reserved for [`CHANNEL_COOLDOWN`] more.
    pub(crate) expires: Instant,
}

impl ChannelBinding {
    /// Whether the binding carries data at `now`.
    pub(crate) fn is_active(&self, now: Instant) -> bool {
        now < self.expires
    }
}

/// Which of an allocation's relayed addresses: the one it was made with, or the IPv6 half of a dual
/// allocation (RFC 8656 §7.2, ADDITIONAL-ADDRESS-FAMILY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    /// The relayed address of the family the Allocate asked for.
    Primary,
    /// The IPv6 relayed address added by ADDITIONAL-ADDRESS-FAMILY.
    Ipv6,
}

/// A relay socket of a shard: the allocation slot it serves and which of its relayed addresses. The
/// host keeps its relay sockets in a table indexed by [`RelayKey::index`] (two entries per slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayKey(u32);

impl RelayKey {
    /// The socket of `half` of slot `slot`.
    pub fn new(slot: u32, half: Half) -> Self {
        Self(slot.saturating_mul(2) + u32::from(half == Half::Ipv6))
    }

    /// The allocation slot.
    pub fn slot(self) -> u32 {
        self.0 / 2
    }

    /// Which relayed address of the slot's allocation.
    pub fn half(self) -> Half {
        if self.0.is_multiple_of(2) { Half::Primary } else { Half::Ipv6 }
    }

    /// The key's place in the host's table of relay sockets.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The key at `index` of the host's table (its token names it).
    pub fn from_index(index: usize) -> Option<Self> {
        u32::try_from(index).ok().map(Self)
    }
}

/// A relayed transport address: the one clients are told (the external address behind NAT) and the
/// one its socket is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relayed {
    /// Sent in XOR-RELAYED-ADDRESS.
    pub advertised: SocketAddr,
    /// Bound by the relay socket.
    pub bound: SocketAddr,
}

/// Datagrams and payload bytes relayed in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Datagrams.
    pub packets: u64,
    /// Payload bytes (application data, without TURN framing).
    pub bytes: u64,
}

impl Traffic {
    /// Counts one datagram of `len` payload bytes.
    pub fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// Why an allocation ended (the deletion log line says it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Its lifetime ran out without a Refresh.
    Expired,
    /// The client sent a Refresh with LIFETIME 0.
    RefreshedToZero,
    /// The client's TCP or TLS connection closed.
    ConnectionClosed,
    /// An operator ended it (admin API, revocation).
    Operator,
    /// The server is stopping.
    Shutdown,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Expired => "expired",
            Self::RefreshedToZero => "refreshed to 0",
            Self::ConnectionClosed => "connection closed",
            Self::Operator => "removed by an operator",
            Self::Shutdown => "server shutting down",
        })
    }
}

/// One allocation: owned by exactly one shard.
#[derive(Debug)]
pub(crate) struct Allocation {
    /// The client side.
    pub(crate) five_tuple: FiveTuple,
    /// When it was created.
    pub(crate) created: Instant,
    /// What it relayed, client -> peer and peer -> client.
    pub(crate) traffic: [Traffic; 2],
    /// Its relayed address ([`Half::Primary`]).
    pub(crate) relayed: Relayed,
    /// The IPv6 half of a dual allocation ([`Half::Ipv6`]).
    pub(crate) second: Option<Relayed>,
    /// When the allocation expires unless refreshed.
    pub(crate) expires: Instant,
    /// The deadline of the expiry timer currently armed for it.
    pub(crate) armed_at: Instant,
    /// The USERNAME that created it (later requests must use the same, else 441).
    pub(crate) username: Box<str>,
    /// The long-term key that username authenticated with, reused for its later requests while the
    /// credentials stay as they were (see `Engine::authenticate`).
    pub(crate) key: crate::integrity::KeptKey,
    /// The engine's credentials generation `key` was derived under.
    pub(crate) key_generation: u64,
    /// The user counted against the user quota (REST usernames: the part after the expiry).
    pub(crate) quota_user: Box<str>,
    /// Installed permissions, bounded by the configured maximum.
    pub(crate) permissions: Vec<Permission>,
    /// Channel bindings (active or cooling down), bounded by the configured maximum.
    pub(crate) channels: Vec<ChannelBinding>,
    /// Transaction ID of the Allocate request that created it.
    pub(crate) allocate_tid: TransactionId,
    /// The success response to that request, replayed for retransmissions.
    pub(crate) allocate_response: Box<[u8]>,
    /// `max-bps` buckets, [client -> peer, peer -> client]; `None` when unlimited.
    pub(crate) bandwidth: Option<[TokenBucket; 2]>,
}

impl Allocation {
    /// Whether a relayed address of `ip`'s family exists (else 443 / drop).
    pub(crate) fn serves_family_of(&self, ip: IpAddr) -> bool {
        let same = |r: &Relayed| r.advertised.is_ipv4() == ip.is_ipv4();
        same(&self.relayed) || self.second.as_ref().is_some_and(same)
    }

    /// Which relayed address talks to `peer`: the one of its family.
    pub(crate) fn half_for(&self, peer: SocketAddr) -> Half {
        if self.relayed.advertised.is_ipv4() == peer.is_ipv4() { Half::Primary } else { Half::Ipv6 }
    }

    /// Each relayed address, with its half.
    pub(crate) fn relayed_addresses(&self) -> impl Iterator<Item = (Half, Relayed)> {
        std::iter::once((Half::Primary, self.relayed)).chain(self.second.map(|r| (Half::Ipv6, r)))
    }

    /// Whether an unexpired permission lets data to/from `peer` through at `now`; `is_live_relay` says
    /// whether an address is a live relayed address of this server, for permissions scoped to those
    /// ([`PeerScope::LiveRelays`]; asked only for them).
    pub(crate) fn permits(&self, peer: SocketAddr, now: Instant, is_live_relay: impl Fn(SocketAddr) -> bool) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == peer.ip() && now < p.expires && (p.scope == PeerScope::Any || is_live_relay(peer)))
    }

    /// The binding for `number`, active or not.
    pub(crate) fn channel_by_number(&self, number: ChannelNumber) -> Option<&ChannelBinding> {
        self.channels.iter().find(|c| c.number == number)
    }

    /// The binding for `peer`, active or not.
    pub(crate) fn channel_by_peer(&self, peer: SocketAddr) -> Option<&ChannelBinding> {
        self.channels.iter().find(|c| c.peer == peer)
    }

    /// Installs or refreshes a permission; returns false if a new one would exceed `max`.
    /// An existing permission is extended, and widened to [`PeerScope::Any`] if that is granted now.
    pub(crate) fn install_permission(
        &mut self,
        ip: IpAddr,
        expires: Instant,
        max: usize,
        scope: PeerScope,
    ) -> PermissionChange {
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires = expires;
            if scope == PeerScope::Any {
                p.scope = PeerScope::Any;
            }
            return PermissionChange::Refreshed;
        }
        if self.permissions.len() >= max {
            return PermissionChange::Full;
        }
        self.permissions.push(Permission { ip, expires, scope });
        PermissionChange::Created
    }
}

/// Outcome of [`Allocation::install_permission`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PermissionChange {
    /// A new permission: arm its timer.
    Created,
    /// An existing one was extended (its timer re-arms itself lazily).
    Refreshed,
    /// The per-allocation cap is reached.
    Full,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

    fn hash(t: &FiveTuple) -> u64 {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(t)
    }

    #[test]
    fn five_tuple_hash_tells_every_field_apart() {
        let base =
            FiveTuple { client: "192.0.2.1:5000".parse().unwrap(), listener: ListenerId(0), transport: Transport::Udp };
        let variants = [
            FiveTuple { client: "192.0.2.2:5000".parse().unwrap(), ..base },
            FiveTuple { client: "192.0.2.1:5001".parse().unwrap(), ..base },
            FiveTuple { listener: ListenerId(1), ..base },
            FiveTuple { transport: Transport::Tcp, ..base },
            FiveTuple { transport: Transport::Tls, ..base },
            FiveTuple { client: "[::ffff:192.0.2.1]:5000".parse().unwrap(), ..base },
            FiveTuple { client: "[2001:db8::1]:5000".parse().unwrap(), ..base },
        ];
        let mut seen = vec![hash(&base)];
        for v in &variants {
            let h = hash(v);
            assert!(!seen.contains(&h), "{v} hashes like another tuple");
            seen.push(h);
        }
        let same = base;
        assert_eq!(hash(&base), hash(&same));
    }
}
