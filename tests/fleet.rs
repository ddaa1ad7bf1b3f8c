//! A fleet of three turnpike nodes sharing control state through a real `redis-server` (started here
//! on a loopback port in a temporary directory, killed by PID): fleet-wide user quotas, the fleet's
//! session list, ending sessions and revoking users on every node, drain with ALTERNATE-SERVER, a node
//! dying, and Redis dying under running calls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, missing_docs)]

mod common;

use common::{Binary, EchoPeer, TurnClient, http, test_yaml};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use turnpike::proto::attr::{AttrType, decode_plain_addr};
use turnpike::proto::{Class, Method};

const TOKEN: &str = "fleet-token-0123456789abcdef0123";

/// A redis-server of our own.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    /// Starts one on `port` (a free one when 0); `None` when redis-server is not installed.
    fn start(port: u16) -> Option<Self> {
        let port = if port == 0 {
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
        } else {
            port
        };
        let dir = std::env::temp_dir().join(format!("turnpike-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, port, dir })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_or_skip() -> Option<Redis> {
    let redis = Redis::start(0);
    if redis.is_none() {
        assert!(std::env::var_os("TURNPIKE_REQUIRE_REDIS").is_none(), "redis-server is required");
        eprintln!("SKIPPED: redis-server not installed");
    }
    redis
}

/// A node of the fleet: `name`, quota 2 per user, lease 3 s.
fn node(name: &str, redis: u16, ports: (u16, u16)) -> Binary {
    node_with(name, redis, ports, "")
}

/// As [`node`], with more `cluster:` settings (indented lines).
fn node_with(name: &str, redis: u16, ports: (u16, u16), cluster_extra: &str) -> Binary {
    let dir = std::env::temp_dir().join(format!("turnpike-fleet-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("admin.token");
    std::fs::write(&token, TOKEN).unwrap();
    let yaml = test_yaml(
        1,
        ports,
        "127.0.0.1",
        &format!(
            "allocations:\n  user_quota: 2\nadmin:\n  listen: 127.0.0.1:0\n  token_file: {}\n\
             cluster:\n  redis: redis://127.0.0.1:{redis}/0\n  node: {name}\n  lease: 3\n{cluster_extra}",
            token.display()
        ),
    );
    let b = Binary::start(&format!("fleet-{name}"), &yaml);
    assert!(b.wait_log("fleet: node", Duration::from_secs(10)).is_some(), "{name} joined");
    b
}

fn allocate_code(server: SocketAddr, user: &str) -> (Option<u16>, TurnClient, turnpike_client::Answer) {
    let mut c = TurnClient::rest(server, user);
    let answer = c.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
    (answer.code(), c, answer)
}

fn fleet_sessions(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = http(admin, "GET", "/v1/sessions?scope=fleet", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits (at most `secs`) for `ok`.
fn eventually(secs: u64, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fleet_shares_quotas_sessions_kills_revocations_and_drain() {
    let Some(redis) = redis_or_skip() else { return };
    let a = node("node-a", redis.port, (48000, 48019));
    let b = node("node-b", redis.port, (48020, 48039));
    let c = node("node-c", redis.port, (48040, 48059));
    let (admin_a, admin_b, admin_c) = (a.admin_addr(), b.admin_addr(), c.admin_addr());
    eventually(5, "three live nodes", || fleet_sessions(admin_a)["nodes"].as_array().map(Vec::len) == Some(3));

    // Fleet-wide user quota: two allocations on A and B, the third on C is refused; others allocate.
    let mut on_a = TurnClient::rest(a.addr, "quota-user");
    on_a.allocate();
    let mut on_b = TurnClient::rest(b.addr, "quota-user");
    on_b.allocate();
    eventually(5, "C counts the user's allocations elsewhere", || {
        let (_, body) = http(admin_c, "GET", "/v1/sessions?scope=fleet&user=quota-user", Some(TOKEN), None);
        body.matches("\"user\":\"quota-user\"").count() == 2
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(allocate_code(c.addr, "quota-user").0, Some(486));
    let mut other = TurnClient::rest(c.addr, "other-user");
    other.allocate();

    // The fleet's sessions from any node, with node names (the lists are at most a second old).
    eventually(5, "every node's sessions listed from B", || {
        let all = fleet_sessions(admin_b);
        let nodes: Vec<&str> = all["sessions"].as_array().unwrap().iter().filter_map(|s| s["node"].as_str()).collect();
        ["node-a", "node-b", "node-c"].iter().all(|n| nodes.contains(n))
    });

    // Killing the user's sessions from C ends them on A and B (their Refresh gets 437).
    let (status, body) = http(admin_c, "DELETE", "/v1/sessions?user=quota-user", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ended\":2"), "{body}");
    assert_eq!(on_a.refresh(600).code(), Some(437));
    assert_eq!(on_b.refresh(600).code(), Some(437));

    // A revocation made on A is enforced on every node.
    let until = common::unix_now() + 600;
    let body = format!("{{\"user\": \"bad-user\", \"until\": {until}}}");
    assert_eq!(http(admin_a, "POST", "/v1/revocations", Some(TOKEN), Some(&body)).0, 200);
    for server in [b.addr, c.addr] {
        eventually(3, "revocation reaches every node", || allocate_code(server, "bad-user").0 == Some(403));
    }

    // Drain B: a new Allocate there is sent to A or C (300 + ALTERNATE-SERVER); B's call keeps relaying.
    let peer = EchoPeer::start();
    let mut call = TurnClient::rest(b.addr, "caller");
    call.allocate();
    assert_eq!(call.create_permission(peer.addr).class(), Class::Success);
    assert_eq!(call.channel_bind(0x4000, peer.addr).class(), Class::Success);
    assert_eq!(http(admin_b, "POST", "/v1/drain", Some(TOKEN), None).0, 200);
    let (code, _, answer) = allocate_code(b.addr, "newcomer");
    assert_eq!(code, Some(300), "a draining node redirects");
    let alternate = decode_plain_addr(answer.attr(AttrType::ALTERNATE_SERVER).expect("ALTERNATE-SERVER")).unwrap();
    assert!(alternate == a.addr || alternate == c.addr, "{alternate} is not A ({}) or C ({})", a.addr, c.addr);
    for i in 0..200u32 {
        call.send_channel(0x4000, &i.to_be_bytes());
        assert_eq!(call.recv_data().map(|(_, _, d)| d), Some(i.to_be_bytes().to_vec()), "datagram {i} lost");
    }
    assert_eq!(call.refresh(600).class(), Class::Success);
    // Other nodes no longer name B while it drains.
    drop(b);
    drop(a);
    drop(c);
}

#[test]
fn a_dead_node_leaves_and_a_dead_redis_drops_no_call() {
    let Some(mut redis) = redis_or_skip() else { return };
    let a = node("node-x", redis.port, (48060, 48079));
    let mut b = node("node-y", redis.port, (48080, 48099));
    let admin_a = a.admin_addr();
    let mut on_b = TurnClient::rest(b.addr, "y-user");
    on_b.allocate();
    eventually(5, "A sees B's session", || fleet_sessions(admin_a).to_string().contains("node-y"));

    // kill -9 of B: gone from the fleet view within one lease (3 s) and a little.
    let _ = b.child.kill();
    let _ = b.child.wait();
    eventually(5, "B leaves the fleet view", || {
        let v = fleet_sessions(admin_a);
        !v.to_string().contains("node-y")
    });

    // kill -9 of Redis under a running call: nothing lost, new allocations still succeed.
    let peer = EchoPeer::start();
    let mut call = TurnClient::rest(a.addr, "x-caller");
    call.allocate();
    assert_eq!(call.create_permission(peer.addr).class(), Class::Success);
    assert_eq!(call.channel_bind(0x4002, peer.addr).class(), Class::Success);
    let port = redis.port;
    redis.kill();
    let mut relayed = 0;
    for i in 0..300u32 {
        call.send_channel(0x4002, &i.to_be_bytes());
        if call.recv_data().is_some_and(|(_, _, d)| d == i.to_be_bytes()) {
            relayed += 1;
        }
    }
    assert_eq!(relayed, 300, "datagrams lost while Redis was down");
    assert!(a.wait_log("redis unreachable", Duration::from_secs(10)).is_some());
    TurnClient::rest(a.addr, "while-redis-is-down").allocate();

    // Redis back (empty: it kept nothing): A publishes again, and a new node sees A's sessions.
    let _redis = Redis::start(port).expect("redis restarts");
    assert!(a.wait_log("redis reachable again", Duration::from_secs(10)).is_some());
    let c = node("node-z", port, (48100, 48119));
    let admin_c = c.admin_addr();
    eventually(5, "the fleet view is whole again", || {
        let v = fleet_sessions(admin_c);
        v["sessions"].as_array().map_or(0, |s| s.iter().filter(|s| s["node"] == "node-x").count()) == 2
    });
    call.send_channel(0x4002, b"after");
    assert_eq!(call.recv_data().map(|(_, _, d)| d), Some(b"after".to_vec()));
}

#[test]
fn on_outage_refuse_refuses_new_allocations_while_redis_is_away() {
    let Some(mut redis) = redis_or_skip() else { return };
    let port = redis.port;
    let n = node_with("node-r", port, (48120, 48139), "  on_outage: refuse\n");
    let mut before = TurnClient::rest(n.addr, "r-user");
    before.allocate();
    redis.kill();
    assert!(n.wait_log("redis unreachable", Duration::from_secs(10)).is_some());
    assert_eq!(allocate_code(n.addr, "r-new").0, Some(486));
    // The running allocation is untouched.
    assert_eq!(before.refresh(600).class(), Class::Success);
    let _redis = Redis::start(port).expect("redis restarts");
    assert!(n.wait_log("redis reachable again", Duration::from_secs(10)).is_some());
    TurnClient::rest(n.addr, "r-after").allocate();
}
