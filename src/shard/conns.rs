//! Client connections over TCP and TLS: accepting them (within the node-wide budget of connections
//! without an allocation), reading their frames into the engine, writing what the wake-up queued for
//! them, and closing them on timeouts, on eviction and when their allocation goes.

use super::proxied::{self, Outcome, ProxyRefusal, Start};
use super::stream::{Conn, ReadState};
use super::{
    ACCEPT_BUDGET, ACCEPT_RETRY, CONN_BASE, CONN_CHECK, Drained, HANDSHAKE_TIMEOUT, PENDING_CHECK, Shard, TCP_BASE,
    TLS_BASE, UNALLOCATED_MAX_FACTOR,
};
use crate::admission::{self, EarlyClose, Refusal};
use crate::policy::rate::LogKind;
use crate::proto::DropReason;
use crate::proto::TimerWheel;
use crate::proto::allocation::{FiveTuple, ListenerId, Transport};
use crate::proto::stats::{bump, bump_down};
use mio::net::TcpListener;
use mio::{Interest, Token};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Client connections: a slab with generations, and the 5-tuple index used to deliver relayed data.
#[derive(Default)]
pub(super) struct Conns {
    pub(super) slots: Vec<Option<Conn>>,
    pub(super) generations: Vec<u32>,
    pub(super) free: Vec<usize>,
    pub(super) by_tuple: HashMap<FiveTuple, usize>,
}

impl Conns {
    fn insert(&mut self, make: impl FnOnce(u32) -> Conn) -> usize {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.generations.push(0);
            self.slots.len() - 1
        });
        let conn = make(self.generations[idx]);
        self.by_tuple.insert(conn.tuple, idx);
        self.slots[idx] = Some(conn);
        idx
    }

    fn remove(&mut self, idx: usize) -> Option<Conn> {
        let conn = self.slots.get_mut(idx)?.take()?;
        self.generations[idx] = self.generations[idx].wrapping_add(1);
        self.free.push(idx);
        self.by_tuple.remove(&conn.tuple);
        Some(conn)
    }

    /// Gives connection `idx` the client address a trusted proxy named; false when that 5-tuple is
    /// another connection's already.
    fn retuple(&mut self, idx: usize, client: SocketAddr) -> bool {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        let new = FiveTuple { client, ..conn.tuple };
        if self.by_tuple.contains_key(&new) {
            return false;
        }
        self.by_tuple.remove(&conn.tuple);
        conn.tuple = new;
        self.by_tuple.insert(new, idx);
        true
    }

    fn get_mut(&mut self, idx: usize) -> Option<&mut Conn> {
        self.slots.get_mut(idx)?.as_mut()
    }
}

/// What a shard keeps for its TCP and TLS clients.
pub(super) struct Streams {
    pub(super) tcp: Vec<TcpListener>,
    pub(super) tls_listeners: Vec<TcpListener>,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) conns: Conns,
    /// Connection checks (timeouts), by slot and generation.
    pub(super) timers: TimerWheel<(usize, u32)>,
    /// How long a connection may stay without an allocation and without a frame.
    pub(super) unallocated_timeout: Duration,
    /// Listeners whose `accept` failed, to be served again at `accept_retry_at`.
    pub(super) accept_retry: Vec<Token>,
    pub(super) accept_retry_at: Option<Instant>,
    /// Connection checks that are due, at most `TIMER_BUDGET` of them done per wake-up.
    pub(super) due: Vec<(usize, u32)>,
    /// Connections with writes queued in this wake-up.
    pub(super) to_flush: Vec<usize>,
    /// Pending connections (no allocation yet) in the order they were admitted; entries of
    /// connections that closed or allocated since are skipped and dropped lazily.
    pub(super) pending_order: VecDeque<(usize, u32)>,
    /// Live entries of `pending_order`.
    pub(super) pending_here: usize,
    /// Trusted proxies (`listen.proxy_from`); empty: no PROXY protocol, nothing checked.
    pub(super) proxy_from: Vec<crate::policy::IpRange>,
}

impl Shard {
    /// Delivers bytes to a TCP or TLS client (UDP clients are served through the send queue).
    pub(super) fn send_to_stream(
        &mut self,
        tuple: FiveTuple,
        bytes: Option<&[u8]>,
        range: Option<std::ops::Range<usize>>,
    ) {
        let bytes = match (bytes, range) {
            (Some(b), _) => b,
            (None, Some(r)) => self.pkt.get(r),
            (None, None) => return,
        };
        let Some(&idx) = self.streams.conns.by_tuple.get(&tuple) else {
            return;
        };
        let Some(conn) = self.streams.conns.get_mut(idx) else {
            return;
        };
        // Written at the end of the wake-up (flush_streams), so that the packets of one batch towards
        // this client leave in one write (and, over TLS, one record) instead of one each.
        if !conn.queue(bytes) {
            // Make room by writing what waits; a reader still too slow loses the packet: never buffer
            // without bound.
            if conn.flush().is_err() {
                conn.closing = true;
            }
            if !conn.queue(bytes) {
                bump(&self.stats.engine.drops[DropReason::SocketFull.index()], 1);
                return;
            }
        }
        if !conn.flush_listed {
            conn.flush_listed = true;
            self.streams.to_flush.push(idx);
        }
    }

    /// Writes what the wake-up queued for stream clients; a connection the socket does not take
    /// everything from waits for WRITABLE.
    pub(super) fn flush_streams(&mut self) {
        for idx in self.streams.to_flush.drain(..) {
            let Some(conn) = self.streams.conns.get_mut(idx) else { continue };
            conn.flush_listed = false;
            if conn.flush().is_err() {
                conn.closing = true;
            } else if conn.has_pending_writes() && !conn.write_interest {
                conn.write_interest = true;
                let token = Token(CONN_BASE + idx);
                let interest = Interest::READABLE | Interest::WRITABLE;
                let _ = self.poll.registry().reregister(&mut conn.stream, token, interest);
            }
        }
    }

    pub(super) fn accept(&mut self, now: Instant, i: usize, transport: Transport) -> Drained {
        for _ in 0..ACCEPT_BUDGET {
            let listener = match transport {
                Transport::Tls => self.streams.tls_listeners.get(i),
                _ => self.streams.tcp.get(i),
            };
            let Some(listener) = listener else {
                return Drained::Empty;
            };
            match listener.accept() {
                Ok((stream, from)) => {
                    let trusted = self.streams.proxy_from.iter().any(|r| r.contains(from.ip()));
                    let Some(ticket) = self.admit(now, &stream, from, transport, trusted) else {
                        continue;
                    };
                    let tls = match (transport, &self.streams.tls) {
                        (Transport::Tls, Some(cfg)) => match rustls::ServerConnection::new(Arc::clone(cfg)) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                log::warn!("shard {}: TLS session setup failed: {e}", self.id);
                                self.shared.conns.release(ticket);
                                continue;
                            }
                        },
                        (Transport::Tls, None) => {
                            self.shared.conns.release(ticket);
                            continue;
                        }
                        _ => None,
                    };
                    let _ = stream.set_nodelay(true);
                    let tuple = FiveTuple { client: from, listener: ListenerId(i as u16), transport };
                    let start = if self.streams.proxy_from.is_empty() {
                        Start::Open
                    } else if trusted {
                        Start::ProxyHeader
                    } else {
                        Start::NoProxyHeader
                    };
                    let idx = self.streams.conns.insert(|generation| {
                        let mut conn = Conn::new(stream, tuple, tls, now, generation, Some(ticket));
                        conn.start = start;
                        conn
                    });
                    let Some(conn) = self.streams.conns.get_mut(idx) else {
                        self.shared.conns.release(ticket);
                        continue;
                    };
                    if let Err(e) =
                        self.poll.registry().register(&mut conn.stream, Token(CONN_BASE + idx), Interest::READABLE)
                    {
                        log::warn!("shard {}: cannot register connection from {from}: {e}", self.id);
                        self.streams.conns.remove(idx);
                        self.shared.conns.release(ticket);
                        continue;
                    }
                    let generation = conn.generation;
                    self.streams.pending_order.push_back((idx, generation));
                    self.streams.pending_here += 1;
                    self.streams
                        .timers
                        .insert(now + PENDING_CHECK.min(self.streams.unallocated_timeout), (idx, generation));
                    self.count_conn(transport, true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, typically: the backlog keeps the connections; try again soon.
                    // Each new connection attempt brings us here again too, so the log is limited.
                    let base = if transport == Transport::Tls { TLS_BASE } else { TCP_BASE };
                    if !self.streams.accept_retry.contains(&Token(base + i)) {
                        self.streams.accept_retry.push(Token(base + i));
                    }
                    self.streams.accept_retry_at.get_or_insert(now + ACCEPT_RETRY);
                    let id = self.id;
                    let message = format_args!("shard {id}: cannot accept a connection: {e}");
                    self.logs.log(LogKind::Accept, log::Level::Warn, now, message);
                    return Drained::Empty;
                }
            }
        }
        Drained::MoreWaiting
    }

    /// Admits a connection just accepted, or closes it (counted, logged at a bounded rate): see
    /// [`admission`]. At the total, the oldest pending connection of the source holding the most
    /// makes room.
    fn admit(
        &mut self,
        now: Instant,
        stream: &mio::net::TcpStream,
        from: SocketAddr,
        transport: Transport,
        proxied: bool,
    ) -> Option<admission::Ticket> {
        use std::os::fd::AsRawFd;
        let fd = u64::try_from(stream.as_raw_fd()).unwrap_or(u64::MAX);
        let refused = match self.shared.conns.admit(from.ip(), fd, proxied) {
            Ok(admitted) if !admitted.over_total || self.evict_pending(now) => return Some(admitted.ticket),
            Ok(admitted) => {
                self.shared.conns.release(admitted.ticket);
                Refusal::Full
            }
            Err(why) => why,
        };
        bump(&self.stats.io.connections_refused[refused.index()], 1);
        let (id, t) = (self.id, transport.name());
        let message = format_args!("shard {id}: {t} connection from {from} closed at once: {}", refused.name());
        self.logs.log(LogKind::Accept, log::Level::Info, now, message);
        None
    }

    /// Closes this shard's oldest pending connection of the source that holds the most pending
    /// connections; false when the shard has none.
    fn evict_pending(&mut self, now: Instant) -> bool {
        let conns = &self.streams.conns;
        let live = |&(idx, generation): &(usize, u32)| {
            conns.slots.get(idx).and_then(Option::as_ref).filter(|c| c.generation == generation)?.pending
        };
        while self.streams.pending_order.front().is_some_and(|e| live(e).is_none()) {
            self.streams.pending_order.pop_front();
        }
        let budget = &self.shared.conns;
        let mut victim: Option<(usize, u32)> = None;
        for entry in &self.streams.pending_order {
            let Some(ticket) = live(entry) else { continue };
            let held = budget.held_by_source_of(ticket);
            if victim.is_none_or(|(_, most)| held > most) {
                victim = Some((entry.0, held));
            }
        }
        let Some((idx, _)) = victim else {
            return false;
        };
        if let Some(conn) = self.streams.conns.get_mut(idx) {
            let (id, tuple) = (self.id, conn.tuple);
            let message = format_args!("shard {id}: closing pending connection {tuple} to make room for a newer one");
            self.logs.log(LogKind::Accept, log::Level::Info, now, message);
        }
        bump(&self.stats.io.connections_closed_early[EarlyClose::Evicted.index()], 1);
        self.close_conn(idx);
        true
    }

    /// A pending connection got its first allocation or closed: it leaves the pending count.
    fn settle_pending(&mut self, idx: usize) {
        let Some(ticket) = self.streams.conns.get_mut(idx).and_then(|c| c.pending.take()) else {
            return;
        };
        self.shared.conns.release(ticket);
        self.streams.pending_here = self.streams.pending_here.saturating_sub(1);
        // Entries of settled connections are skipped; drop them once they are most of the list.
        if self.streams.pending_order.len() > 2 * self.streams.pending_here + 64 {
            let conns = &self.streams.conns;
            self.streams.pending_order.retain(|&(i, generation)| {
                conns
                    .slots
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.generation == generation && c.pending.is_some())
            });
        }
    }

    /// Keeps the connection gauges current on accept and close (no scan over connections).
    fn count_conn(&self, transport: Transport, opened: bool) {
        let gauge = &self.stats.io.connections[usize::from(transport == Transport::Tls)];
        if opened { bump(gauge, 1) } else { bump_down(gauge) }
    }

    pub(super) fn close_conn(&mut self, idx: usize) {
        self.settle_pending(idx);
        let Some(mut conn) = self.streams.conns.remove(idx) else {
            return;
        };
        let _ = conn.flush();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.engine.client_closed(super::clock::now(), conn.tuple, &mut self.relays);
        self.relays.freed_streams.retain(|t| *t != conn.tuple);
        self.count_conn(conn.tuple.transport, false);
    }

    pub(super) fn serve_conn(&mut self, now: Instant, idx: usize, hangup: bool) -> Drained {
        let Some(conn) = self.streams.conns.get_mut(idx) else {
            return Drained::Empty;
        };
        if conn.start != Start::Open {
            let start = conn.start;
            match proxied::check(&mut conn.stream, start, self.pkt.body_mut()) {
                Outcome::Wait => return Drained::Empty,
                Outcome::Closed => {
                    self.close_conn(idx);
                    return Drained::Empty;
                }
                Outcome::Refused(why) => {
                    self.refuse_start(now, idx, why);
                    return Drained::Empty;
                }
                Outcome::Ready(source) => {
                    if start == Start::ProxyHeader {
                        bump(&self.stats.io.proxy_headers, 1);
                    }
                    if let Some(real) = source {
                        if !self.streams.conns.retuple(idx, real) {
                            self.refuse_start(now, idx, ProxyRefusal::Duplicate);
                            return Drained::Empty;
                        }
                        // The per-source limit on pending connections now counts the real client.
                        let shared = Arc::clone(&self.shared);
                        let rebound = self
                            .streams
                            .conns
                            .get_mut(idx)
                            .and_then(|c| c.pending.as_mut())
                            .map(|t| shared.conns.rebind(t, real.ip()));
                        if let Some(Err(refusal)) = rebound {
                            bump(&self.stats.io.connections_refused[refusal.index()], 1);
                            self.close_conn(idx);
                            return Drained::Empty;
                        }
                    }
                    let Some(conn) = self.streams.conns.get_mut(idx) else {
                        return Drained::Empty;
                    };
                    conn.start = Start::Open;
                }
            }
        }
        let Some(conn) = self.streams.conns.get_mut(idx) else {
            return Drained::Empty;
        };
        conn.hangup_seen |= hangup;
        if conn.flush().is_err() {
            self.close_conn(idx);
            return Drained::Empty;
        }
        if conn.write_interest && !conn.has_pending_writes() {
            conn.write_interest = false;
            let _ = self.poll.registry().reregister(&mut conn.stream, Token(CONN_BASE + idx), Interest::READABLE);
        }
        if conn.closing && !conn.has_pending_writes() {
            self.close_conn(idx);
            return Drained::Empty;
        }
        let state = conn.read();
        // Hand every complete frame to the engine.
        loop {
            let Some(conn) = self.streams.conns.get_mut(idx) else {
                return Drained::Empty;
            };
            let len = match conn.frame_len() {
                None => break,
                Some(0) => {
                    log::debug!("shard {}: closing {}: not a STUN/TURN stream", self.id, conn.tuple);
                    self.close_conn(idx);
                    return Drained::Empty;
                }
                Some(n) => n,
            };
            let tuple = conn.tuple;
            conn.last_activity = now;
            let body = self.pkt.body_mut();
            let n = len.min(body.len());
            body[..n].copy_from_slice(conn.frame(n));
            conn.consume(len);
            let action = self.engine.handle_client(now, tuple, &mut self.pkt, n, &mut self.relays);
            self.perform(action, Some(tuple));
            let pending = self.streams.conns.get_mut(idx).is_some_and(|c| c.pending.is_some());
            if pending && self.engine.has_allocation(&tuple) {
                self.settle_pending(idx);
            }
        }
        match state {
            ReadState::Closed => {
                self.close_conn(idx);
                Drained::Empty
            }
            ReadState::MoreWaiting => Drained::MoreWaiting,
            ReadState::Drained => Drained::Empty,
        }
    }

    /// Closes a connection whose start broke the PROXY protocol rules (counted, logged at a bounded rate).
    fn refuse_start(&mut self, now: Instant, idx: usize, why: ProxyRefusal) {
        bump(&self.stats.io.proxy_refused[why.index()], 1);
        if let Some(conn) = self.streams.conns.get_mut(idx) {
            let (id, from) = (self.id, conn.tuple.client);
            let message = format_args!(
                "shard {id}: connection from {from} closed: PROXY header {}",
                ProxyRefusal::NAMES[why.index()]
            );
            self.logs.log(LogKind::Accept, log::Level::Info, now, message);
        }
        self.close_conn(idx);
    }

    pub(super) fn check_conn(&mut self, now: Instant, idx: usize, generation: u32) {
        let Some(conn) = self.streams.conns.get_mut(idx) else {
            return;
        };
        if conn.generation != generation {
            return;
        }
        if conn.start == Start::ProxyHeader && now.saturating_duration_since(conn.accepted) >= proxied::HEADER_TIMEOUT {
            self.refuse_start(now, idx, ProxyRefusal::Timeout);
            return;
        }
        let has_allocation = self.engine.has_allocation(&conn.tuple);
        let (idle, age) =
            (now.saturating_duration_since(conn.last_activity), now.saturating_duration_since(conn.accepted));
        // Many pending connections node-wide: those without an allocation get much less time.
        let pressed = !has_allocation
            && self.shared.conns.under_pressure()
            && (idle >= admission::PRESSURE_IDLE || age >= admission::PRESSURE_AGE);
        let expired = (conn.handshaking() && age >= HANDSHAKE_TIMEOUT)
            || (!has_allocation
                && (idle >= self.streams.unallocated_timeout
                    || age >= self.streams.unallocated_timeout * UNALLOCATED_MAX_FACTOR))
            || (conn.closing && idle >= CONN_CHECK);
        if expired || pressed {
            log::debug!("shard {}: closing idle or unauthenticated connection {}", self.id, conn.tuple);
            if pressed && !expired {
                bump(&self.stats.io.connections_closed_early[EarlyClose::PressureTimeout.index()], 1);
            }
            self.close_conn(idx);
        } else {
            let every = if conn.pending.is_some() { PENDING_CHECK } else { CONN_CHECK };
            self.streams.timers.insert(now + every.min(self.streams.unallocated_timeout), (idx, generation));
        }
    }

    /// Serves listeners whose `accept` failed once their retry time has come (see [`ACCEPT_RETRY`]).
    pub(super) fn retry_accepts(&mut self, now: Instant, still_pending: &mut Vec<Token>) {
        if self.streams.accept_retry_at.is_none_or(|at| now < at) {
            return;
        }
        self.streams.accept_retry_at = None;
        for token in std::mem::take(&mut self.streams.accept_retry) {
            if self.serve(now, token, false) == Drained::MoreWaiting {
                still_pending.push(token);
            }
        }
    }

    /// Drops the timer entries of closed connections once they outnumber the open ones, so that a
    /// remote opening and closing connections in a loop cannot grow the wheel for a whole timeout.
    pub(super) fn sweep_conn_timers(&mut self) {
        let conns = &self.streams.conns;
        let swept = self.streams.timers.sweep_stale(conns.by_tuple.len(), |&(idx, generation)| {
            conns.slots.get(idx).and_then(Option::as_ref).is_some_and(|c| c.generation == generation)
        });
        if swept > 0 {
            log::debug!("shard {}: swept {swept} timer entries of closed connections", self.id);
        }
    }

    /// Closes connections whose allocation was deleted (after sending what is queued).
    pub(super) fn close_freed_streams(&mut self) {
        while let Some(tuple) = self.relays.freed_streams.pop() {
            let Some(&idx) = self.streams.conns.by_tuple.get(&tuple) else {
                continue;
            };
            let Some(conn) = self.streams.conns.get_mut(idx) else {
                continue;
            };
            conn.closing = true;
            let _ = conn.flush();
            if !conn.has_pending_writes() {
                self.close_conn(idx);
            }
        }
    }
}
