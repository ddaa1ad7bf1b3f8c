//! One TURN-over-TCP or TURN-over-TLS client connection: bounded read and write buffers, framing via
//! [`crate::proto::framing`], and non-blocking TLS (rustls) driven by the shard's event loop.
//!
//! A full write buffer drops the relayed packet (counted by the caller); buffers never grow past their
//! bounds, so a slow reader costs at most [`WRITE_MAX`] bytes and never stalls the shard.

use crate::proto::allocation::FiveTuple;
use crate::proto::framing::{self, MAX_FRAME};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Instant;

/// Most plaintext bytes waiting to be written to one connection.
pub const WRITE_MAX: usize = 256 * 1024;
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
    rbuf: Vec<u8>,
    wbuf: VecDeque<u8>,
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
    ) -> Self {
        Self {
            stream,
            tuple,
            tls: tls.map(Box::new),
            rbuf: Vec::new(),
            wbuf: VecDeque::new(),
            accepted: now,
            last_activity: now,
            write_interest: false,
            closing: false,
            generation,
        }
    }

    /// Whether a TLS handshake is still under way.
    pub fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Reads what is available (up to [`READ_BUDGET`]) into the plaintext buffer.
    pub fn read(&mut self) -> ReadState {
        let mut total = 0usize;
        while total < READ_BUDGET {
            if self.rbuf.len() >= READ_MAX {
                // A frame larger than any legal one cannot be waiting: the caller consumes frames
                // before reading more, so a full buffer means garbage.
                return ReadState::Closed;
            }
            let got = match &mut self.tls {
                None => {
                    let old = self.rbuf.len();
                    self.rbuf.resize(old + READ_CHUNK.min(READ_MAX - old), 0);
                    let r = self.stream.read(&mut self.rbuf[old..]);
                    let n = *r.as_ref().unwrap_or(&0);
                    self.rbuf.truncate(old + n);
                    r
                }
                Some(tls) => read_tls(tls, &mut self.stream, &mut self.rbuf),
            };
            match got {
                Ok(0) => return ReadState::Closed,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadState::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadState::Closed,
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
        match framing::frame_len(&self.rbuf) {
            Ok(n) => n,
            Err(_) => Some(0),
        }
    }

    /// The first `len` buffered bytes.
    pub fn frame(&self, len: usize) -> &[u8] {
        &self.rbuf[..len.min(self.rbuf.len())]
    }

    /// Drops the first `len` buffered bytes.
    pub fn consume(&mut self, len: usize) {
        let len = len.min(self.rbuf.len());
        self.rbuf.drain(..len);
    }

    /// Queues bytes for writing; false (nothing queued) when the buffer has no room for all of them.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.wbuf.len() + bytes.len() > WRITE_MAX {
            return false;
        }
        self.wbuf.extend(bytes);
        true
    }

    /// Whether bytes are still waiting to go out.
    pub fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes as much as the socket takes. An error means the connection is dead.
    pub fn flush(&mut self) -> io::Result<()> {
        loop {
            let moved = match &mut self.tls {
                None => {
                    let (front, _) = self.wbuf.as_slices();
                    if front.is_empty() {
                        return Ok(());
                    }
                    match self.stream.write(front) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                        Err(e) => return Err(e),
                    }
                }
                Some(tls) => {
                    // Plaintext into rustls (bounded by its buffer limit), then records to the socket.
                    let (front, _) = self.wbuf.as_slices();
                    let n = if front.is_empty() || tls.is_handshaking() { 0 } else { tls.writer().write(front)? };
                    while tls.wants_write() {
                        match tls.write_tls(&mut self.stream) {
                            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                self.wbuf.drain(..n);
                                return Ok(());
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if n == 0 {
                        return Ok(());
                    }
                    n
                }
            };
            self.wbuf.drain(..moved);
        }
    }
}

/// Reads TLS records from the socket and decrypts what they hold into `out`. Returns the number of
/// ciphertext bytes read (0 = the peer closed).
fn read_tls(tls: &mut rustls::ServerConnection, stream: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<usize> {
    let n = match tls.read_tls(stream) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            drain_plaintext(tls, out)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Ok(0);
    }
    let state = tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    drain_plaintext(tls, out)?;
    if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
        return Ok(0);
    }
    // Handshake messages and alerts go out right away.
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn drain_plaintext(tls: &mut rustls::ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if out.len() >= READ_MAX {
            return Ok(());
        }
        let room = chunk.len().min(READ_MAX - out.len());
        match tls.reader().read(&mut chunk[..room]) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
