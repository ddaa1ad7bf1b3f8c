//! Sending relayed IPv4 datagrams of many allocations through one raw socket.
//!
//! Every allocation has its own relay socket, because its datagrams must leave from its own relayed
//! address. With many allocations, each wake-up has one or two datagrams per relay socket, and
//! `sendmmsg(2)` batches only per socket: one system call per datagram. A raw socket
//! (`IPPROTO_RAW`, which builds no header and receives nothing) sends datagrams with any source
//! address and port, so they all leave in one `sendmmsg`: the shard writes each datagram's IPv4 and
//! UDP header, with the relay socket's own address as the source, into the headroom in front of the
//! payload (nothing is copied). The relay socket stays bound, so the port stays reserved and the
//! peer's answers arrive there as before. The headers are plain: no IP options, TOS 0, TTL 64 (Linux's
//! default), and no don't-fragment bit, so a router with a smaller MTU on the
//! way fragments a large datagram rather than dropping it. A datagram larger than the first hop's MTU
//! is refused by the kernel (a raw socket does not fragment) and leaves through its relay socket.
//!
//! Opening a raw socket needs `CAP_NET_RAW`. Without it (the systemd unit does not grant it by
//! default) the shard sends as before; `runtime.raw_send: false` never tries.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, BorrowedFd};

/// Bytes of the IPv4 header (no options) and the UDP header written in front of each payload.
pub const HEADER_LEN: usize = 20 + 8;
/// Time to live of the datagrams (Linux's default `net.ipv4.ip_default_ttl`).
const TTL: u8 = 64;
/// Largest UDP payload an IPv4 datagram carries.
const MAX_PAYLOAD: usize = 65_535 - HEADER_LEN;

/// A shard's raw socket for sending.
#[derive(Debug)]
pub struct RawSocket {
    sock: Socket,
}

impl RawSocket {
    /// Opens a non-blocking `IPPROTO_RAW` socket with `send_buffer` bytes of send buffer (0: the
    /// kernel's default). Fails without `CAP_NET_RAW`.
    pub fn open(send_buffer: usize) -> io::Result<Self> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
        sock.set_nonblocking(true)?;
        if send_buffer > 0 {
            sock.set_send_buffer_size(send_buffer)?;
        }
        Ok(Self { sock })
    }
}

impl AsFd for RawSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Writes the IPv4 and UDP headers of a datagram from `from` to `to` into `packet[..HEADER_LEN]`; the
/// payload is `packet[HEADER_LEN..]`. The kernel fills in the IP identification and header checksum;
/// the UDP checksum is computed here. Returns false, writing nothing, when `packet` is shorter than
/// the headers or the payload is too large for one IPv4 datagram.
pub fn write_header(packet: &mut [u8], from: SocketAddrV4, to: SocketAddrV4) -> bool {
    let Some(payload_len) = packet.len().checked_sub(HEADER_LEN) else {
        return false;
    };
    if payload_len > MAX_PAYLOAD {
        return false;
    }
    let total = (HEADER_LEN + payload_len) as u16;
    let udp_len = (8 + payload_len) as u16;
    let (ip, udp) = packet.split_at_mut(20);
    ip.copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, TTL, libc::IPPROTO_UDP as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[12..16].copy_from_slice(&from.ip().octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    udp[0..2].copy_from_slice(&from.port().to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    // The pseudo-header: source, destination, protocol, UDP length.
    let mut sum = u64::from(from.ip().to_bits())
        + u64::from(to.ip().to_bits())
        + u64::from(libc::IPPROTO_UDP as u16)
        + u64::from(udp_len);
    sum += ones_complement_sum(udp);
    let checksum = !fold(sum);
    // 0 means "no checksum" in UDP over IPv4; a computed 0 is sent as its other form (RFC 768).
    let checksum = if checksum == 0 { 0xffff } else { checksum };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// The one's complement sum of `bytes` as big-endian 16-bit words (an odd last byte padded with zero),
/// not yet folded. Summing 32-bit words gives the same folded result (2^16 is 1 modulo 2^16 - 1) with
/// half the additions.
fn ones_complement_sum(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(4);
    let mut sum: u64 = words.by_ref().map(|w| u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))).sum();
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum += u64::from(u32::from_be_bytes(tail));
    sum
}

/// Folds a one's complement sum to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum by the textbook: 16-bit words, carries folded in as they happen.
    fn reference_checksum(from: SocketAddrV4, to: SocketAddrV4, udp: &[u8]) -> u16 {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&from.ip().octets());
        bytes.extend_from_slice(&to.ip().octets());
        bytes.extend_from_slice(&[0, 17]);
        bytes.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        bytes.extend_from_slice(udp);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for w in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let c = !(sum as u16);
        if c == 0 { 0xffff } else { c }
    }

    #[test]
    fn headers_carry_the_addresses_lengths_and_a_correct_checksum() {
        let from: SocketAddrV4 = "192.0.2.10:49200".parse().unwrap();
        let to: SocketAddrV4 = "198.51.100.7:5004".parse().unwrap();
        for len in [0usize, 1, 2, 3, 5, 160, 172, 1199, 1200] {
            let mut packet = vec![0u8; HEADER_LEN + len];
            for (i, b) in packet[HEADER_LEN..].iter_mut().enumerate() {
                *b = (i * 7 + len) as u8;
            }
            assert!(write_header(&mut packet, from, to));
            assert_eq!(packet[0], 0x45);
            assert_eq!(u16::from_be_bytes([packet[2], packet[3]]) as usize, HEADER_LEN + len);
            assert_eq!((packet[8], packet[9]), (64, 17));
            assert_eq!(&packet[12..16], &[192, 0, 2, 10]);
            assert_eq!(&packet[16..20], &[198, 51, 100, 7]);
            assert_eq!(u16::from_be_bytes([packet[20], packet[21]]), 49200);
            assert_eq!(u16::from_be_bytes([packet[22], packet[23]]), 5004);
            assert_eq!(u16::from_be_bytes([packet[24], packet[25]]) as usize, 8 + len);
            let written = u16::from_be_bytes([packet[26], packet[27]]);
            let mut udp = packet[20..].to_vec();
            udp[6] = 0;
            udp[7] = 0;
            assert_eq!(written, reference_checksum(from, to, &udp), "payload of {len} bytes");
        }
    }

    #[test]
    fn too_short_or_too_long_packets_are_refused_untouched() {
        let from: SocketAddrV4 = "192.0.2.10:49200".parse().unwrap();
        let to: SocketAddrV4 = "198.51.100.7:5004".parse().unwrap();
        let mut short = [9u8; HEADER_LEN - 1];
        assert!(!write_header(&mut short, from, to));
        assert!(short.iter().all(|&b| b == 9));
        let mut long = vec![9u8; HEADER_LEN + MAX_PAYLOAD + 1];
        assert!(!write_header(&mut long, from, to));
        assert!(long.iter().all(|&b| b == 9));
        let mut largest = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
        assert!(write_header(&mut largest, from, to));
    }
}
