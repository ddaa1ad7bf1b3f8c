//! The data path: ChannelData and Send indications from clients, datagrams from peers (RFC 8656 §10-§12).
//! Nothing here allocates.

use super::auth::KNOWN;
use super::{Action, Engine, HEADROOM, MAX_PAYLOAD, PacketBuf};
use crate::allocation::{FiveTuple, RelayKey};
use crate::attr::{self, AttrType};
use crate::channel::{self, CHANNEL_HEADER_LEN, ChannelData};
use crate::error::DropReason;
use crate::policy::rate::TokenBucket;
use crate::stats::{TO_CLIENT, TO_PEER, bump};
use crate::stun::{self, Class, HEADER_LEN, MAGIC_COOKIE, Method, StunMsg, TransactionId, pad4};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

/// Takes `len` bytes from the allocation's and the shard's buckets of direction `dir` (0 = to peer,
/// 1 = to client); false means drop.
pub(super) fn take_bandwidth(
    alloc: &mut Option<[TokenBucket; 2]>,
    total: &mut Option<[TokenBucket; 2]>,
    dir: usize,
    len: usize,
    now: Instant,
) -> bool {
    let n = len as u64;
    alloc.as_mut().is_none_or(|b| b[dir].take(n, now)) && total.as_mut().is_none_or(|b| b[dir].take(n, now))
}

/// Offset of `inner` within `outer`, both slices of the same buffer.
pub(super) fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize)
}

impl Engine {
    //= RFC 8656 §12.6: "If the ChannelData message is received on a channel that is not bound to any
    //= peer, then the message is silently discarded."
    pub(super) fn channel_data(&mut self, now: Instant, tuple: FiveTuple, bytes: &[u8]) -> Action {
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
        let key = RelayKey::new(id.idx, alloc.half_for(binding.peer));
        alloc.traffic[TO_PEER].add(cd.data.len());
        bump(&self.stats.packets[TO_PEER], 1);
        bump(&self.stats.bytes[TO_PEER], cd.data.len() as u64);
        let start = HEADROOM + CHANNEL_HEADER_LEN;
        Action::ToPeer { key, peer: binding.peer, range: start..start + cd.data.len() }
    }

    //= RFC 8656 §10.2: "the server MUST validate that the Send indication contains an XOR-PEER-ADDRESS
    //= attribute and a DATA attribute ... If there is no permission ... the server silently discards".
    pub(super) fn send_indication(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        bytes: &[u8],
    ) -> Action {
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
        let key = RelayKey::new(id.idx, alloc.half_for(peer));
        if !alloc.permits(peer, now, |a| self.cluster.is_live_relay(a)) {
            return Action::Drop(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut alloc.bandwidth, &mut self.total_bandwidth, 0, data.len(), now) {
            return Action::Drop(DropReason::OverBandwidth);
        }
        alloc.traffic[TO_PEER].add(data.len());
        bump(&self.stats.packets[TO_PEER], 1);
        bump(&self.stats.bytes[TO_PEER], data.len() as u64);
        let start = HEADROOM + offset_in(bytes, data);
        Action::ToPeer { key, peer, range: start..start + data.len() }
    }

    /// Handles a datagram of `len` bytes at the body of `pkt`, received by relay socket `key` from `peer`.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        key: RelayKey,
        peer: SocketAddr,
        pkt: &mut PacketBuf,
        len: usize,
    ) -> Action {
        let len = len.min(MAX_PAYLOAD);
        let Some(alloc) = self.table.by_index_mut(key.slot()) else {
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
        if channel.is_some() {
            // ChannelData always fits the headroom; a Data indication is counted once it did.
            alloc.traffic[TO_CLIENT].add(len);
        }
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
                Some(r) => {
                    if let Some(alloc) = self.table.by_index_mut(key.slot()) {
                        alloc.traffic[TO_CLIENT].add(len);
                    }
                    r
                }
                None => return Action::Drop(DropReason::NoSpace),
            },
        };
        bump(&self.stats.packets[TO_CLIENT], 1);
        bump(&self.stats.bytes[TO_CLIENT], len as u64);
        Action::ToClient { tuple, range }
    }

    //= RFC 8656 §11.3: "Otherwise, the server MUST send a Data indication ... with an XOR-PEER-ADDRESS
    //= attribute ... and a DATA attribute containing the application data".
    pub(super) fn data_indication_header(
        &mut self,
        pkt: &mut PacketBuf,
        peer: SocketAddr,
        len: usize,
    ) -> Option<Range<usize>> {
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
}
