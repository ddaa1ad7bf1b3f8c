//! What operators see of allocations and do to them: a [`Session`] per allocation for the admin API's
//! list, and ending allocations by id or user (`DELETE /v1/sessions`, revocations).

use super::{Engine, RelaySockets};
use crate::allocation::{EndReason, FiveTuple, Traffic};
use crate::stats::bump;
use crate::table::AllocId;
use std::net::SocketAddr;
use std::time::Instant;

/// One allocation as an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Its id on this node: [`session_id`] of the shard and its slot.
    pub id: u64,
    /// The USERNAME that created it.
    pub username: String,
    /// The user it is counted against (a REST username's user part).
    pub user: String,
    /// The client's 5-tuple.
    pub client: FiveTuple,
    /// Its relayed addresses, as advertised.
    pub relayed: Vec<SocketAddr>,
    /// When it was created, Unix seconds.
    pub created_unix: u64,
    /// When it expires unless refreshed, Unix seconds.
    pub expires_unix: u64,
    /// Installed permissions.
    pub permissions: usize,
    /// Channel bindings.
    pub channels: usize,
    /// Relayed client -> peer and peer -> client.
    pub traffic: [Traffic; 2],
}

/// Which allocations to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector<'a> {
    /// The one with this [`Session::id`].
    Id(u64),
    /// Every one of this user (the quota identity, as [`Session::user`]).
    User(&'a str),
}

/// A node-unique session id: the shard (16 bits), the table slot (24) and the slot's generation (24),
/// so an id is not reused by the next allocation in the same slot.
pub fn session_id(shard: u16, idx: u32, generation: u32) -> u64 {
    (u64::from(shard) << 48) | (u64::from(idx & 0xFF_FFFF) << 24) | u64::from(generation & 0xFF_FFFF)
}

impl Engine {
    /// Appends a [`Session`] for each allocation at `now` to `out`.
    pub fn sessions(&self, now: Instant, out: &mut Vec<Session>) {
        let unix_at = |t: Instant| {
            if t >= now { self.unix(now) + (t - now).as_secs() } else { self.unix(now) - (now - t).as_secs() }
        };
        for (id, a) in self.table.iter() {
            out.push(Session {
                id: session_id(self.shard, id.idx, id.generation),
                username: a.username.to_string(),
                user: a.quota_user.to_string(),
                client: a.five_tuple,
                relayed: a.relayed_addresses().map(|(_, r)| r.advertised).collect(),
                created_unix: unix_at(a.created),
                expires_unix: unix_at(a.expires),
                permissions: a.permissions.len(),
                channels: a.channels.len(),
                traffic: a.traffic,
            });
        }
    }

    /// Ends the allocations `which` selects now (reason: an operator); returns how many.
    pub fn end_sessions(&mut self, now: Instant, which: Selector<'_>, io: &mut dyn RelaySockets) -> usize {
        let chosen: Vec<AllocId> = self
            .table
            .iter()
            .filter(|(id, a)| match which {
                Selector::Id(wanted) => session_id(self.shard, id.idx, id.generation) == wanted,
                Selector::User(user) => &*a.quota_user == user,
            })
            .map(|(id, _)| id)
            .collect();
        for &id in &chosen {
            self.free(now, id, io, EndReason::Operator);
        }
        bump(&self.stats.operator_ends, chosen.len() as u64);
        chosen.len()
    }
}
