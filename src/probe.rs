//! `turnpike probe`: checks a TURN server end to end the way a WebRTC client uses it. Two allocations
//! are made, each gets a permission for the other's relayed address, datagrams go A -> relay -> relay -> B
//! and back, and every step is reported with a plain diagnosis when it fails. This is the "you should
//! see at least one relay entry" check of the Synapse how-to, on the command line. The TURN client is
//! the workspace's ([`turnpike_client`]); this module adds the steps and the diagnoses.

use crate::proto::{AttrType, Method};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use turnpike_client::{Client, Failure, Framed, Session, Transport, Udp, tls};
pub use turnpike_client::{TurnUri, UriTransport};

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

impl Report {
    /// The last line of the report.
    pub fn verdict(&self) -> &'static str {
        if self.success() { "result: TURN relaying works" } else { "result: FAILED" }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}: {}", if self.ok { " ok " } else { "FAIL" }, self.name, self.detail)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.steps {
            writeln!(f, "{s}")?;
        }
        writeln!(f, "{}", self.verdict())
    }
}

/// A client of the probe, over whichever transport the URI names.
type ProbeClient = Client<Box<dyn Transport>>;

#[allow(clippy::disallowed_methods)] // the probe is a client tool, not the event loop
fn now() -> Instant {
    Instant::now()
}

/// A transport to `addr` as the URI asks: UDP, TCP or TLS (with a diagnosis when it cannot connect).
fn connect(opts: &ProbeOptions, addr: SocketAddr) -> Result<Box<dyn Transport>, String> {
    if opts.uri.transport == UriTransport::Udp {
        return Ok(Box::new(Udp::connect(addr).map_err(|e| e.to_string())?));
    }
    let tcp = TcpStream::connect_timeout(&addr, opts.timeout).map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused by {addr}/tcp: nothing listens there (port closed)")
        }
        std::io::ErrorKind::TimedOut => format!("no answer from {addr}/tcp: a firewall drops the port"),
        _ => format!("cannot connect to {addr}/tcp: {e}"),
    })?;
    let _ = tcp.set_nodelay(true);
    if opts.uri.transport == UriTransport::Tcp {
        return Ok(Box::new(Framed::new(tcp)));
    }
    let config = tls::client_config(opts.insecure, opts.ca_file.as_deref()).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(opts.timeout)).map_err(|e| e.to_string())?;
    let stream =
        tls::connect(tcp, config, &opts.uri.host).map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
    Ok(Box::new(Framed::new(stream)))
}

fn explain(f: &Failure, what: &str, addr: SocketAddr, transport: UriTransport) -> String {
    match f {
        Failure::NoAnswer => match transport {
            UriTransport::Udp => format!(
                "no answer from {addr}/udp to {what}: the port is closed or blocked by a firewall, or no TURN server listens there"
            ),
            _ => format!("no answer from {addr} to {what} over an open connection: not a TURN server?"),
        },
        Failure::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{addr} refused the connection: nothing listens on that port (port closed)")
        }
        Failure::Io(e) => format!("{what}: I/O error talking to {addr}: {e}"),
        Failure::Refused(answer) => match answer.code() {
            Some(401) => format!(
                "{what}: 401 after sending credentials: wrong shared secret or password (compare auth.shared_secrets / static-auth-secret with the homeserver's turn_shared_secret), or the server clock is far off"
            ),
            Some(403) => format!(
                "{what}: 403: the server refuses its own relayed addresses as peers, so client -> TURN -> TURN -> client calls fail (turnpike allows live relayed addresses by itself; coturn needs its relay address in allowed-peer-ip)"
            ),
            Some(437) => format!("{what}: 437 allocation mismatch (a previous allocation from this address?)"),
            Some(438) => {
                format!("{what}: 438 stale nonce, again and again: the server rejects every nonce it hands out")
            }
            Some(442) => format!("{what}: 442: the server does not relay this transport"),
            Some(486) => format!("{what}: 486: the user or total allocation quota is reached"),
            Some(508) => format!("{what}: 508: the server has no free relay ports"),
            Some(c) => format!("{what}: error {c}"),
            None if answer.class() == crate::proto::Class::Success => {
                format!("{what}: success without XOR-RELAYED-ADDRESS")
            }
            None => format!("{what}: an error response without a readable ERROR-CODE"),
        },
    }
}
/// Runs the probe and returns its report.
pub fn run(opts: &ProbeOptions) -> Report {
    run_observed(opts, &mut |_| {})
}

/// A report being written, with whoever wants each step as it completes.
struct Progress<'a> {
    report: Report,
    on_step: &'a mut dyn FnMut(&Step),
}

impl Progress<'_> {
    fn step(&mut self, name: &str, ok: bool, detail: impl Into<String>) -> bool {
        let ok = self.report.step(name, ok, detail);
        if let Some(step) = self.report.steps.last() {
            (self.on_step)(step);
        }
        ok
    }
}

/// Runs the probe, handing each step to `on_step` as it completes (the command prints it at once: a
/// step that hangs until its timeout shows what worked before it).
pub fn run_observed(opts: &ProbeOptions, on_step: &mut dyn FnMut(&Step)) -> Report {
    let mut report = Progress { report: Report::default(), on_step };
    let target = format!("{}:{}", opts.uri.host, opts.uri.port);
    let Ok(Some(addr)) = target.to_socket_addrs().map(|mut a| a.next()) else {
        report.step("resolve", false, format!("cannot resolve `{}`", opts.uri.host));
        return report.report;
    };
    report.step("resolve", true, format!("{target} -> {addr}"));
    let credentials = match &opts.credentials {
        Credentials::Secret(secret) => {
            let unix = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
            turnpike_client::Credentials::rest(secret.as_bytes(), "turnpike-probe", unix + 3600)
        }
        Credentials::User { name, password } => turnpike_client::Credentials::user(name, password.as_bytes()),
    };
    let mut clients: Vec<ProbeClient> = Vec::new();
    for label in ["A", "B"] {
        let transport = match connect(opts, addr) {
            Ok(t) => t,
            Err(e) => {
                report.step("connect", false, e);
                return report.report;
            }
        };
        if label == "A" && opts.uri.transport != UriTransport::Udp {
            report.step("connect", true, format!("{addr}/{:?}", opts.uri.transport).to_lowercase());
        }
        // Transaction IDs: this process, then which of the two clients.
        let prefix = std::process::id() ^ (u32::from(label == "B") << 31);
        clients.push(Client::new(transport, Session::new(credentials.clone(), prefix), opts.timeout));
    }
    let mut relayed = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let name = format!("allocate {}", ["A", "B"][i]);
        match c.allocate(false) {
            Ok(r) => {
                let realm = String::from_utf8_lossy(c.session.realm()).into_owned();
                report.step(&name, true, format!("authenticated in realm `{realm}`, relay candidate {r}"));
                relayed.push(r);
            }
            Err(f) => {
                report.step(&name, false, explain(&f, &name, addr, opts.uri.transport));
                return report.report;
            }
        }
    }
    for i in 0..2 {
        let other = relayed[1 - i];
        let name = format!("permission {} -> {}", ["A", "B"][i], other);
        let granted = clients[i]
            .request_success(Method::CREATE_PERMISSION, |w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, other));
        match granted {
            Ok(_) => report.step(&name, true, "granted"),
            Err(f) => {
                report.step(&name, false, explain(&f, &name, addr, opts.uri.transport));
                return report.report;
            }
        };
    }
    // Relay datagrams A -> B -> A through both allocations and time them.
    let mut received = 0usize;
    for n in 0..opts.count {
        let payload = format!("turnpike-probe {n}");
        let start = now();
        if clients[0].send_indication(relayed[1], payload.as_bytes()).is_err() {
            break;
        }
        let deadline = start + opts.timeout;
        let got_b = wait_data(&mut clients[1], payload.as_bytes(), deadline);
        if !got_b || clients[1].send_indication(relayed[0], payload.as_bytes()).is_err() {
            continue;
        }
        if wait_data(&mut clients[0], payload.as_bytes(), deadline) {
            received += 1;
            report.report.rtts.push(now().saturating_duration_since(start));
        }
    }
    report.report.sent = opts.count;
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
        let mut rtts = report.report.rtts.clone();
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
    for c in &mut clients {
        let _ = c.refresh(0);
    }
    report.report
}

/// Waits for relayed data carrying `payload` (earlier, late datagrams are skipped).
fn wait_data(c: &mut ProbeClient, payload: &[u8], deadline: Instant) -> bool {
    while let Ok(Some(data)) = c.recv_data(deadline) {
        if data.payload == payload {
            return true;
        }
    }
    false
}
