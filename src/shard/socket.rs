//! Socket builders (socket2): reuse-port listeners shared by all shards, and per-allocation relay sockets.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;

/// Socket buffer sizes; 0 leaves the kernel default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Buffers {
    /// SO_RCVBUF.
    pub recv: usize,
    /// SO_SNDBUF.
    pub send: usize,
}

fn base_udp(addr: SocketAddr, buffers: Buffers) -> io::Result<Socket> {
    // Non-blocking from the start (SOCK_NONBLOCK): no fcntl round trip per relay socket.
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if buffers.recv > 0 {
        // The kernel caps this at net.core.rmem_max; a smaller buffer is not an error.
        let _ = socket.set_recv_buffer_size(buffers.recv);
    }
    if buffers.send > 0 {
        let _ = socket.set_send_buffer_size(buffers.send);
    }
    Ok(socket)
}

/// A UDP listener that joins the `SO_REUSEPORT` group on `addr` (one per shard).
pub fn reuseport_udp(addr: SocketAddr, buffers: Buffers) -> io::Result<std::net::UdpSocket> {
    let socket = base_udp(addr, buffers)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Fails with `AddrInUse` when some socket already holds `addr` for this transport (`ty`: datagram or
/// stream). Called before a shard group binds a fixed port, so another process on that port is found:
/// the shards bind with `SO_REUSEPORT` (UDP also with `SO_REUSEADDR`), which would otherwise let a
/// second server on the same port bind without error and take part of the traffic. The probe has no
/// reuse option, so any holder of the port conflicts with it; a stream probe keeps `SO_REUSEADDR`, so
/// connections of an earlier run waiting in TIME_WAIT do not count.
pub fn ensure_unused(addr: SocketAddr, ty: Type) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())
}

/// A relay socket bound to `addr` (exclusive: no reuse options).
pub fn relay_udp(addr: SocketAddr, buffers: Buffers) -> io::Result<std::net::UdpSocket> {
    let socket = base_udp(addr, buffers)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The local address the kernel would use to reach `probe` (no packet is sent: UDP `connect` only
/// picks a route). Used to find a relay address to advertise when listening on a wildcard.
pub fn route_source(probe: SocketAddr) -> Option<std::net::IpAddr> {
    let bind: SocketAddr = if probe.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(probe).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// A TCP listener that joins the `SO_REUSEPORT` group on `addr` (one per shard).
pub fn reuseport_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Most datagrams one `recvmmsg` call takes.
pub const MAX_BATCH: usize = super::sys::MAX_RECV;

/// Batched receiving with `recvmmsg(2)` into full-size [`PacketBuf`](crate::proto::PacketBuf)s (nothing is ever truncated).
/// Everything is allocated once; a call allocates nothing.
pub struct RecvBatch {
    /// The buffers; the caller swaps the one it processes into place.
    pub bufs: Vec<crate::proto::PacketBuf>,
    /// Message headers and source addresses for the kernel.
    headers: super::sys::RecvHeaders,
    /// Length and source of each datagram of the last call.
    pub meta: [(usize, Option<SocketAddr>); MAX_BATCH],
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("size", &self.bufs.len()).finish()
    }
}

impl RecvBatch {
    /// Up to `size` (at most [`MAX_BATCH`]) datagrams per call.
    pub fn new(size: usize) -> Self {
        let size = size.clamp(1, MAX_BATCH);
        Self {
            bufs: (0..size).map(|_| crate::proto::PacketBuf::default()).collect(),
            headers: super::sys::RecvHeaders::default(),
            meta: [(0, None); MAX_BATCH],
        }
    }

    /// Receives what is waiting on `fd` without blocking; returns how many datagrams arrived (0: none).
    pub fn recv(&mut self, fd: &impl std::os::fd::AsFd) -> io::Result<usize> {
        use std::io::IoSliceMut;
        let n = self.bufs.len();
        let mut bufs = self.bufs.iter_mut();
        let mut slices: [IoSliceMut<'_>; MAX_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| b.body_mut())));
        self.headers.recv(fd.as_fd(), &mut slices[..n], &mut self.meta)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests wait for loopback delivery
mod tests {
    use super::*;

    /// One batch serving IPv4 and then IPv6 sockets must still see full IPv6 source addresses.
    #[test]
    fn one_batch_serves_both_families_in_turn() {
        let mut batch = RecvBatch::new(4);
        for (local, from) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0"), ("127.0.0.1:0", "127.0.0.1:0")] {
            let rx = std::net::UdpSocket::bind(local).unwrap();
            rx.set_nonblocking(true).unwrap();
            let tx = std::net::UdpSocket::bind(from).unwrap();
            tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(batch.recv(&rx).unwrap(), 1);
            assert_eq!(batch.meta[0], (5, Some(tx.local_addr().unwrap())), "{local}");
        }
    }

    #[test]
    fn batch_receives_from_both_families() {
        for (local, from) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let rx = std::net::UdpSocket::bind(local).unwrap();
            rx.set_nonblocking(true).unwrap();
            let tx = std::net::UdpSocket::bind(from).unwrap();
            let mut batch = RecvBatch::new(4);
            assert_eq!(batch.recv(&rx).unwrap(), 0, "nothing waiting yet");
            for i in 0..6u8 {
                tx.send_to(&[i; 10], rx.local_addr().unwrap()).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(batch.recv(&rx).unwrap(), 4);
            assert_eq!(batch.meta[0], (10, Some(tx.local_addr().unwrap())), "{local}");
            assert_eq!(
                batch.bufs[3].get(crate::proto::engine::HEADROOM..crate::proto::engine::HEADROOM + 10),
                &[3u8; 10]
            );
            assert_eq!(batch.recv(&rx).unwrap(), 2);
            assert_eq!(batch.recv(&rx).unwrap(), 0);
        }
    }
}
