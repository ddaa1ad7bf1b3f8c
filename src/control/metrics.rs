//! The Prometheus endpoint: `GET /metrics` on a loopback address, text exposition format 0.0.4.
//! Per-shard counters are written only by their shard; this thread reads and sums them. The HTTP
//! serving (concurrency, limits) is [`super::http`]'s; this module renders and routes.

use super::ServerCounters;
use super::http::{self, CloseReason};
use crate::admission::{EarlyClose, Refusal};
use crate::proto::DropReason;
use crate::proto::stats::{AUTH_FAILURE_REASONS, ShardStats, read};
use crate::shared::Shared;
use hyper::body::Bytes;
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::fmt::Write as _;
use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Renders every metric.
pub fn render(stats: &[Arc<ShardStats>], shared: &Shared, counters: &ServerCounters) -> String {
    let mut out = String::with_capacity(8192);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    let per_shard = |f: &dyn Fn(&ShardStats) -> u64| -> Vec<(String, u64)> {
        stats.iter().enumerate().map(|(k, s)| (format!("shard=\"{k}\""), f(s))).collect()
    };
    let per_shard_transport = || -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for (k, s) in stats.iter().enumerate() {
            for (i, t) in ["udp", "tcp", "tls"].iter().enumerate() {
                v.push((format!("shard=\"{k}\",transport=\"{t}\""), read(&s.allocations_by_transport[i])));
            }
        }
        v
    };
    let sum = |f: &dyn Fn(&ShardStats) -> u64| -> u64 { stats.iter().map(|s| f(s)).sum() };
    // An unlabelled sample: the sum over shards.
    let total = |f: &dyn Fn(&ShardStats) -> u64| -> [(String, u64); 1] { [(String::new(), sum(f))] };
    family("turnpike_allocations", "gauge", "Live allocations.", &per_shard_transport());
    family("turnpike_permissions", "gauge", "Live permissions.", &per_shard(&|s| read(&s.permissions)));
    family("turnpike_channels", "gauge", "Live channel bindings.", &per_shard(&|s| read(&s.channels)));
    family(
        "turnpike_spare_relay_sockets",
        "gauge",
        "Relay sockets of deleted allocations kept open (bound, out of service) for the next allocations.",
        &per_shard(&|s| read(&s.spare_relay_sockets)),
    );
    let mut conns = Vec::new();
    for (k, s) in stats.iter().enumerate() {
        conns.push((format!("shard=\"{k}\",transport=\"tcp\""), read(&s.tcp_connections)));
        conns.push((format!("shard=\"{k}\",transport=\"tls\""), read(&s.tls_connections)));
    }
    family("turnpike_connections", "gauge", "Open TCP and TLS client connections.", &conns);
    family(
        "turnpike_unauthenticated_connections",
        "gauge",
        "TCP and TLS client connections without an allocation yet, node-wide (abuse.unauth_connections).",
        &[(String::new(), u64::from(shared.conns.pending()))],
    );
    let refused: Vec<(String, u64)> = Refusal::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.name()), sum(&|s| read(&s.connections_refused[r.index()]))))
        .collect();
    family(
        "turnpike_connections_refused_total",
        "counter",
        "TCP and TLS connections closed as soon as they were accepted, by reason.",
        &refused,
    );
    let closed_early: Vec<(String, u64)> = EarlyClose::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.name()), sum(&|s| read(&s.connections_closed_early[r.index()]))))
        .collect();
    family(
        "turnpike_connections_closed_early_total",
        "counter",
        "Connections without an allocation closed early: to make room for a newer one, or idle while many were pending.",
        &closed_early,
    );
    family(
        "turnpike_allocations_created_total",
        "counter",
        "Allocations created.",
        &per_shard(&|s| read(&s.allocations_created)),
    );
    family(
        "turnpike_relayed_packets_total",
        "counter",
        "Datagrams relayed, by direction.",
        &[
            ("direction=\"to_peer\"".into(), sum(&|s| read(&s.packets_to_peer))),
            ("direction=\"to_client\"".into(), sum(&|s| read(&s.packets_to_client))),
        ],
    );
    family(
        "turnpike_relayed_bytes_total",
        "counter",
        "Payload bytes relayed, by direction.",
        &[
            ("direction=\"to_peer\"".into(), sum(&|s| read(&s.bytes_to_peer))),
            ("direction=\"to_client\"".into(), sum(&|s| read(&s.bytes_to_client))),
        ],
    );
    let mut drops: Vec<(String, u64)> = DropReason::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.name()), sum(&|s| read(&s.drops[r.index()]))))
        .collect();
    drops.push(("reason=\"socket_full\"".into(), sum(&|s| read(&s.send_would_block))));
    family("turnpike_dropped_packets_total", "counter", "Datagrams dropped, by reason.", &drops);
    family(
        "turnpike_send_calls_total",
        "counter",
        "System calls (sendmmsg, sendto) that sent UDP datagrams: relayed data and replies to UDP clients.",
        &total(&|s| read(&s.send_calls)),
    );
    family(
        "turnpike_segmented_datagrams_total",
        "counter",
        "Relayed UDP datagrams sent inside a UDP GSO message.",
        &total(&|s| read(&s.datagrams_segmented)),
    );
    family(
        "turnpike_raw_socket_datagrams_total",
        "counter",
        "Relayed UDP datagrams sent through a shard's raw socket (runtime.raw_send), several allocations' in one call.",
        &total(&|s| read(&s.datagrams_raw)),
    );
    family(
        "turnpike_coalescing_pauses_total",
        "counter",
        "Wake-ups after which a busy shard paused to let a batch of datagrams accumulate (runtime.coalesce_us).",
        &total(&|s| read(&s.coalescing_pauses)),
    );
    family("turnpike_requests_total", "counter", "STUN/TURN requests handled.", &total(&|s| read(&s.requests)));
    let auth: Vec<(String, u64)> = AUTH_FAILURE_REASONS
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("reason=\"{r}\""), sum(&|s| read(&s.auth_failure_reasons[i]))))
        .collect();
    family("turnpike_auth_failures_total", "counter", "Authentication failures, by reason.", &auth);
    family("turnpike_peers_denied_total", "counter", "Peers refused by policy.", &total(&|s| read(&s.peers_denied)));
    family(
        "turnpike_quota_refusals_total",
        "counter",
        "Allocations refused by quota (486).",
        &total(&|s| read(&s.quota_refusals)),
    );
    family(
        "turnpike_capacity_refusals_total",
        "counter",
        "Allocations refused for want of a relay port or socket (508): range used up, ports held by other programs, out of descriptors.",
        &total(&|s| read(&s.capacity_refusals)),
    );
    family(
        "turnpike_rate_limited_total",
        "counter",
        "Unauthenticated requests dropped by the per-source limit.",
        &total(&|s| read(&s.drops[DropReason::SourceRateLimited.index()])),
    );
    family(
        "turnpike_reloads_total",
        "counter",
        "Configuration reloads, by result.",
        &[
            ("result=\"ok\"".into(), counters.reloads.load(Ordering::Relaxed)),
            ("result=\"failed\"".into(), counters.reload_failures.load(Ordering::Relaxed)),
        ],
    );
    family(
        "turnpike_config_generation",
        "gauge",
        "Configuration generation in force.",
        &[(String::new(), counters.generation.load(Ordering::Relaxed))],
    );
    let closed: Vec<(String, u64)> = CloseReason::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.name()), counters.http.closed[r.index()].load(Ordering::Relaxed)))
        .collect();
    family(
        "turnpike_http_connections_closed_total",
        "counter",
        "Connections to this endpoint closed by a limit, by reason: over_limit (one of the source holding the most, to admit one past the cap), deadline (open too long), header_timeout (request head too slow), header_too_large (431).",
        &closed,
    );
    out
}

/// Serves the endpoint on the calling thread until `stop` is set (see [`http`] for the server and its
/// limits). Errs only if the server cannot be set up.
pub fn serve(
    listener: TcpListener,
    stats: Vec<Arc<ShardStats>>,
    shared: Arc<Shared>,
    counters: Arc<ServerCounters>,
    max_connections: usize,
    stop: &AtomicBool,
) -> io::Result<()> {
    let http_counters = Arc::clone(&counters.http);
    let handler: Arc<http::Handler> = Arc::new(move |req| respond(req, &stats, &shared, &counters));
    http::serve(listener, handler, http_counters, max_connections, stop)
}

/// Routes a request: `GET /metrics` (and `/`) renders the metrics; other paths are not found. A new
/// path is one more arm.
pub fn respond(
    req: &Request<Bytes>,
    stats: &[Arc<ShardStats>],
    shared: &Shared,
    counters: &ServerCounters,
) -> Response<Bytes> {
    match req.uri().path() {
        "/metrics" | "/" => get_only(req, || {
            http::with_type(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", render(stats, shared, counters))
        }),
        _ => http::text(StatusCode::NOT_FOUND, "not found: try GET /metrics\n"),
    }
}

/// Answers GET (and HEAD, which hyper sends without the body) with `get`, anything else with 405.
fn get_only(req: &Request<Bytes>, get: impl FnOnce() -> Response<Bytes>) -> Response<Bytes> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return get();
    }
    let mut r = http::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: try GET\n");
    r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}
