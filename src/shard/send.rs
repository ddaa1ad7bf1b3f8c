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
#[allow(clippy::disallowed_methods)] // tests wait for loopback delivery
mod tests {
    use super::*;
    use crate::proto::engine::HEADROOM;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn packet(payload: &[u8]) -> (PacketBuf, Range<usize>) {
        let mut pkt = PacketBuf::default();
        let n = pkt.fill(payload);
        (pkt, HEADROOM..HEADROOM + n)
    }

    fn receive_all(sock: &UdpSocket) -> Vec<Vec<u8>> {
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// Interleaved datagrams to two destinations from two sockets, of mixed sizes: every datagram
    /// arrives intact, in queue order per destination, whether segmentation is on or off.
    #[test]
    fn flush_delivers_everything_in_order_per_destination() {
        for gso in [true, false] {
            let out_a = UdpSocket::bind("127.0.0.1:0").unwrap();
            let out_b = UdpSocket::bind("127.0.0.1:0").unwrap();
            let dest_1 = UdpSocket::bind("127.0.0.1:0").unwrap();
            let dest_2 = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut queue = SendQueue::new(gso, None);
            let mut expected: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
            for i in 0..QUEUE_CAPACITY {
                let (via, dest) = match i % 3 {
                    0 => (Via::Listener(0), 0),
                    1 => (Via::Listener(1), 1),
                    _ => (Via::Listener(0), 1),
                };
                // Runs of one size with a shorter datagram now and then.
                let len = if i % 7 == 6 { 40 } else { 100 };
                let payload: Vec<u8> = (0..len).map(|k| (i + k) as u8).collect();
                let (mut pkt, range) = packet(&payload);
                let to = [&dest_1, &dest_2][dest].local_addr().unwrap();
                assert!(queue.push(via, None, to, &mut pkt, range));
                expected[dest].push(payload);
            }
            assert!(queue.is_full());
            let (mut spare, range) = packet(b"x");
            assert!(!queue.push(Via::Listener(0), None, dest_1.local_addr().unwrap(), &mut spare, range));
            let sockets = [out_a, out_b];
            let done = queue.flush(|via| match via {
                Via::Listener(i) => sockets.get(usize::from(i)),
                Via::Relay { .. } => None,
            });
            assert_eq!(done.sent, QUEUE_CAPACITY as u64, "gso {gso}: {done:?}");
            assert_eq!(done.failed + done.would_block, 0);
            assert!(done.syscalls < QUEUE_CAPACITY as u64 / 4, "batched: {done:?}");
            if gso && queue.gso() {
                assert!(done.segmented > 0, "{done:?}");
            } else {
                assert_eq!(done.segmented, 0);
            }
            assert!(queue.is_empty());
            // Per destination, arrival order equals queue order (two sockets feed dest_2: sort by
            // content would hide reordering, so compare each source's subsequence).
            assert_eq!(receive_all(&dest_1), expected[0], "gso {gso}");
            let got_2 = receive_all(&dest_2);
            assert_eq!(got_2.len(), expected[1].len(), "gso {gso}");
            for want in &expected[1] {
                assert!(got_2.contains(want));
            }
        }
    }

    /// A datagram whose socket has gone is dropped and counted; the others still leave.
    #[test]
    fn closed_socket_drops_only_its_datagrams() {
        let out = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = dest.local_addr().unwrap();
        let mut queue = SendQueue::new(true, None);
        for via in [Via::Relay { key: 1, generation: 1 }, Via::Relay { key: 2, generation: 1 }] {
            let (mut pkt, range) = packet(b"relayed");
            queue.push(via, None, to, &mut pkt, range);
        }
        let done = queue.flush(|via| (via == Via::Relay { key: 2, generation: 1 }).then_some(&out));
        assert_eq!((done.sent, done.failed), (1, 1));
        assert_eq!(receive_all(&dest), vec![b"relayed".to_vec()]);
    }

    /// Copied replies and moved relayed datagrams to one client leave in the order they were queued,
    /// in one flush, and a copy leaves the caller's bytes untouched.
    #[test]
    fn copied_replies_keep_their_place_among_relayed_datagrams() {
        let out = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = client.local_addr().unwrap();
        let mut queue = SendQueue::new(true, None);
        let via = Via::Listener(0);
        let reply = b"success response".to_vec();
        let (mut pkt, range) = packet(b"data-1");
        assert!(queue.push(via, None, to, &mut pkt, range));
        assert!(queue.push_copy(via, to, &reply));
        let (mut pkt, range) = packet(b"data-2");
        assert!(queue.push(via, None, to, &mut pkt, range));
        assert_eq!(reply, b"success response");
        let done = queue.flush(|_| Some(&out));
        assert_eq!(done.sent, 3);
        assert_eq!(receive_all(&client), vec![b"data-1".to_vec(), reply, b"data-2".to_vec()]);
        // A full queue refuses a copy as it refuses a move.
        for _ in 0..QUEUE_CAPACITY {
            assert!(queue.push_copy(via, to, b"x"));
        }
        assert!(!queue.push_copy(via, to, b"x"));
        assert_eq!(queue.flush(|_| Some(&out)).sent, QUEUE_CAPACITY as u64);
    }

    /// A raw socket taking the lone datagrams of a flush from `min_batch` of a family on, or `None` (and
    /// a note) without CAP_NET_RAW, unless TURNPIKE_REQUIRE_RAW is set.
    fn raw_socket(min_batch: usize) -> Option<RawSocket> {
        match RawSocket::open(1 << 20, min_batch) {
            Ok(raw) => Some(raw),
            Err(e) if std::env::var_os("TURNPIKE_REQUIRE_RAW").is_none() => {
                eprintln!("skipped: no raw socket ({e})");
                None
            }
            Err(e) => panic!("TURNPIKE_REQUIRE_RAW is set but no raw socket opens: {e}"),
        }
    }

    /// Every datagram with `receive_all`, with its source.
    fn receive_from_all(sock: &UdpSocket) -> Vec<(SocketAddr, Vec<u8>)> {
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            out.push((from, buf[..n].to_vec()));
        }
        out
    }

    /// With raw sockets: lone datagrams of many relay sockets leave in one call per family, each from
    /// its own relay socket's address and intact (the loopback device checks the UDP checksum); a run
    /// from one socket to one peer keeps its socket (a GSO message); a datagram of a closed socket is
    /// dropped; one with no room for the headers leaves through its own socket.
    #[test]
    fn lone_relayed_datagrams_leave_together_through_the_raw_socket() {
        let Some(raw) = raw_socket(1) else { return };
        let relays: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let v6_relay = UdpSocket::bind("[::1]:0").unwrap();
        let peer_1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_v6 = UdpSocket::bind("[::1]:0").unwrap();
        let (to_1, to_2) = (peer_1.local_addr().unwrap(), peer_2.local_addr().unwrap());
        let local = |k: usize| Some(relays[k].local_addr().unwrap());
        let relay = |key: u32| Via::Relay { key, generation: 1 };
        let mut queue = SendQueue::new(true, Some(raw));
        assert!(queue.raw());
        // Relays 0-5: one datagram each, alternating peers; relay 6: a run of three to peer 1 and one to
        // peer 2; relay 7 has closed; relay 5's datagram has no headroom; key 8: the IPv6 relay.
        let mut push = |key: u32, from: Option<SocketAddr>, to: SocketAddr, payload: &[u8], headroom: bool| {
            let (mut pkt, range) = packet(payload);
            let range = if headroom { range } else { 0..payload.len() };
            assert!(queue.push(relay(key), from, to, &mut pkt, range));
        };
        for k in 0..5 {
            push(k as u32, local(k), [to_1, to_2][k % 2], format!("lone {k}").as_bytes(), true);
        }
        push(5, local(5), to_2, &[0u8; 7], false);
        for i in 0..3 {
            push(6, local(6), to_1, format!("run {i}").as_bytes(), true);
        }
        push(6, local(6), to_2, b"lone 6", true);
        push(7, local(7), to_1, b"closed", true);
        push(8, Some(v6_relay.local_addr().unwrap()), peer_v6.local_addr().unwrap(), b"over IPv6", true);
        let done = queue.flush(|via| match via {
            Via::Relay { key: 7, .. } | Via::Listener(_) => None,
            Via::Relay { key: 8, .. } => Some(&v6_relay),
            Via::Relay { key, .. } => relays.get(key as usize),
        });
        assert_eq!((done.sent, done.failed, done.would_block), (11, 1, 0), "{done:?}");
        assert_eq!(done.raw, 7, "relays 0-4, relay 6's datagram to peer 2 and the IPv6 relay's: {done:?}");
        if queue.gso() {
            assert_eq!(done.segmented, 3, "{done:?}");
        }
        // One raw sendmmsg per family, one for relay 6's run, one sendto for relay 5's.
        assert_eq!(done.syscalls, 4, "{done:?}");
        let from = |k: usize| relays[k].local_addr().unwrap();
        let got_1 = receive_from_all(&peer_1);
        let want_1: Vec<(SocketAddr, Vec<u8>)> = vec![
            (from(0), b"lone 0".to_vec()),
            (from(2), b"lone 2".to_vec()),
            (from(4), b"lone 4".to_vec()),
            (from(6), b"run 0".to_vec()),
            (from(6), b"run 1".to_vec()),
            (from(6), b"run 2".to_vec()),
        ];
        assert_eq!(got_1.len(), want_1.len(), "{got_1:?}");
        for want in &want_1 {
            assert!(got_1.contains(want), "{want:?} in {got_1:?}");
        }
        let run: Vec<_> = got_1.iter().filter(|(f, _)| *f == from(6)).collect();
        assert_eq!(run.iter().map(|(_, d)| d.as_slice()).collect::<Vec<_>>(), [b"run 0", b"run 1", b"run 2"]);
        let mut got_2 = receive_from_all(&peer_2);
        got_2.sort();
        let mut want_2 = vec![
            (from(1), b"lone 1".to_vec()),
            (from(3), b"lone 3".to_vec()),
            (from(5), vec![0u8; 7]),
            (from(6), b"lone 6".to_vec()),
        ];
        want_2.sort();
        assert_eq!(got_2, want_2);
        assert_eq!(receive_from_all(&peer_v6), vec![(v6_relay.local_addr().unwrap(), b"over IPv6".to_vec())]);
    }

    /// A lone datagram larger than the route's MTU, which the raw socket refuses (`EMSGSIZE`: a raw
    /// socket does not fragment), leaves through its relay socket instead (the kernel fragments it),
    /// and the flush goes on through the raw socket. Loopback's MTU is 65,536, so the test runs itself
    /// again in a network namespace of its own whose loopback has an MTU of 1,500 (`unshare --net`,
    /// root only; without it the test says so and passes, unless TURNPIKE_REQUIRE_NETNS is set:
    /// `scripts/ci/test.sh` sets it where `unshare --net` works).
    #[test]
    fn a_datagram_above_the_mtu_leaves_through_its_relay_socket() {
        const INSIDE: &str = "TURNPIKE_TEST_IN_NETNS";
        if std::env::var_os(INSIDE).is_none() {
            let exe = std::env::current_exe().unwrap();
            let name = "shard::send::tests::a_datagram_above_the_mtu_leaves_through_its_relay_socket";
            let out = std::process::Command::new("unshare")
                .args(["--net", "sh", "-c", "ip link set lo mtu 1500 up && exec \"$0\" --exact \"$1\" --nocapture"])
                .arg(exe)
                .arg(name)
                .env(INSIDE, "1")
                .output();
            match out {
                Ok(out) if out.status.success() => {
                    let log = String::from_utf8_lossy(&out.stdout);
                    assert!(log.contains("1 passed"), "the test did not run inside the namespace: {log}");
                }
                Ok(out) if String::from_utf8_lossy(&out.stdout).contains("test result") => {
                    panic!("failed inside the namespace: {}", String::from_utf8_lossy(&out.stdout));
                }
                failed if std::env::var_os("TURNPIKE_REQUIRE_NETNS").is_none() => {
                    eprintln!("skipped: no network namespace ({failed:?})");
                }
                failed => panic!("TURNPIKE_REQUIRE_NETNS is set but no network namespace: {failed:?}"),
            }
            return;
        }
        let raw = RawSocket::open(1 << 20, 1).expect("root inside the namespace");
        let (big_relay, small_relay) =
            (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        let mut queue = SendQueue::new(true, Some(raw));
        let big: Vec<u8> = (0..1600).map(|i| (i % 251) as u8).collect();
        for (key, relay, payload) in [(0, &big_relay, big.as_slice()), (1, &small_relay, b"small".as_slice())] {
            let (mut pkt, range) = packet(payload);
            assert!(queue.push(
                Via::Relay { key, generation: 1 },
                Some(relay.local_addr().unwrap()),
                to,
                &mut pkt,
                range
            ));
        }
        let done = queue.flush(|via| match via {
            Via::Relay { key: 0, .. } => Some(&big_relay),
            Via::Relay { key: 1, .. } => Some(&small_relay),
            _ => None,
        });
        // The raw socket refuses the big one (1 call), its relay socket sends it (1), then the raw
        // socket sends the small one (1).
        assert_eq!((done.sent, done.raw, done.failed, done.syscalls), (2, 1, 0, 3), "{done:?}");
        let mut got = receive_from_all(&peer);
        got.sort();
        let mut want =
            vec![(big_relay.local_addr().unwrap(), big), (small_relay.local_addr().unwrap(), b"small".to_vec())];
        want.sort();
        assert_eq!(got, want);
    }

    /// Fewer lone datagrams of a family than the raw socket's `min_batch` leave through their relay
    /// sockets, one `sendto` each (the raw socket would save no call and cost the kernel a route per
    /// datagram on-link); from `min_batch` on they leave through the raw socket in one call. The
    /// count is per family.
    #[test]
    fn lone_datagrams_take_the_raw_socket_from_its_min_batch() {
        let Some(raw) = raw_socket(4) else { return };
        assert_eq!(raw.min_batch(), 4);
        let relays: Vec<UdpSocket> = (0..4).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let v6_relay = UdpSocket::bind("[::1]:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_v6 = UdpSocket::bind("[::1]:0").unwrap();
        let mut queue = SendQueue::new(true, Some(raw));
        let socket = |via: Via| match via {
            Via::Relay { key: 9, .. } => Some(&v6_relay),
            Via::Relay { key, .. } => relays.get(key as usize),
            Via::Listener(_) => None,
        };
        for lone in [3, 4] {
            for (k, relay) in relays.iter().enumerate().take(lone) {
                let (mut pkt, range) = packet(format!("lone {k} of {lone}").as_bytes());
                let from = Some(relay.local_addr().unwrap());
                assert!(queue.push(
                    Via::Relay { key: k as u32, generation: 1 },
                    from,
                    peer.local_addr().unwrap(),
                    &mut pkt,
                    range
                ));
            }
            // One IPv6 datagram: below the minimum of its own family whatever the IPv4 count.
            let (mut pkt, range) = packet(b"lone over IPv6");
            let from = Some(v6_relay.local_addr().unwrap());
            assert!(queue.push(
                Via::Relay { key: 9, generation: 1 },
                from,
                peer_v6.local_addr().unwrap(),
                &mut pkt,
                range
            ));
            let done = queue.flush(socket);
            let (raw, calls) = if lone < 4 { (0, lone + 1) } else { (4, 2) };
            assert_eq!((done.sent, done.raw, done.syscalls), (lone as u64 + 1, raw, calls as u64), "{lone}: {done:?}");
            let mut got = receive_from_all(&peer);
            got.sort();
            let mut want: Vec<(SocketAddr, Vec<u8>)> = (0..lone)
                .map(|k| (relays[k].local_addr().unwrap(), format!("lone {k} of {lone}").into_bytes()))
                .collect();
            want.sort();
            assert_eq!(got, want);
            assert_eq!(receive_from_all(&peer_v6), vec![(v6_relay.local_addr().unwrap(), b"lone over IPv6".to_vec())]);
        }
    }

    /// An IPv4 address spelled as IPv6 never takes the raw socket: no IPv6 packet may carry it.
    #[test]
    fn v4_mapped_destinations_never_take_the_raw_socket() {
        assert!(is_v4_mapped("[::ffff:192.0.2.1]:5004".parse().unwrap()));
        assert!(!is_v4_mapped("[2001:db8::1]:5004".parse().unwrap()));
        assert!(!is_v4_mapped("192.0.2.1:5004".parse().unwrap()));
        let Some(raw) = raw_socket(1) else { return };
        let relay = UdpSocket::bind("[::1]:0").unwrap();
        let mut queue = SendQueue::new(true, Some(raw));
        let (mut pkt, range) = packet(b"mapped");
        let to: SocketAddr = "[::ffff:127.0.0.1]:9".parse().unwrap();
        assert!(queue.push(
            Via::Relay { key: 0, generation: 1 },
            Some(relay.local_addr().unwrap()),
            to,
            &mut pkt,
            range
        ));
        let done = queue.flush(|_| Some(&relay));
        assert_eq!((done.raw, done.sent + done.failed), (0, 1), "{done:?}");
    }

    /// Without a raw socket, a source address changes nothing: every datagram leaves through its socket.
    #[test]
    fn without_a_raw_socket_source_addresses_are_ignored() {
        let out = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut queue = SendQueue::new(true, None);
        assert!(!queue.raw());
        let (mut pkt, range) = packet(b"relayed");
        assert!(queue.push(
            Via::Relay { key: 0, generation: 1 },
            Some(out.local_addr().unwrap()),
            peer.local_addr().unwrap(),
            &mut pkt,
            range
        ));
        let done = queue.flush(|_| Some(&out));
        assert_eq!((done.sent, done.raw, done.syscalls), (1, 0, 1));
        assert_eq!(receive_from_all(&peer), vec![(out.local_addr().unwrap(), b"relayed".to_vec())]);
    }

    #[test]
    fn flush_keys_group_by_socket_then_destination_then_queue_order() {
        let relay = |key, generation| Via::Relay { key, generation };
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let queued = [
            (relay(7, 1), b),
            (Via::Listener(1), a),
            (relay(7, 1), a),
            (relay(3, 2), a),
            (relay(7, 2), a),
            (relay(7, 1), b),
            (Via::Listener(0), v6),
            (relay(7, 1), a),
        ];
        let mut keys: Vec<u128> =
            queued.iter().enumerate().map(|(i, &(via, to))| flush_key(via, to, i as u8)).collect();
        keys.sort_unstable();
        let order: Vec<u8> = keys.iter().map(|&k| k as u8).collect();
        assert_eq!(order, [6, 1, 3, 2, 7, 0, 5, 4]);
    }

    #[test]
    fn runs_stop_at_a_new_destination_size_or_limit() {
        let dest: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:9".parse().unwrap();
        let mut queue = SendQueue::new(true, None);
        for (to, len) in [(dest, 100), (dest, 100), (dest, 60), (dest, 100), (other, 100), (other, 120)] {
            let (mut pkt, range) = packet(&vec![7u8; len]);
            queue.push(Via::Listener(0), None, to, &mut pkt, range);
        }
        let order: Vec<u8> = (0..6).collect();
        assert_eq!(run_len(&queue.pending, &order, 0, 6), 3, "a shorter datagram ends the run");
        assert_eq!(run_len(&queue.pending, &order, 3, 6), 1, "another destination ends it");
        assert_eq!(run_len(&queue.pending, &order, 4, 6), 1, "a longer datagram cannot follow");
    }
}
