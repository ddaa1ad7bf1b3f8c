//! Reads coturn's `turnserver.conf` into the same model as the YAML file, so a coturn user can switch
//! binaries and keep the file. Options turnpike has no use for are warned about once each.

use super::file::{FileConfig, Threads};
use std::collections::HashMap;

/// The result of reading a turnserver.conf.
#[derive(Debug, Default)]
pub struct CoturnFile {
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
pub struct CoturnError {
    /// 1-based line.
    pub line: usize,
    /// The option as written.
    pub option: String,
    /// What is wrong.
    pub message: String,
}

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
    ("no-multicast-peers", ""),
];

fn flag(value: &str) -> bool {
    !matches!(value.trim(), "0" | "false" | "no" | "off")
}

impl CoturnFile {
    fn note(&mut self, option: &str, line: usize) {
        self.lines.insert(option.to_string(), line);
    }

    fn warn_once(&mut self, key: &str, message: String) {
        if !self.warnings.iter().any(|w| w.starts_with(&format!("`{key}`"))) {
            self.warnings.push(format!("`{key}` {message}"));
        }
    }
}

/// Parses turnserver.conf text.
pub fn parse(text: &str) -> Result<CoturnFile, CoturnError> {
    let mut out = CoturnFile::default();
    // coturn defaults differ from turnpike's in one place: it relays TCP unless told not to. Keep
    // turnpike's safer default; `no-tcp-relay` is then simply confirmed.
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
        let number = |v: &str| v.parse::<u64>().map_err(|_| err(format!("`{v}` is not a number")));
        let c = &mut out.config;
        match key {
            "use-auth-secret" => out.use_auth_secret = flag(value),
            "static-auth-secret" => {
                c.auth.shared_secrets.push(value.to_string());
                out.note("auth.shared_secrets", line_no);
            }
            "realm" => {
                c.auth.realm = value.to_string();
                out.note("auth.realm", line_no);
            }
            "user" => {
                c.auth.users.push(value.to_string());
                out.note("auth.users", line_no);
            }
            "rest-api-separator" => {
                c.auth.rest_separator = value.to_string();
                out.note("auth.rest_separator", line_no);
            }
            "stale-nonce" => {
                c.auth.nonce_lifetime = if value.is_empty() { 600 } else { number(value)? };
                out.note("auth.nonce_lifetime", line_no);
            }
            "listening-port" => {
                c.listen.port = u16::try_from(number(value)?).map_err(|_| err("port out of range".into()))?;
                out.note("listen.port", line_no);
            }
            "tls-listening-port" => {
                c.listen.tls_port = u16::try_from(number(value)?).map_err(|_| err("port out of range".into()))?;
                out.note("listen.tls_port", line_no);
            }
            "listening-ip" => {
                c.listen.ips.push(value.to_string());
                out.note("listen.ips", line_no);
            }
            "relay-ip" => {
                c.relay.ips.push(value.to_string());
                out.note("relay.ips", line_no);
            }
            "external-ip" => {
                c.relay.external_ips.push(value.to_string());
                out.note("relay.external_ips", line_no);
            }
            "min-port" => {
                c.relay.min_port = u16::try_from(number(value)?).map_err(|_| err("port out of range".into()))?;
                out.note("relay.min_port", line_no);
            }
            "max-port" => {
                c.relay.max_port = u16::try_from(number(value)?).map_err(|_| err("port out of range".into()))?;
                out.note("relay.max_port", line_no);
            }
            "no-tcp-relay" => {
                c.peers.no_tcp_relay = flag(value);
                out.note("peers.no_tcp_relay", line_no);
            }
            "denied-peer-ip" => {
                c.peers.denied.push(value.to_string());
                out.note("peers.denied", line_no);
            }
            "allowed-peer-ip" => {
                c.peers.allowed.push(value.to_string());
                out.note("peers.allowed", line_no);
            }
            "allow-loopback-peers" => {
                c.peers.allowed.push("127.0.0.0/8".into());
                c.peers.allowed.push("::1".into());
                out.note("peers.allowed", line_no);
            }
            "user-quota" => {
                c.allocations.user_quota = u32::try_from(number(value)?).map_err(|_| err("too large".into()))?;
                out.note("allocations.user_quota", line_no);
            }
            "total-quota" => {
                c.allocations.total_quota = u32::try_from(number(value)?).map_err(|_| err("too large".into()))?;
                out.note("allocations.total_quota", line_no);
            }
            "max-allocate-lifetime" => {
                c.allocations.max_lifetime = number(value)?;
                out.note("allocations.max_lifetime", line_no);
            }
            "max-bps" => {
                c.allocations.max_bps = number(value)?;
                out.note("allocations.max_bps", line_no);
            }
            "bps-capacity" => {
                c.allocations.total_bps = number(value)?;
                out.note("allocations.total_bps", line_no);
                out.warn_once(
                    key,
                    "is enforced as a total bandwidth cap per direction, not as admission control".into(),
                );
            }
            "cert" => {
                c.tls.cert = Some(value.to_string());
                out.note("tls.cert", line_no);
            }
            "pkey" => {
                c.tls.pkey = Some(value.to_string());
                out.note("tls.pkey", line_no);
            }
            "no-udp" => c.listen.udp = false,
            "no-tcp" => c.listen.tcp = false,
            "no-tls" => {
                c.tls.cert = None;
                c.tls.pkey = None;
            }
            "syslog-facility" => {
                c.logging.syslog_facility = value.to_ascii_lowercase();
                out.note("logging.syslog_facility", line_no);
            }
            "syslog" => {
                c.logging.syslog = true;
                out.note("logging.syslog", line_no);
            }
            "log-file" => {
                if value != "stdout" && !value.is_empty() {
                    c.logging.file = Some(value.to_string());
                }
                out.note("logging.file", line_no);
            }
            "verbose" | "v" => c.logging.level = "debug".into(),
            "Verbose" | "V" => c.logging.level = "trace".into(),
            "relay-threads" | "general-threads" => {
                let n = number(value)?;
                c.runtime.threads = if n == 0 { Threads::default() } else { Threads::Count(n as usize) };
                out.note("runtime.threads", line_no);
            }
            "software-name" => c.protocol.software = Some(value.to_string()),
            "dtls-listening-port" | "alt-dtls-listening-port" => {
                return Err(err("DTLS is not supported by turnpike (browsers use UDP, TCP or TLS for TURN); remove this line and add `no-dtls`".into()));
            }
            _ => {
                if let Some((_, why)) = NO_OP.iter().find(|(k, _)| *k == key) {
                    if !why.is_empty() {
                        out.warn_once(key, format!("has no effect: {why}"));
                    }
                } else {
                    out.warn_once(key, format!("(line {line_no}) is not supported by turnpike and is ignored"));
                }
            }
        }
    }
    if !out.use_auth_secret && !out.config.auth.shared_secrets.is_empty() {
        out.warnings.push("`static-auth-secret` is ignored because `use-auth-secret` is not set (as in coturn)".into());
        out.config.auth.shared_secrets.clear();
    }
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
                    listening-ip=10.0.0.1\nmin-port=50000\nmax-port=50100\nfoo-bar=1\nlt-cred-mech\n";
        let f = parse(text).unwrap();
        assert!(f.use_auth_secret);
        assert_eq!(f.config.auth.shared_secrets, ["abc"]);
        assert_eq!(f.config.auth.realm, "turn.myserver.org");
        assert_eq!(f.config.allocations.user_quota, 12);
        assert_eq!(f.config.allocations.total_quota, 1200);
        assert_eq!(f.config.peers.denied, ["10.0.0.0-10.255.255.255"]);
        assert_eq!(f.config.relay.min_port, 50000);
        assert_eq!(f.lines["allocations.user_quota"], 9);
        assert!(f.warnings.iter().any(|w| w.contains("foo-bar")));
        assert!(f.warnings.iter().any(|w| w.contains("lt-cred-mech")));
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("realm=x\nuser-quota=lots\n").unwrap_err();
        assert_eq!((e.line, e.option.as_str()), (2, "user-quota"));
        let e = parse("dtls-listening-port=5350\n").unwrap_err();
        assert!(e.message.contains("DTLS"));
    }
}
