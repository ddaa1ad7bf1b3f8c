//! One TURN-over-TCP or TURN-over-TLS client connection: bounded read and write buffers, framing via
//! [`crate::proto::framing`], and non-blocking TLS (rustls) driven by the shard's event loop.
//!
//! A full write buffer drops the relayed packet (counted by the caller); buffers never grow past their
//! bounds, so a slow reader costs at most [`WRITE_MAX`] bytes and never stalls the shard.
//!
//! What the shard queues in one wake-up leaves in one write. Over TLS every queued message still gets
//! a record of its own (coturn's client tools read one message per record, as coturn sends them), and
//! the records of a wake-up go out together.
//!
//! Once its buffers have grown, a plain TCP connection allocates nothing per message; over TLS rustls
//! 0.23 allocates a buffer per record each way (its unbuffered API too), and nothing else does
//! (`tests/hot_path_alloc.rs`).

use super::readbuf::ReadBuf;
use crate::proto::allocation::FiveTuple;
use crate::proto::framing::{self, MAX_FRAME};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Instant;

/// Most plaintext bytes waiting to be written to one connection.
pub const WRITE_MAX: usize = 256 * 1024;
/// Most plaintext bytes turned into TLS records per round of [`Conn::flush`] (the records of one round
/// leave in one write).
const TLS_ROUND: usize = 64 * 1024;
/// Most bytes read from one connection per wake-up before the loop serves others.
pub const READ_BUDGET: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;
const READ_MAX: usize = MAX_FRAME + READ_CHUNK;

/// What reading found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    /// Nothing more to read now.
    Drained,
    /// The budget ran out with bytes still waiting.
    MoreWaiting,
    /// The peer closed, or the connection failed: close it.
    Closed,
}

/// A client connection.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// The client side of its (future) allocation.
    pub tuple: FiveTuple,
    tls: Option<Box<rustls::ServerConnection>>,
    rbuf: ReadBuf,
    wbuf: VecDeque<u8>,
    /// TLS only: the length of each message in `wbuf`, oldest first (one record each).
    wframes: VecDeque<usize>,
    /// An event reported the peer's close (or an error): read to the end, whatever a read returns.
    pub hangup_seen: bool,
    /// Whether the shard has this connection on its list of writes to flush.
    pub flush_listed: bool,
    /// When it was accepted.
    pub accepted: Instant,
    /// Last time a frame arrived.
    pub last_activity: Instant,
    /// Whether WRITABLE interest is registered.
    pub write_interest: bool,
    /// Close once the write buffer is flushed.
    pub closing: bool,
    /// Generation of its slab slot (for timers).
    pub generation: u32,
    /// Its place among the node's pending connections, until its first allocation (see
    /// [`crate::admission`]).
    pub pending: Option<crate::admission::Ticket>,
    /// What its first bytes must be (a PROXY header from a trusted proxy, see [`super::proxied`]).
    pub start: super::proxied::Start,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("tuple", &self.tuple).field("tls", &self.tls.is_some()).finish()
    }
}

impl Conn {
    /// A new connection; `tls` when it arrived on a TLS listener.
    pub fn new(
        stream: TcpStream,
        tuple: FiveTuple,
        tls: Option<rustls::ServerConnection>,
        now: Instant,
        generation: u32,
        pending: Option<crate::admission::Ticket>,
    ) -> Self {
        Self {
            stream,
            tuple,
            tls: tls.map(|mut t| {
                // Messages are fed to rustls only once its records have left (see `flush`), so its
                // own buffer never holds more than a round and the largest message.
                t.set_buffer_limit(Some(TLS_ROUND + MAX_FRAME + 1024));
                Box::new(t)
            }),
            rbuf: ReadBuf::default(),
            wbuf: VecDeque::new(),
            wframes: VecDeque::new(),
            hangup_seen: false,
            flush_listed: false,
            accepted: now,
            last_activity: now,
            write_interest: false,
            closing: false,
            generation,
            pending,
            start: super::proxied::Start::Open,
        }
    }

    /// Whether a TLS handshake is still under way.
    pub fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Reads what is available (up to [`READ_BUDGET`]) into the plaintext buffer.
    ///
    /// A read that returns less than it asked for has emptied the socket: the connection counts as
    /// drained without a further read that would only fail with `WouldBlock` (bytes that arrive later
    /// raise a new edge); over TLS only once rustls has handed out all the plaintext it decrypted. Not
    /// once the peer's close was reported: its end-of-stream raises no further edge, so the reads go
    /// on until they see it.
    pub fn read(&mut self) -> ReadState {
        let mut total = 0usize;
        while total < READ_BUDGET {
            if self.rbuf.waiting().len() >= READ_MAX {
                // A frame larger than any legal one cannot be waiting: the caller consumes frames
                // before reading more, so a full buffer means garbage.
                return ReadState::Closed;
            }
            // What was read, and whether the read found the socket empty (it returned bytes, fewer
            // than it asked for; over TLS, with all the plaintext handed out).
            let (got, socket_empty) = match &mut self.tls {
                None => {
                    let room = self.rbuf.room(READ_CHUNK, READ_MAX);
                    let asked = room.len();
                    let r = self.stream.read(room);
                    self.rbuf.filled(*r.as_ref().unwrap_or(&0));
                    let short = matches!(r, Ok(n) if n < asked);
                    (r, short)
                }
                Some(tls) => match read_tls(tls, &mut self.stream, &mut self.rbuf) {
                    Ok((n, drained)) => (Ok(n), drained),
                    Err(e) => (Err(e), false),
                },
            };
            match got {
                Ok(0) => return ReadState::Closed,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadState::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadState::Closed,
            }
            if socket_empty && !self.hangup_seen {
                return ReadState::Drained;
            }
            if self.frame_len().is_some_and(|n| n > 0) {
                // Hand complete frames over before reading more (keeps the buffer small).
                return ReadState::MoreWaiting;
            }
        }
        ReadState::MoreWaiting
    }

    /// Length of the next complete frame; `Some(0)` means the stream is not TURN (close it).
    pub fn frame_len(&self) -> Option<usize> {
        match framing::frame_len(self.rbuf.waiting()) {
            Ok(n) => n,
            Err(_) => Some(0),
        }
    }

    /// The first `len` buffered bytes.
    pub fn frame(&self, len: usize) -> &[u8] {
        let waiting = self.rbuf.waiting();
        &waiting[..len.min(waiting.len())]
    }

    /// Drops the first `len` buffered bytes.
    pub fn consume(&mut self, len: usize) {
        self.rbuf.consume(len);
    }

    /// Queues one message (a STUN message or ChannelData frame) for writing; false (nothing queued)
    /// when the buffer has no room for it.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.wbuf.len() + bytes.len() > WRITE_MAX {
            return false;
        }
        self.wbuf.extend(bytes);
        if self.tls.is_some() {
            self.wframes.push_back(bytes.len());
        }
        true
    }

    /// Whether bytes are still waiting to go out.
    pub fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes as much as the socket takes. An error means the connection is dead.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(tls) = &mut self.tls else {
            return flush_plain(&mut self.stream, &mut self.wbuf);
        };
        loop {
            // Records already made go out first, together (rustls writes them with one writev).
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if tls.is_handshaking() || self.wframes.is_empty() {
                return Ok(());
            }
            // Then a round of queued messages, one record each.
            let mut fed = 0;
            while let Some(&len) = self.wframes.front() {
                if fed > 0 && fed + len > TLS_ROUND {
                    break;
                }
                if self.wbuf.as_slices().0.len() < len {
                    self.wbuf.make_contiguous();
                }
                let Some(message) = self.wbuf.as_slices().0.get(..len) else {
                    // Lengths and bytes disagree (not expected): write the bytes as one record.
                    self.wframes.clear();
                    if !self.wbuf.is_empty() {
                        self.wframes.push_back(self.wbuf.len());
                    }
                    continue;
                };
                let took = tls.writer().write(message)?;
                if took == 0 {
                    return Ok(());
                }
                self.wbuf.drain(..took);
                if took < len {
                    // Not expected (the buffer limit leaves room for a round); the rest follows in
                    // the next record.
                    if let Some(front) = self.wframes.front_mut() {
                        *front = len - took;
                    }
                    break;
                }
                self.wframes.pop_front();
                fed += len;
            }
        }
    }
}

/// Writes the queued bytes of a plain TCP connection, as far as the socket takes them.
fn flush_plain(stream: &mut TcpStream, wbuf: &mut VecDeque<u8>) -> io::Result<()> {
    loop {
        let (front, _) = wbuf.as_slices();
        if front.is_empty() {
            return Ok(());
        }
        match stream.write(front) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                wbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The socket as rustls reads it, noting how much its last read asked for and got.
struct CountedReads<'a> {
    stream: &'a mut TcpStream,
    asked: usize,
    got: usize,
}

impl Read for CountedReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.asked = buf.len();
        self.got = 0;
        let n = self.stream.read(buf)?;
        self.got = n;
        Ok(n)
    }
}

/// Reads TLS records from the socket and decrypts what they hold into `out`. Returns the number of
/// ciphertext bytes read (0 = the peer closed), and whether the socket is empty (the read was short)
/// and every byte of plaintext rustls decrypted is in `out`.
fn read_tls(
    tls: &mut rustls::ServerConnection,
    stream: &mut TcpStream,
    out: &mut ReadBuf,
) -> io::Result<(usize, bool)> {
    let mut counted = CountedReads { stream, asked: 0, got: 0 };
    let read = tls.read_tls(&mut counted);
    let short = counted.got < counted.asked;
    let n = match read {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            drain_plaintext(tls, out)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Ok((0, false));
    }
    let state = tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let all_out = drain_plaintext(tls, out)?;
    if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
        return Ok((0, false));
    }
    // Handshake messages and alerts go out right away.
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok((n, short && all_out))
}

/// Moves the plaintext rustls holds into `out`, as far as `out` takes it; true when none is left.
fn drain_plaintext(tls: &mut rustls::ServerConnection, out: &mut ReadBuf) -> io::Result<bool> {
    loop {
        let room = out.room(READ_CHUNK, READ_MAX);
        if room.is_empty() {
            return Ok(false);
        }
        match tls.reader().read(room) {
            Ok(0) => return Ok(true),
            Ok(n) => out.filled(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}
