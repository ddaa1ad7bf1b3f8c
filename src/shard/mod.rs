//! One shard: a mio event loop on its own thread, owning `SO_REUSEPORT` UDP, TCP and TLS listeners per
//! listening address, the client connections it accepted, the relay sockets of its allocations, and its
//! [`Engine`].
//!
//! Per wake-up the loop reads `now` once, drains each ready socket up to a budget (a socket with more
//! waiting is revisited before the next poll, since edge-triggered readiness will not fire again),
//! performs the engine's [`Action`]s, runs due timers and reads its control inbox. Relayed UDP
//! datagrams wait in a [`send::SendQueue`] and leave in batches (`sendmmsg`, UDP GSO) when the queue
//! fills and at the end of every wake-up. A busy shard then pauses briefly before it polls again, so
//! that the next wake-up finds a batch ([`coalesce`]).

pub mod clock;
pub(crate) mod coalesce;
pub mod rawsend;
pub mod readbuf;
pub mod send;
pub mod socket;
pub mod stream;
pub(crate) mod sys;

use crate::admission::{self, EarlyClose, Refusal};
use crate::policy::rate::{LogKind, LogLimiter};
use crate::proto::TimerWheel;
use crate::proto::allocation::{FiveTuple, ListenerId, RelayKey, Transport};
use crate::proto::engine::{BindError, RelaySockets, TIMER_BUDGET};
use crate::proto::stats::{bump, bump_down};
use crate::proto::{Action, DropReason, Engine, PacketBuf, Settings};
use crate::shared::Shared;
use crate::stats::ShardStats;
use crossbeam_channel::Receiver;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket::Buffers;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stream::{Conn, ReadState};

/// Token of the cross-thread waker.
pub const WAKER: Token = Token(usize::MAX - 1);
/// UDP listener `i` is token `i`; TCP listener `i` is `TCP_BASE + i`; TLS listener `i` is `TLS_BASE + i`.
const TCP_BASE: usize = 1 << 10;
const TLS_BASE: usize = 2 << 10;
/// Connection `i` is `CONN_BASE + i`.
const CONN_BASE: usize = 1 << 16;
/// Relay socket of slot `idx` is `RELAY_BASE + idx`.
const RELAY_BASE: usize = 1 << 30;
/// Parked relay socket `i` (see `proto::spares`) is `PARKED_BASE + i`.
const PARKED_BASE: usize = 1 << 29;
/// Timer slack of a shard that pauses for receive coalescing: the kernel's default (50 us) would
/// lengthen every pause by up to that much.
const PAUSE_TIMER_SLACK_NS: u64 = 1_000;
/// Longest sleep when nothing is due (keeps timers at 1 s resolution).
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// How often the engine's unix time is set from the wall clock again (see `Engine::set_wall_clock`).
const WALL_CLOCK_SYNC: Duration = Duration::from_secs(1);
/// Connections accepted per listener per wake-up.
const ACCEPT_BUDGET: usize = 64;
/// How soon a listener whose `accept` failed (out of descriptors) is tried again. Connections the kernel
/// completed meanwhile wait in its backlog, and with edge-triggered readiness nothing else would wake
/// the listener until yet another connection arrived.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// A connection without an allocation is closed after `unallocated_timeout` without a frame, and after
/// this many times that in total, however chatty (it never authenticated).
const UNALLOCATED_MAX_FACTOR: u32 = 4;
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connection's timeouts are re-checked.
const CONN_CHECK: Duration = Duration::from_secs(5);
/// How often a connection without an allocation is checked (its limits tighten under pressure).
const PENDING_CHECK: Duration = Duration::from_secs(1);

/// Messages from the control thread.
#[derive(Debug)]
pub enum Ctl {
    /// Swap in a new configuration between packets.
    Reload(Arc<Settings>, u64),
    /// Swap in a new TLS configuration for new connections.
    ReloadTls(Arc<rustls::ServerConfig>),
    /// Delete all allocations and exit.
    Shutdown,
}

/// The shard's relay sockets, indexed by allocation slot.
struct RelaySlots {
    registry: Registry,
    sockets: Vec<Option<UdpSocket>>,
    /// How often each key has been opened: queued datagrams name the opening they belong to.
    generations: Vec<u32>,
    /// The address each relay socket is bound to, the source address of its datagrams when they leave
    /// through a raw socket.
    locals: Vec<Option<SocketAddr>>,
    buffers: Buffers,
    /// Stream clients whose allocation was deleted: their connections are closed next.
    freed_streams: Vec<FiveTuple>,
    /// Relay sockets out of service, kept open for later allocations (the engine's spares), with the
    /// address each is bound to.
    parked: Vec<Option<(UdpSocket, SocketAddr)>>,
    /// Free entries of `parked`.
    parked_free: Vec<u32>,
}

impl RelaySlots {
    /// Makes `sock` (registered with `key`'s token, bound to `local`) the relay socket `key`: a new
    /// opening, so datagrams queued for the key's previous socket are not sent from this one.
    fn install(&mut self, key: RelayKey, sock: UdpSocket, local: SocketAddr) {
        let idx = key.index();
        if self.sockets.len() <= idx {
            self.sockets.resize_with(idx + 1, || None);
            self.generations.resize(idx + 1, 0);
            self.locals.resize(idx + 1, None);
        }
        self.sockets[idx] = Some(sock);
        self.generations[idx] = self.generations[idx].wrapping_add(1);
        self.locals[idx] = Some(local);
    }
}

impl RelaySockets for RelaySlots {
    fn open(&mut self, key: RelayKey, addr: SocketAddr) -> Result<(), BindError> {
        // Failures are logged by the engine, which limits how often.
        let failed = |e: io::Error| BindError::Failed(e.raw_os_error().unwrap_or(0));
        let std_socket = socket::relay_udp(addr, self.buffers)
            .map_err(|e| if e.kind() == io::ErrorKind::AddrInUse { BindError::AddrInUse } else { failed(e) })?;
        let mut sock = UdpSocket::from_std(std_socket);
        let token = Token(RELAY_BASE + key.index());
        self.registry.register(&mut sock, token, Interest::READABLE).map_err(failed)?;
        self.install(key, sock, addr);
        Ok(())
    }

    fn close(&mut self, key: RelayKey) {
        // Dropping the socket closes its only descriptor (relay sockets are never duplicated), which
        // removes it from the epoll interest list (epoll(7)); mio keeps no state per source on Linux.
        // A separate EPOLL_CTL_DEL would cost a system call per deleted allocation for nothing.
        drop(self.sockets.get_mut(key.index()).and_then(Option::take));
    }

    fn park(&mut self, key: RelayKey) -> Option<u32> {
        // Every installed socket has its address (`install`).
        let local = self.locals.get(key.index()).copied().flatten()?;
        let mut sock = self.sockets.get_mut(key.index()).and_then(Option::take)?;
        let id = match self.parked_free.pop() {
            Some(id) => id,
            None => {
                self.parked.push(None);
                (self.parked.len() - 1) as u32
            }
        };
        // Its own token from now on: what still arrives is read and dropped (`Shard::drain_batch`),
        // and a new allocation under `key` cannot receive its events.
        if self.registry.reregister(&mut sock, Token(PARKED_BASE + id as usize), Interest::READABLE).is_err() {
            self.parked_free.push(id);
            return None;
        }
        self.parked[id as usize] = Some((sock, local));
        Some(id)
    }

    fn unpark(&mut self, spare: u32, key: RelayKey) -> Result<(), BindError> {
        let (mut sock, local) =
            self.parked.get_mut(spare as usize).and_then(Option::take).ok_or(BindError::Failed(0))?;
        self.parked_free.push(spare);
        let token = Token(RELAY_BASE + key.index());
        self.registry
            .reregister(&mut sock, token, Interest::READABLE)
            .map_err(|e| BindError::Failed(e.raw_os_error().unwrap_or(0)))?;
        self.install(key, sock, local);
        Ok(())
    }

    fn allocation_freed(&mut self, tuple: FiveTuple) {
        if tuple.transport != Transport::Udp {
            self.freed_streams.push(tuple);
        }
    }
}

/// Listening sockets of one shard, one entry per listening address (aligned with [`ListenerId`]).
#[derive(Debug, Default)]
pub struct Listeners {
    /// UDP listeners.
    pub udp: Vec<std::net::UdpSocket>,
    /// TCP listeners (TURN over TCP).
    pub tcp: Vec<std::net::TcpListener>,
    /// TLS listeners (TURN over TLS).
    pub tls: Vec<std::net::TcpListener>,
}

/// Everything a shard thread needs.
pub struct ShardParts {
    /// Shard number.
    pub id: u16,
    /// The poll instance (its waker is already registered with [`WAKER`]).
    pub poll: Poll,
    /// Listeners, already bound.
    pub listeners: Listeners,
    /// TLS configuration, when TLS listeners exist.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The engine.
    pub engine: Engine,
    /// Control inbox.
    pub inbox: Receiver<Ctl>,
    /// This shard's counters.
    pub stats: Arc<ShardStats>,
    /// Relay socket buffer sizes.
    pub buffers: Buffers,
    /// Datagrams per socket per wake-up.
    pub recv_batch: usize,
    /// Whether relayed datagrams may leave as UDP GSO messages.
    pub udp_gso: bool,
    /// The raw sockets lone relayed datagrams leave through (`runtime.raw_send`), when they opened.
    pub raw_socket: Option<rawsend::RawSocket>,
    /// Receive coalescing (see [`coalesce`]).
    pub coalesce: CoalesceSettings,
    /// How long a TCP/TLS connection may stay without an allocation and without a frame.
    pub unallocated_timeout: Duration,
    /// The configuration generation this shard runs (set after each reload is applied).
    pub applied: Arc<std::sync::atomic::AtomicU64>,
    /// What shards share (here: the budget of connections without an allocation).
    pub shared: Arc<Shared>,
}

impl std::fmt::Debug for ShardParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardParts").field("id", &self.id).finish()
    }
}

/// Receive coalescing of a shard (see [`coalesce`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalesceSettings {
    /// Longest pause after a wake-up (zero: never pause).
    pub max_wait: Duration,
    /// Datagrams per second from which the shard pauses.
    pub min_rate: u64,
}

/// Creates a poll instance and its waker.
pub fn new_poll() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}

/// Where a batch of datagrams is read from.
#[derive(Clone, Copy, Debug)]
enum BatchSource {
    /// UDP listener `i`.
    Listener(usize),
    /// Relay socket `key`.
    Relay(usize),
    /// Parked relay socket `i` (no allocation owns it: what arrives is dropped).
    Parked(usize),
}

/// Whether a socket may still have data waiting after its budget ran out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drained {
    Empty,
    MoreWaiting,
}

/// Client connections: a slab with generations, and the 5-tuple index used to deliver relayed data.
#[derive(Default)]
struct Conns {
    slots: Vec<Option<Conn>>,
    generations: Vec<u32>,
    free: Vec<usize>,
    by_tuple: HashMap<FiveTuple, usize>,
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

    fn get_mut(&mut self, idx: usize) -> Option<&mut Conn> {
        self.slots.get_mut(idx)?.as_mut()
    }
}

struct Shard {
    id: u16,
    poll: Poll,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    tls_listeners: Vec<TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    conns: Conns,
    conn_timers: TimerWheel<(usize, u32)>,
    relays: RelaySlots,
    engine: Engine,
    pkt: PacketBuf,
    batch: socket::RecvBatch,
    sendq: send::SendQueue,
    stats: Arc<ShardStats>,
    recv_batch: usize,
    unallocated_timeout: Duration,
    /// Budget for log lines a remote can cause.
    logs: LogLimiter,
    /// Listeners whose `accept` failed, to be served again at `accept_retry_at`.
    accept_retry: Vec<Token>,
    accept_retry_at: Option<Instant>,
    /// Connection checks that are due, at most [`TIMER_BUDGET`] of them done per wake-up.
    conn_due: Vec<(usize, u32)>,
    /// Stream connections with writes queued in this wake-up.
    to_flush: Vec<usize>,
    /// Datagrams read in this wake-up (for receive coalescing).
    wake_datagrams: usize,
    /// What shards share (the budget of pending connections).
    shared: Arc<Shared>,
    /// This shard's pending connections (no allocation yet) in the order they were admitted; entries
    /// of connections that closed or allocated since are skipped and dropped lazily.
    pending_order: VecDeque<(usize, u32)>,
    /// Live entries of `pending_order`.
    pending_here: usize,
}

impl Shard {
    /// Delivers bytes to a TCP or TLS client (UDP clients are served through the send queue).
    fn send_to_stream(&mut self, tuple: FiveTuple, bytes: Option<&[u8]>, range: Option<std::ops::Range<usize>>) {
        let bytes = match (bytes, range) {
            (Some(b), _) => b,
            (None, Some(r)) => self.pkt.get(r),
            (None, None) => return,
        };
        let Some(&idx) = self.conns.by_tuple.get(&tuple) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(idx) else {
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
            self.to_flush.push(idx);
        }
    }

    /// Writes what the wake-up queued for stream clients; a connection the socket does not take
    /// everything from waits for WRITABLE.
    fn flush_streams(&mut self) {
        for idx in self.to_flush.drain(..) {
            let Some(conn) = self.conns.get_mut(idx) else { continue };
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

    fn perform(&mut self, action: Action, reply_to: Option<FiveTuple>) {
        match action {
            Action::Done => {}
            Action::Drop(reason) => bump(&self.stats.engine.drops[reason.index()], 1),
            Action::Reply { len } => match reply_to {
                Some(tuple) if tuple.transport == Transport::Udp => {
                    // Replies to UDP clients leave with the wake-up's other datagrams (one sendmmsg for a
                    // batch of requests); the queue keeps their order with relayed data to that client.
                    if self.sendq.is_full() {
                        self.flush_sends();
                    }
                    let via = send::Via::Listener(tuple.listener.0);
                    self.sendq.push_copy(via, tuple.client, self.engine.reply(len));
                }
                Some(tuple) => {
                    // The reply lives in the engine; copy it out of the borrow (control path only).
                    let mut reply = [0u8; 1500];
                    let bytes = self.engine.reply(len);
                    let n = bytes.len().min(reply.len());
                    reply[..n].copy_from_slice(&bytes[..n]);
                    self.send_to_stream(tuple, Some(&reply[..n]), None);
                }
                None => {}
            },
            Action::ToPeer { key, peer, range } => {
                let generation = self.relays.generations.get(key.index()).copied().unwrap_or(0);
                // The send queue takes the address only where a raw socket can use it.
                let local = self.relays.locals.get(key.index()).copied().flatten();
                let via = send::Via::Relay { key: u32::try_from(key.index()).unwrap_or(u32::MAX), generation };
                self.queue(via, local, peer, range);
            }
            Action::ToClient { tuple, range } if tuple.transport == Transport::Udp => {
                self.queue(send::Via::Listener(tuple.listener.0), None, tuple.client, range);
            }
            Action::ToClient { tuple, range } => self.send_to_stream(tuple, None, Some(range)),
        }
    }

    /// Queues the relayed datagram in `self.pkt[range]` (its buffer moves into the queue); `raw_from`:
    /// see [`send::SendQueue::push`].
    fn queue(&mut self, via: send::Via, raw_from: Option<SocketAddr>, to: SocketAddr, range: std::ops::Range<usize>) {
        if self.sendq.is_full() {
            self.flush_sends();
        }
        self.sendq.push(via, raw_from, to, &mut self.pkt, range);
    }

    /// Sends every queued datagram.
    fn flush_sends(&mut self) {
        if self.sendq.is_empty() {
            return;
        }
        let (udp, relays) = (&self.udp, &self.relays);
        let done = self.sendq.flush(|via| match via {
            send::Via::Listener(i) => udp.get(usize::from(i)),
            send::Via::Relay { key, generation } => match relays.sockets.get(key as usize) {
                Some(Some(sock)) if relays.generations.get(key as usize) == Some(&generation) => Some(sock),
                _ => None,
            },
        });
        if done.would_block > 0 {
            bump(&self.stats.engine.drops[DropReason::SocketFull.index()], done.would_block);
        }
        bump(&self.stats.io.send_calls, done.syscalls);
        if done.segmented > 0 {
            bump(&self.stats.io.datagrams_segmented, done.segmented);
        }
        if done.raw > 0 {
            bump(&self.stats.io.datagrams_raw, done.raw);
        }
    }

    /// Receives a batch from the UDP listener `i` or the relay socket `key` (`recvmmsg`) and hands each
    /// datagram to the engine; from a parked relay socket, counts each as dropped. The batch buffer
    /// being processed is swapped into `self.pkt`, so the engine and the send path see one packet
    /// buffer as before.
    fn drain_batch(&mut self, now: Instant, source: BatchSource) -> Drained {
        let mut done = 0;
        while done < self.recv_batch {
            let received = match source {
                BatchSource::Listener(i) => match self.udp.get(i) {
                    Some(sock) => self.batch.recv(sock),
                    None => return Drained::Empty,
                },
                BatchSource::Relay(key) => match self.relays.sockets.get(key) {
                    Some(Some(sock)) => self.batch.recv(sock),
                    _ => return Drained::Empty,
                },
                BatchSource::Parked(i) => match self.relays.parked.get(i) {
                    Some(Some((sock, _))) => self.batch.recv(sock),
                    _ => return Drained::Empty,
                },
            };
            let n = match received {
                Ok(0) => return Drained::Empty,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here on some kernels; nothing to do but go on.
                    log::trace!("shard {}: receive error on {source:?}: {e}", self.id);
                    return Drained::Empty;
                }
            };
            for k in 0..n {
                let (len, Some(from)) = self.batch.meta[k] else { continue };
                std::mem::swap(&mut self.pkt, &mut self.batch.bufs[k]);
                match source {
                    BatchSource::Listener(i) => {
                        let tuple =
                            FiveTuple { client: from, listener: ListenerId(i as u16), transport: Transport::Udp };
                        let action = self.engine.handle_client(now, tuple, &mut self.pkt, len, &mut self.relays);
                        self.perform(action, Some(tuple));
                    }
                    BatchSource::Relay(index) => {
                        // Tokens of relay sockets are made from their keys, so this always holds.
                        if let Some(key) = RelayKey::from_index(index) {
                            let action = self.engine.handle_peer(now, key, from, &mut self.pkt, len);
                            self.perform(action, None);
                        }
                    }
                    BatchSource::Parked(_) => bump(&self.stats.engine.drops[DropReason::NoAllocation.index()], 1),
                }
                std::mem::swap(&mut self.pkt, &mut self.batch.bufs[k]);
            }
            done += n;
            self.wake_datagrams += n;
            if n < self.batch.bufs.len() {
                // A short batch: the queue is empty (new datagrams raise a new edge).
                return Drained::Empty;
            }
        }
        Drained::MoreWaiting
    }

    fn accept(&mut self, now: Instant, i: usize, transport: Transport) -> Drained {
        for _ in 0..ACCEPT_BUDGET {
            let listener = match transport {
                Transport::Tls => self.tls_listeners.get(i),
                _ => self.tcp.get(i),
            };
            let Some(listener) = listener else {
                return Drained::Empty;
            };
            match listener.accept() {
                Ok((stream, from)) => {
                    let Some(ticket) = self.admit(now, &stream, from, transport) else {
                        continue;
                    };
                    let tls = match (transport, &self.tls) {
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
                    let idx =
                        self.conns.insert(|generation| Conn::new(stream, tuple, tls, now, generation, Some(ticket)));
                    let Some(conn) = self.conns.get_mut(idx) else {
                        self.shared.conns.release(ticket);
                        continue;
                    };
                    if let Err(e) =
                        self.poll.registry().register(&mut conn.stream, Token(CONN_BASE + idx), Interest::READABLE)
                    {
                        log::warn!("shard {}: cannot register connection from {from}: {e}", self.id);
                        self.conns.remove(idx);
                        self.shared.conns.release(ticket);
                        continue;
                    }
                    let generation = conn.generation;
                    self.pending_order.push_back((idx, generation));
                    self.pending_here += 1;
                    self.conn_timers.insert(now + PENDING_CHECK.min(self.unallocated_timeout), (idx, generation));
                    self.count_conn(transport, true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, typically: the backlog keeps the connections; try again soon.
                    // Each new connection attempt brings us here again too, so the log is limited.
                    let base = if transport == Transport::Tls { TLS_BASE } else { TCP_BASE };
                    if !self.accept_retry.contains(&Token(base + i)) {
                        self.accept_retry.push(Token(base + i));
                    }
                    self.accept_retry_at.get_or_insert(now + ACCEPT_RETRY);
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
    ) -> Option<admission::Ticket> {
        use std::os::fd::AsRawFd;
        let fd = u64::try_from(stream.as_raw_fd()).unwrap_or(u64::MAX);
        let refused = match self.shared.conns.admit(from.ip(), fd) {
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
        let conns = &self.conns;
        let live = |&(idx, generation): &(usize, u32)| {
            conns.slots.get(idx).and_then(Option::as_ref).filter(|c| c.generation == generation)?.pending
        };
        while self.pending_order.front().is_some_and(|e| live(e).is_none()) {
            self.pending_order.pop_front();
        }
        let budget = &self.shared.conns;
        let mut victim: Option<(usize, u32)> = None;
        for entry in &self.pending_order {
            let Some(ticket) = live(entry) else { continue };
            let held = budget.held_by_source_of(ticket);
            if victim.is_none_or(|(_, most)| held > most) {
                victim = Some((entry.0, held));
            }
        }
        let Some((idx, _)) = victim else {
            return false;
        };
        if let Some(conn) = self.conns.get_mut(idx) {
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
        let Some(ticket) = self.conns.get_mut(idx).and_then(|c| c.pending.take()) else {
            return;
        };
        self.shared.conns.release(ticket);
        self.pending_here = self.pending_here.saturating_sub(1);
        // Entries of settled connections are skipped; drop them once they are most of the list.
        if self.pending_order.len() > 2 * self.pending_here + 64 {
            let conns = &self.conns;
            self.pending_order.retain(|&(i, generation)| {
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

    fn close_conn(&mut self, idx: usize) {
        self.settle_pending(idx);
        let Some(mut conn) = self.conns.remove(idx) else {
            return;
        };
        let _ = conn.flush();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.engine.client_closed(conn.tuple, &mut self.relays);
        self.relays.freed_streams.retain(|t| *t != conn.tuple);
        self.count_conn(conn.tuple.transport, false);
    }

    fn serve_conn(&mut self, now: Instant, idx: usize, hangup: bool) -> Drained {
        let Some(conn) = self.conns.get_mut(idx) else {
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
            let Some(conn) = self.conns.get_mut(idx) else {
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
            let pending = self.conns.get_mut(idx).is_some_and(|c| c.pending.is_some());
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

    fn check_conn(&mut self, now: Instant, idx: usize, generation: u32) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        if conn.generation != generation {
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
                && (idle >= self.unallocated_timeout || age >= self.unallocated_timeout * UNALLOCATED_MAX_FACTOR))
            || (conn.closing && idle >= CONN_CHECK);
        if expired || pressed {
            log::debug!("shard {}: closing idle or unauthenticated connection {}", self.id, conn.tuple);
            if pressed && !expired {
                bump(&self.stats.io.connections_closed_early[EarlyClose::PressureTimeout.index()], 1);
            }
            self.close_conn(idx);
        } else {
            let every = if conn.pending.is_some() { PENDING_CHECK } else { CONN_CHECK };
            self.conn_timers.insert(now + every.min(self.unallocated_timeout), (idx, generation));
        }
    }

    /// How long the loop may sleep when no socket has work left over: until the next timer, accept
    /// retry or fired-but-waiting timer (then not at all), and at most [`MAX_SLEEP`].
    fn sleep_for(&self, now: Instant) -> Duration {
        if !self.conn_due.is_empty() {
            return Duration::ZERO;
        }
        let next = [self.engine.poll_timeout(), self.conn_timers.next_deadline(), self.accept_retry_at]
            .into_iter()
            .flatten()
            .min();
        next.map_or(MAX_SLEEP, |t| t.saturating_duration_since(now).min(MAX_SLEEP))
    }

    /// Serves listeners whose `accept` failed once their retry time has come (see [`ACCEPT_RETRY`]).
    fn retry_accepts(&mut self, now: Instant, still_pending: &mut Vec<Token>) {
        if self.accept_retry_at.is_none_or(|at| now < at) {
            return;
        }
        self.accept_retry_at = None;
        for token in std::mem::take(&mut self.accept_retry) {
            if self.serve(now, token, false) == Drained::MoreWaiting {
                still_pending.push(token);
            }
        }
    }

    /// The wake-up's timer work: the engine's (allocations, permissions, channels, reservations), closing
    /// streams whose allocation went, and connection checks, each within [`TIMER_BUDGET`] (closing costs
    /// a few microseconds; thousands due together must not hold up relaying).
    fn run_timers(&mut self, now: Instant) {
        self.engine.handle_timeout(now, &mut self.relays);
        self.close_freed_streams();
        let mut due = std::mem::take(&mut self.conn_due);
        for (idx, generation) in self.conn_timers.drain_due(now, &mut due, TIMER_BUDGET) {
            self.check_conn(now, idx, generation);
        }
        self.conn_due = due;
        self.sweep_conn_timers();
    }

    /// Drops the timer entries of closed connections once they outnumber the open ones, so that a
    /// remote opening and closing connections in a loop cannot grow the wheel for a whole timeout.
    fn sweep_conn_timers(&mut self) {
        let conns = &self.conns;
        let swept = self.conn_timers.sweep_stale(conns.by_tuple.len(), |&(idx, generation)| {
            conns.slots.get(idx).and_then(Option::as_ref).is_some_and(|c| c.generation == generation)
        });
        if swept > 0 {
            log::debug!("shard {}: swept {swept} timer entries of closed connections", self.id);
        }
    }

    /// Closes connections whose allocation was deleted (after sending what is queued).
    fn close_freed_streams(&mut self) {
        while let Some(tuple) = self.relays.freed_streams.pop() {
            let Some(&idx) = self.conns.by_tuple.get(&tuple) else {
                continue;
            };
            let Some(conn) = self.conns.get_mut(idx) else {
                continue;
            };
            conn.closing = true;
            let _ = conn.flush();
            if !conn.has_pending_writes() {
                self.close_conn(idx);
            }
        }
    }

    /// Serves the source of `token`; `hangup`: its event reported a close or an error.
    fn serve(&mut self, now: Instant, token: Token, hangup: bool) -> Drained {
        match token.0 {
            t if t == WAKER.0 => Drained::Empty,
            t if t >= RELAY_BASE => self.drain_batch(now, BatchSource::Relay(t - RELAY_BASE)),
            t if t >= PARKED_BASE => self.drain_batch(now, BatchSource::Parked(t - PARKED_BASE)),
            t if t >= CONN_BASE => self.serve_conn(now, t - CONN_BASE, hangup),
            t if t >= TLS_BASE => self.accept(now, t - TLS_BASE, Transport::Tls),
            t if t >= TCP_BASE => self.accept(now, t - TCP_BASE, Transport::Tcp),
            i => self.drain_batch(now, BatchSource::Listener(i)),
        }
    }
}

/// Runs a shard until it receives [`Ctl::Shutdown`].
pub fn run(parts: ShardParts) {
    let ShardParts {
        id,
        poll,
        listeners,
        tls,
        engine,
        inbox,
        stats,
        buffers,
        recv_batch,
        udp_gso,
        raw_socket,
        coalesce,
        unallocated_timeout,
        applied,
        shared,
    } = parts;
    let registry = match poll.registry().try_clone() {
        Ok(r) => r,
        Err(e) => {
            log::error!("shard {id}: cannot clone the poll registry: {e}");
            return;
        }
    };
    let mut initial = Vec::new();
    let mut udp = Vec::new();
    for (i, l) in listeners.udp.into_iter().enumerate() {
        let mut sock = UdpSocket::from_std(l);
        if let Err(e) = registry.register(&mut sock, Token(i), Interest::READABLE) {
            log::error!("shard {id}: cannot register UDP listener {i}: {e}");
            return;
        }
        initial.push(Token(i));
        udp.push(sock);
    }
    let mut register_tcp = |list: Vec<std::net::TcpListener>, base: usize| -> Option<Vec<TcpListener>> {
        let mut out = Vec::new();
        for (i, l) in list.into_iter().enumerate() {
            let mut sock = TcpListener::from_std(l);
            if let Err(e) = registry.register(&mut sock, Token(base + i), Interest::READABLE) {
                log::error!("shard {id}: cannot register TCP listener {i}: {e}");
                return None;
            }
            initial.push(Token(base + i));
            out.push(sock);
        }
        Some(out)
    };
    let Some(tcp) = register_tcp(listeners.tcp, TCP_BASE) else {
        return;
    };
    let Some(tls_listeners) = register_tcp(listeners.tls, TLS_BASE) else {
        return;
    };
    let now = clock::now();
    let mut shard = Shard {
        id,
        poll,
        udp,
        tcp,
        tls_listeners,
        tls,
        conns: Conns::default(),
        conn_timers: TimerWheel::new(now),
        relays: RelaySlots {
            registry,
            sockets: Vec::new(),
            generations: Vec::new(),
            locals: Vec::new(),
            // A relay socket sends one allocation's traffic: the kernel's default send buffer holds
            // far more than it ever has in flight, and leaving it spares a setsockopt per Allocate.
            // The receive buffer stays as configured (a peer's burst waits there for the shard).
            buffers: Buffers { recv: buffers.recv, send: 0 },
            freed_streams: Vec::new(),
            parked: Vec::new(),
            parked_free: Vec::new(),
        },
        engine,
        pkt: PacketBuf::default(),
        batch: socket::RecvBatch::new(recv_batch.clamp(1, socket::MAX_BATCH)),
        sendq: send::SendQueue::new(udp_gso, raw_socket),
        stats,
        recv_batch: recv_batch.max(1),
        unallocated_timeout,
        logs: LogLimiter::default(),
        accept_retry: Vec::new(),
        accept_retry_at: None,
        conn_due: Vec::new(),
        to_flush: Vec::new(),
        wake_datagrams: 0,
        shared,
        pending_order: VecDeque::new(),
        pending_here: 0,
    };
    let mut coalescer = coalesce::Coalescer::new(now, coalesce.max_wait, coalesce.min_rate, recv_batch);
    if !coalesce.max_wait.is_zero() && !sys::set_timer_slack(PAUSE_TIMER_SLACK_NS) {
        log::debug!("shard {id}: cannot set the timer slack; coalescing pauses may run long");
    }
    let mut events = Events::with_capacity(1024);
    // Listeners may hold work that arrived before registration: serve them once.
    let mut pending: Vec<Token> = initial;
    let mut still_pending: Vec<Token> = Vec::new();
    let mut next_wall_sync = clock::now();
    log::debug!("shard {id} running");
    loop {
        let timeout = if pending.is_empty() { shard.sleep_for(clock::now()) } else { Duration::ZERO };
        if let Err(e) = shard.poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            log::error!("shard {id}: poll failed: {e}");
            return;
        }
        // The clock is read once per wake-up; the wall clock about once a second.
        let now = clock::now();
        if now >= next_wall_sync {
            shard.engine.set_wall_clock(now, clock::unix_now());
            next_wall_sync = now + WALL_CLOCK_SYNC;
        }
        for event in events.iter() {
            let hangup = event.is_read_closed() || event.is_error();
            if shard.serve(now, event.token(), hangup) == Drained::MoreWaiting {
                still_pending.push(event.token());
            }
        }
        for token in pending.drain(..) {
            if shard.serve(now, token, false) == Drained::MoreWaiting {
                still_pending.push(token);
            }
        }
        shard.retry_accepts(now, &mut still_pending);
        shard.flush_sends();
        shard.flush_streams();
        still_pending.sort_unstable_by_key(|t| t.0);
        still_pending.dedup();
        std::mem::swap(&mut pending, &mut still_pending);
        shard.run_timers(now);
        let wait = coalescer.after_wake(now, std::mem::take(&mut shard.wake_datagrams), pending.is_empty());
        if !wait.is_zero() {
            bump(&shard.stats.io.coalescing_pauses, 1);
            clock::pause(wait);
        }
        while let Ok(ctl) = inbox.try_recv() {
            match ctl {
                Ctl::Reload(settings, generation) => {
                    shard.engine.reload(now, settings);
                    applied.store(generation, std::sync::atomic::Ordering::Release);
                }
                Ctl::ReloadTls(cfg) => shard.tls = Some(cfg),
                Ctl::Shutdown => {
                    let open: Vec<usize> =
                        (0..shard.conns.slots.len()).filter(|&i| shard.conns.slots[i].is_some()).collect();
                    for idx in open {
                        shard.close_conn(idx);
                    }
                    shard.engine.close_all(&mut shard.relays);
                    log::debug!("shard {id} stopped");
                    return;
                }
            }
        }
    }
}
