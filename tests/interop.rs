//! Interoperability with software nobody here wrote: coturn's `turnutils_uclient` relaying to
//! `turnutils_peer`, and the Python `aioice` TURN client, against the real `turnpike` binary.
//!
//! When the tools are missing these tests say so and pass, unless `TURNPIKE_REQUIRE_INTEROP=1` (set by
//! `scripts/ci/test.sh`, which installs the tools), in which case a missing tool is a failure.

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SECRET: &str = "interop-secret";

/// Each test runs a server, turnutils_peer and a client: run them one at a time, so a 2-core machine
/// is not measuring its own contention (uclient counts late datagrams as lost).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialized() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tool_available(cmd: &str, probe: &[&str]) -> bool {
    let found = Command::new(cmd).args(probe).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(
            std::env::var_os("TURNPIKE_REQUIRE_INTEROP").is_none(),
            "{cmd} is required (TURNPIKE_REQUIRE_INTEROP is set) but not installed"
        );
        eprintln!("SKIPPED: {cmd} not installed (scripts/ci/test.sh installs it)");
    }
    found
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the turnpike binary on an ephemeral port with relay ports `ports`; returns it and its address.
fn start_turnpike(name: &str, ports: (u16, u16)) -> (Proc, SocketAddr) {
    let (p, addrs) = start_turnpike_with(name, ports, "");
    (p, addrs[0])
}

/// As [`start_turnpike`] with extra YAML; returns the addresses it reports, UDP first, then TCP and TLS.
fn start_turnpike_with(name: &str, ports: (u16, u16), extra: &str) -> (Proc, Vec<SocketAddr>) {
    let dir: PathBuf = std::env::temp_dir().join(format!("turnpike-interop-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("turnpike.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  ips: [127.0.0.1]\n  port: 0\n  tls_port: 0\nrelay:\n  ips: [127.0.0.1]\n  min_port: {}\n  max_port: {}\n\
             auth:\n  realm: interop.test\n  shared_secrets: [{SECRET}]\n  users: [\"alice:wonderland\"]\n\
             peers:\n  allowed: [127.0.0.1]\nruntime:\n  threads: 2\n{extra}",
            ports.0, ports.1
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("turnpike starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split('/').next().unwrap_or_default().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let want = 2 + usize::from(extra.contains("tls:"));
    let addrs = (0..want)
        .map(|_| rx.recv_timeout(Duration::from_secs(20)).expect("turnpike reports its addresses").parse().unwrap())
        .collect();
    (Proc(child), addrs)
}

fn start_peer() -> (Proc, u16) {
    let port = free_udp_port();
    let child = Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnutils_peer starts");
    std::thread::sleep(Duration::from_millis(300));
    (Proc(child), port)
}

/// Runs uclient with 4 clients x 100 paced 170-byte messages and asserts every one came back.
fn uclient(server: SocketAddr, peer_port: u16, extra: &[&str]) {
    let total = 400;
    let mut args: Vec<String> = extra.iter().map(ToString::to_string).collect();
    args.extend(
        ["-e", "127.0.0.1", "-r", &peer_port.to_string(), "-n", "100", "-m", "4", "-l", "170", "-z", "5"]
            .iter()
            .map(ToString::to_string),
    );
    args.extend(["-p".to_string(), server.port().to_string(), server.ip().to_string()]);
    let out = Command::new("timeout").arg("60").arg("turnutils_uclient").args(&args).output().expect("uclient runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!("tot_send_msgs={total}, tot_recv_msgs={total}")),
        "uclient {args:?} did not get all {total} messages back:\n{text}"
    );
    assert!(text.contains("Total lost packets 0 (0.000000%)"), "loss reported:\n{text}");
    assert!(!text.contains("error 4") && !text.contains("error 5"), "uclient saw STUN errors:\n{text}");
}

#[test]
fn uclient_rest_credentials_channel_mode() {
    let _turn = serialized();
    if !tool_available("turnutils_uclient", &["-h"]) {
        return;
    }
    let (_server, addr) = start_turnpike("rest-channel", (43000, 43099));
    let (_peer, peer_port) = start_peer();
    uclient(addr, peer_port, &["-W", SECRET, "-u", "@bob:example.org"]);
}

#[test]
fn uclient_rest_credentials_send_indication_mode() {
    let _turn = serialized();
    if !tool_available("turnutils_uclient", &["-h"]) {
        return;
    }
    let (_server, addr) = start_turnpike("rest-send", (43100, 43199));
    let (_peer, peer_port) = start_peer();
    uclient(addr, peer_port, &["-s", "-W", SECRET, "-u", "carol"]);
}

#[test]
fn uclient_static_user_channel_and_send_modes() {
    let _turn = serialized();
    if !tool_available("turnutils_uclient", &["-h"]) {
        return;
    }
    let (_server, addr) = start_turnpike("static", (43200, 43299));
    let (_peer, peer_port) = start_peer();
    uclient(addr, peer_port, &["-u", "alice", "-w", "wonderland"]);
    uclient(addr, peer_port, &["-s", "-u", "alice", "-w", "wonderland"]);
}

#[test]
fn uclient_client_to_client_through_two_relays() {
    let _turn = serialized();
    if !tool_available("turnutils_uclient", &["-h"]) {
        return;
    }
    let (_server, addr) = start_turnpike("c2c", (43300, 43399));
    let (_peer, peer_port) = start_peer();
    uclient(addr, peer_port, &["-y", "-W", SECRET, "-u", "dave"]);
}

#[test]
fn aioice_allocates_and_relays() {
    let _turn = serialized();
    if !tool_available("python3", &["-c", "import aioice"]) {
        return;
    }
    let import = Command::new("python3").args(["-c", "import aioice"]).status().unwrap();
    if !import.success() {
        assert!(std::env::var_os("TURNPIKE_REQUIRE_INTEROP").is_none(), "aioice is required but not importable");
        eprintln!("SKIPPED: aioice not installed (scripts/ci/test.sh installs it)");
        return;
    }
    let (_server, addr) = start_turnpike("aioice", (43400, 43499));
    let username =
        format!("{}:erin", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600);
    let password = turnpike::proto::integrity::rest_password(SECRET.as_bytes(), username.as_bytes());
    let password = String::from_utf8(password.to_vec()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/aioice_turn.py");
    for transport in ["udp", "tcp"] {
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let out = Command::new("timeout")
            .args(["60", "python3", script, &ip, &port, &username, &password, transport])
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("OK"), "aioice over {transport} failed:\n{text}");
    }
}

#[test]
fn uclient_over_tcp_channel_and_send_modes() {
    let _turn = serialized();
    if !tool_available("turnutils_uclient", &["-h"]) {
        return;
    }
    let (_server, addrs) = start_turnpike_with("tcp", (43500, 43599), "");
    let (_peer, peer_port) = start_peer();
    uclient(addrs[1], peer_port, &["-t", "-W", SECRET, "-u", "tcp-user"]);
    uclient(addrs[1], peer_port, &["-t", "-s", "-W", SECRET, "-u", "tcp-user"]);
}

#[test]
fn uclient_over_tls() {
    let _turn = serialized();
    if !tool_available("turnutils_uclient", &["-h"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turnpike-interop-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let extra =
        format!("tls:\n  cert: {}\n  pkey: {}\n", dir.join("cert.pem").display(), dir.join("key.pem").display());
    let (_server, addrs) = start_turnpike_with("tls", (43600, 43699), &extra);
    let (_peer, peer_port) = start_peer();
    uclient(addrs[2], peer_port, &["-t", "-S", "-W", SECRET, "-u", "tls-user"]);
}
