//! The Prometheus endpoint: `GET /metrics` on a loopback address, text exposition format 0.0.4.
//! Per-shard counters are written only by their shard; this thread reads and sums them. The HTTP
//! serving (concurrency, limits) is [`super::http`]'s; this module renders and routes.

use super::ServerCounters;
use super::admin::AdminCounters;
use super::http::{self, HttpCounters};
use crate::admission::ConnCounters;
use crate::fleet::FleetCounters;
use crate::shared::Shared;
use crate::stats::{IoCounters, ShardStats};
use hyper::body::Bytes;
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::fmt::Write as _;
use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use turnpike_proto::stats::{EngineCounters, Family, Scope, read};

/// Everything the metrics show.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// Per-shard counters.
    pub stats: Vec<Arc<ShardStats>>,
    /// What the shards share (the connection budget's count).
    pub shared: Arc<Shared>,
    /// Reloads and the configuration generation.
    pub server: Arc<ServerCounters>,
    /// What the endpoint's own limits did.
    pub http: Arc<HttpCounters>,
    /// Admin API requests (zero without one).
    pub admin: Arc<AdminCounters>,
    /// The fleet's state (zero without one).
    pub fleet: Arc<FleetCounters>,
}

/// Renders every metric: every family of every counters struct (see [`turnpike_proto::counters!`]).
pub(crate) fn render(src: &Sources) -> String {
    let mut out = String::with_capacity(8192);
    let engines: Vec<&EngineCounters> = src.stats.iter().map(|s| &*s.engine).collect();
    let ios: Vec<&IoCounters> = src.stats.iter().map(|s| &s.io).collect();
    write_families(&mut out, &engines, EngineCounters::FAMILIES);
    write_families(&mut out, &ios, IoCounters::FAMILIES);
    write_families(&mut out, &[&src.shared.conns.counters], ConnCounters::FAMILIES);
    write_families(&mut out, &[&*src.server], ServerCounters::FAMILIES);
    write_families(&mut out, &[&*src.http], HttpCounters::FAMILIES);
    write_families(&mut out, &[&*src.admin], AdminCounters::FAMILIES);
    write_families(&mut out, &[&*src.fleet], FleetCounters::FAMILIES);
    out
}

/// Writes `families` of `instances` (shards, or one node-wide instance) in the text exposition format.
fn write_families<C>(out: &mut String, instances: &[&C], families: &[Family<C>]) {
    for f in families {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind.name());
        let label = |i: usize| f.labels.and_then(|(name, values)| Some(format!("{name}=\"{}\"", values.get(i)?)));
        let width = f.labels.map_or(1, |(_, values)| values.len());
        match f.scope {
            Scope::PerShard => {
                for (k, c) in instances.iter().enumerate() {
                    for (i, v) in (f.values)(c).iter().enumerate() {
                        let labels = [Some(format!("shard=\"{k}\"")), label(i)].into_iter().flatten();
                        let _ = writeln!(out, "{}{{{}}} {}", f.name, labels.collect::<Vec<_>>().join(","), read(v));
                    }
                }
            }
            Scope::Total => {
                for i in 0..width {
                    let sum: u64 = instances.iter().filter_map(|c| (f.values)(c).get(i)).map(read).sum();
                    match label(i) {
                        Some(l) => writeln!(out, "{}{{{l}}} {sum}", f.name),
                        None => writeln!(out, "{} {sum}", f.name),
                    }
                    .unwrap_or_default();
                }
            }
        }
    }
}

/// Serves the endpoint on the calling thread until `stop` is set (see [`http`] for the server and its
/// limits). Errs only if the server cannot be set up.
pub(crate) fn serve(
    listener: TcpListener,
    sources: Sources,
    max_connections: usize,
    stop: &AtomicBool,
) -> io::Result<()> {
    let http_counters = Arc::clone(&sources.http);
    let handler: Arc<http::Handler> = Arc::new(move |req| respond(req, &sources));
    http::serve(listener, handler, http_counters, max_connections, stop)
}

/// Routes a request: `GET /metrics` (and `/`) renders the metrics; other paths are not found. A new
/// path is one more arm.
pub(crate) fn respond(req: &Request<Bytes>, sources: &Sources) -> Response<Bytes> {
    match req.uri().path() {
        "/metrics" | "/" => get_only(req, || {
            http::with_type(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", render(sources))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Totals;
    use std::sync::atomic::AtomicU64;
    use turnpike_proto::stats::set;

    /// Gives every counter of `c` a value of its own, from `next` on.
    fn fill<C>(c: &C, families: &[Family<C>], next: &mut u64) {
        for f in families {
            for v in (f.values)(c) {
                set(v, *next);
                *next += 1;
            }
        }
    }

    /// The samples of `families` rendered for `instances`, as the exposition must show them.
    fn expected<C>(instances: &[&C], families: &[Family<C>]) -> Vec<String> {
        let mut lines = Vec::new();
        for f in families {
            let per: Vec<&[AtomicU64]> = instances.iter().map(|c| (f.values)(c)).collect();
            for i in 0..per[0].len() {
                let label = f.labels.map(|(n, v)| format!("{n}=\"{}\"", v[i]));
                match f.scope {
                    Scope::PerShard => {
                        for (k, values) in per.iter().enumerate() {
                            let l = [Some(format!("shard=\"{k}\"")), label.clone()].into_iter().flatten();
                            lines.push(format!(
                                "{}{{{}}} {}",
                                f.name,
                                l.collect::<Vec<_>>().join(","),
                                read(&values[i])
                            ));
                        }
                    }
                    Scope::Total => {
                        let sum: u64 = per.iter().map(|values| read(&values[i])).sum();
                        lines.push(match &label {
                            Some(l) => format!("{}{{{l}}} {sum}", f.name),
                            None => format!("{} {sum}", f.name),
                        });
                    }
                }
            }
        }
        lines
    }

    /// Every counter of every counters struct reaches the metrics with its own value, and every shard
    /// counter reaches the totals.
    #[test]
    fn every_counter_reaches_the_metrics_and_the_totals() {
        let stats = vec![Arc::new(ShardStats::default()), Arc::new(ShardStats::default())];
        let sources = Sources {
            stats: stats.clone(),
            shared: Arc::new(Shared::default()),
            server: Arc::new(ServerCounters::default()),
            http: Arc::new(HttpCounters::default()),
            admin: Arc::new(AdminCounters::default()),
            fleet: Arc::new(FleetCounters::default()),
        };
        let mut next = 1;
        for s in &stats {
            fill(&*s.engine, EngineCounters::FAMILIES, &mut next);
            fill(&s.io, IoCounters::FAMILIES, &mut next);
        }
        fill(&sources.shared.conns.counters, ConnCounters::FAMILIES, &mut next);
        fill(&*sources.server, ServerCounters::FAMILIES, &mut next);
        fill(&*sources.http, HttpCounters::FAMILIES, &mut next);
        fill(&*sources.admin, AdminCounters::FAMILIES, &mut next);
        fill(&*sources.fleet, FleetCounters::FAMILIES, &mut next);
        let text = render(&sources);
        let engines: Vec<&EngineCounters> = stats.iter().map(|s| &*s.engine).collect();
        let ios: Vec<&IoCounters> = stats.iter().map(|s| &s.io).collect();
        let mut want = expected(&engines, EngineCounters::FAMILIES);
        want.extend(expected(&ios, IoCounters::FAMILIES));
        want.extend(expected(&[&sources.shared.conns.counters], ConnCounters::FAMILIES));
        want.extend(expected(&[&*sources.server], ServerCounters::FAMILIES));
        want.extend(expected(&[&*sources.http], HttpCounters::FAMILIES));
        want.extend(expected(&[&*sources.admin], AdminCounters::FAMILIES));
        want.extend(expected(&[&*sources.fleet], FleetCounters::FAMILIES));
        for line in &want {
            assert!(text.lines().any(|l| l == line), "missing from the metrics: {line}\n{text}");
        }
        let families = EngineCounters::FAMILIES.len()
            + IoCounters::FAMILIES.len()
            + ConnCounters::FAMILIES.len()
            + ServerCounters::FAMILIES.len()
            + HttpCounters::FAMILIES.len()
            + AdminCounters::FAMILIES.len()
            + FleetCounters::FAMILIES.len();
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE ")).count(), families);
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), want.len(), "nothing else");
        // The totals: every engine and I/O counter, summed over the shards.
        let totals = Totals::sum(&stats);
        let sums: Vec<u64> =
            totals.engine.samples().into_iter().chain(totals.io.samples()).flat_map(|(_, v)| v).collect();
        let by_hand: Vec<u64> = EngineCounters::FAMILIES
            .iter()
            .flat_map(|f| (0..(f.values)(engines[0]).len()).map(move |i| (f.values, i)))
            .map(|(values, i)| engines.iter().map(|e| read(&values(e)[i])).sum())
            .chain(IoCounters::FAMILIES.iter().flat_map(|f| {
                let ios = &ios;
                (0..(f.values)(ios[0]).len()).map(move |i| ios.iter().map(|c| read(&(f.values)(c)[i])).sum())
            }))
            .collect();
        assert_eq!(sums, by_hand);
        assert!(sums.iter().all(|&s| s > 0));
    }
}
