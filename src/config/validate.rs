//! Validation of the file model, one section at a time, into [`Config`]. Every error names the option
//! as the file spells it ([`Locator::error`]: the coturn name in a `turnserver.conf`, the YAML path in
//! YAML), with the line where the file sets it.

use super::file::{
    AbuseSection, AdminSection, AllocationSection, AuthSection, ClusterSection, FileConfig, ListenSection,
    LoggingSection, MetricsSection, PeerSection, ProtocolSection, RelaySection, RuntimeSection, Threads, TlsSection,
};
use super::{
    AdminConfig, ClusterConfig, Config, ConfigError, ExternalIp, Locator, LogFormat, LogLevel, MAX_COALESCE_US,
    OnOutage, UserSecret,
};
use crate::policy::IpRange;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Validates `m` whole; `warnings` are the parser's (options a coturn file sets that do nothing).
pub(super) fn validate(loc: &Locator<'_>, m: &FileConfig, warnings: Vec<String>) -> Result<Config, ConfigError> {
    let mut c = Config { source: loc.file.to_path_buf(), format: loc.format, warnings, ..Config::default() };
    auth(loc, &m.auth, &mut c)?;
    listen(loc, &m.listen, &mut c)?;
    relay(loc, &m.relay, &mut c)?;
    runtime(loc, &m.runtime, &mut c)?;
    allocations(loc, &m.allocations, &mut c)?;
    abuse(loc, &m.abuse, &mut c)?;
    peers(loc, &m.peers, &mut c)?;
    tls(loc, &m.tls, &m.listen, &mut c)?;
    logging(loc, &m.logging, &mut c)?;
    metrics(loc, &m.metrics, &mut c)?;
    protocol(loc, &m.protocol, &mut c)?;
    admin(loc, &m.admin, &mut c)?;
    cluster(loc, &m.cluster, &mut c)?;
    c.model = m.clone();
    Ok(c)
}

fn parse_ips(loc: &Locator<'_>, path: &str, items: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    items
        .iter()
        .map(|s| s.trim().parse::<IpAddr>().map_err(|_| loc.error(path, format!("`{s}` is not an IP address"))))
        .collect()
}

fn parse_ranges(loc: &Locator<'_>, path: &str, items: &[String]) -> Result<Vec<IpRange>, ConfigError> {
    items.iter().map(|s| s.parse::<IpRange>().map_err(|e| loc.error(path, e))).collect()
}

fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b && a > 0).then_some((a, b))
}

fn auth(loc: &Locator<'_>, a: &AuthSection, c: &mut Config) -> Result<(), ConfigError> {
    let realm = a.realm.trim().to_string();
    if realm.is_empty() {
        return Err(
            loc.error("auth.realm", "a realm is required (conventionally your server name, e.g. turn.example.org)")
        );
    }
    if realm.len() > 127 {
        return Err(loc.error("auth.realm", "must be shorter than 128 characters"));
    }
    let mut users = Vec::new();
    for u in &a.users {
        let Some((name, secret)) = u.split_once(':') else {
            return Err(
                loc.error("auth.users", format!("`{}` must be `name:password`", u.split(':').next().unwrap_or("")))
            );
        };
        if name.is_empty() || secret.is_empty() {
            return Err(loc.error("auth.users", "user name and password must not be empty"));
        }
        let secret = match secret.strip_prefix("0x") {
            Some(hex) if hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
                let mut key = [0u8; 16];
                for (i, k) in key.iter_mut().enumerate() {
                    *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
                }
                UserSecret::Key(key)
            }
            _ => UserSecret::Password(secret.to_string()),
        };
        users.push((name.to_string(), secret));
    }
    let secrets: Vec<String> = a.shared_secrets.iter().map(|s| s.trim().to_string()).collect();
    if secrets.iter().any(String::is_empty) {
        return Err(loc.error("auth.shared_secrets", "a shared secret must not be empty"));
    }
    if secrets.is_empty() && users.is_empty() {
        return Err(loc.error(
            "auth.shared_secrets",
            "no credentials configured: set auth.shared_secrets (the homeserver's turn_shared_secret) or auth.users; turnpike never runs as an open relay",
        ));
    }
    c.rest_separator = match a.rest_separator.as_bytes() {
        [b] if b.is_ascii() && !b.is_ascii_digit() => *b,
        _ => {
            return Err(loc.error("auth.rest_separator", "must be one ASCII character that is not a digit"));
        }
    };
    if !(30..=86_400).contains(&a.nonce_lifetime) {
        return Err(loc.error("auth.nonce_lifetime", "must be between 30 and 86400 seconds"));
    }
    c.realm = realm;
    c.users = users;
    c.secrets = secrets;
    c.nonce_lifetime = Duration::from_secs(a.nonce_lifetime);
    Ok(())
}

fn listen(loc: &Locator<'_>, l: &ListenSection, c: &mut Config) -> Result<(), ConfigError> {
    c.listen_ips =
        if l.ips.is_empty() { vec![IpAddr::from([0, 0, 0, 0])] } else { parse_ips(loc, "listen.ips", &l.ips)? };
    if l.port == 0 && loc.file != Path::new("<test>") {
        // Port 0 is only useful to tests, which pick a free port; allow it but say so.
        c.warnings.push("listen.port is 0: an ephemeral port will be chosen".into());
    }
    c.listen_port = l.port;
    c.tls_port = l.tls_port;
    c.listen_udp = l.udp;
    c.listen_tcp = l.tcp;
    c.proxy_from = parse_ranges(loc, "listen.proxy_from", &l.proxy_from)?;
    Ok(())
}

fn relay(loc: &Locator<'_>, r: &RelaySection, c: &mut Config) -> Result<(), ConfigError> {
    c.relay_ips = parse_ips(loc, "relay.ips", &r.ips)?;
    if let Some(any) = c.relay_ips.iter().find(|ip| ip.is_unspecified()) {
        return Err(loc.error(
            "relay.ips",
            format!("`{any}` is not an address: relay sockets need the address peers reach them at"),
        ));
    }
    for e in &r.external_ips {
        let (public, private) = match e.split_once('/') {
            Some((p, q)) => (p, Some(q)),
            None => (e.as_str(), None),
        };
        let bad = || loc.error("relay.external_ips", format!("`{e}` must be PUBLIC or PUBLIC/PRIVATE IP addresses"));
        let public: IpAddr = public.trim().parse().map_err(|_| bad())?;
        let private: Option<IpAddr> = match private {
            Some(p) => Some(p.trim().parse().map_err(|_| bad())?),
            None => None,
        };
        if private.is_some_and(|p| p.is_ipv4() != public.is_ipv4()) {
            return Err(loc.error("relay.external_ips", format!("`{e}`: both addresses must be of one family")));
        }
        if c.external_ips.iter().any(|x: &ExternalIp| x.public.is_ipv4() == public.is_ipv4()) {
            return Err(loc.error("relay.external_ips", "at most one external address per address family"));
        }
        c.external_ips.push(ExternalIp { public, private });
    }
    if r.min_port == 0 || r.min_port > r.max_port {
        let message = format!("the relay range {}-{} is empty or starts at 0", r.min_port, r.max_port);
        return Err(loc.error("relay.min_port", message));
    }
    c.min_port = r.min_port;
    c.max_port = r.max_port;
    Ok(())
}

/// After [`relay`]: the shards share its range.
fn runtime(loc: &Locator<'_>, r: &RuntimeSection, c: &mut Config) -> Result<(), ConfigError> {
    let threads = match &r.threads {
        Threads::Count(n) if (1..=1024).contains(n) => *n,
        Threads::Count(_) => {
            return Err(loc.error("runtime.threads", "must be between 1 and 1024, or `auto`"));
        }
        Threads::Word(w) if w == "auto" => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Threads::Word(w) => {
            return Err(loc.error("runtime.threads", format!("`{w}`: must be a number or `auto`")));
        }
    };
    let mut shard_ports = Vec::new();
    for s in &r.shard_ports {
        let Some(range) = parse_port_range(s) else {
            return Err(loc.error("runtime.shard_ports", format!("`{s}` must be a port range `a-b`")));
        };
        shard_ports.push(range);
    }
    if !shard_ports.is_empty() && shard_ports.len() != threads {
        return Err(loc.error(
            "runtime.shard_ports",
            format!("{} ranges given for {threads} shards: give one per shard", shard_ports.len()),
        ));
    }
    let total_ports = if shard_ports.is_empty() {
        usize::from(c.max_port - c.min_port) + 1
    } else {
        shard_ports.iter().map(|(a, b)| usize::from(b - a) + 1).min().unwrap_or(0) * threads
    };
    if total_ports < 2 * threads {
        return Err(
            loc.error("relay.min_port", format!("{total_ports} relay ports cannot be shared by {threads} shards"))
        );
    }
    if !(1..=3600).contains(&r.unallocated_timeout) {
        return Err(loc.error("runtime.unallocated_timeout", "must be between 1 and 3600 seconds"));
    }
    if r.recv_batch == 0 || r.recv_batch > 1024 {
        return Err(loc.error("runtime.recv_batch", "must be between 1 and 1024"));
    }
    if r.raw_min_batch == 0 || r.raw_min_batch > super::MAX_RAW_BATCH {
        let most = super::MAX_RAW_BATCH;
        return Err(loc.error("runtime.raw_min_batch", format!("must be between 1 and {most}")));
    }
    if r.coalesce_us > MAX_COALESCE_US {
        return Err(loc.error("runtime.coalesce_us", format!("must be between 0 (off) and {MAX_COALESCE_US}")));
    }
    if !r.core_ids.is_empty() && r.core_ids.len() < threads {
        return Err(loc.error("runtime.core_ids", format!("{} cores listed for {threads} shards", r.core_ids.len())));
    }
    c.threads = threads;
    c.pin_cores = r.pin_cores;
    c.core_ids.clone_from(&r.core_ids);
    c.shard_ports = shard_ports;
    c.recv_buffer = r.recv_buffer;
    c.send_buffer = r.send_buffer;
    c.recv_batch = r.recv_batch;
    c.udp_gso = r.udp_gso;
    c.raw_send = r.raw_send;
    c.raw_min_batch = r.raw_min_batch;
    c.coalesce_wait = Duration::from_micros(r.coalesce_us);
    c.coalesce_min_rate = r.coalesce_min_pps;
    c.unallocated_timeout = Duration::from_secs(r.unallocated_timeout);
    if let Some(bad) = r.kernel_interfaces.iter().find(|n| n.is_empty() || n.len() > 15 || n.contains(['/', ' '])) {
        return Err(loc.error("runtime.kernel_interfaces", format!("{bad:?} is not an interface name")));
    }
    c.kernel_path = r.kernel_path;
    c.kernel_interfaces.clone_from(&r.kernel_interfaces);
    Ok(())
}

fn allocations(loc: &Locator<'_>, a: &AllocationSection, c: &mut Config) -> Result<(), ConfigError> {
    if a.default_lifetime < 60 || a.max_lifetime < a.default_lifetime || a.max_lifetime > 86_400 {
        return Err(loc.error(
            "allocations.max_lifetime",
            format!(
                "lifetimes must satisfy 60 <= default ({}) <= max ({}) <= 86400",
                a.default_lifetime, a.max_lifetime
            ),
        ));
    }
    if !(1..=1024).contains(&a.max_permissions) {
        return Err(loc.error("allocations.max_permissions", "must be between 1 and 1024"));
    }
    if a.user_reservations > 1024 {
        return Err(loc.error("allocations.user_reservations", "must be between 0 (none) and 1024"));
    }
    if !(1..=4096).contains(&a.max_channels) {
        return Err(loc.error("allocations.max_channels", "must be between 1 and 4096"));
    }
    for (path, bps) in [("allocations.max_bps", a.max_bps), ("allocations.total_bps", a.total_bps)] {
        if (1..1024).contains(&bps) {
            return Err(
                loc.error(path, "bandwidth limits are bytes per second; below 1024 nothing useful gets through")
            );
        }
    }
    c.default_lifetime = Duration::from_secs(a.default_lifetime);
    c.max_lifetime = Duration::from_secs(a.max_lifetime);
    c.max_permissions = a.max_permissions;
    c.max_channels = a.max_channels;
    c.user_quota = a.user_quota;
    c.total_quota = a.total_quota;
    c.user_reservations = a.user_reservations;
    c.max_bps = a.max_bps;
    c.total_bps = a.total_bps;
    Ok(())
}

fn abuse(loc: &Locator<'_>, a: &AbuseSection, c: &mut Config) -> Result<(), ConfigError> {
    if a.unauth_rate > 0 && a.unauth_burst == 0 {
        return Err(loc.error("abuse.unauth_burst", "must be at least 1 when abuse.unauth_rate is set"));
    }
    if a.unauth_rate == 0 {
        c.warnings.push(
            "abuse.unauth_rate is 0: unauthenticated requests are answered without limit (a reflection amplifier)"
                .into(),
        );
    }
    c.unauth_rate = a.unauth_rate;
    c.unauth_burst = a.unauth_burst;
    c.unauth_connections = a.unauth_connections;
    c.unauth_connections_per_source = a.unauth_connections_per_source;
    c.descriptor_reserve = a.descriptor_reserve;
    Ok(())
}

fn peers(loc: &Locator<'_>, p: &PeerSection, c: &mut Config) -> Result<(), ConfigError> {
    c.allowed_peers = parse_ranges(loc, "peers.allowed", &p.allowed)?;
    c.denied_peers = parse_ranges(loc, "peers.denied", &p.denied)?;
    if p.allow_private {
        c.warnings.push("peers.allow_private is on: the relay may reach private and reserved networks".into());
    }
    if !c.allowed_peers.is_empty() {
        let list: Vec<String> = c.allowed_peers.iter().map(ToString::to_string).collect();
        c.warnings.push(format!("peers.allowed opens normally denied peers: {}", list.join(", ")));
    }
    if !p.no_multicast {
        c.warnings.push("peers.no_multicast is off: multicast peers may be reached".into());
    }
    c.no_multicast_peers = p.no_multicast;
    c.allow_private_peers = p.allow_private;
    c.no_tcp_relay = p.no_tcp_relay;
    Ok(())
}

/// After [`listen`]: TLS may be all a server listens on.
fn tls(loc: &Locator<'_>, t: &TlsSection, l: &ListenSection, c: &mut Config) -> Result<(), ConfigError> {
    if t.cert.is_some() != t.pkey.is_some() {
        return Err(loc.error("tls.cert", "tls.cert and tls.pkey must be given together"));
    }
    if !l.udp && !l.tcp && t.cert.is_none() {
        return Err(loc.error("listen.udp", "UDP, TCP and TLS are all off: nothing to listen on"));
    }
    if let (Some(cert), Some(key)) = (&t.cert, &t.pkey) {
        // Fail at start (and refuse a reload) rather than at the first handshake.
        crate::tls::server_config(Path::new(cert), Path::new(key)).map_err(|e| loc.error("tls.cert", e))?;
    }
    c.tls_cert = t.cert.as_ref().map(PathBuf::from);
    c.tls_key = t.pkey.as_ref().map(PathBuf::from);
    Ok(())
}

fn logging(loc: &Locator<'_>, l: &LoggingSection, c: &mut Config) -> Result<(), ConfigError> {
    let level = match l.level.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(loc.error("logging.level", format!("`{other}`: use error, warn, info, debug or trace")));
        }
    };
    c.syslog_facility = match l.syslog_facility.as_str() {
        "daemon" => 3,
        "user" => 1,
        "auth" => 4,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        other => {
            return Err(
                loc.error("logging.syslog_facility", format!("`{other}`: use daemon, user, auth or local0-local7"))
            );
        }
    };
    c.log_format = match l.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(loc.error("logging.format", format!("`{other}`: use text or json"))),
    };
    c.log_level = LogLevel(level);
    c.syslog = l.syslog;
    c.log_file = l.file.as_ref().map(PathBuf::from);
    c.syslog_socket = PathBuf::from(&l.syslog_socket);
    Ok(())
}

fn metrics(loc: &Locator<'_>, m: &MetricsSection, c: &mut Config) -> Result<(), ConfigError> {
    let Some(s) = &m.listen else {
        return Ok(());
    };
    let addr: std::net::SocketAddr =
        s.parse().map_err(|_| loc.error("metrics.listen", format!("`{s}` must be IP:PORT, e.g. 127.0.0.1:9641")))?;
    if !addr.ip().is_loopback() {
        c.warnings.push(format!("metrics.listen {addr} is not loopback: put it behind a firewall or a proxy"));
    }
    c.metrics_listen = Some(addr);
    Ok(())
}

fn protocol(loc: &Locator<'_>, p: &ProtocolSection, c: &mut Config) -> Result<(), ConfigError> {
    let software = p.software.clone().filter(|s| !s.is_empty());
    if software.as_ref().is_some_and(|s| s.len() > 127) {
        return Err(loc.error("protocol.software", "must be shorter than 128 characters"));
    }
    c.software = software;
    c.reason_phrases = p.reason_phrases;
    c.legacy_channel_numbers = p.legacy_channel_numbers;
    Ok(())
}

fn admin(loc: &Locator<'_>, a: &AdminSection, c: &mut Config) -> Result<(), ConfigError> {
    c.stop_grace = Duration::from_secs(a.stop_grace);
    let Some(listen) = &a.listen else {
        return Ok(());
    };
    let listen: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| loc.error("admin.listen", format!("`{listen}` must be IP:PORT, e.g. 127.0.0.1:9642")))?;
    let Some(token_file) = &a.token_file else {
        return Err(loc.error(
            "admin.listen",
            "the admin API needs admin.token_file (a file with the bearer token every request must carry, \
             e.g. `openssl rand -hex 32 > /etc/turnpike/admin.token`)",
        ));
    };
    if !listen.ip().is_loopback() {
        c.warnings.push(format!(
            "admin.listen {listen} is not loopback: anyone who can reach it and holds the token can end calls"
        ));
    }
    c.admin = Some(AdminConfig { listen, token_file: PathBuf::from(token_file) });
    Ok(())
}

fn cluster(loc: &Locator<'_>, k: &ClusterSection, c: &mut Config) -> Result<(), ConfigError> {
    let on_outage = match k.on_outage.as_str() {
        "local" => OnOutage::Local,
        "refuse" => OnOutage::Refuse,
        other => return Err(loc.error("cluster.on_outage", format!("`{other}`: use local or refuse"))),
    };
    let Some(redis) = &k.redis else {
        return Ok(());
    };
    if !(redis.starts_with("redis://") || redis.starts_with("rediss://") || redis.starts_with("redis+unix://")) {
        return Err(loc.error("cluster.redis", format!("`{redis}`: use redis://HOST:PORT/DB or rediss://HOST:PORT/DB")));
    }
    if k.lease < 2 {
        return Err(loc.error("cluster.lease", "at least 2 seconds (the lease is renewed every third of it)"));
    }
    let alternate = match &k.alternate {
        None => None,
        Some(a) => Some(a.parse().map_err(|_| loc.error("cluster.alternate", format!("`{a}` must be IP:PORT")))?),
    };
    let node = match &k.node {
        Some(n) if !n.is_empty() && n.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) => n.clone(),
        Some(n) => return Err(loc.error("cluster.node", format!("`{n}`: letters, digits, `-`, `_` and `.` only"))),
        None => nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "turnpike".into()),
    };
    c.cluster =
        Some(ClusterConfig { redis: redis.clone(), node, alternate, lease: Duration::from_secs(k.lease), on_outage });
    Ok(())
}
