//! Reads coturn's `turnserver.conf` into the same model as the YAML file, so a coturn user can switch
//! binaries and keep the file. Options turnpike has no use for are warned about once each.

use super::file::FileConfig;
use super::options::{self, Coturn};
use serde_json::Value;
use std::collections::HashMap;

/// The result of reading a turnserver.conf.
#[derive(Debug, Default)]
pub(crate) struct CoturnFile {
    /// The equivalent settings.
    pub config: FileConfig,
    /// Line of each option's last occurrence, keyed by the turnpike option path (`section.key`).
    pub lines: HashMap<String, usize>,
    /// One warning per ignored or not-yet-enforced option.
    pub warnings: Vec<String>,
    /// Whether `use-auth-secret` was given (REST secrets are only used when it is).
    pub use_auth_secret: bool,
}

/// An error at a line of the file.
#[derive(Debug, Clone)]
pub(crate) struct CoturnError {
    /// 1-based line.
    pub line: usize,
    /// The option as written.
    pub option: String,
    /// What is wrong.
    pub message: String,
}

/// Every option coturn 4.6 knows (`turnserver --help` and its man page, Debian 12's coturn). A line
/// naming none of these is a typo or a foreign option: an error, with the nearest one suggested. A
/// coturn option that turnpike does not implement is a one-line warning instead.
const COTURN_OPTIONS: &[&str] = &[
    "CA-file",
    "Verbose",
    "acme-redirect",
    "allocation-default-address-family",
    "allow-loopback-peers",
    "allowed-peer-ip",
    "alt-dtls-listening-port",
    "alt-listening-port",
    "alt-tls-listening-port",
    "alternate-server",
    "aux-server",
    "bps-capacity",
    "cert",
    "channel-lifetime",
    "check-origin-consistency",
    "cipher-list",
    "cli-ip",
    "cli-max-output-sessions",
    "cli-password",
    "cli-port",
    "daemon",
    "db",
    "denied-peer-ip",
    "dh-file",
    "dh1066",
    "dh566",
    "dtls-listening-port",
    "ec-curve-name",
    "external-ip",
    "fingerprint",
    "keep-address-family",
    "listening-device",
    "listening-ip",
    "listening-port",
    "log-binding",
    "log-file",
    "lt-cred-mech",
    "max-allocate-lifetime",
    "max-allocate-timeout",
    "max-bps",
    "max-port",
    "min-port",
    "mobility",
    "mongo-userdb",
    "mysql-userdb",
    "ne",
    "new-log-timestamp",
    "new-log-timestamp-format",
    "no-auth",
    "no-auth-pings",
    "no-cli",
    "no-dtls",
    "no-dynamic-ip-list",
    "no-dynamic-realms",
    "no-multicast-peers",
    "no-rfc5780",
    "no-software-attribute",
    "no-stdout-log",
    "no-stun",
    "no-stun-backward-compatibility",
    "no-tcp",
    "no-tcp-relay",
    "no-tls",
    "no-tlsv1",
    "no-tlsv1_1",
    "no-tlsv1_2",
    "no-udp",
    "no-udp-relay",
    "oauth",
    "permission-lifetime",
    "pidfile",
    "pkey",
    "pkey-pwd",
    "proc-group",
    "proc-user",
    "prometheus",
    "prometheus-address",
    "prometheus-port",
    "prometheus-username-labels",
    "psql-userdb",
    "realm",
    "redis-statsdb",
    "redis-userdb",
    "relay-device",
    "relay-ip",
    "relay-threads",
    "response-origin-only-with-rfc5780",
    "rest-api-separator",
    "secret-key-file",
    "secure-stun",
    "server-name",
    "server-relay",
    "simple-log",
    "sql-userdb",
    "stale-nonce",
    "static-auth-secret",
    "stun-only",
    "syslog",
    "syslog-facility",
    "tcp-proxy-port",
    "tls-alternate-server",
    "tls-listening-port",
    "total-quota",
    "udp-self-balance",
    "use-auth-secret",
    "user",
    "user-quota",
    "userdb",
    "verbose",
    "web-admin",
    "web-admin-ip",
    "web-admin-listen-on-workers",
    "web-admin-port",
];

/// Why turnpike leaves out the coturn option `key` (one of [`COTURN_OPTIONS`] it does not implement).
fn unimplemented_because(key: &str) -> &'static str {
    match key {
        "web-admin"
        | "web-admin-ip"
        | "web-admin-port"
        | "web-admin-listen-on-workers"
        | "cli-ip"
        | "cli-port"
        | "cli-password"
        | "cli-max-output-sessions" => {
            "turnpike has no web admin page or telnet CLI; it has a Prometheus endpoint (metrics.listen)"
        }
        "db" | "userdb" | "sql-userdb" | "mysql-userdb" | "psql-userdb" | "mongo-userdb" | "redis-userdb"
        | "redis-statsdb" | "secret-key-file" | "oauth" => {
            "user databases and OAuth are not supported: use shared secrets (static-auth-secret) or `user` lines"
        }
        "alternate-server" | "tls-alternate-server" | "aux-server" | "udp-self-balance" => {
            "ALTERNATE-SERVER redirection and auxiliary servers are not offered"
        }
        "no-tlsv1" | "no-tlsv1_1" | "no-tlsv1_2" | "cipher-list" | "ec-curve-name" | "dh-file" | "dh566" | "dh1066"
        | "CA-file" | "pkey-pwd" => {
            "turnpike's TLS (rustls) speaks TLS 1.2 and 1.3 only with its own cipher suites, needs an unencrypted \
             key, and asks no client certificate"
        }
        "listening-device" | "relay-device" => "binding to a device is not supported: use listening-ip and relay-ip",
        "alt-listening-port" | "alt-tls-listening-port" => "RFC 5780's alternate ports are not offered",
        "channel-lifetime" | "permission-lifetime" | "max-allocate-timeout" => {
            "RFC 8656's lifetimes are used (permissions 300 s, channels 600 s)"
        }
        "stun-only" | "no-stun" | "no-auth" | "no-auth-pings" | "no-udp-relay" => {
            "turnpike always serves STUN and authenticated UDP relaying"
        }
        "daemon" => "run it under systemd instead (the unit ships with the .deb)",
        "log-binding" | "new-log-timestamp" | "new-log-timestamp-format" => {
            "log lines carry a timestamp (or journald's); Binding requests are not logged"
        }
        _ => "not implemented",
    }
}

/// coturn's default Prometheus port (`prometheus-port`).
const PROMETHEUS_PORT: u16 = 9641;

/// Options accepted for compatibility that need no action here, with the reason shown once.
const NO_OP: &[(&str, &str)] = &[
    ("lt-cred-mech", "long-term credentials are always on"),
    ("fingerprint", "FINGERPRINT is always echoed when the client sends it"),
    ("no-dtls", "turnpike has no DTLS listener"),
    ("no-cli", "turnpike has no telnet CLI"),
    ("no-stdout-log", "logging goes where `logging` says"),
    ("simple-log", "log files are never rotated by name"),
    ("no-loopback-peers", "loopback peers are always denied unless allowed"),
    ("no-software-attribute", "SOFTWARE is off unless protocol.software is set"),
    ("secure-stun", "Binding requests are answered without authentication, as RFC 8489 intends"),
    ("no-rfc5780", "RFC 5780 NAT behaviour discovery is not offered"),
    ("no-stun-backward-compatibility", "classic RFC 3489 STUN is not offered"),
    ("response-origin-only-with-rfc5780", "RFC 5780 is not offered"),
    ("mobility", "ICE mobility tickets are not supported"),
    ("pidfile", "use systemd's tracking instead of a pid file"),
    ("proc-user", "run under systemd's User= instead"),
    ("proc-group", "run under systemd's Group= instead"),
    ("server-name", "not needed"),
];

fn flag(value: &str) -> bool {
    !matches!(value.trim(), "0" | "false" | "no" | "off")
}

/// Every option name a coturn file may use here: the table's, the special ones below and the no-ops.
fn known_names() -> impl Iterator<Item = &'static str> {
    const SPECIAL: &[&str] = &[
        "use-auth-secret",
        "no-tls",
        "allow-loopback-peers",
        "v",
        "Verbose",
        "V",
        "general-threads",
        "dtls-listening-port",
        "alt-dtls-listening-port",
        "prometheus",
        "prometheus-port",
        "prometheus-address",
    ];
    options::OPTIONS
        .iter()
        .filter_map(|o| o.coturn.name())
        .chain(SPECIAL.iter().copied())
        .chain(NO_OP.iter().map(|(k, _)| *k))
}

/// The coturn option `key` was most likely meant to be, for a typo.
pub(super) fn suggestion(key: &str) -> Option<&'static str> {
    known_names()
        .chain(COTURN_OPTIONS.iter().copied())
        .map(|k| (strsim::damerau_levenshtein(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 5))
        .min()
        .map(|(_, k)| k)
}

impl CoturnFile {
    fn note(&mut self, path: &str, line: usize) {
        self.lines.insert(path.to_string(), line);
    }

    fn warn_once(&mut self, key: &str, message: String) {
        if !self.warnings.iter().any(|w| w.starts_with(&format!("`{key}`"))) {
            self.warnings.push(format!("`{key}` {message}"));
        }
    }
}

/// The model being built, as JSON: options are set by path and their values typed by the default's.
struct Tree(Value);

impl Tree {
    fn set(&mut self, path: &str, value: Value) {
        if let Some(slot) = options::value_at_mut(&mut self.0, path) {
            *slot = value;
        }
    }

    fn push(&mut self, path: &str, item: &str) {
        if let Some(Value::Array(items)) = options::value_at_mut(&mut self.0, path) {
            items.push(Value::String(item.to_string()));
        }
    }

    /// Sets `path` from a coturn value, typed like the option's current value.
    fn set_typed(&mut self, path: &str, value: &str) -> Result<(), String> {
        let typed = match options::value_at(&self.0, path) {
            Some(Value::Number(_)) => {
                Value::Number(value.parse::<u64>().map_err(|_| format!("`{value}` is not a number"))?.into())
            }
            Some(Value::Bool(_)) => Value::Bool(flag(value)),
            _ => Value::String(value.to_string()),
        };
        self.set(path, typed);
        Ok(())
    }

    /// The model, or why it cannot be one (a value out of range, say).
    fn model(&self) -> Result<FileConfig, String> {
        serde_json::from_value(self.0.clone()).map_err(|e| e.to_string())
    }
}

/// Parses turnserver.conf text. Options of [`options::OPTIONS`] are set as the table says; the few
/// coturn options with rules of their own (negations, companions, units) are handled here.
pub(crate) fn parse(text: &str) -> Result<CoturnFile, CoturnError> {
    let mut out = CoturnFile::default();
    let mut tree = Tree(serde_json::to_value(FileConfig::default()).unwrap_or(Value::Null));
    let mut shared_secrets = Vec::new();
    // coturn's `prometheus` turns the endpoint on; its port and address may come on any line.
    let (mut prometheus, mut prometheus_port, mut prometheus_ip) = (None, PROMETHEUS_PORT, None);
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.trim_start_matches("--");
        let (key, value) = match line.find(|c: char| c == '=' || c.is_whitespace()) {
            Some(pos) => (line[..pos].trim(), line[pos + 1..].trim().trim_start_matches('=').trim()),
            None => (line, ""),
        };
        // Values may carry quotes and trailing comments, as in the Synapse how-to.
        let value = value.split(" #").next().unwrap_or("").trim().trim_matches('"');
        let err = |message: String| CoturnError { line: line_no, option: key.to_string(), message };
        match key {
            "use-auth-secret" => out.use_auth_secret = flag(value),
            "static-auth-secret" => {
                shared_secrets.push(value.to_string());
                tree.push("auth.shared_secrets", value);
                out.note("auth.shared_secrets", line_no);
            }
            "stale-nonce" => {
                tree.set_typed("auth.nonce_lifetime", if value.is_empty() { "600" } else { value }).map_err(err)?;
                out.note("auth.nonce_lifetime", line_no);
            }
            "allow-loopback-peers" => {
                tree.push("peers.allowed", "127.0.0.0/8");
                tree.push("peers.allowed", "::1");
                out.note("peers.allowed", line_no);
            }
            "bps-capacity" => {
                tree.set_typed("allocations.total_bps", value).map_err(err)?;
                out.note("allocations.total_bps", line_no);
                out.warn_once(
                    key,
                    "is enforced as a total bandwidth cap per direction, not as admission control".into(),
                );
            }
            "no-udp" => tree.set("listen.udp", Value::Bool(!flag(value))),
            "no-tcp" => tree.set("listen.tcp", Value::Bool(!flag(value))),
            "no-tls" => {
                tree.set("tls.cert", Value::Null);
                tree.set("tls.pkey", Value::Null);
            }
            "syslog-facility" => {
                tree.set("logging.syslog_facility", Value::String(value.to_ascii_lowercase()));
                out.note("logging.syslog_facility", line_no);
            }
            "log-file" => {
                if value != "stdout" && !value.is_empty() {
                    tree.set("logging.file", Value::String(value.to_string()));
                }
                out.note("logging.file", line_no);
            }
            "verbose" | "v" => tree.set("logging.level", Value::String("debug".into())),
            "Verbose" | "V" => tree.set("logging.level", Value::String("trace".into())),
            "relay-threads" | "general-threads" => {
                let n = value.parse::<u64>().map_err(|_| err(format!("`{value}` is not a number")))?;
                let threads = if n == 0 { Value::String("auto".into()) } else { Value::Number(n.into()) };
                tree.set("runtime.threads", threads);
                out.note("runtime.threads", line_no);
            }
            "prometheus" => prometheus = flag(value).then_some(line_no),
            "prometheus-port" => {
                prometheus_port = value.parse().map_err(|_| err(format!("`{value}` is not a port")))?;
            }
            "prometheus-address" => {
                let ip =
                    value.parse::<std::net::IpAddr>().map_err(|_| err(format!("`{value}` is not an IP address")))?;
                prometheus_ip = Some(ip);
            }
            "dtls-listening-port" | "alt-dtls-listening-port" => {
                return Err(err("DTLS is not supported by turnpike (browsers use UDP, TCP or TLS for TURN); remove this line and add `no-dtls`".into()));
            }
            _ => {
                if let Some(o) = options::by_coturn_name(key) {
                    match o.coturn {
                        Coturn::Repeat(_) => tree.push(o.path, value),
                        Coturn::Flag(_) => tree.set(o.path, Value::Bool(flag(value))),
                        _ => tree.set_typed(o.path, value).map_err(err)?,
                    }
                    out.note(o.path, line_no);
                } else if let Some((_, why)) = NO_OP.iter().find(|(k, _)| *k == key) {
                    if !why.is_empty() {
                        out.warn_once(key, format!("has no effect: {why}"));
                    }
                } else if COTURN_OPTIONS.contains(&key) {
                    let why = unimplemented_because(key);
                    out.warn_once(
                        key,
                        format!("(line {line_no}) is a coturn option turnpike does not implement: {why}; ignored"),
                    );
                } else {
                    let hint = suggestion(key).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
                    return Err(err(format!("not a coturn option{hint}")));
                }
                // A value the model cannot hold (a port over 65535, say) is this line's error.
                tree.model().map_err(|e| err(format!("`{value}`: {e}")))?;
            }
        }
    }
    if let Some(line) = prometheus {
        // coturn serves its endpoint on every address unless `prometheus-address` says otherwise.
        let ip = prometheus_ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        tree.set("metrics.listen", Value::String(std::net::SocketAddr::new(ip, prometheus_port).to_string()));
        out.note("metrics.listen", line);
    }
    if !out.use_auth_secret && !shared_secrets.is_empty() {
        out.warnings.push("`static-auth-secret` is ignored because `use-auth-secret` is not set (as in coturn)".into());
        tree.set("auth.shared_secrets", Value::Array(Vec::new()));
    }
    out.config = tree.model().map_err(|e| CoturnError { line: 0, option: String::new(), message: e })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synapse_howto_file() {
        let text = "use-auth-secret\nstatic-auth-secret=abc\nrealm=turn.myserver.org\nsyslog\nno-tcp-relay\n\
                    denied-peer-ip=10.0.0.0-10.255.255.255\nallowed-peer-ip=10.0.0.1\nno-multicast-peers\n\
                    user-quota=12 # 4 streams per video call\ntotal-quota=1200\nexternal-ip=203.0.113.5\n\
                    listening-ip=10.0.0.1\nmin-port=50000\nmax-port=50100\nweb-admin\nlt-cred-mech\n";
        let f = parse(text).unwrap();
        assert!(f.use_auth_secret);
        assert_eq!(f.config.auth.shared_secrets, ["abc"]);
        assert_eq!(f.config.auth.realm, "turn.myserver.org");
        assert_eq!(f.config.allocations.user_quota, 12);
        assert_eq!(f.config.allocations.total_quota, 1200);
        assert_eq!(f.config.peers.denied, ["10.0.0.0-10.255.255.255"]);
        assert_eq!(f.config.relay.min_port, 50000);
        assert_eq!(f.lines["allocations.user_quota"], 9);
        assert!(f.warnings.iter().any(|w| w.contains("`web-admin`") && w.contains("does not implement")));
        assert!(f.warnings.iter().any(|w| w.contains("lt-cred-mech")));
    }

    #[test]
    fn typos_are_named_with_a_suggestion_and_values_out_of_range_are_errors() {
        let e = parse("realm=x\nmin-prot=49152\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (2, "min-prot"));
        assert!(e.message.contains("not a coturn option; did you mean `min-port`?"), "{}", e.message);
        let e = parse("listening-prot=3478\n").unwrap_err();
        assert!(e.message.contains("did you mean `listening-port`"), "{}", e.message);
        // A real coturn option turnpike does not use is suggested too.
        let e = parse("web-admn\n").unwrap_err();
        assert!(e.message.contains("did you mean `web-admin`"), "{}", e.message);
        let e = parse("realm=x\nmax-port=70000\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (2, "max-port"));
        let f = parse("syslog\nno-udp\nallow-loopback-peers\nrelay-threads=0\n").unwrap();
        assert!(f.config.logging.syslog && !f.config.listen.udp);
        assert_eq!(f.config.peers.allowed, ["127.0.0.0/8", "::1"]);
    }

    #[test]
    fn prometheus_options_set_the_metrics_endpoint() {
        let f = parse("prometheus\nrealm=x\n").unwrap();
        assert_eq!(f.config.metrics.listen.as_deref(), Some("0.0.0.0:9641"));
        assert_eq!(f.lines["metrics.listen"], 1);
        let f = parse("prometheus-port=9100\nprometheus-address=127.0.0.1\nprometheus\n").unwrap();
        assert_eq!(f.config.metrics.listen.as_deref(), Some("127.0.0.1:9100"));
        // Without `prometheus` the port alone turns nothing on, as in coturn.
        assert_eq!(parse("prometheus-port=9100\n").unwrap().config.metrics.listen, None);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("realm=x\nuser-quota=lots\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (2, "user-quota"));
        let e = parse("dtls-listening-port=5350\n").unwrap_err();
        assert!(e.message.contains("DTLS"));
    }
}
