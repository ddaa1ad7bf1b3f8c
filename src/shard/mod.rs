//! One shard: a mio event loop on its own thread, owning `SO_REUSEPORT` UDP, TCP and TLS listeners per
//! listening address, the client connections it accepted, the relay sockets of its allocations, and its
//! [`Engine`].
//!
//! Per wake-up the loop reads `now` once, drains each ready socket up to a budget (a socket with more
//! waiting is revisited before the next poll, since edge-triggered readiness will not fire again),
//! performs the engine's [`Action`]s, runs due timers and reads its control inbox. Relayed UDP
//! datagrams wait in a [`send::SendQueue`] and leave in batches (`sendmmsg`, UDP GSO) when the queue
//! fills and at the end of every wake-up. A busy shard then pauses briefly before it polls again, so
//! that the next wake-up finds a batch ([`coalesce`]). TCP and TLS clients are accepted, read and
//! written in [`conns`]; the relay sockets the engine opens live in [`relays`].

pub mod clock;
pub(crate) mod coalesce;
mod conns;
pub(crate) mod proxied;
pub mod rawsend;
pub mod readbuf;
mod relays;
pub mod send;
pub mod socket;
pub mod stream;
pub(crate) mod sys;

use crate::policy::rate::LogLimiter;
use crate::proto::TimerWheel;
use crate::proto::allocation::{FiveTuple, ListenerId, RelayKey, Traffic, Transport};
use crate::proto::engine::{Selector, TIMER_BUDGET};
use crate::proto::stats::{bump, set};
use crate::proto::{Action, DropReason, Engine, PacketBuf, Settings};
use crate::shared::Shared;
use crate::stats::ShardStats;
use conns::{Conns, Streams};
use crossbeam_channel::Receiver;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use relays::RelaySlots;
use socket::Buffers;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// End the allocations an operator selected, and say how many through `reply`.
    EndSessions(EndWhich, crossbeam_channel::Sender<usize>),
    /// Delete all allocations and exit.
    Shutdown,
}

/// A shard's control channel and waker, as the control side (admin API, fleet thread) reaches it.
#[derive(Clone)]
pub struct ShardLink {
    /// Its control channel.
    pub inbox: crossbeam_channel::Sender<Ctl>,
    /// Wakes its loop to read the channel.
    pub waker: Arc<Waker>,
}

/// Asks every shard to end the allocations `which` selects and sums their answers, waiting at most
/// `wait` (a shard that does not answer in time is not waited for; it still ends them).
pub fn end_sessions(links: &[ShardLink], which: &EndWhich, wait: Duration) -> usize {
    let (tx, rx) = crossbeam_channel::bounded(links.len().max(1));
    let mut asked = 0;
    for link in links {
        if link.inbox.try_send(Ctl::EndSessions(which.clone(), tx.clone())).is_ok() {
            let _ = link.waker.wake();
            asked += 1;
        }
    }
    let deadline = clock::now() + wait;
    (0..asked).map_while(|_| rx.recv_timeout(deadline.saturating_duration_since(clock::now())).ok()).sum()
}

/// Which allocations an operator ends ([`Ctl::EndSessions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndWhich {
    /// The one with this session id.
    Id(u64),
    /// Every one of this user.
    User(String),
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
    /// Trusted proxies (`listen.proxy_from`).
    pub proxy_from: Vec<crate::policy::IpRange>,
    /// The configuration generation this shard runs (set after each reload is applied).
    pub applied: Arc<std::sync::atomic::AtomicU64>,
    /// What shards share (here: the budget of connections without an allocation).
    pub shared: Arc<Shared>,
    /// This shard's handles on the kernel path's maps, when it runs (`runtime.kernel_path`).
    pub kernel: Option<crate::kernel_path::ShardMaps>,
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

struct Shard {
    id: u16,
    poll: Poll,
    udp: Vec<UdpSocket>,
    /// Listeners, connections and timers of the TCP and TLS clients.
    streams: Streams,
    relays: RelaySlots,
    engine: Engine,
    pkt: PacketBuf,
    batch: socket::RecvBatch,
    sendq: send::SendQueue,
    stats: Arc<ShardStats>,
    recv_batch: usize,
    /// Budget for log lines a remote can cause.
    logs: LogLimiter,
    /// Datagrams read in this wake-up (for receive coalescing).
    wake_datagrams: usize,
    /// What shards share (the budget of pending connections).
    shared: Arc<Shared>,
    /// Allocation slots the engine marked for the kernel path (kept to reuse the buffer).
    offload_slots: Vec<u32>,
}

impl Shard {
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

    /// How long the loop may sleep when no socket has work left over: until the next timer, accept
    /// retry or fired-but-waiting timer (then not at all), and at most [`MAX_SLEEP`].
    fn sleep_for(&self, now: Instant) -> Duration {
        if !self.streams.due.is_empty() {
            return Duration::ZERO;
        }
        let next = [self.engine.poll_timeout(), self.streams.timers.next_deadline(), self.streams.accept_retry_at]
            .into_iter()
            .flatten()
            .min();
        next.map_or(MAX_SLEEP, |t| t.saturating_duration_since(now).min(MAX_SLEEP))
    }

    /// The wake-up's timer work: the engine's (allocations, permissions, channels, reservations), closing
    /// streams whose allocation went, and connection checks, each within [`TIMER_BUDGET`] (closing costs
    /// a few microseconds; thousands due together must not hold up relaying).
    fn run_timers(&mut self, now: Instant) {
        self.engine.handle_timeout(now, &mut self.relays);
        self.close_freed_streams();
        let mut due = std::mem::take(&mut self.streams.due);
        for (idx, generation) in self.streams.timers.drain_due(now, &mut due, TIMER_BUDGET) {
            self.check_conn(now, idx, generation);
        }
        self.streams.due = due;
        self.sweep_conn_timers();
    }

    /// Makes the kernel path's entries follow the engine for every allocation it marked (a channel
    /// bound, a permission or channel ending, a reload), and counts what the removed ones relayed.
    fn sync_offload(&mut self, now: Instant) {
        let Some(kernel) = self.relays.kernel.as_mut() else { return };
        if !self.engine.offload_pending() {
            return;
        }
        let mut slots = std::mem::take(&mut self.offload_slots);
        self.engine.take_offload_dirty(&mut slots);
        for &slot in &slots {
            let mut wanted = kernel.wanted_buffer();
            self.engine.offload_wanted(slot, now, &mut wanted);
            let [to_peer, to_client] = kernel.sync(slot, wanted);
            self.engine.credit_offloaded(slot, to_peer, to_client);
            count_kernel(&self.stats, to_peer, to_client);
        }
        set(&self.stats.io.kernel_channels, kernel.installed() as u64);
        self.offload_slots = slots;
    }

    /// Hands what the kernel path relayed since the last call to the engine (about once a second).
    fn collect_offloaded(&mut self) {
        let Some(kernel) = self.relays.kernel.as_mut() else { return };
        if let Some([_, _, no_route]) = kernel.program_stats() {
            set(&self.stats.io.kernel_no_route, no_route);
        }
        let (engine, stats) = (&mut self.engine, &self.stats);
        kernel.collect(|slot, to_peer, to_client| {
            engine.credit_offloaded(slot, to_peer, to_client);
            count_kernel(stats, to_peer, to_client);
        });
    }

    /// Tells the operator state this loop runs, with its sessions when they are published (admin API
    /// or fleet): about once a second, off the data path.
    fn beat(&mut self, now: Instant) {
        self.collect_offloaded();
        let sessions = self.shared.operator.publishing().then(|| {
            let mut list = Vec::with_capacity(self.engine.allocation_count());
            self.engine.sessions(now, &mut list);
            list
        });
        self.shared.operator.beat(self.id, now, sessions);
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

/// Counts datagrams the kernel path relayed for the shard's allocations.
fn count_kernel(stats: &ShardStats, to_peer: Traffic, to_client: Traffic) {
    for (counter, t) in stats.io.kernel_datagrams.iter().zip([to_peer, to_client]) {
        if t.packets > 0 {
            bump(counter, t.packets);
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
        proxy_from,
        applied,
        shared,
        kernel,
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
        streams: Streams {
            tcp,
            tls_listeners,
            tls,
            conns: Conns::default(),
            timers: TimerWheel::new(now),
            unallocated_timeout,
            proxy_from,
            accept_retry: Vec::new(),
            accept_retry_at: None,
            due: Vec::new(),
            to_flush: Vec::new(),
            pending_order: VecDeque::new(),
            pending_here: 0,
        },
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
            kernel: None,
        },
        engine,
        pkt: PacketBuf::default(),
        batch: socket::RecvBatch::new(recv_batch.clamp(1, socket::MAX_BATCH)),
        sendq: send::SendQueue::new(udp_gso, raw_socket),
        stats,
        recv_batch: recv_batch.max(1),
        logs: LogLimiter::default(),
        wake_datagrams: 0,
        shared,
        offload_slots: Vec::new(),
    };
    if let Some(maps) = kernel {
        // Channels are keyed by the listening port the client sends to; the listener's address
        // stands for the server's (a wildcard one is learned from the client's datagrams).
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let listeners = shard.udp.iter().map(|s| s.local_addr().unwrap_or(unknown)).collect();
        shard.relays.kernel = Some(crate::kernel_path::table::ShardTable::new(maps, listeners));
        shard.engine.enable_offload();
    }
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
            shard.beat(now);
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
        shard.sync_offload(now);
        let wait = coalescer.after_wake(now, std::mem::take(&mut shard.wake_datagrams), pending.is_empty());
        if !wait.is_zero() {
            bump(&shard.stats.io.coalescing_pauses, 1);
            clock::pause(wait);
        }
        while let Ok(ctl) = inbox.try_recv() {
            match ctl {
                Ctl::Reload(settings, generation) => {
                    shard.engine.reload(now, settings);
                    // A peer the new policy refuses stops flowing through the kernel now.
                    shard.sync_offload(now);
                    applied.store(generation, std::sync::atomic::Ordering::Release);
                }
                Ctl::ReloadTls(cfg) => shard.streams.tls = Some(cfg),
                Ctl::EndSessions(which, reply) => {
                    let selector = match &which {
                        EndWhich::Id(id) => Selector::Id(*id),
                        EndWhich::User(user) => Selector::User(user),
                    };
                    let ended = shard.engine.end_sessions(now, selector, &mut shard.relays);
                    shard.sync_offload(now);
                    shard.close_freed_streams();
                    let _ = reply.send(ended);
                    if ended > 0 {
                        // The list shows the change at once, not a second later.
                        shard.beat(now);
                    }
                }
                Ctl::Shutdown => {
                    let open: Vec<usize> = (0..shard.streams.conns.slots.len())
                        .filter(|&i| shard.streams.conns.slots[i].is_some())
                        .collect();
                    for idx in open {
                        shard.close_conn(idx);
                    }
                    shard.engine.close_all(clock::now(), &mut shard.relays);
                    log::debug!("shard {id} stopped");
                    return;
                }
            }
        }
    }
}
