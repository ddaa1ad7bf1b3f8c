//! `turnpike check`: the gate before every start and reload. Beyond what validation refuses (a file the
//! server cannot run with), it looks at the host: secrets a reader of the how-tos may have pasted, the
//! certificate and key on disk, the syslog socket, the kernel's ephemeral ports, the host's own
//! addresses among the allowed peers. Each finding names the file, line and option.

use super::{Config, ConfigError, Locator, read, read_text, validate};
use crate::policy::IpRange;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use std::net::IpAddr;
use std::path::Path;

/// Secrets from the how-tos, coturn's examples and turnpike's own examples: anyone can read them.
const KNOWN_SECRETS: &[&str] = &[
    "change-me-to-the-output-of-pwgen-s-64-1",
    "turnpike-dev-secret",
    "[your secret key here]",
    "your secret key here",
    "n0t4ctuAllymatr1Xd0TorgSshar3d5ecret4obvIousreAsons",
    "staticAuthSecretHere",
    "north",
    "logen",
];

/// The fewest bytes a shared secret may have (128 bits of a random string).
pub const MIN_SECRET_LEN: usize = 16;

/// Whether a finding stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The server refuses to start (or a reload is refused).
    Error,
    /// Worth reading; the server runs.
    Warning,
}

/// One finding: severity, and where and what, as a [`ConfigError`].
#[derive(Debug, Clone)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// File, line, option and message.
    pub what: ConfigError,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{label}: {}", self.what)
    }
}

/// The outcome of a check.
#[derive(Debug)]
pub struct Preflight {
    /// The validated configuration, unless the file could not be read or validated.
    pub config: Option<Config>,
    /// Errors and warnings, in the order found.
    pub findings: Vec<Finding>,
}

impl Preflight {
    /// Whether the server may start with this file: it validated and no finding is an error.
    pub fn passed(&self) -> bool {
        self.config.is_some() && !self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// The findings of `severity`.
    pub fn of(&self, severity: Severity) -> impl Iterator<Item = &ConfigError> {
        self.findings.iter().filter(move |f| f.severity == severity).map(|f| &f.what)
    }

    /// The outcome as JSON for tools: `{"file", "ok", "errors": [...], "warnings": [...]}`, each finding
    /// with `file`, `line` (or null), `option` and `message`.
    pub fn to_json(&self, file: &Path) -> serde_json::Value {
        let list = |severity| {
            self.of(severity)
                .map(|e| json!({"file": e.file, "line": e.line, "option": e.option, "message": e.message}))
                .collect::<Vec<_>>()
        };
        json!({
            "file": file,
            "ok": self.passed(),
            "errors": list(Severity::Error),
            "warnings": list(Severity::Warning),
        })
    }
}

/// Checks the configuration file at `path`, as of `now_unix` (seconds since the epoch).
pub fn check(path: &Path, now_unix: u64) -> Preflight {
    let fail =
        |what: ConfigError| Preflight { config: None, findings: vec![Finding { severity: Severity::Error, what }] };
    let text = match read_text(path) {
        Ok(text) => text,
        Err(e) => return fail(e),
    };
    let (model, warnings, coturn_lines) = match read(path, &text) {
        Ok(read) => read,
        Err(e) => return fail(e),
    };
    let loc = Locator { file: path, format: super::detect_format(path, &text), text: &text, coturn_lines };
    let config = match validate::validate(&loc, &model, warnings) {
        Ok(config) => config,
        Err(e) => return fail(e),
    };
    let mut checks = Checks { loc: &loc, findings: Vec::new() };
    for w in &config.warnings {
        let what = ConfigError { file: path.to_path_buf(), line: None, option: String::new(), message: w.clone() };
        checks.findings.push(Finding { severity: Severity::Warning, what });
    }
    checks.secrets(&config);
    checks.certificate(&config, now_unix);
    checks.syslog(&config);
    checks.admin_token(&config);
    checks.kernel_path(&config);
    checks.ephemeral_ports(&config);
    checks.own_addresses_allowed(&config, &local_addresses());
    Preflight { findings: checks.findings, config: Some(config) }
}

/// Collects findings against one file.
struct Checks<'a> {
    loc: &'a Locator<'a>,
    findings: Vec<Finding>,
}

impl Checks<'_> {
    fn error(&mut self, option: &str, message: String) {
        self.findings.push(Finding { severity: Severity::Error, what: self.loc.error(option, message) });
    }

    fn warning(&mut self, option: &str, message: String) {
        self.findings.push(Finding { severity: Severity::Warning, what: self.loc.error(option, message) });
    }

    /// Placeholder and short secrets, where someone else can reach the server. On loopback (tests, the
    /// dev server) they are allowed: nobody else can use them there.
    fn secrets(&mut self, c: &Config) {
        if c.listen_ips.iter().all(IpAddr::is_loopback) {
            return;
        }
        for secret in &c.secrets {
            let trimmed = secret.trim();
            let placeholder = KNOWN_SECRETS.iter().any(|k| k.eq_ignore_ascii_case(trimmed))
                || trimmed.to_ascii_lowercase().contains("change-me")
                || trimmed.to_ascii_lowercase().contains("changeme");
            if placeholder {
                self.error(
                    "auth.shared_secrets",
                    "this secret is a placeholder from an example or a how-to, and the server listens on a \
                     non-loopback address: generate one (`pwgen -s 64 1` or `openssl rand -hex 32`) and set \
                     the same in the homeserver's turn_shared_secret"
                        .into(),
                );
            } else if secret.len() < MIN_SECRET_LEN {
                self.error(
                    "auth.shared_secrets",
                    format!(
                        "a secret of {} bytes can be guessed offline from one captured credential: use at \
                         least {MIN_SECRET_LEN} random characters (`pwgen -s 64 1`)",
                        secret.len()
                    ),
                );
            }
        }
    }

    /// The certificate and key on disk: readable, matching, valid now, naming this server.
    fn certificate(&mut self, c: &Config, now_unix: u64) {
        let (Some(cert_path), Some(key_path)) = (&c.tls_cert, &c.tls_key) else {
            return;
        };
        let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(cert_path) {
            Ok(iter) => iter.flatten().collect(),
            Err(e) => return self.error("tls.cert", format!("{}: cannot read: {e}", cert_path.display())),
        };
        let Some(leaf) = chain.first() else {
            return self.error("tls.cert", format!("{}: no PEM certificate in it", cert_path.display()));
        };
        let key = match PrivateKeyDer::from_pem_file(key_path) {
            Ok(key) => key,
            Err(e) => return self.error("tls.pkey", format!("{}: cannot read a private key: {e}", key_path.display())),
        };
        let provider = rustls::crypto::ring::default_provider();
        match provider.key_provider.load_private_key(key) {
            Ok(signer) => {
                let certified = rustls::sign::CertifiedKey::new(chain.clone(), signer);
                if let Err(rustls::Error::InconsistentKeys(_)) = certified.keys_match() {
                    self.error(
                        "tls.pkey",
                        format!("{} is not the key of the certificate in {}", key_path.display(), cert_path.display()),
                    );
                }
            }
            Err(e) => self.error("tls.pkey", format!("{}: unusable private key: {e}", key_path.display())),
        }
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf) else {
            return self.error("tls.cert", format!("{}: the first certificate cannot be parsed", cert_path.display()));
        };
        let validity = parsed.validity();
        let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
        if validity.not_after.timestamp() < now {
            self.error(
                "tls.cert",
                format!(
                    "{}: the certificate expired on {} (renew it, e.g. `certbot renew`, then reload)",
                    cert_path.display(),
                    validity.not_after
                ),
            );
        } else if validity.not_before.timestamp() > now {
            self.error(
                "tls.cert",
                format!("{}: the certificate is not valid before {}", cert_path.display(), validity.not_before),
            );
        }
        let names = certificate_names(&parsed);
        let externals: Vec<IpAddr> = c.external_ips.iter().map(|e| e.public).collect();
        if !names.covers(&c.realm) && !externals.iter().any(|ip| names.ips.contains(ip)) {
            self.warning(
                "tls.cert",
                format!(
                    "{}: the certificate names {} but not the realm `{}`{}: clients that connect by that \
                     name will refuse it",
                    cert_path.display(),
                    names.describe(),
                    c.realm,
                    if externals.is_empty() { String::new() } else { " nor the external address".into() }
                ),
            );
        }
    }

    fn syslog(&mut self, c: &Config) {
        use std::os::unix::fs::FileTypeExt;
        let is_socket = std::fs::metadata(&c.syslog_socket).is_ok_and(|m| m.file_type().is_socket());
        if c.syslog && !is_socket {
            self.error(
                "logging.syslog",
                format!(
                    "no syslog socket at {}: install a syslog daemon (rsyslog), or turn syslog off: under \
                     systemd, stderr goes to the journal",
                    c.syslog_socket.display()
                ),
            );
        }
    }

    /// `runtime.kernel_path` in a build without it: `on` could never start, `auto` would never use it.
    fn kernel_path(&mut self, c: &Config) {
        use crate::kernel_path::KernelPathMode;
        if cfg!(all(feature = "kernel-path", target_os = "linux")) {
            return;
        }
        let why = "this turnpike was built without the kernel path (cargo feature kernel-path)";
        match c.kernel_path {
            KernelPathMode::On => self.error("runtime.kernel_path", format!("`on`, but {why}")),
            KernelPathMode::Auto => self.warning("runtime.kernel_path", format!("`auto` relays in user space: {why}")),
            KernelPathMode::Off => {}
        }
    }

    /// The admin API's token file: readable, and a token long enough not to be guessed.
    fn admin_token(&mut self, c: &Config) {
        let Some(admin) = &c.admin else { return };
        match std::fs::read_to_string(&admin.token_file) {
            Err(e) => self.error("admin.token_file", format!("{}: {e}", admin.token_file.display())),
            Ok(text) if text.lines().next().unwrap_or("").trim().len() < 16 => self.error(
                "admin.token_file",
                format!(
                    "{}: the token (its first line) must be at least 16 characters: `openssl rand -hex 32 > {}`",
                    admin.token_file.display(),
                    admin.token_file.display()
                ),
            ),
            Ok(_) => {}
        }
    }

    fn ephemeral_ports(&mut self, c: &Config) {
        if let Some(o) = crate::ephemeral::overlap_now(c.min_port..=c.max_port) {
            self.warning("relay.min_port", crate::ephemeral::describe(&o));
        }
    }

    /// An allowed peer range that holds one of this host's addresses opens every port of the host to
    /// relayed traffic, not only relay ports (relay-to-relay needs no such line: relayed addresses are
    /// always reachable as peers).
    fn own_addresses_allowed(&mut self, c: &Config, local: &[IpAddr]) {
        let own = local.iter().chain(&c.listen_ips).chain(&c.relay_ips).chain(c.external_ips.iter().map(|e| &e.public));
        let own: Vec<IpAddr> = own.copied().filter(|ip| !ip.is_loopback() && !ip.is_unspecified()).collect();
        for range in &c.allowed_peers {
            if let Some(ip) = own.iter().find(|ip| range.contains(**ip)) {
                self.warning("peers.allowed", own_address_message(range, *ip));
            }
        }
    }
}

fn own_address_message(range: &IpRange, ip: IpAddr) -> String {
    format!(
        "{range} holds this host's own address {ip}: clients may then relay to every port on it (the \
         homeserver's included), not only to relay ports. Relaying between two allocations of this server \
         needs no such line; remove it unless a peer service really runs there"
    )
}

/// The names a certificate is valid for.
struct CertNames {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl CertNames {
    fn covers(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.ips.contains(&ip);
        }
        self.dns.iter().any(|name| {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                // A wildcard covers exactly one label.
                Some(parent) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => name == host,
            }
        })
    }

    fn describe(&self) -> String {
        let all: Vec<String> = self.dns.iter().cloned().chain(self.ips.iter().map(IpAddr::to_string)).collect();
        if all.is_empty() { "no name".into() } else { all.join(", ") }
    }
}

fn certificate_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> CertNames {
    use x509_parser::extensions::GeneralName;
    let mut names = CertNames { dns: Vec::new(), ips: Vec::new() };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.dns.push((*d).to_string()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(b) = <[u8; 4]>::try_from(*bytes) {
                        names.ips.push(IpAddr::from(b));
                    } else if let Ok(b) = <[u8; 16]>::try_from(*bytes) {
                        names.ips.push(IpAddr::from(b));
                    }
                }
                _ => {}
            }
        }
    }
    if names.dns.is_empty() {
        // No subjectAltName: old certificates name the host in the subject's CN.
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.dns.push(s.to_string());
            }
        }
    }
    names
}

/// This host's interface addresses (empty if they cannot be listed).
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

#[cfg(test)]
mod tests;
