//! Start-up: turn a [`Config`] into running shards and a control thread.
//!
//! Every socket is bound before any shard starts reading, so the `SO_REUSEPORT` group is complete
//! (and the kernel's flow-to-socket mapping stable) from the first datagram on.

use crate::auth::NonceKey;
use crate::config::Config;
use crate::control::{self, Totals};
use crate::policy::PeerPolicy;
use crate::proto::{Engine, RelayAddr, Settings};
use crate::shard::{self, Ctl, ShardParts, clock, socket};
use crate::shared::{ShardStats, Shared};
use crossbeam_channel::Sender;
use mio::Waker;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// The relay addresses per family, after applying relay-ip, listening-ip and external-ip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayPlan {
    /// IPv4 relay addresses (empty: no IPv4 relaying).
    pub v4: Vec<RelayAddr>,
    /// IPv6 relay addresses (empty: no IPv6 relaying).
    pub v6: Vec<RelayAddr>,
}

/// Decides which addresses relay sockets bind and which ones clients are told, per family.
///
/// Bind addresses: `relay.ips` of the family when `relay.ips` is set (then it is the whole list, as
/// coturn's `relay-ip`); otherwise a specific listening address of the family, else the private side of
/// `external-ip`, else, when listening on the family's wildcard, the default route's source address.
/// Advertised: `external-ip`'s public address when it names no private address or names this one.
pub fn relay_plan(cfg: &Config) -> Result<RelayPlan, String> {
    let pick = |v4: bool| -> Vec<RelayAddr> {
        let fam = |ip: &IpAddr| ip.is_ipv4() == v4;
        let external = cfg.external_ips.iter().find(|e| fam(&e.public));
        let mut binds: Vec<IpAddr> = cfg.relay_ips.iter().copied().filter(fam).collect();
        if cfg.relay_ips.is_empty() {
            let fallback = cfg
                .listen_ips
                .iter()
                .copied()
                .find(|ip| fam(ip) && !ip.is_unspecified())
                .or_else(|| external.and_then(|e| e.private))
                .or_else(|| {
                    let wildcard = cfg.listen_ips.iter().any(|ip| fam(ip) && ip.is_unspecified());
                    let probe: SocketAddr = if v4 { "192.0.2.1:9" } else { "[2001:db8::1]:9" }.parse().ok()?;
                    if wildcard { socket::route_source(probe) } else { None }
                });
            binds.extend(fallback);
        }
        binds
            .into_iter()
            .map(|bind| {
                let advertised = match external {
                    Some(e) if e.private.is_none_or(|p| p == bind) => e.public,
                    _ => bind,
                };
                RelayAddr { bind, advertised }
            })
            .collect()
    };
    let plan = RelayPlan { v4: pick(true), v6: pick(false) };
    if plan.v4.is_empty() && plan.v6.is_empty() {
        return Err("no relay address: set relay.ips (relay-ip) or listen on a specific address".into());
    }
    Ok(plan)
}

/// Builds the engine settings from a configuration.
pub fn settings(cfg: &Config, plan: RelayPlan, nonce_key: NonceKey) -> Settings {
    Settings {
        credentials: cfg.credential_store(),
        nonce_key,
        nonce_lifetime: cfg.nonce_lifetime,
        default_lifetime: cfg.default_lifetime,
        max_lifetime: cfg.max_lifetime,
        max_permissions: cfg.max_permissions,
        max_channels: cfg.max_channels,
        peer_policy: PeerPolicy::new(
            cfg.allowed_peers.clone(),
            cfg.denied_peers.clone(),
            cfg.no_multicast_peers,
            cfg.allow_private_peers,
        ),
        user_quota: cfg.user_quota,
        total_quota: cfg.total_quota,
        max_bps: cfg.max_bps,
        shard_total_bps: cfg.total_bps / cfg.threads.max(1) as u64,
        unauth_rate: cfg.unauth_rate,
        unauth_burst: cfg.unauth_burst,
        software: cfg.software.as_deref().map(Into::into),
        reason_phrases: cfg.reason_phrases,
        legacy_channel_numbers: cfg.legacy_channel_numbers,
        relay_v4: plan.v4.clone(),
        relay_v6: plan.v6.clone(),
        relay_ports: cfg.relay_port_span(),
    }
}

struct ShardHandle {
    thread: Option<JoinHandle<()>>,
    inbox: Sender<Ctl>,
    waker: Arc<Waker>,
}

/// A running server.
pub struct ServerHandle {
    /// The UDP listening addresses, in listener order (ports resolved if 0 was asked for).
    pub udp_addrs: Vec<SocketAddr>,
    /// Every listening address, per transport.
    pub addrs: ListenAddrs,
    /// The relay addresses in use.
    pub relay: RelayPlan,
    /// Shared state (directory, quotas).
    pub shared: Arc<Shared>,
    /// Per-shard counters.
    pub stats: Vec<Arc<ShardStats>>,
    shards: Vec<ShardHandle>,
    control: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("udp_addrs", &self.udp_addrs).field("shards", &self.shards.len()).finish()
    }
}

impl ServerHandle {
    /// Counters summed over shards.
    pub fn totals(&self) -> Totals {
        Totals::sum(&self.stats)
    }

    /// Sends new settings to every shard (each swaps between packets).
    pub fn reload(&self, settings: Arc<Settings>) {
        for s in &self.shards {
            let _ = s.inbox.send(Ctl::Reload(Arc::clone(&settings)));
            let _ = s.waker.wake();
        }
    }

    /// Stops every shard (deleting their allocations) and the control thread, and waits for them.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Release);
        for s in &self.shards {
            let _ = s.inbox.send(Ctl::Shutdown);
            let _ = s.waker.wake();
        }
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Bound listening addresses, per transport, in listener order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenAddrs {
    /// UDP.
    pub udp: Vec<SocketAddr>,
    /// TCP.
    pub tcp: Vec<SocketAddr>,
    /// TLS.
    pub tls: Vec<SocketAddr>,
}

/// Binds one reuse-port socket per shard at `addr`; port 0 is resolved by the first and reused by the
/// rest, so all shards share one group. Returns the sockets and the bound address.
fn bind_group<S>(
    shards: usize,
    mut addr: SocketAddr,
    what: &str,
    bind: impl Fn(SocketAddr) -> io::Result<S>,
    local: impl Fn(&S) -> io::Result<SocketAddr>,
) -> io::Result<(Vec<S>, SocketAddr)> {
    let mut out = Vec::with_capacity(shards);
    for k in 0..shards {
        let sock = bind(addr).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}/{what}: {e}")))?;
        if k == 0 {
            addr = local(&sock)?;
        }
        out.push(sock);
    }
    Ok((out, addr))
}

/// Binds the listeners of every shard (all of them before any shard starts reading).
fn bind_listeners(
    cfg: &Config,
    buffers: socket::Buffers,
    tls: bool,
) -> io::Result<(Vec<shard::Listeners>, ListenAddrs)> {
    let mut per_shard: Vec<shard::Listeners> = (0..cfg.threads).map(|_| shard::Listeners::default()).collect();
    let mut addrs = ListenAddrs::default();
    for ip in &cfg.listen_ips {
        let mut port = cfg.listen_port;
        if cfg.listen_udp {
            let (socks, addr) = bind_group(
                cfg.threads,
                SocketAddr::new(*ip, port),
                "udp",
                |a| socket::reuseport_udp(a, buffers),
                |s| s.local_addr(),
            )?;
            port = addr.port();
            addrs.udp.push(addr);
            for (l, s) in per_shard.iter_mut().zip(socks) {
                l.udp.push(s);
            }
        }
        if cfg.listen_tcp {
            let (socks, addr) =
                bind_group(cfg.threads, SocketAddr::new(*ip, port), "tcp", socket::reuseport_tcp, |s| s.local_addr())?;
            addrs.tcp.push(addr);
            for (l, s) in per_shard.iter_mut().zip(socks) {
                l.tcp.push(s);
            }
        }
        if tls {
            let (socks, addr) =
                bind_group(cfg.threads, SocketAddr::new(*ip, cfg.tls_port), "tls", socket::reuseport_tcp, |s| {
                    s.local_addr()
                })?;
            addrs.tls.push(addr);
            for (l, s) in per_shard.iter_mut().zip(socks) {
                l.tls.push(s);
            }
        }
    }
    Ok((per_shard, addrs))
}

/// Starts a server: binds everything, spawns one shard per configured thread and the control thread.
pub fn start(cfg: &Config) -> io::Result<ServerHandle> {
    let plan = relay_plan(cfg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let settings = Arc::new(settings(cfg, plan.clone(), NonceKey::new(clock::random_bytes())));
    let buffers = socket::Buffers { recv: cfg.recv_buffer, send: cfg.send_buffer };
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::tls::server_config(cert, key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?)
        }
        _ => None,
    };
    let (listeners, addrs) = bind_listeners(cfg, buffers, tls.is_some())?;
    let udp_addrs = addrs.udp.clone();
    let shared = Arc::new(Shared::default());
    let cores = if cfg.pin_cores { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
    let origin = clock::now();
    let origin_unix = clock::unix_now();
    let mut stats = Vec::new();
    let mut shards = Vec::new();
    for (k, shard_listeners) in listeners.into_iter().enumerate() {
        let shard_stats = Arc::new(ShardStats::default());
        let (poll, waker) = shard::new_poll()?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        let seed = u64::from_be_bytes(clock::random_bytes()[..8].try_into().unwrap_or([1; 8]));
        let engine = Engine::new(
            k as u16,
            Arc::clone(&settings),
            Arc::clone(&shared),
            Arc::clone(&shard_stats),
            cfg.shard_port_list(k),
            origin,
            origin_unix,
            seed,
        );
        let parts = ShardParts {
            id: k as u16,
            poll,
            listeners: shard_listeners,
            tls: tls.clone(),
            engine,
            inbox: rx,
            stats: Arc::clone(&shard_stats),
            buffers,
            recv_batch: cfg.recv_batch,
            unallocated_timeout: cfg.unallocated_timeout,
        };
        let core = if cfg.pin_cores {
            let wanted = cfg.core_ids.get(k).copied().unwrap_or(k);
            cores.iter().copied().find(|c| c.id == wanted)
        } else {
            None
        };
        let thread = std::thread::Builder::new().name(format!("turnpike-shard-{k}")).spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    log::warn!("shard {k}: could not pin to core {}", core.id);
                }
            }
            shard::run(parts);
        })?;
        stats.push(shard_stats);
        shards.push(ShardHandle { thread: Some(thread), inbox: tx, waker });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let control = {
        let stats = stats.clone();
        let shared = Arc::clone(&shared);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("turnpike-control".into())
            .spawn(move || control::run(&stats, &shared, &stop))?
    };
    Ok(ServerHandle { udp_addrs, addrs, relay: plan, shared, stats, shards, control: Some(control), stop })
}
