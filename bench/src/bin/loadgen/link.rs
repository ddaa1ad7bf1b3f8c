//! How a client reaches the server: its own UDP socket, or (`--tcp`) a TCP connection carrying framed
//! STUN messages and ChannelData (RFC 8656 §12.5: over a stream, ChannelData is padded to 4 bytes).

use mio::net::{TcpStream, UdpSocket};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use turnpike::proto::framing;

/// Most bytes a TCP client keeps waiting to be written when the server reads slower than the schedule:
/// beyond it a frame is not sent (and not counted as sent), as a full UDP socket buffer would drop it.
const WRITE_BACKLOG: usize = 1 << 20;
/// Bytes read from a stream per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// A client's connection to the server.
pub enum Link {
    /// One UDP socket (connected to the server once the set-up is done).
    Udp(UdpSocket),
    /// One TCP connection.
    Tcp(TcpLink),
}

/// A TCP connection with its read buffer (frames not yet handed out) and write backlog.
pub struct TcpLink {
    stream: TcpStream,
    rbuf: Vec<u8>,
    /// Where the next frame in `rbuf` starts.
    start: usize,
    out: Vec<u8>,
}

impl Link {
    /// A TCP connection to `server`, connected before it returns (Nagle off: the generator measures
    /// latency, and batches its own writes).
    pub fn tcp(server: SocketAddr) -> io::Result<Self> {
        let stream = std::net::TcpStream::connect(server)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Link::Tcp(TcpLink {
            stream: TcpStream::from_std(stream),
            rbuf: Vec::with_capacity(READ_CHUNK),
            start: 0,
            out: Vec::new(),
        }))
    }

    /// The event source to register with the poll.
    pub fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Link::Udp(s) => s,
            Link::Tcp(t) => &mut t.stream,
        }
    }

    /// The UDP socket, if this is one.
    pub fn udp(&self) -> Option<&UdpSocket> {
        match self {
            Link::Udp(s) => Some(s),
            Link::Tcp(_) => None,
        }
    }

    /// Sends one message (a STUN message or a ChannelData frame) to the server. A TCP frame goes
    /// whole or not at all: `WouldBlock` when the backlog is full.
    pub fn send_to(&mut self, bytes: &[u8], server: SocketAddr) -> io::Result<usize> {
        match self {
            Link::Udp(s) => s.send_to(bytes, server),
            Link::Tcp(t) => t.send(bytes),
        }
    }

    /// Sends on a connected UDP socket, or on the TCP connection.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Link::Udp(s) => s.send(bytes),
            Link::Tcp(t) => t.send(bytes),
        }
    }

    /// Bytes still waiting to be written (TCP only).
    pub fn backlog(&self) -> usize {
        match self {
            Link::Udp(_) => 0,
            Link::Tcp(t) => t.out.len(),
        }
    }

    /// Writes what the backlog holds, as far as the socket takes it.
    pub fn flush(&mut self) {
        if let Link::Tcp(t) = self {
            t.flush();
        }
    }

    /// The next message from the server into `buf`: a datagram, or the next complete frame of the
    /// stream (read until the socket is drained, as edge-triggered polling requires). `WouldBlock` when
    /// none is waiting; a closed stream is an error.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Udp(s) => s.recv(buf),
            Link::Tcp(t) => t.recv(buf),
        }
    }
}

impl TcpLink {
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.out.len() + bytes.len() > WRITE_BACKLOG {
            self.flush();
            if self.out.len() + bytes.len() > WRITE_BACKLOG {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        self.out.extend_from_slice(bytes);
        // ChannelData over a stream is padded to a multiple of 4 (STUN messages always are).
        let pad = (4 - bytes.len() % 4) % 4;
        self.out.extend_from_slice(&[0u8; 3][..pad]);
        self.flush();
        Ok(bytes.len())
    }

    fn flush(&mut self) {
        let mut written = 0;
        while written < self.out.len() {
            match self.stream.write(&self.out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.out.drain(..written);
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let waiting = &self.rbuf[self.start..];
            match framing::frame_len(waiting) {
                Ok(Some(len)) => {
                    let n = len.min(buf.len());
                    buf[..n].copy_from_slice(&waiting[..n]);
                    self.start += len;
                    return Ok(n);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            // Keep the partial frame at the front, then read more behind it.
            self.rbuf.drain(..self.start);
            self.start = 0;
            let old = self.rbuf.len();
            self.rbuf.resize(old + READ_CHUNK, 0);
            let got = self.stream.read(&mut self.rbuf[old..]);
            self.rbuf.truncate(old + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
