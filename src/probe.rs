//! `turnpike probe`: checks a TURN server end to end the way a WebRTC client uses it. Two allocations
//! are made, each gets a permission for the other's relayed address, datagrams go A -> relay -> relay -> B
//! and back, and every step is reported with a plain diagnosis when it fails. This is the "you should
//! see at least one relay entry" check of the Synapse how-to, on the command line.

use crate::proto::attr::{self, AttrType, PROTO_UDP};
use crate::proto::framing::frame_len;
use crate::proto::integrity::{LongTermKey, long_term_key, rest_password};
use crate::proto::{Class, Method, MsgWriter, StunMsg, TransactionId};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the probe reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTransport {
    /// `turn:...?transport=udp` (the default).
    Udp,
    /// `turn:...?transport=tcp`.
    Tcp,
    /// `turns:...` (TLS over TCP).
    Tls,
}

/// A parsed `turn:`/`turns:` URI (RFC 7065).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnUri {
    /// Host name or address.
    pub host: String,
    /// Port (3478, or 5349 for `turns:`).
    pub port: u16,
    /// Transport.
    pub transport: ProbeTransport,
}

impl std::str::FromStr for TurnUri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (secure, rest) = if let Some(r) = s.strip_prefix("turns:") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("turn:") {
            (false, r)
        } else {
            return Err(format!("`{s}`: a TURN URI starts with turn: or turns:"));
        };
        let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| format!("`{s}`: unclosed [ in the host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("`{s}`: no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("`{s}`: `{p}` is not a port"))?,
            None if secure => 5349,
            None => 3478,
        };
        let transport = match (secure, query.strip_prefix("transport=")) {
            (true, None | Some("tcp")) => ProbeTransport::Tls,
            (false, None | Some("udp")) => ProbeTransport::Udp,
            (false, Some("tcp")) => ProbeTransport::Tcp,
            (_, Some(t)) => return Err(format!("`{s}`: transport `{t}` is not offered (udp, tcp; turns: is TLS)")),
        };
        Ok(Self { host, port, transport })
    }
}

/// Credentials for the probe.
#[derive(Clone)]
pub enum Credentials {
    /// A TURN REST shared secret (a username is minted, as a homeserver does).
    Secret(String),
    /// A static user.
    User {
        /// Name.
        name: String,
        /// Password.
        password: String,
    },
}

/// Options of one probe run.
#[derive(Clone)]
pub struct ProbeOptions {
    /// The server.
    pub uri: TurnUri,
    /// Credentials.
    pub credentials: Credentials,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Datagrams sent through the relay.
    pub count: usize,
    /// Skip TLS certificate verification (self-signed test servers).
    pub insecure: bool,
    /// Extra PEM CA file for TLS verification.
    pub ca_file: Option<std::path::PathBuf>,
}

/// One reported step.
#[derive(Debug, Clone)]
pub struct Step {
    /// What was tried.
    pub name: String,
    /// Whether it worked.
    pub ok: bool,
    /// What was seen, or the diagnosis.
    pub detail: String,
}

/// The outcome of a probe.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Steps in order.
    pub steps: Vec<Step>,
    /// Relayed round-trip times.
    pub rtts: Vec<Duration>,
    /// Datagrams sent.
    pub sent: usize,
}

impl Report {
    /// Whether every step worked.
    pub fn success(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.ok)
    }

    fn step(&mut self, name: &str, ok: bool, detail: impl Into<String>) -> bool {
        self.steps.push(Step { name: name.into(), ok, detail: detail.into() });
        ok
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.steps {
            writeln!(f, "[{}] {}: {}", if s.ok { " ok " } else { "FAIL" }, s.name, s.detail)?;
        }
        if self.success() { writeln!(f, "result: TURN relaying works") } else { writeln!(f, "result: FAILED") }
    }
}

/// A byte pipe to the server: a connected UDP socket, TCP, or TLS.
enum Pipe {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>, Vec<u8>),
}

impl Pipe {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Udp(s) => s.send(bytes).map(|_| ()),
            Self::Tcp(s, _) => s.write_all(bytes),
            Self::Tls(s, _) => s.write_all(bytes),
        }
    }

    /// The next datagram or frame, or `None` at the deadline.
    fn recv(&mut self, deadline: Instant) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            let left = deadline.saturating_duration_since(now());
            if left.is_zero() {
                return Ok(None);
            }
            let left = left.max(Duration::from_millis(1));
            let mut buf = [0u8; 4096];
            let (got, pending) = match self {
                Self::Udp(s) => {
                    s.set_read_timeout(Some(left))?;
                    match s.recv(&mut buf) {
                        Ok(n) => return Ok(Some(buf[..n].to_vec())),
                        Err(e) if is_timeout(&e) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
                Self::Tcp(s, pending) => {
                    if let Ok(Some(n)) = frame_len(pending) {
                        return Ok(Some(pending.drain(..n).collect()));
                    }
                    s.set_read_timeout(Some(left))?;
                    (s.read(&mut buf), pending)
                }
                Self::Tls(s, pending) => {
                    if let Ok(Some(n)) = frame_len(pending) {
                        return Ok(Some(pending.drain(..n).collect()));
                    }
                    s.sock.set_read_timeout(Some(left))?;
                    (s.read(&mut buf), pending)
                }
            };
            match got {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

#[allow(clippy::disallowed_methods)] // the probe is a client tool, not the event loop
fn now() -> Instant {
    Instant::now()
}

/// A TURN client session used by the probe.
struct Session {
    pipe: Pipe,
    username: String,
    key: LongTermKey,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    password: Vec<u8>,
    tid: u64,
    timeout: Duration,
}

/// Why a request got no usable answer.
enum Failure {
    NoAnswer,
    Io(std::io::Error),
    Error(u16),
}

impl Session {
    fn next_tid(&mut self) -> TransactionId {
        self.tid = self.tid.wrapping_add(1);
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.tid.to_be_bytes());
        t[..4].copy_from_slice(&(std::process::id()).to_be_bytes());
        TransactionId(t)
    }

    fn build(&mut self, method: Method, class: Class, auth: bool, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        let tid = self.next_tid();
        let mut buf = vec![0u8; 1024];
        let mut w = MsgWriter::new(&mut buf, method, class, tid);
        body(&mut w);
        if auth {
            w.add_long_term_credentials(self.username.as_bytes(), &self.realm, &self.nonce, &self.key);
        }
        w.add_fingerprint();
        let n = w.finish().unwrap_or(0);
        buf.truncate(n);
        buf
    }

    fn transact(&mut self, req: &[u8]) -> Result<Vec<u8>, Failure> {
        for attempt in 0..3 {
            self.pipe.send(req).map_err(Failure::Io)?;
            let deadline = now() + self.timeout / 3 * (attempt + 1);
            while let Some(frame) = self.pipe.recv(deadline).map_err(Failure::Io)? {
                if frame.len() >= 20 && frame[8..20] == req[8..20] && frame[0] & 0xC0 == 0 {
                    return Ok(frame);
                }
            }
            if !matches!(self.pipe, Pipe::Udp(_)) {
                break;
            }
        }
        Err(Failure::NoAnswer)
    }

    /// An authenticated request (401/438 handled); Ok(success response) or the failure.
    fn request(&mut self, method: Method, body: &dyn Fn(&mut MsgWriter<'_>)) -> Result<Vec<u8>, Failure> {
        for _ in 0..3 {
            let auth = !self.nonce.is_empty();
            let req = self.build(method, Class::Request, auth, body);
            let resp = self.transact(&req)?;
            let Ok(msg) = StunMsg::parse(&resp) else { return Err(Failure::NoAnswer) };
            let code = msg.attr(AttrType::ERROR_CODE).and_then(|v| attr::decode_error_code(v).ok()).map(|c| c.0);
            match code {
                None => return Ok(resp),
                Some(401) if !auth => {}
                Some(438) => {}
                Some(c) => return Err(Failure::Error(c)),
            }
            if let (Some(realm), Some(nonce)) = (msg.attr(AttrType::REALM), msg.attr(AttrType::NONCE)) {
                self.realm = realm.to_vec();
                self.nonce = nonce.to_vec();
                self.key = long_term_key(self.username.as_bytes(), &self.realm, &self.password);
            } else {
                return Err(Failure::Error(code.unwrap_or(0)));
            }
        }
        Err(Failure::Error(401))
    }
}

fn connect(opts: &ProbeOptions, addr: SocketAddr) -> Result<Pipe, String> {
    match opts.uri.transport {
        ProbeTransport::Udp => {
            let local: SocketAddr =
                if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let s = UdpSocket::bind(local).map_err(|e| e.to_string())?;
            s.connect(addr).map_err(|e| e.to_string())?;
            Ok(Pipe::Udp(s))
        }
        ProbeTransport::Tcp | ProbeTransport::Tls => {
            let s = TcpStream::connect_timeout(&addr, opts.timeout).map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    format!("connection refused by {addr}/tcp: nothing listens there (port closed)")
                }
                std::io::ErrorKind::TimedOut => format!("no answer from {addr}/tcp: a firewall drops the port"),
                _ => format!("cannot connect to {addr}/tcp: {e}"),
            })?;
            let _ = s.set_nodelay(true);
            if opts.uri.transport == ProbeTransport::Tcp {
                return Ok(Pipe::Tcp(s, Vec::new()));
            }
            let cfg = tls_client_config(opts)?;
            let name = rustls::pki_types::ServerName::try_from(opts.uri.host.clone())
                .map_err(|e| format!("`{}` is not a TLS server name: {e}", opts.uri.host))?;
            let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, s);
            tls.sock.set_read_timeout(Some(opts.timeout)).map_err(|e| e.to_string())?;
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
            }
            Ok(Pipe::Tls(Box::new(tls), Vec::new()))
        }
    }
}

fn tls_client_config(opts: &ProbeOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    if opts.insecure {
        return Ok(Arc::new(
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth(),
        ));
    }
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let bundles = ["/etc/ssl/certs/ca-certificates.crt".into()].into_iter().chain(opts.ca_file.clone());
    for path in bundles {
        if let Ok(iter) = rustls::pki_types::CertificateDer::pem_file_iter(&path) {
            for cert in iter.flatten() {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))
}

/// `--insecure`: accepts any certificate (still a real TLS handshake, signatures still checked).
#[derive(Debug)]
pub struct AcceptAny(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn explain(f: &Failure, what: &str, addr: SocketAddr, transport: ProbeTransport) -> String {
    match f {
        Failure::NoAnswer => match transport {
            ProbeTransport::Udp => format!(
                "no answer from {addr}/udp to {what}: the port is closed or blocked by a firewall, or no TURN server listens there"
            ),
            _ => format!("no answer from {addr} to {what} over an open connection: not a TURN server?"),
        },
        Failure::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{addr} refused the connection: nothing listens on that port (port closed)")
        }
        Failure::Io(e) => format!("{what}: I/O error talking to {addr}: {e}"),
        Failure::Error(401) => format!(
            "{what}: 401 after sending credentials: wrong shared secret or password (compare auth.shared_secrets / static-auth-secret with the homeserver's turn_shared_secret), or the server clock is far off"
        ),
        Failure::Error(403) => format!(
            "{what}: 403: the server refuses its own relayed addresses as peers, so client -> TURN -> TURN -> client calls fail (turnpike allows live relayed addresses by itself; coturn needs its relay address in allowed-peer-ip)"
        ),
        Failure::Error(437) => format!("{what}: 437 allocation mismatch (a previous allocation from this address?)"),
        Failure::Error(442) => format!("{what}: 442: the server does not relay this transport"),
        Failure::Error(486) => format!("{what}: 486: the user or total allocation quota is reached"),
        Failure::Error(508) => format!("{what}: 508: the server has no free relay ports"),
        Failure::Error(c) => format!("{what}: error {c}"),
    }
}

fn relayed_of(resp: &[u8]) -> Option<SocketAddr> {
    let m = StunMsg::parse(resp).ok()?;
    attr::decode_xor_addr(m.attr(AttrType::XOR_RELAYED_ADDRESS)?, &m.transaction_id()).ok()
}

/// Runs the probe.
pub fn run(opts: &ProbeOptions) -> Report {
    let mut report = Report::default();
    let target = format!("{}:{}", opts.uri.host, opts.uri.port);
    let Ok(Some(addr)) = target.to_socket_addrs().map(|mut a| a.next()) else {
        report.step("resolve", false, format!("cannot resolve `{}`", opts.uri.host));
        return report;
    };
    report.step("resolve", true, format!("{target} -> {addr}"));
    let (username, password) = match &opts.credentials {
        Credentials::Secret(secret) => {
            let unix = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
            let username = format!("{}:turnpike-probe", unix + 3600);
            let pw = rest_password(secret.as_bytes(), username.as_bytes());
            (username, pw.to_vec())
        }
        Credentials::User { name, password } => (name.clone(), password.as_bytes().to_vec()),
    };
    let mut sessions = Vec::new();
    for label in ["A", "B"] {
        let pipe = match connect(opts, addr) {
            Ok(p) => p,
            Err(e) => {
                report.step("connect", false, e);
                return report;
            }
        };
        if label == "A" && opts.uri.transport != ProbeTransport::Udp {
            report.step("connect", true, format!("{addr}/{:?}", opts.uri.transport).to_lowercase());
        }
        sessions.push(Session {
            pipe,
            username: username.clone(),
            key: [0; 16],
            realm: Vec::new(),
            nonce: Vec::new(),
            password: password.clone(),
            tid: if label == "A" { 0 } else { 1 << 32 },
            timeout: opts.timeout,
        });
    }
    let mut relayed = Vec::new();
    for (i, s) in sessions.iter_mut().enumerate() {
        let name = format!("allocate {}", ["A", "B"][i]);
        match s.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0])) {
            Ok(resp) => {
                let Some(r) = relayed_of(&resp) else {
                    report.step(&name, false, "success without XOR-RELAYED-ADDRESS");
                    return report;
                };
                let realm = String::from_utf8_lossy(&s.realm).into_owned();
                report.step(&name, true, format!("authenticated in realm `{realm}`, relay candidate {r}"));
                relayed.push(r);
            }
            Err(f) => {
                report.step(&name, false, explain(&f, &name, addr, opts.uri.transport));
                return report;
            }
        }
    }
    for i in 0..2 {
        let other = relayed[1 - i];
        let name = format!("permission {} -> {}", ["A", "B"][i], other);
        match sessions[i].request(Method::CREATE_PERMISSION, &|w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, other)) {
            Ok(_) => report.step(&name, true, "granted"),
            Err(f) => {
                report.step(&name, false, explain(&f, &name, addr, opts.uri.transport));
                return report;
            }
        };
    }
    // Relay datagrams A -> B -> A through both allocations and time them.
    let mut received = 0usize;
    for n in 0..opts.count {
        let payload = format!("turnpike-probe {n}");
        let start = now();
        let send = |s: &mut Session, to: SocketAddr, data: &[u8]| {
            let msg = s.build(Method::SEND, Class::Indication, false, &|w| {
                w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, to);
                w.add_bytes(AttrType::DATA, data);
            });
            s.pipe.send(&msg)
        };
        if send(&mut sessions[0], relayed[1], payload.as_bytes()).is_err() {
            break;
        }
        let deadline = start + opts.timeout;
        let got_b = wait_data(&mut sessions[1], payload.as_bytes(), deadline);
        if !got_b || send(&mut sessions[1], relayed[0], payload.as_bytes()).is_err() {
            continue;
        }
        if wait_data(&mut sessions[0], payload.as_bytes(), deadline) {
            received += 1;
            report.rtts.push(now().saturating_duration_since(start));
        }
    }
    report.sent = opts.count;
    let loss = opts.count - received;
    if received == 0 {
        let private = |ip: std::net::IpAddr| match crate::policy::peer::canonical(ip) {
            std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        };
        let hint = if private(relayed[0].ip()) && !private(addr.ip()) {
            format!(
                " The relay candidate {} is a private address while the server is reached at {}: set external-ip (relay.external_ips) to the public address.",
                relayed[0].ip(),
                addr.ip()
            )
        } else {
            " The relay port range (default 49152-65535/udp) is probably blocked by a firewall, or external-ip is wrong."
                .to_string()
        };
        report.step(
            "relay",
            false,
            format!(
                "none of {} datagrams came back through the relayed addresses {} and {}.{hint}",
                opts.count, relayed[0], relayed[1]
            ),
        );
    } else {
        let mut rtts = report.rtts.clone();
        rtts.sort();
        let median = rtts[rtts.len() / 2];
        let max = rtts[rtts.len() - 1];
        report.step(
            "relay",
            loss == 0,
            format!(
                "{received}/{} datagrams relayed A -> B -> A, loss {:.1} %, round trip median {:.2} ms, max {:.2} ms",
                opts.count,
                100.0 * loss as f64 / opts.count as f64,
                median.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            ),
        );
    }
    for s in &mut sessions {
        let _ = s.request(Method::REFRESH, &|w| w.add_u32(AttrType::LIFETIME, 0));
    }
    report
}

/// Waits for a Data indication or ChannelData carrying `payload`.
fn wait_data(s: &mut Session, payload: &[u8], deadline: Instant) -> bool {
    while let Ok(Some(frame)) = s.pipe.recv(deadline) {
        if let Ok(m) = StunMsg::parse(&frame)
            && m.method() == Method::DATA
            && m.attr(AttrType::DATA) == Some(payload)
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_turn_uris() {
        let u: TurnUri = "turn:turn.example.org?transport=tcp".parse().unwrap();
        assert_eq!(u, TurnUri { host: "turn.example.org".into(), port: 3478, transport: ProbeTransport::Tcp });
        let u: TurnUri = "turns:[::1]:443".parse().unwrap();
        assert_eq!(u, TurnUri { host: "::1".into(), port: 443, transport: ProbeTransport::Tls });
        let u: TurnUri = "turn:127.0.0.1:3479".parse().unwrap();
        assert_eq!(u.transport, ProbeTransport::Udp);
        assert!("stun:x".parse::<TurnUri>().is_err());
        assert!("turn:x?transport=sctp".parse::<TurnUri>().is_err());
    }
}
