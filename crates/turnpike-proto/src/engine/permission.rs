//! CreatePermission and ChannelBind (RFC 8656 §9, §11), and which peers a permission may reach.

use super::lifetime::Timer;
use super::{Action, Engine, Settings, write_response};
use crate::allocation::{
    Allocation, CHANNEL_LIFETIME, ChannelBinding, FiveTuple, PERMISSION_LIFETIME, PeerScope, PermissionChange,
};
use crate::attr::{self, AttrType};
use crate::channel::ChannelNumber;
use crate::cluster::Cluster;
use crate::error::ErrorCode;
use crate::policy::rate::LogKind;
use crate::stats::{bump, set};
use crate::stun::{Class, StunMsg, TransactionId};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Decodes an XOR-PEER-ADDRESS of a request, checking family and policy (400/443/403), and says which
/// ports of that IP the permission covers.
pub(super) fn check_peer(
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
pub(super) fn permission_scope(settings: &Settings, cluster: &dyn Cluster, ip: IpAddr) -> Option<PeerScope> {
    if cluster.is_own_address(ip) && !settings.peer_policy.explicitly_allows(ip) {
        return Some(PeerScope::LiveRelays);
    }
    settings.peer_policy.permits(ip).then_some(PeerScope::Any)
}

/// Whether `peer` may be reached, and the scope of the permission that lets it.
pub(super) fn reach(settings: &Settings, cluster: &dyn Cluster, peer: SocketAddr) -> Option<PeerScope> {
    match permission_scope(settings, cluster, peer.ip())? {
        PeerScope::LiveRelays if !cluster.is_live_relay(peer) => None,
        scope => Some(scope),
    }
}

impl Engine {
    pub(super) fn note_peer_denied(&mut self, now: Instant, tuple: FiveTuple, value: &[u8], tid: &TransactionId) {
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

    pub(super) fn create_permission(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>) -> Action {
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
        // A refreshed permission may be live again before its timer noticed it had lapsed.
        self.offload_touch(id.idx);
        write_response(&mut self.out, &self.settings, msg, Class::Success, Some(&key), |_| {})
    }

    pub(super) fn channel_bind(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>) -> Action {
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
        self.offload_touch(id.idx);
        write_response(&mut self.out, &self.settings, msg, Class::Success, Some(&key), |_| {})
    }
}
