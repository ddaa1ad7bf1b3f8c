//! One shard: a mio event loop on its own thread, owning a `SO_REUSEPORT` listener per listening
//! address, the relay sockets of its allocations, and its [`Engine`].
//!
//! Per wake-up the loop reads `now` once, drains each ready socket up to `recv_batch` datagrams (a
//! socket with more waiting is revisited before the next poll, since edge-triggered readiness will not
//! fire again), performs the engine's [`Action`]s, runs due timers and reads its control inbox.

pub mod clock;
pub mod socket;

use crate::proto::allocation::{FiveTuple, ListenerId, Transport};
use crate::proto::engine::{BindError, RelaySockets};
use crate::proto::{Action, Engine, PacketBuf, Settings};
use crate::shared::{ShardStats, bump};
use crossbeam_channel::Receiver;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket::Buffers;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the cross-thread waker.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Tokens below this are listeners; relay socket `idx` is `RELAY_BASE + idx`.
const RELAY_BASE: usize = 1 << 16;
/// Longest sleep when nothing is due (keeps timers at 1 s resolution).
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Messages from the control thread.
#[derive(Debug)]
pub enum Ctl {
    /// Swap in a new configuration between packets.
    Reload(Arc<Settings>),
    /// Delete all allocations and exit.
    Shutdown,
}

/// The shard's relay sockets, indexed by allocation slot.
struct RelaySlots {
    registry: Registry,
    sockets: Vec<Option<UdpSocket>>,
    buffers: Buffers,
}

impl RelaySockets for RelaySlots {
    fn open(&mut self, idx: u32, addr: SocketAddr) -> Result<(), BindError> {
        let std_socket = socket::relay_udp(addr, self.buffers).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                BindError::AddrInUse
            } else {
                log::warn!("cannot open relay socket {addr}: {e}");
                BindError::Other
            }
        })?;
        let mut sock = UdpSocket::from_std(std_socket);
        let token = Token(RELAY_BASE + idx as usize);
        if let Err(e) = self.registry.register(&mut sock, token, Interest::READABLE) {
            log::warn!("cannot register relay socket {addr}: {e}");
            return Err(BindError::Other);
        }
        let idx = idx as usize;
        if self.sockets.len() <= idx {
            self.sockets.resize_with(idx + 1, || None);
        }
        self.sockets[idx] = Some(sock);
        Ok(())
    }

    fn close(&mut self, idx: u32) {
        if let Some(mut sock) = self.sockets.get_mut(idx as usize).and_then(Option::take) {
            let _ = self.registry.deregister(&mut sock);
        }
    }
}

/// Everything a shard thread needs.
pub struct ShardParts {
    /// Shard number.
    pub id: u16,
    /// The poll instance (its waker is already registered with [`WAKER`]).
    pub poll: Poll,
    /// Listeners, in [`ListenerId`] order, already bound.
    pub listeners: Vec<std::net::UdpSocket>,
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
}

impl std::fmt::Debug for ShardParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardParts").field("id", &self.id).finish()
    }
}

/// Creates a poll instance and its waker.
pub fn new_poll() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}

/// Whether a socket may still have datagrams waiting after its batch ran out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drained {
    Empty,
    MoreWaiting,
}

struct Shard {
    id: u16,
    poll: Poll,
    listeners: Vec<UdpSocket>,
    relays: RelaySlots,
    engine: Engine,
    pkt: PacketBuf,
    stats: Arc<ShardStats>,
    recv_batch: usize,
}

impl Shard {
    fn send_to_client(&self, tuple: FiveTuple, bytes: &[u8]) {
        let Some(listener) = self.listeners.get(usize::from(tuple.listener.0)) else {
            return;
        };
        send(listener, bytes, tuple.client, &self.stats);
    }

    fn perform(&mut self, action: Action, reply_to: Option<FiveTuple>) {
        match action {
            Action::Done => {}
            Action::Drop(reason) => bump(&self.stats.drops[reason.index()], 1),
            Action::Reply { len } => {
                if let Some(tuple) = reply_to {
                    self.send_to_client(tuple, self.engine.reply(len));
                }
            }
            Action::ToPeer { idx, peer, range } => {
                if let Some(Some(sock)) = self.relays.sockets.get(idx as usize) {
                    send(sock, self.pkt.get(range), peer, &self.stats);
                }
            }
            Action::ToClient { tuple, range } => self.send_to_client(tuple, self.pkt.get(range)),
        }
    }

    fn drain_listener(&mut self, now: Instant, i: usize) -> Drained {
        for _ in 0..self.recv_batch {
            let Some(listener) = self.listeners.get(i) else {
                return Drained::Empty;
            };
            match listener.recv_from(self.pkt.body_mut()) {
                Ok((len, from)) => {
                    let tuple = FiveTuple {
                        client: from,
                        listener: ListenerId(i as u16),
                        transport: Transport::Udp,
                    };
                    let action =
                        self.engine
                            .handle_client(now, tuple, &mut self.pkt, len, &mut self.relays);
                    self.perform(action, Some(tuple));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => log::debug!("shard {}: listener {i} receive error: {e}", self.id),
            }
        }
        Drained::MoreWaiting
    }

    fn drain_relay(&mut self, now: Instant, idx: usize) -> Drained {
        for _ in 0..self.recv_batch {
            let Some(Some(sock)) = self.relays.sockets.get(idx) else {
                return Drained::Empty;
            };
            match sock.recv_from(self.pkt.body_mut()) {
                Ok((len, from)) => {
                    let action = self
                        .engine
                        .handle_peer(now, idx as u32, from, &mut self.pkt, len);
                    self.perform(action, None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP errors surface here on some kernels; nothing to do but go on.
                Err(e) => log::trace!("shard {}: relay {idx} receive error: {e}", self.id),
            }
        }
        Drained::MoreWaiting
    }

    fn serve(&mut self, now: Instant, token: Token) -> Drained {
        match token.0 {
            i if i < RELAY_BASE => self.drain_listener(now, i),
            t if t >= RELAY_BASE && token != WAKER => self.drain_relay(now, t - RELAY_BASE),
            _ => Drained::Empty,
        }
    }
}

/// Sends one datagram; a full socket buffer drops it and counts (a relay never queues).
fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr, stats: &ShardStats) {
    match sock.send_to(bytes, to) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => bump(&stats.send_would_block, 1),
        Err(e) => log::trace!("send to {to} failed: {e}"),
    }
}

/// Runs a shard until it receives [`Ctl::Shutdown`].
pub fn run(parts: ShardParts) {
    let ShardParts {
        id,
        poll,
        listeners,
        engine,
        inbox,
        stats,
        buffers,
        recv_batch,
    } = parts;
    let registry = match poll.registry().try_clone() {
        Ok(r) => r,
        Err(e) => {
            log::error!("shard {id}: cannot clone the poll registry: {e}");
            return;
        }
    };
    let mut mio_listeners = Vec::with_capacity(listeners.len());
    for (i, l) in listeners.into_iter().enumerate() {
        let mut sock = UdpSocket::from_std(l);
        if let Err(e) = registry.register(&mut sock, Token(i), Interest::READABLE) {
            log::error!("shard {id}: cannot register listener {i}: {e}");
            return;
        }
        mio_listeners.push(sock);
    }
    let mut shard = Shard {
        id,
        poll,
        listeners: mio_listeners,
        relays: RelaySlots {
            registry,
            sockets: Vec::new(),
            buffers,
        },
        engine,
        pkt: PacketBuf::default(),
        stats,
        recv_batch: recv_batch.max(1),
    };
    let mut events = Events::with_capacity(1024);
    let mut pending: Vec<Token> = Vec::new();
    let mut still_pending: Vec<Token> = Vec::new();
    // Listeners may hold datagrams that arrived before registration: serve them once.
    pending.extend((0..shard.listeners.len()).map(Token));
    log::debug!("shard {id} running");
    loop {
        let timeout = if pending.is_empty() {
            let now = clock::now();
            shard.engine.poll_timeout().map_or(MAX_SLEEP, |t| {
                t.saturating_duration_since(now).min(MAX_SLEEP)
            })
        } else {
            Duration::ZERO
        };
        if let Err(e) = shard.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("shard {id}: poll failed: {e}");
                return;
            }
        }
        // The clock is read once per wake-up.
        let now = clock::now();
        for event in events.iter() {
            if shard.serve(now, event.token()) == Drained::MoreWaiting {
                still_pending.push(event.token());
            }
        }
        for token in pending.drain(..) {
            if shard.serve(now, token) == Drained::MoreWaiting {
                still_pending.push(token);
            }
        }
        still_pending.sort_unstable_by_key(|t| t.0);
        still_pending.dedup();
        std::mem::swap(&mut pending, &mut still_pending);
        shard.engine.handle_timeout(now, &mut shard.relays);
        while let Ok(ctl) = inbox.try_recv() {
            match ctl {
                Ctl::Reload(settings) => shard.engine.reload(clock::now(), settings),
                Ctl::Shutdown => {
                    shard.engine.close_all(&mut shard.relays);
                    log::debug!("shard {id} stopped");
                    return;
                }
            }
        }
    }
}
