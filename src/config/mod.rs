//! Configuration: read a YAML file or a coturn `turnserver.conf` (detected), validate it whole, and
//! produce a [`Config`]. Errors name the file, the line and the option.

pub mod coturn;
pub mod file;

use crate::auth::CredentialStore;
use crate::policy::IpRange;
use file::{FileConfig, Threads};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error, pointing at the file, line and option.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The file (or `<embedded>`).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The option, in the file's own spelling.
    pub option: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.option.is_empty() {
            write!(f, ": option `{}`", self.option)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The file formats turnpike reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// turnpike's YAML.
    Yaml,
    /// coturn's turnserver.conf.
    Coturn,
}

/// `external-ip`: the public address, and optionally the private address it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalIp {
    /// Advertised to clients.
    pub public: IpAddr,
    /// The local address NAT maps the public one to.
    pub private: Option<IpAddr>,
}

/// A static user's secret.
#[derive(Clone, PartialEq, Eq)]
pub enum UserSecret {
    /// A plain password.
    Password(String),
    /// A precomputed MD5 long-term key.
    Key([u8; 16]),
}

impl fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from.
    pub source: PathBuf,
    /// Which format it was.
    pub format: Format,
    /// Realm.
    pub realm: String,
    /// Listening addresses.
    pub listen_ips: Vec<IpAddr>,
    /// UDP/TCP port.
    pub listen_port: u16,
    /// TLS port.
    pub tls_port: u16,
    /// UDP listeners on.
    pub listen_udp: bool,
    /// TCP listeners on.
    pub listen_tcp: bool,
    /// Relay socket addresses.
    pub relay_ips: Vec<IpAddr>,
    /// NAT mappings.
    pub external_ips: Vec<ExternalIp>,
    /// Relay port range.
    pub min_port: u16,
    /// Relay port range.
    pub max_port: u16,
    /// REST secrets.
    pub secrets: Vec<String>,
    /// Static users.
    pub users: Vec<(String, UserSecret)>,
    /// REST username separator.
    pub rest_separator: u8,
    /// Nonce validity.
    pub nonce_lifetime: Duration,
    /// Default allocation lifetime.
    pub default_lifetime: Duration,
    /// Maximum allocation lifetime.
    pub max_lifetime: Duration,
    /// Permissions per allocation.
    pub max_permissions: usize,
    /// Channels per allocation.
    pub max_channels: usize,
    /// Allocations per user.
    pub user_quota: u32,
    /// Allocations in total.
    pub total_quota: u32,
    /// Unredeemed EVEN-PORT reservations per user.
    pub user_reservations: u32,
    /// Bytes/s per allocation and direction.
    pub max_bps: u64,
    /// Bytes/s for the server per direction.
    pub total_bps: u64,
    /// Unauthenticated requests per source per second.
    pub unauth_rate: u64,
    /// Their burst.
    pub unauth_burst: u64,
    /// TCP/TLS connections without an allocation (0 = derived from the descriptor limit).
    pub unauth_connections: u32,
    /// Of those per source (0 = derived).
    pub unauth_connections_per_source: u32,
    /// Descriptors kept for relay sockets (0 = derived).
    pub descriptor_reserve: u64,
    /// Allowed peer ranges.
    pub allowed_peers: Vec<IpRange>,
    /// Denied peer ranges.
    pub denied_peers: Vec<IpRange>,
    /// Refuse multicast peers.
    pub no_multicast_peers: bool,
    /// Relay to private ranges on purpose.
    pub allow_private_peers: bool,
    /// Refuse TCP relay.
    pub no_tcp_relay: bool,
    /// TLS certificate chain.
    pub tls_cert: Option<PathBuf>,
    /// TLS key.
    pub tls_key: Option<PathBuf>,
    /// Shards.
    pub threads: usize,
    /// Pin shards to cores.
    pub pin_cores: bool,
    /// Cores to pin to.
    pub core_ids: Vec<usize>,
    /// Per-shard port ranges, if not split evenly.
    pub shard_ports: Vec<(u16, u16)>,
    /// SO_RCVBUF.
    pub recv_buffer: usize,
    /// SO_SNDBUF.
    pub send_buffer: usize,
    /// Datagrams per socket per wake-up.
    pub recv_batch: usize,
    /// UDP generic segmentation offload for relayed datagrams.
    pub udp_gso: bool,
    /// Relayed datagrams of many allocations leave through one raw socket per shard and family, if permitted.
    pub raw_send: bool,
    /// Fewest lone relayed datagrams of one family in a flush that take the raw socket.
    pub raw_min_batch: usize,
    /// Longest receive-coalescing pause (zero: off).
    pub coalesce_wait: Duration,
    /// Datagrams per second per shard from which it coalesces.
    pub coalesce_min_rate: u64,
    /// TCP/TLS connections without an allocation are closed after this long idle.
    pub unallocated_timeout: Duration,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// Syslog.
    pub syslog: bool,
    /// Log file.
    pub log_file: Option<PathBuf>,
    /// SOFTWARE attribute.
    pub software: Option<String>,
    /// Reason phrases in errors.
    pub reason_phrases: bool,
    /// Accept RFC 5766 channel numbers (0x5000-0x7FFF) too.
    pub legacy_channel_numbers: bool,
    /// The metrics endpoint, if enabled.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Syslog facility (coturn has none; default daemon).
    pub syslog_facility: u8,
    /// Warnings to log at start (ignored options, weakened defaults).
    pub warnings: Vec<String>,
}

/// The configuration `turnpike dev` runs on: loopback only, a development secret, loopback peers allowed.
pub const DEV_CONFIG: &str = include_str!("../../config/dev.yaml");
/// Longest receive-coalescing pause a configuration may ask for, microseconds (10 ms: far beyond any
/// useful value; longer pauses would hold datagrams for a noticeable time).
pub const MAX_COALESCE_US: u64 = 10_000;

/// Where an option lives, for error messages.
struct Locator<'a> {
    file: &'a Path,
    format: Format,
    text: &'a str,
    coturn_lines: HashMap<String, usize>,
}

impl Locator<'_> {
    fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let (section, key) = path.split_once('.').unwrap_or(("", path));
        let (line, option) = match self.format {
            Format::Yaml => (file::yaml_line_of(self.text, section, key), path.to_string()),
            Format::Coturn => (self.coturn_lines.get(path).copied(), coturn_name(path).to_string()),
        };
        ConfigError { file: self.file.to_path_buf(), line, option, message: message.into() }
    }
}

fn coturn_name(path: &str) -> &str {
    match path {
        "auth.shared_secrets" => "static-auth-secret",
        "auth.realm" => "realm",
        "auth.users" => "user",
        "auth.rest_separator" => "rest-api-separator",
        "auth.nonce_lifetime" => "stale-nonce",
        "listen.port" => "listening-port",
        "listen.tls_port" => "tls-listening-port",
        "listen.ips" => "listening-ip",
        "relay.ips" => "relay-ip",
        "relay.external_ips" => "external-ip",
        "relay.min_port" => "min-port",
        "relay.max_port" => "max-port",
        "peers.denied" => "denied-peer-ip",
        "peers.allowed" => "allowed-peer-ip",
        "allocations.user_quota" => "user-quota",
        "allocations.total_quota" => "total-quota",
        "allocations.max_lifetime" => "max-allocate-lifetime",
        "runtime.threads" => "relay-threads",
        "tls.cert" => "cert",
        "tls.pkey" => "pkey",
        "logging.file" => "log-file",
        other => other,
    }
}

/// Guesses the format: `.yaml`/`.yml` is YAML, `.conf` is coturn, otherwise YAML if a line looks like a
/// YAML mapping key.
pub fn detect_format(path: &Path, text: &str) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => return Format::Yaml,
        Some("conf") => return Format::Coturn,
        _ => {}
    }
    let yamlish = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).any(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    });
    if yamlish { Format::Yaml } else { Format::Coturn }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        option: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is used for format detection and messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let format = detect_format(path, text);
    let mut loc = Locator { file: path, format, text, coturn_lines: HashMap::new() };
    let (model, warnings) = match format {
        Format::Yaml => {
            let model = file::parse_yaml(text).map_err(|e| ConfigError {
                file: path.to_path_buf(),
                line: e.line,
                option: String::new(),
                message: e.message,
            })?;
            (model, Vec::new())
        }
        Format::Coturn => {
            let parsed = coturn::parse(text).map_err(|e| ConfigError {
                file: path.to_path_buf(),
                line: Some(e.line),
                option: e.option,
                message: e.message,
            })?;
            loc.coturn_lines = parsed.lines;
            (parsed.config, parsed.warnings)
        }
    };
    validate(&loc, model, warnings)
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

fn validate(loc: &Locator<'_>, m: FileConfig, mut warnings: Vec<String>) -> Result<Config, ConfigError> {
    let realm = m.auth.realm.trim().to_string();
    if realm.is_empty() {
        return Err(
            loc.error("auth.realm", "a realm is required (conventionally your server name, e.g. turn.example.org)")
        );
    }
    if realm.len() > 127 {
        return Err(loc.error("auth.realm", "must be shorter than 128 characters"));
    }
    let mut users = Vec::new();
    for u in &m.auth.users {
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
    let secrets: Vec<String> = m.auth.shared_secrets.iter().map(|s| s.trim().to_string()).collect();
    if secrets.iter().any(String::is_empty) {
        return Err(loc.error("auth.shared_secrets", "a shared secret must not be empty"));
    }
    if secrets.is_empty() && users.is_empty() {
        return Err(loc.error(
            "auth.shared_secrets",
            "no credentials configured: set auth.shared_secrets (the homeserver's turn_shared_secret) or auth.users; turnpike never runs as an open relay",
        ));
    }
    let rest_separator = match m.auth.rest_separator.as_bytes() {
        [b] if b.is_ascii() && !b.is_ascii_digit() => *b,
        _ => {
            return Err(loc.error("auth.rest_separator", "must be one ASCII character that is not a digit"));
        }
    };
    if !(30..=86_400).contains(&m.auth.nonce_lifetime) {
        return Err(loc.error("auth.nonce_lifetime", "must be between 30 and 86400 seconds"));
    }
    let listen_ips = if m.listen.ips.is_empty() {
        vec![IpAddr::from([0, 0, 0, 0])]
    } else {
        parse_ips(loc, "listen.ips", &m.listen.ips)?
    };
    if m.listen.port == 0 && loc.file != Path::new("<test>") {
        // Port 0 is only useful to tests, which pick a free port; allow it but say so.
        warnings.push("listen.port is 0: an ephemeral port will be chosen".into());
    }
    let relay_ips = parse_ips(loc, "relay.ips", &m.relay.ips)?;
    if let Some(any) = relay_ips.iter().find(|ip| ip.is_unspecified()) {
        return Err(loc.error(
            "relay.ips",
            format!("`{any}` is not an address: relay sockets need the address peers reach them at"),
        ));
    }
    let mut external_ips = Vec::new();
    for e in &m.relay.external_ips {
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
        if external_ips.iter().any(|x: &ExternalIp| x.public.is_ipv4() == public.is_ipv4()) {
            return Err(loc.error("relay.external_ips", "at most one external address per address family"));
        }
        external_ips.push(ExternalIp { public, private });
    }
    let (min_port, max_port) = (m.relay.min_port, m.relay.max_port);
    if min_port == 0 || min_port > max_port {
        return Err(
            loc.error("relay.min_port", format!("the relay range {min_port}-{max_port} is empty or starts at 0"))
        );
    }
    let threads = match &m.runtime.threads {
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
    for s in &m.runtime.shard_ports {
        let Some(r) = parse_port_range(s) else {
            return Err(loc.error("runtime.shard_ports", format!("`{s}` must be a port range `a-b`")));
        };
        shard_ports.push(r);
    }
    if !shard_ports.is_empty() && shard_ports.len() != threads {
        return Err(loc.error(
            "runtime.shard_ports",
            format!("{} ranges given for {threads} shards: give one per shard", shard_ports.len()),
        ));
    }
    let total_ports = if shard_ports.is_empty() {
        usize::from(max_port - min_port) + 1
    } else {
        shard_ports.iter().map(|(a, b)| usize::from(b - a) + 1).min().unwrap_or(0) * threads
    };
    if total_ports < 2 * threads {
        return Err(
            loc.error("relay.min_port", format!("{total_ports} relay ports cannot be shared by {threads} shards"))
        );
    }
    if !(1..=3600).contains(&m.runtime.unallocated_timeout) {
        return Err(loc.error("runtime.unallocated_timeout", "must be between 1 and 3600 seconds"));
    }
    if m.runtime.recv_batch == 0 || m.runtime.recv_batch > 1024 {
        return Err(loc.error("runtime.recv_batch", "must be between 1 and 1024"));
    }
    if m.runtime.raw_min_batch == 0 || m.runtime.raw_min_batch > crate::shard::sys::MAX_MESSAGES {
        let most = crate::shard::sys::MAX_MESSAGES;
        return Err(loc.error("runtime.raw_min_batch", format!("must be between 1 and {most}")));
    }
    if m.runtime.coalesce_us > MAX_COALESCE_US {
        return Err(loc.error("runtime.coalesce_us", format!("must be between 0 (off) and {MAX_COALESCE_US}")));
    }
    if !m.runtime.core_ids.is_empty() && m.runtime.core_ids.len() < threads {
        return Err(
            loc.error("runtime.core_ids", format!("{} cores listed for {threads} shards", m.runtime.core_ids.len()))
        );
    }
    let a = &m.allocations;
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
    let allowed_peers = parse_ranges(loc, "peers.allowed", &m.peers.allowed)?;
    let denied_peers = parse_ranges(loc, "peers.denied", &m.peers.denied)?;
    if m.peers.allow_private {
        warnings.push("peers.allow_private is on: the relay may reach private and reserved networks".into());
    }
    if !allowed_peers.is_empty() {
        let list: Vec<String> = allowed_peers.iter().map(ToString::to_string).collect();
        warnings.push(format!("peers.allowed opens normally denied peers: {}", list.join(", ")));
    }
    if !m.peers.no_multicast {
        warnings.push("peers.no_multicast is off: multicast peers may be reached".into());
    }
    if m.tls.cert.is_some() != m.tls.pkey.is_some() {
        return Err(loc.error("tls.cert", "tls.cert and tls.pkey must be given together"));
    }
    if m.abuse.unauth_rate > 0 && m.abuse.unauth_burst == 0 {
        return Err(loc.error("abuse.unauth_burst", "must be at least 1 when abuse.unauth_rate is set"));
    }
    if m.abuse.unauth_rate == 0 {
        warnings.push(
            "abuse.unauth_rate is 0: unauthenticated requests are answered without limit (a reflection amplifier)"
                .into(),
        );
    }
    if (1..1024).contains(&a.max_bps) || (1..1024).contains(&a.total_bps) {
        return Err(loc.error(
            "allocations.max_bps",
            "bandwidth limits are bytes per second; below 1024 nothing useful gets through",
        ));
    }
    if !m.listen.udp && !m.listen.tcp && m.tls.cert.is_none() {
        return Err(loc.error("listen.udp", "UDP, TCP and TLS are all off: nothing to listen on"));
    }
    if let (Some(cert), Some(key)) = (&m.tls.cert, &m.tls.pkey) {
        // Fail at start (and refuse a reload) rather than at the first handshake.
        crate::tls::server_config(Path::new(cert), Path::new(key)).map_err(|e| loc.error("tls.cert", e))?;
    }
    let log_level = match m.logging.level.to_ascii_lowercase().as_str() {
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
    let metrics_listen = match &m.metrics.listen {
        None => None,
        Some(s) => {
            let addr: std::net::SocketAddr = s
                .parse()
                .map_err(|_| loc.error("metrics.listen", format!("`{s}` must be IP:PORT, e.g. 127.0.0.1:9641")))?;
            if !addr.ip().is_loopback() {
                warnings.push(format!("metrics.listen {addr} is not loopback: put it behind a firewall or a proxy"));
            }
            Some(addr)
        }
    };
    let syslog_facility = match m.logging.syslog_facility.as_str() {
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
    let software = m.protocol.software.filter(|s| !s.is_empty());
    if software.as_ref().is_some_and(|s| s.len() > 127) {
        return Err(loc.error("protocol.software", "must be shorter than 128 characters"));
    }
    Ok(Config {
        source: loc.file.to_path_buf(),
        format: loc.format,
        realm,
        listen_ips,
        listen_port: m.listen.port,
        tls_port: m.listen.tls_port,
        listen_udp: m.listen.udp,
        listen_tcp: m.listen.tcp,
        relay_ips,
        external_ips,
        min_port,
        max_port,
        secrets,
        users,
        rest_separator,
        nonce_lifetime: Duration::from_secs(m.auth.nonce_lifetime),
        default_lifetime: Duration::from_secs(a.default_lifetime),
        max_lifetime: Duration::from_secs(a.max_lifetime),
        max_permissions: a.max_permissions,
        max_channels: a.max_channels,
        user_quota: a.user_quota,
        total_quota: a.total_quota,
        user_reservations: a.user_reservations,
        max_bps: a.max_bps,
        total_bps: a.total_bps,
        unauth_rate: m.abuse.unauth_rate,
        unauth_burst: m.abuse.unauth_burst,
        unauth_connections: m.abuse.unauth_connections,
        unauth_connections_per_source: m.abuse.unauth_connections_per_source,
        descriptor_reserve: m.abuse.descriptor_reserve,
        allowed_peers,
        denied_peers,
        no_multicast_peers: m.peers.no_multicast,
        allow_private_peers: m.peers.allow_private,
        no_tcp_relay: m.peers.no_tcp_relay,
        tls_cert: m.tls.cert.map(PathBuf::from),
        tls_key: m.tls.pkey.map(PathBuf::from),
        threads,
        pin_cores: m.runtime.pin_cores,
        core_ids: m.runtime.core_ids,
        shard_ports,
        recv_buffer: m.runtime.recv_buffer,
        send_buffer: m.runtime.send_buffer,
        recv_batch: m.runtime.recv_batch,
        udp_gso: m.runtime.udp_gso,
        raw_send: m.runtime.raw_send,
        raw_min_batch: m.runtime.raw_min_batch,
        coalesce_wait: Duration::from_micros(m.runtime.coalesce_us),
        coalesce_min_rate: m.runtime.coalesce_min_pps,
        unallocated_timeout: Duration::from_secs(m.runtime.unallocated_timeout),
        log_level,
        syslog: m.logging.syslog,
        log_file: m.logging.file.map(PathBuf::from),
        software,
        reason_phrases: m.protocol.reason_phrases,
        legacy_channel_numbers: m.protocol.legacy_channel_numbers,
        metrics_listen,
        syslog_facility,
        warnings,
    })
}

impl Config {
    /// The embedded development configuration.
    pub fn dev() -> Result<Self, ConfigError> {
        parse(Path::new("<embedded dev config>.yaml"), DEV_CONFIG)
    }

    /// The credential store these settings describe.
    pub fn credential_store(&self) -> CredentialStore {
        let mut store = CredentialStore::new(&self.realm, self.rest_separator);
        for s in &self.secrets {
            store.add_secret(s);
        }
        for (name, secret) in &self.users {
            match secret {
                UserSecret::Password(p) => store.add_user(name, p),
                UserSecret::Key(k) => store.add_user_key(name, *k),
            }
        }
        store
    }

    /// The lowest and highest relay port of any shard.
    pub fn relay_port_span(&self) -> (u16, u16) {
        if self.shard_ports.is_empty() {
            return (self.min_port, self.max_port);
        }
        let lo = self.shard_ports.iter().map(|r| r.0).min().unwrap_or(self.min_port);
        let hi = self.shard_ports.iter().map(|r| r.1).max().unwrap_or(self.max_port);
        (lo, hi)
    }

    /// Relay ports of shard `shard`.
    pub fn shard_port_list(&self, shard: usize) -> Vec<u16> {
        match self.shard_ports.get(shard) {
            Some(&(a, b)) => (a..=b).collect(),
            None => crate::proto::ports::shard_ports(self.min_port, self.max_port, shard, self.threads).collect(),
        }
    }
}

impl fmt::Display for Config {
    /// The effective settings, secrets redacted (`turnpike check`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let ranges = |v: &[IpRange]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        writeln!(f, "source:            {} ({:?})", self.source.display(), self.format)?;
        writeln!(f, "realm:             {}", self.realm)?;
        writeln!(
            f,
            "listen:            {} port {} (tls port {})",
            list(&self.listen_ips),
            self.listen_port,
            self.tls_port
        )?;
        writeln!(
            f,
            "relay ips:         {}",
            if self.relay_ips.is_empty() { "(from listen ips)".into() } else { list(&self.relay_ips) }
        )?;
        for e in &self.external_ips {
            match e.private {
                Some(p) => writeln!(f, "external ip:       {} (for {})", e.public, p)?,
                None => writeln!(f, "external ip:       {}", e.public)?,
            }
        }
        writeln!(f, "relay ports:       {}-{}", self.min_port, self.max_port)?;
        writeln!(f, "shared secrets:    {} configured (redacted)", self.secrets.len())?;
        let names: Vec<&str> = self.users.iter().map(|(n, _)| n.as_str()).collect();
        writeln!(f, "static users:      {}", if names.is_empty() { "none".into() } else { names.join(", ") })?;
        writeln!(
            f,
            "lifetimes:         default {}s, max {}s, nonce {}s",
            self.default_lifetime.as_secs(),
            self.max_lifetime.as_secs(),
            self.nonce_lifetime.as_secs()
        )?;
        writeln!(
            f,
            "per allocation:    {} permissions, {} channels, max-bps {}",
            self.max_permissions, self.max_channels, self.max_bps
        )?;
        writeln!(f, "total bandwidth:   {} B/s per direction (0 = unlimited)", self.total_bps)?;
        writeln!(f, "unauthenticated:   {} answers/s per source, burst {}", self.unauth_rate, self.unauth_burst)?;
        let derived = |n: u64| if n == 0 { "derived from the descriptor limit".to_string() } else { n.to_string() };
        writeln!(
            f,
            "pending tcp/tls:   {} connections, {} per source, descriptor reserve {}",
            derived(u64::from(self.unauth_connections)),
            derived(u64::from(self.unauth_connections_per_source)),
            derived(self.descriptor_reserve)
        )?;
        writeln!(
            f,
            "quotas:            user {}, total {} (0 = unlimited; EVEN-PORT reservations count), {} reservations per user",
            self.user_quota, self.total_quota, self.user_reservations
        )?;
        writeln!(
            f,
            "peers allowed:     {}",
            if self.allowed_peers.is_empty() { "none beyond defaults".into() } else { ranges(&self.allowed_peers) }
        )?;
        writeln!(
            f,
            "peers denied:      defaults{}{}",
            if self.denied_peers.is_empty() { "" } else { " + " },
            ranges(&self.denied_peers)
        )?;
        writeln!(f, "private peers:     {}", if self.allow_private_peers { "ALLOWED" } else { "denied" })?;
        writeln!(f, "multicast peers:   {}", if self.no_multicast_peers { "denied" } else { "ALLOWED" })?;
        writeln!(
            f,
            "tcp relay:         {}",
            if self.no_tcp_relay { "refused (442)" } else { "refused until TCP relaying exists (442)" }
        )?;
        writeln!(
            f,
            "tls:               {}",
            match &self.tls_cert {
                Some(c) => format!("port {} with {}", self.tls_port, c.display()),
                None => "off".into(),
            }
        )?;
        writeln!(
            f,
            "udp / tcp:         {} / {}",
            if self.listen_udp { "on" } else { "off" },
            if self.listen_tcp { "on" } else { "off" }
        )?;
        writeln!(f, "shards:            {} (pinning {})", self.threads, if self.pin_cores { "on" } else { "off" })?;
        writeln!(
            f,
            "socket buffers:    rcv {} snd {}; recv batch {}; UDP GSO {}; raw send {}",
            self.recv_buffer,
            self.send_buffer,
            self.recv_batch,
            if self.udp_gso { "on" } else { "off" },
            if self.raw_send {
                format!("on where permitted (CAP_NET_RAW), from {} lone datagrams", self.raw_min_batch)
            } else {
                "off".to_string()
            }
        )?;
        if self.coalesce_wait.is_zero() {
            writeln!(f, "rx coalescing:     off")?;
        } else {
            writeln!(
                f,
                "rx coalescing:     up to {} us once a shard receives {} datagrams/s",
                self.coalesce_wait.as_micros(),
                self.coalesce_min_rate
            )?;
        }
        writeln!(f, "log level:         {}", self.log_level)?;
        for w in &self.warnings {
            writeln!(f, "warning:           {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/turnpike.yaml"), text)
    }

    #[test]
    fn dev_config_is_valid() {
        let c = Config::dev().unwrap();
        assert_eq!(c.listen_ips, vec![IpAddr::from([127, 0, 0, 1])]);
        assert!(!c.secrets.is_empty());
    }

    #[test]
    fn example_config_is_valid() {
        let c = parse(Path::new("turnpike.example.yaml"), include_str!("../../config/turnpike.example.yaml")).unwrap();
        assert_eq!(c.realm, "turn.example.org");
    }

    #[test]
    fn unknown_keys_name_the_line() {
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nlisten:\n  portt: 3478\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/turnpike.yaml:5"), "{s}");
        assert!(s.contains("portt"), "{s}");
    }

    #[test]
    fn semantic_errors_name_file_line_and_option() {
        let e =
            yaml("auth:\n  realm: x\n  shared_secrets: [a]\nrelay:\n  min_port: 6000\n  max_port: 5000\n").unwrap_err();
        assert_eq!(e.line, Some(5));
        assert_eq!(e.option, "relay.min_port");
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\npeers:\n  denied: [\"10.0.0.0/99\"]\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(5), "peers.denied"));
        let e = yaml("auth:\n  realm: x\n").unwrap_err();
        assert!(e.message.contains("no credentials"));
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nrelay:\n  ips: [0.0.0.0]\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(5), "relay.ips"));
    }

    #[test]
    fn coalescing_defaults_and_limits() {
        let c = yaml("auth:\n  realm: x\n  shared_secrets: [a]\n").unwrap();
        assert_eq!(c.coalesce_wait, Duration::from_micros(file::DEFAULT_COALESCE_US));
        assert_eq!(c.coalesce_min_rate, file::DEFAULT_COALESCE_MIN_PPS);
        let c = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nruntime:\n  coalesce_us: 0\n").unwrap();
        assert!(c.coalesce_wait.is_zero());
        assert!(c.to_string().contains("rx coalescing:     off"), "{c}");
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nruntime:\n  coalesce_us: 20000\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(5), "runtime.coalesce_us"));
    }

    #[test]
    fn raw_min_batch_default_and_limits() {
        let c = yaml("auth:\n  realm: x\n  shared_secrets: [a]\n").unwrap();
        assert_eq!(c.raw_min_batch, file::DEFAULT_RAW_MIN_BATCH);
        assert!(c.to_string().contains("from 2 lone datagrams"), "{c}");
        let c = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nruntime:\n  raw_min_batch: 1\n").unwrap();
        assert_eq!(c.raw_min_batch, 1);
        for bad in ["0", "65"] {
            let text = format!("auth:\n  realm: x\n  shared_secrets: [a]\nruntime:\n  raw_min_batch: {bad}\n");
            let e = yaml(&text).unwrap_err();
            assert_eq!((e.line, e.option.as_str()), (Some(5), "runtime.raw_min_batch"), "{bad}");
        }
    }

    #[test]
    fn coturn_file_errors_use_coturn_names() {
        let e = parse(
            Path::new("/etc/turnserver.conf"),
            "realm=x\nuse-auth-secret\nstatic-auth-secret=s\nmin-port=7000\nmax-port=6000\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/turnserver.conf:4: option `min-port`: the relay range 7000-6000 is empty or starts at 0"
        );
    }

    #[test]
    fn dtls_is_refused_with_a_clear_message() {
        let e = yaml("listen:\n  dtls_port: 5349\nauth:\n  realm: x\n  shared_secrets: [a]\n").unwrap_err();
        assert!(e.to_string().contains("DTLS is not supported"), "{e}");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn bad_tls_files_and_nothing_to_listen_on_are_errors() {
        let e = yaml(
            "auth:\n  realm: x\n  shared_secrets: [a]\ntls:\n  cert: /nonexistent.pem\n  pkey: /nonexistent.key\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
        assert_eq!(e.option, "tls.cert");
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nlisten:\n  udp: false\n  tcp: false\n").unwrap_err();
        assert!(e.message.contains("nothing to listen on"));
    }

    #[test]
    fn coturn_bps_capacity_is_the_total_cap() {
        let c = parse(Path::new("t.conf"), "realm=x\nuse-auth-secret\nstatic-auth-secret=s\nbps-capacity=2000000\n")
            .unwrap();
        assert_eq!(c.total_bps, 2_000_000);
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(Path::new("x"), "realm=foo\nuse-auth-secret\n"), Format::Coturn);
        assert_eq!(detect_format(Path::new("x"), "auth:\n  realm: foo\n"), Format::Yaml);
    }
}
