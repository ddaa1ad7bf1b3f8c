//! Shared helpers for integration tests: a server on loopback, a minimal TURN client built on the
//! crate's codec, and an echo peer.

#![allow(dead_code, unreachable_pub, clippy::disallowed_methods)]

pub mod stream;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use turnpike::config;
use turnpike::proto::attr::{self, AttrType, PROTO_UDP};
use turnpike::proto::integrity::{LongTermKey, long_term_key, rest_password};
use turnpike::proto::{Class, Method, MsgWriter, StunMsg, TransactionId};
use turnpike::server::{self, ServerHandle};

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

/// An owned STUN response.
pub struct Response(pub Vec<u8>);

impl Response {
    pub fn msg(&self) -> StunMsg<'_> {
        StunMsg::parse(&self.0).expect("valid STUN")
    }
    pub fn class(&self) -> Class {
        self.msg().class()
    }
    pub fn code(&self) -> Option<u16> {
        self.msg().attr(AttrType::ERROR_CODE).map(|v| attr::decode_error_code(v).unwrap().0)
    }
    pub fn attr(&self, t: AttrType) -> Option<Vec<u8>> {
        self.msg().attr(t).map(<[u8]>::to_vec)
    }
    pub fn xor_addr(&self, t: AttrType) -> SocketAddr {
        let m = self.msg();
        attr::decode_xor_addr(m.attr(t).unwrap(), &m.transaction_id()).unwrap()
    }
}

/// A minimal TURN client over UDP.
pub struct TurnClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub username: String,
    pub key: LongTermKey,
    pub nonce: Vec<u8>,
    tid: u32,
}

impl TurnClient {
    pub fn rest(server: SocketAddr, user: &str) -> Self {
        let username = format!("{}:{user}", unix_now() + 3600);
        let password = rest_password(SECRET.as_bytes(), username.as_bytes());
        let key = long_term_key(username.as_bytes(), REALM.as_bytes(), &password);
        Self::with_key(server, username, key)
    }

    pub fn with_key(server: SocketAddr, username: String, key: LongTermKey) -> Self {
        let local = if server.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" };
        let sock = UdpSocket::bind(local).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self { sock, server, username, key, nonce: Vec::new(), tid: rand_seed() }
    }

    fn next_tid(&mut self) -> TransactionId {
        self.tid = self.tid.wrapping_add(1);
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.tid.to_be_bytes());
        t[4..8].copy_from_slice(&self.sock.local_addr().unwrap().port().to_be_bytes().repeat(2));
        TransactionId(t)
    }

    pub fn build(&mut self, method: Method, class: Class, auth: bool, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        let tid = self.next_tid();
        let mut buf = vec![0u8; 2048];
        let mut w = MsgWriter::new(&mut buf, method, class, tid);
        body(&mut w);
        if auth {
            w.add_long_term_credentials(self.username.as_bytes(), REALM.as_bytes(), &self.nonce, &self.key);
        }
        w.add_fingerprint();
        let n = w.finish().unwrap();
        buf.truncate(n);
        buf
    }

    /// Sends a request and waits for the response with the same transaction ID, skipping data.
    pub fn transact(&mut self, req: &[u8]) -> Response {
        let tid = &req[8..20];
        for _attempt in 0..3 {
            self.sock.send_to(req, self.server).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            let mut buf = [0u8; 2048];
            while std::time::Instant::now() < deadline {
                match self.sock.recv_from(&mut buf) {
                    Ok((n, _)) if n >= 20 && &buf[8..20] == tid && buf[0] & 0xC0 == 0 => {
                        return Response(buf[..n].to_vec());
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        panic!("no response from {}", self.server);
    }

    /// An authenticated request, doing the 401/438 dance as needed.
    pub fn request(&mut self, method: Method, body: &dyn Fn(&mut MsgWriter<'_>)) -> Response {
        for _ in 0..3 {
            let auth = !self.nonce.is_empty();
            let req = self.build(method, Class::Request, auth, body);
            let r = self.transact(&req);
            match r.code() {
                Some(401) if !auth => self.nonce = r.attr(AttrType::NONCE).unwrap(),
                Some(438) => self.nonce = r.attr(AttrType::NONCE).unwrap(),
                _ => return r,
            }
        }
        panic!("authentication loop");
    }

    pub fn allocate(&mut self) -> SocketAddr {
        let r = self.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]));
        assert_eq!(r.class(), Class::Success, "allocate failed: {:?}", r.code());
        r.xor_addr(AttrType::XOR_RELAYED_ADDRESS)
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Response {
        self.request(Method::CREATE_PERMISSION, &|w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer))
    }

    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> Response {
        self.request(Method::CHANNEL_BIND, &|w| {
            w.add_bytes(AttrType::CHANNEL_NUMBER, &[(number >> 8) as u8, number as u8, 0, 0]);
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
        })
    }

    pub fn refresh(&mut self, lifetime: u32) -> Response {
        self.request(Method::REFRESH, &|w| w.add_u32(AttrType::LIFETIME, lifetime))
    }

    pub fn send_channel(&self, number: u16, payload: &[u8]) {
        let mut v = Vec::with_capacity(4 + payload.len());
        v.extend_from_slice(&number.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        v.extend_from_slice(payload);
        self.sock.send_to(&v, self.server).unwrap();
    }

    pub fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) {
        let msg = self.build(Method::SEND, Class::Indication, false, &|w| {
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
            w.add_bytes(AttrType::DATA, payload);
        });
        self.sock.send_to(&msg, self.server).unwrap();
    }

    /// Receives the next relayed payload: (channel number or None for a Data indication, peer, payload).
    pub fn recv_data(&self) -> Option<(Option<u16>, Option<SocketAddr>, Vec<u8>)> {
        let mut buf = [0u8; 2048];
        loop {
            let (n, _) = self.sock.recv_from(&mut buf).ok()?;
            let b = &buf[..n];
            if b[0] & 0xC0 == 0x40 {
                let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
                return Some((Some(u16::from_be_bytes([b[0], b[1]])), None, b[4..4 + len].to_vec()));
            }
            if let Ok(m) = StunMsg::parse(b)
                && m.method() == Method::DATA
                && m.class() == Class::Indication
            {
                let peer = attr::decode_xor_addr(m.attr(AttrType::XOR_PEER_ADDRESS)?, &m.transaction_id()).ok();
                return Some((None, peer, m.attr(AttrType::DATA)?.to_vec()));
            }
        }
    }
}

fn rand_seed() -> u32 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    t.subsec_nanos() ^ (std::process::id() << 12)
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
