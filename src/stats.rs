//! The host's counters, defined like the core's ([`turnpike_proto::counters!`]): what each shard's
//! sockets do ([`IoCounters`]) beside its engine's ([`EngineCounters`]), and their sums ([`Totals`]).

use crate::admission::{EarlyClose, ProxyRefusal, Refusal};
use std::sync::Arc;
use turnpike_proto::counters;
use turnpike_proto::stats::{EngineCounters, EngineTotals};

/// Label values of [`IoCounters::connections`].
pub(crate) const STREAM_TRANSPORTS: [&str; 2] = ["tcp", "tls"];
/// Label values of [`IoCounters::kernel_datagrams`] (the engine's TO_PEER, TO_CLIENT order).
pub(crate) const DIRECTIONS: [&str; 2] = ["to_peer", "to_client"];

counters! {
    /// What one shard's sockets did. Only that shard writes them.
    pub struct IoCounters / IoTotals {
        /// Open TCP and TLS client connections ([`STREAM_TRANSPORTS`]).
        connections: gauge per_shard "turnpike_connections" "Open TCP and TLS client connections."
            [transport: STREAM_TRANSPORTS],
        /// System calls (`sendmmsg`, `sendto`) that sent UDP datagrams.
        send_calls: counter total "turnpike_send_calls_total"
            "System calls (sendmmsg, sendto) that sent UDP datagrams: relayed data and replies to UDP clients.",
        /// Relayed datagrams that left inside a UDP GSO message.
        datagrams_segmented: counter total "turnpike_segmented_datagrams_total"
            "Relayed UDP datagrams sent inside a UDP GSO message.",
        /// Relayed datagrams that left through the shard's raw socket (`runtime.raw_send`).
        datagrams_raw: counter total "turnpike_raw_socket_datagrams_total"
            "Relayed UDP datagrams sent through a shard's raw socket (runtime.raw_send), several allocations' in one call.",
        /// Channels the shard has installed in the kernel path (`runtime.kernel_path`).
        kernel_channels: gauge per_shard "turnpike_kernel_path_channels"
            "Channels whose ChannelData the kernel path (XDP) relays (runtime.kernel_path).",
        /// Datagrams the kernel path relayed for the shard's allocations, by direction.
        kernel_datagrams: counter total "turnpike_kernel_path_datagrams_total"
            "Datagrams the kernel path (XDP) relayed, read from its counters about once a second; also counted in turnpike_relayed_packets_total."
            [direction: DIRECTIONS],
        /// Datagrams of installed channels the program left to user space: no route (one shard
        /// reports the program's count).
        kernel_no_route: counter total "turnpike_kernel_path_no_route_total"
            "Datagrams of installed channels the kernel path left to user space because the kernel's route lookup did not resolve them (no neighbour entry yet, forwarding off, over the MTU).",
        /// Wake-ups after which the shard paused for a batch (`runtime.coalesce_us`).
        coalescing_pauses: counter total "turnpike_coalescing_pauses_total"
            "Wake-ups after which a busy shard paused to let a batch of datagrams accumulate (runtime.coalesce_us).",
        /// TCP/TLS connections closed as soon as they were accepted, by [`Refusal`].
        connections_refused: counter total "turnpike_connections_refused_total"
            "TCP and TLS connections closed as soon as they were accepted, by reason." [reason: Refusal::NAMES],
        /// PROXY headers accepted from trusted proxies.
        proxy_headers: counter total "turnpike_proxy_headers_total"
            "PROXY protocol headers accepted from trusted proxies (listen.proxy_from).",
        /// Connections closed at their start for the PROXY protocol, by [`ProxyRefusal`].
        proxy_refused: counter total "turnpike_proxy_refused_total"
            "TCP and TLS connections closed at their start: a trusted proxy sent no or a bad PROXY header, or an untrusted source sent one."
            [reason: ProxyRefusal::NAMES],
        /// Connections without an allocation closed early, by [`EarlyClose`].
        connections_closed_early: counter total "turnpike_connections_closed_early_total"
            "Connections without an allocation closed early: to make room for a newer one, or idle while many were pending."
            [reason: EarlyClose::NAMES],
    }
}

/// All the counters of one shard: its engine's and its sockets'.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// The engine's, which the engine writes (the shard too, for drops at the socket).
    pub engine: Arc<EngineCounters>,
    /// The sockets'.
    pub io: IoCounters,
}

/// Counters summed over all shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// The engines'.
    pub engine: EngineTotals,
    /// The sockets'.
    pub io: IoTotals,
}

impl Totals {
    /// Sums the counters of all shards.
    pub fn sum(stats: &[Arc<ShardStats>]) -> Self {
        let mut t = Self::default();
        for s in stats {
            t.engine.add(&s.engine);
            t.io.add(&s.io);
        }
        t
    }
}
