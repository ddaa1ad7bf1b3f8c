//! The admin API: JSON over HTTP on its own listener ([`super::http`]: bounded connections, head size,
//! body size and time), every request carrying the bearer token of `admin.token_file`. It reads the
//! session board and the operator state ([`crate::operator`]), ends allocations through the shards'
//! control channels (never waiting on a shard for more than [`REPLY_WAIT`]), and with a fleet asks the
//! fleet thread ([`crate::fleet`]) for what other nodes hold. Endpoints:
//!
//! * `GET /healthz` (every shard's loop ran within the last seconds), `GET /readyz` (not draining),
//! * `GET /v1/sessions[?user=NAME][&scope=fleet]`, `DELETE /v1/sessions/{id}`, `DELETE /v1/sessions?user=NAME`,
//! * `GET|POST|DELETE /v1/revocations` (`{"user": NAME, "until": UNIX}`; DELETE `?user=NAME`),
//! * `GET|POST|DELETE /v1/drain`.

use super::http::{self, Handler};
use crate::fleet::FleetHandle;
use crate::operator::session_json;
use crate::shard::{EndWhich, ShardLink, end_sessions};
use crate::shared::Shared;
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a request waits for the shards to end sessions.
pub(crate) const REPLY_WAIT: Duration = Duration::from_secs(2);

/// Label values of the admin request counters: the status class.
pub(crate) const STATUSES: [&str; 4] = ["2xx", "401", "4xx", "5xx"];

turnpike_proto::counters! {
    /// Admin API requests by endpoint and status class, for the metrics.
    pub struct AdminCounters / AdminTotals {
        /// `/healthz`.
        healthz: counter total "turnpike_admin_healthz_requests_total" "Admin API /healthz requests, by status." [status: STATUSES],
        /// `/readyz`.
        readyz: counter total "turnpike_admin_readyz_requests_total" "Admin API /readyz requests, by status." [status: STATUSES],
        /// `/v1/sessions`.
        sessions: counter total "turnpike_admin_sessions_requests_total" "Admin API /v1/sessions requests, by status." [status: STATUSES],
        /// `/v1/revocations`.
        revocations: counter total "turnpike_admin_revocations_requests_total" "Admin API /v1/revocations requests, by status." [status: STATUSES],
        /// `/v1/drain`.
        drain: counter total "turnpike_admin_drain_requests_total" "Admin API /v1/drain requests, by status." [status: STATUSES],
        /// Any other path.
        other: counter total "turnpike_admin_other_requests_total" "Admin API requests to unknown paths, by status." [status: STATUSES],
    }
}

/// Everything the handler needs.
pub(crate) struct Admin {
    pub token: String,
    pub node: String,
    pub shared: Arc<Shared>,
    pub shards: Vec<ShardLink>,
    pub fleet: Option<Arc<FleetHandle>>,
    pub counters: Arc<AdminCounters>,
    /// Set once the server is shutting down (`/readyz` fails).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Reads the bearer token from `path`: its first line, trimmed; an empty file is an error.
pub(crate) fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("admin.token_file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        return Err(format!("admin.token_file {}: the token must be at least 16 characters", path.display()));
    }
    Ok(token)
}

impl Admin {
    /// The request handler.
    pub(crate) fn handler(self: Arc<Self>) -> Arc<Handler> {
        Arc::new(move |req| self.respond(req))
    }

    fn respond(&self, req: &Request<Bytes>) -> Response<Bytes> {
        let path = req.uri().path().trim_end_matches('/');
        let c = &self.counters;
        let endpoint = match path {
            "/healthz" => &c.healthz,
            "/readyz" => &c.readyz,
            p if p == "/v1/sessions" || p.starts_with("/v1/sessions/") => &c.sessions,
            "/v1/revocations" => &c.revocations,
            "/v1/drain" => &c.drain,
            _ => &c.other,
        };
        let response = if self.authorized(req) { self.route(req, path) } else { unauthorized() };
        let status = match response.status().as_u16() {
            200..=299 => 0,
            401 => 1,
            400..=499 => 2,
            _ => 3,
        };
        endpoint[status].fetch_add(1, Ordering::Relaxed);
        response
    }

    /// Whether the request carries the token (compared in constant time).
    fn authorized(&self, req: &Request<Bytes>) -> bool {
        let Some(given) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(given) = given.strip_prefix("Bearer ") else {
            return false;
        };
        let (a, b) = (given.trim().as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    fn route(&self, req: &Request<Bytes>, path: &str) -> Response<Bytes> {
        let query = Query::parse(req.uri().query());
        match (req.method(), path) {
            (&Method::GET, "/healthz") => self.healthz(),
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/v1/sessions") => self.list(&query),
            (&Method::DELETE, "/v1/sessions") => match query.get("user") {
                Some(user) => self.end(EndWhich::User(user.to_string()), query.get("scope") != Some("node")),
                None => {
                    error(StatusCode::BAD_REQUEST, "DELETE /v1/sessions needs ?user=NAME (or use /v1/sessions/{id})")
                }
            },
            (&Method::DELETE, p) if p.starts_with("/v1/sessions/") => self.end_id(&p["/v1/sessions/".len()..]),
            (&Method::GET, "/v1/revocations") => self.revocations(),
            (&Method::POST, "/v1/revocations") => self.revoke(req.body()),
            (&Method::DELETE, "/v1/revocations") => match query.get("user") {
                Some(user) => self.lift(user),
                None => error(StatusCode::BAD_REQUEST, "DELETE /v1/revocations needs ?user=NAME"),
            },
            (&Method::GET, "/v1/drain") => self.drain_status(),
            (&Method::POST, "/v1/drain") => self.drain(true),
            (&Method::DELETE, "/v1/drain") => self.drain(false),
            (_, "/healthz" | "/readyz" | "/v1/sessions" | "/v1/revocations" | "/v1/drain") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path")
            }
            (_, p) if p.starts_with("/v1/sessions/") => error(StatusCode::METHOD_NOT_ALLOWED, "use DELETE"),
            _ => error(
                StatusCode::NOT_FOUND,
                "no such endpoint: /healthz, /readyz, /v1/sessions, /v1/revocations, /v1/drain",
            ),
        }
    }

    fn healthz(&self) -> Response<Bytes> {
        let stalled = self.shared.operator.stalled(self.shards.len() as u16, crate::shard::clock::now());
        if stalled.is_empty() {
            ok(json!({"status": "ok", "shards": self.shards.len()}))
        } else {
            reply(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "stalled", "stalled_shards": stalled}))
        }
    }

    fn readyz(&self) -> Response<Bytes> {
        if self.stopping.load(Ordering::Acquire) {
            reply(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "shutting down"}))
        } else if self.shared.operator.draining() {
            reply(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "draining"}))
        } else {
            ok(json!({"status": "ready"}))
        }
    }

    /// This node's sessions, as JSON objects.
    fn local_sessions(&self, user: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        for shard in self.shared.operator.sessions() {
            out.extend(shard.iter().filter(|s| user.is_none_or(|u| s.user == u)).map(|s| session_json(s, &self.node)));
        }
        out
    }

    fn list(&self, query: &Query) -> Response<Bytes> {
        let user = query.get("user");
        let mut sessions = self.local_sessions(user);
        let mut nodes = vec![self.node.clone()];
        if let (Some("fleet"), Some(fleet)) = (query.get("scope"), &self.fleet) {
            match fleet.fleet_sessions(REPLY_WAIT) {
                Ok(others) => {
                    for (node, list) in others.into_iter().filter(|(n, _)| *n != self.node) {
                        nodes.push(node);
                        sessions.extend(list.into_iter().filter(|s| user.is_none_or(|u| s["user"] == u)));
                    }
                }
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("fleet unavailable: {e}")),
            }
        }
        ok(json!({"nodes": nodes, "sessions": sessions}))
    }

    /// Ends sessions on this node's shards; returns how many.
    fn end_local(&self, which: &EndWhich) -> usize {
        end_sessions(&self.shards, which, REPLY_WAIT)
    }

    fn end(&self, which: EndWhich, fleet_wide: bool) -> Response<Bytes> {
        let mut ended = self.end_local(&which);
        if fleet_wide && let (Some(fleet), EndWhich::User(user)) = (&self.fleet, &which) {
            ended += fleet.end_user_elsewhere(user);
        }
        ok(json!({"ended": ended}))
    }

    fn end_id(&self, id: &str) -> Response<Bytes> {
        let Some((hex, node)) = id.split_once('@') else {
            return error(StatusCode::BAD_REQUEST, "a session id reads HEX@NODE, as GET /v1/sessions lists it");
        };
        let Ok(number) = u64::from_str_radix(hex, 16) else {
            return error(StatusCode::BAD_REQUEST, "a session id reads HEX@NODE, as GET /v1/sessions lists it");
        };
        let ended = if node == self.node {
            self.end_local(&EndWhich::Id(number))
        } else if let Some(fleet) = &self.fleet {
            fleet.end_id_on(node, number)
        } else {
            0
        };
        if ended == 0 {
            return error(StatusCode::NOT_FOUND, &format!("no session {id} (ended already, or never existed)"));
        }
        ok(json!({"ended": ended}))
    }

    fn revocations(&self) -> Response<Bytes> {
        let now = crate::shard::clock::unix_now();
        let list: Vec<Value> =
            self.shared.operator.revocations(now).into_iter().map(|(u, t)| json!({"user": u, "until": t})).collect();
        ok(json!({"revocations": list}))
    }

    fn revoke(&self, body: &Bytes) -> Response<Bytes> {
        let request: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body is not JSON: {e}")),
        };
        let (Some(user), Some(until)) = (request["user"].as_str(), request["until"].as_u64()) else {
            return error(StatusCode::BAD_REQUEST, "expected {\"user\": NAME, \"until\": UNIX_SECONDS}");
        };
        let now = crate::shard::clock::unix_now();
        if user.is_empty() || until <= now {
            return error(StatusCode::BAD_REQUEST, "`user` must be a name and `until` a Unix time in the future");
        }
        self.shared.operator.revoke(user, until);
        if let Some(fleet) = &self.fleet {
            fleet.revoke(user, until);
        }
        log::warn!("admin: user {user} revoked until {until}");
        let ended = self.end_local(&EndWhich::User(user.to_string()))
            + self.fleet.as_ref().map_or(0, |f| f.end_user_elsewhere(user));
        ok(json!({"user": user, "until": until, "ended": ended}))
    }

    fn lift(&self, user: &str) -> Response<Bytes> {
        self.shared.operator.revoke(user, 0);
        if let Some(fleet) = &self.fleet {
            fleet.revoke(user, 0);
        }
        log::warn!("admin: revocation of user {user} lifted");
        ok(json!({"user": user, "revoked": false}))
    }

    fn allocations(&self) -> usize {
        self.shared.operator.sessions().iter().map(|s| s.len()).sum()
    }

    fn drain_status(&self) -> Response<Bytes> {
        ok(json!({"draining": self.shared.operator.draining(), "allocations": self.allocations()}))
    }

    fn drain(&self, on: bool) -> Response<Bytes> {
        self.shared.operator.set_draining(on);
        if let Some(fleet) = &self.fleet {
            fleet.draining_changed();
        }
        log::warn!("admin: {}", if on { "draining: new allocations go elsewhere" } else { "drain ended" });
        self.drain_status()
    }
}

/// The decoded query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Percent-decoding (and `+` as space) of a query component; invalid escapes stay as they are.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(status: StatusCode, body: Value) -> Response<Bytes> {
    http::with_type(status, "application/json", format!("{body}\n"))
}

fn ok(body: Value) -> Response<Bytes> {
    reply(StatusCode::OK, body)
}

fn error(status: StatusCode, message: &str) -> Response<Bytes> {
    reply(status, json!({"error": message}))
}

fn unauthorized() -> Response<Bytes> {
    let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer TOKEN)");
    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"turnpike admin\""));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let q = Query::parse(Some("user=%40alice%3Aexample.org&scope=fleet&x"));
        assert_eq!(q.get("user"), Some("@alice:example.org"));
        assert_eq!(q.get("scope"), Some("fleet"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(decode("a+b%2"), "a b%2");
        assert_eq!(decode("%zz%41"), "%zzA");
    }
}
