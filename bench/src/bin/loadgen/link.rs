//! How a client reaches the server: its own UDP socket, or (`--tcp`, `--tls`) a TCP connection, plain
//! or TLS, carrying framed STUN messages and ChannelData (RFC 8656 §12.5: over a stream, ChannelData is
//! padded to 4 bytes).

use mio::net::{TcpStream, UdpSocket};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use turnpike::proto::framing;
use turnpike::shard::readbuf::ReadBuf;

/// Most bytes a TCP client keeps waiting to be written when the server reads slower than the schedule:
/// beyond it a frame is not sent (and not counted as sent), as a full UDP socket buffer would drop it.
const WRITE_BACKLOG: usize = 1 << 20;
/// Bytes read from a stream per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes waiting in a stream's read buffer (well above the largest frame).
const READ_LIMIT: usize = 1 << 20;

/// A client's connection to the server.
pub(crate) enum Link {
    /// One UDP socket (connected to the server once the set-up is done).
    Udp(UdpSocket),
    /// One TCP connection, plain or TLS.
    Tcp(TcpLink),
}

/// A TCP connection (TLS over it, if `tls`) with its read buffer (frames not yet handed out) and, for
/// plain TCP, its write backlog (over TLS the backlog is the records rustls holds).
pub(crate) struct TcpLink {
    stream: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    rbuf: ReadBuf,
    out: Vec<u8>,
}

impl Link {
    /// A TCP connection to `server`, connected (and with `tls`, the handshake done) before it returns
    /// (Nagle off: the generator measures latency).
    pub(crate) fn tcp(server: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> io::Result<Self> {
        let mut stream = std::net::TcpStream::connect(server)?;
        stream.set_nodelay(true)?;
        let tls = match tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
                let mut conn = rustls::ClientConnection::new(Arc::clone(cfg), name).map_err(io::Error::other)?;
                // Records wait in rustls while the server reads slower than the schedule.
                conn.set_buffer_limit(None);
                while conn.is_handshaking() {
                    conn.complete_io(&mut stream)?;
                }
                Some(Box::new(conn))
            }
            None => None,
        };
        stream.set_nonblocking(true)?;
        Ok(Self::Tcp(TcpLink { stream: TcpStream::from_std(stream), tls, rbuf: ReadBuf::default(), out: Vec::new() }))
    }

    /// The event source to register with the poll.
    pub(crate) fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Self::Udp(s) => s,
            Self::Tcp(t) => &mut t.stream,
        }
    }

    /// The UDP socket, if this is one.
    pub(crate) fn udp(&self) -> Option<&UdpSocket> {
        match self {
            Self::Udp(s) => Some(s),
            Self::Tcp(_) => None,
        }
    }

    /// Sends one message (a STUN message or a ChannelData frame) to the server. A TCP frame goes
    /// whole or not at all: `WouldBlock` when the backlog is full.
    pub(crate) fn send_to(&mut self, bytes: &[u8], server: SocketAddr) -> io::Result<usize> {
        match self {
            Self::Udp(s) => s.send_to(bytes, server),
            Self::Tcp(t) => t.send(bytes),
        }
    }

    /// Sends on a connected UDP socket, or on the TCP connection.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Self::Udp(s) => s.send(bytes),
            Self::Tcp(t) => t.send(bytes),
        }
    }

    /// Bytes still waiting to be written (TCP only; over TLS, 1 while rustls holds records).
    pub(crate) fn backlog(&self) -> usize {
        match self {
            Self::Udp(_) => 0,
            Self::Tcp(t) => t.out.len() + t.tls.as_ref().map_or(0, |c| usize::from(c.wants_write())),
        }
    }

    /// Writes what the backlog holds, as far as the socket takes it.
    pub(crate) fn flush(&mut self) {
        if let Self::Tcp(t) = self {
            t.flush();
        }
    }

    /// The next message from the server into `buf`: a datagram, or the next complete frame of the
    /// stream (read until the socket is drained, as edge-triggered polling requires). `WouldBlock` when
    /// none is waiting; a closed stream is an error.
    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Udp(s) => s.recv(buf),
            Self::Tcp(t) => t.recv(buf),
        }
    }
}

impl TcpLink {
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // ChannelData over a stream is padded to a multiple of 4 (STUN messages always are).
        let pad = &[0u8; 3][..(4 - bytes.len() % 4) % 4];
        if let Some(tls) = &mut self.tls {
            // One record per message, as a client sends them.
            tls.writer().write_all(&[bytes, pad].concat())?;
            self.flush();
            return Ok(bytes.len());
        }
        if self.out.len() + bytes.len() > WRITE_BACKLOG {
            self.flush();
            if self.out.len() + bytes.len() > WRITE_BACKLOG {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        self.out.extend_from_slice(bytes);
        self.out.extend_from_slice(pad);
        self.flush();
        Ok(bytes.len())
    }

    fn flush(&mut self) {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                if tls.write_tls(&mut self.stream).is_err() {
                    break;
                }
            }
            return;
        }
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
            let waiting = self.rbuf.waiting();
            match framing::frame_len(waiting) {
                Ok(Some(len)) => {
                    let n = len.min(buf.len());
                    buf[..n].copy_from_slice(&waiting[..n]);
                    self.rbuf.consume(len);
                    return Ok(n);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            // More bytes behind the partial frame (the server's own read buffer type).
            let room = self.rbuf.room(READ_CHUNK, READ_LIMIT);
            let got = match &mut self.tls {
                None => self.stream.read(room),
                Some(tls) => read_tls(tls, &mut self.stream, room),
            };
            self.rbuf.filled(*got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Plaintext from a TLS connection into `buf`: what rustls has decrypted, else records read from the
/// socket and decrypted. `Ok(0)` at the end of the stream; `WouldBlock` when nothing is waiting.
fn read_tls(tls: &mut rustls::ClientConnection, stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match tls.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if tls.read_tls(stream)? == 0 {
            return Ok(0);
        }
        tls.process_new_packets().map_err(io::Error::other)?;
    }
}

/// A client configuration that accepts the server's certificate whatever it is (the generator measures
/// a server it was pointed at; the handshake and its signatures are still real).
pub(crate) fn tls_config() -> io::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(turnpike_client::tls::AcceptAny(Arc::clone(&provider)));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    Ok(Arc::new(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()))
}
