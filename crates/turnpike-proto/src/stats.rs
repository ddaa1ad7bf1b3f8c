//! Counters, defined once each: [`counters!`](crate::counters) turns one list of counters into the struct the writer
//! bumps (atomics), the struct of sums the host adds up, and the table the metrics renderer walks
//! (name, help, kind, labels), so that none of them can miss a counter.
//!
//! A shard's counters are written only by that shard, with plain relaxed load and store ([`bump`],
//! [`set`]: no locked instruction); other threads read them ([`read`]).

use crate::error::DropReason;
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether a counter only grows or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (Prometheus `counter`).
    Counter,
    /// Goes up and down (Prometheus `gauge`).
    Gauge,
}

impl Kind {
    /// The Prometheus type name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        }
    }
}

/// How a counter of several instances (one per shard) is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One sample per instance, labelled `shard`.
    PerShard,
    /// One sample, the sum over instances.
    Total,
}

/// One counter as the metrics show it: a family, with one sample per label value.
#[derive(Debug)]
pub struct Family<C> {
    /// The metric's name.
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Per shard or summed.
    pub scope: Scope,
    /// The label and its values, one per sample (none: a single sample).
    pub labels: Option<(&'static str, &'static [&'static str])>,
    /// The counter's values in an instance, one per label value.
    pub values: fn(&C) -> &[AtomicU64],
}

/// Defines a struct of counters, the struct of their sums and their [`Family`] table. Each field is
/// `name: kind scope "metric" "help"`, optionally followed by `[label: VALUES]` (a `[&str; N]`
/// constant, which makes the field an array of N counters). `kind` is `counter` or `gauge`, `scope`
/// `per_shard` or `total`.
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident / $totals:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $kind:ident $scope:ident $metric:literal $help:literal $([$label:ident : $values:expr])?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(align(128))]
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $crate::counters!(@ty $($values)?), )*
        }

        #[doc = concat!("The sums of [`", stringify!($name), "`] over instances (shards).")]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $totals {
            $( $(#[doc = $doc])* pub $field: $crate::counters!(@sum $($values)?), )*
        }

        impl $name {
            /// Every counter, as the metrics show it.
            pub const FAMILIES: &'static [$crate::stats::Family<Self>] = &[
                $( $crate::stats::Family {
                    name: $metric,
                    help: $help,
                    kind: $crate::counters!(@kind $kind),
                    scope: $crate::counters!(@scope $scope),
                    labels: $crate::counters!(@labels $($label $values)?),
                    values: |c: &Self| $crate::counters!(@slice c.$field $($values)?),
                }, )*
            ];
        }

        impl $totals {
            /// Adds one instance's counters.
            pub fn add(&mut self, c: &$name) {
                $( $crate::counters!(@add self.$field, c.$field $(, $values)?); )*
            }

            /// Every sum, by metric name (in [`Family`] order).
            pub fn samples(&self) -> ::std::vec::Vec<(&'static str, ::std::vec::Vec<u64>)> {
                ::std::vec![ $( ($metric, $crate::counters!(@vec self.$field $(, $values)?)), )* ]
            }
        }
    };
    (@ty) => { ::std::sync::atomic::AtomicU64 };
    (@ty $values:expr) => { [::std::sync::atomic::AtomicU64; $values.len()] };
    (@sum) => { u64 };
    (@sum $values:expr) => { [u64; $values.len()] };
    (@kind counter) => { $crate::stats::Kind::Counter };
    (@kind gauge) => { $crate::stats::Kind::Gauge };
    (@scope per_shard) => { $crate::stats::Scope::PerShard };
    (@scope total) => { $crate::stats::Scope::Total };
    (@labels) => { None };
    (@labels $label:ident $values:expr) => { Some((stringify!($label), &$values)) };
    (@slice $c:ident . $field:ident) => { ::std::slice::from_ref(&$c.$field) };
    (@slice $c:ident . $field:ident $values:expr) => { &$c.$field[..] };
    (@add $sum:expr, $counter:expr) => { $sum += $crate::stats::read(&$counter) };
    (@add $sum:expr, $counter:expr, $values:expr) => {
        for (s, c) in $sum.iter_mut().zip(&$counter) {
            *s += $crate::stats::read(c);
        }
    };
    (@vec $sum:expr) => { ::std::vec![$sum] };
    (@vec $sum:expr, $values:expr) => { $sum.to_vec() };
}

/// Label values of the client transport, in `Transport::ALL` order.
pub const TRANSPORTS: [&str; 3] = ["udp", "tcp", "tls"];
/// Label values of the relaying direction.
pub const DIRECTIONS: [&str; 2] = ["to_peer", "to_client"];
/// Label values of [`EngineCounters::auth_failures`].
pub const AUTH_FAILURE_REASONS: [&str; 4] = ["unknown_user", "expired", "bad_integrity", "stale_nonce"];
/// Index of the stale nonces in [`AUTH_FAILURE_REASONS`]: counted beside the failures, but a stale
/// nonce is a client's normal way to learn a new one, not a failed authentication.
pub const STALE_NONCE: usize = 3;

/// Index of a direction in [`DIRECTIONS`].
pub const TO_PEER: usize = 0;
/// Index of a direction in [`DIRECTIONS`].
pub const TO_CLIENT: usize = 1;

counters! {
    /// Counters of one engine (a shard's protocol state). Only its shard writes them; aligned so
    /// shards never share a cache line.
    pub struct EngineCounters / EngineTotals {
        /// Live allocations, by client transport ([`TRANSPORTS`]).
        allocations: gauge per_shard "turnpike_allocations" "Live allocations." [transport: TRANSPORTS],
        /// Live permissions.
        permissions: gauge per_shard "turnpike_permissions" "Live permissions.",
        /// Live channel bindings.
        channels: gauge per_shard "turnpike_channels" "Live channel bindings.",
        /// Relay sockets of deleted allocations kept open for the next ones.
        spare_relay_sockets: gauge per_shard "turnpike_spare_relay_sockets"
            "Relay sockets of deleted allocations kept open (bound, out of service) for the next allocations.",
        /// Allocations ever created.
        allocations_created: counter per_shard "turnpike_allocations_created_total" "Allocations created.",
        /// Datagrams relayed, by direction ([`DIRECTIONS`]).
        packets: counter total "turnpike_relayed_packets_total" "Datagrams relayed, by direction." [direction: DIRECTIONS],
        /// Payload bytes relayed, by direction ([`DIRECTIONS`]).
        bytes: counter total "turnpike_relayed_bytes_total" "Payload bytes relayed, by direction." [direction: DIRECTIONS],
        /// Datagrams dropped, by [`DropReason`].
        drops: counter total "turnpike_dropped_packets_total" "Datagrams dropped, by reason." [reason: DropReason::NAMES],
        /// STUN requests handled.
        requests: counter total "turnpike_requests_total" "STUN/TURN requests handled.",
        /// Authentication failures by reason ([`AUTH_FAILURE_REASONS`]).
        auth_failures: counter total "turnpike_auth_failures_total" "Authentication failures, by reason."
            [reason: AUTH_FAILURE_REASONS],
        /// Peers refused by policy (403 or dropped Send).
        peers_denied: counter total "turnpike_peers_denied_total" "Peers refused by policy.",
        /// Allocations refused by quota (486).
        quota_refusals: counter total "turnpike_quota_refusals_total" "Allocations refused by quota (486).",
        /// Allocations refused for want of a relay port or socket (508).
        capacity_refusals: counter total "turnpike_capacity_refusals_total"
            "Allocations refused for want of a relay port or socket (508): range used up, ports held by other programs, out of descriptors.",
        /// Allocates and Refreshes refused because an operator revoked the user (403).
        revoked_refusals: counter total "turnpike_revoked_refusals_total"
            "Allocates and Refreshes refused because an operator revoked the user (403).",
        /// New Allocates a draining node sent elsewhere (300) or refused (486).
        drain_redirects: counter total "turnpike_drain_refusals_total"
            "New Allocates a draining node answered with 300 (Try Alternate) or, with no other node to name, 486.",
        /// Allocations ended by an operator (admin API, revocation).
        operator_ends: counter total "turnpike_allocations_ended_by_operator_total"
            "Allocations ended by an operator (admin API, revocation).",
    }
}

impl EngineTotals {
    /// Live allocations, all transports.
    pub fn allocations(&self) -> u64 {
        self.allocations.iter().sum()
    }

    /// Datagrams dropped, all reasons.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Adds `n` to a single-writer counter without a locked instruction.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Subtracts one from a single-writer gauge (never below zero).
#[inline]
pub fn bump_down(gauge: &AtomicU64) {
    gauge.store(gauge.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
}

/// Sets a single-writer gauge.
#[inline]
pub fn set(gauge: &AtomicU64, v: u64) {
    gauge.store(v, Ordering::Relaxed);
}

/// Reads a counter.
#[inline]
pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocation::Transport;

    #[test]
    fn transport_labels_follow_the_transports() {
        for t in Transport::ALL {
            assert_eq!(TRANSPORTS[t.index()], t.name());
        }
    }

    /// Every counter has a family and a sum: a distinct value in each reaches both.
    #[test]
    fn the_stale_nonce_index_names_stale_nonces() {
        assert_eq!(AUTH_FAILURE_REASONS[STALE_NONCE], "stale_nonce");
    }

    #[test]
    fn every_counter_reaches_its_family_and_its_sum() {
        let c = EngineCounters::default();
        let mut next = 1;
        for f in EngineCounters::FAMILIES {
            for v in (f.values)(&c) {
                set(v, next);
                next += 1;
            }
        }
        let mut t = EngineTotals::default();
        t.add(&c);
        t.add(&c);
        let mut expect = 1;
        let samples = t.samples();
        assert_eq!(samples.len(), EngineCounters::FAMILIES.len());
        for (f, (name, sums)) in EngineCounters::FAMILIES.iter().zip(samples) {
            assert_eq!(f.name, name);
            assert_eq!(sums.len(), f.labels.map_or(1, |(_, v)| v.len()), "{name}");
            for s in sums {
                assert_eq!(s, 2 * expect, "{name}");
                expect += 1;
            }
        }
    }
}
