//! Shared helpers for integration tests: a server on loopback, the workspace's TURN client with the
//! test server's credentials, and an echo peer.

#![allow(dead_code, unreachable_pub, clippy::disallowed_methods)]

pub mod stream;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use turnpike::config;
use turnpike::proto::integrity::LongTermKey;
use turnpike::proto::{Class, Method, MsgWriter};
use turnpike::server::{self, ServerHandle};
use turnpike_client::{Client, Credentials, Session, Udp};

pub const SECRET: &str = "integration-secret";
pub const REALM: &str = "turnpike.test";
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Starts a server on 127.0.0.1 (ephemeral port) with `threads` shards and relay ports `ports`,
/// plus extra YAML appended at the top level. Loopback peers are allowed unless `extra` has `peers:`.
pub fn start_server(threads: usize, ports: (u16, u16), extra: &str) -> ServerHandle {
    start_server_relaying(threads, ports, "127.0.0.1", extra)
}

/// As [`start_server`], with the relay addresses given (e.g. `"127.0.0.1, ::1"`).
pub fn start_server_relaying(threads: usize, ports: (u16, u16), relay_ips: &str, extra: &str) -> ServerHandle {
    let yaml = test_yaml(threads, ports, relay_ips, extra);
    let cfg = config::parse(Path::new("<test>.yaml"), &yaml).expect("test config");
    server::start(&cfg).expect("server starts")
}

/// The YAML of a test server.
pub fn test_yaml(threads: usize, ports: (u16, u16), relay_ips: &str, extra: &str) -> String {
    let yaml = format!(
        "listen:\n  ips: [127.0.0.1]\n  port: 0\nrelay:\n  ips: [{relay_ips}]\n  min_port: {}\n  max_port: {}\n\
         auth:\n  realm: {REALM}\n  shared_secrets: [{SECRET}]\n  users: [\"alice:wonderland\"]\n\
         runtime:\n  threads: {threads}\n{extra}",
        ports.0, ports.1
    );
    if extra.contains("peers:") { yaml } else { format!("{yaml}peers:\n  allowed: [127.0.0.1]\n") }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A UDP echo peer on loopback.
pub struct EchoPeer {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoPeer {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0")
    }

    pub fn start_on(local: &str) -> Self {
        let sock = UdpSocket::bind(local).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Self { addr, stop, thread: Some(thread) }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A received STUN message (the workspace client's [`turnpike_client::Answer`]).
pub type Response = turnpike_client::Answer;

/// The workspace's TURN client over UDP, with the test server's credentials, panicking where a test
/// needs an answer.
pub struct TurnClient {
    pub client: Client<Udp>,
}

impl TurnClient {
    /// A client with TURN REST credentials for `user` under the test secret.
    pub fn rest(server: SocketAddr, user: &str) -> Self {
        Self::with_credentials(server, Credentials::rest(SECRET.as_bytes(), user, unix_now() + 3600))
    }

    /// A client with `credentials` (a static user, another secret).
    pub fn with_credentials(server: SocketAddr, credentials: Credentials) -> Self {
        Self::with_session(server, Session::new(credentials, rand_seed()).with_realm(REALM.as_bytes()))
    }

    /// A client that signs as `username` with `key` (a wrong key forges requests).
    pub fn with_key(server: SocketAddr, username: String, key: LongTermKey) -> Self {
        Self::with_session(
            server,
            Session::new(Credentials::user(&username, b""), rand_seed()).with_realm(REALM.as_bytes()).with_key(key),
        )
    }

    fn with_session(server: SocketAddr, session: Session) -> Self {
        let local = if server.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" };
        let udp = Udp::bind(local.parse().unwrap(), server).unwrap();
        Self { client: Client::new(udp, session, TIMEOUT) }
    }

    /// The client's socket.
    pub fn sock(&self) -> &UdpSocket {
        &self.client.transport.socket
    }

    /// The server it talks to.
    pub fn server(&self) -> SocketAddr {
        self.client.transport.server
    }

    pub fn username(&self) -> String {
        self.client.session.username().to_string()
    }

    pub fn nonce(&self) -> Vec<u8> {
        self.client.session.nonce().to_vec()
    }

    pub fn set_nonce(&mut self, nonce: &[u8]) {
        self.client.session.set_nonce(nonce);
    }

    /// A message signed (`auth`) with the session's credentials, or not, ending with FINGERPRINT.
    pub fn build(&mut self, method: Method, class: Class, auth: bool, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        self.client.session.message(method, class, auth, body)
    }

    /// Sends a request and waits for the response with the same transaction ID, skipping data.
    pub fn transact(&mut self, req: &[u8]) -> Response {
        let server = self.server();
        self.client.transact(req).unwrap_or_else(|e| panic!("no response from {server}: {e}"))
    }

    /// An authenticated request, doing the 401/438 dance as needed.
    pub fn request(&mut self, method: Method, body: &dyn Fn(&mut MsgWriter<'_>)) -> Response {
        self.client.request(method, body).unwrap_or_else(|e| panic!("{method:?}: {e}"))
    }

    pub fn allocate(&mut self) -> SocketAddr {
        self.client.allocate(false).unwrap_or_else(|e| panic!("allocate failed: {e}"))
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Response {
        self.client.create_permission(peer).unwrap_or_else(|e| panic!("CreatePermission: {e}"))
    }

    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> Response {
        self.client.channel_bind(number, peer).unwrap_or_else(|e| panic!("ChannelBind: {e}"))
    }

    pub fn refresh(&mut self, lifetime: u32) -> Response {
        self.client.refresh(lifetime).unwrap_or_else(|e| panic!("Refresh: {e}"))
    }

    pub fn send_channel(&mut self, number: u16, payload: &[u8]) {
        self.client.send_channel(number, payload).unwrap();
    }

    pub fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) {
        self.client.send_indication(peer, payload).unwrap();
    }

    /// Receives the next relayed payload: (channel number or None for a Data indication, peer, payload).
    pub fn recv_data(&mut self) -> Option<(Option<u16>, Option<SocketAddr>, Vec<u8>)> {
        let data = self.client.recv_data_in_time().ok()??;
        Some((data.channel, data.peer, data.payload))
    }
}

fn rand_seed() -> u32 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    t.subsec_nanos() ^ (std::process::id() << 12) ^ NEXT.fetch_add(0x9E37_79B9, std::sync::atomic::Ordering::Relaxed)
}

/// The turnpike binary as a child process, killed on drop.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Every line it logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Where its configuration file is.
    pub config: std::path::PathBuf,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Starts the binary on `yaml` (written to a temporary file) and waits for its listening address.
    pub fn start(name: &str, yaml: &str) -> Self {
        Self::start_with_env(name, yaml, &[])
    }

    /// As [`Binary::start`] with extra environment variables.
    pub fn start_with_env(name: &str, yaml: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        Self::spawn(name, yaml, env, None)
    }

    /// As [`Binary::start`], the process allowed `nofile` descriptors (soft and hard limit).
    pub fn start_with_nofile(name: &str, yaml: &str, nofile: u64) -> Self {
        Self::spawn(name, yaml, &[], Some(nofile))
    }

    fn spawn(name: &str, yaml: &str, env: &[(&str, &std::ffi::OsStr)], nofile: Option<u64>) -> Self {
        use std::io::{BufRead, BufReader};
        let dir = std::env::temp_dir().join(format!("turnpike-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("turnpike.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let binary = env!("CARGO_BIN_EXE_turnpike");
        let mut command = match nofile {
            None => std::process::Command::new(binary),
            Some(n) => {
                // The shell sets the limit and becomes turnpike (exec): the child's PID is turnpike's.
                let mut sh = std::process::Command::new("sh");
                sh.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(binary);
                sh
            }
        };
        let mut child = command
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("turnpike starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("turnpike reports its address");
        Self { child, addr: addr.parse().unwrap(), log, config: cfg }
    }

    /// Waits until a logged line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal by name (HUP, TERM) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Resident memory of the process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// The entries of `tests/data/peer-addresses.txt`, the one table of peer addresses: each address and
/// whether the default peer policy denies it.
pub fn peer_table() -> Vec<(std::net::IpAddr, bool)> {
    include_str!("../data/peer-addresses.txt")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let addr = words.next().unwrap().parse().unwrap();
            let deny = match words.next() {
                Some("deny") => true,
                Some("allow") => false,
                other => panic!("bad verdict {other:?} in: {l}"),
            };
            (addr, deny)
        })
        .collect()
}

/// A TCP connection to `to` from the local address `source` (any port), within a second.
pub fn connect_from(source: std::net::IpAddr, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(1))?;
    Ok(socket.into())
}

/// Raises this process's soft descriptor limit to its hard limit (tests that hold many sockets).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// One `GET /metrics` answer (status line and headers included); it must be a 200.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server keeps connections alive: ask it to close this one, to read the answer to its end.
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The sum of the samples in a scrape whose line starts with `name_and_labels` (a family's name and
/// `{` for all its samples).
pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels) && !l.starts_with('#'))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// One HTTP/1.1 request (`Connection: close`) to `addr`; the status and the body. `token`: the bearer
/// token, if any.
pub fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let status = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

impl Binary {
    /// The admin API's address, from the log.
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_log("admin API on http://", Duration::from_secs(10)).expect("admin API address logged");
        line.split("admin API on http://").nth(1).unwrap().trim_end_matches('/').parse().unwrap()
    }
}
