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
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
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
