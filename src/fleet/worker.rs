//! The fleet thread: the one place that talks to Redis. A loop that publishes this node's counts and
//! lease, reads the fleet's event stream (blocking at most [`READ_BLOCK`]), answers the admin API, and
//! rides out outages: on any Redis error it drops the connection, admits on local counts (or refuses,
//! `cluster.on_outage`) and tries again every [`RETRY`]; when Redis is back it publishes everything
//! again and reads what it missed from the stream.

use super::{FleetCounters, FleetParts, Request};
use crate::config::OnOutage;
use crate::operator::session_json;
use crate::shard::{EndWhich, clock, end_sessions};
use crossbeam_channel::Receiver;
use redis::{Connection, RedisResult, Value};
use serde_json::{Value as Json, json};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long one read of the event stream blocks: the latency of the admin API's fleet requests and
/// of count updates reaching this node.
const READ_BLOCK: Duration = Duration::from_millis(50);
/// How often the lease, the node's state and the fleet's membership are refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// How often a lost connection is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How long a command waits for the other nodes' answers.
const ANSWER_WAIT: Duration = Duration::from_millis(1500);
/// The event stream keeps about this many entries (a node away longer resyncs from the hashes).
const STREAM_LEN: u64 = 100_000;
/// Network timeouts of the connection: a Redis that stops answering is an outage, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

const NODES: &str = "turnpike:nodes";
const EVENTS: &str = "turnpike:events";
const REVOCATIONS: &str = "turnpike:revocations";

fn node_key(node: &str) -> String {
    format!("turnpike:node:{node}")
}

fn users_key(node: &str) -> String {
    format!("turnpike:users:{node}")
}

/// The fleet thread's state.
struct Worker {
    parts: FleetParts,
    con: Option<Connection>,
    /// The last stream entry applied.
    last_id: String,
    /// This node's allocations per user (from the shards' changes).
    mine: HashMap<Box<[u8]>, u32>,
    /// Users whose count changed since the last publication.
    dirty: Vec<Box<[u8]>>,
    /// Every other live node's allocations per user.
    others: HashMap<String, HashMap<Box<[u8]>, u32>>,
    /// Live nodes (this one included).
    live: Vec<String>,
    next_refresh: Instant,
    last_renewal: Option<Instant>,
    /// Sequence of this node's commands (their reply keys).
    seq: u64,
    /// Revocations made while Redis was away, published when it is back.
    pending_revocations: Vec<(String, u64)>,
}

/// Runs until the server stops.
pub(super) fn run(parts: FleetParts, inbox: &Receiver<Request>, changes: &Receiver<(Box<[u8]>, i32)>) {
    let now = clock::now();
    let mut w = Worker {
        parts,
        con: None,
        last_id: String::new(),
        mine: HashMap::new(),
        dirty: Vec::new(),
        others: HashMap::new(),
        live: Vec::new(),
        next_refresh: now,
        last_renewal: None,
        seq: 0,
        pending_revocations: Vec::new(),
    };
    let mut next_attempt = now;
    while !w.parts.stop.load(Ordering::Acquire) {
        w.take_changes(changes);
        if w.con.is_none() && clock::now() >= next_attempt {
            next_attempt = clock::now() + RETRY;
            if let Err(e) = w.connect() {
                log::debug!("fleet: redis still unreachable: {e}");
            }
        }
        let result = if w.con.is_some() { w.step(inbox) } else { w.offline(inbox) };
        if let Err(e) = result {
            w.lost(&e);
        }
    }
    // Leaving the fleet: other nodes stop counting this one at once instead of after the lease.
    if let Some(con) = w.con.as_mut() {
        let node = w.parts.config.node.clone();
        let _: RedisResult<()> = redis::pipe()
            .cmd("ZREM")
            .arg(NODES)
            .arg(&node)
            .ignore()
            .cmd("DEL")
            .arg(node_key(&node))
            .arg(users_key(&node))
            .ignore()
            .query(con);
    }
}

impl Worker {
    fn counters(&self) -> &FleetCounters {
        &self.parts.counters
    }

    fn node(&self) -> &str {
        &self.parts.config.node
    }

    fn count(&self, commands: u64) {
        self.counters().commands.fetch_add(commands, Ordering::Relaxed);
    }

    /// Takes the shards' allocation changes into this node's counts.
    fn take_changes(&mut self, changes: &Receiver<(Box<[u8]>, i32)>) {
        while let Ok((user, delta)) = changes.try_recv() {
            let n = self.mine.entry(user.clone()).or_default();
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                self.mine.remove(&user);
            }
            self.dirty.push(user);
        }
        if self.parts.shared.fleet.take_lost() {
            // Changes were dropped (a burst past the queue): count again from the session board.
            log::warn!("fleet: allocation changes overflowed; recounting from the shards' sessions");
            self.mine.clear();
            for shard in self.parts.shared.operator.sessions() {
                for s in shard.iter() {
                    *self.mine.entry(s.user.as_bytes().into()).or_default() += 1;
                }
            }
            self.dirty = self.mine.keys().cloned().collect();
        }
    }

    fn connect(&mut self) -> RedisResult<()> {
        let client = redis::Client::open(self.parts.config.redis.as_str())?;
        let mut con = client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        redis::cmd("PING").query::<()>(&mut con)?;
        let first = self.last_id.is_empty();
        if first {
            // Start after the newest entry: what came before this node existed is not its business
            // (revocations are read from their hash below).
            let newest: Value =
                redis::cmd("XREVRANGE").arg(EVENTS).arg("+").arg("-").arg("COUNT").arg(1).query(&mut con)?;
            self.last_id = entries(&newest).first().map_or_else(|| "0-0".to_string(), |(id, _)| id.clone());
        }
        self.con = Some(con);
        self.count(3);
        // Everything this node holds, again: the fleet may have forgotten it (lease lapsed).
        self.dirty = self.mine.keys().cloned().collect();
        let _ = self.publish_counts(true);
        for (user, until) in std::mem::take(&mut self.pending_revocations) {
            self.publish_revocation(&user, until)?;
        }
        self.load_revocations()?;
        self.refresh()?;
        self.resync_others()?;
        self.parts.shared.operator.set_outage(false);
        self.counters().connected.store(1, Ordering::Relaxed);
        if first {
            log::info!("fleet: node {} joined through {}", self.node(), redacted(&self.parts.config.redis));
        } else {
            log::warn!("fleet: redis reachable again; node {} published its state", self.node());
        }
        Ok(())
    }

    /// The connection failed: carry on alone.
    fn lost(&mut self, e: &redis::RedisError) {
        self.con = None;
        self.others.clear();
        self.parts.shared.fleet.set_others(HashMap::new());
        self.counters().connected.store(0, Ordering::Relaxed);
        self.counters().outages.fetch_add(1, Ordering::Relaxed);
        let refuse = self.parts.config.on_outage == OnOutage::Refuse;
        self.parts.shared.operator.set_outage(refuse);
        log::error!(
            "fleet: redis unreachable ({e}); running calls continue, new allocations {}",
            if refuse {
                "are refused until it is back (cluster.on_outage: refuse)"
            } else {
                "are admitted on this node's own counts"
            }
        );
    }

    /// One turn while connected.
    fn step(&mut self, inbox: &Receiver<Request>) -> RedisResult<()> {
        while let Ok(request) = inbox.try_recv() {
            self.serve(request)?;
        }
        self.publish_counts(false)?;
        if clock::now() >= self.next_refresh {
            self.refresh()?;
        }
        self.read_events(READ_BLOCK)
    }

    /// One turn while Redis is away: requests get what this node alone can answer.
    fn offline(&mut self, inbox: &Receiver<Request>) -> RedisResult<()> {
        match inbox.recv_timeout(READ_BLOCK) {
            Ok(Request::Sessions(reply)) => {
                let _ = reply.send(Err("redis is unreachable: only this node's sessions are known".into()));
            }
            Ok(Request::EndUser(_, reply) | Request::EndId(_, _, reply)) => {
                let _ = reply.send(0);
            }
            Ok(Request::Revoke(user, until)) => self.pending_revocations.push((user, until)),
            Ok(Request::Draining) | Err(_) => {}
        }
        self.counters().draining.store(u64::from(self.parts.shared.operator.draining()), Ordering::Relaxed);
        Ok(())
    }

    fn con(&mut self) -> RedisResult<&mut Connection> {
        self.con.as_mut().ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "not connected")))
    }

    fn serve(&mut self, request: Request) -> RedisResult<()> {
        match request {
            Request::Sessions(reply) => {
                let answers = self.command(&[("op", "list")])?;
                let mut out = Vec::new();
                for a in answers {
                    let Ok(v) = serde_json::from_str::<Json>(&a) else { continue };
                    let node = v["node"].as_str().unwrap_or("").to_string();
                    let list = v["sessions"].as_array().cloned().unwrap_or_default();
                    out.push((node, list));
                }
                let _ = reply.send(Ok(out));
            }
            Request::EndUser(user, reply) => {
                let answers = self.command(&[("op", "end_user"), ("user", &user)])?;
                let _ = reply.send(answers.iter().filter_map(|a| a.parse::<usize>().ok()).sum());
            }
            Request::EndId(node, id, reply) => {
                let id = id.to_string();
                let answers = self.command(&[("op", "end_id"), ("target", &node), ("id", &id)])?;
                let _ = reply.send(answers.iter().filter_map(|a| a.parse::<usize>().ok()).sum());
            }
            Request::Revoke(user, until) => self.publish_revocation(&user, until)?,
            Request::Draining => self.refresh()?,
        }
        Ok(())
    }

    /// Posts a command for the other live nodes and collects their answers (within [`ANSWER_WAIT`]).
    fn command(&mut self, fields: &[(&str, &str)]) -> RedisResult<Vec<String>> {
        self.seq += 1;
        let reply = format!("turnpike:reply:{}:{}", self.node(), self.seq);
        let node = self.node().to_string();
        let expected = self.live.iter().filter(|n| **n != node).count();
        let mut all = vec![("reply", reply.as_str())];
        all.extend_from_slice(fields);
        let xadd = event(&node, &all);
        let con = self.con()?;
        xadd.query::<()>(con)?;
        let mut answers = Vec::new();
        let deadline = clock::now() + ANSWER_WAIT;
        while answers.len() < expected {
            let left = deadline.saturating_duration_since(clock::now());
            if left.is_zero() {
                break;
            }
            let got: Option<(String, String)> =
                redis::cmd("BLPOP").arg(&reply).arg(left.as_secs_f64().max(0.01)).query(self.con()?)?;
            match got {
                Some((_, answer)) => answers.push(answer),
                None => break,
            }
        }
        self.count(2 + answers.len() as u64);
        Ok(answers)
    }

    fn publish_revocation(&mut self, user: &str, until: u64) -> RedisResult<()> {
        let node = self.node().to_string();
        let until_text = until.to_string();
        let mut pipe = redis::pipe();
        if until == 0 {
            pipe.cmd("HDEL").arg(REVOCATIONS).arg(user).ignore();
        } else {
            pipe.cmd("HSET").arg(REVOCATIONS).arg(user).arg(until).ignore();
        }
        pipe.add_command(event(&node, &[("op", "revoke"), ("user", user), ("until", &until_text)])).ignore();
        pipe.query::<()>(self.con()?)?;
        self.count(2);
        Ok(())
    }

    fn load_revocations(&mut self) -> RedisResult<()> {
        let all: HashMap<String, u64> = redis::cmd("HGETALL").arg(REVOCATIONS).query(self.con()?)?;
        self.count(1);
        let now = clock::unix_now();
        for (user, until) in all {
            if until > now {
                self.parts.shared.operator.revoke(&user, until);
            }
        }
        Ok(())
    }

    /// Publishes this node's changed counts (all of them with `all`): the hash late joiners read, and
    /// one stream entry the other nodes apply at once.
    fn publish_counts(&mut self, all: bool) -> RedisResult<()> {
        if self.dirty.is_empty() && !all {
            return Ok(());
        }
        let mut users = std::mem::take(&mut self.dirty);
        users.sort();
        users.dedup();
        let node = self.node().to_string();
        let key = users_key(&node);
        let lease = u64::try_from(self.parts.config.lease.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        let mut update = serde_json::Map::new();
        if all {
            pipe.cmd("DEL").arg(&key).ignore();
        }
        for user in &users {
            let name = String::from_utf8_lossy(user).into_owned();
            let n = self.mine.get(user).copied().unwrap_or(0);
            if n == 0 {
                pipe.cmd("HDEL").arg(&key).arg(&name).ignore();
            } else {
                pipe.cmd("HSET").arg(&key).arg(&name).arg(n).ignore();
            }
            update.insert(name, json!(n));
        }
        pipe.cmd("PEXPIRE").arg(&key).arg(lease).ignore();
        let counts = Json::Object(update).to_string();
        let op = if all { "counts_all" } else { "counts" };
        pipe.add_command(event(&node, &[("op", op), ("counts", &counts)])).ignore();
        let commands = users.len() as u64 + 2 + u64::from(all);
        let result = pipe.query::<()>(self.con()?);
        if result.is_err() {
            // Publish them again once connected.
            self.dirty = users;
        }
        self.count(commands);
        result
    }

    /// Renews the lease and this node's record; reads who is alive and where a draining node sends
    /// clients.
    fn refresh(&mut self) -> RedisResult<()> {
        let now = clock::now();
        self.next_refresh = now + REFRESH;
        if let Some(at) = self.last_renewal {
            let age = u64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(u64::MAX);
            self.counters().lease_age_ms.store(age, Ordering::Relaxed);
        }
        let node = self.node().to_string();
        let lease = u64::try_from(self.parts.config.lease.as_millis()).unwrap_or(u64::MAX);
        let now_ms = clock::unix_now_millis();
        let shared = std::sync::Arc::clone(&self.parts.shared);
        let operator = &shared.operator;
        let allocations: usize = operator.sessions().iter().map(|s| s.len()).sum();
        let draining = operator.draining();
        let alternate = self.parts.alternate.to_string();
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(NODES).arg(now_ms + lease).arg(&node).ignore();
        pipe.cmd("ZREMRANGEBYSCORE").arg(NODES).arg("-inf").arg(now_ms).ignore();
        pipe.cmd("HSET")
            .arg(node_key(&node))
            .arg("alternate")
            .arg(&alternate)
            .arg("draining")
            .arg(u8::from(draining))
            .arg("allocations")
            .arg(allocations)
            .ignore();
        pipe.cmd("PEXPIRE").arg(node_key(&node)).arg(lease).ignore();
        pipe.cmd("PEXPIRE").arg(users_key(&node)).arg(lease).ignore();
        pipe.cmd("ZRANGEBYSCORE").arg(NODES).arg(now_ms).arg("+inf");
        let (live,): (Vec<String>,) = pipe.query(self.con()?)?;
        self.last_renewal = Some(clock::now());
        self.counters().lease_age_ms.store(0, Ordering::Relaxed);
        // Where to send clients while draining: the live, non-draining node with fewest allocations.
        let mut pipe = redis::pipe();
        let others: Vec<String> = live.iter().filter(|n| **n != node).cloned().collect();
        for n in &others {
            pipe.cmd("HMGET").arg(node_key(n)).arg("alternate").arg("draining").arg("allocations");
        }
        let records: Vec<(Option<String>, Option<u8>, Option<u64>)> =
            if others.is_empty() { Vec::new() } else { pipe.query(self.con()?)? };
        let best = records
            .iter()
            .filter_map(|(alt, draining, allocs)| match (alt, draining) {
                (Some(a), Some(0)) => a.parse::<std::net::SocketAddr>().ok().map(|a| (allocs.unwrap_or(0), a)),
                _ => None,
            })
            .min();
        self.parts.shared.operator.set_alternate(best.map(|(_, a)| a));
        self.count(6 + others.len() as u64);
        // Nodes that left: their counts go with them.
        let before = self.others.len();
        self.others.retain(|n, _| live.contains(n));
        let left = before != self.others.len();
        self.live = live;
        if left {
            self.apply_others();
        }
        let counters = self.counters();
        counters.nodes.store(self.live.len() as u64, Ordering::Relaxed);
        counters.draining.store(u64::from(draining), Ordering::Relaxed);
        counters.revocations.store(operator.revocations(clock::unix_now()).len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads every other live node's counts from their hashes (on connecting: the stream only carries
    /// changes).
    fn resync_others(&mut self) -> RedisResult<()> {
        let node = self.node().to_string();
        let others: Vec<String> = self.live.iter().filter(|n| **n != node).cloned().collect();
        let mut pipe = redis::pipe();
        for n in &others {
            pipe.cmd("HGETALL").arg(users_key(n));
        }
        let all: Vec<HashMap<String, u32>> = if others.is_empty() { Vec::new() } else { pipe.query(self.con()?)? };
        self.count(others.len() as u64);
        self.others = others
            .into_iter()
            .zip(all)
            .map(|(n, counts)| (n, counts.into_iter().map(|(u, c)| (u.into_bytes().into_boxed_slice(), c)).collect()))
            .collect();
        self.apply_others();
        Ok(())
    }

    /// Hands the other nodes' summed counts to the shards' quota check.
    fn apply_others(&self) {
        let mut sum: HashMap<Box<[u8]>, u32> = HashMap::new();
        for counts in self.others.values() {
            for (user, n) in counts {
                *sum.entry(user.clone()).or_default() += n;
            }
        }
        let total: u64 =
            sum.values().map(|&n| u64::from(n)).sum::<u64>() + self.mine.values().map(|&n| u64::from(n)).sum::<u64>();
        self.counters().fleet_allocations.store(total, Ordering::Relaxed);
        self.parts.shared.fleet.set_others(sum);
    }

    /// Reads and applies the stream's new entries, waiting at most `block` for one.
    fn read_events(&mut self, block: Duration) -> RedisResult<()> {
        let last = self.last_id.clone();
        let block_ms = u64::try_from(block.as_millis()).unwrap_or(50);
        let read: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(EVENTS)
            .arg(&last)
            .query(self.con()?)?;
        self.count(1);
        let list = match &read {
            Value::Array(streams) => streams.first().map(|s| match s {
                Value::Array(pair) => pair.get(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            }),
            Value::Map(streams) => streams.first().map(|(_, v)| entries(v)),
            _ => None,
        }
        .unwrap_or_default();
        let mut counts_changed = false;
        for (id, fields) in list {
            self.last_id = id;
            self.counters().events.fetch_add(1, Ordering::Relaxed);
            counts_changed |= self.apply(&fields)?;
        }
        if counts_changed {
            self.apply_others();
        }
        Ok(())
    }

    /// Applies one event; true when it changed another node's counts.
    fn apply(&mut self, fields: &HashMap<String, String>) -> RedisResult<bool> {
        let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
        let from = get("node").to_string();
        let me = self.node().to_string();
        match get("op") {
            op @ ("counts" | "counts_all") if from != me => {
                let Ok(Json::Object(update)) = serde_json::from_str::<Json>(get("counts")) else {
                    return Ok(false);
                };
                let theirs = self.others.entry(from).or_default();
                if op == "counts_all" {
                    theirs.clear();
                }
                for (user, n) in update {
                    let n = u32::try_from(n.as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
                    if n == 0 {
                        theirs.remove(user.as_bytes());
                    } else {
                        theirs.insert(user.into_bytes().into_boxed_slice(), n);
                    }
                }
                Ok(true)
            }
            "revoke" if from != me => {
                let until = get("until").parse().unwrap_or(0);
                self.parts.shared.operator.revoke(get("user"), until);
                if until > clock::unix_now() {
                    self.end_local(EndWhich::User(get("user").to_string()));
                }
                Ok(false)
            }
            "list" if from != me => {
                let mut sessions = Vec::new();
                for shard in self.parts.shared.operator.sessions() {
                    sessions.extend(shard.iter().map(|s| session_json(s, &me)));
                }
                let answer = json!({"node": me, "sessions": sessions}).to_string();
                self.answer(get("reply"), &answer)?;
                Ok(false)
            }
            "end_user" if from != me => {
                let ended = self.end_local(EndWhich::User(get("user").to_string()));
                self.answer(get("reply"), &ended.to_string())?;
                Ok(false)
            }
            "end_id" if get("target") == me => {
                let ended = get("id").parse().map_or(0, |id| self.end_local(EndWhich::Id(id)));
                self.answer(get("reply"), &ended.to_string())?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    fn answer(&mut self, key: &str, answer: &str) -> RedisResult<()> {
        if key.is_empty() {
            return Ok(());
        }
        redis::pipe()
            .cmd("RPUSH")
            .arg(key)
            .arg(answer)
            .ignore()
            .cmd("EXPIRE")
            .arg(key)
            .arg(10)
            .ignore()
            .query::<()>(self.con()?)?;
        self.count(2);
        Ok(())
    }

    /// Ends sessions on this node's shards (waits at most two seconds for them).
    fn end_local(&self, which: EndWhich) -> usize {
        end_sessions(&self.parts.shards, &which, Duration::from_secs(2))
    }
}

/// An entry for the fleet's event stream from `node` (the stream trimmed to about [`STREAM_LEN`]).
fn event(node: &str, fields: &[(&str, &str)]) -> redis::Cmd {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(EVENTS).arg("MAXLEN").arg("~").arg(STREAM_LEN).arg("*").arg("node").arg(node);
    for (k, v) in fields {
        xadd.arg(*k).arg(*v);
    }
    xadd
}

/// The entries of an XRANGE/XREAD answer: (id, fields).
fn entries(value: &Value) -> Vec<(String, HashMap<String, String>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else { return None };
            let id = text(pair.first()?)?;
            let Value::Array(flat) = pair.get(1)? else { return None };
            let fields = flat.chunks(2).filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?))).collect();
            Some((id, fields))
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The Redis URL without its password, for the log.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_the_log() {
        assert_eq!(redacted("redis://:hunter2@10.0.0.5:6379/0"), "redis://***@10.0.0.5:6379/0");
        assert_eq!(redacted("rediss://user:pw@redis.example:6380"), "rediss://***@redis.example:6380");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn stream_entries_parse() {
        let v = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![Value::BulkString(b"op".to_vec()), Value::BulkString(b"list".to_vec())]),
        ])]);
        let e = entries(&v);
        assert_eq!(e[0].0, "1-0");
        assert_eq!(e[0].1["op"], "list");
    }
}
