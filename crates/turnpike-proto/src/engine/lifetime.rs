//! How allocations, permissions, channels and reservations end: Refresh (RFC 8656 §8), the timer
//! wheel, a stream client's close, deletion and shutdown.

use super::{Action, Engine, RelaySockets, family_of, write_response};
use crate::allocation::{CHANNEL_COOLDOWN, EndReason, FiveTuple, RelayKey};
use crate::attr::{self, AttrType};
use crate::channel::ChannelNumber;
use crate::error::ErrorCode;
use crate::spares::Spare;
use crate::stats::{bump_down, set};
use crate::stun::{Class, StunMsg};
use crate::table::AllocId;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Most timers fired per [`Engine::handle_timeout`]; the rest wait for the next call, which the shard
/// makes at once after serving its sockets. Freeing an allocation costs a few microseconds (its socket
/// is closed), so 10,000 allocations expiring in the same second would otherwise hold up relaying for
/// tens of milliseconds (`scripts/bench/bench-expiry.sh`: a call's p99 13-21 ms during such an expiry when
/// all were freed at once; see bench/README.md, "Churn and mass expiry").
pub const TIMER_BUDGET: usize = 128;

#[derive(Clone, Copy, Debug)]
pub(super) enum Timer {
    /// The deadline the entry was armed for: entries that no longer match `armed_at` are stale.
    Allocation(AllocId, Instant),
    Permission(AllocId, IpAddr),
    Channel(AllocId, ChannelNumber),
    Reservation([u8; 8]),
}

impl Engine {
    //= RFC 8656 §8: "If the 'desired lifetime' is zero, then the request succeeds and the allocation is
    //= deleted." A retransmitted Refresh(0) then finds no allocation and gets 437, which the RFC accepts.
    pub(super) fn refresh(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'_>,
        io: &mut dyn RelaySockets,
    ) -> Action {
        let (auth, id) = match self.authorize_on_allocation(now, tuple, msg) {
            Ok(x) => x,
            Err(action) => return action,
        };
        let key = auth.key;
        let Some(alloc) = self.table.get(id) else {
            return self.error(msg, ErrorCode::AllocationMismatch, Some(&key));
        };
        let user = alloc.quota_user.clone();
        if let Some(refusal) = self.operator_refusal(now, tuple, msg, &key, user.as_bytes(), false) {
            return refusal;
        }
        let Some(alloc) = self.table.get(id) else {
            return self.error(msg, ErrorCode::AllocationMismatch, Some(&key));
        };
        //= RFC 8656 §8: a REQUESTED-ADDRESS-FAMILY that does not match a family of the allocation is 443.
        //= A malformed one is a malformed request (400), as in an Allocate.
        if let Some(value) = msg.attr(AttrType::REQUESTED_ADDRESS_FAMILY) {
            let Ok(family) = attr::decode_family(value) else {
                return self.error(msg, ErrorCode::BadRequest, Some(&key));
            };
            if !alloc.relayed_addresses().any(|(_, r)| family_of(r.advertised.ip()) == family) {
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
            self.free(now, id, io, EndReason::RefreshedToZero);
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
                alloc.relayed.advertised
            );
        }
        action
    }

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
    #[cfg(test)]
    pub(crate) fn pending_timers(&self) -> usize {
        self.wheel.len()
    }

    /// Drops the timer entries of deleted allocations, permissions and channels, and allocation entries
    /// superseded by an earlier deadline, once they outnumber the live ones ([`crate::timer::TimerWheel::sweep_stale`]).
    pub(super) fn sweep_stale_timers(&mut self) {
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

    pub(super) fn fire(&mut self, now: Instant, timer: Timer, io: &mut dyn RelaySockets) {
        match timer {
            Timer::Allocation(id, armed) => {
                let Some(alloc) = self.table.get_mut(id) else {
                    return;
                };
                if alloc.armed_at != armed {
                    return;
                }
                if alloc.expires <= now {
                    self.free(now, id, io, EndReason::Expired);
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
                    self.offload_touch(id.idx);
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
                    self.offload_touch(id.idx);
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
    pub fn client_closed(&mut self, now: Instant, tuple: FiveTuple, io: &mut dyn RelaySockets) {
        if let Some(id) = self.table.find(&tuple) {
            self.free(now, id, io, EndReason::ConnectionClosed);
        }
    }

    pub(super) fn free(&mut self, now: Instant, id: AllocId, io: &mut dyn RelaySockets, why: EndReason) {
        let Some(mut alloc) = self.table.remove(id) else {
            return;
        };
        // Before the relay sockets go: nothing may be forwarded outside for a deleted allocation.
        let [to_peer, to_client] = io.offload_ended(id.idx);
        super::offload::credit(&mut alloc.traffic, to_peer, to_client);
        self.count_offloaded(to_peer, to_client);
        for (half, relayed) in alloc.relayed_addresses() {
            self.retire_socket(RelayKey::new(id.idx, half), relayed.bound, io);
            self.cluster.relay_closed(relayed.bound);
        }
        io.allocation_freed(alloc.five_tuple);
        self.cluster.release(alloc.quota_user.as_bytes());
        self.live_permissions = self.live_permissions.saturating_sub(alloc.permissions.len() as u64);
        self.live_channels = self.live_channels.saturating_sub(alloc.channels.len() as u64);
        set(&self.stats.permissions, self.live_permissions);
        set(&self.stats.channels, self.live_channels);
        bump_down(&self.stats.allocations[alloc.five_tuple.transport.index()]);
        let [up, down] = alloc.traffic;
        log::info!(
            "allocation deleted ({why}): user={} client={} relay={} duration={:.1}s \
             client_to_peer={}pkt/{}B peer_to_client={}pkt/{}B",
            alloc.username,
            alloc.five_tuple,
            alloc.relayed.advertised,
            now.saturating_duration_since(alloc.created).as_secs_f64(),
            up.packets,
            up.bytes,
            down.packets,
            down.bytes
        );
    }

    /// Parks the relay socket of `key`, bound to `bound`, for a later allocation, or closes it and frees
    /// its port when the spare pool is full.
    pub(super) fn retire_socket(&mut self, key: RelayKey, bound: SocketAddr, io: &mut dyn RelaySockets) {
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
    pub fn close_all(&mut self, now: Instant, io: &mut dyn RelaySockets) {
        let ids: Vec<AllocId> = self.table.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.free(now, id, io, EndReason::Shutdown);
        }
    }
}
