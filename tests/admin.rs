//! The admin API on one node: authentication, clear 4xx answers, the session list, ending sessions,
//! revocations, drain, and that idle admin clients do not hold up relaying.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, missing_docs)]

mod common;

use common::{Binary, EchoPeer, TurnClient, http, test_yaml};
use std::path::PathBuf;
use std::time::Duration;
use turnpike::proto::Class;
use turnpike::proto::attr::AttrType;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn token_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-admin-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path
}

/// A node with the admin API on an ephemeral loopback port.
fn node(name: &str, ports: (u16, u16)) -> Binary {
    let token = token_file(name);
    let yaml = test_yaml(
        2,
        ports,
        "127.0.0.1",
        &format!("admin:\n  listen: 127.0.0.1:0\n  token_file: {}\n", token.display()),
    );
    Binary::start(name, &yaml)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Waits (at most 5 s) until the session list satisfies `ok`.
fn sessions_until(
    addr: std::net::SocketAddr,
    query: &str,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = http(addr, "GET", &format!("/v1/sessions{query}"), Some(TOKEN), None);
        assert_eq!(status, 200, "{body}");
        let list = json(&body)["sessions"].as_array().cloned().unwrap();
        if ok(&list) || std::time::Instant::now() > deadline {
            return list;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn requests_without_the_token_or_with_bad_input_get_clear_4xx() {
    let server = node("auth", (47900, 47919));
    let admin = server.admin_addr();
    let (status, body) = http(admin, "GET", "/healthz", None, None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"));
    assert_eq!(http(admin, "GET", "/v1/sessions", Some("0123456789abcdef0123456789abcdeX"), None).0, 401);
    assert_eq!(http(admin, "GET", "/healthz", Some(TOKEN), None).0, 200);
    assert_eq!(http(admin, "GET", "/readyz", Some(TOKEN), None).0, 200);
    let (status, body) = http(admin, "POST", "/v1/revocations", Some(TOKEN), Some("{\"user\": "));
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("not JSON"));
    assert_eq!(http(admin, "POST", "/v1/revocations", Some(TOKEN), Some("{\"user\": \"x\"}")).0, 400);
    assert_eq!(http(admin, "POST", "/v1/revocations", Some(TOKEN), Some("{\"user\": \"x\", \"until\": 5}")).0, 400);
    let (status, body) = http(admin, "DELETE", "/v1/sessions/ffff@nowhere", Some(TOKEN), None);
    assert_eq!(status, 404, "{body}");
    assert_eq!(http(admin, "DELETE", "/v1/sessions/not-an-id", Some(TOKEN), None).0, 400);
    assert_eq!(http(admin, "DELETE", "/v1/sessions", Some(TOKEN), None).0, 400);
    assert_eq!(http(admin, "GET", "/v2/anything", Some(TOKEN), None).0, 404);
    assert_eq!(http(admin, "PUT", "/v1/drain", Some(TOKEN), None).0, 405);
    let big = format!("{{\"user\": \"{}\", \"until\": 1}}", "x".repeat(70 * 1024));
    assert_eq!(http(admin, "POST", "/v1/revocations", Some(TOKEN), Some(&big)).0, 413);
    // And the node still answers.
    assert_eq!(http(admin, "GET", "/healthz", Some(TOKEN), None).0, 200);
}

#[test]
fn sessions_are_listed_ended_revoked_and_drained() {
    let server = node("sessions", (47920, 47939));
    let admin = server.admin_addr();
    let peer = EchoPeer::start();
    let mut alice = TurnClient::rest(server.addr, "alice");
    let relayed = alice.allocate();
    assert_eq!(alice.create_permission(peer.addr).class(), Class::Success);
    assert_eq!(alice.channel_bind(0x4000, peer.addr).class(), Class::Success);
    alice.send_channel(0x4000, b"hello");
    assert!(alice.recv_data().is_some());
    let mut bob = TurnClient::rest(server.addr, "bob");
    bob.allocate();

    // The list: one object per allocation, counts at most a second old.
    let list = sessions_until(admin, "?user=alice", |l| l.len() == 1 && l[0]["to_peer"]["packets"] == 1);
    let s = &list[0];
    assert_eq!((s["user"].as_str(), s["transport"].as_str()), (Some("alice"), Some("udp")));
    assert_eq!(s["client"].as_str(), Some(alice.sock().local_addr().unwrap().to_string().as_str()));
    assert_eq!(s["relayed"][0].as_str(), Some(relayed.to_string().as_str()));
    assert_eq!((s["permissions"].as_u64(), s["channels"].as_u64()), (Some(1), Some(1)));
    assert_eq!((s["to_peer"]["bytes"].as_u64(), s["to_client"]["packets"].as_u64()), (Some(5), Some(1)));
    assert!(s["expires"].as_u64() > s["created"].as_u64());
    assert_eq!(sessions_until(admin, "", |l| l.len() == 2).len(), 2);

    // End one by id: its Refresh then finds no allocation (437).
    let id = s["id"].as_str().unwrap().to_string();
    let (status, body) = http(admin, "DELETE", &format!("/v1/sessions/{id}"), Some(TOKEN), None);
    assert_eq!((status, json(&body)["ended"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(alice.refresh(600).code(), Some(437));
    assert!(server.wait_log("allocation deleted (removed by an operator): user=", Duration::from_secs(5)).is_some());

    // Revoke bob: his allocation ends and new ones are refused (403) until it is lifted.
    let until = common::unix_now() + 3600;
    let (status, body) = http(
        admin,
        "POST",
        "/v1/revocations",
        Some(TOKEN),
        Some(&format!("{{\"user\": \"bob\", \"until\": {until}}}")),
    );
    assert_eq!((status, json(&body)["ended"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(bob.refresh(600).code(), Some(437));
    let mut bob2 = TurnClient::rest(server.addr, "bob");
    assert_eq!(
        bob2.request(turnpike::proto::Method::ALLOCATE, &|w| w
            .add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]))
            .code(),
        Some(403)
    );
    let (_, body) = http(admin, "GET", "/v1/revocations", Some(TOKEN), None);
    assert_eq!(json(&body)["revocations"][0]["user"].as_str(), Some("bob"));
    assert_eq!(http(admin, "DELETE", "/v1/revocations?user=bob", Some(TOKEN), None).0, 200);
    TurnClient::rest(server.addr, "bob").allocate();

    // Drain: not ready, a new Allocate is refused (no other node to send it to), an existing one
    // keeps relaying and refreshing.
    let mut carol = TurnClient::rest(server.addr, "carol");
    carol.allocate();
    assert_eq!(carol.create_permission(peer.addr).class(), Class::Success);
    let (status, body) = http(admin, "POST", "/v1/drain", Some(TOKEN), None);
    assert_eq!((status, json(&body)["draining"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(http(admin, "GET", "/readyz", Some(TOKEN), None).0, 503);
    let mut dave = TurnClient::rest(server.addr, "dave");
    assert_eq!(
        dave.request(turnpike::proto::Method::ALLOCATE, &|w| w
            .add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]))
            .code(),
        Some(486)
    );
    for i in 0..50u32 {
        carol.send_indication(peer.addr, &i.to_be_bytes());
        assert_eq!(carol.recv_data().map(|(_, _, d)| d), Some(i.to_be_bytes().to_vec()));
    }
    assert_eq!(carol.refresh(600).class(), Class::Success);
    assert_eq!(http(admin, "DELETE", "/v1/drain", Some(TOKEN), None).0, 200);
    assert_eq!(http(admin, "GET", "/readyz", Some(TOKEN), None).0, 200);
    TurnClient::rest(server.addr, "dave").allocate();
}

#[test]
fn idle_admin_clients_do_not_hold_up_relaying() {
    let server = node("idle", (47940, 47959));
    let admin = server.admin_addr();
    let peer = EchoPeer::start();
    let mut client = TurnClient::rest(server.addr, "idle-user");
    client.allocate();
    assert_eq!(client.create_permission(peer.addr).class(), Class::Success);
    assert_eq!(client.channel_bind(0x4001, peer.addr).class(), Class::Success);
    // Many connections that send nothing, and some that send half a request head.
    let idle: Vec<std::net::TcpStream> = (0..300).filter_map(|_| std::net::TcpStream::connect(admin).ok()).collect();
    for mut s in idle.iter().take(50) {
        use std::io::Write;
        let _ = s.write_all(b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n");
    }
    for i in 0..300u32 {
        client.send_channel(0x4001, &i.to_be_bytes());
        assert_eq!(client.recv_data().map(|(_, _, d)| d), Some(i.to_be_bytes().to_vec()), "datagram {i}");
    }
    drop(idle);
    // The API itself answers again once the idle ones are gone or cut off.
    assert_eq!(http(admin, "GET", "/healthz", Some(TOKEN), None).0, 200);
}

#[test]
fn an_admin_listener_without_a_token_file_is_refused() {
    let yaml = "auth:\n  realm: r\n  shared_secrets: [s]\nadmin:\n  listen: 127.0.0.1:0\n";
    let e = turnpike::config::parse(std::path::Path::new("t.yaml"), yaml).unwrap_err();
    assert_eq!((e.line, e.option.as_str()), (Some(5), "admin.listen"));
    assert!(e.message.contains("needs admin.token_file"), "{e}");
}

/// Runs `turnpike ARGS` to completion; exit code and output.
fn turnpike(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnpike")).args(args).output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_command_line_drives_the_api() {
    let token = token_file("cli");
    let dir = token.parent().unwrap().to_path_buf();
    // A fixed admin port: the commands find it in the configuration file.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let yaml = test_yaml(
        1,
        (47960, 47979),
        "127.0.0.1",
        &format!("admin:\n  listen: 127.0.0.1:{port}\n  token_file: {}\n", token.display()),
    );
    let server = Binary::start("admin-cli", &yaml);
    let cfg = server.config.to_str().unwrap().to_string();
    let mut erin = TurnClient::rest(server.addr, "erin");
    erin.allocate();
    let listed = || turnpike(&["sessions", "list", "--config", &cfg, "--json"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !listed().1.contains("\"user\":\"erin\"") {
        assert!(std::time::Instant::now() < deadline, "erin never listed: {}", listed().1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, table) = turnpike(&["sessions", "list", "--config", &cfg]);
    assert_eq!(code, Some(0), "{table}");
    assert!(
        table.lines().any(|l| l.contains(" erin ") && l.contains(" udp ")) && table.contains("1 sessions on 1 node(s)"),
        "{table}"
    );

    let (code, out) = turnpike(&["revoke", "--config", &cfg, "--user", "erin", "--for", "1h"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("erin revoked for 3600 s") && out.contains("1 allocation(s) ended"), "{out}");
    assert_eq!(erin.refresh(600).code(), Some(437));
    assert_eq!(turnpike(&["revoke", "--config", &cfg, "--user", "erin", "--undo"]).0, Some(0));

    let mut frank = TurnClient::rest(server.addr, "frank");
    frank.allocate();
    let (code, out) = turnpike(&["drain", "--config", &cfg]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("draining"), "{out}");
    // drain --wait returns once the last allocation ended (here: ended by the operator).
    let waiter = std::thread::spawn({
        let cfg = cfg.clone();
        move || turnpike(&["drain", "--config", &cfg, "--wait"])
    });
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = turnpike(&["sessions", "kill", "--config", &cfg, "--user", "frank"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ended 1 allocation(s)"), "{out}");
    let (code, out) = waiter.join().unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("drained: no allocation left"), "{out}");
    assert_eq!(turnpike(&["drain", "--config", &cfg, "--undo"]).0, Some(0));

    // Errors are clear: a configuration without an admin API, an unknown id.
    let plain = dir.join("plain.yaml");
    std::fs::write(&plain, test_yaml(1, (47960, 47979), "127.0.0.1", "")).unwrap();
    let (code, out) = turnpike(&["sessions", "list", "--config", plain.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(out.contains("no admin API configured"), "{out}");
    let (code, out) = turnpike(&["sessions", "kill", "--config", &cfg, "--id", "abc@nowhere"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("404") && out.contains("no session abc@nowhere"), "{out}");
}

#[test]
fn sigterm_with_a_grace_drains_first() {
    let token = token_file("grace");
    let yaml = test_yaml(
        1,
        (47980, 47999),
        "127.0.0.1",
        &format!("admin:\n  listen: 127.0.0.1:0\n  token_file: {}\n  stop_grace: 30\n", token.display()),
    );
    let mut server = Binary::start("admin-grace", &yaml);
    let admin = server.admin_addr();
    let peer = EchoPeer::start();
    let mut call = TurnClient::rest(server.addr, "grace-user");
    call.allocate();
    assert_eq!(call.create_permission(peer.addr).class(), Class::Success);
    sessions_until(admin, "", |l| l.len() == 1);
    server.signal("TERM");
    assert!(server.wait_log("stopping: draining for up to 30s", Duration::from_secs(5)).is_some());
    // Draining: not ready, no new allocations, the call goes on.
    assert_eq!(http(admin, "GET", "/readyz", Some(TOKEN), None).0, 503);
    let mut late = TurnClient::rest(server.addr, "late");
    let refused = late
        .request(turnpike::proto::Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
    assert_eq!(refused.code(), Some(486));
    call.send_indication(peer.addr, b"still here");
    assert_eq!(call.recv_data().map(|(_, _, d)| d), Some(b"still here".to_vec()));
    // The call ends: the server stops without waiting out the grace.
    assert_eq!(call.refresh(0).class(), Class::Success);
    assert!(server.wait_log("drain over: 0 allocation(s) left", Duration::from_secs(10)).is_some());
    assert!(server.wait_log("stopped", Duration::from_secs(10)).is_some());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
}
