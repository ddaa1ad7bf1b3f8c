//! `turnpike sessions|revoke|drain`: the admin API from the command line. The listener and the token
//! come from the configuration file (`admin.listen`, `admin.token_file`); requests go over HTTP/1.1 with
//! hyper's client on a one-thread runtime.

use crate::tools::say;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use turnpike::shard::clock;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the admin API listens, and its token, from the configuration at `path`.
fn endpoint(path: &Path) -> Result<(SocketAddr, String), String> {
    let cfg = turnpike::config::load(path).map_err(|e| e.to_string())?;
    let admin = cfg
        .admin
        .ok_or_else(|| format!("{}: no admin API configured (admin.listen and admin.token_file)", path.display()))?;
    let text = std::fs::read_to_string(&admin.token_file)
        .map_err(|e| format!("admin.token_file {}: {e}", admin.token_file.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    // A wildcard listener is reached on loopback.
    let mut addr = admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    Ok((addr, token))
}

/// One request; the status and the JSON body.
fn call(path: &Path, method: Method, uri: &str, body: Option<Value>) -> Result<(StatusCode, Value), String> {
    let (addr, token) = endpoint(path)?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(|e| e.to_string())?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&bytes)}));
        Ok::<_, String>((status, value))
    };
    rt.block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, exchange).await })
        .map_err(|_| format!("no answer from the admin API within {REQUEST_TIMEOUT:?}"))?
}

/// The body of a successful answer, or the API's error.
fn expect_ok((status, body): (StatusCode, Value)) -> Result<Value, String> {
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("admin API: {status}: {}", body["error"].as_str().unwrap_or(&body.to_string())))
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `turnpike sessions list`.
pub(crate) fn list(path: &Path, user: Option<&str>, fleet: bool, json: bool) -> Result<ExitCode, String> {
    let mut query = Vec::new();
    if let Some(u) = user {
        query.push(format!("user={}", encode(u)));
    }
    if fleet {
        query.push("scope=fleet".into());
    }
    let uri = format!("/v1/sessions{}{}", if query.is_empty() { "" } else { "?" }, query.join("&"));
    let body = expect_ok(call(path, Method::GET, &uri, None)?)?;
    if json {
        say(body);
        return Ok(ExitCode::SUCCESS);
    }
    let now = clock::unix_now();
    say(format!(
        "{:<22} {:<12} {:<24} {:<4} {:<22} {:<22} {:>7} {:>14} {:>14}",
        "ID", "NODE", "USER", "VIA", "CLIENT", "RELAYED", "AGE", "TO PEER", "TO CLIENT"
    ));
    let sessions = body["sessions"].as_array().cloned().unwrap_or_default();
    for s in &sessions {
        let traffic = |d: &Value| format!("{}p/{}B", d["packets"], d["bytes"]);
        let relayed: Vec<&str> =
            s["relayed"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        say(format!(
            "{:<22} {:<12} {:<24} {:<4} {:<22} {:<22} {:>6}s {:>14} {:>14}",
            s["id"].as_str().unwrap_or(""),
            s["node"].as_str().unwrap_or(""),
            s["user"].as_str().unwrap_or(""),
            s["transport"].as_str().unwrap_or(""),
            s["client"].as_str().unwrap_or(""),
            relayed.join(","),
            now.saturating_sub(s["created"].as_u64().unwrap_or(now)),
            traffic(&s["to_peer"]),
            traffic(&s["to_client"]),
        ));
    }
    let nodes = body["nodes"].as_array().map_or(1, Vec::len);
    say(format!("{} sessions on {nodes} node(s)", sessions.len()));
    Ok(ExitCode::SUCCESS)
}

/// `turnpike sessions kill`.
pub(crate) fn kill(path: &Path, user: Option<&str>, id: Option<&str>) -> Result<ExitCode, String> {
    let uri = match (user, id) {
        (_, Some(id)) => format!("/v1/sessions/{}", encode(id).replace("%40", "@")),
        (Some(u), None) => format!("/v1/sessions?user={}", encode(u)),
        (None, None) => return Err("sessions kill needs --user NAME or --id ID".into()),
    };
    let body = expect_ok(call(path, Method::DELETE, &uri, None)?)?;
    say(format!("ended {} allocation(s)", body["ended"]));
    Ok(ExitCode::SUCCESS)
}

/// `turnpike revoke`.
pub(crate) fn revoke(path: &Path, user: &str, seconds: u64, undo: bool) -> Result<ExitCode, String> {
    if undo {
        expect_ok(call(path, Method::DELETE, &format!("/v1/revocations?user={}", encode(user)), None)?)?;
        say(format!("revocation of {user} lifted"));
        return Ok(ExitCode::SUCCESS);
    }
    let until = clock::unix_now() + seconds;
    let body = expect_ok(call(path, Method::POST, "/v1/revocations", Some(json!({"user": user, "until": until})))?)?;
    say(format!("{user} revoked for {seconds} s (until {until}); {} allocation(s) ended", body["ended"]));
    Ok(ExitCode::SUCCESS)
}

/// `turnpike drain`.
#[allow(clippy::disallowed_methods)] // a command-line tool polling the API, not the event loop
pub(crate) fn drain(path: &Path, wait: bool, undo: bool) -> Result<ExitCode, String> {
    let method = if undo { Method::DELETE } else { Method::POST };
    let body = expect_ok(call(path, method, "/v1/drain", None)?)?;
    if undo {
        say("drain ended: taking new allocations again");
        return Ok(ExitCode::SUCCESS);
    }
    say(format!("draining: new allocations go elsewhere; {} allocation(s) left", body["allocations"]));
    if wait {
        loop {
            let body = expect_ok(call(path, Method::GET, "/v1/drain", None)?)?;
            if body["allocations"].as_u64() == Some(0) {
                say("drained: no allocation left");
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}
