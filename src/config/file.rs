//! The YAML file model. Every section and key is optional; unknown keys are errors (typos must not pass
//! silently). YAML is read with serde-saphyr (maintained, panic-free, errors with line and column).

use serde::{Deserialize, Serialize};

/// `threads: auto` or a number.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Threads {
    /// A fixed number of shards.
    Count(usize),
    /// A word; only `auto` (one shard per core) is valid.
    Word(String),
}

impl Default for Threads {
    fn default() -> Self {
        Self::Word("auto".into())
    }
}

/// Where clients reach the server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSection {
    /// Addresses to listen on (coturn `listening-ip`). Default: 0.0.0.0.
    pub ips: Vec<String>,
    /// STUN/TURN port over UDP and TCP (coturn `listening-port`).
    pub port: u16,
    /// TURN-over-TLS port (coturn `tls-listening-port`).
    pub tls_port: u16,
    /// Serve STUN/TURN over UDP (coturn `no-udp` turns it off).
    pub udp: bool,
    /// Serve TURN over TCP on `port` (coturn `no-tcp` turns it off).
    pub tcp: bool,
    /// Trusted proxies whose TCP/TLS connections start with a PROXY header (addresses, `a-b` or CIDR).
    pub proxy_from: Vec<String>,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self { ips: Vec::new(), port: 3478, tls_port: 5349, udp: true, tcp: true, proxy_from: Vec::new() }
    }
}

/// Relay addresses and ports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySection {
    /// Addresses relay sockets bind (coturn `relay-ip`).
    pub ips: Vec<String>,
    /// `PUBLIC` or `PUBLIC/PRIVATE`, one per family (coturn `external-ip`).
    pub external_ips: Vec<String>,
    /// Lowest relay port (coturn `min-port`).
    pub min_port: u16,
    /// Highest relay port (coturn `max-port`).
    pub max_port: u16,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self { ips: Vec::new(), external_ips: Vec::new(), min_port: 49152, max_port: 65535 }
    }
}

/// Credentials.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// The realm (coturn `realm`).
    pub realm: String,
    /// TURN REST API secrets; all are accepted (coturn `static-auth-secret`).
    pub shared_secrets: Vec<String>,
    /// Static users, `name:password` or `name:0x<32 hex digits of the MD5 key>` (coturn `user`).
    pub users: Vec<String>,
    /// Separator between expiry and user in REST usernames (coturn `rest-api-separator`).
    pub rest_separator: String,
    /// Seconds a nonce stays valid (coturn `stale-nonce`).
    pub nonce_lifetime: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            realm: String::new(),
            shared_secrets: Vec::new(),
            users: Vec::new(),
            rest_separator: ":".into(),
            nonce_lifetime: 600,
        }
    }
}

/// Allocation limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocationSection {
    /// Seconds granted when the client asks for less or nothing.
    pub default_lifetime: u64,
    /// Most seconds granted (coturn `max-allocate-lifetime`).
    pub max_lifetime: u64,
    /// Most permissions per allocation.
    pub max_permissions: usize,
    /// Most channels per allocation.
    pub max_channels: usize,
    /// Concurrent allocations per user, 0 = unlimited (coturn `user-quota`).
    pub user_quota: u32,
    /// Concurrent allocations in total, 0 = unlimited (coturn `total-quota`).
    pub total_quota: u32,
    /// Unredeemed EVEN-PORT reservations (R bit) one user may hold at once, 0 = none; each also
    /// counts as an allocation against the quotas while it holds its port.
    pub user_reservations: u32,
    /// Bytes per second per allocation and direction, 0 = unlimited (coturn `max-bps`).
    pub max_bps: u64,
    /// Bytes per second for the whole server per direction, split evenly over shards, 0 = unlimited.
    pub total_bps: u64,
}

impl Default for AllocationSection {
    fn default() -> Self {
        Self {
            default_lifetime: 600,
            max_lifetime: 3600,
            max_permissions: 64,
            max_channels: 64,
            user_quota: 0,
            total_quota: 0,
            user_reservations: DEFAULT_USER_RESERVATIONS,
            max_bps: 0,
            total_bps: 0,
        }
    }
}

/// Default of `allocations.user_reservations`: enough for a client setting up two RTP/RTCP pairs at once
/// (a reservation is redeemed within its call's set-up), too few to take a share of the relay range.
pub const DEFAULT_USER_RESERVATIONS: u32 = 2;

/// Abuse resistance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbuseSection {
    /// Unauthenticated requests (and Binding requests) answered per source address per second;
    /// 0 = unlimited.
    pub unauth_rate: u64,
    /// Burst allowed above that rate.
    pub unauth_burst: u64,
    /// TCP/TLS connections without an allocation, node-wide; 0 = an eighth of the descriptor limit
    /// (16 to 4,096). Beyond it a newcomer replaces the oldest of the source holding the most.
    pub unauth_connections: u32,
    /// Of those, per source address (IPv6: per /64); 0 = a sixteenth of `unauth_connections` (4 to 64).
    pub unauth_connections_per_source: u32,
    /// Descriptors at the top of the table kept for relay sockets: a connection accepted into them is
    /// closed at once; 0 = a quarter of the descriptor limit.
    pub descriptor_reserve: u64,
}

impl Default for AbuseSection {
    fn default() -> Self {
        Self {
            unauth_rate: 20,
            unauth_burst: 40,
            unauth_connections: 0,
            unauth_connections_per_source: 0,
            descriptor_reserve: 0,
        }
    }
}

/// Which peers the relay may reach.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerSection {
    /// Addresses/ranges allowed even though denied by default (coturn `allowed-peer-ip`).
    pub allowed: Vec<String>,
    /// Extra addresses/ranges denied (coturn `denied-peer-ip`).
    pub denied: Vec<String>,
    /// Refuse multicast peers (coturn `no-multicast-peers`). Default true.
    pub no_multicast: bool,
    /// Relay to private/reserved ranges on purpose (LAN deployments). Default false.
    pub allow_private: bool,
    /// Refuse TCP relay allocations (coturn `no-tcp-relay`). Default true.
    pub no_tcp_relay: bool,
}

impl Default for PeerSection {
    fn default() -> Self {
        Self { allowed: Vec::new(), denied: Vec::new(), no_multicast: true, allow_private: false, no_tcp_relay: true }
    }
}

/// TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain, PEM (coturn `cert`).
    pub cert: Option<String>,
    /// Private key, PEM (coturn `pkey`).
    pub pkey: Option<String>,
}

/// Default longest receive-coalescing pause, microseconds (see `shard::coalesce`).
pub const DEFAULT_COALESCE_US: u64 = 300;
/// Default datagram rate per shard from which it coalesces.
pub const DEFAULT_COALESCE_MIN_PPS: u64 = 20_000;
/// Default fewest lone datagrams of one family in a flush that take the raw socket (`runtime.raw_send`).
pub const DEFAULT_RAW_MIN_BATCH: usize = 2;

/// Per-core settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// Shards (event loops): `auto` = one per core.
    pub threads: Threads,
    /// Pin shard k to core `core_ids[k]` (or core k).
    pub pin_cores: bool,
    /// Cores to pin to, in shard order.
    pub core_ids: Vec<usize>,
    /// Per-shard relay port ranges `"a-b"`, one per shard, overriding the even split.
    pub shard_ports: Vec<String>,
    /// SO_RCVBUF of listening and relay sockets, bytes (0 = kernel default).
    pub recv_buffer: usize,
    /// SO_SNDBUF of listening sockets, bytes (0 = kernel default). Relay sockets keep the kernel's default:
    /// each sends one allocation's traffic.
    pub send_buffer: usize,
    /// Most datagrams read from one socket per wake-up before moving on.
    pub recv_batch: usize,
    /// Send relayed datagrams that share a socket, destination and size as one UDP GSO (generic
    /// segmentation offload) message; falls back by itself where the kernel cannot.
    pub udp_gso: bool,
    /// Send relayed datagrams of many allocations together through one raw socket per shard and family, when
    /// the process may open one (`CAP_NET_RAW`); otherwise one send call per relay socket.
    pub raw_send: bool,
    /// With `raw_send`: the fewest lone relayed datagrams of one family in a wake-up that leave through
    /// the raw socket; fewer leave through their relay sockets (the raw socket saves nothing on one
    /// datagram, and costs the kernel a route per datagram to an on-link peer).
    pub raw_min_batch: usize,
    /// Receive coalescing: the longest pause, in microseconds, of a busy shard after a wake-up so that
    /// the next one finds a batch of datagrams (like a NIC's `rx-usecs`); 0 turns it off.
    pub coalesce_us: u64,
    /// Datagrams per second a shard must receive before it pauses for coalescing.
    pub coalesce_min_pps: u64,
    /// Seconds a TCP/TLS connection may stay idle without an allocation (it never authenticated).
    pub unallocated_timeout: u64,
    /// The XDP fast path for UDP clients' ChannelData: off, auto or on (see `kernel_path`).
    pub kernel_path: crate::kernel_path::KernelPathMode,
    /// Interfaces to attach it to; empty: those holding a listening or relay address.
    pub kernel_interfaces: Vec<String>,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            threads: Threads::default(),
            pin_cores: false,
            core_ids: Vec::new(),
            shard_ports: Vec::new(),
            recv_buffer: 4 << 20,
            send_buffer: 4 << 20,
            recv_batch: 64,
            udp_gso: true,
            raw_send: true,
            raw_min_batch: DEFAULT_RAW_MIN_BATCH,
            coalesce_us: DEFAULT_COALESCE_US,
            coalesce_min_pps: DEFAULT_COALESCE_MIN_PPS,
            unallocated_timeout: 30,
            kernel_path: crate::kernel_path::KernelPathMode::Off,
            kernel_interfaces: Vec::new(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// error, warn, info, debug or trace (coturn `verbose` = debug).
    pub level: String,
    /// Log to syslog (coturn `syslog`).
    pub syslog: bool,
    /// Log to this file (coturn `log-file`).
    pub file: Option<String>,
    /// Syslog facility: daemon (default), user, auth, local0-local7.
    pub syslog_facility: String,
    /// Line format: `text`, or `json` (one object per line, for log shippers).
    pub format: String,
    /// The syslog daemon's socket.
    pub syslog_socket: String,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            syslog: false,
            file: None,
            syslog_facility: "daemon".into(),
            format: "text".into(),
            syslog_socket: "/dev/log".into(),
        }
    }
}

/// Wire details.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolSection {
    /// SOFTWARE attribute value; none by default (it helps attackers fingerprint the server).
    pub software: Option<String>,
    /// Put reason phrases in ERROR-CODE; off by default (smaller answers to unauthenticated requests).
    pub reason_phrases: bool,
    /// Accept channel numbers 0x5000-0x7FFF (RFC 5766) besides RFC 8656's 0x4000-0x4FFF. Default true.
    pub legacy_channel_numbers: bool,
}

impl Default for ProtocolSection {
    fn default() -> Self {
        Self { software: None, reason_phrases: false, legacy_channel_numbers: true }
    }
}

/// The metrics endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9641`; off when unset.
    pub listen: Option<String>,
}

/// The admin API.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin API (HTTP, JSON), e.g. `127.0.0.1:9642`; off when unset.
    pub listen: Option<String>,
    /// A file holding the bearer token every admin request must carry (required with `listen`).
    pub token_file: Option<String>,
    /// Seconds SIGTERM waits, draining, for the node's allocations to end before it stops (0: stop at once).
    pub stop_grace: u64,
}

/// A fleet sharing control state through Redis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `redis://[:PASSWORD@]HOST:PORT/DB` or `rediss://...`; no fleet when unset.
    pub redis: Option<String>,
    /// This node's name in the fleet (default: the host name).
    pub node: Option<String>,
    /// The address other nodes send clients to when this node is named as ALTERNATE-SERVER (IP:PORT).
    pub alternate: Option<String>,
    /// Seconds a node's published state lives without renewal: a dead node leaves the fleet view after it.
    pub lease: u64,
    /// While Redis is unreachable: `local` (admit on this node's own counts) or `refuse` (no new allocations).
    pub on_outage: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self { redis: None, node: None, alternate: None, lease: 10, on_outage: "local".into() }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `listen:` section.
    pub listen: ListenSection,
    /// `relay:` section.
    pub relay: RelaySection,
    /// `auth:` section.
    pub auth: AuthSection,
    /// `allocations:` section.
    pub allocations: AllocationSection,
    /// `peers:` section.
    pub peers: PeerSection,
    /// `abuse:` section.
    pub abuse: AbuseSection,
    /// `tls:` section.
    pub tls: TlsSection,
    /// `runtime:` section.
    pub runtime: RuntimeSection,
    /// `logging:` section.
    pub logging: LoggingSection,
    /// `protocol:` section.
    pub protocol: ProtocolSection,
    /// `metrics:` section.
    pub metrics: MetricsSection,
    /// `admin:` section.
    pub admin: AdminSection,
    /// `cluster:` section.
    pub cluster: ClusterSection,
}

/// A YAML syntax or schema error: line (1-based, if known), the option it is about (a YAML path, if
/// known) and message.
#[derive(Debug, Clone)]
pub struct YamlError {
    /// Line of the error.
    pub line: Option<usize>,
    /// The option, `section.key` (or a section).
    pub option: Option<String>,
    /// What is wrong, and for a misspelt option what was probably meant.
    pub message: String,
}

/// Parses YAML text into the file model.
pub fn parse_yaml(text: &str) -> Result<FileConfig, YamlError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str(text).map_err(|e| {
        let line = e.location().and_then(|l| usize::try_from(l.line()).ok());
        let message = plain_message(&e);
        let section = line.and_then(|l| section_at(text, l));
        let unknown = message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`')).map(|(k, _)| k);
        match (unknown, section) {
            (Some(key), _) if key.starts_with("dtls") => YamlError {
                line,
                option: Some(key.to_string()),
                message: "DTLS is not supported: browsers reach TURN over UDP, TCP or TLS; remove the dtls option"
                    .into(),
            },
            (Some(key), section) => {
                let (path, what) = match section {
                    Some(s) if s != key => (format!("{s}.{key}"), "option"),
                    _ => (key.to_string(), "section"),
                };
                let hint = suggest(&path).map(|p| format!("; did you mean `{p}`?")).unwrap_or_default();
                YamlError { line, option: Some(path), message: format!("unknown {what}{hint}") }
            }
            (None, section) => {
                let option = line.and_then(|l| key_at(text, l)).map(|key| match section {
                    Some(s) if s != key => format!("{s}.{key}"),
                    _ => key,
                });
                YamlError { line, option, message }
            }
        }
    })
}

/// The known option or section `path` (`section.key`, or a section) was most likely meant to be.
fn suggest(path: &str) -> Option<String> {
    let sections = super::options::OPTIONS.iter().filter_map(|o| o.path.split_once('.').map(|(s, _)| s));
    let candidates = super::options::OPTIONS.iter().map(|o| o.path).chain(sections);
    candidates
        .map(|c| (strsim::damerau_levenshtein(path, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 6))
        .min()
        .map(|(_, c)| c.to_string())
}

/// The key written on line `line` (1-based).
fn key_at(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?.trim_start().trim_start_matches("- ");
    Some(l.split_once(':')?.0.trim().to_string())
}

/// The section line `line` (1-based) lies in: the last unindented key at or above it.
fn section_at(text: &str, line: usize) -> Option<String> {
    text.lines()
        .take(line)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter(|l| !l.starts_with([' ', '\t']))
        .last()
        .and_then(|l| Some(l.split_once(':')?.0.trim().to_string()))
}

/// The error's own words, without the position and the source snippet serde-saphyr adds (the
/// caller names file and line itself).
fn plain_message(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default().trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let message = match first.strip_prefix("line ").and_then(|rest| rest.split_once(": ")) {
        Some((position, message)) if position.contains("column") => message,
        _ => first,
    };
    let range = match message {
        "invalid u16" => "0 to 65535",
        "invalid u32" => "0 to 4294967295",
        "invalid u64" | "invalid usize" => "0 up",
        _ => return message.to_string(),
    };
    format!("must be a whole number from {range}")
}

/// Finds the line of `key:` nested under `section:` in YAML text (for semantic errors).
pub fn yaml_line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut in_section = section.is_empty();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let indented = line.len() != trimmed.len();
        if !indented {
            in_section = section.is_empty() || trimmed.starts_with(&format!("{section}:"));
            if section.is_empty() && trimmed.starts_with(&format!("{key}:")) {
                return Some(i + 1);
            }
            continue;
        }
        if in_section && trimmed.starts_with(&format!("{key}:")) {
            return Some(i + 1);
        }
    }
    if section.is_empty() { None } else { yaml_line_of(text, "", section) }
}

/// Writes the model as YAML (`turnpike config convert`).
pub fn to_yaml(model: &FileConfig) -> Result<String, String> {
    serde_saphyr::to_string(model).map_err(|e| e.to_string())
}
