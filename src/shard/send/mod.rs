//! Batched sending: relayed datagrams wait in a [`SendQueue`] until the end of the wake-up (or until the
//! queue is full), then leave with one `sendmmsg(2)` per socket, and with UDP generic segmentation
//! offload (`UDP_SEGMENT`) where consecutive datagrams go from one socket to one destination with one
//! size: the kernel then builds, routes and checksums one large datagram and cuts it into the original
//! datagrams on the way out, instead of doing that work once per datagram.
//!
//! Nothing is copied: a queued datagram's buffer is swapped into the queue (a pointer swap) and the
//! queue's spare buffer takes its place. Everything is allocated once; queueing and flushing allocate
//! nothing (`tests/hot_path_alloc.rs`).
//!
//! Order is kept per destination: datagrams to one destination leave in the order they were queued.
//! When the kernel or the route cannot segment (`EIO`: no checksum offload on the device,
//! `ENOPROTOOPT`: a kernel older than 4.18), segmentation is switched off for good and datagrams leave
//! one by one in the same `sendmmsg` calls.
//!
//! With raw sockets (see [`super::rawsend`]), relayed datagrams that are alone in the flush on
//! their way from one relay socket to one peer (the shape of many allocations: one or two datagrams
//! each per wake-up) leave together through the raw socket of their family, in one `sendmmsg`,
//! instead of one `sendto` each, when there are at least the raw socket's [`RawSocket::min_batch`]
//! of them; fewer leave through their relay sockets (on one the raw socket saves no call, and it
//! costs the kernel a route per datagram to an on-link peer). Runs that one socket sends to one peer
//! keep their socket (and their GSO message). Within a flush one
//! destination's datagrams thus take one way or the other, never both, which keeps their order. (A
//! peer whose datagrams take one way in one wake-up and the other in the next could, on a multi-queue
//! NIC that picks the transmit queue per socket rather than per CPU, see two of them swapped; UDP
//! promises no order, and the media it carries is reordered by the receiver's jitter buffer.)

use super::rawsend::{self, RawSocket};
use super::sys::{self, MAX_MESSAGES, Outgoing};
use crate::proto::PacketBuf;
use crate::proto::engine::HEADROOM;
use socket2::SockAddr;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};

/// Datagrams a queue holds before it must be flushed.
pub const QUEUE_CAPACITY: usize = MAX_MESSAGES;
/// Most datagrams in one segmented send (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one segmented send (an IPv4 UDP datagram carries at most 65,507).
const MAX_SEGMENTED_BYTES: usize = 60_000;

/// The socket a queued datagram leaves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    /// UDP listener `i` (datagrams to UDP clients).
    Listener(u16),
    /// Relay socket `key`, as long as it is still the socket opened as `generation` (a socket closed and
    /// reopened for another allocation before the flush must not send the old allocation's data).
    Relay {
        /// Relay socket key.
        key: u32,
        /// Which opening of that key.
        generation: u32,
    },
}

/// One queued datagram.
#[derive(Debug)]
struct Pending {
    via: Via,
    to: SocketAddr,
    name: SockAddr,
    range: Range<usize>,
    /// The relay socket's own address, when the datagram may leave through a raw socket.
    raw_from: Option<SocketAddr>,
}

/// What a flush did, for the shard's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Datagrams dropped because a socket buffer was full.
    pub would_block: u64,
    /// Datagrams dropped for another error, or because their socket had closed.
    pub failed: u64,
    /// System calls made.
    pub syscalls: u64,
    /// Datagrams that left inside a segmented (GSO) send.
    pub segmented: u64,
    /// Datagrams that left through the raw socket.
    pub raw: u64,
}

/// Datagrams waiting to be sent. See the module documentation.
pub struct SendQueue {
    bufs: Vec<PacketBuf>,
    pending: Vec<Pending>,
    /// Flush order (indices into `pending`), reused between flushes.
    order: Vec<u8>,
    /// Sort keys of the flush order (see [`flush_key`]), reused between flushes.
    keys: Vec<u128>,
    gso: bool,
    raw: Option<RawSocket>,
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("queued", &self.pending.len())
            .field("gso", &self.gso)
            .field("raw", &self.raw.is_some())
            .finish()
    }
}

/// One message of a flush: `count` datagrams from flush position `start`, segmented when `segment > 0`.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    start: usize,
    count: usize,
    segment: u16,
}

impl SendQueue {
    /// An empty queue; `gso` allows UDP segmentation offload; `raw` sends lone relayed datagrams (those
    /// pushed with a source address) through raw sockets.
    pub fn new(gso: bool, raw: Option<RawSocket>) -> Self {
        Self {
            bufs: (0..QUEUE_CAPACITY).map(|_| PacketBuf::default()).collect(),
            pending: Vec::with_capacity(QUEUE_CAPACITY),
            order: Vec::with_capacity(QUEUE_CAPACITY),
            keys: Vec::with_capacity(QUEUE_CAPACITY),
            gso,
            raw,
        }
    }

    /// Whether segmentation offload is (still) in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether datagrams pushed with a source address may leave through a raw socket.
    pub fn raw(&self) -> bool {
        self.raw.is_some()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the queue must be flushed before the next [`push`](Self::push).
    pub fn is_full(&self) -> bool {
        self.pending.len() >= QUEUE_CAPACITY
    }

    /// Queues the bytes `range` of `pkt` for `to` via `via`: `pkt`'s buffer moves into the queue and a
    /// spare buffer takes its place. `raw_from`: the address `via`'s socket is bound to, when the
    /// datagram may leave through a raw socket instead (a relay socket's address; used when `to` is of
    /// its family and a raw socket of that family is open). A full queue refuses (returns false);
    /// flush first.
    pub fn push(
        &mut self,
        via: Via,
        raw_from: Option<SocketAddr>,
        to: SocketAddr,
        pkt: &mut PacketBuf,
        range: Range<usize>,
    ) -> bool {
        let Some(buf) = self.bufs.get_mut(self.pending.len()) else {
            return false;
        };
        std::mem::swap(buf, pkt);
        let raw_from = raw_from.filter(|from| {
            from.is_ipv4() == to.is_ipv4() && !is_v4_mapped(to) && self.raw.as_ref().is_some_and(|raw| raw.sends(to))
        });
        self.pending.push(Pending { via, to, name: SockAddr::from(to), range, raw_from });
        true
    }

    /// Queues a copy of `bytes` (a reply built outside the packet buffer, at most one full datagram) for
    /// `to` via `via`. A full queue refuses (returns false); flush first.
    pub fn push_copy(&mut self, via: Via, to: SocketAddr, bytes: &[u8]) -> bool {
        let Some(buf) = self.bufs.get_mut(self.pending.len()) else {
            return false;
        };
        let n = buf.fill(bytes);
        self.pending.push(Pending { via, to, name: SockAddr::from(to), range: HEADROOM..HEADROOM + n, raw_from: None });
        true
    }

    /// Sends everything queued, one socket after the other, and the lone datagrams with a source
    /// address through the raw socket; `socket` finds the socket for a [`Via`] (`None`: it has closed,
    /// its datagrams are dropped).
    pub fn flush<'s, S: AsFd + 's>(&mut self, socket: impl Fn(Via) -> Option<&'s S>) -> Flushed {
        let mut done = Flushed::default();
        let n = self.pending.len();
        if n == 0 {
            return done;
        }
        // Group by socket, then destination, keeping queue order inside each (the index breaks ties).
        self.keys.clear();
        self.keys.extend(self.pending.iter().enumerate().map(|(i, p)| flush_key(p.via, p.to, i as u8)));
        self.keys.sort_unstable();
        self.order.clear();
        self.order.extend(self.keys.iter().map(|&k| k as u8));
        // Lone datagrams for the raw sockets, by queue index; a family with fewer than the raw socket's
        // minimum keeps them in their sockets' groups.
        let take = self.raw_families();
        let mut lone = [0u8; QUEUE_CAPACITY];
        let mut n_lone = 0;
        let mut start = 0;
        while start < n {
            let via = self.pending[usize::from(self.order[start])].via;
            let same = self.order[start..].iter().take_while(|&&i| self.pending[usize::from(i)].via == via).count();
            let end = start + same;
            match socket(via) {
                Some(sock) => {
                    let fd = sock.as_fd();
                    let kept =
                        if take != [false; 2] { self.take_lone(start..end, take, &mut lone, &mut n_lone) } else { end };
                    if kept > start {
                        self.send_group(fd, start..kept, &mut done);
                    }
                }
                None => done.failed += same as u64,
            }
            start = end;
        }
        if n_lone > 0 {
            self.send_raw(&lone[..n_lone], &socket, &mut done);
        }
        self.pending.clear();
        done
    }

    /// Whether the flush's lone datagrams of each family (`[IPv4, IPv6]`) leave through the raw socket:
    /// there is one, and they are at least its [`RawSocket::min_batch`].
    fn raw_families(&self) -> [bool; 2] {
        let Some(raw) = self.raw.as_ref() else {
            return [false; 2];
        };
        let mut lone = [0usize; 2];
        let mut pos = 0;
        while pos < self.order.len() {
            let run = self.destination_run(pos, self.order.len());
            let first = &self.pending[usize::from(self.order[pos])];
            if run == 1 && first.raw_from.is_some() {
                lone[usize::from(!first.to.is_ipv4())] += 1;
            }
            pos += run;
        }
        lone.map(|count| count >= raw.min_batch())
    }

    /// How many datagrams from flush position `pos` on (before `end`) go through one socket to one
    /// destination.
    fn destination_run(&self, pos: usize, end: usize) -> usize {
        let first = &self.pending[usize::from(self.order[pos])];
        self.order[pos..end]
            .iter()
            .take_while(|&&i| {
                let p = &self.pending[usize::from(i)];
                p.via == first.via && p.to == first.to
            })
            .count()
    }

    /// Moves the datagrams of flush positions `group` (one socket) that are alone on their way to
    /// their destination and may leave through the raw socket of their family (`take`: `[IPv4, IPv6]`)
    /// into `lone`, and closes up the rest of the group in flush order; returns the end of what stays.
    fn take_lone(
        &mut self,
        group: Range<usize>,
        take: [bool; 2],
        lone: &mut [u8; QUEUE_CAPACITY],
        n_lone: &mut usize,
    ) -> usize {
        let mut kept = group.start;
        let mut pos = group.start;
        while pos < group.end {
            let run = self.destination_run(pos, group.end);
            let first = &self.pending[usize::from(self.order[pos])];
            if run == 1 && first.raw_from.is_some() && take[usize::from(!first.to.is_ipv4())] {
                lone[*n_lone] = self.order[pos];
                *n_lone += 1;
            } else {
                self.order.copy_within(pos..pos + run, kept);
                kept += run;
            }
            pos += run;
        }
        kept
    }

    /// Sends `lone` datagrams through the raw sockets, per family in as few `sendmmsg` calls as the
    /// kernel allows: each gets its IP and UDP header written into the headroom in front of it. One the
    /// raw socket cannot take (no room for the headers; larger than the route's MTU, which a raw socket
    /// does not fragment) leaves through its own socket instead (`socket`, as for [`Self::flush`]).
    fn send_raw<'s, S: AsFd + 's>(&mut self, lone: &[u8], socket: &impl Fn(Via) -> Option<&'s S>, done: &mut Flushed) {
        for v4 in [true, false] {
            self.send_raw_family(lone, v4, socket, done);
        }
    }

    /// Sends queued datagram `i` through its own socket, as a raw socket could not.
    fn send_own<'s, S: AsFd + 's>(&self, i: u8, socket: &impl Fn(Via) -> Option<&'s S>, done: &mut Flushed) {
        match socket(self.pending[usize::from(i)].via) {
            Some(sock) => self.send_one(sock.as_fd(), i, done),
            None => done.failed += 1,
        }
    }

    /// [`Self::send_raw`] for the datagrams of one family (IPv4 when `v4`).
    fn send_raw_family<'s, S: AsFd + 's>(
        &mut self,
        lone: &[u8],
        v4: bool,
        socket: &impl Fn(Via) -> Option<&'s S>,
        done: &mut Flushed,
    ) {
        let Some(raw_fd) = self.raw.as_ref().and_then(|raw| raw.fd(v4)) else {
            return;
        };
        let mut ready = [0u8; QUEUE_CAPACITY];
        let mut n_ready = 0;
        for &i in lone.iter().filter(|&&i| self.pending[usize::from(i)].to.is_ipv4() == v4) {
            let p = &self.pending[usize::from(i)];
            let framed = match (p.raw_from, p.range.start.checked_sub(rawsend::header_len(p.to))) {
                (Some(from), Some(head)) => {
                    rawsend::write_header(self.bufs[usize::from(i)].get_mut(head..p.range.end), from, p.to)
                }
                _ => false,
            };
            if framed {
                ready[n_ready] = i;
                n_ready += 1;
            } else {
                self.send_own(i, socket, done);
            }
        }
        if n_ready == 0 {
            return;
        }
        // Entries past `n_ready` repeat the last datagram; only the first `n_ready` are sent.
        let at = |j: usize| usize::from(ready[j.min(n_ready - 1)]);
        let iov: [IoSlice<'_>; QUEUE_CAPACITY] = std::array::from_fn(|j| {
            let p = &self.pending[at(j)];
            IoSlice::new(self.bufs[at(j)].get(p.range.start - rawsend::header_len(p.to)..p.range.end))
        });
        // IPv6 raw sockets read a destination's port as a protocol number: theirs carry none.
        let bare: Option<[SockAddr; QUEUE_CAPACITY]> =
            (!v4).then(|| std::array::from_fn(|j| rawsend::raw_destination(self.pending[at(j)].to)));
        let msgs: [Outgoing<'_>; QUEUE_CAPACITY] = std::array::from_fn(|j| Outgoing {
            to: bare.as_ref().map_or(&self.pending[at(j)].name, |names| &names[j]),
            iov: &iov[j..j + 1],
            segment: 0,
        });
        send_messages(
            raw_fd,
            &msgs[..n_ready],
            done,
            |_| 1,
            |_, done| {
                done.sent += 1;
                done.raw += 1;
            },
            |m, e, done| {
                if e.raw_os_error() == Some(libc::EMSGSIZE) {
                    // Larger than the route's MTU: a raw socket does not fragment, its own socket does.
                    self.send_own(ready[m], socket, done);
                } else {
                    log::trace!("raw send to {} failed: {e}", self.pending[usize::from(ready[m])].to);
                    done.failed += 1;
                }
                AfterError::Next
            },
        );
    }

    /// Sends one datagram (queue index `i`) with a plain `sendto`.
    fn send_one(&self, fd: BorrowedFd<'_>, i: u8, done: &mut Flushed) {
        let p = &self.pending[usize::from(i)];
        done.syscalls += 1;
        match sys::send_to(fd, self.bufs[usize::from(i)].get(p.range.clone()), &p.name) {
            Ok(_) => done.sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => done.would_block += 1,
            Err(e) => {
                log::trace!("send to {} failed: {e}", p.to);
                done.failed += 1;
            }
        }
    }

    /// Sends the datagrams at flush positions `group` (one socket) in as few `sendmmsg` calls as the
    /// kernel allows: runs of one destination and size as one segmented message each, the rest as one
    /// message per datagram, in order.
    fn send_group(&mut self, fd: BorrowedFd<'_>, group: Range<usize>, done: &mut Flushed) {
        if group.len() == 1 {
            // Nothing to batch (many allocations, one datagram each): a plain sendto.
            self.send_one(fd, self.order[group.start], done);
            return;
        }
        let Self { bufs, pending, order, gso, .. } = self;
        let mut use_gso = *gso;
        let mut pos = group.start;
        while pos < group.end {
            let mut iov: [IoSlice<'_>; QUEUE_CAPACITY] = [IoSlice::new(&[]); QUEUE_CAPACITY];
            for (slot, &i) in iov.iter_mut().zip(&order[pos..group.end]) {
                let p = &pending[usize::from(i)];
                *slot = IoSlice::new(bufs[usize::from(i)].get(p.range.clone()));
            }
            let mut spans = [Span::default(); QUEUE_CAPACITY];
            let mut n_msgs = 0;
            let mut p = pos;
            while p < group.end {
                let count = if use_gso { run_len(pending, order, p, group.end) } else { 1 };
                let segment =
                    if count > 1 { u16::try_from(pending[usize::from(order[p])].range.len()).unwrap_or(0) } else { 0 };
                let count = if segment == 0 { 1 } else { count };
                spans[n_msgs] = Span { start: p, count, segment };
                n_msgs += 1;
                p += count;
            }
            let msgs: [Outgoing<'_>; QUEUE_CAPACITY] = std::array::from_fn(|j| {
                let span = spans[j.min(n_msgs - 1)];
                let first = span.start - pos;
                Outgoing {
                    to: &pending[usize::from(order[span.start])].name,
                    iov: &iov[first..first + span.count],
                    segment: span.segment,
                }
            });
            let stopped = send_messages(
                fd,
                &msgs[..n_msgs],
                done,
                |j| spans[j].count as u64,
                |j, done| {
                    done.sent += spans[j].count as u64;
                    if spans[j].segment > 0 {
                        done.segmented += spans[j].count as u64;
                    }
                },
                |m, e, done| match e.raw_os_error() {
                    Some(code @ (libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EINVAL))
                        if spans[m].segment > 0 =>
                    {
                        // EINVAL: this route cannot take it (a segment above the path MTU): this group
                        // goes one by one. The others: the kernel or device cannot segment.
                        if code != libc::EINVAL {
                            log::info!("UDP segmentation offload unavailable ({e}); sending datagrams one by one");
                            *gso = false;
                        }
                        use_gso = false;
                        AfterError::Stop
                    }
                    _ => {
                        log::trace!("send to {} failed: {e}", pending[usize::from(order[spans[m].start])].to);
                        done.failed += spans[m].count as u64;
                        AfterError::Next
                    }
                },
            );
            pos = stopped.map_or(group.end, |m| spans[m].start);
        }
    }
}

/// What to do with the message at the head of a failed `sendmmsg` (see [`send_messages`]).
enum AfterError {
    /// Go on with the next message: this one was handled or counted.
    Next,
    /// Stop here: the caller sends from this message on another way.
    Stop,
}

/// Sends `msgs` in as few `sendmmsg` calls as the kernel allows: the one place that reads their
/// results. `weight(j)` is how many datagrams message `j` carries (a segmented message, several);
/// `sent(j)` hears of each message that left. A failed call is repeated on EINTR; on EAGAIN (the
/// socket buffer is full) every message left counts as would-block; on another error its head message
/// goes to `failed`. Returns where it stopped when `failed` said [`AfterError::Stop`].
fn send_messages(
    fd: BorrowedFd<'_>,
    msgs: &[Outgoing<'_>],
    done: &mut Flushed,
    weight: impl Fn(usize) -> u64,
    mut sent: impl FnMut(usize, &mut Flushed),
    mut failed: impl FnMut(usize, &std::io::Error, &mut Flushed) -> AfterError,
) -> Option<usize> {
    let mut m = 0;
    while m < msgs.len() {
        done.syscalls += 1;
        match sys::send_batch(fd, &msgs[m..]) {
            Ok(0) => {
                done.failed += weight(m);
                m += 1;
            }
            Ok(k) => {
                for j in m..m + k {
                    sent(j, done);
                }
                m += k;
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => {
                    done.would_block += (m..msgs.len()).map(&weight).sum::<u64>();
                    return None;
                }
                _ => match failed(m, &e, done) {
                    AfterError::Next => m += 1,
                    AfterError::Stop => return Some(m),
                },
            },
        }
    }
    None
}

/// Whether `to` is an IPv4 address spelled as IPv6 (`::ffff:a.b.c.d`): no IPv6 packet may carry it, so
/// such a datagram never takes the raw socket (its relay socket answers for it as before).
fn is_v4_mapped(to: SocketAddr) -> bool {
    matches!(to, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some())
}

/// The flush order as one integer, so that sorting compares integers rather than addresses: the socket
/// (listener or relay key and its generation) in the top 65 bits, then the destination (an IPv4
/// address and port exactly, an IPv6 one folded: two destinations that fold alike only interleave,
/// which costs a segmented run, never order), and the queue index last, which keeps queue order per
/// destination and makes every key distinct.
fn flush_key(via: Via, to: SocketAddr, index: u8) -> u128 {
    let socket = match via {
        Via::Listener(i) => u128::from(i) << 63,
        Via::Relay { key, generation } => 1 << 127 | u128::from(key) << 95 | u128::from(generation) << 63,
    };
    let host = match to {
        SocketAddr::V4(a) => u64::from(a.ip().to_bits()),
        SocketAddr::V6(a) => {
            let bits = a.ip().to_bits();
            let folded = (bits as u64) ^ (bits >> 64) as u64;
            (folded ^ folded >> 32) & 0xffff_ffff
        }
    };
    socket | u128::from(host << 16 | u64::from(to.port())) << 8 | u128::from(index)
}

/// How many datagrams from flush position `pos` on can leave as one segmented message: one
/// destination, one size (the last may be shorter), within the kernel's limits.
fn run_len(pending: &[Pending], order: &[u8], pos: usize, end: usize) -> usize {
    let first = &pending[usize::from(order[pos])];
    let size = first.range.len();
    if size == 0 {
        return 1;
    }
    let mut run = 1;
    let mut total = size;
    while pos + run < end && run < MAX_SEGMENTS {
        let next = &pending[usize::from(order[pos + run])];
        let len = next.range.len();
        if next.to != first.to || len > size || len == 0 || total + len > MAX_SEGMENTED_BYTES {
            break;
        }
        run += 1;
        total += len;
        if len < size {
            break; // a shorter datagram can only be the last segment
        }
    }
    run
}

#[cfg(test)]
mod tests;
