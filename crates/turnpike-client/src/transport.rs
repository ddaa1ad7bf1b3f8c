//! How a blocking client's messages reach the server: datagrams ([`Udp`]) or a byte stream cut into
//! STUN and ChannelData frames ([`Framed`], TCP or TLS).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use turnpike_proto::framing::frame_len;

/// The largest datagram or frame read at once.
const READ_BUF: usize = 65_536;

/// A way to the server.
pub trait Transport {
    /// Sends one message.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// The next datagram or frame, or `None` once `deadline` passed.
    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>>;
    /// Whether messages may be lost on the way (requests are sent again) and ChannelData is sent
    /// unpadded: true for UDP.
    fn is_datagram(&self) -> bool;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        (**self).send(bytes)
    }
    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        (**self).recv(deadline)
    }
    fn is_datagram(&self) -> bool {
        (**self).is_datagram()
    }
}

/// The clock, read here only: deadlines of a blocking client.
#[allow(clippy::disallowed_methods)] // a client's deadlines, not an event loop
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// What is left until `deadline`; `None` when it passed. Never zero (a zero read timeout means none).
fn time_left(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(now());
    (!left.is_zero()).then(|| left.max(Duration::from_millis(1)))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A UDP socket and the server it sends to.
#[derive(Debug)]
pub struct Udp {
    /// The socket.
    pub socket: UdpSocket,
    /// The server's address.
    pub server: SocketAddr,
    /// Whether the socket is connected to the server.
    connected: bool,
    /// Where datagrams are received before they are copied out at their length.
    buf: Vec<u8>,
}

impl Udp {
    /// A socket bound to `local` (port 0: any) sending to `server`, receiving from anyone (tests see
    /// what else reaches the client's address).
    pub fn bind(local: SocketAddr, server: SocketAddr) -> io::Result<Self> {
        Ok(Self { socket: UdpSocket::bind(local)?, server, connected: false, buf: Vec::new() })
    }

    /// A socket connected to `server`, from the address the routes choose: it hears only the server,
    /// and an ICMP port unreachable comes back as `ConnectionRefused` (a closed port, told apart from
    /// a silent one).
    pub fn connect(server: SocketAddr) -> io::Result<Self> {
        let any: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any)?;
        socket.connect(server)?;
        Ok(Self { socket, server, connected: true, buf: Vec::new() })
    }
}

impl Transport for Udp {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.connected {
            self.socket.send(bytes).map(|_| ())
        } else {
            self.socket.send_to(bytes, self.server).map(|_| ())
        }
    }

    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        let Some(left) = time_left(deadline) else { return Ok(None) };
        self.socket.set_read_timeout(Some(left))?;
        self.buf.resize(READ_BUF, 0);
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, _)) => Ok(Some(self.buf[..n].to_vec())),
            Err(e) if is_timeout(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn is_datagram(&self) -> bool {
        true
    }
}

/// A stream whose reads can be given a timeout.
pub trait ReadTimeout {
    /// Sets the read timeout (`None`: block).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl ReadTimeout for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Self::set_read_timeout(self, timeout)
    }
}

impl ReadTimeout for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
}

/// A byte stream to the server (TCP, or TLS over TCP) and the bytes read past the last whole frame.
#[derive(Debug)]
pub struct Framed<S> {
    /// The stream.
    pub stream: S,
    pending: Vec<u8>,
    /// Where reads land before they join `pending`.
    buf: Vec<u8>,
}

impl<S> Framed<S> {
    /// Frames `stream`.
    pub fn new(stream: S) -> Self {
        Self { stream, pending: Vec::new(), buf: Vec::new() }
    }
}

impl<S: Read + Write + ReadTimeout> Transport for Framed<S> {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            match frame_len(&self.pending) {
                Ok(Some(n)) => return Ok(Some(self.pending.drain(..n).collect())),
                Ok(None) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the server sent a bad frame: {e}"),
                    ));
                }
            }
            let Some(left) = time_left(deadline) else { return Ok(None) };
            self.stream.set_read_timeout(Some(left))?;
            self.buf.resize(READ_BUF, 0);
            match self.stream.read(&mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending.extend_from_slice(&self.buf[..n]),
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn is_datagram(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // the server side writes in two steps
    fn a_stream_is_cut_into_whole_frames_whatever_the_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = Framed::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let (mut server, _) = listener.accept().unwrap();
        let one = crate::channel_data(0x4000, b"first", true).unwrap();
        let two = crate::channel_data(0x4001, b"second!", true).unwrap();
        let both = [one.clone(), two.clone()].concat();
        server.write_all(&both[..3]).unwrap();
        server.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        server.write_all(&both[3..]).unwrap();
        let deadline = now() + Duration::from_secs(5);
        assert_eq!(client.recv(deadline).unwrap(), Some(one));
        assert_eq!(client.recv(deadline).unwrap(), Some(two));
        assert_eq!(client.recv(now() + Duration::from_millis(20)).unwrap(), None, "nothing more: the deadline");
        drop(server);
        assert_eq!(client.recv(deadline).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
