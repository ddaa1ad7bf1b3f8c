//! Start-up: turn a [`Config`] into running shards and a control thread.
//!
//! Every socket is bound before any shard starts reading, so the `SO_REUSEPORT` group is complete
//! (and the kernel's flow-to-socket mapping stable) from the first datagram on.

use crate::admission::ConnLimits;
use crate::auth::NonceKey;
use crate::config::preflight::Severity;
use crate::config::{Config, options};
use crate::control::admin::AdminCounters;
use crate::control::{self, ServerCounters};
use crate::descriptors;
use crate::fleet::{self, FleetCounters};
use crate::kernel_path::KernelPath;
use crate::policy::PeerPolicy;
use crate::proto::{Engine, RelayAddr, Settings};
use crate::shard::{self, CoalesceSettings, Ctl, ShardLink, ShardParts, clock, socket};
use crate::shared::Shared;
use crate::stats::{ShardStats, Totals};
use crossbeam_channel::Sender;
use mio::Waker;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
        user_reservations: cfg.user_reservations,
        max_bps: cfg.max_bps,
        shard_total_bps: cfg.total_bps / cfg.threads.max(1) as u64,
        unauth_rate: cfg.unauth_rate,
        unauth_burst: cfg.unauth_burst,
        software: cfg.software.as_deref().map(Into::into),
        reason_phrases: cfg.reason_phrases,
        legacy_channel_numbers: cfg.legacy_channel_numbers,
        relay_v4: plan.v4.clone(),
        relay_v6: plan.v6.clone(),
    }
}

struct ShardHandle {
    thread: Option<JoinHandle<()>>,
    inbox: Sender<Ctl>,
    waker: Arc<Waker>,
    applied: Arc<AtomicU64>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The new configuration generation.
    pub generation: u64,
    /// Changed options that only take effect after a restart (kept at their running values).
    pub restart_required: Vec<&'static str>,
    /// Whether every shard acknowledged the new generation within the wait.
    pub applied_everywhere: bool,
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
    /// Reload counters.
    pub counters: Arc<ServerCounters>,
    config: parking_lot::Mutex<Config>,
    nonce_key: NonceKey,
    /// The bound metrics address, when the endpoint is enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The bound admin API address, when it is enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Set when the server begins to stop (the admin API's `/readyz` fails).
    stopping: Arc<AtomicBool>,
    shards: Vec<ShardHandle>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// The XDP program, when `runtime.kernel_path` runs it; dropped (detached) after the shards
    /// stopped and removed their entries.
    kernel_path: Option<KernelPath>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("udp_addrs", &self.udp_addrs).field("shards", &self.shards.len()).finish()
    }
}

impl ServerHandle {
    /// The kernel path's own counts when it runs: datagrams it relayed to peers, to clients, and
    /// installed channels' datagrams it left to user space for want of a route.
    pub fn kernel_path_stats(&self) -> Option<[u64; 3]> {
        self.kernel_path.as_ref().map(KernelPath::stats)
    }

    /// Counters summed over shards.
    pub fn totals(&self) -> Totals {
        Totals::sum(&self.stats)
    }

    /// Re-reads the configuration from `path` and applies it: validated whole first (an invalid file
    /// changes nothing), then each shard swaps settings between two packets and acknowledges.
    /// Allocations, permissions and channels survive (except those the new peer policy refuses).
    /// Options that need a restart keep their running values and are reported.
    pub fn reload_from(&self, path: &std::path::Path) -> Result<ReloadReport, String> {
        let refused = |e: String| {
            self.counters.reloads[1].fetch_add(1, Ordering::Relaxed);
            e
        };
        // The same gate as a start (`turnpike check`): an expired certificate is refused here too.
        let checked = crate::config::preflight::check(path, clock::unix_now());
        let Some(new) = checked.config.filter(|_| checked.findings.iter().all(|f| f.severity != Severity::Error))
        else {
            let errors: Vec<String> =
                checked.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.what.to_string()).collect();
            return Err(refused(errors.join("; ")));
        };
        let mut running = self.config.lock();
        // Options that need a restart keep their running values (so the next diff is against
        // reality); turning TLS on or off does too (its listeners are bound at start).
        let mut restart_required: Vec<&'static str> = options::changed(&running.model, &new.model)
            .into_iter()
            .filter(|o| o.reload == options::Reload::Restart)
            .map(|o| o.spelled(new.format))
            .collect();
        let mut model = options::keep_restart_only(&new.model, &running.model);
        if model.tls.cert.is_some() != running.model.tls.cert.is_some() {
            model.tls = running.model.tls.clone();
            restart_required.push("tls (turning it on or off)");
        }
        let new = new.with_model(model).map_err(|e| refused(e.to_string()))?;
        let tls = match (&new.tls_cert, &new.tls_key, self.addrs.tls.is_empty()) {
            (Some(cert), Some(key), false) => Some(crate::tls::server_config(cert, key).map_err(refused)?),
            _ => None,
        };
        let settings = Arc::new(settings(&new, self.relay.clone(), self.nonce_key.clone()));
        let generation = self.counters.generation.fetch_add(1, Ordering::AcqRel) + 1;
        for s in &self.shards {
            let _ = s.inbox.send(Ctl::Reload(Arc::clone(&settings), generation));
            if let Some(tls) = &tls {
                let _ = s.inbox.send(Ctl::ReloadTls(Arc::clone(tls)));
            }
            let _ = s.waker.wake();
        }
        log::set_max_level(new.log_level.0);
        let fd_limit = descriptor_limit();
        self.shared.conns.set_limits(conn_limits(&new, fd_limit), fd_limit);
        *running = new;
        drop(running);
        self.counters.reloads[0].fetch_add(1, Ordering::Relaxed);
        let applied_everywhere = self.wait_applied(generation);
        Ok(ReloadReport { generation, restart_required, applied_everywhere })
    }

    #[allow(clippy::disallowed_methods)] // the control side may sleep while waiting for acknowledgements
    fn wait_applied(&self, generation: u64) -> bool {
        for _ in 0..200 {
            if self.shards.iter().all(|s| s.applied.load(Ordering::Acquire) >= generation) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    /// Stops taking new allocations (SIGTERM with `admin.stop_grace`), and waits until none is left or
    /// `grace` has passed; returns how many were left.
    #[allow(clippy::disallowed_methods)] // the main thread waits for calls to end
    pub fn drain_for(&self, grace: std::time::Duration) -> usize {
        self.stopping.store(true, Ordering::Release);
        self.shared.operator.set_draining(true);
        // Said once the node is draining: whoever reads the line finds /readyz failing already.
        log::info!("stopping: draining for up to {grace:?} (admin.stop_grace) while calls end");
        let deadline = clock::now() + grace;
        loop {
            let left = self.totals().engine.allocations() as usize;
            if left == 0 || clock::now() >= deadline {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.config.lock().clone()
    }

    /// Stops every shard (deleting their allocations) and the control thread, and waits for them.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stopping.store(true, Ordering::Release);
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
        for t in self.threads.drain(..) {
            let _ = t.join();
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

/// Refuses fixed listening ports that another process holds (see [`socket::ensure_unused`]). Every
/// address is checked before any shard socket is bound, so listeners of this server that overlap (a
/// wildcard beside a specific address) do not count as another process.
fn ensure_ports_unused(cfg: &Config, tls: bool) -> io::Result<()> {
    for ip in &cfg.listen_ips {
        let mut wanted = Vec::new();
        if cfg.listen_port != 0 {
            if cfg.listen_udp {
                wanted.push((cfg.listen_port, "udp", socket2::Type::DGRAM));
            }
            if cfg.listen_tcp {
                wanted.push((cfg.listen_port, "tcp", socket2::Type::STREAM));
            }
        }
        if tls && cfg.tls_port != 0 {
            wanted.push((cfg.tls_port, "tls", socket2::Type::STREAM));
        }
        for (port, what, ty) in wanted {
            let addr = SocketAddr::new(*ip, port);
            socket::ensure_unused(addr, ty).map_err(|e| {
                let why = if e.kind() == io::ErrorKind::AddrInUse {
                    "another process is already using this port (another turnpike, or coturn?)".to_string()
                } else {
                    e.to_string()
                };
                io::Error::new(e.kind(), format!("cannot listen on {addr}/{what}: {why}"))
            })?;
        }
    }
    Ok(())
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

/// UDP and TCP listener groups on one address (each present when enabled), sharing one port.
type UdpTcpGroups = ((Vec<std::net::UdpSocket>, Option<SocketAddr>), (Vec<std::net::TcpListener>, Option<SocketAddr>));

fn bind_udp_tcp(cfg: &Config, ip: IpAddr, buffers: socket::Buffers) -> io::Result<UdpTcpGroups> {
    let mut port = cfg.listen_port;
    let mut udp = (Vec::new(), None);
    if cfg.listen_udp {
        let (socks, addr) = bind_group(
            cfg.threads,
            SocketAddr::new(ip, port),
            "udp",
            |a| socket::reuseport_udp(a, buffers),
            |s| s.local_addr(),
        )?;
        port = addr.port();
        udp = (socks, Some(addr));
    }
    let mut tcp = (Vec::new(), None);
    if cfg.listen_tcp {
        let (socks, addr) =
            bind_group(cfg.threads, SocketAddr::new(ip, port), "tcp", socket::reuseport_tcp, |s| s.local_addr())?;
        tcp = (socks, Some(addr));
    }
    Ok((udp, tcp))
}

/// Binds the listeners of every shard (all of them before any shard starts reading).
fn bind_listeners(
    cfg: &Config,
    buffers: socket::Buffers,
    tls: bool,
) -> io::Result<(Vec<shard::Listeners>, ListenAddrs)> {
    ensure_ports_unused(cfg, tls)?;
    let mut per_shard: Vec<shard::Listeners> = (0..cfg.threads).map(|_| shard::Listeners::default()).collect();
    let mut addrs = ListenAddrs::default();
    for ip in &cfg.listen_ips {
        // UDP and TCP share the port. With port 0 (tests), the port UDP was given may already be taken
        // for TCP: then try another ephemeral port.
        let attempts = if cfg.listen_port == 0 { 32 } else { 1 };
        let mut bound = None;
        for attempt in 1..=attempts {
            match bind_udp_tcp(cfg, *ip, buffers) {
                Ok(pair) => {
                    bound = Some(pair);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < attempts => continue,
                Err(e) => return Err(e),
            }
        }
        let Some(((udp, udp_addr), (tcp, tcp_addr))) = bound else {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("cannot listen on {ip}")));
        };
        addrs.udp.extend(udp_addr);
        addrs.tcp.extend(tcp_addr);
        for (l, s) in per_shard.iter_mut().zip(udp) {
            l.udp.push(s);
        }
        for (l, s) in per_shard.iter_mut().zip(tcp) {
            l.tcp.push(s);
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

/// The limits of connections without an allocation `cfg` asks for, under the descriptor limit; warns
/// when the reserve leaves no descriptor for connections.
fn conn_limits(cfg: &Config, fd_limit: u64) -> ConnLimits {
    let limits = ConnLimits::resolve(
        cfg.unauth_connections,
        cfg.unauth_connections_per_source,
        cfg.descriptor_reserve,
        fd_limit,
    );
    if limits.descriptor_reserve >= fd_limit {
        log::warn!(
            "abuse.descriptor_reserve ({}) is not below the descriptor limit ({fd_limit}): every TCP/TLS connection is \
             closed at once; lower it (0 = a quarter of the limit) or raise the limit",
            limits.descriptor_reserve
        );
    }
    limits
}

/// The soft descriptor limit in force.
fn descriptor_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Raises the descriptor limit and grows the descriptor table for the relay range up front (see
/// [`descriptors`]); warns when the limit caps allocations below what the range allows.
fn reserve_descriptors(cfg: &Config, plan: &RelayPlan) {
    let ports = u64::from(cfg.max_port.saturating_sub(cfg.min_port)) + 1;
    let addresses = (plan.v4.len() + plan.v6.len()) as u64;
    let wanted = descriptors::relay_sockets_wanted(ports, addresses, cfg.total_quota) + descriptors::HEADROOM;
    match descriptors::prepare(wanted) {
        Ok(budget) if budget.short() => log::warn!(
            "the descriptor limit ({}) is below what the relay range can use ({}): allocations fail with 508 \
             beyond about {}; raise it (LimitNOFILE= in the systemd unit, ulimit -n)",
            budget.limit,
            budget.wanted,
            budget.limit.saturating_sub(descriptors::HEADROOM.min(budget.limit / 2))
        ),
        Ok(budget) => log::debug!("descriptor limit {}, table sized for {}", budget.limit, budget.reserved),
        Err(e) => log::warn!("cannot prepare the descriptor table: {e}"),
    }
}

/// Opens shard `k`'s raw socket for `runtime.raw_send`; without one (no `CAP_NET_RAW`) the shard sends
/// through its relay sockets, as with the option off.
fn open_raw_socket(k: usize, send_buffer: usize, min_batch: usize) -> Option<shard::rawsend::RawSocket> {
    match shard::rawsend::RawSocket::open(send_buffer, min_batch) {
        Ok(sock) => {
            if k == 0 {
                log::info!(
                    "runtime.raw_send: lone relayed datagrams leave together through raw sockets (one per shard and family)"
                );
            }
            Some(sock)
        }
        Err(e) => {
            let say = if k == 0 { log::Level::Info } else { log::Level::Debug };
            log::log!(
                say,
                "runtime.raw_send: no raw socket ({e}; it needs CAP_NET_RAW): relayed datagrams leave through \
                 their relay sockets"
            );
            None
        }
    }
}

/// Gives up `CAP_NET_RAW`, for this thread and the threads it starts (the shards and the control
/// thread), once the raw sockets are open: an `IPPROTO_RAW` socket receives nothing, and without the
/// capability no other raw socket can be opened, so a shard holds no more than it uses. Nothing else
/// in turnpike needs the capability.
fn give_up_net_raw() {
    use caps::{CapSet, Capability};
    // The ambient and effective sets must shrink before the permitted set can.
    for set in [CapSet::Ambient, CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        if let Err(e) = caps::drop(None, set, Capability::CAP_NET_RAW) {
            log::debug!("cannot give up CAP_NET_RAW ({set:?}): {e}");
        }
    }
}

/// Starts a server: binds everything, spawns one shard per configured thread and the control thread.
pub fn start(cfg: &Config) -> io::Result<ServerHandle> {
    let plan = relay_plan(cfg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let nonce_key = NonceKey::new(clock::random_bytes()?);
    let settings = Arc::new(settings(cfg, plan.clone(), nonce_key.clone()));
    let buffers = socket::Buffers { recv: cfg.recv_buffer, send: cfg.send_buffer };
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::tls::server_config(cert, key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?)
        }
        _ => None,
    };
    reserve_descriptors(cfg, &plan);
    let fd_limit = descriptor_limit();
    let (listeners, addrs) = bind_listeners(cfg, buffers, tls.is_some())?;
    let udp_addrs = addrs.udp.clone();
    let relays = plan.v4.iter().chain(&plan.v6).map(|r| (r.bind, r.advertised));
    let shared = Arc::new(Shared::new(relays, cfg.listen_ips.iter().copied()));
    let limits = conn_limits(cfg, fd_limit);
    shared.conns.set_limits(limits, fd_limit);
    log::debug!(
        "connections without an allocation: at most {} ({} per source); descriptors from {} kept for relay sockets",
        limits.unauthenticated,
        limits.per_source,
        fd_limit.saturating_sub(limits.descriptor_reserve)
    );
    let cores = if cfg.pin_cores { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
    let origin = clock::now();
    let origin_unix = clock::unix_now();
    let kernel_ips: Vec<IpAddr> =
        cfg.listen_ips.iter().chain(plan.v4.iter().chain(&plan.v6).map(|r| &r.bind)).copied().collect();
    let kernel_path = KernelPath::start(cfg.kernel_path, &cfg.kernel_interfaces, &kernel_ips)
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
    let raw_sockets: Vec<Option<shard::rawsend::RawSocket>> = (0..listeners.len())
        .map(|k| if cfg.raw_send { open_raw_socket(k, cfg.send_buffer, cfg.raw_min_batch) } else { None })
        .collect();
    give_up_net_raw();
    let mut stats = Vec::new();
    let mut shards = Vec::new();
    for (k, (shard_listeners, raw_socket)) in listeners.into_iter().zip(raw_sockets).enumerate() {
        let shard_stats = Arc::new(ShardStats::default());
        let (poll, waker) = shard::new_poll()?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        let applied = Arc::new(AtomicU64::new(0));
        let seed = clock::random_bytes()?;
        let engine = Engine::new(
            k as u16,
            Arc::clone(&settings),
            Arc::clone(&shared) as Arc<dyn turnpike_proto::Cluster>,
            Arc::clone(&shard_stats.engine),
            cfg.shard_port_list(k),
            origin,
            origin_unix,
            &seed,
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
            udp_gso: cfg.udp_gso,
            raw_socket,
            coalesce: CoalesceSettings { max_wait: cfg.coalesce_wait, min_rate: cfg.coalesce_min_rate },
            unallocated_timeout: cfg.unallocated_timeout,
            proxy_from: cfg.proxy_from.clone(),
            applied: Arc::clone(&applied),
            shared: Arc::clone(&shared),
            kernel: match &kernel_path {
                Some(path) => Some(path.shard_maps(k == 0).map_err(|e| io::Error::other(format!("kernel path: {e}")))?),
                None => None,
            },
        };
        let core = if cfg.pin_cores {
            let wanted = cfg.core_ids.get(k).copied().unwrap_or(k);
            cores.iter().copied().find(|c| c.id == wanted)
        } else {
            None
        };
        // Counted as alive from its start: /healthz must not fail before the shard's first beat.
        shared.operator.beat(k as u16, clock::now(), None);
        let thread = std::thread::Builder::new().name(format!("turnpike-shard-{k}")).spawn(move || {
            if let Some(core) = core
                && !core_affinity::set_for_current(core)
            {
                log::warn!("shard {k}: could not pin to core {}", core.id);
            }
            shard::run(parts);
        })?;
        stats.push(shard_stats);
        shards.push(ShardHandle { thread: Some(thread), inbox: tx, waker, applied });
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
    let counters = Arc::new(ServerCounters::default());
    let mut threads = vec![control];
    let links: Vec<ShardLink> =
        shards.iter().map(|s| ShardLink { inbox: s.inbox.clone(), waker: Arc::clone(&s.waker) }).collect();
    let admin_counters = Arc::new(AdminCounters::default());
    let fleet_counters = Arc::new(FleetCounters::default());
    let node = cfg.cluster.as_ref().map_or_else(
        || nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "turnpike".into()),
        |c| c.node.clone(),
    );
    let fleet = match &cfg.cluster {
        Some(cluster) => {
            let alternate = cluster
                .alternate
                .or_else(|| addrs.udp.first().copied())
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 3478)));
            let (handle, thread) = fleet::start(fleet::FleetParts {
                config: cluster.clone(),
                alternate,
                shared: Arc::clone(&shared),
                shards: links.clone(),
                counters: Arc::clone(&fleet_counters),
                stop: Arc::clone(&stop),
            })?;
            threads.push(thread);
            Some(handle)
        }
        None => None,
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let mut admin_addr = None;
    if let Some(admin) = &cfg.admin {
        let token = control::admin::read_token(&admin.token_file).map_err(io::Error::other)?;
        let listener = control::http::bind(admin.listen).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {} for the admin API: {e}", admin.listen))
        })?;
        admin_addr = listener.local_addr().ok();
        shared.operator.enable_publishing();
        let api = Arc::new(control::admin::Admin {
            token,
            node,
            shared: Arc::clone(&shared),
            shards: links,
            fleet,
            counters: Arc::clone(&admin_counters),
            stopping: Arc::clone(&stopping),
        });
        let stop = Arc::clone(&stop);
        let http_counters = Arc::new(control::http::HttpCounters::default());
        threads.push(std::thread::Builder::new().name("turnpike-admin".into()).spawn(move || {
            let cap = control::http::connection_cap(fd_limit);
            if let Err(e) = control::http::serve(listener, api.handler(), http_counters, cap, &stop) {
                log::error!("admin API stopped: {e}");
            }
        })?);
    }
    let mut metrics_addr = None;
    if let Some(listen) = cfg.metrics_listen {
        let listener = control::http::bind(listen)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {listen} for metrics: {e}")))?;
        metrics_addr = listener.local_addr().ok();
        let sources = control::metrics::Sources {
            stats: stats.clone(),
            shared: Arc::clone(&shared),
            server: Arc::clone(&counters),
            http: Arc::new(control::http::HttpCounters::default()),
            admin: admin_counters,
            fleet: fleet_counters,
        };
        let stop = Arc::clone(&stop);
        threads.push(std::thread::Builder::new().name("turnpike-http".into()).spawn(move || {
            let cap = control::http::connection_cap(fd_limit);
            if let Err(e) = control::metrics::serve(listener, sources, cap, &stop) {
                log::error!("metrics endpoint stopped: {e}");
            }
        })?);
    }
    Ok(ServerHandle {
        udp_addrs,
        addrs,
        relay: plan,
        shared,
        stats,
        counters,
        config: parking_lot::Mutex::new(cfg.clone()),
        nonce_key,
        metrics_addr,
        admin_addr,
        stopping,
        shards,
        threads,
        stop,
        kernel_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The core's `Settings::new` (what tests, fuzzing and benchmarks start from) keeps the
    /// configuration's defaults.
    #[test]
    fn the_cores_default_settings_are_the_configurations() {
        let yaml = "listen: {ips: [127.0.0.1]}\nrelay: {ips: [127.0.0.1]}\nauth: {realm: r, shared_secrets: [s]}\n";
        let cfg = crate::config::parse(std::path::Path::new("<test>.yaml"), yaml).unwrap();
        let configured = settings(&cfg, relay_plan(&cfg).unwrap(), NonceKey::new([1; 32]));
        let core = Settings::new(cfg.credential_store(), NonceKey::new([1; 32]), Vec::new(), Vec::new());
        let defaults = |s: &Settings| {
            (
                (s.nonce_lifetime, s.default_lifetime, s.max_lifetime, s.max_permissions, s.max_channels),
                (s.user_quota, s.total_quota, s.user_reservations, s.max_bps, s.shard_total_bps),
                (s.unauth_rate, s.unauth_burst, s.software.clone(), s.reason_phrases, s.legacy_channel_numbers),
            )
        };
        assert_eq!(defaults(&configured), defaults(&core));
    }
}
