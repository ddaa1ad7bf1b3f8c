//! Admission of TCP and TLS client connections that hold no allocation yet ("pending"), node-wide.
//!
//! A stranger's connection costs a descriptor, and over TLS about 24 KiB, before it has proven
//! anything; relay sockets need the same descriptors. So pending connections are bounded three ways,
//! all decided when the shard accepts one:
//!
//! - **descriptors**: a connection whose descriptor lies within `descriptor_reserve` of the limit is
//!   closed at once. Linux hands out the lowest free descriptor, so a high number means that many are
//!   open: the top of the table stays for relay sockets (UDP Allocates keep succeeding).
//! - **per source** (an IPv4 address, an IPv6 /64): at most `per_source` pending connections; more are
//!   closed at once, so one host that keeps reconnecting holds only that many.
//! - **in total**: at most `unauthenticated` pending connections. A newcomer beyond that is admitted
//!   in place of the oldest pending connection of the source that holds the most (the shard closes
//!   it): a client from a source of its own is never kept out by a flood from others, and an attacker
//!   needs as many sources as the cap to touch a lone client's connection.
//!
//! Once half the total is in use the server is "under pressure" and the shards close pending
//! connections sooner ([`PRESSURE_IDLE`], [`PRESSURE_AGE`]). A connection leaves the pending count
//! when its first allocation is created or when it closes.
//!
//! The counters are atomics touched on accept, first allocation and close only, never per packet.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Under pressure, a pending connection idle this long is closed.
pub(crate) const PRESSURE_IDLE: Duration = Duration::from_secs(2);
/// Under pressure, a pending connection this old is closed, however chatty (TLS handshake included).
pub(crate) const PRESSURE_AGE: Duration = Duration::from_secs(5);
/// Slots of the per-source counts (fixed memory; sources that share a slot share its count, which only
/// ever refuses sooner).
const SOURCE_SLOTS: usize = 4096;

/// The three bounds (see the module documentation); 0 in a configuration means "derive it from the
/// descriptor limit" ([`ConnLimits::resolve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Pending connections in total.
    pub unauthenticated: u32,
    /// Pending connections per source address (IPv6: per /64).
    pub per_source: u32,
    /// Descriptors at the top of the table that new connections never take.
    pub descriptor_reserve: u64,
}

impl ConnLimits {
    /// The limits configured (0 = derived) for a process allowed `fd_limit` descriptors: an eighth of
    /// them for pending connections (16 to 4,096), a sixteenth of that per source (4 to 64), and a
    /// quarter of them kept for relay sockets.
    pub fn resolve(unauthenticated: u32, per_source: u32, descriptor_reserve: u64, fd_limit: u64) -> Self {
        let derived_total = u32::try_from(fd_limit / 8).unwrap_or(u32::MAX).clamp(16, 4096);
        let unauthenticated = if unauthenticated == 0 { derived_total } else { unauthenticated };
        let per_source = if per_source == 0 { (unauthenticated / 16).clamp(4, 64) } else { per_source };
        let descriptor_reserve = if descriptor_reserve == 0 { fd_limit / 4 } else { descriptor_reserve };
        Self { unauthenticated, per_source, descriptor_reserve }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its descriptor lay in the reserve kept for relay sockets.
    Descriptors,
    /// Its source holds `per_source` pending connections already.
    PerSource,
    /// `unauthenticated` pending connections exist and none could make room.
    Full,
}

impl Refusal {
    /// Every reason, in the order of [`Refusal::index`].
    pub const ALL: [Self; 3] = [Self::Descriptors, Self::PerSource, Self::Full];
    /// Every reason's [`Refusal::name`], in [`Refusal::ALL`] order.
    pub const NAMES: [&'static str; 3] = ["descriptor_reserve", "per_source_limit", "unauthenticated_limit"];

    /// Position in [`Refusal::ALL`] (and in the shard's counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Label for metrics and logs.
    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

/// Why a pending connection was closed early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EarlyClose {
    /// To make room for a newcomer at the total.
    Evicted,
    /// Idle for [`PRESSURE_IDLE`] or open for [`PRESSURE_AGE`] while under pressure.
    PressureTimeout,
}

impl EarlyClose {
    /// Every reason's metric label, in [`EarlyClose::index`] order.
    pub(crate) const NAMES: [&'static str; 2] = ["evicted", "pressure_timeout"];

    /// Position in [`EarlyClose::NAMES`] (and in the shard's counters).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A pending connection's place in the counts, given back with [`ConnBudget::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    slot: u32,
}

/// An admitted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// Its place in the counts.
    pub ticket: Ticket,
    /// The total was reached: the shard must close a pending connection to make room (or refuse this
    /// one with [`Refusal::Full`] when it has none).
    pub over_total: bool,
}

turnpike_proto::counters! {
    /// The node's count of connections without an allocation (every shard adds and takes away).
    pub struct ConnCounters / ConnTotals {
        /// TCP/TLS connections without an allocation yet, node-wide.
        pending: gauge total "turnpike_unauthenticated_connections"
            "TCP and TLS client connections without an allocation yet, node-wide (abuse.unauth_connections).",
    }
}

/// The node-wide counts of pending connections, and the limits in force (replaced on reload).
#[derive(Debug)]
pub struct ConnBudget {
    /// Pending connections node-wide (the metric is this count itself).
    pub counters: ConnCounters,
    sources: Box<[AtomicU32]>,
    hasher: RandomState,
    unauthenticated: AtomicU32,
    per_source: AtomicU32,
    /// Descriptors at or above this number are in the reserve.
    descriptor_ceiling: AtomicU64,
}

impl Default for ConnBudget {
    /// No connection is ever refused (tests and tools that build a shard by hand).
    fn default() -> Self {
        Self::new(ConnLimits { unauthenticated: u32::MAX, per_source: u32::MAX, descriptor_reserve: 0 }, u64::MAX)
    }
}

impl ConnBudget {
    /// Counts for a process allowed `fd_limit` descriptors.
    pub fn new(limits: ConnLimits, fd_limit: u64) -> Self {
        let budget = Self {
            counters: ConnCounters::default(),
            sources: (0..SOURCE_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            hasher: RandomState::new(),
            unauthenticated: AtomicU32::new(0),
            per_source: AtomicU32::new(0),
            descriptor_ceiling: AtomicU64::new(fd_limit),
        };
        budget.set_limits(limits, fd_limit);
        budget
    }

    /// Replaces the limits (reload); connections already admitted stay.
    pub fn set_limits(&self, limits: ConnLimits, fd_limit: u64) {
        self.unauthenticated.store(limits.unauthenticated.max(1), Ordering::Relaxed);
        self.per_source.store(limits.per_source.max(1), Ordering::Relaxed);
        self.descriptor_ceiling.store(fd_limit.saturating_sub(limits.descriptor_reserve), Ordering::Relaxed);
    }

    fn slot_of(&self, source: IpAddr) -> usize {
        (self.hasher.hash_one(crate::policy::peer::source_key(source)) as usize) % SOURCE_SLOTS
    }

    /// Decides on a connection from `source` that was accepted as descriptor `fd`. A trusted proxy's
    /// connection (`proxied`) is not held to the per-source limit here: its client is known once the
    /// PROXY header arrives, and [`ConnBudget::rebind`] applies the limit to that client.
    pub fn admit(&self, source: IpAddr, fd: u64, proxied: bool) -> Result<Admitted, Refusal> {
        if fd >= self.descriptor_ceiling.load(Ordering::Relaxed) {
            return Err(Refusal::Descriptors);
        }
        let slot = self.slot_of(source);
        let count = &self.sources[slot];
        if count.fetch_add(1, Ordering::AcqRel) >= self.per_source.load(Ordering::Relaxed) && !proxied {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerSource);
        }
        let before = u32::try_from(self.counters.pending.fetch_add(1, Ordering::AcqRel)).unwrap_or(u32::MAX);
        let over_total = before >= self.unauthenticated.load(Ordering::Relaxed);
        Ok(Admitted { ticket: Ticket { slot: slot as u32 }, over_total })
    }

    /// Counts a proxied pending connection against the client its PROXY header named instead of the
    /// proxy; refused (the ticket unchanged) when that client holds `per_source` pending connections.
    pub fn rebind(&self, ticket: &mut Ticket, client: IpAddr) -> Result<(), Refusal> {
        let slot = self.slot_of(client);
        if slot == ticket.slot as usize {
            return Ok(());
        }
        let count = &self.sources[slot];
        if count.fetch_add(1, Ordering::AcqRel) >= self.per_source.load(Ordering::Relaxed) {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerSource);
        }
        if let Some(old) = self.sources.get(ticket.slot as usize) {
            let _ = old.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
        ticket.slot = slot as u32;
        Ok(())
    }

    /// A pending connection closed or got its first allocation.
    pub fn release(&self, ticket: Ticket) {
        if let Some(count) = self.sources.get(ticket.slot as usize) {
            let released = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            debug_assert!(released.is_ok(), "a ticket released twice");
        }
        let released = self.counters.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        debug_assert!(released.is_ok(), "a ticket released twice");
    }

    /// Pending connections from the source of `ticket` (and any source sharing its slot).
    pub fn held_by_source_of(&self, ticket: Ticket) -> u32 {
        self.sources.get(ticket.slot as usize).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Pending connections node-wide.
    pub fn pending(&self) -> u32 {
        u32::try_from(self.counters.pending.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
    }

    /// Whether half the total is in use: pending connections are then closed sooner.
    pub fn under_pressure(&self) -> bool {
        self.pending() >= self.unauthenticated.load(Ordering::Relaxed).div_ceil(2)
    }
}

/// Why a connection was closed at its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyRefusal {
    /// A trusted source sent no header.
    Missing,
    /// The header broke the specification.
    Malformed,
    /// The header was longer than its version allows.
    TooLong,
    /// An untrusted source sent a header.
    Untrusted,
    /// The header did not arrive whole in time.
    Timeout,
    /// The address it names is another open connection's.
    Duplicate,
}

impl ProxyRefusal {
    /// Metric labels, in [`ProxyRefusal::index`] order.
    pub(crate) const NAMES: [&'static str; 6] =
        ["missing", "malformed", "too_long", "untrusted", "timeout", "duplicate"];

    /// The counter index.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn derived_limits_follow_the_descriptor_limit() {
        assert_eq!(
            ConnLimits::resolve(0, 0, 0, 256),
            ConnLimits { unauthenticated: 32, per_source: 4, descriptor_reserve: 64 }
        );
        assert_eq!(
            ConnLimits::resolve(0, 0, 0, 20_480),
            ConnLimits { unauthenticated: 2560, per_source: 64, descriptor_reserve: 5120 }
        );
        assert_eq!(
            ConnLimits::resolve(100, 7, 9, 256),
            ConnLimits { unauthenticated: 100, per_source: 7, descriptor_reserve: 9 }
        );
    }

    #[test]
    fn per_source_total_and_reserve() {
        let budget = ConnBudget::new(ConnLimits { unauthenticated: 4, per_source: 2, descriptor_reserve: 64 }, 256);
        assert_eq!(budget.admit(ip("192.0.2.1"), 192, false), Err(Refusal::Descriptors));
        let a = budget.admit(ip("192.0.2.1"), 10, false).unwrap();
        let b = budget.admit(ip("::ffff:192.0.2.1"), 11, false).unwrap();
        assert_eq!(
            budget.admit(ip("192.0.2.1"), 12, false),
            Err(Refusal::PerSource),
            "the same source, however spelled"
        );
        assert_eq!(budget.held_by_source_of(a.ticket), 2);
        // An IPv6 /64 is one source.
        budget.admit(ip("2001:db8::1"), 13, false).unwrap();
        budget.admit(ip("2001:db8::2"), 14, false).unwrap();
        assert_eq!(budget.admit(ip("2001:db8::3"), 15, false), Err(Refusal::PerSource));
        assert!(budget.under_pressure());
        let over = budget.admit(ip("198.51.100.1"), 16, false).unwrap();
        assert!(over.over_total && !a.over_total && !b.over_total);
        for t in [a.ticket, b.ticket, over.ticket] {
            budget.release(t);
        }
        assert_eq!(budget.pending(), 2);
        assert!(budget.admit(ip("192.0.2.1"), 12, false).is_ok());
        assert_eq!(budget.pending(), 3);
        // A trusted proxy is held to the limit of each client it names instead.
        let mut t1 = budget.admit(ip("127.0.0.1"), 20, true).unwrap().ticket;
        let mut t2 = budget.admit(ip("127.0.0.1"), 21, true).unwrap().ticket;
        let mut t3 = budget.admit(ip("127.0.0.1"), 22, true).unwrap().ticket;
        assert!(budget.rebind(&mut t1, ip("203.0.113.1")).is_ok() && budget.rebind(&mut t2, ip("203.0.113.1")).is_ok());
        assert_eq!(budget.rebind(&mut t3, ip("203.0.113.1")), Err(Refusal::PerSource));
        assert_eq!(budget.held_by_source_of(t1), 2);
        assert_eq!(budget.pending(), 6);
    }
}
