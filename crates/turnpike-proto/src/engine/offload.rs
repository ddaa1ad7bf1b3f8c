//! What the host may relay outside the engine (the kernel path: an XDP program forwarding ChannelData).
//!
//! The engine stays the authority. When offloading is on, every change that can start or stop a
//! channel's eligibility marks the allocation's slot ([`Engine::take_offload_dirty`]); the host then
//! asks which channels of that slot may be relayed outside ([`Engine::offload_wanted`]) and makes its
//! table say exactly that. A deleted allocation's entries are ended inside [`Engine::free`] through
//! [`super::RelaySockets::offload_ended`], so its last counts reach the deletion line and nothing is
//! forwarded after it.

use super::Engine;
use crate::allocation::{Allocation, FiveTuple, PeerScope, Traffic, Transport};
use crate::stats::{TO_CLIENT, TO_PEER, bump};
use std::net::SocketAddr;
use std::time::Instant;

/// A channel the host may relay itself, in both directions, until the engine says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadChannel {
    /// The client side (always UDP).
    pub client: FiveTuple,
    /// The channel number.
    pub number: u16,
    /// The bound peer.
    pub peer: SocketAddr,
    /// The address the relay socket for this peer is bound to (datagrams from the peer arrive there).
    pub relay: SocketAddr,
}

/// Whether a channel of `alloc` to `peer` may leave the engine's data path at `now`: the client and
/// the relay speak UDP in the same family, no bandwidth limit applies (the buckets live here), the
/// channel is active and the permission live and not limited to live relayed addresses (which the
/// engine checks per datagram).
fn eligible(alloc: &Allocation, peer: SocketAddr, now: Instant, limited: bool) -> bool {
    !limited
        && alloc.bandwidth.is_none()
        && alloc.five_tuple.transport == Transport::Udp
        && alloc.five_tuple.client.is_ipv4() == peer.is_ipv4()
        && alloc.permissions.iter().any(|p| p.ip == peer.ip() && now < p.expires && p.scope == PeerScope::Any)
}

impl Engine {
    /// Turns offloading on: from now on changes are tracked for [`Engine::take_offload_dirty`]. Every
    /// existing allocation starts marked.
    pub fn enable_offload(&mut self) {
        let mut dirty: Vec<u32> = self.table.iter().map(|(id, _)| id.idx).collect();
        dirty.sort_unstable();
        self.offload_dirty = Some(dirty);
    }

    /// Marks allocation slot `idx` for the host to look at again (nothing when offloading is off).
    pub(super) fn offload_touch(&mut self, idx: u32) {
        if let Some(dirty) = self.offload_dirty.as_mut()
            && dirty.last() != Some(&idx)
        {
            dirty.push(idx);
        }
    }

    /// Marks every allocation (a reload can change any channel's eligibility).
    pub(super) fn offload_touch_all(&mut self) {
        if self.offload_dirty.is_some() {
            let idxs: Vec<u32> = self.table.iter().map(|(id, _)| id.idx).collect();
            for idx in idxs {
                self.offload_touch(idx);
            }
        }
    }

    /// Whether slots wait for [`Engine::take_offload_dirty`] (cheap: the host asks after every batch).
    pub fn offload_pending(&self) -> bool {
        self.offload_dirty.as_ref().is_some_and(|d| !d.is_empty())
    }

    /// Moves the marked slots into `out` (cleared first); each may appear more than once.
    pub fn take_offload_dirty(&mut self, out: &mut Vec<u32>) {
        out.clear();
        if let Some(dirty) = self.offload_dirty.as_mut() {
            std::mem::swap(dirty, out);
        }
    }

    /// The channels of allocation slot `idx` that may be relayed outside the engine at `now`, into
    /// `out` (cleared first; empty when the slot holds no allocation).
    pub fn offload_wanted(&self, idx: u32, now: Instant, out: &mut Vec<OffloadChannel>) {
        out.clear();
        let Some(alloc) = self.table.by_index(idx) else {
            return;
        };
        let limited = self.total_bandwidth.is_some();
        for c in alloc.channels.iter().filter(|c| c.is_active(now)) {
            if !eligible(alloc, c.peer, now, limited) {
                continue;
            }
            let relay = match alloc.half_for(c.peer) {
                crate::allocation::Half::Primary => alloc.relayed.bound,
                crate::allocation::Half::Ipv6 => match alloc.second {
                    Some(r) => r.bound,
                    None => continue,
                },
            };
            out.push(OffloadChannel { client: alloc.five_tuple, number: c.number.0, peer: c.peer, relay });
        }
    }

    /// Adds what the host relayed for allocation slot `idx` to its counts (session list, deletion
    /// line, metrics). `to_peer`/`to_client` are new datagrams and payload bytes since the last call.
    pub fn credit_offloaded(&mut self, idx: u32, to_peer: Traffic, to_client: Traffic) {
        if let Some(alloc) = self.table.by_index_mut(idx) {
            credit(&mut alloc.traffic, to_peer, to_client);
        }
        self.count_offloaded(to_peer, to_client);
    }

    pub(super) fn count_offloaded(&self, to_peer: Traffic, to_client: Traffic) {
        bump(&self.stats.packets[TO_PEER], to_peer.packets);
        bump(&self.stats.bytes[TO_PEER], to_peer.bytes);
        bump(&self.stats.packets[TO_CLIENT], to_client.packets);
        bump(&self.stats.bytes[TO_CLIENT], to_client.bytes);
    }
}

/// Adds offloaded counts to an allocation's traffic.
pub(super) fn credit(traffic: &mut [Traffic; 2], to_peer: Traffic, to_client: Traffic) {
    for (t, add) in traffic.iter_mut().zip([to_peer, to_client]) {
        t.packets += add.packets;
        t.bytes += add.bytes;
    }
}
