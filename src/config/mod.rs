//! Configuration: read a YAML file or a coturn `turnserver.conf` (detected), validate it whole, and
//! produce a [`Config`]. Errors name the file, the line and the option.

pub(crate) mod coturn;
pub mod file;
pub mod options;
pub mod preflight;
mod validate;

use crate::auth::CredentialStore;
use crate::policy::IpRange;
use file::FileConfig;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// turnpike's YAML.
    #[default]
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

/// The log level (a newtype only so that [`Config`] has a default: info).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLevel(pub log::LevelFilter);

impl Default for LogLevel {
    fn default() -> Self {
        Self(log::LevelFilter::Info)
    }
}

/// How log lines are written (`logging.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Plain text lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The admin API's settings (`admin.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: std::net::SocketAddr,
    /// The file holding its bearer token.
    pub token_file: PathBuf,
}

/// What a node does while Redis is unreachable (`cluster.on_outage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOutage {
    /// Admit new allocations on this node's own counts.
    #[default]
    Local,
    /// Refuse new allocations until Redis is back.
    Refuse,
}

/// The fleet's settings (`cluster.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis URL.
    pub redis: String,
    /// This node's name.
    pub node: String,
    /// The address other nodes send clients to (None: the first listening address).
    pub alternate: Option<std::net::SocketAddr>,
    /// How long published state lives unrenewed.
    pub lease: Duration,
    /// Behaviour while Redis is unreachable.
    pub on_outage: OnOutage,
}

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The file model it was validated from (reload compares and merges models).
    pub model: FileConfig,
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
    /// Trusted proxies (PROXY protocol on TCP and TLS).
    pub proxy_from: Vec<IpRange>,
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
    /// The XDP fast path (`runtime.kernel_path`).
    pub kernel_path: crate::kernel_path::KernelPathMode,
    /// Interfaces for it; empty: chosen from the addresses.
    pub kernel_interfaces: Vec<String>,
    /// Log level.
    pub log_level: LogLevel,
    /// Syslog.
    pub syslog: bool,
    /// Log file.
    pub log_file: Option<PathBuf>,
    /// Line format.
    pub log_format: LogFormat,
    /// The syslog daemon's socket.
    pub syslog_socket: PathBuf,
    /// The admin API, when configured.
    pub admin: Option<AdminConfig>,
    /// How long SIGTERM drains before stopping.
    pub stop_grace: Duration,
    /// The fleet, when configured.
    pub cluster: Option<ClusterConfig>,
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
/// Largest `runtime.raw_min_batch`: the most datagrams one `sendmmsg` of a shard carries
/// (`shard::sys::MAX_MESSAGES`, which a test keeps equal).
pub const MAX_RAW_BATCH: usize = 64;

/// Where an option lives, for error messages.
struct Locator<'a> {
    file: &'a Path,
    format: Format,
    text: &'a str,
    coturn_lines: HashMap<String, usize>,
}

impl Locator<'_> {
    /// An error about the option at `path` (a YAML path of [`options::OPTIONS`]), named and placed as
    /// the file writes it: its coturn spelling and the line that set it in a coturn file, its YAML path
    /// and line in YAML.
    fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let (section, key) = path.split_once('.').unwrap_or(("", path));
        let spelled = options::by_path(path).map_or(path, |o| o.spelled(self.format));
        let line = match self.format {
            Format::Yaml => file::yaml_line_of(self.text, section, key),
            Format::Coturn => self.coturn_lines.get(path).copied(),
        };
        ConfigError { file: self.file.to_path_buf(), line, option: spelled.to_string(), message: message.into() }
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
    parse(path, &read_text(path)?)
}

/// The text of a configuration file, or an error naming it.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        option: String::new(),
        message: format!("cannot read: {e}"),
    })
}

/// `turnpike config convert`: a coturn `turnserver.conf` as commented turnpike YAML, saying what it
/// sets and what it does not carry over (each left-out option with why). A file that is not a coturn
/// file is refused.
pub fn convert_coturn(path: &Path) -> Result<String, ConfigError> {
    let text = read_text(path)?;
    let whole = |message: String| ConfigError { file: path.to_path_buf(), line: None, option: String::new(), message };
    if detect_format(path, &text) == Format::Yaml {
        return Err(whole(
            "this reads as turnpike YAML, not a coturn turnserver.conf: nothing to convert (`turnpike check \
             --config FILE` validates it)"
                .into(),
        ));
    }
    let parsed = coturn::parse(&text).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: Some(e.line),
        option: e.option,
        message: e.message,
    })?;
    let mut out = format!(
        "# turnpike configuration converted from {} by `turnpike config convert`.\n\
         # It holds what that file sets, and the defaults where turnpike behaves differently from coturn\n\
         # (each marked). Every option and its default: `turnpike config reference`.\n",
        path.display()
    );
    if !parsed.warnings.is_empty() {
        out.push_str("#\n# Not carried over from the coturn file:\n");
        for w in &parsed.warnings {
            out.push_str(&format!("#   {w}\n"));
        }
    }
    let set = parsed.lines.keys().cloned().collect();
    out.push_str(&options::to_converted_yaml(&parsed.config, &set));
    Ok(out)
}

/// What reading a file's text gives: its model, the parser's warnings and, for a coturn file, the line
/// that set each option.
type Read = (FileConfig, Vec<String>, HashMap<String, usize>);

/// The model a file's text describes (see [`Read`]).
fn read(path: &Path, text: &str) -> Result<Read, ConfigError> {
    match detect_format(path, text) {
        Format::Yaml => {
            let model = file::parse_yaml(text).map_err(|e| ConfigError {
                file: path.to_path_buf(),
                line: e.line,
                option: e.option.unwrap_or_default(),
                message: e.message,
            })?;
            Ok((model, Vec::new(), HashMap::new()))
        }
        Format::Coturn => {
            let parsed = coturn::parse(text).map_err(|e| ConfigError {
                file: path.to_path_buf(),
                line: Some(e.line),
                option: e.option,
                message: e.message,
            })?;
            Ok((parsed.config, parsed.warnings, parsed.lines))
        }
    }
}

/// Parses and validates configuration text; `path` is used for format detection and messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let (model, warnings, coturn_lines) = read(path, text)?;
    let loc = Locator { file: path, format: detect_format(path, text), text, coturn_lines };
    validate::validate(&loc, &model, warnings)
}

impl Config {
    /// This configuration's file, format and warnings, validated again with `model` (a reload's: its
    /// restart-only options at their running values).
    pub fn with_model(&self, model: FileConfig) -> Result<Self, ConfigError> {
        let loc = Locator { file: &self.source, format: self.format, text: "", coturn_lines: HashMap::new() };
        let mut c = validate::validate(&loc, &model, self.warnings.clone())?;
        // Validation says again what it said of the same values.
        let mut seen = std::collections::HashSet::new();
        c.warnings.retain(|w| seen.insert(w.clone()));
        Ok(c)
    }

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
            None => crate::proto::shard_ports(self.min_port, self.max_port, shard, self.threads).collect(),
        }
    }
}

impl fmt::Display for Config {
    /// Every option of [`options::OPTIONS`] with its value (secrets redacted), and whether a reload
    /// applies it (`turnpike check`), then the warnings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source: {} ({:?})", self.source.display(), self.format)?;
        let values = options::flatten(&self.model);
        let defaults = options::flatten(&FileConfig::default());
        for o in options::OPTIONS {
            let value = match o.path {
                "auth.shared_secrets" => format!("{} configured (redacted)", self.secrets.len()),
                "auth.users" => {
                    let names: Vec<&str> = self.users.iter().map(|(n, _)| n.as_str()).collect();
                    format!("[{}] (passwords redacted)", names.join(", "))
                }
                "runtime.threads" => format!("{} ({} shards)", options::show(&values[o.path]), self.threads),
                path if !o.default_note.is_empty() && values.get(path) == defaults.get(path) => {
                    o.default_note.trim_matches('`').to_string()
                }
                path => values.get(path).map(options::show).unwrap_or_default(),
            };
            let when = if o.reload == options::Reload::Restart { "restart" } else { "reload" };
            writeln!(f, "{:<38} {:<8} {value}", o.spelled(self.format), when)?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
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
        assert_eq!(s, "/etc/turnpike.yaml:5: option `listen.portt`: unknown option; did you mean `listen.port`?");
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nlistn:\n  port: 3478\n").unwrap_err();
        assert_eq!(e.to_string(), "/etc/turnpike.yaml:4: option `listn`: unknown section; did you mean `listen`?");
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nrelay:\n  min_port: 70000\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/turnpike.yaml:5: option `relay.min_port`: must be a whole number from 0 to 65535"
        );
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
        assert!(c.to_string().lines().any(|l| l.starts_with("runtime.coalesce_us") && l.ends_with(" 0")), "{c}");
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nruntime:\n  coalesce_us: 20000\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(5), "runtime.coalesce_us"));
    }

    #[test]
    fn raw_min_batch_default_and_limits() {
        let c = yaml("auth:\n  realm: x\n  shared_secrets: [a]\n").unwrap();
        assert_eq!(c.raw_min_batch, file::DEFAULT_RAW_MIN_BATCH);
        assert!(c.to_string().lines().any(|l| l.starts_with("runtime.raw_min_batch") && l.ends_with(" 2")), "{c}");
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
    fn coturn_files_name_options_as_coturn_spells_them() {
        let e = parse(Path::new("t.conf"), "realm=x\nuse-auth-secret\nstatic-auth-secret=s\nbps-capacity=100\n")
            .unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(4), "bps-capacity"));
        let e =
            parse(Path::new("t.conf"), "realm=x\nuse-auth-secret\nstatic-auth-secret=s\nmax-bps=100\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(4), "max-bps"));
        let e = yaml("auth:\n  realm: x\n  shared_secrets: [a]\nallocations:\n  total_bps: 100\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (Some(5), "allocations.total_bps"));
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
